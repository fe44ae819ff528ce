//! lbd: the lb daemon. See `lbd --help`.
//!
//! Exit status: 0 after a clean stop, 2 when the registry is invalid (the message names file,
//! line, column and field), 1 for any other failure.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use lb_userspace::{
    daemon::{self, DaemonError, OnExit},
    loader::AttachMode,
    logging::{self, LogFormat},
    pins,
};

#[derive(Parser)]
#[expect(clippy::struct_excessive_bools, reason = "command-line flags")]
#[command(
    version,
    about = "lb daemon: balances the registry's VIPs in XDP; file changes and SIGHUP reload the registry"
)]
struct Args {
    /// Service registry (YAML).
    #[arg(long, value_name = "FILE", required_unless_present = "unpin")]
    config: Option<PathBuf>,
    /// Interface that receives VIP traffic; the XDP program is attached here.
    #[arg(long, value_name = "IFACE")]
    iface: String,
    /// XDP attach mode: native (driver) hook, generic (skb) hook, or native with fallback.
    #[arg(long, value_enum, default_value_t)]
    xdp_mode: AttachMode,
    /// Log line format.
    #[arg(long, value_enum, default_value_t)]
    log_format: LogFormat,
    /// Bound on DNS and on ARP/NDP resolution of backends, e.g. `3s`, `500ms`.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    resolve_timeout: Duration,
    /// Flows tracked at once (about 100 bytes of kernel memory each).
    #[arg(long, default_value_t = lb_common::maps::DEFAULT_CONNTRACK_SIZE)]
    conntrack_size: u32,
    /// IPv4 source for dsr-ipip tunnels and nat (default: the interface's first address).
    #[arg(long)]
    source_v4: Option<std::net::Ipv4Addr>,
    /// IPv6 source for dsr-ipip tunnels and nat (default: the interface's first global address).
    #[arg(long)]
    source_v6: Option<std::net::Ipv6Addr>,
    /// Admin API address (`/lb-status`, `/metrics`, lb-ctl). Loopback unless
    /// `--admin-allow-public`: the API is unauthenticated.
    #[arg(long, default_value = "127.0.0.1:9180", env = "LB_ADMIN")]
    admin: std::net::SocketAddr,
    /// Allow a non-loopback `--admin` address.
    #[arg(long)]
    admin_allow_public: bool,
    /// This node's name, matched against backends' `node` (default: the registry's `node`).
    #[arg(long)]
    node: Option<String>,
    /// Do not reload when the registry's files change (SIGHUP and `lb-ctl config apply` still do).
    #[arg(long)]
    no_watch: bool,
    /// Where the balancer's maps and XDP link are pinned (bpffs), as `DIR/IFACE/v<layout>/`:
    /// a restarted or upgraded lbd adopts them without disturbing flows.
    #[arg(long, value_name = "DIR", default_value = pins::DEFAULT_ROOT)]
    pin_dir: PathBuf,
    /// Pin nothing: the program is detached on exit and a restart starts from empty maps.
    #[arg(long, conflicts_with = "on_exit")]
    no_pin: bool,
    /// On SIGTERM/SIGINT, keep the balancer forwarding for the next lbd to adopt, or detach it
    /// and remove the pinned state.
    #[arg(long, value_enum, default_value_t)]
    on_exit: OnExit,
    /// Load the XDP programs from this object (built from lb-ebpf with the same map layout)
    /// instead of the one built into lbd: upgrades the kernel program without a new lbd.
    #[arg(long, value_name = "FILE")]
    xdp_object: Option<PathBuf>,
    /// Leave the HTTP edge's threads free to move between CPUs. By default each is bound to a
    /// CPU of its own (of those lbd may use), so two busy ones never take turns on one CPU.
    #[arg(long)]
    no_edge_affinity: bool,
    /// Remove the pinned state of --iface (detaching its balancer) and exit.
    #[arg(long)]
    unpin: bool,
}

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    if args.unpin {
        return match pins::unpin(&args.pin_dir, &args.iface) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lbd: {}", logging::error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    let Some(config) = args.config else { return ExitCode::FAILURE };
    let opts = daemon::Options {
        config,
        iface: args.iface,
        xdp_mode: args.xdp_mode,
        resolve_timeout: args.resolve_timeout,
        conntrack_size: args.conntrack_size,
        source_v4: args.source_v4,
        source_v6: args.source_v6,
        admin: args.admin,
        admin_allow_public: args.admin_allow_public,
        node: args.node,
        watch: !args.no_watch,
        pin_dir: (!args.no_pin).then_some(args.pin_dir),
        on_exit: if args.no_pin { OnExit::Detach } else { args.on_exit },
        xdp_object: args.xdp_object,
        edge_affinity: !args.no_edge_affinity,
    };
    // One thread: lbd's work is a thousand small probes and rare reloads, and waking tasks
    // across worker threads cost more CPU than the probes themselves (measured with
    // `cargo xtask bench control`). Blocking netlink calls run on tokio's blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lbd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(DaemonError::Config(e)) => {
            eprintln!("lbd: invalid registry, nothing was changed:\n{e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("lbd: {}", logging::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
