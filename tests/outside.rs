//! The relay driven by clients it did not write: Python `requests` and
//! `websockets` (tests/outside/acceptance.py), installed by tests/run into
//! target/outside-venv.

mod common;

use common::Relay;

#[test]
fn python_clients_see_the_documented_protocol() {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/outside-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run tests/run, which installs the Python clients \
         (tests/outside/requirements.txt)",
        python.display()
    );
    let relay = Relay::start(&["--workers", "2"]);
    let out = std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/outside/acceptance.py"
        ))
        .arg(format!("http://{}", relay.addr))
        .output()
        .expect("running the Python acceptance script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("acceptance: ok"), "{stdout}{stderr}");
}
