//! The XDP program in the kernel and the host reference model agree, frame for frame: the
//! same verdict, the same output bytes and the same counters, for crafted well-formed,
//! unusual and malformed frames and for deterministic random mutations of them.
//!
//! The kernel side is the real object, loaded and filled by lbd's own loader and map writer,
//! run with `BPF_PROG_TEST_RUN`; nothing is attached anywhere.

use std::{net::Ipv4Addr, path::Path};

use lb_common::{
    datapath::{self, Counter},
    maps::PROTO_TCP,
    packet::{BytesPacket, ETH_HLEN},
};
use lb_tests::{
    frames::{Ipv4Frame, Rng},
    privileged,
};
use lb_userspace::{
    config,
    loader::Balancer,
    model::Model,
    plan::{self, Resolutions, Resolved},
};

const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 9, 100, 1);
/// Mutated frames per base frame.
const MUTATIONS: usize = 500;

const REGISTRY: &str = "
version: 1
tcp:
  web:
    vip: 10.9.100.1
    port: 80
    protocols: [tcp, udp]
    backends:
      - {host: 10.9.0.11, port: 80}
      - {host: 10.9.0.12, port: 80}
      - {host: 10.9.0.13, port: 80}
  empty:
    vip: 10.9.100.1
    port: 81
    backends:
      - {host: 10.9.0.99, port: 81}
";

fn plan() -> plan::DataPlan {
    let reg = config::parse(REGISTRY, Path::new("model-test.yaml")).expect("valid registry");
    let mut resolved = Resolutions::new();
    for last in [11u8, 12, 13] {
        let host = format!("10.9.0.{last}");
        let r = Resolved { addr: host.parse().unwrap(), mac: [2, 0, 0, 0, 1, last] };
        resolved.insert(host, Ok(r));
    }
    resolved.insert("10.9.0.99".to_owned(), Err("no ARP answer".to_owned()));
    let (plan, _) = plan::plan(&reg, NODE_MAC, &resolved);
    plan
}

fn base(proto: u8, dport: u16) -> Ipv4Frame {
    Ipv4Frame {
        dst_mac: NODE_MAC,
        src_mac: [2, 0, 0, 0, 0, 0x10],
        src: Ipv4Addr::new(10, 9, 0, 10),
        dst: VIP,
        proto,
        sport: 40000,
        dport,
        option_words: 0,
        payload_len: 32,
    }
}

/// Crafted frames, one per rule of the datapath.
fn crafted() -> Vec<(&'static str, Vec<u8>)> {
    let tcp = base(PROTO_TCP, 80).build();
    let with = |name, f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = tcp.clone();
        f(&mut v);
        (name, v)
    };
    let mut cases = vec![
        ("tcp to vip", tcp.clone()),
        ("udp to vip", base(17, 80).build()),
        ("ip options", Ipv4Frame { option_words: 3, ..base(PROTO_TCP, 80) }.build()),
        ("empty vip", base(PROTO_TCP, 81).build()),
        ("other port", base(PROTO_TCP, 443).build()),
        ("icmp to vip", base(1, 80).build()),
        ("other address", Ipv4Frame { dst: Ipv4Addr::new(10, 9, 0, 2), ..base(PROTO_TCP, 80) }.build()),
        ("other dst mac", Ipv4Frame { dst_mac: [2, 0, 0, 0, 0, 0x77], ..base(PROTO_TCP, 80) }.build()),
        ("zero-length udp payload", Ipv4Frame { payload_len: 0, ..base(17, 80) }.build()),
        ("eth only", tcp[..ETH_HLEN].to_vec()),
        ("truncated ip", tcp[..ETH_HLEN + 10].to_vec()),
        ("truncated ports", tcp[..ETH_HLEN + 22].to_vec()),
    ];
    cases.extend([
        with("arp", &|f| f[12..14].copy_from_slice(&[0x08, 0x06])),
        with("ipv6 ethertype", &|f| f[12..14].copy_from_slice(&[0x86, 0xdd])),
        with("vlan tag", &|f| f[12..14].copy_from_slice(&[0x81, 0x00])),
        with("ihl 4", &|f| f[14] = 0x44),
        with("version 6", &|f| f[14] = 0x65),
        with("more fragments", &|f| f[20] |= 0x20),
        with("fragment offset", &|f| f[21] = 0x08),
        with("tot_len beyond frame", &|f| f[16..18].copy_from_slice(&500u16.to_be_bytes())),
        with("ports in padding", &|f| f[16..18].copy_from_slice(&22u16.to_be_bytes())),
        with("ethernet padding", &|f| f.extend_from_slice(&[0; 20])),
        with("ttl 1", &|f| f[22] = 1),
    ]);
    cases
}

#[test]
fn kernel_program_and_host_model_agree_on_every_frame() {
    if !privileged("kernel_program_and_host_model_agree_on_every_frame") {
        return;
    }
    let plan = plan();
    let model = Model::from_plan(&plan);
    let (mut balancer, mut maps) = Balancer::load().expect("load the XDP object");
    maps.apply(&plan).expect("fill the maps");

    let mut frames = crafted();
    let mut rng = Rng::new(0x6c62_2026);
    for (name, f) in crafted() {
        for _ in 0..MUTATIONS {
            // BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header.
            frames.push((name, rng.mutate(&f, ETH_HLEN)));
        }
    }
    for (name, frame) in &frames {
        let kernel = balancer.test_run(frame, 1).unwrap_or_else(|e| panic!("{name}: test run: {e:?}"));
        let mut host = frame.clone();
        let action = datapath::process(&mut BytesPacket(&mut host), &model);
        assert_eq!(kernel.action, action, "{name}: verdict differs for {frame:02x?}");
        assert_eq!(kernel.frame, host, "{name}: output bytes differ for {frame:02x?}");
    }

    let kernel_counters = maps.counters().expect("read counters");
    for (c, n) in &kernel_counters {
        assert_eq!(*n, model.counter(*c), "counter {} differs", c.name());
    }
    let total: u64 = kernel_counters.iter().map(|(_, n)| n).sum();
    assert_eq!(total, frames.len() as u64, "every frame is counted exactly once");
    for c in [Counter::Forwarded, Counter::PassMalformed, Counter::PassNotForNode, Counter::DropNoBackend] {
        assert!(model.counter(c) > 0, "the frames must exercise {}", c.name());
    }
    for vip in &plan.vips {
        assert_eq!(maps.vip_stats(vip.info.id).unwrap(), model.vip_stats(vip.info.id), "{}", vip.service);
    }
}
