//! One request through the edge: route, redirect, pick a backend, forward with clean headers,
//! retry elsewhere on failure, and log one line when the response is done.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tracing::info;

use super::{
    Snapshot,
    balance::hash_bytes,
    cache::{self, Found, NotKept},
    h1, h1_server,
    pool::{Home, Outgoing, SendError, UpBody},
    routes::{Host, request_host},
    upstream::{InFlight, Pick, ServiceState},
};
use crate::config::{Balance, HashKey};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Most attempts one request makes (the registry allows `tries` up to this).
const MAX_TRIES: usize = 10;

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1, plus the old
/// `Proxy-Connection` and `Keep-Alive`), and `Upgrade`, which a proxy sets itself. A `static`:
/// a `const` array would be built and dropped at every use.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// [`HOP_BY_HOP`] as text, in the same order: compared without making a `HeaderName`.
const HOP_NAMES: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Where `name` stands in [`HOP_BY_HOP`], if it is one (names are lowercase).
fn hop_by_hop(name: &str) -> Option<usize> {
    HOP_NAMES.iter().position(|n| *n == name)
}

/// Whether `name`, in any case, is a hop-by-hop field.
pub(super) fn is_hop_by_hop(name: &str) -> bool {
    HOP_NAMES.iter().any(|n| n.len() == name.len() && n.eq_ignore_ascii_case(name))
}

/// Whether a `Connection` token names a field to remove beside the hop-by-hop ones (which go
/// anyway); `close` is an option, not a field. One rule for requests, and for responses as the
/// HTTP/1.1 client reads them.
pub(super) fn names_a_field(token: &str) -> bool {
    !(token.is_empty()
        || token.eq_ignore_ascii_case("close")
        || token.eq_ignore_ascii_case("keep-alive")
        || token.eq_ignore_ascii_case("upgrade")
        || hop_by_hop(token).is_some())
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `HIT` or `MISS` on answers of routes with `cache:`.
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// The connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    pub client: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    pub port: u16,
    pub tls: bool,
    /// The listener's `tunnel_timeout`: an upgraded connection (WebSocket) idle this long
    /// either way is closed.
    pub tunnel_idle: Duration,
}

impl Conn {
    const fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }
}

/// Serves one request. Never fails: every outcome is a response.
pub async fn handle(snap: Arc<Snapshot>, conn: Conn, req: Request<RequestBody>) -> Response<RespBody> {
    let started = Instant::now();
    let Some(host) = request_host(&req) else {
        let mut resp = local(StatusCode::BAD_REQUEST, "request without a valid host\n", None);
        resp.extensions_mut().insert(h1_server::CloseAfter);
        return resp;
    };
    // Answered before a service is known: logged, counted in no service's traffic.
    let unrouted = |status, text| {
        let log = access_log(req.method(), &host, req.uri().path(), conn.client.ip(), started, None);
        local(status, text, Some(log(status, "-", 0)))
    };
    if !snap.acl.permits(conn.client.ip(), req.uri().path()) {
        return unrouted(StatusCode::FORBIDDEN, "forbidden\n");
    }
    let route = snap.tables.get(&conn.port).and_then(|t| t.find(&host, req.uri().path()));
    let Some(svc) = route.and_then(|r| snap.services.get(&r.service)) else {
        return unrouted(StatusCode::NOT_FOUND, "no route for this host and path\n");
    };
    let log =
        access_log(req.method(), &host, req.uri().path(), conn.client.ip(), started, Some(&svc.traffic));
    if let Err(r) = snap.rate.check(conn.client.ip(), svc.rate.as_ref(), super::upstream::clock(started)) {
        return too_many(&r, log(StatusCode::TOO_MANY_REQUESTS, "-", 0));
    }
    if let Some(to) = redirect_location(svc, &conn, &host, &req) {
        let permanent = svc.spec.redirect.as_ref().is_some_and(|r| r.permanent);
        let status = redirect_status(req.method(), permanent);
        let mut resp = local(status, "", Some(log(status, "-", 0)));
        if let Ok(v) = HeaderValue::from_str(&to) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        return resp;
    }
    let max_body = snap.ports.get(&conn.port).map_or(u64::MAX, |p| p.limits.max_body_bytes);
    drop(log);
    if let Some(policy) = &svc.spec.cache
        && let Some(key) = cache::request_key(
            policy,
            &svc.name,
            req.method(),
            conn.scheme(),
            &host,
            req.uri(),
            req.headers(),
        )
    {
        // Boxed: the cache's future holds forward's; every other request's would carry it.
        return Box::pin(cached(&snap.cache, svc, key, conn, host, req, started, max_body)).await;
    }
    forward(svc, conn, host, req, started, max_body, None).await
}

/// A request on a route with `cache:` that goes upstream; with the flight when its answer is
/// to be kept.
struct Miss(Option<cache::Flight>);

/// A request the cache may answer: a fresh kept answer, else one request per key goes
/// upstream and the others wait for its answer (for at most the service's response timeout,
/// then they go themselves).
#[expect(clippy::too_many_arguments, reason = "the request and where it goes, as for forward")]
async fn cached(
    store: &Arc<cache::Store>,
    svc: &Arc<ServiceState>,
    key: cache::Key,
    conn: Conn,
    host: Host,
    req: Request<RequestBody>,
    started: Instant,
    max_body: u64,
) -> Response<RespBody> {
    let [hits, misses, coalesced] = &svc.traffic.cache;
    let mut waited = false;
    let hit = |entry: &cache::Entry, waited: bool| {
        (if waited { coalesced } else { hits }).fetch_add(1, Ordering::Relaxed);
        from_cache(entry, svc, &conn, &host, &req, started)
    };
    // A second turn covers a fetch that ended without an answer (its client left, or it
    // failed): one waiter leads the next, the rest wait again.
    for _ in 0..2 {
        match store.get(&key, req.headers(), Instant::now()) {
            Found::Hit(entry) => return hit(&entry, waited),
            Found::Pass => break,
            // HEAD answers have no body to keep.
            Found::Miss if req.method() == Method::HEAD => break,
            Found::Miss => {}
        }
        match store.flight(&key) {
            Ok(flight) => {
                misses.fetch_add(1, Ordering::Relaxed);
                return forward(svc, conn, host, req, started, max_body, Some(Miss(Some(flight)))).await;
            }
            Err(mut done) => {
                waited = true;
                let _ = tokio::time::timeout(svc.spec.timeouts.response, done.changed()).await;
                if *done.borrow() == cache::Outcome::NotKept {
                    break;
                }
            }
        }
    }
    if waited && let Found::Hit(entry) = store.get(&key, req.headers(), Instant::now()) {
        return hit(&entry, true);
    }
    misses.fetch_add(1, Ordering::Relaxed);
    forward(svc, conn, host, req, started, max_body, Some(Miss(None))).await
}

