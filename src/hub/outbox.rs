//! A connection's side that the hub sees: its bounded queue of pending output
//! and the few flags the hub and the heartbeat set on it.
//!
//! Pending messages are shared references to publications encoded once
//! ([`Publication`]); nothing is serialized or copied per subscriber here.
//! The connection task turns the queue into frames when it next runs, so
//! everything queued in one loop turn leaves in one write.
//!
//! The queue is strictly first in, first out, and that is what keeps the
//! replies to a connection's requests in request order: a request whose
//! answer comes later (from another shard, or from the backplane) takes its
//! place in the queue at once, as an [`Out::Awaiting`] slot, and the writer
//! stops at a slot until the hub fills it. What is queued behind the slot
//! (later replies, live messages) waits with it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use thin_vec::ThinVec;

use crate::backplane::Publication;
use crate::config::SlowConsumerPolicy;
use crate::protocol::Format;

/// A publication as a shard shares it among its subscribers: an `Rc` (a
/// plain increment per subscriber, on this core only) around the `Arc` that
/// crossed cores once. `Rc<Publication>` would need a copy per shard and
/// `Arc<Publication>` alone would bounce one refcount between all cores.
#[allow(clippy::redundant_allocation)]
pub type SharedPublication = Rc<Arc<Publication>>;

/// One pending output item.
pub enum Out {
    /// A publication shared with every subscriber on this shard.
    Message(SharedPublication),
    /// A publication replayed from history for `since`, or one of a
    /// snapshot. Its bytes are shared with the history that holds it, so
    /// only what the queue spends on it counts ([`REPLAYED_ITEM_COST`]).
    Replayed(SharedPublication),
    /// A reply (`subscribed`, `error`, ...) for this connection alone.
    Reply(Box<[u8]>),
    /// The place of a reply that is not known yet.
    Awaiting(Rc<ReplySlot>),
}

impl Out {
    /// The bytes this item puts in a frame (none for a slot).
    #[inline]
    pub fn bytes(&self, format: Format) -> &[u8] {
        match self {
            Out::Message(p) | Out::Replayed(p) => match format {
                Format::Json => &p.json,
                Format::MsgPack => &p.msgpack,
            },
            Out::Reply(b) => b,
            Out::Awaiting(_) => &[],
        }
    }

    /// The bytes this item counts against the pending bound.
    #[inline]
    fn counted(&self, format: Format) -> usize {
        match self {
            Out::Message(_) | Out::Reply(_) => self.bytes(format).len(),
            Out::Replayed(_) => REPLAYED_ITEM_COST,
            Out::Awaiting(slot) => slot
                .items
                .borrow()
                .as_ref()
                .map_or(0, |items| items.iter().map(|i| i.counted(format)).sum()),
        }
    }
}

/// A publication's channel and key, which the conflate policy merges by.
type ChannelKey<'a> = (&'a Arc<str>, &'a Option<Arc<str>>);

/// What a replayed item costs the queue beside the bytes it shares with
/// history: its slot and its `Rc`.
pub const REPLAYED_ITEM_COST: usize = 48;

/// What answers one request: usually one reply (held inline, so answering
/// allocates nothing beside the reply), or a replay and its `subscribed`.
pub type Answer = smallvec::SmallVec<[Out; 1]>;

/// Where a deferred reply goes: filled once by the hub, then written in
/// the place its request had.
#[derive(Default)]
pub struct ReplySlot {
    items: RefCell<Option<Answer>>,
}

/// What the outbox did with a pushed message.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Older messages were dropped to make room (drop-oldest policy).
    DroppedOldest(usize),
    /// Pending messages were merged per key to make room (conflate
    /// policy): how many went, and how many older ones were then dropped.
    Merged {
        merged: usize,
        dropped: usize,
    },
    /// The connection is being closed as a slow consumer; nothing was queued.
    Disconnected,
    /// The connection is closing anyway; nothing was queued.
    Closed,
}

/// A connection's queue of items, boxed and only while it holds some
/// since the heartbeat last freed it: an idle connection then carries one
/// pointer instead of a 32-byte `VecDeque`. Reads of an unallocated queue
/// see an empty one; the first write allocates it.
#[derive(Default)]
// The extra allocation is the point: a pointer in every connection
// instead of a `VecDeque`'s 32 bytes.
#[allow(clippy::box_collection)]
pub struct Queue(Option<Box<VecDeque<Out>>>);

