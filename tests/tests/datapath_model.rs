//! The forwarding decision, run on the host through the reference model: every mode in both
//! families, NAT round trips with checksums recomputed from scratch, connection tracking across
//! table changes, ICMP, fragments, and the rule for each unusual frame. No privileges needed.

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::{
    datapath::{Action, Counter},
    maps::{FlowKey, PROTO_TCP, PROTO_UDP},
    packet::{ETH_HLEN, ETH_P_IPV4, ETH_P_IPV6},
};
use lb_tests::{
    frames::{Fragment, Frame, TCP_ACK, TCP_FIN, TCP_SYN, echo_request, icmp_error, verify},
    scenario::{self, CLIENT_MAC, NODE_MAC, THREE, backend_mac},
};
use lb_userspace::{
    model::Model,
    plan::{DataPlan, Ids},
};

const SEC: u64 = 1_000_000_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn registry(l2_backends: &str) -> String {
    scenario::registry(l2_backends, "61000-61009", "  udp_timeout: 30s")
}

fn make_plan(src: &str, prev: &Ids) -> DataPlan {
    scenario::plan(src, prev)
}

fn model() -> (Model, DataPlan) {
    let p = make_plan(&registry(THREE), &Ids::default());
    let m = Model::from_plan(&p);
    m.set_now(1000 * SEC);
    (m, p)
}

fn tcp(src: &str, dst: &str, sport: u16, dport: u16, flags: u8) -> Frame {
    let mut f = Frame::new(ip(src), ip(dst), PROTO_TCP, sport, dport, 64);
    f.flags = flags;
    f
}

fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Frame {
    Frame::new(ip(src), ip(dst), PROTO_UDP, sport, dport, 48)
}

/// Runs `f` and expects it forwarded; returns the frame that left.
fn tx(m: &Model, f: &Frame) -> Vec<u8> {
    let (action, out) = m.run(&f.build());
    assert_eq!(action, Action::Tx, "{f:?}");
    out
}

fn dst_mac(frame: &[u8]) -> [u8; 6] {
    frame[..6].try_into().unwrap()
}

#[test]
fn dsr_l2_rewrites_only_the_macs_and_keeps_a_flow_on_its_backend() {
    let (m, _) = model();
    for (client, vip) in [("10.9.0.10", "10.9.100.1"), ("2001:db8::10", "2001:db8:100::1")] {
        let f = tcp(client, vip, 40000, 80, TCP_SYN);
        let orig = f.build();
        let out = tx(&m, &f);
        assert_eq!(out[6..12], NODE_MAC, "source MAC is the node's");
        assert_eq!(out[12..], orig[12..], "only the MAC addresses change");
        let first = dst_mac(&out);
        for _ in 0..5 {
            assert_eq!(
                dst_mac(&tx(&m, &tcp(client, vip, 40000, 80, TCP_ACK))),
                first,
                "a flow keeps its backend"
            );
        }
    }
    assert_eq!(m.counter(Counter::CtCreated), 2);
    assert_eq!(m.counter(Counter::Forwarded), 12);
}

#[test]
fn flows_spread_over_every_backend() {
    let (m, _) = model();
    let macs: BTreeSet<[u8; 6]> =
        (0..300).map(|p| dst_mac(&tx(&m, &udp("10.9.0.10", "10.9.100.1", 30000 + p, 80)))).collect();
    assert_eq!(macs.len(), 3, "{macs:02x?}");
}

