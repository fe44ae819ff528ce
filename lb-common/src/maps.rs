//! BPF map names, sizes, keys and values.
//!
//! Every value is `#[repr(C)]` with explicit padding fields and no `bool`/`Option`/enum, so
//! its layout is the same in the kernel and in userspace; a size assert next to each type
//! catches drift. Addresses are 16 bytes; IPv4 uses the first four ([`Addr`]). Structs holding
//! addresses are 4- or 8-byte aligned, so the BPF backend copies them in words, not bytes (which
//! costs stack and instructions on the hot path).
#![expect(clippy::pub_underscore_fields, reason = "explicit padding fields that users of these types zero")]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Virtual services: [`VipKey`] -> [`VipInfo`].
pub const VIPS: &str = "LB_VIPS";
/// Addresses that carry at least one VIP: [`AddrKey`] -> `u32` (unused); answers ICMP echo.
pub const VIP_ADDRS: &str = "LB_VIP_ADDRS";
/// Maglev tables: outer array of per-table inner arrays of backend ids ([`VipInfo::table`]).
pub const TABLES: &str = "LB_TABLES";
/// Backend records: backend id -> [`Backend`].
pub const BACKENDS: &str = "LB_BACKENDS";
/// This node's own data plane facts: index 0 -> [`NodeConfig`].
pub const NODE: &str = "LB_NODE";
/// Connection tracking: client flow [`FlowKey`] -> [`CtEntry`].
pub const CONNTRACK: &str = "LB_CONNTRACK";
/// NAT replies: backend-side [`FlowKey`] (backend -> node) -> [`NatEntry`].
pub const NAT: &str = "LB_NAT";
/// IP fragments of tracked datagrams: [`FragKey`] -> [`FragEntry`].
pub const FRAGMENTS: &str = "LB_FRAGMENTS";
/// Per-CPU global counters: [`crate::datapath::Counter`] as index -> `u64`.
pub const COUNTERS: &str = "LB_COUNTERS";
/// Per-CPU per-VIP traffic: `VipInfo::id` -> [`Traffic`].
pub const VIP_STATS: &str = "LB_VIP_STATS";
/// Per-CPU per-backend traffic: backend id -> [`Traffic`].
pub const BACKEND_STATS: &str = "LB_BACKEND_STATS";
/// Sources denied per VIP entry: longest-prefix trie of [`DenyKey`] -> `u32` (unused); read only
/// for VIP entries with [`VIP_F_DENY`].
pub const DENY: &str = "LB_DENY";
/// Decapsulation program: local addresses whose tunnelled packets it unwraps.
pub const DECAP_ADDRS: &str = "LB_DECAP_ADDRS";

/// Version of the pinned maps' layout (their set, types, keys, values and meaning). lbd pins
/// its state under a directory named after it and never reuses state of another version:
/// bump it with any such change.
pub const MAP_LAYOUT_VERSION: u32 = 2;
/// The maps that hold the balancer's state across restarts (pinned in bpffs). The deny lists
/// too: the program keeps running while lbd restarts, and must keep refusing meanwhile.
pub const PINNED: [&str; 12] = [
    VIPS,
    VIP_ADDRS,
    TABLES,
    BACKENDS,
    NODE,
    CONNTRACK,
    NAT,
    FRAGMENTS,
    COUNTERS,
    VIP_STATS,
    BACKEND_STATS,
    DENY,
];

/// VIP entries (VIP, port, protocol) a registry may hold.
pub const MAX_VIPS: u32 = 1024;
/// Backends (distinct `host:port`) a registry may hold.
pub const MAX_BACKENDS: u32 = 4096;
/// Id spaces in the maps: twice the registry limits, because the ids a reload frees stay
/// reserved until it is done (old tables and VIP records point at them meanwhile), so a reload
/// that replaces everything needs the old ids and the new ones at once.
pub const VIP_IDS: u32 = 2 * MAX_VIPS;
pub const BACKEND_IDS: u32 = 2 * MAX_BACKENDS;
/// Maglev tables: one per service (at most one per VIP entry), old and new during a reload.
pub const MAX_TABLES: u32 = 2 * MAX_VIPS;
/// Default connection-tracking capacity in flows (about 120 bytes of kernel memory each);
/// lbd's `--conntrack-size` changes it.
pub const DEFAULT_CONNTRACK_SIZE: u32 = 1 << 18;
/// NAT reply entries (one per flow in `nat` mode).
pub const DEFAULT_NAT_SIZE: u32 = 1 << 18;
/// Fragmented datagrams tracked at once.
pub const FRAGMENTS_SIZE: u32 = 1 << 13;
/// Addresses the decapsulation program serves.
pub const MAX_DECAP_ADDRS: u32 = 64;
/// Source ranges the deny lists of all VIP entries hold together.
pub const MAX_DENY: u32 = 16_384;
/// Inner-map flag: tables of any size fit the outer map's template.
pub const BPF_F_INNER_MAP: u32 = 4096;
/// A Maglev slot with no backend (every backend drained): new flows are dropped.
pub const NO_BACKEND: u32 = u32::MAX;

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_IPV6: u8 = 41;
pub const PROTO_ICMPV6: u8 = 58;

