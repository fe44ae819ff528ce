//! Differential test: the XDP program in the kernel and the host reference model must agree on
//! every frame (verdict and output bytes) and, at the end, on every counter and traffic total.
//!
//! Frames: valid TCP/UDP flows to VIPs of every mode in both families (assorted TCP flags),
//! sources in a VIP's deny list, NAT replies, ICMP echo and "too big" errors, first and later
//! fragments, traffic not for a VIP, ARP, VLAN-tagged and IPv6-extension frames, frames for
//! another MAC, and deterministic mutations of all of them (truncations, bit flips, length
//! fields).
//!
//! Halfway through, both take the same reload (a backend leaves, one joins, one is drained).
//!
//! `LB_DIFF_PACKETS` sets the count (CI runs the default; `cargo xtask differential` runs
//! 1,000,000). `LB_DIFF_SEED` changes the sequence.

use std::net::IpAddr;

use lb_common::{
    datapath::Counter,
    maps::{PROTO_TCP, PROTO_UDP},
    packet::ETH_HLEN,
};
use lb_tests::{
    frames::{Fragment, Frame, Rng, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, echo_request, icmp_error},
    privileged,
    scenario::{self, NODE_MAC, NODE_V4, NODE_V6, THREE, VIPS},
};
use lb_userspace::{loader::Balancer, model::Model, plan::Ids};

const DEFAULT_PACKETS: usize = 30_000;
/// Flows the test tracks at most: the kernel LRU must never evict (the model does not).
const CONNTRACK_SIZE: u32 = 1 << 20;
const CLIENT_PORTS: u16 = 600;
const CLIENTS_V4: [&str; 3] = ["10.9.0.10", "10.9.0.20", "192.0.2.7"];
const CLIENTS_V6: [&str; 3] = ["2001:db8::10", "2001:db8::20", "2001:db8:9::7"];
const NAT_PORTS: (u16, u16) = (61_000, 61_199);

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).expect("positive") * 1_000_000_000 + u64::try_from(ts.tv_nsec).expect("positive")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

struct Gen {
    rng: Rng,
}

impl Gen {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.rng.below(items.len())]
    }

    fn flags(&mut self) -> u8 {
        *self.pick(&[
            TCP_SYN,
            TCP_SYN,
            TCP_ACK,
            TCP_ACK,
            TCP_ACK,
            TCP_FIN | TCP_ACK,
            TCP_RST,
            TCP_SYN | TCP_ACK,
        ])
    }

    /// A client flow to one of the scenario's VIPs.
    fn vip_flow(&mut self) -> Frame {
        let &(_, vip, port, _) = self.pick(VIPS);
        let v6 = ip(vip).is_ipv6();
        let client = *self.pick(if v6 { &CLIENTS_V6 } else { &CLIENTS_V4 });
        let proto = if self.rng.below(2) == 0 { PROTO_TCP } else { PROTO_UDP };
        let sport = 30_000 + u16::try_from(self.rng.below(usize::from(CLIENT_PORTS))).expect("small");
        let mut f = Frame::new(ip(client), ip(vip), proto, sport, port, self.rng.below(200));
        f.flags = if proto == PROTO_TCP { self.flags() } else { 0 };
        f
    }

    /// A backend's reply towards this node's NAT address and some NAT port.
    fn nat_reply(&mut self) -> Frame {
        let v6 = self.rng.below(3) == 0;
        let (backend, node) =
            if v6 { ("2001:db8::12", NODE_V6) } else { (*self.pick(&["10.9.0.11", "10.9.0.13"]), NODE_V4) };
        let port = NAT_PORTS.0
            + u16::try_from(self.rng.below(usize::from(NAT_PORTS.1 - NAT_PORTS.0 + 1))).expect("small");
        let proto = if self.rng.below(2) == 0 { PROTO_TCP } else { PROTO_UDP };
        let mut f = Frame::new(ip(backend), ip(node), proto, 8080, port, self.rng.below(100));
        f.src_mac = scenario::backend_mac(ip(backend));
        f.flags = if proto == PROTO_TCP { self.flags() } else { 0 };
        f
    }

    fn icmp(&mut self) -> Frame {
        let flow = self.vip_flow();
        if self.rng.below(2) == 0 {
            let dst = if self.rng.below(4) == 0 { flow.src } else { flow.dst };
            return echo_request(flow.src, dst, 7, self.rng.below(64));
        }
        // An error about the VIP's reply to this client.
        let reply = Frame::new(flow.dst, flow.src, flow.proto, flow.dport, flow.sport, 64).build();
        let router = if flow.src.is_ipv6() { ip("2001:db8:50::1") } else { ip("10.9.50.1") };
        let (kind, code) = if flow.src.is_ipv6() { (2, 0) } else { (3, 4) };
        let quote = *self.pick(&[28usize, 48, 68, 120]);
        icmp_error(router, flow.dst, kind, code, 1400, &reply, quote)
    }

    fn fragment(&mut self) -> Frame {
        let mut f = self.vip_flow();
        let id = u32::try_from(self.rng.below(64)).expect("small") + 1;
        f.payload = vec![7; 80];
        f.fragment = if self.rng.below(2) == 0 {
            Fragment::First(id)
        } else {
            Fragment::Later(id, 8 * (1 + u16::try_from(self.rng.below(8)).expect("small")))
        };
        f
    }

    fn other(&mut self) -> Vec<u8> {
        let mut f = self.vip_flow();
        match self.rng.below(5) {
            0 => {
                f.dst = if f.dst.is_ipv6() { ip(NODE_V6) } else { ip(NODE_V4) };
                f.build()
            }
            1 => {
                f.dst_mac = [2, 0, 0, 0, 0, 0x77];
                f.build()
            }
            2 => {
                let mut b = f.build();
                b[12..14].copy_from_slice(&[0x08, 0x06]);
                b
            }
            3 => {
                let mut b = f.build();
                b[12..14].copy_from_slice(&[0x81, 0x00]);
                b
            }
            _ => {
                f.src = ip("2001:db8::10");
                f.dst = ip("2001:db8:100::1");
                let mut b = f.build();
                b[20] = 0; // hop-by-hop options follow
                b
            }
        }
    }

    fn frame(&mut self) -> Vec<u8> {
        let base = match self.rng.below(20) {
            0..=8 => self.vip_flow().build(),
            9..=11 => self.nat_reply().build(),
            12 | 13 => self.icmp().build(),
            14 | 15 => self.fragment().build(),
            _ => self.other(),
        };
        if self.rng.below(10) < 3 {
            // BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header.
            self.rng.mutate(&base, ETH_HLEN)
        } else {
            base
        }
    }
}

