//! Registry + what this node knows (its addresses, where backends are) -> what the data plane
//! should hold. Pure: no I/O.
//!
//! Ids that the data plane keeps across reloads (backend records, VIP stats slots, table slots)
//! are carried from one plan to the next in [`Ids`], so a reload never renumbers a backend that
//! stays. Maglev tables depend only on the registry and backend usability, never on ids: every
//! node maps each table slot to the same backend identity.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::maps::{
    AddrKey, BACKEND_ALIVE, BACKEND_DOWN, BACKEND_IDS, Backend, DenyKey, MAX_TABLES, NO_BACKEND, NODE_HAS_V4,
    NODE_HAS_V6, NodeConfig, VIP_F_DENY, VIP_IDS, VipInfo, VipKey, addr_of,
};

use crate::{
    cidr::Cidr,
    config::{AllDown, BackendSpec, L4Service, Mode, Registry, Role},
    maglev,
};

/// What the daemon knows of backends beyond the registry: failing health checks and operator
/// drains, by (service, backend identity).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Backends whose health check fails, with the last error.
    pub down: BTreeMap<(String, String), String>,
    /// Backends an operator drained (`lb-ctl backend drain`).
    pub drained: BTreeSet<(String, String)>,
}

/// Which backends a service's table holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    /// Its usable primaries.
    Primaries,
    /// Every primary is down or drained: its usable fallbacks.
    Fallback,
    /// Every backend is down, and `when_all_down: fail-open` balances over them all anyway.
    FailOpen,
    /// No backend can take new flows: new flows are dropped.
    Nothing,
}

impl Serving {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Primaries => "primaries",
            Self::Fallback => "fallback",
            Self::FailOpen => "fail-open",
            Self::Nothing => "nothing",
        }
    }
}

/// Where a backend host was found from this node: its address, and the next hop's MAC (the
/// backend's own on-link, else the gateway's, `via`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub addr: IpAddr,
    pub mac: [u8; 6],
    pub via: Option<IpAddr>,
}

/// Resolution result per backend `host` as written in the registry; `Err` holds the reason.
pub type Resolutions = HashMap<String, Result<Resolved, String>>;

/// This node's own facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NodeFacts {
    /// MAC of the interface lbd serves.
    pub mac: [u8; 6],
    /// Source addresses for `dsr-ipip` outer headers and `nat`.
    pub addr_v4: Option<Ipv4Addr>,
    pub addr_v6: Option<Ipv6Addr>,
}

/// Data-plane ids carried from one plan to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ids {
    /// Backend identity (`host:port`) -> (id, generation, address it had).
    backends: BTreeMap<String, (u32, u32, IpAddr)>,
    /// Last generation given out per backend id, kept after the backend goes.
    generations: BTreeMap<u32, u32>,
    /// VIP entry -> stats slot.
    vips: BTreeMap<VipKey, u32>,
    /// Service name -> (table slot, table size).
    tables: BTreeMap<String, (u32, u32)>,
}

impl Ids {
    /// Takes the later of each backend id's generation from `other` (a plan that was tried and
    /// undone): a generation once written to the maps is never issued again.
    pub fn merge_generations(&mut self, other: &Ids) {
        for (&id, &g) in &other.generations {
            let mine = self.generations.entry(id).or_insert(g);
            *mine = (*mine).max(g);
        }
    }

    /// The id of a backend identity, if it has one.
    #[must_use]
    pub fn backend(&self, identity: &str) -> Option<u32> {
        self.backends.get(identity).map(|b| b.0)
    }
}

/// One service's Maglev table, held as what it is built from: a table of 65537 slots is 256 KiB,
/// so plans carry the few entries instead, compare cheaply, and the maps build a table only
/// when its inputs change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TablePlan {
    pub service: String,
    /// Slots in the table (a prime).
    pub size: u32,
    pub entries: Vec<TableEntry>,
}

/// A backend as its service's table sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableEntry {
    pub identity: String,
    pub weight: u32,
    /// What its slots hold; without one (unresolved) they hold [`NO_BACKEND`].
    pub id: Option<u32>,
}

impl TablePlan {
    /// Builds the table: the backend id of every slot, [`NO_BACKEND`] where no backend may
    /// take new flows.
    #[must_use]
    pub fn slots(&self) -> Vec<u32> {
        let entries: Vec<maglev::Entry<'_>> =
            self.entries.iter().map(|e| maglev::Entry { identity: &e.identity, weight: e.weight }).collect();
        let mut slots = maglev::build(&entries, self.size);
        for s in &mut slots {
            *s = if *s == maglev::EMPTY {
                NO_BACKEND
            } else {
                self.entries[*s as usize].id.unwrap_or(NO_BACKEND)
            };
        }
        slots
    }
}

/// One (VIP, port, protocol) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPlan {
    pub service: String,
    pub key: VipKey,
    pub info: VipInfo,
}

/// A range of a VIP entry's deny list: `bits` leading bits of the key's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct DenyRange {
    pub key: DenyKey,
    pub bits: u32,
}

impl DenyRange {
    /// `range` (`10.0.0.0/8`, `2001:db8::/32`, one address) for VIP entry `vip_id`, its address
    /// cut to its prefix, so one range has one key; `None` when it does not parse (validation
    /// reports it).
    #[must_use]
    pub fn new(vip_id: u32, range: &str) -> Option<Self> {
        let c = Cidr::parse(range).ok()?;
        let (_, addr) = addr_of(c.network());
        Some(Self { key: DenyKey { vip_id: vip_id.to_be_bytes(), addr }, bits: c.prefix_len() })
    }

