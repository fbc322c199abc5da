//! RFC 6455 conformance of the server side, over real sockets, mirroring
//! the case groups of the Autobahn TestSuite that apply to a server that is
//! not an echo server (the tool itself cannot be installed here; the case
//! numbers below are Autobahn's, so a user can run the real suite against a
//! relay started with `--allow-client-publish true` and compare). Where
//! Autobahn expects an echo, the relay answers with a protocol event (an
//! `error` for a message that is no request): what is checked is that a
//! valid frame sequence is taken and answered, and an invalid one closed
//! with the RFC status. Compression (groups 12 and 13) is not negotiated.

mod common;

use common::{frame, raw_ws, Relay, MASK, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What the server sent next.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Text(String),
    Pong(Vec<u8>),
    /// A close frame and its status, if it had one.
    Close(Option<u16>),
    /// The connection ended without a close frame.
    Gone,
}

async fn next(s: &mut TcpStream) -> Got {
    let mut h = [0u8; 2];
    match tokio::time::timeout(PATIENCE, s.read_exact(&mut h)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return Got::Gone,
        Err(_) => panic!("nothing from the server within {PATIENCE:?}"),
    }
    assert_eq!(h[1] & 0x80, 0, "server frames are never masked");
    let mut len = (h[1] & 0x7f) as usize;
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.unwrap();
        len = u16::from_be_bytes(b) as usize;
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await.unwrap();
        len = u64::from_be_bytes(b) as usize;
    }
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.unwrap();
    match h[0] & 0x0f {
        0x1 => Got::Text(String::from_utf8(payload).expect("text frames are UTF-8")),
        0xA => Got::Pong(payload),
        0x8 => {
            Got::Close((payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])))
        }
        op => panic!("unexpected opcode {op:#x}"),
    }
}

/// A fresh connection that was sent `bytes`.
async fn sent(relay: &Relay, bytes: &[u8]) -> TcpStream {
    let mut s = raw_ws(relay).await;
    s.write_all(bytes).await.unwrap();
    s
}

/// The connection that was sent `bytes` is closed with `code`.
async fn closes_with(relay: &Relay, case: &str, bytes: Vec<u8>, code: u16) {
    let mut s = sent(relay, &bytes).await;
    loop {
        match next(&mut s).await {
            Got::Close(c) => {
                assert_eq!(c, Some(code), "case {case}");
                return;
            }
            Got::Text(_) | Got::Pong(_) => continue,
            Got::Gone => panic!("case {case}: dropped without a close frame"),
        }
    }
}

/// The connection that was sent `bytes` answers with a text event and
/// stays open (a ping afterwards is answered).
async fn answers(relay: &Relay, case: &str, bytes: Vec<u8>) -> String {
    let mut s = sent(relay, &bytes).await;
    let got = next(&mut s).await;
    let Got::Text(text) = got else {
        panic!("case {case}: {got:?}");
    };
    s.write_all(&frame(true, 0x9, b"still?", MASK))
        .await
        .unwrap();
    loop {
        match next(&mut s).await {
            Got::Pong(p) => {
                assert_eq!(p, b"still?", "case {case}");
                return text;
            }
            Got::Text(_) => continue,
            other => panic!("case {case}: after the answer, {other:?}"),
        }
    }
}

fn relay() -> Relay {
    Relay::start(&["--workers", "1"])
}

