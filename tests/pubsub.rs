//! Publish/subscribe end to end through the real binary: across workers,
//! across formats, seq order, `since` recovery, on both I/O drivers.

mod common;

use common::{http_publish, Client, Fmt, Relay};
use serde_json::json;

/// Opens clients until every worker holds at least one (the kernel spreads
/// SO_REUSEPORT connections by hash, so a handful is always enough).
async fn clients_on_every_worker(relay: &Relay, fmt: Fmt) -> Vec<Client> {
    let mut clients = Vec::new();
    for _ in 0..64 {
        clients.push(Client::connect(relay, fmt).await);
        let n = clients.len() as f64;
        relay
            .wait_metric("ringcast_connections", &[], |v| v == n)
            .await;
        let mut all = true;
        for w in 0..relay.workers {
            let shard = format!("shard=\"{w}\"");
            all &= relay.metric("ringcast_connections", &[&shard]).await >= 1.0;
        }
        if all && clients.len() >= 8 {
            return clients;
        }
    }
    panic!("64 connections never reached every worker");
}

async fn cross_worker_delivery(driver: &str) {
    let relay = Relay::start(&["--workers", "2", "--driver", driver]);
    let mut clients = clients_on_every_worker(&relay, Fmt::Json).await;
    for c in clients.iter_mut() {
        let ack = c.subscribe("room").await;
        assert_eq!(ack["seq"], 0);
    }
    // Every client publishes once; everyone must get every message, in seq order.
    let n = clients.len();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(
            json!({"action": "publish", "channel": "room", "data": {"from": i}, "id": 1000 + i}),
        )
        .await;
    }
    for c in clients.iter_mut() {
        let mut seen = Vec::new();
        let mut acks = 0;
        while seen.len() < n || acks < 1 {
            let ev = c.next().await;
            match ev["type"].as_str().unwrap() {
                "message" => {
                    assert_eq!(ev["channel"], "room");
                    seen.push(ev["seq"].as_u64().unwrap());
                }
                "published" => acks += 1,
                other => panic!("unexpected {other}: {ev}"),
            }
        }
        assert_eq!(seen, (1..=n as u64).collect::<Vec<_>>());
    }
    assert_eq!(
        relay.metric("ringcast_publications_total", &[]).await,
        n as f64
    );
}

#[tokio::test]
async fn clients_on_different_workers_receive_each_others_publications_io_uring() {
    cross_worker_delivery("uring").await;
}

#[tokio::test]
async fn clients_on_different_workers_receive_each_others_publications_epoll() {
    cross_worker_delivery("epoll").await;
}

/// `--write-delay`: what a connection is sent waits for the shard's flush,
/// and still arrives whole and in seq order on every worker, in both
/// formats, with nothing but the delay to release it.
async fn held_writes_deliver_everything_in_order(driver: &str) {
    let relay = Relay::start(&["--workers", "2", "--driver", driver, "--write-delay", "20"]);
    let mut subs = clients_on_every_worker(&relay, Fmt::Json).await;
    subs.push(Client::connect(&relay, Fmt::MsgPack).await);
    for s in subs.iter_mut() {
        s.subscribe("feed").await;
    }
    let mut publisher = Client::connect(&relay, Fmt::Json).await;
    const N: u64 = 300;
    for i in 0..N {
        publisher
            .send(json!({"action": "publish", "channel": "feed", "data": i, "id": i}))
            .await;
        let ack = publisher.expect_type("published").await;
        assert_eq!(ack["id"], i);
    }
    // Every message arrives with no other request to push it out: the
    // flushes alone deliver what was held (a connection left held would
    // time out here).
    for s in subs.iter_mut() {
        for seq in 1..=N {
            let ev = s.expect_type("message").await;
            assert_eq!(
                (ev["seq"].as_u64(), ev["data"].as_u64()),
                (Some(seq), Some(seq - 1)),
                "{ev}"
            );
        }
    }
    // Each subscriber held its first publication (it came to an idle
    // connection): it went out through a flush.
    relay
        .wait_metric("ringcast_write_flushes_total", &[], |v| v >= 1.0)
        .await;
}

#[tokio::test]
async fn held_writes_deliver_everything_in_order_io_uring() {
    held_writes_deliver_everything_in_order("uring").await;
}

