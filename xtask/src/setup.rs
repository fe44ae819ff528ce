//! `cargo xtask setup`: everything the build and the tests need, installed idempotently.
//!
//! Each step first checks whether its work is already done, so a second run on a ready machine
//! changes nothing and takes seconds.

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::cmd;

/// Debian packages the demo uses: `ip` for namespaces, `ethtool` to turn checksum offload off
/// on veth senders, `nc` and `curl` for the commands it prints (curl also for its HTTPS
/// request), `openssl` for its edge's certificate.
const DEMO_PACKAGES: &[&str] = &["iproute2", "ethtool", "netcat-openbsd", "curl", "openssl"];
/// What the tests need beyond the demo's packages (they run the demo too): `vagrant`, to
/// validate the Vagrantfile; Debian's Python with `jsonschema` and `yaml`, to check
/// `lb-ctl schema` against registries the way an editor does; `wrk` to load the edge while
/// certificates change; `nginx` as a backend that checks the edge's client certificate,
/// speaks HTTP/2 and reads the PROXY protocol; `prometheus` for `promtool`, which checks and
/// unit-tests the alert rules; `chromium`, headless, to render the status page;
/// `redis-server`, a primary and a replica the L4 proxy follows through failover. The demo's
/// `openssl` also makes the tests' certificates and is their TLS client and server.
const TEST_ONLY_PACKAGES: &[&str] = &[
    "vagrant",
    "python3-jsonschema",
    "python3-yaml",
    "wrk",
    "nginx",
    "prometheus",
    "chromium",
    "redis-server",
];
/// The L4 benchmark's baselines: an nftables DNAT balancer and HAProxy in TCP mode.
const BENCH_L4_PACKAGES: &[&str] = &["nftables", "haproxy"];
/// The HTTP benchmark's baselines (HAProxy, nginx, with nginx as the backend too), its
/// clients (wrk, h2load) and tcpdump for its wire round (its certificate comes from the demo's
/// `openssl`).
const BENCH_HTTP_PACKAGES: &[&str] = &["haproxy", "nginx", "wrk", "nghttp2-client", "tcpdump"];

/// bpf-linker release known to build against the nightly toolchain's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Which Debian packages a task needs. The eBPF toolchain and bpffs are always set up: every
/// task builds or runs lbd.
pub struct Needs {
    pub packages: Vec<&'static str>,
}

impl Needs {
    pub fn all() -> Self {
        Self { packages: [DEMO_PACKAGES, TEST_ONLY_PACKAGES].concat() }
    }

    pub fn demo() -> Self {
        Self { packages: DEMO_PACKAGES.to_vec() }
    }

    /// Running lbd on a real interface needs no Debian package.
    pub fn lbd() -> Self {
        Self { packages: Vec::new() }
    }

    /// The L4 benchmark: the demo's tools and the baselines it compares against.
    pub fn bench_l4() -> Self {
        Self { packages: [DEMO_PACKAGES, BENCH_L4_PACKAGES].concat() }
    }

    /// The HTTP benchmark.
    pub fn bench_http() -> Self {
        Self { packages: [DEMO_PACKAGES, BENCH_HTTP_PACKAGES].concat() }
    }

    /// Every benchmark.
    pub fn bench_all() -> Self {
        let mut packages = [DEMO_PACKAGES, BENCH_L4_PACKAGES, BENCH_HTTP_PACKAGES].concat();
        packages.sort_unstable();
        packages.dedup();
        Self { packages }
    }
}

pub fn run(needs: &Needs) -> Result<()> {
    apt_packages(&needs.packages)?;
    nightly_rust_src()?;
    bpf_linker()?;
    mount_bpffs()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn apt_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_ok_and(|s| s.trim() == "install ok installed")
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "Debian packages missing: {}; run `cargo xtask setup` as root (the tests need root too)",
            missing.join(" ")
        );
    }
    cmd::run(Command::new("apt-get").args(["-q", "update"]))?;
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-q", "-y", "install", "--no-install-recommends"])
            .args(&missing),
    )
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = cmd::output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ]))?;
        return Ok(());
    }
    let installed = cmd::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        cmd::run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    Ok(())
}

pub fn cargo_home() -> Result<PathBuf> {
    if let Some(home) = env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home));
    }
    let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo"))
}

/// Builds bpf-linker against the nightly toolchain's own libLLVM, so the LLVM that emits the
/// eBPF bitcode and the one that links it are the same (no system LLVM of that version exists).
fn bpf_linker() -> Result<()> {
    let sysroot =
        PathBuf::from(cmd::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim());
    let version = cmd::output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm_major = llvm_major(&version)
        .with_context(|| format!("no `LLVM version:` line in `rustc +nightly -vV`:\n{version}"))?;
    let libllvm = find_libllvm(&sysroot.join("lib"))?;
    let libllvm_name = libllvm.file_name().context("libLLVM path has no file name")?;

    let home = cargo_home()?;
    let linker = home.join("bin").join("bpf-linker");
    let state = home.join("lb-toolchain");
    let stamp = state.join("bpf-linker.stamp");
    let wanted = format!("bpf-linker {BPF_LINKER_VERSION} llvm {}\n", libllvm.display());
    let built_for_this_llvm = fs::read_to_string(&stamp).is_ok_and(|s| s == wanted);
    if built_for_this_llvm && cmd::succeeds(Command::new(&linker).arg("--version")) {
        return Ok(());
    }

    // bpf-linker's build script wants an LLVM prefix with lib/libLLVM.so; the binary's rpath
    // then points at the same directory, where the soname it asks for must also resolve.
    let prefix = state.join(format!("llvm-{llvm_major}"));
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;
    for name in [Path::new("libLLVM.so"), Path::new(libllvm_name)] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("cannot link {} -> {}", link.display(), libllvm.display()))?;
    }
    cmd::run(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "bpf-linker", "--locked", "--force", "--no-default-features"])
            .args(["--version", BPF_LINKER_VERSION])
            .args(["--features", &format!("llvm-{llvm_major}")])
            .arg("--root")
            .arg(&home),
    )?;
    if !cmd::succeeds(Command::new(&linker).arg("--version")) {
        bail!("{} was built but does not start", linker.display());
    }
    fs::write(&stamp, wanted).with_context(|| format!("cannot write {}", stamp.display()))
}

fn llvm_major(rustc_version: &str) -> Option<u32> {
    rustc_version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
}

fn find_libllvm(dir: &Path) -> Result<PathBuf> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name.starts_with("libLLVM") && name.contains(".so") {
            return Ok(path);
        }
    }
    bail!("no libLLVM*.so* in {}; is the nightly toolchain complete?", dir.display())
}

fn mount_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(1) == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    }) {
        return Ok(());
    }
    if !is_root() {
        bail!("bpffs is not mounted at /sys/fs/bpf; run `cargo xtask setup` as root");
    }
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

#[cfg(test)]
mod tests {
    use super::llvm_major;

    #[test]
    fn llvm_major_is_read_from_rustc_version() {
        let v = "rustc 1.97.0-nightly\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(v), Some(22));
        assert_eq!(llvm_major("rustc 1.0\n"), None);
    }
}
