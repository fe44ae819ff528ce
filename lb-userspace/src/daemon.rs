//! lbd's life: registry -> plan -> maps, attach, serve (reloading on SIGHUP) until told to stop,
//! detach.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use crate::{
    admin::{self, Answer, Ask},
    config::{self, ConfigError},
    control::{Controller, Outcome},
    health::Checker,
    loader::{AttachMode, Balancer, LoaderError, XdpObject},
    logging::error_chain,
    maps::{DataplaneMaps, MapsError},
    netlink::{self, NetlinkError},
    notify,
    pins::{PinError, Pins},
    plan::{self, NodeFacts},
    report,
    resolve::{Resolver, RouteCache},
    watch::Watcher,
};

/// What lbd needs to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub iface: String,
    pub xdp_mode: AttachMode,
    /// Bound on each resolution stage (DNS, then ARP/NDP).
    pub resolve_timeout: Duration,
    /// Flows tracked at once.
    pub conntrack_size: u32,
    /// Source addresses for `dsr-ipip` and `nat`; default: the interface's first global ones.
    pub source_v4: Option<Ipv4Addr>,
    pub source_v6: Option<Ipv6Addr>,
    /// Where the admin API listens.
    pub admin: SocketAddr,
    /// Allow a non-loopback admin address.
    pub admin_allow_public: bool,
    /// This node's name (default: the registry's `node`).
    pub node: Option<String>,
    /// Reload when the registry's files change.
    pub watch: bool,
    /// Root of the pinned state in bpffs (`<root>/<iface>/v<layout>`); `None`: nothing is
    /// pinned, and a restart starts from empty maps.
    pub pin_dir: Option<PathBuf>,
    /// What a stop leaves behind.
    pub on_exit: OnExit,
    /// Load this XDP object instead of the built-in one.
    pub xdp_object: Option<PathBuf>,
    /// Bind each HTTP edge thread to a CPU of its own.
    pub edge_affinity: bool,
}

