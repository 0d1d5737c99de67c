//! Decode: the kernel's raw `Event` record → a typed `TraceEvent`. Points and segments are
//! named once per distinct value and shared between events (`Arc`), while the topology they
//! were named with stays the same.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use fwmark_trace_common::{
    kind, layer, nf_hook, socket_slot, Event, Point, CT_BEFORE, CT_NOW, SK_FULL,
};

use crate::{
    clock::{boot_time, Timestamp},
    event::{
        CtMark, CtState, DropReason, EventKind, MarkChange, RouteLookup, RouteResult, TraceEvent,
        Tuple, XfrmRef,
    },
    mark::Mark,
    netstack::Proto,
    place::{Between, Encapsulator, PointInfo, Segment, Topology, Tunnel, TunnelDir},
};

fn event_kind(k: u8) -> Option<EventKind> {
    Some(match k {
        kind::TRANSITION => EventKind::Transition,
        kind::DROP => EventKind::Drop,
        kind::FIRST_SEEN => EventKind::FirstSeen,
        kind::OBSERVE => EventKind::Observe,
        kind::CONSUME => EventKind::Consume,
        kind::ROUTE => EventKind::Route,
        kind::TUNNEL => EventKind::Tunnel,
        _ => return None,
    })
}

/// The record's addresses and ports, when the kernel read its IP header.
pub(crate) fn tuple(ev: &Event) -> Option<Tuple> {
    let (src, dst): (IpAddr, IpAddr) = match ev.ip_version {
        4 => {
            let a = |b: &[u8; 16]| Ipv4Addr::new(b[0], b[1], b[2], b[3]).into();
            (a(&ev.saddr), a(&ev.daddr))
        }
        6 => (
            Ipv6Addr::from(ev.saddr).into(),
            Ipv6Addr::from(ev.daddr).into(),
        ),
        _ => return None,
    };
    Some(Tuple {
        proto: Proto(ev.l4_proto),
        src,
        sport: ev.sport,
        dst,
        dport: ev.dport,
    })
}

/// Turns raw records into `TraceEvent`s.
pub(crate) struct Decoder {
    topology: Topology,
    /// `enum skb_drop_reason` from kernel BTF (each displays as the kernel spells it).
    drop_reasons: HashMap<u32, DropReason>,
    /// Wall clock at CLOCK_MONOTONIC's zero (what bpf_ktime_get_ns counts).
    boot: SystemTime,
    /// Values ND/MLD packets showed as their "mark" at first sight: `reserved_tailroom` (see
    /// `kernel_tailroom`). By value, not by packet: counted events carry one packet of many.
    tailroom: HashSet<u32>,
    /// Named points and segments depend only on the points and the topology: built once each.
    points: HashMap<Point, Arc<PointInfo>>,
    segments: HashMap<(Point, Point), Arc<Segment>>,
    /// xfrm output segments, per (segment, SPI).
    xfrm_segments: HashMap<(Point, Point, u32), Arc<Segment>>,
}

impl Decoder {
    pub(crate) fn new(topology: Topology, drop_names: HashMap<u32, String>) -> Self {
        let drop_reasons = drop_names
            .iter()
            .map(|(n, name)| (*n, DropReason::from_name(name)))
            .collect();
        Self {
            topology,
            drop_reasons,
            boot: boot_time(),
            tailroom: HashSet::new(),
            points: HashMap::new(),
            segments: HashMap::new(),
            xfrm_segments: HashMap::new(),
        }
    }

    pub(crate) fn topology(&self) -> &Topology {
        &self.topology
    }

    pub(crate) fn drop_reasons(&self) -> &HashMap<u32, DropReason> {
        &self.drop_reasons
    }

    /// Wall-clock time of CLOCK_MONOTONIC's zero, as this decoder names kernel timestamps.
    pub(crate) fn boot(&self) -> SystemTime {
        self.boot
    }

    /// Names kernel timestamps from another machine's boot time (a recording's).
    pub(crate) fn with_boot(mut self, boot: SystemTime) -> Self {
        self.boot = boot;
        self
    }

    /// Replaces the topology (interfaces, tcx chains, nft chains changed). The caches that
    /// depend on it are kept while it stays the same (the daemon re-reads it every second).
    /// Returns whether it changed.
    pub(crate) fn set_topology(&mut self, topology: Topology) -> bool {
        if topology == self.topology {
            return false;
        }
        self.topology = topology;
        self.points.clear();
        self.segments.clear();
        self.xfrm_segments.clear();
        true
    }

    fn point(&mut self, p: &Point) -> Arc<PointInfo> {
        let topo = &self.topology;
        self.points
            .entry(*p)
            .or_insert_with(|| Arc::new(topo.point(p)))
            .clone()
    }

    fn segment(&mut self, prev: &Point, at: &Point) -> Arc<Segment> {
        let topo = &self.topology;
        self.segments
            .entry((*prev, *at))
            .or_insert_with(|| Arc::new(topo.segment(prev, at)))
            .clone()
    }

