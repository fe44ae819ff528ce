//! Loading the XDP object, attaching it to an interface, detaching it, and running it on a
//! frame in the kernel without attaching (`BPF_PROG_TEST_RUN`).

use std::{fmt, time::Duration};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    programs::{
        ProgramError, TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
    sys::SyscallError,
};
use lb_common::{
    datapath::Action,
    maps::{self as names, AddrKey, DEFAULT_NAT_SIZE, FRAGMENTS_SIZE},
};
use tracing::{debug, info, warn};

use crate::{
    logging::error_chain,
    maps::{DataplaneMaps, MapsError},
    pins::{MapShape, PinError, Pins},
};

/// The XDP object built from `lb-ebpf` by build.rs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp"));

/// The XDP object lbd loads: the one built into it, or a file (`lbd --xdp-object`) built from
/// lb-ebpf of the same map layout, e.g. a rebuilt program swapped in without a new lbd.
pub enum XdpObject {
    Embedded,
    File(std::path::PathBuf, Vec<u8>),
}

impl XdpObject {
    pub fn read(path: &std::path::Path) -> Result<Self, LoaderError> {
        let bytes = std::fs::read(path)
            .map_err(|e| LoaderError::Object(format!("cannot read {}: {e}", path.display())))?;
        Ok(Self::File(path.to_owned(), bytes))
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Self::Embedded => EBPF_OBJECT,
            Self::File(_, b) => b,
        }
    }
}

impl fmt::Display for XdpObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Embedded => f.write_str("built in"),
            Self::File(p, _) => write!(f, "{}", p.display()),
        }
    }
}

/// Program names in the object (the `#[xdp]` functions of lb-ebpf).
const PROG_BALANCER: &str = "lb_balancer";
const PROG_PASS: &str = "lb_pass";
const PROG_DECAP: &str = "lb_decap";

/// Room for the frame a test run writes back; XDP frames fit in a page.
const TEST_RUN_MAX_FRAME: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel refused the object (verifier, map creation).
    #[error("cannot load the XDP object")]
    Load(#[source] EbpfError),
    /// A program is missing from the object, has the wrong type, or failed to load or run.
    #[error("XDP program `{name}`")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    /// Attaching to the interface failed.
    #[error("cannot attach XDP to `{iface}` in {mode} mode")]
    Attach {
        iface: String,
        mode: AttachMode,
        #[source]
        source: ProgramError,
    },
    /// The program returned a code outside the XDP actions lb uses.
    #[error("XDP program returned unexpected action {0}")]
    UnexpectedAction(u32),
    /// The balancer's maps are missing or have another layout.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// The pinned state cannot be used (busy, another layout, unreadable).
    #[error(transparent)]
    Pins(#[from] PinError),
    /// The object could not be read or parsed.
    #[error("cannot read the XDP object's map definitions: {0}")]
    Object(String),
    /// The pinned link exists but could not be taken over or pinned.
    #[error("XDP link pinned at {path}")]
    Link {
        path: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// How to attach: the driver's native hook, the generic (skb) hook, or native with a logged
/// fallback to generic where the driver has no native XDP.
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

/// One run of the balancer on one frame in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRun {
    pub action: Action,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Mean time per run as the kernel measured it.
    pub per_run: Duration,
}

/// BPF memory is charged to the memory cgroup on kernels >= 5.11; raising `RLIMIT_MEMLOCK` only
/// matters before that, and needs `CAP_SYS_RESOURCE`, which containers often lack.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        debug!(error = %std::io::Error::last_os_error(), "cannot raise RLIMIT_MEMLOCK; fine on kernels >= 5.11");
    }
}

/// Flow-state map sizes an object is loaded with.
#[derive(Debug, Clone, Copy)]
struct StateSizes {
    conntrack: u32,
    nat: u32,
    fragments: u32,
}

/// For objects that only run `lb_pass` or `lb_decap`: their flow-state maps stay empty.
const NO_STATE: StateSizes = StateSizes { conntrack: 1, nat: 1, fragments: 1 };

