//! `why`'s words and JSON: each cause's summary sentence, each piece of evidence, both paths
//! step by step, and the JSON document (`schema/why.schema.json`).
use std::fmt::{self, Write as _};

use serde::{Serialize, Serializer};

use crate::{
    clock::Timestamp,
    event::{CtState, EventKind, XfrmRef},
    flows::{Dir, Step},
    mark::Mark,
    nodestate::{
        netlink::{XfrmPolicy, XfrmProto, XfrmState, XfrmTemplate, TABLE_MAIN},
        pods::{Container, ContainerJson},
        NodeState, Snapshot,
    },
    output::text::{list, or_unknown},
    place::{Hook, Layer},
    why::verdict::{
        Cause, DropPlace, Evidence, Report, RestoreClobber, ReversePath, Verdict, XfrmEncap,
    },
};

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::RpFilter => "rp-filter",
            Verdict::NetfilterDrop => "netfilter-drop",
            Verdict::ConnmarkRestoreMask => "connmark-restore-mask",
            Verdict::XfrmPolicy => "xfrm-policy",
            Verdict::NoSocket => "no-socket",
            Verdict::Dropped => "dropped",
            Verdict::NoReply => "no-reply",
            Verdict::ReplyLost => "reply-lost",
            Verdict::ReplyMisrouted => "reply-misrouted",
            Verdict::Inconclusive => "inconclusive",
            Verdict::Delivered => "delivered",
            Verdict::ReplySent => "reply-sent",
        })
    }
}

impl fmt::Display for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dir::Request => "request",
            Dir::Reply => "reply",
        })
    }
}

/// "netfilter output ipv4 prio -149 veth-a", "routing table 100 (ok)": a step's point.
pub(crate) struct StepLabel<'a>(pub(crate) &'a Step);

impl fmt::Display for StepLabel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        if let Some(r) = &s.route {
            return write!(f, "routing table {} ({})", r.table, r.result);
        }
        let at = &s.at;
        write!(f, "{} ", at.layer)?;
        if let Some(h) = at.hook {
            write!(f, "{h}")?;
        }
        if let Some(fam) = at.family {
            write!(f, " {fam}")?;
        }
        if let Some(p) = at.priority {
            write!(f, " prio {p}")?;
        }
        if let Some(p) = at.position {
            write!(f, " ({p})")?;
        }
        if let Some(i) = &at.ifname {
            write!(f, " {i}")?;
        }
        Ok(())
    }
}

fn label(step: Option<&Step>) -> String {
    or_unknown(step.map(StepLabel))
}

fn table_name(t: u32) -> String {
    if t == TABLE_MAIN {
        "main".into()
    } else {
        t.to_string()
    }
}

