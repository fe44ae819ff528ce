//! The balancer's state pinned in bpffs: where it lives, who owns it, and whether this lbd may
//! adopt it.
//!
//! `<root>/<iface>/v<MAP_LAYOUT_VERSION>/` holds every balancer map and the XDP link. A
//! restarted or upgraded lbd reuses the maps (tracked flows, NAT, counters) and swaps its own
//! program in behind the link, so packets never meet an interface without a balancer. State of
//! another layout version, or a pinned map whose type, key, value or size differs from what
//! this lbd's program declares, is refused with instructions rather than reused. `<root>/<iface>`
//! is locked (`flock`) while an lbd runs, so two daemons never share state.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use lb_common::maps::{MAP_LAYOUT_VERSION, PINNED};
use tracing::info;

/// Where lbd pins its state unless told otherwise.
pub const DEFAULT_ROOT: &str = "/sys/fs/bpf/lb";
/// File name of the pinned XDP link.
const LINK: &str = "link";
/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{}: cannot {op}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is not on a BPF filesystem (mount one: `mount -t bpf bpf /sys/fs/bpf`), or choose another --pin-dir",
        .0.display()
    )]
    NotBpffs(PathBuf),
    #[error("another lbd serves `{iface}`: it holds the lock on {}", dir.display())]
    Busy { iface: String, dir: PathBuf },
    #[error(
        "{} holds pinned state of map layout {found}; this lbd uses layout v{ours} and does not reuse \
         other layouts. Run an lbd of that layout, or start over (tracked flows are lost, the \
         interface has no balancer until lbd starts again): `lbd --unpin --iface {iface} --pin-dir {}`",
        dir.display(), root.display()
    )]
    OtherLayout { dir: PathBuf, found: String, ours: u32, iface: String, root: PathBuf },
    #[error(
        "pinned map {} differs from this lbd's: {what}. lbd does not reuse it; {hint}",
        path.display()
    )]
    Mismatch { path: PathBuf, what: String, hint: String },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PinError {
    let path = path.to_owned();
    move |source| PinError::Io { op, path, source }
}

/// What a pinned map must be for this lbd to reuse it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub name: &'static str,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

/// This lbd's pin directory for one interface, locked for as long as it lives.
#[derive(Debug)]
pub struct Pins {
    root: PathBuf,
    iface: String,
    dir: PathBuf,
    _lock: File,
}

impl Pins {
    /// Opens (creating) `<root>/<iface>/v<layout>`, taking the interface's lock. Mounts bpffs
    /// at `/sys/fs/bpf` when `root` is under it and nothing is mounted there yet.
    pub fn open(root: &Path, iface: &str) -> Result<Self, PinError> {
        ensure_bpffs(root)?;
        let iface_dir = root.join(iface);
        std::fs::create_dir_all(&iface_dir).map_err(io_err("create", &iface_dir))?;
        let lock = lock(&iface_dir, iface)?;
        let ours = format!("v{MAP_LAYOUT_VERSION}");
        for entry in std::fs::read_dir(&iface_dir).map_err(io_err("list", &iface_dir))? {
            let name = entry.map_err(io_err("list", &iface_dir))?.file_name().to_string_lossy().into_owned();
            if name != ours {
                return Err(PinError::OtherLayout {
                    dir: iface_dir.join(&name),
                    found: name,
                    ours: MAP_LAYOUT_VERSION,
                    iface: iface.to_owned(),
                    root: root.to_owned(),
                });
            }
        }
        let dir = iface_dir.join(ours);
        std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        Ok(Self { root: root.to_owned(), iface: iface.to_owned(), dir, _lock: lock })
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[must_use]
    pub fn map_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    #[must_use]
    pub fn link_path(&self) -> PathBuf {
        self.dir.join(LINK)
    }

    /// True when maps of an earlier lbd are pinned here.
    #[must_use]
    pub fn holds_maps(&self) -> bool {
        PINNED.iter().any(|name| self.map_path(name).exists())
    }

    /// Checks every pinned map against the shapes this lbd's program declares.
    pub fn check(&self, shapes: &[MapShape]) -> Result<(), PinError> {
        for shape in shapes {
            let path = self.map_path(shape.name);
            if !path.exists() {
                continue;
            }
            let info = MapInfo::from_pin(&path).map_err(|e| PinError::Io {
                op: "read the pinned map",
                path: path.clone(),
                source: io::Error::other(e),
            })?;
            let found = MapShape {
                name: shape.name,
                map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
                key_size: info.key_size(),
                value_size: info.value_size(),
                max_entries: info.max_entries(),
            };
            if let Some(what) = difference(shape, &found) {
                let hint = if shape.max_entries == found.max_entries {
                    format!(
                        "its layout changed without a new layout version. Start over (tracked flows are lost): \
                         `lbd --unpin --iface {} --pin-dir {}`",
                        self.iface,
                        self.root.display()
                    )
                } else {
                    format!(
                        "start lbd with the --conntrack-size the running state was made with, or start \
                         over (tracked flows are lost): `lbd --unpin --iface {} --pin-dir {}`",
                        self.iface,
                        self.root.display()
                    )
                };
                return Err(PinError::Mismatch { path, what, hint });
            }
        }
        Ok(())
    }

    /// Removes the link pin (detaching the program unless something else holds it), the map
    /// pins and the directories.
    pub fn remove(self) -> Result<(), PinError> {
        remove_state(&self.root, &self.iface)
    }
}

/// What differs between the map this lbd wants and the one pinned, if anything.
fn difference(want: &MapShape, found: &MapShape) -> Option<String> {
    let fields = [
        ("type", want.map_type, found.map_type),
        ("key size", want.key_size, found.key_size),
        ("value size", want.value_size, found.value_size),
        ("max entries", want.max_entries, found.max_entries),
    ];
    let diffs: Vec<String> = (fields.iter())
        .filter(|(_, w, f)| w != f)
        .map(|(what, w, f)| format!("{what} {f}, this lbd's {w}"))
        .collect();
    (!diffs.is_empty()).then(|| diffs.join(", "))
}

/// `lbd --unpin`: removes the pinned state of `iface` unless an lbd runs on it.
pub fn unpin(root: &Path, iface: &str) -> Result<(), PinError> {
    let iface_dir = root.join(iface);
    if !iface_dir.exists() {
        info!(dir = %iface_dir.display(), "nothing pinned");
        return Ok(());
    }
    let _lock = lock(&iface_dir, iface)?;
    remove_state(root, iface)
}

/// Takes the interface's lock: refused while another lbd holds it.
fn lock(iface_dir: &Path, iface: &str) -> Result<File, PinError> {
    let lock = File::open(iface_dir).map_err(io_err("open", iface_dir))?;
    // SAFETY: flock on an fd we own.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            PinError::Busy { iface: iface.to_owned(), dir: iface_dir.to_owned() }
        } else {
            PinError::Io { op: "lock", path: iface_dir.to_owned(), source: e }
        });
    }
    Ok(lock)
}

