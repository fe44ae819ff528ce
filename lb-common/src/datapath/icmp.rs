//! ICMP: echo to a VIP address is answered here. "Fragmentation needed" (IPv4) and "packet
//! too big" (IPv6) about a balanced flow go to that flow's backend, so the backend learns the
//! path MTU towards the client: in direct server return the backend's replies carry the VIP as
//! their source, so routers send these errors to the VIP, that is, to the balancer.

use super::{Counter, Frag, Ip, Scratch, Tables, Verdict, conntrack, node, rewrite};
use crate::{
    csum,
    hash::flow_hash,
    maps::{Addr, AddrKey, Backend, FAMILY_IPV6, FlowKey, MODE_NAT, PROTO_TCP, PROTO_UDP, VipKey, addr_v4},
    packet::{
        Check, ETH_HLEN, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_FRAG_NEEDED, ICMP_HLEN,
        ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG, IPV4_MIN_HLEN, IPV6_HLEN, IcmpHdr,
        Ipv4Hdr, Ipv6Hdr, Packet, PortsHdr, TCP_CHECK_OFF, UDP_CHECK_OFF,
    },
};

/// TTL / hop limit of echo replies.
const REPLY_TTL: u8 = 64;

#[inline(never)]
pub fn handle<P: Packet, T: Tables>(pkt: &mut P, t: &T, s: &mut Scratch) -> Verdict {
    let ip = &s.frame.ip;
    if ip.frag != Frag::None {
        return Counter::PassNotVip;
    }
    if ip.l4_off + ICMP_HLEN > ip.end {
        return Counter::PassMalformed;
    }
    let Some(h) = pkt.header::<IcmpHdr>(ip.l4_off) else { return Counter::PassMalformed };
    let (kind, code) = (h.kind, h.code);
    let v6 = ip.family == FAMILY_IPV6;
    if (!v6 && kind == ICMP_ECHO_REQUEST) || (v6 && kind == ICMPV6_ECHO_REQUEST) {
        echo(pkt, t, s)
    } else if (!v6 && kind == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED)
        || (v6 && kind == ICMPV6_PACKET_TOO_BIG)
    {
        too_big(pkt, t, s)
    } else {
        Counter::PassNotVip
    }
}

/// Answers an echo request to a VIP address from the VIP itself.
#[inline(always)]
fn echo<P: Packet, T: Tables>(pkt: &mut P, t: &T, s: &Scratch) -> Verdict {
    let (ip, eth_dst, eth_src) = (&s.frame.ip, s.frame.eth_dst, s.frame.eth_src);
    if !t.is_vip_addr(&AddrKey { addr: ip.dst, family: ip.family, _pad: [0; 3] }) {
        return Counter::PassNotVip;
    }
    let Some(node) = node(t) else { return Counter::PassNotVip };
    if eth_dst != node.mac {
        return Counter::PassNotForNode;
    }
    let reply = if ip.family == FAMILY_IPV6 {
        let Some(h) = pkt.header::<Ipv6Hdr>(ETH_HLEN) else { return Counter::PassMalformed };
        core::mem::swap(&mut h.src, &mut h.dst);
        h.hop_limit = REPLY_TTL;
        ICMPV6_ECHO_REPLY
    } else {
        let Some(h) = pkt.header::<Ipv4Hdr>(ETH_HLEN) else { return Counter::PassMalformed };
        core::mem::swap(&mut h.src, &mut h.dst);
        h.check = csum::update(h.check, &[h.ttl, h.proto], &[REPLY_TTL, h.proto]);
        h.ttl = REPLY_TTL;
        ICMP_ECHO_REPLY
    };
    // The ICMPv6 pseudo-header sum does not change when source and destination swap.
    let Some(icmp) = pkt.header::<IcmpHdr>(ip.l4_off) else { return Counter::PassMalformed };
    icmp.check = csum::update(icmp.check, &[icmp.kind, icmp.code], &[reply, icmp.code]);
    icmp.kind = reply;
    rewrite::set_macs(pkt, eth_src, node.mac);
    Counter::IcmpEchoReplied
}

/// The packet an ICMP error quotes: one of this node's VIP replies (source VIP:port, to the
/// client).
#[derive(Default)]
pub struct Quoted {
    src: Addr,
    dst: Addr,
    /// Frame offset of the quoted IP header and of its transport header.
    ip_off: usize,
    l4_off: usize,
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
}

/// Reads the quoted packet into `q`; false when it is not a TCP/UDP packet this node could
/// have sent.
#[inline(always)]
fn quoted<P: Packet>(pkt: &mut P, ip: &Ip, q: &mut Quoted) -> bool {
    q.ip_off = ip.l4_off + ICMP_HLEN;
    if ip.family == FAMILY_IPV6 {
        let Some(h) = pkt.header::<Ipv6Hdr>(q.ip_off) else { return false };
        q.src = h.src;
        q.dst = h.dst;
        q.proto = h.next_header;
        q.l4_off = q.ip_off + IPV6_HLEN;
    } else {
        let Some(h) = pkt.header::<Ipv4Hdr>(q.ip_off) else { return false };
        if h.version() != 4 || h.header_len() < IPV4_MIN_HLEN {
            return false;
        }
        q.src = addr_v4(h.src);
        q.dst = addr_v4(h.dst);
        q.proto = h.proto;
        q.l4_off = q.ip_off + h.header_len();
    }
    if (q.proto != PROTO_TCP && q.proto != PROTO_UDP) || q.l4_off + 4 > ip.end {
        return false;
    }
    let Some(ports) = pkt.header::<PortsHdr>(q.l4_off) else { return false };
    q.sport = ports.src;
    q.dport = ports.dst;
    true
}

