//! Shared between the XDP program (`lb-ebpf`) and userspace (`lb-userspace`).
//!
//! Layout:
//! - [`maps`]: BPF map names, keys and values (`#[repr(C)]`, explicit padding, size-asserted).
//! - [`packet`]: wire header layouts and the [`packet::Packet`] buffer abstraction.
//! - [`hash`]: the flow hash; identical on every node so every node picks the same backend.
//! - [`csum`]: incremental checksum updates.
//! - [`datapath`]: the forwarding decision, written once and run both in the kernel and on the
//!   host (tests and the reference model).
//! - [`decap`]: the decapsulation program's logic, for backends of `dsr-ipip` services.
#![no_std]
#![expect(
    clippy::inline_always,
    reason = "the decision must be inlined into the XDP entry point so the verifier sees every bounds check"
)]

pub mod csum;
pub mod datapath;
pub mod decap;
pub mod hash;
pub mod maps;
pub mod packet;
