//! The life of one WebSocket connection after the handshake: one monoio
//! task that reads client frames, hands requests to the hub, and writes
//! whatever the hub queued for it, all in one poll.
//!
//! Reads are readiness based (monoio poll-io): bytes land in the worker's
//! shared read buffer and are parsed there, so an idle connection owns no
//! buffer. Writes go a frame at a time: the frame header, the batch
//! brackets and the shared, pre-encoded publications, gathered into the
//! worker's shared write buffer for one `send` (`poll_write_frame`), so an
//! idle connection owns no write buffer either. With `--write-delay`, a
//! queue of publications waits for its deadline (`ConnTask::holds_writes`).

use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::io::Transport;
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::frame::{self, Incoming, WsReader, MAX_HEADER};
use crate::addresses::AddressKey;
use crate::hub::outbox::Outbox;
use crate::hub::{
    Authenticated, CloseRequest, Conn, Out, Shard, MAX_BATCH_ITEMS, MAX_REPLIES_AWAITED,
};
use crate::io::{with_read_buf, with_write_buf};
use crate::protocol::{decode_requests, Format};

/// Reads per poll before the task yields, so a flooding client cannot starve
/// the others on its core.
const READ_BUDGET: usize = 4;
/// Slices handed to one `writev`.
const MAX_IOV: usize = 128;

impl ConnTask {
    /// A WebSocket connection whose 101 is sent: registered with the
    /// shard's hub (with its token, when the relay requires one), fed the
    /// bytes that followed the handshake, to be run until it ends.
    pub fn start(
        shard: Rc<Shard>,
        stream: Transport,
        format: Format,
        auth: Option<Authenticated>,
        mut leftover: Vec<u8>,
    ) -> ConnTask {
        shard.node.connections.fetch_add(1, Ordering::Relaxed);
        let (key, conn) = shard.register(format, auth);
        let mut task = ConnTask {
            shard,
            key: u32::try_from(key).expect("a shard holds fewer than 2^32 connections"),
            conn,
            stream,
            reader: None,
            frame: None,
            peer_closed: false,
            close_queued: false,
            discarding: false,
            shutdown: Shutdown::NotYet,
            lingered: 0,
            address: AddressKey::default(),
        };
        if !leftover.is_empty() {
            task.on_bytes(&mut leftover);
        }
        task
    }
}

/// A data frame being written: the first `items` queued outputs, framed.
struct FrameInFlight {
    items: usize,
    head: [u8; MAX_HEADER + 5],
    head_len: usize,
    total: usize,
    sent: usize,
}

/// A running WebSocket connection: a future that ends with it.
pub struct ConnTask {
    shard: Rc<Shard>,
    /// The connection's key in the shard's hub (a `u32`: every idle
    /// connection carries this record, and a shard holds far fewer).
    key: u32,
    conn: Rc<Conn>,
    stream: Transport,
    /// The frame reader's state, boxed and only while it holds a partial
    /// frame or message: most connections, most of the time, hold none.
    reader: Option<Box<WsReader>>,
    /// A frame the socket took only part of, boxed and only until the rest
    /// is written: a frame written whole never leaves `poll_writes`.
    frame: Option<Box<FrameInFlight>>,
    /// The client's close frame arrived.
    peer_closed: bool,
    /// Our close frame is queued (nothing but control frames follow it).
    close_queued: bool,
    /// Input is read and dropped (after a violation or our close).
    discarding: bool,
    /// Our side's shutdown, after the close frame went out.
    shutdown: Shutdown,
    /// Bytes read and dropped since then, bounded by [`LINGER_BYTES`].
    lingered: u32,
    /// The client's address, counted while the connection lives.
    address: AddressKey,
}

/// Where our side's shutdown stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shutdown {
    NotYet,
    /// Begun: over TLS, our close_notify waits for room in the socket.
    Started,
    /// Our close_notify (over TLS) and the TCP FIN are out.
    Done,
}

/// Input read and dropped after our close frame went out, looking for the
/// client's close, before the connection is ended without it.
const LINGER_BYTES: u32 = 256 * 1024;

/// Which per-second inbound limit a connection went past.
#[derive(Debug, Clone, Copy)]
enum InboundLimit {
    Frames,
    Bytes,
}

impl InboundLimit {
    fn reason(self) -> &'static str {
        match self {
            InboundLimit::Frames => "too many frames per second",
            InboundLimit::Bytes => "too many bytes per second",
        }
    }
}

