//! Loading the XDP object, attaching it to an interface and detaching it.

use std::fmt;

use aya::{
    Ebpf, EbpfError,
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use tracing::{debug, info, warn};

use crate::maps::{DataplaneMaps, MapsError};

/// The XDP object built from `lb-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

/// Program names in the object (the `#[xdp]` functions of lb-ebpf).
const PROG_BALANCER: &str = "lb_balancer";
const PROG_PASS: &str = "lb_pass";

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel refused the object (verifier, map creation).
    #[error("cannot load the XDP object: {0}")]
    Load(#[from] EbpfError),
    /// A program is missing from the object or has the wrong type.
    #[error("XDP program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    /// Attaching to the interface failed.
    #[error("cannot attach XDP to `{iface}` ({mode}): {source}")]
    Attach {
        iface: String,
        mode: AttachMode,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    Maps(#[from] MapsError),
}

/// How to attach: the driver's native hook, the generic (skb) hook, or native with a logged
/// fallback to generic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    #[default]
    Auto,
    Native,
    Generic,
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// BPF memory is charged to the memory cgroup on kernels >= 5.11; raising `RLIMIT_MEMLOCK` only
/// matters before that, and needs `CAP_SYS_RESOURCE`, which containers often lack.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        debug!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

fn load_xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoaderError> {
    let missing = || LoaderError::Program {
        name,
        source: ProgramError::NotLoaded,
    };
    let prog: &mut Xdp = ebpf
        .program_mut(name)
        .ok_or_else(missing)?
        .try_into()
        .map_err(|source| LoaderError::Program { name, source })?;
    prog.load()
        .map_err(|source| LoaderError::Program { name, source })?;
    Ok(prog)
}

/// The balancer program, loaded; attached once [`Balancer::attach`] succeeds.
pub struct Balancer {
    ebpf: Ebpf,
    link: Option<(String, XdpLinkId)>,
}

impl Balancer {
    /// Loads the object and the balancer program and takes its maps out for the caller.
    pub fn load() -> Result<(Self, DataplaneMaps), LoaderError> {
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
        load_xdp(&mut ebpf, PROG_BALANCER)?;
        let maps = DataplaneMaps::take(&mut ebpf)?;
        Ok((Self { ebpf, link: None }, maps))
    }

    /// Attaches to `iface`; returns the mode the kernel accepted.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachMode, LoaderError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROG_BALANCER)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoaderError::Program {
                name: PROG_BALANCER,
                source: ProgramError::NotLoaded,
            })?;
        let attach = |prog: &mut Xdp, m: AttachMode, xm: XdpMode| {
            prog.attach(iface, xm)
                .map_err(|source| LoaderError::Attach {
                    iface: iface.to_owned(),
                    mode: m,
                    source,
                })
        };
        let (id, used) = match mode {
            AttachMode::Native => (attach(prog, mode, XdpMode::Driver)?, AttachMode::Native),
            AttachMode::Generic => (attach(prog, mode, XdpMode::Skb)?, AttachMode::Generic),
            AttachMode::Auto => match attach(prog, AttachMode::Native, XdpMode::Driver) {
                Ok(id) => (id, AttachMode::Native),
                Err(e) => {
                    warn!(%iface, reason = %error_chain(&e), "native XDP unavailable; falling back to generic (skb) mode, which is slower");
                    (
                        attach(prog, AttachMode::Generic, XdpMode::Skb)?,
                        AttachMode::Generic,
                    )
                }
            },
        };
        info!(%iface, mode = %used, "XDP balancer attached");
        self.link = Some((iface.to_owned(), id));
        Ok(used)
    }

    /// Detaches from the interface, if attached.
    pub fn detach(&mut self) -> Result<(), LoaderError> {
        let Some((iface, id)) = self.link.take() else {
            return Ok(());
        };
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(PROG_BALANCER)
            .and_then(|p| p.try_into().ok())
            .ok_or(LoaderError::Program {
                name: PROG_BALANCER,
                source: ProgramError::NotLoaded,
            })?;
        prog.detach(id).map_err(|source| LoaderError::Program {
            name: PROG_BALANCER,
            source,
        })?;
        info!(%iface, "XDP balancer detached");
        Ok(())
    }
}

/// The trivial `XDP_PASS` program, attached (native) to an interface for as long as this lives.
///
/// Native `XDP_TX` on a veth only delivers frames when the peer veth runs an XDP program too;
/// tests and the demo attach this one to the balancer's peer. Real NICs need nothing of this.
pub struct PassProgram {
    _ebpf: Ebpf,
}

impl PassProgram {
    pub fn attach(iface: &str) -> Result<Self, LoaderError> {
        raise_memlock_limit();
        let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
        let prog = load_xdp(&mut ebpf, PROG_PASS)?;
        prog.attach(iface, XdpMode::Driver)
            .map_err(|source| LoaderError::Attach {
                iface: iface.to_owned(),
                mode: AttachMode::Native,
                source,
            })?;
        Ok(Self { _ebpf: ebpf })
    }
}

/// `e` and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
