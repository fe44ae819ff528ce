//! The reference model of the data plane: the maps a [`DataPlan`] writes, held in memory
//! behind the same [`Tables`] trait the XDP program reads through.
//!
//! Running `lb_common::datapath::process` over this model says what the kernel must do with
//! a frame; tests compare the two through `BPF_PROG_TEST_RUN`.

use std::{cell::RefCell, collections::HashMap};

use lb_common::{
    datapath::{Counter, Tables},
    maps::{
        Backend, MAX_BACKENDS, MAX_BACKENDS_PER_VIP, MAX_VIPS, NodeConfig, VipInfo, VipKey, VipStats,
        vip_backend_index,
    },
};

use crate::plan::DataPlan;

/// In-memory maps with the contents [`crate::maps::DataplaneMaps::apply`] writes.
#[derive(Debug, Default)]
pub struct Model {
    vips: HashMap<VipKey, VipInfo>,
    vip_backends: HashMap<u32, u32>,
    backends: Vec<Backend>,
    node: Option<NodeConfig>,
    counters: RefCell<[u64; Counter::COUNT as usize]>,
    vip_stats: RefCell<HashMap<u32, VipStats>>,
}

impl Model {
    #[must_use]
    pub fn from_plan(plan: &DataPlan) -> Self {
        let mut vip_backends = HashMap::new();
        for vip in &plan.vips {
            for (slot, id) in (0u32..).zip(&vip.backend_ids) {
                vip_backends.insert(vip_backend_index(vip.info.id, slot), *id);
            }
        }
        Self {
            vips: plan.vips.iter().map(|v| (v.key, v.info)).collect(),
            vip_backends,
            backends: plan.backends.clone(),
            node: Some(plan.node),
            ..Self::default()
        }
    }

    #[must_use]
    pub fn counter(&self, c: Counter) -> u64 {
        self.counters.borrow()[c as usize]
    }

    #[must_use]
    pub fn vip_stats(&self, vip_id: u32) -> VipStats {
        self.vip_stats.borrow().get(&vip_id).copied().unwrap_or_default()
    }
}

impl Tables for Model {
    fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        self.vips.get(key).copied()
    }

    // Array maps hold every index below their size; unset entries read as zeroes.
    fn vip_backend(&self, index: u32) -> Option<u32> {
        (index < MAX_VIPS * MAX_BACKENDS_PER_VIP).then(|| self.vip_backends.get(&index).copied().unwrap_or(0))
    }

    fn backend(&self, id: u32) -> Option<Backend> {
        (id < MAX_BACKENDS).then(|| self.backends.get(id as usize).copied().unwrap_or_default())
    }

    fn node(&self) -> Option<NodeConfig> {
        self.node
    }

    fn count(&self, counter: Counter) {
        self.counters.borrow_mut()[counter as usize] += 1;
    }

    fn count_vip(&self, vip_id: u32, bytes: u64) {
        let mut stats = self.vip_stats.borrow_mut();
        let s = stats.entry(vip_id).or_default();
        s.packets += 1;
        s.bytes += bytes;
    }
}