    /// The trie key: the VIP id's 32 bits, then the range's.
    #[must_use]
    pub const fn prefix_len(&self) -> u32 {
        DenyKey::prefix_len(self.bits)
    }
}

/// A backend as planned for one service, for logs and status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceBackend {
    pub identity: String,
    pub role: Role,
    pub id: Option<u32>,
    /// Weight in the table: the registry's, or 0 when drained or unusable.
    pub weight: u32,
    /// Why the backend takes no new flows, when it does not.
    pub unusable: Option<String>,
}

/// The desired content of the data plane maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPlan {
    pub node: NodeConfig,
    pub vips: Vec<VipPlan>,
    pub vip_addrs: BTreeSet<AddrKey>,
    /// Deny lists of VIP entries.
    pub deny: BTreeSet<DenyRange>,
    /// Table slot -> table.
    pub tables: BTreeMap<u32, TablePlan>,
    /// Backend records by id (drained ones included: their tracked flows continue).
    pub backends: BTreeMap<u32, Backend>,
    /// Per service, its backends as planned (primaries, then fallbacks).
    pub services: BTreeMap<String, Vec<ServiceBackend>>,
    /// Per service, which backends its table holds.
    pub serving: BTreeMap<String, Serving>,
    /// The ids this plan uses; pass them to the next plan.
    pub ids: Ids,
}

/// A registry entry the plan could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub service: String,
    pub reason: String,
}

/// Backend hosts of the services balanced in XDP: what the daemon must resolve.
#[must_use]
pub fn xdp_backend_hosts(reg: &Registry) -> Vec<&str> {
    let mut hosts: Vec<&str> = reg
        .tcp
        .values()
        .filter(|s| s.vip.is_some())
        .flat_map(|s| s.all_backends().map(|(b, _)| b.host.as_str()))
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    hosts
}

/// Why a resolved backend can not take a service's traffic from this node, if it can not.
fn unusable(mode: Mode, vip: IpAddr, r: &Resolved, node: &NodeFacts) -> Option<String> {
    let family = |ip: IpAddr| if ip.is_ipv4() { "IPv4" } else { "IPv6" };
    match mode {
        Mode::DsrL2 => r.via.map(|via| {
            format!("{} is behind router {via}; dsr-l2 needs backends on this node's L2 segment (use dsr-ipip or nat)", r.addr)
        }),
        Mode::DsrIpip => node_addr(node, r.addr.is_ipv4())
            .is_none()
            .then(|| format!("this node has no {} address to tunnel from", family(r.addr))),
        Mode::Nat if r.addr.is_ipv4() != vip.is_ipv4() => Some(format!("{} is not of the VIP's address family", r.addr)),
        Mode::Nat => {
            node_addr(node, vip.is_ipv4()).is_none().then(|| format!("this node has no {} address to NAT from", family(vip)))
        }
        // Never planned: proxied services have no VIP.
        Mode::Proxy => None,
    }
}

fn node_addr(node: &NodeFacts, v4: bool) -> Option<IpAddr> {
    if v4 { node.addr_v4.map(IpAddr::V4) } else { node.addr_v6.map(IpAddr::V6) }
}

/// Builds the data plane contents for `reg` on this node, keeping ids from `prev`; `over`
/// takes failing and drained backends out of the tables.
#[must_use]
pub fn plan(
    reg: &Registry,
    node: &NodeFacts,
    resolved: &Resolutions,
    prev: &Ids,
    over: &Overrides,
) -> (DataPlan, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut services: Vec<(&String, &L4Service, IpAddr)> = Vec::new();
    for (name, svc) in &reg.tcp {
        if svc.mode == crate::config::Mode::Proxy {
            let reason = "mode proxy: relayed by lbd's userspace proxy, not XDP".to_owned();
            skipped.push(Skipped { service: name.clone(), reason });
        } else if let Some(vip) = svc.vip {
            services.push((name, svc, vip));
        } else {
            skipped
                .push(Skipped { service: name.clone(), reason: "no `vip`: not balanced in XDP".to_owned() });
        }
    }
    let ids = assign_ids(&services, resolved, prev, reg.datapath.maglev_table_size);

    // Backends a health check has down in some service.
    let down: BTreeSet<&str> = over.down.keys().map(|(_, b)| b.as_str()).collect();
    let specs: HashMap<String, &BackendSpec> =
        (services.iter()).flat_map(|(_, s, _)| s.all_backends().map(|(b, _)| (b.identity(), b))).collect();
    let mut backends = BTreeMap::new();
    for (identity, &(id, generation, _)) in &ids.backends {
        let spec = specs.get(identity).copied();
        let (Some(spec), Some(Ok(r))) = (spec, spec.and_then(|b| resolved.get(&b.host))) else { continue };
        let (family, addr) = addr_of(r.addr);
        let record = Backend {
            addr,
            mac: r.mac,
            port: spec.port.to_be_bytes(),
            family,
            flags: if down.contains(identity.as_str()) {
                BACKEND_ALIVE | BACKEND_DOWN
            } else {
                BACKEND_ALIVE
            },
            _pad: [0; 2],
            generation,
        };
        backends.insert(id, record);
    }

    // The registry's limits leave ids for everything (see `VIP_IDS`); should they not, the
    // service or entry is left out and reported rather than panic.
    services.retain(|(name, _, _)| {
        let has_slot = ids.tables.contains_key(name.as_str());
        if !has_slot {
            skipped
                .push(Skipped { service: (*name).clone(), reason: "no free Maglev table slot".to_owned() });
        }
        has_slot
    });
    let mut tables = BTreeMap::new();
    let mut planned_services = BTreeMap::new();
    let mut serving = BTreeMap::new();
    for (name, svc, vip) in &services {
        let (planned, how) = service_backends(name, svc, *vip, node, resolved, &ids, over);
        serving.insert((*name).clone(), how);
        let entries = (planned.iter())
            .map(|p| TableEntry { identity: p.identity.clone(), weight: p.weight, id: p.id })
            .collect();
        let (slot, size) = ids.tables[name.as_str()];
        tables.insert(slot, TablePlan { service: (*name).clone(), size, entries });
        planned_services.insert((*name).clone(), planned);
    }

    let mut vips = Vec::new();
    let mut vip_addrs = BTreeSet::new();
    let mut deny = BTreeSet::new();
    for (name, svc, vip) in &services {
        let (table, table_size) = ids.tables[name.as_str()];
        vip_addrs.insert(AddrKey::new(*vip));
        for proto in &svc.protocols {
            let key = VipKey::new(*vip, svc.port, proto.number());
            let Some(&id) = ids.vips.get(&key) else {
                skipped.push(Skipped { service: (*name).clone(), reason: "no free VIP id".to_owned() });
                continue;
            };
            let ranges: Vec<DenyRange> = svc.deny.iter().filter_map(|r| DenyRange::new(id, r)).collect();
            let flags = if ranges.is_empty() { 0 } else { VIP_F_DENY };
            deny.extend(ranges);
            let info = VipInfo { id, table, table_size, mode: svc.mode.code(), flags, _pad: [0; 2] };
            vips.push(VipPlan { service: (*name).clone(), key, info });
        }
    }

    let node_config = node_config(reg, node);
    let plan = DataPlan {
        node: node_config,
        vips,
        vip_addrs,
        deny,
        tables,
        backends,
        services: planned_services,
        serving,
        ids,
    };
    (plan, skipped)
}

