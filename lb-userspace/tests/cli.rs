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
    assert!(out.contains("valid (2 http, 1 tcp services)"), "{out}");
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
