//! Links of a namespace, over netlink (RTM_GETLINK with IFLA_LINKINFO): the tunnel devices
//! that encapsulate the packets queued on them (VXLAN, Geneve, WireGuard, GRE, IPIP, xfrm
//! interfaces…), with the identifiers their packets carry, so an encapsulation is named by its
//! device; every link's name; and whether an Open vSwitch kernel datapath is here.
use std::{collections::HashMap, fmt};

use anyhow::{Context, Result};
use netlink_packet_route::{
    link::{InfoData, InfoGeneve, InfoKind, InfoVxlan, InfoXfrm, LinkAttribute, LinkInfo},
    RouteNetlinkMessage,
};
use netlink_sys::protocols;
use serde::{Deserialize, Serialize};

use super::netlink::dump;

/// What kind of tunnel a device is, with what its outer packets carry to name it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum TunnelKind {
    Vxlan {
        #[serde(skip_serializing_if = "Option::is_none")]
        vni: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
    },
    Geneve {
        #[serde(skip_serializing_if = "Option::is_none")]
        vni: Option<u32>,
    },
    /// Its fwmark is put on the outer packets (when the daemon could read it).
    Wireguard {
        #[serde(skip_serializing_if = "Option::is_none")]
        fwmark: Option<u32>,
    },
    /// An xfrm interface: its packets are encrypted by states with the same `if_id`.
    Xfrm {
        #[serde(skip_serializing_if = "Option::is_none")]
        if_id: Option<u32>,
    },
    Gre,
    Ipip,
    Ip6tnl,
    Sit,
    Vti,
}

impl TunnelKind {
    fn of(kind: &InfoKind, data: Option<&InfoData>) -> Option<Self> {
        Some(match kind {
            InfoKind::Vxlan => {
                let nlas = match data {
                    Some(InfoData::Vxlan(n)) => n.as_slice(),
                    _ => &[],
                };
                TunnelKind::Vxlan {
                    vni: nlas.iter().find_map(|n| match n {
                        InfoVxlan::Id(v) => Some(*v),
                        _ => None,
                    }),
                    port: nlas.iter().find_map(|n| match n {
                        InfoVxlan::Port(p) => Some(*p),
                        _ => None,
                    }),
                }
            }
            InfoKind::Geneve => TunnelKind::Geneve {
                vni: match data {
                    Some(InfoData::Geneve(n)) => n.iter().find_map(|n| match n {
                        InfoGeneve::Id(v) => Some(*v),
                        _ => None,
                    }),
                    _ => None,
                },
            },
            InfoKind::Wireguard => TunnelKind::Wireguard { fwmark: None },
            InfoKind::Xfrm => TunnelKind::Xfrm {
                if_id: match data {
                    Some(InfoData::Xfrm(n)) => n.iter().find_map(|n| match n {
                        InfoXfrm::IfId(v) => Some(*v),
                        _ => None,
                    }),
                    _ => None,
                },
            },
            InfoKind::GreTun | InfoKind::GreTun6 | InfoKind::GreTap | InfoKind::GreTap6 => {
                TunnelKind::Gre
            }
            InfoKind::IpIp => TunnelKind::Ipip,
            InfoKind::Ip6Tnl => TunnelKind::Ip6tnl,
            InfoKind::SitTun => TunnelKind::Sit,
            InfoKind::Vti | InfoKind::Vti6 => TunnelKind::Vti,
            _ => return None,
        })
    }
}

