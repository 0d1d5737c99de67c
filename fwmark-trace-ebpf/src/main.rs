//! fwmark-trace's kernel observers. Every program reduces to `observe::observe(skb, site)`;
//! they differ only in how they find the `sk_buff` and describe where they are, which the
//! macros below turn into data (no per-hook copies):
//! - tc: first and last in the ingress and egress paths, as tcx links (6.6+) or cls_bpf filters
//!   (the context pointer *is* the skb);
//! - netfilter: one program per priority slot, linked on every hook of IPv4 and IPv6 by the
//!   daemon itself (aya 0.14 has no netfilter program type), hook and family read from
//!   `nf_hook_state`; on kernels without netfilter links (before 6.4), fentry/fexit of the
//!   chain evaluators (`nft_do_chain`, `ipt_do_table`, `ip6t_do_table`) instead, which also
//!   know the priority of the chain they evaluate;
//! - tp_btf: one program per line of the common crate's `tracepoint_observers!` table
//!   (netif_receive_skb, net_dev_queue, kfree_skb with its drop reason, consume_skb, and the
//!   FIB lookups).
#![no_std]
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]

mod maps;
mod observe;
mod skb;

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{tcx_action_base::TCX_NEXT, TC_ACT_UNSPEC},
    macros::{btf_tracepoint, classifier, fentry, fexit},
    programs::{BtfTracePointContext, FEntryContext, FExitContext, TcContext},
};
use fwmark_trace_common::{
    layer, nf_hook, nfproto, route_hook, tc_dir, tc_slot, Config, Event, Point, Tracepoint,
    NF_SLOT_CHAIN,
};
use maps::FOLLOWING;
use observe::{End, Site};
use skb::read;

/// A point on the skb's device (tc and tracepoints).
#[inline(always)]
fn dev_point(skb: u64, layer: u8, hook: u8, slot: u8) -> Point {
    let off = &observe::config().offsets;
    // tp_btf's skb is BTF-typed, and so is the net_device loaded through it.
    let dev: u64 = skb::load(skb, off.skb_dev);
    let (ifindex, netns) = if dev == 0 {
        (0, 0)
    } else {
        let net: u64 = skb::load(dev, off.dev_nd_net);
        (
            skb::load(dev, off.dev_ifindex),
            if net == 0 {
                0
            } else {
                skb::load(net, off.net_ns_inum)
            },
        )
    };
    Point {
        layer,
        hook,
        slot,
        family: 0,
        ifindex,
        netns,
        priority: 0,
    }
}

// ---- tc (tcx links, or cls_bpf filters before 6.6) ---------------------------------------

/// What a tc observer returns: the packet goes on as if the observer were not there. tcx's
/// TCX_NEXT (the next program in the chain) is the same -1 as a direct-action cls_bpf filter's
/// TC_ACT_UNSPEC (the next filter; after the last, the packet goes on), so one program serves
/// both back-ends.
const TC_NEXT: i32 = TCX_NEXT;
const _: () = assert!(TC_NEXT == TC_ACT_UNSPEC);

// aya-ebpf's `#[classifier]` emits the entry point: section `classifier` (which aya loads as a
// SchedClassifier, attached by the daemon as a tcx link or a cls_bpf filter) taking the
// `*mut __sk_buff` context, and calls the body as a nested function with a `TcContext`. That
// call is inlined by request (`inline(always)`), not left to LLVM: a BPF-to-BPF call fails
// 6.1's verifier (`kernel::netfilter`'s tests check the object has none).
macro_rules! tc_observer {
    ($name:ident, $dir:expr, $slot:expr) => {
        #[classifier]
        #[inline(always)]
        pub fn $name(ctx: TcContext) -> i32 {
            let skb = ctx.skb.skb;
            // SAFETY: `skb` is the context the kernel passed this program, a `__sk_buff` valid
            // for its whole run; `mark` and `ifindex` are fields every tc program may read, as
            // direct loads (no helper call: this runs for every packet).
            let (mark, ifindex) = unsafe { ((*skb).mark, (*skb).ifindex) };
            let site = Site {
                at: Point {
                    layer: layer::TC,
                    hook: $dir,
                    slot: $slot,
                    family: 0,
                    ifindex,
                    netns: observe::config().own_netns,
                    priority: 0,
                },
                l3_at_data: false,
                end: None,
                mark: Some(mark),
                starts: true,
            };
            // The context pointer is the kernel's `struct sk_buff *`: the packet's identity, the
            // same value the netfilter and tp_btf observers see.
            observe::observe::<false>(skb as u64, &site);
            TC_NEXT
        }
    };
}

