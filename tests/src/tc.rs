//! Foreign tc programs for the daemon to find: a program that sets `skb->mark`, attached as a
//! tcx link or as a classic clsact filter, and the tcx chains as the kernel lists them.
use std::os::fd::OwnedFd;

use fwmark_trace::test_support::{
    self, interfaces, link_tcx_egress, load_mark_program, MarkProgram,
};

use crate::{in_netns, lab, unique};

/// Attaches, inside `ns`, a foreign tcx egress program on `ifname` that sets `skb->mark = mark`,
/// placed just before fwmark-trace's last egress observer (so between our first and last), or
/// at the end of the chain where there is none yet (the daemon then attaches around it).
/// Returns the link fd (detached when dropped) and the program id.
pub fn attach_mark_setter(ns: &str, ifname: &str, mark: u32) -> (OwnedFd, u32) {
    use aya::programs::{SchedClassifier, TcAttachType};

    let ifname = ifname.to_owned();
    in_netns(ns, move || {
        let (_, progs) =
            SchedClassifier::query_tcx(&ifname, TcAttachType::Egress).expect("query tcx");
        let last = progs
            .iter()
            .find(|p| p.name_as_str() == Some("fwm_tc_eg_last"))
            .map(|p| p.id());
        let prog = load_mark_program(MarkProgram::TcxEgress, mark);
        let ifindex = interfaces()
            .into_iter()
            .find(|(_, n)| *n == ifname)
            .map(|(i, _)| i)
            .expect("the interface");
        let link = link_tcx_egress(&prog, ifindex, last);
        let (_, progs) =
            SchedClassifier::query_tcx(&ifname, TcAttachType::Egress).expect("query tcx");
        let id = progs
            .iter()
            .find(|p| p.name_as_str() == Some("test_setmark"))
            .expect("attached")
            .id();
        (link, id)
    })
}

/// The names of the programs in `ifname`'s tcx ingress and egress chains, inside `ns`.
pub fn tcx_chain(ns: &str, ifname: &str) -> Vec<String> {
    use aya::programs::{SchedClassifier, TcAttachType};

    let ifname = ifname.to_owned();
    in_netns(ns, move || {
        [TcAttachType::Ingress, TcAttachType::Egress]
            .into_iter()
            .flat_map(|dir| {
                SchedClassifier::query_tcx(&ifname, dir)
                    .expect("query tcx")
                    .1
            })
            .map(|p| p.name_as_str().unwrap_or("?").to_owned())
            .collect()
    })
}

/// Attaches a classic tc filter (clsact egress, cls_bpf direct-action) on `ifname` in `ns`
/// that sets `skb->mark = mark`: it runs after the whole tcx chain. The filter goes with the
/// namespace; the bpffs pin `tc` needs is removed at once.
pub fn attach_clsact_mark_setter(ns: &str, ifname: &str, mark: u32) {
    let prog = load_mark_program(MarkProgram::Classic, mark);
    let pin = Pin(format!("/sys/fs/bpf/fwmt-test-setmark-{}", unique()));
    test_support::pin(&prog, &pin.0);
    // `tc` runs from a thread inside the namespace (`ip netns exec` would remount /sys and
    // hide the pin).
    let (ifname, p) = (ifname.to_owned(), pin.0.clone());
    in_netns(ns, move || {
        let tc = |args: &str| lab::run("tc", &args.split_whitespace().collect::<Vec<_>>());
        tc(&format!("qdisc add dev {ifname} clsact"))?;
        tc(&format!(
            "filter add dev {ifname} egress bpf object-pinned {p} da"
        ))
    })
    .expect("clsact filter");
}

/// A bpffs pin, removed when dropped (the filter holds the program after that).
struct Pin(String);

impl Drop for Pin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Loads (does not attach) a cgroup skb egress program `test_cg_mark` that assigns
/// `skb->mark = mark`: what Calico eBPF's programs look like to the inventory. Unloaded when
/// dropped.
pub fn cgroup_mark_setter(mark: u32) -> OwnedFd {
    load_mark_program(MarkProgram::CgroupEgress, mark)
}
