//! Metrics through the `metrics` facade, rendered as Prometheus text at
//! `GET /metrics`: on the relay's own port for loopback clients, or, when
//! `--metrics-addr` is given, on that address by a small thread of its own.
//!
//! Hot-path counts (frames, bytes, deliveries) accumulate in per-shard
//! `Cell`s and are added to the exported counters once a second by the
//! shard's ticker, so a delivery costs no atomic operation.

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

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

/// Installs the global recorder. Histograms get explicit buckets so they are
/// exported as Prometheus histograms (aggregatable across nodes).
pub fn install() -> Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("ringcast_publish_to_write_seconds".into()),
            &[
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5,
            ],
        )
        .context("configuring histogram buckets")?
        .set_buckets_for_metric(
            Matcher::Full("ringcast_batch_messages".into()),
            &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
        )
        .context("configuring histogram buckets")?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder)
        .map_err(|e| crate::error::Error::msg(format!("installing metrics recorder: {e}")))?;
    let _ = HANDLE.set(handle.clone());
    Ok(handle)
}

/// Serves `GET /metrics` on its own thread (blocking I/O: scrapes are rare
/// and must not touch the workers).
pub fn serve(listener: TcpListener, handle: PrometheusHandle) -> Result<()> {
    std::thread::Builder::new()
        .name("ringcast-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 4096];
                let mut len = 0;
                let path = loop {
                    match stream.read(&mut buf[len..]) {
                        Ok(0) | Err(_) => break None,
                        Ok(n) => len += n,
                    }
                    let mut headers = [httparse::EMPTY_HEADER; 32];
                    let mut req = httparse::Request::new(&mut headers);
                    match req.parse(&buf[..len]) {
                        Ok(httparse::Status::Complete(_)) => {
                            break Some((req.method == Some("GET"), req.path.unwrap_or("").to_string()))
                        }
                        Ok(httparse::Status::Partial) if len < buf.len() => continue,
                        _ => break None,
                    }
                };
                let response = match path {
                    Some((true, p)) if p == "/metrics" => {
                        handle.run_upkeep();
                        let body = handle.render();
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    }
                    Some(_) => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
                    None => "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into(),
                };
                let _ = stream.write_all(response.as_bytes());
            }
        })
        .context("starting the metrics thread")?;
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
    pub channels_owned: Gauge,
    pub handshakes_ok: Counter,
    pub handshakes_rejected: Counter,
    pub http_requests: Counter,
    pub publications: Counter,
    pub slow_disconnect: Counter,
    pub slow_drop_oldest: Counter,
    pub heartbeat_timeouts: Counter,
    pub ws_violations: Counter,
    errors: Vec<Counter>,
    pub frames_in: LocalCounter,
    pub bytes_in: LocalCounter,
    pub frames_out: LocalCounter,
    pub bytes_out: LocalCounter,
    pub deliveries: LocalCounter,
    pub batches: LocalCounter,
    pub batch_messages: Histogram,
    pub publish_to_write: Histogram,
}

impl ShardMetrics {
    pub fn new(shard: usize) -> Self {
        let s = shard.to_string();
        ShardMetrics {
            connections: gauge!("ringcast_connections", "shard" => s.clone()),
            history_messages: gauge!("ringcast_history_messages", "shard" => s.clone()),
            channels_owned: gauge!("ringcast_channels_owned", "shard" => s.clone()),
            handshakes_ok: counter!("ringcast_handshakes_total", "shard" => s.clone(), "result" => "ok"),
            handshakes_rejected: counter!("ringcast_handshakes_total", "shard" => s.clone(), "result" => "rejected"),
            http_requests: counter!("ringcast_http_requests_total", "shard" => s.clone()),
            publications: counter!("ringcast_publications_total", "shard" => s.clone()),
            slow_disconnect: counter!("ringcast_slow_consumer_total", "shard" => s.clone(), "action" => "disconnect"),
            slow_drop_oldest: counter!("ringcast_slow_consumer_total", "shard" => s.clone(), "action" => "drop_oldest"),
            heartbeat_timeouts: counter!("ringcast_heartbeat_timeouts_total", "shard" => s.clone()),
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
            batch_messages: histogram!("ringcast_batch_messages", "shard" => s.clone()),
            publish_to_write: histogram!("ringcast_publish_to_write_seconds", "shard" => s),
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
        ] {
            c.flush();
        }
    }
}
