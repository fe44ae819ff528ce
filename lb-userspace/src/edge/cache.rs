//! The edge cache: GET answers of routes with a `cache:` policy, kept in memory under one bound
//! for the whole edge, least recently used first out. Concurrent misses of one key wait for
//! the one request that went upstream (request coalescing) instead of each going themselves.
//!
//! Deciding is pure ([`request_key`], [`storable`]); [`Store`] holds answers and flights.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use hashlink::LruCache;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use tokio::sync::watch;

use crate::config::CachePolicy;

/// File extensions of static assets (`"static, 10m"`).
const STATIC: &[&str] = &[
    "css", "js", "mjs", "map", "wasm", "png", "jpg", "jpeg", "gif", "webp", "avif", "svg", "ico", "bmp",
    "woff", "woff2", "ttf", "otf", "eot", "mp4", "webm", "mp3", "ogg", "wav", "pdf", "txt", "zip", "gz",
];

/// Answers kept for one key with different `Vary` request values (e.g. encodings).
const MAX_VARIANTS: usize = 8;

/// How long an answer that may not be kept makes its key skip the waiting: later requests go
/// upstream at once instead of queueing behind one that will not be shared.
const PASS_FOR: Duration = Duration::from_secs(30);

/// What a kept answer costs besides its body and headers (the key, the entry, the list).
const OVERHEAD: usize = 256;

/// Which answer a request can share.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    service: String,
    /// `https://host/path?query`: one host's http and https answers differ (redirects).
    url: String,
}

impl Key {
    fn size(&self) -> usize {
        self.service.len() + self.url.len()
    }
}

/// The key of a request the cache may answer, or `None` when it must go upstream untouched:
/// not GET or HEAD, credentials (`Authorization`, RFC 9111 3.5), a `Range`, an upgrade, or
/// (under `static`) a path that is not a static asset. The client's own `Cache-Control` is
/// not obeyed: a client that could bypass the cache could also empty it on every backend.
#[must_use]
pub fn request_key(
    policy: &CachePolicy,
    service: &str,
    method: &Method,
    scheme: &str,
    host: &str,
    uri: &Uri,
    headers: &HeaderMap,
) -> Option<Key> {
    if !matches!(*method, Method::GET | Method::HEAD)
        || headers.contains_key(header::AUTHORIZATION)
        || headers.contains_key(header::RANGE)
        || headers.contains_key(header::UPGRADE)
    {
        return None;
    }
    if !policy.all && !is_static(uri.path()) {
        return None;
    }
    let pq = uri.path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
    Some(Key { service: service.to_owned(), url: format!("{scheme}://{host}{pq}") })
}

fn is_static(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or_default();
    name.rsplit_once('.').is_some_and(|(_, ext)| STATIC.iter().any(|s| s.eq_ignore_ascii_case(ext)))
}

/// Why an answer is not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotKept {
    /// Its status is not one kept (only 200, 203, 300, 301, 308): try again next time.
    Status,
    /// Its headers forbid it (`no-store`, `private`, `no-cache`, `max-age=0`, `Set-Cookie`,
    /// `Vary: *`): the key skips the cache for a while.
    Forbidden,
}