/// A kept answer: `304` when the client's copy is current, with `Age` and `X-Cache: HIT`.
fn from_cache(
    entry: &cache::Entry,
    svc: &ServiceState,
    conn: &Conn,
    host: &str,
    req: &Request<RequestBody>,
    started: Instant,
) -> Response<RespBody> {
    let log = access_log(req.method(), host, req.uri().path(), conn.client.ip(), started, Some(&svc.traffic));
    let current = cache::not_modified(req.headers(), &entry.headers);
    // HEAD: no body (HTTP/2 would send one), the kept Content-Length.
    let (status, body) = match (current, req.method() == Method::HEAD) {
        (true, _) => (StatusCode::NOT_MODIFIED, Bytes::new()),
        (false, true) => (entry.status, Bytes::new()),
        (false, false) => (entry.status, entry.body.clone()),
    };
    let mut resp = Response::new(RespBody::full(body, Some(log(status, "cache", 0))));
    *resp.status_mut() = status;
    *resp.headers_mut() = entry.headers.clone();
    let h = resp.headers_mut();
    if current {
        h.remove(header::CONTENT_LENGTH);
    }
    h.insert(header::AGE, HeaderValue::from(entry.age(Instant::now())));
    h.insert(X_CACHE, HeaderValue::from_static("HIT"));
    resp
}

impl Miss {
    /// The answer of a request that went upstream, marked `MISS`. When it is the one fetch of
    /// its key and the status and headers allow keeping it, its body is read whole from the
    /// backend first (up to `max_object_bytes`), kept, and its waiters woken: they are not
    /// held by how fast this client reads. A larger body is sent on as it streams, not kept.
    async fn answer(
        self,
        svc: &ServiceState,
        mut head: http::response::Parts,
        body: UpBody,
        req: &HeaderMap,
        in_flight: InFlight,
        log: AccessLog,
    ) -> Response<RespBody> {
        let status = head.status;
        let keep = match (self.0, svc.spec.cache.as_ref()) {
            (Some(flight), Some(policy)) => {
                match cache::storable(policy, status, &head.headers, SystemTime::now()) {
                    _ if content_length(&head.headers).is_some_and(|n| n > flight.max_object() as u64) => {
                        flight.pass();
                        None
                    }
                    Ok(kept) => Some((flight, kept)),
                    Err(NotKept::Forbidden) => {
                        flight.pass();
                        None
                    }
                    Err(NotKept::Status) => {
                        flight.not_kept();
                        None
                    }
                }
            }
            _ => None,
        };
        let Some((flight, (ttl, vary))) = keep else {
            head.headers.insert(X_CACHE, HeaderValue::from_static("MISS"));
            return Response::from_parts(head, RespBody::upstream(body, in_flight, log));
        };
        let max = flight.max_object();
        let mut body = body;
        let mut buf = bytes::BytesMut::new();
        let read = tokio::time::timeout(svc.spec.timeouts.response, async {
            while let Some(frame) = body.frame().await {
                if let Ok(d) = frame?.into_data() {
                    buf.extend_from_slice(&d);
                    if buf.len() > max {
                        return Ok(false);
                    }
                }
            }
            Ok::<_, BoxError>(true)
        })
        .await;
        // The backend failed mid-body: the connection is not reused, the waiters take their
        // turn.
        let Ok(Ok(whole)) = read else {
            drop(flight);
            let mut log = log;
            log.status = StatusCode::BAD_GATEWAY;
            return local(StatusCode::BAD_GATEWAY, "the backend's answer broke off\n", Some(log));
        };
        let mut headers = head.headers.clone();
        head.headers.insert(X_CACHE, HeaderValue::from_static("MISS"));
        if !whole {
            flight.pass();
            let mut resp = RespBody::upstream(body, in_flight, log);
            resp.prefix = Some(buf.freeze());
            return Response::from_parts(head, resp);
        }
        // Read whole: its connection went back to the pool at the last byte.
        drop(in_flight);
        let body = buf.freeze();
        headers.remove(X_CACHE);
        flight.keep(req, &vary, ttl, &cache::Answer { status, headers, body: body.clone() });
        Response::from_parts(head, RespBody::full(body, Some(log)))
    }
}

/// 429 for a request over a rate limit: when to come back (`Retry-After`, whole seconds,
/// at least 1) and the limit, as the IETF draft's `RateLimit-*` fields.
fn too_many(r: &super::ratelimit::Refused, log: AccessLog) -> Response<RespBody> {
    let mut resp = local(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded\n", Some(log));
    let secs = r.wait.as_secs() + u64::from(r.wait.subsec_nanos() > 0);
    let secs = HeaderValue::from(secs.max(1));
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, secs.clone());
    h.insert(HeaderName::from_static("ratelimit-limit"), HeaderValue::from(r.rate));
    h.insert(HeaderName::from_static("ratelimit-remaining"), HeaderValue::from_static("0"));
    h.insert(HeaderName::from_static("ratelimit-reset"), secs);
    if let Ok(v) = HeaderValue::from_str(&format!("{};w=1;scope={}", r.rate, r.scope)) {
        h.insert(HeaderName::from_static("ratelimit-policy"), v);
    }
    resp
}

