//! The hub without sockets: several shards on an in-memory mesh, driven by
//! hand, on either backplane: the embedded broker, or the Redis broker in
//! front of a stand-in for Redis (`backplane::redis::fake`). Requests go in
//! through `Shard::handle_request`, messages between shards (and to and
//! from the stand-in) are delivered by `Cluster::settle` until none is left,
//! and what each client would receive is read from its outbox. Time is
//! whatever the test passes. Nothing here waits on a clock.
//!
//! Every test of the contract runs on both backplanes (the `embedded` and
//! `redis` modules at the end); the Redis faults only behind Redis.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{Conn, Shard};
use crate::backplane::embedded::EmbeddedBroker;
use crate::backplane::redis::fake::FakeRedis;
use crate::backplane::redis::RedisBroker;
use crate::backplane::{owner_of, Broker, Mesh, ShardMsg};
use crate::config::Config;
use crate::node::NodeState;
use crate::protocol::{decode_requests, Format};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backplane {
    Embedded,
    Redis,
}

struct Cluster {
    shards: Vec<Shard>,
    inboxes: Vec<flume::Receiver<ShardMsg>>,
    /// Behind Redis: the stand-in the shards' brokers talk to.
    redis: Option<RefCell<FakeRedis>>,
    /// The time every input is handed with (see [`Cluster::advance`]).
    now: Cell<Instant>,
    /// Whole seconds since the start, as ticks give them.
    seconds: Cell<u32>,
}

/// The Unix time the clusters' clocks start at.
const UNIX_START: u64 = 1_800_000_000;

/// A client of one shard: its key there and its outbox.
struct Client {
    shard: usize,
    key: usize,
    conn: Rc<Conn>,
}

impl Cluster {
    /// `n` shards of one node on `backplane`, configured with `args`
    /// (flags as on the command line). Clients may publish unless `args`
    /// say otherwise: most tests publish from a client.
    fn new(backplane: Backplane, n: usize, args: &[&str]) -> Cluster {
        let mut argv: Vec<std::ffi::OsString> =
            vec!["ringcast".into(), "--allow-client-publish=true".into()];
        argv.extend(args.iter().map(Into::into));
        let config = Arc::new(Config::load_from(argv).expect("a valid configuration"));
        let node = Arc::new(NodeState::new());
        let (mesh, inboxes) = Mesh::new(n);
        let now = Instant::now();
        let (redis, handle) = match backplane {
            Backplane::Embedded => (None, None),
            Backplane::Redis => {
                let history = &config.history;
                let (fake, handle) = FakeRedis::new(
                    Arc::new(mesh.clone()),
                    node.clone(),
                    history.size,
                    history.ttl,
                    now,
                );
                (Some(RefCell::new(fake)), Some(handle))
            }
        };
        let shards = (0..n)
            .map(|id| {
                let broker: Box<dyn Broker> = match &handle {
                    None => Box::new(EmbeddedBroker::new(
                        id,
                        n,
                        node.epoch_nonce,
                        &config.history,
                    )),
                    Some(handle) => Box::new(RedisBroker::new(
                        id,
                        n,
                        handle.clone(),
                        node.clone(),
                        &config.history,
                    )),
                };
                Shard::new(id, config.clone(), node.clone(), mesh.clone(), broker)
            })
            .collect();
        let cluster = Cluster {
            shards,
            inboxes,
            redis,
            now: Cell::new(now),
            seconds: Cell::new(0),
        };
        // As the runtime's ticker does when a worker starts.
        for shard in &cluster.shards {
            shard.tick_at(0, now, cluster.unix());
        }
        cluster
    }

    /// The stand-in for Redis (behind Redis only).
    fn redis(&self) -> std::cell::RefMut<'_, FakeRedis> {
        self.redis
            .as_ref()
            .expect("a cluster behind Redis")
            .borrow_mut()
    }

    fn connect(&self, shard: usize) -> Client {
        let (key, conn) = self.shards[shard].register(Format::Json, None);
        Client { shard, key, conn }
    }

    /// Unix seconds now, on the cluster's clock.
    fn unix(&self) -> u64 {
        UNIX_START + u64::from(self.seconds.get())
    }

    /// A client whose handshake carried `token`, verified as the HTTP
    /// layer does.
    fn connect_with_token(&self, shard: usize, token: &str) -> Client {
        let s = &self.shards[shard];
        let verifier = s.config.verifier.as_ref().expect("a relay with tokens");
        let grant = verifier.verify(token, self.unix()).expect("a valid token");
        let expires_in = grant.exp - self.unix();
        let auth = super::Authenticated { grant, expires_in };
        let (key, conn) = s.register(Format::Json, Some(auth));
        Client { shard, key, conn }
    }

    /// Handles one frame of `client` (a request or an array of them).
    fn send(&self, client: &Client, frame: Value) {
        let shard = &self.shards[client.shard];
        let bytes = frame.to_string().into_bytes();
        // As the connection's task does: a request that cannot be read is
        // answered in its place.
        for request in decode_requests(Format::Json, &bytes, 1000).expect("a valid frame") {
            match request {
                Ok(request) => shard.handle_request(client.key, request, self.now.get()),
                Err(e) => shard.reply_error(&client.conn, e),
            }
        }
    }

    /// Publishes `data` to `channel` from `client`, without an id.
    fn publish(&self, client: &Client, channel: &str, data: Value) {
        self.send(
            client,
            json!({"action": "publish", "channel": channel, "data": data}),
        );
    }

    /// Delivers messages between shards (and to and from Redis) until
    /// nothing is left to move; returns how many there were.
    fn settle(&self) -> usize {
        let mut delivered = 0;
        loop {
            let mut moved = false;
            for (shard, inbox) in self.shards.iter().zip(&self.inboxes) {
                while let Ok(msg) = inbox.try_recv() {
                    shard.handle_msg(msg, self.now.get());
                    delivered += 1;
                    moved = true;
                }
            }
            if let Some(redis) = &self.redis {
                let handled = redis.borrow_mut().run();
                delivered += handled;
                moved |= handled > 0;
            }
            if !moved {
                return delivered;
            }
        }
    }

    /// Moves the clock every input is handed with `seconds` on (Redis's
    /// too).
    fn advance(&self, seconds: u64) {
        self.now.set(self.now.get() + Duration::from_secs(seconds));
        if let Some(redis) = &self.redis {
            redis.borrow_mut().now = self.now.get();
        }
    }

    /// Lets one second pass and ticks every shard, then settles.
    fn tick(&self) {
        self.advance(1);
        self.seconds.set(self.seconds.get() + 1);
        for shard in &self.shards {
            shard.tick_at(self.seconds.get(), self.now.get(), self.unix());
        }
        self.settle();
    }

    /// A channel name the owner of which is `shard`.
    fn channel_owned_by(&self, shard: usize, prefix: &str) -> String {
        (0..)
            .map(|i| format!("{prefix}.{i}"))
            .find(|name| owner_of(name, self.shards.len()) == shard)
            .expect("some name hashes to every shard")
    }
}

