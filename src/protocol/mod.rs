//! The sans-IO wire protocol described in `docs/protocol.md`: requests decoded
//! from frames, events encoded into frame payloads, in JSON and MessagePack.
//! Nothing here touches a socket, so all of it is unit- and property-tested.

mod channel;
mod data;
mod event;
mod request;

pub use channel::{validate_channel, validate_key};

/// Close codes of ringcast's own (RFC 6455 leaves 4000-4999 to
/// applications).
pub mod close {
    /// The client could not keep up and the slow-consumer policy
    /// disconnected it.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The connection's token expired without a `refresh`.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// An operator revoked the connection's token or user.
    pub const REVOKED: u16 = 4003;
}
pub use data::{Data, DataError, MsgpackError};
pub use event::{encode_event, encode_message, with_conflated, Event};
pub use request::{decode_requests, Action, Id, Request, RequestError, MAX_CONFLATE_MS};

/// The serialization a connection chose with `Sec-WebSocket-Protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// `ringcast.v1.json`: text frames of JSON.
    Json,
    /// `ringcast.v1.msgpack`: binary frames of MessagePack.
    MsgPack,
}

impl Format {
    pub const JSON_SUBPROTOCOL: &'static str = "ringcast.v1.json";
    pub const MSGPACK_SUBPROTOCOL: &'static str = "ringcast.v1.msgpack";

    pub fn from_subprotocol(name: &str) -> Option<Format> {
        match name {
            Self::JSON_SUBPROTOCOL => Some(Format::Json),
            Self::MSGPACK_SUBPROTOCOL => Some(Format::MsgPack),
            _ => None,
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Format::Json => Self::JSON_SUBPROTOCOL,
            Format::MsgPack => Self::MSGPACK_SUBPROTOCOL,
        }
    }
}

/// The `code` of an `error` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    UnknownAction,
    BadChannel,
    Forbidden,
    RateLimited,
    TooLarge,
    Unavailable,
    Unauthorized,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 8] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownAction,
        ErrorCode::BadChannel,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::TooLarge,
        ErrorCode::Unavailable,
        ErrorCode::Unauthorized,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownAction => "unknown_action",
            ErrorCode::BadChannel => "bad_channel",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Unauthorized => "unauthorized",
        }
    }
}
