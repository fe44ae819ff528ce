//! Semantic checks on a parsed registry: what types alone cannot say.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use lb_common::maps::{MAX_BACKENDS, MAX_DENY, MAX_VIPS};

use super::{
    edge::{Balance, HashKey, Listener},
    schema::{
        BackendSpec, Datapath, HealthCheck, HttpService, L4Service, MAX_WEIGHT, Mode, Protocol,
        REGISTRY_VERSION, Registry,
    },
    spans::FieldPath,
};
use crate::maglev::{MAX_TABLE_SIZE, is_prime};

/// Longest DNS name and label (RFC 1035).
const MAX_DNS_NAME: usize = 253;
const MAX_DNS_LABEL: usize = 63;
/// NAT source ports below this would collide with well-known service ports.
const MIN_NAT_PORT: u16 = 1024;
/// The smallest read buffer hyper accepts.
const MIN_HEADER_BYTES: usize = 8192;
/// Most attempts one request may make.
const MAX_TRIES: u32 = 10;

/// One semantic problem, located by its field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: FieldPath,
    pub message: String,
    pub hint: Option<String>,
}

fn finding(path: FieldPath, message: impl Into<String>, hint: Option<&str>) -> Finding {
    Finding { path, message: message.into(), hint: hint.map(str::to_owned) }
}

/// Every semantic problem in `reg`, in file order of sections.
#[must_use]
pub fn validate(reg: &Registry) -> Vec<Finding> {
    let mut out = Vec::new();
    let root = FieldPath::default();
    if reg.version != REGISTRY_VERSION {
        out.push(finding(
            root.key("version"),
            format!("unsupported registry version {}", reg.version),
            Some("this lbd reads `version: 1`"),
        ));
    }
    datapath(&root.key("datapath"), &reg.datapath, &mut out);
    listeners(&root.key("listeners"), &reg.listeners, &mut out);
    rate_limits(&root.key("rate_limit"), &reg.rate_limit, &mut out);
    acl(&root.key("acl"), &reg.acl, &mut out);
    if reg.edge_cache.max_object_bytes > reg.edge_cache.memory_bytes {
        out.push(finding(
            root.key("edge_cache").key("max_object_bytes"),
            format!(
                "{} is more than the whole cache's memory_bytes ({})",
                reg.edge_cache.max_object_bytes, reg.edge_cache.memory_bytes
            ),
            None,
        ));
    }
    let ports: HashSet<u16> = reg.listeners.iter().map(|l| l.port).collect();
    // (listener port, host pattern, path, priority) -> service: two services must
    // not claim the same requests with nothing to choose between them.
    let mut routes: HashMap<(u16, String, String, Option<i32>), &str> = HashMap::new();
    for (name, svc) in &reg.http {
        let path = root.key("http").key(name);
        http_service(&path, name, svc, &ports, &mut out);
        let hosts: Vec<String> = match (&svc.host_regex, svc.hosts.is_empty()) {
            (Some(re), _) => vec![format!("~{re}")],
            (None, true) => vec![name.to_ascii_lowercase()],
            (None, false) => svc.hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        };
        let paths = if svc.paths.is_empty() { vec!["/".to_owned()] } else { svc.paths.clone() };
        let on: Vec<u16> =
            if svc.listeners.is_empty() { ports.iter().copied().collect() } else { svc.listeners.clone() };
        for port in &on {
            for host in &hosts {
                for p in &paths {
                    let key = (*port, host.clone(), p.clone(), svc.priority);
                    if let Some(other) = routes.insert(key, name) {
                        out.push(finding(
                            path.clone(),
                            format!("host `{host}` path `{p}` is also routed to service `{other}`"),
                            Some("give one of them other paths, or a `priority`"),
                        ));
                    }
                }
            }
        }
    }
    proxy_sockets(&root, reg, &mut out);
    let mut vips: HashMap<(IpAddr, u16, u8), &str> = HashMap::new();
    for (name, svc) in &reg.tcp {
        let path = root.key("tcp").key(name);
        l4_service(&path, svc, &mut out);
        let Some(vip) = svc.vip else { continue };
        for p in &svc.protocols {
            if let Some(other) = vips.insert((vip, svc.port, p.number()), name) {
                out.push(finding(
                    path.key("vip"),
                    format!("{vip}:{}/{} is already used by service `{other}`", svc.port, p.as_str()),
                    Some("each VIP, port and protocol belongs to one service"),
                ));
            }
        }
    }
    let ranges: usize = reg.tcp.values().map(|s| s.deny.len() * s.protocols.len()).sum();
    // Half the trie: a reload writes the new ranges before it removes the old ones.
    if ranges > (MAX_DENY / 2) as usize {
        out.push(finding(
            root.key("tcp"),
            format!(
                "{ranges} deny ranges (one per VIP entry); the data plane holds at most {}",
                MAX_DENY / 2
            ),
            None,
        ));
    }
    if vips.len() > MAX_VIPS as usize {
        out.push(finding(
            root.key("tcp"),
            format!("{} VIP entries; the data plane holds at most {MAX_VIPS}", vips.len()),
            None,
        ));
    }
    let distinct: HashSet<(&str, u16)> = (reg.tcp.values().filter(|s| s.vip.is_some()))
        .flat_map(|s| s.backends.iter().map(|b| (b.host.as_str(), b.port)))
        .collect();
    if distinct.len() > MAX_BACKENDS as usize {
        out.push(finding(
            root.key("tcp"),
            format!("{} distinct backends; the data plane holds at most {MAX_BACKENDS}", distinct.len()),
            None,
        ));
    }
    out
}

