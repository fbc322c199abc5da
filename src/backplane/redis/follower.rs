//! A channel as its owner shard sees it behind the Redis backplane, as a
//! sans-IO state machine: Redis assigns seqs and keeps the history; the
//! owner turns what arrives (live pub/sub messages, fetched history) into
//! one gap-free, duplicate-free, ordered stream for the node, and answers
//! subscribes with `since` from it.
//!
//! Phases: *Joining* (the node's Redis subscription is not proven live yet),
//! *Fetching* (a snapshot of seq/epoch/history is on its way; live messages
//! wait in a buffer), *Live*. Every fetch is sent only after the
//! subscription is live, so any publication missing from the snapshot
//! arrives live afterwards, and anything live with a seq the snapshot already
//! covered is a duplicate. A seq jump or an epoch change while *Live* sends
//! the channel back to *Fetching* to catch up in order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backplane::broker::ShardSet;
use crate::backplane::broker::{Publication, Replay, Waiter};
use crate::backplane::history::{self, replay_from, History, Limits, Meter};

/// A subscribe waiting for the channel to be live, or for a fetch.
#[derive(Debug)]
struct Waiting {
    waiter: Waiter,
    /// A fetch sent after this waiter arrived asked for its `since`.
    covered: bool,
}

/// What the owner must do after a step of the state machine.
#[derive(Debug)]
pub enum Effect {
    /// Fan out to the interested shards, in this order.
    Deliver(Arc<Publication>),
    /// Answer a waiting subscribe.
    Ack {
        waiter: Waiter,
        seq: u64,
        epoch: Arc<str>,
        replay: Replay,
    },
    /// Ask Redis for the channel's state and the history after `after`,
    /// and the latest value of every key when `latest`.
    Fetch {
        fetch: u64,
        after: Option<u64>,
        epoch: Arc<str>,
        latest: bool,
    },
    /// Sequenced publications were lost for good (count of seqs skipped).
    Gap(u64),
}

/// A snapshot read from Redis.
pub struct Snapshot {
    /// "" when the channel has no state in Redis.
    pub epoch: Arc<str>,
    pub seq: u64,
    /// Decoded entries, oldest first.
    pub entries: Vec<Arc<Publication>>,
    /// The latest value of every key, in seq order, when asked for.
    pub latest: Option<Vec<Arc<Publication>>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Joining,
    Fetching(u64),
    /// The last fetch failed; the next tick tries again.
    Retry,
    Live,
}

/// Live messages held while a fetch is in flight, at most; beyond, the oldest
/// go (sequenced ones come back by the next catch-up).
const MAX_BUFFERED: usize = 16_384;

pub struct RemoteChannel {
    /// "" until the channel's first publication is known.
    pub epoch: Arc<str>,
    /// The seq of the last publication delivered (or of the snapshot).
    pub seq: u64,
    /// Recent publications, seqs consecutive, ending at `seq`.
    pub history: History,
    pub interested: ShardSet,
    /// Names this subscription of the node to the channel, so an answer to
    /// an earlier one is not taken for it.
    pub join: u64,
    limits: Limits,
    phase: Phase,
    /// Set once the first snapshot arrived: later snapshots catch up the
    /// node's subscribers instead of only seeding history.
    delivering: bool,
    /// The latest values kept are every key's, as Redis has them: seeded
    /// by a fetch and kept up by every publication since, none lost.
    latest_complete: bool,
    waiting: Vec<Waiting>,
    buffer: VecDeque<(Option<Arc<str>>, Arc<Publication>)>,
    fetches: u64,
}

impl RemoteChannel {
    pub fn new(join: u64, limits: Limits, meter: std::rc::Rc<Meter>) -> RemoteChannel {
        RemoteChannel {
            epoch: "".into(),
            seq: 0,
            history: History::new(meter),
            interested: 0,
            join,
            limits,
            phase: Phase::Joining,
            delivering: false,
            latest_complete: false,
            waiting: Vec::new(),
            buffer: VecDeque::new(),
            fetches: 0,
        }
    }

    #[cfg(test)]
    fn is_live(&self) -> bool {
        self.phase == Phase::Live
    }

    /// The last fetch failed and [`retry`](Self::retry) would send another.
    pub fn wants_retry(&self) -> bool {
        self.phase == Phase::Retry
    }

