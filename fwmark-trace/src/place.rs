//! Where it happened: the kernel reports the point a packet is seen at and the point it was seen
//! at before; this module names both (`PointInfo`) and says what lies between them (`Segment`):
//! a netfilter priority band and the nft chains in it, the tc programs between our first and
//! last observers, the sending socket, the kernel scrubbing the mark at a namespace crossing.
//! Segments are typed; `output` writes them as sentences.
use std::{collections::HashMap, fmt, sync::Arc};

use fwmark_trace_common::{
    layer, path, socket_slot, tc_slot, tracepoint, tunnel, Point, NF_SLOT_CHAIN,
};
use serde::{Deserialize, Serialize};

use crate::{
    inventory::ovs,
    kernel::plan::NfPlan,
    netstack::{serialize_as_display, Family, NfHook, TcDir},
    nodestate::{
        links::TunnelKind,
        netlink::XfrmState,
        nft::{Chain, ChainId},
        pods::Container,
        programs::ForeignProgram,
    },
};

/// What the daemon knows about the observation points it placed (also saved with recordings,
/// to name their points when they are shown).
#[derive(Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Topology {
    pub(crate) plan: Option<NfPlan>,
    pub(crate) chains: Vec<Chain>,
    /// Foreign tcx programs (or clsact filters) per (ifindex, direction), between our first
    /// and last observers.
    #[serde(with = "pairs")]
    pub(crate) tc_programs: HashMap<(u32, TcDir), Vec<ForeignProgram>>,
    /// The tc observers are cls_bpf filters in clsact qdiscs (kernels before 6.6), not tcx.
    pub(crate) tc_filters: bool,
    /// Interface names are those of this namespace (where the daemon attached).
    pub(crate) ifnames: HashMap<u32, String>,
    pub(crate) own_netns: u32,
    /// This namespace's tunnel devices, by ifindex.
    #[serde(default, with = "pairs")]
    pub(crate) tunnels: HashMap<u32, TunnelKind>,
    /// This namespace's xfrm states (SAs): an ESP packet's SPI names the one that made it.
    #[serde(default)]
    pub(crate) xfrm_states: Vec<XfrmState>,
    /// This namespace's Open vSwitch bridges: a packet in on one port, out on another,
    /// crossed the datapath.
    #[serde(default)]
    pub(crate) ovs: Vec<ovs::Bridge>,
    /// The pods and containers living in network namespaces, by namespace inode.
    #[serde(default)]
    pub(crate) pods: HashMap<u32, Arc<Container>>,
}

/// A map with tuple keys as a list of pairs (JSON keys are strings).
mod pairs {
    use std::{collections::HashMap, hash::Hash};

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        m: &HashMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub(super) fn deserialize<'de, K, V, D>(d: D) -> Result<HashMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Eq + Hash,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// Which kind of observation point (or, for segments, which stretch of the path).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub(crate) enum Layer {
    /// Before the packet's first observation.
    None,
    Tc,
    Netfilter,
    Tracepoint,
    Socket,
    Routing,
    /// The kernel itself changed the mark (a namespace crossing scrubs it).
    Kernel,
    /// A tunnel device's encapsulation or decapsulation.
    Tunnel,
    /// xfrm (IPsec): a state's transform.
    Xfrm,
    /// An Open vSwitch datapath, between two of its ports.
    Ovs,
    /// Between observers of different layers.
    Path,
    #[default]
    Unknown,
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layer::None => "none",
            Layer::Tc => "tc",
            Layer::Netfilter => "netfilter",
            Layer::Tracepoint => "tracepoint",
            Layer::Socket => "socket",
            Layer::Routing => "routing",
            Layer::Kernel => "kernel",
            Layer::Tunnel => "tunnel",
            Layer::Xfrm => "xfrm",
            Layer::Ovs => "ovs",
            Layer::Path => "path",
            Layer::Unknown => "unknown",
        })
    }
}

