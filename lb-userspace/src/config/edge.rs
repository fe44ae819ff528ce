//! Registry types of the HTTP edge: listeners, and how an `http:` service is routed, balanced
//! and retried. Every field is optional with the default documented on it.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use schemars::JsonSchema;
use serde::Deserialize;

use super::schema::{duration, yes};

/// A port the HTTP edge serves.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub port: u16,
    /// Address to bind; default `0.0.0.0`.
    #[serde(default = "any_v4")]
    pub address: IpAddr,
    /// Bounds on what one client may hold or send.
    #[serde(default)]
    pub limits: Limits,
    /// Terminate TLS here (HTTPS); without it the listener serves plain HTTP.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// Also accept HTTP/2 without TLS from clients that start with its preface (h2c).
    #[serde(default)]
    pub h2c: bool,
    /// Do not terminate TLS: read the SNI name of each connection's `ClientHello` and forward the
    /// raw stream to a backend of the `http:` service whose `hosts` match it (Traefik's
    /// `HostSNI`). The backends terminate TLS themselves.
    #[serde(default)]
    pub passthrough: bool,
}

/// TLS termination on a listener (seed 001's `ssl:` settings).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Certificates, chosen by the name a client asks for (SNI); the first is the default for
    /// clients that ask for none or for a name no certificate has. Paths are relative to the
    /// registry file. lbd reloads when one of these files changes.
    pub certificates: Vec<CertSpec>,
    /// `TLSv1.2` and/or `TLSv1.3`; default both. Older versions are not supported.
    #[serde(default = "both_versions")]
    pub protocols: Vec<TlsVersion>,
    /// Cipher suites allowed, by OpenSSL (`ECDHE-RSA-AES128-GCM-SHA256`) or IANA
    /// (`TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`) name. As in nginx, a list without TLS 1.3
    /// suites leaves TLS 1.3's own suites on. Default: all of rustls's suites.
    #[serde(default)]
    pub ciphers: Vec<String>,
    /// Send `Strict-Transport-Security` on responses that lack it: `true` (one year), or
    /// `{max_age, include_subdomains, preload}`.
    #[serde(default)]
    #[schemars(with = "serde_json::Value")]
    pub hsts: Hsts,
    /// Protocols offered by ALPN, preferred first; default `[h2, http/1.1]`.
    #[serde(default = "default_alpn")]
    pub alpn: Vec<String>,
    /// Ask clients for a certificate signed by this CA (mTLS).
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
    /// Staple the OCSP response found next to each certificate (`CERT.ocsp`, DER), when there
    /// is one.
    #[serde(default)]
    pub ocsp_stapling: bool,
}

/// One certificate chain and its key, PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CertSpec {
    /// The chain, leaf first.
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    /// What `lb-ctl ssl update --name` calls it; default the certificate's first DNS name.
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, JsonSchema)]
pub enum TlsVersion {
    #[serde(rename = "TLSv1.2")]
    Tls12,
    #[serde(rename = "TLSv1.3")]
    Tls13,
}

fn both_versions() -> Vec<TlsVersion> {
    vec![TlsVersion::Tls12, TlsVersion::Tls13]
}

fn default_alpn() -> Vec<String> {
    vec!["h2".to_owned(), "http/1.1".to_owned()]
}

/// HTTP Strict Transport Security.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hsts {
    /// Zero: no header.
    pub max_age: Duration,
    pub include_subdomains: bool,
    pub preload: bool,
}

impl Hsts {
    /// The header's value, if one is sent.
    #[must_use]
    pub fn header(&self) -> Option<String> {
        if self.max_age.is_zero() {
            return None;
        }
        let mut v = format!("max-age={}", self.max_age.as_secs());
        if self.include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        Some(v)
    }
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "true, false, or {max_age, include_subdomains, preload}")]
enum HstsForm {
    On(bool),
    Set {
        #[serde(default = "one_year", deserialize_with = "duration")]
        max_age: Duration,
        #[serde(default)]
        include_subdomains: bool,
        #[serde(default)]
        preload: bool,
    },
}

fn one_year() -> Duration {
    Duration::from_hours(365 * 24)
}

impl<'de> Deserialize<'de> for Hsts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match HstsForm::deserialize(d)? {
            HstsForm::On(false) => Self::default(),
            HstsForm::On(true) => Self { max_age: one_year(), ..Self::default() },
            HstsForm::Set { max_age, include_subdomains, preload } => {
                Self { max_age, include_subdomains, preload }
            }
        })
    }
}

