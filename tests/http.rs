//! The HTTP side of the relay as outside clients speak it: bodies split
//! across TCP segments anywhere, request framing that could smuggle a
//! second request, `HEAD`, `Host`, the API key, and publication data that
//! one of the two formats could not carry.

mod common;

use std::time::Duration;

use common::{http_full, Client, Fmt, Relay};
use futures_util::SinkExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Writes `request` in two pieces split at `at` (a pause between them, so
/// the relay usually reads them apart; the answer must not depend on it),
/// then reads until the peer closes.
async fn split_exchange(relay: &Relay, request: &[u8], at: usize) -> String {
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&request[..at]).await.unwrap();
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2)).await;
    s.write_all(&request[at..]).await.unwrap();
    read_to_close(&mut s).await
}

async fn read_to_close(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(common::PATIENCE, s.read_to_end(&mut out)).await;
    read.expect("the relay answers and closes").ok();
    String::from_utf8_lossy(&out).into_owned()
}

fn publish_request(channel: &str, content_type: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut r = format!(
        "POST /publish/{channel} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n\
         Content-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[tokio::test]
async fn a_body_split_anywhere_is_read_to_its_content_length() {
    let relay = Relay::start(&["--workers", "1"]);
    let mut c = Client::connect(&relay, Fmt::Json).await;
    c.subscribe("split").await;
    let mut seq = 0;
    for body in ["1", "0", "12", r#"{"k":[1,2]}"#] {
        let request = publish_request("split", "application/json", body.as_bytes(), "");
        for at in 1..request.len() {
            let answer = split_exchange(&relay, &request, at).await;
            assert!(
                answer.starts_with("HTTP/1.1 202"),
                "body {body:?} split at {at}: {answer}"
            );
            seq += 1;
            let ev = c.expect_type("message").await;
            assert_eq!(ev["seq"], seq);
            assert_eq!(
                ev["data"],
                serde_json::from_str::<serde_json::Value>(body).unwrap()
            );
        }
    }
    // Byte by byte.
    let request = publish_request("split", "application/json", b"7", "");
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    for b in &request {
        s.write_all(&[*b]).await.unwrap();
        s.flush().await.unwrap();
        tokio::task::yield_now().await;
    }
    assert!(read_to_close(&mut s).await.starts_with("HTTP/1.1 202"));
    assert_eq!(c.expect_type("message").await["data"], 7);
}

#[tokio::test]
async fn ambiguous_framing_is_refused_and_nothing_is_smuggled() {
    let relay = Relay::start(&["--workers", "1"]);
    let smuggle = "POST /publish/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                   Content-Length: 1\r\nContent-Length: 40\r\n\r\n\
                   1GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let refusals = [
        smuggle.to_string(),
        "POST /publish/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: +2\r\n\r\n12".into(),
        "POST /publish/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n1".into(),
        "GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 3\r\n\r\n".into(),
        "GET /healthz HTTP/1.1\r\n\r\n".into(),
        "GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".into(),
    ];
    for request in refusals {
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let answer = read_to_close(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{request:?}: {answer}");
        assert_eq!(
            answer.matches("\r\nContent-Type: ").count(),
            1,
            "one answer, then the connection closes: {answer}"
        );
    }
    // A repeated, identical Content-Length is one value (RFC 9110 8.6).
    let same = "POST /publish/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1\r\nContent-Length: 1\r\nConnection: close\r\n\r\n5";
    assert_eq!(http_full(relay.addr, same.as_bytes()).await.0, 202);
    // HTTP/1.0 needs no Host.
    assert_eq!(
        http_full(relay.addr, b"GET /healthz HTTP/1.0\r\n\r\n")
            .await
            .0,
        200
    );
}

#[tokio::test]
async fn head_answers_headers_only_so_a_pipelined_request_stays_in_step() {
    let relay = Relay::start(&["--workers", "1"]);
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut s).await;
    let (head_answer, rest) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head_answer.starts_with("HTTP/1.1 200"), "{answer}");
    let length: usize = head_answer
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(length > 100, "HEAD gives the page's length: {head_answer}");
    assert!(
        rest.starts_with("HTTP/1.1 200"),
        "no body after HEAD: {rest:.200}"
    );
    assert!(rest.ends_with("\r\n\r\nok\n"), "{rest}");
}

