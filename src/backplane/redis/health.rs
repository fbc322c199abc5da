//! Whether the node's Redis link can be trusted, without I/O: the node
//! publishes to probe channels it subscribes to itself, one classic and on
//! a cluster one sharded per primary, every `--redis-probe-interval`. The
//! link is *ready* while it is synced (every wanted channel resubscribed
//! since the last reconnect), both connections are up, and every probe has
//! come back within three intervals since the sync. A pub/sub link whose
//! probes stay silent that long is *deaf*: the link replaces it, at most
//! once per three intervals. The time is always passed in.

use std::time::{Duration, Instant};

struct Probe {
    channel: String,
    sharded: bool,
    /// Sent in the current round and not back yet.
    pending: bool,
    back: Option<Instant>,
}

impl Probe {
    fn new(channel: String, sharded: bool) -> Probe {
        Probe {
            channel,
            sharded,
            pending: false,
            back: None,
        }
    }
}

/// What a tick asks the link to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tick {
    /// Publish a new round of probes.
    pub probe_due: bool,
    /// Probes of the last round that never came back.
    pub late: usize,
    /// The pub/sub link has been silent this long: replace it (the link is
    /// no longer synced).
    pub deaf_for: Option<Duration>,
}

pub struct Health {
    probes: Vec<Probe>,
    interval: Duration,
    round: Option<Instant>,
    synced: bool,
    synced_at: Instant,
    last_forced_reconnect: Option<Instant>,
}

impl Health {
    /// Health with the classic probe `probe`, checked every `interval`.
    pub fn new(probe: String, interval: Duration, now: Instant) -> Health {
        Health {
            probes: vec![Probe::new(probe, false)],
            interval,
            round: None,
            synced: false,
            synced_at: now,
            last_forced_reconnect: None,
        }
    }

    /// The probe channels, and whether each is sharded.
    pub fn probes(&self) -> Vec<(String, bool)> {
        self.probes
            .iter()
            .map(|p| (p.channel.clone(), p.sharded))
            .collect()
    }

    /// Replaces the sharded probes (one per primary, after a topology
    /// change).
    pub fn set_sharded_probes(&mut self, channels: Vec<String>) {
        self.probes.retain(|p| !p.sharded);
        self.probes
            .extend(channels.into_iter().map(|c| Probe::new(c, true)));
    }

    pub fn is_probe(&self, channel: &str) -> bool {
        self.probes.iter().any(|p| p.channel == channel)
    }

    /// Probe `channel` came back; its round trip when it answered the
    /// current round.
    pub fn probe_back(&mut self, channel: &str, now: Instant) -> Option<Duration> {
        let probe = self.probes.iter_mut().find(|p| p.channel == channel)?;
        probe.back = Some(now);
        if !probe.pending {
            return None;
        }
        probe.pending = false;
        self.round.map(|sent| now - sent)
    }

    pub fn set_synced(&mut self, synced: bool, now: Instant) {
        if synced && !self.synced {
            self.synced_at = now;
        }
        self.synced = synced;
    }

    /// Whether the link can be trusted at `now`, with both connections up
    /// or not.
    pub fn ready(&self, now: Instant, connections_up: bool) -> bool {
        let deadline = 3 * self.interval;
        let probes_back = self.probes.iter().all(|p| {
            p.back
                .is_some_and(|t| t >= self.synced_at && now.saturating_duration_since(t) < deadline)
        });
        self.synced && probes_back && connections_up
    }

    /// Starts a round: every probe is pending; returns the channels to
    /// publish to, and whether each is sharded.
    pub fn start_round(&mut self, now: Instant) -> Vec<(String, bool)> {
        self.round = Some(now);
        for probe in &mut self.probes {
            probe.pending = true;
        }
        self.probes()
    }

    /// What is due at `now` (nothing while not synced).
    pub fn tick(&mut self, now: Instant) -> Tick {
        let mut tick = Tick::default();
        if !self.synced {
            return tick;
        }
        if self.round.is_none_or(|sent| now - sent >= self.interval) {
            tick.probe_due = true;
            tick.late = self.probes.iter().filter(|p| p.pending).count();
        }
        let quiet_for = now - self.quiet_since();
        let recently_forced = self
            .last_forced_reconnect
            .is_some_and(|t| now - t < 3 * self.interval);
        if quiet_for > 3 * self.interval && !recently_forced {
            self.last_forced_reconnect = Some(now);
            self.synced = false;
            tick.deaf_for = Some(quiet_for);
        }
        tick
    }