#[tokio::test]
async fn group_1_framing_every_payload_length_encoding() {
    let relay = relay();
    // 1.1.1-1.1.8 and 1.2.1-1.2.8: lengths across the 7-bit, 16-bit and
    // 64-bit encodings, text and binary; none is a request, each is
    // answered and leaves the connection open.
    for (i, len) in [0usize, 125, 126, 127, 128, 65535, 65536]
        .into_iter()
        .enumerate()
    {
        let text = answers(
            &relay,
            &format!("1.1.{}", i + 1),
            frame(true, 0x1, &vec![b'*'; len], MASK),
        )
        .await;
        assert!(text.contains("bad_request"), "{text}");
        let binary = answers(
            &relay,
            &format!("1.2.{}", i + 1),
            frame(true, 0x2, &vec![0xc0; len.max(1)], MASK),
        )
        .await;
        assert!(binary.contains("error"), "{binary}");
    }
    // A request, for once.
    let ok = answers(
        &relay,
        "1.x",
        frame(true, 0x1, br#"{"action":"subscribe","channel":"c"}"#, MASK),
    )
    .await;
    assert!(ok.contains("subscribed"), "{ok}");
}

#[tokio::test]
async fn group_2_pings_and_pongs() {
    let relay = relay();
    // 2.1, 2.2, 2.3: empty, text and binary payloads come back in the pong.
    for (case, payload) in [
        ("2.1", &b""[..]),
        ("2.2", b"Hello, world!"),
        ("2.3", &[0x00, 0xff, 0xfe, 0xfd]),
    ] {
        let mut s = sent(&relay, &frame(true, 0x9, payload, MASK)).await;
        assert_eq!(
            next(&mut s).await,
            Got::Pong(payload.to_vec()),
            "case {case}"
        );
    }
    // 2.4: 125 bytes, the most a control frame carries.
    let mut s = sent(&relay, &frame(true, 0x9, &[0xfe; 125], MASK)).await;
    assert_eq!(next(&mut s).await, Got::Pong(vec![0xfe; 125]), "case 2.4");
    // 2.5: 126 bytes is a protocol error.
    closes_with(&relay, "2.5", frame(true, 0x9, &[0xfe; 126], MASK), 1002).await;
    // 2.6: a ping sent a byte at a time.
    let mut s = raw_ws(&relay).await;
    for b in frame(true, 0x9, b"chopped", MASK) {
        s.write_all(&[b]).await.unwrap();
        s.flush().await.unwrap();
    }
    assert_eq!(
        next(&mut s).await,
        Got::Pong(b"chopped".to_vec()),
        "case 2.6"
    );
    // 2.7, 2.8: unsolicited pongs are ignored.
    for (case, payload) in [("2.7", &b""[..]), ("2.8", b"unsolicited")] {
        let mut bytes = frame(true, 0xA, payload, MASK);
        bytes.extend(frame(true, 0x9, b"after", MASK));
        let mut s = sent(&relay, &bytes).await;
        assert_eq!(
            next(&mut s).await,
            Got::Pong(b"after".to_vec()),
            "case {case}"
        );
    }
    // 2.10: several pings before the client reads: the latest is answered
    // at least (RFC 6455 5.5.3 allows answering only it).
    let mut bytes = Vec::new();
    for i in 0..10u8 {
        bytes.extend(frame(true, 0x9, &[i], MASK));
    }
    let mut s = sent(&relay, &bytes).await;
    let mut last = None;
    while last != Some(vec![9]) {
        match next(&mut s).await {
            Got::Pong(p) => last = Some(p),
            other => panic!("case 2.10: {other:?}"),
        }
    }
}

#[tokio::test]
async fn group_3_reserved_bits_and_group_4_reserved_opcodes_fail_the_connection() {
    let relay = relay();
    // 3.1-3.7: RSV1, RSV2, RSV3 and their combinations, on text, binary
    // and ping frames (no extension gives them a meaning).
    for (i, (rsv, opcode)) in [
        (0x40u8, 0x1u8),
        (0x20, 0x1),
        (0x10, 0x1),
        (0x60, 0x1),
        (0x50, 0x2),
        (0x30, 0x9),
        (0x70, 0x9),
    ]
    .into_iter()
    .enumerate()
    {
        let mut f = frame(true, opcode, b"{}", MASK);
        f[0] |= rsv;
        closes_with(&relay, &format!("3.{}", i + 1), f, 1002).await;
    }
    // 4.1.1-4.1.5: reserved data opcodes; 4.2.1-4.2.5: reserved control
    // opcodes.
    for (i, opcode) in [3u8, 4, 5, 6, 7].into_iter().enumerate() {
        closes_with(
            &relay,
            &format!("4.1.{}", i + 1),
            frame(true, opcode, b"", MASK),
            1002,
        )
        .await;
    }
    for (i, opcode) in [0xBu8, 0xC, 0xD, 0xE, 0xF].into_iter().enumerate() {
        closes_with(
            &relay,
            &format!("4.2.{}", i + 1),
            frame(true, opcode, b"", MASK),
            1002,
        )
        .await;
    }
    // 4.1.3 / 4.2.3: a reserved opcode after a valid frame still fails.
    let mut bytes = frame(true, 0x9, b"", MASK);
    bytes.extend(frame(true, 0x5, b"", MASK));
    closes_with(&relay, "4.1.3", bytes, 1002).await;
    // Unmasked client frames fail too (RFC 6455 5.1).
    closes_with(&relay, "unmasked", frame(true, 0x1, b"{}", None), 1002).await;
}

#[tokio::test]
async fn group_5_fragmentation() {
    let relay = relay();
    let request = br#"{"action":"subscribe","channel":"frag"}"#;
    let (a, b) = request.split_at(10);
    // 5.1, 5.2: fragmented control frames.
    closes_with(
        &relay,
        "5.1",
        [frame(false, 0x9, b"a", MASK), frame(true, 0x0, b"b", MASK)].concat(),
        1002,
    )
    .await;
    closes_with(
        &relay,
        "5.2",
        [frame(false, 0xA, b"a", MASK), frame(true, 0x0, b"b", MASK)].concat(),
        1002,
    )
    .await;
    // 5.3, 5.4: a message in two fragments (sent together, then apart).
    let text = answers(
        &relay,
        "5.3",
        [frame(false, 0x1, a, MASK), frame(true, 0x0, b, MASK)].concat(),
    )
    .await;
    assert!(text.contains("subscribed"), "{text}");
    let mut s = sent(&relay, &frame(false, 0x1, a, MASK)).await;
    s.write_all(&frame(true, 0x0, b, MASK)).await.unwrap();
    assert!(
        matches!(next(&mut s).await, Got::Text(t) if t.contains("subscribed")),
        "case 5.4"
    );
    // 5.6, 5.7: a ping between the fragments is answered first.
    let bytes = [
        frame(false, 0x1, a, MASK),
        frame(true, 0x9, b"mid", MASK),
        frame(true, 0x0, b, MASK),
    ]
    .concat();
    let mut s = sent(&relay, &bytes).await;
    assert_eq!(next(&mut s).await, Got::Pong(b"mid".to_vec()), "case 5.6");
    assert!(
        matches!(next(&mut s).await, Got::Text(t) if t.contains("subscribed")),
        "case 5.6"
    );
    // 5.9-5.14: continuations with nothing to continue.
    closes_with(&relay, "5.9", frame(true, 0x0, b"x", MASK), 1002).await;
    closes_with(&relay, "5.10", frame(false, 0x0, b"x", MASK), 1002).await;
    // 5.18: a new message begins while one is fragmented.
    closes_with(
        &relay,
        "5.18",
        [frame(false, 0x1, a, MASK), frame(true, 0x1, b, MASK)].concat(),
        1002,
    )
    .await;
    // 5.19, 5.20: many fragments with pings between them.
    let mut bytes = Vec::new();
    let pieces: Vec<&[u8]> = request.chunks(4).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let op = if i == 0 { 0x1 } else { 0x0 };
        bytes.extend(frame(i + 1 == pieces.len(), op, piece, MASK));
        if i % 3 == 0 {
            bytes.extend(frame(true, 0x9, &[i as u8], MASK));
        }
    }
    let mut s = sent(&relay, &bytes).await;
    let mut pongs = 0;
    loop {
        match next(&mut s).await {
            Got::Pong(_) => pongs += 1,
            Got::Text(t) => {
                assert!(t.contains("subscribed"), "case 5.19: {t}");
                break;
            }
            other => panic!("case 5.19: {other:?}"),
        }
    }
    assert!(pongs >= 1, "case 5.19");
}

