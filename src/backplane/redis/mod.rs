//! The Redis backplane: one thread ("ringcast-redis") running a small tokio
//! runtime with two fred clients, one for commands (the publish and fetch
//! scripts, probes) and one for pub/sub. It is the only tokio code in the
//! relay; shards reach it through a bounded queue ([`RedisHandle`]) and it
//! answers through the shards' inboxes ([`event::Shards`]), so no shard ever
//! waits on Redis. On each shard a [`RedisBroker`] is the backplane contract's
//! Redis side: it sends the thread commands and turns its events into one
//! ordered stream per channel (`follower`).
//!
//! The thread never fans out per subscriber: it sequences publications in
//! batches (one script call per tick, however many publications piled up),
//! keeps the node subscribed to exactly the channels some shard wants, and
//! hands every pub/sub message, still encoded, to the channel's owner shard.
//! Why it is built this way: `docs/design/redis-backplane.md`.

mod batching;
mod broker;
pub mod event;
#[cfg(test)]
pub mod fake;
mod follower;
mod health;
mod link;
pub mod scripts;
mod subscriptions;

use std::sync::Arc;

pub use broker::RedisBroker;
pub use event::{Event, FetchReply, Shards};

use crate::config::{Backplane, HistoryOptions, RedisOptions};
use crate::error::{Context, Error, Result};
use crate::node::NodeState;

/// Commands from shards to the Redis thread.
#[derive(Debug)]
pub enum RedisCmd {
    /// Sequence and publish one item (see `envelope::encode_item`); the
    /// outcome goes to shard `from` as `Event::Published`.
    Publish {
        channel: Arc<str>,
        item: Vec<u8>,
        from: usize,
        token: u32,
    },
    /// From the channel's owner: the node needs this channel (first
    /// subscriber on any shard). Answered with `Event::Subscribed { join }`
    /// once the subscription is live on the Redis connection.
    Subscribe { channel: Arc<str>, join: u64 },
    /// From the channel's owner: no subscriber is left on the node.
    Unsubscribe { channel: Arc<str> },
    /// From the channel's owner: read seq, epoch and the history after
    /// `after` (all of it if the epoch differs from `epoch`), and the
    /// latest value of every key when `latest`; answered with
    /// `Event::Fetched { fetch }`.
    Fetch {
        channel: Arc<str>,
        fetch: u64,
        after: Option<u64>,
        epoch: Arc<str>,
        latest: bool,
    },
    /// A revocation to keep in Redis and tell every node of.
    Revoke {
        what: crate::auth::Revoked,
        until: u64,
    },
}

/// The shards' side of the queues to the Redis thread. Publications go
/// through a bounded queue (full: the publish is refused, so a slow Redis
/// cannot grow memory); subscription bookkeeping and fetches, which must not
/// be lost and are bounded by the number of channels, through an unbounded
/// one, so a shard never blocks on either.
#[derive(Clone)]
pub struct RedisHandle {
    publications: flume::Sender<RedisCmd>,
    control: flume::Sender<RedisCmd>,
}

/// Publications waiting for the Redis thread; beyond, publishes are refused
/// with `unavailable`.
const PUBLISH_QUEUE_CAPACITY: usize = 65_536;

impl RedisHandle {
    /// A handle and the queues it feeds, for a broker tested without the
    /// thread.
    #[cfg(test)]
    fn detached() -> (RedisHandle, link::Queues) {
        let (publications, publications_rx) = flume::bounded(PUBLISH_QUEUE_CAPACITY);
        let (control, control_rx) = flume::unbounded();
        let queues = link::Queues {
            publications: publications_rx,
            control: control_rx,
        };
        (
            RedisHandle {
                publications,
                control,
            },
            queues,
        )
    }

    /// Queues a publication; false when the queue is full or the thread gone.
    pub fn publish(&self, cmd: RedisCmd) -> bool {
        self.publications.try_send(cmd).is_ok()
    }

    /// Queues a subscription change or a fetch.
    pub fn control(&self, cmd: RedisCmd) {
        let _ = self.control.send(cmd);
    }
}

/// The fred configuration for a Redis backplane (the URL or seeds were
/// checked with the configuration; fred may still refuse what it cannot
/// read). Over TLS the server's certificate is always verified, against
/// `--redis-ca-file` or the system's roots.
pub fn client_config(backplane: &Backplane, redis: &RedisOptions) -> Result<fred::prelude::Config> {
    use fred::prelude::{Config as FredConfig, ServerConfig};
    use fred::types::config::{TlsConfig, TlsConnector, TlsHostMapping};
    let mut fred_config = match backplane {
        Backplane::Redis { url } => FredConfig::from_url(url)
            .map_err(|e| Error::msg(e.details().to_string()))
            .with_context(|| format!("--redis `{url}`"))?,
        Backplane::RedisCluster { seeds, .. } => FredConfig {
            server: ServerConfig::new_clustered(seeds.clone()),
            ..FredConfig::default()
        },
        Backplane::Embedded => {
            return Err(Error::msg("the embedded backplane needs no Redis client"))
        }
    };
    fred_config.tls = if backplane.uses_tls() {
        let client = redis
            .client_cert
            .as_deref()
            .zip(redis.client_key.as_deref());
        let rustls = crate::tls::redis_client_config(redis.ca_file.as_deref(), client)
            .map_err(Error::msg)
            .context("TLS to Redis")?;
        Some(TlsConfig {
            connector: TlsConnector::from(rustls),
            // The names to verify are the addresses the node connects to,
            // as given or as the cluster announces them.
            hostnames: TlsHostMapping::None,
        })
    } else {
        None
    };
    // Keep retrying in the background: a relay starts (not ready) while
    // Redis is unreachable.
    fred_config.fail_fast = false;
    Ok(fred_config)
}

/// Starts the Redis thread; it runs for the life of the process.
pub fn start(
    backplane: &Backplane,
    redis: &RedisOptions,
    history: &HistoryOptions,
    max_connections: usize,
    shards: Arc<dyn Shards>,
    node: Arc<NodeState>,
) -> Result<RedisHandle> {
    let fred_config = client_config(backplane, redis)?;
    let settings = link::Settings {
        redis: redis.clone(),
        history: history.clone(),
        clustered: matches!(backplane, Backplane::RedisCluster { .. }),
        max_connections,
    };
    crate::metrics::register_redis();
    let (publications, publications_rx) = flume::bounded(PUBLISH_QUEUE_CAPACITY);
    let (control, control_rx) = flume::unbounded();
    let queues = link::Queues {
        publications: publications_rx,
        control: control_rx,
    };
    std::thread::Builder::new()
        .name("ringcast-redis".into())
        .spawn(move || link::run(fred_config, settings, shards, node, queues))
        .context("starting the Redis thread")?;
    Ok(RedisHandle {
        publications,
        control,
    })
}
