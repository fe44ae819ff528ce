//! The userspace L4 proxy (`mode: proxy`): each TCP connection, and each UDP flow (a client
//! address), relayed to one backend: this node's own first, else a healthy remote (seed
//! 003's "if the local port is bound, connect locally, else a healthy remote"). For nodes
//! where XDP cannot run and for services reached without a VIP, such as Redis.
//!
//! Health comes from the controller's probes (a `send`/`expect` check such as
//! `INFO replication` -> `role:master` passes only on a Redis primary); with `close_on_down`
//! a backend marked down has its open connections closed, so clients reconnect to the new
//! primary instead of writing to a demoted one.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    net::{TcpListener, TcpStream, UdpSocket},
    sync::watch,
};
use tracing::{debug, info, warn};

use super::{
    relay::relay,
    upstream::{BackendState, InFlight, clock},
};
use crate::config::{AllDown, L4Service, Protocol, Role};

/// Most backends one connection tries before it is closed.
const MAX_TRIES: usize = 3;

/// Largest UDP datagram relayed.
const DATAGRAM: usize = 65_535;

/// One backend of a proxied service.
#[derive(Debug)]
pub struct Member {
    pub state: Arc<BackendState>,
    host: String,
    port: u16,
    weight: u32,
    role: Role,
    local: bool,
}

/// A `mode: proxy` service as the proxy serves it.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    pub spec: L4Service,
    pub members: Vec<Member>,
    tick: AtomicUsize,
    udp_timeout: Duration,
}

impl Service {
    #[must_use]
    pub fn new(
        name: &str,
        spec: L4Service,
        node: Option<&str>,
        states: Vec<Arc<BackendState>>,
        udp_timeout: Duration,
    ) -> Self {
        let members = spec
            .all_backends()
            .zip(states)
            .map(|((b, role), state)| {
                let on_node = node.is_some() && b.node.as_deref() == node;
                let loopback = b.host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
                    || b.host == "localhost";
                Member {
                    state,
                    host: b.host.clone(),
                    port: b.port,
                    weight: b.weight,
                    role,
                    local: spec.proxy.local_first && (on_node || loopback),
                }
            })
            .collect();
        Self { name: name.to_owned(), spec, members, tick: AtomicUsize::new(0), udp_timeout }
    }

    /// The backend for a new connection, none of `tried`: the first usable of this node's
    /// primaries, other primaries, this node's fallbacks, other fallbacks; the fewest open
    /// connections for its weight within the tier (ties in turn). With none usable,
    /// `fail-open` takes any, `fail-closed` none.
    #[must_use]
    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let candidates = |usable_only: bool| {
            let tiers = [
                (Role::Primary, true),
                (Role::Primary, false),
                (Role::Fallback, true),
                (Role::Fallback, false),
            ];
            tiers.into_iter().find_map(|(role, local)| {
                let tier: Vec<usize> = (0..self.members.len())
                    .filter(|&i| {
                        let m = &self.members[i];
                        m.role == role
                            && m.local == local
                            && m.weight > 0
                            && !tried.contains(&i)
                            && (!usable_only || m.state.usable.load(Ordering::Relaxed))
                    })
                    .collect();
                (!tier.is_empty()).then_some(tier)
            })
        };
        let tier = candidates(true).or_else(|| match self.spec.when_all_down {
            AllDown::FailOpen => candidates(false),
            AllDown::FailClosed => None,
        })?;
        let start = self.tick.fetch_add(1, Ordering::Relaxed);
        let load = |i: usize| {
            let m = &self.members[i];
            u64::from(m.state.in_flight.load(Ordering::Relaxed)) * 1000 / u64::from(m.weight)
        };
        (0..tier.len()).map(|k| tier[(start + k) % tier.len()]).min_by_key(|&i| load(i))
    }
}

