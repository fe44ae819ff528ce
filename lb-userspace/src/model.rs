//! The reference model of the data plane: the maps a [`DataPlan`] writes, held in memory behind
//! the same [`Tables`] trait the XDP program reads through, with the kernel maps' semantics
//! (arrays read zeroes at unset indices and nothing past their size; insert-if-absent; stats
//! only within bounds).
//!
//! Running `lb_common::datapath::process` over this model says what the kernel must do with a
//! frame; tests compare the two through `BPF_PROG_TEST_RUN`.

use std::{
    cell::{Cell, RefCell},
    collections::{HashMap, HashSet},
};

use lb_common::{
    datapath::{self, Action, Counter, Scratch, Tables},
    maps::{
        AddrKey, BACKEND_IDS, Backend, CtEntry, DenyKey, FlowKey, FragEntry, FragKey, NatEntry, NodeConfig,
        Traffic, VIP_IDS, VipInfo, VipKey,
    },
    packet::{BytesPacket, XDP_HEADROOM},
};

use crate::plan::DataPlan;

/// In-memory maps with the contents [`crate::maps::DataplaneMaps::apply`] writes, plus the
/// state the data plane itself keeps (connection tracking, NAT, fragments, counters).
#[derive(Debug)]
pub struct Model {
    node: NodeConfig,
    vips: HashMap<VipKey, VipInfo>,
    vip_addrs: HashSet<AddrKey>,
    deny: Vec<crate::plan::DenyRange>,
    tables: HashMap<u32, Vec<u32>>,
    backends: Vec<Backend>,
    ct: RefCell<HashMap<FlowKey, CtEntry>>,
    nat: RefCell<HashMap<FlowKey, NatEntry>>,
    frags: RefCell<HashMap<FragKey, FragEntry>>,
    counters: RefCell<Vec<u64>>,
    vip_stats: RefCell<HashMap<u32, Traffic>>,
    backend_stats: RefCell<HashMap<u32, Traffic>>,
    now: Cell<u64>,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            node: NodeConfig::default(),
            vips: HashMap::new(),
            vip_addrs: HashSet::new(),
            deny: Vec::new(),
            tables: HashMap::new(),
            backends: vec![Backend::default(); BACKEND_IDS as usize],
            ct: RefCell::default(),
            nat: RefCell::default(),
            frags: RefCell::default(),
            counters: RefCell::new(vec![0; Counter::COUNT as usize]),
            vip_stats: RefCell::default(),
            backend_stats: RefCell::default(),
            now: Cell::new(0),
        }
    }
}

impl Model {
    #[must_use]
    pub fn from_plan(plan: &DataPlan) -> Self {
        let mut m = Self::default();
        m.apply(plan);
        m
    }

    /// Takes a new plan as `DataplaneMaps::apply` does: configuration replaced, flow state kept;
    /// backends that leave are marked not alive.
    pub fn apply(&mut self, plan: &DataPlan) {
        self.node = plan.node;
        self.vips = plan.vips.iter().map(|v| (v.key, v.info)).collect();
        self.vip_addrs = plan.vip_addrs.iter().copied().collect();
        self.deny = plan.deny.iter().copied().collect();
        self.tables = plan.tables.iter().map(|(slot, t)| (*slot, t.slots())).collect();
        for (id, b) in (0u32..).zip(self.backends.iter_mut()) {
            if let Some(new) = plan.backends.get(&id) {
                *b = *new;
            } else {
                b.flags = 0;
            }
        }
    }

    /// Sets the model's clock (the kernel's `bpf_ktime_get_ns`).
    pub fn set_now(&self, ns: u64) {
        self.now.set(ns);
    }

    /// Runs the datapath on `frame`: the verdict and the frame as it leaves.
    #[must_use]
    pub fn run(&self, frame: &[u8]) -> (Action, Vec<u8>) {
        let mut buf = vec![0u8; XDP_HEADROOM + frame.len()];
        buf[XDP_HEADROOM..].copy_from_slice(frame);
        let end = buf.len();
        let mut pkt = BytesPacket::new(&mut buf, XDP_HEADROOM, end);
        let action = datapath::process(&mut pkt, self, &mut Scratch::default());
        (action, pkt.frame().to_vec())
    }

    #[must_use]
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.borrow()[c as usize]
    }

    #[must_use]
    pub fn vip_stats(&self, vip_id: u32) -> Traffic {
        self.vip_stats.borrow().get(&vip_id).copied().unwrap_or_default()
    }

    #[must_use]
    pub fn backend_stats(&self, id: u32) -> Traffic {
        self.backend_stats.borrow().get(&id).copied().unwrap_or_default()
    }

    /// The tracked flow `key`, if any.
    #[must_use]
    pub fn conntrack(&self, key: &FlowKey) -> Option<CtEntry> {
        self.ct.borrow().get(key).copied()
    }

    /// Drops NAT reply entry `key`, as the kernel's LRU may when the map is full; true if it
    /// was there.
    pub fn evict_nat(&self, key: &FlowKey) -> bool {
        self.nat.borrow_mut().remove(key).is_some()
    }
}

fn add(stats: &RefCell<HashMap<u32, Traffic>>, id: u32, max: u32, bytes: u64) {
    if id < max {
        let mut s = stats.borrow_mut();
        let t = s.entry(id).or_default();
        t.packets += 1;
        t.bytes += bytes;
    }
}

impl Tables for Model {
    fn now_ns(&self) -> u64 {
        self.now.get()
    }

    fn node(&self) -> Option<&NodeConfig> {
        Some(&self.node)
    }

