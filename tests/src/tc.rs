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
    attach_clsact(ns, ifname, load_mark_program(MarkProgram::Classic, mark));
}

/// The same filter with a program named `name`, as another project names its programs
/// (Cilium's `cil_from_container`; the kernel keeps 15 characters, as Cilium's loader
/// does): what the inventory attributes by program name. test_support's programs are all
/// `test_setmark`, and a program's name is fixed when it is loaded, so this one is loaded
/// here.
pub fn attach_named_clsact_mark_setter(ns: &str, ifname: &str, name: &str, mark: u32) {
    attach_clsact(ns, ifname, load_named_classic(name, mark));
}

/// Loads a sched_cls program named `name` (cut to 15 characters) with no expected attach
/// type, as test_support's classic one: `skb->mark = mark`, then TC_ACT_UNSPEC.
fn load_named_classic(name: &str, mark: u32) -> OwnedFd {
    use std::os::fd::FromRawFd;

    use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_type};

    // r2 = mark; *(u32 *)(r1 + offsetof(__sk_buff, mark)) = r2; r0 = -1; exit
    let insn = |code: u64, dst: u64, src: u64, off: i16, imm: i32| {
        code | (dst | src << 4) << 8 | ((off as u16) as u64) << 16 | ((imm as u32) as u64) << 32
    };
    let prog = [
        insn(0xb7, 2, 0, 0, mark as i32),
        insn(0x63, 1, 2, 8, 0),
        insn(0xb7, 0, 0, 0, -1),
        insn(0x95, 0, 0, 0, 0),
    ];
    let license = c"GPL";
    // SAFETY: all-zero is a valid bpf_attr.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    // SAFETY: BPF_PROG_LOAD reads the prog-load variant of the union.
    let a = unsafe { &mut attr.__bindgen_anon_3 };
    a.prog_type = bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS as u32;
    a.insns = prog.as_ptr() as u64;
    a.insn_cnt = prog.len() as u32;
    a.license = license.as_ptr() as u64;
    for (dst, src) in a.prog_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    // SAFETY: a bpf(2) call with a valid attribute of its size; the instructions and the
    // license outlive it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            bpf_cmd::BPF_PROG_LOAD as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    assert!(fd >= 0, "load {name}: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor the kernel just gave us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn attach_clsact(ns: &str, ifname: &str, prog: OwnedFd) {
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

/// The clsact filters in namespace `ns` that run a program a daemon's `ready` record names
/// (its own, by kernel id: other daemons load programs of the same names), as
/// `IFNAME DIRECTION prio P NAME`, sorted.
pub fn filters_of(ns: &str, ready: &serde_json::Value) -> Vec<String> {
    let programs = crate::ids(ready, "programs");
    in_netns(ns, move || {
        let mut out = Vec::new();
        for (ifindex, ifname) in interfaces() {
            for (dir, egress) in [("ingress", false), ("egress", true)] {
                for (prio, name, id) in test_support::tc_filter_programs(ifindex, egress) {
                    if programs.contains(&id) {
                        out.push(format!("{ifname} {dir} prio {prio} {name}"));
                    }
                }
            }
        }
        out.sort();
        out
    })
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
