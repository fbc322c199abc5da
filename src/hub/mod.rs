//! The hub: one per shard (worker core), owning that shard's connections,
//! its local view of channels (who subscribes here, and subscriptions
//! waiting for their owner's answer), the routing of requests to each
//! channel's owner shard, and fan-out to its subscribers. What sequences a
//! channel and keeps its history is the shard's broker (`backplane::broker`):
//! the hub hands it requests and carries out the effects it returns.
//!
//! The hub does no I/O and reads no clock. Its methods, by kind:
//!
//! - connections: [`Shard::register`] when a handshake ends, then
//!   [`Shard::unregister`] when the connection goes;
//! - inputs, each with the time it is handled at: a client's request
//!   ([`Shard::handle_request`], or [`Shard::reply_error`] for one that
//!   could not be read), an HTTP publish ([`Shard::publish_http`]), a
//!   message from another shard, the signal handler or the broker's
//!   machinery ([`Shard::handle_msg`]);
//! - time: [`Shard::tick_at`] once a second (heartbeats, close deadlines,
//!   rate allowances, the broker's tick, memory given back, metrics);
//!   [`Shard::handle_conflation_timers`] when
//!   [`Shard::next_conflation_deadline`] comes; with `--write-delay`,
//!   [`Shard::flush_held_writes`] when [`Shard::next_flush_deadline`]
//!   comes (a connection's task calls [`Shard::hold_writes`] when what it
//!   has queued may wait);
//! - outputs: what each connection must send waits in its outbox
//!   ([`Conn`], drained by the connection's task through
//!   [`outbox::Outbox::open_front`] and `pop_written`, woken when there is
//!   something), what other shards must hear goes on the mesh, and whether
//!   a connection's input must wait is [`Shard::over_request_rate`].
//!
//! `src/hub/tests.rs` drives shards this way on an in-memory mesh, on both
//! backplanes.
//!
//! State lives in a `RefCell` reached through an `Rc<Shard>`: a shard is one
//! thread, so there are no locks; other shards are reached only through the
//! backplane's queues. A borrow of the state is never held across a call
//! that could re-enter the hub.

pub mod conflation;
pub mod outbox;
#[cfg(test)]
mod tests;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::task::Waker;
use std::time::Instant;

use slab::Slab;
use smallvec::SmallVec;

use crate::auth::{Capability, Caps, Grant};
use crate::backplane::broker::{shards_in, ShardSet, Since};

use crate::backplane::{owner_of, Broker, Effect, Mesh, Publication, Replay, ShardMsg, Waiter};
use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::node::NodeState;
use crate::protocol::{
    encode_event, Action, Data, ErrorCode, Event, Format, Id, Request, RequestError,
};
use crate::tables::{shrink_map, SHRINK_FROM};
use conflation::{Group, Member, Wheel, WHEEL_TICK_MS};
pub use outbox::{
    Answer, CloseRequest, Conn, Out, Pushed, ReplySlot, SharedPublication, MAX_BATCH_ITEMS,
    MAX_REPLIES_AWAITED,
};

/// Where a connection's subscription to one local channel stands.
/// Indexes are `u32` (a node holds at most --max-subscriptions-total
/// subscriptions): an entry is 12 bytes, not 24.
#[derive(Clone, Copy)]
enum SubState {
    /// Waiting for the owner's ack (token into `pending_subs`).
    Pending(u32),
    /// Receiving; the slot in the channel's subscriber slab.
    Active(u32),
    /// Receiving through a conflation group: the group's key among the
    /// channel's groups, and the member's slot in it.
    Conflated { group: u16, slot: u32 },
}

/// What a subscribe asks for beside its channel.
#[derive(Debug, Default)]
struct SubscribeOptions {
    since: Option<Since>,
    snapshot: bool,
    conflate_ms: Option<u32>,
}

/// One subscription of a connection: its local channel and state.
#[derive(Clone, Copy)]
struct Sub {
    chan: u32,
    state: SubState,
}

struct ConnEntry {
    conn: Rc<Conn>,
    /// One per channel; the first in place, so the many clients that hold
    /// one subscription allocate nothing for it.
    subs: SmallVec<[Sub; 1]>,
    /// What the connection's token allows (`None`: no tokens on this
    /// relay).
    auth: Option<Box<ConnAuth>>,
}

/// A verified token as the hub keeps it for its connection.
struct ConnAuth {
    sub: Option<String>,
    jti: Option<String>,
    caps: Caps,
    /// The shard tick at which the token expires.
    expires_at: u32,
}

/// A connection's token, as verified at its handshake.
pub struct Authenticated {
    pub grant: Grant,
    /// Seconds from the handshake to the token's `exp`.
    pub expires_in: u64,
}

/// The shard tick `seconds` from `now`.
fn tick_after(now: u32, seconds: u64) -> u32 {
    now.saturating_add(seconds.min(u32::MAX as u64) as u32)
}

struct LocalChannel {
    name: Arc<str>,
    subscribers: Slab<Rc<Conn>>,
    /// Subscribers with `conflate_ms`, one group per window.
    groups: Slab<Group>,
    pending: u32,
}

impl LocalChannel {
    /// Nobody here receives it or waits to.
    fn unused(&self) -> bool {
        self.subscribers.is_empty() && self.groups.is_empty() && self.pending == 0
    }

    /// Ends a subscription's receiving (not a pending one).
    fn leave(&mut self, state: SubState) {
        match state {
            SubState::Active(slot) => {
                self.subscribers.remove(slot as usize);
            }
            SubState::Conflated { group, slot } => {
                let g = &mut self.groups[group as usize];
                g.members.remove(slot as usize);
                if g.members.is_empty() {
                    self.groups.remove(group as usize);
                }
            }
            SubState::Pending(_) => {}
        }
    }

