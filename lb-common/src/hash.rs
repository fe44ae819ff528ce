//! Flow hash: Bob Jenkins' lookup3 (the kernel's `jhash`) with a fixed seed.
//!
//! The seed is a constant, not per-node randomness: several lb nodes behind DNS or ECMP must
//! send the same flow to the same backend.

use crate::maps::{Addr, FAMILY_IPV6};

/// Mixed into every flow hash; changing it moves every flow, so it is part of the data-plane
/// contract between nodes.
pub const FLOW_HASH_SEED: u32 = 0x6c62_5f31; // "lb_1"

const JHASH_INITVAL: u32 = 0xdead_beef;

#[inline(always)]
const fn final_mix(mut a: u32, mut b: u32, mut c: u32) -> u32 {
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(14));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(11));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(25));
    c ^= b;
    c = c.wrapping_sub(b.rotate_left(16));
    a ^= c;
    a = a.wrapping_sub(c.rotate_left(4));
    b ^= a;
    b = b.wrapping_sub(a.rotate_left(14));
    c ^= b;
    c.wrapping_sub(b.rotate_left(24))
}

#[inline(always)]
const fn mix(mut a: u32, mut b: u32, mut c: u32) -> (u32, u32, u32) {
    a = a.wrapping_sub(c);
    a ^= c.rotate_left(4);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= a.rotate_left(6);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= b.rotate_left(8);
    b = b.wrapping_add(a);
    a = a.wrapping_sub(c);
    a ^= c.rotate_left(16);
    c = c.wrapping_add(b);
    b = b.wrapping_sub(a);
    b ^= a.rotate_left(19);
    a = a.wrapping_add(c);
    c = c.wrapping_sub(b);
    c ^= b.rotate_left(4);
    b = b.wrapping_add(a);
    (a, b, c)
}

/// The kernel's `jhash_3words`.
#[inline(always)]
#[must_use]
pub const fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = initval.wrapping_add(JHASH_INITVAL).wrapping_add(3 << 2);
    final_mix(a.wrapping_add(init), b.wrapping_add(init), c.wrapping_add(init))
}

/// The kernel's `jhash2` over four words (an IPv6 address).
#[inline(always)]
#[must_use]
pub const fn jhash_4words(k: [u32; 4], initval: u32) -> u32 {
    let init = JHASH_INITVAL.wrapping_add(4 << 2).wrapping_add(initval);
    let (a, b, c) = mix(k[0].wrapping_add(init), k[1].wrapping_add(init), k[2].wrapping_add(init));
    final_mix(a.wrapping_add(k[3]), b, c)
}

#[inline(always)]
const fn words(a: &Addr) -> [u32; 4] {
    [
        u32::from_be_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_be_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_be_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_be_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// Hash of a flow's 5-tuple (addresses and ports as on the wire). IPv6 addresses are first
/// folded with `jhash2`, as the kernel does.
#[inline(always)]
#[must_use]
pub const fn flow_hash(family: u8, src: &Addr, dst: &Addr, sport: [u8; 2], dport: [u8; 2], proto: u8) -> u32 {
    let ports = u32::from_be_bytes([sport[0], sport[1], dport[0], dport[1]]);
    let (s, d) = if family == FAMILY_IPV6 {
        (jhash_4words(words(src), 0), jhash_4words(words(dst), 0))
    } else {
        (words(src)[0], words(dst)[0])
    };
    jhash_3words(s, d, ports, FLOW_HASH_SEED.wrapping_add(proto as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::{FAMILY_IPV4, addr_v4};

    /// Values printed by the kernel's own `jhash_3words` / `jhash2` macros compiled with gcc.
    #[test]
    fn matches_the_kernel_jhash() {
        assert_eq!(jhash_3words(1, 2, 3, 0), 0xa461_58f5);
        assert_eq!(jhash_3words(0, 0, 0, 0), 0x1b68_e557);
        assert_eq!(jhash_4words([1, 2, 3, 4], 0), 0x6649_1246);
    }

    fn v4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> u32 {
        flow_hash(FAMILY_IPV4, &addr_v4(src), &addr_v4(dst), sport.to_be_bytes(), dport.to_be_bytes(), proto)
    }

    #[test]
    fn every_tuple_field_changes_the_hash() {
        let base = v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 80, 6);
        assert_ne!(base, v4([10, 0, 0, 3], [10, 0, 0, 2], 1, 80, 6));
        assert_ne!(base, v4([10, 0, 0, 1], [10, 0, 0, 3], 1, 80, 6));
        assert_ne!(base, v4([10, 0, 0, 1], [10, 0, 0, 2], 2, 80, 6));
        assert_ne!(base, v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 81, 6));
        assert_ne!(base, v4([10, 0, 0, 1], [10, 0, 0, 2], 1, 80, 17));
        let v6 = |last: u8| {
            let mut a = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, last];
            a[8] = 1;
            flow_hash(FAMILY_IPV6, &a, &[0xfd; 16], [0, 1], [0, 80], 6)
        };
        assert_ne!(v6(1), v6(2), "every IPv6 address byte counts");
    }

    /// Consecutive client ports (what one client's connections look like) spread evenly.
    #[test]
    fn consecutive_source_ports_spread_evenly_over_buckets() {
        const BUCKETS: u32 = 7;
        const FLOWS: u16 = 14_000;
        let mut hits = [0u32; BUCKETS as usize];
        for port in 30_000..30_000 + FLOWS {
            hits[(v4([10, 0, 0, 1], [10, 0, 0, 2], port, 80, 6) % BUCKETS) as usize] += 1;
        }
        let ideal = u32::from(FLOWS) / BUCKETS;
        for h in hits {
            assert!(h.abs_diff(ideal) < ideal / 10, "bucket counts {hits:?} vs ideal {ideal}");
        }
    }
}
