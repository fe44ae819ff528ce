//! How the edge talks to backends, against a real nginx as the backend: HTTPS with the edge's
//! client certificate (mTLS, seed 002), HTTP/2 over TLS and in the clear, the PROXY protocol v2
//! (HTTP and TLS passthrough), and keep-alive connections closed after `max_requests`.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::Stdio,
};

use lb_tests::{
    http::{Client, get},
    lbd::{Lbd, TempDir, backend_status, wait_status},
    netns::NetNs,
    pki::Pki,
    privileged,
    process::Spawned,
    topology::{DsrTopology, backend_ip},
    unique_prefix,
};

/// nginx in the backend's namespace: one process (`master_process off`), so killing it when
/// dropped leaves no worker behind.
fn start_nginx(ns: &NetNs, dir: &Path, servers: &str) -> Spawned {
    let d = dir.display();
    let conf = format!(
        "daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/nginx.err;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  default_type text/plain;
  {servers}
}}
"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).expect("write nginx.conf");
    let child = ns
        .command("nginx")
        .arg("-c")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run nginx (cargo xtask test installs it)");
    Spawned::new(child)
}

/// nginx servers answering with what they saw: protocol, TLS version, client certificate,
/// PROXY address, connection serial and requests on it. 9443: TLS requiring a client
/// certificate from `ca`; 9444: HTTP/2 over TLS; 9081: HTTP/2 in the clear; 9082: the PROXY
/// protocol; 9445: the PROXY protocol, then TLS with the `pass` certificate. 9081 also takes
/// `WebDAV` `PUT`s under `/dav/` into `dav` (nginx reads the whole body before answering).
fn backend_servers(srv: (&Path, &Path), ca: &Path, pass: (&Path, &Path), dav: &Path) -> String {
    let ssl = |port: u16, extra: &str| {
        format!(
            "ssl_certificate {};
    ssl_certificate_key {};
    listen {port} ssl{extra};",
            srv.0.display(),
            srv.1.display()
        )
    };
    let echo = r#"return 200 "proto=$server_protocol tls=$ssl_protocol dn=$ssl_client_s_dn pp=$proxy_protocol_addr conn=$connection n=$connection_requests\n";"#;
    format!(
        "server {{ {mtls}
    ssl_verify_client on;
    ssl_client_certificate {ca};
    location / {{ {echo} }} }}
  server {{ {h2tls}
    location / {{ {echo} }} }}
  server {{ listen 9081 http2; location / {{ {echo} }}
    location /dav/ {{ dav_methods PUT; root {dav}; client_max_body_size 10m; }} }}
  server {{ listen 9082 proxy_protocol; location / {{ {echo} }} }}
  server {{ listen 9445 ssl proxy_protocol;
    ssl_certificate {pass_pem};
    ssl_certificate_key {pass_key};
    location / {{ {echo} }} }}",
        mtls = ssl(9443, ""),
        h2tls = ssl(9444, " http2"),
        ca = ca.display(),
        pass_pem = pass.0.display(),
        pass_key = pass.1.display(),
        dav = dav.display(),
    )
}

fn registry(b: Ipv4Addr, ca: &Path, edge: (&Path, &Path)) -> String {
    format!(
        "version: 1
listeners: [{{port: 8000}}, {{port: 8446, passthrough: true}}]
http:
  mtls.example:
    listeners: [8000]
    backends: [{{host: {b}, port: 9443}}]
    pool: {{max_requests: 5}}
    upstream:
      tls: {{ca: {ca}, cert: {edge_pem}, key: {edge_key}, server_name: backend.internal}}
  nocert.example:
    listeners: [8000]
    backends: [{{host: {b}, port: 9443}}]
    upstream: {{tls: {{ca: {ca}, server_name: backend.internal}}}}
  h2tls.example:
    listeners: [8000]
    backends: [{{host: {b}, port: 9444}}]
    upstream: {{protocol: http2, tls: {{ca: {ca}, server_name: backend.internal}}}}
  idle.example:
    listeners: [8000]
    backends: [{{host: {b}, port: 9443}}]
    pool: {{idle_timeout: 300ms}}
    upstream:
      tls: {{ca: {ca}, cert: {edge_pem}, key: {edge_key}, server_name: backend.internal}}
  h2c.example:
    listeners: [8000]
    backends: [{{host: {b}, port: 9081}}]
    upstream: {{protocol: http2}}
  pp.example:
    listeners: [8000]
    backends: [{{host: {b}, port: 9082}}]
    upstream: {{proxy_protocol: true}}
  secure.example:
    listeners: [8446]
    backends: [{{host: {b}, port: 9445}}]
    upstream: {{proxy_protocol: true}}
",
        ca = ca.display(),
        edge_pem = edge.0.display(),
        edge_key = edge.1.display(),
    )
}

