//! Published `data`: kept in the form it arrived in and converted to the
//! other format once per publication (never per subscriber).
//!
//! JSON arrives as raw text and goes to JSON subscribers untouched. MessagePack
//! arrives as a value; for JSON subscribers, binary and extension values become
//! base64 strings and non-string map keys become their JSON text.

use base64::Engine;
use serde::ser::{SerializeMap, SerializeSeq};
use serde::{Serialize, Serializer};
use serde_json::value::RawValue;

/// Data of one publication, in the format it was published in.
#[derive(Debug, Clone)]
pub enum Data {
    Json(Box<RawValue>),
    MsgPack(rmpv::Value),
}

impl Data {
    /// Parses a JSON document (an HTTP body, say) into publication data.
    pub fn from_json_slice(bytes: &[u8]) -> Result<Data, String> {
        serde_json::from_slice::<Box<RawValue>>(bytes)
            .map(Data::Json)
            .map_err(|e| format!("invalid JSON: {e}"))
    }

    /// Parses one MessagePack value (an HTTP body, say) into publication data.
    pub fn from_msgpack_slice(bytes: &[u8]) -> Result<Data, String> {
        let mut rd = bytes;
        let value = rmpv::decode::read_value_with_max_depth(&mut rd, super::request::MAX_DEPTH)
            .map_err(|e| format!("invalid MessagePack: {e}"))?;
        if !rd.is_empty() {
            return Err("invalid MessagePack: trailing bytes after the value".into());
        }
        Ok(Data::MsgPack(value))
    }

    /// Appends the JSON form of the data.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        match self {
            Data::Json(raw) => out.extend_from_slice(raw.get().as_bytes()),
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
            Data::Json(raw) => {
                // Valid JSON always deserializes into a MessagePack value; the
                // raw text was validated when it was parsed.
                let v: rmpv::Value = serde_json::from_str(raw.get()).unwrap_or(rmpv::Value::Nil);
                rmpv::encode::write_value(out, &v)
                    .expect("writing MessagePack to a Vec cannot fail")
            }
        }
    }
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
    fn msgpack_rejects_trailing_bytes() {
        assert!(Data::from_msgpack_slice(&[0xc0, 0xc0]).is_err());
        assert!(Data::from_msgpack_slice(&[0xc0]).is_ok());
    }
}
