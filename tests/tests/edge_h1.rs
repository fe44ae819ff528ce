//! The edge's own HTTP/1.1 client against a scripted backend that answers in every framing a
//! backend may use: chunked (in pieces, with trailers, beside a Content-Length), up to its
//! close, after a 100 Continue, long bodies in many reads; and answers it must refuse with a
//! 502 (malformed, conflicting lengths, heads too large). Connections are reused where the
//! backend keeps them, a pooled connection the backend closed costs no request, and a chunked
//! upload too long to replay is streamed through whole. curl is the client.

use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use lb_tests::{
    lbd::{Lbd, TempDir},
    netns::NetNs,
    privileged,
    topology::{DsrTopology, backend_ip},
    unique_prefix,
};

const PORT: u16 = 8080;

/// Set by the client once it has read the first event of `/stream`.
static STREAM_SEEN: AtomicBool = AtomicBool::new(false);
/// `/bytes/N` answers whose writing failed: the edge closed the backend connection.
static BYTES_CUT: AtomicU64 = AtomicU64::new(0);

#[derive(Default)]
struct Seen {
    connections: AtomicU64,
    requests: AtomicU64,
    stop: AtomicBool,
}

/// A request head and body as the backend read them.
struct Req {
    path: String,
    body: Vec<u8>,
}

fn read_request(r: &mut BufReader<TcpStream>) -> Option<Req> {
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_owned());
    }
    let path = head.first()?.split_whitespace().nth(1)?.to_owned();
    let header = |name: &str| {
        head.iter().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_ascii_lowercase())
        })
    };
    let mut body = Vec::new();
    // Answered from the head alone, the body left unread.
    if path.starts_with("/early") {
        return Some(Req { path, body });
    }
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim(), 16).ok()?;
            let mut chunk = vec![0u8; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(n, 0);
        r.read_exact(&mut body).ok()?;
    }
    Some(Req { path, body })
}

