//! Request-to-answer times read off the wire: a `tcpdump` capture on the proxy's interface
//! pairs each HTTP/1.1 request arriving from a client with the answer leaving to it (the time
//! at the proxy, the exchange with the backend included), and each request the proxy sends to
//! the backend with its answer. wrk's latency also holds the client's own waits for a CPU,
//! which on a shared two-core host the capture leaves out.

use std::collections::HashMap;

use lb_common::{
    maps::PROTO_TCP,
    packet::{
        BytesPacket, ETH_HLEN, ETH_P_IPV4, EthHdr, IPV4_MIN_HLEN, Ipv4Hdr, Packet as _, TCP_HLEN, TcpHdr,
    },
};

/// Request-to-answer times, in seconds.
#[derive(Debug, Default)]
pub struct Times {
    /// From a client's request arriving to the answer leaving to it.
    pub front: Vec<f64>,
    /// From a request leaving for the backend to its answer arriving.
    pub back: Vec<f64>,
}

/// One TCP segment with data: when, from, to, its sequence and acknowledgement numbers, its
/// payload's length and first bytes.
struct Segment<'a> {
    at: f64,
    from: ([u8; 4], u16),
    to: ([u8; 4], u16),
    seq: u32,
    ack: u32,
    len: u32,
    data: &'a [u8],
}

/// The TCP segments with data in a pcap capture of Ethernet frames (IPv4 only).
fn segments(pcap: &[u8]) -> impl Iterator<Item = Segment<'_>> {
    let u32_at = |b: &[u8], i: usize| b.get(i..i + 4).map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]));
    let nanos = u32_at(pcap, 0) == Some(0xa1b2_3c4d);
    // Ethernet frames only (link type 1); anything else yields nothing.
    let mut at = if u32_at(pcap, 20) == Some(1) { 24 } else { pcap.len() };
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

/// The TCP segment in an Ethernet frame, if it carries data, read with the datapath's own
/// header layouts.
fn tcp(frame: &[u8], at: f64) -> Option<Segment<'_>> {
    // The headers are viewed in a copy: `Packet` hands out mutable views. A capture's snaplen
    // (80) keeps the copy within the buffer; a longer frame's headers fit it all the same.
    let mut buf = [0u8; 128];
    let n = frame.len().min(buf.len());
    buf[..n].copy_from_slice(&frame[..n]);
    let mut p = BytesPacket::new(&mut buf, 0, n);
    if p.header::<EthHdr>(0)?.ether_type != ETH_P_IPV4 {
        return None;
    }
    let ip = *p.header::<Ipv4Hdr>(ETH_HLEN)?;
    let ihl = ip.header_len();
    if ip.proto != PROTO_TCP || ihl < IPV4_MIN_HLEN {
        return None;
    }
    let t = *p.header::<TcpHdr>(ETH_HLEN + ihl)?;
    let off = usize::from(t.data_off >> 4) * 4;
    if off < TCP_HLEN {
        return None;
    }
    let payload = usize::from(u16::from_be_bytes(ip.tot_len)).checked_sub(ihl + off).filter(|n| *n > 0)?;
    // Captured short (snaplen): the payload's first bytes are enough to tell its kind.
    let data = frame.get(ETH_HLEN + ihl + off..).map_or(&[][..], |d| &d[..d.len().min(payload)]);
    Some(Segment {
        at,
        from: (ip.src, u16::from_be_bytes(t.src)),
        to: (ip.dst, u16::from_be_bytes(t.dst)),
        seq: u32::from_be_bytes(t.seq),
        ack: u32::from_be_bytes(t.ack),
        len: u32::try_from(payload).ok()?,
        data,
    })
}

/// Request-to-answer times of HTTP/1.1 exchanges in `pcap`: clients talking to `front` (the
/// proxy's port), the proxy talking to `back` (the backend's). A request (told by its first
/// bytes) is paired with the answer that acknowledges exactly its last byte, so a segment the
/// capture missed leaves one exchange out instead of shifting the rest (no pipelining: wrk
/// and the proxies send one request at a time), and a retransmitted request keeps its first
/// time.
#[must_use]
pub fn times(pcap: &[u8], front: u16, back: u16) -> Times {
    // Per client (or proxy) end: the last request's time and the sequence number after it.
    let mut asked: HashMap<([u8; 4], u16), (f64, u32)> = HashMap::new();
    let mut out = Times::default();
    for s in segments(pcap) {
        let request = s.data.starts_with(b"GET ") || s.data.starts_with(b"POST ");
        let answer = s.data.starts_with(b"HTTP/1.");
        if request && (s.to.1 == front || s.to.1 == back) {
            let end = s.seq.wrapping_add(s.len);
            let again = asked.get(&s.from).is_some_and(|&(_, e)| e == end);
            if !again {
                asked.insert(s.from, (s.at, end));
            }
        } else if answer
            && (s.from.1 == front || s.from.1 == back)
            && let Some(&(t0, end)) = asked.get(&s.to)
            && s.ack == end
        {
            asked.remove(&s.to);
            let list = if s.from.1 == front { &mut out.front } else { &mut out.back };
            list.push(s.at - t0);
        }
    }
    out
}

