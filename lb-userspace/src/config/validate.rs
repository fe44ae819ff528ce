//! Semantic checks on a parsed registry: what types alone cannot say.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use lb_common::maps::{MAX_BACKENDS_PER_VIP, MAX_VIPS};

use super::{
    schema::{BackendSpec, Mode, REGISTRY_VERSION, Registry},
    spans::FieldPath,
};

/// Longest DNS name and label (RFC 1035).
const MAX_DNS_NAME: usize = 253;
const MAX_DNS_LABEL: usize = 63;

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
    for (name, svc) in &reg.http {
        backends(&root.key("http").key(name).key("backends"), &svc.backends, &mut out);
    }
    let mut vips: HashMap<(IpAddr, u16, u8), &str> = HashMap::new();
    for (name, svc) in &reg.tcp {
        let path = root.key("tcp").key(name);
        if svc.port == 0 {
            out.push(finding(path.key("port"), "port 0 is not a service port", None));
        }
        backends(&path.key("backends"), &svc.backends, &mut out);
        if svc.backends.len() > MAX_BACKENDS_PER_VIP as usize {
            out.push(finding(
                path.key("backends"),
                format!(
                    "{} backends; a service balances over at most {MAX_BACKENDS_PER_VIP}",
                    svc.backends.len()
                ),
                None,
            ));
        }
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
        let Some(vip) = svc.vip else { continue };
        if let Some(problem) = vip_problem(vip) {
            out.push(finding(
                path.key("vip"),
                problem,
                Some("a VIP is a unicast IPv4 address routed to this node"),
            ));
        }
        match svc.mode {
            Mode::DsrL2 => {
                for (i, b) in svc.backends.iter().enumerate() {
                    if b.port != svc.port {
                        out.push(finding(
                            path.key("backends").index(i).key("port"),
                            format!("backend port {} differs from service port {}", b.port, svc.port),
                            Some("dsr-l2 forwards packets unchanged, so backends must listen on the service port"),
                        ));
                    }
                }
            }
        }
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
    if vips.len() > MAX_VIPS as usize {
        out.push(finding(
            root.key("tcp"),
            format!("{} VIP entries; the data plane holds at most {MAX_VIPS}", vips.len()),
            None,
        ));
    }
    out
}

fn vip_problem(vip: IpAddr) -> Option<&'static str> {
    match vip {
        IpAddr::V6(_) => Some("IPv6 VIPs are not supported by this version"),
        IpAddr::V4(v4) if v4.is_unspecified() => Some("0.0.0.0 can not be a VIP"),
        IpAddr::V4(v4) if v4.is_multicast() || v4.is_broadcast() => Some("a VIP must be a unicast address"),
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address can not be a VIP"),
        IpAddr::V4(_) => None,
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
    fn hosts_are_ip_addresses_or_dns_names() {
        for ok in ["10.0.0.1", "::1", "node1.bolabaden.org", "backend-1", "a.b.c."] {
            assert_eq!(host_problem(ok), None, "{ok}");
        }
        for bad in ["", "10.0.0.300", "1.2.3", "-x.org", "a..b", "bad host", "x_y.-z"] {
            assert!(host_problem(bad).is_some(), "{bad}");
        }
    }
}
