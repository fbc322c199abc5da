//! Configuration: one plain struct, filled from flags, `RINGCAST_*`
//! environment variables and an optional TOML file, validated once at start.
//!
//! Precedence, highest first: command-line flag, environment variable, config
//! file, built-in default. File keys are the long flag names (`max-pending-bytes
//! = 262144`); an unknown key stops start-up.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, ValueEnum};

/// What to do with a connection whose pending output passes `--max-pending-bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SlowConsumerPolicy {
    /// Close the connection with status 4008; the client may reconnect with `since`.
    Disconnect,
    /// Drop the oldest pending messages; the client sees the seq gap.
    DropOldest,
    /// Merge the pending messages per key (the latest of each stays; the
    /// client sees the seqs skip), then, if that is not enough, do what
    /// --slow-consumer-fallback says.
    Conflate,
}

/// Which I/O driver the worker runtimes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DriverChoice {
    /// io_uring where the kernel allows it, else epoll (with one log line).
    Auto,
    /// io_uring only; start-up fails where it is unavailable.
    Uring,
    /// epoll only.
    Epoll,
}

/// Largest messages the default --max-pending-bytes holds.
const DEFAULT_PENDING_MESSAGES: usize = 16;
/// Largest messages any --max-pending-bytes must hold.
const MIN_PENDING_MESSAGES: usize = 4;
/// Highest --max-message-bytes accepted.
const MAX_MESSAGE_LIMIT: usize = 64 << 20;

/// The relay's configuration: flags, environment and file merged, then
/// checked once by [`Config::load_from`], so the rest of the code trusts
/// it. Options live in sections (server, limits, heartbeat, history,
/// access, Redis), one per concern, which also head `--help`; flag names
/// do not depend on them.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "ringcast",
    version,
    about = "Thread-per-core io_uring WebSocket pub/sub edge relay",
    long_about = "Thread-per-core io_uring WebSocket pub/sub edge relay.\n\n\
        Every option can also be set with an environment variable (shown below) \
        or as `long-name = value` in the TOML file given with --config. \
        Precedence: flag, then environment, then file, then default.",
    args_override_self = true,
    allow_negative_numbers = true
)]
pub struct Config {
    /// Optional TOML file with any of these options (long names as keys).
    #[arg(long, env = "RINGCAST_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ringcast=debug`.
    /// Unset: `RUST_LOG` when that is set, else `info`.
    #[arg(long, env = "RINGCAST_LOG")]
    pub log: Option<String>,

    #[command(flatten)]
    pub server: Server,

    #[command(flatten)]
    pub limits: Limits,

    #[command(flatten)]
    pub heartbeat: Heartbeat,

    #[command(flatten)]
    pub history: HistoryOptions,

    #[command(flatten)]
    pub access: Access,

    #[command(flatten)]
    pub redis: RedisOptions,

    #[command(flatten)]
    pub auth: AuthOptions,

    /// Verifies tokens when `[auth]` names a key (built by `load_from`,
    /// read again on SIGHUP: [`Config::reload_keys`]).
    #[arg(skip)]
    pub verifier: Option<std::sync::Arc<crate::auth::KeyRing>>,

    /// `--allowed-origins`, parsed (by `load_from`); `None`: any.
    #[arg(skip)]
    pub origins: Option<crate::auth::Origins>,

    /// TLS, when --tls-cert and --tls-key are given (built by `load_from`).
    #[arg(skip)]
    pub tls: Option<std::sync::Arc<crate::tls::Tls>>,

    /// The per-address limits, parsed (by `load_from`).
    #[arg(skip)]
    pub address_limits: crate::addresses::AddressLimits,

    /// The backplane --redis / --redis-cluster name, checked (set by
    /// `load_from`).
    #[arg(skip)]
    pub backplane: Backplane,

    /// Options whose value came from their environment variable, so that
    /// errors name the variable (set by `load_from`).
    #[arg(skip)]
    from_env: Vec<(String, String)>,
}

/// The process: addresses, workers, shutdown.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Server")]
pub struct Server {
    /// Address for WebSocket and HTTP (every worker binds it with SO_REUSEPORT).
    /// Port 0 picks a free port; the chosen address is printed at start.
    #[arg(long, env = "RINGCAST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Serve the Prometheus endpoint (GET /metrics) on this address of its
    /// own, to anyone who can reach it. Unset: GET /metrics on --listen,
    /// answered to loopback clients only, so several nodes on one box need
    /// nothing but different --listen addresses. Port 0 picks a free port.
    #[arg(long, env = "RINGCAST_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// PEM certificate chain (leaf first): with --tls-key, every listener
    /// serves TLS (wss:// and https://) on the same port and paths.
    /// Read again on SIGHUP.
    #[arg(long, env = "RINGCAST_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "RINGCAST_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Share --listen with other processes on purpose: for a hot upgrade
    /// (start the new binary on the same address, then SIGTERM the old one,
    /// which steers new connections to the new one and drains), or for
    /// several processes of one relay behind one backplane. Without it, an
    /// address another process listens on stops start-up ("in use").
    #[arg(long, env = "RINGCAST_REUSE_PORT_SHARED")]
    pub reuse_port_shared: bool,

    /// Worker threads, one monoio runtime pinned to a core each.
    /// 0 means one per CPU this process may run on.
    #[arg(long, env = "RINGCAST_WORKERS", default_value_t = 0)]
    pub workers: usize,

    /// I/O driver: auto (io_uring, falling back to epoll), uring or epoll.
    #[arg(long, env = "RINGCAST_DRIVER", value_enum, default_value_t = DriverChoice::Auto)]
    pub driver: DriverChoice,

    /// Pin each worker thread to one CPU of the allowed set.
    #[arg(long, env = "RINGCAST_PIN_WORKERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub pin_workers: bool,

    /// The URL clients reach this node at (`wss://node3.example.com/ws`),
    /// announced in the node directory: `GET /nodes` on every node of the
    /// same Redis lists it with its load, and draining nodes name it in
    /// their 1012. Unset: this node is listed nowhere.
    #[arg(
        long = "advertise-url",
        env = "RINGCAST_ADVERTISE_URL",
        value_name = "URL"
    )]
    pub advertise_url: Option<String>,

    /// On SIGTERM/SIGINT, clients are closed with 1012 spread over this many seconds.
    #[arg(long = "drain-seconds", env = "RINGCAST_DRAIN_SECONDS", default_value = "10", value_name = "SECONDS",
        value_parser = seconds)]
    pub drain: Duration,
}

/// What one client, and the node, may use.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Limits")]
pub struct Limits {
    /// Largest WebSocket message (after reassembly of fragments) or HTTP
    /// publish body, in bytes. Bigger frames are closed with 1009.
    #[arg(long, env = "RINGCAST_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024)]
    pub max_message_bytes: usize,

    /// Most requests one frame (a JSON or MessagePack array) may hold;
    /// a bigger batch is refused with error `too_large`. The message size
    /// limit already bounds the work of one frame: this only catches
    /// absurd batches.
    #[arg(long, env = "RINGCAST_MAX_BATCH_REQUESTS", default_value_t = 1000)]
    pub max_batch_requests: usize,

    /// Most channels one connection may be subscribed to at once;
    /// beyond it, subscribe gets error `too_large`.
    #[arg(long, env = "RINGCAST_MAX_SUBSCRIPTIONS", default_value_t = 1000)]
    pub max_subscriptions: usize,