/// A tracepoint observed: a line of the common crate's `tracepoint_observers!` table, which
/// also gives its name.
pub(crate) use fwmark_trace_common::Tracepoint;

/// The hook of a point: a netfilter hook, a tc direction or a tracepoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Hook {
    Netfilter(NfHook),
    Tc(TcDir),
    Tracepoint(Tracepoint),
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hook::Netfilter(h) => h.fmt(f),
            Hook::Tc(d) => d.fmt(f),
            Hook::Tracepoint(t) => t.fmt(f),
        }
    }
}

/// First or last in a tc chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Position {
    First,
    Last,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Position::First => "first",
            Position::Last => "last",
        })
    }
}

serialize_as_display!(Layer, Hook, Position);

/// An observation point, named.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct PointInfo {
    pub(crate) layer: Layer,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) hook: Option<Hook>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) family: Option<Family>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) priority: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) position: Option<Position>,
    pub(crate) ifindex: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ifname: Option<String>,
    pub(crate) netns: u32,
    /// The pod (or container) of the namespace: an event's own field, not its point's.
    #[serde(skip)]
    pub(crate) pod: Option<Arc<Container>>,
}

impl PointInfo {
    pub(crate) fn is(&self, hook: Hook) -> bool {
        self.hook == Some(hook)
    }
}

/// A netfilter priority band and the base chains in it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Band {
    pub(crate) hook: NfHook,
    pub(crate) family: Option<Family>,
    /// [first priority, last priority]: unknown when a point's priority is.
    pub(crate) range: Option<[i32; 2]>,
    pub(crate) chains: Vec<Chain>,
    /// Regular chains the chains above jump to that write a mark (where iptables-nft's rules
    /// live: the base chain is only "ip mangle/OUTPUT").
    pub(crate) mark_writers: Vec<ChainId>,
}

/// What lies between two observations of a packet.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Between {
    /// The packet left its socket with SO_MARK and was first seen with another mark: a writer
    /// no observer was planned for.
    SocketAndObserver,
    /// The sending socket's SO_MARK.
    Socket,
    /// Before the first observer: the mark was already set.
    BeforeFirstObserver,
    /// Crossing into another network namespace (veth/`dev_forward_skb` scrubs the mark).
    NetnsCrossing { from: u32, to: u32 },
    /// IPv6 neighbour discovery or MLD: `skb->reserved_tailroom` shares storage with the mark.
    NdTailroom,
    /// A netfilter band.
    Netfilter(Band),
    /// The tc chain between our first and last observers: its programs (or filters).
    TcChain {
        dir: TcDir,
        programs: Vec<ForeignProgram>,
    },
    /// Egress from our observer to the queue: classic tc after the tcx chain; from "first"
    /// (a program ended the chain with a verdict, so "last" did not run), the chain too.
    TcEgressAfterChain {
        from_first: bool,
        programs: Vec<ForeignProgram>,
    },
    /// Ingress after our last observer: clsact filters and the netdev ingress hook.
    TcIngressAfterChain,
    /// Between two netfilter hooks: routing, xfrm, the stack.
    Hooks,
    /// Into or out of an encapsulation: a tunnel device's, or xfrm's.
    Tunnel(Tunnel),
    /// Through an Open vSwitch bridge: in on one port, out on another.
    Ovs(OvsPath),
    /// Anything else between two observers.
    Path,
}

/// Into the outer packet, or out of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TunnelDir {
    Encap,
    Decap,
}

impl fmt::Display for TunnelDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TunnelDir::Encap => "encap",
            TunnelDir::Decap => "decap",
        })
    }
}

/// What encapsulated (or decapsulated) a packet.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Encapsulator {
    /// A tunnel device: the one the inner packet was queued on (encapsulation), or received
    /// on (decapsulation). Its kind is known for the daemon's own namespace.
    Device {
        ifindex: u32,
        netns: u32,
        name: Option<String>,
        kind: Option<TunnelKind>,
    },
    /// xfrm: the state (SA) named by the outer ESP packet's SPI, when it is known.
    Xfrm {
        spi: Option<u32>,
        state: Option<XfrmState>,
    },
}

