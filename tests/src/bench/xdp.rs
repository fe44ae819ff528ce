//! `cargo xtask bench xdp`: nanoseconds per packet of the XDP balancer in the kernel
//! (`BPF_PROG_TEST_RUN`), per packet path, mode and family, against the trivial `XDP_PASS`
//! program measured interleaved with it.
//!
//! Method. The kernel's own repeat loop runs a program again on the buffer the previous run
//! left, so from the second run on a rewriting path measures something else: a forwarded frame
//! is no longer addressed to this node, an encapsulated one grows, a SYN is no longer new. Each
//! figure is therefore taken on fresh frames, one run per call, every call followed by a call
//! of `XDP_PASS` on the same frame. A call's kernel-reported time includes a fixed cost (the
//! timer reads around the loop) that a repeated run does not have; removing it:
//!
//! ```text
//! ns_per_packet          = mean(lb, 1 run) - mean(XDP_PASS, 1 run) + XDP_PASS per run at repeat R
//! baseline_ns_per_packet = XDP_PASS per run at repeat R (R >= 1,000,000, the kernel's loop)
//! ```
//!
//! The machine is shared and noisy, so every path is measured in blocks of calls, the blocks
//! of all paths taken in turn, and each figure is the median over its blocks.
//!
//! Flow state is measured hot (16 flows cycled: their entries stay in the CPU caches, as a busy
//! flow's do) and, for established TCP, cold (4096 flows). New flows are distinct per call.
//!
//! Two paths are fixed points of the program (a frame for no VIP; an established dsr-l2 flow
//! whose backend has the node's MAC), so the kernel's repeat loop measures them directly; the
//! report compares both methods on them as a check.

use std::net::IpAddr;

use anyhow::{Context as _, Result, ensure};
use lb_common::{
    datapath::{Action, Counter},
    maps::{PROTO_TCP, PROTO_UDP},
};
use lb_userspace::{
    loader::{Balancer, PassProgram},
    maps::DataplaneMaps,
    plan::{self, DataPlan, Ids},
};
use serde::Serialize;

use super::{median, round, table};
use crate::{
    frames::{Frame, TCP_ACK, TCP_SYN},
    scenario::{self, NODE_MAC},
};

#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Calls per path (each one run of lb and one of `XDP_PASS`).
    pub runs: u32,
    /// Calls for the new-flow paths; each is a distinct flow (and, in nat mode, a NAT port).
    pub new_flow_runs: u32,
    /// The kernel's repeat count for the `XDP_PASS` baseline and the fixed-point checks.
    pub repeat: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self { runs: 1_000_000, new_flow_runs: 20_000, repeat: 1_000_000 }
    }
}

/// Kernel repeat-loop samples per fixed-point check.
const CHECK_SAMPLES: usize = 5;
/// Flows established before measuring their packets, cycled through by the measured calls: a
/// few (their state stays in the CPU caches, as for a busy flow) or many (the state of each
/// packet's flow is mostly out of the caches; the syscalls between calls evict a lot).
const POOL: usize = 16;
const COLD_POOL: usize = 4096;
/// TCP/UDP payload of measured frames.
const PAYLOAD: usize = 64;
/// NAT ports of the benchmark registry: room for every new flow measured.
const NAT_PORTS: &str = "1024-65535";
/// The benchmark's services: `(VIP, port, mode, family)`, one per mode and family.
const SERVICES: &[(&str, u16, &str, &str)] = &[
    ("10.9.100.1", 80, "dsr-l2", "ipv4"),
    ("2001:db8:100::1", 80, "dsr-l2", "ipv6"),
    ("10.9.100.2", 443, "dsr-ipip", "ipv4"),
    ("2001:db8:100::2", 443, "dsr-ipip", "ipv6"),
    ("10.9.100.4", 80, "nat", "ipv4"),
    ("2001:db8:100::4", 80, "nat", "ipv6"),
];

#[derive(Serialize)]
pub struct Entry {
    pub path: &'static str,
    pub mode: &'static str,
    pub family: &'static str,
    /// Program time per packet (see the module documentation).
    pub ns_per_packet: f64,
    pub baseline_ns_per_packet: f64,
    pub ratio: f64,
    /// Mean kernel-reported time of one call, fixed cost included, for lb and `XDP_PASS`.
    pub per_call_ns: f64,
    pub baseline_per_call_ns: f64,
    pub calls: u32,
    /// Distinct flows the calls cycle through.
    pub flows: usize,
}

