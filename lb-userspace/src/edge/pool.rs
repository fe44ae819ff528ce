//! Connections to one backend, opened and reused here: TCP, the PROXY header, TLS, then hyper's
//! handshake. HTTP/1.1 connections are kept idle under three bounds (count, requests carried,
//! idle time) and reused newest first; HTTP/2 shares one multiplexed connection.
//!
//! hyper's own connection types are used directly, not hyper-util's pooled client: a request
//! checks a connection out and the response body hands it back when it ends, with no task
//! spawned per request to wait for the connection to become ready again.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response, Uri, header};
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
};
use tracing::debug;

use super::{
    proxy::{Conn, ReqBody},
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
    tx: http1::SendRequest<ReqBody>,
    /// Requests it carried.
    uses: u32,
    /// With the PROXY protocol, the client it speaks for.
    client: Option<SocketAddr>,
    /// Its place under `max_connections`, freed when it closes.
    _slot: Option<OwnedSemaphorePermit>,
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
    /// Idle connections, a list per edge thread: a connection's task runs on the thread that
    /// opened it, and requests there reuse it without waking another thread.
    idle: Box<[Mutex<VecDeque<Idle>>]>,
    /// Idle connections in all lists, against `max_idle`.
    idle_total: AtomicUsize,
    /// `max_connections` open connections at most (`None`: no cap).
    slots: Option<Arc<Semaphore>>,
    /// Woken when a connection goes idle, for requests waiting at the cap.
    returned: Notify,
    /// The HTTP/2 connection and the streams it carried. An async lock: concurrent first
    /// requests wait for one connection instead of opening one each.
    h2: tokio::sync::Mutex<Option<(http2::SendRequest<ReqBody>, u32)>>,
}

impl std::fmt::Debug for BackendPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendPool").field("identity", &self.identity).finish_non_exhaustive()
    }
}

/// A checked-out HTTP/1.1 connection: back to the pool when its response was read whole.
pub struct Lease {
    pool: Arc<BackendPool>,
    conn: H1,
}

impl Lease {
    /// The response ended cleanly: the connection may carry another request.
    pub fn release(self) {
        self.pool.put_back(self.conn);
    }
}

enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

impl BackendPool {
    #[must_use]
    pub fn new(identity: &str, settings: Arc<Settings>) -> Self {
        let cap = settings.pool.max_connections;
        Self {
            identity: identity.to_owned(),
            addr: identity.parse().ok(),
            settings,
            idle: (0..super::workers::count()).map(|_| Mutex::new(VecDeque::new())).collect(),
            idle_total: AtomicUsize::new(0),
            slots: (cap > 0).then(|| Arc::new(Semaphore::new(cap as usize))),
            returned: Notify::new(),
            h2: tokio::sync::Mutex::new(None),
        }
    }

