//! `cargo xtask run`: the embedded demo, or `lbd` for real.

use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};

use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct Options {
    /// Arguments for lbd, e.g. `-- --config FILE --iface IFACE`. Without them the demo runs.
    #[arg(last = true)]
    lbd_args: Vec<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    let target = target_dir();
    if opts.lbd_args.is_empty() {
        setup::run(&setup::Needs::demo())?;
        cmd::run(cargo_build()?.args(["--bin", "lbd", "--bin", "lb-ctl", "--bin", "lb-demo"]))?;
        run_foreground(&mut Command::new(target.join("lb-demo")))
    } else {
        setup::run(&setup::Needs::lbd())?;
        cmd::run(cargo_build()?.args(["--bin", "lbd"]))?;
        run_foreground(Command::new(target.join("lbd")).args(&opts.lbd_args))
    }
}

fn cargo_build() -> Result<Command> {
    let mut c = cmd::cargo()?;
    c.args(["build", "--quiet"]);
    Ok(c)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| crate::test::workspace_root().join("target"), PathBuf::from)
        .join("debug")
}

extern "C" fn ignore_signal(_: libc::c_int) {}

/// Runs a long-lived child in the foreground. Ctrl-C reaches the whole process group; xtask
/// itself must outlive the child so the child can clean up, so it swallows SIGINT/SIGTERM
/// with a handler (not `SIG_IGN`, which the child would inherit across exec).
fn run_foreground(cmd: &mut Command) -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler is async-signal-safe (it does nothing).
        unsafe { libc::signal(sig, ignore_signal as *const () as libc::sighandler_t) };
    }
    let status = cmd.status()?;
    if !status.success() {
        bail!("`{}` exited with {status}", cmd::describe(cmd));
    }
    Ok(())
}
