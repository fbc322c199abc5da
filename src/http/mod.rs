//! Plain HTTP on the WebSocket port: the request head (parsed by `httparse`),
//! keep-alive, and the routes `/ws` (upgrade), `/healthz`, `/readyz`,
//! `POST /publish/{channel}`, `/metrics` (to loopback clients, unless
//! `--metrics-addr` moves it), the dashboard at `/` and the browser client
//! at `/client.js`.

mod demo;
pub mod message;
pub mod metrics_endpoint;
pub mod proxy;

use std::net::IpAddr;
use std::rc::Rc;
use std::time::Duration;

use crate::io::Transport;
use crate::socket::Socket;

pub use message::{Head, MalformedHead, Response};

use crate::addresses::AddressRefusal;
use crate::hub::{Authenticated, Shard};
use crate::io::{read_shared, read_some, write_all};
use crate::node::Admission;
use crate::protocol::{validate_channel, Data};
use crate::ws::connection::ConnTask;
use crate::ws::handshake;

/// Largest request head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// How long an idle keep-alive connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub async fn send(
    stream: &mut Transport,
    response: &Response,
    keep_alive: bool,
) -> std::io::Result<()> {
    write_all(stream, &response.encode(keep_alive)).await
}

/// Serves one accepted TCP connection from `peer`: HTTP requests until
/// it upgrades to WebSocket, closes, or idles out; then, if it upgraded,
/// the WebSocket connection, as a task of its own.
///
/// The HTTP phase (about 1.6 KB of nested futures) lives only through the
/// handshake, in a task of its own; the connection then becomes a record of
/// the shard's [connection driver](crate::ws::driver), which is all an idle
/// connection costs beside its hub entry.
pub async fn serve(shard: Rc<Shard>, stream: Socket, peer: IpAddr, admission: Admission) {
    if let Some(connection) = serve_http(shard, stream, peer, admission, None).await {
        crate::ws::driver::adopt(connection);
    }
}

/// Counts the client a trusted proxy named against the per-address limits;
/// the socket holds the count from now on.
fn count_client(
    shard: &Shard,
    admission: &mut Admission,
    client: std::net::IpAddr,
) -> Result<(), AddressRefusal> {
    let addresses = &shard.node.addresses;
    let key = addresses.key(client);
    let second = shard.node.started.elapsed().as_secs();
    addresses.open(key, second).inspect_err(|&refusal| {
        shard.metrics.address_limited(refusal);
    })?;
    admission.hold_address(key);
    Ok(())
}

/// Reads exactly `buf.len()` bytes (never more: what follows belongs to
/// TLS or HTTP).
async fn read_exactly(tcp: &mut Socket, buf: &mut [u8]) -> std::io::Result<()> {
    use tokio::io::AsyncRead;
    let mut filled = 0;
    while filled < buf.len() {
        let n = std::future::poll_fn(|cx| {
            let mut rb = tokio::io::ReadBuf::new(&mut buf[filled..]);
            std::pin::Pin::new(&mut *tcp)
                .poll_read(cx, &mut rb)
                .map_ok(|()| rb.filled().len())
        })
        .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
    }
    Ok(())
}

/// The PROXY protocol v2 header a trusted proxy sends first: the client's
/// address, or `None` for the proxy's own LOCAL connection.
async fn read_proxy_header(
    tcp: &mut Socket,
) -> Result<Option<std::net::SocketAddr>, Box<dyn std::error::Error>> {
    let mut fixed = [0u8; proxy::FIXED];
    read_exactly(tcp, &mut fixed).await?;
    let mut body = vec![0u8; proxy::body_length(&fixed)?];
    read_exactly(tcp, &mut body).await?;
    Ok(proxy::source(&fixed, &body)?)
}

/// TLS handshakes a worker runs at once; beyond, new connections are
/// closed at once (a client without TLS cannot be told anything), so a
/// handshake storm cannot starve the established connections.
const MAX_TLS_HANDSHAKES: u32 = 256;

