//! The layout shared by the kernel observers (fwmark-trace-ebpf) and the daemon (fwmark-trace):
//! where a mark was seen (`Point`), what the kernel reports (`Event`), per-packet state
//! (`PacketState`) and the load-time configuration (`Config`). Defined once, `#[repr(C)]`,
//! plain integers only, so both sides agree byte for byte.
#![no_std]
#![deny(clippy::undocumented_unsafe_blocks)]

/// Which family of kernel observation point produced an event.
pub mod layer {
    /// No earlier observation (the packet's first sight).
    pub const NONE: u8 = 0;
    /// A tcx program (`hook` = `tc_dir::*`, `slot` = `tc_slot::*`).
    pub const TC: u8 = 1;
    /// Netfilter (`hook` = NF_INET_* number, `family` = NFPROTO_*): a BPF netfilter link
    /// (`slot` = priority slot), or fentry/fexit of a chain evaluator (`slot` =
    /// `NF_SLOT_CHAIN`, `priority` = the chain's priority at entry, one past it at exit).
    pub const NETFILTER: u8 = 2;
    /// A tp_btf tracepoint (`hook` = `tracepoint::*`).
    pub const TRACEPOINT: u8 = 3;
    /// The mark the packet was born with: its socket's SO_MARK (`sk_mark` equals the mark).
    pub const SOCKET: u8 = 4;
    /// A FIB lookup (`fib_table_lookup`, `fib6_table_lookup`; `hook` = `route_hook::LOOKUP`):
    /// `Event::table`, `route_err`, `route_oif`.
    pub const ROUTING: u8 = 5;
}

/// Netfilter hooks (`Point::hook` when `layer == NETFILTER`): `enum nf_inet_hooks`
/// (include/uapi/linux/netfilter.h).
pub mod nf_hook {
    pub const PRE_ROUTING: u8 = 0;
    pub const LOCAL_IN: u8 = 1;
    pub const FORWARD: u8 = 2;
    pub const LOCAL_OUT: u8 = 3;
    pub const POST_ROUTING: u8 = 4;
    /// How many there are (they are numbered from 0).
    pub const COUNT: u8 = 5;
}

/// Protocol families (`Point::family` for netfilter and routing points): NFPROTO_IPV4 and
/// NFPROTO_IPV6 (include/uapi/linux/netfilter.h; equal to AF_INET and AF_INET6).
pub mod nfproto {
    pub const IPV4: u8 = 2;
    pub const IPV6: u8 = 10;
}

/// `Point::hook` when `layer == ROUTING`.
pub mod route_hook {
    /// A routing table lookup, the only routing point there is. The daemon does not read it;
    /// its value is the one routing events have carried from the start.
    pub const LOOKUP: u8 = 4;
}

/// tc direction (`Point::hook` when `layer == TC`).
pub mod tc_dir {
    pub const INGRESS: u8 = 0;
    pub const EGRESS: u8 = 1;
}

/// Position in the tcx chain (`Point::slot` when `layer == TC`).
pub mod tc_slot {
    pub const FIRST: u8 = 0;
    pub const LAST: u8 = 1;
}

/// The tc observers, one line each, `program = DIRECTION, SLOT;` (`tc_dir::*`, `tc_slot::*`):
/// the eBPF crate makes a program of each line, the daemon attaches them (`kernel::tcx`), so
/// their names are written here only. `$then` is the macro each crate expands the table with.
#[macro_export]
macro_rules! tc_observers {
    ($then:ident) => {
        $then! {
            fwm_tc_in_first = INGRESS, FIRST;
            fwm_tc_in_last = INGRESS, LAST;
            fwm_tc_eg_first = EGRESS, FIRST;
            fwm_tc_eg_last = EGRESS, LAST;
        }
    };
}

/// One tc observer (a line of `tc_observers!`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcObserver {
    /// The eBPF program's name.
    pub program: &'static str,
    /// `tc_dir::*`.
    pub dir: u8,
    /// `tc_slot::*`.
    pub slot: u8,
}

macro_rules! define_tc_observers {
    ($($program:ident = $dir:ident, $slot:ident;)*) => {
        /// Every tc observer, in the table's order.
        pub const TC_OBSERVERS: &[TcObserver] = &[$(TcObserver {
            program: stringify!($program),
            dir: tc_dir::$dir,
            slot: tc_slot::$slot,
        },)*];
    };
}

tc_observers!(define_tc_observers);

/// `Point::slot` when `layer == SOCKET`.
pub mod socket_slot {
    /// The socket's SO_MARK is the mark the packet was first seen with.
    pub const WROTE: u8 = 0;
    /// The packet left its socket with SO_MARK (`Event::old_mark`) and was first seen with
    /// another mark: something in between changed it.
    pub const LEFT: u8 = 1;
}