/// tcpdump's closing count of packets the kernel dropped, from its standard error.
#[must_use]
pub fn dropped(stderr: &str) -> Option<u64> {
    stderr.lines().find_map(|l| l.trim().strip_suffix(" packets dropped by kernel")?.trim().parse().ok())
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

    /// A pcap record of an Ethernet/IPv4/TCP frame with `data` at sequence `seq` acknowledging
    /// `ack`, at `us` microseconds.
    fn frame(
        us: u32,
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        (seq, ack): (u32, u32),
        data: &[u8],
    ) -> Vec<u8> {
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&u16::try_from(20 + 20 + data.len()).unwrap().to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, 6, 0, 0]);
        ip.extend_from_slice(&src.0);
        ip.extend_from_slice(&dst.0);
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&src.1.to_be_bytes());
        tcp.extend_from_slice(&dst.1.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&ack.to_be_bytes());
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
    fn requests_are_paired_with_the_answer_acknowledging_them() {
        let (client, proxy, backend) = ([10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 3]);
        let mut pcap = 0xa1b2_c3d4_u32.to_le_bytes().to_vec();
        pcap.extend_from_slice(&[0; 16]);
        pcap.extend_from_slice(&1u32.to_le_bytes());
        let get = b"GET / HTTP/1.1";
        let ok = b"HTTP/1.1 200 OK";
        let n = 14; // get's length
        for rec in [
            frame(1_000, (client, 5000), (proxy, 8000), (100, 1), get),
            frame(1_100, (client, 5001), (proxy, 8000), (500, 1), get),
            frame(1_200, (proxy, 6000), (backend, 8080), (900, 1), get),
            // An ACK alone: no data, not an answer.
            frame(1_250, (backend, 8080), (proxy, 6000), (1, 900 + n), b""),
            frame(1_500, (backend, 8080), (proxy, 6000), (1, 900 + n), ok),
            frame(1_600, (proxy, 8000), (client, 5001), (1, 500 + n), ok),
            // A retransmitted request keeps its first time.
            frame(1_700, (client, 5000), (proxy, 8000), (100, 1), get),
            frame(3_000, (proxy, 8000), (client, 5000), (1, 100 + n), ok),
            // A request whose answer the capture missed, then the next one: the next answer
            // pairs with the next request, not the lost one.
            frame(4_000, (client, 5000), (proxy, 8000), (100 + n, 16), get),
            frame(5_000, (client, 5000), (proxy, 8000), (100 + 2 * n, 31), get),
            frame(5_400, (proxy, 8000), (client, 5000), (31, 100 + 3 * n), ok),
            // An answer nobody asked for on this connection is not paired.
            frame(6_000, (proxy, 8000), (client, 5002), (1, 1), ok),
        ] {
            pcap.extend(rec);
        }
        let t = times(&pcap, 8000, 8080);
        let ms = |v: &[f64]| v.iter().map(|s| (s * 1e6).round() / 1e3).collect::<Vec<_>>();
        assert_eq!(ms(&t.front), [0.5, 2.0, 0.4]);
        assert_eq!(ms(&t.back), [0.3]);
        assert!((quantile_ms(&t.front, 0.99) - 2.0).abs() < 1e-9);
        assert!((quantile_ms(&t.front, 0.0) - 0.4).abs() < 1e-9);
        // Not Ethernet: nothing.
        pcap[20] = 113;
        assert!(times(&pcap, 8000, 8080).front.is_empty());
    }

    #[test]
    fn tcpdumps_drop_count_is_read() {
        let err = "tcpdump: listening on eth0\n12 packets captured\n14 packets received by filter\n2 packets dropped by kernel\n";
        assert_eq!(dropped(err), Some(2));
        assert_eq!(dropped("nothing"), None);
    }
}
