//! The HTTP edge: listeners declared in the registry, Host/path routing, and proxying to
//! backends with balancing, failover and retries.
//!
//! - `routes`: which service answers a request (pure).
//! - `balance`: picking among usable backends (pure).
//! - `upstream`: backend state (health, in flight, latency) and a service's tiers.
//! - `cache`: the edge cache of GET answers, with request coalescing.
//! - `proxy`: one request: redirect, forward, retry, access log.
//! - `server`: accepting and serving connections (HTTP/1.1, HTTP/2, TLS) under the
//!   listener's limits.
//! - `h1_server`: HTTP/1.1 from clients, parsed and answered by the connection's own task
//!   (hyper serves HTTP/2).
//! - `h1`: HTTP/1.1 to backends, the same way.
//! - `passthrough`: TLS connections forwarded by SNI without terminating them.
//! - `l4`: the userspace TCP/UDP proxy of `mode: proxy` services.
//! - `sni`: reading the name a `ClientHello` asks for (pure).
//!
//! The controller owns an [`Edge`] and hands it every registry that is applied, and every
//! change of health or drains. Requests read one immutable [`Snapshot`]; a reload swaps it
//! whole, so a request never sees half of one.

/// `let $x = $e;` pinned where it lies, as `Pin<&mut _>`: awaiting it then moves a pointer,
/// not the future. `.await` on a future moves it whole into the caller's state (twice, as
/// compiled today), which for a request's future is kilobytes per request. The binding is
/// shadowed, so the future cannot be moved afterwards (what `std::pin::pin!` would move).
macro_rules! pin_here {
    ($x:ident = $e:expr) => {
        let mut $x = $e;
        // SAFETY: the only binding of the value is shadowed here, so it is never moved
        // again; it is dropped where it lies.
        #[allow(unused_mut)]
        let mut $x = unsafe { std::pin::Pin::new_unchecked(&mut $x) };
    };
}

mod acl;
mod balance;
mod breaker;
mod cache;
mod deadline;
mod h1;
mod h1_server;
mod l4;
mod passthrough;
mod pool;
mod proxy;
mod proxy_v2;
mod ratelimit;
mod relay;
mod routes;
mod server;
mod sni;
mod upstream;
mod workers;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use arc_swap::ArcSwap;
pub use routes::{RouteTable, tables};
use tokio::sync::watch;
use tracing::info;
pub use upstream::DURATION_BOUNDS;
use upstream::{BackendState, Member, ServiceState};

use crate::{
    config::{Limits, Mode, Protocol, Registry, with_roles},
    plan::Overrides,
};

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the HTTP edge's threads")]
    Runtime(#[source] std::io::Error),
    #[error("listener {port}: TLS")]
    Tls {
        port: u16,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error("service {service}: TLS to its backends")]
    UpstreamTls {
        service: String,
        #[source]
        source: crate::tls::TlsError,
    },
}

/// What requests read: routes, services and listener settings of one applied registry.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub tables: BTreeMap<u16, RouteTable>,
    pub services: HashMap<String, Arc<ServiceState>>,
    pub ports: BTreeMap<u16, Arc<Port>>,
    pub rate: ratelimit::Limiter,
    pub acl: acl::Acl,
    /// Kept answers of routes with `cache:`.
    pub cache: Arc<cache::Store>,
    /// `mode: proxy` services by the socket they are served on.
    pub l4: HashMap<(SocketAddr, Protocol), Arc<l4::Service>>,
}

/// How a listener port serves.
#[derive(Debug, Default)]
pub struct Port {
    pub limits: Limits,
    /// Terminates TLS with these settings (certificates included).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// `Strict-Transport-Security` added to responses without one.
    pub hsts: Option<http::HeaderValue>,
    pub h2c: bool,
    pub passthrough: bool,
    /// Certificates served, for metrics and expiry warnings.
    pub certificates: Vec<CertInfo>,
}

/// A certificate a listener serves.
#[derive(Debug, Clone)]
pub struct CertInfo {
    /// The registry's name for it, else its first DNS name.
    pub name: String,
    pub names: Vec<String>,
    pub file: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub not_after: i64,
}

