//! Listeners: accepting connections under a per-client cap, and serving each (HTTP/1.1 with
//! `h1_server`, HTTP/2 with hyper) under the listener's limits: header timeout (408), idle
//! timeout, send timeout (a client that reads nothing), head size (431), bad input (400).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, RawFd},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tracing::{debug, info, warn};

use super::{
    Port, Shared, h1_server,
    proxy::{self, Conn},
};
use crate::config::Limits;

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
    placement: Arc<super::workers::Placement>,
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
        let listener = shared.snapshot().ports.get(&port).cloned().unwrap_or_default();
        let cap = listener.limits.max_connections_per_ip;
        let Some(counted) = shared.clients.admit(peer.ip(), cap) else {
            debug!(port, client = %peer.ip(), cap, "connection refused: over the per-client cap");
            // Plain HTTP only: TLS clients would read this as a broken handshake anyway.
            if listener.tls.is_none() && !listener.passthrough {
                let _ = stream.try_write(TOO_MANY);
            }
            continue;
        };
        // Keepalives too: a tunnel (WebSocket, passthrough) has no idle timeout, and a client
        // gone without a FIN would hold its place under the per-address cap.
        super::l4::tune(&stream);
        let shared = shared.clone();
        let open = placement.place(super::workers::current());
        let there = placement.handle(open.thread()).filter(|_| open.thread() != super::workers::current());
        let held = Held { _counted: counted, _open: open };
        let Some(there) = there else {
            tokio::spawn(serve(stream, peer, port, shared, listener, held));
            continue;
        };
        // Another thread's: its reactor takes the socket over.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                debug!(client = %peer, error = %e, "connection lost in the hand-off");
                continue;
            }
        };
        there.spawn(async move {
            if let Ok(stream) = TcpStream::from_std(stream) {
                serve(stream, peer, port, shared, listener, held).await;
            }
        });
    }
    info!(?local, "listener closed");
}

/// A connection's place under its client's cap and on its thread, held as long as its socket
/// is open: in the connection's state, which its socket wrapper shares, so a connection
/// upgraded to a WebSocket tunnel still counts.
struct Held {
    _counted: Counted,
    _open: super::workers::Open,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Held")
    }
}

/// What the connection's watchdog knows: requests in flight, bytes read, when it last went
/// idle, and since when its writes wait on a client that reads nothing.
#[derive(Debug)]
struct ConnState {
    _held: Option<Held>,
    start: Instant,
    in_flight: AtomicU32,
    read: AtomicU64,
    /// `read` when the connection last went idle (no request in flight).
    idle_read: AtomicU64,
    /// When it last went idle, and when the first byte after that came (ns since `start`).
    idle_since: AtomicU64,
    first_byte: AtomicU64,
    served: AtomicU64,
    /// Since when a write has waited for room in the socket (ns since `start`; `u64::MAX`:
    /// none waits).
    blocked: AtomicU64,
    /// Speaks HTTP/2 (by ALPN, or an h2c preface).
    h2: AtomicBool,
}

