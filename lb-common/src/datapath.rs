//! The forwarding decision, written once for the kernel and the host.
//!
//! [`process`] reads a frame, decides what happens to it and rewrites it in place. The XDP
//! program runs it over the kernel's frame with BPF maps behind [`Tables`]; host tests run the
//! very same code over byte buffers with in-memory tables.
//!
//! Rules for frames that are not plainly "TCP or UDP to a VIP:port":
//! - not IPv4 (ARP, IPv6, VLAN-tagged, ...): passed to the stack, counted `PassNotIpv4`;
//! - truncated headers, IP version != 4, IHL < 5, a total length beyond the frame or too short
//!   to hold the ports: passed, counted `PassMalformed` (the stack drops and counts them
//!   itself; never forwarded);
//! - IPv4 fragments: passed, counted `PassFragment` (non-first fragments carry no ports, so a
//!   fragment can not be hashed to the same backend as its first piece);
//! - not TCP/UDP, or no VIP for the destination: passed, counted `PassNotVip`;
//! - for a VIP but addressed to another host's MAC: passed, counted `PassNotForNode`;
//! - VIP with no usable backend (or the node record not yet written): dropped, counted
//!   `DropNoBackend`; the VIP is not the node's own address, so the stack could only drop it too.

use crate::{
    hash::flow_hash_v4,
    maps::{
        Backend, MAX_BACKENDS_PER_VIP, NodeConfig, PROTO_TCP, PROTO_UDP, VipInfo, VipKey, vip_backend_index,
    },
    packet::{ETH_HLEN, ETH_P_IPV4, EthHdr, IPV4_MIN_HLEN, Ipv4Hdr, Packet, PortsHdr},
};

/// What happens to a frame after [`process`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Hand the frame to the node's own network stack, unchanged.
    Pass,
    /// Discard the frame.
    Drop,
    /// Send the (rewritten) frame back out of the interface it arrived on.
    Tx,
}

impl Action {
    /// The kernel's `enum xdp_action` value.
    #[must_use]
    pub const fn xdp_code(self) -> u32 {
        match self {
            Self::Drop => 1,
            Self::Pass => 2,
            Self::Tx => 3,
        }
    }

    /// The action for a kernel `enum xdp_action` value lb returns.
    #[must_use]
    pub const fn from_xdp_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::Drop),
            2 => Some(Self::Pass),
            3 => Some(Self::Tx),
            _ => None,
        }
    }
}

/// Global counters, indices into the `LB_COUNTERS` map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    PassNotIpv4 = 0,
    PassMalformed = 1,
    PassFragment = 2,
    PassNotVip = 3,
    PassNotForNode = 4,
    Forwarded = 5,
    DropNoBackend = 6,
}

impl Counter {
    /// Number of counters (size of the `LB_COUNTERS` map).
    pub const COUNT: u32 = 7;
    pub const ALL: [Self; Self::COUNT as usize] = [
        Self::PassNotIpv4,
        Self::PassMalformed,
        Self::PassFragment,
        Self::PassNotVip,
        Self::PassNotForNode,
        Self::Forwarded,
        Self::DropNoBackend,
    ];

    /// Stable name used in logs and metrics.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::PassNotIpv4 => "pass_not_ipv4",
            Self::PassMalformed => "pass_malformed",
            Self::PassFragment => "pass_fragment",
            Self::PassNotVip => "pass_not_vip",
            Self::PassNotForNode => "pass_not_for_node",
            Self::Forwarded => "forwarded",
            Self::DropNoBackend => "drop_no_backend",
        }
    }
}

/// The state the decision reads, and the counters it bumps: BPF maps in the kernel,
/// plain collections on the host.
pub trait Tables {
    fn vip(&self, key: &VipKey) -> Option<VipInfo>;
    /// Backend id at `index` of the flattened per-VIP backend lists ([`vip_backend_index`]).
    fn vip_backend(&self, index: u32) -> Option<u32>;
    fn backend(&self, id: u32) -> Option<Backend>;
    fn node(&self) -> Option<NodeConfig>;
    fn count(&self, counter: Counter);
    fn count_vip(&self, vip_id: u32, bytes: u64);
}

/// Decides the fate of one frame and rewrites it in place when it is forwarded.
#[inline(always)]
pub fn process<P: Packet, T: Tables>(pkt: &mut P, tables: &T) -> Action {
    let (action, counter) = decide(pkt, tables);
    tables.count(counter);
    action
}

