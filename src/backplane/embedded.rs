//! The embedded (in-process) backplane: messages between shards over
//! unbounded `flume` queues, one inbox per shard. Queues are FIFO per sender,
//! which the no-gap/no-duplicate `since` logic relies on: an owner's
//! `SubscribeAck` reaches a shard after every `Deliver` it sent before it and
//! before every `Deliver` it sends after it.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Instant;

use crate::protocol::Data;

/// A sequenced (or, later, raw) publication, encoded once per format. Shared
/// read-only by every shard that delivers it.
#[derive(Debug)]
pub struct Publication {
    pub channel: Arc<str>,
    pub seq: Option<u64>,
    /// When the owner accepted it, for the publish-to-write latency metric
    /// and the history TTL.
    pub at: Instant,
    /// The `message` event as JSON.
    pub json: Box<[u8]>,
    /// The `message` event as MessagePack.
    pub msgpack: Box<[u8]>,
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
}

/// Messages between shards.
#[derive(Debug)]
pub enum ShardMsg {
    /// To the owner: sequence and fan out `data`. `token` asks for an ack.
    Publish {
        channel: Arc<str>,
        data: Data,
        from: usize,
        token: Option<u32>,
    },
    /// To the publisher's shard: the seq given to publication `token`.
    PublishAck { token: u32, seq: u64 },
    /// To every shard with subscribers: a publication to fan out.
    Deliver(Arc<Publication>),
    /// To the owner: shard `from` has a new subscriber; answer with the
    /// channel's seq and, for `since`, the replay.
    Subscribe {
        channel: Arc<str>,
        from: usize,
        token: u32,
        since: Option<(u64, Option<String>)>,
    },
    SubscribeAck {
        token: u32,
        seq: u64,
        epoch: Arc<str>,
        replay: Replay,
    },
    /// To the owner: shard `from` has no subscriber left for `channel`.
    Unsubscribe { channel: Arc<str>, from: usize },
    /// From the signal handler: start draining.
    Drain,
    /// From the Redis thread to the publisher's shard: publication `token`
    /// was not sequenced (the backplane is down or refused it).
    PublishFailed { token: u32 },
    /// From the Redis thread to the channel's owner: a pub/sub message,
    /// still encoded (see `envelope`).
    RedisMessage {
        channel: Arc<str>,
        payload: bytes::Bytes,
    },
    /// From the Redis thread to the channel's owner: the node's
    /// subscription `join` is live (again, after a reconnect or a lag).
    RedisSubscribed { channel: Arc<str>, join: u64 },
    /// From the Redis thread to the channel's owner: the answer to a fetch.
    Fetched {
        channel: Arc<str>,
        fetch: u64,
        reply: Option<super::redis::FetchReply>,
    },
}

/// The senders to every shard's inbox, shared by all shards.
#[derive(Clone)]
pub struct Mesh {
    inboxes: Arc<[flume::Sender<ShardMsg>]>,
}

impl Mesh {
    /// Creates the mesh and the inbox receiver of each shard.
    pub fn new(shards: usize) -> (Mesh, Vec<flume::Receiver<ShardMsg>>) {
        let (tx, rx): (Vec<_>, Vec<_>) = (0..shards).map(|_| flume::unbounded()).unzip();
        (Mesh { inboxes: tx.into() }, rx)
    }

    pub fn shards(&self) -> usize {
        self.inboxes.len()
    }

    /// Sends to `shard`. A closed inbox means that shard has stopped during
    /// shutdown, when nothing it would do matters any more.
    pub fn send(&self, shard: usize, msg: ShardMsg) {
        let _ = self.inboxes[shard].send(msg);
    }

    pub fn broadcast_drain(&self) {
        for s in 0..self.shards() {
            self.send(s, ShardMsg::Drain);
        }
    }
}

/// The shard that owns `channel`: stable for the life of the process.
pub fn owner_of(channel: &str, shards: usize) -> usize {
    // A fixed-key hasher: every shard must agree, and an attacker choosing
    // names can at worst pile channels onto one shard, not break a table.
    let h = std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(channel);
    (h % shards as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::owner_of;

    #[test]
    fn ownership_is_stable_and_spread() {
        let mut counts = [0usize; 4];
        for i in 0..4000 {
            let name = format!("ch.{i}");
            let o = owner_of(&name, 4);
            assert_eq!(o, owner_of(&name, 4));
            counts[o] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }
}
