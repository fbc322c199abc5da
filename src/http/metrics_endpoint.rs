//! `GET /metrics` on `--metrics-addr`, off the workers: each connection on
//! a short-lived thread of its own (at most `MAX_SCRAPES`) with one
//! deadline for the whole exchange, so a client that trickles its request
//! holds up no scrape but its own. Heads are read by [`Head::parse`] and
//! answered by [`scrape`], as on the relay's own port.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::message::{Head, Response};
use crate::error::{Context, Result};

/// Most scrapes answered at once; more connections than that are closed at
/// once.
const MAX_SCRAPES: usize = 8;
/// The whole time one scrape connection may take.
const SCRAPE_DEADLINE: Duration = Duration::from_secs(5);
/// Longest request head read.
const MAX_SCRAPE_HEAD: usize = 4096;

/// The answer to a scrape: the Prometheus text of every metric.
pub fn scrape() -> Response {
    match crate::metrics::render() {
        Some(text) => Response {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: text.into_bytes(),
            extra: "",
            head_only: false,
        },
        None => Response::text(503, "metrics are not installed"),
    }
}

/// Starts the thread answering scrapes on `listener`.
pub fn serve(listener: TcpListener) -> Result<()> {
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("ringcast-metrics".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    // Out of descriptors, say: back off rather than spin.
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                if active.fetch_add(1, Ordering::Relaxed) >= MAX_SCRAPES {
                    active.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
                let done = active.clone();
                let spawned = std::thread::Builder::new()
                    .name("ringcast-scrape".into())
                    .spawn(move || {
                        answer(stream);
                        done.fetch_sub(1, Ordering::Relaxed);
                    });
                if spawned.is_err() {
                    active.fetch_sub(1, Ordering::Relaxed);
                }
            }
        })
        .context("starting the metrics thread")?;
    Ok(())
}

/// Reads one request head (within [`SCRAPE_DEADLINE`] in all) and answers
/// it; a client that leaves or runs out of time gets nothing.
fn answer(mut stream: std::net::TcpStream) {
    let deadline = Instant::now() + SCRAPE_DEADLINE;
    let mut buf = [0u8; MAX_SCRAPE_HEAD];
    let mut len = 0;
    let response = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf[len..]) {
            Ok(0) | Err(_) => return,
            Ok(n) => len += n,
        }
        match Head::parse(&buf[..len]) {
            Ok(Some((head, _))) => break answer_head(&head),
            Ok(None) if len < buf.len() => continue,
            Ok(None) => break Response::text(431, "request head too large"),
            Err(e) => break Response::text(400, &e.to_string()),
        }
    };
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = stream.set_write_timeout(Some(left.max(Duration::from_millis(100))));
    let _ = stream.write_all(&response.encode(false));
}

fn answer_head(head: &Head) -> Response {
    let path = head.path.split('?').next().unwrap_or_default();
    match (head.method.as_str(), path) {
        ("GET", "/metrics") => scrape(),
        ("HEAD", "/metrics") => Response {
            head_only: true,
            ..scrape()
        },
        _ => Response::text(404, "not found"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        Head::parse(text.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn only_get_and_head_of_metrics_are_scrapes() {
        let get = answer_head(&head("GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n"));
        let head_only = answer_head(&head("HEAD /metrics HTTP/1.1\r\n\r\n"));
        assert_eq!(get.status, head_only.status);
        assert!(head_only.head_only && !get.head_only);
        for other in ["POST /metrics HTTP/1.1\r\n\r\n", "GET / HTTP/1.1\r\n\r\n"] {
            assert_eq!(answer_head(&head(other)).status, 404, "{other}");
        }
    }
}