#[test]
fn kernel_program_and_model_agree_on_every_frame() {
    if !privileged("kernel_program_and_model_agree_on_every_frame") {
        return;
    }
    let packets: usize =
        std::env::var("LB_DIFF_PACKETS").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_PACKETS);
    let seed: u64 = std::env::var("LB_DIFF_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x6c62_2026);
    // Long timeouts: nothing expires during the run, so the kernel's and the model's clocks,
    // a few microseconds apart, never decide differently.
    let timeouts = "  udp_timeout: 1h\n  tcp_syn_timeout: 1h\n  tcp_closing_timeout: 1h";
    let src = scenario::registry(THREE, &format!("{}-{}", NAT_PORTS.0, NAT_PORTS.1), timeouts);
    let plan = scenario::plan(&src, &Ids::default());
    // Halfway, a reload: one `l2` backend leaves, one joins, one is drained. Tracked flows of
    // the one that left are balanced again; the others keep their backends.
    let changed = "      - {host: 10.9.0.11, port: 80}\n      - {host: 10.9.0.12, port: 80, weight: 0}\n      - {host: 10.9.0.14, port: 80}\n";
    let reloaded = scenario::plan(
        &scenario::registry(changed, &format!("{}-{}", NAT_PORTS.0, NAT_PORTS.1), timeouts),
        &plan.ids,
    );
    let mut model = Model::from_plan(&plan);
    let (mut balancer, mut maps, _) = Balancer::load(CONNTRACK_SIZE, None).expect("load the XDP object");
    maps.apply(&plan).expect("fill the maps");
    assert_eq!(plan.node.mac, NODE_MAC);

    let mut generator = Gen { rng: Rng::new(seed) };
    let started = std::time::Instant::now();
    for n in 0..packets {
        if n == packets / 2 {
            maps.apply(&reloaded).expect("apply the reload");
            model.apply(&reloaded);
        }
        let frame = generator.frame();
        model.set_now(monotonic_ns());
        let kernel = balancer.test_run(&frame, 1).unwrap_or_else(|e| panic!("frame {n}: test run: {e:?}"));
        let (action, out) = model.run(&frame);
        assert_eq!(
            (kernel.action, &kernel.frame),
            (action, &out),
            "frame {n} (seed {seed:#x}) differs\n in: {frame:02x?}\nkernel: {:?} {:02x?}\n model: {action:?} {out:02x?}",
            kernel.action,
            kernel.frame,
        );
    }

    let counters = maps.counters().expect("counters");
    for (c, n) in &counters {
        assert_eq!(*n, model.counter(*c), "counter {} differs", c.name());
    }
    let verdicts: u64 = counters.iter().filter(|(c, _)| c.is_verdict()).map(|(_, n)| n).sum();
    assert_eq!(verdicts, packets as u64, "every frame has exactly one verdict");
    for vip in &reloaded.vips {
        assert_eq!(maps.vip_stats(vip.info.id).unwrap(), model.vip_stats(vip.info.id), "{}", vip.service);
    }
    for &id in plan.backends.keys().chain(reloaded.backends.keys()) {
        assert_eq!(maps.backend_stats(id).unwrap(), model.backend_stats(id), "backend {id}");
    }
    for c in [
        Counter::Forwarded,
        Counter::NatReplied,
        Counter::IcmpEchoReplied,
        Counter::IcmpErrorForwarded,
        Counter::FragmentForwarded,
        Counter::DropFragmentUnknown,
        Counter::DropDenied,
        Counter::PassMalformed,
        Counter::PassNotForNode,
        Counter::PassVlan,
        Counter::PassIpv6Ext,
        Counter::CtMissEstablished,
        Counter::CtRebalanced,
    ] {
        assert!(model.counter(c) > 0, "the frames must exercise {}", c.name());
    }
    let summary: Vec<String> =
        counters.iter().filter(|(_, n)| *n > 0).map(|(c, n)| format!("{}={n}", c.name())).collect();
    eprintln!(
        "differential: {packets} frames agreed in {:.1}s (seed {seed:#x}): {}",
        started.elapsed().as_secs_f64(),
        summary.join(" ")
    );
}
