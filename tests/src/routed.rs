//! A dual-stack topology of three routed segments, for every forwarding mode at once.
//!
//! ```text
//!  client 10.30.0.10 fd20:2::10 ── edge ──┐ .1
//!                                       router ── back ──┬── r1..rN 10.21.0.11+ fd20:1::11+
//!  lb     10.20.0.2  fd20::2   ──┐    .1  │  .1           (dsr-ipip and nat backends)
//!  l1..lM 10.20.0.21+ fd20::21+ ─┴─ front ┘
//!    (dsr-l2 backends, on the lb's segment)
//!
//!  VIPs 10.20.100.1 and fd20:100::1: routed by the router to lb, on every backend's loopback.
//! ```
//!
//! The client's link has a 1500-byte MTU, like the Internet behind it; the data centre side
//! carries 1600-byte frames so IPIP / IP6IP6 packets built from the client's full-size
//! packets fit, as on a fabric sized for the tunnel overhead.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_userspace::loader::PassProgram;

use crate::{
    netns::{NetNs, sh},
    topology::{mac_of, plug},
};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 20, 100, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd20, 0x100, 0, 0, 0, 0, 0, 1);
pub const CLIENT_MTU: u16 = 1500;
/// MTU of every link but the client's: room for a 40-byte outer IPv6 header.
pub const FABRIC_MTU: u16 = 1600;

/// Ports of the scenario's services, one per mode.
pub const L2_PORT: u16 = 7;
pub const IPIP_PORT: u16 = 8;
pub const NAT_PORT: u16 = 9;
/// NAT backends listen on another port than the VIP's: NAT translates ports too.
pub const NAT_BACKEND_PORT: u16 = 9009;
/// Every echo port a backend serves.
pub const ECHO_PORTS: &[u16] = &[L2_PORT, IPIP_PORT, NAT_BACKEND_PORT];

/// A forwarding mode as the registry spells it, with the port its services use here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    DsrL2,
    DsrIpip,
    Nat,
}

impl Mode {
    pub const ALL: [Self; 3] = [Self::DsrL2, Self::DsrIpip, Self::Nat];

    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::DsrL2 => "dsr-l2",
            Self::DsrIpip => "dsr-ipip",
            Self::Nat => "nat",
        }
    }

    /// The VIP port of this mode's services.
    #[must_use]
    pub fn vip_port(self) -> u16 {
        match self {
            Self::DsrL2 => L2_PORT,
            Self::DsrIpip => IPIP_PORT,
            Self::Nat => NAT_PORT,
        }
    }

    /// The port backends serve this mode's services on.
    #[must_use]
    pub fn backend_port(self) -> u16 {
        if self == Self::Nat { NAT_BACKEND_PORT } else { self.vip_port() }
    }
}

/// One dual-stack host; its interface toward its segment is `eth0`.
pub struct Node {
    pub ns: NetNs,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    pub mac: [u8; 6],
}

impl Node {
    #[must_use]
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 { self.v6.into() } else { self.v4.into() }
    }
}

/// `fd20:NET::HOST`, the host part written with the IPv4 host number's digits (10 -> `::10`),
/// so a host's two addresses read alike.
fn v6(net: u16, host: u16) -> Ipv6Addr {
    let host = u16::from_str_radix(&host.to_string(), 16).expect("digits");
    Ipv6Addr::new(0xfd20, net, 0, 0, 0, 0, 0, host)
}

/// A host namespace plugged into `bridge` with `v4`/24 and `v6`/64 (no duplicate address
/// detection: the addresses are usable at once, and unique by construction).
fn node(
    prefix: &str,
    role: &str,
    switch: &NetNs,
    bridge: &str,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    mtu: u16,
) -> Node {
    let ns = NetNs::new(&format!("{prefix}-{role}"));
    ns.sysctl("net/ipv6/conf/default/accept_dad", "0");
    ns.sysctl("net/ipv6/conf/all/accept_dad", "0");
    let mac = mac_of(v4);
    let peer = format!("{}-{role}", &bridge[..1]);
    plug(switch, bridge, &ns, "eth0", mac, &peer);
    let mtu = mtu.to_string();
    switch.ip(&["link", "set", &peer, "mtu", &mtu]);
    ns.ip(&["link", "set", "eth0", "mtu", &mtu]);
    ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
    ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    Node { ns, v4, v6, mac }
}

