//! Command-line interface of `loadgen`: the flags of every mode, and the
//! checks that keep all traffic on this machine's loopback.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio_tungstenite::tungstenite::http::Uri;

use crate::proto::Format;

/// One process keeps at most this many sockets: its open-file limit is
/// 20,000 and the runtime, the publishers and stdio need a few of their own.
pub const MAX_CONNECTIONS: u32 = 19_000;

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    about = "Load generator for ringcast (and the tokio baseline) over WebSocket",
    after_help = "At most 19,000 connections per process (the open-file limit is 20,000): \
                  run several processes, each with its own --source-ips range, for more. \
                  Only loopback targets (127.0.0.0/8, localhost, ::1) are accepted. \
                  The last line on stdout is one JSON object with every figure."
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub mode: Mode,
}

#[derive(Args, Debug)]
pub struct Common {
    /// WebSocket URL of the server; the host must be loopback. Several,
    /// comma-separated (nodes of one relay): subscribers are spread over them
    /// round-robin and publishers use the first.
    #[arg(long, global = true, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,
    /// Subprotocol: json (text frames) or msgpack (binary frames).
    #[arg(long, global = true, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// Local source addresses, round-robin per connection: `A-B` (IPv4
    /// range), `A,B,...` or one address. Each one gives its own ~28k
    /// ephemeral ports; without it the kernel picks the source.
    #[arg(long, global = true, value_name = "RANGE")]
    pub source_ips: Option<String>,
    /// Server process to sample (RSS from /proc/PID/status, CPU time from
    /// /proc/PID/stat).
    #[arg(long, global = true, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Free text copied into the JSON output.
    #[arg(long, global = true, default_value = "")]
    pub label: String,
    /// The Pusher app (`ID:KEY:SECRET`) whose HTTP API publishers sign their
    /// requests for, with `--format pusher`.
    #[arg(long, global = true, value_name = "ID:KEY:SECRET")]
    pub pusher_app: Option<crate::pusher::App>,
    /// The server API key Centrifugo publishers send, with `--format
    /// centrifugo`.
    #[arg(long, global = true, value_name = "KEY")]
    pub centrifugo_api_key: Option<String>,
    /// Tokio worker threads (1 lets `taskset -c N` pin the load to one core).
    #[arg(long, global = true, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: u16,
}

#[derive(Subcommand, Debug)]
pub enum Mode {
    /// Subscribers on many sockets, publishers at a rate: throughput,
    /// end-to-end latency, batching factor.
    Fanout(FanoutArgs),
    /// Idle subscribed connections: server RSS and kernel socket memory
    /// per connection.
    Idle(IdleArgs),
    /// Connection setup rate: handshake plus one subscribe, then close.
    Connect(ConnectArgs),
    /// Snapshot cost: keys published to one channel, then connections
    /// each subscribing with `snapshot`; time to `subscribed`.
    Snapshot(SnapshotArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// Subscriber connections (at most 19,000 per process).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=MAX_CONNECTIONS as i64))]
    pub connections: u32,
    /// Channels `bench.0` .. `bench.{C-1}` the subscriptions are spread over.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub channels: u32,
    /// Connection setups (TCP + handshake + subscribe) in flight at once.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..))]
    pub concurrency: u32,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Channels each subscriber connection joins: conn i takes
    /// (i*K + j) % C for j < K (so K must not exceed --channels).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub subs_per_conn: u32,
    /// Publisher connections; the rate is split evenly between them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub publishers: u32,
    /// Total publishes per second; 0 = as fast as the window allows.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Most un-acknowledged publishes per publisher connection.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub window: u32,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub duration: u64,
    /// Approximate size in bytes of each published `data` value.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
    /// Percent of subscriber connections that subscribe and then never read
    /// (slow consumers); they are left out of `expected` and of latency.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=50))]
    pub slow_percent: u32,
    /// Publications carry a key, `k0` .. `k{K-1}` in turn (0: none).
    #[arg(long, default_value_t = 0)]
    pub keys: u32,
    /// Subscribers ask for `conflate_ms` (0: every message). Merged
    /// messages count as delivered through the `conflated` of the one
    /// that replaced them; latency is then the age of what arrives.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=60_000))]
    pub conflate_ms: u32,
}

#[derive(Args, Debug, Clone)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Keys published to `bench.0` before the subscribes: each subscribe
    /// with `snapshot` gets the latest message of every one.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub keys: u32,
    /// Approximate size in bytes of each published `data` value.
    #[arg(long, default_value_t = 100)]
    pub payload: usize,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Channels each connection joins: conn i takes (i*K + j) % C for
    /// j < K (so K must not exceed --channels), to measure what a
    /// subscription costs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub subs_per_conn: u32,
    /// Seconds to hold the connections open before the final sample.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub hold: u64,
}

