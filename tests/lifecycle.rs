//! The relay's life as operators see it: health and readiness, draining on
//! SIGTERM, the connection cap, heartbeats, slow consumers, and memory that
//! stays bounded whatever clients do.

mod common;

use common::{http, http_publish, raw_ws, Client, Fmt, Relay};
use serde_json::json;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn health_and_demo_page() {
    let relay = Relay::start(&["--workers", "1"]);
    assert_eq!(
        http(
            relay.addr,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .await,
        (200, "ok\n".into())
    );
    assert_eq!(
        http(
            relay.addr,
            "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .await
        .0,
        200
    );
    let (status, body) = http(
        relay.addr,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("ringcast.v1.json"));
}

#[tokio::test]
async fn sigterm_drains_with_1012_while_readyz_says_503_then_exits_0() {
    let mut relay = Relay::start(&["--workers", "2", "--drain-seconds", "6"]);
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut c = Client::connect(&relay, Fmt::Json).await;
        c.subscribe("d").await;
        clients.push(c);
    }
    relay.signal(libc::SIGTERM);
    // The signal is handled on the relay's own thread; readiness flips as
    // soon as it is. The relay cannot exit before its clients are closed
    // (the first at 6/5 s), so it is still there to answer.
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        let (status, body) = http(
            relay.addr,
            "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        if status == 503 {
            assert_eq!(body, "draining\n");
            break;
        }
        assert_eq!(status, 200);
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never went 503"
        );
    }
    let (status, _) = http(relay.addr, "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await;
    assert_eq!(status, 503, "no new WebSocket clients while draining");
    for mut c in clients {
        assert_eq!(c.close_code().await, Some(1012));
        // Dropping the client ends its side of TCP, so the relay need not
        // wait out the close deadline.
    }
    let status = relay.wait_exit();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn past_max_connections_handshakes_get_503_with_retry_after() {
    let relay = Relay::start(&["--workers", "2", "--max-connections", "3"]);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Client::connect(&relay, Fmt::Json).await);
    }
    let req = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let (status, head, _) = common::http_full(relay.addr, req.as_bytes()).await;
    assert_eq!(status, 503);
    assert!(head.contains("Retry-After: "), "{head}");
    drop(held.pop());
    Client::connect_when_admitted(&relay, Fmt::Json).await;
}

#[tokio::test]
async fn silent_clients_are_pinged_then_dropped() {
    let relay = Relay::start(&[
        "--workers",
        "1",
        "--ping-interval",
        "1",
        "--pong-timeout",
        "1",
    ]);
    let mut silent = raw_ws(&relay).await;
    // The raw client never answers the ping: the relay must hang up.
    let mut buf = vec![0u8; 1024];
    let mut got_ping = false;
    loop {
        let n = tokio::time::timeout(common::PATIENCE, silent.read(&mut buf))
            .await
            .expect("never dropped")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got_ping |= buf[0] == 0x89;
    }
    assert!(got_ping, "a ping came before the drop");
    relay
        .wait_metric("ringcast_heartbeat_timeouts_total", &[], |v| v >= 1.0)
        .await;
    // A client that answers pings (tungstenite does) stays.
    let mut alive = Client::connect(&relay, Fmt::Json).await;
    alive.subscribe("hb").await;
    // tungstenite answers pings while it is being read, so keep reading
    // through several ping intervals; every ping must be answered.
    let mut pings = 0;
    let until = tokio::time::Instant::now() + std::time::Duration::from_secs(4);
    while let Ok(Some(msg)) =
        tokio::time::timeout_at(until, futures_util::StreamExt::next(&mut alive.ws)).await
    {
        if matches!(msg, Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) {
            pings += 1;
        }
    }
    assert!(pings >= 1, "the idle client was pinged");
    http_publish(relay.addr, "hb", "1", "").await;
    assert_eq!(
        alive.expect_type("message").await["data"],
        1,
        "and it is still connected"
    );
}

