//! Client connections: opening a socket from a chosen loopback source
//! address, the WebSocket handshake, and the subscriber task that every mode
//! uses (subscribe, wait for the replies, then count what arrives until told
//! to stop). Also the connect phase that opens many of them at once.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{client_async_with_config, WebSocketStream};

use crate::cli::Target;
use crate::procfs::ServerSampler;
use crate::proto::{decode, Format, Kind, Subscribe};
use crate::stats::{new_histogram, now_ns, record_latencies, Live};

pub type Ws = WebSocketStream<Stream>;

/// A client connection's bytes: plain TCP for `ws://`, TLS over it for
/// `wss://`.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for Stream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Stream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => std::pin::Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Accepts any server certificate: the load generator measures the relay
/// on loopback, where the certificate is the bench's own throwaway.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The TLS client every `wss://` connection uses: full handshakes (no
/// resumption), so the figures are the expensive case.
fn tls_connector() -> tokio_rustls::TlsConnector {
    static CONNECTOR: std::sync::OnceLock<tokio_rustls::TlsConnector> = std::sync::OnceLock::new();
    CONNECTOR
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports TLS 1.2 and 1.3")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            config.resumption = rustls::client::Resumption::disabled();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(config))
        })
        .clone()
}

/// Longest a single connection may take from TCP connect to its last
/// `subscribed` reply, so that a stuck server cannot hang the run.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a close handshake may take before the socket is just dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// What every connection of a run shares.
pub struct Ctx {
    /// Servers, one or more (comma-separated `--url`): subscriber connection
    /// n goes to `targets[n % len]`; publishers go to the first.
    pub targets: Vec<Target>,
    pub format: Format,
    pub source_ips: Vec<IpAddr>,
    /// `bench.0` .. `bench.{C-1}`, built once.
    pub names: Vec<String>,
    pub live: Live,
    /// With `--format pusher`: the app publishers sign for.
    pub pusher_app: Option<crate::pusher::App>,
    /// With `--format centrifugo`: the server API key publishers use.
    pub centrifugo_api_key: Option<String>,
    /// Percent of subscriber connections that never read after subscribing.
    pub slow_percent: u32,
    /// `conflate_ms` subscribers ask for.
    pub conflate_ms: Option<u32>,
    /// The keys publications carry in turn (none when empty).
    pub keys: Vec<String>,
}

impl Ctx {
    /// Whether subscriber `index` is one of the slow consumers: spread
    /// evenly, `slow_percent` of every hundred.
    pub fn is_slow(&self, index: usize) -> bool {
        slow(index, self.slow_percent)
    }
}

fn slow(index: usize, percent: u32) -> bool {
    let p = percent as usize;
    (index + 1) * p / 100 > index * p / 100
}

#[cfg(test)]
mod tests {
    #[test]
    fn slow_consumers_are_the_asked_share_spread_evenly() {
        for percent in [0, 1, 3, 50] {
            let slow: Vec<usize> = (0..1000).filter(|&i| super::slow(i, percent)).collect();
            assert_eq!(slow.len(), 10 * percent as usize, "{percent}%");
        }
        let one: Vec<usize> = (0..300).filter(|&i| super::slow(i, 1)).collect();
        assert_eq!(one, vec![99, 199, 299]);
    }
}

impl Ctx {
    /// The text of an `error` event, for the report.
    pub fn error_text(code: Option<&str>, message: Option<&str>) -> String {
        format!(
            "server error {}: {}",
            code.unwrap_or("?"),
            message.unwrap_or("")
        )
    }
}

/// Opens connection number `n`: TCP from the n-th source address
/// (round-robin), then the WebSocket handshake offering the subprotocol.
pub async fn connect(ctx: &Ctx, n: usize) -> Result<Ws> {
    connect_to(ctx, n, &ctx.targets[n % ctx.targets.len()]).await
}

/// As [`connect`], to a given server.
pub async fn connect_to(ctx: &Ctx, n: usize, target: &Target) -> Result<Ws> {
    let addr = target.addr;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if !ctx.source_ips.is_empty() {
        let ip = ctx.source_ips[n % ctx.source_ips.len()];
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind to source {ip}"))?;
    }
    let stream = socket
        .connect(addr)
        .await
        .with_context(|| format!("TCP connect to {addr}"))?;
    // Latency is the figure under test; Nagle would add up to 40 ms to it.
    stream.set_nodelay(true)?;
    let stream = if target.url.starts_with("wss://") {
        let host = target.url["wss://".len()..]
            .split(['/', ':'])
            .next()
            .unwrap_or("localhost")
            .to_string();
        let name =
            rustls::pki_types::ServerName::try_from(host).context("the wss:// URL's host")?;
        let tls = tls_connector()
            .connect(name, stream)
            .await
            .context("TLS handshake")?;
        Stream::Tls(Box::new(tls))
    } else {
        Stream::Plain(stream)
    };
    let mut request = target.url.as_str().into_client_request()?;
    if let Some(subprotocol) = ctx.format.subprotocol() {
        request.headers_mut().insert(
            SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(subprotocol),
        );
    }
    // 16 KiB instead of 128 KiB per read buffer keeps 19,000 client sockets
    // from costing the load generator gigabytes.
    let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
    let (mut ws, _) = client_async_with_config(request, stream, Some(config))
        .await
        .context("WebSocket handshake")?;
    match ctx.format {
        Format::SocketIo => socketio_connect(&mut ws).await?,
        Format::Pusher => crate::pusher::wait_established(&mut ws).await?,
        Format::Centrifugo => crate::centrifugo::connect(&mut ws).await?,
        Format::Json | Format::Msgpack => {}
    }
    Ok(ws)
}

