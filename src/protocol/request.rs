//! Client requests: one object or an array of objects per frame, decoded
//! into [`Request`]s or per-request errors that keep the request's `id`.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use super::data::{self, MAX_DATA_DEPTH};

use super::{validate_channel, validate_key, Data, DataError, ErrorCode, Format};

/// Deepest nesting of a MessagePack frame: an array of requests, a request,
/// then its data, and one level more so that data nested too deep fails
/// its own request (with a reason) rather than the whole frame, as in
/// JSON (whose frames have serde_json's own limit of 128). Hostile input
/// cannot exhaust the stack either way.
const MAX_FRAME_DEPTH: usize = MAX_DATA_DEPTH + 3;

/// A request `id`, echoed back verbatim: an integer or a string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Id {
    Int(i64),
    UInt(u64),
    Str(String),
}

/// The most `conflate_ms` a subscription may ask for.
pub const MAX_CONFLATE_MS: u64 = 60_000;

#[derive(Debug, Clone)]
pub enum Action {
    Subscribe {
        since: Option<u64>,
        epoch: Option<String>,
        /// Send the latest message of every key first.
        snapshot: bool,
        /// At most one message per key per this many ms.
        conflate_ms: Option<u32>,
    },
    Unsubscribe,
    Publish {
        data: Data,
        /// The entity the publication updates.
        key: Option<std::sync::Arc<str>>,
    },
    /// Replace the connection's token.
    Refresh {
        token: String,
    },
}

/// One well-formed request.
#[derive(Debug, Clone)]
pub struct Request {
    pub id: Option<Id>,
    /// Empty for `refresh`, which names no channel.
    pub channel: String,
    pub action: Action,
}

/// Why a request (or a whole frame, then without `id`) was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    pub code: ErrorCode,
    pub message: String,
    pub id: Option<Id>,
    pub channel: Option<String>,
}

impl RequestError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RequestError {
            code,
            message: message.into(),
            id: None,
            channel: None,
        }
    }
}

/// The fields of a request as they travel; `D` is the format's data value.
#[derive(Deserialize)]
#[serde(bound(deserialize = "D: Deserialize<'de>"))]
struct WireRequest<D> {
    action: Option<String>,
    channel: Option<String>,
    id: Option<Id>,
    since: Option<u64>,
    epoch: Option<String>,
    token: Option<String>,
    key: Option<String>,
    snapshot: Option<bool>,
    conflate_ms: Option<u64>,
    #[serde(default = "Option::default", deserialize_with = "present")]
    data: Option<D>,
}

/// Distinguishes `"data": null` (present, a null value) from a missing field.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Just the id, to answer a request whose other fields failed to parse.
#[derive(Deserialize)]
struct IdOnly {
    id: Option<Id>,
}

/// Decodes one frame's payload. The outer error refuses the whole frame;
/// the inner results are per request, in order.
pub fn decode_requests(
    format: Format,
    payload: &[u8],
    max_batch: usize,
) -> Result<Vec<Result<Request, RequestError>>, RequestError> {
    match format {
        Format::Json => decode_json(payload, max_batch),
        Format::MsgPack => decode_msgpack(payload, max_batch),
    }
}

fn too_many(n: usize, max_batch: usize) -> RequestError {
    RequestError::new(
        ErrorCode::TooLarge,
        format!("a frame may hold at most {max_batch} requests; this one holds {n}"),
    )
}

fn decode_json(
    payload: &[u8],
    max_batch: usize,
) -> Result<Vec<Result<Request, RequestError>>, RequestError> {
    let bad = |e: serde_json::Error| {
        RequestError::new(ErrorCode::BadRequest, format!("invalid JSON: {e}"))
    };
    let first = payload.iter().find(|b| !b.is_ascii_whitespace());
    let items: Vec<&RawValue> = if first == Some(&b'[') {
        serde_json::from_slice(payload).map_err(bad)?
    } else {
        vec![serde_json::from_slice(payload).map_err(bad)?]
    };
    if items.len() > max_batch {
        return Err(too_many(items.len(), max_batch));
    }
    Ok(items
        .into_iter()
        .map(
            |raw| match serde_json::from_str::<WireRequest<Box<RawValue>>>(raw.get()) {
                Ok(w) => validate(w, Data::from_json),
                Err(e) => Err(RequestError {
                    id: serde_json::from_str::<IdOnly>(raw.get())
                        .ok()
                        .and_then(|i| i.id),
                    ..RequestError::new(ErrorCode::BadRequest, format!("invalid request: {e}"))
                }),
            },
        )
        .collect())
}

