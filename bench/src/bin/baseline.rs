//! `baseline`: the broadcast server written the usual way, which ringcast is
//! measured against. One tokio task per connection, one
//! `tokio::sync::broadcast` channel per pub/sub channel, and every subscriber
//! serializing each message itself. It speaks the JSON half of ringcast.v1
//! (subscribe, publish, single or batched requests) and nothing more.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use clap::Parser;
use futures_util::stream::{self, SelectAll, Stream};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{
    header::SEC_WEBSOCKET_PROTOCOL, HeaderValue, StatusCode,
};
use tokio_tungstenite::tungstenite::Message;

const SUBPROTOCOL: &str = "ringcast.v1.json";

#[derive(Parser)]
#[command(about = "Minimal tokio + tungstenite broadcast server (the comparison baseline)")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Runtime worker threads; defaults to the number of cores.
    #[arg(long)]
    threads: Option<usize>,
}

struct Msg {
    channel: String,
    seq: u64,
    data: Value,
}

struct Channel {
    tx: broadcast::Sender<Arc<Msg>>,
    seq: u64,
}

#[derive(Default)]
struct State {
    channels: Mutex<HashMap<String, Channel>>,
}

#[derive(Deserialize)]
struct Req {
    action: String,
    channel: Option<String>,
    id: Option<Value>,
    data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Frame {
    Many(Vec<Req>),
    One(Req),
}

#[derive(Serialize)]
struct Event<'a> {
    r#type: &'static str,
    channel: &'a str,
    seq: u64,
    data: &'a Value,
}

type Feed = Pin<Box<dyn Stream<Item = Arc<Msg>> + Send>>;

fn main() -> Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        runtime.worker_threads(n);
    }
    runtime.enable_all().build()?.block_on(serve(args.listen))
}

async fn serve(addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).await?;
    println!("baseline listening on {}", listener.local_addr()?);
    let state = Arc::new(State::default());
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, state).await {
                        eprintln!("connection: {e}");
                    }
                });
            }
            // Out of file descriptors: back off instead of spinning or dying.
            Err(e) => {
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Echoes our subprotocol when offered; a client offering only others gets 400.
// The signature is tungstenite's handshake callback; the large error is its type.
#[allow(clippy::result_large_err)]
fn negotiate(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    let Some(offered) = req.headers().get(SEC_WEBSOCKET_PROTOCOL) else {
        return Ok(resp);
    };
    let offered = offered.to_str().unwrap_or_default();
    if offered.split(',').any(|p| p.trim() == SUBPROTOCOL) {
        let value = HeaderValue::from_static(SUBPROTOCOL);
        resp.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, value);
        return Ok(resp);
    }
    let mut refusal = ErrorResponse::new(Some("unsupported subprotocol".into()));
    *refusal.status_mut() = StatusCode::BAD_REQUEST;
    Err(refusal)
}

async fn connection(stream: TcpStream, state: Arc<State>) -> Result<()> {
    stream.set_nodelay(true)?;
    let mut ws = tokio_tungstenite::accept_hdr_async(stream, negotiate).await?;
    let mut feeds: SelectAll<Feed> = SelectAll::new();
    let mut joined = HashSet::new();
    loop {
        tokio::select! {
            frame = ws.next() => {
                let text = match frame {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None => return Ok(()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                };
                let requests = match serde_json::from_str(&text) {
                    Ok(Frame::One(req)) => vec![req],
                    Ok(Frame::Many(reqs)) => reqs,
                    Err(e) => {
                        ws.send(error("bad_request", &e.to_string(), None)).await?;
                        continue;
                    }
                };
                for req in requests {
                    let reply = handle(&state, req, &mut feeds, &mut joined);
                    ws.send(reply).await?;
                }
            }
            Some(msg) = feeds.next(), if !feeds.is_empty() => {
                let event = Event { r#type: "message", channel: &msg.channel, seq: msg.seq, data: &msg.data };
                ws.send(Message::text(serde_json::to_string(&event)?)).await?;
            }
        }
    }
}

fn handle(
    state: &State,
    req: Req,
    feeds: &mut SelectAll<Feed>,
    joined: &mut HashSet<String>,
) -> Message {
    let Some(channel) = req.channel else {
        return error("bad_request", "missing channel", req.id);
    };
    let mut channels = state.channels.lock().unwrap();
    let entry = channels.entry(channel.clone()).or_insert_with(|| Channel {
        tx: broadcast::channel(1024).0,
        seq: 0,
    });
    match (req.action.as_str(), req.data) {
        ("subscribe", _) => {
            if joined.insert(channel.clone()) {
                feeds.push(receive(entry.tx.subscribe()));
            }
            reply(
                json!({"type": "subscribed", "channel": channel, "seq": entry.seq}),
                req.id,
            )
        }
        ("publish", Some(data)) => {
            entry.seq += 1;
            let seq = entry.seq;
            // Sent under the lock so that seq order is delivery order.
            let _ = entry.tx.send(Arc::new(Msg {
                channel: channel.clone(),
                seq,
                data,
            }));
            reply(
                json!({"type": "published", "channel": channel, "seq": seq}),
                req.id,
            )
        }
        ("publish", None) => error("bad_request", "missing data", req.id),
        _ => error("unknown_action", "only subscribe and publish", req.id),
    }
}

/// A receiver as a stream that skips what it lagged behind on.
fn receive(rx: broadcast::Receiver<Arc<Msg>>) -> Feed {
    Box::pin(stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(msg) => return Some((msg, rx)),
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    }))
}

fn reply(mut event: Value, id: Option<Value>) -> Message {
    if let Some(id) = id {
        event["id"] = id;
    }
    Message::text(event.to_string())
}

fn error(code: &str, message: &str, id: Option<Value>) -> Message {
    reply(
        json!({"type": "error", "code": code, "message": message}),
        id,
    )
}
