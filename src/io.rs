//! The byte stream of a client connection ([`Transport`]: a monoio
//! poll-io TCP stream, readiness based so that no buffer is lent to the
//! kernel while a connection waits, or TLS over one), small async helpers
//! over it, and the worker's shared read buffer.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::socket::Socket;

/// A client connection's bytes: plain TCP, or TLS over it (boxed: its
/// state is large, and plain connections should not carry its size).
pub enum Transport {
    Plain(Socket),
    Tls(Box<crate::tls::stream::TlsStream>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    /// TLS may hold encrypted bytes the socket had no room for: a writer
    /// that has nothing more to write flushes.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// Size of the per-worker read buffer shared by all its connections.
const READ_CHUNK: usize = 64 * 1024;

thread_local! {
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; READ_CHUNK].into_boxed_slice());
}

/// Runs `f` on the worker's shared read buffer. Whatever `f` reads into it
/// must be used before `f` returns (copy what is kept): the next read of
/// any connection on this worker overwrites it. Idle connections therefore
/// hold no read buffer of their own.
pub fn with_read_buf<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    READ_BUF.with(|b| f(&mut b.borrow_mut()[..]))
}

thread_local! {
    /// The worker's write buffer: a frame's slices gathered for one write
    /// (`ws::connection`, up to 96 KiB), reused by every connection.
    static WRITE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on the worker's shared write buffer; what `f` leaves in it is
/// overwritten by the next connection's write.
pub fn with_write_buf<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    WRITE_BUF.with(|b| f(&mut b.borrow_mut()))
}

/// Waits for one read into the worker's shared buffer and hands the bytes
/// to `f` at once (see [`with_read_buf`]); `None` at end of stream or on an
/// error.
pub async fn read_shared<R>(stream: &mut Transport, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
    let mut f = Some(f);
    poll_fn(|cx| {
        with_read_buf(|buf| {
            let mut rb = ReadBuf::new(&mut buf[..]);
            match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(_)) => Poll::Ready(None),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(None);
                    }
                    let f = f.take().expect("not polled again after it completed");
                    Poll::Ready(Some(f(&mut buf[..n])))
                }
            }
        })
    })
    .await
}

/// Reads what is available into the spare capacity of `buf` (growing it by
/// up to `chunk`); returns the number of bytes read, 0 at end of stream.
pub async fn read_some(
    stream: &mut Transport,
    buf: &mut Vec<u8>,
    chunk: usize,
) -> io::Result<usize> {
    // Room for at least one byte whatever `chunk` is: a read into no room
    // reads nothing and would pass for the end of the stream.
    let spare = buf.capacity() - buf.len();
    if spare == 0 || spare < chunk / 2 {
        buf.reserve(chunk.max(1));
    }
    poll_fn(|cx| {
        let mut rb = ReadBuf::uninit(buf.spare_capacity_mut());
        match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
            std::task::Poll::Ready(Ok(())) => {
                let n = rb.filled().len();
                // SAFETY: `poll_read` initialised and filled exactly `n` bytes
                // of the spare capacity.
                unsafe { buf.set_len(buf.len() + n) };
                std::task::Poll::Ready(Ok(n))
            }
            std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    })
    .await
}

/// Writes all of `data`, flushed.
pub async fn write_all(stream: &mut Transport, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *stream).poll_write(cx, data)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    poll_fn(|cx| Pin::new(&mut *stream).poll_flush(cx)).await
}
