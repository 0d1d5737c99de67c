//! The one observation routine every observer calls: compare the packet's mark and conntrack
//! mark with what the previous observer saw (per-packet state keyed by the `sk_buff` pointer),
//! and emit a transition, a drop, or (in full-path mode) every observation.
use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns};
use aya_log_ebpf::debug;
use fwmark_trace_common::{kind, layer, Config, Event, PacketState, Point, CT_BEFORE, CT_NOW};

use crate::{skb, CONFIG, EVENTS, FOLLOWED, FOLLOWING, IFACES, LOST, PACKETS, SEQ};

/// What the observer knows besides the skb pointer.
pub struct Site {
    pub at: Point,
    /// The IP header starts at `skb->data` (netif_receive_skb) rather than the network header.
    pub l3_at_data: bool,
    /// Set by `kfree_skb`/`consume_skb`: the packet's life ends here.
    pub end: Option<End>,
    /// The mark, when the observer can read it without a helper call (tc's `__sk_buff`).
    pub mark: Option<u32>,
}

pub enum End {
    Drop(u32),
    Consume,
}

#[inline(always)]
pub fn config() -> &'static Config {
    // Read through a volatile pointer: the value is patched into .rodata at load time, so the
    // compiler must not fold the zero initialiser.
    unsafe { &*core::ptr::read_volatile(&core::ptr::addr_of!(CONFIG)) }
}

#[inline(always)]
fn next_packet_id() -> u64 {
    let cpu = unsafe { bpf_get_smp_processor_id() } as u64;
    match SEQ.get_ptr_mut(0) {
        Some(seq) => unsafe {
            *seq += 1;
            (cpu << 48) | *seq
        },
        None => 0,
    }
}

#[inline(always)]
fn count_lost() {
    if let Some(lost) = LOST.get_ptr_mut(0) {
        unsafe { *lost += 1 };
    }
}

#[inline(always)]
fn mark_matches(cfg: &Config, mark: u32) -> bool {
    mark & cfg.mark_mask == cfg.mark_value
}

#[inline(always)]
fn iface_matches(cfg: &Config, ifindex: u32) -> bool {
    cfg.iface_filter == 0 || unsafe { IFACES.get(ifindex) }.is_some()
}

/// `BTF`: `skb` is a BTF-typed pointer (netfilter, tp_btf), so its fields are plain loads.
#[inline(always)]
pub fn observe<const BTF: bool>(skb: u64, site: &Site) {
    let cfg = config();
    let off = &cfg.offsets;
    let mut at = site.at;
    // Cheap exits first (this runs for every packet at every observer): a packet we do not
    // follow ends without work, and one first seen outside the traced namespace is not ours.
    // One lookup serves the early exit and the update below. Entries are not deleted when a
    // packet ends: they become tombstones that the next packet at the same address (the slab
    // hands addresses out again at once) overwrites in place, so most packets cost no map
    // insert or delete, only lookups.
    let slot = PACKETS.get_ptr_mut(skb);
    let state = slot.filter(|s| unsafe { (**s).live() });
    if state.is_none() {
        let foreign = cfg.netns != 0 && at.netns != 0 && at.netns != cfg.netns;
        if foreign || matches!(site.end, Some(End::Consume)) {
            return;
        }
    }
    let mark: u32 = site
        .mark
        .unwrap_or_else(|| skb::field::<BTF, _>(skb, off.skb_mark));
    let ct = skb::conntrack::<BTF>(skb, off);
    let head: u64 = skb::field::<BTF, _>(skb, off.skb_head);

    let mut ev = Event {
        at,
        new_mark: mark,
        new_ct_mark: ct.mark,
        ct_info: ct.info,
        ct_flags: if ct.attached { CT_NOW } else { 0 },
        ct_id: ct.id,
        ..Event::default()
    };

    let report = match state {
        Some(state) if unsafe { (*state).head } == head => {
            let st = unsafe { &mut *state };
            // Where the device is unknown (NULL, or UDP reusing skb->dev as scratch space), the
            // packet is still in the namespace it was last seen in.
            if at.netns == 0 {
                at.netns = st.last.netns;
                ev.at.netns = at.netns;
            }
            if at.ifindex == 0 {
                at.ifindex = st.last.ifindex;
                ev.at.ifindex = at.ifindex;
            }
            ev.packet_id = st.packet_id;
            ev.prev = st.last;
            ev.old_mark = st.mark;
            ev.old_ct_mark = st.ct_mark;
            if st.ct_attached != 0 {
                ev.ct_flags |= CT_BEFORE;
            }
            // A conntrack entry appearing or vanishing (conntrack hook, netns scrub) is not a
            // change of its mark: compare ct marks only when both sides had one.
            let ct_changed = ct.attached && st.ct_attached != 0 && st.ct_mark != ct.mark;
            ev.kind = match site.end {
                Some(End::Drop(reason)) => {
                    ev.drop_reason = reason;
                    kind::DROP
                }
                _ if st.mark != mark || ct_changed => kind::TRANSITION,
                Some(End::Consume) => kind::CONSUME,
                None => kind::OBSERVE,
            };
            st.last = at;
            st.mark = mark;
            if ct.attached {
                st.ct_mark = ct.mark;
            }
            st.ct_attached = ct.attached as u8;
            true
        }
        Some(_) => {
            let emit = first_sight::<BTF>(skb, slot, site, &mut ev, head, cfg);
            // Scalars only: the verifier refuses formatting kernel pointers.
            debug!(
                &(),
                "sk_buff recycled with a new buffer; packet {} starts fresh (layer {}, hook {})",
                ev.packet_id,
                at.layer,
                at.hook
            );
            emit
        }
        None => first_sight::<BTF>(skb, slot, site, &mut ev, head, cfg),
    };
    if let (Some(_), Some(slot)) = (&site.end, slot) {
        unsafe { (*slot).head = PacketState::DEAD };
    }
    if !report || !wanted(cfg, &ev) {
        return;
    }
    skb::fill_tuple::<BTF>(&mut ev, skb, head, off, site.l3_at_data);
    if cfg.flow.active != 0 {
        let yes = followed(cfg, &ev);
        if let Some(flag) = FOLLOWING.get_ptr_mut(0) {
            unsafe { *flag = yes as u8 };
        }
        if !yes {
            return;
        }
    }
    skb::fill_socket::<BTF>(&mut ev, skb, off);
    emit(ev);
}

