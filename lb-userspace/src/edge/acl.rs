//! Who the HTTP edge serves (`acl:`), by source address and path (pure).

use std::{
    borrow::Cow,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::{cidr::Cidr, config};

/// The registry's `acl:`, parsed.
#[derive(Debug, Default)]
pub struct Acl {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
    rules: Vec<Rule>,
    /// Requests refused, kept across reloads.
    denied: Arc<AtomicU64>,
}

#[derive(Debug)]
struct Rule {
    /// `/admin` for `/admin/*` and `/admin`.
    prefix: String,
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

/// Validation has checked every range; one that still fails to parse is left out.
fn parse(list: &[String]) -> Vec<Cidr> {
    list.iter().filter_map(|c| Cidr::parse(c).ok()).collect()
}

/// Denied by `deny`, or outside a non-empty `allow`.
fn refuses(allow: &[Cidr], deny: &[Cidr], ip: IpAddr) -> bool {
    deny.iter().any(|c| c.contains(ip)) || !(allow.is_empty() || allow.iter().any(|c| c.contains(ip)))
}

impl Acl {
    #[must_use]
    pub fn new(spec: &config::Acl, denied: Arc<AtomicU64>) -> Self {
        let rules = (spec.rules.iter())
            .map(|r| Rule {
                prefix: r.path.trim_end_matches('*').trim_end_matches('/').to_owned(),
                allow: parse(&r.allow),
                deny: parse(&r.deny),
            })
            .collect();
        Self { allow: parse(&spec.allow), deny: parse(&spec.deny), rules, denied }
    }

    /// Whether `ip` may ask for `path` (as the request line has it); counts a refusal.
    #[must_use]
    pub fn permits(&self, ip: IpAddr, path: &str) -> bool {
        let refused = refuses(&self.allow, &self.deny, ip)
            || (!self.rules.is_empty() && {
                let path = normalize(path);
                let under = |p: &str| {
                    path.strip_prefix(p).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                };
                self.rules.iter().find(|r| under(&r.prefix)).is_some_and(|r| refuses(&r.allow, &r.deny, ip))
            });
        if refused {
            self.denied.fetch_add(1, Ordering::Relaxed);
        }
        !refused
    }
}

/// The path as a backend may read it: escapes decoded (`%61` is `a`, and `%2F` a slash, as some
/// servers take it), repeated slashes merged, `.` and `..` resolved. Otherwise `/%61dmin` or
/// `//admin/../admin` would slip past a rule for `/admin`. Rules only refuse, so reading a
/// path the widest way errs on the side of refusing.
#[must_use]
pub fn normalize(path: &str) -> Cow<'_, str> {
    let clean =
        !path.contains('%') && !path.contains("//") && !path.split('/').any(|s| s == "." || s == "..");
    if clean {
        return Cow::Borrowed(path);
    }
    let decoded = decode(path);
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let trailing = decoded.ends_with('/') && !segments.is_empty();
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing || out.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

fn decode(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(c) = path.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(c);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(yaml: &str) -> Acl {
        let spec: config::Acl = serde_yaml_ng::from_str(yaml).unwrap();
        Acl::new(&spec, Arc::default())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn seed_001s_lists_and_admin_rule() {
        let a = acl("
allow: [10.0.0.0/8, 192.168.0.0/16]
deny: [172.16.0.0/12]
rules:
  - path: /admin/*
    allow: 10.0.0.0/8
");
        assert!(a.permits(ip("10.1.2.3"), "/admin/users"));
        assert!(a.permits(ip("192.168.1.1"), "/shop"));
        assert!(!a.permits(ip("192.168.1.1"), "/admin/users"), "the rule narrows the lists");
        assert!(!a.permits(ip("192.168.1.1"), "/admin"));
        assert!(a.permits(ip("192.168.1.1"), "/administrator"), "a rule covers whole segments");
        assert!(!a.permits(ip("172.16.5.5"), "/shop"), "denied");
        assert!(!a.permits(ip("8.8.8.8"), "/shop"), "not allowed");
        assert!(a.permits(ip("::ffff:10.0.0.1"), "/admin/"), "IPv4-mapped IPv6 is IPv4");
        assert_eq!(a.denied.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn encoded_and_dotted_paths_do_not_slip_past_a_rule() {
        let a = acl("rules: [{path: /admin/*, deny: 0.0.0.0/0}]");
        let sneaky = [
            "/admin",
            "/%61dmin/x",
            "//admin",
            "/x/../admin/",
            "/./admin",
            "/admin/./../admin/y",
            "/x/..//admin",
        ];
        for path in sneaky.into_iter().chain(["/x%2F..%2Fadmin", "/admin%2Fx", "/%2e%2e/admin"]) {
            assert!(!a.permits(ip("10.0.0.1"), path), "{path} is /admin");
        }
        for path in ["/", "/x/admin", "/admins", "/..", "/admin%25"] {
            assert!(a.permits(ip("10.0.0.1"), path), "{path} is not under /admin");
        }
        assert_eq!(normalize("/a/b/../c/"), "/a/c/");
        assert_eq!(normalize("/../.."), "/");
        assert!(matches!(normalize("/plain/path"), Cow::Borrowed(_)), "the common case copies nothing");
    }

    #[test]
    fn no_acl_permits_everyone() {
        let a = Acl::default();
        assert!(a.permits(ip("203.0.113.9"), "/admin"));
    }
}