/// Where a redirect sends this request, if the service redirects it.
fn redirect_location<B>(svc: &ServiceState, conn: &Conn, host: &str, req: &Request<B>) -> Option<String> {
    let r = svc.spec.redirect.as_ref()?;
    let to_https = r.https && !conn.tls;
    let bare = host.strip_prefix("www.").filter(|_| r.strip_www);
    if !to_https && bare.is_none() {
        return None;
    }
    let scheme = if to_https || conn.tls { "https" } else { "http" };
    let name = bare.unwrap_or(host);
    // A non-default port stays when only the host changes; the scheme change goes to 443.
    let port = if to_https {
        None
    } else {
        req.headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.rsplit_once(':'))
            .map(|(_, p)| p)
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
    };
    let pq = req.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
    let name = if name.contains(':') { format!("[{name}]") } else { name.to_owned() };
    Some(match port {
        Some(p) => format!("{scheme}://{name}:{p}{pq}"),
        None => format!("{scheme}://{name}{pq}"),
    })
}

/// 301/302 for GET and HEAD (what every client follows), 308/307 otherwise so the method and
/// body are kept.
fn redirect_status(method: &Method, permanent: bool) -> StatusCode {
    let safe = matches!(*method, Method::GET | Method::HEAD);
    match (permanent, safe) {
        (true, true) => StatusCode::MOVED_PERMANENTLY,
        (false, true) => StatusCode::FOUND,
        (true, false) => StatusCode::PERMANENT_REDIRECT,
        (false, false) => StatusCode::TEMPORARY_REDIRECT,
    }
}

const fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE)
}

/// How one failed attempt failed.
enum Failure {
    /// No attempt failed: none could be made.
    None,
    Connect(String),
    Timeout,
    Other(String),
}

impl From<SendError> for Failure {
    fn from(e: SendError) -> Self {
        match e {
            SendError::NotSent(text) => Self::Connect(text),
            SendError::Failed(text) => Self::Other(text),
        }
    }
}

#[expect(clippy::too_many_lines, reason = "the attempt loop and its exits read best whole")]
async fn forward(
    svc: &Arc<ServiceState>,
    conn: Conn,
    host: Host,
    mut req: Request<RequestBody>,
    started: Instant,
    max_body: u64,
    mut miss: Option<Miss>,
) -> Response<RespBody> {
    let spec = &svc.spec;
    // WebSocket and other upgrades: the client's side of the tunnel, once answered 101.
    let mut upgrade = upgrade_protocol(&req).map(|proto| (proto, ClientSide::of(&mut req)));
    let (mut parts, body) = req.into_parts();
    let log =
        access_log(&parts.method, &host, parts.uri.path(), conn.client.ip(), started, Some(&svc.traffic));
    let refuse = |status, text| local(status, text, Some(log(status, "-", 0)));
    if svc.members.is_empty() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "this service has no backends\n");
    }
    let length = content_length(&parts.headers);
    if length.is_some_and(|n| n > max_body) {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    }
    let Some((replay, mut stream)) = read_body(body, length, spec.retry.replay_bytes).await else {
        return refuse(StatusCode::BAD_REQUEST, "incomplete request body\n");
    };
    let may_retry = replay.is_some() && (spec.retry.non_idempotent || idempotent(&parts.method));
    // How a streamed body failed, if it did (set by the body as it is read).
    let mut fault: Option<Arc<BodyRecord>> = None;
    let pick = Pick { hash_key: hash_key(&spec.balance, &conn, &parts.headers) };
    let forwarding =
        upstream_headers(&mut parts.headers, &parts.uri, &conn, &host, upgrade.as_ref().map(|u| &u.0));
    // A request whose answer may be kept has the fields set in its headers: the answer's
    // `Vary` is read against them (one naming `X-Forwarded-For` is then never shared).
    let forwarding = if miss.is_some() {
        forwarding.set(&mut parts.headers);
        None
    } else {
        Some(forwarding)
    };
    let target = parts.uri.path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
    let out = Outgoing {
        method: &parts.method,
        target,
        headers: &parts.headers,
        forwarding: forwarding.as_ref(),
        idempotent: idempotent(&parts.method),
        // Not for an HTTP/2 client or the cache: they read the fields from a map anyway.
        raw_answer: parts.version != http::Version::HTTP_2 && miss.is_none(),
    };

    let deadline = super::deadline::after(started, spec.retry.within);
    let tries_allowed = (spec.retry.tries as usize).clamp(1, MAX_TRIES);
    let mut tried = [usize::MAX; MAX_TRIES];
    let mut n = 0;
    let mut last_failure = Failure::None;
    let mut last_backend = "-";
    let mut next = None;
    while n < tries_allowed {
        let now = Instant::now();
        // A retry already picked (after an answer that was dropped for it) goes ahead.
        if n > 0 && next.is_none() && now >= deadline {
            break;
        }
        let Some((i, pass)) = next.take().or_else(|| svc.pick_admitted(pick, &tried[..n], now)) else {
            break;
        };
        tried[n] = i;
        n += 1;
        let member = &svc.members[i];
        let b = &member.state;
        let body = match (&replay, stream.take()) {
            (Some(bytes), _) => Frames::Full(Some(bytes.clone())),
            (None, Some(s)) => {
                let inner = Limited::new(s, usize::try_from(max_body).unwrap_or(usize::MAX));
                let record = fault.get_or_insert_with(Arc::default).clone();
                Frames::Stream(ClientBody { inner, record })
            }
            (None, None) => break, // a streamed body went to an earlier attempt
        };
        let in_flight = InFlight::start(b);
        // Picking took next to no time: the clock is read once per attempt.
        let attempt = now;
        // Dropped (a timed-out exchange's connection closed) as soon as it is over.
        let result = {
            pin_here!(send = member.pool.send(&out, body, &conn));
            super::deadline::within(super::deadline::after(attempt, spec.timeouts.response), send).await
        };
        let failed = !result.as_ref().is_ok_and(Result::is_ok);
        let timed_out = result.is_err();
        if failed && let Some(fault) = fault.as_ref().and_then(|f| f.fault(timed_out)) {
            // The client's body failed, not the backend: no failure counted against it (a
            // client aborting or trickling uploads must not take healthy backends out), and
            // no retry.
            let (status, text) = match fault {
                ClientFault::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n"),
                ClientFault::Broken => (StatusCode::BAD_REQUEST, "incomplete request body\n"),
                ClientFault::Slow => (StatusCode::REQUEST_TIMEOUT, "request body not received in time\n"),
            };
            drop((pass, in_flight));
            return local(status, text, Some(log(status, &b.identity, n)));
        }
        let answered = result.as_ref().ok().and_then(|r| r.as_ref().ok()).map(Response::status);
        let took = attempt.elapsed();
        svc.outcome(i, pass, answered, took);
        let last_try = n == tries_allowed || !may_retry;
        match result {
            Ok(Ok(resp)) => {
                b.observe(took);
                let status = resp.status();
                if status == StatusCode::SWITCHING_PROTOCOLS
                    && let Some((_, client_side)) = upgrade.take()
                {
                    let log = log(status, &b.identity, n);
                    let (head, body) = resp.into_parts();
                    let Some(backend_side) = body.upgraded() else {
                        return local(
                            StatusCode::BAD_GATEWAY,
                            "the backend cannot switch protocols\n",
                            Some(log),
                        );
                    };
                    return tunnel(head, client_side, backend_side, in_flight, log, conn);
                }
                let retryable = spec.retry.statuses.contains(&status.as_u16());
                if retryable {
                    svc.failed(i, Instant::now());
                }
                // Dropped for a retry only when another backend can take it.
                if retryable && !last_try && Instant::now() < deadline {
                    next = svc.pick_admitted(pick, &tried[..n], Instant::now());
                    if next.is_some() {
                        last_backend = &b.identity;
                        continue;
                    }
                }
                let (mut rparts, mut rbody) = resp.into_parts();
                if miss.is_some() {
                    // The cache reads and stores the fields.
                    rbody.unraw(&mut rparts.headers);
                }
                clean_response_headers(&mut rparts.headers);
                let log = log(status, &b.identity, n);
                if let Some(miss) = miss.take() {
                    return Box::pin(miss.answer(svc, rparts, rbody, &parts.headers, in_flight, log)).await;
                }
                return Response::from_parts(rparts, RespBody::upstream(rbody, in_flight, log));
            }
            Ok(Err(e)) => {
                svc.failed(i, Instant::now());
                last_failure = Failure::from(e);
            }
            Err(_) => {
                svc.failed(i, Instant::now());
                last_failure = Failure::Timeout;
            }
        }
        last_backend = &b.identity;
        drop(in_flight);
        // A request whose body may have been sent is retried only where that is safe; a
        // connect error sent nothing.
        let sent_nothing = matches!(last_failure, Failure::Connect(_));
        if !(may_retry || sent_nothing && replay.is_some()) {
            break;
        }
    }
    give_up(svc, &last_failure, n, last_backend, log(StatusCode::OK, last_backend, n))
}

