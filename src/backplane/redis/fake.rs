//! A stand-in for the Redis thread and Redis itself, for tests that drive
//! shards by hand: it takes the commands shards queue, keeps each channel's
//! seq, epoch and history as the publish and fetch scripts do, and answers
//! through the same [`Shards`] the real thread uses. Its faults are the
//! ones the real link recovers from: a pub/sub link that loses messages
//! until it is resubscribed, and failed fetches.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::batching::Grouped;
use super::event::{Event, FetchReply, FetchedEntry, Shards};
use super::link::Queues;
use super::{RedisCmd, RedisHandle};
use crate::backplane::envelope;
use crate::node::NodeState;

#[derive(Default)]
struct Stored {
    epoch: String,
    seq: u64,
    /// Seq, item, and when it was stored.
    entries: VecDeque<(u64, Bytes, Instant)>,
    /// Per key, the latest of the same.
    latest: HashMap<Option<Arc<str>>, (u64, Bytes, Instant)>,
}

pub struct FakeRedis {
    queues: Queues,
    shards: Arc<dyn Shards>,
    node: Arc<NodeState>,
    channels: HashMap<Arc<str>, Stored>,
    /// The node's pub/sub subscriptions, with the owner's join of each.
    subscribed: HashMap<Arc<str>, u64>,
    /// Entries kept per channel (the stream's length cap), and for how
    /// long a fetch returns them.
    history: usize,
    ttl: Duration,
    /// Redis's clock: what entries are stamped with and fetches compare
    /// against.
    pub now: Instant,
    epochs: u64,
    /// The pub/sub link delivers nothing.
    deaf: bool,
    /// Fetches fail while set.
    pub fail_fetches: bool,
    /// Keys whose latest value a channel keeps (--max-keys-per-channel).
    pub max_keys: usize,
}

impl FakeRedis {
    /// A fake keeping `history` entries per channel for `ttl`, answering
    /// `shards`, and the handle shards queue commands on. The node starts
    /// ready.
    pub fn new(
        shards: Arc<dyn Shards>,
        node: Arc<NodeState>,
        history: usize,
        ttl: Duration,
        now: Instant,
    ) -> (FakeRedis, RedisHandle) {
        let (handle, queues) = RedisHandle::detached();
        node.set_backplane_ready(true);
        let fake = FakeRedis {
            queues,
            shards,
            node,
            channels: HashMap::new(),
            subscribed: HashMap::new(),
            history,
            ttl,
            now,
            epochs: 0,
            deaf: false,
            fail_fetches: false,
            max_keys: 10_000,
        };
        (fake, handle)
    }

    /// Handles every queued command, publications of one channel batched
    /// into one envelope as one script call would; returns how many.
    pub fn run(&mut self) -> usize {
        let mut handled = 0;
        let mut publishes = Grouped::default();
        while let Some(cmd) = self.queues.try_next() {
            handled += 1;
            match cmd {
                RedisCmd::Publish {
                    channel,
                    item,
                    from,
                    token,
                } => publishes.push(channel, (item, from, token)),
                RedisCmd::Subscribe { channel, join } => {
                    self.subscribed.insert(channel.clone(), join);
                    if !self.deaf {
                        self.shards
                            .to_owner(&channel.clone(), Event::Subscribed { channel, join });
                    }
                }
                RedisCmd::Unsubscribe { channel } => {
                    self.subscribed.remove(&channel);
                }
                // One node: the revocation is in its table already.
                RedisCmd::Revoke { .. } => {}
                RedisCmd::Fetch {
                    channel,
                    fetch,
                    after,
                    epoch,
                    latest,
                } => {
                    let reply =
                        (!self.fail_fetches).then(|| self.fetch(&channel, after, &epoch, latest));
                    self.shards.to_owner(
                        &channel.clone(),
                        Event::Fetched {
                            channel,
                            fetch,
                            reply,
                        },
                    );
                }
            }
        }
        for (channel, pending) in publishes.into_channels() {
            let items: Vec<Vec<u8>> = pending.iter().map(|(item, _, _)| item.clone()).collect();
            let first = self.store(&channel, &items);
            for (i, (_, from, token)) in pending.into_iter().enumerate() {
                let seq = Some(first + i as u64);
                self.shards.to_shard(from, Event::Published { token, seq });
            }
        }
        handled
    }

