//! The decapsulation program lb ships for backends of `dsr-ipip` services: it unwraps IPIP,
//! 6in4, IP6IP6 and 4in6 packets addressed to this host, so hosts without tunnel devices (or
//! without wanting them) still receive tunnelled VIP traffic. The inner packet then goes up the
//! stack as if it had arrived directly; the backend answers the client itself.

use crate::{
    maps::{AddrKey, FAMILY_IPV4, FAMILY_IPV6, PROTO_IPIP, PROTO_IPV6, addr_v4},
    packet::{
        ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, EthHdr, IPV4_MF, IPV4_MIN_HLEN, IPV4_OFFSET_MASK, IPV6_HLEN,
        Ipv4Hdr, Ipv6Hdr, Packet,
    },
};

/// What the decapsulation program reads.
pub trait DecapTables {
    /// True for addresses of this host that tunnelled packets may be sent to.
    fn is_local(&self, key: &AddrKey) -> bool;
    fn count(&self, counter: DecapCounter);
}

/// Counters of the decapsulation program (`LB_DECAP_COUNTERS`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapCounter {
    /// Unwrapped and passed up the stack.
    Decapsulated = 0,
    /// Not a tunnelled packet for this host: passed unchanged.
    Passed = 1,
}

impl DecapCounter {
    pub const COUNT: u32 = 2;
}

/// Unwraps one tunnelled packet for this host; everything else passes unchanged.
#[inline(always)]
pub fn decapsulate<P: Packet, T: DecapTables>(pkt: &mut P, t: &T) -> bool {
    let unwrapped = try_decapsulate(pkt, t);
    t.count(if unwrapped { DecapCounter::Decapsulated } else { DecapCounter::Passed });
    unwrapped
}

#[inline(always)]
fn try_decapsulate<P: Packet, T: DecapTables>(pkt: &mut P, t: &T) -> bool {
    let Some(eth) = pkt.header::<EthHdr>(0).copied() else { return false };
    let (outer_len, inner_proto, dst) = match eth.ether_type {
        ETH_P_IPV4 => {
            let Some(h) = pkt.header::<Ipv4Hdr>(ETH_HLEN).copied() else { return false };
            let fragmented = u16::from_be_bytes(h.frag_off) & (IPV4_MF | IPV4_OFFSET_MASK) != 0;
            if h.version() != 4 || h.header_len() < IPV4_MIN_HLEN || fragmented {
                return false;
            }
            (h.header_len(), h.proto, AddrKey { addr: addr_v4(h.dst), family: FAMILY_IPV4, _pad: [0; 3] })
        }
        ETH_P_IPV6 => {
            let Some(h) = pkt.header::<Ipv6Hdr>(ETH_HLEN).copied() else { return false };
            if h.vtc_flow[0] >> 4 != 6 {
                return false;
            }
            (IPV6_HLEN, h.next_header, AddrKey { addr: h.dst, family: FAMILY_IPV6, _pad: [0; 3] })
        }
        _ => return false,
    };
    let inner_type = match inner_proto {
        PROTO_IPIP => ETH_P_IPV4,
        PROTO_IPV6 => ETH_P_IPV6,
        _ => return false,
    };
    // The inner header must be there: never hand the stack a frame cut inside it.
    let inner_min = if inner_type == ETH_P_IPV4 { IPV4_MIN_HLEN } else { IPV6_HLEN };
    if pkt.len() < ETH_HLEN + outer_len + inner_min || !t.is_local(&dst) {
        return false;
    }
    let Ok(delta) = i32::try_from(outer_len) else { return false };
    if !pkt.adjust_head(delta) {
        return false;
    }
    if let Some(e) = pkt.header::<EthHdr>(0) {
        e.dst = eth.dst;
        e.src = eth.src;
        e.ether_type = inner_type;
    }
    true
}
