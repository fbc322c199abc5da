//! The RFC 6455 opening handshake, checked against a parsed HTTP request:
//! method and version, `Upgrade`/`Connection` tokens, a 16-byte
//! `Sec-WebSocket-Key`, version 13, and the subprotocol that picks the format.

use base64::Engine;
use sha1::{Digest, Sha1};

use crate::http::message::Head;
use crate::protocol::Format;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A request that may be upgraded.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade {
    pub accept: String,
    pub format: Format,
    /// Whether the client offered subprotocols (then the 101 names the choice).
    pub echo_protocol: bool,
}

/// Why an upgrade is refused: an HTTP status and a message for the body.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub message: &'static str,
}

fn has_token(value: Option<&str>, token: &str) -> bool {
    value.is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Checks the handshake headers and computes the answer.
pub fn check(head: &Head) -> Result<Upgrade, Refusal> {
    let refuse = |status, message| Err(Refusal { status, message });
    if head.method != "GET" {
        return refuse(405, "WebSocket upgrades use GET");
    }
    if !head.http11 {
        return refuse(400, "WebSocket upgrades need HTTP/1.1");
    }
    if !has_token(head.header("upgrade"), "websocket")
        || !has_token(head.header("connection"), "upgrade")
    {
        return refuse(
            426,
            "this endpoint speaks WebSocket only: send Upgrade: websocket",
        );
    }
    if head.header("sec-websocket-version").map(str::trim) != Some("13") {
        return refuse(
            426,
            "unsupported Sec-WebSocket-Version; this server speaks 13",
        );
    }
    let Some(key) = head.header("sec-websocket-key").map(str::trim) else {
        return refuse(400, "missing Sec-WebSocket-Key");
    };
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return refuse(400, "Sec-WebSocket-Key must be 16 bytes in base64"),
    }
    let offered: Vec<&str> = head
        .headers_named("sec-websocket-protocol")
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let (format, echo_protocol) =
        if offered.is_empty() {
            (Format::Json, false)
        } else {
            match offered.iter().find_map(|p| Format::from_subprotocol(p)) {
                Some(f) => (f, true),
                None => return refuse(
                    400,
                    "no supported subprotocol offered; use ringcast.v1.json or ringcast.v1.msgpack",
                ),
            }
        };
    Ok(Upgrade {
        accept: accept_key(key),
        format,
        echo_protocol,
    })
}

/// `Sec-WebSocket-Accept` for a key: base64(sha1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// The 101 response.
pub fn response(up: &Upgrade) -> String {
    let protocol = if up.echo_protocol {
        format!("Sec-WebSocket-Protocol: {}\r\n", up.format.subprotocol())
    } else {
        String::new()
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n{protocol}\r\n",
        up.accept
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(extra: &str) -> Head {
        let text = format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        );
        Head::parse(text.as_bytes()).unwrap().unwrap().0
    }

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn negotiates_subprotocols() {
        let k = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        let up = check(&head(k)).unwrap();
        assert_eq!((up.format, up.echo_protocol), (Format::Json, false));
        let up = check(&head(&format!(
            "{k}Sec-WebSocket-Protocol: chat, ringcast.v1.msgpack\r\n"
        )))
        .unwrap();
        assert_eq!((up.format, up.echo_protocol), (Format::MsgPack, true));
        assert!(response(&up).contains("Sec-WebSocket-Protocol: ringcast.v1.msgpack\r\n"));
        let e = check(&head(&format!("{k}Sec-WebSocket-Protocol: chat\r\n"))).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn refuses_bad_keys() {
        assert_eq!(check(&head("")).unwrap_err().status, 400);
        assert_eq!(
            check(&head("Sec-WebSocket-Key: short\r\n"))
                .unwrap_err()
                .status,
            400
        );
    }
}
