//! The servers compared: how each is installed, started and reached. The
//! same load generator drives all of them; each speaks (or is given) the
//! JSON request/event vocabulary it understands.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use sha2::Digest;

use crate::procs::{self, Proc};
use crate::workloads::Topology;

/// Where things are and which core the servers get.
pub struct Env {
    pub root: PathBuf,
    pub logs: PathBuf,
    pub server_cpu: u32,
    pub redis_port: u16,
    /// A uWebSockets server the user built (`--uws`); never downloaded or
    /// built by the harness.
    pub uws: Option<PathBuf>,
    /// A Centrifugo binary the user provides (`--centrifugo`).
    pub centrifugo: Option<PathBuf>,
}

impl Env {
    fn bin(&self, name: &str) -> String {
        self.root
            .join("target/release")
            .join(name)
            .display()
            .to_string()
    }

    fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.redis_port)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ringcast,
    Baseline,
    NodeWs,
    SocketIo,
    Sockudo,
    Uws,
    Centrifugo,
    Bun,
    UwsJs,
}

/// sockudo's pinned release, built by `cargo install` into `target/`.
const SOCKUDO_VERSION: &str = "5.2.0";
/// The server API key the Centrifugo contender is given (and its
/// publishers send).
const CENTRIFUGO_API_KEY: &str = "benchkey";

/// The one app the sockudo contender serves (also given to the load
/// generator, which signs its HTTP publishes with it).
const SOCKUDO_APP: (&str, &str, &str) = ("bench", "benchkey", "benchsecret");

pub struct Contender {
    pub name: &'static str,
    pub what: &'static str,
    kind: Kind,
    /// Options added to the server's own (a ringcast setting under test).
    options: &'static [&'static str],
}

pub const CONTENDERS: &[Contender] = &[
    Contender {
        name: "ringcast",
        what: "this project, --workers 1; embedded backplane on one node, Redis between two",
        kind: Kind::Ringcast,
        options: &[],
    },
    Contender {
        name: "ringcast-wd20",
        what: "this project as above with --write-delay 20: a connection's publications wait up to 20 ms to share one write (opt-in; the default writes on the loop turn they arrive)",
        kind: Kind::Ringcast,
        options: &["--write-delay", "20"],
    },
    Contender {
        name: "node-ws",
        what: "the Node.js tutorial relay: ws + ioredis, one Redis channel per channel, fan-out by iterating the subscriber set (bench/contenders/node-ws)",
        kind: Kind::NodeWs,
        options: &[],
    },
    Contender {
        name: "socketio",
        what: "Socket.IO 4 with @socket.io/redis-adapter, rooms as channels, WebSocket transport only (bench/contenders/socketio)",
        kind: Kind::SocketIo,
        options: &[],
    },
    Contender {
        name: "sockudo",
        what: "sockudo, the Rust (tokio) Pusher-protocol server: cargo install --locked, pinned; subscribe over the Pusher protocol, publish through its signed HTTP API; local adapter on one node, Redis adapter between two",
        kind: Kind::Sockudo,
        options: &[],
    },
    Contender {
        name: "uws",
        what: "uWebSockets: a server you built yourself on its pub/sub (--uws PATH), speaking the JSON subset of bench/contenders/README.md; one node",
        kind: Kind::Uws,
        options: &[],
    },
    Contender {
        name: "centrifugo",
        what: "Centrifugo, the Go real-time server, a binary you provide (--centrifugo PATH, v5 or v6): its JSON client protocol, publishes through its server API; memory engine on one node, Redis engine between two",
        kind: Kind::Centrifugo,
        options: &[],
    },
    Contender {
        name: "bun",
        what: "Bun.serve with Bun's built-in topic pub/sub (ws.subscribe, server.publish; uWebSockets inside), the npm package bun, pinned (bench/contenders/bun); one node",
        kind: Kind::Bun,
        options: &[],
    },
    Contender {
        name: "uws-js",
        what: "uWebSockets.js with its topic pub/sub (ws.subscribe, app.publish) on Node, the npm build @trufflesuite/uws-js-unofficial, pinned, native addon required (bench/contenders/uws-js); one node",
        kind: Kind::UwsJs,
        options: &[],
    },
    Contender {
        name: "baseline",
        what: "tokio + tokio-tungstenite broadcast server written the usual way, one thread (bench/src/bin/baseline.rs); one node only",
        kind: Kind::Baseline,
        options: &[],
    },
];