/// `a`, `b` as code spans, or what to say when there are none.
fn rules(rules: &[crate::nodestate::netlink::IpRule]) -> String {
    rules
        .iter()
        .map(|r| format!("`{r}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `: owner, owner` after some bits, or nothing when they are nobody's.
fn owners(owners: &[String]) -> String {
    if owners.is_empty() {
        String::new()
    } else {
        format!(": {}", owners.join(", "))
    }
}

/// "output after priority -149 (inet t/out@0)".
impl fmt::Display for DropPlace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (hook, prio) = (or_unknown(self.hook), or_unknown(self.priority));
        write!(f, "{hook} after priority {prio}")?;
        if !self.chains.is_empty() {
            write!(f, " ({})", list(&self.chains))?;
        }
        Ok(())
    }
}

/// "proto esp (reqid 1, mode tunnel, 10.0.0.2 → 10.0.0.1)": what a template requires.
fn requirement(t: &XfrmTemplate) -> String {
    let mut what = Vec::new();
    if t.spi != 0 {
        what.push(format!("spi {:#x}", t.spi));
    }
    if t.reqid != 0 {
        what.push(format!("reqid {}", t.reqid));
    }
    what.push(format!("mode {}", t.mode));
    if !(t.src.is_unspecified() && t.dst.is_unspecified()) {
        what.push(format!("{} → {}", t.src, t.dst));
    }
    format!("proto {} ({})", XfrmProto(t.proto), what.join(", "))
}

/// "`p`, `q`": policies as code spans.
fn policies(ps: &[XfrmPolicy]) -> String {
    ps.iter()
        .map(|p| format!("`{p}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The request's way into the tunnel, for a reply that came back outside it.
fn request_tunnel(tunnel: Option<&XfrmEncap>, mark: Mark, outbound: &[XfrmPolicy]) -> String {
    let by = if outbound.is_empty() {
        format!("no outbound policy with a template selects its mark {mark}")
    } else {
        format!("its mark {mark} selected {}", policies(outbound))
    };
    let Some(t) = tunnel else {
        return if outbound.is_empty() {
            "; the request's path shows no tunnel either".into()
        } else {
            format!("; {by}, but the request's path shows no encapsulation")
        };
    };
    let sa = match (&t.state, t.spi) {
        (Some(sa), _) => format!(
            "state spi {:#x} {} → {} reqid {} mode {}",
            sa.spi, sa.src, sa.dst, sa.reqid, sa.mode
        ),
        (None, Some(spi)) => format!("spi {spi:#x} (no state with that SPI was read)"),
        (None, None) => "a state whose SPI was not seen".into(),
    };
    format!(
        "; the request went into the tunnel by {sa} (seen at {}): {by}",
        StepLabel(&t.step)
    )
}

/// The verdict's one-line summary.
pub(crate) fn summary(r: &Report) -> String {
    let peer = r.flow.dst;
    match &r.cause {
        Cause::NoReply { last_request } => format!(
            "the request left (last seen at {}, mark {}) and no reply came back to this namespace",
            label(last_request.as_ref()),
            last_request.as_ref().map_or(Mark::ZERO, |s| s.mark)
        ),
        Cause::Delivered { last } => format!(
            "the reply was delivered (last seen at {}, mark {})",
            StepLabel(last),
            last.mark
        ),
        Cause::ReplyLost { last } => format!(
            "the reply was last seen at {} (mark {}) and then vanished",
            StepLabel(last),
            last.mark
        ),
        Cause::RpFilter {
            reply_mark,
            used_mark,
            missed,
            path,
            arrival,
            rp_filter,
            src_valid_mark,
        } => {
            let rules = if missed.is_empty() {
                "no fwmark rule applies".to_owned()
            } else {
                format!("rule {} did not match", rules(missed))
            };
            let path = match path {
                ReversePath::Elsewhere { table, prefix, dev } => format!(
                    "table {} → reverse path to {peer} via {} ({prefix}) ≠ arrival {arrival}",
                    table_name(*table),
                    dev.as_deref().unwrap_or("?")
                ),
                ReversePath::None => format!("no route back to {peer} for mark {used_mark}"),
            };
            format!(
                "reply had mark {reply_mark} (reverse-path check uses mark {used_mark}) → {rules} → {path}, rp_filter={rp_filter}, src_valid_mark={} → IP_RPFILTER",
                u8::from(*src_valid_mark)
            )
        }
        Cause::NetfilterDrop {
            reply_mark,
            place,
            rule,
        } => {
            let by = rule.as_ref().map_or(String::new(), |r| {
                format!(
                    " by `{}` in {}, which tests bits {}{} and the reply's mark passed",
                    r.rule,
                    r.chain,
                    r.bits,
                    owners(&r.owners)
                )
            });
            format!(
                "the reply (mark {reply_mark}) was dropped by netfilter at {place}{by} → NETFILTER_DROP"
            )
        }
        Cause::ConnmarkRestoreMask { place } => match &r.restore_clobber {
            Some(RestoreClobber { restore, lost }) => format!(
                "a connmark restore rewrote the reply's mark {} -> {} (ct mark {}), losing bits {lost}; the reply was then dropped by netfilter at {place}",
                restore.old_mark,
                restore.mark,
                restore.ct_mark.unwrap_or_default()
            ),
            None => format!("the reply was dropped by netfilter at {place}"),
        },
        Cause::XfrmPolicy { reply_mark, policy } => format!(
            "the reply (mark {reply_mark}) was refused by an xfrm policy{} → XFRM_POLICY",
            policy.as_ref().map_or(String::new(), |p| format!(": {p}"))
        ),
        Cause::XfrmOutsideTunnel {
            reply_mark,
            policy,
            request_tunnel: tunnel,
            request_mark,
            outbound,
        } => {
            let required: Vec<String> = policy.required().map(requirement).collect();
            format!(
                "the reply (mark {reply_mark}) came back outside the IPsec tunnel (no decryption step on its path) and the inbound policy `{policy}` requires {} → XFRM_POLICY{}",
                required.join(" then "),
                request_tunnel(tunnel.as_ref(), *request_mark, outbound)
            )
        }
        Cause::IcmpDelivered { reply_mark } => format!(
            "the reply reached this host's input path (mark {reply_mark}); the kernel's own copy found no ping socket (NO_SOCKET), which is normal when ping reads from a raw socket: raw sockets receive a clone"
        ),
        Cause::NoSocket { reply_mark, after } => format!(
            "the reply reached this host (mark {reply_mark}, after {}) but no socket was there to take it (NO_SOCKET): the application closed its socket or never bound this port; not a routing or mark problem",
            label(after.as_ref())
        ),
        Cause::Dropped {
            reply_mark,
            after,
            reason,
        } => format!(
            "the reply (mark {reply_mark}) was dropped after {}: {reason}",
            label(after.as_ref())
        ),
        Cause::ReplySent { left, reply_mark } => format!(
            "the reply left via {left} (mark {reply_mark}), where the request arrived"
        ),
        Cause::Inconclusive { lost, seen } => format!(
            "inconclusive: {lost} events were lost while watching, so the reply's may be among them; what was seen: {}",
            summary(&Report {
                cause: (**seen).clone(),
                ..r.clone()
            })
        ),
        Cause::ReplyMisrouted {
            left,
            arrived,
            reply_mark,
            unrestored_ct,
            unreflected,
            missed,
            table,
        } => {
            let mut mark = format!("reply mark {reply_mark}");
            if let Some(c) = unrestored_ct {
                let _ = write!(mark, " (the connection's ct mark {c} was not restored)");
            }
            if let Some(m) = unreflected {
                let _ = write!(
                    mark,
                    " (fwmark_reflect=0: the kernel's echo reply does not take the request's mark {m})"
                );
            }
            let rules = if missed.is_empty() {
                String::new()
            } else {
                format!(" → rule {} did not match", rules(missed))
            };
            let table = table.map_or("routing".into(), |t| format!("table {}", table_name(t)));
            format!(
                "the reply left via {left}, not {arrived} where the request arrived: {mark}{rules} → {table} → {left}"
            )
        }
    }
}

/// A report's evidence, line by line.
pub(crate) fn evidence(r: &Report) -> Vec<String> {
    r.evidence
        .iter()
        .filter_map(|e| {
            let mut line = String::new();
            write_evidence(&mut line, e, r).ok()?;
            Some(line)
        })
        .collect()
}

/// One piece of evidence in words; the facts the report holds elsewhere (its mark diff, its
/// cause's sysctls) are read there. An error when the report lacks them.
fn write_evidence(f: &mut String, e: &Evidence, r: &Report) -> fmt::Result {
    match e {
            Evidence::Lookups { dir, lookups } => {
                let list: Vec<String> = lookups
                    .iter()
                    .map(|(t, m, res)| format!("table {t} with mark {m} → {res}"))
                    .collect();
                write!(f, "{dir} routing lookups: {}", list.join(", "))
            }
            Evidence::RequestLastSeen => {
                let s = r.request.iter().rev().find(|s| !s.is_route()).ok_or(fmt::Error)?;
                write!(
                    f,
                    "request last seen at {} with mark {}",
                    StepLabel(s),
                    s.mark
                )
            }
            Evidence::MarkDiff => {
                let d = r.mark_diff.as_ref().ok_or(fmt::Error)?;
                write!(
                f,
                "request mark {} vs reply mark {}: bits {} differ (owners: {})",
                d.request,
                d.reply,
                d.request ^ d.reply,
                if d.owners.is_empty() {
                    "none registered".into()
                } else {
                    d.owners.join(", ")
                }
            )
            }
            Evidence::ConnmarkRestore => {
                let RestoreClobber { restore, lost } =
                    r.restore_clobber.as_ref().ok_or(fmt::Error)?;
                write!(
                    f,
                    "connmark restore {}: reply mark {} -> {} (ct mark {}) lost bits {lost}",
                    restore
                        .segment
                        .as_ref()
                        .map_or(String::new(), |g| format!("in {g}")),
                    restore.old_mark,
                    restore.mark,
                    restore.ct_mark.unwrap_or_default()
                )
            }
            Evidence::NftTraceRule => {
                let rule = r.drop.as_ref().and_then(|d| d.rule.as_ref()).ok_or(fmt::Error)?;
                write!(f, "nft trace: rule `{rule}` (verdict drop)")
            }
            Evidence::DroppingRule(r) => {
                let tests: Vec<String> = r.tests.iter().map(|t| t.as_test().to_string()).collect();
                write!(
                    f,
                    "dropping rule in {}: `{}` tests {} (bits {}{}); the reply's mark {} it",
                    r.chain,
                    r.rule,
                    tests.join(" and "),
                    r.bits,
                    owners(&r.owners),
                    if r.matched { "passed" } else { "did not pass" }
                )
            }
            Evidence::XfrmMatching(p) => write!(f, "matching: {p}"),
            Evidence::RpFilterSysctls => {
                let Cause::RpFilter {
                    arrival,
                    rp_filter,
                    src_valid_mark,
                    ..
                } = &r.cause
                else {
                    return Err(fmt::Error);
                };
                write!(
                    f,
                    "rp_filter={rp_filter} on {arrival}, src_valid_mark={}",
                    u8::from(*src_valid_mark)
                )
            }
            Evidence::RestoreOnOutputHint => f.write_str(
                "to route replies like their requests, restore the mark on output: `meta mark set ct mark` in a `type route hook output` chain (or CONNMARK --restore-mark in mangle OUTPUT)",
            ),
            Evidence::FwmarkReflectOff => f.write_str(
                "fwmark_reflect=0: replies the kernel builds itself (ICMP echo replies and errors, TCP resets) carry no mark; with net.ipv4/ipv6.fwmark_reflect=1 they take the request's",
            ),
            Evidence::TcpFwmarkAcceptOff => {
                f.write_str("tcp_fwmark_accept=0: accepted TCP sockets do not take the SYN's mark")
            }
            Evidence::NodeChanged {
                time,
                changes,
                before_last_packet,
            } => write!(
                f,
                "node state changed at {time} ({}), {} the flow's last packet; the verdict uses the state in force then",
                list(changes),
                if *before_last_packet { "before" } else { "after" }
            ),
        }
}

/// A step as JSON.
struct StepJson<'a>(&'a Step);

impl Serialize for StepJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Json<'a> {
            time: Timestamp,
            dir: String,
            packet_id: u64,
            kind: EventKind,
            point: String,
            layer: Layer,
            #[serde(skip_serializing_if = "Option::is_none")]
            hook: Option<Hook>,
            #[serde(skip_serializing_if = "Option::is_none")]
            priority: Option<i32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            ifname: Option<&'a String>,
            mark: Mark,
            old_mark: Mark,
            #[serde(skip_serializing_if = "Option::is_none")]
            ct_mark: Option<Mark>,
            #[serde(skip_serializing_if = "Option::is_none")]
            ct_state: Option<CtState>,
            #[serde(skip_serializing_if = "Option::is_none")]
            segment: Option<String>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            chains: Vec<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            drop_reason: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            table: Option<u32>,
            #[serde(skip_serializing_if = "Option::is_none")]
            route_result: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            nat_tuple: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            decrypted_by: Option<&'a XfrmRef>,
        }
        let st = self.0;
        Json {
            time: st.time,
            dir: st.dir.to_string(),
            packet_id: st.packet_id,
            kind: st.kind,
            point: StepLabel(st).to_string(),
            layer: st.at.layer,
            hook: st.at.hook,
            priority: st.at.priority,
            ifname: st.at.ifname.as_ref(),
            mark: st.mark,
            old_mark: st.old_mark,
            ct_mark: st.ct_mark,
            ct_state: st.ct_state,
            segment: st.segment.as_ref().map(|g| g.to_string()),
            chains: st
                .segment
                .iter()
                .flat_map(|g| g.chains())
                .map(ToString::to_string)
                .collect(),
            drop_reason: st.drop_reason.as_ref().map(ToString::to_string),
            table: st.route.map(|r| r.table),
            route_result: st.route.map(|r| r.result.to_string()),
            nat_tuple: st.nat_tuple.map(|t| t.to_string()),
            decrypted_by: st.decrypted_by.as_ref(),
        }
        .serialize(s)
    }
}

