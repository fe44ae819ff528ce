//! Network namespaces: create, configure with `ip`, run code and processes inside, delete.

use std::{
    fs::File,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::PathBuf,
    process::{Command, Stdio},
    thread,
};

/// A named network namespace (`/run/netns/NAME`), deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates the namespace (replacing a leftover of the same name) with `lo` up.
    ///
    /// # Panics
    /// When `ip netns add` fails.
    #[must_use]
    pub fn new(name: &str) -> Self {
        let _ = Command::new("ip").args(["netns", "del", name]).stderr(Stdio::null()).status();
        sh(Command::new("ip").args(["netns", "add", name]));
        let ns = Self { name: name.to_owned() };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS...`.
    ///
    /// # Panics
    /// When the command fails.
    pub fn ip(&self, args: &[&str]) {
        sh(Command::new("ip").args(["-n", &self.name]).args(args));
    }

    /// Output of `ip -n NAME ARGS...`.
    ///
    /// # Panics
    /// When the command fails.
    #[must_use]
    pub fn ip_output(&self, args: &[&str]) -> String {
        let out = Command::new("ip").args(["-n", &self.name]).args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A command that runs inside this namespace. Only the network namespace is entered
    /// (unlike `ip netns exec`, /sys stays the host's, so bpffs pins keep working).
    #[must_use]
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let file = self.open();
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; `file` outlives the fork because the closure
        // owns it.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `f` on a thread inside this namespace and returns its result; sockets `f` creates
    /// belong to the namespace.
    ///
    /// # Panics
    /// When `f` panics (the panic is resumed here).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = self.open();
        thread::scope(|s| {
            s.spawn(move || {
                enter(&file);
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Starts `f` on a named background thread inside this namespace.
    #[must_use]
    pub fn spawn<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> thread::JoinHandle<T> {
        let file = self.open();
        thread::Builder::new()
            .name(format!("{}:{what}", self.name))
            .spawn(move || {
                enter(&file);
                f()
            })
            .expect("spawn thread")
    }

    /// Writes a sysctl of this namespace, e.g. `net/ipv4/conf/all/arp_ignore`.
    pub fn sysctl(&self, key: &str, value: &str) {
        let path = format!("/proc/sys/{key}");
        self.run(|| std::fs::write(&path, value).unwrap_or_else(|e| panic!("write {path}: {e}")));
    }

    fn open(&self) -> File {
        File::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.path().display()))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

fn enter(file: &File) {
    // SAFETY: a valid namespace fd; affects only the calling thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// Runs a setup command; panics with its stderr when it fails.
///
/// # Panics
/// When the command cannot start or exits non-zero.
pub fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
}

/// Deletes namespaces named `{prefix}-{pid}-...` left by test processes that no longer run
/// (a killed run cannot clean up after itself).
pub fn remove_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(prefix).and_then(|r| r.strip_prefix('-')) else {
            continue;
        };
        let pid: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if let Some(pid) = pid
            && !PathBuf::from(format!("/proc/{pid}")).exists()
        {
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}
