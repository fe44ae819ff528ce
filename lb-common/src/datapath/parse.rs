//! Ethernet and IP parsing: the facts every later step needs, or the rule that passes the
//! frame.

use super::Counter;
use crate::{
    maps::{Addr, FAMILY_IPV4, FAMILY_IPV6, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, addr_v4},
    packet::{
        ETH_HLEN, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6, EthHdr, IPV4_MF, IPV4_MIN_HLEN,
        IPV4_OFFSET_MASK, IPV6_AH, IPV6_DEST_OPTS, IPV6_FRAG_HLEN, IPV6_FRAG_M, IPV6_FRAG_OFFSET_MASK,
        IPV6_FRAGMENT, IPV6_HLEN, IPV6_HOP_BY_HOP, IPV6_ROUTING, Ipv4Hdr, Ipv6FragHdr, Ipv6Hdr, Packet,
    },
};

/// Where a datagram stands in fragmentation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Frag {
    /// Not fragmented.
    #[default]
    None,
    /// The first fragment (offset 0, more to come): it carries the transport header.
    First(u32),
    /// A later fragment: no transport header.
    Later(u32),
}

/// An IP datagram's facts. Addresses first and the struct 8-aligned, so they are copied in
/// words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default)]
pub struct Ip {
    pub src: Addr,
    pub dst: Addr,
    /// Frame offset of the transport header (meaningless for a later fragment).
    pub l4_off: usize,
    /// Frame offset just past the datagram; Ethernet padding may follow.
    pub end: usize,
    pub frag: Frag,
    pub family: u8,
    /// Transport protocol (after an IPv6 fragment header).
    pub proto: u8,
    /// IPv4 TOS / IPv6 traffic class, copied to an outer header.
    pub tos: u8,
}

impl Ip {
    /// The ICMP protocol number of this family.
    #[must_use]
    pub const fn icmp_proto(&self) -> u8 {
        if self.family == FAMILY_IPV6 { PROTO_ICMPV6 } else { PROTO_ICMP }
    }
}

/// A parsed frame: the IP facts and link-layer addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Frame {
    pub ip: Ip,
    pub eth_dst: [u8; 6],
    pub eth_src: [u8; 6],
}

/// Parses the frame into `f`, or returns the counter of the rule that passes it. Filling a
/// caller-owned `Frame` keeps one copy of it on the BPF stack.
#[inline(always)]
pub fn parse<P: Packet>(pkt: &mut P, f: &mut Frame) -> Result<(), Counter> {
    let eth = pkt.header::<EthHdr>(0).ok_or(Counter::PassMalformed)?;
    f.eth_dst = eth.dst;
    f.eth_src = eth.src;
    match eth.ether_type {
        ETH_P_IPV4 => ipv4(pkt, &mut f.ip),
        ETH_P_IPV6 => ipv6(pkt, &mut f.ip),
        ETH_P_8021Q | ETH_P_8021AD => Err(Counter::PassVlan),
        _ => Err(Counter::PassNotIp),
    }
}

#[inline(never)]
fn ipv4<P: Packet>(pkt: &mut P, ip: &mut Ip) -> Result<(), Counter> {
    let len = pkt.len();
    let h = pkt.header::<Ipv4Hdr>(ETH_HLEN).ok_or(Counter::PassMalformed)?;
    let ihl = h.header_len();
    let tot_len = usize::from(u16::from_be_bytes(h.tot_len));
    // Ethernet may pad a short datagram, but never cut one.
    if h.version() != 4 || ihl < IPV4_MIN_HLEN || tot_len < ihl || tot_len > len - ETH_HLEN {
        return Err(Counter::PassMalformed);
    }
    let frag_off = u16::from_be_bytes(h.frag_off);
    let id = u32::from(u16::from_be_bytes(h.id));
    ip.frag = if frag_off & IPV4_OFFSET_MASK != 0 {
        Frag::Later(id)
    } else if frag_off & IPV4_MF != 0 {
        Frag::First(id)
    } else {
        Frag::None
    };
    ip.family = FAMILY_IPV4;
    ip.src = addr_v4(h.src);
    ip.dst = addr_v4(h.dst);
    ip.proto = h.proto;
    ip.l4_off = ETH_HLEN + ihl;
    ip.end = ETH_HLEN + tot_len;
    ip.tos = h.tos;
    Ok(())
}

#[inline(never)]
fn ipv6<P: Packet>(pkt: &mut P, ip: &mut Ip) -> Result<(), Counter> {
    let len = pkt.len();
    let h = pkt.header::<Ipv6Hdr>(ETH_HLEN).ok_or(Counter::PassMalformed)?;
    let payload = usize::from(u16::from_be_bytes(h.payload_len));
    if h.vtc_flow[0] >> 4 != 6 || payload > len - ETH_HLEN - IPV6_HLEN {
        return Err(Counter::PassMalformed);
    }
    ip.family = FAMILY_IPV6;
    ip.src = h.src;
    ip.dst = h.dst;
    ip.proto = h.next_header;
    ip.l4_off = ETH_HLEN + IPV6_HLEN;
    ip.end = ETH_HLEN + IPV6_HLEN + payload;
    ip.frag = Frag::None;
    ip.tos = (h.vtc_flow[0] << 4) | (h.vtc_flow[1] >> 4);
    match ip.proto {
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => {}
        IPV6_FRAGMENT => {
            if ip.l4_off + IPV6_FRAG_HLEN > ip.end {
                return Err(Counter::PassMalformed);
            }
            let f = pkt.header::<Ipv6FragHdr>(ip.l4_off).ok_or(Counter::PassMalformed)?;
            let off = u16::from_be_bytes(f.frag_off);
            let id = u32::from_be_bytes(f.id);
            ip.proto = f.next_header;
            ip.l4_off += IPV6_FRAG_HLEN;
            ip.frag = if off & IPV6_FRAG_OFFSET_MASK != 0 {
                Frag::Later(id)
            } else if off & IPV6_FRAG_M != 0 {
                Frag::First(id)
            } else {
                // An atomic fragment (RFC 6946): a whole datagram behind a fragment header.
                Frag::None
            };
            // Extension headers after the fragment header are not walked (for any fragment, so
            // all pieces of such a datagram take the same road).
            if is_extension(ip.proto) {
                return Err(Counter::PassIpv6Ext);
            }
        }
        n if is_extension(n) => return Err(Counter::PassIpv6Ext),
        _ => {}
    }
    Ok(())
}

#[inline(always)]
const fn is_extension(next: u8) -> bool {
    matches!(next, IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS | IPV6_AH | IPV6_FRAGMENT)
}
