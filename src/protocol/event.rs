//! Server-to-client events, encoded into frame payload fragments.
//!
//! A `message` event is encoded once per publication into both formats
//! ([`encode_message`]); the fan-out shares those bytes with every subscriber
//! and batches them into array frames without touching them again.

use serde::Serialize;

use super::{Data, ErrorCode, Format, Id};

/// Every event except `message`, which has its own encode-once path.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Event<'a> {
    Subscribed {
        channel: &'a str,
        seq: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Id>,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    Unsubscribed {
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Id>,
        /// Why the server ended the subscription (`forbidden` after a
        /// refresh whose caps no longer allow it); absent when the client
        /// asked.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
    },
    /// A `refresh` was accepted: the new token applies from now on.
    Refreshed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Id>,
        /// The new token's `exp`, Unix seconds.
        exp: u64,
    },
    Published {
        channel: &'a str,
        seq: u64,
        id: &'a Id,
    },
    Error {
        #[serde(serialize_with = "code_str")]
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Id>,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
    },
}

fn code_str<S: serde::Serializer>(code: &ErrorCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(code.as_str())
}

/// Encodes one event as a complete frame payload in `format`.
pub fn encode_event(format: Format, event: &Event<'_>) -> Vec<u8> {
    match format {
        Format::Json => serde_json::to_vec(event).expect("events always serialize to JSON"),
        Format::MsgPack => {
            rmp_serde::to_vec_named(event).expect("events always serialize to MessagePack")
        }
    }
}

/// Encodes a `message` event into its JSON and MessagePack payloads.
///
/// Hand-assembled around the data's own bytes: the data was converted once
/// per format and is copied in as is, which a derived serializer cannot do.
pub fn encode_message(
    channel: &str,
    seq: Option<u64>,
    key: Option<&str>,
    data: &Data,
) -> (Vec<u8>, Vec<u8>) {
    let w = "writing to a Vec cannot fail";
    let mut json = Vec::with_capacity(48 + channel.len() + 64);
    json.extend_from_slice(br#"{"type":"message","channel":"#);
    serde_json::to_writer(&mut json, channel).expect(w);
    if let Some(seq) = seq {
        json.extend_from_slice(br#","seq":"#);
        json.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    }
    if let Some(key) = key {
        json.extend_from_slice(br#","key":"#);
        serde_json::to_writer(&mut json, key).expect(w);
    }
    json.extend_from_slice(br#","data":"#);
    data.write_json(&mut json);
    json.push(b'}');

    let mut mp = Vec::with_capacity(32 + channel.len() + 64);
    let fields = 3 + u32::from(seq.is_some()) + u32::from(key.is_some());
    rmp::encode::write_map_len(&mut mp, fields).expect(w);
    rmp::encode::write_str(&mut mp, "type").expect(w);
    rmp::encode::write_str(&mut mp, "message").expect(w);
    rmp::encode::write_str(&mut mp, "channel").expect(w);
    rmp::encode::write_str(&mut mp, channel).expect(w);
    if let Some(seq) = seq {
        rmp::encode::write_str(&mut mp, "seq").expect(w);
        rmp::encode::write_uint(&mut mp, seq).expect(w);
    }
    if let Some(key) = key {
        rmp::encode::write_str(&mut mp, "key").expect(w);
        rmp::encode::write_str(&mut mp, key).expect(w);
    }
    rmp::encode::write_str(&mut mp, "data").expect(w);
    data.write_msgpack(&mut mp);
    (json, mp)
}

/// A `message` event (as [`encode_message`] made it) with `conflated`
/// added: how many earlier messages of its key it replaced. One copy per
/// conflated delivery, shared by every subscriber it goes to.
pub fn with_conflated(json: &[u8], msgpack: &[u8], conflated: u32) -> (Vec<u8>, Vec<u8>) {
    let w = "writing to a Vec cannot fail";
    let mut j = Vec::with_capacity(json.len() + 24);
    j.extend_from_slice(&json[..json.len() - 1]);
    j.extend_from_slice(br#","conflated":"#);
    j.extend_from_slice(itoa::Buffer::new().format(conflated).as_bytes());
    j.push(b'}');
    // The map header is one byte (a fixmap: a message has at most six
    // fields): one more field.
    let mut m = Vec::with_capacity(msgpack.len() + 16);
    m.push(msgpack[0] + 1);
    m.extend_from_slice(&msgpack[1..]);
    rmp::encode::write_str(&mut m, "conflated").expect(w);
    rmp::encode::write_uint(&mut m, u64::from(conflated)).expect(w);
    (j, m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_the_same_event_in_both_formats() {
        let data = Data::from_json_slice(br#"{"p":1.5,"q":"\u00e9"}"#).unwrap();
        let (json, mp) = encode_message("prices.\"X\"", Some(42), None, &data);
        let j: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let m: serde_json::Value = rmp_serde::from_slice(&mp).unwrap();
        assert_eq!(j, m);
        assert_eq!(j["channel"], "prices.\"X\"");
        assert_eq!(j["seq"], 42);
        assert_eq!(j["data"]["q"], "é");
        assert!(j.get("key").is_none());
    }

    #[test]
    fn a_keyed_and_conflated_message_is_the_same_event_in_both_formats() {
        let data = Data::from_json_slice(br#"[1,2]"#).unwrap();
        let (json, mp) = encode_message("c", Some(7), Some("AAPL \"é\""), &data);
        let (json, mp) = with_conflated(&json, &mp, 3);
        let j: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let m: serde_json::Value = rmp_serde::from_slice(&mp).unwrap();
        assert_eq!(j, m);
        assert_eq!(j["key"], "AAPL \"é\"");
        assert_eq!(j["conflated"], 3);
        assert_eq!(j["seq"], 7);
        assert_eq!(j["data"], serde_json::json!([1, 2]));
    }

    #[test]
    fn events_carry_type_and_skip_absent_fields() {
        let id = Id::Int(7);
        let e = Event::Subscribed {
            channel: "c",
            seq: 3,
            epoch: Some("e1"),
            id: Some(&id),
            recovered: None,
        };
        let j = String::from_utf8(encode_event(Format::Json, &e)).unwrap();
        assert_eq!(
            j,
            r#"{"type":"subscribed","channel":"c","seq":3,"epoch":"e1","id":7}"#
        );
        let m: serde_json::Value =
            rmp_serde::from_slice(&encode_event(Format::MsgPack, &e)).unwrap();
        assert_eq!(m["type"], "subscribed");
        assert_eq!(m["id"], 7);
        let err = Event::Error {
            code: ErrorCode::BadChannel,
            message: "no",
            id: None,
            channel: Some("$x"),
        };
        let j = String::from_utf8(encode_event(Format::Json, &err)).unwrap();
        assert_eq!(
            j,
            r#"{"type":"error","code":"bad_channel","message":"no","channel":"$x"}"#
        );
    }
}
