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
#[derive(Clone, Copy)]
struct Walker {
    /// Position of the backend in the caller's entries: what its slots hold.
    position: u32,
    /// The slot it steps on in the coming round.
    next: u32,
    skip: u32,
    /// Slots it still has to claim.
    left: u32,
}

/// When this few slots are free, the rest of the walk is computed from the slots' side
/// (see [`finish_tail`]) rather than stepped: the last free slots otherwise cost most of the
/// steps (coupon collecting), mostly in rounds of one or two walkers.
const TAIL: u32 = 64;

/// Builds the table: `M` slots, each the position in `entries` of the backend that owns it,
/// or [`EMPTY`] for all slots when no entry has weight.
///
/// # Panics
/// If `m` is not a prime or exceeds [`MAX_TABLE_SIZE`] (the registry validates both), or if
/// identities repeat.
#[must_use]
pub fn build(entries: &[Entry<'_>], m: u32) -> Vec<u32> {
    build_with_tail(entries, m, TAIL)
}

fn build_with_tail(entries: &[Entry<'_>], m: u32, tail: u32) -> Vec<u32> {
    assert!(is_prime(m) && m <= MAX_TABLE_SIZE, "table size {m} must be a prime <= {MAX_TABLE_SIZE}");
    let quota = quotas(entries, m);
    let mut table = vec![EMPTY; m as usize];
    if quota.iter().all(|&q| q == 0) {
        return table;
    }
    let mut active = walkers(entries, &quota, m);
    // A bitmap of claimed slots: small enough to stay in the L1 cache while walkers probe it.
    let mut taken = vec![0u64; (m as usize).div_ceil(64)];
    // One spare entry past the end takes the writes of walkers that step on a claimed slot:
    // the step is then free of data-dependent branches, which mispredict half the time.
    table.push(EMPTY);
    let mut free = m;
    while free > tail {
        // One round: every walker with room steps once, in turn order.
        let mut kept = 0;
        for j in 0..active.len() {
            let mut w = active[j];
            let (word, bit) = ((w.next / 64) as usize, w.next % 64);
            let claims = u32::from(taken[word] & (1 << bit) == 0);
            taken[word] |= 1 << bit;
            table[if claims == 1 { w.next as usize } else { m as usize }] = w.position;
            w.left -= claims;
            free -= claims;
            w.next += w.skip;
            if w.next >= m {
                w.next -= m;
            }
            active[kept] = w;
            kept += usize::from(w.left > 0);
        }
        active.truncate(kept);
    }
    table.truncate(m as usize);
    finish_tail(&mut table, &taken, &active, m);
    table
}

/// Walkers of the backends with a quota, in turn order.
fn walkers(entries: &[Entry<'_>], quota: &[u32], m: u32) -> Vec<Walker> {
    let mut turns: Vec<(u64, Walker)> = entries
        .iter()
        .zip(quota)
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
    turns.into_iter().map(|(_, w)| w).collect()
}

/// `base^exp mod m`.
fn pow_mod(base: u64, mut exp: u64, m: u64) -> u64 {
    let (mut result, mut b) = (1, base % m);
    while exp > 0 {
        if exp & 1 == 1 {
            result = result * b % m;
        }
        b = b * b % m;
        exp >>= 1;
    }
    result
}

/// Finishes the walk exactly as the rounds would, from the free slots' side. Walker `j` (in
/// turn order, all at the same round) reaches slot `s` after `d = (s - next) / skip (mod m)`
/// rounds; the next claim is the smallest `(d, j)` over walkers and their nearest free slot.
/// A walker never passes a free slot while it has room, so nearest-free stays ahead of it.
fn finish_tail(table: &mut [u32], taken: &[u64], active: &[Walker], m: u32) {
    let m64 = u64::from(m);
    let mut free: Vec<u32> = (0..m).filter(|&s| taken[(s / 64) as usize] & (1 << (s % 64)) == 0).collect();
    let mut walkers: Vec<(Walker, u64)> =
        active.iter().map(|w| (*w, pow_mod(u64::from(w.skip), m64 - 2, m64))).collect();
    let rounds_to = |w: &Walker, inv: u64, s: u32| (u64::from(s) + m64 - u64::from(w.next)) % m64 * inv % m64;
    let nearest = |w: &Walker, inv: u64, free: &[u32]| {
        free.iter().map(|&s| (rounds_to(w, inv, s), s)).min().expect("a walker with room has a free slot")
    };
    let mut target: Vec<(u64, u32)> = walkers.iter().map(|(w, inv)| nearest(w, *inv, &free)).collect();
    while !free.is_empty() {
        // The earliest claim; ties in a round go to the earlier turn (the lower index).
        let j = (0..walkers.len())
            .filter(|&j| walkers[j].0.left > 0)
            .min_by_key(|&j| target[j].0)
            .expect("free slots are always owed to some walker");
        let slot = target[j].1;
        table[slot as usize] = walkers[j].0.position;
        walkers[j].0.left -= 1;
        free.retain(|&s| s != slot);
        if free.is_empty() {
            break;
        }
        for k in 0..walkers.len() {
            if walkers[k].0.left > 0 && (k == j || target[k].1 == slot) {
                target[k] = nearest(&walkers[k].0, walkers[k].1, &free);
            }
        }
    }
}

#[cfg(test)]
#[expect(clippy::cast_precision_loss, reason = "slot counts far below 2^52")]
mod tests {
    use super::*;

    const M: u32 = DEFAULT_TABLE_SIZE;

    /// The walk stepped round by round to the last slot: the definition [`build`] must match.
    fn build_stepped(entries: &[Entry<'_>], m: u32) -> Vec<u32> {
        build_with_tail(entries, m, 0)
    }

    #[test]
    fn the_computed_tail_matches_the_stepped_walk_exactly() {
        let mut seed = 7u64;
        let mut rand = |n: u64| {
            seed = hash64(seed, b"rand");
            seed % n
        };
        for m in [7, 101, 1009, 4099, 65_537] {
            for _ in 0..12 {
                let n = 1 + usize::try_from(rand(60)).unwrap();
                let names = names(n, &m.to_string());
                let weights: Vec<u32> = (0..n).map(|_| u32::try_from(rand(5)).unwrap()).collect();
                let e = entries(&names, &weights);
                let stepped = build_stepped(&e, m);
                for tail in [1, 3, TAIL, m.min(300)] {
                    assert_eq!(
                        build_with_tail(&e, m, tail),
                        stepped,
                        "m={m} n={n} tail={tail} weights={weights:?}"
                    );
                }
            }
        }
    }

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

    /// The disruption property, over every backend that could leave. It holds up to about 30
    /// backends at the default size; past that, exact balance costs more moved flows (see
    /// `cargo xtask bench maglev`, which measures it against classic Maglev up to 1000).
    #[test]
    fn removing_or_adding_one_of_n_backends_moves_at_most_1_1x_the_ideal_share() {
        for n in [2, 5, 10, 20] {
            let all = names(n + 1, "5");
            let ids: Vec<&str> = all.iter().map(String::as_str).collect();
            let base = build(&entries(&all[..n], &vec![1; n]), M);
            let base_ids = &ids[..n];
            for r in 0..n {
                let rest: Vec<&str> =
                    base_ids.iter().enumerate().filter(|(i, _)| *i != r).map(|(_, s)| *s).collect();
                let rest_entries: Vec<Entry<'_>> =
                    rest.iter().map(|s| Entry { identity: s, weight: 1 }).collect();
                let after = build(&rest_entries, M);
                let ideal = counts(&base, n)[r] as usize;
                let m = moved(&base, base_ids, &after, &rest);
                assert!(m as f64 <= 1.1 * ideal as f64, "n={n}, removing {r}: moved {m}, ideal {ideal}");
            }
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
