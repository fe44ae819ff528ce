//! The service registry: parse, validate, and report problems by file, line, column and field.
//!
//! - `schema`: the serde types (strict: unknown keys are errors); `edge`: the HTTP edge's.
//! - `spans`: field path -> position, duplicate-key and syntax checks.
//! - `validate`: semantic checks on typed values.
//! - `error`: the error a user sees.

mod edge;
mod error;
mod schema;
mod spans;
mod validate;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

pub use edge::{
    Acl, AclRule, Balance, CachePolicy, CertSpec, CircuitBreaker, ClientAuth, EdgeCache, HashKey, Hsts,
    Limits, Listener, Passive, Pool, Rate, RateLimits, Redirect, Retry, Timeouts, Tls, TlsVersion, Upstream,
    UpstreamProtocol, UpstreamTls,
};
pub use error::{ConfigError, Problem};
pub use schema::{
    AllDown, BackendSpec, Datapath, Fragment, HealthCheck, HttpCheck, HttpService, L4Service, MAX_WEIGHT,
    Mode, PortRange, Protocol, ProxySettings, REGISTRY_VERSION, Registry, Role, with_roles,
};
use serde::de::DeserializeOwned;
use spans::{FieldPath, Seg, Spans};

/// A registry and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub registry: Registry,
    /// Every file read: the root first, then included ones.
    pub files: Vec<PathBuf>,
    /// Directories whose changes can change the registry (the root's and each include's).
    pub dirs: Vec<PathBuf>,
}

/// Reads, parses and validates the registry at `file` and the files it includes.
pub fn load_file(file: &Path) -> Result<Registry, ConfigError> {
    load(file).map(|l| l.registry)
}

/// [`load_file`], also telling which files and directories the registry depends on.
pub fn load(file: &Path) -> Result<Loaded, ConfigError> {
    let src = std::fs::read_to_string(file)
        .map_err(|source| ConfigError::Read { file: file.to_owned(), source })?;
    load_str(&src, file)
}

/// Parses and validates registry text; `file` names it in errors, and `include:` paths are
/// relative to its directory.
pub fn parse(src: &str, file: &Path) -> Result<Registry, ConfigError> {
    load_str(src, file).map(|l| l.registry)
}

fn problem_at(file: &Path, pos: spans::Pos, field: String, message: String, hint: Option<String>) -> Problem {
    Problem { file: file.to_owned(), line: pos.line, column: pos.column, field, message, hint }
}

/// One YAML document into `T`, with the index of where its fields are.
fn document<T: DeserializeOwned>(src: &str, file: &Path) -> Result<(T, Spans), ConfigError> {
    let spans = Spans::index(src).map_err(|e| {
        ConfigError::Invalid(vec![problem_at(file, e.pos, e.field.to_string(), e.message, None)])
    })?;
    let de = serde_yaml_ng::Deserializer::from_str(src);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let pos = inner
            .location()
            .map_or(spans::Pos { line: 1, column: 1 }, |l| spans::Pos { line: l.line(), column: l.column() });
        let message = serde_message(&inner, &field);
        let hint = hint_for(&message);
        ConfigError::Invalid(vec![problem_at(
            file,
            pos,
            if field == "." { String::new() } else { field },
            message,
            hint,
        )])
    })?;
    Ok((value, spans))
}

