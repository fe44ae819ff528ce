//! lb-ctl: the operator CLI. See `lb-ctl --help`.
//!
//! Exit status, for scripts: 0 success; 1 lbd unreachable or failed; 2 a registry is invalid;
//! 3 a named service, backend or VIP does not exist; 4 a rollout was aborted (and the
//! registry restored).

use std::{
    fmt::Write as _,
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{CommandFactory as _, Parser, Subcommand};
use lb_userspace::{
    client::{self, Reply},
    config::{self, ConfigError, Registry},
    logging::error_chain,
};
use serde_json::Value;

const EXIT_FAILURE: u8 = 1;
const EXIT_INVALID: u8 = 2;
const EXIT_UNKNOWN: u8 = 3;
const EXIT_ABORTED: u8 = 4;

#[derive(Parser)]
#[command(version, about = "lb operator CLI: talks to lbd's admin API")]
struct Cli {
    /// lbd's admin API address.
    #[arg(long, global = true, default_value = "127.0.0.1:9180", env = "LB_ADMIN")]
    admin: SocketAddr,
    /// Bound on each request to lbd.
    #[arg(long, global = true, value_parser = humantime::parse_duration, default_value = "30s")]
    timeout: Duration,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Services, backends, health, weights, counters, and the last reload.
    Status {
        /// The full status document as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Registry files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Take a backend out of new flows, or put it back (until lbd restarts).
    #[command(subcommand)]
    Backend(BackendCommand),
    /// Which backend a flow goes to, and why.
    Lookup {
        /// Client address and port, e.g. 10.0.0.5:40000 or [`fd00::5`]:40000.
        #[arg(long)]
        src: SocketAddr,
        /// VIP and port, e.g. 10.20.100.1:80.
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long, default_value = "tcp")]
        proto: String,
    },
    /// Replace a service's backends batch by batch.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// TLS certificates the HTTP edge serves.
    #[command(subcommand)]
    Ssl(SslCommand),
    /// Print the registry's JSON Schema (for editors: `# yaml-language-server: $schema=FILE`).
    Schema,
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check a registry file without applying it; lists every problem with `file:line:column`.
    Validate {
        /// Registry file (YAML).
        file: PathBuf,
    },
    /// Validate a registry, replace lbd's registry with it atomically, reload, and report.
    Apply {
        #[arg(long)]
        file: PathBuf,
        /// Only ask lbd to validate it (as its registry file, includes and all).
        #[arg(long)]
        validate: bool,
    },
}

#[derive(Subcommand)]
enum BackendCommand {
    /// No new flows to BACKEND (host:port) of SERVICE; tracked flows continue.
    Drain { service: String, backend: String },
    /// Undo a drain.
    Enable { service: String, backend: String },
}

#[derive(Subcommand)]
enum SslCommand {
    /// Replace a served certificate under load: lbd checks the pair, writes it over the
    /// configured files (so a restart keeps it) and reloads; new handshakes use it at once.
    Update {
        /// The new chain, PEM, leaf first.
        #[arg(long)]
        cert: PathBuf,
        /// Its private key, PEM.
        #[arg(long)]
        key: PathBuf,
        /// Which certificate to replace (its registry `name`, else its first DNS name);
        /// default: those sharing a DNS name with the new one.
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Add the new backends a batch at a time; once a batch is healthy, drain and remove as
    /// many old ones. Any failure restores the registry as it was.
    Start {
        #[arg(long)]
        service: String,
        /// The new backends, "host:port,host:port,...".
        #[arg(long, value_delimiter = ',')]
        new_backends: Vec<String>,
        #[arg(long, default_value_t = 1)]
        batch_size: usize,
        /// Wait between a batch's drain and its removal, and between batches.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        interval: Duration,
        /// Bound on a batch becoming healthy.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        health_timeout: Duration,
    },
}

struct Ctl {
    admin: SocketAddr,
    timeout: Duration,
}

/// A failure with the exit code it maps to.
struct Fail(u8, String);

impl Ctl {
    fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<Reply, Fail> {
        client::request(self.admin, method, path, body, self.timeout)
            .map_err(|e| Fail(EXIT_FAILURE, error_chain(&e)))
    }

    fn json(&self, method: &str, path: &str, body: Option<&str>) -> Result<Value, Fail> {
        let r = self.call(method, path, body)?;
        let v = r.json();
        match r.status {
            200 => Ok(v),
            404 => Err(Fail(EXIT_UNKNOWN, v["error"].as_str().unwrap_or(&r.body).to_owned())),
            422 => Err(Fail(EXIT_INVALID, v["error"].as_str().unwrap_or(&r.body).to_owned())),
            s => Err(Fail(
                EXIT_FAILURE,
                format!("lbd answered {s}: {}", v["error"].as_str().unwrap_or(&r.body)),
            )),
        }
    }

