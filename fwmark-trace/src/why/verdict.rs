//! Why did the reply die? From one flow's timeline (request and reply paths with marks, drops
//! and routing lookups) and the node's state (ip rules, routes, rp_filter, xfrm policies, nft
//! chains), name the cause in plain language with the evidence lines behind it.
use std::net::Ipv4Addr;

use serde::Serialize;

use crate::{
    attribution::{attribute, Change},
    events::hex,
    nodestate::{nft::Chain, NodeState},
    registry::Registry,
    tracking::flows::{Dir, Flow, Step},
};

/// What `judge` needs besides the flow.
pub struct Context<'a> {
    /// The node state in force when the flow's fate was decided (its nft chains included).
    pub state: &'a NodeState,
    pub registry: &'a Registry,
    /// ifindex → name in the traced namespace.
    pub ifname: &'a dyn Fn(u32) -> Option<String>,
    /// Drop verdicts `nft monitor trace` saw (with `--nftrace`).
    pub nft_drops: &'a [super::nftrace::DropRule],
}

#[derive(Debug, Serialize)]
pub struct MarkDiff {
    pub request_mark: String,
    pub reply_mark: String,
    pub bits: String,
    pub owners: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct DropInfo {
    pub reason: String,
    /// The last observer that saw the reply before it died.
    pub after: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// nft chains in the band right after that observer (where the drop happened).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub chains: Vec<String>,
    /// The exact rule, from nftables tracing (`--nftrace`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub flow: String,
    /// rp-filter, netfilter-drop, connmark-restore-mask, xfrm-policy, no-socket, dropped,
    /// no-reply, reply-lost, reply-misrouted (seen from the server), and the healthy ones:
    /// delivered, reply-sent (seen from the server).
    pub verdict: &'static str,
    pub summary: String,
    pub evidence: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_reply_point: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drop: Option<DropInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark_diff: Option<MarkDiff>,
    pub request: Vec<Step>,
    pub reply: Vec<Step>,
}

fn packets(flow: &Flow, dir: Dir) -> Vec<&Step> {
    flow.path(dir).filter(|s| s.kind != "route").collect()
}

/// Longest-prefix match of an IPv4 address in one table: (prefix, oif).
fn lookup(state: &NodeState, table: u32, addr: Ipv4Addr) -> Option<(String, Option<u32>)> {
    state
        .routes
        .iter()
        .filter(|r| r.table == table && r.kind != "local" && r.kind != "broadcast")
        .filter_map(|r| {
            let (net, len) = if r.destination == "default" {
                (Ipv4Addr::UNSPECIFIED, 0)
            } else {
                let (n, l) = r.destination.split_once('/')?;
                (n.parse().ok()?, l.parse::<u32>().ok()?)
            };
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            (u32::from(addr) & mask == u32::from(net) & mask).then_some((len, r))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, r)| (r.destination.clone(), r.oif))
}

/// A reply transition that looks like a connmark restore clobbering bits set earlier on the
/// reply: the new mark holds nothing but ct-mark bits, and bits were lost.
fn restore_clobber<'a>(reply: &[&'a Step]) -> Option<(&'a Step, u32)> {
    reply.iter().copied().find_map(|s| {
        let ct = s.ct_mark?;
        let lost = s.old_mark & !s.mark;
        (s.kind == "transition" && lost != 0 && s.mark & !ct == 0).then_some((s, lost))
    })
}

