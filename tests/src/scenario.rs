//! A fixed data-plane scenario: VIPs in every mode and both families over synthetic backends,
//! shared by the host model tests, the kernel/model differential test and the XDP benchmark.

use std::{net::IpAddr, path::Path};

use lb_userspace::{
    config,
    plan::{self, DataPlan, Ids, NodeFacts, Resolutions, Resolved},
};

pub const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
pub const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
pub const NODE_V4: &str = "10.9.0.2";
pub const NODE_V6: &str = "2001:db8::2";

/// Backends of the `l2` service in the default scenario.
pub const THREE: &str = "      - {host: 10.9.0.11, port: 80}\n      - {host: 10.9.0.12, port: 80}\n      - {host: 10.9.0.13, port: 80}\n";

/// A VIP of the scenario: `(service, VIP, port, mode)`.
pub const VIPS: &[(&str, &str, u16, &str)] = &[
    ("l2", "10.9.100.1", 80, "dsr-l2"),
    ("l2v6", "2001:db8:100::1", 80, "dsr-l2"),
    ("tunnel", "10.9.100.2", 443, "dsr-ipip"),
    ("tunnel6", "2001:db8:100::2", 443, "dsr-ipip"),
    ("tunnel46", "10.9.100.3", 443, "dsr-ipip"),
    ("nat", "10.9.100.4", 80, "nat"),
    ("nat6", "2001:db8:100::4", 80, "nat"),
];

/// The scenario registry with `l2_backends` (YAML list items) for the `l2` service, NAT ports
/// `nat_ports` and the given UDP timeout.
#[must_use]
pub fn registry(l2_backends: &str, nat_ports: &str, timeouts: &str) -> String {
    format!(
        "
version: 1
datapath:
  nat_ports: {nat_ports}
{timeouts}
tcp:
  l2:
    vip: 10.9.100.1
    port: 80
    protocols: [tcp, udp]
    deny: [192.0.2.0/24, 10.9.0.99]
    backends:
{l2_backends}
  l2v6:
    vip: 2001:db8:100::1
    port: 80
    protocols: [tcp, udp]
    deny: [2001:db8:9::/48]
    backends:
      - {{host: 2001:db8::11, port: 80}}
      - {{host: 2001:db8::12, port: 80}}
  tunnel:
    vip: 10.9.100.2
    port: 443
    mode: dsr-ipip
    protocols: [tcp, udp]
    backends:
      - {{host: 10.9.0.11, port: 443}}
      - {{host: 10.9.0.12, port: 443}}
  tunnel6:
    vip: 2001:db8:100::2
    port: 443
    mode: dsr-ipip
    protocols: [tcp, udp]
    backends:
      - {{host: 2001:db8::11, port: 443}}
  tunnel46:
    vip: 10.9.100.3
    port: 443
    mode: dsr-ipip
    protocols: [tcp, udp]
    backends:
      - {{host: 2001:db8::12, port: 443}}
  nat:
    vip: 10.9.100.4
    port: 80
    mode: nat
    protocols: [tcp, udp]
    backends:
      - {{host: 10.9.0.11, port: 8080}}
      - {{host: 10.9.0.13, port: 8080}}
  nat6:
    vip: 2001:db8:100::4
    port: 80
    mode: nat
    protocols: [tcp, udp]
    backends:
      - {{host: 2001:db8::12, port: 8080}}
"
    )
}

/// The MAC the scenario gives a backend (or a next hop): derived from its address.
#[must_use]
pub fn backend_mac(addr: IpAddr) -> [u8; 6] {
    let o = match addr {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    [2, 0, 0, 0, 1, o]
}

/// Every scenario backend resolved, on-link.
#[must_use]
pub fn resolutions() -> Resolutions {
    ["10.9.0.11", "10.9.0.12", "10.9.0.13", "10.9.0.14", "2001:db8::11", "2001:db8::12"]
        .iter()
        .map(|h| {
            let addr: IpAddr = h.parse().expect("address");
            ((*h).to_owned(), Ok(Resolved { addr, mac: backend_mac(addr), via: None }))
        })
        .collect()
}

#[must_use]
pub fn node() -> NodeFacts {
    NodeFacts { mac: NODE_MAC, addr_v4: NODE_V4.parse().ok(), addr_v6: NODE_V6.parse().ok() }
}

/// The plan of registry text `src` on the scenario node, keeping ids from `prev`.
///
/// # Panics
/// When `src` is not a valid registry.
#[must_use]
pub fn plan(src: &str, prev: &Ids) -> DataPlan {
    let reg = config::parse(src, Path::new("scenario.yaml")).expect("valid registry");
    plan::plan(&reg, &node(), &resolutions(), prev, &plan::Overrides::default()).0
}
