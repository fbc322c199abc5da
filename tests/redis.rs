//! The Redis backplane end to end: several relay processes sharing one
//! real `redis-server` (started by each test on a free port) behave as one
//! relay — delivery, global seq, `since` on another node, raw PUBLISH from
//! backends, and recovery from Redis faults.

mod common;

use std::collections::BTreeMap;

use common::redis::{free_port, RedisCluster, RedisServer};
use common::{http_publish, Client, Fmt, Relay};
use serde_json::{json, Value};

/// A relay on `redis` with two workers, waited until ready.
async fn node(redis: &RedisServer, extra: &[&str]) -> Relay {
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str(), "--workers", "2"];
    args.extend_from_slice(extra);
    let relay = Relay::start(&args);
    relay.wait_readyz(200).await;
    relay
}

/// A relay on a Redis Cluster with two workers, waited until ready.
async fn cluster_node(cluster: &RedisCluster, extra: &[&str]) -> Relay {
    let seeds = cluster.seeds();
    let mut args = vec!["--redis-cluster", seeds.as_str(), "--workers", "2"];
    args.extend_from_slice(extra);
    let relay = Relay::start(&args);
    relay.wait_readyz(200).await;
    relay
}

/// `per_master` channel names for each master of `cluster`, in master order.
fn channels_on_every_master(cluster: &RedisCluster, per_master: usize) -> Vec<(String, usize)> {
    let mut picked: Vec<(String, usize)> = Vec::new();
    let mut count = vec![0; cluster.nodes.len()];
    for i in 0.. {
        let name = format!("shard{i}");
        let owner = cluster.owner_of(&format!("ringcast:{name}"));
        if count[owner] < per_master {
            count[owner] += 1;
            picked.push((name, owner));
        }
        if count.iter().all(|&c| c == per_master) {
            break;
        }
    }
    picked.sort_by_key(|(_, owner)| *owner);
    picked
}

/// Collects `n` messages of `channel` (ignoring other events).
async fn messages(client: &mut Client, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let ev = client.next().await;
        if ev["type"] == "message" {
            got.push(ev);
        }
    }
    got
}

fn seqs(msgs: &[Value]) -> Vec<u64> {
    msgs.iter()
        .map(|m| m["seq"].as_u64().expect("a seq"))
        .collect()
}

