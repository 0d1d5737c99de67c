//! `ip rule`s that match a fwmark (IPv4 and IPv6), with the table they select: reads of the
//! packet mark. Without `/mask` the kernel stores mask 0xffffffff, an exact match of the whole
//! mark; `not fwmark` is a negated read.
use anyhow::Result;

use super::model::{Access, MarkKind, Place, RawEntry};
#[cfg(test)]
use crate::netstack::Family;
use crate::nodestate::netlink::{self, IpRule};

pub(crate) fn found(rules: &[IpRule]) -> Vec<RawEntry> {
    rules
        .iter()
        .filter_map(|r| {
            let m = r.fwmark?;
            Some(RawEntry {
                text: r.to_string(),
                access: vec![Access::read(
                    MarkKind::Packet,
                    m.value.0,
                    m.mask.0,
                    r.invert,
                )],
                names: Vec::new(),
                place: Place::IpRule {
                    family: r.family,
                    priority: r.priority,
                    table: r.table,
                    action: r.action,
                },
            })
        })
        .collect()
}

pub(crate) fn read() -> Result<Vec<RawEntry>> {
    Ok(found(&netlink::rules()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mark::{Mark, MarkMatch};

    fn rule(fwmark: Option<(u32, u32)>, invert: bool, ipv6: bool) -> IpRule {
        IpRule {
            family: if ipv6 { Family::Ipv6 } else { Family::Ipv4 },
            priority: 5210,
            fwmark: fwmark.map(|(v, m)| MarkMatch {
                value: Mark(v),
                mask: Mark(m),
                negated: false,
            }),
            invert,
            table: 254,
            action: netlink::RuleAction::Lookup,
            iif: None,
            suppress_prefixlen: None,
        }
    }

    #[test]
    fn fwmark_rules_are_reads() {
        let f = found(&[
            rule(Some((0x80000, 0xff0000)), false, true),
            rule(Some((0xca6c, u32::MAX)), true, false),
            rule(None, false, false),
        ]);
        assert_eq!(f.len(), 2);
        assert_eq!(
            f[0].access[0],
            Access::read(MarkKind::Packet, 0x80000, 0xff0000, false)
        );
        assert_eq!(f[0].place.label(), "ip -6 rule 5210");
        assert!(f[1].access[0].is_exact_read());
        assert_eq!(f[1].text, "5210: not fwmark 0xca6c lookup 254");
    }
}