    /// Most subscriptions this node holds, all connections together;
    /// beyond it, subscribe gets error `unavailable`. One subscription to a
    /// channel nobody else here wants costs about 360 bytes, one to a
    /// channel others already receive about 35.
    #[arg(
        long,
        env = "RINGCAST_MAX_SUBSCRIPTIONS_TOTAL",
        default_value_t = 4_000_000
    )]
    pub max_subscriptions_total: usize,

    /// Bound on one connection's queued output, in bytes (replies and live
    /// messages; a `since` replay is shared with history and not counted).
    /// At least 4 x --max-message-bytes, so a burst of large messages that
    /// a prompt reader takes in stride fits. Default: 16 x --max-message-bytes.
    #[arg(
        long = "max-pending-bytes",
        env = "RINGCAST_MAX_PENDING_BYTES",
        value_name = "MAX_PENDING_BYTES"
    )]
    max_pending_bytes_given: Option<usize>,

    /// --max-pending-bytes as given, or its default (set by `load_from`).
    #[arg(skip)]
    pub max_pending_bytes: usize,

    /// What happens past --max-pending-bytes: disconnect (close 4008),
    /// drop-oldest, or conflate (merge pending messages per key first).
    #[arg(long, env = "RINGCAST_SLOW_CONSUMER", value_enum, default_value_t = SlowConsumerPolicy::Disconnect)]
    pub slow_consumer: SlowConsumerPolicy,

    /// With --slow-consumer conflate: what happens when merging per key
    /// does not bring the connection back under --max-pending-bytes
    /// (disconnect or drop-oldest).
    #[arg(long, env = "RINGCAST_SLOW_CONSUMER_FALLBACK", value_enum, default_value_t = SlowConsumerPolicy::Disconnect)]
    pub slow_consumer_fallback: SlowConsumerPolicy,

    /// Largest batch frame the server coalesces for one connection, in bytes.
    #[arg(long, env = "RINGCAST_MAX_BATCH_BYTES", default_value_t = 64 * 1024)]
    pub max_batch_bytes: usize,

    /// Milliseconds a connection's publications may wait for more to share
    /// their write (0: written on the loop turn they arrive, the default).
    /// A few milliseconds of latency buy fewer, fuller frames, the costly
    /// part of fan-out. Replies, pongs and closes never wait; a full frame,
    /// or half of --max-pending-bytes, goes at once. At most 1000.
    #[arg(long, env = "RINGCAST_WRITE_DELAY", default_value = "0", value_name = "MILLISECONDS",
        value_parser = milliseconds)]
    pub write_delay: Duration,

    /// Seconds a client has to send a whole request head, and then a whole
    /// request body: one deadline each, however the bytes trickle in.
    #[arg(long, env = "RINGCAST_HANDSHAKE_TIMEOUT", default_value = "10", value_name = "SECONDS",
        value_parser = seconds)]
    pub handshake_timeout: Duration,

    /// Client connections this node holds open, of every kind (WebSocket,
    /// HTTP, handshakes under way); beyond it, a new connection is answered
    /// 503 with Retry-After and closed. Default: the process's open-file
    /// limit less a reserve for Redis, metrics scrapes and the answers to
    /// those turned away (1/20 of the limit, between 64 and 4096).
    #[arg(
        long = "max-connections",
        env = "RINGCAST_MAX_CONNECTIONS",
        value_name = "MAX_CONNECTIONS"
    )]
    max_connections_given: Option<usize>,

    /// --max-connections as given, or its default (set by `load_from`).
    #[arg(skip)]
    pub max_connections: usize,

    /// Most connections one client address (IPv4, or IPv6 /64) may hold
    /// open; beyond, 429 with Retry-After. 0: no limit.
    #[arg(
        long,
        env = "RINGCAST_MAX_CONNECTIONS_PER_ADDRESS",
        default_value_t = 1000
    )]
    pub max_connections_per_address: u32,

    /// Most new connections one client address may open per second;
    /// beyond, 429 with Retry-After. 0: no limit.
    #[arg(
        long,
        env = "RINGCAST_MAX_NEW_CONNECTIONS_PER_ADDRESS",
        default_value_t = 100
    )]
    pub max_new_connections_per_address: u32,

    /// Client networks the per-address limits do not apply to, as CIDRs,
    /// comma-separated (`none` for none).
    #[arg(
        long,
        env = "RINGCAST_ADDRESS_LIMITS_EXEMPT",
        value_delimiter = ',',
        default_value = "127.0.0.0/8,::1/128",
        value_name = "CIDR"
    )]
    pub address_limits_exempt: Vec<String>,

    /// Peers (CIDRs, comma-separated) trusted to name the client's address:
    /// by a PROXY protocol v2 header with --proxy-protocol, else by
    /// `X-Forwarded-For`. The per-address limits then count the client.
    #[arg(
        long,
        env = "RINGCAST_TRUSTED_PROXIES",
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub trusted_proxies: Vec<String>,

    /// Connections from --trusted-proxies start with a PROXY protocol v2
    /// header (before TLS); one that does not is closed.
    #[arg(long, env = "RINGCAST_PROXY_PROTOCOL", default_value_t = false, action = clap::ArgAction::Set)]
    pub proxy_protocol: bool,

    /// Publications one WebSocket connection may make per second (counted
    /// per one-second tick); beyond, publish gets error `rate_limited`. 0: no limit.
    #[arg(long, env = "RINGCAST_MAX_PUBLISH_RATE", default_value_t = 1000)]
    pub max_publish_rate: u32,

    /// Subscribes and unsubscribes one WebSocket connection may make per
    /// second (counted per one-second tick); beyond, they get error
    /// `rate_limited`. 0: no limit.
    #[arg(long, env = "RINGCAST_MAX_SUBSCRIBE_RATE", default_value_t = 2000)]
    pub max_subscribe_rate: u32,

    /// Frames (control frames included) one WebSocket connection may send
    /// per second; beyond, it is closed with 1008. 0: no limit.
    #[arg(long, env = "RINGCAST_MAX_FRAMES_PER_SECOND", default_value_t = 2000)]
    pub max_frames_per_second: u32,

    /// Bytes one WebSocket connection may send per second; beyond, it is
    /// closed with 1008. 0: no limit.
    #[arg(long, env = "RINGCAST_MAX_BYTES_PER_SECOND", default_value_t = 4 << 20)]
    pub max_bytes_per_second: u32,
}

impl Limits {
    /// Bytes of publications a connection may hold back under
    /// `--write-delay` before it writes anyway: a full frame, and never
    /// more than half the pending bound, so that waiting never brings a
    /// prompt reader near the slow-consumer policy.
    pub fn held_bytes(&self) -> usize {
        self.max_batch_bytes.min(self.max_pending_bytes / 2)
    }
}

/// Liveness of WebSocket clients.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Heartbeat")]
pub struct Heartbeat {
    /// Seconds of silence from a client before the server pings it.
    #[arg(long, env = "RINGCAST_PING_INTERVAL", default_value = "30", value_name = "SECONDS",
        value_parser = seconds)]
    pub ping_interval: Duration,

    /// Seconds a client has to answer a ping before it is dropped.
    #[arg(long, env = "RINGCAST_PONG_TIMEOUT", default_value = "10", value_name = "SECONDS",
        value_parser = seconds)]
    pub pong_timeout: Duration,
}