/// Sends a "too big" error about a VIP flow to the flow's backend.
#[inline(never)]
fn too_big<P: Packet, T: Tables>(pkt: &mut P, t: &T, s: &mut Scratch) -> Verdict {
    let Scratch { frame, target, quoted: quote, .. } = &mut *s;
    let ip = &frame.ip;
    if !quoted(pkt, ip, quote) {
        return Counter::PassNotVip;
    }
    let quote = &*quote;
    let Some(vip) =
        t.vip(&VipKey { addr: quote.src, port: quote.sport, proto: quote.proto, family: ip.family })
    else {
        return Counter::PassNotVip;
    };
    let Some(node) = node(t) else { return Counter::PassNotVip };
    if frame.eth_dst != node.mac {
        return Counter::PassNotForNode;
    }
    // The client's flow, as it arrived at the VIP.
    target.flow = FlowKey {
        src: quote.dst,
        dst: quote.src,
        sport: quote.dport,
        dport: quote.sport,
        proto: quote.proto,
        family: ip.family,
        _pad: [0; 2],
    };
    let flow = &target.flow;
    let (backend, nat_port) = match conntrack::tracked(t, node, flow, t.now_ns(), vip.mode) {
        conntrack::Tracked::Live(_, b, e) => (b, e.nat_port),
        // A NAT flow cannot be translated without its state; a DSR flow's backend follows
        // from the table alone.
        _ if vip.mode == MODE_NAT => return Counter::PassNotVip,
        _ => {
            let hash = flow_hash(flow.family, &flow.src, &flow.dst, flow.sport, flow.dport, flow.proto);
            match conntrack::from_table(t, vip, hash) {
                Ok((_, b)) => (b, [0; 2]),
                Err(c) => return c,
            }
        }
    };
    if vip.mode == MODE_NAT {
        let Some(node_addr) = node.addr(ip.family) else { return Counter::DropNoNodeAddr };
        translate(pkt, ip, quote, backend, &(node_addr, nat_port));
        rewrite::set_macs(pkt, backend.mac, node.mac);
    } else if let Err(c) = rewrite::send(pkt, node, ip, vip.mode, backend, None) {
        return c;
    }
    Counter::IcmpErrorForwarded
}

/// Turns an error about the client's view of a NAT flow into one about the backend's view:
/// outer destination VIP -> backend; quoted source VIP:port -> backend:port, quoted
/// destination client:port -> node:NAT port. The quoted IPv4 header checksum, the quoted
/// transport checksum (when quoted) and the ICMP checksum follow.
#[inline(never)]
fn translate<P: Packet>(pkt: &mut P, ip: &Ip, q: &Quoted, backend: &Backend, to: &(Addr, [u8; 2])) {
    let (node_addr, nat_port) = (&to.0, to.1);
    let v6 = ip.family == FAMILY_IPV6;
    let Some(mut icmp_check) = pkt.header::<IcmpHdr>(ip.l4_off).map(|h| h.check) else { return };
    // Outer destination; ICMPv6's checksum covers it through the pseudo-header.
    if v6 {
        if let Some(h) = pkt.header::<Ipv6Hdr>(ETH_HLEN) {
            icmp_check = csum::update(icmp_check, &h.dst, &backend.addr);
            h.dst = backend.addr;
        }
    } else if let Some(h) = pkt.header::<Ipv4Hdr>(ETH_HLEN) {
        let new: [u8; 4] = [backend.addr[0], backend.addr[1], backend.addr[2], backend.addr[3]];
        h.check = csum::update(h.check, &h.dst, &new);
        h.dst = new;
    }
    // Quoted addresses.
    let (old, new) = ([&q.src, &q.dst], [&backend.addr, node_addr]);
    icmp_check = rewrite::addresses_check(ip.family, icmp_check, old, new);
    if v6 {
        if let Some(h) = pkt.header::<Ipv6Hdr>(q.ip_off) {
            h.src = backend.addr;
            h.dst = *node_addr;
        }
    } else if let Some(h) = pkt.header::<Ipv4Hdr>(q.ip_off) {
        let before = h.check;
        h.check = rewrite::addresses_check(ip.family, h.check, old, new);
        icmp_check = csum::update(icmp_check, &before, &h.check);
        h.src = *rewrite::v4_part(&backend.addr);
        h.dst = *rewrite::v4_part(node_addr);
    }
    // Quoted ports.
    let old_ports = [q.sport[0], q.sport[1], q.dport[0], q.dport[1]];
    let new_ports = [backend.port[0], backend.port[1], nat_port[0], nat_port[1]];
    icmp_check = csum::update(icmp_check, &old_ports, &new_ports);
    if let Some(p) = pkt.header::<PortsHdr>(q.l4_off) {
        p.src = backend.port;
        p.dst = nat_port;
    }
    // The quoted transport checksum, when the error quotes it.
    let tcp = q.proto == PROTO_TCP;
    let off = q.l4_off + if tcp { TCP_CHECK_OFF } else { UDP_CHECK_OFF };
    if off + 2 <= ip.end
        && let Some(c) = pkt.header::<Check>(off)
        && (tcp || v6 || c.value != [0, 0])
    {
        let before = c.value;
        let updated =
            csum::update(rewrite::addresses_check(ip.family, c.value, old, new), &old_ports, &new_ports);
        c.value = if tcp { updated } else { csum::udp_nonzero(updated) };
        icmp_check = csum::update(icmp_check, &before, &c.value);
    }
    if let Some(h) = pkt.header::<IcmpHdr>(ip.l4_off) {
        h.check = icmp_check;
    }
}
