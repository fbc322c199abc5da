//! The browser client (`client/ringcast.js`) under Node's test runner,
//! against real relays its tests start from this build's binary, with a
//! Redis this harness starts for the drain test. `tests/run` installs Node
//! and the client's pinned test dependencies (`npm ci` in `client/`).

mod common;

use std::process::Command;

use common::redis::RedisServer;

#[test]
fn the_browser_client_passes_its_tests_against_real_relays() {
    let client = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("client");
    assert!(
        client.join("node_modules/ws").exists(),
        "client/node_modules is missing: run `npm ci` in client/ (tests/run does)"
    );
    let redis = RedisServer::start();
    let output = Command::new("node")
        .args(["--test", "test/client.test.mjs"])
        .current_dir(&client)
        .env("RINGCAST_BIN", env!("CARGO_BIN_EXE_ringcast"))
        .env("REDIS_URL", redis.url())
        .output()
        .expect("running node (tests/run installs it)");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the client's tests failed:\n{report}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(report.contains("# fail 0"), "{report}");
    assert!(!report.contains("# pass 0"), "{report}");
}
