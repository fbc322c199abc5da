//! Metrics through the `metrics` facade: every name the relay exports and
//! its help text, the recorder, and the Prometheus text [`render`] gives
//! `GET /metrics` (served by `http`: on the relay's own port for loopback
//! clients, or on `--metrics-addr` by `http::metrics_endpoint`).
//!
//! Hot-path counts (frames, bytes, deliveries) accumulate in per-shard
//! `Cell`s and are added to the exported counters once a second by the
//! shard's ticker, so a delivery costs no atomic operation.

use std::cell::Cell;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::addresses::AddressRefusal;
use crate::error::{Context, Result};
use crate::protocol::ErrorCode;

/// The installed recorder's handle, for rendering.
static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

/// The Prometheus text of every metric; `None` before [`install`].
pub fn render() -> Option<String> {
    let handle = HANDLE.get()?;
    handle.run_upkeep();
    Some(handle.render())
}

/// What a metric is, for its `# TYPE` and `# HELP` lines.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric the relay exports, with its help text (`# HELP`).
const DESCRIPTIONS: &[(&str, Kind, &str)] = &[
    (
        "ringcast_build_info",
        Kind::Gauge,
        "Always 1; the labels name the running version.",
    ),
    (
        "ringcast_connections",
        Kind::Gauge,
        "Open WebSocket connections, per shard.",
    ),
    (
        "ringcast_accept_errors_total",
        Kind::Counter,
        "Failed accepts (out of file descriptors, say); each interval's count is also logged.",
    ),
    (
        "ringcast_connections_refused_total",
        Kind::Counter,
        "Connections turned away past --max-connections: answered 503 (or /healthz, /readyz, /metrics), or closed unanswered when too many are being answered already.",
    ),
    (
        "ringcast_tls_handshakes_total",
        Kind::Counter,
        "TLS handshakes, by result: ok, failed (a bad or silent client, or past --handshake-timeout), shed (the worker already ran 256 at once; the connection was closed).",
    ),
    (
        "ringcast_inbound_limited_total",
        Kind::Counter,
        "WebSocket connections closed with 1008 for sending past a per-second limit: limit=\"frames\" (--max-frames-per-second) or limit=\"bytes\" (--max-bytes-per-second).",
    ),
    (
        "ringcast_address_limited_total",
        Kind::Counter,
        "Connections answered 429 because their client address was past a limit: limit=\"open\" (--max-connections-per-address) or limit=\"rate\" (--max-new-connections-per-address).",
    ),
    (
        "ringcast_history_messages",
        Kind::Gauge,
        "Messages kept for since recovery, per owner shard.",
    ),
    (
        "ringcast_history_bytes",
        Kind::Gauge,
        "Bytes the shard's histories are counted for against its share of --history-memory.",
    ),
    (
        "ringcast_inbox_depth",
        Kind::Gauge,
        "Messages from other shards waiting in the shard's inbox after its last burst.",
    ),
    (
        "ringcast_history_evicted_total",
        Kind::Counter,
        "Kept messages forgotten to stay within --history-memory or --history-channels.",
    ),
    (
        "ringcast_latest_values",
        Kind::Gauge,
        "Latest values the shard keeps for snapshot subscribes (one per key per owned channel).",
    ),
    (
        "ringcast_latest_keys_forgotten_total",
        Kind::Counter,
        "Keys whose latest value was forgotten past --max-keys-per-channel.",
    ),
    (
        "ringcast_channels_owned",
        Kind::Gauge,
        "Channels with state on their owner shard.",
    ),
    (
        "ringcast_handshakes_total",
        Kind::Counter,
        "WebSocket handshakes, by result (ok, rejected).",
    ),
    (
        "ringcast_http_requests_total",
        Kind::Counter,
        "HTTP requests answered, by route and status.",
    ),
    (
        "ringcast_publications_total",
        Kind::Counter,
        "Publications sequenced and fanned out by their owner shard.",
    ),
    (
        "ringcast_slow_consumer_total",
        Kind::Counter,
        "Slow-consumer actions, by action: disconnect (connections), drop_oldest and conflate (messages dropped or merged away).",
    ),
    (
        "ringcast_heartbeat_timeouts_total",
        Kind::Counter,
        "Connections dropped for not answering a ping.",
    ),
    (
        "ringcast_ws_protocol_closes_total",
        Kind::Counter,
        "Connections closed for an RFC 6455 violation.",
    ),
    (
        "ringcast_errors_total",
        Kind::Counter,
        "Error events sent to clients, by code.",
    ),
    (
        "ringcast_frames_in_total",
        Kind::Counter,
        "WebSocket frames received.",
    ),
    (
        "ringcast_bytes_in_total",
        Kind::Counter,
        "Bytes received on WebSocket connections.",
    ),
    (
        "ringcast_frames_out_total",
        Kind::Counter,
        "WebSocket frames written.",
    ),
    (
        "ringcast_bytes_out_total",
        Kind::Counter,
        "Bytes written on WebSocket connections.",
    ),
    (
        "ringcast_deliveries_total",
        Kind::Counter,
        "Messages queued to subscribers.",
    ),
    (
        "ringcast_batches_total",
        Kind::Counter,
        "Frames written that carried at least one message.",
    ),
    (
        "ringcast_write_flushes_total",
        Kind::Counter,
        "Held connections released at their deadline (--write-delay).",
    ),
    (
        "ringcast_batch_messages",
        Kind::Histogram,
        "Messages per written frame.",
    ),
    (
        "ringcast_publish_to_write_seconds",
        Kind::Histogram,
        "Time from a publication to the write of the frame carrying it: a live message's age when it leaves (replays and snapshots aside).",
    ),
    (
        "ringcast_conflation_sent_total",
        Kind::Counter,
        "Messages sent on conflating subscriptions (one per subscriber).",
    ),
    (
        "ringcast_conflation_merged_total",
        Kind::Counter,
        "Messages merged away on conflating subscriptions (one per subscriber); over ringcast_conflation_sent_total, the conflation ratio.",
    ),
    (
        "ringcast_pending_bytes",
        Kind::Histogram,
        "Bytes waiting in a connection's outbox, sampled once a second for each connection with any.",
    ),
    (
        "ringcast_redis_ready",
        Kind::Gauge,
        "1 while the Redis backplane can sequence and deliver.",
    ),
    (
        "ringcast_redis_up",
        Kind::Gauge,
        "1 while a Redis connection is up, by role (commands, pubsub).",
    ),
    (
        "ringcast_redis_reconnects_total",
        Kind::Counter,
        "Reconnections of the Redis pub/sub link.",
    ),
    (
        "ringcast_redis_deaf_total",
        Kind::Counter,
        "Times the pub/sub link stopped delivering the node's own probes.",
    ),
    (
        "ringcast_redis_probe_rtt_seconds",
        Kind::Histogram,
        "Round trip of a probe published to Redis and received back.",
    ),
    (
        "ringcast_redis_probe_timeouts_total",
        Kind::Counter,
        "Probes not back within their interval.",
    ),
    (
        "ringcast_redis_rtt_seconds",
        Kind::Histogram,
        "Duration of one publish script call.",
    ),
    (
        "ringcast_redis_publish_batch_messages",
        Kind::Histogram,
        "Publications carried by one publish script call.",
    ),
    (
        "ringcast_redis_pipeline_depth",
        Kind::Gauge,
        "Publish script calls in flight.",
    ),
    (
        "ringcast_redis_subscriptions",
        Kind::Gauge,
        "Channels this node subscribes to in Redis.",
    ),
    (
        "ringcast_redis_gaps_total",
        Kind::Counter,
        "Publications lost beyond Redis history (seen as a seq gap).",
    ),
    (
        "ringcast_redis_lagged_total",
        Kind::Counter,
        "Times the Redis thread fell behind its pub/sub stream and resynced.",
    ),
    (
        "ringcast_redis_raw_messages_total",
        Kind::Counter,
        "Messages a backend published straight into Redis.",
    ),
    (
        "ringcast_redis_bad_envelopes_total",
        Kind::Counter,
        "Malformed messages from Redis dropped.",
    ),
    (
        "ringcast_redis_script_reloads_total",
        Kind::Counter,
        "Times the publish script had to be loaded again.",
    ),
    (
        "ringcast_redis_publish_failures_total",
        Kind::Counter,
        "Publish script calls that failed.",
    ),
];