#[test]
#[expect(clippy::too_many_lines, reason = "one nginx, every way of reaching it checked in turn")]
fn backends_get_mtls_http2_proxy_headers_and_fresh_connections_after_max_requests() {
    if !privileged("backends_get_mtls_http2_proxy_headers_and_fresh_connections_after_max_requests") {
        return;
    }
    let tag = "edge-up";
    let topo = DsrTopology::new(&unique_prefix(tag), 1);
    let dir = TempDir::new(tag);
    let pki = Pki::new(dir.path());
    let (srv_pem, srv_key) = pki.server("backend", &["backend.internal"], 30);
    let (edge_pem, edge_key) = pki.client("edge", "lb-edge");
    let (pass_pem, pass_key) = pki.server("secure", &["secure.example"], 30);
    let ca = pki.ca();
    let backend_dir = dir.path().join("nginx");
    std::fs::create_dir_all(backend_dir.join("dav/dav")).expect("nginx dirs");
    let servers =
        backend_servers((&srv_pem, &srv_key), &ca, (&pass_pem, &pass_key), &backend_dir.join("dav"));
    let _nginx = start_nginx(&topo.backends[0].ns, &backend_dir, &servers);

    let b = backend_ip(0);
    let reg = registry(b, &ca, (&edge_pem, &edge_key));
    let reg = dir.write("services.yaml", &reg);
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    wait_status(&topo.lb.ns, "backends up", |st| {
        [
            ("mtls.example", 9443),
            ("h2tls.example", 9444),
            ("h2c.example", 9081),
            ("pp.example", 9082),
            ("secure.example", 9445),
        ]
        .iter()
        .all(|(svc, port)| {
            backend_status(st, svc, &format!("{b}:{port}")).is_some_and(|x| x["health"] == "up")
        })
    });

    let edge = SocketAddr::from((topo.lb.ip, 8000));
    let client_ip = topo.client.ip.to_string();
    let ask = |host: &str| {
        let r = topo.client.ns.run(|| get(edge, host, "/"));
        let r = r.unwrap_or_else(|e| panic!("{host}: {e}\n{}", lbd.log()));
        (r.status, r.body)
    };
    let field = |body: &str, name: &str| {
        body.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .to_owned()
    };

    // mTLS: the backend verified the edge's client certificate.
    let (status, body) = ask("mtls.example");
    assert_eq!(status, 200, "{body}\n{}", lbd.log());
    assert_eq!(field(&body, "dn"), "CN=lb-edge", "{body}");
    assert_eq!(field(&body, "proto"), "HTTP/1.1", "{body}");
    // The same backend without the certificate: nginx refuses the request.
    let (status, body) = ask("nocert.example");
    assert_eq!(status, 400, "a backend requiring a client certificate got none: {body}");

    // max_requests 5: twelve sequential requests over exactly three connections, none carrying
    // more than five.
    let mut conns = BTreeSet::new();
    let mut most = 0;
    for _ in 0..12 {
        let (status, body) = ask("mtls.example");
        assert_eq!(status, 200, "{body}");
        conns.insert(field(&body, "conn"));
        most = most.max(field(&body, "n").parse::<u32>().expect("n"));
    }
    eprintln!("max_requests 5: 12 requests over {} connection(s), at most {most} each", conns.len());
    assert_eq!(most, 5, "a connection carries max_requests requests, then closes");
    assert!((3..=4).contains(&conns.len()), "12 requests, 5 a connection: {conns:?}");

    // HTTP/2 to the backend, by ALPN over TLS and by prior knowledge in the clear; several
    // requests share one connection.
    for host in ["h2tls.example", "h2c.example"] {
        let mut conns = BTreeSet::new();
        for _ in 0..4 {
            let (status, body) = ask(host);
            assert_eq!((status, field(&body, "proto").as_str()), (200, "HTTP/2.0"), "{host}: {body}");
            conns.insert(field(&body, "conn"));
        }
        assert_eq!(conns.len(), 1, "{host}: streams of one connection: {conns:?}");
    }

    // An upload streamed to an HTTP/2 backend (past the 64 KiB replay buffer) arrives whole;
    // a client leaving halfway through one is the client's fault, not the backend's (hyper's
    // HTTP/2 client drops the body's error and resets the stream: the edge keeps its own
    // record), so no failure is counted against the backend.
    let put = |len: usize, sent: usize| {
        topo.client.ns.run(|| {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect(edge).expect("connect");
            let head = format!(
                "PUT /dav/up HTTP/1.1\r\nHost: h2c.example\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n"
            );
            s.write_all(head.as_bytes()).expect("head");
            s.write_all(&vec![b'x'; sent]).expect("body");
            if sent < len {
                // Leaves: the edge reads the end of its stream.
                s.shutdown(std::net::Shutdown::Write).expect("shutdown");
            }
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
            let mut answer = Vec::new();
            let _ = s.read_to_end(&mut answer);
            String::from_utf8_lossy(&answer).lines().next().unwrap_or_default().to_owned()
        })
    };
    let status_line = put(300_000, 300_000);
    assert!(status_line.starts_with("HTTP/1.1 201"), "{status_line}\n{}", lbd.log());
    let kept = std::fs::metadata(backend_dir.join("dav/dav/up")).expect("uploaded file").len();
    assert_eq!(kept, 300_000, "the whole upload reached the backend");
    let h2c = format!("{b}:9081");
    let failures = || lb_tests::lbd::http_failures(&topo.lb.ns, "h2c.example", &h2c);
    let before = failures();
    let status_line = put(1_000_000, 200_000);
    assert!(!status_line.contains(" 502 "), "the client's fault answered as the backend's: {status_line}");
    assert_eq!(failures(), before, "a client's broken upload counted against the backend: {}", lbd.log());

    // idle_timeout 300 ms: a connection idle past it is closed and the next request opens
    // another; within it, the connection is reused. One client connection, so one edge
    // thread and its pool.
    let (first, again, later) = topo.client.ns.run(|| {
        let mut c = Client::connect(edge).expect("connect");
        let mut one = || c.request("GET", "idle.example", "/", "", "").expect("answer").body;
        let (first, again) = (one(), one());
        std::thread::sleep(std::time::Duration::from_millis(800));
        (first, again, one())
    });
    assert_eq!(field(&first, "conn"), field(&again, "conn"), "reused within the idle timeout");
    assert_ne!(field(&again, "conn"), field(&later, "conn"), "closed after the idle timeout");

    // PROXY protocol v2: the backend sees the client's address, not the lb's.
    let (status, body) = ask("pp.example");
    assert_eq!((status, field(&body, "pp")), (200, client_ip.clone()), "{body}\n{}", lbd.log());
    // And through TLS passthrough: the header, then the client's own TLS stream.
    let out = topo
        .client
        .ns
        .command("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&ca)
        .arg("--resolve")
        .arg(format!("secure.example:8446:{}", topo.lb.ip))
        .arg("https://secure.example:8446/")
        .output()
        .expect("run curl");
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stderr), lbd.log());
    assert_eq!(field(&body, "pp"), client_ip, "{body}");
    assert!(field(&body, "tls").starts_with("TLSv1."), "the client's TLS reached the backend: {body}");
    drop(lbd);
}