    /// Starts `conn` receiving, conflated when `window_ms` is given, after
    /// seq `after` (what its subscribe's answer covered).
    fn join(&mut self, conn: Rc<Conn>, window_ms: Option<u32>, after: u64) -> SubState {
        let Some(window_ms) = window_ms else {
            return SubState::Active(self.subscribers.insert(conn) as u32);
        };
        let group = match self.groups.iter().find(|(_, g)| g.window_ms == window_ms) {
            Some((key, _)) => key,
            None => self.groups.insert(Group::new(window_ms)),
        };
        let slot = self.groups[group].members.insert(Member { conn, after });
        SubState::Conflated {
            group: group as u16,
            slot: slot as u32,
        }
    }
}

struct PendingSub {
    conn_key: usize,
    conn: Rc<Conn>,
    /// The reply's place in the connection's queue, when the answer comes
    /// after the request was handled (another shard's, or Redis's).
    slot: Option<Rc<ReplySlot>>,
    chan: usize,
    id: Option<Id>,
    since_given: bool,
    /// The conflation window asked for.
    conflate_ms: Option<u32>,
    /// Replaces the options of a subscription already receiving, which
    /// goes on as it was until this one is answered.
    replaces: bool,
    /// Unsubscribed (or gone) before the ack: answered, never activated.
    cancelled: bool,
}

/// The wait of an HTTP publish for its seq.
#[derive(Default)]
pub struct PublishWait {
    /// Some(None): the backplane could not sequence it.
    seq: Cell<Option<Option<u64>>>,
    waker: RefCell<Option<Waker>>,
}

