//! The Redis thread's event loop: batches shard commands into script calls
//! and subscription commands, routes pub/sub messages to owner shards, and
//! keeps the node's readiness honest (resubscribe after reconnects, probes
//! for a pub/sub link that went deaf).
//!
//! One loop task owns all state; fred calls run in spawned tasks that answer
//! shards directly through the mesh, so a slow Redis reply never holds up the
//! loop.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use fred::prelude::*;
use fred::types::Message;
use tokio::sync::broadcast::error::RecvError;

use super::scripts::{self, ChannelKeys};
use super::{FetchReply, RedisCmd};
use crate::backplane::{owner_of, Mesh, ShardMsg};
use crate::config::Config as RelayConfig;
use crate::hub::NodeState;

/// Most publications in one script call, and most item bytes: a call runs
/// atomically inside Redis, so it must stay short.
const MAX_ITEMS_PER_CALL: usize = 4096;
const MAX_BYTES_PER_CALL: usize = 1 << 20;
/// Most channels in one SUBSCRIBE / UNSUBSCRIBE command.
const MAX_CHANNELS_PER_COMMAND: usize = 1024;
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
    fn try_next(&self) -> Option<RedisCmd> {
        self.control
            .try_recv()
            .or_else(|_| self.publications.try_recv())
            .ok()
    }
}

pub fn run(
    fred_config: fred::prelude::Config,
    config: Arc<RelayConfig>,
    mesh: Mesh,
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
        match Link::new(fred_config, config, mesh, node) {
            Ok(link) => link.run(queues).await,
            Err(e) => tracing::error!(error = %e, "cannot create the Redis clients; the node stays not ready"),
        }
    });
}

/// A SUBSCRIBE batch whose effect is not yet proven: it ends with a fresh
/// fence channel, and the fence message coming back proves Redis processed
/// the whole command (fred resolves `subscribe` on write, not on reply).
struct Fence {
    generation: u64,
    channels: Vec<(Arc<str>, u64)>,
    /// Part of the resubscription after a (re)connect.
    resync: bool,
}

struct Link {
    config: Arc<RelayConfig>,
    mesh: Mesh,
    node: Arc<NodeState>,
    commands: Client,
    pubsub: Client,
    publish_sha: Arc<str>,
    fetch_sha: Arc<str>,
    /// Channels the node wants, with the owner's join id of each.
    desired: HashMap<Arc<str>, u64>,
    keys: HashMap<Arc<str>, Arc<ChannelKeys>>,
    /// Bumped on every pub/sub (re)connection; fences of older ones are void.
    generation: u64,
    fences: HashMap<String, Fence>,
    fence_counter: u64,
    resync_fences_left: usize,
    synced: bool,
    node_tag: String,
    probe_channel: String,
    probe_sent: Option<Instant>,
    last_probe_back: Option<Instant>,
    synced_at: Instant,
    last_forced_reconnect: Option<Instant>,
    epoch_counter: u64,
    in_flight: Arc<AtomicUsize>,
}

impl Link {
    fn new(
        fred_config: fred::prelude::Config,
        config: Arc<RelayConfig>,
        mesh: Mesh,
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
        let probe_channel = format!("{}$probe:{node_tag}", config.redis_prefix);
        Ok(Link {
            publish_sha: fred::util::sha1_hash(scripts::PUBLISH).into(),
            fetch_sha: fred::util::sha1_hash(scripts::FETCH).into(),
            config,
            mesh,
            node,
            commands,
            pubsub,
            desired: HashMap::new(),
            keys: HashMap::new(),
            generation: 0,
            fences: HashMap::new(),
            fence_counter: 0,
            resync_fences_left: 0,
            synced: false,
            node_tag,
            probe_channel,
            probe_sent: None,
            last_probe_back: None,
            synced_at: Instant::now(),
            last_forced_reconnect: None,
            epoch_counter: 0,
            in_flight: Arc::new(AtomicUsize::new(0)),
        })
    }

