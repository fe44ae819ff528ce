//! The registry file's types. Strict: unknown keys and wrong types are errors.
//!
//! The `services.yaml` sketch of seed 003 (`version`, `http:` hosts with backends, `tcp:`
//! services with a port and backends) loads as it is; every extension is optional.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Deserialize;

/// The only registry format version.
pub const REGISTRY_VERSION: u32 = 1;

/// A service registry: which services exist and where their backends are.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Format version; must be 1.
    pub version: u32,
    /// HTTP services by host name, served by the HTTP edge.
    #[serde(default)]
    pub http: BTreeMap<String, HttpService>,
    /// Layer-4 services by name.
    #[serde(default)]
    pub tcp: BTreeMap<String, L4Service>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpService {
    pub backends: Vec<BackendSpec>,
}

/// A layer-4 service. With a `vip`, the XDP program balances it in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct L4Service {
    /// Service port clients connect to.
    pub port: u16,
    /// Virtual IP the service is reached at. Without one the service is not balanced in XDP.
    #[serde(default)]
    pub vip: Option<IpAddr>,
    /// How packets reach backends; default `dsr-l2`.
    #[serde(default)]
    pub mode: Mode,
    /// IP protocols balanced on `port`; default `[tcp]`.
    #[serde(default = "default_protocols")]
    pub protocols: Vec<Protocol>,
    pub backends: Vec<BackendSpec>,
}

/// Forwarding mode of a layer-4 service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Direct server return on one L2 segment: only the destination MAC changes; backends
    /// hold the VIP on a loopback interface and answer clients directly.
    #[default]
    DsrL2,
}

impl Mode {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::DsrL2 => "dsr-l2",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => lb_common::maps::PROTO_TCP,
            Self::Udp => lb_common::maps::PROTO_UDP,
        }
    }

    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

fn default_protocols() -> Vec<Protocol> {
    vec![Protocol::Tcp]
}

/// Where one copy of a service listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// IP address or DNS name.
    pub host: String,
    pub port: u16,
}