    pub(crate) fn wall_time(&self, ts_ns: u64) -> Timestamp {
        Timestamp(self.boot + Duration::from_nanos(ts_ns))
    }

    /// IPv6 neighbour discovery and MLD build their packets with `skb->reserved_tailroom` set,
    /// which shares its storage with `skb->mark` (a union in `struct sk_buff`): a value that
    /// appears on a kernel-built ICMPv6 packet before any observer is not a mark, nor is its
    /// vanishing when the packet leaves its namespace. Changes in between are rules writing
    /// `skb->mark` (over the tailroom value) and are attributed as usual.
    fn kernel_tailroom(&mut self, ev: &Event) -> bool {
        // MLD packets start with a hop-by-hop header (next header 0).
        if !(ev.ip_version == 6
            && matches!(
                ev.l4_proto as i32,
                libc::IPPROTO_HOPOPTS | libc::IPPROTO_ICMPV6
            ))
        {
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

    /// An xfrm step named by its state. An ESP packet is made by xfrm and its SPI names the
    /// state: a change seen on one, since it left its socket or the output hooks (where xfrm
    /// runs between two passes), is xfrm's output, whatever observers stood around it. A
    /// packet decrypted by xfrm carries the state in its sec_path.
    fn xfrm_step(&mut self, ev: &Event, seg: &Segment) -> Option<Arc<Segment>> {
        let xfrm = |dir| {
            matches!(
                seg.tunnel(),
                Some(Tunnel { dir: d, by: Encapsulator::Xfrm { .. }, .. }) if *d == dir
            )
        };
        let (dir, spi, dst) = match tuple(ev).filter(|t| t.proto == Proto::ESP) {
            Some(t) => {
                let before_device = match ev.prev.layer {
                    layer::SOCKET => true,
                    layer::NETFILTER => {
                        matches!(ev.prev.hook, nf_hook::LOCAL_OUT | nf_hook::POST_ROUTING)
                    }
                    _ => false,
                };
                if !(before_device || xfrm(TunnelDir::Encap)) {
                    return None;
                }
                // The kernel reads ESP's SPI where ports would be (sport: its high half).
                (
                    TunnelDir::Encap,
                    (t.sport as u32) << 16 | t.dport as u32,
                    Some(t.dst),
                )
            }
            None if ev.sec_spi != 0 && xfrm(TunnelDir::Decap) => {
                (TunnelDir::Decap, ev.sec_spi, None)
            }
            None => return None,
        };
        if self.xfrm_segments.len() > 1024 {
            self.xfrm_segments.clear();
        }
        let topo = &self.topology;
        let made = self
            .xfrm_segments
            .entry((ev.prev, ev.at, spi))
            .or_insert_with(|| {
                Arc::new(Segment {
                    between: Between::Tunnel(Tunnel {
                        dir,
                        by: Encapsulator::Xfrm {
                            spi: Some(spi),
                            state: topo.xfrm_state(spi, dst).cloned(),
                        },
                        crossed: None,
                    }),
                    ..seg.clone()
                })
            });
        Some(made.clone())
    }

    pub(crate) fn decode(&mut self, ev: &Event) -> TraceEvent {
        let kind = event_kind(ev.kind);
        // The conntrack mark changed between two points that both had an entry.
        let ct_changed = ev.ct_flags & (CT_NOW | CT_BEFORE) == CT_NOW | CT_BEFORE
            && ev.old_ct_mark != ev.new_ct_mark;
        let changed = ev.old_mark != ev.new_mark || ct_changed;
        let mut segment = (matches!(kind, Some(EventKind::Transition | EventKind::Tunnel))
            || (kind == Some(EventKind::Drop) && changed))
            .then(|| self.segment(&ev.prev, &ev.at));
        if let Some(seg) = segment.as_mut() {
            if self.kernel_tailroom(ev) {
                *seg = Arc::new(Segment {
                    between: Between::NdTailroom,
                    ..(**seg).clone()
                });
            } else if let Some(xfrm) = self.xfrm_step(ev, seg) {
                *seg = xfrm;
            }
        }
        let ct_mark = (ev.ct_flags & CT_NOW != 0).then(|| CtMark {
            old: Mark(ev.old_ct_mark),
            new: Mark(ev.new_ct_mark),
            changed: ct_changed,
            state: CtState::from_raw(ev.ct_info),
        });
        let drop_reason = (kind == Some(EventKind::Drop)).then(|| {
            self.drop_reasons
                .get(&ev.drop_reason)
                .cloned()
                .unwrap_or(DropReason::Unnamed(ev.drop_reason))
        });
        TraceEvent {
            time: self.wall_time(ev.ts_ns),
            ts_ns: ev.ts_ns,
            packet_id: ev.packet_id,
            // A kind this build does not know is shown as what it carries: an observation.
            kind: kind.unwrap_or(EventKind::Observe),
            at: self.point(&ev.at),
            segment,
            mark: MarkChange {
                old: Mark(ev.old_mark),
                new: Mark(ev.new_mark),
            },
            ct_mark,
            tuple: tuple(ev),
            drop_reason,
            attribution: None,
            socket_mark: (ev.sk_flags & SK_FULL != 0).then_some(Mark(ev.sk_mark)),
            ct_id: ev.ct_id,
            decrypted_by: (ev.sec_spi != 0).then(|| XfrmRef {
                spi: ev.sec_spi,
                state: self.topology.xfrm_state(ev.sec_spi, None).cloned(),
            }),
            count: None,
            interval: None,
            route: (kind == Some(EventKind::Route)).then(|| RouteLookup {
                table: ev.table,
                result: RouteResult::from_raw(ev.route_err),
                flow_mark: Mark(ev.new_mark),
                oif: ev.route_oif,
                iif: ev.route_iif,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use fwmark_trace_common::{nf_hook, tracepoint};

    use super::*;
    use crate::{fixtures::synthetic, place::Layer};

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
                let ev = d.decode(&raw);
                prop_assert!(crate::output::json::EventWriter::default().write(&ev, &mut Vec::new()).is_ok());
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
        let layer_of = |d: &mut Decoder, e: &Event| d.decode(e).segment.unwrap().layer();
        let (out, post, pre) = (
            nf_hook::LOCAL_OUT,
            nf_hook::POST_ROUTING,
            nf_hook::PRE_ROUTING,
        );
        // First sight with the tailroom value: the kernel.
        assert_eq!(
            layer_of(&mut d, &ev(Point::default(), nf(out, 1), 0, 0xd4)),
            Layer::Kernel
        );
        // An nft rule ORing a bit over it: netfilter, attributed like any other change.
        assert_eq!(
            layer_of(&mut d, &ev(nf(out, 1), nf(out, 1), 0xd4, 0x40d4)),
            Layer::Netfilter
        );
        // Scrubbed when it leaves its namespace: the kernel again.
        assert_eq!(
            layer_of(&mut d, &ev(nf(post, 1), nf(pre, 2), 0x40d4, 0)),
            Layer::Kernel
        );
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
                hook: tracepoint::KFREE_SKB,
                ..Default::default()
            },
            ..Default::default()
        };
        raw.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        raw.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        let reasons = HashMap::from([(6, "NETFILTER_DROP".to_string())]);
        let ev = Decoder::new(Topology::default(), reasons).decode(&raw);
        assert_eq!(ev.kind, EventKind::Drop);
        assert_eq!(ev.drop_reason, Some(DropReason::NetfilterDrop));
        assert!(ev.segment.is_none());
        let t = ev.tuple.unwrap();
        assert_eq!(t.to_string(), "udp 10.0.0.1:40000 -> 10.0.0.2:9999");
        assert_eq!(ev.mark.new, Mark(0x100));
    }

    #[test]
    fn caches_survive_an_unchanged_topology_and_not_a_changed_one() {
        let topo = |name: &str| Topology {
            ifnames: HashMap::from([(2, name.to_string())]),
            ..Default::default()
        };
        let mut d = Decoder::new(topo("veth-a"), HashMap::new());
        let at = synthetic(3).at;
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

#[cfg(test)]
mod xfrm_tests {
    use fwmark_trace_common::{socket_slot, tracepoint};

    use super::*;
    use crate::{
        mark::MarkMatch,
        nodestate::netlink::{XfrmMode, XfrmState},
        place::{Layer, MarkFate},
    };

    /// An ESP packet seen after its socket: xfrm's output, named by its SPI.
    #[test]
    fn an_esp_packet_names_the_state_of_its_spi() {
        let state = XfrmState {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: 50,
            spi: 0x100,
            mode: XfrmMode::Tunnel,
            reqid: 1,
            if_id: None,
            mark: None,
            output_mark: Some(MarkMatch {
                value: Mark(0x300),
                mask: Mark(0xf00),
                negated: false,
            }),
        };
        let topo = Topology {
            xfrm_states: vec![state],
            ..Default::default()
        };
        let mut d = Decoder::new(topo, HashMap::new());
        let at = Point {
            layer: layer::TRACEPOINT,
            hook: tracepoint::NET_DEV_QUEUE,
            ifindex: 2,
            netns: 1,
            ..Default::default()
        };
        let mut ev = Event {
            kind: kind::TRANSITION,
            prev: Point {
                layer: layer::SOCKET,
                slot: socket_slot::LEFT,
                ..at
            },
            at,
            old_mark: 0x100,
            new_mark: 0x300,
            ip_version: 4,
            l4_proto: 50,
            dport: 0x100,
            ..Default::default()
        };
        ev.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        ev.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        let out = d.decode(&ev);
        let seg = out.segment.expect("a segment");
        assert_eq!(seg.layer(), Layer::Xfrm);
        let t = seg.tunnel().expect("a tunnel");
        assert_eq!(t.fate(0x100, 0x300), MarkFate::SetByXfrmState);
        // Another SPI: still xfrm's, without a state to name.
        ev.dport = 0x200;
        let seg = d.decode(&ev).segment.expect("a segment");
        assert_eq!(seg.tunnel().unwrap().fate(0x100, 0x300), MarkFate::Changed);
    }
}