fn decode_msgpack(
    payload: &[u8],
    max_batch: usize,
) -> Result<Vec<Result<Request, RequestError>>, RequestError> {
    let value = data::decode_msgpack(payload, MAX_FRAME_DEPTH).map_err(|e| {
        RequestError::new(
            ErrorCode::BadRequest,
            DataError::InvalidMsgpack(e).to_string(),
        )
    })?;
    let items = match value {
        rmpv::Value::Array(items) => items,
        other => vec![other],
    };
    if items.len() > max_batch {
        return Err(too_many(items.len(), max_batch));
    }
    Ok(items
        .into_iter()
        .map(|v| {
            let id = match &v {
                rmpv::Value::Map(entries) => entries
                    .iter()
                    .find(|(k, _)| k.as_str() == Some("id"))
                    .and_then(|(_, v)| {
                        rmpv::ext::from_value::<IdOnly>(rmpv::Value::Map(vec![(
                            "id".into(),
                            v.clone(),
                        )]))
                        .ok()
                    })
                    .and_then(|i| i.id),
                _ => None,
            };
            match rmpv::ext::from_value::<WireRequest<rmpv::Value>>(v) {
                Ok(w) => validate(w, Data::from_msgpack),
                Err(e) => Err(RequestError {
                    id,
                    ..RequestError::new(ErrorCode::BadRequest, format!("invalid request: {e}"))
                }),
            }
        })
        .collect())
}

