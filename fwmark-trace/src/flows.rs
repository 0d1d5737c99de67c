//! Flows: packets grouped by their 5-tuple so a request and its reply share one timeline (the
//! first packet seen sets the request direction). Routing lookups join the flow whose address
//! pair they concern. Bounded: at most `max_flows` flows (least recently seen evicted first)
//! and `max_steps` steps per flow; both are counted when they overflow.
use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use fwmark_trace_common::FlowFilter;

use crate::{
    clock::Timestamp,
    event::{CtState, DropReason, EventKind, RouteLookup, TraceEvent, Tuple, XfrmRef},
    mark::Mark,
    netstack::{Family, Proto},
    place::{PointInfo, Segment},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    Request,
    Reply,
}

/// One observation of a flow's packet (or one routing lookup for it).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Step {
    pub(crate) time: Timestamp,
    /// Kernel monotonic time, to find the node state in effect at this step.
    pub(crate) ts_ns: u64,
    pub(crate) dir: Dir,
    pub(crate) packet_id: u64,
    pub(crate) kind: EventKind,
    pub(crate) at: Arc<PointInfo>,
    pub(crate) mark: Mark,
    pub(crate) old_mark: Mark,
    pub(crate) ct_mark: Option<Mark>,
    pub(crate) ct_state: Option<CtState>,
    /// Where a change or a drop happened.
    pub(crate) segment: Option<Arc<Segment>>,
    pub(crate) drop_reason: Option<DropReason>,
    pub(crate) route: Option<RouteLookup>,
    /// The packet's 5-tuple where NAT changed it from the flow's.
    pub(crate) nat_tuple: Option<Tuple>,
    /// The xfrm state that decrypted the packet (its sec_path).
    pub(crate) decrypted_by: Option<XfrmRef>,
}

impl Step {
    fn of(ev: &TraceEvent, dir: Dir) -> Step {
        Step {
            time: ev.time,
            ts_ns: ev.ts_ns,
            dir,
            packet_id: ev.packet_id,
            kind: ev.kind,
            at: ev.at.clone(),
            mark: ev.mark.new,
            old_mark: ev.mark.old,
            ct_mark: ev.ct_mark.map(|c| c.new),
            ct_state: ev.ct_mark.map(|c| c.state),
            segment: ev.segment.clone(),
            drop_reason: ev.drop_reason.clone(),
            route: ev.route,
            nat_tuple: None,
            decrypted_by: ev.decrypted_by.clone(),
        }
    }

    pub(crate) fn is_route(&self) -> bool {
        self.kind == EventKind::Route
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Flow {
    /// The first packet's tuple: the request direction.
    pub(crate) tuple: Tuple,
    pub(crate) steps: Vec<Step>,
    pub(crate) steps_dropped: u64,
}

impl Flow {
    pub(crate) fn path(&self, dir: Dir) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(move |s| s.dir == dir)
    }

    pub(crate) fn family(&self) -> Family {
        Family::of(&self.tuple.src)
    }
}

/// Both endpoints, ordered, so request and reply share a key.
type Key = (Proto, (IpAddr, u16), (IpAddr, u16));

fn key(t: &Tuple) -> Key {
    let a = (t.src, t.sport);
    let b = (t.dst, t.dport);
    if a <= b {
        (t.proto, a, b)
    } else {
        (t.proto, b, a)
    }
}

/// Which flows to follow (`trace` and `why`); nothing set: all.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Selection {
    /// One flow, either direction.
    pub(crate) flow: Option<Tuple>,
    /// Flows to or from this address.
    pub(crate) host: Option<IpAddr>,
    /// Flows with this port on either side.
    pub(crate) port: Option<u16>,
    pub(crate) proto: Option<Proto>,
}

impl Selection {
    pub(crate) fn active(&self) -> bool {
        self.flow.is_some() || self.host.is_some() || self.port.is_some() || self.proto.is_some()
    }

    /// The kernel-side pre-filter: one protocol, one port and one address, each on either
    /// side, so it selects a superset of `wants` (which refines it in userspace).
    pub(crate) fn kernel_filter(&self) -> FlowFilter {
        if !self.active() {
            return FlowFilter::NONE;
        }
        let mut f = FlowFilter {
            active: 1,
            ..FlowFilter::NONE
        };
        f.proto = self.proto.or(self.flow.map(|s| s.proto)).map_or(0, |p| p.0);
        f.port = self.port.or(self.flow.map(|s| s.sport)).unwrap_or(0);
        match self.host.or(self.flow.map(|s| s.dst)) {
            Some(IpAddr::V4(a)) => {
                f.addr_version = 4;
                f.addr[..4].copy_from_slice(&a.octets());
            }
            Some(IpAddr::V6(a)) => {
                f.addr_version = 6;
                f.addr = a.octets();
            }
            None => {}
        }
        f
    }