/// What an unallocated [`Queue`] reads as.
const EMPTY_QUEUE: &VecDeque<Out> = &VecDeque::new();

impl std::ops::Deref for Queue {
    type Target = VecDeque<Out>;

    #[inline]
    fn deref(&self) -> &VecDeque<Out> {
        self.0.as_deref().unwrap_or(EMPTY_QUEUE)
    }
}

impl std::ops::DerefMut for Queue {
    #[inline]
    fn deref_mut(&mut self) -> &mut VecDeque<Out> {
        self.0.get_or_insert_with(Box::default)
    }
}

/// Items a queue holds in its first allocation.
const FIRST_CAPACITY: usize = 4;

impl Queue {
    /// Frees the storage of an empty queue.
    fn release(&mut self) {
        if self.0.as_ref().is_some_and(|q| q.is_empty()) {
            self.0 = None;
        }
    }

    /// After the writer emptied the queue, whose last frame carried
    /// `last_frame` items: a queue that never grew past its first
    /// allocation (a reply, a message now and then) is freed at once, so
    /// that connections set up in a burst do not each leave a hole the size
    /// of a queue between their long-lived allocations until the
    /// heartbeat's release. A grown one (a busy connection) keeps room for
    /// about twice its last frame, so that a steady feed does not grow it
    /// again from scratch for every frame; past that (the backlog of a
    /// burst) it is cut back.
    pub fn trim_drained(&mut self, last_frame: usize) {
        let Some(q) = self.0.as_mut() else { return };
        if !q.is_empty() {
            return;
        }
        if q.capacity() <= FIRST_CAPACITY {
            self.0 = None;
        } else if q.capacity() > 64 && q.capacity() > 2 * last_frame {
            q.shrink_to(8);
        }
    }
}

#[derive(Default)]
pub struct Outbox {
    pub items: Queue,
    /// Payload bytes of `items`.
    pub bytes: usize,
    /// Items at the front that form the frame being written; untouchable.
    /// (A frame holds at most a few hundred items; the small integer types
    /// here keep an idle connection's outbox the size it had before slots
    /// and pong coalescing.)
    pub in_flight: u16,
    /// Where the pong that ends `control`, not yet written at all, starts,
    /// plus one (0: none).
    pong_at: u16,
    /// Reply slots (`Out::Awaiting`) in `items`.
    slots: u32,
    /// Encoded control frames (ping, pong, close) waiting to go out. A
    /// thin vector: one pointer, and no allocation while empty, because
    /// every idle connection carries it.
    pub control: ThinVec<u8>,
    waker: Option<Waker>,
}

/// A close the connection task must perform.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseRequest {
    /// Status to send; 0 sends a close frame without a status (the echo of
    /// a client close that carried none).
    pub code: u16,
    pub reason: &'static str,
    /// Send what is queued first (draining), or drop it (errors).
    pub flush: bool,
}

/// A shard tick or none, in four bytes where `Cell<Option<u32>>` takes
/// eight: every connection carries two. Ticks count seconds, so the
/// sentinel is never a real tick.
#[derive(Debug)]
pub struct OptionalTick(Cell<u32>);

impl OptionalTick {
    const NONE: u32 = u32::MAX;

    pub fn get(&self) -> Option<u32> {
        Some(self.0.get()).filter(|&t| t != Self::NONE)
    }

    pub fn set(&self, tick: Option<u32>) {
        self.0.set(tick.unwrap_or(Self::NONE));
    }
}

impl Default for OptionalTick {
    fn default() -> Self {
        OptionalTick(Cell::new(Self::NONE))
    }
}

pub struct Conn {
    pub format: Format,
    pub out: RefCell<Outbox>,
    /// Set by the hub: send a close frame with this status, then end.
    pub close: Cell<Option<CloseRequest>>,
    /// [`Conn::ABORT`], [`Conn::GONE`], [`Conn::PING_DUE`], [`Conn::HELD`],
    /// [`Conn::FLUSHING`]: one byte, because every idle connection carries
    /// them.
    flags: Cell<u8>,
    /// Heartbeat clock (shard ticks, seconds) of the last bytes read.
    pub last_read: Cell<u32>,
    /// Tick when a heartbeat ping was asked for and not yet answered.
    pub ping_sent: OptionalTick,
    /// Tick when closing started, to bound how long a close may take.
    pub closing_since: OptionalTick,
    /// Publications this second, for `--max-publish-rate`.
    pub publishes_this_tick: Cell<u32>,
    /// Subscribes and unsubscribes this second, for `--max-subscribe-rate`.
    pub subscribes_this_tick: Cell<u32>,
    /// Pings this second: past [`PINGS_PER_SECOND`], input waits.
    pub pings_this_tick: Cell<u16>,
    /// Frames and bytes read this second, for --max-frames-per-second and
    /// --max-bytes-per-second.
    pub frames_this_tick: Cell<u32>,
    pub bytes_this_tick: Cell<u32>,
}

