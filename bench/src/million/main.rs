//! `million`: the million-connection run (`bench/million` builds and
//! starts it). On one box, loopback only: Redis, K relay processes sharing
//! one port behind the Redis backplane (each under the per-process file
//! limit, as a multi-process deployment runs them), and H `holder`
//! processes, each holding its share of connections from a source address
//! of its own. It ramps up in steps, measures each, broadcasts at the top,
//! holds through several heartbeat intervals, then drains every relay with
//! SIGTERM, and writes what it saw to `bench/results/` (JSON) and a
//! Markdown table to stdout.
//!
//! It stops by itself (`--time-limit`), and on an error or Ctrl-C it ends
//! every process it started (by process group) and restores the sysctls
//! it changed.

#[path = "../procfs.rs"]
#[allow(dead_code)]
mod procfs;
#[path = "../compare/procs.rs"]
#[allow(dead_code)]
mod procs;

mod chart;
mod holders;
mod sysctl;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};

use holders::Holders;
use procs::Proc;

#[derive(Parser, Clone)]
#[command(about = "Ramps one box to a million subscribed WebSocket connections and measures it")]
struct Args {
    /// Connections at the top.
    #[arg(long, default_value_t = 1_000_000)]
    target: u64,
    /// Steps of the ramp (those above --target are left out; --target is
    /// always the last).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100000,250000,500000,750000"
    )]
    steps: Vec<u64>,
    /// Connections each relay process is planned for: under its file
    /// limit, with room for the kernel's uneven spread over listeners.
    #[arg(long, default_value_t = 17_500)]
    per_relay: u64,
    /// Connections each holder process opens.
    #[arg(long, default_value_t = 18_000)]
    per_holder: u64,
    #[arg(long, default_value_t = 19_100)]
    port: u16,
    /// First of the relays' metrics ports (one each).
    #[arg(long, default_value_t = 19_200)]
    metrics_port: u16,
    #[arg(long, default_value_t = 19_379)]
    redis_port: u16,
    /// Publications broadcast to everyone at the top.
    #[arg(long, default_value_t = 5)]
    messages: u32,
    /// Bytes of filler in each publication.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// The relays' --ping-interval (their --pong-timeout is 10 s). The
    /// relay's default: every silent connection is pinged once per
    /// interval, so a shorter one costs the ramp real CPU at this scale
    /// (100,000 pings a second at 10 s).
    #[arg(long, default_value_t = 30)]
    ping_interval: u64,
    /// The relays' --pong-timeout. Both ends share this box's two cores: a
    /// broadcast to a million keeps both busy for seconds, and pongs then
    /// wait longer than the relay's default 10 s, which drops clients that
    /// are alive (measured: docs/benchmarks.md). Clients on other machines
    /// do not compete with the relay for its cores.
    #[arg(long, default_value_t = 60)]
    pong_timeout: u64,
    /// Seconds between a publication reaching everyone and the next.
    #[arg(long, default_value_t = 5)]
    message_gap: u64,
    /// Seconds to hold at the top (more than three heartbeat intervals).
    #[arg(long, default_value_t = 95)]
    hold: u64,
    /// The relays' --drain-seconds.
    #[arg(long, default_value_t = 20)]
    drain_seconds: u64,
    /// The whole run stops by itself after this many seconds.
    #[arg(long, default_value_t = 2400)]
    time_limit: u64,
    #[arg(long, default_value_t = 0)]
    relay_cpu: u32,
    #[arg(long, default_value_t = 1)]
    load_cpu: u32,
    /// Leave the sysctls alone (the run may then stop early; it says why).
    #[arg(long)]
    no_sysctl: bool,
    /// Results file (default bench/results/million-<date>-<host>.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Chart written beside the docs (memory and handshake rate).
    #[arg(long, default_value = "docs/charts/million.svg")]
    chart: PathBuf,
    /// Only draw --chart again from this results file, then exit.
    #[arg(long, value_name = "RESULTS.json")]
    redraw: Option<PathBuf>,
}

/// What one step of the ramp measured.
#[derive(Serialize, serde::Deserialize, Clone, Default)]
pub struct Step {
    pub target: u64,
    pub subscribed: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    pub ramp_secs: f64,
    pub handshakes_per_sec: f64,
    pub relay_rss_bytes: u64,
    pub relay_rss_per_conn: f64,
    pub holder_rss_per_conn: f64,
    pub kernel_slab_per_conn: f64,
    pub kernel_tcp_mem_per_conn: f64,
    pub mem_available_bytes: u64,
    pub relay_cpu_cores: f64,
    pub holder_cpu_cores: f64,
    pub relay_connections_min: u64,
    pub relay_connections_max: u64,
}

