//! ringcast: a thread-per-core io_uring WebSocket pub/sub edge relay.
//!
//! Where things live: `runtime` (workers, listeners, signals), `http`
//! (plain HTTP routes on the same port), `ws` (handshake, framing and the
//! connection loop), `protocol` (sans-IO requests and events), `hub`
//! (per-shard connections, subscriptions, routing and fan-out),
//! `backplane` (the broker contract, its embedded and Redis brokers, and the
//! queues between shards), `node` (what the shards of a process share), `io`
//! (the poll-io helpers and shared read buffer of the transports),
//! `auth` (tokens and what they allow), `addresses` (per-address limits),
//! `directory` (the nodes clients may be sent to, and their load),
//! `tls` (certificates and the TLS acceptor), `tables`, `config`, `metrics`,
//! `error`.

pub mod addresses;
pub mod auth;
pub mod backplane;
pub mod config;
pub mod directory;
pub mod error;
pub mod http;
pub mod hub;
pub mod io;
pub mod metrics;
pub mod node;
pub mod protocol;
pub mod runtime;
pub mod socket;
pub mod tables;
pub mod tls;
pub mod ws;
