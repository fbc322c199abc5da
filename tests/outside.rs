//! The relay driven by clients it did not write: Python `requests` and
//! `websockets` (tests/outside/acceptance.py), installed by tests/run into
//! target/outside-venv; over plain TCP and over TLS.

mod common;

use common::Relay;

/// Runs the acceptance script against `base`, trusting `ca` over TLS.
fn acceptance(base: &str, ca: Option<&std::path::Path>) {
    let mut command = std::process::Command::new(common::outside_python());
    command
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/outside/acceptance.py"
        ))
        .arg(base);
    if let Some(ca) = ca {
        command.arg(ca);
    }
    let out = command
        .output()
        .expect("running the Python acceptance script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("acceptance: ok"), "{stdout}{stderr}");
}

#[test]
fn python_clients_see_the_documented_protocol() {
    let relay = Relay::start(&["--workers", "2"]);
    acceptance(&format!("http://{}", relay.addr), None);
}

#[test]
fn python_clients_see_the_same_protocol_over_tls() {
    // A certificate of the test's own, trusted by the Python clients only.
    let dir = tempfile::tempdir().unwrap();
    common::self_signed_certificate(dir.path(), "outside");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    let relay = Relay::start(&[
        "--workers",
        "2",
        "--metrics-addr",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    acceptance(&format!("https://{}", relay.addr), Some(&cert));
}
