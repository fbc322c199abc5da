//! The Redis thread's event loop: the thin tokio/fred driver of three
//! sans-IO parts. It takes shard commands and turns them into script calls
//! (`batching`) and subscription commands (`subscriptions`, which also says
//! when a batch is proven live), routes pub/sub messages to owner shards,
//! and keeps the node's readiness honest from its probes (`health`).
//!
//! One loop task owns all state; fred calls run in spawned tasks that answer
//! shards directly (through [`Shards`]), so a slow Redis reply never holds
//! up the loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::{ClusterStateChange, Message};
use tokio::sync::broadcast::error::RecvError;

use super::batching::{self, CallSettings, Grouped};
use super::event::{Event, Shards};
use super::health::Health;
use super::scripts::{self, ChannelKeys};
use super::subscriptions::{Proven, Subscriptions, MAX_CHANNELS_PER_COMMAND};
use super::RedisCmd;
use crate::config::{HistoryOptions, RedisOptions};
use crate::node::NodeState;

/// Most shard commands taken per loop turn before issuing what they need.
const MAX_COMMANDS_PER_TURN: usize = 16_384;
/// How often the loop republishes unconfirmed fences and checks health.
const TICK: Duration = Duration::from_millis(25);

/// The receiving ends of the shards' queues (see `RedisHandle`).
pub struct Queues {
    pub publications: flume::Receiver<RedisCmd>,
    pub control: flume::Receiver<RedisCmd>,
}

impl Queues {
    /// The next queued command, control first.
    pub(super) fn try_next(&self) -> Option<RedisCmd> {
        self.control
            .try_recv()
            .or_else(|_| self.publications.try_recv())
            .ok()
    }
}

/// The sorted set of revocations and the channel they travel on, after
/// the prefix.
const REVOKED: &str = "$revoked";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the Redis thread is configured with: its own section, the
/// history's (Redis keeps it), whether Redis is a cluster, and the
/// `--max-connections` the node announces in the directory.
pub struct Settings {
    pub redis: RedisOptions,
    pub history: HistoryOptions,
    pub clustered: bool,
    pub max_connections: usize,
}

/// The node directory's hash, after the prefix.
const NODES: &str = "$nodes";

/// How long a node's entry in the directory lives unless announced again:
/// three announcements (one per probe interval), and never under 3 s.
fn directory_entry_lifetime(probe_interval: Duration) -> Duration {
    (probe_interval * 3).max(Duration::from_secs(3))
}

pub fn run(
    fred_config: fred::prelude::Config,
    settings: Settings,
    shards: Arc<dyn Shards>,
    node: Arc<NodeState>,
    queues: Queues,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the Redis thread's runtime; the node stays not ready");
            return;
        }
    };
    runtime.block_on(async move {
        match Link::new(fred_config, settings, shards, node) {
            Ok(link) => link.run(queues).await,
            Err(e) => tracing::error!(error = %e, "cannot create the Redis clients; the node stays not ready"),
        }
    });
}

/// What spawned fred calls report back to the loop.
enum Internal {
    ShardSubscribed {
        batch: u64,
        channel: String,
        ok: bool,
    },
    /// The revocations kept in Redis were read (or could not be), for the
    /// resync numbered so.
    RevocationsLoaded { resync: u64, ok: bool },
}

/// The pub/sub client's event streams, taken again when the client is
/// replaced.
struct PubsubEvents {
    messages: tokio::sync::broadcast::Receiver<Message>,
    connects: tokio::sync::broadcast::Receiver<Server>,
    errors: tokio::sync::broadcast::Receiver<(Error, Option<Server>)>,
    cluster_changes: tokio::sync::broadcast::Receiver<Vec<ClusterStateChange>>,
}

impl PubsubEvents {
    fn of(client: &Client) -> PubsubEvents {
        PubsubEvents {
            messages: client.message_rx(),
            connects: client.reconnect_rx(),
            errors: client.error_rx(),
            cluster_changes: client.cluster_change_rx(),
        }
    }
}