enum ReadState {
    /// Waiting for readiness.
    Pending,
    /// Used the read budget; poll again soon.
    Yield,
    /// End of stream or a socket error.
    Ended,
}

impl Future for ConnTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.get_mut().poll_turn(cx)
    }
}

impl Drop for ConnTask {
    fn drop(&mut self) {
        self.shard.unregister(self.key as usize);
        self.shard.node.connections.fetch_sub(1, Ordering::Relaxed);
        self.shard.node.release_socket(self.address);
    }
}

impl ConnTask {
    /// The connection now holds its client's address count (handed over
    /// by the socket's admission).
    pub fn hold_address(&mut self, address: AddressKey) {
        self.address = address;
    }

    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.conn.aborted() {
            return Poll::Ready(());
        }
        let held_back = self.holds_back_input();
        let read = if held_back {
            ReadState::Pending
        } else {
            self.poll_reads(cx)
        };
        if matches!(read, ReadState::Ended) {
            return Poll::Ready(());
        }
        match self.poll_writes(cx) {
            Err(()) => return Poll::Ready(()),
            Ok(true) => return Poll::Ready(()),
            Ok(false) => {}
        }
        self.conn.out.borrow_mut().set_waker(cx.waker());
        // Replies that arrive, and the next tick, wake the task through the
        // outbox; once what held input back is gone, reading resumes.
        let resume = held_back && !self.holds_back_input();
        if matches!(read, ReadState::Yield) || resume {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Whether the client's input waits: while it has many requests in
    /// flight on other shards, has not read the pong it asked for, has
    /// used up its request or ping allowance for this second, or while we
    /// close. A client that reads
    /// and keeps to its limits never waits; one that does not is slowed
    /// by TCP instead of costing the shard parsing and queue space.
    fn holds_back_input(&self) -> bool {
        self.conn.output_holds_back_input(MAX_REPLIES_AWAITED)
            || self.shard.over_request_rate(&self.conn)
            // Closing: nothing more is read until our close frame is out.
            || (self.conn.close.get().is_some() && self.shutdown == Shutdown::NotYet)
    }

    fn poll_reads(&mut self, cx: &mut Context<'_>) -> ReadState {
        for _ in 0..READ_BUDGET {
            let got = with_read_buf(|b| {
                let mut rb = ReadBuf::new(&mut b[..]);
                match Pin::new(&mut self.stream).poll_read(cx, &mut rb) {
                    Poll::Pending => None,
                    Poll::Ready(Err(_)) => Some(0),
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n > 0 {
                            self.on_bytes(&mut b[..n]);
                        }
                        Some(n)
                    }
                }
            });
            match got {
                None => return ReadState::Pending,
                Some(0) => return ReadState::Ended,
                Some(_) => {}
            }
        }
        ReadState::Yield
    }

