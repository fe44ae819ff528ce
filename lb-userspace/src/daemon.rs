//! lbd's life: registry -> plan -> maps, attach, serve (reloading on SIGHUP) until told to stop,
//! detach.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    config::{self, ConfigError, Registry},
    loader::{AttachMode, Balancer, LoaderError},
    logging::error_chain,
    maps::{DataplaneMaps, MapsError},
    netlink::{self, Link, NetlinkError},
    notify,
    plan::{self, DataPlan, Ids, NodeFacts},
    resolve,
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
    /// Writing or reading the data plane maps failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The stop and reload signals could not be subscribed to.
    #[error("installing signal handlers")]
    Signal(#[source] std::io::Error),
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
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let mut signals = Signals::install().map_err(DaemonError::Signal)?;
    let registry = config::load_file(&opts.config)?;
    info!(file = %opts.config.display(), http = registry.http.len(), tcp = registry.tcp.len(), "registry loaded");

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

    let plan = build_plan(&registry, &opts, link, &node, &Ids::default()).await?;
    // Maps are filled before the program is attached: the first packet sees the whole plan.
    let (mut balancer, mut maps) = Balancer::load(opts.conntrack_size)?;
    maps.apply(&plan)?;
    balancer.attach(&opts.iface, opts.xdp_mode)?;
    notify_quietly("READY=1\nSTATUS=serving");
    info!(iface = %opts.iface, vips = plan.vips.len(), backends = plan.backends.len(), "lbd ready");

    loop {
        if let Event::Stop = signals.next().await {
            break;
        }
        notify_quietly("RELOADING=1");
        match reload(&opts, link, &node, &mut maps).await {
            Ok(()) => notify_quietly("READY=1\nSTATUS=reloaded"),
            // Neither plan is in the maps: serving on from them would forward by accident.
            Err(DaemonError::Maps(e @ MapsError::Inconsistent { .. })) => {
                notify_quietly("STOPPING=1\nSTATUS=data plane inconsistent");
                balancer.detach()?;
                return Err(DaemonError::Maps(e));
            }
            Err(e) => {
                error!(error = %error_chain(&e), "reload failed; the previous registry keeps serving");
                notify_quietly("READY=1\nSTATUS=reload failed");
            }
        }
    }
    notify_quietly("STOPPING=1");
    log_traffic(&maps)?;
    balancer.detach()?;
    Ok(())
}

/// Reads the registry again and moves the maps to its plan, keeping ids and flow state.
async fn reload(
    opts: &Options,
    link: Link,
    node: &NodeFacts,
    maps: &mut DataplaneMaps,
) -> Result<(), DaemonError> {
    let registry = config::load_file(&opts.config)?;
    let prev = maps.applied().map(|p| p.ids.clone()).unwrap_or_default();
    let plan = build_plan(&registry, opts, link, node, &prev).await?;
    maps.apply(&plan)?;
    info!(vips = plan.vips.len(), backends = plan.backends.len(), "registry reloaded");
    Ok(())
}

async fn build_plan(
    reg: &Registry,
    opts: &Options,
    link: Link,
    node: &NodeFacts,
    prev: &Ids,
) -> Result<DataPlan, DaemonError> {
    let hosts = plan::xdp_backend_hosts(reg);
    let resolved = resolve::backends(&hosts, &opts.iface, link, opts.resolve_timeout)
        .await
        .map_err(DaemonError::Resolve)?;
    let (plan, skipped) = plan::plan(reg, node, &resolved, prev);
    for s in &skipped {
        info!(service = %s.service, reason = %s.reason, "service not in the XDP data plane");
    }
    log_plan(&plan);
    Ok(plan)
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

fn log_plan(plan: &DataPlan) {
    for (service, backends) in &plan.services {
        for b in backends {
            match &b.unusable {
                None => {
                    info!(%service, backend = %b.identity, id = ?b.id, weight = b.weight, "backend planned");
                }
                Some(reason) => warn!(%service, backend = %b.identity, %reason, "backend takes no new flows"),
            }
        }
        if backends.iter().all(|b| b.weight == 0) {
            warn!(%service, "no backend can take new flows: the service's new connections are dropped");
        }
    }
    for vip in &plan.vips {
        info!(service = %vip.service, entry = %entry_name(vip), mode = vip.info.mode, "VIP planned");
    }
}

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
