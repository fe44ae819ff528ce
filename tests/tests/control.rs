//! The control plane with real processes and real traffic: health checks take a killed backend
//! out of the table and bring it back; an invalid registry keeps the last good one serving
//! and is reported; operator drains, lookups and rollouts, all under client load.

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{
    clients::payload,
    lbd::{Lbd, TempDir, admin, all_checked, backend_status, lb_ctl, status, wait_status},
    netns::NetNs,
    privileged,
    servers::{Ports, Servers},
    topology::{DsrTopology, VIP, backend_ip},
    unique_prefix,
};

const ECHO: u16 = 7;
const PORTS: Ports = Ports { http: 80, echo: &[ECHO] };
/// Health check timing of the tests' registries.
const INTERVAL: Duration = Duration::from_millis(200);
const FALL: u32 = 3;
const RISE: u32 = 2;
/// Bound on the load loops.
const MAX_EXCHANGES: usize = 20_000;
const MAX_LOAD_TIME: Duration = Duration::from_secs(90);
const IO_TIMEOUT: Duration = Duration::from_secs(3);

fn identity(i: usize) -> String {
    format!("{}:{ECHO}", backend_ip(i))
}

fn registry(backends: &[usize]) -> String {
    let mut list = String::new();
    for &i in backends {
        let _ = writeln!(list, "      - {{host: {}, port: {ECHO}}}", backend_ip(i));
    }
    format!(
        "version: 1\ntcp:\n  echo:\n    vip: {VIP}\n    port: {ECHO}\n    health: {{interval: {}ms, timeout: 150ms, fall: {FALL}, rise: {RISE}}}\n    backends:\n{list}",
        INTERVAL.as_millis()
    )
}

fn echo_addr() -> SocketAddr {
    SocketAddr::from((VIP, ECHO))
}

/// One TCP echo exchange that reports failure rather than panic.
fn try_exchange(data: &[u8]) -> Result<(), String> {
    let mut s = TcpStream::connect_timeout(&echo_addr(), IO_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT)).map_err(|e| e.to_string())?;
    s.write_all(data).map_err(|e| format!("send: {e}"))?;
    s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
    if back == data {
        Ok(())
    } else {
        Err(format!("echo of {} bytes came back as {}", data.len(), back.len()))
    }
}

/// Which backends (indexes into `servers`) received payloads starting with `tag`.
fn receivers(servers: &[Option<Servers>], tag: &str) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        if let Some(s) = s {
            let n = s.served.tcp_received().iter().filter(|r| r.data.starts_with(tag.as_bytes())).count();
            out.extend(std::iter::repeat_n(i, n));
        }
    }
    out
}

/// A client loop of short TCP echo exchanges in the client namespace, recording when each
/// ended and whether it failed. Bounded in count and time.
/// When each exchange ended, and how.
type Results = Vec<(Instant, Result<(), String>)>;

struct Load {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Results>>,
    thread: Option<JoinHandle<()>>,
}

impl Load {
    fn start(client: &NetNs, tag: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let (s, r, tag) = (stop.clone(), results.clone(), tag.to_owned());
        let thread = client.spawn("load", move || {
            let start = Instant::now();
            for i in 0..MAX_EXCHANGES {
                if s.load(Ordering::Relaxed) || start.elapsed() > MAX_LOAD_TIME {
                    break;
                }
                let res = try_exchange(&payload(&tag, i, 200));
                r.lock().expect("lock").push((Instant::now(), res));
            }
        });
        Self { stop, results, thread: Some(thread) }
    }

    fn count(&self) -> usize {
        self.results.lock().expect("lock").len()
    }