#[tokio::test]
async fn held_writes_deliver_everything_in_order_epoll() {
    held_writes_deliver_everything_in_order("epoll").await;
}

#[tokio::test]
async fn json_and_msgpack_clients_interoperate_both_ways() {
    let relay = Relay::start(&["--workers", "2"]);
    let mut j = Client::connect(&relay, Fmt::Json).await;
    let mut m = Client::connect(&relay, Fmt::MsgPack).await;
    j.subscribe("mix").await;
    let ack = m.subscribe("mix").await;
    assert_eq!(ack["id"], "mix");
    let data =
        json!({"price": 101.25, "tags": ["a", "b"], "n": -3, "nested": {"ok": true, "none": null}});
    j.send(json!({"action": "publish", "channel": "mix", "data": data, "id": 7}))
        .await;
    // The publisher gets its message and its `published` ack, in either order.
    let mut events = vec![j.next().await, j.next().await];
    events.sort_by_key(|e| e["type"].as_str().unwrap().to_string());
    assert_eq!(
        events[1],
        json!({"type": "published", "channel": "mix", "seq": 1, "id": 7})
    );
    events.push(m.expect_type("message").await);
    for ev in [&events[0], &events[2]] {
        assert_eq!(ev["type"], "message");
        assert_eq!(ev["data"], data);
        assert_eq!(ev["seq"], 1);
    }
    // MessagePack binary data reaches JSON clients as base64.
    let mut bin = Vec::new();
    rmp::encode::write_map_len(&mut bin, 3).unwrap();
    for (k, v) in [("action", "publish"), ("channel", "mix")] {
        rmp::encode::write_str(&mut bin, k).unwrap();
        rmp::encode::write_str(&mut bin, v).unwrap();
    }
    rmp::encode::write_str(&mut bin, "data").unwrap();
    rmp::encode::write_bin(&mut bin, &[0, 1, 2, 255]).unwrap();
    use futures_util::SinkExt;
    m.ws.send(tokio_tungstenite::tungstenite::Message::binary(bin))
        .await
        .unwrap();
    let ev = j.expect_type("message").await;
    assert_eq!(ev["data"], "AAEC/w==");
    assert_eq!(ev["seq"], 2);
    let ev = m.expect_type("message").await;
    assert_eq!(ev["seq"], 2);
    assert_eq!(
        ev["data"],
        json!({"$bin": "AAEC/w=="}),
        "binary stays binary for MessagePack"
    );
}

#[tokio::test]
async fn batched_requests_are_answered_in_order_with_ids() {
    let relay = Relay::start(&["--workers", "1"]);
    let mut c = Client::connect(&relay, Fmt::Json).await;
    c.send(json!([
        {"action": "subscribe", "channel": "b1", "id": 1},
        {"action": "subscribe", "channel": "b2", "id": "two"},
        {"action": "publish", "channel": "b1", "data": "x", "id": 3},
        {"action": "unsubscribe", "channel": "b2", "id": 4},
    ]))
    .await;
    let mut events = Vec::new();
    while events.len() < 5 {
        events.push(c.next().await);
    }
    let ids: Vec<_> = events
        .iter()
        .filter(|e| e["type"] != "message")
        .map(|e| e["id"].clone())
        .collect();
    assert_eq!(ids, vec![json!(1), json!("two"), json!(3), json!(4)]);
    assert!(events
        .iter()
        .any(|e| e["type"] == "message" && e["data"] == "x"));
    assert!(
        c.batch_frames >= 1,
        "replies to one batch should arrive batched"
    );
}

#[tokio::test]
async fn messages_published_together_arrive_as_array_batches() {
    let relay = Relay::start(&["--workers", "1"]);
    let mut sub = Client::connect(&relay, Fmt::MsgPack).await;
    sub.subscribe("burst").await;
    let mut publisher = Client::connect(&relay, Fmt::Json).await;
    let batch: Vec<_> = (0..50)
        .map(|i| json!({"action": "publish", "channel": "burst", "data": i}))
        .collect();
    publisher.send(serde_json::Value::Array(batch)).await;
    for i in 0..50 {
        let ev = sub.expect_type("message").await;
        assert_eq!(ev["data"], i);
        assert_eq!(ev["seq"], i + 1);
    }
    assert!(
        sub.batch_frames >= 1,
        "50 publications in one turn must coalesce"
    );
}

