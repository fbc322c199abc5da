//! TLS on the relay's listener, end to end: certificates made by the test
//! (rcgen), clients built on tokio-rustls (the WebSocket over it by
//! tokio-tungstenite, HTTP by hand), reload on SIGHUP with a connection
//! kept open across it, resumption, a silent TLS client bounded, fatal
//! alerts sent, a ClientHello in one-byte records, and bytes after a
//! close_notify.

mod common;

use std::process::Stdio;
use std::sync::Arc;

use common::{Relay, PATIENCE};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::Message;

fn client_config(trusted: &[CertificateDer<'static>]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

async fn tls_connect(
    relay: &Relay,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(relay.addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let name = ServerName::try_from("localhost").unwrap();
    tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
        .await
        .expect("TLS handshake in time")
}

/// One HTTPS request; the status and body.
async fn https(relay: &Relay, config: &Arc<rustls::ClientConfig>, request: &str) -> (u16, String) {
    let mut s = tls_connect(relay, config).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut response)).await;
    let text = String::from_utf8_lossy(&response).to_string();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

type Wss = tokio_tungstenite::WebSocketStream<TlsStream<TcpStream>>;

async fn wss(relay: &Relay, config: &Arc<rustls::ClientConfig>) -> Wss {
    let tls = tls_connect(relay, config).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async("wss://localhost/ws", tls)
        .await
        .expect("WebSocket handshake over TLS");
    ws
}

async fn next_event(ws: &mut Wss) -> Value {
    next_events(ws).await.remove(0)
}

/// The events of the next text frame (a batch holds several).
async fn next_events(ws: &mut Wss) -> Vec<Value> {
    loop {
        let msg = tokio::time::timeout(PATIENCE, ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(t) = msg {
            return match serde_json::from_str(&t).unwrap() {
                Value::Array(a) => a,
                v => vec![v],
            };
        }
    }
}

fn tls_relay(dir: &std::path::Path, extra: &[&str]) -> Relay {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    // Metrics on a plain address of their own, for the test to read.
    let mut args = vec![
        "--workers",
        "2",
        "--metrics-addr",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Relay::start_logging(&args, "info", Stdio::piped())
}

#[tokio::test]
async fn wss_and_https_share_the_port_and_carry_the_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let der = common::self_signed_certificate(dir.path(), "first");
    let relay = tls_relay(dir.path(), &[]);
    let config = client_config(&[der]);
    let mut ws = wss(&relay, &config).await;
    ws.send(Message::text(
        json!({"action": "subscribe", "channel": "secure"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_event(&mut ws).await["type"], "subscribed");
    let body = r#"{"price":1}"#;
    let (status, answer) = https(
        &relay,
        &config,
        &format!(
            "POST /publish/secure HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let msg = next_event(&mut ws).await;
    assert_eq!(msg["data"]["price"], 1);
    let (status, _) = https(
        &relay,
        &config,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    // ALPN http/1.1 was chosen.
    let s = tls_connect(&relay, &config).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // Plain text on a TLS port gets nowhere.
    let mut plain = TcpStream::connect(relay.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(PATIENCE, plain.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
}

#[tokio::test]
async fn a_reconnect_resumes_its_tls_session() {
    let dir = tempfile::tempdir().unwrap();
    let der = common::self_signed_certificate(dir.path(), "resume");
    let relay = tls_relay(dir.path(), &[]);
    let config = client_config(&[der]);
    // The client keeps its sessions in its config.
    let mut first = tls_connect(&relay, &config).await.unwrap();
    // TLS 1.3 tickets arrive after the handshake; read until the server
    // has said something (the 400 for a line that is no request).
    first.write_all(b"x\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, first.read_to_end(&mut sink)).await;
    let second = tls_connect(&relay, &config).await.unwrap();
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "the second handshake resumed"
    );
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let old = common::self_signed_certificate(dir.path(), "old");
    let mut relay = tls_relay(dir.path(), &[]);
    let trusts_old = client_config(std::slice::from_ref(&old));
    let mut kept = wss(&relay, &trusts_old).await;
    let new = common::self_signed_certificate(dir.path(), "new");
    relay.signal(libc::SIGHUP);
    relay.wait_log("TLS certificate read again");
    let trusts_new_only = client_config(&[new]);
    assert!(
        tls_connect(&relay, &trusts_new_only).await.is_ok(),
        "new handshakes use the new one"
    );
    assert!(
        tls_connect(&relay, &client_config(&[old])).await.is_err(),
        "the old one is gone"
    );
    // The connection opened before the reload still works.
    kept.send(Message::text(
        json!({"action": "subscribe", "channel": "kept"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_event(&mut kept).await["type"], "subscribed");
    // A broken file keeps the certificate in use.
    std::fs::write(dir.path().join("cert.pem"), "not a certificate").unwrap();
    relay.signal(libc::SIGHUP);
    relay.wait_log("TLS certificate kept as it was");
    assert!(tls_connect(&relay, &trusts_new_only).await.is_ok());
}

#[tokio::test]
async fn a_tls_client_that_never_finishes_its_handshake_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let der = common::self_signed_certificate(dir.path(), "slow");
    let relay = tls_relay(dir.path(), &["--handshake-timeout", "1"]);
    let mut silent = TcpStream::connect(relay.addr).await.unwrap();
    // The first bytes of a ClientHello, then nothing.
    silent
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(PATIENCE, silent.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "closed, not left open"
    );
    assert!(
        relay
            .metric("ringcast_tls_handshakes_total", &["result=\"failed\""])
            .await
            >= 1.0
    );
    // Others are served meanwhile.
    let config = client_config(&[der]);
    let _ws = wss(&relay, &config).await;
}

/// A TCP proxy in front of `upstream` that passes the client's bytes on in
/// pieces of 1 to 7 bytes, each written on its own (Nagle off), so TLS
/// records reach the relay cut at every offset; the relay's bytes go back
/// as they come.
async fn splitting_proxy(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(upstream).await.unwrap();
            server.set_nodelay(true).unwrap();
            let (mut client_rx, mut client_tx) = client.into_split();
            let (mut server_rx, mut server_tx) = server.into_split();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let mut piece = 0;
                loop {
                    let n = match client_rx.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let mut at = 0;
                    while at < n {
                        let len = (piece % 7 + 1).min(n - at);
                        piece += 1;
                        if server_tx.write_all(&buf[at..at + len]).await.is_err() {
                            return;
                        }
                        at += len;
                    }
                }
                let _ = server_tx.shutdown().await;
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn records_cut_anywhere_large_messages_and_key_updates_get_through() {
    let dir = tempfile::tempdir().unwrap();
    let der = common::self_signed_certificate(dir.path(), "split");
    let relay = tls_relay(dir.path(), &[]);
    let config = client_config(&[der]);
    let proxy = splitting_proxy(relay.addr).await;
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/ws", tls)
        .await
        .expect("WebSocket handshake through the splitting proxy");
    ws.send(Message::text(
        json!({"action": "subscribe", "channel": "big"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_event(&mut ws).await["type"], "subscribed");

    // Larger than a TLS record, and than what the relay encrypts per write.
    let large: String = (0..60_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    for round in 0..3 {
        if round > 0 {
            // The client changes its keys; the relay must follow, and
            // answers with its own update.
            ws.get_mut().get_mut().1.refresh_traffic_keys().unwrap();
        }
        ws.send(Message::text(
            json!({"action": "publish", "channel": "big", "data": {"round": round, "text": large}, "id": round})
                .to_string(),
        ))
        .await
        .unwrap();
        let mut got_message = false;
        let mut got_ack = false;
        while !(got_message && got_ack) {
            for ev in next_events(&mut ws).await {
                match ev["type"].as_str() {
                    Some("message") => {
                        assert_eq!(ev["data"]["round"], round);
                        assert_eq!(ev["data"]["text"].as_str(), Some(large.as_str()));
                        got_message = true;
                    }
                    Some("published") => got_ack = true,
                    _ => panic!("unexpected {ev}"),
                }
            }
        }
    }

    // Many messages at once leave in batches bigger than one write.
    let item: String = "x".repeat(5_000);
    for i in 0..40 {
        ws.send(Message::text(
            json!({"action": "publish", "channel": "big", "data": {"i": i, "text": item}})
                .to_string(),
        ))
        .await
        .unwrap();
    }
    let mut next = 0;
    while next < 40 {
        for ev in next_events(&mut ws).await {
            if ev["type"] == "message" {
                assert_eq!(ev["data"]["i"], next, "in order, none lost");
                assert_eq!(ev["data"]["text"].as_str().map(str::len), Some(5_000));
                next += 1;
            }
        }
    }
    // A clean close: the relay answers the client's close over TLS.
    ws.close(None).await.unwrap();
    loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await.unwrap() {
            Some(Ok(Message::Close(_))) | None => break,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn a_client_without_a_shared_protocol_is_told_so_by_an_alert() {
    let dir = tempfile::tempdir().unwrap();
    let der = common::self_signed_certificate(dir.path(), "alpn");
    let relay = tls_relay(dir.path(), &[]);
    let mut config = (*client_config(&[der])).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let error = tls_connect(&relay, &Arc::new(config))
        .await
        .expect_err("the relay speaks only HTTP/1.1");
    let cause = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .unwrap_or_else(|| panic!("a TLS error, not {error:?}"));
    assert_eq!(
        cause,
        &rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol),
        "the relay's fatal alert reaches the client"
    );
}

/// A proxy that cuts the client's handshake records (its ClientHello)
/// into records of one byte each, as TLS allows, and copies the rest.
async fn hello_fragmenting_proxy(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(upstream).await.unwrap();
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        tokio::spawn(async move {
            loop {
                let mut header = [0u8; 5];
                client_rx.read_exact(&mut header).await.unwrap();
                let len = u16::from_be_bytes([header[3], header[4]]) as usize;
                let mut body = vec![0u8; len];
                client_rx.read_exact(&mut body).await.unwrap();
                if header[0] != 22 {
                    server_tx.write_all(&header).await.unwrap();
                    server_tx.write_all(&body).await.unwrap();
                    break;
                }
                let mut cut = Vec::with_capacity(len * 6);
                for byte in body {
                    cut.extend_from_slice(&[22, header[1], header[2], 0, 1, byte]);
                }
                server_tx.write_all(&cut).await.unwrap();
            }
            let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
        });
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        });
    });
    addr
}

#[tokio::test]
async fn a_large_client_hello_in_one_byte_records_completes_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let der = common::self_signed_certificate(dir.path(), "fragments");
    let relay = tls_relay(dir.path(), &[]);
    let mut config = (*client_config(&[der])).clone();
    // Protocols the relay does not speak make the ClientHello about 12 KB:
    // cut into one-byte records it is about 73 KB on the wire, more than
    // one read takes, so the relay keeps far more than a record's worth
    // while the message is incomplete.
    let mut protocols: Vec<Vec<u8>> = (0..48).map(|i| vec![b'a' + i % 26; 250]).collect();
    protocols.push(b"http/1.1".to_vec());
    config.alpn_protocols = protocols;
    let proxy = hello_fragmenting_proxy(relay.addr).await;
    let tcp = TcpStream::connect(proxy).await.unwrap();
    let tls = tokio::time::timeout(
        PATIENCE,
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap()
    .expect("the handshake completes");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/ws", tls)
        .await
        .expect("WebSocket handshake");
    ws.send(Message::text(
        json!({"action": "subscribe", "channel": "c"}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_event(&mut ws).await["type"], "subscribed");
}

#[tokio::test]
async fn data_before_a_close_notify_is_used_and_bytes_after_it_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let der = common::self_signed_certificate(dir.path(), "notify");
    let relay = tls_relay(dir.path(), &[]);
    let config = client_config(&[der]);
    let mut watcher = wss(&relay, &config).await;
    watcher
        .send(Message::text(
            json!({"action": "subscribe", "channel": "last"}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(next_event(&mut watcher).await["type"], "subscribed");

    let mut tls = tls_connect(&relay, &config).await.unwrap();
    common::upgrade(&mut tls).await;
    // One write holds a publish, the client's close_notify and more than a
    // record's worth of bytes after it.
    let (mut tcp, mut conn) = tls.into_inner();
    let publish = json!({"action": "publish", "channel": "last", "data": "bye"}).to_string();
    std::io::Write::write_all(
        &mut conn.writer(),
        &common::frame(true, 1, publish.as_bytes(), common::MASK),
    )
    .unwrap();
    conn.send_close_notify();
    let mut wire = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut wire).unwrap();
    }
    wire.extend(std::iter::repeat_n(0x17, 20_000));
    tcp.write_all(&wire).await.unwrap();

    let ev = next_event(&mut watcher).await;
    assert_eq!(ev["type"], "message");
    assert_eq!(ev["data"], "bye");
}
