//! lbd in an lb namespace balances TCP and UDP for a VIP over three backends by L2 direct
//! server return; real clients, real servers, the real XDP program attached in native mode. A
//! VIP's deny list drops a source's packets in XDP.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
};

use lb_tests::{
    capture::{Capture, ipv4_source},
    clients::{http_get, logged_counter, payload, tcp_exchange, udp_exchange},
    lbd::{Lbd, TempDir, metric},
    privileged,
    servers::{Ports, Servers},
    topology::{CLIENT_IP, DsrTopology, LB_IP, VIP, dsr_registry},
    unique_prefix,
};

const BACKENDS: usize = 3;
const TCP_CONNECTIONS: usize = 150;
const UDP_EXCHANGES: usize = 150;
const HTTP_REQUESTS: usize = 30;
const ECHO: u16 = 7;
const PORTS: Ports = Ports { http: 80, echo: &[ECHO] };

/// What the client sent and saw.
struct ClientRun {
    tcp_sent: BTreeSet<Vec<u8>>,
    udp_sent: BTreeSet<Vec<u8>>,
    http_bodies: Vec<String>,
}

/// Runs every exchange through the VIP from the client namespace, checking each echo.
fn exercise_vip() -> ClientRun {
    let echo = SocketAddr::from((VIP, ECHO));
    let web = SocketAddr::from((VIP, PORTS.http));
    let mut run = ClientRun { tcp_sent: BTreeSet::new(), udp_sent: BTreeSet::new(), http_bodies: Vec::new() };
    for i in 0..TCP_CONNECTIONS {
        let data = payload("tcp", i, 3000);
        assert_eq!(tcp_exchange(echo, &data, true), data, "TCP echo {i} must come back intact");
        run.tcp_sent.insert(data);
    }
    for i in 0..UDP_EXCHANGES {
        let data = payload("udp", i, 500);
        assert_eq!(udp_exchange(echo, &data), data, "UDP echo {i} must come back intact");
        run.udp_sent.insert(data);
    }
    run.http_bodies = (0..HTTP_REQUESTS).map(|_| http_get(web)).collect();
    run
}

/// Every payload reached exactly one backend, intact, and every backend got a share.
fn assert_balanced(servers: &[Servers], run: &ClientRun) {
    let mut tcp_got = BTreeSet::new();
    let mut udp_got = BTreeSet::new();
    for (i, s) in servers.iter().enumerate() {
        let (tcp, udp) = (s.served.tcp_payloads(), s.served.udp_payloads());
        let b = i + 1;
        assert!(tcp.len() >= TCP_CONNECTIONS / 10, "backend {b} got {} TCP flows", tcp.len());
        assert!(udp.len() >= UDP_EXCHANGES / 10, "backend {b} got {} UDP flows", udp.len());
        for p in tcp {
            assert!(tcp_got.insert(p), "a TCP payload reached two backends");
        }
        for p in udp {
            assert!(udp_got.insert(p), "a UDP payload reached two backends");
        }
    }
    assert_eq!(tcp_got, run.tcp_sent, "backends must receive exactly the TCP payloads sent");
    assert_eq!(udp_got, run.udp_sent, "backends must receive exactly the UDP payloads sent");
    let mut by_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for b in &run.http_bodies {
        *by_backend.entry(b.as_str()).or_default() += 1;
    }
    assert_eq!(by_backend.len(), BACKENDS, "HTTP answers by backend: {by_backend:?}");
}

/// Every reply from the VIP that reached the client was sent by a backend, none by the lb.
fn assert_direct_server_return(topo: &DsrTopology, capture: &Capture) {
    let backend_macs: BTreeSet<[u8; 6]> = topo.backends.iter().map(|b| b.mac).collect();
    let reply_sources: Vec<[u8; 6]> = capture
        .frames()
        .iter()
        .filter_map(|f| ipv4_source(f))
        .filter(|(_, ip)| *ip == VIP)
        .map(|(mac, _)| mac)
        .collect();
    assert!(reply_sources.len() > TCP_CONNECTIONS, "captured {} VIP replies", reply_sources.len());
    let stray = reply_sources.iter().find(|m| !backend_macs.contains(*m));
    assert!(stray.is_none(), "a reply from the VIP came from {stray:02x?}, not a backend");
}

