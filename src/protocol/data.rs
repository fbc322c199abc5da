//! Published `data`: kept in the form it arrived in and converted to the
//! other format once per publication (never per subscriber).
//!
//! Data is checked when it arrives: a publication that one of the two
//! formats cannot carry (a JSON number beyond a double, a lone surrogate, a
//! NaN, nesting past [`MAX_DATA_DEPTH`], a byte MessagePack never uses) is
//! refused at publish time, so a JSON and a MessagePack subscriber always
//! receive the same value. JSON goes to JSON subscribers untouched; its
//! MessagePack form is made during the check and kept. For JSON
//! subscribers, MessagePack binary and extension values become base64
//! strings and non-string map keys become their JSON text.

use base64::Engine;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

/// Deepest nesting of arrays and maps inside one publication's `data`, in
/// both formats (`1` is depth 0, `[1]` depth 1).
pub const MAX_DATA_DEPTH: usize = 32;

/// Why bytes are not publication data; the text is what the publisher is
/// told.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("invalid JSON: {0}")]
    InvalidJson(serde_json::Error),
    #[error("data is nested {0} levels deep; at most {MAX_DATA_DEPTH} are allowed")]
    TooDeep(usize),
    #[error("data cannot be carried as MessagePack: {0}")]
    NoMsgpackForm(serde_json::Error),
    #[error("data cannot be carried as JSON: the number {0}")]
    NoJsonNumber(f64),
    #[error("data cannot be carried as JSON: a string that is not UTF-8 (send bytes as bin)")]
    NoJsonString,
    #[error("invalid MessagePack: {0}")]
    InvalidMsgpack(#[from] MsgpackError),
}

/// Why bytes are not one MessagePack value.
#[derive(Debug, thiserror::Error)]
pub enum MsgpackError {
    #[error("trailing bytes after the value")]
    TrailingBytes,
    #[error("byte 0xc1 is not a MessagePack type")]
    ReservedByte,
    #[error("the value is cut short")]
    CutShort,
    #[error("nested deeper than {0} levels")]
    TooDeep(usize),
    #[error("{0}")]
    Unreadable(rmpv::decode::Error),
}

/// Data of one publication, in the format it was published in.
#[derive(Debug, Clone)]
pub enum Data {
    /// JSON text as published, and its MessagePack form.
    Json {
        text: Box<RawValue>,
        msgpack: Box<[u8]>,
    },
    MsgPack(rmpv::Value),
}

impl Data {
    /// Parses a JSON document (an HTTP body, say) into publication data.
    pub fn from_json_slice(bytes: &[u8]) -> Result<Data, DataError> {
        let text =
            serde_json::from_slice::<Box<RawValue>>(bytes).map_err(DataError::InvalidJson)?;
        Data::from_json(text)
    }

    /// Checks JSON data and makes its MessagePack form.
    pub fn from_json(text: Box<RawValue>) -> Result<Data, DataError> {
        if let Some(depth) = json_too_deep(text.get()) {
            return Err(DataError::TooDeep(depth));
        }
        let value: rmpv::Value =
            serde_json::from_str(text.get()).map_err(DataError::NoMsgpackForm)?;
        let mut msgpack = Vec::new();
        rmpv::encode::write_value(&mut msgpack, &value)
            .expect("writing MessagePack to a Vec cannot fail");
        Ok(Data::Json {
            text,
            msgpack: msgpack.into_boxed_slice(),
        })
    }

    /// Parses one MessagePack value (an HTTP body, say) into publication data.
    pub fn from_msgpack_slice(bytes: &[u8]) -> Result<Data, DataError> {
        let value = decode_msgpack(bytes, MAX_DATA_DEPTH)?;
        Data::from_msgpack(value)
    }

    /// Checks MessagePack data: every value must have a JSON form.
    pub fn from_msgpack(value: rmpv::Value) -> Result<Data, DataError> {
        let depth = msgpack_depth(&value)?;
        if depth > MAX_DATA_DEPTH {
            return Err(DataError::TooDeep(depth));
        }
        Ok(Data::MsgPack(value))
    }