/// Counters of the Redis backplane without labels: registered when it
/// starts, so they read 0 before their first event.
/// The Redis backplane's metric handles: made once (every counter then
/// shows 0 before its first event), used by the Redis thread and, for
/// what arrives from Redis, by the channels' owners.
pub struct RedisMetrics {
    pub reconnects: Counter,
    pub deaf: Counter,
    pub probe_timeouts: Counter,
    pub gaps: Counter,
    pub lagged: Counter,
    pub raw_messages: Counter,
    pub bad_envelopes: Counter,
    pub script_reloads: Counter,
    pub publish_failures: Counter,
    pub subscriptions: Gauge,
    pub ready: Gauge,
    pub pipeline_depth: Gauge,
    pub commands_up: Gauge,
    pub pubsub_up: Gauge,
    pub publish_batch_messages: Histogram,
    pub rtt: Histogram,
    pub probe_rtt: Histogram,
}

impl RedisMetrics {
    fn new() -> RedisMetrics {
        let counter = |name: &'static str| {
            let c = counter!(name);
            c.absolute(0);
            c
        };
        RedisMetrics {
            reconnects: counter("ringcast_redis_reconnects_total"),
            deaf: counter("ringcast_redis_deaf_total"),
            probe_timeouts: counter("ringcast_redis_probe_timeouts_total"),
            gaps: counter("ringcast_redis_gaps_total"),
            lagged: counter("ringcast_redis_lagged_total"),
            raw_messages: counter("ringcast_redis_raw_messages_total"),
            bad_envelopes: counter("ringcast_redis_bad_envelopes_total"),
            script_reloads: counter("ringcast_redis_script_reloads_total"),
            publish_failures: counter("ringcast_redis_publish_failures_total"),
            subscriptions: gauge!("ringcast_redis_subscriptions"),
            ready: gauge!("ringcast_redis_ready"),
            pipeline_depth: gauge!("ringcast_redis_pipeline_depth"),
            commands_up: gauge!("ringcast_redis_up", "role" => "commands"),
            pubsub_up: gauge!("ringcast_redis_up", "role" => "pubsub"),
            publish_batch_messages: histogram!("ringcast_redis_publish_batch_messages"),
            rtt: histogram!("ringcast_redis_rtt_seconds"),
            probe_rtt: histogram!("ringcast_redis_probe_rtt_seconds"),
        }
    }
}

