//! Small async helpers over monoio's poll-io streams (readiness based: no
//! buffer is lent to the kernel while a connection waits), and the worker's
//! shared read buffer.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::Poll;

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

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

/// Waits for one read into the worker's shared buffer and hands the bytes
/// to `f` at once (see [`with_read_buf`]); `None` at end of stream or on an
/// error.
pub async fn read_shared<R>(
    stream: &mut TcpStreamPoll,
    f: impl FnOnce(&mut [u8]) -> R,
) -> Option<R> {
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
    stream: &mut TcpStreamPoll,
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

/// Writes all of `data`.
pub async fn write_all(stream: &mut TcpStreamPoll, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = poll_fn(|cx| Pin::new(&mut *stream).poll_write(cx, data)).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}
