//! The controller: the one owner of lbd's state. Registry reloads, health results, neighbour
//! changes and operator commands all arrive here, in order, and each ends in at most one plan
//! written to the maps. Reads (status, metrics, lookups) are answered from the same state.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use lb_common::{
    datapath::{self, Destination},
    maps::{CtEntry, FlowKey, PROTO_TCP, PROTO_UDP, VipKey, addr_of},
};
use tracing::{debug, error, info, warn};

use crate::{
    config::{self, Loaded, Problem, Registry, Role},
    daemon::{DaemonError, Options},
    edge::Edge,
    health::{Checker, Key, Report, State, Status, Target},
    maps::DataplaneMaps,
    model::PlanView,
    plan::{self, DataPlan, NodeFacts, Overrides, Resolutions, Serving},
    report::{self, BackendReport, ReloadRecord, ServiceReport, Snapshot},
    resolve::Resolver,
};

/// What the controller was asked to do, and whether it changed the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Changed,
    Unchanged,
}

pub struct Controller {
    opts: Options,
    hops: Resolver,
    /// The HTTP edge: listeners and proxying for `http:` services.
    edge: Edge,
    node: NodeFacts,
    maps: DataplaneMaps,
    /// The last registry that loaded and applied: what serves.
    loaded: Loaded,
    resolved: Resolutions,
    over: Overrides,
    health: BTreeMap<Key, Status>,
    checker: Checker,
    generation: u64,
    reloads_ok: u64,
    reloads_failed: u64,
    last_reload: Option<ReloadRecord>,
    /// Reload durations, file event to table live, for the control benchmark.
    started: Instant,
}

impl Controller {
    /// Resolves and plans `loaded` and writes it to `maps` (the program is not attached yet).
    /// With `adopt`, the maps hold an earlier lbd's state: its plan is read back first, so only
    /// the difference is written and tracked flows keep their backends.
    pub async fn start(
        opts: Options,
        mut hops: Resolver,
        node: NodeFacts,
        mut maps: DataplaneMaps,
        loaded: Loaded,
        checker: Checker,
        adopt: bool,
    ) -> Result<Self, DaemonError> {
        let resolved = resolve_hosts(&loaded.registry, &mut hops).await?;
        let mut over = Overrides::default();
        if adopt {
            let kernel = maps.read_kernel()?;
            let adopted = plan::adopt(&loaded.registry, &resolved, &kernel);
            let down = plan::adopted_down(&adopted);
            for (service, backend) in all_keys(&loaded.registry) {
                if down.contains(&backend) {
                    over.down.insert(
                        (service, backend),
                        "failing before lbd restarted; awaiting a health check".to_owned(),
                    );
                }
            }
            info!(
                event = "adopt",
                vips = adopted.vips.len(),
                backends = adopted.backends.len(),
                tables = adopted.tables.len(),
                down = down.len(),
                "adopted the pinned state of an earlier lbd"
            );
            maps.assume(adopted);
        }
        let mut edge = Edge::new(opts.node.clone(), opts.edge_affinity);
        edge.apply(&loaded.registry, &over)?;
        let plan = make_plan(&loaded.registry, &node, &resolved, maps.applied(), &over);
        maps.apply(&plan)?;
        let mut c = Self {
            opts,
            hops,
            edge,
            node,
            maps,
            loaded,
            resolved,
            over,
            health: BTreeMap::new(),
            checker,
            generation: 1,
            reloads_ok: 0,
            reloads_failed: 0,
            last_reload: None,
            started: Instant::now(),
        };
        c.sync_checks();
        Ok(c)
    }

    #[must_use]
    pub fn maps(&self) -> &DataplaneMaps {
        &self.maps
    }

    #[must_use]
    pub fn loaded(&self) -> &Loaded {
        &self.loaded
    }

    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Reads the registry file again and applies it. A registry that fails to load or apply
    /// is recorded (status, metrics, log) and the last good one keeps serving; only an
    /// inconsistent data plane is returned as an error.
    pub async fn reload(&mut self, cause: &str) -> Result<Outcome, DaemonError> {
        let started = Instant::now();
        let result = match config::load(&self.opts.config) {
            Ok(loaded) => self.apply_loaded(loaded).await,
            Err(e) => Err(DaemonError::Config(e)),
        };
        self.record(cause, started, result)
    }

