//! Which backend a flow goes to: the backend it is tracked to while that backend lives, else
//! the VIP's Maglev table. NAT source ports. Entry lifetimes.

use super::{Counter, Scratch, Tables};
use crate::{
    hash::flow_hash,
    maps::{
        Addr, Backend, CtEntry, FlowKey, FragEntry, MODE_NAT, NO_BACKEND, NatEntry, NodeConfig, PROTO_TCP,
        TCP_CLOSING, TCP_ESTABLISHED, TCP_SYN_SEEN, UDP_ACTIVE, VipInfo,
    },
    packet::{TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

const NS_PER_SEC: u64 = 1_000_000_000;
/// A tracked flow's entry is rewritten by its packets at most this often (or on a state
/// change): enough to keep it alive, without a map write per packet.
pub const REFRESH_NS: u64 = NS_PER_SEC;
/// All fragments of one datagram must arrive within this of the first.
pub const FRAG_TIMEOUT_NS: u64 = 30 * NS_PER_SEC;
/// NAT source ports tried for a new flow before it is dropped. Probes are independent (each
/// port drawn by its own hash), so a range 90% in use still finds a port 97% of the time; a
/// range of at most this many ports is tried port by port, so a free one is always found.
pub const NAT_PROBES: u32 = 32;

/// Offset into the NAT port range for probe `i` of a flow with hash `hash`. Independent draws
/// rather than a fixed stride: strided probes cluster like linear probing, and a range half in
/// use then already turns flows away.
#[inline(always)]
#[must_use]
pub const fn nat_probe(hash: u32, i: u32, range: u32) -> u32 {
    if range <= NAT_PROBES {
        return hash.wrapping_add(i) % range;
    }
    // murmur3's 32-bit finaliser over the flow hash and the probe number.
    let mut x = hash ^ i.wrapping_mul(0x9e37_79b9);
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^= x >> 16;
    x % range
}

/// The backend a packet goes to.
#[derive(Default)]
pub struct Choice<'a> {
    pub id: u32,
    pub backend: Option<&'a Backend>,
    /// NAT source port (network order), `nat` mode only.
    pub nat_port: [u8; 2],
    /// A new flow: [`track`] must store `Scratch::entry` (after claiming a NAT port).
    pub new: bool,
}

#[inline(always)]
fn timeout_ns(node: &NodeConfig, state: u8) -> u64 {
    let is = |s: u8| u64::from(state == s);
    let tcp = is(TCP_SYN_SEEN) * u64::from(node.tcp_syn_timeout)
        + is(TCP_ESTABLISHED) * u64::from(node.tcp_timeout)
        + is(TCP_CLOSING) * u64::from(node.tcp_closing_timeout);
    let udp = (1 - is(TCP_SYN_SEEN) - is(TCP_ESTABLISHED) - is(TCP_CLOSING)) * u64::from(node.udp_timeout);
    (tcp + udp) * NS_PER_SEC
}

#[inline(always)]
fn expired(node: &NodeConfig, last_seen: u64, state: u8, now: u64) -> bool {
    now.saturating_sub(last_seen) > timeout_ns(node, state)
}

#[inline(always)]
pub fn frag_expired(e: &FragEntry, now: u64) -> bool {
    now.saturating_sub(e.last_seen) > FRAG_TIMEOUT_NS
}

/// A new flow's state from its first packet.
#[inline(always)]
const fn initial_state(proto: u8, flags: u8) -> u8 {
    if proto != PROTO_TCP {
        UDP_ACTIVE
    } else if flags & (TCP_FIN | TCP_RST) != 0 {
        TCP_CLOSING
    } else if flags & TCP_SYN != 0 && flags & TCP_ACK == 0 {
        TCP_SYN_SEEN
    } else {
        TCP_ESTABLISHED
    }
}

/// A tracked flow's state after a packet (either direction): what the packet alone says,
/// except that a segment of an ordinary kind moves a flow on only from SYN-seen to established
/// (on an ACK) and otherwise leaves it where it is (a closing flow stays closing).
#[inline(always)]
const fn next_state(state: u8, proto: u8, flags: u8) -> u8 {
    let said = initial_state(proto, flags);
    if said != TCP_ESTABLISHED {
        said
    } else if state == TCP_SYN_SEEN && flags & TCP_ACK != 0 {
        TCP_ESTABLISHED
    } else {
        state
    }
}

/// Fills `choice` with the backend for `s.target` (sent from `s.frame.eth_src`): the one the
/// flow is tracked to while it lives, else the VIP's Maglev table's (then `choice.new` is set,
/// `s.entry` holds the entry to track it with, and [`track`] stores it). Fills a caller-owned
/// value rather than returning one: see [`super::Verdict`].
#[inline(never)]
pub fn choose<'a, T: Tables>(
    t: &'a T,
    node: &NodeConfig,
    s: &mut Scratch,
    choice: &mut Choice<'a>,
) -> Result<(), Counter> {
    let (vip, flow, flags) = (&s.target.vip, &s.target.flow, s.target.flags);
    let now = t.now_ns();
    let tracked = tracked(t, node, flow, now, vip.mode);
    // A connection opening again on a tracked 4-tuple (a pure SYN) leaves a closing flow or a
    // backend whose health check fails: the source port was reused, or the backend never
    // answered the first SYN.
    let opening = flow.proto == PROTO_TCP && flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let reopened =
        matches!(&tracked, Tracked::Live(_, b, e) if opening && (b.is_down() || e.state == TCP_CLOSING));
    if let Tracked::Live(id, backend, e) = tracked
        && !reopened
    {
        let state = next_state(e.state, flow.proto, flags);
        if state != e.state || now.saturating_sub(e.last_seen) >= REFRESH_NS {
            t.ct_update(flow, |c| {
                c.state = state;
                c.last_seen = now;
            });
            if vip.mode == MODE_NAT {
                let fresh = CtEntry { state, last_seen: now, ..e };
                refresh_nat_entry(t, node, s, backend, &fresh);
            }
        }
        choice.id = id;
        choice.backend = Some(backend);
        choice.nat_port = e.nat_port;
        return Ok(());
    }
    if reopened || matches!(tracked, Tracked::BackendGone) {
        t.count(Counter::CtRebalanced);
    } else if flow.proto == PROTO_TCP && flags & TCP_SYN == 0 {
        t.count(Counter::CtMissEstablished);
    }
    let hash = flow_hash(flow.family, &flow.src, &flow.dst, flow.sport, flow.dport, flow.proto);
    let (id, backend) = from_table(t, vip, hash)?;
    choice.id = id;
    choice.backend = Some(backend);
    choice.new = true;
    s.entry = CtEntry {
        last_seen: now,
        backend: id,
        generation: backend.generation,
        vip_id: vip.id,
        state: initial_state(flow.proto, flags),
        mode: vip.mode,
        peer_mac: s.frame.eth_src,
        ..CtEntry::default()
    };
    Ok(())
}