// One program per line of `tc_observers!` (fwmark-trace-common).
macro_rules! tc_programs {
    ($($program:ident = $dir:ident, $slot:ident;)*) => {
        $(tc_observer!($program, tc_dir::$dir, tc_slot::$slot);)*
    };
}

fwmark_trace_common::tc_observers!(tc_programs);

// ---- netfilter ----------------------------------------------------------------------------

/// `struct bpf_nf_ctx` (UAPI-stable layout: two pointers).
#[repr(C)]
pub struct NfCtx {
    state: u64,
    skb: u64,
}

const NF_ACCEPT: i32 = 1;

/// The netfilter point of a hook invocation, from its `nf_hook_state` (a BTF-typed pointer:
/// plain loads, no helper calls).
#[inline(always)]
fn nf_point(state: u64, slot: u8, priority: i32, netns: u32) -> Point {
    let off = &observe::config().offsets;
    let hook: u8 = skb::load(state, off.nf_state_hook);
    // Report the device the packet arrived on before routing, and the one it leaves by after.
    let dev: u64 = match hook {
        nf_hook::PRE_ROUTING | nf_hook::LOCAL_IN | nf_hook::FORWARD => {
            skb::load(state, off.nf_state_in)
        }
        _ => skb::load(state, off.nf_state_out),
    };
    Point {
        layer: layer::NETFILTER,
        hook,
        slot,
        family: skb::load(state, off.nf_state_pf),
        ifindex: if dev == 0 {
            0
        } else {
            skb::load(dev, off.dev_ifindex)
        },
        netns,
        priority,
    }
}

#[inline(always)]
fn nf_site(at: Point, starts: bool) -> Site {
    Site {
        at,
        l3_at_data: false,
        end: None,
        mark: None,
        starts,
    }
}

#[inline(always)]
fn nf_observe(ctx: *const NfCtx, slot: u8) -> i32 {
    // SAFETY: `ctx` is the context the kernel passed this netfilter program: a `struct
    // bpf_nf_ctx` (two pointers, UAPI layout), valid and unchanged for the program's run.
    let ctx = unsafe { &*ctx };
    let at = nf_point(ctx.state, slot, 0, observe::config().own_netns);
    observe::observe::<true>(ctx.skb, &nf_site(at, true));
    NF_ACCEPT
}

// Not `#[classifier]`: these take a `struct bpf_nf_ctx`, not a `__sk_buff`, and aya 0.14 has
// no netfilter program type. The daemon loads them itself (`kernel/netfilter.rs`); the section
// name is only one aya's ELF parser accepts, and aya never loads them.
macro_rules! nf_observers {
    ($($name:ident = $slot:expr),* $(,)?) => {$(
        // Entry point: the kernel passes a valid context pointer (see `nf_observe`).
        #[allow(clippy::not_unsafe_ptr_arg_deref)]
        // SAFETY: the symbol is this program's unique name, which the daemon loads it by; the
        // section holds only programs (aya's parser takes them for classifiers, never loaded).
        #[unsafe(no_mangle)]
        #[unsafe(link_section = "classifier")]
        pub fn $name(ctx: *const NfCtx) -> i32 {
            nf_observe(ctx, $slot)
        }
    )*};
}

nf_observers!(
    fwm_nf_0 = 0,
    fwm_nf_1 = 1,
    fwm_nf_2 = 2,
    fwm_nf_3 = 3,
    fwm_nf_4 = 4,
    fwm_nf_5 = 5,
    fwm_nf_6 = 6,
    fwm_nf_7 = 7,
    fwm_nf_8 = 8,
    fwm_nf_9 = 9,
);
const _: () = assert!(fwmark_trace_common::NF_SLOTS == 10);
// `nf_observe` reads `hook` and `pf` together; the daemon checks they are adjacent.

// ---- netfilter chain evaluators (fentry/fexit) ------------------------------------------

