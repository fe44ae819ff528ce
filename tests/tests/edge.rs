//! The HTTP edge with real processes: lbd in its namespace with listeners from the registry,
//! keep-alive backends in theirs, and clients (curl, and a plain HTTP/1.1 client) in the
//! client namespace.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lb_tests::{
    http::{Client, HttpBackend, get},
    lbd::{Lbd, TempDir, backend_status, wait_status},
    privileged,
    process::{Spawned, wrk_summary},
    topology::{DsrTopology, VIP, backend_ip},
    unique_prefix,
};

const EDGE: u16 = 8000;
const OTHER: u16 = 9000;
const BACKEND: u16 = 8080;
/// One service on one backend, unchecked, behind the listener on [`EDGE`].
const ONE_SERVICE: &str = "version: 1
listeners:
  - port: 8000
http:
  example.org:
    backends: [{host: B0, port: 8080}]
    health: {enabled: false}
";

struct Setup {
    topo: DsrTopology,
    backends: Vec<Option<HttpBackend>>,
    dir: TempDir,
}

impl Setup {
    fn lb(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.topo.lb.ip, port))
    }

    /// Runs `f` in the client namespace.
    fn client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.topo.client.ns.run(f)
    }

    fn backend(&self, i: usize) -> &lb_tests::http::Backend {
        &self.backends[i].as_ref().expect("running").state
    }
}

/// `n` backend hosts serving HTTP, and lbd with `registry` (`B0`, `B1`... replaced by backend
/// addresses).
fn setup(tag: &str, n: usize, registry: &str) -> (Setup, Lbd) {
    let topo = DsrTopology::new(&unique_prefix(tag), n);
    let backends = (0..n)
        .map(|i| Some(HttpBackend::start(&topo.backends[i].ns, &format!("backend-{i}"), BACKEND)))
        .collect();
    let dir = TempDir::new(tag);
    let mut text = registry.to_owned();
    for i in (0..n).rev() {
        text = text.replace(&format!("B{i}"), &backend_ip(i).to_string());
    }
    let reg = dir.write("services.yaml", &text);
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    (Setup { topo, backends, dir }, lbd)
}

