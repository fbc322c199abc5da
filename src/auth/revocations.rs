//! Tokens an operator revoked, by `sub` or by `jti`, until a time: shared
//! by every shard of the node (read at handshakes, refreshes and when it
//! changes), filled by `POST /revoke` on any node and, behind Redis, by
//! what other nodes revoke. Each change bumps a generation, so shards look
//! at their connections only when there is something new.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

/// What is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Revoked {
    Sub(String),
    Jti(String),
}

impl Revoked {
    /// `sub:<value>` or `jti:<value>`, as it travels and is stored.
    pub fn encode(&self) -> String {
        match self {
            Revoked::Sub(s) => format!("sub:{s}"),
            Revoked::Jti(j) => format!("jti:{j}"),
        }
    }

    pub fn decode(text: &str) -> Option<Revoked> {
        match text.split_once(':')? {
            ("sub", s) => Some(Revoked::Sub(s.to_string())),
            ("jti", j) => Some(Revoked::Jti(j.to_string())),
            _ => None,
        }
    }
}

/// Most revocations a node keeps; beyond, the ones ending soonest go.
const MAX_REVOCATIONS: usize = 1_000_000;

#[derive(Default)]
pub struct Revocations {
    /// Until when (Unix seconds) each is revoked.
    until: RwLock<HashMap<Revoked, u64>>,
    generation: AtomicU64,
}

impl Revocations {
    /// Revokes `what` until `until`; true when that is news.
    pub fn revoke(&self, what: Revoked, until: u64) -> bool {
        let mut map = self.until.write().unwrap_or_else(|e| e.into_inner());
        let known = map.get(&what).is_some_and(|&u| u >= until);
        if known {
            return false;
        }
        if map.len() >= MAX_REVOCATIONS {
            if let Some(soonest) = map.iter().min_by_key(|(_, &u)| u).map(|(k, _)| k.clone()) {
                map.remove(&soonest);
            }
        }
        map.insert(what, until);
        self.generation.fetch_add(1, Ordering::Release);
        true
    }

    /// Whether a token of `sub` with `jti` is revoked at `now`.
    pub fn is_revoked(&self, sub: Option<&str>, jti: Option<&str>, now: u64) -> bool {
        let map = self.until.read().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return false;
        }
        let live = |what: Revoked| map.get(&what).is_some_and(|&until| until > now);
        sub.is_some_and(|s| live(Revoked::Sub(s.to_string())))
            || jti.is_some_and(|j| live(Revoked::Jti(j.to_string())))
    }

    /// Bumped by every revocation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Forgets revocations that ended before `now`.
    pub fn prune(&self, now: u64) {
        let mut map = self.until.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, &mut until| until > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_holds_until_its_end_and_bumps_the_generation() {
        let r = Revocations::default();
        assert!(!r.is_revoked(Some("alice"), None, 10));
        let g = r.generation();
        assert!(r.revoke(Revoked::Sub("alice".into()), 100));
        assert!(r.generation() > g);
        assert!(r.is_revoked(Some("alice"), Some("x"), 10));
        assert!(!r.is_revoked(Some("bob"), None, 10));
        assert!(!r.is_revoked(Some("alice"), None, 100), "ended");
        assert!(
            !r.revoke(Revoked::Sub("alice".into()), 50),
            "already revoked longer"
        );
        assert!(r.revoke(Revoked::Jti("t1".into()), 20));
        assert!(r.is_revoked(None, Some("t1"), 19));
        r.prune(30);
        assert!(!r.is_revoked(None, Some("t1"), 0), "pruned");
        assert!(r.is_revoked(Some("alice"), None, 30));
    }

    #[test]
    fn revocations_travel_as_text() {
        for what in [Revoked::Sub("a:b".into()), Revoked::Jti("j".into())] {
            assert_eq!(Revoked::decode(&what.encode()), Some(what));
        }
        assert_eq!(Revoked::decode("other:x"), None);
    }
}