/// The servers of one run and how the load generator reaches them.
pub struct Started {
    /// Servers first, then Redis: the order they stop in.
    procs: Vec<Proc>,
    /// `--url` for the load generator (comma-separated nodes).
    pub urls: String,
    /// The process sampled for RSS and CPU (the first node).
    pub pid: u32,
}

impl Started {
    /// Stops every process of the run (servers before Redis).
    pub fn stop(self) {
        drop(self.procs);
    }
}

const PATIENCE: Duration = Duration::from_secs(30);

impl Contender {
    pub fn supports(&self, topology: Topology) -> bool {
        !(matches!(
            self.kind,
            Kind::Baseline | Kind::Uws | Kind::Bun | Kind::UwsJs
        ) && topology == Topology::TwoNodes)
    }

    /// A contender the user supplies (its path is an option); it takes part
    /// only when given.
    pub fn user_supplied(&self) -> Option<&'static str> {
        match self.kind {
            Kind::Uws => Some("--uws"),
            Kind::Centrifugo => Some("--centrifugo"),
            _ => None,
        }
    }

    /// Whether a user-supplied contender's path was given.
    pub fn available(&self, env: &Env) -> bool {
        match self.kind {
            Kind::Uws => env.uws.is_some(),
            Kind::Centrifugo => env.centrifugo.is_some(),
            _ => true,
        }
    }

    fn needs_redis(&self, topology: Topology) -> bool {
        match self.kind {
            Kind::Ringcast => topology == Topology::TwoNodes,
            Kind::Baseline | Kind::Uws | Kind::Bun | Kind::UwsJs => false,
            Kind::NodeWs | Kind::SocketIo => true,
            Kind::Sockudo | Kind::Centrifugo => topology == Topology::TwoNodes,
        }
    }

    fn ports(&self) -> [u16; 2] {
        match self.kind {
            Kind::Ringcast => [8080, 8081],
            Kind::SocketIo => [8092, 8093],
            Kind::Sockudo => [6001, 6002],
            Kind::Uws => [8094, 8095],
            Kind::Centrifugo => [8096, 8097],
            Kind::Bun => [8098, 8099],
            Kind::UwsJs => [8100, 8101],
            _ => [8090, 8091],
        }
    }

    fn url(&self, port: u16) -> String {
        match self.kind {
            Kind::SocketIo => format!("ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"),
            Kind::Sockudo => format!(
                "ws://127.0.0.1:{port}/app/{}?protocol=7&client=ringcast-loadgen&version=1.0",
                SOCKUDO_APP.1
            ),
            Kind::Centrifugo => format!("ws://127.0.0.1:{port}/connection/websocket"),
            _ => format!("ws://127.0.0.1:{port}/ws"),
        }
    }

    /// Load generator options this contender needs (its wire format).
    pub fn loadgen_args(&self) -> Vec<String> {
        match self.kind {
            Kind::SocketIo => strings(&["--format", "socketio"]),
            Kind::Sockudo => strings(&[
                "--format",
                "pusher",
                "--pusher-app",
                &format!("{}:{}:{}", SOCKUDO_APP.0, SOCKUDO_APP.1, SOCKUDO_APP.2),
            ]),
            Kind::Centrifugo => strings(&[
                "--format",
                "centrifugo",
                "--centrifugo-api-key",
                CENTRIFUGO_API_KEY,
            ]),
            _ => Vec::new(),
        }
    }

    fn bun_bin(env: &Env) -> String {
        env.root
            .join("bench/contenders/bun/node_modules/.bin/bun")
            .display()
            .to_string()
    }

    fn sockudo_bin(env: &Env) -> PathBuf {
        env.root.join("target/contenders/sockudo/bin/sockudo")
    }

    /// The npm project of a Node.js contender and the packages whose
    /// versions the results record.
    fn npm_project(&self) -> Option<(&'static str, &'static [&'static str])> {
        match self.kind {
            Kind::NodeWs => Some(("bench/contenders/node-ws", &["ws", "ioredis"])),
            Kind::SocketIo => Some((
                "bench/contenders/socketio",
                &["socket.io", "@socket.io/redis-adapter", "ioredis"],
            )),
            Kind::Bun => Some(("bench/contenders/bun", &["bun"])),
            Kind::UwsJs => Some((
                "bench/contenders/uws-js",
                &["@trufflesuite/uws-js-unofficial"],
            )),
            _ => None,
        }
    }

    /// Installs what the contender needs (binaries are built beforehand by
    /// `bench/compare`); returns its version line for the results.
    pub fn prepare(&self, env: &Env) -> Result<String> {
        match self.kind {
            Kind::Ringcast | Kind::Baseline => {
                for bin in ["ringcast", "baseline", "loadgen"] {
                    if !Path::new(&env.bin(bin)).exists() {
                        bail!(
                            "{} is missing: run bench/compare (it builds the workspace)",
                            env.bin(bin)
                        );
                    }
                }
                let rev =
                    output("git", &["rev-parse", "--short", "HEAD"], &env.root).unwrap_or_default();
                Ok(format!("git {rev}"))
            }
            Kind::Sockudo => {
                let bin = Self::sockudo_bin(env);
                let installed = output(&bin.display().to_string(), &["--version"], &env.root)
                    .unwrap_or_default();
                if !installed.contains(SOCKUDO_VERSION) {
                    eprintln!("   cargo install sockudo {SOCKUDO_VERSION} (a long build, once)");
                    run(
                        "cargo",
                        &[
                            "install", "--locked", "--root", "target/contenders/sockudo", "sockudo",
                            "--version", SOCKUDO_VERSION, "--no-default-features", "--features", "local,redis",
                        ],
                        &env.root,
                    )
                    .context("installing sockudo (needs protobuf-compiler, cmake, clang: apt-get install protobuf-compiler cmake clang libclang-dev)")?;
                }
                Ok(format!("sockudo {SOCKUDO_VERSION} (features local, redis)"))
            }
            Kind::Uws => {
                let path = env.uws.as_ref().context("uws needs --uws PATH")?;
                if !is_executable(path) {
                    bail!("{} is not an executable file", path.display());
                }
                let bytes = std::fs::read(path)
                    .with_context(|| format!("reading the uws server {}", path.display()))?;
                // What the user built is identified by its content, as
                // there is no version to ask it for.
                let digest = hex::encode(sha2::Sha256::digest(&bytes));
                Ok(format!("user-built {} (sha256 {digest})", path.display()))
            }
            Kind::Centrifugo => {
                let path = env
                    .centrifugo
                    .as_ref()
                    .context("centrifugo needs --centrifugo PATH")?;
                if !is_executable(path) {
                    bail!("{} is not an executable file", path.display());
                }
                let version = centrifugo_version(path, &env.root)?;
                Ok(version.0)
            }
            Kind::NodeWs | Kind::SocketIo | Kind::Bun | Kind::UwsJs => {
                let (project, packages) = self.npm_project().expect("a Node.js contender");
                let dir = env.root.join(project);
                // Bun's package only holds a stub until its install script
                // put the binary in place: running it is the check.
                let bun_runs = self.kind != Kind::Bun
                    || output(&Self::bun_bin(env), &["--version"], &dir).is_ok();
                if !bun_runs
                    || !packages
                        .iter()
                        .all(|p| dir.join("node_modules").join(p).exists())
                {
                    run(
                        "npm",
                        &["ci", "--no-audit", "--no-fund", "--loglevel=error"],
                        &dir,
                    )
                    .with_context(|| format!("installing the {} contender (npm ci)", self.name))?;
                }
                let mut version = match self.kind {
                    Kind::Bun => {
                        format!("bun {}", output(&Self::bun_bin(env), &["--version"], &dir)?)
                    }
                    _ => format!("node {}", output("node", &["--version"], &dir)?),
                };
                for package in packages {
                    version.push_str(&format!(", {package} {}", package_version(&dir, package)?));
                }
                Ok(version)
            }
        }
    }

    pub fn start(&self, topology: Topology, env: &Env) -> Result<Started> {
        let mut procs = Vec::new();
        if self.needs_redis(topology) {
            let redis = Proc::redis(env.server_cpu, env.redis_port, &env.logs, PATIENCE)?;
            procs.push(redis);
        }
        let nodes = match topology {
            Topology::Single => 1,
            Topology::TwoNodes => 2,
        };
        let mut urls = Vec::new();
        let mut first_pid = None;
        // Servers start after Redis and must stop before it: insert at the
        // front so they drop first.
        for (i, port) in self.ports().into_iter().take(nodes).enumerate() {
            let log = env.logs.join(format!("{}-{i}.log", self.name));
            let mut proc = match self.kind {
                Kind::Ringcast => {
                    let mut args = strings(&[
                        "--workers",
                        "1",
                        "--listen",
                        &format!("127.0.0.1:{port}"),
                        "--metrics-addr",
                        "127.0.0.1:0",
                        "--log",
                        "warn",
                        "--max-publish-rate",
                        "0",
                        "--max-subscriptions",
                        "10000",
                        // The load generator publishes from WebSocket clients,
                        // as fast as the relay takes it.
                        "--allow-client-publish",
                        "true",
                        "--max-frames-per-second",
                        "0",
                        "--max-bytes-per-second",
                        "0",
                    ]);
                    if topology == Topology::TwoNodes {
                        args.extend(strings(&["--redis", &env.redis_url()]));
                    }
                    args.extend(strings(self.options));
                    Proc::spawn(
                        self.name,
                        env.server_cpu,
                        &env.bin("ringcast"),
                        &args,
                        &env.root,
                        &[],
                        &log,
                    )?
                }
                Kind::Baseline => Proc::spawn(
                    self.name,
                    env.server_cpu,
                    &env.bin("baseline"),
                    &strings(&["--threads", "1", "--listen", &format!("127.0.0.1:{port}")]),
                    &env.root,
                    &[],
                    &log,
                )?,
                Kind::Sockudo => {
                    let (id, key, secret) = SOCKUDO_APP;
                    let adapter = if topology == Topology::TwoNodes {
                        "redis"
                    } else {
                        "local"
                    };
                    // Run from the log directory: sockudo reads
                    // config/config.toml from its working directory when
                    // present, and there is none there.
                    let mut vars = vec![
                        ("HOST", "127.0.0.1".into()),
                        ("PORT", port.to_string()),
                        ("SOCKUDO_DEFAULT_APP_ID", id.into()),
                        ("SOCKUDO_DEFAULT_APP_KEY", key.into()),
                        ("SOCKUDO_DEFAULT_APP_SECRET", secret.into()),
                        // Its defaults (100 connections, rate limits)
                        // are for production, not for a benchmark.
                        ("SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS", "0".into()),
                        ("SOCKUDO_MAX_CONNECTIONS", "0".into()),
                        ("RATE_LIMITER_ENABLED", "false".into()),
                        ("METRICS_ENABLED", "false".into()),
                        ("ADAPTER_DRIVER", adapter.into()),
                        ("ADAPTER_FALLBACK_TO_LOCAL", "false".into()),
                        ("REDIS_URL", env.redis_url()),
                        ("RUST_LOG", "warn".into()),
                    ];
                    if topology == Topology::TwoNodes {
                        // Required by sockudo for more than one node (its
                        // idempotency cache must be shared).
                        vars.push(("CACHE_DRIVER", "redis".into()));
                    }
                    Proc::spawn(
                        self.name,
                        env.server_cpu,
                        &Self::sockudo_bin(env).display().to_string(),
                        &[],
                        &env.logs,
                        &vars,
                        &log,
                    )?
                }
                Kind::Uws => Proc::spawn(
                    self.name,
                    env.server_cpu,
                    &env.uws
                        .as_ref()
                        .context("uws needs --uws PATH")?
                        .display()
                        .to_string(),
                    &[],
                    &env.logs,
                    &[("PORT", port.to_string())],
                    &log,
                )?,
                Kind::Centrifugo => {
                    let path = env
                        .centrifugo
                        .as_ref()
                        .context("centrifugo needs --centrifugo PATH")?;
                    let (_, major) = centrifugo_version(path, &env.root)?;
                    let redis = (topology == Topology::TwoNodes).then(|| env.redis_url());
                    let config = env.logs.join(format!("centrifugo-{i}.json"));
                    std::fs::write(
                        &config,
                        centrifugo_config(major, port, redis.as_deref()).to_string(),
                    )
                    .with_context(|| format!("writing {}", config.display()))?;
                    Proc::spawn(
                        self.name,
                        env.server_cpu,
                        &path.display().to_string(),
                        &strings(&["--config", &config.display().to_string()]),
                        &env.logs,
                        &[],
                        &log,
                    )?
                }
                Kind::Bun => Proc::spawn(
                    self.name,
                    env.server_cpu,
                    &Self::bun_bin(env),
                    &strings(&["server.js"]),
                    &env.root.join("bench/contenders/bun"),
                    &[("PORT", port.to_string())],
                    &log,
                )?,
                Kind::UwsJs => Proc::spawn(
                    self.name,
                    env.server_cpu,
                    "node",
                    &strings(&["server.js"]),
                    &env.root.join("bench/contenders/uws-js"),
                    &[("PORT", port.to_string())],
                    &log,
                )?,
                Kind::NodeWs | Kind::SocketIo => Proc::spawn(
                    self.name,
                    env.server_cpu,
                    "node",
                    &strings(&["server.js"]),
                    &env.root
                        .join(self.npm_project().expect("a Node.js contender").0),
                    &[("PORT", port.to_string()), ("REDIS_URL", env.redis_url())],
                    &log,
                )?,
            };
            if self.kind == Kind::Ringcast {
                procs::wait_http_ok(&mut proc, addr(port), "/readyz", PATIENCE)?;
            } else {
                procs::wait_listening(&mut proc, addr(port), PATIENCE)?;
            }
            first_pid.get_or_insert(proc.pid());
            urls.push(self.url(port));
            procs.insert(0, proc);
        }
        Ok(Started {
            procs,
            urls: urls.join(","),
            pid: first_pid.expect("at least one node"),
        })
    }

    /// Ports this contender needs free before it starts.
    pub fn needed_ports(&self, topology: Topology, env: &Env) -> Vec<u16> {
        let mut ports: Vec<u16> = match topology {
            Topology::Single => self.ports()[..1].to_vec(),
            Topology::TwoNodes => self.ports().to_vec(),
        };
        if self.needs_redis(topology) {
            ports.push(env.redis_port);
        }
        ports
    }
}

