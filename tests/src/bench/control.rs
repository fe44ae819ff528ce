//! The control plane's costs, with lbd serving 100 XDP services of 10 backends each (1000
//! backends, all health-checked at the default 2 s) in network namespaces:
//!
//! - `reload_ms`: a registry file renamed into place -> the new table live (lbd's `READY=1`
//!   after the reload, the notification a supervisor waits on), median over rounds that each
//!   change one service's weights;
//! - `health_cpu_pct`: lbd's CPU time (from /proc) while idle with checks on, minus the same
//!   with checks off (the baseline, measured in the same run);
//! - `lbd_rss_mb`: lbd's resident memory, idle, with the 100 services.

use std::{fmt::Write as _, time::Duration};

use anyhow::{Context as _, Result};
use serde::Serialize;

use super::{http::cpu_split, median, round, table};
use crate::{
    lbd::{Lbd, TempDir, all_checked, wait_status},
    netns::NetNs,
    servers::{Ports, Servers},
    unique_prefix,
};

pub struct Options {
    pub services: usize,
    pub backends_per_service: usize,
    /// Seconds of idle CPU measured, with and without checks.
    pub cpu_seconds: f64,
    pub reload_rounds: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { services: 100, backends_per_service: 10, cpu_seconds: 20.0, reload_rounds: 20 }
    }
}

#[derive(Serialize)]
pub struct Report {
    pub services: usize,
    pub backends: usize,
    pub reload_ms: f64,
    pub reload_ms_p90: f64,
    pub health_cpu_pct: f64,
    pub cpu_pct_checks_on: f64,
    pub cpu_pct_checks_off: f64,
    pub lbd_rss_mb: f64,
    pub targets: Targets,
}

#[derive(Serialize)]
pub struct Targets {
    pub reload_ms: f64,
    pub health_cpu_pct: f64,
    pub lbd_rss_mb: f64,
}

const ECHO: u16 = 7;

fn backend_addr(i: usize) -> String {
    format!("10.30.{}.{}", 1 + i / 200, 1 + i % 200)
}

fn registry(o: &Options, checks: bool, bump: Option<(usize, u32)>) -> String {
    let mut s = String::from("version: 1\ntcp:\n");
    for svc in 0..o.services {
        let _ = write!(s, "  svc{svc}:\n    vip: 10.40.{}.{}\n    port: {ECHO}\n", svc / 200, 1 + svc % 200);
        if !checks {
            s.push_str("    health: {enabled: false}\n");
        }
        s.push_str("    backends:\n");
        for b in 0..o.backends_per_service {
            let weight = match bump {
                Some((which, w)) if which == svc && b == 0 => w,
                _ => 1,
            };
            let _ = writeln!(
                s,
                "      - {{host: {}, port: {ECHO}, weight: {weight}}}",
                backend_addr(svc * o.backends_per_service + b)
            );
        }
    }
    s
}

fn rss_mb(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    Ok(kb / 1024.0)
}

fn idle_cpu_pct(pid: u32, seconds: f64) -> f64 {
    let (before, user_before) = cpu_split(pid);
    std::thread::sleep(Duration::from_secs_f64(seconds));
    let (after, user_after) = cpu_split(pid);
    let (user, all) = ((user_after - user_before) / seconds * 100.0, (after - before) / seconds * 100.0);
    eprintln!("lbd cpu: {all:.2}% ({user:.2}% user)");
    all
}