/// Starts tracking a new flow chosen by [`choose`], claiming its NAT port first in `nat` mode.
/// Separate from `choose` so their stack frames never stack up.
#[inline(always)]
pub fn track<T: Tables>(
    t: &T,
    node: &NodeConfig,
    s: &mut Scratch,
    choice: &mut Choice<'_>,
) -> Result<(), Counter> {
    let Some(backend) = choice.backend else { return Err(Counter::DropNoBackend) };
    if s.target.vip.mode == MODE_NAT {
        allocate_port(t, node, s, backend)?;
        choice.nat_port = s.entry.nat_port;
    }
    t.ct_put(&s.target.flow, &s.entry);
    t.count(Counter::CtCreated);
    Ok(())
}

/// Where an ordinary segment of a flow (not a SYN) would go now, as [`choose`] decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    /// The live backend the flow is tracked to.
    Tracked(u32),
    /// The flow was tracked to a backend that left (or under another mode): the table's
    /// backend takes it.
    Rebalanced(u32),
    /// Not tracked (or expired): the table's backend.
    Table(u32),
    /// Not tracked, and the table has no live backend for it: dropped.
    Nothing,
}

/// [`Destination`] of `flow` to `vip`, changing nothing: for operators' lookups, from the same
/// pieces the datapath uses.
pub fn destination<T: Tables>(t: &T, node: &NodeConfig, vip: &VipInfo, flow: &FlowKey) -> Destination {
    let from_table = || {
        let hash = flow_hash(flow.family, &flow.src, &flow.dst, flow.sport, flow.dport, flow.proto);
        from_table(t, vip, hash).ok().map(|(id, _)| id)
    };
    match tracked(t, node, flow, t.now_ns(), vip.mode) {
        Tracked::Live(id, _, _) => Destination::Tracked(id),
        Tracked::BackendGone => from_table().map_or(Destination::Nothing, Destination::Rebalanced),
        Tracked::Unknown => from_table().map_or(Destination::Nothing, Destination::Table),
    }
}