/// Engine.IO open packet in, Socket.IO CONNECT to the main namespace out,
/// its answer in.
async fn socketio_connect(ws: &mut Ws) -> Result<()> {
    let open = ws
        .next()
        .await
        .context("closed before the Engine.IO open packet")??;
    if !open.to_text().is_ok_and(|t| t.starts_with('0')) {
        bail!("expected the Engine.IO open packet, got {open:?}");
    }
    ws.send(Message::text("40")).await?;
    loop {
        let msg = ws
            .next()
            .await
            .context("closed before the Socket.IO connect")??;
        let text = msg.to_text().unwrap_or("");
        if text.starts_with("40") {
            return Ok(());
        }
        if text.starts_with("44") {
            bail!("Socket.IO connect refused: {text}");
        }
    }
}

/// Connects and subscribes to `channels`, returning once every `subscribed`
/// reply is in.
async fn open_and_subscribe(ctx: &Ctx, n: usize, channels: &[usize]) -> Result<Ws> {
    let mut ws = connect(ctx, n).await?;
    for (j, &c) in channels.iter().enumerate() {
        let mut request = Subscribe::new(&ctx.names[c], j as u64 + 1);
        request.conflate_ms = ctx.conflate_ms;
        ws.feed(ctx.format.encode(&request)?).await?;
    }
    ws.flush().await?;
    let mut pending = channels.len();
    while pending > 0 {
        let msg = ws.next().await.context("closed before subscribed")??;
        if let Message::Close(frame) = &msg {
            bail!("closed before subscribed: {frame:?}");
        }
        let mut refused = None;
        decode(&msg, |ev| match ev.kind {
            // Pusher confirmations carry no id.
            Kind::Subscribed
                if ev
                    .id
                    .0
                    .is_none_or(|id| id >= 1 && id <= channels.len() as u64) =>
            {
                pending = pending.saturating_sub(1);
            }
            Kind::Error => {
                refused = Some(Ctx::error_text(ev.code.as_deref(), ev.message.as_deref()));
            }
            _ => {}
        })?;
        if let Some(e) = refused {
            bail!("subscribe refused: {e}");
        }
    }
    Ok(ws)
}

