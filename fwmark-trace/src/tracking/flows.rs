//! Flows: packets grouped by their 5-tuple so a request and its reply share one timeline (the
//! first packet seen sets the request direction). Routing lookups join the flow whose address
//! pair they concern. Bounded: at most `max_flows` flows (least recently seen evicted first)
//! and `max_steps` steps per flow; both are counted when they overflow.
use std::collections::{HashMap, VecDeque};

use serde::Serialize;

use crate::events::{TraceEvent, Tuple};

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
        format!(
            "{} {}:{} -> {}:{}",
            self.proto, self.src, self.sport, self.dst, self.dport
        )
    }

    pub fn path(&self, dir: Dir) -> impl Iterator<Item = &Step> {
        self.steps.iter().filter(move |s| s.dir == dir)
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
        }
    }

    /// Adds an event (events without a 5-tuple are ignored).
    pub fn add(&mut self, ev: &TraceEvent) {
        let Some(t) = &ev.tuple else { return };
        if ev.route.is_some() {
            return self.add_route(ev, t);
        }
        let k = key(t);
        if !self.flows.contains_key(&k) {
            if self.flows.len() >= self.max_flows {
                if let Some(old) = self.order.pop_front() {
                    self.flows.remove(&old);
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
        let dir = if t.src == flow.src && t.sport == flow.sport {
            Dir::Request
        } else {
            Dir::Reply
        };
        if flow.steps.len() >= self.max_steps {
            flow.steps_dropped += 1;
            return;
        }
        flow.steps.push(Self::step(ev, dir));
    }

    /// A lookup joins the most recently seen flow it concerns, in the direction of that flow's
    /// latest packet; one no flow claims waits in `pending`.
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