    /// Sequences `items` as the publish script does and publishes their
    /// envelope; returns the first seq.
    fn store(&mut self, channel: &Arc<str>, items: &[Vec<u8>]) -> u64 {
        let stored = self.channels.entry(channel.clone()).or_default();
        if stored.epoch.is_empty() {
            self.epochs += 1;
            stored.epoch = format!("fake{}", self.epochs);
        }
        let first = stored.seq + 1;
        for item in items {
            stored.seq += 1;
            let entry = (stored.seq, Bytes::from(item.clone()), self.now);
            if self.max_keys > 0 {
                let key = envelope::decode_item(item).ok().and_then(|(key, _)| key);
                stored.latest.insert(key, entry.clone());
                if stored.latest.len() > self.max_keys {
                    let oldest = stored.latest.iter().min_by_key(|(_, (seq, _, _))| *seq);
                    let oldest = oldest.map(|(key, _)| key.clone()).expect("not empty");
                    stored.latest.remove(&oldest);
                }
            }
            stored.entries.push_back(entry);
            if stored.entries.len() > self.history {
                stored.entries.pop_front();
            }
        }
        let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
        let payload = envelope::encode_envelope(&stored.epoch, first, &refs);
        self.deliver(channel, payload.into());
        first
    }

    /// A pub/sub message to the node, if it subscribes and the link hears.
    fn deliver(&self, channel: &Arc<str>, payload: Bytes) {
        if self.deaf || !self.subscribed.contains_key(channel) {
            return;
        }
        let event = Event::Message {
            channel: channel.clone(),
            payload,
        };
        self.shards.to_owner(channel, event);
    }

    /// What the fetch script answers.
    fn fetch(&self, channel: &str, after: Option<u64>, epoch: &str, latest: bool) -> FetchReply {
        let Some(stored) = self.channels.get(channel) else {
            return FetchReply {
                latest: latest.then(Vec::new),
                ..FetchReply::default()
            };
        };
        let fresh = |at: &Instant| self.now.saturating_duration_since(*at) <= self.ttl;
        let entry = |(seq, item, at): &(u64, Bytes, Instant)| FetchedEntry {
            seq: *seq,
            item: item.clone(),
            age: self.now.saturating_duration_since(*at),
        };
        let latest = latest.then(|| {
            let mut values: Vec<FetchedEntry> = stored
                .latest
                .values()
                .filter(|(_, _, at)| fresh(at))
                .map(entry)
                .collect();
            values.sort_unstable_by_key(|v| v.seq);
            values
        });
        let after = match after {
            Some(_) if !epoch.is_empty() && epoch != stored.epoch => Some(0),
            after => after,
        };
        let entries = match after {
            Some(after) if after < stored.seq => stored
                .entries
                .iter()
                .filter(|(seq, _, _)| *seq > after)
                .take(self.history)
                .filter(|(_, _, at)| fresh(at))
                .map(entry)
                .collect(),
            _ => Vec::new(),
        };
        FetchReply {
            epoch: stored.epoch.clone(),
            seq: stored.seq,
            entries,
            latest,
        }
    }

    /// Another node publishes JSON `data` to `channel` through Redis,
    /// under `key` if given.
    pub fn publish_from_elsewhere(&mut self, channel: &str, key: Option<&str>, data: &str) {
        let data = crate::protocol::Data::from_json_slice(data.as_bytes()).expect("valid JSON");
        self.store(&channel.into(), &[envelope::encode_item(key, &data)]);
    }

    /// The pub/sub link loses everything from now on, and the node is not
    /// ready (as when the link's probe finds it deaf).
    pub fn lose_link(&mut self) {
        self.deaf = true;
        self.node.set_backplane_ready(false);
    }

    /// The link is back: the node resubscribes every channel and each
    /// owner hears its subscription is live again.
    pub fn restore_link(&mut self) {
        self.deaf = false;
        self.node.set_backplane_ready(true);
        for (channel, join) in &self.subscribed {
            let event = Event::Subscribed {
                channel: channel.clone(),
                join: *join,
            };
            self.shards.to_owner(channel, event);
        }
    }
}