impl ConnState {
    fn new(held: Option<Held>) -> Self {
        Self {
            _held: held,
            start: Instant::now(),
            in_flight: AtomicU32::new(0),
            read: AtomicU64::new(0),
            idle_read: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            first_byte: AtomicU64::new(u64::MAX),
            served: AtomicU64::new(0),
            blocked: AtomicU64::new(u64::MAX),
            h2: AtomicBool::new(false),
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

    /// A write that found no room starts the send timeout's clock; any write that went out
    /// stops it (nginx's `send_timeout`: the time between two writes, not the whole answer).
    fn wrote(&self, pending: bool) {
        let blocked = self.blocked.load(Ordering::Relaxed);
        if pending {
            if blocked == u64::MAX {
                self.blocked.store(self.ns(), Ordering::Relaxed);
            }
        } else if blocked != u64::MAX {
            self.blocked.store(u64::MAX, Ordering::Relaxed);
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
}

impl proxy::OnDone for ConnState {
    fn done(&self) {
        self.request_done();
    }
}

/// Why the watchdog ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// A request head took longer than the header timeout: 408.
    Head,
    /// No request for the idle timeout (the header timeout before the first): closed quietly.
    Idle,
    /// A write found no room for the send timeout: the client reads nothing, closed.
    Send,
}

impl Expired {
    /// Logs why the connection ends, and answers a slow head with 408 on the plain socket
    /// `fd` (the connection future is not running then: nothing else writes to it).
    fn tell(self, fd: Option<RawFd>, peer: SocketAddr, limits: &Limits) {
        match self {
            Self::Head => {
                debug!(client = %peer, "request head not received in time: 408");
                if let Some(fd) = fd {
                    send_now(fd, REQUEST_TIMEOUT);
                }
            }
            Self::Send => {
                debug!(client = %peer, timeout = ?limits.send_timeout, "client read nothing: closed");
            }
            Self::Idle => {}
        }
    }
}

impl ConnState {
    /// What to do now: `Ok(next check)`, or why the connection ends. HTTP/2 (`h2`) sends
    /// frames of its own between requests (pings, window updates): there only idleness
    /// counts.
    fn check(&self, limits: &Limits, h2: bool) -> Result<Duration, Expired> {
        let (header, idle) = (limits.header_timeout, limits.idle_timeout);
        let now = || self.ns();
        let after = |now: u64, since: u64, limit: Duration| {
            let end = since.saturating_add(u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX));
            if now >= end { None } else { Some(Duration::from_nanos(end - now)) }
        };
        // Whatever else goes on: a client that takes nothing holds the answer and, behind it,
        // a backend connection.
        let blocked = self.blocked.load(Ordering::Relaxed);
        let send = if blocked == u64::MAX {
            Duration::MAX
        } else {
            after(now(), blocked, limits.send_timeout).ok_or(Expired::Send)?
        };
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Ok(header.min(idle).min(send));
        }
        let now = now();
        if !h2 && self.read.load(Ordering::Relaxed) > self.idle_read.load(Ordering::Relaxed) {
            // A request head is arriving.
            let first = self.first_byte.load(Ordering::Relaxed);
            return after(now, first, header).map(|d| d.min(send)).ok_or(Expired::Head);
        }
        // Idle. Before the first request a client gets the header timeout, after it the
        // (longer) idle timeout.
        let limit = if self.served.load(Ordering::Relaxed) == 0 { header } else { idle };
        let since = self.idle_since.load(Ordering::Relaxed);
        after(now, since, limit).map(|d| d.min(send)).ok_or(Expired::Idle)
    }
}

async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    port: u16,
    shared: Arc<Shared>,
    listener: Arc<Port>,
    held: Held,
) {
    if listener.passthrough {
        let _held = held;
        return super::passthrough::serve(stream, peer, port, &shared, &listener.limits).await;
    }
    let fd: RawFd = stream.as_raw_fd();
    let local = stream.local_addr().unwrap_or_else(|_| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), port));
    let state = Arc::new(ConnState::new(Some(held)));
    let io = Counting { inner: stream, state: state.clone() };
    let limits = &listener.limits;
    let Some(tls) = &listener.tls else {
        let proto = if listener.h2c { Proto::Auto } else { Proto::Http1 };
        let conn = Conn { client: peer, local, port, tls: false, tunnel_idle: limits.tunnel_timeout };
        return drive(io, proto, Some(fd), conn, &shared, &listener, state).await;
    };
    // The handshake is part of the request head: both within the header timeout.
    let accept = tokio_rustls::TlsAcceptor::from(tls.clone()).accept(io);
    let stream = match tokio::time::timeout(limits.header_timeout, accept).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared.tls_failures.fetch_add(1, Ordering::Relaxed);
            debug!(client = %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            shared.tls_failures.fetch_add(1, Ordering::Relaxed);
            debug!(client = %peer, "TLS handshake not finished in time");
            return;
        }
    };
    let proto = if stream.get_ref().1.alpn_protocol() == Some(b"h2") { Proto::Http2 } else { Proto::Http1 };
    let conn = Conn { client: peer, local, port, tls: true, tunnel_idle: limits.tunnel_timeout };
    // A 408 would have to go through TLS: a slow TLS client is closed without one.
    drive(stream, proto, None, conn, &shared, &listener, state).await;
}

