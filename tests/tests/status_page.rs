//! The status page in a real browser: Debian's headless Chromium, run inside lbd's namespace,
//! loads `/` from the admin listener; the test reads the DOM after the page's script ran
//! (`--dump-dom` after a budget of virtual time) and keeps screenshots under `target/`.

use std::{
    fs,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use lb_tests::{
    http::{HttpBackend, get},
    installed,
    lbd::{ADMIN, Lbd, TempDir, backend_status, wait_status},
    netns::NetNs,
    pki::Pki,
    privileged,
    topology::{DsrTopology, VIP, backend_ip},
    unique_prefix,
};

const CHROMIUM: &str = "/usr/bin/chromium";
/// The page's refresh interval in these tests (`?refresh=`), and the virtual time Chromium
/// lets pass before it dumps: several fetches, so the rates have two samples to compare.
const REFRESH_MS: u32 = 300;
const VIRTUAL_TIME_MS: u32 = 3000;
/// Bound on one Chromium run, in real time.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);
/// Chromium runs before a page that never finished a render fails the test.
const RENDER_TRIES: usize = 3;
/// How much of Chromium's stderr a failure shows.
const TAIL_BYTES: usize = 2000;
/// The screenshot's window, and the least a PNG of a drawn page of that size weighs.
const WINDOW: (u32, u32) = (1280, 900);
const MIN_PNG_BYTES: u64 = 20 << 10;
const EDGE: u16 = 8000;
const TLS: u16 = 8443;
/// The edge certificate's validity: under the page's 30-day warning.
const CERT_DAYS: u32 = 20;
const BACKEND: u16 = 8080;

/// Headless Chromium with its profile and home under `dir`, in `ns` when given.
struct Browser<'a> {
    ns: Option<&'a NetNs>,
    home: PathBuf,
}

impl<'a> Browser<'a> {
    fn new(ns: Option<&'a NetNs>, dir: &TempDir) -> Self {
        let home = dir.path().join("chromium");
        fs::create_dir_all(&home).expect("chromium home");
        Self { ns, home }
    }

    /// Runs Chromium on `url` with `args`, bounded by [`BROWSER_TIMEOUT`]; its output.
    fn run(&self, args: &[String], url: &str) -> Output {
        let mut cmd = self.ns.map_or_else(|| Command::new(CHROMIUM), |ns| ns.command(CHROMIUM));
        cmd.args([
            "--headless=new",
            // Root, and no user namespaces to sandbox in here.
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            &format!("--virtual-time-budget={VIRTUAL_TIME_MS}"),
        ])
        .arg(format!("--user-data-dir={}", self.home.join("profile").display()))
        .args(args)
        .arg(url)
        .env("HOME", &self.home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a hung run is killed with all its helper processes.
        .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {CHROMIUM}: {e}"));
        let group = libc::pid_t::try_from(child.id()).expect("pid");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        if let Ok(out) = rx.recv_timeout(BROWSER_TIMEOUT) {
            return out.expect("wait for chromium");
        }
        // SAFETY: kill(2) on the process group of our own child, not yet reaped.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = rx.recv();
        panic!("chromium did not finish {url} within {BROWSER_TIMEOUT:?}");
    }

    /// The DOM of `url` once the page rendered a status (`data-updated` on `<body>`).
    fn dom(&self, url: &str) -> String {
        let mut last = String::new();
        for _ in 0..RENDER_TRIES {
            let out = self.run(&["--dump-dom".to_owned()], url);
            let dom = String::from_utf8_lossy(&out.stdout).into_owned();
            if out.status.success() && body_tag(&dom).contains("data-updated=") {
                return dom;
            }
            last = format!("{dom}\n{}", tail(&String::from_utf8_lossy(&out.stderr)));
        }
        panic!("{url} rendered no status in {RENDER_TRIES} runs:\n{last}")
    }

    /// A screenshot of `url` in a [`WINDOW`]-sized window, written to `to`.
    fn screenshot(&self, url: &str, to: &Path) {
        let out = self.run(
            &[format!("--screenshot={}", to.display()), format!("--window-size={},{}", WINDOW.0, WINDOW.1)],
            url,
        );
        assert!(out.status.success(), "screenshot of {url}: {}", tail(&String::from_utf8_lossy(&out.stderr)));
        check_png(to);
    }
}

/// The end of Chromium's chatty stderr, for a failure message.
fn tail(s: &str) -> &str {
    let mut at = s.len().saturating_sub(TAIL_BYTES);
    while !s.is_char_boundary(at) {
        at += 1;
    }
    &s[at..]
}

fn body_tag(dom: &str) -> &str {
    let at = dom.find("<body").unwrap_or(dom.len());
    &dom[at..dom[at..].find('>').map_or(dom.len(), |e| at + e)]
}

/// The element `<tag ...>...</tag>` whose opening tag holds `marker` (no nesting of the
/// same tag inside: rows, and sections that hold no sections).
fn element<'d>(dom: &'d str, tag: &str, marker: &str) -> Option<&'d str> {
    let at = dom.find(marker)?;
    let start = dom[..at].rfind(&format!("<{tag}"))?;
    let end = at + dom[at..].find(&format!("</{tag}>"))? + tag.len() + 3;
    Some(&dom[start..end])
}

