//! The workloads every contender runs: what the load generator is asked to
//! do, and whether the contender runs as one server or as two nodes
//! sharing a Redis.

/// How many server processes a workload needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One server process (the backplane it needs, if any, beside it).
    Single,
    /// Two server processes sharing one Redis; subscribers are spread over
    /// both, publishers use the first.
    TwoNodes,
}

pub struct Workload {
    pub name: &'static str,
    /// One line for the report: what it measures.
    pub what: &'static str,
    pub topology: Topology,
    /// Arguments to `loadgen` after the common ones.
    pub args: &'static [&'static str],
}

/// Every workload, in report order.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "broadcast-1k-100b",
        what: "1 channel, 1,000 subscribers, 100-byte messages, publishers as fast as acks allow",
        topology: Topology::Single,
        args: &["fanout", "--connections", "1000", "--duration", "5", "--payload", "100"],
    },
    Workload {
        name: "broadcast-10k-100b",
        what: "1 channel, 10,000 subscribers, 100-byte messages, saturation",
        topology: Topology::Single,
        args: &["fanout", "--connections", "10000", "--duration", "5", "--payload", "100"],
    },
    Workload {
        name: "broadcast-1k-1kib",
        what: "1 channel, 1,000 subscribers, 1 KiB messages, saturation",
        topology: Topology::Single,
        args: &["fanout", "--connections", "1000", "--duration", "5", "--payload", "1024"],
    },
    Workload {
        name: "broadcast-10k-1kib",
        what: "1 channel, 10,000 subscribers, 1 KiB messages, saturation",
        topology: Topology::Single,
        args: &["fanout", "--connections", "10000", "--duration", "5", "--payload", "1024"],
    },
    Workload {
        name: "latency-10k-5pps",
        what: "1 channel, 10,000 subscribers, 5 publications/s (50,000 deliveries/s, a rate every contender sustains): end-to-end latency",
        topology: Topology::Single,
        args: &[
            "fanout", "--connections", "10000", "--duration", "10", "--payload", "100", "--rate", "5",
        ],
    },
    Workload {
        name: "many-channels",
        what: "1,000 channels, 10,000 connections each subscribed to 10 of them, saturation",
        topology: Topology::Single,
        args: &[
            "fanout", "--connections", "10000", "--channels", "1000", "--subs-per-conn", "10",
            "--duration", "5", "--payload", "100",
        ],
    },
    Workload {
        name: "idle-15k",
        what: "15,000 idle subscribed connections: server memory per connection",
        topology: Topology::Single,
        args: &["idle", "--connections", "15000", "--channels", "100", "--hold", "5"],
    },
    Workload {
        name: "connect-10k",
        what: "10,000 connections set up (TCP, WebSocket handshake, one subscribe) with 200 in flight: setups per second",
        topology: Topology::Single,
        args: &["connect", "--connections", "10000", "--channels", "100", "--concurrency", "200"],
    },
    Workload {
        name: "reconnect-storm-10k",
        what: "10,000 subscribed connections vanish at once and all reconnect and resubscribe at once: how long until all are back",
        topology: Topology::Single,
        args: &["connect", "--connections", "10000", "--channels", "100", "--storm"],
    },
    Workload {
        name: "slow-consumers",
        what: "1 channel, 1,000 subscribers of which 1% never read, 20 publications/s of 4 KiB for 10 s: the others' latency and the server's memory",
        topology: Topology::Single,
        args: &[
            "fanout", "--connections", "1000", "--duration", "10", "--payload", "4096", "--rate", "20",
            "--slow-percent", "1",
        ],
    },
    Workload {
        name: "cross-node-10k",
        what: "2 server processes + 1 Redis, 10,000 subscribers split over both, publisher on the first, saturation",
        topology: Topology::TwoNodes,
        args: &["fanout", "--connections", "10000", "--duration", "5", "--payload", "100"],
    },
];