/// Most queued items one frame carries: a queue this long is a full frame
/// and is written at once, even while writes are held (`--write-delay`).
pub const MAX_BATCH_ITEMS: usize = 256;

/// Replies a connection may await from other shards or Redis before its
/// input is read no further: its requests in flight stay bounded (by
/// this plus what one read holds), so a client cannot fill the queues
/// between shards faster than they drain. TCP holds the rest back.
pub const MAX_REPLIES_AWAITED: u32 = 64;

/// Pings a connection is answered per second before its input waits for
/// the next second: answering is cheap, reading a flood of them is not.
pub const PINGS_PER_SECOND: u16 = 64;

impl Conn {
    /// Set by the heartbeat: end now, without a close handshake.
    const ABORT: u8 = 1;
    /// Set when the connection left the hub; late acks are then dropped.
    const GONE: u8 = 2;
    /// A heartbeat ping is asked for and not yet queued.
    const PING_DUE: u8 = 4;
    /// Its writes wait for the shard's next flush (`--write-delay`): it is
    /// on the shard's held list, and publications queued meanwhile do not
    /// wake it.
    const HELD: u8 = 8;
    /// The flush came: write everything queued, holding nothing back,
    /// until the queue is drained.
    const FLUSHING: u8 = 16;

    fn flag(&self, flag: u8) -> bool {
        self.flags.get() & flag != 0
    }

    fn raise(&self, flag: u8) {
        self.flags.set(self.flags.get() | flag);
    }

    /// The heartbeat (or a close that took too long) ended the connection.
    pub fn aborted(&self) -> bool {
        self.flag(Self::ABORT)
    }

    /// The connection left the hub.
    pub fn is_gone(&self) -> bool {
        self.flag(Self::GONE)
    }

    pub fn mark_gone(&self) {
        self.raise(Self::GONE);
    }

    /// Whether a heartbeat ping is asked for and not yet queued.
    pub fn ping_due(&self) -> bool {
        self.flag(Self::PING_DUE)
    }

    /// Takes the heartbeat's request for a ping, to queue it.
    pub fn take_ping_due(&self) -> bool {
        let due = self.ping_due();
        self.lower(Self::PING_DUE);
        due
    }

    fn lower(&self, flag: u8) {
        self.flags.set(self.flags.get() & !flag);
    }

    /// Whether its writes wait for the shard's next flush.
    pub fn writes_held(&self) -> bool {
        self.flag(Self::HELD)
    }

    /// Marks its writes held; false when they already were (it is on the
    /// shard's held list once).
    pub(super) fn hold_writes(&self) -> bool {
        let was = self.writes_held();
        self.raise(Self::HELD);
        !was
    }

    /// The shard's flush: it writes what it holds now.
    pub(super) fn release_writes(&self) {
        self.lower(Self::HELD);
        self.raise(Self::FLUSHING);
        self.wake();
    }

    /// Whether a flush is being written (nothing is held back until the
    /// queue is drained).
    pub fn flushing(&self) -> bool {
        self.flag(Self::FLUSHING)
    }

    /// The queue is drained: the flush is over.
    pub fn end_flush(&self) {
        self.lower(Self::FLUSHING);
    }

    pub fn new(format: Format, now: u32) -> Conn {
        Conn {
            format,
            out: RefCell::new(Outbox::default()),
            close: Cell::new(None),
            flags: Cell::new(0),
            last_read: Cell::new(now),
            ping_sent: OptionalTick::default(),
            closing_since: OptionalTick::default(),
            publishes_this_tick: Cell::new(0),
            subscribes_this_tick: Cell::new(0),
            pings_this_tick: Cell::new(0),
            frames_this_tick: Cell::new(0),
            bytes_this_tick: Cell::new(0),
        }
    }

