//! The HTTP edge: listeners declared in the registry, Host/path routing, and proxying to
//! backends with balancing, failover and retries.
//!
//! - `routes`: which service answers a request (pure).
//! - `balance`: picking among usable backends (pure).
//! - `upstream`: backend state (health, in flight, latency) and a service's tiers.
//! - `proxy`: one request: redirect, forward, retry, access log.
//! - `server`: accepting and serving connections under the listener's limits.
//!
//! The controller owns an [`Edge`] and hands it every registry that is applied, and every
//! change of health or drains. Requests read one immutable [`Snapshot`]; a reload swaps it
//! whole, so a request never sees half of one.

mod balance;
mod proxy;
mod routes;
mod server;
mod upstream;

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
};

use arc_swap::ArcSwap;
pub use routes::{RouteTable, tables};
use tokio::sync::watch;
use tracing::info;
use upstream::{BackendState, Member, ServiceState};

use crate::{
    config::{Limits, Registry, with_roles},
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
}

/// What requests read: routes, services and limits of one applied registry.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub tables: BTreeMap<u16, RouteTable>,
    pub services: HashMap<String, Arc<ServiceState>>,
    pub limits: BTreeMap<u16, Limits>,
}

/// Shared by the controller and every connection.
#[derive(Debug, Default)]
pub struct Shared {
    current: ArcSwap<Snapshot>,
    clients: Arc<server::Clients>,
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
    /// Its own worker threads: proxying wants every core, the controller one thread.
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
    listeners: HashMap<SocketAddr, watch::Sender<()>>,
    /// Backend state by (service, backend identity), kept across reloads.
    backends: HashMap<(String, String), Arc<BackendState>>,
}

impl Edge {
    #[must_use]
    pub fn new(node: Option<String>) -> Self {
        Self {
            node,
            runtime: None,
            shared: Arc::default(),
            listeners: HashMap::new(),
            backends: HashMap::new(),
        }
    }

    /// Serves `reg`: binds listeners it adds (failing, with nothing changed, when one cannot
    /// bind), swaps in its routes and services, then stops listeners it no longer has
    /// (their open connections finish).
    pub fn apply(&mut self, reg: &Registry, over: &Overrides) -> Result<(), EdgeError> {
        let wanted: BTreeMap<SocketAddr, u16> =
            reg.listeners.iter().map(|l| (SocketAddr::new(l.address, l.port), l.port)).collect();
        let mut fresh = Vec::new();
        for (&addr, &port) in wanted.iter().filter(|(a, _)| !self.listeners.contains_key(a)) {
            let bind = |addr| -> std::io::Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            };
            fresh.push((addr, port, bind(addr).map_err(|source| EdgeError::Bind { addr, source })?));
        }
        if !fresh.is_empty() && self.runtime.is_none() {
            let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("lb-edge")
                .enable_all()
                .build()
                .map_err(EdgeError::Runtime)?;
            self.runtime = Some(rt);
        }

        let node = self.node.clone().or_else(|| reg.node.clone());
        let snap = self.build(reg, node.as_deref());
        self.shared.current.store(Arc::new(snap));
        self.set_overrides(over);

        if let Some(rt) = &self.runtime {
            for (addr, port, l) in fresh {
                let _guard = rt.enter();
                let listener = tokio::net::TcpListener::from_std(l)
                    .map_err(|source| EdgeError::Bind { addr, source })?;
                let (tx, rx) = watch::channel(());
                rt.spawn(server::accept_loop(listener, port, self.shared.clone(), rx));
                info!(%addr, "HTTP listener started");
                self.listeners.insert(addr, tx);
            }
        }
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

    fn build(&mut self, reg: &Registry, node: Option<&str>) -> Snapshot {
        let previous = self.shared.snapshot();
        let mut backends = HashMap::new();
        let mut services = HashMap::new();
        for (name, spec) in &reg.http {
            let members: Vec<Member> = with_roles(&spec.backends, &spec.fallback)
                .map(|(b, role)| {
                    let key = (name.clone(), b.identity());
                    let state = self
                        .backends
                        .get(&key)
                        .cloned()
                        .unwrap_or_else(|| Arc::new(BackendState::new(name, &key.1)));
                    backends.insert(key, state.clone());
                    let local = node.is_some() && b.node.as_deref() == node;
                    Member { state, weight: b.weight, role, local }
                })
                .collect();
            // Idle connections survive a reload when the pool settings stay.
            let client = match previous.services.get(name) {
                Some(old)
                    if old.spec.pool == spec.pool && old.spec.timeouts.connect == spec.timeouts.connect =>
                {
                    old.client.clone()
                }
                _ => proxy::client(spec),
            };
            services.insert(name.clone(), Arc::new(ServiceState::new(name, spec.clone(), members, client)));
        }
        self.backends = backends;
        Snapshot {
            tables: routes::tables(reg),
            services,
            limits: reg.listeners.iter().map(|l| (l.port, l.limits.clone())).collect(),
        }
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
        }
    }

    /// What the edge saw of one backend of one service.
    #[must_use]
    pub fn stats(&self, service: &str, backend: &str) -> Option<crate::report::HttpStats> {
        let b = self.backends.get(&(service.to_owned(), backend.to_owned()))?;
        let ewma = b.ewma_ns.load(Ordering::Relaxed);
        Some(crate::report::HttpStats {
            requests: b.requests.load(Ordering::Relaxed),
            failures: b.failures.load(Ordering::Relaxed),
            in_flight: b.in_flight.load(Ordering::Relaxed),
            passive_out: b.passively_out(std::time::Instant::now()),
            latency: (ewma > 0).then(|| std::time::Duration::from_nanos(ewma)),
        })
    }

    /// Addresses listened on.
    #[must_use]
    pub fn listening(&self) -> Vec<SocketAddr> {
        self.listeners.keys().copied().collect()
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        // Dropped inside the controller's runtime, where blocking on the workers is not allowed.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for Edge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Edge").field("listeners", &self.listeners.keys()).finish_non_exhaustive()
    }
}