    /// Whether a packet's 5-tuple is selected (either direction).
    pub(crate) fn wants(&self, t: &Tuple) -> bool {
        self.flow.is_none_or(|f| *t == f || *t == f.reversed())
            && self.host.is_none_or(|h| t.src == h || t.dst == h)
            && self.port.is_none_or(|p| t.sport == p || t.dport == p)
            && self.proto.is_none_or(|p| t.proto == p)
    }

    /// Routing lookups carry partial tuples: selected when they concern a selected address pair.
    pub(crate) fn wants_route(&self, t: &Tuple) -> bool {
        match (&self.flow, &self.host) {
            (Some(f), _) => concerns(t, f.src, f.dst),
            (None, Some(h)) => t.src == *h || t.dst == *h,
            _ => true,
        }
    }

    /// Whether an event is one of the selected flows' (its packet or a lookup for it).
    pub(crate) fn wants_event(&self, ev: &TraceEvent) -> bool {
        match (&ev.tuple, &ev.route) {
            (Some(t), Some(_)) => self.wants_route(t),
            (Some(t), None) => self.wants(t),
            (None, _) => false,
        }
    }
}

/// Whether a lookup concerns the flow between `src` and `dst` (either order; output lookups
/// may not have a source address yet, reverse-path checks swap them).
fn concerns(t: &Tuple, src: IpAddr, dst: IpAddr) -> bool {
    let pair =
        |x: IpAddr, y: IpAddr| (x == src || x.is_unspecified()) && y == dst || x == dst && y == src;
    pair(t.src, t.dst) || pair(t.dst, t.src)
}

pub(crate) struct FlowTracker {
    flows: HashMap<Key, Tracked>,
    /// Recent routing lookups no flow claimed yet: a request's output lookup happens at
    /// `sendmsg`, before its packet reaches the first observer.
    pending: VecDeque<(Tuple, Step)>,
    /// Conntrack entry → flow: NAT changes the 5-tuple mid-path, not the connection.
    by_ct: HashMap<u64, Key>,
    /// Recent packets (by id) → their flow and direction, oldest first in `packet_order`:
    /// encapsulation (xfrm's ESP, a UDP tunnel's outer header) puts the same skb under
    /// another 5-tuple, and it stays on its flow's path.
    by_packet: HashMap<u64, (Key, Dir)>,
    packet_order: VecDeque<u64>,
    /// The most recently seen flow per address pair, and per request destination (a lookup
    /// made before the source address was chosen): where a lookup goes, without a search.
    by_pair: HashMap<(IpAddr, IpAddr), Key>,
    by_dst: HashMap<IpAddr, Key>,
    /// Least recently seen first, as (flow, `Tracked::seen` when queued): a flow seen again is
    /// queued again and its older entries are skipped (and compacted away), so a step costs
    /// the same however many flows there are.
    order: VecDeque<(Key, u64)>,
    /// Counts steps, to tell an entry of `order` that is current.
    clock: u64,
    max_flows: usize,
    max_steps: usize,
    pub(crate) evicted: u64,
}

/// A flow and what the tracker keeps about it.
struct Tracked {
    flow: Flow,
    /// `clock` when last seen.
    seen: u64,
    /// Its conntrack entries in `by_ct` (the most recent `MAX_CTS`), removed with it.
    cts: VecDeque<u64>,
}

/// Conntrack entries remembered per flow: a 5-tuple reused by many connections keeps the
/// recent ones.
const MAX_CTS: usize = 8;

/// An address pair in either order.
fn pair(a: IpAddr, b: IpAddr) -> (IpAddr, IpAddr) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

impl FlowTracker {
    pub(crate) fn new(max_flows: usize, max_steps: usize) -> Self {
        Self {
            flows: HashMap::new(),
            pending: VecDeque::new(),
            by_ct: HashMap::new(),
            by_packet: HashMap::new(),
            packet_order: VecDeque::new(),
            by_pair: HashMap::new(),
            by_dst: HashMap::new(),
            order: VecDeque::new(),
            clock: 0,
            max_flows,
            max_steps,
            evicted: 0,
        }
    }

