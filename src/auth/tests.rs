//! Verification of every kind of key and every refusal, at a given time.

use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};

use super::*;

const SECRET: &[u8] = b"a secret of at least thirty-two bytes!";
const NOW: u64 = 1_800_000_000;

fn rsa_pub() -> &'static [u8] {
    include_bytes!("../../tests/keys/rsa.pub")
}

fn hs(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap()
}

fn signed(alg: Algorithm, key: &EncodingKey, claims: Value) -> String {
    encode(&Header::new(alg), &claims, key).unwrap()
}

fn verifier(sources: KeySources<'_>) -> Verifier {
    Verifier::new(sources)
        .unwrap()
        .expect("a key is configured")
}

fn with_secret() -> Verifier {
    verifier(KeySources {
        secrets: vec![SECRET],
        ..KeySources::default()
    })
}

#[test]
fn no_key_means_no_authentication() {
    assert!(Verifier::new(KeySources::default()).unwrap().is_none());
    let short = KeySources {
        secrets: vec![b"short"],
        ..KeySources::default()
    };
    assert!(Verifier::new(short).is_err(), "a short secret is refused");
}

#[test]
fn an_hmac_token_grants_its_sub_and_caps() {
    let token = hs(json!({"sub": "alice", "exp": NOW + 60, "jti": "t1",
        "caps": {"chat.{sub}": ["*"]}}));
    let grant = with_secret().verify(&token, NOW).unwrap();
    assert_eq!(grant.sub.as_deref(), Some("alice"));
    assert_eq!(grant.jti.as_deref(), Some("t1"));
    assert_eq!(grant.exp, NOW + 60);
    assert!(grant.caps.allows("chat.alice", Capability::Publish));
    assert!(!grant.caps.allows("chat.bob", Capability::Subscribe));
}

#[test]
fn every_refusal_has_its_reason() {
    let v = with_secret();
    let cases = [
        (hs(json!({"exp": NOW})), AuthError::Expired),
        (hs(json!({"sub": "a"})), AuthError::NoExpiry),
        (
            hs(json!({"exp": NOW + 60, "nbf": NOW + 31})),
            AuthError::NotYetValid,
        ),
        (
            hs(json!({"exp": NOW + 60, "iat": NOW + 300})),
            AuthError::NotYetValid,
        ),
        (
            encode(
                &Header::new(Algorithm::HS256),
                &json!({"exp": NOW + 60}),
                &EncodingKey::from_secret(b"another secret of thirty-two bytes!!").unwrap(),
            )
            .unwrap(),
            AuthError::BadSignature,
        ),
        ("not.a.token".to_string(), AuthError::Malformed),
        ("garbage".to_string(), AuthError::Malformed),
        (
            hs(json!({"exp": NOW + 60, "caps": {"x": ["read"]}})),
            AuthError::BadCaps("unknown action `read` (use subscribe, publish or *)".into()),
        ),
    ];
    for (token, want) in cases {
        assert_eq!(v.verify(&token, NOW), Err(want.clone()), "{want}");
    }
    // nbf within the clock skew is accepted.
    assert!(v
        .verify(&hs(json!({"exp": NOW + 60, "nbf": NOW + 30})), NOW)
        .is_ok());
}

#[test]
fn alg_none_and_a_public_key_as_hmac_secret_are_refused() {
    let v = verifier(KeySources {
        public_keys: vec![("rsa.pub", rsa_pub())],
        ..KeySources::default()
    });
    // An HS256 token signed with the RSA public key's bytes: the classic
    // confusion attack. The RSA key verifies RS*/PS* only.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &json!({"exp": NOW + 60}),
        &EncodingKey::from_secret(rsa_pub()).unwrap(),
    )
    .unwrap();
    assert!(matches!(v.verify(&confused, NOW), Err(AuthError::NoKey(_))));
    // alg: none, unsigned.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(format!(r#"{{"exp":{}}}"#, NOW + 60))
    );
    assert!(v.verify(&none, NOW).is_err());
}