/// How long `policy` keeps an answer with these status and headers, and the request headers
/// it varies on; or why not.
pub fn storable(
    policy: &CachePolicy,
    status: StatusCode,
    headers: &HeaderMap,
    now: SystemTime,
) -> Result<(Duration, Vec<HeaderName>), NotKept> {
    if !matches!(status.as_u16(), 200 | 203 | 300 | 301 | 308) {
        return Err(NotKept::Status);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotKept::Forbidden);
    }
    let mut max_age = None;
    let mut s_maxage = None;
    for d in directives(headers, &header::CACHE_CONTROL) {
        let (name, value) = d.split_once('=').map_or((d, None), |(n, v)| (n.trim(), Some(v.trim())));
        let seconds = || value.and_then(|v| v.trim_matches('"').parse::<u64>().ok());
        if name.eq_ignore_ascii_case("no-store")
            || name.eq_ignore_ascii_case("private")
            || name.eq_ignore_ascii_case("no-cache")
        {
            return Err(NotKept::Forbidden);
        } else if name.eq_ignore_ascii_case("max-age") {
            max_age = Some(seconds().unwrap_or(0));
        } else if name.eq_ignore_ascii_case("s-maxage") {
            s_maxage = Some(seconds().unwrap_or(0));
        }
    }
    // s-maxage is for shared caches like this one; `Expires` counts only without either,
    // from the answer's `Date` (the backend's clock) when it has one.
    let date =
        |n| headers.get(n).and_then(|v| v.to_str().ok()).and_then(|v| httpdate::parse_http_date(v).ok());
    let lifetime = s_maxage.or(max_age).map(Duration::from_secs).or_else(|| {
        headers.get(header::EXPIRES)?;
        // An unreadable date means already expired (RFC 9111 5.3).
        let from = date(header::DATE).unwrap_or(now);
        Some(date(header::EXPIRES).map_or(Duration::ZERO, |at| at.duration_since(from).unwrap_or_default()))
    });
    // What is left of it: the time the answer already spent in caches upstream counts.
    let left = lifetime.map(|l| l.saturating_sub(Duration::from_secs(age_of(headers))));
    let ttl = left.map_or(policy.ttl, |e| e.min(policy.ttl));
    if ttl.is_zero() {
        return Err(NotKept::Forbidden);
    }
    let mut vary = Vec::new();
    for name in directives(headers, &header::VARY) {
        if name == "*" {
            return Err(NotKept::Forbidden);
        }
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) if !vary.contains(&n) => vary.push(n),
            Ok(_) => {}
            Err(_) => return Err(NotKept::Forbidden),
        }
    }
    Ok((ttl, vary))
}

/// The comma-separated items of every `name` header.
fn directives<'a>(headers: &'a HeaderMap, name: &HeaderName) -> impl Iterator<Item = &'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|d| !d.is_empty())
}

/// Whether the client's copy is the kept one (`If-None-Match` on the `ETag`, else
/// `If-Modified-Since` on `Last-Modified`): it gets a 304 then.
#[must_use]
pub fn not_modified(req: &HeaderMap, kept: &HeaderMap) -> bool {
    fn text(h: &HeaderMap, n: HeaderName) -> Option<&str> {
        h.get(n)?.to_str().ok()
    }
    if let Some(tags) = text(req, header::IF_NONE_MATCH) {
        // Weak comparison (RFC 9110 13.1.2): `W/"x"` and `"x"` match.
        let bare = |t: &str| t.trim().trim_start_matches("W/").to_owned();
        let etag = text(kept, header::ETAG).map(bare);
        return tags.split(',').any(|t| t.trim() == "*" || etag.as_deref() == Some(&bare(t)));
    }
    let date = |h, n| text(h, n).and_then(|v| httpdate::parse_http_date(v).ok());
    match (date(req, header::IF_MODIFIED_SINCE), date(kept, header::LAST_MODIFIED)) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// One kept answer.
#[derive(Debug)]
pub struct Entry {
    pub status: StatusCode,
    /// The backend's headers, hop-by-hop ones removed.
    pub headers: HeaderMap,
    pub body: Bytes,
    stored: Instant,
    /// The `Age` the backend gave, seconds.
    initial_age: u64,
}

impl Entry {
    /// Seconds since the backend made it (the `Age` header of a hit).
    #[must_use]
    pub fn age(&self, now: Instant) -> u64 {
        self.initial_age.saturating_add(now.saturating_duration_since(self.stored).as_secs())
    }

    fn size(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 32).sum();
        self.body.len() + headers
    }
}