/// Puts the VIPs on `n`'s loopback so it accepts VIP traffic and answers from the VIP, and
/// keeps it from answering ARP for them.
fn host_vips(n: &Node) {
    n.ns.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"]);
    n.ns.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"]);
    n.ns.sysctl("net/ipv4/conf/all/arp_ignore", "1");
    n.ns.sysctl("net/ipv4/conf/all/arp_announce", "2");
    // Frames a backend sends through lb's XDP (NAT replies) must carry finished checksums:
    // XDP on a veth sees a checksum-offloaded packet unfinished.
    sh(n.ns.command("ethtool").args(["-K", "eth0", "tx", "off"]));
}

fn default_route(n: &Node, v4: Ipv4Addr, v6: Ipv6Addr) {
    n.ns.ip(&["route", "add", "default", "via", &v4.to_string()]);
    n.ns.ip(&["-6", "route", "add", "default", "via", &v6.to_string()]);
}

/// Another interface of the router, `iface` on `bridge` with `addrs` (/24 and /64).
fn router_leg(
    switch: &NetNs,
    router: &NetNs,
    bridge: &str,
    iface: &str,
    addrs: (Ipv4Addr, Ipv6Addr),
    mtu: u16,
) {
    let peer = format!("{}-router", &bridge[..1]);
    plug(switch, bridge, router, iface, mac_of(addrs.0), &peer);
    let mtu = mtu.to_string();
    switch.ip(&["link", "set", &peer, "mtu", &mtu]);
    router.ip(&["link", "set", iface, "mtu", &mtu]);
    router.ip(&["addr", "add", &format!("{}/24", addrs.0), "dev", iface]);
    router.ip(&["addr", "add", &format!("{}/64", addrs.1), "dev", iface, "nodad"]);
    router.ip(&["link", "set", iface, "up"]);
}

/// The client behind a router; the lb node and dsr-l2 backends on the front segment;
/// dsr-ipip / nat backends on the back segment.
pub struct RoutedTopology {
    /// `XDP_PASS` on the lb's bridge port: native `XDP_TX` on a veth delivers only when the
    /// peer runs an XDP program too.
    _peer_pass: PassProgram,
    pub client: Node,
    pub lb: Node,
    /// Backends on the lb's segment (dsr-l2).
    pub l2_backends: Vec<Node>,
    /// Backends one routed hop away (dsr-ipip and nat).
    pub routed_backends: Vec<Node>,
    pub router: NetNs,
    pub switch: NetNs,
}