/// History kept for since recovery.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "History")]
pub struct HistoryOptions {
    /// Messages kept per channel for `since` recovery.
    #[arg(
        long = "history-size",
        value_name = "MESSAGES",
        env = "RINGCAST_HISTORY_SIZE",
        default_value_t = 100
    )]
    pub size: usize,

    /// Most bytes of history one channel keeps (a message's two encodings
    /// and about 90 bytes of bookkeeping each); the oldest go first. Default:
    /// 1 MiB, or 4 x --max-message-bytes when that is more.
    #[arg(
        long = "history-channel-bytes",
        env = "RINGCAST_HISTORY_CHANNEL_BYTES",
        value_name = "HISTORY_CHANNEL_BYTES"
    )]
    channel_bytes_given: Option<usize>,

    /// --history-channel-bytes as given, or its default (set by `load_from`).
    #[arg(skip)]
    pub channel_bytes: usize,

    /// Most bytes all the node's histories hold together (counted as for
    /// --history-channel-bytes, plus 256 per channel), split evenly between
    /// the workers; past it, the oldest messages of the node go first, and
    /// a `since` that needed them gets `recovered: false`.
    #[arg(long = "history-memory", value_name = "BYTES", env = "RINGCAST_HISTORY_MEMORY", default_value_t = 256 << 20)]
    pub memory: usize,

    /// Most channels that keep history on this node (split evenly between
    /// the workers); past it, the histories of the channels published to
    /// least recently are forgotten first.
    #[arg(
        long = "history-channels",
        value_name = "CHANNELS",
        env = "RINGCAST_HISTORY_CHANNELS",
        default_value_t = 100_000
    )]
    pub channels: usize,

    /// Keys whose latest message one channel keeps for `snapshot`
    /// subscribes, as long as history is kept (--history-ttl); past it,
    /// the key updated least recently is forgotten. 0 keeps none.
    #[arg(
        long = "max-keys-per-channel",
        value_name = "KEYS",
        env = "RINGCAST_MAX_KEYS_PER_CHANNEL",
        default_value_t = 10_000
    )]
    pub keys: usize,

    /// Oldest age of a kept message, in seconds.
    #[arg(long = "history-ttl", env = "RINGCAST_HISTORY_TTL", default_value = "300", value_name = "SECONDS",
        value_parser = seconds)]
    pub ttl: Duration,
}

/// Who may publish.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Access")]
pub struct Access {
    /// API key required by POST /publish (as `Authorization: Bearer KEY`). Unset: open.
    #[arg(long, env = "RINGCAST_PUBLISH_KEY")]
    pub publish_key: Option<String>,

    /// Let WebSocket clients publish when no token is required. Off: only
    /// backends publish (POST /publish); with tokens, their caps decide.
    #[arg(long, env = "RINGCAST_ALLOW_CLIENT_PUBLISH", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_client_publish: bool,

    /// Origins a browser page may open WebSockets from: exact origins
    /// (`https://app.example.com`) or `https://*.example.com`,
    /// comma-separated. Unset: any. A handshake with another `Origin` gets
    /// 403; one without `Origin` (not a browser) is let through.
    #[arg(
        long,
        env = "RINGCAST_ALLOWED_ORIGINS",
        value_delimiter = ',',
        value_name = "ORIGIN"
    )]
    pub allowed_origins: Vec<String>,
}

/// A secret that never shows in debug output or logs.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

/// Tokens: when any key is given, `/ws` requires a JWT.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Authentication")]
pub struct AuthOptions {
    /// HMAC secret (HS256/384/512) that signs tokens; at least 32 bytes.
    /// Prefer --jwt-secret-file or the environment to the command line.
    #[arg(
        long = "jwt-secret",
        env = "RINGCAST_JWT_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub secret: Option<Secret>,

    /// File holding the HMAC secret (one line; surrounding whitespace is
    /// ignored).
    #[arg(
        long = "jwt-secret-file",
        env = "RINGCAST_JWT_SECRET_FILE",
        value_name = "PATH"
    )]
    pub secret_file: Option<std::path::PathBuf>,

    /// PEM public key (RSA: RS*/PS*, EC: ES256/384, Ed25519: EdDSA) that
    /// signs tokens; repeat (or comma-separate) to rotate keys.
    #[arg(
        long = "jwt-public-key",
        env = "RINGCAST_JWT_PUBLIC_KEY",
        value_delimiter = ',',
        value_name = "PATH"
    )]
    pub public_keys: Vec<std::path::PathBuf>,

    /// JWKS file of the keys that sign tokens (a key is picked by `kid`).
    #[arg(long = "jwks-file", env = "RINGCAST_JWKS_FILE", value_name = "PATH")]
    pub jwks_file: Option<std::path::PathBuf>,

    /// Required `iss` of every token.
    #[arg(long = "jwt-issuer", env = "RINGCAST_JWT_ISSUER")]
    pub issuer: Option<String>,

    /// Required `aud` of every token.
    #[arg(long = "jwt-audience", env = "RINGCAST_JWT_AUDIENCE")]
    pub audience: Option<String>,
}

/// The Redis backplane.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Redis backplane")]
pub struct RedisOptions {
    /// Use one Redis (or Sentinel) as the backplane between nodes, e.g.
    /// `redis://127.0.0.1:6379/0` or
    /// `redis-sentinel://host:26379/0?sentinelServiceName=mymaster`;
    /// `rediss://` and `rediss-sentinel://` connect over TLS and verify the
    /// server's certificate (see --redis-ca-file).
    /// Unset (and no --redis-cluster): the embedded, single-node backplane.
    #[arg(
        long = "redis",
        value_name = "URL",
        env = "RINGCAST_REDIS",
        conflicts_with = "cluster"
    )]
    pub url: Option<String>,

    /// Use a Redis Cluster as the backplane: comma-separated seed nodes
    /// (`host:port,host:port`; the rest of the cluster is discovered).
    /// Seeds written `rediss://host:port` connect over TLS (all or none).
    /// Needs Redis 7 (sharded pub/sub).
    #[arg(
        long = "redis-cluster",
        value_name = "HOST:PORT",
        env = "RINGCAST_REDIS_CLUSTER",
        value_delimiter = ','
    )]
    pub cluster: Vec<String>,

    /// Prefix of every Redis key and pub/sub channel ringcast uses.
    #[arg(
        long = "redis-prefix",
        value_name = "PREFIX",
        env = "RINGCAST_REDIS_PREFIX",
        default_value = "ringcast:"
    )]
    pub prefix: String,

    /// Seconds between the probe messages a node publishes to itself through
    /// Redis; three missed in a row mark the pub/sub link deaf (reconnect).
    #[arg(long = "redis-probe-interval", env = "RINGCAST_REDIS_PROBE_INTERVAL", default_value = "1.0", value_name = "SECONDS",
        value_parser = fractional_seconds)]
    pub probe_interval: Duration,

    /// Seconds a quiet channel's seq and epoch stay in Redis after its last
    /// publication (then it starts again at 1 under a new epoch).
    #[arg(long = "redis-state-ttl", env = "RINGCAST_REDIS_STATE_TTL", default_value = "86400", value_name = "SECONDS",
        value_parser = seconds)]
    pub state_ttl: Duration,

    /// PEM file of the certificate authorities that sign Redis's
    /// certificate, for `rediss://`. Unset: the system's trusted roots.
    #[arg(
        long = "redis-ca-file",
        env = "RINGCAST_REDIS_CA_FILE",
        value_name = "PATH"
    )]
    pub ca_file: Option<std::path::PathBuf>,

    /// PEM certificate (chain) this node presents to Redis over TLS, for a
    /// Redis that authenticates clients (`tls-auth-clients yes`, Redis's
    /// default); with --redis-client-key.
    #[arg(
        long = "redis-client-cert",
        env = "RINGCAST_REDIS_CLIENT_CERT",
        value_name = "PATH"
    )]
    pub client_cert: Option<std::path::PathBuf>,

    /// PEM private key of --redis-client-cert.
    #[arg(
        long = "redis-client-key",
        env = "RINGCAST_REDIS_CLIENT_KEY",
        value_name = "PATH"
    )]
    pub client_key: Option<std::path::PathBuf>,
}

/// The backplane between the shards of this node and other nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Backplane {
    /// In-process: this node is the whole relay.
    #[default]
    Embedded,
    /// One Redis, or a Sentinel group, by URL (`redis://`,
    /// `redis-sentinel://`, and their TLS forms `rediss://`,
    /// `rediss-sentinel://`).
    Redis { url: String },
    /// A Redis Cluster, by its seed nodes, over TLS when `tls`.
    RedisCluster {
        seeds: Vec<(String, u16)>,
        tls: bool,
    },
}

