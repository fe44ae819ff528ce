//! `cargo xtask bench http`: requests/s, latency and CPU per request through lb's HTTP edge,
//! HAProxy and nginx, each proxying to the same keep-alive backend (nginx answering a fixed
//! body), in one run, interleaved round by round.
//!
//! Client (wrk; h2load for HTTP/2), proxies and backend sit in their own network namespaces on
//! this machine's two cores, so the figures compare the proxies' cost rather than measure a
//! network. Each proxy gets two worker threads, keep-alive to the backend, the same
//! certificate, and no access log (lb's is switched off with `RUST_LOG`).
//!
//! Per proxy and protocol (`http`: HTTP/1.1, `https`: HTTP/1.1 over TLS, `h2`: HTTP/2 over
//! TLS) it reports `rps`, `p50_ms`, `p99_ms` and `cpu_s_per_1m_req` (the proxy's processes'
//! CPU time from /proc, per million requests), each the median over the rounds.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Serialize;

use super::{median, round, table};
use crate::{
    lbd::{Lbd, TempDir},
    netns::NetNs,
    pki::Pki,
    topology::{DsrTopology, backend_ip},
    unique_prefix,
};

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Seconds per measurement.
    pub seconds: u32,
    /// Rounds counted; each measures every proxy once per protocol.
    pub rounds: usize,
    /// Rounds run at most per protocol, when some lose CPU to the hypervisor (steal).
    pub max_rounds: usize,
    /// Client connections.
    pub connections: u32,
    /// Only this protocol (`http`, `https` or `h2`); all when `None`. For profiling one path.
    pub protocol: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Self { seconds: 5, rounds: 3, max_rounds: 6, connections: 32, protocol: None }
    }
}

/// The protocol named `name`, as `Options::protocol` takes it.
#[must_use]
pub fn protocol(name: &str) -> Option<&'static str> {
    PROTOCOLS.into_iter().find(|p| *p == name)
}

pub(super) const BACKEND_PORT: u16 = 8080;
const PROXIES: [(&str, u16, u16); 3] = [("lb", 8000, 8443), ("haproxy", 8100, 8543), ("nginx", 8200, 8643)];
const PROTOCOLS: [&str; 3] = ["http", "https", "h2"];
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// A round with at most this much steal (a share of all CPUs' time), and as much used by the
/// proxies not under load, ran on a quiet host.
const QUIET_STEAL: f64 = 0.03;

/// One proxy measured once.
struct Leg {
    proxy: &'static str,
    run: Run,
    /// CPU seconds the proxy used, and those in user space.
    cpu: f64,
    user: f64,
    /// CPU seconds the backend and the load generator used.
    backend: f64,
    client: f64,
    /// Share of the machine's CPU time stolen meanwhile.
    steal: f64,
    /// Share of the machine's CPU time the other proxies used meanwhile, idle as they should
    /// be (nginx's HTTP/2 was seen spinning a CPU after its own leg, slowing the next).
    bystanders: f64,
}

/// The three proxies measured back to back.
struct Round {
    legs: Vec<Leg>,
}

impl Round {
    /// The most any of its legs lost to steal or to the proxies not under load.
    fn noise(&self) -> f64 {
        self.legs.iter().map(|l| l.steal.max(l.bystanders)).fold(0.0, f64::max)
    }
}

/// Whether rounds with these steals are enough: `rounds` quiet ones, or `max_rounds` in all.
fn enough(steals: &[f64], opts: Options) -> bool {
    steals.len() >= opts.max_rounds.max(opts.rounds)
        || steals.iter().filter(|&&s| s <= QUIET_STEAL).count() >= opts.rounds
}

/// The `n` rounds with the least steal, in the order they ran.
fn quietest(steals: &[f64], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..steals.len()).collect();
    order.sort_by(|&a, &b| steals[a].total_cmp(&steals[b]));
    order.truncate(n);
    order.sort_unstable();
    order
}

/// One more HTTP/1.1 round, not counted above (the capture costs CPU): each proxy's traffic
/// captured on the lb namespace's interface with `tcpdump`, and request-to-answer times at the
/// proxy and with the backend read off it (`wire`), beside wrk's p99 in the same leg. Skipped,
/// with a note, without tcpdump or when a capture fails.
fn wire_round(
    lb_ns: &NetNs,
    client: &NetNs,
    d: &Path,
    lb: SocketAddr,
    opts: Options,
    figures: &mut BTreeMap<String, BTreeMap<String, Figure>>,
) {
    if !lb_ns.command("tcpdump").arg("--version").output().is_ok_and(|o| o.status.success()) {
        eprintln!("http bench: no tcpdump: no figures from the wire (cargo xtask bench http installs it)");
        return;
    }
    eprintln!("http bench: http wire round (captured, not counted above)");
    for (name, plain, _) in PROXIES {
        match wire_leg(lb_ns, client, d, SocketAddr::new(lb.ip(), plain), opts) {
            Ok(w) => {
                eprintln!(
                    "http bench: {name} on the wire: {} requests paired, {} dropped, at the proxy p99 {:.2} ms, to the backend p99 {:.2} ms, wrk p99 {:.2} ms",
                    w.paired,
                    w.dropped.map_or_else(|| "?".to_owned(), |n| n.to_string()),
                    w.at_proxy_ms[1],
                    w.to_backend_ms[1],
                    w.client_p99_ms
                );
                if let Some(f) = figures.get_mut(name).and_then(|m| m.get_mut("http")) {
                    f.wire = Some(w);
                }
            }
            Err(e) => eprintln!("http bench: {name}: no figures from the wire: {e:#}"),
        }
    }
}

