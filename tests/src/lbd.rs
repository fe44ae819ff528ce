//! Running lb's daemons (`lbd`, `lb-decap`) inside a namespace, synchronised on their
//! readiness signals (`READY=1`, and `RELOADING=1` then `READY=1` for a reload).

use std::{
    fs,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant, SystemTime},
};

use crate::netns::NetNs;

/// How long a daemon may take from start to `READY=1` (loading, ARP, attaching), or from
/// SIGHUP to the `READY=1` that ends the reload.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a daemon may take to exit after a stop signal, or to give up on a refused start.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a readiness wait also checks whether the daemon exited instead.
const NOTIFY_POLL: Duration = Duration::from_millis(200);

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// # Panics
    /// When the directory cannot be created.
    #[must_use]
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("lb-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        Self(p)
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The bpffs directory lbd pins its state under for this test (`--pin-dir`), removed
    /// with this directory: pins outlive processes, so each test keeps its own.
    #[must_use]
    pub fn pin_dir(&self) -> PathBuf {
        Path::new("/sys/fs/bpf").join(self.0.file_name().expect("temp dir name"))
    }

    /// Writes `contents` to `name` in this directory and returns its path.
    ///
    /// # Panics
    /// When the file cannot be written.
    #[must_use]
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// Replaces `name` the way a deploy tool does: the new text goes to a hidden file (which
    /// lbd's watcher ignores, so no reload starts on the half-step) renamed over `name`.
    ///
    /// # Panics
    /// When the file cannot be written or renamed.
    pub fn replace(&self, name: &str, contents: &str) {
        let tmp = self.write(&format!(".{name}.new"), contents);
        let to = self.0.join(name);
        fs::rename(&tmp, &to).unwrap_or_else(|e| panic!("rename into {}: {e}", to.display()));
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
        // Removing the pins also detaches a balancer a test left attached.
        let _ = fs::remove_dir_all(self.pin_dir());
    }
}

/// Crates whose sources go into the lbd and lb-ctl binaries.
const BINARY_SOURCES: [&str; 3] = ["lb-userspace", "lb-common", "lb-ebpf"];

/// Path of a binary of this workspace built next to the running executable
/// (`target/<profile>/NAME`; test executables live one level deeper, in `deps/`).
///
/// `cargo test -p lb-tests` does not rebuild another package's binaries, so a binary older
/// than its sources is refused rather than silently tested.
///
/// # Panics
/// When the binary is missing or older than its sources.
#[must_use]
pub fn sibling_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("exe dir");
    let Some(bin) = [dir, dir.parent().unwrap_or(dir)].iter().map(|d| d.join(name)).find(|p| p.is_file())
    else {
        panic!(
            "{name} not found next to {}; run `cargo build --bins` (`cargo xtask test` does)",
            exe.display()
        )
    };
    let built = modified(&bin);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for krate in BINARY_SOURCES {
        if let Some((_, newer)) = newest_file(&root.join(krate), name).filter(|(t, _)| *t > built) {
            panic!(
                "{} is older than {}; run `cargo build --bins` (`cargo xtask test` does)",
                bin.display(),
                newer.display()
            );
        }
    }
    bin
}

fn modified(p: &Path) -> SystemTime {
    fs::metadata(p).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The most recently modified source of binary `bin` under `dir`: other binaries' mains and
/// the crates' tests are not part of it.
fn newest_file(dir: &Path, bin: &str) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        let other_main = dir.ends_with("src/bin") && p.file_stem().is_some_and(|s| s != bin);
        if p.file_name().is_some_and(|n| n == "tests") || other_main {
            continue;
        }
        let candidate = if p.is_dir() { newest_file(&p, bin) } else { Some((modified(&p), p)) };
        if let Some(c) = candidate
            && newest.as_ref().is_none_or(|n| c.0 > n.0)
        {
            newest = Some(c);
        }
    }
    newest
}

/// How a daemon run ended.
pub struct Stopped {
    pub status: ExitStatus,
    pub log: String,
}

/// Waits up to `timeout` for `child` to exit; kills it if it does not.
#[must_use]
pub fn wait_exit(mut child: Child, timeout: Duration) -> Option<ExitStatus> {
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(status)) => Some(status),
        Ok(Err(e)) => panic!("waiting for a daemon: {e}"),
        Err(_) => {
            // SAFETY: kill(2) on our own child, which the waiting thread has not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            None
        }
    }
}

