//! Tokens, capabilities and origins at the edge, end to end: the relay
//! binary, tokio-tungstenite clients, tokens signed by the test.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::{http_full, http_publish, Client, Fmt, Relay};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "an HMAC secret of at least thirty-two bytes";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn with_tokens(extra: &[&str]) -> Relay {
    let mut args = vec!["--workers", "2", "--jwt-secret", SECRET];
    args.extend_from_slice(extra);
    Relay::start(&args)
}

/// The status and JSON body of a handshake to `target` with `headers`.
async fn handshake(relay: &Relay, target: &str, headers: &str) -> (u16, Value) {
    let request = format!(
        "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    );
    let (status, _, body) = http_full(relay.addr, request.as_bytes()).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn without_a_valid_token_the_handshake_is_a_401_with_the_reason() {
    let relay = with_tokens(&["--jwt-issuer", "https://id.example", "--jwt-audience", "rc"]);
    let good = json!({"sub": "u", "exp": now() + 600, "iss": "https://id.example", "aud": "rc"});
    let mut other_key = Header::new(Algorithm::HS256);
    other_key.typ = Some("JWT".into());
    let forged = encode(
        &other_key,
        &good,
        &EncodingKey::from_secret(b"not the relay's secret, but 32 bytes long").unwrap(),
    )
    .unwrap();
    let cases = [
        (String::new(), "a token is required"),
        ("?token=garbage".to_string(), "not a well-formed JWT"),
        (format!("?token={forged}"), "signature does not verify"),
        (
            format!(
                "?token={}",
                token(
                    json!({"sub": "u", "exp": now() - 1, "iss": "https://id.example", "aud": "rc"})
                )
            ),
            "expired",
        ),
        (
            format!(
                "?token={}",
                token(
                    json!({"sub": "u", "exp": now() + 600, "nbf": now() + 3600, "iss": "https://id.example", "aud": "rc"})
                )
            ),
            "not valid yet",
        ),
        (
            format!(
                "?token={}",
                token(json!({"sub": "u", "exp": now() + 600, "iss": "https://evil", "aud": "rc"}))
            ),
            "issuer",
        ),
        (
            format!(
                "?token={}",
                token(
                    json!({"sub": "u", "exp": now() + 600, "iss": "https://id.example", "aud": "other"})
                )
            ),
            "audience",
        ),
    ];
    for (query, why) in cases {
        let (status, body) = handshake(&relay, &format!("/ws{query}"), "").await;
        assert_eq!(status, 401, "{why}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(why), "{why}: {message}");
    }
    // A good token, by query or by header.
    let good = token(good);
    assert!(
        Client::connect_with(&format!("{}?token={good}", relay.url()), &[], Fmt::Json)
            .await
            .is_ok()
    );
    let bearer = format!("Bearer {good}");
    assert!(
        Client::connect_with(&relay.url(), &[("Authorization", &bearer)], Fmt::MsgPack)
            .await
            .is_ok()
    );
    // Health and backend publishing are not behind tokens.
    let (status, _) = http_publish(relay.addr, "c", "1", "").await;
    assert_eq!(status, 202);
}

#[tokio::test]
async fn caps_decide_subscribes_and_publishes_per_channel() {
    let relay = with_tokens(&[]);
    let t = token(json!({"sub": "alice", "exp": now() + 600,
        "caps": {"prices.*": ["subscribe"], "chat.{sub}": ["subscribe", "publish"]}}));
    let mut alice = Client::connect_with(&format!("{}?token={t}", relay.url()), &[], Fmt::Json)
        .await
        .unwrap();
    alice
        .send(json!([
            {"action": "subscribe", "channel": "prices.AAPL", "id": 1},
            {"action": "subscribe", "channel": "secrets", "id": 2},
            {"action": "publish", "channel": "prices.AAPL", "data": 1, "id": 3},
            {"action": "subscribe", "channel": "chat.alice", "id": 4},
            {"action": "publish", "channel": "chat.alice", "data": "hi", "id": 5},
        ]))
        .await;
    let mut answers = Vec::new();
    while answers.len() < 5 {
        let e = alice.next().await;
        if e["type"] != "message" {
            answers.push((
                e["id"].as_i64().unwrap(),
                e["type"].as_str().unwrap().to_string(),
                e["code"].clone(),
            ));
        }
    }
    assert_eq!(answers[0].1, "subscribed");
    assert_eq!(
        (answers[1].1.as_str(), answers[1].2.as_str()),
        ("error", Some("forbidden"))
    );
    assert_eq!(
        (answers[2].1.as_str(), answers[2].2.as_str()),
        ("error", Some("forbidden"))
    );
    assert_eq!(answers[3].1, "subscribed");
    assert_eq!(answers[4].1, "published");
    // The connection stays open and keeps working.
    http_publish(relay.addr, "prices.AAPL", "2", "").await;
    let msg = alice.expect_type("message").await;
    assert!(msg["channel"] == "chat.alice" || msg["channel"] == "prices.AAPL");
}

#[tokio::test]
async fn a_refresh_extends_the_connection_and_a_short_token_is_closed_with_4001() {
    let relay = with_tokens(&[]);
    // The one to refresh has time to spare, whatever the machine's load.
    let spare = token(json!({"sub": "s", "exp": now() + 8}));
    let url = format!("{}?token={spare}", relay.url());
    let mut refreshed = Client::connect_with(&url, &[], Fmt::Json).await.unwrap();
    let short = token(json!({"sub": "s", "exp": now() + 2}));
    let url = format!("{}?token={short}", relay.url());
    let mut left = Client::connect_with(&url, &[], Fmt::Json).await.unwrap();
    let longer = token(json!({"sub": "s", "exp": now() + 600}));
    refreshed
        .send(json!({"action": "refresh", "token": longer, "id": 1}))
        .await;
    assert_eq!(refreshed.expect_type("refreshed").await["id"], 1);
    let stolen = token(json!({"sub": "someone-else", "exp": now() + 600}));
    refreshed
        .send(json!({"action": "refresh", "token": stolen, "id": 2}))
        .await;
    assert_eq!(refreshed.expect_error("unauthorized", 2).await["id"], 2);
    // The one not refreshed is closed at its exp.
    assert_eq!(left.close_code().await, Some(4001));
    refreshed.subscribe("still.here").await;
}

#[tokio::test]
async fn rsa_ec_and_ed25519_keys_verify_tokens() {
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/");
    let public = format!("{keys}rsa.pub,{keys}ec.pub,{keys}ed.pub");
    let relay = Relay::start(&["--jwt-public-key", &public]);
    for (alg, private) in [
        (Algorithm::RS256, "rsa.key"),
        (Algorithm::ES256, "ec.key"),
        (Algorithm::EdDSA, "ed.key"),
    ] {
        let pem = std::fs::read(format!("{keys}{private}")).unwrap();
        let key = match alg {
            Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem),
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            _ => EncodingKey::from_ed_pem(&pem),
        }
        .unwrap();
        let t = encode(&Header::new(alg), &json!({"exp": now() + 600}), &key).unwrap();
        let url = format!("{}?token={t}", relay.url());
        assert!(
            Client::connect_with(&url, &[], Fmt::Json).await.is_ok(),
            "{alg:?}"
        );
    }
    // An HS256 token made with the RSA public key as its secret.
    let pem = std::fs::read(format!("{keys}rsa.pub")).unwrap();
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &json!({"exp": now() + 600}),
        &EncodingKey::from_secret(&pem).unwrap(),
    )
    .unwrap();
    let (status, body) = handshake(&relay, &format!("/ws?token={confused}"), "").await;
    assert_eq!(status, 401, "{body}");
}

#[tokio::test]
async fn only_allowed_origins_may_open_websockets() {
    let relay = Relay::start(&[
        "--allowed-origins",
        "https://app.example.com,https://*.example.org",
    ]);
    for (origin, allowed) in [
        ("https://app.example.com", true),
        ("https://dash.example.org", true),
        ("https://evil.example", false),
        ("null", false),
    ] {
        let result = Client::connect_with(&relay.url(), &[("Origin", origin)], Fmt::Json).await;
        match result {
            Ok(_) => assert!(allowed, "{origin}"),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert!(!allowed, "{origin}");
                assert_eq!(r.status(), 403, "{origin}");
            }
            Err(e) => panic!("{origin}: {e}"),
        }
    }
    // No Origin: not a browser, not refused.
    assert!(Client::connect_with(&relay.url(), &[], Fmt::Json)
        .await
        .is_ok());
}

