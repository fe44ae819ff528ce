//! A packet capture on one interface (`AF_PACKET`), to see which host really sent a frame.

use std::{
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use lb_common::packet::{BytesPacket, ETH_HLEN, ETH_P_IPV4, EthHdr, Ipv4Hdr, Packet as _};

/// Socket receive buffer for a capture: room for every frame of a bounded test run.
const CAPTURE_BUFFER: libc::c_int = 32 << 20;
/// Largest frame read back (the veths keep a 1500-byte MTU; this leaves room).
const MAX_FRAME: usize = 65536;

/// Captures IPv4 frames arriving on or leaving one interface. Open it inside the interface's
/// namespace ([`crate::netns::NetNs::run`]); read it anywhere.
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    /// # Panics
    /// When the socket cannot be opened or bound.
    #[must_use]
    pub fn open(iface: &str) -> Self {
        let proto = u16::from_be_bytes(ETH_P_IPV4).to_be();
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, proto.into()) };
        assert!(raw >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: `raw` is a fresh, valid fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = CAPTURE_BUFFER;
        // SAFETY: valid fd and option value for the duration of the call.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const size).cast(),
                u32::try_from(size_of::<libc::c_int>()).expect("small"),
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", io::Error::last_os_error());
        let name = std::ffi::CString::new(iface).expect("iface name");
        // SAFETY: valid C string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert_ne!(ifindex, 0, "no interface {iface}");
        // SAFETY: all-zero is a valid sockaddr_ll; the fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).expect("small");
        sll.sll_protocol = proto;
        sll.sll_ifindex = i32::try_from(ifindex).expect("ifindex");
        // SAFETY: `sll` is a valid sockaddr_ll of the given size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sll).cast(),
                u32::try_from(size_of::<libc::sockaddr_ll>()).expect("small"),
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET to {iface}: {}", io::Error::last_os_error());
        Self { fd }
    }

    /// Every frame captured so far (and not yet read).
    #[must_use]
    pub fn frames(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { break };
            out.push(buf[..n].to_vec());
        }
        out
    }
}

/// Source MAC and IPv4 source address of an Ethernet/IPv4 frame.
#[must_use]
pub fn ipv4_source(frame: &[u8]) -> Option<([u8; 6], Ipv4Addr)> {
    let mut frame = frame.to_vec();
    let len = frame.len();
    let mut pkt = BytesPacket::new(&mut frame, 0, len);
    let eth = *pkt.header::<EthHdr>(0)?;
    let ip = pkt.header::<Ipv4Hdr>(ETH_HLEN)?;
    (eth.ether_type == ETH_P_IPV4).then(|| (eth.src, Ipv4Addr::from(ip.src)))
}