/// Writes `text` next to `path` and renames it into place, as an editor or a deploy tool would.
fn replace(path: &std::path::Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("yaml.new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

pub fn run(o: &Options) -> Result<Report> {
    let prefix = unique_prefix("bctl");
    let lb = NetNs::new(&format!("{prefix}-lb"));
    let farm = NetNs::new(&format!("{prefix}-farm"));
    lb.ip(&["link", "add", "eth0", "type", "veth", "peer", "name", "farm0", "netns", farm.name()]);
    lb.ip(&["addr", "add", "10.30.0.1/16", "dev", "eth0"]);
    lb.ip(&["link", "set", "eth0", "up"]);
    lb.ip(&["link", "set", "lo", "up"]);
    let n = o.services * o.backends_per_service;
    let dir = TempDir::new(&prefix);
    let mut batch = String::new();
    for i in 0..n {
        let _ = writeln!(batch, "addr add {}/16 dev farm0", backend_addr(i));
    }
    let batch_file = dir.write("addrs.batch", &batch);
    farm.ip(&["-batch", batch_file.to_str().context("path")?]);
    farm.ip(&["link", "set", "farm0", "up"]);
    farm.ip(&["link", "set", "lo", "up"]);
    // One listener answers every backend address.
    let _servers = Servers::start(&farm, "farm", Ports { http: 80, echo: &[ECHO] }, &[]);
    let reg = dir.write("services.yaml", &registry(o, true, None));
    let extra = ["--resolve-timeout", "10s", "--xdp-mode", "generic"];

    eprintln!("control: {} services, {n} backends", o.services);
    let lbd = Lbd::start(&lb, &dir, &reg, "eth0", &extra);
    wait_status(&lb, "every backend checked", all_checked);
    let rss = rss_mb(lbd.pid())?;
    let on = idle_cpu_pct(lbd.pid(), o.cpu_seconds);

    let mut reloads = Vec::with_capacity(o.reload_rounds);
    for round_no in 0..o.reload_rounds {
        let text = registry(o, true, Some((round_no % o.services, 2 + u32::try_from(round_no % 3)?)));
        let start = std::time::Instant::now();
        replace(&reg, &text)?;
        let status = lbd.wait_reload();
        anyhow::ensure!(status == "reloaded", "reload {round_no}: {status}\n{}", lbd.log());
        reloads.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let stopped = lbd.stop(libc::SIGTERM);
    anyhow::ensure!(stopped.status.success(), "lbd: {}", stopped.log);
    // Where a reload's time goes (lbd logs its phases at debug level: RUST_LOG=lb_userspace=debug).
    for what in ["reload phases", "registry applied"] {
        if let Some(line) = stopped.log.lines().rev().find(|l| l.contains(what)) {
            eprintln!("last reload: {line}");
        }
    }

    std::fs::write(&reg, registry(o, false, None))?;
    let lbd = Lbd::start(&lb, &dir, &reg, "eth0", &extra);
    let off = idle_cpu_pct(lbd.pid(), o.cpu_seconds);
    let stopped = lbd.stop(libc::SIGTERM);
    anyhow::ensure!(stopped.status.success(), "lbd: {}", stopped.log);

    let mut sorted = reloads.clone();
    let p90 = {
        sorted.sort_by(f64::total_cmp);
        sorted[(sorted.len() * 9 / 10).min(sorted.len() - 1)]
    };
    let report = Report {
        services: o.services,
        backends: n,
        reload_ms: round(median(&mut reloads), 1),
        reload_ms_p90: round(p90, 1),
        health_cpu_pct: round(on - off, 2),
        cpu_pct_checks_on: round(on, 2),
        cpu_pct_checks_off: round(off, 2),
        lbd_rss_mb: round(rss, 1),
        targets: Targets { reload_ms: 50.0, health_cpu_pct: 2.0, lbd_rss_mb: 30.0 },
    };
    println!(
        "{}",
        table(
            &["figure", "measured", "target"],
            &[
                vec!["reload_ms (median)".into(), report.reload_ms.to_string(), "<= 50".into()],
                vec!["reload_ms (p90)".into(), report.reload_ms_p90.to_string(), String::new()],
                vec![
                    format!("health_cpu_pct ({n} backends at 2 s)"),
                    format!(
                        "{} ({} on - {} off)",
                        report.health_cpu_pct, report.cpu_pct_checks_on, report.cpu_pct_checks_off
                    ),
                    "<= 2".into(),
                ],
                vec![
                    format!("lbd_rss_mb ({} services)", o.services),
                    report.lbd_rss_mb.to_string(),
                    "<= 30".into()
                ],
            ],
        )
    );
    Ok(report)
}
