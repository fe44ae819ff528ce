//! Child processes a test starts (wrk, openssl, servers): killed if the test fails before it
//! waits for them.

use std::process::{Child, Output};

pub struct Spawned(Option<Child>);

impl Spawned {
    #[must_use]
    pub const fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// Waits for it to exit; its stdout and stderr.
    ///
    /// # Panics
    /// When it was already waited for, or waiting fails.
    #[must_use]
    pub fn wait(mut self) -> String {
        let out = self.0.take().expect("running").wait_with_output().expect("wait");
        text(&out)
    }

    /// Sends SIGINT (wrk then stops and prints its summary) and waits; its stdout and stderr.
    #[must_use]
    pub fn interrupt(self) -> String {
        if let Some(c) = &self.0 {
            // SAFETY: kill(2) on our own, not yet reaped, child.
            unsafe { libc::kill(i32::try_from(c.id()).unwrap_or(0), libc::SIGINT) };
        }
        self.wait()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// stdout then stderr, as text.
#[must_use]
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// What wrk's summary says: requests completed, and whether any failed (non-2xx/3xx answers
/// or socket errors).
#[must_use]
pub fn wrk_summary(out: &str) -> Option<(u64, bool)> {
    let total = out
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.trim().parse().ok()))?;
    Some((total, out.contains("Non-2xx") || out.contains("Socket errors")))
}