    fn vip(&self, key: &VipKey) -> Option<&VipInfo> {
        self.vips.get(key)
    }

    fn is_vip_addr(&self, key: &AddrKey) -> bool {
        self.vip_addrs.contains(key)
    }

    fn denied(&self, key: &DenyKey) -> bool {
        self.deny.iter().any(|r| r.key.covers(r.bits, key))
    }

    fn table_slot(&self, table: u32, slot: u32) -> Option<u32> {
        self.tables.get(&table).and_then(|t| t.get(slot as usize)).copied()
    }

    fn backend(&self, id: u32) -> Option<&Backend> {
        self.backends.get(id as usize)
    }

    fn ct_get(&self, key: &FlowKey) -> Option<CtEntry> {
        self.ct.borrow().get(key).copied()
    }

    fn ct_put(&self, key: &FlowKey, value: &CtEntry) {
        self.ct.borrow_mut().insert(*key, *value);
    }

    fn ct_update(&self, key: &FlowKey, f: impl FnOnce(&mut CtEntry)) -> bool {
        self.ct.borrow_mut().get_mut(key).map(f).is_some()
    }

    fn nat_get(&self, key: &FlowKey) -> Option<NatEntry> {
        self.nat.borrow().get(key).copied()
    }

    fn nat_insert_new(&self, key: &FlowKey, value: &NatEntry) -> bool {
        let mut nat = self.nat.borrow_mut();
        if nat.contains_key(key) {
            return false;
        }
        nat.insert(*key, *value);
        true
    }

    fn nat_put(&self, key: &FlowKey, value: &NatEntry) {
        self.nat.borrow_mut().insert(*key, *value);
    }

    fn nat_update(&self, key: &FlowKey, f: impl FnOnce(&mut NatEntry)) -> bool {
        self.nat.borrow_mut().get_mut(key).map(f).is_some()
    }

    fn frag_get(&self, key: &FragKey) -> Option<FragEntry> {
        self.frags.borrow().get(key).copied()
    }

    fn frag_put(&self, key: &FragKey, value: &FragEntry) {
        self.frags.borrow_mut().insert(*key, *value);
    }

    fn count(&self, counter: Counter) {
        self.counters.borrow_mut()[counter as usize] += 1;
    }

    fn count_vip(&self, vip_id: u32, bytes: u64) {
        add(&self.vip_stats, vip_id, VIP_IDS, bytes);
    }

    fn count_backend(&self, backend: u32, bytes: u64) {
        add(&self.backend_stats, backend, BACKEND_IDS, bytes);
    }
}

/// A read-only view of a plan (and of one flow's conntrack entry, read from the kernel)
/// behind [`Tables`], so questions about the data plane are answered by the datapath's own
/// functions. Writes are ignored.
pub struct PlanView<'a> {
    plan: &'a DataPlan,
    /// The one table the question needs, built (plans hold tables' inputs only).
    table: (u32, &'a [u32]),
    flow: Option<(FlowKey, CtEntry)>,
    now: u64,
}

impl<'a> PlanView<'a> {
    /// `plan` as the maps hold it, with the slots of table `table.0`, `flow`'s conntrack
    /// entry, at monotonic time `now`.
    #[must_use]
    pub fn new(
        plan: &'a DataPlan,
        table: (u32, &'a [u32]),
        flow: Option<(FlowKey, CtEntry)>,
        now: u64,
    ) -> Self {
        Self { plan, table, flow, now }
    }
}

impl Tables for PlanView<'_> {
    fn now_ns(&self) -> u64 {
        self.now
    }

    fn node(&self) -> Option<&NodeConfig> {
        Some(&self.plan.node)
    }

    fn vip(&self, key: &VipKey) -> Option<&VipInfo> {
        self.plan.vips.iter().find(|v| v.key == *key).map(|v| &v.info)
    }

    fn is_vip_addr(&self, key: &AddrKey) -> bool {
        self.plan.vip_addrs.contains(key)
    }

    fn denied(&self, key: &DenyKey) -> bool {
        self.plan.deny.iter().any(|r| r.key.covers(r.bits, key))
    }

    fn table_slot(&self, table: u32, slot: u32) -> Option<u32> {
        (table == self.table.0).then(|| self.table.1.get(slot as usize).copied()).flatten()
    }

    fn backend(&self, id: u32) -> Option<&Backend> {
        self.plan.backends.get(&id)
    }

    fn ct_get(&self, key: &FlowKey) -> Option<CtEntry> {
        self.flow.filter(|(k, _)| k == key).map(|(_, e)| e)
    }

    fn ct_put(&self, _: &FlowKey, _: &CtEntry) {}

    fn ct_update(&self, _: &FlowKey, _: impl FnOnce(&mut CtEntry)) -> bool {
        false
    }

    fn nat_get(&self, _: &FlowKey) -> Option<NatEntry> {
        None
    }

    fn nat_insert_new(&self, _: &FlowKey, _: &NatEntry) -> bool {
        false
    }

    fn nat_put(&self, _: &FlowKey, _: &NatEntry) {}

    fn nat_update(&self, _: &FlowKey, _: impl FnOnce(&mut NatEntry)) -> bool {
        false
    }

    fn frag_get(&self, _: &FragKey) -> Option<FragEntry> {
        None
    }

    fn frag_put(&self, _: &FragKey, _: &FragEntry) {}

    fn count(&self, _: Counter) {}

    fn count_vip(&self, _: u32, _: u64) {}

    fn count_backend(&self, _: u32, _: u64) {}
}
