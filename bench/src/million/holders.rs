//! The `holder` processes: started in process groups of their own (and
//! dying with this process), told over stdin how many connections to
//! open, heard through their stdout, one JSON line at a time.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::procfs;

pub struct Holders {
    procs: Vec<HolderProc>,
    lines: Receiver<(usize, Value)>,
}

struct HolderProc {
    child: Child,
    stdin: ChildStdin,
    /// Connections asked of it so far.
    asked: u64,
}

/// Where a ramp step ended.
pub struct Progress {
    pub subscribed: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

impl Holders {
    /// Starts `count` holders on `cpu`, holder i connecting from
    /// 127.0.(1 + i / 250).(1 + i % 250).
    pub fn start(
        bin: &Path,
        count: u64,
        cpu: u32,
        server: SocketAddr,
        logs: &Path,
    ) -> Result<Holders> {
        let (tx, lines) = mpsc::channel();
        let mut procs = Vec::new();
        for i in 0..count as usize {
            let source = format!("127.0.{}.{}", 1 + i / 250, 1 + i % 250);
            let log = std::fs::File::create(logs.join(format!("holder-{i}.log")))?;
            let mut child = Command::new("taskset")
                .arg("-c")
                .arg(cpu.to_string())
                .arg(bin)
                .args(["--server", &server.to_string(), "--source", &source])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(log)
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting holder {i}"))?;
            crate::procs::remember_group(child.id());
            let stdin = child.stdin.take().context("holder stdin")?;
            let stdout = child.stdout.take().context("holder stdout")?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        if tx.send((i, v)).is_err() {
                            break;
                        }
                    }
                }
            });
            procs.push(HolderProc {
                child,
                stdin,
                asked: 0,
            });
        }
        Ok(Holders { procs, lines })
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    fn send(&mut self, i: usize, line: &str) -> Result<()> {
        let p = &mut self.procs[i];
        writeln!(p.stdin, "{line}").with_context(|| format!("holder {i} is gone"))?;
        p.stdin.flush()?;
        Ok(())
    }

    /// Grows the connections from `current` to `total`, spread evenly over
    /// the holders, and waits until every holder has them subscribed (or
    /// failed), showing progress.
    pub fn open_to(&mut self, total: u64, current: u64) -> Result<Progress> {
        let n = self.procs.len() as u64;
        let mut waiting = 0;
        for i in 0..self.procs.len() {
            let share = total / n + u64::from((i as u64) < total % n);
            let more = share.saturating_sub(self.procs[i].asked);
            if more > 0 {
                self.procs[i].asked += more;
                self.send(i, &format!("open {more}"))?;
                waiting += 1;
            }
        }
        let bar = ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "ramp    [{elapsed_precise}] {bar:40} {pos}/{len} subscribed ({per_sec}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_position(current);
        let mut latest: Vec<(u64, u64, Option<String>)> = vec![(0, 0, None); self.procs.len()];
        // A step may not take longer than a slow 500 handshakes a second.
        let patience = Duration::from_secs(60 + (total - current.min(total)) / 500);
        let deadline = Instant::now() + patience;
        let mut done = vec![false; self.procs.len()];
        let mut left = waiting;
        for (i, d) in done.iter_mut().enumerate() {
            if self.procs[i].asked == 0 {
                *d = true;
            }
        }
        while left > 0 {
            crate::check_time()?;
            if Instant::now() > deadline {
                bar.abandon_with_message("timed out");
                break;
            }
            let Ok((i, v)) = self.lines.recv_timeout(Duration::from_millis(500)) else {
                self.check_alive()?;
                continue;
            };
            let (kind, counts) = match (v.get("progress"), v.get("opened")) {
                (Some(c), _) => ("progress", c),
                (_, Some(c)) => ("opened", c),
                _ => continue,
            };
            latest[i] = (
                counts["subscribed"].as_u64().unwrap_or(0),
                counts["failed"].as_u64().unwrap_or(0),
                counts["first_error"].as_str().map(str::to_string),
            );
            if kind == "opened" && !done[i] && latest[i].0 + latest[i].1 >= self.procs[i].asked {
                done[i] = true;
                left -= 1;
            }
            let subscribed: u64 = latest.iter().map(|l| l.0).sum();
            let failed: u64 = latest.iter().map(|l| l.1).sum();
            bar.set_position(subscribed.max(current));
            if failed > 0 {
                bar.set_message(format!("{failed} failed"));
            }
        }
        bar.finish_and_clear();
        // The figures of holders that had nothing to open this step come
        // from their stats.
        let stats = self.stats()?;
        let subscribed = stats
            .iter()
            .map(|s| s["subscribed"].as_u64().unwrap_or(0))
            .sum();
        let failed = stats
            .iter()
            .map(|s| s["failed"].as_u64().unwrap_or(0))
            .sum();
        let first_error = stats
            .iter()
            .find_map(|s| s["first_error"].as_str().map(str::to_string));
        Ok(Progress {
            subscribed,
            failed,
            first_error,
        })
    }

    /// Every holder's `stats`, in holder order.
    pub fn stats(&mut self) -> Result<Vec<Value>> {
        for i in 0..self.procs.len() {
            self.send(i, "stats")?;
        }
        let mut out: Vec<Option<Value>> = vec![None; self.procs.len()];
        let deadline = Instant::now() + Duration::from_secs(30);
        while out.iter().any(Option::is_none) {
            if Instant::now() > deadline {
                bail!("a holder did not answer `stats` within 30 s");
            }
            if let Ok((i, v)) = self.lines.recv_timeout(Duration::from_millis(500)) {
                if let Some(s) = v.get("stats") {
                    out[i] = Some(s.clone());
                }
            } else {
                self.check_alive()?;
            }
        }
        Ok(out.into_iter().flatten().collect())
    }

    fn check_alive(&mut self) -> Result<()> {
        for (i, p) in self.procs.iter_mut().enumerate() {
            if let Some(status) = p.child.try_wait()? {
                bail!("holder {i} exited ({status}); see target/million-logs/holder-{i}.log");
            }
        }
        Ok(())
    }

    pub fn rss_total(&self) -> u64 {
        self.procs
            .iter()
            .filter_map(|p| procfs::rss_bytes(p.child.id()))
            .sum()
    }

    pub fn cpu_ticks_total(&self) -> u64 {
        self.procs
            .iter()
            .filter_map(|p| procfs::cpu_ticks(p.child.id()))
            .sum()
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = writeln!(p.stdin, "quit");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for p in &mut self.procs {
            while Instant::now() < deadline {
                if matches!(p.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
            crate::procs::forget_group(p.child.id());
        }
    }
}
