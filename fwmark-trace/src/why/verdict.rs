//! Why did the reply die? From one flow's timeline (request and reply paths with marks, drops
//! and routing lookups) and the node's state (ip rules, routes, rp_filter, xfrm policies, nft
//! chains), find the cause — one function per cause, each returning what it found — and the
//! evidence behind it. `render` says both in words.
use std::net::IpAddr;

use ipnet::IpNet;

use crate::{
    attribution::{attribute, Transition},
    event::{DropReason, EventKind, RouteResult, Tuple},
    flows::{Dir, Flow, Step},
    mark::{Mark, MarkMatch},
    netstack::{NfHook, Proto},
    nodestate::{
        netlink::{IpRule, RuleAction, XfrmAction, XfrmDir, XfrmPolicy, XfrmState, TABLE_LOCAL},
        nft::{Chain, ChainId},
        NodeState, StateChange,
    },
    place::{Encapsulator, Hook, Tracepoint, TunnelDir},
    registry::Registry,
};

/// What `judge` needs besides the flow.
pub(crate) struct Context<'a> {
    /// The node state in force when the flow's fate was decided (its nft chains included).
    pub(crate) state: &'a NodeState,
    pub(crate) registry: &'a Registry,
    /// ifindex → name in the traced namespace.
    pub(crate) ifname: &'a dyn Fn(u32) -> Option<String>,
    /// Drop verdicts `nft monitor trace` saw (with `--nftrace`).
    pub(crate) nft_drops: &'a [super::nftrace::DropRule],
}

/// The verdict on a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    RpFilter,
    NetfilterDrop,
    ConnmarkRestoreMask,
    XfrmPolicy,
    NoSocket,
    Dropped,
    NoReply,
    ReplyLost,
    ReplyMisrouted,
    /// Events were lost while watching: a reply not seen may have come all the same.
    Inconclusive,
    /// Healthy: the reply was delivered into this namespace.
    Delivered,
    /// Healthy, seen from the server: the reply left where the request arrived.
    ReplySent,
}

impl Verdict {
    /// Whether the reply made it (into this namespace, or out of the server's).
    pub(crate) fn healthy(self) -> bool {
        matches!(self, Verdict::Delivered | Verdict::ReplySent)
    }
}

/// How the reverse-path check went for a reply rp_filter dropped.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum ReversePath {
    /// The route back to the peer (its table, prefix and device) is not the arrival device.
    Elsewhere {
        table: u32,
        prefix: IpNet,
        dev: Option<String>,
    },
    /// No table the reply's mark selects has a route back.
    None,
}

/// The request's step into an xfrm tunnel: the ESP packet's first observation, the SPI it
/// carries and the state (SA) that SPI names.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct XfrmEncap {
    pub(crate) step: Step,
    pub(crate) spi: Option<u32>,
    pub(crate) state: Option<XfrmState>,
}

/// A drop's place: the hook and priority of the last observer before it, and the chains
/// right after that observer.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DropPlace {
    pub(crate) hook: Option<Hook>,
    pub(crate) priority: Option<i32>,
    pub(crate) chains: Vec<Chain>,
}

/// What caused the verdict, with what was found.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Cause {
    /// The request left; nothing came back to this namespace.
    NoReply {
        last_request: Option<Step>,
    },
    Delivered {
        last: Step,
    },
    ReplyLost {
        last: Step,
    },
    RpFilter {
        reply_mark: Mark,
        /// The mark the reverse-path check used (0 unless src_valid_mark).
        used_mark: Mark,
        missed: Vec<IpRule>,
        path: ReversePath,
        arrival: String,
        rp_filter: u8,
        src_valid_mark: bool,
    },
    NetfilterDrop {
        reply_mark: Mark,
        place: DropPlace,
        /// The dropping rule there whose mark tests the reply passed, when there is one.
        rule: Option<DroppingRule>,
    },
    /// A restore wrote the ct mark over bits set on the reply (`Report::restore_clobber`),
    /// which then died in netfilter.
    ConnmarkRestoreMask {
        place: DropPlace,
    },
    XfrmPolicy {
        reply_mark: Mark,
        policy: Option<XfrmPolicy>,
    },
    /// The reply came back outside the IPsec tunnel (no decryption on its path) and the
    /// inbound policy that took it requires a transform (its templates: ESP, tunnel mode, …).
    XfrmOutsideTunnel {
        reply_mark: Mark,
        /// The inbound (or forward) policy the kernel applied to the reply.
        policy: XfrmPolicy,
        /// Where the request went into the tunnel, when its path shows it.
        request_tunnel: Option<XfrmEncap>,
        /// The request's mark when its policy was looked up (before a state's output mark).
        request_mark: Mark,
        /// The outbound policies with templates that select the request (by address and
        /// mark); with the tunnel's state known, those whose template names it.
        outbound: Vec<XfrmPolicy>,
    },
    /// ICMP: the kernel's copy found no ping socket; ping reads a raw socket's clone.
    IcmpDelivered {
        reply_mark: Mark,
    },
    NoSocket {
        reply_mark: Mark,
        after: Option<Step>,
    },
    Dropped {
        reply_mark: Mark,
        after: Option<Step>,
        reason: DropReason,
    },
    ReplySent {
        left: String,
        reply_mark: Mark,
    },
    /// The kernel lost events while the flow was watched, and what was seen says the reply
    /// is missing: its events may be among those lost, so there is no verdict.
    Inconclusive {
        lost: u64,
        /// What the events that were seen would have said.
        seen: Box<Cause>,
    },
    ReplyMisrouted {
        left: String,
        arrived: String,
        reply_mark: Mark,
        /// The connection's ct mark nothing restored onto the reply.
        unrestored_ct: Option<Mark>,
        /// The request's mark the kernel's own reply did not take (fwmark_reflect=0).
        unreflected: Option<Mark>,
        missed: Vec<IpRule>,
        table: Option<u32>,
    },
}

impl Cause {
    pub(crate) fn verdict(&self) -> Verdict {
        match self {
            Cause::NoReply { .. } => Verdict::NoReply,
            Cause::Delivered { .. } | Cause::IcmpDelivered { .. } => Verdict::Delivered,
            Cause::ReplyLost { .. } => Verdict::ReplyLost,
            Cause::RpFilter { .. } => Verdict::RpFilter,
            Cause::NetfilterDrop { .. } => Verdict::NetfilterDrop,
            Cause::ConnmarkRestoreMask { .. } => Verdict::ConnmarkRestoreMask,
            Cause::XfrmPolicy { .. } | Cause::XfrmOutsideTunnel { .. } => Verdict::XfrmPolicy,
            Cause::NoSocket { .. } => Verdict::NoSocket,
            Cause::Dropped { .. } => Verdict::Dropped,
            Cause::ReplySent { .. } => Verdict::ReplySent,
            Cause::ReplyMisrouted { .. } => Verdict::ReplyMisrouted,
            Cause::Inconclusive { .. } => Verdict::Inconclusive,
        }
    }

