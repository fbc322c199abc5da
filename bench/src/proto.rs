//! The ringcast.v1 wire format as the load generator needs it: requests out
//! (JSON or MessagePack) and events in, where a frame holds one event or an
//! array of them. Decoding pulls out only the fields the figures need and
//! allocates nothing for a `message` event, so that the client is not what
//! limits a run.

use std::fmt;

use anyhow::Result;
use clap::ValueEnum;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Json,
    Msgpack,
    /// Socket.IO 4 (Engine.IO 4 over a WebSocket), for the Socket.IO
    /// contender: each request is an event with an ack, named by its action
    /// and carrying the rest of the request; the server answers and emits
    /// ringcast-style event objects inside the Socket.IO packets.
    #[value(name = "socketio")]
    SocketIo,
    /// The Pusher protocol (version 7), for sockudo: subscribe with
    /// `pusher:subscribe`, publish through the signed HTTP API
    /// (`--pusher-app`), deliveries as events whose `data` is a string.
    Pusher,
    /// Centrifugo's JSON protocol: a `connect` command, then `subscribe`
    /// commands; publications arrive as `push` messages, one JSON message
    /// per line; publishers use the server API (`--centrifugo-api-key`).
    Centrifugo,
}

impl Format {
    /// The WebSocket subprotocol to offer, if any.
    pub fn subprotocol(self) -> Option<&'static str> {
        match self {
            Format::Json => Some("ringcast.v1.json"),
            Format::Msgpack => Some("ringcast.v1.msgpack"),
            Format::SocketIo | Format::Pusher | Format::Centrifugo => None,
        }
    }

    /// For the report.
    pub fn name(self) -> &'static str {
        match self {
            Format::SocketIo => "socket.io/4",
            Format::Pusher => "pusher/7",
            Format::Centrifugo => "centrifugo/json",
            _ => self.subprotocol().unwrap_or("?"),
        }
    }

    pub fn encode<T: Serialize>(self, value: &T) -> Result<Message> {
        Ok(match self {
            Format::Json => Message::text(serde_json::to_string(value)?),
            // Named fields: the protocol wants maps with string keys, not the
            // positional arrays rmp-serde writes by default.
            Format::Msgpack => Message::binary(rmp_serde::to_vec_named(value)?),
            Format::SocketIo => Message::text(socketio_event(serde_json::to_value(value)?)?),
            Format::Pusher => Message::text(pusher_request(serde_json::to_value(value)?)?),
            Format::Centrifugo => {
                Message::text(crate::centrifugo::command(serde_json::to_value(value)?)?)
            }
        })
    }
}

/// A subscribe request as `pusher:subscribe`; Pusher clients cannot publish
/// on public channels, so publishes go through the HTTP API instead.
fn pusher_request(request: serde_json::Value) -> Result<String> {
    match (request["action"].as_str(), request["channel"].as_str()) {
        (Some("subscribe"), Some(channel)) => Ok(serde_json::json!({
            "event": "pusher:subscribe",
            "data": {"channel": channel},
        })
        .to_string()),
        _ => anyhow::bail!("only subscribe goes over a Pusher WebSocket"),
    }
}

/// `{"action": A, "id": N, rest…}` as the Socket.IO packet `42N["A",{rest…}]`
/// (an EVENT asking for an ack with id N).
fn socketio_event(request: serde_json::Value) -> Result<String> {
    let serde_json::Value::Object(mut fields) = request else {
        anyhow::bail!("a Socket.IO request must be an object");
    };
    let action = fields
        .remove("action")
        .and_then(|a| a.as_str().map(str::to_string))
        .ok_or_else(|| anyhow::anyhow!("a request without an action"))?;
    let id = fields.remove("id").and_then(|i| i.as_u64());
    let args = serde_json::to_string(&(action, fields))?;
    Ok(match id {
        Some(id) => format!("42{id}{args}"),
        None => format!("42{args}"),
    })
}

