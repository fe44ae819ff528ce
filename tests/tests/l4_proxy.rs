//! The userspace L4 proxy (`mode: proxy`) with real clients and servers in namespaces: TCP and
//! UDP relayed to this node's backend first and to a healthy remote once it is down, open
//! connections closed when their backend is marked down; and seed 003's Redis case with real
//! redis-server processes: a health check passing only on the primary, the proxy following a
//! failover and a primary restart.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use lb_tests::{
    clients::{IO_TIMEOUT, tcp_exchange, udp_exchange},
    http::HttpBackend,
    installed,
    lbd::{Lbd, TempDir, backend_status, metric, wait_status},
    netns::NetNs,
    privileged,
    process::Spawned,
    servers::{Ports, Servers},
    topology::{DsrTopology, backend_ip},
    unique_prefix,
};

const ECHO: u16 = 7000;

fn health_is(st: &serde_json::Value, svc: &str, backend: &str, want: &str) -> bool {
    backend_status(st, svc, backend).is_some_and(|b| b["health"] == want)
}

#[test]
fn tcp_and_udp_go_to_this_nodes_backend_first_then_a_healthy_remote() {
    if !privileged("tcp_and_udp_go_to_this_nodes_backend_first_then_a_healthy_remote") {
        return;
    }
    let tag = "l4-proxy";
    let topo = DsrTopology::new(&unique_prefix(tag), 2);
    let ports = Ports { http: 8081, echo: &[ECHO] };
    let servers: Vec<Servers> = (0..2)
        .map(|i| Servers::start(&topo.backends[i].ns, &format!("b{i}"), ports, &[backend_ip(i).into()]))
        .collect();
    // Health is checked on port 8080, apart from the echo: stopping it marks a backend down
    // while its echo, and the connections to it, live on.
    let mut health: Vec<Option<HttpBackend>> =
        (0..2).map(|i| Some(HttpBackend::start(&topo.backends[i].ns, &format!("h{i}"), 8080))).collect();
    let dir = TempDir::new(tag);
    let reg = dir.write(
        "services.yaml",
        &format!(
            "version: 1
node: n1
tcp:
  echo:
    port: {ECHO}
    mode: proxy
    proxy: {{listen: {lb}}}
    protocols: [tcp, udp]
    health: {{port: 8080, interval: 200ms, timeout: 200ms, fall: 1, rise: 1}}
    backends:
      - {{host: {b0}, port: {ECHO}, node: n0}}
      - {{host: {b1}, port: {ECHO}, node: n1}}
",
            b0 = backend_ip(0),
            b1 = backend_ip(1),
            lb = topo.lb.ip
        ),
    );
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    let proxy = SocketAddr::from((topo.lb.ip, ECHO));
    let (id0, id1) = (format!("{}:{ECHO}", backend_ip(0)), format!("{}:{ECHO}", backend_ip(1)));
    wait_status(&topo.lb.ns, "both backends up", |st| {
        health_is(st, "echo", &id0, "up") && health_is(st, "echo", &id1, "up")
    });

    // b1 is on this node (n1): every connection and flow goes there.
    for i in 0..5 {
        let data = format!("tcp-{i}");
        assert_eq!(topo.client.ns.run(|| tcp_exchange(proxy, data.as_bytes(), true)), data.as_bytes());
        let data = format!("udp-{i}");
        assert_eq!(topo.client.ns.run(|| udp_exchange(proxy, data.as_bytes())), data.as_bytes());
    }
    let got = |i: usize| (servers[i].served.tcp_payloads().len(), servers[i].served.udp_payloads().len());
    assert_eq!((got(0), got(1)), ((0, 0), (5, 5)));

    // An open connection to b1, then b1 marked down: the proxy closes it, new ones go to b0.
    let mut open = topo.client.ns.run(|| TcpStream::connect_timeout(&proxy, IO_TIMEOUT)).expect("connect");
    open.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    open.write_all(b"before").unwrap();
    let mut buf = [0u8; 6];
    open.read_exact(&mut buf).unwrap();
    assert_eq!(servers[1].served.open_on(ECHO), 1);
    health[1] = None;
    wait_status(&topo.lb.ns, "b1 down", |st| health_is(st, "echo", &id1, "down"));
    let mut rest = Vec::new();
    let closed = open.read_to_end(&mut rest);
    assert!(matches!(closed, Ok(0)), "the proxy closes a marked-down backend's connection: {closed:?}");
    for i in 0..3 {
        let data = format!("after-{i}");
        assert_eq!(topo.client.ns.run(|| tcp_exchange(proxy, data.as_bytes(), true)), data.as_bytes());
        assert_eq!(topo.client.ns.run(|| udp_exchange(proxy, data.as_bytes())), data.as_bytes());
    }
    assert_eq!(got(0), (3, 3), "the remote took over");
    assert_eq!(servers[1].served.tcp_payloads().len(), 6, "b1 saw the open connection's bytes, nothing new");

    // b1 back: this node's backend first again.
    health[1] = Some(HttpBackend::start(&topo.backends[1].ns, "h1", 8080));
    wait_status(&topo.lb.ns, "b1 up", |st| health_is(st, "echo", &id1, "up"));
    assert_eq!(topo.client.ns.run(|| tcp_exchange(proxy, b"home", true)), b"home");
    assert_eq!(servers[1].served.tcp_payloads().len(), 7);
    let relayed =
        metric(&topo.lb.ns, &format!("lb_proxy_connections_total{{service=\"echo\",backend=\"{id1}\"}}"));
    assert!(relayed >= 12.0, "{relayed}");
    drop(lbd);
}