/// Serves TCP connections on `listener` until `stop` fires; each goes to the service
/// `current` says is on this socket now (a reload may change it).
pub async fn serve_tcp(
    listener: TcpListener,
    current: impl Fn() -> Option<Arc<Service>> + Send + 'static,
    mut stop: watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            accepted = listener.accept() => {
                let Ok((client, peer)) = accepted else {
                    // Out of descriptors, say: a pause, not a busy loop.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Some(svc) = current() else { continue };
                tokio::spawn(relay_tcp(svc, client, peer));
            }
        }
    }
}

async fn relay_tcp(svc: Arc<Service>, mut client: TcpStream, peer: SocketAddr) {
    tune(&client);
    let mut tried = Vec::with_capacity(MAX_TRIES);
    while tried.len() < MAX_TRIES {
        let Some(i) = svc.pick(&tried) else { break };
        tried.push(i);
        let m = &svc.members[i];
        // Watched from before the connect: a mark-down while it is made closes it too.
        let mut marked = m.state.marked_down.subscribe();
        let connect = TcpStream::connect((m.host.as_str(), m.port));
        let mut up = match tokio::time::timeout(svc.spec.proxy.connect_timeout, connect).await {
            Ok(Ok(up)) => up,
            Ok(Err(e)) => {
                m.state.failures.fetch_add(1, Ordering::Relaxed);
                warn!(service = %svc.name, backend = %m.state.identity, client = %peer, error = %e, "proxy: connect failed");
                continue;
            }
            Err(_) => {
                m.state.failures.fetch_add(1, Ordering::Relaxed);
                warn!(service = %svc.name, backend = %m.state.identity, client = %peer, "proxy: connect timed out");
                continue;
            }
        };
        tune(&up);
        let _open = InFlight::start(&m.state);
        let started = Instant::now();
        let close_on_down = svc.spec.proxy.close_on_down;
        let (sent, received, how) = tokio::select! {
            r = relay(&mut client, &mut up, None) => (r.from_a, r.from_b, r.end.as_str()),
            _ = marked.changed(), if close_on_down => (0, 0, "backend marked down"),
        };
        info!(
            target: "lb_userspace::access",
            service = %svc.name,
            client = %peer,
            upstream = %m.state.identity,
            sent,
            received,
            end = how,
            ms = format_args!("{:.3}", started.elapsed().as_secs_f64() * 1e3),
            "connection"
        );
        return;
    }
    warn!(service = %svc.name, client = %peer, tried = tried.len(), "proxy: no backend took the connection; closed");
}

/// No Nagle delay (requests and answers are relayed as they come), and keepalives so a peer
/// that vanished without a FIN does not hold its connection forever.
pub(super) fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let keepalive =
        socket2::TcpKeepalive::new().with_time(Duration::from_mins(1)).with_interval(Duration::from_secs(10));
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&keepalive);
}

/// One UDP flow: a client address and the socket connected to its backend.
struct Flow {
    up: Arc<UdpSocket>,
    /// Last datagram either way, [`clock`] nanoseconds.
    last: Arc<AtomicU64>,
}

