//! `cargo xtask bench l4`: TCP connections per second and bulk throughput from a client through
//! a balancer to three backends, in network namespaces on this machine, for lb in each mode and,
//! in the same run on the same topology, for no balancer (the client spreads connections over
//! the backends itself), an nftables DNAT balancer (`jhash` over the client's address and port,
//! plus masquerade) and HAProxy in TCP mode, both on the lb node.
//!
//! Every scenario uses the same three backends on the lb node's segment, so the paths differ
//! only by what the balancer does (DSR replies skip it; NAT, nftables and HAProxy replies pass
//! through it). Everything (client, router, balancer, backends) shares this machine's CPUs, so
//! the figures compare the balancers' cost rather than measure a network. lbd is stopped while
//! the baselines run, so they do not pay for the XDP program's pass-through. lb's `nat` services
//! use `nat_ports: 1024-65535` here: at the default 61000-65535, with the default 10 s
//! `tcp_closing_timeout`, a backend takes at most ~450 new NAT connections a second.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    process::{Child, Stdio},
    sync::atomic::{AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{median, round, table};
use crate::{
    lbd::{Decap, Lbd, TempDir},
    netns::{NetNs, sh},
    routed::{Node, RoutedTopology, VIP4},
    servers::{Ports, Servers},
    unique_prefix,
};

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Seconds per measurement.
    pub seconds: f64,
    /// Measurements per scenario; the median is reported.
    pub rounds: usize,
    /// Client threads opening connections.
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { seconds: 3.0, rounds: 3, threads: 8 }
    }
}

const BACKENDS: usize = 3;
/// Echo ports (one exchange per connection) and sink ports (bulk), per mode. DSR cannot
/// translate ports, so the DSR services' backends listen on the VIP's port.
const ECHO_L2: u16 = 7;
const ECHO_IPIP: u16 = 8;
const ECHO_NAT: u16 = 9;
const ECHO_BACKEND: u16 = 9009;
const SINK_L2: u16 = 5001;
const SINK_IPIP: u16 = 5002;
const SINK_NAT: u16 = 5003;
/// The baselines' VIP ports.
const NFT_ECHO: u16 = 10;
const NFT_SINK: u16 = 5010;
const HAPROXY_ECHO: u16 = 11;
const HAPROXY_SINK: u16 = 5011;
const BULK_CHUNK: usize = 64 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize, Clone)]
pub struct Scenario {
    pub name: &'static str,
    pub connections_per_s: f64,
    pub bulk_gbit_per_s: f64,
    /// Connections that failed (refused, reset, timed out) over all rounds.
    pub failed_connections: u64,
    pub connections_per_s_samples: Vec<f64>,
    pub bulk_gbit_per_s_samples: Vec<f64>,
}

#[derive(Serialize)]
pub struct Ratio {
    pub mode: &'static str,
    pub connections_vs_nftables: f64,
    pub connections_vs_haproxy: f64,
    pub bulk_vs_no_balancer: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub seconds_per_measurement: f64,
    pub rounds: usize,
    pub client_threads: usize,
    pub scenarios: Vec<Scenario>,
    pub ratios: Vec<Ratio>,
    pub targets: &'static str,
}

/// Where the client sends a scenario's connections and bulk stream.
struct Target {
    name: &'static str,
    echo: Vec<SocketAddr>,
    sink: Vec<SocketAddr>,
}

fn vip(port: u16) -> Vec<SocketAddr> {
    vec![SocketAddr::from((VIP4, port))]
}

/// Bulk sinks on every backend: read everything, answer the byte count (8 bytes, big endian).
struct Sinks {
    _threads: Vec<thread::JoinHandle<()>>,
}

fn start_sinks(nodes: &[Node]) -> Sinks {
    let threads = nodes
        .iter()
        .map(|n| {
            let (tx, rx) = std::sync::mpsc::channel();
            let t = n.ns.spawn("sink", move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                rt.block_on(async move {
                    let mut listeners = Vec::new();
                    for port in [SINK_L2, SINK_IPIP, SINK_NAT] {
                        match tokio::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, port)).await {
                            Ok(l) => listeners.push(l),
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    let _ = tx.send(Ok(()));
                    let mut tasks = tokio::task::JoinSet::new();
                    for l in listeners {
                        tasks.spawn(async move {
                            while let Ok((mut conn, _)) = l.accept().await {
                                tokio::spawn(async move {
                                    let mut buf = vec![0u8; BULK_CHUNK];
                                    let mut total = 0u64;
                                    while let Ok(n) = conn.read(&mut buf).await {
                                        if n == 0 {
                                            break;
                                        }
                                        total += n as u64;
                                    }
                                    let _ = conn.write_all(&total.to_be_bytes()).await;
                                });
                            }
                        });
                    }
                    while tasks.join_next().await.is_some() {}
                });
            });
            rx.recv().expect("sink thread").expect("bind sink ports");
            t
        })
        .collect();
    Sinks { _threads: threads }
}

