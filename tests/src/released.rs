//! What a daemon attached is gone once it has exited: every program and link its ready record
//! names, by kernel id (the kernel frees them asynchronously, after an RCU grace period: so
//! with a deadline), and in its own namespace no tc filter or tcx program of its and no
//! fwmark-trace nft table. Only its own: other daemons load the same programs meanwhile.
use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use fwmark_trace::test_support::{bpf_object_exists, interfaces, tc_filter_programs};
use serde_json::Value;

use crate::{in_netns, lab, scaled, wait_until};

pub fn program_exists(id: u32) -> bool {
    bpf_object_exists(id, false)
}

pub fn link_exists(id: u32) -> bool {
    bpf_object_exists(id, true)
}

/// The ids in one list of a ready record (`programs`, `links`).
pub fn ids(ready: &Value, list: &str) -> Vec<u32> {
    ready[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in the ready record {ready}"))
        .iter()
        .map(|id| id.as_u64().expect("an id") as u32)
        .collect()
}

/// Every program and link `ready` names is gone (waiting for the kernel to free them), and
/// nothing of those programs is left in namespace `netns` (when it still exists).
pub fn assert_released(ready: &Value, netns: Option<&str>) {
    let (programs, links) = (ids(ready, "programs"), ids(ready, "links"));
    let left = || {
        let p: Vec<u32> = programs
            .iter()
            .copied()
            .filter(|&id| program_exists(id))
            .collect();
        let l: Vec<u32> = links
            .iter()
            .copied()
            .filter(|&id| link_exists(id))
            .collect();
        (p, l)
    };
    if !wait_until(scaled(Duration::from_secs(10)), || {
        left() == (vec![], vec![])
    }) {
        let (p, l) = left();
        panic!("still in the kernel after the daemon exited: programs {p:?}, links {l:?} (ready record {ready})");
    }
    if let Some(ns) = netns.filter(|ns| fwmark_trace::netns::path_of(ns).exists()) {
        assert_nothing_left(ns, Some(&programs));
    }
}

/// In namespace `ns`: no tcx program and no clsact filter of `programs` (`None`: of any
/// fwmark-trace observer, by name, for a daemon that never said what it attached), and no
/// fwmark-trace nft table.
pub fn assert_nothing_left(ns: &str, programs: Option<&[u32]>) {
    let programs = programs.map(<[u32]>::to_vec);
    let tc = in_netns(ns, move || {
        let ours = |name: &str, id: u32| match &programs {
            Some(ids) => ids.contains(&id),
            None => name.starts_with("fwm_"),
        };
        let mut left = Vec::new();
        for (ifindex, ifname) in interfaces() {
            for (dir, egress) in [(TcAttachType::Ingress, false), (TcAttachType::Egress, true)] {
                // Kernels without tcx fail the query: nothing there.
                let tcx = SchedClassifier::query_tcx(&ifname, dir).map_or(vec![], |(_, p)| p);
                for p in tcx {
                    let name = p.name_as_str().unwrap_or("?").to_owned();
                    if ours(&name, p.id()) {
                        left.push(format!("tcx {dir:?} {ifname}: {name} (id {})", p.id()));
                    }
                }
                for (prio, name, id) in tc_filter_programs(ifindex, egress) {
                    if ours(&name, id) {
                        left.push(format!(
                            "filter {dir:?} {ifname} prio {prio}: {name} (id {id})"
                        ));
                    }
                }
            }
        }
        left
    });
    assert!(tc.is_empty(), "left behind in {ns}: {tc:#?}");
    let tables = lab::exec(ns, &["nft", "list", "tables"]).expect("nft");
    assert!(
        !tables.contains("fwmark_trace"),
        "nft tables left behind in {ns}: {tables}"
    );
}