/// An answer for one set of `Vary` request values, or the mark that this key is not kept.
#[derive(Debug)]
struct Variant {
    /// The request headers the answer varies on and the values it was made for.
    vary: Vec<(HeaderName, Option<HeaderValue>)>,
    entry: Option<Arc<Entry>>,
    expires: Instant,
    size: usize,
}

impl Variant {
    fn matches(&self, req: &HeaderMap) -> bool {
        self.vary.iter().all(|(n, v)| req.get(n) == v.as_ref())
    }
}

/// What the cache has for a request.
#[derive(Debug)]
pub enum Found {
    Hit(Arc<Entry>),
    /// The key's answers are not kept: go upstream, no waiting.
    Pass,
    Miss,
}

/// Counts since start, for `/metrics`.
#[derive(Debug, Default)]
pub struct Counts {
    pub stored: AtomicU64,
    pub evicted: AtomicU64,
}

/// The kept answers and the requests fetching them, shared by every route.
#[derive(Debug)]
pub struct Store {
    answers: Mutex<Answers>,
    /// Keys being fetched: a waiter's receiver sees the outcome, or the sender dropped when
    /// the fetch ended without one.
    flights: Mutex<HashMap<Key, watch::Receiver<Outcome>>>,
    pub counts: Counts,
}

#[derive(Debug)]
struct Answers {
    lru: LruCache<Key, Vec<Variant>>,
    bytes: usize,
    memory: usize,
    max_object: usize,
}

/// Memory in use and its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub bytes: usize,
    pub entries: usize,
    pub memory: usize,
}

impl Default for Store {
    fn default() -> Self {
        let d = crate::config::EdgeCache::default();
        Self::new(d.memory_bytes, d.max_object_bytes)
    }
}

impl Store {
    #[must_use]
    pub fn new(memory: usize, max_object: usize) -> Self {
        Self {
            answers: Mutex::new(Answers { lru: LruCache::new_unbounded(), bytes: 0, memory, max_object }),
            flights: Mutex::default(),
            counts: Counts::default(),
        }
    }

    fn answers(&self) -> std::sync::MutexGuard<'_, Answers> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the bounds, dropping what no longer fits.
    pub fn resize(&self, memory: usize, max_object: usize) {
        let mut a = self.answers();
        a.memory = memory;
        a.max_object = max_object;
        let evicted = a.evict();
        self.counts.evicted.fetch_add(evicted, Ordering::Relaxed);
    }

    /// Forgets the answers of services `keep` refuses (their policy changed or is gone).
    pub fn retain_services(&self, keep: impl Fn(&str) -> bool) {
        let mut a = self.answers();
        let gone: Vec<Key> =
            a.lru.iter().filter(|(k, _)| !keep(&k.service)).map(|(k, _)| k.clone()).collect();
        for k in gone {
            a.remove(&k);
        }
    }

    #[must_use]
    pub fn usage(&self) -> Usage {
        let a = self.answers();
        let entries = a.lru.iter().flat_map(|(_, v)| v).filter(|v| v.entry.is_some()).count();
        Usage { bytes: a.bytes, entries, memory: a.memory }
    }

    #[must_use]
    pub fn max_object(&self) -> usize {
        self.answers().max_object
    }

    /// The fresh answer for this request, if any.
    pub fn get(&self, key: &Key, req: &HeaderMap, now: Instant) -> Found {
        let mut a = self.answers();
        let Some(variants) = a.lru.get_mut(key) else { return Found::Miss };
        let mut freed = 0;
        variants.retain(|v| {
            let fresh = v.expires > now;
            if !fresh {
                freed += v.size;
            }
            fresh
        });
        let found = match variants.iter().find(|v| v.entry.is_none() || v.matches(req)) {
            Some(Variant { entry: Some(e), .. }) => Found::Hit(e.clone()),
            Some(_) => Found::Pass,
            None => Found::Miss,
        };
        let empty = variants.is_empty();
        a.bytes -= freed;
        if empty {
            a.remove(key);
        }
        found
    }

