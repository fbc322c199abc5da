//! The backplane contract: what a shard asks of the broker that sequences
//! and keeps the publications of the channels it owns, and what the broker
//! guarantees. Two brokers implement it, the embedded one
//! ([`super::embedded`]) and Redis ([`super::redis`]); the hub holds one as
//! a `Box<dyn Broker>` and never asks which.
//!
//! A broker is sans-IO: every input is a method call with the time it is
//! handled at, and every output an [`Effect`] pushed onto the vector the
//! caller passes, which the caller carries out after the call returns (a
//! broker never calls back into the hub). The methods, by kind:
//!
//! - publisher side, on the shard a publication was made on:
//!   [`publish`](Broker::publish);
//! - owner side, on the shard that owns the channel (the hub routes there
//!   with [`super::mesh::owner_of`]): [`subscribe`](Broker::subscribe),
//!   [`unsubscribe`](Broker::unsubscribe);
//! - from the broker's own machinery (another shard's broker, the Redis
//!   thread): [`handle_event`](Broker::handle_event);
//! - once a second: [`tick`](Broker::tick).
//!
//! Guarantees, the same for both brokers (the contract suite in
//! `tests/contract.rs` checks them end to end on each):
//!
//! 1. **One seq per channel.** A sequenced publication of a channel gets
//!    the next seq of its epoch, whichever shard or node it came from;
//!    every subscriber on every node receives a channel's publications in
//!    seq order, with no gap and no duplicate while its epoch lasts.
//! 2. **Every publication is answered.** `publish` with a token ends in
//!    exactly one [`Effect::Published`] for it: its seq, or `None` when the
//!    broker could not sequence it (only a broker for which
//!    [`publications_can_fail`](Broker::publications_can_fail) is true).
//! 3. **Every subscribe is answered, in order with delivery.** `subscribe`
//!    ends in exactly one [`Effect::Ack`] carrying the channel's seq at that
//!    point and, when `since` was given, the replay; every [`Effect::Deliver`]
//!    for that shard before the ack has a seq at or below the ack's, every
//!    one after it above. So a subscriber with `since` sees neither a gap
//!    nor a duplicate between replay and live messages.
//! 4. **Replay is whole or refused.** A replay holds every publication after
//!    `since`, or is [`Replay::NotRecovered`] (history no longer holds all of
//!    it, or the epoch differs).
//! 5. **Bounded.** What a broker keeps counts against the history limits and
//!    the shard's share of the history budget it was built with.
//! 6. **Snapshots are current.** A subscribe that asks for a snapshot and
//!    gets no replay (no `since`, or one not recovered) is acked with
//!    [`Replay::Snapshot`]: the latest kept publication of every key of
//!    the channel, in seq order, none above the ack's seq; with guarantee
//!    3, the live messages after it continue it without gap.

use std::sync::Arc;
use std::time::Instant;

use crate::protocol::Data;

/// A sequenced (or raw) publication, encoded once per format. Shared
/// read-only by every shard that delivers it.
#[derive(Debug)]
pub struct Publication {
    pub channel: Arc<str>,
    pub seq: Option<u64>,
    /// The entity it updates, if the publisher named one.
    pub key: Option<Arc<str>>,
    /// When the owner accepted it, for the publish-to-write latency metric
    /// and the history TTL.
    pub at: Instant,
    /// The `message` event as JSON.
    pub json: Box<[u8]>,
    /// The `message` event as MessagePack.
    pub msgpack: Box<[u8]>,
}

impl Publication {
    /// Encodes `data` as the `message` event of `channel` in both formats.
    pub fn encode(
        channel: &Arc<str>,
        seq: Option<u64>,
        key: Option<Arc<str>>,
        data: &Data,
        at: Instant,
    ) -> Arc<Self> {
        let (json, msgpack) = crate::protocol::encode_message(channel, seq, key.as_deref(), data);
        Arc::new(Publication {
            channel: channel.clone(),
            seq,
            key,
            at,
            json: json.into_boxed_slice(),
            msgpack: msgpack.into_boxed_slice(),
        })
    }

    /// The same publication with `conflated: n` in its event: made once
    /// per conflated delivery and shared by every subscriber it goes to.
    pub fn with_conflated(&self, n: u32) -> Arc<Self> {
        let (json, msgpack) = crate::protocol::with_conflated(&self.json, &self.msgpack, n);
        Arc::new(Publication {
            channel: self.channel.clone(),
            seq: self.seq,
            key: self.key.clone(),
            at: self.at,
            json: json.into_boxed_slice(),
            msgpack: msgpack.into_boxed_slice(),
        })
    }
}

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

#[cfg(test)]
impl Publication {
    /// A publication of channel `c` whose JSON form is `bytes` long, for
    /// tests of what is kept.
    pub fn sized(seq: u64, at: Instant, bytes: usize) -> Arc<Self> {
        Arc::new(Publication {
            channel: "c".into(),
            seq: Some(seq),
            key: None,
            at,
            json: vec![b'j'; bytes].into(),
            msgpack: Box::new([]),
        })
    }
}

/// What a `since` subscribe gets back from the owner.
#[derive(Debug)]
pub enum Replay {
    /// No `since` was given.
    NotAsked,
    /// Everything after `since`, in order (possibly nothing).
    Recovered(Vec<Arc<Publication>>),
    /// Part of what was missed is no longer in history, or the epoch differs.
    NotRecovered,
    /// The latest publication of every key, in seq order, for a subscribe
    /// that asked for a snapshot and got no replay.
    Snapshot(Vec<Arc<Publication>>),
}