struct Link {
    redis: RedisOptions,
    history: HistoryOptions,
    /// Builds the clients; kept to replace a deaf pub/sub client.
    builder: Builder,
    shards: Arc<dyn Shards>,
    node: Arc<NodeState>,
    commands: Client,
    pubsub: Client,
    publish_sha: Arc<str>,
    fetch_sha: Arc<str>,
    /// On a Redis Cluster: sequenced messages travel on sharded pub/sub
    /// (SPUBLISH/SSUBSCRIBE), raw backend PUBLISHes on classic pub/sub.
    clustered: bool,
    /// What the node is subscribed to, and which batches are proven.
    subs: Subscriptions,
    keys: HashMap<Arc<str>, Arc<ChannelKeys>>,
    internal: tokio::sync::mpsc::UnboundedSender<Internal>,
    internal_rx: Option<tokio::sync::mpsc::UnboundedReceiver<Internal>>,
    /// A pub/sub connection came up or the cluster changed: resubscribe
    /// everything on the next tick (coalesces a cluster's many events).
    resync_due: bool,
    /// Probes, sync and readiness.
    health: Health,
    /// Resyncs begun, numbering the revocation loads they start.
    resyncs: u64,
    /// The revocations kept in Redis are in the node's table (since the
    /// last resync).
    revocations_loaded: bool,
    /// The last read of the revocations failed: the next tick reads again.
    revocations_retry: bool,
    node_tag: String,
    /// The next time this node reads the directory and renews its entry.
    next_announcement: Instant,
    /// Whether the last announcement said the node drains: a change is
    /// announced at once, not at the next interval.
    announced_draining: bool,
    max_connections: usize,
    epoch_counter: u64,
    in_flight: Arc<AtomicUsize>,
}