#[tokio::test]
async fn as_shipped_websocket_clients_may_not_publish() {
    let relay = Relay::start_as_shipped(&["--workers", "1"]);
    let mut client = Client::connect(&relay, Fmt::Json).await;
    client
        .send(json!({"action": "publish", "channel": "c", "data": 1, "id": 1}))
        .await;
    let e = client.expect_error("forbidden", 1).await;
    assert!(
        e["message"].as_str().unwrap().contains("may not publish"),
        "{e}"
    );
    let (status, _) = http_publish(relay.addr, "c", "1", "").await;
    assert_eq!(status, 202, "backends publish over HTTP");
}

#[tokio::test]
async fn one_address_is_capped_on_open_connections_and_answered_429() {
    let relay = Relay::start(&[
        "--address-limits-exempt",
        "none",
        "--max-connections-per-address",
        "3",
        "--max-new-connections-per-address",
        "0",
    ]);
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(Client::connect(&relay, Fmt::Json).await);
    }
    match Client::connect_with(&relay.url(), &[], Fmt::Json).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 429);
            assert_eq!(r.headers()["retry-after"], "5");
        }
        other => panic!("a fourth connection: {:?}", other.map(|_| ())),
    }
    // Probes from the same address are still answered.
    let (status, _, _) = http_full(relay.addr, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(
        relay
            .metric("ringcast_address_limited_total", &["limit=\"open\""])
            .await
            >= 1.0
    );
    // Once one leaves, the address may connect again.
    open.pop();
    let deadline = tokio::time::Instant::now() + common::PATIENCE;
    loop {
        match Client::connect_with(&relay.url(), &[], Fmt::Json).await {
            Ok(_) => break,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 429 => {
                assert!(tokio::time::Instant::now() < deadline, "still refused");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[tokio::test]
async fn one_address_is_capped_on_new_connections_per_second() {
    let relay = Relay::start(&[
        "--address-limits-exempt",
        "none",
        "--max-connections-per-address",
        "0",
        "--max-new-connections-per-address",
        "5",
    ]);
    let started = std::time::Instant::now();
    let (mut accepted, mut limited) = (0u64, 0u64);
    for _ in 0..40 {
        match Client::connect_with(&relay.url(), &[], Fmt::Json).await {
            Ok(_) => accepted += 1,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 429 => {
                assert_eq!(r.headers()["retry-after"], "1");
                limited += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Whatever the pace, at most 5 were let in per second begun.
    let seconds = started.elapsed().as_secs() + 1;
    assert!(accepted <= 5 * seconds, "{accepted} in {seconds} s");
    assert_eq!(accepted + limited, 40);
    let (status, body) = handshake(&relay, "/ws", "").await;
    assert!(status == 429 || status == 101, "{status} {body}");
}

/// `POST /revoke` with `body`, with the operator key `key` when given.
async fn revoke(relay: &Relay, body: &str, key: Option<&str>) -> (u16, String) {
    let auth = key.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    let request = format!(
        "POST /revoke HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n{auth}\r\n{body}",
        body.len()
    );
    common::http(relay.addr, &request).await
}

#[tokio::test]
async fn a_revoked_user_is_closed_with_4003_and_refused_until_the_revocation_ends() {
    let open = with_tokens(&[]);
    let (status, body) = revoke(&open, r#"{"sub":"eve"}"#, None).await;
    assert_eq!(status, 403, "no operator key, no revocation: {body}");

    let relay = with_tokens(&["--publish-key", "operator-key"]);
    let eve = token(json!({"sub": "eve", "exp": now() + 600}));
    let url = format!("{}?token={eve}", relay.url());
    let mut connected = Client::connect_with(&url, &[], Fmt::Json).await.unwrap();
    let other = token(json!({"sub": "bob", "exp": now() + 600}));
    let mut bob = Client::connect_with(&format!("{}?token={other}", relay.url()), &[], Fmt::Json)
        .await
        .unwrap();
    assert_eq!(
        revoke(&relay, r#"{"sub":"eve"}"#, Some("wrong")).await.0,
        401
    );
    let forever = format!(r#"{{"sub":"eve","until":{}}}"#, u64::MAX);
    for bad in [
        r#"{}"#,
        r#"{"sub":"a","jti":"b"}"#,
        r#"{"sub":"eve","until":1}"#,
        forever.as_str(),
        "x",
    ] {
        assert_eq!(
            revoke(&relay, bad, Some("operator-key")).await.0,
            400,
            "{bad}"
        );
    }
    let (status, body) = revoke(&relay, r#"{"sub":"eve"}"#, Some("operator-key")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(connected.close_code().await, Some(4003));
    let (status, body) = handshake(&relay, &format!("/ws?token={eve}"), "").await;
    assert_eq!(status, 401);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{body}"
    );
    bob.subscribe("still.here").await;
}

#[tokio::test]
async fn behind_redis_a_revocation_reaches_every_node_and_outlives_them() {
    let redis = common::redis::RedisServer::start();
    let url = redis.url();
    let node = |url: &str| {
        Relay::start(&[
            "--workers",
            "2",
            "--jwt-secret",
            SECRET,
            "--publish-key",
            "k",
            "--redis",
            url,
        ])
    };
    let a = node(&url);
    let b = node(&url);
    a.wait_readyz(200).await;
    b.wait_readyz(200).await;
    let eve = token(json!({"sub": "eve", "jti": "e1", "exp": now() + 600}));
    let mut on_b = Client::connect_with(&format!("{}?token={eve}", b.url()), &[], Fmt::Json)
        .await
        .unwrap();
    // Garbage on the revocations channel is ignored, and costs nothing.
    redis.cli(&["PUBLISH", "ringcast:$revoked", "not a revocation"]);
    redis.cli(&["PUBLISH", "ringcast:$revoked", "99999999999 nosuchkind:x"]);
    let (status, body) = revoke(&a, r#"{"jti":"e1"}"#, Some("k")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        on_b.close_code().await,
        Some(4003),
        "closed on the other node"
    );
    // A node started afterwards knows it from Redis.
    let c = node(&url);
    c.wait_readyz(200).await;
    let (status, body) = handshake(&c, &format!("/ws?token={eve}"), "").await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{body}"
    );
}

#[tokio::test]
async fn sighup_reads_the_keys_again_and_a_bad_file_keeps_the_old_ones() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    let b64 = |s: &[u8]| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let old_secret = b"the first secret, at least thirty-two bytes";
    let new_secret = b"the second secret, at least thirty-two bytes";
    let set = |keys: &[(&str, &[u8])]| {
        let keys: Vec<Value> = keys
            .iter()
            .map(|(kid, k)| json!({"kty": "oct", "kid": kid, "alg": "HS256", "k": b64(k)}))
            .collect();
        json!({ "keys": keys }).to_string()
    };
    std::fs::write(&jwks, set(&[("old", old_secret)])).unwrap();
    let mut relay = Relay::start_logging(
        &["--jwks-file", jwks.to_str().unwrap()],
        "info",
        Stdio::piped(),
    );
    let signed = |kid: &str, secret: &[u8]| {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(kid.into());
        let key = EncodingKey::from_secret(secret).unwrap();
        encode(&header, &json!({"sub": "s", "exp": now() + 600}), &key).unwrap()
    };
    let (old, new) = (signed("old", old_secret), signed("new", new_secret));
    let base = relay.url();
    let url = |t: &str| format!("{base}?token={t}");
    let mut kept = Client::connect_with(&url(&old), &[], Fmt::Json)
        .await
        .unwrap();
    assert_eq!(
        handshake(&relay, &format!("/ws?token={new}"), "").await.0,
        401
    );
    // Rotation: the new key is added, the old one goes.
    std::fs::write(&jwks, set(&[("new", new_secret)])).unwrap();
    relay.signal(libc::SIGHUP);
    relay.wait_log("token keys read again");
    assert!(Client::connect_with(&url(&new), &[], Fmt::Json)
        .await
        .is_ok());
    assert_eq!(
        handshake(&relay, &format!("/ws?token={old}"), "").await.0,
        401
    );
    kept.subscribe("opened.before.the.rotation").await;
    // A broken file is refused and the keys in use stay.
    std::fs::write(&jwks, "{ not json").unwrap();
    relay.signal(libc::SIGHUP);
    relay.wait_log("token keys kept as they were");
    assert!(Client::connect_with(&url(&new), &[], Fmt::Json)
        .await
        .is_ok());
}

/// A PROXY protocol v2 header naming `client` (IPv4) as the source.
fn proxy_v2(client: [u8; 4]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&client);
    h.extend_from_slice(&[127, 0, 0, 1, 0x30, 0x39, 0x1f, 0x90]);
    h
}

const UPGRADE: &str =
    "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// Sends `bytes` on a new connection and returns the status of the answer
/// (0 when the connection closed without one); the socket stays open.
async fn status_after(relay: &Relay, bytes: &[u8]) -> (u16, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(common::PATIENCE, s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return (0, s),
        }
    }
    let text = String::from_utf8_lossy(&head);
    (text.split_whitespace().nth(1).unwrap().parse().unwrap(), s)
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_client_it_names_is_counted() {
    // PROXY protocol v2 from a trusted peer.
    let relay = Relay::start(&[
        "--trusted-proxies",
        "127.0.0.1/32",
        "--proxy-protocol",
        "true",
        "--address-limits-exempt",
        "none",
        "--max-connections-per-address",
        "2",
    ]);
    let upgrade = format!("{UPGRADE}\r\n");
    let mut open = Vec::new();
    for _ in 0..2 {
        let (status, s) = status_after(
            &relay,
            &[proxy_v2([203, 0, 113, 7]), upgrade.clone().into_bytes()].concat(),
        )
        .await;
        assert_eq!(status, 101);
        open.push(s);
    }
    let (status, _) = status_after(
        &relay,
        &[proxy_v2([203, 0, 113, 7]), upgrade.clone().into_bytes()].concat(),
    )
    .await;
    assert_eq!(status, 429, "the third from the same client");
    let (status, _s) = status_after(
        &relay,
        &[proxy_v2([198, 51, 100, 1]), upgrade.clone().into_bytes()].concat(),
    )
    .await;
    assert_eq!(status, 101, "another client behind the same proxy");
    let (status, _) = status_after(&relay, upgrade.as_bytes()).await;
    assert_eq!(
        status, 0,
        "no PROXY header from a proxy that must send one: closed"
    );

    // X-Forwarded-For from a trusted peer, the right-most untrusted hop.
    let relay = Relay::start(&[
        "--trusted-proxies",
        "127.0.0.1/32",
        "--address-limits-exempt",
        "none",
        "--max-connections-per-address",
        "1",
    ]);
    let with = |xff: &str| format!("{UPGRADE}X-Forwarded-For: {xff}\r\n\r\n");
    let (status, _first) = status_after(&relay, with("192.0.2.1, 203.0.113.9").as_bytes()).await;
    assert_eq!(status, 101);
    let (status, _) = status_after(&relay, with("198.51.100.77, 203.0.113.9").as_bytes()).await;
    assert_eq!(
        status, 429,
        "the same client, whatever it forged on the left"
    );
    let (status, _other) = status_after(&relay, with("203.0.113.10").as_bytes()).await;
    assert_eq!(status, 101);
}