/// The tp_btf observers, one line each: the daemon attaches every one (`kernel::observers`),
/// places name them (`place`), and the eBPF crate turns each line into a program; the program
/// name is written here only. A line reads
/// `Variant / CONST = id, program, "kernel tracepoint", layer;`:
/// - `Variant` names it in [`Tracepoint`], and `tracepoint::CONST` is its id as a plain `u8`;
/// - `id` is `Point::hook` of the events it reports (when `layer` is `TRACEPOINT`);
/// - `program` is the eBPF program's name, `"kernel tracepoint"` what it attaches to (and
///   what points at it are called);
/// - `layer` is the `layer::*` of its events: `TRACEPOINT` for a point on the packet's path,
///   `ROUTING` for routing lookups (attached only when routes are reported).
///
/// To add an observer: add its line here, then its handler, a function named `program` in
/// `handle` of fwmark-trace-ebpf/src/main.rs (`#[inline(always)]`, taking the
/// `&BtfTracePointContext`). A new hook name in the JSON output also goes into the `hook`
/// enum of schema/trace-records.schema.json (a unit test in `place` checks it is there).
///
/// `$then` is the macro each crate expands the table with.
#[macro_export]
macro_rules! tracepoint_observers {
    ($then:ident) => {
        $then! {
            NetifReceiveSkb / NETIF_RECEIVE_SKB = 0, fwm_rx, "netif_receive_skb", TRACEPOINT;
            NetDevQueue / NET_DEV_QUEUE = 1, fwm_dev_queue, "net_dev_queue", TRACEPOINT;
            KfreeSkb / KFREE_SKB = 2, fwm_kfree, "kfree_skb", TRACEPOINT;
            ConsumeSkb / CONSUME_SKB = 3, fwm_consume, "consume_skb", TRACEPOINT;
            FibTableLookup / FIB_TABLE_LOOKUP = 4, fwm_fib, "fib_table_lookup", ROUTING;
            Fib6TableLookup / FIB6_TABLE_LOOKUP = 5, fwm_fib6, "fib6_table_lookup", ROUTING;
        }
    };
}

/// One tp_btf observer (a line of `tracepoint_observers!`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointObserver {
    pub tracepoint: Tracepoint,
    /// The eBPF program's name.
    pub program: &'static str,
    /// The kernel tracepoint it attaches to.
    pub target: &'static str,
    /// `layer::*` of the events it reports.
    pub layer: u8,
}

macro_rules! define_tracepoints {
    ($($variant:ident / $id_name:ident = $id:literal, $program:ident, $target:literal, $layer:ident;)*) => {
        /// A tracepoint observed (see `tracepoint_observers!`).
        #[repr(u8)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Tracepoint {
            $($variant = $id,)*
        }

        /// Every tp_btf observer, in the table's order.
        pub const TRACEPOINTS: &[TracepointObserver] = &[$(TracepointObserver {
            tracepoint: Tracepoint::$variant,
            program: stringify!($program),
            target: $target,
            layer: layer::$layer,
        },)*];

        /// The tracepoints' ids (`Point::hook` when `layer == TRACEPOINT`), as plain `u8`s.
        pub mod tracepoint {
            $(pub const $id_name: u8 = super::Tracepoint::$variant as u8;)*
        }

        impl Tracepoint {
            /// The tracepoint on the packet's path that reported an event at `hook` (of a
            /// `layer::TRACEPOINT` point); `None` for another id.
            pub fn from_hook(hook: u8) -> Option<Tracepoint> {
                let t = match hook {
                    $($id => Tracepoint::$variant,)*
                    _ => return None,
                };
                (t.observer().layer == layer::TRACEPOINT).then_some(t)
            }
        }
    };
}

tracepoint_observers!(define_tracepoints);

impl Tracepoint {
    /// Its line of the table.
    pub const fn observer(self) -> &'static TracepointObserver {
        let mut i = 0;
        while TRACEPOINTS[i].tracepoint as u8 != self as u8 {
            i += 1;
        }
        &TRACEPOINTS[i]
    }
}

/// A tracepoint is called by its kernel name.
impl core::fmt::Display for Tracepoint {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.observer().target)
    }
}

/// Netfilter priority slots: one eBPF program per slot, linked at one priority per
/// (family, hook); the daemon keeps the slot → priority table. Slot 0 is the first priority
/// (INT_MIN + 1), slot 1 the last (INT_MAX - 1), the others split the hook into bands.
pub const NF_SLOTS: usize = 10;
pub const NF_SLOT_FIRST: u8 = 0;
pub const NF_SLOT_LAST: u8 = 1;
/// A netfilter point that carries its priority itself (`Point::priority`): the entry and exit
/// of an nftables base chain or iptables table, observed with fentry/fexit where the kernel
/// has no BPF netfilter links (before 6.4).
pub const NF_SLOT_CHAIN: u8 = 0xff;

/// What an event reports (`Event::kind`).
pub mod kind {
    /// The mark (or conntrack mark) differs from the previous observation of the packet.
    pub const TRANSITION: u8 = 1;
    /// The kernel freed the packet with a drop reason (`kfree_skb`).
    pub const DROP: u8 = 2;
    /// Full-path mode: first sight of a packet.
    pub const FIRST_SEEN: u8 = 3;
    /// Full-path mode: an observation with no change.
    pub const OBSERVE: u8 = 4;
    /// Full-path mode: the packet's normal end of life (`consume_skb`).
    pub const CONSUME: u8 = 5;
    /// A routing table lookup (with `Config::routes`); `new_mark` is the flow's mark.
    pub const ROUTE: u8 = 6;
    /// The packet was encapsulated or decapsulated (`path::tunnel`) and kept a non-zero mark:
    /// the mark the inner packet had now rides on the outer one (or the reverse). A change
    /// across the tunnel is a `TRANSITION` like any other.
    pub const TUNNEL: u8 = 7;
}