/// `cmd` with its output going to `log` and `NOTIFY_SOCKET` set to `notify` (or unset).
fn prepare(cmd: &mut Command, log: &Path, notify: Option<&Path>) {
    let log_file = fs::File::create(log).expect("create daemon log");
    cmd.env("NO_COLOR", "1")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup log"))
        .stderr(log_file);
    if let Some(n) = notify {
        cmd.env("NOTIFY_SOCKET", n);
    }
}

/// A daemon started with a `NOTIFY_SOCKET` of our own; killed on drop.
struct Notified {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    notify: UnixDatagram,
}

impl Notified {
    /// Starts `cmd` (named `name` in `dir`) and waits for `READY=1`.
    fn start(mut cmd: Command, dir: &TempDir, name: &str) -> Self {
        let notify_path = dir.path().join(format!("{name}.notify"));
        let _ = fs::remove_file(&notify_path);
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        notify.set_read_timeout(Some(NOTIFY_POLL)).expect("timeout");
        let log = dir.path().join(format!("{name}.log"));
        prepare(&mut cmd, &log, Some(&notify_path));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        let d = Self { name: name.to_owned(), child: Some(child), log, notify };
        d.wait_for("READY=1", |_| true);
        d
    }

    /// Waits for a notification with `state` (a whole line) that `accept` takes; returns it.
    fn wait_for(&self, state: &str, mut accept: impl FnMut(&str) -> bool) -> String {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut buf = [0u8; 512];
        loop {
            if let Ok(n) = self.notify.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == state) && accept(&msg) {
                    return msg;
                }
            }
            self.assert_running(state);
            assert!(
                Instant::now() < deadline,
                "{}: no {state} within {READY_TIMEOUT:?}:\n{}",
                self.name,
                self.log()
            );
        }
    }

    fn assert_running(&self, waiting_for: &str) {
        // try_wait needs &mut; a clone of the pid is enough to ask without reaping.
        let pid = libc::pid_t::try_from(self.child.as_ref().expect("running").id()).expect("pid");
        let mut status = 0;
        // SAFETY: waitpid with WNOHANG on our own child; reaps it only if it exited.
        let r = unsafe { libc::waitpid(pid, &raw mut status, libc::WNOHANG) };
        assert!(
            r == 0,
            "{} exited while waiting for {waiting_for} (status {status:#x}):\n{}",
            self.name,
            self.log()
        );
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.as_ref().expect("running").id()).expect("pid");
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid, signal) };
    }

    fn stop(mut self, signal: libc::c_int) -> Stopped {
        self.signal(signal);
        let child = self.child.take().expect("running");
        let status = wait_exit(child, STOP_TIMEOUT);
        let log = self.log();
        let status = status.unwrap_or_else(|| {
            panic!("{} did not exit within {STOP_TIMEOUT:?} of signal {signal}:\n{log}", self.name)
        });
        Stopped { status, log }
    }
}

impl Drop for Notified {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running lbd.
pub struct Lbd(Notified);

/// `lbd --config REGISTRY --iface IFACE EXTRA...` in `ns`, pinning under `dir`'s own bpffs
/// directory and detaching on exit unless `extra` says otherwise.
fn lbd_command(ns: &NetNs, dir: &TempDir, registry: &Path, iface: &str, extra: &[&str]) -> Command {
    let mut cmd = ns.command(sibling_binary("lbd"));
    cmd.arg("--config").arg(registry).args(["--iface", iface]);
    if !extra.iter().any(|a| a.starts_with("--pin-dir") || *a == "--no-pin") {
        cmd.arg("--pin-dir").arg(dir.pin_dir());
    }
    if !extra.iter().any(|a| a.starts_with("--on-exit") || *a == "--no-pin") {
        cmd.args(["--on-exit", "detach"]);
    }
    cmd.args(extra);
    cmd
}

impl Lbd {
    /// Starts `lbd --config REGISTRY --iface IFACE EXTRA...` in `ns` and waits for `READY=1`.
    ///
    /// # Panics
    /// When lbd exits or stays unready for [`READY_TIMEOUT`]; the panic carries its log.
    #[must_use]
    pub fn start(ns: &NetNs, dir: &TempDir, registry: &Path, iface: &str, extra: &[&str]) -> Self {
        Self(Notified::start(lbd_command(ns, dir, registry, iface, extra), dir, "lbd"))
    }

