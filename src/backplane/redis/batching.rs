//! How the Redis thread turns queued publications into script calls, and
//! reads the scripts' replies, without I/O: publications are grouped by
//! channel in arrival order, channels are packed into calls of bounded
//! size (one hash slot per call on a cluster), and each call's keys and
//! arguments are laid out as the publish script reads them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::types::Value;

use super::event::{FetchReply, FetchedEntry};
use super::scripts::ChannelKeys;

/// Most publications in one script call, and most item bytes: a call runs
/// atomically inside Redis, so it must stay short.
pub const MAX_ITEMS_PER_CALL: usize = 4096;
pub const MAX_BYTES_PER_CALL: usize = 1 << 20;

/// A publication waiting for its script call: the item, and the shard and
/// token its outcome goes to.
pub type PendingPublish = (Vec<u8>, usize, u32);

/// Publications taken in one turn, grouped by channel, channels in the
/// order they first appeared.
#[derive(Default)]
pub struct Grouped {
    channels: Vec<(Arc<str>, Vec<PendingPublish>)>,
    index: HashMap<Arc<str>, usize>,
}

impl Grouped {
    pub fn push(&mut self, channel: Arc<str>, publication: PendingPublish) {
        let i = *self.index.entry(channel.clone()).or_insert_with(|| {
            self.channels.push((channel, Vec::new()));
            self.channels.len() - 1
        });
        self.channels[i].1.push(publication);
    }

    pub fn is_empty(&self) -> bool {
        self.channels.is_empty()
    }

    pub fn into_channels(self) -> Vec<(Arc<str>, Vec<PendingPublish>)> {
        self.channels
    }
}

/// One script call.
#[derive(Default)]
pub struct Call {
    pub channels: Vec<(Arc<ChannelKeys>, Vec<PendingPublish>)>,
    pub items: usize,
    pub bytes: usize,
}

impl Call {
    fn add(&mut self, keys: Arc<ChannelKeys>, items: Vec<PendingPublish>, bytes: usize) {
        self.items += items.len();
        self.bytes += bytes;
        self.channels.push((keys, items));
    }
}

/// Packs channels into calls of at most [`MAX_ITEMS_PER_CALL`] items and
/// [`MAX_BYTES_PER_CALL`] bytes (a channel with more goes alone, whole, so
/// its publications stay in one call and in order). On a cluster all keys
/// of a call must share a hash slot: channels are sorted by slot and a call
/// never spans two.
pub fn cut_into_calls(
    mut publishes: Vec<(Arc<ChannelKeys>, Vec<PendingPublish>)>,
    clustered: bool,
) -> Vec<Call> {
    if clustered {
        publishes.sort_by_key(|(keys, _)| keys.slot);
    }
    let mut calls = Vec::new();
    let mut call = Call::default();
    for (keys, items) in publishes {
        let bytes: usize = items.iter().map(|(item, _, _)| item.len()).sum();
        let other_slot = clustered
            && call
                .channels
                .first()
                .is_some_and(|(first, _)| first.slot != keys.slot);
        if call.items > 0
            && (other_slot
                || call.items + items.len() > MAX_ITEMS_PER_CALL
                || call.bytes + bytes > MAX_BYTES_PER_CALL)
        {
            calls.push(std::mem::take(&mut call));
        }
        call.add(keys, items, bytes);
    }
    if call.items > 0 {
        calls.push(call);
    }
    calls
}

/// What every publish call of this node passes beside its channels.
pub struct CallSettings {
    pub history_size: usize,
    pub history_ttl: Duration,
    pub state_ttl: Duration,
    pub history_channel_bytes: usize,
    /// --max-keys-per-channel (0: no latest values kept).
    pub max_keys: usize,
    /// SPUBLISH on a cluster, PUBLISH otherwise.
    pub sharded: bool,
}

/// A call laid out for the publish script, and who waits for each
/// publication: per channel, per item, (shard, token).
pub struct ScriptCall {
    pub keys: Vec<String>,
    pub args: Vec<Value>,
    pub waiters: Vec<Vec<(usize, u32)>>,
}