/// An xfrm policy as JSON: its fields and `ip xfrm`'s words.
#[derive(Serialize)]
struct PolicyJson<'a> {
    text: String,
    #[serde(flatten)]
    policy: &'a XfrmPolicy,
}

impl<'a> PolicyJson<'a> {
    fn of(policy: &'a XfrmPolicy) -> Self {
        PolicyJson {
            text: policy.to_string(),
            policy,
        }
    }
}

/// Where the request went into the tunnel.
#[derive(Serialize)]
struct TunnelEntryJson<'a> {
    point: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    spi: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state: Option<&'a XfrmState>,
}

/// A reply that came back outside the IPsec tunnel (`xfrm` in a report).
#[derive(Serialize)]
struct XfrmJson<'a> {
    /// Whether the reply's path shows a decryption step: false, or it would not be here.
    reply_decrypted: bool,
    inbound_policy: PolicyJson<'a>,
    /// The inbound policy's templates the reply cannot do without.
    required: Vec<&'a XfrmTemplate>,
    request_mark: Mark,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_tunnel: Option<TunnelEntryJson<'a>>,
    outbound_policies: Vec<PolicyJson<'a>>,
}

impl<'a> XfrmJson<'a> {
    fn of(cause: &'a Cause) -> Option<Self> {
        let Cause::XfrmOutsideTunnel {
            policy,
            request_tunnel,
            request_mark,
            outbound,
            ..
        } = cause
        else {
            return None;
        };
        Some(XfrmJson {
            reply_decrypted: false,
            inbound_policy: PolicyJson::of(policy),
            required: policy.required().collect(),
            request_mark: *request_mark,
            request_tunnel: request_tunnel.as_ref().map(|t| TunnelEntryJson {
                point: StepLabel(&t.step).to_string(),
                spi: t.spi.map(|s| format!("{s:#x}")),
                state: t.state.as_ref(),
            }),
            outbound_policies: outbound.iter().map(PolicyJson::of).collect(),
        })
    }
}

