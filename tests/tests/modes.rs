//! Every forwarding mode end to end: lbd on the lb node of a dual-stack topology, dsr-l2
//! backends on its segment, dsr-ipip and nat backends behind a router running `lb-decap`; real
//! TCP and UDP clients over IPv4 and IPv6. Then long-lived TCP streams in every mode keep
//! flowing while a reload adds a backend and drains the one serving them.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_tests::{
    clients::{IO_TIMEOUT, logged_counter, payload, tcp_exchange, udp_exchange},
    lbd::{Decap, Lbd, TempDir},
    privileged,
    routed::{ECHO_PORTS, Mode, Node, RoutedTopology, VIP4, VIP6},
    servers::{Ports, Received, Servers},
    unique_prefix,
};

const L2_BACKENDS: usize = 3;
const ROUTED_BACKENDS: usize = 3;
/// Flows per mode, family and protocol: enough that every backend of a pool gets some
/// (a backend of three misses all 40 with probability 1e-7).
const FLOWS: usize = 40;
/// Larger than one segment: full-size client packets, which tunnels grow past 1500 bytes.
const TCP_PAYLOAD: usize = 4000;
/// The largest UDP payload a 1500-byte client link carries unfragmented, by family: a
/// backend's echo of anything larger would not fit the client's link either.
fn udp_max_payload(v6: bool) -> usize {
    if v6 { 1500 - 40 - 8 } else { 1500 - 20 - 8 }
}
/// NAT source ports lbd allocates by default.
const NAT_PORTS: std::ops::RangeInclusive<u16> = 61_000..=65_535;

fn vip(v6: bool) -> IpAddr {
    if v6 { VIP6.into() } else { VIP4.into() }
}

fn family(v6: bool) -> &'static str {
    if v6 { "v6" } else { "v4" }
}

/// Servers on every backend: echo on every mode's port, UDP on the backend's and the VIPs'
/// addresses.
fn start_servers(topo: &RoutedTopology) -> (Vec<Servers>, Vec<Servers>) {
    let ports = Ports { http: 80, echo: ECHO_PORTS };
    let start = |n: &Node, name: String| {
        Servers::start(&n.ns, &name, ports, &[n.v4.into(), n.v6.into(), VIP4.into(), VIP6.into()])
    };
    let l2 = topo.l2_backends.iter().enumerate().map(|(i, n)| start(n, format!("l{}", i + 1))).collect();
    let routed =
        topo.routed_backends.iter().enumerate().map(|(i, n)| start(n, format!("r{}", i + 1))).collect();
    (l2, routed)
}

fn decapsulators(topo: &RoutedTopology, dir: &TempDir) -> Vec<Decap> {
    topo.routed_backends.iter().map(|n| Decap::start(&n.ns, dir, "eth0")).collect()
}

fn pool<'a>(mode: Mode, l2: &'a [Servers], routed: &'a [Servers]) -> &'a [Servers] {
    if mode == Mode::DsrL2 { l2 } else { routed }
}

/// What the balancer's backends must see as the client: the client itself behind direct
/// server return, the lb node (on a NAT port) behind NAT.
fn assert_peer(mode: Mode, topo: &RoutedTopology, v6: bool, r: &Received) {
    let what = format!("{} {} flow on port {}", mode.name(), family(v6), r.port);
    if mode == Mode::Nat {
        assert_eq!(r.peer.ip(), topo.lb.addr(v6), "{what}: NAT must present the lb node's address");
        assert!(NAT_PORTS.contains(&r.peer.port()), "{what}: source port {} is no NAT port", r.peer.port());
    } else {
        assert_eq!(r.peer.ip(), topo.client.addr(v6), "{what}: DSR keeps the client's address");
    }
}

