//! The backplane contract end to end (`src/backplane/broker.rs` states it):
//! every scenario here runs twice, on a relay with the embedded backplane
//! and on one behind a real `redis-server` the test starts, and must behave
//! the same on both. Clients are tokio-tungstenite and plain HTTP.

mod common;

use std::collections::BTreeSet;

use common::redis::RedisServer;
use common::{http_publish, Client, Fmt, Relay};
use serde_json::{json, Value};

#[derive(Debug, Clone, Copy)]
enum Backplane {
    Embedded,
    Redis,
}

/// A relay with two workers on `backplane`, ready; Redis lives as long as
/// the relay does.
struct Setup {
    relay: Relay,
    _redis: Option<RedisServer>,
}

async fn start(backplane: Backplane, extra: &[&str]) -> Setup {
    let mut args = vec!["--workers", "2", "--max-publish-rate", "0"];
    args.extend_from_slice(extra);
    let redis = match backplane {
        Backplane::Embedded => None,
        Backplane::Redis => Some(RedisServer::start()),
    };
    let url = redis.as_ref().map(RedisServer::url);
    if let Some(url) = &url {
        args.extend_from_slice(&["--redis", url.as_str()]);
    }
    let relay = Relay::start(&args);
    relay.wait_readyz(200).await;
    Setup {
        relay,
        _redis: redis,
    }
}

/// The next `n` messages of a client, skipping other events.
async fn messages(client: &mut Client, n: usize) -> Vec<u64> {
    let mut seqs = Vec::new();
    while seqs.len() < n {
        let event = client.next().await;
        if event["type"] == "message" {
            seqs.push(event["seq"].as_u64().expect("a sequenced message"));
        }
    }
    seqs
}

/// Guarantees 1 and 2: publishers on several connections (spread over the
/// workers by the kernel) publishing at once share one gap-free seq, every
/// subscriber gets every publication in seq order, and every publish is
/// answered with its own seq.
async fn concurrent_publishers_share_one_gap_free_seq(backplane: Backplane) {
    let setup = start(backplane, &[]).await;
    let mut subscribers = Vec::new();
    for _ in 0..4 {
        let mut s = Client::connect(&setup.relay, Fmt::Json).await;
        s.subscribe("ticks").await;
        subscribers.push(s);
    }
    const PER_PUBLISHER: u64 = 50;
    let mut publishers = Vec::new();
    for p in 0..4u64 {
        let fmt = if p % 2 == 0 { Fmt::Json } else { Fmt::MsgPack };
        publishers.push(Client::connect(&setup.relay, fmt).await);
    }
    // Every publisher's requests go out before any answer is read.
    for round in 0..PER_PUBLISHER {
        for (p, publisher) in publishers.iter_mut().enumerate() {
            let id = round * 10 + p as u64;
            publisher
                .send(json!({"action": "publish", "channel": "ticks", "data": id, "id": id}))
                .await;
        }
    }
    let total = PER_PUBLISHER * publishers.len() as u64;
    let mut acked = BTreeSet::new();
    for publisher in &mut publishers {
        for _ in 0..PER_PUBLISHER {
            let ack = publisher.expect_type("published").await;
            assert!(acked.insert(ack["seq"].as_u64().unwrap()), "{ack}");
        }
    }
    assert_eq!(acked, (1..=total).collect(), "each publish has its own seq");
    for s in &mut subscribers {
        assert_eq!(
            messages(s, total as usize).await,
            (1..=total).collect::<Vec<_>>()
        );
    }
}