/// An observation point. `slot` and `hook` are interpreted per `layer` (see the modules above).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Point {
    pub layer: u8,
    pub hook: u8,
    pub slot: u8,
    /// `nfproto::*` for netfilter and routing points, else 0.
    pub family: u8,
    pub ifindex: u32,
    /// Network namespace inode number (`net->ns.inum`), 0 when unknown.
    pub netns: u32,
    /// The netfilter priority of an `NF_SLOT_CHAIN` point, else 0.
    pub priority: i32,
}

/// One record in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Event {
    pub ts_ns: u64,
    pub packet_id: u64,
    /// Where the packet is now, and where it was last observed before.
    pub at: Point,
    pub prev: Point,
    pub old_mark: u32,
    pub new_mark: u32,
    pub old_ct_mark: u32,
    pub new_ct_mark: u32,
    /// `enum skb_drop_reason` value (names come from kernel BTF), for `kind::DROP`.
    pub drop_reason: u32,
    pub kind: u8,
    /// Bit 0: a conntrack entry is attached now; bit 1: it was attached at `prev`.
    pub ct_flags: u8,
    /// `enum ip_conntrack_info` (low 3 bits of `skb->_nfct`): direction and state.
    pub ct_info: u8,
    /// 4 or 6 when the IP header was read, 0 otherwise.
    pub ip_version: u8,
    pub l4_proto: u8,
    pub _pad: [u8; 3],
    pub sport: u16,
    pub dport: u16,
    /// IPv4 addresses use the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Route events: the table looked up, its result (0 or -errno; -EAGAIN: no match, the
    /// next rule is tried) and the output interface the flow asked for.
    pub table: u32,
    pub route_err: i32,
    pub route_oif: u32,
    pub route_iif: u32,
    /// Identity of the conntrack entry (0: none): joins request and reply across NAT.
    pub ct_id: u64,
    /// `sk->sk_mark` of the packet's socket, when it has a full socket (`SK_FULL`).
    pub sk_mark: u32,
    pub sk_flags: u32,
    /// The SPI of the xfrm state that decrypted the packet (the last of its sec_path), 0 when
    /// none did.
    pub sec_spi: u32,
    pub _pad2: u32,
}

/// What makes two reports the same transition (or drop), counted together in the kernel: the
/// segment (both points), the marks before and after, conntrack state, drop reason, and the
/// protocol (an ND packet's change is not a UDP flow's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AggKey {
    pub prev: Point,
    pub at: Point,
    pub old_mark: u32,
    pub new_mark: u32,
    pub old_ct_mark: u32,
    pub new_ct_mark: u32,
    pub drop_reason: u32,
    pub kind: u8,
    pub ct_flags: u8,
    pub ct_info: u8,
    pub ip_version: u8,
    pub l4_proto: u8,
    // Two fields, not `[u8; 3]`: a byte array is zeroed with a call to memset (see
    // `fwmark-trace-ebpf`'s `blank_event`).
    pub _pad: u8,
    pub _pad2: u16,
}

impl AggKey {
    #[inline(always)]
    pub fn of(ev: &Event) -> Self {
        AggKey {
            prev: ev.prev,
            at: ev.at,
            old_mark: ev.old_mark,
            new_mark: ev.new_mark,
            old_ct_mark: ev.old_ct_mark,
            new_ct_mark: ev.new_ct_mark,
            drop_reason: ev.drop_reason,
            kind: ev.kind,
            ct_flags: ev.ct_flags,
            ct_info: ev.ct_info,
            ip_version: ev.ip_version,
            l4_proto: ev.l4_proto,
            _pad: 0,
            _pad2: 0,
        }
    }
}

/// Per CPU: how many packets made this transition, and one of them (tuple, ids): the first
/// of the current interval (`Control::epoch`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AggValue {
    pub count: u64,
    /// The interval the exemplar was taken in.
    pub epoch: u32,
    pub _pad: u32,
    pub exemplar: Event,
}

/// Distinct transitions counted in the kernel at once (an LRU: the oldest go first), as the
/// object declares it; the daemon sizes it from a memory budget at load time.
pub const AGG_ENTRIES: u32 = 16384;

/// Why events were lost: the `LOST` map's index.
pub mod lost_reason {
    /// The ring buffer had no room for an event.
    pub const RING_FULL: u32 = 0;
    /// The counting map (`AGG`) refused a new transition.
    pub const COUNT_MAP_FULL: u32 = 1;
    /// How many reasons there are.
    pub const COUNT: u32 = 2;
}

/// `Event::sk_flags`: the packet belongs to a full socket and `sk_mark` is its SO_MARK.
pub const SK_FULL: u32 = 1;

pub const CT_NOW: u8 = 1;
pub const CT_BEFORE: u8 = 2;

