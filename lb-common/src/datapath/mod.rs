//! The forwarding decision, written once for the kernel and the host.
//!
//! [`process`] reads a frame, decides what happens to it and rewrites it in place. The XDP
//! program runs it over the kernel's frame with BPF maps behind [`Tables`]; the host model runs
//! the very same code over byte buffers with in-memory tables.
//!
//! Layout: `parse` (Ethernet, IPv4/IPv6, fragments), `conntrack` (which backend a flow goes
//! to: tracked flows first, then the VIP's Maglev table; NAT port allocation), `rewrite` (the
//! three forwarding modes and NAT replies), `icmp` (echo to a VIP, "too big" errors about a
//! balanced flow).
//!
//! Rules, one per kind of frame (each counted; see [`Counter`]):
//! - TCP/UDP to a VIP:port: forwarded to the flow's backend by the VIP's mode;
//! - a reply to a NAT flow (to this node's address and a NAT port): translated back to the
//!   client;
//! - ICMP echo to a VIP address: answered; ICMP "fragmentation needed" / "packet too big" about
//!   a balanced flow: forwarded to that flow's backend;
//! - IPv4/IPv6 fragments: the first decides the backend, later ones follow it; a later
//!   fragment to a VIP whose first was never seen is dropped (other unknown fragments go to the
//!   stack);
//! - VLAN-tagged, non-IP, IPv6 with extension headers other than a fragment header, and
//!   everything not for a VIP: passed to the node's stack unchanged;
//! - truncated or inconsistent headers: passed to the stack (which drops and counts them),
//!   never forwarded;
//! - a VIP flow with no usable backend, or no NAT port left: dropped.
//!
//! TTL and hop limit are left alone in every mode, as in any L2 forwarding or tunnel.

mod conntrack;
mod icmp;
mod parse;
mod rewrite;

use conntrack::Choice;
pub use conntrack::{Destination, destination};
pub use icmp::Quoted;
pub use parse::{Frag, Frame, Ip};

