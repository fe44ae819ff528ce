//! Address ranges (`10.0.0.0/8`, `2001:db8::/32`, one address) as the registry writes them:
//! whitelists, ACLs and the XDP deny lists (pure).

use std::net::{IpAddr, Ipv6Addr};

/// An address range. IPv4 is matched as IPv4-mapped IPv6, so `::ffff:10.0.0.1` is in
/// `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: u128,
    mask: u128,
    v4: bool,
}

impl Cidr {
    /// `10.0.0.0/8`, `2001:db8::/32`, or one address.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l.parse::<u32>().map_err(|_| format!("bad prefix length in `{s}`"))?)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| format!("`{addr}` is not an IP address"))?;
        let offset = if ip.is_ipv4() { 96 } else { 0 };
        let len = len.unwrap_or(128 - offset);
        if len > 128 - offset {
            return Err(format!("prefix length {len} is too long in `{s}`"));
        }
        let total = len + offset;
        let mask = if total == 0 { 0 } else { u128::MAX << (128 - total) };
        Ok(Self { net: bits(ip) & mask, mask, v4: ip.is_ipv4() })
    }

    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        bits(ip) & self.mask == self.net
    }

    /// Whether it was written as an IPv4 range.
    #[must_use]
    pub const fn is_ipv4(&self) -> bool {
        self.v4
    }

    /// The range's first address, in the family it was written in.
    #[must_use]
    pub fn network(&self) -> IpAddr {
        let a = Ipv6Addr::from(self.net);
        match a.to_ipv4_mapped() {
            Some(v4) if self.v4 => IpAddr::V4(v4),
            _ => IpAddr::V6(a),
        }
    }

    /// The prefix length in its own family's bits (`/8` of IPv4 is 8).
    #[must_use]
    pub const fn prefix_len(&self) -> u32 {
        self.mask.count_ones() - if self.v4 { 96 } else { 0 }
    }
}

/// An address as 128 bits, IPv4 mapped into IPv6 (so `::ffff:10.0.0.1` is `10.0.0.1`).
#[must_use]
pub fn bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_match_by_prefix_in_both_families() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.200.1.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        let c = Cidr::parse("172.16.0.0/12").unwrap();
        assert!(c.contains("172.31.255.255".parse().unwrap()));
        assert!(!c.contains("172.32.0.0".parse().unwrap()));
        let c = Cidr::parse("2001:db8::/32").unwrap();
        assert!(c.contains("2001:db8:1::1".parse().unwrap()));
        assert!(!c.contains("10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.1").unwrap().contains("10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope/8").is_err());
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn a_range_knows_its_family_network_and_length() {
        let c = Cidr::parse("192.0.2.77/24").unwrap();
        assert_eq!((c.is_ipv4(), c.network(), c.prefix_len()), (true, "192.0.2.0".parse().unwrap(), 24));
        let c = Cidr::parse("2001:db8:ff::/33").unwrap();
        assert_eq!((c.is_ipv4(), c.network(), c.prefix_len()), (false, "2001:db8::".parse().unwrap(), 33));
        let c = Cidr::parse("::ffff:10.0.0.0/104").unwrap();
        assert_eq!((c.is_ipv4(), c.prefix_len()), (false, 104), "written as IPv6, it stays IPv6");
    }
}