#[tokio::test]
async fn delivery_crosses_nodes_both_ways_with_one_seq() {
    let redis = RedisServer::start();
    let a = node(&redis, &[]).await;
    let b = node(&redis, &[]).await;
    let mut on_a = Client::connect(&a, Fmt::Json).await;
    let mut on_b = Client::connect(&b, Fmt::MsgPack).await;
    assert_eq!(on_a.subscribe("room").await["seq"], 0);
    assert_eq!(on_b.subscribe("room").await["seq"], 0);

    on_a.send(json!({"action": "publish", "channel": "room", "data": {"from": "a"}, "id": 1}))
        .await;
    let (status, body) = http_publish(b.addr, "room", r#"{"from":"b"}"#, "").await;
    assert_eq!(status, 202, "{body}");

    let mut published = None;
    for client in [&mut on_a, &mut on_b] {
        let mut got = Vec::new();
        while got.len() < 2 {
            let ev = client.next().await;
            match ev["type"].as_str() {
                Some("message") => got.push(ev),
                Some("published") => published = Some(ev),
                _ => panic!("unexpected {ev}"),
            }
        }
        assert_eq!(seqs(&got), vec![1, 2]);
        let mut froms: Vec<_> = got.iter().map(|m| m["data"]["from"].clone()).collect();
        froms.sort_by_key(|v| v.to_string());
        assert_eq!(froms, vec![json!("a"), json!("b")]);
    }
    let published = match published {
        Some(p) => p,
        None => on_a.expect_type("published").await,
    };
    let body: Value = serde_json::from_str(&body).unwrap();
    let mut acked = vec![
        published["seq"].as_u64().unwrap(),
        body["seq"].as_u64().unwrap(),
    ];
    acked.sort();
    assert_eq!(acked, vec![1, 2], "acks name the seqs the messages carry");
}

#[tokio::test]
async fn concurrent_publishers_on_three_nodes_share_one_gap_free_seq() {
    let redis = RedisServer::start();
    let nodes = [
        node(&redis, &["--max-publish-rate", "0"]).await,
        node(&redis, &["--max-publish-rate", "0"]).await,
        node(&redis, &["--max-publish-rate", "0"]).await,
    ];
    let mut subscribers = Vec::new();
    for n in &nodes {
        let mut c = Client::connect(n, Fmt::Json).await;
        c.subscribe("ticks").await;
        subscribers.push(c);
    }
    const PER_NODE: usize = 200;
    let mut publishers = Vec::new();
    for (p, n) in nodes.iter().enumerate() {
        let mut c = Client::connect(n, Fmt::Json).await;
        publishers.push(tokio::spawn(async move {
            for chunk in (0..PER_NODE).collect::<Vec<_>>().chunks(50) {
                let batch: Vec<Value> = chunk
                    .iter()
                    .map(|i| json!({"action": "publish", "channel": "ticks", "data": [p, i], "id": i}))
                    .collect();
                c.send(Value::Array(batch)).await;
            }
            let mut acks = BTreeMap::new();
            while acks.len() < PER_NODE {
                let ev = c.next().await;
                assert_eq!(ev["type"], "published", "{ev}");
                acks.insert(ev["id"].as_u64().unwrap(), ev["seq"].as_u64().unwrap());
            }
            acks
        }));
    }
    let mut all_acked = Vec::new();
    let mut data_by_seq = BTreeMap::new();
    for (p, task) in publishers.into_iter().enumerate() {
        let acks = task.await.unwrap();
        let mut previous = 0;
        for (i, seq) in acks {
            assert!(seq > previous, "one publisher's messages keep their order");
            previous = seq;
            data_by_seq.insert(seq, json!([p, i]));
            all_acked.push(seq);
        }
    }
    all_acked.sort();
    let total = 3 * PER_NODE;
    assert_eq!(all_acked, (1..=total as u64).collect::<Vec<_>>());
    for mut s in subscribers {
        let got = messages(&mut s, total).await;
        assert_eq!(seqs(&got), (1..=total as u64).collect::<Vec<_>>());
        for m in got {
            assert_eq!(m["data"], data_by_seq[&m["seq"].as_u64().unwrap()]);
        }
    }
}

#[tokio::test]
async fn since_recovers_on_another_node_from_redis_history() {
    let redis = RedisServer::start();
    let a = node(&redis, &["--history-size", "20"]).await;
    let b = node(&redis, &["--history-size", "20"]).await;
    let mut first = Client::connect(&a, Fmt::Json).await;
    let ack = first.subscribe("feed").await;
    for i in 1..=5 {
        http_publish(a.addr, "feed", &i.to_string(), "").await;
    }
    let got = messages(&mut first, 5).await;
    assert_eq!(seqs(&got), vec![1, 2, 3, 4, 5]);
    drop(first);
    let _ = ack;

    // Missed while away, published through the other node.
    for i in 6..=12 {
        let (status, _) = http_publish(b.addr, "feed", &i.to_string(), "").await;
        assert_eq!(status, 202);
    }
    let mut probe = Client::connect(&a, Fmt::Json).await;
    let epoch = probe.subscribe("feed").await["epoch"].clone();
    assert!(
        epoch.is_string(),
        "a channel with publications has an epoch"
    );

    // B has never had a subscriber for the channel: the replay comes from Redis.
    let mut back = Client::connect(&b, Fmt::MsgPack).await;
    back.send(
        json!({"action": "subscribe", "channel": "feed", "since": 5, "epoch": epoch, "id": 1}),
    )
    .await;
    let replay = messages(&mut back, 7).await;
    assert_eq!(seqs(&replay), (6..=12).collect::<Vec<_>>());
    assert_eq!(replay[0]["data"], 6);
    let ack = back.expect_type("subscribed").await;
    assert_eq!(
        (ack["seq"].as_u64(), ack["recovered"].as_bool()),
        (Some(12), Some(true))
    );
    http_publish(a.addr, "feed", "13", "").await;
    assert_eq!(
        seqs(&messages(&mut back, 1).await),
        vec![13],
        "then live, no gap"
    );

    // Another epoch, or a since older than Redis keeps: not recovered.
    let mut other = Client::connect(&b, Fmt::Json).await;
    other
        .send(
            json!({"action": "subscribe", "channel": "feed", "since": 5, "epoch": "nope", "id": 2}),
        )
        .await;
    assert_eq!(other.expect_type("subscribed").await["recovered"], false);
    for i in 14..=40 {
        http_publish(a.addr, "feed", &i.to_string(), "").await;
    }
    let mut late = Client::connect(&a, Fmt::Json).await;
    late.send(json!({"action": "subscribe", "channel": "feed", "since": 10, "id": 3}))
        .await;
    let ack = late.expect_type("subscribed").await;
    assert_eq!(
        (ack["seq"].as_u64(), ack["recovered"].as_bool()),
        (Some(40), Some(false))
    );
}

#[tokio::test]
async fn redis_history_is_trimmed_by_bytes_as_well_as_by_count() {
    let redis = RedisServer::start();
    // 100 KB of history per channel in Redis: room for four 20 KB messages.
    let args = ["--history-size", "100", "--history-channel-bytes", "100000"];
    let a = node(&redis, &args).await;
    let b = node(&redis, &args).await;
    let body = format!("\"{}\"", "y".repeat(20_000));
    for _ in 0..12 {
        let (status, answer) = http_publish(a.addr, "big", &body, "").await;
        assert_eq!(status, 202, "{answer}");
    }
    let kept: u64 = redis
        .cli(&["XLEN", "{ringcast:big}:hist"])
        .trim()
        .parse()
        .unwrap();
    assert_eq!(kept, 4, "Redis keeps what 100 KB hold");
    // B has no cache of the channel: what it recovers is what Redis holds.
    let mut back = Client::connect(&b, Fmt::Json).await;
    back.send(json!({"action": "subscribe", "channel": "big", "since": 8}))
        .await;
    assert_eq!(seqs(&messages(&mut back, 4).await), vec![9, 10, 11, 12]);
    assert_eq!(back.expect_type("subscribed").await["recovered"], true);
    let mut late = Client::connect(&b, Fmt::Json).await;
    late.send(json!({"action": "subscribe", "channel": "big", "since": 7}))
        .await;
    assert_eq!(late.expect_type("subscribed").await["recovered"], false);
}

#[tokio::test]
async fn backends_publish_straight_into_redis() {
    let redis = RedisServer::start();
    let a = node(&redis, &[]).await;
    let mut json_client = Client::connect(&a, Fmt::Json).await;
    let mut mp_client = Client::connect(&a, Fmt::MsgPack).await;
    json_client.subscribe("legacy").await;
    mp_client.subscribe("legacy").await;
    assert_eq!(
        redis.cli(&["PUBLISH", "ringcast:legacy", r#"{"price":10.5}"#]),
        "1"
    );
    assert_eq!(
        redis.cli(&["PUBLISH", "ringcast:legacy", "plain text"]),
        "1"
    );
    for c in [&mut json_client, &mut mp_client] {
        let got = messages(c, 2).await;
        assert_eq!(got[0]["data"], json!({"price": 10.5}));
        assert_eq!(got[1]["data"], "plain text");
        assert!(
            got.iter().all(|m| m.get("seq").is_none()),
            "raw messages carry no seq"
        );
    }
    // Raw messages do not take a seq: the next sequenced one is 1.
    http_publish(a.addr, "legacy", "1", "").await;
    assert_eq!(seqs(&messages(&mut json_client, 1).await), vec![1]);
    assert_eq!(seqs(&messages(&mut mp_client, 1).await), vec![1]);
}

#[tokio::test]
async fn malformed_envelopes_in_redis_are_dropped_and_counted() {
    let redis = RedisServer::start();
    let a = node(&redis, &[]).await;
    let mut c = Client::connect(&a, Fmt::Json).await;
    c.subscribe("bad").await;
    // The reserved prefix with a broken envelope, then a well-formed
    // envelope whose item is not JSON.
    for payload in ["\0rc1\nnonsense", "\0rc1\ne\n1\n9\njnot-json"] {
        assert_eq!(redis.command(&["PUBLISH", "ringcast:bad", payload]), ":1");
    }
    a.wait_metric("ringcast_redis_bad_envelopes_total", &[], |v| v == 2.0)
        .await;
    assert_eq!(redis.cli(&["PUBLISH", "ringcast:bad", "after"]), "1");
    http_publish(a.addr, "bad", r#""sequenced""#, "").await;
    let got = messages(&mut c, 2).await;
    assert_eq!(
        got[0]["data"], "after",
        "nothing of the bad ones reached the client"
    );
    assert_eq!(
        (got[1]["data"].as_str(), got[1]["seq"].as_u64()),
        (Some("sequenced"), Some(1))
    );
}

#[tokio::test]
async fn redis_unreachable_at_start_means_not_ready_and_unavailable() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let relay = Relay::start(&["--redis", &url, "--workers", "1"]);
    relay.wait_readyz(503).await;
    // The backplane's counters are there, at 0, before any event.
    let text = relay.metrics_text().await;
    for name in [
        "ringcast_redis_gaps_total",
        "ringcast_redis_reconnects_total",
    ] {
        assert!(
            text.contains(&format!("\n{name} 0\n")),
            "{name} missing: {text:.2000}"
        );
    }
    let mut c = Client::connect(&relay, Fmt::Json).await;
    c.send(json!({"action": "publish", "channel": "x", "data": 1, "id": 7}))
        .await;
    c.expect_error("unavailable", 7).await;
    c.send(json!({"action": "subscribe", "channel": "x", "id": 8}))
        .await;
    c.expect_error("unavailable", 8).await;
    let (status, body) = http_publish(relay.addr, "x", "1", "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("unavailable"), "{body}");

    let _redis = RedisServer::start_with(port, &[]);
    relay.wait_readyz(200).await;
    c.subscribe("x").await;
    c.send(json!({"action": "publish", "channel": "x", "data": 1, "id": 9}))
        .await;
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        kinds.push(c.next().await["type"].as_str().unwrap().to_string());
    }
    kinds.sort();
    assert_eq!(kinds, vec!["message", "published"]);
}

/// Fault tests keep every message they publish in history: how many are
/// published while a link is down depends on timing, and what is in
/// history must come back whatever that was.
const ROOM_FOR_EVERY_MESSAGE: [&str; 2] = ["--history-size", "1000"];

/// Publishes `0..n` as data on `channel` through `relay`'s HTTP endpoint,
/// one at a time, retrying while the backplane answers 503; returns the seq
/// each was acknowledged with.
async fn publish_all(
    relay: std::net::SocketAddr,
    channel: String,
    n: usize,
    mut after_each: impl FnMut(usize),
) -> BTreeMap<u64, usize> {
    let mut acked = BTreeMap::new();
    for i in 0..n {
        loop {
            let (status, body) = http_publish(relay, &channel, &i.to_string(), "").await;
            if status == 202 {
                let body: Value = serde_json::from_str(&body).unwrap();
                acked.insert(body["seq"].as_u64().unwrap(), i);
                break;
            }
            assert_eq!(status, 503, "{body}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        after_each(i);
    }
    acked
}

/// Reads messages until one with `last` arrives; asserts seqs run 1..=last
/// with no gap and no duplicate, and each acknowledged seq carries its data.
async fn expect_exactly_once(client: &mut Client, last: u64, acked: &BTreeMap<u64, usize>) {
    let mut seen = Vec::new();
    while seen.last().copied() != Some(last) {
        let ev = client.next().await;
        if ev["type"] != "message" {
            continue;
        }
        let seq = ev["seq"].as_u64().unwrap();
        if let Some(i) = acked.get(&seq) {
            assert_eq!(ev["data"], json!(i), "seq {seq}");
        }
        seen.push(seq);
    }
    assert_eq!(seen, (1..=last).collect::<Vec<_>>());
}

#[tokio::test]
async fn redis_restart_mid_stream_loses_nothing_acknowledged() {
    let mut redis = RedisServer::start_with(
        free_port(),
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let a = node(&redis, &ROOM_FOR_EVERY_MESSAGE).await;
    let b = node(&redis, &ROOM_FOR_EVERY_MESSAGE).await;
    let mut on_a = Client::connect(&a, Fmt::Json).await;
    let mut on_b = Client::connect(&b, Fmt::Json).await;
    on_a.subscribe("stream").await;
    on_b.subscribe("stream").await;

    let (kill_tx, mut kill_rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = a.addr;
    let publisher = tokio::spawn(async move {
        publish_all(addr, "stream".into(), 150, move |i| {
            if i == 50 {
                let _ = kill_tx.send(());
            }
        })
        .await
    });
    kill_rx.recv().await.unwrap();
    redis.restart();
    let acked = publisher.await.unwrap();
    assert_eq!(acked.len(), 150);
    let last = *acked.keys().last().unwrap();
    expect_exactly_once(&mut on_a, last, &acked).await;
    expect_exactly_once(&mut on_b, last, &acked).await;
    assert!(b.metric("ringcast_redis_reconnects_total", &[]).await >= 2.0);
}

#[tokio::test]
async fn killed_pubsub_connections_resubscribe_and_catch_up_in_order() {
    let redis = RedisServer::start();
    let a = node(&redis, &ROOM_FOR_EVERY_MESSAGE).await;
    let b = node(&redis, &ROOM_FOR_EVERY_MESSAGE).await;
    let mut on_b = Client::connect(&b, Fmt::Json).await;
    on_b.subscribe("cut").await;
    let (kill_tx, mut kill_rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = a.addr;
    let publisher = tokio::spawn(async move {
        publish_all(addr, "cut".into(), 300, move |i| {
            if i == 100 {
                let _ = kill_tx.send(());
            }
        })
        .await
    });
    kill_rx.recv().await.unwrap();
    let killed: u32 = redis
        .cli(&["CLIENT", "KILL", "TYPE", "pubsub"])
        .parse()
        .unwrap();
    assert!(killed >= 2, "both nodes' pub/sub links were cut ({killed})");
    let acked = publisher.await.unwrap();
    let last = *acked.keys().last().unwrap();
    assert_eq!(
        last, 300,
        "publishing never failed: only pub/sub links were cut"
    );
    expect_exactly_once(&mut on_b, last, &acked).await;
    assert!(b.metric("ringcast_redis_reconnects_total", &[]).await >= 2.0);
}

#[tokio::test]
async fn a_subscribe_storm_of_ten_thousand_channels_is_one_redis_subscription_each() {
    let redis = RedisServer::start();
    // The clients send every subscribe before reading a reply: room for
    // 10,000 acks, so the slow-consumer limit is not what this tests.
    let extra = [
        "--max-subscriptions",
        "10000",
        "--max-subscribe-rate",
        "0",
        "--max-batch-requests",
        "1000",
        "--max-pending-bytes",
        "8388608",
    ];
    let a = node(&redis, &extra).await;
    let b = node(&redis, &extra).await;
    let mut clients = Vec::new();
    for relay in [&a, &a, &b] {
        let mut c = Client::connect(relay, Fmt::MsgPack).await;
        for chunk in (0..10_000).collect::<Vec<_>>().chunks(1000) {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|i| json!({"action": "subscribe", "channel": format!("storm.{i}")}))
                .collect();
            c.send(Value::Array(batch)).await;
        }
        clients.push(c);
    }
    for c in clients.iter_mut() {
        for _ in 0..10_000 {
            c.expect_type("subscribed").await;
        }
    }
    let channels = redis.cli(&[
        "PUBSUB",
        "NUMSUB",
        "ringcast:storm.0",
        "ringcast:storm.9999",
    ]);
    assert_eq!(
        channels.lines().collect::<Vec<_>>(),
        vec!["ringcast:storm.0", "2", "ringcast:storm.9999", "2"],
        "one Redis subscription per node, however many clients"
    );
    let all = redis.cli(&["PUBSUB", "CHANNELS", "ringcast:storm.*"]);
    assert_eq!(all.lines().count(), 10_000);
    http_publish(a.addr, "storm.4321", r#""hit""#, "").await;
    for c in clients.iter_mut() {
        let m = messages(c, 1).await;
        assert_eq!(
            (m[0]["channel"].as_str(), m[0]["seq"].as_u64()),
            (Some("storm.4321"), Some(1))
        );
    }
    // The last subscriber of a node leaving ends that node's subscription.
    drop(clients.pop());
    let deadline = std::time::Instant::now() + common::PATIENCE;
    loop {
        let numsub = redis.cli(&["PUBSUB", "NUMSUB", "ringcast:storm.0"]);
        if numsub.lines().nth(1) == Some("1") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node B never unsubscribed: {numsub}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_deaf_pubsub_link_is_noticed_by_the_probe_and_healed() {
    let redis = RedisServer::start();
    let proxy = common::redis::DeafeningProxy::start(redis.port).await;
    let a = node(&redis, &[]).await;
    let url = proxy.url();
    let b = Relay::start(&[
        "--redis",
        &url,
        "--workers",
        "2",
        "--redis-probe-interval",
        "0.1",
    ]);
    b.wait_readyz(200).await;
    let mut on_b = Client::connect(&b, Fmt::Json).await;
    on_b.subscribe("quiet").await;
    let addr = a.addr;
    let first = publish_all(addr, "quiet".into(), 20, |_| {}).await;
    expect_exactly_once(&mut on_b, 20, &first).await;

    proxy.deafen_current_subscribers();
    // Published while B hears nothing; B must notice and catch up.
    let mut acked = first;
    acked.extend(publish_all(addr, "quiet".into(), 80, |_| {}).await);
    b.wait_metric("ringcast_redis_deaf_total", &[], |v| v >= 1.0)
        .await;
    b.wait_readyz(200).await;
    let last = *acked.keys().last().unwrap();
    assert_eq!(last, 100);
    let mut seen = Vec::new();
    while seen.last().copied() != Some(last) {
        let ev = on_b.next().await;
        if ev["type"] == "message" {
            seen.push(ev["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(
        seen,
        (21..=100).collect::<Vec<_>>(),
        "caught up in order, once"
    );
}

#[tokio::test]
async fn a_flushed_script_cache_is_reloaded_without_failing_a_publish() {
    let redis = RedisServer::start();
    let a = node(&redis, &[]).await;
    let mut c = Client::connect(&a, Fmt::Json).await;
    c.subscribe("s").await;
    http_publish(a.addr, "s", "1", "").await;
    assert_eq!(redis.cli(&["SCRIPT", "FLUSH"]), "OK");
    let (status, body) = http_publish(a.addr, "s", "2", "").await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(seqs(&messages(&mut c, 2).await), vec![1, 2]);
    assert!(a.metric("ringcast_redis_script_reloads_total", &[]).await >= 1.0);
}

#[tokio::test]
async fn on_a_cluster_channels_of_every_shard_keep_one_gap_free_seq_across_nodes() {
    let cluster = RedisCluster::start(3);
    let nodes = [
        cluster_node(&cluster, &["--max-publish-rate", "0"]).await,
        cluster_node(&cluster, &["--max-publish-rate", "0"]).await,
        cluster_node(&cluster, &["--max-publish-rate", "0"]).await,
    ];
    let channels = channels_on_every_master(&cluster, 2);
    let mut subscribers = Vec::new();
    for n in &nodes {
        let mut c = Client::connect(n, Fmt::Json).await;
        for (channel, _) in &channels {
            assert_eq!(c.subscribe(channel).await["seq"], 0);
        }
        subscribers.push(c);
    }
    // Sequenced traffic rides sharded pub/sub: each node holds one shard
    // subscription per channel, on the master that owns the channel's slot.
    for (channel, owner) in &channels {
        let reply =
            cluster.nodes[*owner].cli(&["PUBSUB", "SHARDNUMSUB", &format!("ringcast:{channel}")]);
        assert_eq!(reply.lines().last(), Some("3"), "{channel}: {reply}");
    }

    const PER_NODE: usize = 40;
    let mut publishers = Vec::new();
    for (p, n) in nodes.iter().enumerate() {
        let mut c = Client::connect(n, Fmt::Json).await;
        let channels = channels.clone();
        publishers.push(tokio::spawn(async move {
            let mut id = 0;
            let mut sent = BTreeMap::new();
            for i in 0..PER_NODE {
                let batch: Vec<Value> = channels
                    .iter()
                    .map(|(channel, _)| {
                        id += 1;
                        sent.insert(id, (channel.clone(), json!([p, i])));
                        json!({"action": "publish", "channel": channel, "data": [p, i], "id": id})
                    })
                    .collect();
                c.send(Value::Array(batch)).await;
            }
            let mut acked = BTreeMap::new();
            while acked.len() < sent.len() {
                let ev = c.next().await;
                assert_eq!(ev["type"], "published", "{ev}");
                let (channel, data) = sent[&ev["id"].as_u64().unwrap()].clone();
                acked.insert((channel, ev["seq"].as_u64().unwrap()), data);
            }
            acked
        }));
    }
    let mut data = BTreeMap::new();
    for task in publishers {
        for (key, value) in task.await.unwrap() {
            assert!(data.insert(key, value).is_none(), "a seq given twice");
        }
    }
    let total = 3 * PER_NODE as u64;
    for (channel, _) in &channels {
        let seqs: Vec<u64> = data
            .keys()
            .filter(|(c, _)| c == channel)
            .map(|(_, s)| *s)
            .collect();
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "{channel}: acks");
    }
    for mut s in subscribers {
        let mut by_channel: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for m in messages(&mut s, channels.len() * total as usize).await {
            let channel = m["channel"].as_str().unwrap().to_string();
            let seq = m["seq"].as_u64().unwrap();
            assert_eq!(m["data"], data[&(channel.clone(), seq)]);
            by_channel.entry(channel).or_default().push(seq);
        }
        for (channel, _) in &channels {
            assert_eq!(
                by_channel[channel],
                (1..=total).collect::<Vec<_>>(),
                "{channel}"
            );
        }
    }

    // Backends may PUBLISH on any master, or SPUBLISH on the owner.
    let (channel, owner) = &channels[0];
    let name = format!("ringcast:{channel}");
    let other = (owner + 1) % cluster.nodes.len();
    let mut on_a = Client::connect(&nodes[0], Fmt::MsgPack).await;
    on_a.subscribe(channel).await;
    cluster.nodes[other].cli(&["PUBLISH", &name, r#"{"raw":2}"#]);
    cluster.nodes[*owner].cli(&["SPUBLISH", &name, "more text"]);
    let mut got: Vec<Value> = messages(&mut on_a, 2)
        .await
        .into_iter()
        .map(|m| m["data"].clone())
        .collect();
    got.sort_by_key(|v| v.to_string());
    assert_eq!(got, vec![json!("more text"), json!({"raw": 2})]);
}

#[tokio::test]
async fn on_a_cluster_since_recovers_from_history_on_another_node() {
    let cluster = RedisCluster::start(3);
    let a = cluster_node(&cluster, &["--history-size", "20"]).await;
    let b = cluster_node(&cluster, &["--history-size", "20"]).await;
    let channels = channels_on_every_master(&cluster, 1);
    for (channel, _) in &channels {
        for i in 1..=8 {
            let (status, body) = http_publish(a.addr, channel, &i.to_string(), "").await;
            assert_eq!(status, 202, "{body}");
        }
    }
    // B never had these channels: the replay comes from Redis history.
    let mut back = Client::connect(&b, Fmt::Json).await;
    for (id, (channel, _)) in channels.iter().enumerate() {
        back.send(json!({"action": "subscribe", "channel": channel, "since": 3, "id": id}))
            .await;
        let replay = messages(&mut back, 5).await;
        assert_eq!(seqs(&replay), (4..=8).collect::<Vec<_>>(), "{channel}");
        assert_eq!(replay[0]["data"], 4);
        let ack = back.expect_type("subscribed").await;
        assert_eq!(
            (ack["seq"].as_u64(), ack["recovered"].as_bool()),
            (Some(8), Some(true))
        );
        let (status, body) = http_publish(a.addr, channel, "9", "").await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(seqs(&messages(&mut back, 1).await), vec![9], "then live");
    }
}

#[tokio::test]
async fn on_a_cluster_killed_pubsub_connections_resubscribe_and_catch_up() {
    let cluster = RedisCluster::start(3);
    let a = cluster_node(&cluster, &ROOM_FOR_EVERY_MESSAGE).await;
    let b = cluster_node(&cluster, &ROOM_FOR_EVERY_MESSAGE).await;
    let (channel, _) = channels_on_every_master(&cluster, 1).remove(1);
    let mut on_b = Client::connect(&b, Fmt::Json).await;
    on_b.subscribe(&channel).await;
    let (kill_tx, mut kill_rx) = tokio::sync::mpsc::unbounded_channel();
    let addr = a.addr;
    let publisher = tokio::spawn(publish_all(addr, channel, 300, move |i| {
        if i == 100 {
            let _ = kill_tx.send(());
        }
    }));
    kill_rx.recv().await.unwrap();
    let mut killed = 0;
    for node in &cluster.nodes {
        killed += node
            .cli(&["CLIENT", "KILL", "TYPE", "pubsub"])
            .parse::<u32>()
            .unwrap();
    }
    assert!(killed >= 2, "pub/sub links were cut ({killed})");
    let acked = publisher.await.unwrap();
    let last = *acked.keys().last().unwrap();
    assert_eq!(last, 300, "only pub/sub links were cut");
    expect_exactly_once(&mut on_b, last, &acked).await;
    assert!(b.metric("ringcast_redis_reconnects_total", &[]).await >= 2.0);
}

#[tokio::test]
async fn on_a_cluster_a_subscribe_storm_is_one_shard_subscription_per_node() {
    let cluster = RedisCluster::start(3);
    // The clients send every subscribe before reading a reply: room for
    // 10,000 acks, so the slow-consumer limit is not what this tests.
    let extra = [
        "--max-subscriptions",
        "10000",
        "--max-subscribe-rate",
        "0",
        "--max-batch-requests",
        "1000",
        "--max-pending-bytes",
        "8388608",
    ];
    let a = cluster_node(&cluster, &extra).await;
    let b = cluster_node(&cluster, &extra).await;
    let mut clients = Vec::new();
    for relay in [&a, &a, &b] {
        let mut c = Client::connect(relay, Fmt::MsgPack).await;
        for chunk in (0..10_000).collect::<Vec<_>>().chunks(1000) {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|i| json!({"action": "subscribe", "channel": format!("storm.{i}")}))
                .collect();
            c.send(Value::Array(batch)).await;
        }
        clients.push(c);
    }
    for c in clients.iter_mut() {
        for _ in 0..10_000 {
            c.expect_type("subscribed").await;
        }
    }
    let mut shard_channels = 0;
    for node in &cluster.nodes {
        shard_channels += node
            .cli(&["PUBSUB", "SHARDCHANNELS", "ringcast:storm.*"])
            .lines()
            .count();
    }
    assert_eq!(
        shard_channels, 10_000,
        "each channel once, on its own master"
    );
    let owner = cluster.owner_of("ringcast:storm.0");
    let numsub = || cluster.nodes[owner].cli(&["PUBSUB", "SHARDNUMSUB", "ringcast:storm.0"]);
    assert_eq!(numsub().lines().nth(1), Some("2"), "one per node");
    http_publish(a.addr, "storm.4321", r#""hit""#, "").await;
    for c in clients.iter_mut() {
        let m = messages(c, 1).await;
        assert_eq!(
            (m[0]["channel"].as_str(), m[0]["seq"].as_u64()),
            (Some("storm.4321"), Some(1))
        );
    }
    // The last subscriber of a node leaving ends that node's subscription.
    drop(clients.pop());
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while numsub().lines().nth(1) != Some("1") {
        assert!(
            std::time::Instant::now() < deadline,
            "node B never unsubscribed: {}",
            numsub()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn on_a_cluster_a_paused_master_is_noticed_and_healed() {
    let cluster = RedisCluster::start(3);
    let probe = ["--redis-probe-interval", "0.1", "--history-size", "1000"];
    let a = cluster_node(&cluster, &probe).await;
    let b = cluster_node(&cluster, &probe).await;
    let (channel, owner) = channels_on_every_master(&cluster, 1).remove(2);
    let mut on_b = Client::connect(&b, Fmt::Json).await;
    on_b.subscribe(&channel).await;
    let (pause_tx, mut pause_rx) = tokio::sync::mpsc::unbounded_channel();
    let publisher = tokio::spawn(publish_all(a.addr, channel, 200, move |i| {
        if i == 50 {
            let _ = pause_tx.send(());
        }
    }));
    pause_rx.recv().await.unwrap();
    // Ten times the 0.3 s of silence that marks a link deaf.
    cluster.nodes[owner].cli(&["CLIENT", "PAUSE", "3000", "ALL"]);
    let acked = publisher.await.unwrap();
    let last = *acked.keys().last().unwrap();
    expect_exactly_once(&mut on_b, last, &acked).await;
    assert!(b.metric("ringcast_redis_deaf_total", &[]).await >= 1.0);
    b.wait_readyz(200).await;
}

/// Behind Redis every subscribe and every publish waits for the backplane;
/// the replies to one array still come in request order. The two nodes
/// are started with nothing but --listen and --redis (each serves its
/// /metrics on its own port, so nothing collides).
#[tokio::test]
async fn array_requests_behind_redis_are_answered_in_order_on_two_nodes() {
    let redis = RedisServer::start();
    let url = redis.url();
    let ports: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let a = Relay::start(&["--listen", &ports[0], "--redis", &url]);
    let b = Relay::start(&["--listen", &ports[1], "--redis", &url]);
    for relay in [&a, &b] {
        relay.wait_readyz(200).await;
        assert!(relay.metrics_text().await.contains("ringcast_redis_ready"));
    }
    common::array_requests_are_answered_in_order(&a, 20, "redis node a").await;
    common::array_requests_are_answered_in_order(&b, 20, "redis node b").await;
}

/// Certificates for a Redis over TLS on 127.0.0.1: the CA that signs them
/// (`ca.pem`), Redis's own, and one for the relay to present.
struct RedisTlsFiles {
    _dir: tempfile::TempDir,
    ca: String,
    server: (String, String),
    client: (String, String),
    /// A CA that signed none of them.
    stranger: String,
}

fn redis_tls_files() -> RedisTlsFiles {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::TestCa::new(dir.path(), "ca");
    let server = ca.issue("redis", &["127.0.0.1", "localhost"]);
    let client = ca.issue("relay", &["relay.test"]);
    common::TestCa::new(dir.path(), "stranger");
    RedisTlsFiles {
        ca: dir.path().join("ca.pem").to_string_lossy().into_owned(),
        stranger: dir
            .path()
            .join("stranger.pem")
            .to_string_lossy()
            .into_owned(),
        _dir: dir,
        server,
        client,
    }
}

/// The local ports of Redis's clients other than the one asking.
fn redis_client_ports(redis: &RedisServer) -> Vec<u16> {
    redis
        .cli(&["CLIENT", "LIST"])
        .lines()
        .filter(|line| !line.contains("cmd=client|list"))
        .filter_map(|line| {
            let laddr = line.split(' ').find_map(|f| f.strip_prefix("laddr="))?;
            laddr.rsplit_once(':')?.1.parse().ok()
        })
        .collect()
}

#[tokio::test]
async fn over_rediss_two_nodes_share_one_seq_and_every_link_is_tls() {
    let files = redis_tls_files();
    let redis = RedisServer::start_tls(&files.server.0, &files.server.1, &files.ca, true);
    let url = redis.tls_url();
    let args = [
        "--redis",
        url.as_str(),
        "--redis-ca-file",
        files.ca.as_str(),
        "--redis-client-cert",
        files.client.0.as_str(),
        "--redis-client-key",
        files.client.1.as_str(),
        "--workers",
        "2",
    ];
    let a = Relay::start(&args);
    let b = Relay::start(&args);
    a.wait_readyz(200).await;
    b.wait_readyz(200).await;
    let mut on_b = Client::connect(&b, Fmt::Json).await;
    assert_eq!(on_b.subscribe("secure").await["seq"], 0);
    for (i, body) in ["1", "2"].iter().enumerate() {
        let (status, reply) = http_publish(a.addr, "secure", body, "").await;
        assert_eq!(status, 202, "{reply}");
        let reply: Value = serde_json::from_str(&reply).unwrap();
        assert_eq!(reply["seq"], i as u64 + 1);
    }
    let got = messages(&mut on_b, 2).await;
    assert_eq!(seqs(&got), vec![1, 2]);
    let ports = redis_client_ports(&redis);
    let tls_port = redis.tls_port.unwrap();
    assert!(ports.len() >= 4, "two clients per node: {ports:?}");
    assert!(
        ports.iter().all(|p| *p == tls_port),
        "every relay connection came in on the TLS port {tls_port}: {ports:?}"
    );
}

/// A one-worker node whose TLS link to Redis fails over a certificate:
/// waited until it logs why, and checked not ready.
async fn node_refused_over_tls(args: &[&str]) -> Relay {
    let mut args = args.to_vec();
    args.extend(["--workers", "1"]);
    let mut relay = Relay::start_logging(&args, "warn", std::process::Stdio::piped());
    let line = relay.wait_log("Redis pub/sub connection error");
    assert!(line.to_lowercase().contains("certificate"), "{line}");
    relay.wait_readyz(503).await;
    relay
}

#[tokio::test]
async fn over_rediss_an_unverified_server_or_a_missing_client_certificate_keeps_the_node_unready() {
    let files = redis_tls_files();
    let redis = RedisServer::start_tls(&files.server.0, &files.server.1, &files.ca, true);
    let url = redis.tls_url();
    // Redis's certificate is not signed by the CA this relay trusts.
    let untrusting = node_refused_over_tls(&[
        "--redis",
        &url,
        "--redis-ca-file",
        &files.stranger,
        "--redis-client-cert",
        &files.client.0,
        "--redis-client-key",
        &files.client.1,
    ])
    .await;
    // Trusted, but without the client certificate Redis asks for.
    let anonymous = node_refused_over_tls(&["--redis", &url, "--redis-ca-file", &files.ca]).await;
    // Neither got a connection through: Redis holds none on its TLS port.
    assert_eq!(redis_client_ports(&redis), Vec::<u16>::new());
    let (status, body) = http_publish(untrusting.addr, "x", "1", "").await;
    assert_eq!(status, 503, "{body}");
    let (status, body) = http_publish(anonymous.addr, "x", "1", "").await;
    assert_eq!(status, 503, "{body}");
}

#[test]
fn a_rediss_file_that_cannot_be_read_stops_the_start_with_its_name() {
    let files = redis_tls_files();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args([
            "--redis",
            "rediss://127.0.0.1:1/0",
            "--redis-ca-file",
            "/nonexistent/ca.pem",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--redis-ca-file /nonexistent/ca.pem"),
        "{stderr}"
    );
    // A client key that is not the client certificate's.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args([
            "--redis",
            "rediss://127.0.0.1:1/0",
            "--redis-ca-file",
            &files.ca,
            "--redis-client-cert",
            &files.client.0,
            "--redis-client-key",
            &files.server.1,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not match --redis-client-cert"),
        "{stderr}"
    );
}

/// A node on `redis` advertising itself at `ws://127.0.0.1:{port}/ws`
/// (listening there), announcing every 0.2 s.
async fn advertised_node(redis: &RedisServer, port: u16, extra: &[&str]) -> (Relay, String) {
    let listen = format!("127.0.0.1:{port}");
    let url = format!("ws://{listen}/ws");
    let mut args = vec![
        "--listen",
        listen.as_str(),
        "--advertise-url",
        url.as_str(),
        "--redis-probe-interval",
        "0.2",
    ];
    args.extend_from_slice(extra);
    (node(redis, &args).await, url)
}

/// `GET /nodes` on `relay`: each listed node's URL and connections.
async fn listed_nodes(relay: &Relay) -> Vec<(String, u64)> {
    let (status, body) = common::http(
        relay.addr,
        "GET /nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let load = n["load"].as_f64().unwrap();
            let (connections, max) = (
                n["connections"].as_u64().unwrap(),
                n["max_connections"].as_u64().unwrap(),
            );
            assert!((load - connections as f64 / max as f64).abs() < 1e-3, "{n}");
            (n["url"].as_str().unwrap().to_string(), connections)
        })
        .collect()
}

/// Waits until `relay` lists exactly the nodes `wanted` says (URL and, where
/// given, connections); returns what it listed.
async fn wait_listing(relay: &Relay, wanted: &[(&str, Option<u64>)]) -> Vec<(String, u64)> {
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        let listed = listed_nodes(relay).await;
        let matches = listed.len() == wanted.len()
            && listed
                .iter()
                .zip(wanted)
                .all(|((url, conns), (want_url, want_conns))| {
                    url == want_url && want_conns.is_none_or(|c| c == *conns)
                });
        if matches {
            return listed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} lists {listed:?}, expected {wanted:?}",
            relay.addr
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn three_nodes_list_each_other_and_a_draining_node_sends_its_clients_to_a_live_one() {
    let redis = RedisServer::start();
    let mut ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    ports.sort();
    let (a, url_a) = advertised_node(&redis, ports[0], &[]).await;
    let (mut b, url_b) = advertised_node(&redis, ports[1], &[]).await;
    let (mut c, url_c) = advertised_node(&redis, ports[2], &["--drain-seconds", "2"]).await;
    // A node that does not advertise itself still sees the others.
    let hidden = node(&redis, &["--redis-probe-interval", "0.2"]).await;

    let mut on_b = Vec::new();
    for _ in 0..2 {
        on_b.push(Client::connect(&b, Fmt::Json).await);
    }
    let mut on_c = Client::connect(&c, Fmt::Json).await;
    let everyone = [
        (url_a.as_str(), Some(0)),
        (url_b.as_str(), Some(2)),
        (url_c.as_str(), Some(1)),
    ];
    for relay in [&a, &b, &c, &hidden] {
        wait_listing(relay, &everyone).await;
    }

    // C drains: it leaves every listing at once and names A or B in its 1012.
    c.signal(libc::SIGTERM);
    for relay in [&a, &b, &hidden] {
        wait_listing(relay, &[(url_a.as_str(), None), (url_b.as_str(), None)]).await;
    }
    let (code, reason) = on_c.close_frame().await.expect("a close frame");
    assert_eq!(code, 1012);
    let named = reason
        .strip_prefix("reconnect to ")
        .unwrap_or_else(|| panic!("the reason names no node: {reason:?}"));
    assert!(named == url_a || named == url_b, "{reason}");
    drop(on_c);
    // The node it names takes the client.
    let mut moved = Client::connect_with(named, &[], Fmt::Json).await.unwrap();
    assert_eq!(moved.subscribe("moved").await["seq"], 0);
    assert!(c.wait_exit().success());

    // A node that dies without a word drops out when its entry expires.
    b.signal(libc::SIGKILL);
    b.wait_exit();
    wait_listing(&a, &[(url_a.as_str(), None)]).await;
    wait_listing(&hidden, &[(url_a.as_str(), None)]).await;
}

#[tokio::test]
async fn on_a_cluster_over_tls_two_nodes_share_each_channels_seq() {
    let files = redis_tls_files();
    let cluster = RedisCluster::start_tls(3, &files.server.0, &files.server.1, &files.ca);
    let seeds = cluster.tls_seeds();
    let args = [
        "--redis-cluster",
        seeds.as_str(),
        "--redis-ca-file",
        files.ca.as_str(),
        "--workers",
        "2",
    ];
    let a = Relay::start(&args);
    let b = Relay::start(&args);
    a.wait_readyz(200).await;
    b.wait_readyz(200).await;
    let channels = channels_on_every_master(&cluster, 1);
    let mut on_b = Client::connect(&b, Fmt::Json).await;
    // A node resyncs while it learns the cluster's TLS topology and says
    // `unavailable` meanwhile; clients retry, as the protocol tells them.
    for (channel, _) in &channels {
        let deadline = tokio::time::Instant::now() + common::PATIENCE;
        loop {
            on_b.send(json!({"action": "subscribe", "channel": channel, "id": channel}))
                .await;
            let ev = on_b.next().await;
            if ev["type"] == "subscribed" {
                assert_eq!(ev["seq"], 0);
                break;
            }
            assert_eq!(ev["code"], "unavailable", "{ev}");
            assert!(tokio::time::Instant::now() < deadline, "never subscribed");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    for (channel, _) in &channels {
        a.wait_readyz(200).await;
        let (status, reply) = http_publish(a.addr, channel, "1", "").await;
        assert_eq!(status, 202, "{reply}");
    }
    let got = messages(&mut on_b, channels.len()).await;
    let mut seen: Vec<(String, u64)> = got
        .iter()
        .map(|m| {
            (
                m["channel"].as_str().unwrap().to_string(),
                m["seq"].as_u64().unwrap(),
            )
        })
        .collect();
    seen.sort();
    let mut wanted: Vec<(String, u64)> = channels.iter().map(|(c, _)| (c.clone(), 1)).collect();
    wanted.sort();
    assert_eq!(seen, wanted, "one message on each master's channel");
    // Every relay connection to every master came in on its TLS port.
    for node in &cluster.nodes {
        let tls_port = node.tls_port.unwrap();
        let ports = redis_client_ports(node);
        assert!(!ports.is_empty(), "the relays reach every master");
        assert!(
            ports.iter().all(|p| *p == tls_port),
            "{ports:?} on {tls_port}"
        );
    }
}
