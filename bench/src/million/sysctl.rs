//! The kernel settings a million loopback connections need, applied for
//! the run and put back afterwards (also on an error or Ctrl-C). Each says
//! why; the report records which differed from what the box had.

use std::sync::Mutex;

use anyhow::{Context, Result};
use serde_json::{json, Value};

/// (name, value for the run, why).
const SETTINGS: &[(&str, &str, &str)] = &[
    (
        "fs.file-max",
        "4194304",
        "a loopback connection is two descriptors on this one box: over two million at the top, beside every other process",
    ),
    (
        "net.ipv4.ip_local_port_range",
        "1024 65535",
        "every holder connects from one source address to one port; the wider range leaves room beyond the ~18,000 each opens",
    ),
    (
        "net.core.somaxconn",
        "65535",
        "the holders open connections faster than one core of relays accepts them during the ramp; a full accept queue drops SYNs, which TCP retries only after a second",
    ),
    (
        "net.ipv4.tcp_max_syn_backlog",
        "65535",
        "as somaxconn: handshakes queued during the ramp",
    ),
    (
        "net.ipv4.tcp_mem",
        "786432 1048576 1572864",
        "during the broadcast every socket holds a frame in flight at both ends; the default ceiling puts TCP under memory pressure, where the kernel shrinks buffers and drops",
    ),
    (
        "net.ipv4.tcp_rmem",
        "4096 16384 4194304",
        "deploy/sysctl-ringcast.conf's small default buffers, so idle connections stay cheap",
    ),
    (
        "net.ipv4.tcp_wmem",
        "4096 16384 4194304",
        "as tcp_rmem",
    ),
];

/// What was changed, to be put back.
static CHANGED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn path(name: &str) -> String {
    format!("/proc/sys/{}", name.replace('.', "/"))
}

fn read(name: &str) -> Option<String> {
    std::fs::read_to_string(path(name))
        .ok()
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// Applies every setting; returns what each was, is, and why.
pub fn apply() -> Result<Value> {
    let mut report = Vec::new();
    for (name, value, why) in SETTINGS {
        let before = read(name).with_context(|| format!("reading {name}"))?;
        let changed = before != *value;
        if changed {
            std::fs::write(path(name), value).with_context(|| {
                format!("setting {name} = {value} (run as root, or pass --no-sysctl)")
            })?;
            CHANGED
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((name.to_string(), before.clone()));
        }
        report.push(json!({"name": name, "before": before, "during": value, "changed": changed, "why": why}));
    }
    report.push(conntrack());
    Ok(Value::Array(report))
}

/// What the settings are, changing nothing.
pub fn report_only() -> Value {
    let mut report: Vec<Value> = SETTINGS
        .iter()
        .map(|(name, value, why)| {
            json!({"name": name, "before": read(name), "recommended": value, "changed": false, "why": why})
        })
        .collect();
    report.push(conntrack());
    Value::Array(report)
}

/// Connection tracking would cap connections at nf_conntrack_max, but
/// only when something uses it: the count shows whether it does.
fn conntrack() -> Value {
    json!({
        "name": "net.netfilter.nf_conntrack_max",
        "before": read("net.netfilter.nf_conntrack_max"),
        "count": read("net.netfilter.nf_conntrack_count"),
        "changed": false,
        "why": "left alone: loopback connections are tracked only when a firewall rule asks for it (count 0 here)",
    })
}

/// Puts back what [`apply`] changed.
pub fn restore_all() {
    let changed: Vec<(String, String)> =
        std::mem::take(&mut *CHANGED.lock().unwrap_or_else(|e| e.into_inner()));
    for (name, before) in changed.into_iter().rev() {
        if let Err(e) = std::fs::write(path(&name), &before) {
            eprintln!("million: could not restore {name} = {before}: {e}");
        }
    }
}
