//! The service registry: parse, validate, and report problems by file, line, column and field.
//!
//! - `schema`: the serde types (strict: unknown keys are errors).
//! - `spans`: field path -> position, duplicate-key and syntax checks.
//! - `validate`: semantic checks on typed values.
//! - `error`: the error a user sees.

mod error;
mod schema;
mod spans;
mod validate;

use std::path::Path;

pub use error::{ConfigError, Problem};
pub use schema::{
    BackendSpec, Datapath, HttpService, L4Service, MAX_WEIGHT, Mode, PortRange, Protocol, REGISTRY_VERSION,
    Registry,
};
use spans::Spans;

/// Reads, parses and validates the registry at `file`.
pub fn load_file(file: &Path) -> Result<Registry, ConfigError> {
    let src = std::fs::read_to_string(file)
        .map_err(|source| ConfigError::Read { file: file.to_owned(), source })?;
    parse(&src, file)
}

/// Parses and validates registry text; `file` names it in errors.
pub fn parse(src: &str, file: &Path) -> Result<Registry, ConfigError> {
    let problem = |pos: spans::Pos, field: String, message: String, hint: Option<String>| Problem {
        file: file.to_owned(),
        line: pos.line,
        column: pos.column,
        field,
        message,
        hint,
    };
    let spans = Spans::index(src)
        .map_err(|e| ConfigError::Invalid(vec![problem(e.pos, e.field.to_string(), e.message, None)]))?;

    let de = serde_yaml_ng::Deserializer::from_str(src);
    let registry: Registry = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let pos = inner
            .location()
            .map_or(spans::Pos { line: 1, column: 1 }, |l| spans::Pos { line: l.line(), column: l.column() });
        let message = serde_message(&inner, &field);
        let hint = hint_for(&message);
        ConfigError::Invalid(vec![problem(
            pos,
            if field == "." { String::new() } else { field },
            message,
            hint,
        )])
    })?;

    let findings = validate::validate(&registry);
    if findings.is_empty() {
        return Ok(registry);
    }
    let mut problems: Vec<Problem> = findings
        .into_iter()
        .map(|f| problem(spans.locate(&f.path), f.path.to_string(), f.message, f.hint))
        .collect();
    problems.sort_by_key(|p| (p.line, p.column));
    Err(ConfigError::Invalid(problems))
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
        assert_eq!(p.message, "unknown field `prot`, expected one of `host`, `port`, `weight`");
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
}
