//! Connections to one backend, opened and reused here: TCP, the PROXY header, TLS, then (for
//! HTTP/2) hyper's handshake. HTTP/1.1 connections are kept idle under three bounds (count,
//! requests carried, idle time) and reused newest first; HTTP/2 shares one multiplexed
//! connection.
//!
//! HTTP/1.1 requests are written and answered by the request's own task (`h1`): a request
//! checks a connection out and the response body gives it back at its last byte.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Uri, header};
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http2,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::{
    io::AsyncWriteExt as _,
    net::TcpStream,
    sync::{Notify, OwnedSemaphorePermit, Semaphore, futures::Notified},
};
use tracing::debug;

use super::{
    h1,
    proxy::{BoxError, Conn, Forwarding, Frames, ReqBody},
    proxy_v2,
};
use crate::{
    config::{HttpService, Pool, Upstream, UpstreamProtocol},
    tls::TlsError,
};

/// How a service's connections to its backends are made and kept: its registry settings and
/// the TLS client made from them.
pub struct Settings {
    connect_timeout: Duration,
    pool: Pool,
    upstream: Upstream,
    tls: Option<(tokio_rustls::TlsConnector, Option<ServerName<'static>>)>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("connect_timeout", &self.connect_timeout)
            .field("pool", &self.pool)
            .field("upstream", &self.upstream)
            .finish_non_exhaustive()
    }
}

impl Settings {
    pub fn new(spec: &HttpService) -> Result<Self, TlsError> {
        let up = &spec.upstream;
        let http2 = up.protocol == UpstreamProtocol::Http2;
        let tls = match &up.tls {
            None => None,
            Some(t) => {
                let cfg = crate::tls::client_config(t, http2)?;
                let name = match &t.server_name {
                    None => None,
                    Some(n) => Some(ServerName::try_from(n.clone()).map_err(|e| {
                        TlsError::Settings(format!("server_name `{n}` is not a DNS name or address: {e}"))
                    })?),
                };
                Some((tokio_rustls::TlsConnector::from(Arc::new(cfg)), name))
            }
        };
        Ok(Self {
            connect_timeout: spec.timeouts.connect,
            pool: spec.pool.clone(),
            upstream: up.clone(),
            tls,
        })
    }

    /// True when `spec` would make the same settings (certificate file contents aside).
    #[must_use]
    pub fn made_from(&self, spec: &HttpService) -> bool {
        self.connect_timeout == spec.timeouts.connect
            && self.pool == spec.pool
            && self.upstream == spec.upstream
    }

    fn http2(&self) -> bool {
        self.upstream.protocol == UpstreamProtocol::Http2
    }
}

/// Why a request did not get a response from the backend.
#[derive(Debug)]
pub enum SendError {
    /// Nothing of the request reached the backend: connect, TLS or handshake failed, or the
    /// connection closed before the request was written. Safe to send elsewhere.
    NotSent(String),
    /// The request may have been (partly) sent.
    Failed(String),
}

/// An open HTTP/1.1 connection.
struct H1 {
    conn: h1::Conn,
    meta: Meta,
}

/// What the pool knows of an HTTP/1.1 connection.
struct Meta {
    /// Requests it carried.
    uses: u32,
    /// With the PROXY protocol, the client it speaks for.
    client: Option<SocketAddr>,
    /// Its place under `max_connections`, freed when it closes (or handed to the connection
    /// that replaces it).
    slot: Option<OwnedSemaphorePermit>,
    /// The edge thread whose reactor it is registered with: the one that opened it, or took
    /// it from another's list (`adopt`). It goes back to that thread's idle list, unless a
    /// waiter of another thread is woken for it (`put_back`).
    home: usize,
}

struct Idle {
    conn: H1,
    since: Instant,
}

/// The connections to one backend of one service.
pub struct BackendPool {
    /// `host:port`.
    identity: String,
    /// Its address, when `identity` is one (else it is resolved at each connect).
    addr: Option<SocketAddr>,
    settings: Arc<Settings>,
    /// Idle connections, a list per edge thread: a connection is registered with its thread's
    /// reactor, and requests there reuse it without waking another thread.
    idle: Box<[Mutex<VecDeque<Idle>>]>,
    /// Idle connections in all lists, against `max_idle`.
    idle_total: AtomicUsize,
    /// `max_connections` open connections at most (`None`: no cap).
    slots: Option<Arc<Semaphore>>,
    /// Requests waiting at `max_connections` for a connection, a count and a wake-up per
    /// edge thread: a connection going idle wakes a request of the thread it is registered
    /// with first, which then uses it without waking that thread for each read and write.
    waiters: Box<[Waiters]>,
    /// The HTTP/2 connection and the streams it carried. An async lock: concurrent first
    /// requests wait for one connection instead of opening one each.
    h2: tokio::sync::Mutex<Option<(http2::SendRequest<ReqBody>, u32)>>,
}