    fn status(&self) -> Result<Value, Fail> {
        self.json("GET", "/lb-status", None)
    }

    fn apply_text(&self, text: &str, validate_only: bool) -> Result<Value, Fail> {
        let path = if validate_only { "/config?validate_only=1" } else { "/config" };
        self.json("POST", path, Some(text))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctl = Ctl { admin: cli.admin, timeout: cli.timeout };
    let result = match cli.command {
        Command::Status { json } => status(&ctl, json),
        Command::Config(ConfigCommand::Validate { file }) => validate(&file),
        Command::Config(ConfigCommand::Apply { file, validate }) => apply(&ctl, &file, validate),
        Command::Backend(BackendCommand::Drain { service, backend }) => drain(&ctl, &service, &backend, true),
        Command::Backend(BackendCommand::Enable { service, backend }) => {
            drain(&ctl, &service, &backend, false)
        }
        Command::Lookup { src, dst, proto } => lookup(&ctl, src, dst, &proto),
        Command::Rollout(RolloutCommand::Start {
            service,
            new_backends,
            batch_size,
            interval,
            health_timeout,
        }) => rollout(&ctl, &service, &new_backends, batch_size.max(1), interval, health_timeout),
        Command::Ssl(SslCommand::Update { cert, key, name }) => {
            ssl_update(&ctl, &cert, &key, name.as_deref())
        }
        Command::Schema => {
            let schema = schemars::schema_for!(Registry);
            println!("{}", serde_json::to_string_pretty(&schema).unwrap_or_default());
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "lb-ctl", &mut std::io::stdout());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(code, message)) => {
            eprintln!("lb-ctl: {message}");
            ExitCode::from(code)
        }
    }
}

fn validate(file: &std::path::Path) -> Result<(), Fail> {
    match config::load(file) {
        Ok(l) => {
            println!(
                "{}: valid ({} http, {} tcp services, {} files)",
                file.display(),
                l.registry.http.len(),
                l.registry.tcp.len(),
                l.files.len()
            );
            Ok(())
        }
        Err(e @ ConfigError::Invalid(_)) => Err(Fail(EXIT_INVALID, format!("invalid registry:\n{e}"))),
        Err(e) => Err(Fail(EXIT_FAILURE, error_chain(&e))),
    }
}

fn apply(ctl: &Ctl, file: &std::path::Path, validate_only: bool) -> Result<(), Fail> {
    // Checked here first so problems name the operator's file, not lbd's.
    validate(file)?;
    let text =
        std::fs::read_to_string(file).map_err(|e| Fail(EXIT_FAILURE, format!("{}: {e}", file.display())))?;
    let r =
        ctl.call("POST", if validate_only { "/config?validate_only=1" } else { "/config" }, Some(&text))?;
    let v = r.json();
    match r.status {
        200 if validate_only => {
            println!("lbd accepts it (not applied)");
            Ok(())
        }
        200 => {
            let changed = if v["changed"] == true { "applied" } else { "unchanged" };
            println!("{changed}: generation {}", v["generation"]);
            Ok(())
        }
        422 => {
            Err(Fail(EXIT_INVALID, format!("lbd refused it:\n{}", v["error"].as_str().unwrap_or(&r.body))))
        }
        s => Err(Fail(EXIT_FAILURE, format!("lbd answered {s}: {}", v["error"].as_str().unwrap_or(&r.body)))),
    }
}

fn ssl_update(
    ctl: &Ctl,
    cert: &std::path::Path,
    key: &std::path::Path,
    name: Option<&str>,
) -> Result<(), Fail> {
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p).map_err(|e| Fail(EXIT_FAILURE, format!("{}: {e}", p.display())))
    };
    let body = serde_json::json!({ "cert": read(cert)?, "key": read(key)?, "name": name });
    let v = ctl.json("POST", "/ssl/update", Some(&body.to_string()))?;
    let until = v["not_after_unix"]
        .as_u64()
        .map(|t| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(t)).to_string()
        })
        .unwrap_or_default();
    for u in v["updated"].as_array().into_iter().flatten() {
        println!(
            "listener {}: {} replaced ({})",
            u["listener"],
            u["name"].as_str().unwrap_or(""),
            u["cert"].as_str().unwrap_or("")
        );
    }
    println!("valid until {until}; generation {}", v["generation"]);
    Ok(())
}

fn drain(ctl: &Ctl, service: &str, backend: &str, drained: bool) -> Result<(), Fail> {
    let verb = if drained { "drain" } else { "enable" };
    let path = format!("/backends/{verb}?service={}&backend={}", encode(service), encode(backend));
    ctl.json("POST", &path, None)?;
    println!("{service}/{backend}: {}", if drained { "drained" } else { "enabled" });
    Ok(())
}