impl Backplane {
    /// Redis is reached over TLS.
    pub fn uses_tls(&self) -> bool {
        match self {
            Backplane::Embedded => false,
            Backplane::Redis { url } => url
                .split_once("://")
                .is_some_and(|(scheme, _)| scheme.to_ascii_lowercase().starts_with("rediss")),
            Backplane::RedisCluster { tls, .. } => *tls,
        }
    }
}

/// Refuses, with a sentence an operator can act on, URLs the Redis client
/// would misread: no scheme, or one it does not speak.
fn check_redis_url(url: &str) -> Result<(), String> {
    let url = url.trim();
    if url.is_empty() {
        return Err("the URL is empty; give one like redis://127.0.0.1:6379/0".into());
    }
    let Some((scheme, _)) = url.split_once("://") else {
        return Err(
            "not a Redis URL: give one like redis://127.0.0.1:6379/0 or \
             redis-sentinel://host:26379/0?sentinelServiceName=mymaster"
                .into(),
        );
    };
    match scheme.to_ascii_lowercase().as_str() {
        "redis" | "redis-sentinel" | "rediss" | "rediss-sentinel" => {}
        other => {
            return Err(format!(
                "unknown scheme `{other}://`; use redis://, rediss:// (TLS), \
                 redis-sentinel:// or rediss-sentinel://"
            ))
        }
    }
    let parsed = url::Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("the URL names no host".into());
    }
    Ok(())
}

/// One `host:port` seed of --redis-cluster (`[::1]:7000` for IPv6).
/// A URL a browser can open a WebSocket to, and short enough for a close
/// reason to name it.
fn check_advertise_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("not a valid URL: {e}"))?;
    if !matches!(parsed.scheme(), "ws" | "wss") {
        return Err("use a ws:// or wss:// URL, e.g. wss://node1.example.com/ws".into());
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("the URL names no host".into());
    }
    if url.len() > 100 {
        return Err("longer than 100 bytes (a 1012 close reason could not name it)".into());
    }
    Ok(())
}

/// A cluster seed, `host:port` or `redis[s]://host:port`; true when it
/// asks for TLS.
fn parse_seed(node: &str) -> Result<((String, u16), bool), String> {
    let (tls, address) = match node.split_once("://") {
        None => (false, node),
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "redis" => (false, rest),
            "rediss" => (true, rest),
            other => {
                return Err(format!(
                    "`{node}`: unknown scheme `{other}://`; use host:port, redis:// or rediss://"
                ))
            }
        },
    };
    let address = address.trim_end_matches('/');
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("`{node}` is not host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{node}` has no valid port"))?;
    Ok(((host.trim_matches(['[', ']']).to_string(), port), tls))
}

/// Why configuration could not be loaded.
#[derive(Debug)]
pub enum ConfigError {
    /// A command-line problem, or `--help` / `--version`: clap prints it and
    /// picks the exit code (`ConfigError::exit`).
    CommandLine(clap::Error),
    /// A bad file or an invalid value: one line for the operator.
    Invalid(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::CommandLine(e) => write!(f, "{e}"),
            ConfigError::Invalid(m) => write!(f, "{m}"),
        }
    }
}

/// The first line of a clap error, without its `error: ` prefix.
fn one_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

impl Config {
    /// Parses flags, environment and the optional file, then validates.
    pub fn load() -> Result<Config, ConfigError> {
        Self::load_from(std::env::args_os().collect())
    }