impl Client {
    /// Everything the client would read now, in order (a batch frame's
    /// events one by one), taken out of its outbox.
    fn events(&self) -> Vec<Value> {
        let mut out = self.conn.out.borrow_mut();
        let mut events = Vec::new();
        while out.open_front(usize::MAX) {
            let ready = out
                .items
                .iter()
                .take_while(|item| !matches!(item, super::Out::Awaiting(_)))
                .count();
            for item in out.items.iter().take(ready) {
                let text = item.bytes(Format::Json);
                events.push(serde_json::from_slice(text).expect("events are JSON"));
            }
            out.pop_written(ready, Format::Json);
        }
        events
    }

    fn messages(&self) -> Vec<u64> {
        self.events()
            .iter()
            .filter(|e| e["type"] == "message")
            .map(|e| e["seq"].as_u64().expect("a sequenced message"))
            .collect()
    }
}

fn concurrent_publishers_on_every_shard_share_one_gap_free_seq(backplane: Backplane) {
    let cluster = Cluster::new(backplane, 3, &["--max-publish-rate", "0"]);
    let channel = cluster.channel_owned_by(1, "prices");
    let subscribers: Vec<Client> = (0..3).map(|s| cluster.connect(s)).collect();
    for s in &subscribers {
        cluster.send(s, json!({"action": "subscribe", "channel": channel}));
    }
    cluster.settle();
    for s in &subscribers {
        let events = s.events();
        assert_eq!(events[0]["type"], "subscribed", "{events:?}");
    }
    let publishers: Vec<Client> = (0..3).map(|s| cluster.connect(s)).collect();
    // Interleaved: each round, every shard publishes before any message moves.
    for round in 0..20 {
        for (p, publisher) in publishers.iter().enumerate() {
            cluster.send(
                publisher,
                json!({"action": "publish", "channel": channel, "data": [p, round], "id": round}),
            );
        }
        if round % 3 == 0 {
            cluster.settle();
        }
    }
    cluster.settle();
    let expected: Vec<u64> = (1..=60).collect();
    for s in &subscribers {
        assert_eq!(s.messages(), expected, "shard {}", s.shard);
    }
    let mut acked: Vec<u64> = publishers
        .iter()
        .flat_map(|p| p.events())
        .filter(|e| e["type"] == "published")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    acked.sort_unstable();
    assert_eq!(acked, expected, "every publication acked with its own seq");
}