/// What one subscriber saw after its setup.
#[derive(Debug, Default)]
pub struct SubStats {
    pub messages: u64,
    /// What arrived messages replaced (`conflated`).
    pub merged: u64,
    /// Frames that held at least one `message` event.
    pub frames: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl SubStats {
    fn error(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }

    fn on_frame(&mut self, live: &Live, task: usize, msg: &Message, stamps: &mut Vec<u64>) {
        // One clock reading per frame: every event in it arrived together.
        let now = now_ns();
        stamps.clear();
        let mut count = 0u64;
        let mut merged = 0u64;
        let mut failure = None;
        let decoded = decode(msg, |ev| match ev.kind {
            Kind::Message => {
                count += 1;
                merged += ev.conflated.0.unwrap_or(0);
                stamps.extend(ev.stamp.0);
            }
            Kind::Error => {
                failure = Some(Ctx::error_text(ev.code.as_deref(), ev.message.as_deref()));
            }
            _ => {}
        });
        if let Err(e) = decoded {
            self.error(format!("undecodable frame: {e:#}"));
        }
        if let Some(e) = failure {
            self.error(e);
        }
        if count > 0 {
            self.messages += count;
            self.merged += merged;
            self.frames += 1;
            live.add(task, count + merged);
            record_latencies(now, stamps);
        }
    }
}

/// The outcome of one connection's setup, sent to the connect phase.
struct Setup {
    index: usize,
    took: Result<Duration, String>,
}

/// One subscriber connection for the whole run.
async fn subscriber(
    ctx: Arc<Ctx>,
    index: usize,
    channels: Vec<usize>,
    gate: Arc<Semaphore>,
    ready: mpsc::UnboundedSender<Setup>,
    mut stop: watch::Receiver<bool>,
) -> SubStats {
    let mut stats = SubStats::default();
    let setup = {
        let _permit = gate.acquire().await.expect("connect gate is never closed");
        let started = Instant::now();
        match timeout(SETUP_TIMEOUT, open_and_subscribe(&ctx, index, &channels)).await {
            Ok(Ok(ws)) => Ok((ws, started.elapsed())),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("connection setup timed out".to_string()),
        }
    };
    let mut ws = match setup {
        Ok((ws, took)) => {
            let _ = ready.send(Setup {
                index,
                took: Ok(took),
            });
            ws
        }
        Err(e) => {
            let _ = ready.send(Setup {
                index,
                took: Err(e),
            });
            return stats;
        }
    };
    drop(ready);
    if ctx.is_slow(index) {
        // A consumer that stopped reading: the server's problem now.
        let _ = stop.wait_for(|stop| *stop).await;
        return stats;
    }
    let mut stamps = Vec::new();
    loop {
        tokio::select! {
            biased;
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(frame))) => {
                    if !*stop.borrow() {
                        stats.error(format!("server closed the connection: {frame:?}"));
                    }
                    break;
                }
                Some(Ok(msg)) => {
                    stats.on_frame(&ctx.live, index, &msg, &mut stamps);
                    if ctx.format == Format::Centrifugo {
                        for _ in 0..crate::centrifugo::pings(&msg) {
                            if let Err(e) = ws.send(Message::text("{}")).await {
                                stats.error(format!("answering a ping: {e}"));
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    stats.error(format!("connection failed: {e}"));
                    break;
                }
                None => {
                    stats.error("server dropped the connection".to_string());
                    break;
                }
            },
        }
    }
    let _ = timeout(CLOSE_TIMEOUT, ws.close(None)).await;
    stats
}

/// The subscriber connections of a run once the connect phase is over.
pub struct Opened {
    pub handles: Vec<JoinHandle<SubStats>>,
    /// Indices of the connections whose subscriptions all succeeded.
    pub connected: Vec<usize>,
    /// From the first connect to the last finished setup.
    pub secs: f64,
    /// Setup latency (TCP connect + handshake + subscribe replies), ns.
    pub setup: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Opened {
    pub fn per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.connected.len() as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Every connection is closed at once and abruptly: the tasks are
    /// dropped with their sockets, so the server sees the TCP close without
    /// a WebSocket close handshake. (A real loss of the network path, where
    /// the server keeps dead connections until its heartbeat, is not what
    /// this simulates.)
    pub fn vanish(self) {
        for handle in self.handles {
            handle.abort();
        }
    }

    /// Tells every subscriber to close and adds up what they saw.
    pub async fn close(self, stop: &watch::Sender<bool>) -> SubStats {
        let _ = stop.send(true);
        let mut total = SubStats {
            errors: self.errors,
            first_error: self.first_error,
            ..SubStats::default()
        };
        for handle in self.handles {
            match handle.await {
                Ok(s) => {
                    total.messages += s.messages;
                    total.merged += s.merged;
                    total.frames += s.frames;
                    total.errors += s.errors;
                    if let Some(e) = s.first_error {
                        total.first_error.get_or_insert(e);
                    }
                }
                Err(e) => total.error(format!("subscriber task failed: {e}")),
            }
        }
        total
    }
}

pub fn bar_style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// Opens `n` subscriber connections, `concurrency` setups at a time;
/// connection i subscribes to the channels `plan(i)`. Returns once every
/// connection has either subscribed or failed.
pub async fn open_all(
    ctx: &Arc<Ctx>,
    n: u32,
    concurrency: u32,
    plan: impl Fn(usize) -> Vec<usize>,
    stop: &watch::Receiver<bool>,
    sampler: &mut Option<ServerSampler>,
) -> Opened {
    let gate = Arc::new(Semaphore::new(concurrency as usize));
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let bar = ProgressBar::new(u64::from(n)).with_style(bar_style(
        "connect [{elapsed_precise}] {bar:40} {pos}/{len} {per_sec} {msg}",
    ));
    let started = Instant::now();
    let handles = (0..n as usize)
        .map(|i| {
            tokio::spawn(subscriber(
                ctx.clone(),
                i,
                plan(i),
                gate.clone(),
                ready_tx.clone(),
                stop.clone(),
            ))
        })
        .collect();
    drop(ready_tx);
    let mut opened = Opened {
        handles,
        connected: Vec::with_capacity(n as usize),
        secs: 0.0,
        setup: new_histogram(),
        errors: 0,
        first_error: None,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            setup = ready.recv() => match setup {
                Some(Setup { index, took: Ok(took) }) => {
                    opened.connected.push(index);
                    opened.setup.saturating_record(took.as_nanos() as u64);
                    bar.inc(1);
                }
                Some(Setup { took: Err(e), .. }) => {
                    opened.errors += 1;
                    if opened.first_error.is_none() {
                        bar.println(format!("connection failed: {e}"));
                        opened.first_error = Some(e);
                    }
                    bar.set_message(format!("{} failed", opened.errors));
                    bar.inc(1);
                }
                None => break,
            },
            _ = tick.tick() => {
                if let Some(s) = sampler.as_mut() {
                    s.sample();
                }
            }
        }
    }
    opened.secs = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    opened
}
