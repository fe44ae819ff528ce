//! The operations files under `ops/`: the Prometheus alert rules (promtool checks them and runs
//! their unit tests), the Grafana dashboard, and lbd's systemd unit (systemd-analyze verifies
//! it). A real lbd, confined to the unit's capabilities, must export every metric, label and
//! label value the rules and the dashboard use.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use lb_tests::{
    http::{Client, HttpBackend},
    installed,
    lbd::{self, Lbd, TempDir, sibling_binary},
    pki::Pki,
    privileged,
    topology::{DsrTopology, VIP, backend_ip},
    unique_prefix,
};
use serde_json::Value;

const RULES: &str = "prometheus/lb-alerts.yml";
const RULE_TESTS: &str = "prometheus/lb-alerts.test.yml";
const DASHBOARD: &str = "grafana/lb-dashboard.json";
const UNIT: &str = "systemd/lbd.service";

fn ops(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops").join(rel)
}

fn read(rel: &str) -> String {
    let p = ops(rel);
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Exit status and stdout + stderr of `cmd`, or None when it cannot be started.
fn run(cmd: &mut Command) -> Option<(bool, String)> {
    let out = cmd.output().ok()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Some((out.status.success(), text))
}

fn have(tool: &str, version_arg: &str) -> bool {
    run(Command::new(tool).arg(version_arg)).is_some_and(|(ok, _)| ok)
}

// ---------------------------------------------------------------------------------------------
// Reading the files: rule expressions, dashboard queries, the unit's settings.

/// The `expr:` values of a rules file: the rest of the line, or the block under `expr: |`.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix("expr:").map(str::trim) else { continue };
        if rest.starts_with(['|', '>']) {
            let block = lines[i + 1..].iter().take_while(|l| l.trim().is_empty() || indent(l) > indent(line));
            exprs.push(block.map(|l| l.trim()).collect::<Vec<_>>().join("\n"));
        } else {
            exprs.push(rest.to_owned());
        }
    }
    exprs
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel, those inside rows included.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut all = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        all.push(p);
        all.extend(p["panels"].as_array().into_iter().flatten());
    }
    all
}

/// Each query panel's `(title, exprs)`.
fn panel_exprs(dash: &Value) -> Vec<(String, Vec<String>)> {
    panels(dash)
        .into_iter()
        .filter(|p| p["type"] != "row")
        .map(|p| {
            let exprs = p["targets"].as_array().into_iter().flatten();
            let exprs = exprs.filter_map(|t| t["expr"].as_str()).filter(|e| !e.trim().is_empty());
            (p["title"].as_str().unwrap_or_default().to_owned(), exprs.map(str::to_owned).collect())
        })
        .collect()
}

/// The dashboard's variable queries (`label_values(...)`).
fn variable_queries(dash: &Value) -> Vec<String> {
    let vars = dash["templating"]["list"].as_array().into_iter().flatten();
    vars.filter(|v| v["type"] == "query")
        .filter_map(|v| v["query"]["query"].as_str().or_else(|| v["query"].as_str()).map(str::to_owned))
        .collect()
}

/// A unit file's settings as `(section, key, value)`, in order.
fn unit_settings(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            s.clone_into(&mut section);
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("{UNIT}: not `key=value`: {line}"));
        out.push((section.clone(), k.trim().to_owned(), v.trim().to_owned()));
    }
    out
}

fn setting<'a>(settings: &'a [(String, String, String)], section: &str, key: &str) -> Vec<&'a str> {
    settings.iter().filter(|(s, k, _)| s == section && k == key).map(|(_, _, v)| v.as_str()).collect()
}

/// Capability names by number (linux/capability.h).
const CAPABILITIES: [&str; 41] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The unit's `CapabilityBoundingSet=` as a bit mask (systemd silently ignores a misspelt
/// name; this does not).
fn unit_capabilities() -> u64 {
    let settings = unit_settings(&read(UNIT));
    let sets = setting(&settings, "Service", "CapabilityBoundingSet");
    assert_eq!(sets.len(), 1, "{UNIT}: one CapabilityBoundingSet= line, got {sets:?}");
    sets[0].split_whitespace().fold(0, |mask, name| {
        let bit =
            CAPABILITIES.iter().position(|c| *c == name).unwrap_or_else(|| panic!("{UNIT}: unknown {name}"));
        mask | (1 << bit)
    })
}

