//! How shards and nodes reach each other.
//!
//! Inside a node, shards talk over a mesh of queues (`embedded`): each
//! channel is owned by one shard, chosen by hash, which orders its
//! publications, keeps its recent history and forwards each publication to
//! the shards that have subscribers for it. With no Redis configured the
//! owner also assigns seqs, and the node is the whole relay. With `--redis`
//! or `--redis-cluster`, Redis assigns seqs and keeps history (`redis`), and
//! the owner turns what Redis sends into one ordered stream for the node.

pub mod embedded;
pub mod envelope;
pub mod redis;

pub use embedded::{owner_of, Mesh, Publication, Replay, ShardMsg};
