//! Where a change happened: between the packet's previous observation point and this one.
//! The kernel reports the two points; this module turns them into a segment a person can act
//! on ("netfilter output ipv4, priority -2147483647..-149: inet fw/mangle_out@-150", "tc egress
//! veth0 between our first and last observers: programs cil_to_netdev (id 42)", "kernel:
//! crossing into another network namespace scrubs the mark").
use std::collections::HashMap;

use fwmark_trace_common::{layer, socket_slot, tc_dir, tc_slot, tracepoint, Point, NF_SLOT_CHAIN};
use serde::Serialize;

use crate::{
    kernel::tcx::dir_name,
    nodestate::nft::{hook_name, Chain, NfPlan},
};

/// What the daemon knows about the observation points it placed (also saved with recordings,
/// to name their points when they are shown).
#[derive(Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Topology {
    pub plan: Option<NfPlan>,
    pub chains: Vec<Chain>,
    /// Foreign tcx programs per (ifindex, direction), between our first and last observers.
    #[serde(with = "pairs")]
    pub tc_programs: HashMap<(u32, u8), Vec<String>>,
    /// The tc observers are cls_bpf filters in clsact qdiscs (kernels before 6.6), not tcx.
    #[serde(default)]
    pub tc_filters: bool,
    /// Interface names are those of this namespace (where the daemon attached).
    pub ifnames: HashMap<u32, String>,
    pub own_netns: u32,
}

/// An observation point, named.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct PointInfo {
    pub layer: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<&'static str>,
    pub ifindex: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ifname: Option<String>,
    pub netns: u32,
}

/// The stretch of the path a change happened in.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Segment {
    /// netfilter, tc, socket, kernel, routing, path (between different layers), unknown.
    pub layer: &'static str,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority_range: Option<[i32; 2]>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<String>,
    /// Regular chains the chains above jump to that write a mark (where iptables-nft's rules
    /// live: the base chain is only "ip mangle/OUTPUT").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mark_writers: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<String>,
    pub from: PointInfo,
}

/// A map with tuple keys as a list of pairs (JSON keys are strings).
mod pairs {
    use std::{collections::HashMap, hash::Hash};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        m: &HashMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<HashMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Eq + Hash,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

pub fn family_name(nfproto: u8) -> Option<&'static str> {
    match nfproto {
        2 => Some("ipv4"),
        10 => Some("ipv6"),
        _ => None,
    }
}

fn tp_name(id: u8) -> &'static str {
    match id {
        tracepoint::NETIF_RECEIVE_SKB => "netif_receive_skb",
        tracepoint::NET_DEV_QUEUE => "net_dev_queue",
        tracepoint::KFREE_SKB => "kfree_skb",
        tracepoint::CONSUME_SKB => "consume_skb",
        _ => "tracepoint",
    }
}

impl Topology {
    pub fn point(&self, p: &Point) -> PointInfo {
        let mut info = PointInfo {
            layer: "unknown",
            hook: None,
            family: None,
            priority: None,
            position: None,
            ifindex: p.ifindex,
            ifname: (p.netns == self.own_netns || p.netns == 0 || self.own_netns == 0)
                .then(|| self.ifnames.get(&p.ifindex).cloned())
                .flatten(),
            netns: p.netns,
        };
        match p.layer {
            layer::TC => {
                info.layer = "tc";
                info.hook = Some(dir_name(p.hook));
                info.position = Some(if p.slot == tc_slot::FIRST {
                    "first"
                } else {
                    "last"
                });
            }
            layer::NETFILTER => {
                info.layer = "netfilter";
                info.hook = Some(hook_name(p.hook));
                info.family = family_name(p.family);
                info.priority = self.priority(p);
            }
            layer::TRACEPOINT => {
                info.layer = "tracepoint";
                info.hook = Some(tp_name(p.hook));
            }
            layer::SOCKET => info.layer = "socket",
            layer::ROUTING => {
                info.layer = "routing";
                info.family = family_name(p.family);
            }
            layer::NONE => info.layer = "none",
            _ => {}
        }
        info
    }