/// The Redis backplane's metrics, made on first use (after [`install`]).
pub fn redis() -> &'static RedisMetrics {
    static REDIS: std::sync::OnceLock<RedisMetrics> = std::sync::OnceLock::new();
    REDIS.get_or_init(RedisMetrics::new)
}

/// Makes the Redis backplane's counters visible at 0.
pub fn register_redis() {
    redis();
}

/// Buckets for histograms of seconds.
const SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];
/// Buckets for histograms of bytes.
const BYTES: &[f64] = &[
    1024.0,
    4096.0,
    16_384.0,
    65_536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
];
/// Buckets for histograms of counts.
const COUNTS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Installs the global recorder. Every histogram gets buckets, so all are
/// exported as Prometheus histograms (aggregatable across nodes; the
/// exporter would make summaries otherwise).
pub fn install() -> Result<()> {
    let recorder = PrometheusBuilder::new()
        .set_buckets(SECONDS)
        .context("configuring histogram buckets")?
        .set_buckets_for_metric(Matcher::Suffix("_messages".into()), COUNTS)
        .context("configuring histogram buckets")?
        .set_buckets_for_metric(Matcher::Suffix("_bytes".into()), BYTES)
        .context("configuring histogram buckets")?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| crate::error::Error::msg(format!("installing metrics recorder: {e}")))?;
    let _ = HANDLE.set(handle);
    for &(name, kind, help) in DESCRIPTIONS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
    gauge!("ringcast_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(())
}

/// A counter kept in a `Cell` and flushed to its exported counter.
pub struct LocalCounter {
    pending: Cell<u64>,
    exported: Counter,
}

