//! Start-up and shutdown: worker threads (one monoio runtime pinned to a
//! core each), their listeners, the metrics thread and signal handling.

mod listener;
mod worker;

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::backplane::Mesh;
use crate::config::{Config, DriverChoice};
use crate::error::{Context, Error, Result};
use crate::node::NodeState;

/// The I/O driver the workers actually run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    IoUring,
    Epoll,
}

impl Driver {
    pub fn name(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::Epoll => "epoll",
        }
    }
}

/// Picks the driver: io_uring unless unavailable or refused.
pub fn resolve_driver(choice: DriverChoice) -> Result<Driver> {
    let uring = monoio::utils::detect_uring();
    match choice {
        DriverChoice::Epoll => Ok(Driver::Epoll),
        DriverChoice::Uring if uring => Ok(Driver::IoUring),
        DriverChoice::Uring => Err(Error::msg(
            "--driver uring: io_uring is not available here (kernel too old, or forbidden by seccomp / io_uring_disabled)",
        )),
        DriverChoice::Auto if uring => Ok(Driver::IoUring),
        DriverChoice::Auto => {
            tracing::warn!("io_uring is not available here; falling back to epoll");
            Ok(Driver::Epoll)
        }
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            return (0..n).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Lifts this process's open-file limit to the hard limit the system
/// allows (the soft limit is often 1024, far below what a relay holds).
pub fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Runs the relay until it has drained after SIGTERM/SIGINT.
pub fn run(config: Config) -> Result<()> {
    let cpus = allowed_cpus();
    let workers = if config.server.workers == 0 {
        cpus.len().max(1)
    } else {
        config.server.workers
    };
    if workers > 128 {
        return Err(Error::msg(format!(
            "{workers} workers: at most 128 are supported"
        )));
    }
    let driver = resolve_driver(config.server.driver)?;
    if let Some(warning) = config.file_limit_warning() {
        tracing::warn!("{warning}");
    }
    let listener::Group {
        listeners,
        first: opened_the_address,
    } = listener::bind_group(
        config.server.listen,
        workers,
        config.server.reuse_port_shared,
    )?;
    // Kept to steer new connections to the other processes sharing the
    // address (a hot upgrade's new binary) when this one drains.
    let hand_over = HandOver {
        member: listeners[0]
            .try_clone()
            .context("keeping a handle on the listener")?,
        own: workers,
        opened_the_address,
    };
    let addr = listeners[0]
        .local_addr()
        .context("reading the listen address")?;

    crate::metrics::install()?;
    // /metrics is on the main port (loopback clients only) unless the
    // operator gives it an address of its own.
    let metrics_addr = match config.server.metrics_addr {
        None => addr,
        Some(wanted) => {
            let metrics_listener = TcpListener::bind(wanted)
                .with_context(|| format!("binding the metrics endpoint on {wanted}"))?;
            let bound = metrics_listener
                .local_addr()
                .context("reading the metrics address")?;
            crate::http::metrics_endpoint::serve(metrics_listener)?;
            bound
        }
    };

    let node = Arc::new(
        NodeState::with_address_limits(config.address_limits.clone())
            .advertising(config.server.advertise_url.clone()),
    );
    let (mesh, inboxes) = Mesh::new(workers);
    let config = Arc::new(config);
    install_signal_handler(node.clone(), mesh.clone(), hand_over, config.clone())?;
    let redis = if config.uses_redis() {
        // Not ready until Redis answers: /readyz is 503 and publishes get
        // `unavailable` meanwhile.
        node.set_backplane_ready(false);
        Some(crate::backplane::redis::start(
            &config.backplane,
            &config.redis,
            &config.history,
            config.limits.max_connections,
            Arc::new(mesh.clone()),
            node.clone(),
        )?)
    } else {
        None
    };
    let backplane = if config.uses_redis() {
        "redis"
    } else {
        "embedded"
    };

    tracing::info!(%addr, %metrics_addr, workers, driver = driver.name(), backplane, max_connections = config.limits.max_connections, "ringcast listening");
    // One stable line on stdout for scripts and tests to find the addresses
    // (not println!: a closed stdout must not stop the relay).
    let mut stdout = std::io::stdout();
    let _ = writeln!(
        stdout,
        "ringcast listening addr={addr} metrics={metrics_addr} workers={workers} driver={} backplane={backplane}",
        driver.name()
    );
    let _ = stdout.flush();

    let mut threads = Vec::with_capacity(workers);
    for (id, (listener, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let cpu = config
            .server
            .pin_workers
            .then(|| cpus.get(id % cpus.len().max(1)).copied())
            .flatten();
        let w = worker::Worker {
            id,
            cpu,
            driver,
            listener,
            inbox,
            config: config.clone(),
            node: node.clone(),
            mesh: mesh.clone(),
            redis: redis.clone(),
        };
        let t = std::thread::Builder::new()
            .name(format!("ringcast-w{id}"))
            .spawn(move || w.run())
            .context("starting a worker thread")?;
        threads.push(t);
    }
    let mut first_error = None;
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(_) => {
                first_error.get_or_insert(Error::msg("a worker thread panicked"));
            }
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => {
            tracing::info!("drained; exiting");
            Ok(())
        }
    }
}

/// First SIGTERM/SIGINT: drain. Second: exit at once.
/// What a draining process needs to hand a shared address to the other
/// processes listening on it.
struct HandOver {
    member: TcpListener,
    own: usize,
    opened_the_address: bool,
}

impl HandOver {
    fn run(&self) {
        if !self.opened_the_address {
            tracing::warn!(
                "this process joined the address after another one: it cannot steer new \
                 connections away while it drains (those it gets are answered 503)"
            );
            return;
        }
        match listener::hand_over(&self.member, self.own) {
            Ok(0) => {}
            Ok(others) => {
                tracing::info!(others, "new connections go to the other processes");
                if !listener::queued_connections_migrate() {
                    tracing::info!(
                        "net.ipv4.tcp_migrate_req is not 1: a connection queued at the instant \
                         this process closes its listeners is reset instead of moved"
                    );
                }
            }
            Err(e) => tracing::warn!("could not hand the shared port over: {e}"),
        }
    }
}

fn install_signal_handler(
    node: Arc<NodeState>,
    mesh: Mesh,
    hand_over: HandOver,
    config: Arc<Config>,
) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("ringcast-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGHUP {
                    // Keys and the certificate are read again; nothing else is.
                    match config.reload_keys() {
                        Ok(true) => tracing::info!("SIGHUP: token keys read again"),
                        Ok(false) => tracing::info!("SIGHUP: no token keys to read again"),
                        Err(e) => {
                            tracing::error!(error = %e, "SIGHUP: token keys kept as they were")
                        }
                    }
                    if let Some(tls) = &config.tls {
                        match tls.reload() {
                            Ok(()) => tracing::info!("SIGHUP: TLS certificate read again"),
                            Err(e) => {
                                tracing::error!(error = %e, "SIGHUP: TLS certificate kept as it was")
                            }
                        }
                    }
                    continue;
                }
                if node.draining.swap(true, Ordering::SeqCst) {
                    tracing::warn!(signal, "second signal: exiting without draining");
                    std::process::exit(1);
                }
                tracing::info!(signal, "draining");
                hand_over.run();
                mesh.broadcast_drain();
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}