    /// The cause once `lost` events went missing while watching: a verdict drawn from what
    /// was not seen (no reply, a reply that vanished or left elsewhere) is no verdict then;
    /// a drop the kernel reported with its reason stands.
    pub(crate) fn with_lost(self, lost: u64) -> Cause {
        let absent = matches!(
            self.verdict(),
            Verdict::NoReply | Verdict::ReplyLost | Verdict::ReplyMisrouted
        );
        if lost == 0 || !absent {
            return self;
        }
        Cause::Inconclusive {
            lost,
            seen: Box::new(self),
        }
    }
}

/// One piece of evidence behind a verdict.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Evidence {
    /// The routing lookups made for one direction: table, flow mark, result.
    Lookups {
        dir: Dir,
        lookups: Vec<(u32, Mark, RouteResult)>,
    },
    /// Where the request was last seen (the last packet step of `Report::request`).
    RequestLastSeen,
    /// The request's and the reply's last marks differ (`Report::mark_diff` says in which bits
    /// and whose they are).
    MarkDiff,
    /// A connmark restore clobbered bits of the reply's mark (`Report::restore_clobber`).
    ConnmarkRestore,
    /// `--nftrace` named the rule that dropped the packet (`DropInfo::rule`).
    NftTraceRule,
    /// A rule that drops on a mark test, in the chains where the reply died.
    DroppingRule(DroppingRule),
    XfrmMatching(XfrmPolicy),
    /// The sysctls the reverse-path check went by (`Cause::RpFilter`'s).
    RpFilterSysctls,
    RestoreOnOutputHint,
    FwmarkReflectOff,
    TcpFwmarkAcceptOff,
    /// The node's state changed while the flow was watched.
    NodeChanged {
        time: crate::clock::Timestamp,
        changes: Vec<StateChange>,
        before_last_packet: bool,
    },
}

/// A rule that drops what passes its mark tests, with what they test and whether the reply's
/// mark passed them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DroppingRule {
    pub(crate) chain: ChainId,
    pub(crate) rule: String,
    pub(crate) tests: Vec<MarkMatch>,
    /// The bits the tests look at, and whose they are.
    pub(crate) bits: Mark,
    pub(crate) owners: Vec<String>,
    /// Whether the reply's mark passed every test (so this rule can have dropped it).
    pub(crate) matched: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct MarkDiff {
    pub(crate) request: Mark,
    pub(crate) reply: Mark,
    pub(crate) owners: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DropInfo {
    pub(crate) reason: DropReason,
    /// The last observer that saw the reply before it died.
    pub(crate) after: Option<Step>,
    pub(crate) place: DropPlace,
    /// The exact rule, from nftables tracing (`--nftrace`).
    pub(crate) rule: Option<String>,
}

#[derive(Clone, Debug)]
pub(crate) struct Report {
    pub(crate) flow: Tuple,
    pub(crate) cause: Cause,
    pub(crate) evidence: Vec<Evidence>,
    pub(crate) last_reply: Option<Step>,
    pub(crate) drop: Option<DropInfo>,
    pub(crate) mark_diff: Option<MarkDiff>,
    /// The reply transition that looks like a connmark restore clobbering bits set on it.
    pub(crate) restore_clobber: Option<RestoreClobber>,
    pub(crate) request: Vec<Step>,
    pub(crate) reply: Vec<Step>,
}

/// The packet steps (not routing lookups) of one direction.
fn packets(flow: &Flow, dir: Dir) -> Vec<&Step> {
    flow.path(dir).filter(|s| !s.is_route()).collect()
}

fn last_mark(path: &[&Step]) -> Mark {
    path.last().map_or(Mark::ZERO, |s| s.mark)
}

/// Longest-prefix match of an address in one table: the route's prefix and device.
fn lookup(state: &NodeState, table: u32, addr: IpAddr) -> Option<(IpNet, Option<u32>)> {
    state
        .routes
        .iter()
        .filter(|r| r.table == table && r.forwards() && r.destination.contains(&addr))
        .max_by_key(|r| r.destination.prefix_len())
        .map(|r| (r.destination, r.oif))
}

/// A connmark restore that clobbered bits set earlier on the reply: the step, and the bits lost.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RestoreClobber {
    pub(crate) restore: Step,
    pub(crate) lost: Mark,
}

/// A reply transition that looks like a connmark restore clobbering bits set earlier on the
/// reply: the new mark holds nothing but ct-mark bits, and bits were lost.
fn restore_clobber(reply: &[&Step]) -> Option<RestoreClobber> {
    reply.iter().find_map(|s| {
        let ct = s.ct_mark?;
        let lost = s.old_mark & !s.mark;
        (s.kind == EventKind::Transition && !lost.is_zero() && s.mark.within(ct)).then(|| {
            RestoreClobber {
                restore: (*s).clone(),
                lost,
            }
        })
    })
}

/// The device a direction's packets were seen on at a tracepoint (first or last).
fn device(path: &[&Step], tp: Tracepoint, last: bool) -> Option<String> {
    let mut hits = path.iter().filter(|s| s.at.is(Hook::Tracepoint(tp)));
    let hit = if last { hits.next_back() } else { hits.next() };
    hit.and_then(|s| s.at.ifname.clone())
}