/// The request's headers as a backend gets them: hop-by-hop ones gone, the forwarding ones
/// set, a Host for HTTP/2 requests (which name it in the URI only), and the upgrade asked for.
fn upstream_headers(
    h: &mut HeaderMap,
    uri: &Uri,
    conn: &Conn,
    host: &str,
    upgrade: Option<&HeaderValue>,
) -> Forwarding {
    if !h.contains_key(header::HOST)
        && let Some(v) = uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        h.insert(header::HOST, v);
    }
    let forwarding = clean_request_headers(h, conn.client.ip(), conn.scheme(), host);
    if let Some(proto) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, proto.clone());
    }
    forwarding
}

/// The protocol a request asks to switch to (`Upgrade`, with `Connection: upgrade`), if any.
fn upgrade_protocol<B>(req: &Request<B>) -> Option<HeaderValue> {
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    (asks && req.version() == http::Version::HTTP_11).then(|| req.headers().get(header::UPGRADE).cloned())?
}

/// Answers 101 and joins the client's and the backend's upgraded connections, bytes both ways,
/// until either side closes.
fn tunnel(
    mut parts: http::response::Parts,
    client_side: ClientSide,
    (backend, home): (h1::Conn, Home),
    in_flight: InFlight,
    log: AccessLog,
    conn: Conn,
) -> Response<RespBody> {
    let idle = conn.tunnel_idle;
    let proto = parts.headers.get(header::UPGRADE).cloned();
    clean_response_headers(&mut parts.headers);
    parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = proto {
        parts.headers.insert(header::UPGRADE, p);
    }
    tokio::spawn(async move {
        // Counted in flight (least-conn) and under `max_connections` while the tunnel is
        // open; its connection is not reused.
        let _held = (in_flight, home);
        let Some((mut c, client_early)) = client_side.opened().await else { return };
        let (mut b, early) = backend.into_parts();
        // What each side sent past its own head: the backend right after its 101 answer,
        // the client right after its request. Within the idle timeout, as the relay.
        let handed = async {
            tokio::io::AsyncWriteExt::write_all(&mut c, &early).await?;
            tokio::io::AsyncWriteExt::write_all(&mut b, &client_early).await
        };
        if !matches!(tokio::time::timeout(idle, handed).await, Ok(Ok(()))) {
            return;
        }
        let r = super::relay::relay(&mut c, &mut b, Some(idle)).await;
        tracing::debug!(
            client = %conn.client,
            from_client = r.from_a,
            from_backend = r.from_b,
            end = r.end.as_str(),
            "tunnel ended"
        );
    });
    Response::from_parts(parts, RespBody::full(Bytes::new(), Some(log)))
}

