//! Reloads replace a service's Maglev table whole, as a new inner map swapped into its slot,
//! and leave every other service's table map as it was: a packet never sees a half-written
//! table, and updating one VIP does not touch another.

use lb_common::{datapath::Action, maps::PROTO_TCP};
use lb_tests::{
    frames::{Frame, TCP_SYN},
    privileged,
    scenario::{self, THREE},
};
use lb_userspace::{loader::Balancer, plan::Ids};

const NAT_PORTS: &str = "61000-61999";

#[test]
fn a_reload_swaps_only_the_changed_services_table() {
    if !privileged("a_reload_swaps_only_the_changed_services_table") {
        return;
    }
    let first = scenario::plan(&scenario::registry(THREE, NAT_PORTS, ""), &Ids::default());
    let (mut lb, mut maps) = Balancer::load(1 << 12).expect("load the XDP object");
    maps.apply(&first).expect("apply");
    let slots: Vec<(String, u32)> = first.tables.iter().map(|(slot, t)| (t.service.clone(), *slot)).collect();
    let ids_before: Vec<u32> =
        slots.iter().map(|(_, slot)| maps.table_map_id(*slot).unwrap().expect("a table")).collect();

    // Only the `l2` service changes: one of its three backends leaves.
    let two = "      - {host: 10.9.0.11, port: 80}\n      - {host: 10.9.0.12, port: 80}\n";
    let second = scenario::plan(&scenario::registry(two, NAT_PORTS, ""), &first.ids);
    maps.apply(&second).expect("apply the reload");
    for ((service, slot), before) in slots.iter().zip(&ids_before) {
        let after = maps.table_map_id(*slot).unwrap().expect("a table");
        if service == "l2" {
            assert_ne!(after, *before, "the changed service gets a new table map");
        } else {
            assert_eq!(after, *before, "`{service}`'s table must not be touched");
        }
    }
    // The new table is complete and in use: new flows reach only the two remaining backends.
    let reached: std::collections::BTreeSet<[u8; 6]> = (0..200u16)
        .map(|i| {
            let mut f = Frame::new(
                "10.9.0.10".parse().unwrap(),
                "10.9.100.1".parse().unwrap(),
                PROTO_TCP,
                20_000 + i,
                80,
                0,
            );
            f.flags = TCP_SYN;
            let r = lb.test_run(&f.build(), 1).expect("test run");
            assert_eq!(r.action, Action::Tx);
            r.frame[..6].try_into().unwrap()
        })
        .collect();
    let remaining: std::collections::BTreeSet<[u8; 6]> =
        ["10.9.0.11", "10.9.0.12"].iter().map(|a| scenario::backend_mac(a.parse().unwrap())).collect();
    assert_eq!(reached, remaining);
}