// ---------------------------------------------------------------------------------------------
// PromQL, as far as these checks need it: metric names, label matchers, grouping labels.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Punct(char),
    /// Numbers and durations.
    Other,
}

fn tokens(expr: &str) -> Vec<Tok> {
    let chars: Vec<char> = expr.chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            toks.push(Tok::Ident(chars[start..i].iter().collect()));
        } else if c.is_ascii_digit() || c == '.' {
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            toks.push(Tok::Other);
        } else if matches!(c, '"' | '\'' | '`') {
            let mut s = String::new();
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                if let Some(ch) = chars.get(i) {
                    s.push(*ch);
                }
                i += 1;
            }
            i += 1;
            toks.push(Tok::Str(s));
        } else {
            toks.push(Tok::Punct(c));
            i += 1;
        }
    }
    toks
}

/// What an expression asks of lbd's metrics.
#[derive(Debug, Default)]
struct Uses {
    /// Metric names (lbd's own: `lb_*`).
    metrics: BTreeSet<String>,
    /// `(metric, label, value)` of each matcher on an lbd metric; value None unless `=`.
    matchers: BTreeSet<(String, String, Option<String>)>,
    /// Labels named in `by`, `without`, `on`, `ignoring` and `group_*`.
    grouping: BTreeSet<String>,
}

impl Uses {
    fn add(&mut self, expr: &str) {
        let t = tokens(expr);
        let ident = |i: usize| match t.get(i) {
            Some(Tok::Ident(s)) => Some(s.as_str()),
            _ => None,
        };
        for i in 0..t.len() {
            let Some(name) = ident(i) else { continue };
            let opens = t.get(i + 1) == Some(&Tok::Punct('('));
            if name.starts_with("lb_") && !opens {
                self.metrics.insert(name.to_owned());
                if t.get(i + 1) == Some(&Tok::Punct('{')) {
                    self.add_matchers(name, &t[i + 2..]);
                }
            }
            let grouping = ["by", "without", "on", "ignoring", "group_left", "group_right"];
            if grouping.contains(&name) && opens {
                let labels = t[i + 2..].iter().take_while(|k| **k != Tok::Punct(')'));
                self.grouping.extend(labels.filter_map(|k| match k {
                    Tok::Ident(l) => Some(l.clone()),
                    _ => None,
                }));
            }
        }
    }

    /// `label op "value", ...}` after `metric{`.
    fn add_matchers(&mut self, metric: &str, rest: &[Tok]) {
        let body: Vec<&Tok> = rest.iter().take_while(|k| **k != Tok::Punct('}')).collect();
        for m in body.split(|k| **k == Tok::Punct(',')) {
            let Some(Tok::Ident(label)) = m.first() else { continue };
            let exact =
                matches!(m.get(1), Some(Tok::Punct('='))) && !matches!(m.get(2), Some(Tok::Punct('~')));
            let value = match m.last() {
                Some(Tok::Str(v)) if exact && !v.contains('$') => Some(v.clone()),
                _ => None,
            };
            self.matchers.insert((metric.to_owned(), label.clone(), value));
        }
    }
}

/// Labels Prometheus adds to every scraped sample.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// `/metrics` as families (`# TYPE`) and, per sample name, its labels and their values.
struct Exposition {
    families: BTreeMap<String, String>,
    samples: BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
}