#[test]
fn dsr_ipip_wraps_the_datagram_in_a_fresh_outer_header() {
    let (m, _) = model();
    // (client, VIP, backend, outer ethertype, outer protocol field)
    for (client, vip, backend, ether, inner_proto) in [
        ("10.9.0.10", "10.9.100.2", "10.9.0.11", ETH_P_IPV4, 4u8),
        ("2001:db8::10", "2001:db8:100::2", "2001:db8::11", ETH_P_IPV6, 41),
        ("10.9.0.10", "10.9.100.3", "2001:db8::12", ETH_P_IPV6, 4),
    ] {
        let f = tcp(client, vip, 40000, 443, TCP_SYN);
        let orig = f.build();
        let out = tx(&m, &f);
        assert_eq!(out[..6], backend_mac(ip(backend)));
        assert_eq!(out[12..14], ether);
        let (outer_len, proto, src, dst) = if ether == ETH_P_IPV6 {
            let s: [u8; 16] = out[22..38].try_into().unwrap();
            let d: [u8; 16] = out[38..54].try_into().unwrap();
            (40, out[20], IpAddr::from(s), IpAddr::from(d))
        } else {
            let s: [u8; 4] = out[26..30].try_into().unwrap();
            let d: [u8; 4] = out[30..34].try_into().unwrap();
            assert_eq!(out[20] & 0x40, 0x40, "DF set");
            assert_eq!(out[22], 64, "outer TTL");
            (20, out[23], IpAddr::from(s), IpAddr::from(d))
        };
        assert_eq!(proto, inner_proto);
        assert_eq!(dst, ip(backend));
        assert_eq!(src, if ether == ETH_P_IPV6 { ip("2001:db8::2") } else { ip("10.9.0.2") });
        assert_eq!(out[ETH_HLEN + outer_len..], orig[ETH_HLEN..], "the inner datagram is untouched");
        verify(&out, ETH_HLEN).unwrap();
    }
}

#[test]
fn nat_translates_both_ways_with_valid_checksums() {
    let (m, _) = model();
    for (client, vip, backends, node_addr, proto) in [
        ("10.9.0.10", "10.9.100.4", &["10.9.0.11", "10.9.0.13"][..], "10.9.0.2", PROTO_TCP),
        ("10.9.0.10", "10.9.100.4", &["10.9.0.11", "10.9.0.13"][..], "10.9.0.2", PROTO_UDP),
        ("2001:db8::10", "2001:db8:100::4", &["2001:db8::12"][..], "2001:db8::2", PROTO_TCP),
    ] {
        let mut f = Frame::new(ip(client), ip(vip), proto, 40000, 80, 100);
        f.flags = if proto == PROTO_TCP { TCP_SYN } else { 0 };
        let out = tx(&m, &f);
        let off = if ip(client).is_ipv6() { (22, 38, 54) } else { (26, 30, 34) };
        let (src_at, dst_at, l4) = off;
        let src: IpAddr = if ip(client).is_ipv6() {
            <[u8; 16]>::try_from(&out[src_at..src_at + 16]).unwrap().into()
        } else {
            <[u8; 4]>::try_from(&out[src_at..src_at + 4]).unwrap().into()
        };
        let dst: IpAddr = if ip(client).is_ipv6() {
            <[u8; 16]>::try_from(&out[dst_at..dst_at + 16]).unwrap().into()
        } else {
            <[u8; 4]>::try_from(&out[dst_at..dst_at + 4]).unwrap().into()
        };
        assert_eq!(src, ip(node_addr));
        assert!(backends.contains(&dst.to_string().as_str()), "{dst} is one of the service's backends");
        let backend = dst;
        let nat_port = u16::from_be_bytes([out[l4], out[l4 + 1]]);
        assert!((61000..=61009).contains(&nat_port), "NAT port {nat_port} in the configured range");
        assert_eq!(u16::from_be_bytes([out[l4 + 2], out[l4 + 3]]), 8080, "backend port");
        assert_eq!(out[..6], backend_mac(backend));
        verify(&out, ETH_HLEN).unwrap();

        // The backend answers the node's NAT address and port.
        let mut reply = Frame::new(backend, ip(node_addr), proto, 8080, nat_port, 30);
        reply.src_mac = backend_mac(backend);
        reply.flags = if proto == PROTO_TCP { TCP_SYN | TCP_ACK } else { 0 };
        let back = tx(&m, &reply);
        let expected = {
            let mut e = Frame::new(ip(vip), ip(client), proto, 80, 40000, 30);
            e.flags = reply.flags;
            e.dst_mac = CLIENT_MAC;
            e.src_mac = NODE_MAC;
            e.build()
        };
        // Identical to the reply the client would get from the VIP itself (IP id and TTL aside).
        verify(&back, ETH_HLEN).unwrap();
        assert_eq!(back[..12], expected[..12], "back to the client's link-layer address");
        let hdr = if ip(client).is_ipv6() { 54 } else { 34 };
        assert_eq!(back[hdr..hdr + 4], expected[hdr..hdr + 4], "ports restored");
        assert_eq!(back[src_at..l4], expected[src_at..l4], "addresses restored");
    }
    assert_eq!(m.counter(Counter::NatReplied), 3);
}