/// Connections per second from `threads` client threads, each opening a connection to the
/// next of `targets`, exchanging one byte and closing, until `seconds` pass.
fn connections(client: &NetNs, targets: &[SocketAddr], threads: usize, seconds: f64) -> (f64, u64) {
    let (done, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    client.run(|| {
        thread::scope(|s| {
            for t in 0..threads {
                let (done, failed) = (&done, &failed);
                s.spawn(move || {
                    let mut i = t;
                    while Instant::now() < deadline {
                        let addr = targets[i % targets.len()];
                        i += 1;
                        if exchange(addr).is_ok() {
                            done.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
    });
    #[expect(clippy::cast_precision_loss, reason = "connection counts far below 2^52")]
    let rate = done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64();
    (rate, failed.load(Ordering::Relaxed))
}

fn exchange(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    s.write_all(b"x")?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b)?;
    Ok(())
}

/// Gbit/s of one TCP stream to `target`, sent for `seconds`; the sink's byte count must match.
fn bulk(client: &NetNs, target: SocketAddr, seconds: f64) -> Result<f64> {
    client.run(|| {
        let mut s =
            TcpStream::connect_timeout(&target, IO_TIMEOUT).with_context(|| format!("connect {target}"))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_write_timeout(Some(IO_TIMEOUT))?;
        let chunk = vec![0x5a_u8; BULK_CHUNK];
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed().as_secs_f64() < seconds {
            s.write_all(&chunk).with_context(|| format!("send to {target}"))?;
            sent += BULK_CHUNK as u64;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count).with_context(|| format!("byte count from {target}"))?;
        let elapsed = started.elapsed().as_secs_f64();
        ensure!(
            u64::from_be_bytes(count) == sent,
            "{target} received {} of {sent} bytes",
            u64::from_be_bytes(count)
        );
        #[expect(clippy::cast_precision_loss, reason = "byte counts far below 2^52")]
        Ok(sent as f64 * 8.0 / elapsed / 1e9)
    })
}

fn registry(topo: &RoutedTopology) -> String {
    let mut s = String::from("version: 1\ndatapath:\n  nat_ports: 1024-65535\ntcp:\n");
    let services: [(&str, &str, u16, u16); 6] = [
        ("l2-echo", "dsr-l2", ECHO_L2, ECHO_L2),
        ("l2-sink", "dsr-l2", SINK_L2, SINK_L2),
        ("ipip-echo", "dsr-ipip", ECHO_IPIP, ECHO_IPIP),
        ("ipip-sink", "dsr-ipip", SINK_IPIP, SINK_IPIP),
        ("nat-echo", "nat", ECHO_NAT, ECHO_BACKEND),
        ("nat-sink", "nat", SINK_NAT, SINK_NAT),
    ];
    for (name, mode, port, backend_port) in services {
        let _ = writeln!(s, "  {name}:\n    vip: {VIP4}\n    port: {port}\n    mode: {mode}\n    backends:");
        for n in &topo.l2_backends {
            let _ = writeln!(s, "      - {{host: {}, port: {backend_port}}}", n.v4);
        }
    }
    s
}

/// nftables on the lb node: DNAT by `jhash` of the client's address and port, then masquerade
/// so replies come back through the lb node (like lb's `nat` mode).
fn nftables_rules(backends: &[Ipv4Addr]) -> String {
    let map = |port: u16| {
        let items: Vec<String> =
            backends.iter().enumerate().map(|(i, b)| format!("{i} : {b} . {port}")).collect();
        items.join(", ")
    };
    format!(
        "table ip lbbench {{
  chain prerouting {{
    type nat hook prerouting priority dstnat;
    ip daddr {VIP4} tcp dport {NFT_ECHO} dnat ip to jhash ip saddr . tcp sport mod {n} map {{ {echo} }}
    ip daddr {VIP4} tcp dport {NFT_SINK} dnat ip to jhash ip saddr . tcp sport mod {n} map {{ {sink} }}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat;
    ct status dnat masquerade
  }}
}}
",
        n = backends.len(),
        echo = map(ECHO_BACKEND),
        sink = map(SINK_NAT),
    )
}

fn haproxy_config(backends: &[Ipv4Addr]) -> String {
    let servers = |port: u16| {
        let mut s = String::new();
        for (i, b) in backends.iter().enumerate() {
            let _ = writeln!(s, "  server b{i} {b}:{port}");
        }
        s
    };
    format!(
        "global
  # Within this machine's open-file limit (HAProxy needs two descriptors a connection).
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend echo
  bind {VIP4}:{HAPROXY_ECHO}
  default_backend echo
backend echo
  balance roundrobin
{echo}frontend sink
  bind {VIP4}:{HAPROXY_SINK}
  default_backend sink
backend sink
  balance roundrobin
{sink}",
        echo = servers(ECHO_BACKEND),
        sink = servers(SINK_NAT),
    )
}

/// HAProxy running in the lb namespace; killed on drop.
struct Haproxy(Child);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `addr` accepts connections from `client` (the baseline's listening socket is
/// its readiness signal).
fn wait_listening(client: &NetNs, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if client.run(|| exchange(addr)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{addr} not answering after {START_TIMEOUT:?}")
}

fn measure(topo: &RoutedTopology, t: &Target, opts: Options, out: &mut Scenario) -> Result<()> {
    let (rate, failed) = connections(&topo.client.ns, &t.echo, opts.threads, opts.seconds);
    eprintln!("l4 bench: {}: {rate:.0} connections/s ({failed} failed)", t.name);
    out.connections_per_s_samples.push(round(rate, 0));
    out.failed_connections += failed;
    let sink = t.sink[out.bulk_gbit_per_s_samples.len() % t.sink.len()];
    out.bulk_gbit_per_s_samples.push(round(bulk(&topo.client.ns, sink, opts.seconds)?, 3));
    Ok(())
}

/// Runs the benchmark; prints the table and returns the report.
#[expect(clippy::too_many_lines, reason = "one linear script: topology, baselines, rounds, report")]
pub fn run(opts: Options) -> Result<Report> {
    let topo = RoutedTopology::new(&unique_prefix("lbb-l4"), BACKENDS, 0);
    let dir = TempDir::new("bench-l4");
    let _servers: Vec<Servers> = (topo.l2_backends.iter())
        .map(|n| {
            Servers::start(
                &n.ns,
                "bench",
                Ports { http: 80, echo: &[ECHO_L2, ECHO_IPIP, ECHO_BACKEND] },
                &[n.v4.into(), IpAddr::from(VIP4)],
            )
        })
        .collect();
    let _sinks = start_sinks(&topo.l2_backends);
    let _decaps: Vec<Decap> = topo.l2_backends.iter().map(|n| Decap::start(&n.ns, &dir, "eth0")).collect();
    // Many short connections from one client: reuse its TIME_WAIT ports, use all of them.
    topo.client.ns.sysctl("net/ipv4/tcp_tw_reuse", "1");
    topo.client.ns.sysctl("net/ipv4/ip_local_port_range", "1024 65535");

    // Baselines on the lb node: kernel forwarding with nftables DNAT, and HAProxy on the VIP.
    let backends: Vec<Ipv4Addr> = topo.l2_backends.iter().map(|n| n.v4).collect();
    topo.lb.ns.sysctl("net/ipv4/ip_forward", "1");
    topo.lb.ns.sysctl("net/ipv4/conf/all/send_redirects", "0");
    topo.lb.ns.sysctl("net/ipv4/conf/eth0/send_redirects", "0");
    let nft = dir.write("rules.nft", &nftables_rules(&backends));
    sh(topo.lb.ns.command("nft").arg("-f").arg(&nft));
    topo.lb.ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"]);
    let cfg = dir.write("haproxy.cfg", &haproxy_config(&backends));
    let log = std::fs::File::create(dir.path().join("haproxy.log"))?;
    let _haproxy = Haproxy(
        topo.lb
            .ns
            .command("haproxy")
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start haproxy (cargo xtask bench installs it)")?,
    );
    wait_listening(&topo.client.ns, SocketAddr::from((VIP4, HAPROXY_ECHO))).with_context(|| {
        format!(
            "haproxy log:\n{}",
            std::fs::read_to_string(dir.path().join("haproxy.log")).unwrap_or_default()
        )
    })?;
    wait_listening(&topo.client.ns, SocketAddr::from((VIP4, NFT_ECHO)))?;

    let direct = |port: u16| backends.iter().map(|b| SocketAddr::from((*b, port))).collect::<Vec<_>>();
    let baselines = [
        Target { name: "no-balancer", echo: direct(ECHO_BACKEND), sink: direct(SINK_NAT) },
        Target { name: "nftables-dnat", echo: vip(NFT_ECHO), sink: vip(NFT_SINK) },
        Target { name: "haproxy-tcp", echo: vip(HAPROXY_ECHO), sink: vip(HAPROXY_SINK) },
    ];
    let lb_targets = [
        Target { name: "lb-dsr-l2", echo: vip(ECHO_L2), sink: vip(SINK_L2) },
        Target { name: "lb-dsr-ipip", echo: vip(ECHO_IPIP), sink: vip(SINK_IPIP) },
        Target { name: "lb-nat", echo: vip(ECHO_NAT), sink: vip(SINK_NAT) },
    ];
    let empty = |name| Scenario {
        name,
        connections_per_s: 0.0,
        bulk_gbit_per_s: 0.0,
        failed_connections: 0,
        connections_per_s_samples: Vec::new(),
        bulk_gbit_per_s_samples: Vec::new(),
    };
    let mut results: Vec<Scenario> = baselines.iter().chain(&lb_targets).map(|t| empty(t.name)).collect();
    let reg = dir.write("services.yaml", &registry(&topo));
    for round_no in 0..opts.rounds {
        eprintln!("l4 bench: round {}/{}", round_no + 1, opts.rounds);
        for (t, out) in baselines.iter().zip(&mut results[..3]) {
            measure(&topo, t, opts, out)?;
        }
        let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
        for (t, out) in lb_targets.iter().zip(&mut results[3..]) {
            measure(&topo, t, opts, out)?;
        }
        let stopped = lbd.stop(libc::SIGTERM);
        ensure!(stopped.status.success(), "lbd failed:\n{}", stopped.log);
    }
    for s in &mut results {
        s.connections_per_s = median(&mut s.connections_per_s_samples.clone());
        s.bulk_gbit_per_s = median(&mut s.bulk_gbit_per_s_samples.clone());
    }
    let get = |name: &str| results.iter().find(|s| s.name == name).expect("measured").clone();
    let (none, nft, haproxy) = (get("no-balancer"), get("nftables-dnat"), get("haproxy-tcp"));
    let ratios: Vec<Ratio> = ["lb-dsr-l2", "lb-dsr-ipip", "lb-nat"]
        .into_iter()
        .map(|name| {
            let s = get(name);
            Ratio {
                mode: name,
                connections_vs_nftables: round(s.connections_per_s / nft.connections_per_s, 2),
                connections_vs_haproxy: round(s.connections_per_s / haproxy.connections_per_s, 2),
                bulk_vs_no_balancer: round(s.bulk_gbit_per_s / none.bulk_gbit_per_s, 2),
            }
        })
        .collect();

    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|s| {
            vec![
                s.name.to_owned(),
                format!("{:.0}", s.connections_per_s),
                format!("{:.3}", s.bulk_gbit_per_s),
                s.failed_connections.to_string(),
            ]
        })
        .collect();
    println!(
        "\nTCP through a balancer, {} client threads, {}s per measurement, median of {} rounds\n{}",
        opts.threads,
        opts.seconds,
        opts.rounds,
        table(&["scenario", "conn/s", "bulk Gbit/s", "failed"], &rows)
    );
    let rows: Vec<Vec<String>> = ratios
        .iter()
        .map(|r| {
            vec![
                r.mode.to_owned(),
                format!("{:.2}", r.connections_vs_nftables),
                format!("{:.2}", r.connections_vs_haproxy),
                format!("{:.2}", r.bulk_vs_no_balancer),
            ]
        })
        .collect();
    println!("{}", table(&["lb mode", "conn/s vs nftables", "conn/s vs HAProxy", "bulk vs none"], &rows));
    Ok(Report {
        seconds_per_measurement: opts.seconds,
        rounds: opts.rounds,
        client_threads: opts.threads,
        scenarios: results,
        ratios,
        targets: "connections/s >= nftables and >= 2 x HAProxy; bulk >= 0.9 x no balancer",
    })
}