/// A fixed-point path measured both ways.
#[derive(Serialize)]
pub struct Check {
    pub path: &'static str,
    pub mode: &'static str,
    pub family: &'static str,
    /// The kernel's repeat loop on one frame.
    pub repeat: u32,
    pub repeat_ns_per_packet: f64,
    /// The fresh-frame method of the entries.
    pub fresh_frame_ns_per_packet: f64,
}

#[derive(Serialize)]
pub struct Report {
    pub method: &'static str,
    pub repeat: u32,
    pub entries: Vec<Entry>,
    pub checks: Vec<Check>,
    /// Target: the established-flow path within this many times `XDP_PASS`, in every mode.
    pub target_established_ratio: f64,
}

/// What a measured path must do to every frame: its action and the counter it bumps.
#[derive(Clone, Copy)]
struct Expect {
    action: Action,
    counter: Counter,
    /// Whether each frame creates a flow (`ct_created` rises by one per call, else stays).
    creates: bool,
}

const FORWARD_NEW: Expect = Expect { action: Action::Tx, counter: Counter::Forwarded, creates: true };
const FORWARD: Expect = Expect { action: Action::Tx, counter: Counter::Forwarded, creates: false };
const NAT_REPLY: Expect = Expect { action: Action::Tx, counter: Counter::NatReplied, creates: false };
const NOT_VIP: Expect = Expect { action: Action::Pass, counter: Counter::PassNotVip, creates: false };

/// Calls per block: each path is measured in blocks, the paths' blocks taken in turn.
const BLOCKS: u32 = 50;

struct Bench {
    lb: Balancer,
    maps: DataplaneMaps,
    pass: PassProgram,
    opts: Options,
}

/// One path being measured: its frames (cycled), what they must do, and per-block samples.
struct Path {
    key: (&'static str, &'static str, &'static str),
    frames: Vec<Vec<u8>>,
    expect: Expect,
    calls_per_block: u32,
    cursor: usize,
    /// Per block: mean ns per call of lb minus that of `XDP_PASS`, and both means.
    diff: Vec<f64>,
    lb_call: Vec<f64>,
    pass_call: Vec<f64>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// Client `i`: distinct address and port per flow.
fn client(v6: bool, i: usize) -> (IpAddr, u16) {
    let hi = u16::try_from(i / 50_000).expect("few");
    let lo = u16::try_from(i % 50_000).expect("small");
    let addr: IpAddr = if v6 {
        std::net::Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, hi, lo / 200).into()
    } else {
        std::net::Ipv4Addr::new(
            198,
            18,
            u8::try_from(hi).expect("few"),
            u8::try_from(lo / 200).expect("small"),
        )
        .into()
    };
    (addr, 10_000 + lo % 200)
}

fn flow(vip: IpAddr, port: u16, proto: u8, i: usize, flags: u8) -> Vec<u8> {
    let (src, sport) = client(vip.is_ipv6(), i);
    let mut f = Frame::new(src, vip, proto, sport, port, PAYLOAD);
    if proto == PROTO_TCP {
        f.flags = flags;
    }
    f.build()
}

/// Destination address and source port of a forwarded IPv4/IPv6 TCP/UDP frame.
fn destination_and_sport(frame: &[u8]) -> Option<(IpAddr, u16)> {
    let ip_off = 14;
    match frame.get(12..14)? {
        [0x08, 0x00] => {
            let ihl = usize::from(frame.get(ip_off)? & 0x0f) * 4;
            let dst: [u8; 4] = frame.get(ip_off + 16..ip_off + 20)?.try_into().ok()?;
            let sport = frame.get(ip_off + ihl..ip_off + ihl + 2)?;
            Some((IpAddr::from(dst), u16::from_be_bytes([sport[0], sport[1]])))
        }
        [0x86, 0xdd] => {
            let dst: [u8; 16] = frame.get(ip_off + 24..ip_off + 40)?.try_into().ok()?;
            let sport = frame.get(ip_off + 40..ip_off + 42)?;
            Some((IpAddr::from(dst), u16::from_be_bytes([sport[0], sport[1]])))
        }
        _ => None,
    }
}

#[expect(clippy::cast_precision_loss, reason = "nanoseconds per run, far below 2^52")]
fn nanos(d: std::time::Duration) -> f64 {
    d.as_nanos() as f64
}

impl Bench {
    fn counter(&self, c: Counter) -> Result<u64> {
        let all = self.maps.counters().context("read counters")?;
        Ok(all.iter().find(|(k, _)| *k == c).map_or(0, |(_, n)| *n))
    }

