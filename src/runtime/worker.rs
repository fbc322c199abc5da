//! One worker: a thread pinned to a core, running a monoio runtime that
//! accepts on its own listener and runs its shard's hub and connections.

use std::cell::Cell;
use std::net::TcpListener;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::backplane::{Mesh, ShardMsg};
use crate::config::Config;
use crate::error::{Context, Result};
use crate::hub::{CloseRequest, NodeState, Shard};
use crate::runtime::Driver;
use crate::ws::close;

pub struct Worker {
    pub id: usize,
    pub cpu: Option<usize>,
    pub driver: Driver,
    pub listener: TcpListener,
    pub inbox: flume::Receiver<ShardMsg>,
    pub config: Arc<Config>,
    pub node: Arc<NodeState>,
    pub mesh: Mesh,
    pub redis: Option<crate::backplane::redis::RedisHandle>,
}

impl Worker {
    pub fn run(self) -> Result<()> {
        if let Some(cpu) = self.cpu {
            if let Err(e) = monoio::utils::bind_to_cpu_set([cpu]) {
                tracing::warn!(worker = self.id, cpu, "could not pin worker: {e}");
            }
        }
        let id = self.id;
        match self.driver {
            Driver::IoUring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .with_entries(4096)
                .enable_timer()
                .build()
                .with_context(|| format!("starting the io_uring runtime of worker {id}"))?
                .block_on(self.main()),
            Driver::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                .enable_timer()
                .build()
                .with_context(|| format!("starting the epoll runtime of worker {id}"))?
                .block_on(self.main()),
        }
    }

    async fn main(self) -> Result<()> {
        let shard = Rc::new(Shard::new(
            self.id,
            self.config,
            self.node,
            self.mesh,
            self.redis,
        ));
        let listener = monoio::net::TcpListener::from_std(self.listener)
            .with_context(|| format!("registering the listener of worker {}", self.id))?;
        let stop = Rc::new(Stop::default());
        monoio::spawn(inbox_loop(shard.clone(), self.inbox, stop.clone()));
        monoio::spawn(ticker(shard.clone()));
        let mut last_accept_error = None::<Instant>;
        loop {
            monoio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _peer)) => {
                        let _ = stream.set_nodelay(true);
                        match stream.try_into_poll_io() {
                            Ok(stream) => {
                                monoio::spawn(crate::http::serve(shard.clone(), stream));
                            }
                            Err((e, _)) => tracing::warn!("could not switch a socket to poll mode: {e}"),
                        }
                    }
                    Err(e) => {
                        // Out of file descriptors, say: back off instead of spinning.
                        if last_accept_error.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                            tracing::warn!(worker = shard.id, "accept failed: {e}");
                            last_accept_error = Some(Instant::now());
                        }
                        monoio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stop.wait() => break,
            }
        }
        super::listener::release(&listener);
        Ok(())
    }
}

/// A one-way "the worker may stop now" flag.
#[derive(Default)]
struct Stop {
    stopped: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl Stop {
    fn set(&self) {
        self.stopped.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.stopped.get() {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// Handles messages from other shards, in bursts.
async fn inbox_loop(shard: Rc<Shard>, inbox: flume::Receiver<ShardMsg>, stop: Rc<Stop>) {
    while let Ok(msg) = inbox.recv_async().await {
        let mut next = Some(msg);
        while let Some(msg) = next {
            if matches!(msg, ShardMsg::Drain) {
                monoio::spawn(drain(shard.clone(), stop.clone()));
            } else {
                shard.handle_msg(msg);
            }
            next = inbox.try_recv().ok();
        }
    }
}

async fn ticker(shard: Rc<Shard>) {
    loop {
        monoio::time::sleep(Duration::from_secs(1)).await;
        shard.tick();
    }
}

/// Closes this shard's clients with 1012, spread evenly over
/// `--drain-seconds` so they do not all reconnect at once, then stops.
async fn drain(shard: Rc<Shard>, stop: Rc<Stop>) {
    let request = CloseRequest {
        code: close::SERVICE_RESTART,
        reason: "server restarting",
        flush: true,
    };
    let conns = shard.connections();
    let window = Duration::from_secs(shard.config.drain_seconds);
    let start = Instant::now();
    let n = conns.len() as u32;
    for (i, conn) in conns.iter().enumerate() {
        let at = start + window * (i as u32 + 1) / (n + 1);
        let wait = at.saturating_duration_since(Instant::now());
        if !wait.is_zero() {
            monoio::time::sleep(wait).await;
        }
        conn.request_close(request);
    }
    // Connections that completed a handshake during the window.
    for conn in shard.connections() {
        conn.request_close(request);
    }
    // Wait for the whole node, not just this shard: a shard that stopped
    // early would close its listener while the kernel still queues new
    // connections on it, and those would be reset instead of answered
    // (503 while draining) by a shard that is still up.
    let deadline = Instant::now() + Duration::from_secs(shard.config.pong_timeout + 1);
    while shard.node.connections.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    shard.metrics.flush();
    stop.set();
}