impl Exposition {
    fn parse(text: &str) -> Self {
        let mut families = BTreeMap::new();
        let mut samples: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("`# TYPE name kind`");
                families.insert(name.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') && !line.is_empty() {
                let name = line.split(['{', ' ']).next().expect("a name");
                let labels = samples.entry(name.to_owned()).or_default();
                if let Some(body) = line.strip_prefix(name).and_then(|l| l.strip_prefix('{')) {
                    // The label set is `{k="v",...}` with the value in exposition-format
                    // escapes; the tokenizer reads those the same way.
                    let toks = tokens(body);
                    let mut t = toks.iter();
                    while let (Some(Tok::Ident(k)), Some(Tok::Punct('=')), Some(Tok::Str(v))) =
                        (t.next(), t.next(), t.next())
                    {
                        labels.entry(k.clone()).or_default().insert(v.clone());
                        if t.next() != Some(&Tok::Punct(',')) {
                            break;
                        }
                    }
                }
            }
        }
        Self { families, samples }
    }

    /// The family a sample name belongs to: itself, or a histogram's by its suffix.
    fn family_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        if self.families.contains_key(name) {
            return Some(name);
        }
        ["_bucket", "_sum", "_count"]
            .iter()
            .filter_map(|s| name.strip_suffix(s))
            .find(|f| self.families.get(*f).is_some_and(|k| k == "histogram"))
    }

    fn all_labels(&self) -> BTreeSet<&str> {
        let lbd = self.samples.values().flat_map(|l| l.keys().map(String::as_str));
        lbd.chain(TARGET_LABELS).collect()
    }

    /// What `uses` (from `what`) asks for that lbd does not export.
    fn missing(&self, what: &str, uses: &Uses) -> Vec<String> {
        let mut missing = Vec::new();
        for m in &uses.metrics {
            if self.family_of(m).is_none() {
                missing.push(format!("{what}: metric {m} is no family lbd declares"));
            } else if !self.samples.contains_key(m) {
                missing.push(format!("{what}: lbd declares {m} but sent no sample of it"));
            }
        }
        for (m, label, value) in &uses.matchers {
            let values = self.samples.get(m).and_then(|l| l.get(label));
            if values.is_none() && !TARGET_LABELS.contains(&label.as_str()) {
                missing.push(format!("{what}: {m} has no label {label}"));
            }
            if let (Some(values), Some(v)) = (values, value)
                && !values.contains(v)
            {
                missing.push(format!("{what}: {m} has no {label}=\"{v}\" (lbd sends {values:?})"));
            }
        }
        let all = self.all_labels();
        let unknown = uses.grouping.iter().filter(|l| !all.contains(l.as_str()));
        missing.extend(unknown.map(|l| format!("{what}: groups by label {l}, which no lbd metric has")));
        missing
    }
}