/// The client's side of a connection asked to switch protocols: its stream once the 101
/// answer went (only HTTP/1.1 asks, and lb's own server reads it).
struct ClientSide(Option<tokio::sync::oneshot::Receiver<h1_server::Upgraded>>);

impl ClientSide {
    fn of(req: &mut Request<RequestBody>) -> Self {
        Self(req.extensions_mut().remove::<h1_server::OnUpgrade>().and_then(|u| u.take()))
    }

    /// The client's stream once the 101 answer went, and what it sent past its request.
    async fn opened(self) -> Option<(Box<dyn h1_server::Io>, Bytes)> {
        let Some(rx) = self.0 else {
            tracing::debug!("an upgrade on a connection that cannot switch");
            return None;
        };
        rx.await.ok().map(|u| (u.io, u.early))
    }
}

/// The body to send: kept whole (`replay`) when empty or small enough to send again, else
/// streamed once. `None`: the client did not send all it announced.
async fn read_body(
    body: RequestBody,
    length: Option<u64>,
    replay_bytes: usize,
) -> Option<(Option<Bytes>, Option<RequestBody>)> {
    if body.is_end_stream() {
        return Some((Some(Bytes::new()), None));
    }
    if length.is_some_and(|n| n <= replay_bytes as u64) {
        return Limited::new(body, replay_bytes).collect().await.ok().map(|b| (Some(b.to_bytes()), None));
    }
    Some((None, Some(body)))
}

/// The answer when no attempt succeeded: 503 when none could be made, 504 after a timeout,
/// else 502.
fn give_up(
    svc: &ServiceState,
    last: &Failure,
    tries: usize,
    backend: &str,
    mut log: AccessLog,
) -> Response<RespBody> {
    let (status, text) = match (last, tries) {
        (_, 0) if svc.all_circuits_open(Instant::now()) => {
            (StatusCode::SERVICE_UNAVAILABLE, format!("every backend's circuit is open for {}\n", svc.name))
        }
        (_, 0) => (StatusCode::SERVICE_UNAVAILABLE, format!("no healthy backend for {}\n", svc.name)),
        (Failure::Timeout, _) => {
            (StatusCode::GATEWAY_TIMEOUT, format!("backend {backend} did not answer in time\n"))
        }
        (Failure::Connect(e) | Failure::Other(e), _) => {
            (StatusCode::BAD_GATEWAY, format!("backend {backend} failed: {e}\n"))
        }
        (Failure::None, _) => {
            (StatusCode::BAD_GATEWAY, format!("no backend can take requests for {}\n", svc.name))
        }
    };
    log.status = status;
    let mut resp = local(status, &text, Some(log));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// A message's `Content-Length`, when it is one plain number (no sign, no list).
pub(super) fn content_length(h: &HeaderMap) -> Option<u64> {
    h1::digits(h.get(header::CONTENT_LENGTH)?.to_str().ok()?, 10)
}

/// The request one attempt sends: origin-form URI, the cleaned headers (Host included).
/// The consistent-hash key of a request: `None` when the service does not hash, or the
/// request lacks the header or cookie (it is then balanced round robin, not all to one
/// backend).
pub fn hash_key(balance: &Balance, conn: &Conn, headers: &HeaderMap) -> Option<u64> {
    let Balance::Hash(key) = balance else { return None };
    match key {
        HashKey::ClientIp => Some(match conn.client.ip() {
            IpAddr::V4(a) => hash_bytes(&a.octets()),
            IpAddr::V6(a) => hash_bytes(&a.octets()),
        }),
        HashKey::Header(name) => headers.get(name.as_str()).map(|v| hash_bytes(v.as_bytes())),
        HashKey::Cookie(name) => headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash_bytes(v.as_bytes())),
    }
}

/// Strips hop-by-hop headers (and those `Connection` names) and what a client may not claim
/// about itself (`X-Forwarded-*`, `Forwarded`), and says what the backend is told instead.
pub fn clean_request_headers(h: &mut HeaderMap, client: IpAddr, proto: &str, host: &str) -> Forwarding {
    remove_hop_by_hop(h);
    // Set, not appended: a client's own claims are not trusted.
    let claims = |k: &HeaderName| {
        matches!(k.as_str(), "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "forwarded")
    };
    if h.keys().any(claims) {
        for name in [X_FORWARDED_FOR, X_FORWARDED_PROTO, X_FORWARDED_HOST, header::FORWARDED] {
            h.remove(name);
        }
    }
    let host = h
        .get(header::HOST)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_str(host).unwrap_or(HeaderValue::from_static("")));
    let mut addr = [0u8; 48];
    let len = write_ip(client, &mut addr).len();
    Forwarding { addr, len, v6: client.is_ipv6(), https: proto == "https", host }
}

/// Who the client is, as a backend is told: `X-Forwarded-For/-Proto/-Host` and `Forwarded`.
/// Written straight into an HTTP/1.1 request head (no field values built, no map grown, per
/// request); set as fields for HTTP/2.
pub struct Forwarding {
    addr: [u8; 48],
    len: usize,
    v6: bool,
    https: bool,
    /// The client's Host, as it asked.
    host: HeaderValue,
}

impl Forwarding {
    fn addr(&self) -> &[u8] {
        &self.addr[..self.len]
    }

