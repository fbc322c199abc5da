//! Bad input of every kind gets its clear answer — an HTTP status, an
//! `error` event with the right code, or the RFC 6455 close status — and
//! costs the other connections on the same worker nothing.

mod common;

use common::{frame, http_full, http_publish, raw_close_code, raw_ws, Client, Fmt, Relay, MASK};

use futures_util::SinkExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn garbage_instead_of_a_handshake_gets_400() {
    let relay = Relay::start(&["--workers", "1"]);
    let (status, _, _) = http_full(
        relay.addr,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "a TLS hello is not HTTP");
    let (status, _, body) = http_full(relay.addr, b"HELLO?? / what\r\n\r\n").await;
    assert_eq!(status, 400, "unparsable request line: {body}");
    assert!(body.contains("malformed HTTP request"), "{body}");
    let (status, _, _) = http_full(relay.addr, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn handshake_errors_are_answered_before_the_upgrade() {
    let relay = Relay::start(&["--workers", "1"]);
    let base = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
    let cases = [
        (format!("{base}Sec-WebSocket-Key: not-16-bytes\r\n\r\n"), 400),
        (format!("{base}\r\n"), 400),
        (format!("{base}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: chat, mqtt\r\n\r\n"), 400),
        ("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_string(), 426),
        ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n".to_string(), 426),
        ("POST /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n".to_string(), 405),
    ];
    for (req, want) in cases {
        let (status, _, _) = http_full(relay.addr, req.as_bytes()).await;
        assert_eq!(status, want, "{req}");
    }
    assert!(
        relay
            .metric("ringcast_handshakes_total", &["result=\"rejected\""])
            .await
            >= 5.0
    );
}

async fn expect_close(relay: &Relay, bytes: Vec<u8>, code: u16) {
    let mut s = raw_ws(relay).await;
    s.write_all(&bytes).await.unwrap();
    assert_eq!(
        raw_close_code(&mut s).await,
        Some(code),
        "for {:02x?}",
        &bytes[..bytes.len().min(16)]
    );
}

#[tokio::test]
async fn websocket_violations_close_with_rfc_status_codes() {
    let relay = Relay::start(&["--workers", "1", "--max-message-bytes", "1024"]);
    // Oversize: refused from the header, before the payload arrives.
    expect_close(&relay, frame(true, 0x1, &[b'x'; 5000], MASK), 1009).await;
    // Oversize across fragments.
    let mut f = frame(false, 0x1, &[b'x'; 700], MASK);
    f.extend(frame(true, 0x0, &[b'x'; 700], MASK));
    expect_close(&relay, f, 1009).await;
    expect_close(&relay, frame(true, 0x1, &[0xc3, 0x28], MASK), 1007).await;
    expect_close(&relay, frame(true, 0x1, b"{}", None), 1002).await;
    expect_close(&relay, frame(true, 0x3, b"", MASK), 1002).await;
    expect_close(&relay, frame(true, 0x0, b"x", MASK), 1002).await;
    expect_close(&relay, frame(false, 0x9, b"", MASK), 1002).await;
    let mut rsv = frame(true, 0x1, b"{}", MASK);
    rsv[0] |= 0x40;
    expect_close(&relay, rsv, 1002).await;
    // A client close is echoed with its code.
    expect_close(&relay, frame(true, 0x8, &1000u16.to_be_bytes(), MASK), 1000).await;
    assert!(relay.metric("ringcast_ws_protocol_closes_total", &[]).await >= 8.0);
}

#[tokio::test]
async fn request_errors_carry_codes_and_ids_and_keep_the_connection() {
    let relay = Relay::start(&["--workers", "1", "--max-subscriptions", "3"]);
    let mut c = Client::connect(&relay, Fmt::Json).await;
    c.ws.send(Message::text("{not json")).await.unwrap();
    let e = c.expect_type("error").await;
    assert_eq!(e["code"], "bad_request");
    assert!(e["message"].as_str().unwrap().contains("invalid JSON"));
    let cases = [
        (
            json!({"action": "teleport", "channel": "a", "id": 1}),
            "unknown_action",
        ),
        (json!({"channel": "a", "id": 2}), "bad_request"),
        (json!({"action": "subscribe", "id": 3}), "bad_request"),
        (
            json!({"action": "subscribe", "channel": "has space", "id": 4}),
            "bad_channel",
        ),
        (
            json!({"action": "subscribe", "channel": "$sys", "id": 5}),
            "bad_channel",
        ),
        (
            json!({"action": "subscribe", "channel": "x".repeat(256), "id": 6}),
            "bad_channel",
        ),
        (
            json!({"action": "publish", "channel": "a", "id": 7}),
            "bad_request",
        ),
        (
            json!({"action": "subscribe", "channel": "a", "since": -1, "id": 8}),
            "bad_request",
        ),
        (json!(42), "bad_request"),
        (
            json!({"action": "subscribe", "channel": "a", "conflate_ms": 0, "id": 11}),
            "bad_request",
        ),
        (
            json!({"action": "subscribe", "channel": "a", "conflate_ms": 60_001, "id": 12}),
            "bad_request",
        ),
        (
            json!({"action": "subscribe", "channel": "a", "snapshot": "yes", "id": 13}),
            "bad_request",
        ),
        (
            json!({"action": "publish", "channel": "a", "data": 1, "key": "", "id": 14}),
            "bad_request",
        ),
    ];
    for (req, code) in &cases {
        c.send(req.clone()).await;
        let e = c.expect_type("error").await;
        assert_eq!(e["code"], *code, "{req}");
        if let Some(id) = req.get("id") {
            assert_eq!(&e["id"], id, "the error names the request");
        }
    }
    c.subscribe("s1").await;
    // Subscribing again replaces the options: still one subscription.
    c.send(json!({"action": "subscribe", "channel": "s1", "id": 10, "conflate_ms": 50}))
        .await;
    assert_eq!(c.expect_type("subscribed").await["id"], 10, "new options");
    for ch in ["s2", "s3"] {
        c.subscribe(ch).await;
    }
    c.send(json!({"action": "subscribe", "channel": "s4", "id": 9}))
        .await;
    c.expect_error("too_large", 9).await;
    // Still open and working.
    http_publish(relay.addr, "s2", "\"alive\"", "").await;
    assert_eq!(c.expect_type("message").await["data"], "alive");
    assert!(
        relay
            .metric("ringcast_errors_total", &["code=\"bad_channel\""])
            .await
            >= 3.0
    );
}

#[tokio::test]
async fn malformed_msgpack_gets_bad_request() {
    let relay = Relay::start(&["--workers", "1"]);
    let mut c = Client::connect(&relay, Fmt::MsgPack).await;
    for bytes in [
        vec![0xc1],
        vec![0x82, 0xa1],
        vec![0x91; 10_000],
        vec![0xc0, 0xc0],
    ] {
        c.ws.send(Message::binary(bytes)).await.unwrap();
        assert_eq!(c.expect_type("error").await["code"], "bad_request");
    }
    c.send(json!({"action": "dance", "channel": "a", "id": 3}))
        .await;
    c.expect_error("unknown_action", 3).await;
}

#[tokio::test]
async fn ten_thousand_subscribes_in_one_frame_are_refused_whole() {
    // Under the default 64 KiB limit the frame itself is too big: 1009.
    let relay = Relay::start(&["--workers", "1"]);
    let batch: Vec<_> = (0..10_000)
        .map(|i| json!({"action": "subscribe", "channel": format!("c{i}")}))
        .collect();
    let mut c = Client::connect(&relay, Fmt::Json).await;
    c.send(serde_json::Value::Array(batch.clone())).await;
    assert_eq!(c.close_code().await, Some(1009));
    // With a larger message limit, the batch limit answers with one error.
    let relay = Relay::start(&["--workers", "1", "--max-message-bytes", "1048576"]);
    let mut c = Client::connect(&relay, Fmt::MsgPack).await;
    c.send(serde_json::Value::Array(batch)).await;
    let e = c.expect_type("error").await;
    assert_eq!(e["code"], "too_large");
    c.subscribe("after").await;
    // None of the refused subscriptions took effect: on one worker, c5's
    // message would arrive before after's.
    http_publish(relay.addr, "c5", "5", "").await;
    http_publish(relay.addr, "after", "6", "").await;
    assert_eq!(c.expect_type("message").await["channel"], "after");
}

#[tokio::test]
async fn client_publish_can_be_forbidden() {
    let relay = Relay::start(&["--workers", "1", "--allow-client-publish", "false"]);
    let mut c = Client::connect(&relay, Fmt::Json).await;
    c.send(json!({"action": "publish", "channel": "a", "data": 1, "id": 1}))
        .await;
    c.expect_error("forbidden", 1).await;
}

#[tokio::test]
async fn http_publish_errors() {
    let relay = Relay::start(&[
        "--workers",
        "1",
        "--publish-key",
        "s3cret",
        "--max-message-bytes",
        "1024",
    ]);
    let auth = "Authorization: Bearer s3cret\r\n";
    assert_eq!(http_publish(relay.addr, "a", "1", "").await.0, 401);
    assert_eq!(
        http_publish(relay.addr, "a", "1", "Authorization: Bearer nope\r\n")
            .await
            .0,
        401
    );
    assert_eq!(http_publish(relay.addr, "a", "1", auth).await.0, 202);
    let (status, body) = http_publish(relay.addr, "a", "{bad", auth).await;
    assert_eq!(status, 400);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"]["code"],
        "bad_request"
    );
    assert_eq!(http_publish(relay.addr, "%24sys", "1", auth).await.0, 400);
    assert_eq!(
        http_publish(relay.addr, "a", &"1".repeat(2000), auth)
            .await
            .0,
        413
    );
    let req = format!("POST /publish/a HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: text/plain\r\nContent-Length: 1\r\n\r\n1");
    assert_eq!(http_full(relay.addr, req.as_bytes()).await.0, 415);
    let req = format!("POST /publish/a HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n\r\n1\r\n1\r\n0\r\n\r\n");
    assert_eq!(http_full(relay.addr, req.as_bytes()).await.0, 411);
    // MessagePack body, and the seq it got.
    let body = rmp_serde::to_vec(&vec![1, 2]).unwrap();
    let mut req = format!(
        "POST /publish/a HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/msgpack\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend(body);
    let (status, _, body) = http_full(relay.addr, &req).await;
    assert_eq!(status, 202);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap(),
        json!({"channel": "a", "seq": 2})
    );
}

#[tokio::test]
async fn bad_clients_cost_the_others_on_the_same_worker_nothing() {
    let relay = Relay::start(&["--workers", "1", "--max-message-bytes", "4096"]);
    let mut watcher = Client::connect(&relay, Fmt::Json).await;
    watcher.subscribe("calm").await;
    let mut publisher = Client::connect(&relay, Fmt::MsgPack).await;
    for round in 0..20u64 {
        expect_close(&relay, frame(true, 0x1, &[0xff, 0xfe], MASK), 1007).await;
        expect_close(&relay, frame(true, 0x2, &vec![0; 10_000], MASK), 1009).await;
        let mut junk = raw_ws(&relay).await;
        junk.write_all(&frame(true, 0x1, b"[[[[[[", MASK))
            .await
            .unwrap();
        publisher
            .send(json!({"action": "publish", "channel": "calm", "data": round}))
            .await;
        let ev = watcher.expect_type("message").await;
        assert_eq!(
            (ev["seq"].as_u64(), ev["data"].as_u64()),
            (Some(round + 1), Some(round))
        );
    }
}

#[tokio::test]
async fn publishing_past_the_rate_limit_gets_rate_limited() {
    let relay = Relay::start(&["--workers", "1", "--max-publish-rate", "5"]);
    let mut c = Client::connect(&relay, Fmt::Json).await;
    // One frame is handled in one go, so the per-second window cannot reset inside it.
    let batch: Vec<_> = (0..8)
        .map(|i| json!({"action": "publish", "channel": "r", "data": i, "id": i}))
        .collect();
    c.send(serde_json::Value::Array(batch)).await;
    let mut published = 0;
    let mut limited = Vec::new();
    for _ in 0..8 {
        let ev = c.next().await;
        match ev["type"].as_str().unwrap() {
            "published" => published += 1,
            "error" => {
                assert_eq!(ev["code"], "rate_limited");
                limited.push(ev["id"].as_i64().unwrap());
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((published, limited), (5, vec![5, 6, 7]));
}

#[tokio::test]
async fn http_keep_alive_and_expect_continue() {
    use tokio::io::AsyncReadExt;
    let relay = Relay::start(&["--workers", "1"]);
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    // Two publishes on one connection, the second announcing its body.
    s.write_all(b"POST /publish/k HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1\r\n\r\n1")
        .await
        .unwrap();
    s.write_all(
        b"POST /publish/k HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("100 Continue") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    s.write_all(b"2").await.unwrap();
    while !String::from_utf8_lossy(&got).contains(r#""seq":2"#) {
        let n = s.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "connection closed: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 202 Accepted").count(), 2, "{text}");
    assert!(text.contains(r#"{"channel":"k","seq":1}"#), "{text}");
}

/// Input that arrives in pieces — a handshake in two writes, then a
/// subscribe sent as a fragmented message (its first fragment empty), one
/// byte per write — is reassembled across reads and answered like input
/// that arrived whole. Whether the pieces land in separate reads is up to
/// the kernel; the answer must be the same either way.
#[tokio::test]
async fn input_trickled_in_pieces_is_understood() {
    use tokio::io::AsyncReadExt;
    let relay = Relay::start(&["--workers", "1"]);
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let request = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let (first, rest) = request.split_at(30);
    s.write_all(first).await.unwrap();
    s.flush().await.unwrap();
    tokio::task::yield_now().await;
    s.write_all(rest).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );

    let body = br#"{"action":"subscribe","channel":"trickle","id":9}"#;
    let mut bytes = frame(false, 0x1, b"", MASK);
    bytes.extend(frame(false, 0x0, &body[..10], MASK));
    bytes.extend(frame(true, 0x0, &body[10..], MASK));
    for b in bytes {
        s.write_all(&[b]).await.unwrap();
        s.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    let opcode = s.read_u8().await.unwrap();
    assert_eq!(opcode, 0x81, "one unfragmented text frame");
    let len = s.read_u8().await.unwrap() as usize;
    assert!(len < 126, "a short reply");
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["channel"], "trickle");
    assert_eq!(reply["id"], 9);
}

/// A request head over the 16 KiB limit is answered 431, whether it is
/// complete or never ends, and the answer arrives intact (the relay reads
/// the rest before closing, so the close does not reset it away); other
/// clients are served meanwhile.
#[tokio::test]
async fn oversize_request_heads_get_431() {
    let relay = Relay::start(&["--workers", "1"]);
    let filler = format!("X-Filler: {}\r\n", "f".repeat(1000)).repeat(20);
    let complete = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{filler}\r\n");
    let (status, _, body) = http_full(relay.addr, complete.as_bytes()).await;
    assert_eq!(status, 431, "{body}");
    assert!(body.contains("request head too large"), "{body}");
    let endless = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{filler}");
    let (status, _, _) = http_full(relay.addr, endless.as_bytes()).await;
    assert_eq!(status, 431);
    let (status, _, _) = http_full(relay.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 200, "the relay serves others as before");
}

#[tokio::test]
async fn past_a_per_second_inbound_limit_a_connection_is_closed_with_1008() {
    let relay = Relay::start(&[
        "--workers",
        "1",
        "--max-frames-per-second",
        "20",
        "--max-bytes-per-second",
        "20000",
    ]);
    // Frames: pings count as frames.
    let mut pinger = raw_ws(&relay).await;
    let mut burst = Vec::new();
    for _ in 0..30 {
        burst.extend(frame(true, 0x9, b"p", MASK));
    }
    pinger.write_all(&burst).await.unwrap();
    assert_eq!(raw_close_code(&mut pinger).await, Some(1008));
    // Bytes: one message within --max-message-bytes, past the byte rate.
    let mut talker = raw_ws(&relay).await;
    let big = format!(
        r#"{{"action":"subscribe","channel":"{}"}}"#,
        "x".repeat(30_000)
    );
    talker
        .write_all(&frame(true, 0x1, big.as_bytes(), MASK))
        .await
        .unwrap();
    assert_eq!(raw_close_code(&mut talker).await, Some(1008));
    assert!(
        relay
            .metric("ringcast_inbound_limited_total", &["limit=\"frames\""])
            .await
            >= 1.0
    );
    assert!(
        relay
            .metric("ringcast_inbound_limited_total", &["limit=\"bytes\""])
            .await
            >= 1.0
    );
    // Others are not affected.
    let mut calm = Client::connect(&relay, Fmt::Json).await;
    calm.subscribe("calm").await;
}

#[tokio::test]
async fn data_nested_a_hundred_thousand_deep_is_refused_cleanly() {
    let relay = Relay::start(&["--workers", "1", "--max-message-bytes", "1048576"]);
    let depth = 100_000;
    let json_data = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let mut msgpack_data = vec![0x91u8; depth];
    msgpack_data.push(1);
    // Over WebSocket, in both formats: an error, and the connection lives.
    let mut c = Client::connect(&relay, Fmt::Json).await;
    let request = format!(r#"{{"action":"publish","channel":"deep","data":{json_data},"id":1}}"#);
    c.ws.send(Message::text(request)).await.unwrap();
    let e = c.expect_type("error").await;
    assert_eq!(e["code"], "bad_request", "{e}");
    c.subscribe("still.open").await;
    let mut m = Client::connect(&relay, Fmt::MsgPack).await;
    let mut frame_bytes = vec![0x84];
    for (k, v) in [("action", "publish"), ("channel", "deep")] {
        frame_bytes.extend(rmp_serde::to_vec(k).unwrap());
        frame_bytes.extend(rmp_serde::to_vec(v).unwrap());
    }
    frame_bytes.extend(rmp_serde::to_vec("id").unwrap());
    frame_bytes.push(2);
    frame_bytes.extend(rmp_serde::to_vec("data").unwrap());
    frame_bytes.extend(&msgpack_data);
    m.ws.send(Message::binary(frame_bytes)).await.unwrap();
    assert_eq!(m.expect_type("error").await["code"], "bad_request");
    m.subscribe("still.open").await;
    // Over HTTP, in both formats: 400.
    let (status, body) = http_publish(relay.addr, "deep", &json_data, "").await;
    assert_eq!(status, 400, "{body}");
    let head = format!(
        "POST /publish/deep HTTP/1.1\r\nHost: x\r\nContent-Type: application/msgpack\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        msgpack_data.len()
    );
    let (status, _, body) = http_full(relay.addr, &[head.as_bytes(), &msgpack_data].concat()).await;
    assert_eq!(status, 400, "{body}");
    // The relay is still here.
    let (status, _) = common::http(
        relay.addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
}
