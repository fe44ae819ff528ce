//! A backend's circuit breaker (pure: time comes in as [`super::upstream::clock`] nanoseconds).
//!
//! Closed, it counts outcomes: errors in a row, and errors among the requests of a sliding
//! window. Either past its threshold opens it: no request is sent for `open_for`. Then it is
//! half-open: `half_open_requests` trial requests go through at once; as many successes close
//! it, one error opens it again. A slow response counts as an error.
//!
//! Reads on the request path are atomics; a mutex guards the counts, taken once per answer.

use std::{
    sync::{
        Mutex, PoisonError,
        atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::config::CircuitBreaker as Settings;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// The window is counted in this many slices; the oldest slice leaves it whole.
const SLICES: usize = 10;

/// A breaker's state as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

/// A change of state, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Opened from closed, and why.
    Opened(String),
    /// A trial failed: open again.
    Reopened,
    HalfOpened,
    Closed,
}

#[derive(Debug, Default)]
pub struct Breaker {
    state: AtomicU8,
    /// While open: until when ([`super::upstream::clock`] nanoseconds).
    open_until: AtomicU64,
    /// While half-open: trial requests sent and not yet answered.
    trials: AtomicU32,
    /// Times it opened (closed -> open and half-open -> open).
    pub opened: AtomicU64,
    counts: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    in_a_row: u32,
    /// (slice number, requests, errors)
    slices: [(u64, u32, u32); SLICES],
    /// Trial successes while half-open.
    successes: u32,
}

/// A request let through. A trial that is dropped unanswered (the client left) frees its place.
#[derive(Debug)]
pub struct Pass<'a> {
    breaker: &'a Breaker,
    trial: bool,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if self.trial {
            self.breaker.trials.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Breaker {
    /// The state at `now`; open past its time reads as half-open (the next request is a trial).
    #[must_use]
    pub fn state(&self, now: u64) -> State {
        match self.state.load(Ordering::Relaxed) {
            OPEN if now < self.open_until.load(Ordering::Relaxed) => State::Open,
            OPEN | HALF_OPEN => State::HalfOpen,
            _ => State::Closed,
        }
    }

    /// Whether a request could go through now (no side effect: balancers ask several).
    #[must_use]
    pub fn allows(&self, s: &Settings, now: u64) -> bool {
        match self.state.load(Ordering::Relaxed) {
            CLOSED => true,
            OPEN => now >= self.open_until.load(Ordering::Relaxed),
            _ => self.trials.load(Ordering::Relaxed) < s.half_open_requests,
        }
    }

    /// Lets one request through, as a trial when half-open; `None` when another request took
    /// the last trial first.
    pub fn admit(&self, s: &Settings, now: u64) -> (Option<Pass<'_>>, Option<Change>) {
        let mut change = None;
        match self.state.load(Ordering::Relaxed) {
            CLOSED => return (Some(Pass { breaker: self, trial: false }), None),
            OPEN => {
                if now < self.open_until.load(Ordering::Relaxed) {
                    return (None, None);
                }
                let mut c = self.lock();
                if self.state.load(Ordering::Relaxed) == OPEN {
                    c.successes = 0;
                    self.trials.store(0, Ordering::Relaxed);
                    self.state.store(HALF_OPEN, Ordering::Relaxed);
                    change = Some(Change::HalfOpened);
                }
            }
            _ => {}
        }
        let took = self
            .trials
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                (t < s.half_open_requests).then_some(t + 1)
            })
            .is_ok();
        // Not `then_some`: a Pass built and dropped would free a trial it never took.
        (took.then(|| Pass { breaker: self, trial: true }), change)
    }

    /// Records the answer to a request `pass` let through: `ok` unless it failed, answered 5xx
    /// or was slow.
    pub fn record(&self, s: &Settings, pass: Pass<'_>, ok: bool, now: u64) -> Option<Change> {
        let trial = pass.trial;
        drop(pass);
        let mut c = self.lock();
        match self.state.load(Ordering::Relaxed) {
            CLOSED if !trial => {
                c.in_a_row = if ok { 0 } else { c.in_a_row + 1 };
                let slice_len = (nanos(s.window) / SLICES as u64).max(1);
                let slice = now / slice_len;
                let cell = &mut c.slices[usize::try_from(slice % SLICES as u64).unwrap_or(0)];
                if cell.0 != slice {
                    *cell = (slice, 0, 0);
                }
                cell.1 += 1;
                cell.2 += u32::from(!ok);
                let reason = if s.consecutive_errors > 0 && c.in_a_row >= s.consecutive_errors {
                    Some(format!("{} errors in a row", c.in_a_row))
                } else {
                    let (requests, errors) = c
                        .slices
                        .iter()
                        .filter(|(n, ..)| slice.saturating_sub(*n) < SLICES as u64)
                        .fold((0u64, 0u64), |(r, e), (_, rq, er)| (r + u64::from(*rq), e + u64::from(*er)));
                    (s.error_rate > 0
                        && requests >= u64::from(s.min_requests.max(1))
                        && errors * 100 >= u64::from(s.error_rate) * requests)
                        .then(|| format!("{errors} errors in {requests} requests within {:?}", s.window))
                };
                let reason = reason?;
                self.open(&mut c, s, now);
                Some(Change::Opened(reason))
            }
            HALF_OPEN if trial => {
                if ok {
                    c.successes += 1;
                    if c.successes >= s.half_open_requests {
                        *c = Counts::default();
                        self.state.store(CLOSED, Ordering::Relaxed);
                        return Some(Change::Closed);
                    }
                    None
                } else {
                    self.open(&mut c, s, now);
                    Some(Change::Reopened)
                }
            }
            // Answers to requests sent before the state changed say nothing about it now.
            _ => None,
        }
    }

    fn open(&self, c: &mut Counts, s: &Settings, now: u64) {
        *c = Counts::default();
        self.open_until.store(now.saturating_add(nanos(s.open_for)), Ordering::Relaxed);
        self.state.store(OPEN, Ordering::Relaxed);
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    /// Seed 001's numbers, with two trials at once.
    fn settings() -> Settings {
        Settings { half_open_requests: 2, ..Settings::default() }
    }

    /// Sends one request at `now` with outcome `ok`; false when refused.
    fn send(b: &Breaker, s: &Settings, now: u64, ok: bool) -> (bool, Option<Change>) {
        let (pass, c1) = b.admit(s, now);
        let Some(pass) = pass else { return (false, c1) };
        let c2 = b.record(s, pass, ok, now);
        (true, c2.or(c1))
    }

    #[test]
    fn errors_in_a_row_open_it_and_a_success_between_them_resets_the_count() {
        let (b, s) = (Breaker::default(), settings());
        for i in 0..4 {
            assert_eq!(send(&b, &s, i, false), (true, None));
        }
        assert_eq!(send(&b, &s, 5, true), (true, None), "a success resets the run");
        for i in 0..4 {
            assert_eq!(send(&b, &s, 10 + i, false), (true, None));
        }
        let (sent, change) = send(&b, &s, 20, false);
        assert!(
            sent && matches!(change, Some(Change::Opened(ref r)) if r == "5 errors in a row"),
            "{change:?}"
        );
        assert_eq!(b.state(21), State::Open);
        assert!(!b.allows(&s, 21));
        assert_eq!(send(&b, &s, 21, true), (false, None), "open: nothing goes through");
        assert_eq!(b.opened.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn an_error_rate_opens_it_only_past_the_minimum_and_only_within_the_window() {
        let (b, s) = (Breaker::default(), settings());
        // Alternating: never 5 in a row, 50 % errors. The tenth request reaches the minimum.
        for i in 0..9 {
            assert_eq!(send(&b, &s, i * S / 10, i % 2 == 0).1, None, "request {i}");
        }
        assert!(matches!(send(&b, &s, S, false).1, Some(Change::Opened(_))));

        // Two errors in three, spread thinner than the minimum per window, never open it.
        let b = Breaker::default();
        for i in 0..40 {
            assert_eq!(send(&b, &s, i * 3 * S, i % 3 == 0).1, None, "request {i}");
        }
        assert_eq!(b.state(200 * S), State::Closed);
    }

    #[test]
    fn after_open_for_trials_go_through_and_close_it_or_one_failure_reopens_it() {
        let (b, s) = (Breaker::default(), settings());
        for i in 0..5 {
            send(&b, &s, i, false);
        }
        let later = 4 + 30 * S; // opened by the error at 4
        assert_eq!(b.state(later - 1), State::Open);
        assert_eq!(b.state(later), State::HalfOpen);
        assert!(b.allows(&s, later));
        // Two trials at once; a third request waits for their answers.
        let (p1, change) = b.admit(&s, later);
        assert_eq!(change, Some(Change::HalfOpened));
        let (p2, _) = b.admit(&s, later);
        assert!(p1.is_some() && p2.is_some());
        assert!(b.admit(&s, later).0.is_none(), "{b:?}");
        assert!(!b.allows(&s, later), "{b:?}");
        // A trial the client abandoned frees its place.
        drop(p2);
        let p3 = b.admit(&s, later).0.expect("a place again");
        assert_eq!(b.record(&s, p1.unwrap(), true, later), None, "one success of two");
        assert_eq!(b.record(&s, p3, false, later), Some(Change::Reopened));
        assert_eq!(b.state(later + 1), State::Open);
        assert_eq!(b.opened.load(Ordering::Relaxed), 2);

        let again = later + 30 * S;
        assert_eq!(send(&b, &s, again, true).1, Some(Change::HalfOpened));
        assert_eq!(send(&b, &s, again, true).1, Some(Change::Closed));
        assert_eq!(b.state(again), State::Closed);
        // Closed afresh: four errors do not open it.
        for i in 0..4 {
            assert_eq!(send(&b, &s, again + i, false).1, None);
        }
    }

    #[test]
    fn answers_to_requests_from_an_earlier_state_change_nothing() {
        let (b, s) = (Breaker::default(), settings());
        let early = b.admit(&s, 0).0.unwrap();
        for i in 0..5 {
            send(&b, &s, i, false);
        }
        assert_eq!(b.record(&s, early, true, 6), None);
        assert_eq!(b.state(7), State::Open);
    }
}