    async fn run(mut self, queues: Queues) {
        let mut messages = self.pubsub.message_rx();
        let mut pubsub_connects = self.pubsub.reconnect_rx();
        let mut command_connects = self.commands.reconnect_rx();
        let mut errors = self.pubsub.error_rx();
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
                msg = messages.recv() => match msg {
                    Ok(msg) => self.on_message(msg),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(lost = n, "Redis pub/sub reader lagged; resyncing every channel");
                        metrics::counter!("ringcast_redis_lagged_total").increment(1);
                        self.announce_all();
                    }
                    Err(RecvError::Closed) => return,
                },
                server = pubsub_connects.recv() => {
                    if let Ok(server) = server {
                        tracing::info!(%server, "Redis pub/sub connected; resubscribing");
                    }
                    self.on_pubsub_connected();
                }
                server = command_connects.recv() => {
                    if let Ok(server) = server {
                        tracing::info!(%server, "Redis command connection up; loading scripts");
                    }
                    self.load_scripts();
                }
                error = errors.recv() => {
                    if let Ok((error, server)) = error {
                        tracing::warn!(%error, ?server, "Redis pub/sub connection error");
                    }
                    self.set_synced(false);
                }
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn keys(&mut self, channel: &Arc<str>) -> Arc<ChannelKeys> {
        if let Some(k) = self.keys.get(channel) {
            return k.clone();
        }
        let k = Arc::new(ChannelKeys::new(&self.config.redis_prefix, channel));
        if self.keys.len() > 100_000 {
            // Keys of channels nobody wants any more are cheap to rebuild.
            let desired = &self.desired;
            self.keys.retain(|c, _| desired.contains_key(c));
        }
        self.keys.insert(channel.clone(), k.clone());
        k
    }

    /// Takes `first` and whatever else is queued, then issues the script
    /// calls and subscription commands they need.
    fn take_commands(&mut self, first: RedisCmd, queues: &Queues) {
        let mut publishes: Vec<(Arc<str>, Vec<PendingPublish>)> = Vec::new();
        let mut publish_index: HashMap<Arc<str>, usize> = HashMap::new();
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
                } => {
                    let i = *publish_index.entry(channel.clone()).or_insert_with(|| {
                        publishes.push((channel, Vec::new()));
                        publishes.len() - 1
                    });
                    publishes[i].1.push((item, from, token));
                }
                RedisCmd::Subscribe { channel, join } => {
                    self.desired.insert(channel.clone(), join);
                    subscribe.push(channel);
                }
                RedisCmd::Unsubscribe { channel } => {
                    self.desired.remove(&channel);
                    unsubscribe.push(channel);
                }
                RedisCmd::Fetch {
                    channel,
                    fetch,
                    after,
                    epoch,
                } => self.fetch(channel, fetch, after, epoch),
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
        subscribe.retain(|c| self.desired.contains_key(c));
        subscribe.sort_unstable();
        subscribe.dedup();
        if !subscribe.is_empty() {
            let channels = subscribe
                .into_iter()
                .map(|c| {
                    let join = self.desired[&c];
                    (c, join)
                })
                .collect();
            self.subscribe(channels, false);
        }
        unsubscribe.retain(|c| !self.desired.contains_key(c));
        unsubscribe.sort_unstable();
        unsubscribe.dedup();
        if !unsubscribe.is_empty() {
            let names: Vec<String> = unsubscribe
                .iter()
                .map(|c| format!("{}{c}", self.config.redis_prefix))
                .collect();
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
        metrics::gauge!("ringcast_redis_subscriptions").set(self.desired.len() as f64);
    }

    /// Issues the publish script for the queued publications: one call for
    /// as many as fit, each answered to its publisher's shard.
    fn publish(&mut self, publishes: Vec<(Arc<str>, Vec<PendingPublish>)>) {
        let ready = self.node.backplane_ready();
        let mut call = CallBuilder::default();
        for (channel, items) in publishes {
            if !ready {
                for (_, from, token) in items {
                    self.mesh.send(from, ShardMsg::PublishFailed { token });
                }
                continue;
            }
            let keys = self.keys(&channel);
            let bytes: usize = items.iter().map(|(item, _, _)| item.len()).sum();
            if call.items + items.len() > MAX_ITEMS_PER_CALL
                || call.bytes + bytes > MAX_BYTES_PER_CALL
            {
                self.issue_publish(std::mem::take(&mut call));
            }
            call.add(keys, items, bytes);
        }
        if call.items > 0 {
            self.issue_publish(call);
        }
    }

