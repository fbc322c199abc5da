//! The Redis broker: a shard's side of the Redis backplane. Publications
//! go straight to the Redis thread (which answers the publisher's shard);
//! for the channels this shard owns, it keeps the node subscribed while any
//! shard wants them and runs each through its [`RemoteChannel`] state
//! machine, which turns live pub/sub messages and fetched history into one
//! ordered stream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use super::event::{Event, FetchReply, FetchedEntry};
use super::follower::{self, RemoteChannel, Snapshot};
use super::{RedisCmd, RedisHandle};
use crate::backplane::broker::{Broker, BrokerEvent, Effect, Holdings, Publication, Waiter};
use crate::backplane::envelope::{self, Incoming};
use crate::backplane::history::Keeper;
use crate::config::HistoryOptions;
use crate::node::NodeState;
use crate::protocol::Data;

/// One shard's Redis broker.
pub struct RedisBroker {
    shard: usize,
    redis: RedisHandle,
    node: Arc<NodeState>,
    channels: HashMap<Arc<str>, RemoteChannel>,
    /// Numbers the node's subscriptions to a channel, so an answer about
    /// an earlier one is not taken for the current one.
    joins: u64,
    kept: Keeper,
}

impl RedisBroker {
    /// The broker of shard `shard` of `shards`, reaching the Redis thread
    /// through `redis`; `node` says whether the link is up.
    pub fn new(
        shard: usize,
        shards: usize,
        redis: RedisHandle,
        node: Arc<NodeState>,
        history: &HistoryOptions,
    ) -> RedisBroker {
        RedisBroker {
            shard,
            redis,
            node,
            channels: HashMap::new(),
            joins: 0,
            kept: Keeper::new(history, shards),
        }
    }

    /// Runs one step of a channel's state machine and carries out what it
    /// asks for.
    fn step(
        &mut self,
        channel: &Arc<str>,
        fx: &mut Vec<Effect>,
        step: impl FnOnce(&mut RemoteChannel, &mut Vec<follower::Effect>),
    ) {
        let mut steps = Vec::new();
        let Some(ch) = self.channels.get_mut(channel) else {
            return;
        };
        step(ch, &mut steps);
        let to = ch.interested;
        self.enforce_budget();
        for effect in steps {
            match effect {
                follower::Effect::Deliver(publication) => {
                    fx.push(Effect::Deliver { publication, to })
                }
                follower::Effect::Ack {
                    waiter,
                    seq,
                    epoch,
                    replay,
                } => fx.push(Effect::Ack {
                    waiter,
                    seq,
                    epoch,
                    replay,
                }),
                follower::Effect::Fetch {
                    fetch,
                    after,
                    epoch,
                    latest,
                } => self.redis.control(RedisCmd::Fetch {
                    channel: channel.clone(),
                    fetch,
                    after,
                    epoch,
                    latest,
                }),
                follower::Effect::Gap(lost) => {
                    tracing::warn!(%channel, lost, "publications lost beyond Redis history");
                    crate::metrics::redis().gaps.increment(1);
                }
            }
        }
    }

    /// Keeps the history caches within this shard's share of the budget.
    fn enforce_budget(&mut self) {
        let channels = &mut self.channels;
        self.kept
            .enforce(|| channels.values_mut().map(|ch| &mut ch.history).collect());
    }

    /// Decodes a fetch answer into publications of `channel`.
    fn snapshot(channel: &Arc<str>, reply: FetchReply, at: Instant) -> Snapshot {
        let decode = |entries: &[FetchedEntry]| -> Vec<Arc<Publication>> {
            entries
                .iter()
                .filter_map(|entry| match envelope::decode_item(&entry.item) {
                    Ok((key, data)) => {
                        let stored = at.checked_sub(entry.age).unwrap_or(at);
                        let seq = Some(entry.seq);
                        Some(Publication::encode(channel, seq, key, &data, stored))
                    }
                    Err(e) => {
                        let seq = entry.seq;
                        tracing::warn!(%channel, seq, error = %e, "undecodable entry skipped");
                        None
                    }
                })
                .collect()
        };
        Snapshot {
            epoch: reply.epoch.into(),
            seq: reply.seq,
            entries: decode(&reply.entries),
            latest: reply.latest.as_deref().map(decode),
        }
    }