#[test]
fn rsa_ec_and_ed25519_public_keys_verify_their_own_tokens() {
    let v = verifier(KeySources {
        public_keys: vec![
            ("rsa.pub", rsa_pub()),
            ("ec.pub", include_bytes!("../../tests/keys/ec.pub")),
            ("ed.pub", include_bytes!("../../tests/keys/ed.pub")),
        ],
        ..KeySources::default()
    });
    let claims = json!({"sub": "s", "exp": NOW + 60});
    let rsa = EncodingKey::from_rsa_pem(include_bytes!("../../tests/keys/rsa.key")).unwrap();
    let ec = EncodingKey::from_ec_pem(include_bytes!("../../tests/keys/ec.key")).unwrap();
    let ed = EncodingKey::from_ed_pem(include_bytes!("../../tests/keys/ed.key")).unwrap();
    for (alg, key) in [
        (Algorithm::RS256, &rsa),
        (Algorithm::PS256, &rsa),
        (Algorithm::ES256, &ec),
        (Algorithm::EdDSA, &ed),
    ] {
        let token = signed(alg, key, claims.clone());
        assert!(v.verify(&token, NOW).is_ok(), "{alg:?}");
    }
}

#[test]
fn issuer_and_audience_are_required_when_configured() {
    let v = verifier(KeySources {
        secrets: vec![SECRET],
        issuer: Some("https://id.example.com".into()),
        audience: Some("ringcast".into()),
        ..KeySources::default()
    });
    let good = hs(json!({"exp": NOW + 60, "iss": "https://id.example.com", "aud": "ringcast"}));
    assert!(v.verify(&good, NOW).is_ok());
    let cases = [
        (
            json!({"exp": NOW + 60, "aud": "ringcast"}),
            AuthError::WrongIssuer,
        ),
        (
            json!({"exp": NOW + 60, "iss": "https://evil", "aud": "ringcast"}),
            AuthError::WrongIssuer,
        ),
        (
            json!({"exp": NOW + 60, "iss": "https://id.example.com"}),
            AuthError::WrongAudience,
        ),
        (
            json!({"exp": NOW + 60, "iss": "https://id.example.com", "aud": "x"}),
            AuthError::WrongAudience,
        ),
    ];
    for (claims, want) in cases {
        assert_eq!(v.verify(&hs(claims), NOW), Err(want.clone()), "{want}");
    }
}

#[test]
fn a_jwks_key_is_chosen_by_kid() {
    let jwks = json!({"keys": [
        {"kty": "oct", "kid": "one", "alg": "HS256", "k": base64_url(b"first secret of thirty-two bytes!!!")},
        {"kty": "oct", "kid": "two", "alg": "HS256", "k": base64_url(SECRET)},
    ]})
    .to_string();
    let v = verifier(KeySources {
        jwks: Some(("jwks.json", &jwks)),
        ..KeySources::default()
    });
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("two".into());
    let token = encode(
        &header,
        &json!({"exp": NOW + 60}),
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap();
    assert!(v.verify(&token, NOW).is_ok());
    header.kid = Some("three".into());
    let unknown = encode(
        &header,
        &json!({"exp": NOW + 60}),
        &EncodingKey::from_secret(SECRET).unwrap(),
    )
    .unwrap();
    assert!(matches!(v.verify(&unknown, NOW), Err(AuthError::NoKey(_))));
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[test]
fn the_token_is_taken_from_the_query_or_the_bearer_header() {
    assert_eq!(
        token_of("/ws?a=1&token=x%2Ey", None).as_deref(),
        Some("x.y")
    );
    assert_eq!(token_of("/ws", Some("Bearer abc")).as_deref(), Some("abc"));
    assert_eq!(
        token_of("/ws", Some("bearer  abc ")).as_deref(),
        Some("abc")
    );
    assert_eq!(token_of("/ws", Some("Basic abc")), None);
    assert_eq!(token_of("/ws?tokens=1", None), None);
}
