//! What `/lb-status` and `/metrics` show, rendered from a [`Snapshot`] of the controller's
//! state. Pure: no I/O.

use std::{
    fmt::Write as _,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use serde_json::{Value, json};

use crate::config::Problem;

/// The outcome of the last reload.
#[derive(Debug, Clone)]
pub struct ReloadRecord {
    pub at: SystemTime,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Located registry problems, when the registry was invalid.
    pub problems: Vec<Problem>,
}

#[derive(Debug, Clone)]
pub struct BackendReport {
    pub backend: String,
    pub role: &'static str,
    pub node: Option<String>,
    /// The registry's weight.
    pub weight: u32,
    /// Weight in the Maglev table now (XDP services).
    pub table_weight: Option<u32>,
    /// Why it takes no new flows.
    pub reason: Option<String>,
    /// `up`, `down`, `unknown` (not probed yet) or `unchecked`.
    pub health: &'static str,
    pub drained: bool,
    pub checks: u64,
    pub check_failures: u64,
    pub last_check_latency: Option<Duration>,
    pub last_error: Option<String>,
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
    /// MAC address its packets are sent to (itself, or its gateway), XDP services.
    pub next_hop_mac: Option<[u8; 6]>,
    /// What the HTTP edge saw of it (HTTP services).
    pub http: Option<HttpStats>,
}

/// A backend as the HTTP edge sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpStats {
    /// Attempts sent to it.
    pub requests: u64,
    /// Attempts that failed (connect error, reset, timeout, a retryable status).
    pub failures: u64,
    pub in_flight: u32,
    /// Taken out by passive health now.
    pub passive_out: bool,
    /// Its circuit breaker: `closed`, `open` or `half-open` (`None`: the service has none).
    pub circuit: Option<&'static str>,
    /// Times its circuit opened.
    pub circuit_opened: u64,
    /// Average time to response headers.
    pub latency: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct ServiceReport {
    pub name: String,
    /// `tcp` (layer 4) or `http`.
    pub kind: &'static str,
    pub vip: Option<IpAddr>,
    pub port: Option<u16>,
    pub protocols: Vec<&'static str>,
    pub mode: Option<&'static str>,
    /// Which backends the table holds (XDP services).
    pub serving: Option<&'static str>,
    pub when_all_down: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub backends: Vec<BackendReport>,
    /// What the HTTP edge answered for it (HTTP services).
    pub http: Option<HttpTraffic>,
}

/// An HTTP service's answers: by status class, and a histogram of their durations.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HttpTraffic {
    /// 1xx to 5xx.
    pub classes: [u64; 5],
    /// Per bucket of [`crate::edge::DURATION_BOUNDS`], not cumulative; the last is above them.
    pub buckets: [u64; crate::edge::DURATION_BOUNDS.len() + 1],
    pub sum: Duration,
    /// Edge cache hits, misses and coalesced misses (services with `cache:`).
    pub cache: Option<[u64; 3]>,
}

/// The edge cache as a whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheReport {
    /// Memory its answers take, and the bound.
    pub bytes: u64,
    pub entries: u64,
    pub memory: u64,
    /// Answers kept, and dropped to stay under the bound, since start.
    pub stored: u64,
    pub evicted: u64,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub generation: u64,
    pub config_file: String,
    pub files: Vec<String>,
    pub iface: String,
    pub node: Option<String>,
    pub uptime: Duration,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub last_reload: Option<ReloadRecord>,
    pub services: Vec<ServiceReport>,
    /// Data plane counters by name.
    pub counters: Vec<(&'static str, u64)>,
    /// Certificates the HTTP edge serves.
    pub certificates: Vec<CertReport>,
    /// TLS handshakes the edge saw fail or time out.
    pub tls_handshake_failures: u64,
    /// Requests the edge refused over a rate limit.
    pub rate_limited: RateLimited,
    pub cache: CacheReport,
    /// Client connections open on each edge thread.
    pub edge_connections: Vec<u64>,
}

