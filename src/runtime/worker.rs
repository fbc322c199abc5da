//! One worker: a thread pinned to a core, running a monoio runtime that
//! accepts on its own listener and runs its shard's hub and connections.

use std::cell::Cell;
use std::net::TcpListener;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use crate::backplane::embedded::EmbeddedBroker;
use crate::backplane::redis::{RedisBroker, RedisHandle};
use crate::backplane::{Broker, Mesh, ShardMsg};
use crate::config::Config;
use crate::error::{Context, Result};
use crate::http::TurnedAway;
use crate::hub::{CloseRequest, Shard};
use crate::node::{Admit, NodeState};
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
    pub redis: Option<RedisHandle>,
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
        let shards = self.mesh.shards();
        let broker: Box<dyn Broker> = match self.redis {
            Some(redis) => Box::new(RedisBroker::new(
                self.id,
                shards,
                redis,
                self.node.clone(),
                &self.config.history,
            )),
            None => Box::new(EmbeddedBroker::new(
                self.id,
                shards,
                self.node.epoch_nonce,
                &self.config.history,
            )),
        };
        let shard = Rc::new(Shard::new(
            self.id,
            self.config,
            self.node,
            self.mesh,
            broker,
        ));
        let listener = monoio::net::TcpListener::from_std(self.listener)
            .with_context(|| format!("registering the listener of worker {}", self.id))?;
        let stop = Rc::new(Stop::default());
        monoio::spawn(inbox_loop(shard.clone(), self.inbox, stop.clone()));
        monoio::spawn(ticker(shard.clone()));
        monoio::spawn(conflation_wheel(shard.clone()));
        if !shard.config.limits.write_delay.is_zero() {
            monoio::spawn(write_flusher(shard.clone()));
        }
        monoio::spawn(crate::ws::driver::run());
        let mut accept_errors = AcceptErrors::default();
        let mut reserve = ReserveDescriptor::open();
        loop {
            if !reserve.is_held() {
                reserve = ReserveDescriptor::open();
            }
            monoio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => admit(&shard, stream, peer),
                    Err(e) => {
                        let out_of_files = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
                        accept_errors.count(&shard, &e);
                        if out_of_files && reserve.release() {
                            // The descriptor given back lets one waiting
                            // client hear why instead of hanging in the
                            // backlog.
                            if let Ok((stream, _)) = listener.accept().await {
                                turn_away(stream);
                                shard.metrics.accept_refused_full.increment(1);
                            }
                            reserve = ReserveDescriptor::open();
                        } else {
                            // Back off instead of spinning on the error.
                            monoio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                },
                _ = stop.wait() => break,
            }
        }
        crate::ws::driver::shutdown();
        super::listener::release(&listener);
        Ok(())
    }
}

/// Serves an accepted client socket, or tells it the node is full or
/// that its address is past its limits.
fn admit(shard: &Rc<Shard>, stream: monoio::net::TcpStream, peer: std::net::SocketAddr) {
    let config = &shard.config;
    let node = &shard.node;
    // A trusted proxy is not counted: the client it names will be.
    let from_proxy = node.addresses.is_trusted_proxy(peer.ip());
    let address = if from_proxy {
        Default::default()
    } else {
        node.addresses.key(peer.ip())
    };
    let second = node.started.elapsed().as_secs();
    let admission = match node.addresses.open(address, second) {
        Err(refusal) => {
            shard.metrics.address_limited(refusal);
            match node.admit_overflow(config.overflow_connections()) {
                Some(a) => Err((a, TurnedAway::Address(refusal))),
                None => {
                    shard.metrics.accept_refused_dropped.increment(1);
                    return;
                }
            }
        }
        Ok(()) => match node.admit(config.limits.max_connections, config.overflow_connections()) {
            Admit::Served(mut a) => {
                a.hold_address(address);
                if from_proxy {
                    a.mark_from_proxy();
                }
                Ok(a)
            }
            Admit::Full(a) => {
                node.addresses.close(address);
                shard.metrics.accept_refused_full.increment(1);
                Err((a, TurnedAway::Full))
            }
            Admit::Dropped => {
                node.addresses.close(address);
                shard.metrics.accept_refused_dropped.increment(1);
                return;
            }
        },
    };
    let _ = stream.set_nodelay(true);
    match crate::socket::socket_of(stream) {
        Ok(stream) => match admission {
            Ok(a) => drop(monoio::spawn(crate::http::serve(
                shard.clone(),
                stream,
                peer.ip(),
                a,
            ))),
            Err((a, why)) => drop(monoio::spawn(crate::http::serve_turned_away(
                shard.clone(),
                stream,
                peer.ip(),
                a,
                why,
            ))),
        },
        Err(e) => tracing::warn!("could not switch a socket to poll mode: {e}"),
    }
}

/// Writes a 503 straight to a socket accepted with the reserve descriptor
/// and closes it, without waiting: the descriptor must be free again for
/// the reserve (monoio would close it later, through the ring).
fn turn_away(stream: monoio::net::TcpStream) {
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
    let answer = crate::http::Response {
        extra: "Retry-After: 5\r\n",
        ..crate::http::Response::text(503, "this node is out of file descriptors")
    }
    .encode(false);
    // SAFETY: monoio hands over the descriptor it owned; it is closed once,
    // when `socket` drops.
    let socket = unsafe { std::net::TcpStream::from_raw_fd(stream.into_raw_fd()) };
    // SAFETY: a send on a socket this function owns.
    unsafe {
        libc::send(
            socket.as_raw_fd(),
            answer.as_ptr().cast(),
            answer.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        );
    }
    let _ = socket.shutdown(std::net::Shutdown::Write);
}