    pub fn load_from(args: Vec<std::ffi::OsString>) -> Result<Config, ConfigError> {
        let first = Config::try_parse_from(&args).map_err(|e| name_the_source(e, &args))?;
        let config = match &first.config {
            None => first,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ConfigError::Invalid(format!("reading config file {}: {e}", path.display()))
                })?;
                let file_args = file_to_args(&text).map_err(|e| {
                    ConfigError::Invalid(format!("config file {}: {e}", path.display()))
                })?;
                // File values go first so that flags given on the command line,
                // which come later, win.
                let mut merged = vec![args[0].clone()];
                merged.extend(file_args.into_iter().map(Into::into));
                merged.extend(args.iter().skip(1).cloned());
                Config::try_parse_from(merged).map_err(|e| {
                    ConfigError::Invalid(format!(
                        "config file {}: {}",
                        path.display(),
                        one_line(&e)
                    ))
                })?
            }
        };
        let mut config = config;
        config.from_env = from_environment(&args);
        config.limits.max_pending_bytes = config
            .limits
            .max_pending_bytes_given
            .unwrap_or(DEFAULT_PENDING_MESSAGES.saturating_mul(config.limits.max_message_bytes));
        config.history.channel_bytes = config
            .history
            .channel_bytes_given
            .unwrap_or((1 << 20).max(config.limits.max_message_bytes.saturating_mul(4)));
        config.limits.max_connections = config
            .limits
            .max_connections_given
            .unwrap_or_else(|| connections_within(open_file_limit()));
        config.backplane = config.choose_backplane().map_err(ConfigError::Invalid)?;
        config.check_redis_tls().map_err(ConfigError::Invalid)?;
        config.validate().map_err(ConfigError::Invalid)?;
        config.tls = match (&config.server.tls_cert, &config.server.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(std::sync::Arc::new(
                crate::tls::Tls::new(cert, key)
                    .map_err(|e| ConfigError::Invalid(format!("invalid configuration: {e}")))?,
            )),
            _ => {
                return Err(ConfigError::Invalid(
                    "invalid configuration: --tls-cert and --tls-key go together".into(),
                ))
            }
        };
        config.address_limits = config
            .parse_address_limits()
            .map_err(|e| ConfigError::Invalid(format!("invalid configuration: {e}")))?;
        config.origins = crate::auth::Origins::parse(&config.access.allowed_origins)
            .map_err(|e| ConfigError::Invalid(format!("invalid configuration: {e}")))?;
        config.verifier = config
            .load_verifier()
            .map_err(|e| ConfigError::Invalid(format!("invalid configuration: {e}")))?
            .map(|v| std::sync::Arc::new(crate::auth::KeyRing::new(v)));
        Ok(config)
    }

    fn parse_address_limits(&self) -> Result<crate::addresses::AddressLimits, String> {
        let trusted_proxies = cidrs("--trusted-proxies", &self.limits.trusted_proxies)?;
        if self.limits.proxy_protocol && trusted_proxies.is_empty() {
            return Err("--proxy-protocol needs --trusted-proxies (the peers that send it)".into());
        }
        Ok(crate::addresses::AddressLimits {
            open: self.limits.max_connections_per_address,
            per_second: self.limits.max_new_connections_per_address,
            exempt: cidrs(
                "--address-limits-exempt",
                &self.limits.address_limits_exempt,
            )?,
            trusted_proxies,
        })
    }

    /// Reads the key files again (SIGHUP) and puts them in use; on any
    /// error the keys in use stay, and the error is returned to be logged.
    /// `Ok(false)`: no keys are configured, so there is nothing to read.
    pub fn reload_keys(&self) -> Result<bool, String> {
        let Some(ring) = &self.verifier else {
            return Ok(false);
        };
        match self.load_verifier()? {
            Some(verifier) => {
                ring.replace(verifier);
                Ok(true)
            }
            None => Err("the configuration names no key any more".into()),
        }
    }

    /// Reads the keys `[auth]` names; `None` when it names none.
    fn load_verifier(&self) -> Result<Option<crate::auth::Verifier>, String> {
        let auth = &self.auth;
        let read = |flag: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
        };
        let mut secrets = Vec::new();
        if let Some(secret) = &auth.secret {
            secrets.push(secret.0.trim().as_bytes().to_vec());
        }
        if let Some(path) = &auth.secret_file {
            let bytes = read("--jwt-secret-file", path)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| format!("--jwt-secret-file {}: not UTF-8", path.display()))?;
            secrets.push(text.trim().as_bytes().to_vec());
        }
        let mut public_keys = Vec::new();
        for path in &auth.public_keys {
            public_keys.push((path.display().to_string(), read("--jwt-public-key", path)?));
        }
        let jwks = match &auth.jwks_file {
            None => None,
            Some(path) => {
                let bytes = read("--jwks-file", path)?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| format!("--jwks-file {}: not UTF-8", path.display()))?;
                Some((path.display().to_string(), text))
            }
        };
        crate::auth::Verifier::new(crate::auth::KeySources {
            secrets: secrets.iter().map(Vec::as_slice).collect(),
            public_keys: public_keys
                .iter()
                .map(|(origin, pem)| (origin.as_str(), pem.as_slice()))
                .collect(),
            jwks: jwks.as_ref().map(|(o, t)| (o.as_str(), t.as_str())),
            issuer: auth.issuer.clone(),
            audience: auth.audience.clone(),
        })
    }

    /// Sockets accepted past --max-connections only to be answered 503:
    /// they use the descriptors the default leaves in reserve.
    pub fn overflow_connections(&self) -> usize {
        descriptor_reserve(open_file_limit()) as usize / 2
    }

    /// When --max-connections was given above what the open-file limit
    /// allows, the warning to log at start.
    pub fn file_limit_warning(&self) -> Option<String> {
        let limit = open_file_limit();
        let fits = connections_within(limit);
        (self.limits.max_connections > fits).then(|| {
            format!(
                "{} {} is more than the open-file limit ({limit}) allows with its reserve \
                 ({fits}); past that, new clients get 503 from a reserve descriptor. Raise \
                 LimitNOFILE (systemd) or `ulimit -n`",
                self.shown("max-connections"),
                self.limits.max_connections
            )
        })
    }

    /// How to name option `long` in an error: its environment variable when
    /// that is where the value came from, else the flag.
    fn shown(&self, long: &str) -> String {
        self.from_env
            .iter()
            .find(|(l, _)| l == long)
            .map_or_else(|| format!("--{long}"), |(_, env)| env.clone())
    }

    /// The log filter in effect: --log (or RINGCAST_LOG), else RUST_LOG,
    /// else `info`.
    pub fn log_filter(&self) -> (String, &'static str) {
        match (&self.log, std::env::var("RUST_LOG")) {
            (Some(log), _) => (log.clone(), "--log"),
            (None, Ok(rust_log)) if !rust_log.trim().is_empty() => (rust_log, "RUST_LOG"),
            _ => ("info".into(), "--log"),
        }
    }

    /// Checks relations between values once, so the rest of the code can trust them.
    pub fn validate(&self) -> Result<(), String> {
        let fail = |m: String| Err(format!("invalid configuration: {m}"));
        if let Some(url) = &self.server.advertise_url {
            if let Err(e) = check_advertise_url(url) {
                return fail(format!("{} `{url}`: {e}", self.shown("advertise-url")));
            }
        }
        if self.limits.slow_consumer_fallback == SlowConsumerPolicy::Conflate {
            return fail(format!(
                "{} must be disconnect or drop-oldest",
                self.shown("slow-consumer-fallback")
            ));
        }
        if !(128..=MAX_MESSAGE_LIMIT).contains(&self.limits.max_message_bytes) {
            return fail(format!(
                "--max-message-bytes must be between 128 and {MAX_MESSAGE_LIMIT} (64 MiB)"
            ));
        }
        if self.limits.max_connections == 0 {
            return fail(format!(
                "{} must be at least 1",
                self.shown("max-connections")
            ));
        }
        if self.limits.max_batch_requests == 0 {
            return fail("--max-batch-requests must be at least 1".into());
        }
        let least = MIN_PENDING_MESSAGES * self.limits.max_message_bytes;
        if self.limits.max_pending_bytes < least {
            return fail(format!(
                "--max-pending-bytes ({}) must be at least {MIN_PENDING_MESSAGES} x --max-message-bytes ({least}), \
                 so a burst of the largest messages does not disconnect a client that reads",
                self.limits.max_pending_bytes
            ));
        }
        if self.limits.max_batch_bytes < 1024 {
            return fail("--max-batch-bytes must be at least 1024".into());
        }
        if self.limits.write_delay > Duration::from_secs(1) {
            return fail(
                "--write-delay must be at most 1000 milliseconds (for slower feeds, subscribe with conflate)"
                    .into(),
            );
        }
        if self.limits.handshake_timeout.is_zero() {
            return fail("--handshake-timeout must be at least 1 second".into());
        }
        if self.heartbeat.ping_interval.is_zero() || self.heartbeat.pong_timeout.is_zero() {
            return fail("--ping-interval and --pong-timeout must be at least 1 second".into());
        }
        if self.history.memory < 1 << 20 {
            return fail(format!(
                "{} must be at least 1048576 (1 MiB)",
                self.shown("history-memory")
            ));
        }
        if self.history.channels == 0 {
            return fail(format!(
                "{} must be at least 1",
                self.shown("history-channels")
            ));
        }
        if self.history.ttl.is_zero() && self.history.size > 0 {
            return fail("--history-ttl must be at least 1 second when history is kept".into());
        }
        if self.server.workers > 128 {
            return fail(format!(
                "--workers {} is more than 128",
                self.server.workers
            ));
        }
        if self.server.listen.port() != 0 && Some(self.server.listen) == self.server.metrics_addr {
            return fail(
                "--listen and --metrics-addr must differ (leave --metrics-addr unset to serve \
                 /metrics on --listen to loopback clients)"
                    .into(),
            );
        }
        let (filter, source) = self.log_filter();
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&filter) {
            return fail(format!(
                "{source} `{filter}` is not a valid log filter: {e}"
            ));
        }
        if self
            .redis
            .prefix
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return fail("--redis-prefix must not contain whitespace or control characters".into());
        }
        if !(Duration::from_millis(50)..=Duration::from_secs(60))
            .contains(&self.redis.probe_interval)
        {
            return fail("--redis-probe-interval must be between 0.05 and 60 seconds".into());
        }
        if self.redis.state_ttl < self.history.ttl {
            return fail("--redis-state-ttl must be at least --history-ttl".into());
        }
        if let Some(key) = &self.access.publish_key {
            if key.is_empty() {
                return fail("--publish-key must not be empty".into());
            }
        }
        Ok(())
    }

    /// True when a Redis (standalone, Sentinel or Cluster) backplane is configured.
    pub fn uses_redis(&self) -> bool {
        self.backplane != Backplane::Embedded
    }

    /// The Redis TLS files go with a TLS backplane, the client certificate
    /// with its key.
    fn check_redis_tls(&self) -> Result<(), String> {
        let redis = &self.redis;
        let given =
            redis.ca_file.is_some() || redis.client_cert.is_some() || redis.client_key.is_some();
        if given && !self.backplane.uses_tls() {
            return Err(
                "invalid configuration: --redis-ca-file, --redis-client-cert and \
                 --redis-client-key are for Redis over TLS: use a rediss:// URL (or \
                 rediss:// cluster seeds)"
                    .into(),
            );
        }
        if redis.client_cert.is_some() != redis.client_key.is_some() {
            return Err(
                "invalid configuration: --redis-client-cert and --redis-client-key go together"
                    .into(),
            );
        }
        Ok(())
    }

    /// The backplane the options name, or why they name none.
    fn choose_backplane(&self) -> Result<Backplane, String> {
        if let Some(url) = &self.redis.url {
            let source = self.shown("redis");
            check_redis_url(url)
                .map_err(|e| format!("invalid configuration: {source} `{url}`: {e}"))?;
            return Ok(Backplane::Redis {
                url: url.trim().to_string(),
            });
        }
        if self.redis.cluster.is_empty() {
            return Ok(Backplane::Embedded);
        }
        let shown = self.redis.cluster.join(",");
        let parsed: Vec<_> = self
            .redis
            .cluster
            .iter()
            .map(|node| parse_seed(node))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("invalid configuration: --redis-cluster {shown}: {e}"))?;
        let tls = parsed.first().is_some_and(|(_, tls)| *tls);
        if parsed.iter().any(|(_, t)| *t != tls) {
            return Err(format!(
                "invalid configuration: --redis-cluster {shown}: seeds mix rediss:// (TLS) \
                 and plain ones; a cluster is reached one way"
            ));
        }
        Ok(Backplane::RedisCluster {
            seeds: parsed.into_iter().map(|(seed, _)| seed).collect(),
            tls,
        })
    }
}

