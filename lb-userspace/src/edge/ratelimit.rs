//! Rate limits as token buckets, kept as GCRA (one "theoretical arrival time" a bucket): a
//! request at `now` is allowed when the bucket's time is at most `burst` intervals ahead, and
//! then moves it one interval on. One number a bucket, so the global and per-route buckets are
//! lock-free, and the per-address table is a fixed array: memory stays bounded however many
//! addresses arrive.

use std::{
    hash::{BuildHasher as _, Hasher as _},
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{
    cidr::{Cidr, bits},
    config::{Rate, RateLimits},
};

/// A limit: `rate` requests a second, `burst` more at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Nanoseconds between requests at the steady rate.
    interval: u64,
    /// How far ahead of now a bucket may run: `burst` intervals.
    tolerance: u64,
}

impl Limit {
    /// `None` for a rate of 0 (no limit).
    #[must_use]
    pub fn new(rate: u32, burst: u32) -> Option<Self> {
        (rate > 0).then(|| {
            let interval = 1_000_000_000 / u64::from(rate);
            Self { interval, tolerance: interval * u64::from(burst) }
        })
    }

    /// Requests a second, as configured (for the `RateLimit-Limit` header).
    #[must_use]
    pub const fn rate(&self) -> u64 {
        1_000_000_000 / self.interval
    }

    /// The decision for one request on a bucket at `tat`, at `now`: the bucket's new time, or
    /// how long until a request would pass.
    fn decide(self, tat: u64, now: u64) -> Result<u64, Duration> {
        let tat = tat.max(now);
        if tat - now > self.tolerance {
            return Err(Duration::from_nanos(tat - now - self.tolerance));
        }
        Ok(tat + self.interval)
    }
}

/// One bucket shared by every request it covers (global, or one route).
#[derive(Debug, Default)]
pub struct Bucket {
    tat: AtomicU64,
}

impl Bucket {
    /// Takes a token at `now` (nanoseconds of a monotonic clock), or says how long to wait.
    pub fn take(&self, limit: Limit, now: u64) -> Result<(), Duration> {
        let mut cur = self.tat.load(Ordering::Relaxed);
        loop {
            let next = limit.decide(cur, now)?;
            match self.tat.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }
}

/// Slots in the per-address table: 64 shards of 2048, 32 bytes each (4 MiB).
const SHARDS: usize = 64;
const SLOTS: usize = 2048;

#[derive(Clone, Copy, Default)]
struct Slot {
    /// The address (IPv4 mapped into IPv6). A free slot has time 0, so it passes as refilled
    /// whatever its key.
    key: u128,
    tat: u64,
}

/// Buckets by client address in a fixed table. An address takes one of two slots (by two
/// hashes); when both hold other active addresses, the one idle longest (the lowest time)
/// gives way, so heavy users are the last to be forgotten. A slot whose bucket is full again
/// (its time is past) carries nothing and is free to take.
pub struct PerAddress {
    shards: Box<[Mutex<Box<[Slot]>>]>,
    seed: std::hash::RandomState,
}

impl std::fmt::Debug for PerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerAddress").finish_non_exhaustive()
    }
}

impl Default for PerAddress {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(vec![Slot::default(); SLOTS].into_boxed_slice()))
                .collect(),
            seed: std::hash::RandomState::new(),
        }
    }
}

impl PerAddress {
    /// Takes a token of `ip`'s bucket at `now`, or says how long to wait.
    pub fn take(&self, ip: IpAddr, limit: Limit, now: u64) -> Result<(), Duration> {
        let key = bits(ip);
        let mut h = self.seed.build_hasher();
        h.write_u128(key);
        let hash = h.finish();
        let shard = usize::try_from(hash % SHARDS as u64).unwrap_or(0);
        let (a, b) = (
            usize::try_from((hash >> 8) % SLOTS as u64).unwrap_or(0),
            usize::try_from((hash >> 32) % SLOTS as u64).unwrap_or(0),
        );
        let mut slots = self.shards[shard].lock().unwrap_or_else(PoisonError::into_inner);
        let at = if slots[a].key == key {
            a
        } else if slots[b].key == key {
            b
        } else {
            // A new address: a free or refilled slot, else the one idle longest.
            let pick = if slots[a].tat <= now {
                a
            } else if slots[b].tat <= now || slots[b].tat < slots[a].tat {
                b
            } else {
                a
            };
            slots[pick] = Slot { key, tat: 0 };
            pick
        };
        let next = limit.decide(slots[at].tat, now)?;
        slots[at].tat = next;
        Ok(())
    }