#[test]
#[expect(clippy::too_many_lines, reason = "one registry, every rule checked in turn")]
fn requests_are_routed_by_host_and_path_and_redirected() {
    if !privileged("requests_are_routed_by_host_and_path_and_redirected") {
        return;
    }
    let reg = "version: 1
listeners: [{port: 8000}, {port: 9000}]
http:
  example.org:
    backends: [{host: B0, port: 8080}]
  users:
    hosts: [api.example.org]
    paths: [/api/users]
    backends: [{host: B1, port: 8080}]
  products:
    hosts: [api.example.org]
    paths: [/api/products]
    listeners: [9000]
    backends: [{host: B2, port: 8080}]
  wild:
    hosts: ['*.apps.example.org']
    backends: [{host: B2, port: 8080}]
  www:
    hosts: [www.example.org]
    redirect: {strip_www: true}
  secure:
    hosts: [secure.example.org]
    redirect: {https: true, permanent: false}
";
    let (s, lbd) = setup("edge-route", 3, reg);
    let (edge, other) = (s.lb(EDGE), s.lb(OTHER));
    let got = |addr, host: &str, path: &str| {
        s.client(|| get(addr, host, path))
            .unwrap_or_else(|e| panic!("GET {host}{path} at {addr}: {e}\nlbd log:\n{}", lbd.log()))
    };

    assert_eq!(got(edge, "example.org", "/").body, "backend-0\n");
    assert_eq!(
        got(edge, "Example.ORG:8000", "/any/path?q=1").body,
        "backend-0\n",
        "host matched without case or port"
    );
    assert_eq!(got(edge, "api.example.org", "/api/users/7").body, "backend-1\n");
    assert_eq!(got(edge, "api.example.org", "/api/products").status, 404, "products is only on 9000");
    assert_eq!(got(other, "api.example.org", "/api/products/3").body, "backend-2\n");
    assert_eq!(got(edge, "x.apps.example.org", "/").body, "backend-2\n", "wildcard host");
    assert_eq!(got(edge, "apps.example.org", "/").status, 404, "a wildcard needs one more label");
    assert_eq!(got(edge, "unknown.org", "/").status, 404);

    let www = got(edge, "www.example.org:8000", "/a/b?c=d");
    assert_eq!(www.status, 301, "{www:?}");
    assert_eq!(www.header("location"), Some("http://example.org:8000/a/b?c=d"));
    let secure = got(edge, "secure.example.org", "/login");
    assert_eq!(secure.status, 302, "{secure:?}");
    assert_eq!(secure.header("location"), Some("https://secure.example.org/login"));

    // A real client, and what the backend learns about it.
    let out = s
        .topo
        .client
        .ns
        .command("curl")
        .args(["-sS", "-H", "Host: example.org", "-H", "X-Forwarded-For: 6.6.6.6"])
        .arg(format!("http://{edge}/curl"))
        .output()
        .expect("run curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "backend-0\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let head = s
        .backend(0)
        .heads
        .lock()
        .unwrap()
        .iter()
        .find(|h| h.starts_with("GET /curl"))
        .cloned()
        .expect("seen");
    let client = s.topo.client.ip.to_string();
    assert!(
        head.contains(&format!("x-forwarded-for: {client}\r\n")),
        "the client's own claim replaced: {head}"
    );
    assert!(
        head.contains("x-forwarded-proto: http\r\n") && head.contains("x-forwarded-host: example.org\r\n"),
        "{head}"
    );
    assert!(head.contains(&format!("forwarded: for={client};host=\"example.org\";proto=http\r\n")), "{head}");

    // A reload adds a listener and a route; a connection open across it keeps working.
    let mut kept = s.client(|| Client::connect(edge)).expect("connect");
    assert_eq!(s.client(|| kept.request("GET", "example.org", "/", "", "")).unwrap().status, 200);
    let added = format!(
        "{}  new:\n    hosts: [new.example.org]\n    listeners: [9100]\n    backends: [{{host: {}, port: 8080}}]\n",
        reg.replace("B0", &backend_ip(0).to_string())
            .replace("B1", &backend_ip(1).to_string())
            .replace("B2", &backend_ip(2).to_string())
            .replace("{port: 9000}]", "{port: 9000}, {port: 9100}]"),
        backend_ip(1)
    );
    s.dir.replace("services.yaml", &added);
    assert_eq!(lbd.wait_reload(), "reloaded", "{}", lbd.log());
    assert_eq!(
        s.client(|| kept.request("GET", "example.org", "/", "", "")).unwrap().status,
        200,
        "kept across the reload"
    );
    assert_eq!(got(s.lb(9100), "new.example.org", "/").body, "backend-1\n");
    // A listener that cannot bind (lbd's own admin port) fails the reload; the old one serves.
    s.dir.replace(
        "services.yaml",
        &added.replace("{port: 9100}]", "{port: 9100}, {port: 9180, address: 127.0.0.1}]"),
    );
    assert_eq!(lbd.wait_reload(), "reload failed", "{}", lbd.log());
    assert_eq!(got(s.lb(9100), "new.example.org", "/").body, "backend-1\n");
    let st = lb_tests::lbd::status(&s.topo.lb.ns);
    assert!(
        st["last_reload"]["error"].as_str().unwrap_or_default().contains("cannot listen on 127.0.0.1:9180"),
        "{st:#}"
    );

    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(
        stopped.log.contains("upstream=") && stopped.log.contains("status=200"),
        "access log lines: {}",
        stopped.log
    );
}

#[test]
fn keep_alive_is_reused_and_bad_slow_or_greedy_clients_are_refused() {
    if !privileged("keep_alive_is_reused_and_bad_slow_or_greedy_clients_are_refused") {
        return;
    }
    let reg = "version: 1
listeners:
  - port: 8000
    limits: {header_timeout: 1s, max_connections_per_ip: 4}
http:
  # No health probes: the backend's connection count is the edge's connections alone.
  example.org:
    backends: [{host: B0, port: 8080}]
    health: {enabled: false}
  capped.org:
    backends: [{host: B0, port: 8080}]
    pool: {max_connections: 1}
    health: {enabled: false}
";
    let (s, lbd) = setup("edge-conn", 1, reg);
    let edge = s.lb(EDGE);
    let before = s.backend(0).connections();
    s.client(|| {
        let mut c = Client::connect(edge).expect("connect");
        for i in 0..200 {
            let r = c.request("GET", "example.org", &format!("/{i}"), "", "").expect("answer");
            assert_eq!(r.status, 200);
        }
        for _ in 0..20 {
            assert_eq!(get(edge, "example.org", "/fresh").expect("answer").status, 200);
        }
    });
    let (requests, conns) = (s.backend(0).requests(), s.backend(0).connections() - before);
    eprintln!("keep-alive: 220 requests reached the backend over {conns} connection(s)");
    assert!(requests >= 220, "{requests}");
    // Reused, and closed after 100 requests each (seed 002's `keepalive_requests 100`).
    assert!((3..=4).contains(&conns), "pooled connections carry 100 requests each: {conns} for 220 requests");

    // max_connections 1: four clients at once share one backend connection, queued on it.
    let before = s.backend(0).connections();
    s.client(|| {
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    let mut c = Client::connect(edge).expect("connect");
                    for i in 0..20 {
                        let r = c.request("GET", "capped.org", &format!("/{i}"), "", "").expect("answer");
                        assert_eq!(r.status, 200);
                    }
                });
            }
        });
    });
    let conns = s.backend(0).connections() - before;
    assert_eq!(conns, 1, "80 requests from 4 clients at once over max_connections 1");

    s.client(|| {
        // Malformed request line: 400, closed.
        let mut c = Client::connect(edge).unwrap();
        c.send_raw(b"GARBAGE\r\n\r\n").unwrap();
        assert_eq!(c.read_reply(false).expect("an answer").status, 400);
        assert!(c.closed_within(Duration::from_secs(2)), "closed after 400");
        // A head over the 64 KiB default: 431, closed.
        let mut c = Client::connect(edge).unwrap();
        let big = format!("GET / HTTP/1.1\r\nhost: example.org\r\nx-big: {}\r\n\r\n", "a".repeat(70 * 1024));
        let _ = c.send_raw(big.as_bytes());
        assert_eq!(c.read_reply(false).expect("an answer").status, 431);
        assert!(c.closed_within(Duration::from_secs(2)), "closed after 431");
        // Slowloris: half a head, then nothing. 408 after the 1 s header timeout, closed.
        let mut c = Client::connect(edge).unwrap();
        let start = Instant::now();
        c.send_raw(b"GET / HTTP/1.1\r\nhost: example.org\r\nx-slow: 1").unwrap();
        assert_eq!(c.read_reply(false).expect("an answer").status, 408);
        let waited = start.elapsed();
        assert!(c.closed_within(Duration::from_secs(2)), "closed after 408");
        assert!(waited >= Duration::from_millis(900), "not before the header timeout: {waited:?}");
        // Four connections per client address; the fifth is refused with 429.
        let mut held: Vec<Client> = (0..4)
            .map(|_| {
                let mut c = Client::connect(edge).unwrap();
                assert_eq!(c.request("GET", "example.org", "/", "", "").unwrap().status, 200);
                c
            })
            .collect();
        let mut fifth = Client::connect(edge).unwrap();
        assert_eq!(fifth.read_reply(false).expect("an answer").status, 429);
        // Once one closes, a new one is admitted.
        drop(held.pop());
        let ok = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(20));
            get(edge, "example.org", "/").is_ok_and(|r| r.status == 200)
        });
        assert!(ok, "admitted again under the cap");
    });
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}