#[tokio::test]
async fn group_6_utf8_in_text_messages() {
    let relay = relay();
    let valid = r#"{"action":"subscribe","channel":"κόσμε.🦀"}"#.as_bytes();
    // 6.2.1: valid multi-byte UTF-8 in one frame.
    let text = answers(&relay, "6.2.1", frame(true, 0x1, valid, MASK)).await;
    assert!(text.contains("subscribed"), "{text}");
    // 6.2.3, 6.2.4: split inside a code point, across fragments.
    let cut = valid.iter().position(|&b| b >= 0x80).unwrap() + 1;
    let (a, b) = valid.split_at(cut);
    let text = answers(
        &relay,
        "6.2.3",
        [frame(false, 0x1, a, MASK), frame(true, 0x0, b, MASK)].concat(),
    )
    .await;
    assert!(text.contains("subscribed"), "{text}");
    // 6.3, 6.4, 6.6-6.12: invalid sequences, whole or fragmented.
    let invalid: [&[u8]; 6] = [
        &[
            0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed, 0xa0, 0x80,
            0x65, 0x64, 0x69, 0x74, 0x65, 0x64,
        ],
        &[0xc0, 0xaf],
        &[0xf8, 0x88, 0x80, 0x80, 0x80],
        &[0xed, 0xa0, 0x80],
        &[0xff],
        &[0x80],
    ];
    for (i, bytes) in invalid.iter().enumerate() {
        closes_with(
            &relay,
            &format!("6.x.{}", i + 1),
            frame(true, 0x1, bytes, MASK),
            1007,
        )
        .await;
        let (a, b) = bytes.split_at(bytes.len() / 2);
        closes_with(
            &relay,
            &format!("6.4.{}", i + 1),
            [frame(false, 0x1, a, MASK), frame(true, 0x0, b, MASK)].concat(),
            1007,
        )
        .await;
    }
    // A fragmented message cut short inside a code point at its end.
    closes_with(
        &relay,
        "6.4.x",
        [
            frame(false, 0x1, b"{", MASK),
            frame(true, 0x0, &[0xce], MASK),
        ]
        .concat(),
        1007,
    )
    .await;
}