    fn proto(&self) -> &'static str {
        if self.https { "https" } else { "http" }
    }

    /// The `Forwarded` value's pieces (RFC 7239: an IPv6 address quoted and bracketed).
    fn forwarded(&self) -> [&[u8]; 8] {
        [
            b"for=",
            if self.v6 { b"\"[" } else { b"" },
            self.addr(),
            if self.v6 { b"]\"" } else { b"" },
            b";host=\"",
            self.host.as_bytes(),
            b"\";proto=",
            self.proto().as_bytes(),
        ]
    }

    /// The four fields as head lines: nine copies, the constant parts joined at compile time.
    pub fn write_fields(&self, out: &mut Vec<u8>) {
        let (addr, host) = (self.addr(), self.host.as_bytes());
        let proto_for: &[u8] = match (self.https, self.v6) {
            (false, false) => b"\r\nx-forwarded-proto: http\r\nforwarded: for=",
            (false, true) => b"\r\nx-forwarded-proto: http\r\nforwarded: for=\"[",
            (true, false) => b"\r\nx-forwarded-proto: https\r\nforwarded: for=",
            (true, true) => b"\r\nx-forwarded-proto: https\r\nforwarded: for=\"[",
        };
        let after_addr: &[u8] = if self.v6 { b"]\";host=\"" } else { b";host=\"" };
        let proto_host: &[u8] = if self.https {
            b"\";proto=https\r\nx-forwarded-host: "
        } else {
            b"\";proto=http\r\nx-forwarded-host: "
        };
        let pieces: [&[u8]; 9] =
            [b"x-forwarded-for: ", addr, proto_for, addr, after_addr, host, proto_host, host, b"\r\n"];
        out.reserve(pieces.iter().map(|p| p.len()).sum());
        for piece in pieces {
            out.extend_from_slice(piece);
        }
    }

    /// The four fields set in `h`.
    pub fn set(&self, h: &mut HeaderMap) {
        if let Ok(v) = HeaderValue::from_bytes(self.addr()) {
            h.insert(X_FORWARDED_FOR, v);
        }
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(self.proto()));
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(self.forwarded().concat())) {
            h.insert(header::FORWARDED, v);
        }
        h.insert(X_FORWARDED_HOST, self.host.clone());
    }
}

/// `ip` as text in `buf`. IPv4 by hand: `Display` goes through the formatter a byte at a time,
/// and this runs per request.
fn write_ip(ip: IpAddr, buf: &mut [u8; 48]) -> &[u8] {
    let IpAddr::V4(v4) = ip else {
        let mut w = &mut buf[..];
        let _ = write!(w, "{ip}");
        let n = 48 - w.len();
        return &buf[..n];
    };
    let mut n = 0;
    for (i, o) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if o >= 100 {
            buf[n] = b'0' + o / 100;
            n += 1;
        }
        if o >= 10 {
            buf[n] = b'0' + o / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + o % 10;
        n += 1;
    }
    &buf[..n]
}

pub fn clean_response_headers(h: &mut HeaderMap) {
    remove_hop_by_hop(h);
}

fn remove_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the fields, noting which hop-by-hop ones are there, and whether a
    // `Connection` names any other field (most name none, or only `keep-alive`).
    let mut found = 0u16;
    let mut names_others = false;
    for (k, v) in h.iter() {
        let Some(i) = hop_by_hop(k.as_str()) else { continue };
        found |= 1 << i;
        if i == 0 {
            names_others |= v.to_str().unwrap_or("").split(',').any(|t| names_a_field(t.trim()));
        }
    }
    if names_others {
        // The fields `Connection` names go too. Its values are cloned (shared bytes, no copy)
        // so the map can change while they are read; names are looked up as `&str`.
        let named: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
        for v in &named {
            for t in v.to_str().unwrap_or("").split(',').map(str::trim).filter(|t| names_a_field(t)) {
                h.remove(t);
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if found & (1 << i) != 0 {
            h.remove(name);
        }
    }
}

/// Puts the fields a response kept raw into its map: for whatever reads or changes them (a
/// listener's HSTS, an HTTP/2 client). The HTTP/1.1 path to the client needs no map.
pub fn unraw(resp: &mut Response<RespBody>) {
    if resp.body().raw_fields().is_none() {
        return;
    }
    let mut headers = std::mem::take(resp.headers_mut());
    if let Frames::Stream(b) = &mut resp.body_mut().inner {
        b.unraw(&mut headers);
    }
    *resp.headers_mut() = headers;
}

/// A response made by the edge itself.
fn local(status: StatusCode, text: &str, log: Option<AccessLog>) -> Response<RespBody> {
    let mut resp = Response::new(RespBody::full(Bytes::copy_from_slice(text.as_bytes()), log));
    *resp.status_mut() = status;
    if !text.is_empty() {
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    }
    resp
}

/// A body held whole, or streamed from a peer.
pub enum Frames<S> {
    Full(Option<Bytes>),
    Stream(S),
}

/// The request body sent to a backend.
pub type ReqBody = Frames<ClientBody>;

/// A client's request body as its server reads it: lb's own HTTP/1.1 server, or hyper's
/// (HTTP/2, h2c).
pub enum RequestBody {
    Empty,
    H1(h1_server::Body),
    Hyper(Incoming),
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::H1(b) => Pin::new(b).poll_frame(cx),
            Self::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::H1(b) => b.is_end_stream(),
            Self::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::H1(b) => b.size_hint(),
            Self::Hyper(b) => b.size_hint(),
        }
    }
}

/// How a client's request body failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    /// Over the listener's `max_body_bytes`.
    TooLarge,
    /// Cut off or malformed (the client left mid-upload, or a bad chunk).
    Broken,
    /// Still awaited from the client when the response timeout ran out.
    Slow,
}

/// What a streamed request body knows of itself, for the request that sent it.
#[derive(Debug, Default)]
pub struct BodyRecord {
    fault: std::sync::OnceLock<ClientFault>,
    /// The last read of it waited on the client (not on the backend taking what it sent).
    waiting: AtomicBool,
}

