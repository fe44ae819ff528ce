//! Active health checks: the rise/fall state of each backend (pure, [`Status`]) and the probes
//! that feed it (tokio tasks, [`Checker`]).
//!
//! Probes only report results; the daemon applies them to [`Status`] and re-plans on a
//! transition. State is keyed by service and backend identity, so a reload that keeps a
//! backend keeps its state.

use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

use crate::config::HealthCheck;

/// Largest answer a send/expect or HTTP probe reads.
const MAX_ANSWER: usize = 4096;

/// A backend of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub service: String,
    /// `host:port` as in the registry.
    pub backend: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.service, self.backend)
    }
}

/// Whether a backend takes new flows as far as its checks go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not probed yet: serves (a restart must not empty the tables), and the first result
    /// decides at once.
    Unknown,
    Up,
    Down,
}

impl State {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Up => "up",
            Self::Down => "down",
        }
    }

    /// Whether the backend may take new flows.
    #[must_use]
    pub const fn serves(self) -> bool {
        !matches!(self, Self::Down)
    }
}

/// One backend's check history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// Consecutive results of the current streak: successes while `ok`, else failures.
    pub streak: u32,
    pub ok: bool,
    pub checks: u64,
    pub failures: u64,
    pub last_error: Option<String>,
    pub last_latency: Option<Duration>,
}

impl Default for Status {
    fn default() -> Self {
        Self {
            state: State::Unknown,
            streak: 0,
            ok: true,
            checks: 0,
            failures: 0,
            last_error: None,
            last_latency: None,
        }
    }
}

impl Status {
    /// Applies one probe result; returns the new state when it changed.
    pub fn record(&mut self, result: &Result<Duration, String>, fall: u32, rise: u32) -> Option<State> {
        self.checks += 1;
        let ok = result.is_ok();
        match result {
            Ok(latency) => {
                self.last_latency = Some(*latency);
            }
            Err(e) => {
                self.failures += 1;
                self.last_error = Some(e.clone());
            }
        }
        self.streak = if ok == self.ok { self.streak.saturating_add(1) } else { 1 };
        self.ok = ok;
        let next = match (self.state, ok) {
            (State::Unknown, true) => State::Up,
            (State::Unknown, false) => State::Down,
            (State::Up, false) if self.streak >= fall => State::Down,
            (State::Down, true) if self.streak >= rise => State::Up,
            (s, _) => s,
        };
        (next != self.state).then(|| {
            self.state = next;
            next
        })
    }
}

/// What to probe for one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub key: Key,
    /// The backend's host as written (an address or a DNS name, resolved at each probe).
    pub host: String,
    /// Resolved address, when the daemon already knows it.
    pub addr: Option<IpAddr>,
    pub port: u16,
    pub check: HealthCheck,
}

/// One probe's outcome: its latency, or why it failed.
#[derive(Debug, Clone)]
pub struct Report {
    pub key: Key,
    pub result: Result<Duration, String>,
}

/// The running probe tasks, one per target.
pub struct Checker {
    tx: mpsc::Sender<Report>,
    tasks: HashMap<Key, (Target, JoinHandle<()>)>,
}

impl Checker {
    /// A checker whose probes report on `tx`.
    #[must_use]
    pub fn new(tx: mpsc::Sender<Report>) -> Self {
        Self { tx, tasks: HashMap::new() }
    }

    /// Runs exactly `targets`: unchanged ones keep their task (and its timing), changed ones
    /// restart, missing ones stop.
    pub fn sync(&mut self, targets: Vec<Target>) {
        let mut keep: HashMap<Key, (Target, JoinHandle<()>)> = HashMap::with_capacity(targets.len());
        for t in targets {
            match self.tasks.remove(&t.key) {
                Some((old, task)) if old == t => {
                    keep.insert(t.key.clone(), (old, task));
                }
                other => {
                    if let Some((_, task)) = other {
                        task.abort();
                    }
                    let task = tokio::spawn(run(t.clone(), self.tx.clone()));
                    keep.insert(t.key.clone(), (t, task));
                }
            }
        }
        for (_, (_, task)) in self.tasks.drain() {
            task.abort();
        }
        self.tasks = keep;
    }

