//! Building Ethernet/IP frames for tests (correct lengths and checksums), checking checksums of
//! frames that come out, and deterministic mutations.

use std::net::IpAddr;

use lb_common::{
    maps::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP},
    packet::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6, IPV6_FRAGMENT},
};

/// Where a datagram stands in fragmentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fragment {
    None,
    /// The first fragment of datagram `id`.
    First(u32),
    /// A later fragment of datagram `id`, at byte offset `offset` (a multiple of 8).
    Later(u32, u16),
}

/// A TCP, UDP or ICMP frame; build it with [`Frame::build`].
#[derive(Clone, Debug)]
pub struct Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP flags (TCP only).
    pub flags: u8,
    /// 32-bit words of IPv4 options.
    pub option_words: u8,
    pub payload: Vec<u8>,
    pub fragment: Fragment,
    pub ttl: u8,
    /// ICMP: the 4 bytes after the checksum (identifier and sequence, or the next-hop MTU).
    pub icmp_rest: u32,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_RST: u8 = 0x04;

impl Frame {
    /// A TCP/UDP frame with a payload of `payload_len` counting bytes.
    #[must_use]
    pub fn new(src: IpAddr, dst: IpAddr, proto: u8, sport: u16, dport: u16, payload_len: usize) -> Self {
        Self {
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_mac: [2, 0, 0, 0, 0, 0x10],
            src,
            dst,
            proto,
            sport,
            dport,
            flags: if proto == PROTO_TCP { TCP_ACK } else { 0 },
            option_words: 0,
            payload: (0..payload_len).map(|i| u8::try_from(i % 251).expect("small")).collect(),
            fragment: Fragment::None,
            ttl: 64,
            icmp_rest: (u32::from(dport) << 16) | 1,
        }
    }

    fn v6(&self) -> bool {
        self.src.is_ipv6()
    }

    /// The transport header and payload (checksum filled for a whole datagram).
    fn transport(&self) -> Vec<u8> {
        let mut t = Vec::new();
        match self.proto {
            PROTO_TCP => {
                t.extend_from_slice(&self.sport.to_be_bytes());
                t.extend_from_slice(&self.dport.to_be_bytes());
                t.extend_from_slice(&1000u32.to_be_bytes());
                t.extend_from_slice(&2000u32.to_be_bytes());
                t.extend_from_slice(&[0x50, self.flags, 0xff, 0xff, 0, 0, 0, 0]);
            }
            PROTO_UDP => {
                t.extend_from_slice(&self.sport.to_be_bytes());
                t.extend_from_slice(&self.dport.to_be_bytes());
                let len = u16::try_from(8 + self.payload.len()).expect("fits");
                t.extend_from_slice(&len.to_be_bytes());
                t.extend_from_slice(&[0, 0]);
            }
            // ICMP: `sport` is type << 8 | code.
            _ => {
                t.extend_from_slice(&self.sport.to_be_bytes());
                t.extend_from_slice(&[0, 0]);
                t.extend_from_slice(&self.icmp_rest.to_be_bytes());
            }
        }
        t.extend_from_slice(&self.payload);
        let check_at = match self.proto {
            PROTO_TCP => 16,
            PROTO_UDP => 6,
            _ => 2,
        };
        let pseudo = self.proto != PROTO_ICMP;
        let sum = transport_checksum(self.src, self.dst, self.proto, &t, pseudo);
        let sum = if self.proto == PROTO_UDP && sum == [0, 0] { [0xff, 0xff] } else { sum };
        t[check_at..check_at + 2].copy_from_slice(&sum);
        t
    }

