//! The registry file's types. Strict: unknown keys and wrong types are errors.
//!
//! The `services.yaml` sketch of seed 003 (`version`, `http:` hosts with backends, `tcp:`
//! services with a port and backends) loads as it is; every extension is optional.

use std::{collections::BTreeMap, fmt, net::IpAddr, time::Duration};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, de};

use super::edge::{
    Acl, Balance, CachePolicy, CircuitBreaker, EdgeCache, Listener, Passive, Pool, Rate, RateLimits,
    Redirect, Retry, Timeouts, Upstream,
};

/// The only registry format version.
pub const REGISTRY_VERSION: u32 = 1;

/// A service registry: which services exist and where their backends are.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    /// Format version; must be 1.
    pub version: u32,
    /// This node's name, matched against backends' `node` (lbd's `--node` overrides it). Useful
    /// when each node has its own registry file.
    #[serde(default)]
    pub node: Option<String>,
    /// More registry files to merge in: paths or globs, relative to this file's directory.
    /// Included files hold `http:` and `tcp:` sections; a service defined twice is an error.
    #[serde(default)]
    pub include: Vec<String>,
    /// Data plane settings shared by every node.
    #[serde(default)]
    pub datapath: Datapath,
    /// Ports the HTTP edge serves `http:` services on. Without any, HTTP services are
    /// health-checked but not served by this node.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Request rate limits of the HTTP edge: global, per client address, with a whitelist.
    #[serde(default)]
    pub rate_limit: RateLimits,
    /// Who the HTTP edge serves: allow and deny lists of sources, and per-path rules.
    #[serde(default)]
    pub acl: Acl,
    /// Memory of the HTTP edge's cache (routes opt in with `cache:`).
    #[serde(default)]
    pub edge_cache: EdgeCache,
    /// HTTP services by host name (or by name, with `hosts`), served by the HTTP edge.
    #[serde(default)]
    pub http: BTreeMap<String, HttpService>,
    /// Layer-4 services by name.
    #[serde(default)]
    pub tcp: BTreeMap<String, L4Service>,
}

/// Data plane settings. They must be the same on every node: nodes with different table sizes
/// pick different backends for the same flow.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Datapath {
    /// Slots of each VIP's Maglev table: a prime. Balance stays within 1% of the weights while
    /// a service has fewer than `maglev_table_size / 100` backends.
    pub maglev_table_size: u32,
    /// Source ports `nat` services use towards backends, `"min-max"`. Keep it clear of this
    /// node's own ephemeral ports (`net.ipv4.ip_local_port_range`).
    #[schemars(with = "String")]
    pub nat_ports: PortRange,
    /// Idle time after which a tracked UDP flow is forgotten.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub udp_timeout: Duration,
    /// Idle time after which an established TCP flow is forgotten.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub tcp_timeout: Duration,
    /// Idle time after which a TCP flow that only sent its SYN is forgotten.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub tcp_syn_timeout: Duration,
    /// How long a TCP flow is kept after its FIN or RST.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub tcp_closing_timeout: Duration,
}

impl Default for Datapath {
    fn default() -> Self {
        Self {
            maglev_table_size: crate::maglev::DEFAULT_TABLE_SIZE,
            nat_ports: PortRange { min: 61_000, max: 65_535 },
            udp_timeout: Duration::from_mins(1),
            tcp_timeout: Duration::from_hours(6),
            tcp_syn_timeout: Duration::from_mins(1),
            tcp_closing_timeout: Duration::from_secs(10),
        }
    }
}

pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| de::Error::custom(format!("`{s}` is not a duration ({e}); write e.g. 30s, 10m, 6h")))
}

/// An inclusive port range, written `"61000-65535"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let parsed =
            s.split_once('-').and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
        match parsed {
            Some((min, max)) => Ok(Self { min, max }),
            None => Err(de::Error::custom(format!(
                "`{s}` is not a port range; write it as min-max, e.g. 61000-65535"
            ))),
        }
    }
}

