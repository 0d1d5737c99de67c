//! Routing, tc and xfrm state over netlink: `ip rule`s (fwmark/mask → table), the routes of every
//! table a rule names, the qdiscs classic tc filters hang on, and xfrm policies and states
//! with their marks. One generic dump per message family.
use std::{
    collections::HashMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{bail, Context, Result};
use ipnet::IpNet;
use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::{
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    rule::{RuleAction as NlRuleAction, RuleAttribute, RuleFlags, RuleMessage},
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_packet_xfrm::{
    policy::{DelGetMessage, ModifyMessage as PolicyModifyMessage},
    state::{GetDumpMessage, ModifyMessage},
    XfrmAttrs, XfrmMessage,
};
use netlink_sys::{protocols, Socket, SocketAddr};
use serde::{Deserialize, Serialize};

use crate::{
    mark::{Mark, MarkMatch},
    netstack::{serialize_as_display, Family},
};

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

/// What an `ip rule` does when it matches (`FR_ACT_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RuleAction {
    /// `lookup TABLE`.
    Lookup,
    Goto,
    Nop,
    Blackhole,
    Unreachable,
    Prohibit,
    Other(u8),
}

impl RuleAction {
    fn from_netlink(a: NlRuleAction) -> RuleAction {
        match a {
            NlRuleAction::ToTable => RuleAction::Lookup,
            NlRuleAction::Goto => RuleAction::Goto,
            NlRuleAction::Nop => RuleAction::Nop,
            NlRuleAction::Blackhole => RuleAction::Blackhole,
            NlRuleAction::Unreachable => RuleAction::Unreachable,
            NlRuleAction::Prohibit => RuleAction::Prohibit,
            other => RuleAction::Other(u8::from(other)),
        }
    }
}

impl fmt::Display for RuleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuleAction::Lookup => f.write_str("lookup"),
            RuleAction::Goto => f.write_str("goto"),
            RuleAction::Nop => f.write_str("nop"),
            RuleAction::Blackhole => f.write_str("blackhole"),
            RuleAction::Unreachable => f.write_str("unreachable"),
            RuleAction::Prohibit => f.write_str("prohibit"),
            RuleAction::Other(n) => write!(f, "action {n}"),
        }
    }
}

/// An `ip rule`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct IpRule {
    pub(crate) family: Family,
    pub(crate) priority: u32,
    /// `fwmark VALUE[/MASK]` (no mask: all 32 bits).
    pub(crate) fwmark: Option<MarkMatch>,
    /// `not fwmark …`.
    pub(crate) invert: bool,
    pub(crate) table: u32,
    pub(crate) action: RuleAction,
    pub(crate) iif: Option<String>,
    pub(crate) suppress_prefixlen: Option<u32>,
}

/// The `main` and `local` routing tables (include/uapi/linux/rtnetlink.h).
pub(crate) const TABLE_MAIN: u32 = libc::RT_TABLE_MAIN as u32;
pub(crate) const TABLE_LOCAL: u32 = libc::RT_TABLE_LOCAL as u32;

impl IpRule {
    /// Whether a packet with `mark` takes this rule's fwmark test (rules without one always do).
    pub(crate) fn mark_matches(&self, mark: Mark) -> bool {
        self.fwmark.is_none_or(|m| m.matches(mark)) != self.invert
    }
}

/// `1000: not fwmark 0x4000/0x4000 iif eth0 lookup 100`, as `ip rule` shows it.
impl fmt::Display for IpRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.priority)?;
        if self.invert {
            f.write_str(" not")?;
        }
        if let Some(m) = self.fwmark {
            write!(f, " fwmark {m}")?;
        }
        if let Some(i) = &self.iif {
            write!(f, " iif {i}")?;
        }
        match self.action {
            RuleAction::Lookup => write!(f, " lookup {}", self.table)?,
            other => write!(f, " {other}")?,
        }
        if let Some(p) = self.suppress_prefixlen {
            write!(f, " suppress_prefixlength {p}")?;
        }
        Ok(())
    }
}

