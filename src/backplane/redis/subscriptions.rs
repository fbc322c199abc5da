//! Which channels the node is subscribed to on Redis, and when a
//! subscription is proven live, without I/O.
//!
//! Channels are subscribed in batches of bounded size. fred resolves a
//! SUBSCRIBE when it is written, not when Redis answers, so each batch's
//! classic SUBSCRIBE ends with a fresh *fence* channel that the node then
//! publishes to: the fence coming back proves Redis processed the whole
//! command. On a cluster each channel also needs its SSUBSCRIBE, whose reply
//! fred does await (one command per channel: a multi-channel SSUBSCRIBE
//! gets one reply per channel and fred would pair the extra replies with
//! later commands). A batch is proven when its fence is back and every
//! SSUBSCRIBE answered; only then do the owners hear their channels are
//! live, and only for the subscription (join) they asked for.
//!
//! After a (re)connect everything is resubscribed (a *resync*), the
//! link's probes with it; the node is synced again once every resync batch
//! is proven. A resync forgets older batches, so late answers about them
//! find nothing.

use std::collections::HashMap;
use std::sync::Arc;

/// Most channels in one SUBSCRIBE / UNSUBSCRIBE command.
pub const MAX_CHANNELS_PER_COMMAND: usize = 1024;

struct Batch {
    channels: Vec<(Arc<str>, u64)>,
    /// Part of the resubscription after a (re)connect.
    resync: bool,
    fence: String,
    fence_pending: bool,
    shard_pending: usize,
}

/// Subscribe commands to issue for one batch.
#[derive(Debug, PartialEq, Eq)]
pub struct Planned {
    pub id: u64,
    /// For one classic SUBSCRIBE, the fence last.
    pub classic: Vec<String>,
    /// One SSUBSCRIBE each (on a cluster).
    pub sharded: Vec<String>,
    pub fence: String,
}

/// A batch just proven live.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Proven {
    /// Channels whose owners may now fetch, with their join.
    pub live: Vec<(Arc<str>, u64)>,
    /// The last batch of a resync: the node is synced again.
    pub resync_done: bool,
}

/// A probe channel: its name, and whether it is sharded (SSUBSCRIBE).
pub type ProbeName<'a> = (&'a str, bool);

pub struct Subscriptions {
    /// Prefix of every pub/sub channel name (`--redis-prefix`).
    prefix: String,
    /// Fence names are this plus the batch id.
    fence_prefix: String,
    clustered: bool,
    /// Channels the node wants, with the owner's join id of each.
    desired: HashMap<Arc<str>, u64>,
    batches: HashMap<u64, Batch>,
    batch_counter: u64,
    /// SSUBSCRIBEs that failed, reissued on the next tick.
    shard_retry: Vec<(u64, String)>,
    resync_batches_left: usize,
}

impl Subscriptions {
    pub fn new(prefix: &str, fence_prefix: String, clustered: bool) -> Subscriptions {
        Subscriptions {
            prefix: prefix.to_string(),
            fence_prefix,
            clustered,
            desired: HashMap::new(),
            batches: HashMap::new(),
            batch_counter: 0,
            shard_retry: Vec::new(),
            resync_batches_left: 0,
        }
    }

    /// The owner wants `channel`, as its subscription `join`.
    pub fn want(&mut self, channel: Arc<str>, join: u64) {
        self.desired.insert(channel, join);
    }

    /// No shard wants `channel` any more.
    pub fn forget(&mut self, channel: &str) {
        self.desired.remove(channel);
    }

    pub fn wants(&self, channel: &str) -> bool {
        self.desired.contains_key(channel)
    }

    /// The node's name for a wanted channel (`channel` without the prefix).
    pub fn wanted(&self, channel: &str) -> Option<&Arc<str>> {
        self.desired.get_key_value(channel).map(|(c, _)| c)
    }

    pub fn len(&self) -> usize {
        self.desired.len()
    }

    /// Every wanted channel with its join.
    pub fn all(&self) -> impl Iterator<Item = (&Arc<str>, u64)> {
        self.desired.iter().map(|(c, j)| (c, *j))
    }

    /// The pub/sub name of `channel`.
    pub fn name(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }

    /// Of the channels subscribed to in one turn, those still wanted, once
    /// each, with their join.
    pub fn still_wanted(&self, mut channels: Vec<Arc<str>>) -> Vec<(Arc<str>, u64)> {
        channels.retain(|c| self.desired.contains_key(c));
        channels.sort_unstable();
        channels.dedup();
        channels
            .into_iter()
            .map(|c| {
                let join = self.desired[&c];
                (c, join)
            })
            .collect()
    }