    /// Bytes the table holds, whatever the traffic.
    #[must_use]
    pub const fn bytes() -> usize {
        SHARDS * SLOTS * std::mem::size_of::<Slot>()
    }
}

/// Requests refused, by the limit that refused them.
#[derive(Debug, Default)]
pub struct Counts {
    pub global: AtomicU64,
    pub per_ip: AtomicU64,
    pub route: AtomicU64,
}

/// A service's own limit and its bucket.
pub type RouteLimit = (Limit, Bucket);

/// Why a request was refused: which limit, its rate, and how long until one would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub scope: &'static str,
    pub rate: u64,
    pub wait: Duration,
}

/// The edge's limits of one applied registry.
#[derive(Debug, Default)]
pub struct Limiter {
    global: Option<RouteLimit>,
    per_ip: Option<(Limit, Arc<PerAddress>)>,
    whitelist: Vec<Cidr>,
    pub counts: Arc<Counts>,
}

impl Limiter {
    /// From the registry's `rate_limit:`; `table` gives the per-address table (kept across
    /// reloads by the caller), asked for only when there is a per-address limit.
    #[must_use]
    pub fn new(cfg: &RateLimits, table: impl FnOnce() -> Arc<PerAddress>, counts: Arc<Counts>) -> Self {
        let limit = |r: &Option<Rate>| r.and_then(|r| Limit::new(r.rate, r.burst));
        Self {
            global: limit(&cfg.global).map(|l| (l, Bucket::default())),
            per_ip: limit(&cfg.per_ip).map(|l| (l, table())),
            // Validated with the registry.
            whitelist: cfg.whitelist.iter().filter_map(|c| Cidr::parse(c).ok()).collect(),
            counts,
        }
    }

    /// Whether a request from `ip` to a service limited by `route` may go on at `now`: the
    /// client's own bucket first (an abuser is refused before it drains the shared ones), then
    /// the route's, then the global one. The whitelist exempts from the per-address and global
    /// limits; a route's limit is its backends' capacity and applies to every client.
    pub fn check(&self, ip: IpAddr, route: Option<&RouteLimit>, now: u64) -> Result<(), Refused> {
        if self.global.is_none() && self.per_ip.is_none() && route.is_none() {
            return Ok(());
        }
        let exempt = self.whitelist.iter().any(|c| c.contains(ip));
        if let Some((l, table)) = self.per_ip.as_ref().filter(|_| !exempt) {
            table.take(ip, *l, now).map_err(refused("per_ip", *l, &self.counts.per_ip))?;
        }
        if let Some((l, b)) = route {
            b.take(*l, now).map_err(refused("route", *l, &self.counts.route))?;
        }
        if let Some((l, b)) = self.global.as_ref().filter(|_| !exempt) {
            b.take(*l, now).map_err(refused("global", *l, &self.counts.global))?;
        }
        Ok(())
    }
}

