//! Links and neighbours over rtnetlink (netlink-packet-route on a netlink-sys socket).
//!
//! Blocking and used at startup: callers in async code wrap it in `spawn_blocking`.

use std::{
    collections::HashMap,
    io,
    net::IpAddr,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage, AddressScope},
    link::{LinkAttribute, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// rtnetlink multicast groups followed: neighbour table changes, and the changes that can move
/// a route (links, addresses, routes).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_NEIGH: u32 = 3;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
/// Neighbour messages; every other type in those groups may change a route.
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
/// Size of `struct nlmsghdr`: the least a netlink message can be.
const NLMSG_HDRLEN: usize = 16;
/// Netlink messages are padded to this alignment.
const NLMSG_ALIGNTO: usize = 4;
/// Receive buffer for draining change notifications (only their types are read).
const DRAIN_BUFFER: usize = 16 * 1024;

pub type Mac = [u8; 6];

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The netlink socket failed.
    #[error("netlink socket")]
    Io(#[from] io::Error),
    /// The kernel's reply could not be decoded.
    #[error("cannot decode a netlink reply: {0}")]
    Decode(String),
    /// The kernel refused a request.
    #[error("kernel refused {request}")]
    Kernel { request: &'static str, source: io::Error },
    /// No interface has this name in this network namespace.
    #[error("no interface named `{0}` in this network namespace (see `ip link`)")]
    NoSuchInterface(String),
    /// The interface has no 6-byte link-layer address.
    #[error("interface `{0}` has no Ethernet address; lb needs an Ethernet interface")]
    NoMac(String),
    /// A neighbour did not answer address resolution in time.
    #[error(
        "no ARP/NDP answer from {addr} on `{iface}` within {waited:?}; dsr-l2 needs backends on the same L2 segment as `{iface}`"
    )]
    Unresolved { addr: IpAddr, iface: String, waited: Duration },
}

/// An interface as lb needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub mac: Mac,
}

/// How the kernel would reach an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Outgoing interface.
    pub oif: u32,
    /// The next-hop router, when the address is not on-link.
    pub gateway: Option<IpAddr>,
}

/// A neighbour table entry with a usable link-layer address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    pub addr: IpAddr,
    pub mac: Mac,
}

/// Runs `f` with a fresh [`Rtnl`] on tokio's blocking pool.
pub async fn blocking<T, F>(f: F) -> Result<T, NetlinkError>
where
    T: Send + 'static,
    F: FnOnce(&mut Rtnl) -> Result<T, NetlinkError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || f(&mut Rtnl::open()?))
        .await
        .map_err(|e| NetlinkError::Io(io::Error::other(e)))?
}