/// One evaluation of a chain (an nftables base chain, an iptables table) at `priority`, seen
/// on entry and on exit: the exit point sits one past it, so the band in between is exactly
/// the chains at that priority. Every namespace's chains run through these functions, and
/// those of other families (netdev, bridge, arp) too: only the traced namespace's IPv4 and
/// IPv6 hooks are observed, as with netfilter links.
#[inline(always)]
fn chain_observe(skb: u64, state: u64, priority: i32, exit: bool) -> i32 {
    let cfg = observe::config();
    let off = &cfg.offsets;
    let net: u64 = skb::load(state, off.nf_state_net);
    if net == 0 || skb::load::<u32>(net, off.net_ns_inum) != cfg.own_netns {
        return 0;
    }
    let family: u8 = skb::load(state, off.nf_state_pf);
    if family != nfproto::IPV4 && family != nfproto::IPV6 {
        return 0;
    }
    let priority = if exit {
        priority.saturating_add(1)
    } else {
        priority
    };
    let at = nf_point(state, NF_SLOT_CHAIN, priority, cfg.own_netns);
    // Its entry comes first: an exit that finds no packet is a late one. On 6.1 the exit of a
    // chain whose verdict dropped the packet runs after kfree_skb (measured by timestamps):
    // taken for a first sight, it would start a packet at the address the next one gets.
    observe::observe::<true>(skb, &nf_site(at, !exit));
    0
}

/// `nft_do_chain(struct nft_pktinfo *pkt, void *priv)`: `priv` is the base chain's
/// `struct nft_chain`, inside its `nft_base_chain` after the hook ops holding the priority.
#[inline(always)]
fn nft_chain(pkt: u64, chain: u64, exit: bool) -> i32 {
    let off = &observe::config().offsets;
    // `void *` is an integer to the verifier: the priority is read with the helper.
    let priority: i32 = read(chain - off.nft_chain_prio_back as u64, 0);
    chain_observe(
        skb::load(pkt, off.nft_pkt_skb),
        skb::load(pkt, off.nft_pkt_state),
        priority,
        exit,
    )
}

/// `ipt_do_table`/`ip6t_do_table(void *priv, struct sk_buff *skb, const struct
/// nf_hook_state *state)`: `priv` is the `struct xt_table`.
#[inline(always)]
fn xt_table(table: u64, skb: u64, state: u64, exit: bool) -> i32 {
    let priority: i32 = read(table, observe::config().offsets.xt_table_priority);
    chain_observe(skb, state, priority, exit)
}

macro_rules! chain_observers {
    ($($entry:ident, $exit:ident = $func:literal, $observe:ident($($arg:literal),*);)*) => {$(
        #[fentry(function = $func)]
        pub fn $entry(ctx: FEntryContext) -> i32 {
            $observe($(ctx.arg::<*const u8>($arg) as u64),*, false)
        }
        #[fexit(function = $func)]
        pub fn $exit(ctx: FExitContext) -> i32 {
            $observe($(ctx.arg::<*const u8>($arg) as u64),*, true)
        }
    )*};
}

chain_observers!(
    fwm_nft_in, fwm_nft_out = "nft_do_chain", nft_chain(0, 1);
    fwm_ipt_in, fwm_ipt_out = "ipt_do_table", xt_table(0, 1, 2);
    fwm_ip6t_in, fwm_ip6t_out = "ip6t_do_table", xt_table(0, 1, 2);
);

// ---- tracepoints --------------------------------------------------------------------------

// One program per line of `tracepoint_observers!` (fwmark-trace-common), named and attached as
// the line says; its body is the handler of the same name in `handle`.
macro_rules! tracepoint_programs {
    ($($variant:ident / $id_name:ident = $id:literal, $program:ident, $target:literal, $layer:ident;)*) => {$(
        #[btf_tracepoint(function = $target)]
        pub fn $program(ctx: BtfTracePointContext) -> i32 {
            handle::$program(&ctx)
        }
    )*};
}

fwmark_trace_common::tracepoint_observers!(tracepoint_programs);

