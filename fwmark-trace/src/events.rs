//! Typed events: the kernel's raw `Event` record, decoded and named (points, segment, drop
//! reason, 5-tuple, conntrack state). Outputs (human, JSON) are written once over these types.
use std::{
    collections::{HashMap, HashSet},
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{bail, Result};
use fwmark_trace_common::{kind, layer, socket_slot, Event, Point, CT_BEFORE, CT_NOW, SK_FULL};
use serde::Serialize;

use crate::{
    attribution::{attribute, Attribution, AttributionCounts, Change},
    registry::Registry,
    rendered::Rendered,
    tracking::segment::{PointInfo, Segment, Topology},
};

#[derive(Clone, Debug, Serialize)]
pub struct TraceEvent {
    /// Wall-clock time (RFC 3339, UTC).
    pub time: String,
    /// Kernel monotonic timestamp.
    pub ts_ns: u64,
    pub packet_id: u64,
    pub kind: &'static str,
    pub at: Arc<Rendered<PointInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment: Option<Arc<Rendered<Segment>>>,
    pub mark: MarkChange,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ct_mark: Option<CtMark>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tuple: Option<Tuple>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<Arc<Rendered<Attribution>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<Route>,
    /// SO_MARK of the packet's socket, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_mark: Option<String>,
    /// Conntrack entry identity (not shown: a kernel address), for joining flows across NAT.
    #[serde(skip)]
    pub ct_id: u64,
    /// Counted in the kernel (the default): how many packets made this transition in the
    /// interval; the event's packet, tuple and time are those of one of them (the exemplar).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<Interval>,
}

/// The stretch of time a counted event covers.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Interval {
    pub start: String,
    pub end: String,
}

/// A routing table lookup: which table, with which flow mark, and what it answered.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Route {
    pub table: u32,
    /// "ok", "no-match" (-EAGAIN: the next rule is tried) or the errno name/number.
    pub result: String,
    pub flow_mark: String,
    pub oif: u32,
    pub iif: u32,
}

fn route_result(err: i32) -> String {
    match -err {
        0 => "ok".into(),
        11 => "no-match".into(),
        101 => "unreachable".into(),
        113 => "host-unreachable".into(),
        1 => "prohibited".into(),
        22 => "blackhole".into(),
        e => format!("errno {e}"),
    }
}

/// Marks are shown as hex strings: every owner documents its bits in hex.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MarkChange {
    pub old: String,
    pub new: String,
    pub set: String,
    pub cleared: String,
}

impl MarkChange {
    pub fn new(old: u32, new: u32) -> Self {
        Self {
            old: hex(old),
            new: hex(new),
            set: hex(new & !old),
            cleared: hex(old & !new),
        }
    }
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CtMark {
    pub old: String,
    pub new: String,
    pub changed: bool,
    /// `enum ip_conntrack_info`: new, established, related, established_reply, related_reply.
    pub state: &'static str,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Tuple {
    pub proto: String,
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
}

/// `udp 10.0.0.1:53 -> 10.0.0.2:40000`, `tcp [fd00::1]:80 -> …`, `icmp 10.0.0.1 -> 10.0.0.2`:
/// the form `--flow` parses. Ports only for protocols that carry them (the kernel side reads
/// them only for TCP, UDP and SCTP).
pub fn flow_label(proto: &str, src: &str, sport: u16, dst: &str, dport: u16) -> String {
    let end = |ip: &str, port: u16| match (has_ports(proto), ip.contains(':')) {
        (false, _) => ip.to_string(),
        (true, false) => format!("{ip}:{port}"),
        (true, true) => format!("[{ip}]:{port}"),
    };
    format!("{proto} {} -> {}", end(src, sport), end(dst, dport))
}

/// The IP protocol number of a name `proto_name` gives (or a number); None for others.
pub fn proto_number(name: &str) -> Option<u8> {
    (0..=255u8)
        .find(|n| proto_name(*n) == name)
        .or_else(|| name.parse().ok())
}

pub fn has_ports(proto: &str) -> bool {
    matches!(proto, "tcp" | "udp" | "sctp")
}

impl Tuple {
    pub fn label(&self) -> String {
        flow_label(&self.proto, &self.src, self.sport, &self.dst, self.dport)
    }
}

pub fn hex(v: u32) -> String {
    format!("{v:#x}")
}

/// Parses `VALUE[/MASK]` (hex with 0x, or decimal; no mask = all 32 bits).
pub fn parse_mark(s: &str) -> Result<(u32, u32)> {
    let num = |t: &str| -> Result<u32> {
        let t = t.trim();
        let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(h) => u32::from_str_radix(h, 16),
            None => t.parse(),
        };
        parsed.map_err(|_| anyhow::anyhow!("{t:?} is not a 32-bit number (use 0x1234 or 4660)"))
    };
    let (v, m) = match s.split_once('/') {
        Some((v, m)) => (num(v)?, num(m)?),
        None => (num(s)?, u32::MAX),
    };
    if v & !m != 0 {
        bail!("mark {v:#x} has bits outside its mask {m:#x}");
    }
    Ok((v, m))
}

