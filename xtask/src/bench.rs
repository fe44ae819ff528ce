//! `cargo xtask bench [xdp|maglev|l4|http|policies|control|all]`: builds the release binaries and runs `lb-bench`,
//! which prints each benchmark's table and writes `target/bench/<name>.json`.

use std::process::Command;

use anyhow::Result;

use crate::{cmd, setup, test::workspace_root};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Which {
    /// XDP program time per packet, per path and mode, against `XDP_PASS` (`BPF_PROG_TEST_RUN`).
    Xdp,
    /// Maglev table build time, balance and disruption, against classic Maglev.
    Maglev,
    /// TCP connections/s and bulk throughput through lb, nftables DNAT and HAProxy.
    L4,
    /// Requests/s, latency and CPU per request through lb's HTTP edge, HAProxy and nginx.
    Http,
    /// Requests/s through the HTTP edge with every policy on (refusing nothing) against none.
    Policies,
    /// Reload latency, health-check CPU and lbd memory with 100 services.
    Control,
    /// All of them.
    All,
}

#[derive(clap::Args)]
pub struct Options {
    #[arg(value_enum, default_value = "all")]
    which: Which,
    /// Extra arguments for `lb-bench <which>`, e.g. `-- --runs 100000`.
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    let needs = match opts.which {
        Which::L4 => setup::Needs::bench_l4(),
        Which::Http | Which::Policies => setup::Needs::bench_http(),
        Which::All => setup::Needs::bench_all(),
        Which::Xdp | Which::Maglev => setup::Needs::lbd(),
        Which::Control => setup::Needs::demo(),
    };
    setup::run(&needs)?;
    // Timings of userspace code (Maglev builds, the load generator) need optimised binaries;
    // lb-bench starts lbd and lb-decap from the same directory.
    cmd::run(cmd::cargo()?.args(["build", "--release", "--bins"]))?;
    let names: &[&str] = match opts.which {
        Which::Xdp => &["xdp"],
        Which::Maglev => &["maglev"],
        Which::L4 => &["l4"],
        Which::Http => &["http"],
        Which::Control => &["control"],
        Which::Policies => &["policies"],
        Which::All => &["maglev", "xdp", "l4", "http", "policies", "control"],
    };
    let root = workspace_root();
    for name in names {
        let out = root.join("target/bench").join(format!("{name}.json"));
        cmd::run(
            Command::new(root.join("target/release/lb-bench"))
                .current_dir(&root)
                .arg(name)
                .arg("--out")
                .arg(&out)
                .args(&opts.args),
        )?;
    }
    Ok(())
}
