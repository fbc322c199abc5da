//! Test support: starts the real `ringcast` binary on free loopback ports
//! and talks to it like users do — tokio-tungstenite clients, raw TCP bytes
//! for HTTP and for malformed WebSocket traffic.
#![allow(dead_code)]

pub mod redis;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Bound on any single wait, so a broken relay fails the test instead of
/// hanging it. Tests never rely on it to pass.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub struct Relay {
    child: Child,
    /// The relay's stderr, line by line, once a test waits on it.
    log_lines: Option<std::sync::mpsc::Receiver<String>>,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub workers: usize,
}

impl Relay {
    /// Starts the relay with `args` on free loopback ports. WebSocket
    /// clients may publish (most tests publish from one) unless `args` say
    /// `--allow-client-publish false`; [`Relay::start_as_shipped`] keeps
    /// the default.
    pub fn start(args: &[&str]) -> Relay {
        Relay::start_logging(args, "warn", Stdio::inherit())
    }

    /// Starts the relay with `args` and every other option at its default.
    pub fn start_as_shipped(args: &[&str]) -> Relay {
        Relay::spawn_with(args, "warn", Stdio::inherit(), None, false)
    }

    /// Starts the relay logging at `level` to `stderr`.
    pub fn start_logging(args: &[&str], level: &str, stderr: Stdio) -> Relay {
        Relay::spawn(args, level, stderr, None)
    }

    /// Starts the relay with an open-file limit of `files` (soft and hard),
    /// logging warnings to `stderr`.
    pub fn start_with_file_limit(args: &[&str], files: u64, stderr: Stdio) -> Relay {
        Relay::spawn(args, "warn", stderr, Some(files))
    }

    fn spawn(args: &[&str], level: &str, stderr: Stdio, files: Option<u64>) -> Relay {
        Relay::spawn_with(args, level, stderr, files, true)
    }

