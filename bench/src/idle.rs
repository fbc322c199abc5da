//! `idle` and `connect` modes: open many subscribed connections and either
//! hold them to see what each costs the server (RSS) and the kernel (socket
//! memory), or just measure how fast they can be set up.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use indicatif::ProgressBar;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cli::{ConnArgs, ConnectArgs, IdleArgs};
use crate::client::{bar_style, open_all, Ctx};
use crate::procfs::{KernelMem, ServerSampler};
use crate::stats::{round, Report};

/// Time for the server to finish whatever it does lazily after the last
/// subscribe before memory is read.
const SETTLE: Duration = Duration::from_millis(500);

pub async fn run_idle(
    ctx: Arc<Ctx>,
    args: IdleArgs,
    server_pid: Option<u32>,
    report: &mut Report,
) -> Result<()> {
    report.hold = Some(args.hold);
    let per_conn = args.subs_per_conn as usize;
    ensure!(
        per_conn <= args.conn.channels as usize,
        "--subs-per-conn ({per_conn}) cannot exceed --channels ({}): a connection joins distinct channels",
        args.conn.channels
    );
    run(
        ctx,
        &args.conn,
        per_conn,
        Some(args.hold),
        server_pid,
        report,
    )
    .await
}

pub async fn run_connect(
    ctx: Arc<Ctx>,
    args: ConnectArgs,
    server_pid: Option<u32>,
    report: &mut Report,
) -> Result<()> {
    if args.storm {
        return run_storm(ctx, &args.conn, server_pid, report).await;
    }
    run(ctx, &args.conn, 1, None, server_pid, report).await
}

/// Sets every connection up (paced by --concurrency), drops them all at
/// once, then has them all reconnect and resubscribe at once: what a relay
/// sees when a load balancer or a network path fails over.
async fn run_storm(
    ctx: Arc<Ctx>,
    args: &ConnArgs,
    server_pid: Option<u32>,
    report: &mut Report,
) -> Result<()> {
    report.connections = args.connections;
    report.channels = args.channels;
    report.subs_per_conn = 1;
    let mut sampler = server_pid.map(ServerSampler::start).transpose()?;
    let channels = args.channels as usize;
    let (_first_stop_tx, first_stop_rx) = watch::channel(false);
    let first = open_all(
        &ctx,
        args.connections,
        args.concurrency,
        |i| vec![i % channels],
        &first_stop_rx,
        &mut sampler,
    )
    .await;
    if first.connected.is_empty() {
        bail!(
            "no connection could be set up: {}",
            first.first_error.unwrap_or_default()
        );
    }
    report.initial_connect_per_sec = Some(round(first.per_sec(), 1));
    first.vanish();
    if let Some(s) = sampler.as_mut() {
        s.restart_cpu();
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let storm = open_all(
        &ctx,
        args.connections,
        args.connections,
        |i| vec![i % channels],
        &stop_rx,
        &mut sampler,
    )
    .await;
    report.connected = storm.connected.len() as u64;
    report.connect_secs = round(storm.secs, 3);
    report.connect_per_sec = round(storm.per_sec(), 1);
    report.set_latency("setup", &storm.setup);
    if let Some(s) = sampler.as_mut() {
        report.record_server(s);
    }
    let seen = storm.close(&stop_tx).await;
    report.errors = seen.errors;
    report.first_error = seen.first_error;
    Ok(())
}

/// Connection i subscribes to channels (i*K + j) % C for j < K (`per_conn`). With `hold`, the connections
/// stay open that many seconds and the memory figures are taken at the end
/// of it; without, they are closed as soon as the last one is subscribed.
async fn run(
    ctx: Arc<Ctx>,
    args: &ConnArgs,
    per_conn: usize,
    hold: Option<u64>,
    server_pid: Option<u32>,
    report: &mut Report,
) -> Result<()> {
    report.connections = args.connections;
    report.channels = args.channels;
    report.subs_per_conn = per_conn as u32;

    let mut sampler = server_pid.map(ServerSampler::start).transpose()?;
    let kernel_before = KernelMem::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let channels = args.channels as usize;
    let opened = open_all(
        &ctx,
        args.connections,
        args.concurrency,
        |i| {
            (0..per_conn)
                .map(|j| (i * per_conn + j) % channels)
                .collect()
        },
        &stop_rx,
        &mut sampler,
    )
    .await;
    let connected = opened.connected.len() as u64;
    report.connected = connected;
    report.connect_secs = round(opened.secs, 3);
    report.connect_per_sec = round(opened.per_sec(), 1);
    report.set_latency("setup", &opened.setup);
    if connected == 0 {
        let seen = opened.close(&stop_tx).await;
        bail!(
            "no connection could be set up: {}",
            seen.first_error.unwrap_or_default()
        );
    }

    if let Some(hold) = hold {
        tokio::time::sleep(SETTLE).await;
        let bar = ProgressBar::new(hold).with_style(bar_style(
            "idle    [{elapsed_precise}] {bar:40} {pos}/{len}s {msg}",
        ));
        bar.set_message(format!("holding {connected} connections"));
        let started = Instant::now();
        let until = started + Duration::from_secs(hold);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        while Instant::now() < until {
            tick.tick().await;
            bar.set_position(started.elapsed().as_secs().min(hold));
            if let Some(s) = sampler.as_mut() {
                s.sample();
            }
        }
        bar.finish_and_clear();
        let kernel_after = KernelMem::now();
        let (sock, slab) = kernel_before.per_conn(&kernel_after, connected);
        report.sock_mem_per_conn = sock.map(|b| round(b, 1));
        report.slab_per_conn = slab.map(|b| round(b, 1));
    }
    if let Some(s) = sampler.as_mut() {
        report.record_server(s);
        if hold.is_some() {
            report.rss_per_conn = report
                .server_rss_end
                .zip(s.rss_start)
                .map(|(end, start)| round((end as f64 - start as f64) / connected as f64, 1));
        }
    }
    let seen = opened.close(&stop_tx).await;
    report.errors = seen.errors;
    report.first_error = seen.first_error;
    Ok(())
}