impl std::fmt::Debug for BackendPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendPool").field("identity", &self.identity).finish_non_exhaustive()
    }
}

/// A checked-out HTTP/1.1 connection's way home: its pool, when its response was read whole;
/// while it is out it holds its place under `max_connections`.
pub struct Home {
    pool: Arc<BackendPool>,
    meta: Meta,
}

impl h1::Return for Home {
    fn give_back(self, conn: h1::Conn, reusable: bool) {
        if reusable {
            self.pool.put_back(H1 { conn, meta: self.meta });
        }
    }
}

/// A backend's response body.
#[expect(
    clippy::large_enum_variant,
    reason = "the HTTP/1.1 body is the common one: not boxed, one allocation less"
)]
pub enum UpBody {
    H1(h1::ResponseBody<Home>),
    H2(Incoming),
}

impl UpBody {
    /// The fields of an HTTP/1.1 answer, kept raw for the client.
    pub const fn raw(&self) -> Option<&h1::RawFields> {
        match self {
            Self::H1(b) => b.raw(),
            Self::H2(_) => None,
        }
    }

    /// Moves the fields kept raw (if any) into `headers`, for what reads or changes them.
    pub fn unraw(&mut self, headers: &mut http::HeaderMap) {
        if let Self::H1(b) = self
            && let Some(raw) = b.take_raw()
        {
            raw.append_to(headers);
        }
    }

    /// The connection of a 101 answer and its place in the pool, for a tunnel.
    pub fn upgraded(self) -> Option<(h1::Conn, Home)> {
        match self {
            Self::H1(b) => b.upgraded(),
            Self::H2(_) => None,
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::H1(b) => std::pin::Pin::new(b).poll_frame(cx),
            Self::H2(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::H1(b) => b.is_end_stream(),
            Self::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::H1(b) => b.size_hint(),
            Self::H2(b) => b.size_hint(),
        }
    }
}

/// A request as it goes to a backend; borrowed, so a retry sends the same one elsewhere.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// Path and query.
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    /// Who the client is, added to `headers` as they go.
    pub forwarding: Option<&'a Forwarding>,
    /// Safe to send twice (RFC 9110 9.2.2): sent again on a fresh connection when a reused
    /// one closed without answering.
    pub idempotent: bool,
    /// The answer's fields may stay as they came (`h1::RawFields`): they go to an HTTP/1.1
    /// client and nothing on the way reads them.
    pub raw_answer: bool,
}

/// One edge thread's requests waiting at `max_connections`.
#[derive(Default)]
struct Waiters {
    count: AtomicUsize,
    /// Wake-ups sent to them and not yet taken: a thread is woken only while more of its
    /// requests wait than that (two connections returned before its one waiter ran would
    /// otherwise wake it twice, and another thread's waiter not at all).
    pending: AtomicUsize,
    /// When one of them last got a connection, or the first began to wait (`upstream::clock`):
    /// the thread whose requests went unserved longest goes first, so none starves.
    served: AtomicU64,
    returned: Notify,
}

impl Waiters {
    fn any(&self) -> bool {
        self.count.load(Ordering::Relaxed) > 0
    }

    fn wants(&self) -> bool {
        self.count.load(Ordering::Relaxed) > self.pending.load(Ordering::Relaxed)
    }

    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn mark_served(&self) {
        self.served.store(super::upstream::clock(Instant::now()), Ordering::Relaxed);
    }

    fn took(&self) {
        let _ = self.pending.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| p.checked_sub(1));
    }

    /// Counts a wake-up for them if one still wants it (in one step: two threads returning
    /// connections at once cannot both count on the same waiter).
    fn claim(&self) -> bool {
        (self.pending)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |p| {
                (self.count.load(Ordering::Relaxed) > p).then_some(p + 1)
            })
            .is_ok()
    }
}

/// How much longer another thread's waiting requests must have gone unserved than those of a
/// returned connection's own thread to be woken first (and move it to their thread).
const UNSERVED_SLACK_NS: u64 = 1_000_000;

/// A request waiting at the cap: counted with its thread's until dropped, and its wake-up.
struct Waiting<'a> {
    pool: &'a BackendPool,
    thread: usize,
    /// Boxed to be re-armed in place; only requests at the cap pay for it.
    returned: Pin<Box<Notified<'a>>>,
    /// The wake-up `returned` waits for was taken.
    taken: bool,
}

