//! Picking a backend among a service's usable ones. Pure: the caller passes what each backend
//! looks like now (weight, requests in flight, latency average) and which are excluded.

/// What a picker sees of one backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct View {
    pub weight: u32,
    pub in_flight: u32,
    /// Average time to response headers, nanoseconds (0: not measured yet).
    pub ewma_ns: u64,
    /// Hash of the backend's identity, for consistent hashing.
    pub id_hash: u64,
}

/// Longest precomputed round-robin sequence; weights are scaled down to fit.
const MAX_SEQUENCE: u64 = 4096;

/// A smooth weighted round-robin order (nginx's): with weights 5, 1, 1 it runs
/// `a a b a c a a`, not `a a a a a b c`. Indexes into the weights given; zero weights never appear.
#[must_use]
pub fn smooth_sequence(weights: &[u32]) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return Vec::new();
    }
    let g = weights.iter().fold(0u64, |g, &w| gcd(g, u64::from(w)));
    let scale = (total / g).div_ceil(MAX_SEQUENCE).max(1);
    let w: Vec<i64> = weights
        .iter()
        .map(|&x| {
            let s = u64::from(x) / g;
            // Scaling never drops a backend with a weight to nothing.
            i64::try_from(if s == 0 { 0 } else { (s / scale).max(1) }).unwrap_or(i64::MAX)
        })
        .collect();
    let sum: i64 = w.iter().sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(usize::try_from(sum).unwrap_or(0));
    for _ in 0..sum {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= sum;
        out.push(u32::try_from(best).unwrap_or(0));
    }
    out
}

const fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Round robin: the first allowed backend at or after `tick` in `sequence`.
#[must_use]
pub fn round_robin(sequence: &[u32], tick: usize, allowed: impl Fn(usize) -> bool) -> Option<usize> {
    let n = sequence.len();
    (0..n).map(|k| sequence[(tick + k) % n] as usize).find(|&i| allowed(i))
}

/// Least requests in flight relative to weight; ties go to the first at or after `tick`, so
/// an idle service still spreads its requests.
#[must_use]
pub fn least_conn(
    n: usize,
    view: impl Fn(usize) -> View,
    tick: usize,
    allowed: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, View)> = None;
    for k in 0..n {
        let i = (tick + k) % n;
        let v = view(i);
        if !allowed(i) || v.weight == 0 {
            continue;
        }
        best = match best {
            // v.in_flight / v.weight >= b.in_flight / b.weight, without division.
            Some((b, bv))
                if u64::from(v.in_flight) * u64::from(bv.weight)
                    >= u64::from(bv.in_flight) * u64::from(v.weight) =>
            {
                Some((b, bv))
            }
            _ => Some((i, v)),
        };
    }
    best.map(|(i, _)| i)
}

/// Power of two choices: of two allowed backends drawn with `random`, the one with the lower
/// cost (latency average times requests in flight, per weight). Unmeasured backends cost
/// least, so new ones get tried.
#[must_use]
pub fn p2c_ewma(
    n: usize,
    view: impl Fn(usize) -> View,
    mut random: impl FnMut(usize) -> usize,
    allowed: impl Fn(usize) -> bool,
) -> Option<usize> {
    let ok = |i: usize| allowed(i) && view(i).weight > 0;
    let count = (0..n).filter(|&i| ok(i)).count();
    // The k-th allowed backend, without collecting them.
    let nth = |k: usize| (0..n).filter(|&i| ok(i)).nth(k);
    match count {
        0 => None,
        1 => nth(0),
        n => {
            let ka = random(n);
            // A second draw among the other n - 1.
            let kb = (ka + 1 + random(n - 1)) % n;
            let (a, b) = (nth(ka)?, nth(kb)?);
            #[expect(clippy::cast_precision_loss, reason = "a cost compared, not a count")]
            let cost = |i: usize| {
                let v = view(i);
                (v.ewma_ns as f64) * f64::from(v.in_flight + 1) / f64::from(v.weight)
            };
            Some(if cost(b) < cost(a) { b } else { a })
        }
    }
}

