//! What the integration tests (the `fwmark-trace-tests` crate) need from inside, only with the
//! `testing` feature: a small program that sets `skb->mark`, for a foreign tc or cgroup program
//! to observe, attached the ways other software attaches; and whether what a daemon loaded is
//! gone. Raw `bpf()` calls, as the daemon makes them (`kernel::sys`). Panics on failure: these
//! build test fixtures, where a failure is the test's.
use std::{
    ffi::CString,
    os::fd::{AsRawFd, OwnedFd},
};

use aya_obj::generated::{bpf_attach_type, bpf_cmd, bpf_insn, bpf_prog_type};

use crate::{kernel::sys, nodestate::links::list_interfaces};

/// Where a mark-setting program goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MarkProgram {
    /// A tcx egress link (hands the packet on: next in the chain).
    TcxEgress,
    /// A classic cls_bpf filter (loaded with no expected attach type).
    Classic,
    /// A cgroup skb egress program (lets the packet pass).
    CgroupEgress,
}

/// Loads a program (`test_setmark`, or `test_cg_mark` for cgroups) that assigns
/// `skb->mark = mark`. Unloaded when the descriptor and its attachments are gone.
pub fn load_mark_program(kind: MarkProgram, mark: u32) -> OwnedFd {
    let (prog_type, attach, name, ret) = match kind {
        MarkProgram::TcxEgress => (
            bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS,
            bpf_attach_type::BPF_TCX_EGRESS,
            "test_setmark",
            -1,
        ),
        // Value 0, i.e. no expected attach type: what a classic filter's program has.
        MarkProgram::Classic => (
            bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS,
            bpf_attach_type::BPF_CGROUP_INET_INGRESS,
            "test_setmark",
            -1,
        ),
        MarkProgram::CgroupEgress => (
            bpf_prog_type::BPF_PROG_TYPE_CGROUP_SKB,
            bpf_attach_type::BPF_CGROUP_INET_EGRESS,
            "test_cg_mark",
            1,
        ),
    };
    // r2 = mark; *(u32 *)(r1 + offsetof(__sk_buff, mark)) = r2; r0 = ret; exit
    let insn = |code: u64, dst: u64, src: u64, off: i16, imm: i32| {
        code | (dst | src << 4) << 8 | ((off as u16) as u64) << 16 | ((imm as u32) as u64) << 32
    };
    let prog = [
        insn(0xb7, 2, 0, 0, mark as i32),
        insn(0x63, 1, 2, 8, 0),
        insn(0xb7, 0, 0, 0, ret),
        insn(0x95, 0, 0, 0, 0),
    ];
    // SAFETY: bpf_insn is 8 plain bytes, the layout of the u64s above.
    let insns: &[bpf_insn] =
        unsafe { std::slice::from_raw_parts(prog.as_ptr().cast(), prog.len()) };
    sys::prog_load(prog_type, attach, name, insns, None)
        .unwrap_or_else(|e| panic!("load {name}: {e:#}"))
}

/// Links a tcx egress program on `ifindex` (of the calling thread's namespace), before the
/// program with id `before` when given, else at the end of the chain. Detached when dropped.
pub fn link_tcx_egress(prog: &OwnedFd, ifindex: u32, before: Option<u32>) -> OwnedFd {
    // include/uapi/linux/bpf.h
    const BPF_F_BEFORE: u32 = 1 << 3;
    const BPF_F_ID: u32 = 1 << 5;
    let mut attr = sys::attr();
    // SAFETY: BPF_LINK_CREATE reads the `link_create` variant of the attribute union.
    let lc = unsafe { &mut attr.link_create };
    lc.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
    lc.__bindgen_anon_2.target_ifindex = ifindex;
    lc.attach_type = bpf_attach_type::BPF_TCX_EGRESS as u32;
    if let Some(id) = before {
        lc.flags = BPF_F_BEFORE | BPF_F_ID;
        lc.__bindgen_anon_3.tcx.__bindgen_anon_1.relative_id = id;
    }
    sys::bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr).expect("link test_setmark")
}

/// Pins a program at `path` on bpffs (what `tc filter add … bpf object-pinned` takes).
pub fn pin(prog: &OwnedFd, path: &str) {
    let path = CString::new(path).expect("a path without NUL");
    let mut attr = sys::attr();
    // SAFETY: BPF_OBJ_PIN reads the pathname/bpf_fd variant of the attribute union.
    let o = unsafe { &mut attr.__bindgen_anon_4 };
    o.pathname = path.as_ptr() as u64;
    o.bpf_fd = prog.as_raw_fd() as u32;
    // Not `sys::bpf`: BPF_OBJ_PIN returns 0, not a descriptor.
    sys::bpf_status(bpf_cmd::BPF_OBJ_PIN, &mut attr).expect("pin test_setmark");
}

/// Whether the kernel still has the program (`link: false`) or link with this id.
pub fn bpf_object_exists(id: u32, link: bool) -> bool {
    let cmd = if link {
        bpf_cmd::BPF_LINK_GET_FD_BY_ID
    } else {
        bpf_cmd::BPF_PROG_GET_FD_BY_ID
    };
    let mut attr = sys::attr();
    // prog_id and link_id share this place in the union (BPF_*_GET_FD_BY_ID read it).
    attr.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
    match sys::bpf(cmd, &mut attr) {
        Ok(_fd) => true,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => false,
        Err(e) => panic!("{cmd:?} {id}: {e}"),
    }
}

/// The calling thread's namespace's interfaces: (ifindex, name).
pub fn interfaces() -> Vec<(u32, String)> {
    list_interfaces().expect("interfaces")
}

/// The cls_bpf programs of `ifindex`'s clsact filters in one direction: (priority, program
/// name, program id).
pub fn tc_filter_programs(ifindex: u32, egress: bool) -> Vec<(u16, String, u32)> {
    crate::nodestate::netlink::tc_filters(ifindex, egress)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|f| f.program.map(|(name, id)| (f.priority, name, id)))
        .collect()
}
