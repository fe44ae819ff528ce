//! Backends as the HTTP edge sees them: health (active, from the controller, and passive, from
//! real traffic), requests in flight, latency average; and a service's choice among them.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::{
    balance::{self, View},
    breaker::{Breaker, Change, Pass},
};
use crate::config::{AllDown, Balance, HttpService, Role};

/// Runtime state of one backend of one service; kept across reloads while the backend stays.
#[derive(Debug)]
pub struct BackendState {
    pub service: String,
    /// `host:port`, also the request authority.
    pub identity: String,
    pub id_hash: u64,
    /// Active health and drains, as the controller decided: false takes it out.
    pub usable: AtomicBool,
    pub in_flight: AtomicU32,
    /// Time to response headers, nanoseconds, exponentially averaged (0: none yet).
    pub ewma_ns: AtomicU64,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    /// Passive health keeps it out until this time ([`clock`] nanoseconds; 0: not out).
    out_until: AtomicU64,
    /// Recent failed attempts, oldest first (touched only on failures).
    recent: Mutex<VecDeque<Instant>>,
    /// Used when its service has `circuit_breaker:`.
    pub breaker: Breaker,
    /// Counts the times its health check marked it down: the L4 proxy's connections to it
    /// watch this to close (`close_on_down`).
    pub marked_down: tokio::sync::watch::Sender<u64>,
}

/// Nanoseconds since the first call: a clock atomics can hold.
pub(super) fn clock(now: Instant) -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(now.saturating_duration_since(epoch).as_nanos()).unwrap_or(u64::MAX).max(1)
}

impl BackendState {
    #[must_use]
    pub fn new(service: &str, identity: &str) -> Self {
        Self {
            service: service.to_owned(),
            identity: identity.to_owned(),
            id_hash: balance::hash_bytes(identity.as_bytes()),
            usable: AtomicBool::new(true),
            in_flight: AtomicU32::new(0),
            ewma_ns: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            out_until: AtomicU64::new(0),
            recent: Mutex::new(VecDeque::new()),
            breaker: Breaker::default(),
            marked_down: tokio::sync::watch::Sender::new(0),
        }
    }

    /// True while passive health keeps it out.
    #[must_use]
    pub fn passively_out(&self, now: Instant) -> bool {
        clock(now) < self.out_until.load(Ordering::Relaxed)
    }

