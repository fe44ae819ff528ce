//! Byte streams relayed both ways (WebSocket tunnels, TLS passthrough, the L4 proxy), ended
//! when either side closes or, with an idle timeout, when neither sends a byte for that long
//! (HAProxy's `timeout tunnel`).

use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicU64, Ordering},
    task::{Context, Poll},
    time::Duration,
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How a relay ended.
#[derive(Debug)]
pub enum End {
    /// Both sides closed their writing halves.
    Closed,
    /// Neither side sent a byte for the idle timeout.
    Idle,
    /// A read or write failed (a reset, mostly).
    Failed,
}

impl End {
    /// For access logs.
    #[must_use]
    pub const fn as_str(&self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Idle => "idle",
            Self::Failed => "reset",
        }
    }
}

/// What a relay moved, and how it ended.
#[derive(Debug)]
pub struct Relayed {
    /// Bytes read from `a` (and written to `b`), and from `b`.
    pub from_a: u64,
    pub from_b: u64,
    pub end: End,
}

/// Copies `a` to `b` and `b` to `a` until both are done, one fails, or (with `idle`) no byte
/// is read or written either way for that long (a slow reader still taking bytes keeps it).
/// Idleness is checked in eighths of `idle`, so a relay ends between `idle` and 9/8 of it
/// after the last byte, and no clock is read per byte.
pub async fn relay<A, B>(a: &mut A, b: &mut B, idle: Option<Duration>) -> Relayed
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (from_a, from_b, written) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    let mut ta = Counted { io: a, read: &from_a, written: &written };
    let mut tb = Counted { io: b, read: &from_b, written: &written };
    let copy = tokio::io::copy_bidirectional(&mut ta, &mut tb);
    let end = match idle {
        None => copy.await.map_or(End::Failed, |_| End::Closed),
        Some(idle) => {
            tokio::pin!(copy);
            let tick = (idle / 8).max(Duration::from_millis(1));
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let (mut seen, mut quiet) = (0, Duration::ZERO);
            loop {
                tokio::select! {
                    r = &mut copy => break r.map_or(End::Failed, |_| End::Closed),
                    _ = ticks.tick() => {
                        let moved = from_a.load(Ordering::Relaxed)
                            + from_b.load(Ordering::Relaxed)
                            + written.load(Ordering::Relaxed);
                        if moved == seen {
                            quiet += tick;
                            if quiet >= idle {
                                break End::Idle;
                            }
                        } else {
                            (seen, quiet) = (moved, Duration::ZERO);
                        }
                    }
                }
            }
        }
    };
    Relayed { from_a: from_a.load(Ordering::Relaxed), from_b: from_b.load(Ordering::Relaxed), end }
}

/// A stream counting the bytes read from it and written to it.
struct Counted<'a, T: ?Sized> {
    io: &'a mut T,
    read: &'a AtomicU64,
    written: &'a AtomicU64,
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.read.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_relay_ends_after_its_idle_timeout_without_a_byte_and_not_while_bytes_move() {
        let (mut a, mut a_peer) = tokio::io::duplex(1024);
        let (mut b, mut b_peer) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let r = relay(&mut a, &mut b, Some(Duration::from_secs(8))).await;
            (r, start.elapsed())
        });
        // Bytes every 5 s for 30 s, each way in turn: never 8 s idle.
        let mut buf = [0u8; 5];
        for i in 0..6 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            if i % 2 == 0 {
                a_peer.write_all(b"hello").await.unwrap();
                b_peer.read_exact(&mut buf).await.unwrap();
            } else {
                b_peer.write_all(b"world").await.unwrap();
                a_peer.read_exact(&mut buf).await.unwrap();
            }
        }
        assert!(!relay.is_finished(), "ended while bytes moved");
        // Then nothing: ended between 8 and 9 s after the last byte.
        let ended = tokio::time::timeout(Duration::from_mins(1), relay).await;
        let (r, took) = ended.expect("never ended for idleness").unwrap();
        assert!(matches!(r.end, End::Idle), "{r:?}");
        assert_eq!((r.from_a, r.from_b), (15, 15));
        assert!(took >= Duration::from_secs(38) && took <= Duration::from_secs(39), "{took:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_draining_the_relays_buffer_keeps_it_open() {
        let (mut a, mut a_peer) = tokio::io::duplex(1024);
        let (mut b, mut b_peer) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move { relay(&mut a, &mut b, Some(Duration::from_secs(8))).await });
        // 4 KiB sent at once: the relay reads it all, then waits to write it out.
        a_peer.write_all(&[7u8; 4096]).await.unwrap();
        // Taken 100 bytes every 5 s: no read for the relay, only writes.
        let mut buf = [0u8; 100];
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(5)).await;
            b_peer.read_exact(&mut buf).await.unwrap();
        }
        assert!(!relay.is_finished(), "cut while its bytes were still being taken");
        let ended = tokio::time::timeout(Duration::from_mins(1), relay).await;
        let r = ended.expect("never ended for idleness").unwrap();
        assert!(matches!(r.end, End::Idle), "{r:?}");
        assert_eq!(r.from_a, 4096);
    }

    #[tokio::test]
    async fn a_relay_without_a_timeout_ends_when_both_sides_close() {
        let (mut a, mut a_peer) = tokio::io::duplex(1024);
        let (mut b, mut b_peer) = tokio::io::duplex(1024);
        let relay = tokio::spawn(async move { relay(&mut a, &mut b, None).await });
        a_peer.write_all(b"ping").await.unwrap();
        a_peer.shutdown().await.unwrap();
        let mut got = Vec::new();
        b_peer.read_to_end(&mut got).await.unwrap_or_default();
        // b_peer reads until a's close is relayed; then it answers and closes.
        assert_eq!(got, b"ping");
        b_peer.write_all(b"pong!").await.unwrap();
        b_peer.shutdown().await.unwrap();
        let r = relay.await.unwrap();
        assert!(matches!(r.end, End::Closed), "{r:?}");
        assert_eq!((r.from_a, r.from_b), (4, 5));
        let mut back = Vec::new();
        a_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"pong!");
    }
}