fn kind_name(k: u8) -> &'static str {
    match k {
        kind::TRANSITION => "transition",
        kind::DROP => "drop",
        kind::FIRST_SEEN => "first_seen",
        kind::OBSERVE => "observe",
        kind::CONSUME => "consume",
        kind::ROUTE => "route",
        _ => "unknown",
    }
}

fn ct_state(info: u8) -> &'static str {
    match info {
        0 => "established",
        1 => "related",
        2 => "new",
        3 => "established_reply",
        4 => "related_reply",
        7 => "untracked",
        _ => "unknown",
    }
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        0 => "ipv6-hopopt".into(), // MLD and other packets behind a hop-by-hop header
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

pub fn tuple(ev: &Event) -> Option<Tuple> {
    let (src, dst) = match ev.ip_version {
        4 => {
            let a = |b: &[u8; 16]| Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string();
            (a(&ev.saddr), a(&ev.daddr))
        }
        6 => (
            Ipv6Addr::from(ev.saddr).to_string(),
            Ipv6Addr::from(ev.daddr).to_string(),
        ),
        _ => return None,
    };
    Some(Tuple {
        proto: proto_name(ev.l4_proto),
        src,
        sport: ev.sport,
        dst,
        dport: ev.dport,
    })
}

/// (old mark, new mark, conntrack marks, segment identity).
type AttributionKey = (u32, u32, Option<(u32, u32)>, usize);

/// Turns raw records into `TraceEvent`s.
pub struct Decoder {
    pub topology: Topology,
    pub drop_reasons: HashMap<u32, String>,
    /// Wall clock minus CLOCK_MONOTONIC (what bpf_ktime_get_ns counts).
    boot: SystemTime,
    /// Values ND/MLD packets showed as their "mark" at first sight: `reserved_tailroom` (see
    /// `kernel_tailroom`). By value, not by packet: counted events carry one packet of many.
    tailroom: HashSet<u32>,
    /// Named points and segments depend only on the points and the topology: built once each.
    points: HashMap<Point, Arc<Rendered<PointInfo>>>,
    segments: HashMap<(Point, Point), Arc<Rendered<Segment>>>,
    /// Owner registry for attribution (none: events carry no `attribution`).
    pub registry: Option<Registry>,
    /// Attributions depend only on the marks and the segment: computed once each.
    attributions: HashMap<AttributionKey, Arc<Rendered<Attribution>>>,
    pub counts: AttributionCounts,
}

pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

impl Decoder {
    pub fn new(topology: Topology, drop_reasons: HashMap<u32, String>) -> Self {
        let boot = SystemTime::now() - Duration::from_nanos(monotonic_ns());
        Self {
            topology,
            drop_reasons,
            boot,
            tailroom: HashSet::new(),
            points: HashMap::new(),
            segments: HashMap::new(),
            registry: None,
            attributions: HashMap::new(),
            counts: AttributionCounts::default(),
        }
    }

    /// Wall-clock time of CLOCK_MONOTONIC's zero, as this decoder names kernel timestamps.
    pub fn boot(&self) -> SystemTime {
        self.boot
    }

    /// Names kernel timestamps from another machine's boot time (a recording's).
    pub fn with_boot(mut self, boot: SystemTime) -> Self {
        self.boot = boot;
        self
    }

    /// Replaces the topology (interfaces, tcx chains, nft chains changed). The caches that
    /// depend on it are kept while it stays the same (the daemon re-reads it every second).
    /// Returns whether it changed.
    pub fn set_topology(&mut self, topology: Topology) -> bool {
        if topology == self.topology {
            return false;
        }
        self.topology = topology;
        self.points.clear();
        self.segments.clear();
        self.attributions.clear();
        self.counts.fold();
        true
    }

    fn point(&mut self, p: &Point) -> Arc<Rendered<PointInfo>> {
        let topo = &self.topology;
        self.points
            .entry(*p)
            .or_insert_with(|| Rendered::new(topo.point(p)))
            .clone()
    }

    fn segment(&mut self, prev: &Point, at: &Point) -> Arc<Rendered<Segment>> {
        let topo = &self.topology;
        self.segments
            .entry((*prev, *at))
            .or_insert_with(|| Rendered::new(topo.segment(prev, at)))
            .clone()
    }

    pub fn wall_time(&self, ts_ns: u64) -> String {
        rfc3339(self.boot + Duration::from_nanos(ts_ns))
    }

