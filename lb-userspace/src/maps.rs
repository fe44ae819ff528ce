//! Typed access to the data plane's BPF maps. The only module that writes them.
//!
//! [`DataplaneMaps::apply`] moves the maps from the last applied plan to a new one, writing only
//! what changed, in an order that keeps every packet consistent:
//! node -> backend records -> Maglev tables (each a new inner map, swapped into its slot in one
//! update) -> VIP entries -> removals (VIPs, tables, then backends marked not alive, so their
//! tracked flows move to live backends). New tables are built before anything is written, and a
//! write that fails is undone by writing the previous plan back, so a failed apply leaves the
//! maps as they were.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
};

use aya::{
    Ebpf,
    maps::{
        Array, ArrayOfMaps, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::Key,
    },
};
use lb_common::{
    datapath::Counter,
    maps::{
        self as names, AddrKey, BACKEND_IDS, BPF_F_INNER_MAP, Backend, CtEntry, DenyKey, FlowKey, MAX_TABLES,
        NodeConfig, Traffic, VipInfo, VipKey,
    },
};

use crate::plan::{DataPlan, DenyRange, KernelState, TablePlan};

/// `BPF_F_MMAPABLE`: tables are filled through a memory mapping, not a syscall per slot.
const BPF_F_MMAPABLE: u32 = 1024;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// Array map elements are 8-byte aligned in the kernel's memory (and in the mapping).
const ARRAY_ELEM_SIZE: usize = 8;

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
    /// A map that must be an array of maps is not one.
    #[error("map `{0}` is not an array of maps")]
    NotArrayOfMaps(&'static str),
    /// Reading or writing a map failed.
    #[error("{op} on map `{name}`")]
    Access {
        op: &'static str,
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// An apply failed and writing the previous plan back failed too: the maps hold neither.
    #[error("applying the plan failed ({apply}), and so did restoring the previous one")]
    Inconsistent {
        apply: Box<MapsError>,
        #[source]
        undo: Box<MapsError>,
    },
    /// Creating or filling a Maglev table failed.
    #[error("building the Maglev table of service `{service}`")]
    Table {
        service: String,
        #[source]
        source: io::Error,
    },
}

fn take<T: TryFrom<Map, Error = MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, MapsError> {
    let map = ebpf.take_map(name).ok_or(MapsError::Missing(name))?;
    T::try_from(map).map_err(|source| MapsError::Layout { name, source })
}

impl MapsError {
    /// The maps hold neither the plan asked for nor the one before: serving on would forward
    /// by accident.
    #[must_use]
    pub const fn is_inconsistent(&self) -> bool {
        matches!(self, Self::Inconsistent { .. })
    }
}

fn access(op: &'static str, name: &'static str) -> impl FnOnce(MapError) -> MapsError {
    move |source| MapsError::Access { op, name, source }
}

/// The balancer's maps, taken out of the loaded object, and what was last written to them.
pub struct DataplaneMaps {
    vips: HashMap<MapData, VipKey, VipInfo>,
    vip_addrs: HashMap<MapData, AddrKey, u32>,
    deny: LpmTrie<MapData, DenyKey, u32>,
    tables: ArrayOfMaps<MapData, MapData>,
    /// A duplicate of the tables map's fd, for deletes (aya has none for arrays of maps).
    tables_fd: OwnedFd,
    backends: Array<MapData, Backend>,
    node: Array<MapData, NodeConfig>,
    counters: PerCpuArray<MapData, u64>,
    vip_stats: PerCpuArray<MapData, Traffic>,
    backend_stats: PerCpuArray<MapData, Traffic>,
    /// Read only (the datapath writes it): for lookups.
    conntrack: HashMap<MapData, FlowKey, CtEntry>,
    applied: Option<DataPlan>,
}

impl DataplaneMaps {
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, MapsError> {
        let tables = ebpf.take_map(names::TABLES).ok_or(MapsError::Missing(names::TABLES))?;
        let tables_fd = match &tables {
            Map::ArrayOfMaps(data) => {
                data.fd().as_fd().try_clone_to_owned().map_err(|e| syscall_error("dup", names::TABLES, e))?
            }
            _ => return Err(MapsError::NotArrayOfMaps(names::TABLES)),
        };
        Ok(Self {
            vips: take(ebpf, names::VIPS)?,
            vip_addrs: take(ebpf, names::VIP_ADDRS)?,
            deny: take(ebpf, names::DENY)?,
            tables: ArrayOfMaps::try_from(tables)
                .map_err(|source| MapsError::Layout { name: names::TABLES, source })?,
            tables_fd,
            backends: take(ebpf, names::BACKENDS)?,
            node: take(ebpf, names::NODE)?,
            counters: take(ebpf, names::COUNTERS)?,
            vip_stats: take(ebpf, names::VIP_STATS)?,
            backend_stats: take(ebpf, names::BACKEND_STATS)?,
            conntrack: take(ebpf, names::CONNTRACK)?,
            applied: None,
        })
    }

    /// Reads what an earlier lbd left in the (pinned) maps.
    pub fn read_kernel(&self) -> Result<KernelState, MapsError> {
        let vips =
            (self.vips.iter()).collect::<Result<Vec<_>, _>>().map_err(access("iterate", names::VIPS))?;
        let vip_addrs =
            (self.vip_addrs.keys()).collect::<Result<_, _>>().map_err(access("iterate", names::VIP_ADDRS))?;
        let deny = (self.deny.keys())
            .map(|k| {
                let k = k.map_err(access("iterate", names::DENY))?;
                Ok(DenyRange { key: k.data(), bits: k.prefix_len().saturating_sub(DenyKey::prefix_len(0)) })
            })
            .collect::<Result<_, MapsError>>()?;
        let mut tables = BTreeSet::new();
        for slot in 0..MAX_TABLES {
            match self.tables.get(&slot, 0) {
                Ok(_) => {
                    tables.insert(slot);
                }
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(access("get", names::TABLES)(e)),
            }
        }
        let mut backends = BTreeMap::new();
        for id in 0..BACKEND_IDS {
            let b = self.backends.get(&id, 0).map_err(access("get", names::BACKENDS))?;
            if b != Backend::default() {
                backends.insert(id, b);
            }
        }
        let node = self.node.get(&0, 0).map_err(access("get", names::NODE))?;
        Ok(KernelState { node, vips, vip_addrs, deny, tables, backends })
    }

    /// Takes `plan` as what the maps hold (adopted from an earlier lbd), so the next apply
    /// writes only the difference.
    pub fn assume(&mut self, plan: DataPlan) {
        self.applied = Some(plan);
    }

    /// The plan these maps hold, once one was applied.
    #[must_use]
    pub fn applied(&self) -> Option<&DataPlan> {
        self.applied.as_ref()
    }

    /// Makes the maps hold `plan`, writing only what differs from the last applied plan. On
    /// failure the maps hold the last applied plan again, or, if even that cannot be written
    /// back, [`MapsError::Inconsistent`] says so.
    pub fn apply(&mut self, plan: &DataPlan) -> Result<(), MapsError> {
        let prev = self.applied.take();
        let tables = match build_tables(prev.as_ref(), plan) {
            Ok(t) => t,
            Err(e) => {
                self.applied = prev;
                return Err(e);
            }
        };
        // The tables being replaced or removed, to put back if a later write fails.
        let removed = prev.iter().flat_map(|p| p.tables.keys()).filter(|s| !plan.tables.contains_key(s));
        let replaced: Vec<(u32, MapData)> = (tables.iter().map(|(slot, _)| slot).chain(removed))
            .filter_map(|slot| Some((*slot, self.tables.get(slot, 0).ok()?)))
            .collect();
        match self.write(prev.as_ref(), plan, &tables) {
            Ok(()) => {
                self.applied = Some(plan.clone());
                Ok(())
            }
            Err(e) => {
                let Some(mut prev) = prev else { return Err(e) };
                if let Err(undo) = self.write(Some(plan), &prev, &replaced) {
                    return Err(MapsError::Inconsistent { apply: Box::new(e), undo: Box::new(undo) });
                }
                prev.ids.merge_generations(&plan.ids);
                self.applied = Some(prev);
                Err(e)
            }
        }
    }

    /// Writes what `plan` holds and `prev` does not (all of it without `prev`), the new tables
    /// given ready-built, then removes what only `prev` holds. Removals tolerate entries that are
    /// already gone, so writing back after a half-done write works.
    fn write(
        &mut self,
        prev: Option<&DataPlan>,
        plan: &DataPlan,
        tables: &[(u32, MapData)],
    ) -> Result<(), MapsError> {
        let no_backends = BTreeMap::new();
        let prev_backends: &BTreeMap<u32, Backend> = prev.map_or(&no_backends, |p| &p.backends);

        if prev.is_none_or(|p| p.node != plan.node) {
            self.node.set(0, plan.node, 0).map_err(access("set", names::NODE))?;
        }
        for (&id, b) in &plan.backends {
            if prev_backends.get(&id) != Some(b) {
                if !prev_backends.contains_key(&id) {
                    zero_stats(&mut self.backend_stats, id, names::BACKEND_STATS)?;
                }
                self.backends.set(id, b, 0).map_err(access("set", names::BACKENDS))?;
            }
        }
        // One batch: the kernel waits for running programs (an RCU grace period, ~10 ms) once
        // per map-in-map update call, so a reload touching many tables waits once, not per table.
        if !tables.is_empty() && update_batch(&self.tables_fd, tables).is_err() {
            for (slot, inner) in tables {
                self.tables.set(*slot, inner, 0).map_err(access("set", names::TABLES))?;
            }
        }
        let prev_vips: BTreeMap<VipKey, VipInfo> =
            prev.iter().flat_map(|p| &p.vips).map(|v| (v.key, v.info)).collect();
        for v in &plan.vips {
            match prev_vips.get(&v.key) {
                Some(info) if *info == v.info => continue,
                Some(info) if info.id == v.info.id => {}
                _ => zero_stats(&mut self.vip_stats, v.info.id, names::VIP_STATS)?,
            }
            self.vips.insert(v.key, v.info, 0).map_err(access("insert", names::VIPS))?;
        }
        for a in &plan.vip_addrs {
            if prev.is_none_or(|p| !p.vip_addrs.contains(a)) {
                self.vip_addrs.insert(a, 0, 0).map_err(access("insert", names::VIP_ADDRS))?;
            }
        }
        for r in &plan.deny {
            if prev.is_none_or(|p| !p.deny.contains(r)) {
                let key = Key::new(r.prefix_len(), r.key);
                self.deny.insert(&key, 0, 0).map_err(access("insert", names::DENY))?;
            }
        }

        // Removals, after everything new is in place.
        if let Some(prev) = prev {
            for v in prev.vips.iter().filter(|v| !plan.vips.iter().any(|n| n.key == v.key)) {
                gone_ok(self.vips.remove(&v.key)).map_err(access("remove", names::VIPS))?;
            }
            for a in prev.vip_addrs.difference(&plan.vip_addrs) {
                gone_ok(self.vip_addrs.remove(a)).map_err(access("remove", names::VIP_ADDRS))?;
            }
            for r in prev.deny.difference(&plan.deny) {
                let key = Key::new(r.prefix_len(), r.key);
                gone_ok(self.deny.remove(&key)).map_err(access("remove", names::DENY))?;
            }
            for slot in prev.tables.keys().filter(|s| !plan.tables.contains_key(s)) {
                delete_elem(&self.tables_fd, *slot).map_err(|e| syscall_error("delete", names::TABLES, e))?;
            }
            for (&id, b) in prev.backends.iter().filter(|(id, _)| !plan.backends.contains_key(id)) {
                let gone = Backend { flags: 0, ..*b };
                self.backends.set(id, gone, 0).map_err(access("set", names::BACKENDS))?;
            }
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

    /// Traffic forwarded for VIP entry `id`, summed over CPUs.
    pub fn vip_stats(&self, id: u32) -> Result<Traffic, MapsError> {
        sum(&self.vip_stats, id, names::VIP_STATS)
    }

    /// The kernel's id of the table map in `slot`, if any: a table replaced by a reload gets a
    /// new id, one left alone keeps its id.
    pub fn table_map_id(&self, slot: u32) -> Result<Option<u32>, MapsError> {
        match self.tables.get(&slot, 0) {
            Ok(inner) => Ok(Some(inner.info().map_err(access("read info of", names::TABLES))?.id())),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(access("get", names::TABLES)(e)),
        }
    }

    /// The conntrack entry of `flow`, if tracked (expired entries included).
    pub fn conntrack(&self, flow: &FlowKey) -> Result<Option<CtEntry>, MapsError> {
        match self.conntrack.get(flow, 0) {
            Ok(e) => Ok(Some(e)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(access("get", names::CONNTRACK)(e)),
        }
    }

    /// Traffic forwarded to backend `id`, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<Traffic, MapsError> {
        sum(&self.backend_stats, id, names::BACKEND_STATS)
    }
}

fn sum(map: &PerCpuArray<MapData, Traffic>, id: u32, name: &'static str) -> Result<Traffic, MapsError> {
    let per_cpu = map.get(&id, 0).map_err(access("get", name))?;
    Ok(per_cpu.iter().fold(Traffic::default(), |acc, s| Traffic {
        packets: acc.packets + s.packets,
        bytes: acc.bytes + s.bytes,
    }))
}

/// Zeroes a stats slot before a new VIP or backend takes it.
fn zero_stats(map: &mut PerCpuArray<MapData, Traffic>, id: u32, name: &'static str) -> Result<(), MapsError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| syscall_error("count CPUs for", name, e))?;
    let zeroes =
        PerCpuValues::try_from(vec![Traffic::default(); cpus]).map_err(|e| syscall_error("zero", name, e))?;
    map.set(id, zeroes, 0).map_err(access("zero", name))
}

/// The tables `plan` holds that `prev` does not hold the same, built (each a new map).
fn build_tables(prev: Option<&DataPlan>, plan: &DataPlan) -> Result<Vec<(u32, MapData)>, MapsError> {
    let same = |slot: &u32, table: &TablePlan| prev.and_then(|p| p.tables.get(slot)) == Some(table);
    (plan.tables.iter())
        .filter(|(slot, table)| !same(slot, table))
        .map(|(&slot, table)| {
            build_table(&table.slots())
                .map(|inner| (slot, inner))
                .map_err(|source| MapsError::Table { service: table.service.clone(), source })
        })
        .collect()
}

/// A removal of something already gone is a success.
fn gone_ok(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// A new inner table map holding `slots`: created with `BPF_MAP_CREATE` and filled through an
/// mmap of its memory (one write instead of a syscall per slot), then handed to aya.
fn build_table(slots: &[u32]) -> io::Result<MapData> {
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        inner_map_fd: u32,
        numa_node: u32,
        map_name: [u8; 16],
    }
    let max_entries = u32::try_from(slots.len()).map_err(io::Error::other)?;
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries,
        map_flags: BPF_F_INNER_MAP | BPF_F_MMAPABLE,
        inner_map_fd: 0,
        numa_node: 0,
        map_name: *b"lb_maglev\0\0\0\0\0\0\0",
    };
    // SAFETY: a valid, fully initialised bpf_attr prefix of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, &raw const attr, size_of::<MapCreate>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(i32::try_from(fd).map_err(io::Error::other)?) };
    let len = slots.len() * ARRAY_ELEM_SIZE;
    // SAFETY: mapping the map's own memory, shared, for `len` bytes; unmapped below.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `mem` is `len` writable bytes; each slot is a u32 at the start of its element.
    unsafe {
        let base = mem.cast::<u8>();
        for (i, &id) in slots.iter().enumerate() {
            base.add(i * ARRAY_ELEM_SIZE).cast::<u32>().write_unaligned(id);
        }
        libc::munmap(mem, len);
    }
    MapData::from_fd(fd).map_err(io::Error::other)
}

fn syscall_error(op: &'static str, name: &'static str, io_error: io::Error) -> MapsError {
    MapsError::Access { op, name, source: MapError::from(aya::sys::SyscallError { call: op, io_error }) }
}

/// Puts each table in its slot with one `BPF_MAP_UPDATE_BATCH`.
fn update_batch(map: &OwnedFd, tables: &[(u32, MapData)]) -> io::Result<()> {
    #[repr(C)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    let keys: Vec<u32> = tables.iter().map(|(slot, _)| *slot).collect();
    let values: Vec<u32> = (tables.iter())
        .map(|(_, inner)| u32::try_from(inner.fd().as_fd().as_raw_fd()).map_err(io::Error::other))
        .collect::<io::Result<_>>()?;
    let attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).map_err(io::Error::other)?,
        map_fd: u32::try_from(map.as_raw_fd()).map_err(io::Error::other)?,
        elem_flags: 0,
        flags: 0,
    };
    // SAFETY: a valid bpf_attr for BPF_MAP_UPDATE_BATCH; `keys` and `values` outlive the call.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &raw const attr, size_of::<BatchAttr>())
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Removes a table from its slot (aya has no delete for arrays of maps).
fn delete_elem(map: &OwnedFd, index: u32) -> io::Result<()> {
    #[repr(C)]
    struct MapElem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let map_fd = u32::try_from(map.as_raw_fd()).map_err(io::Error::other)?;
    let attr = MapElem { map_fd, _pad: 0, key: (&raw const index) as u64, value: 0, flags: 0 };
    // SAFETY: a valid bpf_attr for BPF_MAP_DELETE_ELEM; `index` outlives the call.
    let rc =
        unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_DELETE_ELEM, &raw const attr, size_of::<MapElem>()) };
    let err = io::Error::last_os_error();
    // An empty slot is already what a delete wants.
    if rc < 0 && err.raw_os_error() != Some(libc::ENOENT) { Err(err) } else { Ok(()) }
}
