//! The typed event every output is written from: what happened to one packet (or, counted in
//! the kernel, to many alike), where, with which marks, conntrack state, 5-tuple, drop reason,
//! routing lookup and owner attribution. Built by `decode` from the kernel's raw records.
pub(crate) mod attribution;

use std::{fmt, net::IpAddr, str::FromStr, sync::Arc};

use serde::{ser::SerializeStruct, Serialize, Serializer};

use self::attribution::Attribution;
use crate::{
    clock::Timestamp,
    mark::Mark,
    netstack::{serialize_as_display, Proto},
    nodestate::netlink::XfrmState,
    place::{PointInfo, Segment},
};

/// What an event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum EventKind {
    /// The mark (or conntrack mark) differs from the packet's previous observation.
    Transition,
    /// The kernel freed the packet with a drop reason.
    Drop,
    /// Full path: first sight of a packet.
    FirstSeen,
    /// Full path: an observation with no change.
    Observe,
    /// Full path: the packet's normal end of life.
    Consume,
    /// A routing table lookup.
    Route,
    /// The packet was encapsulated or decapsulated and kept a non-zero mark (a change across
    /// a tunnel is a transition).
    Tunnel,
}

impl EventKind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            EventKind::Transition => "transition",
            EventKind::Drop => "drop",
            EventKind::FirstSeen => "first_seen",
            EventKind::Observe => "observe",
            EventKind::Consume => "consume",
            EventKind::Route => "route",
            EventKind::Tunnel => "tunnel",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A mark before and after; serialised with the bits set and cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MarkChange {
    pub(crate) old: Mark,
    pub(crate) new: Mark,
}

impl MarkChange {
    pub(crate) fn set(&self) -> Mark {
        self.new & !self.old
    }

    pub(crate) fn cleared(&self) -> Mark {
        self.old & !self.new
    }

    pub(crate) fn changed(&self) -> bool {
        self.old != self.new
    }
}

impl Serialize for MarkChange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("MarkChange", 4)?;
        st.serialize_field("old", &self.old)?;
        st.serialize_field("new", &self.new)?;
        st.serialize_field("set", &self.set())?;
        st.serialize_field("cleared", &self.cleared())?;
        st.end()
    }
}

/// `enum ip_conntrack_info`: the packet's direction and state in its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CtState {
    Established,
    Related,
    New,
    EstablishedReply,
    RelatedReply,
    Untracked,
    Unknown,
}

impl CtState {
    /// From the low 3 bits of `skb->_nfct` (include/uapi/linux/netfilter/nf_conntrack_common.h).
    pub(crate) fn from_raw(info: u8) -> CtState {
        match info {
            0 => CtState::Established,
            1 => CtState::Related,
            2 => CtState::New,
            3 => CtState::EstablishedReply,
            4 => CtState::RelatedReply,
            7 => CtState::Untracked,
            _ => CtState::Unknown,
        }
    }

    /// Whether the packet travels in the connection's reply direction.
    pub(crate) fn is_reply(self) -> bool {
        matches!(self, CtState::EstablishedReply | CtState::RelatedReply)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) struct CtMark {
    pub(crate) old: Mark,
    pub(crate) new: Mark,
    pub(crate) changed: bool,
    pub(crate) state: CtState,
}

/// A packet's addresses and ports (ports only for protocols that carry them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub(crate) struct Tuple {
    pub(crate) proto: Proto,
    pub(crate) src: IpAddr,
    pub(crate) sport: u16,
    pub(crate) dst: IpAddr,
    pub(crate) dport: u16,
}

impl Tuple {
    pub(crate) fn reversed(&self) -> Tuple {
        Tuple {
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
            ..*self
        }
    }
}

/// `udp 10.0.0.1:53 -> 10.0.0.2:40000`, `tcp [fd00::1]:80 -> …`, `icmp 10.0.0.1 -> 10.0.0.2`:
/// the form `--flow` parses.
impl fmt::Display for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let end =
            |f: &mut fmt::Formatter<'_>, ip: &IpAddr, port: u16| match (self.proto.has_ports(), ip)
            {
                (false, _) => write!(f, "{ip}"),
                (true, IpAddr::V4(_)) => write!(f, "{ip}:{port}"),
                (true, IpAddr::V6(_)) => write!(f, "[{ip}]:{port}"),
            };
        write!(f, "{} ", self.proto)?;
        end(f, &self.src, self.sport)?;
        f.write_str(" -> ")?;
        end(f, &self.dst, self.dport)
    }
}