#[test]
fn nat_ports_are_unique_per_backend_and_exhaustion_drops_until_one_frees() {
    let (m, _) = model();
    // nat6 has one backend: every flow competes for the same ten ports.
    let mut ports = BTreeSet::new();
    for sport in 0..10 {
        let out = tx(&m, &udp("2001:db8::10", "2001:db8:100::4", 50000 + sport, 80));
        ports.insert(u16::from_be_bytes([out[54], out[55]]));
    }
    assert_eq!(ports.len(), 10, "ten flows, ten distinct ports out of ten");
    // A range this small is probed port by port: every port is taken, so the new flow is
    // dropped and counted.
    let (action, _) = m.run(&udp("2001:db8::10", "2001:db8:100::4", 51000, 80).build());
    assert_eq!(action, Action::Drop);
    assert_eq!(m.counter(Counter::DropNatPortsExhausted), 1);
    // Once the idle flows expire (30s UDP timeout), their ports serve new flows.
    m.set_now(1000 * SEC + 31 * SEC);
    tx(&m, &udp("2001:db8::10", "2001:db8:100::4", 51000, 80));
}

#[test]
fn a_nat_reply_entry_evicted_under_a_live_flow_is_put_back() {
    let (m, _) = model();
    let node: std::net::Ipv4Addr = scenario::NODE_V4.parse().unwrap();
    let out = tx(&m, &udp("10.9.0.10", "10.9.100.4", 40000, 80));
    let (backend, port) = (std::net::Ipv4Addr::new(out[30], out[31], out[32], out[33]), [out[34], out[35]]);
    let reply = || {
        let mut r =
            Frame::new(backend.into(), ip(scenario::NODE_V4), PROTO_UDP, 8080, u16::from_be_bytes(port), 16);
        r.src_mac = backend_mac(backend.into());
        r.build()
    };
    assert_eq!(m.run(&reply()).0, Action::Tx, "a reply goes back to the client");
    let key = FlowKey {
        src: lb_common::maps::addr_v4(backend.octets()),
        dst: lb_common::maps::addr_v4(node.octets()),
        sport: 8080u16.to_be_bytes(),
        dport: port,
        proto: PROTO_UDP,
        family: lb_common::maps::FAMILY_IPV4,
        _pad: [0; 2],
    };
    assert!(m.evict_nat(&key), "the reply entry's key");
    assert_eq!(m.run(&reply()).0, Action::Pass, "without it a reply is not ours");
    // The client's next packet, past the refresh interval, puts it back.
    m.set_now(1000 * SEC + 2 * SEC);
    assert_eq!(tx(&m, &udp("10.9.0.10", "10.9.100.4", 40000, 80))[34..36], port, "same port");
    assert_eq!(m.run(&reply()).0, Action::Tx, "replies flow again");
}

#[test]
fn nat_finds_a_free_port_in_a_range_four_fifths_in_use() {
    // 1000 ports towards nat6's single backend; 800 flows take 800 distinct ports. Probes that
    // followed a fixed stride would cluster and start failing near half occupancy.
    let p = make_plan(&scenario::registry(THREE, "20000-20999", ""), &Ids::default());
    let m = Model::from_plan(&p);
    m.set_now(1000 * SEC);
    let mut ports = BTreeSet::new();
    for i in 0..800u16 {
        let client = format!("2001:db8:7::{:x}", i / 100);
        let out = tx(&m, &udp(&client, "2001:db8:100::4", 40_000 + i % 100, 80));
        assert!(ports.insert(u16::from_be_bytes([out[54], out[55]])), "flow {i} got a port in use");
    }
    assert!(ports.iter().all(|p| (20_000..=20_999).contains(p)));
    assert_eq!(m.counter(Counter::DropNatPortsExhausted), 0);
}