    /// Validates registry `text` as if it were the registry file; unless `validate_only`,
    /// writes it over the file atomically and applies it.
    pub async fn apply_text(&mut self, text: &str, validate_only: bool) -> Result<Outcome, DaemonError> {
        let file = self.opts.config.clone();
        let loaded = config::load_str(text, &file)?;
        if validate_only {
            return Ok(Outcome::Unchanged);
        }
        write_atomically(&file, text).map_err(|source| DaemonError::Write { file: file.clone(), source })?;
        let started = Instant::now();
        let result = self.apply_loaded(loaded).await;
        self.record("lb-ctl config apply", started, result)
    }

    /// `lb-ctl ssl update`: writes `cert` and `key` over the files of the served certificates
    /// named `name` (without one: those sharing a DNS name with the new certificate), then
    /// reloads. A reload that fails puts the old files back.
    pub async fn ssl_update(
        &mut self,
        name: Option<&str>,
        cert: &str,
        key: &str,
    ) -> Result<serde_json::Value, DaemonError> {
        let new = crate::tls::Certificate::from_pem(
            cert.as_bytes(),
            key.as_bytes(),
            Path::new("the new certificate"),
            Path::new("the new key"),
        )?;
        let targets: Vec<_> = (self.edge.certificates().into_iter())
            .filter(|(_, c)| match name {
                Some(n) => c.name == n,
                None => c.names.iter().any(|x| new.names.contains(x)),
            })
            .collect();
        if targets.is_empty() {
            return Err(DaemonError::Unknown(match name {
                Some(n) => format!("no served certificate is named `{n}`"),
                None => format!("no served certificate is for {}", new.names.join(", ")),
            }));
        }
        let files: BTreeMap<&Path, &str> =
            targets.iter().flat_map(|(_, c)| [(c.key.as_path(), key), (c.file.as_path(), cert)]).collect();
        let mut old = Vec::new();
        for (&path, text) in &files {
            old.push((path, std::fs::read_to_string(path).ok()));
            write_atomically(path, text)
                .map_err(|source| DaemonError::Write { file: path.to_owned(), source })?;
        }
        if let Err(e) = self.reload("lb-ctl ssl update").await {
            for (path, text) in old.iter().filter_map(|(p, t)| Some((p, t.as_ref()?))) {
                if let Err(e) = write_atomically(path, text) {
                    error!(file = %path.display(), error = %e, "cannot restore the old certificate file");
                }
            }
            let _ = self.reload("lb-ctl ssl update failed: old certificate files restored").await;
            return Err(e);
        }
        info!(event = "ssl-update", names = ?new.names, not_after = new.not_after, "certificate replaced");
        Ok(serde_json::json!({
            "names": new.names,
            "not_after_unix": new.not_after,
            "generation": self.generation,
            "updated": targets.iter().map(|(port, c)| serde_json::json!({
                "listener": port, "name": c.name, "cert": c.file.display().to_string(),
                "key": c.key.display().to_string(),
            })).collect::<Vec<_>>(),
        }))
    }

    fn record(
        &mut self,
        cause: &str,
        started: Instant,
        result: Result<Outcome, DaemonError>,
    ) -> Result<Outcome, DaemonError> {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        match &result {
            Ok(outcome) => {
                self.reloads_ok += 1;
                self.last_reload =
                    Some(ReloadRecord { at: SystemTime::now(), error: None, problems: Vec::new() });
                if *outcome == Outcome::Changed {
                    info!(
                        event = "reload",
                        %cause,
                        generation = self.generation,
                        ms = format!("{ms:.1}"),
                        "registry applied"
                    );
                } else {
                    info!(event = "reload", %cause, generation = self.generation, "registry unchanged");
                }
            }
            Err(DaemonError::Maps(e)) if e.is_inconsistent() => {}
            Err(e) => {
                self.reloads_failed += 1;
                let problems: Vec<Problem> = match e {
                    DaemonError::Config(c) => c.problems().to_vec(),
                    _ => Vec::new(),
                };
                let message = crate::logging::error_chain(e);
                error!(event = "reload", %cause, error = %message, "reload failed; the last good registry keeps serving");
                self.last_reload =
                    Some(ReloadRecord { at: SystemTime::now(), error: Some(message), problems });
            }
        }
        result
    }

