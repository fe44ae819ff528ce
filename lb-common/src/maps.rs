//! BPF map names, sizes, keys and values.
//!
//! Every value is `#[repr(C)]` with explicit padding fields and no `bool`/`Option`/enum, so
//! its layout is the same in the kernel and in userspace; a size assert next to each type
//! catches drift.
#![expect(clippy::pub_underscore_fields, reason = "explicit padding fields that users of these types zero")]

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Virtual services: [`VipKey`] -> [`VipInfo`].
pub const VIPS: &str = "LB_VIPS";
/// Per-VIP backend lists, flattened ([`vip_backend_index`]) -> backend id.
pub const VIP_BACKENDS: &str = "LB_VIP_BACKENDS";
/// Backend records: backend id -> [`Backend`].
pub const BACKENDS: &str = "LB_BACKENDS";
/// This node's own data plane facts: index 0 -> [`NodeConfig`].
pub const NODE: &str = "LB_NODE";
/// Per-CPU global counters: [`crate::datapath::Counter`] as index -> `u64`.
pub const COUNTERS: &str = "LB_COUNTERS";
/// Per-CPU per-VIP traffic: `vip.id` -> [`VipStats`].
pub const VIP_STATS: &str = "LB_VIP_STATS";

/// Number of virtual services (VIP, port, protocol) the data plane holds.
pub const MAX_VIPS: u32 = 1024;
/// Number of backend records across all services.
pub const MAX_BACKENDS: u32 = 4096;
/// Backends one virtual service can balance over.
pub const MAX_BACKENDS_PER_VIP: u32 = 64;

/// Index of `slot` of VIP `vip_id`'s list in the flattened [`VIP_BACKENDS`] map. Wrapping, so
/// corrupt ids give a wrong index (which the map bounds-checks) rather than a panic on the host.
#[inline(always)]
#[must_use]
pub const fn vip_backend_index(vip_id: u32, slot: u32) -> u32 {
    vip_id.wrapping_mul(MAX_BACKENDS_PER_VIP).wrapping_add(slot)
}

pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Forwarding mode of a virtual service ([`VipInfo::mode`]).
pub const MODE_DSR_L2: u8 = 1;

/// Identifies a virtual service as it appears in a packet: destination address, destination
/// port (network byte order, as on the wire), IP protocol and address family. IPv4 addresses
/// use the first four bytes of `addr`; the rest are zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VipKey {
    pub addr: [u8; 16],
    pub port: [u8; 2],
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

impl VipKey {
    #[must_use]
    pub const fn v4(addr: [u8; 4], port: u16, proto: u8) -> Self {
        let mut a = [0; 16];
        a[0] = addr[0];
        a[1] = addr[1];
        a[2] = addr[2];
        a[3] = addr[3];
        Self { addr: a, port: port.to_be_bytes(), proto, family: FAMILY_IPV4 }
    }

    #[must_use]
    pub fn ip(&self) -> IpAddr {
        ip_of(self.family, &self.addr)
    }
}

/// The address in `addr`, laid out as in [`VipKey::addr`].
fn ip_of(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == FAMILY_IPV6 {
        IpAddr::V6(Ipv6Addr::from(*addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    }
}

/// What the data plane knows about a virtual service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipInfo {
    /// Index of this service's backend list and stats slot; below [`MAX_VIPS`].
    pub id: u32,
    /// Usable entries in this service's backend list; 0 means every packet is dropped.
    pub backend_count: u32,
    /// One of the `MODE_*` constants.
    pub mode: u8,
    pub _pad: [u8; 3],
}
const _: () = assert!(core::mem::size_of::<VipInfo>() == 12);

/// A backend as the data plane needs it to forward a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address, laid out as in [`VipKey::addr`].
    pub addr: [u8; 16],
    /// Link-layer address frames to this backend are sent to (`dsr-l2`).
    pub mac: [u8; 6],
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

impl Backend {
    #[must_use]
    pub fn ip(&self) -> IpAddr {
        ip_of(self.family, &self.addr)
    }
}

/// Facts about the node the program runs on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// MAC address of the interface the program is attached to; forwarded frames leave with it
    /// as their source, so switches never learn a client's address on the balancer's port.
    pub mac: [u8; 6],
    /// 1 once userspace has written this record.
    pub configured: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<NodeConfig>() == 8);

/// Traffic a virtual service forwarded, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipStats {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<VipStats>() == 16);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], Copy, built from integers and byte arrays, and have
    // no implicit padding (checked by the size asserts above).
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipInfo {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::NodeConfig {}
    unsafe impl aya::Pod for super::VipStats {}
}