    /// `k` (present) was seen now: most recent in `order` and in the lookup indexes.
    fn touch(&mut self, k: Key) {
        self.clock += 1;
        let Some(t) = self.flows.get_mut(&k) else {
            return;
        };
        t.seen = self.clock;
        let tuple = t.flow.tuple;
        self.order.push_back((k, self.clock));
        self.by_pair.insert(pair(tuple.src, tuple.dst), k);
        self.by_dst.insert(tuple.dst, k);
        // Stale entries at most as many as live ones: compacting is amortised constant.
        if self.order.len() > 2 * self.flows.len() + 64 {
            let flows = &self.flows;
            self.order
                .retain(|(k, seen)| flows.get(k).is_some_and(|t| t.seen == *seen));
        }
    }

    /// Removes the least recently seen flow and everything that points at it.
    fn evict_oldest(&mut self) {
        while let Some((k, seen)) = self.order.pop_front() {
            if self.flows.get(&k).is_none_or(|t| t.seen != seen) {
                continue;
            }
            let Some(t) = self.flows.remove(&k) else {
                return;
            };
            for ct in t.cts {
                if self.by_ct.get(&ct) == Some(&k) {
                    self.by_ct.remove(&ct);
                }
            }
            let tuple = t.flow.tuple;
            let p = pair(tuple.src, tuple.dst);
            if self.by_pair.get(&p) == Some(&k) {
                self.by_pair.remove(&p);
            }
            if self.by_dst.get(&tuple.dst) == Some(&k) {
                self.by_dst.remove(&tuple.dst);
            }
            self.evicted += 1;
            return;
        }
    }

    /// Points conntrack entry `ct` at flow `k`.
    fn remember_ct(&mut self, ct: u64, k: Key) {
        if self.by_ct.insert(ct, k) == Some(k) {
            return;
        }
        let Some(t) = self.flows.get_mut(&k) else {
            return;
        };
        t.cts.push_back(ct);
        if t.cts.len() > MAX_CTS {
            if let Some(old) = t.cts.pop_front() {
                if self.by_ct.get(&old) == Some(&k) {
                    self.by_ct.remove(&old);
                }
            }
        }
    }

    /// Whether this conntrack entry belongs to a followed flow.
    pub(crate) fn follows_ct(&self, ct_id: u64) -> bool {
        ct_id != 0 && self.by_ct.contains_key(&ct_id)
    }

    /// Whether this packet (by id) was seen on a followed flow: its encapsulated form (an
    /// ESP packet, a tunnel's outer packet) belongs to that flow too.
    pub(crate) fn follows_packet(&self, packet_id: u64) -> bool {
        packet_id != 0 && self.by_packet.contains_key(&packet_id)
    }

    /// Remembers which flow and direction a packet is on (the most recent 4096 packets).
    fn remember_packet(&mut self, packet_id: u64, k: Key, dir: Dir) {
        if packet_id == 0 {
            return;
        }
        if self.by_packet.insert(packet_id, (k, dir)).is_none() {
            self.packet_order.push_back(packet_id);
            if self.packet_order.len() > 4096 {
                if let Some(old) = self.packet_order.pop_front() {
                    self.by_packet.remove(&old);
                }
            }
        }
    }