    /// A subscribe from shard `waiter.from`.
    pub fn subscribe(&mut self, waiter: Waiter, fx: &mut Vec<Effect>) {
        if self.history.take_latest_lost() {
            // The budget took some: Redis still has them.
            self.latest_complete = false;
        }
        if self.phase != Phase::Live {
            return self.waiting.push(Waiting {
                waiter,
                covered: false,
            });
        }
        let replay = match &waiter.since {
            None => Replay::NotAsked,
            Some((since, epoch)) => {
                let replay = replay_from(
                    &[],
                    &self.history,
                    *since,
                    epoch.as_deref(),
                    &self.epoch,
                    self.seq,
                );
                let older_than_kept = matches!(replay, Replay::NotRecovered)
                    && epoch.as_deref().is_none_or(|e| e == &*self.epoch)
                    && *since < self.seq;
                if older_than_kept && self.limits.size > 0 {
                    // Redis may still hold it.
                    self.waiting.push(Waiting {
                        waiter,
                        covered: false,
                    });
                    return self.start_fetch(fx);
                }
                replay
            }
        };
        let wants_snapshot =
            waiter.snapshot && matches!(replay, Replay::NotAsked | Replay::NotRecovered);
        if wants_snapshot && !self.latest_complete && self.limits.keys > 0 {
            // Redis holds the values this node has not seen.
            self.waiting.push(Waiting {
                waiter,
                covered: false,
            });
            return self.start_fetch(fx);
        }
        let replay = replay.or_snapshot(waiter.snapshot, || self.history.latest_values());
        fx.push(Effect::Ack {
            waiter,
            seq: self.seq,
            epoch: self.epoch.clone(),
            replay,
        });
    }

    /// The node's subscription `join` is live on Redis (first time, or again
    /// after a reconnect): (re)read the state and catch up.
    pub fn joined(&mut self, join: u64, fx: &mut Vec<Effect>) {
        if join == self.join {
            self.start_fetch(fx);
        }
    }

    /// The last fetch failed: try again (from the shard's tick).
    pub fn retry(&mut self, fx: &mut Vec<Effect>) {
        if self.phase == Phase::Retry {
            self.start_fetch(fx);
        }
    }

    fn start_fetch(&mut self, fx: &mut Vec<Effect>) {
        let mut after = self.delivering.then_some(self.seq);
        for w in &mut self.waiting {
            if let Some((since, _)) = w.waiter.since {
                after = Some(after.map_or(since, |a| a.min(since)));
            }
            w.covered = true;
        }
        self.fetches += 1;
        self.phase = Phase::Fetching(self.fetches);
        fx.push(Effect::Fetch {
            fetch: self.fetches,
            after,
            epoch: self.epoch.clone(),
            latest: !self.latest_complete && self.limits.keys > 0,
        });
    }

    /// A live message; `epoch` is None for a raw (unsequenced) one.
    pub fn message(
        &mut self,
        epoch: Option<Arc<str>>,
        publication: Arc<Publication>,
        fx: &mut Vec<Effect>,
    ) {
        match self.phase {
            // The snapshot that ends joining covers everything sequenced so
            // far; raw messages are for subscribers that are not active yet.
            Phase::Joining => {}
            Phase::Fetching(_) | Phase::Retry => {
                if self.buffer.len() == MAX_BUFFERED {
                    self.buffer.pop_front();
                }
                self.buffer.push_back((epoch, publication));
            }
            Phase::Live => {
                let (Some(epoch), Some(seq)) = (epoch.clone(), publication.seq) else {
                    return fx.push(Effect::Deliver(publication));
                };
                let same_epoch = epoch == self.epoch;
                if same_epoch && seq <= self.seq {
                    return;
                }
                let first_ever = self.epoch.is_empty() && self.seq == 0 && seq == 1;
                if (same_epoch && seq == self.seq + 1) || first_ever {
                    self.epoch = epoch;
                    return self.deliver(publication, fx);
                }
                // A jump or another epoch: catch up in order first.
                self.buffer.push_back((Some(epoch), publication));
                self.start_fetch(fx);
            }
        }
    }

    fn deliver(&mut self, publication: Arc<Publication>, fx: &mut Vec<Effect>) {
        let seq = publication
            .seq
            .expect("only sequenced publications are remembered");
        if seq != self.seq + 1 {
            self.history.clear();
        }
        self.seq = seq;
        history::remember(&mut self.history, &publication, self.limits);
        fx.push(Effect::Deliver(publication));
    }

