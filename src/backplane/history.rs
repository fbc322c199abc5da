//! The recent publications a broker keeps per channel for `since`
//! recovery, and the latest publication of each key for `snapshot`
//! subscribes, bounded per channel ([`Limits`]), and the meter that adds
//! up what every history of a shard holds, so the shard keeps all of them
//! within one budget ([`Budget`], [`evict`]); [`Keeper`] holds all of it
//! for a shard's broker.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Deref;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::broker::{Holdings, Publication, Replay};

/// Bytes counted for a kept publication beside its two encodings: the
/// `Publication` itself, its `Arc` counts and its slot in the deque.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<Publication>() + 16 + 8;
/// Bytes counted for a channel while it keeps any history: its map entry,
/// name, epoch and deque.
pub const CHANNEL_OVERHEAD: usize = 256;

/// What a kept publication is counted as.
pub fn cost(publication: &Publication) -> usize {
    publication.json.len() + publication.msgpack.len() + ENTRY_OVERHEAD
}

/// The bounds of one channel's history.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most publications kept (0: none).
    pub size: usize,
    /// Most bytes kept, counted by [`cost`].
    pub bytes: usize,
    /// Most keys whose latest publication is kept (0: none).
    pub keys: usize,
}

/// What the histories of one shard hold together: bytes (with each
/// channel's [`CHANNEL_OVERHEAD`]) and channels with any history.
#[derive(Debug, Default)]
pub struct Meter {
    bytes: Cell<usize>,
    channels: Cell<usize>,
    /// Latest values kept, and keys forgotten past --max-keys-per-channel
    /// since the last [`Keeper::holdings`].
    latest: Cell<usize>,
    keys_forgotten: Cell<usize>,
}

impl Meter {
    pub fn bytes(&self) -> usize {
        self.bytes.get()
    }

    pub fn channels(&self) -> usize {
        self.channels.get()
    }
}

/// A channel's kept publications, oldest first, seqs consecutive, and the
/// latest publication of each of its keys, counted on the shard's
/// [`Meter`] for as long as they are kept.
#[derive(Debug)]
pub struct History {
    entries: VecDeque<Arc<Publication>>,
    /// Bytes of `entries` (the per-channel limit counts these).
    bytes: usize,
    /// Boxed and only while a key is kept: most channels keep none.
    latest: Option<Box<Latest>>,
    /// Latest values were forgotten for the budget (not by age): a broker
    /// that serves them from a copy must read them again.
    latest_lost: bool,
    meter: Rc<Meter>,
}

/// The latest publication of every key of a channel (keyless ones count as
/// one key), by seq: the first is the key updated least recently.
#[derive(Debug, Default)]
struct Latest {
    by_seq: BTreeMap<u64, Arc<Publication>>,
    seq_of: HashMap<Option<Arc<str>>, u64>,
    bytes: usize,
}

impl Deref for History {
    type Target = VecDeque<Arc<Publication>>;

    fn deref(&self) -> &Self::Target {
        &self.entries
    }
}

impl History {
    pub fn new(meter: Rc<Meter>) -> History {
        History {
            entries: VecDeque::new(),
            bytes: 0,
            latest: None,
            latest_lost: false,
            meter,
        }
    }

    /// The bytes this history's publications are counted for (latest
    /// values aside).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when it keeps neither publications nor latest values.
    pub fn holds_nothing(&self) -> bool {
        self.entries.is_empty() && self.latest.is_none()
    }

    fn counted(&mut self, added: usize, removed: usize, was_empty: bool) {
        self.bytes = self.bytes + added - removed;
        self.metered(added, removed, was_empty);
    }