/// Which HTTP a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
    /// HTTP/1.1, or HTTP/2 for a client that starts with its preface (h2c).
    Auto,
}

/// What serves each request of a connection: the proxy, under the connection's idle
/// tracking and the listener's HSTS.
#[derive(Clone)]
struct Handler {
    shared: Arc<Shared>,
    state: Arc<ConnState>,
    hsts: Option<http::HeaderValue>,
    conn: Conn,
}

impl h1_server::Service for Handler {
    fn call(
        &self,
        req: http::Request<proxy::RequestBody>,
    ) -> impl Future<Output = http::Response<proxy::RespBody>> + Send {
        self.answer(req)
    }
}

impl Handler {
    /// The answer to `req`, holding nothing of `self` (hyper wants such futures).
    fn answer(
        &self,
        req: http::Request<proxy::RequestBody>,
    ) -> impl Future<Output = http::Response<proxy::RespBody>> + Send + use<> {
        let snap = self.shared.snapshot();
        let state = self.state.clone();
        let hsts = self.hsts.clone();
        let conn = self.conn;
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        async move {
            let mut resp = proxy::handle(snap, conn, req).await;
            if let Some(h) = hsts {
                // Only if the backend did not set one: its fields are read for that.
                proxy::unraw(&mut resp);
                resp.headers_mut().entry(http::header::STRICT_TRANSPORT_SECURITY).or_insert(h);
            }
            resp.body_mut().on_done(state);
            resp
        }
    }
}

