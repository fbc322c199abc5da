//! Attacks a hostile client can make with little effort, each bounded in
//! count and time, against a relay on one worker: the bound holds (RSS or
//! the connection's end, never a speed) and a canary subscriber on the
//! same shard keeps receiving, a new handshake completes, `/healthz`
//! answers.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{http, http_publish, raw_ws, Client, Fmt, Relay, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The canary and the others still get their service.
async fn others_are_unharmed(relay: &Relay, canary: &mut Client, n: u64) {
    let (status, body) = http_publish(relay.addr, "canary", &n.to_string(), "").await;
    assert_eq!(status, 202, "{body}");
    let ev = canary.expect_type("message").await;
    assert_eq!(ev["data"], n);
    let mut fresh = Client::connect(relay, Fmt::Json).await;
    fresh.subscribe("fresh").await;
    let (status, _) = http(
        relay.addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
}

/// Reads and drops whatever arrives until the relay ends the connection;
/// false when it is still open at the deadline.
async fn ended_within(
    s: &mut TcpStream,
    patience: Duration,
    mut tick: impl FnMut() -> Option<u8>,
) -> bool {
    let deadline = tokio::time::Instant::now() + patience;
    let mut buf = [0u8; 4096];
    while tokio::time::Instant::now() < deadline {
        if let Some(byte) = tick() {
            if s.write_all(&[byte]).await.is_err() {
                return true;
            }
        }
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    false
}

#[tokio::test]
async fn pings_from_a_client_that_never_reads_hold_one_pong_and_slow_it_down() {
    let relay = Relay::start(&["--workers", "1"]);
    let mut canary = Client::connect(&relay, Fmt::Json).await;
    canary.subscribe("canary").await;
    let mut attacker = raw_ws(&relay).await;
    let ping = common::frame(true, 0x9, &[7u8; 125], common::MASK);
    let burst: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 2000)
        .collect();
    let rss_before = relay.rss();
    let frames_before = relay.metric("ringcast_frames_in_total", &[]).await;
    let started = std::time::Instant::now();
    // 400,000 pings, 52 MB of pong if each were answered, never read: the
    // relay answers the latest and, past its allowance, stops reading, so
    // the writes block on a full TCP window.
    let flood = tokio::spawn(async move {
        for _ in 0..200 {
            if attacker.write_all(&burst).await.is_err() {
                break;
            }
        }
    });
    others_are_unharmed(&relay, &mut canary, 1).await;
    let growth = relay.rss().saturating_sub(rss_before);
    assert!(
        growth < 16 << 20,
        "relay memory grew by {growth} bytes for pings never read"
    );
    // What one read turn takes in past the allowance (4 reads of 64 KiB of
    // pings), once a second at most.
    let per_second = 64.0 + 4.0 * 65536.0 / 131.0;
    let read = relay.metric("ringcast_frames_in_total", &[]).await - frames_before;
    let allowed = per_second * (started.elapsed().as_secs_f64().ceil() + 1.0);
    assert!(
        read <= allowed,
        "the relay read {read} pings, more than {allowed} in the time taken"
    );
    flood.abort();
}

#[tokio::test]
async fn a_body_trickled_past_the_handshake_timeout_is_cut_off() {
    let relay = Relay::start(&["--workers", "1", "--handshake-timeout", "2"]);
    let mut canary = Client::connect(&relay, Fmt::Json).await;
    canary.subscribe("canary").await;
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(
        b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
    )
    .await
    .unwrap();
    // One byte every 300 ms would take 30 s: more than the test's patience.
    let mut sent = 0;
    let mut answer = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::time::Instant::now() < deadline && sent < 100 {
        if s.write_all(b"1").await.is_err() {
            break;
        }
        sent += 1;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if answer.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "after {sent} bytes: {answer:?}"
    );
    assert!(sent < 100, "the relay waited for the whole trickled body");
    others_are_unharmed(&relay, &mut canary, 1).await;
}

#[tokio::test]
async fn a_wrong_api_key_is_refused_before_the_body_is_read() {
    let relay = Relay::start(&["--workers", "1", "--publish-key", "k"]);
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    // A large body announced and never sent: the answer must not wait for it.
    s.write_all(
        b"POST /publish/t HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(PATIENCE, s.read(&mut buf))
        .await
        .expect("an answer without the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

#[tokio::test]
async fn a_frame_trickled_without_answering_pings_does_not_keep_a_connection_alive() {
    let relay = Relay::start(&[
        "--workers",
        "1",
        "--ping-interval",
        "1",
        "--pong-timeout",
        "1",
    ]);
    // The canary reads all along, so its client answers the relay's pings.
    let mut canary = Client::connect(&relay, Fmt::Json).await;
    canary.subscribe("canary").await;
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Some(ev) = canary.try_next().await {
            if events.send(ev).is_err() {
                break;
            }
        }
    });
    let mut attacker = raw_ws(&relay).await;
    // A masked text frame announcing 100 bytes, then its bytes one at a
    // time, far apart; the client never answers the relay's pings.
    attacker
        .write_all(&[0x81, 0x80 | 100, 1, 2, 3, 4])
        .await
        .unwrap();
    let mut left = 100u8;
    let ended = ended_within(&mut attacker, PATIENCE, || {
        left = left.saturating_sub(1);
        (left > 0).then_some(b'x')
    })
    .await;
    assert!(
        ended,
        "a trickling client that never answers pings was kept"
    );
    assert_eq!(http_publish(relay.addr, "canary", "1", "").await.0, 202);
    let ev = tokio::time::timeout(PATIENCE, received.recv())
        .await
        .expect("the canary receives")
        .expect("the canary is still connected");
    assert_eq!(ev["data"], 1, "{ev}");
    reader.abort();
}

#[tokio::test]
async fn a_trickling_client_on_the_metrics_address_holds_up_no_scrape() {
    let relay = Relay::start(&["--workers", "1", "--metrics-addr", "127.0.0.1:0"]);
    let metrics = relay.metrics;
    let trickler = tokio::spawn(async move {
        let mut s = TcpStream::connect(metrics).await.unwrap();
        // A request head that never ends, a byte a second.
        for b in b"GET /metrics HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain(std::iter::repeat(&b'x'))
        {
            if s.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        assert!(relay.metrics_text().await.contains("ringcast_build_info"));
    }
    trickler.abort();
    // Garbage gets a 400, another path a 404, and scrapes go on.
    assert_eq!(http(metrics, "\x01\x02 nonsense\r\n\r\n").await.0, 400);
    assert_eq!(
        http(metrics, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .0,
        404
    );
    assert!(relay.metrics_text().await.contains("ringcast_build_info"));
}

/// Opens `n` TCP connections that never send a byte.
async fn silent_sockets(relay: &Relay, n: usize) -> Vec<TcpStream> {
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        held.push(TcpStream::connect(relay.addr).await.unwrap());
    }
    held
}

/// What the relay answers on a new connection to `request`, up to the end
/// of the head.
async fn answer_to(relay: &Relay, request: &[u8]) -> String {
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(PATIENCE, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => answer.extend_from_slice(&buf[..n]),
            Ok(_) => break,
            Err(_) => panic!("no answer to {:?}", String::from_utf8_lossy(request)),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
const READYZ: &[u8] = b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn a_full_node_answers_new_clients_503_and_health_checks_as_usual() {
    // 256 files: the default --max-connections is 256 less a reserve of 64.
    let relay = Relay::start_with_file_limit(
        &["--workers", "1", "--handshake-timeout", "120"],
        256,
        Stdio::inherit(),
    );
    let mut canary = Client::connect(&relay, Fmt::Json).await;
    canary.subscribe("canary").await;
    let mut publisher = Client::connect(&relay, Fmt::Json).await;
    // Connections that never send their request count as much as upgraded ones.
    let mut held = silent_sockets(&relay, 190).await;
    let refused = answer_to(&relay, UPGRADE).await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("Retry-After: 5"), "{refused}");
    let health = answer_to(&relay, HEALTHZ).await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = answer_to(&relay, READYZ).await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    let garbage = answer_to(&relay, b"\x16\x03\x01 not http\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    for n in 0..3 {
        publisher
            .send(serde_json::json!({"action": "publish", "channel": "canary", "data": n}))
            .await;
        assert_eq!(canary.expect_type("message").await["data"], n);
    }
    assert!(
        relay
            .metric("ringcast_connections_refused_total", &[])
            .await
            >= 3.0
    );
    held.truncate(150);
    relay.wait_readyz(200).await;
    let mut fresh = Client::connect(&relay, Fmt::Json).await;
    fresh.subscribe("fresh").await;
}

#[tokio::test]
async fn out_of_file_descriptors_new_clients_hear_503_and_it_is_logged_on_io_uring() {
    out_of_file_descriptors_new_clients_hear_503_and_it_is_logged("uring").await;
}

#[tokio::test]
async fn out_of_file_descriptors_new_clients_hear_503_and_it_is_logged_on_epoll() {
    out_of_file_descriptors_new_clients_hear_503_and_it_is_logged("epoll").await;
}

async fn out_of_file_descriptors_new_clients_hear_503_and_it_is_logged(driver: &str) {
    // --max-connections above what 256 files allow: accept runs out of
    // descriptors, and the reserve descriptor answers.
    let mut relay = Relay::start_with_file_limit(
        &[
            "--workers",
            "1",
            "--driver",
            driver,
            "--handshake-timeout",
            "120",
            "--max-connections",
            "1000",
        ],
        256,
        Stdio::piped(),
    );
    let mut canary = Client::connect(&relay, Fmt::Json).await;
    canary.subscribe("canary").await;
    let mut publisher = Client::connect(&relay, Fmt::Json).await;
    let mut held = silent_sockets(&relay, 300).await;
    // The last of them was accepted with the reserve descriptor, told, and closed.
    let mut buf = [0u8; 1024];
    let last = held.last_mut().unwrap();
    let n = tokio::time::timeout(PATIENCE, last.read(&mut buf))
        .await
        .expect("an answer past the file limit")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("Retry-After: 5"), "{answer}");
    let line = relay.wait_log("accept failed");
    assert!(line.contains("errors="), "{line}");
    publisher
        .send(serde_json::json!({"action": "publish", "channel": "canary", "data": 1}))
        .await;
    assert_eq!(canary.expect_type("message").await["data"], 1);
    held.clear();
    relay.wait_readyz(200).await;
    others_are_unharmed(&relay, &mut canary, 2).await;
}

/// Publishes `count` bodies over one keep-alive connection, to channels
/// `{prefix}{i % channels}`; returns the last seq of each channel.
async fn publish_many(
    relay: &Relay,
    prefix: &str,
    channels: usize,
    count: usize,
    body: &str,
) -> Vec<u64> {
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    let mut seqs = vec![0; channels];
    let mut buf = Vec::new();
    for i in 0..count {
        let c = i % channels;
        let req = format!(
            "POST /publish/{prefix}{c} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let answer = loop {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
                .await
                .expect("an answer to a publish")
                .unwrap();
            assert!(n > 0, "the relay closed a keep-alive publisher");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some(end) = text.find('}') {
                buf.clear();
                break text[..=end].to_string();
            }
        };
        assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
        let json = &answer[answer.find('{').unwrap()..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        seqs[c] = v["seq"].as_u64().unwrap();
    }
    seqs
}

#[tokio::test]
async fn history_stays_within_its_node_budget_and_since_says_what_was_lost() {
    let budget: u64 = 8 << 20;
    let relay = Relay::start(&["--workers", "1", "--history-memory", &budget.to_string()]);
    let mut canary = Client::connect(&relay, Fmt::Json).await;
    canary.subscribe("canary").await;
    let rss_before = relay.rss();
    // 2,000 publications of 60 KB (both encodings: 240 MB) to 500 channels
    // nobody subscribes to: each channel's own bounds would keep it all.
    let body = format!("\"{}\"", "x".repeat(60_000));
    let last = publish_many(&relay, "h.", 500, 2000, &body).await;
    let held = relay.metric("ringcast_history_bytes", &[]).await;
    assert!(held <= budget as f64, "history holds {held} bytes");
    assert!(relay.metric("ringcast_history_evicted_total", &[]).await > 0.0);
    let growth = relay.rss().saturating_sub(rss_before);
    assert!(
        growth < 4 * budget,
        "relay memory grew by {growth} bytes for a history budget of {budget}"
    );
    others_are_unharmed(&relay, &mut canary, 1).await;
    // The oldest channel's history went first: `since` says it was lost.
    let mut late = Client::connect(&relay, Fmt::Json).await;
    late.send(serde_json::json!({"action": "subscribe", "channel": "h.0", "since": 1}))
        .await;
    let subscribed = late.expect_type("subscribed").await;
    assert_eq!(subscribed["recovered"], false, "{subscribed}");
    // The newest publication is still kept.
    let newest = 1999 % 500;
    let since = last[newest] - 1;
    late.send(serde_json::json!({"action": "subscribe", "channel": format!("h.{newest}"), "since": since}))
        .await;
    let replayed = late.expect_type("message").await;
    assert_eq!(replayed["seq"], last[newest]);
    let subscribed = late.expect_type("subscribed").await;
    assert_eq!(subscribed["recovered"], true, "{subscribed}");
}

/// The shard a connection opened now landed on: the one whose
/// `ringcast_connections` gauge grew past `before`.
async fn connection_counts(relay: &Relay) -> Vec<f64> {
    let mut counts = Vec::new();
    for shard in 0..relay.workers {
        let label = format!("shard=\"{shard}\"");
        counts.push(relay.metric("ringcast_connections", &[&label]).await);
    }
    counts
}

async fn shard_of_last(relay: &Relay, before: &[f64]) -> usize {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let now = connection_counts(relay).await;
        if let Some(s) = (0..now.len()).find(|&s| now[s] > before[s]) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no shard counted the connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Raw WebSocket connections on `shard`, `n` of them (others are closed).
async fn raw_ws_on_shard(relay: &Relay, shard: usize, n: usize) -> Vec<TcpStream> {
    let mut on_shard = Vec::new();
    while on_shard.len() < n {
        let before = connection_counts(relay).await;
        let s = raw_ws(relay).await;
        if shard_of_last(relay, &before).await == shard {
            on_shard.push(s);
        } else {
            drop(s);
            relay
                .wait_metric("ringcast_connections", &[], |v| {
                    v == before.iter().sum::<f64>()
                })
                .await;
        }
    }
    on_shard
}

#[tokio::test]
async fn subscribe_churn_is_rate_limited_and_costs_others_nothing() {
    let relay = Relay::start(&["--workers", "2", "--max-subscribe-rate", "500"]);
    let before = connection_counts(&relay).await;
    let mut canary = Client::connect(&relay, Fmt::Json).await;
    canary.subscribe("canary").await;
    let shard = shard_of_last(&relay, &before).await;
    let mut attackers = raw_ws_on_shard(&relay, shard, 3).await;
    let rss_before = relay.rss();
    // Each frame: 250 subscribes and 250 unsubscribes, to channels owned by
    // both shards; 60 frames per attacker, never reading a reply.
    let mut frames = Vec::new();
    for round in 0..60 {
        let mut batch = Vec::new();
        for i in 0..250 {
            let channel = format!("churn.{round}.{i}");
            batch.push(serde_json::json!({"action": "subscribe", "channel": channel}));
            batch.push(serde_json::json!({"action": "unsubscribe", "channel": channel}));
        }
        let text = serde_json::to_vec(&batch).unwrap();
        frames.push(common::frame(true, 0x1, &text, common::MASK));
    }
    for frame in &frames {
        for a in attackers.iter_mut() {
            // A connection the relay dropped for not reading ends its attack.
            let _ = a.write_all(frame).await;
        }
    }
    others_are_unharmed(&relay, &mut canary, 1).await;
    let limited = relay
        .metric("ringcast_errors_total", &["code=\"rate_limited\""])
        .await;
    assert!(limited > 0.0, "no subscribe was rate limited");
    let growth = relay.rss().saturating_sub(rss_before);
    assert!(
        growth < 64 << 20,
        "relay memory grew by {growth} bytes during the churn"
    );
    drop(attackers);
    relay
        .wait_metric("ringcast_connections", &[], |v| v == 1.0)
        .await;
    assert_eq!(relay.metric("ringcast_inbox_depth", &[]).await, 0.0);
    others_are_unharmed(&relay, &mut canary, 2).await;
}

#[tokio::test]
async fn subscriptions_are_capped_per_node() {
    let relay = Relay::start(&["--workers", "2", "--max-subscriptions-total", "50"]);
    let mut a = Client::connect(&relay, Fmt::Json).await;
    let mut b = Client::connect(&relay, Fmt::Json).await;
    for i in 0..30 {
        a.subscribe(&format!("a.{i}")).await;
    }
    for i in 0..20 {
        b.subscribe(&format!("b.{i}")).await;
    }
    b.send(serde_json::json!({"action": "subscribe", "channel": "b.full", "id": 1}))
        .await;
    let refused = b.expect_error("unavailable", 1).await;
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("most subscriptions (50)"),
        "{refused}"
    );
    // Unsubscribing, and leaving, give subscriptions back.
    a.send(serde_json::json!({"action": "unsubscribe", "channel": "a.0", "id": 2}))
        .await;
    a.expect_type("unsubscribed").await;
    b.subscribe("b.again").await;
    drop(a);
    relay
        .wait_metric("ringcast_connections", &[], |v| v == 1.0)
        .await;
    for i in 0..29 {
        b.subscribe(&format!("b.more.{i}")).await;
    }
    b.send(serde_json::json!({"action": "subscribe", "channel": "b.over", "id": 3}))
        .await;
    b.expect_error("unavailable", 3).await;
}