/// Lays out `call` as the publish script reads it (see `scripts::PUBLISH`);
/// `epoch` names the epoch a channel starts if its counter restarts.
pub fn script_call(call: Call, settings: &CallSettings, epoch: String) -> ScriptCall {
    let mut args: Vec<Value> = Vec::with_capacity(7 + 2 * call.channels.len() + call.items);
    args.push(Value::Integer(settings.history_size as i64));
    args.push(Value::Integer(settings.history_ttl.as_millis() as i64));
    args.push(Value::Integer(settings.state_ttl.as_millis() as i64));
    args.push(Value::from(epoch));
    args.push(Value::from(if settings.sharded {
        "SPUBLISH"
    } else {
        "PUBLISH"
    }));
    args.push(Value::Integer(settings.history_channel_bytes as i64));
    args.push(Value::Integer(settings.max_keys as i64));
    let mut keys: Vec<String> = Vec::with_capacity(5 * call.channels.len());
    let mut waiters = Vec::with_capacity(call.channels.len());
    for (k, items) in call.channels {
        keys.push(k.seq.clone());
        keys.push(k.epoch.clone());
        keys.push(k.hist.clone());
        keys.push(k.latest.clone());
        keys.push(k.keys.clone());
        args.push(Value::from(k.pubsub.clone()));
        args.push(Value::Integer(items.len() as i64));
        let mut acks = Vec::with_capacity(items.len());
        for (item, from, token) in items {
            args.push(Value::Bytes(Bytes::from(item)));
            acks.push((from, token));
        }
        waiters.push(acks);
    }
    ScriptCall {
        keys,
        args,
        waiters,
    }
}

/// The first seq of each channel of a publish call.
pub fn publish_reply(value: Value, channels: usize) -> Option<Vec<u64>> {
    let Value::Array(parts) = value else {
        return None;
    };
    if parts.len() != 2 * channels {
        return None;
    }
    parts
        .chunks(2)
        .map(|pair| pair[1].as_u64())
        .collect::<Option<Vec<u64>>>()
}