fn since_recovers_exactly_at_every_boundary_of_history(backplane: Backplane) {
    let cluster = Cluster::new(
        backplane,
        2,
        &["--history-size", "5", "--max-publish-rate", "0"],
    );
    let channel = cluster.channel_owned_by(1, "feed");
    let publisher = cluster.connect(0);
    for i in 1..=12 {
        cluster.publish(&publisher, &channel, json!(i));
    }
    cluster.settle();
    // Seqs 8..=12 are kept.
    let probe = cluster.connect(0);
    cluster.send(&probe, json!({"action": "subscribe", "channel": channel}));
    cluster.settle();
    let epoch = probe.events()[0]["epoch"].clone();
    let cases: [(u64, Option<Value>, Option<Vec<u64>>); 6] = [
        (12, None, Some(vec![])),
        (11, Some(epoch.clone()), Some(vec![12])),
        (7, Some(epoch.clone()), Some((8..=12).collect())),
        (6, Some(epoch.clone()), None),
        (13, None, None),
        (11, Some(json!("another-epoch")), None),
    ];
    let mut late_ones = Vec::new();
    for (since, epoch, replay) in cases {
        let late = cluster.connect(0);
        let mut request = json!({"action": "subscribe", "channel": channel, "since": since});
        if let Some(epoch) = epoch {
            request["epoch"] = epoch;
        }
        cluster.send(&late, request);
        cluster.settle();
        let events = late.events();
        let (replayed, ack) = events.split_at(events.len() - 1);
        let seqs: Vec<u64> = replayed
            .iter()
            .map(|e| e["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(ack[0]["type"], "subscribed");
        assert_eq!(ack[0]["seq"], 12);
        match replay {
            Some(want) => {
                assert_eq!(seqs, want, "since {since}");
                assert_eq!(ack[0]["recovered"], true, "since {since}");
            }
            None => {
                assert!(seqs.is_empty(), "since {since}: {seqs:?}");
                assert_eq!(ack[0]["recovered"], false, "since {since}");
            }
        }
        late_ones.push(late);
    }
    // Then live, with no gap and no duplicate, for every one of them.
    cluster.publish(&publisher, &channel, json!(0));
    cluster.settle();
    for late in &late_ones {
        assert_eq!(late.messages(), [13]);
    }
}

fn answers_to_an_array_across_shards_keep_the_requests_order(backplane: Backplane) {
    let cluster = Cluster::new(backplane, 3, &[]);
    let client = cluster.connect(0);
    let far = cluster.channel_owned_by(2, "far");
    let near = cluster.channel_owned_by(0, "near");
    cluster.send(
        &client,
        json!([
            {"action": "subscribe", "channel": far, "id": 1},
            {"action": "unsubscribe", "channel": far, "id": 2},
            {"action": "subscribe", "channel": near, "id": 3},
            {"action": "publish", "channel": far, "data": 1, "id": 4},
            {"action": "subscribe", "channel": "bad channel!", "id": 5},
        ]),
    );
    // Before the other shards answer, only what precedes the first
    // answer still owed may be read: nothing.
    assert!(client.events().is_empty());
    cluster.settle();
    let ids: Vec<i64> = client
        .events()
        .iter()
        .map(|e| e["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, [1, 2, 3, 4, 5]);
}

fn slow_consumers_are_disconnected_or_lose_their_oldest_and_readers_are_not(backplane: Backplane) {
    for (policy, disconnected) in [("disconnect", true), ("drop-oldest", false)] {
        let cluster = Cluster::new(
            backplane,
            1,
            &[
                "--max-message-bytes",
                "1024",
                "--max-pending-bytes",
                "8192",
                "--slow-consumer",
                policy,
                "--max-publish-rate",
                "0",
            ],
        );
        let publisher = cluster.connect(0);
        let slow = cluster.connect(0);
        let reader = cluster.connect(0);
        for c in [&slow, &reader] {
            cluster.send(c, json!({"action": "subscribe", "channel": "t"}));
            cluster.settle();
            c.events();
        }
        let body = "x".repeat(900);
        let mut read = Vec::new();
        for _ in 0..40 {
            cluster.publish(&publisher, "t", json!(body));
            cluster.settle();
            read.extend(reader.messages());
        }
        assert_eq!(
            read,
            (1..=40).collect::<Vec<u64>>(),
            "{policy}: the reader got all"
        );
        let close = slow.conn.close.get();
        if disconnected {
            assert_eq!(close.map(|c| c.code), Some(4008), "{policy}");
            assert!(slow.events().is_empty(), "{policy}: nothing queued is kept");
        } else {
            assert!(close.is_none(), "{policy}");
            let kept = slow.messages();
            assert!(
                kept.len() < 40 && kept.last() == Some(&40),
                "{policy}: {kept:?}"
            );
            assert!(
                kept.windows(2).all(|w| w[1] == w[0] + 1),
                "{policy}: the newest are kept, in order: {kept:?}"
            );
        }
    }
}

fn a_silent_client_is_pinged_then_dropped_and_a_pong_keeps_it(backplane: Backplane) {
    let cluster = Cluster::new(
        backplane,
        1,
        &["--ping-interval", "30", "--pong-timeout", "10"],
    );
    let shard = &cluster.shards[0];
    let silent = cluster.connect(0);
    let answering = cluster.connect(0);
    let at = Instant::now();
    shard.tick_at(29, at, 0);
    assert!(!silent.conn.ping_due(), "not silent long enough yet");
    shard.tick_at(30, at, 0);
    assert!(silent.conn.ping_due() && answering.conn.ping_due());
    // The answering client's pong arrives (the connection task records it
    // as it reads a whole control frame).
    answering.conn.ping_sent.set(None);
    answering.conn.last_read.set(35);
    shard.tick_at(40, at, 0);
    assert!(!silent.conn.aborted(), "the deadline is not passed");
    shard.tick_at(41, at, 0);
    assert!(silent.conn.aborted(), "dropped past --pong-timeout");
    assert!(!answering.conn.aborted(), "a pong keeps a client");
}

fn history_older_than_its_ttl_is_not_replayed(backplane: Backplane) {
    let cluster = Cluster::new(
        backplane,
        2,
        &["--history-ttl", "60", "--max-publish-rate", "0"],
    );
    let channel = cluster.channel_owned_by(1, "ttl");
    let publisher = cluster.connect(0);
    for i in 1..=3 {
        cluster.publish(&publisher, &channel, json!(i));
    }
    // The owner takes them in now: a publication's age counts from there.
    cluster.settle();
    cluster.advance(30);
    cluster.publish(&publisher, &channel, json!(4));
    cluster.settle();
    // 59 s after the first three: all of history is still there.
    cluster.advance(29);
    let early = cluster.connect(0);
    cluster.send(
        &early,
        json!({"action": "subscribe", "channel": channel, "since": 0}),
    );
    cluster.settle();
    assert_eq!(early.messages(), [1, 2, 3, 4]);
    // 61 s: the first three are past the TTL, the fourth is kept.
    cluster.advance(2);
    let late = cluster.connect(0);
    cluster.send(
        &late,
        json!({"action": "subscribe", "channel": channel, "since": 0}),
    );
    cluster.send(&late, json!({"action": "unsubscribe", "channel": channel}));
    cluster.send(
        &late,
        json!({"action": "subscribe", "channel": channel, "since": 3}),
    );
    cluster.settle();
    let events = late.events();
    let recovered: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "subscribed")
        .map(|e| &e["recovered"])
        .collect();
    assert_eq!(recovered, [&json!(false), &json!(true)], "{events:?}");
    let replayed: Vec<u64> = events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(replayed, [4]);
}

/// A client of `shard` subscribed to `channel`, its answer read.
fn subscriber(cluster: &Cluster, shard: usize, channel: &str) -> Client {
    let client = cluster.connect(shard);
    cluster.send(&client, json!({"action": "subscribe", "channel": channel}));
    cluster.settle();
    let events = client.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "subscribed", "{events:?}");
    client
}

fn behind_redis(args: &[&str]) -> Cluster {
    let mut all = vec!["--max-publish-rate", "0"];
    all.extend_from_slice(args);
    Cluster::new(Backplane::Redis, 2, &all)
}

#[test]
fn behind_redis_a_lost_link_is_resynced_and_what_was_missed_arrives_in_order() {
    let cluster = behind_redis(&["--history-size", "100"]);
    let channel = cluster.channel_owned_by(1, "feed");
    let subscribers = [0, 1].map(|shard| subscriber(&cluster, shard, &channel));
    let publisher = cluster.connect(0);
    for i in 1..=3 {
        cluster.publish(&publisher, &channel, json!(i));
    }
    cluster.settle();
    for s in &subscribers {
        assert_eq!(s.messages(), [1, 2, 3]);
    }
    cluster.redis().lose_link();
    // What this node cannot do now it refuses, with a reason.
    cluster.send(
        &publisher,
        json!({"action": "publish", "channel": channel, "data": 0, "id": 9}),
    );
    let late = cluster.connect(0);
    cluster.send(
        &late,
        json!({"action": "subscribe", "channel": channel, "id": 10}),
    );
    cluster.settle();
    for (client, id) in [(&publisher, 9), (&late, 10)] {
        let events = client.events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["code"], "unavailable", "{events:?}");
        assert_eq!(events[0]["id"], id, "{events:?}");
    }
    // Other nodes go on publishing; none of it reaches this node.
    for i in 4..=6 {
        cluster
            .redis()
            .publish_from_elsewhere(&channel, None, &i.to_string());
    }
    cluster.settle();
    assert!(subscribers.iter().all(|s| s.messages().is_empty()));
    cluster.redis().restore_link();
    cluster.settle();
    for s in &subscribers {
        assert_eq!(s.messages(), [4, 5, 6], "caught up in order");
    }
    cluster.publish(&publisher, &channel, json!(7));
    cluster.settle();
    for s in &subscribers {
        assert_eq!(s.messages(), [7], "then live, with no duplicate");
    }
}

#[test]
fn behind_redis_what_an_outage_cost_beyond_history_shows_as_a_seq_jump() {
    let cluster = behind_redis(&["--history-size", "3"]);
    let channel = cluster.channel_owned_by(0, "feed");
    let watcher = subscriber(&cluster, 1, &channel);
    for i in 1..=2 {
        cluster
            .redis()
            .publish_from_elsewhere(&channel, None, &i.to_string());
    }
    cluster.settle();
    assert_eq!(watcher.messages(), [1, 2]);
    cluster.redis().lose_link();
    for i in 3..=10 {
        cluster
            .redis()
            .publish_from_elsewhere(&channel, None, &i.to_string());
    }
    cluster.redis().restore_link();
    cluster.settle();
    // 3..=7 are gone from Redis: the subscriber sees the jump by its seqs,
    // and a `since` from before it is not recovered.
    assert_eq!(watcher.messages(), [8, 9, 10]);
    let late = cluster.connect(1);
    cluster.send(
        &late,
        json!({"action": "subscribe", "channel": channel, "since": 2}),
    );
    cluster.settle();
    let events = late.events();
    assert_eq!(events.last().unwrap()["recovered"], false, "{events:?}");
    assert_eq!(events.last().unwrap()["seq"], 10, "{events:?}");
}

#[test]
fn behind_redis_a_failed_catch_up_is_retried_on_a_later_tick() {
    let cluster = behind_redis(&["--history-size", "100"]);
    let channel = cluster.channel_owned_by(1, "feed");
    let watcher = subscriber(&cluster, 0, &channel);
    cluster.redis().publish_from_elsewhere(&channel, None, "1");
    cluster.settle();
    assert_eq!(watcher.messages(), [1]);
    cluster.redis().lose_link();
    cluster.redis().publish_from_elsewhere(&channel, None, "2");
    cluster.redis().publish_from_elsewhere(&channel, None, "3");
    cluster.redis().fail_fetches = true;
    cluster.redis().restore_link();
    cluster.settle();
    cluster.redis().publish_from_elsewhere(&channel, None, "4");
    cluster.settle();
    assert!(
        watcher.messages().is_empty(),
        "nothing out of order while the catch-up fails"
    );
    cluster.tick();
    cluster.redis().fail_fetches = false;
    cluster.tick();
    assert_eq!(watcher.messages(), [2, 3, 4]);
}

/// Publishes `data` to `channel` from `client` under `key`.
fn publish_keyed(cluster: &Cluster, client: &Client, channel: &str, key: &str, data: Value) {
    cluster.send(
        client,
        json!({"action": "publish", "channel": channel, "key": key, "data": data}),
    );
}

/// A message's or a `subscribed`'s seq, with its key or `recovered`.
type SeqAnd = (u64, Value);

/// The (seq, key) of every message among `events`, and the seq of the
/// first `subscribed`, with its `recovered`.
fn keyed_messages(events: &[Value]) -> (Vec<SeqAnd>, Option<SeqAnd>) {
    let messages = events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| (e["seq"].as_u64().unwrap(), e["key"].clone()))
        .collect();
    let subscribed = events
        .iter()
        .find(|e| e["type"] == "subscribed")
        .map(|e| (e["seq"].as_u64().unwrap(), e["recovered"].clone()));
    (messages, subscribed)
}

