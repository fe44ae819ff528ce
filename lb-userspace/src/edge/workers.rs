//! The edge's threads: one single-threaded tokio runtime per core, each accepting on its own
//! `SO_REUSEPORT` socket of every listener. A client connection, its requests and the backend
//! connections they use then stay on one thread: no wake-ups across threads, no work stealing
//! (the thread-per-core layout of nginx and HAProxy).

use std::{
    cell::Cell,
    io,
    net::SocketAddr,
    os::fd::{FromRawFd as _, IntoRawFd as _},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::{runtime::Handle, sync::oneshot};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Edge threads: one a core. Read once: `available_parallelism` reads cgroup files, and every
/// backend pool asks.
#[must_use]
pub fn count() -> usize {
    static COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *COUNT.get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZero::get))
}

/// The edge thread running the caller (0 outside them).
#[must_use]
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// Makes the calling thread count as edge thread `i` (tests that play two edge threads).
#[cfg(test)]
pub fn set_current(i: usize) {
    INDEX.set(i);
}

/// The running threads; stopped when dropped (their tasks are dropped with their runtimes).
pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    placement: Arc<Placement>,
}

/// Which edge thread serves a new client connection. `SO_REUSEPORT` spreads connections by a
/// hash of their addresses, which splits 32 of them 18/14 as often as not, and the busier
/// thread's clients then wait longer. A connection accepted on a thread with more open than
/// another is handed to the one with the fewest (HAProxy balances its threads the same way).
pub struct Placement {
    handles: Vec<Handle>,
    open: Vec<AtomicUsize>,
}

/// Counts one open connection on a thread until dropped.
pub struct Open {
    placement: Arc<Placement>,
    thread: usize,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.placement.open[self.thread].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Placement {
    /// The thread for a connection accepted on `here`, counted open there.
    pub fn place(self: &Arc<Self>, here: usize) -> Open {
        let here = here.min(self.open.len().saturating_sub(1));
        let load = |i: usize| self.open[i].load(Ordering::Relaxed);
        let least = (0..self.open.len()).min_by_key(|&i| load(i)).unwrap_or(here);
        // Kept here unless another thread has fewer: then no two differ by more than one.
        let thread = if load(least) < load(here) { least } else { here };
        if let Some(n) = self.open.get(thread) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        Open { placement: self.clone(), thread }
    }

    /// Connections open on each thread.
    #[must_use]
    pub fn open(&self) -> Vec<u64> {
        self.open.iter().map(|n| n.load(Ordering::Relaxed) as u64).collect()
    }

    /// The runtime of thread `i`.
    #[must_use]
    pub fn handle(&self, i: usize) -> Option<&Handle> {
        self.handles.get(i)
    }
}

impl Open {
    #[must_use]
    pub fn thread(&self) -> usize {
        self.thread
    }
}

impl Workers {
    /// Starts `n` threads, each bound to a CPU of its own when `affinity` is on and there are
    /// enough CPUs.
    pub fn start(n: usize, affinity: bool) -> io::Result<Self> {
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        let cpus = if affinity { placement_cpus(n) } else { Vec::new() };
        if affinity && cpus.is_empty() {
            tracing::info!(
                threads = n,
                "edge threads not bound to CPUs: not one thread for each CPU lbd may use (a CPU quota?)"
            );
        }
        for i in 0..n {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let cpu = cpus.get(i).copied();
            std::thread::Builder::new().name(format!("lb-edge-{i}")).spawn(move || {
                INDEX.set(i);
                if let Some(cpu) = cpu
                    && let Err(e) = pin(cpu)
                {
                    tracing::warn!(thread = i, cpu, error = %e, "edge thread not bound to its CPU");
                }
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(rt.handle().clone()));
                // Tasks spawned through the handle run while this waits.
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
            })?;
            let handle = ready_rx.recv().map_err(|_| io::Error::other("an edge thread died at start"))??;
            handles.push(handle);
            stops.push(stop_tx);
        }
        if !cpus.is_empty() {
            tracing::info!(?cpus, "edge threads bound to CPUs, one each");
        }
        let open = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let placement = Arc::new(Placement { handles: handles.clone(), open });
        Ok(Self { handles, stops, placement })
    }