    /// Waits until `n` more exchanges have ended.
    fn wait_more(&self, n: usize) {
        let target = self.count() + n;
        let start = Instant::now();
        while self.count() < target {
            assert!(start.elapsed() < MAX_LOAD_TIME, "the load loop stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(mut self) -> Results {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("load thread");
        }
        std::mem::take(&mut *self.results.lock().expect("lock"))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A long-lived TCP connection to the echo service, opened in the client namespace.
struct Stream(TcpStream);

impl Stream {
    fn open(client: &NetNs) -> Self {
        let s = client.run(|| TcpStream::connect_timeout(&echo_addr(), IO_TIMEOUT)).expect("connect");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        Self(s)
    }

    fn port(&self) -> u16 {
        self.0.local_addr().expect("addr").port()
    }

    /// One round trip; `Err` when the connection broke.
    fn echo(&mut self, round: usize) -> Result<(), String> {
        let data = payload("stream", round, 100);
        self.0.write_all(&data).map_err(|e| e.to_string())?;
        let mut back = vec![0; data.len()];
        self.0.read_exact(&mut back).map_err(|e| e.to_string())?;
        if back == data { Ok(()) } else { Err("corrupted echo".into()) }
    }
}

/// The backend lbd says a stream's flow goes to, by `lb-ctl lookup`.
fn looked_up(ns: &NetNs, stream: &Stream) -> serde_json::Value {
    let src = format!("{}:{}", lb_tests::topology::CLIENT_IP, stream.port());
    let dst = echo_addr().to_string();
    let (code, out, err) = lb_ctl(ns, &["lookup", "--src", &src, "--dst", &dst]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("lookup JSON")
}

/// How many of `streams` are tracked to a backend other than their table slot's, read until
/// some are or 5 s pass. Each must be found through conntrack.
fn moved_slots(lb: &NetNs, streams: &[Stream]) -> usize {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let mut moved = 0;
        for st in streams {
            let found = looked_up(lb, st);
            assert!(found["why"].as_str().unwrap().starts_with("conntrack"), "{found:#}");
            moved += usize::from(found["backend"] != found["table_backend"]);
        }
        if moved > 0 || Instant::now() > until {
            return moved;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn health(ns: &NetNs, i: usize) -> String {
    backend_status(&status(ns), "echo", &identity(i))
        .map(|b| b["health"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default()
}

/// Waits until backends `0..n` of `echo` pass their checks.
fn wait_all_up(lb: &NetNs, n: usize) {
    wait_status(lb, "every backend up", |st| {
        (0..n).all(|i| backend_status(st, "echo", &identity(i)).is_some_and(|b| b["health"] == "up"))
    });
}

struct Setup {
    topo: DsrTopology,
    servers: Vec<Option<Servers>>,
    dir: TempDir,
}

/// `backends` hosts with servers, and lbd serving `serving` of them with `extra` flags, once
/// each has had its first health check. Returns the registry's path too.
fn setup(tag: &str, backends: usize, serving: &[usize], extra: &[&str]) -> (Setup, std::path::PathBuf, Lbd) {
    let topo = DsrTopology::new(&unique_prefix(tag), backends);
    let servers = (topo.backends.iter().enumerate())
        .map(|(i, b)| {
            Some(Servers::start(&b.ns, &format!("backend-{}", i + 1), PORTS, &[b.ip.into(), VIP.into()]))
        })
        .collect();
    let dir = TempDir::new(tag);
    let reg = dir.write("services.yaml", &registry(serving));
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", extra);
    wait_status(&topo.lb.ns, "first checks", all_checked);
    (Setup { topo, servers, dir }, reg, lbd)
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told in order")]
fn a_killed_backend_leaves_within_interval_times_fall_and_returns_after_rise() {
    if !privileged("a_killed_backend_leaves_within_interval_times_fall_and_returns_after_rise") {
        return;
    }
    let (mut s, _, lbd) = setup("hc-kill", 3, &[0, 1, 2], &[]);
    let lb = &s.topo.lb.ns;
    wait_all_up(lb, 3);

    // Long-lived streams; lbd's lookup says where each went (checked against the servers at
    // the end).
    let mut streams: Vec<(Stream, usize)> = (0..9)
        .map(|_| {
            let mut st = Stream::open(&s.topo.client.ns);
            st.echo(0).expect("first echo");
            let found = looked_up(lb, &st);
            assert!(found["why"].as_str().unwrap().starts_with("conntrack"), "{found:#}");
            let b = (0..3).find(|&i| found["backend"] == identity(i)).expect("a backend");
            (st, b)
        })
        .collect();
    let victim = streams[0].1;
    let load = Load::start(&s.topo.client.ns, "load");
    load.wait_more(50);

    // Kill the victim's servers (its listener and connections).
    let killed = Instant::now();
    drop(s.servers[victim].take());
    wait_status(lb, "the victim marked down", |st| {
        backend_status(st, "echo", &identity(victim)).is_some_and(|b| b["health"] == "down")
    });
    let to_down = killed.elapsed();
    let bound = INTERVAL * FALL + INTERVAL + Duration::from_secs(1);
    assert!(to_down <= bound, "down after {to_down:?}; interval x fall is {:?}", INTERVAL * FALL);
    let down_at = Instant::now();
    let metrics = admin(lb, "GET", "/metrics", None).body;
    let up_line =
        format!("lb_backend_up{{service=\"echo\",backend=\"{}\",role=\"primary\"}} 0", identity(victim));
    assert!(metrics.contains(&up_line), "{metrics}");
    let st = status(lb);
    let b = backend_status(&st, "echo", &identity(victim)).unwrap();
    assert_eq!(b["table_weight"], 0, "{b:#}");
    load.wait_more(200);

    // Streams on the other backends never noticed.
    for (round, (st, b)) in streams.iter_mut().enumerate().filter(|(_, (_, b))| *b != victim) {
        st.echo(round + 1).unwrap_or_else(|e| panic!("a stream on backend {b} broke: {e}"));
    }

    // Back: servers restarted; up again after `rise` successes, and new flows reach it.
    let t = &s.topo.backends[victim];
    s.servers[victim] = Some(Servers::start(&t.ns, "backend-again", PORTS, &[t.ip.into(), VIP.into()]));
    let restarted = Instant::now();
    wait_status(lb, "the victim up again", |st| {
        backend_status(st, "echo", &identity(victim)).is_some_and(|b| b["health"] == "up")
    });
    assert!(
        restarted.elapsed() <= INTERVAL * RISE + INTERVAL + Duration::from_secs(1),
        "up after {:?}",
        restarted.elapsed()
    );
    load.wait_more(200);
    let results = load.finish();
    let after_down: Vec<String> = (results.iter().filter(|(t, _)| *t > down_at))
        .filter_map(|(t, r)| {
            r.as_ref().err().map(|e| format!("{e} at {:?} after the kill", t.duration_since(killed)))
        })
        .collect();
    eprintln!(
        "down seen at {:?}, restarted at {:?}",
        down_at.duration_since(killed),
        restarted.duration_since(killed)
    );
    assert!(
        after_down.is_empty(),
        "{} exchanges failed after the backend left the table: {:?}\n{}",
        after_down.len(),
        &after_down[..after_down.len().min(5)],
        admin(lb, "GET", "/metrics", None)
            .body
            .lines()
            .filter(|l| l.starts_with("lb_datapath_events_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let back_on_victim = receivers(&s.servers, "load").iter().filter(|&&i| i == victim).count();
    assert!(back_on_victim > 0, "the returned backend takes new flows again");
    let (ok, failed) =
        results.iter().fold((0, 0), |(o, f), (_, r)| if r.is_ok() { (o + 1, f) } else { (o, f + 1) });
    eprintln!(
        "load: {ok} exchanges ok, {failed} failed (all before the backend was marked down, {to_down:?} after the kill)"
    );

    // Lookups matched where the streams really were.
    for (round, (st, b)) in streams.iter_mut().enumerate().filter(|(_, (_, b))| *b != victim) {
        st.echo(round + 100).expect("stream still whole");
        let port = st.port();
        st.0.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let mut rest = Vec::new();
        let _ = st.0.read_to_end(&mut rest);
        let holder =
            s.servers[*b].as_ref().unwrap().served.tcp_received().iter().any(|r| r.peer.port() == port);
        assert!(holder, "lookup said backend {b} holds the stream from port {port}");
    }
    let (code, out, _) = lb_ctl(lb, &["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("echo") && out.contains(" up "), "{out}");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(
        stopped.log.contains("event=\"health\"") || stopped.log.contains("backend down"),
        "{}",
        stopped.log
    );
}

#[test]
fn an_invalid_registry_keeps_the_last_good_one_serving_and_is_reported() {
    if !privileged("an_invalid_registry_keeps_the_last_good_one_serving_and_is_reported") {
        return;
    }
    let (s, reg, lbd) = setup("bad-reg", 3, &[0, 1], &[]);
    let lb = &s.topo.lb.ns;

    // An unknown key on line 9, written over the good file: the watcher reloads, and fails.
    let broken = registry(&[0, 1]).replace("      - {host: 10.10.0.12", "      - {hots: 10.10.0.12");
    std::fs::write(&reg, &broken).expect("write");
    assert_eq!(lbd.wait_reload(), "reload failed", "{}", lbd.log());
    s.topo.client.ns.run(|| {
        for i in 0..20 {
            try_exchange(&payload("old", i, 100)).expect("the old registry keeps serving");
        }
    });
    assert!(!receivers(&s.servers, "old").contains(&2));
    let (code, out, err) = lb_ctl(lb, &["status"]);
    assert_eq!(code, 0, "{err}");
    let place = format!("{}:9:10: field `tcp.echo.backends[1].hots`", reg.display());
    assert!(out.contains("FAILED") && out.contains(&place), "{out}");
    let metrics = admin(lb, "GET", "/metrics", None).body;
    assert!(metrics.contains("lb_config_last_reload_success 0"), "{metrics}");
    assert!(
        metrics
            .contains(&format!("lb_config_error_info{{file=\"{}\",line=\"9\",column=\"10\"", reg.display())),
        "{metrics}"
    );
    assert!(metrics.contains("lb_config_reloads_total{result=\"failure\"} 1"), "{metrics}");
    assert_eq!(status(lb)["generation"], 1);

    // A good file: live, generation 2, and the new backend takes flows once checked.
    std::fs::write(&reg, registry(&[0, 1, 2])).expect("write");
    assert_eq!(lbd.wait_reload(), "reloaded", "{}", lbd.log());
    assert_eq!(status(lb)["generation"], 2);
    wait_status(lb, "the new backend's first check", all_checked);
    s.topo.client.ns.run(|| {
        for i in 0..60 {
            try_exchange(&payload("new", i, 100)).expect("exchange");
        }
    });
    assert!(receivers(&s.servers, "new").contains(&2), "the added backend takes flows");
    assert!(admin(lb, "GET", "/metrics", None).body.contains("lb_config_last_reload_success 1"));

    // lb-ctl config apply: validated, written over the registry atomically, live.
    let next = s.dir.write("next.yaml", &registry(&[2]));
    let (code, out, err) = lb_ctl(lb, &["config", "apply", "--file", next.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("applied: generation 3"), "{out}");
    assert_eq!(std::fs::read_to_string(&reg).unwrap(), registry(&[2]));
    let bad = s.dir.write("bad.yaml", &broken);
    let (code, _, err) = lb_ctl(lb, &["config", "apply", "--file", bad.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(&format!("{}:9:10", bad.display())), "{err}");
    let (code, out, err) = lb_ctl(lb, &["config", "apply", "--validate", "--file", next.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.ends_with("lbd accepts it (not applied)\n"), "{out}");
    assert_eq!(status(lb)["generation"], 3);
    s.topo.client.ns.run(|| {
        for i in 0..20 {
            try_exchange(&payload("last", i, 100)).expect("exchange");
        }
    });
    assert_eq!(receivers(&s.servers, "last"), vec![2; 20]);
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}

#[test]
fn drains_keep_long_lived_flows_and_rollouts_lose_no_request() {
    if !privileged("drains_keep_long_lived_flows_and_rollouts_lose_no_request") {
        return;
    }
    let (s, reg, lbd) = setup("rollout", 3, &[0, 1], &["--resolve-timeout", "1s"]);
    let lb = &s.topo.lb.ns;

    // Drain the backend holding a long-lived stream: the stream goes on, new flows avoid it.
    let mut stream = Stream::open(&s.topo.client.ns);
    stream.echo(0).expect("echo");
    let found = looked_up(lb, &stream);
    let held = (0..2).find(|&i| found["backend"] == identity(i)).expect("a backend");
    let (code, out, err) = lb_ctl(lb, &["backend", "drain", "echo", &identity(held)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("drained"), "{out}");
    s.topo.client.ns.run(|| {
        for i in 0..30 {
            try_exchange(&payload("drained", i, 100)).expect("exchange");
        }
    });
    assert!(!receivers(&s.servers, "drained").contains(&held), "a drained backend takes no new flows");
    for round in 1..20 {
        stream.echo(round).expect("the drained backend's stream goes on");
    }
    let st = status(lb);
    assert_eq!(backend_status(&st, "echo", &identity(held)).unwrap()["drained"], true);
    let (code, _, err) = lb_ctl(lb, &["backend", "drain", "echo", "10.9.9.9:7"]);
    assert_eq!(code, 3, "an unknown backend: {err}");
    let (code, _, err) = lb_ctl(lb, &["backend", "enable", "echo", &identity(held)]);
    assert_eq!(code, 0, "{err}");
    drop(stream);

    // Roll the service from backends 0 and 1 to backend 2 under load: no request fails.
    let load = Load::start(&s.topo.client.ns, "roll");
    load.wait_more(50);
    let (code, out, err) = lb_ctl(
        lb,
        &[
            "rollout",
            "start",
            "--service",
            "echo",
            "--new-backends",
            &identity(2),
            "--batch-size",
            "1",
            "--interval",
            "300ms",
            "--health-timeout",
            "10s",
        ],
    );
    assert_eq!(code, 0, "{out}{err}\n{}", lbd.log());
    load.wait_more(50);
    let results = load.finish();
    let failed: Vec<&String> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rollout: {:?}",
        failed.len(),
        results.len(),
        &failed[..failed.len().min(5)]
    );
    let st = status(lb);
    let now: Vec<&str> = st["services"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backend"].as_str().unwrap())
        .collect();
    assert_eq!(now, vec![identity(2).as_str()], "{out}");
    eprintln!("rollout: {} requests, none failed", results.len());

    // A rollout to a backend that never gets healthy is aborted and the registry restored.
    let dead = format!("{}:{ECHO}", backend_ip(5));
    let before = std::fs::read_to_string(&reg).unwrap();
    let (code, _, err) = lb_ctl(
        lb,
        &[
            "rollout",
            "start",
            "--service",
            "echo",
            "--new-backends",
            &dead,
            "--interval",
            "100ms",
            "--health-timeout",
            "2s",
        ],
    );
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("rollout aborted, registry restored"), "{err}");
    assert_eq!(std::fs::read_to_string(&reg).unwrap(), before);
    s.topo.client.ns.run(|| try_exchange(&payload("after", 0, 100))).expect("serving after the abort");
    assert_eq!(health(lb, 2), "up");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}

#[test]
fn a_backend_whose_mac_changes_is_followed_without_a_reload() {
    if !privileged("a_backend_whose_mac_changes_is_followed_without_a_reload") {
        return;
    }
    let (s, _, lbd) = setup("neigh", 2, &[0, 1], &[]);
    let lb = &s.topo.lb.ns;

    // Backend 0's interface gets a new MAC (a replaced NIC, a moved VM), and the lb node learns
    // it the way ARP would tell it.
    let new_mac = "02:00:0a:0a:00:63";
    s.topo.backends[0].ns.ip(&["link", "set", "eth0", "address", new_mac]);
    let ip = backend_ip(0).to_string();
    lb.ip(&["neigh", "replace", &ip, "lladdr", new_mac, "dev", "eth0", "nud", "reachable"]);
    wait_status(lb, "the new MAC in backend 0's record", |st| {
        backend_status(st, "echo", &identity(0)).is_some_and(|b| b["next_hop_mac"] == new_mac)
    });
    backend_0_reached_without_a_reload(&s, lbd, "moved", "at its new MAC");
}

/// 40 exchanges work and backend 0 takes some; lbd followed the change without a reload.
fn backend_0_reached_without_a_reload(s: &Setup, lbd: Lbd, tag: &str, how: &str) {
    s.topo.client.ns.run(|| {
        for i in 0..40 {
            try_exchange(&payload(tag, i, 100)).unwrap_or_else(|e| panic!("an exchange failed {how}: {e}"));
        }
    });
    assert!(receivers(&s.servers, tag).contains(&0), "backend 0 is reached {how}");
    assert_eq!(status(&s.topo.lb.ns)["generation"], 1, "no reload was needed");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(stopped.log.contains("backend next hops changed"), "{}", stopped.log);
}

#[test]
fn a_backend_whose_route_changes_is_followed_without_a_reload() {
    if !privileged("a_backend_whose_route_changes_is_followed_without_a_reload") {
        return;
    }
    let (s, _, lbd) = setup("route", 2, &[0, 1], &[]);
    let lb = &s.topo.lb.ns;
    let own = lb_tests::topology::mac_str(s.topo.backends[0].mac);
    let gateway = lb_tests::topology::mac_str(s.topo.backends[1].mac);
    let next_hop_of_0 =
        |st: &serde_json::Value| backend_status(st, "echo", &identity(0)).map(|b| b["next_hop_mac"].clone());
    wait_status(lb, "backend 0 reached directly", |st| next_hop_of_0(st).is_some_and(|m| m == own.as_str()));

    // The operator routes backend 0 through backend 1 (a router, here): its frames now go to
    // that MAC. Nothing but the route changed, so only following routes can notice.
    let ip0 = backend_ip(0).to_string();
    lb.ip(&["route", "add", &format!("{ip0}/32"), "via", &backend_ip(1).to_string(), "dev", "eth0"]);
    wait_status(lb, "backend 0's next hop is the gateway", |st| {
        next_hop_of_0(st).is_some_and(|m| m == gateway.as_str())
    });
    lb.ip(&["route", "del", &format!("{ip0}/32")]);
    wait_status(lb, "backend 0 reached directly again", |st| {
        next_hop_of_0(st).is_some_and(|m| m == own.as_str())
    });
    backend_0_reached_without_a_reload(&s, lbd, "routed", "directly again");
}

/// Id of the XDP program on `iface`, as `ip link` shows it.
fn xdp_prog_id(ns: &NetNs, iface: &str) -> Option<u32> {
    let out = ns.ip_output(&["-d", "link", "show", "dev", iface]);
    let at = out.find("prog/xdp id ")? + "prog/xdp id ".len();
    out[at..].split_whitespace().next()?.parse().ok()
}

/// Tag (hash of the instructions) of the XDP program on `iface`, as `ip link` shows it.
fn xdp_prog_tag(ns: &NetNs, iface: &str) -> String {
    let out = ns.ip_output(&["-d", "link", "show", "dev", iface]);
    let at = out.find(" tag ").unwrap_or_else(|| panic!("no program tag on {iface}: {out}")) + " tag ".len();
    out[at..].split_whitespace().next().unwrap_or_default().to_owned()
}

/// Every stream echoes once more, each still on the backend that holds its flow.
fn streams_whole(streams: &mut [Stream], round: usize, when: &str) {
    for (i, st) in streams.iter_mut().enumerate() {
        st.echo(round).unwrap_or_else(|e| panic!("stream {i} broke {when}: {e}"));
    }
}

#[test]
fn lbd_restarts_under_load_without_breaking_a_flow_and_refuses_state_it_cannot_reuse() {
    if !privileged("lbd_restarts_under_load_without_breaking_a_flow_and_refuses_state_it_cannot_reuse") {
        return;
    }
    let keep = ["--on-exit", "keep"];
    let (s, reg, lbd) = setup("restart", 3, &[0, 1, 2], &keep);
    let lb = &s.topo.lb.ns;
    wait_all_up(lb, 3);
    let pins = s.dir.pin_dir().join(format!("eth0/v{}", lb_common::maps::MAP_LAYOUT_VERSION));
    assert!(pins.join("link").exists() && pins.join("LB_CONNTRACK").exists(), "state pinned in {pins:?}");
    let mut streams: Vec<Stream> = (0..12).map(|_| Stream::open(&s.topo.client.ns)).collect();
    streams_whole(&mut streams, 0, "at once");
    let load = Load::start(&s.topo.client.ns, "load");
    load.wait_more(50);
    let first_prog = xdp_prog_id(lb, "eth0").expect("a program on eth0");

    // 1. Stopped: the balancer keeps forwarding without lbd.
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(stopped.log.contains("left attached"), "{}", stopped.log);
    assert_eq!(xdp_prog_id(lb, "eth0"), Some(first_prog), "the program stays while no lbd runs");
    load.wait_more(100);
    streams_whole(&mut streams, 1, "while no lbd ran");

    // 2. Started again, with a registry that moves table slots to backend 0: it adopts the
    //    state and swaps its own program in behind the link. Streams whose slot moved stay
    //    with their backend only because their tracked flows were adopted.
    let plain = format!("{{host: {}, port: {ECHO}}}", backend_ip(0));
    let heavy = format!("{{host: {}, port: {ECHO}, weight: 5}}", backend_ip(0));
    std::fs::write(&reg, registry(&[0, 1, 2]).replacen(&plain, &heavy, 1)).expect("write registry");
    let lbd = Lbd::start(lb, &s.dir, &reg, "eth0", &keep);
    let log = lbd.log();
    assert!(log.contains("adopted the pinned state"), "{log}");
    assert!(log.contains("swapped in behind the pinned link"), "{log}");
    let second_prog = xdp_prog_id(lb, "eth0").expect("a program on eth0");
    assert_ne!(second_prog, first_prog, "the new lbd's program serves");
    load.wait_more(100);
    streams_whole(&mut streams, 2, "across a restart");
    // Every stream's flow is still tracked to the backend that holds it. The new weights are
    // in the tables once the new lbd has checked its backends: read until a slot has moved
    // (4 to 7 of 12 do), or 5 s pass.
    wait_all_up(lb, 3);
    let moved = moved_slots(lb, &streams);
    assert!(moved > 0, "some stream's slot moved to another backend (else this proves nothing)");
    eprintln!("{moved} of {} streams kept their backend through adopted conntrack entries", streams.len());

    // 3. Killed outright (no clean stop), then started again.
    let killed = lbd.stop(libc::SIGKILL);
    assert!(!killed.status.success());
    load.wait_more(50);
    let lbd = Lbd::start(lb, &s.dir, &reg, "eth0", &keep);
    assert!(lbd.log().contains("adopted the pinned state"), "{}", lbd.log());
    load.wait_more(100);
    streams_whole(&mut streams, 3, "across a crash and restart");

    // 4. State this lbd cannot reuse is refused with instructions, and nothing is touched: a
    //    conntrack map of another size, and state of another layout version.
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    let resized =
        Lbd::run_to_exit(lb, &s.dir, &reg, "eth0", &["--on-exit", "keep", "--conntrack-size", "4096"]);
    assert_eq!(resized.status.code(), Some(1), "{}", resized.log);
    assert!(resized.log.contains("LB_CONNTRACK differs from this lbd's: max entries"), "{}", resized.log);
    assert!(resized.log.contains("--conntrack-size"), "{}", resized.log);
    let old_layout = s.dir.pin_dir().join("eth0/v0");
    std::fs::create_dir(&old_layout).expect("mkdir in bpffs");
    let other = Lbd::run_to_exit(lb, &s.dir, &reg, "eth0", &keep);
    assert_eq!(other.status.code(), Some(1), "{}", other.log);
    let ours = format!("map layout v0; this lbd uses layout v{}", lb_common::maps::MAP_LAYOUT_VERSION);
    assert!(other.log.contains(&ours), "{}", other.log);
    assert!(other.log.contains("lbd --unpin --iface eth0"), "{}", other.log);
    std::fs::remove_dir(&old_layout).expect("rmdir in bpffs");
    assert!(pins.join("link").exists(), "refused starts leave the pinned state alone");
    load.wait_more(50);
    streams_whole(&mut streams, 4, "while refused lbds came and went");

    // 5. And a good one adopts it again.
    let lbd = Lbd::start(lb, &s.dir, &reg, "eth0", &keep);
    load.wait_more(100);
    streams_whole(&mut streams, 5, "after the last restart");
    let results = load.finish();
    let failed: Vec<&String> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    eprintln!(
        "load: {} exchanges across stops, restarts and a crash, {} failed",
        results.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{} exchanges failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    let served: std::collections::BTreeSet<usize> = receivers(&s.servers, "load").into_iter().collect();
    assert_eq!(served.len(), 3, "every backend took flows: {served:?}");

    // 6. `lbd --unpin` refuses while lbd runs, then removes the state and the program.
    let unpin = |ns: &NetNs| {
        let out = ns
            .command(lb_tests::lbd::sibling_binary("lbd"))
            .args(["--unpin", "--iface", "eth0", "--pin-dir"])
            .arg(s.dir.pin_dir())
            .output()
            .expect("run lbd --unpin");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = unpin(lb);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("another lbd serves `eth0`"), "{err}");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    let (code, err) = unpin(lb);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(xdp_prog_id(lb, "eth0"), None, "unpinning detaches the balancer");
    assert!(!s.dir.pin_dir().join("eth0").exists());
}

#[test]
fn lbd_upgraded_to_a_rebuilt_program_under_load_keeps_every_flow() {
    let name = "lbd_upgraded_to_a_rebuilt_program_under_load_keeps_every_flow";
    if !privileged(name) {
        return;
    }
    // `cargo xtask test` builds the XDP object again with another revision stamp.
    let Some(rebuilt) = std::env::var_os("LB_TEST_UPGRADE_XDP_OBJECT") else {
        assert!(
            !lb_tests::under_ci(),
            "{name}: LB_TEST_UPGRADE_XDP_OBJECT unset; CI=true forbids skipping (run `cargo xtask test`)"
        );
        eprintln!("SKIPPED {name}: LB_TEST_UPGRADE_XDP_OBJECT unset (run `cargo xtask test`)");
        return;
    };
    let rebuilt = std::path::PathBuf::from(rebuilt);
    let keep = ["--on-exit", "keep"];
    let (s, reg, lbd) = setup("upgrade", 3, &[0, 1, 2], &keep);
    let lb = &s.topo.lb.ns;
    wait_all_up(lb, 3);
    let mut streams: Vec<Stream> = (0..12).map(|_| Stream::open(&s.topo.client.ns)).collect();
    streams_whole(&mut streams, 0, "at once");
    let load = Load::start(&s.topo.client.ns, "load");
    load.wait_more(50);
    let built_in = xdp_prog_tag(lb, "eth0");

    // The new lbd loads the rebuilt object and swaps it in behind the pinned link while the
    // old program keeps forwarding; then the same again back to the built-in program.
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    let mut upgrade = vec!["--xdp-object", rebuilt.to_str().expect("UTF-8 path")];
    upgrade.extend(keep);
    let lbd = Lbd::start(lb, &s.dir, &reg, "eth0", &upgrade);
    let log = lbd.log();
    assert!(log.contains("adopted the pinned state"), "{log}");
    assert!(log.contains("swapped in behind the pinned link"), "{log}");
    assert!(log.contains(&format!("object={}", rebuilt.display())), "{log}");
    let upgraded = xdp_prog_tag(lb, "eth0");
    assert_ne!(upgraded, built_in, "the rebuilt program, with other instructions, serves");
    assert!(log.contains(&format!("tag={upgraded}")), "lbd logs the tag it loaded: {log}");
    eprintln!("program tag {built_in} (built in) -> {upgraded} (rebuilt, revision stamp)");
    load.wait_more(100);
    streams_whole(&mut streams, 1, "across the upgrade");
    for st in &streams {
        let found = looked_up(lb, st);
        assert!(found["why"].as_str().unwrap().starts_with("conntrack"), "{found:#}");
    }

    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    let lbd = Lbd::start(lb, &s.dir, &reg, "eth0", &keep);
    assert_eq!(xdp_prog_tag(lb, "eth0"), built_in, "rolled back to the built-in program");
    load.wait_more(100);
    streams_whole(&mut streams, 2, "across the rollback");
    let results = load.finish();
    let failed: Vec<&String> = results.iter().filter_map(|(_, r)| r.as_ref().err()).collect();
    eprintln!("load: {} exchanges across an upgrade and a rollback, {} failed", results.len(), failed.len());
    assert!(failed.is_empty(), "{} exchanges failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);

    // An object that cannot be read is refused, and the running program stays.
    let missing = Lbd::run_to_exit(lb, &s.dir, &reg, "eth0", &["--xdp-object", "/nonexistent/lb-xdp"]);
    assert_eq!(missing.status.code(), Some(1), "{}", missing.log);
    assert!(missing.log.contains("cannot read /nonexistent/lb-xdp"), "{}", missing.log);
    assert_eq!(xdp_prog_tag(lb, "eth0"), built_in, "the balancer still serves");
}
