//! The demo behind `cargo xtask run`: a client, an lb node and three backends in network
//! namespaces, lbd balancing an embedded registry, and commands to paste. Ctrl-C stops lbd and
//! removes every namespace, process and file it made.

use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use lb_tests::{
    lbd::{Lbd, TempDir},
    servers::{Ports, Servers},
    topology::{DsrTopology, LB_IP, VIP, dsr_registry},
};

const PREFIX: &str = "lbdemo";
const BACKENDS: usize = 3;
const PORTS: Ports = Ports { http: 80, echo: 7 };

/// Runs lbd and lb-ctl from the directory this program was built in.
#[derive(Parser)]
#[command(about = "lb demo topology (run through `cargo xtask run`)")]
struct Args {}

fn main() -> ExitCode {
    Args::parse();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo creates network namespaces and attaches XDP: run it as root");
    }
    let lb_ctl = lb_tests::lbd::sibling_binary("lb-ctl");

    eprintln!("lb-demo: building the topology (namespaces {PREFIX}-*)...");
    let topo = DsrTopology::new(PREFIX, BACKENDS);
    let _servers: Vec<Servers> = topo
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| {
            Servers::start(
                &b.ns,
                &format!("backend-{} ({})", i + 1, b.ip),
                PORTS,
                &[b.ip, VIP],
            )
        })
        .collect();
    let _own = Servers::start(
        &topo.lb.ns,
        &format!("lb node itself ({LB_IP}), not balanced"),
        PORTS,
        &[LB_IP],
    );
    let dir = TempDir::new("demo");
    let reg = dir.write(
        "services.yaml",
        &dsr_registry(BACKENDS, PORTS.http, PORTS.echo),
    );
    let status = std::process::Command::new(&lb_ctl)
        .args(["config", "validate"])
        .arg(&reg)
        .status()?;
    if !status.success() {
        bail!("the embedded registry does not validate");
    }

    eprintln!("lb-demo: starting lbd on {PREFIX}-lb eth0...");
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    let client = topo.client.ns.name();
    let lb = topo.lb.ns.name();
    println!(
        "
lb is balancing {VIP} (ports {http}/tcp and {echo}/tcp+udp) over {BACKENDS} backends by XDP direct server return.
Paste these in another terminal (as root):

  # HTTP: each new connection is hashed to a backend; run it a few times
  for i in 1 2 3 4 5 6; do ip netns exec {client} curl -s http://{VIP}/; done

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

Ctrl-C stops lbd and removes the namespaces.",
        http = PORTS.http,
        echo = PORTS.echo,
        log = dir.path().join("lbd.log").display(),
        lb_ctl = lb_ctl.display(),
        reg = reg.display(),
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })
    .context("waiting for Ctrl-C")?;

    eprintln!("\nlb-demo: stopping lbd and cleaning up...");
    let stopped = lbd.stop();
    eprintln!(
        "{}",
        stopped
            .log
            .lines()
            .filter(|l| l.contains("forwarded") || l.contains("counters"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(topo);
    eprintln!("lb-demo: done; no {PREFIX}-* namespace is left.");
    if !stopped.status.success() {
        bail!("lbd exited with {}", stopped.status);
    }
    Ok(())
}
