//! Weighted Maglev lookup tables (pure).
//!
//! Each backend walks its own permutation of the `M` slots (offset and skip from hashes of its
//! identity, as in the Maglev paper). Backends take turns in rounds, one step per round, and a
//! backend claims the slot it steps on if the slot is free, until it holds its quota. Two
//! departures from the paper, both measured (see `cargo xtask bench maglev`):
//!
//! - Quotas are exact: `M * weight / total`, remainders by largest fraction. Every backend's
//!   share is within one slot of its weight share; weight 0 gets no slot (drain).
//! - Rounds advance in step (every backend is at the same depth of its permutation), rather than
//!   each turn skipping ahead to the backend's next free slot. A slot goes to the backend that
//!   ranks it earliest among those with room, close to rendezvous hashing, which moves fewer
//!   flows when the backend set changes: removing one of 100 backends at M = 65537 moves 1.30x
//!   the ideal share instead of classic Maglev's 1.61x.
//!
//! Turn order and permutations depend only on backend identities, never on list positions or
//! node state, so the same registry builds a byte-identical table on every node.

/// Default table size: prime, and large enough for about 650 backends within 1% of balance.
pub const DEFAULT_TABLE_SIZE: u32 = 65_537;
/// Largest table size accepted (the kernel holds one `u32` per slot per VIP).
pub const MAX_TABLE_SIZE: u32 = 1_048_573;
/// Slot value when no backend has weight: the data plane drops new flows for the VIP.
pub const EMPTY: u32 = u32::MAX;

const SEED_OFFSET: u64 = 0x6c62_6d61_676c_6576; // "lbmaglev"
const SEED_SKIP: u64 = 0x736b_6970_7365_6564; // "skipseed"
const SEED_TURN: u64 = 0x7475_726e_6f72_6472; // "turnordr"

/// One backend of a table: a stable identity (the registry's `host:port`) and its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub identity: &'a str,
    pub weight: u32,
}

/// A deterministic 64-bit hash (FNV-1a, then the splitmix64 finaliser for avalanche); the same
/// on every platform and release, unlike std's hashers.
#[must_use]
pub fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325_u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// True when `n` is prime (table sizes must be, so every skip visits every slot).
#[must_use]
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    (2..=n.isqrt()).all(|d| !n.is_multiple_of(d))
}