/// One proxy's wire leg: tcpdump started (its "listening" line is the readiness signal), wrk
/// run, tcpdump stopped (SIGTERM: it writes the rest and its counts), the capture read.
fn wire_leg(lb_ns: &NetNs, client: &NetNs, d: &Path, addr: SocketAddr, opts: Options) -> Result<Wire> {
    let (pcap, err) = (d.join("wire.pcap"), d.join("tcpdump.err"));
    // Segments with data only: a smaller capture, fewer drops.
    let filter = format!(
        "tcp and (port {} or port {BACKEND_PORT}) and (ip[2:2] - ((ip[0]&0xf)<<2) - ((tcp[12]&0xf0)>>2)) != 0",
        addr.port()
    );
    let mut cmd = lb_ns.command("tcpdump");
    // As root (`-Z`): the bench's directory is not the tcpdump user's. A 32 MiB buffer (`-B`).
    cmd.args(["-i", "eth0", "-s", "80", "-B", "32768", "-q", "-U", "-Z", "root", "-w"])
        .arg(&pcap)
        .arg(&filter);
    let mut dump = spawn(&mut cmd, "tcpdump", &err)?;
    let started = Instant::now();
    while !std::fs::read_to_string(&err).unwrap_or_default().contains("listening on") {
        if dump.0.try_wait()?.is_some() || started.elapsed() > START_TIMEOUT {
            bail!("tcpdump did not start: {}", std::fs::read_to_string(&err).unwrap_or_default());
        }
        thread::sleep(Duration::from_millis(20));
    }
    let (steal0, t0) = (steal_seconds(), Instant::now());
    let run = load(client, d, "http", addr, opts);
    let steal = (steal_seconds() - steal0) / (t0.elapsed().as_secs_f64() * cpus());
    drop(dump);
    let run = run?;
    let bytes = std::fs::read(&pcap).unwrap_or_default();
    let _ = std::fs::remove_file(&pcap);
    let t = super::wire::times(&bytes, addr.port(), BACKEND_PORT);
    ensure!(!t.front.is_empty(), "no exchange in the capture ({} bytes)", bytes.len());
    let q = |v: &[f64]| [0.5, 0.99, 0.999].map(|p| round(super::wire::quantile_ms(v, p), 3));
    Ok(Wire {
        at_proxy_ms: q(&t.front),
        to_backend_ms: q(&t.back),
        client_p99_ms: run.p99_ms,
        paired: t.front.len(),
        dropped: super::wire::dropped(&std::fs::read_to_string(&err).unwrap_or_default()),
        steal: round(steal, 3),
    })
}

/// The median of `a[i] / b[i]`: samples of the same rounds, paired.
fn paired(a: &[f64], b: &[f64]) -> f64 {
    debug_assert_eq!(a.len(), b.len(), "every counted round measures every proxy");
    median(&mut a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>())
}

/// `lb`'s requests/s over `other`'s if `lb` spent nothing in user space, round by round as
/// `paired`: on a host whose CPUs the proxy, backend and client keep busy, requests/s go as
/// the inverse of their CPU a request, so the ratio is `other`'s sum over `lb`'s without its
/// user-space part.
fn without_user_cpu(lb: &Figure, other: &Figure) -> f64 {
    let all = |f: &Figure, with_user: bool| -> Vec<f64> {
        (0..f.cpu.len())
            .map(|i| f.cpu[i] - if with_user { 0.0 } else { f.user[i] } + f.backend[i] + f.client[i])
            .collect()
    };
    // CPU a request is the inverse of requests/s: `paired` divides other's by lb's.
    paired(&all(other, true), &all(lb, false))
}

/// Which rounds of a protocol counted.
#[derive(Serialize, Debug)]
pub struct Selection {
    /// Rounds run.
    pub run: usize,
    /// The rounds counted (from 1), the quietest.
    pub counted: Vec<usize>,
}

