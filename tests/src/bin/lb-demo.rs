//! The demo behind `cargo xtask run`: a client behind a router, an lb node, three backends on
//! the lb's segment and three more one router hop away, all in network namespaces; lbd balancing
//! an embedded registry in every forwarding mode over IPv4 and IPv6, and its HTTP edge over
//! HTTP/1.1 and HTTPS; a first round of traffic through each, and commands to paste for more.
//! Ctrl-C stops lbd and removes every namespace, process and file it made.

use std::{
    collections::BTreeMap, fmt::Write as _, net::SocketAddr, path::Path, process::ExitCode, time::Duration,
};

use anyhow::{Result, bail};
use clap::Parser;
use lb_tests::{
    clients::{IO_TIMEOUT, try_tcp_exchange, try_udp_exchange},
    http::{Client, Reply},
    lbd::{Decap, Lbd, TempDir, sibling_binary},
    netns::NetNs,
    pki::Pki,
    routed::{Node, RoutedTopology, VIP4, VIP6},
    servers::{Ports, Servers},
};
use tokio::signal::unix::{SignalKind, signal};

const BACKENDS: usize = 3;
const ECHO: u16 = 7;
/// The HTTP edge's listeners on the lb node.
const EDGE: u16 = 8000;
const EDGE_TLS: u16 = 8443;
/// Connections (or requests) a service gets in the first round.
const ROUND: usize = 12;
/// A step of the first round that gets no answer in this long failed (each step stops at its
/// first failure): the test clients' bound.
const STEP_TIMEOUT: Duration = IO_TIMEOUT;
const PORTS: Ports = Ports { http: 80, echo: &[ECHO] };
/// The line that ends the banner; tests wait for it.
const BANNER_END: &str = "Ctrl-C stops lbd and removes the namespaces.";

/// The embedded registry: one service per mode, an IPv6 VIP among them.
fn registry(topo: &RoutedTopology) -> String {
    let list = |nodes: &[Node], v6: bool, port: u16| {
        let mut s = String::new();
        for n in nodes {
            let _ = writeln!(s, "      - {{host: \"{}\", port: {port}}}", n.addr(v6));
        }
        s
    };
    format!(
        "\
# The lb demo: one VIP in three forwarding modes, an IPv6 VIP, and the HTTP edge.
version: 1
listeners:
  - port: {EDGE}
  - port: {EDGE_TLS}  # TLS terminated here, HTTP/2 or HTTP/1.1 by ALPN
    tls: {{certificates: [{{cert: app.pem, key: app.key}}]}}
http:
  app.example:        # served by lbd's HTTP edge on :{EDGE} and :{EDGE_TLS}, proxied to r1-r3
    balance: least-conn
    backends:
{edge}  www.app.example:
    redirect: {{strip_www: true}}
tcp:
  web:                # HTTP by direct server return to backends on lb's own segment
    vip: {VIP4}
    port: 80
    mode: dsr-l2
    backends:
{l2}  web-nat:            # HTTP by full NAT to backends behind a router: nothing runs on them
    vip: {VIP4}
    port: 8080
    mode: nat
    backends:
{nat}  echo:               # TCP and UDP echo through IPIP tunnels, unwrapped by lb-decap
    vip: {VIP4}
    port: {ECHO}
    mode: dsr-ipip
    protocols: [tcp, udp]
    backends:
{ipip}  web6:               # HTTP on an IPv6 VIP through IP6IP6 tunnels
    vip: \"{VIP6}\"
    port: 80
    mode: dsr-ipip
    backends:
{ipip6}",
        l2 = list(&topo.l2_backends, false, 80),
        nat = list(&topo.routed_backends, false, 80),
        ipip = list(&topo.routed_backends, false, ECHO),
        ipip6 = list(&topo.routed_backends, true, 80),
        edge = list(&topo.routed_backends, false, 80),
    )
}

