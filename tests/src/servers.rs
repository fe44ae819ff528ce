//! Backend servers for tests and the demo: HTTP (answers with the backend's name), TCP echo
//! and UDP echo, on one thread per host inside its namespace. They record what they receive
//! and from whom, so a test can tell which backend got which bytes and which source address
//! the balancer presented.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::oneshot,
};

use crate::netns::NetNs;

/// Largest request head the HTTP responder reads.
const MAX_HTTP_HEAD: usize = 16 * 1024;
/// Read size of the HTTP responder and the TCP echo.
const READ_CHUNK: usize = 16 * 1024;
/// Largest UDP datagram.
const MAX_DATAGRAM: usize = 65536;

/// One TCP echo connection or UDP datagram a server received.
#[derive(Clone, Debug)]
pub struct Received {
    /// The client as the server saw it: the real client behind direct server return, the lb
    /// node behind NAT.
    pub peer: SocketAddr,
    /// The port the server was reached on.
    pub port: u16,
    pub data: Vec<u8>,
}

/// What one host's servers received.
#[derive(Default)]
pub struct Served {
    /// One entry per finished TCP echo connection that sent data: everything the client sent.
    pub tcp: Mutex<Vec<Received>>,
    /// One entry per UDP echo datagram.
    pub udp: Mutex<Vec<Received>>,
    pub http_requests: AtomicU64,
    /// TCP echo connections that closed without sending anything (health checks).
    pub probes: AtomicU64,
    /// Open TCP echo connections by local port.
    open: Mutex<BTreeMap<u16, usize>>,
}

impl Served {
    #[must_use]
    pub fn tcp_payloads(&self) -> Vec<Vec<u8>> {
        self.tcp.lock().expect("lock").iter().map(|r| r.data.clone()).collect()
    }

    #[must_use]
    pub fn udp_payloads(&self) -> Vec<Vec<u8>> {
        self.udp.lock().expect("lock").iter().map(|r| r.data.clone()).collect()
    }

    #[must_use]
    pub fn tcp_received(&self) -> Vec<Received> {
        self.tcp.lock().expect("lock").clone()
    }

    #[must_use]
    pub fn udp_received(&self) -> Vec<Received> {
        self.udp.lock().expect("lock").clone()
    }

    #[must_use]
    pub fn http_count(&self) -> u64 {
        self.http_requests.load(Ordering::Relaxed)
    }

    /// TCP echo connections open right now on `port`.
    #[must_use]
    pub fn open_on(&self, port: u16) -> usize {
        self.open.lock().expect("lock").get(&port).copied().unwrap_or(0)
    }

    fn opened(&self, port: u16, delta: isize) {
        let mut open = self.open.lock().expect("lock");
        let n = open.entry(port).or_default();
        *n = n.saturating_add_signed(delta);
    }
}

/// Ports the servers listen on. TCP listens on every address of the namespace, both
/// families; UDP binds each address given to [`Servers::start`] on its own, because a UDP
/// server behind direct server return must answer from the address it was reached at (the
/// VIP), which a wildcard socket does not do.
#[derive(Clone, Copy)]
pub struct Ports {
    pub http: u16,
    pub echo: &'static [u16],
}

/// Running servers; stopped and joined on drop.
pub struct Servers {
    pub served: Arc<Served>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Servers {
    /// Starts the servers in `ns` and returns once they listen. HTTP answers `{name}\n`; UDP
    /// echo listens on each of `udp_addrs`.
    ///
    /// # Panics
    /// When a port cannot be bound.
    #[must_use]
    pub fn start(ns: &NetNs, name: &str, ports: Ports, udp_addrs: &[IpAddr]) -> Self {
        let served = Arc::new(Served::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let body = format!("{name}\n");
        let rec = served.clone();
        let udp_addrs = udp_addrs.to_vec();
        let thread = ns.spawn("servers", move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                // `[::]` with the kernel's default (not v6-only) takes IPv4 too.
                let any = |port| SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
                let bound = async {
                    let mut udp = Vec::new();
                    let mut echo = Vec::new();
                    for &port in ports.echo {
                        echo.push(TcpListener::bind(any(port)).await?);
                        for &a in &udp_addrs {
                            udp.push(UdpSocket::bind((a, port)).await?);
                        }
                    }
                    Ok::<_, std::io::Error>((TcpListener::bind(any(ports.http)).await?, echo, udp))
                }
                .await;
                let (http, echo, udp) = match bound {
                    Ok(b) => {
                        let _ = ready_tx.send(Ok(()));
                        b
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                tokio::select! {
                    _ = stop_rx => {}
                    () = serve_http(http, body, rec.clone()) => {}
                    () = serve_tcp_echo(echo, rec.clone()) => {}
                    () = serve_udp_echo(udp, rec) => {}
                }
            });
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{name}: cannot bind servers in {}: {e}", ns.name()),
            Err(mpsc::RecvError) => panic!("{name}: server thread died in {}", ns.name()),
        }
        Self { served, stop: Some(stop_tx), thread: Some(thread) }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn serve_http(listener: TcpListener, body: String, served: Arc<Served>) {
    let body: Arc<str> = body.into();
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let body = body.clone();
        let served = served.clone();
        tokio::spawn(async move {
            let _ = answer_http(conn, &body, &served).await;
        });
    }
}

/// Reads one request head, counts it, answers it; the connection then closes. Counting comes
/// first so a client that has its answer can rely on the count.
async fn answer_http(mut conn: TcpStream, body: &str, served: &Served) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = vec![0u8; READ_CHUNK];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HTTP_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    served.http_requests.fetch_add(1, Ordering::Relaxed);
    let resp = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes()).await?;
    conn.shutdown().await
}

/// An IPv4 client of a dual-stack socket shows as `::ffff:a.b.c.d`; tests compare plain ones.
fn unmapped(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => a,
        },
        SocketAddr::V4(_) => a,
    }
}

async fn serve_tcp_echo(listeners: Vec<TcpListener>, served: Arc<Served>) {
    let mut tasks = tokio::task::JoinSet::new();
    for listener in listeners {
        let served = served.clone();
        tasks.spawn(async move {
            loop {
                let Ok((conn, peer)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(echo_connection(conn, unmapped(peer), served.clone()));
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

async fn echo_connection(mut conn: TcpStream, peer: SocketAddr, served: Arc<Served>) {
    let port = conn.local_addr().map_or(0, |a| a.port());
    served.opened(port, 1);
    let mut data = Vec::new();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                data.extend_from_slice(&buf[..n]);
                if conn.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    // Recorded before the close: a client that saw the echo end can rely on the record. A
    // connection that carried nothing is a health check's, counted apart.
    if data.is_empty() {
        served.probes.fetch_add(1, Ordering::Relaxed);
    } else {
        served.tcp.lock().expect("lock").push(Received { peer, port, data });
    }
    served.opened(port, -1);
    let _ = conn.shutdown().await;
}

async fn serve_udp_echo(socks: Vec<UdpSocket>, served: Arc<Served>) {
    let mut tasks = tokio::task::JoinSet::new();
    for sock in socks {
        let served = served.clone();
        tasks.spawn(async move {
            let port = sock.local_addr().map_or(0, |a| a.port());
            let mut buf = vec![0u8; MAX_DATAGRAM];
            loop {
                let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                    continue;
                };
                let data = buf[..n].to_vec();
                served.udp.lock().expect("lock").push(Received { peer: from, port, data });
                let _ = sock.send_to(&buf[..n], from).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}
