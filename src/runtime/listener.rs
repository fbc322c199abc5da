//! Listening sockets: one per worker, all bound to the same address with
//! `SO_REUSEPORT` so the kernel spreads incoming connections across cores.

use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{Context, Result};

/// Binds `count` listeners on `addr`. With port 0, the first picks a free
/// port and the others join it. Bound in order on one thread, so socket i is
/// the i-th member of the kernel's reuseport group.
pub fn bind_group(addr: SocketAddr, count: usize) -> Result<Vec<TcpListener>> {
    let mut listeners = Vec::with_capacity(count);
    let mut addr = addr;
    for i in 0..count {
        let l = bind_one(addr)
            .with_context(|| format!("binding SO_REUSEPORT listener {i} on {addr}"))?;
        if i == 0 {
            addr = l.local_addr().context("reading the bound address")?;
        }
        listeners.push(l);
    }
    Ok(listeners)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}