/// Shared by the controller and every connection.
#[derive(Debug, Default)]
pub struct Shared {
    current: ArcSwap<Snapshot>,
    clients: Arc<server::Clients>,
    /// TLS handshakes that failed or timed out.
    tls_failures: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }
}

/// The HTTP edge of this lbd.
pub struct Edge {
    /// This node's name from the command line; else the registry's.
    node: Option<String>,
    /// Bind each edge thread to a CPU of its own (`workers::placement_cpus`).
    affinity: bool,
    /// Its own threads, one a core: proxying wants every core, the controller one thread.
    workers: Option<workers::Workers>,
    shared: Arc<Shared>,
    listeners: HashMap<SocketAddr, watch::Sender<()>>,
    /// The L4 proxy's sockets.
    l4_sockets: HashMap<(SocketAddr, Protocol), watch::Sender<()>>,
    /// Backend state by (service, backend identity), kept across reloads.
    backends: HashMap<(String, String), Arc<BackendState>>,
    /// Connections by (service, backend identity), kept across reloads that keep their
    /// settings.
    pools: HashMap<(String, String), Arc<pool::BackendPool>>,
    /// Per-address rate buckets (made when first needed) and refusal counts, kept across
    /// reloads.
    per_ip: Option<Arc<ratelimit::PerAddress>>,
    rate_counts: Arc<ratelimit::Counts>,
    /// Requests the ACL refused, kept across reloads.
    acl_denied: Arc<std::sync::atomic::AtomicU64>,
    /// Kept answers, across reloads that keep their service's policy.
    cache: Arc<cache::Store>,
    /// The certificate, key and CA files served, as they were when read.
    tls_files: Vec<FileStamp>,
}

/// Which version of a file was read: a replaced file (renamed over, rewritten) differs.
type FileStamp = (std::path::PathBuf, Option<(u64, u64, i64, i64, u64)>);

fn stamps(reg: &Registry) -> Vec<FileStamp> {
    use std::os::unix::fs::MetadataExt as _;
    let listeners = reg.listeners.iter().filter_map(|l| l.tls.as_ref()).flat_map(|t| {
        t.certificates
            .iter()
            .flat_map(|c| [c.cert.clone(), c.key.clone()])
            .chain(t.client_auth.as_ref().map(|a| a.ca.clone()))
    });
    let upstreams = reg
        .http
        .values()
        .filter_map(|s| s.upstream.tls.as_ref())
        .flat_map(|t| [t.ca.clone(), t.cert.clone(), t.key.clone()].into_iter().flatten());
    let files = listeners.chain(upstreams);
    files
        .map(|f| {
            let m =
                std::fs::metadata(&f).ok().map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()));
            (f, m)
        })
        .collect()
}

impl Edge {
    #[must_use]
    pub fn new(node: Option<String>, affinity: bool) -> Self {
        Self {
            node,
            affinity,
            workers: None,
            shared: Arc::default(),
            listeners: HashMap::new(),
            l4_sockets: HashMap::new(),
            backends: HashMap::new(),
            pools: HashMap::new(),
            per_ip: None,
            rate_counts: Arc::default(),
            acl_denied: Arc::default(),
            cache: Arc::default(),
            tls_files: Vec::new(),
        }
    }