/// Forwarding modes ([`VipInfo::mode`]).
pub const MODE_DSR_L2: u8 = 1;
pub const MODE_DSR_IPIP: u8 = 2;
pub const MODE_NAT: u8 = 3;

/// [`Backend::flags`]: the backend may receive traffic (resolved, healthy, in the registry).
/// Flows tracked to a backend without it are re-balanced.
pub const BACKEND_ALIVE: u8 = 1;
/// [`Backend::flags`]: its health check fails. Tracked flows continue (a check can be wrong
/// while connections work), but a connection opening again (a pure SYN) is re-balanced: a
/// retransmitted SYN, or a reused source port, must not wait on a dead backend.
pub const BACKEND_DOWN: u8 = 2;

/// [`CtEntry::state`] of a TCP flow.
pub const TCP_SYN_SEEN: u8 = 1;
pub const TCP_ESTABLISHED: u8 = 2;
/// FIN or RST seen: the entry (and its NAT port) is released soon.
pub const TCP_CLOSING: u8 = 3;
/// [`CtEntry::state`] of a UDP flow.
pub const UDP_ACTIVE: u8 = 4;

/// [`FragEntry::kind`].
pub const FRAG_FORWARD: u8 = 1;
pub const FRAG_NAT_REPLY: u8 = 2;

/// An IPv4 or IPv6 address in 16 bytes; IPv4 in the first four, the rest zero.
pub type Addr = [u8; 16];

/// `addr` widened to an [`Addr`].
#[must_use]
pub const fn addr_v4(addr: [u8; 4]) -> Addr {
    let mut a = [0; 16];
    a[0] = addr[0];
    a[1] = addr[1];
    a[2] = addr[2];
    a[3] = addr[3];
    a
}

/// The address in `addr` of the given family.
#[must_use]
pub fn ip_of(family: u8, addr: &Addr) -> IpAddr {
    if family == FAMILY_IPV6 {
        IpAddr::V6(Ipv6Addr::from(*addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    }
}

/// Family and [`Addr`] of `ip`.
#[must_use]
pub fn addr_of(ip: IpAddr) -> (u8, Addr) {
    match ip {
        IpAddr::V4(a) => (FAMILY_IPV4, addr_v4(a.octets())),
        IpAddr::V6(a) => (FAMILY_IPV6, a.octets()),
    }
}

/// Identifies a virtual service as it appears in a packet: destination address, destination
/// port (network byte order, as on the wire), IP protocol and address family.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: Addr,
    pub port: [u8; 2],
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

impl VipKey {
    #[must_use]
    pub fn new(ip: IpAddr, port: u16, proto: u8) -> Self {
        let (family, addr) = addr_of(ip);
        Self { addr, port: port.to_be_bytes(), proto, family }
    }

    #[must_use]
    pub fn ip(&self) -> IpAddr {
        ip_of(self.family, &self.addr)
    }
}

/// An address alone (ICMP echo to a VIP address, decapsulation targets).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    pub addr: Addr,
    pub family: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<AddrKey>() == 20);

impl AddrKey {
    #[must_use]
    pub fn new(ip: IpAddr) -> Self {
        let (family, addr) = addr_of(ip);
        Self { addr, family, _pad: [0; 3] }
    }
}

/// What the data plane knows about a virtual service.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipInfo {
    /// Stats slot; below [`VIP_IDS`].
    pub id: u32,
    /// Slot of this VIP's Maglev table in the outer [`TABLES`] map.
    pub table: u32,
    /// Number of slots of that table (a prime).
    pub table_size: u32,
    /// One of the `MODE_*` constants.
    pub mode: u8,
    /// `VIP_F_*` bits.
    pub flags: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 16);

/// A byte with its top `n` bits set (`n` at most 8).
#[expect(clippy::cast_possible_truncation, reason = "the low byte is the mask")]
const fn top_bits(n: u32) -> u8 {
    // A u16 so that a shift by 8 is defined.
    (0xff00u16 >> n) as u8
}

/// [`VipInfo::flags`]: the VIP entry has a deny list in [`DENY`], so its packets pay for a lookup
/// there and others do not.
pub const VIP_F_DENY: u8 = 1;

/// Data of a [`DENY`] trie key: the VIP entry's id (big-endian, always matched whole) then the
/// source address. A key's prefix length is 32 plus the range's length in [`Addr`] bits; a VIP
/// entry's clients are all of its family, so IPv4 ranges and IPv6 ranges never meet.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DenyKey {
    pub vip_id: [u8; 4],
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<DenyKey>() == 20);

impl DenyKey {
    /// The trie's prefix length for a range of `bits` bits of the address.
    #[must_use]
    pub const fn prefix_len(bits: u32) -> u32 {
        32 + bits
    }

