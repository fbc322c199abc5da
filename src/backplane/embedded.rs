//! The embedded broker: the backplane of a node that is the whole relay.
//! Each channel is owned by one shard ([`owner_of`]), which gives its
//! publications their seqs, keeps its history and knows which shards want
//! it. A publication made on another shard is forwarded to the owner over
//! the mesh; the owner answers the publisher's shard with the seq.
//!
//! Epochs: a channel forgotten (no subscriber, no history) and created
//! again restarts at seq 1 under a new epoch, unique to this process (the
//! node's nonce), shard and incarnation.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::broker::{
    Broker, BrokerEvent, Effect, Forwarded, Holdings, Publication, Replay, ShardSet, Waiter,
};
use super::history::{self, History, Keeper, Limits, Meter};
use super::mesh::owner_of;
use crate::config::HistoryOptions;
use crate::protocol::Data;

pub struct OwnedChannel {
    /// The seq of the last publication (0: none yet).
    pub seq: u64,
    /// Numbers this incarnation of the channel on its shard: a channel
    /// forgotten and created again restarts at seq 1 under a new epoch,
    /// the name the shard makes of this number (kept as a number: a
    /// string per channel would cost more than the rest of its state).
    pub incarnation: u64,
    /// The newest publications, oldest first, seqs consecutive.
    pub history: History,
    /// Shards with at least one subscriber.
    pub interested: ShardSet,
}

impl OwnedChannel {
    pub fn new(incarnation: u64, meter: Rc<Meter>) -> Self {
        OwnedChannel {
            seq: 0,
            incarnation,
            history: History::new(meter),
            interested: 0,
        }
    }

    pub fn remember(&mut self, publication: &Arc<Publication>, limits: Limits) {
        history::remember(&mut self.history, publication, limits);
    }

    /// Forgets publications older than `ttl`.
    pub fn expire(&mut self, now: Instant, ttl: Duration) {
        history::expire(&mut self.history, now, ttl);
    }

    /// What a subscriber that last saw `since` (in `epoch`) missed, if
    /// history still holds all of it; `current` is this incarnation's epoch.
    pub fn replay_after(&self, since: u64, epoch: Option<&str>, current: &str) -> Replay {
        history::replay_from(&[], &self.history, since, epoch, current, self.seq)
    }
}

/// One shard's embedded broker: the channels it owns.
pub struct EmbeddedBroker {
    shard: usize,
    shards: usize,
    epoch_nonce: u32,
    channels: HashMap<Arc<str>, OwnedChannel>,
    incarnations: u64,
    kept: Keeper,
}

impl EmbeddedBroker {
    /// The broker of shard `shard` of `shards`, in the process whose
    /// epochs carry `epoch_nonce`.
    pub fn new(
        shard: usize,
        shards: usize,
        epoch_nonce: u32,
        history: &HistoryOptions,
    ) -> EmbeddedBroker {
        EmbeddedBroker {
            shard,
            shards,
            epoch_nonce,
            channels: HashMap::new(),
            incarnations: 0,
            kept: Keeper::new(history, shards),
        }
    }

    /// The epoch of an owned channel's `incarnation`.
    fn epoch_name(&self, incarnation: u64) -> Arc<str> {
        format!(
            "{:08x}{:02x}{:x}",
            self.epoch_nonce, self.shard, incarnation
        )
        .into()
    }

    fn channel(&mut self, channel: &Arc<str>) -> &mut OwnedChannel {
        if !self.channels.contains_key(channel) {
            self.incarnations += 1;
            let state = OwnedChannel::new(self.incarnations, self.kept.meter.clone());
            self.channels.insert(channel.clone(), state);
        }
        self.channels.get_mut(channel).expect("inserted above")
    }

    /// Owner side of a publication: assign the seq, keep history, fan out,
    /// answer the publisher.
    fn sequence(&mut self, publication: Forwarded, now: Instant, fx: &mut Vec<Effect>) {
        let Forwarded {
            channel,
            key,
            data,
            from,
            token,
        } = publication;
        let limits = self.kept.limits;
        let ch = self.channel(&channel);
        ch.seq += 1;
        let seq = ch.seq;
        let publication = Publication::encode(&channel, Some(seq), key, &data, now);
        ch.remember(&publication, limits);
        let to = ch.interested;
        if to == 0 && ch.history.holds_nothing() {
            self.channels.remove(&channel);
        }
        self.enforce_budget();
        fx.push(Effect::Deliver { publication, to });
        if let Some(token) = token {
            fx.push(Effect::Published {
                to: from,
                token,
                seq: Some(seq),
            });
        }
    }

    /// Keeps the histories within this shard's share of --history-memory
    /// and --history-channels; channels left with neither history nor
    /// subscribers are forgotten.
    fn enforce_budget(&mut self) {
        let channels = &mut self.channels;
        if self
            .kept
            .enforce(|| channels.values_mut().map(|ch| &mut ch.history).collect())
        {
            channels.retain(|_, ch| ch.interested != 0 || !ch.history.holds_nothing());
        }
    }
}

impl Broker for EmbeddedBroker {
    fn ready(&self) -> bool {
        true
    }

    fn publications_can_fail(&self) -> bool {
        false
    }

    fn answers_in_place(&self, channel: &str) -> bool {
        owner_of(channel, self.shards) == self.shard
    }

    fn publish(
        &mut self,
        channel: Arc<str>,
        key: Option<Arc<str>>,
        data: Data,
        token: Option<u32>,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let publication = Forwarded {
            channel,
            key,
            data,
            from: self.shard,
            token,
        };
        let owner = owner_of(&publication.channel, self.shards);
        if owner == self.shard {
            self.sequence(publication, now, fx);
        } else {
            fx.push(Effect::Forward {
                to: owner,
                event: BrokerEvent::Forwarded(publication),
            });
        }
    }