#[test]
fn tracked_flows_survive_table_changes_until_their_backend_leaves() {
    let (mut m, p1) = model();
    let flows: Vec<u16> = (0..60).collect();
    let before: Vec<[u8; 6]> = flows
        .iter()
        .map(|p| dst_mac(&tx(&m, &tcp("10.9.0.10", "10.9.100.1", 40000 + p, 80, TCP_SYN))))
        .collect();

    // Add a backend and drain 10.9.0.12: tracked flows stay where they are.
    let drained = THREE
        .replace("port: 80}\n      - {host: 10.9.0.13", "port: 80, weight: 0}\n      - {host: 10.9.0.13")
        + "      - {host: 10.9.0.14, port: 80}\n";
    let p2 = make_plan(&registry(&drained), &p1.ids);
    assert_eq!(p2.services["l2"][1].weight, 0, "10.9.0.12 drained");
    m.apply(&p2);
    for (p, mac) in flows.iter().zip(&before) {
        assert_eq!(
            dst_mac(&tx(&m, &tcp("10.9.0.10", "10.9.100.1", 40000 + p, 80, TCP_ACK))),
            *mac,
            "flow {p} moved"
        );
    }
    let new: BTreeSet<[u8; 6]> =
        (0..300).map(|p| dst_mac(&tx(&m, &tcp("10.9.0.10", "10.9.100.1", 45000 + p, 80, TCP_SYN)))).collect();
    assert!(!new.contains(&backend_mac(ip("10.9.0.12"))), "no new flow goes to a drained backend");
    assert!(new.contains(&backend_mac(ip("10.9.0.14"))), "new flows use the added backend");

    // Remove 10.9.0.11: only its flows move, to live backends.
    let removed = drained.replace("      - {host: 10.9.0.11, port: 80}\n", "");
    let p3 = make_plan(&registry(&removed), &p2.ids);
    m.apply(&p3);
    let gone = backend_mac(ip("10.9.0.11"));
    for (p, mac) in flows.iter().zip(&before) {
        let now = dst_mac(&tx(&m, &tcp("10.9.0.10", "10.9.100.1", 40000 + p, 80, TCP_ACK)));
        if *mac == gone {
            assert_ne!(now, gone, "a removed backend's flow moves");
        } else {
            assert_eq!(now, *mac, "other flows stay");
        }
    }
    assert_eq!(m.counter(Counter::CtMissEstablished), 0, "moved flows had entries...");
    let moved = before.iter().filter(|mac| **mac == gone).count() as u64;
    assert_eq!(m.counter(Counter::CtRebalanced), moved, "...and each was balanced again once");
}

#[test]
fn a_connection_opening_again_leaves_a_closing_flow_or_a_failing_backend() {
    let (mut m, p1) = model();
    let (client, vip) = ("10.9.0.10", "10.9.100.1");
    let sick = backend_mac(ip("10.9.0.12"));
    // Flows on 10.9.0.12: one established, one whose SYN got no answer, one closed.
    let ports: Vec<u16> = (0..400)
        .filter(|p| dst_mac(&tx(&m, &tcp(client, vip, 30000 + p, 80, TCP_SYN))) == sick)
        .take(3)
        .collect();
    assert_eq!(ports.len(), 3);
    let (established, unanswered, closed) = (30000 + ports[0], 30000 + ports[1], 30000 + ports[2]);
    tx(&m, &tcp(client, vip, established, 80, TCP_ACK));
    tx(&m, &tcp(client, vip, closed, 80, TCP_ACK));
    tx(&m, &tcp(client, vip, closed, 80, TCP_FIN | TCP_ACK));

    // A reused port after a close is a new connection, balanced by the table (which still
    // has 10.9.0.12, so it may land there again; it is counted as re-balanced).
    tx(&m, &tcp(client, vip, closed, 80, TCP_SYN));
    assert_eq!(m.counter(Counter::CtRebalanced), 1);

    // 10.9.0.12 fails its health check.
    let mut over = lb_userspace::plan::Overrides::default();
    over.down.insert(("l2".to_owned(), "10.9.0.12:80".to_owned()), "refused".to_owned());
    let reg = lb_userspace::config::parse(&registry(THREE), std::path::Path::new("t.yaml")).unwrap();
    let p2 = lb_userspace::plan::plan(&reg, &scenario::node(), &scenario::resolutions(), &p1.ids, &over).0;
    m.apply(&p2);
    assert_eq!(
        dst_mac(&tx(&m, &tcp(client, vip, established, 80, TCP_ACK))),
        sick,
        "established flows continue"
    );
    assert_ne!(
        dst_mac(&tx(&m, &tcp(client, vip, unanswered, 80, TCP_SYN))),
        sick,
        "a retransmitted SYN moves"
    );
    assert_ne!(dst_mac(&tx(&m, &tcp(client, vip, established, 80, TCP_SYN))), sick, "so does a reused port");
    assert_eq!(m.counter(Counter::CtRebalanced), 3);
}