    #[must_use]
    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// Sends `req` (origin-form URI, with a Host header) on a pooled or new connection.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<ReqBody>,
        conn: &Conn,
    ) -> Result<(Response<Incoming>, Option<Lease>), SendError> {
        if self.settings.http2() {
            return self.send_h2(req, conn).await.map(|r| (r, None));
        }
        let client = self.settings.upstream.proxy_protocol.then_some(conn.client);
        let mut req = req;
        loop {
            let (mut c, pooled) = self.obtain(conn, client).await?;
            c.uses += 1;
            let max = self.settings.pool.max_requests;
            if max != 0 && c.uses >= max {
                // The last request it carries: the backend closes it cleanly after answering.
                req.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            match c.tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Some(Lease { pool: self.clone(), conn: c }))),
                Err(mut e) => match e.take_message() {
                    // A pooled connection the backend had closed: the request is intact.
                    Some(r) if pooled => {
                        debug!(backend = %self.identity, "pooled connection was closed; another one");
                        req = r;
                        req.headers_mut().remove(header::CONNECTION);
                    }
                    Some(_) => return Err(SendError::NotSent(error_text(&e.into_error()))),
                    None => return Err(SendError::Failed(error_text(&e.into_error()))),
                },
            }
        }
    }

    async fn send_h2(&self, req: Request<ReqBody>, conn: &Conn) -> Result<Response<Incoming>, SendError> {
        let mut req = h2_form(req, self.settings.tls.is_some(), &self.identity);
        for fresh in [false, true] {
            let mut tx = self.h2_sender(conn, fresh).await?;
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    Some(r) if !fresh => req = r,
                    Some(_) => return Err(SendError::NotSent(error_text(&e.into_error()))),
                    None => return Err(SendError::Failed(error_text(&e.into_error()))),
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
        let Sender::H2(tx) = self.connect(conn).await? else { unreachable!("HTTP/2 settings") };
        *slot = Some((tx.clone(), 1));
        Ok(tx)
    }

    /// A connection for the next request: an idle one, else a new one; at `max_connections`,
    /// the first to go idle or close. True when it was idle.
    async fn obtain(&self, conn: &Conn, client: Option<SocketAddr>) -> Result<(H1, bool), SendError> {
        loop {
            if let Some(c) = self.checkout(client).await {
                return Ok((c, true));
            }
            let slot = match &self.slots {
                None => None,
                Some(sem) => match sem.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        // At the cap: queued until a connection goes idle or closes.
                        tokio::select! {
                            () = self.returned.notified() => continue,
                            p = sem.clone().acquire_owned() => p.ok(),
                        }
                    }
                },
            };
            let Sender::H1(tx) = self.connect(conn).await? else { unreachable!("HTTP/1.1 settings") };
            return Ok((H1 { tx, uses: 0, client, _slot: slot }, false));
        }
    }

    /// The newest idle connection for `client` that is still open, this thread's first,
    /// dropping expired ones.
    async fn checkout(&self, client: Option<SocketAddr>) -> Option<H1> {
        let here = super::workers::current() % self.idle.len();
        let order = (0..self.idle.len()).map(|k| (here + k) % self.idle.len());
        for list in order {
            loop {
                let idle = {
                    let mut q = self.idle[list].lock().unwrap_or_else(PoisonError::into_inner);
                    let gone = expire(&mut q, Instant::now(), self.settings.pool.idle_timeout);
                    let taken = q.iter().rposition(|i| i.conn.client == client).and_then(|at| q.remove(at));
                    self.idle_total.fetch_sub(gone + usize::from(taken.is_some()), Ordering::Relaxed);
                    match taken {
                        Some(i) => i,
                        None => break,
                    }
                };
                let mut c = idle.conn;
                if c.tx.is_closed() {
                    continue;
                }
                // Its last response was read whole, but its task may not have run since.
                if !c.tx.is_ready()
                    && !matches!(
                        tokio::time::timeout(self.settings.connect_timeout, c.tx.ready()).await,
                        Ok(Ok(()))
                    )
                {
                    continue;
                }
                return Some(c);
            }
        }
        None
    }

    fn put_back(&self, c: H1) {
        let p = &self.settings.pool;
        // Dropping a connection closes it (and frees its slot).
        if p.max_idle == 0 || (p.max_requests != 0 && c.uses >= p.max_requests) || c.tx.is_closed() {
            return;
        }
        let mut q = self.idle().lock().unwrap_or_else(PoisonError::into_inner);
        if self.idle_total.load(Ordering::Relaxed) >= p.max_idle {
            if q.pop_front().is_none() {
                return; // the idle ones are other threads': this one closes
            }
        } else {
            self.idle_total.fetch_add(1, Ordering::Relaxed);
        }
        q.push_back(Idle { conn: c, since: Instant::now() });
        drop(q);
        if self.slots.is_some() {
            self.returned.notify_one();
        }
    }

    /// This thread's idle list.
    fn idle(&self) -> &Mutex<VecDeque<Idle>> {
        &self.idle[super::workers::current() % self.idle.len()]
    }

    /// Closes idle connections unused for the idle timeout.
    pub fn sweep(&self, now: Instant) {
        for q in &self.idle {
            let mut q = q.lock().unwrap_or_else(PoisonError::into_inner);
            let before = q.len();
            expire(&mut q, now, self.settings.pool.idle_timeout);
            q.retain(|i| !i.conn.tx.is_closed());
            self.idle_total.fetch_sub(before - q.len(), Ordering::Relaxed);
        }
    }

    async fn connect(&self, conn: &Conn) -> Result<Sender, SendError> {
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
            return self.handshake(tcp).await;
        };
        let name = match name {
            Some(n) => n.clone(),
            None => host_name(&self.identity).ok_or_else(|| not_sent("TLS", &"no server name"))?,
        };
        match tokio::time::timeout(s.connect_timeout, connector.connect(name, tcp)).await {
            Ok(Ok(tls)) => self.handshake(tls).await,
            Ok(Err(e)) => Err(not_sent("TLS handshake", &e)),
            Err(_) => Err(not_sent("TLS handshake", &"timed out")),
        }
    }

    async fn handshake<I>(&self, io: I) -> Result<Sender, SendError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        let identity = self.identity.clone();
        let failed = |e: hyper::Error| SendError::NotSent(format!("handshake: {}", error_text(&e)));
        if self.settings.http2() {
            let (tx, c) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(failed)?;
            tokio::spawn(async move {
                if let Err(e) = c.await {
                    debug!(backend = %identity, error = %e, "HTTP/2 connection ended");
                }
            });
            Ok(Sender::H2(tx))
        } else {
            let (tx, c) = http1::Builder::new().handshake(io).await.map_err(failed)?;
            tokio::spawn(async move {
                if let Err(e) = c.with_upgrades().await {
                    debug!(backend = %identity, error = %e, "connection ended");
                }
            });
            Ok(Sender::H1(tx))
        }
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
fn h2_form(mut req: Request<ReqBody>, tls: bool, identity: &str) -> Request<ReqBody> {
    let authority = req.headers_mut().remove(header::HOST);
    let authority = authority.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(identity);
    let pq = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
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

    #[test]
    fn backend_names_for_tls_come_from_the_identity() {
        assert_eq!(host_name("api.internal:8443"), Some(ServerName::try_from("api.internal").unwrap()));
        assert_eq!(host_name("10.0.0.5:443"), Some(ServerName::try_from("10.0.0.5").unwrap()));
        assert_eq!(host_name("[2001:db8::5]:443"), Some(ServerName::try_from("2001:db8::5").unwrap()));
    }

    #[test]
    fn http2_requests_carry_the_host_as_authority() {
        let mut req = Request::new(super::super::proxy::Frames::Full(None));
        *req.uri_mut() = "/a?b=1".parse().unwrap();
        req.headers_mut().insert(header::HOST, HeaderValue::from_static("app.example.org"));
        let req = h2_form(req, true, "10.0.0.5:443");
        assert_eq!(req.uri().to_string(), "https://app.example.org/a?b=1");
        assert!(!req.headers().contains_key(header::HOST));
        let req = h2_form(Request::new(super::super::proxy::Frames::Full(None)), false, "10.0.0.5:80");
        assert_eq!(req.uri().to_string(), "http://10.0.0.5:80/");
    }
}
