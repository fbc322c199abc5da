//! Tokens, without I/O: the keys that sign them ([`Verifier`], built once
//! at start from the `[auth]` section), a token's verification against the
//! time passed in, and what a verified token lets its connection do
//! ([`Grant`], [`Caps`]).
//!
//! Algorithms are pinned per key: an HMAC secret verifies HS256/384/512
//! only, an RSA key RS* and PS* only, an EC key ES256/384, an Ed25519 key
//! EdDSA; `alg: none` and a public key used as an HMAC secret are refused
//! by construction. `exp` is required and checked against the time given;
//! `nbf` and `iat` are honoured with [`CLOCK_SKEW`] of leeway.

mod caps;
mod origins;
mod revocations;

use std::collections::BTreeMap;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

pub use caps::{Capability, Caps};
pub use origins::Origins;
pub use revocations::{Revocations, Revoked};

/// Leeway for `nbf` and `iat` (clocks of the issuer and the relay differ);
/// `exp` is held to the second, since a connection is closed at it.
pub const CLOCK_SKEW: u64 = 30;

/// Why a token is refused; the text is what the client is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required: ?token=... or Authorization: Bearer ...")]
    Missing,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("no configured key verifies this token ({0})")]
    NoKey(String),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token has no exp")]
    NoExpiry,
    #[error("the token's issuer is not accepted")]
    WrongIssuer,
    #[error("the token's audience is not accepted")]
    WrongAudience,
    #[error("the token's caps are invalid: {0}")]
    BadCaps(String),
    #[error("the token has been revoked")]
    Revoked,
}

/// What a verified token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub sub: Option<String>,
    pub jti: Option<String>,
    /// Unix seconds.
    pub exp: u64,
    pub caps: Caps,
}

#[derive(Deserialize)]
struct Claims {
    exp: Option<u64>,
    nbf: Option<u64>,
    iat: Option<u64>,
    sub: Option<String>,
    jti: Option<String>,
    caps: Option<BTreeMap<String, Vec<String>>>,
}

struct Key {
    kid: Option<String>,
    algorithms: Vec<Algorithm>,
    key: DecodingKey,
}

/// The keys tokens are verified with, and the claims they must carry.
pub struct Verifier {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
}

const HMAC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
const RSA: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
];