impl BodyRecord {
    /// The client's fault in a failed attempt, if it was one; `timed_out`: the attempt ran
    /// out of time, which is the client's doing while its body was awaited.
    fn fault(&self, timed_out: bool) -> Option<ClientFault> {
        self.fault
            .get()
            .copied()
            .or_else(|| (timed_out && self.waiting.load(Ordering::Relaxed)).then_some(ClientFault::Slow))
    }
}

/// A client's request body streamed to a backend, keeping how it failed: the backend is not
/// to blame for it, and hyper's HTTP/2 client drops a body's error (the stream is reset, the
/// request fails with the reset), so the edge keeps its own record.
pub struct ClientBody {
    inner: Limited<RequestBody>,
    record: Arc<BodyRecord>,
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        self.record.waiting.store(r.is_pending(), Ordering::Relaxed);
        if let Poll::Ready(Some(Err(e))) = &r {
            let fault = if e.is::<http_body_util::LengthLimitError>() {
                ClientFault::TooLarge
            } else {
                ClientFault::Broken
            };
            let _ = self.record.fault.set(fault);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<S> Body for Frames<S>
where
    S: Body<Data = Bytes> + Unpin,
    S::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Full(b) => Poll::Ready(b.take().filter(|b| !b.is_empty()).map(|b| Ok(Frame::data(b)))),
            Self::Stream(s) => Pin::new(s).poll_frame(cx).map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            Self::Stream(s) => s.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Stream(s) => s.size_hint(),
        }
    }
}

/// Makes the access log record of one request, given how it ended.
fn access_log<'a>(
    method: &'a Method,
    host: &'a str,
    path: &'a str,
    client: IpAddr,
    started: Instant,
    traffic: Option<&'a Arc<super::upstream::Traffic>>,
) -> impl Fn(StatusCode, &str, usize) -> AccessLog + 'a {
    // The texts are copied only for a log line that will be written (it is often off).
    let text = tracing::enabled!(target: "lb_userspace::access", tracing::Level::INFO);
    let copy = move |s: &str| if text { s.to_owned() } else { String::new() };
    move |status, upstream, tries| AccessLog {
        written: text,
        traffic: traffic.cloned(),
        method: method.clone(),
        host: copy(host),
        path: copy(path),
        client,
        status,
        upstream: copy(upstream),
        tries,
        started,
    }
}

/// What the access log says of one request, written when its response body is done.
#[derive(Debug)]
pub struct AccessLog {
    /// Whether the log line is written (its texts are empty otherwise).
    written: bool,
    method: Method,
    host: String,
    path: String,
    client: IpAddr,
    status: StatusCode,
    upstream: String,
    tries: usize,
    started: Instant,
    /// The service's counts, when the request was routed to one.
    traffic: Option<Arc<super::upstream::Traffic>>,
}

impl AccessLog {
    fn write(&self, bytes: u64, complete: bool) {
        let took = self.started.elapsed();
        if let Some(t) = &self.traffic {
            t.record(self.status, took);
        }
        if !self.written {
            return;
        }
        info!(
            target: "lb_userspace::access",
            client = %self.client,
            method = %self.method,
            host = %self.host,
            path = %self.path,
            status = self.status.as_u16(),
            upstream = %self.upstream,
            tries = self.tries,
            bytes,
            complete,
            ms = format_args!("{:.3}", took.as_secs_f64() * 1e3),
            "request"
        );
    }
}

/// The response body sent to the client: the backend's, or one the edge made.
pub struct RespBody {
    inner: Frames<UpBody>,
    bytes: u64,
    done: bool,
    /// Held inline, not boxed: one allocation less per response.
    finish: Option<Finish>,
    /// Sent before `inner`: the part of a body read while deciding whether to keep it.
    prefix: Option<Bytes>,
}

struct Finish {
    _in_flight: Option<InFlight>,
    log: Option<AccessLog>,
    /// Ends the connection's request when the body is done (idle tracking).
    on_done: Option<Arc<dyn OnDone>>,
}

/// Told once when a response body is done or dropped.
pub trait OnDone: Send + Sync {
    fn done(&self);
}

impl RespBody {
    fn full(b: Bytes, log: Option<AccessLog>) -> Self {
        Self {
            inner: Frames::Full(Some(b)),
            bytes: 0,
            done: false,
            prefix: None,
            finish: Some(Finish { _in_flight: None, log, on_done: None }),
        }
    }

    fn upstream(b: UpBody, in_flight: InFlight, log: AccessLog) -> Self {
        Self {
            inner: Frames::Stream(b),
            bytes: 0,
            done: false,
            prefix: None,
            finish: Some(Finish { _in_flight: Some(in_flight), log: Some(log), on_done: None }),
        }
    }

    /// The backend's fields, when kept raw (HTTP/1.1) for the client's side to write as
    /// they came; the response's map then holds only what the edge added.
    pub const fn raw_fields(&self) -> Option<&super::h1::RawFields> {
        match &self.inner {
            Frames::Stream(b) => b.raw(),
            Frames::Full(_) => None,
        }
    }

    /// Tells `hook` once the body is done or dropped.
    pub fn on_done(&mut self, hook: Arc<dyn OnDone>) {
        if let Some(fin) = &mut self.finish {
            fin.on_done = Some(hook);
        } else {
            self.finish = Some(Finish { _in_flight: None, log: None, on_done: Some(hook) });
        }
    }
}

impl Drop for RespBody {
    fn drop(&mut self) {
        // hyper stops polling once a body says it has ended.
        self.done |= self.is_end_stream();
        if let Some(fin) = self.finish.take() {
            if let Some(log) = &fin.log {
                log.write(self.bytes, self.done);
            }
            if let Some(hook) = fin.on_done {
                hook.done();
            }
        }
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(p) = this.prefix.take() {
            this.bytes += p.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) => this.done = true,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.prefix {
            None => self.inner.size_hint(),
            Some(p) => {
                let rest = self.inner.size_hint();
                let mut h = SizeHint::new();
                h.set_lower(rest.lower() + p.len() as u64);
                if let Some(u) = rest.upper() {
                    h.set_upper(u + p.len() as u64);
                }
                h
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_names_are_known_in_any_case() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(name.as_str()), Some(i), "the two tables agree");
            assert!(is_hop_by_hop(&name.as_str().to_ascii_uppercase()), "{name}");
        }
        for name in ["content-length", "date", "t", "upgrades", "x-te"] {
            assert!(!is_hop_by_hop(name) && hop_by_hop(name).is_none(), "{name}");
        }
    }

