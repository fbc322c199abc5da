//! Attacks a hostile client can make with little effort, each bounded in
//! count and time, against a relay on one worker: the bound holds (RSS or
//! the connection's end, never a speed) and a canary subscriber on the
//! same shard keeps receiving, a new handshake completes, `/healthz`
//! answers.

mod common;

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
async fn pings_from_a_client_that_never_reads_hold_one_pong() {
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
    // 400,000 pings, 52 MB of pong if each were answered, never read.
    for _ in 0..200 {
        if attacker.write_all(&burst).await.is_err() {
            break;
        }
    }
    others_are_unharmed(&relay, &mut canary, 1).await;
    let growth = relay.rss().saturating_sub(rss_before);
    assert!(
        growth < 16 << 20,
        "relay memory grew by {growth} bytes for pings never read"
    );
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
