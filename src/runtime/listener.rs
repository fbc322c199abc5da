//! Listening sockets: one per worker, all bound to the same address with
//! `SO_REUSEPORT` so the kernel spreads incoming connections across cores.
//!
//! `SO_REUSEPORT` would also let another process join the group silently
//! and take part of the traffic, so by default the address is first bound
//! once without it: if anyone else listens there, start-up stops with
//! "address in use". Sharing is opt-in (`--reuse-port-shared`), for hot
//! upgrades and for several processes of one relay behind one backplane;
//! a draining process that opened the address first then hands its share
//! to the others ([`hand_over`]).

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{Context, Error, Result};

/// The listeners of one address, and whether this process opened it
/// (no other process listened there when they were bound).
#[derive(Debug)]
pub struct Group {
    pub listeners: Vec<TcpListener>,
    pub first: bool,
}

/// Binds `count` listeners on `addr`. With port 0, the first picks a free
/// port and the others join it. Bound in order on one thread, so socket i is
/// the i-th member of the kernel's reuseport group. Unless `shared`, an
/// address another process listens on is refused.
pub fn bind_group(addr: SocketAddr, count: usize, shared: bool) -> Result<Group> {
    if !shared && addr.port() != 0 {
        check_unused(addr)?;
    }
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
    let first = !shared || listening_sockets(addr).is_ok_and(|n| n == count);
    Ok(Group { listeners, first })
}

/// Binds `addr` once without `SO_REUSEPORT` (with `SO_REUSEADDR`, so
/// connections of an earlier run in TIME_WAIT do not count): that fails
/// exactly when some socket, of any process, listens on it.
fn check_unused(addr: SocketAddr) -> Result<()> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("creating a socket")?;
    probe
        .set_reuse_address(true)
        .context("setting SO_REUSEADDR")?;
    match probe.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(Error::msg(format!(
            "address {addr} is in use by another process; give --reuse-port-shared to share \
             it on purpose (hot upgrades, several relays behind one backplane)"
        ))),
        Err(e) => Err(Error::msg(format!("binding {addr}: {e}"))),
    }
}

fn bind_one(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Steers new connections on a shared address away from this process: a
/// classic BPF program attached to the reuseport group picks, at random,
/// one of the sockets that joined after this process's `own` sockets.
/// Only for the process that opened the address (`Group::first`): the
/// group lists sockets in the order they joined, and the kernel fills a
/// closed socket's place with the last one, so the first process's
/// sockets stay at the front while the others come and go. Without it,
/// the kernel would keep giving this draining process its share of new
/// connections until it closes its listeners. Returns how many sockets of
/// other processes take over; 0 (nothing attached) when there are none.
pub fn hand_over(member: &TcpListener, own: usize) -> io::Result<usize> {
    let addr = member.local_addr()?;
    let others = listening_sockets(addr)?.saturating_sub(own);
    if others == 0 {
        return Ok(0);
    }
    const SKF_AD_OFF: u32 = (-0x1000i32) as u32;
    const SKF_AD_RANDOM: u32 = 56;
    let insn = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    let mut program = [
        insn(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            SKF_AD_OFF + SKF_AD_RANDOM,
        ),
        insn(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, others as u32),
        insn(libc::BPF_ALU | libc::BPF_ADD | libc::BPF_K, own as u32),
        insn(libc::BPF_RET | libc::BPF_A, 0),
    ];
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    set_socket_option(member, libc::SO_ATTACH_REUSEPORT_CBPF, &fprog)?;
    Ok(others)
}

/// Takes the group's steering program away again, just before this
/// process closes its listeners, so it does not outlive the process and
/// skew the group's later members. (No program: nothing to do.)
pub fn release(member: &impl AsRawFd) {
    let _ = set_socket_option(member, libc::SO_DETACH_REUSEPORT_BPF, &0 as &libc::c_int);
}

/// `setsockopt(SOL_SOCKET, option, value)`.
fn set_socket_option<T>(socket: &impl AsRawFd, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<T>()` bytes of `value` (and what
    // it points to, for a program), all alive for the call, and copies them.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the kernel moves connections queued on a closing listener to
/// the others of its group (`net.ipv4.tcp_migrate_req`, Linux 5.14+).
pub fn queued_connections_migrate() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").is_ok_and(|v| v.trim() == "1")
}

/// How many sockets listen on exactly `addr`, in any process
/// (`/proc/net/tcp` or `tcp6`).
fn listening_sockets(addr: SocketAddr) -> io::Result<usize> {
    let (file, wanted) = match addr {
        SocketAddr::V4(a) => (
            "/proc/net/tcp",
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(a.ip().octets()),
                a.port()
            ),
        ),
        SocketAddr::V6(a) => {
            let words: String = a
                .ip()
                .octets()
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                .collect();
            ("/proc/net/tcp6", format!("{words}:{:04X}", a.port()))
        }
    };
    let table = std::fs::read_to_string(file)?;
    Ok(count_listening(&table, &wanted))
}

/// Rows of a `/proc/net/tcp` table whose local address is `wanted` and
/// whose state is LISTEN (0A).
fn count_listening(table: &str, wanted: &str) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|row| {
            let mut fields = row.split_whitespace();
            let local = fields.nth(1);
            let state = fields.nth(1);
            local == Some(wanted) && state == Some("0A")
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_in_use_is_refused_unless_sharing_is_asked_for() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 2, false).unwrap();
        assert!(group.first);
        let first = group.listeners;
        let addr = first[0].local_addr().unwrap();
        let e = bind_group(addr, 1, false).unwrap_err().to_string();
        assert!(e.contains("in use by another process"), "{e}");
        assert!(e.contains("--reuse-port-shared"), "{e}");
        let shared = bind_group(addr, 1, true).unwrap();
        assert!(!shared.first, "it joined a group another process opened");
        assert_eq!(listening_sockets(addr).unwrap(), 3);
        assert_eq!(hand_over(&first[0], 2).unwrap(), 1);
        release(&first[0]);
        drop(shared);
        assert_eq!(listening_sockets(addr).unwrap(), 2);
        assert_eq!(hand_over(&first[0], 2).unwrap(), 0);
    }

    #[test]
    fn proc_rows_are_matched_on_address_and_listen_state() {
        let table = "  sl  local_address rem_address   st\n\
            0: 0100007F:1F90 00000000:0000 0A 0\n\
            1: 0100007F:1F90 0100007F:D431 01 0\n\
            2: 0200007F:1F90 00000000:0000 0A 0\n\
            3: 0100007F:1F90 00000000:0000 0A 0\n";
        assert_eq!(count_listening(table, "0100007F:1F90"), 2);
    }
}
