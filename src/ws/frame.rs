//! Sans-IO RFC 6455 framing for the server side: a reader that turns client
//! bytes into messages and control frames, and header encoding for output.
//!
//! Hand-written rather than `fastwebsockets`' reader because that reader parks
//! an 8 KiB buffer in every connection and owns the stream; here an idle
//! connection holds no buffer at all (bytes are parsed straight out of the
//! worker's shared read buffer, only an incomplete frame is kept), and the
//! writer is free to send pre-encoded fan-out fragments with vectored writes.
//! Unmasking uses `fastwebsockets::unmask`.

use thin_vec::ThinVec;

/// WebSocket close status codes the relay sends.
pub mod close {
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const SERVICE_RESTART: u16 = 1012;
    pub use crate::protocol::close::SLOW_CONSUMER;
}

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// A violation that ends the connection with a close status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub code: u16,
    pub reason: &'static str,
}

impl Violation {
    const fn new(code: u16, reason: &'static str) -> Self {
        Violation { code, reason }
    }
}

/// What the reader hands to the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A complete text message (UTF-8 checked) or binary message.
    Message {
        text: bool,
        payload: &'a [u8],
    },
    Ping(&'a [u8]),
    Pong,
    /// The client's close frame: its status code (if any), already validated.
    Close(Option<u16>),
}

/// Reassembles client frames into messages with the limits of RFC 6455 and
/// the relay's `max_message` bound.
#[derive(Debug, Default)]
pub struct WsReader {
    /// Bytes of an incomplete frame; empty (and unallocated) between frames.
    partial: Vec<u8>,
    /// Payload of a fragmented message being assembled.
    fragments: Vec<u8>,
    /// Opcode of the message being assembled, if any.
    fragmented: Option<u8>,
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

/// Parses a frame header. `Ok(None)`: more bytes needed.
fn parse_header(buf: &[u8], max_message: usize) -> Result<Option<Header>, Violation> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(Violation::new(
            close::PROTOCOL_ERROR,
            "reserved bits set without an extension",
        ));
    }
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    if !matches!(
        opcode,
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
    ) {
        return Err(Violation::new(close::PROTOCOL_ERROR, "unknown opcode"));
    }
    if b1 & 0x80 == 0 {
        return Err(Violation::new(
            close::PROTOCOL_ERROR,
            "client frames must be masked",
        ));
    }
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(Violation::new(
                    close::PROTOCOL_ERROR,
                    "frame length has its top bit set",
                ));
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode >= OP_CLOSE {
        if !fin {
            return Err(Violation::new(
                close::PROTOCOL_ERROR,
                "fragmented control frame",
            ));
        }
        if len > 125 {
            return Err(Violation::new(
                close::PROTOCOL_ERROR,
                "control frame longer than 125 bytes",
            ));
        }
    }
    if len > max_message as u64 {
        return Err(Violation::new(
            close::TOO_BIG,
            "frame exceeds the message size limit",
        ));
    }
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    at += 4;
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len: at,
        payload_len: len as usize,
    }))
}

/// Checks a close frame's payload: a valid status code and a UTF-8 reason.
fn parse_close(payload: &[u8]) -> Result<Option<u16>, Violation> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(Violation::new(
            close::PROTOCOL_ERROR,
            "close frame with a 1-byte payload",
        )),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(Violation::new(
                    close::PROTOCOL_ERROR,
                    "invalid close status code",
                ));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(Violation::new(
                    close::INVALID_PAYLOAD,
                    "close reason is not UTF-8",
                ));
            }
            Ok(Some(code))
        }
    }
}

impl WsReader {
    /// True when no partial frame or message is held (nothing allocated,
    /// no message begun): the reader can be dropped and started afresh.
    pub fn is_idle(&self) -> bool {
        self.partial.capacity() == 0 && self.fragments.capacity() == 0 && self.fragmented.is_none()
    }