#[tokio::test]
async fn the_api_key_scheme_is_case_insensitive_and_bad_types_are_named() {
    let relay = Relay::start(&["--workers", "1", "--publish-key", "s3cret"]);
    for auth in ["Bearer s3cret", "bearer s3cret", "BEARER   s3cret"] {
        let extra = format!("Authorization: {auth}\r\n");
        let r = publish_request("k", "application/json", b"1", &extra);
        assert_eq!(http_full(relay.addr, &r).await.0, 202, "{auth}");
    }
    for auth in ["Bearer s3cre", "Bearer s3cret2", "Basic s3cret", "s3cret"] {
        let extra = format!("Authorization: {auth}\r\n");
        let r = publish_request("k", "application/json", b"1", &extra);
        assert_eq!(http_full(relay.addr, &r).await.0, 401, "{auth}");
    }
    // What `curl -d` sends.
    let extra = "Authorization: Bearer s3cret\r\n";
    let r = publish_request("k", "application/x-www-form-urlencoded", b"1", extra);
    let (status, head, body) = http_full(relay.addr, &r).await;
    assert_eq!(status, 415);
    assert!(
        head.contains("Accept-Post: application/json, application/msgpack"),
        "{head}"
    );
    assert!(
        body.contains("application/x-www-form-urlencoded is not accepted"),
        "{body}"
    );
    assert!(
        body.contains("application/json") && body.contains("application/msgpack"),
        "{body}"
    );
}