    /// Adds what changed to the shard's meter; `was_empty`: the history
    /// held nothing before the change.
    fn metered(&mut self, added: usize, removed: usize, was_empty: bool) {
        let meter = &self.meter;
        let mut total = meter.bytes.get() + added - removed;
        match (was_empty, self.holds_nothing()) {
            (true, false) => {
                total += CHANNEL_OVERHEAD;
                meter.channels.set(meter.channels.get() + 1);
            }
            (false, true) => {
                total -= CHANNEL_OVERHEAD;
                meter.channels.set(meter.channels.get() - 1);
            }
            _ => {}
        }
        meter.bytes.set(total);
    }

    pub fn push_back(&mut self, publication: Arc<Publication>) {
        let was_empty = self.holds_nothing();
        let added = cost(&publication);
        self.entries.push_back(publication);
        self.counted(added, 0, was_empty);
    }

    pub fn push_front(&mut self, publication: Arc<Publication>) {
        let was_empty = self.holds_nothing();
        let added = cost(&publication);
        self.entries.push_front(publication);
        self.counted(added, 0, was_empty);
    }

    pub fn pop_front(&mut self) -> Option<Arc<Publication>> {
        let popped = self.entries.pop_front()?;
        self.counted(0, cost(&popped), false);
        Some(popped)
    }

    /// Forgets the publications, and the buffer with them (idle channels
    /// are many); latest values stay.
    pub fn clear(&mut self) {
        let was_empty = self.holds_nothing();
        self.entries = VecDeque::new();
        let removed = self.bytes;
        self.counted(0, removed, was_empty);
    }

    /// Forgets the publications and the latest values.
    pub fn forget_all(&mut self) {
        self.clear();
        self.forget_latest();
    }

    /// Forgets the latest values.
    pub fn forget_latest(&mut self) {
        if let Some(latest) = self.latest.take() {
            self.meter
                .latest
                .set(self.meter.latest.get() - latest.by_seq.len());
            self.metered(0, latest.bytes, false);
        }
    }

    /// Makes `publication` its key's latest value, unless that key has a
    /// later one; past `max_keys` keys, the one updated least recently is
    /// forgotten. Unsequenced publications are not kept.
    pub fn remember_latest(&mut self, publication: &Arc<Publication>, max_keys: usize) {
        let Some(seq) = publication.seq else { return };
        if max_keys == 0 {
            return;
        }
        let was_empty = self.holds_nothing();
        let latest = self.latest.get_or_insert_with(Box::default);
        let (added, mut removed, mut keys) = (cost(publication), 0, 1isize);
        match latest.seq_of.get(&publication.key) {
            Some(&old) if old >= seq => return,
            Some(&old) => {
                if let Some(replaced) = latest.by_seq.remove(&old) {
                    removed += cost(&replaced);
                    keys -= 1;
                }
            }
            None => {}
        }
        latest.seq_of.insert(publication.key.clone(), seq);
        latest.by_seq.insert(seq, publication.clone());
        while latest.by_seq.len() > max_keys {
            let Some((_, oldest)) = latest.by_seq.pop_first() else {
                break;
            };
            latest.seq_of.remove(&oldest.key);
            removed += cost(&oldest);
            keys -= 1;
            self.meter
                .keys_forgotten
                .set(self.meter.keys_forgotten.get() + 1);
        }
        latest.bytes = latest.bytes + added - removed;
        let meter = &self.meter;
        meter
            .latest
            .set((meter.latest.get() as isize + keys) as usize);
        self.metered(added, removed, was_empty);
    }

    /// The latest publication of every key, in seq order.
    pub fn latest_values(&self) -> Vec<Arc<Publication>> {
        self.latest
            .as_ref()
            .map_or_else(Vec::new, |l| l.by_seq.values().cloned().collect())
    }

    /// Replaces the latest values with `values` (a fetched snapshot of
    /// them, in seq order).
    pub fn replace_latest(&mut self, values: &[Arc<Publication>], max_keys: usize) {
        self.forget_latest();
        for value in values {
            self.remember_latest(value, max_keys);
        }
    }

