//! Rewrites: the three forwarding modes and NAT translation. Checksums are updated
//! incrementally; nothing here allocates or loops over the payload.

use super::{Counter, Ip};
use crate::{
    csum,
    hash::flow_hash,
    maps::{
        Addr, Backend, FAMILY_IPV6, MODE_DSR_IPIP, MODE_NAT, NodeConfig, PROTO_IPIP, PROTO_IPV6, PROTO_TCP,
    },
    packet::{
        Check, ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, EthHdr, IPV4_DF, IPV4_MIN_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr,
        Packet, PortsHdr, TCP_CHECK_OFF, UDP_CHECK_OFF,
    },
};

/// `adjust_head` deltas that make room for an outer IPv4 / IPv6 header.
const GROW_V4: i32 = -20;
const GROW_V6: i32 = -40;
const _: () =
    assert!(GROW_V4.unsigned_abs() as usize == IPV4_MIN_HLEN && GROW_V6.unsigned_abs() as usize == IPV6_HLEN);

/// TTL / hop limit of outer headers lb builds.
const OUTER_TTL: u8 = 64;
/// IPv6 flow label bits.
const FLOW_LABEL_MASK: u32 = 0x000f_ffff;

#[inline(always)]
pub fn set_macs<P: Packet>(pkt: &mut P, dst: [u8; 6], src: [u8; 6]) {
    if let Some(eth) = pkt.header::<EthHdr>(0) {
        eth.dst = dst;
        eth.src = src;
    }
}

/// Sends the datagram `ip` to `backend` by `mode`. `nat_ports` (new source and destination
/// port) apply in `nat` mode to a packet with a transport header; without them (a later
/// fragment) only addresses are translated.
#[inline(always)]
pub fn send<P: Packet>(
    pkt: &mut P,
    node: &NodeConfig,
    ip: &Ip,
    mode: u8,
    backend: &Backend,
    nat_ports: Option<[[u8; 2]; 2]>,
) -> Result<(), Counter> {
    match mode {
        MODE_DSR_IPIP => encapsulate(pkt, node, ip, backend),
        MODE_NAT => {
            let src = node.addr(ip.family).ok_or(Counter::DropNoNodeAddr)?;
            if backend.family != ip.family {
                return Err(Counter::DropNoBackend);
            }
            match nat_ports {
                Some(ports) => nat_full(pkt, ip, &src, &backend.addr, ports),
                None => nat_addresses(pkt, ip, &src, &backend.addr),
            }
            set_macs(pkt, backend.mac, node.mac);
            Ok(())
        }
        _ => {
            set_macs(pkt, backend.mac, node.mac);
            Ok(())
        }
    }
}

/// Wraps the datagram in an outer IPv4 (IPIP, 6in4) or IPv6 (IP6IP6, 4in6) header from this
/// node to the backend. The outer IPv4 header has DF set: the path to backends must carry the
/// extra bytes (see README, MTU).
#[inline(never)]
fn encapsulate<P: Packet>(pkt: &mut P, node: &NodeConfig, ip: &Ip, backend: &Backend) -> Result<(), Counter> {
    let src = node.addr(backend.family).ok_or(Counter::DropNoNodeAddr)?;
    let inner_len = ip.end - ETH_HLEN;
    let inner_proto = if ip.family == FAMILY_IPV6 { PROTO_IPV6 } else { PROTO_IPIP };
    if backend.family == FAMILY_IPV6 {
        let payload = u16::try_from(inner_len).map_err(|_| Counter::DropEncapFailed)?;
        let label = flow_hash(ip.family, &ip.src, &ip.dst, [0; 2], [0; 2], ip.proto) & FLOW_LABEL_MASK;
        if !pkt.adjust_head(GROW_V6) {
            return Err(Counter::DropEncapFailed);
        }
        write_eth(pkt, backend.mac, node.mac, ETH_P_IPV6)?;
        let o = pkt.header::<Ipv6Hdr>(ETH_HLEN).ok_or(Counter::DropEncapFailed)?;
        o.vtc_flow = ((6 << 28) | (u32::from(ip.tos) << 20) | label).to_be_bytes();
        o.payload_len = payload.to_be_bytes();
        o.next_header = inner_proto;
        o.hop_limit = OUTER_TTL;
        o.src = src;
        o.dst = backend.addr;
    } else {
        let total =
            u16::try_from(inner_len + IPV4_MIN_HLEN).map_err(|_| Counter::DropEncapFailed)?.to_be_bytes();
        if !pkt.adjust_head(GROW_V4) {
            return Err(Counter::DropEncapFailed);
        }
        write_eth(pkt, backend.mac, node.mac, ETH_P_IPV4)?;
        let df = IPV4_DF.to_be_bytes();
        let mut h = [
            0x45,
            ip.tos,
            total[0],
            total[1],
            0,
            0,
            df[0],
            df[1],
            OUTER_TTL,
            inner_proto,
            0,
            0,
            src[0],
            src[1],
            src[2],
            src[3],
            backend.addr[0],
            backend.addr[1],
            backend.addr[2],
            backend.addr[3],
        ];
        let check = csum::ipv4_header(&h);
        h[10] = check[0];
        h[11] = check[1];
        let o = pkt.header::<[u8; IPV4_MIN_HLEN]>(ETH_HLEN).ok_or(Counter::DropEncapFailed)?;
        *o = h;
    }
    Ok(())
}

