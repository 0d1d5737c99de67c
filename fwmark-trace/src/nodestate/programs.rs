//! The tc programs of an interface that are not ours: the programs of a tcx chain (tcx query)
//! or the classic filters of a clsact qdisc (filter dump). Several layers read them: the tc
//! observers' placement, the points events name, the inventory, `why`.
use aya::programs::{SchedClassifier, TcAttachType};
use serde::{Deserialize, Serialize};

use super::netlink;
use crate::netstack::TcDir;

/// A program of someone else's in a tcx chain, or a classic filter (`id` 0 unless cls_bpf).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ForeignProgram {
    pub(crate) id: u32,
    pub(crate) name: String,
}

impl std::fmt::Display for ForeignProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (id {})", self.name, self.id)
    }
}

/// Where tc programs run on an interface: its tcx chains, or the filters of its clsact qdisc.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TcChain {
    Tcx,
    ClsactFilters,
}

pub(crate) fn attach_type(dir: TcDir) -> TcAttachType {
    match dir {
        TcDir::Ingress => TcAttachType::Ingress,
        TcDir::Egress => TcAttachType::Egress,
    }
}

/// The programs of one of `ifname`'s tcx chains, or the filters of its clsact qdisc, for which
/// `ours` is false (`None`: the query failed).
pub(crate) fn foreign_programs(
    chain: TcChain,
    ifindex: u32,
    ifname: &str,
    dir: TcDir,
    ours: impl Fn(&str) -> bool,
) -> Option<Vec<ForeignProgram>> {
    if chain == TcChain::ClsactFilters {
        let filters = netlink::tc_filters(ifindex, dir == TcDir::Egress).ok()?;
        return Some(
            filters
                .into_iter()
                .filter(|f| !f.program.as_ref().is_some_and(|(n, _)| ours(n)))
                .map(|f| match f.program {
                    Some((name, id)) => ForeignProgram { id, name },
                    None => ForeignProgram {
                        id: 0,
                        name: format!("{} filter prio {}", f.kind, f.priority),
                    },
                })
                .collect(),
        );
    }
    let (_, progs) = SchedClassifier::query_tcx(ifname, attach_type(dir)).ok()?;
    Some(
        progs
            .iter()
            .filter_map(|p| {
                let name = p.name_as_str().unwrap_or("").to_owned();
                (!ours(&name)).then(|| ForeignProgram { id: p.id(), name })
            })
            .collect(),
    )
}
