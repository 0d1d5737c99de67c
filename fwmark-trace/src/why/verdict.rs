//! Why did the reply die? From one flow's timeline (request and reply paths with marks, drops
//! and routing lookups) and the node's state (ip rules, routes, rp_filter, xfrm policies, nft
//! chains), find the cause — one function per cause, each returning what it found — and the
//! evidence behind it. `output::why` says both in words.
use std::net::IpAddr;

use ipnet::IpNet;

use crate::{
    attribution::{attribute, Change},
    event::{DropReason, EventKind, RouteResult, Tuple},
    flows::{Dir, Flow, Step},
    mark::Mark,
    nodestate::{
        netlink::{IpRule, RuleAction, XfrmAction, XfrmDir, XfrmPolicy, TABLE_LOCAL},
        nft::{Chain, ChainId, MarkTest},
        NodeState, StateChange,
    },
    place::{Hook, Tracepoint},
    registry::Registry,
    stack::{NfHook, Proto},
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
    /// A restore wrote the ct mark over bits set on the reply, which then died in netfilter.
    ConnmarkRestoreMask {
        restore: Step,
        lost: Mark,
        place: DropPlace,
    },
    XfrmPolicy {
        reply_mark: Mark,
        policy: Option<XfrmPolicy>,
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
            Cause::XfrmPolicy { .. } => Verdict::XfrmPolicy,
            Cause::NoSocket { .. } => Verdict::NoSocket,
            Cause::Dropped { .. } => Verdict::Dropped,
            Cause::ReplySent { .. } => Verdict::ReplySent,
            Cause::ReplyMisrouted { .. } => Verdict::ReplyMisrouted,
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
    RequestLastSeen(Step),
    /// The request's and the reply's last marks differ in bits of these owners.
    MarkDiff(MarkDiff),
    ConnmarkRestore {
        restore: Step,
        lost: Mark,
    },
    /// `--nftrace` named the rule that dropped the packet.
    NftTraceRule(String),
    /// A rule that drops on a mark test, in the chains where the reply died.
    DroppingRule(DroppingRule),
    XfrmMatching(XfrmPolicy),
    RpFilterSysctls {
        arrival: String,
        rp_filter: u8,
        src_valid_mark: bool,
    },
    RestoreOnOutputHint,
    FwmarkReflectOff,
    TcpFwmarkAcceptOff,
    /// The node's state changed while the flow was watched.
    NodeChanged {
        time: crate::event::Timestamp,
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
    pub(crate) tests: Vec<MarkTest>,
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

/// A reply transition that looks like a connmark restore clobbering bits set earlier on the
/// reply: the new mark holds nothing but ct-mark bits, and bits were lost.
fn restore_clobber<'a>(reply: &[&'a Step]) -> Option<(&'a Step, Mark)> {
    reply.iter().copied().find_map(|s| {
        let ct = s.ct_mark?;
        let lost = s.old_mark & !s.mark;
        (s.kind == EventKind::Transition && !lost.is_zero() && s.mark.within(ct))
            .then_some((s, lost))
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
        .flat_map(|m| cx.state.rules_for(m))
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
        crate::stack::Family::Ipv4 => sysctls.fwmark_reflect,
        crate::stack::Family::Ipv6 => sysctls.fwmark_reflect6,
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
fn rp_filter(flow: &Flow, request: &[&Step], reply: &[&Step], cx: &Context) -> (Cause, Evidence) {
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
        .rules_for(request_mark)
        .into_iter()
        .filter(|r| r.fwmark.is_some() && !r.mark_matches(used_mark))
        .cloned()
        .collect();
    let path = cx
        .state
        .rules_for(used_mark)
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
    let evidence = Evidence::RpFilterSysctls {
        arrival: arrival.clone(),
        rp_filter,
        src_valid_mark,
    };
    let cause = Cause::RpFilter {
        reply_mark,
        used_mark,
        missed,
        path,
        arrival,
        rp_filter,
        src_valid_mark,
    };
    (cause, evidence)
}

/// NETFILTER_DROP: the band's chains, the rule if nftables tracing named it, the mark-matching
/// rules in those chains; a restore that clobbered the reply's mark first (`clobber`, from
/// `restore_clobber`) makes it `connmark-restore-mask`.
fn netfilter_drop(
    flow: &Flow,
    reply: &[&Step],
    clobber: Option<(&Step, Mark)>,
    place: DropPlace,
    cx: &Context,
    evidence: &mut Vec<Evidence>,
) -> (Cause, Option<String>) {
    let rule = super::nftrace::for_flow(cx.nft_drops, flow.tuple.src, flow.tuple.dst)
        .map(|d| format!("{}: {}", d.chain, d.rule));
    if let Some(r) = &rule {
        evidence.push(Evidence::NftTraceRule(r.clone()));
    }
    let reply_mark = last_mark(reply);
    let dropping = dropping_rules(&place, reply_mark, cx);
    evidence.extend(dropping.iter().cloned().map(Evidence::DroppingRule));
    // The one rule the reply's mark passed is the one that dropped it.
    let mut passed = dropping.into_iter().filter(|r| r.matched);
    let rule_hit = passed.next().filter(|_| passed.next().is_none());
    let cause = match clobber {
        Some((restore, lost)) => Cause::ConnmarkRestoreMask {
            restore: restore.clone(),
            lost,
            place,
        },
        None => Cause::NetfilterDrop {
            reply_mark,
            place,
            rule: rule_hit,
        },
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
                matched: r.matches.iter().all(|t| t.holds(reply_mark)),
            }
        })
        .collect()
}

/// The owners (by id) of these bits.
fn bit_owners(bits: Mark, registry: &Registry) -> Vec<String> {
    let a = attribute(
        registry,
        &Change {
            old: 0,
            new: bits.0,
            ..Default::default()
        },
    );
    let mut owners: Vec<String> = a.owners.into_iter().map(|o| o.owner).collect();
    owners.dedup();
    owners
}

/// XFRM_POLICY: the inbound block policies whose mark selector takes the reply's mark.
fn xfrm_policy(reply: &[&Step], cx: &Context, evidence: &mut Vec<Evidence>) -> Cause {
    let reply_mark = last_mark(reply);
    let hits: Vec<&XfrmPolicy> = cx
        .state
        .xfrm
        .iter()
        .filter(|p| {
            p.direction != XfrmDir::Out
                && p.action == XfrmAction::Block
                && p.mark.matches(reply_mark)
        })
        .collect();
    evidence.extend(hits.iter().map(|p| Evidence::XfrmMatching((*p).clone())));
    Cause::XfrmPolicy {
        reply_mark,
        policy: hits.first().map(|p| (*p).clone()),
    }
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
    if let Some(last) = request.last() {
        evidence.push(Evidence::RequestLastSeen((*last).clone()));
    }
    let mark_diff =
        (request_mark != reply_mark).then(|| mark_diff(request_mark, reply_mark, cx.registry));
    if let Some(d) = &mark_diff {
        evidence.push(Evidence::MarkDiff(d.clone()));
    }
    let clobber = restore_clobber(&reply);
    if let Some((restore, lost)) = clobber {
        evidence.push(Evidence::ConnmarkRestore {
            restore: restore.clone(),
            lost,
        });
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
                    let (cause, e) = rp_filter(flow, &request, &reply, cx);
                    evidence.push(e);
                    cause
                }
                DropReason::NetfilterDrop => {
                    let (cause, rule) =
                        netfilter_drop(flow, &reply, clobber, place, cx, &mut evidence);
                    info.rule = rule;
                    cause
                }
                DropReason::XfrmPolicy => xfrm_policy(&reply, cx, &mut evidence),
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
        request: flow.path(Dir::Request).cloned().collect(),
        reply: flow.path(Dir::Reply).cloned().collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        event::{RouteLookup, Timestamp},
        nodestate::{
            netlink::{Route, TABLE_MAIN},
            sysctl::Sysctls,
        },
        output::why::summary,
        place::{Layer, PointInfo},
        stack::{Family, NftFamily},
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
            rules: vec![
                rule(0, None, TABLE_LOCAL),
                rule(1000, Some("0x4000/0x4000"), 100),
                rule(32766, None, TABLE_MAIN),
            ],
            routes: vec![route(TABLE_MAIN, 2), route(100, 3)],
            sysctls: Sysctls {
                rp_filter: [("all".into(), 1)].into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn judge_with(f: &Flow, s: &NodeState, chains: &[Chain]) -> Report {
        let s = &NodeState {
            chains: chains.to_vec(),
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

    #[test]
    fn unmarked_reply_fails_rp_filter() {
        let f = flow(vec![
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
        ]);
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
        let d = r.mark_diff.unwrap();
        assert_eq!(d.request ^ d.reply, Mark(0x4000));
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
        let test = |mask: u32, value: u32| MarkTest {
            value: Mark(value),
            mask: Mark(mask),
            negated: false,
        };
        let rule = |text: &str, t: MarkTest| crate::nodestate::nft::MarkRule {
            chain: chains[0].id.clone(),
            reached_from: vec![],
            rule: text.into(),
            matches: vec![t],
            writes: false,
            drops: true,
        };
        let with_rules = NodeState {
            mark_rules: vec![
                rule("meta mark & 0x4000 == 0x0 drop", test(0x4000, 0)),
                rule("meta mark & 0x8000 == 0x8000 drop", test(0x8000, 0x8000)),
            ],
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
        let evidence: Vec<String> = r.evidence.iter().map(ToString::to_string).collect();
        assert!(
            evidence.iter().any(|e| e
                .contains("`meta mark & 0x8000 == 0x8000 drop` tests mark & 0x8000 == 0x8000")
                && e.ends_with("did not pass it")),
            "{evidence:#?}"
        );
        let r = judge_with(&flow(vec![restore, input, drop]), &state(), &chains);
        assert!(
            matches!(r.cause, Cause::ConnmarkRestoreMask { lost, .. } if lost == Mark(0x100)),
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
        };
        s.xfrm = vec![policy.clone()];
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
        s.rules[1].fwmark = Some("0x10/0x10".parse().unwrap());
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