#[derive(Args, Debug, Clone)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Reconnect storm: once every connection is set up, all of them vanish
    /// at once and all reconnect and resubscribe at once (no limit on
    /// setups in flight); the figures are those of the reconnection.
    #[arg(long)]
    pub storm: bool,
}

/// Where the sockets go: the URL as given (for the handshake's request line
/// and Host header) and the loopback address it names.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
}

/// Refuses anything but a `ws://` or `wss://` URL on loopback: this tool
/// must never load a host other than the one it runs on. (`wss://` accepts
/// any certificate: the relay under test has a throwaway one.)
pub fn parse_target(url: &str) -> Result<Target> {
    let uri: Uri = url.parse().with_context(|| format!("bad --url {url:?}"))?;
    match uri.scheme_str() {
        Some("ws" | "wss") => {}
        Some(other) => bail!("--url scheme {other:?} is not supported (use ws:// or wss://)"),
        None => bail!("--url {url:?} has no scheme (use ws://HOST:PORT/ws)"),
    }
    let host = uri.host().context("--url has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // `localhost` is pinned to 127.0.0.1 rather than resolved, so a resolver
    // answer can never send the load anywhere else.
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse()
            .with_context(|| format!("--url host {host:?} must be a loopback IP or localhost"))?
    };
    ensure!(
        ip.is_loopback(),
        "--url host {ip} is not loopback: only 127.0.0.0/8, localhost and ::1 may be loaded"
    );
    let default_port = if uri.scheme_str() == Some("wss") {
        443
    } else {
        80
    };
    let port = uri.port_u16().unwrap_or(default_port);
    Ok(Target {
        url: url.to_string(),
        addr: SocketAddr::new(ip, port),
    })
}

/// Parses `--source-ips`; every address must be loopback and of the
/// target's family, or the kernel would refuse the bind or the route.
pub fn parse_source_ips(spec: &str, target: &Target) -> Result<Vec<IpAddr>> {
    let mut ips = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("bad IPv4 {a:?}"))?;
            let b: Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("bad IPv4 {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            ensure!(a <= b, "empty source range {part:?}");
            ensure!(b - a < 65_536, "source range {part:?} is too large");
            ips.extend((a..=b).map(|n| IpAddr::V4(Ipv4Addr::from(n))));
        } else {
            ips.push(part.parse().with_context(|| format!("bad IP {part:?}"))?);
        }
    }
    ensure!(!ips.is_empty(), "--source-ips is empty");
    for ip in &ips {
        ensure!(ip.is_loopback(), "source IP {ip} is not loopback");
        ensure!(
            ip.is_ipv4() == target.addr.is_ipv4(),
            "source IP {ip} is not of the same family as {}",
            target.addr
        );
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        assert!(parse_target("ws://127.0.0.1:8080/ws").is_ok());
        assert!(parse_target("ws://127.3.4.5:1/ws").is_ok());
        assert!(parse_target("ws://localhost:8080/ws").is_ok());
        assert!(parse_target("ws://[::1]:8080/ws").is_ok());
        assert!(parse_target("wss://127.0.0.1:8443/ws").is_ok());
        assert!(parse_target("wss://example.com/ws").is_err());
        assert!(parse_target("ws://10.0.0.1:8080/ws").is_err());
        assert!(parse_target("ws://example.com/ws").is_err());
        assert_eq!(parse_target("wss://127.0.0.1/ws").unwrap().addr.port(), 443);
        assert_eq!(parse_target("ws://[::1]/ws").unwrap().addr.port(), 80);
    }

    #[test]
    fn source_ranges() {
        let t = parse_target("ws://127.0.0.1:8080/ws").unwrap();
        assert_eq!(
            parse_source_ips("127.0.0.1-127.0.0.20", &t).unwrap().len(),
            20
        );
        assert_eq!(
            parse_source_ips("127.0.0.2,127.0.0.3", &t).unwrap().len(),
            2
        );
        assert!(parse_source_ips("192.168.0.1", &t).is_err());
        assert!(parse_source_ips("::1", &t).is_err());
    }
}