    /// Parses freshly read bytes and acts on them.
    fn on_bytes(&mut self, data: &mut [u8]) {
        let metrics = &self.shard.metrics;
        metrics.bytes_in.add(data.len() as u64);
        let read = self
            .conn
            .bytes_this_tick
            .get()
            .saturating_add(data.len() as u32);
        self.conn.bytes_this_tick.set(read);
        if self.discarding {
            if self.shutdown != Shutdown::NotYet {
                self.lingered = self.lingered.saturating_add(data.len() as u32);
                if self.lingered > LINGER_BYTES {
                    self.conn.request_abort();
                }
            }
            return;
        }
        let mut reader = self.reader.take().map_or_else(WsReader::default, |r| *r);
        let Self {
            shard,
            key,
            conn,
            peer_closed,
            ..
        } = self;
        // One clock read for everything this read brought.
        let now = Instant::now();
        let max_message = shard.config.limits.max_message_bytes;
        let max_batch = shard.config.limits.max_batch_requests;
        let limits = &shard.config.limits;
        let (max_frames, max_bytes) = (limits.max_frames_per_second, limits.max_bytes_per_second);
        let mut over = None;
        if max_bytes > 0 && read > max_bytes {
            over = Some(InboundLimit::Bytes);
        }
        let result = reader.feed(data, max_message, &mut |incoming| {
            shard.metrics.frames_in.add(1);
            let frames = conn.frames_this_tick.get().saturating_add(1);
            conn.frames_this_tick.set(frames);
            if over.is_some() {
                return false;
            }
            if max_frames > 0 && frames > max_frames {
                over = Some(InboundLimit::Frames);
                return false;
            }
            // Only whole messages and control frames prove the client
            // alive: a frame trickled a byte at a time does not.
            conn.last_read.set(shard.now.get());
            conn.ping_sent.set(None);
            match incoming {
                Incoming::Message { payload, .. } => {
                    if conn.close.get().is_some() {
                        return true;
                    }
                    match decode_requests(conn.format, payload, max_batch) {
                        Err(e) => shard.reply_error(conn, e),
                        Ok(requests) => {
                            for r in requests {
                                match r {
                                    Ok(req) => shard.handle_request(*key as usize, req, now),
                                    Err(e) => shard.reply_error(conn, e),
                                }
                            }
                        }
                    }
                    true
                }
                Incoming::Ping(payload) => {
                    conn.push_pong(|out| frame::push_control(out, frame::OP_PONG, payload));
                    true
                }
                Incoming::Pong => true,
                Incoming::Close(code) => {
                    *peer_closed = true;
                    conn.request_close(CloseRequest {
                        code: code.unwrap_or(0),
                        reason: "",
                        flush: false,
                    });
                    false
                }
            }
        });
        if !reader.is_idle() {
            self.reader = Some(Box::new(reader));
        }
        if let Some(limit) = over {
            let metrics = &self.shard.metrics;
            match limit {
                InboundLimit::Frames => metrics.inbound_limited_frames.increment(1),
                InboundLimit::Bytes => metrics.inbound_limited_bytes.increment(1),
            }
            self.conn.request_close(CloseRequest {
                code: frame::close::POLICY_VIOLATION,
                reason: limit.reason(),
                flush: false,
            });
        } else if let Err(violation) = result {
            self.shard.metrics.ws_violations.increment(1);
            self.conn.request_close(CloseRequest {
                code: violation.code,
                reason: violation.reason,
                flush: false,
            });
        }
        if self.conn.close.get().is_some() {
            self.discarding = true;
            self.reader = None;
        }
    }

    /// Writes what is queued. `Ok(true)`: the connection is finished.
    fn poll_writes(&mut self, cx: &mut Context<'_>) -> Result<bool, ()> {
        let mut frame = self.frame.take().map(|f| *f);
        let mut last_frame_items = 0;
        loop {
            if frame.is_none() {
                let mut out = self.conn.out.borrow_mut();
                if self.conn.take_ping_due() {
                    out.append_control(|c| frame::push_control(c, frame::OP_PING, b""));
                }
                if !out.control.is_empty() {
                    match Pin::new(&mut self.stream).poll_write(cx, &out.control) {
                        Poll::Pending => return Ok(false),
                        Poll::Ready(Ok(n)) if n > 0 => {
                            self.shard.metrics.bytes_out.add(n as u64);
                            out.control_written(n);
                            continue;
                        }
                        Poll::Ready(_) => return Err(()),
                    }
                }
                if self.close_queued {
                    drop(out);
                    return self.after_close(cx);
                }
                if let Some(req) = self.conn.close.get() {
                    // Filled slots first: one filled with nothing leaves an
                    // empty queue, and the close must not wait for a wake.
                    let drained = !out.open_front(MAX_BATCH_ITEMS) && out.items.is_empty();
                    if !req.flush || drained {
                        out.clear();
                        if req.code == 0 {
                            out.append_control(|c| frame::push_control(c, frame::OP_CLOSE, b""));
                        } else {
                            let reason = self.close_reason(req);
                            out.append_control(|c| frame::push_close(c, req.code, &reason));
                        }
                        self.close_queued = true;
                        if self.conn.closing_since.get().is_none() {
                            self.conn.closing_since.set(Some(self.shard.now.get()));
                        }
                        continue;
                    }
                }
                if !out.open_front(MAX_BATCH_ITEMS) {
                    // Trimmed when this poll drained it by writing, not
                    // when a poll to read or ping finds it empty.
                    if last_frame_items > 0 {
                        out.items.trim_drained(last_frame_items);
                    }
                    drop(out);
                    self.conn.end_flush();
                    // Nothing more to write: what TLS still holds goes now
                    // (plain TCP holds nothing).
                    return match Pin::new(&mut self.stream).poll_flush(cx) {
                        Poll::Ready(Err(_)) => Err(()),
                        _ => Ok(false),
                    };
                }
                if self.holds_writes(&out) {
                    drop(out);
                    self.shard.hold_writes(&self.conn, Instant::now());
                    return match Pin::new(&mut self.stream).poll_flush(cx) {
                        Poll::Ready(Err(_)) => Err(()),
                        _ => Ok(false),
                    };
                }
                let planned = plan_frame(
                    &out.items,
                    self.conn.format,
                    self.shard.config.limits.max_batch_bytes,
                );
                out.in_flight = planned.items as u16;
                frame = Some(planned);
            }
            let Some(in_flight) = frame.as_mut() else {
                continue;
            };
            let written = {
                let out = self.conn.out.borrow();
                match poll_write_frame(
                    &mut self.stream,
                    cx,
                    in_flight,
                    &out.items,
                    self.conn.format,
                ) {
                    Poll::Pending => None,
                    Poll::Ready(Ok(n)) if n > 0 => Some(n),
                    Poll::Ready(_) => return Err(()),
                }
            };
            let Some(written) = written else {
                self.frame = frame.map(Box::new);
                return Ok(false);
            };
            in_flight.sent += written;
            self.shard.metrics.bytes_out.add(written as u64);
            if in_flight.sent == in_flight.total {
                let items = in_flight.items;
                last_frame_items = items;
                frame = None;
                self.finish_frame(items);
            }
        }
    }