/// The live backend that the VIP's Maglev table gives a flow with this hash.
#[inline(always)]
pub fn from_table<'a, T: Tables>(t: &'a T, vip: &VipInfo, hash: u32) -> Result<(u32, &'a Backend), Counter> {
    if vip.table_size == 0 {
        return Err(Counter::DropNoBackend);
    }
    let id = t
        .table_slot(vip.table, hash % vip.table_size)
        .filter(|&id| id != NO_BACKEND)
        .ok_or(Counter::DropNoBackend)?;
    let backend = t.backend(id).filter(|b| b.is_alive()).ok_or(Counter::DropNoBackend)?;
    Ok((id, backend))
}

/// What connection tracking knows of a flow.
pub enum Tracked<'a> {
    /// Tracked to a live backend: `(id, backend, entry)`.
    Live(u32, &'a Backend, CtEntry),
    /// Tracked to a backend that has left (or whose id now names another backend), or under
    /// another forwarding mode than the VIP's now.
    BackendGone,
    /// Not tracked, or its entry has expired.
    Unknown,
}

/// What connection tracking knows of `flow` at time `now`, for a VIP in `mode`. Nothing is
/// refreshed.
#[inline(always)]
pub fn tracked<'a, T: Tables>(
    t: &'a T,
    node: &NodeConfig,
    flow: &FlowKey,
    now: u64,
    mode: u8,
) -> Tracked<'a> {
    let Some(e) = t.ct_get(flow) else { return Tracked::Unknown };
    if expired(node, e.last_seen, e.state, now) {
        return Tracked::Unknown;
    }
    match t.backend(e.backend) {
        Some(b) if b.is_alive() && b.generation == e.generation && e.mode == mode => {
            Tracked::Live(e.backend, b, e)
        }
        _ => Tracked::BackendGone,
    }
}

/// The reply entry of the client flow `flow` tracked as `e`.
#[inline(always)]
fn reply_entry(flow: &FlowKey, e: &CtEntry) -> NatEntry {
    NatEntry {
        last_seen: e.last_seen,
        client: flow.src,
        vip: flow.dst,
        client_port: flow.sport,
        vip_port: flow.dport,
        peer_mac: e.peer_mac,
        state: e.state,
        backend: e.backend,
        vip_id: e.vip_id,
        ..NatEntry::default()
    }
}

/// The reply-side key of a NAT flow: backend -> this node's NAT address and port.
#[inline(always)]
fn nat_key(node_addr: &Addr, flow: &FlowKey, backend: &Backend, port: [u8; 2]) -> FlowKey {
    FlowKey {
        src: backend.addr,
        dst: *node_addr,
        sport: backend.port,
        dport: port,
        proto: flow.proto,
        family: flow.family,
        _pad: [0; 2],
    }
}

/// Picks a NAT source port for the new flow in `s.target` and claims it with the reply entry
/// (`s.nat`, keyed `s.nat_key`); the port goes into `s.entry`. Ports are probed in an order
/// fixed by the flow hash; insert-if-absent arbitrates, so two flows never share a port towards
/// the same backend.
#[inline(never)]
fn allocate_port<T: Tables>(
    t: &T,
    node: &NodeConfig,
    s: &mut Scratch,
    backend: &Backend,
) -> Result<(), Counter> {
    let (flow, e) = (&s.target.flow, &s.entry);
    let node_addr = node.addr(flow.family).ok_or(Counter::DropNoNodeAddr)?;
    if backend.family != flow.family || node.nat_port_max < node.nat_port_min {
        return Err(Counter::DropNatPortsExhausted);
    }
    let hash = flow_hash(flow.family, &flow.src, &flow.dst, flow.sport, flow.dport, flow.proto);
    s.nat = reply_entry(flow, e);
    s.nat_key = nat_key(&node_addr, flow, backend, [0; 2]);
    for i in 0..NAT_PROBES {
        if claim(t, node, s, hash, i) {
            s.entry.nat_port = s.nat_key.dport;
            return Ok(());
        }
    }
    Err(Counter::DropNatPortsExhausted)
}

/// Claims the NAT port that probe `i` selects for `s.nat`'s flow (hash `hash`): free, expired,
/// or already this flow's (its tracking entry was lost; reusing the port keeps one connection
/// towards the backend). Not inlined, so the unrolled probe loop keeps almost nothing live.
#[inline(never)]
fn claim<T: Tables>(t: &T, node: &NodeConfig, s: &mut Scratch, hash: u32, i: u32) -> bool {
    let min = u32::from(node.nat_port_min);
    // At least 1 by construction: no division by zero (and no panic path in BPF code).
    let range = u32::from(node.nat_port_max).saturating_sub(min) + 1;
    s.nat_key.dport = u16::try_from(min + nat_probe(hash, i, range)).unwrap_or(u16::MAX).to_be_bytes();
    let (key, entry) = (&s.nat_key, &s.nat);
    if t.nat_insert_new(key, entry) {
        return true;
    }
    let Some(old) = t.nat_get(key) else { return false };
    let same_flow = old.client == entry.client
        && old.client_port == entry.client_port
        && old.vip == entry.vip
        && old.vip_port == entry.vip_port;
    if same_flow || expired(node, old.last_seen, old.state, entry.last_seen) {
        t.nat_put(key, entry);
        return true;
    }
    false
}