/// Relays datagrams on `sock` until `stop` fires: each client address is a flow, sent to one
/// backend from its own socket; the backend's answers go back from `sock`. A flow ends after
/// the service's UDP timeout without traffic; beyond `max_udp_flows`, new clients' datagrams
/// are dropped.
pub async fn serve_udp(
    sock: UdpSocket,
    current: impl Fn() -> Option<Arc<Service>> + Send + 'static,
    mut stop: watch::Receiver<()>,
) {
    let sock = Arc::new(sock);
    let flows: Arc<Mutex<HashMap<SocketAddr, Flow>>> = Arc::default();
    let mut buf = vec![0u8; DATAGRAM];
    loop {
        let (n, client) = tokio::select! {
            _ = stop.changed() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "proxy: UDP receive");
                    continue;
                }
            },
        };
        let known = flows
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&client)
            .map(|f| (f.up.clone(), f.last.clone()));
        let (up, last) = if let Some(f) = known {
            f
        } else {
            let Some(svc) = current() else { continue };
            if flows.lock().unwrap_or_else(PoisonError::into_inner).len() >= svc.spec.proxy.max_udp_flows {
                debug!(service = %svc.name, %client, "proxy: UDP flow table full; datagram dropped");
                continue;
            }
            let Some((up, member)) = open_flow(&svc).await else {
                warn!(service = %svc.name, %client, "proxy: no backend for a UDP flow; datagram dropped");
                continue;
            };
            let up = Arc::new(up);
            let last = Arc::new(AtomicU64::new(clock(Instant::now())));
            flows
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(client, Flow { up: up.clone(), last: last.clone() });
            let flow = Answers {
                svc,
                member,
                client,
                up: up.clone(),
                sock: sock.clone(),
                last: last.clone(),
                flows: flows.clone(),
                stop: stop.clone(),
            };
            tokio::spawn(flow.run());
            (up, last)
        };
        last.store(clock(Instant::now()), Ordering::Relaxed);
        if let Err(e) = up.send(&buf[..n]).await {
            debug!(%client, error = %e, "proxy: UDP send to backend");
        }
    }
}