    /// Whether `self`, a range of `bits` bits, holds the key `other` (as the trie decides).
    #[must_use]
    pub fn covers(&self, bits: u32, other: &Self) -> bool {
        if self.vip_id != other.vip_id {
            return false;
        }
        let mut left = bits;
        for (a, b) in self.addr.iter().zip(other.addr.iter()) {
            let take = left.min(8);
            if take == 0 {
                break;
            }
            let mask = top_bits(take);
            if a & mask != b & mask {
                return false;
            }
            left -= take;
        }
        true
    }
}

/// A backend as the data plane needs it to forward a packet.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address (the IPIP outer destination, the NAT destination).
    pub addr: Addr,
    /// Link-layer address of the next hop towards the backend (the backend itself on-link).
    pub mac: [u8; 6],
    /// Backend port, network order (the NAT destination port).
    pub port: [u8; 2],
    pub family: u8,
    /// `BACKEND_*` flags.
    pub flags: u8,
    pub _pad: [u8; 2],
    /// Bumped whenever this id is given to a different backend: tracked flows remember it, so
    /// a reused id never inherits another backend's flows.
    pub generation: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 32);

impl Backend {
    #[must_use]
    pub fn ip(&self) -> IpAddr {
        ip_of(self.family, &self.addr)
    }

    #[must_use]
    pub const fn is_alive(&self) -> bool {
        self.flags & BACKEND_ALIVE != 0
    }

    #[must_use]
    pub const fn is_down(&self) -> bool {
        self.flags & BACKEND_DOWN != 0
    }
}

/// Facts about the node the program runs on.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    /// This node's IPv6 address: the IPIP outer source and the NAT source.
    pub addr_v6: Addr,
    /// This node's IPv4 address.
    pub addr_v4: [u8; 4],
    /// MAC address of the interface the program is attached to; forwarded frames leave with it
    /// as their source, so switches never learn a client's address on the balancer's port.
    pub mac: [u8; 6],
    /// 1 once userspace has written this record.
    pub configured: u8,
    /// Which of `addr_v4` / `addr_v6` are set: bit 0 IPv4, bit 1 IPv6.
    pub has_addr: u8,
    /// NAT source ports, inclusive, host order.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// Idle timeouts in seconds.
    pub udp_timeout: u32,
    pub tcp_syn_timeout: u32,
    pub tcp_timeout: u32,
    pub tcp_closing_timeout: u32,
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 48);

pub const NODE_HAS_V4: u8 = 1;
pub const NODE_HAS_V6: u8 = 2;

impl NodeConfig {
    /// This node's address of `family`, if configured.
    #[must_use]
    pub fn addr(&self, family: u8) -> Option<Addr> {
        if family == FAMILY_IPV6 {
            (self.has_addr & NODE_HAS_V6 != 0).then_some(self.addr_v6)
        } else {
            (self.has_addr & NODE_HAS_V4 != 0).then(|| addr_v4(self.addr_v4))
        }
    }
}

/// A transport flow as seen in one direction.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// A tracked client flow.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    /// Last refresh (monotonic ns, refreshed at most once a second).
    pub last_seen: u64,
    pub backend: u32,
    pub generation: u32,
    pub vip_id: u32,
    /// NAT source port given to this flow (network order), `nat` mode only.
    pub nat_port: [u8; 2],
    /// `TCP_*` / `UDP_ACTIVE`.
    pub state: u8,
    /// The VIP's `MODE_*` when the flow was tracked: a reload that changes the mode re-balances
    /// the flow rather than send it on with state the new mode lacks (a NAT port).
    pub mode: u8,
    /// Link-layer source of the client's frames: NAT replies are sent back to it.
    pub peer_mac: [u8; 6],
    pub _pad2: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtEntry>() == 32);

/// How to turn a backend's reply into the client's view (`nat` mode).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatEntry {
    pub last_seen: u64,
    pub client: Addr,
    pub vip: Addr,
    pub client_port: [u8; 2],
    pub vip_port: [u8; 2],
    pub peer_mac: [u8; 6],
    pub state: u8,
    pub _pad: u8,
    pub backend: u32,
    pub vip_id: u32,
}
const _: () = assert!(core::mem::size_of::<NatEntry>() == 64);

/// Identifies the fragments of one datagram.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FragKey {
    pub src: Addr,
    pub dst: Addr,
    /// IPv4 identification (zero-extended) or IPv6 fragment id.
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// Where the later fragments of a datagram go, decided on its first fragment.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    pub last_seen: u64,
    /// `FRAG_*`.
    pub kind: u8,
    pub mode: u8,
    pub _pad: [u8; 2],
    pub backend: u32,
    pub generation: u32,
    pub vip_id: u32,
    /// `FRAG_NAT_REPLY`: the rewritten source (the VIP) and destination (the client).
    pub new_src: Addr,
    pub new_dst: Addr,
    pub peer_mac: [u8; 6],
    pub _pad2: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragEntry>() == 64);

/// Traffic counted per CPU.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<Traffic>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, built from integers and byte arrays, and have
    // no implicit padding (checked by the size asserts above).
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::CtEntry {}
    unsafe impl aya::Pod for super::NatEntry {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragEntry {}
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::DenyKey {}
}