impl Link {
    fn new(
        fred_config: fred::prelude::Config,
        settings: Settings,
        shards: Arc<dyn Shards>,
        node: Arc<NodeState>,
    ) -> Result<Link, Error> {
        let mut builder = Builder::from_config(fred_config);
        builder
            .with_performance_config(|p| {
                // The pub/sub reader must never lag; a lag forces a resync.
                p.broadcast_channel_capacity = 1 << 16;
            })
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(5);
                c.unresponsive.max_timeout = Some(Duration::from_secs(5));
                c.unresponsive.interval = Duration::from_secs(1);
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 1000, 2));
        let commands = builder.build()?;
        let pubsub = builder.build()?;
        let node_tag = format!("{:08x}{:08x}", node.epoch_nonce, fastrand::u32(..));
        let (internal, internal_rx) = tokio::sync::mpsc::unbounded_channel();
        let Settings {
            redis,
            history,
            clustered,
            max_connections,
        } = settings;
        Ok(Link {
            builder,
            clustered,
            subs: Subscriptions::new(
                &redis.prefix,
                format!("{}$fence:{node_tag}:", redis.prefix),
                clustered,
            ),
            resyncs: 0,
            revocations_loaded: false,
            revocations_retry: false,
            health: Health::new(
                format!("{}$probe:{node_tag}", redis.prefix),
                redis.probe_interval,
                Instant::now(),
            ),
            publish_sha: fred::util::sha1_hash(scripts::PUBLISH).into(),
            fetch_sha: fred::util::sha1_hash(scripts::FETCH).into(),
            redis,
            history,
            shards,
            node,
            commands,
            pubsub,
            keys: HashMap::new(),
            internal,
            internal_rx: Some(internal_rx),
            resync_due: false,
            node_tag,
            next_announcement: Instant::now(),
            announced_draining: false,
            max_connections,
            epoch_counter: 0,
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    async fn run(mut self, queues: Queues) {
        let mut events = PubsubEvents::of(&self.pubsub);
        let mut command_connects = self.commands.reconnect_rx();
        let Some(mut internal) = self.internal_rx.take() else {
            return;
        };
        self.commands.connect();
        self.pubsub.connect();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                cmd = queues.control.recv_async() => match cmd {
                    Ok(cmd) => self.take_commands(cmd, &queues),
                    Err(_) => return,
                },
                cmd = queues.publications.recv_async() => match cmd {
                    Ok(cmd) => self.take_commands(cmd, &queues),
                    Err(_) => return,
                },
                msg = events.messages.recv() => match msg {
                    Ok(msg) => self.on_message(msg),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "Redis pub/sub reader lagged; resyncing every channel");
                        crate::metrics::redis().lagged.increment(1);
                        self.announce_all();
                    }
                    Err(RecvError::Closed) => return,
                },
                server = events.connects.recv() => {
                    if let Ok(server) = server {
                        tracing::info!(%server, "Redis pub/sub connected; resubscribing");
                    }
                    crate::metrics::redis().reconnects.increment(1);
                    self.set_synced(false);
                    self.resync_due = true;
                }
                changes = events.cluster_changes.recv() => {
                    if let Ok(changes) = changes {
                        tracing::info!(?changes, "Redis Cluster topology changed; resubscribing");
                    }
                    self.set_synced(false);
                    self.resync_due = true;
                }
                Some(event) = internal.recv() => self.on_internal(event),
                server = command_connects.recv() => {
                    if let Ok(server) = server {
                        tracing::info!(%server, "Redis command connection up; loading scripts");
                    }
                    self.load_scripts();
                }
                error = events.errors.recv() => {
                    if let Ok((error, server)) = error {
                        tracing::warn!(%error, ?server, "Redis pub/sub connection error");
                    }
                    self.set_synced(false);
                }
                _ = tick.tick() => {
                    if self.on_tick() {
                        events = PubsubEvents::of(&self.pubsub);
                        self.pubsub.connect();
                    }
                }
            }
        }
    }

    fn keys(&mut self, channel: &Arc<str>) -> Arc<ChannelKeys> {
        if let Some(k) = self.keys.get(channel) {
            return k.clone();
        }
        let k = Arc::new(ChannelKeys::new(&self.redis.prefix, channel));
        if self.keys.len() > 100_000 {
            // Keys of channels nobody wants any more are cheap to rebuild.
            let subs = &self.subs;
            self.keys.retain(|c, _| subs.wants(c));
        }
        self.keys.insert(channel.clone(), k.clone());
        k
    }

    /// Takes `first` and whatever else is queued, then issues the script
    /// calls and subscription commands they need.
    fn take_commands(&mut self, first: RedisCmd, queues: &Queues) {
        let mut publishes = Grouped::default();
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(cmd) = next {
            match cmd {
                RedisCmd::Publish {
                    channel,
                    item,
                    from,
                    token,
                } => publishes.push(channel, (item, from, token)),
                RedisCmd::Subscribe { channel, join } => {
                    self.subs.want(channel.clone(), join);
                    subscribe.push(channel);
                }
                RedisCmd::Unsubscribe { channel } => {
                    self.subs.forget(&channel);
                    unsubscribe.push(channel);
                }
                RedisCmd::Fetch {
                    channel,
                    fetch,
                    after,
                    epoch,
                    latest,
                } => self.fetch(channel, fetch, after, epoch, latest),
                RedisCmd::Revoke { what, until } => self.revoke(what, until),
            }
            taken += 1;
            next = if taken < MAX_COMMANDS_PER_TURN {
                queues.try_next()
            } else {
                None
            };
        }
        if !publishes.is_empty() {
            self.publish(publishes);
        }
        let subscribe = self.subs.still_wanted(subscribe);
        if !subscribe.is_empty() {
            self.subscribe(subscribe, false);
        }
        let names = self.subs.still_unwanted(unsubscribe);
        if !names.is_empty() {
            if self.clustered {
                // One per channel: SUNSUBSCRIBE refuses channels of several slots.
                for name in &names {
                    let client = self.pubsub.clone();
                    let name = name.clone();
                    tokio::spawn(async move {
                        if let Err(e) = client.sunsubscribe(name).await {
                            tracing::debug!(error = %e, "SUNSUBSCRIBE not sent; the next resync drops it");
                        }
                    });
                }
            }
            for chunk in names.chunks(MAX_CHANNELS_PER_COMMAND) {
                let client = self.pubsub.clone();
                let chunk = chunk.to_vec();
                tokio::spawn(async move {
                    if let Err(e) = client.unsubscribe(chunk).await {
                        tracing::debug!(error = %e, "UNSUBSCRIBE not sent; the next resync drops it");
                    }
                });
            }
        }
        crate::metrics::redis()
            .subscriptions
            .set(self.subs.len() as f64);
    }

    /// Issues the publish script for the queued publications: one call for
    /// as many as fit, each answered to its publisher's shard.
    ///
    /// On a cluster all keys of a call must share a hash slot, so calls are
    /// cut per slot; each goes to the primary that owns it, and a channel's
    /// calls keep their order because they always take that one connection.
    fn publish(&mut self, publishes: Grouped) {
        let publishes = publishes.into_channels();
        if !self.node.backplane_ready() {
            for (_, items) in publishes {
                for (_, from, token) in items {
                    self.shards
                        .to_shard(from, Event::Published { token, seq: None });
                }
            }
            return;
        }
        let publishes = publishes
            .into_iter()
            .map(|(channel, items)| (self.keys(&channel), items))
            .collect();
        for call in batching::cut_into_calls(publishes, self.clustered) {
            self.issue_publish(call);
        }
    }

    fn issue_publish(&mut self, call: batching::Call) {
        self.epoch_counter += 1;
        let settings = CallSettings {
            history_size: self.history.size,
            history_ttl: self.history.ttl,
            state_ttl: self.redis.state_ttl,
            history_channel_bytes: self.history.channel_bytes,
            max_keys: self.history.keys,
            sharded: self.clustered,
        };
        let epoch = format!("{}{:x}-", &self.node_tag[..8], self.epoch_counter);
        crate::metrics::redis()
            .publish_batch_messages
            .record(call.items as f64);
        let batching::ScriptCall {
            keys,
            args,
            waiters,
        } = batching::script_call(call, &settings, epoch);
        let client = self.commands.clone();
        let shards = self.shards.clone();
        let sha = self.publish_sha.clone();
        let in_flight = self.in_flight.clone();
        in_flight.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let started = Instant::now();
            // One attempt: a publish resent after a dropped connection could
            // be sequenced twice.
            let options = Options {
                max_attempts: Some(1),
                timeout: Some(Duration::from_secs(5)),
                ..Options::default()
            };
            let result = run_script(&client, &options, &sha, scripts::PUBLISH, keys, args).await;
            in_flight.fetch_sub(1, Ordering::Relaxed);
            crate::metrics::redis().rtt.record(started.elapsed());
            let firsts = result
                .ok()
                .and_then(|v| batching::publish_reply(v, waiters.len()));
            match firsts {
                Some(firsts) => {
                    for (first, acks) in firsts.into_iter().zip(waiters) {
                        for (i, (from, token)) in acks.into_iter().enumerate() {
                            let seq = first + i as u64;
                            shards.to_shard(
                                from,
                                Event::Published {
                                    token,
                                    seq: Some(seq),
                                },
                            );
                        }
                    }
                }
                None => {
                    crate::metrics::redis().publish_failures.increment(1);
                    for (from, token) in waiters.into_iter().flatten() {
                        shards.to_shard(from, Event::Published { token, seq: None });
                    }
                }
            }
        });
    }

    fn fetch(
        &mut self,
        channel: Arc<str>,
        fetch: u64,
        after: Option<u64>,
        epoch: Arc<str>,
        latest: bool,
    ) {
        let keys = self.keys(&channel);
        let client = self.commands.clone();
        let shards = self.shards.clone();
        let sha = self.fetch_sha.clone();
        let args: Vec<Value> = vec![
            Value::Integer(after.map_or(-1, |a| a as i64)),
            Value::from(epoch.to_string()),
            Value::Integer(self.history.ttl.as_millis() as i64),
            Value::Integer(self.history.size.max(1) as i64),
            Value::from(if latest { "1" } else { "0" }),
        ];
        tokio::spawn(async move {
            let options = Options {
                timeout: Some(Duration::from_secs(5)),
                ..Options::default()
            };
            let keys = vec![
                keys.seq.clone(),
                keys.epoch.clone(),
                keys.hist.clone(),
                keys.latest.clone(),
            ];
            let result = run_script(&client, &options, &sha, scripts::FETCH, keys, args).await;
            let reply = match result {
                Ok(v) => batching::fetch_reply(v, latest),
                Err(e) => {
                    tracing::debug!(error = %e, %channel, "history fetch failed");
                    None
                }
            };
            let owner = channel.clone();
            shards.to_owner(
                &owner,
                Event::Fetched {
                    channel,
                    fetch,
                    reply,
                },
            );
        });
    }

    /// Subscribes to `channels` in batches of bounded size, each proven by a
    /// fence (and on a cluster by its SSUBSCRIBE replies) before the owners
    /// hear of it.
    fn subscribe(&mut self, channels: Vec<(Arc<str>, u64)>, resync: bool) {
        let mut probes = self.health.probes();
        // The channel revocations travel on, resubscribed with the probes.
        probes.push((format!("{}{REVOKED}", self.redis.prefix), false));
        let probes: Vec<(&str, bool)> = probes.iter().map(|(c, s)| (c.as_str(), *s)).collect();
        for planned in self.subs.plan(channels, resync, &probes) {
            let pubsub = self.pubsub.clone();
            let commands = self.commands.clone();
            let (classic, fence) = (planned.classic, planned.fence);
            tokio::spawn(async move {
                if pubsub.subscribe(classic).await.is_ok() {
                    let _: Result<i64, _> = commands.publish(fence, "").await;
                }
            });
            for channel in planned.sharded {
                self.shard_subscribe(planned.id, channel);
            }
        }
    }

    fn shard_subscribe(&self, batch: u64, channel: String) {
        let pubsub = self.pubsub.clone();
        let internal = self.internal.clone();
        tokio::spawn(async move {
            let options = Options {
                timeout: Some(Duration::from_secs(5)),
                ..Options::default()
            };
            let result = pubsub
                .with_options(&options)
                .ssubscribe(channel.clone())
                .await;
            if let Err(e) = &result {
                tracing::debug!(error = %e, %channel, "SSUBSCRIBE failed; retrying");
            }
            let ok = result.is_ok();
            let _ = internal.send(Internal::ShardSubscribed { batch, channel, ok });
        });
    }

    fn on_internal(&mut self, event: Internal) {
        match event {
            Internal::ShardSubscribed { batch, channel, ok } => {
                if let Some(proven) = self.subs.shard_subscribed(batch, channel, ok) {
                    self.on_proven(proven);
                }
            }
            Internal::RevocationsLoaded { resync, ok } => {
                if resync != self.resyncs {
                    return;
                }
                if ok {
                    self.revocations_loaded = true;
                    self.update_readiness();
                } else {
                    self.revocations_retry = true;
                }
            }
        }
    }

    /// A batch is live on every connection: its owners may fetch.
    fn on_proven(&mut self, proven: Proven) {
        for (channel, join) in proven.live {
            let owner = channel.clone();
            self.shards
                .to_owner(&owner, Event::Subscribed { channel, join });
        }
        if proven.resync_done {
            self.set_synced(true);
            self.send_probes();
            // Revocations made while this node was not listening.
            self.load_revocations();
        }
    }

    /// Keeps a revocation in Redis and tells every node (this one hears
    /// it too, which changes nothing: it is already in its table).
    fn revoke(&mut self, what: crate::auth::Revoked, until: u64) {
        let client = self.commands.clone();
        let key = format!("{}{REVOKED}", self.redis.prefix);
        let args: Vec<Value> = vec![
            Value::from(what.encode()),
            Value::Integer(until as i64),
            Value::Integer(unix_now() as i64),
            Value::from(key.clone()),
        ];
        tokio::spawn(async move {
            let result: Result<Value, Error> = client.eval(scripts::REVOKE, vec![key], args).await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "a revocation could not be stored in Redis; other nodes may not hear of it");
            }
        });
    }

    /// Reads the revocations in force into the node's table; the node is
    /// ready once they are in.
    fn load_revocations(&self) {
        let client = self.commands.clone();
        let node = self.node.clone();
        let internal = self.internal.clone();
        let resync = self.resyncs;
        let key = format!("{}{REVOKED}", self.redis.prefix);
        tokio::spawn(async move {
            let now = unix_now();
            let args = vec![Value::Integer(now as i64)];
            let result: Result<Value, Error> =
                client.eval(scripts::REVOCATIONS, vec![key], args).await;
            let ok = result.is_ok();
            match result {
                Ok(Value::Array(parts)) => {
                    for pair in parts.chunks(2) {
                        let (Some(member), Some(until)) = (
                            pair.first().and_then(Value::as_string),
                            pair.get(1).and_then(|v| v.as_f64()),
                        ) else {
                            continue;
                        };
                        if let Some(what) = crate::auth::Revoked::decode(&member) {
                            node.revocations.revoke(what, until as u64);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not read the revocations kept in Redis")
                }
            }
            let _ = internal.send(Internal::RevocationsLoaded { resync, ok });
        });
    }

    /// Renews this node's entry in the directory (if it advertises one)
    /// and reads every live entry into the node's table.
    fn announce(&mut self, now: Instant) {
        self.next_announcement = now + self.redis.probe_interval;
        let own = self.node.own_entry(self.max_connections);
        self.announced_draining = self.node.is_draining();
        let entry = own
            .as_ref()
            .and_then(|e| serde_json::to_string(e).ok())
            .unwrap_or_default();
        let lifetime = directory_entry_lifetime(self.redis.probe_interval);
        let key = format!("{}{NODES}", self.redis.prefix);
        let args: Vec<Value> = vec![
            Value::from(self.node_tag.clone()),
            Value::from(entry),
            Value::Integer(lifetime.as_millis() as i64),
        ];
        let client = self.commands.clone();
        let node = self.node.clone();
        tokio::spawn(async move {
            let result: Result<Vec<String>, Error> =
                client.eval(scripts::NODES, vec![key], args).await;
            match result {
                Ok(entries) => node.directory.update(
                    entries
                        .iter()
                        .filter_map(|e| serde_json::from_str(e).ok())
                        .collect(),
                ),
                Err(e) => tracing::debug!(error = %e, "could not read the node directory"),
            }
        });
    }

    /// Another node revoked a token: `<until> <member>`.
    fn on_revocation(&self, payload: &[u8]) {
        let text = String::from_utf8_lossy(payload);
        let parsed = text.split_once(' ').and_then(|(until, member)| {
            Some((
                until.parse::<u64>().ok()?,
                crate::auth::Revoked::decode(member)?,
            ))
        });
        match parsed {
            Some((until, what)) => {
                self.node.revocations.revoke(what, until);
            }
            None => tracing::warn!(payload = %text, "a malformed revocation was ignored"),
        }
    }

    /// Resubscribes everything the node wants after a (re)connection or a
    /// cluster change; the node is ready again once all of it is proven.
    fn resync(&mut self) {
        self.resync_due = false;
        self.resyncs += 1;
        self.revocations_loaded = false;
        self.set_synced(false);
        let channels = self.subs.begin_resync();
        self.refresh_probes();
        self.subscribe(channels, true);
    }

    /// On a cluster, one sharded probe per primary (a name whose slot it
    /// owns), so a deaf connection to any of them is noticed.
    fn refresh_probes(&mut self) {
        if !self.clustered {
            return;
        }
        let Some(state) = self.pubsub.cached_cluster_state() else {
            return;
        };
        let mut probes = Vec::new();
        let mut primaries = std::collections::HashSet::new();
        for slot in state.unique_hash_slots() {
            let channel = format!(
                "{}$probe:{}:{{{}}}",
                self.redis.prefix,
                self.node_tag,
                scripts::slot_tags()[slot as usize]
            );
            // A prefix with its own hash tag puts every name in one slot.
            let actual = fred::util::redis_keyslot(channel.as_bytes());
            if let Some(primary) = state.get_server(actual) {
                if primaries.insert(primary.clone()) {
                    probes.push(channel);
                }
            }
        }
        self.health.set_sharded_probes(probes);
    }

    /// Swaps the pub/sub client for a fresh one. A forced reconnection is not
    /// enough: on a cluster fred keeps every connection that reports no
    /// error, and a deaf one reports none.
    fn replace_pubsub(&mut self) -> bool {
        let fresh = match self.builder.build() {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build a new pub/sub client; forcing a reconnection");
                let pubsub = self.pubsub.clone();
                tokio::spawn(async move {
                    let _ = pubsub.force_reconnection().await;
                });
                return false;
            }
        };
        let old = std::mem::replace(&mut self.pubsub, fresh);
        tokio::spawn(async move {
            // A deaf connection may never answer QUIT; fred's unresponsive
            // check closes it then.
            let _ = tokio::time::timeout(Duration::from_secs(5), old.quit()).await;
        });
        true
    }

    fn load_scripts(&self) {
        let client = self.commands.clone();
        let clustered = self.clustered;
        tokio::spawn(async move {
            for script in [scripts::PUBLISH, scripts::FETCH] {
                let loaded: Result<(), Error> = if clustered {
                    client.script_load_cluster::<(), _>(script).await
                } else {
                    client.script_load::<String, _>(script).await.map(|_| ())
                };
                if let Err(e) = loaded {
                    tracing::warn!(error = %e, "loading a script failed; calls fall back to EVAL");
                }
            }
        });
    }

    fn on_message(&mut self, msg: Message) {
        let payload = match msg.value {
            Value::Bytes(b) => b,
            Value::String(s) => s.into_inner(),
            _ => return,
        };
        let Some(name) = msg.channel.strip_prefix(self.redis.prefix.as_str()) else {
            return;
        };
        if name == REVOKED {
            return self.on_revocation(&payload);
        }
        if name.starts_with('$') {
            let channel = msg.channel.to_string();
            return self.on_control(&channel);
        }
        let Some(channel) = self.subs.wanted(name) else {
            return;
        };
        let channel = channel.clone();
        let owner = channel.clone();
        self.shards
            .to_owner(&owner, Event::Message { channel, payload });
    }

    /// A fence or probe came back.
    fn on_control(&mut self, name: &str) {
        if self.health.is_probe(name) {
            if let Some(rtt) = self.health.probe_back(name, Instant::now()) {
                crate::metrics::redis().probe_rtt.record(rtt);
            }
            return self.update_readiness();
        }
        let Some(id) = self.subs.fence_id(name) else {
            return;
        };
        let pubsub = self.pubsub.clone();
        let done = name.to_string();
        tokio::spawn(async move {
            let _ = pubsub.unsubscribe(done).await;
        });
        if let Some(proven) = self.subs.fence_back(id) {
            self.on_proven(proven);
        }
    }

    /// Tells every owner its channels must catch up (after a lag).
    fn announce_all(&self) {
        for (channel, join) in self.subs.all() {
            self.shards.to_owner(
                channel,
                Event::Subscribed {
                    channel: channel.clone(),
                    join,
                },
            );
        }
    }

    fn set_synced(&mut self, synced: bool) {
        self.health.set_synced(synced, Instant::now());
        self.update_readiness();
    }

    fn update_readiness(&self) {
        let connections_up = self.commands.is_connected() && self.pubsub.is_connected();
        // A node that may not know every revocation yet takes no traffic.
        let ready = self.health.ready(Instant::now(), connections_up) && self.revocations_loaded;
        if self.node.set_backplane_ready(ready) {
            if ready {
                tracing::info!("Redis backplane ready");
            } else {
                tracing::warn!("Redis backplane not ready");
            }
        }
        crate::metrics::redis()
            .ready
            .set(if ready { 1.0 } else { 0.0 });
    }

    fn send_probes(&mut self) {
        for (channel, sharded) in self.health.start_round(Instant::now()) {
            let client = self.commands.clone();
            tokio::spawn(async move {
                let options = Options {
                    timeout: Some(Duration::from_secs(2)),
                    ..Options::default()
                };
                let with = client.with_options(&options);
                let _: Result<i64, _> = if sharded {
                    with.spublish(channel, "p").await
                } else {
                    with.publish(channel, "p").await
                };
            });
        }
    }

    /// Health checks and retries; true when the pub/sub client was replaced
    /// (the caller listens to the new one, then connects it).
    fn on_tick(&mut self) -> bool {
        let mut replaced = false;
        let now = Instant::now();
        if self.resync_due {
            self.resync();
        }
        // Republish the fences not seen yet (the first publish may have
        // overtaken its SUBSCRIBE, which travels on the other connection).
        for name in self.subs.unproven_fences() {
            let client = self.commands.clone();
            tokio::spawn(async move {
                let _: Result<i64, _> = client.publish(name, "").await;
            });
        }
        for (batch, channel) in self.subs.take_shard_retries() {
            self.shard_subscribe(batch, channel);
        }
        if std::mem::take(&mut self.revocations_retry) {
            self.load_revocations();
        }
        if now >= self.next_announcement || self.node.is_draining() != self.announced_draining {
            self.announce(now);
        }
        let due = self.health.tick(now);
        if due.probe_due {
            crate::metrics::redis()
                .probe_timeouts
                .increment(due.late as u64);
            self.send_probes();
        }
        if let Some(quiet_for) = due.deaf_for {
            tracing::warn!(
                silent_ms = quiet_for.as_millis() as u64,
                "no probe came back through Redis pub/sub; reconnecting it"
            );
            crate::metrics::redis().deaf.increment(1);
            self.set_synced(false);
            replaced = self.replace_pubsub();
        }
        self.update_readiness();
        let depth = self.in_flight.load(Ordering::Relaxed) + self.commands.command_queue_len();
        crate::metrics::redis().pipeline_depth.set(depth as f64);
        crate::metrics::redis()
            .commands_up
            .set(if self.commands.is_connected() {
                1.0
            } else {
                0.0
            });
        crate::metrics::redis()
            .pubsub_up
            .set(if self.pubsub.is_connected() { 1.0 } else { 0.0 });
        replaced
    }
}

/// EVALSHA, falling back to EVAL (which also caches the script) when Redis
/// lost its script cache (restart, SCRIPT FLUSH, failover).
///
/// If two calls touching one channel are in flight when the cache goes, each
/// retries on its own and the second may overtake the first: their
/// publications keep gap-free seqs but may be ordered differently from how
/// they were sent. A rare, accepted cost of not serializing every call.
async fn run_script(
    client: &Client,
    options: &Options,
    sha: &str,
    script: &str,
    keys: Vec<String>,
    args: Vec<Value>,
) -> Result<Value, Error> {
    let with = client.with_options(options);
    match with
        .evalsha::<Value, _, _, _>(sha, keys.clone(), args.clone())
        .await
    {
        Err(e) if e.details().contains("NOSCRIPT") => {
            crate::metrics::redis().script_reloads.increment(1);
            with.eval::<Value, _, _, _>(script, keys, args).await
        }
        other => other,
    }
}
