//! Response deadlines, coarse and cheap. `tokio::time::timeout` puts an entry into the
//! runtime's timer wheel and takes it out again, under the driver's lock, and reads the clock:
//! about 4 % of a proxied request's instructions. A response timeout is seconds long and
//! need not fire to the millisecond, so on an edge thread (a current-thread runtime) each
//! attempt is instead a slot in a thread-local table, and one ticker task per thread wakes the
//! expired ones every [`TICK`]. Elsewhere it falls back to tokio's timer.

use std::{
    cell::RefCell,
    pin::Pin,
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use slab::Slab;
use tokio::runtime::{Handle, RuntimeFlavor};

/// How late a deadline may fire.
pub const TICK: Duration = Duration::from_millis(10);

/// A deadline passed before the work finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

struct Slot {
    at: Instant,
    waker: Option<Waker>,
    fired: bool,
}

#[derive(Default)]
struct Table {
    slots: Slab<Slot>,
    /// Whether this thread's ticker task is running.
    ticking: bool,
}

thread_local! {
    static TABLE: RefCell<Table> = RefCell::new(Table::default());
}

/// `from + d`, or a century on when that is past what `Instant` holds (a registry may say
/// `timeouts: {response: 1000000y}`).
#[must_use]
pub fn after(from: Instant, d: Duration) -> Instant {
    from.checked_add(d).unwrap_or_else(|| from + Duration::from_hours(100 * 365 * 24))
}

/// `work`, unless `at` passes first (then `Err(Elapsed)`, at most [`TICK`] late). To be
/// awaited on the thread that made it: which timer it uses is chosen here.
///
/// A plain function returning the future, not an `async fn`: that one would hold `work`
/// twice (as its argument and pinned) and be moved whole into the caller's state, on every
/// attempt of every request.
pub fn within<F: Future>(at: Instant, work: F) -> Within<F> {
    let local = Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::CurrentThread);
    Within(if local {
        Timer::Local { work, at, key: None }
    } else {
        // A task that may move between threads cannot hold a thread-local slot.
        Timer::Tokio(tokio::time::timeout_at(tokio::time::Instant::from_std(at), work))
    })
}

/// The future of [`within`].
pub struct Within<F: Future>(Timer<F>);

enum Timer<F: Future> {
    /// On an edge thread: a slot in this thread's table, taken at the first wait.
    Local { work: F, at: Instant, key: Option<usize> },
    /// Elsewhere: tokio's timer.
    Tokio(tokio::time::Timeout<F>),
}

impl<F: Future> Future for Within<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: the inner futures are never moved out of `self` (pinned projection, and
        // `Drop` only reads the key).
        let (work, at, key) = match unsafe { &mut self.get_unchecked_mut().0 } {
            Timer::Local { work, at, key } => (unsafe { Pin::new_unchecked(work) }, *at, key),
            Timer::Tokio(t) => return unsafe { Pin::new_unchecked(t) }.poll(cx).map_err(|_| Elapsed),
        };
        if let Poll::Ready(v) = work.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let (fired, start) = TABLE.with_borrow_mut(|t| {
            // Its own slot; a fresh one on first poll (or, should the task ever have moved
            // threads, when this table has none by that key).
            if let Some(slot) = key.and_then(|k| t.slots.get_mut(k)) {
                if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    slot.waker = Some(cx.waker().clone());
                }
                return (slot.fired, false);
            }
            *key = Some(t.slots.insert(Slot { at, waker: Some(cx.waker().clone()), fired: false }));
            (false, !std::mem::replace(&mut t.ticking, true))
        });
        if start {
            // The guard goes with the task: dropped unrun (its runtime ending), it still
            // marks the ticker stopped.
            tokio::spawn(tick(Stopped));
        }
        if fired { Poll::Ready(Err(Elapsed)) } else { Poll::Pending }
    }
}

impl<F: Future> Drop for Within<F> {
    fn drop(&mut self) {
        if let Timer::Local { key: Some(key), .. } = self.0 {
            // `try_`: the table may be gone already when the thread itself is ending.
            let _ = TABLE.try_with(|t| t.borrow_mut().slots.try_remove(key));
        }
    }
}

/// Marks this thread's ticker stopped when dropped, however the ticker ends.
struct Stopped;

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = TABLE.try_with(|t| t.borrow_mut().ticking = false);
    }
}

/// Wakes what has expired every [`TICK`], while anything waits; then ends (the next slot
/// taken starts another).
async fn tick(_stopped: Stopped) {
    let mut expired = Vec::new();
    loop {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        let more = TABLE.with_borrow_mut(|t| {
            for (_, slot) in &mut t.slots {
                if !slot.fired && slot.at <= now {
                    slot.fired = true;
                    expired.extend(slot.waker.take());
                }
            }
            !t.slots.is_empty()
        });
        // Woken outside the borrow: a waker may run code that reaches the table.
        for w in expired.drain(..) {
            w.wake();
        }
        if !more {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
    }

    #[test]
    fn work_done_in_time_is_returned_and_its_slot_freed() {
        local().block_on(async {
            let at = Instant::now() + Duration::from_secs(5);
            let v = within(at, async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                7
            })
            .await;
            assert_eq!(v, Ok(7));
            assert!(TABLE.with_borrow(|t| t.slots.is_empty()), "slot freed");
        });
    }

    #[test]
    fn work_past_its_deadline_is_cut_off_at_most_a_tick_late() {
        local().block_on(async {
            let start = Instant::now();
            let at = start + Duration::from_millis(50);
            let r = within(at, std::future::pending::<()>()).await;
            let took = start.elapsed();
            assert_eq!(r, Err(Elapsed));
            assert!(took >= Duration::from_millis(50), "fired early: {took:?}");
            assert!(took < Duration::from_millis(50) + 10 * TICK, "fired late: {took:?}");
            // Nothing waits: the ticker stops at its next tick. Checked until then (bounded): a
            // thread held off its CPU past both timers may poll this task before the ticker.
            assert!(TABLE.with_borrow(|t| t.slots.is_empty()), "slot freed");
            let mut stopped = false;
            for _ in 0..500 {
                tokio::time::sleep(TICK).await;
                stopped = TABLE.with_borrow(|t| !t.ticking);
                if stopped {
                    break;
                }
            }
            assert!(stopped, "the ticker still runs with nothing waiting");
        });
    }

    #[test]
    fn many_deadlines_each_fire_on_their_own() {
        local().block_on(async {
            let start = Instant::now();
            let short = within(start + Duration::from_millis(30), std::future::pending::<()>());
            let long = within(start + Duration::from_secs(5), async {
                tokio::time::sleep(Duration::from_millis(80)).await;
                "done"
            });
            let (a, b) = tokio::join!(short, long);
            assert_eq!((a, b), (Err(Elapsed), Ok("done")));
        });
    }

    #[test]
    fn a_deadline_past_what_instant_holds_is_far_off_not_a_panic() {
        let now = Instant::now();
        assert!(after(now, Duration::MAX) > now + Duration::from_hours(365 * 24));
        assert_eq!(after(now, Duration::from_secs(1)), now + Duration::from_secs(1));
    }

    #[test]
    fn off_an_edge_thread_tokios_timer_is_used() {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_time().build().unwrap();
        rt.block_on(async {
            let r = within(Instant::now() + Duration::from_millis(20), std::future::pending::<()>()).await;
            assert_eq!(r, Err(Elapsed));
            assert!(TABLE.with_borrow(|t| t.slots.is_empty()));
        });
    }
}