/// Removes every pinned state of `iface` under `root` (all layout versions): the XDP program
/// leaves the interface once its link pin is gone.
fn remove_state(root: &Path, iface: &str) -> Result<(), PinError> {
    let iface_dir = root.join(iface);
    if !iface_dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(&iface_dir).map_err(io_err("remove", &iface_dir))?;
    info!(dir = %iface_dir.display(), "pinned state removed");
    Ok(())
}

/// Makes sure `root` is on bpffs, mounting one at `/sys/fs/bpf` (idempotently) when `root`
/// lies under it and it is not mounted.
fn ensure_bpffs(root: &Path) -> Result<(), PinError> {
    let bpffs = Path::new("/sys/fs/bpf");
    if root.starts_with(bpffs) && !is_bpffs(bpffs) {
        let src = c"bpf";
        let target = c"/sys/fs/bpf";
        // SAFETY: valid C strings; no data argument.
        let rc = unsafe { libc::mount(src.as_ptr(), target.as_ptr(), src.as_ptr(), 0, std::ptr::null()) };
        if rc != 0 {
            return Err(PinError::Io {
                op: "mount bpffs on",
                path: bpffs.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        info!("mounted bpffs on /sys/fs/bpf");
    }
    // The root itself may not exist yet: check the nearest existing ancestor.
    let existing = root.ancestors().find(|p| p.exists()).unwrap_or(root);
    if is_bpffs(existing) { Ok(()) } else { Err(PinError::NotBpffs(root.to_owned())) }
}

#[allow(clippy::useless_conversion, reason = "statfs's f_type is i64 on some architectures only")]
fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else { return false };
    // SAFETY: a zeroed statfs is valid; `c` outlives the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    (unsafe { libc::statfs(c.as_ptr(), &raw mut st) } == 0) && i64::from(st.f_type) == BPF_FS_MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(max_entries: u32) -> MapShape {
        MapShape { name: "LB_CONNTRACK", map_type: 9, key_size: 40, value_size: 32, max_entries }
    }

    #[test]
    fn a_shape_that_differs_is_described_field_by_field() {
        assert_eq!(difference(&shape(10), &shape(10)), None);
        assert_eq!(difference(&shape(10), &shape(20)).unwrap(), "max entries 20, this lbd's 10");
        let other = MapShape { value_size: 24, ..shape(20) };
        assert_eq!(
            difference(&shape(10), &other).unwrap(),
            "value size 24, this lbd's 32, max entries 20, this lbd's 10"
        );
    }
}