/// A socket connected to the backend picked for a new flow.
async fn open_flow(svc: &Service) -> Option<(UdpSocket, usize)> {
    let mut tried = Vec::with_capacity(MAX_TRIES);
    while tried.len() < MAX_TRIES {
        let i = svc.pick(&tried)?;
        tried.push(i);
        let m = &svc.members[i];
        let Some(addr) =
            tokio::net::lookup_host((m.host.as_str(), m.port)).await.ok().and_then(|mut a| a.next())
        else {
            m.state.failures.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let local: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(up) = UdpSocket::bind(local).await else { continue };
        if up.connect(addr).await.is_ok() {
            return Some((up, i));
        }
        m.state.failures.fetch_add(1, Ordering::Relaxed);
    }
    None
}

/// A flow's way back: its backend's answers go to its client from the listening socket.
struct Answers {
    svc: Arc<Service>,
    member: usize,
    client: SocketAddr,
    up: Arc<UdpSocket>,
    sock: Arc<UdpSocket>,
    last: Arc<AtomicU64>,
    flows: Arc<Mutex<HashMap<SocketAddr, Flow>>>,
    /// The socket's stop: a flow does not keep a stopped socket bound.
    stop: watch::Receiver<()>,
}

impl Answers {
    /// Sends the answers back until the flow has been idle for the UDP timeout, its backend is
    /// marked down (with `close_on_down`) or the socket stops; then forgets the flow. The
    /// buffer is taken per datagram, so an idle flow costs its socket and this task only.
    async fn run(mut self) {
        let m = &self.svc.members[self.member];
        let _open = InFlight::start(&m.state);
        let mut marked = m.state.marked_down.subscribe();
        let timeout = self.svc.udp_timeout;
        let close_on_down = self.svc.spec.proxy.close_on_down;
        loop {
            let idle =
                Duration::from_nanos(clock(Instant::now()).saturating_sub(self.last.load(Ordering::Relaxed)));
            if idle >= timeout {
                break;
            }
            tokio::select! {
                r = self.up.readable() => {
                    if r.is_err() {
                        break;
                    }
                    let mut buf = vec![0u8; DATAGRAM];
                    match self.up.try_recv(&mut buf) {
                        Ok(n) => {
                            self.last.store(clock(Instant::now()), Ordering::Relaxed);
                            let _ = self.sock.send_to(&buf[..n], self.client).await;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        // An ICMP error (port unreachable) for an earlier datagram.
                        Err(e) => debug!(client = %self.client, error = %e, "proxy: UDP from backend"),
                    }
                }
                () = tokio::time::sleep(timeout.saturating_sub(idle)) => {}
                _ = marked.changed(), if close_on_down => break,
                _ = self.stop.changed() => break,
            }
        }
        self.flows.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.client);
    }
}

/// Binds a proxied service's UDP socket (outside any runtime, so a busy port fails the reload
/// before anything changes).
/// `SO_REUSEPORT`: a reload that moves the service binds the new socket before the old one
/// stops.
pub fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Where a proxied service listens, per protocol.
#[must_use]
pub fn sockets(spec: &L4Service) -> Vec<(SocketAddr, Protocol)> {
    spec.protocols.iter().map(|&p| (SocketAddr::new(spec.proxy.listen, spec.port), p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(yaml: &str, node: Option<&str>) -> Service {
        let spec: L4Service = serde_yaml_ng::from_str(yaml).unwrap();
        let states =
            spec.all_backends().map(|(b, _)| Arc::new(BackendState::new("s", &b.identity()))).collect();
        Service::new("s", spec, node, states, Duration::from_mins(1))
    }

    const REDIS: &str = "port: 6379
mode: proxy
backends:
  - {host: 10.0.0.1, port: 6379, node: n1}
  - {host: 10.0.0.2, port: 6379, node: n2}
  - {host: 10.0.0.3, port: 6379, node: n3}
fallback:
  - {host: 10.0.1.1, port: 6379, node: n1}
";

    #[test]
    fn this_nodes_backend_first_then_healthy_remotes_then_fallbacks() {
        let svc = service(REDIS, Some("n2"));
        assert_eq!(svc.pick(&[]), Some(1), "the local backend");
        assert_eq!(svc.pick(&[]), Some(1), "always, while it is up");
        svc.members[1].state.usable.store(false, Ordering::Relaxed);
        let remote: Vec<_> = (0..4).map(|_| svc.pick(&[]).unwrap()).collect();
        assert!(remote.iter().all(|&i| i == 0 || i == 2), "{remote:?}");
        assert!(remote.contains(&0) && remote.contains(&2), "spread over the remotes: {remote:?}");
        assert_eq!(svc.pick(&[0]).map(|i| i == 2), Some(true), "a tried backend is skipped");
        svc.members[0].state.usable.store(false, Ordering::Relaxed);
        svc.members[2].state.usable.store(false, Ordering::Relaxed);
        assert_eq!(svc.pick(&[]), Some(3), "every primary down: the fallback");
        svc.members[3].state.usable.store(false, Ordering::Relaxed);
        assert!(svc.pick(&[]).is_some(), "fail-open by default: any");
        let closed = service(&format!("{REDIS}when_all_down: fail-closed\n"), Some("n2"));
        closed.members.iter().for_each(|m| m.state.usable.store(false, Ordering::Relaxed));
        assert_eq!(closed.pick(&[]), None, "fail-closed: none");
    }

    #[test]
    fn the_fewest_open_connections_win_within_a_tier_and_loopback_is_local() {
        let svc = service(REDIS, None);
        svc.members[0].state.in_flight.store(5, Ordering::Relaxed);
        svc.members[1].state.in_flight.store(1, Ordering::Relaxed);
        svc.members[2].state.in_flight.store(3, Ordering::Relaxed);
        assert_eq!(svc.pick(&[]), Some(1));
        let local = service(
            "port: 1\nmode: proxy\nbackends: [{host: 10.0.0.1, port: 1}, {host: 127.0.0.1, port: 1}]\n",
            None,
        );
        assert_eq!(local.pick(&[]), Some(1), "a loopback backend is this node's");
        let off = service(
            "port: 1\nmode: proxy\nproxy: {local_first: false}\nbackends: [{host: 10.0.0.1, port: 1}, {host: 127.0.0.1, port: 1}]\n",
            None,
        );
        let picks: Vec<_> = (0..4).map(|_| off.pick(&[]).unwrap()).collect();
        assert!(picks.contains(&0) && picks.contains(&1), "{picks:?}");
    }
}
