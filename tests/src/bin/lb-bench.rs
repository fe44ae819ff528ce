//! The benchmarks behind `cargo xtask bench`: `lb-bench xdp|maglev|l4|http|policies|control --out FILE`. Each prints
//! a table and writes its figures as JSON. Run it through `cargo xtask bench`, which builds it
//! in release mode and installs what it needs.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb_tests::bench;

#[derive(Parser)]
#[command(about = "lb benchmarks (run them through `cargo xtask bench`)")]
struct Args {
    #[command(subcommand)]
    which: Which,
    /// Where to write the JSON report.
    #[arg(long, global = true)]
    out: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Which {
    /// XDP program time per packet, per path and mode, against `XDP_PASS`.
    Xdp {
        /// Calls per path.
        #[arg(long, default_value_t = bench::xdp::Options::default().runs)]
        runs: u32,
        /// Calls (distinct flows) for the new-flow paths.
        #[arg(long, default_value_t = bench::xdp::Options::default().new_flow_runs)]
        new_flow_runs: u32,
        /// Kernel repeat count for the baseline.
        #[arg(long, default_value_t = bench::xdp::Options::default().repeat)]
        repeat: u32,
    },
    /// Maglev table build time, balance and disruption, against classic Maglev.
    Maglev {
        #[arg(long, default_value_t = bench::maglev::Options::default().backends)]
        backends: usize,
    },
    /// TCP connections/s and bulk throughput through lb, nftables and HAProxy.
    L4 {
        /// Seconds per measurement.
        #[arg(long, default_value_t = bench::l4::Options::default().seconds)]
        seconds: f64,
        /// Measurements per scenario (the median is reported).
        #[arg(long, default_value_t = bench::l4::Options::default().rounds)]
        rounds: usize,
        /// Client threads opening connections.
        #[arg(long, default_value_t = bench::l4::Options::default().threads)]
        threads: usize,
    },
    /// Requests/s, latency and CPU per request through lb, HAProxy and nginx (HTTP, HTTPS, h2).
    Http {
        /// Seconds per measurement.
        #[arg(long, default_value_t = bench::http::Options::default().seconds)]
        seconds: u32,
        /// Rounds counted per protocol, each measuring every proxy (medians are reported).
        #[arg(long, default_value_t = bench::http::Options::default().rounds)]
        rounds: usize,
        /// Rounds run at most per protocol: rounds in which the hypervisor took CPU time
        /// (steal) are run again, and the quietest `rounds` count.
        #[arg(long, default_value_t = bench::http::Options::default().max_rounds)]
        max_rounds: usize,
        /// Client connections.
        #[arg(long, default_value_t = bench::http::Options::default().connections)]
        connections: u32,
        /// Only this protocol: http, https or h2 (all when absent).
        #[arg(long, value_parser = |s: &str| bench::http::protocol(s).ok_or("http, https or h2"))]
        protocol: Option<&'static str>,
    },
    /// Requests/s with rate limits, circuit breaker and ACLs on (refusing nothing) against none.
    Policies {
        #[arg(long, default_value_t = bench::policies::Options::default().seconds)]
        seconds: u32,
        #[arg(long, default_value_t = bench::policies::Options::default().rounds)]
        rounds: usize,
        #[arg(long, default_value_t = bench::policies::Options::default().connections)]
        connections: u32,
    },
    /// Reload latency, health-check CPU and lbd memory with 100 services of 10 backends.
    Control {
        #[arg(long, default_value_t = bench::control::Options::default().services)]
        services: usize,
        /// Seconds of idle CPU measured, with checks on and off.
        #[arg(long, default_value_t = bench::control::Options::default().cpu_seconds)]
        cpu_seconds: f64,
        #[arg(long, default_value_t = bench::control::Options::default().reload_rounds)]
        reload_rounds: usize,
    },
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let out =
        |name: &str| args.out.clone().unwrap_or_else(|| PathBuf::from(format!("target/bench/{name}.json")));
    match args.which {
        Which::Xdp { runs, new_flow_runs, repeat } => {
            let report = bench::xdp::run(bench::xdp::Options { runs, new_flow_runs, repeat })?;
            bench::write_json(&out("xdp"), &report)
        }
        Which::Maglev { backends } => {
            let report = bench::maglev::run(bench::maglev::Options { backends, ..Default::default() })?;
            bench::write_json(&out("maglev"), &report)
        }
        Which::L4 { seconds, rounds, threads } => {
            let report = bench::l4::run(bench::l4::Options { seconds, rounds, threads })?;
            bench::write_json(&out("l4"), &report)
        }
        Which::Http { seconds, rounds, max_rounds, connections, protocol } => {
            let report = bench::http::run(bench::http::Options {
                seconds,
                rounds,
                max_rounds,
                connections,
                protocol,
            })?;
            bench::write_json(&out("http"), &report)
        }
        Which::Policies { seconds, rounds, connections } => {
            let report = bench::policies::run(bench::policies::Options {
                seconds,
                rounds,
                max_rounds: rounds,
                connections,
                protocol: None,
            })?;
            bench::write_json(&out("policies"), &report)
        }
        Which::Control { services, cpu_seconds, reload_rounds } => {
            let o = bench::control::Options { services, cpu_seconds, reload_rounds, ..Default::default() };
            let report = bench::control::run(&o)?;
            bench::write_json(&out("control"), &report)
        }
    }
}
