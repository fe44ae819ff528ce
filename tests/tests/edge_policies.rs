//! Edge policies with real clients against a real lbd in namespaces: rate limits (429 with
//! `Retry-After` past the burst, none for a whitelisted source, a route's own limit), the
//! circuit breaker (open, refusing, half-open, closed again), access control lists.

use std::{net::SocketAddr, sync::atomic::Ordering};

use lb_tests::{
    http::{Client, HttpBackend, Reply},
    lbd::{Lbd, TempDir, backend_status, metric, wait_status},
    privileged,
    topology::{DsrTopology, backend_ip},
    unique_prefix,
};

fn registry(whitelist: &str) -> String {
    format!(
        "version: 1
listeners: [{{port: 8000}}]
rate_limit:
  per_ip: {{rate: 2, burst: 3}}
  whitelist: [{whitelist}]
http:
  example.org:
    health: {{enabled: false}}
    backends: [{{host: {b}, port: 8080}}]
  slow.example.org:
    health: {{enabled: false}}
    rate_limit: {{rate: 1, burst: 0}}
    backends: [{{host: {b}, port: 8080}}]
",
        b = backend_ip(0)
    )
}

/// `n` requests to `host` on one keep-alive connection, as fast as they come back.
fn burst(topo: &DsrTopology, edge: SocketAddr, host: &str, n: usize) -> Vec<Reply> {
    topo.client.ns.run(|| {
        let mut c = Client::connect(edge).expect("connect");
        (0..n).map(|i| c.request("GET", host, &format!("/{i}"), "", "").expect("answer")).collect()
    })
}

#[test]
fn requests_past_a_rate_limit_get_429_with_retry_after_and_whitelisted_sources_none() {
    if !privileged("requests_past_a_rate_limit_get_429_with_retry_after_and_whitelisted_sources_none") {
        return;
    }
    let tag = "edge-rate";
    let topo = DsrTopology::new(&unique_prefix(tag), 1);
    let backend = HttpBackend::start(&topo.backends[0].ns, "backend-0", 8080);
    let dir = TempDir::new(tag);
    let reg = dir.write("services.yaml", &registry("192.0.2.0/24"));
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    let edge = SocketAddr::from((topo.lb.ip, 8000));

    // Per address 2/s, burst 3: ten requests at once, the first four (or five, should half a
    // second pass) answered, the rest refused, and only the answered ones reach the backend.
    let before = backend.state.requests();
    let replies = burst(&topo, edge, "example.org", 10);
    let ok = replies.iter().filter(|r| r.status == 200).count();
    let refused: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    assert!((4..=5).contains(&ok) && ok + refused.len() == 10, "{replies:?}\n{}", lbd.log());
    assert!(replies[..4].iter().all(|r| r.status == 200), "the burst comes first: {replies:?}");
    assert_eq!(backend.state.requests() - before, ok as u64, "refused requests reach no backend");
    let r = refused[0];
    assert_eq!(r.header("retry-after"), Some("1"), "{r:?}");
    assert_eq!(r.header("ratelimit-limit"), Some("2"), "{r:?}");
    assert_eq!(r.header("ratelimit-remaining"), Some("0"), "{r:?}");
    assert!(r.header("ratelimit-policy").is_some_and(|p| p.contains("scope=per_ip")), "{r:?}");
    let counted = metric(&topo.lb.ns, "lb_http_rate_limited_total{limit=\"per_ip\"} ");
    let n = u32::try_from(refused.len()).expect("a few");
    assert!((counted - f64::from(n)).abs() < 0.5, "counted {counted}, refused {n}");

    // The client's address whitelisted: twenty at once, all answered.
    let reg_text = registry(&format!("192.0.2.0/24, {}/32", topo.client.ip));
    dir.replace("services.yaml", &reg_text);
    assert_eq!(lbd.wait_reload(), "reloaded", "{}", lbd.log());
    let replies = burst(&topo, edge, "example.org", 20);
    assert!(replies.iter().all(|r| r.status == 200), "whitelisted: {replies:?}");

    // A route's own limit (1/s, no burst) applies to whitelisted clients too.
    let replies = burst(&topo, edge, "slow.example.org", 3);
    assert_eq!(replies.iter().map(|r| r.status).collect::<Vec<_>>()[..2], [200, 429], "{replies:?}");
    assert!(replies[1].header("ratelimit-policy").is_some_and(|p| p.contains("scope=route")));
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(stopped.log.contains("status=429"), "the refusals are in the access log");
}

