//! XDP entry points. Thin by design: the decisions live in `lb_common::datapath` and
//! `lb_common::decap`, so the host runs the very same code in the reference model.
//!
//! - `lb_balancer`: balances VIP traffic; everything else goes to the stack.
//! - `lb_decap`: for backends of `dsr-ipip` services: unwraps tunnelled packets for this host.
//! - `lb_pass`: passes every frame. Native XDP_TX on a veth only delivers when the peer has an
//!   XDP program too; tests and the demo attach this one there.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST, xdp_md},
    btf_maps::{Array as BtfArray, ArrayOfMaps},
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_head},
    macros::{btf_map, map, xdp},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::{
    datapath::{self, Action, Counter, Scratch, Tables},
    decap::{self, DecapCounter, DecapTables},
    maps::{
        AddrKey, BACKEND_IDS, Backend, CtEntry, DEFAULT_CONNTRACK_SIZE, DEFAULT_NAT_SIZE, DenyKey,
        FRAGMENTS_SIZE, FlowKey, FragEntry, FragKey, MAX_DECAP_ADDRS, MAX_DENY, MAX_TABLES, NatEntry,
        NodeConfig, Traffic, VIP_IDS, VipInfo, VipKey,
    },
    packet::{Header, MAX_HEADER_OFFSET, Packet},
};

/// Template of the inner Maglev tables: any size (`BPF_F_INNER_MAP`), and mmap-able so userspace
/// fills a table with one write instead of a syscall per slot (`BPF_F_MMAPABLE`).
const TABLE_FLAGS: usize = 4096 | 1024;

#[map]
static LB_VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(VIP_IDS, 0);
#[map]
static LB_VIP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(VIP_IDS, 0);
#[btf_map]
static LB_TABLES: ArrayOfMaps<BtfArray<u32, 1, TABLE_FLAGS>, { MAX_TABLES as usize }> = ArrayOfMaps::new();
#[map]
static LB_BACKENDS: Array<Backend> = Array::with_max_entries(BACKEND_IDS, 0);
#[map]
static LB_NODE: Array<NodeConfig> = Array::with_max_entries(1, 0);
// Conntrack is one global LRU, not per-CPU: a flow's packets are not bound to one CPU (veth
// and generic XDP run on the sender's CPU; RSS tables get rebalanced), and a per-CPU table would
// then send one flow to several backends. The hit path costs one shared lookup, measured in
// `cargo xtask bench xdp` (about 150 ns a packet with its state in cache). Per-CPU LRU lists over
// the shared table (BPF_F_NO_COMMON_LRU) measured no faster there (new flow 746 vs 655 ns,
// established 201 vs 170 ns, dsr-l2 IPv4, one CPU) and split the capacity per CPU, so a CPU that
// takes most flows (one veth, one RX queue) would evict early.
#[map]
static LB_CONNTRACK: LruHashMap<FlowKey, CtEntry> = LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, 0);
#[map]
static LB_NAT: LruHashMap<FlowKey, NatEntry> = LruHashMap::with_max_entries(DEFAULT_NAT_SIZE, 0);
#[map]
static LB_FRAGMENTS: LruHashMap<FragKey, FragEntry> = LruHashMap::with_max_entries(FRAGMENTS_SIZE, 0);
#[map]
static LB_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
#[map]
static LB_VIP_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(VIP_IDS, 0);
#[map]
static LB_BACKEND_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(BACKEND_IDS, 0);
/// Working memory of the balancer, off the 512-byte BPF stack (`datapath::Scratch`).
#[map]
static LB_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
#[map]
static LB_DENY: LpmTrie<DenyKey, u32> = LpmTrie::with_max_entries(MAX_DENY, 0);
#[map]
static LB_DECAP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_DECAP_ADDRS, 0);
#[map]
static LB_DECAP_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DecapCounter::COUNT, 0);

