//! A client's TCP socket as the relay drives it: readiness based (monoio
//! poll-io), so that no buffer is lent to the kernel while a connection
//! waits. Below both the plain transport (`io.rs`) and TLS (`tls/`).

use std::io;

/// A client's TCP socket, driven by readiness.
///
/// monoio's `TcpStreamPoll` keeps a cache of the local and peer addresses
/// in every stream: 64 bytes per connection, an eighth of an idle
/// connection's memory. The relay never asks a stream for them (accept
/// hands over the peer's address, which the HTTP phase keeps while it
/// needs it), so sockets run as
/// monoio's address-less stream type instead, whose operations (recv, send,
/// writev, shutdown) are the same system calls on any stream socket.
pub type Socket = monoio::net::unix::stream_poll::UnixStreamPoll;

/// An accepted TCP stream as a [`Socket`].
pub fn socket_of(stream: monoio::net::TcpStream) -> io::Result<Socket> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: monoio hands over the descriptor it owned, which is a
    // connected stream socket; the new owner closes it once.
    let std = unsafe { std::os::unix::net::UnixStream::from_raw_fd(stream.into_raw_fd()) };
    monoio::net::UnixStream::from_std(std)?
        .try_into_poll_io()
        .map_err(|(e, _)| e)
}