/// `vxlan (VNI 42, port 4789)`, `wireguard`, `xfrm (if_id 5)`.
impl fmt::Display for TunnelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelKind::Vxlan { vni, port } => {
                f.write_str("vxlan")?;
                match (vni, port) {
                    (Some(v), Some(p)) => write!(f, " (VNI {v}, port {p})"),
                    (Some(v), None) => write!(f, " (VNI {v})"),
                    _ => Ok(()),
                }
            }
            TunnelKind::Geneve { vni } => match vni {
                Some(v) => write!(f, "geneve (VNI {v})"),
                None => f.write_str("geneve"),
            },
            TunnelKind::Wireguard { fwmark: Some(m) } if *m != 0 => {
                write!(f, "wireguard (fwmark {m:#x})")
            }
            TunnelKind::Wireguard { .. } => f.write_str("wireguard"),
            TunnelKind::Xfrm { if_id } => match if_id {
                Some(i) => write!(f, "xfrm interface (if_id {i})"),
                None => f.write_str("xfrm interface"),
            },
            TunnelKind::Gre => f.write_str("gre"),
            TunnelKind::Ipip => f.write_str("ipip"),
            TunnelKind::Ip6tnl => f.write_str("ip6tnl"),
            TunnelKind::Sit => f.write_str("sit"),
            TunnelKind::Vti => f.write_str("vti"),
        }
    }
}

/// What the trace needs to know of a namespace's links besides their names.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Links {
    /// Every link's name, by ifindex.
    pub(crate) names: HashMap<u32, String>,
    /// Tunnel devices, by ifindex.
    pub(crate) tunnels: HashMap<u32, TunnelKind>,
    /// An Open vSwitch kernel datapath (a link of kind "openvswitch", `ovs-system`) is here.
    pub(crate) openvswitch: bool,
}

/// The links of the calling thread's namespace.
pub(crate) fn read() -> Result<Links> {
    let mut out = Links::default();
    for m in dump(
        protocols::NETLINK_ROUTE,
        RouteNetlinkMessage::GetLink(Default::default()),
    )? {
        let RouteNetlinkMessage::NewLink(l) = m else {
            continue;
        };
        if let Some(name) = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(n) => Some(n),
            _ => None,
        }) {
            out.names.insert(l.header.index, name.clone());
        }
        let infos = l.attributes.iter().find_map(|a| match a {
            LinkAttribute::LinkInfo(i) => Some(i),
            _ => None,
        });
        let Some(infos) = infos else { continue };
        let kind = infos.iter().find_map(|i| match i {
            LinkInfo::Kind(k) => Some(k),
            _ => None,
        });
        let data = infos.iter().find_map(|i| match i {
            LinkInfo::Data(d) => Some(d),
            _ => None,
        });
        if matches!(kind, Some(InfoKind::Other(k)) if k == "openvswitch") {
            out.openvswitch = true;
        }
        if let Some(t) = kind.and_then(|k| TunnelKind::of(k, data)) {
            out.tunnels.insert(l.header.index, t);
        }
    }
    Ok(out)
}

impl Links {
    /// The ifindexes of the kernel's WireGuard devices.
    pub(crate) fn wireguard(&self) -> Vec<u32> {
        self.tunnels
            .iter()
            .filter(|(_, kind)| matches!(kind, TunnelKind::Wireguard { .. }))
            .map(|(ifindex, _)| *ifindex)
            .collect()
    }
}

/// Lists the interfaces of the current network namespace (ifindex, name).
pub(crate) fn list_interfaces() -> Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns a NULL-terminated array we free with if_freenameindex.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(std::io::Error::last_os_error()).context("listing interfaces");
        }
        let mut out = Vec::new();
        let mut p = head;
        while (*p).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_carry_their_ids() {
        let vx = TunnelKind::of(
            &InfoKind::Vxlan,
            Some(&InfoData::Vxlan(vec![
                InfoVxlan::Id(42),
                InfoVxlan::Port(4789),
            ])),
        )
        .unwrap();
        assert_eq!(vx.to_string(), "vxlan (VNI 42, port 4789)");
        assert_eq!(
            serde_json::to_value(&vx).unwrap(),
            serde_json::json!({"type": "vxlan", "vni": 42, "port": 4789})
        );
        assert_eq!(
            TunnelKind::of(&InfoKind::Wireguard, None),
            Some(TunnelKind::Wireguard { fwmark: None })
        );
        assert_eq!(TunnelKind::of(&InfoKind::Veth, None), None);
        assert_eq!(TunnelKind::of(&InfoKind::Bridge, None), None);
    }

    #[test]
    fn this_namespace_can_be_listed() {
        // Whatever it holds (the test machine may have no tunnel): the dump itself works.
        read().unwrap();
    }
}