    /// Whose turn it is to fetch `key`: this request's (it leads until the [`Flight`] is
    /// dropped), or another's, whose end the returned receiver sees.
    pub fn flight(self: &Arc<Self>, key: &Key) -> Result<Flight, watch::Receiver<Outcome>> {
        let mut flights = self.flights.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rx) = flights.get(key) {
            return Err(rx.clone());
        }
        let (tx, rx) = watch::channel(Outcome::Pending);
        flights.insert(key.clone(), rx);
        Ok(Flight { store: self.clone(), key: key.clone(), done: tx })
    }

    fn insert(&self, key: &Key, variant: Variant) {
        let mut a = self.answers();
        if variant.size > a.max_object {
            return;
        }
        let size = variant.size;
        if !a.lru.contains_key(key) {
            a.bytes += key.size() + OVERHEAD;
            a.lru.insert(key.clone(), Vec::new());
        }
        let Some(variants) = a.lru.get_mut(key) else { return };
        // A pass mark and an answer never coexist; a newer answer replaces the same values'.
        let mut freed = 0;
        variants.retain(|v| {
            let keep = v.entry.is_some() && variant.entry.is_some() && v.vary != variant.vary;
            if !keep {
                freed += v.size;
            }
            keep
        });
        if variants.len() >= MAX_VARIANTS {
            freed += variants.remove(0).size;
        }
        variants.push(variant);
        a.bytes = a.bytes + size - freed;
        let evicted = a.evict();
        self.counts.evicted.fetch_add(evicted, Ordering::Relaxed);
    }
}

impl Answers {
    fn remove(&mut self, key: &Key) {
        if let Some(v) = self.lru.remove(key) {
            self.bytes -= key.size() + OVERHEAD + v.iter().map(|v| v.size).sum::<usize>();
        }
    }

    /// Drops least recently used keys until the bound holds; how many answers went.
    fn evict(&mut self) -> u64 {
        let mut n = 0;
        while self.bytes > self.memory {
            let Some((k, v)) = self.lru.remove_lru() else { break };
            self.bytes -= k.size() + OVERHEAD + v.iter().map(|v| v.size).sum::<usize>();
            n += v.iter().filter(|v| v.entry.is_some()).count() as u64;
        }
        n
    }
}

/// How a fetch ended, as its waiters see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not yet; or, once the fetch is gone, it ended without an answer (failed, or its client
    /// left): a waiter takes its own turn.
    Pending,
    /// Kept: a waiter finds it.
    Kept,
    /// Answered but not kept: a waiter goes upstream itself at once.
    NotKept,
}

/// The one request fetching a key. Its waiters wake when it says how it ended, or when it is
/// dropped without saying (failed, or its client gone).
#[derive(Debug)]
pub struct Flight {
    store: Arc<Store>,
    key: Key,
    done: watch::Sender<Outcome>,
}

impl Flight {
    /// The largest body this cache keeps.
    #[must_use]
    pub fn max_object(&self) -> usize {
        self.store.max_object()
    }

    /// Keeps the answer the backend gave, for `ttl`. `req` is the request that asked for it
    /// (the values it varies on). Body and header values are copied: those hyper parsed share
    /// its read buffer, which the memory bound would not count.
    pub fn keep(self, req: &HeaderMap, vary: &[HeaderName], ttl: Duration, answer: &Answer) {
        let now = Instant::now();
        let mut headers = HeaderMap::with_capacity(answer.headers.len());
        for (n, v) in &answer.headers {
            if let Ok(v) = HeaderValue::from_bytes(v.as_bytes()) {
                headers.append(n.clone(), v);
            }
        }
        let entry = Entry {
            status: answer.status,
            body: Bytes::copy_from_slice(&answer.body),
            initial_age: age_of(&headers),
            headers,
            stored: now,
        };
        let vary: Vec<_> = vary.iter().map(|n| (n.clone(), req.get(n).cloned())).collect();
        let size = entry.size()
            + vary
                .iter()
                .map(|(n, v)| n.as_str().len() + v.as_ref().map_or(0, HeaderValue::len))
                .sum::<usize>();
        self.store
            .insert(&self.key, Variant { vary, entry: Some(Arc::new(entry)), expires: now + ttl, size });
        self.store.counts.stored.fetch_add(1, Ordering::Relaxed);
        self.done.send_replace(Outcome::Kept);
    }

