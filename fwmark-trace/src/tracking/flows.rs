//! Flows: packets grouped by their 5-tuple so a request and its reply share one timeline (the
//! first packet seen sets the request direction). Routing lookups join the flow whose address
//! pair they concern. Bounded: at most `max_flows` flows (least recently seen evicted first)
//! and `max_steps` steps per flow; both are counted when they overflow.
use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
};

use clap::Args;
use serde::Serialize;

use fwmark_trace_common::FlowFilter;

use crate::events::{flow_label, has_ports, proto_number, TraceEvent, Tuple};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    Request,
    Reply,
}

/// One observation of a flow's packet (or one routing lookup for it).
#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub time: String,
    /// Kernel monotonic time, to find the node state in effect at this step.
    #[serde(skip)]
    pub ts_ns: u64,
    pub dir: Dir,
    pub packet_id: u64,
    pub kind: &'static str,
    /// "netfilter output ipv4 prio -149", "tc egress veth-a (last)", "routing table 100".
    pub point: String,
    pub layer: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    pub mark: u32,
    pub old_mark: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ct_mark: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ct_state: Option<&'static str>,
    /// Where a change or a drop happened.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_result: Option<String>,
    /// The packet's 5-tuple where NAT changed it from the flow's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nat_tuple: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Flow {
    pub proto: String,
    pub src: String,
    pub sport: u16,
    pub dst: String,
    pub dport: u16,
    pub steps: Vec<Step>,
    pub steps_dropped: u64,
}

impl Flow {
    pub fn label(&self) -> String {
        flow_label(&self.proto, &self.src, self.sport, &self.dst, self.dport)
    }

    pub fn path(&self, dir: Dir) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(move |s| s.dir == dir)
    }

    pub fn ipv6(&self) -> bool {
        self.src.contains(':')
    }
}

/// Both endpoints, ordered, so request and reply share a key.
type Key = (String, (String, u16), (String, u16));

fn key(t: &Tuple) -> Key {
    let a = (t.src.clone(), t.sport);
    let b = (t.dst.clone(), t.dport);
    if a <= b {
        (t.proto.clone(), a, b)
    } else {
        (t.proto.clone(), b, a)
    }
}

pub fn hex_value(s: &str) -> u32 {
    u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or(0)
}