/// Sockets lbd binds itself: HTTP listeners, then proxied services. Two on one port and
/// protocol, at one address or the wildcard, could not both bind.
fn proxy_sockets(root: &FieldPath, reg: &Registry, out: &mut Vec<Finding>) {
    let mut sockets: Vec<(IpAddr, u16, Protocol, String)> = reg
        .listeners
        .iter()
        .map(|l| (l.address, l.port, Protocol::Tcp, "an HTTP listener".to_owned()))
        .collect();
    for (name, svc) in reg.tcp.iter().filter(|(_, s)| s.mode == Mode::Proxy) {
        let path = root.key("tcp").key(name);
        let addr = svc.proxy.listen;
        for &p in &svc.protocols {
            let clash = sockets.iter().find(|(a, port, proto, _)| {
                *port == svc.port
                    && *proto == p
                    && (*a == addr || a.is_unspecified() || addr.is_unspecified())
            });
            if let Some((a, _, _, what)) = clash {
                out.push(finding(
                    path.key("port"),
                    format!("{addr}:{}/{} is also bound as {what} ({a})", svc.port, p.as_str()),
                    Some("one socket per port and protocol; give the proxy another port or `proxy.listen` address"),
                ));
            }
            sockets.push((addr, svc.port, p, format!("service `{name}`")));
        }
    }
}

fn listeners(path: &FieldPath, list: &[Listener], out: &mut Vec<Finding>) {
    let mut seen = HashSet::new();
    for (i, l) in list.iter().enumerate() {
        let p = path.index(i);
        if l.port == 0 {
            out.push(finding(p.key("port"), "port 0 is not a listener port", None));
        }
        if !seen.insert((l.address, l.port)) {
            out.push(finding(p.clone(), format!("{}:{} is listed twice", l.address, l.port), None));
        }
        let lim = p.key("limits");
        // hyper's smallest read buffer; smaller limits would refuse ordinary requests.
        if l.limits.max_header_bytes < MIN_HEADER_BYTES {
            out.push(finding(
                lim.key("max_header_bytes"),
                format!("{} bytes is below the least allowed, {MIN_HEADER_BYTES}", l.limits.max_header_bytes),
                Some("browsers send heads of a few KiB; the default is 65536"),
            ));
        }
        for (field, d) in [
            ("header_timeout", l.limits.header_timeout),
            ("idle_timeout", l.limits.idle_timeout),
            ("send_timeout", l.limits.send_timeout),
            ("tunnel_timeout", l.limits.tunnel_timeout),
        ] {
            if d.is_zero() {
                out.push(finding(lim.key(field), "must be longer than 0", None));
            }
        }
        if l.limits.max_connections_per_ip == 0 {
            out.push(finding(lim.key("max_connections_per_ip"), "0 would refuse every client", None));
        }
        if let Some(tls) = &l.tls {
            tls_settings(&p.key("tls"), tls, out);
            if l.passthrough {
                out.push(finding(
                    p.key("passthrough"),
                    "a passthrough listener does not terminate TLS: remove `tls` or `passthrough`",
                    None,
                ));
            }
        }
        if l.h2c && (l.tls.is_some() || l.passthrough) {
            out.push(finding(
                p.key("h2c"),
                "h2c is HTTP/2 without TLS, for plain HTTP listeners",
                Some("over TLS, HTTP/2 is offered by ALPN (`tls.alpn`)"),
            ));
        }
    }
}