/// What an earlier lbd left in pinned maps: the plan it applied, as far as the kernel holds it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    pub node: NodeConfig,
    pub vips: Vec<(VipKey, VipInfo)>,
    pub vip_addrs: BTreeSet<AddrKey>,
    pub deny: BTreeSet<DenyRange>,
    /// Table slots holding a table.
    pub tables: BTreeSet<u32>,
    /// Backend records ever written (alive or not: the generations of freed ids matter too).
    pub backends: BTreeMap<u32, Backend>,
}

/// Backends the earlier lbd had marked failing, by identity: they stay out of new flows until
/// a check passes, rather than serving until `fall` checks fail again.
#[must_use]
pub fn adopted_down(adopted: &DataPlan) -> BTreeSet<String> {
    (adopted.ids.backends.iter())
        .filter(|(_, (id, _, _))| adopted.backends.get(id).is_some_and(Backend::is_down))
        .map(|(identity, _)| identity.clone())
        .collect()
}

/// The plan the kernel holds, rebuilt from pinned maps so the next plan is applied as a
/// difference from it: every backend of `reg` that the kernel has (same address and port) keeps
/// its id and generation, so tracked flows stay with their backends; VIP entries keep their
/// ids and stats, services their table slots. Kernel entries `reg` no longer has are kept
/// under placeholder names, so the next apply removes them.
#[must_use]
pub fn adopt(reg: &Registry, resolved: &Resolutions, kernel: &KernelState) -> DataPlan {
    let mut ids = Ids::default();
    for (&id, b) in &kernel.backends {
        if b.generation != 0 {
            ids.generations.insert(id, b.generation);
        }
    }
    let alive: BTreeMap<u32, &Backend> =
        kernel.backends.iter().filter(|(_, b)| b.is_alive()).map(|(i, b)| (*i, b)).collect();
    let mut claimed = BTreeSet::new();
    for svc in reg.tcp.values().filter(|s| s.vip.is_some()) {
        for (b, _) in svc.all_backends() {
            let identity = b.identity();
            let Some(Ok(r)) = resolved.get(&b.host) else { continue };
            if ids.backends.contains_key(&identity) {
                continue;
            }
            let found = (alive.iter()).find(|(id, k)| {
                !claimed.contains(*id) && k.ip() == r.addr && u16::from_be_bytes(k.port) == b.port
            });
            if let Some((&id, k)) = found {
                claimed.insert(id);
                ids.backends.insert(identity, (id, k.generation, r.addr));
            }
        }
    }
    for (&id, k) in alive.iter().filter(|(id, _)| !claimed.contains(*id)) {
        ids.backends.insert(format!("(adopted backend #{id})"), (id, k.generation, k.ip()));
    }
    ids.vips = kernel.vips.iter().map(|(k, info)| (*k, info.id)).collect();
    let service_of = |key: &VipKey| {
        reg.tcp.iter().find_map(|(name, svc)| {
            let vip = svc.vip?;
            svc.protocols.iter().any(|p| VipKey::new(vip, svc.port, p.number()) == *key).then(|| name.clone())
        })
    };
    let mut vips = Vec::new();
    for (key, info) in &kernel.vips {
        let service = service_of(key);
        if let Some(name) = &service {
            ids.tables.entry(name.clone()).or_insert((info.table, info.table_size));
        }
        vips.push(VipPlan {
            service: service.unwrap_or_else(|| "(adopted)".to_owned()),
            key: *key,
            info: *info,
        });
    }
    let mut tables = BTreeMap::new();
    for &slot in &kernel.tables {
        if !ids.tables.values().any(|(s, _)| *s == slot) {
            ids.tables.insert(format!("(adopted table #{slot})"), (slot, 0));
        }
        // Contents unknown: the next plan writes every table again (the same slots, swapped
        // in one update each, so flows see no change).
        tables.insert(slot, TablePlan { service: "(adopted)".to_owned(), size: 0, entries: Vec::new() });
    }
    DataPlan {
        node: kernel.node,
        vips,
        vip_addrs: kernel.vip_addrs.clone(),
        deny: kernel.deny.clone(),
        tables,
        backends: alive.into_iter().map(|(id, b)| (id, *b)).collect(),
        services: BTreeMap::new(),
        serving: BTreeMap::new(),
        ids,
    }
}

