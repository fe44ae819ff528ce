//! The PROXY protocol v2 header (HAProxy's spec, section 2.2): the first bytes of a connection
//! to a backend, naming the client and the address it connected to.

use std::net::{IpAddr, SocketAddr};

const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const V2_PROXY: u8 = 0x21;
const TCP_V4: u8 = 0x11;
const TCP_V6: u8 = 0x21;

/// The header for a TCP connection from `client` to `local` (IPv4 when both are IPv4 or
/// IPv4-mapped, else IPv6).
#[must_use]
pub fn header(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    };
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&SIGNATURE);
    out.push(V2_PROXY);
    if let (Some(src), Some(dst)) = (v4(client.ip()), v4(local.ip())) {
        out.push(TCP_V4);
        out.extend_from_slice(&12u16.to_be_bytes());
        out.extend_from_slice(&src.octets());
        out.extend_from_slice(&dst.octets());
    } else {
        let v6 = |ip: IpAddr| match ip {
            IpAddr::V4(a) => a.to_ipv6_mapped(),
            IpAddr::V6(a) => a,
        };
        out.push(TCP_V6);
        out.extend_from_slice(&36u16.to_be_bytes());
        out.extend_from_slice(&v6(client.ip()).octets());
        out.extend_from_slice(&v6(local.ip()).octets());
    }
    out.extend_from_slice(&client.port().to_be_bytes());
    out.extend_from_slice(&local.port().to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv4_header_is_the_spec_bytes() {
        let h = header("10.0.0.9:40000".parse().unwrap(), "192.168.1.1:443".parse().unwrap());
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 0, 0, 9, 192, 168, 1, 1, 0x9c, 0x40, 0x01, 0xbb]);
        assert_eq!(h, want);
    }

    #[test]
    fn mapped_addresses_are_ipv4_and_mixed_families_ipv6() {
        let h = header("[::ffff:10.0.0.9]:1".parse().unwrap(), "10.0.0.1:2".parse().unwrap());
        assert_eq!(h[13], TCP_V4);
        assert_eq!(h.len(), 16 + 12);
        let h = header("[2001:db8::1]:1".parse().unwrap(), "10.0.0.1:2".parse().unwrap());
        assert_eq!(h[13], TCP_V6);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]), 36);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(&h[32..48], &"::ffff:10.0.0.1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    }
}