    async fn apply_loaded(&mut self, loaded: Loaded) -> Result<Outcome, DaemonError> {
        if loaded.registry == self.loaded.registry {
            // The same registry, but a certificate file may have been renewed.
            let certificates = self.edge.tls_files_changed(&loaded.registry);
            if certificates {
                self.edge.apply(&loaded.registry, &self.over)?;
                info!(event = "certificates", "certificates reloaded");
                self.generation += 1;
            }
            self.loaded = loaded;
            return Ok(if certificates { Outcome::Changed } else { Outcome::Unchanged });
        }
        let t0 = Instant::now();
        let resolved = resolve_hosts(&loaded.registry, &mut self.hops).await?;
        let t1 = Instant::now();
        // A backend the reload adds takes no new flows before its first check passes (one
        // probe, within a fifth of the interval): a rollout never sends traffic to a dead one.
        let mut over = self.over.clone();
        for t in health_targets(&loaded.registry, &resolved) {
            if !self.checker.checks(&t.key) {
                over.down
                    .insert((t.key.service, t.key.backend), "awaiting its first health check".to_owned());
            }
        }
        // Listeners bind first: a port in use fails the reload before anything changed.
        self.edge.apply(&loaded.registry, &over)?;
        let plan = make_plan(&loaded.registry, &self.node, &resolved, self.maps.applied(), &over);
        let t2 = Instant::now();
        self.maps.apply(&plan)?;
        let t3 = Instant::now();
        debug!(
            resolve_ms = (t1 - t0).as_secs_f64() * 1e3,
            plan_ms = (t2 - t1).as_secs_f64() * 1e3,
            apply_ms = (t3 - t2).as_secs_f64() * 1e3,
            "reload phases"
        );
        self.over = over;
        self.loaded = loaded;
        self.resolved = resolved;
        self.generation += 1;
        self.sync_checks();
        Ok(Outcome::Changed)
    }

    /// Starts, keeps or stops probes to match the registry, and forgets the state of backends
    /// that left it (their health, their drains).
    fn sync_checks(&mut self) {
        let targets = health_targets(&self.loaded.registry, &self.resolved);
        let keys: BTreeSet<Key> = targets.iter().map(|t| t.key.clone()).collect();
        self.health.retain(|k, _| keys.contains(k));
        self.over.down.retain(|(s, b), _| keys.contains(&Key { service: s.clone(), backend: b.clone() }));
        let known = all_keys(&self.loaded.registry);
        self.over.drained.retain(|k| known.contains(k));
        self.checker.sync(targets);
    }

    /// Applies a batch of probe results (all that were waiting), then re-plans once if any
    /// changed what a table may hold.
    pub fn on_reports(&mut self, reports: &[Report]) -> Result<Outcome, DaemonError> {
        let mut replan = false;
        for r in reports {
            replan |= self.record_report(r);
        }
        if replan { self.replan() } else { Ok(Outcome::Unchanged) }
    }

    /// Applies one probe result; true when a backend entered or left the down set.
    fn record_report(&mut self, r: &Report) -> bool {
        let Some(target) = self.checker.target(&r.key) else { return false };
        let (fall, rise) = (target.check.fall, target.check.rise);
        let status = self.health.entry(r.key.clone()).or_default();
        let Some(state) = status.record(&r.result, fall, rise) else { return false };
        let pair = (r.key.service.clone(), r.key.backend.clone());
        match state {
            State::Down => {
                let reason = status.last_error.clone().unwrap_or_default();
                warn!(event = "health", service = %r.key.service, backend = %r.key.backend, state = "down", %reason, "backend down");
                self.over.down.insert(pair, reason);
                true
            }
            State::Up | State::Unknown => {
                info!(event = "health", service = %r.key.service, backend = %r.key.backend, state = "up", "backend up");
                self.over.down.remove(&pair).is_some()
            }
        }
    }