    /// The frame's bytes.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let transport = self.transport();
        // A later fragment carries a slice of the datagram's transport bytes from `offset`.
        let body: Vec<u8> = match self.fragment {
            Fragment::Later(_, offset) => transport.get(usize::from(offset)..).unwrap_or_default().to_vec(),
            _ => transport,
        };
        let mut f = Vec::new();
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        if self.v6() {
            f.extend_from_slice(&ETH_P_IPV6);
            let (next, frag) = match self.fragment {
                Fragment::None => (self.proto, Vec::new()),
                Fragment::First(id) | Fragment::Later(id, _) => {
                    let (offset, more) = match self.fragment {
                        Fragment::Later(_, o) => (o, 0),
                        _ => (0, 1),
                    };
                    let mut h = vec![self.proto, 0];
                    h.extend_from_slice(&(offset | more).to_be_bytes());
                    h.extend_from_slice(&id.to_be_bytes());
                    (IPV6_FRAGMENT, h)
                }
            };
            let payload_len = u16::try_from(frag.len() + body.len()).expect("fits");
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&payload_len.to_be_bytes());
            f.extend_from_slice(&[next, self.ttl]);
            f.extend_from_slice(&octets(self.src));
            f.extend_from_slice(&octets(self.dst));
            f.extend_from_slice(&frag);
        } else {
            f.extend_from_slice(&ETH_P_IPV4);
            let ihl = 5 + self.option_words;
            let tot_len = u16::try_from(usize::from(ihl) * 4 + body.len()).expect("fits");
            let (id, frag_off) = match self.fragment {
                Fragment::None => (0x1234, 0x4000u16),
                Fragment::First(id) => (u16::try_from(id).expect("v4 ids are 16-bit"), 0x2000),
                Fragment::Later(id, o) => (u16::try_from(id).expect("v4 ids are 16-bit"), o / 8),
            };
            let start = f.len();
            f.extend_from_slice(&[0x40 | ihl, 0]);
            f.extend_from_slice(&tot_len.to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&frag_off.to_be_bytes());
            f.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
            f.extend_from_slice(&octets(self.src)[..4]);
            f.extend_from_slice(&octets(self.dst)[..4]);
            f.extend(std::iter::repeat_n(1u8, usize::from(self.option_words) * 4));
            let sum = checksum(&f[start..]);
            f[start + 10..start + 12].copy_from_slice(&sum);
        }
        f.extend_from_slice(&body);
        f
    }
}

fn octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => {
            let mut o = [0; 16];
            o[..4].copy_from_slice(&a.octets());
            o
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// An ICMP / `ICMPv6` error of `kind`/`code` from `router` to `to`, quoting the IP datagram of
/// the built frame `quoted`, up to `quote` bytes. `rest` fills the 4 bytes after the checksum
/// (the next-hop MTU).
#[must_use]
pub fn icmp_error(
    router: IpAddr,
    to: IpAddr,
    kind: u8,
    code: u8,
    rest: u32,
    quoted: &[u8],
    quote: usize,
) -> Frame {
    let datagram = &quoted[ETH_HLEN..];
    let proto = if router.is_ipv6() { PROTO_ICMPV6 } else { PROTO_ICMP };
    let mut f = Frame::new(router, to, proto, (u16::from(kind) << 8) | u16::from(code), 0, 0);
    f.icmp_rest = rest;
    f.payload = datagram[..quote.min(datagram.len())].to_vec();
    f
}

/// An ICMP / `ICMPv6` echo request.
#[must_use]
pub fn echo_request(src: IpAddr, dst: IpAddr, id: u16, payload_len: usize) -> Frame {
    let (proto, kind) = if src.is_ipv6() { (PROTO_ICMPV6, 128u16) } else { (PROTO_ICMP, 8u16) };
    Frame::new(src, dst, proto, kind << 8, id, payload_len)
}

/// The Internet checksum of `bytes`.
#[must_use]
pub fn checksum(bytes: &[u8]) -> [u8; 2] {
    let mut sum: u32 =
        bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!u16::try_from(sum).expect("folded")).to_be_bytes()
}

/// The checksum of a transport segment, with the IPv4/IPv6 pseudo-header when `pseudo`.
#[must_use]
pub fn transport_checksum(src: IpAddr, dst: IpAddr, proto: u8, segment: &[u8], pseudo: bool) -> [u8; 2] {
    let mut data = Vec::new();
    if pseudo {
        if src.is_ipv6() {
            data.extend_from_slice(&octets(src));
            data.extend_from_slice(&octets(dst));
            data.extend_from_slice(&u32::try_from(segment.len()).expect("fits").to_be_bytes());
            data.extend_from_slice(&[0, 0, 0, proto]);
        } else {
            data.extend_from_slice(&octets(src)[..4]);
            data.extend_from_slice(&octets(dst)[..4]);
            data.extend_from_slice(&[0, proto]);
            data.extend_from_slice(&u16::try_from(segment.len()).expect("fits").to_be_bytes());
        }
    }
    data.extend_from_slice(segment);
    checksum(&data)
}