/// Seen from the server's side (the request came in from a device, the reply went out of one):
/// whether the reply left where the request arrived, and if not, why its routing differed.
fn server_side(
    flow: &Flow,
    request: &[&Step],
    reply: &[&Step],
    cx: &Context,
    evidence: &mut Vec<Evidence>,
) -> Option<Cause> {
    let arrived = device(request, Tracepoint::NetifReceiveSkb, false)?;
    let left = device(reply, Tracepoint::NetDevQueue, true)?;
    let reply_mark = last_mark(reply);
    if arrived == left {
        return Some(Cause::ReplySent { left, reply_mark });
    }
    // The marks the request had (packet or connection) that routing by fwmark may expect. The
    // ct mark is the last one seen: a UDP socket drops the skb's conntrack reference on
    // queueing, so the request's final point may carry none.
    let request_mark = last_mark(request);
    let request_ct = request.iter().rev().find_map(|s| s.ct_mark);
    let missed: Vec<IpRule> = [request_mark, request_ct.unwrap_or_default()]
        .into_iter()
        .filter(|m| !m.is_zero() && *m != reply_mark)
        .flat_map(|m| cx.state.rules_for(flow.family(), m))
        .filter(|r| r.fwmark.is_some() && !r.mark_matches(reply_mark))
        .cloned()
        .collect();
    // The table the reply's (last successful) routing lookup used.
    let table = flow
        .path(Dir::Reply)
        .filter_map(|s| s.route.filter(|r| r.result == RouteResult::Ok))
        .map(|r| r.table)
        .last();
    let unrestored_ct = request_ct.filter(|c| !c.is_zero() && !c.within(reply_mark));
    if unrestored_ct.is_some() {
        evidence.push(Evidence::RestoreOnOutputHint);
    }
    // The kernel answers pings itself; its reply (like its ICMP errors and TCP resets) takes
    // the request's mark only with fwmark_reflect=1.
    let sysctls = &cx.state.sysctls;
    let reflect = match flow.family() {
        crate::netstack::Family::Ipv4 => sysctls.fwmark_reflect,
        crate::netstack::Family::Ipv6 => sysctls.fwmark_reflect6,
    };
    let unreflected = (flow.tuple.proto.is_icmp() && reflect == 0 && !request_mark.is_zero())
        .then_some(request_mark);
    if unreflected.is_some() {
        evidence.push(Evidence::FwmarkReflectOff);
    }
    if flow.tuple.proto == Proto::TCP && sysctls.tcp_fwmark_accept == 0 && !request_mark.is_zero() {
        evidence.push(Evidence::TcpFwmarkAcceptOff);
    }
    Some(Cause::ReplyMisrouted {
        left,
        arrived,
        reply_mark,
        unrestored_ct,
        unreflected,
        missed,
        table,
    })
}

/// No drop was seen: the reply was delivered, vanished, or never came.
fn undropped(request: &[&Step], reply: &[&Step]) -> Cause {
    let delivered = reply
        .iter()
        .any(|s| s.at.is(Hook::Netfilter(NfHook::Input)) || s.kind == EventKind::Consume);
    match reply.last() {
        None => Cause::NoReply {
            last_request: request.last().map(|s| (*s).clone()),
        },
        Some(last) if delivered => Cause::Delivered {
            last: (*last).clone(),
        },
        Some(last) => Cause::ReplyLost {
            last: (*last).clone(),
        },
    }
}

/// The nft chains right after the observer that last saw a packet before it was dropped.
fn drop_place(before: Option<&Step>, flow: &Flow, state: &NodeState) -> DropPlace {
    let hook = before.and_then(|b| b.at.hook);
    let priority = before.and_then(|b| b.at.priority);
    let chains = match (hook, priority) {
        (Some(Hook::Netfilter(nf)), Some(prio)) => {
            let here: Vec<&Chain> = state
                .chains
                .iter()
                .filter(|c| c.hook == nf && c.covers(flow.family()) && c.priority >= prio)
                .collect();
            let next = here.iter().map(|c| c.priority).min();
            here.into_iter()
                .filter(|c| Some(c.priority) == next)
                .cloned()
                .collect()
        }
        _ => Vec::new(),
    };
    DropPlace {
        hook,
        priority,
        chains,
    }
}

/// IP_RPFILTER: the reverse-path check, redone with the reply's mark and the node's rules.
fn rp_filter(flow: &Flow, request: &[&Step], reply: &[&Step], cx: &Context) -> Cause {
    let (request_mark, reply_mark) = (last_mark(request), last_mark(reply));
    let arrival = reply
        .iter()
        .find_map(|s| s.at.ifname.clone())
        .unwrap_or_else(|| "?".into());
    let sysctls = &cx.state.sysctls;
    let src_valid_mark = sysctls.src_valid_mark_of(&arrival);
    let rp_filter = sysctls.rp_filter_of(&arrival);
    let used_mark = if src_valid_mark {
        reply_mark
    } else {
        Mark::ZERO
    };
    let missed = cx
        .state
        .rules_for(flow.family(), request_mark)
        .into_iter()
        .filter(|r| r.fwmark.is_some() && !r.mark_matches(used_mark))
        .cloned()
        .collect();
    let path = cx
        .state
        .rules_for(flow.family(), used_mark)
        .into_iter()
        .filter(|r| r.action == RuleAction::Lookup && r.table != TABLE_LOCAL)
        .find_map(|r| {
            let (prefix, oif) = lookup(cx.state, r.table, flow.tuple.dst)?;
            Some(ReversePath::Elsewhere {
                table: r.table,
                prefix,
                dev: oif.and_then(|i| (cx.ifname)(i)),
            })
        })
        .unwrap_or(ReversePath::None);
    Cause::RpFilter {
        reply_mark,
        used_mark,
        missed,
        path,
        arrival,
        rp_filter,
        src_valid_mark,
    }
}

/// NETFILTER_DROP: the band's chains, the rule if nftables tracing named it, the mark-matching
/// rules in those chains; a restore that clobbered the reply's mark first (`clobbered`, from
/// `restore_clobber`) makes it `connmark-restore-mask`.
fn netfilter_drop(
    flow: &Flow,
    reply: &[&Step],
    clobbered: bool,
    place: DropPlace,
    cx: &Context,
    evidence: &mut Vec<Evidence>,
) -> (Cause, Option<String>) {
    let rule = super::nftrace::for_flow(cx.nft_drops, flow.tuple.src, flow.tuple.dst)
        .map(|d| format!("{}: {}", d.chain, d.rule));
    if rule.is_some() {
        evidence.push(Evidence::NftTraceRule);
    }
    let reply_mark = last_mark(reply);
    let dropping = dropping_rules(&place, reply_mark, cx);
    evidence.extend(dropping.iter().cloned().map(Evidence::DroppingRule));
    // The one rule the reply's mark passed is the one that dropped it.
    let mut passed = dropping.into_iter().filter(|r| r.matched);
    let rule_hit = passed.next().filter(|_| passed.next().is_none());
    let cause = if clobbered {
        Cause::ConnmarkRestoreMask { place }
    } else {
        Cause::NetfilterDrop {
            reply_mark,
            place,
            rule: rule_hit,
        }
    };
    (cause, rule)
}