    /// [`Lbd::start`] with environment variables set (e.g. `RUST_LOG`).
    #[must_use]
    pub fn start_env(
        ns: &NetNs,
        dir: &TempDir,
        registry: &Path,
        iface: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut cmd = lbd_command(ns, dir, registry, iface, extra);
        cmd.envs(env.iter().copied());
        Self(Notified::start(cmd, dir, "lbd"))
    }

    /// Runs an lbd that is expected to exit on its own (a refused start) and returns how.
    ///
    /// # Panics
    /// When it is still running after [`STOP_TIMEOUT`].
    #[must_use]
    pub fn run_to_exit(ns: &NetNs, dir: &TempDir, registry: &Path, iface: &str, extra: &[&str]) -> Stopped {
        let log = dir.path().join("lbd-run.log");
        let mut cmd = lbd_command(ns, dir, registry, iface, extra);
        prepare(&mut cmd, &log, None);
        let status = wait_exit(cmd.spawn().expect("start lbd"), STOP_TIMEOUT);
        let log = fs::read_to_string(&log).unwrap_or_default();
        let status = status.unwrap_or_else(|| panic!("lbd kept running:\n{log}"));
        Stopped { status, log }
    }

    #[must_use]
    pub fn log(&self) -> String {
        self.0.log()
    }

    /// The process id (for the commands the demo prints).
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.0.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGHUP and waits for the reload to end (`RELOADING=1`, then `READY=1`); returns
    /// the `STATUS=` lbd reported with it (`reloaded` or `reload failed`).
    ///
    /// # Panics
    /// When lbd exits or does not finish the reload within [`READY_TIMEOUT`].
    #[must_use]
    pub fn reload(&self) -> String {
        self.0.signal(libc::SIGHUP);
        self.wait_reload()
    }

    /// Waits for a reload lbd started itself (a registry file changed, `lb-ctl config
    /// apply`) to end; returns its `STATUS=`.
    ///
    /// # Panics
    /// When lbd exits or no reload ends within [`READY_TIMEOUT`].
    #[must_use]
    pub fn wait_reload(&self) -> String {
        self.0.wait_for("RELOADING=1", |_| true);
        let msg = self.0.wait_for("READY=1", |_| true);
        msg.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or_default().to_owned()
    }

    /// Sends `signal` (SIGTERM, SIGINT) and waits for lbd to exit.
    ///
    /// # Panics
    /// When lbd does not exit within [`STOP_TIMEOUT`].
    #[must_use]
    pub fn stop(self, signal: libc::c_int) -> Stopped {
        self.0.stop(signal)
    }
}

/// A running `lb-decap` on a backend.
pub struct Decap(Notified);

impl Decap {
    /// Starts `lb-decap --iface IFACE` in `ns` and waits until its program is attached.
    ///
    /// # Panics
    /// When it exits or stays unready for [`READY_TIMEOUT`].
    #[must_use]
    pub fn start(ns: &NetNs, dir: &TempDir, iface: &str) -> Self {
        let mut cmd = ns.command(sibling_binary("lb-decap"));
        cmd.args(["--iface", iface]);
        Self(Notified::start(cmd, dir, &format!("lb-decap-{}", ns.name())))
    }

    /// Stops it with SIGTERM.
    ///
    /// # Panics
    /// When it does not exit within [`STOP_TIMEOUT`].
    #[must_use]
    pub fn stop(self) -> Stopped {
        self.0.stop(libc::SIGTERM)
    }
}

/// lbd's default admin API address, inside its namespace.
pub const ADMIN: &str = "127.0.0.1:9180";
/// How long a test waits for a state lbd reaches on its own (a health transition).
pub const STATE_TIMEOUT: Duration = Duration::from_secs(20);
/// How often such a wait reads `/lb-status`.
const STATE_POLL: Duration = Duration::from_millis(50);

/// One request to the admin API of the lbd in `ns`.
///
/// # Panics
/// When the API cannot be reached.
#[must_use]
pub fn admin(ns: &NetNs, method: &str, path: &str, body: Option<&str>) -> lb_userspace::client::Reply {
    let addr = ADMIN.parse().expect("admin address");
    ns.run(|| lb_userspace::client::request(addr, method, path, body, Duration::from_secs(30)))
        .unwrap_or_else(|e| panic!("admin API {method} {path}: {e}"))
}

/// The value of the `/metrics` sample that starts with `prefix` (its name and labels, then a
/// space).
///
/// # Panics
/// When there is no such sample, or it is not a number.
#[must_use]
pub fn metric(ns: &NetNs, prefix: &str) -> f64 {
    let m = admin(ns, "GET", "/metrics", None).body;
    m.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix} in\n{m}"))
        .trim()
        .parse()
        .expect("a number")
}