/// One proxy and protocol: medians over the rounds.
#[derive(Serialize, Clone, Debug, Default)]
pub struct Figure {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub cpu_s_per_1m_req: f64,
    /// Of that, in user space: the rest is the kernel's, mostly the system calls every proxy
    /// makes alike (`scripts/edge-syscalls.sh`).
    pub cpu_user_s_per_1m_req: f64,
    /// The backend's and the load generator's CPU in the same legs: a proxy could look cheap by
    /// making them work harder, and on a host they share, it costs requests/s all the same.
    pub backend_cpu_s_per_1m_req: f64,
    pub client_cpu_s_per_1m_req: f64,
    /// Failed requests (errors, non-2xx) over all rounds run, counted or not.
    pub errors: u64,
    pub rps_samples: Vec<f64>,
    /// HTTP/1.1 only: the wire round's figures.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wire: Option<Wire>,
    /// Share of the machine's CPU time taken by the hypervisor during each counted round.
    pub steal_samples: Vec<f64>,
    #[serde(skip)]
    p50: Vec<f64>,
    #[serde(skip)]
    p99: Vec<f64>,
    #[serde(skip)]
    cpu: Vec<f64>,
    #[serde(skip)]
    user: Vec<f64>,
    #[serde(skip)]
    backend: Vec<f64>,
    #[serde(skip)]
    client: Vec<f64>,
}

/// One proxy's leg of the wire round (HTTP/1.1, captured on the proxies' interface).
#[derive(Serialize, Clone, Debug)]
pub struct Wire {
    /// Request arriving to answer leaving, at the proxy (the backend exchange included): p50,
    /// p99, p99.9 in ms.
    pub at_proxy_ms: [f64; 3],
    /// Request leaving for the backend to its answer arriving: p50, p99, p99.9 in ms.
    pub to_backend_ms: [f64; 3],
    /// wrk's p99 in the same leg: what the client saw while the capture ran.
    pub client_p99_ms: f64,
    /// Client requests paired with their answers, and packets tcpdump's kernel buffer dropped.
    pub paired: usize,
    pub dropped: Option<u64>,
    /// Share of the machine's CPU time stolen during the leg.
    pub steal: f64,
}

/// lb against each baseline, per protocol: medians of the ratios within each round (its legs
/// ran back to back), which the host's speed, drifting from round to round even without
/// steal, moves less than a ratio of medians.
#[derive(Serialize, Debug)]
pub struct Ratios {
    pub rps_vs_haproxy: f64,
    pub rps_vs_nginx: f64,
    pub p99_vs_haproxy: f64,
    pub cpu_vs_haproxy: f64,
    /// lb's requests/s over nginx's as they would be if lb spent no CPU at all in user space,
    /// all else as measured: nginx's CPU a request (its own, the backend's and the load
    /// generator's) over lb's without its user-space part. The host's two CPUs run all three,
    /// busy throughout, so requests/s go as the inverse of that sum. A ceiling for any proxy
    /// making the same system calls as lb (and nginx) on this host.
    pub rps_vs_nginx_without_user_cpu: f64,
    /// The p99 at the proxy (the wire round), lb's over HAProxy's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p99_at_proxy_vs_haproxy: Option<f64>,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub seconds: u32,
    pub rounds: usize,
    pub connections: u32,
    /// Protocol -> the rounds run and counted.
    pub selection: BTreeMap<String, Selection>,
    /// Proxy -> protocol -> figure.
    pub proxies: BTreeMap<String, BTreeMap<String, Figure>>,
    /// Protocol -> lb's ratios.
    pub lb_ratios: BTreeMap<String, Ratios>,
    pub targets: &'static str,
}

/// A server stopped on drop: SIGTERM first, so nginx's master stops its workers (a killed
/// master leaves them running), then SIGKILL if it lingers.
pub(super) struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: signalling our own child, which has not been waited for yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn spawn(cmd: &mut Command, what: &str, log: &Path) -> Result<Proc> {
    let f = std::fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("start {what} (cargo xtask bench http installs it)"))?;
    Ok(Proc(child))
}

/// The nginx every proxy in a benchmark forwards to, in the first backend's namespace, once
/// it listens.
pub(super) fn start_backend(topo: &DsrTopology, dir: &TempDir) -> Result<Proc> {
    let d = dir.path();
    let conf = dir.write("backend.conf", &backend_nginx(d));
    let backend =
        spawn(topo.backends[0].ns.command("nginx").arg("-c").arg(conf), "nginx", &d.join("backend.log"))?;
    wait_listening(&topo.client.ns, SocketAddr::from((backend_ip(0), BACKEND_PORT)))?;
    Ok(backend)
}

fn backend_nginx(dir: &Path) -> String {
    format!(
        "daemon off;
worker_processes 1;
pid {d}/backend.pid;
error_log {d}/backend.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {d}/b-body;
  proxy_temp_path {d}/b-proxy;
  fastcgi_temp_path {d}/b-fcgi;
  uwsgi_temp_path {d}/b-uwsgi;
  scgi_temp_path {d}/b-scgi;
  server {{
    listen {BACKEND_PORT} reuseport;
    location / {{ return 200 \"ok\\n\"; }}
  }}
}}
",
        d = dir.display()
    )
}