    /// One block of `path`: its next frames through lb, each call followed by the same frame
    /// through `XDP_PASS`; every action and the counters checked.
    fn block(&mut self, path: &mut Path) -> Result<()> {
        let expect = path.expect;
        let (counted, created) = (self.counter(expect.counter)?, self.counter(Counter::CtCreated)?);
        let (mut lb_ns, mut pass_ns) = (0.0, 0.0);
        for _ in 0..path.calls_per_block {
            let frame = &path.frames[path.cursor % path.frames.len()];
            path.cursor += 1;
            let r = self.lb.test_run(frame, 1)?;
            ensure!(
                r.action == expect.action,
                "{:?}: {:?}, expected {:?}",
                path.key,
                r.action,
                expect.action
            );
            lb_ns += nanos(r.per_run);
            pass_ns += nanos(self.pass.test_run(frame, 1)?.per_run);
        }
        let calls = path.calls_per_block;
        let counted = self.counter(expect.counter)? - counted;
        let created = self.counter(Counter::CtCreated)? - created;
        ensure!(
            counted == u64::from(calls),
            "{:?}: {} rose by {counted}, not {calls}",
            path.key,
            expect.counter.name()
        );
        let want_created = if expect.creates { u64::from(calls) } else { 0 };
        ensure!(created == want_created, "{:?}: ct_created rose by {created}, not {want_created}", path.key);
        let (lb, pass) = (lb_ns / f64::from(calls), pass_ns / f64::from(calls));
        path.diff.push(lb - pass);
        path.lb_call.push(lb);
        path.pass_call.push(pass);
        Ok(())
    }

