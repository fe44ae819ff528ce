//! lbd's life: registry -> plan -> maps, attach, serve until told to stop, detach.

use std::{path::PathBuf, time::Duration};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::{self, ConfigError},
    loader::{AttachMode, Balancer, LoaderError},
    maps::MapsError,
    netlink::{self, NetlinkError},
    notify,
    plan::{self, DataPlan, VipPlan},
    resolve,
};

/// What lbd needs to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub iface: String,
    pub xdp_mode: AttachMode,
    /// Bound on each resolution stage (DNS, then ARP) at startup.
    pub resolve_timeout: Duration,
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
    /// The neighbour table could not be read or asked.
    #[error("resolving backends")]
    Resolve(#[source] NetlinkError),
    /// Loading or attaching the XDP program failed.
    #[error(transparent)]
    Loader(#[from] LoaderError),
    /// Writing or reading the data plane maps failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The stop signals could not be subscribed to.
    #[error("installing signal handlers")]
    Signal(#[source] std::io::Error),
}

/// SIGTERM and SIGINT, subscribed before lbd reports ready so a stop request that follows
/// readiness at once is never lost to the default action.
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    fn install() -> std::io::Result<Self> {
        Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM: shutting down"),
            _ = self.int.recv() => info!("SIGINT: shutting down"),
        }
    }
}

/// Runs lbd until SIGINT or SIGTERM. Nothing is attached if anything before the attach fails.
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let mut stop = StopSignals::install().map_err(DaemonError::Signal)?;
    let registry = config::load_file(&opts.config)?;
    info!(file = %opts.config.display(), http = registry.http.len(), tcp = registry.tcp.len(), "registry loaded");

    let iface = opts.iface.clone();
    let link = netlink::blocking(move |rtnl| rtnl.link(&iface))
        .await
        .map_err(|source| DaemonError::Interface { iface: opts.iface.clone(), source })?;

    let hosts = plan::xdp_backend_hosts(&registry);
    let resolved = resolve::backends(&hosts, &opts.iface, link, opts.resolve_timeout)
        .await
        .map_err(DaemonError::Resolve)?;
    let (plan, skipped) = plan::plan(&registry, link.mac, &resolved);
    for s in &skipped {
        match &s.backend {
            Some(b) => {
                warn!(service = %s.service, backend = %b, reason = %s.reason, "backend left out");
            }
            None => {
                info!(service = %s.service, reason = %s.reason, "service not in the XDP data plane");
            }
        }
    }
    log_plan(&plan);

    // Maps are filled before the program is attached: the first packet sees the whole plan.
    let (mut balancer, mut maps) = Balancer::load()?;
    maps.apply(&plan)?;
    balancer.attach(&opts.iface, opts.xdp_mode)?;
    if let Err(e) = notify::notify("READY=1") {
        warn!(error = %e, "cannot notify the supervisor (NOTIFY_SOCKET)");
    }
    info!(iface = %opts.iface, vips = plan.vips.len(), backends = plan.backends.len(), "lbd ready");

    stop.wait().await;
    let _ = notify::notify("STOPPING=1");
    for vip in &plan.vips {
        let s = maps.vip_stats(vip.info.id)?;
        info!(service = %vip.service, entry = %entry_name(vip), packets = s.packets, bytes = s.bytes, "forwarded");
    }
    let counters: Vec<String> =
        maps.counters()?.into_iter().map(|(c, n)| format!("{}={n}", c.name())).collect();
    info!(counters = %counters.join(" "), "data plane counters");
    balancer.detach()?;
    Ok(())
}

/// `10.0.0.1:80/tcp`.
fn entry_name(vip: &VipPlan) -> String {
    let proto = if vip.key.proto == lb_common::maps::PROTO_UDP { "udp" } else { "tcp" };
    format!("{}:{}/{proto}", vip.key.ip(), u16::from_be_bytes(vip.key.port))
}

fn log_plan(plan: &DataPlan) {
    for vip in &plan.vips {
        let backends: Vec<String> = (vip.backend_ids.iter())
            .filter_map(|&id| plan.backends.get(id as usize))
            .map(|b| b.ip().to_string())
            .collect();
        info!(service = %vip.service, entry = %entry_name(vip), backends = %backends.join(","), "VIP planned");
        if backends.is_empty() {
            warn!(service = %vip.service, entry = %entry_name(vip), "VIP has no usable backend: its packets are dropped");
        }
    }
}