    #[test]
    fn requests_lose_hop_by_hop_headers_and_the_clients_own_forwarding_claims() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("example.org:8080"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.insert(header::ORIGIN, HeaderValue::from_static("https://app.example.org"));
        let fwd = clean_request_headers(&mut h, "10.0.0.9".parse().unwrap(), "http", "example.org");
        let mut lines = Vec::new();
        fwd.write_fields(&mut lines);
        assert_eq!(
            String::from_utf8(lines).unwrap(),
            "x-forwarded-for: 10.0.0.9\r\nx-forwarded-proto: http\r\n\
             forwarded: for=10.0.0.9;host=\"example.org:8080\";proto=http\r\n\
             x-forwarded-host: example.org:8080\r\n",
            "the same fields written into an HTTP/1.1 head"
        );
        fwd.set(&mut h);
        for gone in ["connection", "x-secret", "keep-alive", "te"] {
            assert!(!h.contains_key(gone), "{gone} forwarded");
        }
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "example.org:8080");
        assert_eq!(h["forwarded"], "for=10.0.0.9;host=\"example.org:8080\";proto=http");
        assert_eq!(h[header::ORIGIN], "https://app.example.org", "CORS headers pass untouched");
        let mut v6 = HeaderMap::new();
        clean_request_headers(&mut v6, "2001:db8::1".parse().unwrap(), "https", "a.example.org").set(&mut v6);
        assert_eq!(v6["forwarded"], "for=\"[2001:db8::1]\";host=\"a.example.org\";proto=https");
        // A Host too long for the stack buffer; and two Connection fields, both obeyed.
        let long = format!("{}.example.org", "a".repeat(300));
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(&long).unwrap());
        h.append(header::CONNECTION, HeaderValue::from_static("x-one"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-two, , bad name"));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        clean_request_headers(&mut h, "10.0.0.9".parse().unwrap(), "https", &long).set(&mut h);
        assert!(!h.contains_key("x-one") && !h.contains_key("x-two") && !h.contains_key("connection"));
        assert_eq!(h["forwarded"], format!("for=10.0.0.9;host=\"{long}\";proto=https").as_str());
    }

    #[test]
    fn forwarding_lines_say_what_forwarding_fields_say() {
        for (ip, proto) in
            [("10.0.0.9", "http"), ("10.0.0.9", "https"), ("2001:db8::1", "http"), ("::1", "https")]
        {
            let mut h = HeaderMap::new();
            h.insert(header::HOST, HeaderValue::from_static("a.example:81"));
            let fwd = clean_request_headers(&mut h, ip.parse().unwrap(), proto, "a.example");
            let mut lines = Vec::new();
            fwd.write_fields(&mut lines);
            let mut fields = HeaderMap::new();
            fwd.set(&mut fields);
            let text = String::from_utf8(lines).unwrap();
            let written: Vec<(String, String)> = text
                .strip_suffix("\r\n")
                .unwrap()
                .split("\r\n")
                .map(|l| l.split_once(": ").map(|(k, v)| (k.to_owned(), v.to_owned())).unwrap())
                .collect();
            let set: Vec<(String, String)> =
                fields.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned())).collect();
            assert_eq!(written, set, "{ip} {proto}");
        }
    }

    #[test]
    fn the_hop_by_hop_matcher_and_table_agree() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(name.as_str()), Some(i), "{name}");
        }
        assert_eq!(hop_by_hop("content-length"), None);
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in ["0.0.0.0", "10.0.0.9", "100.20.3.255", "192.168.10.1", "2001:db8::1", "::ffff:1.2.3.4"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(write_ip(ip, &mut [0; 48]), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn responses_lose_only_their_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        h.insert(header::ETAG, HeaderValue::from_static("\"x\""));
        clean_response_headers(&mut h);
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-length", "etag"]);
        // A field named in `Connection`, in any case, goes too (RFC 9110 7.6.1).
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, X-Hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::SERVER, HeaderValue::from_static("nginx"));
        clean_response_headers(&mut h);
        let left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["server"]);
    }

    #[test]
    fn redirects_keep_the_method_when_they_must() {
        assert_eq!(redirect_status(&Method::GET, true), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(redirect_status(&Method::HEAD, false), StatusCode::FOUND);
        assert_eq!(redirect_status(&Method::POST, true), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(redirect_status(&Method::PUT, false), StatusCode::TEMPORARY_REDIRECT);
    }

    #[test]
    fn the_cookie_or_header_named_is_the_hash_key() {
        let conn = Conn {
            client: "10.0.0.1:5555".parse().unwrap(),
            local: "10.0.0.2:80".parse().unwrap(),
            port: 80,
            tls: false,
            tunnel_idle: Duration::from_secs(1),
        };
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; session=abc; b=2"));
        h.insert("x-user", HeaderValue::from_static("u7"));
        let cookie = Balance::Hash(HashKey::Cookie("session".into()));
        assert_eq!(hash_key(&cookie, &conn, &h), Some(hash_bytes(b"abc")));
        let header = Balance::Hash(HashKey::Header("x-user".into()));
        assert_eq!(hash_key(&header, &conn, &h), Some(hash_bytes(b"u7")));
        assert_eq!(hash_key(&Balance::RoundRobin, &conn, &h), None);
        let absent = Balance::Hash(HashKey::Cookie("other".into()));
        assert_eq!(hash_key(&absent, &conn, &h), None, "no cookie: not one fixed key for all");
    }
}