/// A subscriber that never reads, and a publisher flooding its channel
/// (past every per-connection inbound limit, which are lifted for it),
/// over 20 keys.
async fn flood_a_client_that_never_reads(policy: &str) -> (Relay, Client) {
    let relay = Relay::start(&[
        "--workers",
        "1",
        "--slow-consumer",
        policy,
        "--max-pending-bytes",
        "262144",
        "--max-publish-rate",
        "0",
        "--max-bytes-per-second",
        "0",
        "--max-frames-per-second",
        "0",
    ]);
    let mut stuck = Client::connect(&relay, Fmt::Json).await;
    stuck.subscribe("flood").await;
    let mut healthy = Client::connect(&relay, Fmt::Json).await;
    healthy.subscribe("flood").await;
    let rss_before = relay.rss();
    let mut publisher = Client::connect(&relay, Fmt::Json).await;
    let payload = "x".repeat(1000);
    // 40 MB towards a client that reads nothing: far past every buffer.
    for round in 0..1000 {
        let batch: Vec<_> = (0..40).map(|i| json!({"action": "publish", "channel": "flood", "key": format!("k{}", i % 20), "data": [round * 40 + i, payload]})).collect();
        publisher.send(serde_json::Value::Array(batch)).await;
        // The healthy client keeps up and gets everything in order.
        for i in 0..40 {
            let ev = healthy.expect_type("message").await;
            assert_eq!(ev["data"][0], round * 40 + i);
        }
    }
    let growth = relay.rss().saturating_sub(rss_before);
    assert!(
        growth < 16 << 20,
        "relay memory grew by {growth} bytes for a client that never reads"
    );
    (relay, stuck)
}

#[tokio::test]
async fn a_client_that_never_reads_is_disconnected_with_4008_and_memory_stays_bounded() {
    let (relay, mut stuck) = flood_a_client_that_never_reads("disconnect").await;
    relay
        .wait_metric(
            "ringcast_slow_consumer_total",
            &["action=\"disconnect\""],
            |v| v == 1.0,
        )
        .await;
    // When it finally reads: what was already in the socket, then 4008.
    assert_eq!(stuck.close_code().await, Some(4008));
}

#[tokio::test]
async fn conflate_keeps_a_client_that_never_reads_with_the_latest_of_every_key() {
    let (relay, mut stuck) = flood_a_client_that_never_reads("conflate").await;
    assert!(
        relay
            .metric("ringcast_slow_consumer_total", &["action=\"conflate\""])
            .await
            > 0.0
    );
    assert_eq!(
        relay
            .metric("ringcast_slow_consumer_total", &["action=\"disconnect\""])
            .await,
        0.0,
        "20 keys fit: merged, not disconnected"
    );
    let mut last = 0;
    let mut gap = false;
    let mut tail = Vec::new();
    while last < 40_000 {
        let ev = stuck.expect_type("message").await;
        let seq = ev["seq"].as_u64().unwrap();
        assert!(seq > last, "order kept");
        gap |= seq > last + 1;
        last = seq;
        assert_eq!(ev["key"], format!("k{}", (seq - 1) % 20), "{ev}");
        tail.push(seq);
    }
    assert!(gap, "messages were merged away, so the seq skips");
    assert!(
        tail.ends_with(&(39_981..=40_000).collect::<Vec<_>>()),
        "the latest of every key arrives"
    );
}

#[tokio::test]
async fn drop_oldest_keeps_a_slow_client_with_a_detectable_seq_gap() {
    let (relay, mut stuck) = flood_a_client_that_never_reads("drop-oldest").await;
    assert!(
        relay
            .metric("ringcast_slow_consumer_total", &["action=\"drop_oldest\""])
            .await
            > 0.0
    );
    let mut last = 0;
    let mut gap = false;
    while last < 40_000 {
        let ev = stuck.expect_type("message").await;
        let seq = ev["seq"].as_u64().unwrap();
        assert!(seq > last, "order kept");
        gap |= seq > last + 1;
        last = seq;
    }
    assert!(gap, "messages were dropped, so the seq shows a gap");
}

#[tokio::test]
async fn requests_whose_replies_are_never_read_cannot_grow_memory() {
    use tokio::io::AsyncWriteExt;
    let relay = Relay::start(&[
        "--workers",
        "1",
        "--max-pending-bytes",
        "65536",
        "--max-message-bytes",
        "16384",
    ]);
    let mut s = raw_ws(&relay).await;
    let batch: Vec<_> = (0..100)
        .map(|i| json!({"action": "unsubscribe", "channel": format!("c{i}"), "id": i}))
        .collect();
    let frame = common::frame(
        true,
        0x1,
        serde_json::Value::Array(batch).to_string().as_bytes(),
        common::MASK,
    );
    let rss_before = relay.rss();
    // Up to 40 MB of replies requested; the relay must cut this client off.
    for _ in 0..10_000 {
        if s.write_all(&frame).await.is_err() {
            break;
        }
        if relay
            .metric("ringcast_slow_consumer_total", &["action=\"disconnect\""])
            .await
            >= 1.0
        {
            break;
        }
    }
    relay
        .wait_metric(
            "ringcast_slow_consumer_total",
            &["action=\"disconnect\""],
            |v| v >= 1.0,
        )
        .await;
    let growth = relay.rss().saturating_sub(rss_before);
    assert!(growth < 16 << 20, "relay memory grew by {growth} bytes");
}