/// `udp 10.0.0.1:40000 -> 10.0.0.2:80` (IPv6 as `[fd00::1]:80`; no ports for icmp): what
/// `Display` prints, and what `--flow` takes.
impl FromStr for Tuple {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let err = || {
            format!("{s:?}: expected 'PROTO SRC:PORT -> DST:PORT', e.g. 'udp 10.0.0.1:40000 -> 10.0.0.2:53' (no ports for icmp)")
        };
        let (proto, rest) = s.trim().split_once(' ').ok_or_else(err)?;
        let proto: Proto = proto.parse().map_err(|_| err())?;
        let (a, b) = rest.split_once("->").ok_or_else(err)?;
        let end = |e: &str| -> Result<(IpAddr, u16), String> {
            let e = e.trim();
            if !proto.has_ports() {
                return Ok((e.parse().map_err(|_| err())?, 0));
            }
            let (ip, port) = e.rsplit_once(':').ok_or_else(err)?;
            let ip = ip
                .strip_prefix('[')
                .and_then(|i| i.strip_suffix(']'))
                .unwrap_or(ip);
            Ok((
                ip.parse().map_err(|_| err())?,
                port.parse().map_err(|_| err())?,
            ))
        };
        let ((src, sport), (dst, dport)) = (end(a)?, end(b)?);
        Ok(Tuple {
            proto,
            src,
            sport,
            dst,
            dport,
        })
    }
}

/// Why the kernel freed a packet (`enum skb_drop_reason`, named from kernel BTF). The reasons
/// fwmark-trace reasons about are variants; the others keep their kernel name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum DropReason {
    NetfilterDrop,
    IpRpfilter,
    XfrmPolicy,
    NoSocket,
    Other(Arc<str>),
    /// A number this kernel's BTF does not name.
    Unnamed(u32),
}

impl DropReason {
    /// From the name without `SKB_DROP_REASON_`.
    pub(crate) fn from_name(name: &str) -> DropReason {
        match name {
            "NETFILTER_DROP" => DropReason::NetfilterDrop,
            "IP_RPFILTER" => DropReason::IpRpfilter,
            "XFRM_POLICY" => DropReason::XfrmPolicy,
            "NO_SOCKET" => DropReason::NoSocket,
            other => DropReason::Other(other.into()),
        }
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DropReason::NetfilterDrop => f.write_str("NETFILTER_DROP"),
            DropReason::IpRpfilter => f.write_str("IP_RPFILTER"),
            DropReason::XfrmPolicy => f.write_str("XFRM_POLICY"),
            DropReason::NoSocket => f.write_str("NO_SOCKET"),
            DropReason::Other(name) => f.write_str(name),
            DropReason::Unnamed(n) => write!(f, "reason {n}"),
        }
    }
}

/// What a routing table lookup answered (`fib_table_lookup`'s return value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RouteResult {
    Ok,
    /// -EAGAIN: the table had no match, the next rule is tried.
    NoMatch,
    Unreachable,
    HostUnreachable,
    Prohibited,
    Blackhole,
    Errno(i32),
}

impl RouteResult {
    pub(crate) fn from_raw(err: i32) -> RouteResult {
        match -err {
            0 => RouteResult::Ok,
            libc::EAGAIN => RouteResult::NoMatch,
            libc::ENETUNREACH => RouteResult::Unreachable,
            libc::EHOSTUNREACH => RouteResult::HostUnreachable,
            libc::EPERM => RouteResult::Prohibited,
            libc::EINVAL => RouteResult::Blackhole,
            e => RouteResult::Errno(e),
        }
    }
}

impl fmt::Display for RouteResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteResult::Ok => f.write_str("ok"),
            RouteResult::NoMatch => f.write_str("no-match"),
            RouteResult::Unreachable => f.write_str("unreachable"),
            RouteResult::HostUnreachable => f.write_str("host-unreachable"),
            RouteResult::Prohibited => f.write_str("prohibited"),
            RouteResult::Blackhole => f.write_str("blackhole"),
            RouteResult::Errno(e) => write!(f, "errno {e}"),
        }
    }
}

serialize_as_display!(DropReason, RouteResult);

/// A routing table lookup: which table, with which flow mark, and what it answered.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) struct RouteLookup {
    pub(crate) table: u32,
    pub(crate) result: RouteResult,
    pub(crate) flow_mark: Mark,
    pub(crate) oif: u32,
    pub(crate) iif: u32,
}

