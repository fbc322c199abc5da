//! What every shard of one relay process shares: a handful of atomics
//! (draining, backplane readiness, counts of connections, sockets and
//! subscriptions), the per-address counts, and the admission of accepted
//! sockets against `--max-connections`, and the directory of nodes. It sits
//! below the hub and the backplanes, which both read it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::addresses::{AddressKey, AddressLimits, Addresses};

/// State shared by every shard of the node (atomics, and the per-address
/// table touched only at accept and close).
pub struct NodeState {
    pub draining: AtomicBool,
    /// The backplane can sequence and deliver (always, when embedded).
    backplane_ready: AtomicBool,
    /// Open WebSocket connections (after their handshake).
    pub connections: AtomicUsize,
    /// Accepted client sockets of any kind, before or after a handshake,
    /// bounded by `--max-connections`.
    sockets: AtomicUsize,
    /// Sockets accepted past `--max-connections` only to be told so.
    overflow: AtomicUsize,
    /// Subscriptions held (or waiting for their ack) on every shard.
    subscriptions: AtomicUsize,
    /// Random per process: epochs of an in-process backplane cannot outlive it.
    pub epoch_nonce: u32,
    /// Open and new connections per client address.
    pub addresses: Addresses,
    /// Whole seconds are counted from here for the per-address rate.
    pub started: std::time::Instant,
    /// Tokens revoked on any node.
    pub revocations: crate::auth::Revocations,
    /// The nodes clients may be sent to, this one included if it
    /// advertises itself.
    pub directory: crate::directory::Directory,
}

/// A client socket counted against `--max-connections` (or against the
/// overflow allowance) for as long as it is held, or until it is handed
/// to the WebSocket connection the socket becomes, which gives the count
/// back when it ends ([`NodeState::release_socket`]): a long-lived
/// connection carries no guard of its own.
pub struct Admission {
    node: Option<Arc<NodeState>>,
    overflow: bool,
    /// The client's address, counted in `NodeState::addresses` while the
    /// socket is open.
    address: AddressKey,
    /// The peer is a trusted proxy: the client's address is still to be
    /// read (PROXY header or `X-Forwarded-For`).
    from_proxy: bool,
}

impl Admission {
    /// The socket became a WebSocket connection, which releases it (and
    /// the client's address, returned) when it ends.
    pub fn hand_to_connection(mut self) -> AddressKey {
        debug_assert!(!self.overflow, "a full node upgrades nothing");
        self.node = None;
        self.address
    }

    /// Counts the client's address with this socket.
    pub fn hold_address(&mut self, address: AddressKey) {
        self.address = address;
    }

    /// The peer is a trusted proxy, which will name the client.
    pub fn mark_from_proxy(&mut self) {
        self.from_proxy = true;
    }

    pub fn from_proxy(&self) -> bool {
        self.from_proxy
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(node) = &self.node {
            let count = if self.overflow {
                &node.overflow
            } else {
                &node.sockets
            };
            count.fetch_sub(1, Ordering::Relaxed);
            node.addresses.close(self.address);
        }
    }
}

/// How an accepted socket is admitted.
pub enum Admit {
    /// Within `--max-connections`: served.
    Served(Admission),
    /// The node is full: the socket is answered 503 (or `/healthz`) and closed.
    Full(Admission),
    /// Full, and so many are being told so already that the socket is
    /// closed at once.
    Dropped,
}

impl NodeState {
    /// A node with no per-address limits.
    pub fn new() -> Self {
        Self::with_address_limits(AddressLimits::default())
    }

    pub fn with_address_limits(limits: AddressLimits) -> Self {
        NodeState {
            draining: AtomicBool::new(false),
            backplane_ready: AtomicBool::new(true),
            connections: AtomicUsize::new(0),
            sockets: AtomicUsize::new(0),
            overflow: AtomicUsize::new(0),
            subscriptions: AtomicUsize::new(0),
            epoch_nonce: fastrand::u32(..),
            addresses: Addresses::new(limits),
            started: std::time::Instant::now(),
            revocations: crate::auth::Revocations::default(),
            directory: crate::directory::Directory::new(None),
        }
    }

    /// The node announces itself in the directory under `url`.
    pub fn advertising(mut self, url: Option<String>) -> Self {
        self.directory = crate::directory::Directory::new(url);
        self
    }

    /// This node's entry in the directory, as of now.
    pub fn own_entry(&self, max_connections: usize) -> Option<crate::directory::Entry> {
        self.directory.own_entry(
            self.connections.load(Ordering::Relaxed),
            max_connections,
            self.is_draining(),
        )
    }

    /// Counts an accepted socket against `max` (and the overflow
    /// allowance past it).
    pub fn admit(self: &Arc<Self>, max: usize, overflow_max: usize) -> Admit {
        let take = |count: &AtomicUsize, limit: usize| {
            count
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < limit).then_some(n + 1)
                })
                .is_ok()
        };
        let admission = |overflow| Admission {
            node: Some(self.clone()),
            overflow,
            address: AddressKey::default(),
            from_proxy: false,
        };
        if take(&self.sockets, max) {
            Admit::Served(admission(false))
        } else if take(&self.overflow, overflow_max) {
            Admit::Full(admission(true))
        } else {
            Admit::Dropped
        }
    }

    /// Counts one more subscription, unless `max` are held.
    pub fn take_subscription(&self, max: usize) -> bool {
        self.subscriptions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    pub fn forget_subscriptions(&self, n: usize) {
        self.subscriptions.fetch_sub(n, Ordering::Relaxed);
    }

    /// Gives back the count of a socket whose [`Admission`] was handed to
    /// its WebSocket connection, and of its address, as that connection
    /// ends.
    pub fn release_socket(&self, address: AddressKey) {
        self.sockets.fetch_sub(1, Ordering::Relaxed);
        self.addresses.close(address);
    }

    /// The overflow allowance only: for a socket refused by its address's
    /// limits, answered and closed like one past `--max-connections`.
    pub fn admit_overflow(self: &Arc<Self>, overflow_max: usize) -> Option<Admission> {
        self.overflow
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < overflow_max).then_some(n + 1)
            })
            .ok()
            .map(|_| Admission {
                node: Some(self.clone()),
                overflow: true,
                address: AddressKey::default(),
                from_proxy: false,
            })
    }

    /// Client sockets open now (overflow excluded).
    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn backplane_ready(&self) -> bool {
        self.backplane_ready.load(Ordering::Relaxed)
    }

    /// Sets readiness; true when it changed.
    pub fn set_backplane_ready(&self, ready: bool) -> bool {
        self.backplane_ready.swap(ready, Ordering::Relaxed) != ready
    }
}

impl Default for NodeState {
    fn default() -> Self {
        Self::new()
    }
}