/// Pieces written with a pause between them, so the edge reads them apart.
fn pieces(w: &mut TcpStream, parts: &[&[u8]]) -> std::io::Result<()> {
    for p in parts {
        w.write_all(p)?;
        w.flush()?;
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// `/bytes/N`: N MiB, written as fast as the edge takes them; a failed write is counted.
fn bytes(w: &mut TcpStream, mib: &str) -> std::io::Result<bool> {
    let mib: usize = mib.parse().unwrap_or(1);
    let block = vec![b'x'; 65_536];
    w.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", mib << 20).as_bytes())?;
    for _ in 0..mib * 16 {
        if let Err(e) = w.write_all(&block) {
            BYTES_CUT.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    }
    Ok(true)
}

/// Answers one request as its path asks; false when the connection is to close.
#[expect(clippy::too_many_lines, reason = "one scripted answer per path, in one place")]
fn answer(w: &mut TcpStream, req: &Req) -> std::io::Result<bool> {
    match req.path.as_str() {
        "/chunked" => {
            pieces(
                w,
                &[
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                    b"5\r\nhel",
                    b"lo\r\n6;ext=1\r\n world\r\n",
                    b"0\r\nX-Trailer: t\r\n",
                    b"\r\n",
                ],
            )?;
            Ok(true)
        }
        "/te-and-cl" => {
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")?;
            Ok(true)
        }
        "/fields" => {
            // This hop's fields beside end-to-end ones, in any case, LF line ends in places.
            w.write_all(
                b"HTTP/1.1 200 OK\r\nX-Mixed-Case: A b\nconnection: Keep-Alive\r\nKEEP-ALIVE: timeout=5\r\n\
                  Set-Cookie: a=1\r\nUpgrade: h2c\r\nTrailer: x-t\r\nProxy-Connection: keep-alive\r\n\
                  Set-Cookie: b=2\r\nX-Empty:\r\nContent-Length: 3\r\n\r\nok\n",
            )?;
            Ok(true)
        }
        "/until-close" => {
            pieces(w, &[b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nread ", b"to the ", b"end"])?;
            Ok(false)
        }
        "/continue" => {
            w.write_all(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nafter 1xx",
            )?;
            Ok(true)
        }
        "/stream" => {
            // A first event, then nothing until the client has seen it (or 10 s pass): an
            // edge that holds streamed bytes back until more come fails the client's read.
            w.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst\n\r\n")?;
            for _ in 0..1000 {
                if STREAM_SEEN.swap(false, Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            w.write_all(b"5\r\nlast\n\r\n0\r\n\r\n")?;
            Ok(true)
        }
        "/big" => {
            // 1 MiB in 64 KiB writes: many reads on the edge's side.
            let block: Vec<u8> = (0..65_536u32).map(|i| b'a' + (i % 26) as u8).collect();
            w.write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 16 * block.len()).as_bytes(),
            )?;
            for _ in 0..16 {
                w.write_all(&block)?;
            }
            Ok(true)
        }
        p if p.starts_with("/bytes/") => bytes(w, p.trim_start_matches("/bytes/")),
        "/silent" => {
            // Takes the request and says nothing for 3 s, then closes: past the edge's 1 s
            // response timeout, which must answer first.
            std::thread::sleep(Duration::from_secs(3));
            Ok(false)
        }
        "/then-close" => {
            // Keep-alive by the protocol, but the backend closes right after: the edge's
            // pooled connection is found closed when it is next used.
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nclosed")?;
            Ok(false)
        }
        "/upload" => {
            let sum: u64 = req.body.iter().map(|b| u64::from(*b)).sum();
            let text = format!("{} {sum}", req.body.len());
            w.write_all(
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}", text.len()).as_bytes(),
            )?;
            Ok(true)
        }
        "/early-413" => {
            w.write_all(
                b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large",
            )?;
            Ok(false)
        }
        "/malformed" => {
            w.write_all(b"HTTP/1.1 abc Nope\r\n\r\n")?;
            Ok(false)
        }
        "/two-lengths" => {
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")?;
            Ok(false)
        }
        "/huge-head" => {
            let filler = "x".repeat(1000);
            let mut head = String::from("HTTP/1.1 200 OK\r\n");
            for i in 0..70 {
                let _ = write!(head, "x-filler-{i}: {filler}\r\n");
            }
            head.push_str("Content-Length: 2\r\n\r\nok");
            w.write_all(head.as_bytes())?;
            Ok(false)
        }
        _ => {
            w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")?;
            Ok(true)
        }
    }
}

fn serve(ns: &NetNs, seen: Arc<Seen>) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = ns.spawn("h1-backend", move || {
        let l = TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT))).expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        ready_tx.send(()).expect("ready");
        while !seen.stop.load(Ordering::Relaxed) {
            let Ok((c, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            c.set_nonblocking(false).expect("blocking");
            seen.connections.fetch_add(1, Ordering::Relaxed);
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut w = c.try_clone().expect("clone");
                let mut r = BufReader::new(c);
                while let Some(req) = read_request(&mut r) {
                    seen.requests.fetch_add(1, Ordering::Relaxed);
                    if !matches!(answer(&mut w, &req), Ok(true)) {
                        return;
                    }
                }
            });
        }
    });
    ready_rx.recv().expect("backend started");
    handle
}

/// curl from the client namespace: (status, body).
fn curl(topo: &DsrTopology, path: &str, extra: &[&str]) -> (u16, Vec<u8>) {
    curl_at(topo, 8000, path, extra)
}

fn curl_at(topo: &DsrTopology, port: u16, path: &str, extra: &[&str]) -> (u16, Vec<u8>) {
    let url = format!("http://{}:{port}{path}", topo.lb.ip);
    let out = topo
        .client
        .ns
        .command("curl")
        .args(["-sS", "--max-time", "10", "-H", "Host: h1.example", "-w", "\n%{http_code}"])
        .args(extra)
        .arg(&url)
        .output()
        .expect("run curl");
    let mut body = out.stdout;
    let at = body.iter().rposition(|b| *b == b'\n').expect("status line");
    let code = String::from_utf8_lossy(&body[at + 1..]).parse().unwrap_or(0);
    body.truncate(at);
    (code, body)
}

/// The scripted backend in the first backend's namespace and an lbd in front of it serving
/// `registry`; the backend stops when this is dropped, after lbd.
struct Scripted {
    lbd: Option<Lbd>,
    seen: Arc<Seen>,
    backend: Option<std::thread::JoinHandle<()>>,
    dir: TempDir,
    topo: DsrTopology,
}

