//! XDP entry points. Thin by design: the decision lives in `lb_common::datapath`, so the host
//! runs the very same code in tests.
//!
//! - `lb_balancer`: balances VIP traffic; everything else goes to the stack.
//! - `lb_pass`: passes every frame. Native XDP_TX on a veth only delivers when the peer has an
//!   XDP program too; tests and the demo attach this one there.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    datapath::{self, Action, Counter, Tables},
    maps::{Backend, MAX_BACKENDS, MAX_BACKENDS_PER_VIP, MAX_VIPS, NodeConfig, VipInfo, VipKey, VipStats},
    packet::{Header, Packet},
};

#[map]
static LB_VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
static LB_VIP_BACKENDS: Array<u32> = Array::with_max_entries(MAX_VIPS * MAX_BACKENDS_PER_VIP, 0);
#[map]
static LB_BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);
#[map]
static LB_NODE: Array<NodeConfig> = Array::with_max_entries(1, 0);
#[map]
static LB_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
#[map]
static LB_VIP_STATS: PerCpuArray<VipStats> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

struct XdpPacket<'a>(&'a XdpContext);

impl Packet for XdpPacket<'_> {
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.data_end() - self.0.data()
    }

    #[inline(always)]
    fn header<H: Header>(&mut self, offset: usize) -> Option<&mut H> {
        let start = self.0.data();
        if start + offset + core::mem::size_of::<H>() > self.0.data_end() {
            return None;
        }
        // SAFETY: the bytes are inside the frame (checked above, and by the verifier); H has
        // alignment 1 and accepts any bit pattern.
        Some(unsafe { &mut *((start + offset) as *mut H) })
    }
}

struct Maps;

impl Tables for Maps {
    #[inline(always)]
    fn vip(&self, key: &VipKey) -> Option<VipInfo> {
        // SAFETY: the value is copied out before the map can change under it.
        unsafe { LB_VIPS.get(key) }.copied()
    }

    #[inline(always)]
    fn vip_backend(&self, index: u32) -> Option<u32> {
        LB_VIP_BACKENDS.get(index).copied()
    }

    #[inline(always)]
    fn backend(&self, id: u32) -> Option<Backend> {
        LB_BACKENDS.get(id).copied()
    }

    #[inline(always)]
    fn node(&self) -> Option<NodeConfig> {
        LB_NODE.get(0).copied()
    }

    #[inline(always)]
    fn count(&self, counter: Counter) {
        if let Some(c) = LB_COUNTERS.get_ptr_mut(counter as u32) {
            // SAFETY: a per-CPU slot: only programs on this CPU write it, one at a time.
            unsafe { *c += 1 };
        }
    }

    #[inline(always)]
    fn count_vip(&self, vip_id: u32, bytes: u64) {
        if let Some(s) = LB_VIP_STATS.get_ptr_mut(vip_id) {
            // SAFETY: as in `count`.
            unsafe {
                (*s).packets += 1;
                (*s).bytes += bytes;
            }
        }
    }
}

#[xdp]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    datapath::process(&mut XdpPacket(&ctx), &Maps).xdp_code()
}

#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    Action::Pass.xdp_code()
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Host builds (`cargo build --workspace`, clippy) compile the programs but have nothing to run.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