/// A route of one table.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Route {
    pub(crate) table: u32,
    /// `0.0.0.0/0` (or `::/0`) is the default route.
    pub(crate) destination: IpNet,
    pub(crate) gateway: Option<IpAddr>,
    pub(crate) oif: Option<u32>,
    /// unicast, local, broadcast, blackhole, …
    #[serde(serialize_with = "lowercase_debug")]
    pub(crate) kind: RouteType,
}

impl Route {
    /// Whether it can carry a packet elsewhere (local and broadcast routes deliver here).
    pub(crate) fn forwards(&self) -> bool {
        !matches!(self.kind, RouteType::Local | RouteType::Broadcast)
    }
}

fn lowercase_debug<T: fmt::Debug, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{}", format!("{v:?}").to_lowercase()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum XfrmDir {
    In,
    Out,
    Fwd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum XfrmAction {
    Allow,
    Block,
}

impl fmt::Display for XfrmDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XfrmDir::In => "in",
            XfrmDir::Out => "out",
            XfrmDir::Fwd => "fwd",
        })
    }
}

impl fmt::Display for XfrmAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            XfrmAction::Allow => "allow",
            XfrmAction::Block => "block",
        })
    }
}

serialize_as_display!(RuleAction, XfrmDir, XfrmAction);

/// An xfrm policy with its mark selector and its templates.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct XfrmPolicy {
    pub(crate) direction: XfrmDir,
    pub(crate) action: XfrmAction,
    pub(crate) src: IpNet,
    pub(crate) dst: IpNet,
    pub(crate) mark: MarkMatch,
    pub(crate) priority: u32,
    /// XFRMA_TMPL, in order: outbound, the transforms applied to what the policy selects;
    /// inbound (and forward), the ones such a packet must have come through.
    pub(crate) templates: Vec<XfrmTemplate>,
}

impl XfrmPolicy {
    /// Whether a packet from `src` to `dst` with `mark` is in this policy's selector (its
    /// prefixes and mark; protocol and ports are not read).
    pub(crate) fn selects(&self, src: IpAddr, dst: IpAddr, mark: Mark) -> bool {
        self.src.contains(&src) && self.dst.contains(&dst) && self.mark.matches(mark)
    }

    /// The templates a packet the policy selects cannot go without (not `level use`).
    pub(crate) fn required(&self) -> impl Iterator<Item = &XfrmTemplate> {
        self.templates.iter().filter(|t| !t.optional)
    }

    /// From an XFRM_MSG_NEWPOLICY; `None` for per-socket policies and selectors that do not
    /// decode.
    pub(crate) fn from_message(p: &PolicyModifyMessage) -> Option<Self> {
        let info = &p.user_policy_info;
        let sel = &info.selector;
        let v6 = |family: u16| Family::from_raw(family as u8) == Some(Family::Ipv6);
        let ip = |a: &netlink_packet_xfrm::Address, family: u16| -> IpAddr {
            if v6(family) {
                a.to_ipv6().into()
            } else {
                a.to_ipv4().into()
            }
        };
        let net =
            |a: &netlink_packet_xfrm::Address, len: u8| IpNet::new(ip(a, sel.family), len).ok();
        let mut mark = MarkMatch::new(Mark::ZERO, Mark::ZERO);
        let mut templates = Vec::new();
        for a in &p.nlas {
            match a {
                XfrmAttrs::Mark(m) => {
                    mark = MarkMatch {
                        value: Mark(m.value),
                        mask: Mark(m.mask),
                        negated: false,
                    }
                }
                XfrmAttrs::Template(ts) => templates.extend(ts.iter().map(|t| {
                    // A template without a family takes the selector's (the kernel fills it
                    // in the same way).
                    let family = if t.family == 0 { sel.family } else { t.family };
                    XfrmTemplate {
                        src: ip(&t.saddr, family),
                        dst: ip(&t.id.daddr, family),
                        proto: t.id.proto,
                        // netlink-packet-xfrm reads the SPI in host order already; the reqid
                        // is host order on the wire.
                        spi: t.id.spi,
                        reqid: t.reqid,
                        mode: XfrmMode::from_raw(t.mode),
                        optional: t.optional != 0,
                    }
                })),
                _ => {}
            }
        }
        // XFRM_POLICY_IN/OUT/FWD and XFRM_POLICY_ALLOW/BLOCK (include/uapi/linux/xfrm.h).
        let direction = match info.direction {
            0 => XfrmDir::In,
            1 => XfrmDir::Out,
            2 => XfrmDir::Fwd,
            // Per-socket policies (XFRM_POLICY_MAX and beyond) are not the node's.
            _ => return None,
        };
        Some(XfrmPolicy {
            direction,
            action: if info.action == 1 {
                XfrmAction::Block
            } else {
                XfrmAction::Allow
            },
            src: net(&sel.saddr, sel.prefixlen_s)?,
            dst: net(&sel.daddr, sel.prefixlen_d)?,
            mark,
            priority: info.priority,
            templates,
        })
    }
}

