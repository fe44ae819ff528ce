//! Building Ethernet/IPv4 frames for tests, and deterministic mutations of them.

use std::net::Ipv4Addr;

use lb_common::packet::{ETH_HLEN, ETH_P_IPV4};

/// Fields of a TCP or UDP frame; everything else takes a plain default.
#[derive(Clone, Debug)]
pub struct Ipv4Frame {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// 32-bit words of IP options (IHL = 5 + this).
    pub option_words: u8,
    pub payload_len: usize,
}

impl Ipv4Frame {
    /// The frame's bytes, with a correct total length and header checksum. The L4 header is
    /// 8 bytes (ports, then filler) followed by the payload.
    #[must_use]
    pub fn build(&self) -> Vec<u8> {
        let ihl = 5 + self.option_words;
        let mut f = Vec::with_capacity(ETH_HLEN + 60 + 8 + self.payload_len);
        f.extend_from_slice(&self.dst_mac);
        f.extend_from_slice(&self.src_mac);
        f.extend_from_slice(&ETH_P_IPV4);
        f.extend_from_slice(&[0x40 | ihl, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, self.proto, 0, 0]);
        f.extend_from_slice(&self.src.octets());
        f.extend_from_slice(&self.dst.octets());
        f.extend(std::iter::repeat_n(1u8, usize::from(self.option_words) * 4));
        f.extend_from_slice(&self.sport.to_be_bytes());
        f.extend_from_slice(&self.dport.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0]);
        f.extend((0..self.payload_len).map(|i| u8::try_from(i % 251).expect("small")));
        let tot_len = u16::try_from(f.len() - ETH_HLEN).expect("frame fits");
        f[16..18].copy_from_slice(&tot_len.to_be_bytes());
        let ip_end = ETH_HLEN + usize::from(ihl) * 4;
        let sum = checksum(&f[ETH_HLEN..ip_end]);
        f[24..26].copy_from_slice(&sum.to_be_bytes());
        f
    }
}

/// The Internet checksum of `bytes`.
#[must_use]
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 =
        bytes.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).expect("folded")
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
    /// `min_len`), or a random IPv4 total length.
    pub fn mutate(&mut self, frame: &[u8], min_len: usize) -> Vec<u8> {
        let mut f = frame.to_vec();
        match self.below(3) {
            0 => {
                let at = self.below(f.len().min(ETH_HLEN + 64));
                f[at] ^= 1 << self.below(8);
            }
            1 if f.len() > min_len => f.truncate(min_len + self.below(f.len() - min_len)),
            _ if f.len() >= ETH_HLEN + 4 => {
                let v = u16::try_from(self.below(usize::from(u16::MAX))).expect("u16");
                f[16..18].copy_from_slice(&v.to_be_bytes());
            }
            _ => {
                let at = self.below(f.len());
                f[at] ^= 1 << self.below(8);
            }
        }
        f
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_headers_checksum_to_zero() {
        let f = Ipv4Frame {
            dst_mac: [2; 6],
            src_mac: [4; 6],
            src: Ipv4Addr::new(10, 0, 0, 1),
            dst: Ipv4Addr::new(10, 0, 0, 2),
            proto: 6,
            sport: 1000,
            dport: 80,
            option_words: 1,
            payload_len: 10,
        }
        .build();
        assert_eq!(f.len(), 14 + 24 + 8 + 10);
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 42);
        assert_eq!(checksum(&f[14..38]), 0);
    }
}