/// The fetch script's reply: epoch, seq, the number of history entries,
/// then seq, item and age in milliseconds per history entry, then per
/// latest value when `latest` was asked for.
pub fn fetch_reply(value: Value, latest: bool) -> Option<FetchReply> {
    let Value::Array(parts) = value else {
        return None;
    };
    let mut parts = parts.into_iter();
    let epoch = parts.next()?.as_string()?;
    let seq = parts.next()?.as_u64()?;
    let in_history = parts.next()?.as_u64()? as usize;
    let mut entries = Vec::new();
    let mut values = Vec::new();
    while let Some(seq) = parts.next() {
        let seq = seq.as_u64()?;
        let item = match parts.next()? {
            Value::Bytes(b) => b,
            Value::String(s) => s.into_inner(),
            _ => return None,
        };
        let age = Duration::from_millis(parts.next()?.as_u64()?);
        let entry = FetchedEntry { seq, item, age };
        if entries.len() < in_history {
            entries.push(entry);
        } else {
            values.push(entry);
        }
    }
    if entries.len() < in_history {
        return None;
    }
    values.sort_unstable_by_key(|v| v.seq);
    Some(FetchReply {
        epoch,
        seq,
        entries,
        latest: latest.then_some(values),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(channel: &str) -> Arc<ChannelKeys> {
        Arc::new(ChannelKeys::new("rc:", channel))
    }

    fn items(n: usize, bytes: usize, token: u32) -> Vec<PendingPublish> {
        (0..n)
            .map(|i| (vec![b'j'; bytes], 0, token + i as u32))
            .collect()
    }

    fn tokens(call: &Call) -> Vec<u32> {
        call.channels
            .iter()
            .flat_map(|(_, items)| items.iter().map(|(_, _, t)| *t))
            .collect()
    }

    #[test]
    fn publications_are_grouped_by_channel_in_arrival_order() {
        let mut grouped = Grouped::default();
        for (channel, token) in [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)] {
            grouped.push(channel.into(), (Vec::new(), 0, token));
        }
        let channels: Vec<(String, Vec<u32>)> = grouped
            .into_channels()
            .into_iter()
            .map(|(c, items)| (c.to_string(), items.iter().map(|i| i.2).collect()))
            .collect();
        assert_eq!(
            channels,
            [
                ("a".into(), vec![1, 3]),
                ("b".into(), vec![2, 5]),
                ("c".into(), vec![4])
            ]
        );
    }

    #[test]
    fn calls_are_cut_by_items_and_bytes_and_keep_a_channel_whole() {
        let publishes = vec![
            (keys("a"), items(3000, 10, 0)),
            (keys("b"), items(2000, 10, 10_000)),
            (keys("c"), items(1, MAX_BYTES_PER_CALL, 20_000)),
            (keys("d"), items(5000, 1, 30_000)),
        ];
        let calls = cut_into_calls(publishes, false);
        let sizes: Vec<(usize, usize)> =
            calls.iter().map(|c| (c.channels.len(), c.items)).collect();
        assert_eq!(sizes, [(1, 3000), (1, 2000), (1, 1), (1, 5000)]);
        assert!(
            tokens(&calls[3]).windows(2).all(|w| w[1] == w[0] + 1),
            "a channel over the cap goes whole, in order"
        );
        let small = cut_into_calls(
            vec![(keys("a"), items(2, 1, 0)), (keys("b"), items(2, 1, 9))],
            false,
        );
        assert_eq!(small.len(), 1, "small channels share a call");
        assert_eq!(tokens(&small[0]), [0, 1, 9, 10]);
    }

    #[test]
    fn on_a_cluster_a_call_holds_one_slot() {
        let names: Vec<String> = (0..40).map(|i| format!("ch{i}")).collect();
        let publishes = names.iter().map(|n| (keys(n), items(1, 1, 0))).collect();
        let calls = cut_into_calls(publishes, true);
        for call in &calls {
            let slot = call.channels[0].0.slot;
            assert!(call.channels.iter().all(|(k, _)| k.slot == slot));
        }
        let mut slots: Vec<u16> = calls.iter().map(|c| c.channels[0].0.slot).collect();
        let before = slots.len();
        slots.dedup();
        assert_eq!(slots.len(), before, "one call per slot, in slot order");
    }

    #[test]
    fn a_call_is_laid_out_as_the_script_reads_it() {
        let mut call = Call::default();
        call.add(
            keys("a"),
            vec![(b"j1".to_vec(), 2, 7), (b"j2".to_vec(), 3, 8)],
            4,
        );
        let settings = CallSettings {
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            state_ttl: Duration::from_secs(86_400),
            history_channel_bytes: 1 << 20,
            max_keys: 10,
            sharded: false,
        };
        let laid = script_call(call, &settings, "e-".into());
        let k = keys("a");
        assert_eq!(
            laid.keys,
            [
                k.seq.clone(),
                k.epoch.clone(),
                k.hist.clone(),
                k.latest.clone(),
                k.keys.clone()
            ]
        );
        assert_eq!(laid.args.len(), 7 + 2 + 2);
        assert_eq!(laid.args[0].as_u64(), Some(100));
        assert_eq!(laid.args[1].as_u64(), Some(300_000));
        assert_eq!(laid.args[4].as_string().as_deref(), Some("PUBLISH"));
        assert_eq!(laid.args[6].as_u64(), Some(10));
        assert_eq!(laid.args[7].as_string(), Some(k.pubsub.clone()));
        assert_eq!(laid.args[8].as_u64(), Some(2));
        assert_eq!(laid.waiters, [vec![(2, 7), (3, 8)]]);
    }

    #[test]
    fn replies_are_read_or_refused_whole() {
        let ok = Value::Array(vec!["a".into(), 5.into(), "b".into(), 9.into()]);
        assert_eq!(publish_reply(ok, 2), Some(vec![5, 9]));
        let short = Value::Array(vec!["a".into(), 5.into()]);
        assert_eq!(publish_reply(short, 2), None);
        let fetch = Value::Array(vec![
            "ep".into(),
            12.into(),
            1.into(),
            11.into(),
            Value::Bytes(Bytes::from_static(b"j1")),
            1500.into(),
            12.into(),
            Value::Bytes(Bytes::from_static(b"K1\naj2")),
            10.into(),
            9.into(),
            Value::Bytes(Bytes::from_static(b"K1\nbj3")),
            20.into(),
        ]);
        let reply = fetch_reply(fetch.clone(), true).expect("a reply");
        assert_eq!((reply.epoch.as_str(), reply.seq), ("ep", 12));
        assert_eq!(reply.entries.len(), 1);
        assert_eq!(reply.entries[0].seq, 11);
        assert_eq!(reply.entries[0].age, Duration::from_millis(1500));
        let latest = reply.latest.expect("latest values");
        assert_eq!(latest.iter().map(|v| v.seq).collect::<Vec<_>>(), [9, 12]);
        assert!(fetch_reply(fetch, false).unwrap().latest.is_none());
        let truncated = Value::Array(vec!["ep".into(), 12.into(), 1.into(), 11.into()]);
        assert!(fetch_reply(truncated, false).is_none());
        let missing = Value::Array(vec!["ep".into(), 12.into(), 2.into()]);
        assert!(fetch_reply(missing, false).is_none());
    }
}