/// A redis-server in `ns`, optionally a replica of `primary`; stopped on drop.
fn redis(ns: &NetNs, dir: &Path, primary: Option<Ipv4Addr>) -> Spawned {
    let mut cmd = ns.command("redis-server");
    cmd.args([
        "--port",
        "6379",
        "--bind",
        "0.0.0.0",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    cmd.args(["--daemonize", "no", "--loglevel", "warning", "--dir"]).arg(dir);
    if let Some(p) = primary {
        cmd.args(["--replicaof", &p.to_string(), "6379"]);
    }
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    Spawned::new(cmd.spawn().expect("start redis-server"))
}

/// A connection speaking RESP, one command at a time.
struct Resp(BufReader<TcpStream>);

impl Resp {
    fn connect(ns: &NetNs, addr: SocketAddr) -> std::io::Result<Self> {
        let s = ns.run(|| TcpStream::connect_timeout(&addr, IO_TIMEOUT))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        Ok(Self(BufReader::new(s)))
    }

    /// Sends a command; its reply as text (a bulk string's contents).
    fn call(&mut self, args: &[&str]) -> std::io::Result<String> {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            let _ = write!(req, "${}\r\n{a}\r\n", a.len());
        }
        self.0.get_mut().write_all(req.as_bytes())?;
        let mut line = String::new();
        if self.0.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match line.strip_prefix('$').map(|n| n.trim().parse::<usize>()) {
            Some(Ok(n)) => {
                let mut body = vec![0u8; n + 2];
                self.0.read_exact(&mut body)?;
                Ok(String::from_utf8_lossy(&body[..n]).into_owned())
            }
            _ => Ok(line.trim_end().to_owned()),
        }
    }

    fn field(&mut self, section: &str, name: &str) -> String {
        let info = self.call(&["INFO", section]).expect("INFO");
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .unwrap_or_else(|| panic!("no {name} in {info}"))
            .trim()
            .to_owned()
    }
}

/// Waits until redis at `addr` answers `PING`, and its `INFO replication` has `want` (its
/// readiness signals).
fn wait_redis(ns: &NetNs, addr: SocketAddr, want: &str) -> String {
    let start = Instant::now();
    loop {
        if let Ok(mut c) = Resp::connect(ns, addr)
            && c.call(&["PING"]).is_ok_and(|p| p == "+PONG")
            && c.call(&["INFO", "replication"]).is_ok_and(|i| i.contains(want))
        {
            return c.field("server", "run_id");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "redis at {addr} never had {want}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_redis_proxy_follows_the_primary_through_failover_and_restart() {
    if !privileged("the_redis_proxy_follows_the_primary_through_failover_and_restart")
        || !installed(
            "the_redis_proxy_follows_the_primary_through_failover_and_restart",
            "redis-server",
            "--version",
            "redis-server",
        )
    {
        return;
    }
    let tag = "l4-redis";
    let topo = DsrTopology::new(&unique_prefix(tag), 2);
    let dir = TempDir::new(tag);
    let (a_ip, b_ip) = (backend_ip(0), backend_ip(1));
    let (a, b) = (SocketAddr::from((a_ip, 6379)), SocketAddr::from((b_ip, 6379)));
    let (ns_a, ns_b) = (&topo.backends[0].ns, &topo.backends[1].ns);
    let lb_ns = &topo.lb.ns;
    // Each its own directory: a replica writes the primary's snapshot there.
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let _redis_a = redis(ns_a, &dir_a, None);
    let run_a = wait_redis(lb_ns, a, "role:master");
    let mut redis_b = redis(ns_b, &dir_b, Some(a_ip));
    wait_redis(lb_ns, b, "master_link_status:up");

    // Seed 003's redis-main, relayed by the proxy; the check passes on the primary only.
    let reg = dir.write(
        "services.yaml",
        &format!(
            "version: 1
tcp:
  redis-main:
    port: 6379
    mode: proxy
    when_all_down: fail-closed
    health:
      interval: 200ms
      timeout: 200ms
      fall: 1
      rise: 1
      send: \"INFO replication\\r\\n\"
      expect: \"role:master\"
    backends:
      - {{host: {a_ip}, port: 6379}}
      - {{host: {b_ip}, port: 6379}}
"
        ),
    );
    let lbd = Lbd::start(lb_ns, &dir, &reg, "eth0", &[]);
    let proxy = SocketAddr::from((topo.lb.ip, 6379));
    let (ida, idb) = (format!("{a_ip}:6379"), format!("{b_ip}:6379"));
    let primary_is = |up: &str, down: &str| {
        wait_status(lb_ns, &format!("{up} the primary"), |st| {
            health_is(st, "redis-main", up, "up") && health_is(st, "redis-main", down, "down")
        });
    };
    primary_is(&ida, &idb);
    let client = &topo.client.ns;
    let mut before = Resp::connect(client, proxy).expect("connect through the proxy");
    assert_eq!(before.call(&["SET", "k1", "one"]).unwrap(), "+OK");
    assert_eq!(before.field("server", "run_id"), run_a, "the proxy reached the primary, a");

    // A planned failover: b promoted, a demoted to its replica. The proxy closes the
    // connection to a (writes there would fail) and new ones reach b.
    let mut direct_b = Resp::connect(lb_ns, b).unwrap();
    assert_eq!(direct_b.call(&["REPLICAOF", "NO", "ONE"]).unwrap(), "+OK");
    let run_b = direct_b.field("server", "run_id");
    let mut direct_a = Resp::connect(lb_ns, a).unwrap();
    assert_eq!(direct_a.call(&["REPLICAOF", &b_ip.to_string(), "6379"]).unwrap(), "+OK");
    primary_is(&idb, &ida);
    let after = before.call(&["GET", "k1"]);
    assert!(after.is_err(), "the connection to the demoted primary is closed: {after:?}");
    assert!(lbd.log().contains("backend marked down"), "{}", lbd.log());
    let mut c = Resp::connect(client, proxy).expect("connect");
    assert_eq!(c.call(&["GET", "k1"]).unwrap(), "one", "replicated before the failover");
    assert_eq!(c.call(&["SET", "k2", "two"]).unwrap(), "+OK", "writes reach the new primary");
    assert_eq!(c.field("server", "run_id"), run_b);
    wait_redis(lb_ns, a, "master_link_status:up");

    // The primary restarted: while it is gone no backend passes (a is a replica) and,
    // fail-closed, connections are closed; once it is back the proxy follows it.
    drop(c);
    drop(redis_b);
    wait_status(lb_ns, "no primary", |st| {
        health_is(st, "redis-main", &ida, "down") && health_is(st, "redis-main", &idb, "down")
    });
    let refused = Resp::connect(client, proxy).and_then(|mut c| c.call(&["PING"]));
    assert!(refused.is_err(), "no primary: closed, not sent to a replica: {refused:?}");
    redis_b = redis(ns_b, &dir_b, None);
    let run_b2 = wait_redis(lb_ns, b, "role:master");
    assert_ne!(run_b2, run_b);
    primary_is(&idb, &ida);
    let mut c = Resp::connect(client, proxy).expect("connect");
    assert_eq!(c.call(&["SET", "k3", "three"]).unwrap(), "+OK");
    assert_eq!(c.field("server", "run_id"), run_b2, "the proxy follows the restarted primary");
    drop(redis_b);
    drop(lbd);
}