/// One service's backends with the weight each gets in its table: usable primaries; else
/// usable fallbacks; else, when health is all that stops them and the service fails open,
/// every backend health took out.
fn service_backends(
    name: &str,
    svc: &L4Service,
    vip: IpAddr,
    node: &NodeFacts,
    resolved: &Resolutions,
    ids: &Ids,
    over: &Overrides,
) -> (Vec<ServiceBackend>, Serving) {
    // (backend, weight it would have if healthy)
    let mut planned: Vec<(ServiceBackend, u32)> = Vec::new();
    for (b, role) in svc.all_backends() {
        let identity = b.identity();
        let id = ids.backend(&identity);
        let key = (name.to_owned(), identity.clone());
        let mut reason = match resolved.get(&b.host) {
            Some(Ok(r)) => unusable(svc.mode, vip, r, node),
            Some(Err(e)) => Some(e.clone()),
            None => Some("not resolved".to_owned()),
        };
        if reason.is_none() && over.drained.contains(&key) {
            reason = Some("drained by an operator".to_owned());
        }
        let healthy_weight = if reason.is_none() && id.is_some() { b.weight } else { 0 };
        if reason.is_none()
            && let Some(e) = over.down.get(&key)
        {
            reason = Some(format!("health check failing: {e}"));
        }
        let weight = if reason.is_none() { healthy_weight } else { 0 };
        planned.push((ServiceBackend { identity, role, id, weight, unusable: reason }, healthy_weight));
    }
    let serves =
        |role: Role, p: &[(ServiceBackend, u32)]| p.iter().any(|(b, _)| b.role == role && b.weight > 0);
    let how = if serves(Role::Primary, &planned) {
        Serving::Primaries
    } else if serves(Role::Fallback, &planned) {
        Serving::Fallback
    } else if svc.when_all_down == AllDown::FailOpen && planned.iter().any(|(_, w)| *w > 0) {
        Serving::FailOpen
    } else {
        Serving::Nothing
    };
    let table_role = |b: &ServiceBackend| match how {
        Serving::Primaries => b.role == Role::Primary,
        Serving::Fallback => b.role == Role::Fallback,
        Serving::FailOpen | Serving::Nothing => true,
    };
    let out = planned
        .into_iter()
        .map(|(mut b, healthy_weight)| {
            if how == Serving::FailOpen {
                b.weight = healthy_weight;
            } else if !table_role(&b) {
                b.weight = 0;
            }
            b
        })
        .collect();
    (out, how)
}

/// The node record: this node's addresses and MAC, and the registry's datapath settings.
fn node_config(reg: &Registry, node: &NodeFacts) -> NodeConfig {
    let d = &reg.datapath;
    let secs = |t: std::time::Duration| u32::try_from(t.as_secs()).unwrap_or(u32::MAX);
    let mut node_config = NodeConfig {
        mac: node.mac,
        configured: 1,
        nat_port_min: d.nat_ports.min,
        nat_port_max: d.nat_ports.max,
        udp_timeout: secs(d.udp_timeout),
        tcp_syn_timeout: secs(d.tcp_syn_timeout),
        tcp_timeout: secs(d.tcp_timeout),
        tcp_closing_timeout: secs(d.tcp_closing_timeout),
        ..NodeConfig::default()
    };
    if let Some(a) = node.addr_v4 {
        node_config.addr_v4 = a.octets();
        node_config.has_addr |= NODE_HAS_V4;
    }
    if let Some(a) = node.addr_v6 {
        node_config.addr_v6 = a.octets();
        node_config.has_addr |= NODE_HAS_V6;
    }
    node_config
}

/// Keeps every id that continues from `prev` and gives new ones the lowest numbers `prev` did
/// not hold. A backend id given to a new identity, or whose address changed, gets the next
/// generation.
fn assign_ids(
    services: &[(&String, &L4Service, IpAddr)],
    resolved: &Resolutions,
    prev: &Ids,
    table_size: u32,
) -> Ids {
    let mut ids = Ids { generations: prev.generations.clone(), ..Ids::default() };
    // Backends: every resolved backend of an XDP service gets a record (drained ones too).
    let mut wanted: BTreeMap<String, IpAddr> = BTreeMap::new();
    for (_, svc, _) in services {
        for (b, _) in svc.all_backends() {
            if let Some(Ok(r)) = resolved.get(&b.host) {
                wanted.insert(b.identity(), r.addr);
            }
        }
    }
    for (identity, addr) in &wanted {
        if let Some(&(id, generation, old)) = prev.backends.get(identity) {
            let generation = if old == *addr { generation } else { bump(&mut ids.generations, id) };
            ids.backends.insert(identity.clone(), (id, generation, *addr));
        }
    }
    // Ids that `prev` held stay out of reach for one reload, even those it frees: until the
    // reload's removals run, old tables and VIP records still point at them, and a packet
    // would meet the new owner under the old service (and get tracked to it).
    let mut used: BTreeSet<u32> = prev.backends.values().map(|b| b.0).collect();
    for (identity, addr) in &wanted {
        if ids.backends.contains_key(identity) {
            continue;
        }
        let Some(id) = lowest_free(&used, BACKEND_IDS) else { break };
        used.insert(id);
        let generation = bump(&mut ids.generations, id);
        ids.backends.insert(identity.clone(), (id, generation, *addr));
    }
    // VIP entries and tables.
    let keys: Vec<VipKey> = (services.iter())
        .flat_map(|(_, svc, vip)| svc.protocols.iter().map(|p| VipKey::new(*vip, svc.port, p.number())))
        .collect();
    ids.vips = keys.iter().filter_map(|k| prev.vips.get(k).map(|id| (*k, *id))).collect();
    let mut used: BTreeSet<u32> = prev.vips.values().copied().collect();
    for k in keys {
        if !ids.vips.contains_key(&k)
            && let Some(id) = lowest_free(&used, VIP_IDS)
        {
            used.insert(id);
            ids.vips.insert(k, id);
        }
    }
    let mut used: BTreeSet<u32> = prev.tables.values().map(|t| t.0).collect();
    let mut pending = Vec::new();
    for (name, _, _) in services {
        match prev.tables.get(name.as_str()) {
            Some(&(slot, s)) if s == table_size => {
                used.insert(slot);
                ids.tables.insert((*name).clone(), (slot, s));
            }
            // A resized table is built in a fresh slot: the VIP switches to it in one update.
            Some(&(slot, _)) => {
                used.insert(slot);
                pending.push((*name).clone());
            }
            None => pending.push((*name).clone()),
        }
    }
    for name in pending {
        if let Some(slot) = lowest_free(&used, MAX_TABLES) {
            used.insert(slot);
            ids.tables.insert(name, (slot, table_size));
        }
    }
    ids
}