/// One Socket.IO packet in a text frame: an EVENT (`42["message",{…}]`)
/// yields its event object, an ACK (`43N[{…}]`) its answer with id N;
/// Engine.IO control packets (ping, noop) yield nothing.
fn decode_socketio(text: &str, each: &mut impl FnMut(Event)) -> Result<()> {
    if let Some(rest) = text.strip_prefix("42") {
        let (_, event): (IgnoredAny, Event) = serde_json::from_str(rest)?;
        each(event);
    } else if let Some(rest) = text.strip_prefix("43") {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let id = rest[..digits].parse::<u64>().ok();
        let (mut event,): (Event,) = serde_json::from_str(&rest[digits..])?;
        event.id = Num(id);
        each(event);
    }
    Ok(())
}

#[derive(Serialize)]
pub struct Subscribe<'a> {
    pub action: &'static str,
    pub channel: &'a str,
    pub id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conflate_ms: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub snapshot: bool,
}

impl<'a> Subscribe<'a> {
    pub fn new(channel: &'a str, id: u64) -> Self {
        Subscribe {
            action: "subscribe",
            channel,
            id,
            conflate_ms: None,
            snapshot: false,
        }
    }
}

#[derive(Serialize)]
pub struct Publish<'a> {
    pub action: &'static str,
    pub channel: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<&'a str>,
    pub data: Payload<'a>,
    pub id: u64,
}

/// The published `data`: `t` is the publish time in ns since the UNIX
/// epoch, `p` pads the value to the requested size.
#[derive(Serialize)]
pub struct Payload<'a> {
    pub t: u64,
    pub p: &'a str,
}

impl<'a> Publish<'a> {
    pub fn new(channel: &'a str, t: u64, pad: &'a str, id: u64) -> Self {
        Publish {
            action: "publish",
            channel,
            key: None,
            data: Payload { t, p: pad },
            id,
        }
    }
}

/// Padding that brings an encoded `data` value to about `target` bytes.
pub fn padding(format: Format, target: usize) -> String {
    let bare = Payload {
        t: u64::MAX / 2,
        p: "",
    };
    let overhead = match format {
        Format::Json | Format::SocketIo | Format::Pusher | Format::Centrifugo => {
            serde_json::to_vec(&bare).map(|v| v.len()).unwrap_or(32)
        }
        Format::Msgpack => rmp_serde::to_vec_named(&bare)
            .map(|v| v.len())
            .unwrap_or(16),
    };
    "x".repeat(target.saturating_sub(overhead))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    Subscribed,
    Message,
    Published,
    Error,
    #[default]
    Other,
}

/// One server event, reduced to what the load generator counts.
#[derive(Debug, Default, Deserialize)]
pub struct Event {
    #[serde(rename = "type", default)]
    pub kind: Kind,
    #[serde(default)]
    pub id: Num,
    /// `data.t` when `data` is a map holding an unsigned integer `t`.
    #[serde(rename = "data", default)]
    pub stamp: Stamp,
    /// On a conflating subscription: the messages this one replaced.
    #[serde(default)]
    pub conflated: Num,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// A Pusher event's name (`event`), read as a kind when `type` is absent.
    #[serde(rename = "event", default)]
    pub pusher: Kind,
    /// A Centrifugo publication: `{"push":{"channel":..,"pub":{"data":..}}}`.
    #[serde(default)]
    push: Option<CentrifugoPush>,
    /// A Centrifugo subscribe reply: `{"id":N,"subscribe":{..}}`.
    #[serde(default)]
    subscribe: Option<IgnoredAny>,
    /// A Centrifugo error reply: `{"id":N,"error":{"code":..,"message":..}}`.
    #[serde(default)]
    error: Option<CentrifugoError>,
}

#[derive(Debug, Default, Deserialize)]
struct CentrifugoPush {
    #[serde(rename = "pub", default)]
    publication: Option<CentrifugoPublication>,
}

#[derive(Debug, Default, Deserialize)]
struct CentrifugoPublication {
    #[serde(default)]
    data: Stamp,
}

#[derive(Debug, Default, Deserialize)]
struct CentrifugoError {
    #[serde(default)]
    code: Num,
    #[serde(default)]
    message: Option<String>,
}

