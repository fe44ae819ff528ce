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
    try_tcp_exchange(addr, data, half_close).unwrap_or_else(|e| panic!("{e}"))
}

/// [`tcp_exchange`], failing with an error that names the step and `addr` rather than panicking
/// (for the demo, which reports and goes on).
///
/// # Errors
/// When connecting, sending or reading fails or times out.
pub fn try_tcp_exchange(addr: SocketAddr, data: &[u8], half_close: bool) -> std::io::Result<Vec<u8>> {
    let step = |what: &'static str| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what} {addr}: {e}"))
    };
    let mut s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(step("connect"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(data).map_err(step("send to"))?;
    if half_close {
        s.shutdown(std::net::Shutdown::Write)?;
    }
    let mut back = Vec::new();
    s.read_to_end(&mut back).map_err(step("read from"))?;
    Ok(back)
}

/// Sends `data` from a fresh socket (a new source port, so a new flow) and returns the answer,
/// which must come from `addr` itself.
///
/// # Panics
/// When no answer comes within [`IO_TIMEOUT`] or it comes from another address.
#[must_use]
pub fn udp_exchange(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    try_udp_exchange(addr, data).unwrap_or_else(|e| panic!("{e}"))
}

/// [`udp_exchange`], failing with an error rather than panicking (for the demo).
///
/// # Errors
/// When no answer comes within [`IO_TIMEOUT`] or it comes from another address.
pub fn try_udp_exchange(addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let any: IpAddr =
        if addr.is_ipv6() { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    let s = UdpSocket::bind((any, 0))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.send_to(data, addr).map_err(|e| std::io::Error::new(e.kind(), format!("send to {addr}: {e}")))?;
    let mut buf = vec![0u8; 65536];
    let (n, from) = s
        .recv_from(&mut buf)
        .map_err(|e| std::io::Error::new(e.kind(), format!("UDP echo from {addr}: {e}")))?;
    if from != addr {
        return Err(std::io::Error::other(format!(
            "the reply must come from the address the client talked to ({addr}), not {from}"
        )));
    }
    buf.truncate(n);
    Ok(buf)
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