impl<'a> Waiting<'a> {
    fn new(pool: &'a BackendPool, thread: usize) -> Self {
        let w = &pool.waiters[thread];
        // Counted before the waiter first looks through the idle lists, under their locks: a
        // connection pushed to a list after that look sees the count (the lock orders them),
        // one pushed before it is found.
        if w.count.fetch_add(1, Ordering::Relaxed) == 0 {
            w.mark_served();
        }
        Self { pool, thread, returned: Box::pin(w.returned.notified()), taken: false }
    }

    fn waiters(&self) -> &'a Waiters {
        &self.pool.waiters[self.thread]
    }

    /// Armed for the next wake-up, before a look through the idle lists. True when one was
    /// already stored for this thread (and is now taken).
    fn arm(&mut self) -> bool {
        self.returned.set(self.waiters().returned.notified());
        self.taken = self.returned.as_mut().enable();
        if self.taken {
            self.waiters().took();
        }
        self.taken
    }

    async fn woken(&mut self) {
        self.returned.as_mut().await;
        self.taken = true;
        self.waiters().took();
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let w = self.waiters();
        // Counted out before looking for a wake-up it did not take (SeqCst, with the load in
        // `put_back`): a thread that picked this request and notifies it as it leaves either
        // sees it gone and wakes another, or its wake-up is seen here.
        let last = w.count.fetch_sub(1, Ordering::SeqCst) == 1;
        let unused =
            !self.taken && self.returned.as_mut().poll(&mut Context::from_waker(Waker::noop())).is_ready();
        if unused {
            w.took();
        }
        if last {
            // None left: no wake-up can be owed to them (`Notify` keeps one permit for two
            // wake-ups sent while no waiter was registered, which would leave one counted).
            w.pending.store(0, Ordering::Relaxed);
        }
        // Passed on while a connection it could have been for is idle; one it took itself
        // leaves none.
        if unused && self.pool.idle_total.load(Ordering::Relaxed) > 0 {
            self.pool.wake_one(self.thread);
        }
    }
}

impl BackendPool {
    #[must_use]
    pub fn new(identity: &str, settings: Arc<Settings>) -> Self {
        Self::for_threads(identity, settings, super::workers::count())
    }

    /// A pool for `threads` edge threads (tests play two on any machine).
    fn for_threads(identity: &str, settings: Arc<Settings>, threads: usize) -> Self {
        let cap = settings.pool.max_connections;
        Self {
            identity: identity.to_owned(),
            addr: identity.parse().ok(),
            settings,
            idle: (0..threads).map(|_| Mutex::new(VecDeque::new())).collect(),
            idle_total: AtomicUsize::new(0),
            slots: (cap > 0).then(|| Arc::new(Semaphore::new(cap as usize))),
            waiters: (0..threads).map(|_| Waiters::default()).collect(),
            h2: tokio::sync::Mutex::new(None),
        }
    }

    #[must_use]
    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// Sends a request (its headers with a Host) on a pooled or new connection.
    pub async fn send(
        self: &Arc<Self>,
        req: &Outgoing<'_>,
        body: ReqBody,
        conn: &Conn,
    ) -> Result<Response<UpBody>, SendError> {
        if self.settings.http2() {
            // Boxed, as connecting below: rarely taken, large futures that every request's
            // future would otherwise carry and copy.
            return Box::pin(self.send_h2(req, body, conn)).await.map(|r| r.map(UpBody::H2));
        }
        let client = self.settings.upstream.proxy_protocol.then_some(conn.client);
        // A body held whole can go again on a fresh connection when a reused one was found
        // closed; a streamed one cannot.
        let replay = match &body {
            Frames::Full(b) => Some(b.clone()),
            Frames::Stream(_) => None,
        };
        let mut body = Some(body);
        let mut fresh = false;
        let mut reserved = None;
        loop {
            let (mut c, pooled) = self.obtain(conn, client, fresh, reserved.take()).await?;
            c.meta.uses += 1;
            let max = self.settings.pool.max_requests;
            // The last request it carries: the backend closes it cleanly after answering.
            let last = max != 0 && c.meta.uses >= max;
            let Some(b) = body.take() else { unreachable!("a body for each round") };
            match c.conn.exchange(req, last, b).await {
                Ok(mut head) => {
                    let home = Home { pool: self.clone(), meta: c.meta };
                    let body = UpBody::H1(h1::ResponseBody::new(c.conn, &mut head, home));
                    let mut resp = Response::new(body);
                    *resp.status_mut() = head.status;
                    *resp.version_mut() = head.version;
                    *resp.headers_mut() = head.headers;
                    return Ok(resp);
                }
                // A reused connection the backend had closed, found as the request went: once
                // more on a new one. Only when nothing of the request went, or it may be sent
                // twice.
                Err(e @ (h1::Error::Unsent | h1::Error::Closed))
                    if pooled
                        && !fresh
                        && replay.is_some()
                        && (matches!(e, h1::Error::Unsent) || req.idempotent) =>
                {
                    debug!(backend = %self.identity, "pooled connection was closed; a new one");
                    body = replay.clone().map(Frames::Full);
                    fresh = true;
                    // Its place under the cap goes to the new one, without queueing again.
                    reserved = c.meta.slot.take();
                }
                Err(e @ h1::Error::Unsent) => return Err(SendError::NotSent(e.to_string())),
                Err(e) => return Err(SendError::Failed(e.to_string())),
            }
        }
    }

