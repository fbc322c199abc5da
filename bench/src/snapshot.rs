//! `snapshot` mode: what a `snapshot` subscribe costs. One publisher puts
//! `--keys` keyed messages on `bench.0` (every one acknowledged); then
//! `--connections` clients, `--concurrency` at a time, each subscribe with
//! `snapshot: true` and read the latest message of every key up to their
//! `subscribed`. Measures the time from sending the subscribe to its
//! `subscribed` (the latency fields, `snapshot`), subscribes answered per
//! second, and that each snapshot held every key.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::SnapshotArgs;
use crate::client::{connect, connect_to, Ctx, Ws, CLOSE_TIMEOUT};
use crate::procfs::ServerSampler;
use crate::proto::{decode, padding, Format, Kind, Publish, Subscribe};
use crate::stats::{new_histogram, now_ns, round, Report};

/// Longest one step (a publish burst's acks, one snapshot) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Publishes in flight before the publisher reads acknowledgements.
const WINDOW: u64 = 256;

pub async fn run(
    ctx: Arc<Ctx>,
    args: SnapshotArgs,
    server_pid: Option<u32>,
    report: &mut Report,
) -> Result<()> {
    ensure!(
        matches!(ctx.format, Format::Json | Format::Msgpack),
        "snapshot mode measures ringcast's own protocol (json or msgpack)"
    );
    report.connections = args.conn.connections;
    report.channels = 1;
    report.keys = Some(args.keys);
    report.payload = Some(args.payload);
    let channel = ctx.names[0].clone();
    let mut publisher = connect_to(&ctx, usize::MAX / 2, &ctx.targets[0])
        .await
        .context("publisher connection")?;
    let pad = padding(ctx.format, args.payload);
    let keys: Vec<String> = (0..args.keys).map(|k| format!("k{k}")).collect();
    let mut acked = 0u64;
    let mut sent = 0u64;
    while acked < u64::from(args.keys) {
        while sent < u64::from(args.keys) && sent - acked < WINDOW {
            let mut request = Publish::new(&channel, now_ns(), &pad, sent + 1);
            request.key = Some(&keys[sent as usize]);
            publisher.feed(ctx.format.encode(&request)?).await?;
            sent += 1;
        }
        publisher.flush().await?;
        let msg = timeout(STEP_TIMEOUT, publisher.next())
            .await
            .context("publish acknowledgements in time")?
            .context("the publisher's connection closed")??;
        let mut refused = None;
        decode(&msg, |ev| match ev.kind {
            Kind::Published => acked += 1,
            Kind::Error => {
                refused = Some(Ctx::error_text(ev.code.as_deref(), ev.message.as_deref()))
            }
            _ => {}
        })?;
        if let Some(e) = refused {
            bail!("publish refused (start the relay with --allow-client-publish true): {e}");
        }
    }
    report.published = Some(acked);
    let _ = timeout(CLOSE_TIMEOUT, publisher.close(None)).await;

    let mut sampler = server_pid.map(ServerSampler::start).transpose()?;
    if let Some(s) = sampler.as_mut() {
        s.restart_cpu();
    }
    let permits = Arc::new(Semaphore::new(args.conn.concurrency as usize));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..args.conn.connections as usize {
        let permit = permits.clone().acquire_owned().await?;
        let ctx = ctx.clone();
        let channel = channel.clone();
        tasks.spawn(async move {
            let outcome = one_snapshot(&ctx, n, &channel).await;
            drop(permit);
            outcome
        });
    }
    let mut took = new_histogram();
    let mut messages = 0u64;
    let mut done = 0u64;
    while let Some(joined) = tasks.join_next().await {
        match joined.context("snapshot task")? {
            Ok((ns, held, ws)) => {
                took.saturating_record(ns);
                messages += held;
                done += 1;
                drop(ws);
            }
            Err(e) => {
                report.errors += 1;
                report.first_error.get_or_insert(format!("{e:#}"));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    if let Some(s) = sampler.as_mut() {
        report.record_server(s);
    }
    report.connected = done;
    report.measure_secs = Some(round(secs, 3));
    report.subscribes_per_sec = Some(round(done as f64 / secs.max(1e-9), 1));
    report.snapshot_messages = (done > 0).then(|| round(messages as f64 / done as f64, 1));
    report.set_latency("snapshot", &took);
    if done > 0 && messages != done * u64::from(args.keys) {
        report.errors += 1;
        report.first_error.get_or_insert(format!(
            "snapshots held {messages} messages for {done} subscribes of {} keys",
            args.keys
        ));
    }
    Ok(())
}

/// Connects, subscribes to `channel` with `snapshot`, and reads to its
/// `subscribed`: nanoseconds from the subscribe to it, the messages
/// before it, and the connection (closed by the caller, after the clock).
async fn one_snapshot(ctx: &Ctx, n: usize, channel: &str) -> Result<(u64, u64, Ws)> {
    let mut ws = connect(ctx, n).await?;
    let mut request = Subscribe::new(channel, 1);
    request.snapshot = true;
    let sent = Instant::now();
    ws.send(ctx.format.encode(&request)?).await?;
    let mut held = 0u64;
    loop {
        let msg = timeout(STEP_TIMEOUT, ws.next())
            .await
            .context("the snapshot in time")?
            .context("closed before subscribed")??;
        if let Message::Close(frame) = &msg {
            bail!("closed before subscribed: {frame:?}");
        }
        let mut subscribed = false;
        let mut refused = None;
        decode(&msg, |ev| match ev.kind {
            Kind::Message => held += 1,
            Kind::Subscribed => subscribed = true,
            Kind::Error => {
                refused = Some(Ctx::error_text(ev.code.as_deref(), ev.message.as_deref()))
            }
            _ => {}
        })?;
        if let Some(e) = refused {
            bail!("subscribe refused: {e}");
        }
        if subscribed {
            return Ok((sent.elapsed().as_nanos() as u64, held, ws));
        }
    }
}