    /// Serves `reg`: binds listeners it adds (failing, with nothing changed, when one cannot
    /// bind), swaps in its routes and services, then stops listeners it no longer has
    /// (their open connections finish).
    pub fn apply(&mut self, reg: &Registry, over: &Overrides) -> Result<(), EdgeError> {
        let wanted: BTreeMap<SocketAddr, u16> =
            reg.listeners.iter().map(|l| (SocketAddr::new(l.address, l.port), l.port)).collect();
        let threads = workers::count();
        let mut fresh = Vec::new();
        for (&addr, &port) in wanted.iter().filter(|(a, _)| !self.listeners.contains_key(a)) {
            let sockets = workers::bind(addr, threads).map_err(|source| EdgeError::Bind { addr, source })?;
            fresh.push((addr, port, sockets));
        }
        let (l4_wanted, l4_fresh) = self.bind_l4(reg, threads)?;
        if (!fresh.is_empty() || !l4_fresh.is_empty()) && self.workers.is_none() {
            let w = workers::Workers::start(threads, self.affinity).map_err(EdgeError::Runtime)?;
            let rt = &w.handles()[0];
            let shared = self.shared.clone();
            rt.spawn(async move {
                let mut daily = tokio::time::interval(std::time::Duration::from_hours(24));
                daily.tick().await;
                loop {
                    daily.tick().await;
                    warn_expiring(&shared.snapshot(), std::time::SystemTime::now());
                }
            });
            let shared = self.shared.clone();
            rt.spawn(async move {
                // Idle backend connections past their idle timeout, on backends no request
                // checks out from.
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let now = std::time::Instant::now();
                    for svc in shared.snapshot().services.values() {
                        svc.members.iter().for_each(|m| m.pool.sweep(now));
                    }
                }
            });
            self.workers = Some(w);
        }

        let tls_files = stamps(reg);
        let files_changed = tls_files != self.tls_files;
        let ports = reg
            .listeners
            .iter()
            .map(|l| port(l).map(|p| (l.port, Arc::new(p))))
            .collect::<Result<BTreeMap<_, _>, _>>()?;
        let node = self.node.clone().or_else(|| reg.node.clone());
        let snap = self.build(reg, node.as_deref(), ports, files_changed)?;
        warn_expiring(&snap, std::time::SystemTime::now());
        self.tls_files = tls_files;
        self.shared.current.store(Arc::new(snap));
        self.set_overrides(over);

