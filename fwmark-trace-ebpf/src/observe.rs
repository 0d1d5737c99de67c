//! The one observation routine every observer calls: compare the packet's mark and conntrack
//! mark with what the previous observer saw, and emit a transition, a drop, or (in full-path
//! mode) every observation.
//!
//! Cost is what decides whether the daemon can stay on: an observer that sees an unchanged mark
//! reads the mark, finds the packet in this CPU's cache (an array slot, no lock, no hash),
//! records where it was seen and returns. Conntrack, buffer, tuple and socket are read only
//! when something is reported; the shared map is touched at a packet's first sight and end,
//! and when it moved to another CPU.
use core::mem::MaybeUninit;

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, generated};
use fwmark_trace_common::{
    kind, layer, lost_reason, path, socket_slot, tunnel, AggKey, Config, CpuCache, Event,
    PacketState, Point, CACHE_SLOTS, CT_BEFORE, CT_NOW,
};

use crate::{
    maps::{
        AGG, AGG_SCRATCH, CACHE, CONFIG, CONTROL, COUNTED, EVENTS, FOLLOWED, FOLLOWING, IFACES,
        LOST, PACKETS, SEQ,
    },
    skb,
};

/// What the observer knows besides the skb pointer.
pub struct Site {
    pub at: Point,
    /// The IP header starts at `skb->data` (netif_receive_skb) rather than the network header.
    pub l3_at_data: bool,
    /// Set by `kfree_skb`/`consume_skb`: the packet's life ends here.
    pub end: Option<End>,
    /// The mark, when the observer can read it without a helper call (tc's `__sk_buff`).
    pub mark: Option<u32>,
    /// A packet can be first seen here (not at a chain's exit, which follows its entry).
    pub starts: bool,
}

pub enum End {
    Drop(u32),
    Consume,
}

#[inline(always)]
pub fn config() -> &'static Config {
    // SAFETY: the pointer is CONFIG's own address (a static, valid and never written by the
    // program); it goes through a volatile read because the daemon patches the value into
    // .rodata at load time, so the compiler must not fold the zero initialiser.
    unsafe { &*core::ptr::read_volatile(&core::ptr::addr_of!(CONFIG)) }
}

#[inline(always)]
fn cpu() -> u32 {
    // SAFETY: a helper without arguments or memory effects, callable from every program type.
    unsafe { bpf_get_smp_processor_id() }
}

#[inline(always)]
fn next_packet_id() -> u64 {
    match SEQ.get_ptr_mut(0) {
        // SAFETY: a non-NULL pointer to this CPU's `u64` in SEQ, valid for the program's run;
        // only this CPU writes it, and no observer is preempted by another on the same CPU
        // between the read and the write.
        Some(seq) => unsafe {
            *seq += 1;
            ((cpu() as u64) << 48) | *seq
        },
        None => 0,
    }
}

#[inline(always)]
fn count_lost(reason: u32) {
    if let Some(lost) = LOST.get_ptr_mut(reason) {
        // SAFETY: a non-NULL pointer to this CPU's counter in LOST (see next_packet_id).
        unsafe { *lost += 1 };
    }
}

