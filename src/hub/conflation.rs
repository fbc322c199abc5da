//! Conflation: what a subscription with `conflate_ms` receives, sans-IO.
//!
//! The subscribers of a channel on one shard that asked for the same
//! window form one [`Group`], which throttles for all of them at once, so
//! a publication costs one step per group, not one per subscriber, and a
//! merged message is encoded once per group. A group is quiet or has a
//! window open. A publication reaching a quiet group leaves at once and
//! opens a window of `conflate_ms`; during the window, publications are
//! merged per key (the latest wins, counting how many it replaced); when
//! the window closes, what was merged leaves, in seq order, and opens the
//! next window, or the group goes quiet if nothing was.
//!
//! So each key leaves at most once per window, nothing waits longer than
//! one window, the last value of every key leaves, and seqs only grow on
//! the subscription: a message never overtakes an older one that is still
//! held (which windows per key, each with its own phase, could not
//! promise). A `since` the client takes from the last seq it saw therefore
//! misses nothing.
//!
//! Windows close on one [`Wheel`] per shard, in ticks of
//! [`WHEEL_TICK_MS`], rounded down so that nothing is held longer than its
//! window: the shard sleeps until the wheel's next tick.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;

use slab::Slab;

use super::Conn;
use crate::backplane::Publication;

/// The wheel's resolution: a window of N ms closes between N - 2 and N ms
/// after it opened, and the shard wakes at most every 2 ms while windows
/// are open.
pub const WHEEL_TICK_MS: u64 = 2;

/// Keys an open window holds at most: another key closes it early, so a
/// feed of ever new keys cannot grow a group without bound.
pub const MAX_HELD: usize = 10_000;

/// A subscriber in a group.
pub struct Member {
    pub conn: Rc<Conn>,
    /// The seq its subscribe was answered at: messages the group held from
    /// before are not its to receive.
    pub after: u64,
}

/// What a closing window lets out: publications in seq order, with how
/// many each replaced, and the tick the next window closes at.
pub type Closed = (Vec<(Arc<Publication>, u32)>, Option<u64>);

/// One publication merged in an open window, and how many it replaced.
struct Held {
    publication: Arc<Publication>,
    replaced: u32,
}

/// The conflating subscribers of one channel on one shard with one window.
pub struct Group {
    pub window_ms: u32,
    pub members: Slab<Member>,
    /// The wheel tick the open window closes at; `None` while quiet.
    closes_at: Option<u64>,
    held: HashMap<Option<Arc<str>>, Held>,
}

impl Group {
    pub fn new(window_ms: u32) -> Group {
        Group {
            window_ms,
            members: Slab::new(),
            closes_at: None,
            held: HashMap::new(),
        }
    }

    /// The tick a window opened at `now_ms` closes at: rounded down, so
    /// nothing waits longer than the window, but never the tick it opened
    /// in.
    fn closing_tick(&self, now_ms: u64) -> u64 {
        ((now_ms + u64::from(self.window_ms)) / WHEEL_TICK_MS).max(now_ms / WHEEL_TICK_MS + 1)
    }

    /// A publication for the group at `now_ms`. `None`: it was merged
    /// into the open window. Otherwise what leaves now, in seq order, and
    /// the tick the window now open closes at (to put on the wheel): the
    /// publication itself when the group was quiet; everything held and
    /// then it when the window already holds [`MAX_HELD`] keys and this is
    /// another (the window closes early rather than grow).
    pub fn offer(&mut self, publication: &Arc<Publication>, now_ms: u64) -> Option<Closed> {
        let full = self.held.len() >= MAX_HELD && !self.held.contains_key(&publication.key);
        if self.closes_at.is_some() && full {
            let mut leaving = self.take_held();
            leaving.push((publication.clone(), 0));
            let tick = self.closing_tick(now_ms);
            self.closes_at = Some(tick);
            return Some((leaving, Some(tick)));
        }
        if self.closes_at.is_some() {
            let replaced = match self.held.remove(&publication.key) {
                Some(earlier) => earlier.replaced + 1,
                None => 0,
            };
            let held = Held {
                publication: publication.clone(),
                replaced,
            };
            self.held.insert(publication.key.clone(), held);
            return None;
        }
        let tick = self.closing_tick(now_ms);
        self.closes_at = Some(tick);
        Some((vec![(publication.clone(), 0)], Some(tick)))
    }

