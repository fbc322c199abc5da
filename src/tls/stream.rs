//! One TLS connection over a monoio TCP stream, on rustls' unbuffered API,
//! so that an idle connection holds no buffer at all.
//!
//! rustls' buffered `ServerConnection` keeps a receive buffer of at least
//! 4 KiB per connection for as long as the connection lives (its deframer
//! never shrinks below one read), which made a `wss://` connection cost
//! about ten times a `ws://` one. Here the connection owns only rustls'
//! state and three vectors that are empty between records: ciphertext is
//! read into a buffer the worker's connections share and decrypted there;
//! only the beginning of a record that has not fully arrived is copied
//! out, and kept until the rest comes. Output is encrypted into a shared
//! buffer too; only what the socket did not take is kept.
//!
//! The stream reads and writes like any other (`AsyncRead`/`AsyncWrite`),
//! so the HTTP phase and the WebSocket connection do not know they run
//! over TLS.

use crate::socket::Socket;
use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncryptError, UnbufferedStatus};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Plaintext encrypted per write: four full records.
const WRITE_CHUNK: usize = 4 * 16 * 1024;
/// Room for the records' headers, tags and content types beside
/// `WRITE_CHUNK` (29 bytes per record at most, with TLS 1.2's explicit
/// nonce).
const WRITE_OVERHEAD: usize = 256;
/// Ciphertext read per read: four full records and their overhead.
const READ_CHUNK: usize = 4 * (16 * 1024 + 256);