/// Seen from the server's side (the request came in from a device, the reply went out of one):
/// whether the reply left where the request arrived, and if not, why its routing differed.
fn server_side(
    flow: &Flow,
    request: &[&Step],
    reply: &[&Step],
    cx: &Context,
    evidence: &mut Vec<String>,
) -> Option<(&'static str, String)> {
    let device = |path: &[&Step], hook: &str| {
        path.iter()
            .find(|s| s.hook == Some(hook))
            .and_then(|s| s.ifname.clone())
    };
    let arrived = device(request, "netif_receive_skb")?;
    let left = reply
        .iter()
        .rev()
        .find(|s| s.hook == Some("net_dev_queue"))
        .and_then(|s| s.ifname.clone())?;
    let reply_mark = reply.last().map_or(0, |s| s.mark);
    if arrived == left {
        return Some((
            "reply-sent",
            format!(
                "the reply left via {left} (mark {}), where the request arrived",
                hex(reply_mark)
            ),
        ));
    }
    // The marks the request had (packet or connection) that routing by fwmark may expect. The
    // ct mark is the last one seen: a UDP socket drops the skb's conntrack reference on
    // queueing, so the request's final point may carry none.
    let request_mark = request.last().map_or(0, |s| s.mark);
    let request_ct = request.iter().rev().find_map(|s| s.ct_mark);
    let wanted: Vec<u32> = [request_mark, request_ct.unwrap_or(0)]
        .into_iter()
        .filter(|m| *m != 0 && *m != reply_mark)
        .collect();
    let missed: Vec<String> = wanted
        .iter()
        .flat_map(|m| cx.state.rules_for(*m))
        .filter(|r| r.fwmark.is_some() && !r.mark_matches(reply_mark))
        .map(|r| format!("`{}`", r.describe()))
        .collect();
    // The table the reply's (last successful) routing lookup used.
    let table = flow
        .path(Dir::Reply)
        .filter(|s| s.kind == "route" && s.route_result.as_deref() == Some("ok"))
        .filter_map(|s| s.table)
        .last();
    let table = match table {
        Some(254) => "table main".to_owned(),
        Some(t) => format!("table {t}"),
        None => "routing".to_owned(),
    };
    let mut mark = format!("reply mark {}", hex(reply_mark));
    let ct = request_ct.filter(|c| *c != 0 && c & !reply_mark != 0);
    if let Some(c) = ct {
        mark += &format!(" (the connection's ct mark {} was not restored)", hex(c));
        evidence.push(
            "to route replies like their requests, restore the mark on output: `meta mark set ct mark` in a `type route hook output` chain (or CONNMARK --restore-mark in mangle OUTPUT)".into(),
        );
    }
    // The kernel answers pings itself; its reply (like its ICMP errors and TCP resets) takes
    // the request's mark only with fwmark_reflect=1.
    let sysctls = &cx.state.sysctls;
    let reflect = if flow.ipv6() {
        sysctls.fwmark_reflect6
    } else {
        sysctls.fwmark_reflect
    };
    if flow.proto.starts_with("icmp") && reflect == 0 && request_mark != 0 {
        mark += &format!(
            " (fwmark_reflect=0: the kernel's echo reply does not take the request's mark {})",
            hex(request_mark)
        );
        evidence.push("fwmark_reflect=0: replies the kernel builds itself (ICMP echo replies and errors, TCP resets) carry no mark; with net.ipv4/ipv6.fwmark_reflect=1 they take the request's".into());
    }
    if flow.proto == "tcp" && sysctls.tcp_fwmark_accept == 0 && request_mark != 0 {
        evidence
            .push("tcp_fwmark_accept=0: accepted TCP sockets do not take the SYN's mark".into());
    }
    let rules = if missed.is_empty() {
        String::new()
    } else {
        format!(" → rule {} did not match", missed.join(", "))
    };
    Some((
        "reply-misrouted",
        format!("the reply left via {left}, not {arrived} where the request arrived: {mark}{rules} → {table} → {left}"),
    ))
}

/// Whether a verdict means the reply made it (into this namespace, or out of the server's).
pub fn healthy(verdict: &str) -> bool {
    matches!(verdict, "delivered" | "reply-sent")
}