#[tokio::test]
async fn seq_is_gap_free_and_ordered_under_concurrent_publishers_on_several_shards() {
    let relay = Relay::start(&["--workers", "2", "--history-size", "1000"]);
    let mut subs = clients_on_every_worker(&relay, Fmt::Json).await;
    for s in subs.iter_mut() {
        s.subscribe("race").await;
    }
    let per = 200;
    let mut publishers = Vec::new();
    for p in 0..4 {
        let url = relay.addr;
        publishers.push(tokio::spawn(async move {
            for i in 0..per {
                let (status, _) =
                    http_publish(url, "race", &format!("{{\"p\":{p},\"i\":{i}}}"), "").await;
                assert_eq!(status, 202);
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    let total = 4 * per as u64;
    for s in subs.iter_mut() {
        let mut last_by_publisher = [-1i64; 4];
        for expect in 1..=total {
            let ev = s.expect_type("message").await;
            assert_eq!(ev["seq"].as_u64().unwrap(), expect, "gap or reorder");
            let p = ev["data"]["p"].as_u64().unwrap() as usize;
            let i = ev["data"]["i"].as_i64().unwrap();
            assert!(
                i > last_by_publisher[p],
                "one publisher's messages reordered"
            );
            last_by_publisher[p] = i;
        }
    }
}

#[tokio::test]
async fn since_recovers_exactly_the_missed_messages_then_live_ones() {
    let relay = Relay::start(&["--workers", "2", "--history-size", "50"]);
    let mut c = Client::connect(&relay, Fmt::Json).await;
    let ack = c.subscribe("feed").await;
    let epoch = ack["epoch"].as_str().unwrap().to_string();
    for i in 1..=5 {
        http_publish(relay.addr, "feed", &i.to_string(), "").await;
    }
    for i in 1..=5 {
        assert_eq!(c.expect_type("message").await["seq"], i);
    }
    drop(c);
    for i in 6..=12 {
        http_publish(relay.addr, "feed", &i.to_string(), "").await;
    }
    // Reconnect (possibly on another worker) with since=5 while publishing continues.
    let mut c = Client::connect(&relay, Fmt::MsgPack).await;
    c.send(json!({"action": "subscribe", "channel": "feed", "since": 5, "epoch": epoch, "id": 9}))
        .await;
    let live = tokio::spawn({
        let addr = relay.addr;
        async move {
            for i in 13..=30 {
                http_publish(addr, "feed", &i.to_string(), "").await;
            }
        }
    });
    let mut seqs = Vec::new();
    let mut subscribed = None;
    while seqs.len() < 25 {
        let ev = c.next().await;
        match ev["type"].as_str().unwrap() {
            "message" => {
                assert_eq!(ev["data"], ev["seq"], "payload i was published as seq i");
                seqs.push(ev["seq"].as_u64().unwrap());
            }
            "subscribed" => subscribed = Some((ev.clone(), seqs.len())),
            other => panic!("unexpected {other}"),
        }
    }
    live.await.unwrap();
    assert_eq!(seqs, (6..=30).collect::<Vec<_>>(), "no gap, no duplicate");
    let (ack, at) = subscribed.expect("a subscribed event");
    assert_eq!(ack["recovered"], true);
    assert_eq!(ack["id"], 9);
    assert_eq!(
        at as u64,
        ack["seq"].as_u64().unwrap() - 5,
        "subscribed comes right after the replay"
    );
}

#[tokio::test]
async fn since_past_history_or_from_another_epoch_is_not_recovered() {
    let relay = Relay::start(&["--workers", "2", "--history-size", "3"]);
    for i in 1..=10 {
        http_publish(relay.addr, "short", &i.to_string(), "").await;
    }
    let mut c = Client::connect(&relay, Fmt::Json).await;
    c.send(json!({"action": "subscribe", "channel": "short", "since": 2}))
        .await;
    let ack = c.expect_type("subscribed").await;
    assert_eq!(ack["recovered"], false);
    assert_eq!(ack["seq"], 10);
    let mut c2 = Client::connect(&relay, Fmt::Json).await;
    c2.send(
        json!({"action": "subscribe", "channel": "short", "since": 8, "epoch": "not-this-one"}),
    )
    .await;
    let ack = c2.expect_type("subscribed").await;
    assert_eq!(ack["recovered"], false);
    c2.send(json!({"action": "subscribe", "channel": "other", "since": 8}))
        .await;
    assert_eq!(
        c2.expect_type("subscribed").await["recovered"],
        false,
        "a since from the future"
    );
    // Nothing was replayed: the next event is live.
    http_publish(relay.addr, "short", "11", "").await;
    assert_eq!(c.expect_type("message").await["seq"], 11);
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let relay = Relay::start(&["--workers", "2"]);
    let mut c = Client::connect(&relay, Fmt::Json).await;
    c.subscribe("a").await;
    c.subscribe("b").await;
    c.send(json!({"action": "unsubscribe", "channel": "a", "id": 5}))
        .await;
    assert_eq!(c.expect_type("unsubscribed").await["id"], 5);
    http_publish(relay.addr, "a", "1", "").await;
    http_publish(relay.addr, "b", "2", "").await;
    let ev = c.expect_type("message").await;
    assert_eq!(
        ev["channel"], "b",
        "a message of an unsubscribed channel arrived"
    );
}

/// One frame of requests whose answers come from other shards, mixed with
/// failing requests: every request is answered, in request order.
async fn array_requests_are_answered_in_order(driver: &str) {
    let relay = Relay::start(&["--workers", "2", "--driver", driver]);
    let clients = clients_on_every_worker(&relay, Fmt::Json).await;
    drop(clients);
    common::array_requests_are_answered_in_order(&relay, 60, driver).await;
}

#[tokio::test]
async fn array_requests_are_answered_in_order_on_io_uring() {
    array_requests_are_answered_in_order("uring").await;
}

#[tokio::test]
async fn array_requests_are_answered_in_order_on_epoll() {
    array_requests_are_answered_in_order("epoll").await;
}

/// A reconnecting client asks for more than --max-pending-bytes of
/// history: the replay must get through, not end in 4008.
#[tokio::test]
async fn a_since_replay_larger_than_the_pending_bound_gets_through() {
    // The smallest bound allowed for 16 KiB messages: 64 KiB, against
    // 300 KB of replay.
    let relay = Relay::start(&[
        "--workers",
        "2",
        "--max-message-bytes",
        "16384",
        "--max-pending-bytes",
        "65536",
    ]);
    let payload = format!("\"{}\"", "x".repeat(3000));
    for _ in 0..100 {
        assert_eq!(
            http_publish(relay.addr, "replayed", &payload, "").await.0,
            202
        );
    }
    for fmt in [Fmt::Json, Fmt::MsgPack] {
        let mut c = Client::connect(&relay, fmt).await;
        c.send(json!({"action": "subscribe", "channel": "replayed", "since": 0, "id": 1}))
            .await;
        for seq in 1..=100u64 {
            let ev = c.expect_type("message").await;
            assert_eq!(ev["seq"], seq);
        }
        let ack = c.expect_type("subscribed").await;
        assert_eq!(ack["recovered"], true);
        assert_eq!(ack["seq"], 100);
    }
}

/// Five publications of the largest size, sent in one write, reach a
/// subscriber that reads: the default bound holds such a burst.
#[tokio::test]
async fn a_burst_of_the_largest_messages_does_not_evict_a_prompt_reader() {
    use tokio::io::AsyncWriteExt;
    let relay = Relay::start(&["--workers", "1"]);
    let mut reader = Client::connect(&relay, Fmt::Json).await;
    reader.subscribe("big").await;
    let mut publisher = common::raw_ws(&relay).await;
    let data = "y".repeat(64 * 1024 - 100);
    let mut burst = Vec::new();
    for i in 0..5 {
        let request = json!({"action": "publish", "channel": "big", "data": data, "id": i});
        burst.extend(common::frame(
            true,
            0x1,
            request.to_string().as_bytes(),
            common::MASK,
        ));
    }
    publisher.write_all(&burst).await.unwrap();
    for seq in 1..=5u64 {
        let ev = reader.expect_type("message").await;
        assert_eq!(ev["seq"], seq);
        assert_eq!(ev["data"].as_str().map(str::len), Some(data.len()));
    }
}
