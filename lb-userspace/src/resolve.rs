//! Backend hosts -> IP addresses (DNS unless literal) -> the next hop towards each (the backend
//! itself on-link, else its gateway) -> that next hop's MAC address (neighbour table).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::task::JoinSet;
use tracing::debug;

use crate::{
    logging::error_chain,
    netlink::{self, Link, NetlinkError},
    plan::{Resolutions, Resolved},
};

/// Resolves every host in `hosts` to an address, a next hop on `link` and that next hop's MAC.
/// Each stage (all DNS lookups together, then all neighbour resolutions together) takes at most
/// `timeout`. A host that fails gets the reason; only a broken netlink socket is an error.
pub async fn backends(
    hosts: &[&str],
    iface: &str,
    link: Link,
    timeout: Duration,
) -> Result<Resolutions, NetlinkError> {
    let addrs = addresses(hosts, timeout).await;
    let mut wanted: Vec<IpAddr> = addrs.values().filter_map(|a| a.as_ref().ok().copied()).collect();
    wanted.sort_unstable();
    wanted.dedup();

    let iface_owned = iface.to_owned();
    let hops = netlink::blocking(move |rtnl| {
        let mut routes = HashMap::new();
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