/// The first round of traffic: each step's description, and what came back or why it failed.
fn first_round(topo: &RoutedTopology, ca: &Path) -> Vec<(String, Result<String, String>)> {
    let client = &topo.client.ns;
    let edge = SocketAddr::from((topo.lb.v4, EDGE));
    let mut steps = Vec::new();
    for (name, addr) in [
        ("web", SocketAddr::from((VIP4, 80))),
        ("web-nat", SocketAddr::from((VIP4, 8080))),
        ("web6", SocketAddr::from((VIP6, 80))),
    ] {
        let what = format!("{name:<8} {ROUND} connections to {addr}");
        let host = addr.to_string();
        steps.push((
            what,
            client.run(|| spread((0..ROUND).map(|_| connect(addr)?.request("GET", &host, "/", "", "")))),
        ));
    }
    steps.push((format!("echo     TCP and UDP to {VIP4}:{ECHO}"), client.run(echo)));
    steps.push((
        format!("edge     {ROUND} requests on one connection to :{EDGE}"),
        client.run(|| {
            let mut c = connect(edge).map_err(|e| e.to_string())?;
            spread((0..ROUND).map(|_| c.request("GET", "app.example", "/", "", "")))
        }),
    ));
    steps.push((format!("         https://app.example:{EDGE_TLS}/ (TLS at lb)"), https(client, topo, ca)));
    steps.push((
        format!("         http://www.app.example:{EDGE}/docs"),
        client.run(|| {
            let r = connect(edge)
                .and_then(|mut c| c.request("GET", "www.app.example", "/docs", "", ""))
                .map_err(|e| e.to_string())?;
            match r.header("location") {
                Some(to) if r.status == 301 => Ok(format!("301 to {to}")),
                _ => Err(format!("status {}, location {:?}", r.status, r.header("location"))),
            }
        }),
    ));
    steps
}

/// Prints each step of the first round and what came back, failures loudly.
fn print_first_round(steps: &[(String, Result<String, String>)], log: &Path) {
    for (what, result) in steps {
        match result {
            Ok(got) => println!("  {what:<50} -> {got}"),
            Err(why) => println!("  {what:<50} -> FAILED: {why}"),
        }
    }
    let failed = steps.iter().filter(|(_, r)| r.is_err()).count();
    if failed > 0 {
        println!("{failed} of {} steps FAILED: lbd's log is {}", steps.len(), log.display());
    }
}

/// A connection to `addr` whose answers must come within `STEP_TIMEOUT`.
fn connect(addr: SocketAddr) -> std::io::Result<Client> {
    let mut c = Client::connect(addr)?;
    c.reader_mut().get_ref().set_read_timeout(Some(STEP_TIMEOUT))?;
    Ok(c)
}

/// Which backends answered a run of requests: `l1 4, l2 5, l3 3`.
fn spread(replies: impl Iterator<Item = std::io::Result<Reply>>) -> Result<String, String> {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for r in replies {
        let r = r.map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!("status {}", r.status));
        }
        // "backend l1 (10.20.0.21)"
        let who = r.body.split_whitespace().nth(1).unwrap_or("?").to_owned();
        *by.entry(who).or_default() += 1;
    }
    Ok(by.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "))
}

/// A line each way over TCP and UDP through the IPIP tunnels.
fn echo() -> Result<String, String> {
    let vip = SocketAddr::from((VIP4, ECHO));
    let tcp = try_tcp_exchange(vip, b"hello-tcp", true).map_err(|e| format!("TCP: {e}"))?;
    if tcp != b"hello-tcp" {
        return Err(format!("TCP: {:?} came back", String::from_utf8_lossy(&tcp)));
    }
    let udp = try_udp_exchange(vip, b"hello-udp").map_err(|e| format!("UDP: {e}"))?;
    if udp != b"hello-udp" {
        return Err(format!("UDP: {:?} came back", String::from_utf8_lossy(&udp)));
    }
    Ok("'hello-tcp' and 'hello-udp' came back".to_owned())
}