/// Per-packet state. The authoritative copy of a packet being processed sits in a small per-CPU
/// cache (most packets run to completion on one CPU, so most observers find it without a shared
/// lock or a hash); every live packet also has an entry in a shared LRU hash keyed by the
/// `struct sk_buff *` value, naming the CPU whose cache holds the fresh copy, for packets that
/// move between CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PacketState {
    pub packet_id: u64,
    /// The `sk_buff` address (a cache slot is shared by many packets).
    pub skb: u64,
    /// `skb->head` at the last observation that read it. Not an identity (NAT writing into a
    /// cloned packet reallocates it); see `path::continues`.
    pub head: u64,
    pub last: Point,
    pub mark: u32,
    pub ct_mark: u32,
    pub ct_attached: u8,
    /// `LIVE` while the packet is alive; `DEAD` once its life ended (the shared entry stays as
    /// a tombstone that the next packet at the same address overwrites in place).
    pub alive: u8,
    /// A writer changed the packet's mark on its path: its drop is worth a report.
    pub changed: u8,
    /// Flows are followed and this packet is not one of them (as of conntrack entry `ct`):
    /// its observers only keep its state.
    pub unfollowed: u8,
    /// The CPU whose cache holds the fresh copy (`NO_CPU`: only this entry). When that cache
    /// no longer has the packet, it ended there without a report.
    pub cpu: u32,
    /// The conntrack entry `unfollowed` was decided with: another one (conntrack attached it,
    /// a namespace crossing dropped it) may belong to a followed flow, so it is decided again.
    pub ct: u64,
}

impl PacketState {
    pub const LIVE: u8 = 1;
    pub const DEAD: u8 = 0;
    pub const NO_CPU: u32 = u32::MAX;

    pub fn live(&self) -> bool {
        self.alive == Self::LIVE
    }
}

/// Slots of the per-CPU packet cache.
pub const CACHE_SLOTS: usize = 4;

/// The packets one CPU is processing: searched by comparing addresses (the verifier allows no
/// arithmetic on a pointer but addition, so there is no hashing it to a slot).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuCache {
    pub slots: [PacketState; CACHE_SLOTS],
    /// The slot a new packet takes when none is free (round robin).
    pub next: u32,
    /// The slot the slow path works on, passed through memory (see `observe`).
    pub pick: u32,
}

impl CpuCache {
    /// The slot holding the live packet at `skb`.
    #[inline(always)]
    pub fn find(&self, skb: u64) -> Option<usize> {
        (0..CACHE_SLOTS).find(|&i| self.slots[i].skb == skb && self.slots[i].live())
    }

    /// The slot for a new packet: a free one, else the next in turn.
    #[inline(always)]
    pub fn victim(&mut self) -> usize {
        match (0..CACHE_SLOTS).find(|&i| !self.slots[i].live()) {
            Some(i) => i,
            None => {
                self.next = self.next.wrapping_add(1);
                self.next as usize % CACHE_SLOTS
            }
        }
    }
}

/// Where a packet can go next: the order of the observation points along the stack. A packet
/// seen at a point it cannot reach from its last one is a new packet at a recycled `sk_buff`
/// address (the previous one ended where no tracepoint fires, e.g. TCP receive coalescing).
pub mod path {
    use super::{layer, nf_hook, tc_dir, tracepoint, Point};

    const RX: u16 = 1 << 0;
    const TC_IN: u16 = 1 << 1;
    const PRE: u16 = 1 << 2;
    const IN: u16 = 1 << 3;
    const FWD: u16 = 1 << 4;
    const OUT: u16 = 1 << 5;
    const POST: u16 = 1 << 6;
    const TC_EG: u16 = 1 << 7;
    const QUEUE: u16 = 1 << 8;
    const END: u16 = 1 << 9;
    const ANY: u16 = u16::MAX;

    #[inline(always)]
    fn stage(p: &Point) -> u16 {
        match (p.layer, p.hook) {
            (layer::TRACEPOINT, tracepoint::NETIF_RECEIVE_SKB) => RX,
            (layer::TRACEPOINT, tracepoint::NET_DEV_QUEUE) => QUEUE,
            (layer::TRACEPOINT, _) => END,
            (layer::TC, tc_dir::INGRESS) => TC_IN,
            (layer::TC, _) => TC_EG,
            (layer::NETFILTER, nf_hook::PRE_ROUTING) => PRE,
            (layer::NETFILTER, nf_hook::LOCAL_IN) => IN,
            (layer::NETFILTER, nf_hook::FORWARD) => FWD,
            (layer::NETFILTER, nf_hook::LOCAL_OUT) => OUT,
            (layer::NETFILTER, _) => POST,
            _ => 0,
        }
    }

    /// The stages a packet can come from, within one network namespace. A received packet is
    /// born at netif_receive_skb, a local one at the output hook: neither is reached from
    /// delivery (input). Output after postrouting is xfrm's second pass, after a queue a
    /// tunnel's encapsulation; netif_receive_skb after a queue is a veth/loopback crossing,
    /// after tc a redirect.
    #[inline(always)]
    fn predecessors(now: u16) -> u16 {
        const RECEIVED: u16 = RX | TC_IN | PRE;
        match now {
            RX => QUEUE | TC_EG | TC_IN,
            TC_IN => RX | TC_IN | TC_EG,
            PRE => RECEIVED,
            IN => RECEIVED | IN,
            FWD => RECEIVED | FWD,
            OUT => OUT | POST | QUEUE,
            POST => RECEIVED | FWD | OUT | POST,
            TC_EG | QUEUE => RECEIVED | FWD | OUT | POST | TC_EG | QUEUE,
            END => ANY,
            _ => 0,
        }
    }