    /// When the newest thing kept was published.
    fn newest_at(&self) -> Option<Instant> {
        let entry = self.entries.back().map(|p| p.at);
        let value = self
            .latest
            .as_ref()
            .and_then(|l| l.by_seq.last_key_value())
            .map(|(_, p)| p.at);
        entry.max(value)
    }

    /// When the oldest publication kept and the oldest latest value were
    /// published.
    fn oldest_times(&self) -> (Option<Instant>, Option<Instant>) {
        let entry = self.entries.front().map(|p| p.at);
        let value = self
            .latest
            .as_ref()
            .and_then(|l| l.by_seq.first_key_value())
            .map(|(_, p)| p.at);
        (entry, value)
    }

    /// When the oldest thing kept (a publication or a latest value) was
    /// published.
    fn oldest_at(&self) -> Option<Instant> {
        match self.oldest_times() {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether latest values were forgotten for the budget since the last
    /// call.
    pub fn take_latest_lost(&mut self) -> bool {
        std::mem::take(&mut self.latest_lost)
    }

    /// Forgets everything for the budget.
    fn evict_all(&mut self) {
        self.latest_lost |= self.latest.is_some();
        self.forget_all();
    }

    /// Forgets the oldest thing kept, for the budget; false when there was
    /// nothing.
    fn pop_oldest(&mut self) -> bool {
        match self.oldest_times() {
            (Some(a), Some(b)) if b < a => {
                self.latest_lost = true;
                self.pop_oldest_value()
            }
            (Some(_), _) => self.pop_front().is_some(),
            (None, Some(_)) => {
                self.latest_lost = true;
                self.pop_oldest_value()
            }
            (None, None) => false,
        }
    }

    /// Forgets the latest value updated least recently.
    fn pop_oldest_value(&mut self) -> bool {
        let Some(latest) = self.latest.as_mut() else {
            return false;
        };
        let Some((_, oldest)) = latest.by_seq.pop_first() else {
            return false;
        };
        latest.seq_of.remove(&oldest.key);
        let removed = cost(&oldest);
        latest.bytes -= removed;
        if latest.by_seq.is_empty() {
            self.latest = None;
        }
        self.meter.latest.set(self.meter.latest.get() - 1);
        self.metered(0, removed, false);
        true
    }
}

impl Drop for History {
    fn drop(&mut self) {
        self.forget_all();
    }
}

/// One shard's share of the node's history budget.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub bytes: usize,
    pub channels: usize,
}

impl Budget {
    pub fn share(history: &crate::config::HistoryOptions, shards: usize) -> Budget {
        Budget {
            bytes: history.memory / shards,
            channels: (history.channels / shards).max(1),
        }
    }

    pub fn exceeded_by(&self, meter: &Meter) -> bool {
        meter.bytes() > self.bytes || meter.channels() > self.channels
    }
}

/// What a shard's broker keeps, whatever the backplane: the meter of its
/// histories, their per-channel limits and TTL, its share of the node's
/// budget, and what it forgot to stay within it since it last said.
pub struct Keeper {
    pub meter: Rc<Meter>,
    pub limits: Limits,
    pub ttl: Duration,
    budget: Budget,
    evicted: usize,
}

impl Keeper {
    pub fn new(history: &crate::config::HistoryOptions, shards: usize) -> Keeper {
        Keeper {
            meter: Rc::default(),
            limits: Limits {
                size: history.size,
                bytes: history.channel_bytes,
                keys: history.keys,
            },
            ttl: history.ttl,
            budget: Budget::share(history, shards),
            evicted: 0,
        }
    }

    /// When the budget is exceeded, brings the histories `all` lists back
    /// within it (see [`evict`]); true when it did.
    pub fn enforce<'a>(&mut self, all: impl FnOnce() -> Vec<&'a mut History>) -> bool {
        if !self.budget.exceeded_by(&self.meter) {
            return false;
        }
        self.evicted += evict(&mut all(), &self.meter, self.budget);
        true
    }