/// An observer of a tracepoint on the packet's path whose first argument is the skb; `end`:
/// the packet's life ends there.
#[inline(always)]
fn skb_tracepoint(
    ctx: &BtfTracePointContext,
    tp: Tracepoint,
    end: Option<End>,
    l3_at_data: bool,
) -> i32 {
    let skb: u64 = ctx.arg::<*const u8>(0) as u64;
    // Every freed skb in the system passes the end-of-life observers: untracked ones cost one
    // map lookup in `observe`, and no reads.
    // At end of life `skb->dev` may be scratch space (UDP reuses it): the packet's last
    // observation supplies device and namespace instead.
    let at = if end.is_some() {
        Point {
            layer: layer::TRACEPOINT,
            hook: tp as u8,
            ..Point::default()
        }
    } else {
        dev_point(skb, layer::TRACEPOINT, tp as u8, 0)
    };
    let site = Site {
        at,
        l3_at_data,
        end,
        mark: None,
        starts: true,
    };
    observe::observe::<true>(skb, &site);
    0
}

/// The tracepoint handlers, one per line of `tracepoint_observers!`, by program name. Inlined
/// into their programs: no BPF-to-BPF calls (see `tc_observer!`).
mod handle {
    use aya_ebpf::programs::BtfTracePointContext;
    use fwmark_trace_common::Tracepoint;

    use super::{fib, fib6, observe::End, skb_tracepoint};

    #[inline(always)]
    pub(super) fn fwm_rx(ctx: &BtfTracePointContext) -> i32 {
        skb_tracepoint(ctx, Tracepoint::NetifReceiveSkb, None, true)
    }

    #[inline(always)]
    pub(super) fn fwm_dev_queue(ctx: &BtfTracePointContext) -> i32 {
        skb_tracepoint(ctx, Tracepoint::NetDevQueue, None, false)
    }

    /// kfree_skb(skb, location, enum skb_drop_reason reason, rx_sk)
    #[inline(always)]
    pub(super) fn fwm_kfree(ctx: &BtfTracePointContext) -> i32 {
        let reason = ctx.arg::<u64>(2) as u32;
        skb_tracepoint(ctx, Tracepoint::KfreeSkb, Some(End::Drop(reason)), false)
    }

    #[inline(always)]
    pub(super) fn fwm_consume(ctx: &BtfTracePointContext) -> i32 {
        skb_tracepoint(ctx, Tracepoint::ConsumeSkb, Some(End::Consume), false)
    }

    #[inline(always)]
    pub(super) fn fwm_fib(ctx: &BtfTracePointContext) -> i32 {
        fib(ctx)
    }

    #[inline(always)]
    pub(super) fn fwm_fib6(ctx: &BtfTracePointContext) -> i32 {
        fib6(ctx)
    }
}

// ---- routing ------------------------------------------------------------------------------

/// A routing lookup event for the flow `flp` (fields common to flowi4 and flowi6), written
/// into `blank`.
#[inline(always)]
fn route_event(
    blank: &mut MaybeUninit<Event>,
    flp: u64,
    dev: u64,
    family: u8,
    table: u32,
    err: i32,
) -> Option<&mut Event> {
    let cfg = observe::config();
    let off = &cfg.offsets;
    let (ifindex, netns) = skb::dev_ids(dev, off);
    if cfg.netns != 0 && netns != 0 && netns != cfg.netns {
        return None;
    }
    let mark = read(flp, off.fl4_mark);
    let ev = observe::blank_event(blank);
    ev.kind = fwmark_trace_common::kind::ROUTE;
    ev.at = Point {
        layer: layer::ROUTING,
        hook: route_hook::LOOKUP,
        slot: 0,
        family,
        ifindex,
        netns,
        priority: 0,
    };
    ev.old_mark = mark;
    ev.new_mark = mark;
    ev.table = table;
    ev.route_err = err;
    ev.route_oif = read(flp, off.fl4_oif);
    ev.route_iif = read(flp, off.fl4_iif);
    ev.ip_version = if family == nfproto::IPV6 { 6 } else { 4 };
    ev.l4_proto = read(flp, off.fl4_proto);
    Some(ev)
}

/// Emits a lookup unless flows are followed and it does not concern them: by its flow key, and
/// when that has no ports, by the packet this CPU is processing.
#[inline(always)]
fn emit_route(cfg: &Config, ev: &Event) {
    let portless = ev.sport == 0 && ev.dport == 0;
    let current = || FOLLOWING.get(0).is_some_and(|f| *f != 0);
    if cfg.flow.active == 0 || (cfg.flow.matches(ev, true) && (!portless || current())) {
        observe::emit(*ev);
    }
}