    /// Whether what is queued waits for the shard's next flush
    /// (`--write-delay`): not while a flush is being written or the
    /// connection closes, and not when [`Outbox::may_hold`] says it must go.
    fn holds_writes(&self, out: &Outbox) -> bool {
        let limits = &self.shard.config.limits;
        !limits.write_delay.is_zero()
            && !self.conn.flushing()
            && self.conn.close.get().is_none()
            && out.may_hold(limits.held_bytes())
    }

    /// Pops a fully written frame's items and records its metrics.
    /// The close's reason as sent: a draining node's 1012 names another
    /// node for the client to go to, chosen for this connection so that
    /// the node's clients spread over the others.
    fn close_reason(&self, req: CloseRequest) -> std::borrow::Cow<'static, str> {
        if req.code == frame::close::SERVICE_RESTART {
            self.shard
                .node
                .directory
                .drain_reason(|n| fastrand::usize(..n))
                .into()
        } else {
            req.reason.into()
        }
    }

    fn finish_frame(&mut self, items: usize) {
        let mut out = self.conn.out.borrow_mut();
        let format = self.conn.format;
        let metrics = &self.shard.metrics;
        let (messages, oldest) = out.pop_written(items, format);
        out.in_flight = 0;
        metrics.frames_out.add(1);
        if messages > 0 {
            metrics.batches.add(1);
            metrics.batch_messages.record(messages as f64);
            if let Some(at) = oldest {
                metrics.publish_to_write.record(at.elapsed().as_secs_f64());
            }
        }
    }

    /// After our close frame is out: shut our side down and wait for the
    /// client's close or end of stream (bounded by the heartbeat's deadline).
    fn after_close(&mut self, cx: &mut Context<'_>) -> Result<bool, ()> {
        // The close frame must leave before the connection ends.
        match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Pending => return Ok(false),
            Poll::Ready(Err(_)) => return Err(()),
            Poll::Ready(Ok(())) => {}
        }
        if self.peer_closed {
            return Ok(true);
        }
        // Over TLS a full socket leaves the shutdown pending; it is polled
        // again when the socket has room, until the FIN is out.
        if self.shutdown != Shutdown::Done {
            self.shutdown = match Pin::new(&mut self.stream).poll_shutdown(cx) {
                Poll::Ready(_) => Shutdown::Done,
                Poll::Pending => Shutdown::Started,
            };
        }
        Ok(false)
    }
}