    /// Appends the JSON form of the data.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Data::Json { text, .. } => out.extend_from_slice(text.get().as_bytes()),
            Data::MsgPack(v) => serde_json::to_writer(out, &JsonCompat(v))
                .expect("writing JSON to a Vec cannot fail"),
        }
    }

    /// The JSON form as text (for tests).
    #[cfg(test)]
    pub fn json_text(&self) -> String {
        let mut out = Vec::new();
        self.write_json(&mut out);
        String::from_utf8(out).expect("JSON is UTF-8")
    }

    /// Appends the MessagePack form of the data.
    pub fn write_msgpack(&self, out: &mut Vec<u8>) {
        match self {
            Data::MsgPack(v) => {
                rmpv::encode::write_value(out, v).expect("writing MessagePack to a Vec cannot fail")
            }
            Data::Json { msgpack, .. } => out.extend_from_slice(msgpack),
        }
    }
}

/// The nesting depth of valid JSON text when it is over the limit.
fn json_too_deep(text: &str) -> Option<usize> {
    // Most data holds fewer brackets than the limit allows levels: no
    // need to walk it byte by byte then.
    let opening = text
        .as_bytes()
        .iter()
        .filter(|&&b| b == b'[' || b == b'{')
        .count();
    if opening <= MAX_DATA_DEPTH {
        return None;
    }
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in text.as_bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    (deepest > MAX_DATA_DEPTH).then_some(deepest)
}

/// How deeply arrays and maps nest in a MessagePack value; an error for a
/// value JSON cannot carry (NaN or an infinite float).
fn msgpack_depth(value: &rmpv::Value) -> Result<usize, DataError> {
    use rmpv::Value;
    let finite = |f: f64| {
        if f.is_finite() {
            Ok(0)
        } else {
            Err(DataError::NoJsonNumber(f))
        }
    };
    match value {
        Value::F32(f) => finite(f64::from(*f)),
        Value::F64(f) => finite(*f),
        Value::String(text) if text.as_str().is_none() => Err(DataError::NoJsonString),
        Value::Array(items) => {
            let mut deepest = 0;
            for item in items {
                deepest = deepest.max(msgpack_depth(item)?);
            }
            Ok(deepest + 1)
        }
        Value::Map(entries) => {
            let mut deepest = 0;
            for (k, v) in entries {
                deepest = deepest.max(msgpack_depth(k)?).max(msgpack_depth(v)?);
            }
            Ok(deepest + 1)
        }
        _ => Ok(0),
    }
}

/// Decodes exactly one MessagePack value from `bytes`, nested at most
/// `max_depth` deep. The bytes are walked first because rmpv reads the
/// never-used marker 0xC1 as nil; such input is refused here instead.
pub(crate) fn decode_msgpack(bytes: &[u8], max_depth: usize) -> Result<rmpv::Value, MsgpackError> {
    let len = msgpack_extent(bytes, 0, max_depth)?;
    if len != bytes.len() {
        return Err(MsgpackError::TrailingBytes);
    }
    let mut rd = bytes;
    // rmpv counts a container and its value as two levels, a string or
    // binary body as two more; the walk above already bounded the nesting.
    rmpv::decode::read_value_with_max_depth(&mut rd, 2 * max_depth + 4)
        .map_err(MsgpackError::Unreadable)
}