fn proxy_nginx(dir: &Path, lb: &str, backend: &str) -> String {
    format!(
        "daemon off;
worker_processes 2;
pid {d}/proxy.pid;
error_log {d}/proxy.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  # HTTP/2 too: the default 1000 requests a connection sends GOAWAYs mid-run.
  keepalive_requests 1000000;
  client_body_temp_path {d}/p-body;
  proxy_temp_path {d}/p-proxy;
  fastcgi_temp_path {d}/p-fcgi;
  uwsgi_temp_path {d}/p-uwsgi;
  scgi_temp_path {d}/p-scgi;
  upstream be {{
    server {backend}:{BACKEND_PORT};
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }}
  server {{
    listen {lb}:8200;
    listen {lb}:8643 ssl http2;
    ssl_certificate {d}/bench.pem;
    ssl_certificate_key {d}/bench.key;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / {{
      proxy_pass http://be;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
",
        d = dir.display()
    )
}

fn haproxy(dir: &Path, lb: &str, backend: &str) -> String {
    format!(
        "global
  nbthread 2
  # Within this machine's open-file limit (two descriptors a connection).
  maxconn 4000
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend bench
  bind {lb}:8100
  bind {lb}:8543 ssl crt {d}/bench-combined.pem alpn h2,http/1.1
  option forwardfor
  default_backend be
backend be
  server b0 {backend}:{BACKEND_PORT} maxconn 64
",
        d = dir.display()
    )
}

fn lb_registry(backend: &str) -> String {
    format!(
        "version: 1
listeners:
  - port: 8000
  - port: 8443
    tls: {{certificates: [{{cert: bench.pem, key: bench.key}}]}}
http:
  bench:
    hosts: ['*']
    backends: [{{host: {backend}, port: {BACKEND_PORT}}}]
    # As HAProxy's `maxconn 64` and nginx's `keepalive 64`. No cap on requests a backend
    # connection (0): HAProxy keeps a client's backend connection for the client's whole session
    # (its `max-reuse` counts only takes from the idle pool), so nginx gets no cap either.
    pool: {{max_connections: 64, max_idle: 64, max_requests: 0}}
"
    )
}

/// Waits until `addr` accepts TCP connections from `ns` (a server's listening socket is its
/// readiness signal).
pub(super) fn wait_listening(ns: &NetNs, addr: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if ns.run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("{addr} not accepting after {START_TIMEOUT:?}")
}

/// CPU seconds the hypervisor gave to others while this VM wanted them, over all CPUs, since
/// boot (`steal` in /proc/stat).
#[expect(clippy::cast_precision_loss, reason = "clock ticks far below 2^52")]
fn steal_seconds() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    // "cpu  user nice system idle iowait irq softirq steal ..."
    let steal =
        stat.lines().next().and_then(|l| l.split_whitespace().nth(8)).and_then(|v| v.parse::<u64>().ok());
    steal.unwrap_or(0) as f64 / hz
}

/// CPUs that /proc/stat's total counts (all online ones, whatever this process's affinity).
#[expect(clippy::cast_precision_loss, reason = "a handful of CPUs")]
fn cpus() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let n = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .count();
    n.max(1) as f64
}

/// CPU seconds used so far by `pid` and its children (nginx's workers).
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    cpu_split(pid).0
}

/// CPU seconds used so far by `pid` and its children, and of those, the ones in user space.
#[expect(clippy::cast_precision_loss, reason = "clock ticks far below 2^52")]
pub(super) fn cpu_split(pid: u32) -> (f64, f64) {
    // utime stime, and ppid.
    let stat = |p: &str| stat_fields(p, [11, 12, 1]);
    let [mut user, mut sys, _] = stat(&pid.to_string()).unwrap_or_default();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.bytes().all(|b| b.is_ascii_digit())
            && let Some([u, s, ppid]) = stat(&name)
            && ppid == u64::from(pid)
        {
            user += u;
            sys += s;
        }
    }
    ((user + sys) as f64 / clock_ticks(), user as f64 / clock_ticks())
}

/// CPU seconds of this process's children that were waited for (the load generators, each
/// run to its end).
#[expect(clippy::cast_precision_loss, reason = "clock ticks far below 2^52")]
fn children_cpu_seconds() -> f64 {
    // cutime cstime.
    stat_fields("self", [13, 14]).map_or(0, |[u, s]| u + s) as f64 / clock_ticks()
}

/// Numeric fields of `/proc/<who>/stat`, counted after the command name (which may hold
/// spaces): 0 is the state, 1 the ppid, 11 and 12 utime and stime.
fn stat_fields<const N: usize>(who: &str, fields: [usize; N]) -> Option<[u64; N]> {
    let s = std::fs::read_to_string(format!("/proc/{who}/stat")).ok()?;
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split(' ').collect();
    let mut out = [0; N];
    for (v, k) in out.iter_mut().zip(fields) {
        *v = f.get(k)?.parse().ok()?;
    }
    Some(out)
}