/// Chooses how many queued items go in the next frame and frames them.
/// The frame ends before the first reply slot (the front is never one).
fn plan_frame(
    items: &std::collections::VecDeque<Out>,
    format: Format,
    max_batch_bytes: usize,
) -> FrameInFlight {
    let json = format == Format::Json;
    let mut n = 0;
    let mut payload = 0;
    for item in items.iter().take(MAX_BATCH_ITEMS) {
        if matches!(item, Out::Awaiting(_)) {
            break;
        }
        let len = item.bytes(format).len() + usize::from(json && n > 0);
        if n > 0 && payload + len > max_batch_bytes {
            break;
        }
        payload += len;
        n += 1;
    }
    let mut prefix = [0u8; 5];
    let prefix_len = if n == 1 {
        0
    } else if json {
        prefix[0] = b'[';
        1
    } else {
        let mut p = &mut prefix[..];
        rmp::encode::write_array_len(&mut p, n as u32).expect("5 bytes hold any array header");
        5 - p.len()
    };
    // A JSON batch is `[` + items + `]`; a MessagePack batch is the array
    // header + items.
    let ws_payload = payload + if json && n > 1 { 2 } else { prefix_len };
    let opcode = if json {
        frame::OP_TEXT
    } else {
        frame::OP_BINARY
    };
    let mut ws_head = [0u8; MAX_HEADER];
    let ws_len = frame::write_header(&mut ws_head, opcode, ws_payload);
    let mut head = [0u8; MAX_HEADER + 5];
    head[..ws_len].copy_from_slice(&ws_head[..ws_len]);
    head[ws_len..ws_len + prefix_len].copy_from_slice(&prefix[..prefix_len]);
    let head_len = ws_len + prefix_len;
    FrameInFlight {
        items: n,
        head,
        head_len,
        total: ws_len + ws_payload,
        sent: 0,
    }
}

/// A frame whose unsent rest is up to this size is gathered into one
/// buffer before the write: a full frame at the default
/// `--max-batch-bytes` (64 KiB), without copying a big frame again and
/// again while a slow reader takes it a little at a time.
const GATHER_MAX: usize = 96 * 1024;

/// Calls `piece` with each part of the frame in order (its head, the
/// items, a JSON batch's commas and closing bracket) until it returns
/// false.
fn frame_pieces<'a>(
    frame: &'a FrameInFlight,
    items: &'a std::collections::VecDeque<Out>,
    format: Format,
    mut piece: impl FnMut(&'a [u8]) -> bool,
) {
    let brackets = format == Format::Json && frame.items > 1;
    if !piece(&frame.head[..frame.head_len]) {
        return;
    }
    for (i, item) in items.iter().take(frame.items).enumerate() {
        if brackets && i > 0 && !piece(b",") {
            return;
        }
        if !piece(item.bytes(format)) {
            return;
        }
    }
    if brackets {
        piece(b"]");
    }
}

/// Appends the part of `frame` not yet sent to `buf`.
fn gather_unsent(
    frame: &FrameInFlight,
    items: &std::collections::VecDeque<Out>,
    format: Format,
    buf: &mut Vec<u8>,
) {
    let mut skip = frame.sent;
    frame_pieces(frame, items, format, |s| {
        if skip >= s.len() {
            skip -= s.len();
        } else {
            buf.extend_from_slice(&s[skip..]);
            skip = 0;
        }
        true
    });
}

/// Writes the unsent part of `frame`. Up to [`GATHER_MAX`] it is copied
/// into the worker's write buffer and written in one piece: the kernel's
/// copy of a `writev` pays per slice, and a batch frame has two per
/// publication in JSON (the item and its comma); on broadcast to 10,000
/// subscribers `_copy_from_iter` took a third of the relay's core. A
/// `writev` also takes at most [`MAX_IOV`] slices, which split a frame
/// of 64 JSON publications into two writes and two TCP segments, the
/// second holding only its closing bracket (docs/benchmarks.md, "Fewer,
/// fuller writes"). A bigger rest (a few large items) goes by `writev`.
fn poll_write_frame(
    stream: &mut Transport,
    cx: &mut Context<'_>,
    frame: &FrameInFlight,
    items: &std::collections::VecDeque<Out>,
    format: Format,
) -> Poll<std::io::Result<usize>> {
    if frame.total - frame.sent <= GATHER_MAX {
        return with_write_buf(|buf| {
            buf.clear();
            gather_unsent(frame, items, format, buf);
            Pin::new(stream).poll_write(cx, buf)
        });
    }
    let mut iov = Iov::new(frame.sent);
    frame_pieces(frame, items, format, |s| iov.push(s));
    Pin::new(stream).poll_write_vectored(cx, &iov.slices)
}

/// Gathers the unsent part of a frame into at most `MAX_IOV` slices.
struct Iov<'a> {
    slices: SmallVec<[IoSlice<'a>; MAX_IOV]>,
    skip: usize,
}

