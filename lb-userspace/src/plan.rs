//! Registry + what this node resolved about its backends -> what the data plane should hold.
//!
//! Pure: no I/O. The same inputs give the same plan (ids in registry order), so every node
//! with the same registry programs the same tables.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use lb_common::maps::{
    Backend, FAMILY_IPV4, FAMILY_IPV6, MAX_BACKENDS, MODE_DSR_L2, NodeConfig, VipInfo, VipKey,
};

use crate::config::{Mode, Registry};

/// Where a backend host was found on this node's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    pub addr: IpAddr,
    pub mac: [u8; 6],
}

/// Resolution result per backend `host` as written in the registry; `Err` holds the reason.
pub type Resolutions = HashMap<String, Result<Resolved, String>>;

/// The desired content of the data plane maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataPlan {
    pub node: NodeConfig,
    pub vips: Vec<VipPlan>,
    /// Backend records; the index is the backend id.
    pub backends: Vec<Backend>,
}

/// One (VIP, port, protocol) entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipPlan {
    pub service: String,
    pub key: VipKey,
    pub info: VipInfo,
    /// Backend ids, in registry order.
    pub backend_ids: Vec<u32>,
}

/// A registry entry the plan could not use, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub service: String,
    pub backend: Option<String>,
    pub reason: String,
}

/// Backend hosts of the services balanced in XDP: what the daemon must resolve.
#[must_use]
pub fn xdp_backend_hosts(reg: &Registry) -> Vec<&str> {
    let mut hosts: Vec<&str> = reg
        .tcp
        .values()
        .filter(|s| s.vip.is_some())
        .flat_map(|s| s.backends.iter().map(|b| b.host.as_str()))
        .collect();
    hosts.sort_unstable();
    hosts.dedup();
    hosts
}

/// Builds the data plane contents for `reg` on a node whose interface has `node_mac`.
#[must_use]
pub fn plan(reg: &Registry, node_mac: [u8; 6], resolved: &Resolutions) -> (DataPlan, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut vips = Vec::new();
    let mut backends: Vec<Backend> = Vec::new();
    let mut backend_ids: BTreeMap<([u8; 16], [u8; 6]), u32> = BTreeMap::new();

    for (name, svc) in &reg.tcp {
        let Some(IpAddr::V4(vip)) = svc.vip else {
            skipped.push(Skipped {
                service: name.clone(),
                backend: None,
                reason: "no IPv4 `vip`: not balanced in XDP".to_owned(),
            });
            continue;
        };
        let mut ids = Vec::new();
        for b in &svc.backends {
            let r = match resolved.get(&b.host) {
                Some(Ok(r)) => *r,
                Some(Err(reason)) => {
                    skipped.push(skip(name, &b.host, b.port, reason));
                    continue;
                }
                None => {
                    skipped.push(skip(name, &b.host, b.port, "not resolved"));
                    continue;
                }
            };
            let record = backend_record(r);
            let next = u32::try_from(backends.len()).unwrap_or(u32::MAX);
            let id = *backend_ids.entry((record.addr, record.mac)).or_insert(next);
            if id == next {
                if next >= MAX_BACKENDS {
                    skipped.push(skip(name, &b.host, b.port, "backend table full"));
                    continue;
                }
                backends.push(record);
            }
            ids.push(id);
        }
        for proto in &svc.protocols {
            let id = u32::try_from(vips.len()).unwrap_or(u32::MAX);
            vips.push(VipPlan {
                service: name.clone(),
                key: VipKey::v4(vip.octets(), svc.port, proto.number()),
                info: VipInfo {
                    id,
                    backend_count: u32::try_from(ids.len()).unwrap_or(0),
                    mode: match svc.mode {
                        Mode::DsrL2 => MODE_DSR_L2,
                    },
                    _pad: [0; 3],
                },
                backend_ids: ids.clone(),
            });
        }
    }
    let node = NodeConfig { mac: node_mac, configured: 1, _pad: 0 };
    (DataPlan { node, vips, backends }, skipped)
}

fn skip(service: &str, host: &str, port: u16, reason: &str) -> Skipped {
    Skipped {
        service: service.to_owned(),
        backend: Some(format!("{host}:{port}")),
        reason: reason.to_owned(),
    }
}

fn backend_record(r: Resolved) -> Backend {
    let mut addr = [0; 16];
    let family = match r.addr {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            FAMILY_IPV4
        }
        IpAddr::V6(a) => {
            addr = a.octets();
            FAMILY_IPV6
        }
    };
    Backend { addr, mac: r.mac, family, _pad: 0 }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config;

    const REG: &str = "\
version: 1
tcp:
  echo:
    vip: 10.100.0.1
    port: 7
    protocols: [tcp, udp]
    backends:
      - {host: 10.0.0.11, port: 7}
      - {host: 10.0.0.12, port: 7}
  web:
    vip: 10.100.0.1
    port: 80
    backends:
      - {host: 10.0.0.12, port: 80}
      - {host: gone.example, port: 80}
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
                Ok(Resolved { addr: host.parse().unwrap(), mac: [2, 0, 0, 0, 0, last] }),
            );
        }
        r.insert("gone.example".to_owned(), Err("DNS: no such host".to_owned()));
        r
    }

    fn reg() -> Registry {
        config::parse(REG, Path::new("t.yaml")).unwrap()
    }

    #[test]
    fn services_with_a_vip_become_one_entry_per_protocol_sharing_backend_records() {
        let (p, _) = plan(&reg(), [2, 0, 0, 0, 0, 1], &resolutions());
        let entries: Vec<(&str, u16, u8, Vec<u32>)> = p
            .vips
            .iter()
            .map(|v| (v.service.as_str(), u16::from_be_bytes(v.key.port), v.key.proto, v.backend_ids.clone()))
            .collect();
        assert_eq!(
            entries,
            vec![("echo", 7, 6, vec![0, 1]), ("echo", 7, 17, vec![0, 1]), ("web", 80, 6, vec![1])]
        );
        assert_eq!(p.vips.iter().map(|v| v.info.id).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(p.vips[2].info.backend_count, 1);
        assert_eq!(p.backends.len(), 2, "10.0.0.12 is one record shared by two services");
        assert_eq!(p.backends[1].mac, [2, 0, 0, 0, 0, 12]);
        assert_eq!(p.backends[1].addr[..4], [10, 0, 0, 12]);
        assert_eq!(p.node, NodeConfig { mac: [2, 0, 0, 0, 0, 1], configured: 1, _pad: 0 });
    }

    #[test]
    fn unresolved_backends_and_vip_less_services_are_reported() {
        let (_, skipped) = plan(&reg(), [0; 6], &resolutions());
        let got: Vec<(&str, Option<&str>, &str)> =
            skipped.iter().map(|s| (s.service.as_str(), s.backend.as_deref(), s.reason.as_str())).collect();
        assert_eq!(
            got,
            vec![
                ("redis-main", None, "no IPv4 `vip`: not balanced in XDP"),
                ("web", Some("gone.example:80"), "DNS: no such host"),
            ]
        );
    }

    #[test]
    fn the_same_registry_gives_the_same_plan() {
        assert_eq!(plan(&reg(), [1; 6], &resolutions()), plan(&reg(), [1; 6], &resolutions()));
    }

    #[test]
    fn only_backends_of_vip_services_need_resolving() {
        assert_eq!(xdp_backend_hosts(&reg()), vec!["10.0.0.11", "10.0.0.12", "gone.example"]);
    }
}