/// The part of a registry an `include:` file may hold.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fragment {
    /// Accepted so a file can be used both alone and included; must be 1 when present.
    #[serde(default)]
    pub version: Option<u32>,
    #[serde(default)]
    pub http: BTreeMap<String, HttpService>,
    #[serde(default)]
    pub tcp: BTreeMap<String, L4Service>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpService {
    /// Host names this service answers: exact (`example.org`), one leading wildcard label
    /// (`*.example.org`, which does not match `example.org` itself), or `*` for any host.
    /// Default: the service's key.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// A regular expression the whole host must match (Traefik's `HostRegexp`), instead of
    /// `hosts`.
    #[serde(default)]
    pub host_regex: Option<String>,
    /// Path prefixes this service answers; default `/` (every path).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Routes are tried by priority, highest first; default: longer path prefixes first,
    /// then exact hosts, wildcards, regular expressions, and `*` last.
    #[serde(default)]
    pub priority: Option<i32>,
    /// Listener ports serving this service; default every listener.
    #[serde(default)]
    pub listeners: Vec<u16>,
    /// Answer with a redirect instead of proxying (`backends` may then be empty).
    #[serde(default)]
    pub redirect: Option<Redirect>,
    #[serde(default)]
    pub backends: Vec<BackendSpec>,
    /// Backends that take the traffic while every backend in `backends` is down.
    #[serde(default)]
    pub fallback: Vec<BackendSpec>,
    /// Active health check of every backend; default: TCP connect every 2 s.
    #[serde(default)]
    pub health: HealthCheck,
    /// How a request picks a backend; default `round-robin` (weighted).
    #[serde(default)]
    pub balance: Balance,
    /// Prefer backends whose `node` is this node; others take requests only when none of
    /// those is usable. Default true.
    #[serde(default = "yes")]
    pub local_first: bool,
    #[serde(default)]
    pub retry: Retry,
    #[serde(default)]
    pub passive: Passive,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub pool: Pool,
    /// Protocol, TLS and PROXY protocol to the backends.
    #[serde(default)]
    pub upstream: Upstream,
    /// A rate limit of this service's routes, all clients together.
    #[serde(default)]
    pub rate_limit: Option<Rate>,
    /// A circuit breaker on each backend; `circuit_breaker: {}` takes the defaults. Off
    /// when left out.
    #[serde(default)]
    pub circuit_breaker: Option<CircuitBreaker>,
    /// Keep GET answers at the edge: `"static, 10m"` (static assets) or `"all, 1m"`. Off when
    /// left out.
    #[serde(default)]
    pub cache: Option<CachePolicy>,
    /// The answer when no backend (fallbacks included) is usable: `fail-open` tries them
    /// all anyway, `fail-closed` answers 503 at once.
    #[serde(default)]
    pub when_all_down: AllDown,
}

pub(super) const fn yes() -> bool {
    true
}

/// A layer-4 service. With a `vip`, the XDP program balances it in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct L4Service {
    /// Service port clients connect to.
    pub port: u16,
    /// Virtual IP (IPv4 or IPv6) the service is reached at. Without one the service is not
    /// balanced in XDP.
    #[serde(default)]
    pub vip: Option<IpAddr>,
    /// How packets reach backends; default `dsr-l2`.
    #[serde(default)]
    pub mode: Mode,
    /// IP protocols balanced on `port`; default `[tcp]`.
    #[serde(default = "default_protocols")]
    pub protocols: Vec<Protocol>,
    pub backends: Vec<BackendSpec>,
    /// Backends that take new flows while every backend in `backends` is down.
    #[serde(default)]
    pub fallback: Vec<BackendSpec>,
    /// Active health check of every backend; default: TCP connect every 2 s. Probes run over
    /// TCP: a UDP-only service is not checked.
    #[serde(default)]
    pub health: HealthCheck,
    /// What happens to new flows when every backend (fallbacks included) is down.
    #[serde(default)]
    pub when_all_down: AllDown,
    /// Client addresses or ranges whose packets to the VIP are dropped in XDP (and counted as
    /// `drop_denied`), of the VIP's address family.
    #[serde(default)]
    pub deny: Vec<String>,
    /// How `mode: proxy` listens and forwards.
    #[serde(default)]
    pub proxy: ProxySettings,
}

/// The userspace L4 proxy of a `mode: proxy` service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    /// Address to listen on (with the service's `port`), e.g. a VIP this node holds.
    pub listen: IpAddr,
    /// Prefer backends whose `node` is this node, or whose host is a loopback address; others
    /// take connections only when none of those is up (seed 003: "if the local port is
    /// bound, connect locally").
    pub local_first: bool,
    /// Close the open connections to a backend when its health check marks it down (HAProxy's
    /// `on-marked-down shutdown-sessions`): clients of a demoted Redis primary reconnect to
    /// the new one instead of writing to a replica.
    pub close_on_down: bool,
    /// TCP connect to a backend; a backend that does not answer in time is skipped.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub connect_timeout: Duration,
    /// Most UDP flows (client addresses) relayed at once; datagrams of new ones beyond it
    /// are dropped. A flow ends after `datapath.udp_timeout` without traffic.
    pub max_udp_flows: usize,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            listen: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            local_first: true,
            close_on_down: true,
            connect_timeout: Duration::from_secs(3),
            max_udp_flows: 16_384,
        }
    }
}

/// The policy when no backend of a service passes its health check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum AllDown {
    /// Balance over every backend as if all were up (a health check that fails everywhere is
    /// more often wrong than the whole service). Logged as an error on every transition.
    #[default]
    FailOpen,
    /// Drop new flows (tracked ones continue).
    FailClosed,
}

impl AllDown {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::FailOpen => "fail-open",
            Self::FailClosed => "fail-closed",
        }
    }
}