    #[must_use]
    pub fn placement(&self) -> &Arc<Placement> {
        &self.placement
    }

    #[must_use]
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Not joined: this runs inside the controller's runtime, where blocking is not allowed.
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

/// The CPU for each of `n` edge threads: the CPUs the process may run on, one each, when
/// there are exactly `n` of them; else none. Two busy edge threads left to share one CPU take turns
/// a scheduler tick at a time (4 ms at 250 Hz), and every client of the waiting one waits that
/// long: the far tail of the latency. Bound, each has a CPU of its own to share only with
/// threads that sleep and wake, which the scheduler interleaves finely.
#[must_use]
pub fn placement_cpus(n: usize) -> Vec<usize> {
    cpus_for(&allowed_cpus(), n)
}

/// The `allowed` CPUs, one for each of `n` threads, when there are exactly `n`; else none.
/// Fewer: two threads bound to one CPU would be the very thing binding avoids. More: the
/// thread count was cut by a CPU quota (`available_parallelism` reads `cpu.max`), which
/// limits time, not CPUs; binding to the first ones would pile every such lbd onto the same
/// CPUs.
fn cpus_for(allowed: &[usize], n: usize) -> Vec<usize> {
    if allowed.len() != n {
        return Vec::new();
    }
    allowed.to_vec()
}

/// The CPUs the calling thread may run on (`sched_getaffinity`), empty when unknown.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set, filled by the call.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe `set`, owned here.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) } != 0 {
        return Vec::new();
    }
    // SAFETY: `set` is initialised; CPU_ISSET only reads it.
    (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
}

/// Binds the calling thread to `cpu`.
fn pin(cpu: usize) -> io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::other("CPU number out of range"));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (checked above), so the write stays within `set`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: the pointer and size describe `set`.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `n` listening sockets on `addr` sharing the port (`SO_REUSEPORT`): the kernel spreads new
/// connections over them. Bound here, outside any runtime, so a busy port fails the reload
/// before anything changes.
pub fn bind(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    (0..n)
        .map(|_| {
            let s = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            }?;
            s.set_reuseaddr(true)?;
            s.set_reuseport(true)?;
            s.bind(addr)?;
            // tokio's `listen` registers with a runtime; each worker registers its own below.
            let fd = s.into_raw_fd();
            // SAFETY: `fd` is the socket just bound, owned here; it is closed on failure and
            // owned by the returned listener on success.
            unsafe {
                if libc::listen(fd, 1024) != 0 {
                    let e = io::Error::last_os_error();
                    libc::close(fd);
                    return Err(e);
                }
                Ok(std::net::TcpListener::from_raw_fd(fd))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_thread_gets_a_cpu_of_its_own_of_those_allowed_or_none_does() {
        assert_eq!(cpus_for(&[0, 1], 2), [0, 1]);
        // A process confined to some CPUs (taskset, a cpuset) binds within them.
        assert_eq!(cpus_for(&[2, 5, 7], 3), [2, 5, 7]);
        // Fewer threads than CPUs (a quota): none bound, not all on the lowest CPUs.
        assert!(cpus_for(&[0, 1, 2, 3], 2).is_empty());
        // Fewer CPUs than threads, or none known: none bound, the scheduler shares them out.
        assert!(cpus_for(&[3], 2).is_empty());
        assert!(cpus_for(&[], 1).is_empty());
    }

    #[test]
    fn the_calling_threads_cpus_are_read() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty(), "a running thread may run somewhere");
        assert!(allowed.windows(2).all(|w| w[0] < w[1]), "in order: {allowed:?}");
    }
}
