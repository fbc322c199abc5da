//! A real browser at the edge: headless Chromium (Debian's, which
//! tests/run installs) opens the relay's demo page over `https://`, and the
//! page's WebSocket goes over `wss://` with a JWT from the page's URL,
//! through the relay's origin check. Chromium trusts the test's own
//! certificate by its key alone. It is driven over the DevTools protocol
//! by tests/browser/cdp.py.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use common::Relay;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const SECRET: &str = "an HMAC secret of at least thirty-two bytes";

fn chromium() -> &'static str {
    for path in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if std::path::Path::new(path).exists() {
            return path;
        }
    }
    panic!("chromium not found: the browser test needs it (tests/run installs it: apt-get install chromium)");
}

/// Runs the DevTools plan; what each page read at its end.
fn drive(plan: &Value, spki: &std::path::Path) -> Value {
    use std::io::Write;
    let mut child = std::process::Command::new(common::outside_python())
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/browser/cdp.py"))
        .arg(chromium())
        .arg(spki)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running tests/browser/cdp.py");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(plan.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the browser run failed: {stdout}{stderr}"
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}{stderr}"))
}

#[test]
fn chromium_opens_the_page_over_https_and_its_websocket_over_wss_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), made.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), made.key_pair.serialize_pem()).unwrap();
    let spki = dir.path().join("spki.der");
    std::fs::write(&spki, made.key_pair.public_key_der()).unwrap();

    let port = common::redis::free_port();
    let listen = format!("127.0.0.1:{port}");
    let origin = format!("https://localhost:{port}");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let _relay = Relay::start_as_shipped(&[
        "--workers",
        "2",
        "--listen",
        &listen,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--jwt-secret",
        SECRET,
        "--allowed-origins",
        &origin,
    ]);
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "browser", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap();
    let screenshot = dir.path().join("demo.png");
    let log = "document.getElementById('log').textContent";
    let shows = |text: &str| format!("{log}.includes({})", json!(text));
    let plan = json!([
        {
            "name": "with_token",
            "url": format!("{origin}/?token={token}"),
            "read": log,
            "steps": [
                {"wait": shows("connected")},
                {"eval": "document.getElementById('ch').value = 'browser.test'; \
                          document.getElementById('sub').click()"},
                {"wait": shows("\"type\":\"subscribed\"")},
                // The page publishes as a backend does, over HTTPS.
                {"eval": "document.getElementById('data').value = '{\"from\":\"chromium\"}'; \
                          document.getElementById('pub').click()"},
                {"wait": shows("\"from\":\"chromium\"")},
                {"screenshot": screenshot.to_str().unwrap()},
            ],
        },
        {
            "name": "without_token",
            "url": format!("{origin}/"),
            "read": log,
            "steps": [{"wait": shows("closed")}],
        },
    ]);
    let pages = drive(&plan, &spki);
    let with_token = pages["with_token"].as_str().unwrap();
    assert!(with_token.contains("POST /publish: 202"), "{with_token}");
    assert!(
        with_token.contains(
            r#""type":"message","channel":"browser.test","seq":1,"data":{"from":"chromium"}"#
        ),
        "{with_token}"
    );
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot was taken");
    // The relay refused the handshake (401), which a browser reports as a
    // connection that never opened: close 1006.
    let without = pages["without_token"].as_str().unwrap();
    assert!(!without.contains("connected"), "{without}");
    assert!(without.contains("closed 1006"), "{without}");
}

/// Publishes keyed prices to `addr` until `stop` is set, as a feed would:
/// `{"bid":…,"t":<Unix ms>}` under `SYM00`…`SYM19`.
fn price_feed(
    addr: std::net::SocketAddr,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let mut sent = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let unix_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_millis();
                let body = json!({"bid": 100.0 + (sent % 97) as f64 / 10.0, "t": unix_ms as u64});
                let channel = format!("prices?key=SYM{:02}", sent % 20);
                // While a node drains or restarts a publication may fail;
                // the feed goes on.
                let _ = common::http_publish(addr, &channel, &body.to_string(), "").await;
                sent += 1;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            sent
        })
    })
}