    /// Adds an event (events without a 5-tuple are ignored).
    pub(crate) fn add(&mut self, ev: &TraceEvent) {
        let Some(t) = &ev.tuple else { return };
        if ev.route.is_some() {
            return self.add_route(ev, t);
        }
        let mut k = key(t);
        let mut nat = None;
        if !self.flows.contains_key(&k) {
            if let Some(known) = self.by_ct.get(&ev.ct_id).filter(|_| ev.ct_id != 0) {
                // Same connection, rewritten tuple: NAT.
                nat = Some(*t);
                k = *known;
            }
        }
        // Same packet (skb), another tuple with no flow of its own, and no conntrack entry in
        // common: encapsulated (the request's ESP packet after xfrm, a tunnel's outer packet).
        // It joins its packet's flow in that packet's direction, so the request's path shows
        // the step into the tunnel. (A tuple that has its flow keeps it: a decrypted reply is
        // the ESP packet's skb, and belongs to its own flow.)
        let mut encapsulated = None;
        if nat.is_none() && !self.flows.contains_key(&k) && ev.packet_id != 0 {
            if let Some(&(known, dir)) = self.by_packet.get(&ev.packet_id) {
                if self.flows.contains_key(&known) {
                    k = known;
                    encapsulated = Some(dir);
                }
            }
        }
        if !self.flows.contains_key(&k) {
            if self.flows.len() >= self.max_flows {
                self.evict_oldest();
            }
            self.flows.insert(
                k,
                Tracked {
                    flow: Flow {
                        tuple: *t,
                        steps: Vec::new(),
                        steps_dropped: 0,
                    },
                    seen: 0,
                    cts: VecDeque::new(),
                },
            );
        }
        self.touch(k);
        // An outer packet's conntrack entry is the tunnel's, shared with other flows: not this
        // flow's.
        if ev.ct_id != 0 && encapsulated.is_none() {
            self.remember_ct(ev.ct_id, k);
        }
        let flow = &mut self.flows.get_mut(&k).expect("inserted").flow;
        if flow.steps.is_empty() {
            // Lookups made for this packet before it was first seen belong to its request.
            let (src, dst) = (flow.tuple.src, flow.tuple.dst);
            let (mine, rest): (VecDeque<_>, VecDeque<_>) = self
                .pending
                .drain(..)
                .partition(|(rt, _)| concerns(rt, src, dst));
            self.pending = rest;
            flow.steps.extend(mine.into_iter().map(|(_, st)| st));
        }
        let dir = match (encapsulated, &nat, ev.ct_mark.map(|c| c.state)) {
            // An outer packet goes the way its inner packet went.
            (Some(dir), _, _) => dir,
            // After NAT the tuple no longer tells; conntrack's direction does.
            (None, Some(_), Some(state)) if state.is_reply() => Dir::Reply,
            (None, Some(_), _) => Dir::Request,
            _ if t.src == flow.tuple.src && t.sport == flow.tuple.sport => Dir::Request,
            _ => Dir::Reply,
        };
        // Lookups are made for the packet that follows them (output routing before the
        // request's LOCAL_OUT; input and reverse-path routing before the reply's fate).
        for st in flow.steps.iter_mut().rev().take_while(|st| st.is_route()) {
            st.dir = dir;
        }
        if flow.steps.len() >= self.max_steps {
            flow.steps_dropped += 1;
        } else {
            let mut step = Step::of(ev, dir);
            step.nat_tuple = nat;
            flow.steps.push(step);
        }
        self.remember_packet(ev.packet_id, k, dir);
    }

    /// A lookup joins the most recently seen flow it concerns (its direction is settled by the
    /// next packet step); one no flow claims waits in `pending`.
    fn add_route(&mut self, ev: &TraceEvent, t: &Tuple) {
        // The flows `concerns` can match: its address pair's, or with one end not chosen yet,
        // the other end's as destination.
        let unset = |a: IpAddr| a.is_unspecified().then_some(a);
        let candidates = [
            self.by_pair.get(&pair(t.src, t.dst)),
            unset(t.src).and_then(|_| self.by_dst.get(&t.dst)),
            unset(t.dst).and_then(|_| self.by_dst.get(&t.src)),
        ];
        let hit = candidates
            .into_iter()
            .flatten()
            .filter_map(|k| self.flows.get(k).map(|f| (*k, f)))
            .filter(|(_, f)| concerns(t, f.flow.tuple.src, f.flow.tuple.dst))
            .max_by_key(|(_, f)| f.seen)
            .map(|(k, _)| k);
        let Some(k) = hit else {
            if self.pending.len() >= 256 {
                self.pending.pop_front();
            }
            self.pending.push_back((*t, Step::of(ev, Dir::Request)));
            return;
        };
        let max = self.max_steps;
        let flow = &mut self.flows.get_mut(&k).expect("found").flow;
        let dir = flow.steps.last().map_or(Dir::Request, |s| s.dir);
        if flow.steps.len() >= max {
            flow.steps_dropped += 1;
            return;
        }
        flow.steps.push(Step::of(ev, dir));
    }