/// `uli.ports` is {dport, sport}, big-endian.
#[inline(always)]
fn route_ports(ev: &mut Event, flp: u64, off: u32) {
    let ports: [u16; 2] = read(flp, off);
    ev.dport = u16::from_be(ports[0]);
    ev.sport = u16::from_be(ports[1]);
}

/// fib_table_lookup(u32 tb_id, const struct flowi4 *flp, const struct fib_nh_common *nhc,
/// int err): one event per table tried, so the rule walk and the table that answered show up.
/// No skb here: userspace joins lookups to flows by their addresses.
#[inline(always)]
fn fib(ctx: &BtfTracePointContext) -> i32 {
    let cfg = observe::config();
    if cfg.routes == 0 {
        return 0;
    }
    let off = &cfg.offsets;
    let flp: u64 = ctx.arg::<*const u8>(1) as u64;
    let nhc: u64 = ctx.arg::<*const u8>(2) as u64;
    // nhc is NULL when the lookup failed; the verifier wants that checked before any offset.
    let dev = if nhc == 0 { 0 } else { read(nhc, off.nhc_dev) };
    let mut blank = MaybeUninit::uninit();
    let Some(ev) = route_event(
        &mut blank,
        flp,
        dev,
        nfproto::IPV4,
        ctx.arg::<u32>(0),
        ctx.arg::<i32>(3),
    ) else {
        return 0;
    };
    route_ports(ev, flp, off.fl4_ports);
    ev.saddr[..4].copy_from_slice(&read::<[u8; 4]>(flp, off.fl4_saddr));
    ev.daddr[..4].copy_from_slice(&read::<[u8; 4]>(flp, off.fl4_daddr));
    emit_route(cfg, ev);
    0
}

/// RTN_UNICAST and RTN_LOCAL: a route that delivers; other types refuse (unreachable,
/// blackhole, prohibit) and a missing next hop means "not in this table".
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;
const RTN_UNREACHABLE: u8 = 7;
const EAGAIN: i32 = 11;
const ENETUNREACH: i32 = 101;

/// fib6_table_lookup(struct net *, const struct fib6_result *res, struct fib6_table *table,
/// const struct flowi6 *flp).
#[inline(always)]
fn fib6(ctx: &BtfTracePointContext) -> i32 {
    let cfg = observe::config();
    if cfg.routes == 0 || cfg.offsets.fib6_tb_id == fwmark_trace_common::OFFSET_MISSING {
        return 0;
    }
    let off = &cfg.offsets;
    let res: u64 = ctx.arg::<*const u8>(1) as u64;
    let table: u64 = ctx.arg::<*const u8>(2) as u64;
    let flp: u64 = ctx.arg::<*const u8>(3) as u64;
    if res == 0 || table == 0 || flp == 0 {
        return 0;
    }
    let nh: u64 = read(res, off.fib6_res_nh);
    let kind: u8 = read(res, off.fib6_res_type);
    // fib6_nh starts with its fib_nh_common.
    let dev = if nh == 0 { 0 } else { read(nh, off.nhc_dev) };
    let mut blank = MaybeUninit::uninit();
    let tb_id = read(table, off.fib6_tb_id);
    let Some(ev) = route_event(&mut blank, flp, dev, nfproto::IPV6, tb_id, 0) else {
        return 0;
    };
    // A table without a match answers with the null entry (unreachable, via lo): the rule
    // walk goes on, as with IPv4's -EAGAIN.
    ev.route_err = match (nh, kind) {
        (0, _) => -EAGAIN,
        (_, RTN_UNICAST | RTN_LOCAL) => 0,
        (_, RTN_UNREACHABLE) if ev.at.ifindex == 1 => -EAGAIN,
        _ => -ENETUNREACH,
    };
    route_ports(ev, flp, off.fl6_ports);
    ev.saddr = read(flp, off.fl6_saddr);
    ev.daddr = read(flp, off.fl6_daddr);
    emit_route(cfg, ev);
    0
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// SAFETY: the license section and symbol the kernel's loader reads; nothing else uses them.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