    /// Queues a publication, enforcing the pending-bytes bound with
    /// `policy` (and `fallback`, when merging per key is not enough).
    /// While its writes are held, it wakes the connection only once the
    /// queue holds `held_bytes` ([`crate::config::Limits::held_bytes`]) or
    /// [`MAX_BATCH_ITEMS`].
    pub fn push_message(
        &self,
        publication: &SharedPublication,
        max_pending: usize,
        policy: SlowConsumerPolicy,
        fallback: SlowConsumerPolicy,
        held_bytes: usize,
    ) -> Pushed {
        if self.close.get().is_some() || self.aborted() {
            return Pushed::Closed;
        }
        let len = match self.format {
            Format::Json => publication.json.len(),
            Format::MsgPack => publication.msgpack.len(),
        };
        let mut out = self.out.borrow_mut();
        let (mut merged, mut dropped) = (0, 0);
        if out.bytes + len > max_pending {
            let mut policy = policy;
            if policy == SlowConsumerPolicy::Conflate {
                // The incoming message supersedes pending ones of its key.
                merged =
                    out.merge_per_key(self.format, Some((&publication.channel, &publication.key)));
                policy = fallback;
            }
            if out.bytes + len > max_pending {
                match policy {
                    SlowConsumerPolicy::DropOldest => {
                        dropped = out.drop_oldest_messages(self.format, len, max_pending);
                    }
                    _ => {
                        drop(out);
                        return self.disconnect_slow();
                    }
                }
            }
        }
        out.bytes += len;
        out.items.push_back(Out::Message(publication.clone()));
        if !self.writes_held() || out.makes_a_full_frame(held_bytes) {
            out.wake();
        }
        match (merged, dropped) {
            (0, 0) => Pushed::Queued,
            (0, dropped) => Pushed::DroppedOldest(dropped),
            (merged, dropped) => Pushed::Merged { merged, dropped },
        }
    }

    /// Queues a reply. Replies are never dropped, so a client that keeps
    /// sending requests without reading the answers past `max_pending` is
    /// disconnected whatever the slow-consumer policy.
    pub fn push_reply(&self, payload: Vec<u8>, max_pending: usize) -> Pushed {
        if self.close.get().is_some() || self.aborted() {
            return Pushed::Closed;
        }
        let mut out = self.out.borrow_mut();
        if out.bytes + payload.len() > max_pending {
            drop(out);
            return self.disconnect_slow();
        }
        out.bytes += payload.len();
        out.items.push_back(Out::Reply(payload.into_boxed_slice()));
        out.wake();
        Pushed::Queued
    }

    /// Takes the place of a reply that will be known later; everything
    /// queued after it waits until [`Conn::fill_reply`] fills it.
    /// Replies this connection waits for from another shard or Redis
    /// (its requests in flight there).
    pub fn replies_awaited(&self) -> u32 {
        self.out.borrow().slots
    }

    /// Wakes the connection's task (to read again, say).
    pub fn wake(&self) {
        if let Ok(mut out) = self.out.try_borrow_mut() {
            out.wake();
        }
    }

    /// Whether what waits in the outbox holds the client's input back: a
    /// control frame (a pong, say) still unwritten, so the client is not
    /// reading what it asked for, or `max_awaited` replies still owed by
    /// other shards or Redis.
    pub fn output_holds_back_input(&self, max_awaited: u32) -> bool {
        let out = self.out.borrow();
        !out.control.is_empty() || out.slots >= max_awaited
    }

    pub fn reserve_reply(&self) -> Rc<ReplySlot> {
        let slot = Rc::new(ReplySlot::default());
        if self.close.get().is_none() && !self.aborted() {
            let mut out = self.out.borrow_mut();
            out.items.push_back(Out::Awaiting(slot.clone()));
            out.slots += 1;
        }
        slot
    }