    /// Takes what the window holds, in seq order, each with `conflated`
    /// when it replaced any (and how many it replaced).
    fn take_held(&mut self) -> Vec<(Arc<Publication>, u32)> {
        let mut leaving: Vec<Held> = self.held.drain().map(|(_, held)| held).collect();
        leaving.sort_unstable_by_key(|held| held.publication.seq);
        leaving
            .into_iter()
            .map(|held| match held.replaced {
                0 => (held.publication, 0),
                n => (held.publication.with_conflated(n), n),
            })
            .collect()
    }

    /// The wheel reached `tick` at `now_ms`. If this group's window
    /// closes there: what it held, in seq order (each with `conflated`
    /// when it replaced any, and how many it replaced), and the tick the
    /// next window closes at when anything left.
    pub fn close(&mut self, tick: u64, now_ms: u64) -> Option<Closed> {
        if self.closes_at != Some(tick) {
            return None;
        }
        if self.held.is_empty() {
            self.closes_at = None;
            self.held = HashMap::new();
            return Some((Vec::new(), None));
        }
        let leaving = self.take_held();
        let next = self.closing_tick(now_ms);
        self.closes_at = Some(next);
        Some((leaving, Some(next)))
    }

    /// Publications held in the open window.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// The sequenced publications held in the open window after seq
    /// `after`, in seq order (for a member leaving the group).
    pub fn held_after(&self, after: u64) -> Vec<Arc<Publication>> {
        let mut held: Vec<Arc<Publication>> = self
            .held
            .values()
            .filter(|h| h.publication.seq.is_some_and(|s| s > after))
            .map(|h| h.publication.clone())
            .collect();
        held.sort_unstable_by_key(|p| p.seq);
        held
    }
}

/// A group's place: its local channel and its key among the channel's
/// groups.
pub type GroupRef = (u32, u16);

/// When windows close, for every group of a shard. An entry whose group
/// is gone, or whose window was closed since, is skipped when its tick
/// comes ([`Group::close`] checks the tick).
#[derive(Default)]
pub struct Wheel {
    ticks: BTreeMap<u64, Vec<GroupRef>>,
}

impl Wheel {
    /// Puts `group`'s window end at `tick`; true when that is now the
    /// wheel's earliest (the shard's sleep must be shortened).
    pub fn schedule(&mut self, tick: u64, group: GroupRef) -> bool {
        let earliest = self.ticks.first_key_value().is_none_or(|(&t, _)| tick < t);
        self.ticks.entry(tick).or_default().push(group);
        earliest
    }

    /// The earliest tick with windows to close.
    pub fn next_tick(&self) -> Option<u64> {
        self.ticks.first_key_value().map(|(&t, _)| t)
    }

