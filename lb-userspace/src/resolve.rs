//! Backend hosts -> IP addresses (DNS unless literal) -> MAC addresses (neighbour table).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tracing::debug;

use crate::{
    netlink::{Link, NetlinkError, Rtnl},
    plan::{Resolutions, Resolved},
};

/// Resolves every host in `hosts` to an IPv4 address and its MAC on `link`, within `timeout`
/// for each stage. A host that fails gets the reason; only a broken netlink socket is an error.
pub async fn backends(
    hosts: &[&str],
    iface: &str,
    link: Link,
    timeout: Duration,
) -> Result<Resolutions, NetlinkError> {
    let mut addrs: HashMap<String, Result<IpAddr, String>> = HashMap::new();
    for host in hosts {
        addrs.insert((*host).to_owned(), address(host, timeout).await);
    }
    let mut wanted: Vec<IpAddr> = addrs
        .values()
        .filter_map(|a| a.as_ref().ok().copied())
        .collect();
    wanted.sort_unstable();
    wanted.dedup();

    let iface_owned = iface.to_owned();
    let macs = tokio::task::spawn_blocking(move || {
        Rtnl::open()?.resolve(&iface_owned, link.index, &wanted, timeout)
    })
    .await
    .map_err(|e| NetlinkError::Io(std::io::Error::other(e)))??;

    Ok(addrs
        .into_iter()
        .map(|(host, addr)| {
            let r = addr.and_then(|addr| match macs.get(&addr) {
                Some(Ok(mac)) => Ok(Resolved { addr, mac: *mac }),
                Some(Err(e)) => Err(e.to_string()),
                None => Err("not resolved".to_owned()),
            });
            (host, r)
        })
        .collect())
}

/// The IPv4 address of `host`: itself when it is a literal, else the first DNS answer.
async fn address(host: &str, timeout: Duration) -> Result<IpAddr, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return match ip {
            IpAddr::V4(_) => Ok(ip),
            IpAddr::V6(_) => Err("IPv6 backends are not supported by this version".to_owned()),
        };
    }
    debug!(host, "resolving backend host name");
    let answers = tokio::time::timeout(timeout, tokio::net::lookup_host((host, 0)))
        .await
        .map_err(|_| format!("DNS lookup of `{host}` timed out after {timeout:?}"))?
        .map_err(|e| format!("DNS lookup of `{host}` failed: {e}"))?;
    answers
        .map(|a: SocketAddr| a.ip())
        .find(IpAddr::is_ipv4)
        .ok_or_else(|| format!("`{host}` has no IPv4 address"))
}