#[inline(always)]
fn decide<P: Packet, T: Tables>(pkt: &mut P, tables: &T) -> (Action, Counter) {
    let Some(eth) = pkt.header::<EthHdr>(0) else {
        return (Action::Pass, Counter::PassMalformed);
    };
    if eth.ether_type != ETH_P_IPV4 {
        return (Action::Pass, Counter::PassNotIpv4);
    }
    let eth_dst = eth.dst;
    let Some(ip) = pkt.header::<Ipv4Hdr>(ETH_HLEN) else {
        return (Action::Pass, Counter::PassMalformed);
    };
    let ip = *ip;
    let ihl = ip.header_len();
    let tot_len = usize::from(u16::from_be_bytes(ip.tot_len));
    // Ethernet may pad a short datagram, but never cut one: tot_len beyond the frame is a
    // truncated datagram.
    if ip.version() != 4 || ihl < IPV4_MIN_HLEN || tot_len < ihl || tot_len > pkt.len() - ETH_HLEN {
        return (Action::Pass, Counter::PassMalformed);
    }
    if ip.is_fragment() {
        return (Action::Pass, Counter::PassFragment);
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return (Action::Pass, Counter::PassNotVip);
    }
    // The ports must lie inside the datagram, not in Ethernet padding after it.
    if tot_len < ihl + size_of::<PortsHdr>() {
        return (Action::Pass, Counter::PassMalformed);
    }
    let Some(ports) = pkt.header::<PortsHdr>(ETH_HLEN + ihl) else {
        return (Action::Pass, Counter::PassMalformed);
    };
    let ports = *ports;
    let key = VipKey::v4(ip.dst, u16::from_be_bytes(ports.dst), ip.proto);
    let Some(vip) = tables.vip(&key) else {
        return (Action::Pass, Counter::PassNotVip);
    };
    let node = match tables.node() {
        Some(node) if node.configured != 0 => node,
        _ => return (Action::Drop, Counter::DropNoBackend),
    };
    // A frame for another host (promiscuous NIC, a peer balancer's output on a shared segment)
    // is not ours to forward: sending it again could bounce it between balancers.
    if eth_dst != node.mac {
        return (Action::Pass, Counter::PassNotForNode);
    }
    if vip.backend_count == 0 || vip.backend_count > MAX_BACKENDS_PER_VIP {
        return (Action::Drop, Counter::DropNoBackend);
    }
    let hash = flow_hash_v4(ip.src, ip.dst, ports.src, ports.dst, ip.proto);
    let Some(backend) = tables
        .vip_backend(vip_backend_index(vip.id, hash % vip.backend_count))
        .and_then(|id| tables.backend(id))
    else {
        return (Action::Drop, Counter::DropNoBackend);
    };
    // Re-borrow the Ethernet header for writing; it was read above, so this cannot fail.
    let Some(eth) = pkt.header::<EthHdr>(0) else {
        return (Action::Pass, Counter::PassMalformed);
    };
    eth.dst = backend.mac;
    eth.src = node.mac;
    tables.count_vip(vip.id, pkt.len() as u64);
    (Action::Tx, Counter::Forwarded)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::cell::RefCell;
    use std::{collections::BTreeMap, vec, vec::Vec};

    use super::*;
    use crate::{
        maps::{FAMILY_IPV4, MODE_DSR_L2},
        packet::BytesPacket,
    };

    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
    const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const CLIENT: [u8; 4] = [10, 0, 0, 10];
    const VIP: [u8; 4] = [10, 0, 1, 1];

    #[derive(Default)]
    struct MemTables {
        vips: BTreeMap<VipKey, VipInfo>,
        lists: BTreeMap<u32, u32>,
        backends: BTreeMap<u32, Backend>,
        node: Option<NodeConfig>,
        counters: RefCell<BTreeMap<u32, u64>>,
        vip_bytes: RefCell<BTreeMap<u32, u64>>,
    }

    impl Tables for MemTables {
        fn vip(&self, key: &VipKey) -> Option<VipInfo> {
            self.vips.get(key).copied()
        }
        fn vip_backend(&self, index: u32) -> Option<u32> {
            self.lists.get(&index).copied()
        }
        fn backend(&self, id: u32) -> Option<Backend> {
            self.backends.get(&id).copied()
        }
        fn node(&self) -> Option<NodeConfig> {
            self.node
        }
        fn count(&self, counter: Counter) {
            *self.counters.borrow_mut().entry(counter as u32).or_default() += 1;
        }
        fn count_vip(&self, vip_id: u32, bytes: u64) {
            *self.vip_bytes.borrow_mut().entry(vip_id).or_default() += bytes;
        }
    }

    fn backend_mac(i: u8) -> [u8; 6] {
        [2, 0, 0, 0, 1, i]
    }

    /// One VIP (TCP and UDP on port 80) over `n` backends; a second, empty VIP on port 81.
    fn tables(n: u8) -> MemTables {
        let mut t = MemTables {
            node: Some(NodeConfig { mac: LB_MAC, configured: 1, _pad: 0 }),
            ..MemTables::default()
        };
        for (id, proto) in [(0, PROTO_TCP), (1, PROTO_UDP)] {
            let info = VipInfo { id, backend_count: n.into(), mode: MODE_DSR_L2, _pad: [0; 3] };
            t.vips.insert(VipKey::v4(VIP, 80, proto), info);
            for slot in 0..u32::from(n) {
                t.lists.insert(vip_backend_index(id, slot), slot);
            }
        }
        let empty = VipInfo { id: 2, backend_count: 0, mode: MODE_DSR_L2, _pad: [0; 3] };
        t.vips.insert(VipKey::v4(VIP, 81, PROTO_TCP), empty);
        for i in 0..n {
            let mut addr = [0; 16];
            addr[..4].copy_from_slice(&[10, 0, 0, 20 + i]);
            t.backends
                .insert(u32::from(i), Backend { addr, mac: backend_mac(i), family: FAMILY_IPV4, _pad: 0 });
        }
        t
    }

    /// Ethernet + IPv4 (with `options` words of IP options) + the first 8 bytes of TCP/UDP.
    fn frame(dst: [u8; 4], proto: u8, sport: u16, dport: u16, options: u8) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&LB_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&ETH_P_IPV4);
        let ihl = 5 + options;
        f.extend_from_slice(&[0x40 | ihl, 0, 0, 0, 0, 1, 0x40, 0, 64, proto, 0, 0]);
        f.extend_from_slice(&CLIENT);
        f.extend_from_slice(&dst);
        f.extend(core::iter::repeat_n(1u8, usize::from(options) * 4));
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        let tot_len = u16::try_from(f.len() - ETH_HLEN).unwrap();
        f[16..18].copy_from_slice(&tot_len.to_be_bytes());
        f
    }

    fn run(t: &MemTables, f: &mut [u8]) -> Action {
        process(&mut BytesPacket(f), t)
    }

    fn count(t: &MemTables, c: Counter) -> u64 {
        t.counters.borrow().get(&(c as u32)).copied().unwrap_or(0)
    }

    #[test]
    fn vip_flow_gets_backend_mac_and_node_source_mac_and_nothing_else_changes() {
        let t = tables(3);
        let orig = frame(VIP, PROTO_TCP, 40000, 80, 0);
        let mut f = orig.clone();
        assert_eq!(run(&t, &mut f), Action::Tx);
        assert!((0..3).any(|i| f[..6] == backend_mac(i)), "dst mac {:?}", &f[..6]);
        assert_eq!(f[6..12], LB_MAC);
        assert_eq!(f[12..], orig[12..], "only the MAC addresses may change");
        assert_eq!(count(&t, Counter::Forwarded), 1);
        assert_eq!(t.vip_bytes.borrow().get(&0), Some(&(orig.len() as u64)));
    }

    #[test]
    fn a_flow_always_gets_the_same_backend_and_flows_use_every_backend() {
        let t = tables(3);
        let mut seen = BTreeMap::new();
        for sport in 40000..40300u16 {
            let mut a = frame(VIP, PROTO_UDP, sport, 80, 0);
            let mut b = a.clone();
            assert_eq!(run(&t, &mut a), Action::Tx);
            assert_eq!(run(&t, &mut b), Action::Tx);
            assert_eq!(a[..6], b[..6]);
            *seen.entry(a[5]).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 3, "backends used: {seen:?}");
        assert!(seen.values().all(|&n| n > 60), "shares: {seen:?}");
    }

    #[test]
    fn ip_options_move_the_ports_and_are_honoured() {
        let t = tables(3);
        let mut f = frame(VIP, PROTO_TCP, 40000, 80, 2);
        assert_eq!(run(&t, &mut f), Action::Tx);
        // The same frame read without honouring IHL would see option bytes as ports.
        let mut g = frame(VIP, PROTO_TCP, 40000, 81, 2);
        assert_eq!(run(&t, &mut g), Action::Drop, "port 81 is the empty VIP");
    }

    #[test]
    fn frames_not_for_a_vip_pass_untouched() {
        let t = tables(3);
        let cases: Vec<(Vec<u8>, Counter)> = vec![
            (frame([10, 0, 0, 2], PROTO_TCP, 40000, 80, 0), Counter::PassNotVip),
            (frame(VIP, PROTO_TCP, 40000, 443, 0), Counter::PassNotVip),
            (frame(VIP, 1, 40000, 80, 0), Counter::PassNotVip),
        ];
        for (orig, counter) in cases {
            let mut f = orig.clone();
            assert_eq!(run(&t, &mut f), Action::Pass);
            assert_eq!(f, orig);
            assert!(count(&t, counter) > 0);
        }
    }

    #[test]
    fn malformed_and_unusual_frames_pass_by_rule() {
        let t = tables(3);
        let good = frame(VIP, PROTO_TCP, 40000, 80, 0);
        let mut arp = good.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let mut bad_ihl = good.clone();
        bad_ihl[14] = 0x44;
        let mut bad_version = good.clone();
        bad_version[14] = 0x65;
        let mut first_fragment = good.clone();
        first_fragment[20] = 0x20; // MF
        let mut later_fragment = good.clone();
        later_fragment[21] = 0x10; // offset
        let mut longer_than_frame = good.clone();
        longer_than_frame[16..18]
            .copy_from_slice(&u16::try_from(good.len() - ETH_HLEN + 1).unwrap().to_be_bytes());
        // A datagram that ends before its ports; what follows it is Ethernet padding.
        let mut ports_in_padding = good.clone();
        ports_in_padding[16..18].copy_from_slice(&22u16.to_be_bytes());
        let mut shorter_than_header = good.clone();
        shorter_than_header[16..18].copy_from_slice(&19u16.to_be_bytes());
        let cases = [
            (good[..10].to_vec(), Counter::PassMalformed),
            (good[..30].to_vec(), Counter::PassMalformed),
            (good[..36].to_vec(), Counter::PassMalformed),
            (arp, Counter::PassNotIpv4),
            (bad_ihl, Counter::PassMalformed),
            (bad_version, Counter::PassMalformed),
            (first_fragment, Counter::PassFragment),
            (later_fragment, Counter::PassFragment),
            (longer_than_frame, Counter::PassMalformed),
            (ports_in_padding, Counter::PassMalformed),
            (shorter_than_header, Counter::PassMalformed),
        ];
        for (orig, counter) in cases {
            let before = count(&t, counter);
            let mut f = orig.clone();
            assert_eq!(run(&t, &mut f), Action::Pass, "{counter:?}");
            assert_eq!(f, orig, "{counter:?}: a passed frame is never rewritten");
            assert_eq!(count(&t, counter), before + 1, "{counter:?}");
        }
        assert_eq!(count(&t, Counter::Forwarded), 0);
    }

    #[test]
    fn ethernet_padding_after_the_datagram_is_allowed() {
        let t = tables(3);
        let mut f = frame(VIP, PROTO_UDP, 40000, 80, 0);
        f.extend_from_slice(&[0; 16]);
        assert_eq!(run(&t, &mut f), Action::Tx);
    }

    #[test]
    fn vip_frames_addressed_to_another_mac_are_not_forwarded() {
        let t = tables(3);
        let orig = {
            let mut f = frame(VIP, PROTO_TCP, 40000, 80, 0);
            f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 0x99]);
            f
        };
        let mut f = orig.clone();
        assert_eq!(run(&t, &mut f), Action::Pass);
        assert_eq!(f, orig);
        assert_eq!(count(&t, Counter::PassNotForNode), 1);
    }

    #[test]
    fn a_vip_without_backends_or_without_node_record_drops() {
        let mut t = tables(3);
        let mut f = frame(VIP, PROTO_TCP, 40000, 81, 0);
        assert_eq!(run(&t, &mut f), Action::Drop);
        t.node = None;
        let mut f = frame(VIP, PROTO_TCP, 40000, 80, 0);
        assert_eq!(run(&t, &mut f), Action::Drop);
        assert_eq!(count(&t, Counter::DropNoBackend), 2);
    }
}