    /// Takes the windows due by `now_ms`, earliest first.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<(u64, GroupRef)> {
        let mut due = Vec::new();
        while let Some(entry) = self.ticks.first_entry() {
            let tick = *entry.key();
            if tick * WHEEL_TICK_MS > now_ms {
                break;
            }
            due.extend(entry.remove().into_iter().map(|group| (tick, group)));
        }
        due
    }

    pub fn is_empty(&self) -> bool {
        self.ticks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Data;

    fn p(seq: u64, key: &str) -> Arc<Publication> {
        let data = Data::from_json_slice(seq.to_string().as_bytes()).unwrap();
        let now = std::time::Instant::now();
        Publication::encode(&"c".into(), Some(seq), Some(key.into()), &data, now)
    }

    fn left(out: &[Arc<Publication>]) -> Vec<(u64, String)> {
        out.iter()
            .map(|p| {
                let event: serde_json::Value = serde_json::from_slice(&p.json).unwrap();
                let conflated = event["conflated"].as_u64().unwrap_or(0);
                (
                    p.seq.unwrap(),
                    format!("{}/{conflated}", event["key"].as_str().unwrap()),
                )
            })
            .collect()
    }

    /// Drives `group` on its own wheel, the clock moving in 1 ms steps:
    /// publication `i` of `publications` arrives at `at[i]` ms. Returns
    /// what left and when.
    fn run(
        window: u32,
        publications: &[(u64, &str, u64)],
        until: u64,
    ) -> Vec<(u64, Vec<(u64, String)>)> {
        let mut group = Group::new(window);
        let mut wheel = Wheel::default();
        let mut out = Vec::new();
        let mut next = 0;
        for now in 0..=until {
            for (tick, _) in wheel.take_due(now) {
                if let Some((leaving, reopened)) = group.close(tick, now) {
                    if !leaving.is_empty() {
                        let leaving: Vec<_> = leaving.into_iter().map(|(p, _)| p).collect();
                        out.push((now, left(&leaving)));
                    }
                    if let Some(t) = reopened {
                        wheel.schedule(t, (0, 0));
                    }
                }
            }
            while next < publications.len() && publications[next].2 == now {
                let (seq, key, _) = publications[next];
                let publication = p(seq, key);
                if let Some((leaving, reopened)) = group.offer(&publication, now) {
                    let leaving: Vec<_> = leaving.into_iter().map(|(p, _)| p).collect();
                    out.push((now, left(&leaving)));
                    wheel.schedule(reopened.expect("a window opens"), (0, 0));
                }
                next += 1;
            }
        }
        out
    }

    #[test]
    fn the_first_leaves_at_once_the_rest_merge_per_key_and_leave_when_the_window_closes() {
        let out = run(
            100,
            &[
                (1, "a", 0),
                (2, "a", 10),
                (3, "b", 20),
                (4, "a", 30),
                (5, "a", 40),
                (6, "c", 150),
                (7, "c", 400),
            ],
            1000,
        );
        assert_eq!(
            out,
            vec![
                (0, vec![(1, "a/0".into())]),
                // a replaced 2 and 4; b replaced nothing; in seq order.
                (100, vec![(3, "b/0".into()), (5, "a/2".into())]),
                // The next window was open: c waits for its end.
                (200, vec![(6, "c/0".into())]),
                // Then a quiet window: the next one leaves at once.
                (400, vec![(7, "c/0".into())]),
            ]
        );
    }

    #[test]
    fn a_window_full_of_keys_closes_early_instead_of_growing() {
        let mut group = Group::new(1000);
        assert!(group.offer(&p(1, "first"), 0).is_some(), "quiet: at once");
        let keys: Vec<String> = (0..MAX_HELD).map(|k| format!("k{k}")).collect();
        for (i, key) in keys.iter().enumerate() {
            assert!(group.offer(&p(i as u64 + 2, key), 1).is_none());
        }
        assert_eq!(group.held(), MAX_HELD);
        let next = MAX_HELD as u64 + 2;
        let (leaving, reopened) = group.offer(&p(next, "one more"), 2).expect("closed early");
        assert_eq!(leaving.len(), MAX_HELD + 1);
        assert!(
            leaving.windows(2).all(|w| w[0].0.seq < w[1].0.seq),
            "in seq order"
        );
        assert_eq!(leaving.last().unwrap().0.seq, Some(next));
        assert_eq!(group.held(), 0);
        assert!(reopened.is_some(), "the next window is open");
    }

    #[test]
    fn nothing_waits_longer_than_the_window_and_seqs_only_grow() {
        // A publication every 3 ms over 20 keys, windows of 16 ms.
        let keys: Vec<String> = (0..20).map(|k| format!("k{k}")).collect();
        let publications: Vec<(u64, &str, u64)> = (0..600u64)
            .map(|i| (i + 1, keys[(i * 7 % 20) as usize].as_str(), i * 3))
            .collect();
        let out = run(16, &publications, 2000);
        let mut last_seq = 0;
        let mut last_of_key: HashMap<String, u64> = HashMap::new();
        for (at, leaving) in &out {
            for (seq, key) in leaving {
                assert!(*seq > last_seq, "seqs only grow: {seq} after {last_seq}");
                last_seq = *seq;
                let arrived = (seq - 1) * 3;
                assert!(at - arrived <= 16, "seq {seq} waited {} ms", at - arrived);
                let key = key.split('/').next().unwrap().to_string();
                if let Some(prev) = last_of_key.insert(key.clone(), *at) {
                    assert!(at - prev >= 16 - WHEEL_TICK_MS, "{key} twice in one window");
                }
            }
        }
        // The last value of every key left.
        for k in 0..20u64 {
            let last = (0..600u64).rev().find(|i| i * 7 % 20 == k).unwrap() + 1;
            assert!(
                out.iter()
                    .any(|(_, l)| l.iter().any(|(seq, _)| *seq == last)),
                "key k{k}'s last, seq {last}"
            );
        }
    }
}