/// Weighted rendezvous hashing: every key has its own order of backends, so removing one
/// moves only its keys, and excluding the first choice (a retry) falls to the key's second.
#[must_use]
pub fn rendezvous(
    n: usize,
    view: impl Fn(usize) -> View,
    key: u64,
    allowed: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mut best: Option<(f64, usize)> = None;
    for i in 0..n {
        let v = view(i);
        if !allowed(i) || v.weight == 0 {
            continue;
        }
        // Uniform in (0, 1) from the pair's hash (53 bits, exact in an f64); score =
        // weight / -ln(u).
        let h = mix(key ^ v.id_hash.rotate_left(17));
        #[expect(clippy::cast_precision_loss, reason = "53 bits: exact in an f64")]
        let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = f64::from(v.weight) / -u.ln();
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, i));
        }
    }
    best.map(|(_, i)| i)
}

/// A 64-bit finaliser (splitmix64): spreads similar inputs apart.
#[must_use]
pub const fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of `bytes`, finalised: a stable hash (the same on every node and every run).
#[must_use]
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views(weights: &[u32]) -> Vec<View> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| View {
                weight: w,
                in_flight: 0,
                ewma_ns: 0,
                id_hash: hash_bytes(format!("b{i}").as_bytes()),
            })
            .collect()
    }

    #[test]
    fn smooth_round_robin_interleaves_by_weight() {
        assert_eq!(smooth_sequence(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_sequence(&[2, 2]), [0, 1], "reduced by the common divisor");
        assert_eq!(smooth_sequence(&[0, 1]), [1], "weight 0 never picked");
        let big = smooth_sequence(&[65535, 1]);
        assert!(big.len() <= 4096 + 1 && big.contains(&1), "scaled, and the light one kept");
    }

    #[test]
    fn round_robin_skips_what_is_not_allowed() {
        let seq = smooth_sequence(&[1, 1, 1]);
        let picks: Vec<usize> = (0..6).filter_map(|t| round_robin(&seq, t, |i| i != 1)).collect();
        assert_eq!(picks, [0, 2, 2, 0, 2, 2]);
        assert_eq!(round_robin(&seq, 0, |_| false), None);
    }

    #[test]
    fn least_conn_prefers_the_least_loaded_per_weight() {
        let mut v = views(&[1, 1, 2]);
        v[0].in_flight = 3;
        v[1].in_flight = 1;
        v[2].in_flight = 3; // 1.5 per weight
        assert_eq!(least_conn(3, |i| v[i], 0, |_| true), Some(1));
        v[1].in_flight = 2;
        assert_eq!(least_conn(3, |i| v[i], 0, |_| true), Some(2));
        assert_eq!(least_conn(3, |i| v[i], 0, |i| i == 0), Some(0));
        // Ties rotate with the tick.
        let idle = views(&[1, 1, 1]);
        let picks: Vec<usize> = (0..3).filter_map(|t| least_conn(3, |i| idle[i], t, |_| true)).collect();
        assert_eq!(picks, [0, 1, 2]);
    }

    #[test]
    fn p2c_takes_the_cheaper_of_two() {
        let mut v = views(&[1, 1]);
        v[0].ewma_ns = 50_000_000;
        v[1].ewma_ns = 1_000_000;
        for seed in 0..10 {
            let mut r = seed;
            let random = |n: usize| {
                r += 1;
                r % n
            };
            assert_eq!(p2c_ewma(2, |i| v[i], random, |_| true), Some(1));
        }
        assert_eq!(p2c_ewma(2, |i| v[i], |_| 0, |i| i == 0), Some(0));
        assert_eq!(p2c_ewma(2, |i| v[i], |_| 0, |_| false), None);
    }

    #[test]
    fn rendezvous_is_stable_and_moves_only_the_removed_backends_keys() {
        let v = views(&[1, 1, 1, 1]);
        let keys: Vec<u64> = (0..2000u64).map(|k| hash_bytes(&k.to_le_bytes())).collect();
        let before: Vec<usize> =
            keys.iter().map(|&k| rendezvous(4, |i| v[i], k, |_| true).unwrap()).collect();
        let after: Vec<usize> =
            keys.iter().map(|&k| rendezvous(4, |i| v[i], k, |i| i != 2).unwrap()).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != 2 {
                assert_eq!(a, b, "a key not on the removed backend stays");
            }
        }
        let share = before.iter().filter(|&&b| b == 2).count();
        assert!((400..600).contains(&share), "about a quarter each: {share}");
        // Weights: 3 to 1.
        let w = views(&[3, 1]);
        let heavy = keys.iter().filter(|&&k| rendezvous(2, |i| w[i], k, |_| true) == Some(0)).count();
        assert!((1400..1600).contains(&heavy), "three quarters: {heavy}");
    }
}