/// The pod (or container) of the flow's namespace: that of its first step seen.
fn pod_of(r: &Report) -> Option<&Container> {
    r.request
        .iter()
        .chain(&r.reply)
        .find_map(|s| s.at.pod.as_deref())
}

/// A report as JSON.
pub(crate) struct ReportJson<'a>(pub(crate) &'a Report);

impl Serialize for ReportJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Drop {
            reason: String,
            after: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            hook: Option<Hook>,
            #[serde(skip_serializing_if = "Option::is_none")]
            priority: Option<i32>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            chains: Vec<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            rule: Option<String>,
        }
        #[derive(Serialize)]
        struct MarkDiff {
            request_mark: Mark,
            reply_mark: Mark,
            bits: Mark,
            owners: Vec<String>,
        }
        #[derive(Serialize)]
        struct Json<'a> {
            flow: String,
            /// The pod (or container) of the flow's namespace.
            #[serde(skip_serializing_if = "Option::is_none")]
            pod: Option<ContainerJson<'a>>,
            verdict: String,
            summary: String,
            evidence: Vec<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            last_reply_point: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            drop: Option<Drop>,
            #[serde(skip_serializing_if = "Option::is_none")]
            mark_diff: Option<MarkDiff>,
            #[serde(skip_serializing_if = "Option::is_none")]
            xfrm: Option<XfrmJson<'a>>,
            request: Vec<StepJson<'a>>,
            reply: Vec<StepJson<'a>>,
        }
        let r = self.0;
        Json {
            flow: r.flow.to_string(),
            pod: pod_of(r).map(ContainerJson),
            verdict: r.cause.verdict().to_string(),
            summary: summary(r),
            evidence: evidence(r),
            last_reply_point: r.last_reply.as_ref().map(|s| StepLabel(s).to_string()),
            drop: r.drop.as_ref().map(|d| Drop {
                reason: d.reason.to_string(),
                after: label(d.after.as_ref()),
                hook: d.place.hook,
                priority: d.place.priority,
                chains: d.place.chains.iter().map(ToString::to_string).collect(),
                rule: d.rule.clone(),
            }),
            mark_diff: r.mark_diff.as_ref().map(|d| MarkDiff {
                request_mark: d.request,
                reply_mark: d.reply,
                bits: d.request ^ d.reply,
                owners: d.owners.clone(),
            }),
            xfrm: XfrmJson::of(&r.cause),
            request: r.request.iter().map(StepJson).collect(),
            reply: r.reply.iter().map(StepJson).collect(),
        }
        .serialize(s)
    }
}