    /// Drains (`true`) or re-enables a backend of a service until lbd stops.
    pub fn set_drained(
        &mut self,
        service: &str,
        backend: &str,
        drained: bool,
    ) -> Result<Outcome, DaemonError> {
        let pair = (service.to_owned(), backend.to_owned());
        if !all_keys(&self.loaded.registry).contains(&pair) {
            return Err(DaemonError::Unknown(format!("no backend `{backend}` in service `{service}`")));
        }
        let changed = if drained { self.over.drained.insert(pair) } else { self.over.drained.remove(&pair) };
        info!(event = "drain", %service, %backend, drained, "operator {}", if drained { "drain" } else { "enable" });
        if changed { self.replan() } else { Ok(Outcome::Unchanged) }
    }

    /// After neighbour, route, address or link changes: when a next hop's MAC or any route
    /// changed, re-resolves and re-plans (a backend that had no route joins once it has one).
    pub async fn refresh_next_hops(&mut self) -> Result<Outcome, DaemonError> {
        let ifindex = self.hops.link().index;
        let table =
            crate::netlink::blocking(move |r| r.neighbours(ifindex)).await.map_err(DaemonError::Resolve)?;
        let known: BTreeMap<IpAddr, [u8; 6]> = (self.resolved.values().filter_map(|r| r.as_ref().ok()))
            .map(|r| (r.via.unwrap_or(r.addr), r.mac))
            .collect();
        let moved = table.iter().any(|n| known.get(&n.addr).is_some_and(|mac| *mac != n.mac));
        if !moved && !self.hops.routes_changed() {
            return Ok(Outcome::Unchanged);
        }
        let resolved = resolve_hosts(&self.loaded.registry, &mut self.hops).await?;
        if resolved == self.resolved {
            return Ok(Outcome::Unchanged);
        }
        info!(event = "neighbours", "backend next hops changed");
        self.resolved = resolved;
        self.replan()
    }

    fn replan(&mut self) -> Result<Outcome, DaemonError> {
        self.edge.set_overrides(&self.over);
        let prev_serving = self.maps.applied().map(|p| p.serving.clone()).unwrap_or_default();
        let prev = self.maps.applied().map(|p| p.ids.clone()).unwrap_or_default();
        let plan = plan::plan(&self.loaded.registry, &self.node, &self.resolved, &prev, &self.over).0;
        if self.maps.applied() == Some(&plan) {
            return Ok(Outcome::Unchanged);
        }
        for (service, how) in &plan.serving {
            if prev_serving.get(service) == Some(how) {
                continue;
            }
            match how {
                Serving::Primaries => {
                    info!(event = "serving", %service, serving = how.as_str(), "service on its primaries");
                }
                Serving::Fallback => {
                    warn!(event = "serving", %service, serving = how.as_str(), "every primary is down: the fallback backends take new flows");
                }
                Serving::FailOpen => {
                    error!(event = "serving", %service, serving = how.as_str(), "every backend is down: failing open, new flows go to all of them");
                }
                Serving::Nothing => {
                    error!(event = "serving", %service, serving = how.as_str(), "no backend can take new flows: new flows are dropped");
                }
            }
        }
        self.maps.apply(&plan)?;
        info!(event = "maps", vips = plan.vips.len(), backends = plan.backends.len(), "data plane updated");
        Ok(Outcome::Changed)
    }