fn load_object(object: &XdpObject, sizes: StateSizes, pins: Option<&Pins>) -> Result<Ebpf, LoaderError> {
    raise_memlock_limit();
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(names::CONNTRACK, sizes.conntrack)
        .map_max_entries(names::NAT, sizes.nat)
        .map_max_entries(names::FRAGMENTS, sizes.fragments);
    if let Some(pins) = pins {
        // aya reuses a map pinned at the path as it is, whatever its shape: check first.
        pins.check(&shapes(object, sizes)?)?;
        for name in names::PINNED {
            loader.map_pin_path(name, pins.map_path(name));
        }
    }
    loader.load(object.bytes()).map_err(LoaderError::Load)
}

/// The pinned maps' shapes as this lbd's object declares them, with the sizes it loads with.
fn shapes(object: &XdpObject, sizes: StateSizes) -> Result<Vec<MapShape>, LoaderError> {
    let obj = aya_obj::Object::parse(object.bytes()).map_err(|e| LoaderError::Object(e.to_string()))?;
    names::PINNED
        .iter()
        .map(|&name| {
            let m = obj.maps.get(name).ok_or(MapsError::Missing(name))?;
            let max_entries = match name {
                names::CONNTRACK => sizes.conntrack,
                names::NAT => sizes.nat,
                names::FRAGMENTS => sizes.fragments,
                _ => m.max_entries(),
            };
            Ok(MapShape {
                name,
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries,
            })
        })
        .collect()
}

fn xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoaderError> {
    ebpf.program_mut(name)
        .ok_or(LoaderError::Program { name, source: ProgramError::NotLoaded })?
        .try_into()
        .map_err(|source| LoaderError::Program { name, source })
}

fn load_xdp<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, LoaderError> {
    let prog = xdp(ebpf, name)?;
    prog.load().map_err(|source| LoaderError::Program { name, source })?;
    Ok(prog)
}

/// True when native XDP failed because this interface's driver cannot do it, the only case
/// in which falling back to generic mode is right. Busy (another program attached) or
/// permission errors must surface as they are.
fn native_unsupported(e: &ProgramError) -> bool {
    let code = match e {
        ProgramError::SyscallError(SyscallError { io_error, .. }) => io_error.raw_os_error(),
        other => std::error::Error::source(other)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .and_then(std::io::Error::raw_os_error),
    };
    // Drivers without ndo_bpf answer EOPNOTSUPP; the netlink path reports EINVAL.
    !matches!(code, Some(libc::EBUSY | libc::EEXIST | libc::EPERM | libc::EACCES))
}

/// Where the balancer is attached.
enum Attached {
    /// Through a link this process owns: detached when it is dropped or detached.
    Owned(String, XdpLinkId),
    /// Through a link pinned in bpffs: stays attached after lbd exits until the pin is removed.
    Pinned(String),
}

/// The balancer program, loaded; attached once [`Balancer::attach`] succeeds.
pub struct Balancer {
    ebpf: Ebpf,
    pins: Option<Pins>,
    link: Option<Attached>,
}

impl Balancer {
    /// Loads the object (tracking up to `conntrack_size` flows) and the balancer program, and
    /// takes its maps out for the caller. With `pins`, maps pinned there by an earlier lbd are
    /// reused (after checking their shapes) and new ones are pinned; the flag returned says
    /// whether earlier state was adopted.
    pub fn load(conntrack_size: u32, pins: Option<Pins>) -> Result<(Self, DataplaneMaps, bool), LoaderError> {
        Self::load_from(&XdpObject::Embedded, conntrack_size, pins)
    }

    /// [`Balancer::load`] with the given object.
    pub fn load_from(
        object: &XdpObject,
        conntrack_size: u32,
        pins: Option<Pins>,
    ) -> Result<(Self, DataplaneMaps, bool), LoaderError> {
        // Every NAT flow has a tracking entry and a reply entry: a smaller reply map would evict
        // live flows' entries first.
        let nat = conntrack_size.max(DEFAULT_NAT_SIZE);
        let sizes = StateSizes { conntrack: conntrack_size, nat, fragments: FRAGMENTS_SIZE };
        let adopted = pins.as_ref().is_some_and(Pins::holds_maps);
        let mut ebpf = load_object(object, sizes, pins.as_ref())?;
        let prog = load_xdp(&mut ebpf, PROG_BALANCER)?;
        if let Ok(info) = prog.info() {
            info!(object = %object, id = info.id(), tag = format_args!("{:016x}", info.tag()), "XDP balancer loaded");
        }
        let maps = DataplaneMaps::take(&mut ebpf)?;
        if let Some(p) = &pins {
            info!(dir = %p.dir().display(), adopted, "balancer maps pinned");
        }
        Ok((Self { ebpf, pins, link: None }, maps, adopted))
    }