/// The XDP frame. The datapath is split into BPF functions; `data`/`data_end` are read from the
/// context with volatile loads where they are used, so LLVM never passes them between functions
/// as plain integers (the verifier refuses arithmetic on a packet-end pointer that crossed a call
/// that way).
struct XdpPacket {
    ctx: *mut xdp_md,
}

impl XdpPacket {
    #[inline(always)]
    fn bounds(&self) -> (usize, usize) {
        // SAFETY: `ctx` is the program's context for the whole run.
        unsafe {
            (
                core::ptr::read_volatile(&raw const (*self.ctx).data) as usize,
                core::ptr::read_volatile(&raw const (*self.ctx).data_end) as usize,
            )
        }
    }
}

impl Packet for XdpPacket {
    #[inline(always)]
    fn len(&self) -> usize {
        let (start, end) = self.bounds();
        end - start
    }

    #[inline(always)]
    fn header<H: Header>(&mut self, offset: usize) -> Option<&mut H> {
        if offset > MAX_HEADER_OFFSET {
            return None;
        }
        let (start, end) = self.bounds();
        if start + offset + core::mem::size_of::<H>() > end {
            return None;
        }
        // SAFETY: the bytes are inside the frame (checked above, and by the verifier); H has
        // alignment 1 and accepts any bit pattern.
        Some(unsafe { &mut *((start + offset) as *mut H) })
    }

    #[inline(always)]
    fn adjust_head(&mut self, delta: i32) -> bool {
        // SAFETY: the helper checks the bounds itself; every header is re-read afterwards.
        unsafe { bpf_xdp_adjust_head(self.ctx, delta) == 0 }
    }
}

