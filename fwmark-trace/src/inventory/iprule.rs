//! `ip rule`s that match a fwmark (IPv4 and IPv6), with the table they select: reads of the
//! packet mark. Without `/mask` the kernel stores mask 0xffffffff, an exact match of the whole
//! mark; `not fwmark` is a negated read.
use anyhow::Result;

use super::model::{Access, Found, IpFamily, MarkKind, Place};
use crate::nodestate::netlink::{self, IpRule};

pub fn found(rules: &[IpRule]) -> Vec<Found> {
    rules
        .iter()
        .filter_map(|r| {
            let v = r.fwmark?;
            let mask = r.fwmask.unwrap_or(u32::MAX);
            Some(Found {
                text: r.describe(),
                access: vec![Access::read(MarkKind::Packet, v, mask, r.invert)],
                names: Vec::new(),
                place: Place::IpRule {
                    family: if r.ipv6 {
                        IpFamily::Ipv6
                    } else {
                        IpFamily::Ipv4
                    },
                    priority: r.priority,
                    table: r.table,
                    action: r.action.clone(),
                },
            })
        })
        .collect()
}

pub fn read() -> Result<Vec<Found>> {
    Ok(found(&netlink::rules()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(fwmark: Option<u32>, fwmask: Option<u32>, invert: bool, ipv6: bool) -> IpRule {
        IpRule {
            priority: 5210,
            fwmark,
            fwmask,
            invert,
            table: 254,
            action: "lookup".into(),
            iif: None,
            suppress_prefixlen: None,
            ipv6,
        }
    }

    #[test]
    fn fwmark_rules_are_reads() {
        let f = found(&[
            rule(Some(0x80000), Some(0xff0000), false, true),
            rule(Some(0xca6c), Some(u32::MAX), true, false),
            rule(None, None, false, false),
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