/// The rules of the dropping chains (and the chains they reach) that drop on a test of the
/// packet mark, from the ruleset in force when the reply died: the bits they test, whose those
/// are, and whether the reply's mark passed.
fn dropping_rules(place: &DropPlace, reply_mark: Mark, cx: &Context) -> Vec<DroppingRule> {
    cx.state
        .mark_rules
        .iter()
        .filter(|r| r.drops && !r.matches.is_empty())
        .filter(|r| place.chains.iter().any(|c| r.runs_in(&c.id)))
        .map(|r| {
            let bits = r.matches.iter().fold(Mark::ZERO, |b, t| b | t.mask);
            DroppingRule {
                chain: r.chain.clone(),
                rule: r.rule.clone(),
                tests: r.matches.clone(),
                bits,
                owners: bit_owners(bits, cx.registry),
                matched: r.matches.iter().all(|t| t.matches(reply_mark)),
            }
        })
        .collect()
}

/// The owners (by id) of these bits.
fn bit_owners(bits: Mark, registry: &Registry) -> Vec<String> {
    let a = attribute(
        registry,
        &Transition {
            old: 0,
            new: bits.0,
            ..Default::default()
        },
    );
    let mut owners: Vec<String> = a
        .owners
        .iter()
        .map(|o| registry.owner(o.owner).id())
        .collect();
    owners.dedup();
    owners
}

/// The step where a path went through an xfrm transform in direction `dir` (encapsulation on
/// the request's, decryption on the reply's), with the SPI and state it names.
fn xfrm_step(path: &[&Step], dir: TunnelDir) -> Option<XfrmEncap> {
    path.iter().find_map(|s| {
        let t = s.segment.as_ref()?.tunnel().filter(|t| t.dir == dir)?;
        let Encapsulator::Xfrm { spi, state } = &t.by else {
            return None;
        };
        Some(XfrmEncap {
            step: (*s).clone(),
            spi: *spi,
            state: state.clone(),
        })
    })
}

/// XFRM_POLICY: the inbound (and forward) policies whose selector (addresses, mark) takes the
/// reply, those that block and those with templates it must have been decrypted by; the one
/// the kernel applies comes first (lowest priority value). A template policy and a reply whose
/// path shows no decryption: the reply came back outside the tunnel, and the request's way
/// into it (its state, the outbound policy its mark selected) is named.
fn xfrm_policy(
    flow: &Flow,
    request: &[&Step],
    reply: &[&Step],
    dropped: &Step,
    cx: &Context,
    evidence: &mut Vec<Evidence>,
) -> Cause {
    let reply_mark = last_mark(reply);
    // The reply's addresses where it died (its own tuple where NAT changed it).
    let at = dropped.nat_tuple.unwrap_or_else(|| flow.tuple.reversed());
    let mut hits: Vec<&XfrmPolicy> = cx
        .state
        .xfrm
        .iter()
        .filter(|p| {
            p.direction != XfrmDir::Out
                && (p.action == XfrmAction::Block || p.required().next().is_some())
                && p.selects(at.src, at.dst, reply_mark)
        })
        .collect();
    hits.sort_by_key(|p| p.priority);
    evidence.extend(hits.iter().map(|p| Evidence::XfrmMatching((*p).clone())));
    // Decrypted: its sec_path names a state, or a (marked) packet's step out of the tunnel.
    let decrypted = reply.iter().any(|s| s.decrypted_by.is_some())
        || xfrm_step(reply, TunnelDir::Decap).is_some();
    match hits.first() {
        Some(p) if p.action == XfrmAction::Allow && !decrypted => {
            let request_tunnel = xfrm_step(request, TunnelDir::Encap);
            // The policy lookup saw the inner packet's mark: before the encapsulation (where
            // a state's output mark may rewrite it), or the request's last.
            let request_mark = request_tunnel
                .as_ref()
                .map_or(last_mark(request), |t| t.step.old_mark);
            let state = request_tunnel.as_ref().and_then(|t| t.state.as_ref());
            Cause::XfrmOutsideTunnel {
                reply_mark,
                policy: (*p).clone(),
                outbound: outbound_policies(flow, request, request_mark, state, cx),
                request_tunnel,
                request_mark,
            }
        }
        p => Cause::XfrmPolicy {
            reply_mark,
            policy: p.map(|p| (*p).clone()),
        },
    }
}

/// The outbound policies with templates whose selector takes the request (its addresses, or
/// those NAT gave it, and `mark`), in the kernel's order; with the tunnel's state known, only
/// those whose template it fits, when some do.
fn outbound_policies(
    flow: &Flow,
    request: &[&Step],
    mark: Mark,
    state: Option<&XfrmState>,
    cx: &Context,
) -> Vec<XfrmPolicy> {
    let tuples: Vec<Tuple> = std::iter::once(flow.tuple)
        .chain(request.iter().filter_map(|s| s.nat_tuple))
        .collect();
    let mut out: Vec<&XfrmPolicy> = cx
        .state
        .xfrm
        .iter()
        .filter(|p| {
            p.direction == XfrmDir::Out
                && !p.templates.is_empty()
                && tuples.iter().any(|t| p.selects(t.src, t.dst, mark))
        })
        .collect();
    if let Some(sa) = state {
        let fits = |p: &&XfrmPolicy| p.templates.iter().any(|t| t.fits(sa));
        if out.iter().any(fits) {
            out.retain(fits);
        }
    }
    out.sort_by_key(|p| p.priority);
    out.into_iter().cloned().collect()
}

/// The request's mark against the reply's: which owners' bits differ.
fn mark_diff(request: Mark, reply: Mark, registry: &Registry) -> MarkDiff {
    MarkDiff {
        request,
        reply,
        owners: bit_owners(request ^ reply, registry),
    }
}