    fn subscribe(
        &mut self,
        channel: &Arc<str>,
        waiter: Waiter,
        now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let ttl = self.kept.ttl;
        let ch = self.channel(channel);
        ch.interested |= 1 << waiter.from;
        ch.expire(now, ttl);
        let (seq, incarnation) = (ch.seq, ch.incarnation);
        let epoch = self.epoch_name(incarnation);
        let ch = &self.channels[channel];
        let replay = match &waiter.since {
            None => Replay::NotAsked,
            Some((since, wanted)) => ch.replay_after(*since, wanted.as_deref(), &epoch),
        }
        .or_snapshot(waiter.snapshot, || ch.history.latest_values());
        fx.push(Effect::Ack {
            waiter,
            seq,
            epoch,
            replay,
        });
    }

    fn unsubscribe(&mut self, channel: &Arc<str>, from: usize, _fx: &mut Vec<Effect>) {
        if let Some(ch) = self.channels.get_mut(channel) {
            ch.interested &= !(1 << from);
            if ch.interested == 0 && ch.history.holds_nothing() {
                self.channels.remove(channel);
            }
        }
    }

    fn handle_event(&mut self, event: BrokerEvent, now: Instant, fx: &mut Vec<Effect>) {
        match event {
            BrokerEvent::Forwarded(publication) => self.sequence(publication, now, fx),
            BrokerEvent::Redis(event) => {
                tracing::warn!(?event, "a Redis event reached the embedded broker; ignored")
            }
        }
    }

    fn tick(&mut self, now: Instant, _fx: &mut Vec<Effect>) {
        let ttl = self.kept.ttl;
        self.channels.retain(|_, ch| {
            ch.expire(now, ttl);
            ch.interested != 0 || !ch.history.holds_nothing()
        });
        crate::tables::shrink_map(&mut self.channels);
    }

    fn holdings(&mut self) -> Holdings {
        let messages = self.channels.values().map(|ch| ch.history.len()).sum();
        self.kept.holdings(self.channels.len(), messages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::history::{cost, CHANNEL_OVERHEAD};

    fn publication(seq: u64, at: Instant) -> Arc<Publication> {
        Publication::sized(seq, at, 0)
    }

    fn sized(seq: u64, at: Instant, bytes: usize) -> Arc<Publication> {
        Publication::sized(seq, at, bytes)
    }

    fn count(size: usize) -> Limits {
        Limits {
            size,
            bytes: usize::MAX,
            keys: 0,
        }
    }

    fn seqs(r: Replay) -> Option<Vec<u64>> {
        match r {
            Replay::Recovered(v) => Some(v.iter().map(|p| p.seq.unwrap()).collect()),
            _ => None,
        }
    }

    #[test]
    fn replays_exactly_what_was_missed_while_in_history() {
        let mut ch = OwnedChannel::new(1, Rc::default());
        let now = Instant::now();
        for s in 1..=10 {
            ch.seq = s;
            ch.remember(&publication(s, now), count(5));
        }
        assert_eq!(
            seqs(ch.replay_after(7, Some("e"), "e")),
            Some(vec![8, 9, 10])
        );
        assert_eq!(
            seqs(ch.replay_after(5, None, "e")),
            Some(vec![6, 7, 8, 9, 10])
        );
        assert_eq!(seqs(ch.replay_after(10, None, "e")), Some(vec![]));
        assert!(
            seqs(ch.replay_after(4, None, "e")).is_none(),
            "6 is the oldest kept"
        );
        assert!(
            seqs(ch.replay_after(11, None, "e")).is_none(),
            "from the future"
        );
        assert!(
            seqs(ch.replay_after(8, Some("other"), "e")).is_none(),
            "other epoch"
        );
    }

    #[test]
    fn expiry_drops_old_messages_and_breaks_recovery() {
        let mut ch = OwnedChannel::new(1, Rc::default());
        let t0 = Instant::now();
        ch.seq = 2;
        ch.remember(&publication(1, t0), count(10));
        ch.remember(&publication(2, t0 + Duration::from_secs(10)), count(10));
        ch.expire(t0 + Duration::from_secs(12), Duration::from_secs(5));
        assert_eq!(ch.history.len(), 1);
        assert!(seqs(ch.replay_after(0, None, "e")).is_none());
        assert_eq!(seqs(ch.replay_after(1, None, "e")), Some(vec![2]));
    }

    #[test]
    fn a_history_is_bounded_in_bytes_as_well_as_in_count() {
        let meter = Rc::new(Meter::default());
        let mut ch = OwnedChannel::new(1, meter.clone());
        let now = Instant::now();
        let one = cost(&sized(1, now, 1000));
        let limits = Limits {
            size: 100,
            bytes: 3 * one,
            keys: 0,
        };
        for s in 1..=10 {
            ch.seq = s;
            ch.remember(&sized(s, now, 1000), limits);
        }
        assert_eq!(ch.history.len(), 3);
        assert_eq!(seqs(ch.replay_after(7, None, "e")), Some(vec![8, 9, 10]));
        assert!(
            seqs(ch.replay_after(6, None, "e")).is_none(),
            "7 was dropped for its bytes"
        );
        assert_eq!(meter.bytes(), 3 * one + CHANNEL_OVERHEAD);
        assert_eq!(meter.channels(), 1);
        // Too big to keep: the history empties rather than skip a seq.
        ch.seq = 11;
        ch.remember(&sized(11, now, 4000), limits);
        assert!(ch.history.is_empty());
        assert!(seqs(ch.replay_after(10, None, "e")).is_none());
        assert_eq!((meter.bytes(), meter.channels()), (0, 0));
    }
}