/// One descriptor held back so that, out of descriptors, the worker can
/// still accept a client and answer it.
struct ReserveDescriptor(Option<std::fs::File>);

impl ReserveDescriptor {
    fn open() -> Self {
        ReserveDescriptor(std::fs::File::open("/dev/null").ok())
    }

    fn is_held(&self) -> bool {
        self.0.is_some()
    }

    /// Closes it; false when there was none to close.
    fn release(&mut self) -> bool {
        self.0.take().is_some()
    }
}

/// Accept errors, logged at most once per interval with how many there
/// were.
#[derive(Default)]
struct AcceptErrors {
    since_log: u64,
    logged: Option<Instant>,
}

impl AcceptErrors {
    const INTERVAL: Duration = Duration::from_secs(5);

    fn count(&mut self, shard: &Shard, e: &std::io::Error) {
        self.since_log += 1;
        shard.metrics.accept_errors.increment(1);
        if self.logged.is_none_or(|t| t.elapsed() >= Self::INTERVAL) {
            tracing::warn!(
                worker = shard.id,
                errors = self.since_log,
                "accept failed: {e}"
            );
            self.since_log = 0;
            self.logged = Some(Instant::now());
        }
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

/// Messages from other shards handled before the inbox lets the shard's
/// other tasks (accepts, connections) run.
const INBOX_BURST: usize = 1024;

/// Handles messages from other shards, in bursts of at most
/// [`INBOX_BURST`], so a flood from other shards delays this shard's
/// clients by one burst at most, never by the whole backlog.
async fn inbox_loop(shard: Rc<Shard>, inbox: flume::Receiver<ShardMsg>, stop: Rc<Stop>) {
    while let Ok(msg) = inbox.recv_async().await {
        let mut next = Some(msg);
        let mut handled = 0;
        while let Some(msg) = next {
            if matches!(msg, ShardMsg::Drain) {
                monoio::spawn(drain(shard.clone(), stop.clone()));
            } else {
                shard.handle_msg(msg, Instant::now());
            }
            handled += 1;
            if handled == INBOX_BURST {
                yield_now().await;
                handled = 0;
            }
            next = inbox.try_recv().ok();
        }
        shard.metrics.inbox_depth.set(inbox.len() as f64);
    }
}

/// Lets the runtime's other ready tasks run once.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

/// Ticks the shard once a second with the time (the hub reads no clock).
async fn ticker(shard: Rc<Shard>) {
    let started = Instant::now();
    loop {
        let at = Instant::now();
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        shard.tick_at(at.duration_since(started).as_secs() as u32, at, unix);
        monoio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Sleeps until the shard's next conflation window closes and closes it
/// (`hub/conflation.rs`); an earlier window scheduled meanwhile wakes it.
async fn conflation_wheel(shard: Rc<Shard>) {
    use std::future::Future;
    use std::task::Poll;
    loop {
        let deadline = std::future::poll_fn(|cx| match shard.next_conflation_deadline() {
            Some(deadline) => Poll::Ready(deadline),
            None => {
                shard.set_wheel_waker(cx.waker());
                Poll::Pending
            }
        })
        .await;
        let mut sleep = std::pin::pin!(monoio::time::sleep_until(deadline.into()));
        let due = std::future::poll_fn(|cx| {
            if sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(true);
            }
            if shard
                .next_conflation_deadline()
                .is_some_and(|next| next < deadline)
            {
                return Poll::Ready(false);
            }
            shard.set_wheel_waker(cx.waker());
            Poll::Pending
        })
        .await;
        if due {
            shard.handle_conflation_timers(Instant::now());
        }
    }
}

/// With `--write-delay`: sleeps until the first held connection is due
/// and releases those due (`Shard::flush_held_writes`). Holds come in
/// deadline order, so the one in front is always the earliest, and a hold
/// while none waited wakes this task.
async fn write_flusher(shard: Rc<Shard>) {
    loop {
        let deadline = std::future::poll_fn(|cx| match shard.next_flush_deadline(cx.waker()) {
            Some(deadline) => std::task::Poll::Ready(deadline),
            None => std::task::Poll::Pending,
        })
        .await;
        monoio::time::sleep_until(deadline.into()).await;
        shard.flush_held_writes(Instant::now());
    }
}

/// Closes this shard's clients with 1012, spread evenly over
/// `--drain-seconds` so they do not all reconnect at once, then stops.
async fn drain(shard: Rc<Shard>, stop: Rc<Stop>) {
    let request = CloseRequest {
        code: close::SERVICE_RESTART,
        reason: crate::directory::DRAINING_REASON,
        flush: true,
    };
    let conns = shard.connections();
    let window = shard.config.server.drain;
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
    let deadline = Instant::now() + shard.config.heartbeat.pong_timeout + Duration::from_secs(1);
    while shard.node.connections.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(20)).await;
    }
    shard.metrics.flush();
    stop.set();
}