/// Counts a refusal by `limit` and says why.
fn refused(scope: &'static str, limit: Limit, count: &AtomicU64) -> impl FnOnce(Duration) -> Refused {
    move |wait| {
        count.fetch_add(1, Ordering::Relaxed);
        Refused { scope, rate: limit.rate(), wait }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_bucket_allows_the_burst_then_the_rate() {
        // 10/s, burst 5: 6 at once (one on time plus five ahead), then one each 100 ms.
        let l = Limit::new(10, 5).unwrap();
        let b = Bucket::default();
        let t0 = 100 * SEC;
        let passed = (0..20).filter(|_| b.take(l, t0).is_ok()).count();
        assert_eq!(passed, 6);
        let wait = b.take(l, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        assert!(b.take(l, t0 + SEC / 10).is_ok());
        assert!(b.take(l, t0 + SEC / 10).is_err());
        // A second later, 10 more have come.
        let later = (0..20).filter(|_| b.take(l, t0 + SEC + SEC / 10).is_ok()).count();
        assert_eq!(later, 6, "refilled to the burst, not past it");
        assert!(Limit::new(0, 5).is_none());
    }

    #[test]
    fn addresses_have_their_own_buckets_in_a_bounded_table() {
        let l = Limit::new(1, 2).unwrap();
        let t = PerAddress::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let now = 5 * SEC;
        assert_eq!((0..10).filter(|_| t.take(a, l, now).is_ok()).count(), 3);
        assert_eq!((0..10).filter(|_| t.take(b, l, now).is_ok()).count(), 3, "b is not a's");
        // 100 heavy users exhaust their buckets, then a million addresses send one request
        // each: the table does not grow, and the light users give way first.
        let heavy: Vec<IpAddr> =
            (0..100u32).map(|i| IpAddr::V4(std::net::Ipv4Addr::from(0x0a01_0000 + i))).collect();
        for ip in &heavy {
            while t.take(*ip, l, now).is_ok() {}
        }
        for i in 0..1_000_000u32 {
            let _ = t.take(IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i)), l, now);
        }
        assert_eq!(PerAddress::bytes(), 64 * 2048 * 32);
        let still = heavy.iter().filter(|ip| t.take(**ip, l, now).is_err()).count();
        assert!(still >= 95, "heavy users still limited after the churn: {still} of 100");
        assert!(t.take(a, l, now + 10 * SEC).is_ok(), "refilled after 10 s");
    }

    #[test]
    fn a_client_is_refused_by_its_own_limit_before_shared_ones_and_whitelists_pass() {
        let cfg = RateLimits {
            global: Some(Rate { rate: 100, burst: 3 }),
            per_ip: Some(Rate { rate: 1, burst: 1 }),
            whitelist: vec!["10.0.0.0/8".into()],
        };
        let l = Limiter::new(&cfg, || Arc::new(PerAddress::default()), Arc::default());
        let now = 50 * SEC;
        let abuser: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(l.check(abuser, None, now).is_ok());
        assert!(l.check(abuser, None, now).is_ok());
        let r = l.check(abuser, None, now).unwrap_err();
        assert_eq!((r.scope, r.rate), ("per_ip", 1));
        // Its refusal took nothing from the global bucket: others get what its two answered
        // requests left of the global burst (3) plus one.
        let others =
            (1..=10u8).filter(|i| l.check(IpAddr::from([198, 51, 100, *i]), None, now).is_ok()).count();
        assert_eq!(others, 2);
        assert_eq!(l.check(IpAddr::from([198, 51, 100, 99]), None, now).unwrap_err().scope, "global");
        // Whitelisted: not limited by the global or per-address limits; by a route's, yes.
        let friend: IpAddr = "10.1.2.3".parse().unwrap();
        assert!((0..100).all(|_| l.check(friend, None, now).is_ok()));
        let route = (Limit::new(1, 0).unwrap(), Bucket::default());
        assert!(l.check(friend, Some(&route), now).is_ok());
        assert_eq!(l.check(friend, Some(&route), now).unwrap_err().scope, "route");
        let route = (Limit::new(1, 0).unwrap(), Bucket::default());
        let quiet =
            Limiter::new(&RateLimits::default(), || unreachable!("no per-address limit"), Arc::default());
        assert!(quiet.check(abuser, Some(&route), now).is_ok());
        assert_eq!(quiet.check(abuser, Some(&route), now).unwrap_err().scope, "route");
        assert_eq!(quiet.counts.route.load(Ordering::Relaxed), 1);
        assert_eq!(l.counts.per_ip.load(Ordering::Relaxed), 1);
    }
}