thread_local! {
    static TLS_HANDSHAKES: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Counts a handshake in progress on this worker while it lives.
struct HandshakeSlot;

impl HandshakeSlot {
    fn take() -> Option<HandshakeSlot> {
        TLS_HANDSHAKES.with(|n| {
            (n.get() < MAX_TLS_HANDSHAKES).then(|| {
                n.set(n.get() + 1);
                HandshakeSlot
            })
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        TLS_HANDSHAKES.with(|n| n.set(n.get() - 1));
    }
}

/// The TLS handshake of a new connection, within `limit`.
async fn tls_handshake(
    shard: &Shard,
    tls: &crate::tls::Tls,
    tcp: Socket,
    limit: Duration,
) -> Option<crate::tls::stream::TlsStream> {
    let Some(_slot) = HandshakeSlot::take() else {
        shard.metrics.tls_handshakes_shed.increment(1);
        return None;
    };
    match monoio::time::timeout(limit, crate::tls::stream::accept(tls.config.clone(), tcp)).await {
        Ok(Ok(stream)) => {
            shard.metrics.tls_handshakes_ok.increment(1);
            Some(stream)
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            shard.metrics.tls_handshakes_failed.increment(1);
            None
        }
        Err(_) => {
            shard.metrics.tls_handshakes_failed.increment(1);
            None
        }
    }
}

/// Why an accepted connection is only told to come back later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnedAway {
    /// Past `--max-connections`: 503.
    Full,
    /// Its address is past a per-address limit: 429.
    Address(AddressRefusal),
}

impl TurnedAway {
    fn response(self) -> Response {
        match self {
            TurnedAway::Full => Response {
                extra: "Retry-After: 5\r\n",
                ..Response::text(503, "this node is full")
            },
            TurnedAway::Address(AddressRefusal::TooMany) => Response {
                extra: "Retry-After: 5\r\n",
                ..Response::text(429, "too many connections from your address")
            },
            TurnedAway::Address(AddressRefusal::TooFast) => Response {
                extra: "Retry-After: 1\r\n",
                ..Response::text(429, "too many new connections from your address")
            },
        }
    }
}

/// Serves a connection turned away: one request, quickly. `/healthz`,
/// `/readyz` and `/metrics` are answered as usual, so probes and scrapes
/// see the node as it is; anything else gets 503 (full) or 429 (its
/// address's limits) with `Retry-After`.
pub async fn serve_turned_away(
    shard: Rc<Shard>,
    stream: Socket,
    peer: IpAddr,
    admission: Admission,
    why: TurnedAway,
) {
    let upgraded = Box::pin(serve_http(shard, stream, peer, admission, Some(why))).await;
    debug_assert!(
        upgraded.is_none(),
        "a connection turned away upgrades nothing"
    );
}

/// How long a connection turned away has to send its request.
const FULL_TIMEOUT: Duration = Duration::from_secs(2);

/// The HTTP phase of a connection; the WebSocket connection when it
/// upgraded (which then holds the socket's count in place of
/// `admission`). `turned_away`: see [`serve_turned_away`].
async fn serve_http(
    shard: Rc<Shard>,
    mut tcp: Socket,
    peer: IpAddr,
    mut admission: Admission,
    mut turned_away: Option<TurnedAway>,
) -> Option<ConnTask> {
    // Behind a trusted proxy, the client's address comes from it: first
    // from its PROXY header, else from the first request's
    // X-Forwarded-For.
    let tcp_peer = peer;
    let mut client_pending = admission.from_proxy() && turned_away.is_none();
    // Who asks, for the routes open to this host only (`/metrics`): behind
    // a trusted proxy, the client it names (in its PROXY header, or in each
    // request's X-Forwarded-For: a proxy's pooled connection carries many
    // clients' requests), never the proxy's own address, which on this
    // host would open them to everyone behind it. A client the proxy does
    // not name is nobody local.
    let nobody = IpAddr::from([0, 0, 0, 0]);
    let named_per_request = admission.from_proxy() && !shard.config.limits.proxy_protocol;
    let mut peer = if admission.from_proxy() { nobody } else { peer };
    if client_pending && shard.config.limits.proxy_protocol {
        let limit = shard.config.limits.handshake_timeout;
        let read = monoio::time::timeout(limit, read_proxy_header(&mut tcp)).await;
        match read {
            Ok(Ok(client)) => {
                client_pending = false;
                // LOCAL (no client): the proxy's own connection, a health
                // check on its host.
                peer = client.map_or(tcp_peer, |c| c.ip());
                if let Some(client) = client {
                    if let Err(refusal) = count_client(&shard, &mut admission, client.ip()) {
                        turned_away = Some(TurnedAway::Address(refusal));
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "a trusted proxy's connection was refused");
                return None;
            }
            Err(_) => return None,
        }
    }
    let mut stream = match &shard.config.tls {
        None => Transport::Plain(tcp),
        Some(tls) => {
            let limit = if turned_away.is_some() {
                FULL_TIMEOUT
            } else {
                shard.config.limits.handshake_timeout
            };
            Transport::Tls(Box::new(tls_handshake(&shard, tls, tcp, limit).await?))
        }
    };
    let mut buf = Vec::new();
    let mut first = true;
    loop {
        let limit = if turned_away.is_some() {
            FULL_TIMEOUT
        } else if first {
            shard.config.limits.handshake_timeout
        } else {
            IDLE_TIMEOUT
        };
        let head = match monoio::time::timeout(limit, read_head(&mut stream, &mut buf)).await {
            Ok(Ok(Some(h))) => h,
            Ok(Ok(None)) | Err(_) => return None,
            Ok(Err(response)) => {
                shard.metrics.http_request("other", response.status);
                refuse(&mut stream, &response).await;
                return None;
            }
        };
        first = false;
        let (head, head_len) = head;
        if std::mem::take(&mut client_pending) {
            let addresses = &shard.node.addresses;
            let forwarded = head.headers_named("x-forwarded-for");
            let client = proxy::forwarded_for(forwarded, |ip| addresses.is_trusted_proxy(ip));
            if let Some(client) = client {
                if let Err(refusal) = count_client(&shard, &mut admission, client) {
                    turned_away = Some(TurnedAway::Address(refusal));
                }
            }
        }
        let asker = if named_per_request {
            let addresses = &shard.node.addresses;
            let forwarded = head.headers_named("x-forwarded-for");
            proxy::forwarded_for(forwarded, |ip| addresses.is_trusted_proxy(ip)).unwrap_or(nobody)
        } else {
            peer
        };
        if let Err(refusal) = check_framing(&head) {
            shard.metrics.http_request(head.route(), refusal.status);
            refuse(&mut stream, &refusal).await;
            return None;
        }
        if let Some(why) = turned_away {
            let probe = matches!(head.route(), "/healthz" | "/readyz" | "/metrics")
                && matches!(head.method.as_str(), "GET" | "HEAD");
            let mut response = if probe {
                route(&shard, &mut stream, asker, &head, &mut buf, head_len)
                    .await
                    .unwrap_or_else(|refusal| refusal)
            } else {
                why.response()
            };
            shard.metrics.http_request(head.route(), response.status);
            response.head_only = head.method == "HEAD";
            refuse(&mut stream, &response).await;
            return None;
        }
        if head.route() == "/ws" && head.header("upgrade").is_some() {
            buf.drain(..head_len);
            let mut connection = upgrade(shard, stream, head, buf).await?;
            connection.hold_address(admission.hand_to_connection());
            return Some(connection);
        }
        let keep_alive = head.keep_alive();
        let mut response = match route(&shard, &mut stream, asker, &head, &mut buf, head_len).await
        {
            Ok(r) => r,
            Err(r) => {
                shard.metrics.http_request(head.route(), r.status);
                refuse(&mut stream, &r).await;
                return None;
            }
        };
        shard.metrics.http_request(head.route(), response.status);
        response.head_only = head.method == "HEAD";
        if send(&mut stream, &response, keep_alive).await.is_err() || !keep_alive {
            return None;
        }
    }
}

/// Answers a `/ws` request with `Upgrade`: the refusal (bad handshake,
/// draining), or the 101 and the WebSocket connection to run, fed what
/// followed the request.
async fn upgrade(
    shard: Rc<Shard>,
    mut stream: Transport,
    head: Head,
    leftover: Vec<u8>,
) -> Option<ConnTask> {
    let up = match handshake::check(&head) {
        Ok(up) => up,
        Err(refusal) => {
            shard.metrics.handshakes_rejected.increment(1);
            shard.metrics.http_request("/ws", refusal.status);
            let mut r = Response::text(refusal.status, refusal.message);
            if refusal.status == 426 {
                r.extra = "Sec-WebSocket-Version: 13\r\n";
            }
            let _ = send(&mut stream, &r, false).await;
            return None;
        }
    };
    if let Err(refusal) = admit_origin(&shard, &head) {
        shard.metrics.handshakes_rejected.increment(1);
        shard.metrics.http_request("/ws", refusal.status);
        let _ = send(&mut stream, &refusal, false).await;
        return None;
    }
    let auth = match authenticate(&shard, &head) {
        Ok(auth) => auth,
        Err(refusal) => {
            shard.metrics.handshakes_rejected.increment(1);
            shard.metrics.http_request("/ws", refusal.status);
            let _ = send(&mut stream, &refusal, false).await;
            return None;
        }
    };
    // Nothing of the request is needed past this point; an idle connection
    // must not keep its headers.
    drop(head);
    if shard.node.is_draining() {
        shard.metrics.handshakes_rejected.increment(1);
        shard.metrics.http_request("/ws", 503);
        let r = Response {
            extra: "Retry-After: 5\r\n",
            ..Response::text(503, "draining: connect to another node")
        };
        let _ = send(&mut stream, &r, false).await;
        return None;
    }
    let format = up.format;
    let response = handshake::response(&up);
    drop(up);
    if write_all(&mut stream, response.as_bytes()).await.is_err() {
        return None;
    }
    drop(response);
    shard.metrics.handshakes_ok.increment(1);
    shard.metrics.http_request("/ws", 101);
    Some(ConnTask::start(shard, stream, format, auth, leftover))
}

/// With --allowed-origins, a browser's handshake from another origin is
/// refused 403 (cross-site WebSocket hijacking); a client that sends no
/// `Origin` is no browser, and passes.
fn admit_origin(shard: &Shard, head: &Head) -> Result<(), Response> {
    let (Some(origins), Some(origin)) = (&shard.config.origins, head.header("origin")) else {
        return Ok(());
    };
    if origins.allows(origin) {
        return Ok(());
    }
    Err(Response::error(
        403,
        "forbidden",
        "this origin may not open WebSockets here",
    ))
}

/// When the relay requires tokens, the handshake's token, verified now;
/// 401 with the reason (and nothing else about the relay) otherwise.
fn authenticate(shard: &Shard, head: &Head) -> Result<Option<Authenticated>, Response> {
    let Some(verifier) = &shard.config.verifier else {
        return Ok(None);
    };
    let unauthorized = |e: crate::auth::AuthError| Response {
        extra: "WWW-Authenticate: Bearer\r\n",
        ..Response::error(401, "unauthorized", &e.to_string())
    };
    let token = crate::auth::token_of(&head.path, head.header("authorization"))
        .ok_or(crate::auth::AuthError::Missing)
        .map_err(unauthorized)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let grant = verifier.verify(&token, now).map_err(unauthorized)?;
    let revocations = &shard.node.revocations;
    if revocations.is_revoked(grant.sub.as_deref(), grant.jti.as_deref(), now) {
        return Err(unauthorized(crate::auth::AuthError::Revoked));
    }
    let expires_in = grant.exp.saturating_sub(now);
    Ok(Some(Authenticated { grant, expires_in }))
}

/// How long, and how many bytes, a refused client's remaining input is
/// read and dropped before the connection closes.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 256 * 1024;

/// Sends an error answer that ends the connection, then stops sending and
/// reads what the client still sends (bounded in time and bytes): closing
/// a socket with unread input resets the connection, and a reset can
/// discard the answer before the client reads it (a 431 for a head sent in
/// one piece, say).
async fn refuse(stream: &mut Transport, response: &Response) {
    if send(stream, response, false).await.is_err() {
        return;
    }
    let _ = std::future::poll_fn(|cx| {
        use tokio::io::AsyncWrite;
        std::pin::Pin::new(&mut *stream).poll_shutdown(cx)
    })
    .await;
    let _ = monoio::time::timeout(LINGER_TIME, async {
        let mut left = LINGER_BYTES;
        while left > 0 {
            match read_shared(stream, |bytes| bytes.len()).await {
                Some(n) => left = left.saturating_sub(n),
                None => break,
            }
        }
    })
    .await;
}

/// What a parse of the `available` bytes received so far means: the head
/// and its length, `Ok(None)` to read more, or the answer refusing it.
fn judge_head(
    parsed: Result<Option<(Head, usize)>, MalformedHead>,
    available: usize,
) -> Result<Option<(Head, usize)>, Response> {
    match parsed {
        Ok(Some((_, len))) if len > MAX_HEAD => Err(Response::text(431, "request head too large")),
        Ok(Some(h)) => Ok(Some(h)),
        Ok(None) if available >= MAX_HEAD => Err(Response::text(431, "request head too large")),
        Ok(None) => Ok(None),
        Err(e) => Err(Response::text(400, &e.to_string())),
    }
}

/// Reads until a full head is buffered. `Ok(None)`: the peer left first.
/// The head's length counts the bytes it took at the start of `buf`; it is
/// 0 when the head arrived whole in one read into the worker's shared
/// buffer (the usual case), and `buf` then holds only what followed it, so
/// a WebSocket client costs no request buffer of its own.
async fn read_head(
    stream: &mut Transport,
    buf: &mut Vec<u8>,
) -> Result<Option<(Head, usize)>, Response> {
    loop {
        if buf.is_empty() {
            let read = read_shared(stream, |bytes| {
                let judged = judge_head(Head::parse(bytes), bytes.len())?;
                // Kept: what follows a head, or a head still incomplete.
                let used = judged.as_ref().map_or(0, |(_, len)| *len);
                buf.extend_from_slice(&bytes[used..]);
                Ok(judged.map(|(head, _)| head))
            })
            .await;
            match read {
                Some(Ok(Some(head))) => return Ok(Some((head, 0))),
                Some(Ok(None)) => continue,
                Some(Err(response)) => return Err(response),
                None => return Ok(None),
            }
        }
        if let Some(head) = judge_head(Head::parse(buf), buf.len())? {
            return Ok(Some(head));
        }
        match read_some(stream, buf, 4096).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// Answers a plain HTTP request. `Err` responses close the connection.
async fn route(
    shard: &Rc<Shard>,
    stream: &mut Transport,
    peer: IpAddr,
    head: &Head,
    buf: &mut Vec<u8>,
    head_len: usize,
) -> Result<Response, Response> {
    let path = head.route();
    let get = head.method == "GET" || head.method == "HEAD";
    if let Some(channel) = path.strip_prefix("/publish/") {
        if head.method != "POST" {
            return Err(Response::error(405, "bad_request", "use POST to publish"));
        }
        check_publish_key(shard, head)?;
        let body = read_body(shard, stream, head, buf, head_len).await?;
        return Ok(publish(shard, head, channel, &body).await);
    }
    if path == "/revoke" {
        if head.method != "POST" {
            return Err(Response::error(405, "bad_request", "use POST to revoke"));
        }
        if shard.config.access.publish_key.is_none() {
            return Err(Response::error(
                403,
                "forbidden",
                "POST /revoke needs the operator key: start the relay with --publish-key",
            ));
        }
        check_publish_key(shard, head)?;
        let body = read_body(shard, stream, head, buf, head_len).await?;
        return Ok(revoke(shard, &body));
    }
    if content_length(head)?.unwrap_or(0) != 0 || head.header("transfer-encoding").is_some() {
        return Err(Response::text(400, "this route takes no request body"));
    }
    buf.drain(..head_len);
    Ok(match path {
        "/healthz" if get => Response::text(200, "ok"),
        "/readyz" if get => {
            if shard.node.is_draining() {
                Response::text(503, "draining")
            } else if shard.node.sockets() >= shard.config.limits.max_connections {
                Response::text(503, "full")
            } else if !shard.node.backplane_ready() {
                Response::text(503, "backplane unavailable")
            } else {
                Response::text(200, "ready")
            }
        }
        "/metrics" if get && shard.config.server.metrics_addr.is_none() && is_local(peer) => {
            metrics_endpoint::scrape()
        }
        "/" if get => Response {
            status: 200,
            content_type: "text/html; charset=utf-8",
            body: demo::PAGE.as_bytes().to_vec(),
            extra: "",
            head_only: false,
        },
        "/client.js" if get => Response {
            status: 200,
            content_type: "text/javascript; charset=utf-8",
            body: demo::CLIENT_JS.as_bytes().to_vec(),
            // Pages may load it from any origin, as they load the WebSocket.
            extra: "Access-Control-Allow-Origin: *\r\nCache-Control: no-cache\r\n",
            head_only: false,
        },
        "/nodes" if get => {
            let own = shard.node.own_entry(shard.config.limits.max_connections);
            Response {
                status: 200,
                content_type: "application/json",
                body: crate::directory::listing_json(&shard.node.directory.listing(own))
                    .into_bytes(),
                // Public, like the nodes it names: pages on any origin
                // may read it to pick a node.
                extra: "Access-Control-Allow-Origin: *\r\nCache-Control: no-store\r\n",
                head_only: false,
            }
        }
        "/ws" => Response::text(
            426,
            "this endpoint speaks WebSocket only: send Upgrade: websocket",
        ),
        "/healthz" | "/readyz" | "/" | "/nodes" => Response::text(405, "method not allowed"),
        _ => Response::text(404, "not found"),
    })
}

/// Reads a `Content-Length` body (bounded by `--max-message-bytes`).
async fn read_body(
    shard: &Shard,
    stream: &mut Transport,
    head: &Head,
    buf: &mut Vec<u8>,
    head_len: usize,
) -> Result<Vec<u8>, Response> {
    if head.header("transfer-encoding").is_some() {
        return Err(Response::error(
            411,
            "bad_request",
            "send the body with Content-Length",
        ));
    }
    let Some(len) = content_length(head)? else {
        return Err(Response::error(
            411,
            "bad_request",
            "Content-Length is required",
        ));
    };
    if len > shard.config.limits.max_message_bytes {
        return Err(Response::error(
            413,
            "too_large",
            &format!(
                "body exceeds {} bytes",
                shard.config.limits.max_message_bytes
            ),
        ));
    }
    if head
        .header("expect")
        .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
        && buf.len() < head_len + len
    {
        write_all(stream, b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .map_err(|_| Response::text(400, "connection lost"))?;
    }
    // One deadline for the whole body: a body trickled a byte at a time
    // must not hold the connection for minutes.
    let read_all = async {
        while buf.len() < head_len + len {
            match read_some(stream, buf, len.min(64 * 1024)).await {
                Ok(n) if n > 0 => {}
                _ => return false,
            }
        }
        true
    };
    match monoio::time::timeout(shard.config.limits.handshake_timeout, read_all).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(Response::error(
                400,
                "bad_request",
                "body shorter than Content-Length",
            ))
        }
        Err(_) => {
            return Err(Response::error(
                408,
                "bad_request",
                "the body did not arrive within --handshake-timeout",
            ))
        }
    }
    let body = buf[head_len..head_len + len].to_vec();
    buf.drain(..head_len + len);
    Ok(body)
}

/// Refuses a publish whose API key is missing or wrong, before its body
/// is read: an unauthenticated client gets no buffer and no wait.
fn check_publish_key(shard: &Shard, head: &Head) -> Result<(), Response> {
    let Some(key) = &shard.config.access.publish_key else {
        return Ok(());
    };
    let given = head.header("authorization").and_then(bearer_token);
    if given.is_some_and(|given| same_secret(given, key)) {
        return Ok(());
    }
    Err(Response {
        extra: "WWW-Authenticate: Bearer\r\n",
        ..Response::error(401, "forbidden", "missing or wrong API key")
    })
}

/// How long a revocation holds when the request names no `until`: longer
/// than tokens are usually issued for.
const DEFAULT_REVOCATION: u64 = 24 * 3600;
/// The longest a revocation may be asked to hold.
const MAX_REVOCATION: u64 = 366 * 24 * 3600;

/// `POST /revoke` with `{"sub": ...}` or `{"jti": ...}`, and optionally
/// `"until"` (Unix seconds; by default a day from now): every node closes
/// the matching connections with 4003 and refuses their tokens until then.
fn revoke(shard: &Shard, body: &[u8]) -> Response {
    #[derive(serde::Deserialize)]
    struct Request {
        sub: Option<String>,
        jti: Option<String>,
        until: Option<u64>,
    }
    let request: Request = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return Response::error(400, "bad_request", &format!("invalid JSON: {e}")),
    };
    let what = match (request.sub, request.jti) {
        (Some(sub), None) if !sub.is_empty() => crate::auth::Revoked::Sub(sub),
        (None, Some(jti)) if !jti.is_empty() => crate::auth::Revoked::Jti(jti),
        _ => {
            return Response::error(
                400,
                "bad_request",
                "give exactly one of `sub` and `jti`, not empty",
            )
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let until = request.until.unwrap_or(now + DEFAULT_REVOCATION);
    if until <= now {
        return Response::error(400, "bad_request", "`until` is in the past");
    }
    if until > now + MAX_REVOCATION {
        return Response::error(
            400,
            "bad_request",
            "`until` is more than a year away: no token should live that long",
        );
    }
    shard.revoke(what.clone(), until);
    let body = serde_json::json!({"revoked": what.encode(), "until": until});
    Response {
        status: 202,
        content_type: "application/json",
        body: body.to_string().into_bytes(),
        extra: "",
        head_only: false,
    }
}

async fn publish(shard: &Rc<Shard>, head: &Head, raw_channel: &str, body: &[u8]) -> Response {
    let channel = match percent_encoding::percent_decode_str(raw_channel).decode_utf8() {
        Ok(c) => c.into_owned(),
        Err(_) => return Response::error(400, "bad_channel", "channel name is not UTF-8"),
    };
    if let Err(why) = validate_channel(&channel) {
        return Response::error(400, "bad_channel", why);
    }
    let key = match publication_key(&head.path) {
        Ok(key) => key,
        Err(why) => return Response::error(400, "bad_request", why),
    };
    let content_type = head.header("content-type").unwrap_or("application/json");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let data = match mime.as_str() {
        "application/json" | "text/json" => Data::from_json_slice(body),
        "application/msgpack" | "application/x-msgpack" | "application/vnd.msgpack" => {
            Data::from_msgpack_slice(body)
        }
        _ => {
            let shown: String = mime.chars().take(64).collect();
            return Response {
                extra: "Accept-Post: application/json, application/msgpack\r\n",
                ..Response::error(
                    415,
                    "bad_request",
                    &format!(
                        "Content-Type {shown} is not accepted: send application/json or \
                         application/msgpack (with curl: -H 'Content-Type: application/json')"
                    ),
                )
            };
        }
    };
    let data = match data {
        Ok(d) => d,
        Err(e) => return Response::error(400, "bad_request", &e.to_string()),
    };
    let Some(seq) = shard
        .publish_http(&channel, key, data, std::time::Instant::now())
        .seq()
        .await
    else {
        return Response {
            extra: "Retry-After: 1\r\n",
            ..Response::error(503, "unavailable", "the backplane is down; retry")
        };
    };
    Response {
        status: 202,
        content_type: "application/json",
        body: serde_json::to_vec(&serde_json::json!({"channel": channel, "seq": seq}))
            .unwrap_or_default(),
        extra: "",
        head_only: false,
    }
}

/// The `key` of `?key=K` in a publish's request target (percent-encoded),
/// if it names one.
fn publication_key(target: &str) -> Result<Option<std::sync::Arc<str>>, &'static str> {
    let Some((_, query)) = target.split_once('?') else {
        return Ok(None);
    };
    let Some(raw) = query.split('&').find_map(|pair| pair.strip_prefix("key=")) else {
        return Ok(None);
    };
    let key = percent_encoding::percent_decode_str(&raw.replace('+', " "))
        .decode_utf8()
        .map_err(|_| "key is not UTF-8")?
        .into_owned();
    crate::protocol::validate_key(&key)?;
    Ok(Some(key.into()))
}

/// True for a client on this host: loopback, IPv4 or IPv6 (also written
/// as an IPv4-mapped IPv6 address).
fn is_local(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// The credentials of an `Authorization: Bearer ...` header (the scheme
/// is case-insensitive, RFC 9110 section 11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Compares a presented secret with the configured one in time that does
/// not depend on where they differ (only on their lengths).
fn same_secret(given: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// Refuses heads whose message framing is ambiguous (RFC 9112 sections 3.2
/// and 6.3): an HTTP/1.1 request without exactly one `Host`, a malformed
/// or conflicting `Content-Length`, or `Content-Length` beside
/// `Transfer-Encoding`. Accepting them lets a front proxy and the relay
/// disagree on where a request ends (request smuggling).
fn check_framing(head: &Head) -> Result<(), Response> {
    let hosts = head.headers_named("host").count();
    if head.http11 && hosts != 1 {
        return Err(Response::text(
            400,
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    if content_length(head)?.is_some() && head.header("transfer-encoding").is_some() {
        return Err(Response::text(
            400,
            "Content-Length and Transfer-Encoding must not both be sent",
        ));
    }
    Ok(())
}

/// The request's `Content-Length`: digits only, and one value however many
/// times it is repeated; anything else is refused.
fn content_length(head: &Head) -> Result<Option<usize>, Response> {
    let mut length = None;
    for field in head.headers_named("content-length") {
        for value in field.split(',').map(str::trim) {
            let parsed = (!value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()))
                .then(|| value.parse::<usize>().ok())
                .flatten();
            let Some(parsed) = parsed else {
                return Err(Response::error(
                    400,
                    "bad_request",
                    "invalid Content-Length: it must be a decimal number of bytes",
                ));
            };
            if length.is_some_and(|l| l != parsed) {
                return Err(Response::error(
                    400,
                    "bad_request",
                    "conflicting Content-Length headers",
                ));
            }
            length = Some(parsed);
        }
    }
    Ok(length)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        Head::parse(text.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn content_length_is_digits_and_one_value() {
        let cl = |h: &str| content_length(&head(&format!("POST / HTTP/1.1\r\nHost: x\r\n{h}\r\n")));
        assert_eq!(cl("").ok().flatten(), None);
        assert_eq!(cl("Content-Length: 12\r\n").ok().flatten(), Some(12));
        assert_eq!(
            cl("Content-Length: 3\r\nContent-Length: 3\r\n")
                .ok()
                .flatten(),
            Some(3)
        );
        assert_eq!(cl("Content-Length: 3, 3\r\n").ok().flatten(), Some(3));
        for bad in [
            "+2",
            "-1",
            "1 2",
            "0x10",
            "",
            "3, 4",
            "99999999999999999999999",
        ] {
            assert!(
                cl(&format!("Content-Length: {bad}\r\n")).is_err(),
                "{bad:?}"
            );
        }
        assert!(cl("Content-Length: 2\r\nContent-Length: 5\r\n").is_err());
    }

    #[test]
    fn only_loopback_clients_are_local() {
        for local in ["127.0.0.1", "127.9.8.7", "::1", "::ffff:127.0.0.1"] {
            assert!(is_local(local.parse().unwrap()), "{local}");
        }
        for remote in [
            "10.0.0.1",
            "192.168.1.2",
            "::ffff:10.0.0.1",
            "2001:db8::1",
            "0.0.0.0",
        ] {
            assert!(!is_local(remote.parse().unwrap()), "{remote}");
        }
    }

    #[test]
    fn framing_needs_one_host_on_http11() {
        assert!(check_framing(&head("GET / HTTP/1.1\r\n\r\n")).is_err());
        assert!(check_framing(&head("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")).is_err());
        assert!(check_framing(&head("GET / HTTP/1.0\r\n\r\n")).is_ok());
        assert!(check_framing(&head(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ))
        .is_err());
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_and_secrets_compare_whole() {
        assert_eq!(bearer_token("Bearer k"), Some("k"));
        assert_eq!(bearer_token("bearer  k "), Some("k"));
        assert_eq!(bearer_token("BEARER k"), Some("k"));
        assert_eq!(bearer_token("Basic k"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3cre", "s3cret"));
        assert!(!same_secret("s3cret!", "s3cret"));
        assert!(!same_secret("S3cret", "s3cret"));
    }
}
