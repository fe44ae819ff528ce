//! TLS at the HTTP edge with real clients and servers: certificates chosen by SNI, HTTP/2
//! (ALPN and h2c), TLS versions and ciphers, mTLS, a certificate replaced under wrk load and
//! by a file rename, SNI passthrough to a backend that terminates TLS itself (openssl
//! `s_server`), and WebSocket echo through the edge.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use lb_tests::{
    http::{Client, HttpBackend},
    lbd::{Lbd, TempDir, backend_status, lb_ctl, metric, status, wait_status},
    pki::{Pki, end_date},
    privileged,
    process::{Spawned, text, wrk_summary},
    topology::{DsrTopology, backend_ip},
    unique_prefix,
    ws::{self, WsEcho},
};
use tokio_tungstenite::tungstenite::Message;

const BACKEND: u16 = 8080;

struct Setup {
    topo: DsrTopology,
    backends: Vec<HttpBackend>,
    dir: TempDir,
    pki: Pki,
}

impl Setup {
    /// `n` HTTP backends (`backend-I`), a CA with certificates `a` (a.example, *.a.example,
    /// 90 days) and `b` (b.example, 20 days) and a client certificate, and lbd with `registry`
    /// (`B0`, `B1`... replaced by backend addresses; certificate paths relative to it).
    fn new(tag: &str, n: usize, registry: &str) -> (Self, Lbd) {
        let topo = DsrTopology::new(&unique_prefix(tag), n);
        let backends = (0..n)
            .map(|i| HttpBackend::start(&topo.backends[i].ns, &format!("backend-{i}"), BACKEND))
            .collect();
        let dir = TempDir::new(tag);
        let pki = Pki::new(dir.path());
        let _ = pki.server("a", &["a.example", "*.a.example"], 90);
        let _ = pki.server("b", &["b.example"], 20);
        let _ = pki.client("client", "client-1");
        let mut text = registry.to_owned();
        for i in (0..n).rev() {
            text = text.replace(&format!("B{i}"), &backend_ip(i).to_string());
        }
        let reg = dir.write("services.yaml", &text);
        let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
        (Self { topo, backends, dir, pki }, lbd)
    }

