//! Reloads at the map level: a service's Maglev table is replaced whole, as a new inner map
//! swapped into its slot, and every other service's table map is left as it was; packets keep
//! being forwarded while tables are swapped over and over; and a reload whose writes fail
//! midway is undone, leaving the maps as they were.

use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicBool, Ordering},
};

use lb_common::{
    datapath::Action,
    maps::{PROTO_TCP, VIP_IDS, VipKey},
};
use lb_tests::{
    frames::{Frame, TCP_SYN},
    privileged,
    scenario::{self, THREE},
};
use lb_userspace::{
    loader::Balancer,
    maps::DataplaneMaps,
    plan::{DataPlan, Ids},
};

const NAT_PORTS: &str = "61000-61999";
const TWO: &str = "      - {host: 10.9.0.11, port: 80}\n      - {host: 10.9.0.12, port: 80}\n";

fn plan(l2_backends: &str, prev: &Ids) -> DataPlan {
    scenario::plan(&scenario::registry(l2_backends, NAT_PORTS, ""), prev)
}

/// The MAC each of `flows` SYNs to the `l2` VIP is sent to.
fn l2_macs(lb: &mut Balancer, flows: std::ops::Range<u16>) -> BTreeSet<[u8; 6]> {
    flows
        .map(|port| {
            let mut f = Frame::new(
                "10.9.0.10".parse().unwrap(),
                "10.9.100.1".parse().unwrap(),
                PROTO_TCP,
                port,
                80,
                0,
            );
            f.flags = TCP_SYN;
            let r = lb.test_run(&f.build(), 1).expect("test run");
            assert_eq!(r.action, Action::Tx, "flow from port {port}");
            r.frame[..6].try_into().unwrap()
        })
        .collect()
}

fn macs(hosts: &[&str]) -> BTreeSet<[u8; 6]> {
    hosts.iter().map(|a| scenario::backend_mac(a.parse().unwrap())).collect()
}

fn table_ids(maps: &DataplaneMaps, plan: &DataPlan) -> Vec<(String, u32)> {
    (plan.tables.iter())
        .map(|(slot, t)| (t.service.clone(), maps.table_map_id(*slot).unwrap().expect("a table")))
        .collect()
}

#[test]
fn a_reload_swaps_only_the_changed_services_table() {
    if !privileged("a_reload_swaps_only_the_changed_services_table") {
        return;
    }
    let first = plan(THREE, &Ids::default());
    let (mut lb, mut maps, _) = Balancer::load(1 << 12, None).expect("load the XDP object");
    maps.apply(&first).expect("apply");
    let before = table_ids(&maps, &first);

    // Only the `l2` service changes: one of its three backends leaves.
    let second = plan(TWO, &first.ids);
    maps.apply(&second).expect("apply the reload");
    for ((service, old), (_, new)) in before.iter().zip(table_ids(&maps, &second)) {
        if service == "l2" {
            assert_ne!(new, *old, "the changed service gets a new table map");
        } else {
            assert_eq!(new, *old, "`{service}`'s table must not be touched");
        }
    }
    // The new table is complete and in use: new flows reach only the two remaining backends.
    assert_eq!(l2_macs(&mut lb, 20_000..20_200), macs(&["10.9.0.11", "10.9.0.12"]));
}

#[test]
fn packets_are_forwarded_throughout_repeated_table_swaps() {
    if !privileged("packets_are_forwarded_throughout_repeated_table_swaps") {
        return;
    }
    let three = plan(THREE, &Ids::default());
    let two = plan(TWO, &three.ids);
    let (mut lb, mut maps, _) = Balancer::load(1 << 16, None).expect("load the XDP object");
    maps.apply(&three).expect("apply");
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        // New flows (a table lookup each) while the main thread swaps the table back and forth:
        // a slot that were ever empty or half-written would drop or misdirect some of them.
        let sender = s.spawn(|| {
            let mut seen = BTreeSet::new();
            let mut port = 1024u16;
            while !done.load(Ordering::Acquire) && port < 60_000 {
                seen.extend(l2_macs(&mut lb, port..port + 50));
                port += 50;
            }
            seen
        });
        for i in 0..200 {
            maps.apply(if i % 2 == 0 { &two } else { &three }).expect("swap");
        }
        done.store(true, Ordering::Release);
        let seen = sender.join().expect("sender");
        assert!(seen.is_subset(&macs(&["10.9.0.11", "10.9.0.12", "10.9.0.13"])), "{seen:02x?}");
    });
}

#[test]
fn a_reload_that_fails_midway_is_undone() {
    if !privileged("a_reload_that_fails_midway_is_undone") {
        return;
    }
    let first = plan(THREE, &Ids::default());
    let (mut lb, mut maps, _) = Balancer::load(1 << 12, None).expect("load the XDP object");
    maps.apply(&first).expect("apply");
    let before = table_ids(&maps, &first);

    // A reload that changes `l2`'s table and then adds an entry whose stats slot is out of
    // range: the failure comes after backends and tables were written.
    let mut broken = plan(TWO, &first.ids);
    let mut bogus = broken.vips[0].clone();
    bogus.key = VipKey::new("10.9.100.99".parse().unwrap(), 80, PROTO_TCP);
    bogus.info.id = VIP_IDS + 1;
    broken.vips.push(bogus);
    assert!(maps.apply(&broken).is_err(), "the broken plan is refused");

    assert_eq!(table_ids(&maps, &first), before, "every table map is back in its slot");
    let applied = maps.applied().expect("a plan is applied");
    assert_eq!(
        (&applied.vips, &applied.tables, &applied.backends),
        (&first.vips, &first.tables, &first.backends)
    );
    assert_eq!(l2_macs(&mut lb, 30_000..30_300), macs(&["10.9.0.11", "10.9.0.12", "10.9.0.13"]));

    // The next reload starts from there and succeeds.
    let second = plan(TWO, &applied.ids.clone());
    maps.apply(&second).expect("apply");
    assert_eq!(l2_macs(&mut lb, 40_000..40_200), macs(&["10.9.0.11", "10.9.0.12"]));
}