    /// IPv6 neighbour discovery and MLD build their packets with `skb->reserved_tailroom` set,
    /// which shares its storage with `skb->mark` (a union in `struct sk_buff`): a value that
    /// appears on a kernel-built ICMPv6 packet before any observer is not a mark, nor is its
    /// vanishing when the packet leaves its namespace. Changes in between are rules writing
    /// `skb->mark` (over the tailroom value) and are attributed as usual.
    fn kernel_tailroom(&mut self, ev: &Event) -> bool {
        // MLD packets start with a hop-by-hop header (next header 0).
        if !(ev.ip_version == 6 && matches!(ev.l4_proto, 0 | 58)) {
            return false;
        }
        // First seen with it: before any observer, or off the (kernel) socket it left with 0.
        let first = ev.prev.layer == layer::NONE
            || (ev.prev.layer == layer::SOCKET
                && ev.prev.slot == socket_slot::LEFT
                && ev.old_mark == 0);
        if first && ev.new_mark != 0 {
            if self.tailroom.len() > 64 {
                self.tailroom.clear();
            }
            self.tailroom.insert(ev.new_mark);
            return true;
        }
        let scrubbed = ev.new_mark == 0 && ev.prev.netns != ev.at.netns;
        scrubbed && self.tailroom.contains(&ev.old_mark)
    }

    pub fn decode(&mut self, ev: &Event) -> TraceEvent {
        self.decode_counted(ev, 1)
    }

    /// Decodes a record that stands for `packets` packets (the kernel counted them).
    pub fn decode_counted(&mut self, ev: &Event, packets: u64) -> TraceEvent {
        let changed = ev.old_mark != ev.new_mark
            || (ev.ct_flags & (CT_NOW | CT_BEFORE) == CT_NOW | CT_BEFORE
                && ev.old_ct_mark != ev.new_ct_mark);
        let mut segment = (ev.kind == kind::TRANSITION || (ev.kind == kind::DROP && changed))
            .then(|| self.segment(&ev.prev, &ev.at));
        if segment.is_some() && self.kernel_tailroom(ev) {
            let mut seg = segment
                .as_deref()
                .map(|s| (**s).clone())
                .unwrap_or_default();
            seg.layer = "kernel";
            seg.description = "kernel: ICMPv6 ND/MLD packet; skb->reserved_tailroom shares storage with skb->mark".into();
            segment = Some(Rendered::new(seg));
        }
        let ct_mark = (ev.ct_flags & CT_NOW != 0).then(|| CtMark {
            old: hex(ev.old_ct_mark),
            new: hex(ev.new_ct_mark),
            changed: ev.ct_flags & CT_BEFORE != 0 && ev.old_ct_mark != ev.new_ct_mark,
            state: ct_state(ev.ct_info),
        });
        let attribution = match (&self.registry, &segment) {
            // Changes the kernel makes (netns scrub, ND/MLD tailroom) are nobody's bits.
            (Some(reg), Some(seg)) if changed && seg.layer != "kernel" => {
                let both_ct = ev.ct_flags & (CT_NOW | CT_BEFORE) == CT_NOW | CT_BEFORE;
                let ct = both_ct.then_some((ev.old_ct_mark, ev.new_ct_mark));
                let key = (ev.old_mark, ev.new_mark, ct, Arc::as_ptr(seg) as usize);
                if self.attributions.len() > 65536 {
                    self.attributions.clear();
                    self.counts.fold();
                }
                let a = self.attributions.entry(key).or_insert_with(|| {
                    let change = Change {
                        old: ev.old_mark,
                        new: ev.new_mark,
                        ct,
                        chains: &seg.chains,
                        mark_writers: &seg.mark_writers,
                        socket: seg.layer == "socket",
                    };
                    Rendered::new(attribute(reg, &change))
                });
                self.counts.add(a, packets);
                Some(a.clone())
            }
            _ => None,
        };
        TraceEvent {
            time: self.wall_time(ev.ts_ns),
            ts_ns: ev.ts_ns,
            packet_id: ev.packet_id,
            kind: kind_name(ev.kind),
            at: self.point(&ev.at),
            segment,
            mark: MarkChange::new(ev.old_mark, ev.new_mark),
            ct_mark,
            tuple: tuple(ev),
            drop_reason: (ev.kind == kind::DROP).then(|| {
                self.drop_reasons
                    .get(&ev.drop_reason)
                    .cloned()
                    .unwrap_or_else(|| format!("reason {}", ev.drop_reason))
            }),
            attribution,
            socket_mark: (ev.sk_flags & SK_FULL != 0).then(|| hex(ev.sk_mark)),
            ct_id: ev.ct_id,
            count: None,
            interval: None,
            route: (ev.kind == kind::ROUTE).then(|| Route {
                table: ev.table,
                result: route_result(ev.route_err),
                flow_mark: hex(ev.new_mark),
                oif: ev.route_oif,
                iif: ev.route_iif,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::testing::fixed_seed())]
            /// Any bytes the ring buffer could hold decode without panicking.
            #[test]
            fn any_raw_record_decodes(bytes in proptest::collection::vec(any::<u8>(), std::mem::size_of::<Event>())) {
                // SAFETY: Event is plain integers; any bit pattern is a valid value.
                let raw: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
                let mut d = Decoder::new(Topology::default(), HashMap::new());
                d.registry = Some(Registry::builtin().unwrap());
                let ev = d.decode(&raw);
                prop_assert!(serde_json::to_string(&ev).is_ok());
            }

            #[test]
            fn parse_mark_never_panics(s in ".{0,24}") {
                let _ = parse_mark(&s);
            }
        }
    }

