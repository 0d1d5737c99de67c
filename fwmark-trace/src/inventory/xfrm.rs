//! xfrm (IPsec) policies and states. A policy's mark/mask selects the packets it applies to (a
//! read); a state (SA) has a mark/mask selector too, and an output mark (XFRMA_SET_MARK, under
//! XFRMA_SET_MARK_MASK, all 32 bits when no mask is given) that it writes on the packets it
//! transforms: `mark = (mark & ~mask) | (value & mask)`.
use anyhow::Result;

use super::bits::Bits;
use super::model::{Access, MarkKind, Place, RawEntry};
use crate::nodestate::netlink::{self, XfrmState};

/// Policies with a mark selector.
pub(crate) fn policies() -> Result<Vec<RawEntry>> {
    Ok(netlink::xfrm_policies()?
        .into_iter()
        .filter(|p| !p.mark.mask.is_zero())
        .map(|p| RawEntry {
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
pub(crate) fn state(sa: &XfrmState) -> Option<RawEntry> {
    let mut access = Vec::new();
    if let Some(m) = sa.mark {
        access.push(Access::read(MarkKind::Packet, m.value.0, m.mask.0, false));
    }
    if let Some(m) = sa.output_mark {
        access.extend(Bits::set_mark(m.value.0, m.mask.0).write(MarkKind::Packet));
    }
    (!access.is_empty()).then(|| RawEntry {
        text: sa.to_string(),
        access,
        names: Vec::new(),
        place: Place::XfrmState {
            src: sa.src,
            dst: sa.dst,
            spi: sa.spi,
            proto: sa.proto,
        },
    })
}

/// States (SAs) with a mark selector or an output mark.
pub(crate) fn states() -> Result<Vec<RawEntry>> {
    Ok(netlink::xfrm_states()?.iter().filter_map(state).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::model::{Op, Scope};
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};
    use netlink_packet_xfrm::{
        nlas::mark::Mark, state::ModifyMessage, Address, UserSaInfo, XfrmAttrs, XfrmMessage,
    };

    fn decode_states(messages: Vec<XfrmMessage>) -> Vec<RawEntry> {
        netlink::decode_xfrm_states(&messages)
            .iter()
            .filter_map(state)
            .collect()
    }

    /// An SA as the kernel dumps it (XFRM_MSG_NEWSA), built with netlink-packet-xfrm's types,
    /// serialised to bytes and decoded back: what `states()` reads from the socket.
    fn sa(nlas: Vec<XfrmAttrs>) -> Vec<XfrmMessage> {
        let mut info = UserSaInfo {
            family: libc::AF_INET as u16,
            saddr: Address::from_ip(&"10.0.0.1".parse().unwrap()),
            ..Default::default()
        };
        info.id.daddr = Address::from_ip(&"10.0.0.2".parse().unwrap());
        info.id.spi = 0x100;
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
            (w.value(), w.mask(), w.scope()),
            (0xd0c4e3, u32::MAX, Some(Scope::Whole))
        );
        assert_eq!(
            f[0].text,
            "src 10.0.0.1 dst 10.0.0.2 proto 50 spi 0x100 mode transport reqid 0 mark 0x10/0xff output-mark 0xd0c4e3/0xffffffff"
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
            (w.value(), w.mask(), w.scope()),
            (0xe00, 0xffffff00, Some(Scope::Bits))
        );
        assert!(matches!(w.op, Op::Write { known: true, .. }));
        // No mark at all: not an entry.
        assert!(decode_states(sa(vec![])).is_empty());
    }
}
