//! Which interfaces get tcx observers. Every packet pays them, and attaching them costs ~57 ms
//! per interface in the kernel, so by default they go only where someone else's tc code can
//! change the mark: a foreign tcx program in either direction, or a clsact/ingress qdisc (its
//! classic filters run after the tcx chain). Elsewhere a change is still reported, by the
//! tracepoints and netfilter observers that are always there, in a segment spanning the gap.
use fwmark_trace_common::tc_dir;

use super::tcx::{dir_name, ForeignProgram};
use crate::nodestate::netlink::TcQdisc;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Only around foreign tc programs and classic filters (the default).
    #[default]
    WhereNeeded,
    /// Every interface: full-path mode shows every point of a packet's path.
    Everywhere,
}

/// Why an interface carries tcx observers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// Foreign tcx programs, per direction (at least one).
    Foreign([Vec<ForeignProgram>; 2]),
    /// A qdisc classic filters attach to.
    Qdisc(TcQdisc),
    /// Full-path mode.
    Everywhere,
}

/// The placement decision for one interface, from its foreign tcx programs per direction and
/// its clsact/ingress qdisc; `None`: no observers.
pub(crate) fn reason(
    placement: Placement,
    chain: &[Vec<ForeignProgram>; 2],
    qdisc: Option<TcQdisc>,
) -> Option<Reason> {
    if chain.iter().any(|c| !c.is_empty()) {
        Some(Reason::Foreign(chain.clone()))
    } else if let Some(q) = qdisc {
        Some(Reason::Qdisc(q))
    } else {
        (placement == Placement::Everywhere).then_some(Reason::Everywhere)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Foreign(chain) => {
                let parts: Vec<String> = [tc_dir::INGRESS, tc_dir::EGRESS]
                    .into_iter()
                    .filter(|d| !chain[*d as usize].is_empty())
                    .map(|d| {
                        let progs = &chain[d as usize];
                        let list: Vec<String> = progs.iter().map(|p| p.to_string()).collect();
                        let s = if progs.len() > 1 { "s" } else { "" };
                        format!("foreign program{s} {} on {}", list.join(", "), dir_name(d))
                    })
                    .collect();
                f.write_str(&parts.join("; "))
            }
            Reason::Qdisc(q) => write!(f, "{q} qdisc"),
            Reason::Everywhere => f.write_str("full path"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prog(name: &str, id: u32) -> ForeignProgram {
        ForeignProgram {
            id,
            name: name.into(),
        }
    }

    #[test]
    fn observers_only_where_foreign_tc_can_write() {
        let none: [Vec<ForeignProgram>; 2] = Default::default();
        let egress = [vec![], vec![prog("test_setmark", 42)]];
        let wn = Placement::WhereNeeded;
        assert_eq!(reason(wn, &none, None), None);
        assert_eq!(
            reason(wn, &egress, None),
            Some(Reason::Foreign(egress.clone()))
        );
        assert_eq!(
            reason(wn, &none, Some(TcQdisc::Clsact)),
            Some(Reason::Qdisc(TcQdisc::Clsact))
        );
        assert_eq!(
            reason(wn, &none, Some(TcQdisc::Ingress)),
            Some(Reason::Qdisc(TcQdisc::Ingress))
        );
        // Programs name the reason before a qdisc does.
        assert!(matches!(
            reason(wn, &egress, Some(TcQdisc::Clsact)),
            Some(Reason::Foreign(_))
        ));
        // Full path: every interface, the specific reason where there is one.
        let ev = Placement::Everywhere;
        assert_eq!(reason(ev, &none, None), Some(Reason::Everywhere));
        assert!(matches!(
            reason(ev, &egress, None),
            Some(Reason::Foreign(_))
        ));
    }

    #[test]
    fn reasons_read_as_sentences() {
        let egress = Reason::Foreign([vec![], vec![prog("test_setmark", 42)]]);
        assert_eq!(
            egress.to_string(),
            "foreign program test_setmark (id 42) on egress"
        );
        let both = Reason::Foreign([vec![prog("a", 1), prog("b", 2)], vec![prog("c", 3)]]);
        assert_eq!(
            both.to_string(),
            "foreign programs a (id 1), b (id 2) on ingress; foreign program c (id 3) on egress"
        );
        assert_eq!(Reason::Qdisc(TcQdisc::Clsact).to_string(), "clsact qdisc");
    }
}