/// The row of backend `b` in a service's section.
fn row<'s>(section: &'s str, b: &str) -> &'s str {
    element(section, "tr", &format!("data-backend=\"{b}\""))
        .unwrap_or_else(|| panic!("no row {b}: {section}"))
}

/// An attribute's value in `element`'s opening tag.
fn attr<'e>(element: &'e str, name: &str) -> Option<&'e str> {
    let open = &element[..element.find('>')?];
    let from = open.find(&format!(" {name}=\""))? + name.len() + 3;
    Some(&open[from..from + open[from..].find('"')?])
}

/// The text of the element that holds `attr` (the rate cells have no markup inside).
fn text_of<'d>(dom: &'d str, attr: &str) -> Option<&'d str> {
    let at = dom.find(attr)?;
    let from = at + dom[at..].find('>')? + 1;
    Some(&dom[from..from + dom[from..].find('<')?])
}

/// A real PNG of the window's size, with something drawn in it.
fn check_png(p: &Path) {
    let png = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", p.display());
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("four bytes"));
    assert_eq!(&png[12..16], b"IHDR", "{}", p.display());
    assert_eq!((be(16), be(20)), WINDOW, "{} size", p.display());
    let size = png.len() as u64;
    assert!(size > MIN_PNG_BYTES, "{} is {size} bytes: a blank page?", p.display());
}

/// `target/` (the test executable lives in `target/<profile>/deps`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.ancestors().nth(3).expect("target dir").to_owned()
}

/// An HTTP service over a running backend and one where nothing listens, with a circuit
/// breaker, on a plain and a TLS listener; and an L4 service in XDP over the running backend.
/// `{bad}` goes into the second backend (an invalid field breaks the registry).
fn registry(bad: &str) -> String {
    format!(
        "version: 1
listeners:
  - {{port: {EDGE}}}
  - {{port: {TLS}, tls: {{certificates: [{{cert: edge.pem, key: edge.key}}]}}}}
http:
  example.org:
    health: {{interval: 200ms, timeout: 150ms, fall: 1, rise: 1}}
    circuit_breaker: {{}}
    backends:
      - {{host: {b0}, port: {BACKEND}}}
      - {{host: {b1}, port: {BACKEND}{bad}}}
tcp:
  web:
    vip: {VIP}
    port: {BACKEND}
    backends: [{{host: {b0}, port: {BACKEND}}}]
",
        b0 = backend_ip(0),
        b1 = backend_ip(1),
    )
}

