//! `cargo xtask test`: unit tests, the eBPF build and the privileged integration tests.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};

use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Extra arguments for `cargo test`, e.g. `-- --test l2_dsr`.
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

pub fn run(opts: &Options) -> Result<()> {
    setup::run(&setup::Needs::all())?;
    // The integration tests run the real lbd and lb-ctl binaries, so build them first.
    cmd::run(cmd::cargo()?.args(["build", "--bins"]))?;
    let upgrade = rebuilt_xdp_object(UPGRADE_REVISION)?;
    let mut cargo = cmd::cargo()?;
    cargo
        .args(["test", "--no-fail-fast"])
        .args(&opts.args)
        .env(UPGRADE_OBJECT_ENV, &upgrade)
        .stdout(Stdio::piped());
    eprintln!("xtask: $ {}", cmd::describe(&cargo));
    let mut child = cargo.spawn().context("cannot start cargo test")?;
    let stdout = child.stdout.take().context("cargo test stdout")?;
    let mut summary = Summary::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        summary.add(&line);
    }
    let status = child.wait()?;
    println!(
        "\nxtask test summary: {} suites, {} passed, {} failed, {} ignored",
        summary.suites, summary.passed, summary.failed, summary.ignored
    );
    if !status.success() || summary.failed > 0 {
        bail!("tests failed ({status})");
    }
    if summary.suites == 0 {
        bail!("no test suite ran");
    }
    Ok(())
}

/// The upgrade test swaps in a build of the XDP object stamped with this revision.
const UPGRADE_REVISION: u32 = 2;
/// Where the upgrade test finds that object.
const UPGRADE_OBJECT_ENV: &str = "LB_TEST_UPGRADE_XDP_OBJECT";

/// Builds the XDP object again with `LB_EBPF_REVISION=revision`, the way lb-userspace's build
/// script (aya-build) builds the embedded one, into its own target directory; returns its path.
/// Its instructions differ from the embedded object's, so `lbd --xdp-object` can upgrade to it.
fn rebuilt_xdp_object(revision: u32) -> Result<PathBuf> {
    let target_dir = workspace_root().join("target").join("ebpf-upgrade");
    let mut cargo = cmd::nightly_cargo()?;
    cargo
        .env("LB_EBPF_REVISION", revision.to_string())
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            ["--cfg=bpf_target_arch=\"x86_64\"", "-Cdebuginfo=2", "-Clink-arg=--btf"].join("\x1f"),
        )
        .args(["build", "--package", "lb-ebpf", "--bins", "--release", "-Z", "build-std=core"])
        .args(["--target", "bpfel-unknown-none", "--target-dir"])
        .arg(&target_dir);
    cmd::run(&mut cargo)?;
    Ok(target_dir.join("bpfel-unknown-none/release/lb-xdp"))
}

#[derive(clap::Args)]
pub struct DifferentialOptions {
    /// Frames to run through the kernel program and the model.
    #[arg(long, default_value_t = 1_000_000)]
    packets: u64,
    /// Seed of the frame sequence (the test's default when absent).
    #[arg(long)]
    seed: Option<u64>,
}

/// The differential test alone, at a count of our choosing (`cargo xtask test` runs it small).
pub fn differential(opts: &DifferentialOptions) -> Result<()> {
    setup::run(&setup::Needs::lbd())?;
    let mut cargo = cmd::cargo()?;
    cargo
        .args(["test", "-p", "lb-tests", "--test", "differential", "--", "--nocapture"])
        .env("LB_DIFF_PACKETS", opts.packets.to_string())
        // Asked for by name: without the privileges it must fail, not skip.
        .env("CI", "true");
    if let Some(seed) = opts.seed {
        cargo.env("LB_DIFF_SEED", seed.to_string());
    }
    cmd::run(&mut cargo)
}

#[derive(Default)]
struct Summary {
    suites: u32,
    passed: u32,
    failed: u32,
    ignored: u32,
}

impl Summary {
    /// Adds one `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        self.suites += 1;
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u32>() else { continue };
            match kind {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Summary;

    #[test]
    fn summary_adds_result_lines() {
        let mut s = Summary::default();
        s.add(
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
        );
        s.add("test result: FAILED. 1 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out");
        s.add("running 3 tests");
        assert_eq!((s.suites, s.passed, s.failed, s.ignored), (2, 4, 2, 1));
    }
}