#[test]
fn invalid_configuration_stops_start_up_with_one_clear_line() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&["--max-message-bytes", "10", "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(2));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("ringcast: invalid configuration: --max-message-bytes"),
        "{err}"
    );
    let (code, err) = run(&["--slow-consumer", "maybe"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("invalid value 'maybe'"), "{err}");
    let (code, err) = run(&["--history-size", "-1"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("invalid value '-1' for '--history-size"),
        "{err}"
    );
    // Values from the environment are named by their variable.
    let run_env = |var: &str, value: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
            .args(["--listen", "127.0.0.1:0"])
            .env(var, value)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run_env("RINGCAST_WORKERS", "abc");
    assert_eq!(code, Some(2));
    assert!(
        err.contains("invalid value 'abc' for RINGCAST_WORKERS"),
        "{err}"
    );
    let (code, err) = run_env("RINGCAST_REDIS", "");
    assert_eq!(code, Some(2));
    assert!(err.contains("RINGCAST_REDIS ``: the URL is empty"), "{err}");
    let (code, err) = run_env("RUST_LOG", "ringcast=loud");
    assert_eq!(code, Some(2), "RUST_LOG is read when --log is not given");
    assert!(
        err.contains("RUST_LOG `ringcast=loud` is not a valid log filter"),
        "{err}"
    );
    let (code, err) = run(&["--log", "=="]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--log `==` is not a valid log filter"),
        "{err}"
    );
    // A port held by another (non-SO_REUSEPORT) socket: a clear bind error.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = held.local_addr().unwrap().to_string();
    let (code, err) = run(&["--listen", &addr, "--metrics-addr", "127.0.0.1:0"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains(&format!("address {addr} is in use by another process")),
        "{err}"
    );
    let (code, err) = run(&["--listen", &addr, "--reuse-port-shared"]);
    assert_eq!(code, Some(1), "a plain socket cannot be shared: {err}");
    assert!(err.contains("binding SO_REUSEPORT listener 0"), "{err}");
}

/// A relay whose log reader went away (stderr a closed pipe, as when a log
/// shipper dies) still drains and exits on SIGTERM: log lines that cannot
/// be written are dropped instead of becoming panics that kill the thread
/// handling the signal.
#[test]
fn sigterm_still_drains_when_stderr_is_a_closed_pipe() {
    let mut relay = Relay::start_logging(
        &["--workers", "1", "--drain-seconds", "1"],
        "info",
        std::process::Stdio::piped(),
    );
    relay.close_stderr();
    relay.signal(libc::SIGTERM);
    let status = relay.wait_exit();
    assert!(status.success(), "{status:?}");
}

/// Two relays started with nothing but different --listen addresses run
/// side by side, each with /metrics on its own port (no second port to
/// collide on), answered to this loopback client.
#[tokio::test]
async fn two_relays_on_one_box_need_only_different_listen_addresses() {
    let ports: Vec<String> = (0..2)
        .map(|_| {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap().to_string()
        })
        .collect();
    let a = Relay::start(&["--listen", &ports[0]]);
    let b = Relay::start(&["--listen", &ports[1]]);
    for relay in [&a, &b] {
        assert_eq!(relay.metrics, relay.addr, "/metrics is on the main port");
        let text = relay.metrics_text().await;
        assert!(text.contains("ringcast_connections"), "{text:.300}");
    }
    // With --metrics-addr, /metrics moves there and leaves the main port.
    let c = Relay::start(&["--metrics-addr", "127.0.0.1:0"]);
    assert_ne!(c.metrics, c.addr);
    // The workers register their metrics as they start.
    let deadline = std::time::Instant::now() + common::PATIENCE;
    while !c.metrics_text().await.contains("ringcast_connections") {
        assert!(std::time::Instant::now() < deadline, "no worker metrics");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let (status, _) = http(
        c.addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 404);
}

/// A second relay on an address in use is refused; with
/// --reuse-port-shared it joins, and SIGTERM to the first hands every new
/// connection to the second while the first drains: no request fails and
/// no handshake reaches the draining one (it would answer 503).
#[tokio::test]
async fn a_hot_upgrade_on_a_shared_port_refuses_no_connection() {
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let listen = port.to_string();
    let mut old = Relay::start_logging(
        &[
            "--listen",
            &listen,
            "--workers",
            "1",
            "--drain-seconds",
            "2",
            "--pong-timeout",
            "2",
        ],
        "info",
        std::process::Stdio::piped(),
    );
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_ringcast"))
        .args(["--listen", &listen])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("is in use by another process"), "{err}");

    // A client of the old relay that will not answer its close at once,
    // so the old relay is still draining while the handshakes below run.
    let mut old_client = Client::connect(&old, Fmt::Json).await;
    old_client.subscribe("before").await;
    let new = Relay::start(&["--listen", &listen, "--workers", "2", "--reuse-port-shared"]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let requests = {
        let (stop, done) = (stop.clone(), done.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let answer = async {
                    let mut s = tokio::net::TcpStream::connect(port).await?;
                    tokio::io::AsyncWriteExt::write_all(
                        &mut s,
                        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    )
                    .await?;
                    let mut out = Vec::new();
                    s.read_to_end(&mut out).await?;
                    std::io::Result::Ok(out)
                }
                .await;
                match answer {
                    Ok(out) if out.starts_with(b"HTTP/1.1 200") => {}
                    other => failures.push(format!("{other:?}")),
                }
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            failures
        })
    };
    let wait_for = |n: usize| {
        let done = done.clone();
        async move {
            while done.load(std::sync::atomic::Ordering::Relaxed) < n {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
    };
    wait_for(50).await;
    old.signal(libc::SIGTERM);
    let line = old.wait_log("new connections go to the other processes");
    assert!(
        !line.contains('\x1b'),
        "no colour codes in a log that is not a terminal: {line:?}"
    );
    // Every handshake now reaches the new relay: the draining one would
    // answer 503, which fails the client's handshake.
    for _ in 0..40 {
        let mut c = Client::connect(&new, Fmt::Json).await;
        c.subscribe("upgrade").await;
    }
    assert_eq!(old_client.close_code().await, Some(1012));
    let seen = done.load(std::sync::atomic::Ordering::Relaxed);
    assert!(old.wait_exit().success());
    wait_for(seen + 50).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failures = requests.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// /metrics follows Prometheus conventions: a HELP line for every metric,
/// counters there at 0 before their first event, histograms (never
/// summaries) for latencies, build info, HTTP requests by route and status.
#[tokio::test]
async fn metrics_follow_prometheus_conventions() {
    let relay = Relay::start(&["--workers", "1"]);
    let mut c = Client::connect(&relay, Fmt::Json).await;
    c.subscribe("m").await;
    assert_eq!(http_publish(relay.addr, "m", "1", "").await.0, 202);
    c.expect_type("message").await;
    let (status, _) = http(
        relay.addr,
        "GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 404);
    let text = relay
        .wait_metric("ringcast_publish_to_write_seconds_count", &[], |v| v >= 1.0)
        .await;
    assert!(text >= 1.0);
    let text = relay.metrics_text().await;
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut words = line.split_whitespace().skip(2);
        let (name, kind) = (words.next().unwrap(), words.next().unwrap());
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP line"
        );
        assert_ne!(kind, "summary", "{name} is a summary");
    }
    for zero in [
        "ringcast_heartbeat_timeouts_total{shard=\"0\"} 0",
        "ringcast_slow_consumer_total{shard=\"0\",action=\"disconnect\"} 0",
        "ringcast_errors_total{shard=\"0\",code=\"rate_limited\"} 0",
    ] {
        assert!(text.contains(zero), "missing {zero}");
    }
    assert!(text.contains("# TYPE ringcast_publish_to_write_seconds histogram"));
    assert!(text.contains("ringcast_publish_to_write_seconds_bucket{"));
    let version = env!("CARGO_PKG_VERSION");
    assert!(text.contains(&format!("ringcast_build_info{{version=\"{version}\"}} 1")));
    for counted in [
        "route=\"/ws\",status=\"101\"",
        "route=\"/publish\",status=\"202\"",
        "route=\"other\",status=\"404\"",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("ringcast_http_requests_total{") && l.contains(counted)),
            "no HTTP request counted with {counted}"
        );
    }
}