#[test]
fn client_connections_are_spread_evenly_over_the_edge_threads() {
    if !privileged("client_connections_are_spread_evenly_over_the_edge_threads") {
        return;
    }
    let (s, lbd) = setup("edge-spread", 1, ONE_SERVICE);
    let edge = s.lb(EDGE);
    let ns = &s.topo.lb.ns;
    let threads = lb_tests::lbd::edge_connections(ns).len();
    assert!(threads >= 1, "a gauge for each edge thread");
    // One at a time, each answered before the next: every one is placed knowing the others.
    // By the kernel's address hash alone, 16 split evenly one time in five.
    let clients: Vec<Client> = s.client(|| {
        (0..16)
            .map(|i| {
                let mut c = Client::connect(edge).expect("connect");
                let r = c.request("GET", "example.org", &format!("/{i}"), "", "").expect("answer");
                assert_eq!(r.status, 200);
                c
            })
            .collect()
    });
    let counts = lb_tests::lbd::edge_connections(ns);
    eprintln!("16 connections over {threads} edge thread(s): {counts:?}");
    assert_eq!(counts.iter().sum::<u64>(), 16, "{counts:?}");
    let (min, max) = (counts.iter().min(), counts.iter().max());
    assert!(
        max.zip(min).is_some_and(|(hi, lo)| hi - lo <= 1),
        "every thread within one of the others: {counts:?}"
    );
    // Each still serves its client, wherever it was placed.
    s.client(|| {
        for (i, mut c) in clients.into_iter().enumerate() {
            let r = c.request("GET", "example.org", &format!("/again/{i}"), "", "").expect("answer");
            assert_eq!(r.status, 200);
        }
    });
    // Closed connections are counted out.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lb_tests::lbd::edge_connections(ns).iter().sum::<u64>() > 0 {
        assert!(Instant::now() < deadline, "connections still counted open after their clients left");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}