/// `xfrm policy dir in src 10.0.0.0/24 dst 10.0.1.0/24 mark 0x0/0x4000 action block`, then
/// each template as `ip xfrm policy` shows it: `tmpl src 10.0.0.1 dst 10.0.0.2 proto esp reqid
/// 1 mode tunnel`.
impl fmt::Display for XfrmPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "xfrm policy dir {} src {} dst {} mark {}/{} action {}",
            self.direction, self.src, self.dst, self.mark.value, self.mark.mask, self.action
        )?;
        for t in &self.templates {
            write!(f, " {t}")?;
        }
        Ok(())
    }
}

/// A policy's template (`struct xfrm_user_tmpl`): the transform, by protocol, mode, reqid
/// (and SPI), between the tunnel's endpoints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct XfrmTemplate {
    /// The tunnel's endpoints (unspecified in transport mode: the packet's own addresses).
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    /// IPPROTO_ESP (50), IPPROTO_AH (51), IPPROTO_COMP (108).
    pub(crate) proto: u8,
    /// 0: any SPI.
    pub(crate) spi: u32,
    /// 0: any state (the kernel looks for one by addresses, protocol and mode).
    pub(crate) reqid: u32,
    pub(crate) mode: XfrmMode,
    /// `level use`: packets may also go without this transform.
    pub(crate) optional: bool,
}

impl XfrmTemplate {
    /// Whether a state (SA) can apply this template: its protocol and mode, and the reqid,
    /// SPI and tunnel destination when the template names them.
    pub(crate) fn fits(&self, sa: &XfrmState) -> bool {
        self.proto == sa.proto
            && self.mode == sa.mode
            && (self.reqid == 0 || self.reqid == sa.reqid)
            && (self.spi == 0 || self.spi == sa.spi)
            && (self.dst.is_unspecified() || self.dst == sa.dst)
    }
}

/// An IPsec protocol's name as `ip xfrm` spells it (`esp`, `ah`, `comp`), else its number.
pub(crate) struct XfrmProto(pub(crate) u8);

impl fmt::Display for XfrmProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            50 => f.write_str("esp"),
            51 => f.write_str("ah"),
            108 => f.write_str("comp"),
            43 => f.write_str("route2"),
            60 => f.write_str("hao"),
            255 => f.write_str("ipsec-any"),
            n => write!(f, "{n}"),
        }
    }
}

/// `tmpl src 10.0.0.1 dst 10.0.0.2 proto esp spi 0x100 reqid 1 mode tunnel level use`.
impl fmt::Display for XfrmTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "tmpl src {} dst {} proto {}",
            self.src,
            self.dst,
            XfrmProto(self.proto)
        )?;
        if self.spi != 0 {
            write!(f, " spi {:#x}", self.spi)?;
        }
        write!(f, " reqid {} mode {}", self.reqid, self.mode)?;
        if self.optional {
            f.write_str(" level use")?;
        }
        Ok(())
    }
}

/// An xfrm state (SA): what identifies it, its mark selector and the output mark it writes on
/// the packets it transforms (`mark = (mark & !mask) | (value & mask)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct XfrmState {
    pub(crate) src: IpAddr,
    pub(crate) dst: IpAddr,
    /// IPPROTO_ESP (50), IPPROTO_AH (51), IPPROTO_COMP (108).
    pub(crate) proto: u8,
    pub(crate) spi: u32,
    pub(crate) mode: XfrmMode,
    pub(crate) reqid: u32,
    /// The xfrm interface the state belongs to (XFRMA_IF_ID), if any.
    pub(crate) if_id: Option<u32>,
    pub(crate) mark: Option<MarkMatch>,
    /// XFRMA_SET_MARK under XFRMA_SET_MARK_MASK (all 32 bits when no mask is given).
    pub(crate) output_mark: Option<MarkMatch>,
}