#[inline(always)]
fn add(counter: &PerCpuArray<u64>, index: u32) {
    if let Some(c) = counter.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot: only programs on this CPU write it, one at a time.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add_traffic(stats: &PerCpuArray<Traffic>, index: u32, bytes: u64) {
    if let Some(s) = stats.get_ptr_mut(index) {
        // SAFETY: as in `add`.
        unsafe {
            (*s).packets += 1;
            (*s).bytes += bytes;
        }
    }
}

struct Maps;

impl Tables for Maps {
    #[inline(always)]
    fn now_ns(&self) -> u64 {
        // SAFETY: no preconditions.
        unsafe { bpf_ktime_get_coarse_ns() }
    }

    #[inline(always)]
    fn node(&self) -> Option<&NodeConfig> {
        LB_NODE.get(0)
    }

    #[inline(always)]
    fn vip(&self, key: &VipKey) -> Option<&VipInfo> {
        // SAFETY: VIP records are replaced whole by userspace, never written in place.
        unsafe { LB_VIPS.get(key) }
    }

    #[inline(always)]
    fn is_vip_addr(&self, key: &AddrKey) -> bool {
        // SAFETY: only presence is read.
        unsafe { LB_VIP_ADDRS.get(key) }.is_some()
    }

    #[inline(always)]
    fn denied(&self, key: &DenyKey) -> bool {
        // Every bit of the key: the trie answers with the longest range that holds it.
        LB_DENY.get(Key::new(DenyKey::prefix_len(128), *key)).is_some()
    }

    #[inline(always)]
    fn table_slot(&self, table: u32, slot: u32) -> Option<u32> {
        LB_TABLES.get_value(table, &slot).copied()
    }

    #[inline(always)]
    fn backend(&self, id: u32) -> Option<&Backend> {
        LB_BACKENDS.get(id)
    }

    #[inline(always)]
    fn ct_get(&self, key: &FlowKey) -> Option<CtEntry> {
        // SAFETY: the value is copied out at once.
        unsafe { LB_CONNTRACK.get(key) }.copied()
    }

    #[inline(always)]
    fn ct_put(&self, key: &FlowKey, value: &CtEntry) {
        let _ = LB_CONNTRACK.insert(key, value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn ct_update(&self, key: &FlowKey, f: impl FnOnce(&mut CtEntry)) -> bool {
        match LB_CONNTRACK.get_ptr_mut(key) {
            // SAFETY: a live map value; concurrent writers only refresh timestamps and state,
            // where the last writer winning is fine.
            Some(e) => {
                f(unsafe { &mut *e });
                true
            }
            None => false,
        }
    }

    #[inline(always)]
    fn nat_update(&self, key: &FlowKey, f: impl FnOnce(&mut NatEntry)) -> bool {
        match LB_NAT.get_ptr_mut(key) {
            // SAFETY: as in `ct_update`.
            Some(e) => {
                f(unsafe { &mut *e });
                true
            }
            None => false,
        }
    }

    #[inline(always)]
    fn nat_get(&self, key: &FlowKey) -> Option<NatEntry> {
        // SAFETY: the value is copied out at once.
        unsafe { LB_NAT.get(key) }.copied()
    }

    #[inline(always)]
    fn nat_insert_new(&self, key: &FlowKey, value: &NatEntry) -> bool {
        LB_NAT.insert(key, value, u64::from(BPF_NOEXIST)).is_ok()
    }

    #[inline(always)]
    fn nat_put(&self, key: &FlowKey, value: &NatEntry) {
        let _ = LB_NAT.insert(key, value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn frag_get(&self, key: &FragKey) -> Option<FragEntry> {
        // SAFETY: the value is copied out at once.
        unsafe { LB_FRAGMENTS.get(key) }.copied()
    }

    #[inline(always)]
    fn frag_put(&self, key: &FragKey, value: &FragEntry) {
        let _ = LB_FRAGMENTS.insert(key, value, u64::from(BPF_ANY));
    }

    #[inline(always)]
    fn count(&self, counter: Counter) {
        add(&LB_COUNTERS, counter as u32);
    }

    #[inline(always)]
    fn count_vip(&self, vip_id: u32, bytes: u64) {
        add_traffic(&LB_VIP_STATS, vip_id, bytes);
    }

    #[inline(always)]
    fn count_backend(&self, backend: u32, bytes: u64) {
        add_traffic(&LB_BACKEND_STATS, backend, bytes);
    }
}

struct DecapMaps;

impl DecapTables for DecapMaps {
    #[inline(always)]
    fn is_local(&self, key: &AddrKey) -> bool {
        // SAFETY: only presence is read.
        unsafe { LB_DECAP_ADDRS.get(key) }.is_some()
    }

    #[inline(always)]
    fn count(&self, counter: DecapCounter) {
        add(&LB_DECAP_COUNTERS, counter as u32);
    }
}

/// Build stamp: `LB_EBPF_REVISION=N` at build time (N > 0) adds one instruction that does
/// nothing, so the program's bytes and kernel tag differ from a build without it. The upgrade
/// test swaps such a build in under load, as a new lbd with a changed program would.
const REVISION: u32 = parse_revision(option_env!("LB_EBPF_REVISION"));

const fn parse_revision(s: Option<&str>) -> u32 {
    let Some(s) = s else { return 0 };
    let (b, mut i, mut n) = (s.as_bytes(), 0, 0u32);
    while i < b.len() {
        if b[i].is_ascii_digit() {
            n = n.wrapping_mul(10).wrapping_add((b[i] - b'0') as u32);
        }
        i += 1;
    }
    n
}

#[xdp]
pub fn lb_balancer(ctx: XdpContext) -> u32 {
    if REVISION != 0 {
        core::hint::black_box(REVISION);
    }
    let Some(scratch) = LB_SCRATCH.get_ptr_mut(0) else { return Action::Pass.xdp_code() };
    // SAFETY: this CPU's slot; XDP programs do not nest on one CPU, so this run has it alone.
    let scratch = unsafe { &mut *scratch };
    datapath::process(&mut XdpPacket { ctx: ctx.ctx }, &Maps, scratch).xdp_code()
}

#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    decap::decapsulate(&mut XdpPacket { ctx: ctx.ctx }, &DecapMaps);
    Action::Pass.xdp_code()
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