/// The length of the MessagePack value at the start of `bytes`.
fn msgpack_extent(bytes: &[u8], depth: usize, max_depth: usize) -> Result<usize, MsgpackError> {
    use rmp::Marker;
    let truncated = || MsgpackError::CutShort;
    let first = *bytes.first().ok_or_else(truncated)?;
    let be = |at: usize, n: usize| -> Result<usize, MsgpackError> {
        let field = bytes.get(at..at + n).ok_or_else(truncated)?;
        Ok(field.iter().fold(0usize, |acc, &b| (acc << 8) | b as usize))
    };
    // Counts from a 32-bit header could overflow a 32-bit usize.
    let pairs = |n: usize| n.checked_mul(2).ok_or_else(truncated);
    // (header bytes, payload bytes, contained values)
    let (head, payload, values): (usize, usize, usize) = match Marker::from_u8(first) {
        Marker::Reserved => return Err(MsgpackError::ReservedByte),
        Marker::FixPos(_) | Marker::FixNeg(_) | Marker::Null | Marker::True | Marker::False => {
            (1, 0, 0)
        }
        Marker::U8 | Marker::I8 => (1, 1, 0),
        Marker::U16 | Marker::I16 => (1, 2, 0),
        Marker::U32 | Marker::I32 | Marker::F32 => (1, 4, 0),
        Marker::U64 | Marker::I64 | Marker::F64 => (1, 8, 0),
        Marker::FixStr(n) => (1, n as usize, 0),
        Marker::Str8 | Marker::Bin8 => (2, be(1, 1)?, 0),
        Marker::Str16 | Marker::Bin16 => (3, be(1, 2)?, 0),
        Marker::Str32 | Marker::Bin32 => (5, be(1, 4)?, 0),
        Marker::FixExt1 => (2, 1, 0),
        Marker::FixExt2 => (2, 2, 0),
        Marker::FixExt4 => (2, 4, 0),
        Marker::FixExt8 => (2, 8, 0),
        Marker::FixExt16 => (2, 16, 0),
        Marker::Ext8 => (3, be(1, 1)?, 0),
        Marker::Ext16 => (4, be(1, 2)?, 0),
        Marker::Ext32 => (6, be(1, 4)?, 0),
        Marker::FixArray(n) => (1, 0, n as usize),
        Marker::Array16 => (3, 0, be(1, 2)?),
        Marker::Array32 => (5, 0, be(1, 4)?),
        Marker::FixMap(n) => (1, 0, pairs(n as usize)?),
        Marker::Map16 => (3, 0, pairs(be(1, 2)?)?),
        Marker::Map32 => (5, 0, pairs(be(1, 4)?)?),
    };
    let mut at = match head.checked_add(payload) {
        Some(end) if end <= bytes.len() => end,
        _ => return Err(truncated()),
    };
    if values > 0 {
        if depth >= max_depth {
            return Err(MsgpackError::TooDeep(max_depth));
        }
        // Every value takes at least one byte: a count beyond what is left
        // is cut short, whatever the header claims.
        if values > bytes.len() - at {
            return Err(truncated());
        }
        for _ in 0..values {
            at += msgpack_extent(&bytes[at..], depth + 1, max_depth)?;
        }
    }
    Ok(at)
}

/// Serializes a MessagePack value as the nearest JSON value.
struct JsonCompat<'a>(&'a rmpv::Value);

fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl Serialize for JsonCompat<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use rmpv::Value;
        match self.0 {
            Value::Nil => s.serialize_unit(),
            Value::Boolean(b) => s.serialize_bool(*b),
            Value::Integer(i) => match (i.as_i64(), i.as_u64()) {
                (Some(v), _) => s.serialize_i64(v),
                (None, Some(v)) => s.serialize_u64(v),
                (None, None) => s.serialize_unit(),
            },
            Value::F32(f) => s.serialize_f64(f64::from(*f)),
            Value::F64(f) => s.serialize_f64(*f),
            Value::String(st) => match st.as_str() {
                Some(text) => s.serialize_str(text),
                None => s.serialize_str(&base64(st.as_bytes())),
            },
            Value::Binary(b) => s.serialize_str(&base64(b)),
            Value::Ext(_, b) => s.serialize_str(&base64(b)),
            Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&JsonCompat(item))?;
                }
                seq.end()
            }
            Value::Map(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    match k {
                        Value::String(st) if st.as_str().is_some() => {
                            map.serialize_entry(st.as_str().unwrap_or_default(), &JsonCompat(v))?
                        }
                        other => {
                            let key = serde_json::to_string(&JsonCompat(other))
                                .unwrap_or_else(|_| String::from("null"));
                            map.serialize_entry(&key, &JsonCompat(v))?
                        }
                    }
                }
                map.end()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json_of(d: &Data) -> String {
        d.json_text()
    }

    #[test]
    fn json_passes_through_untouched() {
        let d = Data::from_json_slice(br#"{"a": [1, 2.5, "x"]}"#).unwrap();
        assert_eq!(json_of(&d), r#"{"a": [1, 2.5, "x"]}"#);
    }

    #[test]
    fn json_converts_to_equivalent_msgpack() {
        let d = Data::from_json_slice(br#"{"a":[1,-2,2.5,"x",null,true]}"#).unwrap();
        let mut mp = Vec::new();
        d.write_msgpack(&mut mp);
        let v = rmpv::decode::read_value(&mut &mp[..]).unwrap();
        let back = Data::MsgPack(v);
        assert_eq!(json_of(&back), r#"{"a":[1,-2,2.5,"x",null,true]}"#);
    }

    #[test]
    fn binary_becomes_base64_for_json() {
        let d = Data::MsgPack(rmpv::Value::Binary(vec![0, 1, 2, 255]));
        assert_eq!(json_of(&d), "\"AAEC/w==\"");
        let d = Data::MsgPack(rmpv::Value::Map(vec![(
            rmpv::Value::from(7),
            rmpv::Value::from("seven"),
        )]));
        assert_eq!(json_of(&d), r#"{"7":"seven"}"#);
    }

    #[test]
    fn bytes_messagepack_never_uses_are_refused_anywhere() {
        for bytes in [&[0xc1][..], &[0x91, 0xc1], &[0x81, 0xa1, b'k', 0xc1]] {
            let e = Data::from_msgpack_slice(bytes).unwrap_err();
            assert!(
                matches!(e, DataError::InvalidMsgpack(MsgpackError::ReservedByte)),
                "{e:?}"
            );
            assert!(e.to_string().contains("0xc1"), "{e}");
        }
        // 0xc1 inside a string is just a byte of it.
        assert!(Data::from_msgpack_slice(&[0xc4, 1, 0xc1]).is_ok());
        assert!(matches!(
            Data::from_msgpack_slice(&[0x92, 0xc0]),
            Err(DataError::InvalidMsgpack(MsgpackError::CutShort))
        ));
        assert!(Data::from_msgpack_slice(&[0xdd, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn data_one_format_cannot_carry_is_refused() {
        for json in [
            &b"1e400"[..],
            b"[-1e999]",
            br#""\ud800""#,
            br#"{"a":"x\udc00y"}"#,
        ] {
            let e = Data::from_json_slice(json).unwrap_err();
            assert!(matches!(e, DataError::NoMsgpackForm(_)), "{e:?}");
            assert!(e.to_string().contains("MessagePack"), "{e}");
        }
        let bad_utf8 = Data::from_msgpack_slice(&[0xa2, 0xff, 0xfe]).unwrap_err();
        assert!(matches!(bad_utf8, DataError::NoJsonString), "{bad_utf8:?}");
        assert!(bad_utf8.to_string().contains("not UTF-8"), "{bad_utf8}");
        for f in [f64::NAN, f64::INFINITY] {
            let e = Data::from_msgpack(rmpv::Value::Array(vec![rmpv::Value::F64(f)])).unwrap_err();
            assert!(matches!(e, DataError::NoJsonNumber(_)), "{e:?}");
        }
        assert!(Data::from_json_slice(br#"["\ud83d\ude00", 1e300, "a\"[["]"#).is_ok());
    }

    #[test]
    fn both_formats_share_one_nesting_limit() {
        let nested = |depth: usize| format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let msgpack = |depth: usize| {
            let mut b = vec![0x91u8; depth];
            b.push(1);
            b
        };
        assert!(Data::from_json_slice(nested(MAX_DATA_DEPTH).as_bytes()).is_ok());
        assert!(Data::from_msgpack_slice(&msgpack(MAX_DATA_DEPTH)).is_ok());
        let e = Data::from_json_slice(nested(MAX_DATA_DEPTH + 1).as_bytes()).unwrap_err();
        assert!(matches!(e, DataError::TooDeep(33)), "{e:?}");
        assert!(e.to_string().contains("at most 32"), "{e}");
        assert!(Data::from_msgpack_slice(&msgpack(MAX_DATA_DEPTH + 1)).is_err());
        assert!(Data::from_json_slice(nested(200).as_bytes()).is_err());
    }

    #[test]
    fn msgpack_rejects_trailing_bytes() {
        assert!(Data::from_msgpack_slice(&[0xc0, 0xc0]).is_err());
        assert!(Data::from_msgpack_slice(&[0xc0]).is_ok());
    }
}