/// `XFRM_MODE_*` (include/uapi/linux/xfrm.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum XfrmMode {
    Transport,
    Tunnel,
    RouteOptimization,
    InTrigger,
    Beet,
    Other(u8),
}

impl XfrmMode {
    fn from_raw(m: u8) -> Self {
        match m {
            0 => XfrmMode::Transport,
            1 => XfrmMode::Tunnel,
            2 => XfrmMode::RouteOptimization,
            3 => XfrmMode::InTrigger,
            4 => XfrmMode::Beet,
            other => XfrmMode::Other(other),
        }
    }
}

impl fmt::Display for XfrmMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XfrmMode::Transport => f.write_str("transport"),
            XfrmMode::Tunnel => f.write_str("tunnel"),
            XfrmMode::RouteOptimization => f.write_str("ro"),
            XfrmMode::InTrigger => f.write_str("in_trigger"),
            XfrmMode::Beet => f.write_str("beet"),
            XfrmMode::Other(m) => write!(f, "mode {m}"),
        }
    }
}

impl XfrmState {
    pub(crate) fn from_message(sa: &ModifyMessage) -> Self {
        let info = &sa.user_sa_info;
        let ip = |a: &netlink_packet_xfrm::Address| -> IpAddr {
            if info.family == libc::AF_INET6 as u16 {
                a.to_ipv6().into()
            } else {
                a.to_ipv4().into()
            }
        };
        let (mut mark, mut set, mut set_mask, mut if_id) = (None, None, u32::MAX, None);
        for a in &sa.nlas {
            match a {
                XfrmAttrs::Mark(m) if m.mask != 0 => {
                    mark = Some(MarkMatch {
                        value: Mark(m.value),
                        mask: Mark(m.mask),
                        negated: false,
                    })
                }
                XfrmAttrs::MarkVal(v) => set = Some(*v),
                XfrmAttrs::MarkMask(m) => set_mask = *m,
                XfrmAttrs::IfId(i) if *i != 0 => if_id = Some(*i),
                _ => {}
            }
        }
        XfrmState {
            src: ip(&info.saddr),
            dst: ip(&info.id.daddr),
            proto: info.id.proto,
            // netlink-packet-xfrm reads the SPI in host order already.
            spi: info.id.spi,
            mode: XfrmMode::from_raw(info.mode),
            reqid: info.reqid,
            if_id,
            mark,
            output_mark: set.map(|v| MarkMatch::new(Mark(v), Mark(set_mask))),
        }
    }

    /// The mark this state leaves on a packet that had `old`.
    pub(crate) fn writes(&self, old: u32) -> Option<u32> {
        self.output_mark
            .map(|m| (old & !m.mask.0) | (m.value.0 & m.mask.0))
    }
}

/// `src 10.0.0.1 dst 10.0.0.2 proto 50 spi 0x100 mode tunnel reqid 1 mark 0x10/0xff
/// output-mark 0x300/0xf00 if_id 5`: `ip xfrm state`'s words.
impl fmt::Display for XfrmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "src {} dst {} proto {} spi {:#x} mode {} reqid {}",
            self.src, self.dst, self.proto, self.spi, self.mode, self.reqid
        )?;
        if let Some(m) = self.mark {
            write!(f, " mark {}/{}", m.value, m.mask)?;
        }
        if let Some(m) = self.output_mark {
            write!(f, " output-mark {}/{}", m.value, m.mask)?;
        }
        if let Some(i) = self.if_id {
            write!(f, " if_id {i}")?;
        }
        Ok(())
    }
}

/// Every xfrm state (SA) of the calling thread's namespace.
pub(crate) fn xfrm_states() -> Result<Vec<XfrmState>> {
    Ok(decode_xfrm_states(&dump(
        protocols::NETLINK_XFRM,
        XfrmMessage::GetDumpSa(GetDumpMessage::default()),
    )?))
}