fn tls_settings(p: &FieldPath, tls: &crate::config::Tls, out: &mut Vec<Finding>) {
    if tls.certificates.is_empty() {
        out.push(finding(p.key("certificates"), "a TLS listener needs at least one certificate", None));
    }
    if tls.protocols.is_empty() {
        out.push(finding(p.key("protocols"), "no protocol left to speak", Some("TLSv1.2 and/or TLSv1.3")));
    }
    if let Err(e) = crate::tls::provider(&tls.ciphers) {
        out.push(finding(p.key("ciphers"), e.to_string(), None));
    }
    if tls.protocols == [crate::config::TlsVersion::Tls12]
        && !tls.ciphers.is_empty()
        && crate::tls::provider(&tls.ciphers)
            .is_ok_and(|pr| pr.cipher_suites.iter().all(|s| s.version() == &rustls::version::TLS13))
    {
        out.push(finding(p.key("ciphers"), "only TLS 1.3 suites, but only TLS 1.2 is on", None));
    }
    for (i, proto) in tls.alpn.iter().enumerate() {
        if !matches!(proto.as_str(), "h2" | "http/1.1") {
            out.push(finding(
                p.key("alpn").index(i),
                format!("`{proto}` is not a protocol the edge speaks"),
                Some("h2 or http/1.1"),
            ));
        }
    }
    let mut names = HashSet::new();
    for (i, c) in tls.certificates.iter().enumerate() {
        if let Some(n) = &c.name
            && !names.insert(n)
        {
            out.push(finding(
                p.key("certificates").index(i).key("name"),
                format!("`{n}` names two certificates"),
                None,
            ));
        }
    }
}

fn rate_limits(p: &FieldPath, r: &crate::config::RateLimits, out: &mut Vec<Finding>) {
    for (name, rate) in [("global", &r.global), ("per_ip", &r.per_ip)] {
        if let Some(rate) = rate {
            rate_setting(&p.key(name), *rate, out);
        }
    }
    cidrs(&p.key("whitelist"), &r.whitelist, out);
}

fn acl(p: &FieldPath, acl: &crate::config::Acl, out: &mut Vec<Finding>) {
    cidrs(&p.key("allow"), &acl.allow, out);
    cidrs(&p.key("deny"), &acl.deny, out);
    for (i, rule) in acl.rules.iter().enumerate() {
        let p = p.key("rules").index(i);
        if !rule.path.starts_with('/') {
            out.push(finding(
                p.key("path"),
                format!("`{}` does not start with /", rule.path),
                Some("/admin/*"),
            ));
        }
        if rule.allow.is_empty() && rule.deny.is_empty() {
            out.push(finding(p.clone(), "a rule needs `allow` or `deny`", None));
        }
        cidrs(&p.key("allow"), &rule.allow, out);
        cidrs(&p.key("deny"), &rule.deny, out);
    }
}

/// Addresses or CIDR ranges.
pub(super) fn cidrs(p: &FieldPath, list: &[String], out: &mut Vec<Finding>) {
    for (i, c) in list.iter().enumerate() {
        if let Err(e) = crate::cidr::Cidr::parse(c) {
            out.push(finding(p.index(i), e, Some("an address or a CIDR range: 10.0.0.0/8")));
        }
    }
}

fn rate_setting(p: &FieldPath, r: crate::config::Rate, out: &mut Vec<Finding>) {
    if r.rate == 0 {
        out.push(finding(
            p.key("rate"),
            "a rate of 0 would refuse everything",
            Some("leave the limit out instead"),
        ));
    }
}

fn breaker(p: &FieldPath, b: &crate::config::CircuitBreaker, out: &mut Vec<Finding>) {
    if b.error_rate > 100 {
        out.push(finding(p.key("error_rate"), "a percentage is at most 100", None));
    }
    if b.error_rate > 0 && b.window.is_zero() {
        out.push(finding(p.key("window"), "must be longer than 0 for error_rate", None));
    }
    if b.open_for.is_zero() {
        out.push(finding(
            p.key("open_for"),
            "must be longer than 0",
            Some("leave circuit_breaker out instead"),
        ));
    }
    if b.half_open_requests == 0 {
        out.push(finding(p.key("half_open_requests"), "at least 1 trial is needed to close it again", None));
    }
    if b.consecutive_errors == 0 && b.error_rate == 0 && b.slow.is_zero() {
        out.push(finding(p.clone(), "every trigger is off", Some("leave circuit_breaker out instead")));
    }
}