/// Exact slot quotas: proportional to weight, remainders to the largest fractions (ties by
/// identity hash, so the split does not depend on list order).
fn quotas(entries: &[Entry<'_>], m: u32) -> Vec<u32> {
    let total: u64 = entries.iter().map(|e| u64::from(e.weight)).sum();
    if total == 0 {
        return vec![0; entries.len()];
    }
    let m64 = u64::from(m);
    let mut q: Vec<u32> = entries
        .iter()
        .map(|e| u32::try_from(m64 * u64::from(e.weight) / total).expect("quota <= m"))
        .collect();
    let given: u32 = q.iter().sum();
    let mut by_remainder: Vec<usize> = (0..entries.len()).collect();
    by_remainder.sort_by_key(|&i| {
        let rem = m64 * u64::from(entries[i].weight) % total;
        (std::cmp::Reverse(rem), hash64(SEED_TURN, entries[i].identity.as_bytes()))
    });
    for &i in by_remainder.iter().take((m - given) as usize) {
        q[i] += 1;
    }
    q
}

/// One backend walking its permutation of the slots.
struct Walker {
    position: u32,
    next: u32,
    skip: u32,
    left: u32,
}

/// Builds the table: `M` slots, each the position in `entries` of the backend that owns it,
/// or [`EMPTY`] for all slots when no entry has weight.
///
/// # Panics
/// If `m` is not a prime or exceeds [`MAX_TABLE_SIZE`] (the registry validates both), or if
/// identities repeat.
#[must_use]
pub fn build(entries: &[Entry<'_>], m: u32) -> Vec<u32> {
    assert!(is_prime(m) && m <= MAX_TABLE_SIZE, "table size {m} must be a prime <= {MAX_TABLE_SIZE}");
    let quota = quotas(entries, m);
    let mut table = vec![EMPTY; m as usize];
    if quota.iter().all(|&q| q == 0) {
        return table;
    }
    let mut turns: Vec<(u64, Walker)> = entries
        .iter()
        .zip(&quota)
        .enumerate()
        .filter(|(_, (_, q))| **q > 0)
        .map(|(i, (e, &q))| {
            let id = e.identity.as_bytes();
            let next = u32::try_from(hash64(SEED_OFFSET, id) % u64::from(m)).expect("< m");
            let skip = u32::try_from(hash64(SEED_SKIP, id) % u64::from(m - 1)).expect("< m") + 1;
            let walker = Walker { position: u32::try_from(i).expect("few entries"), next, skip, left: q };
            (hash64(SEED_TURN, id), walker)
        })
        .collect();
    turns.sort_by_key(|(order, _)| *order);
    assert!(turns.windows(2).all(|w| w[0].0 != w[1].0), "backend identities must be distinct");
    let mut active: Vec<Walker> = turns.into_iter().map(|(_, w)| w).collect();
    let mut free = m;
    while free > 0 {
        active.retain_mut(|w| {
            let slot = &mut table[w.next as usize];
            if *slot == EMPTY {
                *slot = w.position;
                w.left -= 1;
                free -= 1;
            }
            w.next += w.skip;
            if w.next >= m {
                w.next -= m;
            }
            w.left > 0
        });
    }
    table
}

#[cfg(test)]
#[expect(clippy::cast_precision_loss, reason = "slot counts far below 2^52")]
mod tests {
    use super::*;

    const M: u32 = DEFAULT_TABLE_SIZE;

    fn names(n: usize, tag: &str) -> Vec<String> {
        (0..n).map(|i| format!("10.{tag}.{}.{}:80", i / 250, i % 250)).collect()
    }

    fn entries<'a>(names: &'a [String], weights: &[u32]) -> Vec<Entry<'a>> {
        names.iter().zip(weights).map(|(n, &w)| Entry { identity: n, weight: w }).collect()
    }

    fn counts(table: &[u32], n: usize) -> Vec<u32> {
        let mut c = vec![0; n];
        for &p in table {
            c[p as usize] += 1;
        }
        c
    }

    /// Slots whose backend identity differs between two tables.
    fn moved(a: &[u32], a_names: &[&str], b: &[u32], b_names: &[&str]) -> usize {
        a.iter().zip(b).filter(|(x, y)| a_names[**x as usize] != b_names[**y as usize]).count()
    }

    #[test]
    fn table_sizes_must_be_prime() {
        assert!(is_prime(DEFAULT_TABLE_SIZE) && is_prime(7) && is_prime(MAX_TABLE_SIZE));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(0) && !is_prime(9));
    }

    #[test]
    fn the_same_backends_give_a_byte_identical_table_whatever_their_order() {
        let n = names(20, "1");
        let w: Vec<u32> = (0..20).map(|i| 1 + i % 3).collect();
        let e = entries(&n, &w);
        let t1 = build(&e, M);
        let mut reversed = e.clone();
        reversed.reverse();
        let t2 = build(&reversed, M);
        // Positions differ with the order; identities per slot must not.
        let id1: Vec<&str> = t1.iter().map(|&p| e[p as usize].identity).collect();
        let id2: Vec<&str> = t2.iter().map(|&p| reversed[p as usize].identity).collect();
        assert_eq!(id1, id2);
        assert_eq!(build(&e, M), t1, "building twice gives the same bytes");
    }

    #[test]
    fn every_backend_is_within_one_slot_of_its_weight_share() {
        for (n, weights) in [
            (3, vec![1, 1, 1]),
            (5, vec![1, 2, 3, 4, 5]),
            (100, vec![1; 100]),
            (7, vec![100, 1, 1, 1, 1, 1, 50]),
        ] {
            let names = names(n, "2");
            let e = entries(&names, &weights);
            let c = counts(&build(&e, M), n);
            let total: u32 = weights.iter().sum();
            for (i, &got) in c.iter().enumerate() {
                let ideal = f64::from(M) * f64::from(weights[i]) / f64::from(total);
                assert!((f64::from(got) - ideal).abs() < 1.0, "backend {i}: {got} slots, ideal {ideal:.2}");
            }
        }
    }

    #[test]
    fn weight_zero_drains_and_all_zero_leaves_the_table_empty() {
        let names = names(4, "3");
        let t = build(&entries(&names, &[1, 0, 1, 1]), M);
        assert!(!t.contains(&1), "a drained backend owns no slot");
        assert!(build(&entries(&names, &[0, 0, 0, 0]), M).iter().all(|&p| p == EMPTY));
        assert!(build(&[], M).iter().all(|&p| p == EMPTY));
    }

    #[test]
    fn draining_one_backend_moves_only_about_its_own_flows() {
        let n = names(10, "4");
        let before = build(&entries(&n, &[1; 10]), M);
        let mut w = vec![1; 10];
        w[3] = 0;
        let after = build(&entries(&n, &w), M);
        let ids: Vec<&str> = n.iter().map(String::as_str).collect();
        let ideal = counts(&before, 10)[3] as usize;
        let m = moved(&before, &ids, &after, &ids);
        assert!(m as f64 <= 1.1 * ideal as f64, "moved {m}, ideal {ideal}");
    }

    #[test]
    fn removing_or_adding_one_of_n_backends_moves_at_most_1_1x_the_ideal_share() {
        for n in [2, 5, 10, 20, 30] {
            let all = names(n + 1, "5");
            let ids: Vec<&str> = all.iter().map(String::as_str).collect();
            let base = build(&entries(&all[..n], &vec![1; n]), M);
            let base_ids = &ids[..n];
            // Removing each of a few backends.
            for r in [0, n / 2, n - 1] {
                let rest: Vec<&str> =
                    base_ids.iter().enumerate().filter(|(i, _)| *i != r).map(|(_, s)| *s).collect();
                let rest_entries: Vec<Entry<'_>> =
                    rest.iter().map(|s| Entry { identity: s, weight: 1 }).collect();
                let after = build(&rest_entries, M);
                let ideal = counts(&base, n)[r] as usize;
                let m = moved(&base, base_ids, &after, &rest);
                assert!(m as f64 <= 1.1 * ideal as f64, "n={n}, removing {r}: moved {m}, ideal {ideal}");
            }
            // Adding one.
            let grown = build(&entries(&all, &vec![1; n + 1]), M);
            let ideal = counts(&grown, n + 1)[n] as usize;
            let m = moved(&base, base_ids, &grown, &ids);
            assert!(m as f64 <= 1.1 * ideal as f64, "n={n}, adding one: moved {m}, ideal {ideal}");
        }
    }

    #[test]
    fn hash64_is_stable_across_releases() {
        // Changing these values moves every flow on every node: they are part of the contract.
        // Expected values computed independently (Python) from the definition above.
        assert_eq!(hash64(0, b""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(hash64(SEED_OFFSET, b"10.0.0.1:80"), 0x7035_86b5_95fb_1e92);
        assert_ne!(hash64(SEED_OFFSET, b"10.0.0.1:80"), hash64(SEED_SKIP, b"10.0.0.1:80"));
    }
}