impl LocalCounter {
    fn new(exported: Counter) -> Self {
        LocalCounter {
            pending: Cell::new(0),
            exported,
        }
    }

    #[inline]
    pub fn add(&self, n: u64) {
        self.pending.set(self.pending.get() + n);
    }

    fn flush(&self) {
        let n = self.pending.replace(0);
        if n > 0 {
            self.exported.increment(n);
        }
    }
}

/// The metric handles of one shard, all labelled with its index.
pub struct ShardMetrics {
    pub connections: Gauge,
    pub history_messages: Gauge,
    pub history_bytes: Gauge,
    pub inbox_depth: Gauge,
    pub history_evicted: Counter,
    pub latest_values: Gauge,
    pub latest_keys_forgotten: Counter,
    pub channels_owned: Gauge,
    pub handshakes_ok: Counter,
    pub handshakes_rejected: Counter,
    pub publications: Counter,
    pub slow_disconnect: Counter,
    pub slow_drop_oldest: Counter,
    pub slow_conflate: Counter,
    pub heartbeat_timeouts: Counter,
    pub accept_errors: Counter,
    pub accept_refused_full: Counter,
    pub accept_refused_dropped: Counter,
    address_limited_open: Counter,
    address_limited_rate: Counter,
    pub inbound_limited_frames: Counter,
    pub tls_handshakes_ok: Counter,
    pub tls_handshakes_failed: Counter,
    pub tls_handshakes_shed: Counter,
    pub inbound_limited_bytes: Counter,
    pub ws_violations: Counter,
    errors: Vec<Counter>,
    pub frames_in: LocalCounter,
    pub bytes_in: LocalCounter,
    pub frames_out: LocalCounter,
    pub bytes_out: LocalCounter,
    pub deliveries: LocalCounter,
    pub batches: LocalCounter,
    pub write_flushes: LocalCounter,
    pub batch_messages: Histogram,
    pub publish_to_write: Histogram,
    pub pending_bytes: Histogram,
    pub conflation_sent: LocalCounter,
    pub conflation_merged: LocalCounter,
    /// HTTP request counters by (route, status), made on first use and
    /// kept, so counting allocates nothing after that (allocations made
    /// during handshakes fragment the heap between connections).
    http_requests: std::cell::RefCell<std::collections::HashMap<(&'static str, u16), Counter>>,
    shard: String,
}

impl ShardMetrics {
    pub fn new(shard: usize) -> Self {
        let s = shard.to_string();
        ShardMetrics {
            connections: gauge!("ringcast_connections", "shard" => s.clone()),
            history_messages: gauge!("ringcast_history_messages", "shard" => s.clone()),
            history_bytes: gauge!("ringcast_history_bytes", "shard" => s.clone()),
            inbox_depth: gauge!("ringcast_inbox_depth", "shard" => s.clone()),
            history_evicted: counter!("ringcast_history_evicted_total", "shard" => s.clone()),
            latest_values: gauge!("ringcast_latest_values", "shard" => s.clone()),
            latest_keys_forgotten: counter!("ringcast_latest_keys_forgotten_total", "shard" => s.clone()),
            channels_owned: gauge!("ringcast_channels_owned", "shard" => s.clone()),
            handshakes_ok: counter!("ringcast_handshakes_total", "shard" => s.clone(), "result" => "ok"),
            handshakes_rejected: counter!("ringcast_handshakes_total", "shard" => s.clone(), "result" => "rejected"),
            publications: counter!("ringcast_publications_total", "shard" => s.clone()),
            slow_disconnect: counter!("ringcast_slow_consumer_total", "shard" => s.clone(), "action" => "disconnect"),
            slow_drop_oldest: counter!("ringcast_slow_consumer_total", "shard" => s.clone(), "action" => "drop_oldest"),
            slow_conflate: counter!("ringcast_slow_consumer_total", "shard" => s.clone(), "action" => "conflate"),
            heartbeat_timeouts: counter!("ringcast_heartbeat_timeouts_total", "shard" => s.clone()),
            accept_errors: counter!("ringcast_accept_errors_total", "shard" => s.clone()),
            accept_refused_full: counter!("ringcast_connections_refused_total", "shard" => s.clone(), "action" => "answered"),
            accept_refused_dropped: counter!("ringcast_connections_refused_total", "shard" => s.clone(), "action" => "closed"),
            address_limited_open: counter!("ringcast_address_limited_total", "shard" => s.clone(), "limit" => "open"),
            address_limited_rate: counter!("ringcast_address_limited_total", "shard" => s.clone(), "limit" => "rate"),
            tls_handshakes_ok: counter!("ringcast_tls_handshakes_total", "shard" => s.clone(), "result" => "ok"),
            tls_handshakes_failed: counter!("ringcast_tls_handshakes_total", "shard" => s.clone(), "result" => "failed"),
            tls_handshakes_shed: counter!("ringcast_tls_handshakes_total", "shard" => s.clone(), "result" => "shed"),
            inbound_limited_frames: counter!("ringcast_inbound_limited_total", "shard" => s.clone(), "limit" => "frames"),
            inbound_limited_bytes: counter!("ringcast_inbound_limited_total", "shard" => s.clone(), "limit" => "bytes"),
            ws_violations: counter!("ringcast_ws_protocol_closes_total", "shard" => s.clone()),
            errors: ErrorCode::ALL
                .iter()
                .map(|c| counter!("ringcast_errors_total", "shard" => s.clone(), "code" => c.as_str()))
                .collect(),
            frames_in: LocalCounter::new(counter!("ringcast_frames_in_total", "shard" => s.clone())),
            bytes_in: LocalCounter::new(counter!("ringcast_bytes_in_total", "shard" => s.clone())),
            frames_out: LocalCounter::new(counter!("ringcast_frames_out_total", "shard" => s.clone())),
            bytes_out: LocalCounter::new(counter!("ringcast_bytes_out_total", "shard" => s.clone())),
            deliveries: LocalCounter::new(counter!("ringcast_deliveries_total", "shard" => s.clone())),
            batches: LocalCounter::new(counter!("ringcast_batches_total", "shard" => s.clone())),
            write_flushes: LocalCounter::new(counter!("ringcast_write_flushes_total", "shard" => s.clone())),
            batch_messages: histogram!("ringcast_batch_messages", "shard" => s.clone()),
            publish_to_write: histogram!("ringcast_publish_to_write_seconds", "shard" => s.clone()),
            pending_bytes: histogram!("ringcast_pending_bytes", "shard" => s.clone()),
            conflation_sent: LocalCounter::new(counter!("ringcast_conflation_sent_total", "shard" => s.clone())),
            conflation_merged: LocalCounter::new(counter!("ringcast_conflation_merged_total", "shard" => s.clone())),
            http_requests: Default::default(),
            shard: s,
        }
    }