fn bump(generations: &mut BTreeMap<u32, u32>, id: u32) -> u32 {
    let g = generations.entry(id).or_insert(0);
    *g = g.wrapping_add(1);
    *g
}

fn lowest_free(used: &BTreeSet<u32>, max: u32) -> Option<u32> {
    (0..max).find(|i| !used.contains(i))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use lb_common::maps::{MODE_DSR_IPIP, MODE_DSR_L2, MODE_NAT, PROTO_TCP, PROTO_UDP};

    use super::*;
    use crate::config;

    const REG: &str = "
version: 1
tcp:
  echo:
    vip: 10.100.0.1
    port: 7
    protocols: [tcp, udp]
    backends:
      - {host: 10.0.0.11, port: 7}
      - {host: 10.0.0.12, port: 7, weight: 3}
  web:
    vip: 10.100.0.1
    port: 80
    mode: nat
    backends:
      - {host: 10.0.0.12, port: 8080}
      - {host: gone.example, port: 8080}
      - {host: 10.9.0.5, port: 8080, weight: 0}
  tunnelled:
    vip: 2001:db8::100
    port: 443
    mode: dsr-ipip
    backends:
      - {host: 10.9.0.5, port: 443}
  redis-main:
    port: 6379
    backends:
      - {host: 10.0.0.13, port: 6379}
";

    fn resolutions() -> Resolutions {
        let mut r = Resolutions::new();
        for (host, last) in [("10.0.0.11", 11u8), ("10.0.0.12", 12)] {
            r.insert(
                host.to_owned(),
                Ok(Resolved { addr: host.parse().unwrap(), mac: [2, 0, 0, 0, 0, last], via: None }),
            );
        }
        // Routed: usable by nat and dsr-ipip, not by dsr-l2.
        let gw = Some("10.0.0.1".parse().unwrap());
        r.insert(
            "10.9.0.5".to_owned(),
            Ok(Resolved { addr: "10.9.0.5".parse().unwrap(), mac: [2, 0, 0, 0, 0, 1], via: gw }),
        );
        r.insert("gone.example".to_owned(), Err("DNS: no such host".to_owned()));
        r
    }

    fn node() -> NodeFacts {
        NodeFacts { mac: [2, 0, 0, 0, 0, 2], addr_v4: Some("10.0.0.2".parse().unwrap()), addr_v6: None }
    }

    fn registry(src: &str) -> Registry {
        config::parse(src, Path::new("t.yaml")).unwrap()
    }

    /// Backend identity per table slot: what every node must agree on.
    fn identities(plan: &DataPlan, service: &str) -> Vec<Option<String>> {
        let (slot, _) = plan.ids.tables[service];
        let by_id: BTreeMap<u32, &str> =
            plan.services[service].iter().filter_map(|b| Some((b.id?, b.identity.as_str()))).collect();
        plan.tables[&slot].slots().iter().map(|id| by_id.get(id).map(|s| (*s).to_owned())).collect()
    }

    #[test]
    fn services_with_a_vip_become_entries_per_protocol_sharing_one_table() {
        let (p, skipped) =
            plan(&registry(REG), &node(), &resolutions(), &Ids::default(), &Overrides::default());
        let entries: Vec<(&str, u16, u8, u8)> = p
            .vips
            .iter()
            .map(|v| (v.service.as_str(), u16::from_be_bytes(v.key.port), v.key.proto, v.info.mode))
            .collect();
        assert_eq!(
            entries,
            vec![
                ("echo", 7, PROTO_TCP, MODE_DSR_L2),
                ("echo", 7, PROTO_UDP, MODE_DSR_L2),
                ("tunnelled", 443, PROTO_TCP, MODE_DSR_IPIP),
                ("web", 80, PROTO_TCP, MODE_NAT)
            ]
        );
        assert_eq!(p.vips[0].info.table, p.vips[1].info.table, "tcp and udp of one service share its table");
        assert_eq!(p.vips[0].info.table_size, crate::maglev::DEFAULT_TABLE_SIZE);
        assert_eq!(
            skipped,
            vec![Skipped { service: "redis-main".into(), reason: "no `vip`: not balanced in XDP".into() }]
        );
        assert_eq!(p.vip_addrs.len(), 2);
        assert_eq!(p.node.configured, 1);
        assert_eq!(p.node.addr_v4, [10, 0, 0, 2]);
    }

    #[test]
    fn deny_lists_become_ranges_per_vip_entry_and_flag_only_those_entries() {
        let src = REG.replace(
            "    protocols: [tcp, udp]\n",
            "    protocols: [tcp, udp]\n    deny: [192.0.2.77/24, 10.1.2.3]\n",
        );
        let (p, _) = plan(&registry(&src), &node(), &resolutions(), &Ids::default(), &Overrides::default());
        let flagged: Vec<(&str, u8)> = p.vips.iter().map(|v| (v.service.as_str(), v.info.flags)).collect();
        assert_eq!(flagged, [("echo", VIP_F_DENY), ("echo", VIP_F_DENY), ("tunnelled", 0), ("web", 0)]);
        // One range per VIP entry (tcp and udp), its address cut to its prefix.
        let ranges: Vec<(u32, [u8; 4], u32)> = (p.deny.iter())
            .map(|r| (u32::from_be_bytes(r.key.vip_id), r.key.addr[..4].try_into().unwrap(), r.bits))
            .collect();
        let (tcp, udp) = (p.vips[0].info.id, p.vips[1].info.id);
        let mut want = vec![
            (tcp, [10, 1, 2, 3], 32),
            (tcp, [192, 0, 2, 0], 24),
            (udp, [10, 1, 2, 3], 32),
            (udp, [192, 0, 2, 0], 24),
        ];
        want.sort_by_key(|(id, a, _)| (id.to_be_bytes(), *a));
        assert_eq!(ranges, want);
        let r = DenyRange::new(7, "2001:db8:ff::/33").unwrap();
        assert_eq!((r.bits, r.prefix_len(), &r.key.addr[..6]), (33, 65, &[0x20, 0x01, 0x0d, 0xb8, 0, 0][..]));
        assert!(r.key.covers(
            r.bits,
            &DenyKey { vip_id: 7u32.to_be_bytes(), addr: addr_of("2001:db8:7fff::1".parse().unwrap()).1 }
        ));
        assert!(!r.key.covers(
            r.bits,
            &DenyKey { vip_id: 7u32.to_be_bytes(), addr: addr_of("2001:db8:8000::1".parse().unwrap()).1 }
        ));
        assert!(
            !r.key.covers(r.bits, &DenyKey { vip_id: 8u32.to_be_bytes(), addr: r.key.addr }),
            "another VIP entry"
        );
        assert_eq!(DenyRange::new(1, "10.0.0.0/33"), None);
    }

    #[test]
    fn weights_drain_and_unusable_backends_shape_each_table() {
        let (p, _) = plan(&registry(REG), &node(), &resolutions(), &Ids::default(), &Overrides::default());
        let echo = identities(&p, "echo");
        let heavy = echo.iter().filter(|i| i.as_deref() == Some("10.0.0.12:7")).count();
        assert_eq!(heavy, crate::maglev::DEFAULT_TABLE_SIZE as usize * 3 / 4 + 1, "weight 3 of 4");
        let web = &p.services["web"];
        assert_eq!(web[0].weight, 1);
        assert_eq!(web[1].unusable.as_deref(), Some("DNS: no such host"));
        assert_eq!((web[2].weight, web[2].unusable.as_deref()), (0, None), "weight 0: drained");
        assert!(identities(&p, "web").iter().all(|i| i.as_deref() == Some("10.0.0.12:8080")));
        // The drained backend keeps its record: its tracked flows continue.
        assert!(p.services["web"][2].id.is_some_and(|id| p.backends.contains_key(&id)));
        assert!(
            identities(&p, "tunnelled").iter().all(|i| i.as_deref() == Some("10.9.0.5:443")),
            "a routed backend is fine for dsr-ipip"
        );
    }

    #[test]
    fn a_routed_backend_takes_no_dsr_l2_flows() {
        let reg = registry(
            "version: 1\ntcp:\n  a:\n    vip: 10.100.0.1\n    port: 80\n    backends: [{host: 10.9.0.5, port: 80}]\n",
        );
        let (p, _) = plan(&reg, &node(), &resolutions(), &Ids::default(), &Overrides::default());
        assert!(p.services["a"][0].unusable.as_deref().unwrap().contains("behind router 10.0.0.1"));
        assert!(p.tables.values().next().unwrap().slots().iter().all(|&s| s == NO_BACKEND));
    }

    #[test]
    fn the_same_registry_maps_every_slot_to_the_same_backend_whatever_the_ids() {
        let reg = registry(REG);
        let (a, _) = plan(&reg, &node(), &resolutions(), &Ids::default(), &Overrides::default());
        // Another node that has seen other registries first numbers its backends differently.
        // It knew 10.9.0.5:443 first, which keeps id 0 there.
        let other = registry(
            "version: 1\ntcp:\n  z:\n    vip: 10.1.1.1\n    port: 443\n    mode: dsr-ipip\n    backends: [{host: 10.9.0.5, port: 443}]\n",
        );
        let (first, _) = plan(&other, &node(), &resolutions(), &Ids::default(), &Overrides::default());
        let (b, _) = plan(&reg, &node(), &resolutions(), &first.ids, &Overrides::default());
        assert_ne!(a.services["echo"][0].id, b.services["echo"][0].id, "different ids...");
        for service in ["echo", "web", "tunnelled"] {
            assert_eq!(
                identities(&a, service),
                identities(&b, service),
                "...same backend per slot ({service})"
            );
        }
    }

    #[test]
    fn reloads_keep_ids_and_generations_of_backends_that_stay() {
        let reg = registry(REG);
        let (first, _) = plan(&reg, &node(), &resolutions(), &Ids::default(), &Overrides::default());
        let (again, _) = plan(&reg, &node(), &resolutions(), &first.ids, &Overrides::default());
        assert_eq!(first.backends, again.backends);
        assert_eq!(first.vips, again.vips);
        assert_eq!(first.tables, again.tables);
        // A backend that moves to a new address keeps its id with a new generation.
        let mut moved = resolutions();
        moved.insert(
            "10.0.0.11".into(),
            Ok(Resolved { addr: "10.0.0.111".parse().unwrap(), mac: [2; 6], via: None }),
        );
        let (after, _) = plan(&reg, &node(), &moved, &first.ids, &Overrides::default());
        let id = first.ids.backend("10.0.0.11:7").unwrap();
        assert_eq!(after.ids.backend("10.0.0.11:7"), Some(id));
        assert_eq!(after.backends[&id].generation, first.backends[&id].generation + 1);
    }

    /// What the kernel holds after `p` was applied.
    fn kernel_of(p: &DataPlan) -> KernelState {
        KernelState {
            node: p.node,
            vips: p.vips.iter().map(|v| (v.key, v.info)).collect(),
            vip_addrs: p.vip_addrs.clone(),
            deny: p.deny.clone(),
            tables: p.tables.keys().copied().collect(),
            backends: p.backends.clone(),
        }
    }

    #[test]
    fn a_restarted_lbd_adopts_ids_and_generations_from_the_kernel_and_drops_what_left() {
        let reg = registry(REG);
        // Generations above 1: the earlier lbd had reloads behind it.
        let (mut first, _) = plan(&reg, &node(), &resolutions(), &Ids::default(), &Overrides::default());
        for b in first.backends.values_mut() {
            b.generation += 6;
        }
        let mut kernel = kernel_of(&first);
        // A backend the registry no longer has, and a backend the earlier lbd had failing.
        let gone = Backend { generation: 3, ..first.backends.values().next().copied().unwrap() };
        let gone = Backend { addr: addr_of("10.0.0.99".parse().unwrap()).1, ..gone };
        kernel.backends.insert(77, gone);
        let failing = first.ids.backend("10.0.0.11:7").unwrap();
        kernel.backends.get_mut(&failing).unwrap().flags |= BACKEND_DOWN;

        let adopted = adopt(&reg, &resolutions(), &kernel);
        assert_eq!(adopted_down(&adopted), BTreeSet::from(["10.0.0.11:7".to_owned()]));
        let (next, _) = plan(&reg, &node(), &resolutions(), &adopted.ids, &Overrides::default());
        for (identity, &(id, _, _)) in &first.ids.backends {
            assert_eq!(next.ids.backend(identity), Some(id), "{identity} keeps its id");
            let kept = first.backends[&id].generation;
            assert_eq!(next.backends[&id].generation, kept, "{identity} keeps the kernel's generation");
        }
        assert_eq!(next.vips, first.vips, "VIP entries keep their ids and table slots");
        assert!(!next.backends.contains_key(&77), "the departed backend's record is released");
        assert!(adopted.backends.contains_key(&77), "so the next apply marks it not alive");
    }

    #[test]
    fn a_freed_id_waits_one_reload_then_goes_to_a_new_backend_under_a_new_generation() {
        let backends = |hosts: &[&str]| {
            let list: Vec<String> = hosts.iter().map(|h| format!("{{host: {h}, port: 7}}")).collect();
            registry(&format!(
                "version: 1\ntcp:\n  a:\n    vip: 10.100.0.1\n    port: 7\n    backends: [{}]\n",
                list.join(", ")
            ))
        };
        let (p1, _) =
            plan(&backends(&["10.0.0.11"]), &node(), &resolutions(), &Ids::default(), &Overrides::default());
        let (p2, _) =
            plan(&backends(&["10.0.0.12"]), &node(), &resolutions(), &p1.ids, &Overrides::default());
        let (p3, _) = plan(
            &backends(&["10.0.0.12", "10.9.0.5"]),
            &node(),
            &resolutions(),
            &p2.ids,
            &Overrides::default(),
        );
        let freed = p1.ids.backend("10.0.0.11:7").unwrap();
        assert_ne!(p2.ids.backend("10.0.0.12:7"), Some(freed), "not reused in the reload that frees it");
        assert_eq!(p3.ids.backend("10.9.0.5:7"), Some(freed), "the lowest free id is reused later...");
        assert_ne!(
            p1.backends[&freed].generation, p3.backends[&freed].generation,
            "...under a new generation"
        );
    }

    #[test]
    fn a_removed_services_table_slot_is_not_given_to_a_new_service_in_the_same_reload() {
        let one = registry(
            "version: 1\ntcp:\n  a:\n    vip: 10.100.0.1\n    port: 7\n    backends: [{host: 10.0.0.11, port: 7}]\n",
        );
        let other = registry(
            "version: 1\ntcp:\n  b:\n    vip: 10.100.0.2\n    port: 7\n    backends: [{host: 10.0.0.11, port: 7}]\n",
        );
        let (p1, _) = plan(&one, &node(), &resolutions(), &Ids::default(), &Overrides::default());
        let (p2, _) = plan(&other, &node(), &resolutions(), &p1.ids, &Overrides::default());
        assert_ne!(p1.ids.tables["a"].0, p2.ids.tables["b"].0);
        assert_ne!(p1.vips[0].info.id, p2.vips[0].info.id, "nor a removed VIP's stats slot");
    }

    #[test]
    fn a_resized_table_moves_to_a_new_slot() {
        let reg = registry(REG);
        let (p1, _) = plan(&reg, &node(), &resolutions(), &Ids::default(), &Overrides::default());
        let resized =
            registry(&REG.replace("version: 1\n", "version: 1\ndatapath:\n  maglev_table_size: 131071\n"));
        let (p2, _) = plan(&resized, &node(), &resolutions(), &p1.ids, &Overrides::default());
        let (s1, s2) = (p1.ids.tables["echo"], p2.ids.tables["echo"]);
        assert_eq!(s2.1, 131_071);
        assert_ne!(s1.0, s2.0, "a VIP switches to the resized table in one update");
        assert_eq!(p2.tables[&s2.0].slots().len(), 131_071);
    }

    #[test]
    fn only_backends_of_vip_services_need_resolving() {
        assert_eq!(
            xdp_backend_hosts(&registry(REG)),
            vec!["10.0.0.11", "10.0.0.12", "10.9.0.5", "gone.example"]
        );
    }

    fn down(pairs: &[(&str, &str)]) -> Overrides {
        let mut o = Overrides::default();
        for (svc, b) in pairs {
            o.down.insert(((*svc).to_owned(), (*b).to_owned()), "connect: refused".to_owned());
        }
        o
    }

    const FALLBACK: &str = "\
version: 1
tcp:
  echo:
    vip: 10.100.0.1
    port: 7
    backends:
      - {host: 10.0.0.11, port: 7}
      - {host: 10.0.0.12, port: 7}
    fallback:
      - {host: 10.9.0.5, port: 7}
    mode: nat
";

    #[test]
    fn a_failing_backend_leaves_the_table_and_moves_only_its_own_slots() {
        let reg = registry(REG);
        let (healthy, _) = plan(&reg, &node(), &resolutions(), &Ids::default(), &Overrides::default());
        let (sick, _) = plan(&reg, &node(), &resolutions(), &healthy.ids, &down(&[("echo", "10.0.0.12:7")]));
        let b = &sick.services["echo"][1];
        assert_eq!((b.weight, b.unusable.as_deref()), (0, Some("health check failing: connect: refused")));
        assert!(sick.backends.contains_key(&b.id.unwrap()), "its record stays: tracked flows go on");
        let (before, after) = (identities(&healthy, "echo"), identities(&sick, "echo"));
        let ok = Some("10.0.0.11:7".to_owned());
        assert!(after.iter().all(|i| *i == ok));
        assert!(before.iter().zip(&after).all(|(b, a)| b == a || b.as_deref() == Some("10.0.0.12:7")));
        assert_eq!(sick.serving["echo"], Serving::Primaries);
        // The same backend in another service is not affected.
        assert_eq!(sick.services["web"][0].weight, 1);
    }

    #[test]
    fn fallbacks_serve_only_while_every_primary_is_down() {
        let reg = registry(FALLBACK);
        let (p, _) = plan(&reg, &node(), &resolutions(), &Ids::default(), &Overrides::default());
        assert_eq!(p.serving["echo"], Serving::Primaries);
        assert!(!identities(&p, "echo").contains(&Some("10.9.0.5:7".to_owned())));
        let one = down(&[("echo", "10.0.0.11:7")]);
        let (p, _) = plan(&reg, &node(), &resolutions(), &p.ids, &one);
        assert_eq!(p.serving["echo"], Serving::Primaries);
        let both = down(&[("echo", "10.0.0.11:7"), ("echo", "10.0.0.12:7")]);
        let (p, _) = plan(&reg, &node(), &resolutions(), &p.ids, &both);
        assert_eq!(p.serving["echo"], Serving::Fallback);
        assert!(identities(&p, "echo").iter().all(|i| i.as_deref() == Some("10.9.0.5:7")));
        assert_eq!(p.services["echo"][2].role, Role::Fallback);
    }

    #[test]
    fn when_everything_is_down_the_policy_decides() {
        let all = down(&[("echo", "10.0.0.11:7"), ("echo", "10.0.0.12:7"), ("echo", "10.9.0.5:7")]);
        let (p, _) = plan(&registry(FALLBACK), &node(), &resolutions(), &Ids::default(), &all);
        assert_eq!(p.serving["echo"], Serving::FailOpen);
        let ids = identities(&p, "echo");
        for b in ["10.0.0.11:7", "10.0.0.12:7", "10.9.0.5:7"] {
            assert!(ids.contains(&Some(b.to_owned())), "fail-open balances over {b} too");
        }
        let closed = registry(&FALLBACK.replace("mode: nat", "mode: nat\n    when_all_down: fail-closed"));
        let (p, _) = plan(&closed, &node(), &resolutions(), &Ids::default(), &all);
        assert_eq!(p.serving["echo"], Serving::Nothing);
        assert!(identities(&p, "echo").iter().all(Option::is_none));
    }

    #[test]
    fn an_operator_drain_is_not_undone_by_fail_open() {
        let mut o = down(&[("echo", "10.0.0.11:7"), ("echo", "10.9.0.5:7")]);
        o.drained.insert(("echo".to_owned(), "10.0.0.12:7".to_owned()));
        let (p, _) = plan(&registry(FALLBACK), &node(), &resolutions(), &Ids::default(), &o);
        assert_eq!(p.serving["echo"], Serving::FailOpen);
        assert!(!identities(&p, "echo").contains(&Some("10.0.0.12:7".to_owned())));
        assert_eq!(p.services["echo"][1].unusable.as_deref(), Some("drained by an operator"));
    }
}