fn upstream(p: &FieldPath, up: &crate::config::Upstream, out: &mut Vec<Finding>) {
    if up.proxy_protocol && up.protocol == crate::config::UpstreamProtocol::Http2 {
        out.push(finding(
            p.key("proxy_protocol"),
            "the PROXY protocol makes one connection per client, which HTTP/2 to backends would share",
            Some("use protocol: http1 with proxy_protocol"),
        ));
    }
    if let Some(tls) = &up.tls {
        match (&tls.cert, &tls.key) {
            (Some(_), None) => {
                out.push(finding(p.key("tls").key("key"), "a client `cert` needs its `key`", None));
            }
            (None, Some(_)) => {
                out.push(finding(p.key("tls").key("cert"), "a `key` needs its client `cert`", None));
            }
            _ => {}
        }
        if let Some(n) = &tls.server_name
            && rustls::pki_types::ServerName::try_from(n.as_str()).is_err()
        {
            out.push(finding(
                p.key("tls").key("server_name"),
                format!("`{n}` is not a DNS name or address"),
                None,
            ));
        }
    }
}

#[expect(clippy::too_many_lines, reason = "one service's rules, checked in the order they are written")]
fn http_service(
    path: &FieldPath,
    name: &str,
    svc: &HttpService,
    ports: &HashSet<u16>,
    out: &mut Vec<Finding>,
) {
    if svc.host_regex.is_some() && !svc.hosts.is_empty() {
        out.push(finding(path.key("host_regex"), "set either `hosts` or `host_regex`, not both", None));
    }
    if let Some(re) = &svc.host_regex
        && let Err(e) = regex::Regex::new(re)
    {
        out.push(finding(path.key("host_regex"), format!("not a regular expression: {e}"), None));
    }
    if svc.hosts.is_empty()
        && svc.host_regex.is_none()
        && let Some(problem) = host_pattern_problem(name)
    {
        out.push(finding(
            path.clone(),
            problem,
            Some("the key is the host this service answers, unless `hosts` lists them"),
        ));
    }
    for (i, h) in svc.hosts.iter().enumerate() {
        if let Some(problem) = host_pattern_problem(h) {
            out.push(finding(
                path.key("hosts").index(i),
                problem,
                Some("write a host name, `*.example.org`, or `*`"),
            ));
        }
    }
    for (i, p) in svc.paths.iter().enumerate() {
        if !p.starts_with('/') || p.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            out.push(finding(
                path.key("paths").index(i),
                format!("`{p}` is not a path prefix"),
                Some("path prefixes start with `/`, e.g. /api/users"),
            ));
        }
    }
    for (i, port) in svc.listeners.iter().enumerate() {
        if !ports.contains(port) {
            out.push(finding(
                path.key("listeners").index(i),
                format!("no listener on port {port}"),
                Some("declare it under the top-level `listeners:`"),
            ));
        }
    }
    match &svc.redirect {
        Some(r) if !r.https && !r.strip_www => out.push(finding(
            path.key("redirect"),
            "a redirect needs `https: true` or `strip_www: true`",
            None,
        )),
        Some(_) if svc.backends.is_empty() => {}
        _ => backends(&path.key("backends"), &svc.backends, out),
    }
    if !svc.backends.is_empty() || !svc.fallback.is_empty() {
        fallback(path, &svc.backends, &svc.fallback, out);
    }
    health(&path.key("health"), &svc.health, true, out);
    upstream(&path.key("upstream"), &svc.upstream, out);
    if let Some(r) = svc.rate_limit {
        rate_setting(&path.key("rate_limit"), r, out);
    }
    if let Some(b) = &svc.circuit_breaker {
        breaker(&path.key("circuit_breaker"), b, out);
    }
    if svc.cache.is_some_and(|c| c.ttl < std::time::Duration::from_secs(1)) {
        out.push(finding(path.key("cache"), "keeps answers under a second", Some("leave cache out instead")));
    }
    if svc.cache.is_some_and(|c| c.ttl > std::time::Duration::from_hours(24 * 365)) {
        out.push(finding(path.key("cache"), "keeps answers over a year", None));
    }
    match &svc.balance {
        Balance::Hash(HashKey::Header(h)) if http::HeaderName::from_bytes(h.as_bytes()).is_err() => {
            out.push(finding(
                path.key("balance").key("hash").key("header"),
                format!("`{h}` is not a header name"),
                None,
            ));
        }
        Balance::Hash(HashKey::Cookie(c))
            if c.is_empty() || c.bytes().any(|b| b <= b' ' || b"=;,".contains(&b)) =>
        {
            out.push(finding(
                path.key("balance").key("hash").key("cookie"),
                format!("`{c}` is not a cookie name"),
                None,
            ));
        }
        _ => {}
    }
    let retry = path.key("retry");
    if !(1..=MAX_TRIES).contains(&svc.retry.tries) {
        out.push(finding(
            retry.key("tries"),
            format!("{} tries; allowed: 1 (no retry) to {MAX_TRIES}", svc.retry.tries),
            None,
        ));
    }
    for (i, st) in svc.retry.statuses.iter().enumerate() {
        if !(400..=599).contains(st) {
            out.push(finding(retry.key("statuses").index(i), format!("{st} is not an error status"), None));
        }
    }
    if svc.passive.failures > 0 && svc.passive.window.is_zero() {
        out.push(finding(path.key("passive").key("window"), "must be longer than 0", None));
    }
    for (field, d) in [("connect", svc.timeouts.connect), ("response", svc.timeouts.response)] {
        if d.is_zero() {
            out.push(finding(path.key("timeouts").key(field), "must be longer than 0", None));
        }
    }
}