#[test]
fn a_failing_backends_circuit_opens_refuses_half_opens_and_closes_when_it_recovers() {
    if !privileged("a_failing_backends_circuit_opens_refuses_half_opens_and_closes_when_it_recovers") {
        return;
    }
    let tag = "edge-breaker";
    let topo = DsrTopology::new(&unique_prefix(tag), 1);
    let backend = HttpBackend::start(&topo.backends[0].ns, "backend-0", 8080);
    let dir = TempDir::new(tag);
    let reg = dir.write(
        "services.yaml",
        &format!(
            "version: 1
listeners: [{{port: 8000}}]
http:
  example.org:
    health: {{enabled: false}}
    passive: {{failures: 0}}
    circuit_breaker: {{consecutive_errors: 3, error_rate: 0, slow: 300ms, open_for: 1s}}
    backends: [{{host: {b}, port: 8080}}]
",
            b = backend_ip(0)
        ),
    );
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    let edge = SocketAddr::from((topo.lb.ip, 8000));
    let identity = format!("{}:8080", backend_ip(0));
    let circuit = |s: &serde_json::Value| {
        backend_status(s, "example.org", &identity).map(|b| b["http"]["circuit"].clone()).unwrap_or_default()
    };
    let one = || burst(&topo, edge, "example.org", 1).remove(0);
    let sent = || backend.state.requests();

    // Two 500s and one slow answer: three errors in a row open the circuit.
    backend.state.status.store(500, Ordering::Relaxed);
    assert_eq!([one().status, one().status], [500, 500]);
    backend.state.status.store(200, Ordering::Relaxed);
    backend.state.delay_ms.store(500, Ordering::Relaxed);
    assert_eq!(one().status, 200, "a slow answer is still passed on");
    backend.state.delay_ms.store(0, Ordering::Relaxed);
    assert_eq!(sent(), 3);
    let s = lb_tests::lbd::status(&topo.lb.ns);
    assert_eq!(circuit(&s), "open", "{s:#}");
    let labels = format!("{{service=\"example.org\",backend=\"{identity}\"}} ");
    let state = metric(&topo.lb.ns, &format!("lb_http_circuit_state{labels}"));
    assert!((state - 1.0).abs() < 0.5, "state {state}, 1 is open");

    // Open: refused at the edge, the backend sees nothing.
    let r = one();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("circuit is open"), "{r:?}");
    assert_eq!(sent(), 3, "nothing reaches a backend whose circuit is open");

    // Half-open after open_for: the trial fails (500), and the circuit opens again.
    backend.state.status.store(500, Ordering::Relaxed);
    wait_status(&topo.lb.ns, "half-open", |s| circuit(s) == "half-open");
    assert_eq!(one().status, 500, "the trial reaches the backend");
    assert_eq!(sent(), 4);
    assert_eq!(one().status, 503, "open again after the failed trial");
    assert_eq!(sent(), 4);

    // The backend recovers: the next trial succeeds and closes the circuit.
    backend.state.status.store(200, Ordering::Relaxed);
    wait_status(&topo.lb.ns, "half-open again", |s| circuit(s) == "half-open");
    let replies = burst(&topo, edge, "example.org", 5);
    assert!(replies.iter().all(|r| r.status == 200), "{replies:?}");
    assert_eq!(sent(), 9);
    let s = lb_tests::lbd::status(&topo.lb.ns);
    assert_eq!(circuit(&s), "closed", "{s:#}");
    let opened = metric(&topo.lb.ns, &format!("lb_http_circuit_opened_total{labels}"));
    assert!((opened - 2.0).abs() < 0.5, "opened {opened} times, not 2");

    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    for state in ["state=\"open\"", "state=\"half-open\"", "state=\"closed\""] {
        assert!(stopped.log.contains(state), "{state} logged: {}", stopped.log);
    }
}

#[test]
fn acls_refuse_admin_paths_to_sources_outside_their_ranges_and_denied_sources_everything() {
    if !privileged("acls_refuse_admin_paths_to_sources_outside_their_ranges_and_denied_sources_everything") {
        return;
    }
    let tag = "edge-acl";
    let topo = DsrTopology::new(&unique_prefix(tag), 1);
    let backend = HttpBackend::start(&topo.backends[0].ns, "backend-0", 8080);
    let dir = TempDir::new(tag);
    let registry = |acl: &str| {
        format!(
            "version: 1
listeners: [{{port: 8000}}]
acl:
{acl}
http:
  example.org:
    health: {{enabled: false}}
    backends: [{{host: {b}, port: 8080}}]
",
            b = backend_ip(0)
        )
    };
    // Seed 001's rule, with a range the client (10.10.0.10) is not in.
    let admin_rule = "  rules:\n    - path: /admin/*\n      allow: 192.168.0.0/16\n";
    let reg = dir.write("services.yaml", &registry(&format!("  deny: [203.0.113.0/24]\n{admin_rule}")));
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    let edge = SocketAddr::from((topo.lb.ip, 8000));
    let get = |path: &str| {
        {
            topo.client
                .ns
                .run(|| Client::connect(edge).and_then(|mut c| c.request("GET", "example.org", path, "", "")))
        }
        .expect("an answer")
    };

    let before = backend.state.requests();
    for path in ["/admin/users", "/admin", "/%61dmin/users", "//admin/../admin/x"] {
        assert_eq!(get(path).status, 403, "{path}");
    }
    assert_eq!(get("/shop").status, 200);
    assert_eq!(backend.state.requests() - before, 1, "refused requests reach no backend");
    let denied = metric(&topo.lb.ns, "lb_http_acl_denied_total ");
    assert!((denied - 4.0).abs() < 0.5, "counted {denied}");

    // The client's range allowed on /admin: served.
    dir.replace("services.yaml", &registry("  rules:\n    - path: /admin/*\n      allow: 10.0.0.0/8\n"));
    assert_eq!(lbd.wait_reload(), "reloaded", "{}", lbd.log());
    assert_eq!(get("/admin/users").status, 200);

    // The client denied: nothing is served to it.
    dir.replace("services.yaml", &registry(&format!("  deny: {}\n", topo.client.ip)));
    assert_eq!(lbd.wait_reload(), "reloaded", "{}", lbd.log());
    assert_eq!(get("/shop").status, 403);
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}
