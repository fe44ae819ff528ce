//! Child-process helpers whose errors name the command that failed.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// `cargo` in the workspace root, with `$CARGO_HOME/bin` first on `PATH` so the eBPF build
/// finds the bpf-linker that setup installed there, whatever the caller's `PATH`.
pub fn cargo() -> Result<Command> {
    let mut c = Command::new(env!("CARGO"));
    c.current_dir(crate::test::workspace_root()).env("PATH", path_with_cargo_bin()?);
    Ok(c)
}

/// The nightly toolchain's cargo (for `-Z build-std`), as aya-build runs it: through rustup,
/// with this cargo's toolchain overrides removed.
pub fn nightly_cargo() -> Result<Command> {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo"])
        .current_dir(crate::test::workspace_root())
        .env("PATH", path_with_cargo_bin()?)
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTUP_TOOLCHAIN");
    Ok(c)
}

fn path_with_cargo_bin() -> Result<std::ffi::OsString> {
    let mut path = std::ffi::OsString::from(crate::setup::cargo_home()?.join("bin"));
    if let Some(old) = std::env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    Ok(path)
}

/// Runs `cmd` with inherited stdio; fails unless it exits 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd.status().with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", describe(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; fails unless it exits 0.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out =
        cmd.stdin(Stdio::null()).output().with_context(|| format!("cannot start `{}`", describe(cmd)))?;
    if !out.status.success() {
        bail!("`{}` failed: {}\n{}", describe(cmd), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", describe(cmd)))
}

/// True when `cmd` can be started and exits 0 (output discarded).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}