    fn spawn_with(
        args: &[&str],
        level: &str,
        stderr: Stdio,
        files: Option<u64>,
        client_publish: bool,
    ) -> Relay {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringcast"));
        command.args(["--listen", "127.0.0.1:0", "--log", level]);
        if client_publish {
            command.arg("--allow-client-publish=true");
        }
        command.args(args).stdout(Stdio::piped()).stderr(stderr);
        if let Some(files) = files {
            let limit = libc::rlimit {
                rlim_cur: files,
                rlim_max: files,
            };
            // SAFETY: setrlimit is async-signal-safe and touches only the child.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = command.spawn().expect("starting the ringcast binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("reading the relay's first line");
        let field = |name: &str| -> String {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")).map(str::to_string))
                .unwrap_or_else(|| panic!("relay did not print {name}=: {line:?}"))
        };
        Relay {
            log_lines: None,
            addr: field("addr").parse().unwrap(),
            metrics: field("metrics").parse().unwrap(),
            workers: field("workers").parse().unwrap(),
            child,
        }
    }

    /// Waits until `/readyz` answers `status` (the backplane came up or went
    /// down; this only absorbs how long that takes).
    pub async fn wait_readyz(&self, status: u16) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let (got, _) = http(
                self.addr,
                "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            if got == status {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "/readyz stuck at {got}, expected {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Closes the reading end of a piped stderr: every later log line the
    /// relay writes meets EPIPE.
    pub fn close_stderr(&mut self) {
        drop(self.child.stderr.take().expect("stderr was piped"));
    }

    /// Reads the relay's piped stderr until a line contains `needle`, then
    /// keeps emptying the pipe in the background so the relay never blocks
    /// on it.
    pub fn wait_log(&mut self, needle: &str) -> String {
        if self.log_lines.is_none() {
            let stderr = self.child.stderr.take().expect("stderr was piped");
            let (lines, rx) = std::sync::mpsc::channel();
            // Read to the end, so the relay never blocks on a full pipe.
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    let _ = lines.send(line);
                }
            });
            self.log_lines = Some(rx);
        }
        let lines = self.log_lines.as_ref().expect("set above");
        loop {
            match lines.recv_timeout(PATIENCE) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no log line containing {needle:?}: {e}"),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the pid of a child this test started.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits for the relay to exit (bounded by PATIENCE).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = std::time::Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "relay did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident set size of the relay, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        let (status, body) = http(
            self.metrics,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(status, 200);
        body
    }

    /// The sum of every sample of `name` whose labels contain all of `labels`.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter(|l| labels.iter().all(|lab| l.contains(lab)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until `f` holds for the metric (the value is updated as events
    /// happen; this only absorbs scheduling).
    pub async fn wait_metric(&self, name: &str, labels: &[&str], f: impl Fn(f64) -> bool) -> f64 {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let v = self.metric(name, labels).await;
            if f(v) {
                return v;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "metric {name}{labels:?} stuck at {v}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One raw HTTP/1.1 exchange (the request must ask for nothing fancy);
/// returns the status and the body.
pub async fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let (status, _, body) = http_full(addr, request.as_bytes()).await;
    (status, body)
}

pub async fn http_full(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(PATIENCE, s.read(&mut chunk))
            .await
            .expect("HTTP response")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(end) = text.find("\r\n\r\n") {
            let head = &text[..end];
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// `POST /publish/{channel}` with a JSON body; returns status and body.
pub async fn http_publish(
    addr: SocketAddr,
    channel: &str,
    body: &str,
    extra_headers: &str,
) -> (u16, String) {
    let req = format!(
        "POST /publish/{channel} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra_headers}\r\n{body}",
        body.len()
    );
    http(addr, &req).await
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Fmt {
    Json,
    MsgPack,
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub fmt: Fmt,
    /// Events received but not yet taken.
    pending: std::collections::VecDeque<Value>,
    /// Frames that held an array (a batch).
    pub batch_frames: usize,
}

impl Client {
    pub async fn connect(relay: &Relay, fmt: Fmt) -> Client {
        Client::try_connect(relay, fmt)
            .await
            .expect("WebSocket handshake")
    }

    /// Connects once a node that was full has noticed a connection leave
    /// (a socket counts until the relay has closed it): retries while the
    /// answer is 503.
    pub async fn connect_when_admitted(relay: &Relay, fmt: Fmt) -> Client {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match Client::try_connect(relay, fmt).await {
                Ok(client) => return client,
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503 => {
                    assert!(tokio::time::Instant::now() < deadline, "still full");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("WebSocket handshake: {e}"),
            }
        }
    }

    async fn try_connect(
        relay: &Relay,
        fmt: Fmt,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        Client::connect_with(&relay.url(), &[], fmt).await
    }

    /// Connects to `url` (the relay's, with a query, say) sending `headers`
    /// beside the handshake's own.
    pub async fn connect_with(
        url: &str,
        headers: &[(&'static str, &str)],
        fmt: Fmt,
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut req = url.into_client_request().unwrap();
        for (name, value) in headers {
            req.headers_mut().insert(*name, value.parse().unwrap());
        }
        let proto = match fmt {
            Fmt::Json => "ringcast.v1.json",
            Fmt::MsgPack => "ringcast.v1.msgpack",
        };
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", proto.parse().unwrap());
        let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
        assert_eq!(resp.headers().get("sec-websocket-protocol").unwrap(), proto);
        Ok(Client {
            ws,
            fmt,
            pending: Default::default(),
            batch_frames: 0,
        })
    }

    /// Sends one request (or an array of them) in this client's format.
    pub async fn send(&mut self, v: Value) {
        let msg = match self.fmt {
            Fmt::Json => Message::text(v.to_string()),
            Fmt::MsgPack => Message::binary(rmp_serde::to_vec_named(&v).unwrap()),
        };
        self.ws.send(msg).await.unwrap();
    }

    pub async fn subscribe(&mut self, channel: &str) -> Value {
        self.send(json!({"action": "subscribe", "channel": channel, "id": channel}))
            .await;
        self.expect_type("subscribed").await
    }

    /// The next event, whether it came alone or in a batch.
    pub async fn next(&mut self) -> Value {
        self.try_next()
            .await
            .expect("connection ended while waiting for an event")
    }

    pub async fn try_next(&mut self) -> Option<Value> {
        loop {
            if let Some(v) = self.pending.pop_front() {
                return Some(v);
            }
            let msg = tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("timed out waiting for an event")?;
            let v: Value = match msg.ok()? {
                Message::Text(t) => {
                    assert_eq!(
                        self.fmt,
                        Fmt::Json,
                        "text frame on a MessagePack connection"
                    );
                    serde_json::from_str(&t).unwrap()
                }
                Message::Binary(b) => {
                    assert_eq!(self.fmt, Fmt::MsgPack, "binary frame on a JSON connection");
                    msgpack_to_json(rmpv::decode::read_value(&mut &b[..]).unwrap())
                }
                Message::Close(_) => return None,
                _ => continue,
            };
            match v {
                Value::Array(items) => {
                    self.batch_frames += 1;
                    self.pending.extend(items)
                }
                other => self.pending.push_back(other),
            }
        }
    }

    pub async fn expect_type(&mut self, ty: &str) -> Value {
        let v = self.next().await;
        assert_eq!(v["type"], ty, "expected a {ty} event, got {v}");
        v
    }

    /// The next event must be an `error` with `code` naming request `id`.
    pub async fn expect_error(&mut self, code: &str, id: i64) -> Value {
        let e = self.expect_type("error").await;
        assert_eq!(
            (e["code"].as_str(), e["id"].as_i64()),
            (Some(code), Some(id)),
            "{e}"
        );
        e
    }

    /// Reads until the server closes; returns the close code.
    pub async fn close_code(&mut self) -> Option<u16> {
        self.close_frame().await.map(|(code, _)| code)
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn close_frame(&mut self) -> Option<(u16, String)> {
        loop {
            match tokio::time::timeout(PATIENCE, self.ws.next())
                .await
                .expect("timed out waiting for close")
            {
                Some(Ok(Message::Close(frame))) => {
                    return frame.map(|f| (f.code.into(), f.reason.to_string()))
                }
                Some(Ok(_)) => continue,
                _ => return None,
            }
        }
    }
}

/// A raw WebSocket connection after a valid handshake, for sending frames
/// no well-behaved client library would.
pub async fn raw_ws(relay: &Relay) -> TcpStream {
    let mut s = TcpStream::connect(relay.addr).await.unwrap();
    upgrade(&mut s).await;
    s
}

/// The WebSocket handshake on a stream of the caller's (a TLS one, a
/// socket with options of its own), checked: a 101 with the right accept.
pub async fn upgrade<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
}

/// A client frame; `mask: None` sends it unmasked (a violation).
pub fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n if n < 65536 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

pub const MASK: Option<[u8; 4]> = Some([1, 2, 3, 4]);

/// Reads raw server frames until a close frame; returns its status code.
pub async fn raw_close_code(s: &mut TcpStream) -> Option<u16> {
    loop {
        let mut h = [0u8; 2];
        tokio::time::timeout(PATIENCE, s.read_exact(&mut h))
            .await
            .expect("timed out")
            .ok()?;
        let mut len = (h[1] & 0x7f) as usize;
        if len == 126 {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.ok()?;
            len = u16::from_be_bytes(b) as usize;
        } else if len == 127 {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.ok()?;
            len = u64::from_be_bytes(b) as usize;
        }
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).await.ok()?;
        if h[0] & 0x0f == 0x8 {
            return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
    }
}

/// A MessagePack value as JSON, binary shown as `{"$bin": base64}` so tests
/// can tell it from a string.
pub fn msgpack_to_json(v: rmpv::Value) -> Value {
    use base64::Engine;
    match v {
        rmpv::Value::Binary(b) => {
            json!({"$bin": base64::engine::general_purpose::STANDARD.encode(b)})
        }
        rmpv::Value::Array(items) => Value::Array(items.into_iter().map(msgpack_to_json).collect()),
        rmpv::Value::Map(entries) => Value::Object(
            entries
                .into_iter()
                .map(|(k, v)| {
                    (
                        k.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| k.to_string()),
                        msgpack_to_json(v),
                    )
                })
                .collect(),
        ),
        other => serde_json::to_value(&other).unwrap(),
    }
}

/// Sends, `rounds` times, one frame whose requests mix subscribes and
/// publishes answered later (by another shard or the backplane) with
/// requests answered at once and failing ones; every request must be
/// answered, in request order, in both formats.
pub async fn array_requests_are_answered_in_order(relay: &Relay, rounds: usize, label: &str) {
    for round in 0..rounds {
        let fmt = if round % 2 == 0 {
            Fmt::Json
        } else {
            Fmt::MsgPack
        };
        let mut c = Client::connect(relay, fmt).await;
        // Fresh names each round, so their owners vary between the shards.
        let tag = label.replace(' ', "-");
        let (a, b, d) = (
            format!("{tag}.a{round}"),
            format!("{tag}.b{round}"),
            format!("{tag}.d{round}"),
        );
        let batch = json!([
            {"action": "subscribe", "channel": a, "id": "s"},
            {"action": "publish", "channel": a, "data": 1, "id": 2},
            {"action": "publish", "channel": a, "data": 2, "id": 3},
            {"action": "subscribe", "channel": b, "id": 4},
            {"action": "unsubscribe", "channel": b, "id": 5},
            {"action": "subscribe", "channel": "not valid", "id": 6},
            {"action": "subscribe", "channel": d, "id": 7, "since": 0},
            {"action": "publish", "channel": d, "id": 8},
            {"action": "unsubscribe", "channel": a, "id": 9},
            {"action": "publish", "channel": b, "data": 3, "id": 10},
        ]);
        c.send(batch).await;
        let expected = [
            ("s", "subscribed"),
            ("2", "published"),
            ("3", "published"),
            ("4", "subscribed"),
            ("5", "unsubscribed"),
            ("6", "error"),
            ("7", "subscribed"),
            ("8", "error"),
            ("9", "unsubscribed"),
            ("10", "published"),
        ];
        let mut replies = Vec::new();
        let mut messages = Vec::new();
        while replies.len() < expected.len() {
            let ev = c.next().await;
            if ev["type"] == "message" {
                assert!(
                    replies.first().is_some_and(|(id, _)| id == "s"),
                    "round {round}: a message of {a} before its subscribed: {ev}"
                );
                messages.push(ev["seq"].as_u64().unwrap());
                continue;
            }
            let id = match &ev["id"] {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            replies.push((id, ev["type"].as_str().unwrap().to_string()));
        }
        let got: Vec<(&str, &str)> = replies.iter().map(|(i, t)| (&i[..], &t[..])).collect();
        assert_eq!(got, expected, "round {round} ({fmt:?}, {label})");
        // The unsubscribe from `a` takes effect where the connection is,
        // possibly before the owner's deliveries arrive: some, all or none
        // of its messages come, in seq order.
        assert!(messages.windows(2).all(|w| w[0] < w[1]) && messages.iter().all(|s| *s <= 2));
    }
}

/// A self-signed certificate for `localhost`, 127.0.0.1 and `name`,
/// written to `dir` as cert.pem and key.pem; returns its DER for clients
/// to trust.
pub fn self_signed_certificate(
    dir: &std::path::Path,
    name: &str,
) -> rustls::pki_types::CertificateDer<'static> {
    let made = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        name.to_string(),
    ])
    .unwrap();
    std::fs::write(dir.join("cert.pem"), made.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), made.key_pair.serialize_pem()).unwrap();
    made.cert.der().clone()
}

/// A certificate authority made for one test, issuing certificates into
/// its directory.
pub struct TestCa {
    pub dir: std::path::PathBuf,
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl TestCa {
    /// A new CA; its certificate is written to `dir/{name}.pem`.
    pub fn new(dir: &std::path::Path, name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("ringcast test CA {name}"),
        );
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        TestCa {
            dir: dir.to_path_buf(),
            cert,
            key,
        }
    }

    /// A certificate for `names` (DNS names or IP addresses) signed by this
    /// CA, written to `{stem}.pem` and `{stem}-key.pem`; returns both paths.
    pub fn issue(&self, stem: &str, names: &[&str]) -> (String, String) {
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let cert_path = self.dir.join(format!("{stem}.pem"));
        let key_path = self.dir.join(format!("{stem}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (
            cert_path.to_string_lossy().into_owned(),
            key_path.to_string_lossy().into_owned(),
        )
    }
}

/// The Python of the clients ringcast did not write (tests/outside), which
/// tests/run installs into target/outside-venv.
pub fn outside_python() -> std::path::PathBuf {
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/outside-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run tests/run, which installs the Python clients \
         (tests/outside/requirements.txt)",
        python.display()
    );
    python
}