/// A request over TLS to the edge with curl, checking lb's certificate against the demo's CA.
fn https(client: &NetNs, topo: &RoutedTopology, ca: &Path) -> Result<String, String> {
    let out = client
        .command("curl")
        .args(["-sS", "--http2", "-w", "\n%{http_code} %{http_version}", "--cacert"])
        .arg(ca)
        .arg("--resolve")
        .arg(format!("app.example:{EDGE_TLS}:{}", topo.lb.v4))
        .arg(format!("https://app.example:{EDGE_TLS}/"))
        .arg("-m")
        .arg(STEP_TIMEOUT.as_secs().to_string())
        .output()
        .map_err(|e| format!("curl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("curl: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    // "backend r1 (10.21.0.11)\n200 2"
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (code, version) = status.split_once(' ').unwrap_or((status, "?"));
    match body.strip_prefix("backend ").and_then(|b| b.split_whitespace().next()) {
        Some(who) if code == "200" => Ok(format!("{who}, over HTTP/{version}")),
        _ => Err(format!("status {code}: {}", body.trim())),
    }
}

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
    let topo = RoutedTopology::new(prefix, BACKENDS, BACKENDS);
    let start = |n: &Node, name: &str| {
        let label = format!("backend {name} ({})", n.v4);
        Servers::start(&n.ns, &label, PORTS, &[n.v4.into(), VIP4.into()])
    };
    let mut servers: Vec<Servers> =
        topo.l2_backends.iter().enumerate().map(|(i, n)| start(n, &format!("l{}", i + 1))).collect();
    servers.extend(topo.routed_backends.iter().enumerate().map(|(i, n)| start(n, &format!("r{}", i + 1))));
    let own = Servers::start(
        &topo.lb.ns,
        &format!("the lb node itself ({}), not balanced", topo.lb.v4),
        PORTS,
        &[topo.lb.v4.into()],
    );
    let dir = TempDir::new(&format!("demo-{prefix}"));
    let decaps: Vec<Decap> = topo.routed_backends.iter().map(|n| Decap::start(&n.ns, &dir, "eth0")).collect();
    // The edge's certificate for app.example, from a CA of the demo's own: `app.pem` and
    // `app.key`, which the registry names.
    let pki = Pki::new(dir.path());
    let _ = pki.server("app", &["app.example", "www.app.example"], 30);
    let reg = dir.write("services.yaml", &registry(&topo));
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
lb is balancing {VIP4} and {VIP6} in XDP on {lb} (client -> router -> lb -> backends):
  web      {VIP4}:80        dsr-l2    -> l1-l3, on lb's segment, answering the client directly
  web-nat  {VIP4}:8080      nat       -> r1-r3:80, a router away, answering through lb
  echo     {VIP4}:{ECHO} tcp+udp dsr-ipip  -> r1-r3, through IPIP tunnels they unwrap with lb-decap
  web6     [{VIP6}]:80      dsr-ipip  -> r1-r3, through IP6IP6 tunnels
and serves app.example on its HTTP edge at {lb_ip}:{EDGE} and, over TLS, :{EDGE_TLS} (proxied to
r1-r3, least connections).

A first round from the client, just now:",
        lb_ip = topo.lb.v4,
    );
    let ca = pki.ca();
    print_first_round(&first_round(&topo, &ca), &dir.path().join("lbd.log"));
    println!(
        "
Paste these in another terminal (as root) for more:

  # each new connection is hashed to a backend (weighted Maglev) and tracked
  for i in $(seq 12); do ip netns exec {client} curl -s http://{VIP4}/; done
  for i in $(seq 12); do ip netns exec {client} curl -s http://{VIP4}:8080/; done
  for i in $(seq 12); do ip netns exec {client} curl -s -g http://[{VIP6}]/; done

  # TCP and UDP echo through the tunnels
  echo hello-tcp | ip netns exec {client} nc -N {VIP4} {ECHO}
  echo hello-udp | ip netns exec {client} nc -u -w1 {VIP4} {ECHO}

  # the HTTP edge: Host routing, keep-alive pools, retries; www. redirected to the bare name
  for i in $(seq 6); do ip netns exec {client} curl -s -H 'Host: app.example' http://{lb_ip}:{EDGE}/; done
  ip netns exec {client} curl -sI -H 'Host: www.app.example' http://{lb_ip}:{EDGE}/docs
  ip netns exec {client} curl -s --http2 --cacert {ca} --resolve app.example:{EDGE_TLS}:{lb_ip} https://app.example:{EDGE_TLS}/

  # the lb node's own address is not balanced: its own server answers
  ip netns exec {client} curl -s http://{lb_ip}/

  # edit the registry (weight: 0 drains a backend; add one), then reload without dropping a flow
  {lb_ctl} config validate {reg} && kill -HUP {pid}

  # the program on the lb's interface ('xdp' = native mode) and the live lbd log
  ip -n {lb} link show dev eth0
  tail -f {log}

{BANNER_END}",
        lb_ip = topo.lb.v4,
        log = dir.path().join("lbd.log").display(),
        lb_ctl = lb_ctl.display(),
        reg = reg.display(),
        pid = lbd.pid(),
        ca = ca.display(),
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
    drop((servers, own, decaps));
    drop(topo);
    eprintln!("lb-demo: done; no {prefix}-* namespace is left.");
    if !stopped.status.success() {
        bail!("lbd exited with {}", stopped.status);
    }
    Ok(())
}