/// Why `h` is not a host pattern (`name`, `*.name`, or `*`), if it is not.
fn host_pattern_problem(h: &str) -> Option<String> {
    if h == "*" {
        return None;
    }
    let name = h.strip_prefix("*.").unwrap_or(h);
    if name.contains('*') {
        return Some(format!(
            "`{h}`: a wildcard is allowed only as the whole first label, as in *.example.org"
        ));
    }
    if name.contains(':') && name.parse::<IpAddr>().is_err() {
        return Some(format!("`{h}` has a port; hosts are matched without it"));
    }
    host_problem(name)
}

fn l4_service(path: &FieldPath, svc: &L4Service, out: &mut Vec<Finding>) {
    if svc.port == 0 {
        out.push(finding(path.key("port"), "port 0 is not a service port", None));
    }
    backends(&path.key("backends"), &svc.backends, out);
    fallback(path, &svc.backends, &svc.fallback, out);
    health(&path.key("health"), &svc.health, svc.protocols.contains(&Protocol::Tcp), out);
    let mut protos = HashSet::new();
    for (i, p) in svc.protocols.iter().enumerate() {
        if !protos.insert(*p) {
            out.push(finding(
                path.key("protocols").index(i),
                format!("`{}` is listed twice", p.as_str()),
                None,
            ));
        }
    }
    if svc.protocols.is_empty() {
        out.push(finding(
            path.key("protocols"),
            "no protocol listed",
            Some("use [tcp], [udp] or [tcp, udp]"),
        ));
    }
    cidrs(&path.key("deny"), &svc.deny, out);
    if !svc.deny.is_empty() && svc.vip.is_none() {
        out.push(finding(
            path.key("deny"),
            "a deny list is enforced in XDP, for a service with a `vip`",
            None,
        ));
    }
    if svc.mode == Mode::Proxy {
        if svc.vip.is_some() {
            out.push(finding(
                path.key("vip"),
                "a VIP is balanced in XDP; mode proxy listens on `proxy.listen`",
                Some("leave vip out and set `proxy: {listen: ADDRESS}` (a VIP this node holds, say)"),
            ));
        }
        if svc.proxy.listen.is_unspecified() && svc.protocols.contains(&Protocol::Udp) {
            out.push(finding(
                path.key("proxy").key("listen"),
                "UDP needs the address clients send to: answers from a wildcard socket leave from whichever address the kernel picks, which clients drop",
                Some("set `proxy: {listen: ADDRESS}`"),
            ));
        }
        if svc.proxy.max_udp_flows == 0 && svc.protocols.contains(&Protocol::Udp) {
            out.push(finding(path.key("proxy").key("max_udp_flows"), "no UDP flow could be relayed", None));
        }
        return;
    }
    let Some(vip) = svc.vip else { return };
    for (i, c) in svc.deny.iter().enumerate() {
        if crate::cidr::Cidr::parse(c).is_ok_and(|c| c.is_ipv4() != vip.is_ipv4()) {
            out.push(finding(
                path.key("deny").index(i),
                format!("`{c}` is of another address family than the VIP {vip}: it would never match"),
                None,
            ));
        }
    }
    if let Some(problem) = vip_problem(vip) {
        out.push(finding(path.key("vip"), problem, Some("a VIP is a unicast address routed to this node")));
    }
    let all = (svc.backends.iter().enumerate().map(|(i, b)| (path.key("backends").index(i), b)))
        .chain(svc.fallback.iter().enumerate().map(|(i, b)| (path.key("fallback").index(i), b)));
    for (bpath, b) in all {
        if svc.mode.keeps_ports() && b.port != svc.port {
            let hint = format!(
                "{} forwards packets with their ports unchanged, so backends must listen on the service port; mode nat translates ports",
                svc.mode.as_str()
            );
            out.push(finding(
                bpath.key("port"),
                format!("backend port {} differs from service port {}", b.port, svc.port),
                Some(&hint),
            ));
        }
        let literal = b.host.parse::<IpAddr>().ok();
        if svc.mode == Mode::Nat && literal.is_some_and(|ip| ip.is_ipv4() != vip.is_ipv4()) {
            out.push(finding(
                bpath.key("host"),
                "a nat backend must have the VIP's address family",
                Some(
                    "lb does not translate between IPv4 and IPv6; dsr-ipip tunnels either family over either",
                ),
            ));
        }
    }
}