    fn issue_publish(&mut self, call: CallBuilder) {
        self.epoch_counter += 1;
        let history_size = self.config.history_size;
        let mut args: Vec<Value> = Vec::with_capacity(5 + 2 * call.channels.len() + call.items);
        args.push(Value::Integer(history_size as i64));
        args.push(Value::Integer((self.config.history_ttl * 1000) as i64));
        args.push(Value::Integer((self.config.redis_state_ttl * 1000) as i64));
        args.push(Value::from(format!(
            "{}{:x}-",
            &self.node_tag[..8],
            self.epoch_counter
        )));
        args.push(Value::from(if self.config.redis_cluster.is_empty() {
            "PUBLISH"
        } else {
            "SPUBLISH"
        }));
        let mut keys: Vec<String> = Vec::with_capacity(3 * call.channels.len());
        let mut waiters = Vec::with_capacity(call.channels.len());
        for (k, items) in call.channels {
            keys.push(k.seq.clone());
            keys.push(k.epoch.clone());
            keys.push(k.hist.clone());
            args.push(Value::from(k.pubsub.clone()));
            args.push(Value::Integer(items.len() as i64));
            let mut acks = Vec::with_capacity(items.len());
            for (item, from, token) in items {
                args.push(Value::Bytes(Bytes::from(item)));
                acks.push((from, token));
            }
            waiters.push(acks);
        }
        metrics::histogram!("ringcast_redis_publish_batch_messages").record(call.items as f64);
        let client = self.commands.clone();
        let mesh = self.mesh.clone();
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
            metrics::histogram!("ringcast_redis_rtt_seconds").record(started.elapsed());
            let firsts = result.ok().and_then(|v| publish_reply(v, waiters.len()));
            match firsts {
                Some(firsts) => {
                    for (first, acks) in firsts.into_iter().zip(waiters) {
                        for (i, (from, token)) in acks.into_iter().enumerate() {
                            let seq = first + i as u64;
                            mesh.send(from, ShardMsg::PublishAck { token, seq });
                        }
                    }
                }
                None => {
                    metrics::counter!("ringcast_redis_publish_failures_total").increment(1);
                    for (from, token) in waiters.into_iter().flatten() {
                        mesh.send(from, ShardMsg::PublishFailed { token });
                    }
                }
            }
        });
    }

    fn fetch(&mut self, channel: Arc<str>, fetch: u64, after: Option<u64>, epoch: Arc<str>) {
        let keys = self.keys(&channel);
        let owner = owner_of(&channel, self.mesh.shards());
        let client = self.commands.clone();
        let mesh = self.mesh.clone();
        let sha = self.fetch_sha.clone();
        let args: Vec<Value> = vec![
            Value::Integer(after.map_or(-1, |a| a as i64)),
            Value::from(epoch.to_string()),
            Value::Integer((self.config.history_ttl * 1000) as i64),
            Value::Integer(self.config.history_size.max(1) as i64),
        ];
        tokio::spawn(async move {
            let options = Options {
                timeout: Some(Duration::from_secs(5)),
                ..Options::default()
            };
            let keys = vec![keys.seq.clone(), keys.epoch.clone(), keys.hist.clone()];
            let result = run_script(&client, &options, &sha, scripts::FETCH, keys, args).await;
            let reply = match result {
                Ok(v) => fetch_reply(v),
                Err(e) => {
                    tracing::debug!(error = %e, %channel, "history fetch failed");
                    None
                }
            };
            mesh.send(
                owner,
                ShardMsg::Fetched {
                    channel,
                    fetch,
                    reply,
                },
            );
        });
    }

    /// Subscribes to `channels` (plus a fence), in commands of bounded size.
    fn subscribe(&mut self, channels: Vec<(Arc<str>, u64)>, resync: bool) {
        let mut rest = channels;
        loop {
            let tail = rest.split_off(rest.len().min(MAX_CHANNELS_PER_COMMAND));
            let chunk = std::mem::replace(&mut rest, tail);
            self.fence_counter += 1;
            let fence = format!(
                "{}$fence:{}:{}",
                self.config.redis_prefix, self.node_tag, self.fence_counter
            );
            let mut names: Vec<String> = chunk
                .iter()
                .map(|(c, _)| format!("{}{c}", self.config.redis_prefix))
                .collect();
            if resync {
                names.push(self.probe_channel.clone());
                self.resync_fences_left += 1;
            }
            names.push(fence.clone());
            self.fences.insert(
                fence.clone(),
                Fence {
                    generation: self.generation,
                    channels: chunk,
                    resync,
                },
            );
            let pubsub = self.pubsub.clone();
            let commands = self.commands.clone();
            tokio::spawn(async move {
                if pubsub.subscribe(names).await.is_ok() {
                    let _: Result<i64, _> = commands.publish(fence, "").await;
                }
            });
            if rest.is_empty() {
                break;
            }
        }
    }

    fn on_pubsub_connected(&mut self) {
        metrics::counter!("ringcast_redis_reconnects_total").increment(1);
        self.generation += 1;
        self.set_synced(false);
        self.fences.clear();
        self.resync_fences_left = 0;
        let channels: Vec<(Arc<str>, u64)> =
            self.desired.iter().map(|(c, j)| (c.clone(), *j)).collect();
        self.subscribe(channels, true);
    }

    fn load_scripts(&self) {
        let client = self.commands.clone();
        tokio::spawn(async move {
            for script in [scripts::PUBLISH, scripts::FETCH] {
                let loaded: Result<String, _> = client.script_load(script).await;
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
        let Some(name) = msg.channel.strip_prefix(self.config.redis_prefix.as_str()) else {
            return;
        };
        if name.starts_with('$') {
            return self.on_control(&msg.channel);
        }
        let Some((channel, _)) = self.desired.get_key_value(name) else {
            return;
        };
        let channel = channel.clone();
        let owner = owner_of(&channel, self.mesh.shards());
        self.mesh
            .send(owner, ShardMsg::RedisMessage { channel, payload });
    }

    /// A fence or probe came back.
    fn on_control(&mut self, name: &str) {
        if name == self.probe_channel {
            let now = Instant::now();
            if let Some(sent) = self.probe_sent.take() {
                metrics::histogram!("ringcast_redis_probe_rtt_seconds").record(now - sent);
            }
            self.last_probe_back = Some(now);
            return self.update_readiness();
        }
        let Some(fence) = self.fences.remove(name) else {
            return;
        };
        let pubsub = self.pubsub.clone();
        let done = name.to_string();
        tokio::spawn(async move {
            let _ = pubsub.unsubscribe(done).await;
        });
        if fence.generation != self.generation {
            return;
        }
        for (channel, join) in fence.channels {
            if self.desired.get(&channel) == Some(&join) {
                let owner = owner_of(&channel, self.mesh.shards());
                self.mesh
                    .send(owner, ShardMsg::RedisSubscribed { channel, join });
            }
        }
        if fence.resync {
            self.resync_fences_left -= 1;
            if self.resync_fences_left == 0 {
                self.set_synced(true);
                self.send_probe();
            }
        }
    }

    /// Tells every owner its channels must catch up (after a lag).
    fn announce_all(&self) {
        for (channel, join) in &self.desired {
            let owner = owner_of(channel, self.mesh.shards());
            self.mesh.send(
                owner,
                ShardMsg::RedisSubscribed {
                    channel: channel.clone(),
                    join: *join,
                },
            );
        }
    }

    fn set_synced(&mut self, synced: bool) {
        if synced && !self.synced {
            self.synced_at = Instant::now();
        }
        self.synced = synced;
        self.update_readiness();
    }

    fn probe_interval(&self) -> Duration {
        Duration::from_secs_f64(self.config.redis_probe_interval)
    }

    fn update_readiness(&self) {
        let deadline = 3 * self.probe_interval();
        let probe_ok = self
            .last_probe_back
            .is_some_and(|t| t.elapsed() < deadline && t >= self.synced_at);
        let ready =
            self.synced && probe_ok && self.commands.is_connected() && self.pubsub.is_connected();
        if self.node.set_backplane_ready(ready) {
            if ready {
                tracing::info!("Redis backplane ready");
            } else {
                tracing::warn!("Redis backplane not ready");
            }
        }
        metrics::gauge!("ringcast_redis_ready").set(if ready { 1.0 } else { 0.0 });
    }

    fn send_probe(&mut self) {
        self.probe_sent = Some(Instant::now());
        let client = self.commands.clone();
        let channel = self.probe_channel.clone();
        tokio::spawn(async move {
            let options = Options {
                timeout: Some(Duration::from_secs(2)),
                ..Options::default()
            };
            let _: Result<i64, _> = client.with_options(&options).publish(channel, "p").await;
        });
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        // Republish the fences not seen yet (the first publish may have
        // overtaken its SUBSCRIBE, which travels on the other connection).
        for name in self.fences.keys() {
            let client = self.commands.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let _: Result<i64, _> = client.publish(name, "").await;
            });
        }
        let interval = self.probe_interval();
        if self.synced {
            let due = self.probe_sent.is_none_or(|s| now - s >= interval);
            if due {
                if self.probe_sent.is_some() {
                    metrics::counter!("ringcast_redis_probe_timeouts_total").increment(1);
                }
                self.send_probe();
            }
            let silent_since = self
                .last_probe_back
                .unwrap_or(self.synced_at)
                .max(self.synced_at);
            let quiet_for = now - silent_since;
            let recently_forced = self
                .last_forced_reconnect
                .is_some_and(|t| now - t < 3 * interval);
            if quiet_for > 3 * interval && !recently_forced {
                tracing::warn!(
                    silent_ms = quiet_for.as_millis() as u64,
                    "no probe came back through Redis pub/sub; reconnecting it"
                );
                metrics::counter!("ringcast_redis_deaf_total").increment(1);
                self.last_forced_reconnect = Some(now);
                self.set_synced(false);
                let pubsub = self.pubsub.clone();
                tokio::spawn(async move {
                    let _ = pubsub.force_reconnection().await;
                });
            }
        }
        self.update_readiness();
        let depth = self.in_flight.load(Ordering::Relaxed) + self.commands.command_queue_len();
        metrics::gauge!("ringcast_redis_pipeline_depth").set(depth as f64);
        metrics::gauge!("ringcast_redis_up", "role" => "commands").set(
            if self.commands.is_connected() {
                1.0
            } else {
                0.0
            },
        );
        metrics::gauge!("ringcast_redis_up", "role" => "pubsub")
            .set(if self.pubsub.is_connected() { 1.0 } else { 0.0 });
    }
}