#[test]
fn edge_threads_each_have_a_cpu_of_their_own_unless_told_not_to() {
    if !privileged("edge_threads_each_have_a_cpu_of_their_own_unless_told_not_to") {
        return;
    }
    let (s, lbd) = setup("edge-cpus", 1, ONE_SERVICE);
    let ns = &s.topo.lb.ns;
    let threads = lb_tests::lbd::edge_connections(ns).len();
    let (edge, process) = lb_tests::lbd::thread_cpus(lbd.pid(), "lb-edge-");
    eprintln!("lbd may use CPUs {process:?}; edge threads: {edge:?}");
    assert_eq!(edge.len(), threads, "one edge thread a gauge: {edge:?}");
    // One CPU each, every one lbd may use, in thread order.
    let bound: Vec<Vec<usize>> = edge.iter().map(|(_, c)| c.clone()).collect();
    let expected: Vec<Vec<usize>> = process.iter().take(threads).map(|&c| vec![c]).collect();
    assert_eq!(bound, expected, "edge threads bound one to a CPU");
    assert!(lbd.log().contains("edge threads bound to CPUs"), "{}", lbd.log());
    // Still serving.
    let r = s.client(|| get(s.lb(EDGE), "example.org", "/")).expect("an answer");
    assert_eq!(r.status, 200);
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);

    // Told not to: every edge thread may run on every CPU lbd may.
    let reg = s.dir.path().join("services.yaml");
    let lbd = Lbd::start(ns, &s.dir, &reg, "eth0", &["--no-edge-affinity"]);
    let (edge, process) = lb_tests::lbd::thread_cpus(lbd.pid(), "lb-edge-");
    assert_eq!(edge.len(), threads, "{edge:?}");
    assert!(edge.iter().all(|(_, c)| *c == process), "free edge threads: {edge:?}, lbd: {process:?}");
    let r = s.client(|| get(s.lb(EDGE), "example.org", "/")).expect("an answer");
    assert_eq!(r.status, 200);
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}

#[test]
fn requests_queued_at_the_connection_cap_share_the_connections_without_opening_more() {
    if !privileged("requests_queued_at_the_connection_cap_share_the_connections_without_opening_more") {
        return;
    }
    let reg = "version: 1
listeners:
  - port: 8000
http:
  example.org:
    backends: [{host: B0, port: 8080}]
    health: {enabled: false}
    # No cap on requests a connection: every new connection is one the queue made.
    pool: {max_connections: 4, max_requests: 0}
";
    let (s, lbd) = setup("edge-cap", 1, reg);
    let edge = s.lb(EDGE);
    // Slow enough answers that requests on both edge threads queue at the cap.
    s.backend(0).delay_ms.store(2, Ordering::Relaxed);
    let before = s.backend(0).connections();
    s.client(|| {
        std::thread::scope(|scope| {
            for t in 0..12 {
                scope.spawn(move || {
                    let mut c = Client::connect(edge).expect("connect");
                    for i in 0..40 {
                        let r =
                            c.request("GET", "example.org", &format!("/{t}/{i}"), "", "").expect("answer");
                        assert_eq!(r.status, 200);
                    }
                });
            }
        });
    });
    let conns = s.backend(0).connections() - before;
    eprintln!("480 requests from 12 clients over max_connections 4: {conns} backend connection(s)");
    assert!(s.backend(0).requests() >= 480);
    // A connection freed while others wait goes to a waiting request, on either thread: the
    // four opened first carry everything (closing and reopening them made 20-26).
    assert!(conns <= 4, "{conns} connections opened for 480 requests queued at a cap of 4");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}

