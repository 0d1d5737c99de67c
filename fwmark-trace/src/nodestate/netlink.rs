//! Routing, tc and xfrm state over netlink: `ip rule`s (fwmark/mask → table), the routes of every
//! table a rule names, the qdiscs classic tc filters hang on, and xfrm policies with their
//! marks. One generic dump per message family.
use std::{collections::HashMap, net::IpAddr};

use anyhow::{bail, Context, Result};
use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    route::{RouteAddress, RouteAttribute, RouteMessage},
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_packet_xfrm::{policy::DelGetMessage, XfrmAttrs, XfrmMessage};
use netlink_sys::{protocols, Socket, SocketAddr};
use serde::Serialize;

/// Sends one dump request and collects every reply message until NLMSG_DONE.
pub(crate) fn dump<T>(protocol: isize, request: T) -> Result<Vec<T>>
where
    T: NetlinkSerializable + NetlinkDeserializable + std::fmt::Debug,
{
    let mut socket = Socket::new(protocol).context("opening a netlink socket")?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut out = Vec::new();
    let mut rx = vec![0u8; 1 << 16];
    loop {
        let n = socket.recv(&mut &mut rx[..], 0)?;
        let mut off = 0;
        while off < n {
            let reply = NetlinkMessage::<T>::deserialize(&rx[off..n])
                .map_err(|e| anyhow::anyhow!("decoding a netlink reply: {e}"))?;
            let len = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => bail!("netlink error: {e:?}"),
                NetlinkPayload::InnerMessage(m) => out.push(m),
                _ => {}
            }
            if len == 0 {
                break;
            }
            off += len;
        }
    }
}

/// An `ip rule`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct IpRule {
    pub priority: u32,
    pub fwmark: Option<u32>,
    pub fwmask: Option<u32>,
    /// `not fwmark …`.
    pub invert: bool,
    pub table: u32,
    /// "lookup" (to_tbl), "blackhole", "unreachable", "prohibit", "goto", …
    pub action: String,
    pub iif: Option<String>,
    pub suppress_prefixlen: Option<u32>,
    pub ipv6: bool,
}

impl IpRule {
    /// Whether a packet with `mark` takes this rule's fwmark test (rules without one always do).
    pub fn mark_matches(&self, mark: u32) -> bool {
        let hit = match self.fwmark {
            Some(v) => mark & self.fwmask.unwrap_or(u32::MAX) == v,
            None => true,
        };
        hit != self.invert
    }

    pub fn describe(&self) -> String {
        let mut s = format!("{}:", self.priority);
        if self.invert {
            s += " not";
        }
        if let Some(v) = self.fwmark {
            s += &format!(" fwmark {v:#x}");
            if let Some(m) = self.fwmask.filter(|m| *m != u32::MAX) {
                s += &format!("/{m:#x}");
            }
        }
        if let Some(i) = &self.iif {
            s += &format!(" iif {i}");
        }
        if self.action == "lookup" {
            s += &format!(" lookup {}", self.table);
        } else {
            s += &format!(" {}", self.action);
        }
        if let Some(p) = self.suppress_prefixlen {
            s += &format!(" suppress_prefixlength {p}");
        }
        s
    }
}

/// A route of one table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Route {
    pub table: u32,
    pub destination: String,
    pub gateway: Option<String>,
    pub oif: Option<u32>,
    pub kind: String,
}

/// An xfrm policy with its mark selector.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct XfrmPolicy {
    /// in, out, fwd.
    pub direction: String,
    /// allow, block.
    pub action: String,
    pub src: String,
    pub dst: String,
    pub mark: u32,
    pub mask: u32,
    pub priority: u32,
}

impl XfrmPolicy {
    pub fn mark_matches(&self, mark: u32) -> bool {
        mark & self.mask == self.mark
    }

    pub fn describe(&self) -> String {
        format!(
            "xfrm policy dir {} src {} dst {} mark {:#x}/{:#x} action {}",
            self.direction, self.src, self.dst, self.mark, self.mask, self.action
        )
    }
}

fn addr(a: &RouteAddress) -> Option<String> {
    match a {
        RouteAddress::Inet(v) => Some(v.to_string()),
        RouteAddress::Inet6(v) => Some(v.to_string()),
        _ => None,
    }
}