    fn lb(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.topo.lb.ip, port))
    }

    fn client_cmd(&self, program: &str) -> Command {
        self.topo.client.ns.command(program)
    }

    /// `openssl s_client` to `port` with `args`; stdout and stderr together.
    fn s_client(&self, port: u16, args: &[&str]) -> String {
        let out = self
            .client_cmd("openssl")
            .arg("s_client")
            .arg("-connect")
            .arg(self.lb(port).to_string())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run openssl s_client");
        text(&out).replace(' ', "")
    }

    /// curl to `https://NAME:PORT/PATH` resolved to the lb; `(exit code, stdout, stderr)`.
    fn curl(&self, name: &str, port: u16, path: &str, args: &[&str]) -> (i32, String, String) {
        let out = self
            .client_cmd("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(self.pki.ca())
            .arg("--resolve")
            .arg(format!("{name}:{port}:{}", self.topo.lb.ip))
            .args(args)
            .arg(format!("https://{name}:{port}{path}"))
            .output()
            .expect("run curl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

/// The subject common name of the certificate a server presented, from `s_client`'s output.
fn subject(s_client: &str) -> Option<&str> {
    s_client.lines().find_map(|l| l.strip_prefix("subject=CN=")).map(str::trim)
}

#[test]
#[expect(clippy::too_many_lines, reason = "one lbd, every TLS rule checked in turn")]
fn https_chooses_certificates_by_sni_speaks_h2_and_refuses_what_it_must() {
    if !privileged("https_chooses_certificates_by_sni_speaks_h2_and_refuses_what_it_must") {
        return;
    }
    let reg = "version: 1
listeners:
  - port: 8443
    tls:
      certificates: [{cert: a.pem, key: a.key}, {cert: b.pem, key: b.key, name: bee}]
      hsts: {max_age: 1d, include_subdomains: true}
  - port: 8444
    tls:
      certificates: [{cert: a.pem, key: a.key}]
      protocols: [TLSv1.2]
      ciphers: [ECDHE-ECDSA-AES128-GCM-SHA256]
  - port: 8445
    tls:
      certificates: [{cert: a.pem, key: a.key}]
      client_auth: {ca: ca.pem}
  - {port: 8000, h2c: true}
http:
  a.example:
    hosts: [a.example, '*.a.example']
    backends: [{host: B0, port: 8080}]
  b.example:
    backends: [{host: B1, port: 8080}]
";
    let (s, lbd) = Setup::new("edge-tls", 2, reg);
    let log = || lbd.log();

    // Certificates by SNI: exact, wildcard, and the first as the default.
    for (sni, want) in [
        (Some("b.example"), "b.example"),
        (Some("a.example"), "a.example"),
        (Some("x.a.example"), "a.example"),
        (Some("other.example"), "a.example"),
        (None, "a.example"),
    ] {
        let args = sni.map_or(vec!["-noservername"], |n| vec!["-servername", n]);
        let out = s.s_client(8443, &args);
        assert_eq!(subject(&out), Some(want), "SNI {sni:?}:\n{out}\nlbd:\n{}", log());
    }

    // HTTP/2 by ALPN, HTTP/1.1 for those who ask, HSTS, and what the backend learns.
    let (code, body, err) = s.curl("b.example", 8443, "/h2", &["--http2", "-D", "-"]);
    assert_eq!(code, 0, "{err}\n{}", log());
    assert!(body.starts_with("HTTP/2 200"), "{body}");
    assert!(body.contains("strict-transport-security: max-age=86400; includeSubDomains"), "{body}");
    assert!(body.ends_with("backend-1\n"), "{body}");
    let (code, body, err) = s.curl("x.a.example", 8443, "/h1", &["--http1.1", "-D", "-"]);
    assert_eq!(code, 0, "{err}");
    assert!(body.starts_with("HTTP/1.1 200") && body.ends_with("backend-0\n"), "{body}");
    let heads = s.backends[1].state.heads.lock().unwrap().clone();
    let head = heads.iter().find(|h| h.starts_with("GET /h2")).expect("the h2 request reached backend-1");
    assert!(head.contains("x-forwarded-proto: https\r\n"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("host: b.example:8443\r\n"),
        "an HTTP/1.1 Host from :authority: {head}"
    );

    // h2c: HTTP/2 without TLS on a plain listener, for clients that know.
    let out = s
        .client_cmd("curl")
        .args(["-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
        .args(["-H", "Host: a.example"])
        .arg(format!("http://{}/", s.lb(8000)))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2 200", "{}", text(&out));
    // The same listener still speaks HTTP/1.1 to clients that do.
    let out = s
        .client_cmd("curl")
        .args(["-sS", "--http1.1", "-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
        .args(["-H", "Host: a.example"])
        .arg(format!("http://{}/", s.lb(8000)))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1.1 200", "{}", text(&out));

    // Versions: 1.2 and 1.3 spoken, 1.1 refused by the server (a protocol_version alert).
    let out = s.s_client(8443, &["-servername", "a.example", "-tls1_2"]);
    assert!(out.contains("Protocol:TLSv1.2"), "{out}");
    let out = s.s_client(8443, &["-servername", "a.example", "-tls1_3"]);
    assert!(out.contains("New,TLSv1.3"), "{out}");
    let failures = metric(&s.topo.lb.ns, "lb_tls_handshake_failures_total ");
    let out = s.s_client(8443, &["-servername", "a.example", "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]);
    assert!(out.contains("Cipheris(NONE)") && out.contains("SSLalertnumber"), "TLS 1.1 refused by lb: {out}");
    let after = metric(&s.topo.lb.ns, "lb_tls_handshake_failures_total ");
    assert!((after - failures - 1.0).abs() < 0.5, "one failed handshake counted: {failures} -> {after}");

    // Ciphers: only the one configured (seed 001 style names), only TLS 1.2 on 8444.
    let out = s
        .s_client(8444, &["-servername", "a.example", "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]);
    assert!(out.contains("CipherisECDHE-ECDSA-AES128-GCM-SHA256"), "{out}");
    let out = s
        .s_client(8444, &["-servername", "a.example", "-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-GCM-SHA384"]);
    assert!(out.contains("alerthandshakefailure") && subject(&out).is_none(), "{out}");
    let out = s.s_client(8444, &["-servername", "a.example", "-tls1_3"]);
    assert!(out.contains("alertprotocolversion"), "{out}");

    // mTLS: no certificate, no request; the CA's client certificate is served.
    let failures_before = metric(&s.topo.lb.ns, "lb_tls_handshake_failures_total ");
    let (code, body, err) = s.curl("a.example", 8445, "/", &[]);
    assert_ne!(code, 0, "served without a client certificate: {body}");
    assert!(body.is_empty(), "{body}");
    // curl words it as an alert or as a closed connection, depending on which it reads first;
    // the edge counts it either way.
    let failures_after = metric(&s.topo.lb.ns, "lb_tls_handshake_failures_total ");
    assert!(failures_after > failures_before, "refused handshake counted ({err})");
    let dir = s.dir.path();
    let cert = dir.join("client.pem").display().to_string();
    let key = dir.join("client.key").display().to_string();
    let (code, body, err) = s.curl("a.example", 8445, "/", &["--cert", &cert, "--key", &key]);
    assert_eq!((code, body.as_str()), (0, "backend-0\n"), "{err}");
    let failures_now = metric(&s.topo.lb.ns, "lb_tls_handshake_failures_total ");
    assert!((failures_now - failures_after).abs() < 0.5, "a good handshake is not a failure ({err})");

    // Expiry: exported per certificate, and b's 20 days warned about.
    let bee = metric(&s.topo.lb.ns, r#"lb_tls_certificate_expiry_seconds{listener="8443",name="bee"} "#);
    assert!((19.0 * 86400.0..=20.0 * 86400.0).contains(&bee), "{bee}");
    let a = metric(&s.topo.lb.ns, r#"lb_tls_certificate_expiry_seconds{listener="8443",name="a.example"} "#);
    assert!(a > 89.0 * 86400.0, "{a}");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(
        stopped.log.contains("certificate expires within 30 days") && stopped.log.contains("name=bee"),
        "{}",
        stopped.log
    );
}

/// A sample's value from lbd's `/metrics`; `prefix` is its name and labels and a space.

#[test]
fn a_certificate_is_replaced_under_load_without_one_failed_request() {
    if !privileged("a_certificate_is_replaced_under_load_without_one_failed_request") {
        return;
    }
    let reg = "version: 1
listeners:
  - port: 8443
    tls: {certificates: [{cert: a.pem, key: a.key}]}
http:
  a.example:
    backends: [{host: B0, port: 8080}]
";
    let (s, lbd) = Setup::new("edge-cert", 1, reg);
    let dir = s.dir.path().to_owned();
    let (a_pem, a_key) = (dir.join("a.pem"), dir.join("a.key"));
    let old_end = end_date(&a_pem);
    // New keys and a new validity, made aside.
    let (new_pem, new_key) = s.pki.server("a-new", &["a.example"], 60);
    let (third_pem, third_key) = s.pki.server("a-third", &["a.example"], 45);
    assert_ne!(end_date(&new_pem), old_end);

    // wrk with a new connection (a full handshake) per request.
    let wrk = s
        .client_cmd("wrk")
        .args(["-t2", "-c8", "-d6s", "--latency", "-H", "Connection: close", "-H", "Host: a.example"])
        .arg(format!("https://{}/", s.lb(8443)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wrk");
    let wrk = Spawned::new(wrk);
    // Load is flowing when the backend has served some of it.
    let backend = &s.backends[0].state;
    wait_for("wrk's first requests", || backend.requests() >= 50);
    let (code, out, err) = lb_ctl(
        &s.topo.lb.ns,
        &["ssl", "update", "--cert", &new_pem.display().to_string(), "--key", &new_key.display().to_string()],
    );
    assert_eq!(code, 0, "{out}{err}\n{}", lbd.log());
    assert!(out.contains("listener 8443: a.example replaced"), "{out}");
    let served_after_update = backend.requests();
    let out = wrk.wait();
    assert!(backend.requests() > served_after_update + 50, "wrk kept going after the update");
    let (total, failures) = wrk_summary(&out).unwrap_or_else(|| panic!("wrk output:\n{out}"));
    assert!(total > 200, "{out}");
    assert!(!failures, "failed requests:\n{out}");

    // Served now, and written where the registry points (a restart keeps it).
    assert_eq!(std::fs::read(&a_pem).unwrap(), std::fs::read(&new_pem).unwrap());
    assert_eq!(std::fs::read(&a_key).unwrap(), std::fs::read(&new_key).unwrap());
    assert_eq!(served_end_date(&s, "a.example"), end_date(&new_pem));

    // A key that does not match is refused; nothing changes.
    let (code, _, err) = lb_ctl(
        &s.topo.lb.ns,
        &[
            "ssl",
            "update",
            "--cert",
            &third_pem.display().to_string(),
            "--key",
            &new_key.display().to_string(),
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not the private key of the certificate"), "{err}");
    assert_eq!(std::fs::read(&a_pem).unwrap(), std::fs::read(&new_pem).unwrap());
    // A name no certificate has.
    let (code, _, err) = lb_ctl(
        &s.topo.lb.ns,
        &[
            "ssl",
            "update",
            "--name",
            "nope",
            "--cert",
            &third_pem.display().to_string(),
            "--key",
            &third_key.display().to_string(),
        ],
    );
    assert_eq!(code, 3, "{err}");

    // Renewal by files (certbot's way): renamed into place, picked up by the watcher.
    install(&third_key, &a_key);
    install(&third_pem, &a_pem);
    wait_status(&s.topo.lb.ns, "the renewed certificate", |st| {
        st["certificates"][0]["not_after_unix"]
            .as_i64()
            .is_some_and(|t| (t - now_unix() - 45 * 86400).abs() < 2 * 86400)
    });
    assert_eq!(served_end_date(&s, "a.example"), end_date(&third_pem));
    assert!(lbd.log().contains("certificates reloaded"), "{}", lbd.log());
}

fn now_unix() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs().cast_signed()
}

/// Copies `from` next to `to` and renames it over `to`.
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp-new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// The end date of the certificate lb serves for `name`.
fn served_end_date(s: &Setup, name: &str) -> String {
    let out = s
        .client_cmd("openssl")
        .args(["s_client", "-connect", &s.lb(8443).to_string(), "-servername", name])
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    // openssl x509 reads the first PEM block, after s_client's other lines.
    let file = s.dir.write("served.txt", &String::from_utf8_lossy(&out.stdout));
    end_date(&file)
}

/// Polls `done` (a backend counter: no event to wait on) for up to 10 s.
fn wait_for(what: &str, done: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "waited 10 s for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long a TLS client that sends nothing after its handshake stays connected through the
/// passthrough `port` (`None`: still after 10 s).
fn idle_passthrough_lasts(s: &Setup, port: u16, name: &str) -> Option<Duration> {
    let mut idle = s
        .client_cmd("openssl")
        .args(["s_client", "-ign_eof", "-quiet", "-servername", name, "-connect"])
        .arg(s.lb(port).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run openssl s_client");
    let start = std::time::Instant::now();
    loop {
        if idle.try_wait().expect("wait").is_some() {
            return Some(start.elapsed());
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = idle.kill();
            let _ = idle.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[expect(
    clippy::too_many_lines,
    reason = "one lbd: passthrough, then WebSockets, each with its idle timeout"
)]
fn tls_passes_through_by_sni_and_websockets_are_proxied_both_ways() {
    if !privileged("tls_passes_through_by_sni_and_websockets_are_proxied_both_ways") {
        return;
    }
    let reg = "version: 1
listeners:
  - {port: 8000}
  # Tunnels idle for 1 s closed, WebSocket and passthrough.
  - {port: 8001, limits: {tunnel_timeout: 1s}}
  - {port: 8446, passthrough: true, limits: {tunnel_timeout: 1s}}
http:
  secure:
    hosts: [secure.example]
    listeners: [8446]
    backends: [{host: B1, port: 8443}]
  ws:
    hosts: [ws.example]
    listeners: [8000, 8001]
    backends: [{host: B0, port: 9001}]
";
    let (s, lbd) = Setup::new("edge-pass", 2, reg);
    // The backend terminates TLS itself, with a certificate lb does not have.
    let (pem, key) = s.pki.server("secure", &["secure.example"], 30);
    let server = s.topo.backends[1]
        .ns
        .command("openssl")
        .args(["s_server", "-accept", "8443", "-www", "-quiet", "-cert"])
        .arg(&pem)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run openssl s_server");
    let _server = Spawned::new(server);
    let _echo = WsEcho::start(&s.topo.backends[0].ns, 9001);
    // Both are up once lbd's health checks pass.
    let b1 = format!("{}:8443", backend_ip(1));
    let b0 = format!("{}:9001", backend_ip(0));
    wait_status(&s.topo.lb.ns, "backends up", |st| {
        backend_status(st, "secure", &b1).is_some_and(|b| b["health"] == "up")
            && backend_status(st, "ws", &b0).is_some_and(|b| b["health"] == "up")
    });

    // Passthrough: the client talks TLS with the backend, through lb.
    let (code, body, err) = s.curl("secure.example", 8446, "/", &["-o", "/dev/null", "-w", "%{http_code}"]);
    assert_eq!((code, body.as_str()), (0, "200"), "{err}\n{}", lbd.log());
    let out = s.s_client(8446, &["-servername", "secure.example"]);
    assert_eq!(subject(&out), Some("secure.example"), "{out}");
    // A name no service has: closed, nothing forwarded.
    let out = s.s_client(8446, &["-servername", "other.example"]);
    assert_eq!(subject(&out), None, "{out}");
    // Plain HTTP on a passthrough port is not TLS: closed without an answer.
    let closed = s.topo.client.ns.run(|| {
        let mut c = Client::connect(s.lb(8446)).expect("connect");
        c.send_raw(b"GET / HTTP/1.1\r\nHost: secure.example\r\n\r\n").expect("send");
        c.closed_within(Duration::from_secs(5))
    });
    assert!(closed, "a plain HTTP request on the passthrough port was not closed");
    // A passthrough connection idle past the tunnel timeout: closed by lb (the client waits
    // for the server, which waits for a request, forever).
    let idle = idle_passthrough_lasts(&s, 8446, "secure.example");
    let idle =
        idle.unwrap_or_else(|| panic!("an idle passthrough connection still open after 10 s\n{}", lbd.log()));
    assert!(idle >= Duration::from_secs(1), "closed before the tunnel timeout: {idle:?}");
    // lb closed it for idleness, as its access log says (written as the relay ends).
    let ended_idle = |log: &str| {
        log.lines()
            .any(|l| l.contains("passthrough") && (l.contains("end=\"idle\"") || l.contains("end=idle")))
    };
    let start = std::time::Instant::now();
    while !ended_idle(&lbd.log()) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ended_idle(&lbd.log()), "no passthrough ended for idleness:\n{}", lbd.log());

    // WebSocket: text and a 200 KB binary message echoed through the edge.
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let lb_ns = &s.topo.lb.ns;
    let open = || lb_tests::lbd::edge_connections(lb_ns).iter().sum::<u64>();
    // Until this changes: the edge's open client connections are the tunnel alone.
    let counted_open = |want: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while open() != want && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        open()
    };
    let mut during = None;
    let mut timers = String::new();
    let back = s.topo.client.ns.run(|| {
        ws::echo_then(
            s.lb(8000),
            "ws.example",
            "/chat",
            vec![Message::text("hello"), Message::binary(big.clone())],
            || {
                during = Some(counted_open(1));
                // The timer `ss` shows is keepalive once nothing waits to be acknowledged.
                for _ in 0..100 {
                    let ss = lb_ns
                        .command("ss")
                        .args(["-tno", "state", "established", "( sport = :8000 )"])
                        .output();
                    timers = ss.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
                    if timers.contains("keepalive") {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            },
        )
    });
    let back = back.unwrap_or_else(|e| panic!("{e}\nlbd:\n{}", lbd.log()));
    // An upgraded connection still holds its place (per-client cap, thread placement).
    assert_eq!(during, Some(1), "client connections counted open while a WebSocket tunnel is");
    assert_eq!(counted_open(0), 0, "the tunnel counted out once closed");
    // Keepalives on the client's socket: a client gone without a FIN does not hold it forever.
    assert!(timers.contains("keepalive"), "no keepalive timer on the tunnel's socket:\n{timers}");
    assert_eq!(back[0], Message::text("hello"));
    assert_eq!(back[1], Message::binary(big));
    let st = status(&s.topo.lb.ns);
    assert!(backend_status(&st, "ws", &b0).is_some_and(|b| b["http"]["requests"] == 1), "{st:#}");
    // A tunnel under the 1 s tunnel timeout: open for 2 s while a message goes every 300 ms,
    // then closed 1 s (plus an eighth at most) after the last.
    let quiet = s.topo.client.ns.run(|| {
        let (every, busy) = (Duration::from_millis(300), Duration::from_secs(2));
        ws::quiet_until_closed(s.lb(8001), "ws.example", "/chat", every, busy, Duration::from_secs(10))
    });
    let quiet = quiet.unwrap_or_else(|e| panic!("{e}\nlbd:\n{}", lbd.log()));
    assert!(
        quiet >= Duration::from_millis(900) && quiet < Duration::from_secs(3),
        "closed {quiet:?} after the last message"
    );
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(
        stopped.log.contains("passthrough") && stopped.log.contains("sni=secure.example"),
        "{}",
        stopped.log
    );
}
