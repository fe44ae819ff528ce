//! Backend hosts -> IP addresses (DNS unless literal) -> the next hop towards each (the backend
//! itself on-link, else its gateway) -> that next hop's MAC address (neighbour table).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::atomic::Ordering,
    time::Duration,
};

use tokio::task::JoinSet;
use tracing::debug;

use crate::{
    logging::error_chain,
    netlink::{self, Link, NetlinkError, RouteEpoch},
    plan::{Resolutions, Resolved},
};

/// Route lookups that succeeded (address -> output interface and gateway), kept while no
/// route, address or link changes: a reload then asks the kernel only about new addresses
/// (1000 lookups cost about 6 ms). [`netlink::follow_changes`] bumps the epoch.
#[derive(Debug, Default)]
pub struct RouteCache {
    epoch: RouteEpoch,
    /// The epoch the entries were looked up at.
    at: u64,
    routes: HashMap<IpAddr, (u32, Option<IpAddr>)>,
}

impl RouteCache {
    /// A cache invalidated through `epoch`.
    #[must_use]
    pub fn new(epoch: RouteEpoch) -> Self {
        let at = epoch.load(Ordering::Acquire);
        Self { epoch, at, routes: HashMap::new() }
    }

    /// Forgets the cached routes if any route may have changed since they were looked up;
    /// returns the epoch new lookups are made at.
    fn current(&mut self) -> u64 {
        let now = self.epoch.load(Ordering::Acquire);
        if now != self.at {
            self.routes.clear();
            self.at = now;
        }
        now
    }
}

/// Resolves backend hosts towards one interface, remembering routes between calls.
#[derive(Debug)]
pub struct Resolver {
    iface: String,
    link: Link,
    /// Bound on each stage: all DNS lookups together, then all neighbour resolutions.
    timeout: Duration,
    routes: RouteCache,
}

impl Resolver {
    #[must_use]
    pub fn new(iface: &str, link: Link, timeout: Duration, routes: RouteCache) -> Self {
        Self { iface: iface.to_owned(), link, timeout, routes }
    }

    #[must_use]
    pub fn link(&self) -> Link {
        self.link
    }

    /// True when a route, address or link changed since the last resolution.
    #[must_use]
    pub fn routes_changed(&self) -> bool {
        self.routes.epoch.load(Ordering::Acquire) != self.routes.at
    }

    /// Resolves every host in `hosts` to an address, a next hop on the interface and that next
    /// hop's MAC. A host that fails gets the reason; only a broken netlink socket is an error.
    pub async fn backends(&mut self, hosts: &[&str]) -> Result<Resolutions, NetlinkError> {
        backends(hosts, &self.iface, self.link, self.timeout, &mut self.routes).await
    }
}

async fn backends(
    hosts: &[&str],
    iface: &str,
    link: Link,
    timeout: Duration,
    cache: &mut RouteCache,
) -> Result<Resolutions, NetlinkError> {
    let addrs = addresses(hosts, timeout).await;
    let mut wanted: Vec<IpAddr> = addrs.values().filter_map(|a| a.as_ref().ok().copied()).collect();
    wanted.sort_unstable();
    wanted.dedup();
    // Read before the lookups: a change during them bumps the epoch past it, so what they
    // find is dropped at the next call.
    let epoch = cache.current();
    let mut routes: HashMap<IpAddr, Result<(u32, Option<IpAddr>), NetlinkError>> =
        HashMap::with_capacity(wanted.len());
    wanted.retain(|addr| match cache.routes.get(addr) {
        Some(r) => {
            routes.insert(*addr, Ok(*r));
            false
        }
        None => true,
    });

    let iface_owned = iface.to_owned();
    let hops = netlink::blocking(move |rtnl| {
        for addr in wanted {
            let r = rtnl.route_get(addr).map(|r| (r.oif, r.gateway));
            routes.insert(addr, r);
        }
        let mut next_hops: Vec<IpAddr> = (routes.iter())
            .filter_map(|(a, r)| match r {
                Ok((oif, via)) if *oif == link.index => Some(via.unwrap_or(*a)),
                _ => None,
            })
            .collect();
        next_hops.sort_unstable();
        next_hops.dedup();
        let macs = rtnl.resolve(&iface_owned, link.index, &next_hops, timeout)?;
        Ok((routes, macs))
    })
    .await?;
    let (routes, macs) = hops;
    if cache.at == epoch {
        cache.routes.extend(routes.iter().filter_map(|(a, r)| r.as_ref().ok().map(|r| (*a, *r))));
    }

    Ok(addrs
        .into_iter()
        .map(|(host, addr)| {
            let r = addr.and_then(|addr| {
                let (oif, via) = match routes.get(&addr) {
                    Some(Ok(r)) => *r,
                    Some(Err(e)) => return Err(format!("no route to {addr}: {}", error_chain(e))),
                    None => return Err("not resolved".to_owned()),
                };
                if oif != link.index {
                    return Err(format!(
                        "{addr} is reached through another interface (index {oif}), not `{iface}`"
                    ));
                }
                match macs.get(&via.unwrap_or(addr)) {
                    Some(Ok(mac)) => Ok(Resolved { addr, mac: *mac, via }),
                    Some(Err(e)) => Err(error_chain(e)),
                    None => Err("not resolved".to_owned()),
                }
            });
            (host, r)
        })
        .collect())
}

/// The address of each host, looked up concurrently, all within `timeout`.
async fn addresses(hosts: &[&str], timeout: Duration) -> HashMap<String, Result<IpAddr, String>> {
    let mut out = HashMap::new();
    let mut lookups = JoinSet::new();
    for host in hosts {
        if let Ok(ip) = host.parse::<IpAddr>() {
            out.insert((*host).to_owned(), Ok(ip));
            continue;
        }
        let host = (*host).to_owned();
        lookups.spawn(async move {
            debug!(%host, "resolving backend host name");
            let r = match tokio::net::lookup_host((host.as_str(), 0)).await {
                // IPv4 first: the answer order otherwise depends on the resolver's mood.
                Ok(answers) => {
                    let ips: Vec<IpAddr> = answers.map(|a: SocketAddr| a.ip()).collect();
                    ips.iter()
                        .find(|ip| ip.is_ipv4())
                        .or(ips.first())
                        .copied()
                        .ok_or_else(|| format!("`{host}` has no address"))
                }
                Err(e) => Err(format!("DNS lookup of `{host}` failed: {e}")),
            };
            (host, r)
        });
    }
    let deadline = tokio::time::Instant::now() + timeout;
    while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, lookups.join_next()).await {
        if let Ok((host, r)) = joined {
            out.insert(host, r);
        }
    }
    for host in hosts {
        out.entry((*host).to_owned())
            .or_insert_with(|| Err(format!("DNS lookup of `{host}` timed out after {timeout:?}")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::addresses;

    #[tokio::test]
    async fn literals_need_no_lookup() {
        let got = addresses(&["10.0.0.1", "2001:db8::1"], std::time::Duration::from_millis(10)).await;
        assert_eq!(got["10.0.0.1"], Ok("10.0.0.1".parse().unwrap()));
        assert_eq!(got["2001:db8::1"], Ok("2001:db8::1".parse().unwrap()));
    }
}