    /// What is kept in `channels` channels holding `messages`, and what was
    /// evicted since the last call.
    pub fn holdings(&mut self, channels: usize, messages: usize) -> Holdings {
        Holdings {
            channels,
            messages,
            bytes: self.meter.bytes(),
            evicted: std::mem::take(&mut self.evicted),
            latest: self.meter.latest.get(),
            keys_forgotten: self.meter.keys_forgotten.replace(0),
        }
    }
}

/// Brings the histories metered by `meter` back under 7/8 of `budget` (so
/// that a budget reached by a flood is not enforced again at every
/// publication): first, past the channel cap, the whole histories of the
/// channels published to least recently; then, past the byte budget, the
/// oldest publications of the shard, whichever channel they belong to.
/// Returns how many publications were forgotten.
pub fn evict(histories: &mut [&mut History], meter: &Meter, budget: Budget) -> usize {
    use std::cmp::Reverse;
    let channels_goal = budget.channels - budget.channels / 8;
    let bytes_goal = budget.bytes - budget.bytes / 8;
    let mut forgotten = 0;
    if meter.channels() > channels_goal {
        let mut order: Vec<(Instant, usize)> = histories
            .iter()
            .enumerate()
            .filter_map(|(i, h)| Some((h.newest_at()?, i)))
            .collect();
        order.sort_unstable();
        for (_, i) in order {
            if meter.channels() <= channels_goal {
                break;
            }
            forgotten += histories[i].len();
            histories[i].evict_all();
        }
    }
    if meter.bytes() > bytes_goal {
        let mut oldest: std::collections::BinaryHeap<Reverse<(Instant, usize)>> = histories
            .iter()
            .enumerate()
            .filter_map(|(i, h)| Some(Reverse((h.oldest_at()?, i))))
            .collect();
        while meter.bytes() > bytes_goal {
            let Some(Reverse((_, i))) = oldest.pop() else {
                break;
            };
            histories[i].pop_oldest();
            forgotten += 1;
            if let Some(next) = histories[i].oldest_at() {
                oldest.push(Reverse((next, i)));
            }
        }
    }
    forgotten
}

/// Appends to a bounded history, dropping the oldest past `limits`. A
/// publication larger than the byte limit cannot be kept, and since kept
/// seqs must be consecutive, the history is emptied instead.
pub fn remember(history: &mut History, publication: &Arc<Publication>, limits: Limits) {
    history.remember_latest(publication, limits.keys);
    if limits.size == 0 {
        return;
    }
    if cost(publication) > limits.bytes {
        return history.clear();
    }
    history.push_back(publication.clone());
    while history.len() > limits.size || history.bytes() > limits.bytes {
        history.pop_front();
    }
}

/// Forgets publications and latest values older than `ttl` (and the
/// buffer, once empty).
pub fn expire(history: &mut History, now: Instant, ttl: Duration) {
    while history
        .front()
        .is_some_and(|p| now.saturating_duration_since(p.at) > ttl)
    {
        history.pop_front();
    }
    while history
        .latest
        .as_ref()
        .and_then(|l| l.by_seq.first_key_value())
        .is_some_and(|(_, p)| now.saturating_duration_since(p.at) > ttl)
    {
        history.pop_oldest_value();
    }
    if history.is_empty() && history.entries.capacity() > 0 {
        history.clear();
    }
}

