//! Internet checksums: incremental updates (RFC 1624) and the IPv4 header checksum.
//!
//! Every rewrite the datapath makes updates the affected checksums incrementally, so the cost
//! does not grow with the payload and the kernel and the host model compute the same bytes.

/// Folds a 32-bit one's-complement accumulator to 16 bits.
#[inline(always)]
#[must_use]
#[expect(clippy::cast_possible_truncation, reason = "folded to 16 bits first")]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// `check` (as stored, big-endian) after the bytes `old` were replaced by `new` in the data it
/// covers (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')). `N` must be even.
#[inline(always)]
#[must_use]
pub fn update<const N: usize>(check: [u8; 2], old: &[u8; N], new: &[u8; N]) -> [u8; 2] {
    let mut sum = u32::from(!u16::from_be_bytes(check));
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        i += 2;
    }
    (!fold(sum)).to_be_bytes()
}

/// [`update`] for one 16-bit word.
#[inline(always)]
#[must_use]
pub fn update_word(check: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    update(check, &old.to_be_bytes(), &new.to_be_bytes())
}

/// A UDP checksum after an incremental update: 0 means "no checksum" on the wire, so a
/// computed zero is sent as 0xffff (RFC 768).
#[inline(always)]
#[must_use]
pub const fn udp_nonzero(check: [u8; 2]) -> [u8; 2] {
    if check[0] == 0 && check[1] == 0 { [0xff, 0xff] } else { check }
}

/// The checksum of a 20-byte IPv4 header whose checksum field is zero.
#[inline(always)]
#[must_use]
pub fn ipv4_header(header: &[u8; 20]) -> [u8; 2] {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        i += 2;
    }
    (!fold(sum)).to_be_bytes()
}

#[cfg(test)]
#[expect(clippy::cast_possible_truncation, reason = "test patterns wrap on purpose")]
mod tests {
    use super::*;

    /// Straightforward full checksum, the reference for the incremental one.
    fn full(data: &[u8]) -> [u8; 2] {
        let mut sum = 0u32;
        for c in data.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
        (!fold(sum)).to_be_bytes()
    }

    #[test]
    fn incremental_updates_match_a_full_recomputation() {
        let mut data: [u8; 40] = core::array::from_fn(|i| (i * 37 + 11) as u8);
        data[10] = 0;
        data[11] = 0;
        let check = full(&data);
        let old: [u8; 16] = data[20..36].try_into().unwrap();
        let new: [u8; 16] = core::array::from_fn(|i| (i * 5 + 200) as u8);
        data[20..36].copy_from_slice(&new);
        let updated = update(check, &old, &new);
        // Equal as one's-complement values: verifying with the updated checksum sums to zero.
        data[10..12].copy_from_slice(&updated);
        assert_eq!(full(&data), [0, 0]);
    }

    #[test]
    fn an_ipv4_header_with_its_checksum_verifies() {
        let mut h = [0x45, 0, 0, 60, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2];
        let c = ipv4_header(&h);
        h[10..12].copy_from_slice(&c);
        assert_eq!(full(&h), [0, 0]);
        assert_eq!(c, [0x14, 0x86], "computed independently (Python)");
    }

    #[test]
    fn udp_checksums_never_become_zero() {
        assert_eq!(udp_nonzero([0, 0]), [0xff, 0xff]);
        assert_eq!(udp_nonzero([0, 1]), [0, 1]);
    }
}
