//! A channel as its owner shard sees it: the seq counter, the epoch, the
//! bounded history that `since` recovery replays, and which shards want it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backplane::{Publication, Replay};

/// Shards are numbered below 128 (checked at start), one bit each.
pub type ShardSet = u128;

pub fn shards_in(mut set: ShardSet) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (set != 0).then(|| {
            let shard = set.trailing_zeros() as usize;
            set &= set - 1;
            shard
        })
    })
}

pub struct OwnedChannel {
    /// The seq of the last publication (0: none yet).
    pub seq: u64,
    /// Names this incarnation of the channel: a channel forgotten and
    /// created again restarts at seq 1 under a new epoch.
    pub epoch: Arc<str>,
    /// The newest publications, oldest first, seqs consecutive.
    pub history: VecDeque<Arc<Publication>>,
    /// Shards with at least one subscriber.
    pub interested: ShardSet,
}

impl OwnedChannel {
    pub fn new(epoch: Arc<str>) -> Self {
        OwnedChannel {
            seq: 0,
            epoch,
            history: VecDeque::new(),
            interested: 0,
        }
    }

    pub fn remember(&mut self, publication: &Arc<Publication>, history_size: usize) {
        remember(&mut self.history, publication, history_size);
    }

    /// Forgets publications older than `ttl`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        expire(&mut self.history, now, ttl);
    }

    /// What a subscriber that last saw `since` (in `epoch`) missed, if
    /// history still holds all of it.
    pub fn replay_after(&self, since: u64, epoch: Option<&str>) -> Replay {
        replay_from(&[], &self.history, since, epoch, &self.epoch, self.seq)
    }
}

/// Appends to a bounded history, dropping the oldest past `history_size`.
pub fn remember(
    history: &mut VecDeque<Arc<Publication>>,
    publication: &Arc<Publication>,
    history_size: usize,
) {
    if history_size == 0 {
        return;
    }
    if history.len() >= history_size {
        history.pop_front();
    }
    history.push_back(publication.clone());
}

/// Forgets publications older than `ttl` (and the buffer, once empty: idle
/// channels are many).
pub fn expire(history: &mut VecDeque<Arc<Publication>>, now: Instant, ttl: Duration) {
    while history
        .front()
        .is_some_and(|p| now.saturating_duration_since(p.at) > ttl)
    {
        history.pop_front();
    }
    if history.is_empty() && history.capacity() > 0 {
        *history = VecDeque::new();
    }
}

/// What a subscriber that last saw `since` (in `epoch`) missed, from kept
/// publications `older` followed by `recent` (together consecutive, ending
/// at `seq` of epoch `current`), if they hold all of it.
pub fn replay_from(
    older: &[Arc<Publication>],
    recent: &VecDeque<Arc<Publication>>,
    since: u64,
    epoch: Option<&str>,
    current: &str,
    seq: u64,
) -> Replay {
    if epoch.is_some_and(|e| e != current) || since > seq {
        return Replay::NotRecovered;
    }
    if since == seq {
        return Replay::Recovered(Vec::new());
    }
    let kept = older.iter().chain(recent.iter());
    let first = older.first().or(recent.front()).and_then(|p| p.seq);
    let last = recent.back().or(older.last()).and_then(|p| p.seq);
    match (first, last) {
        (Some(first), Some(last)) if first <= since + 1 && last == seq => Replay::Recovered(
            kept.filter(|p| p.seq.is_some_and(|s| s > since))
                .cloned()
                .collect(),
        ),
        _ => Replay::NotRecovered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publication(seq: u64, at: Instant) -> Arc<Publication> {
        Arc::new(Publication {
            channel: "c".into(),
            seq: Some(seq),
            at,
            json: Box::new([]),
            msgpack: Box::new([]),
        })
    }

    fn seqs(r: Replay) -> Option<Vec<u64>> {
        match r {
            Replay::Recovered(v) => Some(v.iter().map(|p| p.seq.unwrap()).collect()),
            _ => None,
        }
    }

    #[test]
    fn shards_in_lists_the_set_bits() {
        let set: ShardSet = 1 | 1 << 5 | 1 << 127;
        assert_eq!(shards_in(set).collect::<Vec<_>>(), vec![0, 5, 127]);
        assert_eq!(shards_in(0).count(), 0);
    }

    #[test]
    fn replays_exactly_what_was_missed_while_in_history() {
        let mut ch = OwnedChannel::new("e".into());
        let now = Instant::now();
        for s in 1..=10 {
            ch.seq = s;
            ch.remember(&publication(s, now), 5);
        }
        assert_eq!(seqs(ch.replay_after(7, Some("e"))), Some(vec![8, 9, 10]));
        assert_eq!(seqs(ch.replay_after(5, None)), Some(vec![6, 7, 8, 9, 10]));
        assert_eq!(seqs(ch.replay_after(10, None)), Some(vec![]));
        assert!(
            seqs(ch.replay_after(4, None)).is_none(),
            "6 is the oldest kept"
        );
        assert!(seqs(ch.replay_after(11, None)).is_none(), "from the future");
        assert!(
            seqs(ch.replay_after(8, Some("other"))).is_none(),
            "other epoch"
        );
    }

    #[test]
    fn expiry_drops_old_messages_and_breaks_recovery() {
        let mut ch = OwnedChannel::new("e".into());
        let t0 = Instant::now();
        ch.seq = 2;
        ch.remember(&publication(1, t0), 10);
        ch.remember(&publication(2, t0 + Duration::from_secs(10)), 10);
        ch.expire(t0 + Duration::from_secs(12), Duration::from_secs(5));
        assert_eq!(ch.history.len(), 1);
        assert!(seqs(ch.replay_after(0, None)).is_none());
        assert_eq!(seqs(ch.replay_after(1, None)), Some(vec![2]));
    }
}