#[test]
fn a_reload_that_changes_the_mode_rebalances_tracked_flows_into_the_new_mode() {
    let (mut m, p1) = model();
    let ack = tcp("10.9.0.10", "10.9.100.1", 40000, 80, TCP_ACK);
    tx(&m, &tcp("10.9.0.10", "10.9.100.1", 40000, 80, TCP_SYN));
    let as_nat = registry(THREE).replacen("    port: 80\n", "    port: 80\n    mode: nat\n", 1);
    let p2 = make_plan(&as_nat, &p1.ids);
    m.apply(&p2);
    let out = tx(&m, &ack);
    // Now translated: from the node's address and a NAT port, not sent on with port 0.
    let node: std::net::Ipv4Addr = scenario::NODE_V4.parse().unwrap();
    assert_eq!(out[26..30], node.octets(), "the source is the node's address");
    let sport = u16::from_be_bytes([out[34], out[35]]);
    assert!((61_000..=61_009).contains(&sport), "NAT source port {sport}");
    assert_eq!(m.counter(Counter::CtRebalanced), 1, "the dsr-l2 entry did not carry over");
    assert_eq!(tx(&m, &ack), out, "and the flow is tracked in its new mode");
}

#[test]
fn udp_entries_expire_and_tcp_misses_are_counted() {
    let (m, _) = model();
    tx(&m, &udp("10.9.0.10", "10.9.100.1", 40000, 80));
    tx(&m, &udp("10.9.0.10", "10.9.100.1", 40000, 80));
    assert_eq!(m.counter(Counter::CtCreated), 1);
    m.set_now(1000 * SEC + 31 * SEC);
    tx(&m, &udp("10.9.0.10", "10.9.100.1", 40000, 80));
    assert_eq!(m.counter(Counter::CtCreated), 2, "an idle UDP flow is forgotten after udp_timeout");
    // A mid-flow TCP segment (no SYN) without an entry: counted, then balanced and tracked.
    tx(&m, &tcp("10.9.0.10", "10.9.100.1", 41000, 80, TCP_ACK));
    assert_eq!(m.counter(Counter::CtMissEstablished), 1);
    // FIN: the entry is kept only for tcp_closing_timeout (10s).
    tx(&m, &tcp("10.9.0.10", "10.9.100.1", 41000, 80, TCP_FIN | TCP_ACK));
    m.set_now(1000 * SEC + 31 * SEC + 11 * SEC);
    tx(&m, &tcp("10.9.0.10", "10.9.100.1", 41000, 80, TCP_ACK));
    assert_eq!(m.counter(Counter::CtMissEstablished), 2, "the closed flow's entry had expired");
}

#[test]
fn icmp_echo_to_a_vip_address_is_answered() {
    let (m, _) = model();
    for (client, vip) in [("10.9.0.10", "10.9.100.1"), ("2001:db8::10", "2001:db8:100::1")] {
        let out = tx(&m, &echo_request(ip(client), ip(vip), 7, 24));
        let mut expected = echo_request(ip(vip), ip(client), 7, 24);
        expected.sport = if ip(client).is_ipv6() { 129 << 8 } else { 0 };
        expected.dst_mac = CLIENT_MAC;
        expected.src_mac = NODE_MAC;
        let expected = expected.build();
        verify(&out, ETH_HLEN).unwrap();
        let l4 = if ip(client).is_ipv6() { 54 } else { 34 };
        assert_eq!(out[l4..], expected[l4..], "echo reply payload and checksum");
        assert_eq!(out[..12], expected[..12]);
    }
    let (action, _) = m.run(&echo_request(ip("10.9.0.10"), ip("10.9.0.2"), 7, 24).build());
    assert_eq!(action, Action::Pass, "echo to the node's own address is the stack's");
    assert_eq!(m.counter(Counter::IcmpEchoReplied), 2);
}