/// Where the keys come from (the `[auth]` section, files already read).
#[derive(Default)]
pub struct KeySources<'a> {
    pub secrets: Vec<&'a [u8]>,
    /// PEM public keys: (where it came from, for errors; the PEM text).
    pub public_keys: Vec<(&'a str, &'a [u8])>,
    /// A JWKS document: (where it came from; its JSON).
    pub jwks: Option<(&'a str, &'a str)>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl Verifier {
    /// Builds a verifier; `None` when no key is configured (authentication
    /// is off). Errors name the key that cannot be read.
    pub fn new(sources: KeySources<'_>) -> Result<Option<Verifier>, String> {
        let mut keys = Vec::new();
        for secret in sources.secrets {
            if secret.len() < 32 {
                return Err("--jwt-secret must be at least 32 bytes".into());
            }
            keys.push(Key {
                kid: None,
                algorithms: HMAC.to_vec(),
                key: DecodingKey::from_secret(secret).map_err(|e| format!("--jwt-secret: {e}"))?,
            });
        }
        for (origin, pem) in sources.public_keys {
            keys.push(public_key(origin, pem)?);
        }
        if let Some((origin, json)) = sources.jwks {
            let set: JwkSet =
                serde_json::from_str(json).map_err(|e| format!("{origin}: not a JWKS: {e}"))?;
            for jwk in &set.keys {
                let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{origin}: {e}"))?;
                let algorithms = match jwk.common.key_algorithm {
                    Some(alg) => vec![Algorithm::try_from(alg)
                        .map_err(|_| format!("{origin}: a key's alg cannot sign tokens"))?],
                    None => match &jwk.algorithm {
                        AlgorithmParameters::RSA(_) => RSA.to_vec(),
                        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
                            EllipticCurve::P256 => vec![Algorithm::ES256],
                            EllipticCurve::P384 => vec![Algorithm::ES384],
                            _ => return Err(format!("{origin}: unsupported curve")),
                        },
                        AlgorithmParameters::OctetKeyPair(_) => vec![Algorithm::EdDSA],
                        AlgorithmParameters::OctetKey(_) => HMAC.to_vec(),
                        _ => return Err(format!("{origin}: unsupported key type")),
                    },
                };
                keys.push(Key {
                    kid: jwk.common.key_id.clone(),
                    algorithms,
                    key,
                });
            }
        }
        if keys.is_empty() {
            return Ok(None);
        }
        Ok(Some(Verifier {
            keys,
            issuer: sources.issuer,
            audience: sources.audience,
        }))
    }

    /// Verifies `token` at `now` (Unix seconds).
    pub fn verify(&self, token: &str, now: u64) -> Result<Grant, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let candidates = self.keys.iter().filter(|k| {
            k.algorithms.contains(&header.alg)
                && match (&k.kid, &header.kid) {
                    (Some(a), Some(b)) => a == b,
                    _ => true,
                }
        });
        let mut validation = Validation::new(header.alg);
        // Times are checked below, against the time given.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        validation.validate_aud = self.audience.is_some();
        if let Some(aud) = &self.audience {
            validation.set_audience(&[aud]);
            validation.required_spec_claims.insert("aud".into());
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        let mut tried = false;
        let mut claims = None;
        for key in candidates {
            tried = true;
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                Err(e) => match e.kind() {
                    ErrorKind::InvalidSignature => continue,
                    ErrorKind::InvalidIssuer => return Err(AuthError::WrongIssuer),
                    ErrorKind::InvalidAudience => return Err(AuthError::WrongAudience),
                    ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => {
                        return Err(AuthError::WrongIssuer)
                    }
                    ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => {
                        return Err(AuthError::WrongAudience)
                    }
                    _ => return Err(AuthError::Malformed),
                },
            }
        }
        let Some(claims) = claims else {
            return Err(if tried {
                AuthError::BadSignature
            } else {
                AuthError::NoKey(format!("{:?}", header.alg))
            });
        };
        let exp = claims.exp.ok_or(AuthError::NoExpiry)?;
        if now >= exp {
            return Err(AuthError::Expired);
        }
        let future = |t: Option<u64>| t.is_some_and(|t| t > now + CLOCK_SKEW);
        if future(claims.nbf) || future(claims.iat) {
            return Err(AuthError::NotYetValid);
        }
        let caps = match &claims.caps {
            None => Caps::subscribe_only(),
            Some(claim) => Caps::compile(claim, claims.sub.as_deref())?,
        };
        Ok(Grant {
            sub: claims.sub,
            jti: claims.jti,
            exp,
            caps,
        })
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}

/// The verifier in use, replaced whole when the keys are read again
/// (SIGHUP): a handshake or refresh verifies with the keys of the moment,
/// and connections keep what their token granted.
pub struct KeyRing {
    current: std::sync::RwLock<std::sync::Arc<Verifier>>,
}

impl KeyRing {
    pub fn new(verifier: Verifier) -> KeyRing {
        KeyRing {
            current: std::sync::RwLock::new(std::sync::Arc::new(verifier)),
        }
    }

    /// Verifies `token` at `now` with the keys of the moment.
    pub fn verify(&self, token: &str, now: u64) -> Result<Grant, AuthError> {
        let current = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        current.verify(token, now)
    }

    /// Puts `verifier` in use.
    pub fn replace(&self, verifier: Verifier) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(verifier);
    }
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyRing(..)")
    }
}

/// A PEM public key, with the algorithms its type allows.
fn public_key(origin: &str, pem: &[u8]) -> Result<Key, String> {
    let (key, algorithms) = if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        (key, RSA.to_vec())
    } else if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        (key, vec![Algorithm::ES256, Algorithm::ES384])
    } else if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        (key, vec![Algorithm::EdDSA])
    } else {
        return Err(format!(
            "{origin}: not an RSA, EC or Ed25519 public key in PEM"
        ));
    };
    Ok(Key {
        kid: None,
        algorithms,
        key,
    })
}

/// The token of a WebSocket handshake: `?token=` in the request target, or
/// `Authorization: Bearer`.
pub fn token_of<'a>(
    path: &'a str,
    authorization: Option<&'a str>,
) -> Option<std::borrow::Cow<'a, str>> {
    if let Some(query) = path.split_once('?').map(|(_, q)| q) {
        for pair in query.split('&') {
            if let Some(value) = pair.strip_prefix("token=") {
                return Some(percent_encoding::percent_decode_str(value).decode_utf8_lossy());
            }
        }
    }
    let value = authorization?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| std::borrow::Cow::Borrowed(token.trim()))
}

#[cfg(test)]
mod tests;