fn lookup(ctl: &Ctl, src: SocketAddr, dst: SocketAddr, proto: &str) -> Result<(), Fail> {
    let path = format!(
        "/lookup?src={}&sport={}&dst={}&dport={}&proto={}",
        encode(&src.ip().to_string()),
        src.port(),
        encode(&dst.ip().to_string()),
        dst.port(),
        encode(proto)
    );
    let v = ctl.json("GET", &path, None)?;
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(())
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn status(ctl: &Ctl, json: bool) -> Result<(), Fail> {
    let v = ctl.status()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(());
    }
    let mut out = String::new();
    let reload = match &v["last_reload"] {
        Value::Null => "none since start".to_owned(),
        r if r["ok"] == true => "ok".to_owned(),
        r => {
            let first = r["problems"][0]["text"].as_str().or(r["error"].as_str()).unwrap_or("?");
            format!("FAILED (the previous registry serves): {first}")
        }
    };
    let _ = write!(
        out,
        "generation {}  file {}  iface {}  reloads ok {} failed {}\nlast reload: {reload}\n\n",
        v["generation"],
        v["config_file"].as_str().unwrap_or("?"),
        v["iface"].as_str().unwrap_or("?"),
        v["reloads"]["ok"],
        v["reloads"]["failed"]
    );
    let mut rows = vec![
        ["SERVICE", "ENTRY", "SERVING", "BACKEND", "ROLE", "HEALTH", "WEIGHT", "PACKETS", "NOTE"]
            .map(str::to_owned),
    ];
    // A table cell: "-" for nothing.
    let s = |v: &Value| if v.is_null() { "-".to_owned() } else { text(v) };
    for svc in v["services"].as_array().into_iter().flatten() {
        let entry = match (&svc["vip"], &svc["port"]) {
            (Value::String(vip), p) => format!("{vip}:{} {}", p, s(&svc["mode"])),
            _ => svc["kind"].as_str().unwrap_or("").to_owned(),
        };
        for b in svc["backends"].as_array().into_iter().flatten() {
            let weight = match &b["table_weight"] {
                Value::Null => s(&b["weight"]),
                w => format!("{}/{}", w, b["weight"]),
            };
            let health =
                if b["drained"] == true { format!("{} drained", s(&b["health"])) } else { s(&b["health"]) };
            rows.push([
                s(&svc["name"]),
                entry.clone(),
                s(&svc["serving"]),
                s(&b["backend"]),
                s(&b["role"]),
                health,
                weight,
                s(&b["packets"]),
                b["reason"].as_str().or(b["last_error"].as_str()).unwrap_or("").to_owned(),
            ]);
        }
    }
    let widths: Vec<usize> = (0..9).map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0)).collect();
    for r in &rows {
        let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}

/// The service's backend list in a registry document, wherever it is.
fn backends_of<'a>(
    doc: &'a mut serde_yaml_ng::Value,
    service: &str,
) -> Option<&'a mut Vec<serde_yaml_ng::Value>> {
    for section in ["tcp", "http"] {
        let found = doc.get(section).and_then(|s| s.get(service)).is_some();
        if found {
            return doc.get_mut(section)?.get_mut(service)?.get_mut("backends")?.as_sequence_mut();
        }
    }
    None
}

fn backend_value(host: &str, port: u16, weight: Option<u32>) -> serde_yaml_ng::Value {
    let mut m = serde_yaml_ng::Mapping::new();
    m.insert("host".into(), host.into());
    m.insert("port".into(), u64::from(port).into());
    if let Some(w) = weight {
        m.insert("weight".into(), u64::from(w).into());
    }
    serde_yaml_ng::Value::Mapping(m)
}

fn identity(v: &serde_yaml_ng::Value) -> String {
    format!("{}:{}", v["host"].as_str().unwrap_or(""), v["port"].as_u64().unwrap_or(0))
}

fn split_host_port(s: &str) -> Result<(String, u16), Fail> {
    let bad = || Fail(EXIT_FAILURE, format!("`{s}` is not host:port"));
    let (h, p) = s.rsplit_once(':').ok_or_else(bad)?;
    let h = h.trim_start_matches('[').trim_end_matches(']');
    Ok((h.to_owned(), p.parse().map_err(|_| bad())?))
}

