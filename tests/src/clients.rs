//! Real TCP and UDP clients for the tests: one exchange each, every read bounded by a timeout.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// A payload unique to `(tag, i)`, `len` bytes after the tag: long payloads span several
/// TCP segments.
#[must_use]
pub fn payload(tag: &str, i: usize, len: usize) -> Vec<u8> {
    let mut p = format!("{tag}-{i}:").into_bytes();
    p.extend((0..len).map(|j| b'a' + u8::try_from((i * 7 + j) % 26).expect("small")));
    p
}

/// Connects, sends `data` (then half-closes if `half_close`) and reads until the server closes.
///
/// # Panics
/// When connecting, sending or reading fails or times out.
#[must_use]
pub fn tcp_exchange(addr: SocketAddr, data: &[u8], half_close: bool) -> Vec<u8> {
    let mut s =
        TcpStream::connect_timeout(&addr, IO_TIMEOUT).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.write_all(data).unwrap_or_else(|e| panic!("send to {addr}: {e}"));
    if half_close {
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
    }
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap_or_else(|e| panic!("read from {addr}: {e}"));
    back
}

/// Sends `data` from a fresh socket (a new source port, so a new flow) and returns the answer,
/// which must come from `addr` itself.
///
/// # Panics
/// When no answer comes within [`IO_TIMEOUT`] or it comes from another address.
#[must_use]
pub fn udp_exchange(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let any: IpAddr =
        if addr.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    let s = UdpSocket::bind((any, 0)).expect("bind");
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.send_to(data, addr).unwrap_or_else(|e| panic!("send to {addr}: {e}"));
    let mut buf = vec![0u8; 65536];
    let (n, from) = s.recv_from(&mut buf).unwrap_or_else(|e| panic!("UDP echo from {addr}: {e}"));
    assert_eq!(from, addr, "the reply must come from the address the client talked to");
    buf[..n].to_vec()
}

/// The body of `GET /` at `addr`.
///
/// # Panics
/// When the exchange fails or the answer is not `200 OK`.
#[must_use]
pub fn http_get(addr: SocketAddr) -> String {
    let reply =
        crate::http::get(addr, &addr.to_string(), "/").unwrap_or_else(|e| panic!("GET / at {addr}: {e}"));
    assert_eq!(reply.status, 200, "{reply:?}");
    reply.body.trim().to_owned()
}

/// A counter from lbd's `data plane counters` log line (`name=N`).
///
/// # Panics
/// When the log has no such line or counter.
#[must_use]
pub fn logged_counter(log: &str, name: &str) -> u64 {
    let line = log.lines().find(|l| l.contains("data plane counters")).expect("counters line in the log");
    let prefix = format!("{name}=");
    line.split_whitespace()
        .find_map(|w| w.trim_matches('"').strip_prefix(prefix.as_str()).and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}
