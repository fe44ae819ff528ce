//! Wire header layouts and the packet buffer the datapath reads and rewrites.
//!
//! Headers are made of byte arrays only, so they have alignment 1 and can be read at any
//! offset of a packet without unaligned-access concerns, in the kernel and on the host alike.

/// A header type that may be viewed in place inside a packet buffer.
///
/// # Safety
/// Implementors are `#[repr(C)]`, have alignment 1, and every bit pattern is a valid value.
pub unsafe trait Header: Copy {}

/// Headers are only ever read at offsets below this. The bound lets the verifier accept packet
/// arithmetic with offsets that were kept in map memory (it tracks no bounds there); the host
/// buffer applies the same bound, so kernel and model agree.
pub const MAX_HEADER_OFFSET: usize = 1024;

/// A packet buffer: the kernel's XDP frame, or a byte buffer on the host.
pub trait Packet {
    /// Length of the frame in bytes.
    fn len(&self) -> usize;

    /// True for an empty frame.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The header of type `H` at `offset`, if all of its bytes are inside the frame and
    /// `offset` is at most [`MAX_HEADER_OFFSET`].
    fn header<H: Header>(&mut self, offset: usize) -> Option<&mut H>;

    /// Moves the start of the frame by `delta` bytes: negative prepends room (for an outer
    /// header), positive strips bytes. Fails, changing nothing, when the headroom would run out
    /// or less than an Ethernet header would remain. Headers obtained before are stale after.
    fn adjust_head(&mut self, delta: i32) -> bool;
}

macro_rules! headers {
    ($($(#[$m:meta])* $name:ident = $len:expr;)*) => {$(
        // SAFETY: repr(C), built from u8 and byte arrays only.
        unsafe impl Header for $name {}
        const _: () = assert!(core::mem::size_of::<$name>() == $len);
    )*};
}

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IPV4: [u8; 2] = 0x0800u16.to_be_bytes();
pub const ETH_P_IPV6: [u8; 2] = 0x86ddu16.to_be_bytes();
pub const ETH_P_8021Q: [u8; 2] = 0x8100u16.to_be_bytes();
pub const ETH_P_8021AD: [u8; 2] = 0x88a8u16.to_be_bytes();

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

pub const IPV4_MIN_HLEN: usize = 20;
/// "More fragments" flag and fragment offset bits of [`Ipv4Hdr::frag_off`].
pub const IPV4_MF: u16 = 0x2000;
pub const IPV4_OFFSET_MASK: u16 = 0x1fff;
pub const IPV4_DF: u16 = 0x4000;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Hdr {
    #[must_use]
    pub const fn version(&self) -> u8 {
        self.version_ihl >> 4
    }

    /// Header length in bytes (IHL x 4); options included.
    #[must_use]
    pub const fn header_len(&self) -> usize {
        ((self.version_ihl & 0x0f) as usize) * 4
    }
}

pub const IPV6_HLEN: usize = 40;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20).
    pub vtc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// IPv6 extension header numbers that may precede the transport header.
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DEST_OPTS: u8 = 60;
pub const IPV6_AH: u8 = 51;
pub const IPV6_NO_NEXT: u8 = 59;

pub const IPV6_FRAG_HLEN: usize = 8;
/// "More fragments" bit of [`Ipv6FragHdr::frag_off`]; the offset is the upper 13 bits.
pub const IPV6_FRAG_M: u16 = 1;
pub const IPV6_FRAG_OFFSET_MASK: u16 = 0xfff8;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Ipv6FragHdr {
    pub next_header: u8,
    pub reserved: u8,
    pub frag_off: [u8; 2],
    pub id: [u8; 4],
}

/// The first four bytes of TCP and UDP headers.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PortsHdr {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}

pub const TCP_HLEN: usize = 20;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// Offset of the checksum in the TCP header.
pub const TCP_CHECK_OFF: usize = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TcpHdr {
    pub src: [u8; 2],
    pub dst: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub data_off: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg: [u8; 2],
}

pub const UDP_HLEN: usize = 8;
/// Offset of the checksum in the UDP header.
pub const UDP_CHECK_OFF: usize = 6;

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UdpHdr {
    pub src: [u8; 2],
    pub dst: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

pub const ICMP_HLEN: usize = 8;
pub const ICMP_ECHO_REPLY: u8 = 0;
pub const ICMP_DEST_UNREACH: u8 = 3;
pub const ICMP_FRAG_NEEDED: u8 = 4;
pub const ICMP_ECHO_REQUEST: u8 = 8;
pub const ICMPV6_PACKET_TOO_BIG: u8 = 2;
pub const ICMPV6_ECHO_REQUEST: u8 = 128;
pub const ICMPV6_ECHO_REPLY: u8 = 129;

/// ICMP and `ICMPv6` share this 8-byte header layout.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IcmpHdr {
    pub kind: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub rest: [u8; 4],
}

/// A 16-bit checksum field on its own.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Check {
    pub value: [u8; 2],
}

headers! {
    EthHdr = ETH_HLEN;
    Ipv4Hdr = IPV4_MIN_HLEN;
    Ipv6Hdr = IPV6_HLEN;
    Ipv6FragHdr = IPV6_FRAG_HLEN;
    PortsHdr = 4;
    TcpHdr = TCP_HLEN;
    UdpHdr = UDP_HLEN;
    IcmpHdr = ICMP_HLEN;
    Check = 2;
}

// SAFETY: a byte array has alignment 1 and accepts any bit pattern.
unsafe impl<const N: usize> Header for [u8; N] {}

/// Headroom XDP frames have in front of the packet (`XDP_PACKET_HEADROOM`).
pub const XDP_HEADROOM: usize = 256;

/// A host-side packet: a frame inside a buffer that has headroom in front of it, as XDP
/// frames do.
pub struct BytesPacket<'a> {
    buf: &'a mut [u8],
    start: usize,
    end: usize,
}

impl<'a> BytesPacket<'a> {
    /// The frame `buf[start..end]`; `buf[..start]` is headroom.
    ///
    /// # Panics
    /// When `start > end` or `end` lies beyond `buf`.
    #[must_use]
    pub fn new(buf: &'a mut [u8], start: usize, end: usize) -> Self {
        assert!(start <= end && end <= buf.len(), "frame {start}..{end} outside a {}-byte buffer", buf.len());
        Self { buf, start, end }
    }

    /// The frame as it is now.
    #[must_use]
    pub fn frame(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl Packet for BytesPacket<'_> {
    fn len(&self) -> usize {
        self.end - self.start
    }

    fn header<H: Header>(&mut self, offset: usize) -> Option<&mut H> {
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        let from = self.start.checked_add(offset)?;
        let to = from.checked_add(core::mem::size_of::<H>())?;
        if to > self.end {
            return None;
        }
        let bytes = &mut self.buf[from..to];
        // SAFETY: `bytes` holds exactly size_of::<H>() bytes; H has alignment 1 and accepts any
        // bit pattern (Header's contract); the borrow of `self` keeps the buffer exclusive.
        Some(unsafe { &mut *bytes.as_mut_ptr().cast::<H>() })
    }

    fn adjust_head(&mut self, delta: i32) -> bool {
        let Some(start) = self.start.checked_add_signed(delta as isize) else { return false };
        if start > self.end || self.end - start < ETH_HLEN {
            return false;
        }
        self.start = start;
        true
    }
}