/// Guarantees 3 and 4, at every boundary of history: a replay is whole or
/// refused, and live messages follow it with no gap and no duplicate. The
/// channel had publications before any subscriber, so behind Redis the
/// node holds none of them when the first `since` arrives.
async fn since_is_whole_or_refused_at_every_boundary(backplane: Backplane) {
    let setup = start(backplane, &["--history-size", "5"]).await;
    let relay = &setup.relay;
    for i in 1..=12 {
        let (status, _) = http_publish(relay.addr, "feed", &i.to_string(), "").await;
        assert_eq!(status, 202);
    }
    let mut probe = Client::connect(relay, Fmt::Json).await;
    let ack = probe.subscribe("feed").await;
    assert_eq!(ack["seq"], 12, "{ack}");
    let epoch = ack["epoch"].clone();
    let cases: [(u64, Value, Option<Vec<u64>>); 6] = [
        (12, Value::Null, Some(vec![])),
        (11, epoch.clone(), Some(vec![12])),
        (7, epoch.clone(), Some((8..=12).collect())),
        (6, epoch.clone(), None),
        (13, Value::Null, None),
        (11, json!("another-epoch"), None),
    ];
    let mut late_ones = Vec::new();
    for (since, epoch, replay) in cases {
        let mut late = Client::connect(relay, Fmt::MsgPack).await;
        let mut request = json!({"action": "subscribe", "channel": "feed", "since": since});
        if !epoch.is_null() {
            request["epoch"] = epoch;
        }
        late.send(request).await;
        let mut replayed = Vec::new();
        let ack = loop {
            let event = late.next().await;
            match event["type"].as_str() {
                Some("message") => replayed.push(event["seq"].as_u64().unwrap()),
                Some("subscribed") => break event,
                _ => panic!("since {since}: {event}"),
            }
        };
        assert_eq!(ack["seq"], 12, "since {since}: {ack}");
        match replay {
            Some(want) => {
                assert_eq!(replayed, want, "since {since}");
                assert_eq!(ack["recovered"], true, "since {since}");
            }
            None => {
                assert!(replayed.is_empty(), "since {since}: {replayed:?}");
                assert_eq!(ack["recovered"], false, "since {since}");
            }
        }
        late_ones.push(late);
    }
    http_publish(relay.addr, "feed", "13", "").await;
    for late in &mut late_ones {
        assert_eq!(messages(late, 1).await, [13]);
    }
}

/// Guarantee 3 while the channel is busy: subscribers joining with `since`
/// in the middle of a stream see replay then live as one consecutive run.
async fn replay_and_live_meet_without_gap_or_duplicate(backplane: Backplane) {
    let setup = start(backplane, &["--history-size", "1000"]).await;
    let relay = &setup.relay;
    let mut publisher = Client::connect(relay, Fmt::Json).await;
    let mut watcher = Client::connect(relay, Fmt::Json).await;
    watcher.subscribe("stream").await;
    const TOTAL: u64 = 300;
    let mut joiners = Vec::new();
    for i in 1..=TOTAL {
        publisher
            .send(json!({"action": "publish", "channel": "stream", "data": i}))
            .await;
        if i % 60 == 0 {
            // Join from what the watcher has seen so far: whatever arrives
            // between that and the join comes once, in the replay or live.
            let seen = messages(&mut watcher, 1).await[0];
            let mut joiner = Client::connect(relay, Fmt::MsgPack).await;
            joiner
                .send(json!({"action": "subscribe", "channel": "stream", "since": seen}))
                .await;
            joiners.push((seen, joiner));
        }
    }
    for (seen, joiner) in &mut joiners {
        let mut got = Vec::new();
        while got.last() != Some(&TOTAL) {
            let event = joiner.next().await;
            match event["type"].as_str() {
                Some("message") => got.push(event["seq"].as_u64().unwrap()),
                Some("subscribed") => assert_eq!(event["recovered"], true, "{event}"),
                _ => panic!("{event}"),
            }
        }
        assert_eq!(got, (*seen + 1..=TOTAL).collect::<Vec<_>>(), "from {seen}");
    }
}

/// Answers to an array keep the requests' order, whichever shard or
/// backplane answers each.
async fn array_answers_keep_the_requests_order(backplane: Backplane) {
    let setup = start(backplane, &[]).await;
    common::array_requests_are_answered_in_order(&setup.relay, 6, "contract").await;
}