    /// Fills a reserved place with the reply (and, for a subscribe with
    /// `since`, its replay), within the pending-bytes bound like
    /// [`Conn::push_reply`]. An empty fill just frees the place. Without a
    /// place (the answer came while its request was being handled), the
    /// items go to the end of the queue. A close that flushes (a drain)
    /// still takes fills: it waits for the queue to empty, and a slot left
    /// empty would hold it until the close deadline.
    pub fn fill_reply(
        &self,
        slot: Option<&ReplySlot>,
        items: Answer,
        max_pending: usize,
    ) -> Pushed {
        let flushing = self.close.get().is_some_and(|c| c.flush);
        if self.is_gone() || self.aborted() || (self.close.get().is_some() && !flushing) {
            return Pushed::Closed;
        }
        if slot.is_none() && flushing {
            return Pushed::Closed;
        }
        let counted: usize = items.iter().map(|i| i.counted(self.format)).sum();
        let mut out = self.out.borrow_mut();
        // A replay or snapshot is let in whole while the queue is under
        // half its bound (one larger than the bound still gets through, as
        // fast as the client reads); past that it counts like anything
        // else, so a client asking for snapshot after snapshot without
        // reading is bounded too.
        let room = out.bytes + counted <= max_pending || out.bytes <= max_pending / 2;
        if counted > 0 && !room {
            drop(out);
            return self.disconnect_slow();
        }
        out.bytes += counted;
        match slot {
            Some(slot) => *slot.items.borrow_mut() = Some(items),
            None => out.items.extend(items),
        }
        out.wake();
        Pushed::Queued
    }

    /// Takes out of the queue the messages of `channel` up to seq `upto`
    /// queued after `slot` (a reply not known yet), in order: what an old
    /// subscription delivered while its replacement was on its way.
    pub fn take_queued_after(
        &self,
        slot: &Rc<ReplySlot>,
        channel: &str,
        upto: u64,
    ) -> Vec<SharedPublication> {
        let mut out = self.out.borrow_mut();
        let Some(at) = out
            .items
            .iter()
            .position(|item| matches!(item, Out::Awaiting(s) if Rc::ptr_eq(s, slot)))
        else {
            return Vec::new();
        };
        let format = self.format;
        let mut taken = Vec::new();
        let mut freed = 0;
        let mut i = 0;
        out.items.retain(|item| {
            let index = i;
            i += 1;
            match item {
                Out::Message(p)
                    if index > at && &*p.channel == channel && p.seq.is_some_and(|s| s <= upto) =>
                {
                    freed += item.counted(format);
                    taken.push(p.clone());
                    false
                }
                _ => true,
            }
        });
        out.bytes -= freed;
        taken
    }

    /// Frees what is queued and asks for a 4008 close.
    fn disconnect_slow(&self) -> Pushed {
        self.out.borrow_mut().discard_queued(self.format);
        self.request_close(CloseRequest {
            code: crate::protocol::close::SLOW_CONSUMER,
            reason: "slow consumer",
            flush: false,
        });
        Pushed::Disconnected
    }

    /// Asks for a heartbeat ping (the connection's task writes it) and
    /// notes when, for the pong deadline.
    pub fn request_ping(&self, now: u32) {
        self.ping_sent.set(Some(now));
        self.raise(Self::PING_DUE);
        if let Ok(mut out) = self.out.try_borrow_mut() {
            out.wake();
        }
    }

    /// Queues the pong answering a ping, as `frame` writes it. A pong
    /// still wholly unsent at the end of the queue is replaced rather than
    /// followed (RFC 6455 5.5.3 lets a pong answer only the latest ping),
    /// so a client that pings and never reads holds one pong here, not one
    /// per ping.
    pub fn push_pong(&self, frame: impl FnOnce(&mut ThinVec<u8>)) {
        self.pings_this_tick
            .set(self.pings_this_tick.get().saturating_add(1));
        let mut out = self.out.borrow_mut();
        if out.pong_at > 0 {
            let start = usize::from(out.pong_at - 1);
            out.control.truncate(start);
        }
        let start = out.control.len();
        frame(&mut out.control);
        out.pong_at = u16::try_from(start + 1).unwrap_or(0);
        out.wake();
    }

    /// Asks the connection task to close with `req` (the first request wins).
    pub fn request_close(&self, req: CloseRequest) {
        if self.close.get().is_none() {
            self.close.set(Some(req));
        }
        self.out.borrow_mut().wake();
    }

    /// Ends the connection at once (dead peer, or a close that took too long).
    pub fn request_abort(&self) {
        self.raise(Self::ABORT);
        self.out.borrow_mut().wake();
    }
}

impl Outbox {
    /// Frees the queue's storage when nothing is queued. Called once a
    /// second by the heartbeat, so a connection that went quiet holds no
    /// queue while a busy one keeps its storage between writes.
    pub fn release_if_empty(&mut self) {
        self.items.release();
    }

