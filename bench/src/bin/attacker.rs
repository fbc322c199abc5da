//! Hostile clients for `bench/hostile`: the attacks of issue 12, each
//! bounded in connections and time, run together against one relay while
//! a normal workload measures what the relay still gives everyone else.
//!
//! Every attack speaks raw bytes (an attacker needs no library), never
//! reads what the relay answers unless it must, and stops at `--seconds`.
//! Loopback only: the relay address must be in 127.0.0.0/8.

#[path = "../ws_frame.rs"]
mod ws_frame;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Parser, Debug)]
#[command(
    about = "Bounded hostile load against a ringcast relay (loopback only)",
    args_override_self = true
)]
struct Args {
    /// The relay's address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// How long every attack runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Connections sending pings and never reading.
    #[arg(long, default_value_t = 2)]
    pingers: usize,
    /// Connections sending subscribe/unsubscribe batches, never reading.
    #[arg(long, default_value_t = 3)]
    churners: usize,
    /// Connections posting 60 KB publications to channels nobody reads.
    #[arg(long, default_value_t = 2)]
    history_flooders: usize,
    /// Connections trickling a frame or a request body a byte a second.
    #[arg(long, default_value_t = 200)]
    tricklers: usize,
    /// Idle TCP connections that never send a request.
    #[arg(long, default_value_t = 2000)]
    idle_sockets: usize,
}

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// A masked client frame.
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    ws_frame::masked(opcode, payload, [0x11, 0x22, 0x33, 0x44])
}

/// A WebSocket connection past its 101.
async fn upgraded(addr: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(UPGRADE).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ensure!(s.read(&mut byte).await? == 1, "closed during the handshake");
        head.push(byte[0]);
    }
    ensure!(head.starts_with(b"HTTP/1.1 101"), "upgrade refused");
    Ok(s)
}

#[derive(Default)]
struct Tally {
    bytes: AtomicU64,
    requests: AtomicU64,
    ended_by_relay: AtomicU64,
    refused: AtomicU64,
}

impl Tally {
    fn sent(&self, bytes: usize, requests: u64) {
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.requests.fetch_add(requests, Ordering::Relaxed);
    }
}