    /// Records a failed attempt; takes the backend out for `window` at `failures` failures
    /// within `window`. True when this failure took it out.
    pub fn failed(&self, now: Instant, failures: u32, window: Duration) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if failures == 0 {
            return false;
        }
        let mut recent = self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while recent.front().is_some_and(|&t| now.saturating_duration_since(t) > window) {
            recent.pop_front();
        }
        recent.push_back(now);
        if recent.len() >= failures as usize && !self.passively_out(now) {
            recent.clear();
            self.out_until.store(clock(now + window), Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Forgets passive failures: the backend is back in.
    pub fn clear_passive(&self) {
        self.recent.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        self.out_until.store(0, Ordering::Relaxed);
    }

    /// Folds one time-to-headers measurement into the average (weight 1/8).
    pub fn observe(&self, latency: Duration) {
        let x = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let old = self.ewma_ns.load(Ordering::Relaxed);
        let new = if old == 0 { x } else { old - old / 8 + x / 8 };
        self.ewma_ns.store(new.max(1), Ordering::Relaxed);
    }

    fn view(&self, weight: u32) -> View {
        View {
            weight,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            ewma_ns: self.ewma_ns.load(Ordering::Relaxed),
            id_hash: self.id_hash,
        }
    }
}

/// Counts a request in flight on a backend until dropped (with the response body).
#[derive(Debug)]
pub struct InFlight(Arc<BackendState>);

impl InFlight {
    #[must_use]
    pub fn start(b: &Arc<BackendState>) -> Self {
        b.in_flight.fetch_add(1, Ordering::Relaxed);
        b.requests.fetch_add(1, Ordering::Relaxed);
        Self(b.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Upper bounds of the response-time histogram's buckets, seconds: Prometheus' defaults with
/// 2 s added (seed 001's warning threshold).
pub const DURATION_BOUNDS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0];

/// What a service answered: responses by status class and how long they took (to the end of
/// the body), kept across reloads while the service stays.
#[derive(Debug, Default)]
pub struct Traffic {
    /// 1xx to 5xx.
    pub classes: [AtomicU64; 5],
    /// Responses per bucket of [`DURATION_BOUNDS`] (not cumulative); the last is above them.
    pub buckets: [AtomicU64; DURATION_BOUNDS.len() + 1],
    pub sum_us: AtomicU64,
    /// Edge cache answers: hits, misses, and misses answered by another request's fetch.
    pub cache: [AtomicU64; 3],
}

impl Traffic {
    pub fn record(&self, status: http::StatusCode, took: Duration) {
        let class = usize::from(status.as_u16() / 100).clamp(1, 5) - 1;
        self.classes[class].fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = DURATION_BOUNDS.iter().position(|&b| secs <= b).unwrap_or(DURATION_BOUNDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// One backend's place in a service.
#[derive(Debug, Clone)]
pub struct Member {
    pub state: Arc<BackendState>,
    pub weight: u32,
    pub role: Role,
    pub local: bool,
    /// Connections to it.
    pub pool: Arc<super::pool::BackendPool>,
}

/// Backends tried together: primaries on this node, other primaries, then the same for
/// fallbacks. A tier is used only when no backend of an earlier one is usable.
#[derive(Debug, Default)]
struct Tier {
    members: Vec<usize>,
    /// Smooth weighted round-robin order over `members` (indexes into it).
    sequence: Vec<u32>,
}

/// A service as the edge serves it.
#[derive(Debug)]
pub struct ServiceState {
    pub name: String,
    pub spec: HttpService,
    pub members: Vec<Member>,
    tiers: Vec<Tier>,
    tick: AtomicUsize,
    /// Its own rate limit (`rate_limit:`), all clients together.
    pub rate: Option<super::ratelimit::RouteLimit>,
    /// How its members' connections are made (shared by their pools).
    pub upstream: Arc<super::pool::Settings>,
    pub traffic: Arc<Traffic>,
}

/// What a pick may not return: backends this request already tried.
pub type Tried = [usize];

/// Inputs of a consistent-hash pick, computed from the request.
#[derive(Debug, Clone, Copy)]
pub struct Pick {
    /// `None`: no key (the service does not hash, or the request lacks it).
    pub hash_key: Option<u64>,
}

impl ServiceState {
    #[must_use]
    pub fn new(
        name: &str,
        spec: HttpService,
        members: Vec<Member>,
        upstream: Arc<super::pool::Settings>,
        traffic: Arc<Traffic>,
    ) -> Self {
        let mut tiers = Vec::new();
        for (role, local) in
            [(Role::Primary, true), (Role::Primary, false), (Role::Fallback, true), (Role::Fallback, false)]
        {
            // Without local-first, local and remote share a tier.
            if !spec.local_first && local {
                continue;
            }
            let idx: Vec<usize> = (0..members.len())
                .filter(|&i| members[i].role == role && (!spec.local_first || members[i].local == local))
                .collect();
            if idx.is_empty() {
                continue;
            }
            let weights: Vec<u32> = idx.iter().map(|&i| members[i].weight).collect();
            tiers.push(Tier { sequence: balance::smooth_sequence(&weights), members: idx });
        }
        let rate = spec
            .rate_limit
            .and_then(|r| super::ratelimit::Limit::new(r.rate, r.burst))
            .map(|l| (l, super::ratelimit::Bucket::default()));
        Self {
            name: name.to_owned(),
            spec,
            members,
            tiers,
            tick: AtomicUsize::new(0),
            rate,
            upstream,
            traffic,
        }
    }

    fn usable(&self, i: usize, now: Instant) -> bool {
        let m = &self.members[i];
        m.weight > 0
            && m.state.usable.load(Ordering::Relaxed)
            && !m.state.passively_out(now)
            && self.circuit_allows(i, now)
    }

    fn circuit_allows(&self, i: usize, now: Instant) -> bool {
        self.spec.circuit_breaker.as_ref().is_none_or(|s| self.members[i].state.breaker.allows(s, clock(now)))
    }

    /// True when the service has a circuit breaker and every backend's is open.
    #[must_use]
    pub fn all_circuits_open(&self, now: Instant) -> bool {
        self.spec.circuit_breaker.is_some() && (0..self.members.len()).all(|i| !self.circuit_allows(i, now))
    }

    /// The backend for the next attempt, let through by its circuit breaker (as a trial when
    /// half-open), or `None` as [`Self::pick`].
    #[must_use]
    pub fn pick_admitted(
        &self,
        pick: Pick,
        tried: &Tried,
        now: Instant,
    ) -> Option<(usize, Option<Pass<'_>>)> {
        let Some(settings) = &self.spec.circuit_breaker else {
            return self.pick(pick, tried, now).map(|i| (i, None));
        };
        // Another request may take a half-open backend's last trial between the pick and the
        // admission: that backend is then left out of this pick (rare, so the list is a Vec).
        let mut excluded: Vec<usize> = Vec::new();
        loop {
            let i = if excluded.is_empty() {
                self.pick(pick, tried, now)?
            } else {
                self.pick(pick, &excluded, now)?
            };
            let b = &self.members[i].state;
            let (pass, change) = b.breaker.admit(settings, clock(now));
            self.log_change(i, change);
            if let Some(pass) = pass {
                return Some((i, Some(pass)));
            }
            if excluded.is_empty() {
                excluded.extend_from_slice(tried);
            }
            excluded.push(i);
        }
    }

    /// Tells member `i`'s circuit breaker how the attempt `pass` let through went: `answered`
    /// with a status after `took`, or not at all.
    pub fn outcome(
        &self,
        i: usize,
        pass: Option<Pass<'_>>,
        answered: Option<http::StatusCode>,
        took: Duration,
    ) {
        let (Some(settings), Some(pass)) = (&self.spec.circuit_breaker, pass) else { return };
        let slow = !settings.slow.is_zero() && took > settings.slow;
        let ok = answered.is_some_and(|s| !s.is_server_error()) && !slow;
        let change = self.members[i].state.breaker.record(settings, pass, ok, clock(Instant::now()));
        self.log_change(i, change);
    }

    fn log_change(&self, i: usize, change: Option<Change>) {
        let Some(change) = change else { return };
        let b = &self.members[i].state;
        let (service, backend) = (&self.name, &b.identity);
        match change {
            Change::Opened(reason) => {
                warn!(event = "circuit", state = "open", %service, %backend, %reason, "circuit opened");
            }
            Change::Reopened => {
                warn!(event = "circuit", state = "open", %service, %backend, "circuit opened again: a trial failed");
            }
            Change::HalfOpened => {
                info!(event = "circuit", state = "half-open", %service, %backend, "circuit half-open: trial requests");
            }
            Change::Closed => {
                info!(event = "circuit", state = "closed", %service, %backend, "circuit closed");
            }
        }
    }

    /// The backend for the next attempt, or `None` when no backend may take it (then, under
    /// `fail-open`, any untried backend with a weight is tried anyway).
    #[must_use]
    pub fn pick(&self, pick: Pick, tried: &Tried, now: Instant) -> Option<usize> {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        for tier in &self.tiers {
            let ok = |k: usize| {
                let i = tier.members[k];
                !tried.contains(&i) && self.usable(i, now)
            };
            if let Some(k) = self.pick_in(tier, pick, tick, ok) {
                return Some(tier.members[k]);
            }
        }
        if self.spec.when_all_down == AllDown::FailOpen && !self.any_usable(now) {
            // Health checks may be wrong; an open circuit is what real traffic just saw.
            for tier in &self.tiers {
                let ok = |k: usize| {
                    let i = tier.members[k];
                    !tried.contains(&i) && self.members[i].weight > 0 && self.circuit_allows(i, now)
                };
                if let Some(k) = self.pick_in(tier, pick, tick, ok) {
                    return Some(tier.members[k]);
                }
            }
        }
        None
    }

    /// True when some backend may take requests (fail-open applies only when none may).
    #[must_use]
    pub fn any_usable(&self, now: Instant) -> bool {
        (0..self.members.len()).any(|i| self.usable(i, now))
    }

    fn pick_in(&self, tier: &Tier, pick: Pick, tick: usize, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let n = tier.members.len();
        let view = |k: usize| {
            let m = &self.members[tier.members[k]];
            m.state.view(m.weight)
        };
        match &self.spec.balance {
            Balance::RoundRobin => balance::round_robin(&tier.sequence, tick, ok),
            Balance::LeastConn => balance::least_conn(n, view, tick, ok),
            Balance::P2cEwma => balance::p2c_ewma(n, view, |k| fastrand::usize(..k), ok),
            Balance::Hash(_) => match pick.hash_key {
                Some(key) => balance::rendezvous(n, view, key, ok),
                None => balance::round_robin(&tier.sequence, tick, ok),
            },
        }
    }

    /// Records a failed attempt on member `i` (passive health).
    pub fn failed(&self, i: usize, now: Instant) {
        let b = &self.members[i].state;
        if b.failed(now, self.spec.passive.failures, self.spec.passive.window) {
            warn!(
                event = "passive-health",
                service = %self.name,
                backend = %b.identity,
                failures = self.spec.passive.failures,
                window = ?self.spec.passive.window,
                "backend taken out: it failed in real traffic"
            );
        }
    }
}
