//! Wire header layouts and the packet buffer the datapath reads and rewrites.
//!
//! Headers are made of byte arrays only, so they have alignment 1 and can be read at any
//! offset of a packet without unaligned-access concerns, in the kernel and on the host alike.

/// A header type that may be viewed in place inside a packet buffer.
///
/// # Safety
/// Implementors are `#[repr(C)]`, have alignment 1, and every bit pattern is a valid value.
pub unsafe trait Header: Copy {}

/// A packet buffer: the kernel's XDP frame, or a byte buffer on the host.
pub trait Packet {
    /// Length of the frame in bytes.
    fn len(&self) -> usize;

    /// True for an empty frame.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The header of type `H` at `offset`, if all of its bytes are inside the frame.
    fn header<H: Header>(&mut self, offset: usize) -> Option<&mut H>;
}

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IPV4: [u8; 2] = 0x0800u16.to_be_bytes();

#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<EthHdr>() == ETH_HLEN);
// SAFETY: repr(C), byte arrays only.
unsafe impl Header for EthHdr {}

pub const IPV4_MIN_HLEN: usize = 20;
/// "More fragments" flag and fragment offset bits of [`Ipv4Hdr::frag_off`].
pub const IPV4_MF_OFFSET_MASK: u16 = 0x3fff;

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
const _: () = assert!(core::mem::size_of::<Ipv4Hdr>() == IPV4_MIN_HLEN);
// SAFETY: repr(C), u8 and byte arrays only.
unsafe impl Header for Ipv4Hdr {}

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

    /// True for any fragment: "more fragments" set, or a non-zero offset.
    #[must_use]
    pub const fn is_fragment(&self) -> bool {
        u16::from_be_bytes(self.frag_off) & IPV4_MF_OFFSET_MASK != 0
    }
}

/// The first four bytes of TCP and UDP headers.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PortsHdr {
    pub src: [u8; 2],
    pub dst: [u8; 2],
}
// SAFETY: repr(C), byte arrays only.
unsafe impl Header for PortsHdr {}

/// A host-side packet: a frame in a byte buffer.
pub struct BytesPacket<'a>(pub &'a mut [u8]);

impl Packet for BytesPacket<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn header<H: Header>(&mut self, offset: usize) -> Option<&mut H> {
        let end = offset.checked_add(core::mem::size_of::<H>())?;
        let bytes = self.0.get_mut(offset..end)?;
        // SAFETY: `bytes` holds exactly size_of::<H>() bytes; H has alignment 1 and accepts any
        // bit pattern (Header's contract); the borrow of `self` keeps the buffer exclusive.
        Some(unsafe { &mut *bytes.as_mut_ptr().cast::<H>() })
    }
}
