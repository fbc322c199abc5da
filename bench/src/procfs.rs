//! Readings from /proc: the server's resident memory and CPU time, and the
//! kernel's TCP and slab memory, sampled around a run.

use std::fs;
use std::io::{BufRead, BufReader};
use std::time::Instant;

use anyhow::{ensure, Result};

/// /proc reports CPU time in USER_HZ ticks, which Linux fixes at 100 for
/// userspace on every architecture this runs on.
const USER_HZ: f64 = 100.0;

/// Resident set size of `pid` in bytes (`VmRSS`).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_kb(pid, "VmRSS:").map(|kb| kb * 1024)
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kb_field(&status, key)
}

fn kb_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// User plus system CPU time of `pid`, in ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name may hold spaces and parentheses, so fields are counted
    // from the last ')': state is field 3, utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Pages the kernel has charged to TCP sockets (`TCP: ... mem N` in
/// /proc/net/sockstat): buffered data of every TCP socket in this network
/// namespace, both ends of a loopback connection included.
pub fn tcp_mem_pages() -> Option<u64> {
    let text = fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(w) = words.next() {
        if w == "mem" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Kernel slab memory in bytes (`Slab` in /proc/meminfo): where socket,
/// inode and epoll structures live, for client and server ends alike.
pub fn slab_bytes() -> Option<u64> {
    let text = fs::read_to_string("/proc/meminfo").ok()?;
    kb_field(&text, "Slab:").map(|kb| kb * 1024)
}

/// The page size that sockstat counts in, read from this process's own
/// mappings; 4 KiB if that fails.
pub fn page_size() -> u64 {
    let kb = fs::File::open("/proc/self/smaps").ok().and_then(|f| {
        BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| kb_field(&l, "KernelPageSize:"))
    });
    kb.map_or(4096, |kb| kb * 1024)
}

/// This process's soft limit on open files (`Max open files` in
/// /proc/self/limits); `None` when unlimited or unreadable.
pub fn open_files_limit() -> Option<u64> {
    let text = fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Samples a server process: RSS at start, end and the highest seen, and its
/// CPU use over a window that a mode may restart (fanout measures only the
/// publishing window).
pub struct ServerSampler {
    pid: u32,
    pub rss_start: Option<u64>,
    pub rss_peak: Option<u64>,
    cpu_start: Option<u64>,
    cpu_since: Instant,
}

impl ServerSampler {
    pub fn start(pid: u32) -> Result<Self> {
        let rss = rss_bytes(pid);
        ensure!(
            rss.is_some(),
            "cannot read /proc/{pid}/status: is --server-pid right?"
        );
        Ok(ServerSampler {
            pid,
            rss_start: rss,
            rss_peak: rss,
            cpu_start: cpu_ticks(pid),
            cpu_since: Instant::now(),
        })
    }

    /// Takes an RSS reading for the peak; cheap enough for every progress tick.
    pub fn sample(&mut self) -> Option<u64> {
        let rss = rss_bytes(self.pid);
        self.rss_peak = self.rss_peak.max(rss);
        rss
    }

    /// Starts the CPU window afresh.
    pub fn restart_cpu(&mut self) {
        self.cpu_start = cpu_ticks(self.pid);
        self.cpu_since = Instant::now();
    }

    /// CPU use since the window started, in percent of one core.
    pub fn cpu_pct(&self) -> Option<f64> {
        let used = cpu_ticks(self.pid)?.checked_sub(self.cpu_start?)? as f64 / USER_HZ;
        let wall = self.cpu_since.elapsed().as_secs_f64();
        (wall > 0.0).then(|| used / wall * 100.0)
    }
}

/// Kernel memory readings before and after connections are opened.
pub struct KernelMem {
    tcp_pages: Option<u64>,
    slab: Option<u64>,
}

impl KernelMem {
    pub fn now() -> Self {
        KernelMem {
            tcp_pages: tcp_mem_pages(),
            slab: slab_bytes(),
        }
    }

    /// Growth per connection since `self` of (TCP socket memory, slab), in
    /// bytes; negative when the kernel freed more than it took.
    pub fn per_conn(&self, after: &KernelMem, conns: u64) -> (Option<f64>, Option<f64>) {
        if conns == 0 {
            return (None, None);
        }
        let page = page_size() as f64;
        let delta = |a: Option<u64>, b: Option<u64>| Some(b? as f64 - a? as f64);
        (
            delta(self.tcp_pages, after.tcp_pages).map(|d| d * page / conns as f64),
            delta(self.slab, after.slab).map(|d| d / conns as f64),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_status() {
        let stat = "42 (we ird) name) S 1 2 3 4 5 6 7 8 9 10 111 222 0 0 20 0 1 0";
        assert_eq!(parse_cpu_ticks(stat), Some(333));
        assert_eq!(
            kb_field("Name:\tx\nVmRSS:\t  1234 kB\n", "VmRSS:"),
            Some(1234)
        );
        let own = std::process::id();
        assert!(rss_bytes(own).unwrap() > 0);
        assert!(cpu_ticks(own).is_some());
        assert!(tcp_mem_pages().is_some());
        assert!(page_size() >= 4096);
        assert!(open_files_limit().is_some());
    }
}