impl RoutedTopology {
    /// Builds it with namespaces `{prefix}-sw`, `-router`, `-client`, `-lb`, `-l1`..., `-r1`...
    ///
    /// # Panics
    /// When any setup command fails.
    #[must_use]
    pub fn new(prefix: &str, l2_backends: usize, routed_backends: usize) -> Self {
        let switch = NetNs::new(&format!("{prefix}-sw"));
        for br in ["front", "back", "edge"] {
            switch.ip(&["link", "add", br, "type", "bridge"]);
            switch.ip(&["link", "set", br, "up"]);
        }
        let front = |role: &str, host: u8, mtu| {
            node(prefix, role, &switch, "front", Ipv4Addr::new(10, 20, 0, host), v6(0, host.into()), mtu)
        };
        let router = front("router", 1, FABRIC_MTU);
        router_leg(&switch, &router.ns, "back", "eth1", (Ipv4Addr::new(10, 21, 0, 1), v6(1, 1)), FABRIC_MTU);
        router_leg(&switch, &router.ns, "edge", "eth2", (Ipv4Addr::new(10, 30, 0, 1), v6(2, 1)), CLIENT_MTU);
        router.ns.sysctl("net/ipv4/ip_forward", "1");
        router.ns.sysctl("net/ipv6/conf/all/forwarding", "1");
        router.ns.ip(&["route", "add", &format!("{VIP4}/32"), "via", "10.20.0.2"]);
        router.ns.ip(&["-6", "route", "add", &format!("{VIP6}/128"), "via", &v6(0, 2).to_string()]);

        let client =
            node(prefix, "client", &switch, "edge", Ipv4Addr::new(10, 30, 0, 10), v6(2, 10), CLIENT_MTU);
        default_route(&client, Ipv4Addr::new(10, 30, 0, 1), v6(2, 1));
        // Frames that pass through native XDP_TX on a veth lose the checksum-offload state, so
        // the sender must compute checksums itself (a veth artefact, not a NIC one).
        sh(client.ns.command("ethtool").args(["-K", "eth0", "tx", "off"]));
        let lb = front("lb", 2, FABRIC_MTU);
        default_route(&lb, Ipv4Addr::new(10, 20, 0, 1), v6(0, 1));

        let l2_backends: Vec<Node> = (0..l2_backends)
            .map(|i| {
                let n = front(&format!("l{}", i + 1), 21 + u8::try_from(i).expect("few"), FABRIC_MTU);
                host_vips(&n);
                default_route(&n, Ipv4Addr::new(10, 20, 0, 1), v6(0, 1));
                n
            })
            .collect();
        let routed_backends: Vec<Node> = (0..routed_backends)
            .map(|i| {
                let host = 11 + u8::try_from(i).expect("few");
                let n = node(
                    prefix,
                    &format!("r{}", i + 1),
                    &switch,
                    "back",
                    Ipv4Addr::new(10, 21, 0, host),
                    v6(1, host.into()),
                    FABRIC_MTU,
                );
                host_vips(&n);
                default_route(&n, Ipv4Addr::new(10, 21, 0, 1), v6(1, 1));
                n
            })
            .collect();
        let peer_pass =
            switch.run(|| PassProgram::attach("f-lb")).expect("attach XDP_PASS to the lb's bridge port");
        Self { _peer_pass: peer_pass, client, lb, l2_backends, routed_backends, router: router.ns, switch }
    }

    /// The backends of `mode`'s services.
    #[must_use]
    pub fn backends(&self, mode: Mode) -> &[Node] {
        if mode == Mode::DsrL2 { &self.l2_backends } else { &self.routed_backends }
    }

    /// A registry with one service per mode and family (`{mode}-v4`, `{mode}-v6`), each over
    /// the backends `pool(mode, v6)` picks as `(index, weight)`.
    #[must_use]
    pub fn registry(&self, pool: impl Fn(Mode, bool) -> Vec<(usize, u32)>) -> String {
        let mut s = String::from("# One service per forwarding mode and address family.\nversion: 1\ntcp:\n");
        for mode in Mode::ALL {
            for v6 in [false, true] {
                let (family, vip): (_, IpAddr) = if v6 { ("v6", VIP6.into()) } else { ("v4", VIP4.into()) };
                let _ = write!(
                    s,
                    "  {mode}-{family}:\n    vip: {vip}\n    port: {port}\n    mode: {mode}\n    protocols: [tcp, udp]\n    backends:\n",
                    mode = mode.name(),
                    port = mode.vip_port(),
                );
                for (i, weight) in pool(mode, v6) {
                    let host = self.backends(mode)[i].addr(v6);
                    let port = mode.backend_port();
                    let _ = writeln!(s, "      - {{host: \"{host}\", port: {port}, weight: {weight}}}");
                }
            }
        }
        s
    }
}