pub fn judge(flow: &Flow, cx: &Context) -> Report {
    let request = packets(flow, Dir::Request);
    let reply = packets(flow, Dir::Reply);
    let request_mark = request.last().map_or(0, |s| s.mark);
    let reply_mark = reply.last().map_or(0, |s| s.mark);
    let mut evidence = Vec::new();

    for dir in [Dir::Request, Dir::Reply] {
        let lookups: Vec<String> = flow
            .path(dir)
            .filter(|s| s.kind == "route")
            .map(|s| {
                format!(
                    "table {} with mark {} → {}",
                    s.table.unwrap_or(0),
                    hex(s.mark),
                    s.route_result.as_deref().unwrap_or("?")
                )
            })
            .collect();
        if !lookups.is_empty() {
            evidence
                .push(format!("{dir:?} routing lookups: {}", lookups.join(", ")).to_lowercase());
        }
    }
    if let Some(last) = request.last() {
        evidence.push(format!(
            "request last seen at {} with mark {}",
            last.point,
            hex(last.mark)
        ));
    }
    let mark_diff = (request_mark != reply_mark).then(|| {
        let a = attribute(
            cx.registry,
            &Change {
                old: request_mark,
                new: reply_mark,
                ..Default::default()
            },
        );
        let mut owners: Vec<String> = a.owners.iter().map(|o| o.owner.clone()).collect();
        owners.dedup();
        evidence.push(format!(
            "request mark {} vs reply mark {}: bits {} differ (owners: {})",
            hex(request_mark),
            hex(reply_mark),
            hex(request_mark ^ reply_mark),
            if owners.is_empty() {
                "none registered".into()
            } else {
                owners.join(", ")
            }
        ));
        MarkDiff {
            request_mark: hex(request_mark),
            reply_mark: hex(reply_mark),
            bits: hex(request_mark ^ reply_mark),
            owners,
        }
    });
    let clobber = restore_clobber(&reply);
    if let Some((s, lost)) = clobber {
        evidence.push(format!(
            "connmark restore {}: reply mark {} -> {} (ct mark {}) lost bits {}",
            s.segment
                .as_deref()
                .map_or(String::new(), |g| format!("in {g}")),
            hex(s.old_mark),
            hex(s.mark),
            hex(s.ct_mark.unwrap_or(0)),
            hex(lost)
        ));
    }

    let mut report = Report {
        flow: flow.label(),
        verdict: "no-reply",
        summary: String::new(),
        evidence,
        last_reply_point: reply.last().map(|s| s.point.clone()),
        drop: None,
        mark_diff,
        request: flow.path(Dir::Request).cloned().collect(),
        reply: flow.path(Dir::Reply).cloned().collect(),
    };

    let drop_at = reply.iter().position(|s| s.kind == "drop");
    if drop_at.is_none() {
        if let Some(verdict) = server_side(flow, &request, &reply, cx, &mut report.evidence) {
            (report.verdict, report.summary) = verdict;
            return report;
        }
    }
    let Some(i) = drop_at else {
        let delivered = reply
            .iter()
            .any(|s| s.hook == Some("input") || s.kind == "consume");
        (report.verdict, report.summary) = match (reply.last(), delivered) {
            (None, _) => ("no-reply", format!(
                "the request left (last seen at {}, mark {}) and no reply came back to this namespace",
                request.last().map_or("?".into(), |s| s.point.clone()),
                hex(request_mark)
            )),
            (Some(last), true) => ("delivered", format!("the reply was delivered (last seen at {}, mark {})", last.point, hex(last.mark))),
            (Some(last), false) => ("reply-lost", format!("the reply was last seen at {} (mark {}) and then vanished", last.point, hex(last.mark))),
        };
        return report;
    };
    let dropped = reply[i];
    let before = i.checked_sub(1).map(|j| reply[j]);
    let reason = dropped.drop_reason.clone().unwrap_or_default();
    let chains: Vec<String> = before
        .and_then(|b| {
            let (hook, prio) = (b.hook?, b.priority?);
            let family = if flow.ipv6() { 10 } else { 2 };
            let here: Vec<&Chain> = cx
                .state
                .chains
                .iter()
                .filter(|c| {
                    crate::nodestate::nft::hook_name(c.hook) == hook
                        && c.covers(family)
                        && c.priority >= prio
                })
                .collect();
            let next = here.iter().map(|c| c.priority).min()?;
            Some(
                here.iter()
                    .filter(|c| c.priority == next)
                    .map(|c| c.label())
                    .collect(),
            )
        })
        .unwrap_or_default();
    report.drop = Some(DropInfo {
        reason: reason.clone(),
        after: before.map_or("?".into(), |b| b.point.clone()),
        hook: before.and_then(|b| b.hook),
        priority: before.and_then(|b| b.priority),
        chains: chains.clone(),
        rule: None,
    });
    let arrival = reply
        .iter()
        .find_map(|s| s.ifname.clone())
        .unwrap_or_else(|| "?".into());

    (report.verdict, report.summary) = match reason.as_str() {
        "IP_RPFILTER" => {
            let svm = cx.state.sysctls.src_valid_mark_of(&arrival);
            let used_mark = if svm { reply_mark } else { 0 };
            let missed: Vec<String> = cx
                .state
                .rules_for(request_mark)
                .into_iter()
                .filter(|r| r.fwmark.is_some() && !r.mark_matches(used_mark))
                .map(|r| format!("`{}`", r.describe()))
                .collect();
            let table = cx
                .state
                .rules_for(used_mark)
                .into_iter()
                .filter(|r| r.action == "lookup" && r.table != 255)
                .find_map(|r| {
                    let src: Ipv4Addr = flow.dst.parse().ok()?;
                    lookup(cx.state, r.table, src).map(|hit| (r.table, hit))
                });
            let path = match &table {
                Some((t, (prefix, oif))) => {
                    let dev = oif
                        .and_then(|i| (cx.ifname)(i))
                        .unwrap_or_else(|| "?".into());
                    format!(
                        "table {} → reverse path to {} via {dev} ({prefix}) ≠ arrival {arrival}",
                        if *t == 254 {
                            "main".into()
                        } else {
                            t.to_string()
                        },
                        flow.dst
                    )
                }
                None => format!("no route back to {} for mark {}", flow.dst, hex(used_mark)),
            };
            report.evidence.push(format!(
                "rp_filter={} on {arrival}, src_valid_mark={}",
                cx.state.sysctls.rp_filter_of(&arrival),
                u8::from(svm)
            ));
            let rules = if missed.is_empty() {
                "no fwmark rule applies".to_owned()
            } else {
                format!("rule {} did not match", missed.join(", "))
            };
            ("rp-filter", format!(
                "reply had mark {} (reverse-path check uses mark {}) → {rules} → {path}, rp_filter={}, src_valid_mark={} → IP_RPFILTER",
                hex(reply_mark), hex(used_mark), cx.state.sysctls.rp_filter_of(&arrival), u8::from(svm)
            ))
        }
        "NETFILTER_DROP" => {
            if let Some(d) = super::nftrace::for_flow(cx.nft_drops, &flow.src, &flow.dst) {
                let rule = format!("{}: {}", d.chain, d.rule);
                report
                    .evidence
                    .push(format!("nft trace: rule `{rule}` (verdict drop)"));
                if let Some(info) = report.drop.as_mut() {
                    info.rule = Some(rule);
                }
            }
            for c in &chains {
                let name = c.rsplit_once('@').map_or(c.as_str(), |(n, _)| n);
                for r in cx
                    .state
                    .mark_rules
                    .iter()
                    .filter(|r| r.chain == name && !r.writes)
                {
                    report
                        .evidence
                        .push(format!("mark-matching rule in {}: `{}`", r.chain, r.rule));
                }
            }
            let place = format!(
                "{} after priority {}{}",
                before.and_then(|b| b.hook).unwrap_or("?"),
                before
                    .and_then(|b| b.priority)
                    .map_or("?".into(), |p| p.to_string()),
                if chains.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", chains.join(", "))
                }
            );
            match clobber {
                Some((s, lost)) => ("connmark-restore-mask", format!(
                    "a connmark restore rewrote the reply's mark {} -> {} (ct mark {}), losing bits {}; the reply was then dropped by netfilter at {place}",
                    hex(s.old_mark), hex(s.mark), hex(s.ct_mark.unwrap_or(0)), hex(lost)
                )),
                None => ("netfilter-drop", format!("the reply (mark {}) was dropped by netfilter at {place} → NETFILTER_DROP", hex(reply_mark))),
            }
        }
        "XFRM_POLICY" => {
            let hits: Vec<String> = cx
                .state
                .xfrm
                .iter()
                .filter(|p| {
                    p.direction != "out" && p.action == "block" && p.mark_matches(reply_mark)
                })
                .map(|p| p.describe())
                .collect();
            for h in &hits {
                report.evidence.push(format!("matching: {h}"));
            }
            (
                "xfrm-policy",
                format!(
                    "the reply (mark {}) was refused by an xfrm policy{} → XFRM_POLICY",
                    hex(reply_mark),
                    hits.first().map_or(String::new(), |h| format!(": {h}"))
                ),
            )
        }
        // Past every netfilter hook, the stack found no socket: routing and marks did their job.
        "NO_SOCKET" if flow.proto.starts_with("icmp") => (
            "delivered",
            format!(
                "the reply reached this host's input path (mark {}); the kernel's own copy found no ping socket (NO_SOCKET), which is normal when ping reads from a raw socket: raw sockets receive a clone",
                hex(reply_mark)
            ),
        ),
        "NO_SOCKET" => (
            "no-socket",
            format!(
                "the reply reached this host (mark {}, after {}) but no socket was there to take it (NO_SOCKET): the application closed its socket or never bound this port; not a routing or mark problem",
                hex(reply_mark),
                before.map_or("?".into(), |b| b.point.clone())
            ),
        ),
        other => (
            "dropped",
            format!(
                "the reply (mark {}) was dropped after {}: {other}",
                hex(reply_mark),
                before.map_or("?".into(), |b| b.point.clone())
            ),
        ),
    };
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodestate::{
        netlink::{IpRule, Route, XfrmPolicy},
        nft::Writes,
        sysctl::Sysctls,
    };

    fn step(
        dir: Dir,
        kind: &'static str,
        point: &str,
        hook: Option<&'static str>,
        prio: Option<i32>,
        old: u32,
        mark: u32,
    ) -> Step {
        Step {
            time: String::new(),
            ts_ns: 0,
            dir,
            packet_id: 1,
            kind,
            point: point.into(),
            layer: "netfilter",
            hook,
            priority: prio,
            ifname: Some("a2".into()),
            mark,
            old_mark: old,
            ct_mark: None,
            ct_state: None,
            segment: None,
            chains: vec![],
            drop_reason: None,
            table: None,
            route_result: None,
            nat_tuple: None,
        }
    }

    fn flow(steps: Vec<Step>) -> Flow {
        Flow {
            proto: "udp".into(),
            src: "10.77.0.1".into(),
            sport: 40000,
            dst: "10.9.9.9".into(),
            dport: 7,
            steps,
            steps_dropped: 0,
        }
    }

    fn state() -> NodeState {
        NodeState {
            rules: vec![
                IpRule {
                    priority: 0,
                    fwmark: None,
                    fwmask: None,
                    invert: false,
                    table: 255,
                    action: "lookup".into(),
                    iif: None,
                    suppress_prefixlen: None,
                    ipv6: false,
                },
                IpRule {
                    priority: 1000,
                    fwmark: Some(0x4000),
                    fwmask: Some(0x4000),
                    invert: false,
                    table: 100,
                    action: "lookup".into(),
                    iif: None,
                    suppress_prefixlen: None,
                    ipv6: false,
                },
                IpRule {
                    priority: 32766,
                    fwmark: None,
                    fwmask: None,
                    invert: false,
                    table: 254,
                    action: "lookup".into(),
                    iif: None,
                    suppress_prefixlen: None,
                    ipv6: false,
                },
            ],
            routes: vec![
                Route {
                    table: 254,
                    destination: "10.9.9.9/32".into(),
                    gateway: None,
                    oif: Some(2),
                    kind: "unicast".into(),
                },
                Route {
                    table: 100,
                    destination: "10.9.9.9/32".into(),
                    gateway: None,
                    oif: Some(3),
                    kind: "unicast".into(),
                },
            ],
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
        let names = |i: u32| {
            Some(if i == 2 {
                "veth-a".to_string()
            } else {
                "a2".to_string()
            })
        };
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
        let mut drop = step(Dir::Reply, "drop", "tracepoint kfree_skb", None, None, 0, 0);
        drop.drop_reason = Some("IP_RPFILTER".into());
        let f = flow(vec![
            step(
                Dir::Request,
                "transition",
                "netfilter output ipv4 prio -149",
                Some("output"),
                Some(-149),
                0,
                0x4000,
            ),
            step(
                Dir::Reply,
                "observe",
                "netfilter prerouting ipv4 prio -2147483647",
                Some("prerouting"),
                Some(i32::MIN + 1),
                0,
                0,
            ),
            drop,
        ]);
        let r = judge_with(&f, &state(), &[]);
        assert_eq!(r.verdict, "rp-filter");
        assert!(
            r.summary
                .contains("`1000: fwmark 0x4000/0x4000 lookup 100` did not match"),
            "{}",
            r.summary
        );
        assert!(
            r.summary
                .contains("table main → reverse path to 10.9.9.9 via veth-a"),
            "{}",
            r.summary
        );
        assert!(
            r.summary.contains("≠ arrival a2")
                && r.summary.contains("rp_filter=1, src_valid_mark=0"),
            "{}",
            r.summary
        );
        assert_eq!(r.mark_diff.unwrap().bits, "0x4000");
    }

    #[test]
    fn netfilter_drop_names_the_band_and_a_restore_clobber() {
        let mut restore = step(
            Dir::Reply,
            "transition",
            "netfilter prerouting ipv4 prio -149",
            Some("prerouting"),
            Some(-149),
            0x100,
            0x4000,
        );
        restore.ct_mark = Some(0x4000);
        let input = step(
            Dir::Reply,
            "observe",
            "netfilter input ipv4 prio -2147483647",
            Some("input"),
            Some(i32::MIN + 1),
            0x4000,
            0x4000,
        );
        let mut drop = step(
            Dir::Reply,
            "drop",
            "tracepoint kfree_skb",
            None,
            None,
            0x4000,
            0x4000,
        );
        drop.drop_reason = Some("NETFILTER_DROP".into());
        let chains = vec![Chain {
            family: "inet".into(),
            table: "t".into(),
            name: "in".into(),
            hook: 1,
            priority: 0,
            mark_writers: vec![],
            writes: Writes::default(),
        }];
        let plain = flow(
            vec![input.clone(), drop.clone()]
                .into_iter()
                .map(|mut s| {
                    s.dir = Dir::Reply;
                    s
                })
                .collect(),
        );
        let r = judge_with(&plain, &state(), &chains);
        assert_eq!(r.verdict, "netfilter-drop");
        assert_eq!(
            r.drop.as_ref().unwrap().chains,
            vec!["inet t/in@0".to_string()]
        );
        let r = judge_with(&flow(vec![restore, input, drop]), &state(), &chains);
        assert_eq!(r.verdict, "connmark-restore-mask");
        assert!(r.summary.contains("losing bits 0x100"), "{}", r.summary);
    }

    #[test]
    fn xfrm_block_and_healthy_and_silent() {
        let mut s = state();
        s.xfrm = vec![XfrmPolicy {
            direction: "in".into(),
            action: "block".into(),
            src: "10.9.9.9/32".into(),
            dst: "10.77.0.1/32".into(),
            mark: 0,
            mask: 0x4000,
            priority: 0,
        }];
        let mut drop = step(Dir::Reply, "drop", "tracepoint kfree_skb", None, None, 0, 0);
        drop.drop_reason = Some("XFRM_POLICY".into());
        let r = judge_with(&flow(vec![drop]), &s, &[]);
        assert_eq!(r.verdict, "xfrm-policy");
        assert!(
            r.summary.contains("mark 0x0/0x4000 action block"),
            "{}",
            r.summary
        );

        let ok = flow(vec![step(
            Dir::Reply,
            "consume",
            "tracepoint consume_skb",
            None,
            None,
            0,
            0,
        )]);
        assert_eq!(judge_with(&ok, &s, &[]).verdict, "delivered");
        let silent = flow(vec![step(
            Dir::Request,
            "observe",
            "tc egress veth-a (last)",
            None,
            None,
            0,
            0,
        )]);
        assert_eq!(judge_with(&silent, &s, &[]).verdict, "no-reply");
    }

    #[test]
    fn server_side_reply_leaving_elsewhere_is_misrouted() {
        let point = |dir, hook, dev: &str, mark, ct| Step {
            hook: Some(hook),
            ifname: Some(dev.into()),
            ct_mark: ct,
            ..step(dir, "observe", hook, None, None, mark, mark)
        };
        let mut s = state();
        // The request's connection mark would have chosen table 100 for the reply.
        s.rules[1].fwmark = Some(0x10);
        s.rules[1].fwmask = Some(0x10);
        let route = Step {
            table: Some(254),
            route_result: Some("ok".into()),
            ..step(Dir::Reply, "route", "routing table 254", None, None, 0, 0)
        };
        let f = flow(vec![
            point(Dir::Request, "netif_receive_skb", "veth-b", 0, None),
            point(Dir::Request, "input", "veth-b", 0, Some(0x10)),
            // A UDP socket drops the conntrack reference before the skb is consumed.
            point(Dir::Request, "consume_skb", "veth-b", 0, None),
            route,
            point(Dir::Reply, "output", "b2", 0, Some(0x10)),
            point(Dir::Reply, "net_dev_queue", "b2", 0, Some(0x10)),
        ]);
        let r = judge_with(&f, &s, &[]);
        assert_eq!(r.verdict, "reply-misrouted");
        assert!(
            r.summary.contains("left via b2, not veth-b")
                && r.summary.contains("ct mark 0x10 was not restored")
                && r.summary.contains("lookup 100` did not match")
                && r.summary.contains("table main"),
            "{}",
            r.summary
        );
        // Leaving where it came in: healthy.
        let mut same = f.clone();
        for st in &mut same.steps {
            st.ifname = Some("veth-b".into());
        }
        let r = judge_with(&same, &s, &[]);
        assert_eq!(r.verdict, "reply-sent");
        assert!(healthy(r.verdict));
    }

    #[test]
    fn no_socket_after_input_is_not_a_mark_problem() {
        let mut drop = step(Dir::Reply, "drop", "tracepoint kfree_skb", None, None, 0, 0);
        drop.drop_reason = Some("NO_SOCKET".into());
        let input = step(
            Dir::Reply,
            "observe",
            "netfilter input ipv4 prio 2147483646",
            Some("input"),
            Some(i32::MAX - 1),
            0,
            0,
        );
        let mut f = flow(vec![input, drop]);
        let r = judge_with(&f, &state(), &[]);
        assert_eq!(r.verdict, "no-socket", "{}", r.summary);
        // ping reads replies from a raw socket (a clone); the original finds no ping socket.
        f.proto = "icmp".into();
        let r = judge_with(&f, &state(), &[]);
        assert_eq!(r.verdict, "delivered", "{}", r.summary);
        assert!(r.summary.contains("raw sockets receive a clone"));
    }
}