    /// Whether `key` is checked.
    #[must_use]
    pub fn checks(&self, key: &Key) -> bool {
        self.tasks.contains_key(key)
    }

    /// The target checked under `key`.
    #[must_use]
    pub fn target(&self, key: &Key) -> Option<&Target> {
        self.tasks.get(key).map(|(t, _)| t)
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        for (_, (_, task)) in self.tasks.drain() {
            task.abort();
        }
    }
}

/// Probes `t` every interval until aborted. The first probe starts after a random part of the
/// interval so a thousand backends are not probed in one burst.
async fn run(t: Target, tx: mpsc::Sender<Report>) {
    let interval = t.check.interval;
    let jitter = jitter(&t.key, interval);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + jitter, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = probe(&t).await;
        if tx.send(Report { key: t.key.clone(), result }).await.is_err() {
            return;
        }
    }
}

/// A stable spread over a fifth of the interval: the first results come soon after start.
fn jitter(key: &Key, interval: Duration) -> Duration {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    let span = u64::try_from(interval.as_micros() / 5).unwrap_or(u64::MAX).max(1);
    Duration::from_micros(h.finish() % span)
}

/// One probe of `t`, bounded by its timeout.
pub async fn probe(t: &Target) -> Result<Duration, String> {
    let start = Instant::now();
    match tokio::time::timeout(t.check.timeout, probe_inner(t)).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {:?}", t.check.timeout)),
    }
}

async fn probe_inner(t: &Target) -> Result<(), String> {
    let addr = match t.addr.or_else(|| t.host.parse().ok()) {
        Some(ip) => SocketAddr::new(ip, t.port),
        None => tokio::net::lookup_host((t.host.as_str(), t.port))
            .await
            .map_err(|e| format!("DNS: {e}"))?
            .next()
            .ok_or_else(|| "DNS: no address".to_owned())?,
    };
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    if let Some(http) = &t.check.http {
        let host = http.host.as_deref().unwrap_or(&t.host);
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n",
            http.path
        );
        stream.write_all(request.as_bytes()).await.map_err(|e| format!("send: {e}"))?;
        let answer = read_until(&mut stream, |a| a.windows(2).any(|w| w == b"\r\n")).await?;
        let status = http_status(&answer).ok_or_else(|| "not an HTTP answer".to_owned())?;
        return if status == http.status {
            Ok(())
        } else {
            Err(format!("HTTP status {status}, expected {}", http.status))
        };
    }
    if let Some(send) = &t.check.send {
        stream.write_all(&unescape(send)).await.map_err(|e| format!("send: {e}"))?;
    }
    if let Some(expect) = &t.check.expect {
        let needle = unescape(expect);
        let answer = read_until(&mut stream, |a| contains(a, &needle)).await?;
        if !contains(&answer, &needle) {
            return Err(format!("answer {:?} lacks {expect:?}", String::from_utf8_lossy(&answer)));
        }
    }
    Ok(())
}