    fn priority(&self, p: &Point) -> Option<i32> {
        if p.slot == NF_SLOT_CHAIN {
            return Some(p.priority);
        }
        self.plan.as_ref()?.priority(p.family, p.hook, p.slot)
    }

    /// A short human label for a point: "netfilter output ipv4 prio -149", "tc egress veth0 (first)".
    pub fn label(&self, info: &PointInfo) -> String {
        let dev = info
            .ifname
            .clone()
            .unwrap_or_else(|| format!("if{}", info.ifindex));
        match info.layer {
            "netfilter" => format!(
                "netfilter {} {} prio {}",
                info.hook.unwrap_or("?"),
                info.family.unwrap_or("?"),
                info.priority.map_or("?".into(), |p| p.to_string())
            ),
            "tc" => format!(
                "tc {} {dev} ({})",
                info.hook.unwrap_or("?"),
                info.position.unwrap_or("?")
            ),
            "tracepoint" => format!("{} {dev}", info.hook.unwrap_or("?")),
            "socket" => "socket (SO_MARK)".into(),
            "none" => "before the first observer".into(),
            other => other.into(),
        }
    }

    /// The segment between `prev` and `at` in which a change was seen.
    pub fn segment(&self, prev: &Point, at: &Point) -> Segment {
        let from = self.point(prev);
        let to = self.point(at);
        let mut seg = Segment {
            layer: "path",
            description: format!("between {} and {}", self.label(&from), self.label(&to)),
            hook: None,
            family: None,
            priority_range: None,
            chains: Vec::new(),
            mark_writers: Vec::new(),
            programs: Vec::new(),
            from,
        };
        match (prev.layer, at.layer) {
            (layer::SOCKET, _) if prev.slot == socket_slot::LEFT => {
                seg.description = format!(
                    "between the sending socket (its SO_MARK) and {}: no observer in between (a writer the plan did not foresee)",
                    self.label(&to)
                );
            }
            (layer::SOCKET, _) => {
                seg.layer = "socket";
                seg.description = "socket: SO_MARK of the sending socket".into();
            }
            (layer::NONE, _) => {
                seg.layer = "unknown";
                seg.description = format!(
                    "before the first observer ({}): the mark was already set",
                    self.label(&to)
                );
            }
            _ if prev.netns != at.netns && prev.netns != 0 && at.netns != 0 => {
                seg.layer = "kernel";
                seg.description = format!(
                    "kernel: the packet crossed from netns {} to {} (veth/dev_forward_skb scrubs skb->mark)",
                    prev.netns, at.netns
                );
            }
            (layer::NETFILTER, layer::NETFILTER)
                if prev.hook == at.hook && prev.family == at.family =>
            {
                self.netfilter_band(&mut seg, prev, at)
            }
            // The tcx chain between our observers. On ingress, `netif_receive_skb` is as good
            // as "first": nothing between them writes marks.
            (layer::TC | layer::TRACEPOINT, layer::TC)
                if prev.ifindex == at.ifindex
                    && at.slot == tc_slot::LAST
                    && ((prev.layer == layer::TC
                        && prev.hook == at.hook
                        && prev.slot == tc_slot::FIRST)
                        || (prev.layer == layer::TRACEPOINT
                            && prev.hook == tracepoint::NETIF_RECEIVE_SKB
                            && at.hook == tc_dir::INGRESS)) =>
            {
                seg.layer = "tc";
                seg.hook = Some(dir_name(at.hook));
                seg.programs = self.tcx_programs(at.ifindex, at.hook);
                let dev = self.label(&to);
                let chain = if self.tc_filters {
                    "clsact filter"
                } else {
                    "tcx program"
                };
                seg.description = if seg.programs.is_empty() {
                    format!("{dev}: the {chain}s around our observer(s)")
                } else {
                    format!("{dev}: {chain}(s) {}", seg.programs.join(", "))
                };
            }
            // Egress, from our last observer to the queue: classic tc after the tcx chain. From
            // "first" (a tcx program ended the chain with a verdict, so "last" did not run): that
            // program too.
            (layer::TC, layer::TRACEPOINT)
                if prev.hook == tc_dir::EGRESS
                    && at.hook == tracepoint::NET_DEV_QUEUE
                    && prev.ifindex == at.ifindex =>
            {
                seg.layer = "tc";
                seg.hook = Some("egress");
                let dev = to.ifname.clone().unwrap_or_default();
                seg.description = if prev.slot == tc_slot::FIRST {
                    seg.programs = self.tcx_programs(at.ifindex, tc_dir::EGRESS);
                    let tcx = if seg.programs.is_empty() {
                        String::new()
                    } else {
                        format!("tcx program(s) {}, then ", seg.programs.join(", "))
                    };
                    format!("tc egress {dev}: {tcx}clsact/cls_bpf filters and actions after the tcx chain")
                } else {
                    format!(
                        "tc egress {dev} after the tcx chain: clsact/cls_bpf filters and actions"
                    )
                };
            }
            (layer::TC, layer::NETFILTER)
                if prev.hook == tc_dir::INGRESS && prev.slot == tc_slot::LAST =>
            {
                seg.layer = "tc";
                seg.hook = Some("ingress");
                seg.description = format!(
                    "tc ingress {} after the tcx chain: clsact/cls_bpf filters, netdev ingress hook",
                    seg.from.ifname.clone().unwrap_or_default()
                );
            }
            (layer::NETFILTER, layer::NETFILTER) => {
                seg.layer = "routing";
                seg.description = format!(
                    "between netfilter hooks ({} → {}): routing decision, xfrm, or the stack",
                    self.label(&seg.from),
                    self.label(&to)
                );
            }
            _ => {}
        }
        seg
    }