/// A certificate served on a listener.
#[derive(Debug, Clone)]
pub struct CertReport {
    pub listener: u16,
    pub name: String,
    pub names: Vec<String>,
    pub file: String,
    /// End of validity, seconds since the epoch.
    pub not_after: i64,
}

/// A lookup: which backend gets the flow `src:sport -> dst:dport/proto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupQuery {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub proto: String,
}

impl LookupQuery {
    /// Parses `src=..&sport=..&dst=..&dport=..&proto=..` (proto defaults to tcp).
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut src = None;
        let mut sport = None;
        let mut dst = None;
        let mut dport = None;
        let mut proto = "tcp".to_owned();
        for (k, v) in query_pairs(query) {
            match k {
                "src" => src = Some(v.parse().map_err(|_| format!("src `{v}` is not an IP address"))?),
                "dst" => dst = Some(v.parse().map_err(|_| format!("dst `{v}` is not an IP address"))?),
                "sport" => sport = Some(v.parse().map_err(|_| format!("sport `{v}` is not a port"))?),
                "dport" => dport = Some(v.parse().map_err(|_| format!("dport `{v}` is not a port"))?),
                "proto" => proto = v,
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        Ok(Self {
            src: src.ok_or("missing src")?,
            sport: sport.ok_or("missing sport")?,
            dst: dst.ok_or("missing dst")?,
            dport: dport.ok_or("missing dport")?,
            proto,
        })
    }
}

/// A URL query's `key=value` pairs, values decoded.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (&str, String)> {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k, percent_decode(v))
    })
}

/// `%XX` and `+` decoding of a query value.
#[must_use]
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(b) = hex {
                    out.push(b);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs().cast_signed())
}

fn problem_json(p: &Problem) -> Value {
    json!({
        "file": p.file.display().to_string(),
        "line": p.line,
        "column": p.column,
        "field": p.field,
        "message": p.message,
        "hint": p.hint,
        "text": p.to_string(),
    })
}

/// `/lb-status`.
#[must_use]
pub fn status(s: &Snapshot) -> Value {
    let last_reload = s.last_reload.as_ref().map(|r| {
        json!({
            "ok": r.error.is_none(),
            "at_unix": unix_secs(r.at),
            "error": r.error,
            "problems": r.problems.iter().map(problem_json).collect::<Vec<_>>(),
        })
    });
    let services: Vec<Value> = s
        .services
        .iter()
        .map(|svc| {
            let backends: Vec<Value> = svc
                .backends
                .iter()
                .map(|b| {
                    json!({
                        "backend": b.backend,
                        "role": b.role,
                        "node": b.node,
                        "weight": b.weight,
                        "table_weight": b.table_weight,
                        "reason": b.reason,
                        "health": b.health,
                        "drained": b.drained,
                        "checks": b.checks,
                        "check_failures": b.check_failures,
                        "last_check_ms": b.last_check_latency.map(|d| d.as_secs_f64() * 1e3),
                        "last_error": b.last_error,
                        "packets": b.packets,
                        "bytes": b.bytes,
                        "next_hop_mac": b.next_hop_mac.map(|m| {
                            m.iter().map(|o| format!("{o:02x}")).collect::<Vec<_>>().join(":")
                        }),
                        "proxy": b.http.as_ref().filter(|_| svc.kind == "tcp").map(|h| json!({
                            "connections": h.requests,
                            "connect_failures": h.failures,
                            "open": h.in_flight,
                        })),
                        "http": b.http.as_ref().filter(|_| svc.kind == "http").map(|h| json!({
                            "requests": h.requests,
                            "failures": h.failures,
                            "in_flight": h.in_flight,
                            "passive_out": h.passive_out,
                            "circuit": h.circuit,
                            "circuit_opened": h.circuit_opened,
                            "latency_ms": h.latency.map(|d| d.as_secs_f64() * 1e3),
                        })),
                    })
                })
                .collect();
            json!({
                "name": svc.name,
                "kind": svc.kind,
                "vip": svc.vip.map(|v| v.to_string()),
                "port": svc.port,
                "protocols": svc.protocols,
                "mode": svc.mode,
                "serving": svc.serving,
                "when_all_down": svc.when_all_down,
                "packets": svc.packets,
                "bytes": svc.bytes,
                "backends": backends,
                "http": svc.http.as_ref().map(|t| json!({
                    "responses": t.classes.iter().sum::<u64>(),
                    "by_class": {"1xx": t.classes[0], "2xx": t.classes[1], "3xx": t.classes[2], "4xx": t.classes[3], "5xx": t.classes[4]},
                    "cache": t.cache.map(|[hit, miss, coalesced]| json!({"hit": hit, "miss": miss, "coalesced": coalesced})),
                })),
            })
        })
        .collect();
    let counters: serde_json::Map<String, Value> =
        s.counters.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect();
    json!({
        "generation": s.generation,
        "config_file": s.config_file,
        "files": s.files,
        "iface": s.iface,
        "node": s.node,
        "uptime_s": s.uptime.as_secs_f64(),
        "reloads": {"ok": s.reloads_ok, "failed": s.reloads_failed},
        "last_reload": last_reload,
        "services": services,
        "counters": counters,
        "certificates": s.certificates.iter().map(|c| json!({
            "listener": c.listener,
            "name": c.name,
            "names": c.names,
            "file": c.file,
            "not_after_unix": c.not_after,
            "seconds_left": c.not_after - unix_now(),
        })).collect::<Vec<_>>(),
        "tls_handshake_failures": s.tls_handshake_failures,
        "rate_limited": s.rate_limited,
        "acl_denied": s.rate_limited.acl,
        "cache": s.cache,
    })
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', r"\\").replace('"', "\\\"").replace('\n', r"\n")
}