/// One more packet counted in `AGG`.
#[inline(always)]
fn count_counted() {
    if let Some(n) = COUNTED.get_ptr_mut(0) {
        // SAFETY: a non-NULL pointer to this CPU's counter in COUNTED (see next_packet_id).
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn mark_matches(cfg: &Config, mark: u32) -> bool {
    mark & cfg.mark_mask == cfg.mark_value
}

#[inline(always)]
fn iface_matches(cfg: &Config, ifindex: u32) -> bool {
    // SAFETY: `get` is unsafe because the value may change under a returned reference; this
    // one is only tested for presence, never read.
    cfg.iface_filter == 0 || unsafe { IFACES.get(ifindex) }.is_some()
}

/// Whether netfilter observers compare conntrack marks (set while a rule writes one).
#[inline(always)]
fn ct_watched(at: &Point) -> bool {
    at.layer == layer::NETFILTER && CONTROL.get(0).is_some_and(|c| c.ct_watch != 0)
}

/// `BTF`: `skb` is a BTF-typed pointer (netfilter, tp_btf), so its fields are plain loads.
#[inline(always)]
pub fn observe<const BTF: bool>(skb: u64, site: &Site) {
    let cfg = config();
    let off = &cfg.offsets;
    let mark: u32 = site
        .mark
        .unwrap_or_else(|| skb::field::<BTF, _>(skb, off.skb_mark));
    let Some(cache) = CACHE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: a non-NULL pointer to this CPU's `CpuCache` in CACHE, valid for the program's
    // run; the only other writer is `claim` on another CPU, which takes a packet over only
    // after this CPU is done with it (an observer runs to completion without another here).
    let cache = unsafe { &mut *cache };
    let found = cache.find(skb);
    if let Some(i) = found {
        // The common case, in a few dozen instructions: the packet is in this CPU's cache,
        // still on its way, and its mark has not changed. Where it was seen is all to record.
        let c = &mut cache.slots[i];
        let mut at = site.at;
        // Flows are followed and this is none of them: keep its state, report nothing. Its
        // conntrack entry is checked where it can change (tc runs before conntrack).
        if c.unfollowed != 0 && (!BTF || skb::load::<u64>(skb, off.skb_nfct) & !7 == c.ct) {
            if site.end.is_some() {
                return end_quietly(c);
            }
            fill_device(&mut at, &c.last);
            if path::continues(&c.last, &at, false) {
                c.last = at;
                c.mark = mark;
                set_following(false);
                return;
            }
        }
        if cfg.full_path == 0 && c.mark == mark {
            match site.end {
                None if !ct_watched(&at) => {
                    fill_device(&mut at, &c.last);
                    // A mark carried into (or out of) a tunnel is reported (`kind::TUNNEL`).
                    let carried = mark != 0 && path::tunnel(&c.last, &at) != tunnel::NONE;
                    if !carried && path::continues(&c.last, &at, false) {
                        c.last = at;
                        return;
                    }
                }
                // The end of a packet nothing is reported for: leave a tombstone.
                Some(End::Consume) => return end_quietly(c),
                Some(End::Drop(_)) if c.changed == 0 && cfg.all_drops == 0 => {
                    return end_quietly(c)
                }
                _ => {}
            }
        }
    }
    let (i, mine) = match found {
        Some(i) => (i, true),
        None => (cache.victim(), false),
    };
    let i = unknown_to_verifier(cache, i);
    slow_path::<BTF>(skb, site, mark, &mut cache.slots[i], mine, cfg);
}

/// `i`, passed through memory so that the verifier no longer knows its value: as a constant
/// (one per slot) it would walk whatever follows once per slot.
#[inline(always)]
fn unknown_to_verifier(cache: &mut CpuCache, i: usize) -> usize {
    // SAFETY: both pointers come from `&mut cache.pick`: valid, aligned, exclusively ours.
    unsafe {
        core::ptr::write_volatile(&mut cache.pick, i as u32);
        core::ptr::read_volatile(&cache.pick) as usize % CACHE_SLOTS
    }
}

/// Ends a packet's life without a report. Only the cache is told: the shared entry names this
/// CPU, whose cache no longer holds the packet, and that says it ended (see `claim`).
#[inline(always)]
fn end_quietly(c: &mut PacketState) {
    c.alive = PacketState::DEAD;
}

/// An unknown device (NULL, or UDP reusing `skb->dev` as scratch) is the one last seen.
#[inline(always)]
fn fill_device(at: &mut Point, last: &Point) {
    if at.netns == 0 {
        at.netns = last.netns;
    }
    if at.ifindex == 0 {
        at.ifindex = last.ifindex;
    }
}

#[inline(always)]
fn slow_path<const BTF: bool>(
    skb: u64,
    site: &Site,
    mark: u32,
    c: &mut PacketState,
    mine: bool,
    cfg: &Config,
) {
    let off = &cfg.offsets;
    let here = cpu();
    // Not in this CPU's cache: from the shared map (and the cache of the CPU that had it).
    let mut shared = None;
    if !mine {
        shared = PACKETS.get_ptr_mut(skb);
        // SAFETY: a non-NULL `PacketState` of PACKETS: map values stay valid for the program's
        // run (a concurrent delete frees them only after it); another CPU writing the same
        // entry at once is the race the `cpu` hand-over accepts (the newer copy wins).
        let state = shared.and_then(|s| unsafe { claim(&mut *s, skb, here) });
        let unseen_end = matches!(site.end, Some(End::Consume));
        if state.is_none() && (unseen_end || !site.starts || foreign(cfg, &site.at)) {
            // The common end of a packet we never saw, a late chain exit, or a packet first
            // seen outside the traced namespace: nothing to do.
            return;
        }
        evict(c);
        match state {
            Some(state) => *c = state,
            None => c.alive = PacketState::DEAD,
        }
    }
    let head: u64 = skb::field::<BTF, _>(skb, off.skb_head);
    let ct = skb::conntrack::<BTF>(skb, off);
    let mut at = site.at;
    let mut blank = MaybeUninit::uninit();
    let ev = blank_event(&mut blank);
    ev.at = at;
    ev.new_mark = mark;
    ev.new_ct_mark = ct.mark;
    ev.ct_info = ct.info;
    ev.ct_flags = if ct.attached { CT_NOW } else { 0 };
    ev.ct_id = ct.id;
    if c.live() {
        fill_device(&mut at, &c.last);
        ev.at = at;
    }
    // A life that ended without a tracepoint (TCP frees pure ACKs with `__kfree_skb`) leaves
    // its address to an unrelated buffer: one that ends with no protocol (netlink, unix
    // sockets) was never a network packet, and one consumed with another data buffer is
    // another packet (possibly of a namespace not traced, so never followed here), as is one
    // consumed with another mark: nothing between the last observer and a consume writes it,
    // and the slab may hand out the old packet's data buffer again with its address. A drop
    // keeps the benefit of the doubt (NAT into a cloned packet reallocates its buffer, xfrm
    // may set its state's mark and drop).
    let recycled = match site.end {
        Some(End::Consume) => {
            head != c.head || mark != c.mark || skb::field::<BTF, u16>(skb, off.skb_protocol) == 0
        }
        Some(End::Drop(_)) => skb::field::<BTF, u16>(skb, off.skb_protocol) == 0,
        None => false,
    };
    let continues = c.live() && !recycled && path::continues(&c.last, &at, head == c.head);
    if !continues && !site.starts {
        return;
    }
    let report = if continues {
        follow(c, ev, site, mark, &ct, head)
    } else {
        // New, or a new packet at a recycled address (the old one ended unseen).
        first_sight::<BTF>(skb, c, site, ev, head, cfg)
    };
    if site.end.is_some() {
        c.alive = PacketState::DEAD;
    }
    // The shared entry changes only with the packet that owns the address, or with the CPU.
    if !continues || !mine {
        if mine {
            shared = PACKETS.get_ptr_mut(skb);
        }
        publish(skb, c, shared, here);
    }
    if !report || !wanted(cfg, ev) {
        return;
    }
    skb::fill_tuple::<BTF>(ev, skb, head, off, site.l3_at_data);
    skb::fill_sec_path(ev, skb, off);
    if cfg.aggregate != 0 {
        // Counted here; the first packet of each transition on this CPU is its exemplar.
        let key = AggKey::of(ev);
        let epoch = CONTROL.get(0).map_or(0, |c| c.epoch);
        let found = AGG.get_ptr_mut(key);
        if let Some(v) = found {
            // SAFETY: a non-NULL pointer to this CPU's value in the per-CPU AGG, valid for the
            // program's run and written by no other CPU.
            let v = unsafe { &mut *v };
            v.count += 1;
            count_counted();
            // A fresh exemplar once per interval (and where another CPU created the entry,
            // this CPU's value started empty).
            if v.epoch == epoch && v.exemplar.kind != 0 {
                return;
            }
        }
        skb::fill_socket::<BTF>(ev, skb, off);
        // SAFETY: a helper without arguments or memory effects.
        ev.ts_ns = unsafe { bpf_ktime_get_ns() };
        if let Some(v) = found {
            // SAFETY: the same pointer as above, still valid (no map update in between).
            unsafe {
                (*v).epoch = epoch;
                (*v).exemplar = *ev;
            }
            return;
        }
        // The new value is built in per-CPU scratch space: the stack (512 bytes) holds the
        // event already.
        let Some(value) = AGG_SCRATCH.get_ptr_mut(0) else {
            return;
        };
        // SAFETY: a non-NULL pointer to this CPU's slot of AGG_SCRATCH, used only here.
        let value = unsafe { &mut *value };
        value.count = 1;
        value.epoch = epoch;
        value.exemplar = *ev;
        // By reference: a copy (what clippy suggests) would put the value on the stack again.
        #[allow(clippy::needless_borrows_for_generic_args)]
        match AGG.insert(key, &*value, 0) {
            Ok(()) => count_counted(),
            Err(_) => count_lost(lost_reason::COUNT_MAP_FULL),
        }
        return;
    }
    if cfg.flow.active != 0 {
        let yes = followed(cfg, ev);
        set_following(yes);
        c.unfollowed = !yes as u8;
        c.ct = ev.ct_id;
        if !yes {
            return;
        }
    }
    skb::fill_socket::<BTF>(ev, skb, off);
    emit(*ev);
}

#[inline(always)]
fn foreign(cfg: &Config, at: &Point) -> bool {
    cfg.netns != 0 && at.netns != 0 && at.netns != cfg.netns
}

/// Takes a packet over from the shared map. The entry names the CPU whose cache holds its fresh
/// copy: taken from there (and released: this CPU owns it now). When that cache no longer has
/// it, it ended there without a report: `None`. An entry naming no CPU was written back when
/// its cache slot was needed, and is the fresh copy itself.
#[inline(always)]
fn claim(shared: &mut PacketState, skb: u64, here: u32) -> Option<PacketState> {
    if !shared.live() {
        return None;
    }
    let owner = shared.cpu;
    shared.cpu = here;
    if owner == PacketState::NO_CPU {
        return Some(*shared);
    }
    let key = 0u32;
    // SAFETY: the helper takes the map (CACHE's definition is the static itself, a per-CPU
    // array), a pointer to the key (`key`, on this stack for the call) and a CPU number, and
    // returns that CPU's value or NULL (an unknown CPU).
    let other = unsafe {
        generated::bpf_map_lookup_percpu_elem(
            core::ptr::addr_of!(CACHE) as *mut _,
            (&key as *const u32).cast(),
            owner,
        )
    } as *mut CpuCache;
    if other.is_null() {
        return None;
    }
    // SAFETY: non-NULL, so `owner`'s `CpuCache` of CACHE, valid for the program's run; the
    // packet's shared entry named `owner`, which is done with it (it is here now).
    let other = unsafe { &mut *other };
    let i = other.find(skb)?;
    let state = other.slots[i];
    other.slots[i].alive = PacketState::DEAD;
    Some(state)
}

/// Writes a live packet leaving this CPU's cache back to the shared map, so another CPU that
/// meets it later starts from where it was last seen.
#[inline(always)]
fn evict(c: &PacketState) {
    if !c.live() {
        return;
    }
    if let Some(s) = PACKETS.get_ptr_mut(c.skb) {
        // SAFETY: a non-NULL `PacketState` of PACKETS, valid for the program's run; written
        // only when it is the same packet, not a newer one at that address.
        unsafe {
            if (*s).packet_id == c.packet_id {
                *s = PacketState {
                    cpu: PacketState::NO_CPU,
                    ..*c
                };
            }
        }
    }
}

/// Keeps the shared entry in step with the cache: created at first sight, a tombstone at the
/// end of life, otherwise only the owning CPU's name (the fresh state stays in the cache).
#[inline(always)]
fn publish(skb: u64, c: &mut PacketState, shared: Option<*mut PacketState>, here: u32) {
    c.skb = skb;
    let entry = PacketState { cpu: here, ..*c };
    match shared {
        // SAFETY: a non-NULL `PacketState` of PACKETS, looked up in this run (valid until its
        // end).
        Some(s) => unsafe {
            let s = &mut *s;
            if s.packet_id != c.packet_id || !c.live() || s.alive != c.alive {
                *s = entry;
            }
        },
        None if c.live() => {
            let _ = PACKETS.insert(skb, entry, 0);
        }
        None => {}
    }
}

/// The packet continues: compare with its last observation and move its state on.
#[inline(always)]
fn follow(
    st: &mut PacketState,
    ev: &mut Event,
    site: &Site,
    mark: u32,
    ct: &skb::Ct,
    head: u64,
) -> bool {
    ev.packet_id = st.packet_id;
    ev.prev = st.last;
    ev.old_mark = st.mark;
    ev.old_ct_mark = st.ct_mark;
    if st.ct_attached != 0 {
        ev.ct_flags |= CT_BEFORE;
    }
    // A conntrack entry appearing or vanishing (conntrack hook, netns scrub) is not a change
    // of its mark: compare ct marks only when both sides had one.
    let ct_changed = ct.attached && st.ct_attached != 0 && st.ct_mark != ct.mark;
    let changed = st.mark != mark || ct_changed;
    ev.kind = match site.end {
        Some(End::Drop(reason)) => {
            ev.drop_reason = reason;
            kind::DROP
        }
        _ if changed => kind::TRANSITION,
        Some(End::Consume) => kind::CONSUME,
        None if mark != 0 && path::tunnel(&st.last, &ev.at) != tunnel::NONE => kind::TUNNEL,
        None => kind::OBSERVE,
    };
    let cfg = config();
    let report = match ev.kind {
        kind::TRANSITION | kind::TUNNEL => true,
        kind::DROP => st.changed != 0 || cfg.all_drops != 0 || cfg.full_path != 0,
        _ => cfg.full_path != 0,
    };
    st.changed |= changed as u8;
    st.last = ev.at;
    st.mark = mark;
    st.head = head;
    if ct.attached {
        st.ct_mark = ct.mark;
    }
    st.ct_attached = ct.attached as u8;
    report
}

/// Tells routing lookups without ports whether the packet this CPU processes is followed.
#[inline(always)]
fn set_following(yes: bool) {
    if let Some(flag) = FOLLOWING.get_ptr_mut(0) {
        // SAFETY: a non-NULL pointer to this CPU's flag in FOLLOWING.
        unsafe { *flag = yes as u8 };
    }
}

/// Whether `ev` belongs to a followed flow: its tuple matches, or its conntrack entry was seen
/// with a matching tuple (NAT rewrote it since). Filtering here keeps unrelated traffic out of
/// the ring when every observation is reported.
#[inline(always)]
fn followed(cfg: &Config, ev: &Event) -> bool {
    // SAFETY: only tested for presence, never read (see `iface_matches`).
    let known = ev.ct_id != 0 && unsafe { FOLLOWED.get(ev.ct_id) }.is_some();
    if cfg.flow.matches(ev, false) {
        if ev.ct_id != 0 && !known {
            let _ = FOLLOWED.insert(ev.ct_id, 1, 0);
        }
        return true;
    }
    known
}

/// BPF_RB_NO_WAKEUP / BPF_RB_FORCE_WAKEUP (include/uapi/linux/bpf.h) and BPF_RB_AVAIL_DATA.
const RB_NO_WAKEUP: u64 = 1;
const RB_FORCE_WAKEUP: u64 = 2;
const RB_AVAIL_DATA: u64 = 0;
/// Wake the consumer only once this much is waiting; it also drains on a short timer. One
/// wakeup per event cost more CPU than decoding the event.
const WAKE_BYTES: u64 = 256 << 10;

/// `ev`, all zero, zeroed word by word with volatile stores. LLVM turns plain zeroing (a
/// derived `Default`, and copies of what it knows is zero) into calls to memset, and a call is
/// a BPF subprogram: 6.1's verifier cannot carry precision marks through one, stops pruning
/// and gives up at its 1M-instruction limit.
#[inline(always)]
pub fn blank_event(ev: &mut MaybeUninit<Event>) -> &mut Event {
    let words = ev.as_mut_ptr().cast::<u64>();
    for i in 0..size_of::<Event>() / 8 {
        // SAFETY: word `i` of `ev`, which is 8-byte aligned and a multiple of 8 bytes long.
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
    // SAFETY: every byte was written; all-zero is a valid `Event`.
    unsafe { ev.assume_init_mut() }
}

/// Timestamps an event and writes it to the ring buffer (counting it lost when full).
#[inline(always)]
pub fn emit(mut ev: Event) {
    // SAFETY: a helper without arguments or memory effects.
    ev.ts_ns = unsafe { bpf_ktime_get_ns() };
    match EVENTS.reserve::<Event>(0) {
        Some(mut slot) => {
            slot.write(ev);
            let wake = if EVENTS.query(RB_AVAIL_DATA) >= WAKE_BYTES {
                RB_FORCE_WAKEUP
            } else {
                RB_NO_WAKEUP
            };
            slot.submit(wake);
        }
        None => count_lost(lost_reason::RING_FULL),
    }
}

/// A packet not seen before (or a new one at a recycled `sk_buff` address): start its state in
/// this CPU's cache. A non-zero mark at first sight is reported as a transition from 0,
/// attributed to the socket when it equals `sk_mark`.
#[inline(always)]
fn first_sight<const BTF: bool>(
    skb: u64,
    st: &mut PacketState,
    site: &Site,
    ev: &mut Event,
    head: u64,
    cfg: &Config,
) -> bool {
    let off = &cfg.offsets;
    ev.packet_id = next_packet_id();
    if let Some(End::Drop(reason)) = site.end {
        // Dropped before any observer saw it: nothing changed its mark that we know of.
        ev.kind = kind::DROP;
        ev.drop_reason = reason;
        ev.old_mark = ev.new_mark;
        st.alive = PacketState::DEAD;
        let wanted = cfg.all_drops != 0 || (cfg.full_path != 0 && ev.new_mark != 0);
        if wanted {
            // No earlier observation names the device: read it (with the helper, since UDP
            // may have reused `skb->dev` as scratch by now; only asked-for drops pay this).
            let dev: u64 = skb::read(skb, off.skb_dev);
            (ev.at.ifindex, ev.at.netns) = skb::dev_ids(dev, off);
            if dev == 0 {
                // Dropped on output before routing gave it a device: its socket's namespace.
                let sk: u64 = skb::read(skb, off.skb_sk);
                let net: u64 = skb::read(sk, off.sock_net);
                ev.at.netns = skb::read(net, off.net_ns_inum);
            }
        }
        return wanted;
    }
    if site.end.is_some() {
        st.alive = PacketState::DEAD;
        return false;
    }
    *st = PacketState {
        packet_id: ev.packet_id,
        skb,
        head,
        last: site.at,
        mark: ev.new_mark,
        ct_mark: ev.new_ct_mark,
        ct_attached: ev.ct_flags & CT_NOW,
        alive: PacketState::LIVE,
        changed: 0,
        unfollowed: 0,
        cpu: PacketState::NO_CPU,
        ct: 0,
    };
    ev.old_mark = 0;
    ev.old_ct_mark = ev.new_ct_mark;
    // A local packet starts with its socket's mark: it needs no observer of its own.
    match skb::socket_mark::<BTF>(skb, off) {
        Some(sk_mark) if sk_mark == ev.new_mark && sk_mark != 0 => {
            // The socket wrote it (SO_MARK): its drop is worth a report.
            ev.prev = Point {
                layer: layer::SOCKET,
                slot: socket_slot::WROTE,
                priority: 0,
                ..site.at
            };
        }
        Some(sk_mark) if sk_mark != ev.new_mark => {
            // Something between the socket and this observer changed it.
            ev.old_mark = sk_mark;
            ev.prev = Point {
                layer: layer::SOCKET,
                slot: socket_slot::LEFT,
                priority: 0,
                ..site.at
            };
        }
        _ if ev.new_mark != 0 => {}
        _ => {
            ev.kind = kind::FIRST_SEEN;
            return cfg.full_path != 0;
        }
    }
    ev.kind = kind::TRANSITION;
    st.changed = (ev.prev.layer == layer::SOCKET) as u8;
    true
}

#[inline(always)]
fn wanted(cfg: &Config, ev: &Event) -> bool {
    // State is kept in every namespace (a packet crossing back must not look new); only what
    // is reported is limited to the traced one.
    // A tunnel's outer packet may live elsewhere: its step out of the traced namespace is
    // reported too.
    let here = ev.at.netns == cfg.netns
        || (ev.prev.netns == cfg.netns && path::tunnel(&ev.prev, &ev.at) != tunnel::NONE);
    (cfg.netns == 0 || here)
        && (cfg.mark_mask == 0 || mark_matches(cfg, ev.old_mark) || mark_matches(cfg, ev.new_mark))
        && (iface_matches(cfg, ev.at.ifindex) || iface_matches(cfg, ev.prev.ifindex))
}