    /// Everything status and metrics show.
    pub fn snapshot(&self) -> Result<Snapshot, DaemonError> {
        let Some(plan) = self.maps.applied() else {
            return Err(DaemonError::Unknown("no plan applied".into()));
        };
        let reg = &self.loaded.registry;
        let mut services = Vec::new();
        for (name, svc) in &reg.tcp {
            let planned = plan.services.get(name);
            let vip_entries: Vec<_> = plan.vips.iter().filter(|v| &v.service == name).collect();
            let (mut packets, mut bytes) = (0, 0);
            for v in &vip_entries {
                let t = self.maps.vip_stats(v.info.id)?;
                packets += t.packets;
                bytes += t.bytes;
            }
            let mut backends = Vec::new();
            for (b, role) in svc.all_backends() {
                let identity = b.identity();
                let p = planned.and_then(|ps| ps.iter().find(|p| p.identity == identity));
                let traffic = match p.and_then(|p| p.id) {
                    Some(id) => Some(self.maps.backend_stats(id)?),
                    None => None,
                };
                let mac = p.and_then(|p| p.id).and_then(|id| plan.backends.get(&id)).map(|b| b.mac);
                let mut report = self.backend_report(
                    name,
                    &identity,
                    role,
                    b.weight,
                    b.node.as_deref(),
                    p.map(|p| (p.weight, p.unusable.clone())),
                    traffic,
                );
                report.next_hop_mac = mac;
                if svc.mode == config::Mode::Proxy {
                    // The L4 proxy's connections, which lbd relays itself.
                    report.http = self.edge.stats(name, &identity);
                }
                backends.push(report);
            }
            services.push(ServiceReport {
                name: name.clone(),
                kind: "tcp",
                vip: svc.vip,
                port: Some(svc.port),
                protocols: svc.protocols.iter().map(|p| p.as_str()).collect(),
                mode: Some(svc.mode.as_str()),
                serving: plan.serving.get(name).map(|s| s.as_str()),
                when_all_down: svc.when_all_down.as_str(),
                packets,
                bytes,
                backends,
                http: None,
            });
        }
        services.extend(self.http_service_reports(reg));
        Ok(Snapshot {
            generation: self.generation,
            config_file: self.opts.config.display().to_string(),
            files: self.loaded.files.iter().map(|f| f.display().to_string()).collect(),
            iface: self.opts.iface.clone(),
            node: self.opts.node.clone().or_else(|| reg.node.clone()),
            uptime: self.started.elapsed(),
            reloads_ok: self.reloads_ok,
            reloads_failed: self.reloads_failed,
            last_reload: self.last_reload.clone(),
            services,
            counters: self.maps.counters()?.into_iter().map(|(c, n)| (c.name(), n)).collect(),
            certificates: self
                .edge
                .certificates()
                .into_iter()
                .map(|(listener, c)| report::CertReport {
                    listener,
                    name: c.name,
                    names: c.names,
                    file: c.file.display().to_string(),
                    not_after: c.not_after,
                })
                .collect(),
            tls_handshake_failures: self.edge.tls_failures(),
            rate_limited: self.edge.rate_limited(),
            cache: self.edge.cache(),
            edge_connections: self.edge.connections(),
        })
    }