/// Labels a text template names: `$labels.NAME` (alert annotations) or `{{NAME}}` (legends).
fn template_labels(text: &str) -> BTreeSet<String> {
    let word = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    let mut labels: BTreeSet<String> = text.split("$labels.").skip(1).map(word).collect();
    for part in text.split("{{").skip(1) {
        let inner = part.split("}}").next().unwrap_or_default().trim();
        if !inner.is_empty() && word(inner) == inner {
            labels.insert(inner.to_owned());
        }
    }
    labels
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests_and_the_dashboard_queries_parse() {
    let name = "alert_rules_pass_promtool_and_their_unit_tests_and_the_dashboard_queries_parse";
    if !installed(name, "promtool", "--version", "prometheus") {
        return;
    }
    let promtool = |args: &[&str], file: &Path| {
        let (ok, text) = run(Command::new("promtool").args(args).arg(file)).expect("run promtool");
        assert!(ok, "promtool {} {} failed:\n{text}", args.join(" "), file.display());
        text
    };
    let text = promtool(&["check", "rules", "--lint-fatal"], &ops(RULES));
    let alerts = read(RULES).lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    assert!(text.contains(&format!("SUCCESS: {alerts} rules found")), "{text}");
    // Every threshold, from both sides: lb-alerts.test.yml.
    let text = promtool(&["test", "rules"], &ops(RULE_TESTS));
    assert!(text.contains("SUCCESS"), "{text}");

    // The dashboard's queries, with Grafana's variables filled in, as recording rules: promtool
    // parses them the way Prometheus will.
    let dir = TempDir::new("ops-promql");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let dash = dashboard();
    let mut n = 0;
    for (_, exprs) in panel_exprs(&dash) {
        for e in exprs {
            let e = e.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$service", ".*");
            n += 1;
            // A JSON string is a YAML double-quoted scalar.
            let _ = writeln!(rules, "      - record: dashboard:query_{n}\n        expr: {}", Value::from(e));
        }
    }
    let file = dir.write("dashboard-rules.yml", &rules);
    let text = promtool(&["check", "rules"], &file);
    assert!(text.contains(&format!("SUCCESS: {n} rules found")), "{text}");
}

#[test]
fn the_dashboard_is_json_with_a_query_in_every_panel_on_a_chosen_data_source() {
    let dash = dashboard();
    for key in ["title", "uid"] {
        assert!(dash[key].as_str().is_some_and(|s| !s.trim().is_empty()), "{DASHBOARD}: no {key}");
    }
    // Grafana refuses longer uids.
    assert!(dash["uid"].as_str().is_some_and(|u| u.len() <= 40), "{DASHBOARD}: uid too long");
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "{DASHBOARD}: schemaVersion");

    let vars = dash["templating"]["list"].as_array().expect("templating.list");
    let var = |name: &str| vars.iter().find(|v| v["name"] == name);
    let ds = var("DS_PROMETHEUS").unwrap_or_else(|| panic!("{DASHBOARD}: no DS_PROMETHEUS variable"));
    assert!(ds["type"] == "datasource" && ds["query"] == "prometheus", "{DASHBOARD}: {ds}");
    assert!(var("service").is_some(), "{DASHBOARD}: no service variable");

    let all = panels(&dash);
    let ids: BTreeSet<u64> = all.iter().filter_map(|p| p["id"].as_u64()).collect();
    assert_eq!(ids.len(), all.len(), "{DASHBOARD}: every panel needs its own id");
    let mut problems = Vec::new();
    for (title, exprs) in panel_exprs(&dash) {
        if exprs.is_empty() {
            problems.push(format!("panel `{title}` has no target with an expr"));
        }
    }
    // A data source fixed by uid would exist only on the machine the dashboard was made on.
    for p in all.iter().filter(|p| p["type"] != "row") {
        let targets = p["targets"].as_array().into_iter().flatten();
        for ds in std::iter::once(&p["datasource"]).chain(targets.map(|t| &t["datasource"])) {
            if ds["uid"] != "${DS_PROMETHEUS}" {
                problems.push(format!("panel `{}` uses data source {ds}", p["title"]));
            }
        }
    }
    assert!(problems.is_empty(), "{DASHBOARD}:\n{}", problems.join("\n"));
}

/// Runs `f` on a thread whose children get only the capabilities in `mask`, with no new
/// privileges: what `CapabilityBoundingSet=` and `NoNewPrivileges=yes` do to a root service.
fn confined<T: Send>(mask: u64, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            let last: u32 = fs::read_to_string("/proc/sys/kernel/cap_last_cap")
                .expect("cap_last_cap")
                .trim()
                .parse()
                .expect("a number");
            for cap in (0..=last).filter(|c| mask & (1 << c) == 0) {
                // SAFETY: prctl(2) on this thread's own bounding set.
                let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, libc::c_ulong::from(cap), 0, 0, 0) };
                assert_eq!(r, 0, "drop capability {cap}: {}", std::io::Error::last_os_error());
            }
            // SAFETY: prctl(2) on this thread only.
            let r = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
            assert_eq!(r, 0, "clear ambient capabilities: {}", std::io::Error::last_os_error());
            // SAFETY: as above.
            let r = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
            assert_eq!(r, 0, "no new privileges: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// The effective capabilities of process `pid`.
fn effective_capabilities(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).expect("CapEff");
    u64::from_str_radix(hex.trim(), 16).expect("hex")
}

