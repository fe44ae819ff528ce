//! Typed access to the data plane's BPF maps. The only module that writes them.

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
};
use lb_common::{
    datapath::Counter,
    maps::{self as names, Backend, NodeConfig, VipInfo, VipKey, VipStats, vip_backend_index},
};

use crate::plan::DataPlan;

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// The loaded object lacks a map this version expects.
    #[error("the eBPF object has no map `{0}`")]
    Missing(&'static str),
    /// A map exists with a different type or layout.
    #[error("map `{name}` has an unexpected type or layout")]
    Layout {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// Reading or writing a map failed.
    #[error("{op} on map `{name}`")]
    Access {
        op: &'static str,
        name: &'static str,
        #[source]
        source: MapError,
    },
}

fn take<T: TryFrom<Map, Error = MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError> {
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Layout { name, source })
}

fn access(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Access { op, name, source }
}

/// The balancer's maps, taken out of the loaded object.
pub struct DataplaneMaps {
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_backends: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    node: Array<MapData, NodeConfig>,
    counters: PerCpuArray<MapData, u64>,
    vip_stats: PerCpuArray<MapData, VipStats>,
}

impl DataplaneMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        Ok(Self {
            vips: take(ebpf, names::VIPS)?,
            vip_backends: take(ebpf, names::VIP_BACKENDS)?,
            backends: take(ebpf, names::BACKENDS)?,
            node: take(ebpf, names::NODE)?,
            counters: take(ebpf, names::COUNTERS)?,
            vip_stats: take(ebpf, names::VIP_STATS)?,
        })
    }

    /// Writes `plan` into freshly loaded maps. Written in dependency order (node, backends,
    /// lists, VIPs), so a packet that finds a VIP also finds what the VIP points at.
    pub fn apply(&mut self, plan: &DataPlan) -> Result<(), MapsError> {
        self.node.set(0, plan.node, 0).map_err(access("set", names::NODE))?;
        for (id, b) in (0u32..).zip(&plan.backends) {
            self.backends.set(id, b, 0).map_err(access("set", names::BACKENDS))?;
        }
        for vip in &plan.vips {
            for (slot, id) in (0u32..).zip(&vip.backend_ids) {
                self.vip_backends
                    .set(vip_backend_index(vip.info.id, slot), id, 0)
                    .map_err(access("set", names::VIP_BACKENDS))?;
            }
        }
        for vip in &plan.vips {
            self.vips.insert(vip.key, vip.info, 0).map_err(access("insert", names::VIPS))?;
        }
        Ok(())
    }

    /// Global counters summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, MapsError> {
        Counter::ALL
            .iter()
            .map(|&c| {
                let per_cpu = self.counters.get(&(c as u32), 0).map_err(access("get", names::COUNTERS))?;
                Ok((c, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Traffic forwarded for the VIP entry `id`, summed over CPUs.
    pub fn vip_stats(&self, id: u32) -> Result<VipStats, MapsError> {
        let per_cpu = self.vip_stats.get(&id, 0).map_err(access("get", names::VIP_STATS))?;
        Ok(per_cpu.iter().fold(VipStats::default(), |acc, s| VipStats {
            packets: acc.packets + s.packets,
            bytes: acc.bytes + s.bytes,
        }))
    }
}