impl<'a> Iov<'a> {
    fn new(skip: usize) -> Self {
        Iov {
            slices: SmallVec::new(),
            skip,
        }
    }

    /// Adds `s` past the already-sent bytes; false when the slices are full.
    fn push(&mut self, s: &'a [u8]) -> bool {
        if self.skip >= s.len() {
            self.skip -= s.len();
            return true;
        }
        self.slices.push(IoSlice::new(&s[self.skip..]));
        self.skip = 0;
        self.slices.len() < MAX_IOV
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backplane::Publication;
    use std::sync::Arc;

    /// Every idle connection is one such record in its shard's driver slab,
    /// so its bytes count once per connection (docs/benchmarks.md, idle
    /// memory): a field added here is a decision, not an accident.
    #[test]
    fn a_connection_record_stays_within_72_bytes() {
        let size = std::mem::size_of::<Option<ConnTask>>();
        assert!(size <= 72, "a connection's record is {size} bytes");
    }

    fn item(json: &str) -> Out {
        Out::Message(Rc::new(Arc::new(Publication {
            channel: "c".into(),
            seq: Some(1),
            key: None,
            at: std::time::Instant::now(),
            json: json.as_bytes().into(),
            msgpack: vec![0xc0].into(),
        })))
    }

    /// Concatenates what the writer would send for the planned frame.
    fn render(
        items: &std::collections::VecDeque<Out>,
        format: Format,
        f: &FrameInFlight,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        frame_pieces(f, items, format, |s| {
            out.extend_from_slice(s);
            true
        });
        out
    }

    /// A frame the socket took part of is gathered again from where it
    /// stopped, at every byte; the `writev` path stops at its slice limit.
    #[test]
    fn the_unsent_rest_of_a_frame_is_gathered_from_any_byte() {
        let items: std::collections::VecDeque<Out> =
            (0..100).map(|i| item(&format!("{{\"n\":{i}}}"))).collect();
        for format in [Format::Json, Format::MsgPack] {
            let mut f = plan_frame(&items, format, 1 << 16);
            let whole = render(&items, format, &f);
            assert_eq!(whole.len(), f.total);
            for sent in 0..f.total {
                f.sent = sent;
                let mut rest = Vec::new();
                gather_unsent(&f, &items, format, &mut rest);
                assert_eq!(rest, whole[sent..], "{format:?} from byte {sent}");
            }
            f.sent = 0;
            let mut iov = Iov::new(0);
            frame_pieces(&f, &items, format, |s| iov.push(s));
            let mut pieces = 0;
            frame_pieces(&f, &items, format, |_| {
                pieces += 1;
                true
            });
            assert_eq!(iov.slices.len(), pieces.min(MAX_IOV));
        }
    }

    #[test]
    fn batches_are_arrays_with_exact_lengths() {
        let items: std::collections::VecDeque<Out> =
            (0..3).map(|i| item(&format!("{{\"n\":{i}}}"))).collect();
        let f = plan_frame(&items, Format::Json, 1 << 16);
        let bytes = render(&items, Format::Json, &f);
        assert_eq!(bytes.len(), f.total);
        assert_eq!(&bytes[2..], br#"[{"n":0},{"n":1},{"n":2}]"#);
        assert_eq!(bytes[1] as usize, bytes.len() - 2);
        let f = plan_frame(&items, Format::MsgPack, 1 << 16);
        let bytes = render(&items, Format::MsgPack, &f);
        assert_eq!(bytes.len(), f.total);
        assert_eq!(&bytes[2..], &[0x93, 0xc0, 0xc0, 0xc0]);
    }

    #[test]
    fn single_items_are_not_wrapped_and_batches_respect_the_cap() {
        let items: std::collections::VecDeque<Out> =
            (0..10).map(|_| item(&"x".repeat(400))).collect();
        let f = plan_frame(&items, Format::Json, 1024);
        assert_eq!(f.items, 2);
        let one: std::collections::VecDeque<Out> = [item("{}")].into_iter().collect();
        let f = plan_frame(&one, Format::Json, 1024);
        assert_eq!(render(&one, Format::Json, &f), b"\x81\x02{}");
    }

    #[test]
    fn iov_skips_what_was_sent() {
        let mut iov = Iov::new(3);
        assert!(iov.push(b"ab"));
        assert!(iov.push(b"cdef"));
        assert_eq!(&*iov.slices[0], b"def");
    }
}
