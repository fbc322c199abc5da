//! The bytes ringcast puts through Redis, sans-IO.
//!
//! An *item* is one publication's data: a format tag (`j` JSON text, `m`
//! MessagePack) then the body, exactly as the publisher sent it, so Redis
//! only moves bytes and each node converts once per publication. A keyed
//! publication's item starts with `K`, the key's length in decimal, `"\n"`
//! and the key, before the tag (the publish script reads the key there to
//! keep the channel's latest value per key).
//!
//! The publish script wraps the items of one call for one channel into an
//! *envelope*: `"\0rc1\n" epoch "\n" first-seq "\n"` then, per item, its
//! length in decimal, `"\n"` and the item. Several publications of a channel
//! that piled up in one tick travel as one pub/sub message. No JSON text
//! starts with NUL, so a backend's plain `PUBLISH` of JSON or text is never
//! taken for an envelope: anything without the magic prefix is *raw*.

use crate::protocol::Data;
use crate::protocol::DataError;

/// The reserved start of every envelope.
pub const MAGIC: &[u8] = b"\0rc1\n";

/// Encodes one publication's key and data as a script argument.
pub fn encode_item(key: Option<&str>, data: &Data) -> Vec<u8> {
    let mut item = Vec::new();
    if let Some(key) = key {
        item.push(b'K');
        item.extend_from_slice(itoa::Buffer::new().format(key.len()).as_bytes());
        item.push(b'\n');
        item.extend_from_slice(key.as_bytes());
    }
    match data {
        Data::Json { text, .. } => {
            let text = text.get().as_bytes();
            item.reserve(1 + text.len());
            item.push(b'j');
            item.extend_from_slice(text);
        }
        Data::MsgPack(value) => {
            item.push(b'm');
            rmpv::encode::write_value(&mut item, value)
                .expect("writing MessagePack to a Vec cannot fail");
        }
    }
    item
}

/// Why an item cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    #[error("unknown item format")]
    UnknownFormat,
    #[error("malformed item key")]
    BadKey,
    #[error(transparent)]
    Data(#[from] DataError),
}

/// Why a payload with the envelope's magic prefix is not an envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope without epoch")]
    NoEpoch,
    #[error("envelope epoch is not UTF-8")]
    EpochNotUtf8,
    #[error("envelope without first seq")]
    NoFirstSeq,
    #[error("envelope seq 0")]
    SeqZero,
    #[error("envelope item without length")]
    NoItemLength,
    #[error("envelope item longer than the message")]
    ItemPastTheEnd,
    #[error("envelope without items")]
    NoItems,
}

/// A decoded item: the publication's key, if any, and its data.
pub type Item = (Option<std::sync::Arc<str>>, Data);

/// Decodes an item written by [`encode_item`] (possibly by another node).
pub fn decode_item(item: &[u8]) -> Result<Item, ItemError> {
    let (key, rest) = match item.strip_prefix(b"K") {
        None => (None, item),
        Some(mut rest) => {
            let len = take_number(&mut rest).ok_or(ItemError::BadKey)? as usize;
            if len > rest.len() {
                return Err(ItemError::BadKey);
            }
            let (key, rest) = rest.split_at(len);
            let key = std::str::from_utf8(key).map_err(|_| ItemError::BadKey)?;
            crate::protocol::validate_key(key).map_err(|_| ItemError::BadKey)?;
            (Some(key.into()), rest)
        }
    };
    let data = match rest.split_first() {
        Some((b'j', body)) => Data::from_json_slice(body)?,
        Some((b'm', body)) => Data::from_msgpack_slice(body)?,
        _ => return Err(ItemError::UnknownFormat),
    };
    Ok((key, data))
}

/// A pub/sub message from Redis, classified.
#[derive(Debug, PartialEq)]
pub enum Incoming<'a> {
    /// Publications sequenced by the script: seqs `first..first + items.len()`.
    Sequenced {
        epoch: &'a str,
        first: u64,
        items: Vec<&'a [u8]>,
    },
    /// A backend's plain `PUBLISH`: no seq, not in history.
    Raw(&'a [u8]),
}

/// Splits a pub/sub payload into an envelope's parts, or calls it raw.
/// Errors name what is wrong with a payload that has the magic prefix.
pub fn decode_message(payload: &[u8]) -> Result<Incoming<'_>, EnvelopeError> {
    let Some(mut rest) = payload.strip_prefix(MAGIC) else {
        return Ok(Incoming::Raw(payload));
    };
    let epoch = take_line(&mut rest).ok_or(EnvelopeError::NoEpoch)?;
    let epoch = std::str::from_utf8(epoch).map_err(|_| EnvelopeError::EpochNotUtf8)?;
    let first = take_number(&mut rest).ok_or(EnvelopeError::NoFirstSeq)?;
    if first == 0 {
        return Err(EnvelopeError::SeqZero);
    }
    let mut items = Vec::new();
    while !rest.is_empty() {
        let len = take_number(&mut rest).ok_or(EnvelopeError::NoItemLength)? as usize;
        if len > rest.len() {
            return Err(EnvelopeError::ItemPastTheEnd);
        }
        let (item, tail) = rest.split_at(len);
        items.push(item);
        rest = tail;
    }
    if items.is_empty() {
        return Err(EnvelopeError::NoItems);
    }
    Ok(Incoming::Sequenced {
        epoch,
        first,
        items,
    })
}