/// Clock ticks a second, the unit of /proc's CPU times.
#[expect(clippy::cast_precision_loss, reason = "a small constant")]
fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64
}

/// What one load run measured.
pub(super) struct Run {
    pub requests: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

/// `12.5ms`, `980.00us`, `1.02s` -> ms.
fn wrk_ms(v: &str) -> Option<f64> {
    let v = v.trim();
    let (n, unit) = v.find(|c: char| c.is_ascii_alphabetic()).map(|i| v.split_at(i))?;
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        _ => return None,
    })
}

fn parse_wrk(out: &str) -> Result<Run> {
    let find = |prefix: &str| out.lines().find_map(|l| l.trim().strip_prefix(prefix).map(str::trim));
    let rps: f64 = find("Requests/sec:").and_then(|v| v.parse().ok()).context("no Requests/sec")?;
    let requests: f64 = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.parse().ok()))
        .context("no request count")?;
    let p50 = find("50%").and_then(wrk_ms).context("no 50% latency")?;
    let p99 = find("99%").and_then(wrk_ms).context("no 99% latency")?;
    let mut errors = find("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    if let Some(s) = find("Socket errors:") {
        errors += s.split(',').filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok()).sum::<u64>();
    }
    Ok(Run { requests, rps, p50_ms: p50, p99_ms: p99, errors })
}

#[expect(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "request counts far below 2^52; a percentile's index is within the log"
)]
fn parse_h2load(out: &str, log: &str) -> Result<Run> {
    // finished in 5.00s, 12345.60 req/s, 1.2MB/s
    let rps: f64 = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("finished in ")?.split(", ").nth(1)?.strip_suffix(" req/s")?.parse().ok()
        })
        .context("no req/s")?;
    // requests: 100 total, 100 started, 100 done, 98 succeeded, 2 failed, 0 errored, 0 timeout
    let req = out.lines().find_map(|l| l.strip_prefix("requests: ")).context("no requests line")?;
    let field = |name: &str| {
        req.split(", ").find_map(|p| p.strip_suffix(name)?.trim().parse::<u64>().ok()).unwrap_or(0)
    };
    let done = field(" done");
    let errors = field(" failed") + field(" errored") + field(" timeout");
    let mut lat: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse::<f64>().ok())
        .map(|us| us / 1e3)
        .collect();
    ensure!(!lat.is_empty(), "h2load wrote no request log");
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    Ok(Run { requests: done as f64, rps, p50_ms: pct(0.5), p99_ms: pct(0.99), errors })
}

/// One load run against `addr` over `protocol`.
pub(super) fn load(
    client: &NetNs,
    dir: &Path,
    protocol: &str,
    addr: SocketAddr,
    opts: Options,
) -> Result<Run> {
    let secs = opts.seconds.to_string();
    if protocol == "h2" {
        let log = dir.join("h2load.log");
        let out = client
            .command("h2load")
            .args(["-D", &secs, "-c", &(opts.connections / 2).max(1).to_string(), "-m", "10", "-t", "1"])
            .arg("--log-file")
            .arg(&log)
            .arg(format!("https://{addr}/"))
            .output()
            .context("run h2load (cargo xtask bench http installs nghttp2-client)")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        return parse_h2load(&text, &log).with_context(|| format!("h2load output:\n{text}"));
    }
    let scheme = if protocol == "http" { "http" } else { "https" };
    let out = client
        .command("wrk")
        .args(["-t2", "-c", &opts.connections.to_string(), "-d", &format!("{secs}s"), "--latency"])
        .arg(format!("{scheme}://{addr}/"))
        .output()
        .context("run wrk (cargo xtask bench http installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if std::env::var_os("LB_BENCH_RAW").is_some() {
        eprintln!("{addr}:\n{text}");
    }
    parse_wrk(&text).with_context(|| format!("wrk output:\n{text}"))
}

fn protocols(opts: Options) -> impl Iterator<Item = &'static str> {
    PROTOCOLS.into_iter().filter(move |p| opts.protocol.is_none_or(|o| o == *p))
}