#[test]
fn every_mode_carries_tcp_and_udp_over_ipv4_and_ipv6_to_every_backend() {
    if !privileged("every_mode_carries_tcp_and_udp_over_ipv4_and_ipv6_to_every_backend") {
        return;
    }
    let topo = RoutedTopology::new(&unique_prefix("lbt-modes"), L2_BACKENDS, ROUTED_BACKENDS);
    let (l2, routed) = start_servers(&topo);
    let dir = TempDir::new("modes");
    let decaps = decapsulators(&topo, &dir);
    let all = |mode, _| (0..topo.backends(mode).len()).map(|i| (i, 1)).collect();
    let reg = dir.write("services.yaml", &topo.registry(all));
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);

    let mut sent_tcp = 0;
    let mut sent_udp = 0;
    for mode in Mode::ALL {
        for v6 in [false, true] {
            let addr = SocketAddr::new(vip(v6), mode.vip_port());
            let tag = format!("{}-{}", mode.name(), family(v6));
            let (tcp, udp): (BTreeSet<Vec<u8>>, BTreeSet<Vec<u8>>) = topo.client.ns.run(|| {
                let tcp = (0..FLOWS).map(|i| {
                    let data = payload(&format!("{tag}-tcp"), i, TCP_PAYLOAD);
                    assert_eq!(
                        tcp_exchange(addr, &data, true),
                        data,
                        "{tag}: TCP echo {i} must come back intact"
                    );
                    data
                });
                let tcp = tcp.collect();
                let udp = (0..FLOWS).map(|i| {
                    let len = if i % 2 == 0 { udp_max_payload(v6) } else { 100 };
                    let mut data = payload(&format!("{tag}-udp"), i, len);
                    data.truncate(len);
                    assert_eq!(udp_exchange(addr, &data), data, "{tag}: UDP echo {i} must come back intact");
                    data
                });
                (tcp, udp.collect())
            });
            sent_tcp += tcp.len();
            sent_udp += udp.len();

            // Each flow reached exactly one backend of the service's pool, bytes intact, and
            // every backend of the pool served some.
            let mut got_tcp = BTreeSet::new();
            let mut got_udp = BTreeSet::new();
            for (i, s) in pool(mode, &l2, &routed).iter().enumerate() {
                let mine = |r: &Received| r.port == mode.backend_port() && r.data.starts_with(tag.as_bytes());
                let t: Vec<Received> = s.served.tcp_received().into_iter().filter(mine).collect();
                let u: Vec<Received> = s.served.udp_received().into_iter().filter(mine).collect();
                assert!(
                    !t.is_empty() && !u.is_empty(),
                    "{tag}: backend {i} got {} TCP, {} UDP flows",
                    t.len(),
                    u.len()
                );
                for r in t.iter().chain(&u) {
                    assert_peer(mode, &topo, v6, r);
                }
                for r in t {
                    assert!(got_tcp.insert(r.data), "{tag}: a TCP payload reached two backends");
                }
                for r in u {
                    assert!(got_udp.insert(r.data), "{tag}: a UDP datagram reached two backends");
                }
            }
            assert_eq!(got_tcp, tcp, "{tag}: backends must receive exactly the TCP payloads sent");
            assert_eq!(got_udp, udp, "{tag}: backends must receive exactly the UDP datagrams sent");
        }
    }

    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    let forwarded = logged_counter(&stopped.log, "forwarded");
    // At least SYN, data and FIN of each TCP flow and each datagram passed through XDP.
    assert!(forwarded >= (3 * sent_tcp + sent_udp) as u64, "forwarded={forwarded}\n{}", stopped.log);
    // Every NAT reply came back through XDP: at least SYN-ACK and FIN per TCP flow, one per datagram.
    let nat_replied = logged_counter(&stopped.log, "nat_replied");
    assert!(nat_replied >= (2 * 2 * FLOWS + 2 * FLOWS) as u64, "nat_replied={nat_replied}\n{}", stopped.log);
    for reason in ["drop_no_backend", "drop_encap_failed", "drop_nat_ports_exhausted"] {
        assert_eq!(logged_counter(&stopped.log, reason), 0, "{reason}\n{}", stopped.log);
    }
    for d in decaps {
        let s = d.stop();
        assert!(s.status.success(), "{}", s.log);
    }
}

