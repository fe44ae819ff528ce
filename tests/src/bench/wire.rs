//! How long requests spend inside a proxy, read off the wire: a `tcpdump` capture on the
//! proxy's interface pairs each HTTP/1.1 request arriving from a client with the answer
//! leaving to it (residence), and each request sent to the backend with its answer. wrk's
//! latency also holds the client's own waits for a CPU, which on a shared two-core host
//! depend on the proxy's threads as much as on its speed; the wire shows the proxy alone.

use std::collections::{HashMap, VecDeque};

/// Request-to-answer times, in seconds.
#[derive(Debug, Default)]
pub struct Times {
    /// From a client's request arriving to the answer leaving to it.
    pub front: Vec<f64>,
    /// From a request leaving for the backend to its answer arriving.
    pub back: Vec<f64>,
}

/// One TCP segment with data: when, from, to, and the first bytes of its payload.
struct Segment<'a> {
    at: f64,
    from: ([u8; 4], u16),
    to: ([u8; 4], u16),
    data: &'a [u8],
}

/// The TCP segments with data in a pcap capture of Ethernet frames (IPv4 only).
fn segments(pcap: &[u8]) -> impl Iterator<Item = Segment<'_>> {
    let magic = pcap.get(..4).map(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
    let nanos = magic == Some(0xa1b2_3c4d);
    let u32_at = |b: &[u8], i: usize| b.get(i..i + 4).map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]));
    let mut at = 24;
    std::iter::from_fn(move || {
        loop {
            let (secs, frac, len) =
                (u32_at(pcap, at)?, u32_at(pcap, at + 4)?, u32_at(pcap, at + 8)? as usize);
            let frame = pcap.get(at + 16..at + 16 + len)?;
            at += 16 + len;
            let t = f64::from(secs) + f64::from(frac) / if nanos { 1e9 } else { 1e6 };
            if let Some(s) = tcp(frame, t) {
                return Some(s);
            }
        }
    })
}

/// The TCP segment in an Ethernet frame, if it carries data.
fn tcp(frame: &[u8], at: f64) -> Option<Segment<'_>> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    let ip = frame.get(14..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let addr = |i: usize| -> Option<[u8; 4]> { ip.get(i..i + 4)?.try_into().ok() };
    let (src, dst) = (addr(12)?, addr(16)?);
    let seg = ip.get(ihl..)?;
    let port = |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*seg.get(i)?, *seg.get(i + 1)?])) };
    let (sp, dp) = (port(0)?, port(2)?);
    let off = usize::from(seg.get(12)? >> 4) * 4;
    let payload = total.checked_sub(ihl + off).filter(|n| *n > 0)?;
    // Captured short (snaplen): the payload's first bytes are enough to tell its kind.
    let data = seg.get(off..).map_or(&[][..], |d| &d[..d.len().min(payload)]);
    Some(Segment { at, from: (src, sp), to: (dst, dp), data })
}

/// Request-to-answer times of HTTP/1.1 exchanges in `pcap`: clients talking to `front` (the
/// proxy's port), the proxy talking to `back` (the backend's). Each request is paired with
/// the next answer on its connection (no pipelining), by their first bytes.
#[must_use]
pub fn times(pcap: &[u8], front: u16, back: u16) -> Times {
    let mut asked: HashMap<([u8; 4], u16), VecDeque<f64>> = HashMap::new();
    let mut out = Times::default();
    for s in segments(pcap) {
        let request = s.data.starts_with(b"GET ") || s.data.starts_with(b"POST ");
        let answer = s.data.starts_with(b"HTTP/1.");
        if request && (s.to.1 == front || s.to.1 == back) {
            asked.entry(s.from).or_default().push_back(s.at);
        } else if answer
            && (s.from.1 == front || s.from.1 == back)
            && let Some(t0) = asked.get_mut(&s.to).and_then(VecDeque::pop_front)
        {
            let list = if s.from.1 == front { &mut out.front } else { &mut out.back };
            list.push(s.at - t0);
        }
    }
    out
}

/// The `p` quantile (0..1) of `v`, in milliseconds.
#[must_use]
pub fn quantile_ms(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into v"
    )]
    let i = ((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1));
    v.get(i).map_or(f64::NAN, |s| s * 1e3)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pcap record of an Ethernet/IPv4/TCP frame with `data`, at `us` microseconds.
    fn frame(us: u32, src: ([u8; 4], u16), dst: ([u8; 4], u16), data: &[u8]) -> Vec<u8> {
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&u16::try_from(20 + 20 + data.len()).unwrap().to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, 6, 0, 0]);
        ip.extend_from_slice(&src.0);
        ip.extend_from_slice(&dst.0);
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&src.1.to_be_bytes());
        tcp.extend_from_slice(&dst.1.to_be_bytes());
        tcp.extend_from_slice(&[0; 8]);
        tcp.extend_from_slice(&[0x50, 0x18, 0, 0, 0, 0, 0, 0]);
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend(ip);
        f.extend(tcp);
        f.extend_from_slice(data);
        let mut rec = Vec::new();
        rec.extend_from_slice(&(us / 1_000_000).to_le_bytes());
        rec.extend_from_slice(&(us % 1_000_000).to_le_bytes());
        rec.extend_from_slice(&u32::try_from(f.len()).unwrap().to_le_bytes());
        rec.extend_from_slice(&u32::try_from(f.len()).unwrap().to_le_bytes());
        rec.extend(f);
        rec
    }

    #[test]
    fn requests_are_paired_with_the_next_answer_on_their_connection() {
        let (client, proxy, backend) = ([10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 3]);
        let mut pcap = 0xa1b2_c3d4_u32.to_le_bytes().to_vec();
        pcap.extend_from_slice(&[0; 20]);
        for rec in [
            frame(1_000, (client, 5000), (proxy, 8000), b"GET / HTTP/1.1"),
            frame(1_100, (client, 5001), (proxy, 8000), b"GET / HTTP/1.1"),
            frame(1_200, (proxy, 6000), (backend, 8080), b"GET / HTTP/1.1"),
            // An ACK alone: no data, not an answer.
            frame(1_250, (backend, 8080), (proxy, 6000), b""),
            frame(1_500, (backend, 8080), (proxy, 6000), b"HTTP/1.1 200 OK"),
            frame(1_600, (proxy, 8000), (client, 5001), b"HTTP/1.1 200 OK"),
            frame(3_000, (proxy, 8000), (client, 5000), b"HTTP/1.1 200 OK"),
            // An answer nobody asked for on this connection is not paired.
            frame(4_000, (proxy, 8000), (client, 5002), b"HTTP/1.1 200 OK"),
        ] {
            pcap.extend(rec);
        }
        let t = times(&pcap, 8000, 8080);
        let ms = |v: &[f64]| v.iter().map(|s| (s * 1e6).round() / 1e3).collect::<Vec<_>>();
        assert_eq!(ms(&t.front), [0.5, 2.0]);
        assert_eq!(ms(&t.back), [0.3]);
        assert!((quantile_ms(&t.front, 0.99) - 2.0).abs() < 1e-9);
        assert!((quantile_ms(&t.front, 0.0) - 0.5).abs() < 1e-9);
    }
}