/// A packet's way through an Open vSwitch datapath.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OvsPath {
    pub(crate) bridge: String,
    pub(crate) in_port: String,
    pub(crate) out_port: String,
    /// The bridge's flows that write `pkt_mark`.
    pub(crate) mark_writers: Vec<String>,
}

/// An encapsulation step, and what it did to the mark.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Tunnel {
    pub(crate) dir: TunnelDir,
    pub(crate) by: Encapsulator,
    /// The outer packet lives in another namespace than the inner one (the tunnel's socket is
    /// elsewhere): the kernel scrubs the mark on the way (`skb_scrub_packet`).
    pub(crate) crossed: Option<(u32, u32)>,
}

impl Tunnel {
    /// What became of the mark, from `old` (before the step) to `new`.
    pub(crate) fn fate(&self, old: u32, new: u32) -> MarkFate {
        if old == new {
            return MarkFate::Kept;
        }
        if new == 0 && self.crossed.is_some() {
            return MarkFate::ClearedCrossingNetns;
        }
        match &self.by {
            Encapsulator::Xfrm {
                state: Some(sa), ..
            } if sa.writes(old) == Some(new) => MarkFate::SetByXfrmState,
            Encapsulator::Device {
                kind: Some(TunnelKind::Wireguard { fwmark: Some(f) }),
                ..
            } if *f == new && self.dir == TunnelDir::Encap => MarkFate::SetByTunnelFwmark,
            _ => MarkFate::Changed,
        }
    }
}

/// What an encapsulation step did to the mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MarkFate {
    /// The outer packet carries the inner packet's mark (or the reverse).
    Kept,
    /// The tunnel's socket is in another namespace: the kernel scrubbed it.
    ClearedCrossingNetns,
    /// The xfrm state's output mark.
    SetByXfrmState,
    /// The tunnel device's own fwmark (WireGuard's) on its outer packets.
    SetByTunnelFwmark,
    /// Changed by something else on the way (the tunnel's own fwmark, a rule).
    Changed,
}

impl fmt::Display for MarkFate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MarkFate::Kept => "kept",
            MarkFate::ClearedCrossingNetns => "cleared-crossing-netns",
            MarkFate::SetByXfrmState => "set-by-xfrm-state",
            MarkFate::SetByTunnelFwmark => "set-by-tunnel-fwmark",
            MarkFate::Changed => "changed",
        })
    }
}

serialize_as_display!(TunnelDir, MarkFate);

/// The stretch of the path a change (or a drop) happened in.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Segment {
    pub(crate) between: Between,
    pub(crate) from: PointInfo,
    pub(crate) to: PointInfo,
    /// The tc observers are clsact filters (kernels before 6.6), not tcx programs.
    pub(crate) tc_filters: bool,
}

impl Segment {
    pub(crate) fn layer(&self) -> Layer {
        match &self.between {
            Between::SocketAndObserver | Between::Path => Layer::Path,
            Between::Hooks => Layer::Routing,
            Between::Socket => Layer::Socket,
            Between::BeforeFirstObserver => Layer::Unknown,
            Between::NetnsCrossing { .. } | Between::NdTailroom => Layer::Kernel,
            Between::Tunnel(Tunnel {
                by: Encapsulator::Xfrm { .. },
                ..
            }) => Layer::Xfrm,
            Between::Tunnel(_) => Layer::Tunnel,
            Between::Ovs(_) => Layer::Ovs,
            Between::Netfilter(_) => Layer::Netfilter,
            Between::TcChain { .. }
            | Between::TcEgressAfterChain { .. }
            | Between::TcIngressAfterChain => Layer::Tc,
        }
    }

    pub(crate) fn hook(&self) -> Option<Hook> {
        match &self.between {
            Between::Netfilter(b) => Some(Hook::Netfilter(b.hook)),
            Between::TcChain { dir, .. } => Some(Hook::Tc(*dir)),
            Between::TcEgressAfterChain { .. } => Some(Hook::Tc(TcDir::Egress)),
            Between::TcIngressAfterChain => Some(Hook::Tc(TcDir::Ingress)),
            _ => None,
        }
    }