    /// Whether a packet last seen at `prev` can be the one now seen at `now`. Only a device
    /// crossing (veth, loopback, a redirect) or a tunnel leads into another namespace (a
    /// tunnel device may live in another namespace than the socket that carries its outer
    /// packets). `same_head`: the buffer is the one seen last, so a decapsulated packet
    /// (tunnel: input, then netif_receive_skb of the tunnel device) continues too.
    #[inline(always)]
    pub fn continues(prev: &Point, now: &Point, same_head: bool) -> bool {
        let (from, to) = (stage(prev), stage(now));
        let crossed = prev.netns != now.netns && prev.netns != 0 && now.netns != 0;
        let allowed = if crossed {
            match to {
                RX | TC_IN => QUEUE | TC_EG | TC_IN,
                // A tunnel's outer packet, where its socket is.
                OUT | TC_EG | QUEUE => QUEUE | TC_EG,
                END => ANY,
                _ => 0,
            }
        } else {
            predecessors(to)
        };
        from & allowed != 0 || (same_head && to == RX && from == IN)
    }

    /// Whether the step from `prev` to `now` (one packet: `continues` said so) is an
    /// encapsulation or a decapsulation (`tunnel::*`). A packet queued on a device and then
    /// at an output hook again was encapsulated by that device (VXLAN, Geneve, WireGuard, GRE,
    /// IPIP); one at the output hook again after postrouting, by xfrm (its second pass, the
    /// outer ESP packet); one received again after local input was decapsulated (the
    /// tunnel's device, or xfrm in tunnel mode, hands the inner packet to netif_receive_skb).
    /// Without observers at the output hook, the outer packet is next seen queued on the
    /// underlay: a tunnel when that is in another namespace (a veth crossing is received
    /// there, not queued).
    #[inline(always)]
    pub fn tunnel(prev: &Point, now: &Point) -> u8 {
        let crossed = prev.netns != now.netns && prev.netns != 0 && now.netns != 0;
        match (stage(prev), stage(now)) {
            (QUEUE | TC_EG | POST, OUT) => super::tunnel::ENCAP,
            (QUEUE | TC_EG, QUEUE | TC_EG) if crossed => super::tunnel::ENCAP,
            (IN, RX) => super::tunnel::DECAP,
            _ => super::tunnel::NONE,
        }
    }
}

/// Encapsulation steps (`path::tunnel`).
pub mod tunnel {
    pub const NONE: u8 = 0;
    pub const ENCAP: u8 = 1;
    pub const DECAP: u8 = 2;
}

/// A field `Offsets` lacks on this kernel (the observer then skips what needs it).
pub const OFFSET_MISSING: u32 = u32::MAX;

/// Where the daemon finds one of the `Offsets` in the running kernel's BTF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetSource {
    /// (struct, member path) in vmlinux: the daemon does not start without it.
    Required(&'static str, &'static str),
    /// (struct, member path) in vmlinux; `OFFSET_MISSING` on kernels without it (a config
    /// option off, another release).
    Optional(&'static str, &'static str),
    /// (module, struct, member path): a type that module defines, read from the BTF of the
    /// module whose function the fentry/fexit back-end observes (vmlinux's when built in).
    Module(&'static str, &'static str, &'static str),
    /// Worked out by the daemon from other members (`kernel::btf`).
    Computed,
}

/// One field of `Offsets`: its name, where it comes from, and its accessors.
#[derive(Clone, Copy, Debug)]
pub struct OffsetField {
    pub name: &'static str,
    pub source: OffsetSource,
    pub get: fn(&Offsets) -> u32,
    pub set: fn(&mut Offsets, u32),
}

/// Declares `Offsets` (one `u32` per field, in this order), `Offsets::MISSING` (every field
/// `OFFSET_MISSING`) and `Offsets::FIELDS` (the table the daemon fills them from), so each
/// field is written down once.
macro_rules! offsets {
    ($($(#[$doc:meta])* $field:ident: $source:expr,)*) => {
        /// Kernel struct field offsets, read from the kernel's BTF at start-up (see
        /// `Offsets::FIELDS` for where each comes from). `OFFSET_MISSING` marks a field this
        /// kernel lacks (the observer then skips what needs it).
        #[repr(C)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub struct Offsets {
            $($(#[$doc])* pub $field: u32,)*
        }

        impl Offsets {
            /// Every field missing.
            pub const MISSING: Offsets = Offsets {
                $($field: OFFSET_MISSING,)*
            };

            /// Every field, in declaration order, with where the daemon finds it.
            pub const FIELDS: &'static [OffsetField] = &[$(OffsetField {
                name: stringify!($field),
                source: $source,
                get: |o| o.$field,
                set: |o, v| o.$field = v,
            },)*];
        }
    };
}

use OffsetSource::{Computed, Module, Optional, Required};

