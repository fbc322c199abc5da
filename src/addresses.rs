//! Per client address limits, shared by every shard of the node: how many
//! connections one address holds open, and how many it opened this second.
//! An address is an IPv4 address or an IPv6 /64 (one subscriber's
//! allocation); addresses in `--address-limits-exempt` (loopback by
//! default) are not counted. The table is split into independently locked
//! parts, touched once when a socket is accepted and once when it closes,
//! never per message. The time is passed in.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// An address as the limits count it (0: not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct AddressKey(u64);

impl AddressKey {
    /// The key of `ip`: an IPv4 address (also when mapped into IPv6) or
    /// an IPv6 /64.
    pub fn of(ip: IpAddr) -> AddressKey {
        match ip {
            IpAddr::V4(v4) => AddressKey((0xffff << 32) | u64::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey::of(IpAddr::V4(v4)),
                None => AddressKey((u128::from(v6) >> 64) as u64),
            },
        }
    }

    pub fn is_counted(self) -> bool {
        self.0 != 0
    }
}

/// The limits, from the configuration (by default none).
#[derive(Debug, Clone, Default)]
pub struct AddressLimits {
    /// Most open connections per address (0: no limit).
    pub open: u32,
    /// Most new connections per address per second (0: no limit).
    pub per_second: u32,
    pub exempt: Vec<ipnet::IpNet>,
    /// Peers whose word on the client's address is taken (PROXY protocol
    /// or `X-Forwarded-For`); they are not counted themselves.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// Why an address may not open another connection now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressRefusal {
    TooMany,
    TooFast,
}

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    open: u32,
    /// The second `new` counts.
    second: u64,
    new: u32,
}

/// Parts of the table, each behind its own lock.
const PARTS: usize = 64;

/// Entries a part keeps before it forgets addresses with nothing open
/// and no connection this second (at most 64 × 4096 entries of 24 bytes
/// are idle).
const PRUNE_FROM: usize = 4096;

pub struct Addresses {
    parts: Vec<Mutex<HashMap<AddressKey, Entry>>>,
    limits: AddressLimits,
}

impl Addresses {
    pub fn new(limits: AddressLimits) -> Addresses {
        Addresses {
            parts: (0..PARTS).map(|_| Mutex::default()).collect(),
            limits,
        }
    }

    fn part(&self, key: AddressKey) -> std::sync::MutexGuard<'_, HashMap<AddressKey, Entry>> {
        let i = (key.0.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58) as usize % PARTS;
        // A panic while a part is locked leaves plain counts behind.
        self.parts[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key to count a connection from `ip` under (not counted when
    /// exempt or when no limit is set).
    pub fn key(&self, ip: IpAddr) -> AddressKey {
        let unlimited = self.limits.open == 0 && self.limits.per_second == 0;
        if unlimited || self.limits.exempt.iter().any(|net| net.contains(&ip)) {
            return AddressKey::default();
        }
        AddressKey::of(ip)
    }

    /// Counts a new connection from `key` at `second`, unless the address
    /// is past a limit.
    pub fn open(&self, key: AddressKey, second: u64) -> Result<(), AddressRefusal> {
        if !key.is_counted() {
            return Ok(());
        }
        let mut part = self.part(key);
        if part.len() >= PRUNE_FROM {
            part.retain(|_, e| e.open > 0 || e.second == second);
        }
        let entry = part.entry(key).or_default();
        if entry.second != second {
            entry.second = second;
            entry.new = 0;
        }
        let limits = &self.limits;
        if limits.open > 0 && entry.open >= limits.open {
            return Err(AddressRefusal::TooMany);
        }
        if limits.per_second > 0 && entry.new >= limits.per_second {
            return Err(AddressRefusal::TooFast);
        }
        entry.open += 1;
        entry.new += 1;
        Ok(())
    }

    /// A connection counted by [`open`](Self::open) closed.
    pub fn close(&self, key: AddressKey) {
        if !key.is_counted() {
            return;
        }
        // The entry stays, with its count of new connections this second:
        // opening and closing at once must not escape the rate. Entries
        // with nothing open go when their part grows (see `open`).
        if let Some(entry) = self.part(key).get_mut(&key) {
            entry.open = entry.open.saturating_sub(1);
        }
    }

    /// Whether `ip` is a trusted proxy.
    pub fn is_trusted_proxy(&self, ip: IpAddr) -> bool {
        self.limits
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip))
    }

    /// Connections open from `ip` now (for tests and metrics).
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        let key = AddressKey::of(ip);
        self.part(key).get(&key).map_or(0, |e| e.open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(open: u32, per_second: u32) -> Addresses {
        Addresses::new(AddressLimits {
            open,
            per_second,
            exempt: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            trusted_proxies: Vec::new(),
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_is_capped_on_open_connections() {
        let a = limits(2, 0);
        let k = a.key(ip("203.0.113.7"));
        assert_eq!(a.open(k, 1), Ok(()));
        assert_eq!(a.open(k, 1), Ok(()));
        assert_eq!(a.open(k, 2), Err(AddressRefusal::TooMany));
        a.close(k);
        assert_eq!(a.open(k, 3), Ok(()));
        let other = a.key(ip("203.0.113.8"));
        assert_eq!(a.open(other, 3), Ok(()), "another address is not affected");
        assert_eq!(a.open_from(ip("203.0.113.7")), 2);
    }

    #[test]
    fn an_address_is_capped_on_new_connections_per_second() {
        let a = limits(0, 3);
        let k = a.key(ip("198.51.100.1"));
        for _ in 0..3 {
            assert_eq!(a.open(k, 10), Ok(()));
        }
        assert_eq!(a.open(k, 10), Err(AddressRefusal::TooFast));
        for _ in 0..3 {
            a.close(k);
        }
        assert_eq!(
            a.open(k, 10),
            Err(AddressRefusal::TooFast),
            "closing does not give the second's allowance back"
        );
        assert_eq!(a.open(k, 11), Ok(()), "the next second");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let a = limits(1, 0);
        assert_eq!(a.open(a.key(ip("2001:db8:1:2::1")), 0), Ok(()));
        assert_eq!(
            a.open(a.key(ip("2001:db8:1:2:ffff::9")), 0),
            Err(AddressRefusal::TooMany),
            "the same /64"
        );
        assert_eq!(a.open(a.key(ip("2001:db8:1:3::1")), 0), Ok(()));
        assert_eq!(a.open(a.key(ip("192.0.2.1")), 0), Ok(()));
        assert_eq!(
            a.open(a.key(ip("::ffff:192.0.2.1")), 0),
            Err(AddressRefusal::TooMany)
        );
    }

    #[test]
    fn exempt_and_unlimited_addresses_are_not_counted() {
        let a = limits(1, 1);
        for _ in 0..5 {
            assert_eq!(a.open(a.key(ip("127.0.0.5")), 0), Ok(()));
            assert_eq!(a.open(a.key(ip("::1")), 0), Ok(()));
        }
        let off = Addresses::new(AddressLimits {
            open: 0,
            per_second: 0,
            exempt: Vec::new(),
            trusted_proxies: Vec::new(),
        });
        assert!(!off.key(ip("203.0.113.1")).is_counted());
    }
}
