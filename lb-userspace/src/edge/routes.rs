//! Which service answers a request: host rules (exact, `*.suffix`, regular expression, `*`)
//! and path prefixes, tried by priority. Pure: built from the registry, unit-tested.

use std::{cmp::Reverse, collections::BTreeMap};

use http::HeaderValue;

use crate::config::{HttpService, Registry};

/// How a route matches the request's host (lowercase, without port).
#[derive(Debug, Clone)]
pub enum HostRule {
    Exact(String),
    /// `*.example.org`: stored as `.example.org`; matches names with at least one more label.
    Suffix(String),
    Regex(regex::Regex),
    Any,
}

impl HostRule {
    fn parse(pattern: &str) -> Self {
        let p = pattern.to_ascii_lowercase();
        if p == "*" {
            Self::Any
        } else if let Some(rest) = p.strip_prefix('*') {
            Self::Suffix(rest.to_owned())
        } else {
            Self::Exact(p.trim_end_matches('.').to_owned())
        }
    }

    #[must_use]
    pub fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(h) => h == host,
            Self::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
            Self::Regex(re) => re.is_match(host),
            Self::Any => true,
        }
    }

    /// Default precedence among equally long paths: exact, wildcard, regex, any.
    const fn rank(&self) -> u8 {
        match self {
            Self::Exact(_) => 3,
            Self::Suffix(_) => 2,
            Self::Regex(_) => 1,
            Self::Any => 0,
        }
    }
}

/// One (host rule, path prefix) of a service.
#[derive(Debug, Clone)]
pub struct Route {
    pub host: HostRule,
    pub path: String,
    pub priority: i32,
    /// The service's name (its key in `http:`).
    pub service: String,
}

impl Route {
    fn matches(&self, host: &str, path: &str) -> bool {
        path.starts_with(self.path.as_str()) && self.host.matches(host)
    }
}

/// The routes of one listener, best first.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// The service for `host` (lowercase, no port) and `path`, if any.
    #[must_use]
    pub fn find(&self, host: &str, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(host, path))
    }

    #[must_use]
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// The route table of each listener port. A registry that passed validation compiles; a
/// regular expression that does not is left out (validation reports it).
#[must_use]
pub fn tables(reg: &Registry) -> BTreeMap<u16, RouteTable> {
    let mut out: BTreeMap<u16, RouteTable> =
        reg.listeners.iter().map(|l| (l.port, RouteTable::default())).collect();
    for (name, svc) in &reg.http {
        let routes = service_routes(name, svc);
        for (port, table) in &mut out {
            if svc.listeners.is_empty() || svc.listeners.contains(port) {
                table.routes.extend(routes.iter().cloned());
            }
        }
    }
    for table in out.values_mut() {
        // Stable: among equals, registry (name) order decides, so a reload never reorders.
        table.routes.sort_by_key(|r| Reverse((r.priority, r.path.len(), r.host.rank())));
    }
    out
}

fn service_routes(name: &str, svc: &HttpService) -> Vec<Route> {
    let hosts: Vec<HostRule> = match &svc.host_regex {
        Some(re) => match regex::Regex::new(&format!("^(?:{re})$")) {
            Ok(re) => vec![HostRule::Regex(re)],
            Err(_) => return Vec::new(),
        },
        None if svc.hosts.is_empty() => vec![HostRule::parse(name)],
        None => svc.hosts.iter().map(|h| HostRule::parse(h)).collect(),
    };
    let paths: Vec<&str> =
        if svc.paths.is_empty() { vec!["/"] } else { svc.paths.iter().map(String::as_str).collect() };
    let mut out = Vec::with_capacity(hosts.len() * paths.len());
    for host in &hosts {
        for path in &paths {
            out.push(Route {
                host: host.clone(),
                path: (*path).to_owned(),
                priority: svc.priority.unwrap_or(0),
                service: name.to_owned(),
            });
        }
    }
    out
}

/// The bytes a Host may hold: RFC 3986 reg-name and IP literal, with a port.
static HOST_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        #[expect(clippy::cast_possible_truncation, reason = "i < 256")]
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric();
        i += 1;
    }
    let other = b"-._~!$&'()*+,;=:[]%";
    let mut j = 0;
    while j < other.len() {
        t[other[j] as usize] = true;
        j += 1;
    }
    t
};

/// The host a request is for, lowercase and without port: from the URI's authority (HTTP/2,
/// absolute-form) or the `Host` header.
#[must_use]
pub fn request_host<B>(req: &http::Request<B>) -> Option<Host> {
    let (raw, value) = if let Some(h) = req.uri().host() {
        (h, None)
    } else {
        let v = req.headers().get(http::header::HOST)?;
        // Only what a host and port may hold (RFC 3986 reg-name, IP literal): a quote or a
        // backslash would break out of the `Forwarded` value it is copied into.
        if !v.as_bytes().iter().all(|b| HOST_BYTES[usize::from(*b)]) {
            return None;
        }
        (strip_port(v.to_str().ok()?), Some(v))
    };
    let host = raw.trim_end_matches('.');
    let owned = |h: &str| HeaderValue::from_str(h).ok().map(|text| Host { at: 0..text.len(), text });
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        return owned(&host.to_ascii_lowercase());
    }
    match value {
        // The common case: the request's own Host field, shared, not copied.
        Some(v) => {
            let from = host.as_ptr() as usize - v.as_bytes().as_ptr() as usize;
            Some(Host { text: v.clone(), at: from..from + host.len() })
        }
        None => owned(host),
    }
}