    /// When the quietest probe last came back (since the last sync).
    fn quiet_since(&self) -> Instant {
        self.probes
            .iter()
            .map(|p| p.back.unwrap_or(self.synced_at).max(self.synced_at))
            .min()
            .unwrap_or(self.synced_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn ready_once_synced_and_every_probe_is_back_since() {
        let t0 = Instant::now();
        let mut h = Health::new("p".into(), INTERVAL, t0);
        h.set_sharded_probes(vec!["p{a}".into()]);
        assert!(!h.ready(t0, true), "not synced");
        h.set_synced(true, t0);
        assert!(!h.ready(t0, true), "no probe back yet");
        let sent = h.start_round(t0);
        assert_eq!(sent, [("p".to_string(), false), ("p{a}".to_string(), true)]);
        assert_eq!(h.probe_back("p", t0 + ms(3)), Some(ms(3)));
        assert!(!h.ready(t0 + ms(3), true), "the sharded one is not back");
        assert_eq!(h.probe_back("p{a}", t0 + ms(5)), Some(ms(5)));
        assert!(h.ready(t0 + ms(5), true));
        assert!(!h.ready(t0 + ms(5), false), "a connection is down");
        assert_eq!(h.probe_back("p", t0 + ms(6)), None, "already counted");
        assert!(!h.is_probe("other"));
        assert!(
            !h.ready(t0 + ms(6) + 3 * INTERVAL, true),
            "probes silent for three intervals"
        );
    }

    #[test]
    fn probes_back_before_a_new_sync_do_not_count() {
        let t0 = Instant::now();
        let mut h = Health::new("p".into(), INTERVAL, t0);
        h.set_synced(true, t0);
        h.start_round(t0);
        h.probe_back("p", t0 + ms(1));
        assert!(h.ready(t0 + ms(1), true));
        h.set_synced(false, t0 + ms(10));
        h.set_synced(true, t0 + ms(20));
        assert!(!h.ready(t0 + ms(20), true));
        h.start_round(t0 + ms(20));
        h.probe_back("p", t0 + ms(22));
        assert!(h.ready(t0 + ms(22), true));
    }

    #[test]
    fn a_round_is_due_every_interval_and_counts_the_late() {
        let t0 = Instant::now();
        let mut h = Health::new("p".into(), INTERVAL, t0);
        assert_eq!(h.tick(t0), Tick::default(), "nothing while not synced");
        h.set_synced(true, t0);
        let first = h.tick(t0);
        assert!(first.probe_due && first.late == 0);
        h.start_round(t0);
        assert!(!h.tick(t0 + ms(500)).probe_due);
        let second = h.tick(t0 + INTERVAL);
        assert_eq!(
            (second.probe_due, second.late),
            (true, 1),
            "p never came back"
        );
    }

    #[test]
    fn a_silent_link_is_deaf_after_three_intervals_and_replaced_once() {
        let t0 = Instant::now();
        let mut h = Health::new("p".into(), INTERVAL, t0);
        h.set_synced(true, t0);
        h.start_round(t0);
        h.probe_back("p", t0 + ms(1));
        assert_eq!(
            h.tick(t0 + 3 * INTERVAL).deaf_for,
            None,
            "not past three intervals"
        );
        let deaf = h.tick(t0 + 3 * INTERVAL + ms(2));
        assert_eq!(deaf.deaf_for, Some(3 * INTERVAL + ms(1)));
        assert!(
            !h.ready(t0 + 3 * INTERVAL + ms(2), true),
            "no longer synced"
        );
        // Synced again at once but still silent: not replaced again before
        // three more intervals.
        let t1 = t0 + 3 * INTERVAL + ms(2);
        h.set_synced(true, t1);
        assert_eq!(h.tick(t1 + 3 * INTERVAL - ms(1)).deaf_for, None);
        assert!(h.tick(t1 + 3 * INTERVAL + ms(1)).deaf_for.is_some());
    }
}
