//! Conntrack marks in use: one ctnetlink dump (IPCTNL_MSG_CT_GET with NLM_F_DUMP, every
//! family) counted by CTA_MARK. Marks are not rules: an entry says which ct mark values live
//! connections carry, so a restore somewhere can put them on packets.
use std::collections::BTreeMap;

use anyhow::Result;
use netlink_sys::protocols;

use super::model::{Access, MarkKind, Op, Place, RawEntry};
use super::nl::{attrs, RawMessage};
use crate::nodestate::netlink::dump;

/// NFNL_SUBSYS_CTNETLINK (include/uapi/linux/netfilter/nfnetlink.h).
const SUBSYS_CTNETLINK: u16 = 1;
/// IPCTNL_MSG_CT_GET (include/uapi/linux/netfilter/nfnetlink_conntrack.h).
const MSG_CT_GET: u16 = 1;
/// CTA_MARK: the connection's mark, big-endian.
const CTA_MARK: u16 = 8;
/// struct nfgenmsg: family, version, res_id.
const NFGENMSG_LEN: usize = 4;

/// The dump request: AF_UNSPEC asks for every family.
pub(crate) fn request() -> RawMessage {
    RawMessage {
        kind: SUBSYS_CTNETLINK << 8 | MSG_CT_GET,
        body: vec![0; NFGENMSG_LEN],
    }
}

/// Entries per non-zero mark, from the dump's messages.
pub(crate) fn count(messages: &[RawMessage]) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for m in messages.iter().filter(|m| m.kind >> 8 == SUBSYS_CTNETLINK) {
        let mark = attrs(m.body.get(NFGENMSG_LEN..).unwrap_or_default())
            .find(|(k, _)| *k == CTA_MARK)
            .and_then(|(_, v)| Some(u32::from_be_bytes(v.get(..4)?.try_into().ok()?)));
        if let Some(mark) = mark.filter(|m| *m != 0) {
            *out.entry(mark).or_default() += 1;
        }
    }
    out
}

pub(crate) fn read() -> Result<Vec<RawEntry>> {
    let counts = count(&dump(protocols::NETLINK_NETFILTER, request())?);
    Ok(counts
        .into_iter()
        .map(|(mark, n)| RawEntry {
            place: Place::Conntrack { entries: n },
            text: format!("{n} entries with mark {mark:#x}"),
            access: vec![Access::new(
                MarkKind::Conntrack,
                mark,
                u32::MAX,
                Op::Holds { count: n },
            )],
            names: Vec::new(),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::nl::attr;

    fn entry(mark: Option<u32>) -> RawMessage {
        let mut body = vec![2, 0, 0, 0];
        // A nested tuple first (CTA_TUPLE_ORIG, with the nested flag), then the mark.
        body.extend(attr(0x8000 | 1, &attr(1, &[0; 8])));
        if let Some(m) = mark {
            body.extend(attr(CTA_MARK, &m.to_be_bytes()));
        }
        RawMessage {
            kind: SUBSYS_CTNETLINK << 8,
            body,
        }
    }

    #[test]
    fn counts_marks_by_value() {
        let msgs = [
            entry(Some(0xca6c)),
            entry(Some(0x80)),
            entry(Some(0xca6c)),
            entry(Some(0)),
            entry(None),
            RawMessage {
                kind: 3 << 8,
                body: entry(Some(5)).body,
            },
        ];
        let c = count(&msgs);
        assert_eq!(
            c.into_iter().collect::<Vec<_>>(),
            vec![(0x80, 1), (0xca6c, 2)]
        );
        assert_eq!(request().kind, 0x101);
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn any_bytes_are_handled(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = count(&[RawMessage { kind: SUBSYS_CTNETLINK << 8, body }]);
        }
    }
}
