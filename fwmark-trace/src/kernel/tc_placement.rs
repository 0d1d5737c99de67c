//! Which interfaces get tcx observers. Every packet pays them, and attaching them costs ~57 ms
//! per interface in the kernel, so by default they go only where someone else's tc code can
//! change the mark: a foreign tcx program in either direction, or a clsact/ingress qdisc (its
//! classic filters run after the tcx chain). Elsewhere a change is still reported, by the
//! tracepoints and netfilter observers that are always there, in a segment spanning the gap.
use crate::nodestate::{netlink::TcQdisc, programs::ForeignProgram};

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
    /// Foreign tcx programs, per direction in `TcDir::ALL` order (at least one).
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
}