/// Keys: a publication's `key`, from a WebSocket in either format or from
/// `POST /publish/{channel}?key=`, reaches subscribers in both formats;
/// keyless ones carry none, and a bad key is refused.
async fn keys_travel_with_their_messages_in_both_formats(backplane: Backplane) {
    let setup = start(backplane, &["--allow-client-publish", "true"]).await;
    let relay = &setup.relay;
    let mut json_sub = Client::connect(relay, Fmt::Json).await;
    let mut mp_sub = Client::connect(relay, Fmt::MsgPack).await;
    json_sub.subscribe("prices").await;
    mp_sub.subscribe("prices").await;
    let mut json_pub = Client::connect(relay, Fmt::Json).await;
    let mut mp_pub = Client::connect(relay, Fmt::MsgPack).await;
    json_pub
        .send(json!({"action": "publish", "channel": "prices", "key": "AAPL", "data": 1, "id": 1}))
        .await;
    assert_eq!(json_pub.expect_type("published").await["seq"], 1);
    mp_pub
        .send(
            json!({"action": "publish", "channel": "prices", "key": "MSFT é", "data": 2, "id": 2}),
        )
        .await;
    assert_eq!(mp_pub.expect_type("published").await["seq"], 2);
    let (status, body) = http_publish(relay.addr, "prices?key=GOOG%2FA", "3", "").await;
    assert_eq!(status, 202, "{body}");
    json_pub
        .send(json!({"action": "publish", "channel": "prices", "data": 4, "id": 4}))
        .await;
    assert_eq!(json_pub.expect_type("published").await["seq"], 4);
    for sub in [&mut json_sub, &mut mp_sub] {
        let mut got = Vec::new();
        while got.len() < 4 {
            let event = sub.next().await;
            if event["type"] == "message" {
                got.push((
                    event["seq"].clone(),
                    event["key"].clone(),
                    event["data"].clone(),
                ));
            }
        }
        assert_eq!(
            got,
            vec![
                (json!(1), json!("AAPL"), json!(1)),
                (json!(2), json!("MSFT é"), json!(2)),
                (json!(3), json!("GOOG/A"), json!(3)),
                (json!(4), Value::Null, json!(4)),
            ],
            "{:?}",
            sub.fmt
        );
    }
    for key in [json!(""), json!("k".repeat(256)), json!(5)] {
        json_pub
            .send(json!({"action": "publish", "channel": "prices", "key": key, "data": 0, "id": 9}))
            .await;
        json_pub.expect_error("bad_request", 9).await;
    }
    for bad in ["prices?key=", "prices?key=%FF%FE"] {
        let (status, body) = http_publish(relay.addr, bad, "0", "").await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("key"), "{bad}: {body}");
    }
    // The relay is unharmed: a good publication still goes through.
    let (status, body) = http_publish(relay.addr, "prices?key=ok", "5", "").await;
    assert_eq!(status, 202, "{body}");
}

/// Snapshots (guarantee 6): a subscriber on another node (behind Redis)
/// or shard gets the latest message of every key, in seq order, up to
/// its `subscribed` seq, in both formats, then live messages without a
/// gap; a `since` too old for history gets the snapshot instead. Past
/// --max-keys-per-channel the keys updated least recently are forgotten.
async fn snapshots_hold_every_keys_latest_across_shards_and_nodes(backplane: Backplane) {
    let limits = ["--history-size", "20", "--max-keys-per-channel", "25"];
    let setup = start(backplane, &limits).await;
    let second = setup._redis.as_ref().map(|redis| {
        let url = redis.url();
        let mut args = vec!["--workers", "2", "--redis", url.as_str()];
        args.extend_from_slice(&limits);
        Relay::start(&args)
    });
    let reader = second.as_ref().unwrap_or(&setup.relay);
    reader.wait_readyz(200).await;
    const KEYS: u64 = 30;
    for i in 1..=150u64 {
        let channel = format!("quotes?key=k{}", i % KEYS);
        let (status, body) = http_publish(setup.relay.addr, &channel, &i.to_string(), "").await;
        assert_eq!(status, 202, "{body}");
    }
    let mut json_sub = Client::connect(reader, Fmt::Json).await;
    let mut mp_sub = Client::connect(reader, Fmt::MsgPack).await;
    json_sub
        .send(json!({"action": "subscribe", "channel": "quotes", "snapshot": true}))
        .await;
    mp_sub
        .send(json!({"action": "subscribe", "channel": "quotes", "snapshot": true, "since": 3}))
        .await;
    for (sub, recovered) in [(&mut json_sub, Value::Null), (&mut mp_sub, json!(false))] {
        let mut snapshot = Vec::new();
        let subscribed = loop {
            let event = sub.next().await;
            match event["type"].as_str() {
                Some("message") => snapshot.push(event),
                Some("subscribed") => break event,
                _ => panic!("{event}"),
            }
        };
        assert_eq!(subscribed["seq"], 150, "{subscribed}");
        assert_eq!(subscribed["recovered"], recovered, "{subscribed}");
        let expected: Vec<(u64, String, u64)> = (126..=150)
            .map(|i| (i, format!("k{}", i % KEYS), i))
            .collect();
        let got: Vec<(u64, String, u64)> = snapshot
            .iter()
            .map(|e| {
                let key = e["key"].as_str().unwrap().to_string();
                (e["seq"].as_u64().unwrap(), key, e["data"].as_u64().unwrap())
            })
            .collect();
        assert_eq!(got, expected, "{:?}", sub.fmt);
    }
    for i in 151..=155u64 {
        let channel = format!("quotes?key=k{}", i % KEYS);
        http_publish(setup.relay.addr, &channel, &i.to_string(), "").await;
    }
    assert_eq!(
        messages(&mut json_sub, 5).await,
        (151..=155).collect::<Vec<_>>()
    );
    assert_eq!(
        messages(&mut mp_sub, 5).await,
        (151..=155).collect::<Vec<_>>()
    );
}