/// Client certificates (mTLS).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClientAuth {
    /// PEM file of the CA certificates client certificates must chain to.
    pub ca: std::path::PathBuf,
    /// Refuse clients without a certificate (default); `false` only checks those that send one.
    #[serde(default = "yes")]
    pub required: bool,
}

fn any_v4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
}

/// Safe defaults against slow, oversized or greedy clients.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Time a client has to send a request's headers (answered 408 when it runs out).
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub header_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; larger ones get 431.
    pub max_header_bytes: usize,
    /// A keep-alive connection with no request for this long is closed.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub idle_timeout: Duration,
    /// A client whose connection has no room for the answer's next write for this long (it
    /// reads nothing) is closed, and the backend connection behind the answer with it
    /// (nginx's `send_timeout`: the time between two writes, not the whole answer's). Meant to
    /// be no shorter than `header_timeout`: the watchdog checks at least that often anyway.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub send_timeout: Duration,
    /// A WebSocket (or other upgraded) connection, or a TLS-passthrough one, with no byte
    /// either way for this long is closed (HAProxy's `timeout tunnel`).
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub tunnel_timeout: Duration,
    /// Largest request body in bytes; larger ones get 413.
    pub max_body_bytes: u64,
    /// Connections one client address may hold open at once; more are refused.
    pub max_connections_per_ip: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_header_bytes: 64 * 1024,
            idle_timeout: Duration::from_mins(1),
            send_timeout: Duration::from_mins(1),
            tunnel_timeout: Duration::from_hours(1),
            max_body_bytes: 16 * 1024 * 1024,
            max_connections_per_ip: 256,
        }
    }
}

/// A redirect answered by the edge itself, before any backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Redirect {
    /// Redirect plain HTTP to `https` (Traefik's redirectScheme).
    #[serde(default)]
    pub https: bool,
    /// Redirect `www.name` to `name` (seed 003's redirectRegex).
    #[serde(default)]
    pub strip_www: bool,
    /// 308 (permanent) or 307 (temporary); both keep the method and body. Default permanent.
    #[serde(default = "yes")]
    pub permanent: bool,
}

/// How a request picks among a service's usable backends: a name, or `{hash: KEY}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// The backend with the fewest requests in flight (relative to its weight).
    LeastConn,
    /// Of two backends drawn at random, the one with the lower latency average (EWMA of the
    /// time to response headers, times requests in flight).
    P2cEwma,
    /// Consistent hash of the client address, a header or a cookie: one key, one backend
    /// while the set of usable backends stays the same.
    Hash(HashKey),
}

impl Balance {
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::RoundRobin => "round-robin",
            Self::LeastConn => "least-conn",
            Self::P2cEwma => "p2c-ewma",
            Self::Hash(_) => "hash",
        }
    }
}

/// What a consistent-hash balancer hashes: `client-ip`, `{header: NAME}` or `{cookie: NAME}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum HashKey {
    ClientIp,
    Header(String),
    Cookie(String),
}

// serde_yaml reads externally tagged enums only from YAML tags (`!hash`); the registry spells
// them as plain maps, `{hash: {header: X-User}}`, as the JSON Schema says. These are the forms
// read, converted with a clear error.
#[derive(Deserialize)]
#[serde(
    untagged,
    expecting = "round-robin, least-conn, p2c-ewma, or {hash: client-ip}, {hash: {header: NAME}}, {hash: {cookie: NAME}}"
)]
enum BalanceForm {
    Name(String),
    Hash { hash: HashForm },
}

#[derive(Deserialize)]
#[serde(untagged, expecting = "client-ip, {header: NAME} or {cookie: NAME}")]
enum HashForm {
    Name(String),
    Header { header: String },
    Cookie { cookie: String },
}

impl<'de> Deserialize<'de> for Balance {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BalanceForm::deserialize(d)?.try_into().map_err(serde::de::Error::custom)
    }
}

impl TryFrom<BalanceForm> for Balance {
    type Error = String;

    fn try_from(f: BalanceForm) -> Result<Self, String> {
        Ok(match f {
            BalanceForm::Name(n) => match n.as_str() {
                "round-robin" => Self::RoundRobin,
                "least-conn" => Self::LeastConn,
                "p2c-ewma" => Self::P2cEwma,
                _ => {
                    return Err(format!(
                        "unknown balance `{n}`, expected round-robin, least-conn, p2c-ewma or {{hash: ...}}"
                    ));
                }
            },
            BalanceForm::Hash { hash: HashForm::Name(n) } if n == "client-ip" => {
                Self::Hash(HashKey::ClientIp)
            }
            BalanceForm::Hash { hash: HashForm::Name(n) } => {
                return Err(format!(
                    "unknown hash key `{n}`, expected client-ip, {{header: NAME}} or {{cookie: NAME}}"
                ));
            }
            BalanceForm::Hash { hash: HashForm::Header { header } } => Self::Hash(HashKey::Header(header)),
            BalanceForm::Hash { hash: HashForm::Cookie { cookie } } => Self::Hash(HashKey::Cookie(cookie)),
        })
    }
}

