//! What the Redis thread tells the shards, and how it reaches them: it
//! knows which shard made a publication and hands channel events to a
//! [`Shards`] the caller gives, which routes them to the channel's owner
//! (the Redis side knows nothing of how shards divide channels).

use std::sync::Arc;

/// From the Redis thread to a shard's Redis broker.
#[derive(Debug)]
pub enum Event {
    /// To the publisher's shard: publication `token` got `seq`, or was not
    /// sequenced (`None`: the backplane is down or refused it).
    Published { token: u32, seq: Option<u64> },
    /// To the channel's owner: a pub/sub message, still encoded (see
    /// `envelope`).
    Message {
        channel: Arc<str>,
        payload: bytes::Bytes,
    },
    /// To the channel's owner: the node's subscription `join` is live
    /// (again, after a reconnect or a lag).
    Subscribed { channel: Arc<str>, join: u64 },
    /// To the channel's owner: the answer to fetch `fetch` (None: it
    /// failed).
    Fetched {
        channel: Arc<str>,
        fetch: u64,
        reply: Option<FetchReply>,
    },
}

/// What a fetch found: the channel's epoch ("" when it has no state yet),
/// its seq, the history entries asked for, oldest first, and when asked
/// for, the latest value of every key, in seq order.
#[derive(Debug, Default)]
pub struct FetchReply {
    pub epoch: String,
    pub seq: u64,
    pub entries: Vec<FetchedEntry>,
    pub latest: Option<Vec<FetchedEntry>>,
}

/// One history entry: its seq, its item, and how long ago Redis stored it
/// (so the node's copy expires when Redis's does, not a TTL after the
/// fetch).
#[derive(Debug, Clone)]
pub struct FetchedEntry {
    pub seq: u64,
    pub item: bytes::Bytes,
    pub age: std::time::Duration,
}

/// Where the Redis thread sends its events.
pub trait Shards: Send + Sync {
    /// To shard `shard` (a publication's answer).
    fn to_shard(&self, shard: usize, event: Event);
    /// To the shard that owns `channel`.
    fn to_owner(&self, channel: &str, event: Event);
}
