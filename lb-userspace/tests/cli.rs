//! lbd and lb-ctl as a user runs them: exit codes and the messages they print.
//! Nothing here needs privileges: the registry is checked before anything is touched.

use std::{path::PathBuf, process::Command};

const SEED_003: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/seed-003-services.yaml");

/// A file in a per-test directory, removed with the directory on drop.
struct TempFile {
    dir: PathBuf,
    path: PathBuf,
}

impl TempFile {
    fn new(test: &str, contents: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("lb-cli-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("services.yaml");
        std::fs::write(&path, contents).unwrap();
        Self { dir, path }
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin).args(args).env("NO_COLOR", "1").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn lbd_refuses_a_broken_registry_naming_file_line_and_field() {
    let file = TempFile::new(
        "broken-registry",
        "version: 1\ntcp:\n  redis-main:\n    port: 6379\n    vip: 10.0.0.5\n    backends:\n      - host: node1\n        prot: 6379\n",
    );
    let (code, _, err) = run(env!("CARGO_BIN_EXE_lbd"), &["--config", file.arg(), "--iface", "lo"]);
    assert_eq!(code, 2, "{err}");
    let expected =
        format!("{}:8:9: field `tcp.redis-main.backends[0].prot`: unknown field `prot`", file.path.display());
    assert!(err.contains(&expected), "stderr must contain `{expected}`:\n{err}");
    assert!(err.contains("nothing was changed"), "{err}");
}

#[test]
fn lbd_names_a_missing_interface() {
    let file = TempFile::new("missing-iface", "version: 1\n");
    let (code, _, err) = run(env!("CARGO_BIN_EXE_lbd"), &["--config", file.arg(), "--iface", "nope0"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no interface named `nope0`"), "{err}");
}

#[test]
fn lb_ctl_validates_the_seed_003_sketch() {
    let (code, out, err) = run(env!("CARGO_BIN_EXE_lb-ctl"), &["config", "validate", SEED_003]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid (2 http, 1 tcp services, 1 files)"), "{out}");
}

#[test]
fn lb_ctl_lists_every_problem_of_a_broken_registry() {
    let file = TempFile::new(
        "two-problems",
        "version: 1\ntcp:\n  a:\n    vip: 10.0.0.1\n    port: 80\n    backends: [{host: 10.0.0.2, port: 81}]\n  b:\n    vip: 10.0.0.1\n    port: 80\n    backends: [{host: 10.0.0.3, port: 80}]\n",
    );
    let (code, _, err) = run(env!("CARGO_BIN_EXE_lb-ctl"), &["config", "validate", file.arg()]);
    assert_eq!(code, 2, "{err}");
    let f = file.path.display();
    assert!(err.contains(&format!("{f}:6:")), "port mismatch on line 6:\n{err}");
    assert!(
        err.contains(&format!("{f}:8:5: field `tcp.b.vip`: 10.0.0.1:80/tcp is already used by service `a`")),
        "{err}"
    );
}

#[test]
fn lb_ctl_validate_locates_each_kind_of_mistake() {
    let good = "version: 1\ntcp:\n  web:\n    vip: 10.0.0.1\n    port: 80\n    backends:\n      - host: 10.0.0.2\n        port: 80\n";
    let cases: [(&str, String, &str); 5] = [
        ("bad-yaml", good.replace("backends:\n", "backends: [\n"), ":7:7: YAML syntax error"),
        (
            "unknown-key",
            good.replace("port: 80\n    b", "port: 80\n    bakends: []\n    b"),
            ":6:5: field `tcp.web.bakends`: unknown field",
        ),
        (
            "wrong-type",
            good.replace("    port: 80\n    b", "    port: eighty\n    b"),
            ":5:11: field `tcp.web.port`: invalid type",
        ),
        (
            "bad-address",
            good.replace("vip: 10.0.0.1", "vip: 10.0.0.300"),
            ":4:10: field `tcp.web.vip`: invalid IP address syntax",
        ),
        (
            "duplicate",
            format!("{good}{}", &good["version: 1\ntcp:\n".len()..]),
            ":9:3: field `tcp.web`: duplicate key `web`",
        ),
    ];
    for (name, text, needle) in cases {
        let file = TempFile::new(name, &text);
        let (code, _, err) = run(env!("CARGO_BIN_EXE_lb-ctl"), &["config", "validate", file.arg()]);
        assert_eq!(code, 2, "{name}: {err}");
        let expected = format!("{}{needle}", file.path.display());
        assert!(err.contains(&expected), "{name}: stderr must contain `{expected}`:\n{err}");
    }
}

/// The schema an editor would use accepts the seed 003 sketch and refuses an unknown key,
/// checked by Debian's python3-jsonschema (as yaml-language-server does).
#[test]
fn lb_ctl_schema_validates_registries_like_an_editor() {
    let python = "/usr/bin/python3";
    if Command::new(python).args(["-c", "import jsonschema, yaml"]).status().map_or(true, |s| !s.success()) {
        assert!(
            std::env::var_os("CI").is_none(),
            "python3-jsonschema and python3-yaml are missing (cargo xtask setup)"
        );
        eprintln!("skipped: Debian's python3-jsonschema/python3-yaml are not installed");
        return;
    }
    let (code, schema, err) = run(env!("CARGO_BIN_EXE_lb-ctl"), &["schema"]);
    assert_eq!(code, 0, "{err}");
    let dir = TempFile::new("schema", &schema);
    let check = |registry: &str| -> (bool, String) {
        let script = format!(
            "import json, sys, yaml, jsonschema\nschema = json.load(open({:?}))\ndoc = yaml.safe_load(open({registry:?}))\ntry:\n    jsonschema.validate(doc, schema)\nexcept jsonschema.ValidationError as e:\n    print(e.message); sys.exit(1)\n",
            dir.arg()
        );
        let out = Command::new(python).args(["-c", &script]).output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let (ok, msg) = check(SEED_003);
    assert!(ok, "the seed 003 sketch must pass the schema: {msg}");
    let bad = TempFile::new(
        "schema-bad",
        "version: 1\ntcp:\n  a:\n    port: 80\n    backends:\n      - {host: x, prot: 80}\n",
    );
    let (ok, msg) = check(bad.arg());
    assert!(!ok && msg.contains("prot"), "an unknown key must fail the schema: {msg}");
}

#[test]
fn lb_ctl_prints_completions_and_reports_an_absent_lbd() {
    let (code, out, err) = run(env!("CARGO_BIN_EXE_lb-ctl"), &["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("_lb__ctl()"), "{out}");
    // Nothing listens on this loopback port: exit 1 with a message that says what to check.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap().to_string();
    drop(closed);
    let (code, _, err) = run(env!("CARGO_BIN_EXE_lb-ctl"), &["--admin", &addr, "status"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach lbd's admin API"), "{err}");
}