/// A TCP connection that keeps sending chunks and checking their echoes on a thread until
/// told to stop; then it closes and returns everything it sent.
struct Stream {
    /// Rounds completed, signalled on each.
    rounds: Arc<(Mutex<u64>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<u8>>,
}

/// Upper bounds on a stream: it never runs longer or more rounds than this.
const STREAM_MAX_ROUNDS: u64 = 100_000;
const STREAM_MAX_TIME: Duration = Duration::from_mins(1);

impl Stream {
    /// Connects to `addr` from the client and completes one round before returning, so the
    /// backend has accepted the connection.
    fn open(topo: &RoutedTopology, addr: SocketAddr, tag: String) -> Self {
        let rounds = Arc::new((Mutex::new(0), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (rounds.clone(), stop.clone());
        let thread = topo.client.ns.spawn("stream", move || {
            let mut conn =
                TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap_or_else(|e| panic!("{tag}: {e}"));
            conn.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
            let mut sent = Vec::new();
            let started = Instant::now();
            for round in 0..STREAM_MAX_ROUNDS {
                if (round > 0 && s.load(Ordering::Acquire)) || started.elapsed() > STREAM_MAX_TIME {
                    break;
                }
                let chunk = payload(&tag, usize::try_from(round).expect("small"), 700);
                conn.write_all(&chunk).unwrap_or_else(|e| panic!("{tag}: send in round {round}: {e}"));
                let mut back = vec![0; chunk.len()];
                conn.read_exact(&mut back).unwrap_or_else(|e| panic!("{tag}: echo of round {round}: {e}"));
                assert_eq!(back, chunk, "{tag}: round {round} must come back intact");
                sent.extend_from_slice(&chunk);
                *r.0.lock().expect("lock") += 1;
                r.1.notify_all();
            }
            conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).unwrap_or_else(|e| panic!("{tag}: close: {e}"));
            assert!(rest.is_empty(), "{tag}: unexpected bytes at close");
            sent
        });
        let stream = Self { rounds, stop, thread };
        stream.wait_rounds(1);
        stream
    }

    /// Rounds completed so far.
    fn rounds(&self) -> u64 {
        *self.rounds.0.lock().expect("lock")
    }

    /// Waits until the stream has completed `n` rounds in all (bounded by the stream's own
    /// limits: a stream that stops early fails here).
    fn wait_rounds(&self, n: u64) {
        let deadline = Instant::now() + STREAM_MAX_TIME;
        let (count, signal) = &*self.rounds;
        let mut done = count.lock().expect("lock");
        while *done < n {
            assert!(!self.thread.is_finished(), "the stream ended after {} rounds", *done);
            assert!(Instant::now() < deadline, "the stream stalled at {} rounds", *done);
            // Woken by each round; the timeout only re-checks that the stream thread lives.
            done = signal.wait_timeout(done, Duration::from_millis(100)).expect("lock").0;
        }
    }

    fn finish(self) -> Vec<u8> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

#[test]
fn long_lived_streams_keep_flowing_while_a_backend_is_added_and_theirs_is_drained() {
    if !privileged("long_lived_streams_keep_flowing_while_a_backend_is_added_and_theirs_is_drained") {
        return;
    }
    let topo = RoutedTopology::new(&unique_prefix("lbt-drain"), L2_BACKENDS, ROUTED_BACKENDS);
    let (l2, routed) = start_servers(&topo);
    let dir = TempDir::new("drain");
    let _decaps = decapsulators(&topo, &dir);
    // Backends 0 and 1 serve; backend 2 joins on reload.
    let reg = dir.write("services.yaml", &topo.registry(|_, _| vec![(0, 1), (1, 1)]));
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);

    // One stream per mode (IPv4 and IPv6), opened one after another so the backend whose open
    // connection count rises is the one serving it.
    let mut streams = Vec::new();
    for mode in Mode::ALL {
        for v6 in [false, true] {
            let servers = pool(mode, &l2, &routed);
            let port = mode.backend_port();
            let before: Vec<usize> = servers.iter().map(|s| s.served.open_on(port)).collect();
            let tag = format!("stream-{}-{}", mode.name(), family(v6));
            let stream = Stream::open(&topo, SocketAddr::new(vip(v6), mode.vip_port()), tag.clone());
            let serving: Vec<usize> =
                (0..servers.len()).filter(|&i| servers[i].served.open_on(port) > before[i]).collect();
            assert_eq!(serving.len(), 1, "{tag}: exactly one backend must hold the stream: {serving:?}");
            streams.push((mode, v6, serving[0], tag, stream));
        }
    }

    // Reload: backend 2 joins every service; each service's stream backend is drained
    // (weight 0: no new flows, existing ones kept).
    let drained = |mode: Mode, v6: bool| {
        streams.iter().find(|s| s.0 == mode && s.1 == v6).map(|s| s.2).expect("stream")
    };
    let text = topo.registry(|mode, v6| {
        let d = drained(mode, v6);
        (0..3).map(|i| (i, u32::from(i != d))).collect()
    });
    std::fs::write(&reg, text).expect("write registry");
    let rounds_at_reload: Vec<u64> = streams.iter().map(|s| s.4.rounds()).collect();
    assert_eq!(lbd.reload(), "reloaded", "{}", lbd.log());
    // The added backend takes new flows once its first health check passes.
    lb_tests::lbd::wait_status(&topo.lb.ns, "the added backend's first check", lb_tests::lbd::all_checked);
    // Every stream keeps flowing after the new tables are in place.
    for (s, at) in streams.iter().zip(&rounds_at_reload) {
        s.4.wait_rounds(at + 20);
    }

    // New flows avoid the drained backend and reach the new one.
    for mode in Mode::ALL {
        for v6 in [false, true] {
            let tag = format!("after-{}-{}", mode.name(), family(v6));
            let addr = SocketAddr::new(vip(v6), mode.vip_port());
            topo.client.ns.run(|| {
                for i in 0..FLOWS {
                    let data = payload(&tag, i, 100);
                    assert_eq!(tcp_exchange(addr, &data, true), data, "{tag}: TCP echo {i}");
                }
            });
            let servers = pool(mode, &l2, &routed);
            let got = |i: usize| {
                servers[i].served.tcp_received().iter().filter(|r| r.data.starts_with(tag.as_bytes())).count()
            };
            assert_eq!(got(drained(mode, v6)), 0, "{tag}: a drained backend takes no new flows");
            assert!(got(2) > 0, "{tag}: the added backend takes new flows");
        }
    }

    // Each stream stayed whole on the backend that first took it.
    for (mode, _, backend, tag, stream) in streams {
        let sent = stream.finish();
        let servers = pool(mode, &l2, &routed);
        let holders: Vec<usize> = (0..servers.len())
            .filter(|&i| servers[i].served.tcp_received().iter().any(|r| r.data.starts_with(tag.as_bytes())))
            .collect();
        assert_eq!(holders, vec![backend], "{tag}: the stream must stay on its backend");
        let whole =
            servers[backend].served.tcp_received().into_iter().find(|r| r.data.starts_with(tag.as_bytes()));
        assert_eq!(whole.map(|r| r.data), Some(sent), "{tag}: the backend must have every byte, in order");
    }
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}