/// Requests from `threads` keep-alive clients until `stop`; every reply's status and body.
fn load(
    s: &Setup,
    threads: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<(u16, String)>>> {
    let edge = s.lb(EDGE);
    (0..threads)
        .map(|t| {
            let stop = stop.clone();
            s.topo.client.ns.spawn("load", move || {
                let mut out = Vec::new();
                let deadline = Instant::now() + Duration::from_mins(1);
                let mut c: Option<Client> = None;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && out.len() < 50_000 {
                    let client = match c.as_mut() {
                        Some(c) => c,
                        None => match Client::connect(edge) {
                            Ok(new) => c.insert(new),
                            Err(e) => {
                                out.push((0, format!("connect: {e}")));
                                std::thread::sleep(Duration::from_millis(10));
                                continue;
                            }
                        },
                    };
                    match client.request("GET", "example.org", &format!("/load/{t}"), "", "") {
                        Ok(r) => out.push((r.status, r.body)),
                        Err(e) => {
                            out.push((0, e.to_string()));
                            c = None;
                        }
                    }
                }
                out
            })
        })
        .collect()
}

#[test]
fn backends_killed_under_load_cost_no_request_and_fallback_takes_over_and_hands_back() {
    if !privileged("backends_killed_under_load_cost_no_request_and_fallback_takes_over_and_hands_back") {
        return;
    }
    let reg = "version: 1
listeners: [{port: 8000}]
http:
  example.org:
    health: {interval: 200ms, timeout: 150ms, fall: 2, rise: 2}
    backends: [{host: B0, port: 8080}, {host: B1, port: 8080}]
    fallback: [{host: B2, port: 8080}]
";
    let (mut s, lbd) = setup("edge-fail", 3, reg);
    let lb = &s.topo.lb.ns;
    let id = |i: usize| format!("{}:{BACKEND}", backend_ip(i));
    let health = |i: usize| {
        move |st: &serde_json::Value| backend_status(st, "example.org", &id(i)).map(|b| b["health"].clone())
    };
    wait_status(lb, "primaries up", |st| {
        health(0)(st).is_some_and(|h| h == "up") && health(1)(st).is_some_and(|h| h == "up")
    });
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&s, 4, &stop);
    // And wrk's keep-alive connections, stopped (SIGINT: it prints its summary) at the end.
    let wrk = s
        .topo
        .client
        .ns
        .command("wrk")
        .args(["-t1", "-c8", "-d60s", "-H", "Host: example.org"])
        .arg(format!("http://{}/", s.lb(EDGE)))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wrk (cargo xtask test installs it)");
    let wrk = Spawned::new(wrk);
    let states: Vec<Arc<lb_tests::http::Backend>> =
        s.backends.iter().map(|b| b.as_ref().unwrap().state.clone()).collect();
    let wait_served = |i: usize, more: u64| {
        let b = &states[i];
        let target = b.requests() + more;
        let deadline = Instant::now() + Duration::from_secs(20);
        while b.requests() < target {
            assert!(Instant::now() < deadline, "backend {i} did not get {more} more requests");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_served(0, 100);
    wait_served(1, 100);

    // Kill backend 0: its connections die mid-request; retries and health take it out.
    drop(s.backends[0].take());
    wait_status(lb, "backend 0 down", |st| health(0)(st).is_some_and(|h| h == "down"));
    wait_served(1, 200);
    // Kill backend 1 too: every primary is down and the fallback takes the requests.
    drop(s.backends[1].take());
    wait_status(lb, "backend 1 down", |st| health(1)(st).is_some_and(|h| h == "down"));
    wait_served(2, 200);
    // Backend 0 returns: after `rise` checks the primaries take over again.
    s.backends[0] =
        Some(HttpBackend::start_with(&s.topo.backends[0].ns, "backend-0", BACKEND, states[0].clone()));
    wait_status(lb, "backend 0 up", |st| health(0)(st).is_some_and(|h| h == "up"));
    wait_served(0, 200);
    let fallback_before = states[2].requests();
    wait_served(0, 200);
    let fallback_after = states[2].requests();

    stop.store(true, Ordering::Relaxed);
    let out = wrk.interrupt();
    let (total, failures) = wrk_summary(&out).unwrap_or_else(|| panic!("wrk output:\n{out}"));
    eprintln!("wrk: {total} requests across two kills, fallback and hand-back");
    assert!(total > 1000, "{out}");
    assert!(!failures, "wrk saw failed requests:\n{out}");
    let replies: Vec<(u16, String)> =
        workers.into_iter().flat_map(|w| w.join().expect("load thread")).collect();
    let failed: Vec<&(u16, String)> = replies.iter().filter(|(st, _)| *st != 200).collect();
    eprintln!(
        "load: {} requests across two kills, fallback and hand-back; {} not 200",
        replies.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(5)]);
    assert_eq!(fallback_after, fallback_before, "the fallback takes nothing once a primary is back");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}

#[test]
fn retries_go_elsewhere_sessions_stick_and_least_conn_avoids_a_slow_one() {
    if !privileged("retries_go_elsewhere_sessions_stick_and_least_conn_avoids_a_slow_one") {
        return;
    }
    let reg = "version: 1
listeners: [{port: 8000}]
http:
  flaky.example.org:
    health: {enabled: false}
    passive: {failures: 0}
    backends: [{host: B0, port: 8080}, {host: B1, port: 8080}]
  passive.example.org:
    health: {enabled: false}
    backends: [{host: B0, port: 8080}, {host: B1, port: 8080}]
  slow.example.org:
    balance: least-conn
    backends: [{host: B2, port: 8080}, {host: B3, port: 8080}]
  sticky.example.org:
    balance: {hash: {cookie: session}}
    backends: [{host: B2, port: 8080}, {host: B3, port: 8080}]
";
    let (s, lbd) = setup("edge-retry", 4, reg);
    let edge = s.lb(EDGE);
    s.backend(0).status.store(503, Ordering::Relaxed);

    // GET: every 503 from backend 0 is retried on backend 1.
    let before = s.backend(0).requests();
    let gets: Vec<(u16, String)> = s.client(|| {
        let mut c = Client::connect(edge).unwrap();
        (0..20)
            .map(|_| c.request("GET", "flaky.example.org", "/", "", "").map(|r| (r.status, r.body)).unwrap())
            .collect()
    });
    assert!(gets.iter().all(|(st, b)| *st == 200 && b == "backend-1\n"), "{gets:?}");
    let tried_0 = s.backend(0).requests() - before;
    assert!(tried_0 >= 5, "round robin sent backend 0 its share first: {tried_0}");
    // POST is not idempotent: its 503 comes back as it is.
    let posts: Vec<u16> = s.client(|| {
        let mut c = Client::connect(edge).unwrap();
        (0..10).map(|_| c.request("POST", "flaky.example.org", "/", "", "payload").unwrap().status).collect()
    });
    assert!(posts.contains(&503) && posts.contains(&200), "{posts:?}");

    // Passive health: three failures in 30 s take backend 0 out of `passive`.
    let before = s.backend(0).requests();
    let all_ok = s.client(|| {
        let mut c = Client::connect(edge).unwrap();
        (0..30).all(|_| c.request("GET", "passive.example.org", "/", "", "").is_ok_and(|r| r.status == 200))
    });
    assert!(all_ok);
    assert_eq!(s.backend(0).requests() - before, 3, "out after its third failure");
    let metrics = lb_tests::lbd::admin(&s.topo.lb.ns, "GET", "/metrics", None).body;
    let label =
        |svc: &str, i: usize| format!("{{service=\"{svc}\",backend=\"{}:{BACKEND}\"}}", backend_ip(i));
    assert!(
        metrics.contains(&format!("lb_http_passive_out{} 1", label("passive.example.org", 0))),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("lb_http_failures_total{} 3", label("passive.example.org", 0))),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("lb_http_passive_out{} 0", label("passive.example.org", 1))),
        "{metrics}"
    );
    let st = lb_tests::lbd::status(&s.topo.lb.ns);
    let b1 =
        backend_status(&st, "passive.example.org", &format!("{}:{BACKEND}", backend_ip(1))).expect("listed");
    assert!(b1["http"]["requests"].as_u64().unwrap_or(0) >= 27, "{b1:#}");

    // Consistent hash on a cookie: one session, one backend; sessions spread over both.
    let answered_by = |session: &str| -> std::collections::BTreeSet<String> {
        s.client(|| {
            let mut c = Client::connect(edge).unwrap();
            let cookie = format!("cookie: a=1; session={session}\r\n");
            (0..5).map(|_| c.request("GET", "sticky.example.org", "/", &cookie, "").unwrap().body).collect()
        })
    };
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..16 {
        let by = answered_by(&format!("user-{i}"));
        assert_eq!(by.len(), 1, "session user-{i} stays on one backend: {by:?}");
        seen.extend(by);
    }
    assert_eq!(seen.len(), 2, "16 sessions spread over both backends: {seen:?}");

    // Least connections: a backend that takes 300 ms gets few of 64 concurrent requests.
    s.backend(2).delay_ms.store(300, Ordering::Relaxed);
    let (slow_before, fast_before) = (s.backend(2).requests(), s.backend(3).requests());
    let threads: Vec<_> = (0..8)
        .map(|_| {
            s.topo.client.ns.spawn("lc", move || {
                let mut c = Client::connect(edge).unwrap();
                (0..8)
                    .filter(|_| {
                        c.request("GET", "slow.example.org", "/", "", "").is_ok_and(|r| r.status == 200)
                    })
                    .count()
            })
        })
        .collect();
    let ok: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(ok, 64);
    let (slow, fast) = (s.backend(2).requests() - slow_before, s.backend(3).requests() - fast_before);
    eprintln!("least-conn: slow backend {slow}, fast backend {fast}");
    assert!(fast >= 3 * slow, "the fast backend takes most: slow {slow}, fast {fast}");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    let _ = &s.dir;
}