#[test]
#[expect(clippy::too_many_lines, reason = "one lbd, confined and restarted, then every name checked")]
fn lbd_confined_like_the_unit_adopts_its_state_and_exports_all_the_rules_and_dashboard_use() {
    let test = "lbd_confined_like_the_unit_adopts_its_state_and_exports_all_the_rules_and_dashboard_use";
    if !privileged(test) {
        return;
    }
    let tag = "ops-metrics";
    let topo = DsrTopology::new(&unique_prefix(tag), 1);
    let _backend = HttpBackend::start(&topo.backends[0].ns, "backend-0", 8080);
    let dir = TempDir::new(tag);
    let pki = Pki::new(dir.path());
    let _ = pki.server("edge", &["a.example"], 20);
    // Something for every family: an HTTP service with a circuit breaker behind plain HTTP on
    // port 80 and TLS on 443 (ports only CAP_NET_BIND_SERVICE opens), and a layer-4 service
    // with a VIP.
    let reg = dir.write(
        "services.yaml",
        &format!(
            "version: 1
listeners:
  - port: 80
  - port: 443
    tls:
      certificates: [{{cert: edge.pem, key: edge.key}}]
http:
  a.example:
    health: {{enabled: false}}
    circuit_breaker: {{consecutive_errors: 5}}
    backends: [{{host: {b}, port: 8080}}]
tcp:
  l4:
    vip: {VIP}
    port: 9000
    health: {{enabled: false}}
    backends: [{{host: {b}, port: 9000}}]
",
            b = backend_ip(0)
        ),
    );

    // Started twice with only the unit's capabilities: the first leaves its balancer pinned,
    // the second adopts it, as after `systemctl restart lbd` or an upgrade.
    let caps = unit_capabilities();
    let first = confined(caps, || Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &["--on-exit", "keep"]));
    assert_eq!(effective_capabilities(first.pid()), caps, "lbd runs with the unit's capabilities");
    let stopped = first.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
    let lbd = confined(caps, || Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]));
    assert_eq!(effective_capabilities(lbd.pid()), caps);
    assert!(lbd.log().contains("adopted the pinned state"), "{}", lbd.log());

    // One answer, so the HTTP service has per-service samples with traffic in them.
    let edge = SocketAddr::from((topo.lb.ip, 80));
    let reply = topo.client.ns.run(|| Client::connect(edge)?.request("GET", "a.example", "/", "", ""));
    let reply = reply.unwrap_or_else(|e| panic!("GET through the edge: {e}\n{}", lbd.log()));
    assert_eq!(reply.status, 200, "{reply:?}");
    let metrics = lbd::admin(&topo.lb.ns, "GET", "/metrics", None);
    assert_eq!(metrics.status, 200, "{}", metrics.body);
    let exposition = Exposition::parse(&metrics.body);

    // Every name the rules and the dashboard use, with its labels and exact label values.
    let mut missing = Vec::new();
    let rules = read(RULES);
    let exprs = rule_exprs(&rules);
    let alerts = rules.lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    assert_eq!(exprs.len(), alerts, "an expr per alert in {RULES}: {exprs:#?}");
    let mut rule_uses = Uses::default();
    for e in &exprs {
        rule_uses.add(e);
    }
    assert!(rule_uses.metrics.len() >= 6, "{RULES}: the tokenizer found only {:?}", rule_uses.metrics);
    missing.extend(exposition.missing(RULES, &rule_uses));
    let dash = dashboard();
    let mut dash_uses = Uses::default();
    for (_, exprs) in panel_exprs(&dash) {
        for e in exprs {
            dash_uses.add(&e);
        }
    }
    for q in variable_queries(&dash) {
        // label_values(metric, label): the label must be on that metric.
        if let Some(args) = q.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')'))
            && let Some((metric, label)) = args.split_once(',')
        {
            dash_uses.add(metric);
            dash_uses.matchers.insert((metric.trim().to_owned(), label.trim().to_owned(), None));
        }
    }
    assert!(dash_uses.metrics.len() >= 10, "{DASHBOARD}: the tokenizer found only {:?}", dash_uses.metrics);
    missing.extend(exposition.missing(DASHBOARD, &dash_uses));
    // Labels the annotations and legends print.
    let all = exposition.all_labels();
    let legends = panels(&dash)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["legendFormat"].as_str())
        .collect::<Vec<_>>()
        .join(" ");
    for (file, text) in [(RULES, rules.as_str()), (DASHBOARD, legends.as_str())] {
        for l in template_labels(text).iter().filter(|l| !all.contains(l.as_str())) {
            missing.push(format!("{file}: prints label {l}, which no lbd metric has"));
        }
    }
    assert!(
        missing.is_empty(),
        "lbd does not export what the ops files use:\n{}\n\n/metrics:\n{}",
        missing.join("\n"),
        metrics.body
    );

    // The thresholds assume these units: seconds left (a 20-day certificate), and duration
    // buckets with bounds at 2 s and 5 s exactly.
    let left =
        lbd::metric(&topo.lb.ns, "lb_tls_certificate_expiry_seconds{listener=\"443\",name=\"a.example\"} ");
    assert!((19.0 * 86400.0..=20.0 * 86400.0).contains(&left), "{left} s left of a 20-day certificate");
    let les = &exposition.samples["lb_http_request_duration_seconds_bucket"]["le"];
    assert!(les.contains("2") && les.contains("5"), "bucket bounds {les:?}");
    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}