/// Conflation end to end: a burst far faster than the window reaches a
/// conflating subscriber (in each format) merged, with seqs that only
/// grow, every key's last value, and `conflated` counting exactly what was
/// merged; a subscriber without it gets everything. When windows close is
/// checked on a virtual clock in `src/hub/conflation.rs` and measured in
/// `bench/`.
async fn conflated_subscribers_get_every_keys_last_value_and_exact_counts(backplane: Backplane) {
    let setup = start(backplane, &["--allow-client-publish", "true"]).await;
    let relay = &setup.relay;
    let mut plain = Client::connect(relay, Fmt::Json).await;
    plain.subscribe("burst").await;
    let mut conflating = Vec::new();
    for fmt in [Fmt::Json, Fmt::MsgPack] {
        let mut c = Client::connect(relay, fmt).await;
        c.send(json!({"action": "subscribe", "channel": "burst", "conflate_ms": 100}))
            .await;
        c.expect_type("subscribed").await;
        conflating.push(c);
    }
    const KEYS: u64 = 10;
    const TOTAL: u64 = 1000;
    let mut publisher = Client::connect(relay, Fmt::Json).await;
    let frame: Vec<Value> = (1..=TOTAL)
        .map(|i| json!({"action": "publish", "channel": "burst", "key": format!("k{}", i % KEYS), "data": i}))
        .collect();
    publisher.send(Value::Array(frame)).await;
    assert_eq!(
        messages(&mut plain, TOTAL as usize).await,
        (1..=TOTAL).collect::<Vec<_>>()
    );
    for c in &mut conflating {
        let mut counted = std::collections::HashMap::new();
        let mut last_seq = 0;
        let mut delivered = 0;
        while counted.values().sum::<u64>() < TOTAL {
            let event = c.next().await;
            assert_eq!(event["type"], "message", "{event}");
            let seq = event["seq"].as_u64().unwrap();
            assert!(seq > last_seq, "seqs only grow: {seq} after {last_seq}");
            last_seq = seq;
            let key = event["key"].as_str().unwrap().to_string();
            assert_eq!(key, format!("k{}", seq % KEYS));
            let merged = event["conflated"].as_u64().unwrap_or(0);
            *counted.entry(key).or_insert(0) += 1 + merged;
            delivered += 1;
        }
        assert_eq!(last_seq, TOTAL, "the last value arrives");
        assert_eq!(counted.len() as u64, KEYS);
        assert!(counted.values().all(|&n| n == TOTAL / KEYS), "{counted:?}");
        assert!(
            delivered < TOTAL,
            "{:?}: {delivered} of {TOTAL}: merged",
            c.fmt
        );
    }
    // For each conflating subscriber, every message was sent or merged
    // (the counts are flushed once a second).
    let deadline = std::time::Instant::now() + common::PATIENCE;
    loop {
        let sent = relay.metric("ringcast_conflation_sent_total", &[]).await;
        let merged = relay.metric("ringcast_conflation_merged_total", &[]).await;
        if sent + merged == 2.0 * TOTAL as f64 && merged > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sent {sent}, merged {merged}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Runs each named scenario as a test on one backplane.
macro_rules! on_backplane {
    ($module:ident, $backplane:expr, $($scenario:ident),* $(,)?) => {
        mod $module {
            $(
                #[tokio::test]
                async fn $scenario() {
                    super::$scenario($backplane).await;
                }
            )*
        }
    };
}

macro_rules! contract {
    ($($scenario:ident),* $(,)?) => {
        on_backplane!(embedded, super::Backplane::Embedded, $($scenario),*);
        on_backplane!(redis, super::Backplane::Redis, $($scenario),*);
    };
}

contract!(
    concurrent_publishers_share_one_gap_free_seq,
    since_is_whole_or_refused_at_every_boundary,
    replay_and_live_meet_without_gap_or_duplicate,
    array_answers_keep_the_requests_order,
    keys_travel_with_their_messages_in_both_formats,
    snapshots_hold_every_keys_latest_across_shards_and_nodes,
    conflated_subscribers_get_every_keys_last_value_and_exact_counts,
);