/// What lbd leaves on the interface when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum OnExit {
    /// The balancer keeps forwarding with its last plan (no health checks meanwhile), its
    /// maps and link pinned; the next lbd adopts them without disturbing a flow.
    #[default]
    Keep,
    /// The program is detached and the pinned state removed.
    Detach,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The registry is invalid; nothing was touched.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The interface to attach to is missing or unusable.
    #[error("interface `{iface}`")]
    Interface {
        iface: String,
        #[source]
        source: NetlinkError,
    },
    /// The routing or neighbour tables could not be read or asked.
    #[error("resolving backends")]
    Resolve(#[source] NetlinkError),
    /// Loading or attaching the XDP program failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// The pinned state cannot be used.
    #[error(transparent)]
    Pins(#[from] PinError),
    /// Writing or reading the data plane maps failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The stop and reload signals could not be subscribed to.
    #[error("installing signal handlers")]
    Signal(#[source] std::io::Error),
    /// The admin API could not listen.
    #[error("admin API on {addr}: {reason}")]
    Admin { addr: SocketAddr, reason: String },
    /// The registry file could not be replaced.
    #[error("{}: cannot write the registry", file.display())]
    Write {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The registry watcher could not start.
    #[error("watching the registry")]
    Watch(#[source] std::io::Error),
    /// A certificate or key given to `lb-ctl ssl update` is unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A request named something that does not exist.
    #[error("{0}")]
    Unknown(String),
    /// The HTTP edge could not serve the registry (a listener could not bind).
    #[error(transparent)]
    Edge(#[from] crate::edge::EdgeError),
}

/// SIGTERM, SIGINT and SIGHUP, subscribed before lbd reports ready so a signal that follows
/// readiness at once is never lost to its default action.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

enum Event {
    Stop,
    Reload,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.term.recv() => { info!("SIGTERM: shutting down"); Event::Stop }
            _ = self.int.recv() => { info!("SIGINT: shutting down"); Event::Stop }
            _ = self.hup.recv() => { info!("SIGHUP: reloading the registry"); Event::Reload }
        }
    }
}

fn notify_quietly(state: &str) {
    if let Err(e) = notify::notify(state) {
        warn!(error = %e, "cannot notify the supervisor (NOTIFY_SOCKET)");
    }
}

/// Runs lbd until SIGINT or SIGTERM. Nothing is attached if anything before the attach fails.
/// The interface lbd serves, and this node's MAC and source addresses on it.
async fn node_facts(opts: &Options) -> Result<(netlink::Link, NodeFacts), DaemonError> {
    let iface = opts.iface.clone();
    let interface = |source| DaemonError::Interface { iface: opts.iface.clone(), source };
    let (link, addrs) = netlink::blocking(move |rtnl| {
        let link = rtnl.link(&iface)?;
        Ok((link, rtnl.addresses(link.index)?))
    })
    .await
    .map_err(interface)?;
    let node = NodeFacts {
        mac: link.mac,
        addr_v4: opts
            .source_v4
            .or_else(|| addrs.iter().find_map(|a| if let IpAddr::V4(v) = a { Some(*v) } else { None })),
        addr_v6: opts
            .source_v6
            .or_else(|| addrs.iter().find_map(|a| if let IpAddr::V6(v) = a { Some(*v) } else { None })),
    };
    info!(iface = %opts.iface, source_v4 = ?node.addr_v4, source_v6 = ?node.addr_v6, "node facts");
    Ok((link, node))
}

pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let mut signals = Signals::install().map_err(DaemonError::Signal)?;
    let admin_error = |reason: String| DaemonError::Admin { addr: opts.admin, reason };
    admin::check_bind(opts.admin, opts.admin_allow_public).map_err(admin_error)?;
    let admin_listener = TcpListener::bind(opts.admin).await.map_err(|e| admin_error(e.to_string()))?;
    let loaded = config::load(&opts.config)?;
    let reg = &loaded.registry;
    info!(file = %opts.config.display(), files = loaded.files.len(), http = reg.http.len(), tcp = reg.tcp.len(), "registry loaded");

    let (link, node) = node_facts(&opts).await?;

    let (health_tx, mut health_rx) = mpsc::channel(HEALTH_QUEUE);
    let (watch_tx, mut watch_rx) = mpsc::channel(1);
    let (neigh_tx, mut neigh_rx) = mpsc::channel(1);
    let (admin_tx, mut admin_rx) = mpsc::channel(ADMIN_QUEUE);
    let watcher = if opts.watch {
        Some(Watcher::spawn(loaded.dirs.clone(), watch_tx).map_err(DaemonError::Watch)?)
    } else {
        None
    };
    let route_epoch = netlink::RouteEpoch::default();
    netlink::follow_changes(neigh_tx, route_epoch.clone()).map_err(DaemonError::Resolve)?;
    let resolver = Resolver::new(&opts.iface, link, opts.resolve_timeout, RouteCache::new(route_epoch));

    // Maps are filled before the program is attached (or swapped in behind an earlier lbd's
    // pinned link): the first packet it sees meets the whole plan.
    let pins = opts.pin_dir.as_deref().map(|root| Pins::open(root, &opts.iface)).transpose()?;
    let object = match &opts.xdp_object {
        Some(path) => XdpObject::read(path)?,
        None => XdpObject::Embedded,
    };
    let (mut balancer, maps, adopted) = Balancer::load_from(&object, opts.conntrack_size, pins)?;
    let started =
        match Controller::start(opts.clone(), resolver, node, maps, loaded, Checker::new(health_tx), adopted)
            .await
        {
            Ok(ctl) => balancer.attach(&opts.iface, opts.xdp_mode).map(|_| ctl).map_err(DaemonError::from),
            Err(e) => Err(e),
        };
    let mut ctl = match started {
        Ok(ctl) => ctl,
        Err(e) => {
            // State this lbd made and never served from is removed; adopted state stays for
            // the lbd that still serves from it.
            if !adopted && let Err(cleanup) = balancer.detach() {
                warn!(error = %error_chain(&cleanup), "cannot remove the pinned state of a failed start");
            }
            return Err(e);
        }
    };
    tokio::spawn(admin::serve(admin_listener, admin_tx));
    notify_quietly("READY=1\nSTATUS=serving");
    let plan = ctl.maps().applied().map(|p| (p.vips.len(), p.backends.len())).unwrap_or_default();
    info!(iface = %opts.iface, vips = plan.0, backends = plan.1, admin = %opts.admin, "lbd ready");

    let result = loop {
        let step = tokio::select! {
            event = signals.next() => match event {
                Event::Stop => break Ok(()),
                Event::Reload => reload(&mut ctl, "SIGHUP").await,
            },
            Some(()) = watch_rx.recv() => {
                // Writes often come in a burst (an editor, several included files).
                tokio::time::sleep(SETTLE).await;
                while watch_rx.try_recv().is_ok() {}
                reload(&mut ctl, "file change").await
            }
            Some(report) = health_rx.recv() => {
                // Results arrive in bursts (at start, when a host dies): one plan for the lot.
                let mut batch = vec![report];
                while let Ok(r) = health_rx.try_recv() {
                    batch.push(r);
                }
                ctl.on_reports(&batch)
            }
            Some(()) = neigh_rx.recv() => ctl.refresh_next_hops().await,
            Some(req) = admin_rx.recv() => answer(&mut ctl, req).await,
        };
        if let Some(w) = &watcher {
            w.set_dirs(ctl.loaded().dirs.clone());
        }
        match step {
            // Neither plan is in the maps: serving on from them would forward by accident.
            Err(DaemonError::Maps(e)) if e.is_inconsistent() => {
                notify_quietly("STOPPING=1\nSTATUS=data plane inconsistent");
                balancer.detach()?;
                return Err(DaemonError::Maps(e));
            }
            Err(e) => warn!(error = %error_chain(&e), "request failed"),
            Ok(_) => {}
        }
    };
    notify_quietly("STOPPING=1");
    log_traffic(ctl.maps())?;
    match opts.on_exit {
        OnExit::Keep => balancer.keep(),
        OnExit::Detach => balancer.detach()?,
    }
    result
}

/// A reload with the supervisor told before and after. Failures are recorded by the
/// controller; only an inconsistent data plane comes back as an error.
async fn reload(ctl: &mut Controller, cause: &str) -> Result<Outcome, DaemonError> {
    notify_quietly("RELOADING=1");
    let r = ctl.reload(cause).await;
    match &r {
        Err(DaemonError::Maps(e)) if e.is_inconsistent() => return r,
        Ok(_) => notify_quietly("READY=1\nSTATUS=reloaded"),
        Err(_) => notify_quietly("READY=1\nSTATUS=reload failed"),
    }
    Ok(r.unwrap_or(Outcome::Unchanged))
}

/// Answers one admin request.
async fn answer(ctl: &mut Controller, env: admin::Envelope) -> Result<Outcome, DaemonError> {
    let mut outcome = Ok(Outcome::Unchanged);
    let reply = match env.ask {
        Ask::Alive => Answer::text(200, "ok\n"),
        Ask::Ready => Answer::text(200, "ready\n"),
        Ask::Status => match ctl.snapshot() {
            Ok(s) => Answer::json(200, &report::status(&s)),
            Err(e) => Answer::error(500, &error_chain(&e)),
        },
        Ask::Metrics => match ctl.snapshot() {
            Ok(s) => Answer {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: report::metrics(&s),
            },
            Err(e) => Answer::error(500, &error_chain(&e)),
        },
        Ask::Lookup(q) => match ctl.lookup(&q) {
            Ok(v) => Answer::json(200, &v),
            Err(e @ DaemonError::Unknown(_)) => Answer::error(404, &e.to_string()),
            Err(e) => Answer::error(500, &error_chain(&e)),
        },
        Ask::Config => match std::fs::read_to_string(&ctl.loaded().files[0]) {
            Ok(text) => Answer { status: 200, content_type: "application/yaml", body: text },
            Err(e) => Answer::error(500, &e.to_string()),
        },
        Ask::Apply { text, validate_only } => {
            notify_quietly("RELOADING=1");
            let r = ctl.apply_text(&text, validate_only).await;
            notify_quietly("READY=1");
            let a = match &r {
                Ok(o) => Answer::json(
                    200,
                    &serde_json::json!({
                        "valid": true,
                        "applied": !validate_only,
                        "changed": *o == Outcome::Changed,
                        "generation": ctl.generation(),
                    }),
                ),
                Err(DaemonError::Config(e)) => Answer::json(
                    422,
                    &serde_json::json!({
                        "valid": false,
                        "error": e.to_string(),
                        "problems": e.problems().iter().map(ToString::to_string).collect::<Vec<_>>(),
                    }),
                ),
                Err(e) => Answer::error(500, &error_chain(e)),
            };
            if let Err(e) = r
                && matches!(&e, DaemonError::Maps(m) if m.is_inconsistent())
            {
                outcome = Err(e);
            }
            a
        }
        Ask::SslUpdate { name, cert, key } => match ctl.ssl_update(name.as_deref(), &cert, &key).await {
            Ok(v) => Answer::json(200, &v),
            Err(e @ DaemonError::Unknown(_)) => Answer::error(404, &e.to_string()),
            Err(e @ (DaemonError::Tls(_) | DaemonError::Config(_))) => Answer::error(422, &error_chain(&e)),
            Err(e) => {
                let a = Answer::error(500, &error_chain(&e));
                if matches!(&e, DaemonError::Maps(m) if m.is_inconsistent()) {
                    outcome = Err(e);
                }
                a
            }
        },
        Ask::Drain { service, backend, drained } => match ctl.set_drained(&service, &backend, drained) {
            Ok(o) => Answer::json(
                200,
                &serde_json::json!({ "service": service, "backend": backend, "drained": drained, "changed": o == Outcome::Changed }),
            ),
            Err(e @ DaemonError::Unknown(_)) => Answer::error(404, &e.to_string()),
            Err(e) => {
                let a = Answer::error(500, &error_chain(&e));
                outcome = Err(e);
                a
            }
        },
    };
    let _ = env.reply.send(reply);
    outcome
}

/// How long file events may keep arriving (one save, several files) before the reload.
const SETTLE: Duration = Duration::from_millis(5);
/// Health results waiting for the controller.
const HEALTH_QUEUE: usize = 4096;
/// Admin requests waiting for the controller.
const ADMIN_QUEUE: usize = 64;

fn log_traffic(maps: &DataplaneMaps) -> Result<(), MapsError> {
    if let Some(plan) = maps.applied() {
        for vip in &plan.vips {
            let s = maps.vip_stats(vip.info.id)?;
            info!(service = %vip.service, entry = %entry_name(vip), packets = s.packets, bytes = s.bytes, "forwarded");
        }
        for (service, backends) in &plan.services {
            for b in backends.iter().filter_map(|b| Some((b.identity.as_str(), b.id?))) {
                let s = maps.backend_stats(b.1)?;
                info!(%service, backend = b.0, packets = s.packets, bytes = s.bytes, "forwarded to backend");
            }
        }
    }
    let counters: Vec<String> =
        maps.counters()?.into_iter().map(|(c, n)| format!("{}={n}", c.name())).collect();
    info!(counters = %counters.join(" "), "data plane counters");
    Ok(())
}

fn entry_name(vip: &plan::VipPlan) -> String {
    let proto = if vip.key.proto == lb_common::maps::PROTO_UDP { "udp" } else { "tcp" };
    let ip = vip.key.ip();
    if ip.is_ipv6() {
        format!("[{ip}]:{}/{proto}", u16::from_be_bytes(vip.key.port))
    } else {
        format!("{ip}:{}/{proto}", u16::from_be_bytes(vip.key.port))
    }
}