/// Batch by batch: add new backends, wait until they are healthy, drain as many old ones,
/// wait, remove them. Each step is a registry apply through lbd.
fn rollout(
    ctl: &Ctl,
    service: &str,
    new: &[String],
    batch: usize,
    interval: Duration,
    health_timeout: Duration,
) -> Result<(), Fail> {
    let original = ctl.call("GET", "/config", None)?;
    if original.status != 200 {
        return Err(Fail(EXIT_FAILURE, format!("cannot read lbd's registry: {}", original.body)));
    }
    let original = original.body;
    let mut doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&original).map_err(|e| Fail(EXIT_FAILURE, format!("lbd's registry: {e}")))?;
    let old: Vec<String> = backends_of(&mut doc, service)
        .ok_or_else(|| {
            Fail(
                EXIT_UNKNOWN,
                format!("no service `{service}` in lbd's root registry file (rollouts edit that file)"),
            )
        })?
        .iter()
        .map(identity)
        .collect();
    let new: Vec<(String, u16)> = new.iter().map(|s| split_host_port(s)).collect::<Result<_, _>>()?;
    let restore = |why: String| -> Fail {
        match ctl.apply_text(&original, false) {
            Ok(_) => Fail(EXIT_ABORTED, format!("rollout aborted, registry restored: {why}")),
            Err(Fail(_, e)) => {
                Fail(EXIT_FAILURE, format!("rollout aborted ({why}) and the restore failed: {e}"))
            }
        }
    };
    let mut retiring: Vec<String> =
        old.iter().filter(|o| !new.iter().any(|(h, p)| **o == format!("{h}:{p}"))).cloned().collect();
    let apply = |doc: &serde_yaml_ng::Value| -> Result<(), Fail> {
        let text = serde_yaml_ng::to_string(doc).map_err(|e| Fail(EXIT_FAILURE, e.to_string()))?;
        ctl.apply_text(&text, false).map(|_| ())
    };
    for (n, chunk) in new.chunks(batch).enumerate() {
        println!(
            "batch {}: adding {}",
            n + 1,
            chunk.iter().map(|(h, p)| format!("{h}:{p}")).collect::<Vec<_>>().join(", ")
        );
        let list = backends_of(&mut doc, service).ok_or_else(|| restore("service vanished".into()))?;
        for (h, p) in chunk {
            if !list.iter().any(|b| identity(b) == format!("{h}:{p}")) {
                list.push(backend_value(h, *p, None));
            }
        }
        apply(&doc).map_err(|Fail(_, e)| restore(e))?;
        wait_healthy(ctl, service, chunk, health_timeout).map_err(restore)?;
        let take: Vec<String> = retiring.drain(..batch.min(retiring.len())).collect();
        retire(&mut doc, service, &take, interval, &apply).map_err(|Fail(_, e)| restore(e))?;
    }
    // More old backends than new ones: retire the rest.
    let rest: Vec<String> = std::mem::take(&mut retiring);
    retire(&mut doc, service, &rest, interval, &apply).map_err(|Fail(_, e)| restore(e))?;
    println!("rollout of {service} done");
    Ok(())
}

/// Drains `take` (weight 0: tracked flows finish), waits `interval`, removes them.
fn retire(
    doc: &mut serde_yaml_ng::Value,
    service: &str,
    take: &[String],
    interval: Duration,
    apply: &dyn Fn(&serde_yaml_ng::Value) -> Result<(), Fail>,
) -> Result<(), Fail> {
    if take.is_empty() {
        return Ok(());
    }
    println!("draining {}", take.join(", "));
    let list = backends_of(doc, service).ok_or_else(|| Fail(EXIT_FAILURE, "service vanished".into()))?;
    for b in list.iter_mut().filter(|b| take.contains(&identity(b))) {
        if let Some(m) = b.as_mapping_mut() {
            m.insert("weight".into(), 0u64.into());
        }
    }
    apply(doc)?;
    std::thread::sleep(interval);
    let list = backends_of(doc, service).ok_or_else(|| Fail(EXIT_FAILURE, "service vanished".into()))?;
    list.retain(|b| !take.contains(&identity(b)));
    apply(doc)?;
    println!("removed {}", take.join(", "));
    Ok(())
}

fn wait_healthy(ctl: &Ctl, service: &str, chunk: &[(String, u16)], timeout: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let v = ctl.status().map_err(|Fail(_, e)| e)?;
        let svc = v["services"].as_array().into_iter().flatten().find(|s| s["name"] == service).cloned();
        let Some(svc) = svc else { return Err(format!("service `{service}` not in lbd's status")) };
        let health = |id: &str| {
            svc["backends"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["backend"] == id)
                .map(|b| text(&b["health"]))
        };
        let states: Vec<(String, String)> = chunk
            .iter()
            .map(|(h, p)| (format!("{h}:{p}"), health(&format!("{h}:{p}")).unwrap_or_default()))
            .collect();
        if states.iter().all(|(_, st)| st == "up" || st == "unchecked") {
            return Ok(());
        }
        if start.elapsed() > timeout {
            let bad: Vec<String> =
                states.iter().filter(|(_, st)| st != "up").map(|(b, st)| format!("{b} is {st}")).collect();
            return Err(format!("not healthy within {timeout:?}: {}", bad.join(", ")));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A JSON value as plain text: strings unquoted.
fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}
