//! lb-decap: runs on backends of `dsr-ipip` services. Attaches lb's XDP decapsulation program to
//! an interface, so IPIP / IP6IP6 packets from lb nodes reach the local stack unwrapped (no
//! tunnel device needed), until SIGTERM or SIGINT.
//!
//! Exit status: 0 after a clean stop, 1 for any failure.

use std::{net::IpAddr, process::ExitCode};

use clap::Parser;
use lb_userspace::{
    loader::{AttachMode, DecapProgram},
    logging::{self, LogFormat, error_chain},
    netlink, notify,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

#[derive(Parser)]
#[command(version, about = "unwraps lb's IPIP/IP6IP6 tunnels in XDP on a backend")]
struct Args {
    /// Interface tunnelled packets arrive on.
    #[arg(long, value_name = "IFACE")]
    iface: String,
    /// Addresses whose tunnelled packets are unwrapped (default: the interface's addresses).
    #[arg(long = "local", value_name = "ADDR")]
    local: Vec<IpAddr>,
    #[arg(long, value_enum, default_value_t)]
    xdp_mode: AttachMode,
    #[arg(long, value_enum, default_value_t)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let args = Args::parse();
    logging::init(args.log_format);
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lb-decap: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-decap: {}", error_chain(&*e));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let (mut term, mut int) = (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?);
    let local = if args.local.is_empty() {
        let iface = args.iface.clone();
        netlink::blocking(move |rtnl| {
            let link = rtnl.link(&iface)?;
            rtnl.addresses(link.index)
        })
        .await?
    } else {
        args.local
    };
    let _decap = DecapProgram::attach(&args.iface, args.xdp_mode, &local)?;
    let _ = notify::notify("READY=1");
    info!(iface = %args.iface, local = ?local, "lb-decap ready");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    info!("stopping; XDP decapsulation detached");
    Ok(())
}