offsets! {
    skb_mark: Required("sk_buff", "mark"),
    skb_nfct: Required("sk_buff", "_nfct"),
    skb_dev: Required("sk_buff", "dev"),
    skb_sk: Required("sk_buff", "sk"),
    skb_head: Required("sk_buff", "head"),
    skb_data: Required("sk_buff", "data"),
    skb_network_header: Required("sk_buff", "network_header"),
    skb_protocol: Required("sk_buff", "protocol"),
    dev_ifindex: Required("net_device", "ifindex"),
    dev_nd_net: Required("net_device", "nd_net.net"),
    net_ns_inum: Required("net", "ns.inum"),
    /// CONFIG_NF_CONNTRACK_MARK.
    nf_conn_mark: Optional("nf_conn", "mark"),
    sock_sk_mark: Optional("sock", "sk_mark"),
    /// `sock.__sk_common.skc_state` (TIME_WAIT/NEW_SYN_RECV mini sockets have no sk_mark).
    sock_state: Optional("sock", "__sk_common.skc_state"),
    /// `sock.__sk_common.skc_net.net`: a socket's namespace (a packet dropped before it has a
    /// device).
    sock_net: Optional("sock", "__sk_common.skc_net.net"),
    /// `hook` and `pf` are read together: the daemon checks they are adjacent.
    nf_state_hook: Required("nf_hook_state", "hook"),
    nf_state_pf: Required("nf_hook_state", "pf"),
    nf_state_in: Required("nf_hook_state", "in"),
    nf_state_out: Required("nf_hook_state", "out"),
    nf_state_net: Required("nf_hook_state", "net"),
    /// `struct flowi4` (routing lookups) and `fib_nh_common.nhc_dev`.
    fl4_mark: Optional("flowi4", "__fl_common.flowic_mark"),
    fl4_oif: Optional("flowi4", "__fl_common.flowic_oif"),
    fl4_iif: Optional("flowi4", "__fl_common.flowic_iif"),
    fl4_proto: Optional("flowi4", "__fl_common.flowic_proto"),
    fl4_saddr: Optional("flowi4", "saddr"),
    fl4_daddr: Optional("flowi4", "daddr"),
    fl4_ports: Optional("flowi4", "uli"),
    nhc_dev: Optional("fib_nh_common", "nhc_dev"),
    /// `struct flowi6` addresses and ports (its `__fl_common` fields sit where flowi4's do:
    /// the daemon checks), `fib6_result` and `fib6_table` (IPv6 routing lookups).
    fl6_saddr: Optional("flowi6", "saddr"),
    fl6_daddr: Optional("flowi6", "daddr"),
    fl6_ports: Optional("flowi6", "uli"),
    fib6_res_nh: Optional("fib6_result", "nh"),
    fib6_res_type: Optional("fib6_result", "fib6_type"),
    fib6_tb_id: Optional("fib6_table", "tb6_id"),
    /// The chain evaluators' arguments (fentry/fexit back-end; nf_tables and ip_tables are
    /// often modules): `nft_do_chain`'s `struct nft_pktinfo *`.
    nft_pkt_skb: Module("nf_tables", "nft_pktinfo", "skb"),
    nft_pkt_state: Module("nf_tables", "nft_pktinfo", "state"),
    /// How far before a base chain's `struct nft_chain` its hook's priority is
    /// (`nft_base_chain`: `ops.priority` precedes `chain`).
    nft_chain_prio_back: Computed,
    /// `ipt_do_table`/`ip6t_do_table`'s `struct xt_table *`.
    xt_table_priority: Module("x_tables", "xt_table", "priority"),
    /// The xfrm state that decrypted a packet: its sec_path is an skb extension (bit
    /// `skb_ext_sec_path` of `active_extensions`; `offset[id]` in 8-byte chunks into
    /// `extensions`), whose last state's SPI is read (CONFIG_XFRM, CONFIG_SKB_EXTENSIONS).
    skb_active_extensions: Optional("sk_buff", "active_extensions"),
    skb_extensions: Optional("sk_buff", "extensions"),
    skb_ext_offset: Optional("skb_ext", "offset"),
    sec_path_len: Optional("sec_path", "len"),
    sec_path_xvec: Optional("sec_path", "xvec"),
    xfrm_state_spi: Optional("xfrm_state", "id.spi"),
    /// `SKB_EXT_SEC_PATH` of `enum skb_ext_id` (its value depends on the kernel's options).
    skb_ext_sec_path: Computed,
}

/// Load-time configuration of the observers (a `.rodata` global, frozen once loaded).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Config {
    pub offsets: Offsets,
    /// Emit only events whose old or new mark satisfies `mark & mask == value` (mask 0: all).
    pub mark_value: u32,
    pub mark_mask: u32,
    /// Emit only events in this network namespace (inode number; 0: all).
    pub netns: u32,
    /// Non-zero: emit only events whose interface is in the `IFACES` map.
    pub iface_filter: u32,
    /// Non-zero: emit every observation (first sight, unchanged points, end of life).
    pub full_path: u32,
    /// The namespace the tc and netfilter observers are attached in (they only ever see its
    /// packets, so they need not read it from the packet).
    pub own_netns: u32,
    /// Non-zero: report routing table lookups (`kind::ROUTE`).
    pub routes: u32,
    /// Non-zero: report every drop, also of packets whose mark nothing changed.
    pub all_drops: u32,
    /// Non-zero: count reports in the `AGG` map instead of writing each to the ring buffer.
    pub aggregate: u32,
    /// The flows being followed (`--flow`, `--host`, `--port`, `--proto`, `why`).
    pub flow: FlowFilter,
}