pub fn rules() -> Result<Vec<IpRule>> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut req = RuleMessage::default();
        req.header.family = family;
        for m in dump(protocols::NETLINK_ROUTE, RouteNetlinkMessage::GetRule(req))? {
            let RouteNetlinkMessage::NewRule(r) = m else {
                continue;
            };
            let mut rule = IpRule {
                priority: 0,
                fwmark: None,
                fwmask: None,
                invert: r.header.flags.contains(RuleFlags::Invert),
                table: r.header.table as u32,
                action: match r.header.action {
                    RuleAction::ToTable => "lookup".into(),
                    other => format!("{other:?}").to_lowercase(),
                },
                iif: None,
                suppress_prefixlen: None,
                ipv6: family == AddressFamily::Inet6,
            };
            for a in &r.attributes {
                match a {
                    RuleAttribute::Priority(p) => rule.priority = *p,
                    RuleAttribute::FwMark(v) => rule.fwmark = Some(*v),
                    RuleAttribute::FwMask(v) => rule.fwmask = Some(*v),
                    RuleAttribute::Table(t) => rule.table = *t,
                    RuleAttribute::Iifname(i) => rule.iif = Some(i.clone()),
                    RuleAttribute::SuppressPrefixLen(p) if *p != u32::MAX => {
                        rule.suppress_prefixlen = Some(*p)
                    }
                    _ => {}
                }
            }
            out.push(rule);
        }
    }
    out.sort_by_key(|r| (r.ipv6, r.priority));
    Ok(out)
}

/// Routes of every table (IPv4 and IPv6).
pub fn routes() -> Result<Vec<Route>> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        for m in dump(protocols::NETLINK_ROUTE, RouteNetlinkMessage::GetRoute(req))? {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            let mut route = Route {
                table: r.header.table as u32,
                destination: "default".into(),
                gateway: None,
                oif: None,
                kind: format!("{:?}", r.header.kind).to_lowercase(),
            };
            for a in &r.attributes {
                match a {
                    RouteAttribute::Table(t) => route.table = *t,
                    RouteAttribute::Destination(d) => {
                        if let Some(d) = addr(d) {
                            route.destination =
                                format!("{d}/{}", r.header.destination_prefix_length);
                        }
                    }
                    RouteAttribute::Gateway(g) => route.gateway = addr(g),
                    RouteAttribute::Oif(i) => route.oif = Some(*i),
                    _ => {}
                }
            }
            out.push(route);
        }
    }
    Ok(out)
}

/// A qdisc that classic tc filters (cls_bpf, u32, …) attach to; they run after the tcx chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcQdisc {
    Clsact,
    Ingress,
}

impl std::fmt::Display for TcQdisc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TcQdisc::Clsact => "clsact",
            TcQdisc::Ingress => "ingress",
        })
    }
}

/// The clsact/ingress qdiscs of the namespace by ifindex: one dump for every interface.
pub fn tc_qdiscs() -> Result<HashMap<u32, TcQdisc>> {
    let mut out = HashMap::new();
    let req = RouteNetlinkMessage::GetQueueDiscipline(TcMessage::default());
    for m in dump(protocols::NETLINK_ROUTE, req)? {
        let RouteNetlinkMessage::NewQueueDiscipline(q) = m else {
            continue;
        };
        let kind = q.attributes.iter().find_map(|a| match a {
            TcAttribute::Kind(k) if k == "clsact" => Some(TcQdisc::Clsact),
            TcAttribute::Kind(k) if k == "ingress" => Some(TcQdisc::Ingress),
            _ => None,
        });
        if let Some(kind) = kind {
            out.insert(q.header.index as u32, kind);
        }
    }
    Ok(out)
}

/// A classic filter of a clsact qdisc (`tc filter show dev D ingress|egress`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcFilter {
    pub priority: u16,
    /// `bpf`, `u32`, `matchall`, `flower`, …
    pub kind: String,
    /// A cls_bpf filter's program: its name (as the attacher gave it) and id.
    pub program: Option<(String, u32)>,
}