/// A request's host: lowercase, without port or trailing dot.
#[derive(Debug, Clone)]
pub struct Host {
    text: HeaderValue,
    at: std::ops::Range<usize>,
}

impl std::ops::Deref for Host {
    type Target = str;

    fn deref(&self) -> &str {
        let bytes = &self.text.as_bytes()[self.at.clone()];
        debug_assert!(bytes.is_ascii());
        // SAFETY: a range of a value made by `HeaderValue::from_str` or read by `to_str`, both
        // of which take visible ASCII only, and immutable since: always UTF-8. (Checked once,
        // not at every look: routing looks several times per request.)
        unsafe { std::str::from_utf8_unchecked(bytes) }
    }
}

fn strip_port(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        // [v6]:port
        return rest.split_once(']').map_or(h, |(addr, _)| addr);
    }
    h.rsplit_once(':').filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit())).map_or(h, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(yaml: &str) -> Registry {
        crate::config::parse(yaml, std::path::Path::new("t.yaml")).expect("valid registry")
    }

    const REG: &str = "version: 1
listeners: [{port: 80}, {port: 8080}]
http:
  example.org:
    backends: [{host: 10.0.0.1, port: 1}]
  users:
    hosts: [api.example.org]
    paths: [/api/users]
    backends: [{host: 10.0.0.2, port: 1}]
  products:
    hosts: [api.example.org]
    paths: [/api/products]
    listeners: [8080]
    backends: [{host: 10.0.0.3, port: 1}]
  wild:
    hosts: ['*.example.org']
    backends: [{host: 10.0.0.4, port: 1}]
  numbered:
    host_regex: 'app[0-9]+\\.example\\.org'
    backends: [{host: 10.0.0.5, port: 1}]
  catch-all:
    hosts: ['*']
    backends: [{host: 10.0.0.6, port: 1}]
  pinned:
    hosts: [api.example.org]
    paths: [/api]
    priority: 10
    backends: [{host: 10.0.0.7, port: 1}]
";

    fn find(t: &RouteTable, host: &str, path: &str) -> String {
        t.find(host, path).map_or_else(|| "-".to_owned(), |r| r.service.clone())
    }

    #[test]
    fn hosts_paths_and_priorities_pick_the_service() {
        let tables = tables(&reg(REG));
        let (t80, t8080) = (&tables[&80], &tables[&8080]);
        assert_eq!(find(t80, "example.org", "/"), "example.org");
        // Priority 10 beats the longer /api/users prefix.
        assert_eq!(find(t80, "api.example.org", "/api/users/7"), "pinned");
        assert_eq!(find(t80, "api.example.org", "/other"), "wild", "wildcard beats the regex and `*`");
        assert_eq!(find(t80, "app12.example.org", "/"), "wild", "wildcard ranks above regex");
        assert_eq!(find(t80, "app12.other.org", "/"), "catch-all");
        assert_eq!(find(t80, "example.net", "/x"), "catch-all");
        // `products` is only on 8080.
        assert_eq!(find(t8080, "api.example.org", "/api/products"), "pinned");
    }

    #[test]
    fn without_priorities_the_longest_prefix_and_the_most_exact_host_win() {
        let yaml = REG.replace("    priority: 10\n", "");
        let tables = tables(&reg(&yaml));
        assert_eq!(find(&tables[&80], "api.example.org", "/api/users/7"), "users");
        assert_eq!(find(&tables[&80], "api.example.org", "/api/products"), "pinned", "not on 80");
        assert_eq!(find(&tables[&8080], "api.example.org", "/api/products"), "products");
        assert_eq!(find(&tables[&80], "api.example.org", "/api"), "pinned");
        assert_eq!(find(&tables[&80], "api.example.org", "/ap"), "wild");
    }

    #[test]
    fn wildcards_need_one_more_label_and_regexes_match_whole_hosts() {
        let rule = HostRule::parse("*.example.org");
        assert!(rule.matches("a.example.org") && rule.matches("a.b.example.org"));
        assert!(!rule.matches("example.org") && !rule.matches("badexample.org"));
        let tables = tables(&reg(REG));
        assert_eq!(find(&tables[&80], "xapp1.example.org.evil", "/"), "catch-all");
    }

    #[test]
    fn the_host_comes_without_port_and_in_lowercase() {
        let req = |h: &str| http::Request::builder().uri("/").header("host", h).body(()).unwrap();
        assert_eq!(request_host(&req("Example.ORG:8080")).as_deref().map(|h| h as &str), Some("example.org"));
        assert_eq!(request_host(&req("[::1]:80")).as_deref().map(|h| h as &str), Some("::1"));
        assert_eq!(request_host(&req("example.org.")).as_deref().map(|h| h as &str), Some("example.org"));
        let abs = http::Request::builder().uri("http://a.example.org/x").body(()).unwrap();
        assert_eq!(request_host(&abs).as_deref().map(|h| h as &str), Some("a.example.org"));
        assert!(request_host(&http::Request::builder().uri("/").body(()).unwrap()).is_none());
        assert!(request_host(&req("a.example\";for=1.2.3.4")).is_none(), "a quote is no host");
        assert!(request_host(&req("a.example\\x")).is_none());
        assert_eq!(
            request_host(&req("app.example.org:80")).as_deref().map(|h| h as &str),
            Some("app.example.org")
        );
    }
}