    fn program(&mut self) -> Result<&mut Xdp, LoaderError> {
        xdp(&mut self.ebpf, PROG_BALANCER)
    }

    /// Attaches to `iface`; returns the mode the kernel accepted. When an earlier lbd left its
    /// link pinned, this program replaces the one behind it in one step (`mode` is then the
    /// link's, unchanged): the interface is never without a balancer.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<AttachMode, LoaderError> {
        if let Some(path) = self.pins.as_ref().map(Pins::link_path).filter(|p| p.exists()) {
            let pinned = PinnedLink::from_pin(&path).map_err(link_error(&path))?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_error(&path))?;
            let prog = self.program()?;
            let id = prog.attach_to_link(link).map_err(link_error(&path))?;
            // The pin holds the link: dropping this handle only closes a descriptor.
            drop(prog.take_link(id).map_err(|source| LoaderError::Program { name: PROG_BALANCER, source })?);
            info!(%iface, link = %path.display(), "XDP balancer swapped in behind the pinned link; tracked flows kept");
            self.link = Some(Attached::Pinned(iface.to_owned()));
            return Ok(mode);
        }
        let prog = self.program()?;
        let mut attach = |m: AttachMode| {
            let xm = if m == AttachMode::Generic { XdpMode::Skb } else { XdpMode::Driver };
            prog.attach(iface, xm).map(|id| (id, m)).map_err(|source| LoaderError::Attach {
                iface: iface.to_owned(),
                mode: m,
                source,
            })
        };
        let (id, used) = match mode {
            AttachMode::Native | AttachMode::Generic => attach(mode)?,
            AttachMode::Auto => match attach(AttachMode::Native) {
                Ok(r) => r,
                Err(LoaderError::Attach { source, .. }) if native_unsupported(&source) => {
                    warn!(
                        %iface,
                        reason = %error_chain(&source),
                        "native XDP unavailable on this interface; using generic (skb) mode, which is slower"
                    );
                    attach(AttachMode::Generic)?
                }
                Err(e) => return Err(e),
            },
        };
        info!(%iface, mode = %used, "XDP balancer attached");
        self.link = Some(Attached::Owned(iface.to_owned(), id));
        if let Some(path) = self.pins.as_ref().map(Pins::link_path) {
            self.pin_link(&path)?;
        }
        Ok(used)
    }

    /// Moves the link this process owns to a pin at `path`. An attachment made through
    /// netlink (kernels without XDP links) cannot be pinned: that is an error, and lbd runs
    /// there only with `--no-pin`.
    fn pin_link(&mut self, path: &std::path::Path) -> Result<(), LoaderError> {
        let Some(Attached::Owned(iface, id)) = self.link.take() else { return Ok(()) };
        let link = self
            .program()?
            .take_link(id)
            .map_err(|source| LoaderError::Program { name: PROG_BALANCER, source })?;
        let fd_link = FdLink::try_from(link).map_err(link_error(path))?;
        drop(fd_link.pin(path).map_err(link_error(path))?);
        info!(link = %path.display(), "XDP link pinned: it outlives this lbd");
        self.link = Some(Attached::Pinned(iface));
        Ok(())
    }

    /// Detaches from the interface, if attached, and removes the pinned state.
    pub fn detach(&mut self) -> Result<(), LoaderError> {
        match self.link.take() {
            None => {}
            Some(Attached::Owned(iface, id)) => {
                self.program()?
                    .detach(id)
                    .map_err(|source| LoaderError::Program { name: PROG_BALANCER, source })?;
                info!(%iface, "XDP balancer detached");
            }
            // Removing the pins below drops the last reference to the link, which detaches it.
            Some(Attached::Pinned(iface)) => info!(%iface, "XDP balancer detached"),
        }
        if let Some(pins) = self.pins.take() {
            pins.remove()?;
        }
        Ok(())
    }

    /// Leaves the balancer attached through its pinned link, for the next lbd to adopt.
    pub fn keep(&mut self) {
        if let Some(Attached::Pinned(iface)) = &self.link {
            info!(%iface, "XDP balancer left attached with its maps pinned; the next lbd adopts them");
        }
    }

    /// Runs the balancer `repeat` times on `frame` in the kernel, against the maps as they
    /// are, without attaching it anywhere.
    pub fn test_run(&mut self, frame: &[u8], repeat: u32) -> Result<TestRun, LoaderError> {
        test_run(self.program()?, PROG_BALANCER, frame, repeat)
    }
}

