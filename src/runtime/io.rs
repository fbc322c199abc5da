//! Small async helpers over monoio's poll-io streams (readiness based: no
//! buffer is lent to the kernel while a connection waits).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;

use monoio::net::tcp::stream_poll::TcpStreamPoll;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Reads what is available into the spare capacity of `buf` (growing it by
/// up to `chunk`); returns the number of bytes read, 0 at end of stream.
pub async fn read_some(
    stream: &mut TcpStreamPoll,
    buf: &mut Vec<u8>,
    chunk: usize,
) -> io::Result<usize> {
    if buf.capacity() - buf.len() < chunk / 2 {
        buf.reserve(chunk);
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
