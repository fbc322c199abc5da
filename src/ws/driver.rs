//! The shard's WebSocket connections, driven by one task: a slab of
//! connection records and the list of those woken since the last turn.
//!
//! A monoio task per connection costs its header, its trailer and
//! jemalloc's rounding of the whole up to a size class: 112 bytes for a
//! 72-byte connection, on every idle connection. Here a connection is its
//! record in a slab, and its waker is its slot number: waking it pushes the
//! number onto the shard's ready list and wakes the one driving task, which
//! polls exactly the connections named there. Wakers never allocate.
//!
//! Everything here stays on the shard's thread: the readiness wakers live in
//! monoio's driver and the outbox wakers in the hub, both on this thread.
//! The driver is never borrowed while a connection runs or drops, so a
//! wake always finds it (a debug assertion says so).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use slab::Slab;

use super::connection::ConnTask;

/// Connections polled per turn of the driving task before it lets the
/// shard's other tasks (accepts, handshakes, the inbox) run.
const POLL_BUDGET: usize = 256;

/// This thread's connections, owned by the driving task.
struct Driver {
    /// A record is `None` while its connection is being polled.
    tasks: Slab<Option<ConnTask>>,
    /// Slots woken and not polled since.
    ready: Vec<u32>,
    /// The driving task's own waker.
    waker: Option<Waker>,
}

thread_local! {
    /// The running driver, for wakers and [`adopt`]; it does not own it, so
    /// no connection drops in a thread-local destructor, outside the
    /// runtime that owns its socket ([`shutdown`] drops them inside it).
    static DRIVER: RefCell<Weak<RefCell<Driver>>> = const { RefCell::new(Weak::new()) };
}

/// Runs this thread's connections until the worker stops ([`shutdown`]).
/// Spawned once per worker, before the first connection is adopted.
pub async fn run() {
    let driver = Rc::new(RefCell::new(Driver {
        tasks: Slab::new(),
        ready: Vec::new(),
        waker: None,
    }));
    DRIVER.with(|d| *d.borrow_mut() = Rc::downgrade(&driver));
    let mut batch = Vec::new();
    std::future::poll_fn(|cx| {
        poll_ready(&driver, cx, &mut batch);
        Poll::<()>::Pending
    })
    .await;
}

/// Hands a connection whose 101 is sent to this thread's driver. Without
/// one (a thread that runs no worker), it runs as a task of its own.
pub fn adopt(task: ConnTask) {
    let Some(driver) = current() else {
        drop(monoio::spawn(task));
        return;
    };
    let mut driver = driver.borrow_mut();
    let slot = driver.tasks.insert(Some(task));
    driver.ready.push(slot as u32);
    if let Some(w) = &driver.waker {
        w.wake_by_ref();
    }
}

/// Ends this thread's connections as its worker stops: drops every record
/// while the runtime that owns their sockets still runs, and lets the
/// driving task go (it holds its own waker, so nothing else would free it).
pub fn shutdown() {
    let Some(driver) = current() else { return };
    DRIVER.with(|d| *d.borrow_mut() = Weak::new());
    let (tasks, waker) = {
        let mut d = driver.borrow_mut();
        d.ready.clear();
        (std::mem::take(&mut d.tasks), d.waker.take())
    };
    drop(tasks);
    drop(waker);
}

/// This thread's running driver.
fn current() -> Option<Rc<RefCell<Driver>>> {
    DRIVER.try_with(|d| d.borrow().upgrade()).ok().flatten()
}

/// Polls the connections woken since the last turn, at most
/// [`POLL_BUDGET`] of them.
fn poll_ready(driver: &RefCell<Driver>, cx: &mut Context<'_>, batch: &mut Vec<u32>) {
    {
        let mut d = driver.borrow_mut();
        if !d.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            d.waker = Some(cx.waker().clone());
        }
        let take = d.ready.len().min(POLL_BUDGET);
        batch.extend(d.ready.drain(..take));
    }
    for slot in batch.drain(..) {
        // The record is taken out while it is polled: its poll wakes
        // others and calls into the hub, and a finished connection's drop
        // unregisters it; none of that may find the driver borrowed.
        let taken = driver
            .borrow_mut()
            .tasks
            .get_mut(slot as usize)
            .and_then(Option::take);
        // `None`: its connection finished since it was woken. (A slot
        // woken twice in one turn is polled twice, as a task would be.)
        let Some(mut task) = taken else { continue };
        let waker = slot_waker(slot);
        let mut slot_cx = Context::from_waker(&waker);
        if Pin::new(&mut task).poll(&mut slot_cx).is_ready() {
            driver.borrow_mut().tasks.remove(slot as usize);
            drop(task);
        } else {
            driver.borrow_mut().tasks[slot as usize] = Some(task);
        }
    }
    if !driver.borrow().ready.is_empty() {
        cx.waker().wake_by_ref();
    }
}

fn slot_waker(slot: u32) -> Waker {
    // SAFETY: the vtable's functions treat the data as a slot number and
    // never dereference it.
    unsafe { Waker::from_raw(raw_waker(slot as usize)) }
}

fn raw_waker(slot: usize) -> RawWaker {
    RawWaker::new(slot as *const (), &VTABLE)
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(
    |data| raw_waker(data as usize),
    |data| wake_slot(data as usize),
    |data| wake_slot(data as usize),
    |_| {},
);

fn wake_slot(slot: usize) {
    // No driver: its task is ending and dropping its connections, or the
    // waker went to a thread that drives none (nothing sends one there).
    // Either way there is nothing left to poll.
    let Some(driver) = current() else { return };
    let Ok(mut driver) = driver.try_borrow_mut() else {
        debug_assert!(
            false,
            "a connection was woken while its driver was borrowed"
        );
        return;
    };
    driver.ready.push(slot as u32);
    if let Some(w) = &driver.waker {
        w.wake_by_ref();
    }
}