fn a_snapshot_holds_the_latest_of_every_key_and_live_follows_without_gap(backplane: Backplane) {
    let cluster = Cluster::new(backplane, 3, &["--max-publish-rate", "0"]);
    let channel = cluster.channel_owned_by(1, "prices");
    let publisher = cluster.connect(0);
    if backplane == Backplane::Redis {
        // Before this node knows the channel: its latest values come from
        // Redis.
        cluster
            .redis()
            .publish_from_elsewhere(&channel, Some("z"), "0");
    }
    let offset = u64::from(backplane == Backplane::Redis);
    for (key, data) in [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)] {
        publish_keyed(&cluster, &publisher, &channel, key, json!(data));
    }
    cluster.publish(&publisher, &channel, json!(6));
    cluster.settle();
    let subscriber = cluster.connect(2);
    cluster.send(
        &subscriber,
        json!({"action": "subscribe", "channel": channel, "snapshot": true}),
    );
    cluster.settle();
    let (messages, subscribed) = keyed_messages(&subscriber.events());
    let s = |n: u64| n + offset;
    let mut expected = vec![
        (s(3), json!("a")),
        (s(4), json!("c")),
        (s(5), json!("b")),
        (s(6), Value::Null),
    ];
    if backplane == Backplane::Redis {
        expected.insert(0, (1, json!("z")));
    }
    assert_eq!(
        messages, expected,
        "the latest of every key, keyless ones as one, in seq order"
    );
    assert_eq!(subscribed, Some((s(6), Value::Null)));

    // Subscribes in flight while publications go on: each snapshot ends
    // at its `subscribed` seq and live messages continue it.
    let joiners: Vec<Client> = (0..3).map(|shard| cluster.connect(shard)).collect();
    for (i, joiner) in joiners.iter().enumerate() {
        cluster.send(
            joiner,
            json!({"action": "subscribe", "channel": channel, "snapshot": true}),
        );
        for k in 0..4 {
            let key = ["a", "b", "c", "d"][(i + k) % 4];
            publish_keyed(&cluster, &publisher, &channel, key, json!([i, k]));
        }
        if i == 1 {
            cluster.settle();
        }
    }
    cluster.settle();
    let last = s(6) + 12;
    for joiner in &joiners {
        let events = joiner.events();
        let at = events
            .iter()
            .position(|e| e["type"] == "subscribed")
            .unwrap();
        let (snapshot, subscribed) = keyed_messages(&events[..=at]);
        let (live, _) = keyed_messages(&events[at..]);
        let upto = subscribed.unwrap().0;
        assert!(snapshot.windows(2).all(|w| w[0].0 < w[1].0), "{events:?}");
        assert!(snapshot.iter().all(|(seq, _)| *seq <= upto), "{events:?}");
        assert_eq!(snapshot.last().map(|m| m.0), Some(upto), "{events:?}");
        let keys: std::collections::BTreeSet<String> =
            snapshot.iter().map(|(_, k)| k.to_string()).collect();
        assert_eq!(keys.len(), snapshot.len(), "one per key: {events:?}");
        let live: Vec<u64> = live.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(live, (upto + 1..=last).collect::<Vec<_>>(), "{events:?}");
    }
}

fn snapshot_with_since_replays_when_it_can_and_sends_the_snapshot_when_it_cannot(
    backplane: Backplane,
) {
    let cluster = Cluster::new(
        backplane,
        2,
        &["--history-size", "3", "--max-publish-rate", "0"],
    );
    let channel = cluster.channel_owned_by(1, "ticks");
    let publisher = cluster.connect(0);
    for i in 1..=10u64 {
        let key = format!("k{}", i % 5);
        publish_keyed(&cluster, &publisher, &channel, &key, json!(i));
    }
    cluster.settle();
    let recent = cluster.connect(0);
    cluster.send(
        &recent,
        json!({"action": "subscribe", "channel": channel, "since": 8, "snapshot": true}),
    );
    let behind = cluster.connect(1);
    cluster.send(
        &behind,
        json!({"action": "subscribe", "channel": channel, "since": 2, "snapshot": true}),
    );
    cluster.settle();
    let (messages, subscribed) = keyed_messages(&recent.events());
    let seqs: Vec<u64> = messages.iter().map(|m| m.0).collect();
    assert_eq!(seqs, [9, 10], "the replay, not a snapshot");
    assert_eq!(subscribed, Some((10, json!(true))));
    let (messages, subscribed) = keyed_messages(&behind.events());
    let seqs: Vec<u64> = messages.iter().map(|m| m.0).collect();
    assert_eq!(seqs, [6, 7, 8, 9, 10], "the snapshot of five keys instead");
    assert_eq!(subscribed, Some((10, json!(false))));
}