/// What a subscriber that last saw `since` (in `epoch`) missed, from kept
/// publications `older` followed by `recent` (together consecutive, ending
/// at `seq` of epoch `current`), if they hold all of it.
pub fn replay_from(
    older: &[Arc<Publication>],
    recent: &VecDeque<Arc<Publication>>,
    since: u64,
    epoch: Option<&str>,
    current: &str,
    seq: u64,
) -> Replay {
    if epoch.is_some_and(|e| e != current) || since > seq {
        return Replay::NotRecovered;
    }
    if since == seq {
        return Replay::Recovered(Vec::new());
    }
    let kept = older.iter().chain(recent.iter());
    let first = older.first().or(recent.front()).and_then(|p| p.seq);
    let last = recent.back().or(older.last()).and_then(|p| p.seq);
    match (first, last) {
        (Some(first), Some(last)) if first <= since + 1 && last == seq => Replay::Recovered(
            kept.filter(|p| p.seq.is_some_and(|s| s > since))
                .cloned()
                .collect(),
        ),
        _ => Replay::NotRecovered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(seq: u64, at: Instant, bytes: usize) -> Arc<Publication> {
        Publication::sized(seq, at, bytes)
    }

    #[test]
    fn the_meter_counts_every_history_until_it_is_dropped() {
        let meter = Rc::new(Meter::default());
        let now = Instant::now();
        let mut a = History::new(meter.clone());
        let mut b = History::new(meter.clone());
        a.push_back(sized(1, now, 10));
        a.push_back(sized(2, now, 20));
        b.push_front(sized(5, now, 30));
        let held = cost(&sized(0, now, 60)) + 2 * ENTRY_OVERHEAD + 2 * CHANNEL_OVERHEAD;
        assert_eq!(meter.bytes(), held);
        assert_eq!(meter.channels(), 2);
        a.pop_front();
        drop(b);
        assert_eq!(meter.bytes(), a.bytes() + CHANNEL_OVERHEAD);
        assert_eq!(meter.channels(), 1);
        a.clear();
        assert_eq!((meter.bytes(), meter.channels()), (0, 0));
    }

    #[test]
    fn past_the_byte_budget_the_oldest_publications_of_the_shard_go_first() {
        let meter = Rc::new(Meter::default());
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_millis(s);
        let mut a = History::new(meter.clone());
        let mut b = History::new(meter.clone());
        // Interleaved in time: a has 1, 3, 5, 7; b has 2, 4, 6, 8.
        for s in 1..=8 {
            let h = if s % 2 == 1 { &mut a } else { &mut b };
            h.push_back(sized(s, at(s), 1000));
        }
        let one = cost(&sized(0, t0, 1000));
        let budget = Budget {
            bytes: 4 * one + 2 * CHANNEL_OVERHEAD,
            channels: 10,
        };
        assert!(budget.exceeded_by(&meter));
        let forgotten = evict(&mut [&mut a, &mut b], &meter, budget);
        // 7/8 of the budget leaves room for 3 publications: 6, 7, 8.
        assert_eq!(forgotten, 5);
        assert_eq!(
            a.iter().map(|p| p.seq.unwrap()).collect::<Vec<_>>(),
            vec![7]
        );
        assert_eq!(
            b.iter().map(|p| p.seq.unwrap()).collect::<Vec<_>>(),
            vec![6, 8]
        );
        assert!(!budget.exceeded_by(&meter));
    }

    #[test]
    fn past_the_channel_cap_the_least_recently_published_channels_go() {
        let meter = Rc::new(Meter::default());
        let t0 = Instant::now();
        let mut histories: Vec<History> = (0..10).map(|_| History::new(meter.clone())).collect();
        for (i, h) in histories.iter_mut().enumerate() {
            // Channel i was last published to at i ms, channel 0 longest ago.
            h.push_back(sized(1, t0, 10));
            h.push_back(sized(2, t0 + Duration::from_millis(i as u64), 10));
        }
        let budget = Budget {
            bytes: usize::MAX,
            channels: 8,
        };
        assert!(budget.exceeded_by(&meter));
        let mut refs: Vec<&mut History> = histories.iter_mut().collect();
        assert_eq!(evict(&mut refs, &meter, budget), 6);
        assert_eq!(meter.channels(), 7);
        let emptied: Vec<usize> = (0..10).filter(|&i| histories[i].is_empty()).collect();
        assert_eq!(emptied, vec![0, 1, 2]);
    }
}
