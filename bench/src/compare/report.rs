//! Turns a results file into the comparison section of
//! `docs/benchmarks.md` (between two marker comments, so the rest of the
//! document stays hand-written): medians per contender and workload, and
//! ringcast's ratio against each, and the charts of them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::charts::{self, Chart, Group};

const BEGIN: &str = "<!-- compare:begin -->";
const END: &str = "<!-- compare:end -->";

pub fn write(root: &Path, results_path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(results_path)
        .with_context(|| format!("reading {}", results_path.display()))?;
    let results: Value = serde_json::from_str(&text).context("the results file is not JSON")?;
    let relative = results_path.strip_prefix(root).unwrap_or(results_path);
    let chart_dir = root.join("docs/charts");
    std::fs::create_dir_all(&chart_dir).context("creating docs/charts")?;
    let cells = cells(&results);
    let order = contender_order(&results);
    let mut drawn = Vec::new();
    for chart in chart_plan(&results, &cells, &order) {
        if charts::draw(&chart_dir, &chart)? {
            drawn.push((chart.file.to_string(), chart.title.to_string()));
        }
    }
    let section = render(
        &results,
        &cells,
        &order,
        &drawn,
        &relative.display().to_string(),
    );
    let doc_path = root.join("docs/benchmarks.md");
    let doc = std::fs::read_to_string(&doc_path).context("reading docs/benchmarks.md")?;
    let updated = match (doc.find(BEGIN), doc.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{section}{}", &doc[..b], &doc[e + END.len()..]),
        _ => format!("{}\n{section}\n", doc.trim_end()),
    };
    std::fs::write(&doc_path, updated).context("writing docs/benchmarks.md")?;
    eprintln!(
        "docs/benchmarks.md: comparison section regenerated from {}",
        relative.display()
    );
    Ok(())
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.retain(|x| x.is_finite());
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

/// Figures of one contender on one workload: the medians over its runs.
struct Cell {
    runs: usize,
    failed: usize,
    fields: BTreeMap<&'static str, f64>,
}

const FIELDS: &[&str] = &[
    "delivered_per_sec",
    "p50_us",
    "p99_us",
    "p999_us",
    "server_cpu_pct",
    "server_rss_peak",
    "rss_per_conn",
    "slab_per_conn",
    "delivered",
    "expected",
    "connect_per_sec",
    "connect_secs",
    "connected",
    "connections",
];

fn cells(results: &Value) -> BTreeMap<(String, String), Cell> {
    let mut raw: BTreeMap<(String, String), Vec<&Value>> = BTreeMap::new();
    for run in results["runs"].as_array().into_iter().flatten() {
        let key = (
            run["workload"].as_str().unwrap_or("").to_string(),
            run["contender"].as_str().unwrap_or("").to_string(),
        );
        raw.entry(key).or_default().push(run);
    }
    raw.into_iter()
        .map(|(key, runs)| {
            let ok: Vec<&Value> = runs.iter().filter_map(|r| r.get("result")).collect();
            let fields = FIELDS
                .iter()
                .filter_map(|f| {
                    median(ok.iter().filter_map(|r| r[*f].as_f64()).collect()).map(|m| (*f, m))
                })
                .collect();
            let cell = Cell {
                runs: runs.len(),
                failed: runs.len() - ok.len(),
                fields,
            };
            (key, cell)
        })
        .collect()
}

fn num(x: f64) -> String {
    let s = format!("{:.0}", x.round());
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 && c != '-' {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `MemTotal: N kB` as GiB.
fn memory(line: &str) -> String {
    line.split_whitespace()
        .nth(1)
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or("? memory".into(), |kb| {
            format!("{:.0} GiB", kb / 1024.0 / 1024.0)
        })
}

fn ms(us: Option<f64>) -> String {
    us.map_or("–".into(), |u| format!("{:.1}", u / 1000.0))
}

/// Contenders as the report lists them: ringcast first, then by name.
fn contender_order(results: &Value) -> Vec<String> {
    let mut order: Vec<String> = results["contenders"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    order.sort_by_key(|c| (c != "ringcast", c.clone()));
    order
}

/// Workloads in the order they ran (the results file's map is sorted).
fn workload_order(results: &Value) -> Vec<String> {
    let mut workloads: Vec<String> = Vec::new();
    for run in results["runs"].as_array().into_iter().flatten() {
        let w = run["workload"].as_str().unwrap_or("").to_string();
        if !workloads.contains(&w) {
            workloads.push(w);
        }
    }
    workloads
}

/// The charts of the report: saturation throughput, latency at the common
/// rate, idle memory and setup rate.
fn chart_plan<'a>(
    results: &Value,
    cells: &BTreeMap<(String, String), Cell>,
    order: &'a [String],
) -> Vec<Chart<'a>> {
    let value = |workload: &str, contender: &str, field: &str| {
        cells
            .get(&(workload.to_string(), contender.to_string()))
            .and_then(|c| c.fields.get(field).copied())
    };
    let group = |label: &str, workload: &str, field: &str, scale: f64| Group {
        label: label.to_string(),
        values: order
            .iter()
            .map(|c| value(workload, c, field).map(|v| v * scale))
            .collect(),
    };
    let workloads = workload_order(results);
    let saturation: Vec<Group> = workloads
        .iter()
        .filter(|w| {
            ["broadcast", "many-channels", "cross-node"]
                .iter()
                .any(|p| w.starts_with(p))
        })
        .map(|w| group(w, w, "delivered_per_sec", 1.0))
        .collect();
    let latency = "latency-10k-5pps";
    let setups: Vec<Group> = workloads
        .iter()
        .filter(|w| w.starts_with("connect") || w.starts_with("reconnect"))
        .map(|w| group(w, w, "connect_per_sec", 1.0))
        .collect();
    vec![
        Chart {
            file: "throughput.svg",
            title: "Delivered messages/s at saturation (medians, log scale)",
            y_label: "messages/s",
            log: true,
            contenders: order,
            groups: saturation,
        },
        Chart {
            file: "latency.svg",
            title: "Latency at 5 publications/s to 10,000 subscribers (ms, log scale)",
            y_label: "ms",
            log: true,
            contenders: order,
            groups: vec![
                group("p50", latency, "p50_us", 1e-3),
                group("p99", latency, "p99_us", 1e-3),
                group("p99.9", latency, "p999_us", 1e-3),
            ],
        },
        Chart {
            file: "idle-memory.svg",
            title: "Server RSS per idle connection, 15,000 connections (bytes, log scale)",
            y_label: "bytes",
            log: true,
            contenders: order,
            groups: vec![group("idle-15k", "idle-15k", "rss_per_conn", 1.0)],
        },
        Chart {
            file: "setups.svg",
            title: "Connection setups/s (handshake and one subscribe)",
            y_label: "setups/s",
            log: false,
            contenders: order,
            groups: setups,
        },
    ]
}

fn render(
    results: &Value,
    cells: &BTreeMap<(String, String), Cell>,
    order: &[String],
    charts: &[(String, String)],
    source: &str,
) -> String {
    let meta = &results["meta"];
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}");
    let _ = writeln!(s, "## Comparison with other relays\n");
    let _ = writeln!(
        s,
        "Generated by `bench/compare` from `{source}` (do not edit by hand: rerun it, or \
         `bench/compare --report {source}`). Machine: {} ({} CPUs, {}), kernel {}; servers pinned \
         to core {}, the load generator to core {}; {} run(s) per cell, medians; every run starts \
         fresh servers (and a fresh Redis where one is used).\n",
        meta["cpu"].as_str().unwrap_or("?"),
        meta["cpus"],
        memory(meta["memory"].as_str().unwrap_or("")),
        meta["kernel"].as_str().unwrap_or("?"),
        meta["server_cpu"],
        meta["load_cpu"],
        meta["runs"],
    );
    let mut days: Vec<&str> = results["runs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["at"].as_str().map(|a| a.get(..10).unwrap_or(a)))
        .collect();
    days.sort_unstable();
    days.dedup();
    if !days.is_empty() {
        let _ = writeln!(s, "Runs made on: {}.\n", days.join(", "));
    }
    let _ = writeln!(s, "| contender | version | what |\n|---|---|---|");
    for (name, c) in results["contenders"].as_object().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| {name} | {} | {} |",
            c["version"].as_str().unwrap_or("?"),
            c["what"].as_str().unwrap_or("")
        );
    }
    for (file, title) in charts {
        let _ = writeln!(s, "\n![{title}](charts/{file})");
    }
    let workloads = workload_order(results);
    for workload in &workloads {
        let what = &results["workloads"][workload.as_str()];
        let _ = writeln!(s, "\n### {workload}\n\n{}\n", what.as_str().unwrap_or(""));
        let ringcast = cells.get(&(workload.clone(), "ringcast".into()));
        let idle = workload.starts_with("idle");
        let setups = workload.starts_with("connect") || workload.starts_with("reconnect");
        if setups {
            let _ = writeln!(s, "| contender | setups/s | ringcast ÷ it | all set up in | setup p50 ms | setup p99 ms | connected / asked | server CPU % | runs |\n|---|---|---|---|---|---|---|---|---|");
        } else if idle {
            let _ = writeln!(s, "| contender | server RSS per connection | kernel slab per connection (both ends) | ringcast uses | runs |\n|---|---|---|---|---|");
        } else {
            let _ = writeln!(s, "| contender | delivered msg/s | ringcast ÷ it | p50 ms | p99 ms | p99.9 ms | delivered / expected | server CPU % | server RSS peak | runs |\n|---|---|---|---|---|---|---|---|---|---|");
        }
        for contender in order {
            let Some(cell) = cells.get(&(workload.clone(), contender.clone())) else {
                continue;
            };
            let f = |k: &str| cell.fields.get(k).copied();
            let runs = if cell.failed > 0 {
                format!("{} ({} failed)", cell.runs, cell.failed)
            } else {
                cell.runs.to_string()
            };
            if setups {
                let mine = ringcast.and_then(|r| r.fields.get("connect_per_sec").copied());
                let ratio = match (mine, f("connect_per_sec")) {
                    (Some(m), Some(t)) if t > 0.0 => format!("{:.2}×", m / t),
                    _ => "–".into(),
                };
                let share = match (f("connected"), f("connections")) {
                    (Some(c), Some(a)) if a > 0.0 => format!("{}/{}", num(c), num(a)),
                    _ => "–".into(),
                };
                let _ = writeln!(
                    s,
                    "| {contender} | {} | {ratio} | {} | {} | {} | {share} | {} | {runs} |",
                    f("connect_per_sec").map_or("–".into(), num),
                    f("connect_secs").map_or("–".into(), |t| format!("{t:.2} s")),
                    ms(f("p50_us")),
                    ms(f("p99_us")),
                    f("server_cpu_pct").map_or("–".into(), |c| format!("{c:.0}")),
                );
            } else if idle {
                let mine = ringcast.and_then(|r| r.fields.get("rss_per_conn").copied());
                let share = match (mine, f("rss_per_conn")) {
                    (Some(m), Some(t)) if t > 0.0 => format!("{:.2}×", m / t),
                    _ => "–".into(),
                };
                let _ = writeln!(
                    s,
                    "| {contender} | {} B | {} B | {share} | {runs} |",
                    f("rss_per_conn").map_or("–".into(), num),
                    f("slab_per_conn").map_or("–".into(), num),
                );
            } else {
                let mine = ringcast.and_then(|r| r.fields.get("delivered_per_sec").copied());
                let ratio = match (mine, f("delivered_per_sec")) {
                    (Some(m), Some(t)) if t > 0.0 => format!("{:.2}×", m / t),
                    _ => "–".into(),
                };
                let share = match (f("delivered"), f("expected")) {
                    (Some(d), Some(e)) if e > 0.0 => format!("{:.1}%", 100.0 * d / e),
                    _ => "–".into(),
                };
                let _ = writeln!(
                    s,
                    "| {contender} | {} | {ratio} | {} | {} | {} | {share} | {} | {} | {runs} |",
                    f("delivered_per_sec").map_or("–".into(), num),
                    ms(f("p50_us")),
                    ms(f("p99_us")),
                    ms(f("p999_us")),
                    f("server_cpu_pct").map_or("–".into(), |c| format!("{c:.0}")),
                    f("server_rss_peak")
                        .map_or("–".into(), |b| format!("{:.0} MiB", b / 1048576.0)),
                );
            }
        }
    }
    let _ = write!(s, "\n{END}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_numbers() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(num(1234567.4), "1,234,567");
        assert_eq!(num(999.0), "999");
        assert_eq!(memory("MemTotal:       24684084 kB"), "24 GiB");
    }
}
