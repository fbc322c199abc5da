//! `fanout` mode: many subscribers, a few publishers at a fixed or unlimited
//! rate, then a short drain. Measures delivered messages per second,
//! end-to-end latency and how many messages the server packs per frame.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use futures_util::{FutureExt, SinkExt, StreamExt};
use indicatif::ProgressBar;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, timeout_at, Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::FanoutArgs;
use crate::client::{bar_style, connect_to, open_all, Ctx, Ws, CLOSE_TIMEOUT};
use crate::procfs::ServerSampler;
use crate::proto::{decode, padding, Format, Kind, Publish};
use crate::stats::{merged_latencies, now_ns, round, Report};

/// Longest the run waits after publishing for messages still on their way.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// Deliveries that stall this long mean the drain is over.
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// Longest a publisher waits for its outstanding `published` replies.
const ACK_WAIT: Duration = Duration::from_secs(1);

pub async fn run(
    ctx: Arc<Ctx>,
    args: FanoutArgs,
    server_pid: Option<u32>,
    report: &mut Report,
) -> Result<()> {
    let conns = args.conn.connections;
    let channels = args.conn.channels as usize;
    let per_conn = args.subs_per_conn as usize;
    ensure!(
        per_conn <= channels,
        "--subs-per-conn ({per_conn}) cannot exceed --channels ({channels}): a connection joins distinct channels"
    );
    report.connections = conns;
    report.channels = args.conn.channels;
    report.subs_per_conn = args.subs_per_conn;
    report.publishers = Some(args.publishers);
    report.payload = Some(args.payload);
    report.rate = Some(args.rate);
    report.window = Some(args.window);
    report.duration = Some(args.duration);
    report.keys = (args.keys > 0).then_some(args.keys);
    report.conflate_ms = (args.conflate_ms > 0).then_some(args.conflate_ms);

    let mut sampler = server_pid.map(ServerSampler::start).transpose()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let plan = |i: usize| {
        (0..per_conn)
            .map(|j| (i * per_conn + j) % channels)
            .collect()
    };
    let opened = open_all(
        &ctx,
        conns,
        args.conn.concurrency,
        plan,
        &stop_rx,
        &mut sampler,
    )
    .await;
    report.connected = opened.connected.len() as u64;
    report.connect_secs = round(opened.secs, 3);
    report.connect_per_sec = round(opened.per_sec(), 1);
    if opened.connected.is_empty() {
        let seen = opened.close(&stop_tx).await;
        bail!(
            "no subscriber connected: {}",
            seen.first_error.unwrap_or_default()
        );
    }
    let mut subscribers = vec![0u64; channels];
    let slow = opened.connected.iter().filter(|&&i| ctx.is_slow(i)).count();
    report.slow_consumers = Some(slow as u64);
    // Slow consumers never read: what they are sent is not expected.
    for &i in opened.connected.iter().filter(|&&i| !ctx.is_slow(i)) {
        for j in 0..per_conn {
            subscribers[(i * per_conn + j) % channels] += 1;
        }
    }

    let mut publishers = Vec::new();
    // Pusher clients cannot publish on public channels, and Centrifugo's
    // publish from clients is off by default: their publishers use the
    // HTTP API and need no WebSocket.
    let http_publishers = matches!(ctx.format, Format::Pusher | Format::Centrifugo);
    for p in 0..args.publishers as usize {
        if http_publishers {
            break;
        }
        match connect_to(&ctx, conns as usize + p, &ctx.targets[0]).await {
            Ok(ws) => publishers.push(ws),
            Err(e) => {
                opened.close(&stop_tx).await;
                return Err(e.context("publisher connection"));
            }
        }
    }

    let start = Instant::now();
    let end = start + Duration::from_secs(args.duration);
    if let Some(s) = sampler.as_mut() {
        s.restart_cpu();
    }
    let shared = Arc::new(PubPlan {
        start,
        end,
        rate: args.rate as f64 / f64::from(args.publishers),
        window: u64::from(args.window),
        pad: padding(ctx.format, args.payload),
        subscribers,
    });
    let handles: Vec<_> = if http_publishers {
        (0..args.publishers as usize)
            .map(|p| tokio::spawn(http_publisher(ctx.clone(), shared.clone(), p)))
            .collect()
    } else {
        publishers
            .into_iter()
            .enumerate()
            .map(|(p, ws)| tokio::spawn(publisher(ctx.clone(), shared.clone(), ws, p)))
            .collect()
    };

    let bar = ProgressBar::new(args.duration).with_style(bar_style(
        "fanout  [{elapsed_precise}] {bar:40} {pos}/{len}s {msg}",
    ));
    let mut last = (Instant::now(), 0u64);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while Instant::now() < end {
        tick.tick().await;
        let (now, total) = (Instant::now(), ctx.live.total());
        let rate = (total - last.1) as f64 / (now - last.0).as_secs_f64().max(1e-9);
        last = (now, total);
        bar.set_position((now - start).as_secs().min(args.duration));
        bar.set_message(format!("{rate:.0} msg/s delivered"));
        if let Some(s) = sampler.as_mut() {
            s.sample();
        }
    }
    bar.finish_and_clear();

    let mut published = PubStats::default();
    for handle in handles {
        match handle.await {
            Ok(p) => published.add(p),
            Err(e) => published.error(format!("publisher task failed: {e}")),
        }
    }
    let publish_secs = (published.last_send.unwrap_or(end) - start).as_secs_f64();

    // The measured window ends when deliveries stop: everything expected
    // has arrived, or nothing more arrived for DRAIN_QUIET.
    let drain_start = Instant::now();
    let mut seen = (drain_start, ctx.live.total());
    let measure_end = loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (now, total) = (Instant::now(), ctx.live.total());
        if total >= published.expected {
            break now;
        }
        if total != seen.1 {
            seen = (now, total);
        }
        if now - seen.0 >= DRAIN_QUIET || now - drain_start >= DRAIN_MAX {
            break seen.0;
        }
    };
    let measure_secs = (measure_end - start).as_secs_f64();
    if let Some(s) = sampler.as_mut() {
        report.record_server(s);
    }

    let seen_by_subs = opened.close(&stop_tx).await;
    report.measure_secs = Some(round(measure_secs, 3));
    report.published = Some(published.sent);
    report.published_acked = Some(published.acked);
    report.published_per_sec = Some(round(published.sent as f64 / publish_secs.max(1e-9), 1));
    report.expected = Some(published.expected);
    report.delivered = Some(seen_by_subs.messages);
    report.conflated = (ctx.conflate_ms.is_some()).then_some(seen_by_subs.merged);
    report.delivered_per_sec = Some(round(
        seen_by_subs.messages as f64 / measure_secs.max(1e-9),
        1,
    ));
    report.frames = Some(seen_by_subs.frames);
    report.msgs_per_frame = (seen_by_subs.frames > 0)
        .then(|| round(seen_by_subs.messages as f64 / seen_by_subs.frames as f64, 2));
    report.set_latency("e2e", &merged_latencies());
    report.errors = seen_by_subs.errors + published.errors;
    report.first_error = seen_by_subs.first_error.or(published.first_error);
    Ok(())
}