    pub(crate) fn band(&self) -> Option<&Band> {
        match &self.between {
            Between::Netfilter(b) => Some(b),
            _ => None,
        }
    }

    /// The nft base chains in the segment (a netfilter band's).
    pub(crate) fn chains(&self) -> &[Chain] {
        self.band().map_or(&[], |b| &b.chains)
    }

    pub(crate) fn mark_writers(&self) -> &[ChainId] {
        self.band().map_or(&[], |b| &b.mark_writers)
    }

    pub(crate) fn programs(&self) -> &[ForeignProgram] {
        match &self.between {
            Between::TcChain { programs, .. } | Between::TcEgressAfterChain { programs, .. } => {
                programs
            }
            _ => &[],
        }
    }

    pub(crate) fn ovs(&self) -> Option<&OvsPath> {
        match &self.between {
            Between::Ovs(p) => Some(p),
            _ => None,
        }
    }

    pub(crate) fn tunnel(&self) -> Option<&Tunnel> {
        match &self.between {
            Between::Tunnel(t) => Some(t),
            _ => None,
        }
    }

    /// Whether the kernel, not a rule, program or socket, made the change: a namespace
    /// crossing, or a tunnel whose outer packet lives in another namespace.
    pub(crate) fn by_kernel(&self) -> bool {
        self.layer() == Layer::Kernel || self.tunnel().is_some_and(|t| t.crossed.is_some())
    }
}

impl Topology {
    pub(crate) fn point(&self, p: &Point) -> PointInfo {
        // An unknown namespace (0) is the daemon's own, as for interface names.
        let netns = if p.netns == 0 {
            self.own_netns
        } else {
            p.netns
        };
        let mut info = PointInfo {
            ifindex: p.ifindex,
            ifname: (p.netns == self.own_netns || p.netns == 0 || self.own_netns == 0)
                .then(|| self.ifnames.get(&p.ifindex).cloned())
                .flatten(),
            netns: p.netns,
            pod: self.pods.get(&netns).cloned(),
            ..Default::default()
        };
        match p.layer {
            layer::TC => {
                info.layer = Layer::Tc;
                info.hook = Some(Hook::Tc(TcDir::from_raw(p.hook)));
                info.position = Some(if p.slot == tc_slot::FIRST {
                    Position::First
                } else {
                    Position::Last
                });
            }
            layer::NETFILTER => {
                info.layer = Layer::Netfilter;
                info.hook = NfHook::from_raw(p.hook).map(Hook::Netfilter);
                info.family = Family::from_raw(p.family);
                info.priority = self.priority(p);
            }
            layer::TRACEPOINT => {
                info.layer = Layer::Tracepoint;
                info.hook = Tracepoint::from_hook(p.hook).map(Hook::Tracepoint);
            }
            layer::SOCKET => info.layer = Layer::Socket,
            layer::ROUTING => {
                info.layer = Layer::Routing;
                info.family = Family::from_raw(p.family);
            }
            layer::NONE => info.layer = Layer::None,
            _ => {}
        }
        info
    }

    fn priority(&self, p: &Point) -> Option<i32> {
        if p.slot == NF_SLOT_CHAIN {
            return Some(p.priority);
        }
        let (family, hook) = (Family::from_raw(p.family)?, NfHook::from_raw(p.hook)?);
        self.plan.as_ref()?.priority(family, hook, p.slot)
    }

    /// The segment between `prev` and `at` in which a change was seen.
    pub(crate) fn segment(&self, prev: &Point, at: &Point) -> Segment {
        let between = self.between(prev, at);
        Segment {
            between,
            from: self.point(prev),
            to: self.point(at),
            tc_filters: self.tc_filters,
        }
    }