impl PublishWait {
    /// The seq given to the publication, or None when it failed.
    pub async fn seq(self: Rc<Self>) -> Option<u64> {
        std::future::poll_fn(|cx| match self.seq.get() {
            Some(s) => std::task::Poll::Ready(s),
            None => {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await
    }

    fn complete(&self, seq: Option<u64>) {
        self.seq.set(Some(seq));
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

enum PendingPub {
    Ws {
        conn: Rc<Conn>,
        /// The reply's place in the connection's queue (left empty on
        /// success when the publish had no id), when the answer comes
        /// after the request was handled.
        slot: Option<Rc<ReplySlot>>,
        channel: Arc<str>,
        id: Option<Id>,
    },
    Http(Rc<PublishWait>),
}

#[derive(Default)]
struct State {
    conns: Slab<ConnEntry>,
    local_index: HashMap<Arc<str>, usize>,
    local: Slab<LocalChannel>,
    pending_subs: Slab<PendingSub>,
    pending_pubs: Slab<PendingPub>,
    /// When the conflation groups' windows close.
    wheel: Wheel,
}

impl State {
    /// Shrinks tables a burst left mostly empty (subscription churn,
    /// storms of subscribes or publishes in flight), so memory taken in
    /// a burst is given back after it.
    fn give_back_memory(&mut self) {
        shrink_map(&mut self.local_index);
        // Slab keys must stay put while any entry lives: only an emptied
        // slab can be replaced.
        if self.pending_subs.is_empty() && self.pending_subs.capacity() > SHRINK_FROM {
            self.pending_subs = Slab::new();
        }
        if self.pending_pubs.is_empty() && self.pending_pubs.capacity() > SHRINK_FROM {
            self.pending_pubs = Slab::new();
        }
        if self.local.is_empty() && self.local.capacity() > SHRINK_FROM {
            self.local = Slab::new();
        }
        for (_, entry) in self.conns.iter_mut() {
            let subs = &mut entry.subs;
            if subs.capacity() > 2 * subs.len() + 4 {
                subs.shrink_to_fit();
            }
        }
    }
}

/// One worker core's share of the relay.
pub struct Shard {
    pub id: usize,
    pub config: Arc<Config>,
    pub node: Arc<NodeState>,
    pub metrics: ShardMetrics,
    mesh: Mesh,
    /// Sequences and keeps the channels this shard owns.
    broker: RefCell<Box<dyn Broker>>,
    /// The effects of a broker step, kept to reuse its allocation.
    effects: RefCell<Vec<Effect>>,
    state: RefCell<State>,
    /// Heartbeat clock: whole seconds since the shard started, as the
    /// last tick gave it.
    pub now: Cell<u32>,
    /// Unix seconds, as the last tick gave them (token times).
    unix: Cell<u64>,
    /// The generation of the node's revocations this shard last looked at.
    revocations_seen: Cell<u64>,
    /// The time the last input came with, and the first (what the
    /// conflation wheel counts milliseconds from).
    last_input: Cell<Option<Instant>>,
    clock_base: std::cell::OnceCell<Instant>,
    /// The task that sleeps until the wheel's next tick, to wake when an
    /// earlier one is scheduled.
    wheel_waker: RefCell<Option<Waker>>,
    /// Connections whose writes wait (`--write-delay`), each once
    /// ([`Conn::writes_held`]), with when they are due, in that order.
    held: RefCell<std::collections::VecDeque<(Instant, Rc<Conn>)>>,
    /// The task that flushes them, waiting for the first.
    flush_waker: RefCell<Option<Waker>>,
}

impl Shard {
    pub fn new(
        id: usize,
        config: Arc<Config>,
        node: Arc<NodeState>,
        mesh: Mesh,
        broker: Box<dyn Broker>,
    ) -> Shard {
        Shard {
            id,
            config,
            node,
            metrics: ShardMetrics::new(id),
            mesh,
            broker: RefCell::new(broker),
            effects: RefCell::default(),
            state: RefCell::new(State::default()),
            now: Cell::new(0),
            unix: Cell::new(0),
            revocations_seen: Cell::new(0),
            last_input: Cell::new(None),
            clock_base: std::cell::OnceCell::new(),
            wheel_waker: RefCell::new(None),
            held: RefCell::default(),
            flush_waker: RefCell::new(None),
        }
    }

    /// Notes the time an input comes with (the hub reads no clock).
    fn note_time(&self, now: Instant) {
        self.clock_base.get_or_init(|| now);
        self.last_input.set(Some(now));
    }

    /// Milliseconds from the shard's first input to `at`.
    fn millis(&self, at: Instant) -> u64 {
        let base = *self.clock_base.get_or_init(|| at);
        at.saturating_duration_since(base).as_millis() as u64
    }

    /// Now, as the last input gave it, in the wheel's milliseconds.
    fn millis_now(&self) -> u64 {
        self.last_input.get().map_or(0, |at| self.millis(at))
    }

    /// When conflation windows close next: the connection task sleeping
    /// on it calls [`Shard::handle_conflation_timers`] then.
    pub fn next_conflation_deadline(&self) -> Option<Instant> {
        let tick = self.state.borrow().wheel.next_tick()?;
        let base = *self.clock_base.get()?;
        Some(base + std::time::Duration::from_millis(tick * WHEEL_TICK_MS))
    }

    /// The task that sleeps until [`Shard::next_conflation_deadline`]:
    /// woken when an earlier one is scheduled.
    pub fn set_wheel_waker(&self, waker: &Waker) {
        *self.wheel_waker.borrow_mut() = Some(waker.clone());
    }

    /// Closes the conflation windows due at `now` and sends what they
    /// held.
    pub fn handle_conflation_timers(&self, now: Instant) {
        self.note_time(now);
        let now_ms = self.millis(now);
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        for (tick, (chan, group)) in st.wheel.take_due(now_ms) {
            let Some(channel) = st.local.get_mut(chan as usize) else {
                continue;
            };
            let Some(g) = channel.groups.get_mut(usize::from(group)) else {
                continue;
            };
            let Some((leaving, reopened)) = g.close(tick, now_ms) else {
                continue;
            };
            for (publication, replaced) in leaving {
                let delivered = self.deliver_to_group(g, &Rc::new(publication));
                self.metrics
                    .conflation_merged
                    .add(delivered * u64::from(replaced));
            }
            if let Some(next) = reopened {
                st.wheel.schedule(next, (chan, group));
            }
        }
    }

    /// A connection's task found only publications queued at `now`, short
    /// of a full frame, with `--write-delay` on: they wait until the delay
    /// has passed, so that one write carries what arrives until then.
    /// Publications pushed meanwhile do not wake it; anything else queued
    /// does, and goes at once with what is before it.
    pub fn hold_writes(&self, conn: &Rc<Conn>, now: Instant) {
        if !conn.hold_writes() {
            return;
        }
        let mut held = self.held.borrow_mut();
        // One delay for all: deadlines come in the order of the holds.
        held.push_back((now + self.config.limits.write_delay, conn.clone()));
        if held.len() == 1 {
            if let Some(waker) = self.flush_waker.borrow_mut().take() {
                waker.wake();
            }
        }
    }

    /// When the first held connection is due ([`Shard::flush_held_writes`]
    /// then); with none held, the flushing task waits with `waker` for the
    /// next.
    pub fn next_flush_deadline(&self, waker: &Waker) -> Option<Instant> {
        let deadline = self.held.borrow().front().map(|(at, _)| *at);
        if deadline.is_none() {
            *self.flush_waker.borrow_mut() = Some(waker.clone());
        }
        deadline
    }

    /// Releases every connection whose delay has passed at `now`: each
    /// writes what it has queued, and holds nothing back until it has
    /// written it all.
    pub fn flush_held_writes(&self, now: Instant) {
        loop {
            let due = {
                let mut held = self.held.borrow_mut();
                match held.front() {
                    Some((at, _)) if *at <= now => held.pop_front(),
                    _ => None,
                }
            };
            let Some((_, conn)) = due else { return };
            self.metrics.write_flushes.add(1);
            conn.release_writes();
        }
    }

    /// Pushes a publication leaving a conflation group to its members;
    /// returns to how many.
    fn deliver_to_group(&self, group: &Group, publication: &SharedPublication) -> u64 {
        let seq = publication.seq;
        let mut delivered = 0;
        for (_, member) in &group.members {
            if seq.is_none_or(|s| s > member.after) {
                self.push_to(&member.conn, publication);
                delivered += 1;
            }
        }
        self.metrics.deliveries.add(delivered);
        self.metrics.conflation_sent.add(delivered);
        delivered
    }

    /// Adds a connection, with its token when the relay requires one;
    /// returns its key.
    pub fn register(&self, format: Format, auth: Option<Authenticated>) -> (usize, Rc<Conn>) {
        let now = self.now.get();
        let conn = Rc::new(Conn::new(format, now));
        let auth = auth.map(|a| {
            Box::new(ConnAuth {
                sub: a.grant.sub,
                jti: a.grant.jti,
                caps: a.grant.caps,
                expires_at: tick_after(now, a.expires_in),
            })
        });
        let mut st = self.state.borrow_mut();
        let key = st.conns.insert(ConnEntry {
            conn: conn.clone(),
            subs: SmallVec::new(),
            auth,
        });
        self.metrics.connections.set(st.conns.len() as f64);
        (key, conn)
    }

    /// Removes a connection and its subscriptions.
    pub fn unregister(&self, key: usize) {
        let (entry, emptied) = {
            let mut st = self.state.borrow_mut();
            let entry = st.conns.remove(key);
            entry.conn.mark_gone();
            let mut emptied = Vec::new();
            for sub in &entry.subs {
                let chan = sub.chan as usize;
                match sub.state {
                    SubState::Pending(token) => st.pending_subs[token as usize].cancelled = true,
                    receiving => st.local[chan].leave(receiving),
                }
                emptied.push(chan);
            }
            self.node.forget_subscriptions(entry.subs.len());
            self.metrics.connections.set(st.conns.len() as f64);
            (entry, emptied)
        };
        drop(entry);
        for chan in emptied {
            self.forget_local_if_unused(chan);
        }
    }

    /// Handles one decoded request of connection `key`.
    pub fn handle_request(&self, key: usize, req: Request, now: Instant) {
        self.note_time(now);
        let conn = self.state.borrow().conns[key].conn.clone();
        let Request {
            id,
            channel,
            action,
        } = req;
        let (counter, limit, what) = match action {
            Action::Publish { .. } => (
                &conn.publishes_this_tick,
                self.config.limits.max_publish_rate,
                "publications",
            ),
            _ => (
                &conn.subscribes_this_tick,
                self.config.limits.max_subscribe_rate,
                "subscribes and unsubscribes",
            ),
        };
        if limit > 0 {
            let n = counter.get();
            if n >= limit {
                let message = format!("at most {limit} {what} per second per connection");
                return self.reply_error(
                    &conn,
                    RequestError {
                        id,
                        channel: Some(channel),
                        ..RequestError::new(ErrorCode::RateLimited, message)
                    },
                );
            }
            counter.set(n + 1);
        }
        match action {
            Action::Refresh { token } => self.refresh(key, &conn, &token, id),
            Action::Subscribe {
                since,
                epoch,
                snapshot,
                conflate_ms,
            } => {
                if !self.allows(key, &channel, Capability::Subscribe) {
                    return self.reply_error(
                        &conn,
                        RequestError {
                            id,
                            channel: Some(channel),
                            ..RequestError::new(
                                ErrorCode::Forbidden,
                                "this token may not subscribe to this channel",
                            )
                        },
                    );
                }
                let options = SubscribeOptions {
                    since: since.map(|s| (s, epoch)),
                    snapshot,
                    conflate_ms,
                };
                self.subscribe(key, &conn, channel, id, options, now)
            }
            Action::Unsubscribe => self.unsubscribe(key, &conn, &channel, id, None),
            Action::Publish { data, key: pub_key } => {
                if !self.allows(key, &channel, Capability::Publish) {
                    let message = if self.config.verifier.is_some() {
                        "this token may not publish to this channel"
                    } else {
                        "clients may not publish on this relay"
                    };
                    return self.reply_error(
                        &conn,
                        RequestError {
                            id,
                            channel: Some(channel),
                            ..RequestError::new(ErrorCode::Forbidden, message)
                        },
                    );
                }
                let channel: Arc<str> = channel.into();
                // When a publication can fail, the client must hear of it
                // even without an id.
                let can_fail = self.broker.borrow().publications_can_fail();
                let token = (id.is_some() || can_fail).then(|| {
                    let slot = self.answered_later(&channel).then(|| conn.reserve_reply());
                    self.state.borrow_mut().pending_pubs.insert(PendingPub::Ws {
                        conn: conn.clone(),
                        slot,
                        channel: channel.clone(),
                        id,
                    })
                });
                self.route_publish(channel, pub_key, data, token, now);
            }
        }
    }

    /// True while `conn` has used up a per-second request allowance: its
    /// input is then read no further until the next tick (which wakes
    /// it), so a flood costs the shard no parsing, only what TCP holds.
    pub fn over_request_rate(&self, conn: &Conn) -> bool {
        let over = |count: &Cell<u32>, limit: u32| limit > 0 && count.get() >= limit;
        over(
            &conn.publishes_this_tick,
            self.config.limits.max_publish_rate,
        ) || over(
            &conn.subscribes_this_tick,
            self.config.limits.max_subscribe_rate,
        ) || conn.pings_this_tick.get() >= outbox::PINGS_PER_SECOND
    }

    /// Publishes for an HTTP request; await the returned wait for the seq.
    pub fn publish_http(
        &self,
        channel: &str,
        key: Option<Arc<str>>,
        data: Data,
        now: Instant,
    ) -> Rc<PublishWait> {
        self.note_time(now);
        let wait = Rc::new(PublishWait::default());
        let token = self
            .state
            .borrow_mut()
            .pending_pubs
            .insert(PendingPub::Http(wait.clone()));
        self.route_publish(channel.into(), key, data, Some(token), now);
        wait
    }

    /// Queues a reply for `conn`, within its pending-bytes bound.
    fn reply(&self, conn: &Conn, payload: Vec<u8>) {
        let pushed = conn.push_reply(payload, self.config.limits.max_pending_bytes);
        self.count_slow(pushed);
    }

    /// True when requests on `channel` are answered after they are
    /// handled (by another shard, or through Redis), so their reply needs
    /// a slot in the connection's queue.
    fn answered_later(&self, channel: &str) -> bool {
        !self.broker.borrow().answers_in_place(channel)
    }

    /// Fills the place a deferred reply holds in `conn`'s queue.
    fn fill(&self, conn: &Conn, slot: Option<&ReplySlot>, items: Answer) {
        let pushed = conn.fill_reply(slot, items, self.config.limits.max_pending_bytes);
        self.count_slow(pushed);
    }

    fn count_slow(&self, pushed: Pushed) {
        if pushed == Pushed::Disconnected {
            self.metrics.slow_disconnect.increment(1);
        }
    }

    pub fn reply_error(&self, conn: &Conn, e: RequestError) {
        let payload = self.encode_error(conn.format, e);
        self.reply(conn, payload);
    }

    fn encode_error(&self, format: Format, e: RequestError) -> Vec<u8> {
        self.metrics.error(e.code);
        encode_event(
            format,
            &Event::Error {
                code: e.code,
                message: &e.message,
                id: e.id.as_ref(),
                channel: e.channel.as_deref(),
            },
        )
    }

    fn route_publish(
        &self,
        channel: Arc<str>,
        key: Option<Arc<str>>,
        data: Data,
        token: Option<usize>,
        now: Instant,
    ) {
        let token = token.map(|t| t as u32);
        self.with_broker(|broker, fx| broker.publish(channel, key, data, token, now, fx));
    }

    /// Runs one step of the broker and carries out what it asks for.
    fn with_broker(&self, step: impl FnOnce(&mut dyn Broker, &mut Vec<Effect>)) {
        // A step carried out below may run another (an ack to this shard
        // that ends a subscription): that one finds the scratch taken and
        // allocates its own.
        let mut fx = std::mem::take(&mut *self.effects.borrow_mut());
        step(&mut **self.broker.borrow_mut(), &mut fx);
        for effect in fx.drain(..) {
            self.carry_out(effect);
        }
        *self.effects.borrow_mut() = fx;
    }

    fn carry_out(&self, effect: Effect) {
        match effect {
            Effect::Deliver { publication, to } => {
                self.metrics.publications.increment(1);
                self.fan_out(publication, to);
            }
            Effect::Ack {
                waiter,
                seq,
                epoch,
                replay,
            } => self.send_subscribe_ack(waiter.from, waiter.token, seq, epoch, replay),
            Effect::Published { to, token, seq } => {
                if to == self.id {
                    self.finish_publish(token, seq);
                } else {
                    self.mesh.send(to, ShardMsg::PublishAck { token, seq });
                }
            }
            Effect::Forward { to, event } => self.mesh.send(to, ShardMsg::Broker(event)),
        }
    }

    fn subscribe(
        &self,
        key: usize,
        conn: &Rc<Conn>,
        channel: String,
        id: Option<Id>,
        options: SubscribeOptions,
        now: Instant,
    ) {
        let SubscribeOptions {
            since,
            snapshot,
            conflate_ms,
        } = options;
        let refuse = |code, message: String, channel: String| RequestError {
            id: id.clone(),
            channel: Some(channel),
            ..RequestError::new(code, message)
        };
        if !self.broker.borrow().ready() {
            let message = "the backplane is down; retry".to_string();
            return self.reply_error(conn, refuse(ErrorCode::Unavailable, message, channel));
        }
        let accepted = self.add_pending_subscription(
            key,
            conn,
            &channel,
            id.clone(),
            since.is_some(),
            conflate_ms,
        );
        let (name, token) = match accepted {
            Ok(accepted) => accepted,
            Err((code, message)) => return self.reply_error(conn, refuse(code, message, channel)),
        };
        let owner = owner_of(&name, self.mesh.shards());
        if owner == self.id {
            self.owner_subscribe(&name, self.id, token as u32, since, snapshot, now);
        } else {
            self.mesh.send(
                owner,
                ShardMsg::Subscribe {
                    channel: name,
                    from: self.id,
                    token: token as u32,
                    since,
                    snapshot,
                },
            );
        }
    }

    /// Records a subscription waiting for its owner's ack; returns the
    /// channel's shared name and the ack token, or why it is refused.
    fn add_pending_subscription(
        &self,
        key: usize,
        conn: &Rc<Conn>,
        channel: &str,
        id: Option<Id>,
        since_given: bool,
        conflate_ms: Option<u32>,
    ) -> Result<(Arc<str>, usize), (ErrorCode, String)> {
        let mut guard = self.state.borrow_mut();
        let st = &mut *guard;
        let known = st.local_index.get(channel).copied();
        let existing = known.and_then(|c| {
            st.conns[key]
                .subs
                .iter()
                .find(|sub| sub.chan as usize == c)
                .map(|sub| sub.state)
        });
        let replaces = match existing {
            Some(SubState::Pending(_)) => {
                let msg = "a subscribe to this channel is still being answered";
                return Err((ErrorCode::BadRequest, msg.into()));
            }
            // New options for a subscription that keeps receiving until
            // they are answered: still one subscription.
            Some(_) => true,
            None => false,
        };
        if !replaces {
            if st.conns[key].subs.len() >= self.config.limits.max_subscriptions {
                let msg = format!(
                    "a connection may hold at most {} subscriptions",
                    self.config.limits.max_subscriptions
                );
                return Err((ErrorCode::TooLarge, msg));
            }
            if !self
                .node
                .take_subscription(self.config.limits.max_subscriptions_total)
            {
                let msg = format!(
                    "this node holds its most subscriptions ({}); retry later or on another node",
                    self.config.limits.max_subscriptions_total
                );
                return Err((ErrorCode::Unavailable, msg));
            }
        }
        let chan = match known {
            Some(c) => c,
            None => {
                let name: Arc<str> = channel.into();
                let c = st.local.insert(LocalChannel {
                    name: name.clone(),
                    subscribers: Slab::new(),
                    groups: Slab::new(),
                    pending: 0,
                });
                st.local_index.insert(name, c);
                c
            }
        };
        let token = st.pending_subs.insert(PendingSub {
            conn_key: key,
            conn: conn.clone(),
            slot: self.answered_later(channel).then(|| conn.reserve_reply()),
            chan,
            id,
            since_given,
            conflate_ms,
            replaces,
            cancelled: false,
        });
        st.local[chan].pending += 1;
        if replaces {
            return Ok((st.local[chan].name.clone(), token));
        }
        st.conns[key].subs.push(Sub {
            chan: chan as u32,
            state: SubState::Pending(token as u32),
        });
        Ok((st.local[chan].name.clone(), token))
    }

    /// Whether connection `key` may do `what` on `channel`: its token's
    /// caps decide; without tokens anyone may subscribe, and publish when
    /// --allow-client-publish is on.
    fn allows(&self, key: usize, channel: &str, what: Capability) -> bool {
        match &self.state.borrow().conns[key].auth {
            Some(auth) => auth.caps.allows(channel, what),
            None => what == Capability::Subscribe || self.config.access.allow_client_publish,
        }
    }

    /// A `refresh`: a new token for the same `sub`, whose caps apply from
    /// now on; subscriptions they no longer allow end.
    fn refresh(&self, key: usize, conn: &Rc<Conn>, token: &str, id: Option<Id>) {
        let refuse = |code, message: String| RequestError {
            id: id.clone(),
            ..RequestError::new(code, message)
        };
        let Some(verifier) = &self.config.verifier else {
            let message = "this relay does not use tokens".to_string();
            return self.reply_error(conn, refuse(ErrorCode::BadRequest, message));
        };
        let unix = self.unix.get();
        let grant = match verifier.verify(token, unix) {
            Ok(grant)
                if self.node.revocations.is_revoked(
                    grant.sub.as_deref(),
                    grant.jti.as_deref(),
                    unix,
                ) =>
            {
                let message = crate::auth::AuthError::Revoked.to_string();
                return self.reply_error(conn, refuse(ErrorCode::Unauthorized, message));
            }
            Ok(grant) => grant,
            Err(e) => {
                return self.reply_error(conn, refuse(ErrorCode::Unauthorized, e.to_string()))
            }
        };
        let ended: Vec<Arc<str>> = {
            let mut guard = self.state.borrow_mut();
            let st = &mut *guard;
            let entry = &mut st.conns[key];
            let Some(auth) = entry.auth.as_mut() else {
                drop(guard);
                let message = "this connection has no token to refresh".to_string();
                return self.reply_error(conn, refuse(ErrorCode::BadRequest, message));
            };
            if auth.sub != grant.sub {
                drop(guard);
                let message = "a refresh must keep the token's sub".to_string();
                return self.reply_error(conn, refuse(ErrorCode::Unauthorized, message));
            }
            auth.caps = grant.caps;
            auth.jti = grant.jti;
            auth.expires_at = tick_after(self.now.get(), grant.exp.saturating_sub(unix));
            let caps = &auth.caps;
            entry
                .subs
                .iter()
                .map(|sub| st.local[sub.chan as usize].name.clone())
                .filter(|name| !caps.allows(name, Capability::Subscribe))
                .collect()
        };
        self.reply(
            conn,
            encode_event(
                conn.format,
                &Event::Refreshed {
                    id: id.as_ref(),
                    exp: grant.exp,
                },
            ),
        );
        for channel in ended {
            self.unsubscribe(key, conn, &channel, None, Some("forbidden"));
        }
    }

    /// Ends `conn`'s subscription to `channel` (if any) and answers
    /// `unsubscribed`, with `reason` when the server ended it.
    fn unsubscribe(
        &self,
        key: usize,
        conn: &Rc<Conn>,
        channel: &str,
        id: Option<Id>,
        reason: Option<&str>,
    ) {
        let emptied = {
            let mut st = self.state.borrow_mut();
            let st = &mut *st;
            let found = st.local_index.get(channel).copied().and_then(|chan| {
                let subs = &mut st.conns[key].subs;
                subs.iter()
                    .position(|sub| sub.chan as usize == chan)
                    .map(|i| subs.swap_remove(i))
            });
            if found.is_some() {
                self.node.forget_subscriptions(1);
            }
            match found {
                Some(Sub {
                    chan,
                    state: SubState::Pending(token),
                }) => {
                    st.pending_subs[token as usize].cancelled = true;
                    Some(chan as usize)
                }
                Some(Sub { chan, state }) => {
                    st.local[chan as usize].leave(state);
                    Some(chan as usize)
                }
                None => None,
            }
        };
        self.reply(
            conn,
            encode_event(
                conn.format,
                &Event::Unsubscribed {
                    channel,
                    id: id.as_ref(),
                    reason,
                },
            ),
        );
        if let Some(chan) = emptied {
            self.forget_local_if_unused(chan);
        }
    }

    /// Drops a local channel nobody here wants any more and tells its owner.
    fn forget_local_if_unused(&self, chan: usize) {
        let name = {
            let mut st = self.state.borrow_mut();
            let Some(c) = st.local.get(chan) else { return };
            if !c.unused() {
                return;
            }
            let c = st.local.remove(chan);
            st.local_index.remove(&c.name);
            c.name
        };
        let owner = owner_of(&name, self.mesh.shards());
        if owner == self.id {
            self.owner_unsubscribe(&name, self.id);
        } else {
            self.mesh.send(
                owner,
                ShardMsg::Unsubscribe {
                    channel: name,
                    from: self.id,
                },
            );
        }
    }

    /// Handles one message from another shard (or the signal handler).
    pub fn handle_msg(&self, msg: ShardMsg, now: Instant) {
        self.note_time(now);
        match msg {
            ShardMsg::PublishAck { token, seq } => self.finish_publish(token, seq),
            ShardMsg::Deliver(p) => self.deliver_local(p),
            ShardMsg::Subscribe {
                channel,
                from,
                token,
                since,
                snapshot,
            } => self.owner_subscribe(&channel, from, token, since, snapshot, now),
            ShardMsg::SubscribeAck {
                token,
                seq,
                epoch,
                replay,
            } => self.on_subscribe_ack(token, seq, epoch, replay),
            ShardMsg::Unsubscribe { channel, from } => self.owner_unsubscribe(&channel, from),
            ShardMsg::Broker(event) => {
                self.with_broker(|broker, fx| broker.handle_event(event, now, fx))
            }
            ShardMsg::Drain => {}
        }
    }

    /// Sends a publication to every shard in `shards` (this one last).
    fn fan_out(&self, publication: Arc<Publication>, shards: ShardSet) {
        for shard in shards_in(shards) {
            if shard != self.id {
                self.mesh
                    .send(shard, ShardMsg::Deliver(publication.clone()));
            }
        }
        if shards & (1 << self.id) != 0 {
            self.deliver_local(publication);
        }
    }

    /// The publication waiting for `token`, if it still waits.
    fn take_pending_pub(&self, token: u32) -> Option<PendingPub> {
        self.state
            .borrow_mut()
            .pending_pubs
            .try_remove(token as usize)
    }

    /// Answers a publication waiting for `token`: its seq, or `None` when
    /// the backplane could not sequence it (`unavailable`, even without an
    /// id, so the client hears of it).
    fn finish_publish(&self, token: u32, seq: Option<u64>) {
        match self.take_pending_pub(token) {
            Some(PendingPub::Ws {
                conn,
                slot,
                channel,
                id,
            }) => {
                let reply = match seq {
                    Some(seq) => id.map(|id| {
                        encode_event(
                            conn.format,
                            &Event::Published {
                                channel: &channel,
                                seq,
                                id: &id,
                            },
                        )
                    }),
                    None => Some(self.encode_error(
                        conn.format,
                        RequestError {
                            id,
                            channel: Some(channel.to_string()),
                            ..RequestError::new(
                                ErrorCode::Unavailable,
                                "the backplane is down; retry",
                            )
                        },
                    )),
                };
                let answer = reply
                    .map(|bytes| Out::Reply(bytes.into_boxed_slice()))
                    .into_iter()
                    .collect();
                self.fill(&conn, slot.as_deref(), answer);
            }
            Some(PendingPub::Http(wait)) => wait.complete(seq),
            None => {}
        }
    }

    /// Owner side of a subscribe: the broker notes the shard's interest
    /// and answers with the current seq and the replay for `since`.
    fn owner_subscribe(
        &self,
        channel: &Arc<str>,
        from: usize,
        token: u32,
        since: Option<Since>,
        snapshot: bool,
        now: Instant,
    ) {
        let waiter = Waiter {
            from,
            token,
            since,
            snapshot,
        };
        self.with_broker(|broker, fx| broker.subscribe(channel, waiter, now, fx));
    }

    fn send_subscribe_ack(&self, to: usize, token: u32, seq: u64, epoch: Arc<str>, replay: Replay) {
        if to == self.id {
            self.on_subscribe_ack(token, seq, epoch, replay);
        } else {
            self.mesh.send(
                to,
                ShardMsg::SubscribeAck {
                    token,
                    seq,
                    epoch,
                    replay,
                },
            );
        }
    }

    fn owner_unsubscribe(&self, channel: &Arc<str>, from: usize) {
        self.with_broker(|broker, fx| broker.unsubscribe(channel, from, fx));
    }

    /// The owner's answer to a subscribe: the replay (if `since` was
    /// given and history holds it) and `subscribed` go in the request's
    /// place in the queue, and the subscription starts receiving (with the
    /// options asked for, which replace those of a subscription already
    /// receiving), unless it was cancelled meanwhile (it is then answered
    /// all the same, since the unsubscribe that cancelled it is answered
    /// after it).
    fn on_subscribe_ack(&self, token: u32, seq: u64, epoch: Arc<str>, replay: Replay) {
        let (p, name, activated, held) = {
            let mut st = self.state.borrow_mut();
            let st = &mut *st;
            let Some(p) = st.pending_subs.try_remove(token as usize) else {
                return;
            };
            let local = &mut st.local[p.chan];
            local.pending -= 1;
            let mut activated = false;
            let mut held = Vec::new();
            if !p.cancelled && !p.conn.is_gone() {
                let sub = st.conns[p.conn_key]
                    .subs
                    .iter_mut()
                    .find(|sub| sub.chan as usize == p.chan);
                // A replacement finds the subscription receiving (unless it
                // was unsubscribed since); a first subscribe, its own
                // pending state.
                let mine = sub.filter(|sub| match sub.state {
                    SubState::Pending(t) => !p.replaces && t == token,
                    _ => p.replaces,
                });
                if let Some(sub) = mine {
                    // What its conflation window still held for it leaves
                    // with the answer rather than never.
                    if let SubState::Conflated { group, slot } = sub.state {
                        let g = &local.groups[usize::from(group)];
                        held = g.held_after(g.members[slot as usize].after);
                    }
                    local.leave(sub.state);
                    sub.state = local.join(p.conn.clone(), p.conflate_ms, seq);
                    activated = true;
                }
            }
            let name = local.name.clone();
            (p, name, activated, held)
        };
        // A replacement: what the old way queued behind the answer's place
        // (up to the answer's seq) and what its window held go in the
        // answer, merged with the replay or snapshot by seq, so that
        // nothing up to `subscribed` comes after it, and nothing twice.
        let earlier: Vec<SharedPublication> = match (&p.slot, p.replaces && activated) {
            (Some(slot), true) => p.conn.take_queued_after(slot, &name, seq),
            _ => Vec::new(),
        };
        let mut items = Answer::new();
        let recovered = match replay {
            Replay::NotAsked => None,
            Replay::NotRecovered => Some(false),
            Replay::Recovered(publications) => {
                items.extend(
                    publications
                        .into_iter()
                        .map(|publication| Out::Replayed(Rc::new(publication))),
                );
                Some(true)
            }
            Replay::Snapshot(values) => {
                items.extend(
                    values
                        .into_iter()
                        .map(|publication| Out::Replayed(Rc::new(publication))),
                );
                p.since_given.then_some(false)
            }
        };
        debug_assert!(p.since_given == recovered.is_some());
        if !earlier.is_empty() || !held.is_empty() {
            let mut merged: Vec<(u64, Out)> = items
                .drain(..)
                .chain(earlier.into_iter().map(Out::Message))
                .chain(held.into_iter().map(|h| Out::Message(Rc::new(h))))
                .filter_map(|item| match &item {
                    Out::Message(m) | Out::Replayed(m) => m.seq.map(|s| (s, item)),
                    _ => None,
                })
                .collect();
            merged.sort_by_key(|(s, _)| *s);
            merged.dedup_by_key(|(s, _)| *s);
            items.extend(merged.into_iter().map(|(_, item)| item));
        }
        let subscribed = encode_event(
            p.conn.format,
            &Event::Subscribed {
                channel: &name,
                seq,
                // Behind Redis a channel has no epoch before its first publication.
                epoch: (!epoch.is_empty()).then_some(&*epoch),
                id: p.id.as_ref(),
                recovered,
            },
        );
        items.push(Out::Reply(subscribed.into_boxed_slice()));
        self.fill(&p.conn, p.slot.as_deref(), items);
        if !activated {
            self.forget_local_if_unused(p.chan);
        }
    }

    /// Fans a publication out to this shard's subscribers of its channel,
    /// and offers it to the channel's conflation groups.
    fn deliver_local(&self, publication: Arc<Publication>) {
        let mut st = self.state.borrow_mut();
        let st = &mut *st;
        let Some(&chan) = st.local_index.get(&publication.channel) else {
            return;
        };
        let shared = Rc::new(publication);
        let local = &mut st.local[chan];
        self.metrics.deliveries.add(local.subscribers.len() as u64);
        for (_, conn) in &local.subscribers {
            self.push_to(conn, &shared);
        }
        if local.groups.is_empty() {
            return;
        }
        let now_ms = self.millis_now();
        for (key, group) in local.groups.iter_mut() {
            let Some((leaving, reopened)) = group.offer(&shared, now_ms) else {
                continue;
            };
            for (publication, replaced) in leaving {
                let publication = if Arc::ptr_eq(&publication, &shared) {
                    shared.clone()
                } else {
                    Rc::new(publication)
                };
                let delivered = self.deliver_to_group(group, &publication);
                self.metrics
                    .conflation_merged
                    .add(delivered * u64::from(replaced));
            }
            let Some(tick) = reopened else { continue };
            if st.wheel.schedule(tick, (chan as u32, key as u16)) {
                if let Some(waker) = self.wheel_waker.borrow_mut().take() {
                    waker.wake();
                }
            }
        }
    }

    fn push_to(&self, conn: &Conn, publication: &SharedPublication) {
        match conn.push_message(
            publication,
            self.config.limits.max_pending_bytes,
            self.config.limits.slow_consumer,
            self.config.limits.slow_consumer_fallback,
            self.config.limits.held_bytes(),
        ) {
            Pushed::Queued | Pushed::Closed => {}
            Pushed::DroppedOldest(n) => self.metrics.slow_drop_oldest.increment(n as u64),
            Pushed::Merged { merged, dropped } => {
                self.metrics.slow_conflate.increment(merged as u64);
                self.metrics.slow_drop_oldest.increment(dropped as u64);
            }
            Pushed::Disconnected => {
                conn.closing_since.set(Some(self.now.get()));
                self.metrics.slow_disconnect.increment(1);
            }
        }
    }

    /// Once a second: heartbeats, token expiry, close deadlines, history
    /// expiry, metrics. `now` is in whole seconds of the shard's clock
    /// (heartbeats, token expiry), `at` the same moment for history ages,
    /// `unix` the same in Unix seconds (for tokens a `refresh` brings).
    pub fn tick_at(&self, now: u32, at: Instant, unix: u64) {
        self.note_time(at);
        self.now.set(now);
        self.unix.set(unix);
        let revocations = &self.node.revocations;
        let generation = revocations.generation();
        let newly_revoked = generation != self.revocations_seen.replace(generation);
        let ping_interval = self.config.heartbeat.ping_interval.as_secs() as u32;
        let pong_timeout = self.config.heartbeat.pong_timeout.as_secs() as u32;
        {
            let st = self.state.borrow();
            for (_, entry) in &st.conns {
                let conn = &entry.conn;
                if let Some(auth) = &entry.auth {
                    if now >= auth.expires_at {
                        conn.request_close(CloseRequest {
                            code: crate::protocol::close::TOKEN_EXPIRED,
                            reason: "token expired",
                            flush: true,
                        });
                    } else if newly_revoked
                        && revocations.is_revoked(auth.sub.as_deref(), auth.jti.as_deref(), unix)
                    {
                        conn.request_close(CloseRequest {
                            code: crate::protocol::close::REVOKED,
                            reason: "access revoked",
                            flush: true,
                        });
                    }
                }
                let paused = self.over_request_rate(conn);
                conn.publishes_this_tick.set(0);
                conn.subscribes_this_tick.set(0);
                conn.pings_this_tick.set(0);
                conn.frames_this_tick.set(0);
                conn.bytes_this_tick.set(0);
                if paused {
                    conn.wake();
                }
                if let Ok(mut out) = conn.out.try_borrow_mut() {
                    if out.bytes > 0 {
                        self.metrics.pending_bytes.record(out.bytes as f64);
                    }
                    out.release_if_empty();
                }
                if conn.close.get().is_some() && conn.closing_since.get().is_none() {
                    conn.closing_since.set(Some(now));
                }
                if let Some(since) = conn.closing_since.get() {
                    if now.saturating_sub(since) > pong_timeout {
                        conn.request_abort();
                    }
                } else if let Some(sent) = conn.ping_sent.get() {
                    // Input held back for answers this node owes is not
                    // read, pongs included: that silence is not the client's.
                    let owed = conn.replies_awaited() >= MAX_REPLIES_AWAITED;
                    if owed {
                        conn.ping_sent.set(Some(now));
                    } else if now.saturating_sub(sent) > pong_timeout {
                        self.metrics.heartbeat_timeouts.increment(1);
                        conn.request_abort();
                    }
                } else if now.saturating_sub(conn.last_read.get()) >= ping_interval {
                    conn.request_ping(now);
                }
            }
        }
        self.state.borrow_mut().give_back_memory();
        self.with_broker(|broker, fx| broker.tick(at, fx));
        let held = self.broker.borrow_mut().holdings();
        self.metrics.history_messages.set(held.messages as f64);
        self.metrics.history_bytes.set(held.bytes as f64);
        self.metrics.channels_owned.set(held.channels as f64);
        self.metrics.history_evicted.increment(held.evicted as u64);
        self.metrics.latest_values.set(held.latest as f64);
        self.metrics
            .latest_keys_forgotten
            .increment(held.keys_forgotten as u64);
        self.metrics.flush();
    }

    /// Revokes `what` until `until` (Unix seconds) on this node, and on
    /// every node behind the backplane; matching connections are closed
    /// with 4003 at each shard's next tick.
    pub fn revoke(&self, what: crate::auth::Revoked, until: u64) {
        self.node.revocations.revoke(what.clone(), until);
        self.broker.borrow_mut().propagate_revocation(&what, until);
    }

    /// The connections of this shard now (for draining).
    pub fn connections(&self) -> Vec<Rc<Conn>> {
        self.state
            .borrow()
            .conns
            .iter()
            .map(|(_, e)| e.conn.clone())
            .collect()
    }
}