/// Retries of a failed attempt, always on another backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    /// Attempts in all, the first included; 1 turns retries off.
    pub tries: u32,
    /// No new attempt starts later than this after the request arrived.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub within: Duration,
    /// Backend answers that count as failed attempts (connect errors and timeouts always do).
    pub statuses: Vec<u16>,
    /// Retry POST, PATCH and other non-idempotent methods too.
    pub non_idempotent: bool,
    /// Request bodies up to this size are kept so they can be sent again; a larger body is
    /// streamed and its request not retried.
    pub replay_bytes: usize,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            tries: 2,
            within: Duration::from_secs(10),
            statuses: vec![502, 503, 504],
            non_idempotent: false,
            replay_bytes: 64 * 1024,
        }
    }
}

/// Passive health: failed attempts seen in real traffic take a backend out for a while.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Passive {
    /// Failed attempts within `window` that take a backend out; 0 turns passive health off.
    pub failures: u32,
    /// Counting window, and how long the backend then stays out.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub window: Duration,
}

impl Default for Passive {
    fn default() -> Self {
        Self { failures: 3, window: Duration::from_secs(30) }
    }
}

/// A circuit breaker on each backend of a service (seed 001's numbers are the defaults): errors
/// seen in real traffic stop requests to a backend for `open_for`, then trial requests decide
/// whether it is back. An error is a failed connection, a timeout, a 5xx answer or one slower
/// than `slow`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreaker {
    /// Errors in a row that open it; 0 turns this trigger off.
    pub consecutive_errors: u32,
    /// Errors, in percent of the requests within `window`, that open it; 0 turns this off.
    pub error_rate: u32,
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub window: Duration,
    /// Requests within `window` before `error_rate` is judged.
    pub min_requests: u32,
    /// An answer whose headers take longer counts as an error; 0s turns this off.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub slow: Duration,
    /// How long no request is sent once open.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub open_for: Duration,
    /// Trial requests let through at once when `open_for` has passed; as many successes close
    /// it, one error opens it again.
    pub half_open_requests: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            consecutive_errors: 5,
            error_rate: 50,
            window: Duration::from_secs(10),
            min_requests: 10,
            slow: Duration::from_secs(5),
            open_for: Duration::from_secs(30),
            half_open_requests: 1,
        }
    }
}

/// Bounds on one attempt to a backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// TCP connect.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub connect: Duration,
    /// From the request sent to the response headers.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(3), response: Duration::from_secs(30) }
    }
}

/// Keep-alive connections kept to each backend (seed 002's nginx `keepalive 64`,
/// `keepalive_requests 100`, `keepalive_timeout 60s`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Pool {
    /// Idle connections kept per backend.
    pub max_idle: usize,
    /// Connections open to each backend at most, idle and busy; requests beyond wait for one
    /// to go idle (HAProxy's `maxconn`), within the response timeout. 0: no cap.
    pub max_connections: u32,
    /// Requests one connection carries before it is closed; 0: no limit. With HTTP/2 to the
    /// backend, streams.
    pub max_requests: u32,
    /// An idle connection unused this long is closed.
    #[serde(deserialize_with = "duration")]
    #[schemars(with = "String")]
    pub idle_timeout: Duration,
}

impl Default for Pool {
    fn default() -> Self {
        Self { max_idle: 64, max_connections: 0, max_requests: 100, idle_timeout: Duration::from_mins(1) }
    }
}

/// How the edge talks to a service's backends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// `http1` (default), or `http2`: one multiplexed connection per backend (h2 by ALPN over
    /// TLS, prior knowledge without).
    pub protocol: UpstreamProtocol,
    /// HTTPS to the backends; without it, plain HTTP.
    pub tls: Option<UpstreamTls>,
    /// Start each connection with a PROXY protocol v2 header naming the client, so the backend
    /// sees its address. A connection then carries one client's requests only. Applies to TLS
    /// passthrough too.
    pub proxy_protocol: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}