#[test]
fn the_status_page_shows_services_health_circuits_rates_and_reload_errors_in_a_browser() {
    let name = "the_status_page_shows_services_health_circuits_rates_and_reload_errors_in_a_browser";
    if !privileged(name) || !installed(name, CHROMIUM, "--version", "chromium") {
        return;
    }
    let tag = "status-page";
    let topo = DsrTopology::new(&unique_prefix(tag), 2);
    // Backend 1 runs nothing: its checks are refused and it shows down.
    let backend = HttpBackend::start(&topo.backends[0].ns, "backend-0", BACKEND);
    let dir = TempDir::new(tag);
    let _ = Pki::new(dir.path()).server("edge", &["example.org"], CERT_DAYS);
    let reg = dir.write("services.yaml", &registry(""));
    let lbd = Lbd::start(&topo.lb.ns, &dir, &reg, "eth0", &[]);
    let lb = &topo.lb.ns;
    let up = format!("{}:{BACKEND}", backend_ip(0));
    let dead = format!("{}:{BACKEND}", backend_ip(1));
    let health = |s: &serde_json::Value, svc: &str, b: &str| {
        backend_status(s, svc, b).map(|b| b["health"].clone()).unwrap_or_default()
    };
    wait_status(lb, "backend 0 up, backend 1 down", |s| {
        health(s, "example.org", &up) == "up"
            && health(s, "example.org", &dead) == "down"
            && health(s, "web", &up) == "up"
    });

    // Requests through the edge and through XDP, so the counters have something to show.
    let requests = 10;
    topo.client.ns.run(|| {
        for i in 0..requests {
            let r = get(SocketAddr::from((topo.lb.ip, EDGE)), "example.org", &format!("/{i}")).expect("edge");
            assert_eq!(r.status, 200, "{r:?}");
            let r = get(SocketAddr::from((VIP, BACKEND)), "web", "/").expect("vip");
            assert_eq!(r.body, "backend-0\n", "{r:?}");
        }
    });
    assert_eq!(backend.state.requests(), 2 * requests);

    let browser = Browser::new(Some(lb), &dir);
    let url = format!("http://{ADMIN}/?refresh={REFRESH_MS}");
    let dom = browser.dom(&url);
    let ctx = || format!("DOM:\n{dom}\nlbd:\n{}", lbd.log());
    assert!(!dom.contains("id=\"unreachable\""), "lbd is up: {}", ctx());
    assert!(!dom.contains("id=\"render-error\""), "{}", ctx());
    assert!(!dom.contains("id=\"reload-errors\""), "the last reload was fine: {}", ctx());

    let http =
        element(&dom, "section", "data-service=\"example.org\"").unwrap_or_else(|| panic!("{}", ctx()));
    assert_eq!(attr(http, "data-kind"), Some("http"));
    let (r0, r1) = (row(http, &up), row(http, &dead));
    assert_eq!((attr(r0, "data-health"), attr(r0, "data-circuit")), (Some("up"), Some("closed")), "{r0}");
    assert_eq!((attr(r1, "data-health"), attr(r1, "data-circuit")), (Some("down"), Some("closed")), "{r1}");
    assert!(r0.contains(">up</span>") && r1.contains(">down</span>"), "health is written out: {r0}\n{r1}");
    assert_eq!(attr(r0, "data-drained"), Some("false"));
    assert_eq!(text_of(r0, "data-requests=").map(str::trim), Some(requests.to_string().as_str()), "{r0}");
    let rps = text_of(http, "data-rate=\"requests\"").unwrap_or_else(|| panic!("{}", ctx()));
    assert!(rps.parse::<f64>().is_ok_and(|r| r >= 0.0), "request rate {rps:?}: {http}");
    assert!(http.contains("data-class=\"2xx\""), "{http}");

    let l4 = element(&dom, "section", "data-service=\"web\"").unwrap_or_else(|| panic!("{}", ctx()));
    assert_eq!(attr(l4, "data-kind"), Some("tcp"));
    assert_eq!(attr(row(l4, &up), "data-health"), Some("up"));
    let pps = text_of(l4, "data-rate=\"packets\"").unwrap_or_else(|| panic!("{}", ctx()));
    assert!(pps.parse::<f64>().is_ok_and(|r| r >= 0.0), "packet rate {pps:?}: {l4}");

    let cert = element(&dom, "tr", "data-certificate=\"example.org\"").unwrap_or_else(|| panic!("{}", ctx()));
    assert_eq!(attr(cert, "data-listener"), Some(TLS.to_string().as_str()), "{cert}");
    let left = element(cert, "td", "data-days-left=").expect("days left");
    assert!(
        attr(left, "data-days-left")
            .and_then(|d| d.parse::<u32>().ok())
            .is_some_and(|d| (CERT_DAYS - 1..=CERT_DAYS).contains(&d)),
        "{CERT_DAYS} days: {cert}"
    );
    assert!(left.contains("pill warn"), "under 30 days is a warning: {cert}");

    let last = element(&dom, "span", "id=\"last-reload\"").unwrap_or_else(|| panic!("{}", ctx()));
    assert!(attr(last, "data-ok").is_some_and(|v| v == "true" || v == "none"), "{last}");

    let shots = target_dir();
    browser.screenshot(&url, &shots.join("status-page.png"));

    // A broken registry: the page names the file, line and field, and escapes the text (the
    // field's name is markup).
    let bad_field = "<i>prot</i>";
    let broken = registry(&format!(", \"{bad_field}\": 1"));
    let line = broken.lines().position(|l| l.contains(bad_field)).expect("the bad line") + 1;
    dir.replace("services.yaml", &broken);
    assert_eq!(lbd.wait_reload(), "reload failed", "{}", lbd.log());
    let dom = browser.dom(&url);
    let errors = element(&dom, "section", "id=\"reload-errors\"")
        .unwrap_or_else(|| panic!("no #reload-errors after a failed reload:\n{dom}"));
    assert!(errors.contains(&format!("services.yaml:{line}:")), "file and line {line}: {errors}");
    assert!(errors.contains("http.example.org.backends[1]"), "the field: {errors}");
    assert!(errors.contains("&lt;i&gt;prot&lt;/i&gt;"), "the field's name as text: {errors}");
    assert!(!dom.contains(bad_field), "markup from the registry reached the DOM: {errors}");
    let last = element(&dom, "span", "id=\"last-reload\"").expect("#last-reload");
    assert_eq!(attr(last, "data-ok"), Some("false"), "{last}");
    assert!(dom.contains("data-service=\"example.org\""), "the served services stay on the page");
    browser.screenshot(&url, &shots.join("status-page-reload-failed.png"));
    eprintln!("screenshots: {}", shots.join("status-page*.png").display());

    let stopped = lbd.stop(libc::SIGTERM);
    assert!(stopped.status.success(), "{}", stopped.log);
}

#[test]
fn the_status_page_says_lbd_is_unreachable_when_it_cannot_read_the_status() {
    let name = "the_status_page_says_lbd_is_unreachable_when_it_cannot_read_the_status";
    if !installed(name, CHROMIUM, "--version", "chromium") {
        return;
    }
    // Opened as a file, the page's fetch of /lb-status fails as it would with lbd gone.
    let page = Path::new(env!("CARGO_MANIFEST_DIR")).join("../lb-userspace/src/status.html");
    let page = page.canonicalize().expect("the page's source");
    let dir = TempDir::new("status-page-unreachable");
    let browser = Browser::new(None, &dir);
    let url = format!("file://{}?refresh={REFRESH_MS}", page.display());
    let out = browser.run(&["--dump-dom".to_owned()], &url);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", tail(&String::from_utf8_lossy(&out.stderr)));
    let banner = element(&dom, "div", "id=\"unreachable\"").unwrap_or_else(|| panic!("no banner:\n{dom}"));
    assert!(banner.contains("lbd unreachable"), "{banner}");
    assert!(!body_tag(&dom).contains("data-updated="), "nothing was rendered: {dom}");
}