    pub fn set_waker(&mut self, waker: &Waker) {
        match &self.waker {
            Some(w) if w.will_wake(waker) => {}
            _ => self.waker = Some(waker.clone()),
        }
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Appends a control frame other than a pong (which then no longer
    /// ends the queue, so the next pong follows it).
    pub fn append_control(&mut self, frame: impl FnOnce(&mut ThinVec<u8>)) {
        frame(&mut self.control);
        self.pong_at = 0;
    }

    /// Drops the first `n` bytes of `control`, which were written.
    pub fn control_written(&mut self, n: usize) {
        self.control.drain(..n);
        // A pong partly written stays as it is; one behind what was
        // written moves with the rest.
        self.pong_at = match usize::from(self.pong_at) {
            0 => 0,
            at if at > n => (at - n) as u16,
            _ => 0,
        };
        if self.control.is_empty() {
            self.control = ThinVec::new();
        }
    }

    /// Whether what is queued may wait for the next flush: live
    /// publications only, fewer than [`MAX_BATCH_ITEMS`] and
    /// `held_bytes`. A reply, a replayed answer or a slot goes now, and
    /// what is queued before it with it.
    pub fn may_hold(&self, held_bytes: usize) -> bool {
        self.slots == 0
            && !self.makes_a_full_frame(held_bytes)
            && self.items.iter().all(|i| matches!(i, Out::Message(_)))
    }

    /// Whether what is queued is as much as a connection may hold back:
    /// [`MAX_BATCH_ITEMS`] items or `held_bytes`.
    fn makes_a_full_frame(&self, held_bytes: usize) -> bool {
        self.items.len() >= MAX_BATCH_ITEMS || self.bytes >= held_bytes
    }

    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty() && self.control.is_empty()
    }

    /// Puts the contents of filled slots among the first `within` items in
    /// their places, up to the first slot still waiting, so that the next
    /// frame can carry everything ready (a burst of acknowledged publishes
    /// leaves as one frame, not one frame per reply). True when the front
    /// is then writable (not an empty queue, not a waiting slot).
    #[inline]
    pub fn open_front(&mut self, within: usize) -> bool {
        debug_assert_eq!(self.in_flight, 0, "never while a frame is in flight");
        let mut i = 0;
        while self.slots > 0 && i < within.min(self.items.len()) {
            let filled = match &self.items[i] {
                Out::Awaiting(slot) => slot.items.borrow_mut().take(),
                _ => {
                    i += 1;
                    continue;
                }
            };
            let Some(filled) = filled else { break };
            self.items.remove(i);
            self.slots -= 1;
            // Filled contents are never slots: the scan walks past them.
            for (k, item) in filled.into_iter().enumerate() {
                self.items.insert(i + k, item);
            }
        }
        self.items
            .front()
            .is_some_and(|front| !matches!(front, Out::Awaiting(_)))
    }

    /// Drops everything queued (the connection is closing).
    pub fn clear(&mut self) {
        self.items = Queue::default();
        self.bytes = 0;
        self.slots = 0;
    }

    /// Removes the `n` items of a frame that was written whole; returns
    /// how many were publications and when the oldest live one was made.
    #[inline]
    pub fn pop_written(&mut self, n: usize, format: Format) -> (u64, Option<Instant>) {
        let (mut messages, mut oldest, mut freed) = (0, None, 0);
        for item in self.items.drain(..n) {
            match &item {
                Out::Message(p) => {
                    messages += 1;
                    oldest.get_or_insert(p.at);
                    freed += match format {
                        Format::Json => p.json.len(),
                        Format::MsgPack => p.msgpack.len(),
                    };
                }
                // A replay is old by design: not a publish-to-write latency.
                Out::Replayed(_) => {
                    messages += 1;
                    freed += REPLAYED_ITEM_COST;
                }
                Out::Reply(b) => freed += b.len(),
                Out::Awaiting(_) => debug_assert!(false, "a frame never holds a reply slot"),
            }
        }
        self.bytes -= freed;
        (messages, oldest)
    }

    /// Drops every queued item that is not part of the frame being written.
    fn discard_queued(&mut self, format: Format) {
        let keep = self.in_flight as usize;
        for item in self.items.drain(keep..) {
            self.bytes -= item.counted(format);
        }
        self.slots = 0;
        self.items.shrink_to_fit();
    }

    /// Keeps, of the queued messages (not the frame in flight, not
    /// replies or replays), only the latest of each key of each channel,
    /// the order of those kept unchanged (so their seqs still grow);
    /// `incoming`'s channel and key count as seen, since the message about
    /// to be queued supersedes pending ones of its key. Returns how many
    /// went.
    fn merge_per_key(&mut self, format: Format, incoming: Option<ChannelKey<'_>>) -> usize {
        let start = self.in_flight as usize;
        let mut seen: std::collections::HashSet<ChannelKey<'_>> = incoming.into_iter().collect();
        let mut stale = vec![false; self.items.len()];
        let mut merged = 0;
        for (i, item) in self.items.iter().enumerate().skip(start).rev() {
            if let Out::Message(p) = item {
                if !seen.insert((&p.channel, &p.key)) {
                    stale[i] = true;
                    merged += 1;
                }
            }
        }
        drop(seen);
        if merged == 0 {
            return 0;
        }
        let mut i = 0;
        let mut freed = 0;
        self.items.retain(|item| {
            let keep = !stale[i];
            i += 1;
            if !keep {
                freed += item.counted(format);
            }
            keep
        });
        self.bytes -= freed;
        merged
    }

    /// Drops the oldest queued messages (never replies, never the frame in
    /// flight) until `incoming` more bytes fit under `max`. Returns how many.
    fn drop_oldest_messages(&mut self, format: Format, incoming: usize, max: usize) -> usize {
        let mut dropped = 0;
        let mut i = self.in_flight as usize;
        while self.bytes + incoming > max && i < self.items.len() {
            if matches!(self.items[i], Out::Message(_)) {
                if let Some(item) = self.items.remove(i) {
                    self.bytes -= item.counted(format);
                    dropped += 1;
                }
            } else {
                i += 1;
            }
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Conn {
        Conn::new(Format::Json, 0)
    }

    /// Every connection holds one `Rc<Conn>`: with the `Rc`'s two counts
    /// it fills jemalloc's 128-byte class, and one byte more would take it
    /// to 160 on every idle connection.
    #[test]
    fn a_conn_fits_jemallocs_128_byte_class_with_its_rc() {
        let size = std::mem::size_of::<Conn>() + 2 * std::mem::size_of::<usize>();
        assert!(size <= 128, "an Rc<Conn> is {size} bytes");
    }

    #[test]
    fn a_queue_drained_within_its_first_allocation_is_freed() {
        let mut out = Outbox::default();
        out.items.push_back(Out::Reply(b"{}".to_vec().into()));
        out.items.pop_front();
        out.items.trim_drained(1);
        assert!(out.items.0.is_none(), "a reply's queue goes once written");
        let fill = |out: &mut Outbox, n: usize| {
            for _ in 0..n {
                out.items.push_back(Out::Reply(b"{}".to_vec().into()));
            }
            out.items.clear();
        };
        fill(&mut out, 1000);
        out.items.trim_drained(256);
        let kept = out.items.capacity();
        assert!(
            (8..=64).contains(&kept),
            "a backlog's room is cut back: {kept}"
        );
        fill(&mut out, 200);
        let grown = out.items.capacity();
        out.items.trim_drained(200);
        assert_eq!(out.items.capacity(), grown, "a steady feed keeps its room");
    }

    fn reply(text: &str) -> Answer {
        smallvec::smallvec![Out::Reply(text.as_bytes().into())]
    }

    fn texts(out: &Outbox) -> Vec<String> {
        out.items
            .iter()
            .map(|i| match i {
                Out::Awaiting(_) => "?".to_string(),
                other => String::from_utf8_lossy(other.bytes(Format::Json)).into_owned(),
            })
            .collect()
    }

    #[test]
    fn filled_slots_open_in_request_order_up_to_the_first_waiting_one() {
        let c = conn();
        let first = c.reserve_reply();
        let second = c.reserve_reply();
        c.push_reply(b"now".to_vec(), 1 << 20);
        let third = c.reserve_reply();
        assert!(
            !c.out.borrow_mut().open_front(256),
            "nothing is writable yet"
        );
        c.fill_reply(Some(&second), reply("2"), 1 << 20);
        assert!(!c.out.borrow_mut().open_front(256), "the first still waits");
        c.fill_reply(Some(&first), reply("1"), 1 << 20);
        assert!(c.out.borrow_mut().open_front(256));
        assert_eq!(texts(&c.out.borrow()), ["1", "2", "now", "?"]);
        c.fill_reply(Some(&third), Answer::new(), 1 << 20);
        c.fill_reply(None, reply("end"), 1 << 20);
        assert_eq!(texts(&c.out.borrow()).last().unwrap(), "end");
        c.out.borrow_mut().items.pop_back();
        c.out.borrow_mut().bytes -= 3;
        assert!(c.out.borrow_mut().open_front(256));
        assert_eq!(texts(&c.out.borrow()), ["1", "2", "now"]);
        assert_eq!(c.out.borrow().bytes, 5);
        assert_eq!(c.out.borrow().slots, 0);
    }

    #[test]
    fn a_draining_close_still_takes_the_fills_it_waits_for() {
        let c = conn();
        let slot = c.reserve_reply();
        c.request_close(CloseRequest {
            code: 1012,
            reason: "",
            flush: true,
        });
        assert_eq!(
            c.fill_reply(Some(&slot), reply("late"), 1 << 20),
            Pushed::Queued
        );
        assert!(c.out.borrow_mut().open_front(256));
        assert_eq!(texts(&c.out.borrow()), ["late"]);
        c.mark_gone();
        let other = c.reserve_reply();
        assert_eq!(
            c.fill_reply(Some(&other), reply("x"), 1 << 20),
            Pushed::Closed
        );
    }

    #[test]
    fn an_unsent_pong_is_replaced_by_the_next_one() {
        let c = conn();
        // An RFC 6455 pong as ws writes one, for a payload under 126 bytes.
        let pong = |c: &Conn, payload: &[u8]| {
            c.push_pong(|out| {
                out.extend_from_slice(&[0x8a, payload.len() as u8]);
                out.extend_from_slice(payload);
            })
        };
        for i in 0..1000u32 {
            pong(&c, &i.to_be_bytes());
        }
        assert_eq!(c.out.borrow().control, [0x8a, 4, 0, 0, 0x03, 0xe7]);
        // Something after it: the next pong follows instead.
        c.out.borrow_mut().append_control(|out| out.push(0x89));
        pong(&c, b"a");
        pong(&c, b"b");
        assert_eq!(
            c.out.borrow().control,
            [0x8a, 4, 0, 0, 0x03, 0xe7, 0x89, 0x8a, 1, b'b']
        );
        // Partly written: what is left keeps its pong, the next replaces it.
        c.out.borrow_mut().control_written(7);
        pong(&c, b"c");
        assert_eq!(c.out.borrow().control, [0x8a, 1, b'c']);
        c.out.borrow_mut().control_written(1);
        pong(&c, b"d");
        assert_eq!(c.out.borrow().control, [1, b'c', 0x8a, 1, b'd']);
    }

    #[test]
    fn conflating_a_slow_consumer_merges_per_key_of_each_channel() {
        let c = conn();
        let p = |channel: &str, seq: u64, key: &str| -> SharedPublication {
            let data = crate::protocol::Data::from_json_slice(b"[1]").unwrap();
            let at = std::time::Instant::now();
            Rc::new(Publication::encode(
                &channel.into(),
                Some(seq),
                Some(key.into()),
                &data,
                at,
            ))
        };
        let policy = (SlowConsumerPolicy::Conflate, SlowConsumerPolicy::Disconnect);
        let one = p("a", 1, "k").json.len();
        // Room for three: a's and b's k, twice each, then one more of a.
        for (channel, seq) in [("a", 1), ("b", 1), ("a", 2)] {
            assert_eq!(
                c.push_message(&p(channel, seq, "k"), 3 * one, policy.0, policy.1, 1 << 16),
                Pushed::Queued
            );
        }
        let pushed = c.push_message(&p("b", 2, "k"), 3 * one, policy.0, policy.1, 1 << 16);
        assert_eq!(
            pushed,
            Pushed::Merged {
                merged: 2,
                dropped: 0
            }
        );
        let left: Vec<(String, u64)> = c
            .out
            .borrow()
            .items
            .iter()
            .map(|i| match i {
                Out::Message(m) => (m.channel.to_string(), m.seq.unwrap()),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            left,
            [("a".to_string(), 2), ("b".to_string(), 2)],
            "each channel keeps its own latest"
        );
    }

    #[test]
    fn an_emptied_queue_gives_its_storage_back_and_a_busy_one_keeps_it() {
        let mut out = Outbox::default();
        out.items.push_back(Out::Reply(b"{}".to_vec().into()));
        out.release_if_empty();
        assert!(out.items.capacity() > 0, "a queue with items keeps them");
        assert_eq!(out.items.len(), 1);
        out.items.clear();
        out.release_if_empty();
        assert_eq!(out.items.capacity(), 0);
    }
}