/// Checks the IP header checksum and the transport checksum of an unfragmented datagram
/// starting at `ip_off`, descending into IPIP / IP6IP6 inner datagrams. A UDP/IPv4 checksum of 0
/// means "none" and passes.
///
/// # Errors
/// A description of the first checksum that does not verify.
pub fn verify(frame: &[u8], ip_off: usize) -> Result<(), String> {
    let ip = &frame[ip_off..];
    let v6 = ip[0] >> 4 == 6;
    let (src, dst, proto, hlen, len): (IpAddr, IpAddr, u8, usize, usize) = if v6 {
        let s: [u8; 16] = ip[8..24].try_into().expect("16");
        let d: [u8; 16] = ip[24..40].try_into().expect("16");
        (s.into(), d.into(), ip[6], 40, 40 + usize::from(u16::from_be_bytes([ip[4], ip[5]])))
    } else {
        let hlen = usize::from(ip[0] & 0xf) * 4;
        if checksum(&ip[..hlen]) != [0, 0] {
            return Err("IPv4 header checksum".to_owned());
        }
        let s: [u8; 4] = ip[12..16].try_into().expect("4");
        let d: [u8; 4] = ip[16..20].try_into().expect("4");
        (s.into(), d.into(), ip[9], hlen, usize::from(u16::from_be_bytes([ip[2], ip[3]])))
    };
    let segment = &ip[hlen..len];
    match proto {
        4 | 41 => verify(frame, ip_off + hlen),
        PROTO_UDP if !v6 && segment[6..8] == [0, 0] => Ok(()),
        PROTO_TCP | PROTO_UDP | PROTO_ICMPV6 => {
            if transport_checksum(src, dst, proto, segment, true) == [0, 0] {
                Ok(())
            } else {
                Err(format!("protocol {proto} checksum"))
            }
        }
        PROTO_ICMP => {
            if checksum(segment) == [0, 0] {
                Ok(())
            } else {
                Err("ICMP checksum".to_owned())
            }
        }
        _ => Ok(()),
    }
}

/// A small deterministic generator (xorshift64*) for reproducible mutations.
pub struct Rng(u64);

impl Rng {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next_u64() % (n as u64)).expect("fits")
    }

    /// `frame` with one mutation: a flipped bit in the headers, a truncation (never below
    /// `min_len`), or a random IP length field.
    pub fn mutate(&mut self, frame: &[u8], min_len: usize) -> Vec<u8> {
        let mut f = frame.to_vec();
        match self.below(3) {
            1 if f.len() > min_len => f.truncate(min_len + self.below(f.len() - min_len)),
            2 if f.len() >= ETH_HLEN + 6 => {
                let v = u16::try_from(self.below(usize::from(u16::MAX))).expect("u16");
                // IPv4 total length, or IPv6 payload length.
                let at = if f[12..14] == ETH_P_IPV6 { ETH_HLEN + 4 } else { ETH_HLEN + 2 };
                f[at..at + 2].copy_from_slice(&v.to_be_bytes());
            }
            _ => {
                let at = self.below(f.len().min(ETH_HLEN + 96));
                f[at] ^= 1 << self.below(8);
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn built_frames_verify_in_both_families() {
        for (src, dst) in [("10.0.0.1", "10.0.0.2"), ("2001:db8::1", "2001:db8::2")] {
            for proto in [PROTO_TCP, PROTO_UDP] {
                let f = Frame::new(ip(src), ip(dst), proto, 1000, 80, 33).build();
                verify(&f, ETH_HLEN).unwrap();
            }
            verify(&echo_request(ip(src), ip(dst), 7, 20).build(), ETH_HLEN).unwrap();
        }
        let mut with_options = Frame::new(ip("10.0.0.1"), ip("10.0.0.2"), PROTO_TCP, 1, 2, 10);
        with_options.option_words = 2;
        verify(&with_options.build(), ETH_HLEN).unwrap();
    }

    #[test]
    fn a_corrupted_checksum_is_caught() {
        let mut f = Frame::new(ip("10.0.0.1"), ip("10.0.0.2"), PROTO_TCP, 1000, 80, 10).build();
        f[ETH_HLEN + 20 + 16] ^= 1;
        assert!(verify(&f, ETH_HLEN).is_err());
    }

    #[test]
    fn icmp_errors_quote_the_packet_and_verify() {
        let reply = Frame::new(ip("10.0.1.1"), ip("10.0.0.10"), PROTO_TCP, 80, 40000, 100).build();
        let e = icmp_error(ip("10.0.9.1"), ip("10.0.1.1"), 3, 4, 1400, &reply, 28).build();
        verify(&e, ETH_HLEN).unwrap();
        assert_eq!(&e[ETH_HLEN + 28..ETH_HLEN + 56], &reply[ETH_HLEN..ETH_HLEN + 28]);
    }
}
