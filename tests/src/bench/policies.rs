//! `cargo xtask bench policies`: what lb's edge policies cost when they refuse nothing.
//!
//! One lbd proxies HTTP/1.1 (wrk, keep-alive) to an nginx backend. Each round measures the
//! same route twice, in alternating order: once with no policy, once with every policy that
//! applies to a request switched on (rate limits global, per client address and per route,
//! with limits far above the load and seed 001's whitelist; a circuit breaker; an ACL with
//! allow and deny lists and an `/admin/*` rule). A reload switches between the two. The
//! report has both medians and the overhead, `1 - with / without`; seed 001's table loses
//! half its throughput to rate limiting, the target here is at most 5 %.

use std::net::SocketAddr;

use anyhow::{Result, ensure};
use serde::Serialize;

/// The HTTP benchmark's: seconds per measurement, rounds, client connections.
pub use super::http::Options;
use super::{
    http::{BACKEND_PORT, cpu_seconds, load, start_backend, wait_listening},
    median, round, table,
};
use crate::{
    lbd::{Lbd, TempDir, metric},
    topology::{DsrTopology, backend_ip},
    unique_prefix,
};

#[derive(Serialize, Debug, Default, Clone)]
pub struct Figure {
    pub rps: f64,
    pub p99_ms: f64,
    pub cpu_s_per_1m_req: f64,
    pub errors: u64,
    pub rps_samples: Vec<f64>,
    #[serde(skip)]
    p99: Vec<f64>,
    #[serde(skip)]
    cpu: Vec<f64>,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub seconds: u32,
    pub rounds: usize,
    pub connections: u32,
    pub without_policies: Figure,
    pub with_policies: Figure,
    /// `1 - with / without` of the median req/s.
    pub rps_overhead: f64,
    /// Requests the policies refused during the run (must be 0: nothing is limited).
    pub refused: f64,
    pub target: &'static str,
}

const POLICIES: &str = "rate_limit:
  global: {rate: 10000000, burst: 1000000}
  per_ip: {rate: 10000000, burst: 1000000}
  whitelist: [172.16.0.0/12]
acl:
  allow: [10.0.0.0/8, 192.168.0.0/16]
  deny: [172.16.0.0/12]
  rules:
    - path: /admin/*
      allow: 10.0.0.0/8
";

fn registry(backend: &str, policies: bool) -> String {
    let (top, service) = if policies {
        (POLICIES, "    rate_limit: {rate: 10000000, burst: 1000000}\n    circuit_breaker: {}\n")
    } else {
        ("", "")
    };
    format!(
        "version: 1
listeners: [{{port: 8000}}]
{top}http:
  bench:
    hosts: ['*']
    backends: [{{host: {backend}, port: {BACKEND_PORT}}}]
    pool: {{max_connections: 64, max_idle: 64, max_requests: 100}}
{service}"
    )
}

/// Runs the benchmark; prints the table and returns the report.
pub fn run(opts: Options) -> Result<Report> {
    let topo = DsrTopology::new(&unique_prefix("lbb-pol"), 1);
    let dir = TempDir::new("bench-policies");
    let d = dir.path();
    let backend = backend_ip(0).to_string();
    let client = &topo.client.ns;
    let _backend = start_backend(&topo, &dir)?;
    let reg = dir.write("services.yaml", &registry(&backend, false));
    let lbd = Lbd::start_env(
        &topo.lb.ns,
        &dir,
        &reg,
        "eth0",
        &[],
        &[("RUST_LOG", "info,lb_userspace::access=off")],
    );
    let edge = SocketAddr::from((topo.lb.ip, 8000));
    wait_listening(client, edge)?;
    let refused = || {
        metric(&topo.lb.ns, "lb_http_acl_denied_total ")
            + ["global", "per_ip", "route"]
                .iter()
                .map(|l| metric(&topo.lb.ns, &format!("lb_http_rate_limited_total{{limit=\"{l}\"}} ")))
                .sum::<f64>()
    };
    let refused_before = refused();

    let (mut without, mut with) = (Figure::default(), Figure::default());
    let mut on = false;
    for round_no in 0..opts.rounds {
        // Alternate which goes first, so a drift of the machine's speed favours neither.
        let order = if round_no % 2 == 0 { [false, true] } else { [true, false] };
        for policies in order {
            if policies != on {
                dir.replace("services.yaml", &registry(&backend, policies));
                ensure!(lbd.wait_reload() == "reloaded", "reload failed:\n{}", lbd.log());
                on = policies;
            }
            let cpu0 = cpu_seconds(lbd.pid());
            let r = load(client, d, "http", edge, opts)?;
            let cpu = cpu_seconds(lbd.pid()) - cpu0;
            let name = if policies { "with policies" } else { "without" };
            eprintln!(
                "policies bench: round {} {name}: {:.0} req/s, p99 {:.2} ms",
                round_no + 1,
                r.rps,
                r.p99_ms
            );
            let f = if policies { &mut with } else { &mut without };
            f.rps_samples.push(round(r.rps, 0));
            f.p99.push(r.p99_ms);
            f.cpu.push(cpu / r.requests.max(1.0) * 1e6);
            f.errors += r.errors;
        }
    }
    for f in [&mut without, &mut with] {
        f.rps = median(&mut f.rps_samples.clone());
        f.p99_ms = round(median(&mut f.p99), 3);
        f.cpu_s_per_1m_req = round(median(&mut f.cpu), 2);
    }
    let refused = refused() - refused_before;
    let overhead = round(1.0 - with.rps / without.rps, 3);
    let rows: Vec<Vec<String>> = [("without", &without), ("with policies", &with)]
        .iter()
        .map(|(n, f)| {
            vec![
                (*n).to_owned(),
                format!("{:.0}", f.rps),
                format!("{:.2}", f.p99_ms),
                format!("{:.1}", f.cpu_s_per_1m_req),
                f.errors.to_string(),
            ]
        })
        .collect();
    println!("{}", table(&["route", "req/s", "p99 ms", "cpu s/1M req", "errors"], &rows));
    println!("overhead {:.1} % of req/s (target <= 5 %); requests refused: {refused}", overhead * 100.0);
    drop(lbd);
    Ok(Report {
        seconds: opts.seconds,
        rounds: opts.rounds,
        connections: opts.connections,
        without_policies: without,
        with_policies: with,
        rps_overhead: overhead,
        refused,
        target: "rps overhead <= 5 % with rate limiting, circuit breaking and ACLs on and nothing refused",
    })
}
