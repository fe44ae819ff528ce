//! `cargo xtask bench maglev`: lb's weighted Maglev table against classic Maglev (the paper's
//! populate loop, written here as the baseline) on the same backends in the same run: build
//! time at M = 65537 and 1000 backends, balance, and the flows moved when one backend leaves or
//! joins, relative to the ideal (the leaving or joining backend's own share).

use std::time::Instant;

use anyhow::Result;
use lb_userspace::maglev::{self, DEFAULT_TABLE_SIZE, EMPTY, Entry, hash64};
use serde::Serialize;

use super::{median, round, table};

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub backends: usize,
    /// Builds timed per algorithm (the median is reported).
    pub builds: usize,
    /// Backends removed (one at a time) to measure disruption.
    pub removals: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { backends: 1000, builds: 31, removals: 20 }
    }
}

const SWEEP: [usize; 6] = [10, 30, 100, 300, 655, 1000];

#[derive(Serialize, Clone, Copy)]
pub struct Figures {
    /// Median build time; the machine is shared, so the fastest build is reported too.
    pub build_ms: f64,
    pub build_ms_min: f64,
    /// Largest `|slots / ideal slots - 1|` over backends.
    pub max_imbalance: f64,
    /// Slots that changed backend / slots of the removed backend (ideal: 1), mean over removals.
    pub disruption_ratio: f64,
    pub disruption_ratio_max: f64,
    /// The same when one backend joins, relative to the newcomer's slots.
    pub add_disruption_ratio: f64,
}

#[derive(Serialize)]
pub struct SweepRow {
    pub backends: usize,
    pub lb: Figures,
    pub classic: Figures,
}

#[derive(Serialize)]
pub struct Report {
    pub table_size: u32,
    pub backends: usize,
    pub build_ms: f64,
    pub build_ms_min: f64,
    pub max_imbalance: f64,
    pub disruption_ratio: f64,
    pub add_disruption_ratio: f64,
    /// Largest imbalance with unequal weights (1 to 5), which classic Maglev cannot express.
    pub weighted_max_imbalance: f64,
    pub baseline: Figures,
    pub baseline_algorithm: &'static str,
    pub build_ratio_vs_classic: f64,
    pub disruption_ratio_vs_classic: f64,
    pub target_build_ms: f64,
    pub target_max_imbalance: f64,
    pub target_disruption_ratio: f64,
    pub sweep: Vec<SweepRow>,
}

/// Classic Maglev population (Eisenbud et al., NSDI 2016, pseudocode 1): backends take turns
/// in list order, each taking the next free slot of its permutation. Equal weights only.
#[must_use]
pub fn classic(names: &[String], m: u32) -> Vec<u32> {
    let mut table = vec![EMPTY; m as usize];
    if names.is_empty() {
        return table;
    }
    let mut walk: Vec<(u32, u32)> = names
        .iter()
        .map(|s| {
            let id = s.as_bytes();
            let offset = u32::try_from(hash64(1, id) % u64::from(m)).expect("< m");
            let skip = u32::try_from(hash64(2, id) % u64::from(m - 1)).expect("< m") + 1;
            (offset, skip)
        })
        .collect();
    let mut filled = 0;
    loop {
        for (i, (next, skip)) in walk.iter_mut().enumerate() {
            let step = |next: &mut u32| {
                *next += *skip;
                if *next >= m {
                    *next -= m;
                }
            };
            while table[*next as usize] != EMPTY {
                step(next);
            }
            table[*next as usize] = u32::try_from(i).expect("few backends");
            step(next);
            filled += 1;
            if filled == m {
                return table;
            }
        }
    }
}

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.{}.{}.{}:8080", i / 65_536, (i / 256) % 256, i % 256)).collect()
}

fn lb_table(names: &[String], weights: &[u32], m: u32) -> Vec<u32> {
    let entries: Vec<Entry<'_>> =
        names.iter().zip(weights).map(|(n, &w)| Entry { identity: n, weight: w }).collect();
    maglev::build(&entries, m)
}

/// Slots whose backend identity differs between two tables.
fn moved(a: &[u32], a_names: &[String], b: &[u32], b_names: &[String]) -> usize {
    a.iter().zip(b).filter(|(x, y)| a_names[**x as usize] != b_names[**y as usize]).count()
}

fn counts(table: &[u32], n: usize) -> Vec<usize> {
    let mut c = vec![0; n];
    for &p in table {
        c[p as usize] += 1;
    }
    c
}

#[expect(clippy::cast_precision_loss, reason = "slot counts far below 2^52")]
fn max_imbalance(table: &[u32], weights: &[u32]) -> f64 {
    let total: u32 = weights.iter().sum();
    let c = counts(table, weights.len());
    c.iter()
        .zip(weights)
        .filter(|(_, w)| **w > 0)
        .map(|(&got, &w)| {
            let ideal = table.len() as f64 * f64::from(w) / f64::from(total);
            (got as f64 / ideal - 1.0).abs()
        })
        .fold(0.0, f64::max)
}