    fn between(&self, prev: &Point, at: &Point) -> Between {
        // Received on one port of a bridge, leaving by another: the datapath's actions.
        if let Some(p) = self.ovs_path(prev, at) {
            return Between::Ovs(p);
        }
        let same_dev = prev.ifindex == at.ifindex;
        let tp = |p: &Point, id| p.layer == layer::TRACEPOINT && p.hook == id;
        match (prev.layer, at.layer) {
            (layer::SOCKET, _) if prev.slot == socket_slot::LEFT => Between::SocketAndObserver,
            (layer::SOCKET, _) => Between::Socket,
            (layer::NONE, _) => Between::BeforeFirstObserver,
            _ if path::tunnel(prev, at) != tunnel::NONE => Between::Tunnel(self.tunnel(prev, at)),
            _ if prev.netns != at.netns && prev.netns != 0 && at.netns != 0 => {
                Between::NetnsCrossing {
                    from: prev.netns,
                    to: at.netns,
                }
            }
            (layer::NETFILTER, layer::NETFILTER)
                if prev.hook == at.hook && prev.family == at.family =>
            {
                match NfHook::from_raw(at.hook) {
                    Some(hook) => Between::Netfilter(self.band(hook, prev, at)),
                    None => Between::Path,
                }
            }
            // The tc chain between our observers. On ingress, `netif_receive_skb` is as good
            // as "first": nothing between them writes marks.
            (layer::TC | layer::TRACEPOINT, layer::TC)
                if same_dev
                    && at.slot == tc_slot::LAST
                    && ((prev.layer == layer::TC
                        && prev.hook == at.hook
                        && prev.slot == tc_slot::FIRST)
                        || (tp(prev, tracepoint::NETIF_RECEIVE_SKB)
                            && TcDir::from_raw(at.hook) == TcDir::Ingress)) =>
            {
                let dir = TcDir::from_raw(at.hook);
                Between::TcChain {
                    dir,
                    programs: self.tc_programs(at.ifindex, dir),
                }
            }
            (layer::TC, layer::TRACEPOINT)
                if TcDir::from_raw(prev.hook) == TcDir::Egress
                    && tp(at, tracepoint::NET_DEV_QUEUE)
                    && same_dev =>
            {
                let from_first = prev.slot == tc_slot::FIRST;
                Between::TcEgressAfterChain {
                    from_first,
                    programs: if from_first {
                        self.tc_programs(at.ifindex, TcDir::Egress)
                    } else {
                        Vec::new()
                    },
                }
            }
            (layer::TC, layer::NETFILTER)
                if TcDir::from_raw(prev.hook) == TcDir::Ingress && prev.slot == tc_slot::LAST =>
            {
                Between::TcIngressAfterChain
            }
            (layer::NETFILTER, layer::NETFILTER) => Between::Hooks,
            _ => Between::Path,
        }
    }

    /// The encapsulation step from `prev` to `at` (`path::tunnel` says it is one): by the
    /// device the inner packet was queued on, or received on; by xfrm when the packet went
    /// from postrouting straight back to output, or was decapsulated on a device that is no
    /// tunnel (ESP in tunnel mode hands the inner packet to the device it came in on).
    fn tunnel(&self, prev: &Point, at: &Point) -> Tunnel {
        let crossed = (prev.netns != at.netns && prev.netns != 0 && at.netns != 0)
            .then_some((prev.netns, at.netns));
        let (dir, dev) = if path::tunnel(prev, at) == tunnel::ENCAP {
            (TunnelDir::Encap, prev)
        } else {
            (TunnelDir::Decap, at)
        };
        let here = dev.netns == self.own_netns || dev.netns == 0 || self.own_netns == 0;
        let kind = here
            .then(|| self.tunnels.get(&dev.ifindex).cloned())
            .flatten();
        let xfrm =
            dev.layer == layer::NETFILTER || (dir == TunnelDir::Decap && kind.is_none() && here);
        let by = if xfrm {
            Encapsulator::Xfrm {
                spi: None,
                state: None,
            }
        } else {
            Encapsulator::Device {
                ifindex: dev.ifindex,
                netns: dev.netns,
                name: here
                    .then(|| self.ifnames.get(&dev.ifindex).cloned())
                    .flatten(),
                kind,
            }
        };
        Tunnel { dir, by, crossed }
    }