use crate::{
    maps::{
        AddrKey, Backend, CtEntry, DenyKey, FRAG_FORWARD, FRAG_NAT_REPLY, FlowKey, FragEntry, FragKey,
        MODE_NAT, NatEntry, NodeConfig, PROTO_TCP, PROTO_UDP, VIP_F_DENY, VipInfo, VipKey,
    },
    packet::{Packet, PortsHdr, TCP_HLEN, TcpHdr, UDP_HLEN},
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

macro_rules! counters {
    ($($(#[$m:meta])* $name:ident = $text:literal, $action:expr;)*) => {
        /// Global counters, indices into the `LB_COUNTERS` map. Verdict counters count every
        /// frame exactly once (the rule that decided it) and imply what happens to it; event
        /// counters count side events.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Counter { $($(#[$m])* $name,)* }

        impl Counter {
            pub const ALL: &[Self] = &[$(Self::$name,)*];
            /// Number of counters (size of the `LB_COUNTERS` map).
            #[expect(clippy::cast_possible_truncation, reason = "a few dozen counters")]
            pub const COUNT: u32 = Self::ALL.len() as u32;

            /// Stable name used in logs and metrics.
            #[must_use]
            pub const fn name(self) -> &'static str {
                match self { $(Self::$name => $text,)* }
            }

            /// What happens to a frame this counter is the verdict for; `None` for event
            /// counters.
            #[must_use]
            pub const fn action(self) -> Option<Action> {
                match self { $(Self::$name => $action,)* }
            }

            /// True for counters that count whole frames by the rule that decided them.
            #[must_use]
            pub const fn is_verdict(self) -> bool {
                self.action().is_some()
            }
        }
    };
}

const PASS: Option<Action> = Some(Action::Pass);
const DROP: Option<Action> = Some(Action::Drop);
const TX: Option<Action> = Some(Action::Tx);
const EVENT: Option<Action> = None;

counters! {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...).
    PassNotIp = "pass_not_ip", PASS;
    /// VLAN-tagged: the stack (a VLAN interface) handles it.
    PassVlan = "pass_vlan", PASS;
    /// Truncated or inconsistent headers.
    PassMalformed = "pass_malformed", PASS;
    /// IPv6 with extension headers other than a fragment header.
    PassIpv6Ext = "pass_ipv6_ext", PASS;
    /// Not for a VIP (nor a NAT reply, nor ICMP about a VIP flow).
    PassNotVip = "pass_not_vip", PASS;
    /// For a VIP, but addressed to another host's MAC.
    PassNotForNode = "pass_not_for_node", PASS;
    /// Forwarded to a backend.
    Forwarded = "forwarded", TX;
    /// A NAT reply translated back to the client.
    NatReplied = "nat_replied", TX;
    /// A later fragment sent where its first fragment went.
    FragmentForwarded = "fragment_forwarded", TX;
    /// ICMP echo to a VIP address, answered.
    IcmpEchoReplied = "icmp_echo_replied", TX;
    /// ICMP "too big" about a balanced flow, sent to its backend.
    IcmpErrorForwarded = "icmp_error_forwarded", TX;
    /// The source is in the VIP's deny list.
    DropDenied = "drop_denied", DROP;
    /// No usable backend for the VIP (none configured, all drained or down).
    DropNoBackend = "drop_no_backend", DROP;
    /// NAT: every source port tried for this backend is in use.
    DropNatPortsExhausted = "drop_nat_ports_exhausted", DROP;
    /// This node has no address of the family the mode needs (IPIP source, NAT source).
    DropNoNodeAddr = "drop_no_node_addr", DROP;
    /// A later fragment whose first fragment was not seen (or has expired).
    DropFragmentUnknown = "drop_fragment_unknown", DROP;
    /// The frame could not grow to take an outer header.
    DropEncapFailed = "drop_encap_failed", DROP;
    /// Event: a TCP segment of an established flow found no (live) connection-tracking entry.
    CtMissEstablished = "ct_miss_established", EVENT;
    /// Event: a tracked flow's backend left (removed, down, or its id reused): the flow was
    /// balanced again.
    CtRebalanced = "ct_rebalanced", EVENT;
    /// Event: a new flow was tracked.
    CtCreated = "ct_created", EVENT;
}

/// The state the decision reads and writes, and the counters it bumps: BPF maps in the
/// kernel, plain collections on the host.
pub trait Tables {
    /// Monotonic time in nanoseconds. The kernel reads the coarse clock
    /// (`bpf_ktime_get_coarse_ns`, one tick of resolution): timeouts are whole seconds, and the
    /// precise clock costs about 25 ns a read in a VM (`cargo xtask bench xdp`).
    fn now_ns(&self) -> u64;
    // Read-only records are returned by reference (map memory in the kernel) to keep them off
    // the 512-byte BPF stack.
    fn node(&self) -> Option<&NodeConfig>;
    fn vip(&self, key: &VipKey) -> Option<&VipInfo>;
    fn is_vip_addr(&self, key: &AddrKey) -> bool;
    /// Whether a range in the [`crate::maps::DENY`] trie holds `key` (longest-prefix match).
    fn denied(&self, key: &DenyKey) -> bool;
    /// Backend id in slot `slot` of Maglev table `table`.
    fn table_slot(&self, table: u32, slot: u32) -> Option<u32>;
    fn backend(&self, id: u32) -> Option<&Backend>;
    fn ct_get(&self, key: &FlowKey) -> Option<CtEntry>;
    fn ct_put(&self, key: &FlowKey, value: &CtEntry);
    /// Changes the entry for `key` in place (no copy through the stack, no map update);
    /// false when there is none.
    fn ct_update(&self, key: &FlowKey, f: impl FnOnce(&mut CtEntry)) -> bool;
    fn nat_get(&self, key: &FlowKey) -> Option<NatEntry>;
    /// Inserts only when the key is absent; false when it is present.
    fn nat_insert_new(&self, key: &FlowKey, value: &NatEntry) -> bool;
    fn nat_put(&self, key: &FlowKey, value: &NatEntry);
    /// As [`Tables::ct_update`].
    fn nat_update(&self, key: &FlowKey, f: impl FnOnce(&mut NatEntry)) -> bool;
    fn frag_get(&self, key: &FragKey) -> Option<FragEntry>;
    fn frag_put(&self, key: &FragKey, value: &FragEntry);
    fn count(&self, counter: Counter);
    fn count_vip(&self, vip_id: u32, bytes: u64);
    fn count_backend(&self, backend: u32, bytes: u64);
}

/// The verdict counter: what was decided for a frame, and why. A single `u32`, so BPF
/// functions return it in a register (an aggregate would come back through the stack, and the
/// verifier refuses a stack pointer as a return value).
type Verdict = Counter;

/// Working memory of one [`process`] run, kept off the 512-byte BPF stack: the kernel keeps it
/// in a per-CPU map slot, the host model in a field. Every path writes a field before it reads
/// it, so nothing carries over from one frame to the next.
#[derive(Default)]
pub struct Scratch {
    pub frame: Frame,
    pub target: Target,
    /// A new flow's tracking entry, stored once its NAT port (if any) is claimed.
    pub entry: CtEntry,
    /// A NAT reply entry (being claimed, or found for a reply) and a NAT-related flow key.
    pub nat: NatEntry,
    pub nat_key: FlowKey,
    pub frag_key: FragKey,
    pub frag: FragEntry,
    pub quoted: icmp::Quoted,
    pub deny_key: DenyKey,
}

/// Decides the fate of one frame and rewrites it in place when it is forwarded.
#[inline(always)]
pub fn process<P: Packet, T: Tables>(pkt: &mut P, tables: &T, scratch: &mut Scratch) -> Action {
    let verdict = decide(pkt, tables, scratch);
    tables.count(verdict);
    verdict.action().unwrap_or(Action::Pass)
}

// The paths below are separate BPF functions (`inline(never)`), and their large values live in
// [`Scratch`]: the kernel allows 512 bytes of stack per call chain. BPF calls take at most five
// arguments, hence the bundled ones.

#[inline(always)]
fn decide<P: Packet, T: Tables>(pkt: &mut P, t: &T, s: &mut Scratch) -> Verdict {
    if let Err(c) = parse::parse(pkt, &mut s.frame) {
        return c;
    }
    if let Frag::Later(id) = s.frame.ip.frag {
        return later_fragment(pkt, t, s, id);
    }
    let proto = s.frame.ip.proto;
    if proto == PROTO_TCP || proto == PROTO_UDP {
        transport(pkt, t, s)
    } else if proto == s.frame.ip.icmp_proto() {
        icmp::handle(pkt, t, s)
    } else {
        Counter::PassNotVip
    }
}

/// The node record, when userspace has written it.
#[inline(always)]
fn node<T: Tables>(t: &T) -> Option<&NodeConfig> {
    t.node().filter(|n| n.configured != 0)
}

/// A transport flow to a VIP (or from a backend, for NAT replies) and its TCP flags.
#[derive(Default)]
pub struct Target {
    pub vip: VipInfo,
    pub flow: FlowKey,
    pub flags: u8,
}

/// TCP or UDP: to a VIP, or a reply to a NAT flow, or nothing of ours.
#[inline(never)]
fn transport<P: Packet, T: Tables>(pkt: &mut P, t: &T, s: &mut Scratch) -> Verdict {
    let Scratch { frame, target, .. } = &mut *s;
    let ip = &frame.ip;
    let need = if ip.proto == PROTO_TCP { TCP_HLEN } else { UDP_HLEN };
    // The transport header must lie inside the datagram, not in Ethernet padding after it.
    if ip.l4_off + need > ip.end {
        return Counter::PassMalformed;
    }
    let Some(ports) = pkt.header::<PortsHdr>(ip.l4_off) else { return Counter::PassMalformed };
    let (sport, dport) = (ports.src, ports.dst);
    target.flags = 0;
    if ip.proto == PROTO_TCP {
        match pkt.header::<TcpHdr>(ip.l4_off) {
            Some(tcp) => target.flags = tcp.flags,
            None => return Counter::PassMalformed,
        }
    }
    target.flow =
        FlowKey { src: ip.src, dst: ip.dst, sport, dport, proto: ip.proto, family: ip.family, _pad: [0; 2] };
    match t.vip(&VipKey { addr: ip.dst, port: dport, proto: ip.proto, family: ip.family }) {
        Some(vip) => {
            target.vip = *vip;
            if vip.flags & VIP_F_DENY != 0 && denied(t, s) {
                return Counter::DropDenied;
            }
            to_backend(pkt, t, s)
        }
        None => nat_reply(pkt, t, s),
    }
}

/// Whether the VIP entry's deny list holds the frame's source. The key is built in scratch
/// memory, off the BPF stack.
#[inline(never)]
fn denied<T: Tables>(t: &T, s: &mut Scratch) -> bool {
    s.deny_key = DenyKey { vip_id: s.target.vip.id.to_be_bytes(), addr: s.frame.ip.src };
    t.denied(&s.deny_key)
}

/// A packet for a VIP: choose the backend, track a new flow, remember it for later fragments,
/// send it.
#[inline(never)]
fn to_backend<P: Packet, T: Tables>(pkt: &mut P, t: &T, s: &mut Scratch) -> Verdict {
    let Some(node) = node(t) else { return Counter::DropNoBackend };
    // A frame for another host (promiscuous NIC, a peer balancer's output on a shared segment)
    // is not ours to forward: sending it again could bounce it between balancers.
    if s.frame.eth_dst != node.mac {
        return Counter::PassNotForNode;
    }
    let mut choice = Choice::default();
    if let Err(c) = conntrack::choose(t, node, s, &mut choice) {
        return c;
    }
    if choice.new
        && let Err(c) = conntrack::track(t, node, s, &mut choice)
    {
        return c;
    }
    let Some(backend) = choice.backend else { return Counter::DropNoBackend };
    let (mode, vip_id) = (s.target.vip.mode, s.target.vip.id);
    if let Frag::First(id) = s.frame.ip.frag {
        remember_first_fragment(t, s, id, &(mode, vip_id, choice.id, backend.generation));
    }
    let len = pkt.len() as u64;
    let ports = (mode == MODE_NAT).then_some([choice.nat_port, backend.port]);
    if let Err(c) = rewrite::send(pkt, node, &s.frame.ip, mode, backend, ports) {
        return c;
    }
    t.count_vip(vip_id, len);
    t.count_backend(choice.id, len);
    Counter::Forwarded
}

/// Records where a datagram's later fragments go: `(mode, vip id, backend id, generation)`.
#[inline(never)]
fn remember_first_fragment<T: Tables>(t: &T, s: &mut Scratch, id: u32, to: &(u8, u32, u32, u32)) {
    let ip = &s.frame.ip;
    s.frag_key = FragKey { src: ip.src, dst: ip.dst, id, proto: ip.proto, family: ip.family, _pad: [0; 2] };
    s.frag = FragEntry {
        last_seen: t.now_ns(),
        kind: FRAG_FORWARD,
        mode: to.0,
        vip_id: to.1,
        backend: to.2,
        generation: to.3,
        ..FragEntry::default()
    };
    t.frag_put(&s.frag_key, &s.frag);
}

/// A datagram's later fragment: it goes where the first fragment went.
#[inline(never)]
fn later_fragment<P: Packet, T: Tables>(pkt: &mut P, t: &T, s: &mut Scratch, id: u32) -> Verdict {
    let ip = &s.frame.ip;
    s.frag_key = FragKey { src: ip.src, dst: ip.dst, id, proto: ip.proto, family: ip.family, _pad: [0; 2] };
    match t.frag_get(&s.frag_key) {
        Some(e) if !conntrack::frag_expired(&e, t.now_ns()) => s.frag = e,
        // Only a VIP's fragments are ours to drop; the node's own (a large datagram to its
        // address, say) go to its stack like the first fragment did.
        _ if t.is_vip_addr(&AddrKey { addr: ip.dst, family: ip.family, _pad: [0; 3] }) => {
            return Counter::DropFragmentUnknown;
        }
        _ => return Counter::PassNotVip,
    }
    let Some(node) = node(t) else { return Counter::DropFragmentUnknown };
    if s.frame.eth_dst != node.mac {
        return Counter::PassNotForNode;
    }
    let (e, ip) = (&s.frag, &s.frame.ip);
    if e.kind == FRAG_NAT_REPLY {
        rewrite::nat_addresses(pkt, ip, &e.new_src, &e.new_dst);
        rewrite::set_macs(pkt, e.peer_mac, node.mac);
        return Counter::FragmentForwarded;
    }
    let Some(backend) = t.backend(e.backend).filter(|b| b.is_alive() && b.generation == e.generation) else {
        return Counter::DropNoBackend;
    };
    let len = pkt.len() as u64;
    // No transport header in a later fragment: NAT translates the addresses only.
    if let Err(c) = rewrite::send(pkt, node, ip, e.mode, backend, None) {
        return c;
    }
    t.count_vip(e.vip_id, len);
    t.count_backend(e.backend, len);
    Counter::FragmentForwarded
}

/// A backend's reply to a NAT flow, addressed to this node and a NAT port: back to the client.
#[inline(never)]
fn nat_reply<P: Packet, T: Tables>(pkt: &mut P, t: &T, s: &mut Scratch) -> Verdict {
    let Some(node) = node(t) else { return Counter::PassNotVip };
    let (ip, key) = (&s.frame.ip, &s.target.flow);
    let port = u16::from_be_bytes(key.dport);
    if node.addr(ip.family) != Some(ip.dst) || port < node.nat_port_min || port > node.nat_port_max {
        return Counter::PassNotVip;
    }
    // A frame for another host is not ours to translate, and refreshes nothing.
    if s.frame.eth_dst != node.mac {
        let ours = conntrack::nat_reply_live(t, node, key);
        return if ours { Counter::PassNotForNode } else { Counter::PassNotVip };
    }
    if !conntrack::nat_reply_entry(t, node, s) {
        return Counter::PassNotVip;
    }
    if let Frag::First(id) = s.frame.ip.frag {
        remember_reply_fragment(t, s, id);
    }
    let (e, ip) = (&s.nat, &s.frame.ip);
    rewrite::nat_full(pkt, ip, &e.vip, &e.client, [e.vip_port, e.client_port]);
    rewrite::set_macs(pkt, e.peer_mac, node.mac);
    Counter::NatReplied
}

/// Records where a NAT reply datagram's later fragments go (from `s.nat`).
#[inline(never)]
fn remember_reply_fragment<T: Tables>(t: &T, s: &mut Scratch, id: u32) {
    let (ip, e) = (&s.frame.ip, &s.nat);
    s.frag_key = FragKey { src: ip.src, dst: ip.dst, id, proto: ip.proto, family: ip.family, _pad: [0; 2] };
    s.frag = FragEntry {
        last_seen: t.now_ns(),
        kind: FRAG_NAT_REPLY,
        mode: MODE_NAT,
        backend: e.backend,
        vip_id: e.vip_id,
        new_src: e.vip,
        new_dst: e.client,
        peer_mac: e.peer_mac,
        ..FragEntry::default()
    };
    t.frag_put(&s.frag_key, &s.frag);
}
