//! lbd's life: registry -> plan -> maps, attach, serve until told to stop, detach.

use std::{path::PathBuf, time::Duration};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{
    config::{self, ConfigError},
    loader::{AttachMode, Balancer, LoaderError},
    maps::MapsError,
    netlink::{NetlinkError, Rtnl},
    notify,
    plan::{self, DataPlan},
    resolve,
};

/// What lbd needs to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub iface: String,
    pub xdp_mode: AttachMode,
    /// Bound on each resolution stage (DNS, then ARP/NDP) at startup.
    pub resolve_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("interface `{iface}`: {source}")]
    Interface {
        iface: String,
        #[source]
        source: NetlinkError,
    },
    #[error("resolving backends: {0}")]
    Resolve(#[source] NetlinkError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Maps(#[from] MapsError),
    #[error("signal handling: {0}")]
    Signal(#[source] std::io::Error),
}

/// Runs lbd until SIGINT or SIGTERM. Nothing is attached if anything before the attach fails.
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    let registry = config::load_file(&opts.config)?;
    info!(file = %opts.config.display(), http = registry.http.len(), tcp = registry.tcp.len(), "registry loaded");

    let iface = opts.iface.clone();
    let link = tokio::task::spawn_blocking(move || Rtnl::open()?.link(&iface))
        .await
        .map_err(|e| NetlinkError::Io(std::io::Error::other(e)))
        .and_then(|r| r)
        .map_err(|source| DaemonError::Interface {
            iface: opts.iface.clone(),
            source,
        })?;

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

    wait_for_stop().await.map_err(DaemonError::Signal)?;
    let _ = notify::notify("STOPPING=1");
    for vip in &plan.vips {
        let s = maps.vip_stats(vip.info.id)?;
        info!(service = %vip.service, entry = %entry_name(vip), packets = s.packets, bytes = s.bytes, "forwarded");
    }
    let counters: Vec<String> = maps
        .counters()?
        .into_iter()
        .map(|(c, n)| format!("{}={n}", c.name()))
        .collect();
    info!(counters = %counters.join(" "), "data plane counters");
    balancer.detach()?;
    Ok(())
}

async fn wait_for_stop() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    Ok(())
}

fn entry_name(vip: &plan::VipPlan) -> String {
    let addr = std::net::Ipv4Addr::new(
        vip.key.addr[0],
        vip.key.addr[1],
        vip.key.addr[2],
        vip.key.addr[3],
    );
    let proto = if vip.key.proto == lb_common::maps::PROTO_UDP {
        "udp"
    } else {
        "tcp"
    };
    format!("{addr}:{}/{proto}", u16::from_be_bytes(vip.key.port))
}

fn log_plan(plan: &DataPlan) {
    for vip in &plan.vips {
        let backends: Vec<String> = vip
            .backend_ids
            .iter()
            .filter_map(|&id| plan.backends.get(id as usize))
            .map(|b| {
                std::net::Ipv4Addr::new(b.addr[0], b.addr[1], b.addr[2], b.addr[3]).to_string()
            })
            .collect();
        info!(service = %vip.service, entry = %entry_name(vip), backends = %backends.join(","), "VIP planned");
        if backends.is_empty() {
            warn!(service = %vip.service, entry = %entry_name(vip), "VIP has no usable backend: its packets are dropped");
        }
    }
}