/// Wraps an error about the link pinned at `path`.
fn link_error<E: std::error::Error + Send + Sync + 'static>(
    path: &std::path::Path,
) -> impl FnOnce(E) -> LoaderError + '_ {
    move |e| LoaderError::Link { path: path.display().to_string(), source: Box::new(e) }
}

/// `BPF_PROG_TEST_RUN` of a loaded XDP program on `frame`. The kernel runs it `repeat` times
/// on the same buffer, each run seeing what the previous one left.
fn test_run(prog: &mut Xdp, name: &'static str, frame: &[u8], repeat: u32) -> Result<TestRun, LoaderError> {
    let mut out = vec![0u8; TEST_RUN_MAX_FRAME];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    };
    let r = prog.test_run(opts).map_err(|source| LoaderError::Program { name, source })?;
    out.truncate(r.data_size_out as usize);
    let action =
        Action::from_xdp_code(r.return_value).ok_or(LoaderError::UnexpectedAction(r.return_value))?;
    Ok(TestRun { action, frame: out, per_run: r.duration })
}

/// The trivial `XDP_PASS` program, attached (native) to an interface for as long as this lives.
///
/// Native `XDP_TX` on a veth only delivers frames when the peer veth runs an XDP program too;
/// tests and the demo attach this one to the balancer's peer. Real NICs need nothing of this.
/// Benchmarks load it unattached as the baseline for the balancer's figures.
pub struct PassProgram {
    ebpf: Ebpf,
}

impl PassProgram {
    /// Loads it without attaching it.
    pub fn load() -> Result<Self, LoaderError> {
        let mut ebpf = load_object(&XdpObject::Embedded, NO_STATE, None)?;
        load_xdp(&mut ebpf, PROG_PASS)?;
        Ok(Self { ebpf })
    }

    pub fn attach(iface: &str) -> Result<Self, LoaderError> {
        let mut p = Self::load()?;
        xdp(&mut p.ebpf, PROG_PASS)?.attach(iface, XdpMode::Driver).map_err(|source| {
            LoaderError::Attach { iface: iface.to_owned(), mode: AttachMode::Native, source }
        })?;
        Ok(p)
    }

    /// Runs it `repeat` times on `frame` in the kernel.
    pub fn test_run(&mut self, frame: &[u8], repeat: u32) -> Result<TestRun, LoaderError> {
        test_run(xdp(&mut self.ebpf, PROG_PASS)?, PROG_PASS, frame, repeat)
    }
}

/// The decapsulation program for backends of `dsr-ipip` services, attached for as long as this
/// lives; it unwraps tunnelled packets addressed to `local` addresses.
pub struct DecapProgram {
    _ebpf: Ebpf,
}

impl DecapProgram {
    pub fn attach(iface: &str, mode: AttachMode, local: &[std::net::IpAddr]) -> Result<Self, LoaderError> {
        let mut ebpf = load_object(&XdpObject::Embedded, NO_STATE, None)?;
        let mut addrs: aya::maps::HashMap<_, AddrKey, u32> = ebpf
            .take_map(names::DECAP_ADDRS)
            .ok_or(MapsError::Missing(names::DECAP_ADDRS))?
            .try_into()
            .map_err(|source| MapsError::Layout { name: names::DECAP_ADDRS, source })?;
        for ip in local {
            addrs.insert(AddrKey::new(*ip), 0, 0).map_err(|source| MapsError::Access {
                op: "insert",
                name: names::DECAP_ADDRS,
                source,
            })?;
        }
        let prog = load_xdp(&mut ebpf, PROG_DECAP)?;
        let xm = if mode == AttachMode::Generic { XdpMode::Skb } else { XdpMode::Driver };
        let attached = prog.attach(iface, xm);
        let attached = match (attached, mode) {
            (Err(e), AttachMode::Auto) if native_unsupported(&e) => prog.attach(iface, XdpMode::Skb),
            (r, _) => r,
        };
        attached.map_err(|source| LoaderError::Attach { iface: iface.to_owned(), mode, source })?;
        info!(%iface, addresses = local.len(), "XDP decapsulation attached");
        Ok(Self { _ebpf: ebpf })
    }
}