fn past_the_key_limit_the_least_recently_updated_key_is_forgotten(backplane: Backplane) {
    let cluster = Cluster::new(
        backplane,
        2,
        &["--max-keys-per-channel", "3", "--max-publish-rate", "0"],
    );
    if let Some(redis) = &cluster.redis {
        redis.borrow_mut().max_keys = 3;
    }
    let channel = cluster.channel_owned_by(1, "lru");
    let publisher = cluster.connect(0);
    for key in ["a", "b", "c", "d", "b", "e"] {
        publish_keyed(&cluster, &publisher, &channel, key, json!(key));
    }
    cluster.settle();
    for shard in 0..2 {
        let subscriber = cluster.connect(shard);
        cluster.send(
            &subscriber,
            json!({"action": "subscribe", "channel": channel, "snapshot": true}),
        );
        cluster.settle();
        let (messages, _) = keyed_messages(&subscriber.events());
        assert_eq!(
            messages,
            vec![(4, json!("d")), (5, json!("b")), (6, json!("e"))],
            "a and c were updated least recently"
        );
    }
}

fn latest_values_expire_with_history(backplane: Backplane) {
    let cluster = Cluster::new(
        backplane,
        2,
        &["--history-ttl", "60", "--max-publish-rate", "0"],
    );
    let channel = cluster.channel_owned_by(1, "aging");
    let publisher = cluster.connect(0);
    publish_keyed(&cluster, &publisher, &channel, "old", json!(1));
    cluster.settle();
    cluster.advance(40);
    publish_keyed(&cluster, &publisher, &channel, "new", json!(2));
    cluster.settle();
    cluster.advance(21);
    cluster.tick();
    let subscriber = cluster.connect(0);
    cluster.send(
        &subscriber,
        json!({"action": "subscribe", "channel": channel, "snapshot": true}),
    );
    cluster.settle();
    let (messages, subscribed) = keyed_messages(&subscriber.events());
    assert_eq!(messages, vec![(2, json!("new"))], "61 s old: gone");
    assert_eq!(subscribed, Some((2, Value::Null)));
}

impl Cluster {
    /// Moves the clock `ms` on and closes the conflation windows due on
    /// every shard, then settles.
    fn advance_ms(&self, ms: u64) {
        self.now.set(self.now.get() + Duration::from_millis(ms));
        if let Some(redis) = &self.redis {
            redis.borrow_mut().now = self.now.get();
        }
        for shard in &self.shards {
            shard.handle_conflation_timers(self.now.get());
        }
        self.settle();
    }
}

