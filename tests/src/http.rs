//! HTTP/1.1 backends with keep-alive that count connections and requests, record request
//! heads, and can be made slow or failing; and a minimal HTTP/1.1 client (one connection,
//! several requests) for the edge tests.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU16, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader as TokioBufReader},
    net::TcpListener,
    sync::oneshot,
};

use crate::netns::NetNs;

/// What a backend saw and how it behaves; shared with the test.
#[derive(Debug, Default)]
pub struct Backend {
    pub connections: AtomicU64,
    pub requests: AtomicU64,
    /// Answer with this status (0: 200).
    pub status: AtomicU16,
    /// Wait this long before answering.
    pub delay_ms: AtomicU64,
    /// Request heads received, in order.
    pub heads: Mutex<Vec<String>>,
    /// More response header lines, each ending in `\r\n` (e.g. `cache-control: max-age=2\r\n`).
    pub extra_headers: Mutex<String>,
}

impl Backend {
    #[must_use]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    #[must_use]
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

/// A running backend; stopped (listener and every connection closed) on drop.
pub struct HttpBackend {
    pub state: Arc<Backend>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpBackend {
    /// Serves `port` in `ns`, answering `{name}\n` to every request, until dropped.
    #[must_use]
    pub fn start(ns: &NetNs, name: &str, port: u16) -> Self {
        Self::start_with(ns, name, port, Arc::default())
    }

    /// [`HttpBackend::start`] with state kept from an earlier run (a restarted backend).
    #[must_use]
    pub fn start_with(ns: &NetNs, name: &str, port: u16, state: Arc<Backend>) -> Self {
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let body: Arc<str> = format!("{name}\n").into();
        let st = state.clone();
        let thread = ns.spawn("http-backend", move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).await
                {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let serve = async {
                    loop {
                        let Ok((conn, _)) = listener.accept().await else { continue };
                        st.connections.fetch_add(1, Ordering::Relaxed);
                        tokio::spawn(keep_alive(conn, body.clone(), st.clone()));
                    }
                };
                tokio::select! {
                    _ = stop_rx => {}
                    () = serve => {}
                }
            });
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{name}: cannot bind port {port} in {}: {e}", ns.name()),
            Err(mpsc::RecvError) => panic!("{name}: backend thread died in {}", ns.name()),
        }
        Self { state, stop: Some(stop_tx), thread: Some(thread) }
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves requests on one connection until the client closes it.
async fn keep_alive(conn: tokio::net::TcpStream, body: Arc<str>, st: Arc<Backend>) {
    let mut conn = TokioBufReader::new(conn);
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match conn.read_line(&mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let end = line == "\r\n";
            head.push_str(&line);
            if end {
                break;
            }
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut req_body = vec![0u8; length];
        if conn.read_exact(&mut req_body).await.is_err() {
            return;
        }
        st.requests.fetch_add(1, Ordering::Relaxed);
        st.heads.lock().unwrap().push(head);
        let delay = st.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let status = match st.status.load(Ordering::Relaxed) {
            0 => 200,
            s => s,
        };
        let extra = st.extra_headers.lock().unwrap().clone();
        let resp = format!(
            "HTTP/1.1 {status} X\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{extra}\r\n{body}",
            body.len()
        );
        if conn.get_mut().write_all(resp.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// A response as the client got it.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 connection, several requests in turn.
pub struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Connects (from the calling thread's namespace).
    ///
    /// # Errors
    /// When the connection fails.
    pub fn connect(addr: SocketAddr) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(Self { reader: BufReader::new(s) })
    }

    /// Sends `method path` with `host` and `extra` header lines, and reads the answer.
    ///
    /// # Errors
    /// When the connection fails or the answer is not HTTP.
    pub fn request(
        &mut self,
        method: &str,
        host: &str,
        path: &str,
        extra: &str,
        body: &str,
    ) -> std::io::Result<Reply> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\n{extra}\r\n{body}",
            body.len()
        );
        self.reader.get_mut().write_all(req.as_bytes())?;
        self.read_reply(method == "HEAD")
    }

    /// The connection's reader, with what it has read ahead.
    pub fn reader_mut(&mut self) -> &mut BufReader<TcpStream> {
        &mut self.reader
    }

    /// Writes raw bytes (for malformed or partial requests).
    ///
    /// # Errors
    /// When the write fails.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.reader.get_mut().write_all(bytes)
    }

    /// Reads one response.
    ///
    /// # Errors
    /// When the connection fails or the answer is not HTTP.
    pub fn read_reply(&mut self, head_only: bool) -> std::io::Result<Reply> {
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let status: u16 =
            line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad(&line))?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').ok_or_else(|| bad(h))?;
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        let mut reply = Reply { status, headers, body: String::new() };
        if head_only {
            return Ok(reply);
        }
        let length: usize = reply.header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0u8; length];
        self.reader.read_exact(&mut body)?;
        reply.body = String::from_utf8_lossy(&body).into_owned();
        Ok(reply)
    }

    /// True when the server closes the connection (EOF, or a reset) within `wait`; what it
    /// sends before is skipped.
    #[must_use]
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let _ = self.reader.get_ref().set_read_timeout(Some(wait));
        let mut b = [0u8; 512];
        loop {
            match self.reader.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    }
}

/// One request on a fresh connection.
///
/// # Errors
/// When the connection or the exchange fails.
pub fn get(addr: SocketAddr, host: &str, path: &str) -> std::io::Result<Reply> {
    Client::connect(addr)?.request("GET", host, path, "", "")
}
