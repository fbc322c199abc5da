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
//! The driver is never borrowed while a connection runs, so a wake always
//! finds it.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use slab::Slab;

use super::connection::ConnTask;

/// Connections polled per turn of the driving task before it lets the
/// shard's other tasks (accepts, handshakes, the inbox) run.
const POLL_BUDGET: usize = 256;

/// This thread's connections; `None` until its driver runs.
struct Driver {
    /// A record is `None` while its connection is being polled.
    tasks: Slab<Option<ConnTask>>,
    /// Slots woken and not polled since.
    ready: Vec<u32>,
    /// The driving task's own waker.
    waker: Option<Waker>,
}

thread_local! {
    static DRIVER: RefCell<Option<Driver>> = const { RefCell::new(None) };
}

/// Runs this thread's connections until the worker's runtime ends.
/// Spawned once per worker, before the first connection is adopted; the
/// connections drop with this task.
pub async fn run() {
    DRIVER.with(|d| {
        *d.borrow_mut() = Some(Driver {
            tasks: Slab::new(),
            ready: Vec::new(),
            waker: None,
        })
    });
    let _clear = ClearOnDrop;
    let mut batch = Vec::new();
    std::future::poll_fn(|cx| {
        poll_ready(cx, &mut batch);
        Poll::<()>::Pending
    })
    .await;
}

/// Hands a connection whose 101 is sent to this thread's driver. Without
/// one (a thread that runs no worker), it runs as a task of its own.
pub fn adopt(task: ConnTask) {
    let orphan = DRIVER.with(|d| match d.borrow_mut().as_mut() {
        Some(driver) => {
            let slot = driver.tasks.insert(Some(task));
            driver.ready.push(slot as u32);
            if let Some(w) = &driver.waker {
                w.wake_by_ref();
            }
            None
        }
        None => Some(task),
    });
    if let Some(task) = orphan {
        drop(monoio::spawn(task));
    }
}

/// Polls the connections woken since the last turn, at most
/// [`POLL_BUDGET`] of them.
fn poll_ready(cx: &mut Context<'_>, batch: &mut Vec<u32>) {
    with_driver(|driver| {
        if !driver
            .waker
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            driver.waker = Some(cx.waker().clone());
        }
        let take = driver.ready.len().min(POLL_BUDGET);
        batch.extend(driver.ready.drain(..take));
    });
    for slot in batch.drain(..) {
        // The record is taken out while it is polled: its poll wakes
        // others and calls into the hub, and a finished connection's drop
        // unregisters it; none of that may find the driver borrowed.
        let taken = with_driver(|driver| driver.tasks.get_mut(slot as usize)?.take()).flatten();
        // `None`: woken after it finished, or woken twice in one turn.
        let Some(mut task) = taken else { continue };
        let waker = slot_waker(slot);
        let mut slot_cx = Context::from_waker(&waker);
        if Pin::new(&mut task).poll(&mut slot_cx).is_ready() {
            with_driver(|driver| driver.tasks.remove(slot as usize));
            drop(task);
        } else {
            with_driver(|driver| driver.tasks[slot as usize] = Some(task));
        }
    }
    let more = with_driver(|driver| !driver.ready.is_empty()).unwrap_or(false);
    if more {
        cx.waker().wake_by_ref();
    }
}

/// Runs `f` on this thread's driver, if it runs one.
fn with_driver<R>(f: impl FnOnce(&mut Driver) -> R) -> Option<R> {
    DRIVER.with(|d| d.borrow_mut().as_mut().map(f))
}

/// Empties this thread's driver when its task is dropped, so the
/// connections drop inside the runtime that owns their sockets.
struct ClearOnDrop;

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        let driver = DRIVER.with(|d| d.borrow_mut().take());
        drop(driver);
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
    // No driver here: its runtime is ending and dropping connections, or
    // the waker went to a thread that drives none (nothing sends one
    // there). Either way there is nothing left to poll.
    let _ = DRIVER.try_with(|d| {
        if let Ok(mut d) = d.try_borrow_mut() {
            if let Some(driver) = d.as_mut() {
                driver.ready.push(slot as u32);
                if let Some(w) = &driver.waker {
                    w.wake_by_ref();
                }
            }
        }
    });
}