/// Reads until `done` holds, the peer closes, or [`MAX_ANSWER`] bytes arrived.
async fn read_until(stream: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Result<Vec<u8>, String> {
    let mut answer = Vec::with_capacity(256);
    let mut buf = [0u8; 1024];
    while !done(&answer) && answer.len() < MAX_ANSWER {
        let n = stream.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
    }
    Ok(answer)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// The status code of an HTTP/1.x status line.
fn http_status(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\r').next()?;
    let mut parts = line.split(|&b| b == b' ');
    let version = parts.next()?;
    if !version.starts_with(b"HTTP/1.") {
        return None;
    }
    std::str::from_utf8(parts.next()?).ok()?.parse().ok()
}

/// `\r`, `\n`, `\t` and `\\` escapes, as written in YAML single-quoted or plain strings.
fn unescape(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut b = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('\\') => out.push(b'\\'),
            // Not an escape: kept as written.
            other => {
                out.push(b'\\');
                if let Some(c) = other {
                    let mut b = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: Result<Duration, String> = Ok(Duration::from_millis(1));

    fn fail() -> Result<Duration, String> {
        Err("connect: refused".to_owned())
    }

    #[test]
    fn the_first_result_decides_an_unknown_backend() {
        let mut s = Status::default();
        assert!(s.state.serves());
        assert_eq!(s.record(&OK, 3, 2), Some(State::Up));
        let mut s = Status::default();
        assert_eq!(s.record(&fail(), 3, 2), Some(State::Down));
    }

    #[test]
    fn fall_consecutive_failures_mark_down_and_rise_successes_bring_back() {
        let mut s = Status::default();
        s.record(&OK, 3, 2);
        assert_eq!(s.record(&fail(), 3, 2), None);
        assert_eq!(s.record(&fail(), 3, 2), None);
        assert_eq!(s.record(&OK, 3, 2), None, "a success resets the failure streak");
        assert_eq!(s.record(&fail(), 3, 2), None);
        assert_eq!(s.record(&fail(), 3, 2), None);
        assert_eq!(s.record(&fail(), 3, 2), Some(State::Down));
        assert_eq!(s.last_error.as_deref(), Some("connect: refused"));
        assert_eq!(s.record(&OK, 3, 2), None);
        assert_eq!(s.record(&fail(), 3, 2), None, "a failure resets the success streak");
        assert_eq!(s.record(&OK, 3, 2), None);
        assert_eq!(s.record(&OK, 3, 2), Some(State::Up));
        assert_eq!((s.checks, s.failures), (11, 6));
    }

    #[test]
    fn escapes_and_status_lines() {
        assert_eq!(unescape(r"PING\r\n"), b"PING\r\n");
        assert_eq!(unescape(r"a\\b\q"), br"a\b\q");
        assert_eq!(http_status(b"HTTP/1.1 204 No Content\r\n"), Some(204));
        assert_eq!(http_status(b"SSH-2.0-OpenSSH\r\n"), None);
    }

    #[test]
    fn jitter_stays_within_a_fifth_of_the_interval() {
        for i in 0..100 {
            let key = Key { service: "s".into(), backend: format!("10.0.0.{i}:80") };
            assert!(jitter(&key, Duration::from_secs(2)) < Duration::from_millis(400));
        }
    }

    /// Real sockets: a send/expect check against a Redis-like responder, then a refused port.
    #[tokio::test]
    async fn send_expect_and_http_probes_against_real_sockets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 256];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let answer: &[u8] = if buf[..n].starts_with(b"PING") {
                        b"+PONG\r\n"
                    } else {
                        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
                    };
                    let _ = s.write_all(answer).await;
                });
            }
        });
        let check = HealthCheck {
            send: Some(r"PING\r\n".into()),
            expect: Some("+PONG".into()),
            ..HealthCheck::default()
        };
        let mut t = Target {
            key: Key { service: "redis".into(), backend: "x".into() },
            host: "127.0.0.1".into(),
            addr: None,
            port,
            check,
        };
        probe(&t).await.expect("PING answered +PONG");
        t.check.expect = Some("role:master".into());
        let e = probe(&t).await.unwrap_err();
        assert!(e.contains("lacks"), "{e}");
        t.check = HealthCheck {
            http: Some(crate::config::HttpCheck { path: "/health".into(), status: 200, host: None }),
            ..HealthCheck::default()
        };
        assert_eq!(probe(&t).await.unwrap_err(), "HTTP status 503, expected 200");
        // A port nobody listens on.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        t.port = closed.local_addr().unwrap().port();
        drop(closed);
        t.check = HealthCheck::default();
        assert!(probe(&t).await.unwrap_err().starts_with("connect"));
    }
}