impl Replay {
    /// The answer for a waiter: this replay, or when it asked for a
    /// snapshot and this is no replay, the latest `values`.
    pub fn or_snapshot(
        self,
        snapshot: bool,
        values: impl FnOnce() -> Vec<Arc<Publication>>,
    ) -> Replay {
        match self {
            Replay::NotAsked | Replay::NotRecovered if snapshot => Replay::Snapshot(values()),
            other => other,
        }
    }
}

/// `since` of a subscribe: the last seq seen, and the epoch it was seen in.
pub type Since = (u64, Option<String>);

/// A subscribe waiting for the owner's answer: from which shard, the
/// token that shard matches the answer with, and `since`.
#[derive(Debug)]
pub struct Waiter {
    pub from: usize,
    pub token: u32,
    pub since: Option<Since>,
    /// Wants the latest publication of every key when there is no replay.
    pub snapshot: bool,
}

/// What the shard must do after a step of its broker.
#[derive(Debug)]
pub enum Effect {
    /// Fan a publication out to the shards in `to` (this one included when
    /// its bit is set), in the order the effects come.
    Deliver {
        publication: Arc<Publication>,
        to: ShardSet,
    },
    /// Answer a waiting subscribe.
    Ack {
        waiter: Waiter,
        seq: u64,
        /// "" while the channel has no epoch yet (behind Redis, before its
        /// first publication).
        epoch: Arc<str>,
        replay: Replay,
    },
    /// Answer publication `token` of shard `to`: its seq, or `None` when it
    /// was not sequenced.
    Published {
        to: usize,
        token: u32,
        seq: Option<u64>,
    },
    /// Hand a message to another shard's broker (the embedded broker sends
    /// a publication to the channel's owner this way).
    Forward { to: usize, event: BrokerEvent },
}

/// What a broker's own machinery sends a shard's broker through the
/// shard's inbox; the hub carries it unopened to
/// [`Broker::handle_event`].
#[derive(Debug)]
pub enum BrokerEvent {
    /// A publication another shard's broker hands to the channel's owner
    /// (brokers that sequence at the owner shard: the embedded one).
    Forwarded(Forwarded),
    /// From the Redis thread, as it declares them.
    Redis(super::redis::event::Event),
}

/// A publication on its way to the channel's owner.
#[derive(Debug)]
pub struct Forwarded {
    pub channel: Arc<str>,
    pub key: Option<Arc<str>>,
    pub data: Data,
    /// The shard it was made on, which the answer goes to.
    pub from: usize,
    pub token: Option<u32>,
}

/// What a shard's broker holds, for the metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Holdings {
    /// Channels owned (with state) on this shard.
    pub channels: usize,
    /// Publications kept in history.
    pub messages: usize,
    /// Bytes the histories hold, as the budget counts them.
    pub bytes: usize,
    /// Publications forgotten to stay within the budget since the last
    /// tick.
    pub evicted: usize,
    /// Latest values kept (one per key per channel).
    pub latest: usize,
    /// Keys forgotten past --max-keys-per-channel since the last tick.
    pub keys_forgotten: usize,
}

/// One shard's broker. See the module doc for the order of calls and the
/// guarantees.
pub trait Broker {
    /// Whether publishes and subscribes can be taken now (Redis: the node's
    /// link is up). While false the hub refuses them with `unavailable`.
    fn ready(&self) -> bool;

    /// True when a publication may end in `Published { seq: None }`; the
    /// hub then asks for an answer to every publication, so the client
    /// hears of a failure even without an id.
    fn publications_can_fail(&self) -> bool;

    /// True when requests on `channel` made on this shard are answered
    /// within the call that makes them (no reply slot needs reserving).
    fn answers_in_place(&self, channel: &str) -> bool;

    /// A publication made on this shard; `token` asks for an answer.
    fn publish(
        &mut self,
        channel: Arc<str>,
        key: Option<Arc<str>>,
        data: Data,
        token: Option<u32>,
        now: Instant,
        fx: &mut Vec<Effect>,
    );

    /// Owner side: shard `waiter.from` has a new subscriber for `channel`.
    fn subscribe(&mut self, channel: &Arc<str>, waiter: Waiter, now: Instant, fx: &mut Vec<Effect>);

    /// Owner side: shard `from` has no subscriber left for `channel`.
    fn unsubscribe(&mut self, channel: &Arc<str>, from: usize, fx: &mut Vec<Effect>);

    /// An event from this broker's own machinery.
    fn handle_event(&mut self, event: BrokerEvent, now: Instant, fx: &mut Vec<Effect>);

    /// Once a second: history expiry, retries, memory given back.
    fn tick(&mut self, now: Instant, fx: &mut Vec<Effect>);

    /// What the broker holds now (and has evicted since the last call).
    fn holdings(&mut self) -> Holdings;

    /// Tells the other nodes of a revocation (already in this node's
    /// table); a broker of one node has nobody to tell.
    fn propagate_revocation(&mut self, _what: &crate::auth::Revoked, _until: u64) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_in_lists_the_set_bits() {
        let set: ShardSet = 1 | 1 << 5 | 1 << 127;
        assert_eq!(shards_in(set).collect::<Vec<_>>(), vec![0, 5, 127]);
        assert_eq!(shards_in(0).count(), 0);
    }
}