#[test]
fn too_big_errors_reach_the_flows_backend_in_every_mode() {
    let (m, _) = model();
    // DSR: the error about the backend's reply (VIP -> client) goes to the flow's backend.
    let flow = tx(&m, &tcp("10.9.0.10", "10.9.100.1", 40000, 80, TCP_SYN));
    let reply = tcp("10.9.100.1", "10.9.0.10", 80, 40000, TCP_ACK).build();
    let err = icmp_error(ip("10.9.50.1"), ip("10.9.100.1"), 3, 4, 1400, &reply, 48);
    let out = tx(&m, &err);
    assert_eq!(dst_mac(&out), dst_mac(&flow), "same backend as the flow");
    verify(&out, ETH_HLEN).unwrap();
    // IPv6 packet too big.
    let flow6 = tx(&m, &tcp("2001:db8::10", "2001:db8:100::1", 40000, 80, TCP_SYN));
    let reply6 = tcp("2001:db8:100::1", "2001:db8::10", 80, 40000, TCP_ACK).build();
    let out6 = tx(&m, &icmp_error(ip("2001:db8:50::1"), ip("2001:db8:100::1"), 2, 0, 1280, &reply6, 100));
    assert_eq!(dst_mac(&out6), dst_mac(&flow6));
    verify(&out6, ETH_HLEN).unwrap();
    // NAT: translated to the backend's view, every checksum valid.
    let fwd = tx(&m, &udp("10.9.0.10", "10.9.100.4", 40001, 80));
    let nat_port = u16::from_be_bytes([fwd[34], fwd[35]]);
    let client_view = udp("10.9.100.4", "10.9.0.10", 80, 40001).build();
    let out = tx(&m, &icmp_error(ip("10.9.50.1"), ip("10.9.100.4"), 3, 4, 1400, &client_view, 48));
    verify(&out, ETH_HLEN).unwrap();
    let backend = &fwd[30..34];
    assert_eq!(&out[30..34], backend, "outer destination: the flow's backend");
    let q = ETH_HLEN + 20 + 8;
    assert_eq!(&out[q + 12..q + 16], backend, "quoted source: the backend");
    assert_eq!(out[q + 16..q + 20], [10, 9, 0, 2], "quoted destination: the node");
    assert_eq!(u16::from_be_bytes([out[q + 20], out[q + 21]]), 8080);
    assert_eq!(u16::from_be_bytes([out[q + 22], out[q + 23]]), nat_port);
    assert_eq!(crate_checksum(&out[q..q + 20]), [0, 0], "quoted IPv4 header checksum");
    assert_eq!(m.counter(Counter::IcmpErrorForwarded), 3);
}

fn crate_checksum(b: &[u8]) -> [u8; 2] {
    lb_tests::frames::checksum(b)
}

#[test]
fn later_fragments_follow_their_first_fragment() {
    let (m, _) = model();
    for (client, vip, id) in
        [("10.9.0.10", "10.9.100.1", 77u32), ("2001:db8::10", "2001:db8:100::1", 0x1234_5678)]
    {
        let mut first = Frame::new(ip(client), ip(vip), PROTO_UDP, 40000, 80, 64);
        first.fragment = Fragment::First(id);
        let to = dst_mac(&tx(&m, &first));
        let mut later = first.clone();
        later.fragment = Fragment::Later(id, 32);
        for _ in 0..3 {
            assert_eq!(dst_mac(&tx(&m, &later)), to, "a later fragment follows the first");
        }
        let mut stray = later.clone();
        stray.fragment = Fragment::Later(id + 1, 32);
        assert_eq!(m.run(&stray.build()).0, Action::Drop, "a later fragment of an unseen datagram");
        // The node's own fragmented traffic is not ours: all of it goes to the stack.
        let node = if ip(client).is_ipv6() { scenario::NODE_V6 } else { scenario::NODE_V4 };
        let mut own = Frame::new(ip(client), ip(node), PROTO_UDP, 40000, 53, 64);
        own.fragment = Fragment::First(id);
        let mut own_later = own.clone();
        own_later.fragment = Fragment::Later(id, 32);
        for f in [own, own_later] {
            let frame = f.build();
            assert_eq!(m.run(&frame), (Action::Pass, frame), "the node's own fragments pass unchanged");
        }
    }
    // NAT: a later fragment has its addresses translated (and the IPv4 header checksum).
    let mut first = Frame::new(ip("10.9.0.10"), ip("10.9.100.4"), PROTO_UDP, 40002, 80, 64);
    first.fragment = Fragment::First(9);
    let first_out = tx(&m, &first);
    let mut later = first.clone();
    later.fragment = Fragment::Later(9, 32);
    let out = tx(&m, &later);
    assert_eq!(out[26..34], first_out[26..34], "translated like the first fragment");
    assert_eq!(crate_checksum(&out[ETH_HLEN..ETH_HLEN + 20]), [0, 0]);
    assert_eq!(m.counter(Counter::FragmentForwarded), 7);
    assert_eq!(m.counter(Counter::DropFragmentUnknown), 2);
}