/// Serves HTTP on `io` until the client leaves or a timeout closes it. `fd`: the plain socket,
/// for a 408 written past the server.
async fn drive<I>(
    io: I,
    proto: Proto,
    fd: Option<RawFd>,
    conn: Conn,
    shared: &Arc<Shared>,
    listener: &Arc<Port>,
    state: Arc<ConnState>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handler = Handler { shared: shared.clone(), state: state.clone(), hsts: listener.hsts.clone(), conn };
    let limits = &listener.limits;
    let peer = conn.client;
    let hyper_svc = {
        let handler = handler.clone();
        service_fn(move |req: http::Request<hyper::body::Incoming>| {
            // Boxed: hyper spawns a task per HTTP/2 stream holding this future, and moving
            // the whole request's future (~10 KB) into each task cost more than an allocation.
            let resp = Box::pin(handler.answer(req.map(proxy::RequestBody::Hyper)));
            async move {
                // hyper writes HTTP/2 fields from the map.
                let mut resp = resp.await;
                proxy::unraw(&mut resp);
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    };
    // Timeouts are the watchdog's below: one timer cannot tell idle from slow.
    let result: Pin<Box<dyn Future<Output = Result<(), String>> + Send>> = match proto {
        Proto::Http1 => {
            let max_head = limits.max_header_bytes;
            Box::pin(
                async move { h1_server::serve(io, &[], max_head, &handler).await.map_err(|e| e.to_string()) },
            )
        }
        Proto::Http2 => {
            let mut h2 = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            h2.timer(TokioTimer::new())
                .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
            let c = h2.serve_connection(TokioIo::new(io), hyper_svc);
            Box::pin(async move { c.await.map_err(|e| e.to_string()) })
        }
        Proto::Auto => {
            let max_head = limits.max_header_bytes;
            let state = state.clone();
            Box::pin(async move {
                let mut io = io;
                let first = match h2c_preface(&mut io).await {
                    Ok(Start::Http2(first)) => {
                        state.h2.store(true, Ordering::Relaxed);
                        first
                    }
                    Ok(Start::Http1(first)) => {
                        return h1_server::serve(io, &first, max_head, &handler)
                            .await
                            .map_err(|e| e.to_string());
                    }
                    Err(e) => return Err(e.to_string()),
                };
                let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                b.timer(TokioTimer::new()).max_header_list_size(u32::try_from(max_head).unwrap_or(u32::MAX));
                let io = Rewind { first: bytes::Bytes::from(first), io };
                b.serve_connection(TokioIo::new(io), hyper_svc).await.map_err(|e| e.to_string())
            })
        }
    };
    if proto == Proto::Http2 {
        state.h2.store(true, Ordering::Relaxed);
    }
    tokio::pin!(result);
    loop {
        let h2 = state.h2.load(Ordering::Relaxed);
        let wait = match state.check(limits, h2) {
            Ok(wait) => wait,
            Err(why) => {
                why.tell(fd, peer, limits);
                // Dropping the connection closes it, and the backend connection of an answer
                // in flight with it.
                break;
            }
        };
        // The timer is polled once, to register: the connection's own wake-ups (several per
        // request) then only ask whether it fired, not the timer wheel.
        let mut timer = std::pin::pin!(tokio::time::sleep(wait));
        let mut registered = false;
        // A write that starts to wait may need the send timeout sooner than this timer.
        let timer_end = state.ns().saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
        let send = u64::try_from(limits.send_timeout.as_nanos()).unwrap_or(u64::MAX);
        let mut blocked = state.blocked.load(Ordering::Relaxed);
        let ended = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = result.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            let now_blocked = state.blocked.load(Ordering::Relaxed);
            if now_blocked != blocked {
                blocked = now_blocked;
                if blocked != u64::MAX && blocked.saturating_add(send) < timer_end {
                    return Poll::Ready(None);
                }
            }
            // Unconstrained: out of its task's budget a first poll would not register at all.
            let fired = if registered {
                timer.is_elapsed()
            } else {
                Pin::new(&mut tokio::task::unconstrained(timer.as_mut())).poll(cx).is_ready()
            };
            registered = true;
            if fired { Poll::Ready(None) } else { Poll::Pending }
        })
        .await;
        if let Some(r) = ended {
            if let Err(e) = r {
                debug!(client = %peer, error = %e, "connection ended with an error");
            }
            break;
        }
    }
}

/// What an h2c listener's connection starts with (RFC 9113 3.3: HTTP/2 with prior knowledge
/// opens with its preface), and the bytes read to tell.
enum Start {
    Http1(Vec<u8>),
    Http2(Vec<u8>),
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the bytes differ from the HTTP/2 preface or are all of it.
async fn h2c_preface<I: AsyncRead + Unpin>(io: &mut I) -> io::Result<Start> {
    let mut first = vec![0; H2_PREFACE.len()];
    let mut n = 0;
    while n < first.len() {
        let got = tokio::io::AsyncReadExt::read(io, &mut first[n..]).await?;
        if got == 0 || first[n..n + got] != H2_PREFACE[n..n + got] {
            first.truncate(n + got);
            return Ok(Start::Http1(first));
        }
        n += got;
    }
    Ok(Start::Http2(first))
}

/// A stream whose first bytes, already read, are read again.
struct Rewind<I> {
    first: bytes::Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.first.is_empty() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let n = this.first.len().min(buf.remaining());
        buf.put_slice(&this.first.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
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

/// The client stream, counting what is read and noting writes that wait, for the watchdog.
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
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.state.wrote(r.is_pending());
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.state.wrote(r.is_pending());
        r
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

    #[tokio::test]
    async fn h2c_listeners_tell_http2_by_its_preface_and_replay_what_they_read() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (mut ours, mut client) = tokio::io::duplex(256);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(
            matches!(h2c_preface(&mut ours).await.unwrap(), Start::Http1(b) if b == b"GET / HTTP/1.1\r\n")
        );
        // The preface in pieces, a request after it: all of it read again.
        let (mut ours, mut client) = tokio::io::duplex(256);
        let task = tokio::spawn(async move {
            client.write_all(&H2_PREFACE[..5]).await.unwrap();
            tokio::task::yield_now().await;
            client.write_all(&H2_PREFACE[5..]).await.unwrap();
            client.write_all(b"frames").await.unwrap();
            client
        });
        let Start::Http2(first) = h2c_preface(&mut ours).await.unwrap() else { panic!("not HTTP/2") };
        let _client = task.await.unwrap();
        let mut again = Rewind { first: first.into(), io: ours };
        let mut all = vec![0; H2_PREFACE.len() + 6];
        again.read_exact(&mut all).await.unwrap();
        assert_eq!(&all[..H2_PREFACE.len()], H2_PREFACE);
        assert_eq!(&all[H2_PREFACE.len()..], b"frames");
        // Close to it, but HTTP/1.x.
        let (mut ours, mut client) = tokio::io::duplex(256);
        client.write_all(b"PRI * HTTP/1.1\r\n").await.unwrap();
        assert!(
            matches!(h2c_preface(&mut ours).await.unwrap(), Start::Http1(b) if b == b"PRI * HTTP/1.1\r\n")
        );
    }

    #[test]
    fn the_watchdog_tells_slow_heads_from_idle_connections_and_clients_that_read_nothing() {
        let ms = Duration::from_millis;
        let limits = Limits {
            header_timeout: ms(50),
            idle_timeout: ms(500),
            send_timeout: ms(100),
            ..Limits::default()
        };
        let s = ConnState::new(None);
        // Fresh: the header timeout runs from the start.
        assert!(s.check(&limits, false).is_ok());
        std::thread::sleep(ms(60));
        assert_eq!(s.check(&limits, false), Err(Expired::Idle), "nothing sent: closed quietly");
        // A partial head: 408 once the header timeout passes from its first byte.
        let s = ConnState::new(None);
        s.on_read(10);
        assert!(s.check(&limits, false).is_ok());
        std::thread::sleep(ms(60));
        assert_eq!(s.check(&limits, false), Err(Expired::Head));
        // After a request: idle gets the idle timeout, not the header timeout.
        let s = ConnState::new(None);
        s.on_read(100);
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(ms(60));
        assert!(s.check(&limits, false).is_ok(), "no timeout while a request is served");
        s.request_done();
        std::thread::sleep(ms(60));
        assert!(s.check(&limits, false).is_ok(), "idle for 60 ms of 500");

        // An answer the client does not take: the send timeout runs from the first write
        // that found no room, and any write that goes out restarts it.
        // (Margins of 340 ms: sleeps overshoot on a loaded machine.)
        let limits = Limits { send_timeout: ms(400), ..limits };
        let s = ConnState::new(None);
        s.on_read(100);
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        s.wrote(true);
        let wait = s.check(&limits, false).expect("within the send timeout");
        assert!(wait <= ms(400), "the next check comes by the send timeout: {wait:?}");
        std::thread::sleep(ms(60));
        s.wrote(true);
        assert!(s.check(&limits, false).is_ok(), "60 ms of 400, counted from the first wait");
        s.wrote(false);
        std::thread::sleep(ms(60));
        assert!(s.check(&limits, false).is_ok(), "a write went out: 60 ms without one is fine");
        s.wrote(true);
        std::thread::sleep(ms(410));
        assert_eq!(s.check(&limits, false), Err(Expired::Send), "blocked 410 ms: closed");
        assert_eq!(s.check(&limits, true), Err(Expired::Send), "over HTTP/2 too");
    }
}