    /// `XDP_PASS` per run in the kernel's repeat loop.
    fn pass_repeat(&mut self, frame: &[u8]) -> Result<f64> {
        Ok(nanos(self.pass.test_run(frame, self.opts.repeat)?.per_run))
    }
}

fn path(
    key: (&'static str, &'static str, &'static str),
    frames: Vec<Vec<u8>>,
    calls: u32,
    expect: Expect,
) -> Path {
    let calls_per_block = (calls / BLOCKS).max(1);
    Path {
        key,
        frames,
        expect,
        calls_per_block,
        cursor: 0,
        diff: Vec::new(),
        lb_call: Vec::new(),
        pass_call: Vec::new(),
    }
}

fn registry() -> String {
    let timeouts = "  udp_timeout: 1h\n  tcp_syn_timeout: 1h\n  tcp_closing_timeout: 1h";
    scenario::registry(scenario::THREE, NAT_PORTS, timeouts)
}

/// The scenario's plan with every backend's MAC set to the node's: a forwarded dsr-l2 frame
/// is then again a frame for this node, a fixed point of the program.
fn fixed_point_plan() -> DataPlan {
    let reg = lb_userspace::config::parse(&registry(), std::path::Path::new("bench.yaml")).expect("valid");
    let mut res = scenario::resolutions();
    for r in res.values_mut().flatten() {
        r.mac = NODE_MAC;
    }
    plan::plan(&reg, &scenario::node(), &res, &Ids::default(), &plan::Overrides::default()).0
}

/// The measured paths, their flows established where they need one.
fn paths(b: &mut Bench) -> Result<Vec<Path>> {
    let opts = b.opts;
    let mut paths = Vec::new();
    for (i, &(vip, port, mode, family)) in SERVICES.iter().enumerate() {
        let vip = ip(vip);
        // Distinct flows per service: services share client ranges otherwise.
        let base = i * (opts.new_flow_runs as usize + 2 * POOL + COLD_POOL);
        let syns: Vec<Vec<u8>> =
            (0..opts.new_flow_runs as usize).map(|k| flow(vip, port, PROTO_TCP, base + k, TCP_SYN)).collect();
        paths.push(path(("tcp-syn", mode, family), syns, opts.new_flow_runs, FORWARD_NEW));

        // Established flows: opened by a SYN each, then measured on their ACKs.
        let pool = base + opts.new_flow_runs as usize;
        let mut replies = Vec::new();
        for k in 0..POOL {
            let syn = flow(vip, port, PROTO_TCP, pool + k, TCP_SYN);
            let out = b.lb.test_run(&syn, 1)?;
            ensure!(out.action == Action::Tx, "{mode} {family}: SYN not forwarded");
            if mode == "nat" {
                let (backend, nat_port) = destination_and_sport(&out.frame).context("forwarded frame")?;
                let mut r = Frame::new(backend, vip_node(vip), PROTO_TCP, 8080, nat_port, PAYLOAD);
                r.flags = TCP_ACK;
                r.src_mac = scenario::backend_mac(backend);
                replies.push(r.build());
            }
        }
        let acks: Vec<Vec<u8>> = (0..POOL).map(|k| flow(vip, port, PROTO_TCP, pool + k, TCP_ACK)).collect();
        paths.push(path(("tcp-established", mode, family), acks, opts.runs, FORWARD));
        let cold = pool + POOL;
        for k in 0..COLD_POOL {
            let syn = flow(vip, port, PROTO_TCP, cold + k, TCP_SYN);
            ensure!(b.lb.test_run(&syn, 1)?.action == Action::Tx, "{mode} {family}: SYN not forwarded");
        }
        let acks: Vec<Vec<u8>> =
            (0..COLD_POOL).map(|k| flow(vip, port, PROTO_TCP, cold + k, TCP_ACK)).collect();
        paths.push(path(("tcp-established-cold", mode, family), acks, opts.runs, FORWARD));

        let udp_pool = cold + COLD_POOL;
        let datagrams: Vec<Vec<u8>> =
            (0..POOL).map(|k| flow(vip, port, PROTO_UDP, udp_pool + k, 0)).collect();
        for d in &datagrams {
            ensure!(b.lb.test_run(d, 1)?.action == Action::Tx, "{mode} {family}: UDP not forwarded");
        }
        paths.push(path(("udp", mode, family), datagrams, opts.runs, FORWARD));
        if mode == "nat" {
            paths.push(path(("nat-reply", mode, family), replies, opts.runs, NAT_REPLY));
        }
    }
    for (family, node) in [("ipv4", scenario::NODE_V4), ("ipv6", scenario::NODE_V6)] {
        let other: Vec<Vec<u8>> = (0..POOL)
            .map(|k| {
                let (src, sport) = client(family == "ipv6", k);
                Frame::new(src, ip(node), PROTO_TCP, sport, 22, PAYLOAD).build()
            })
            .collect();
        paths.push(path(("not-vip", "any", family), other, opts.runs, NOT_VIP));
    }
    Ok(paths)
}

/// Runs the benchmark; prints the table and returns the report.
pub fn run(opts: Options) -> Result<Report> {
    let plan = scenario::plan(&registry(), &Ids::default());
    // Room for every flow of the run: an evicted flow would turn a measured hit into a miss.
    let flows = SERVICES.len() * (opts.new_flow_runs as usize + 2 * POOL + COLD_POOL);
    let conntrack = u32::try_from(2 * flows).context("too many flows")?.max(1 << 16);
    let (lb, mut maps, _) = Balancer::load(conntrack, None).context("load the XDP object (root?)")?;
    maps.apply(&plan).context("fill the maps")?;
    let pass = PassProgram::load().context("load XDP_PASS")?;
    let mut b = Bench { lb, maps, pass, opts };
    let mut paths = paths(&mut b)?;
    let probe = paths[0].frames[0].clone();
    let mut pass_repeat = Vec::new();
    for block in 0..BLOCKS {
        eprint!("\rxdp bench: block {}/{BLOCKS}", block + 1);
        pass_repeat.push(b.pass_repeat(&probe)?);
        for p in &mut paths {
            b.block(p)?;
        }
    }
    eprintln!();
    let baseline = median(&mut pass_repeat);
    let entries: Vec<Entry> = paths
        .iter_mut()
        .map(|p| {
            let ns = median(&mut p.diff) + baseline;
            Entry {
                path: p.key.0,
                mode: p.key.1,
                family: p.key.2,
                ns_per_packet: round(ns, 1),
                baseline_ns_per_packet: round(baseline, 1),
                ratio: round(ns / baseline, 2),
                per_call_ns: round(median(&mut p.lb_call), 1),
                baseline_per_call_ns: round(median(&mut p.pass_call), 1),
                calls: p.calls_per_block * BLOCKS,
                flows: p.frames.len(),
            }
        })
        .collect();
    let checks = fixed_point_checks(&mut b, &entries)?;

    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.path.to_owned(),
                e.mode.to_owned(),
                e.family.to_owned(),
                format!("{:.1}", e.ns_per_packet),
                format!("{:.1}", e.baseline_ns_per_packet),
                format!("{:.2}", e.ratio),
                format!("{:.1}", e.per_call_ns),
                format!("{:.1}", e.baseline_per_call_ns),
                e.flows.to_string(),
            ]
        })
        .collect();
    println!(
        "\nXDP program time per packet (BPF_PROG_TEST_RUN; baseline: XDP_PASS at repeat {})\n{}",
        opts.repeat,
        table(
            &["path", "mode", "family", "ns/pkt", "XDP_PASS", "ratio", "call ns", "PASS call", "flows"],
            &rows
        )
    );
    for c in &checks {
        println!(
            "check {} {} {}: kernel repeat {} -> {:.1} ns/pkt (median of {CHECK_SAMPLES}); fresh frames -> {:.1} ns/pkt",
            c.path, c.mode, c.family, c.repeat, c.repeat_ns_per_packet, c.fresh_frame_ns_per_packet
        );
    }
    Ok(Report {
        method: "fresh frames, one run per call, interleaved with XDP_PASS, in blocks taken in turn; \
                 median over blocks; the per-call fixed cost removed (see tests/src/bench/xdp.rs)",
        repeat: opts.repeat,
        entries,
        checks,
        target_established_ratio: 2.5,
    })
}