struct Metrics(String);

impl Metrics {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", label(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }
}

/// Certificates served, and failed handshakes.
fn tls_metrics(m: &mut Metrics, s: &Snapshot) {
    m.family(
        "lb_tls_certificate_expiry_seconds",
        "gauge",
        "Seconds until each served certificate expires (negative: expired).",
    );
    let now = unix_now();
    for c in &s.certificates {
        let port = c.listener.to_string();
        m.sample(
            "lb_tls_certificate_expiry_seconds",
            &[("listener", &port), ("name", &c.name)],
            c.not_after - now,
        );
    }
    m.family("lb_tls_handshake_failures_total", "counter", "TLS handshakes that failed or timed out.");
    m.sample("lb_tls_handshake_failures_total", &[], s.tls_handshake_failures);
}

/// Requests refused by the edge's rate limits, by limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RateLimited {
    pub global: u64,
    pub per_ip: u64,
    pub route: u64,
    /// Refused by the ACL (403); `acl_denied` in the status document.
    #[serde(skip)]
    pub acl: u64,
}

fn edge_thread_metrics(m: &mut Metrics, s: &Snapshot) {
    m.family("lb_edge_connections", "gauge", "Client connections open, by edge thread.");
    for (i, n) in s.edge_connections.iter().enumerate() {
        m.sample("lb_edge_connections", &[("thread", &i.to_string())], *n);
    }
}

fn rate_metrics(m: &mut Metrics, s: &Snapshot) {
    m.family("lb_http_rate_limited_total", "counter", "Requests answered 429 over a rate limit, by limit.");
    let r = &s.rate_limited;
    for (limit, n) in [("global", r.global), ("per_ip", r.per_ip), ("route", r.route)] {
        m.sample("lb_http_rate_limited_total", &[("limit", limit)], n);
    }
    m.family("lb_http_acl_denied_total", "counter", "Requests answered 403 by the access control lists.");
    m.sample("lb_http_acl_denied_total", &[], r.acl);
}