/// A kernel-side pre-filter for followed flows, so unrelated traffic does not fill the ring
/// buffer when every observation is reported. It selects a superset of what userspace selects
/// (one address, one port, either side): userspace refines.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct FlowFilter {
    /// Non-zero: filter.
    pub active: u32,
    /// IP protocol number (0: any).
    pub proto: u8,
    /// 4 or 6 when `addr` is set, 0 otherwise.
    pub addr_version: u8,
    /// A port on either side (0: any).
    pub port: u16,
    /// An address on either side (IPv4 in the first 4 bytes, the rest zero, as in `Event`).
    pub addr: [u8; 16],
}

impl FlowFilter {
    pub const NONE: FlowFilter = FlowFilter {
        active: 0,
        proto: 0,
        addr_version: 0,
        port: 0,
        addr: [0; 16],
    };

    /// Whether `ev`'s tuple is selected. `lenient` (routing lookups, whose flow keys may lack
    /// a source or ports): a field the event leaves zero matches.
    #[inline(always)]
    pub fn matches(&self, ev: &Event, lenient: bool) -> bool {
        let words = |a: &[u8; 16]| -> [u64; 2] {
            // SAFETY: `[u8; 16]` and `[u64; 2]` have the same size and every bit pattern is
            // valid for both; compared as two words (a byte comparison would be a memcmp call).
            unsafe { core::mem::transmute(*a) }
        };
        let (want, s, d) = (words(&self.addr), words(&ev.saddr), words(&ev.daddr));
        let proto = self.proto == 0 || ev.l4_proto == self.proto || (lenient && ev.l4_proto == 0);
        let port = self.port == 0
            || ev.sport == self.port
            || ev.dport == self.port
            || (lenient && ev.sport == 0 && ev.dport == 0);
        let addr = self.addr_version == 0
            || (ev.ip_version == self.addr_version
                && (s == want || d == want || (lenient && s == [0, 0])));
        proto && port && addr
    }
}

impl Config {
    pub const ZERO: Config = Config {
        offsets: Offsets::MISSING,
        mark_value: 0,
        mark_mask: 0,
        netns: 0,
        iface_filter: 0,
        full_path: 0,
        own_netns: 0,
        routes: 0,
        all_drops: 0,
        aggregate: 0,
        flow: FlowFilter::NONE,
    };
}

/// Map and global names, shared so neither side spells them twice.
pub const MAP_EVENTS: &str = "EVENTS";
pub const MAP_LOST: &str = "LOST";
pub const MAP_IFACES: &str = "IFACES";
pub const MAP_CONTROL: &str = "CONTROL";
pub const MAP_AGG: &str = "AGG";
/// Per CPU: packets counted in `AGG` since load. The daemon compares it with what it read out
/// of `AGG`: the difference went with entries the LRU evicted between two reads.
pub const MAP_COUNTED: &str = "COUNTED";

/// Settings the daemon changes while running (the `CONTROL` array map, one entry), unlike
/// `Config`, which is frozen at load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Control {
    /// Non-zero: netfilter observers compare the conntrack mark too (some rule writes it).
    pub ct_watch: u32,
    /// Counts the reporting intervals: a counted transition takes a fresh exemplar in each.
    pub epoch: u32,
}
pub const GLOBAL_CONFIG: &str = "CONFIG";