/// Fallback backends: well-formed, and none also a primary.
fn fallback(path: &FieldPath, primary: &[BackendSpec], list: &[BackendSpec], out: &mut Vec<Finding>) {
    if list.is_empty() {
        return;
    }
    backends(&path.key("fallback"), list, out);
    for (i, b) in list.iter().enumerate() {
        if primary.iter().any(|p| p.host == b.host && p.port == b.port) {
            out.push(finding(
                path.key("fallback").index(i),
                format!("backend {}:{} is both a primary and a fallback", b.host, b.port),
                Some("a fallback takes traffic only while every primary is down; list it once"),
            ));
        }
    }
}

/// Health check bounds. Services without TCP are not checked (probes run over TCP).
fn health(path: &FieldPath, h: &HealthCheck, tcp: bool, out: &mut Vec<Finding>) {
    if !h.enabled || !tcp {
        return;
    }
    if h.interval < std::time::Duration::from_millis(100) {
        out.push(finding(path.key("interval"), "the interval must be at least 100ms", None));
    }
    if h.timeout.is_zero() || h.timeout > h.interval {
        out.push(finding(
            path.key("timeout"),
            format!("timeout {:?} must be above 0 and at most the interval {:?}", h.timeout, h.interval),
            Some("a probe must end before the next one starts"),
        ));
    }
    for (field, n) in [("fall", h.fall), ("rise", h.rise)] {
        if n == 0 || n > 100 {
            out.push(finding(path.key(field), format!("{field} {n} is not between 1 and 100"), None));
        }
    }
    if h.port == Some(0) {
        out.push(finding(path.key("port"), "port 0 can not be probed", None));
    }
    if h.http.is_some() && (h.send.is_some() || h.expect.is_some()) {
        out.push(finding(
            path.key("http"),
            "an HTTP check can not also have `send`/`expect`",
            Some("pick one kind of check per service"),
        ));
    }
    if let Some(http) = &h.http {
        if !http.path.starts_with('/')
            || http.path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            out.push(finding(
                path.key("http").key("path"),
                format!("`{}` is not a request path", http.path),
                Some("write an absolute path such as /health"),
            ));
        }
        if !(100..=599).contains(&http.status) {
            out.push(finding(
                path.key("http").key("status"),
                format!("{} is not an HTTP status", http.status),
                None,
            ));
        }
    }
    if h.send.as_deref() == Some("") {
        out.push(finding(path.key("send"), "nothing to send", Some("remove `send` for a connect check")));
    }
}