    fn tcx_programs(&self, ifindex: u32, dir: u8) -> Vec<String> {
        self.tc_programs
            .get(&(ifindex, dir))
            .cloned()
            .unwrap_or_default()
    }

    fn netfilter_band(&self, seg: &mut Segment, prev: &Point, at: &Point) {
        let (lo, hi) = (self.priority(prev), self.priority(at));
        seg.layer = "netfilter";
        seg.hook = Some(hook_name(at.hook));
        seg.family = family_name(at.family);
        if let (Some(lo), Some(hi)) = (lo, hi) {
            seg.priority_range = Some([lo, hi]);
            let here: Vec<&Chain> = self
                .chains
                .iter()
                .filter(|c| c.hook == at.hook && c.covers(at.family))
                .filter(|c| c.priority >= lo && c.priority < hi)
                .collect();
            seg.chains = here.iter().map(|c| c.label()).collect();
            for w in here.iter().flat_map(|c| &c.mark_writers) {
                if !seg.mark_writers.contains(w) {
                    seg.mark_writers.push(w.clone());
                }
            }
        }
        let range = seg
            .priority_range
            .map_or("?".into(), |[a, b]| format!("{a}..{b}"));
        seg.description = format!(
            "netfilter {} {}, priority {range}{}{}",
            seg.hook.unwrap_or("?"),
            seg.family.unwrap_or("?"),
            if seg.chains.is_empty() {
                String::new()
            } else {
                format!(": {}", seg.chains.join(", "))
            },
            if seg.mark_writers.is_empty() {
                String::new()
            } else {
                format!(" (marks written in {})", seg.mark_writers.join(", "))
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::netfilter::{PRIO_FIRST, PRIO_LAST};
    use crate::nodestate::nft::{PlanMode, Writes};

    fn topo() -> Topology {
        let chains = vec![Chain {
            family: "inet".into(),
            table: "fw".into(),
            name: "mangle_out".into(),
            hook: 3,
            priority: -150,
            mark_writers: vec![],
            writes: Writes::default(),
        }];
        let mut t = Topology {
            plan: Some(NfPlan::new(&chains, PlanMode::Full)),
            chains,
            ..Default::default()
        };
        t.ifnames.insert(7, "veth0".into());
        t.tc_programs
            .insert((7, tc_dir::EGRESS), vec!["cil_to_netdev (id 42)".into()]);
        t
    }

    fn nf(hook: u8, slot: u8) -> Point {
        Point {
            layer: layer::NETFILTER,
            hook,
            slot,
            family: 2,
            ifindex: 7,
            netns: 1,
            priority: 0,
        }
    }

    #[test]
    fn netfilter_band_names_the_chain() {
        let seg = topo().segment(&nf(3, 0), &nf(3, 2));
        assert_eq!(seg.layer, "netfilter");
        assert_eq!(seg.priority_range, Some([PRIO_FIRST, -149]));
        assert_eq!(seg.chains, vec!["inet fw/mangle_out@-150".to_string()]);
        let seg = topo().segment(&nf(3, 2), &nf(3, 1));
        assert_eq!(seg.priority_range, Some([-149, PRIO_LAST]));
        assert!(seg.chains.is_empty());
    }

    #[test]
    fn between_hooks_is_routing() {
        let seg = topo().segment(&nf(3, 1), &nf(4, 0));
        assert_eq!(seg.layer, "routing");
    }

    #[test]
    fn tc_chain_and_netns_crossing() {
        let tc = |slot| Point {
            layer: layer::TC,
            hook: tc_dir::EGRESS,
            slot,
            family: 0,
            ifindex: 7,
            netns: 1,
            priority: 0,
        };
        let seg = topo().segment(&tc(tc_slot::FIRST), &tc(tc_slot::LAST));
        assert_eq!(seg.layer, "tc");
        assert_eq!(seg.programs, vec!["cil_to_netdev (id 42)".to_string()]);
        let rx = Point {
            layer: layer::TRACEPOINT,
            hook: tracepoint::NETIF_RECEIVE_SKB,
            slot: 0,
            family: 0,
            ifindex: 3,
            netns: 2,
            priority: 0,
        };
        assert_eq!(topo().segment(&tc(tc_slot::LAST), &rx).layer, "kernel");
        // From "first" straight to the queue ("last" stood aside): tcx, then classic tc.
        let queue = Point {
            layer: layer::TRACEPOINT,
            hook: tracepoint::NET_DEV_QUEUE,
            ifindex: 7,
            netns: 1,
            ..Default::default()
        };
        let seg = topo().segment(&tc(tc_slot::FIRST), &queue);
        assert_eq!((seg.layer, seg.hook), ("tc", Some("egress")));
        assert_eq!(seg.programs, vec!["cil_to_netdev (id 42)".to_string()]);
        assert!(seg.description.contains("clsact"), "{}", seg.description);
        // Ingress: from netif_receive_skb on the same device to our last observer.
        let rx7 = Point {
            ifindex: 7,
            netns: 1,
            ..rx
        };
        let last_in = Point {
            hook: tc_dir::INGRESS,
            ..tc(tc_slot::LAST)
        };
        let seg = topo().segment(&rx7, &last_in);
        assert_eq!((seg.layer, seg.hook), ("tc", Some("ingress")));
        // Not when the packet changed device in between (a redirect).
        let other = Point {
            ifindex: 8,
            ..last_in
        };
        assert_eq!(topo().segment(&rx7, &other).layer, "path");
    }

    #[test]
    fn socket_origin() {
        let sock = Point {
            layer: layer::SOCKET,
            ..nf(3, 0)
        };
        assert_eq!(topo().segment(&sock, &nf(3, 0)).layer, "socket");
    }
}