#[test]
fn the_dashboard_shows_live_tiles_and_recovers_from_a_drain_without_a_reload() {
    let redis = common::redis::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    // Unused here: the page is plain http, but the driver wants a key.
    let spki = dir.path().join("spki.der");
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(&spki, made.key_pair.public_key_der()).unwrap();

    let url = redis.url();
    let (port_a, port_b) = (common::redis::free_port(), common::redis::free_port());
    let listen_a = format!("127.0.0.1:{port_a}");
    let listen_b = format!("127.0.0.1:{port_b}");
    let advertised_b = format!("ws://127.0.0.1:{port_b}/ws");
    // The feed publishes about 200 messages a second; the default history
    // (100) would cover only the first half second of the move to B, and a
    // loaded machine can take longer than that, so recovery would depend on
    // timing. History for a minute makes it depend only on the relay.
    let common_args = [
        "--workers",
        "2",
        "--redis",
        url.as_str(),
        "--drain-seconds",
        "1",
        "--history-size",
        "12000",
    ];
    let mut args_b = common_args.to_vec();
    args_b.extend_from_slice(&["--listen", &listen_b, "--advertise-url", &advertised_b]);
    let b = Relay::start_as_shipped(&args_b);
    let mut args_a = common_args.to_vec();
    args_a.extend_from_slice(&["--listen", &listen_a]);
    let a = Relay::start_as_shipped(&args_a);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        a.wait_readyz(200).await;
        b.wait_readyz(200).await;
        // A names B in its 1012s once it has read the directory.
        let deadline = std::time::Instant::now() + common::PATIENCE;
        loop {
            let (_, nodes) = common::http(
                a.addr,
                "GET /nodes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            if nodes.contains(&advertised_b) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "A never listed B: {nodes}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feed = price_feed(b.addr, stop.clone());

    let screenshot = dir.path().join("dashboard.png");
    let board = "window.dashboard";
    let plan = json!([{
        "name": "dashboard",
        "url": format!("http://127.0.0.1:{port_a}/"),
        "read": "JSON.stringify({board: window.dashboard, tiles: document.querySelectorAll('.tile').length, \
                 marker: window.loadedOnce, navigations: performance.getEntriesByType('navigation').length, \
                 state: document.getElementById('state').textContent})",
        "steps": [
            {"wait": format!("{board} && {board}.keys >= 20 && {board}.state === 'connected'")},
            {"eval": "window.loadedOnce = 'yes'"},
            {"screenshot": screenshot.to_str().unwrap()},
            // Another window: the page resubscribes with new options.
            {"eval": "const s = document.getElementById('conflate'); s.value = '16'; s.dispatchEvent(new Event('change'))"},
            {"eval": "window.before = window.dashboard.received"},
            {"wait": format!("{board}.received > window.before + 20")},
            {"terminate": a.pid()},
            {"wait": format!("{board}.resumed >= 1 && {board}.recovered === true && {board}.state === 'recovered'")},
            {"eval": "window.after = window.dashboard.received"},
            {"wait": format!("{board}.received > window.after + 20")},
        ],
    }]);
    let pages = drive(&plan, &spki);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let published = feed.join().unwrap();
    let seen: Value = serde_json::from_str(pages["dashboard"].as_str().unwrap()).unwrap();
    assert!(seen["tiles"].as_u64().unwrap() >= 20, "{seen}");
    assert_eq!(seen["marker"], "yes", "the page was not reloaded: {seen}");
    assert_eq!(seen["navigations"], 1, "{seen}");
    assert_eq!(seen["board"]["recovered"], true, "{seen}");
    assert!(published > 0);
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a screenshot was taken");
}