fn validate<D>(
    w: WireRequest<D>,
    to_data: impl FnOnce(D) -> Result<Data, DataError>,
) -> Result<Request, RequestError> {
    let fail = |code, message: &str, channel: Option<String>| RequestError {
        code,
        message: message.to_string(),
        id: w.id.clone(),
        channel,
    };
    let Some(action) = w.action.as_deref() else {
        return Err(fail(ErrorCode::BadRequest, "missing field `action`", None));
    };
    if action == "refresh" {
        let Some(token) = w.token.clone() else {
            return Err(fail(ErrorCode::BadRequest, "missing field `token`", None));
        };
        return Ok(Request {
            id: w.id,
            channel: String::new(),
            action: Action::Refresh { token },
        });
    }
    if !matches!(action, "subscribe" | "unsubscribe" | "publish") {
        return Err(fail(
            ErrorCode::UnknownAction,
            &format!(
                "unknown action `{}`",
                action.chars().take(64).collect::<String>()
            ),
            None,
        ));
    }
    let Some(channel) = w.channel.clone() else {
        return Err(fail(ErrorCode::BadRequest, "missing field `channel`", None));
    };
    if let Err(why) = validate_channel(&channel) {
        let shown = (channel.len() <= 255).then_some(channel);
        return Err(fail(ErrorCode::BadChannel, why, shown));
    }
    let action = match action {
        "subscribe" => {
            let conflate_ms = match w.conflate_ms {
                None => None,
                Some(ms @ 1..=MAX_CONFLATE_MS) => Some(ms as u32),
                Some(_) => {
                    let why = format!("`conflate_ms` must be 1 to {MAX_CONFLATE_MS}");
                    return Err(fail(ErrorCode::BadRequest, &why, Some(channel)));
                }
            };
            Action::Subscribe {
                since: w.since,
                epoch: w.epoch,
                snapshot: w.snapshot.unwrap_or(false),
                conflate_ms,
            }
        }
        "unsubscribe" => Action::Unsubscribe,
        _ => match w.data {
            Some(d) => match to_data(d) {
                Ok(data) => {
                    let key = match w.key.as_deref().map(|k| validate_key(k).map(|()| k)) {
                        None => None,
                        Some(Ok(k)) => Some(k.into()),
                        Some(Err(why)) => {
                            return Err(fail(ErrorCode::BadRequest, why, Some(channel)))
                        }
                    };
                    Action::Publish { data, key }
                }
                Err(why) => {
                    let why = why.to_string();
                    return Err(fail(ErrorCode::BadRequest, &why, Some(channel)));
                }
            },
            None => {
                return Err(fail(
                    ErrorCode::BadRequest,
                    "missing field `data`",
                    Some(channel),
                ))
            }
        },
    };
    Ok(Request {
        id: w.id,
        channel,
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one(format: Format, payload: &[u8]) -> Result<Request, RequestError> {
        let mut v = decode_requests(format, payload, 100).unwrap();
        assert_eq!(v.len(), 1);
        v.pop().unwrap()
    }

    fn mp(v: serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(&v).unwrap()
    }

    #[test]
    fn decodes_each_action_in_both_formats() {
        let reqs = [
            serde_json::json!({"action":"subscribe","channel":"a","id":1,"since":5,"epoch":"e"}),
            serde_json::json!({"action":"unsubscribe","channel":"a","id":"x"}),
            serde_json::json!({"action":"publish","channel":"a","data":null}),
        ];
        for r in reqs {
            for (f, bytes) in [
                (Format::Json, serde_json::to_vec(&r).unwrap()),
                (Format::MsgPack, mp(r.clone())),
            ] {
                let req = one(f, &bytes).unwrap();
                assert_eq!(req.channel, "a");
                match (r["action"].as_str().unwrap(), &req.action) {
                    ("subscribe", Action::Subscribe { since, epoch, .. }) => {
                        assert_eq!(*since, Some(5));
                        assert_eq!(epoch.as_deref(), Some("e"));
                        assert_eq!(req.id, Some(Id::Int(1)));
                    }
                    ("unsubscribe", Action::Unsubscribe) => {
                        assert_eq!(req.id, Some(Id::Str("x".into())))
                    }
                    ("publish", Action::Publish { .. }) => assert_eq!(req.id, None),
                    other => panic!("wrong decode {other:?}"),
                }
            }
        }
    }

    #[test]
    fn errors_have_codes_and_keep_the_id() {
        let cases: [(&str, ErrorCode); 6] = [
            (
                r#"{"action":"fly","channel":"a","id":3}"#,
                ErrorCode::UnknownAction,
            ),
            (r#"{"channel":"a","id":3}"#, ErrorCode::BadRequest),
            (r#"{"action":"subscribe","id":3}"#, ErrorCode::BadRequest),
            (
                r#"{"action":"subscribe","channel":"a b","id":3}"#,
                ErrorCode::BadChannel,
            ),
            (
                r#"{"action":"publish","channel":"a","id":3}"#,
                ErrorCode::BadRequest,
            ),
            (
                r#"{"action":"subscribe","channel":5,"id":3}"#,
                ErrorCode::BadRequest,
            ),
        ];
        for (text, code) in cases {
            for (f, bytes) in [
                (Format::Json, text.as_bytes().to_vec()),
                (Format::MsgPack, mp(serde_json::from_str(text).unwrap())),
            ] {
                let e = one(f, &bytes).unwrap_err();
                assert_eq!(e.code, code, "{text}");
                assert_eq!(e.id, Some(Id::Int(3)), "{text}");
            }
        }
    }

    #[test]
    fn frame_level_errors() {
        let e = decode_requests(Format::Json, b"{nope", 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = decode_requests(Format::MsgPack, &[0x82, 0xa1], 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let batch = format!(
            "[{}]",
            [r#"{"action":"subscribe","channel":"a"}"#; 11].join(",")
        );
        let e = decode_requests(Format::Json, batch.as_bytes(), 10).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        let v = decode_requests(
            Format::Json,
            b"[1, {\"action\":\"subscribe\",\"channel\":\"a\"}]",
            10,
        )
        .unwrap();
        assert!(v[0].is_err() && v[1].is_ok());
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let deep = vec![0x91u8; 100_000];
        assert!(decode_requests(Format::MsgPack, &deep, 10).is_err());
        let deep = "[".repeat(100_000);
        assert!(decode_requests(Format::Json, deep.as_bytes(), 10).is_err());
    }

    proptest! {
        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_requests(Format::Json, &bytes, 100);
            let _ = decode_requests(Format::MsgPack, &bytes, 100);
        }

        #[test]
        fn any_json_shaped_request_decodes_or_fails_cleanly(
            action in "(subscribe|unsubscribe|publish|[a-z]{0,8})",
            channel in "\\PC{0,20}",
            id in proptest::option::of(any::<i64>()),
            since in proptest::option::of(any::<u64>()),
        ) {
            let v = serde_json::json!({"action": action, "channel": channel, "id": id, "since": since, "data": [1]});
            for (f, bytes) in [(Format::Json, serde_json::to_vec(&v).unwrap()), (Format::MsgPack, mp(v.clone()))] {
                let r = decode_requests(f, &bytes, 100).unwrap().pop().unwrap();
                if let Err(e) = &r { prop_assert_eq!(e.id.clone(), id.map(Id::Int)); }
            }
        }
    }
}