        if let Some(w) = &self.workers {
            for (addr, port, sockets) in fresh {
                let (tx, rx) = watch::channel(());
                for (rt, l) in w.handles().iter().zip(sockets) {
                    let _guard = rt.enter();
                    let listener = tokio::net::TcpListener::from_std(l)
                        .map_err(|source| EdgeError::Bind { addr, source })?;
                    rt.spawn(server::accept_loop(
                        listener,
                        port,
                        self.shared.clone(),
                        rx.clone(),
                        w.placement().clone(),
                    ));
                }
                info!(%addr, threads, "HTTP listener started");
                self.listeners.insert(addr, tx);
            }
            let started = self.start_l4(w, l4_fresh)?;
            self.l4_sockets.extend(started);
        }
        self.l4_sockets.retain(|&(addr, proto), stop| {
            let keep = l4_wanted.contains(&(addr, proto));
            if !keep {
                let _ = stop.send(());
                info!(%addr, proto = proto.as_str(), "L4 proxy socket closed");
            }
            keep
        });
        self.listeners.retain(|addr, stop| {
            let keep = wanted.contains_key(addr);
            if !keep {
                let _ = stop.send(());
                info!(%addr, "HTTP listener stopped");
            }
            keep
        });
        Ok(())
    }

    /// Binds the proxied services' sockets this registry adds (a busy port fails the reload
    /// before anything changes); every socket it wants, and the fresh ones.
    #[expect(clippy::type_complexity, reason = "two lists, named at the caller")]
    fn bind_l4(
        &self,
        reg: &Registry,
        threads: usize,
    ) -> Result<(Vec<(SocketAddr, Protocol)>, Vec<(SocketAddr, Protocol, L4Socket)>), EdgeError> {
        let wanted: Vec<(SocketAddr, Protocol)> =
            reg.tcp.values().filter(|s| s.mode == Mode::Proxy).flat_map(l4::sockets).collect();
        let mut fresh = Vec::new();
        for &(addr, proto) in wanted.iter().filter(|k| !self.l4_sockets.contains_key(k)) {
            let bound = match proto {
                Protocol::Tcp => workers::bind(addr, threads).map(L4Socket::Tcp),
                Protocol::Udp => l4::bind_udp(addr).map(L4Socket::Udp),
            };
            fresh.push((addr, proto, bound.map_err(|source| EdgeError::Bind { addr, source })?));
        }
        Ok((wanted, fresh))
    }

    /// Serves freshly bound proxy sockets: TCP on every edge thread, UDP on the first; their
    /// stop signals.
    #[expect(clippy::type_complexity, reason = "the socket and its stop signal")]
    fn start_l4(
        &self,
        w: &workers::Workers,
        fresh: Vec<(SocketAddr, Protocol, L4Socket)>,
    ) -> Result<Vec<((SocketAddr, Protocol), watch::Sender<()>)>, EdgeError> {
        let mut started = Vec::with_capacity(fresh.len());
        for (addr, proto, socket) in fresh {
            let (tx, rx) = watch::channel(());
            let shared = self.shared.clone();
            let current = move || shared.snapshot().l4.get(&(addr, proto)).cloned();
            match socket {
                L4Socket::Tcp(sockets) => {
                    for (rt, l) in w.handles().iter().zip(sockets) {
                        let _guard = rt.enter();
                        let listener = tokio::net::TcpListener::from_std(l)
                            .map_err(|source| EdgeError::Bind { addr, source })?;
                        rt.spawn(l4::serve_tcp(listener, current.clone(), rx.clone()));
                    }
                }
                L4Socket::Udp(sock) => {
                    // One socket, on the first thread: flows are kept per socket.
                    let rt = &w.handles()[0];
                    let _guard = rt.enter();
                    let sock = tokio::net::UdpSocket::from_std(sock)
                        .map_err(|source| EdgeError::Bind { addr, source })?;
                    rt.spawn(l4::serve_udp(sock, current, rx));
                }
            }
            info!(%addr, proto = proto.as_str(), "L4 proxy listening");
            started.push(((addr, proto), tx));
        }
        Ok(started)
    }

    /// A backend's state as the last registry left it (health, counts, circuit), or a new one.
    fn backend_state(&self, key: &(String, String)) -> Arc<BackendState> {
        self.backends.get(key).cloned().unwrap_or_else(|| Arc::new(BackendState::new(&key.0, &key.1)))
    }

    fn build(
        &mut self,
        reg: &Registry,
        node: Option<&str>,
        ports: BTreeMap<u16, Arc<Port>>,
        files_changed: bool,
    ) -> Result<Snapshot, EdgeError> {
        let previous = self.shared.snapshot();
        let mut backends = HashMap::new();
        let mut pools = HashMap::new();
        let mut services = HashMap::new();
        for (name, spec) in &reg.http {
            // Idle connections survive a reload that keeps their settings and files.
            let settings = match previous.services.get(name).map(|s| &s.upstream) {
                Some(s) if s.made_from(spec) && !files_changed => s.clone(),
                _ => Arc::new(
                    pool::Settings::new(spec)
                        .map_err(|source| EdgeError::UpstreamTls { service: name.clone(), source })?,
                ),
            };
            let members: Vec<Member> = with_roles(&spec.backends, &spec.fallback)
                .map(|(b, role)| {
                    let key = (name.clone(), b.identity());
                    let state = self.backend_state(&key);
                    let pool = match self.pools.get(&key) {
                        Some(p) if Arc::ptr_eq(p.settings(), &settings) => p.clone(),
                        _ => Arc::new(pool::BackendPool::new(&key.1, settings.clone())),
                    };
                    pools.insert(key.clone(), pool.clone());
                    backends.insert(key, state.clone());
                    let local = node.is_some() && b.node.as_deref() == node;
                    Member { state, weight: b.weight, role, local, pool }
                })
                .collect();
            let traffic = previous.services.get(name).map(|s| s.traffic.clone()).unwrap_or_default();
            let svc = ServiceState::new(name, spec.clone(), members, settings, traffic);
            services.insert(name.clone(), Arc::new(svc));
        }
        let udp_timeout = reg.datapath.udp_timeout;
        let mut l4 = HashMap::new();
        for (name, spec) in reg.tcp.iter().filter(|(_, s)| s.mode == Mode::Proxy) {
            let states = spec
                .all_backends()
                .map(|(b, _)| {
                    let key = (name.clone(), b.identity());
                    let state = self.backend_state(&key);
                    backends.insert(key, state.clone());
                    state
                })
                .collect();
            let svc = Arc::new(l4::Service::new(name, spec.clone(), node, states, udp_timeout));
            l4.extend(l4::sockets(spec).into_iter().map(|k| (k, svc.clone())));
        }
        self.backends = backends;
        self.pools = pools;
        let table = || self.per_ip.get_or_insert_with(Arc::default).clone();
        let rate = ratelimit::Limiter::new(&reg.rate_limit, table, self.rate_counts.clone());
        let acl = acl::Acl::new(&reg.acl, self.acl_denied.clone());
        // A service's answers are kept while its policy is; backends changing do not matter.
        self.cache.retain_services(|name| {
            let policy = |s: &Arc<ServiceState>| s.spec.cache;
            let before = previous.services.get(name).and_then(policy);
            before.is_some() && before == reg.http.get(name).and_then(|s| s.cache)
        });
        self.cache.resize(reg.edge_cache.memory_bytes, reg.edge_cache.max_object_bytes);
        let cache = self.cache.clone();
        Ok(Snapshot { tables: routes::tables(reg), services, ports, rate, acl, cache, l4 })
    }

    /// Whether a certificate, key or CA file of `reg` changed since it was applied (the
    /// registry itself may be the same).
    #[must_use]
    pub fn tls_files_changed(&self, reg: &Registry) -> bool {
        stamps(reg) != self.tls_files
    }

    /// Takes backends that are down or drained out of new requests, and brings back the rest.
    pub fn set_overrides(&self, over: &Overrides) {
        for (key, b) in &self.backends {
            let usable = !over.down.contains_key(key) && !over.drained.contains(key);
            let was = b.usable.swap(usable, Ordering::Relaxed);
            if usable && !was {
                // Its health check passes again: what real traffic saw before is outdated.
                b.clear_passive();
            }
            // A drain keeps open connections; only a failed health check closes them.
            if was && !usable && over.down.contains_key(key) {
                b.marked_down.send_modify(|n| *n += 1);
            }
        }
    }

    /// What the edge saw of one backend of one service.
    #[must_use]
    pub fn stats(&self, service: &str, backend: &str) -> Option<crate::report::HttpStats> {
        let b = self.backends.get(&(service.to_owned(), backend.to_owned()))?;
        let ewma = b.ewma_ns.load(Ordering::Relaxed);
        let now = std::time::Instant::now();
        let has_breaker =
            self.shared.snapshot().services.get(service).is_some_and(|s| s.spec.circuit_breaker.is_some());
        Some(crate::report::HttpStats {
            requests: b.requests.load(Ordering::Relaxed),
            failures: b.failures.load(Ordering::Relaxed),
            in_flight: b.in_flight.load(Ordering::Relaxed),
            passive_out: b.passively_out(now),
            circuit: has_breaker.then(|| b.breaker.state(upstream::clock(now)).as_str()),
            circuit_opened: b.breaker.opened.load(Ordering::Relaxed),
            latency: (ewma > 0).then(|| std::time::Duration::from_nanos(ewma)),
        })
    }

    /// What a service answered, and how fast.
    #[must_use]
    pub fn traffic(&self, service: &str) -> Option<crate::report::HttpTraffic> {
        let snap = self.shared.snapshot();
        let t = &snap.services.get(service)?.traffic;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let cached = snap.services.get(service)?.spec.cache.is_some();
        Some(crate::report::HttpTraffic {
            classes: t.classes.each_ref().map(load),
            buckets: t.buckets.each_ref().map(load),
            sum: std::time::Duration::from_micros(load(&t.sum_us)),
            cache: cached.then(|| t.cache.each_ref().map(load)),
        })
    }

    /// The edge cache's memory and what it kept and dropped.
    #[must_use]
    pub fn cache(&self) -> crate::report::CacheReport {
        let u = self.cache.usage();
        let c = &self.cache.counts;
        crate::report::CacheReport {
            bytes: u.bytes as u64,
            entries: u.entries as u64,
            memory: u.memory as u64,
            stored: c.stored.load(Ordering::Relaxed),
            evicted: c.evicted.load(Ordering::Relaxed),
        }
    }

    /// Certificates served, by listener port.
    #[must_use]
    pub fn certificates(&self) -> Vec<(u16, CertInfo)> {
        let snap = self.shared.snapshot();
        snap.ports
            .iter()
            .flat_map(|(&p, port)| port.certificates.iter().map(move |c| (p, c.clone())))
            .collect()
    }

    /// Requests refused by rate limits since start: global, per client address, per route.
    #[must_use]
    pub fn rate_limited(&self) -> crate::report::RateLimited {
        let c = &self.rate_counts;
        crate::report::RateLimited {
            global: c.global.load(Ordering::Relaxed),
            per_ip: c.per_ip.load(Ordering::Relaxed),
            route: c.route.load(Ordering::Relaxed),
            acl: self.acl_denied.load(Ordering::Relaxed),
        }
    }

    /// Client connections open on each edge thread.
    #[must_use]
    pub fn connections(&self) -> Vec<u64> {
        self.workers.as_ref().map(|w| w.placement().open()).unwrap_or_default()
    }

    /// TLS handshakes that failed or timed out, since start.
    #[must_use]
    pub fn tls_failures(&self) -> u64 {
        self.shared.tls_failures.load(Ordering::Relaxed)
    }

    /// Addresses listened on.
    #[must_use]
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listeners.keys().copied().collect()
    }
}