/// The whole scenario with lbd attached in `mode`, stopped with `stop_signal`.
fn balanced_by_direct_server_return(tag: &str, mode: &str, stop_signal: libc::c_int) {
    let topo = DsrTopology::new(&unique_prefix(tag), BACKENDS);
    let servers: Vec<Servers> = (topo.backends.iter().enumerate())
        .map(|(i, b)| Servers::start(&b.ns, &format!("backend-{}", i + 1), PORTS, &[b.ip.into(), VIP.into()]))
        .collect();
    // The lb node's own services, on the same ports as the VIP's.
    let own = Servers::start(&topo.lb.ns, "lb-self", PORTS, &[LB_IP.into()]);
    let dir = TempDir::new(tag);
    let reg = dir.write("services.yaml", &dsr_registry(BACKENDS, PORTS.http, ECHO));
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &["--xdp-mode", mode]);
    let link = topo.lb.ns.ip_output(&["link", "show", "dev", "eth0"]);
    let shown = if mode == "native" { " xdp " } else { " xdpgeneric " };
    assert!(link.contains(shown), "lbd must attach in {mode} mode:\n{link}");

    // A second lbd on the same interface is refused: one sharing the pinned state finds it
    // locked; one with state of its own cannot attach, and does not fall back to generic mode.
    let second = Lbd::run_to_exit(&topo.lb.ns, &dir, &reg, "eth0", &["--admin", "127.0.0.1:9181"]);
    assert_eq!(second.status.code(), Some(1), "{}", second.log);
    assert!(second.log.contains("another lbd serves `eth0`"), "{}", second.log);
    let other_pins = dir.pin_dir().join("other");
    let other_pins = format!("--pin-dir={}", other_pins.display());
    let third =
        Lbd::run_to_exit(&topo.lb.ns, &dir, &reg, "eth0", &["--admin", "127.0.0.1:9181", &other_pins]);
    assert_eq!(third.status.code(), Some(1), "{}", third.log);
    assert!(third.log.contains("cannot attach XDP to `eth0`"), "{}", third.log);
    assert!(
        !third.log.contains("using generic"),
        "a busy interface is no reason to fall back:\n{}",
        third.log
    );
    assert!(!dir.pin_dir().join("other/eth0").exists(), "a refused lbd removes the state it pinned");

    let capture = topo.client.ns.run(|| Capture::open("eth0"));
    let run = topo.client.ns.run(exercise_vip);
    assert_balanced(&servers, &run);
    assert_direct_server_return(&topo, &capture);

    // The node's own services stay reachable on its own address.
    let (own_http, own_udp) = topo.client.ns.run(|| {
        let http = http_get(SocketAddr::from((LB_IP, PORTS.http)));
        (http, udp_exchange(SocketAddr::from((LB_IP, ECHO)), b"to the lb itself"))
    });
    assert_eq!(own_http, "lb-self");
    assert_eq!(own_udp, b"to the lb itself");
    assert_eq!(own.served.http_count(), 1, "VIP traffic must never reach the lb's own server");

    let stopped = lbd.stop(stop_signal);
    assert!(stopped.status.success(), "lbd must exit 0 on signal {stop_signal}:\n{}", stopped.log);
    // Every client packet to the VIP was forwarded by XDP: at least one per UDP exchange and
    // three per TCP connection (SYN, data, FIN).
    let forwarded = logged_counter(&stopped.log, "forwarded");
    assert!(
        forwarded >= (3 * TCP_CONNECTIONS + UDP_EXCHANGES) as u64,
        "forwarded={forwarded}:\n{}",
        stopped.log
    );
    let link = topo.lb.ns.ip_output(&["link", "show", "dev", "eth0"]);
    assert!(!link.contains("xdp"), "stopping must detach the program:\n{link}");
}

#[test]
fn native_xdp_balances_tcp_and_udp_by_direct_server_return_and_detaches_on_sigterm() {
    if privileged("native_xdp_balances_tcp_and_udp_by_direct_server_return_and_detaches_on_sigterm") {
        balanced_by_direct_server_return("lbt-dsrn", "native", libc::SIGTERM);
    }
}

#[test]
fn generic_xdp_balances_tcp_and_udp_by_direct_server_return_and_detaches_on_sigint() {
    if privileged("generic_xdp_balances_tcp_and_udp_by_direct_server_return_and_detaches_on_sigint") {
        balanced_by_direct_server_return("lbt-dsrg", "generic", libc::SIGINT);
    }
}

#[test]
fn a_denied_source_is_dropped_in_xdp_and_counted_until_its_deny_list_is_lifted() {
    if !privileged("a_denied_source_is_dropped_in_xdp_and_counted_until_its_deny_list_is_lifted") {
        return;
    }
    let tag = "lbt-deny";
    let topo = DsrTopology::new(&unique_prefix(tag), 1);
    let b = &topo.backends[0];
    let server = Servers::start(&b.ns, "backend-1", PORTS, &[b.ip.into(), VIP.into()]);
    let dir = TempDir::new(tag);
    let open = dsr_registry(1, PORTS.http, ECHO);
    // The echo service denies the client; the web service on the same VIP does not.
    let echo_only = "    protocols: [tcp, udp]\n";
    assert!(open.contains(echo_only));
    let denied = open.replace(echo_only, &format!("{echo_only}    deny: [192.0.2.0/24, {CLIENT_IP}/32]\n"));
    let reg = dir.write("services.yaml", &denied);
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    let echo = SocketAddr::from((VIP, ECHO));
    let drops = || metric(&topo.lb.ns, "lb_datapath_events_total{event=\"drop_denied\"} ");

    assert_eq!(topo.client.ns.run(|| http_get(SocketAddr::from((VIP, PORTS.http)))), "backend-1");
    // Refused in the kernel: the SYN and the datagram get no answer at all, not a reset.
    let (tcp, udp) = topo.client.ns.run(|| {
        let wait = std::time::Duration::from_millis(800);
        let tcp = std::net::TcpStream::connect_timeout(&echo, wait).map_err(|e| e.kind());
        let sock = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
        sock.set_read_timeout(Some(wait)).expect("timeout");
        sock.send_to(b"denied?", echo).expect("send");
        let udp = sock.recv(&mut [0; 64]).map_err(|e| e.kind());
        (tcp.map(|_| ()), udp)
    });
    assert_eq!(tcp, Err(std::io::ErrorKind::TimedOut));
    assert!(matches!(udp, Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)), "{udp:?}");
    assert!(server.served.tcp_payloads().is_empty() && server.served.udp_payloads().is_empty());
    assert!(drops() >= 2.0, "the SYN and the datagram are counted: {}", drops());

    // The list lifted by a reload: the same client is served.
    dir.replace("services.yaml", &open);
    assert_eq!(lbd.wait_reload(), "reloaded", "{}", lbd.log());
    let before = drops();
    let data = payload("tcp", 1, 100);
    assert_eq!(topo.client.ns.run(|| tcp_exchange(echo, &data, true)), data);
    assert_eq!(topo.client.ns.run(|| udp_exchange(echo, b"allowed")), b"allowed");
    assert!((drops() - before).abs() < 0.5, "nothing more denied");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}