    /// The flows, least recently seen first.
    pub(crate) fn flows(&self) -> impl Iterator<Item = &Flow> {
        self.order.iter().filter_map(|(k, seen)| {
            let t = self.flows.get(k)?;
            (t.seen == *seen).then_some(&t.flow)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode::Decoder, fixtures::synthetic, place::Topology};

    fn t(s: &str) -> Tuple {
        s.parse().unwrap()
    }

    #[test]
    fn selection() {
        let sel = Selection {
            flow: Some(t("udp 10.0.0.1:4 -> 10.0.0.2:7")),
            ..Default::default()
        };
        assert!(sel.wants(&t("udp 10.0.0.1:4 -> 10.0.0.2:7")));
        assert!(sel.wants(&t("udp 10.0.0.2:7 -> 10.0.0.1:4")));
        assert!(!sel.wants(&t("udp 10.0.0.2:7 -> 10.0.0.1:5")));
        assert!(sel.wants_route(&t("udp 0.0.0.0:4 -> 10.0.0.2:7")));
        let port = Selection {
            port: Some(7),
            ..Default::default()
        };
        assert!(port.wants(&t("udp 10.0.0.2:7 -> 10.0.0.1:5")));
        let proto = Selection {
            proto: Some(Proto::TCP),
            ..Default::default()
        };
        assert!(!proto.wants(&t("udp 10.0.0.2:7 -> 10.0.0.1:5")));
        let f = sel.kernel_filter();
        assert_eq!((f.proto, f.port, f.addr_version), (17, 4, 4));
    }

    #[test]
    fn request_and_reply_share_a_flow_and_the_tracker_is_bounded() {
        let mut d = Decoder::new(Topology::default(), Default::default());
        let mut tracker = FlowTracker::new(2, 3);
        let mut req = synthetic(1);
        let mut rep = synthetic(1);
        std::mem::swap(&mut rep.saddr, &mut rep.daddr);
        std::mem::swap(&mut rep.sport, &mut rep.dport);
        req.sport = 1000;
        rep.dport = 1000;
        rep.sport = req.dport;
        for ev in [&req, &rep, &req, &req] {
            tracker.add(&d.decode(ev));
        }
        let flows: Vec<&Flow> = tracker.flows().collect();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].path(Dir::Request).count(), 2);
        assert_eq!(flows[0].path(Dir::Reply).count(), 1);
        assert_eq!(flows[0].steps_dropped, 1, "max 3 steps per flow");
        for port in [2000, 3000] {
            let mut other = synthetic(1);
            other.sport = port;
            tracker.add(&d.decode(&other));
        }
        assert_eq!(tracker.flows().count(), 2);
        assert_eq!(tracker.evicted, 1);
    }

    /// 10,000 flows through a tracker of 1,000: the oldest go, each counted, the bookkeeping
    /// stays proportional to the flows kept, and a flow seen again is kept over older ones.
    #[test]
    fn many_flows_stay_bounded() {
        let mut d = Decoder::new(Topology::default(), Default::default());
        let mut tracker = FlowTracker::new(1000, 8);
        let mut first = synthetic(1);
        first.sport = 1;
        for port in 0..10_000u16 {
            let mut ev = synthetic(1);
            ev.sport = 2 + port;
            ev.ct_id = port as u64 + 1;
            tracker.add(&d.decode(&ev));
            // One old flow keeps being seen.
            tracker.add(&d.decode(&first));
        }
        assert_eq!(tracker.flows().count(), 1000);
        assert_eq!(tracker.evicted, 9_001);
        assert!(
            tracker.order.len() <= 2 * 1000 + 64,
            "{}",
            tracker.order.len()
        );
        assert!(tracker.by_ct.len() <= 1000, "{}", tracker.by_ct.len());
        assert!(tracker.flows().any(|f| f.tuple.sport == 1));
        // Least recently seen first: the busy flow is last.
        assert_eq!(tracker.flows().last().map(|f| f.tuple.sport), Some(1));
    }

    /// The request's ESP packet is its skb under another tuple: it stays on the request's
    /// path; another packet's ESP makes a flow of its own.
    #[test]
    fn an_encapsulated_packet_stays_on_its_flow() {
        let mut d = Decoder::new(Topology::default(), Default::default());
        let mut tracker = FlowTracker::new(8, 16);
        let mut req = synthetic(1);
        req.packet_id = 7;
        req.sport = 1000;
        let mut esp = synthetic(1);
        esp.packet_id = 7;
        esp.l4_proto = 50;
        (esp.sport, esp.dport) = (0, 0x100);
        assert!(!tracker.follows_packet(7));
        tracker.add(&d.decode(&req));
        assert!(tracker.follows_packet(7));
        tracker.add(&d.decode(&esp));
        let flows: Vec<&Flow> = tracker.flows().collect();
        assert_eq!(flows.len(), 1, "{flows:#?}");
        assert_eq!(flows[0].tuple.proto, Proto::UDP);
        assert_eq!(flows[0].path(Dir::Request).count(), 2);
        esp.packet_id = 8;
        tracker.add(&d.decode(&esp));
        assert_eq!(tracker.flows().count(), 2);
    }
}