    /// Of the channels unsubscribed in one turn, the pub/sub names of
    /// those still unwanted, once each.
    pub fn still_unwanted(&self, mut channels: Vec<Arc<str>>) -> Vec<String> {
        channels.retain(|c| !self.desired.contains_key(c));
        channels.sort_unstable();
        channels.dedup();
        channels.iter().map(|c| self.name(c)).collect()
    }

    /// Plans the batches that subscribe `channels`; a resync batch also
    /// carries every probe (and one is planned even with no channel).
    pub fn plan(
        &mut self,
        channels: Vec<(Arc<str>, u64)>,
        resync: bool,
        probes: &[ProbeName<'_>],
    ) -> Vec<Planned> {
        let mut planned = Vec::new();
        let mut rest = channels;
        loop {
            let tail = rest.split_off(rest.len().min(MAX_CHANNELS_PER_COMMAND));
            let chunk = std::mem::replace(&mut rest, tail);
            self.batch_counter += 1;
            let id = self.batch_counter;
            let fence = format!("{}{id}", self.fence_prefix);
            let names: Vec<String> = chunk.iter().map(|(c, _)| self.name(c)).collect();
            let mut classic = names.clone();
            let mut sharded = if self.clustered { names } else { Vec::new() };
            if resync {
                for (probe, is_sharded) in probes {
                    if *is_sharded {
                        sharded.push(probe.to_string());
                    } else {
                        classic.push(probe.to_string());
                    }
                }
                self.resync_batches_left += 1;
            }
            classic.push(fence.clone());
            self.batches.insert(
                id,
                Batch {
                    channels: chunk,
                    resync,
                    fence: fence.clone(),
                    fence_pending: true,
                    shard_pending: sharded.len(),
                },
            );
            planned.push(Planned {
                id,
                classic,
                sharded,
                fence,
            });
            if rest.is_empty() {
                return planned;
            }
        }
    }

    /// Starts a resync: forgets every batch in flight and returns every
    /// wanted channel, to be planned again with `resync`.
    pub fn begin_resync(&mut self) -> Vec<(Arc<str>, u64)> {
        self.batches.clear();
        self.shard_retry.clear();
        self.resync_batches_left = 0;
        self.desired.iter().map(|(c, j)| (c.clone(), *j)).collect()
    }

    /// The batch id if `name` is one of this node's fences.
    pub fn fence_id(&self, name: &str) -> Option<u64> {
        name.strip_prefix(self.fence_prefix.as_str())
            .and_then(|id| id.parse::<u64>().ok())
    }

    /// Fence `id` came back.
    pub fn fence_back(&mut self, id: u64) -> Option<Proven> {
        self.batches.get_mut(&id)?.fence_pending = false;
        self.complete_if_proven(id)
    }

    /// The SSUBSCRIBE of `channel` in `batch` answered (`ok`) or failed (it
    /// is retried on the next tick).
    pub fn shard_subscribed(&mut self, batch: u64, channel: String, ok: bool) -> Option<Proven> {
        let b = self.batches.get_mut(&batch)?;
        if !ok {
            self.shard_retry.push((batch, channel));
            return None;
        }
        b.shard_pending -= 1;
        self.complete_if_proven(batch)
    }

    /// The failed SSUBSCRIBEs of batches still in flight, to reissue.
    pub fn take_shard_retries(&mut self) -> Vec<(u64, String)> {
        let mut retries = std::mem::take(&mut self.shard_retry);
        retries.retain(|(batch, _)| self.batches.contains_key(batch));
        retries
    }

    /// Fences not seen yet, to publish again (the first publish may have
    /// overtaken its SUBSCRIBE, which travels on the other connection).
    pub fn unproven_fences(&self) -> Vec<String> {
        self.batches
            .values()
            .filter(|b| b.fence_pending)
            .map(|b| b.fence.clone())
            .collect()
    }

    fn complete_if_proven(&mut self, id: u64) -> Option<Proven> {
        let batch = self.batches.get(&id)?;
        if batch.fence_pending || batch.shard_pending > 0 {
            return None;
        }
        let batch = self.batches.remove(&id)?;
        let live = batch
            .channels
            .into_iter()
            .filter(|(channel, join)| self.desired.get(channel) == Some(join))
            .collect();
        let mut resync_done = false;
        if batch.resync {
            self.resync_batches_left -= 1;
            resync_done = self.resync_batches_left == 0;
        }
        Some(Proven { live, resync_done })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs(clustered: bool) -> Subscriptions {
        Subscriptions::new("rc:", "rc:$fence:n:".into(), clustered)
    }

    fn chans(names: &[&str], join: u64) -> Vec<(Arc<str>, u64)> {
        names.iter().map(|n| (Arc::from(*n), join)).collect()
    }

    #[test]
    fn a_batch_is_live_once_its_fence_is_back_and_only_for_the_join_asked() {
        let mut s = subs(false);
        s.want("a".into(), 1);
        s.want("b".into(), 2);
        let planned = s.plan(
            chans(&["a"], 1)
                .into_iter()
                .chain(chans(&["b"], 2))
                .collect(),
            false,
            &[],
        );
        assert_eq!(planned.len(), 1);
        let p = &planned[0];
        assert_eq!(p.classic, ["rc:a", "rc:b", p.fence.as_str()]);
        assert!(p.sharded.is_empty());
        // b is dropped and wanted again (a new join) before the proof.
        s.forget("b");
        s.want("b".into(), 3);
        assert_eq!(s.fence_id(&p.fence), Some(p.id));
        assert_eq!(s.fence_id("rc:$fence:other:1"), None);
        let proven = s.fence_back(p.id).expect("proven");
        assert_eq!(
            proven.live,
            chans(&["a"], 1),
            "b's owner waits for its own join"
        );
        assert!(!proven.resync_done);
        assert_eq!(s.fence_back(p.id), None, "proven once");
    }

    #[test]
    fn on_a_cluster_every_ssubscribe_must_answer_and_failures_are_retried() {
        let mut s = subs(true);
        s.want("a".into(), 1);
        s.want("b".into(), 1);
        let planned = s.plan(chans(&["a", "b"], 1), false, &[]);
        let p = &planned[0];
        assert_eq!(p.sharded, ["rc:a", "rc:b"]);
        assert_eq!(s.fence_back(p.id), None, "SSUBSCRIBEs still pending");
        assert_eq!(s.shard_subscribed(p.id, "rc:a".into(), true), None);
        assert_eq!(s.shard_subscribed(p.id, "rc:b".into(), false), None);
        assert_eq!(s.take_shard_retries(), [(p.id, "rc:b".to_string())]);
        let proven = s
            .shard_subscribed(p.id, "rc:b".into(), true)
            .expect("proven");
        assert_eq!(proven.live.len(), 2);
    }

    #[test]
    fn a_resync_forgets_older_batches_and_ends_when_all_of_its_own_are_proven() {
        let mut s = subs(false);
        let names: Vec<String> = (0..MAX_CHANNELS_PER_COMMAND + 1)
            .map(|i| format!("c{i}"))
            .collect();
        for n in &names {
            s.want(n.as_str().into(), 1);
        }
        let old = s.plan(chans(&["c0"], 1), false, &[]);
        let channels = s.begin_resync();
        assert_eq!(channels.len(), names.len());
        let planned = s.plan(channels, true, &[("rc:$probe:n", false)]);
        assert_eq!(
            planned.len(),
            2,
            "cut at {MAX_CHANNELS_PER_COMMAND} channels"
        );
        assert!(planned
            .iter()
            .all(|p| p.classic.contains(&"rc:$probe:n".to_string())));
        assert_eq!(
            s.fence_back(old[0].id),
            None,
            "a batch from before the resync"
        );
        assert_eq!(s.unproven_fences().len(), 2);
        let first = s.fence_back(planned[0].id).expect("proven");
        assert!(!first.resync_done);
        let last = s.fence_back(planned[1].id).expect("proven");
        assert!(last.resync_done);
        assert_eq!(first.live.len() + last.live.len(), names.len());
        assert!(s.unproven_fences().is_empty());
    }

    #[test]
    fn a_resync_with_nothing_wanted_still_proves_the_probes() {
        let mut s = subs(true);
        let channels = s.begin_resync();
        let planned = s.plan(
            channels,
            true,
            &[("rc:$probe:n", false), ("rc:$probe:n:{a}", true)],
        );
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].sharded, ["rc:$probe:n:{a}"]);
        assert_eq!(s.fence_back(planned[0].id), None);
        let done = s
            .shard_subscribed(planned[0].id, "rc:$probe:n:{a}".into(), true)
            .expect("proven");
        assert!(done.resync_done && done.live.is_empty());
    }

    #[test]
    fn a_turn_subscribes_what_is_still_wanted_and_unsubscribes_what_is_not() {
        let mut s = subs(false);
        s.want("a".into(), 4);
        let turn: Vec<Arc<str>> = vec!["a".into(), "a".into(), "gone".into()];
        assert_eq!(s.still_wanted(turn.clone()), chans(&["a"], 4));
        assert_eq!(s.still_unwanted(turn), ["rc:gone"]);
        assert_eq!(s.wanted("a").map(|c| &**c), Some("a"));
        assert_eq!(s.len(), 1);
    }
}