/// Disruption of removing each of `removals` evenly spaced backends (mean, max) and of adding
/// one, for the table builder `build`.
#[expect(clippy::cast_precision_loss, reason = "slot counts far below 2^52")]
fn disruption(n: usize, removals: usize, build: &dyn Fn(&[String]) -> Vec<u32>) -> (f64, f64, f64) {
    let all = names(n + 1);
    let base_names = &all[..n];
    let base = build(base_names);
    let c = counts(&base, n);
    let mut ratios = Vec::new();
    for k in 0..removals.min(n) {
        let r = k * n / removals.min(n);
        let rest: Vec<String> =
            base_names.iter().enumerate().filter(|(i, _)| *i != r).map(|(_, s)| s.clone()).collect();
        let after = build(&rest);
        ratios.push(moved(&base, base_names, &after, &rest) as f64 / c[r] as f64);
    }
    let grown = build(&all);
    let joined = counts(&grown, n + 1)[n];
    let add = moved(&base, base_names, &grown, &all) as f64 / joined as f64;
    let mean = ratios.iter().sum::<f64>() / ratios.len() as f64;
    (mean, ratios.iter().copied().fold(0.0, f64::max), add)
}

fn figures(
    n: usize,
    removals: usize,
    build_ms: (f64, f64),
    build: &dyn Fn(&[String]) -> Vec<u32>,
) -> Figures {
    let t = build(&names(n));
    let (mean, max, add) = disruption(n, removals, build);
    Figures {
        build_ms: round(build_ms.0, 3),
        build_ms_min: round(build_ms.1, 3),
        max_imbalance: round(max_imbalance(&t, &vec![1; n]), 4),
        disruption_ratio: round(mean, 3),
        disruption_ratio_max: round(max, 3),
        add_disruption_ratio: round(add, 3),
    }
}

/// Median and fastest build time of each builder, timed alternately so both see the same
/// machine state.
fn build_times(n: usize, builds: usize, m: u32) -> ((f64, f64), (f64, f64)) {
    let names = names(n);
    let weights = vec![1; n];
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..builds {
        let t = Instant::now();
        std::hint::black_box(lb_table(&names, &weights, m));
        ours.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        std::hint::black_box(classic(&names, m));
        theirs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let fastest = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    ((median(&mut ours.clone()), fastest(&ours)), (median(&mut theirs.clone()), fastest(&theirs)))
}

/// Runs the benchmark; prints the table and returns the report.
pub fn run(opts: Options) -> Result<Report> {
    let m = DEFAULT_TABLE_SIZE;
    let lb_build = |names: &[String]| lb_table(names, &vec![1; names.len()], m);
    let classic_build = |names: &[String]| classic(names, m);
    let mut sweep = Vec::new();
    for &n in SWEEP.iter().filter(|&&n| n != opts.backends).chain(std::iter::once(&opts.backends)) {
        eprintln!("maglev bench: {n} backends");
        let (ours_ms, classic_ms) = build_times(n, if n == opts.backends { opts.builds } else { 5 }, m);
        sweep.push(SweepRow {
            backends: n,
            lb: figures(n, opts.removals, ours_ms, &lb_build),
            classic: figures(n, opts.removals, classic_ms, &classic_build),
        });
    }
    sweep.sort_by_key(|r| r.backends);
    let main = sweep.iter().find(|r| r.backends == opts.backends).expect("measured");
    let (lb, baseline) = (main.lb, main.classic);
    let weights: Vec<u32> = (0..opts.backends).map(|i| 1 + u32::try_from(i % 5).expect("small")).collect();
    let weighted = max_imbalance(&lb_table(&names(opts.backends), &weights, m), &weights);

    let rows: Vec<Vec<String>> = sweep
        .iter()
        .flat_map(|r| {
            [("lb", r.lb), ("classic", r.classic)].map(|(alg, f)| {
                vec![
                    r.backends.to_string(),
                    alg.to_owned(),
                    format!("{:.3}", f.build_ms),
                    format!("{:.3}", f.build_ms_min),
                    format!("{:.4}", f.max_imbalance),
                    format!("{:.3}", f.disruption_ratio),
                    format!("{:.3}", f.disruption_ratio_max),
                    format!("{:.3}", f.add_disruption_ratio),
                ]
            })
        })
        .collect();
    println!(
        "\nMaglev tables, M = {m} (disruption: slots moved / the changed backend's slots; ideal 1)\n{}",
        table(
            &["backends", "algorithm", "build ms", "fastest", "imbalance", "remove", "remove max", "add"],
            &rows
        )
    );
    println!("weighted (1..5) max imbalance at {} backends: {weighted:.4}", opts.backends);
    Ok(Report {
        table_size: m,
        backends: opts.backends,
        build_ms: lb.build_ms,
        build_ms_min: lb.build_ms_min,
        max_imbalance: lb.max_imbalance,
        disruption_ratio: lb.disruption_ratio,
        add_disruption_ratio: lb.add_disruption_ratio,
        weighted_max_imbalance: round(weighted, 4),
        baseline,
        baseline_algorithm: "classic Maglev (NSDI 2016 populate), same hashes, same run",
        build_ratio_vs_classic: round(lb.build_ms / baseline.build_ms, 2),
        disruption_ratio_vs_classic: round(lb.disruption_ratio / baseline.disruption_ratio, 2),
        target_build_ms: 1.0,
        target_max_imbalance: 0.01,
        target_disruption_ratio: 1.1,
        sweep,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_maglev_fills_every_slot_and_balances_within_one_slot() {
        let n = names(7);
        let t = classic(&n, 101);
        let c = counts(&t, 7);
        assert!(c.iter().all(|&k| k == 14 || k == 15), "{c:?}");
    }

    #[test]
    fn removing_a_backend_from_an_identical_table_moves_only_its_slots_at_best() {
        // A sanity check of the metric: a table compared with itself moves nothing.
        let n = names(5);
        let t = lb_table(&n, &[1; 5], 101);
        assert_eq!(moved(&t, &n, &t, &n), 0);
    }
}