/// An active health check. Without `http` or `send`/`expect` it is a TCP connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    /// `false` turns checking off: every backend counts as up.
    pub enabled: bool,
    /// Time between probes of one backend.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub interval: Duration,
    /// Bound on one probe (connect, send, and the answer).
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub timeout: Duration,
    /// Consecutive failures that mark a backend down.
    pub fall: u32,
    /// Consecutive successes that bring it back.
    pub rise: u32,
    /// Port to probe; default the backend's.
    pub port: Option<u16>,
    /// HTTP GET check.
    pub http: Option<HttpCheck>,
    /// Bytes to send after connecting (escapes `\r`, `\n`, `\t`, `\\` are understood).
    pub send: Option<String>,
    /// Text the answer must contain, e.g. `+PONG` for Redis's `PING`.
    pub expect: Option<String>,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(2),
            timeout: Duration::from_millis(500),
            fall: 3,
            rise: 2,
            port: None,
            http: None,
            send: None,
            expect: None,
        }
    }
}

/// An HTTP health check: `GET path` must answer `status`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpCheck {
    /// Request path, e.g. `/health`.
    #[serde(default = "default_http_path")]
    pub path: String,
    /// Expected status code.
    #[serde(default = "default_http_status")]
    pub status: u16,
    /// `Host` header; default the backend's host.
    #[serde(default)]
    pub host: Option<String>,
}

fn default_http_path() -> String {
    "/".to_owned()
}

const fn default_http_status() -> u16 {
    200
}

/// Forwarding mode of a layer-4 service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Direct server return on one L2 segment: only the destination MAC changes; backends
    /// hold the VIP on a loopback interface and answer clients directly.
    #[default]
    DsrL2,
    /// Direct server return through an IPIP / IP6IP6 tunnel to the backend (routed networks);
    /// backends hold the VIP and unwrap the tunnel (`lb-decap` does it in XDP).
    DsrIpip,
    /// Full NAT: destination and source rewritten; replies come back through this node.
    /// Backends need nothing and may sit anywhere routable.
    Nat,
    /// lbd's own TCP and UDP proxy (no XDP): it listens on `proxy.listen` and `port` and
    /// opens a connection to a backend per client. For nodes where XDP cannot run and for
    /// services reached without a VIP, such as seed 003's Redis.
    Proxy,
}

impl Mode {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::DsrL2 => "dsr-l2",
            Self::DsrIpip => "dsr-ipip",
            Self::Nat => "nat",
            Self::Proxy => "proxy",
        }
    }

    /// The data plane's `MODE_*` value (`proxy` services are never in the data plane: they
    /// have no VIP).
    #[must_use]
    pub const fn code(self) -> u8 {
        match self {
            Self::DsrL2 | Self::Proxy => lb_common::maps::MODE_DSR_L2,
            Self::DsrIpip => lb_common::maps::MODE_DSR_IPIP,
            Self::Nat => lb_common::maps::MODE_NAT,
        }
    }

    /// Direct server return modes forward packets unchanged at L4: backends must use the
    /// service port.
    #[must_use]
    pub const fn keeps_ports(self) -> bool {
        matches!(self, Self::DsrL2 | Self::DsrIpip)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, JsonSchema)]
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// IP address or DNS name.
    pub host: String,
    pub port: u16,
    /// Share of new flows relative to the service's other backends; 0 drains (no new flows,
    /// tracked flows stay). Default 1.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Name of the node this backend runs on (see the registry's `node`).
    #[serde(default)]
    pub node: Option<String>,
}

/// A backend's place in its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    /// Takes new flows only while no primary can.
    Fallback,
}

impl Role {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "primary",
            Self::Fallback => "fallback",
        }
    }
}

/// A service's backends, then its fallbacks, each with its role.
pub fn with_roles<'a>(
    backends: &'a [BackendSpec],
    fallback: &'a [BackendSpec],
) -> impl Iterator<Item = (&'a BackendSpec, Role)> {
    (backends.iter().map(|b| (b, Role::Primary))).chain(fallback.iter().map(|b| (b, Role::Fallback)))
}

impl L4Service {
    /// Backends, then fallbacks, each with its role.
    pub fn all_backends(&self) -> impl Iterator<Item = (&BackendSpec, Role)> {
        with_roles(&self.backends, &self.fallback)
    }
}

impl HttpService {
    /// Backends, then fallbacks, each with its role.
    pub fn all_backends(&self) -> impl Iterator<Item = (&BackendSpec, Role)> {
        with_roles(&self.backends, &self.fallback)
    }
}

/// Largest backend weight: keeps weight ratios meaningful for the table size.
pub const MAX_WEIGHT: u32 = 1000;

const fn default_weight() -> u32 {
    1
}

impl BackendSpec {
    /// The identity Maglev hashes: the registry's `host:port`, the same on every node.
    #[must_use]
    pub fn identity(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}