#[inline(always)]
fn write_eth<P: Packet>(pkt: &mut P, dst: [u8; 6], src: [u8; 6], ether_type: [u8; 2]) -> Result<(), Counter> {
    let eth = pkt.header::<EthHdr>(0).ok_or(Counter::DropEncapFailed)?;
    eth.dst = dst;
    eth.src = src;
    eth.ether_type = ether_type;
    Ok(())
}

/// The IPv4 part of an [`Addr`], borrowed.
#[inline(always)]
pub fn v4_part(a: &Addr) -> &[u8; 4] {
    a.first_chunk::<4>().unwrap_or(&[0; 4])
}

/// `check` after the addresses it covers (an IPv4 header or a pseudo-header) changed from
/// `old` (source, destination) to `new`.
#[inline(always)]
pub fn addresses_check(family: u8, check: [u8; 2], old: [&Addr; 2], new: [&Addr; 2]) -> [u8; 2] {
    if family == FAMILY_IPV6 {
        csum::update(csum::update(check, old[0], new[0]), old[1], new[1])
    } else {
        let c = csum::update(check, v4_part(old[0]), v4_part(new[0]));
        csum::update(c, v4_part(old[1]), v4_part(new[1]))
    }
}

/// Rewrites the IP source and destination (and the IPv4 header checksum). Transport checksums
/// are the caller's: a later fragment has none.
#[inline(always)]
pub fn nat_addresses<P: Packet>(pkt: &mut P, ip: &Ip, src: &Addr, dst: &Addr) {
    if ip.family == FAMILY_IPV6 {
        if let Some(h) = pkt.header::<Ipv6Hdr>(ETH_HLEN) {
            h.src = *src;
            h.dst = *dst;
        }
    } else if let Some(h) = pkt.header::<Ipv4Hdr>(ETH_HLEN) {
        h.check = addresses_check(ip.family, h.check, [&ip.src, &ip.dst], [src, dst]);
        h.src = *v4_part(src);
        h.dst = *v4_part(dst);
    }
}

/// Rewrites addresses and ports (`[source, destination]`) of a TCP/UDP packet, and its
/// checksums. A UDP/IPv4 packet without a checksum (zero) keeps none.
#[inline(never)]
pub fn nat_full<P: Packet>(pkt: &mut P, ip: &Ip, src: &Addr, dst: &Addr, ports: [[u8; 2]; 2]) {
    let [sport, dport] = ports;
    nat_addresses(pkt, ip, src, dst);
    let Some(ports) = pkt.header::<PortsHdr>(ip.l4_off) else { return };
    let old_ports = [ports.src[0], ports.src[1], ports.dst[0], ports.dst[1]];
    let new_ports = [sport[0], sport[1], dport[0], dport[1]];
    ports.src = sport;
    ports.dst = dport;
    let tcp = ip.proto == PROTO_TCP;
    let off = ip.l4_off + if tcp { TCP_CHECK_OFF } else { UDP_CHECK_OFF };
    let Some(check) = pkt.header::<Check>(off) else { return };
    if !tcp && ip.family != FAMILY_IPV6 && check.value == [0, 0] {
        return;
    }
    let c = addresses_check(ip.family, check.value, [&ip.src, &ip.dst], [src, dst]);
    let c = csum::update(c, &old_ports, &new_ports);
    check.value = if tcp { c } else { csum::udp_nonzero(c) };
}