/// What every publisher shares.
struct PubPlan {
    start: Instant,
    end: Instant,
    /// Publishes per second for one publisher; 0 = unlimited.
    rate: f64,
    window: u64,
    pad: String,
    /// Subscriber connections per channel, to know how many deliveries each
    /// publish should cause.
    subscribers: Vec<u64>,
}

#[derive(Debug, Default)]
struct PubStats {
    sent: u64,
    acked: u64,
    failed: u64,
    /// Deliveries the publishes sent so far should cause.
    expected: u64,
    errors: u64,
    first_error: Option<String>,
    last_send: Option<Instant>,
}

impl PubStats {
    fn in_flight(&self) -> u64 {
        self.sent - self.acked - self.failed
    }

    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }

    fn add(&mut self, other: PubStats) {
        self.sent += other.sent;
        self.acked += other.acked;
        self.failed += other.failed;
        self.expected += other.expected;
        self.errors += other.errors;
        if let Some(e) = other.first_error {
            self.first_error.get_or_insert(e);
        }
        self.last_send = self.last_send.max(other.last_send);
    }

    /// Counts replies; `false` when the connection is gone.
    fn on_frame(&mut self, frame: Option<Result<Message, impl std::fmt::Display>>) -> bool {
        let msg = match frame {
            Some(Ok(Message::Close(f))) => {
                self.error(format!("server closed the publisher: {f:?}"));
                return false;
            }
            Some(Ok(msg)) => msg,
            Some(Err(e)) => {
                self.error(format!("publisher connection failed: {e}"));
                return false;
            }
            None => {
                self.error("server dropped the publisher".to_string());
                return false;
            }
        };
        let (mut acked, mut failed, mut errors) = (0, 0, Vec::new());
        let decoded = decode(&msg, |ev| match ev.kind {
            Kind::Published => acked += 1,
            Kind::Error => {
                if ev.id.0.is_some() {
                    failed += 1;
                }
                errors.push(Ctx::error_text(ev.code.as_deref(), ev.message.as_deref()));
            }
            _ => {}
        });
        if let Err(e) = decoded {
            self.error(format!("undecodable frame: {e:#}"));
        }
        self.acked += acked;
        self.failed += failed;
        for e in errors {
            self.error(e);
        }
        true
    }
}

