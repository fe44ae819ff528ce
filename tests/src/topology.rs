//! The test topology: one L2 segment (a bridge in a "switch" namespace) joining a client, an
//! lb node and backends, each in its own namespace.
//!
//! ```text
//!  client 10.10.0.10 ──┐
//!  lb     10.10.0.2  ──┤ br0 (switch namespace)
//!  b1..bN 10.10.0.11+ ─┘      VIP 10.10.100.1: routed by the client to lb; on backends' lo
//! ```

use std::{fmt::Write as _, net::Ipv4Addr};

use lb_userspace::loader::PassProgram;

use crate::netns::{NetNs, sh};

pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 10);
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 0, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 10, 100, 1);
const PREFIX_LEN: u8 = 24;

/// `i`-th backend's address (0-based).
#[must_use]
pub fn backend_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 0, 11 + u8::try_from(i).expect("few backends"))
}

/// Locally administered MAC derived from a host's address, so tests can tell hosts apart
/// by the source MAC of a frame.
#[must_use]
pub fn mac_of(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x02, 0x00, o[0], o[1], o[2], o[3]]
}

/// A registry with two services on [`VIP`] over `backends` backends: `web` on `http`/tcp and
/// `echo` on `echo`/tcp+udp, both `dsr-l2`.
#[must_use]
pub fn dsr_registry(backends: usize, http: u16, echo: u16) -> String {
    let list = |port: u16| -> String {
        let mut s = String::new();
        for i in 0..backends {
            let _ = write!(s, "      - host: {}\n        port: {port}\n", backend_ip(i));
        }
        s
    };
    format!(
        "\
# Two services on one VIP, balanced in XDP by direct server return.
version: 1
tcp:
  web:
    vip: {VIP}
    port: {http}
    backends:
{web}  echo:
    vip: {VIP}
    port: {echo}
    protocols: [tcp, udp]
    backends:
{echo_list}",
        web = list(http),
        echo_list = list(echo),
    )
}

#[must_use]
pub fn mac_str(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Joins `ns` to `bridge` in `switch` with a veth pair: `iface` (address `mac`) in `ns`, `peer`
/// a port of the bridge, up.
pub fn plug(switch: &NetNs, bridge: &str, ns: &NetNs, iface: &str, mac: [u8; 6], peer: &str) {
    sh(std::process::Command::new("ip").args([
        "link",
        "add",
        iface,
        "netns",
        ns.name(),
        "address",
        &mac_str(mac),
        "type",
        "veth",
        "peer",
        "name",
        peer,
        "netns",
        switch.name(),
    ]));
    switch.ip(&["link", "set", peer, "master", bridge, "up"]);
}

/// One host on the segment; its interface is `eth0`.
pub struct Host {
    pub ns: NetNs,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The host's veth peer in the switch namespace.
    pub peer: String,
}

/// Client, lb node and backends on one segment, configured for direct server return.
pub struct DsrTopology {
    /// `XDP_PASS` on the lb's peer port: native `XDP_TX` on a veth delivers only when the peer
    /// runs an XDP program too.
    _peer_pass: PassProgram,
    pub client: Host,
    pub lb: Host,
    pub backends: Vec<Host>,
    pub switch: NetNs,
}

impl DsrTopology {
    /// Builds the topology with namespaces named `{prefix}-sw`, `{prefix}-client`,
    /// `{prefix}-lb`, `{prefix}-b1`...
    ///
    /// # Panics
    /// When any setup command fails.
    #[must_use]
    pub fn new(prefix: &str, backends: usize) -> Self {
        let switch = NetNs::new(&format!("{prefix}-sw"));
        switch.ip(&["link", "add", "br0", "type", "bridge"]);
        switch.ip(&["link", "set", "br0", "up"]);
        let host = |role: &str, ip: Ipv4Addr| {
            let ns = NetNs::new(&format!("{prefix}-{role}"));
            let mac = mac_of(ip);
            let peer = format!("p-{role}");
            plug(&switch, "br0", &ns, "eth0", mac, &peer);
            ns.ip(&["addr", "add", &format!("{ip}/{PREFIX_LEN}"), "dev", "eth0"]);
            ns.ip(&["link", "set", "eth0", "up"]);
            Host { ns, ip, mac, peer }
        };

        let client = host("client", CLIENT_IP);
        client.ns.ip(&["route", "add", &format!("{VIP}/32"), "via", &LB_IP.to_string()]);
        // Frames that pass through native XDP_TX on a veth lose the checksum-offload state,
        // so the sender must compute checksums itself (a veth artefact, not a NIC one).
        sh(client.ns.command("ethtool").args(["-K", "eth0", "tx", "off"]));

        let lb = host("lb", LB_IP);
        let backends: Vec<Host> = (0..backends)
            .map(|i| {
                let b = host(&format!("b{}", i + 1), backend_ip(i));
                // The VIP lives on loopback so the backend accepts VIP traffic and answers
                // from the VIP, but never answers ARP for it.
                b.ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]);
                b.ns.sysctl("net/ipv4/conf/all/arp_ignore", "1");
                b.ns.sysctl("net/ipv4/conf/all/arp_announce", "2");
                b
            })
            .collect();
        let peer_pass =
            switch.run(|| PassProgram::attach(&lb.peer)).expect("attach XDP_PASS to the lb's peer");
        Self { _peer_pass: peer_pass, client, lb, backends, switch }
    }
}