/// What each HTTP service answered, and how fast.
fn http_service_metrics(m: &mut Metrics, s: &Snapshot) {
    let http = || s.services.iter().filter_map(|svc| svc.http.as_ref().map(|t| (svc, t)));
    m.family("lb_http_responses_total", "counter", "Responses per HTTP service, by status class.");
    for (svc, t) in http() {
        for (class, n) in ["1xx", "2xx", "3xx", "4xx", "5xx"].iter().zip(t.classes) {
            m.sample("lb_http_responses_total", &[("service", &svc.name), ("code", class)], n);
        }
    }
    m.family(
        "lb_http_request_duration_seconds",
        "histogram",
        "Time from a request's arrival to the end of its response, per HTTP service.",
    );
    for (svc, t) in http() {
        let mut below = 0;
        for (bound, n) in crate::edge::DURATION_BOUNDS.iter().zip(t.buckets) {
            below += n;
            let le = bound.to_string();
            m.sample(
                "lb_http_request_duration_seconds_bucket",
                &[("service", &svc.name), ("le", &le)],
                below,
            );
        }
        let count: u64 = t.buckets.iter().sum();
        m.sample("lb_http_request_duration_seconds_bucket", &[("service", &svc.name), ("le", "+Inf")], count);
        m.sample("lb_http_request_duration_seconds_sum", &[("service", &svc.name)], t.sum.as_secs_f64());
        m.sample("lb_http_request_duration_seconds_count", &[("service", &svc.name)], count);
    }
}

/// The edge cache: answers per service by outcome, memory, evictions.
fn cache_metrics(m: &mut Metrics, s: &Snapshot) {
    m.family(
        "lb_http_cache_requests_total",
        "counter",
        "Cacheable requests per HTTP service: hit, miss, or coalesced (a miss answered by another request's fetch).",
    );
    for svc in &s.services {
        let Some(c) = svc.http.as_ref().and_then(|t| t.cache) else { continue };
        for (result, n) in ["hit", "miss", "coalesced"].into_iter().zip(c) {
            m.sample("lb_http_cache_requests_total", &[("service", &svc.name), ("result", result)], n);
        }
    }
    let c = &s.cache;
    m.family("lb_http_cache_bytes", "gauge", "Memory the edge cache's answers take.");
    m.sample("lb_http_cache_bytes", &[], c.bytes);
    m.family(
        "lb_http_cache_memory_bytes",
        "gauge",
        "The edge cache's memory bound (edge_cache.memory_bytes).",
    );
    m.sample("lb_http_cache_memory_bytes", &[], c.memory);
    m.family("lb_http_cache_entries", "gauge", "Answers the edge cache holds.");
    m.sample("lb_http_cache_entries", &[], c.entries);
    m.family("lb_http_cache_evictions_total", "counter", "Answers dropped to stay under the memory bound.");
    m.sample("lb_http_cache_evictions_total", &[], c.evicted);
}

/// The L4 proxy's view of each backend of `mode: proxy` services.
fn proxy_metrics(m: &mut Metrics, s: &Snapshot) {
    let proxied = || {
        (s.services.iter().filter(|svc| svc.kind == "tcp"))
            .flat_map(|svc| svc.backends.iter().map(move |b| (svc, b)))
            .filter_map(|(svc, b)| b.http.as_ref().map(|h| (svc, b, h)))
    };
    m.family(
        "lb_proxy_connections_total",
        "counter",
        "Connections and UDP flows the L4 proxy relayed to each backend.",
    );
    for (svc, b, h) in proxied() {
        m.sample(
            "lb_proxy_connections_total",
            &[("service", &svc.name), ("backend", &b.backend)],
            h.requests,
        );
    }
    m.family(
        "lb_proxy_connect_failures_total",
        "counter",
        "Failed connects from the L4 proxy to each backend.",
    );
    for (svc, b, h) in proxied() {
        m.sample(
            "lb_proxy_connect_failures_total",
            &[("service", &svc.name), ("backend", &b.backend)],
            h.failures,
        );
    }
    m.family(
        "lb_proxy_open_connections",
        "gauge",
        "Connections and UDP flows the L4 proxy has open to each backend.",
    );
    for (svc, b, h) in proxied() {
        m.sample(
            "lb_proxy_open_connections",
            &[("service", &svc.name), ("backend", &b.backend)],
            h.in_flight,
        );
    }
}

