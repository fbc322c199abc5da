//! The processes a comparison starts: each in its own process group, pinned
//! with `taskset`, remembered so that stopping a run, an error or Ctrl-C
//! ends every one of them (and only them) by PID.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Process groups alive right now, for the Ctrl-C handler.
static GROUPS: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// A started server or helper; its whole group ends when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `program args…` on `cpu`, output to `log`.
    pub fn spawn(
        name: &str,
        cpu: u32,
        program: &str,
        args: &[String],
        dir: &Path,
        env: &[(&str, String)],
        log: &Path,
    ) -> Result<Proc> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = Command::new("taskset");
        cmd.arg("-c").arg(cpu.to_string()).arg(program).args(args);
        cmd.current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({program})"))?;
        GROUPS.lock().unwrap().push(child.id());
        Ok(Proc {
            name: name.to_string(),
            child,
        })
    }

    /// A throwaway redis-server on 127.0.0.1:`port` (nothing saved) on
    /// `cpu`, run in and logging to `logs`, once it takes connections.
    pub fn redis(cpu: u32, port: u16, logs: &Path, patience: Duration) -> Result<Proc> {
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .map(String::from)
        .to_vec();
        let log = logs.join("redis.log");
        let mut redis = Proc::spawn("redis-server", cpu, "redis-server", &args, logs, &[], &log)?;
        wait_listening(
            &mut redis,
            SocketAddr::from(([127, 0, 0, 1], port)),
            patience,
        )?;
        Ok(redis)
    }

    /// The server's PID (taskset execs the program, so it keeps the PID).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process already exited.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited early ({status})", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id();
        terminate_group(pid);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        kill_group(pid);
        let _ = self.child.wait();
        GROUPS.lock().unwrap().retain(|&g| g != pid);
    }
}

fn terminate_group(pgid: u32) {
    // SAFETY: kill(2) with a negative pid signals that process group only;
    // every group here was created by this process (process_group(0)).
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGTERM);
    }
}

fn kill_group(pgid: u32) {
    // SAFETY: as above.
    unsafe {
        libc::kill(-(pgid as i32), libc::SIGKILL);
    }
}

/// Remembers a group started elsewhere (with `process_group(0)`), so that
/// [`kill_all`] ends it too. (`million` starts its holders itself, with
/// pipes; `compare` has no use for this.)
#[allow(dead_code)]
pub fn remember_group(pgid: u32) {
    GROUPS.lock().unwrap().push(pgid);
}

/// Forgets a group that has ended.
#[allow(dead_code)]
pub fn forget_group(pgid: u32) {
    GROUPS.lock().unwrap().retain(|&g| g != pgid);
}

/// Ends every group still alive (Ctrl-C).
pub fn kill_all() {
    for pgid in GROUPS.lock().unwrap().drain(..) {
        terminate_group(pgid);
        kill_group(pgid);
    }
}

/// Waits until `addr` accepts TCP connections.
pub fn wait_listening(proc: &mut Proc, addr: SocketAddr, patience: Duration) -> Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        proc.check_alive()?;
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} does not listen on {addr} after {patience:?}", proc.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `GET path` on `addr` answers 200.
pub fn wait_http_ok(
    proc: &mut Proc,
    addr: SocketAddr,
    path: &str,
    patience: Duration,
) -> Result<()> {
    let deadline = Instant::now() + patience;
    loop {
        proc.check_alive()?;
        if http_status(addr, path) == Some(200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} did not answer 200 on {path} after {patience:?}",
                proc.name
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// True when nothing listens on `port` of 127.0.0.1 and it can be bound.
pub fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Runs `program args…` on `cpu` to its end (in its own group, so Ctrl-C
/// can end it too); its stderr goes to `log`; returns its stdout.
pub fn run_to_end(
    name: &str,
    cpu: u32,
    program: &str,
    args: &[String],
    log: &Path,
) -> Result<String> {
    let err = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new("taskset")
        .arg("-c")
        .arg(cpu.to_string())
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let pid = child.id();
    GROUPS.lock().unwrap().push(pid);
    let out = child.wait_with_output();
    GROUPS.lock().unwrap().retain(|&g| g != pid);
    let out = out.with_context(|| format!("waiting for {name}"))?;
    if !out.status.success() {
        bail!("{name} failed ({}); see {}", out.status, log.display());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