impl Event {
    /// Reads the other protocols' shapes into `kind` (and the stamp, code
    /// and message) when the ringcast `type` is absent.
    fn normalise(mut self) -> Event {
        if self.kind != Kind::Other {
            return self;
        }
        self.kind = self.pusher;
        if let Some(push) = self.push.take() {
            if let Some(publication) = push.publication {
                self.kind = Kind::Message;
                self.stamp = publication.data;
            }
        } else if self.subscribe.is_some() {
            self.kind = Kind::Subscribed;
        } else if let Some(error) = self.error.take() {
            self.kind = Kind::Error;
            self.code = error.code.0.map(|c| c.to_string());
            self.message = error.message;
        }
        self
    }
}

/// Calls `each` for every event in a frame, whether the frame holds one event
/// object or an array of them. Text frames are JSON and binary frames
/// MessagePack, whatever was negotiated; control frames hold no events.
pub fn decode(msg: &Message, mut each: impl FnMut(Event)) -> Result<()> {
    match msg {
        // ringcast frames hold an object or an array; Socket.IO packets
        // start with their type digit.
        Message::Text(text) if text.as_bytes().first().is_some_and(u8::is_ascii_digit) => {
            decode_socketio(text.as_str(), &mut each)?;
        }
        // One JSON value (ringcast and the Node relays: an object or an
        // array), or several objects one per line (Centrifugo, which puts
        // `}\n{` between them). Each value is parsed strictly, so a relay's
        // framing bug (`{..}{..}`) is still reported as undecodable.
        Message::Text(text) => {
            let text = text.as_str();
            let values: &mut dyn Iterator<Item = &str> = if text.contains("}\n{") {
                &mut text.split('\n').filter(|l| !l.trim().is_empty())
            } else {
                &mut std::iter::once(text)
            };
            for value in values {
                let mut de = serde_json::Deserializer::from_str(value);
                de.deserialize_any(FrameVisitor(&mut each))?;
                de.end()?;
            }
        }
        Message::Binary(bytes) => {
            let mut de = rmp_serde::Deserializer::from_read_ref(&bytes[..]);
            de.deserialize_any(FrameVisitor(&mut each))?;
        }
        _ => {}
    }
    Ok(())
}

struct FrameVisitor<'f, F>(&'f mut F);

impl<'de, F: FnMut(Event)> Visitor<'de> for FrameVisitor<'_, F> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event object or an array of event objects")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let event = Event::deserialize(de::value::MapAccessDeserializer::new(map))?;
        (self.0)(event.normalise());
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(event) = seq.next_element::<Event>()? {
            (self.0)(event.normalise());
        }
        Ok(())
    }
}

/// Visitor methods that accept a value of a type we do not care about and
/// yield the default (nothing found).
macro_rules! default_for {
    ($($name:ident: $ty:ty),* $(,)?) => {
        $(fn $name<E: de::Error>(self, _: $ty) -> Result<Self::Value, E> {
            Ok(Default::default())
        })*
    };
}

/// Visitor methods shared by the lenient field types: containers and
/// wrappers are skipped rather than rejected.
macro_rules! skip_compound {
    () => {
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Default::default())
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            IgnoredAny::deserialize(d)?;
            Ok(Default::default())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(Default::default())
        }
    };
}

/// An unsigned integer if the value is one, `None` for any other value. Used
/// for `id` (which the protocol also allows to be a string).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Num(pub Option<u64>);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NumVisitor)
    }
}

struct NumVisitor;

impl<'de> Visitor<'de> for NumVisitor {
    type Value = Num;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
        Ok(Num(Some(v)))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
        Ok(Num(u64::try_from(v).ok()))
    }

    default_for!(visit_bool: bool, visit_f64: f64, visit_str: &str, visit_bytes: &[u8]);
    skip_compound!();

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Num, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Num(None))
    }
}

/// The `t` field of a `data` map, `None` for any other `data`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(pub Option<u64>);

impl<'de> Deserialize<'de> for Stamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StampVisitor)
    }
}

struct StampVisitor;