    /// A pub/sub message for a channel this shard owns.
    fn on_message(&mut self, channel: Arc<str>, payload: &[u8], at: Instant, fx: &mut Vec<Effect>) {
        match envelope::decode_message(payload) {
            Ok(Incoming::Raw(raw)) => {
                crate::metrics::redis().raw_messages.increment(1);
                let publication =
                    Publication::encode(&channel, None, None, &envelope::raw_data(raw), at);
                self.step(&channel, fx, |ch, steps| {
                    ch.message(None, publication, steps)
                });
            }
            Ok(Incoming::Sequenced {
                epoch,
                first,
                items,
            }) => {
                let epoch: Arc<str> = epoch.into();
                let mut publications = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match envelope::decode_item(item) {
                        Ok((key, data)) => publications.push(Publication::encode(
                            &channel,
                            Some(first + i as u64),
                            key,
                            &data,
                            at,
                        )),
                        Err(e) => {
                            crate::metrics::redis().bad_envelopes.increment(1);
                            tracing::warn!(%channel, error = %e, "undecodable publication skipped");
                        }
                    }
                }
                self.step(&channel, fx, |ch, steps| {
                    for publication in publications {
                        ch.message(Some(epoch.clone()), publication, steps);
                    }
                });
            }
            Err(e) => {
                crate::metrics::redis().bad_envelopes.increment(1);
                tracing::warn!(%channel, error = %e, "message with a malformed envelope dropped");
            }
        }
    }
}

impl Broker for RedisBroker {
    fn ready(&self) -> bool {
        self.node.backplane_ready()
    }

    fn publications_can_fail(&self) -> bool {
        true
    }

    fn answers_in_place(&self, _channel: &str) -> bool {
        false
    }

    fn publish(
        &mut self,
        channel: Arc<str>,
        key: Option<Arc<str>>,
        data: Data,
        token: Option<u32>,
        _now: Instant,
        fx: &mut Vec<Effect>,
    ) {
        let Some(token) = token else {
            // publications_can_fail: the hub gives every publication a token.
            debug_assert!(false, "a publication behind Redis without a token");
            return;
        };
        let sent = self.ready()
            && self.redis.publish(RedisCmd::Publish {
                channel,
                item: envelope::encode_item(key.as_deref(), &data),
                from: self.shard,
                token,
            });
        if !sent {
            fx.push(Effect::Published {
                to: self.shard,
                token,
                seq: None,
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
        if !self.channels.contains_key(channel) {
            self.joins += 1;
            let ch = RemoteChannel::new(self.joins, self.kept.limits, self.kept.meter.clone());
            self.channels.insert(channel.clone(), ch);
            self.redis.control(RedisCmd::Subscribe {
                channel: channel.clone(),
                join: self.joins,
            });
        }
        let ttl = self.kept.ttl;
        self.step(channel, fx, |ch, steps| {
            ch.interested |= 1 << waiter.from;
            ch.expire(now, ttl);
            ch.subscribe(waiter, steps)
        });
    }

    fn unsubscribe(&mut self, channel: &Arc<str>, from: usize, _fx: &mut Vec<Effect>) {
        let emptied = self.channels.get_mut(channel).is_some_and(|ch| {
            ch.interested &= !(1 << from);
            ch.interested == 0
        });
        if emptied && self.channels.remove(channel).is_some() {
            self.redis.control(RedisCmd::Unsubscribe {
                channel: channel.clone(),
            });
        }
    }

    fn handle_event(&mut self, event: BrokerEvent, now: Instant, fx: &mut Vec<Effect>) {
        let BrokerEvent::Redis(event) = event else {
            return tracing::warn!(?event, "a shard's event reached the Redis broker; ignored");
        };
        match event {
            Event::Published { token, seq } => fx.push(Effect::Published {
                to: self.shard,
                token,
                seq,
            }),
            Event::Message { channel, payload } => self.on_message(channel, &payload, now, fx),
            Event::Subscribed { channel, join } => {
                self.step(&channel, fx, |ch, steps| ch.joined(join, steps))
            }
            Event::Fetched {
                channel,
                fetch,
                reply,
            } => {
                let snapshot = reply.map(|r| Self::snapshot(&channel, r, now));
                self.step(&channel, fx, |ch, steps| ch.fetched(fetch, snapshot, steps))
            }
        }
    }

    fn tick(&mut self, now: Instant, fx: &mut Vec<Effect>) {
        let ttl = self.kept.ttl;
        let mut retries = Vec::new();
        for (name, ch) in self.channels.iter_mut() {
            ch.expire(now, ttl);
            if ch.wants_retry() {
                retries.push(name.clone());
            }
        }
        crate::tables::shrink_map(&mut self.channels);
        if self.ready() {
            for channel in retries {
                self.step(&channel, fx, |ch, steps| ch.retry(steps));
            }
        }
    }

    fn propagate_revocation(&mut self, what: &crate::auth::Revoked, until: u64) {
        self.redis.control(RedisCmd::Revoke {
            what: what.clone(),
            until,
        });
    }

    fn holdings(&mut self) -> Holdings {
        let messages = self.channels.values().map(|ch| ch.history.len()).sum();
        self.kept.holdings(self.channels.len(), messages)
    }
}