    /// The answer to fetch `fetch`; None when it failed.
    pub fn fetched(&mut self, fetch: u64, snapshot: Option<Snapshot>, fx: &mut Vec<Effect>) {
        if self.phase != Phase::Fetching(fetch) {
            return;
        }
        let Some(snap) = snapshot else {
            self.phase = Phase::Retry;
            return;
        };
        if snap.epoch != self.epoch {
            self.epoch = snap.epoch.clone();
            self.seq = 0;
            self.history.forget_all();
            self.latest_complete = false;
        }
        if let Some(values) = &snap.latest {
            self.history.replace_latest(values, self.limits.keys);
            self.latest_complete = true;
        }
        if self.delivering {
            for p in &snap.entries {
                let seq = p.seq.unwrap_or_default();
                if seq <= self.seq {
                    continue;
                }
                if seq != self.seq + 1 {
                    fx.push(Effect::Gap(seq - self.seq - 1));
                    self.latest_complete &= snap.latest.is_some();
                }
                self.deliver(p.clone(), fx);
            }
            if snap.seq > self.seq {
                fx.push(Effect::Gap(snap.seq - self.seq));
                self.latest_complete &= snap.latest.is_some();
                self.history.clear();
                self.seq = snap.seq;
            }
        } else {
            // First snapshot: the node's subscribers are all waiting, so the
            // entries only seed history (the consecutive run ending at seq).
            self.seq = snap.seq;
            self.history.clear();
            for p in snap.entries.iter().rev() {
                let expected = self.seq - self.history.len() as u64;
                let full = self.history.len() == self.limits.size
                    || self.history.bytes() + history::cost(p) > self.limits.bytes;
                if p.seq != Some(expected) || full {
                    break;
                }
                self.history.push_front(p.clone());
            }
            self.delivering = true;
        }
        // With nothing kept, what the snapshot holds must end at the seq.
        let kept_from = self
            .history
            .front()
            .and_then(|p| p.seq)
            .unwrap_or(self.seq + 1);
        let older: Vec<Arc<Publication>> = snap
            .entries
            .iter()
            .filter(|p| p.seq.is_some_and(|s| s < kept_from))
            .cloned()
            .collect();
        let older = consecutive_run_ending_at(&older, kept_from.saturating_sub(1));
        let mut still_waiting = Vec::new();
        for waiting in std::mem::take(&mut self.waiting) {
            let replay = match &waiting.waiter.since {
                None => Replay::NotAsked,
                Some((since, epoch)) => replay_from(
                    older,
                    &self.history,
                    *since,
                    epoch.as_deref(),
                    &self.epoch,
                    self.seq,
                ),
            };
            let wants_snapshot = waiting.waiter.snapshot
                && matches!(replay, Replay::NotAsked | Replay::NotRecovered)
                && self.limits.keys > 0;
            // A snapshot is never served short: without every latest value
            // the waiter waits for the next fetch, which asks for them.
            let short = wants_snapshot && !self.latest_complete;
            if short || (matches!(replay, Replay::NotRecovered) && !waiting.covered) {
                still_waiting.push(waiting);
                continue;
            }
            let snapshot = waiting.waiter.snapshot;
            let replay = replay.or_snapshot(snapshot, || self.history.latest_values());
            fx.push(Effect::Ack {
                waiter: waiting.waiter,
                seq: self.seq,
                epoch: self.epoch.clone(),
                replay,
            });
        }
        self.phase = Phase::Live;
        self.waiting = still_waiting;
        if !self.waiting.is_empty() {
            return self.start_fetch(fx);
        }
        let buffered = std::mem::take(&mut self.buffer);
        for (epoch, publication) in buffered {
            self.message(epoch, publication, fx);
        }
    }

    /// Forgets history older than `ttl`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        history::expire(&mut self.history, now, ttl);
    }
}

