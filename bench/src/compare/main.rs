//! `compare`: runs every workload against every contender under the same
//! conditions (servers on one core, the load generator on the other, fresh
//! servers for every run), keeps the raw results and regenerates the
//! comparison in `docs/benchmarks.md`. `bench/compare` builds and runs it.

mod charts;
mod contenders;
mod procs;
mod report;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

use crate::contenders::{Contender, Env, CONTENDERS};
use crate::workloads::{Workload, WORKLOADS};

#[derive(Parser, Debug)]
#[command(
    name = "compare",
    about = "Runs the published benchmark comparison: ringcast against what users run today",
    after_help = "Loopback only. Servers run on --server-cpu, the load generator on --load-cpu. \
                  Results go to bench/results/compare-<date>-<host>.json after every run, so an \
                  interrupted comparison keeps what it measured; Ctrl-C ends every process it started."
)]
struct Cli {
    /// Contenders to run, comma-separated (default: all). See --list.
    #[arg(long, value_delimiter = ',')]
    contenders: Vec<String>,
    /// Workloads to run, comma-separated (default: all). See --list.
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Runs of each workload per contender; the report shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    runs: u32,
    /// Print the contenders and workloads, then exit.
    #[arg(long)]
    list: bool,
    /// Only regenerate docs/benchmarks.md from this results file.
    #[arg(long, value_name = "RESULTS.json")]
    report: Option<PathBuf>,
    /// Do not touch docs/benchmarks.md (results file only).
    #[arg(long)]
    no_report: bool,
    #[arg(long, default_value_t = 0)]
    server_cpu: u32,
    #[arg(long, default_value_t = 1)]
    load_cpu: u32,
    /// Port of the Redis the contenders that need one share (started fresh
    /// for every run).
    #[arg(long, default_value_t = 6390)]
    redis_port: u16,
    /// A uWebSockets server you built (see bench/contenders/README.md):
    /// adds the `uws` contender. The harness never downloads or builds it.
    #[arg(long, value_name = "PATH")]
    uws: Option<PathBuf>,
    /// A Centrifugo binary (v5 or v6) you provide: adds the `centrifugo`
    /// contender. The harness never downloads it.
    #[arg(long, value_name = "PATH")]
    centrifugo: Option<PathBuf>,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            procs::kill_all();
            eprintln!("compare: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A user-given path made absolute: servers start in the log directory.
fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("bench/ sits in the repository")
        .to_path_buf()
}

fn pick<'a, T>(
    all: &'a [T],
    wanted: &[String],
    name: impl Fn(&T) -> &str,
    what: &str,
) -> Result<Vec<&'a T>> {
    if wanted.is_empty() {
        return Ok(all.iter().collect());
    }
    let mut picked = Vec::new();
    for w in wanted {
        match all.iter().find(|t| name(t) == w) {
            Some(t) => picked.push(t),
            None => {
                let known: Vec<&str> = all.iter().map(&name).collect();
                bail!("unknown {what} {w:?}; known: {}", known.join(", "));
            }
        }
    }
    Ok(picked)
}

