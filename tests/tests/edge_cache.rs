//! The edge cache with real clients against a real lbd in namespaces: a static asset served
//! without touching the backend until its TTL, `Cache-Control` and `Vary` obeyed, credentials
//! and dynamic paths passed through, conditional requests answered 304, memory bounded, and
//! 100 concurrent misses producing one upstream request.
#![expect(clippy::float_cmp, reason = "the counters read are whole numbers, exact in f64")]

use std::{
    net::SocketAddr,
    sync::{Arc, Barrier, atomic::Ordering},
    time::{Duration, Instant},
};

use lb_tests::{
    http::{Client, HttpBackend, Reply},
    lbd::{Lbd, TempDir, metric},
    privileged,
    topology::{DsrTopology, backend_ip},
    unique_prefix,
};

fn registry(edge_cache: &str) -> String {
    format!(
        "version: 1
listeners: [{{port: 8000}}]
{edge_cache}
http:
  example.org:
    cache: \"static, 10m\"
    health: {{enabled: false}}
    backends: [{{host: {b}, port: 8080}}]
",
        b = backend_ip(0)
    )
}

/// One request on a fresh connection from the client namespace.
fn get(topo: &DsrTopology, edge: SocketAddr, path: &str, extra: &str) -> Reply {
    topo.client.ns.run(|| {
        let mut c = Client::connect(edge).expect("connect");
        c.request("GET", "example.org", path, extra, "").expect("answer")
    })
}

fn set_headers(backend: &HttpBackend, lines: &str) {
    lines.clone_into(&mut backend.state.extra_headers.lock().unwrap());
}