    /// Counts one answered HTTP request. Routes are a fixed set, so the
    /// label values stay few whatever paths clients ask for.
    pub fn http_request(&self, route: &str, status: u16) {
        let route: &'static str = match route {
            "/ws" => "/ws",
            "/healthz" => "/healthz",
            "/readyz" => "/readyz",
            "/metrics" => "/metrics",
            "/" => "/",
            r if r.starts_with("/publish/") => "/publish",
            "/revoke" => "/revoke",
            _ => "other",
        };
        self.http_requests
            .borrow_mut()
            .entry((route, status))
            .or_insert_with(|| {
                counter!(
                    "ringcast_http_requests_total",
                    "shard" => self.shard.clone(),
                    "route" => route,
                    "status" => status.to_string()
                )
            })
            .increment(1);
    }

    /// A connection refused by its address's limits.
    pub fn address_limited(&self, refusal: AddressRefusal) {
        match refusal {
            AddressRefusal::TooMany => self.address_limited_open.increment(1),
            AddressRefusal::TooFast => self.address_limited_rate.increment(1),
        }
    }

    pub fn error(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.errors[i].increment(1);
        }
    }

    /// Adds the locally accumulated counts to the exported counters.
    pub fn flush(&self) {
        for c in [
            &self.frames_in,
            &self.bytes_in,
            &self.frames_out,
            &self.bytes_out,
            &self.deliveries,
            &self.batches,
            &self.write_flushes,
            &self.conflation_sent,
            &self.conflation_merged,
        ] {
            c.flush();
        }
    }
}
