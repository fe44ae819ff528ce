//! The edge's threads: one single-threaded tokio runtime per core, each accepting on its own
//! `SO_REUSEPORT` socket of every listener. A client connection, its requests and the backend
//! connections they use then stay on one thread: no wake-ups across threads, no work stealing
//! (the thread-per-core layout of nginx and HAProxy).

use std::{
    cell::Cell,
    io,
    net::SocketAddr,
    os::fd::{FromRawFd as _, IntoRawFd as _},
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

/// The running threads; stopped when dropped (their tasks are dropped with their runtimes).
pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    pub fn start(n: usize) -> io::Result<Self> {
        let mut w = Self { handles: Vec::with_capacity(n), stops: Vec::with_capacity(n) };
        for i in 0..n {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            std::thread::Builder::new().name(format!("lb-edge-{i}")).spawn(move || {
                INDEX.set(i);
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
            w.handles.push(handle);
            w.stops.push(stop_tx);
        }
        Ok(w)
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
