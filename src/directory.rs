//! The node directory: which nodes of the relay clients may connect to, and
//! how loaded each is. A node started with `--advertise-url` announces
//! itself (its URL, open connections, `--max-connections`, whether it is
//! draining); behind Redis every node reads every announcement once per
//! probe interval, so any node answers `GET /nodes` from memory and names
//! another node in the reason of the 1012 it closes with when it drains.
//!
//! This file holds the table and the choices made from it; the Redis
//! thread (`backplane::redis::link`) reads and writes Redis, and `http`
//! answers the route. Announcements expire by themselves: a node that dies
//! drops out of every listing within a few probe intervals.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One node as it announces itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Where clients connect (`wss://node3.example.com/ws`).
    pub url: String,
    /// Open WebSocket connections.
    pub connections: u64,
    /// Its `--max-connections`.
    pub max_connections: u64,
    /// Closing its clients: listed nowhere, suggested to nobody.
    pub draining: bool,
}

impl Entry {
    /// Open connections as a share of what the node takes.
    pub fn load(&self) -> f64 {
        self.connections as f64 / self.max_connections.max(1) as f64
    }
}

/// The longest close reason RFC 6455 allows (125 bytes of payload, less
/// the status code).
const MAX_CLOSE_REASON: usize = 123;

/// What a 1012 says when no other node can be named.
pub const DRAINING_REASON: &str = "server restarting";

/// The nodes this node knows of, itself apart.
pub struct Directory {
    /// `--advertise-url`: this node announces itself under it.
    advertised: Option<String>,
    /// The other nodes' latest announcements (not expired, as Redis last
    /// said).
    others: Mutex<Vec<Entry>>,
}

impl Directory {
    pub fn new(advertised: Option<String>) -> Directory {
        Directory {
            advertised,
            others: Mutex::new(Vec::new()),
        }
    }

    pub fn advertised(&self) -> Option<&str> {
        self.advertised.as_deref()
    }

    /// This node's announcement, if it makes one.
    pub fn own_entry(
        &self,
        connections: usize,
        max_connections: usize,
        draining: bool,
    ) -> Option<Entry> {
        Some(Entry {
            url: self.advertised.clone()?,
            connections: connections as u64,
            max_connections: max_connections as u64,
            draining,
        })
    }

    /// Replaces what is known of the other nodes with `entries` (every live
    /// announcement; this node's own is left out by its URL).
    pub fn update(&self, mut entries: Vec<Entry>) {
        entries.retain(|e| Some(e.url.as_str()) != self.advertised.as_deref());
        entries.sort_by(|a, b| a.url.cmp(&b.url));
        entries.dedup_by(|a, b| a.url == b.url);
        *self.others.lock().unwrap_or_else(|e| e.into_inner()) = entries;
    }

    /// The nodes clients may connect to now: the others not draining, and
    /// this one (`own`) unless it drains, by URL.
    pub fn listing(&self, own: Option<Entry>) -> Vec<Entry> {
        let others = self.others.lock().unwrap_or_else(|e| e.into_inner());
        let mut nodes: Vec<Entry> = others.iter().filter(|e| !e.draining).cloned().collect();
        nodes.extend(own.filter(|e| !e.draining));
        nodes.sort_by(|a, b| a.url.cmp(&b.url));
        nodes
    }

    /// Another node for a client to go to, by the power of two choices:
    /// of two nodes drawn at random, the less loaded; `pick(n)` draws an
    /// index below `n`.
    pub fn suggest(&self, mut pick: impl FnMut(usize) -> usize) -> Option<String> {
        let others = self.others.lock().unwrap_or_else(|e| e.into_inner());
        let open: Vec<&Entry> = others.iter().filter(|e| !e.draining).collect();
        match open.len() {
            0 => None,
            1 => Some(open[0].url.clone()),
            n => {
                let first = open[pick(n)];
                let second = open[pick(n)];
                let chosen = if second.load() < first.load() {
                    second
                } else {
                    first
                };
                Some(chosen.url.clone())
            }
        }
    }

