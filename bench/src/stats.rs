//! Figures every mode shares: the live delivery counter, the latency
//! histograms, the one-line JSON report and the human summary.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Nanoseconds since the UNIX epoch: the clock that `data.t` is stamped with,
/// so that publisher and subscriber compare readings of the same clock.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A histogram of nanoseconds from 1 ns to 100 s at three significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("static histogram bounds")
}

/// Delivered-message counter read by the progress display. Sharded and
/// cache-line padded so that subscriber tasks on different worker threads
/// do not contend on one atomic for every frame.
pub struct Live {
    shards: Box<[Slot]>,
}

#[repr(align(128))]
struct Slot(AtomicU64);

impl Live {
    pub fn new() -> Self {
        Live {
            shards: (0..64).map(|_| Slot(AtomicU64::new(0))).collect(),
        }
    }

    pub fn add(&self, task: usize, n: u64) {
        self.shards[task % self.shards.len()]
            .0
            .fetch_add(n, Ordering::Relaxed);
    }

    pub fn total(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

type Shared = Arc<Mutex<Histogram<u64>>>;

// One histogram per worker thread rather than per subscriber (19,000
// histograms of ~200 KiB each would dwarf the server under test) and not one
// global one (a lock every frame across threads). The per-thread mutex is
// only ever contended by the final merge.
static REGISTRY: Mutex<Vec<Shared>> = Mutex::new(Vec::new());

thread_local! {
    static LOCAL: Shared = {
        let h = Arc::new(Mutex::new(new_histogram()));
        REGISTRY.lock().expect("registry").push(h.clone());
        h
    };
}

/// Records `now - t` for every stamp of one frame.
pub fn record_latencies(now: u64, stamps: &[u64]) {
    if stamps.is_empty() {
        return;
    }
    LOCAL.with(|h| {
        let mut h = h.lock().expect("latency histogram");
        for &t in stamps {
            h.saturating_record(now.saturating_sub(t));
        }
    });
}

/// All per-thread latency histograms added together.
pub fn merged_latencies() -> Histogram<u64> {
    let mut all = new_histogram();
    for h in REGISTRY.lock().expect("registry").iter() {
        all.add(&*h.lock().expect("latency histogram"))
            .expect("same bounds");
    }
    all
}

/// Rounds for the report, where more digits would only be noise.
pub fn round(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// Everything a run measured, printed as exactly one JSON line on stdout.
/// Every key is present in every mode; what a mode does not measure is null.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub label: String,
    pub url: String,
    pub format: String,
    pub threads: u16,
    pub connections: u32,
    pub connected: u64,
    pub channels: u32,
    pub subs_per_conn: u32,
    /// Subscriber connections that never read (fanout --slow-percent).
    pub slow_consumers: Option<u64>,
    pub publishers: Option<u32>,
    pub payload: Option<usize>,
    pub rate: Option<u64>,
    pub window: Option<u32>,
    pub duration: Option<u64>,
    pub hold: Option<u64>,
    pub connect_secs: f64,
    pub connect_per_sec: f64,
    /// With `connect --storm`: the first, paced connection wave's rate (the
    /// connect figures above are the storm's).
    pub initial_connect_per_sec: Option<f64>,
    pub measure_secs: Option<f64>,
    pub published: Option<u64>,
    pub published_acked: Option<u64>,
    pub published_per_sec: Option<f64>,
    pub expected: Option<u64>,
    pub delivered: Option<u64>,
    pub delivered_per_sec: Option<f64>,
    /// fanout --keys: the keys publications carried; --conflate-ms: the
    /// window, and the messages merged away (`delivered` + `conflated`
    /// is then what reached the subscribers).
    pub keys: Option<u32>,
    pub conflate_ms: Option<u32>,
    pub conflated: Option<u64>,
    /// snapshot: messages each snapshot held, and subscribes answered per
    /// second.
    pub snapshot_messages: Option<f64>,
    pub subscribes_per_sec: Option<f64>,
    pub frames: Option<u64>,
    pub msgs_per_frame: Option<f64>,
    /// What the percentiles measure: `e2e` (publish to delivery) in fanout,
    /// `setup` (TCP connect + handshake + subscribe reply) otherwise.
    pub latency: &'static str,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub max_us: Option<f64>,
    pub mean_us: Option<f64>,
    pub server_rss_start: Option<u64>,
    pub server_rss_end: Option<u64>,
    pub server_rss_peak: Option<u64>,
    pub server_cpu_pct: Option<f64>,
    pub rss_per_conn: Option<f64>,
    pub sock_mem_per_conn: Option<f64>,
    pub slab_per_conn: Option<f64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Report {
    /// The server's RSS (start, end, peak) and CPU share as sampled so far.
    pub fn record_server(&mut self, s: &mut crate::procfs::ServerSampler) {
        self.server_rss_end = s.sample();
        self.server_rss_start = s.rss_start;
        self.server_rss_peak = s.rss_peak;
        self.server_cpu_pct = s.cpu_pct().map(|c| round(c, 1));
    }

    /// Fills the percentile fields from a histogram of nanoseconds.
    pub fn set_latency(&mut self, kind: &'static str, h: &Histogram<u64>) {
        self.latency = kind;
        if h.is_empty() {
            return;
        }
        let us = |ns: u64| Some(round(ns as f64 / 1000.0, 1));
        self.p50_us = us(h.value_at_quantile(0.50));
        self.p99_us = us(h.value_at_quantile(0.99));
        self.p999_us = us(h.value_at_quantile(0.999));
        self.max_us = us(h.max());
        self.mean_us = Some(round(h.mean() / 1000.0, 1));
    }

    /// A few lines for the person at the terminal; stdout stays machine-only.
    pub fn print_summary(&self) {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v}"));
        let mib = |v: Option<u64>| {
            v.map_or("-".to_string(), |b| {
                format!("{:.1} MiB", b as f64 / 1_048_576.0)
            })
        };
        eprintln!(
            "== {} {} ({}, {} threads) {}",
            self.mode, self.url, self.format, self.threads, self.label
        );
        eprintln!(
            "connections {}/{} in {:.2}s = {:.0} setups/s",
            self.connected, self.connections, self.connect_secs, self.connect_per_sec
        );
        if let (Some(d), Some(e)) = (self.delivered, self.expected) {
            eprintln!(
                "published {} ({} msg/s), delivered {d} of {e} expected = {} msg/s, {} msgs/frame",
                self.published.unwrap_or(0),
                opt(self.published_per_sec),
                opt(self.delivered_per_sec),
                opt(self.msgs_per_frame),
            );
        }
        if let Some(merged) = self.conflated {
            eprintln!(
                "conflated at {} ms: {merged} merged away, {} reached subscribers",
                self.conflate_ms.unwrap_or(0),
                self.delivered.unwrap_or(0) + merged
            );
        }
        if let Some(rate) = self.subscribes_per_sec {
            eprintln!(
                "snapshots of {} messages: {rate} subscribes/s",
                opt(self.snapshot_messages)
            );
        }
        eprintln!(
            "{} latency us: p50 {} p99 {} p99.9 {} max {}",
            self.latency,
            opt(self.p50_us),
            opt(self.p99_us),
            opt(self.p999_us),
            opt(self.max_us)
        );
        if self.server_rss_start.is_some() {
            eprintln!(
                "server RSS {} -> {} (peak {}), CPU {}%",
                mib(self.server_rss_start),
                mib(self.server_rss_end),
                mib(self.server_rss_peak),
                opt(self.server_cpu_pct)
            );
        }
        if self.rss_per_conn.is_some() || self.sock_mem_per_conn.is_some() {
            eprintln!(
                "per connection: server RSS {} B, TCP socket mem {} B, kernel slab {} B",
                opt(self.rss_per_conn),
                opt(self.sock_mem_per_conn),
                opt(self.slab_per_conn)
            );
        }
        match &self.first_error {
            Some(e) => eprintln!("errors {} (first: {e})", self.errors),
            None => eprintln!("errors {}", self.errors),
        }
    }
}