    async fn send_h2(
        &self,
        out: &Outgoing<'_>,
        body: ReqBody,
        conn: &Conn,
    ) -> Result<Response<Incoming>, SendError> {
        let mut req = Request::new(body);
        *req.method_mut() = out.method.clone();
        *req.headers_mut() = out.headers.clone();
        if let Some(f) = out.forwarding {
            f.set(req.headers_mut());
        }
        let mut req = h2_form(req, out.target, self.settings.tls.is_some(), &self.identity);
        for fresh in [false, true] {
            let mut tx = self.h2_sender(conn, fresh).await?;
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => req = r,
                    Some(_) => return Err(SendError::NotSent(error_text(&e.into_error()))),
                    None => {
                        return Err(SendError::Failed(error_text(&e.into_error())));
                    }
                },
            }
        }
        unreachable!("the second round returns")
    }

    /// The shared HTTP/2 connection, opened when there is none, it closed, it carried its
    /// streams, or (`fresh`) it just refused a request.
    async fn h2_sender(&self, conn: &Conn, fresh: bool) -> Result<http2::SendRequest<ReqBody>, SendError> {
        let mut slot = self.h2.lock().await;
        let max = self.settings.pool.max_requests;
        if let Some((tx, uses)) = slot.as_mut()
            && !fresh
            && !tx.is_closed()
            && (max == 0 || *uses < max)
        {
            *uses += 1;
            return Ok(tx.clone());
        }
        // A replaced connection finishes the streams it has, then closes.
        *slot = None;
        let tx = self.handshake_h2(Box::pin(self.connect(conn)).await?).await?;
        *slot = Some((tx.clone(), 1));
        Ok(tx)
    }

    /// A connection for the next request: an idle one of this thread, else a new one; at
    /// `max_connections`, another thread's idle one, else the first to go idle or close. True
    /// when it was idle. `fresh`: a new one, in the place `reserved` (the closed one's).
    async fn obtain(
        &self,
        conn: &Conn,
        client: Option<SocketAddr>,
        fresh: bool,
        reserved: Option<OwnedSemaphorePermit>,
    ) -> Result<(H1, bool), SendError> {
        let here = super::workers::current() % self.idle.len();
        if !fresh && let Some(c) = self.take_from(here, here, client) {
            return Ok((c, true));
        }
        let slot = match (&self.slots, reserved) {
            (_, Some(p)) => Some(p),
            (None, None) => None,
            (Some(sem), None) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => match self.wait(here, client, fresh, sem).await {
                    Ok(c) => return Ok((c, true)),
                    Err(p) => p,
                },
            },
        };
        let io = Box::pin(self.connect(conn)).await?;
        let meta = Meta { uses: 0, client, slot, home: here };
        Ok((H1 { conn: h1::Conn::new(io), meta }, false))
    }

    /// At `max_connections`: an idle connection as soon as one is returned (this thread's
    /// first, else another's, moved here), or (`Err`) a place: one freed, or that of an idle
    /// connection this request cannot use (`fresh`, or another client's with the PROXY
    /// protocol), closed for it.
    async fn wait(
        &self,
        here: usize,
        client: Option<SocketAddr>,
        fresh: bool,
        sem: &Arc<Semaphore>,
    ) -> Result<H1, Option<OwnedSemaphorePermit>> {
        let mut waiting = Waiting::new(self, here);
        let w = &self.waiters[here];
        loop {
            let stored = waiting.arm();
            if !fresh && let Some(c) = self.take_idle(here, client) {
                w.mark_served();
                return Ok(c);
            }
            // One that went idle since the look above is not closed: the next lap takes it.
            let unusable = |c: &H1| fresh || c.meta.client != client;
            if let Some(p) = sem.clone().try_acquire_owned().ok().or_else(|| self.reclaim_idle(unusable)) {
                w.mark_served();
                return Err(Some(p));
            }
            if stored {
                // Taken by the look above, or meant for a request gone: wait for the next.
                continue;
            }
            tokio::select! {
                () = waiting.woken() => {}
                p = sem.clone().acquire_owned() => {
                    w.mark_served();
                    return Err(p.ok());
                }
            }
        }
    }

    /// An idle connection for `client` from idle list `list`, registered with thread `here`'s
    /// reactor (moved there if it was another's).
    fn take_from(&self, list: usize, here: usize, client: Option<SocketAddr>) -> Option<H1> {
        while let Some(c) = self.checkout(list, client) {
            if c.meta.home == here {
                return Some(c);
            }
            // Closed as it moved: the list's next.
            if let Some(c) = Self::adopt(c, here) {
                return Some(c);
            }
        }
        None
    }

    /// An idle connection for `client` from any thread's list, this thread's first.
    fn take_idle(&self, here: usize, client: Option<SocketAddr>) -> Option<H1> {
        let n = self.idle.len();
        (0..n).find_map(|k| self.take_from((here + k) % n, here, client))
    }

    /// Closes the oldest idle connection of any thread that `unusable` picks; its place under
    /// the cap.
    fn reclaim_idle(&self, unusable: impl Fn(&H1) -> bool) -> Option<OwnedSemaphorePermit> {
        self.idle.iter().find_map(|list| {
            let mut q = list.lock().unwrap_or_else(PoisonError::into_inner);
            let oldest = q.iter().position(|i| unusable(&i.conn)).and_then(|at| q.remove(at))?;
            drop(q);
            self.idle_total.fetch_sub(1, Ordering::Relaxed);
            let mut c = oldest.conn;
            c.meta.slot.take()
        })
    }

    /// The thread whose waiter a connection going idle on thread `home` wakes, its wake-up
    /// counted: one of `home`'s own (the connection is registered there), unless another
    /// thread's requests went unserved `UNSERVED_SLACK_NS` longer; else any thread's that
    /// still wants one.
    fn claim_waiter(&self, home: usize) -> Option<usize> {
        let own = &self.waiters[home];
        let others = || (0..self.waiters.len()).filter(move |&k| k != home);
        let starving = others()
            .filter(|&k| self.waiters[k].wants())
            .min_by_key(|&k| self.waiters[k].served())
            .filter(|&k| self.waiters[k].served().saturating_add(UNSERVED_SLACK_NS) < own.served());
        starving.into_iter().chain([home]).chain(others()).find(|&k| self.waiters[k].claim())
    }

    /// Wakes the waiter `claim_waiter` picks.
    fn wake_one(&self, home: usize) {
        if let Some(k) = self.claim_waiter(home) {
            self.waiters[k].returned.notify_one();
        }
    }

    /// Another thread's idle connection, moved to this thread's reactor (`here`): one used
    /// where it is registered wakes that thread for every read and write, across threads. A
    /// TLS one cannot move and is borrowed as it is. `None` if it closed. Not asked again
    /// whether the backend closed it: `checkout` just asked as for a connection of this
    /// thread (what the old reactor saw); a close neither saw yet is met as on any pooled
    /// connection, the request then sent again on a new one (`send`).
    fn adopt(mut c: H1, here: usize) -> Option<H1> {
        match c.conn.rehome() {
            Ok(Some(conn)) => {
                c.conn = conn;
                c.meta.home = here;
                Some(c)
            }
            Ok(None) => None,
            Err(conn) => {
                c.conn = conn;
                Some(c)
            }
        }
    }

    /// The newest idle connection for `client` in idle list `list` that is still open,
    /// dropping expired ones.
    fn checkout(&self, list: usize, client: Option<SocketAddr>) -> Option<H1> {
        loop {
            let idle = {
                let mut q = self.idle[list].lock().unwrap_or_else(PoisonError::into_inner);
                let gone = expire(&mut q, Instant::now(), self.settings.pool.idle_timeout);
                let taken = q.iter().rposition(|i| i.conn.meta.client == client).and_then(|at| q.remove(at));
                self.idle_total.fetch_sub(gone + usize::from(taken.is_some()), Ordering::Relaxed);
                taken?
            };
            let c = idle.conn;
            // Closed by the backend while idle: dropped.
            if c.conn.is_open() {
                return Some(c);
            }
        }
    }

    fn put_back(&self, c: H1) {
        let p = &self.settings.pool;
        // Dropping a connection closes it (and frees its slot).
        if p.max_idle == 0 || (p.max_requests != 0 && c.meta.uses >= p.max_requests) {
            return;
        }
        let home = c.meta.home;
        let here = super::workers::current() % self.idle.len();
        let len = |k: usize| self.idle[k].lock().unwrap_or_else(PoisonError::into_inner).len();
        // Registered with another thread's reactor: a TLS one borrowed at the cap (plain ones
        // move as they are taken, `adopt`). When this thread had none idle while its own had
        // more, it is closed, so this thread opens one of its own, unless requests wait at the
        // cap (one of them takes it, rather than a new connection).
        if here != home && len(here) < len(home) && !self.waiters.iter().any(Waiters::any) {
            return;
        }
        // At the cap, it goes to the list of the thread whose waiter it wakes: not to be taken
        // by a request arriving on its own thread meanwhile.
        let target = if self.slots.is_some() { self.claim_waiter(home) } else { None };
        let list = target.unwrap_or(home);
        let mut q = self.idle[list].lock().unwrap_or_else(PoisonError::into_inner);
        if self.idle_total.load(Ordering::Relaxed) >= p.max_idle {
            if q.pop_front().is_none() {
                // The idle ones are other threads': their oldest makes room, so a quiet
                // thread keeps connections of its own while a busy one holds the quota.
                drop(q);
                let others = (1..self.idle.len()).map(|k| (list + k) % self.idle.len());
                let evicted = others.into_iter().any(|k| {
                    self.idle[k].lock().unwrap_or_else(PoisonError::into_inner).pop_front().is_some()
                });
                if !evicted {
                    // Closed: the waiter woken finds none and waits again.
                    if let Some(k) = target {
                        self.waiters[k].returned.notify_one();
                    }
                    return;
                }
                q = self.idle[list].lock().unwrap_or_else(PoisonError::into_inner);
            }
        } else {
            self.idle_total.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(Idle { conn: c, since: Instant::now() });
        drop(q);
        match target {
            Some(k) => {
                self.waiters[k].returned.notify_one();
                // The request picked may have left meanwhile without it (`Waiting::drop`).
                if self.waiters[k].count.load(Ordering::SeqCst) == 0 {
                    self.wake_one(list);
                }
            }
            // Waiters that looked through this list before the push are counted by now
            // (`Waiting::new`).
            None if self.slots.is_some() => self.wake_one(list),
            None => {}
        }
    }

    /// Closes idle connections unused for the idle timeout.
    pub fn sweep(&self, now: Instant) {
        for q in &self.idle {
            let mut q = q.lock().unwrap_or_else(PoisonError::into_inner);
            let before = q.len();
            expire(&mut q, now, self.settings.pool.idle_timeout);
            q.retain_mut(|i| i.conn.conn.is_open());
            self.idle_total.fetch_sub(before - q.len(), Ordering::Relaxed);
        }
    }

    /// A new connection's socket: TCP, the PROXY header, TLS.
    async fn connect(&self, conn: &Conn) -> Result<h1::Stream, SendError> {
        let s = &self.settings;
        let not_sent = |what: &str, e: &dyn std::fmt::Display| SendError::NotSent(format!("{what}: {e}"));
        let tcp = async {
            let addr = match self.addr {
                Some(a) => a,
                None => tokio::net::lookup_host(self.identity.as_str())
                    .await?
                    .next()
                    .ok_or_else(|| std::io::Error::other("the name has no address"))?,
            };
            let mut tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            if s.upstream.proxy_protocol {
                tcp.write_all(&proxy_v2::header(conn.client, conn.local)).await?;
            }
            std::io::Result::Ok(tcp)
        };
        let tcp = match tokio::time::timeout(s.connect_timeout, tcp).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(not_sent("connect", &e)),
            Err(_) => return Err(not_sent("connect", &"timed out")),
        };
        let Some((connector, name)) = &s.tls else {
            return Ok(h1::Stream::Plain(tcp));
        };
        let name = match name {
            Some(n) => n.clone(),
            None => host_name(&self.identity).ok_or_else(|| not_sent("TLS", &"no server name"))?,
        };
        match tokio::time::timeout(s.connect_timeout, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => Ok(h1::Stream::Tls(Box::new(tls))),
            Ok(Err(e)) => Err(not_sent("TLS handshake", &e)),
            Err(_) => Err(not_sent("TLS handshake", &"timed out")),
        }
    }

    async fn handshake_h2(&self, io: h1::Stream) -> Result<http2::SendRequest<ReqBody>, SendError> {
        let identity = self.identity.clone();
        let (tx, c) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::NotSent(format!("handshake: {}", error_text(&e))))?;
        tokio::spawn(async move {
            if let Err(e) = c.await {
                debug!(backend = %identity, error = %e, "HTTP/2 connection ended");
            }
        });
        Ok(tx)
    }
}