/// A publication waiting for its script call: the item, and the shard and
/// token its outcome goes to.
type PendingPublish = (Vec<u8>, usize, u32);

/// One script call being assembled.
#[derive(Default)]
struct CallBuilder {
    channels: Vec<(Arc<ChannelKeys>, Vec<PendingPublish>)>,
    items: usize,
    bytes: usize,
}

impl CallBuilder {
    fn add(&mut self, keys: Arc<ChannelKeys>, items: Vec<PendingPublish>, bytes: usize) {
        self.items += items.len();
        self.bytes += bytes;
        self.channels.push((keys, items));
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
            metrics::counter!("ringcast_redis_script_reloads_total").increment(1);
            with.eval::<Value, _, _, _>(script, keys, args).await
        }
        other => other,
    }
}

/// The first seq of each channel of a publish call.
fn publish_reply(value: Value, channels: usize) -> Option<Vec<u64>> {
    let Value::Array(parts) = value else {
        return None;
    };
    if parts.len() != 2 * channels {
        return None;
    }
    parts
        .chunks(2)
        .map(|pair| pair[1].as_u64())
        .collect::<Option<Vec<u64>>>()
}

fn fetch_reply(value: Value) -> Option<FetchReply> {
    let Value::Array(parts) = value else {
        return None;
    };
    let mut parts = parts.into_iter();
    let epoch = parts.next()?.as_string()?;
    let seq = parts.next()?.as_u64()?;
    let mut entries = Vec::new();
    while let Some(seq) = parts.next() {
        let seq = seq.as_u64()?;
        let item = match parts.next()? {
            Value::Bytes(b) => b,
            Value::String(s) => s.into_inner(),
            _ => return None,
        };
        entries.push((seq, item));
    }
    Some(FetchReply {
        epoch,
        seq,
        entries,
    })
}
