//! The queues between a node's shards: unbounded `flume` queues, one inbox
//! per shard, and which shard owns a channel. Queues are FIFO per sender,
//! which the no-gap/no-duplicate `since` logic relies on: an owner's
//! `SubscribeAck` reaches a shard after every `Deliver` it sent before it and
//! before every `Deliver` it sends after it.

use std::hash::BuildHasher;
use std::sync::Arc;

use super::broker::{BrokerEvent, Publication, Replay, Since};
use super::redis::event::{Event as RedisEvent, Shards};

/// Messages between shards.
#[derive(Debug)]
pub enum ShardMsg {
    /// To the publisher's shard: the answer to publication `token`, its
    /// seq or `None` when it was not sequenced.
    PublishAck { token: u32, seq: Option<u64> },
    /// To every shard with subscribers: a publication to fan out.
    Deliver(Arc<Publication>),
    /// To the owner: shard `from` has a new subscriber; answer with the
    /// channel's seq and, for `since`, the replay.
    Subscribe {
        channel: Arc<str>,
        from: usize,
        token: u32,
        since: Option<Since>,
        snapshot: bool,
    },
    SubscribeAck {
        token: u32,
        seq: u64,
        epoch: Arc<str>,
        replay: Replay,
    },
    /// To the owner: shard `from` has no subscriber left for `channel`.
    Unsubscribe { channel: Arc<str>, from: usize },
    /// For the shard's broker, unopened.
    Broker(BrokerEvent),
    /// From the signal handler: start draining.
    Drain,
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

/// The Redis thread reaches the shards through the mesh.
impl Shards for Mesh {
    fn to_shard(&self, shard: usize, event: RedisEvent) {
        self.send(shard, ShardMsg::Broker(BrokerEvent::Redis(event)));
    }

    fn to_owner(&self, channel: &str, event: RedisEvent) {
        let owner = owner_of(channel, self.shards());
        self.to_shard(owner, event);
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