/// Keeps a NAT flow's reply entry as fresh as its tracking entry `e` (state and time already
/// updated). A reply entry the LRU evicted while its flow lives is put back, unless another
/// flow has claimed the port since.
#[inline(never)]
fn refresh_nat_entry<T: Tables>(t: &T, node: &NodeConfig, s: &mut Scratch, backend: &Backend, e: &CtEntry) {
    let flow = &s.target.flow;
    let Some(node_addr) = node.addr(flow.family) else { return };
    s.nat_key = nat_key(&node_addr, flow, backend, e.nat_port);
    let refreshed = t.nat_update(&s.nat_key, |r| {
        r.state = e.state;
        r.last_seen = e.last_seen;
    });
    if !refreshed {
        s.nat = reply_entry(flow, e);
        t.nat_insert_new(&s.nat_key, &s.nat);
    }
}

/// Whether `key` is the reply direction of a live NAT flow. Nothing is refreshed.
#[inline(always)]
pub fn nat_reply_live<T: Tables>(t: &T, node: &NodeConfig, key: &FlowKey) -> bool {
    t.nat_get(key).is_some_and(|e| !expired(node, e.last_seen, e.state, t.now_ns()))
}

/// Finds the live reply entry for the backend's packet `s.target.flow` (with its TCP flags)
/// and puts it in `s.nat`, refreshing it (with the flow's tracking entry) when due. False when
/// the packet belongs to no NAT flow.
#[inline(always)]
pub fn nat_reply_entry<T: Tables>(t: &T, node: &NodeConfig, s: &mut Scratch) -> bool {
    let (key, flags) = (&s.target.flow, s.target.flags);
    match t.nat_get(key) {
        Some(e) => s.nat = e,
        None => return false,
    }
    let now = t.now_ns();
    let e = &mut s.nat;
    if expired(node, e.last_seen, e.state, now) {
        return false;
    }
    let state = next_state(e.state, key.proto, flags);
    if state != e.state || now.saturating_sub(e.last_seen) >= REFRESH_NS {
        e.state = state;
        e.last_seen = now;
        t.nat_update(key, |r| {
            r.state = state;
            r.last_seen = now;
        });
        s.nat_key = FlowKey {
            src: e.client,
            dst: e.vip,
            sport: e.client_port,
            dport: e.vip_port,
            proto: key.proto,
            family: key.family,
            _pad: [0; 2],
        };
        t.ct_update(&s.nat_key, |c| {
            c.state = state;
            c.last_seen = now;
        });
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::PROTO_UDP;

    #[test]
    fn tcp_states_follow_the_flags() {
        let (syn, ack, fin, rst) = (TCP_SYN, TCP_ACK, TCP_FIN, TCP_RST);
        for (state, flags, next) in [
            (TCP_SYN_SEEN, ack, TCP_ESTABLISHED),
            (TCP_SYN_SEEN, syn | ack, TCP_ESTABLISHED),
            (TCP_SYN_SEEN, 0, TCP_SYN_SEEN),
            (TCP_ESTABLISHED, ack, TCP_ESTABLISHED),
            (TCP_ESTABLISHED, fin | ack, TCP_CLOSING),
            (TCP_ESTABLISHED, rst, TCP_CLOSING),
            (TCP_ESTABLISHED, syn, TCP_SYN_SEEN),
            (TCP_CLOSING, ack, TCP_CLOSING),
            (TCP_CLOSING, syn, TCP_SYN_SEEN),
        ] {
            assert_eq!(next_state(state, PROTO_TCP, flags), next, "state {state} flags {flags:#04x}");
        }
        assert_eq!(next_state(UDP_ACTIVE, PROTO_UDP, 0), UDP_ACTIVE);
        assert_eq!(initial_state(PROTO_TCP, ack), TCP_ESTABLISHED, "a mid-flow segment");
        assert_eq!(initial_state(PROTO_TCP, syn), TCP_SYN_SEEN);
    }
}
