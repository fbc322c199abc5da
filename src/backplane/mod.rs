//! How shards (and, later, nodes) reach each other. The embedded backplane
//! is a mesh of queues between the worker threads of one process: each
//! channel is owned by one shard, chosen by hash, which assigns its seq,
//! keeps its history and forwards each publication to the shards that have
//! subscribers for it.

pub mod embedded;

pub use embedded::{owner_of, Mesh, Publication, Replay, ShardMsg};
