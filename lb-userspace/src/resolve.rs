//! Backend hosts -> IP addresses (DNS unless literal) -> MAC addresses (neighbour table).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::task::JoinSet;
use tracing::debug;

use crate::{
    netlink::{self, Link, NetlinkError},
    plan::{Resolutions, Resolved},
};

/// Resolves every host in `hosts` to an IPv4 address and its MAC on `link`. Each stage (all
/// DNS lookups together, then all ARP resolutions together) takes at most `timeout`. A host
/// that fails gets the reason; only a broken netlink socket is an error.
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
    let macs =
        netlink::blocking(move |rtnl| rtnl.resolve(&iface_owned, link.index, &wanted, timeout)).await?;

    Ok(addrs
        .into_iter()
        .map(|(host, addr)| {
            let r = addr.and_then(|addr| match macs.get(&addr) {
                Some(Ok(mac)) => Ok(Resolved { addr, mac: *mac }),
                Some(Err(e)) => Err(crate::logging::error_chain(e)),
                None => Err("not resolved".to_owned()),
            });
            (host, r)
        })
        .collect())
}

/// The IPv4 address of each host, looked up concurrently, all within `timeout`.
async fn addresses(hosts: &[&str], timeout: Duration) -> HashMap<String, Result<IpAddr, String>> {
    let mut out = HashMap::new();
    let mut lookups = JoinSet::new();
    for host in hosts {
        match host.parse::<IpAddr>() {
            Ok(ip @ IpAddr::V4(_)) => {
                out.insert((*host).to_owned(), Ok(ip));
            }
            Ok(IpAddr::V6(_)) => {
                out.insert(
                    (*host).to_owned(),
                    Err("IPv6 backends are not supported by this version".to_owned()),
                );
            }
            Err(_) => {
                let host = (*host).to_owned();
                lookups.spawn(async move {
                    debug!(%host, "resolving backend host name");
                    let r = match tokio::net::lookup_host((host.as_str(), 0)).await {
                        Ok(answers) => answers
                            .map(|a: SocketAddr| a.ip())
                            .find(IpAddr::is_ipv4)
                            .ok_or_else(|| format!("`{host}` has no IPv4 address")),
                        Err(e) => Err(format!("DNS lookup of `{host}` failed: {e}")),
                    };
                    (host, r)
                });
            }
        }
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
    async fn literals_need_no_lookup_and_ipv6_is_refused() {
        let got = addresses(&["10.0.0.1", "::1"], std::time::Duration::from_millis(10)).await;
        assert_eq!(got["10.0.0.1"], Ok("10.0.0.1".parse().unwrap()));
        assert!(got["::1"].as_ref().unwrap_err().contains("IPv6"));
    }
}