#[cfg(feature = "user")]
mod pod {
    macro_rules! pod {
        ($($t:ident),*) => {$(
            // SAFETY: `#[repr(C)]`, built of integers (and arrays and structs of them) with
            // every padding byte an explicit field: no uninitialised bytes, and any bit pattern
            // is a valid value (what `aya::Pod` requires).
            unsafe impl aya::Pod for super::$t {}
        )*};
    }
    pod!(
        Event,
        PacketState,
        Config,
        Point,
        Control,
        CpuCache,
        AggKey,
        AggValue
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(saddr: [u8; 4], sport: u16, daddr: [u8; 4], dport: u16) -> Event {
        let mut ev = Event {
            ip_version: 4,
            l4_proto: 17,
            sport,
            dport,
            ..Default::default()
        };
        ev.saddr[..4].copy_from_slice(&saddr);
        ev.daddr[..4].copy_from_slice(&daddr);
        ev
    }

    #[test]
    fn flow_filter_selects_either_side_and_is_lenient_for_lookups() {
        let mut f = FlowFilter {
            active: 1,
            proto: 17,
            addr_version: 4,
            port: 53,
            ..Default::default()
        };
        f.addr[..4].copy_from_slice(&[10, 0, 0, 2]);
        let req = udp([10, 0, 0, 1], 40000, [10, 0, 0, 2], 53);
        let rep = udp([10, 0, 0, 2], 53, [10, 0, 0, 1], 40000);
        assert!(f.matches(&req, false) && f.matches(&rep, false));
        assert!(!f.matches(&udp([10, 0, 0, 1], 40000, [10, 0, 0, 3], 53), false));
        assert!(!f.matches(&udp([10, 0, 0, 1], 40000, [10, 0, 0, 2], 54), false));
        let tcp = Event { l4_proto: 6, ..req };
        assert!(!f.matches(&tcp, false));
        // An output lookup before source selection and ports: only lenient matching takes it.
        let lookup = udp([0; 4], 0, [10, 0, 0, 2], 0);
        assert!(!f.matches(&lookup, false) && f.matches(&lookup, true));
        // Nothing selected: everything matches.
        assert!(FlowFilter::default().matches(&tcp, false));
    }

    fn pt(layer: u8, hook: u8, netns: u32) -> Point {
        Point {
            layer,
            hook,
            netns,
            ..Default::default()
        }
    }

    #[test]
    fn a_packet_moves_forward_and_crosses_only_at_devices() {
        use path::continues;
        let nf = |hook| pt(layer::NETFILTER, hook, 1);
        let (out, post, input, fwd, pre) = (
            nf(nf_hook::LOCAL_OUT),
            nf(nf_hook::POST_ROUTING),
            nf(nf_hook::LOCAL_IN),
            nf(nf_hook::FORWARD),
            nf(nf_hook::PRE_ROUTING),
        );
        let queue = pt(layer::TRACEPOINT, tracepoint::NET_DEV_QUEUE, 1);
        let rx_b = pt(layer::TRACEPOINT, tracepoint::NETIF_RECEIVE_SKB, 2);
        let kfree = pt(layer::TRACEPOINT, tracepoint::KFREE_SKB, 0);
        // A local packet's way out, and across a veth into another namespace.
        assert!(continues(&out, &out, false) && continues(&out, &post, false));
        assert!(continues(&post, &queue, false) && continues(&queue, &rx_b, false));
        // NAT reallocating the buffer between prerouting and forward changes nothing.
        assert!(continues(&pre, &fwd, false) && continues(&fwd, &post, false));
        // Delivered locally, then an output packet at the same address: a new packet
        // (Istio's loopback case); so is one born in another namespace (Tailscale's case).
        assert!(!continues(&input, &out, true));
        assert!(!continues(
            &pt(layer::NETFILTER, nf_hook::LOCAL_IN, 2),
            &out,
            false
        ));
        assert!(!continues(&input, &post, false) && !continues(&fwd, &pre, false));
        // netif_receive_skb after input: only the same buffer, decapsulated.
        let rx = pt(layer::TRACEPOINT, tracepoint::NETIF_RECEIVE_SKB, 1);
        assert!(continues(&input, &rx, true) && !continues(&input, &rx, false));
        // A tunnel: queued on its device, then the outer packet at the output hook, also in
        // the namespace of the tunnel's socket; decapsulated into another namespace.
        let out_b = pt(layer::NETFILTER, nf_hook::LOCAL_OUT, 2);
        assert!(continues(&queue, &out, false) && continues(&queue, &out_b, false));
        assert_eq!(path::tunnel(&queue, &out_b), tunnel::ENCAP);
        assert_eq!(
            path::tunnel(&post, &out),
            tunnel::ENCAP,
            "xfrm's second pass"
        );
        assert_eq!(path::tunnel(&input, &rx), tunnel::DECAP);
        assert!(continues(&input, &rx_b, true) && !continues(&input, &rx_b, false));
        assert_eq!(path::tunnel(&out, &post), tunnel::NONE);
        assert_eq!(path::tunnel(&queue, &rx_b), tunnel::NONE, "a veth crossing");
        let queue_b = pt(layer::TRACEPOINT, tracepoint::NET_DEV_QUEUE, 2);
        assert!(continues(&queue, &queue_b, false));
        assert_eq!(path::tunnel(&queue, &queue_b), tunnel::ENCAP);
        assert_eq!(
            path::tunnel(&queue, &queue),
            tunnel::NONE,
            "a stacked device"
        );
        assert!(!continues(&input, &out_b, false));
        // The end of life follows anything; an unknown namespace is not a crossing.
        assert!(continues(&input, &kfree, false));
        assert!(continues(
            &pt(layer::NETFILTER, nf_hook::LOCAL_OUT, 0),
            &post,
            false
        ));
    }

    #[test]
    fn the_offsets_table_names_every_field_once() {
        assert_eq!(
            size_of::<Offsets>(),
            Offsets::FIELDS.len() * size_of::<u32>()
        );
        let mut o = Offsets::MISSING;
        for (i, f) in Offsets::FIELDS.iter().enumerate() {
            assert_eq!((f.get)(&o), OFFSET_MISSING, "{}", f.name);
            (f.set)(&mut o, i as u32);
        }
        // Each entry reads back what it stored: no two entries share a field.
        for (i, f) in Offsets::FIELDS.iter().enumerate() {
            assert_eq!((f.get)(&o), i as u32, "{}", f.name);
        }
        assert_eq!(Config::ZERO.offsets, Offsets::MISSING);
    }

    #[test]
    fn the_cache_finds_live_packets_and_reuses_free_slots() {
        let mut c = CpuCache::default();
        let i = c.victim();
        c.slots[i] = PacketState {
            skb: 0x1000,
            alive: PacketState::LIVE,
            ..Default::default()
        };
        assert_eq!(c.find(0x1000), Some(i));
        assert_eq!(c.find(0x2000), None);
        assert_ne!(c.victim(), i, "a free slot is taken before a live one");
        for (n, s) in c.slots.iter_mut().enumerate() {
            s.skb = 0x1000 + n as u64;
            s.alive = PacketState::LIVE;
        }
        let (a, b) = (c.victim(), c.victim());
        assert_ne!(a, b, "round robin when all are live");
        c.slots[0].alive = PacketState::DEAD;
        assert_eq!(c.find(0x1000), None, "a dead slot is not found");
    }
}