/// A request/response rtnetlink socket.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Self, NetlinkError> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Self { sock, seq: 0 })
    }

    /// Sends `msg` and collects the kernel's answers up to the final ACK or end of dump.
    fn request(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        what: &'static str,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        let mut buf = vec![0; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0)?;

        let mut out = Vec::new();
        loop {
            let (data, _) = self.sock.recv_from_full()?;
            let mut off = 0;
            while off + 4 <= data.len() {
                let len =
                    u32::from_ne_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]]) as usize;
                if len < NLMSG_HDRLEN || off + len > data.len() {
                    return Err(NetlinkError::Decode(format!("bad message length {len}")));
                }
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[off..off + len])
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                off += len.next_multiple_of(NLMSG_ALIGNTO);
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => match e.code {
                        None => return Ok(out),
                        Some(code) => {
                            return Err(NetlinkError::Kernel {
                                request: what,
                                source: io::Error::from_raw_os_error(-code.get()),
                            });
                        }
                    },
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }

    /// Index and MAC address of the interface called `name`.
    pub fn link(&mut self, name: &str) -> Result<Link, NetlinkError> {
        let index = if_index(name).ok_or_else(|| NetlinkError::NoSuchInterface(name.to_owned()))?;
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        let replies = self.request(RouteNetlinkMessage::GetLink(msg), NLM_F_ACK, "RTM_GETLINK")?;
        let mac = replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .flat_map(|l| &l.attributes)
            .find_map(|a| match a {
                LinkAttribute::Address(bytes) => Mac::try_from(bytes.as_slice()).ok(),
                _ => None,
            })
            .ok_or_else(|| NetlinkError::NoMac(name.to_owned()))?;
        Ok(Link { index, mac })
    }

    /// The route the kernel would use towards `addr` (`ip route get`).
    pub fn route_get(&mut self, addr: IpAddr) -> Result<Route, NetlinkError> {
        let mut msg = RouteMessage::default();
        let (family, len, dst) = match addr {
            IpAddr::V4(a) => (AddressFamily::Inet, 32, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, 128, RouteAddress::Inet6(a)),
        };
        msg.header.address_family = family;
        msg.header.destination_prefix_length = len;
        msg.attributes.push(RouteAttribute::Destination(dst));
        let replies = self.request(RouteNetlinkMessage::GetRoute(msg), NLM_F_ACK, "RTM_GETROUTE")?;
        let mut route = Route { oif: 0, gateway: None };
        for m in replies {
            let RouteNetlinkMessage::NewRoute(r) = m else { continue };
            for a in r.attributes {
                match a {
                    RouteAttribute::Oif(i) => route.oif = i,
                    RouteAttribute::Gateway(RouteAddress::Inet(g)) => route.gateway = Some(IpAddr::V4(g)),
                    RouteAttribute::Gateway(RouteAddress::Inet6(g)) => route.gateway = Some(IpAddr::V6(g)),
                    _ => {}
                }
            }
        }
        Ok(route)
    }

    /// Global-scope addresses of interface `ifindex`, in the kernel's order (primary first).
    pub fn addresses(&mut self, ifindex: u32) -> Result<Vec<IpAddr>, NetlinkError> {
        let replies = self.request(
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            NLM_F_DUMP,
            "RTM_GETADDR",
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a)
                    if a.header.index == ifindex && a.header.scope == AddressScope::Universe =>
                {
                    a.attributes.into_iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some(ip),
                        _ => None,
                    })
                }
                _ => None,
            })
            .collect())
    }

    /// Neighbours on `ifindex` whose link-layer address is usable for forwarding.
    pub fn neighbours(&mut self, ifindex: u32) -> Result<Vec<Neighbour>, NetlinkError> {
        let replies = self.request(
            RouteNetlinkMessage::GetNeighbour(NeighbourMessage::default()),
            NLM_F_DUMP,
            "RTM_GETNEIGH",
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewNeighbour(n) if n.header.ifindex == ifindex => usable(&n),
                _ => None,
            })
            .collect())
    }

    /// Asks the kernel to resolve `addr` on `ifindex` (an `NTF_USE` touch: it sends ARP or
    /// NDP solicitations with its own retry policy and creates the entry if missing).
    pub fn solicit(&mut self, ifindex: u32, addr: IpAddr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = match addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        msg.header.ifindex = ifindex;
        msg.header.state = NeighbourState::None;
        msg.header.flags = NeighbourFlags::Use;
        msg.attributes.push(NeighbourAttribute::Destination(match addr {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
        self.request(RouteNetlinkMessage::NewNeighbour(msg), NLM_F_ACK | NLM_F_CREATE, "RTM_NEWNEIGH")?;
        Ok(())
    }

    /// Resolves the MAC address of every address in `addrs` on interface `iface`, soliciting
    /// the ones the neighbour table lacks and waiting for the kernel's table-change events,
    /// at most `timeout` in all.
    pub fn resolve(
        &mut self,
        iface: &str,
        ifindex: u32,
        addrs: &[IpAddr],
        timeout: Duration,
    ) -> Result<HashMap<IpAddr, Result<Mac, NetlinkError>>, NetlinkError> {
        let start = Instant::now();
        // Subscribe first so no answer can arrive unseen between the dump and the wait.
        let events = neighbour_events()?;
        let mut buf = [0u8; 4096];
        let mut found = self.lookup(ifindex, addrs)?;
        let mut refused = HashMap::new();
        for addr in addrs.iter().filter(|a| !found.contains_key(a)) {
            if let Err(e) = self.solicit(ifindex, *addr) {
                refused.insert(*addr, e);
            }
        }
        while found.len() + refused.len() < addrs.len() {
            let Some(left) = timeout.checked_sub(start.elapsed()) else {
                break;
            };
            if !wait_readable(&events, left)? {
                break;
            }
            drain(&events, &mut buf);
            found = self.lookup(ifindex, addrs)?;
        }
        let unresolved = |addr| NetlinkError::Unresolved { addr, iface: iface.to_owned(), waited: timeout };
        Ok(addrs
            .iter()
            .map(|a| {
                let r = match (found.get(a), refused.remove(a)) {
                    (Some(mac), _) => Ok(*mac),
                    (None, Some(e)) => Err(e),
                    (None, None) => Err(unresolved(*a)),
                };
                (*a, r)
            })
            .collect())
    }

    fn lookup(&mut self, ifindex: u32, addrs: &[IpAddr]) -> Result<HashMap<IpAddr, Mac>, NetlinkError> {
        Ok(self
            .neighbours(ifindex)?
            .into_iter()
            .filter(|n| addrs.contains(&n.addr))
            .map(|n| (n.addr, n.mac))
            .collect())
    }
}

fn usable(n: &NeighbourMessage) -> Option<Neighbour> {
    let state_ok = matches!(
        n.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !state_ok {
        return None;
    }
    let mut addr = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                addr = Some(IpAddr::V4(*v4));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                addr = Some(IpAddr::V6(*v6));
            }
            NeighbourAttribute::LinkLayerAddress(b) => mac = Mac::try_from(b.as_slice()).ok(),
            _ => {}
        }
    }
    Some(Neighbour { addr: addr?, mac: mac? })
}