#[test]
fn unusual_frames_have_a_rule_each() {
    let (m, _) = model();
    let good = tcp("10.9.0.10", "10.9.100.1", 40000, 80, TCP_SYN);
    let mut vlan = good.build();
    vlan[12..14].copy_from_slice(&[0x81, 0x00]);
    let mut hop_by_hop = tcp("2001:db8::10", "2001:db8:100::1", 40000, 80, TCP_SYN).build();
    hop_by_hop[20] = 0;
    let mut ttl1 = good.clone();
    ttl1.ttl = 1;
    let zero_udp = Frame::new(ip("10.9.0.10"), ip("10.9.100.1"), PROTO_UDP, 40000, 80, 0);
    let mut other_mac = good.clone();
    other_mac.dst_mac = [2, 0, 0, 0, 0, 0x99];
    let mut options = good.clone();
    options.option_words = 3;
    let cases: Vec<(&str, Vec<u8>, Action, Counter)> = vec![
        ("vlan tag", vlan, Action::Pass, Counter::PassVlan),
        ("ipv6 hop-by-hop", hop_by_hop, Action::Pass, Counter::PassIpv6Ext),
        ("truncated tcp", good.build()[..ETH_HLEN + 30].to_vec(), Action::Pass, Counter::PassMalformed),
        ("ttl 1", ttl1.build(), Action::Tx, Counter::Forwarded),
        ("zero-length udp", zero_udp.build(), Action::Tx, Counter::Forwarded),
        ("ip options", options.build(), Action::Tx, Counter::Forwarded),
        ("for another mac", other_mac.build(), Action::Pass, Counter::PassNotForNode),
        (
            "not a vip",
            tcp("10.9.0.10", "10.9.0.2", 40000, 22, TCP_SYN).build(),
            Action::Pass,
            Counter::PassNotVip,
        ),
    ];
    for (name, frame, action, counter) in cases {
        let before = m.counter(counter);
        let (got, out) = m.run(&frame);
        assert_eq!(got, action, "{name}");
        assert_eq!(m.counter(counter), before + 1, "{name} counted as {}", counter.name());
        if action == Action::Pass {
            assert_eq!(out, frame, "{name}: a passed frame is never rewritten");
        }
    }
}

#[test]
fn sources_in_a_vips_deny_list_are_dropped_and_counted_and_others_pass() {
    let (m, _) = model();
    // `l2` denies 192.0.2.0/24 and 10.9.0.99; `l2v6` denies 2001:db8:9::/48; `nat` nothing.
    for (src, dst) in
        [("192.0.2.7", "10.9.100.1"), ("10.9.0.99", "10.9.100.1"), ("2001:db8:9:1::7", "2001:db8:100::1")]
    {
        for f in [tcp(src, dst, 40_000, 80, TCP_SYN), udp(src, dst, 40_000, 80)] {
            assert_eq!(m.run(&f.build()).0, Action::Drop, "{f:?}");
        }
    }
    assert_eq!(m.counter(Counter::DropDenied), 6);
    for (src, dst) in [
        ("10.9.0.98", "10.9.100.1"),
        ("192.0.3.7", "10.9.100.1"),
        ("192.0.2.7", "10.9.100.4"),
        ("2001:db8:a::7", "2001:db8:100::1"),
    ] {
        tx(&m, &tcp(src, dst, 40_000, 80, TCP_SYN));
    }
    assert_eq!(m.counter(Counter::DropDenied), 6, "nothing else denied");
}