/// The HTTP edge's view of each backend.
fn http_metrics(m: &mut Metrics, s: &Snapshot) {
    let http = || {
        (s.services.iter().filter(|svc| svc.kind == "http"))
            .flat_map(|svc| svc.backends.iter().map(move |b| (svc, b)))
            .filter_map(|(svc, b)| b.http.as_ref().map(|h| (svc, b, h)))
    };
    m.family("lb_http_requests_total", "counter", "Attempts the HTTP edge sent to each backend.");
    for (svc, b, h) in http() {
        m.sample("lb_http_requests_total", &[("service", &svc.name), ("backend", &b.backend)], h.requests);
    }
    m.family(
        "lb_http_failures_total",
        "counter",
        "Failed attempts per backend (connect, reset, timeout, retryable status).",
    );
    for (svc, b, h) in http() {
        m.sample("lb_http_failures_total", &[("service", &svc.name), ("backend", &b.backend)], h.failures);
    }
    m.family("lb_http_in_flight", "gauge", "Requests in flight per backend.");
    for (svc, b, h) in http() {
        m.sample("lb_http_in_flight", &[("service", &svc.name), ("backend", &b.backend)], h.in_flight);
    }
    m.family("lb_http_passive_out", "gauge", "1 while passive health keeps the backend out.");
    for (svc, b, h) in http() {
        m.sample(
            "lb_http_passive_out",
            &[("service", &svc.name), ("backend", &b.backend)],
            u8::from(h.passive_out),
        );
    }
    m.family(
        "lb_http_circuit_state",
        "gauge",
        "Circuit breaker per backend: 0 closed, 1 open, 2 half-open (services with a breaker).",
    );
    for (svc, b, h) in http() {
        if let Some(state) = h.circuit {
            let v = match state {
                "open" => 1,
                "half-open" => 2,
                _ => 0,
            };
            m.sample("lb_http_circuit_state", &[("service", &svc.name), ("backend", &b.backend)], v);
        }
    }
    m.family("lb_http_circuit_opened_total", "counter", "Times a backend's circuit breaker opened.");
    for (svc, b, h) in http() {
        if h.circuit.is_some() {
            m.sample(
                "lb_http_circuit_opened_total",
                &[("service", &svc.name), ("backend", &b.backend)],
                h.circuit_opened,
            );
        }
    }
    m.family("lb_http_latency_ewma_seconds", "gauge", "Average time to response headers per backend.");
    for (svc, b, h) in http() {
        if let Some(d) = h.latency {
            m.sample(
                "lb_http_latency_ewma_seconds",
                &[("service", &svc.name), ("backend", &b.backend)],
                d.as_secs_f64(),
            );
        }
    }
}