#[tokio::test]
async fn group_7_close_handling() {
    let relay = relay();
    let close = |payload: &[u8]| frame(true, 0x8, payload, MASK);
    // 7.1.1: a close is echoed with the client's status.
    closes_with(&relay, "7.1.1", close(&1000u16.to_be_bytes()), 1000).await;
    // 7.1.6 and 7.1.3: data after a close is not answered.
    let mut bytes = close(&1000u16.to_be_bytes());
    bytes.extend(frame(
        true,
        0x1,
        br#"{"action":"subscribe","channel":"late"}"#,
        MASK,
    ));
    bytes.extend(frame(true, 0x9, b"late", MASK));
    let mut s = sent(&relay, &bytes).await;
    assert_eq!(next(&mut s).await, Got::Close(Some(1000)), "case 7.1.6");
    assert_eq!(
        next(&mut s).await,
        Got::Gone,
        "case 7.1.6: nothing after the close"
    );
    // 7.3.1: an empty close is answered with an empty close.
    let mut s = sent(&relay, &close(b"")).await;
    assert_eq!(next(&mut s).await, Got::Close(None), "case 7.3.1");
    // 7.3.2: a one-byte close payload is a protocol error.
    closes_with(&relay, "7.3.2", close(&[0x03]), 1002).await;
    // 7.3.3, 7.3.4: status with a reason; the longest reason a control
    // frame can carry.
    closes_with(
        &relay,
        "7.3.3",
        close(&[&1000u16.to_be_bytes()[..], b"bye"].concat()),
        1000,
    )
    .await;
    closes_with(
        &relay,
        "7.3.4",
        close(&[&1000u16.to_be_bytes()[..], &[b'*'; 123][..]].concat()),
        1000,
    )
    .await;
    // 7.3.5: a reason that makes the frame 126 bytes.
    closes_with(
        &relay,
        "7.3.5",
        close(&[&1000u16.to_be_bytes()[..], &[b'*'; 124][..]].concat()),
        1002,
    )
    .await;
    // 7.5.1: a reason that is not UTF-8.
    closes_with(
        &relay,
        "7.5.1",
        close(&[
            0x03, 0xe8, 0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xce, 0xbc, 0xce, 0xb5, 0xed,
            0xa0, 0x80, 0x65, 0x64,
        ]),
        1007,
    )
    .await;
    // 7.7.x: every status a client may send is echoed.
    for code in [
        1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999,
    ] {
        closes_with(
            &relay,
            &format!("7.7 ({code})"),
            close(&code.to_be_bytes()),
            code,
        )
        .await;
    }
    // 7.9.x: statuses a client may not send are protocol errors.
    for code in [
        0u16, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999, 5000, 65535,
    ] {
        closes_with(
            &relay,
            &format!("7.9 ({code})"),
            close(&code.to_be_bytes()),
            1002,
        )
        .await;
    }
}

#[tokio::test]
async fn group_9_limits_large_and_many_fragment_messages() {
    let relay = relay();
    // 9.1.x, 9.2.x: messages up to --max-message-bytes (64 KiB) in one
    // frame, text and binary.
    let big = vec![b'*'; 65536];
    assert!(answers(&relay, "9.1.1", frame(true, 0x1, &big, MASK))
        .await
        .contains("bad_request"));
    assert!(answers(&relay, "9.2.1", frame(true, 0x2, &big, MASK))
        .await
        .contains("error"));
    // 9.4.x-9.6.x: the same message in fragments of many sizes.
    for chunk in [64usize, 256, 1024, 4096, 16384, 65536] {
        let pieces: Vec<&[u8]> = big.chunks(chunk).collect();
        let mut bytes = Vec::new();
        for (i, piece) in pieces.iter().enumerate() {
            let op = if i == 0 { 0x1 } else { 0x0 };
            bytes.extend(frame(i + 1 == pieces.len(), op, piece, MASK));
        }
        let text = answers(&relay, &format!("9.4 (fragments of {chunk})"), bytes).await;
        assert!(text.contains("bad_request"), "{text}");
    }
    // Past the limit: 1009, whole or fragmented.
    closes_with(
        &relay,
        "9.x over",
        frame(true, 0x1, &vec![b'*'; 65537], MASK),
        1009,
    )
    .await;
    let mut bytes = frame(false, 0x1, &big, MASK);
    bytes.extend(frame(true, 0x0, b"*", MASK));
    closes_with(&relay, "9.x over, fragmented", bytes, 1009).await;
}