#[test]
fn http_to_a_vip_is_passed_by_xdp_to_the_edge_while_its_l4_port_is_balanced_in_xdp() {
    if !privileged("http_to_a_vip_is_passed_by_xdp_to_the_edge_while_its_l4_port_is_balanced_in_xdp") {
        return;
    }
    // One VIP: port 7000 is an L4 service XDP balances to the backends by direct server
    // return; port 8000 is no L4 service, so XDP passes it to this node's stack, where the
    // edge listens.
    let reg = format!(
        "version: 1
listeners: [{{port: 8000}}]
http:
  example.org:
    health: {{enabled: false}}
    backends: [{{host: B0, port: 8080}}]
tcp:
  raw:
    vip: {VIP}
    port: 7000
    backends: [{{host: B0, port: 7000}}, {{host: B1, port: 7000}}]
"
    );
    let (s, lbd) = setup("edge-vip", 2, &reg);
    let _l4: Vec<HttpBackend> =
        (0..2).map(|i| HttpBackend::start(&s.topo.backends[i].ns, &format!("l4-{i}"), 7000)).collect();
    // The node holds the VIP (as a node offering HTTP on it would), on loopback.
    s.topo.lb.ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
    wait_status(&s.topo.lb.ns, "L4 backends up", |st| {
        (0..2).all(|i| {
            backend_status(st, "raw", &format!("{}:7000", backend_ip(i))).is_some_and(|b| b["health"] == "up")
        })
    });

    let vip_http = SocketAddr::from((VIP, 8000));
    let r = s.client(|| get(vip_http, "example.org", "/")).expect("HTTP to the VIP");
    assert_eq!((r.status, r.body.as_str()), (200, "backend-0\n"), "through the edge\n{}", lbd.log());
    // The L4 port is XDP's: answered by the backends themselves, never by the edge.
    let edge_seen = s.backend(0).requests();
    let mut bodies = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r =
            s.client(|| get(SocketAddr::from((VIP, 7000)), "raw", "/")).expect("TCP to the VIP's L4 port");
        assert_eq!(r.status, 200);
        bodies.insert(r.body);
    }
    assert_eq!(bodies.into_iter().collect::<Vec<_>>(), ["l4-0\n", "l4-1\n"], "balanced over both");
    assert_eq!(s.backend(0).requests(), edge_seen, "the edge's backend saw none of the L4 traffic");
    let st = lb_tests::lbd::status(&s.topo.lb.ns);
    let edge = backend_status(&st, "example.org", &format!("{}:8080", backend_ip(0))).expect("edge backend");
    assert_eq!(edge["http"]["requests"], 1, "{st:#}");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}
