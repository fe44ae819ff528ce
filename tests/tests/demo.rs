//! `cargo xtask run`'s demo, as a new user meets it: its own first round of traffic and the
//! commands it prints show balanced traffic, and Ctrl-C leaves no namespace behind.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use lb_tests::{lbd::wait_exit, privileged, unique_prefix};

/// Building the topology, starting lbd and the demo's first round (at most 7 steps of 5 s).
const STARTUP_TIMEOUT: Duration = Duration::from_mins(2);
/// One pasted command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one printed shell command; returns its stdout.
fn paste(line: &str) -> String {
    let child = Command::new("sh")
        .args(["-c", line])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sh");
    let out = {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        rx.recv_timeout(COMMAND_TIMEOUT).unwrap_or_else(|_| panic!("`{line}` hung")).expect("wait")
    };
    assert!(out.status.success(), "`{line}` failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Interrupts the demo if the test fails before it does (so the demo removes what it made),
/// and waits for it to finish.
struct Interrupt(Option<libc::pid_t>);

impl Drop for Interrupt {
    fn drop(&mut self) {
        let Some(pid) = self.0.take() else { return };
        // SAFETY: kill(2) and waitpid(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGINT) };
        for _ in 0..300 {
            // SAFETY: as above; WNOHANG does not block.
            if unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } != 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The first round the demo ran itself, before its commands: every step answered, each spread
/// over the backends of its set.
fn check_first_round(banner: &[String]) {
    let round: Vec<&str> = banner
        .iter()
        .skip_while(|l| !l.starts_with("A first round"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // Steps are indented; a line saying how many failed is not.
        .filter(|l| l.starts_with("  "))
        .map(String::as_str)
        .collect();
    let shown = banner.join("\n");
    assert!(!shown.contains("FAILED"), "{shown}");
    assert_eq!(round.len(), 7, "seven steps:\n{shown}");
    let got = |i: usize| round[i].split_once(" -> ").map_or("", |(_, g)| g);
    // The 12 (the demo's `ROUND`) connections or requests of a step spread over two or more of
    // its backends.
    let spread = |i: usize, set: &str| {
        let parts: Vec<(&str, usize)> = got(i)
            .split(", ")
            .filter_map(|p| p.split_once(' ').and_then(|(who, n)| Some((who, n.parse().ok()?))))
            .collect();
        assert!(
            parts.len() >= 2
                && parts.iter().all(|(who, _)| who.starts_with(set))
                && parts.iter().map(|(_, n)| n).sum::<usize>() == 12,
            "step {i} must spread 12 over {set}*:\n{shown}"
        );
    };
    spread(0, "l");
    spread(1, "r");
    spread(2, "r");
    assert_eq!(got(3), "'hello-tcp' and 'hello-udp' came back", "{shown}");
    spread(4, "r");
    assert!(got(5).starts_with('r') && got(5).ends_with("over HTTP/2"), "{shown}");
    assert_eq!(got(6), "301 to http://app.example/docs", "{shown}");
}

#[test]
fn the_demo_balances_with_its_printed_commands_and_cleans_up_after_ctrl_c() {
    if !privileged("the_demo_balances_with_its_printed_commands_and_cleans_up_after_ctrl_c") {
        return;
    }
    let prefix = unique_prefix("lbt-demo");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_lb-demo"))
        .args(["--prefix", &prefix])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start lb-demo");
    let mut interrupt = Interrupt(Some(libc::pid_t::try_from(demo.id()).expect("pid")));
    let mut stderr = demo.stderr.take().expect("stderr");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let stdout = demo.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // Line by line, so a banner cut short still shows what the demo printed (its first round).
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let mut banner = Vec::new();
    while !banner.last().is_some_and(|l: &String| l.contains("Ctrl-C stops lbd")) {
        let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            // The guard interrupts it: the demo removes what it made on SIGINT, even mid-setup.
            drop(interrupt);
            panic!(
                "the demo printed no whole banner:\n{}\n{}",
                banner.join("\n"),
                errors.join().unwrap_or_default()
            );
        };
        banner.push(line);
    }
    check_first_round(&banner);
    let command = |start: &str| -> String {
        let line = banner.iter().find(|l| l.trim_start().starts_with(start));
        line.unwrap_or_else(|| panic!("no `{start}` command in the banner:\n{}", banner.join("\n")))
            .trim()
            .to_owned()
    };

    let containing = |part: &str| -> String {
        let line = banner.iter().find(|l| l.contains(part));
        line.unwrap_or_else(|| panic!("no command with `{part}` in the banner:\n{}", banner.join("\n")))
            .trim()
            .to_owned()
    };
    // Each mode's loop is answered 12 times, by more than one backend of its own set.
    for (part, set) in
        [("100.1/;", "backend l"), ("100.1:8080/;", "backend r"), ("[fd20:100::1]/;", "backend r")]
    {
        let answers = paste(&containing(part));
        let backends: BTreeSet<&str> = answers.lines().filter(|l| l.starts_with(set)).collect();
        assert_eq!(answers.lines().count(), 12, "every request is answered:\n{answers}");
        assert!(
            backends.len() >= 2 && answers.lines().all(|l| l.starts_with(set)),
            "`{part}` must be spread over {set}*:\n{answers}"
        );
    }
    assert_eq!(paste(&command("echo hello-tcp")).trim(), "hello-tcp");
    assert_eq!(paste(&command("echo hello-udp")).trim(), "hello-udp");
    let own = banner.iter().skip_while(|l| !l.contains("# the lb node's own address")).nth(1);
    assert!(paste(own.expect("the lb node's own server command").trim()).starts_with("the lb node itself"));
    // The HTTP edge: six answers from the routed backends, and the www. redirect.
    let answers = paste(&containing("Host: app.example"));
    let backends: BTreeSet<&str> = answers.lines().filter(|l| l.starts_with("backend r")).collect();
    assert_eq!(answers.lines().count(), 6, "every request is answered:\n{answers}");
    assert!(backends.len() >= 2 && answers.lines().all(|l| l.starts_with("backend r")), "{answers}");
    let redirect = paste(&containing("Host: www.app.example"));
    assert!(redirect.starts_with("HTTP/1.1 301"), "{redirect}");
    assert!(redirect.to_ascii_lowercase().contains("location: http://app.example/docs"), "{redirect}");
    // Over TLS, lb's certificate checked against the demo's CA (HTTP/2 is checked in the first
    // round: this command prints only the body).
    let https = paste(&containing("--http2 --cacert"));
    assert!(https.starts_with("backend r"), "{https}");

    interrupt.0 = None;
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(libc::pid_t::try_from(demo.id()).expect("pid"), libc::SIGINT) };
    let status = wait_exit(demo, SHUTDOWN_TIMEOUT).expect("the demo exits after Ctrl-C");
    let log = errors.join().unwrap_or_default();
    assert!(status.success(), "the demo must exit 0 after Ctrl-C:\n{log}");
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!left.iter().any(|n| n.starts_with(&prefix)), "namespaces left behind: {left:?}");
}