/// An xfrm state as a packet names it: its SPI, and the state itself when this namespace
/// has it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct XfrmRef {
    #[serde(serialize_with = "hex_u32")]
    pub(crate) spi: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) state: Option<XfrmState>,
}

fn hex_u32<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{v:#x}"))
}

/// The stretch of time a counted event covers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub(crate) struct Interval {
    pub(crate) start: Timestamp,
    pub(crate) end: Timestamp,
}

/// One event. Points, segments and attributions are shared between the events that have the
/// same ones (`Arc`): the decoder and the attributor build each once. `output::json` writes it.
#[derive(Clone, Debug)]
pub(crate) struct TraceEvent {
    pub(crate) time: Timestamp,
    /// Kernel monotonic timestamp.
    pub(crate) ts_ns: u64,
    pub(crate) packet_id: u64,
    pub(crate) kind: EventKind,
    pub(crate) at: Arc<PointInfo>,
    pub(crate) segment: Option<Arc<Segment>>,
    pub(crate) mark: MarkChange,
    pub(crate) ct_mark: Option<CtMark>,
    pub(crate) tuple: Option<Tuple>,
    pub(crate) drop_reason: Option<DropReason>,
    pub(crate) attribution: Option<Arc<Attribution>>,
    pub(crate) route: Option<RouteLookup>,
    /// SO_MARK of the packet's socket, when it has one.
    pub(crate) socket_mark: Option<Mark>,
    /// Conntrack entry identity (not shown: a kernel address), for joining flows across NAT.
    pub(crate) ct_id: u64,
    /// The xfrm state that decrypted the packet (its sec_path): a reply that came back
    /// through a tunnel.
    pub(crate) decrypted_by: Option<XfrmRef>,
    /// Counted in the kernel (the default): how many packets made this transition in the
    /// interval; the event's packet, tuple and time are those of one of them (the exemplar).
    pub(crate) count: Option<u64>,
    pub(crate) interval: Option<Interval>,
}

impl TraceEvent {
    /// How many packets it stands for.
    pub(crate) fn packets(&self) -> u64 {
        self.count.unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuples_print_as_flow_specs() {
        let t = Tuple {
            proto: Proto::UDP,
            src: "10.0.0.1".parse().unwrap(),
            sport: 53,
            dst: "fd00::2".parse().unwrap(),
            dport: 40000,
        };
        assert_eq!(t.to_string(), "udp 10.0.0.1:53 -> [fd00::2]:40000");
        let icmp = Tuple {
            proto: Proto(1),
            ..t
        };
        assert_eq!(icmp.to_string(), "icmp 10.0.0.1 -> fd00::2");
        let json = serde_json::to_value(t).unwrap();
        assert_eq!(json["proto"], "udp");
        assert_eq!(json["dst"], "fd00::2");
    }

    #[test]
    fn flow_specs_parse_back() {
        for label in [
            "tcp [fd00::1]:80 -> [fd00::2]:40000",
            "icmp 10.0.0.1 -> 10.0.0.2",
            "udp 10.0.0.1:40000 -> 10.0.0.2:53",
        ] {
            assert_eq!(label.parse::<Tuple>().unwrap().to_string(), label);
        }
        for bad in [
            "[fd00::1]:1 -> [fd00::2]:2",
            "udp 10.0.0.1 -> 10.0.0.2:53",
            "icmp 10.0.0.1:1 -> 10.0.0.2",
            "tcp [fd00::1]:1 -> fd00::2]:2x",
        ] {
            assert!(bad.parse::<Tuple>().is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn flow_spec_parsing_never_panics(s in ".{0,64}") {
            let _ = s.parse::<Tuple>();
        }
    }

    #[test]
    fn mark_change_splits_bits() {
        let m = MarkChange {
            old: Mark(0x4100),
            new: Mark(0x4200),
        };
        let json = serde_json::to_value(m).unwrap();
        assert_eq!(
            (json["set"].as_str(), json["cleared"].as_str()),
            (Some("0x200"), Some("0x100"))
        );
    }

    #[test]
    fn drop_reasons_keep_their_kernel_names() {
        for name in ["NETFILTER_DROP", "IP_RPFILTER", "NO_SOCKET", "TCP_CSUM"] {
            assert_eq!(DropReason::from_name(name).to_string(), name);
        }
        assert_eq!(DropReason::Unnamed(999).to_string(), "reason 999");
    }
}
