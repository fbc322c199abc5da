//! WebSocket: the opening handshake, sans-IO framing, and the connection
//! loop that joins a socket to the hub.

pub mod connection;
pub mod driver;
pub mod frame;
pub mod handshake;

pub use frame::close;