/// One publisher connection: publishes round-robin over the channels from
/// `p` on, as scheduled by the rate and never more than `window` ahead of
/// the replies, until the plan's end; then waits briefly for the last
/// replies.
async fn publisher(ctx: Arc<Ctx>, plan: Arc<PubPlan>, mut ws: Ws, p: usize) -> PubStats {
    let mut stats = PubStats::default();
    let channels = ctx.names.len();
    let mut next = p % channels;
    'run: loop {
        // Take every reply already here first, so the window refills in one
        // burst and one flush rather than one frame per reply.
        while let Some(frame) = ws.next().now_or_never() {
            if !stats.on_frame(frame) {
                break 'run;
            }
        }
        let now = Instant::now();
        if now >= plan.end {
            break;
        }
        let due = if plan.rate > 0.0 {
            ((now - plan.start).as_secs_f64() * plan.rate) as u64 + 1
        } else {
            u64::MAX
        };
        let mut fed = false;
        while stats.sent < due && stats.in_flight() < plan.window {
            let channel = next;
            next = (next + 1) % channels;
            let mut request =
                Publish::new(&ctx.names[channel], now_ns(), &plan.pad, stats.sent + 1);
            if !ctx.keys.is_empty() {
                request.key = Some(&ctx.keys[stats.sent as usize % ctx.keys.len()]);
            }
            let sent = match ctx.format.encode(&request) {
                Ok(msg) => ws.feed(msg).await,
                Err(e) => {
                    stats.error(format!("encode: {e:#}"));
                    break 'run;
                }
            };
            if let Err(e) = sent {
                stats.error(format!("publish failed: {e}"));
                break 'run;
            }
            stats.sent += 1;
            stats.expected += plan.subscribers[channel];
            fed = true;
        }
        if fed {
            if let Err(e) = ws.flush().await {
                stats.error(format!("publish failed: {e}"));
                break;
            }
            stats.last_send = Some(Instant::now());
        }
        let wake = if plan.rate > 0.0 && stats.in_flight() < plan.window {
            (plan.start + Duration::from_secs_f64(stats.sent as f64 / plan.rate)).min(plan.end)
        } else {
            plan.end
        };
        tokio::select! {
            frame = ws.next() => {
                if !stats.on_frame(frame) {
                    break;
                }
            }
            _ = sleep_until(wake) => {}
        }
    }
    let deadline = Instant::now() + ACK_WAIT;
    while stats.in_flight() > 0 {
        match timeout_at(deadline, ws.next()).await {
            Ok(frame) => {
                if !stats.on_frame(frame) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    let _ = timeout(CLOSE_TIMEOUT, ws.close(None)).await;
    stats
}

/// Whose HTTP API publishers call, and with what credentials.
enum HttpApi {
    Pusher(crate::pusher::App),
    Centrifugo(String),
}

/// A publisher through the Pusher or Centrifugo HTTP API: the same schedule as
/// [`publisher`], each publication one signed request on its own connection
/// (at most `window` in flight), from the source addresses in turn so that
/// thousands of short connections do not run out of ports.
async fn http_publisher(ctx: Arc<Ctx>, plan: Arc<PubPlan>, p: usize) -> PubStats {
    let mut stats = PubStats::default();
    let api = match (ctx.format, &ctx.pusher_app, &ctx.centrifugo_api_key) {
        (Format::Pusher, Some(app), _) => HttpApi::Pusher(app.clone()),
        (Format::Centrifugo, _, Some(key)) => HttpApi::Centrifugo(key.clone()),
        _ => {
            stats.error("no --pusher-app or --centrifugo-api-key for this format".into());
            return stats;
        }
    };
    let target = &ctx.targets[0];
    let host = target.addr.to_string();
    let channels = ctx.names.len();
    let mut next = p % channels;
    let mut in_flight = tokio::task::JoinSet::new();
    let settle = |stats: &mut PubStats, done: Result<Result<()>, tokio::task::JoinError>| match done
    {
        Ok(Ok(())) => stats.acked += 1,
        Ok(Err(e)) => {
            stats.failed += 1;
            stats.error(format!("{e:#}"));
        }
        Err(e) => {
            stats.failed += 1;
            stats.error(format!("publish task: {e}"));
        }
    };
    loop {
        while let Some(done) = in_flight.try_join_next() {
            settle(&mut stats, done);
        }
        let now = Instant::now();
        if now >= plan.end {
            break;
        }
        let due = if plan.rate > 0.0 {
            ((now - plan.start).as_secs_f64() * plan.rate) as u64 + 1
        } else {
            u64::MAX
        };
        let unix_secs = now_ns() / 1_000_000_000;
        while stats.sent < due && stats.in_flight() < plan.window {
            let channel = next;
            next = (next + 1) % channels;
            let request = match &api {
                HttpApi::Pusher(app) => {
                    app.publish_request(&host, &ctx.names[channel], now_ns(), &plan.pad, unix_secs)
                }
                HttpApi::Centrifugo(key) => crate::centrifugo::publish_request(
                    &host,
                    key,
                    &ctx.names[channel],
                    now_ns(),
                    &plan.pad,
                ),
            };
            let request = match request {
                Ok(r) => r,
                Err(e) => {
                    stats.error(format!("encode: {e:#}"));
                    return stats;
                }
            };
            let source = (!ctx.source_ips.is_empty())
                .then(|| ctx.source_ips[(stats.sent as usize + p) % ctx.source_ips.len()]);
            in_flight.spawn(crate::pusher::post(
                target.addr,
                source,
                request,
                matches!(api, HttpApi::Centrifugo(_)),
            ));
            stats.sent += 1;
            stats.expected += plan.subscribers[channel];
            stats.last_send = Some(Instant::now());
        }
        let wake = if plan.rate > 0.0 && stats.in_flight() < plan.window {
            (plan.start + Duration::from_secs_f64(stats.sent as f64 / plan.rate)).min(plan.end)
        } else {
            plan.end
        };
        tokio::select! {
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => settle(&mut stats, done),
            _ = sleep_until(wake) => {}
        }
    }
    let deadline = Instant::now() + ACK_WAIT;
    while let Ok(Some(done)) = timeout_at(deadline, in_flight.join_next()).await {
        settle(&mut stats, done);
    }
    stats
}