pub(crate) fn decode_xfrm_states(messages: &[XfrmMessage]) -> Vec<XfrmState> {
    messages
        .iter()
        .filter_map(|m| match m {
            XfrmMessage::AddSa(sa) => Some(XfrmState::from_message(sa)),
            _ => None,
        })
        .collect()
}

fn addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some((*v).into()),
        RouteAddress::Inet6(v) => Some((*v).into()),
        _ => None,
    }
}

pub(crate) fn rules() -> Result<Vec<IpRule>> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut req = RuleMessage::default();
        req.header.family = family;
        for m in dump(protocols::NETLINK_ROUTE, RouteNetlinkMessage::GetRule(req))? {
            let RouteNetlinkMessage::NewRule(r) = m else {
                continue;
            };
            let mut rule = IpRule {
                family: if family == AddressFamily::Inet6 {
                    Family::Ipv6
                } else {
                    Family::Ipv4
                },
                priority: 0,
                fwmark: None,
                invert: r.header.flags.contains(RuleFlags::Invert),
                table: r.header.table as u32,
                action: RuleAction::from_netlink(r.header.action),
                iif: None,
                suppress_prefixlen: None,
            };
            let (mut fwmark, mut fwmask) = (None, None);
            for a in &r.attributes {
                match a {
                    RuleAttribute::Priority(p) => rule.priority = *p,
                    RuleAttribute::FwMark(v) => fwmark = Some(Mark(*v)),
                    RuleAttribute::FwMask(v) => fwmask = Some(Mark(*v)),
                    RuleAttribute::Table(t) => rule.table = *t,
                    RuleAttribute::Iifname(i) => rule.iif = Some(i.clone()),
                    RuleAttribute::SuppressPrefixLen(p) if *p != u32::MAX => {
                        rule.suppress_prefixlen = Some(*p)
                    }
                    _ => {}
                }
            }
            rule.fwmark = fwmark.map(|value| MarkMatch {
                value,
                mask: fwmask.unwrap_or(Mark::ALL),
                negated: false,
            });
            out.push(rule);
        }
    }
    out.sort_by_key(|r| (r.family, r.priority));
    Ok(out)
}