/// A whole number of seconds, as options that take seconds are given.
fn seconds(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("`{text}` is not a whole number of seconds"))
}

/// A whole number of milliseconds.
fn milliseconds(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<u64>()
        .map(Duration::from_millis)
        .map_err(|_| format!("`{text}` is not a whole number of milliseconds"))
}

/// Seconds, possibly with a fraction (`0.25`).
fn fractional_seconds(text: &str) -> Result<Duration, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .and_then(|s| Duration::try_from_secs_f64(s).ok())
        .ok_or_else(|| format!("`{text}` is not a number of seconds"))
}

/// This process's open-file limit (the soft one, which is what counts;
/// `runtime::raise_file_limit` lifts it to the hard one at start).
pub fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}

/// Descriptors kept out of --max-connections' default for everything else
/// the relay opens.
fn descriptor_reserve(limit: u64) -> u64 {
    (limit / 20).clamp(64, 4096)
}

/// The most client connections `limit` open files allow, with the reserve.
fn connections_within(limit: u64) -> usize {
    limit.saturating_sub(descriptor_reserve(limit)).max(1) as usize
}

/// (long name, variable) of every option whose value the environment gave.
fn from_environment(args: &[std::ffi::OsString]) -> Vec<(String, String)> {
    let command = <Config as clap::CommandFactory>::command();
    let Ok(matches) = command.clone().try_get_matches_from(args) else {
        return Vec::new();
    };
    command
        .get_arguments()
        .filter(|a| {
            matches.value_source(a.get_id().as_str())
                == Some(clap::parser::ValueSource::EnvVariable)
        })
        .filter_map(|a| {
            Some((
                a.get_long()?.to_string(),
                a.get_env()?.to_string_lossy().into_owned(),
            ))
        })
        .collect()
}

/// A clap error about a value that came from the environment names the
/// variable (`RINGCAST_WORKERS`), not the flag the user never typed.
fn name_the_source(e: clap::Error, args: &[std::ffi::OsString]) -> ConfigError {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return ConfigError::CommandLine(e);
    };
    let Some(long) = arg
        .split_whitespace()
        .next()
        .and_then(|a| a.strip_prefix("--"))
    else {
        return ConfigError::CommandLine(e);
    };
    let typed = args.iter().any(|a| {
        let a = a.to_string_lossy();
        a == format!("--{long}") || a.starts_with(&format!("--{long}="))
    });
    let env = <Config as clap::CommandFactory>::command()
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()));
    match env {
        Some(env) if !typed && std::env::var_os(&env).is_some() => {
            ConfigError::Invalid(one_line(&e).replacen(&format!("'{arg}'"), &env, 1))
        }
        _ => ConfigError::CommandLine(e),
    }
}

/// The networks a list of CIDRs (or single addresses) names; empty
/// entries and `none` name none.
fn cidrs(flag: &str, list: &[String]) -> Result<Vec<ipnet::IpNet>, String> {
    let mut nets = Vec::new();
    for cidr in list {
        let cidr = cidr.trim();
        if cidr.is_empty() || cidr.eq_ignore_ascii_case("none") {
            continue;
        }
        let net = cidr
            .parse::<ipnet::IpNet>()
            .or_else(|_| cidr.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| format!("{flag} `{cidr}` is not a CIDR"))?;
        nets.push(net);
    }
    Ok(nets)
}

/// The file's sections: the fields of [`Config`] that hold them, and the
/// `--help` heading their options are listed under.
const SECTIONS: &[(&str, &str)] = &[
    ("server", "Server"),
    ("limits", "Limits"),
    ("heartbeat", "Heartbeat"),
    ("history", "History"),
    ("access", "Access"),
    ("redis", "Redis backplane"),
    ("auth", "Authentication"),
];

/// One option as the file may name it.
struct FileKey {
    /// The flag it becomes.
    long: String,
    /// Its field in its section (`size` of `[history]`), `-` for `_`.
    field: String,
    /// Its section, if it has one.
    section: Option<&'static str>,
    env: Option<String>,
    /// Takes a comma-separated list.
    delimited: bool,
}

/// Every option the file may set.
fn file_keys() -> Vec<FileKey> {
    <Config as clap::CommandFactory>::command()
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?.to_string();
            let section = a.get_help_heading().and_then(|heading| {
                SECTIONS
                    .iter()
                    .find(|(_, h)| *h == heading)
                    .map(|(section, _)| *section)
            });
            Some(FileKey {
                long,
                field: a.get_id().as_str().replace('_', "-"),
                section,
                env: a.get_env().map(|e| e.to_string_lossy().into_owned()),
                delimited: a.get_value_delimiter().is_some(),
            })
        })
        .collect()
}

/// The closest of `names` to `key`, if any is close.
fn did_you_mean<'a>(key: &str, names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    names
        .map(|name| (strsim::jaro_winkler(name, key), name))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, name)| name)
}

/// Reads the TOML file into `--flag=value` arguments, so that one parser
/// checks flags, environment and file alike. Keys are the options' long
/// flag names at the top level (`history-size = 500`), or their fields in
/// the sections of the configuration (`[history]` then `size = 500`).
/// Options set in the environment are skipped: it takes precedence over
/// the file.
fn file_to_args(text: &str) -> Result<Vec<String>, String> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let Some(span) = e.span() else {
            return e.message().to_string();
        };
        let before = &text[..span.start.min(text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
        format!("line {line}, column {column}: {message}")
    })?;
    let keys = file_keys();
    let mut args = Vec::new();
    for (key, value) in table {
        if let (Some(section), toml::Value::Table(entries)) =
            (SECTIONS.iter().find(|(s, _)| *s == key), &value)
        {
            for (field, value) in entries {
                let wanted = field.replace('_', "-");
                let in_section = || keys.iter().filter(|k| k.section == Some(section.0));
                let Some(option) = in_section().find(|k| k.field == wanted || k.long == wanted)
                else {
                    let fields = in_section().map(|k| k.field.as_str());
                    return Err(match did_you_mean(&wanted, fields) {
                        Some(close) => {
                            format!("unknown key `{field}` in [{key}] (did you mean `{close}`?)")
                        }
                        None => format!("unknown key `{field}` in [{key}]"),
                    });
                };
                push_file_arg(&mut args, option, &format!("{key}.{field}"), value.clone())?;
            }
            continue;
        }
        let Some(option) = keys.iter().find(|k| k.long == key) else {
            return Err(
                match did_you_mean(&key, keys.iter().map(|k| k.long.as_str())) {
                    Some(long) => format!("unknown key `{key}` (did you mean `{long}`?)"),
                    None => format!("unknown key `{key}`"),
                },
            );
        };
        push_file_arg(&mut args, option, &key, value)?;
    }
    Ok(args)
}