    /// The reason of a draining node's 1012: `reconnect to <url>` naming
    /// another node, or [`DRAINING_REASON`] when there is none (or its URL
    /// does not fit a close frame).
    pub fn drain_reason(&self, pick: impl FnMut(usize) -> usize) -> String {
        match self.suggest(pick) {
            Some(url) if RECONNECT_TO.len() + url.len() <= MAX_CLOSE_REASON => {
                format!("{RECONNECT_TO}{url}")
            }
            _ => DRAINING_REASON.to_string(),
        }
    }
}

/// How a 1012's reason names the node to go to.
pub const RECONNECT_TO: &str = "reconnect to ";

/// The JSON of `GET /nodes`.
pub fn listing_json(nodes: &[Entry]) -> String {
    #[derive(Serialize)]
    struct Listed<'a> {
        url: &'a str,
        connections: u64,
        max_connections: u64,
        load: f64,
    }
    #[derive(Serialize)]
    struct Listing<'a> {
        nodes: Vec<Listed<'a>>,
    }
    let listing = Listing {
        nodes: nodes
            .iter()
            .map(|e| Listed {
                url: &e.url,
                connections: e.connections,
                max_connections: e.max_connections,
                load: (e.load() * 10_000.0).round() / 10_000.0,
            })
            .collect(),
    };
    serde_json::to_string(&listing).unwrap_or_else(|_| r#"{"nodes":[]}"#.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(url: &str, connections: u64, draining: bool) -> Entry {
        Entry {
            url: url.into(),
            connections,
            max_connections: 1000,
            draining,
        }
    }

    #[test]
    fn the_listing_holds_the_live_nodes_not_draining_this_one_included() {
        let d = Directory::new(Some("ws://a/ws".into()));
        d.update(vec![
            entry("ws://c/ws", 5, false),
            entry("ws://a/ws", 999, false),
            entry("ws://b/ws", 1, true),
        ]);
        let own = d.own_entry(7, 1000, false);
        let urls: Vec<_> = d
            .listing(own)
            .into_iter()
            .map(|e| (e.url, e.connections))
            .collect();
        assert_eq!(urls, vec![("ws://a/ws".into(), 7), ("ws://c/ws".into(), 5)]);
        assert!(d
            .listing(d.own_entry(7, 1000, true))
            .iter()
            .all(|e| e.url != "ws://a/ws"));
        let unadvertised = Directory::new(None);
        assert_eq!(unadvertised.own_entry(1, 1, false), None);
    }

    #[test]
    fn two_choices_take_the_less_loaded_and_never_a_draining_node() {
        let d = Directory::new(Some("ws://self/ws".into()));
        assert_eq!(d.suggest(|_| 0), None);
        assert_eq!(d.drain_reason(|_| 0), DRAINING_REASON);
        d.update(vec![
            entry("ws://busy/ws", 900, false),
            entry("ws://idle/ws", 10, false),
            entry("ws://gone/ws", 0, true),
        ]);
        // Sorted by URL: busy (0), idle (1); the draining one is not drawn.
        let mut draws = [0, 1].into_iter();
        assert_eq!(
            d.suggest(|n| {
                assert_eq!(n, 2);
                draws.next().unwrap()
            }),
            Some("ws://idle/ws".into())
        );
        assert_eq!(d.suggest(|_| 0), Some("ws://busy/ws".into()));
        assert_eq!(d.drain_reason(|_| 1), "reconnect to ws://idle/ws");
    }

    #[test]
    fn a_url_too_long_for_a_close_frame_is_not_named() {
        let d = Directory::new(None);
        let long = format!("wss://{}.example.com/ws", "n".repeat(120));
        d.update(vec![entry(&long, 0, false)]);
        assert_eq!(d.suggest(|_| 0), Some(long));
        assert_eq!(d.drain_reason(|_| 0), DRAINING_REASON);
    }

    #[test]
    fn the_listing_json_names_url_and_load() {
        let json = listing_json(&[entry("ws://a/ws", 250, false)]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"nodes": [{"url": "ws://a/ws", "connections": 250,
                "max_connections": 1000, "load": 0.25}]})
        );
    }
}