/// `/metrics`, in the Prometheus text format (0.0.4).
#[must_use]
#[expect(clippy::too_many_lines, reason = "one family after another, in the order /metrics lists them")]
pub fn metrics(s: &Snapshot) -> String {
    let mut m = Metrics(String::with_capacity(4096));
    m.family("lb_config_generation", "gauge", "Registry generation serving now; +1 per applied change.");
    m.sample("lb_config_generation", &[], s.generation);
    m.family("lb_config_reloads_total", "counter", "Registry reloads by result.");
    m.sample("lb_config_reloads_total", &[("result", "success")], s.reloads_ok);
    m.sample("lb_config_reloads_total", &[("result", "failure")], s.reloads_failed);
    m.family("lb_config_last_reload_success", "gauge", "1 when the last reload applied, 0 when it failed.");
    let ok = s.last_reload.as_ref().is_none_or(|r| r.error.is_none());
    m.sample("lb_config_last_reload_success", &[], u8::from(ok));
    m.family(
        "lb_config_error_info",
        "gauge",
        "The last reload's registry problems (the last good registry keeps serving).",
    );
    if let Some(r) = s.last_reload.as_ref().filter(|r| r.error.is_some()) {
        if r.problems.is_empty() {
            m.sample("lb_config_error_info", &[("message", r.error.as_deref().unwrap_or(""))], 1);
        }
        for p in &r.problems {
            let (line, column) = (p.line.to_string(), p.column.to_string());
            let file = p.file.display().to_string();
            m.sample(
                "lb_config_error_info",
                &[
                    ("file", &file),
                    ("line", &line),
                    ("column", &column),
                    ("field", &p.field),
                    ("message", &p.message),
                ],
                1,
            );
        }
    }
    m.family("lb_service_packets_total", "counter", "Packets forwarded by XDP per layer-4 service.");
    for svc in s.services.iter().filter(|s| s.vip.is_some()) {
        m.sample("lb_service_packets_total", &[("service", &svc.name)], svc.packets);
    }
    m.family("lb_service_bytes_total", "counter", "Bytes forwarded by XDP per layer-4 service.");
    for svc in s.services.iter().filter(|s| s.vip.is_some()) {
        m.sample("lb_service_bytes_total", &[("service", &svc.name)], svc.bytes);
    }
    m.family(
        "lb_service_serving",
        "gauge",
        "Which backends each service's table holds (1 for the current one).",
    );
    for svc in &s.services {
        if let Some(serving) = svc.serving {
            m.sample("lb_service_serving", &[("service", &svc.name), ("serving", serving)], 1);
        }
    }
    let backends = || s.services.iter().flat_map(|svc| svc.backends.iter().map(move |b| (svc, b)));
    m.family("lb_backend_packets_total", "counter", "Packets forwarded by XDP to each backend.");
    for (svc, b) in backends() {
        if let Some(p) = b.packets {
            m.sample("lb_backend_packets_total", &[("service", &svc.name), ("backend", &b.backend)], p);
        }
    }
    m.family("lb_backend_bytes_total", "counter", "Bytes forwarded by XDP to each backend.");
    for (svc, b) in backends() {
        if let Some(p) = b.bytes {
            m.sample("lb_backend_bytes_total", &[("service", &svc.name), ("backend", &b.backend)], p);
        }
    }
    m.family("lb_backend_up", "gauge", "1 when the backend passes its health check (or is not checked).");
    for (svc, b) in backends() {
        let up = u8::from(b.health != "down");
        m.sample("lb_backend_up", &[("service", &svc.name), ("backend", &b.backend), ("role", b.role)], up);
    }
    m.family("lb_backend_weight", "gauge", "Weight in the service's Maglev table now (0: no new flows).");
    for (svc, b) in backends() {
        if let Some(w) = b.table_weight {
            m.sample("lb_backend_weight", &[("service", &svc.name), ("backend", &b.backend)], w);
        }
    }
    http_service_metrics(&mut m, s);
    http_metrics(&mut m, s);
    proxy_metrics(&mut m, s);
    tls_metrics(&mut m, s);
    rate_metrics(&mut m, s);
    edge_thread_metrics(&mut m, s);
    cache_metrics(&mut m, s);
    m.family("lb_health_checks_total", "counter", "Health check probes by result.");
    for (svc, b) in backends().filter(|(_, b)| b.health != "unchecked") {
        let l = [("service", svc.name.as_str()), ("backend", b.backend.as_str()), ("result", "success")];
        m.sample("lb_health_checks_total", &l, b.checks - b.check_failures);
        let l = [("service", svc.name.as_str()), ("backend", b.backend.as_str()), ("result", "failure")];
        m.sample("lb_health_checks_total", &l, b.check_failures);
    }
    m.family("lb_health_check_latency_seconds", "gauge", "Duration of the last successful health check.");
    for (svc, b) in backends() {
        if let Some(d) = b.last_check_latency {
            let l = [("service", svc.name.as_str()), ("backend", b.backend.as_str())];
            m.sample("lb_health_check_latency_seconds", &l, d.as_secs_f64());
        }
    }
    m.family(
        "lb_datapath_events_total",
        "counter",
        "XDP data plane counters (conntrack misses, drops, passes).",
    );
    for (name, v) in &s.counters {
        m.sample("lb_datapath_events_total", &[("event", name)], v);
    }
    m.0
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            generation: 3,
            config_file: "/etc/lb/services.yaml".into(),
            files: vec!["/etc/lb/services.yaml".into()],
            iface: "eth0".into(),
            node: Some("node1".into()),
            uptime: Duration::from_secs(5),
            reloads_ok: 2,
            reloads_failed: 1,
            last_reload: Some(ReloadRecord {
                at: SystemTime::UNIX_EPOCH,
                error: Some("invalid".into()),
                problems: vec![Problem {
                    file: PathBuf::from("/etc/lb/services.yaml"),
                    line: 7,
                    column: 9,
                    field: "tcp.a.backends[0].prot".into(),
                    message: "unknown field `prot`, expected one of \"host\"".into(),
                    hint: None,
                }],
            }),
            services: vec![
                ServiceReport {
                    name: "web".into(),
                    kind: "tcp",
                    vip: Some("10.0.0.1".parse().unwrap()),
                    port: Some(80),
                    protocols: vec!["tcp"],
                    mode: Some("nat"),
                    serving: Some("primaries"),
                    when_all_down: "fail-open",
                    packets: 10,
                    bytes: 1000,
                    http: None,
                    backends: vec![BackendReport {
                        backend: "10.0.0.11:80".into(),
                        role: "primary",
                        node: None,
                        weight: 1,
                        table_weight: Some(0),
                        reason: Some("health check failing: refused".into()),
                        health: "down",
                        drained: false,
                        checks: 5,
                        check_failures: 3,
                        last_check_latency: Some(Duration::from_millis(2)),
                        last_error: Some("refused".into()),
                        packets: Some(10),
                        bytes: Some(1000),
                        next_hop_mac: Some([2, 0, 10, 10, 0, 11]),
                        http: None,
                    }],
                },
                ServiceReport {
                    name: "api.example.org".into(),
                    kind: "http",
                    vip: None,
                    port: None,
                    protocols: vec!["http"],
                    mode: None,
                    serving: None,
                    when_all_down: "fail-closed",
                    packets: 0,
                    bytes: 0,
                    // Three answers: two 2xx within 5 ms and 10 ms, a 5xx after 3 s.
                    http: Some(HttpTraffic {
                        classes: [0, 2, 0, 0, 1],
                        buckets: [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
                        sum: Duration::from_millis(3012),
                        cache: Some([40, 2, 98]),
                    }),
                    backends: Vec::new(),
                },
            ],
            counters: vec![("ct_miss_established", 4)],
            certificates: vec![CertReport {
                listener: 443,
                name: "example.org".into(),
                names: vec!["example.org".into(), "*.example.org".into()],
                file: "/etc/lb/example.pem".into(),
                not_after: unix_now() + 86_400,
            }],
            tls_handshake_failures: 2,
            rate_limited: RateLimited { global: 0, per_ip: 7, route: 1, acl: 3 },
            cache: CacheReport { bytes: 5000, entries: 3, memory: 1 << 20, stored: 4, evicted: 1 },
            edge_connections: vec![3, 2],
        }
    }

    #[test]
    fn metrics_show_the_reload_error_with_its_line_and_escape_labels() {
        let text = metrics(&snapshot());
        assert!(text.contains("lb_config_last_reload_success 0\n"), "{text}");
        assert!(
            text.contains(r#"lb_config_error_info{file="/etc/lb/services.yaml",line="7",column="9",field="tcp.a.backends[0].prot",message="unknown field `prot`, expected one of \"host\""} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"lb_backend_up{service="web",backend="10.0.0.11:80",role="primary"} 0"#));
        assert!(
            text.contains(
                r#"lb_health_checks_total{service="web",backend="10.0.0.11:80",result="failure"} 3"#
            )
        );
        assert!(text.contains(r#"lb_datapath_events_total{event="ct_miss_established"} 4"#));
        let expiry = text
            .lines()
            .find_map(|l| {
                l.strip_prefix(r#"lb_tls_certificate_expiry_seconds{listener="443",name="example.org"} "#)
            })
            .expect("the certificate's expiry");
        let left: i64 = expiry.parse().unwrap();
        assert!((86_000..=86_400).contains(&left), "{left}");
        assert!(text.contains("lb_tls_handshake_failures_total 2\n"), "{text}");
        assert!(text.contains("lb_http_rate_limited_total{limit=\"per_ip\"} 7\n"), "{text}");
        assert!(text.contains("lb_edge_connections{thread=\"1\"} 2\n"), "{text}");
        assert!(text.contains("lb_http_acl_denied_total 3\n"), "{text}");
        let api = "service=\"api.example.org\"";
        for line in [
            format!("lb_http_responses_total{{{api},code=\"5xx\"}} 1\n"),
            format!("lb_http_responses_total{{{api},code=\"2xx\"}} 2\n"),
            format!("lb_http_request_duration_seconds_bucket{{{api},le=\"0.01\"}} 2\n"),
            format!("lb_http_request_duration_seconds_bucket{{{api},le=\"2.5\"}} 2\n"),
            format!("lb_http_request_duration_seconds_bucket{{{api},le=\"5\"}} 3\n"),
            format!("lb_http_request_duration_seconds_bucket{{{api},le=\"+Inf\"}} 3\n"),
            format!("lb_http_request_duration_seconds_sum{{{api}}} 3.012\n"),
            format!("lb_http_request_duration_seconds_count{{{api}}} 3\n"),
            format!("lb_http_cache_requests_total{{{api},result=\"coalesced\"}} 98\n"),
            "lb_http_cache_bytes 5000\n".to_owned(),
            "lb_http_cache_evictions_total 1\n".to_owned(),
        ] {
            assert!(text.contains(&line), "{line} in {text}");
        }
        // Every sample belongs to a family declared before it (a histogram's by its suffixes).
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| declared.contains(*f)))
                    .unwrap_or(name);
                assert!(declared.contains(family), "{line}");
            }
        }
    }

    #[test]
    fn status_carries_generation_health_and_the_error() {
        let v = status(&snapshot());
        assert_eq!(v["generation"], 3);
        assert_eq!(v["last_reload"]["ok"], false);
        assert_eq!(v["last_reload"]["problems"][0]["line"], 7);
        assert_eq!(v["services"][0]["backends"][0]["health"], "down");
        assert_eq!(v["services"][0]["backends"][0]["next_hop_mac"], "02:00:0a:0a:00:0b");
        assert_eq!(v["counters"]["ct_miss_established"], 4);
    }

    #[test]
    fn lookup_queries_parse_and_refuse_bad_values() {
        let q = LookupQuery::parse("src=10.0.0.5&sport=4000&dst=10.20.100.1&dport=80").unwrap();
        assert_eq!((q.sport, q.dport, q.proto.as_str()), (4000, 80, "tcp"));
        let q = LookupQuery::parse("src=fd00%3A%3A5&sport=1&dst=fd20::1&dport=80&proto=udp").unwrap();
        assert_eq!(q.src, "fd00::5".parse::<IpAddr>().unwrap());
        assert!(LookupQuery::parse("src=x&sport=1&dst=10.0.0.1&dport=80").unwrap_err().contains("src"));
        assert_eq!(LookupQuery::parse("src=10.0.0.1&sport=1&dport=80").unwrap_err(), "missing dst");
        assert_eq!(percent_decode("a%2Fb+c%"), "a/b c%");
    }
}