/// Adds `--long=value` for one file entry named `shown`.
fn push_file_arg(
    args: &mut Vec<String>,
    option: &FileKey,
    shown: &str,
    value: toml::Value,
) -> Result<(), String> {
    if option.long == "config" {
        return Err("`config` cannot be set from a config file".into());
    }
    if option
        .env
        .as_ref()
        .is_some_and(|e| std::env::var_os(e).is_some())
    {
        return Ok(());
    }
    let value = match value {
        toml::Value::String(s) => s,
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        // A list of strings, for options that take several (the seeds of
        // --redis-cluster).
        toml::Value::Array(items) if option.delimited => {
            let items: Option<Vec<&str>> = items.iter().map(toml::Value::as_str).collect();
            match items {
                Some(items) => items.join(","),
                None => return Err(format!("`{shown}` must be a list of strings")),
            }
        }
        other => return Err(format!("`{shown}` has an unsupported value {other}")),
    };
    args.push(format!("--{}={value}", option.long));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut v: Vec<std::ffi::OsString> = vec!["ringcast".into()];
        v.extend(args.iter().map(Into::into));
        Config::load_from(v).map_err(|e| match e {
            ConfigError::CommandLine(e) => one_line(&e),
            ConfigError::Invalid(m) => m,
        })
    }

    #[test]
    fn write_delay_is_off_by_default_and_whole_milliseconds_up_to_a_second() {
        assert!(parse(&[]).unwrap().limits.write_delay.is_zero());
        let delay = |v: &str| parse(&["--write-delay", v]).map(|c| c.limits.write_delay);
        assert_eq!(delay("20"), Ok(Duration::from_millis(20)));
        assert_eq!(delay("1000"), Ok(Duration::from_secs(1)));
        assert!(delay("1001")
            .unwrap_err()
            .contains("at most 1000 milliseconds"));
        for bad in ["-1", "0.5", "5ms"] {
            let e = delay(bad).unwrap_err();
            assert!(e.contains("whole number of milliseconds"), "{bad}: {e}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.limits.max_message_bytes, 65536);
        assert_eq!(c.history.size, 100);
        assert_eq!(c.limits.slow_consumer, SlowConsumerPolicy::Disconnect);
        assert_eq!(c.limits.max_batch_requests, 1000);
        assert_eq!(c.limits.max_pending_bytes, 16 * 65536);
        // Nothing is open that the operator did not open.
        assert!(!c.access.allow_client_publish);
        assert!(c.verifier.is_none() && c.origins.is_none());
    }

    #[test]
    fn conflating_slow_consumers_fall_back_to_disconnect_or_drop_oldest() {
        let c = parse(&["--slow-consumer", "conflate"]).unwrap();
        assert_eq!(c.limits.slow_consumer, SlowConsumerPolicy::Conflate);
        assert_eq!(
            c.limits.slow_consumer_fallback,
            SlowConsumerPolicy::Disconnect
        );
        assert_eq!(c.history.keys, 10_000);
        let e = parse(&["--slow-consumer-fallback", "conflate"]).unwrap_err();
        assert!(
            e.contains("--slow-consumer-fallback must be disconnect or drop-oldest"),
            "{e}"
        );
    }

    #[test]
    fn keys_and_origins_are_read_once_at_start_and_bad_ones_stop_it() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "  a secret of at least thirty-two bytes long\n").unwrap();
        let c = parse(&["--jwt-secret-file", secret.to_str().unwrap()]).unwrap();
        assert!(c.verifier.is_some());
        let file = dir.path().join("r.toml");
        let section = format!(
            "[auth]\nsecret-file = {:?}\nissuer = \"i\"\n",
            secret.to_str().unwrap()
        );
        std::fs::write(&file, section).unwrap();
        let c = parse(&["--config", file.to_str().unwrap()]).unwrap();
        assert!(c.verifier.is_some());
        assert_eq!(c.auth.issuer.as_deref(), Some("i"));
        let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/");
        let c = parse(&[
            "--jwt-public-key",
            &format!("{keys}rsa.pub,{keys}ec.pub"),
            "--jwt-public-key",
            &format!("{keys}ed.pub"),
        ])
        .unwrap();
        assert!(c.verifier.is_some());
        for (args, why) in [
            (vec!["--jwt-secret", "short"], "at least 32 bytes"),
            (
                vec!["--jwt-public-key", "/nonexistent.pem"],
                "--jwt-public-key /nonexistent.pem",
            ),
            (
                vec!["--jwt-public-key", secret.to_str().unwrap()],
                "not an RSA, EC or Ed25519",
            ),
            (vec!["--jwks-file", secret.to_str().unwrap()], "not a JWKS"),
            (vec!["--allowed-origins", "example.com"], "is not an origin"),
            (
                vec!["--proxy-protocol", "true"],
                "--proxy-protocol needs --trusted-proxies",
            ),
            (vec!["--trusted-proxies", "10.0.0.0/33"], "is not a CIDR"),
        ] {
            let e = parse(&args).unwrap_err();
            assert!(e.contains(why), "{args:?}: {e}");
            assert!(e.starts_with("invalid configuration: "), "{e}");
        }
        let c = parse(&[
            "--allowed-origins",
            "https://a.example.com,https://*.example.org",
        ])
        .unwrap();
        assert!(c.origins.unwrap().allows("https://x.example.org"));
    }

    #[test]
    fn values_are_named_as_the_user_gave_them() {
        let e = parse(&["--history-size", "-1"]).unwrap_err();
        assert!(e.contains("invalid value '-1' for '--history-size"), "{e}");
        let e = parse(&["--log", "ringcast=loud"]).unwrap_err();
        assert!(
            e.contains("--log `ringcast=loud` is not a valid log filter"),
            "{e}"
        );
        assert!(parse(&["--log", "warn,ringcast=debug"]).is_ok());
    }

    #[test]
    fn history_budgets_follow_the_message_limit_and_refuse_nonsense() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.history.channel_bytes, 1 << 20);
        assert_eq!(c.history.memory, 256 << 20);
        let c = parse(&["--max-message-bytes", "1048576"]).unwrap();
        assert_eq!(c.history.channel_bytes, 4 << 20, "4 x the largest message");
        let e = parse(&["--history-memory", "1000"]).unwrap_err();
        assert!(
            e.contains("--history-memory must be at least 1048576"),
            "{e}"
        );
        let e = parse(&["--history-channels", "0"]).unwrap_err();
        assert!(e.contains("--history-channels must be at least 1"), "{e}");
    }

    #[test]
    fn times_are_durations_once_parsed() {
        let c = parse(&["--history-ttl", "42", "--redis-probe-interval", "0.25"]).unwrap();
        assert_eq!(c.history.ttl, Duration::from_secs(42));
        assert_eq!(c.redis.probe_interval, Duration::from_millis(250));
        assert_eq!(c.heartbeat.pong_timeout, Duration::from_secs(10));
        let e = parse(&["--ping-interval", "1.5"]).unwrap_err();
        assert!(e.contains("`1.5` is not a whole number of seconds"), "{e}");
        let e = parse(&["--redis-probe-interval", "-1"]).unwrap_err();
        assert!(e.contains("is not a number of seconds"), "{e}");
    }

    #[test]
    fn the_connection_limit_leaves_descriptors_in_reserve() {
        assert_eq!(connections_within(256), 192);
        assert_eq!(connections_within(20_000), 19_000);
        assert_eq!(connections_within(1 << 20), (1 << 20) - 4096);
        assert_eq!(connections_within(10), 1);
        let c = parse(&[]).unwrap();
        assert_eq!(
            c.limits.max_connections,
            connections_within(open_file_limit())
        );
        assert_eq!(
            parse(&["--max-connections", "7"])
                .unwrap()
                .limits
                .max_connections,
            7
        );
        let e = parse(&["--max-connections", "0"]).unwrap_err();
        assert!(e.contains("--max-connections must be at least 1"), "{e}");
    }

    #[test]
    fn the_pending_bound_follows_the_message_limit() {
        let c = parse(&["--max-message-bytes", "1048576"]).unwrap();
        assert_eq!(c.limits.max_pending_bytes, 16 << 20);
        let c = parse(&[
            "--max-message-bytes",
            "16384",
            "--max-pending-bytes",
            "65536",
        ])
        .unwrap();
        assert_eq!(c.limits.max_pending_bytes, 65536);
        assert!(parse(&["--max-pending-bytes", "262144"]).is_ok());
        let e = parse(&["--max-message-bytes", "4611686018427387904"]).unwrap_err();
        assert!(e.contains("between 128 and"), "{e}");
        let e = parse(&["--max-pending-bytes", "262143"]).unwrap_err();
        assert!(
            e.contains(
                "--max-pending-bytes (262143) must be at least 4 x --max-message-bytes (262144)"
            ),
            "{e}"
        );
    }

    #[test]
    fn invalid_values_give_one_clear_line() {
        let e = parse(&["--max-message-bytes", "10"]).unwrap_err();
        assert!(e.contains("--max-message-bytes"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = parse(&["--listen", "nonsense"]).unwrap_err();
        assert!(e.contains("listen"), "{e}");
    }

    #[test]
    fn redis_options_are_checked_at_start() {
        let c = parse(&["--redis", "redis://127.0.0.1:6379/0"]).unwrap();
        assert!(c.uses_redis());
        assert!(!parse(&[]).unwrap().uses_redis());
        let e = parse(&["--redis", "not a url"]).unwrap_err();
        assert!(
            e.starts_with("invalid configuration: --redis `not a url`: not a Redis URL"),
            "{e}"
        );
        let e = parse(&["--redis", ""]).unwrap_err();
        assert!(e.contains("the URL is empty"), "{e}");
        for tls in [
            "rediss://127.0.0.1:6380/0",
            "rediss-sentinel://h:26379/0?sentinelServiceName=m",
        ] {
            assert!(
                parse(&["--redis", tls]).unwrap().backplane.uses_tls(),
                "{tls}"
            );
        }
        assert!(!c.backplane.uses_tls());
        let e = parse(&["--redis", "redis://h:1/0", "--redis-ca-file", "ca.pem"]).unwrap_err();
        assert!(
            e.contains("are for Redis over TLS: use a rediss:// URL"),
            "{e}"
        );
        let e = parse(&["--redis", "rediss://h:1/0", "--redis-client-cert", "c.pem"]).unwrap_err();
        assert!(
            e.contains("--redis-client-cert and --redis-client-key go together"),
            "{e}"
        );
        let c = parse(&[
            "--redis-cluster",
            "rediss://127.0.0.1:7000,rediss://[::1]:7001/",
        ])
        .unwrap();
        assert_eq!(
            c.backplane,
            Backplane::RedisCluster {
                seeds: vec![("127.0.0.1".into(), 7000), ("::1".into(), 7001)],
                tls: true
            }
        );
        let e = parse(&["--redis-cluster", "rediss://127.0.0.1:7000,127.0.0.1:7001"]).unwrap_err();
        assert!(
            e.contains("seeds mix rediss:// (TLS) and plain ones"),
            "{e}"
        );
        assert!(parse(&["--advertise-url", "wss://node1.example.com/ws"]).is_ok());
        for (url, why) in [
            ("node1:8080", "use a ws:// or wss:// URL"),
            ("/ws", "not a valid URL"),
            ("https://node1.example.com/ws", "use a ws:// or wss:// URL"),
            ("ws://", "not a valid URL"),
        ] {
            let e = parse(&["--advertise-url", url]).unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "invalid configuration: --advertise-url `{url}`: {why}"
                )),
                "{e}"
            );
        }
        let long = format!("wss://{}.example.com/ws", "n".repeat(100));
        let e = parse(&["--advertise-url", &long]).unwrap_err();
        assert!(e.contains("longer than 100 bytes"), "{e}");
        let e = parse(&["--redis-cluster", "http://127.0.0.1:7000"]).unwrap_err();
        assert!(e.contains("unknown scheme `http://`"), "{e}");
        let e = parse(&["--redis", "http://127.0.0.1:6379"]).unwrap_err();
        assert!(e.contains("unknown scheme `http://`"), "{e}");
        assert!(parse(&[
            "--redis",
            "redis-sentinel://127.0.0.1:26379/0?sentinelServiceName=m"
        ])
        .is_ok());
        let c = parse(&["--redis-cluster", "127.0.0.1:7000,[::1]:7001"]).unwrap();
        assert!(c.uses_redis());
        let e = parse(&["--redis-cluster", "127.0.0.1"]).unwrap_err();
        assert!(
            e.starts_with("invalid configuration: --redis-cluster 127.0.0.1:"),
            "{e}"
        );
        let e = parse(&["--redis-cluster", "127.0.0.1:x"]).unwrap_err();
        assert!(e.contains("no valid port"), "{e}");
        let e = parse(&["--redis-probe-interval", "0"]).unwrap_err();
        assert!(e.contains("--redis-probe-interval"), "{e}");
        let e = parse(&["--redis-prefix", "a b"]).unwrap_err();
        assert!(e.contains("--redis-prefix"), "{e}");
        let e = parse(&["--redis-state-ttl", "10"]).unwrap_err();
        assert!(e.contains("--redis-state-ttl"), "{e}");
    }

    #[test]
    fn file_values_apply_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        std::fs::write(
            &path,
            "history-size = 7\nslow-consumer = \"drop-oldest\"\nmax-batch-requests = 9\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = parse(&["--config", p, "--max-batch-requests", "3"]).unwrap();
        assert_eq!(c.history.size, 7);
        assert_eq!(c.limits.slow_consumer, SlowConsumerPolicy::DropOldest);
        assert_eq!(c.limits.max_batch_requests, 3);
        std::fs::write(&path, "no-such-option = 1\n").unwrap();
        let e = parse(&["--config", p]).unwrap_err();
        assert!(e.contains("unknown key `no-such-option`"), "{e}");
        assert!(!e.contains("did you mean"), "{e}");
        std::fs::write(&path, "history-sise = 1\n").unwrap();
        let e = parse(&["--config", p]).unwrap_err();
        assert!(
            e.contains("unknown key `history-sise` (did you mean `history-size`?)"),
            "{e}"
        );
        std::fs::write(&path, "history-size = 1\nworkers = = 2\n").unwrap();
        let e = parse(&["--config", p]).unwrap_err();
        assert!(e.contains("line 2, column"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn the_file_may_name_options_by_section_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.toml");
        let p = path.to_str().unwrap();
        std::fs::write(
            &path,
            "[history]\nsize = 7\nttl = 60\n\n[limits]\nmax_batch_requests = 9\n\
             slow-consumer = \"drop-oldest\"\n\n[redis]\nurl = \"redis://127.0.0.1:1\"\n\
             prefix = \"x:\"\n",
        )
        .unwrap();
        let c = parse(&["--config", p, "--history-size", "8"]).unwrap();
        let cluster = "[redis]\ncluster = [\"127.0.0.1:7000\", \"[::1]:7001\"]\n";
        std::fs::write(&path, cluster).unwrap();
        let seeds = match parse(&["--config", p]).unwrap().backplane {
            Backplane::RedisCluster { seeds, .. } => seeds,
            other => panic!("{other:?}"),
        };
        assert_eq!(seeds, [("127.0.0.1".into(), 7000), ("::1".into(), 7001)]);
        assert_eq!(c.history.size, 8, "flags win");
        assert_eq!(c.history.ttl, Duration::from_secs(60));
        assert_eq!(c.limits.max_batch_requests, 9);
        assert_eq!(c.limits.slow_consumer, SlowConsumerPolicy::DropOldest);
        assert_eq!(c.redis.prefix, "x:");
        assert!(matches!(c.backplane, Backplane::Redis { .. }));
        std::fs::write(&path, "[history]\nsise = 1\n").unwrap();
        let e = parse(&["--config", p]).unwrap_err();
        assert!(
            e.contains("unknown key `sise` in [history] (did you mean `size`?)"),
            "{e}"
        );
        std::fs::write(&path, "[history]\nsize = -1\n").unwrap();
        let e = parse(&["--config", p]).unwrap_err();
        assert!(e.contains("--history-size"), "{e}");
    }
}
