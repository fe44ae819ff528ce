//! Registry file watching (inotify): a write, rename or delete in a directory the registry
//! reads from asks the controller to reload. Directories are watched rather than files so
//! editors and `lb-ctl config apply`, which replace files by renaming, are seen too.

use std::{io, path::PathBuf};

use inotify::{Inotify, WatchDescriptor, WatchMask};
use tokio::{
    io::unix::AsyncFd,
    sync::{mpsc, watch},
};
use tracing::{debug, warn};

/// Keeps the watcher running; [`Watcher::set_dirs`] changes what it watches.
pub struct Watcher {
    dirs: watch::Sender<Vec<PathBuf>>,
}

impl Watcher {
    /// Watches `dirs`; each batch of relevant events sends one `()` on `tx` (never blocking:
    /// a reload already asked for covers later changes).
    pub fn spawn(dirs: Vec<PathBuf>, tx: mpsc::Sender<()>) -> io::Result<Self> {
        let inotify = Inotify::init()?;
        // SAFETY: `Inotify` owns its descriptor and returns the same one for its lifetime.
        let mut fd = unsafe { AsyncFd::register_with_interest(inotify, tokio::io::Interest::READABLE) }?;
        // The first watches are in place when this returns: no change after it is missed.
        let watched = rewatch(&mut fd, &dirs, Vec::new());
        let (dirs_tx, dirs_rx) = watch::channel(dirs);
        tokio::spawn(run(fd, watched, dirs_rx, tx));
        Ok(Self { dirs: dirs_tx })
    }

    /// Watches `dirs` from now on (the registry's includes changed).
    pub fn set_dirs(&self, dirs: Vec<PathBuf>) {
        self.dirs.send_if_modified(|d| {
            let changed = *d != dirs;
            *d = dirs;
            changed
        });
    }
}

/// Whether a change to the file `name` can change the registry: not hidden (our own temporary
/// files, dot-files), not an editor's backup or swap file.
fn relevant(name: &str) -> bool {
    let ext = std::path::Path::new(name).extension().and_then(|e| e.to_str()).unwrap_or("");
    !(name.starts_with('.')
        || name.ends_with('~')
        || ext.eq_ignore_ascii_case("swp")
        || ext.eq_ignore_ascii_case("swx")
        || name == "4913")
}

/// Replaces the watches `old` with watches on `dirs`.
fn rewatch(fd: &mut AsyncFd<Inotify>, dirs: &[PathBuf], old: Vec<WatchDescriptor>) -> Vec<WatchDescriptor> {
    let mask = WatchMask::CLOSE_WRITE | WatchMask::MOVED_TO | WatchMask::MOVED_FROM | WatchMask::DELETE;
    let mut w = fd.get_mut().watches();
    for wd in old {
        let _ = w.remove(wd);
    }
    let mut watched = Vec::with_capacity(dirs.len());
    for dir in dirs {
        match w.add(dir, mask) {
            Ok(wd) => watched.push(wd),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot watch registry directory; SIGHUP still reloads");
            }
        }
    }
    watched
}

async fn run(
    mut fd: AsyncFd<Inotify>,
    mut watched: Vec<WatchDescriptor>,
    mut dirs: watch::Receiver<Vec<PathBuf>>,
    tx: mpsc::Sender<()>,
) {
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            changed = dirs.changed() => {
                if changed.is_err() {
                    return;
                }
                let list = dirs.borrow_and_update().clone();
                watched = rewatch(&mut fd, &list, std::mem::take(&mut watched));
            }
            ready = fd.readable_mut() => {
                let Ok(mut guard) = ready else { return };
                match guard.get_inner_mut().read_events(&mut buf) {
                    Ok(events) => {
                        let mut any = false;
                        for e in events {
                            let name = e.name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                            debug!(%name, mask = ?e.mask, "registry directory event");
                            any |= relevant(&name);
                        }
                        if any {
                            let _ = tx.try_send(());
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                    Err(e) => {
                        warn!(error = %e, "registry watcher failed; SIGHUP still reloads");
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn temporary_and_editor_files_are_ignored() {
        for name in ["services.yaml", "10-web.yaml", "registry"] {
            assert!(relevant(name), "{name}");
        }
        for name in [".services.yaml.lb-ctl.tmp", "services.yaml~", ".services.yaml.swp", "4913"] {
            assert!(!relevant(name), "{name}");
        }
    }

    #[tokio::test]
    async fn a_rename_into_a_watched_directory_is_reported() {
        let dir = std::env::temp_dir().join(format!("lb-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (tx, mut rx) = mpsc::channel(1);
        let _w = Watcher::spawn(vec![dir.clone()], tx).unwrap();
        std::fs::write(dir.join(".tmp"), "x").unwrap();
        std::fs::rename(dir.join(".tmp"), dir.join("services.yaml")).unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("an event").unwrap();
        // The hidden file's own write was not reported on its own.
        assert!(rx.try_recv().is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
