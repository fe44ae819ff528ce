//! Readiness for supervisors: the systemd `sd_notify` datagram protocol.
//!
//! When `NOTIFY_SOCKET` is set, lbd sends `READY=1` once the data plane is programmed and
//! attached, and `STOPPING=1` when it begins to shut down. systemd (`Type=notify`), the tests
//! and the demo all wait on this instead of guessing with sleeps.

use std::{ffi::OsStr, io, os::unix::net::UnixDatagram};

/// Sends `state` to `$NOTIFY_SOCKET`; Ok(false) when no supervisor asked for it.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    send(&path, state)?;
    Ok(true)
}

/// Sends `state` to the socket at `path` (`@name` for an abstract socket).
fn send(path: &OsStr, state: &str) -> io::Result<()> {
    let sock = UnixDatagram::unbound()?;
    // Never wait on a supervisor that does not read: a full queue loses this notice (the
    // caller logs it) rather than stall the daemon.
    sock.set_nonblocking(true)?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::send;

    #[test]
    fn ready_reaches_the_notify_socket() {
        let dir = std::env::temp_dir().join(format!("lb-notify-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        send(path.as_os_str(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_supervisor_that_does_not_read_never_blocks_the_sender() {
        let dir = std::env::temp_dir().join(format!("lb-notify-full-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let _listener = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        // The receive queue holds a few datagrams (net.unix.max_dgram_qlen); the rest fail fast.
        let failed = (0..1000).filter(|_| send(path.as_os_str(), "RELOADING=1").is_err()).count();
        assert!(failed > 0, "the queue never filled");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