    /// The HTTP services as the edge serves them.
    fn http_service_reports(&self, reg: &Registry) -> Vec<ServiceReport> {
        reg.http
            .iter()
            .map(|(name, svc)| {
                let backends = (svc.all_backends())
                    .map(|(b, role)| {
                        let id = b.identity();
                        let mut r =
                            self.backend_report(name, &id, role, b.weight, b.node.as_deref(), None, None);
                        r.http = self.edge.stats(name, &id);
                        r
                    })
                    .collect();
                ServiceReport {
                    name: name.clone(),
                    kind: "http",
                    vip: None,
                    port: None,
                    protocols: vec!["http"],
                    mode: None,
                    serving: None,
                    when_all_down: svc.when_all_down.as_str(),
                    packets: 0,
                    bytes: 0,
                    backends,
                    http: self.edge.traffic(name),
                }
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn backend_report(
        &self,
        service: &str,
        identity: &str,
        role: Role,
        weight: u32,
        node: Option<&str>,
        planned: Option<(u32, Option<String>)>,
        traffic: Option<lb_common::maps::Traffic>,
    ) -> BackendReport {
        let key = Key { service: service.to_owned(), backend: identity.to_owned() };
        let status = self.health.get(&key);
        let health = if self.checker.checks(&key) {
            status.map_or(State::Unknown, |s| s.state).as_str()
        } else {
            "unchecked"
        };
        BackendReport {
            backend: identity.to_owned(),
            role: role.as_str(),
            node: node.map(str::to_owned),
            weight,
            table_weight: planned.as_ref().map(|p| p.0),
            reason: planned.and_then(|p| p.1),
            health,
            drained: self.over.drained.contains(&(service.to_owned(), identity.to_owned())),
            checks: status.map_or(0, |s| s.checks),
            check_failures: status.map_or(0, |s| s.failures),
            last_check_latency: status.and_then(|s| s.last_latency),
            last_error: status.and_then(|s| s.last_error.clone()),
            packets: traffic.map(|t| t.packets),
            bytes: traffic.map(|t| t.bytes),
            next_hop_mac: None,
            http: None,
        }
    }

    /// Which backend a flow goes to, and why.
    pub fn lookup(&self, q: &report::LookupQuery) -> Result<serde_json::Value, DaemonError> {
        let plan = self.maps.applied().ok_or_else(|| DaemonError::Unknown("no plan applied".into()))?;
        let proto = match q.proto.as_str() {
            "tcp" => PROTO_TCP,
            "udp" => PROTO_UDP,
            other => return Err(DaemonError::Unknown(format!("protocol `{other}`: use tcp or udp"))),
        };
        let key = VipKey::new(q.dst, q.dport, proto);
        let vip = plan.vips.iter().find(|v| v.key == key).ok_or_else(|| {
            DaemonError::Unknown(format!("{}:{}/{} is not a VIP entry", q.dst, q.dport, q.proto))
        })?;
        if q.src.is_ipv4() != q.dst.is_ipv4() {
            return Err(DaemonError::Unknown("source and VIP are of different address families".into()));
        }
        let flow = flow_key(q, proto);
        let name_of = |id: u32| -> Option<String> {
            plan.services.get(&vip.service)?.iter().find(|b| b.id == Some(id)).map(|b| b.identity.clone())
        };
        let entry: Option<CtEntry> = self.maps.conntrack(&flow)?;
        let now = monotonic_coarse_ns();
        // The datapath's own decision, over the plan the maps hold and the kernel's entry.
        let slots = plan.tables.get(&vip.info.table).map(plan::TablePlan::slots).unwrap_or_default();
        let decide = |entry: Option<CtEntry>| {
            let view = PlanView::new(plan, (vip.info.table, &slots), entry.map(|e| (flow, e)), now);
            datapath::destination(&view, &plan.node, &vip.info, &flow)
        };
        let by_table = match decide(None) {
            Destination::Table(id) => name_of(id),
            _ => None,
        };
        let (backend, why) = match decide(entry) {
            Destination::Tracked(id) => (name_of(id), "conntrack: the flow is tracked to this backend"),
            Destination::Rebalanced(id) => {
                (name_of(id), "maglev: the flow's tracked backend left; it takes its table slot's backend")
            }
            Destination::Table(id) => (name_of(id), "maglev: a new flow takes its table slot's backend"),
            Destination::Nothing => (None, "no backend can take new flows: the packet would be dropped"),
        };
        let tracked_json = entry.map(|e| {
            serde_json::json!({
                "backend": name_of(e.backend),
                "idle_s": Duration::from_nanos(now.saturating_sub(e.last_seen)).as_secs_f64(),
                "state": e.state,
                "current": matches!(decide(Some(e)), Destination::Tracked(_)),
            })
        });
        let hash =
            lb_common::hash::flow_hash(flow.family, &flow.src, &flow.dst, flow.sport, flow.dport, flow.proto);
        let slot = (vip.info.table_size != 0).then(|| hash % vip.info.table_size);
        let health = backend.as_ref().map(|b| {
            let key = Key { service: vip.service.clone(), backend: b.clone() };
            self.health.get(&key).map_or("unknown", |s| s.state.as_str())
        });
        Ok(serde_json::json!({
            "service": vip.service,
            "backend": backend,
            "why": why,
            "hash": hash,
            "slot": slot,
            "table_size": vip.info.table_size,
            "table_backend": by_table,
            "conntrack": tracked_json,
            "health": health,
            "serving": plan.serving.get(&vip.service).map(|s| s.as_str()),
        }))
    }
}

fn flow_key(q: &report::LookupQuery, proto: u8) -> FlowKey {
    let (family, src) = addr_of(q.src);
    let (_, dst) = addr_of(q.dst);
    FlowKey {
        src,
        dst,
        sport: q.sport.to_be_bytes(),
        dport: q.dport.to_be_bytes(),
        proto,
        family,
        _pad: [0; 2],
    }
}

/// The clock the datapath stamps conntrack entries with (`bpf_ktime_get_coarse_ns`).
fn monotonic_coarse_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Every (service, backend identity) in the registry.
fn all_keys(reg: &Registry) -> BTreeSet<(String, String)> {
    let tcp = reg.tcp.iter().flat_map(|(n, s)| s.all_backends().map(move |(b, _)| (n.clone(), b.identity())));
    let http =
        reg.http.iter().flat_map(|(n, s)| s.all_backends().map(move |(b, _)| (n.clone(), b.identity())));
    tcp.chain(http).collect()
}

/// One probe target per checked backend.
fn health_targets(reg: &Registry, resolved: &Resolutions) -> Vec<Target> {
    let addr = |host: &str| resolved.get(host).and_then(|r| r.as_ref().ok()).map(|r| r.addr);
    // (service, its check, its backends): probes run over TCP, so UDP-only services are left out.
    let tcp = (reg.tcp.iter())
        .filter(|(_, s)| s.protocols.contains(&config::Protocol::Tcp))
        .map(|(n, s)| (n, &s.health, config::with_roles(&s.backends, &s.fallback)));
    let http = reg.http.iter().map(|(n, s)| (n, &s.health, config::with_roles(&s.backends, &s.fallback)));
    let mut out = Vec::new();
    for (name, check, backends) in tcp.chain(http) {
        if !check.enabled {
            continue;
        }
        out.extend(backends.map(|(b, _)| Target {
            key: Key { service: name.clone(), backend: b.identity() },
            host: b.host.clone(),
            addr: addr(&b.host),
            port: check.port.unwrap_or(b.port),
            check: check.clone(),
        }));
    }
    out
}

async fn resolve_hosts(reg: &Registry, hops: &mut Resolver) -> Result<Resolutions, DaemonError> {
    let hosts = plan::xdp_backend_hosts(reg);
    hops.backends(&hosts).await.map_err(DaemonError::Resolve)
}

fn make_plan(
    reg: &Registry,
    node: &NodeFacts,
    resolved: &Resolutions,
    applied: Option<&DataPlan>,
    over: &Overrides,
) -> DataPlan {
    let prev = applied.map(|p| p.ids.clone()).unwrap_or_default();
    let (plan, skipped) = plan::plan(reg, node, resolved, &prev, over);
    for s in &skipped {
        info!(service = %s.service, reason = %s.reason, "service not in the XDP data plane");
    }
    // One line per backend whose place in a table changed: with a thousand backends, a reload
    // that touches one service logs a few lines, not a thousand.
    let unchanged = |service: &str, b: &plan::ServiceBackend| {
        applied.and_then(|p| p.services.get(service)).is_some_and(|bs| bs.contains(b))
    };
    for (service, backends) in &plan.services {
        for b in backends.iter().filter(|b| !unchanged(service, b)) {
            match &b.unusable {
                None => {
                    info!(%service, backend = %b.identity, id = ?b.id, weight = b.weight, "backend planned");
                }
                Some(reason) => warn!(%service, backend = %b.identity, %reason, "backend takes no new flows"),
            }
        }
    }
    plan
}

/// Replaces `file` with `text` so readers see the old or the new file, never a mix.
fn write_atomically(file: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let dir = file.parent().unwrap_or_else(|| Path::new("."));
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.lb-ctl.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    // A replaced file keeps its mode: a private key stays private.
    if let Ok(m) = std::fs::metadata(file) {
        f.set_permissions(m.permissions())?;
    }
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, file)
}