/// Writes `chunk` again and again until the deadline or until the relay
/// ends the connection (what it should do to a client that never reads).
async fn flood(
    addr: SocketAddr,
    chunk: Vec<u8>,
    per_chunk: u64,
    until: Instant,
    tally: Arc<Tally>,
) {
    let Ok(mut s) = upgraded(addr).await else {
        tally.refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    while Instant::now() < until {
        match tokio::time::timeout_at(until, s.write_all(&chunk)).await {
            Ok(Ok(())) => tally.sent(chunk.len(), per_chunk),
            Ok(Err(_)) => {
                tally.ended_by_relay.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(_) => return,
        }
    }
}

fn churn_batch(round: usize) -> (Vec<u8>, u64) {
    let mut batch = Vec::new();
    for i in 0..250 {
        let channel = format!("churn.{round}.{i}");
        batch.push(serde_json::json!({"action": "subscribe", "channel": channel}));
        batch.push(serde_json::json!({"action": "unsubscribe", "channel": channel}));
    }
    (frame(0x1, &serde_json::to_vec(&batch).unwrap()), 500)
}

/// 60 KB publications to 1,000 channels nobody subscribes to, over
/// keep-alive HTTP, reading each answer (a publisher must).
async fn history_flood(addr: SocketAddr, who: usize, until: Instant, tally: Arc<Tally>) {
    let body = format!("\"{}\"", "h".repeat(60_000));
    let Ok(mut s) = TcpStream::connect(addr).await else {
        tally.refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let mut buf = vec![0u8; 4096];
    let mut i = 0usize;
    while Instant::now() < until {
        let req = format!(
            "POST /publish/flood.{who}.{} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            i % 1000,
            body.len()
        );
        i += 1;
        if s.write_all(req.as_bytes()).await.is_err() {
            tally.ended_by_relay.fetch_add(1, Ordering::Relaxed);
            return;
        }
        tally.sent(req.len(), 1);
        // The answer is small and ends with the JSON body's `}`.
        loop {
            match tokio::time::timeout_at(until, s.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => {
                    if buf[..n].contains(&b'}') {
                        break;
                    }
                }
                Ok(_) => {
                    tally.ended_by_relay.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(_) => return,
            }
        }
    }
}

/// Half the tricklers send a WebSocket frame a byte a second (never
/// answering pings), half an HTTP body; each ends when the relay does.
async fn trickle(addr: SocketAddr, which: usize, until: Instant, tally: Arc<Tally>) {
    let (mut s, bytes) = if which.is_multiple_of(2) {
        let Ok(s) = upgraded(addr).await else {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        (s, frame(0x1, &[b'x'; 4000]))
    } else {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let head = b"POST /publish/t HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 60000\r\n\r\n";
        if s.write_all(head).await.is_err() {
            return;
        }
        (s, vec![b'1'; 60_000])
    };
    let mut sink = [0u8; 4096];
    for byte in bytes {
        if Instant::now() >= until {
            return;
        }
        if s.write_all(&[byte]).await.is_err() {
            tally.ended_by_relay.fetch_add(1, Ordering::Relaxed);
            return;
        }
        tally.sent(1, 0);
        // Read (and drop) what comes, to see the relay end it.
        let next = Instant::now() + Duration::from_secs(1);
        while Instant::now() < next.min(until) {
            match tokio::time::timeout_at(next.min(until), s.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    tally.ended_by_relay.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(Ok(_)) => {}
                Err(_) => break,
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        args.addr.ip().is_loopback(),
        "attacks go to loopback only, not {}",
        args.addr
    );
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let tallies: Vec<(&str, Arc<Tally>)> = ["pings", "churn", "history", "trickle", "idle-sockets"]
        .into_iter()
        .map(|name| (name, Arc::new(Tally::default())))
        .collect();
    let tally = |name: &str| tallies.iter().find(|(n, _)| *n == name).unwrap().1.clone();
    let mut tasks = Vec::new();
    let pings: Vec<u8> = frame(0x9, &[7u8; 125]).repeat(512);
    for _ in 0..args.pingers {
        tasks.push(tokio::spawn(flood(
            args.addr,
            pings.clone(),
            512,
            until,
            tally("pings"),
        )));
    }
    for who in 0..args.churners {
        let mut chunk = Vec::new();
        let mut requests = 0;
        for round in 0..8 {
            let (f, n) = churn_batch(who * 8 + round);
            chunk.extend_from_slice(&f);
            requests += n;
        }
        tasks.push(tokio::spawn(flood(
            args.addr,
            chunk,
            requests,
            until,
            tally("churn"),
        )));
    }
    for who in 0..args.history_flooders {
        tasks.push(tokio::spawn(history_flood(
            args.addr,
            who,
            until,
            tally("history"),
        )));
    }
    for which in 0..args.tricklers {
        tasks.push(tokio::spawn(trickle(
            args.addr,
            which,
            until,
            tally("trickle"),
        )));
    }
    let idle = tally("idle-sockets");
    let mut sockets = Vec::with_capacity(args.idle_sockets);
    for _ in 0..args.idle_sockets {
        match TcpStream::connect(args.addr).await {
            Ok(s) => {
                idle.sent(0, 1);
                sockets.push(s);
            }
            Err(_) => {
                idle.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    for t in tasks {
        t.await.context("an attack task")?;
    }
    drop(sockets);
    let report: serde_json::Map<String, serde_json::Value> = tallies
        .iter()
        .map(|(name, t)| {
            (
                name.to_string(),
                serde_json::json!({
                    "bytes": t.bytes.load(Ordering::Relaxed),
                    "requests": t.requests.load(Ordering::Relaxed),
                    "ended_by_relay": t.ended_by_relay.load(Ordering::Relaxed),
                    "refused": t.refused.load(Ordering::Relaxed),
                }),
            )
        })
        .collect();
    println!("{}", serde_json::Value::Object(report));
    Ok(())
}
