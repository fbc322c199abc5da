//! Tokens and their caps: any text as a JWT, and any JSON as a caps claim.
fn main() {
    let verifier = ringcast::auth::Verifier::new(ringcast::auth::KeySources {
        secrets: vec![b"a fuzzing secret of at least thirty-two bytes"],
        ..Default::default()
    })
    .expect("a valid secret")
    .expect("a key");
    afl::fuzz!(|data: &[u8]| {
        let text = String::from_utf8_lossy(data);
        let _ = verifier.verify(&text, 1_800_000_000);
        if let Ok(claim) = serde_json::from_slice(data) {
            if let Ok(caps) = ringcast::auth::Caps::compile(&claim, Some("user")) {
                let _ = caps.allows("prices.x", ringcast::auth::Capability::Publish);
            }
        }
        let _ = ringcast::auth::Revoked::decode(&text);
    });
}