/// The data of a raw message: a JSON value when the payload is valid JSON,
/// else the payload as a JSON string (invalid UTF-8 replaced).
pub fn raw_data(payload: &[u8]) -> Data {
    if let Ok(data) = Data::from_json_slice(payload) {
        return data;
    }
    let text = String::from_utf8_lossy(payload);
    let json = serde_json::to_vec(&text).expect("a string always serializes");
    Data::from_json_slice(&json).expect("a JSON string is valid data in both formats")
}

fn take_line<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let at = rest.iter().position(|&b| b == b'\n')?;
    let line = &rest[..at];
    *rest = &rest[at + 1..];
    Some(line)
}

fn take_number(rest: &mut &[u8]) -> Option<u64> {
    let line = take_line(rest)?;
    if line.is_empty() || line.len() > 19 || !line.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(line).ok()?.parse().ok()
}

/// Builds an envelope as the publish script does (for tests that stand in
/// for Redis).
#[cfg(test)]
pub fn encode_envelope(epoch: &str, first: u64, items: &[&[u8]]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.extend_from_slice(epoch.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(first.to_string().as_bytes());
    out.push(b'\n');
    for item in items {
        out.extend_from_slice(item.len().to_string().as_bytes());
        out.push(b'\n');
        out.extend_from_slice(item);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json_of(data: &Data) -> String {
        data.json_text()
    }

    #[test]
    fn items_round_trip_in_both_formats() {
        let json = Data::from_json_slice(br#"{"p":1.5,"s":"x"}"#).unwrap();
        let (key, back) = decode_item(&encode_item(None, &json)).unwrap();
        assert_eq!(
            (key, json_of(&back).as_str()),
            (None, r#"{"p":1.5,"s":"x"}"#)
        );
        let mp = Data::MsgPack(rmpv::Value::Binary(vec![0, 255]));
        let (key, back) = decode_item(&encode_item(Some("AAPL\n2"), &mp)).unwrap();
        assert_eq!(key.as_deref(), Some("AAPL\n2"));
        assert!(matches!(back, Data::MsgPack(rmpv::Value::Binary(ref b)) if b == &[0, 255]));
        assert_eq!(&encode_item(Some("ab"), &json)[..5], b"K2\nab");
        for bad in [
            &b"xabc"[..],
            b"",
            b"j{",
            b"K",
            b"K9\nab{}",
            b"K0\nj1",
            b"K2\n\xff\xfej1",
            b"K2\nab",
        ] {
            assert!(decode_item(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn plain_payloads_are_raw_json_or_strings() {
        assert_eq!(
            decode_message(b"{\"a\":1}"),
            Ok(Incoming::Raw(b"{\"a\":1}"))
        );
        assert_eq!(json_of(&raw_data(b" {\"a\": 1} ")), " {\"a\": 1} ".trim());
        assert_eq!(json_of(&raw_data(b"42")), "42");
        assert_eq!(json_of(&raw_data(b"hello \"you\"")), r#""hello \"you\"""#);
        assert_eq!(json_of(&raw_data(b"\xff!")), "\"\u{fffd}!\"");
        assert_eq!(json_of(&raw_data(b"")), "\"\"");
    }

    #[test]
    fn envelopes_decode_and_bad_ones_are_named() {
        let env = encode_envelope("e1", 7, &[b"j1", b"j\"two\""]);
        assert_eq!(
            decode_message(&env),
            Ok(Incoming::Sequenced {
                epoch: "e1",
                first: 7,
                items: vec![b"j1".as_slice(), b"j\"two\"".as_slice()]
            })
        );
        for bad in [
            &b"\0rc1\n"[..],
            b"\0rc1\ne\n",
            b"\0rc1\ne\n0\n2\nj1",
            b"\0rc1\ne\n1\n",
            b"\0rc1\ne\n1\n9\nj1",
            b"\0rc1\ne\nx\n2\nj1",
            b"\0rc1\ne\n1\n2j1",
        ] {
            assert!(decode_message(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn envelope_round_trips(epoch in "[a-z0-9.-]{0,16}", first in 1u64..u64::MAX / 2,
                                items in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..6)) {
            let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
            let env = encode_envelope(&epoch, first, &refs);
            prop_assert_eq!(decode_message(&env), Ok(Incoming::Sequenced { epoch: &epoch, first, items: refs }));
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut with_magic = MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode_message(&with_magic);
            let _ = decode_message(&bytes);
            let _ = decode_item(&bytes);
        }
    }
}