thread_local! {
    /// Ciphertext being decrypted, for every TLS connection of the worker.
    static CIPHERTEXT_IN: RefCell<Vec<u8>> = RefCell::new(vec![0u8; READ_CHUNK + MAX_KEPT_HANDSHAKING]);
    /// Ciphertext being written, for every TLS connection of the worker.
    static CIPHERTEXT_OUT: RefCell<Vec<u8>> = RefCell::new(vec![0u8; WRITE_CHUNK + WRITE_OVERHEAD]);
    /// Plaintext gathered from a vectored write, to fill whole records.
    static GATHERED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The largest TLS record on the wire (2^14 of payload, 2048 of expansion
/// at most, the 5-byte header): the most a record begun but not complete
/// may hold.
const MAX_RECORD: usize = 16 * 1024 + 2048 + 5;

/// The most kept while the handshake runs. rustls accepts a handshake
/// message of up to 64 KiB spanning records, and the records stay in the
/// buffer until the message is complete: this admits one that large in
/// full records, or a smaller one cut finer (a 12 KB ClientHello in
/// one-byte records).
const MAX_KEPT_HANDSHAKING: usize = 64 * 1024 + MAX_RECORD;

/// What to do once the connection may send application data.
enum Then<'a> {
    Nothing,
    Encrypt(&'a [u8]),
    CloseNotify,
}

/// Where the connection stands after the records at hand were processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// The handshake needs more from the peer.
    Handshaking,
    /// Application data flows (the handshake is done).
    Traffic,
    /// Both sides said close_notify.
    Closed,
}

pub struct TlsStream {
    tcp: Socket,
    conn: UnbufferedServerConnection,
    /// The beginning of a record not yet complete; empty, with no
    /// allocation, between records.
    partial: Vec<u8>,
    /// Plaintext decrypted but not yet read (the reader's buffer was
    /// smaller than what arrived).
    plaintext: Vec<u8>,
    /// Ciphertext the socket has not taken yet, from `unsent_from` on.
    unsent: Vec<u8>,
    unsent_from: usize,
    /// The peer closed: its close_notify, or the end of the stream.
    peer_closed: bool,
    close_notify_sent: bool,
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl TlsStream {
    fn new(tcp: Socket, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        Ok(TlsStream {
            tcp,
            conn: UnbufferedServerConnection::new(config).map_err(tls_error)?,
            partial: Vec::new(),
            plaintext: Vec::new(),
            unsent: Vec::new(),
            unsent_from: 0,
            peer_closed: false,
            close_notify_sent: false,
        })
    }

    /// Runs rustls over `records` (ciphertext, complete records first)
    /// until it needs I/O: decrypted data goes to `plaintext`, messages
    /// it wants sent to `unsent`, and `then` is done once application
    /// data may be sent. Returns the stage reached, how many bytes of
    /// `records` were used up, and how many bytes of ciphertext `then`'s
    /// plaintext (all of it) became at the front of `out`, a shared buffer
    /// grown when it has too little room.
    fn process(
        &mut self,
        records: &mut [u8],
        then: Then<'_>,
        out: &mut Vec<u8>,
    ) -> io::Result<(Stage, usize, usize)> {
        let mut used = 0;
        loop {
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut records[used..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.queue_alert();
                    return Err(tls_error(e));
                }
            };
            let reached = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(tls_error)?;
                        self.plaintext.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(encode) => {
                    Self::encode_into(&mut self.unsent, encode)?;
                    None
                }
                // What it wants sent is in `unsent`, which goes before
                // anything else is written.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    Some((Stage::Closed, 0))
                }
                ConnectionState::BlockedHandshake => Some((Stage::Handshaking, 0)),
                ConnectionState::WriteTraffic(mut traffic) => {
                    let encrypted = match then {
                        Then::Nothing => 0,
                        Then::Encrypt(plain) => match traffic.encrypt(plain, out) {
                            Ok(n) => n,
                            Err(EncryptError::InsufficientSize(e)) => {
                                out.resize(e.required_size, 0);
                                traffic.encrypt(plain, out).map_err(io::Error::other)?
                            }
                            Err(e) => return Err(io::Error::other(e)),
                        },
                        Then::CloseNotify => {
                            let mut notify = [0u8; 64];
                            let n = traffic
                                .queue_close_notify(&mut notify)
                                .map_err(io::Error::other)?;
                            self.unsent.extend_from_slice(&notify[..n]);
                            self.close_notify_sent = true;
                            0
                        }
                    };
                    Some((Stage::Traffic, encrypted))
                }
                ConnectionState::ReadEarlyData(_) => {
                    return Err(io::Error::other("TLS early data is not accepted"))
                }
                _ => return Err(io::Error::other("TLS: a state this relay does not know")),
            };
            used += discard;
            if let Some((stage, encrypted)) = reached {
                return Ok((stage, used, encrypted));
            }
        }
    }

    /// Appends a handshake message or alert rustls wants sent to `unsent`.
    fn encode_into(
        unsent: &mut Vec<u8>,
        mut encode: rustls::unbuffered::EncodeTlsData<'_, rustls::server::ServerConnectionData>,
    ) -> io::Result<()> {
        let start = unsent.len();
        unsent.resize(start + 1024, 0);
        loop {
            match encode.encode(&mut unsent[start..]) {
                Ok(n) => {
                    unsent.truncate(start + n);
                    return Ok(());
                }
                Err(rustls::unbuffered::EncodeError::InsufficientSize(e)) => {
                    unsent.resize(start + e.required_size, 0);
                }
                Err(e) => return Err(io::Error::other(e.to_string())),
            }
        }
    }

    /// After rustls failed: the fatal alert it queued (a handshake without
    /// a shared protocol, a bad record) goes to `unsent`, so the peer
    /// learns why instead of seeing the connection just end.
    fn queue_alert(&mut self) {
        loop {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state {
                Ok(ConnectionState::EncodeTlsData(encode)) => {
                    if Self::encode_into(&mut self.unsent, encode).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => return,
            }
        }
    }

    /// A failure that ends the connection: what is unsent (the alert) gets
    /// one try at the socket, without waiting.
    fn fail(&mut self, cx: &mut Context<'_>, e: io::Error) -> io::Error {
        let _ = self.poll_send_unsent(cx);
        e
    }

    /// Runs rustls over the partial record kept, with nothing new; the
    /// stage reached and the ciphertext made of `then` in `out`.
    fn process_kept(&mut self, then: Then<'_>, out: &mut Vec<u8>) -> io::Result<(Stage, usize)> {
        let mut partial = std::mem::take(&mut self.partial);
        let result = self.process(&mut partial, then, out);
        if let Ok((_, used, _)) = &result {
            partial.drain(..*used);
        }
        self.keep_partial(partial);
        result.map(|(stage, _, encrypted)| (stage, encrypted))
    }

    /// Keeps the bytes of a record still to complete, giving back the
    /// allocation when there are none.
    fn keep_partial(&mut self, rest: Vec<u8>) {
        self.partial = if rest.is_empty() { Vec::new() } else { rest };
    }

    /// Writes what is unsent; ready once the socket took all of it.
    fn poll_send_unsent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.unsent_from < self.unsent.len() {
            match Pin::new(&mut self.tcp).poll_write(cx, &self.unsent[self.unsent_from..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.unsent_from += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.unsent = Vec::new();
        self.unsent_from = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads ciphertext from the socket and processes it with what was kept
    /// (the shared buffer holds both); what stays incomplete is kept.
    /// Ready(Ok(false)) at the end of the stream.
    fn poll_read_records(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        CIPHERTEXT_IN.with(|cell| {
            let mut buf = cell.borrow_mut();
            let kept = self.partial.len();
            buf[..kept].copy_from_slice(&self.partial);
            let mut rb = ReadBuf::new(&mut buf[kept..kept + READ_CHUNK]);
            match Pin::new(&mut self.tcp).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let read = rb.filled().len();
            if read == 0 {
                return Poll::Ready(Ok(false));
            }
            let filled = kept + read;
            let mut no_output = Vec::new();
            let (stage, used, _) =
                match self.process(&mut buf[..filled], Then::Nothing, &mut no_output) {
                    Ok(reached) => reached,
                    Err(e) => return Poll::Ready(Err(self.fail(cx, e))),
                };
            // Nothing after the peer's close_notify means anything.
            let rest = if self.peer_closed {
                &[][..]
            } else {
                &buf[used..filled]
            };
            let most = match stage {
                Stage::Handshaking => MAX_KEPT_HANDSHAKING,
                _ => MAX_RECORD,
            };
            if rest.len() > most {
                return Poll::Ready(Err(io::Error::other("TLS record larger than allowed")));
            }
            self.partial.clear();
            self.partial.extend_from_slice(rest);
            let partial = std::mem::take(&mut self.partial);
            self.keep_partial(partial);
            Poll::Ready(Ok(true))
        })
    }

    /// Drives the handshake until application data may flow and every
    /// handshake message (session tickets included) is sent.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.poll_send_unsent(cx)?.is_pending() {
                return Poll::Pending;
            }
            let mut no_output = Vec::new();
            let (stage, _) = match self.process_kept(Then::Nothing, &mut no_output) {
                Ok(reached) => reached,
                Err(e) => return Poll::Ready(Err(self.fail(cx, e))),
            };
            if !self.unsent.is_empty() {
                continue;
            }
            match stage {
                Stage::Traffic => return Poll::Ready(Ok(())),
                Stage::Closed => {
                    return Poll::Ready(Err(io::Error::other("closed during the TLS handshake")))
                }
                Stage::Handshaking => {}
            }
            match self.poll_read_records(cx)? {
                Poll::Ready(true) => {}
                Poll::Ready(false) => {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Encrypts `plain` (at most `WRITE_CHUNK` of it) and writes it;
    /// what the socket does not take now is kept and sent first next time.
    fn poll_write_plain(&mut self, cx: &mut Context<'_>, plain: &[u8]) -> Poll<io::Result<usize>> {
        if self.poll_send_unsent(cx)?.is_pending() {
            return Poll::Pending;
        }
        if self.close_notify_sent {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let plain = &plain[..plain.len().min(WRITE_CHUNK)];
        CIPHERTEXT_OUT.with(|cell| {
            let mut out = cell.borrow_mut();
            let (stage, cipher) = self.process_kept(Then::Encrypt(plain), &mut out)?;
            if stage != Stage::Traffic {
                return Poll::Ready(Err(io::Error::other("TLS: not ready for data")));
            }
            let cipher = &out[..cipher];
            if !self.unsent.is_empty() {
                // Messages rustls queued (a key update's, say) go first.
                self.unsent.extend_from_slice(cipher);
                let _ = self.poll_send_unsent(cx)?;
                return Poll::Ready(Ok(plain.len()));
            }
            let mut sent = 0;
            while sent < cipher.len() {
                match Pin::new(&mut self.tcp).poll_write(cx, &cipher[sent..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => sent += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    // The socket wakes the task when it has room; what it
                    // did not take is kept, and the plaintext counts as
                    // written.
                    Poll::Pending => break,
                }
            }
            self.unsent.extend_from_slice(&cipher[sent..]);
            Poll::Ready(Ok(plain.len()))
        })
    }
}

/// The TLS handshake of an accepted connection.
pub async fn accept(config: Arc<ServerConfig>, tcp: Socket) -> io::Result<TlsStream> {
    let mut stream = TlsStream::new(tcp, config)?;
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.plaintext.is_empty() {
                let n = this.plaintext.len().min(buf.remaining());
                buf.put_slice(&this.plaintext[..n]);
                this.plaintext.drain(..n);
                if this.plaintext.is_empty() {
                    this.plaintext = Vec::new();
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            // Whatever rustls wants to say (a key update's answer) goes
            // out as soon as the socket takes it.
            if !this.unsent.is_empty() {
                let _ = this.poll_send_unsent(cx)?;
            }
            match this.poll_read_records(cx) {
                Poll::Ready(Ok(true)) => {}
                Poll::Ready(Ok(false)) => {
                    this.peer_closed = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut().poll_write_plain(cx, buf)
    }

    /// The slices are gathered first, so a batch of small items fills whole
    /// records instead of making one record each.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if bufs.len() == 1 {
            return this.poll_write_plain(cx, &bufs[0]);
        }
        GATHERED.with(|cell| {
            let mut gathered = cell.borrow_mut();
            gathered.clear();
            for slice in bufs {
                let room = WRITE_CHUNK - gathered.len();
                if room == 0 {
                    break;
                }
                gathered.extend_from_slice(&slice[..slice.len().min(room)]);
            }
            this.poll_write_plain(cx, &gathered)
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.poll_send_unsent(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_sent {
            let mut no_output = Vec::new();
            this.process_kept(Then::CloseNotify, &mut no_output)?;
        }
        if this.poll_send_unsent(cx)?.is_pending() {
            return Poll::Pending;
        }
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
