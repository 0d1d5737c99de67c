//! Foreign tc programs for the daemon to find: a program that sets `skb->mark`, attached as a
//! tcx link or as a classic clsact filter, and the tcx chains as the kernel lists them.
use std::os::fd::OwnedFd;

use crate::{in_netns, lab, unique};

/// Loads a tc program that sets `skb->mark = mark` and hands the packet on (-1: next in the
/// tcx chain, TC_ACT_UNSPEC for a classic filter).
fn load_mark_setter(mark: u32, attach: aya_obj::generated::bpf_attach_type) -> OwnedFd {
    use aya_obj::generated::bpf_prog_type;
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
    // SAFETY: bpf_insn is 8 plain bytes, the layout of the u64s above.
    let insns: &[aya_obj::generated::bpf_insn] =
        unsafe { std::slice::from_raw_parts(prog.as_ptr().cast(), prog.len()) };
    fwmark_trace::kernel::sys::prog_load(
        bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS,
        attach,
        "test_setmark",
        insns,
        None,
    )
    .expect("load test_setmark")
}

/// Attaches, inside `ns`, a foreign tcx egress program on `ifname` that sets `skb->mark = mark`,
/// placed just before fwmark-trace's last egress observer (so between our first and last), or
/// at the end of the chain where there is none yet (the daemon then attaches around it).
/// Returns the link fd (detached when dropped) and the program id.
pub fn attach_mark_setter(ns: &str, ifname: &str, mark: u32) -> (OwnedFd, u32) {
    use aya::programs::{SchedClassifier, TcAttachType};
    use aya_obj::generated::{bpf_attach_type, bpf_cmd};
    use fwmark_trace::kernel::sys;
    use std::os::fd::AsRawFd;

    let ifname = ifname.to_owned();
    in_netns(ns, move || {
        let (_, progs) =
            SchedClassifier::query_tcx(&ifname, TcAttachType::Egress).expect("query tcx");
        let last = progs
            .iter()
            .find(|p| p.name_as_str() == Some("fwm_tc_eg_last"))
            .map(|p| p.id());
        let prog_fd = load_mark_setter(mark, bpf_attach_type::BPF_TCX_EGRESS);
        let ifindex = unsafe {
            libc::if_nametoindex(std::ffi::CString::new(ifname.as_str()).unwrap().as_ptr())
        };
        let mut attr = sys::attr();
        let lc = unsafe { &mut attr.link_create };
        lc.__bindgen_anon_1.prog_fd = prog_fd.as_raw_fd() as u32;
        lc.__bindgen_anon_2.target_ifindex = ifindex;
        lc.attach_type = bpf_attach_type::BPF_TCX_EGRESS as u32;
        const BPF_F_BEFORE: u32 = 1 << 3;
        const BPF_F_ID: u32 = 1 << 5;
        if let Some(last) = last {
            lc.flags = BPF_F_BEFORE | BPF_F_ID;
            lc.__bindgen_anon_3.tcx.__bindgen_anon_1.relative_id = last;
        }
        let link = sys::bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).expect("link test_setmark");
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
    use aya_obj::generated::{bpf_attach_type, bpf_cmd};
    use fwmark_trace::kernel::sys;
    use std::os::fd::AsRawFd;

    // Value 0, i.e. no expected attach type: what a classic tc filter's program is loaded with.
    let prog = load_mark_setter(mark, bpf_attach_type::BPF_CGROUP_INET_INGRESS);
    let pin = Pin(format!("/sys/fs/bpf/fwmt-test-setmark-{}", unique()));
    let path = std::ffi::CString::new(pin.0.as_str()).unwrap();
    let mut attr = sys::attr();
    let o = unsafe { &mut attr.__bindgen_anon_4 };
    o.pathname = path.as_ptr() as u64;
    o.bpf_fd = prog.as_raw_fd() as u32;
    // Not `sys::bpf`: BPF_OBJ_PIN returns 0, not a descriptor (taking it closed stdin).
    sys::bpf_status(bpf_cmd::BPF_OBJ_PIN, &mut attr).expect("pin test_setmark");
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
