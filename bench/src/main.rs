//! `loadgen`: the load generator for ringcast and the tokio baseline. Owns
//! the entry point: argument checks, the runtime, the mode dispatch and the
//! output (a human summary on stderr, one JSON line on stdout).

mod centrifugo;
mod cli;
mod client;
mod fanout;
mod idle;
mod procfs;
mod proto;
mod pusher;
mod snapshot;
mod stats;

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Parser;

use crate::cli::{parse_source_ips, parse_target, Cli, Mode};
use crate::client::Ctx;
use crate::stats::{Live, Report};

/// Sockets and files the process needs besides the measured connections:
/// publishers, stdio, the runtime's own descriptors.
const SPARE_FILES: u64 = 100;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(report) => {
            report.print_summary();
            match serde_json::to_string(&report) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("loadgen: cannot write the report: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<Report> {
    let common = cli.common;
    let targets = common
        .url
        .split(',')
        .map(parse_target)
        .collect::<Result<Vec<_>>>()?;
    let source_ips = match &common.source_ips {
        Some(spec) => parse_source_ips(spec, &targets[0])?,
        None => Vec::new(),
    };
    let (mode, conn) = match &cli.mode {
        Mode::Fanout(a) => ("fanout", &a.conn),
        Mode::Idle(a) => ("idle", &a.conn),
        Mode::Connect(a) => ("connect", &a.conn),
        Mode::Snapshot(a) => ("snapshot", &a.conn),
    };
    if let Some(limit) = procfs::open_files_limit() {
        ensure!(
            u64::from(conn.connections) + SPARE_FILES <= limit,
            "{} connections need more than the {limit} open files this process may have: \
             lower --connections or run several processes",
            conn.connections
        );
    }
    ensure!(
        common.format != proto::Format::Pusher || common.pusher_app.is_some(),
        "--format pusher needs --pusher-app ID:KEY:SECRET (publishes go through the signed HTTP API)"
    );
    ensure!(
        common.format != proto::Format::Centrifugo || common.centrifugo_api_key.is_some(),
        "--format centrifugo needs --centrifugo-api-key KEY (publishes go through the server API)"
    );
    let ctx = Arc::new(Ctx {
        pusher_app: common.pusher_app.clone(),
        centrifugo_api_key: common.centrifugo_api_key.clone(),
        slow_percent: match &cli.mode {
            Mode::Fanout(a) => a.slow_percent,
            _ => 0,
        },
        conflate_ms: match &cli.mode {
            Mode::Fanout(a) if a.conflate_ms > 0 => Some(a.conflate_ms),
            _ => None,
        },
        keys: match &cli.mode {
            Mode::Fanout(a) => (0..a.keys).map(|k| format!("k{k}")).collect(),
            _ => Vec::new(),
        },
        targets,
        format: common.format,
        source_ips,
        names: (0..conn.channels).map(|c| format!("bench.{c}")).collect(),
        live: Live::new(),
    });
    let mut report = Report {
        mode,
        label: common.label.clone(),
        url: common.url.clone(),
        format: common.format.name().to_string(),
        threads: common.threads,
        ..Report::default()
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(common.threads))
        .enable_all()
        .build()?;
    let pid = common.server_pid;
    let outcome = runtime.block_on(async {
        match cli.mode {
            Mode::Fanout(args) => fanout::run(ctx, args, pid, &mut report).await,
            Mode::Idle(args) => idle::run_idle(ctx, args, pid, &mut report).await,
            Mode::Connect(args) => idle::run_connect(ctx, args, pid, &mut report).await,
            Mode::Snapshot(args) => snapshot::run(ctx, args, pid, &mut report).await,
        }
    });
    // Every task has been told to stop by now; a socket stuck in its close
    // handshake must not keep the process alive.
    runtime.shutdown_timeout(Duration::from_secs(1));
    outcome.map(|()| report)
}
