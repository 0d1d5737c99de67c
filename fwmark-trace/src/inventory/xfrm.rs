//! xfrm (IPsec) policies and states. A policy's mark/mask selects the packets it applies to (a
//! read); a state (SA) has a mark/mask selector too, and an output mark (XFRMA_SET_MARK, under
//! XFRMA_SET_MARK_MASK, all 32 bits when no mask is given) that it writes on the packets it
//! transforms: `mark = (mark & ~mask) | (value & mask)`.
use std::net::IpAddr;

use anyhow::Result;
use netlink_packet_xfrm::{
    state::{GetDumpMessage, ModifyMessage},
    XfrmAttrs, XfrmMessage,
};
use netlink_sys::protocols;

use super::bits::Bits;
use super::model::{Access, Found, MarkKind, Place};
use crate::nodestate::netlink::{self, dump};

/// Policies with a mark selector.
pub(crate) fn policies() -> Result<Vec<Found>> {
    Ok(netlink::xfrm_policies()?
        .into_iter()
        .filter(|p| !p.mark.mask.is_zero())
        .map(|p| Found {
            text: p.to_string(),
            access: vec![Access::read(
                MarkKind::Packet,
                p.mark.value.0,
                p.mark.mask.0,
                false,
            )],
            names: Vec::new(),
            place: Place::XfrmPolicy {
                dir: p.direction,
                action: p.action,
                src: p.src,
                dst: p.dst,
                priority: p.priority,
            },
        })
        .collect())
}

/// A state's mark selector and output mark, when it has either.
pub(crate) fn state(sa: &ModifyMessage) -> Option<Found> {
    let info = &sa.user_sa_info;
    let ip = |a: &netlink_packet_xfrm::Address| -> IpAddr {
        if info.family == libc::AF_INET6 as u16 {
            a.to_ipv6().into()
        } else {
            a.to_ipv4().into()
        }
    };
    let (mut selector, mut set, mut set_mask) = (None, None, u32::MAX);
    for a in &sa.nlas {
        match a {
            XfrmAttrs::Mark(m) if m.mask != 0 => selector = Some((m.value, m.mask)),
            XfrmAttrs::MarkVal(v) => set = Some(*v),
            XfrmAttrs::MarkMask(m) => set_mask = *m,
            _ => {}
        }
    }
    let mut access = Vec::new();
    let mut text = vec![format!(
        "src {} dst {} proto {} spi {:#x}",
        ip(&info.saddr),
        ip(&info.id.daddr),
        info.id.proto,
        u32::from_be(info.id.spi)
    )];
    if let Some((v, m)) = selector {
        access.push(Access::read(MarkKind::Packet, v, m, false));
        text.push(format!("mark {v:#x}/{m:#x}"));
    }
    if let Some(v) = set {
        access.extend(Bits::set_mark(v & set_mask, set_mask).write(MarkKind::Packet));
        text.push(format!("output-mark {v:#x}/{set_mask:#x}"));
    }
    (!access.is_empty()).then(|| Found {
        text: text.join(" "),
        access,
        names: Vec::new(),
        place: Place::XfrmState {
            src: ip(&info.saddr),
            dst: ip(&info.id.daddr),
            spi: u32::from_be(info.id.spi),
            proto: info.id.proto,
        },
    })
}

/// States (SAs) with a mark selector or an output mark.
pub(crate) fn states() -> Result<Vec<Found>> {
    Ok(decode_states(dump(
        protocols::NETLINK_XFRM,
        XfrmMessage::GetDumpSa(GetDumpMessage::default()),
    )?))
}

pub(crate) fn decode_states(messages: Vec<XfrmMessage>) -> Vec<Found> {
    messages
        .iter()
        .filter_map(|m| match m {
            XfrmMessage::AddSa(sa) => state(sa),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::model::{Op, Scope};
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_xfrm::{nlas::mark::Mark, Address, UserSaInfo};

    /// An SA as the kernel dumps it (XFRM_MSG_NEWSA), built with netlink-packet-xfrm's types,
    /// serialised to bytes and decoded back: what `states()` reads from the socket.
    fn sa(nlas: Vec<XfrmAttrs>) -> Vec<XfrmMessage> {
        let mut info = UserSaInfo {
            family: libc::AF_INET as u16,
            saddr: Address::from_ip(&"10.0.0.1".parse().unwrap()),
            ..Default::default()
        };
        info.id.daddr = Address::from_ip(&"10.0.0.2".parse().unwrap());
        info.id.spi = 0x100u32.to_be();
        info.id.proto = 50;
        let mut msg = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(XfrmMessage::AddSa(ModifyMessage {
                user_sa_info: info,
                nlas,
            })),
        );
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        let back = NetlinkMessage::<XfrmMessage>::deserialize(&buf).unwrap();
        match back.payload {
            NetlinkPayload::InnerMessage(m) => vec![m],
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn decodes_selector_and_output_mark() {
        let f = decode_states(sa(vec![
            XfrmAttrs::Mark(Mark {
                value: 0x10,
                mask: 0xff,
            }),
            XfrmAttrs::MarkVal(0xd0c4e3),
        ]));
        assert_eq!(f.len(), 1);
        assert_eq!(
            f[0].access[0],
            Access::read(MarkKind::Packet, 0x10, 0xff, false)
        );
        let w = f[0].access[1];
        assert_eq!(
            (w.value, w.mask, w.scope()),
            (0xd0c4e3, u32::MAX, Some(Scope::Whole))
        );
        assert_eq!(
            f[0].text,
            "src 10.0.0.1 dst 10.0.0.2 proto 50 spi 0x100 mark 0x10/0xff output-mark 0xd0c4e3/0xffffffff"
        );
        assert!(matches!(
            f[0].place,
            Place::XfrmState {
                spi: 0x100,
                proto: 50,
                ..
            }
        ));
        // Cilium's output mark under OutputMarkMask 0xffffff00: bitwise.
        let f = decode_states(sa(vec![
            XfrmAttrs::MarkVal(0xe00),
            XfrmAttrs::MarkMask(0xffffff00),
        ]));
        let w = f[0].access[0];
        assert_eq!(
            (w.value, w.mask, w.scope()),
            (0xe00, 0xffffff00, Some(Scope::Bits))
        );
        assert!(matches!(w.op, Op::Write { known: true, .. }));
        // No mark at all: not an entry.
        assert!(decode_states(sa(vec![])).is_empty());
    }
}
