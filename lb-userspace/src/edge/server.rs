//! Listeners: accepting connections under a per-client cap, and serving each with hyper under
//! the listener's limits: header timeout (408), idle timeout, head size (431), bad input (400).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, RawFd},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};

use super::{
    Shared,
    proxy::{self, Conn},
};

/// Sent to a client that did not finish its request head in time.
const REQUEST_TIMEOUT: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";
/// Sent to a client over its connection cap.
const TOO_MANY: &[u8] =
    b"HTTP/1.1 429 Too Many Requests\r\nconnection: close\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n";

/// Open connections per client address, bounded by each listener's cap.
#[derive(Debug, Default)]
pub struct Clients {
    open: Mutex<HashMap<IpAddr, u32>>,
}

/// One connection counted against its client's cap until dropped.
pub struct Counted {
    clients: Arc<Clients>,
    ip: IpAddr,
}

impl Clients {
    fn admit(self: &Arc<Self>, ip: IpAddr, cap: u32) -> Option<Counted> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(ip).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(Counted { clients: self.clone(), ip })
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Accepts on `listener` until `stop` changes.
pub async fn accept_loop(
    listener: TcpListener,
    port: u16,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<()>,
) {
    let local = listener.local_addr().ok();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let limits = shared.snapshot().limits.get(&port).cloned().unwrap_or_default();
        let Some(counted) = shared.clients.admit(peer.ip(), limits.max_connections_per_ip) else {
            debug!(port, client = %peer.ip(), cap = limits.max_connections_per_ip, "connection refused: over the per-client cap");
            let _ = stream.try_write(TOO_MANY);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tokio::spawn(async move {
            serve(stream, peer, port, shared, limits).await;
            drop(counted);
        });
    }
    info!(?local, "listener closed");
}

/// What the connection's watchdog knows: requests in flight, bytes read, and when it last
/// went idle.
#[derive(Debug)]
struct ConnState {
    start: Instant,
    in_flight: AtomicU32,
    read: AtomicU64,
    /// `read` when the connection last went idle (no request in flight).
    idle_read: AtomicU64,
    /// When it last went idle, and when the first byte after that came (ns since `start`).
    idle_since: AtomicU64,
    first_byte: AtomicU64,
    served: AtomicU64,
}

impl ConnState {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            in_flight: AtomicU32::new(0),
            read: AtomicU64::new(0),
            idle_read: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(u64::MAX),
            served: AtomicU64::new(0),
        }
    }

    fn ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn on_read(&self, n: usize) {
        let before = self.read.fetch_add(n as u64, Ordering::Relaxed);
        if before == self.idle_read.load(Ordering::Relaxed) {
            self.first_byte.store(self.ns(), Ordering::Relaxed);
        }
    }

    fn request_done(&self) {
        self.served.fetch_add(1, Ordering::Relaxed);
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            let read = self.read.load(Ordering::Relaxed);
            self.idle_read.store(read, Ordering::Relaxed);
            self.idle_since.store(self.ns(), Ordering::Relaxed);
        }
    }

    /// What to do now: `Ok(next check)` or `Err(true)` for a head that took too long (408),
    /// `Err(false)` for an idle connection to close quietly.
    fn check(&self, header: Duration, idle: Duration) -> Result<Duration, bool> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Ok(header.min(idle));
        }
        let now = self.ns();
        let after = |since: u64, limit: Duration| {
            let end = since.saturating_add(u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX));
            if now >= end { None } else { Some(Duration::from_nanos(end - now)) }
        };
        if self.read.load(Ordering::Relaxed) > self.idle_read.load(Ordering::Relaxed) {
            // A request head is arriving.
            return after(self.first_byte.load(Ordering::Relaxed), header).ok_or(true);
        }
        // Idle. Before the first request a client gets the header timeout, after it the
        // (longer) idle timeout.
        let limit = if self.served.load(Ordering::Relaxed) == 0 { header } else { idle };
        after(self.idle_since.load(Ordering::Relaxed), limit).ok_or(false)
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    shared: Arc<Shared>,
    limits: crate::config::Limits,
) {
    let fd: RawFd = stream.as_raw_fd();
    let state = Arc::new(ConnState::new());
    let io = TokioIo::new(Counting { inner: stream, state: state.clone() });
    let conn = Conn { client: peer, port, tls: false };
    let svc_state = state.clone();
    let svc = service_fn(move |req| {
        let snap = shared.snapshot();
        let state = svc_state.clone();
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        async move {
            let mut resp = proxy::handle(snap, conn, req).await;
            resp.body_mut().on_done(move || state.request_done());
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let mut http1 = hyper::server::conn::http1::Builder::new();
    // Timeouts are the watchdog's below: hyper's one timer cannot tell idle from slow.
    http1
        .header_read_timeout(None)
        .max_header_size(limits.max_header_bytes)
        .max_buf_size(limits.max_header_bytes.max(8192) + 8192)
        .keep_alive(true);
    let conn = http1.serve_connection(io, svc);
    tokio::pin!(conn);
    loop {
        let wait = match state.check(limits.header_timeout, limits.idle_timeout) {
            Ok(wait) => wait,
            Err(slow) => {
                if slow {
                    debug!(client = %peer, "request head not received in time: 408");
                    // The connection future is not running: nothing else writes to the socket.
                    send_now(fd, REQUEST_TIMEOUT);
                }
                // Dropping the connection closes it.
                break;
            }
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(client = %peer, error = %e, "connection ended with an error");
                }
                break;
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Writes `bytes` without blocking, as far as the socket buffer takes them (a few bytes to a
/// fresh buffer always fit).
fn send_now(fd: RawFd, bytes: &[u8]) {
    // SAFETY: `fd` is open (its stream is alive in the caller) and `bytes` valid for its length.
    let _ = unsafe {
        libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
    };
}

/// The client stream, counting what is read for the watchdog.
struct Counting {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl AsyncRead for Counting {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.state.on_read(n);
        }
        r
    }
}

impl AsyncWrite for Counting {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_tells_slow_heads_from_idle_connections() {
        let ms = Duration::from_millis;
        let s = ConnState::new();
        // Fresh: the header timeout runs from the start.
        assert!(s.check(ms(50), ms(500)).is_ok());
        std::thread::sleep(ms(60));
        assert_eq!(s.check(ms(50), ms(500)), Err(false), "nothing sent: closed quietly");
        // A partial head: 408 once the header timeout passes from its first byte.
        let s = ConnState::new();
        s.on_read(10);
        assert!(s.check(ms(50), ms(500)).is_ok());
        std::thread::sleep(ms(60));
        assert_eq!(s.check(ms(50), ms(500)), Err(true));
        // After a request: idle gets the idle timeout, not the header timeout.
        let s = ConnState::new();
        s.on_read(100);
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(ms(60));
        assert!(s.check(ms(50), ms(500)).is_ok(), "no timeout while a request is served");
        s.request_done();
        std::thread::sleep(ms(60));
        assert!(s.check(ms(50), ms(500)).is_ok(), "idle for 60 ms of 500");
    }
}
