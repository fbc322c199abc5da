//! Centrifugo's bidirectional JSON protocol and server HTTP API, as the
//! load generator uses them (`--format centrifugo`): a `connect` command
//! after the WebSocket handshake, `subscribe` commands, publications as
//! `push` messages, several messages per frame one per line, and server
//! pings (`{}`) answered with `{}`. Publishers use `POST /api/publish` with
//! the API key, one request per publication.
//!
//! Written from Centrifugo's documentation of its client protocol and
//! server API (v5 and v6 agree on all of this); see
//! bench/contenders/README.md.

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::client::Ws;
use crate::proto::Payload;

/// The id of the connect command; subscribes use 1, 2, ... per connection.
const CONNECT_ID: u64 = 1 << 31;

/// `{"id":N,"subscribe":{"channel":C}}` for a ringcast-style subscribe
/// request; Centrifugo clients publish through the server API instead.
pub fn command(request: serde_json::Value) -> Result<String> {
    match (
        request["action"].as_str(),
        request["channel"].as_str(),
        request["id"].as_u64(),
    ) {
        (Some("subscribe"), Some(channel), Some(id)) => Ok(serde_json::json!({
            "id": id,
            "subscribe": {"channel": channel},
        })
        .to_string()),
        _ => bail!("only subscribe (with an id) goes over a Centrifugo WebSocket"),
    }
}

/// Sends the connect command and waits for its reply.
pub async fn connect(ws: &mut Ws) -> Result<()> {
    ws.send(Message::text(
        serde_json::json!({"id": CONNECT_ID, "connect": {}}).to_string(),
    ))
    .await?;
    loop {
        let msg = ws
            .next()
            .await
            .context("closed before the connect reply")??;
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            Message::Close(frame) => bail!("closed before the connect reply: {frame:?}"),
            _ => continue,
        };
        for line in text.lines() {
            let reply: serde_json::Value =
                serde_json::from_str(line).context("the connect reply is not JSON")?;
            if reply["id"].as_u64() != Some(CONNECT_ID) {
                continue;
            }
            if !reply["error"].is_null() {
                bail!("connect refused: {}", reply["error"]);
            }
            return Ok(());
        }
    }
}

/// The server pings in a frame: lines that are exactly `{}`, each to be
/// answered with `{}` (Centrifugo closes clients that do not answer).
pub fn pings(msg: &Message) -> usize {
    match msg {
        Message::Text(t) => t.as_str().lines().filter(|l| l.trim() == "{}").count(),
        _ => 0,
    }
}

/// The request publishing the payload on `channel` through the server API.
pub fn publish_request(host: &str, key: &str, channel: &str, t: u64, pad: &str) -> Result<Vec<u8>> {
    let body = serde_json::to_string(&serde_json::json!({
        "channel": channel,
        "data": Payload { t, p: pad },
    }))?;
    Ok(format!(
        "POST /api/publish HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes())
}

/// Centrifugo answers API errors with status 200 and an `error` object; an
/// answer that is not JSON counts as a failure too.
pub fn api_error(body: &str) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(body.trim()) {
        Ok(v) if v["error"].is_null() => None,
        Ok(v) => Some(v["error"].to_string()),
        Err(_) => Some(format!("unreadable answer {:.200}", body.trim())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_api_requests_are_as_documented() {
        let sub =
            command(serde_json::json!({"action": "subscribe", "channel": "bench.1", "id": 2}))
                .unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&sub).unwrap(),
            serde_json::json!({"id": 2, "subscribe": {"channel": "bench.1"}})
        );
        assert!(
            command(serde_json::json!({"action": "publish", "channel": "c", "id": 1})).is_err()
        );
        let request = String::from_utf8(publish_request("h:1", "k", "c", 5, "x").unwrap()).unwrap();
        assert!(request.starts_with("POST /api/publish HTTP/1.1\r\n"));
        assert!(request.contains("\r\nX-API-Key: k\r\n"));
        assert!(request.ends_with(r#"{"channel":"c","data":{"p":"x","t":5}}"#));
        assert_eq!(pings(&Message::text("{}")), 1);
        assert_eq!(pings(&Message::text("{\"push\":{}}\n{}")), 1);
        assert_eq!(api_error(r#"{"result":{}}"#), None);
        assert!(
            api_error(r#"{"error":{"code":102,"message":"unknown channel"}}"#)
                .unwrap()
                .contains("unknown channel")
        );
        assert!(api_error("").is_some(), "an empty answer is no success");
    }
}
