//! The network stack's vocabulary, typed: address families, netfilter hooks, tc directions,
//! IP protocols and nftables families. The kernel's numbers come in at decode (`from_raw`);
//! names appear only when shown or parsed from input.
use std::{fmt, str::FromStr};

use fwmark_trace_common::{nf_hook, nfproto, tc_dir};
use serde::{Deserialize, Serialize};

/// Writes a value through its `Display` (names are the serialised form of these enums).
macro_rules! serialize_as_display {
    ($($t:ty),*) => {$(
        impl ::serde::Serialize for $t {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
    )*};
}
pub(crate) use serialize_as_display;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// From NFPROTO_* (equal to AF_INET/AF_INET6).
    pub(crate) fn from_raw(nfproto: u8) -> Option<Family> {
        match nfproto {
            nfproto::IPV4 => Some(Family::Ipv4),
            nfproto::IPV6 => Some(Family::Ipv6),
            _ => None,
        }
    }

    pub(crate) fn raw(self) -> u8 {
        match self {
            Family::Ipv4 => nfproto::IPV4,
            Family::Ipv6 => nfproto::IPV6,
        }
    }

    pub(crate) fn of(addr: &std::net::IpAddr) -> Family {
        if addr.is_ipv4() {
            Family::Ipv4
        } else {
            Family::Ipv6
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A netfilter hook (`enum nf_inet_hooks`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum NfHook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl NfHook {
    pub(crate) const ALL: [NfHook; nf_hook::COUNT as usize] = [
        NfHook::Prerouting,
        NfHook::Input,
        NfHook::Forward,
        NfHook::Output,
        NfHook::Postrouting,
    ];

    pub(crate) fn from_raw(hook: u8) -> Option<NfHook> {
        Self::ALL.get(hook as usize).copied()
    }

    pub(crate) fn raw(self) -> u8 {
        match self {
            NfHook::Prerouting => nf_hook::PRE_ROUTING,
            NfHook::Input => nf_hook::LOCAL_IN,
            NfHook::Forward => nf_hook::FORWARD,
            NfHook::Output => nf_hook::LOCAL_OUT,
            NfHook::Postrouting => nf_hook::POST_ROUTING,
        }
    }

    /// nft's name, which is also how people say it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            NfHook::Prerouting => "prerouting",
            NfHook::Input => "input",
            NfHook::Forward => "forward",
            NfHook::Output => "output",
            NfHook::Postrouting => "postrouting",
        }
    }
}

impl fmt::Display for NfHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for NfHook {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| format!("{s:?} is not a netfilter hook"))
    }
}

/// A tc direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum TcDir {
    Ingress,
    Egress,
}

impl TcDir {
    pub(crate) const ALL: [TcDir; 2] = [TcDir::Ingress, TcDir::Egress];

    pub(crate) fn from_raw(dir: u8) -> TcDir {
        if dir == tc_dir::INGRESS {
            TcDir::Ingress
        } else {
            TcDir::Egress
        }
    }
}

impl fmt::Display for TcDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TcDir::Ingress => "ingress",
            TcDir::Egress => "egress",
        })
    }
}

/// An IP protocol number, named where it has a common name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Proto(pub(crate) u8);

/// Names of the protocols worth naming (IANA protocol numbers).
const PROTO_NAMES: [(u8, &str); 7] = [
    (libc::IPPROTO_ICMP as u8, "icmp"),
    (libc::IPPROTO_TCP as u8, "tcp"),
    (libc::IPPROTO_UDP as u8, "udp"),
    // MLD and other packets behind a hop-by-hop header show its number.
    (libc::IPPROTO_HOPOPTS as u8, "ipv6-hopopt"),
    (libc::IPPROTO_ICMPV6 as u8, "icmpv6"),
    (libc::IPPROTO_SCTP as u8, "sctp"),
    // What xfrm makes: the kernel side reads its SPI where ports would be.
    (libc::IPPROTO_ESP as u8, "esp"),
];

impl Proto {
    pub(crate) const TCP: Proto = Proto(libc::IPPROTO_TCP as u8);
    pub(crate) const UDP: Proto = Proto(libc::IPPROTO_UDP as u8);
    pub(crate) const ESP: Proto = Proto(libc::IPPROTO_ESP as u8);

    /// Whether its header carries ports the kernel side reads (TCP, UDP, SCTP).
    pub(crate) fn has_ports(self) -> bool {
        matches!(
            self.0 as i32,
            libc::IPPROTO_TCP | libc::IPPROTO_UDP | libc::IPPROTO_SCTP
        )
    }

    pub(crate) fn is_icmp(self) -> bool {
        matches!(self.0 as i32, libc::IPPROTO_ICMP | libc::IPPROTO_ICMPV6)
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match PROTO_NAMES.iter().find(|(n, _)| *n == self.0) {
            Some((_, name)) => f.write_str(name),
            None => write!(f, "{}", self.0),
        }
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        PROTO_NAMES
            .iter()
            .find(|(_, name)| *name == s)
            .map(|(n, _)| Proto(*n))
            .or_else(|| s.parse().ok().map(Proto))
            .ok_or_else(|| format!("{s:?} is not an IP protocol (tcp, udp, icmp, … or a number)"))
    }
}

/// An nftables table family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum NftFamily {
    Ip,
    Ip6,
    Inet,
    Arp,
    Bridge,
    Netdev,
}

impl NftFamily {
    /// Whether its chains run for packets of `family` (on the IPv4/IPv6 hooks).
    pub(crate) fn covers(self, family: Family) -> bool {
        matches!(
            (self, family),
            (NftFamily::Inet, _) | (NftFamily::Ip, Family::Ipv4) | (NftFamily::Ip6, Family::Ipv6)
        )
    }
}

impl fmt::Display for NftFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NftFamily::Ip => "ip",
            NftFamily::Ip6 => "ip6",
            NftFamily::Inet => "inet",
            NftFamily::Arp => "arp",
            NftFamily::Bridge => "bridge",
            NftFamily::Netdev => "netdev",
        })
    }
}

impl FromStr for NftFamily {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_owned()))
            .map_err(|_| format!("{s:?} is not an nftables family"))
    }
}

serialize_as_display!(NfHook, TcDir, Proto, NftFamily);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for h in NfHook::ALL {
            assert_eq!(h.name().parse::<NfHook>(), Ok(h));
            assert_eq!(NfHook::from_raw(h.raw()), Some(h));
        }
        assert_eq!("udp".parse::<Proto>(), Ok(Proto::UDP));
        assert_eq!("47".parse::<Proto>().unwrap().to_string(), "47");
        assert!("nope".parse::<Proto>().is_err());
        assert_eq!("inet".parse::<NftFamily>(), Ok(NftFamily::Inet));
        assert!(NftFamily::Ip.covers(Family::Ipv4) && !NftFamily::Ip.covers(Family::Ipv6));
    }
}