    #[test]
    fn nd_tailroom_is_the_kernel_but_rules_over_it_are_not() {
        let mut d = Decoder::new(Topology::default(), HashMap::new());
        let nf = |hook, netns| Point {
            layer: layer::NETFILTER,
            hook,
            netns,
            ..Default::default()
        };
        let ev = |prev, at, old, new| Event {
            kind: kind::TRANSITION,
            packet_id: 9,
            ip_version: 6,
            l4_proto: 0,
            prev,
            at,
            old_mark: old,
            new_mark: new,
            ..Default::default()
        };
        let layer_of = |d: &mut Decoder, e: &Event| d.decode(e).segment.unwrap().layer;
        // First sight with the tailroom value: the kernel.
        assert_eq!(
            layer_of(&mut d, &ev(Point::default(), nf(3, 1), 0, 0xd4)),
            "kernel"
        );
        // An nft rule ORing a bit over it: netfilter, attributed like any other change.
        assert_eq!(
            layer_of(&mut d, &ev(nf(3, 1), nf(3, 1), 0xd4, 0x40d4)),
            "netfilter"
        );
        // Scrubbed when it leaves its namespace: the kernel again.
        assert_eq!(
            layer_of(&mut d, &ev(nf(4, 1), nf(0, 2), 0x40d4, 0)),
            "kernel"
        );
    }

    #[test]
    fn mark_change_splits_bits() {
        let m = MarkChange::new(0x4100, 0x4200);
        assert_eq!((m.set.as_str(), m.cleared.as_str()), ("0x200", "0x100"));
    }

    #[test]
    fn parse_mark_forms() {
        assert_eq!(parse_mark("0x100").unwrap(), (0x100, u32::MAX));
        assert_eq!(parse_mark("0x4000/0x4000").unwrap(), (0x4000, 0x4000));
        assert_eq!(parse_mark("1337").unwrap(), (0x539, u32::MAX));
        assert!(parse_mark("0x100/0xf").is_err());
        assert!(parse_mark("zz").is_err());
        assert!(parse_mark("0x1ffffffff").is_err());
    }

    #[test]
    fn decodes_a_drop_with_tuple() {
        let mut raw = Event {
            kind: kind::DROP,
            old_mark: 0x100,
            new_mark: 0x100,
            drop_reason: 6,
            ip_version: 4,
            l4_proto: 17,
            sport: 40000,
            dport: 9999,
            at: Point {
                layer: layer::TRACEPOINT,
                hook: 2,
                ..Default::default()
            },
            ..Default::default()
        };
        raw.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        raw.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        let reasons = HashMap::from([(6, "NETFILTER_DROP".to_string())]);
        let ev = Decoder::new(Topology::default(), reasons).decode(&raw);
        assert_eq!(ev.kind, "drop");
        assert_eq!(ev.drop_reason.as_deref(), Some("NETFILTER_DROP"));
        assert!(ev.segment.is_none());
        let t = ev.tuple.unwrap();
        assert_eq!(
            (t.proto.as_str(), t.src.as_str(), t.dport),
            ("udp", "10.0.0.1", 9999)
        );
        let json = serde_json::to_value(&ev.mark).unwrap();
        assert_eq!(json["new"], "0x100");
    }

    #[test]
    fn caches_survive_an_unchanged_topology_and_not_a_changed_one() {
        let topo = |name: &str| Topology {
            ifnames: HashMap::from([(2, name.to_string())]),
            ..Default::default()
        };
        let mut d = Decoder::new(topo("veth-a"), HashMap::new());
        let at = Point {
            layer: layer::TC,
            ifindex: 2,
            ..Default::default()
        };
        let first = d.point(&at);
        d.set_topology(topo("veth-a"));
        assert!(
            Arc::ptr_eq(&first, &d.point(&at)),
            "same topology: cache kept"
        );
        d.set_topology(topo("eth9"));
        let renamed = d.point(&at);
        assert!(!Arc::ptr_eq(&first, &renamed));
        assert_eq!(renamed.ifname.as_deref(), Some("eth9"));
    }
}