fn datapath(path: &FieldPath, d: &Datapath, out: &mut Vec<Finding>) {
    let m = d.maglev_table_size;
    if !is_prime(m) || m > MAX_TABLE_SIZE {
        out.push(finding(
            path.key("maglev_table_size"),
            format!("{m} is not a prime of at most {MAX_TABLE_SIZE}"),
            Some("primes that work well: 65537 (the default), 131071, 262139, 524287"),
        ));
    }
    if d.nat_ports.min > d.nat_ports.max || d.nat_ports.min < MIN_NAT_PORT {
        out.push(finding(
            path.key("nat_ports"),
            format!("{} is not a range of ports from {MIN_NAT_PORT} up", d.nat_ports),
            Some("write min-max with min <= max, e.g. 61000-65535"),
        ));
    }
    for (field, t) in [
        ("udp_timeout", d.udp_timeout),
        ("tcp_timeout", d.tcp_timeout),
        ("tcp_syn_timeout", d.tcp_syn_timeout),
        ("tcp_closing_timeout", d.tcp_closing_timeout),
    ] {
        if t.as_secs() == 0 || u32::try_from(t.as_secs()).is_err() {
            out.push(finding(
                path.key(field),
                format!("{t:?} is out of range"),
                Some("timeouts are whole seconds, at least 1s"),
            ));
        }
    }
}

fn vip_problem(vip: IpAddr) -> Option<&'static str> {
    if vip.is_unspecified() {
        Some("the unspecified address can not be a VIP")
    } else if vip.is_multicast() || matches!(vip, IpAddr::V4(v4) if v4.is_broadcast()) {
        Some("a VIP must be a unicast address")
    } else if vip.is_loopback() {
        Some("a loopback address can not be a VIP")
    } else {
        None
    }
}

fn backends(path: &FieldPath, list: &[BackendSpec], out: &mut Vec<Finding>) {
    if list.is_empty() {
        out.push(finding(
            path.clone(),
            "no backends listed",
            Some("list at least one `- host: ..., port: ...`"),
        ));
    }
    let mut seen = HashSet::new();
    for (i, b) in list.iter().enumerate() {
        let p = path.index(i);
        if let Some(problem) = host_problem(&b.host) {
            out.push(finding(
                p.key("host"),
                problem,
                Some("use an IP address or a DNS name such as node1.example.org"),
            ));
        }
        if b.port == 0 {
            out.push(finding(p.key("port"), "port 0 is not a backend port", None));
        }
        if b.weight > MAX_WEIGHT {
            out.push(finding(
                p.key("weight"),
                format!("weight {} is above {MAX_WEIGHT}", b.weight),
                Some("weights are relative: 1 and 3 give a quarter and three quarters of new flows"),
            ));
        }
        if !seen.insert((&b.host, b.port)) {
            out.push(finding(p, format!("backend {}:{} is listed twice", b.host, b.port), None));
        }
    }
}

/// Why `host` is neither an IP address nor a DNS name, if it is not.
fn host_problem(host: &str) -> Option<String> {
    if host.parse::<IpAddr>().is_ok() {
        return None;
    }
    if host.is_empty() {
        return Some("empty host".to_owned());
    }
    if host.len() > MAX_DNS_NAME {
        return Some(format!("host name longer than {MAX_DNS_NAME} characters"));
    }
    let numeric = host.split('.').all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()));
    if numeric {
        return Some(format!("`{host}` is not a valid IP address"));
    }
    for label in host.trim_end_matches('.').split('.') {
        let valid = !label.is_empty()
            && label.len() <= MAX_DNS_LABEL
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Some(format!("`{host}` is not a valid IP address or DNS name"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::host_problem;

    #[test]
    fn host_patterns_are_names_one_leading_wildcard_or_any() {
        for ok in ["example.org", "*.example.org", "*", "10.0.0.1"] {
            assert_eq!(super::host_pattern_problem(ok), None, "{ok}");
        }
        for bad in ["a.*.org", "*example.org", "**.org", "example.org:80", "bad host"] {
            assert!(super::host_pattern_problem(bad).is_some(), "{bad}");
        }
    }

    #[test]
    fn hosts_are_ip_addresses_or_dns_names() {
        for ok in ["10.0.0.1", "::1", "node1.bolabaden.org", "backend-1", "a.b.c."] {
            assert_eq!(host_problem(ok), None, "{ok}");
        }
        for bad in ["", "10.0.0.300", "1.2.3", "-x.org", "a..b", "bad host", "x_y.-z"] {
            assert!(host_problem(bad).is_some(), "{bad}");
        }
    }
}