/// The (seq, key, conflated) of every message among `events`.
fn conflated_messages(events: &[Value]) -> Vec<(u64, String, u64)> {
    events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| {
            (
                e["seq"].as_u64().unwrap(),
                e["key"].as_str().unwrap_or("").to_string(),
                e["conflated"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

fn m(seq: u64, key: &str, conflated: u64) -> (u64, String, u64) {
    (seq, key.to_string(), conflated)
}

fn conflated_subscribers_get_the_first_at_once_and_the_latest_per_key_when_the_window_closes(
    backplane: Backplane,
) {
    let cluster = Cluster::new(backplane, 2, &["--max-publish-rate", "0"]);
    let channel = cluster.channel_owned_by(1, "fast");
    let publisher = cluster.connect(0);
    let plain = cluster.connect(0);
    let conflated: Vec<Client> = (0..2).map(|shard| cluster.connect(shard)).collect();
    cluster.send(&plain, json!({"action": "subscribe", "channel": channel}));
    for c in &conflated {
        cluster.send(
            c,
            json!({"action": "subscribe", "channel": channel, "conflate_ms": 100}),
        );
    }
    cluster.settle();
    for c in conflated.iter().chain([&plain]) {
        assert_eq!(c.events()[0]["type"], "subscribed");
    }
    // Publishes, lets it reach every shard, then lets `ms` pass.
    let at = |ms: u64, key: &str, seq: u64| {
        publish_keyed(&cluster, &publisher, &channel, key, json!(seq));
        cluster.settle();
        cluster.advance_ms(ms);
    };
    at(10, "a", 1);
    for c in &conflated {
        assert_eq!(conflated_messages(&c.events()), [m(1, "a", 0)], "at once");
    }
    at(10, "a", 2);
    at(10, "b", 3);
    at(10, "a", 4);
    at(30, "a", 5);
    for c in &conflated {
        assert!(c.events().is_empty(), "held until the window closes");
    }
    cluster.advance_ms(30);
    for c in &conflated {
        assert_eq!(
            conflated_messages(&c.events()),
            [m(3, "b", 0), m(5, "a", 2)],
            "100 ms after the first: the latest of each key, in seq order"
        );
    }
    assert_eq!(plain.messages(), [1, 2, 3, 4, 5], "others get everything");
    // The next window held nothing: quiet again, the next leaves at once.
    cluster.advance_ms(120);
    at(0, "c", 6);
    for c in &conflated {
        assert_eq!(conflated_messages(&c.events()), [m(6, "c", 0)]);
    }
}

fn a_subscriber_joining_a_group_gets_nothing_older_than_its_answer(backplane: Backplane) {
    let cluster = Cluster::new(backplane, 2, &["--max-publish-rate", "0"]);
    let channel = cluster.channel_owned_by(1, "join");
    let publisher = cluster.connect(0);
    let first = cluster.connect(0);
    cluster.send(
        &first,
        json!({"action": "subscribe", "channel": channel, "conflate_ms": 100}),
    );
    cluster.settle();
    publish_keyed(&cluster, &publisher, &channel, "a", json!(1));
    cluster.settle();
    cluster.advance_ms(10);
    publish_keyed(&cluster, &publisher, &channel, "a", json!(2));
    cluster.settle();
    let late = cluster.connect(0);
    cluster.send(
        &late,
        json!({"action": "subscribe", "channel": channel, "conflate_ms": 100, "snapshot": true}),
    );
    cluster.settle();
    let events = late.events();
    assert_eq!(conflated_messages(&events), [m(2, "a", 0)], "{events:?}");
    assert_eq!(events.last().unwrap()["seq"], 2);
    publish_keyed(&cluster, &publisher, &channel, "b", json!(3));
    cluster.settle();
    cluster.advance_ms(95);
    let first_events = conflated_messages(&first.events());
    assert_eq!(first_events, [m(1, "a", 0), m(2, "a", 0), m(3, "b", 0)]);
    assert_eq!(
        conflated_messages(&late.events()),
        [m(3, "b", 0)],
        "seq 2 came with its snapshot"
    );
}

fn subscribing_again_replaces_the_options_without_a_gap(backplane: Backplane) {
    let cluster = Cluster::new(backplane, 2, &["--max-publish-rate", "0"]);
    let channel = cluster.channel_owned_by(1, "switch");
    let publisher = cluster.connect(0);
    let client = cluster.connect(0);
    cluster.send(&client, json!({"action": "subscribe", "channel": channel}));
    cluster.settle();
    // Every message the client reads, and the seq of the last
    // `subscribed`: nothing after it may be at or below it.
    let mut seen: Vec<u64> = Vec::new();
    let mut answered = 0;
    let mut take = |events: Vec<Value>| {
        for e in &events {
            match e["type"].as_str() {
                Some("message") => {
                    let seq = e["seq"].as_u64().unwrap();
                    assert!(
                        seq > answered,
                        "{seq} after subscribed {answered}: {events:?}"
                    );
                    assert!(!seen.contains(&seq), "{seq} twice: {events:?}");
                    seen.push(seq);
                }
                Some("subscribed") => answered = e["seq"].as_u64().unwrap(),
                _ => {}
            }
        }
        events
    };
    take(client.events());
    publish_keyed(&cluster, &publisher, &channel, "a", json!(1));
    cluster.settle();
    // A publication on its way to the owner when the new options leave:
    // delivered the old way while they travel, so it must come before
    // their answer.
    publish_keyed(&cluster, &publisher, &channel, "a", json!(2));
    cluster.send(
        &client,
        json!({"action": "subscribe", "channel": channel, "conflate_ms": 1000, "id": 1}),
    );
    cluster.settle();
    let events = take(client.events());
    let subscribed = events.iter().find(|e| e["type"] == "subscribed").unwrap();
    assert_eq!(subscribed["id"], 1);
    // Conflated now: the first message after the answer leaves at once
    // (3, or 2 behind Redis, where 2 is sequenced after the answer), the
    // rest are held by the window.
    for i in 3..=5 {
        publish_keyed(&cluster, &publisher, &channel, "a", json!(i));
        cluster.settle();
    }
    take(client.events());
    // Back to every message before the window closes: what it held for
    // this subscriber comes with the answer.
    cluster.send(
        &client,
        json!({"action": "subscribe", "channel": channel, "id": 2}),
    );
    cluster.settle();
    take(client.events());
    publish_keyed(&cluster, &publisher, &channel, "a", json!(6));
    cluster.settle();
    cluster.advance_ms(1100);
    take(client.events());
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(seen.contains(&2), "{seen:?}");
    assert!(seen.contains(&5), "the held value arrives: {seen:?}");
    assert_eq!(seen.last(), Some(&6));
    // Still one subscription: one unsubscribe ends it.
    cluster.send(
        &client,
        json!({"action": "unsubscribe", "channel": channel}),
    );
    publish_keyed(&cluster, &publisher, &channel, "a", json!(7));
    cluster.settle();
    cluster.advance_ms(60);
    let events = client.events();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "unsubscribed");
}

fn a_slow_consumer_that_conflates_keeps_the_latest_of_each_key_within_its_bound(
    backplane: Backplane,
) {
    for (keys, fallback) in [(4, "disconnect"), (40, "disconnect"), (40, "drop-oldest")] {
        let cluster = Cluster::new(
            backplane,
            2,
            &[
                "--max-message-bytes",
                "1024",
                "--max-pending-bytes",
                "8192",
                "--slow-consumer",
                "conflate",
                "--slow-consumer-fallback",
                fallback,
                "--max-publish-rate",
                "0",
            ],
        );
        let channel = cluster.channel_owned_by(1, "dash");
        let publisher = cluster.connect(0);
        let slow = cluster.connect(0);
        cluster.send(&slow, json!({"action": "subscribe", "channel": channel}));
        cluster.settle();
        slow.events();
        let body = "x".repeat(400);
        for i in 0..400u64 {
            let key = format!("k{}", i % keys);
            publish_keyed(&cluster, &publisher, &channel, &key, json!([i, body]));
            cluster.settle();
            let pending = slow.conn.out.borrow().bytes;
            assert!(
                pending <= 8192,
                "{keys} keys, {fallback}: {pending} bytes pending"
            );
        }
        let close = slow.conn.close.get().map(|c| c.code);
        let kept = conflated_messages(&slow.events());
        let seqs: Vec<u64> = kept.iter().map(|m| m.0).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        match (keys, fallback) {
            (4, _) => {
                // Four keys fit: merged, never disconnected; what waits is
                // the latest of each key (and what came since the last
                // merge).
                assert_eq!(close, None);
                assert!(seqs.ends_with(&[397, 398, 399, 400]), "{kept:?}");
                assert!(seqs.len() < 20, "{kept:?}");
            }
            (_, "disconnect") => assert_eq!(close, Some(4008), "forty keys do not fit"),
            _ => {
                assert_eq!(close, None);
                assert_eq!(seqs.last(), Some(&400), "the newest are kept: {seqs:?}");
            }
        }
    }
}

fn a_client_asking_for_snapshot_after_snapshot_without_reading_is_bounded(backplane: Backplane) {
    let cluster = Cluster::new(backplane, 2, &["--max-publish-rate", "0"]);
    let channel = cluster.channel_owned_by(1, "big");
    let publisher = cluster.connect(0);
    for i in 0..1000 {
        publish_keyed(&cluster, &publisher, &channel, &format!("k{i}"), json!(i));
    }
    cluster.settle();
    let greedy = cluster.connect(0);
    let bound = cluster.shards[0].config.limits.max_pending_bytes;
    for _ in 0..100 {
        cluster.send(
            &greedy,
            json!({"action": "subscribe", "channel": channel, "snapshot": true}),
        );
        cluster.settle();
        let queued = greedy.conn.out.borrow().bytes;
        assert!(
            queued <= bound + 1000 * super::outbox::REPLAYED_ITEM_COST,
            "{queued} queued"
        );
    }
    assert_eq!(greedy.conn.close.get().map(|c| c.code), Some(4008));
}

/// Runs each named test on one backplane.
macro_rules! on_backplane {
    ($module:ident, $backplane:expr, $($test:ident),* $(,)?) => {
        mod $module {
            $(
                #[test]
                fn $test() {
                    super::$test($backplane);
                }
            )*
        }
    };
}

macro_rules! contract {
    ($($test:ident),* $(,)?) => {
        on_backplane!(embedded, super::Backplane::Embedded, $($test),*);
        on_backplane!(redis, super::Backplane::Redis, $($test),*);
    };
}

contract!(
    concurrent_publishers_on_every_shard_share_one_gap_free_seq,
    since_recovers_exactly_at_every_boundary_of_history,
    answers_to_an_array_across_shards_keep_the_requests_order,
    slow_consumers_are_disconnected_or_lose_their_oldest_and_readers_are_not,
    a_silent_client_is_pinged_then_dropped_and_a_pong_keeps_it,
    history_older_than_its_ttl_is_not_replayed,
    a_snapshot_holds_the_latest_of_every_key_and_live_follows_without_gap,
    snapshot_with_since_replays_when_it_can_and_sends_the_snapshot_when_it_cannot,
    past_the_key_limit_the_least_recently_updated_key_is_forgotten,
    latest_values_expire_with_history,
    conflated_subscribers_get_the_first_at_once_and_the_latest_per_key_when_the_window_closes,
    a_subscriber_joining_a_group_gets_nothing_older_than_its_answer,
    subscribing_again_replaces_the_options_without_a_gap,
    a_slow_consumer_that_conflates_keeps_the_latest_of_each_key_within_its_bound,
    a_client_asking_for_snapshot_after_snapshot_without_reading_is_bounded,
);

/// Tokens signed with the secret `TOKEN_SECRET`.
const TOKEN_SECRET: &str = "a secret of at least thirty-two bytes, for tests";

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(TOKEN_SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn with_tokens() -> Cluster {
    Cluster::new(
        Backplane::Embedded,
        2,
        &["--jwt-secret", TOKEN_SECRET, "--max-publish-rate", "0"],
    )
}

/// The error codes and types of a client's events, in order.
fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e["type"].as_str() {
            Some("error") => format!("error:{}", e["code"].as_str().unwrap()),
            Some(t) => t.to_string(),
            None => panic!("{e}"),
        })
        .collect()
}

#[test]
fn a_tokens_caps_decide_what_it_may_subscribe_to_and_publish() {
    let cluster = with_tokens();
    let exp = cluster.unix() + 600;
    let alice = cluster.connect_with_token(
        0,
        &token(json!({"sub": "alice", "exp": exp,
            "caps": {"prices.*": ["subscribe"], "chat.{sub}": ["*"]}})),
    );
    cluster.send(
        &alice,
        json!([
            {"action": "subscribe", "channel": "prices.AAPL", "id": 1},
            {"action": "subscribe", "channel": "news", "id": 2},
            {"action": "publish", "channel": "prices.AAPL", "data": 1, "id": 3},
            {"action": "publish", "channel": "chat.alice", "data": 1, "id": 4},
            {"action": "subscribe", "channel": "chat.bob", "id": 5},
        ]),
    );
    cluster.settle();
    let events = alice.events();
    assert_eq!(
        kinds(&events),
        [
            "subscribed",
            "error:forbidden",
            "error:forbidden",
            "published",
            "error:forbidden"
        ],
        "{events:?}"
    );
    assert_eq!(events[1]["channel"], "news");
    // Without caps: subscribe anywhere, publish nowhere.
    let plain = cluster.connect_with_token(1, &token(json!({"sub": "bob", "exp": exp})));
    cluster.send(
        &plain,
        json!([
            {"action": "subscribe", "channel": "anything", "id": 1},
            {"action": "publish", "channel": "anything", "data": 1, "id": 2},
        ]),
    );
    cluster.settle();
    assert_eq!(kinds(&plain.events()), ["subscribed", "error:forbidden"]);
}

#[test]
fn without_tokens_clients_publish_only_when_the_relay_allows_it() {
    for (args, allowed) in [
        (&["--allow-client-publish", "false"][..], false),
        (&["--allow-client-publish", "true"][..], true),
    ] {
        let cluster = Cluster::new(Backplane::Embedded, 1, args);
        let client = cluster.connect(0);
        cluster.send(
            &client,
            json!({"action": "publish", "channel": "c", "data": 1, "id": 1}),
        );
        cluster.settle();
        let want = if allowed {
            "published"
        } else {
            "error:forbidden"
        };
        assert_eq!(kinds(&client.events()), [want], "{args:?}");
    }
}

#[test]
fn a_refresh_applies_new_caps_and_ends_what_they_no_longer_allow() {
    let cluster = with_tokens();
    let exp = cluster.unix() + 30;
    let both = json!({"a.*": ["subscribe"], "b.*": ["subscribe"]});
    let client =
        cluster.connect_with_token(0, &token(json!({"sub": "carol", "exp": exp, "caps": both})));
    let (a, b) = (
        cluster.channel_owned_by(1, "a"),
        cluster.channel_owned_by(0, "b"),
    );
    for channel in [&a, &b] {
        cluster.send(&client, json!({"action": "subscribe", "channel": channel}));
    }
    cluster.settle();
    assert_eq!(kinds(&client.events()), ["subscribed", "subscribed"]);
    // Refused refreshes change nothing.
    let refusals = [
        token(json!({"sub": "mallory", "exp": exp + 600, "caps": both})),
        "not-a-token".to_string(),
        token(json!({"sub": "carol", "exp": cluster.unix()})),
    ];
    for (i, refused) in refusals.iter().enumerate() {
        cluster.send(
            &client,
            json!({"action": "refresh", "token": refused, "id": i}),
        );
    }
    cluster.settle();
    let events = client.events();
    assert_eq!(kinds(&events), ["error:unauthorized"; 3], "{events:?}");
    // A later exp and fewer caps.
    let later = exp + 600;
    let fewer = token(json!({"sub": "carol", "exp": later, "caps": {"a.*": ["subscribe"]}}));
    cluster.send(
        &client,
        json!({"action": "refresh", "token": fewer, "id": 9}),
    );
    cluster.settle();
    let events = client.events();
    assert_eq!(kinds(&events), ["refreshed", "unsubscribed"], "{events:?}");
    assert_eq!(events[0]["exp"], later);
    assert_eq!(events[0]["id"], 9);
    assert_eq!(events[1]["channel"], b.as_str());
    assert_eq!(events[1]["reason"], "forbidden");
    let publisher = cluster.connect(1);
    let shard = &cluster.shards[1];
    for channel in [&a, &b] {
        let data = crate::protocol::Data::from_json_slice(b"1").unwrap();
        shard.publish_http(channel, None, data, cluster.now.get());
    }
    cluster.settle();
    let got: Vec<Value> = client.events();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["channel"], a.as_str());
    drop(publisher);
    // Past the first token's exp, the refreshed connection stays open.
    for _ in 0..31 {
        cluster.tick();
    }
    assert!(client.conn.close.get().is_none());
}

#[test]
fn a_token_past_its_exp_closes_its_connection_with_4001() {
    let cluster = with_tokens();
    let client = cluster.connect_with_token(
        0,
        &token(json!({"sub": "dave", "exp": cluster.unix() + 10})),
    );
    for _ in 0..9 {
        cluster.tick();
    }
    assert!(client.conn.close.get().is_none(), "1 s before exp");
    cluster.tick();
    let close = client.conn.close.get().expect("closed at exp");
    assert_eq!(close.code, 4001);
}

#[test]
fn a_revoked_user_is_closed_with_4003_and_cannot_refresh() {
    let cluster = with_tokens();
    let exp = cluster.unix() + 600;
    let eve = cluster.connect_with_token(0, &token(json!({"sub": "eve", "exp": exp})));
    let bob = cluster.connect_with_token(1, &token(json!({"sub": "bob", "exp": exp, "jti": "b1"})));
    cluster.tick();
    assert!(eve.conn.close.get().is_none());
    cluster.shards[1].revoke(crate::auth::Revoked::Sub("eve".into()), cluster.unix() + 60);
    cluster.tick();
    assert_eq!(
        eve.conn.close.get().map(|c| c.code),
        Some(4003),
        "on every shard"
    );
    assert!(bob.conn.close.get().is_none());
    // By jti; and a refresh with a revoked token is refused.
    cluster.shards[0].revoke(crate::auth::Revoked::Jti("b2".into()), cluster.unix() + 60);
    let revoked = token(json!({"sub": "bob", "exp": exp, "jti": "b2"}));
    cluster.send(
        &bob,
        json!({"action": "refresh", "token": revoked, "id": 1}),
    );
    cluster.settle();
    let events = bob.events();
    assert_eq!(kinds(&events), ["error:unauthorized"], "{events:?}");
    assert!(events[0]["message"].as_str().unwrap().contains("revoked"));
    cluster.tick();
    assert!(
        bob.conn.close.get().is_none(),
        "bob's own token is not revoked"
    );
}

/// Counts the wakes of the connection task it stands for.
#[derive(Default)]
struct CountingWaker(std::sync::atomic::AtomicUsize);

impl std::task::Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl CountingWaker {
    fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// With `--write-delay`, as the connection task drives it: publications
/// queued while the writes are held do not wake the task, a reply or a
/// full frame does, and the connection is released, woken to write
/// everything in order, once its own delay has passed.
#[test]
fn held_writes_wait_for_their_delay_but_replies_and_full_frames_do_not() {
    let cluster = Cluster::new(Backplane::Embedded, 1, &["--write-delay", "5"]);
    let shard = &cluster.shards[0];
    let reader = subscriber(&cluster, 0, "feed");
    let other = subscriber(&cluster, 0, "feed");
    let publisher = cluster.connect(0);
    let task = Arc::new(CountingWaker::default());
    let waker = std::task::Waker::from(task.clone());
    let flusher = Arc::new(CountingWaker::default());
    let flusher_waker = std::task::Waker::from(flusher.clone());
    let frame_bytes = shard.config.limits.held_bytes();
    let t0 = cluster.now.get();
    let ms = Duration::from_millis;

    // Not held: the first publication wakes the task, which holds it.
    reader.conn.out.borrow_mut().set_waker(&waker);
    cluster.publish(&publisher, "feed", json!(1));
    cluster.settle();
    assert_eq!(task.count(), 1);
    assert!(reader.conn.out.borrow().may_hold(frame_bytes));
    assert_eq!(shard.next_flush_deadline(&flusher_waker), None);
    shard.hold_writes(&reader.conn, t0);
    shard.hold_writes(&reader.conn, t0 + ms(1));
    assert_eq!(
        flusher.count(),
        1,
        "the first held connection wakes the flusher"
    );
    assert!(reader.conn.writes_held());
    assert_eq!(
        shard.next_flush_deadline(&flusher_waker),
        Some(t0 + ms(5)),
        "held once"
    );
    other.events();
    shard.hold_writes(&other.conn, t0 + ms(3));
    assert_eq!(flusher.count(), 1, "a later deadline needs no wake");

    // Held: more publications wait without a wake.
    reader.conn.out.borrow_mut().set_waker(&waker);
    cluster.publish(&publisher, "feed", json!(2));
    cluster.publish(&publisher, "feed", json!(3));
    cluster.settle();
    assert_eq!(
        task.count(),
        1,
        "publications do not wake a held connection"
    );
    assert!(reader.conn.out.borrow().may_hold(frame_bytes));

    // A reply wakes it, and may not wait: it goes with what is before it.
    cluster.send(
        &reader,
        json!({"action": "subscribe", "channel": "other", "id": 7}),
    );
    cluster.settle();
    assert_eq!(task.count(), 2, "a reply wakes a held connection");
    assert!(!reader.conn.out.borrow().may_hold(frame_bytes));
    let events = reader.events();
    assert_eq!(
        kinds(&events),
        ["message", "message", "message", "subscribed"]
    );
    assert_eq!(
        events[..3]
            .iter()
            .map(|e| e["data"].clone())
            .collect::<Vec<_>>(),
        [json!(1), json!(2), json!(3)]
    );

    // Still held until its deadline: a full frame's worth wakes it at once.
    reader.conn.out.borrow_mut().set_waker(&waker);
    for i in 0..super::MAX_BATCH_ITEMS {
        cluster.publish(&publisher, "feed", json!(i));
        cluster.settle();
        let full = i + 1 == super::MAX_BATCH_ITEMS;
        assert_eq!(
            task.count(),
            2 + usize::from(full),
            "after {} publications",
            i + 1
        );
    }
    assert!(!reader.conn.out.borrow().may_hold(frame_bytes));
    assert_eq!(reader.messages().len(), super::MAX_BATCH_ITEMS);

    // Its deadline: released, woken, and writing without holding back
    // until its queue is drained; the other stays held until its own.
    reader.conn.out.borrow_mut().set_waker(&waker);
    cluster.publish(&publisher, "feed", json!("last"));
    cluster.settle();
    assert_eq!(task.count(), 3);
    shard.flush_held_writes(t0 + ms(4));
    assert_eq!(task.count(), 3, "not due yet");
    shard.flush_held_writes(t0 + ms(5));
    assert_eq!(task.count(), 4, "released at its deadline");
    assert!(!reader.conn.writes_held() && reader.conn.flushing());
    assert!(other.conn.writes_held());
    assert_eq!(shard.next_flush_deadline(&flusher_waker), Some(t0 + ms(8)));
    assert_eq!(reader.events().len(), 1);
    reader.conn.end_flush();
    assert!(!reader.conn.flushing());
    shard.flush_held_writes(t0 + ms(8));
    assert!(!other.conn.writes_held() && other.conn.flushing());
    assert_eq!(shard.next_flush_deadline(&flusher_waker), None);
}

/// Held publications never bring a prompt reader near the slow-consumer
/// bound: a held connection is woken once its queue holds half of
/// `--max-pending-bytes` when that is less than a full frame.
#[test]
fn held_writes_go_at_half_the_pending_bound_before_the_slow_consumer_policy() {
    let cluster = Cluster::new(
        Backplane::Embedded,
        1,
        &[
            "--write-delay",
            "1000",
            "--max-message-bytes",
            "4096",
            "--max-pending-bytes",
            "16384",
        ],
    );
    let shard = &cluster.shards[0];
    assert_eq!(shard.config.limits.held_bytes(), 8192);
    let reader = subscriber(&cluster, 0, "feed");
    let publisher = cluster.connect(0);
    let task = Arc::new(CountingWaker::default());
    let waker = std::task::Waker::from(task.clone());
    shard.hold_writes(&reader.conn, cluster.now.get());
    reader.conn.out.borrow_mut().set_waker(&waker);
    let mut pushed = 0;
    while task.count() == 0 {
        cluster.publish(&publisher, "feed", json!("x".repeat(1000)));
        cluster.settle();
        pushed += 1;
        assert!(pushed < 16, "never woken");
    }
    let held = reader.conn.out.borrow().bytes;
    assert!((8192..16384).contains(&held), "woken holding {held} bytes");
    assert!(!reader.conn.out.borrow().may_hold(8192));
    assert!(
        reader.conn.close.get().is_none(),
        "not closed as a slow consumer"
    );
    assert_eq!(reader.messages().len(), pushed);
}