fn scripted(tag: &str, registry: &str) -> Scripted {
    let topo = DsrTopology::new(&unique_prefix(tag), 1);
    let seen = Arc::new(Seen::default());
    let backend = serve(&topo.backends[0].ns, seen.clone());
    let dir = TempDir::new(tag);
    let reg = dir.write("services.yaml", registry);
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    Scripted { lbd: Some(lbd), seen, backend: Some(backend), dir, topo }
}

impl Scripted {
    fn log(&self) -> String {
        self.lbd.as_ref().map(Lbd::log).unwrap_or_default()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        drop(self.lbd.take());
        self.seen.stop.store(true, Ordering::Relaxed);
        if let Some(b) = self.backend.take() {
            let _ = b.join();
        }
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scripted backend, every framing and fault in turn")]
fn every_response_framing_reaches_the_client_whole_and_bad_answers_are_502() {
    if !privileged("every_response_framing_reaches_the_client_whole_and_bad_answers_are_502") {
        return;
    }
    let s = scripted(
        "edge-h1",
        &format!(
            "version: 1
listeners:
  - port: 8000
  # Uploads over 100 KB refused (413) on this one.
  - {{port: 8001, limits: {{max_body_bytes: 100000}}}}
http:
  h1.example:
    health: {{enabled: false}}
    # No second try: a request the edge got wrong is not hidden by a retry.
    retry: {{tries: 1}}
    backends: [{{host: {b}, port: {PORT}}}]
  slow.example:
    health: {{enabled: false}}
    retry: {{tries: 1}}
    timeouts: {{response: 1s}}
    backends: [{{host: {b}, port: {PORT}}}]
",
            b = backend_ip(0)
        ),
    );
    let (topo, seen, dir) = (&s.topo, &s.seen, &s.dir);
    let log = || s.log();

    let (code, body) = curl(topo, "/chunked", &[]);
    assert_eq!((code, body.as_slice()), (200, &b"hello world"[..]), "{}", log());
    let (code, body) = curl(topo, "/te-and-cl", &[]);
    assert_eq!((code, body.as_slice()), (200, &b"hello"[..]), "Transfer-Encoding wins: {}", log());
    let (code, body) = curl(topo, "/continue", &[]);
    assert_eq!((code, body.as_slice()), (200, &b"after 1xx"[..]), "{}", log());
    let (code, body) = curl(topo, "/until-close", &[]);
    assert_eq!((code, body.as_slice()), (200, &b"read to the end"[..]), "{}", log());
    // End-to-end fields reach the client as the backend wrote them, repeated ones each, the
    // hop-by-hop ones not; and the edge frames the answer itself.
    let r = topo.client.ns.run(|| {
        let mut c = lb_tests::http::Client::connect(SocketAddr::from((topo.lb.ip, 8000))).expect("connect");
        c.request("GET", "h1.example", "/fields", "", "").expect("answer")
    });
    let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        (r.status, r.body.as_str(), r.header("x-mixed-case")),
        (200, "ok\n", Some("A b")),
        "{names:?}"
    );
    let cookies: Vec<&str> =
        r.headers.iter().filter(|(k, _)| k == "Set-Cookie").map(|(_, v)| v.as_str()).collect();
    assert_eq!(cookies, ["a=1", "b=2"], "{names:?}");
    assert_eq!(r.header("x-empty"), Some(""), "{names:?}");
    for hop in ["keep-alive", "upgrade", "trailer", "proxy-connection"] {
        assert!(r.header(hop).is_none(), "{hop} passed on: {names:?}");
    }
    assert_eq!(names.iter().filter(|n| n.eq_ignore_ascii_case("content-length")).count(), 1, "{names:?}");
    assert!(r.header("connection").is_none_or(|v| !v.eq_ignore_ascii_case("keep-alive")), "{names:?}");
    let (code, body) = curl(topo, "/big", &[]);
    assert_eq!((code, body.len()), (200, 1 << 20), "{}", log());
    assert!(body.chunks(65_536).all(|b| b[0] == b'a' && b[25] == b'z'), "the bytes arrive in order");

    // Kept-alive answers reuse one connection; those that close do not.
    let before = seen.connections.load(Ordering::Relaxed);
    for _ in 0..20 {
        assert_eq!(curl(topo, "/", &[]), (200, b"ok\n".to_vec()));
    }
    assert!(
        seen.connections.load(Ordering::Relaxed) - before <= 2,
        "20 requests, a connection per edge thread at most"
    );

    // The backend closes after each answer: the next request finds its pooled connection
    // closed and goes on a fresh one, no error seen by the client.
    for _ in 0..10 {
        let (code, body) = curl(topo, "/then-close", &[]);
        assert_eq!((code, body.as_slice()), (200, &b"closed"[..]), "{}", log());
        assert_eq!(curl(topo, "/", &[]), (200, b"ok\n".to_vec()), "{}", log());
    }

    // A chunked upload past the replay buffer (64 KiB) is streamed to the backend whole.
    let upload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let file = dir.write("upload.bin", "");
    std::fs::write(&file, &upload).expect("write upload");
    let data = format!("@{}", file.display());
    let (code, body) = curl(topo, "/upload", &["-H", "Transfer-Encoding: chunked", "--data-binary", &data]);
    let sum: u64 = upload.iter().map(|b| u64::from(*b)).sum();
    assert_eq!(
        (code, String::from_utf8_lossy(&body).into_owned()),
        (200, format!("300000 {sum}")),
        "{}",
        log()
    );

    // A backend that refuses an upload from its head, before reading the body (and closes):
    // the client gets its answer, not a 502 or a timeout.
    let big = dir.write("big.bin", "");
    std::fs::write(&big, vec![b'x'; 4 << 20]).expect("write big");
    let data = format!("@{}", big.display());
    let (code, body) = curl(topo, "/early-413", &["--data-binary", &data]);
    assert_eq!((code, body.as_slice()), (413, &b"too large"[..]), "{}", log());

    // Answers the edge cannot pass on faithfully: 502, and the client is told so.
    for path in ["/malformed", "/two-lengths", "/huge-head"] {
        let (code, _) = curl(topo, path, &[]);
        assert_eq!(code, 502, "{path}: {}", log());
    }
    // And the edge keeps serving.
    assert_eq!(curl(topo, "/", &[]), (200, b"ok\n".to_vec()));

    // Uploads that fail on the client's side: the client's fault, answered so, and not
    // counted against the backend (a client could otherwise take healthy backends out).
    let b0 = format!("{}:{PORT}", backend_ip(0));
    let failures = |service: &str| lb_tests::lbd::http_failures(&topo.lb.ns, service, &b0);
    let before = failures("h1.example");
    // A chunked upload (no length to refuse it by) that grows past the listener's limit.
    let (code, _) =
        curl_at(topo, 8001, "/upload", &["-H", "Transfer-Encoding: chunked", "--data-binary", &data]);
    assert_eq!(code, 413, "{}", log());
    // A client that leaves halfway through a long upload.
    topo.client.ns.run(|| {
        let mut s = TcpStream::connect((topo.lb.ip, 8000)).expect("connect");
        let head = "POST /upload HTTP/1.1\r\nHost: h1.example\r\nContent-Length: 1000000\r\n\r\n";
        s.write_all(head.as_bytes()).expect("head");
        s.write_all(&vec![b'x'; 200_000]).expect("half the body");
        // Read until the edge closes: it saw the body break off (its answer may or may not
        // come first).
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let _ = s.read_to_end(&mut Vec::new());
    });
    assert_eq!(
        failures("h1.example"),
        before,
        "client-side upload failures counted against the backend: {}",
        log()
    );
    // A client that stops sending its upload past the response timeout (1 s here): 408, its
    // fault. The backend is waiting for the body as well; it is not timed out for it.
    let answer = topo.client.ns.run(|| {
        let mut s = TcpStream::connect((topo.lb.ip, 8000)).expect("connect");
        let head = "POST /upload HTTP/1.1\r\nHost: slow.example\r\nContent-Length: 1000000\r\n\r\n";
        s.write_all(head.as_bytes()).expect("head");
        s.write_all(&vec![b'x'; 100_000]).expect("a tenth of the body");
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut answer = vec![0u8; 12];
        let _ = s.read_exact(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    });
    assert_eq!(answer, "HTTP/1.1 408", "{}", log());
    assert_eq!(
        failures("slow.example"),
        0,
        "a client's stalled upload counted against the backend: {}",
        log()
    );
    // A backend that takes a request and never answers: 504 at the response timeout (the
    // backend closes at 3 s, which would be a 502), counted against it.
    let answer = topo.client.ns.run(|| {
        let mut s = TcpStream::connect((topo.lb.ip, 8000)).expect("connect");
        s.write_all(b"GET /silent HTTP/1.1\r\nHost: slow.example\r\nConnection: close\r\n\r\n")
            .expect("request");
        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    });
    assert!(answer.starts_with("HTTP/1.1 504"), "{answer}\n{}", log());
    assert!(answer.contains("did not answer in time"), "{answer}");
    assert_eq!(failures("slow.example"), 1, "the timeout counted against the backend: {}", log());
    assert_eq!(curl(topo, "/", &[]), (200, b"ok\n".to_vec()));
}

/// Reads `n` answers in turn.
fn read_answers(s: &mut lb_tests::http::Client, n: usize) -> Vec<(u16, String)> {
    (0..n)
        .map(|i| s.read_reply(false).unwrap_or_else(|e| panic!("answer {i}: {e}")))
        .map(|r| (r.status, r.body))
        .collect()
}

/// The edge closes the connection cleanly (a FIN, not a reset) within 2 s, sending nothing
/// more.
fn closes_cleanly(c: &mut lb_tests::http::Client, what: &str) {
    let r = c.reader_mut();
    r.get_ref().set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let mut rest = Vec::new();
    match r.read_to_end(&mut rest) {
        Ok(_) => {
            assert!(rest.is_empty(), "{what}: sent after its answer: {:?}", String::from_utf8_lossy(&rest));
        }
        Err(e) => panic!("{what}: not closed cleanly: {e}"),
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "one client conversation per rule, in turn")]
fn client_requests_are_framed_as_rfc_9112_says_pipelined_http10_and_100_continue() {
    if !privileged("client_requests_are_framed_as_rfc_9112_says_pipelined_http10_and_100_continue") {
        return;
    }
    let s = scripted(
        "edge-h1c",
        &format!(
            "version: 1
listeners:
  - port: 8000
  - {{port: 8001, limits: {{max_body_bytes: 10}}}}
http:
  h1.example:
    health: {{enabled: false}}
    retry: {{tries: 1}}
    backends: [{{host: {b}, port: {PORT}}}]
",
            b = backend_ip(0)
        ),
    );
    let topo = &s.topo;
    let log = || s.log();
    let edge = SocketAddr::from((topo.lb.ip, 8000));
    let connect = || lb_tests::http::Client::connect(edge).expect("connect");
    topo.client.ns.run(|| {
        // Four requests in one write, two with bodies, one to no route (its body is not read
        // by anyone, and must not be taken for the next request): four answers, in order.
        let mut c = connect();
        c.send_raw(
            b"POST /upload HTTP/1.1\r\nHost: h1.example\r\nContent-Length: 1\r\n\r\na\
              POST /x HTTP/1.1\r\nHost: nowhere.example\r\nContent-Length: 18\r\n\r\nGET /x HTTP/1.1\r\n\r\n\
              GET / HTTP/1.1\r\nHost: h1.example\r\n\r\n\
              POST /upload HTTP/1.1\r\nHost: h1.example\r\nContent-Length: 5\r\n\r\nhello",
        )
        .expect("send");
        let got = read_answers(&mut c, 4);
        let want = [
            (200, "1 97".to_owned()),
            (404, "no route for this host and path\n".to_owned()),
            (200, "ok\n".to_owned()),
            (200, "5 532".to_owned()),
        ];
        assert_eq!(got, want, "{}", log());

        // A chunked upload, then the same connection goes on.
        c.send_raw(
            b"POST /upload HTTP/1.1\r\nHost: h1.example\r\nTransfer-Encoding: chunked\r\n\r\n\
              3\r\nhel\r\n2;x=1\r\nlo\r\n0\r\nX-Trailer: 1\r\n\r\n",
        )
        .expect("send");
        let r = c.read_reply(false).expect("answer");
        assert_eq!((r.status, r.body.as_str()), (200, "5 532"), "{}", log());
        let date = r.header("date").expect("answers are dated");
        assert!(date.len() == 29 && date.ends_with(" GMT"), "an IMF-fixdate: {date}");
        // HEAD: the length the GET would have, no body; the connection carries on.
        let r = c.request("HEAD", "h1.example", "/", "", "").expect("HEAD");
        assert_eq!((r.status, r.header("content-length")), (200, Some("3")));
        let r = c.request("HEAD", "nowhere.example", "/", "", "").expect("HEAD");
        assert_eq!((r.status, r.header("content-length")), (404, Some("32")), "the edge's own answer too");
        let r = c.request("GET", "h1.example", "/", "", "").expect("GET after HEAD");
        assert_eq!((r.status, r.body.as_str()), (200, "ok\n"), "nothing of a body after HEAD");

        // A streamed answer reaches the client as it comes, not when it ends.
        c.send_raw(b"GET /stream HTTP/1.1\r\nHost: h1.example\r\n\r\n").expect("send");
        let r = c.read_reply(true).expect("head of a stream");
        assert_eq!((r.status, r.header("transfer-encoding")), (200, Some("chunked")));
        let mut line = String::new();
        let reader = c.reader_mut();
        // Well before the backend's 10 s: the event must come while the stream is open.
        reader.get_ref().set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
        std::io::BufRead::read_line(reader, &mut line).expect("chunk size");
        assert_eq!(line, "6\r\n");
        line.clear();
        std::io::BufRead::read_line(reader, &mut line).expect("the first event, before the stream ends");
        assert_eq!(line, "first\n");
        STREAM_SEEN.store(true, Ordering::Relaxed);
        let mut rest = [0u8; 17];
        reader.read_exact(&mut rest).expect("the rest");
        assert_eq!(&rest, b"\r\n5\r\nlast\n\r\n0\r\n\r\n");

        // Expect: 100-continue: told to go on, then answered.
        let mut c = connect();
        c.send_raw(
            b"POST /upload HTTP/1.1\r\nHost: h1.example\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
        )
        .expect("head");
        let r = c.read_reply(true).expect("100 Continue");
        assert_eq!(r.status, 100, "{}", log());
        c.send_raw(b"hello").expect("body");
        let r = c.read_reply(false).expect("answer");
        assert_eq!((r.status, r.body.as_str()), (200, "5 532"), "{}", log());
        // A body refused by its length is not asked for: 413 first, then the close.
        let mut c = lb_tests::http::Client::connect(SocketAddr::from((topo.lb.ip, 8001))).expect("connect");
        c.send_raw(
            b"POST /upload HTTP/1.1\r\nHost: h1.example\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        )
        .expect("head");
        let r = c.read_reply(false).expect("answer");
        assert_eq!(r.status, 413, "{}", log());
        closes_cleanly(&mut c, "a refused upload never sent");

        // HTTP/1.0: kept alive when asked (and told so), else closed after the answer; a body
        // of unknown length is sent until the close, not chunked.
        let mut c = connect();
        c.send_raw(b"GET / HTTP/1.0\r\nHost: h1.example\r\nConnection: keep-alive\r\n\r\n").expect("send");
        let r = c.read_reply(false).expect("answer");
        assert_eq!((r.status, r.header("connection")), (200, Some("keep-alive")), "{}", log());
        c.send_raw(b"GET /until-close HTTP/1.0\r\nHost: h1.example\r\n\r\n").expect("send");
        let r = c.read_reply(true).expect("answer");
        assert_eq!((r.status, r.header("transfer-encoding"), r.header("connection")), (200, None, Some("close")));
        let mut rest = String::new();
        c.reader_mut().read_to_string(&mut rest).expect("the body, then a clean close");
        assert_eq!(rest, "read to the end");

        // Malformed heads and framing: 400 (501 for a coding lb does not do), and the
        // connection closes with nothing more.
        for (what, req, status) in [
            ("a bad chunk size", &b"POST /upload HTTP/1.1\r\nHost: h1.example\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..], 400),
            ("chunked not last", b"POST /upload HTTP/1.1\r\nHost: h1.example\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", 400),
            ("a coding besides chunked", b"POST /upload HTTP/1.1\r\nHost: h1.example\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("two lengths", b"POST /upload HTTP/1.1\r\nHost: h1.example\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
            ("two hosts", b"GET / HTTP/1.1\r\nHost: h1.example\r\nHost: other.example\r\n\r\n", 400),
            ("no host", b"GET / HTTP/1.1\r\n\r\n", 400),
        ] {
            let mut c = connect();
            c.send_raw(req).expect("send");
            let r = c.read_reply(false).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(r.status, status, "{what}: {}", log());
            closes_cleanly(&mut c, what);
        }
        // Both framings: Transfer-Encoding wins, answered, then closed (RFC 9112 6.1).
        let mut c = connect();
        c.send_raw(
            b"POST /upload HTTP/1.1\r\nHost: h1.example\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
        )
        .expect("send");
        let r = c.read_reply(false).expect("answer");
        assert_eq!((r.status, r.body.as_str(), r.header("connection")), (200, "5 532", Some("close")));
        closes_cleanly(&mut c, "a request with both framings");
    });
}

#[test]
fn a_client_that_reads_nothing_is_closed_at_the_send_timeout_and_its_backend_connection_freed() {
    if !privileged(
        "a_client_that_reads_nothing_is_closed_at_the_send_timeout_and_its_backend_connection_freed",
    ) {
        return;
    }
    let s = scripted(
        "edge-h1s",
        &format!(
            "version: 1
listeners:
  - {{port: 8000, limits: {{send_timeout: 2s}}}}
http:
  h1.example:
    health: {{enabled: false}}
    retry: {{tries: 1}}
    backends: [{{host: {b}, port: {PORT}}}]
",
            b = backend_ip(0)
        ),
    );
    let log = || s.log();
    let edge = SocketAddr::from((s.topo.lb.ip, 8000));
    s.topo.client.ns.run(|| {
        let get = |path: &str| {
            let mut c = TcpStream::connect(edge).expect("connect");
            write!(c, "GET {path} HTTP/1.1\r\nHost: h1.example\r\n\r\n").expect("send");
            c
        };
        // A slow reader is not a stalled one: 8 MiB taken in 256 KiB pieces 100 ms apart, over
        // 3 s in all, longer than the send timeout. The edge waits for room often (a full
        // socket is writable again once a third of it is free: up to ~1.3 MiB, 0.5 s here),
        // but never 2 s for one write.
        let mut c = get("/bytes/8");
        c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut got = Vec::new();
        let mut piece = vec![0u8; 256 * 1024];
        let body = |got: &[u8]| got.windows(4).position(|w| w == b"\r\n\r\n").map(|at| got.len() - at - 4);
        while body(&got).is_none_or(|n| n < 8 << 20) {
            std::thread::sleep(Duration::from_millis(100));
            let mut n = 0;
            while n < piece.len() {
                match c.read(&mut piece[n..]) {
                    Ok(0) => panic!("closed after {} bytes\n{}", got.len() + n, log()),
                    Ok(k) => n += k,
                    Err(e) => panic!("slow reader cut off after {} bytes: {e}\n{}", got.len() + n, log()),
                }
                if body(&got).is_some_and(|b| b + n >= 8 << 20) {
                    break;
                }
            }
            got.extend_from_slice(&piece[..n]);
        }
        let head_end = got.len() - body(&got).expect("a head");
        assert!(got.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&got[..head_end]));
        assert_eq!(got.len() - head_end, 8 << 20, "the whole answer, slowly: {}", log());
        assert_eq!(BYTES_CUT.load(Ordering::Relaxed), 0);

        // A client that asks for 64 MiB and reads nothing: once the socket buffers are full,
        // the edge waits 2 s for room, then closes it, and the backend's writes fail (its
        // connection is not held on behalf of a client that left).
        let start = std::time::Instant::now();
        let mut c = get("/bytes/64");
        while BYTES_CUT.load(Ordering::Relaxed) == 0 {
            assert!(start.elapsed() < Duration::from_secs(15), "the backend is still held: {}", log());
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            start.elapsed() >= Duration::from_secs(2),
            "cut before the send timeout: {:?}",
            start.elapsed()
        );
        c.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut n = 0usize;
        let ended = loop {
            match c.read(&mut piece) {
                Ok(0) => break "closed",
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
                Err(e) => panic!("after {n} bytes, neither a close nor a reset: {e}"),
            }
        };
        assert!(n < 64 << 20, "the client was sent the whole answer ({ended})");
    });
}