    /// The OVS bridge a packet crossed from `prev` (received on a port) to `at` (leaving by
    /// another port of the same bridge), in the daemon's namespace.
    fn ovs_path(&self, prev: &Point, at: &Point) -> Option<OvsPath> {
        let here = |p: &Point| p.netns == self.own_netns || p.netns == 0 || self.own_netns == 0;
        let received = (prev.layer == layer::TRACEPOINT
            && prev.hook == tracepoint::NETIF_RECEIVE_SKB)
            || (prev.layer == layer::TC && TcDir::from_raw(prev.hook) == TcDir::Ingress);
        let leaving = (at.layer == layer::TRACEPOINT && at.hook == tracepoint::NET_DEV_QUEUE)
            || (at.layer == layer::TC && TcDir::from_raw(at.hook) == TcDir::Egress);
        if self.ovs.is_empty() || !received || !leaving || !here(prev) || !here(at) {
            return None;
        }
        let (in_port, out_port) = (
            self.ifnames.get(&prev.ifindex)?,
            self.ifnames.get(&at.ifindex)?,
        );
        let bridge = self
            .ovs
            .iter()
            .find(|b| b.ports.contains(in_port) && b.ports.contains(out_port))?;
        Some(OvsPath {
            bridge: bridge.name.clone(),
            in_port: in_port.clone(),
            out_port: out_port.clone(),
            mark_writers: bridge.mark_writers.clone(),
        })
    }

    /// The xfrm state with this SPI (and, when known, this destination).
    pub(crate) fn xfrm_state(&self, spi: u32, dst: Option<std::net::IpAddr>) -> Option<&XfrmState> {
        self.xfrm_states
            .iter()
            .find(|s| s.spi == spi && dst.is_none_or(|d| d == s.dst))
    }

    fn tc_programs(&self, ifindex: u32, dir: TcDir) -> Vec<ForeignProgram> {
        self.tc_programs
            .get(&(ifindex, dir))
            .cloned()
            .unwrap_or_default()
    }

    /// The band of `hook` between two netfilter points and the chains whose priority lies in
    /// it, with the mark-writing chains those reach.
    fn band(&self, hook: NfHook, prev: &Point, at: &Point) -> Band {
        let family = Family::from_raw(at.family);
        let range = self
            .priority(prev)
            .zip(self.priority(at))
            .map(|(lo, hi)| [lo, hi]);
        let chains: Vec<Chain> = match (range, family) {
            (Some([lo, hi]), Some(family)) => self
                .chains
                .iter()
                .filter(|c| c.hook == hook && c.covers(family))
                .filter(|c| c.priority >= lo && c.priority < hi)
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        let mut mark_writers: Vec<ChainId> = Vec::new();
        for w in chains.iter().flat_map(|c| &c.mark_writers) {
            if !mark_writers.contains(w) {
                mark_writers.push(w.clone());
            }
        }
        Band {
            hook,
            family,
            range,
            chains,
            mark_writers,
        }
    }
}

#[cfg(test)]
mod tests {
    use fwmark_trace_common::{nf_hook, nfproto, tc_dir};

    use super::*;
    use crate::{
        fixtures::chain,
        kernel::{
            netfilter::{PRIO_FIRST, PRIO_LAST},
            plan::PlanMode,
        },
        netstack::NftFamily,
    };

    fn topo() -> Topology {
        let chains = vec![chain(
            NftFamily::Inet,
            "fw",
            "mangle_out",
            NfHook::Output,
            -150,
        )];
        let mut t = Topology {
            plan: Some(NfPlan::new(&chains, PlanMode::Full)),
            chains,
            ..Default::default()
        };
        t.ifnames.insert(7, "veth0".into());
        t.tc_programs.insert(
            (7, TcDir::Egress),
            vec![ForeignProgram {
                id: 42,
                name: "cil_to_netdev".into(),
            }],
        );
        t
    }