/// `centrifugo version` (e.g. "Centrifugo v6.1.0 (Go version: ...)") and
/// its major version, which decides the configuration's shape.
fn centrifugo_version(path: &Path, dir: &Path) -> Result<(String, u32)> {
    let line = output(&path.display().to_string(), &["version"], dir)
        .with_context(|| format!("asking {} for its version", path.display()))?;
    let major = centrifugo_major(&line)?;
    Ok((line, major))
}

fn centrifugo_major(line: &str) -> Result<u32> {
    let major = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v')?.split('.').next()?.parse::<u32>().ok())
        .with_context(|| format!("no version in {line:?}"))?;
    if !(5..=6).contains(&major) {
        bail!("Centrifugo v{major} is not supported by this harness (v5 and v6 are): {line}");
    }
    Ok(major)
}

/// The configuration the Centrifugo contender runs with: anonymous clients
/// may connect and subscribe to any channel without a namespace, the server
/// API takes `CENTRIFUGO_API_KEY`, and with `redis` the Redis engine joins
/// the nodes. v6 nests the keys that v5 keeps flat.
fn centrifugo_config(major: u32, port: u16, redis: Option<&str>) -> serde_json::Value {
    use serde_json::json;
    if major >= 6 {
        let mut config = json!({
            "http_server": {"address": "127.0.0.1", "port": port},
            "http_api": {"key": CENTRIFUGO_API_KEY},
            "client": {"allow_anonymous_connect_without_token": true},
            "channel": {"without_namespace": {
                "allow_subscribe_for_client": true,
                "allow_subscribe_for_anonymous": true,
            }},
        });
        if let Some(url) = redis {
            config["engine"] = json!({"type": "redis", "redis": {"address": url}});
        }
        config
    } else {
        let mut config = json!({
            "address": "127.0.0.1",
            "port": port.to_string(),
            "api_key": CENTRIFUGO_API_KEY,
            "allow_anonymous_connect_without_token": true,
            "allow_subscribe_for_client": true,
            "allow_subscribe_for_anonymous": true,
        });
        if let Some(url) = redis {
            config["engine"] = json!("redis");
            config["redis_address"] = json!(url);
        }
        config
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn run(program: &str, args: &[&str], dir: &Path) -> Result<()> {
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

pub fn output(program: &str, args: &[&str], dir: &Path) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {} failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The installed version of an npm package, from its package.json.
fn package_version(dir: &Path, package: &str) -> Result<String> {
    let path = dir.join("node_modules").join(package).join("package.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text)?;
    Ok(json["version"].as_str().unwrap_or("?").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centrifugo_configs_follow_each_major_version() {
        assert_eq!(
            centrifugo_major("Centrifugo v6.1.0 (Go version: go1.24.1)").unwrap(),
            6
        );
        assert_eq!(
            centrifugo_major("Centrifugo v5.4.9 (Go version: go1.23)").unwrap(),
            5
        );
        assert!(centrifugo_major("Centrifugo v4.1.5").is_err());
        assert!(centrifugo_major("centrifugo").is_err());

        let v6 = centrifugo_config(6, 8096, Some("redis://127.0.0.1:6390/0"));
        assert_eq!(v6["http_server"]["port"], 8096);
        assert_eq!(v6["http_api"]["key"], CENTRIFUGO_API_KEY);
        assert_eq!(v6["client"]["allow_anonymous_connect_without_token"], true);
        assert_eq!(
            v6["channel"]["without_namespace"]["allow_subscribe_for_anonymous"],
            true
        );
        assert_eq!(v6["engine"]["type"], "redis");
        assert!(centrifugo_config(6, 8096, None).get("engine").is_none());

        let v5 = centrifugo_config(5, 8097, Some("redis://127.0.0.1:6390/0"));
        assert_eq!(v5["port"], "8097");
        assert_eq!(v5["api_key"], CENTRIFUGO_API_KEY);
        assert_eq!(v5["allow_subscribe_for_anonymous"], true);
        assert_eq!(v5["engine"], "redis");
        assert_eq!(v5["redis_address"], "redis://127.0.0.1:6390/0");
    }
}