fn run(cli: Cli) -> Result<()> {
    let root = root();
    if cli.list {
        println!("contenders:");
        for c in CONTENDERS {
            println!("  {:<13} {}", c.name, c.what);
        }
        println!("workloads:");
        for w in WORKLOADS {
            println!("  {:<20} {}", w.name, w.what);
        }
        return Ok(());
    }
    if let Some(results) = &cli.report {
        return report::write(&root, results);
    }
    let env = Env {
        root: root.clone(),
        logs: std::env::temp_dir().join(format!("ringcast-compare-{}", std::process::id())),
        server_cpu: cli.server_cpu,
        redis_port: cli.redis_port,
        uws: cli.uws.as_deref().map(absolute),
        centrifugo: cli.centrifugo.as_deref().map(absolute),
    };
    let mut contenders = pick(CONTENDERS, &cli.contenders, |c| c.name, "contender")?;
    if cli.contenders.is_empty() {
        // By default, user-supplied contenders run only when given.
        contenders.retain(|c| c.available(&env));
    }
    for c in &contenders {
        if let (Some(option), false) = (c.user_supplied(), c.available(&env)) {
            bail!(
                "the {} contender is a server you provide: pass {option} PATH (see bench/contenders/README.md)",
                c.name
            );
        }
    }
    let workloads = pick(WORKLOADS, &cli.workloads, |w| w.name, "workload")?;

    ctrlc::set_handler(|| {
        procs::kill_all();
        eprintln!("\ncompare: interrupted; every process it started is stopped");
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;

    let logs = env.logs.clone();
    std::fs::create_dir_all(&logs)?;
    let mut versions = serde_json::Map::new();
    for c in &contenders {
        eprintln!("== preparing {}", c.name);
        versions.insert(
            c.name.into(),
            json!({"what": c.what, "version": c.prepare(&env)?}),
        );
    }
    let host = contenders::output("hostname", &[], &root).unwrap_or_else(|_| "host".into());
    let date = contenders::output("date", &["+%Y%m%d"], &root)?;
    let results_path = root.join(format!("bench/results/compare-{date}-{host}.json"));
    let plan: Vec<(&Workload, &Contender)> = workloads
        .iter()
        .flat_map(|w| {
            contenders
                .iter()
                .filter(|c| c.supports(w.topology))
                .map(move |c| (*w, *c))
        })
        .collect();
    let mut results = start_results(&results_path, &plan, meta(&cli, &root)?, versions)?;
    let total = plan.len() as u64 * u64::from(cli.runs);
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:30} {pos}/{len} runs, about {eta} left · {msg}",
        )
        .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    for (workload, contender) in plan {
        for run in 1..=cli.runs {
            bar.set_message(format!(
                "{} / {} (run {run}/{})",
                contender.name, workload.name, cli.runs
            ));
            let outcome = run_one(&env, &cli, contender, workload);
            let entry = match outcome {
                Ok(result) => {
                    say(
                        &bar,
                        format!(
                            "{:<10} {:<20} run {run}: {}",
                            contender.name,
                            workload.name,
                            headline(&result)
                        ),
                    );
                    json!({"contender": contender.name, "workload": workload.name, "run": run, "at": now(&root), "result": result})
                }
                Err(e) => {
                    say(
                        &bar,
                        format!(
                            "{:<10} {:<20} run {run}: FAILED: {e:#}",
                            contender.name, workload.name
                        ),
                    );
                    json!({"contender": contender.name, "workload": workload.name, "run": run, "at": now(&root), "error": format!("{e:#}")})
                }
            };
            results["runs"]
                .as_array_mut()
                .expect("an array")
                .push(entry);
            std::fs::write(&results_path, serde_json::to_string_pretty(&results)?)
                .with_context(|| format!("writing {}", results_path.display()))?;
            bar.inc(1);
        }
    }
    bar.finish_with_message("done");
    eprintln!("results: {}", results_path.display());
    if !cli.no_report {
        report::write(&root, &results_path)?;
    }
    let failed = results["runs"]
        .as_array()
        .is_some_and(|runs| runs.iter().any(|r| r.get("error").is_some()));
    if failed {
        eprintln!(
            "some runs failed; server and loadgen logs kept in {}",
            logs.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&logs);
    }
    Ok(())
}

/// A line above the progress bar, or on stderr when there is no terminal
/// (the bar hides itself then).
fn say(bar: &ProgressBar, line: String) {
    if bar.is_hidden() {
        eprintln!("{line}");
    } else {
        bar.println(line);
    }
}