    fn nf(hook: u8, slot: u8) -> Point {
        Point {
            layer: layer::NETFILTER,
            hook,
            slot,
            family: nfproto::IPV4,
            ifindex: 7,
            netns: 1,
            priority: 0,
        }
    }

    fn program_names(seg: &Segment) -> Vec<String> {
        seg.programs().iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn netfilter_band_names_the_chain() {
        let out = nf_hook::LOCAL_OUT;
        let seg = topo().segment(&nf(out, 0), &nf(out, 2));
        assert_eq!(seg.layer(), Layer::Netfilter);
        let band = seg.band().unwrap();
        assert_eq!(band.range, Some([PRIO_FIRST, -149]));
        assert_eq!(band.chains[0].to_string(), "inet fw/mangle_out@-150");
        let seg = topo().segment(&nf(out, 2), &nf(out, 1));
        assert_eq!(seg.band().unwrap().range, Some([-149, PRIO_LAST]));
        assert!(seg.chains().is_empty());
    }

    #[test]
    fn between_hooks_is_routing() {
        let seg = topo().segment(&nf(nf_hook::LOCAL_OUT, 1), &nf(nf_hook::POST_ROUTING, 0));
        assert_eq!(seg.layer(), Layer::Routing);
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
        assert_eq!(seg.layer(), Layer::Tc);
        assert_eq!(program_names(&seg), ["cil_to_netdev (id 42)"]);
        let rx = Point {
            layer: layer::TRACEPOINT,
            hook: tracepoint::NETIF_RECEIVE_SKB,
            slot: 0,
            family: 0,
            ifindex: 3,
            netns: 2,
            priority: 0,
        };
        assert_eq!(
            topo().segment(&tc(tc_slot::LAST), &rx).layer(),
            Layer::Kernel
        );
        // From "first" straight to the queue ("last" stood aside): tcx, then classic tc.
        let queue = Point {
            layer: layer::TRACEPOINT,
            hook: tracepoint::NET_DEV_QUEUE,
            ifindex: 7,
            netns: 1,
            ..Default::default()
        };
        let seg = topo().segment(&tc(tc_slot::FIRST), &queue);
        assert_eq!(
            (seg.layer(), seg.hook()),
            (Layer::Tc, Some(Hook::Tc(TcDir::Egress)))
        );
        assert_eq!(program_names(&seg), ["cil_to_netdev (id 42)"]);
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
        assert_eq!(
            (seg.layer(), seg.hook()),
            (Layer::Tc, Some(Hook::Tc(TcDir::Ingress)))
        );
        // Not when the packet changed device in between (a redirect).
        let other = Point {
            ifindex: 8,
            ..last_in
        };
        assert_eq!(topo().segment(&rx7, &other).layer(), Layer::Path);
    }

    #[test]
    fn socket_origin() {
        let sock = Point {
            layer: layer::SOCKET,
            ..nf(nf_hook::LOCAL_OUT, 0)
        };
        let seg = topo().segment(&sock, &nf(nf_hook::LOCAL_OUT, 0));
        assert_eq!(seg.layer(), Layer::Socket);
    }

    #[test]
    fn the_schema_names_every_hook_and_only_those() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../schema/trace-records.schema.json")).unwrap();
        let listed: Vec<&str> = schema["$defs"]["hook"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let tracepoints = fwmark_trace_common::TRACEPOINTS
            .iter()
            .filter_map(|t| Tracepoint::from_hook(t.tracepoint as u8));
        let hooks: Vec<String> = NfHook::ALL
            .into_iter()
            .map(Hook::Netfilter)
            .chain(TcDir::ALL.map(Hook::Tc))
            .chain(tracepoints.map(Hook::Tracepoint))
            .map(|h| h.to_string())
            .collect();
        assert_eq!(
            listed, hooks,
            "schema/trace-records.schema.json's hook enum"
        );
    }
}
