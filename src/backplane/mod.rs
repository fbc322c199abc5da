//! How shards and nodes reach each other.
//!
//! Inside a node, shards talk over a mesh of queues (`mesh`), and each
//! channel is owned by one shard, chosen by hash. What sequences a
//! channel's publications and keeps its history is the shard's broker, one
//! contract (`broker`) with two implementations: the embedded broker
//! (`embedded`), where the owner shard assigns seqs and the node is the
//! whole relay, and the Redis broker (`redis`, with `--redis` or
//! `--redis-cluster`), where Redis assigns seqs and keeps history and the
//! owner turns what Redis sends into one ordered stream for the node.

pub mod broker;
pub mod embedded;
pub mod envelope;
pub mod history;
pub mod mesh;
pub mod redis;

pub use broker::{Broker, BrokerEvent, Effect, Publication, Replay, Waiter};
pub use mesh::{owner_of, Mesh, ShardMsg};