impl<'de> Visitor<'de> for StampVisitor {
    type Value = Stamp;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }

    default_for!(
        visit_bool: bool,
        visit_u64: u64,
        visit_i64: i64,
        visit_f64: f64,
        visit_bytes: &[u8],
    );
    skip_compound!();

    /// Pusher carries `data` as a string holding JSON.
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Stamp, E> {
        if !v.starts_with('{') {
            return Ok(Stamp(None));
        }
        let mut inner = serde_json::Deserializer::from_str(v);
        Ok(inner.deserialize_any(StampVisitor).unwrap_or(Stamp(None)))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Stamp, A::Error> {
        let mut t = None;
        while let Some(is_t) = map.next_key_seed(KeyIs("t"))? {
            if is_t {
                t = map.next_value::<Num>()?.0;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Stamp(t))
    }
}

/// Compares a map key with a name without allocating it.
struct KeyIs(&'static str);

impl<'de> DeserializeSeed<'de> for KeyIs {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyIs {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<bool, E> {
        Ok(v == self.0.as_bytes())
    }

    default_for!(visit_bool: bool, visit_u64: u64, visit_i64: i64, visit_f64: f64);
    skip_compound!();

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KindVisitor)
    }
}

struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an event type")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
        Ok(match v {
            "message" => Kind::Message,
            "published" => Kind::Published,
            "subscribed" | "pusher_internal:subscription_succeeded" => Kind::Subscribed,
            "error" | "pusher:error" => Kind::Error,
            _ => Kind::Other,
        })
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Kind, E> {
        match std::str::from_utf8(v) {
            Ok(s) => self.visit_str(s),
            Err(_) => Ok(Kind::Other),
        }
    }

    default_for!(visit_bool: bool, visit_u64: u64, visit_i64: i64, visit_f64: f64);
    skip_compound!();

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Kind::Other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(msg: Message) -> Vec<Event> {
        let mut out = Vec::new();
        decode(&msg, |e| out.push(e)).unwrap();
        out
    }

    /// What `format` sends for a subscribe to `bench.1` with id 3, as JSON.
    fn subscribe_as_sent(format: Format) -> serde_json::Value {
        let Message::Text(text) = format.encode(&Subscribe::new("bench.1", 3)).unwrap() else {
            panic!("a text frame");
        };
        serde_json::from_str(text.as_str()).unwrap()
    }

    #[test]
    fn pusher_events() {
        assert_eq!(
            subscribe_as_sent(Format::Pusher),
            serde_json::json!({"event": "pusher:subscribe", "data": {"channel": "bench.1"}})
        );
        assert!(Format::Pusher
            .encode(&Publish::new("bench.1", 1, "x", 1))
            .is_err());
        let got = events(Message::text(
            r#"{"event":"pusher_internal:subscription_succeeded","channel":"bench.1","data":"{}"}"#,
        ));
        assert_eq!(got[0].kind, Kind::Subscribed);
        let got = events(Message::text(
            r#"{"event":"message","channel":"bench.1","data":"{\"t\":77,\"p\":\"xx\"}"}"#,
        ));
        assert_eq!(
            (got[0].kind, got[0].stamp),
            (Kind::Message, Stamp(Some(77)))
        );
    }

    #[test]
    fn centrifugo_messages_one_per_line() {
        assert_eq!(
            subscribe_as_sent(Format::Centrifugo),
            serde_json::json!({"id": 3, "subscribe": {"channel": "bench.1"}})
        );
        let got = events(Message::text(
            "{\"id\":3,\"subscribe\":{}}\n\
             {\"push\":{\"channel\":\"bench.1\",\"pub\":{\"data\":{\"t\":77,\"p\":\"xx\"},\"offset\":4}}}\n\
             {}\n\
             {\"id\":4,\"error\":{\"code\":103,\"message\":\"permission denied\"}}",
        ));
        assert_eq!(got.len(), 4, "every line is a message");
        assert!(
            decode(
                &Message::text(r#"{"type":"message"}{"type":"message"}"#),
                |_| {}
            )
            .is_err(),
            "values run together on one line are a framing error"
        );
        assert_eq!((got[0].kind, got[0].id), (Kind::Subscribed, Num(Some(3))));
        assert_eq!(
            (got[1].kind, got[1].stamp),
            (Kind::Message, Stamp(Some(77)))
        );
        assert_eq!(got[2].kind, Kind::Other, "a ping counts as nothing");
        assert_eq!(got[3].kind, Kind::Error);
        assert_eq!(got[3].code.as_deref(), Some("103"));
        assert_eq!(got[3].message.as_deref(), Some("permission denied"));
        // ringcast's own events are read as before.
        let got = events(Message::text(
            r#"{"type":"subscribed","channel":"c","id":1}"#,
        ));
        assert_eq!(got[0].kind, Kind::Subscribed);
    }

    #[test]
    fn socketio_packets() {
        let request = Subscribe::new("bench.3", 7);
        let Message::Text(text) = Format::SocketIo.encode(&request).unwrap() else {
            panic!("a text frame");
        };
        assert_eq!(text.as_str(), r#"427["subscribe",{"channel":"bench.3"}]"#);
        let got = events(Message::text(r#"4312[{"type":"published","channel":"c"}]"#));
        assert_eq!((got[0].kind, got[0].id), (Kind::Published, Num(Some(12))));
        let got = events(Message::text(
            r#"42["message",{"type":"message","channel":"c","data":{"t":99,"p":"x"}}]"#,
        ));
        assert_eq!(
            (got[0].kind, got[0].stamp),
            (Kind::Message, Stamp(Some(99)))
        );
        assert!(
            events(Message::text("2")).is_empty(),
            "a ping carries no event"
        );
    }

    #[test]
    fn json_single_and_batch() {
        let one = events(Message::text(
            r#"{"type":"message","channel":"c","seq":5,"data":{"p":"x","t":42}}"#,
        ));
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].kind, Kind::Message);
        assert_eq!(one[0].stamp, Stamp(Some(42)));

        let batch = events(Message::text(
            r#"[{"type":"message","channel":"c","seq":1,"data":"plain"},
                {"type":"published","channel":"c","seq":2,"id":7},
                {"type":"subscribed","channel":"c","seq":0,"id":"s1","epoch":"e"},
                {"type":"error","code":"bad_channel","message":"no"},
                {"type":"future","x":[1,{"y":null}]}]"#,
        ));
        let kinds: Vec<Kind> = batch.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [
                Kind::Message,
                Kind::Published,
                Kind::Subscribed,
                Kind::Error,
                Kind::Other
            ]
        );
        assert_eq!(batch[0].stamp, Stamp(None));
        assert_eq!(batch[1].id, Num(Some(7)));
        assert_eq!(batch[2].id, Num(None));
        assert_eq!(batch[3].code.as_deref(), Some("bad_channel"));
    }

    #[test]
    fn msgpack_single_and_batch() {
        #[derive(Serialize)]
        struct Ev<'a> {
            r#type: &'a str,
            channel: &'a str,
            seq: u64,
            data: Payload<'a>,
        }
        let ev = Ev {
            r#type: "message",
            channel: "c",
            seq: 3,
            data: Payload { t: 99, p: "pad" },
        };
        let one = events(Message::binary(rmp_serde::to_vec_named(&ev).unwrap()));
        assert_eq!(one[0].kind, Kind::Message);
        assert_eq!(one[0].stamp, Stamp(Some(99)));
        let batch = events(Message::binary(
            rmp_serde::to_vec_named(&[&ev, &ev]).unwrap(),
        ));
        assert_eq!(batch.len(), 2);
        assert_eq!(batch[1].stamp, Stamp(Some(99)));
    }

    #[test]
    fn requests_and_padding() {
        let m = Format::Json
            .encode(&Publish::new("bench.0", 1, "xx", 3))
            .unwrap();
        assert_eq!(
            m.to_text().unwrap(),
            r#"{"action":"publish","channel":"bench.0","data":{"t":1,"p":"xx"},"id":3}"#
        );
        for format in [
            Format::Json,
            Format::Msgpack,
            Format::SocketIo,
            Format::Pusher,
            Format::Centrifugo,
        ] {
            let pad = padding(format, 100);
            let t = 1_700_000_000_000_000_000;
            let len = match format {
                Format::Json | Format::SocketIo | Format::Pusher | Format::Centrifugo => {
                    serde_json::to_vec(&Payload { t, p: &pad }).unwrap().len()
                }
                Format::Msgpack => rmp_serde::to_vec_named(&Payload { t, p: &pad })
                    .unwrap()
                    .len(),
            };
            assert!((99..=102).contains(&len), "{format:?}: {len}");
        }
    }
}
