//! The demo behind `cargo xtask run`: a client, an lb node and three backends in network
//! namespaces, lbd balancing an embedded registry, and commands to paste. Ctrl-C stops lbd and
//! removes every namespace, process and file it made.

use std::process::ExitCode;

use anyhow::{Result, bail};
use clap::Parser;
use lb_tests::{
    lbd::{Lbd, TempDir, sibling_binary},
    servers::{Ports, Servers},
    topology::{DsrTopology, LB_IP, VIP, dsr_registry},
};
use tokio::signal::unix::{SignalKind, signal};

const BACKENDS: usize = 3;
const ECHO: u16 = 7;
const PORTS: Ports = Ports { http: 80, echo: &[ECHO] };
/// The line that ends the banner; tests wait for it.
const BANNER_END: &str = "Ctrl-C stops lbd and removes the namespaces.";

#[derive(Parser)]
#[command(about = "lb demo topology (run it through `cargo xtask run`)")]
struct Args {
    /// Prefix of the namespaces' names (tests run the demo under a prefix of their own).
    #[arg(long, default_value = "lbdemo", hide = true)]
    prefix: String,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and attaches XDP: run it as root");
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    // Subscribe before creating anything: a Ctrl-C during setup then still ends in cleanup.
    let (mut int, mut term) = {
        let _rt = rt.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    let lb_ctl = sibling_binary("lb-ctl");
    let prefix = args.prefix.as_str();

    eprintln!("lb-demo: building the topology (namespaces {prefix}-*)...");
    let topo = DsrTopology::new(prefix, BACKENDS);
    let servers: Vec<Servers> = (topo.backends.iter().enumerate())
        .map(|(i, b)| {
            Servers::start(&b.ns, &format!("backend-{} ({})", i + 1, b.ip), PORTS, &[b.ip.into(), VIP.into()])
        })
        .collect();
    let own = Servers::start(
        &topo.lb.ns,
        &format!("the lb node itself ({LB_IP}), not balanced"),
        PORTS,
        &[LB_IP.into()],
    );
    let dir = TempDir::new(&format!("demo-{prefix}"));
    let reg = dir.write("services.yaml", &dsr_registry(BACKENDS, PORTS.http, ECHO));
    let status = std::process::Command::new(&lb_ctl).args(["config", "validate"]).arg(&reg).status()?;
    if !status.success() {
        bail!("the embedded registry does not validate");
    }

    eprintln!("lb-demo: starting lbd on {prefix}-lb eth0...");
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    let client = topo.client.ns.name();
    let lb = topo.lb.ns.name();
    println!(
        "
lb is balancing {VIP} (ports {http}/tcp and {echo}/tcp+udp) over {BACKENDS} backends by XDP direct server return.
Paste these in another terminal (as root):

  # HTTP: each new connection is hashed to a backend
  for i in $(seq 12); do ip netns exec {client} curl -s http://{VIP}/; done

  # TCP and UDP echo through the VIP
  echo hello-tcp | ip netns exec {client} nc -N {VIP} {echo}
  echo hello-udp | ip netns exec {client} nc -u -w1 {VIP} {echo}

  # the lb node's own address is not balanced: its own server answers
  ip netns exec {client} curl -s http://{LB_IP}/

  # the program on the lb's interface ('xdp' = native mode) and the live lbd log
  ip -n {lb} link show dev eth0
  tail -f {log}

  # the registry lbd is serving, checked by the operator CLI
  {lb_ctl} config validate {reg}

{BANNER_END}",
        http = PORTS.http,
        echo = ECHO,
        log = dir.path().join("lbd.log").display(),
        lb_ctl = lb_ctl.display(),
        reg = reg.display(),
    );

    rt.block_on(async {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    });
    eprintln!("\nlb-demo: stopping lbd and cleaning up...");
    let stopped = lbd.stop(libc::SIGTERM);
    let summary: Vec<&str> =
        stopped.log.lines().filter(|l| l.contains("forwarded") || l.contains("counters")).collect();
    eprintln!("{}", summary.join("\n"));
    // Servers run on threads inside the namespaces: stop them before the namespaces go.
    drop((servers, own));
    drop(topo);
    eprintln!("lb-demo: done; no {prefix}-* namespace is left.");
    if !stopped.status.success() {
        bail!("lbd exited with {}", stopped.status);
    }
    Ok(())
}
