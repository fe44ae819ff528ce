//! The benchmarks behind `cargo xtask bench`: figures, each with a baseline measured in the
//! same run and the ratio between them, printed as a table and written as JSON under
//! `target/bench/`. Figures, never pass/fail: the machine is shared and noisy.
//!
//! - [`xdp`]: the XDP program per packet path and mode, against a trivial `XDP_PASS` program.
//! - [`maglev`]: table build time, balance and disruption, against classic Maglev.
//! - [`l4`]: TCP connections/s and bulk throughput through lb in each mode, against no
//!   balancer, an nftables DNAT balancer and HAProxy, in network namespaces.
//! - [`control`]: reload latency, health-check CPU and lbd's memory with 100 services.
//! - [`http`]: requests/s, latency and CPU per request through lb's HTTP edge, HAProxy and
//!   nginx, over HTTP/1.1, HTTPS and HTTP/2.
//! - [`policies`]: the edge's requests/s with every policy on (refusing nothing) against none.

pub mod control;
pub mod http;
pub mod l4;
pub mod maglev;
pub mod policies;
pub mod wire;
pub mod xdp;

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use serde::Serialize;

/// Writes `value` as pretty JSON to `path`, creating its directory.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).context("serialise the report")?;
    std::fs::write(path, text + "\n").with_context(|| format!("write {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// A plain text table: a header row and rows of cells, columns padded to their widest cell.
#[must_use]
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (cell, w) in cells.zip(&widths) {
            let _ = write!(l, "{cell:>w$}  ");
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Median of `values` (which it sorts).
#[must_use]
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => f64::midpoint(values[n / 2 - 1], values[n / 2]),
    }
}

/// `x` rounded to `digits` decimals, for reports.
#[must_use]
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_pads_columns_to_the_widest_cell() {
        let t = table(&["a", "bb"], &[vec!["ccc".into(), "d".into()]]);
        assert_eq!(t, "  a  bb\nccc   d\n");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert!((median(&mut [3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
        assert!((median(&mut [4.0, 1.0, 2.0, 3.0]) - 2.5).abs() < 1e-12);
    }
}