/// Routes of every table (IPv4 and IPv6).
pub(crate) fn routes() -> Result<Vec<Route>> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        for m in dump(protocols::NETLINK_ROUTE, RouteNetlinkMessage::GetRoute(req))? {
            let RouteNetlinkMessage::NewRoute(r) = m else {
                continue;
            };
            let any: IpAddr = if family == AddressFamily::Inet6 {
                Ipv6Addr::UNSPECIFIED.into()
            } else {
                Ipv4Addr::UNSPECIFIED.into()
            };
            let mut route = Route {
                table: r.header.table as u32,
                destination: IpNet::new(any, 0).expect("prefix 0 fits"),
                gateway: None,
                oif: None,
                kind: r.header.kind,
            };
            for a in &r.attributes {
                match a {
                    RouteAttribute::Table(t) => route.table = *t,
                    RouteAttribute::Destination(d) => {
                        if let Some(net) = addr(d)
                            .and_then(|d| IpNet::new(d, r.header.destination_prefix_length).ok())
                        {
                            route.destination = net;
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
pub(crate) enum TcQdisc {
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
pub(crate) fn tc_qdiscs() -> Result<HashMap<u32, TcQdisc>> {
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
pub(crate) struct TcFilter {
    pub(crate) priority: u16,
    /// Its handle within the priority (`tc filter show`'s `handle`): a priority holds several
    /// filters of one kind, told apart by handle.
    pub(crate) handle: u32,
    /// `bpf`, `u32`, `matchall`, `flower`, …
    pub(crate) kind: String,
    /// A cls_bpf filter's program: its name (as the attacher gave it) and id.
    pub(crate) program: Option<(String, u32)>,
}

/// The filters of `ifindex`'s clsact qdisc in one direction, in the order they run.
pub(crate) fn tc_filters(ifindex: u32, egress: bool) -> Result<Vec<TcFilter>> {
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
            handle: f.header.handle.into(),
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

pub(crate) fn xfrm_policies() -> Result<Vec<XfrmPolicy>> {
    Ok(decode_xfrm_policies(&dump(
        protocols::NETLINK_XFRM,
        XfrmMessage::GetPolicy(DelGetMessage::default()),
    )?))
}

pub(crate) fn decode_xfrm_policies(messages: &[XfrmMessage]) -> Vec<XfrmPolicy> {
    messages
        .iter()
        .filter_map(|m| match m {
            XfrmMessage::AddPolicy(p) => XfrmPolicy::from_message(p),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(fwmark: Option<&str>, invert: bool) -> IpRule {
        IpRule {
            family: Family::Ipv4,
            priority: 1000,
            fwmark: fwmark.map(|m| m.parse().unwrap()),
            invert,
            table: 100,
            action: RuleAction::Lookup,
            iif: None,
            suppress_prefixlen: None,
        }
    }

    #[test]
    fn rule_mark_matching() {
        let r = rule(Some("0x4000/0x4000"), false);
        let m = Mark;
        assert!(r.mark_matches(m(0x4000)) && r.mark_matches(m(0xc000)) && !r.mark_matches(m(0)));
        assert_eq!(r.to_string(), "1000: fwmark 0x4000/0x4000 lookup 100");
        let exact = rule(Some("0xca6c"), true);
        assert!(
            exact.mark_matches(m(0))
                && !exact.mark_matches(m(0xca6c))
                && exact.mark_matches(m(0xca6d))
        );
        assert_eq!(exact.to_string(), "1000: not fwmark 0xca6c lookup 100");
        assert!(rule(None, false).mark_matches(m(0x1234)));
    }

    /// A dumped policy with a template, its bytes laid out as the kernel's `struct
    /// xfrm_user_tmpl` (SPI in network order, reqid in host order): read as `ip xfrm policy`
    /// shows it.
    #[test]
    fn policy_templates_read_like_ip_xfrm_policy() {
        use netlink_packet_xfrm::{Address, UserPolicyInfo, UserTemplate};
        let mut raw = [0u8; 64];
        raw[..4].copy_from_slice(&[10, 77, 0, 1]); // id.daddr
        raw[16..20].copy_from_slice(&0x1234u32.to_be_bytes()); // id.spi
        raw[20] = 50; // id.proto: esp
        raw[24..26].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        raw[28..32].copy_from_slice(&[10, 77, 0, 2]); // saddr
        raw[44..48].copy_from_slice(&7u32.to_ne_bytes()); // reqid
        raw[48] = 1; // mode: tunnel
        raw[50] = 1; // optional: level use
        let tmpl = UserTemplate::parse(&raw).unwrap();
        let mut info = UserPolicyInfo::default();
        info.selector.family = libc::AF_INET as u16;
        info.selector.saddr = Address::from_ip(&"10.77.0.2".parse().unwrap());
        info.selector.daddr = Address::from_ip(&"10.77.0.1".parse().unwrap());
        info.selector.prefixlen_s = 32;
        info.selector.prefixlen_d = 32;
        info.direction = 0;
        let msg = PolicyModifyMessage {
            user_policy_info: info,
            nlas: vec![XfrmAttrs::Template(vec![tmpl])],
        };
        let p = &decode_xfrm_policies(&[XfrmMessage::AddPolicy(msg)])[0];
        assert_eq!(
            p.to_string(),
            "xfrm policy dir in src 10.77.0.2/32 dst 10.77.0.1/32 mark 0x0/0x0 action allow tmpl src 10.77.0.2 dst 10.77.0.1 proto esp spi 0x1234 reqid 7 mode tunnel level use"
        );
        assert_eq!(p.required().count(), 0, "level use requires nothing");
        let m = Mark::ZERO;
        let (a, b) = ("10.77.0.1".parse().unwrap(), "10.77.0.2".parse().unwrap());
        assert!(p.selects(b, a, m) && !p.selects(a, b, m));
    }

    #[test]
    fn live_state_reads() {
        // The namespace the tests run in always has the local/main/default rules.
        let r = rules().unwrap();
        assert!(
            r.iter()
                .any(|r| r.table == TABLE_LOCAL && r.action == RuleAction::Lookup),
            "{r:?}"
        );
        assert!(!routes().unwrap().is_empty());
        let _ = tc_qdiscs().unwrap();
        let _ = xfrm_policies().unwrap();
    }
}