/// One run: fresh servers, the load generator, everything stopped after.
fn run_one(env: &Env, cli: &Cli, contender: &Contender, workload: &Workload) -> Result<Value> {
    for port in contender.needed_ports(workload.topology, env) {
        if !procs::port_free(port) {
            bail!("port {port} is in use; stop what holds it (compare never ends processes it did not start)");
        }
    }
    let started = contender.start(workload.topology, env)?;
    let mut args: Vec<String> = vec![
        "--url".into(),
        started.urls.clone(),
        "--server-pid".into(),
        started.pid.to_string(),
        "--source-ips".into(),
        "127.0.0.1-127.0.0.20".into(),
        "--label".into(),
        format!("{}/{}", contender.name, workload.name),
    ];
    args.extend(contender.loadgen_args());
    args.extend(workload.args.iter().map(|s| s.to_string()));
    let log = env.logs.join("loadgen.log");
    let out = procs::run_to_end(
        "loadgen",
        cli.load_cpu,
        &env.root
            .join("target/release/loadgen")
            .display()
            .to_string(),
        &args,
        &log,
    );
    started.stop();
    let out = out?;
    let line = out.lines().last().context("loadgen printed nothing")?;
    let result: Value = serde_json::from_str(line).context("loadgen's last line is not JSON")?;
    // Let the kernel reap the closed sockets before the next run.
    std::thread::sleep(Duration::from_secs(1));
    Ok(result)
}

fn headline(r: &Value) -> String {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    if r["mode"] == "idle" {
        format!("{:.0} B RSS per connection", f("rss_per_conn"))
    } else if r["mode"] == "connect" {
        format!(
            "{:.0} setups/s, all {} in {:.2} s, setup p99 {:.1} ms",
            f("connect_per_sec"),
            r["connected"],
            f("connect_secs"),
            f("p99_us") / 1000.0
        )
    } else {
        format!(
            "{:.0} msg/s delivered, p99 {:.1} ms, {} of {} delivered",
            f("delivered_per_sec"),
            f("p99_us") / 1000.0,
            r["delivered"],
            r["expected"]
        )
    }
}

/// The results of today's file on this host, without the cells about to be
/// measured again (so a run of some contenders or workloads updates those
/// cells and keeps the others), or a fresh document.
fn start_results(
    path: &std::path::Path,
    plan: &[(&Workload, &Contender)],
    meta: Value,
    versions: serde_json::Map<String, Value>,
) -> Result<Value> {
    let mut results = match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str::<Value>(&text)
            .with_context(|| format!("{} is not a results file; move it away", path.display()))?,
        Err(_) => json!({"contenders": {}, "workloads": {}, "runs": []}),
    };
    let rerun = |run: &Value| {
        plan.iter()
            .any(|(w, c)| run["workload"] == w.name && run["contender"] == c.name)
    };
    if let Some(runs) = results["runs"].as_array_mut() {
        runs.retain(|run| !rerun(run));
    }
    results["meta"] = meta;
    for (name, version) in versions {
        results["contenders"][name] = version;
    }
    for (w, _) in plan {
        results["workloads"][w.name] = json!(w.what);
    }
    Ok(results)
}

fn now(root: &std::path::Path) -> String {
    contenders::output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"], root).unwrap_or_default()
}

/// The machine and conditions, recorded with the results.
fn meta(cli: &Cli, root: &std::path::Path) -> Result<Value> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let sh = |p: &str, a: &[&str]| contenders::output(p, a, root).unwrap_or_default();
    Ok(json!({
        "date": sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        "host": sh("hostname", &[]),
        "kernel": sh("uname", &["-r"]),
        "cpu": cpu,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory": sh("sh", &["-c", "grep MemTotal /proc/meminfo"]),
        "open_files_limit": sh("sh", &["-c", "ulimit -n"]),
        "rustc": sh("rustc", &["--version"]),
        "redis": sh("redis-server", &["--version"]),
        "server_cpu": cli.server_cpu,
        "load_cpu": cli.load_cpu,
        "runs": cli.runs,
    }))
}