/// Drops idle connections older than `timeout` (the oldest are at the front); how many.
fn expire(q: &mut VecDeque<Idle>, now: Instant, timeout: Duration) -> usize {
    let before = q.len();
    while q.front().is_some_and(|i| now.saturating_duration_since(i.since) >= timeout) {
        q.pop_front();
    }
    before - q.len()
}

fn error_text(e: &hyper::Error) -> String {
    crate::logging::error_chain(e)
}

/// The name a backend's certificate is checked against, from `host:port`.
fn host_name(identity: &str) -> Option<ServerName<'static>> {
    let (host, _) = identity.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).ok()
}

/// An HTTP/2 request names its target in the URI (`:scheme`, `:authority`), not in `Host`.
fn h2_form(mut req: Request<ReqBody>, target: &str, tls: bool, identity: &str) -> Request<ReqBody> {
    let authority = req.headers_mut().remove(header::HOST);
    let authority = authority.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(identity);
    let pq = if target.is_empty() { "/" } else { target };
    if let Ok(uri) = Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(authority)
        .path_and_query(pq)
        .build()
    {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_2;
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend on loopback answering each HTTP/1.1 request of a connection with `ok`; the
    /// connections it accepted are counted.
    fn backend() -> (SocketAddr, Arc<AtomicUsize>) {
        use std::io::{Read as _, Write as _};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for mut c in l.incoming().map_while(Result::ok) {
                count.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let (mut buf, mut have) = ([0u8; 4096], 0);
                    while let Ok(n @ 1..) = c.read(&mut buf[have..]) {
                        have += n;
                        while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.copy_within(end + 4..have, 0);
                            have -= end + 4;
                            if c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// One GET through `pool`, its body read whole (the connection then goes back idle).
    async fn get(pool: &Arc<BackendPool>) -> (u16, Bytes) {
        use http_body_util::BodyExt as _;
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, http::HeaderValue::from_static("example.org"));
        let out = Outgoing {
            method: &Method::GET,
            target: "/",
            headers: &headers,
            forwarding: None,
            idempotent: true,
            raw_answer: true,
        };
        let any = SocketAddr::from(([127, 0, 0, 1], 1));
        let conn =
            Conn { client: any, local: any, port: 80, tls: false, tunnel_idle: Duration::from_secs(1) };
        let resp = pool.send(&out, Frames::Full(None), &conn).await.map_err(|e| format!("{e:?}")).unwrap();
        let status = resp.status().as_u16();
        (status, resp.into_body().collect().await.unwrap().to_bytes())
    }

    /// A pool for the backend at `addr`, `max_connections` at most, for two edge threads.
    fn capped(addr: SocketAddr, max: u32) -> Arc<BackendPool> {
        let reg = crate::config::parse(
            &format!(
                "version: 1\nhttp:\n  s:\n    backends: [{{host: {}, port: {}}}]\n    pool: {{max_connections: {max}}}\n",
                addr.ip(),
                addr.port()
            ),
            std::path::Path::new("t.yaml"),
        )
        .unwrap();
        let settings = Arc::new(Settings::new(&reg.http["s"]).unwrap());
        // Two edge threads, whatever this machine's CPUs.
        Arc::new(BackendPool::for_threads(&addr.to_string(), settings, 2))
    }

    #[test]
    fn a_returned_connection_wakes_a_waiter_of_its_thread_unless_another_threads_starve() {
        let pool = capped(SocketAddr::from(([127, 0, 0, 1], 9)), 2);
        let (a, b) = (&pool.waiters[0], &pool.waiters[1]);
        // Whether a wake-up was sent to the thread (stored, as no request awaits it here).
        let woken = |w: &Waiters| std::pin::pin!(w.returned.notified()).enable();
        pool.wake_one(0);
        assert!(!woken(a) && !woken(b), "nobody waits: nobody is woken");
        // Served times set by hand (ns): thread 1's waiters went unserved longer, but by less
        // than the slack.
        let t = 10 * UNSERVED_SLACK_NS;
        for (w, served) in [(a, t), (b, t - UNSERVED_SLACK_NS / 2)] {
            w.count.store(1, Ordering::Relaxed);
            w.served.store(served, Ordering::Relaxed);
        }
        pool.wake_one(0);
        assert!(woken(a) && !woken(b), "both wait, thread 1's not starving: the connection's own thread");
        pool.wake_one(0);
        assert!(woken(b) && !woken(a), "its one waiter has a wake-up already: the other thread's");
        a.pending.store(0, Ordering::Relaxed);
        b.pending.store(0, Ordering::Relaxed);
        b.served.store(t - 2 * UNSERVED_SLACK_NS, Ordering::Relaxed);
        pool.wake_one(0);
        assert!(woken(b) && !woken(a), "the other thread's requests went unserved longer: theirs");
        b.pending.store(0, Ordering::Relaxed);
        b.count.store(0, Ordering::Relaxed);
        pool.wake_one(1);
        assert!(woken(a) && !woken(b), "only thread 0's wait: thread 1's connection goes to them");
        // A request of thread 0 woken but leaving without the wake-up (it found a connection or
        // a place first, or its deadline passed): the wake-up goes on to thread 1's waiter.
        a.count.store(0, Ordering::Relaxed);
        a.pending.store(0, Ordering::Relaxed);
        b.count.store(1, Ordering::Relaxed);
        let mut w = Waiting::new(&pool, 0);
        for (w, served) in [(a, t), (b, t)] {
            w.served.store(served, Ordering::Relaxed);
        }
        assert!(!w.arm());
        pool.wake_one(0);
        assert_eq!(a.pending.load(Ordering::Relaxed), 1, "sent to thread 0's own waiter");
        // Passed on only while a connection is idle for it.
        pool.idle_total.store(1, Ordering::Relaxed);
        drop(w);
        assert_eq!(a.pending.load(Ordering::Relaxed), 0);
        assert!(woken(b) && !woken(a), "passed on to thread 1's");
    }

    #[test]
    fn a_request_wanting_a_new_connection_at_the_cap_closes_an_idle_one_for_its_place() {
        let (addr, _) = backend();
        let pool = capped(addr, 1);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(rt.block_on(get(&pool)), (200, Bytes::from_static(b"ok")));
        assert_eq!(pool.idle_total.load(Ordering::Relaxed), 1, "the one connection allowed, idle");
        // A request sent again on a new connection (its pooled one found closed, its place
        // not kept) may not use the idle one: waiting for a place would wait for ever.
        let any = SocketAddr::from(([127, 0, 0, 1], 1));
        let conn =
            Conn { client: any, local: any, port: 80, tls: false, tunnel_idle: Duration::from_secs(1) };
        let got = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), pool.obtain(&conn, None, true, None)).await
        });
        let (c, pooled) =
            got.expect("a new connection without waiting").map_err(|e| format!("{e:?}")).unwrap();
        assert!(!pooled, "a new connection");
        assert!(c.meta.slot.is_some(), "in the closed one's place");
        assert_eq!(pool.idle_total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_connection_taken_from_another_thread_at_the_cap_moves_to_the_taker() {
        let (addr, accepted) = backend();
        let pool = capped(addr, 1);
        let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        // Edge thread 0 (this one) opens the one connection allowed; idle, it stays in thread
        // 0's list, registered with this runtime's reactor.
        let rt0 = runtime();
        assert_eq!(rt0.block_on(get(&pool)), (200, Bytes::from_static(b"ok")));
        // Edge thread 1, at the cap, takes it while thread 0's reactor stands still (nothing
        // runs `rt0` now). Borrowed as it was, its answer would wait on that reactor forever.
        let p = pool.clone();
        let (answer, _rt1) = std::thread::spawn(move || {
            crate::edge::workers::set_current(1);
            let rt1 = runtime();
            let answer = rt1.block_on(async { tokio::time::timeout(Duration::from_secs(10), get(&p)).await });
            // Kept, not run: the connection is now registered with its reactor.
            (answer, rt1)
        })
        .join()
        .unwrap();
        let ok = Some((200, Bytes::from_static(b"ok")));
        assert_eq!(answer.ok(), ok, "thread 1's request on thread 0's connection");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, taken by the other thread");
        // Thread 0 takes it back the same way while thread 1's reactor stands still.
        let back = rt0.block_on(async { tokio::time::timeout(Duration::from_secs(10), get(&pool)).await });
        assert_eq!(back.ok(), ok, "thread 0's request on the connection thread 1 took");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn backend_names_for_tls_come_from_the_identity() {
        assert_eq!(host_name("api.internal:8443"), Some(ServerName::try_from("api.internal").unwrap()));
        assert_eq!(host_name("10.0.0.5:443"), Some(ServerName::try_from("10.0.0.5").unwrap()));
        assert_eq!(host_name("[2001:db8::5]:443"), Some(ServerName::try_from("2001:db8::5").unwrap()));
    }

    #[test]
    fn http2_requests_carry_the_host_as_authority() {
        let mut req = Request::new(super::super::proxy::Frames::Full(None));
        req.headers_mut().insert(header::HOST, http::HeaderValue::from_static("app.example.org"));
        let req = h2_form(req, "/a?b=1", true, "10.0.0.5:443");
        assert_eq!(req.uri().to_string(), "https://app.example.org/a?b=1");
        assert!(!req.headers().contains_key(header::HOST));
        let req = h2_form(Request::new(super::super::proxy::Frames::Full(None)), "", false, "10.0.0.5:80");
        assert_eq!(req.uri().to_string(), "http://10.0.0.5:80/");
    }
}
