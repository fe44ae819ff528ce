//! Project tasks: `cargo xtask setup | run | test | differential | bench`.
//!
//! Layout:
//! - `setup`: installs the toolchain parts and Debian packages the build and tests need (idempotent).
//! - `run`: the embedded demo, or `lbd` for real with the arguments after `--`.
//! - `test`: unit tests, the eBPF build and the privileged integration tests.
//! - `differential`: the kernel-versus-model differential test at its full count.
//! - `bench`: the benchmarks (release build), JSON reports under `target/bench/`.
//! - `cmd`: small helpers for running child processes with readable errors.

mod bench;
mod cmd;
mod run;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "lb project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need (idempotent; seconds on a ready machine).
    Setup,
    /// Run the demo topology, or `lbd` for real with the arguments after `--`.
    Run(run::Options),
    /// Run unit tests, the eBPF build and the privileged integration tests.
    Test(test::Options),
    /// Run the kernel-versus-model differential test on 1,000,000 frames (CI runs fewer).
    Differential(test::DifferentialOptions),
    /// Run benchmarks; each prints a table and writes target/bench/<name>.json.
    Bench(bench::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Setup => setup::run(&setup::Needs::all()),
        Task::Run(opts) => run::run(&opts),
        Task::Test(opts) => test::run(&opts),
        Task::Differential(opts) => test::differential(&opts),
        Task::Bench(opts) => bench::run(&opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