/// `why --json`: the reports, with the node state they reasoned with.
#[derive(Serialize)]
pub(crate) struct WhyDocument<'a> {
    pub(crate) flows: Vec<ReportJson<'a>>,
    pub(crate) flows_seen: usize,
    pub(crate) flows_evicted: u64,
    /// The state at the end of the watch.
    pub(crate) node: &'a NodeState,
    /// Changes to it while watching (each verdict used the state in force at its flow's end).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub(crate) node_changes: &'a [Snapshot],
}

/// `why`'s text: each reported flow with its verdict, evidence and both paths.
pub(crate) fn text(reports: &[Report], seen: usize) -> String {
    let mut s = String::new();
    if seen == 0 {
        s += "no matching flow was seen\n";
    } else if reports.is_empty() {
        let _ = writeln!(
            s,
            "{seen} matching flow(s), every reply delivered (--all shows them)"
        );
    }
    for r in reports {
        let pod = pod_of(r).map_or(String::new(), |p| format!(" ({p})"));
        let _ = write!(
            s,
            "\n== {}{pod}\nverdict: {} — {}\n",
            r.flow,
            r.cause.verdict(),
            summary(r)
        );
        for e in evidence(r) {
            let _ = writeln!(s, "  evidence: {e}");
        }
        for (name, path) in [("request", &r.request), ("reply", &r.reply)] {
            let _ = writeln!(s, "  {name} path:");
            if path.is_empty() {
                s += "    (nothing seen)\n";
            }
            for st in path.iter() {
                let ct = st.ct_mark.map_or(String::new(), |c| format!(" ct {c}"));
                let extra = st
                    .drop_reason
                    .as_ref()
                    .map_or(String::new(), |r| format!(" DROP {r}"));
                let _ = writeln!(
                    s,
                    "    {:<52} mark {}{ct}{extra}",
                    StepLabel(st).to_string(),
                    st.mark
                );
            }
        }
    }
    s
}