/// Which flows to follow (`trace` and `why`); nothing set: all.
#[derive(Args, Clone, Debug, Default)]
pub struct FlowSelect {
    /// One flow: 'PROTO SRC:PORT -> DST:PORT' (either direction matches; IPv6 as [ADDR]:PORT; no ports for icmp).
    #[arg(long, value_parser = parse_flow)]
    pub flow: Option<FlowSpec>,
    /// Flows to or from this address.
    #[arg(long)]
    pub host: Option<IpAddr>,
    /// Flows with this port on either side.
    #[arg(long)]
    pub port: Option<u16>,
    /// Flows of this protocol (tcp, udp, icmp, …).
    #[arg(long)]
    pub proto: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FlowSpec {
    pub proto: String,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

/// `udp 10.0.0.1:40000 -> 10.0.0.2:80` (IPv6 as `[fd00::1]:80`).
pub fn parse_flow(s: &str) -> Result<FlowSpec, String> {
    let err = || {
        format!("--flow {s:?}: expected 'PROTO SRC:PORT -> DST:PORT', e.g. 'udp 10.0.0.1:40000 -> 10.0.0.2:53' (no ports for icmp)")
    };
    let (proto, rest) = s.trim().split_once(' ').ok_or_else(err)?;
    let proto = proto.to_lowercase();
    let proto = proto.as_str();
    let (a, b) = rest.split_once("->").ok_or_else(err)?;
    let ep = |e: &str| -> Result<(IpAddr, u16), String> {
        // Portless protocols are written with bare addresses, as `flow_label` prints them.
        if !has_ports(proto) {
            return Ok((e.trim().parse().map_err(|_| err())?, 0));
        }
        let (ip, port) = e.trim().rsplit_once(':').ok_or_else(err)?;
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        Ok((
            ip.parse().map_err(|_| err())?,
            port.parse().map_err(|_| err())?,
        ))
    };
    let ((src, sport), (dst, dport)) = (ep(a)?, ep(b)?);
    Ok(FlowSpec {
        proto: proto.to_string(),
        src,
        sport,
        dst,
        dport,
    })
}

impl FlowSelect {
    pub fn active(&self) -> bool {
        self.flow.is_some() || self.host.is_some() || self.port.is_some() || self.proto.is_some()
    }

    /// The kernel-side pre-filter: one protocol, one port and one address, each on either
    /// side, so it selects a superset of `wants` (which refines it in userspace).
    pub fn kernel_filter(&self) -> FlowFilter {
        if !self.active() {
            return FlowFilter::NONE;
        }
        let mut f = FlowFilter {
            active: 1,
            ..FlowFilter::NONE
        };
        let proto = self
            .proto
            .as_deref()
            .or(self.flow.as_ref().map(|s| s.proto.as_str()));
        // An unknown protocol name is left to userspace.
        f.proto = proto.and_then(proto_number).unwrap_or(0);
        f.port = self
            .port
            .or(self.flow.as_ref().map(|s| s.sport))
            .unwrap_or(0);
        match self.host.or(self.flow.as_ref().map(|s| s.dst)) {
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
    pub fn wants(&self, t: &Tuple) -> bool {
        let has = |ip: &IpAddr| t.src == ip.to_string() || t.dst == ip.to_string();
        self.flow.as_ref().is_none_or(|f| {
            let (s, d) = (f.src.to_string(), f.dst.to_string());
            t.proto == f.proto
                && ((t.src == s && t.sport == f.sport && t.dst == d && t.dport == f.dport)
                    || (t.dst == s && t.dport == f.sport && t.src == d && t.sport == f.dport))
        }) && self.host.as_ref().is_none_or(has)
            && self.port.is_none_or(|p| t.sport == p || t.dport == p)
            && self.proto.as_ref().is_none_or(|p| &t.proto == p)
    }

    /// Routing lookups carry partial tuples: selected when they concern a selected address pair.
    pub fn wants_route(&self, t: &Tuple) -> bool {
        match (&self.flow, &self.host) {
            (Some(f), _) => concerns(t, &f.src.to_string(), &f.dst.to_string()),
            (None, Some(h)) => t.src == h.to_string() || t.dst == h.to_string(),
            _ => true,
        }
    }
}

/// Whether a lookup concerns the flow between `src` and `dst` (either order; output lookups
/// may not have a source address yet, reverse-path checks swap them).
fn concerns(t: &Tuple, src: &str, dst: &str) -> bool {
    let unspecified = |a: &str| a == "0.0.0.0" || a == "::";
    let pair = |x: &str, y: &str| (x == src || unspecified(x)) && y == dst || x == dst && y == src;
    pair(&t.src, &t.dst) || pair(&t.dst, &t.src)
}

pub struct FlowTracker {
    flows: HashMap<Key, Flow>,
    /// Recent routing lookups no flow claimed yet: a request's output lookup happens at
    /// `sendmsg`, before its packet reaches the first observer.
    pending: VecDeque<(Tuple, Step)>,
    /// Conntrack entry → flow: NAT changes the 5-tuple mid-path, not the connection.
    by_ct: HashMap<u64, Key>,
    /// Least recently seen first.
    order: VecDeque<Key>,
    max_flows: usize,
    max_steps: usize,
    pub evicted: u64,
}

impl FlowTracker {
    pub fn new(max_flows: usize, max_steps: usize) -> Self {
        Self {
            flows: HashMap::new(),
            pending: VecDeque::new(),
            by_ct: HashMap::new(),
            order: VecDeque::new(),
            max_flows,
            max_steps,
            evicted: 0,
        }
    }

    fn touch(&mut self, k: &Key) {
        if let Some(i) = self.order.iter().position(|x| x == k) {
            let k = self.order.remove(i).expect("present");
            self.order.push_back(k);
        }
    }

    fn step(ev: &TraceEvent, dir: Dir) -> Step {
        let label = match &ev.route {
            Some(r) => format!("routing table {} ({})", r.table, r.result),
            None => {
                let at = &ev.at;
                let mut l = format!("{} {}", at.layer, at.hook.unwrap_or(""));
                if let Some(f) = at.family {
                    l += &format!(" {f}");
                }
                if let Some(p) = at.priority {
                    l += &format!(" prio {p}");
                }
                if let Some(p) = at.position {
                    l += &format!(" ({p})");
                }
                if let Some(i) = &at.ifname {
                    l += &format!(" {i}");
                }
                l
            }
        };
        Step {
            time: ev.time.clone(),
            ts_ns: ev.ts_ns,
            dir,
            packet_id: ev.packet_id,
            kind: ev.kind,
            point: label,
            layer: ev.at.layer,
            hook: ev.at.hook,
            priority: ev.at.priority,
            ifname: ev.at.ifname.clone(),
            mark: hex_value(&ev.mark.new),
            old_mark: hex_value(&ev.mark.old),
            ct_mark: ev.ct_mark.as_ref().map(|c| hex_value(&c.new)),
            ct_state: ev.ct_mark.as_ref().map(|c| c.state),
            segment: ev.segment.as_ref().map(|s| s.description.clone()),
            chains: ev
                .segment
                .as_ref()
                .map(|s| s.chains.clone())
                .unwrap_or_default(),
            drop_reason: ev.drop_reason.clone(),
            table: ev.route.as_ref().map(|r| r.table),
            route_result: ev.route.as_ref().map(|r| r.result.clone()),
            nat_tuple: None,
        }
    }

    /// Whether this conntrack entry belongs to a followed flow.
    pub fn follows_ct(&self, ct_id: u64) -> bool {
        ct_id != 0 && self.by_ct.contains_key(&ct_id)
    }

    /// Adds an event (events without a 5-tuple are ignored).
    pub fn add(&mut self, ev: &TraceEvent) {
        let Some(t) = &ev.tuple else { return };
        if ev.route.is_some() {
            return self.add_route(ev, t);
        }
        let mut k = key(t);
        let mut nat = None;
        if !self.flows.contains_key(&k) {
            if let Some(known) = self.by_ct.get(&ev.ct_id).filter(|_| ev.ct_id != 0) {
                // Same connection, rewritten tuple: NAT.
                nat = Some(t.label());
                k = known.clone();
            }
        }
        if !self.flows.contains_key(&k) {
            if self.flows.len() >= self.max_flows {
                if let Some(old) = self.order.pop_front() {
                    self.flows.remove(&old);
                    self.by_ct.retain(|_, k| *k != old);
                    self.evicted += 1;
                }
            }
            self.flows.insert(
                k.clone(),
                Flow {
                    proto: t.proto.clone(),
                    src: t.src.clone(),
                    sport: t.sport,
                    dst: t.dst.clone(),
                    dport: t.dport,
                    steps: Vec::new(),
                    steps_dropped: 0,
                },
            );
            self.order.push_back(k.clone());
        } else {
            self.touch(&k);
        }
        if ev.ct_id != 0 {
            self.by_ct.insert(ev.ct_id, k.clone());
        }
        let flow = self.flows.get_mut(&k).expect("inserted");
        if flow.steps.is_empty() {
            // Lookups made for this packet before it was first seen belong to its request.
            let (mine, rest): (VecDeque<_>, VecDeque<_>) = self
                .pending
                .drain(..)
                .partition(|(rt, _)| concerns(rt, &flow.src, &flow.dst));
            self.pending = rest;
            flow.steps.extend(mine.into_iter().map(|(_, st)| st));
        }
        let dir = match (&nat, ev.ct_mark.as_ref().map(|c| c.state)) {
            // After NAT the tuple no longer tells; conntrack's direction does.
            (Some(_), Some(state)) if state.ends_with("_reply") => Dir::Reply,
            (Some(_), _) => Dir::Request,
            _ if t.src == flow.src && t.sport == flow.sport => Dir::Request,
            _ => Dir::Reply,
        };
        // Lookups are made for the packet that follows them (output routing before the
        // request's LOCAL_OUT; input and reverse-path routing before the reply's fate).
        for st in flow
            .steps
            .iter_mut()
            .rev()
            .take_while(|st| st.kind == "route")
        {
            st.dir = dir;
        }
        if flow.steps.len() >= self.max_steps {
            flow.steps_dropped += 1;
            return;
        }
        let mut step = Self::step(ev, dir);
        step.nat_tuple = nat;
        flow.steps.push(step);
    }

    /// A lookup joins the most recently seen flow it concerns (its direction is settled by the
    /// next packet step); one no flow claims waits in `pending`.
    fn add_route(&mut self, ev: &TraceEvent, t: &Tuple) {
        let hit = self
            .order
            .iter()
            .rev()
            .find(|k| concerns(t, &self.flows[*k].src, &self.flows[*k].dst))
            .cloned();
        let Some(k) = hit else {
            if self.pending.len() >= 256 {
                self.pending.pop_front();
            }
            self.pending
                .push_back((t.clone(), Self::step(ev, Dir::Request)));
            return;
        };
        let max = self.max_steps;
        let flow = self.flows.get_mut(&k).expect("found");
        let dir = flow.steps.last().map_or(Dir::Request, |s| s.dir);
        if flow.steps.len() >= max {
            flow.steps_dropped += 1;
            return;
        }
        flow.steps.push(Self::step(ev, dir));
    }

    pub fn flows(&self) -> impl Iterator<Item = &Flow> {
        self.order.iter().map(|k| &self.flows[k])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{events::Decoder, pipeline_bench::synthetic, tracking::segment::Topology};

    fn t(proto: &str, src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple {
            proto: proto.into(),
            src: src.into(),
            sport,
            dst: dst.into(),
            dport,
        }
    }

    #[test]
    fn flow_specs_and_selection() {
        let f = parse_flow("udp 10.0.0.1:40000 -> 10.0.0.2:53").unwrap();
        assert_eq!((f.proto.as_str(), f.sport, f.dport), ("udp", 40000, 53));
        assert!(parse_flow("[fd00::1]:1 -> [fd00::2]:2").is_err());
        // What the outputs print parses back.
        for label in [
            "tcp [fd00::1]:80 -> [fd00::2]:40000",
            "icmp 10.0.0.1 -> 10.0.0.2",
            "udp 10.0.0.1:40000 -> 10.0.0.2:53",
        ] {
            let f = parse_flow(label).unwrap();
            let again = flow_label(
                &f.proto,
                &f.src.to_string(),
                f.sport,
                &f.dst.to_string(),
                f.dport,
            );
            assert_eq!(again, label);
        }
        assert_eq!(
            parse_flow("tcp [fd00::1]:1 -> [fd00::2]:2").unwrap().dst,
            "fd00::2".parse::<IpAddr>().unwrap()
        );
        assert!(parse_flow("udp 10.0.0.1 -> 10.0.0.2:53").is_err());
        assert!(parse_flow("icmp 10.0.0.1:1 -> 10.0.0.2").is_err());
        let sel = FlowSelect {
            flow: Some(parse_flow("udp 10.0.0.1:4 -> 10.0.0.2:7").unwrap()),
            ..Default::default()
        };
        assert!(sel.wants(&t("udp", "10.0.0.1", 4, "10.0.0.2", 7)));
        assert!(sel.wants(&t("udp", "10.0.0.2", 7, "10.0.0.1", 4)));
        assert!(!sel.wants(&t("udp", "10.0.0.2", 7, "10.0.0.1", 5)));
        assert!(sel.wants_route(&t("udp", "0.0.0.0", 4, "10.0.0.2", 7)));
        let port = FlowSelect {
            port: Some(7),
            ..Default::default()
        };
        assert!(port.wants(&t("udp", "10.0.0.2", 7, "10.0.0.1", 5)));
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
}