/// The tail of `list` that is consecutive and ends at seq `end` (empty when
/// `end` is not its last seq).
fn consecutive_run_ending_at(list: &[Arc<Publication>], end: u64) -> &[Arc<Publication>] {
    if list.last().and_then(|p| p.seq) != Some(end) {
        return &[];
    }
    let mut start = list.len();
    while start > 0 && list[start - 1].seq == Some(end - (list.len() - start) as u64) {
        start -= 1;
    }
    &list[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(from: usize, token: u32, since: Option<(u64, Option<String>)>) -> Waiter {
        Waiter {
            from,
            token,
            since,
            snapshot: false,
        }
    }

    fn p(seq: u64) -> Arc<Publication> {
        Arc::new(Publication {
            channel: "c".into(),
            seq: Some(seq),
            key: None,
            at: Instant::now(),
            json: Box::new([]),
            msgpack: Box::new([]),
        })
    }

    fn count(size: usize) -> Limits {
        Limits {
            size,
            bytes: usize::MAX,
            keys: 0,
        }
    }

    fn raw() -> Arc<Publication> {
        Arc::new(Publication {
            channel: "c".into(),
            seq: None,
            key: None,
            at: Instant::now(),
            json: Box::new([]),
            msgpack: Box::new([]),
        })
    }

    fn snap(epoch: &str, seq: u64, from: u64) -> Snapshot {
        Snapshot {
            epoch: epoch.into(),
            seq,
            entries: (from..=seq).map(p).collect(),
            latest: None,
        }
    }

    fn delivered(fx: &[Effect]) -> Vec<Option<u64>> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Deliver(p) => Some(p.seq),
                _ => None,
            })
            .collect()
    }

    fn fetch_of(fx: &[Effect]) -> (u64, Option<u64>) {
        fx.iter()
            .find_map(|e| match e {
                Effect::Fetch { fetch, after, .. } => Some((*fetch, *after)),
                _ => None,
            })
            .expect("a fetch")
    }

    fn acks(fx: Vec<Effect>) -> Vec<(u32, u64, Option<Vec<u64>>)> {
        fx.into_iter()
            .filter_map(|e| match e {
                Effect::Ack {
                    waiter,
                    seq,
                    replay,
                    ..
                } => Some((
                    waiter.token,
                    seq,
                    match replay {
                        Replay::Recovered(v) => Some(v.iter().map(|p| p.seq.unwrap()).collect()),
                        _ => None,
                    },
                )),
                _ => None,
            })
            .collect()
    }

    /// A channel joined and live at seq 10 of epoch "e" (history 5).
    fn live() -> RemoteChannel {
        let mut ch = RemoteChannel::new(1, count(5), Default::default());
        let mut fx = Vec::new();
        ch.subscribe(waiter(0, 1, None), &mut fx);
        ch.joined(1, &mut fx);
        let (fetch, after) = fetch_of(&fx);
        assert_eq!(after, None);
        fx.clear();
        ch.fetched(fetch, Some(snap("e", 10, 6)), &mut fx);
        assert_eq!(acks(fx), vec![(1, 10, None)]);
        assert!(ch.is_live());
        ch
    }

    #[test]
    fn join_acks_waiters_with_replay_from_the_snapshot() {
        let mut ch = RemoteChannel::new(7, count(100), Default::default());
        let mut fx = Vec::new();
        ch.subscribe(waiter(0, 1, Some((3, None))), &mut fx);
        ch.subscribe(waiter(1, 2, Some((9, Some("other".into())))), &mut fx);
        ch.joined(6, &mut fx);
        assert!(fx.is_empty(), "an older join is ignored");
        ch.joined(7, &mut fx);
        let (fetch, after) = fetch_of(&fx);
        assert_eq!(after, Some(3));
        fx.clear();
        // A live message that the snapshot also holds, and one after it.
        ch.message(Some("e".into()), p(5), &mut fx);
        ch.message(Some("e".into()), p(6), &mut fx);
        assert!(fx.is_empty(), "buffered while fetching");
        ch.fetched(fetch, Some(snap("e", 5, 4)), &mut fx);
        let delivered = delivered(&fx);
        assert_eq!(
            acks(fx),
            vec![(1, 5, Some(vec![4, 5])), (2, 5, None)],
            "since 3 gets 4..5; another epoch is not recovered"
        );
        assert_eq!(delivered, vec![Some(6)], "5 was a duplicate");
        assert_eq!(ch.seq, 6);
    }

    #[test]
    fn live_messages_in_order_duplicates_dropped_raw_passed() {
        let mut ch = live();
        let mut fx = Vec::new();
        ch.message(Some("e".into()), p(11), &mut fx);
        ch.message(Some("e".into()), p(11), &mut fx);
        ch.message(None, raw(), &mut fx);
        ch.message(Some("e".into()), p(12), &mut fx);
        assert_eq!(delivered(&fx), vec![Some(11), None, Some(12)]);
        assert_eq!(ch.history.len(), 5);
    }

    #[test]
    fn a_seq_jump_catches_up_from_history_in_order() {
        let mut ch = live();
        let mut fx = Vec::new();
        ch.message(Some("e".into()), p(14), &mut fx);
        let (fetch, after) = fetch_of(&fx);
        assert_eq!(after, Some(10));
        fx.clear();
        ch.message(None, raw(), &mut fx);
        ch.message(Some("e".into()), p(15), &mut fx);
        ch.fetched(fetch, Some(snap("e", 14, 11)), &mut fx);
        assert_eq!(
            delivered(&fx),
            vec![Some(11), Some(12), Some(13), Some(14), None, Some(15)]
        );
        assert!(!fx.iter().any(|e| matches!(e, Effect::Gap(_))));
    }

    #[test]
    fn history_lost_beyond_reach_is_a_counted_gap() {
        let mut ch = live();
        let mut fx = Vec::new();
        ch.message(Some("e".into()), p(30), &mut fx);
        let (fetch, _) = fetch_of(&fx);
        fx.clear();
        ch.fetched(fetch, Some(snap("e", 30, 26)), &mut fx);
        assert!(fx.iter().any(|e| matches!(e, Effect::Gap(15))));
        assert_eq!(
            delivered(&fx),
            vec![Some(26), Some(27), Some(28), Some(29), Some(30)]
        );
    }

    #[test]
    fn a_new_epoch_restarts_delivery_from_its_history() {
        let mut ch = live();
        let mut fx = Vec::new();
        ch.message(Some("f".into()), p(2), &mut fx);
        let (fetch, _) = fetch_of(&fx);
        fx.clear();
        ch.fetched(fetch, Some(snap("f", 2, 1)), &mut fx);
        assert_eq!(delivered(&fx), vec![Some(1), Some(2)]);
        assert_eq!(&*ch.epoch, "f");
    }

    #[test]
    fn since_older_than_kept_history_is_fetched_and_merged() {
        let mut ch = live();
        let mut fx = Vec::new();
        ch.subscribe(waiter(1, 9, Some((8, Some("e".into())))), &mut fx);
        assert_eq!(
            acks(std::mem::take(&mut fx)),
            vec![(9, 10, Some(vec![9, 10]))]
        );
        ch.subscribe(waiter(1, 10, Some((2, None))), &mut fx);
        let (fetch, after) = fetch_of(&fx);
        assert_eq!(after, Some(2));
        fx.clear();
        ch.message(Some("e".into()), p(11), &mut fx);
        // Redis trimmed nothing older than 3: 3..10 come from the snapshot.
        ch.fetched(fetch, Some(snap("e", 10, 3)), &mut fx);
        let d = delivered(&fx);
        assert_eq!(
            acks(fx),
            vec![(10, 10, Some((3..=10).collect()))],
            "acked at 10, then 11 live"
        );
        assert_eq!(d, vec![Some(11)]);
    }

    #[test]
    fn since_beyond_redis_history_is_not_recovered_after_one_fetch() {
        let mut ch = live();
        let mut fx = Vec::new();
        ch.subscribe(waiter(1, 3, Some((1, None))), &mut fx);
        let (fetch, _) = fetch_of(&fx);
        fx.clear();
        ch.fetched(fetch, Some(snap("e", 10, 6)), &mut fx);
        assert_eq!(acks(fx), vec![(3, 10, None)]);
    }

    #[test]
    fn a_failed_fetch_is_retried_and_a_stale_answer_ignored() {
        let mut ch = RemoteChannel::new(1, count(5), Default::default());
        let mut fx = Vec::new();
        ch.joined(1, &mut fx);
        let (first, _) = fetch_of(&fx);
        fx.clear();
        ch.fetched(first, None, &mut fx);
        ch.retry(&mut fx);
        let (second, _) = fetch_of(&fx);
        assert_ne!(first, second);
        fx.clear();
        ch.fetched(first, Some(snap("e", 1, 1)), &mut fx);
        assert!(!ch.is_live());
        ch.fetched(second, Some(snap("", 0, 1)), &mut fx);
        assert!(ch.is_live());
        ch.message(Some("e".into()), p(1), &mut fx);
        assert_eq!(delivered(&fx), vec![Some(1)], "first publication ever");
    }
}