/// A proxied service's socket, bound before it serves.
enum L4Socket {
    /// One per edge thread (`SO_REUSEPORT`).
    Tcp(Vec<std::net::TcpListener>),
    Udp(std::net::UdpSocket),
}

/// How a listener serves: loads its certificates (a failure fails the reload).
fn port(l: &crate::config::Listener) -> Result<Port, EdgeError> {
    let mut p = Port { limits: l.limits.clone(), h2c: l.h2c, passthrough: l.passthrough, ..Port::default() };
    let Some(spec) = &l.tls else { return Ok(p) };
    let fail = |source| EdgeError::Tls { port: l.port, source };
    let mut certs = Vec::with_capacity(spec.certificates.len());
    for c in &spec.certificates {
        let loaded = crate::tls::Certificate::load(&c.cert, &c.key, spec.ocsp_stapling).map_err(fail)?;
        p.certificates.push(CertInfo {
            name: c.name.clone().or_else(|| loaded.names.first().cloned()).unwrap_or_default(),
            names: loaded.names.clone(),
            file: c.cert.clone(),
            key: c.key.clone(),
            not_after: loaded.not_after,
        });
        certs.push(Arc::new(loaded));
    }
    p.tls = Some(Arc::new(crate::tls::server_config(spec, certs).map_err(fail)?));
    p.hsts = spec.hsts.header().and_then(|h| http::HeaderValue::from_str(&h).ok());
    Ok(p)
}

/// Certificates expiring within 30 days are warned about, within 7 an error (seed 001's
/// thresholds); on each reload and each day.
fn warn_expiring(snap: &Snapshot, now: std::time::SystemTime) {
    const DAY: i64 = 24 * 3600;
    let now =
        now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    for (port, p) in &snap.ports {
        for c in &p.certificates {
            let left = c.not_after - now;
            let days = left / DAY;
            if left <= 7 * DAY {
                tracing::error!(port, name = %c.name, file = %c.file.display(), days, "certificate expires within 7 days: rotate it (lb-ctl ssl update)");
            } else if left <= 30 * DAY {
                tracing::warn!(port, name = %c.name, file = %c.file.display(), days, "certificate expires within 30 days");
            }
        }
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        // Stops the edge threads.
        self.workers.take();
    }
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge").field("listeners", &self.listeners.keys()).finish_non_exhaustive()
    }
}