fn if_index(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

fn neighbour_events() -> Result<Socket, NetlinkError> {
    events(&[RTNLGRP_NEIGH])
}

fn change_events() -> Result<Socket, NetlinkError> {
    events(&[
        RTNLGRP_NEIGH,
        RTNLGRP_LINK,
        RTNLGRP_IPV4_IFADDR,
        RTNLGRP_IPV4_ROUTE,
        RTNLGRP_IPV6_IFADDR,
        RTNLGRP_IPV6_ROUTE,
    ])
}

fn events(groups: &[u32]) -> Result<Socket, NetlinkError> {
    let mut s = Socket::new(NETLINK_ROUTE)?;
    s.bind_auto()?;
    for &group in groups {
        s.add_membership(group)?;
    }
    s.set_non_blocking(true)?;
    Ok(s)
}

/// Waits until `s` has data or `timeout` passes; true when readable.
fn wait_readable(s: &Socket, timeout: Duration) -> Result<bool, NetlinkError> {
    let mut pfd = libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&raw mut pfd, 1, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(true);
        }
        return Err(e.into());
    }
    Ok(n > 0)
}

/// Reads every pending notification; true when one of them may have changed a route (or
/// some were lost: the socket overflowed).
fn drain(s: &Socket, buf: &mut [u8]) -> bool {
    let mut routes = false;
    loop {
        // SAFETY: `buf` is valid for writes of its length; the socket is non-blocking.
        let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            // ENOBUFS: notifications were dropped, any of which may have been a route's.
            return routes || io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS);
        }
        if n == 0 {
            return routes;
        }
        routes |= message_types(&buf[..n.cast_unsigned()]).any(|t| t != RTM_NEWNEIGH && t != RTM_DELNEIGH);
    }
}

/// The `nlmsg_type` of each message in one datagram.
fn message_types(mut datagram: &[u8]) -> impl Iterator<Item = u16> + '_ {
    std::iter::from_fn(move || {
        if datagram.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(datagram[..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(datagram[4..6].try_into().ok()?);
        let step = len.max(NLMSG_HDRLEN).next_multiple_of(NLMSG_ALIGNTO).min(datagram.len());
        datagram = &datagram[step..];
        Some(kind)
    })
}

/// Bumped whenever a route may have changed: route lookups cached at an older value are stale.
pub type RouteEpoch = std::sync::Arc<std::sync::atomic::AtomicU64>;

/// Follows the neighbour table, and links, addresses and routes: every batch of changes sends
/// one `()` on `tx` (never blocking; one pending notice covers later changes), after bumping
/// `routes` if the batch may have moved a route. Runs on its own thread until `tx` closes.
pub fn follow_changes(tx: tokio::sync::mpsc::Sender<()>, routes: RouteEpoch) -> Result<(), NetlinkError> {
    let events = change_events()?;
    std::thread::Builder::new()
        .name("lbd-netlink".into())
        .spawn(move || {
            let mut buf = vec![0u8; DRAIN_BUFFER];
            loop {
                match wait_readable(&events, Duration::from_secs(1)) {
                    Ok(true) => {
                        if drain(&events, &mut buf) {
                            routes.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        }
                        if let Err(tokio::sync::mpsc::error::TrySendError::Closed(())) = tx.try_send(()) {
                            return;
                        }
                    }
                    Ok(false) if tx.is_closed() => return,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "netlink events: giving up following MAC and route changes");
                        return;
                    }
                }
            }
        })
        .map_err(NetlinkError::Io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::message_types;

    fn header(len: u32, kind: u16) -> Vec<u8> {
        let mut h = len.to_ne_bytes().to_vec();
        h.extend(kind.to_ne_bytes());
        h.extend([0; 10]);
        h
    }

    #[test]
    fn every_message_of_a_datagram_is_typed_even_a_truncated_one() {
        let mut d = header(20, 28);
        d.extend([0; 4]);
        d.extend(header(18, 24)); // padded to 20
        d.extend([0; 4]);
        d.extend(header(400, 25)); // truncated by a short buffer
        assert_eq!(message_types(&d).collect::<Vec<_>>(), [28, 24, 25]);
        assert_eq!(message_types(&d[..10]).count(), 0);
    }
}