/// `/lb-status` of the lbd in `ns`.
///
/// # Panics
/// When it is not a 200 with JSON.
#[must_use]
pub fn status(ns: &NetNs) -> serde_json::Value {
    let r = admin(ns, "GET", "/lb-status", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// Reads `/lb-status` until `done` holds (health changes have no readiness signal; this is
/// the operator's view of them) and returns it.
///
/// # Panics
/// After [`STATE_TIMEOUT`], with the last status.
pub fn wait_status(ns: &NetNs, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = status(ns);
        if done(&s) {
            return s;
        }
        assert!(start.elapsed() < STATE_TIMEOUT, "waited {STATE_TIMEOUT:?} for {what}; status:\n{s:#}");
        std::thread::sleep(STATE_POLL);
    }
}

/// A backend's entry in a status document.
#[must_use]
pub fn backend_status<'a>(
    status: &'a serde_json::Value,
    service: &str,
    backend: &str,
) -> Option<&'a serde_json::Value> {
    status["services"].as_array()?.iter().find(|s| s["name"] == service)?["backends"]
        .as_array()?
        .iter()
        .find(|b| b["backend"] == backend)
}

/// Failures the edge counted against `backend` of HTTP service `service` (passive health).
///
/// # Panics
/// When the status has no such backend.
#[must_use]
pub fn http_failures(ns: &NetNs, service: &str, backend: &str) -> u64 {
    let st = status(ns);
    backend_status(&st, service, backend).unwrap_or_else(|| panic!("{service}/{backend} not in {st:#}"))["http"]
        ["failures"]
        .as_u64()
        .expect("failures")
}

/// Client connections open on each edge thread (`lb_edge_connections{thread}`), in thread order.
#[must_use]
pub fn edge_connections(ns: &NetNs) -> Vec<u64> {
    admin(ns, "GET", "/metrics", None)
        .body
        .lines()
        .filter(|l| l.starts_with("lb_edge_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// The CPUs each thread of `pid` named `prefix*` may run on, by thread name, and those of the
/// process's main thread, from `/proc` (`Cpus_allowed_list`).
#[must_use]
pub fn thread_cpus(pid: u32, prefix: &str) -> (Vec<(String, Vec<usize>)>, Vec<usize>) {
    let allowed = |status: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|list| cpu_list(list.trim()))
            .unwrap_or_default()
    };
    let mut threads: Vec<(String, Vec<usize>)> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter_map(|t| {
                    let name = fs::read_to_string(t.path().join("comm")).ok()?.trim().to_owned();
                    name.starts_with(prefix)
                        .then(|| Some((name, allowed(&fs::read_to_string(t.path().join("status")).ok()?))))?
                })
                .collect()
        })
        .unwrap_or_default();
    // By number: `lb-edge-10` after `lb-edge-9`.
    threads.sort_by_key(|(name, _)| {
        let digits = name.trim_start_matches(|c: char| !c.is_ascii_digit());
        (digits.parse::<u64>().unwrap_or(u64::MAX), name.clone())
    });
    (threads, allowed(&fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default()))
}

/// A kernel CPU list (`0-2,5`) as CPU numbers.
fn cpu_list(list: &str) -> Vec<usize> {
    list.split(',')
        .filter_map(|r| match r.split_once('-') {
            Some((a, b)) => Some((a.parse().ok()?..=b.parse().ok()?).collect::<Vec<usize>>()),
            None => Some(vec![r.parse().ok()?]),
        })
        .flatten()
        .collect()
}

/// Whether no backend waits for its first health check.
#[must_use]
pub fn all_checked(status: &serde_json::Value) -> bool {
    let services = status["services"].as_array().map(Vec::as_slice).unwrap_or_default();
    services
        .iter()
        .flat_map(|s| s["backends"].as_array().map(Vec::as_slice).unwrap_or_default())
        .all(|b| b["health"] != "unknown" && !b["reason"].as_str().is_some_and(|r| r.contains("awaiting")))
}

/// Runs `lb-ctl ARGS` in `ns`; returns exit code, stdout and stderr.
///
/// # Panics
/// When lb-ctl cannot be started.
#[must_use]
pub fn lb_ctl(ns: &NetNs, args: &[&str]) -> (i32, String, String) {
    let out =
        ns.command(sibling_binary("lb-ctl")).args(args).env("NO_COLOR", "1").output().expect("run lb-ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