#[test]
fn the_systemd_unit_verifies_and_runs_lbd_with_flags_it_knows() {
    let text = read(UNIT);
    let settings = unit_settings(&text);
    let sections: BTreeSet<&str> = settings.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(sections, BTreeSet::from(["Unit", "Service", "Install"]), "{UNIT}: sections");
    let one = |key: &str| {
        let v = setting(&settings, "Service", key);
        assert_eq!(v.len(), 1, "{UNIT}: one {key}=, got {v:?}");
        v[0].to_owned()
    };
    assert_eq!(one("Type"), "notify", "lbd speaks sd_notify");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID", "SIGHUP reloads the registry");
    assert_eq!(setting(&settings, "Install", "WantedBy"), ["multi-user.target"]);
    // ProtectKernelTunables= makes all of /sys read-only: no pinning under /sys/fs/bpf.
    assert!(setting(&settings, "Service", "ProtectKernelTunables").iter().all(|v| *v == "no"));

    // Every flag of ExecStart is one lbd takes; `lb-ctl config apply` rewrites --config, so
    // its directory must stay writable under ProtectSystem=strict.
    let exec = one("ExecStart");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(words[0], "/usr/local/bin/lbd", "{exec}");
    let lbd = sibling_binary("lbd");
    let (ok, help) = run(Command::new(&lbd).arg("--help")).expect("run lbd --help");
    assert!(ok, "{help}");
    let known: BTreeSet<&str> = help
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split([' ', ',']))
        .filter(|w| w.starts_with("--"))
        .collect();
    assert!(known.contains("--config") && known.contains("--iface"), "{help}");
    let flags: Vec<&str> =
        words.iter().filter(|w| w.starts_with("--")).map(|w| w.split('=').next().unwrap_or(w)).collect();
    let unknown: Vec<&&str> = flags.iter().filter(|f| !known.contains(**f)).collect();
    assert!(unknown.is_empty(), "{UNIT}: lbd does not take {unknown:?}; it takes {known:?}");
    let config = words.iter().skip_while(|w| **w != "--config").nth(1).expect("--config FILE");
    let config_dir = Path::new(config).parent().expect("a directory").to_str().expect("UTF-8");
    let writable = setting(&settings, "Service", "ReadWritePaths").join(" ");
    assert!(writable.split_whitespace().any(|p| p.trim_start_matches('-') == config_dir), "{writable}");

    // systemd's own check, of a copy that starts the lbd built here: /usr/local/bin/lbd is
    // not installed on a build machine, and verify insists that ExecStart exists.
    if !have("systemd-analyze", "--version") {
        eprintln!("systemd-analyze is not installed: {UNIT} was only parsed, not verified by systemd");
        return;
    }
    let dir = TempDir::new("ops-unit");
    let copy = text.replace("ExecStart=/usr/local/bin/lbd ", &format!("ExecStart={} ", lbd.display()));
    assert_ne!(copy, text, "ExecStart rewritten");
    let unit = dir.write("lbd.service", &copy);
    let (ok, out) =
        run(Command::new("systemd-analyze").arg("verify").arg(&unit)).expect("run systemd-analyze");
    // Any output is a complaint (an unknown key, a value systemd ignores), even with status 0.
    assert!(ok && out.trim().is_empty(), "systemd-analyze verify {UNIT} (ExecStart rewritten):\n{out}");
}
