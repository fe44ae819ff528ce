//! The testbed shared by the privileged integration tests, the benchmarks and the demo.
//!
//! Layout:
//! - [`netns`]: network namespaces: create, configure, run threads and processes inside.
//! - [`topology`]: the client / lb / backends L2 segment, set up for direct server return.
//! - [`routed`]: a dual-stack topology with backends on the lb's segment and behind a router,
//!   for every forwarding mode.
//! - [`servers`]: backend servers (HTTP, TCP and UDP echo) that record what they receive.
//! - [`clients`]: real TCP, UDP and HTTP clients, one bounded exchange each.
//! - [`http`]: keep-alive HTTP backends that count and can fail or stall, and an HTTP/1.1
//!   client, for the edge tests.
//! - [`lbd`]: the real lbd and lb-decap binaries in a namespace, started, reloaded and stopped
//!   on their readiness signals.
//! - [`capture`]: an `AF_PACKET` capture, to see which host sent a frame.
//! - [`frames`]: building, checking and mutating Ethernet/IP frames.
//! - [`bench`]: the benchmarks behind `cargo xtask bench`.
//! - [`scenario`]: a fixed data-plane scenario (every mode, both families) for model tests,
//!   the differential test and benchmarks.

#![expect(clippy::missing_panics_doc, reason = "test helpers panic with a message by design")]

pub mod bench;
pub mod capture;
pub mod clients;
pub mod frames;
pub mod http;
pub mod lbd;
pub mod netns;
pub mod pki;
pub mod process;
pub mod routed;
pub mod scenario;
pub mod servers;
pub mod topology;
pub mod ws;

/// True when this process may create network namespaces and load XDP programs.
///
/// Elsewhere a test without the privilege is skipped with a printed reason; under `CI=true`
/// the missing privilege fails the test instead.
///
/// # Panics
/// Under `CI=true` when the privileges are missing.
#[must_use]
pub fn privileged(test: &str) -> bool {
    // SAFETY: geteuid cannot fail.
    let reason = (unsafe { libc::geteuid() } != 0).then_some("not running as root");
    match reason {
        None => true,
        Some(r) if under_ci() => {
            panic!("{test}: needs root, network namespaces and XDP, and CI=true forbids skipping: {r}")
        }
        Some(r) => {
            eprintln!("SKIPPED {test}: {r} (run `cargo xtask test` as root)");
            false
        }
    }
}

/// Whether this runs under `CI=true`, where a missing privilege or tool fails a test instead of
/// skipping it.
#[must_use]
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// True when `tool` runs (`tool version_arg` succeeds). Elsewhere a test without it is skipped
/// with a printed reason; under `CI=true` the missing tool fails the test instead.
///
/// # Panics
/// Under `CI=true` when the tool is missing.
#[must_use]
pub fn installed(test: &str, tool: &str, version_arg: &str, package: &str) -> bool {
    let ok = std::process::Command::new(tool).arg(version_arg).output().is_ok_and(|o| o.status.success());
    if !ok {
        let why = format!("{tool} is not installed (`cargo xtask setup` installs Debian's {package})");
        assert!(!under_ci(), "{test}: {why}, and CI=true forbids skipping");
        eprintln!("SKIPPED {test}: {why}");
    }
    ok
}

/// A name prefix unique to this test process: `{tag}-{pid}`, after removing namespaces
/// that dead processes left behind under the same tag.
#[must_use]
pub fn unique_prefix(tag: &str) -> String {
    netns::remove_stale(tag);
    format!("{tag}-{}", std::process::id())
}