/// The filters of `ifindex`'s clsact qdisc in one direction, in the order they run.
pub fn tc_filters(ifindex: u32, egress: bool) -> Result<Vec<TcFilter>> {
    let mut req = TcMessage::default();
    req.header.index = ifindex as i32;
    // TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS / TC_H_MIN_EGRESS) (include/uapi/linux/pkt_sched.h).
    req.header.parent = TcHandle {
        major: 0xffff,
        minor: if egress { 0xfff3 } else { 0xfff2 },
    };
    let mut out = Vec::new();
    for m in dump(
        protocols::NETLINK_ROUTE,
        RouteNetlinkMessage::GetTrafficFilter(req),
    )? {
        let RouteNetlinkMessage::NewTrafficFilter(f) = m else {
            continue;
        };
        // Each classifier instance comes first without a handle: not a filter.
        if f.header.handle == TcHandle::default() {
            continue;
        }
        let mut filter = TcFilter {
            priority: (f.header.info >> 16) as u16,
            kind: String::new(),
            program: None,
        };
        let (mut name, mut id) = (None, 0);
        for a in &f.attributes {
            match a {
                TcAttribute::Kind(k) => filter.kind = k.clone(),
                TcAttribute::Options(opts) => {
                    for o in opts {
                        match o {
                            TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => name = Some(n.clone()),
                            TcOption::Bpf(TcFilterBpfOption::ProgId(i)) => id = *i,
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        filter.program = name.map(|n| (n, id));
        out.push(filter);
    }
    out.sort_by_key(|f| f.priority);
    Ok(out)
}

pub fn xfrm_policies() -> Result<Vec<XfrmPolicy>> {
    let mut out = Vec::new();
    for m in dump(
        protocols::NETLINK_XFRM,
        XfrmMessage::GetPolicy(DelGetMessage::default()),
    )? {
        let XfrmMessage::AddPolicy(p) = m else {
            continue;
        };
        let info = &p.user_policy_info;
        let sel = &info.selector;
        let ip = |a: &netlink_packet_xfrm::Address, len: u8| -> String {
            let ip: IpAddr = if sel.family == 10 {
                a.to_ipv6().into()
            } else {
                a.to_ipv4().into()
            };
            format!("{ip}/{len}")
        };
        let (mut mark, mut mask) = (0, 0);
        for a in &p.nlas {
            if let XfrmAttrs::Mark(m) = a {
                (mark, mask) = (m.value, m.mask);
            }
        }
        out.push(XfrmPolicy {
            direction: ["in", "out", "fwd"]
                .get(info.direction as usize)
                .unwrap_or(&"?")
                .to_string(),
            action: if info.action == 1 {
                "block".into()
            } else {
                "allow".into()
            },
            src: ip(&sel.saddr, sel.prefixlen_s),
            dst: ip(&sel.daddr, sel.prefixlen_d),
            mark,
            mask,
            priority: info.priority,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(fwmark: Option<u32>, fwmask: Option<u32>, invert: bool) -> IpRule {
        IpRule {
            priority: 1000,
            fwmark,
            fwmask,
            invert,
            table: 100,
            action: "lookup".into(),
            iif: None,
            suppress_prefixlen: None,
            ipv6: false,
        }
    }

    #[test]
    fn rule_mark_matching() {
        let r = rule(Some(0x4000), Some(0x4000), false);
        assert!(r.mark_matches(0x4000) && r.mark_matches(0xc000) && !r.mark_matches(0));
        assert_eq!(r.describe(), "1000: fwmark 0x4000/0x4000 lookup 100");
        let exact = rule(Some(0xca6c), None, true);
        assert!(exact.mark_matches(0) && !exact.mark_matches(0xca6c) && exact.mark_matches(0xca6d));
        assert_eq!(exact.describe(), "1000: not fwmark 0xca6c lookup 100");
        assert!(rule(None, None, false).mark_matches(0x1234));
    }

    #[test]
    fn live_state_reads() {
        // The namespace the tests run in always has the local/main/default rules.
        let r = rules().unwrap();
        assert!(
            r.iter().any(|r| r.table == 255 && r.action == "lookup"),
            "{r:?}"
        );
        assert!(!routes().unwrap().is_empty());
        let _ = tc_qdiscs().unwrap();
        let _ = xfrm_policies().unwrap();
    }
}