#[test]
fn a_static_asset_is_served_from_the_cache_until_its_ttl_and_cache_control_and_vary_are_obeyed() {
    if !privileged(
        "a_static_asset_is_served_from_the_cache_until_its_ttl_and_cache_control_and_vary_are_obeyed",
    ) {
        return;
    }
    let tag = "edge-cache";
    let topo = DsrTopology::new(&unique_prefix(tag), 1);
    let backend = HttpBackend::start(&topo.backends[0].ns, "backend-0", 8080);
    let dir = TempDir::new(tag);
    let reg = dir.write("services.yaml", &registry(""));
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    let edge = SocketAddr::from((topo.lb.ip, 8000));
    let upstream = || backend.state.requests();

    // The backend allows a minute (max-age), less than the policy's 10 min.
    set_headers(&backend, "cache-control: public, max-age=60\r\netag: \"v1\"\r\n");
    let first = get(&topo, edge, "/assets/app.css", "");
    assert_eq!(
        (first.status, first.body.as_str(), first.header("x-cache")),
        (200, "backend-0\n", Some("MISS"))
    );
    assert_eq!(upstream(), 1);
    for _ in 0..20 {
        let r = get(&topo, edge, "/assets/app.css", "");
        assert_eq!((r.status, r.body.as_str(), r.header("x-cache")), (200, "backend-0\n", Some("HIT")));
        assert_eq!(r.header("cache-control"), Some("public, max-age=60"), "the backend's headers are kept");
        assert!(
            r.header("age").is_some_and(|a| a.parse::<u64>().is_ok_and(|a| a < 60)),
            "{:?}",
            r.header("age")
        );
    }
    // A client holding the current copy gets a 304 from the cache.
    let r = get(&topo, edge, "/assets/app.css", "if-none-match: \"v1\"\r\n");
    assert_eq!((r.status, r.header("x-cache"), r.body.as_str()), (304, Some("HIT"), ""));
    // HEAD is answered from the kept GET answer.
    let head = topo.client.ns.run(|| {
        let mut c = Client::connect(edge).expect("connect");
        c.request("HEAD", "example.org", "/assets/app.css", "", "").expect("answer")
    });
    assert_eq!(
        (head.status, head.header("x-cache"), head.header("content-length")),
        (200, Some("HIT"), Some("10"))
    );
    assert_eq!(upstream(), 1, "hits never reached the backend");

    // Past the TTL the next request goes upstream again, and not before: an asset the
    // backend allows 2 s.
    set_headers(&backend, "cache-control: public, max-age=2\r\n");
    let first_sent = Instant::now();
    assert_eq!(get(&topo, edge, "/assets/short.css", "").header("x-cache"), Some("MISS"));
    let expired = loop {
        let r = get(&topo, edge, "/assets/short.css", "");
        if r.header("x-cache") == Some("MISS") {
            break first_sent.elapsed();
        }
        assert!(first_sent.elapsed() < Duration::from_secs(10), "never expired");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(expired >= Duration::from_secs(2), "served stale: expired after {expired:?}");
    assert_eq!(upstream(), 3);
    let r = get(&topo, edge, "/assets/app.css", "");
    assert_eq!(r.header("x-cache"), Some("HIT"), "kept for its minute");

    // Dynamic paths (the policy is `static`) and requests with credentials pass through.
    set_headers(&backend, "cache-control: public, max-age=60\r\n");
    let before = upstream();
    for _ in 0..2 {
        assert_eq!(get(&topo, edge, "/api/users", "").header("x-cache"), None);
        let r = get(&topo, edge, "/assets/logo.png", "authorization: Bearer t\r\n");
        assert_eq!(r.header("x-cache"), None);
    }
    assert_eq!(upstream(), before + 4);

    // What the backend forbids is not kept: no-store, private, Set-Cookie.
    for (i, forbid) in
        ["cache-control: no-store\r\n", "cache-control: private, max-age=60\r\n", "set-cookie: s=1\r\n"]
            .into_iter()
            .enumerate()
    {
        set_headers(&backend, forbid);
        let before = upstream();
        for _ in 0..3 {
            let r = get(&topo, edge, &format!("/forbidden-{i}.js"), "");
            assert_eq!((r.status, r.header("x-cache")), (200, Some("MISS")), "{forbid}");
        }
        assert_eq!(upstream(), before + 3, "{forbid}");
    }

    // Vary: one answer per Accept-Encoding.
    set_headers(&backend, "cache-control: max-age=60\r\nvary: accept-encoding\r\n");
    let before = upstream();
    let enc = |e: &str| get(&topo, edge, "/fonts/a.woff2", &format!("accept-encoding: {e}\r\n"));
    let seen: Vec<Option<String>> = ["gzip", "gzip", "br", "br", "gzip"]
        .iter()
        .map(|e| enc(e).header("x-cache").map(str::to_owned))
        .collect();
    assert_eq!(seen, ["MISS", "HIT", "MISS", "HIT", "HIT"].map(|s| Some(s.to_owned())));
    assert_eq!(upstream(), before + 2);

    let ns = &topo.lb.ns;
    assert!(metric(ns, "lb_http_cache_requests_total{service=\"example.org\",result=\"hit\"}") >= 24.0);
    assert!(metric(ns, "lb_http_cache_entries") >= 2.0);
    drop(lbd);
}

#[test]
fn a_hundred_concurrent_misses_make_one_upstream_request_and_memory_stays_bounded() {
    if !privileged("a_hundred_concurrent_misses_make_one_upstream_request_and_memory_stays_bounded") {
        return;
    }
    let tag = "edge-coalesce";
    let topo = DsrTopology::new(&unique_prefix(tag), 1);
    let backend = HttpBackend::start(&topo.backends[0].ns, "backend-0", 8080);
    let dir = TempDir::new(tag);
    let reg =
        dir.write("services.yaml", &registry("edge_cache: {memory_bytes: 20000, max_object_bytes: 4096}"));
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    let edge = SocketAddr::from((topo.lb.ip, 8000));

    // The backend takes a second: every client asks while the first request is upstream.
    backend.state.delay_ms.store(1000, Ordering::Relaxed);
    let clients = 100;
    let start = Arc::new(Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            let start = start.clone();
            topo.client.ns.spawn("cache-client", move || {
                let mut c = Client::connect(edge).expect("connect");
                start.wait();
                c.request("GET", "example.org", "/bundle.js", "", "").expect("answer")
            })
        })
        .collect();
    let replies: Vec<Reply> = threads.into_iter().map(|t| t.join().expect("client")).collect();
    assert!(replies.iter().all(|r| r.status == 200 && r.body == "backend-0\n"), "{replies:?}");
    assert_eq!(backend.state.requests(), 1, "100 concurrent misses, one upstream request");
    let ns = &topo.lb.ns;
    let label = |r: &str| format!("lb_http_cache_requests_total{{service=\"example.org\",result=\"{r}\"}}");
    let count = |r: &str| metric(ns, &label(r));
    assert_eq!(count("miss"), 1.0);
    assert_eq!(count("coalesced") + count("hit"), 99.0);
    assert!(count("coalesced") >= 50.0, "most waited for the one fetch");

    // Memory: 200 distinct assets into a 20,000-byte cache.
    backend.state.delay_ms.store(0, Ordering::Relaxed);
    topo.client.ns.run(|| {
        let mut c = Client::connect(edge).expect("connect");
        for i in 0..200 {
            let r = c.request("GET", "example.org", &format!("/img/{i}.png"), "", "").expect("answer");
            assert_eq!(r.status, 200);
        }
    });
    let bytes = metric(ns, "lb_http_cache_bytes");
    assert!(bytes > 0.0 && bytes <= 20_000.0, "{bytes}");
    assert!(metric(ns, "lb_http_cache_evictions_total") >= 100.0);
    assert_eq!(metric(ns, "lb_http_cache_memory_bytes"), 20_000.0);
    drop(lbd);
}