/// Data that one format cannot carry is refused at publish time, over HTTP
/// and WebSocket, in both formats; the deepest allowed nesting reaches
/// subscribers of both formats as the same value.
#[tokio::test]
async fn data_both_formats_cannot_carry_is_refused_at_publish_time() {
    let relay = Relay::start(&["--workers", "2"]);
    let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
    let bad_json = [
        "1e400".to_string(),
        r#"{"p":-1e999}"#.into(),
        r#""\ud800""#.into(),
        r#"["a\udc00"]"#.into(),
        nested(33),
        nested(200),
    ];
    for body in &bad_json {
        let r = publish_request("d", "application/json", body.as_bytes(), "");
        let (status, _, answer) = http_full(relay.addr, &r).await;
        assert_eq!(status, 400, "{body:.40}: {answer}");
        assert!(answer.contains("bad_request"), "{answer}");
    }
    let mut deep_msgpack = vec![0x91u8; 33];
    deep_msgpack.push(1);
    let bad_msgpack: [Vec<u8>; 4] = [
        vec![0xc1],
        vec![0x92, 0x01, 0xc1],
        vec![0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0], // NaN
        deep_msgpack,
    ];
    for body in &bad_msgpack {
        let r = publish_request("d", "application/msgpack", body, "");
        let (status, _, answer) = http_full(relay.addr, &r).await;
        assert_eq!(status, 400, "{body:x?}: {answer}");
    }
    // Over WebSocket: JSON data inside a JSON request.
    let mut json_client = Client::connect(&relay, Fmt::Json).await;
    for (i, body) in bad_json.iter().enumerate() {
        let text = format!(r#"{{"action":"publish","channel":"d","id":{i},"data":{body}}}"#);
        json_client
            .ws
            .send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
        json_client.expect_error("bad_request", i as i64).await;
    }
    // MessagePack data inside a MessagePack request (a map of 4 fields).
    let mut msgpack_client = Client::connect(&relay, Fmt::MsgPack).await;
    for (i, data) in bad_msgpack.iter().enumerate() {
        let mut frame = vec![0x84];
        for (k, v) in [("action", "publish"), ("channel", "d")] {
            rmp::encode::write_str(&mut frame, k).unwrap();
            rmp::encode::write_str(&mut frame, v).unwrap();
        }
        rmp::encode::write_str(&mut frame, "id").unwrap();
        rmp::encode::write_uint(&mut frame, i as u64).unwrap();
        rmp::encode::write_str(&mut frame, "data").unwrap();
        frame.extend_from_slice(data);
        msgpack_client
            .ws
            .send(tokio_tungstenite::tungstenite::Message::binary(frame))
            .await
            .unwrap();
        let e = msgpack_client.expect_type("error").await;
        assert_eq!(e["code"], "bad_request", "{data:x?}: {e}");
    }
    // Nothing was published; the deepest allowed value reaches both formats.
    json_client.subscribe("d").await;
    msgpack_client.subscribe("d").await;
    let r = publish_request("d", "application/json", nested(32).as_bytes(), "");
    assert_eq!(http_full(relay.addr, &r).await.0, 202);
    let expected: serde_json::Value = serde_json::from_str(&nested(32)).unwrap();
    for c in [&mut json_client, &mut msgpack_client] {
        let ev = c.expect_type("message").await;
        assert_eq!(ev["seq"], 1, "nothing refused was sequenced");
        assert_eq!(ev["data"], expected);
    }
}

#[tokio::test]
async fn a_single_node_lists_itself_in_the_directory_only_when_it_advertises() {
    const GET_NODES: &[u8] = b"GET /nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let quiet = Relay::start(&["--workers", "1"]);
    let (status, head, body) = http_full(quiet.addr, GET_NODES).await;
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("Access-Control-Allow-Origin: *"), "{head}");
    assert_eq!(body, r#"{"nodes":[]}"#);

    let port = common::redis::free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("wss://edge.example.com:{port}/ws");
    let mut relay = Relay::start(&[
        "--workers",
        "1",
        "--listen",
        &listen,
        "--advertise-url",
        &url,
        "--max-connections",
        "100",
        "--drain-seconds",
        "3",
    ]);
    let mut client = Client::connect(&relay, Fmt::Json).await;
    let (status, _, body) = http_full(relay.addr, GET_NODES).await;
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        listed,
        serde_json::json!({"nodes": [{"url": url, "connections": 1,
            "max_connections": 100, "load": 0.01}]})
    );
    let (status, _, _) = http_full(
        relay.addr,
        b"POST /nodes HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);

    // Draining, it lists nobody, and with no other node to name, its 1012
    // says only that it restarts.
    relay.signal(libc::SIGTERM);
    relay.wait_readyz(503).await;
    let (_, _, body) = http_full(relay.addr, GET_NODES).await;
    assert_eq!(body, r#"{"nodes":[]}"#);
    assert_eq!(
        client.close_frame().await,
        Some((1012, "server restarting".to_string()))
    );
    drop(client);
    assert!(relay.wait_exit().success());
}

/// `/metrics` on the main port answers clients on this host only. Behind
/// a trusted proxy on this host, that is the client the proxy names in
/// each request, never the proxy itself: a proxy's pooled connection
/// carries many clients' requests, and its own address would open the
/// metrics to everyone behind it.
#[tokio::test]
async fn behind_a_trusted_proxy_metrics_answer_only_the_clients_it_names_as_local() {
    let relay = Relay::start(&["--trusted-proxies", "127.0.0.1/32"]);
    let get = |xff: Option<&str>| {
        let xff = xff.map_or(String::new(), |a| format!("X-Forwarded-For: {a}\r\n"));
        format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{xff}\r\n")
    };
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    let mut statuses = Vec::new();
    for xff in [
        Some("127.0.0.2"),
        Some("203.0.113.9"),
        None,
        // Garbage where the proxy names the client: nobody local.
        Some("127.0.0.2, not an address"),
        Some("127.0.0.2"),
    ] {
        s.write_all(get(xff).as_bytes()).await.unwrap();
        statuses.push(read_one_response(&mut s).await);
    }
    assert_eq!(
        statuses,
        [200, 404, 404, 404, 200],
        "one keep-alive connection from the proxy: a local client, a remote one, \
         one the proxy does not name, a garbled chain, the local one again"
    );
    // A client of this host that is not a trusted proxy still gets them.
    let plain = Relay::start(&[]);
    let (status, body) = common::http(
        plain.addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{body:.200}");
}

/// Reads one response with a `Content-Length` body from a keep-alive
/// connection; its status.
async fn read_one_response(s: &mut TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(common::PATIENCE, s.read(&mut byte))
            .await
            .expect("a response")
            .unwrap();
        assert_eq!(n, 1, "the relay closed the keep-alive connection");
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    head.split_whitespace().nth(1).unwrap().parse().unwrap()
}