    /// Marks the key as not kept for a while: its requests go upstream without waiting.
    pub fn pass(self) {
        let now = Instant::now();
        self.store
            .insert(&self.key, Variant { vary: Vec::new(), entry: None, expires: now + PASS_FOR, size: 64 });
        self.done.send_replace(Outcome::NotKept);
    }

    /// This answer is not kept (its status), the next may be: the waiters go upstream.
    pub fn not_kept(self) {
        self.done.send_replace(Outcome::NotKept);
    }
}

/// The `Age` an answer came with, seconds.
fn age_of(headers: &HeaderMap) -> u64 {
    headers.get(header::AGE).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.store.flights.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.key);
    }
}

/// An answer to keep.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(all: bool) -> CachePolicy {
        CachePolicy { all, ttl: Duration::from_mins(10) }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    fn key_of(p: &CachePolicy, method: &Method, path: &'static str, h: &HeaderMap) -> Option<Key> {
        request_key(p, "svc", method, "https", "example.org", &Uri::from_static(path), h)
    }

    #[test]
    fn only_safe_requests_without_credentials_for_static_paths_have_a_key() {
        let none = HeaderMap::new();
        let st = policy(false);
        assert!(key_of(&st, &Method::GET, "/assets/app.CSS?v=3", &none).is_some());
        assert!(key_of(&st, &Method::HEAD, "/logo.png", &none).is_some());
        assert!(key_of(&st, &Method::GET, "/api/users", &none).is_none(), "not static");
        assert!(key_of(&st, &Method::GET, "/a.css/x", &none).is_none(), "the last segment decides");
        assert!(key_of(&policy(true), &Method::GET, "/api/users", &none).is_some());
        assert!(key_of(&st, &Method::POST, "/logo.png", &none).is_none());
        for h in [("authorization", "Bearer x"), ("range", "bytes=0-1"), ("upgrade", "websocket")] {
            assert!(key_of(&st, &Method::GET, "/logo.png", &headers(&[h])).is_none(), "{h:?}");
        }
        let a = key_of(&st, &Method::GET, "/logo.png?a=1", &none).unwrap();
        let b = key_of(&st, &Method::GET, "/logo.png?a=2", &none).unwrap();
        assert_ne!(a, b, "the query is part of the key");
    }

    #[test]
    fn the_backend_shortens_or_forbids_keeping() {
        let p = policy(false);
        let now = SystemTime::now();
        let ok = StatusCode::OK;
        assert_eq!(storable(&p, ok, &HeaderMap::new(), now), Ok((Duration::from_mins(10), vec![])));
        let h = headers(&[("cache-control", "public, max-age=60")]);
        assert_eq!(storable(&p, ok, &h, now).unwrap().0, Duration::from_mins(1));
        let h = headers(&[("cache-control", "max-age=60, s-maxage=120")]);
        assert_eq!(storable(&p, ok, &h, now).unwrap().0, Duration::from_mins(2), "s-maxage wins");
        let h = headers(&[("cache-control", "max-age=60"), ("age", "50")]);
        assert_eq!(storable(&p, ok, &h, now).unwrap().0, Duration::from_secs(10), "what is left of it");
        let h = headers(&[("cache-control", "max-age=60"), ("age", "9999999")]);
        assert_eq!(storable(&p, ok, &h, now), Err(NotKept::Forbidden), "older than its lifetime");
        let h = headers(&[("cache-control", "max-age=86400")]);
        assert_eq!(storable(&p, ok, &h, now).unwrap().0, Duration::from_mins(10), "the policy bounds it");
        for cc in ["no-store", "private", "no-cache", "max-age=0", "Private, max-age=60"] {
            let h = headers(&[("cache-control", cc)]);
            assert_eq!(storable(&p, ok, &h, now), Err(NotKept::Forbidden), "{cc}");
        }
        assert_eq!(storable(&p, ok, &headers(&[("set-cookie", "a=1")]), now), Err(NotKept::Forbidden));
        assert_eq!(storable(&p, ok, &headers(&[("vary", "*")]), now), Err(NotKept::Forbidden));
        assert_eq!(storable(&p, ok, &headers(&[("expires", "0")]), now), Err(NotKept::Forbidden));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        let mut h = HeaderMap::new();
        h.insert(header::EXPIRES, HeaderValue::from_str(&later).unwrap());
        let ttl = storable(&p, ok, &h, now).unwrap().0;
        assert!(ttl > Duration::from_secs(88) && ttl <= Duration::from_secs(90), "{ttl:?}");
        for s in [StatusCode::NOT_FOUND, StatusCode::INTERNAL_SERVER_ERROR, StatusCode::PARTIAL_CONTENT] {
            assert_eq!(storable(&p, s, &HeaderMap::new(), now), Err(NotKept::Status), "{s}");
        }
        let h = headers(&[("vary", "Accept-Encoding, accept-language"), ("vary", "accept-encoding")]);
        let vary = storable(&p, ok, &h, now).unwrap().1;
        assert_eq!(vary, vec![header::ACCEPT_ENCODING, header::ACCEPT_LANGUAGE]);
    }

    #[test]
    fn a_current_copy_is_not_sent_again() {
        let kept = headers(&[("etag", "\"v2\""), ("last-modified", "Tue, 03 Nov 2026 10:00:00 GMT")]);
        assert!(not_modified(&headers(&[("if-none-match", "\"v1\", W/\"v2\"")]), &kept));
        assert!(!not_modified(&headers(&[("if-none-match", "\"v1\"")]), &kept));
        assert!(not_modified(&headers(&[("if-none-match", "*")]), &kept));
        // If-None-Match decides alone when present.
        let both =
            headers(&[("if-none-match", "\"v1\""), ("if-modified-since", "Wed, 04 Nov 2026 10:00:00 GMT")]);
        assert!(!not_modified(&both, &kept));
        assert!(not_modified(&headers(&[("if-modified-since", "Tue, 03 Nov 2026 10:00:00 GMT")]), &kept));
        assert!(!not_modified(&headers(&[("if-modified-since", "Mon, 02 Nov 2026 10:00:00 GMT")]), &kept));
        assert!(!not_modified(&HeaderMap::new(), &kept));
    }

    fn answer(body: &'static str) -> Answer {
        Answer {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    fn hit(found: Found) -> Option<Bytes> {
        match found {
            Found::Hit(e) => Some(e.body.clone()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn variants_expiry_and_the_memory_bound() {
        let store = Arc::new(Store::new(8 * 1024, 2048));
        let p = policy(true);
        let none = HeaderMap::new();
        let gzip = headers(&[("accept-encoding", "gzip")]);
        let k = key_of(&p, &Method::GET, "/a", &none).unwrap();
        let vary = [header::ACCEPT_ENCODING];
        store.flight(&k).unwrap().keep(&gzip, &vary, Duration::from_mins(1), &answer("zipped"));
        store.flight(&k).unwrap().keep(&none, &vary, Duration::from_mins(1), &answer("plain"));
        let now = Instant::now();
        assert_eq!(hit(store.get(&k, &gzip, now)).as_deref(), Some(&b"zipped"[..]));
        assert_eq!(hit(store.get(&k, &none, now)).as_deref(), Some(&b"plain"[..]));
        let br = headers(&[("accept-encoding", "br")]);
        assert!(matches!(store.get(&k, &br, now), Found::Miss));
        assert!(matches!(store.get(&k, &none, now + Duration::from_secs(61)), Found::Miss), "expired");
        assert_eq!(store.usage().entries, 0, "expired answers are dropped when seen");
        assert_eq!(store.usage().bytes, 0);

        // A body over max_object is not kept; many keys stay under the memory bound, the
        // least recently used going first.
        let big = Answer { body: Bytes::from(vec![0; 4096]), ..answer("") };
        store.flight(&k).unwrap().keep(&none, &[], Duration::from_mins(1), &big);
        assert!(matches!(store.get(&k, &none, Instant::now()), Found::Miss));
        let keys: Vec<Key> = (0..100)
            .map(|i| Key { service: "svc".into(), url: format!("https://example.org/{i}") })
            .collect();
        for (i, k) in keys.iter().enumerate() {
            store.flight(k).unwrap().keep(&none, &[], Duration::from_mins(1), &answer("0123456789"));
            if i >= 1 {
                // Key 0 stays in use, so it is never the least recently used.
                assert!(hit(store.get(&keys[0], &none, Instant::now())).is_some(), "key 0 evicted at {i}");
            }
            assert!(store.usage().bytes <= 8 * 1024);
        }
        assert!(hit(store.get(&keys[99], &none, Instant::now())).is_some());
        assert!(hit(store.get(&keys[1], &none, Instant::now())).is_none(), "oldest unused went first");
        assert!(store.counts.evicted.load(Ordering::Relaxed) > 50);
        store.retain_services(|s| s != "svc");
        assert_eq!(store.usage(), Usage { bytes: 0, entries: 0, memory: 8 * 1024 });
    }

    #[tokio::test]
    async fn one_flight_per_key_and_waiters_wake_when_it_ends() {
        let store = Arc::new(Store::new(1 << 20, 1 << 16));
        let k = key_of(&policy(true), &Method::GET, "/x", &HeaderMap::new()).unwrap();
        let lead = store.flight(&k).unwrap();
        let mut waiters: Vec<_> = (0..3).map(|_| store.flight(&k).unwrap_err()).collect();
        lead.keep(&HeaderMap::new(), &[], Duration::from_mins(1), &answer("x"));
        for w in &mut waiters {
            assert!(w.changed().await.is_ok());
            assert_eq!(*w.borrow(), Outcome::Kept);
        }
        // An answer not kept sends the waiters upstream; a fetch that ends without one lets
        // them take their turn.
        let k3 = Key { service: "svc".into(), url: "https://example.org/404".into() };
        let lead = store.flight(&k3).unwrap();
        let mut w = store.flight(&k3).unwrap_err();
        lead.not_kept();
        w.changed().await.unwrap();
        assert_eq!(*w.borrow(), Outcome::NotKept);
        let lead = store.flight(&k3).unwrap();
        let mut w = store.flight(&k3).unwrap_err();
        drop(lead);
        assert!(w.changed().await.is_err(), "the fetch is gone");
        assert_eq!(*w.borrow(), Outcome::Pending);
        assert!(hit(store.get(&k, &HeaderMap::new(), Instant::now())).is_some());
        // A flight that ends without an answer (client gone) frees the key for the next.
        let lead = store.flight(&k).unwrap();
        drop(lead);
        assert!(store.flight(&k).is_ok());
        // A forbidden answer: the key is passed without waiting.
        let k2 = Key { service: "svc".into(), url: "https://example.org/private".into() };
        store.flight(&k2).unwrap().pass();
        assert!(matches!(store.get(&k2, &HeaderMap::new(), Instant::now()), Found::Pass));
    }
}