/// Parses and validates registry text as if read from `file` (includes are read relative to
/// its directory).
#[expect(clippy::too_many_lines, reason = "one pass over the root and its includes reads best whole")]
pub fn load_str(src: &str, file: &Path) -> Result<Loaded, ConfigError> {
    let (mut reg, root_spans) = document::<Registry>(src, file)?;
    let base = file.parent().map_or_else(|| PathBuf::from("."), Path::to_owned);
    let mut sources: Vec<(PathBuf, Spans)> = vec![(file.to_owned(), root_spans)];
    let mut dirs = vec![base.clone()];
    // (section, service) -> index in `sources` of the file defining it.
    let mut origin: HashMap<(&'static str, String), usize> = HashMap::new();
    origin.extend(reg.http.keys().map(|k| (("http", k.clone()), 0)));
    origin.extend(reg.tcp.keys().map(|k| (("tcp", k.clone()), 0)));
    let mut problems = Vec::new();

    for (i, pattern) in reg.include.clone().iter().enumerate() {
        let include_path = FieldPath::default().key("include").index(i);
        let include_pos = sources[0].1.locate(&include_path);
        let at = |message: String, hint: Option<&str>| {
            problem_at(file, include_pos, include_path.to_string(), message, hint.map(str::to_owned))
        };
        let full = base.join(pattern);
        if let Some(dir) = full.parent() {
            dirs.push(dir.to_owned());
        }
        let paths = match expand(&full) {
            Ok(paths) => paths,
            Err(message) => {
                problems.push(at(message, Some("paths and globs are relative to this file's directory")));
                continue;
            }
        };
        for path in paths {
            // A glob such as `*.yaml` next to the root matches the root itself.
            if sources.iter().any(|(f, _)| same_file(f, &path)) {
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    problems.push(at(format!("cannot read {}: {e}", path.display()), None));
                    continue;
                }
            };
            let (frag, spans) = match document::<Fragment>(&text, &path) {
                Ok(d) => d,
                Err(e) => {
                    problems.extend(e.problems().iter().cloned());
                    continue;
                }
            };
            let idx = sources.len();
            sources.push((path.clone(), spans));
            let here = |p: FieldPath, message: String| {
                problem_at(&path, sources[idx].1.locate(&p), p.to_string(), message, None)
            };
            if let Some(v) = frag.version.filter(|&v| v != REGISTRY_VERSION) {
                problems.push(here(
                    FieldPath::default().key("version"),
                    format!("unsupported registry version {v}"),
                ));
            }
            let mut merge = |section: &'static str, name: &String| -> bool {
                if let Some(&first) = origin.get(&(section, name.clone())) {
                    let (f, sp) = &sources[first];
                    let pos = sp.locate(&FieldPath::default().key(section).key(name));
                    let p = FieldPath::default().key(section).key(name);
                    problems.push(here(
                        p,
                        format!(
                            "service `{name}` is already defined at {}:{}:{}",
                            f.display(),
                            pos.line,
                            pos.column
                        ),
                    ));
                    return false;
                }
                origin.insert((section, name.clone()), idx);
                true
            };
            for (name, svc) in frag.http {
                if merge("http", &name) {
                    reg.http.insert(name, svc);
                }
            }
            for (name, svc) in frag.tcp {
                if merge("tcp", &name) {
                    reg.tcp.insert(name, svc);
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(ConfigError::Invalid(problems));
    }

    let findings = validate::validate(&reg);
    if !findings.is_empty() {
        let mut problems: Vec<Problem> = findings
            .into_iter()
            .map(|f| {
                let idx = match f.path.0.as_slice() {
                    [Seg::Key(section), Seg::Key(name), ..] => {
                        let section = if section == "http" { "http" } else { "tcp" };
                        origin.get(&(section, name.clone())).copied().unwrap_or(0)
                    }
                    _ => 0,
                };
                let (f_file, spans) = &sources[idx];
                problem_at(f_file, spans.locate(&f.path), f.path.to_string(), f.message, f.hint)
            })
            .collect();
        problems.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
        return Err(ConfigError::Invalid(problems));
    }
    certificate_files(&mut reg, &base, file, &sources[0].1, &mut dirs)?;
    dirs.sort();
    dirs.dedup();
    Ok(Loaded { registry: reg, files: sources.into_iter().map(|(f, _)| f).collect(), dirs })
}

/// Makes the listeners' certificate paths absolute (they are relative to the registry file),
/// reads them so a bad one is a problem at its line, and adds their directories to those
/// watched: a renewed certificate reloads the registry.
fn certificate_files(
    reg: &mut Registry,
    base: &Path,
    file: &Path,
    spans: &Spans,
    dirs: &mut Vec<PathBuf>,
) -> Result<(), ConfigError> {
    let mut problems = Vec::new();
    let mut report = |p: FieldPath, e: &crate::tls::TlsError| {
        problems.push(problem_at(
            file,
            spans.locate(&p),
            p.to_string(),
            crate::logging::error_chain(e),
            None,
        ));
    };
    for (i, l) in reg.listeners.iter_mut().enumerate() {
        let Some(tls) = &mut l.tls else { continue };
        let at = FieldPath::default().key("listeners").index(i).key("tls");
        for (j, c) in tls.certificates.iter_mut().enumerate() {
            c.cert = base.join(&c.cert);
            c.key = base.join(&c.key);
            dirs.extend([&c.cert, &c.key].into_iter().filter_map(|p| p.parent()).map(Path::to_owned));
            if let Err(e) = crate::tls::Certificate::load(&c.cert, &c.key, false) {
                let in_key = matches!(&e, crate::tls::TlsError::Read { path, .. }
                    | crate::tls::TlsError::Invalid { path, .. } if *path == c.key);
                report(at.key("certificates").index(j).key(if in_key { "key" } else { "cert" }), &e);
            }
        }
        if let Some(auth) = &mut tls.client_auth {
            auth.ca = base.join(&auth.ca);
            dirs.extend(auth.ca.parent().map(Path::to_owned));
        }
        if tls.client_auth.is_some()
            && let Err(e) = crate::tls::server_config(tls, Vec::new())
        {
            report(at.key("client_auth").key("ca"), &e);
        }
    }
    for (name, svc) in &mut reg.http {
        let http2 = svc.upstream.protocol == UpstreamProtocol::Http2;
        let Some(tls) = &mut svc.upstream.tls else { continue };
        let at = FieldPath::default().key("http").key(name).key("upstream").key("tls");
        for f in [&mut tls.ca, &mut tls.cert, &mut tls.key].into_iter().flatten() {
            *f = base.join(&*f);
            dirs.extend(f.parent().map(Path::to_owned));
        }
        if tls.cert.is_some() != tls.key.is_some() {
            continue; // validation names the missing one
        }
        if let Err(e) = crate::tls::client_config(tls, http2) {
            let field = match &e {
                crate::tls::TlsError::Read { path, .. }
                | crate::tls::TlsError::Invalid { path, .. }
                | crate::tls::TlsError::Mismatch { cert: path, .. } => {
                    [(&tls.ca, "ca"), (&tls.key, "key"), (&tls.cert, "cert")]
                        .into_iter()
                        .find(|(f, _)| f.as_ref() == Some(path))
                        .map_or("ca", |(_, n)| n)
                }
                _ => "ca",
            };
            report(at.key(field), &e);
        }
    }
    if problems.is_empty() { Ok(()) } else { Err(ConfigError::Invalid(problems)) }
}

/// The files an include names: a glob's matches in name order, or the one literal path.
fn expand(full: &Path) -> Result<Vec<PathBuf>, String> {
    let text = full.to_string_lossy();
    if !text.contains(['*', '?', '[']) {
        return if full.is_file() {
            Ok(vec![full.to_owned()])
        } else {
            Err(format!("{} does not exist", full.display()))
        };
    }
    let paths = glob::glob(&text).map_err(|e| format!("bad glob `{text}`: {e}"))?;
    let mut out: Vec<PathBuf> = paths.filter_map(Result::ok).filter(|p| p.is_file()).collect();
    out.sort();
    Ok(out)
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// `serde_yaml`'s message without the path prefix and position suffix it adds itself (both are
/// reported as separate fields).
fn serde_message(err: &serde_yaml_ng::Error, field: &str) -> String {
    let mut msg = err.to_string();
    if let Some(l) = err.location() {
        let suffix = format!(" at line {} column {}", l.line(), l.column());
        if let Some(stripped) = msg.strip_suffix(&suffix) {
            msg = stripped.to_owned();
        }
    }
    if let Some((head, tail)) = msg.split_once(": ")
        && field.starts_with(head)
    {
        msg = tail.to_owned();
    }
    msg
}

fn hint_for(message: &str) -> Option<String> {
    if message.starts_with("unknown field") {
        Some("check the spelling; `lb-ctl config validate FILE` lists every problem".to_owned())
    } else if message.starts_with("missing field") {
        Some("add the field; see the registry reference in README.md".to_owned())
    } else if message.starts_with("unknown variant") {
        Some("use one of the listed values".to_owned())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{spans::FieldPath, *};

    /// The registry sketch of seed 003, verbatim.
    const SEED_003: &str = include_str!("../../../tests/fixtures/seed-003-services.yaml");

    fn problems(src: &str) -> Vec<Problem> {
        match parse(src, Path::new("services.yaml")) {
            Ok(r) => panic!("expected an error, got {r:?}"),
            Err(e) => e.problems().to_vec(),
        }
    }

    fn one(src: &str) -> Problem {
        let p = problems(src);
        assert_eq!(p.len(), 1, "{p:#?}");
        p.into_iter().next().unwrap()
    }

    #[test]
    fn the_seed_003_sketch_loads_as_it_is() {
        let r = parse(SEED_003, Path::new("services.yaml")).expect("seed 003 sketch must load");
        assert_eq!(r.version, 1);
        assert_eq!(r.http["bolabaden.org"].backends.len(), 2);
        assert_eq!(r.http["dozzle.bolabaden.org"].backends[0].port, 9999);
        let redis = &r.tcp["redis-main"];
        assert_eq!((redis.port, redis.vip, redis.mode), (6379, None, Mode::DsrL2));
        assert_eq!(redis.protocols, vec![Protocol::Tcp]);
        assert_eq!(redis.backends[1].host, "node2.bolabaden.org");
    }

    #[test]
    fn an_unknown_key_names_file_line_column_and_field() {
        let p = one("version: 1\ntcp:\n  a:\n    port: 1\n    backends:\n      - host: x\n        prot: 3\n");
        assert_eq!((p.line, p.column), (7, 9));
        assert_eq!(p.field, "tcp.a.backends[0].prot");
        assert_eq!(p.message, "unknown field `prot`, expected one of `host`, `port`, `weight`, `node`");
        assert_eq!(p.file, PathBuf::from("services.yaml"));
        assert!(
            p.to_string().starts_with("services.yaml:7:9: field `tcp.a.backends[0].prot`: unknown field")
        );
    }

    #[test]
    fn wrong_types_and_bad_values_are_located() {
        let p = one("version: 1\ntcp:\n  a:\n    port: '80'\n    backends: []\n");
        assert_eq!((p.line, p.field.as_str()), (4, "tcp.a.port"));
        assert!(p.message.contains("expected u16"), "{}", p.message);
        let p = one("version: 1\ntcp:\n  a:\n    port: 80\n    vip: 10.0.0.300\n    backends: []\n");
        assert_eq!(
            (p.line, p.field.as_str(), p.message.as_str()),
            (5, "tcp.a.vip", "invalid IP address syntax")
        );
        let p = one(
            "version: 1\ntcp:\n  a:\n    port: 80\n    mode: tunnel\n    backends: [{host: x, port: 80}]\n",
        );
        assert_eq!((p.line, p.field.as_str()), (5, "tcp.a.mode"));
        assert!(p.message.starts_with("unknown variant `tunnel`"), "{}", p.message);
    }

    #[test]
    fn duplicate_services_are_refused() {
        let p = one(
            "version: 1\ntcp:\n  a:\n    port: 1\n    backends: [{host: x, port: 1}]\n  a:\n    port: 2\n    backends: [{host: x, port: 2}]\n",
        );
        assert_eq!((p.line, p.column, p.field.as_str()), (6, 3, "tcp.a"));
        assert!(p.message.contains("duplicate key `a`"), "{}", p.message);
    }

    #[test]
    fn syntax_errors_are_located() {
        let p = one("version: 1\ntcp:\n  a: [\n");
        assert!(p.message.starts_with("YAML syntax error"), "{}", p.message);
        assert!(p.line >= 3, "{p}");
    }

    #[test]
    fn semantic_problems_are_all_reported_at_their_fields() {
        let src = "\
version: 2
tcp:
  web:
    vip: 10.0.0.1
    port: 80
    backends:
      - host: 10.0.0.11
        port: 8080
      - host: bad host
        port: 80
  web2:
    vip: 10.0.0.1
    port: 80
    backends:
      - host: 10.0.0.12
        port: 80
";
        let p = problems(src);
        let at: Vec<(usize, &str)> = p.iter().map(|p| (p.line, p.field.as_str())).collect();
        assert_eq!(
            at,
            vec![
                (1, "version"),
                (8, "tcp.web.backends[0].port"),
                (9, "tcp.web.backends[1].host"),
                (12, "tcp.web2.vip"),
            ],
            "{p:#?}"
        );
        assert!(p[1].hint.as_deref().unwrap().contains("dsr-l2"));
        assert!(p[3].message.contains("already used by service `web`"), "{}", p[3].message);
    }

    #[test]
    fn vips_must_be_unicast() {
        for (vip, needle) in [
            ("::1", "loopback"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "unicast"),
            ("127.0.0.1", "loopback"),
            ("ff02::1", "unicast"),
        ] {
            let p = one(&format!(
                "version: 1\ntcp:\n  a:\n    vip: \"{vip}\"\n    port: 80\n    backends: [{{host: x, port: 80}}]\n"
            ));
            assert_eq!(p.field, "tcp.a.vip");
            assert!(p.message.contains(needle), "{vip}: {}", p.message);
        }
    }

    #[test]
    fn empty_and_duplicate_backends_are_refused() {
        let p = one("version: 1\nhttp:\n  a.org:\n    backends: []\n");
        assert_eq!(p.field, "http.a.org.backends");
        let p = one(
            "version: 1\nhttp:\n  a.org:\n    backends:\n      - {host: x, port: 1}\n      - {host: x, port: 1}\n",
        );
        assert_eq!((p.line, p.field.as_str()), (6, "http.a.org.backends[1]"));
    }

    #[test]
    fn a_missing_file_is_a_read_error_naming_it() {
        let e = load_file(Path::new("/nonexistent/services.yaml")).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/services.yaml: cannot read registry"), "{e}");
    }

    #[test]
    fn located_paths_match_validate_paths() {
        let spans = Spans::index(SEED_003).unwrap();
        let pos = spans.locate(&FieldPath::default().key("tcp").key("redis-main").key("port"));
        assert_eq!(SEED_003.lines().nth(pos.line - 1).unwrap().trim(), "port: 6379");
    }

    /// A directory of registry files for include tests, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Self {
            let d = std::env::temp_dir().join(format!("lb-include-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(d.join("services.d")).unwrap();
            Self(d)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let p = self.0.join(name);
            std::fs::write(&p, text).unwrap();
            p
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SVC: &str = "tcp:\n  NAME:\n    port: 80\n    backends:\n      - {host: 10.0.0.1, port: 80}\n";

    #[test]
    fn a_bad_certificate_file_is_a_problem_at_its_field() {
        let d = Dir::new("certs");
        std::fs::create_dir_all(d.0.join("certs")).unwrap();
        d.write("certs/site.pem", "not a certificate\n");
        let root = d.write(
            "services.yaml",
            "version: 1\nlisteners:\n  - port: 443\n    tls:\n      certificates:\n        - {cert: certs/site.pem, key: certs/missing.key}\n",
        );
        let e = load(&root).unwrap_err();
        let p = &e.problems()[0];
        assert_eq!(p.field, "listeners[0].tls.certificates[0].key", "{e}");
        assert_eq!((p.file.as_path(), p.line), (root.as_path(), 6), "{e}");
        assert!(p.message.contains("cannot read") && p.message.contains("missing.key"), "{e}");
        d.write("certs/missing.key", "not a key either\n");
        let e = load(&root).unwrap_err();
        let p = &e.problems()[0];
        assert_eq!(p.field, "listeners[0].tls.certificates[0].cert", "{e}");
        assert!(p.message.contains("site.pem") && p.message.contains("holds no certificate"), "{e}");
    }

    #[test]
    fn upstream_tls_and_proxy_settings_are_checked_where_they_are_written() {
        let d = Dir::new("upstream");
        d.write("ca.pem", "no CA here\n");
        let svc = |upstream: &str| {
            format!(
                "version: 1\nhttp:\n  x.org:\n    backends: [{{host: a, port: 1}}]\n    upstream: {upstream}\n"
            )
        };
        let root = d.write("services.yaml", &svc("{tls: {ca: ca.pem}}"));
        let e = load(&root).unwrap_err();
        let p = &e.problems()[0];
        assert_eq!((p.field.as_str(), p.line), ("http.x.org.upstream.tls.ca", 5), "{e}");
        assert!(p.message.contains("ca.pem"), "{e}");
        d.write("services.yaml", &svc("{tls: {cert: c.pem}}"));
        let e = load(&root).unwrap_err();
        assert_eq!(e.problems()[0].field, "http.x.org.upstream.tls.key", "{e}");
        d.write("services.yaml", &svc("{protocol: http2, proxy_protocol: true}"));
        let e = load(&root).unwrap_err();
        assert_eq!(e.problems()[0].field, "http.x.org.upstream.proxy_protocol", "{e}");
        d.write("services.yaml", &svc("{protocol: http3}"));
        let e = load(&root).unwrap_err();
        assert!(e.to_string().contains("http3"), "{e}");
    }

    #[test]
    fn rate_limits_need_a_rate_and_whitelists_need_addresses() {
        let d = Dir::new("rates");
        let root = d.write(
            "services.yaml",
            "version: 1\nrate_limit:\n  per_ip: {rate: 0}\n  whitelist: [10.0.0.0/8, 10.0.0.0/40, nope]\n",
        );
        let e = load(&root).unwrap_err();
        let fields: Vec<(&str, usize)> = e.problems().iter().map(|p| (p.field.as_str(), p.line)).collect();
        assert_eq!(
            fields,
            [("rate_limit.per_ip.rate", 3), ("rate_limit.whitelist[1]", 4), ("rate_limit.whitelist[2]", 4)],
            "{e}"
        );
    }

    #[test]
    fn listener_timeouts_of_zero_and_a_zero_connection_cap_are_refused_where_written() {
        let d = Dir::new("limits");
        let root = d.write(
            "services.yaml",
            "version: 1\nlisteners:\n  - port: 80\n    limits:\n      send_timeout: 0s\n      idle_timeout: 0s\n      tunnel_timeout: 0s\n      max_connections_per_ip: 0\n",
        );
        let e = load(&root).unwrap_err();
        let fields: Vec<(&str, usize)> = e.problems().iter().map(|p| (p.field.as_str(), p.line)).collect();
        let want = [
            ("listeners[0].limits.send_timeout", 5),
            ("listeners[0].limits.idle_timeout", 6),
            ("listeners[0].limits.tunnel_timeout", 7),
            ("listeners[0].limits.max_connections_per_ip", 8),
        ];
        assert_eq!(fields, want, "{e}");
        d.write("services.yaml", "version: 1\nlisteners:\n  - {port: 80, limits: {send_timeout: 5s}}\n");
        let r = load(&root).unwrap().registry;
        assert_eq!(r.listeners[0].limits.send_timeout, std::time::Duration::from_secs(5));
    }

    #[test]
    fn circuit_breakers_take_seed_001s_defaults_and_refuse_what_could_never_close() {
        let d = Dir::new("breakers");
        let svc = |b: &str| {
            format!(
                "version: 1\nhttp:\n  x.org:\n    backends: [{{host: a, port: 1}}]\n    circuit_breaker: {b}\n"
            )
        };
        let root = d.write("services.yaml", &svc("{}"));
        let b = load(&root).unwrap().registry.http["x.org"].circuit_breaker.clone().expect("on");
        assert_eq!((b.consecutive_errors, b.error_rate, b.window.as_secs()), (5, 50, 10));
        assert_eq!((b.slow.as_secs(), b.open_for.as_secs(), b.half_open_requests), (5, 30, 1));
        d.write("services.yaml", &svc("{error_rate: 150, open_for: 0s, half_open_requests: 0}"));
        let e = load(&root).unwrap_err();
        let fields: Vec<(&str, usize)> = e.problems().iter().map(|p| (p.field.as_str(), p.line)).collect();
        let at = |f: &str| (format!("http.x.org.circuit_breaker.{f}"), 5);
        let want = [at("error_rate"), at("open_for"), at("half_open_requests")];
        assert_eq!(fields, want.iter().map(|(f, l)| (f.as_str(), *l)).collect::<Vec<_>>(), "{e}");
    }

    #[test]
    fn cache_policies_read_seed_003s_shorthand_or_a_map_and_bad_ones_are_located() {
        let svc = |c: &str| {
            format!("version: 1\nhttp:\n  x.org:\n    cache: {c}\n    backends: [{{host: a, port: 1}}]\n")
        };
        let policy = |c: &str| parse(&svc(c), Path::new("s.yaml")).map(|r| r.http["x.org"].cache);
        let ten = std::time::Duration::from_mins(10);
        assert_eq!(policy("\"static, 10m\"").unwrap(), Some(CachePolicy { all: false, ttl: ten }));
        assert_eq!(policy("\"all,30s\"").unwrap(), Some(CachePolicy { all: true, ttl: ten / 20 }));
        assert_eq!(policy("{match: all, ttl: 10m}").unwrap(), Some(CachePolicy { all: true, ttl: ten }));
        assert_eq!(policy("10m").unwrap(), Some(CachePolicy { all: false, ttl: ten }));
        for (bad, says) in [
            ("\"everything, 10m\"", "`everything` is not what a cache keeps"),
            ("\"static, soon\"", "`soon` is not a duration"),
            ("0s", "keeps answers under a second"),
        ] {
            let e = policy(bad).unwrap_err();
            let p = &e.problems()[0];
            assert_eq!((p.line, p.field.as_str()), (4, "http.x.org.cache"), "{bad}: {e}");
            assert!(p.message.contains(says), "{bad}: {}", p.message);
        }
        let e = parse(
            "version: 1\nedge_cache: {memory_bytes: 1000, max_object_bytes: 2000}\n",
            Path::new("s.yaml"),
        )
        .unwrap_err();
        assert_eq!(e.problems()[0].field, "edge_cache.max_object_bytes", "{e}");
    }

    #[test]
    fn proxied_services_take_no_vip_and_no_port_another_socket_holds() {
        let ok = "version: 1\ntcp:\n  redis:\n    port: 6379\n    mode: proxy\n    backends: [{host: a, port: 6380}]\n";
        let r = parse(ok, Path::new("s.yaml")).expect("a proxied service may use other backend ports");
        let p = &r.tcp["redis"].proxy;
        assert!(p.local_first && p.close_on_down && p.listen.is_unspecified());
        let vip = "version: 1\ntcp:\n  r:\n    port: 6379\n    mode: proxy\n    vip: 10.0.0.1\n    backends: [{host: a, port: 1}]\n";
        let p = one(vip);
        assert_eq!((p.line, p.field.as_str()), (6, "tcp.r.vip"), "{p}");
        let clash = "version: 1\nlisteners: [{port: 8000}]\ntcp:\n  r:\n    port: 8000\n    mode: proxy\n    proxy: {listen: 10.0.0.1}\n    backends: [{host: a, port: 1}]\n";
        let p = one(clash);
        assert_eq!((p.line, p.field.as_str()), (5, "tcp.r.port"), "{p}");
        assert!(p.message.contains("also bound as an HTTP listener"), "{}", p.message);
        let udp = "version: 1\nlisteners: [{port: 8000}]\ntcp:\n  r:\n    port: 8000\n    mode: proxy\n    protocols: [udp]\n    proxy: {listen: 10.0.0.1}\n    backends: [{host: a, port: 1}]\n";
        parse(udp, Path::new("s.yaml")).expect("UDP on an HTTP listener's port is another socket");
        let p = one(&udp.replace("    proxy: {listen: 10.0.0.1}\n", ""));
        assert_eq!(p.field, "tcp.r.proxy.listen", "UDP from a wildcard socket: {p}");
    }

    #[test]
    fn acls_take_one_range_or_a_list_and_refuse_bad_ranges_and_paths() {
        let d = Dir::new("acls");
        let root = d.write(
            "services.yaml",
            "version: 1\nacl:\n  allow: 10.0.0.0/8\n  rules:\n    - {path: /admin/*, allow: [10.0.0.0/8, 192.168.0.0/16]}\n",
        );
        let acl = load(&root).unwrap().registry.acl;
        assert_eq!(acl.allow, ["10.0.0.0/8"]);
        assert_eq!(acl.rules[0].allow, ["10.0.0.0/8", "192.168.0.0/16"]);
        d.write("services.yaml", "version: 1\nacl:\n  deny: [10.0.0.0/33]\n  rules:\n    - {path: admin}\n");
        let e = load(&root).unwrap_err();
        let fields: Vec<(&str, usize)> = e.problems().iter().map(|p| (p.field.as_str(), p.line)).collect();
        assert_eq!(fields, [("acl.deny[0]", 3), ("acl.rules[0]", 5), ("acl.rules[0].path", 5)], "{e}");
    }

    #[test]
    fn deny_lists_need_a_vip_of_their_family_and_ranges() {
        let d = Dir::new("deny");
        let svc = |extra: &str| {
            format!(
                "version: 1\ntcp:\n  a:\n    {extra}port: 80\n    backends: [{{host: 10.0.0.1, port: 80}}]\n    deny: [10.0.0.0/8, \"2001:db8::/32\", nope]\n"
            )
        };
        let root = d.write("services.yaml", &svc("vip: 10.9.0.1\n    "));
        let e = load(&root).unwrap_err();
        let fields: Vec<(&str, usize)> = e.problems().iter().map(|p| (p.field.as_str(), p.line)).collect();
        assert_eq!(fields, [("tcp.a.deny[1]", 7), ("tcp.a.deny[2]", 7)], "{e}");
        assert!(e.to_string().contains("another address family"), "{e}");
        d.write("services.yaml", &svc(""));
        let e = load(&root).unwrap_err();
        assert!(e.to_string().contains("for a service with a `vip`"), "{e}");
    }

    #[test]
    fn includes_merge_globs_and_files_and_report_what_they_read() {
        let d = Dir::new("merge");
        d.write("services.d/10-a.yaml", &SVC.replace("NAME", "a"));
        d.write("services.d/20-b.yaml", &format!("version: 1\n{}", SVC.replace("NAME", "b")));
        d.write("services.d/notes.txt", "not yaml");
        let root = d.write("services.yaml", "version: 1\ninclude: [\"services.d/*.yaml\"]\nhttp:\n  x.org:\n    backends: [{host: a, port: 1}]\n");
        let l = load(&root).unwrap();
        assert_eq!(l.registry.tcp.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(l.files.len(), 3);
        assert_eq!(l.dirs, vec![d.0.clone(), d.0.join("services.d")]);
    }

    #[test]
    fn problems_in_included_files_name_those_files() {
        let d = Dir::new("problems");
        let a = d.write("services.d/a.yaml", &SVC.replace("NAME", "a"));
        let b = d.write(
            "services.d/b.yaml",
            &SVC.replace("NAME", "a").replace("port: 80\n    b", "port: 0\n    b"),
        );
        let root = d.write("services.yaml", "version: 1\ninclude: [services.d/*.yaml]\n");
        let p = load(&root).unwrap_err().problems().to_vec();
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!((p[0].file.clone(), p[0].line, p[0].field.as_str()), (b.clone(), 2, "tcp.a"));
        assert!(
            p[0].message.contains(&format!("already defined at {}:2:3", a.display())),
            "{}",
            p[0].message
        );

        // A semantic problem is located in the file that defines the service.
        std::fs::remove_file(&a).unwrap();
        let p = load(&root).unwrap_err().problems().to_vec();
        assert_eq!((p[0].file.clone(), p[0].line, p[0].field.as_str()), (b, 3, "tcp.a.port"));

        // A syntax error in an included file, and a missing literal include.
        d.write("services.d/b.yaml", "tcp: [\n");
        let root2 = d.write("two.yaml", "version: 1\ninclude:\n  - services.d/*.yaml\n  - missing.yaml\n");
        let p = load(&root2).unwrap_err().problems().to_vec();
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(p[0].file.ends_with("services.d/b.yaml") && p[0].message.starts_with("YAML syntax error"));
        assert_eq!((p[1].file.clone(), p[1].line, p[1].field.as_str()), (root2, 4, "include[1]"));
        assert!(p[1].message.ends_with("missing.yaml does not exist"), "{}", p[1].message);
    }

    #[test]
    fn included_files_may_not_include_or_set_other_sections() {
        let d = Dir::new("nested");
        d.write("services.d/a.yaml", "include: [x.yaml]\n");
        let root = d.write("services.yaml", "version: 1\ninclude: [services.d/a.yaml]\n");
        let p = load(&root).unwrap_err().problems().to_vec();
        assert!(p[0].message.starts_with("unknown field `include`"), "{}", p[0].message);
    }

    #[test]
    fn health_checks_and_fallbacks_are_checked() {
        let p = problems(
            "version: 1\ntcp:\n  a:\n    port: 80\n    backends: [{host: x, port: 80}]\n    fallback: [{host: x, port: 80}]\n    health:\n      interval: 1s\n      timeout: 2s\n      rise: 0\n      http: {path: health}\n      send: PING\n",
        );
        let at: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            at,
            [
                "tcp.a.fallback[0]",
                "tcp.a.health.timeout",
                "tcp.a.health.rise",
                "tcp.a.health.http",
                "tcp.a.health.http.path"
            ],
            "{p:#?}"
        );
        let r = parse(
            "version: 1\ntcp:\n  redis:\n    port: 6379\n    backends: [{host: r1, port: 6379, node: node1}]\n    health: {send: 'PING\\r\\n', expect: '+PONG', interval: 1s, timeout: 200ms}\n    when_all_down: fail-closed\n",
            Path::new("s.yaml"),
        )
        .unwrap();
        let svc = &r.tcp["redis"];
        assert_eq!(svc.health.send.as_deref(), Some("PING\\r\\n"));
        assert_eq!((svc.health.fall, svc.health.rise), (3, 2), "seed 003's defaults");
        assert_eq!(svc.when_all_down, AllDown::FailClosed);
        assert_eq!(svc.backends[0].node.as_deref(), Some("node1"));
    }

    #[test]
    fn http_edge_settings_are_checked_and_located() {
        let p = problems(
            "version: 1
listeners:
  - {port: 80, limits: {max_header_bytes: 1024}}
  - {port: 80}
http:
  bad*.example.org:
    backends: [{host: a, port: 1}]
  r:
    host_regex: '(unclosed'
    backends: [{host: a, port: 1}]
  s:
    hosts: [x.org]
    paths: [api]
    listeners: [81]
    balance: {hash: {cookie: 'a b'}}
    retry: {tries: 0, statuses: [200]}
    backends: [{host: a, port: 1}]
  t:
    hosts: [x.org]
    paths: [api]
    redirect: {permanent: true}
  u:
    hosts: [y.org]
",
        );
        let at: Vec<&str> = p.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            at,
            [
                "listeners[0].limits.max_header_bytes",
                "listeners[1]",
                "http.bad*.example.org",
                "http.r.host_regex",
                "http.s.paths[0]",
                "http.s.listeners[0]",
                "http.s.balance.hash.cookie",
                "http.s.retry.tries",
                "http.s.retry.statuses[0]",
                "http.t.paths[0]",
                "http.t.redirect",
                "http.u.backends",
            ],
            "{p:#?}"
        );
        let p = problems(
            "version: 1\nlisteners: [{port: 80}, {port: 81}]\nhttp:\n  a:\n    hosts: [x.org]\n    backends: [{host: a, port: 1}]\n  b:\n    hosts: [X.org]\n    listeners: [81]\n    backends: [{host: b, port: 1}]\n",
        );
        assert_eq!(p.len(), 1, "{p:#?}");
        assert_eq!((p[0].field.as_str(), p[0].line), ("http.b", 7));
        assert!(p[0].message.contains("host `x.org` path `/` is also routed to service `a`"), "{p:#?}");
        // Seed 004's routes and seed 003's redirect load.
        let r = parse(
            "version: 1\nlisteners: [{port: 80}]\nhttp:\n  users:\n    hosts: [api.example.org]\n    paths: [/api/users]\n    balance: least-conn\n    backends: [{host: a, port: 1}]\n  www:\n    hosts: [www.example.org]\n    redirect: {strip_www: true}\n",
            Path::new("s.yaml"),
        )
        .unwrap();
        assert_eq!(r.http["users"].balance, crate::config::Balance::LeastConn);
        assert_eq!(r.listeners[0].limits.header_timeout, std::time::Duration::from_secs(10), "safe default");
        assert_eq!(r.listeners[0].limits.send_timeout, std::time::Duration::from_mins(1), "safe default");
        assert_eq!(r.listeners[0].limits.tunnel_timeout, std::time::Duration::from_hours(1), "safe default");
    }
}