/// The node address of `vip`'s family (NAT replies come back to it).
fn vip_node(vip: IpAddr) -> IpAddr {
    ip(if vip.is_ipv6() { scenario::NODE_V6 } else { scenario::NODE_V4 })
}

/// The two fixed-point paths measured by the kernel's repeat loop, next to the fresh-frame
/// figures of the same paths.
fn fixed_point_checks(b: &mut Bench, entries: &[Entry]) -> Result<Vec<Check>> {
    let fresh = |path: &str, mode: &str| {
        entries
            .iter()
            .find(|e| e.path == path && e.mode == mode && e.family == "ipv4")
            .map_or(f64::NAN, |e| e.ns_per_packet)
    };
    let repeat = b.opts.repeat;
    let other = Frame::new(ip("198.18.0.1"), ip(scenario::NODE_V4), PROTO_TCP, 10_000, 22, PAYLOAD).build();
    let mut samples = Vec::new();
    for _ in 0..CHECK_SAMPLES {
        let r = b.lb.test_run(&other, repeat)?;
        ensure!(r.action == Action::Pass, "not-vip: {:?}", r.action);
        samples.push(nanos(r.per_run));
    }
    let not_vip = median(&mut samples);

    let (mut lb, mut maps, _) = Balancer::load(1 << 16, None).context("load a second XDP object")?;
    maps.apply(&fixed_point_plan()).context("fill its maps")?;
    let syn = flow(ip("10.9.100.1"), 80, PROTO_TCP, 0, TCP_SYN);
    ensure!(lb.test_run(&syn, 1)?.action == Action::Tx, "fixed-point SYN not forwarded");
    let ack = flow(ip("10.9.100.1"), 80, PROTO_TCP, 0, TCP_ACK);
    let mut samples = Vec::new();
    for _ in 0..CHECK_SAMPLES {
        let forwarded = || {
            maps.counters().map(|c| c.iter().find(|(c, _)| *c == Counter::Forwarded).map_or(0, |(_, n)| *n))
        };
        let before = forwarded()?;
        let r = lb.test_run(&ack, repeat)?;
        ensure!(
            r.action == Action::Tx && forwarded()? - before == u64::from(repeat),
            "fixed point not reached"
        );
        samples.push(nanos(r.per_run));
    }
    let established = median(&mut samples);
    Ok(vec![
        Check {
            path: "not-vip",
            mode: "any",
            family: "ipv4",
            repeat,
            repeat_ns_per_packet: not_vip,
            fresh_frame_ns_per_packet: fresh("not-vip", "any"),
        },
        Check {
            path: "tcp-established",
            mode: "dsr-l2",
            family: "ipv4",
            repeat,
            repeat_ns_per_packet: established,
            fresh_frame_ns_per_packet: fresh("tcp-established", "dsr-l2"),
        },
    ])
}