/// Runs the benchmark; prints the table and returns the report.
#[expect(clippy::too_many_lines, reason = "one linear script: topology, servers, rounds, report")]
pub fn run(opts: Options) -> Result<Report> {
    let topo = DsrTopology::new(&unique_prefix("lbb-http"), 1);
    let dir = TempDir::new("bench-http");
    let d = dir.path();
    let pki = Pki::new(d);
    let (pem, key) = pki.server("bench", &["bench.example"], 30);
    std::fs::write(d.join("bench-combined.pem"), [std::fs::read(&pem)?, std::fs::read(&key)?].concat())?;
    let lb_ip = topo.lb.ip.to_string();
    let backend = backend_ip(0).to_string();
    let client = &topo.client.ns;

    let backend_proc = start_backend(&topo, &dir)?;
    let nginx = spawn(
        topo.lb.ns.command("nginx").arg("-c").arg(dir.write("proxy.conf", &proxy_nginx(d, &lb_ip, &backend))),
        "nginx",
        &d.join("proxy.log"),
    )?;
    let haproxy = spawn(
        topo.lb
            .ns
            .command("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(dir.write("haproxy.cfg", &haproxy(d, &lb_ip, &backend))),
        "haproxy",
        &d.join("haproxy.log"),
    )?;
    // lb with its access log off, as the others. `LB_BENCH_LBD_ARGS` adds flags, to compare
    // settings (e.g. `--no-edge-affinity`).
    let reg = dir.write("services.yaml", &lb_registry(&backend));
    let extra = std::env::var("LB_BENCH_LBD_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let lbd = Lbd::start_env(
        &topo.lb.ns,
        &dir,
        &reg,
        "eth0",
        &extra,
        &[("RUST_LOG", "info,lb_userspace::access=off")],
    );
    let pid = |name: &str| match name {
        "lb" => lbd.pid(),
        "haproxy" => haproxy.0.id(),
        _ => nginx.0.id(),
    };
    for (name, plain, tls) in PROXIES {
        for port in [plain, tls] {
            wait_listening(client, SocketAddr::from((topo.lb.ip, port))).with_context(|| {
                let log = |f: &str| std::fs::read_to_string(d.join(f)).unwrap_or_default();
                let logs = match name {
                    "lb" => lbd.log(),
                    "haproxy" => log("haproxy.log"),
                    _ => log("proxy.log") + &log("proxy.err"),
                };
                format!("{name} on {port}:\n{logs}")
            })?;
        }
    }

    let mut figures: BTreeMap<String, BTreeMap<String, Figure>> = BTreeMap::new();
    let mut selection = BTreeMap::new();
    for protocol in protocols(opts) {
        // Rounds of one protocol, each measuring the three proxies back to back, until
        // `rounds` of them ran on a quiet host or `max_rounds` ran; the quietest `rounds`
        // count. On a shared VM the hypervisor takes whole seconds of CPU away (steal), and a
        // proxy measured then loses for no fault of its own.
        let mut done: Vec<Round> = Vec::new();
        while !enough(&done.iter().map(Round::noise).collect::<Vec<_>>(), opts) {
            eprintln!("http bench: {protocol} round {}", done.len() + 1);
            let mut legs = Vec::new();
            // Each round starts with another proxy: none always follows the same one. Turned
            // by the quiet rounds so far, so the ones counted start with different proxies.
            let turn = done.iter().filter(|r| r.noise() <= QUIET_STEAL).count();
            for k in 0..PROXIES.len() {
                let (name, plain, tls) = PROXIES[(k + turn) % PROXIES.len()];
                let port = if protocol == "http" { plain } else { tls };
                let bystanders =
                    || PROXIES.iter().filter(|p| p.0 != name).map(|p| cpu_seconds(pid(p.0))).sum::<f64>();
                let ((cpu0, user0), steal0, idle0, t0) =
                    (cpu_split(pid(name)), steal_seconds(), bystanders(), Instant::now());
                // The backend's and the load generator's CPU too: a proxy could look cheap by
                // making them work harder (answers less bunched, more wake-ups).
                let (backend0, client0) = (cpu_seconds(backend_proc.0.id()), children_cpu_seconds());
                let r = load(client, d, protocol, SocketAddr::from((topo.lb.ip, port)), opts)?;
                let (cpu, user) = cpu_split(pid(name));
                let (cpu, user) = (cpu - cpu0, user - user0);
                let per_1m = |s: f64| s / r.requests.max(1.0) * 1e6;
                let (backend, client) =
                    (cpu_seconds(backend_proc.0.id()) - backend0, children_cpu_seconds() - client0);
                let machine = t0.elapsed().as_secs_f64() * cpus();
                let steal = (steal_seconds() - steal0) / machine;
                let idle_use = (bystanders() - idle0) / machine;
                eprintln!(
                    "http bench: {name} {protocol}: {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, {} errors, {:.0} % of the CPUs stolen, {:.0} % used by the other proxies; CPU s per 1M requests: proxy {:.1} (user {:.1}), backend {:.1}, client {:.1}",
                    r.rps,
                    r.p50_ms,
                    r.p99_ms,
                    r.errors,
                    steal * 100.0,
                    idle_use * 100.0,
                    per_1m(cpu),
                    per_1m(user),
                    per_1m(backend),
                    per_1m(client)
                );
                legs.push(Leg {
                    proxy: name,
                    run: r,
                    cpu,
                    user,
                    backend,
                    client,
                    steal,
                    bystanders: idle_use,
                });
            }
            done.push(Round { legs });
        }
        let order = quietest(&done.iter().map(Round::noise).collect::<Vec<_>>(), opts.rounds);
        eprintln!(
            "http bench: {protocol}: rounds {} of {} counted (steal, or CPU used by the proxies not under load, at most {:.0} %)",
            order.iter().map(|i| (i + 1).to_string()).collect::<Vec<_>>().join(", "),
            done.len(),
            order.iter().map(|&i| done[i].noise()).fold(0.0, f64::max) * 100.0
        );
        // Failed requests of every round, counted or not.
        for leg in done.iter().flat_map(|r| &r.legs) {
            let f = figures.entry(leg.proxy.to_owned()).or_default().entry(protocol.to_owned()).or_default();
            f.errors += leg.run.errors;
        }
        for &i in &order {
            for leg in &done[i].legs {
                let f =
                    figures.entry(leg.proxy.to_owned()).or_default().entry(protocol.to_owned()).or_default();
                f.rps_samples.push(round(leg.run.rps, 0));
                f.p50.push(leg.run.p50_ms);
                f.p99.push(leg.run.p99_ms);
                let per_1m = |s: f64| s / leg.run.requests.max(1.0) * 1e6;
                f.cpu.push(per_1m(leg.cpu));
                f.user.push(per_1m(leg.user));
                f.backend.push(per_1m(leg.backend));
                f.client.push(per_1m(leg.client));
                f.steal_samples.push(round(leg.steal, 3));
            }
        }
        selection.insert(
            protocol.to_owned(),
            Selection { run: done.len(), counted: order.iter().map(|i| i + 1).collect() },
        );
        if protocol == "http" {
            wire_round(&topo.lb.ns, client, d, SocketAddr::from((topo.lb.ip, 0)), opts, &mut figures);
        }
    }
    for f in figures.values_mut().flat_map(|m| m.values_mut()) {
        f.rps = median(&mut f.rps_samples.clone());
        // On copies: the samples stay in round order, for the paired ratios below.
        f.p50_ms = round(median(&mut f.p50.clone()), 3);
        f.p99_ms = round(median(&mut f.p99.clone()), 3);
        f.cpu_s_per_1m_req = round(median(&mut f.cpu.clone()), 2);
        f.cpu_user_s_per_1m_req = round(median(&mut f.user.clone()), 2);
        f.backend_cpu_s_per_1m_req = round(median(&mut f.backend.clone()), 2);
        f.client_cpu_s_per_1m_req = round(median(&mut f.client.clone()), 2);
    }
    let mut lb_ratios = BTreeMap::new();
    let mut rows = Vec::new();
    for protocol in protocols(opts) {
        let get = |p: &str| figures[p][protocol].clone();
        let (lb, ha, ng) = (get("lb"), get("haproxy"), get("nginx"));
        let ratios = Ratios {
            rps_vs_haproxy: round(paired(&lb.rps_samples, &ha.rps_samples), 2),
            rps_vs_nginx: round(paired(&lb.rps_samples, &ng.rps_samples), 2),
            p99_vs_haproxy: round(paired(&lb.p99, &ha.p99), 2),
            cpu_vs_haproxy: round(paired(&lb.cpu, &ha.cpu), 2),
            rps_vs_nginx_without_user_cpu: round(without_user_cpu(&lb, &ng), 2),
            p99_at_proxy_vs_haproxy: lb
                .wire
                .as_ref()
                .zip(ha.wire.as_ref())
                .map(|(l, h)| round(l.at_proxy_ms[1] / h.at_proxy_ms[1], 2)),
        };
        for (name, f) in [("lb", &lb), ("haproxy", &ha), ("nginx", &ng)] {
            rows.push(vec![
                protocol.to_owned(),
                name.to_owned(),
                format!("{:.0}", f.rps),
                format!("{:.2}", f.p50_ms),
                format!("{:.2}", f.p99_ms),
                format!("{:.1}", f.cpu_s_per_1m_req),
                format!("{:.1}", f.cpu_user_s_per_1m_req),
                format!("{:.1}", f.backend_cpu_s_per_1m_req + f.client_cpu_s_per_1m_req),
                f.errors.to_string(),
            ]);
        }
        lb_ratios.insert(protocol.to_owned(), ratios);
    }
    println!(
        "{}",
        table(
            &[
                "protocol",
                "proxy",
                "req/s",
                "p50 ms",
                "p99 ms",
                "cpu s/1M req",
                "of it user",
                "backend+client",
                "errors"
            ],
            &rows
        )
    );
    let mut ratio_rows = Vec::new();
    for (p, r) in &lb_ratios {
        ratio_rows.push(vec![
            p.clone(),
            format!("{:.2}", r.rps_vs_haproxy),
            format!("{:.2}", r.rps_vs_nginx),
            format!("{:.2}", r.p99_vs_haproxy),
            format!("{:.2}", r.cpu_vs_haproxy),
            format!("{:.2}", r.rps_vs_nginx_without_user_cpu),
        ]);
    }
    println!(
        "{}",
        table(
            &[
                "lb, protocol",
                "rps vs HAProxy",
                "rps vs nginx",
                "p99 vs HAProxy",
                "cpu vs HAProxy",
                "vs nginx, lb at 0 user cpu"
            ],
            &ratio_rows
        )
    );
    let wire: Vec<Vec<String>> = figures
        .iter()
        .filter_map(|(name, m)| {
            let w = m.get("http")?.wire.as_ref()?;
            let ms = |v: [f64; 3]| v.map(|x| format!("{x:.2}")).join(" / ");
            let dropped = w.dropped.map_or_else(|| "?".to_owned(), |d| d.to_string());
            Some(vec![
                name.clone(),
                ms(w.at_proxy_ms),
                ms(w.to_backend_ms),
                format!("{:.2}", w.client_p99_ms),
                format!("{} / {dropped}", w.paired),
            ])
        })
        .collect();
    if !wire.is_empty() {
        println!(
            "{}",
            table(
                &[
                    "HTTP/1.1 on the wire",
                    "at the proxy p50/p99/p99.9 ms",
                    "to the backend p50/p99/p99.9 ms",
                    "wrk p99 ms",
                    "paired / dropped",
                ],
                &wire
            )
        );
    }
    let mut note = String::new();
    let _ = write!(note, "targets: rps >= 1.0 x HAProxy and >= 1.2 x nginx; p99 <= HAProxy; cpu <= HAProxy");
    println!("{note}");
    drop(lbd);
    Ok(Report {
        seconds: opts.seconds,
        rounds: opts.rounds,
        connections: opts.connections,
        selection,
        proxies: figures,
        lb_ratios,
        targets: "rps >= 1.0 x HAProxy and >= 1.2 x nginx, p99 <= HAProxy, CPU per request <= HAProxy",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_run_until_enough_were_quiet_and_the_quietest_count() {
        let opts = Options { rounds: 3, max_rounds: 5, ..Options::default() };
        assert!(!enough(&[0.0, 0.2, 0.01], opts), "two quiet of three");
        assert!(enough(&[0.0, 0.2, 0.01, 0.03], opts), "three quiet (3 % is quiet)");
        assert!(enough(&[0.5, 0.2, 0.1, 0.3, 0.4], opts), "five run: no more");
        assert!(enough(&[0.0, 0.0, 0.0], opts));
        assert_eq!(quietest(&[0.5, 0.2, 0.1, 0.3, 0.4], 3), [1, 2, 3]);
        assert_eq!(quietest(&[0.0, 0.01], 3), [0, 1], "fewer run than wanted: all");
        // lb half as fast in two rounds of three (the host's speed differing between them),
        // twice in the third: paired 0.5, where the ratio of the medians would say 0.8.
        let (lb, other) = ([10.0, 20.0, 50.0], [20.0, 40.0, 25.0]);
        assert!((paired(&lb, &other) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn the_ceiling_without_user_space_takes_out_lbs_user_time_only() {
        // Per 1M requests, one round: lb 22 (7 user) + backend 10 + client 11 = 43, nginx 20
        // (5 user) + 9 + 11 = 40. Without its user time lb costs 36: 40 / 36 of nginx's
        // requests/s.
        let fig = |cpu: f64, user: f64, backend: f64, client: f64| Figure {
            cpu: vec![cpu],
            user: vec![user],
            backend: vec![backend],
            client: vec![client],
            ..Figure::default()
        };
        let r = without_user_cpu(&fig(22.0, 7.0, 10.0, 11.0), &fig(20.0, 5.0, 9.0, 11.0));
        assert!((r - 40.0 / 36.0).abs() < 1e-12, "{r}");
    }

    #[test]
    fn wrk_and_h2load_output_is_read() {
        let wrk = "Running 5s test @ http://10.0.0.1:8000/
  2 threads and 32 connections
  Latency Distribution
     50%  812.00us
     75%    1.20ms
     90%    2.00ms
     99%   10.50ms
  101234 requests in 5.00s, 12.3MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  20246.80
";
        let r = parse_wrk(wrk).unwrap();
        assert!((r.rps - 20246.8).abs() < 1e-6 && (r.requests - 101_234.0).abs() < 1e-6);
        assert!((r.p50_ms - 0.812).abs() < 1e-9 && (r.p99_ms - 10.5).abs() < 1e-9);
        assert_eq!(r.errors, 7);
        let h2 = "finished in 5.00s, 12345.60 req/s, 1.20MB/s
requests: 61728 total, 61728 started, 61728 done, 61726 succeeded, 2 failed, 0 errored, 0 timeout
";
        let log = "1\t200\t1000\n2\t200\t3000\n3\t200\t2000\n";
        let r = parse_h2load(h2, log).unwrap();
        assert!((r.rps - 12345.6).abs() < 1e-6);
        assert_eq!(r.errors, 2);
        assert!((r.p50_ms - 2.0).abs() < 1e-9 && (r.p99_ms - 3.0).abs() < 1e-9);
    }
}