static STOP_AT: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Fails once the run's time is up.
pub fn check_time() -> Result<()> {
    if STOP_AT.get().is_some_and(|at| Instant::now() > *at) {
        bail!("--time-limit reached");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = STOP_AT.set(Instant::now() + Duration::from_secs(args.time_limit));
    let code = match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("million: {e:#}");
            ExitCode::FAILURE
        }
    };
    procs::kill_all();
    sysctl::restore_all();
    code
}

fn run(args: Args) -> Result<()> {
    let root = workspace_root()?;
    if let Some(results) = &args.redraw {
        let text = std::fs::read_to_string(results)
            .with_context(|| format!("reading {}", results.display()))?;
        let parsed: Value = serde_json::from_str(&text)?;
        let steps: Vec<Step> = serde_json::from_value(parsed["steps"].clone())
            .context("the results file has no steps")?;
        return chart::draw(&root.join(&args.chart), &steps);
    }
    let relay_bin = root.join("target/release/ringcast");
    let holder_bin = root.join("target/release/holder");
    for bin in [&relay_bin, &holder_bin] {
        if !bin.exists() {
            bail!(
                "{} is missing: run bench/million (it builds them)",
                bin.display()
            );
        }
    }
    let relays = args.target.div_ceil(args.per_relay);
    let holders = args.target.div_ceil(args.per_holder);
    let file_limit = procfs::open_files_limit().unwrap_or(1024);
    if args.per_relay + 500 > file_limit || args.per_holder + 100 > file_limit {
        bail!(
            "each process may open {file_limit} files: lower --per-relay ({}) and --per-holder ({})",
            args.per_relay,
            args.per_holder
        );
    }
    check_memory(&args, relays)?;
    ctrlc::set_handler(|| {
        procs::kill_all();
        sysctl::restore_all();
        eprintln!("\nmillion: interrupted; every process it started is stopped, sysctls restored");
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    let sysctls = if args.no_sysctl {
        sysctl::report_only()
    } else {
        sysctl::apply()?
    };
    let logs = root.join("target/million-logs");
    std::fs::create_dir_all(&logs)?;
    eprintln!(
        "million: {} connections, {relays} relays on CPU {}, {holders} holders on CPU {}, Redis on :{}",
        args.target, args.relay_cpu, args.load_cpu, args.redis_port
    );

    let redis = Proc::redis(
        args.relay_cpu,
        args.redis_port,
        &logs,
        Duration::from_secs(10),
    )?;

    let base = Baseline::now(&[]);
    let mut relay_procs = Vec::new();
    for i in 0..relays {
        let metrics = args.metrics_port + i as u16;
        let mut relay_args = strings(&[
            "--workers",
            "1",
            "--listen",
            &format!("127.0.0.1:{}", args.port),
            "--metrics-addr",
            &format!("127.0.0.1:{metrics}"),
            "--redis",
            &format!("redis://127.0.0.1:{}", args.redis_port),
            "--log",
            "warn",
            "--ping-interval",
            &args.ping_interval.to_string(),
            "--pong-timeout",
            &args.pong_timeout.to_string(),
            "--drain-seconds",
            &args.drain_seconds.to_string(),
        ]);
        if i > 0 {
            relay_args.push("--reuse-port-shared".into());
        }
        let mut relay = Proc::spawn(
            &format!("relay-{i}"),
            args.relay_cpu,
            &relay_bin.display().to_string(),
            &relay_args,
            &root,
            &[],
            &logs.join(format!("relay-{i}.log")),
        )?;
        wait_ready(&mut relay, metrics)?;
        relay_procs.push(relay);
    }
    let relay_pids: Vec<u32> = relay_procs.iter().map(|r| r.pid()).collect();
    let relays_base_rss: u64 = relay_pids
        .iter()
        .filter_map(|&p| procfs::rss_bytes(p))
        .sum();
    eprintln!(
        "million: {relays} relays ready ({} MB together, {} KB each before any connection)",
        relays_base_rss / 1_000_000,
        relays_base_rss / relays / 1000
    );

    let mut holders = Holders::start(
        &holder_bin,
        holders,
        args.load_cpu,
        SocketAddr::from(([127, 0, 0, 1], args.port)),
        &logs,
    )?;
    let holders_base_rss = holders.rss_total();

    let mut steps_done: Vec<Step> = Vec::new();
    let mut stopped: Option<String> = None;
    let mut plan: Vec<u64> = args
        .steps
        .iter()
        .copied()
        .filter(|&s| s < args.target)
        .collect();
    plan.push(args.target);
    let mut current = 0u64;
    for &step in &plan {
        let before = Sample::now(&relay_pids, &holders);
        let started = Instant::now();
        let progress = holders.open_to(step, current)?;
        let elapsed = started.elapsed().as_secs_f64();
        let after = Sample::now(&relay_pids, &holders);
        let counts = relay_connections(&args, relays);
        let subscribed = progress.subscribed;
        let measured = Step {
            target: step,
            subscribed,
            failed: progress.failed,
            first_error: progress.first_error.clone(),
            ramp_secs: round(elapsed, 2),
            handshakes_per_sec: round((subscribed - current.min(subscribed)) as f64 / elapsed, 0),
            relay_rss_bytes: after.relay_rss,
            relay_rss_per_conn: per(after.relay_rss.saturating_sub(relays_base_rss), subscribed),
            holder_rss_per_conn: per(
                after.holder_rss.saturating_sub(holders_base_rss),
                subscribed,
            ),
            kernel_slab_per_conn: per(after.slab.saturating_sub(base.slab), subscribed),
            kernel_tcp_mem_per_conn: per(
                after.tcp_mem_pages.saturating_sub(base.tcp_mem_pages) * procfs::page_size(),
                subscribed,
            ),
            mem_available_bytes: mem_available().unwrap_or(0),
            relay_cpu_cores: round(cores(before.relay_ticks, after.relay_ticks, elapsed), 2),
            holder_cpu_cores: round(cores(before.holder_ticks, after.holder_ticks, elapsed), 2),
            relay_connections_min: counts.iter().copied().min().unwrap_or(0),
            relay_connections_max: counts.iter().copied().max().unwrap_or(0),
        };
        eprintln!("million: {}", step_line(&measured));
        let clean = progress.failed == 0 && subscribed == step;
        steps_done.push(measured);
        current = subscribed;
        if !clean {
            stopped = Some(format!(
                "step {step}: {subscribed} subscribed, {} failed (first: {})",
                progress.failed,
                progress.first_error.unwrap_or_default()
            ));
            break;
        }
        if let Err(e) = check_time() {
            stopped = Some(format!("{e} after the {step} step"));
            break;
        }
    }

    let mut broadcast = Value::Null;
    let mut hold = Value::Null;
    if stopped.is_none() {
        broadcast = run_broadcast(&args, &mut holders, current)?;
        hold = run_hold(&args, &mut holders, relays, current)?;
    }
    let drain = run_drain(&args, &mut holders, &mut relay_procs, current)
        .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));

    let results = json!({
        "date": today(),
        "host": hostname(),
        "git": git_rev(&root),
        "args": {
            "target": args.target, "relays": relays, "holders": holders.len(),
            "per_relay": args.per_relay, "per_holder": args.per_holder,
            "ping_interval": args.ping_interval, "pong_timeout": args.pong_timeout,
            "hold": args.hold, "message_gap": args.message_gap,
            "drain_seconds": args.drain_seconds, "messages": args.messages,
            "payload": args.payload, "relay_cpu": args.relay_cpu, "load_cpu": args.load_cpu,
        },
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "mem_total_bytes": mem_total(),
            "file_limit": file_limit,
        },
        "sysctls": sysctls,
        "relays_base_rss_bytes": relays_base_rss,
        "steps": steps_done,
        "stopped": stopped,
        "broadcast": broadcast,
        "hold": hold,
        "drain": drain,
    });
    let out = args.out.clone().unwrap_or_else(|| {
        root.join(format!(
            "bench/results/million-{}-{}.json",
            today(),
            hostname()
        ))
    });
    std::fs::write(&out, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("million: results in {}", out.display());
    let chart_path = root.join(&args.chart);
    chart::draw(&chart_path, &steps_done)?;
    eprintln!("million: chart in {}", chart_path.display());
    println!("{}", markdown(&results));
    drop(holders);
    drop(relay_procs);
    drop(redis);
    Ok(())
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

fn per(bytes: u64, conns: u64) -> f64 {
    if conns == 0 {
        return 0.0;
    }
    round(bytes as f64 / conns as f64, 1)
}

fn cores(before: u64, after: u64, secs: f64) -> f64 {
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (after.saturating_sub(before)) as f64 / hz / secs.max(0.001)
}

fn step_line(s: &Step) -> String {
    format!(
        "{} subscribed in {:.1} s ({:.0}/s); relay {:.0} B/conn, kernel slab {:.0} B/conn, holders {:.0} B/conn; CPU relay {:.2}, holders {:.2}; per relay {}..{}",
        s.subscribed,
        s.ramp_secs,
        s.handshakes_per_sec,
        s.relay_rss_per_conn,
        s.kernel_slab_per_conn,
        s.holder_rss_per_conn,
        s.relay_cpu_cores,
        s.holder_cpu_cores,
        s.relay_connections_min,
        s.relay_connections_max
    )
}

/// Memory this run needs, from figures measured at 15,000 connections
/// (docs/benchmarks.md): the kernel's two socket ends, the relay, the
/// holder, and each relay process's own.
fn check_memory(args: &Args, relays: u64) -> Result<()> {
    const KERNEL_PER_CONN: u64 = 11_000;
    const RELAY_PER_CONN: u64 = 700;
    const HOLDER_PER_CONN: u64 = 300;
    // Mostly fred's notification channels, which the relay sizes at 65,536
    // slots each so the pub/sub reader never lags (backplane/redis/link.rs).
    const PER_RELAY_PROCESS: u64 = 110 << 20;
    let need = args.target * (KERNEL_PER_CONN + RELAY_PER_CONN + HOLDER_PER_CONN)
        + relays * PER_RELAY_PROCESS
        + (1 << 30);
    let available = mem_available().context("reading MemAvailable from /proc/meminfo")?;
    if available < need {
        bail!(
            "this box has {:.1} GiB available; {} connections need about {:.1} GiB ({} B per connection for the kernel's two socket ends, {} B relay, {} B holder, {} MiB per relay process, 1 GiB spare): lower --target",
            available as f64 / (1u64 << 30) as f64,
            args.target,
            need as f64 / (1u64 << 30) as f64,
            KERNEL_PER_CONN,
            RELAY_PER_CONN,
            HOLDER_PER_CONN,
            PER_RELAY_PROCESS >> 20
        );
    }
    Ok(())
}

fn meminfo_kb(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mem_available() -> Option<u64> {
    meminfo_kb("MemAvailable:").map(|kb| kb * 1024)
}

fn mem_total() -> u64 {
    meminfo_kb("MemTotal:").map_or(0, |kb| kb * 1024)
}

struct Baseline {
    slab: u64,
    tcp_mem_pages: u64,
}

impl Baseline {
    fn now(_: &[u32]) -> Baseline {
        Baseline {
            slab: procfs::slab_bytes().unwrap_or(0),
            tcp_mem_pages: procfs::tcp_mem_pages().unwrap_or(0),
        }
    }
}

struct Sample {
    relay_rss: u64,
    relay_ticks: u64,
    holder_rss: u64,
    holder_ticks: u64,
    slab: u64,
    tcp_mem_pages: u64,
}

impl Sample {
    fn now(relays: &[u32], holders: &Holders) -> Sample {
        Sample {
            relay_rss: relays.iter().filter_map(|&p| procfs::rss_bytes(p)).sum(),
            relay_ticks: relays.iter().filter_map(|&p| procfs::cpu_ticks(p)).sum(),
            holder_rss: holders.rss_total(),
            holder_ticks: holders.cpu_ticks_total(),
            slab: procfs::slab_bytes().unwrap_or(0),
            tcp_mem_pages: procfs::tcp_mem_pages().unwrap_or(0),
        }
    }
}

/// One plain HTTP/1.1 request to a relay's metrics address (or the shared
/// port): the status and the body.
fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no HTTP status")?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// The sum of a metric's samples in Prometheus text.
fn metric_sum(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value: f64 = rest.rsplit(' ').next()?.parse().ok()?;
        *found.get_or_insert(0.0) += value;
    }
    found
}

/// Waits until a relay answers on its metrics address with its Redis
/// backplane ready.
fn wait_ready(relay: &mut Proc, metrics_port: u16) -> Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        relay.check_alive()?;
        if let Ok((200, body)) = http(addr, "GET", "/metrics", b"") {
            if metric_sum(&body, "ringcast_redis_ready") == Some(1.0) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("{} is not ready with Redis after 30 s", relay.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Each relay's open connections, from its metrics.
fn relay_connections(args: &Args, relays: u64) -> Vec<u64> {
    (0..relays)
        .filter_map(|i| {
            let addr = SocketAddr::from(([127, 0, 0, 1], args.metrics_port + i as u16));
            let (_, body) = http(addr, "GET", "/metrics", b"").ok()?;
            metric_sum(&body, "ringcast_connections").map(|v| v as u64)
        })
        .collect()
}

fn relay_metric_total(args: &Args, relays: u64, name: &str) -> f64 {
    (0..relays)
        .filter_map(|i| {
            let addr = SocketAddr::from(([127, 0, 0, 1], args.metrics_port + i as u16));
            let (_, body) = http(addr, "GET", "/metrics", b"").ok()?;
            metric_sum(&body, name)
        })
        .sum()
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Publishes `--messages` publications to everyone, one at a time, each
/// once the last has reached every subscriber (or 60 s passed), and
/// reports when they arrived.
fn run_broadcast(args: &Args, holders: &mut Holders, conns: u64) -> Result<Value> {
    let shared = SocketAddr::from(([127, 0, 0, 1], args.port));
    let filler = "x".repeat(args.payload);
    let mut sent = Vec::new();
    for m in 0..args.messages {
        check_time()?;
        let t = unix_ns();
        let body = format!(r#"{{"t":{t},"p":"{filler}"}}"#);
        let (status, answer) = http(shared, "POST", "/publish/million", body.as_bytes())?;
        if !(200..300).contains(&status) {
            bail!("publishing message {m}: {status} {answer}");
        }
        let seq: u64 = serde_json::from_str::<Value>(&answer)
            .ok()
            .and_then(|v| v.get("seq")?.as_u64())
            .context("the publish answer names no seq")?;
        sent.push(seq);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            std::thread::sleep(Duration::from_millis(500));
            let stats = holders.stats()?;
            let got: u64 = stats
                .iter()
                .filter_map(|s| s["messages"][seq.to_string()]["count"].as_u64())
                .sum();
            eprint!(
                "\rmillion: message {} of {}: {got} of {conns} delivered   ",
                m + 1,
                args.messages
            );
            if got >= conns || Instant::now() > deadline {
                eprintln!();
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(args.message_gap));
    }
    let stats = holders.stats()?;
    let mut per_message = Vec::new();
    for seq in &sent {
        let mut buckets: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut count = 0;
        for s in &stats {
            let m = &s["messages"][seq.to_string()];
            count += m["count"].as_u64().unwrap_or(0);
            for pair in m["ms"].as_array().into_iter().flatten() {
                let ms = pair[0].as_u64().unwrap_or(0);
                *buckets.entry(ms).or_default() += pair[1].as_u64().unwrap_or(0);
            }
        }
        let first = buckets.keys().next().copied();
        let last = buckets.keys().next_back().copied();
        let mut seen = 0;
        let mut median = None;
        for (ms, n) in &buckets {
            seen += n;
            if median.is_none() && seen * 2 >= count {
                median = Some(*ms);
            }
        }
        per_message.push(json!({
            "seq": seq, "delivered": count,
            "first_ms": first, "median_ms": median, "last_ms": last,
            "deliveries_per_sec": last.map(|l| round(count as f64 / ((l + 1) as f64 / 1000.0), 0)),
        }));
    }
    let least = stats
        .iter()
        .filter_map(|s| s["least_received"].as_u64())
        .min();
    Ok(json!({
        "connections": conns,
        "messages": per_message,
        "least_received_by_one_connection": least,
        "every_subscriber_got_every_message": least == Some(args.messages as u64),
    }))
}

/// Holds at the top: the relays ping every silent client each
/// `--ping-interval`; every holder answers, and no connection ends.
fn run_hold(args: &Args, holders: &mut Holders, relays: u64, conns: u64) -> Result<Value> {
    let pings_before: u64 = holders
        .stats()?
        .iter()
        .filter_map(|s| s["pings"].as_u64())
        .sum();
    let timeouts_before = relay_metric_total(args, relays, "ringcast_heartbeat_timeouts_total");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(args.hold) {
        check_time()?;
        std::thread::sleep(Duration::from_secs(1));
        eprint!(
            "\rmillion: holding {conns} connections: {} of {} s   ",
            started.elapsed().as_secs(),
            args.hold
        );
    }
    eprintln!();
    let stats = holders.stats()?;
    let pings: u64 = stats
        .iter()
        .filter_map(|s| s["pings"].as_u64())
        .sum::<u64>()
        - pings_before;
    let open: u64 = stats.iter().filter_map(|s| s["open_now"].as_u64()).sum();
    let ended: u64 = stats
        .iter()
        .filter_map(|s| s["ended_without_close"].as_u64())
        .sum();
    let timeouts =
        relay_metric_total(args, relays, "ringcast_heartbeat_timeouts_total") - timeouts_before;
    Ok(json!({
        "seconds": args.hold,
        "ping_interval": args.ping_interval,
        "pings_answered": pings,
        "pings_per_connection": round(pings as f64 / conns.max(1) as f64, 2),
        "open_after": open,
        "ended_during_hold": ended,
        "heartbeat_timeouts": timeouts,
    }))
}

/// SIGTERM to every relay at once; each closes its clients with 1012
/// spread over --drain-seconds. Reports how long until the last close
/// arrived and how many clients saw 1012.
fn run_drain(args: &Args, holders: &mut Holders, relays: &mut [Proc], conns: u64) -> Result<Value> {
    let started_ns = unix_ns();
    let started = Instant::now();
    for relay in relays.iter() {
        // SAFETY: kill(2) on a PID this process started and still owns.
        unsafe {
            libc::kill(relay.pid() as i32, libc::SIGTERM);
        }
    }
    let deadline = Duration::from_secs(args.drain_seconds + 60);
    let mut stats;
    loop {
        std::thread::sleep(Duration::from_secs(1));
        stats = holders.stats()?;
        let open: u64 = stats.iter().filter_map(|s| s["open_now"].as_u64()).sum();
        eprint!("\rmillion: draining: {open} connections still open   ");
        if open == 0 || started.elapsed() > deadline {
            eprintln!();
            break;
        }
    }
    let closes_1012: u64 = stats
        .iter()
        .filter_map(|s| s["closes"]["1012"].as_u64())
        .sum();
    let other_closes: u64 = stats
        .iter()
        .filter_map(|s| s["closes"].as_object())
        .flat_map(|m| m.iter())
        .filter(|(code, _)| code.as_str() != "1012")
        .filter_map(|(_, n)| n.as_u64())
        .sum();
    let last = stats
        .iter()
        .filter_map(|s| s["last_close_ns"].as_u64())
        .max()
        .unwrap_or(0);
    let open: u64 = stats.iter().filter_map(|s| s["open_now"].as_u64()).sum();
    let ended: u64 = stats
        .iter()
        .filter_map(|s| s["ended_without_close"].as_u64())
        .sum();
    Ok(json!({
        "drain_seconds": args.drain_seconds,
        "last_close_after_secs": round(last.saturating_sub(started_ns) as f64 / 1e9, 2),
        "closed_1012": closes_1012,
        "closed_otherwise": other_closes,
        "ended_without_close": ended,
        "still_open": open,
        "every_client_saw_1012": closes_1012 == conns && open == 0,
    }))
}

fn markdown(r: &Value) -> String {
    let mut out = String::new();
    out.push_str("| connections subscribed | handshakes/s (ramp) | relay RSS per conn | kernel slab per conn (both ends) | kernel TCP buffers per conn | holder RSS per conn | relay CPU (cores) | holder CPU (cores) | per relay (min..max) |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for s in r["steps"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "| {} | {} | {} B | {} B | {} B | {} B | {} | {} | {}..{} |\n",
            s["subscribed"],
            s["handshakes_per_sec"],
            s["relay_rss_per_conn"],
            s["kernel_slab_per_conn"],
            s["kernel_tcp_mem_per_conn"],
            s["holder_rss_per_conn"],
            s["relay_cpu_cores"],
            s["holder_cpu_cores"],
            s["relay_connections_min"],
            s["relay_connections_max"]
        ));
    }
    out.push_str(&format!(
        "\nstopped: {}\nbroadcast: {}\nhold: {}\ndrain: {}\n",
        r["stopped"], r["broadcast"], r["hold"], r["drain"]
    ));
    out
}

fn workspace_root() -> Result<PathBuf> {
    let here = std::env::current_dir()?;
    for dir in here.ancestors() {
        if dir.join("bench/Cargo.toml").exists() && dir.join("src/main.rs").exists() {
            return Ok(dir.to_path_buf());
        }
    }
    bail!("run from inside the ringcast repository")
}

fn today() -> String {
    std::process::Command::new("date")
        .arg("+%Y%m%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

fn git_rev(root: &Path) -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}