    /// Feeds freshly read bytes. `on` is called for each complete event and
    /// returns false to stop reading (after a close, say). Bytes of an
    /// incomplete frame are kept for the next call.
    pub fn feed(
        &mut self,
        data: &mut [u8],
        max_message: usize,
        on: &mut dyn FnMut(Incoming<'_>) -> bool,
    ) -> Result<(), Violation> {
        if self.partial.is_empty() {
            let used = self.parse(data, max_message, on)?;
            if used < data.len() {
                self.partial.extend_from_slice(&data[used..]);
            }
        } else {
            let mut partial = std::mem::take(&mut self.partial);
            partial.extend_from_slice(data);
            let used = self.parse(&mut partial, max_message, on)?;
            partial.drain(..used);
            if !partial.is_empty() {
                self.partial = partial;
            }
        }
        Ok(())
    }

    /// Parses complete frames from `buf`; returns the bytes consumed.
    fn parse(
        &mut self,
        buf: &mut [u8],
        max_message: usize,
        on: &mut dyn FnMut(Incoming<'_>) -> bool,
    ) -> Result<usize, Violation> {
        let mut at = 0;
        loop {
            let Some(h) = parse_header(&buf[at..], max_message)? else {
                return Ok(at);
            };
            let end = at + h.header_len + h.payload_len;
            if buf.len() < end {
                return Ok(at);
            }
            let payload = &mut buf[at + h.header_len..end];
            fastwebsockets::unmask(payload, h.mask);
            at = end;
            if !self.frame(h.fin, h.opcode, payload, max_message, on)? {
                return Ok(at);
            }
        }
    }

    fn frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: &[u8],
        max_message: usize,
        on: &mut dyn FnMut(Incoming<'_>) -> bool,
    ) -> Result<bool, Violation> {
        match opcode {
            OP_PING => Ok(on(Incoming::Ping(payload))),
            OP_PONG => Ok(on(Incoming::Pong)),
            OP_CLOSE => Ok(on(Incoming::Close(parse_close(payload)?))),
            OP_TEXT | OP_BINARY => {
                if self.fragmented.is_some() {
                    return Err(Violation::new(
                        close::PROTOCOL_ERROR,
                        "new message started inside a fragmented message",
                    ));
                }
                if fin {
                    return deliver(opcode == OP_TEXT, payload, on);
                }
                self.fragmented = Some(opcode);
                self.fragments.extend_from_slice(payload);
                Ok(true)
            }
            _ => {
                let Some(first) = self.fragmented else {
                    return Err(Violation::new(
                        close::PROTOCOL_ERROR,
                        "continuation frame without a message",
                    ));
                };
                if self.fragments.len() + payload.len() > max_message {
                    return Err(Violation::new(
                        close::TOO_BIG,
                        "message exceeds the size limit",
                    ));
                }
                self.fragments.extend_from_slice(payload);
                if !fin {
                    return Ok(true);
                }
                self.fragmented = None;
                let message = std::mem::take(&mut self.fragments);
                deliver(first == OP_TEXT, &message, on)
            }
        }
    }
}

fn deliver(
    text: bool,
    payload: &[u8],
    on: &mut dyn FnMut(Incoming<'_>) -> bool,
) -> Result<bool, Violation> {
    if text && std::str::from_utf8(payload).is_err() {
        return Err(Violation::new(
            close::INVALID_PAYLOAD,
            "text message is not valid UTF-8",
        ));
    }
    Ok(on(Incoming::Message { text, payload }))
}

/// Longest server frame header (no mask): 2 + 8 bytes.
pub const MAX_HEADER: usize = 10;

/// Writes an unmasked server frame header; returns its length.
pub fn write_header(out: &mut [u8; MAX_HEADER], opcode: u8, len: usize) -> usize {
    out[0] = 0x80 | opcode;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= usize::from(u16::MAX) {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Appends a complete control frame (ping, pong, close) to `out`.
pub fn push_control(out: &mut ThinVec<u8>, opcode: u8, payload: &[u8]) {
    let payload = &payload[..payload.len().min(125)];
    let mut head = [0u8; MAX_HEADER];
    let n = write_header(&mut head, opcode, payload.len());
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(payload);
}

/// Appends a close frame with `code` and a short reason.
pub fn push_close(out: &mut ThinVec<u8>, code: u16, reason: &str) {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    push_control(out, OP_CLOSE, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A masked client frame, as a browser would send it.
    pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut head = [0u8; MAX_HEADER];
        let n = write_header(&mut head, opcode, payload.len());
        let mut out = head[..n].to_vec();
        if !fin {
            out[0] &= 0x7f;
        }
        out[1] |= 0x80;
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[derive(Debug, PartialEq)]
    enum Ev {
        Msg(bool, Vec<u8>),
        Ping(Vec<u8>),
        Pong,
        Close(Option<u16>),
    }

    fn run(bytes: &[u8], chunk: usize, max: usize) -> (Vec<Ev>, Result<(), Violation>) {
        let mut r = WsReader::default();
        let mut evs = Vec::new();
        for c in bytes.chunks(chunk.max(1)) {
            let mut c = c.to_vec();
            let res = r.feed(&mut c, max, &mut |i| {
                evs.push(match i {
                    Incoming::Message { text, payload } => Ev::Msg(text, payload.to_vec()),
                    Incoming::Ping(p) => Ev::Ping(p.to_vec()),
                    Incoming::Pong => Ev::Pong,
                    Incoming::Close(c) => Ev::Close(c),
                });
                true
            });
            if res.is_err() {
                return (evs, res);
            }
        }
        (evs, Ok(()))
    }

    #[test]
    fn reassembles_fragments_with_interleaved_control_frames() {
        let mut b = client_frame(false, OP_TEXT, b"hel");
        b.extend(client_frame(true, OP_PING, b"p"));
        b.extend(client_frame(false, OP_CONTINUATION, b"lo "));
        b.extend(client_frame(true, OP_CONTINUATION, "wörld".as_bytes()));
        b.extend(client_frame(true, OP_BINARY, &[0xff; 300]));
        b.extend(client_frame(true, OP_CLOSE, &1000u16.to_be_bytes()));
        for chunk in [1, 3, 7, 1000] {
            let (evs, res) = run(&b, chunk, 1 << 16);
            assert_eq!(res, Ok(()));
            assert_eq!(
                evs,
                vec![
                    Ev::Ping(b"p".to_vec()),
                    Ev::Msg(true, "hello wörld".as_bytes().to_vec()),
                    Ev::Msg(false, vec![0xff; 300]),
                    Ev::Close(Some(1000)),
                ]
            );
        }
    }

    #[test]
    fn violations_map_to_rfc_close_codes() {
        let unmasked = {
            let mut f = client_frame(true, OP_TEXT, b"hi");
            f[1] &= 0x7f;
            f
        };
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (unmasked, close::PROTOCOL_ERROR),
            (
                client_frame(true, OP_TEXT, &[0xc3, 0x28]),
                close::INVALID_PAYLOAD,
            ),
            (client_frame(true, OP_BINARY, &[0; 2000]), close::TOO_BIG),
            (client_frame(true, 0x3, b""), close::PROTOCOL_ERROR),
            (
                client_frame(true, OP_CONTINUATION, b"x"),
                close::PROTOCOL_ERROR,
            ),
            (client_frame(false, OP_PING, b""), close::PROTOCOL_ERROR),
            (
                client_frame(true, OP_CLOSE, &[3, 0xe8 + 4]),
                close::PROTOCOL_ERROR,
            ),
            (client_frame(true, OP_CLOSE, &[0x03]), close::PROTOCOL_ERROR),
            (
                {
                    let mut f = client_frame(true, OP_TEXT, b"x");
                    f[0] |= 0x40;
                    f
                },
                close::PROTOCOL_ERROR,
            ),
            (
                [
                    client_frame(false, OP_TEXT, &[b'a'; 600]),
                    client_frame(true, OP_CONTINUATION, &[b'a'; 600]),
                ]
                .concat(),
                close::TOO_BIG,
            ),
        ];
        for (bytes, code) in cases {
            let (_, res) = run(&bytes, 1000, 1024);
            assert_eq!(res.map_err(|v| v.code), Err(code), "{bytes:02x?}");
        }
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let mut r = WsReader::default();
        let mut head = vec![0x82, 0xff, 0, 0, 0, 0, 0x10, 0, 0, 0];
        let res = r.feed(&mut head, 1 << 16, &mut |_| true);
        assert_eq!(res.map_err(|v| v.code), Err(close::TOO_BIG));
    }

    #[test]
    fn idle_reader_holds_nothing() {
        let mut r = WsReader::default();
        let mut f = client_frame(true, OP_TEXT, b"{}");
        r.feed(&mut f, 1024, &mut |_| true).unwrap();
        assert!(r.is_idle());
        // A message begun with an empty first fragment holds no bytes but
        // must not be forgotten.
        let mut first = client_frame(false, OP_TEXT, b"");
        r.feed(&mut first, 1024, &mut |_| true).unwrap();
        assert!(!r.is_idle());
    }

    proptest! {
        #[test]
        fn any_bytes_give_events_or_a_violation(bytes in proptest::collection::vec(any::<u8>(), 0..600), chunk in 1usize..64) {
            let _ = run(&bytes, chunk, 256);
        }
    }
}
