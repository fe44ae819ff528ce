//! lbd, the lb daemon, and lb-ctl, its operator CLI.
//!
//! Layout (data flows one way: registry -> plan -> maps):
//! - [`config`]: the service registry: schema, parsing, validation, located errors.
//! - [`plan`]: registry + resolved backends -> desired data plane contents (pure).
//! - [`model`]: those contents in memory behind the datapath's `Tables`: the reference the
//!   kernel program is checked against.
//! - [`maps`]: typed BPF map access; the only writer of maps.
//! - [`maglev`]: weighted Maglev tables (pure).
//! - [`loader`]: loading the XDP object, attaching it (or swapping it behind a pinned link),
//!   detaching it.
//! - [`pins`]: the state pinned in bpffs across restarts: its directory, lock and layout checks.
//! - [`netlink`]: interfaces and the neighbour table over rtnetlink.
//! - [`resolve`]: backend host -> address -> MAC.
//! - [`health`]: active health checks: rise/fall state (pure) and the probe tasks.
//! - [`control`]: the controller, sole owner of lbd's state; every change goes through it.
//! - [`report`]: `/lb-status` JSON and `/metrics` text from a snapshot (pure).
//! - [`admin`]: the admin API's HTTP side; [`client`]: the blocking client lb-ctl uses.
//! - [`tls`]: certificates, SNI, and a listener's rustls settings.
//! - [`watch`]: registry file watching (inotify).
//! - [`daemon`]: lbd's lifecycle and event loop.
//! - [`edge`]: the HTTP edge: listeners, routing, proxying with balancing, failover, retries.
//! - [`notify`]: readiness (`sd_notify`) for supervisors, tests and the demo.
//! - [`logging`]: human or JSON log lines.

pub mod admin;
pub mod cidr;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod edge;
pub mod health;
pub mod loader;
pub mod logging;
pub mod maglev;
pub mod maps;
pub mod model;
pub mod netlink;
pub mod notify;
pub mod pins;
pub mod plan;
pub mod report;
pub mod resolve;
pub mod tls;
pub mod watch;
