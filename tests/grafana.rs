//! The shipped Grafana dashboard (`deploy/grafana/ringcast.json`) and
//! alerting rules (`deploy/prometheus/alerts.yml`) query only metrics a
//! running relay exports: each name they use is found in `/metrics` of a
//! relay behind Redis once it has carried some traffic.

mod common;

use std::collections::BTreeSet;

use common::redis::RedisServer;
use common::{http_publish, Client, Fmt, Relay};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// Every `ringcast_…` metric named in `text`, histogram series
/// (`_bucket`, `_sum`, `_count`) under their histogram's name.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("ringcast_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        names.insert(base.to_string());
    }
    names
}

/// The PromQL expressions of the dashboard's panels.
fn dashboard_queries(dashboard: &Value) -> Vec<String> {
    dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("an expr").to_string())
        .collect()
}

/// A subscriber whose socket takes almost nothing and who never reads, so
/// output waits in its outbox (what `ringcast_pending_bytes` samples).
async fn stuck_subscriber(relay: &Relay, channel: &str) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(relay.addr).await.unwrap();
    common::upgrade(&mut s).await;
    let subscribe = json!({"action": "subscribe", "channel": channel}).to_string();
    s.write_all(&common::frame(true, 1, subscribe.as_bytes(), common::MASK))
        .await
        .unwrap();
    s
}

#[tokio::test]
async fn every_metric_the_dashboard_and_the_alerts_query_is_exported() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/ringcast.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "ringcast");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "{queries:?}");
    let alerts = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
    let rules: Vec<&str> = alerts
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect();
    for alert in [
        "RingcastNotReady",
        "RingcastDeafBackplane",
        "RingcastSlowConsumersRising",
        "RingcastAgeP99OverBudget",
    ] {
        assert!(alerts.contains(&format!("alert: {alert}")), "{alert}");
    }
    assert_eq!(rules.len(), 4);
    let mut wanted = metric_names(&queries.join("\n"));
    wanted.extend(metric_names(&rules.join("\n")));

    let redis = RedisServer::start();
    let relay = Relay::start(&[
        "--workers",
        "2",
        "--redis",
        &redis.url(),
        "--max-pending-bytes",
        "64000000",
    ]);
    relay.wait_readyz(200).await;
    // Traffic that makes the histograms exist: frames written, messages
    // conflated, output waiting for a client that does not read.
    let mut conflating = Client::connect(&relay, Fmt::Json).await;
    conflating
        .send(json!({"action": "subscribe", "channel": "g", "conflate_ms": 50}))
        .await;
    conflating.expect_type("subscribed").await;
    let _stuck = stuck_subscriber(&relay, "g").await;
    // 18 MB: past what the kernel buffers for the client that does not read.
    let body = json!("x".repeat(30_000)).to_string();
    for i in 0..600 {
        let channel = format!("g?key=k{}", i % 4);
        let (status, answer) = http_publish(relay.addr, &channel, &body, "").await;
        assert_eq!(status, 202, "{answer}");
    }
    relay
        .wait_metric("ringcast_pending_bytes_count", &[], |v| v > 0.0)
        .await;
    relay
        .wait_metric("ringcast_redis_probe_rtt_seconds_count", &[], |v| v > 0.0)
        .await;
    relay
        .wait_metric("ringcast_conflation_merged_total", &[], |v| v > 0.0)
        .await;
    let exported = metric_names(&relay.metrics_text().await);
    let missing: Vec<&String> = wanted.difference(&exported).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
}