/// TLS from the edge to the backends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTls {
    /// PEM file of the CAs a backend's certificate must chain to; default the system's
    /// (`/etc/ssl/certs/ca-certificates.crt`). Relative to the registry file.
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate chain (PEM) shown to backends that ask for one (mTLS); with `key`.
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
    /// The name a backend's certificate must carry and the SNI sent; default the backend's
    /// host (its address for an IP, which a certificate must then list).
    pub server_name: Option<String>,
}

/// Request rate limits at the HTTP edge (seed 001's `rate_limit:`), as token buckets; a request
/// over one is answered 429 with `Retry-After` and `RateLimit-*` headers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// All requests the edge serves, together.
    pub global: Option<Rate>,
    /// Each client address (a bounded table: 4 MiB whatever the number of addresses).
    pub per_ip: Option<Rate>,
    /// Sources exempt from `global` and `per_ip` (a service's own `rate_limit` still applies):
    /// addresses or CIDR ranges (`10.0.0.0/8`).
    pub whitelist: Vec<String>,
}

/// Who the HTTP edge serves, by source address (seed 001's `acl:`). A source in `deny` is
/// refused; with `allow` given, so is a source outside it; then the first rule whose path
/// matches decides the same way. Refused requests get 403.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Acl {
    #[serde(deserialize_with = "one_or_many")]
    #[schemars(with = "Vec<String>")]
    pub allow: Vec<String>,
    #[serde(deserialize_with = "one_or_many")]
    #[schemars(with = "Vec<String>")]
    pub deny: Vec<String>,
    pub rules: Vec<AclRule>,
}

/// Sources allowed or denied one path and what lies under it: `/admin/*` (or `/admin`) covers
/// `/admin` and `/admin/...`. Paths are compared after `.`/`..` segments, repeated slashes and
/// encoded unreserved characters are resolved, as a backend would read them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AclRule {
    pub path: String,
    #[serde(default, deserialize_with = "one_or_many")]
    #[schemars(with = "Vec<String>")]
    pub allow: Vec<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    #[schemars(with = "Vec<String>")]
    pub deny: Vec<String>,
}

/// One string or a list of them (seed 001 writes `allow: 10.0.0.0/8`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// A token bucket: `rate` requests a second on average, `burst` more at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    pub rate: u32,
    #[serde(default)]
    pub burst: u32,
}

/// What a route's edge cache keeps (seed 003's `cache: "static, 10m"`): `"static, 10m"` keeps
/// static assets (by file extension: css, js, images, fonts, media, ...), `"all, 1m"` every
/// GET answer, for at most the duration. A backend's `Cache-Control: max-age` or `s-maxage`
/// (or `Expires`) shortens it; `no-store`, `no-cache`, `private`, `Set-Cookie` and `Vary: *`
/// keep an answer out. Also written as a map: `{match: static, ttl: 10m}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, JsonSchema)]
#[schemars(with = "String")]
pub struct CachePolicy {
    /// Every GET, or only paths of static assets.
    pub all: bool,
    pub ttl: Duration,
}

impl<'de> Deserialize<'de> for CachePolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Long {
            #[serde(rename = "match", default)]
            what: Option<String>,
            ttl: String,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Short(String),
            Long(Long),
        }
        let (what, ttl) = match Form::deserialize(d)? {
            Form::Short(s) => match s.split_once(',') {
                Some((w, t)) => (Some(w.trim().to_owned()), t.trim().to_owned()),
                None => (None, s.trim().to_owned()),
            },
            Form::Long(l) => (l.what, l.ttl),
        };
        let all = match what.as_deref() {
            None | Some("static") => false,
            Some("all") => true,
            Some(other) => {
                return Err(serde::de::Error::custom(format!(
                    "`{other}` is not what a cache keeps; write `static` or `all`, e.g. \"static, 10m\""
                )));
            }
        };
        let ttl = humantime::parse_duration(&ttl).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{ttl}` is not a duration ({e}); write a cache policy as e.g. \"static, 10m\""
            ))
        })?;
        Ok(Self { all, ttl })
    }
}

/// Memory of the edge cache, shared by every route with `cache:`; the least recently used
/// answers go first.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct EdgeCache {
    /// Bytes all kept answers may take (bodies, headers and keys); default 64 MiB.
    pub memory_bytes: usize,
    /// A larger answer is served but not kept; default 4 MiB.
    pub max_object_bytes: usize,
}

impl Default for EdgeCache {
    fn default() -> Self {
        Self { memory_bytes: 64 << 20, max_object_bytes: 4 << 20 }
    }
}
