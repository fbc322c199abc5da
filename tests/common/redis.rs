//! Test support for the Redis backplane: each test starts its own
//! `redis-server` on a free loopback port (and kills it when dropped), and
//! fails loudly when the binary is missing. `tests/run` installs it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::PATIENCE;

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    /// The TLS port, for a server started with [`RedisServer::start_tls`].
    pub tls_port: Option<u16>,
    dir: PathBuf,
    extra: Vec<String>,
}

/// Redis's TLS configuration: its certificate and key, the CA clients'
/// certificates are checked against, and whether it asks for them.
fn tls_files<'a>(cert: &'a str, key: &'a str, ca: &'a str, verify: &'a str) -> [&'a str; 8] {
    [
        "--tls-cert-file",
        cert,
        "--tls-key-file",
        key,
        "--tls-ca-cert-file",
        ca,
        "--tls-auth-clients",
        verify,
    ]
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn binary(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let path = format!("{dir}/{name}");
        if std::path::Path::new(&path).exists() {
            return path;
        }
    }
    panic!(
        "{name} not found: the Redis backplane tests need Redis 7 \
         (tests/run installs it: apt-get install redis-server redis-tools)"
    );
}

impl RedisServer {
    /// A fresh Redis without persistence.
    pub fn start() -> RedisServer {
        Self::start_with(free_port(), &[])
    }

    /// A Redis on `port` with extra configuration arguments
    /// (e.g. `["--appendonly", "yes"]`).
    pub fn start_with(port: u16, extra: &[&str]) -> RedisServer {
        let dir =
            std::env::temp_dir().join(format!("ringcast-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer {
            child: None,
            port,
            tls_port: None,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.launch();
        server
    }

    /// A Redis that also serves TLS on a port of its own, with the
    /// certificate and key at `cert`/`key`, checking clients' certificates
    /// against `ca` when `verify_clients` (Redis's default). The plain port
    /// stays for the test's own commands.
    pub fn start_tls(cert: &str, key: &str, ca: &str, verify_clients: bool) -> RedisServer {
        let tls_port = free_port();
        let tls_port_arg = tls_port.to_string();
        let verify = if verify_clients { "yes" } else { "no" };
        let mut server = Self::start_with(
            free_port(),
            &[
                &["--tls-port", &tls_port_arg][..],
                &tls_files(cert, key, ca, verify),
            ]
            .concat(),
        );
        server.tls_port = Some(tls_port);
        server
    }

    /// The `rediss://` URL of a server started with [`RedisServer::start_tls`].
    pub fn tls_url(&self) -> String {
        format!(
            "rediss://127.0.0.1:{}/0",
            self.tls_port.expect("started with start_tls")
        )
    }

    fn launch(&mut self) {
        let child = Command::new(binary("redis-server"))
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        while self.try_command(&["PING"]).as_deref() != Some("+PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server on {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server at once (SIGKILL, as a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same configuration.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// `redis-cli -p PORT args…`: stdout, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(binary("redis-cli"))
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("running redis-cli");
        assert!(out.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// One command over raw TCP (any bytes, NUL included, unlike
    /// redis-cli's arguments); the first reply line.
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args)
            .unwrap_or_else(|| panic!("no reply to {args:?}"))
    }

    fn try_command(&self, args: &[&str]) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).ok()?;
        Some(
            String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()?
                .to_string(),
        )
    }
}

/// A Redis Cluster of `n` masters (no replicas) on free loopback ports,
/// built with `redis-cli --cluster create`; killed when dropped.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

/// A free port whose cluster bus port (port + 10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        Self::start_nodes(n, None)
    }

    /// A cluster whose nodes also serve TLS (and talk TLS among
    /// themselves) with the certificate `cert`/`key`, not asking clients
    /// for one; Redis tells TLS clients the nodes' TLS ports.
    pub fn start_tls(n: usize, cert: &str, key: &str, ca: &str) -> RedisCluster {
        Self::start_nodes(
            n,
            Some(
                &[
                    &["--tls-cluster", "yes"][..],
                    &tls_files(cert, key, ca, "no"),
                ]
                .concat(),
            ),
        )
    }

    /// `tls`: the TLS configuration of every node, each also given a TLS
    /// port of its own.
    fn start_nodes(n: usize, tls: Option<&[&str]>) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                let mut args = vec![
                    "--cluster-enabled".to_string(),
                    "yes".into(),
                    "--cluster-node-timeout".into(),
                    "5000".into(),
                ];
                let tls_port = tls.map(|_| free_port());
                if let (Some(port), Some(tls)) = (tls_port, tls) {
                    args.extend(["--tls-port".to_string(), port.to_string()]);
                    args.extend(tls.iter().map(|s| s.to_string()));
                }
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let mut server = RedisServer::start_with(free_cluster_port(), &args);
                server.tls_port = tls_port;
                server
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new(binary("redis-cli"))
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("running redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + PATIENCE;
        while !cluster
            .nodes
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        {
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// The `--redis-cluster` argument for TLS: every node's TLS port as a
    /// `rediss://` seed.
    pub fn tls_seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                format!(
                    "rediss://127.0.0.1:{}",
                    n.tls_port.expect("started with start_tls")
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The `--redis-cluster` argument: every node as a seed.
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The node that owns `key`'s slot (the others answer MOVED).
    pub fn owner_of(&self, key: &str) -> usize {
        let owners: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                !self.nodes[i]
                    .command(&["EXISTS", key])
                    .starts_with("-MOVED")
            })
            .collect();
        assert_eq!(owners.len(), 1, "{key} is served by {owners:?}");
        owners[0]
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP proxy in front of Redis that can make the pub/sub connections
/// passing through it *deaf*: still open, still accepting commands, but
/// never forwarding another byte back — the failure that leaves a relay
/// "healthy" yet receiving nothing. Connections opened later work normally.
pub struct DeafeningProxy {
    pub port: u16,
    deafen_before: std::sync::Arc<std::sync::atomic::AtomicU64>,
    next_id: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl DeafeningProxy {
    pub async fn start(redis_port: u16) -> DeafeningProxy {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let deafen_before = Arc::new(AtomicU64::new(0));
        let next_id = Arc::new(AtomicU64::new(1));
        let (deafen, ids) = (deafen_before.clone(), next_id.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let id = ids.fetch_add(1, Ordering::SeqCst);
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", redis_port)).await
                else {
                    continue;
                };
                let subscriber = Arc::new(AtomicBool::new(false));
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let seen = subscriber.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        if buf[..n]
                            .windows(9)
                            .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"))
                        {
                            seen.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                let deafen = deafen.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let deaf =
                            subscriber.load(Ordering::SeqCst) && id < deafen.load(Ordering::SeqCst);
                        if !deaf && cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        DeafeningProxy {
            port,
            deafen_before,
            next_id,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Every pub/sub connection open now stops hearing Redis.
    pub fn deafen_current_subscribers(&self) {
        use std::sync::atomic::Ordering;
        self.deafen_before
            .store(self.next_id.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for DeafeningProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