/// Whether `ev` belongs to a followed flow: its tuple matches, or its conntrack entry was seen
/// with a matching tuple (NAT rewrote it since). Filtering here keeps unrelated traffic out of
/// the ring when every observation is reported.
#[inline(always)]
fn followed(cfg: &Config, ev: &Event) -> bool {
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

/// Timestamps an event and writes it to the ring buffer (counting it lost when full).
#[inline(always)]
pub fn emit(mut ev: Event) {
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
        None => count_lost(),
    }
}

/// A packet not seen before (or a recycled `sk_buff`): start its state, in place over a
/// tombstone (`slot`) when there is one. A non-zero mark at first sight is reported as a
/// transition from 0, attributed to the socket when it equals `sk_mark`.
#[inline(always)]
fn first_sight<const BTF: bool>(
    skb: u64,
    slot: Option<*mut PacketState>,
    site: &Site,
    ev: &mut Event,
    head: u64,
    cfg: &Config,
) -> bool {
    let off = &cfg.offsets;
    ev.packet_id = next_packet_id();
    if let Some(End::Drop(reason)) = site.end {
        // Dropped before any observer saw it: worth a line only when it carried a mark.
        ev.kind = kind::DROP;
        ev.drop_reason = reason;
        ev.old_mark = ev.new_mark;
        return ev.new_mark != 0;
    }
    if site.end.is_some() {
        return false;
    }
    let state = PacketState {
        packet_id: ev.packet_id,
        head,
        last: site.at,
        mark: ev.new_mark,
        ct_mark: ev.new_ct_mark,
        ct_attached: ev.ct_flags & CT_NOW,
        _pad: [0; 3],
    };
    match slot {
        Some(slot) => unsafe { *slot = state },
        None => {
            let _ = PACKETS.insert(skb, state, 0);
        }
    }
    ev.old_mark = 0;
    ev.old_ct_mark = ev.new_ct_mark;
    if ev.new_mark == 0 {
        ev.kind = kind::FIRST_SEEN;
        return cfg.full_path != 0;
    }
    ev.kind = kind::TRANSITION;
    if skb::socket_mark::<BTF>(skb, off) == Some(ev.new_mark) {
        ev.prev = Point {
            layer: layer::SOCKET,
            ..site.at
        };
    }
    true
}

#[inline(always)]
fn wanted(cfg: &Config, ev: &Event) -> bool {
    let important = matches!(ev.kind, kind::TRANSITION | kind::DROP);
    // State is kept in every namespace (a packet crossing back must not look new); only what
    // is reported is limited to the traced one.
    (important || cfg.full_path != 0)
        && (cfg.netns == 0 || ev.at.netns == cfg.netns)
        && (cfg.mark_mask == 0 || mark_matches(cfg, ev.old_mark) || mark_matches(cfg, ev.new_mark))
        && (iface_matches(cfg, ev.at.ifindex) || iface_matches(cfg, ev.prev.ifindex))
}
