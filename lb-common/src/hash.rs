//! Flow hash: Bob Jenkins' lookup3 (the kernel's `jhash`) with a fixed seed.
//!
//! The seed is a constant, not per-node randomness: several lb nodes behind DNS or ECMP must
//! send the same flow to the same backend.

/// Mixed into every flow hash; changing it moves every flow, so it is part of the data-plane
/// contract between nodes.
pub const FLOW_HASH_SEED: u32 = 0x6c62_5f31; // "lb_1"

const JHASH_INITVAL: u32 = 0xdead_beef;

/// The kernel's `jhash_3words`.
#[inline(always)]
#[must_use]
pub const fn jhash_3words(a: u32, b: u32, c: u32, initval: u32) -> u32 {
    let init = initval.wrapping_add(JHASH_INITVAL).wrapping_add(3 << 2);
    let mut a = a.wrapping_add(init);
    let mut b = b.wrapping_add(init);
    let mut c = c.wrapping_add(init);
    // __jhash_final
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

/// Hash of an IPv4 flow's 5-tuple (addresses and ports as on the wire).
#[inline(always)]
#[must_use]
pub const fn flow_hash_v4(src: [u8; 4], dst: [u8; 4], sport: [u8; 2], dport: [u8; 2], proto: u8) -> u32 {
    let ports = u32::from_be_bytes([sport[0], sport[1], dport[0], dport[1]]);
    jhash_3words(
        u32::from_be_bytes(src),
        u32::from_be_bytes(dst),
        ports,
        FLOW_HASH_SEED.wrapping_add(proto as u32),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values printed by the kernel's own `jhash_3words` macros compiled with gcc.
    #[test]
    fn matches_the_kernel_jhash() {
        assert_eq!(jhash_3words(1, 2, 3, 0), 0xa461_58f5);
        assert_eq!(jhash_3words(0, 0, 0, 0), 0x1b68_e557);
    }

    #[test]
    fn every_tuple_field_changes_the_hash() {
        let base = flow_hash_v4([10, 0, 0, 1], [10, 0, 0, 2], [0, 1], [0, 80], 6);
        assert_ne!(base, flow_hash_v4([10, 0, 0, 3], [10, 0, 0, 2], [0, 1], [0, 80], 6));
        assert_ne!(base, flow_hash_v4([10, 0, 0, 1], [10, 0, 0, 3], [0, 1], [0, 80], 6));
        assert_ne!(base, flow_hash_v4([10, 0, 0, 1], [10, 0, 0, 2], [0, 2], [0, 80], 6));
        assert_ne!(base, flow_hash_v4([10, 0, 0, 1], [10, 0, 0, 2], [0, 1], [0, 81], 6));
        assert_ne!(base, flow_hash_v4([10, 0, 0, 1], [10, 0, 0, 2], [0, 1], [0, 80], 17));
    }

    /// Consecutive client ports (what one client's connections look like) spread evenly.
    #[test]
    fn consecutive_source_ports_spread_evenly_over_buckets() {
        const BUCKETS: usize = 7;
        const FLOWS: u16 = 14_000;
        let mut hits = [0u32; BUCKETS];
        for port in 30_000..30_000 + FLOWS {
            let h = flow_hash_v4([10, 0, 0, 1], [10, 0, 0, 2], port.to_be_bytes(), [0, 80], 6);
            hits[h as usize % BUCKETS] += 1;
        }
        let ideal = u32::from(FLOWS) / u32::try_from(BUCKETS).unwrap();
        for h in hits {
            assert!(h.abs_diff(ideal) < ideal / 10, "bucket counts {hits:?} vs ideal {ideal}");
        }
    }
}