pub(crate) fn judge(flow: &Flow, cx: &Context) -> Report {
    let request = packets(flow, Dir::Request);
    let reply = packets(flow, Dir::Reply);
    let (request_mark, reply_mark) = (last_mark(&request), last_mark(&reply));
    let mut evidence = Vec::new();
    for dir in [Dir::Request, Dir::Reply] {
        let lookups: Vec<(u32, Mark, RouteResult)> = flow
            .path(dir)
            .filter_map(|s| s.route.map(|r| (r.table, s.mark, r.result)))
            .collect();
        if !lookups.is_empty() {
            evidence.push(Evidence::Lookups { dir, lookups });
        }
    }
    if !request.is_empty() {
        evidence.push(Evidence::RequestLastSeen);
    }
    let mark_diff =
        (request_mark != reply_mark).then(|| mark_diff(request_mark, reply_mark, cx.registry));
    if mark_diff.is_some() {
        evidence.push(Evidence::MarkDiff);
    }
    let restore_clobber = restore_clobber(&reply);
    if restore_clobber.is_some() {
        evidence.push(Evidence::ConnmarkRestore);
    }

    let drop_at = reply.iter().position(|s| s.kind == EventKind::Drop);
    let (cause, drop) = match drop_at {
        None => {
            let cause = server_side(flow, &request, &reply, cx, &mut evidence)
                .unwrap_or_else(|| undropped(&request, &reply));
            (cause, None)
        }
        Some(i) => {
            let before = i.checked_sub(1).map(|j| reply[j]);
            let reason = reply[i]
                .drop_reason
                .clone()
                .unwrap_or(DropReason::Unnamed(0));
            let place = drop_place(before, flow, cx.state);
            let mut info = DropInfo {
                reason: reason.clone(),
                after: before.cloned(),
                place: place.clone(),
                rule: None,
            };
            let cause = match reason {
                DropReason::IpRpfilter => {
                    evidence.push(Evidence::RpFilterSysctls);
                    rp_filter(flow, &request, &reply, cx)
                }
                DropReason::NetfilterDrop => {
                    let (cause, rule) = netfilter_drop(
                        flow,
                        &reply,
                        restore_clobber.is_some(),
                        place,
                        cx,
                        &mut evidence,
                    );
                    info.rule = rule;
                    cause
                }
                DropReason::XfrmPolicy => {
                    xfrm_policy(flow, &request, &reply, reply[i], cx, &mut evidence)
                }
                // Past every netfilter hook, the stack found no socket: routing and marks did
                // their job.
                DropReason::NoSocket if flow.tuple.proto.is_icmp() => {
                    Cause::IcmpDelivered { reply_mark }
                }
                DropReason::NoSocket => Cause::NoSocket {
                    reply_mark,
                    after: before.cloned(),
                },
                reason => Cause::Dropped {
                    reply_mark,
                    after: before.cloned(),
                    reason,
                },
            };
            (cause, Some(info))
        }
    };
    Report {
        flow: flow.tuple,
        cause,
        evidence,
        last_reply: reply.last().map(|s| (*s).clone()),
        drop,
        mark_diff,
        restore_clobber,
        request: flow.path(Dir::Request).cloned().collect(),
        reply: flow.path(Dir::Reply).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn lost_events_make_an_absent_reply_inconclusive_but_not_a_seen_drop() {
        let no_reply = Cause::NoReply { last_request: None };
        assert_eq!(no_reply.clone().with_lost(0), no_reply);
        let c = no_reply.clone().with_lost(3);
        assert_eq!(c.verdict(), Verdict::Inconclusive);
        assert!(matches!(c, Cause::Inconclusive { lost: 3, seen } if *seen == no_reply));
        let dropped = Cause::Dropped {
            reply_mark: Mark::ZERO,
            after: None,
            reason: DropReason::NetfilterDrop,
        };
        assert_eq!(dropped.clone().with_lost(3), dropped);
    }
    use crate::{
        clock::Timestamp,
        event::RouteLookup,
        netstack::{Family, NftFamily},
        nodestate::netlink::{XfrmMode, XfrmTemplate},
        nodestate::{
            netlink::{Route, TABLE_MAIN},
            sysctl::Sysctls,
        },
        output::why::summary,
        place::{Between, Layer, PointInfo, Segment, Tunnel},
    };

    fn nf(hook: NfHook, prio: i32) -> Option<(Hook, i32)> {
        Some((Hook::Netfilter(hook), prio))
    }

    fn step(dir: Dir, kind: EventKind, at: Option<(Hook, i32)>, old: u32, mark: u32) -> Step {
        Step {
            time: Timestamp::now(),
            ts_ns: 0,
            dir,
            packet_id: 1,
            kind,
            at: Arc::new(PointInfo {
                layer: Layer::Netfilter,
                hook: at.map(|(h, _)| h),
                family: Some(Family::Ipv4),
                priority: at.map(|(_, p)| p),
                ifname: Some("a2".into()),
                ..Default::default()
            }),
            mark: Mark(mark),
            old_mark: Mark(old),
            ct_mark: None,
            ct_state: None,
            segment: None,
            drop_reason: None,
            route: None,
            nat_tuple: None,
            decrypted_by: None,
        }
    }

    fn at_dev(s: Step, hook: Hook, dev: &str) -> Step {
        Step {
            at: Arc::new(PointInfo {
                hook: Some(hook),
                ifname: Some(dev.into()),
                ..(*s.at).clone()
            }),
            ..s
        }
    }

    fn dropped(reason: DropReason, mark: u32) -> Step {
        let tp = Some((Hook::Tracepoint(Tracepoint::KfreeSkb), 0));
        Step {
            drop_reason: Some(reason),
            ..step(Dir::Reply, EventKind::Drop, tp, mark, mark)
        }
    }

    fn flow(steps: Vec<Step>) -> Flow {
        Flow {
            tuple: "udp 10.77.0.1:40000 -> 10.9.9.9:7".parse().unwrap(),
            steps,
            steps_dropped: 0,
        }
    }

    fn rule(priority: u32, fwmark: Option<&str>, table: u32) -> IpRule {
        IpRule {
            family: Family::Ipv4,
            priority,
            fwmark: fwmark.map(|m| m.parse().unwrap()),
            invert: false,
            table,
            action: RuleAction::Lookup,
            iif: None,
            suppress_prefixlen: None,
        }
    }

    fn route(table: u32, oif: u32) -> Route {
        Route {
            table,
            destination: "10.9.9.9/32".parse().unwrap(),
            gateway: None,
            oif: Some(oif),
            kind: netlink_packet_route::route::RouteType::Unicast,
        }
    }

    fn state() -> NodeState {
        NodeState {
            rules: Arc::new(vec![
                rule(0, None, TABLE_LOCAL),
                rule(1000, Some("0x4000/0x4000"), 100),
                rule(32766, None, TABLE_MAIN),
            ]),
            routes: Arc::new(vec![route(TABLE_MAIN, 2), route(100, 3)]),
            sysctls: Arc::new(Sysctls {
                rp_filter: [("all".into(), 1)].into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn judge_with(f: &Flow, s: &NodeState, chains: &[Chain]) -> Report {
        let s = &NodeState {
            chains: Arc::new(chains.to_vec()),
            ..s.clone()
        };
        let reg = Registry::builtin().unwrap();
        let names = |i: u32| Some(if i == 2 { "veth-a" } else { "a2" }.to_string());
        judge(
            f,
            &Context {
                state: s,
                registry: &reg,
                ifname: &names,
                nft_drops: &[],
            },
        )
    }

    /// The request marked 0x4000 at output; its reply, unmarked, dropped by rp_filter.
    fn unmarked_reply() -> Flow {
        flow(vec![
            step(
                Dir::Request,
                EventKind::Transition,
                nf(NfHook::Output, -149),
                0,
                0x4000,
            ),
            step(
                Dir::Reply,
                EventKind::Observe,
                nf(NfHook::Prerouting, i32::MIN + 1),
                0,
                0,
            ),
            dropped(DropReason::IpRpfilter, 0),
        ])
    }

    #[test]
    fn unmarked_reply_fails_rp_filter() {
        let f = unmarked_reply();
        let r = judge_with(&f, &state(), &[]);
        let Cause::RpFilter {
            missed,
            path,
            arrival,
            rp_filter,
            src_valid_mark,
            ..
        } = &r.cause
        else {
            panic!("{:?}", r.cause);
        };
        assert_eq!(
            missed.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            ["1000: fwmark 0x4000/0x4000 lookup 100"]
        );
        assert_eq!(
            *path,
            ReversePath::Elsewhere {
                table: TABLE_MAIN,
                prefix: "10.9.9.9/32".parse().unwrap(),
                dev: Some("veth-a".into())
            }
        );
        assert_eq!(
            (arrival.as_str(), *rp_filter, *src_valid_mark),
            ("a2", 1, false)
        );
        let text = summary(&r);
        for part in [
            "`1000: fwmark 0x4000/0x4000 lookup 100` did not match",
            "table main → reverse path to 10.9.9.9 via veth-a",
            "≠ arrival a2",
            "rp_filter=1, src_valid_mark=0",
        ] {
            assert!(text.contains(part), "{part} not in {text}");
        }
        // The sysctls and the mark diff are the cause's and the report's, said again as evidence.
        let evidence = crate::output::why::evidence(&r);
        assert!(
            evidence
                .iter()
                .any(|e| e == "rp_filter=1 on a2, src_valid_mark=0"),
            "{evidence:#?}"
        );
        assert!(
            evidence.iter().any(|e| e.starts_with("request mark 0x4000 vs reply mark 0x0: bits 0x4000 differ")),
            "{evidence:#?}"
        );
        let d = r.mark_diff.unwrap();
        assert_eq!(d.request ^ d.reply, Mark(0x4000));
    }

    /// An IPv6 reply's missed rules are IPv6 rules: the IPv4 rule with the request's fwmark is
    /// not one it could have taken.
    #[test]
    fn an_ipv6_reply_misses_ipv6_rules_only() {
        let f = Flow {
            tuple: "udp [fd00::1]:40000 -> [fd00::9]:7".parse().unwrap(),
            ..unmarked_reply()
        };
        let missed = |s: &NodeState| -> Vec<String> {
            let r = judge_with(&f, s, &[]);
            let Cause::RpFilter { missed, .. } = r.cause else {
                panic!("{:?}", r.cause);
            };
            missed.iter().map(ToString::to_string).collect()
        };
        assert!(missed(&state()).is_empty());
        let mut v6 = state();
        Arc::make_mut(&mut v6.rules).push(IpRule {
            family: Family::Ipv6,
            ..rule(1001, Some("0x4000/0x4000"), 100)
        });
        assert_eq!(missed(&v6), ["1001: fwmark 0x4000/0x4000 lookup 100"]);
    }

    #[test]
    fn netfilter_drop_names_the_band_and_a_restore_clobber() {
        let mut restore = step(
            Dir::Reply,
            EventKind::Transition,
            nf(NfHook::Prerouting, -149),
            0x100,
            0x4000,
        );
        restore.ct_mark = Some(Mark(0x4000));
        let input = step(
            Dir::Reply,
            EventKind::Observe,
            nf(NfHook::Input, i32::MIN + 1),
            0x4000,
            0x4000,
        );
        let drop = dropped(DropReason::NetfilterDrop, 0x4000);
        let chains = vec![crate::fixtures::chain(
            NftFamily::Inet,
            "t",
            "in",
            NfHook::Input,
            0,
        )];
        let plain = flow(vec![input.clone(), drop.clone()]);
        let r = judge_with(&plain, &state(), &chains);
        assert_eq!(r.cause.verdict(), Verdict::NetfilterDrop);
        assert_eq!(r.drop.as_ref().unwrap().place.chains, chains);
        // With the chain's rules known: the one whose test the reply's mark passed is named,
        // with the bits it tests and whose they are.
        let test = |mask: u32, value: u32| MarkMatch::new(Mark(value), Mark(mask));
        let rule = |text: &str, t: MarkMatch| crate::nodestate::nft::MarkRule {
            chain: chains[0].id.clone(),
            reached_from: vec![],
            rule: text.into(),
            matches: vec![t],
            writes: false,
            drops: true,
        };
        let with_rules = NodeState {
            mark_rules: Arc::new(vec![
                rule("meta mark & 0x4000 == 0x0 drop", test(0x4000, 0)),
                rule("meta mark & 0x8000 == 0x8000 drop", test(0x8000, 0x8000)),
            ]),
            ..state()
        };
        let unmarked = flow(vec![
            Step {
                mark: Mark::ZERO,
                ..input.clone()
            },
            dropped(DropReason::NetfilterDrop, 0),
        ]);
        let r = judge_with(&unmarked, &with_rules, &chains);
        let text = summary(&r);
        assert!(
            text.contains("by `meta mark & 0x4000 == 0x0 drop` in inet t/in, which tests bits 0x4000: kube-proxy"),
            "{text}"
        );
        let evidence = crate::output::why::evidence(&r);
        assert!(
            evidence.iter().any(|e| e
                .contains("`meta mark & 0x8000 == 0x8000 drop` tests mark & 0x8000 == 0x8000")
                && e.ends_with("did not pass it")),
            "{evidence:#?}"
        );
        let r = judge_with(&flow(vec![restore, input, drop]), &state(), &chains);
        assert!(
            matches!(r.cause, Cause::ConnmarkRestoreMask { .. })
                && r.restore_clobber.as_ref().map(|c| c.lost) == Some(Mark(0x100)),
            "{:?}",
            r.cause
        );
        assert!(summary(&r).contains("losing bits 0x100"), "{}", summary(&r));
    }

    #[test]
    fn xfrm_block_and_healthy_and_silent() {
        let mut s = state();
        let policy = XfrmPolicy {
            direction: XfrmDir::In,
            action: XfrmAction::Block,
            src: "10.9.9.9/32".parse().unwrap(),
            dst: "10.77.0.1/32".parse().unwrap(),
            mark: "0x0/0x4000".parse().unwrap(),
            priority: 0,
            templates: vec![],
        };
        s.xfrm = Arc::new(vec![policy.clone()]);
        let r = judge_with(&flow(vec![dropped(DropReason::XfrmPolicy, 0)]), &s, &[]);
        assert_eq!(
            r.cause,
            Cause::XfrmPolicy {
                reply_mark: Mark::ZERO,
                policy: Some(policy)
            }
        );
        assert!(
            summary(&r).contains("mark 0x0/0x4000 action block"),
            "{}",
            summary(&r)
        );
        let consumed = step(
            Dir::Reply,
            EventKind::Consume,
            Some((Hook::Tracepoint(Tracepoint::ConsumeSkb), 0)),
            0,
            0,
        );
        assert_eq!(
            judge_with(&flow(vec![consumed]), &s, &[]).cause.verdict(),
            Verdict::Delivered
        );
        let silent = flow(vec![step(Dir::Request, EventKind::Observe, None, 0, 0)]);
        assert_eq!(
            judge_with(&silent, &s, &[]).cause.verdict(),
            Verdict::NoReply
        );
    }

    /// A policy with one ESP tunnel-mode template between `from` and `to`.
    fn esp_policy(
        dir: XfrmDir,
        sel: (&str, &str),
        mark: &str,
        tmpl: (&str, &str),
        reqid: u32,
    ) -> XfrmPolicy {
        XfrmPolicy {
            direction: dir,
            action: XfrmAction::Allow,
            src: sel.0.parse().unwrap(),
            dst: sel.1.parse().unwrap(),
            mark: mark.parse().unwrap(),
            priority: 0,
            templates: vec![XfrmTemplate {
                src: tmpl.0.parse().unwrap(),
                dst: tmpl.1.parse().unwrap(),
                proto: libc::IPPROTO_ESP as u8,
                spi: 0,
                reqid,
                mode: XfrmMode::Tunnel,
                optional: false,
            }],
        }
    }

    /// An xfrm step of `dir` (the ESP packet on the request's path, the decrypted reply).
    fn xfrm_at(s: Step, dir: TunnelDir, sa: Option<XfrmState>) -> Step {
        Step {
            segment: Some(Arc::new(Segment {
                between: Between::Tunnel(Tunnel {
                    dir,
                    by: Encapsulator::Xfrm {
                        spi: Some(0x100),
                        state: sa,
                    },
                    crossed: None,
                }),
                from: (*s.at).clone(),
                to: (*s.at).clone(),
                tc_filters: false,
            })),
            ..s
        }
    }

    /// The request (SO_MARK 0x100) went into an ESP tunnel by the state with SPI 0x100, which
    /// the out policy for mark 0x100/0xf00 selected; the reply came back in the clear and the
    /// in policy wants ESP from the peer: it names both, in words and JSON.
    #[test]
    fn reply_outside_the_tunnel_names_the_policy_and_the_request_state() {
        let (a, peer) = ("10.77.0.1", "10.9.9.9");
        let sa = XfrmState {
            src: a.parse().unwrap(),
            dst: peer.parse().unwrap(),
            proto: libc::IPPROTO_ESP as u8,
            spi: 0x100,
            mode: XfrmMode::Tunnel,
            reqid: 1,
            if_id: None,
            mark: None,
            output_mark: None,
        };
        let inbound = esp_policy(
            XfrmDir::In,
            ("10.9.9.9/32", "10.77.0.1/32"),
            "0/0",
            (peer, a),
            2,
        );
        let outbound = esp_policy(
            XfrmDir::Out,
            ("10.77.0.1/32", "10.9.9.9/32"),
            "0x100/0xf00",
            (a, peer),
            1,
        );
        let mut s = state();
        s.xfrm = Arc::new(vec![
            // Not selecting the request's mark, or not covering the reply: not named.
            esp_policy(
                XfrmDir::Out,
                ("10.77.0.1/32", "10.9.9.9/32"),
                "0x200/0xf00",
                (a, peer),
                1,
            ),
            esp_policy(
                XfrmDir::In,
                ("10.1.1.1/32", "10.77.0.1/32"),
                "0/0",
                ("10.1.1.1", a),
                3,
            ),
            outbound.clone(),
            inbound.clone(),
        ]);
        let out = nf(NfHook::Output, i32::MIN + 1);
        let sent = step(Dir::Request, EventKind::Transition, out, 0, 0x100);
        let esp = xfrm_at(
            step(Dir::Request, EventKind::Tunnel, out, 0x100, 0x100),
            TunnelDir::Encap,
            Some(sa.clone()),
        );
        let arrived = step(
            Dir::Reply,
            EventKind::Observe,
            nf(NfHook::Prerouting, i32::MIN + 1),
            0,
            0,
        );
        let drop = dropped(DropReason::XfrmPolicy, 0);
        let f = flow(vec![
            sent.clone(),
            esp.clone(),
            arrived.clone(),
            drop.clone(),
        ]);
        let r = judge_with(&f, &s, &[]);
        assert_eq!(r.cause.verdict(), Verdict::XfrmPolicy);
        let Cause::XfrmOutsideTunnel {
            policy,
            request_tunnel,
            request_mark,
            outbound: named,
            ..
        } = &r.cause
        else {
            panic!("{:?}", r.cause);
        };
        assert_eq!(*policy, inbound);
        assert_eq!(*request_mark, Mark(0x100));
        assert_eq!(*named, vec![outbound.clone()]);
        let t = request_tunnel.as_ref().expect("the request's ESP step");
        assert_eq!((t.spi, t.state.as_ref()), (Some(0x100), Some(&sa)));
        let text = summary(&r);
        for part in [
            "came back outside the IPsec tunnel (no decryption step on its path)",
            "xfrm policy dir in src 10.9.9.9/32 dst 10.77.0.1/32 mark 0x0/0x0 action allow tmpl src 10.9.9.9 dst 10.77.0.1 proto esp reqid 2 mode tunnel",
            "requires proto esp (reqid 2, mode tunnel, 10.9.9.9 → 10.77.0.1) → XFRM_POLICY",
            "the request went into the tunnel by state spi 0x100 10.77.0.1 → 10.9.9.9 reqid 1 mode tunnel",
            "its mark 0x100 selected `xfrm policy dir out src 10.77.0.1/32 dst 10.9.9.9/32 mark 0x100/0xf00",
        ] {
            assert!(text.contains(part), "{part:?} not in {text}");
        }
        let json = serde_json::to_value(crate::output::why::ReportJson(&r)).unwrap();
        let x = &json["xfrm"];
        assert_eq!(x["reply_decrypted"], false, "{json:#}");
        assert_eq!(x["inbound_policy"]["direction"], "in", "{x:#}");
        assert_eq!(x["required"][0]["reqid"], 2, "{x:#}");
        assert_eq!(x["request_mark"], "0x100", "{x:#}");
        assert_eq!(x["request_tunnel"]["spi"], "0x100", "{x:#}");
        assert_eq!(x["request_tunnel"]["state"]["reqid"], 1, "{x:#}");
        assert_eq!(x["outbound_policies"][0]["mark"], "0x100/0xf00", "{x:#}");
        assert!(x["outbound_policies"][0]["text"]
            .as_str()
            .unwrap()
            .contains("dir out"));

        // No ESP step seen: the outbound policy is still named, the state is not.
        let r = judge_with(
            &flow(vec![sent.clone(), arrived.clone(), drop.clone()]),
            &s,
            &[],
        );
        assert!(
            matches!(&r.cause, Cause::XfrmOutsideTunnel { request_tunnel: None, outbound, .. } if outbound.len() == 1),
            "{:?}",
            r.cause
        );
        assert!(
            summary(&r).contains("but the request's path shows no encapsulation"),
            "{}",
            summary(&r)
        );

        // The reply was decrypted (and still refused): not "outside the tunnel". Seen as a
        // step out of the tunnel, or (mark 0: no such step) by the state in its sec_path.
        let out_of_tunnel = xfrm_at(arrived.clone(), TunnelDir::Decap, None);
        let by_sec_path = Step {
            decrypted_by: Some(crate::event::XfrmRef {
                spi: 0x200,
                state: None,
            }),
            ..arrived.clone()
        };
        for decrypted in [out_of_tunnel, by_sec_path] {
            let steps = vec![sent.clone(), esp.clone(), decrypted, drop.clone()];
            assert_eq!(
                judge_with(&flow(steps), &s, &[]).cause,
                Cause::XfrmPolicy {
                    reply_mark: Mark::ZERO,
                    policy: Some(inbound.clone())
                }
            );
        }

        // A block policy the kernel applies first (lower priority value) keeps its cause.
        let mut block = inbound.clone();
        block.action = XfrmAction::Block;
        block.templates.clear();
        let mut later = inbound.clone();
        later.priority = 10;
        s.xfrm = Arc::new(vec![later, block.clone()]);
        let r = judge_with(&flow(vec![sent, arrived, drop]), &s, &[]);
        assert_eq!(
            r.cause,
            Cause::XfrmPolicy {
                reply_mark: Mark::ZERO,
                policy: Some(block)
            }
        );
    }

    #[test]
    fn server_side_reply_leaving_elsewhere_is_misrouted() {
        let point = |dir, hook, dev: &str, ct: Option<u32>| Step {
            ct_mark: ct.map(Mark),
            ..at_dev(step(dir, EventKind::Observe, None, 0, 0), hook, dev)
        };
        let rx = Hook::Tracepoint(Tracepoint::NetifReceiveSkb);
        let queue = Hook::Tracepoint(Tracepoint::NetDevQueue);
        let mut s = state();
        // The request's connection mark would have chosen table 100 for the reply.
        Arc::make_mut(&mut s.rules)[1].fwmark = Some("0x10/0x10".parse().unwrap());
        let route = Step {
            route: Some(RouteLookup {
                table: TABLE_MAIN,
                result: RouteResult::Ok,
                flow_mark: Mark::ZERO,
                oif: 0,
                iif: 0,
            }),
            ..step(Dir::Reply, EventKind::Route, None, 0, 0)
        };
        let f = flow(vec![
            point(Dir::Request, rx, "veth-b", None),
            point(
                Dir::Request,
                Hook::Netfilter(NfHook::Input),
                "veth-b",
                Some(0x10),
            ),
            // A UDP socket drops the conntrack reference before the skb is consumed.
            point(
                Dir::Request,
                Hook::Tracepoint(Tracepoint::ConsumeSkb),
                "veth-b",
                None,
            ),
            route,
            point(
                Dir::Reply,
                Hook::Netfilter(NfHook::Output),
                "b2",
                Some(0x10),
            ),
            point(Dir::Reply, queue, "b2", Some(0x10)),
        ]);
        let r = judge_with(&f, &s, &[]);
        let Cause::ReplyMisrouted {
            left,
            arrived,
            unrestored_ct,
            missed,
            table,
            ..
        } = &r.cause
        else {
            panic!("{:?}", r.cause);
        };
        assert_eq!((left.as_str(), arrived.as_str()), ("b2", "veth-b"));
        assert_eq!(*unrestored_ct, Some(Mark(0x10)));
        assert_eq!(missed[0].table, 100);
        assert_eq!(*table, Some(TABLE_MAIN));
        let text = summary(&r);
        for part in [
            "left via b2, not veth-b",
            "ct mark 0x10 was not restored",
            "lookup 100` did not match",
            "table main",
        ] {
            assert!(text.contains(part), "{part} not in {text}");
        }
        // Leaving where it came in: healthy.
        let mut same = f.clone();
        for st in &mut same.steps {
            st.at = Arc::new(PointInfo {
                ifname: Some("veth-b".into()),
                ..(*st.at).clone()
            });
        }
        let r = judge_with(&same, &s, &[]);
        assert_eq!(r.cause.verdict(), Verdict::ReplySent);
        assert!(r.cause.verdict().healthy());
    }

    #[test]
    fn no_socket_after_input_is_not_a_mark_problem() {
        let input = step(
            Dir::Reply,
            EventKind::Observe,
            nf(NfHook::Input, i32::MAX - 1),
            0,
            0,
        );
        let mut f = flow(vec![input, dropped(DropReason::NoSocket, 0)]);
        let r = judge_with(&f, &state(), &[]);
        assert_eq!(r.cause.verdict(), Verdict::NoSocket, "{:?}", r.cause);
        // ping reads replies from a raw socket (a clone); the original finds no ping socket.
        f.tuple.proto = Proto(libc::IPPROTO_ICMP as u8);
        let r = judge_with(&f, &state(), &[]);
        assert_eq!(
            r.cause,
            Cause::IcmpDelivered {
                reply_mark: Mark::ZERO
            }
        );
        assert!(summary(&r).contains("raw sockets receive a clone"));
    }
}
