//! BPF programs that write (or test) the packet mark: tc classifiers and actions (tcx or
//! cls_bpf), cgroup skb programs (`__sk_buff.mark`) and cgroup sock programs (`bpf_sock.mark`,
//! the socket's SO_MARK). Every loaded program is enumerated (BPF_PROG_GET_NEXT_ID) and its
//! translated instructions read (BPF_OBJ_GET_INFO_BY_FD, xlated_prog_insns): there the
//! verifier has turned `ctx->mark` into a load or store at `offsetof(struct sk_buff, mark)` (or
//! `offsetof(struct sock, sk_mark)`) from the context register, offsets read from the
//! kernel's BTF. A short forward pass follows which registers (and stack slots) hold the
//! context and what each register holds: a constant, or the loaded mark under `&`, `|`, `^`
//! with constants, so `*(u32 *)(ctx + mark) = (mark & ~M) | V` is a bitwise write of V under
//! M and `= 0x200` a whole one. fwmark-trace's own programs (`fwm_*`) are left out. A
//! program's name (`program:NAME` among the entry's names) is what attributes it by name: the
//! registry lists its owners' program names (Cilium's `cil_*` entry points).
use std::{
    collections::HashSet,
    os::fd::{AsFd, OwnedFd},
};

use anyhow::{Context, Result};
use aya_obj::generated::{bpf_cmd, bpf_prog_info, bpf_prog_type};

use super::bits::Bits;
use super::model::{Access, Attachment, BpfKind, MarkKind, Place, RawEntry};
#[cfg(test)]
use super::model::{Op, Scope};
use crate::{
    kernel::{btf::KernelBtf, sys},
    nodestate::links::list_interfaces,
};

/// A loaded program that touches the mark, and how.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Program {
    pub(crate) id: u32,
    pub(crate) name: String,
    pub(crate) kind: BpfKind,
    pub(crate) access: Vec<Access>,
}

/// What a register holds, as far as the pass can tell.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Val {
    Unknown,
    Const(u32),
    /// The mark loaded from the context, transformed.
    Mark(Bits),
}

/// One instruction's fields.
#[derive(Clone, Copy, Debug)]
struct Insn {
    code: u8,
    dst: usize,
    src: usize,
    off: i16,
    imm: i32,
}

fn decode(raw: u64) -> Insn {
    let b = raw.to_le_bytes();
    Insn {
        code: b[0],
        dst: (b[1] & 0xf) as usize,
        src: (b[1] >> 4) as usize,
        off: i16::from_le_bytes([b[2], b[3]]),
        imm: i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    }
}

// Opcode parts (include/uapi/linux/bpf_common.h, bpf.h).
const CLASS_LD: u8 = 0x00;
const CLASS_LDX: u8 = 0x01;
const CLASS_ST: u8 = 0x02;
const CLASS_STX: u8 = 0x03;
const CLASS_ALU: u8 = 0x04;
const CLASS_JMP: u8 = 0x05;
const CLASS_JMP32: u8 = 0x06;
const CLASS_ALU64: u8 = 0x07;
const MODE_MEM: u8 = 0x60;
const SIZE_W: u8 = 0x00;
const SIZE_DW: u8 = 0x18;
const SRC_X: u8 = 0x08;
const ALU_OR: u8 = 0x40;
const ALU_AND: u8 = 0x50;
const ALU_MOV: u8 = 0xb0;
const ALU_XOR: u8 = 0xa0;
const JMP_JEQ: u8 = 0x10;
const JMP_JSET: u8 = 0x40;
const JMP_JNE: u8 = 0x50;
const JMP_CALL: u8 = 0x80;
const FP: usize = 10;

/// The mark accesses of a program's translated instructions (`raw`, one u64 per slot, little
/// endian) whose context holds the mark at byte `mark_off`.
pub(crate) fn analyse(raw: &[u64], mark_off: u32) -> Vec<Access> {
    let mut ctx: u16 = 1 << 1;
    let mut stack_ctx: HashSet<i16> = HashSet::new();
    let mut val = [Val::Unknown; 11];
    let mut out: Vec<Access> = Vec::new();
    let is_mark = |i: &Insn, ctx: u16| {
        i.dst < 11 && ctx & (1 << i.dst) != 0 && i64::from(i.off) == i64::from(mark_off)
    };
    let mut pc = 0;
    while pc < raw.len() {
        let i = decode(raw[pc]);
        pc += 1;
        if i.dst > 10 || i.src > 10 {
            continue;
        }
        let class = i.code & 0x07;
        let op = i.code & 0xf0;
        let clobber = |val: &mut [Val; 11], ctx: &mut u16, r: usize| {
            val[r] = Val::Unknown;
            *ctx &= !(1 << r);
        };
        match class {
            CLASS_ALU | CLASS_ALU64 => {
                let operand = if i.code & SRC_X != 0 {
                    match val[i.src] {
                        Val::Const(c) => Some(c),
                        _ => None,
                    }
                } else {
                    Some(i.imm as u32)
                };
                if op == ALU_MOV {
                    if i.code & SRC_X != 0 {
                        val[i.dst] = val[i.src];
                        if ctx & (1 << i.src) != 0 {
                            ctx |= 1 << i.dst;
                        } else {
                            ctx &= !(1 << i.dst);
                        }
                    } else {
                        val[i.dst] = Val::Const(i.imm as u32);
                        ctx &= !(1 << i.dst);
                    }
                    continue;
                }
                ctx &= !(1 << i.dst);
                val[i.dst] = match (op, val[i.dst], operand) {
                    (ALU_AND, Val::Mark(b), Some(c)) => Val::Mark(b.and(c)),
                    (ALU_OR, Val::Mark(b), Some(c)) => Val::Mark(b.or(c)),
                    (ALU_XOR, Val::Mark(b), Some(c)) => Val::Mark(b.xor(c)),
                    (ALU_AND, Val::Const(a), Some(c)) => Val::Const(a & c),
                    (ALU_OR, Val::Const(a), Some(c)) => Val::Const(a | c),
                    (ALU_XOR, Val::Const(a), Some(c)) => Val::Const(a ^ c),
                    _ => Val::Unknown,
                };
            }
            CLASS_LD => {
                // lddw: a 64-bit immediate over two slots.
                clobber(&mut val, &mut ctx, i.dst);
                if i.code == 0x18 {
                    val[i.dst] = Val::Const(i.imm as u32);
                    pc += 1;
                }
            }
            CLASS_LDX => {
                let mem = i.code & 0xe0 == MODE_MEM;
                let size = i.code & 0x18;
                let from_ctx_slot = i.src == FP && stack_ctx.contains(&i.off);
                let src_ctx = ctx & (1 << i.src) != 0 && i64::from(i.off) == i64::from(mark_off);
                clobber(&mut val, &mut ctx, i.dst);
                if mem && size == SIZE_DW && from_ctx_slot {
                    ctx |= 1 << i.dst;
                } else if mem && size == SIZE_W && src_ctx {
                    val[i.dst] = Val::Mark(Bits::same());
                }
            }
            CLASS_ST | CLASS_STX => {
                let mem = i.code & 0xe0 == MODE_MEM;
                let size = i.code & 0x18;
                if mem && i.dst == FP && size == SIZE_DW {
                    if class == CLASS_STX && ctx & (1 << i.src) != 0 {
                        stack_ctx.insert(i.off);
                    } else {
                        stack_ctx.remove(&i.off);
                    }
                }
                if mem && size == SIZE_W && is_mark(&i, ctx) {
                    let v = if class == CLASS_ST {
                        Val::Const(i.imm as u32)
                    } else {
                        val[i.src]
                    };
                    let bits = match v {
                        Val::Const(c) => Bits::constant(c),
                        Val::Mark(b) => b,
                        Val::Unknown => Bits::unknown(),
                    };
                    out.extend(bits.write(MarkKind::Packet));
                }
            }
            CLASS_JMP | CLASS_JMP32 => {
                if op == JMP_CALL {
                    for r in 0..=5 {
                        clobber(&mut val, &mut ctx, r);
                    }
                    continue;
                }
                // `if (mark & K) ==/!=/& imm`: a read of the bits kept.
                let Val::Mark(b) = val[i.dst] else { continue };
                if i.code & SRC_X != 0 || b.ones | b.flip | b.copy | b.unknown != 0 {
                    continue;
                }
                let imm = i.imm as u32;
                match op {
                    JMP_JEQ | JMP_JNE => {
                        out.push(Access::read(MarkKind::Packet, imm, b.keep, op == JMP_JNE))
                    }
                    JMP_JSET => out.push(Access::read(MarkKind::Packet, 0, imm & b.keep, true)),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    out.dedup();
    out
}

fn kind_of(t: u32) -> Option<BpfKind> {
    Some(match t {
        x if x == bpf_prog_type::BPF_PROG_TYPE_SCHED_CLS as u32 => BpfKind::SchedCls,
        x if x == bpf_prog_type::BPF_PROG_TYPE_SCHED_ACT as u32 => BpfKind::SchedAct,
        x if x == bpf_prog_type::BPF_PROG_TYPE_CGROUP_SKB as u32 => BpfKind::CgroupSkb,
        x if x == bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK as u32 => BpfKind::CgroupSock,
        _ => return None,
    })
}

/// Where the running kernel keeps `sk_buff.mark` and `sock.sk_mark` (absent on some
/// kernels): read from BTF once per process, since trace reads the inventory again on every
/// ruleset or tc change and the kernel's layout does not change meanwhile.
fn mark_offsets() -> Result<(u32, Option<u32>)> {
    static OFFSETS: std::sync::OnceLock<(u32, Option<u32>)> = std::sync::OnceLock::new();
    if let Some(o) = OFFSETS.get() {
        return Ok(*o);
    }
    let btf = KernelBtf::load().context("reading kernel BTF (for the mark's offset)")?;
    let o = (
        btf.member_offset("sk_buff", "mark")?,
        btf.member_offset("sock", "sk_mark").ok(),
    );
    Ok(*OFFSETS.get_or_init(|| o))
}

/// Every loaded program of the kinds that can write the mark (ours left out), with the
/// accesses its translated code shows; those that touch the mark.
pub(crate) fn programs() -> Result<Vec<Program>> {
    let mut candidates: Vec<(OwnedFd, u32, String, BpfKind, u32)> = Vec::new();
    let mut id = 0;
    loop {
        let mut a = sys::attr();
        a.__bindgen_anon_6.__bindgen_anon_1.start_id = id;
        if sys::bpf_status(bpf_cmd::BPF_PROG_GET_NEXT_ID, &mut a).is_err() {
            break;
        }
        // SAFETY: the kernel wrote next_id of the same union.
        id = unsafe { a.__bindgen_anon_6.next_id };
        let mut a = sys::attr();
        a.__bindgen_anon_6.__bindgen_anon_1.prog_id = id;
        // Gone in between: the next one.
        let Ok(fd) = sys::bpf(bpf_cmd::BPF_PROG_GET_FD_BY_ID, &mut a) else {
            continue;
        };
        let Ok(i) = sys::obj_info::<bpf_prog_info>(fd.as_fd()) else {
            continue;
        };
        let name: String = i
            .name
            .iter()
            .take_while(|c| **c != 0)
            .map(|c| *c as u8 as char)
            .collect();
        let Some(kind) = kind_of(i.type_) else {
            continue;
        };
        if name.starts_with("fwm_") {
            continue;
        }
        candidates.push((fd, id, name, kind, i.xlated_prog_len));
    }
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let (skb_mark, sk_mark) = mark_offsets()?;
    let mut out = Vec::new();
    for (fd, id, name, kind, len) in candidates {
        let off = match kind {
            BpfKind::CgroupSock => match sk_mark {
                Some(o) => o,
                None => continue,
            },
            _ => skb_mark,
        };
        let mut raw = vec![0u64; len as usize / 8];
        // SAFETY: all-zero is a valid bpf_prog_info.
        let mut i: bpf_prog_info = unsafe { std::mem::zeroed() };
        i.xlated_prog_len = (raw.len() * 8) as u32;
        i.xlated_prog_insns = raw.as_mut_ptr() as u64;
        if sys::get_info(fd.as_fd(), &mut i).is_err() || i.xlated_prog_insns == 0 {
            log::debug!("bpf program {id} {name}: translated instructions not readable");
            continue;
        }
        let access = analyse(&raw, off);
        if !access.is_empty() {
            out.push(Program {
                id,
                name,
                kind,
                access,
            });
        }
    }
    Ok(out)
}

/// Where each program is attached in this namespace's interfaces (tcx, clsact filters).
fn attachments() -> Result<Vec<(u32, Attachment)>> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let qdiscs = crate::nodestate::netlink::tc_qdiscs()?;
    let mut out = Vec::new();
    for (ifindex, ifname) in list_interfaces()? {
        for (dir, egress) in [(TcAttachType::Ingress, false), (TcAttachType::Egress, true)] {
            let direction = if egress { "egress" } else { "ingress" };
            let at = |via| Attachment {
                ifname: ifname.clone(),
                direction,
                via,
            };
            if let Ok((_, progs)) = SchedClassifier::query_tcx(&ifname, dir) {
                out.extend(progs.iter().map(|p| (p.id(), at("tcx"))));
            }
            if qdiscs.contains_key(&ifindex) {
                for f in crate::nodestate::netlink::tc_filters(ifindex, egress).unwrap_or_default()
                {
                    if let Some((_, id)) = f.program {
                        out.push((id, at("clsact")));
                    }
                }
            }
        }
    }
    Ok(out)
}

fn found(p: &Program, attached: Vec<Attachment>) -> RawEntry {
    let what: Vec<String> = p.access.iter().map(Access::describe).collect();
    RawEntry {
        text: format!("{} (id {}): {}", p.name, p.id, what.join("; ")),
        access: p.access.clone(),
        // Matched against the owners' program patterns only (not their chain names).
        names: vec![format!("{}{}", super::owners::PROGRAM, p.name)],
        place: Place::BpfProgram {
            id: p.id,
            name: p.name.clone(),
            prog_type: p.kind,
            attached,
        },
    }
}

/// The tc programs among `programs` attached in this namespace.
pub(crate) fn tc_here(programs: &[Program]) -> Result<Vec<RawEntry>> {
    let tc: Vec<&Program> = programs
        .iter()
        .filter(|p| matches!(p.kind, BpfKind::SchedCls | BpfKind::SchedAct))
        .collect();
    if tc.is_empty() {
        return Ok(Vec::new());
    }
    let at = attachments()?;
    Ok(tc
        .into_iter()
        .filter_map(|p| {
            let mine: Vec<Attachment> = at
                .iter()
                .filter(|(id, _)| *id == p.id)
                .map(|(_, a)| a.clone())
                .collect();
            (!mine.is_empty()).then(|| found(p, mine))
        })
        .collect())
}

/// cgroup programs: not bound to a namespace.
pub(crate) fn cgroup(programs: &[Program]) -> Vec<RawEntry> {
    programs
        .iter()
        .filter(|p| matches!(p.kind, BpfKind::CgroupSkb | BpfKind::CgroupSock))
        .map(|p| found(p, Vec::new()))
        .collect()
}

/// Whether an access is a write whose value the code computes from nothing visible.
#[cfg(test)]
pub(crate) fn is_opaque(a: &Access) -> bool {
    matches!(
        a.op,
        Op::Write {
            known: false,
            scope: Scope::Whole,
            ..
        }
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One instruction as the kernel encodes it.
    pub(crate) fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
        u64::from(code)
            | u64::from(dst | src << 4) << 8
            | u64::from(off as u16) << 16
            | u64::from(imm as u32) << 32
    }

    const MARK: i16 = 0xa8;

    #[test]
    fn constant_store_is_a_whole_write() {
        // r2 = 0xca6c; *(u32 *)(r1 + mark) = r2; r0 = -1; exit
        let prog = [
            insn(0xb7, 2, 0, 0, 0xca6c),
            insn(0x63, 1, 2, MARK, 0),
            insn(0xb7, 0, 0, 0, -1),
            insn(0x95, 0, 0, 0, 0),
        ];
        let a = analyse(&prog, MARK as u32);
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].value(), a[0].mask(), a[0].scope()),
            (0xca6c, u32::MAX, Some(Scope::Whole))
        );
        // The same store through a copy of the context kept on the stack, and as an immediate.
        let prog = [
            insn(0xbf, 6, 1, 0, 0),
            insn(0x7b, 10, 6, -8, 0),
            insn(0x85, 0, 0, 0, 5),
            insn(0x79, 7, 10, -8, 0),
            insn(0x62, 7, 0, MARK, 0x200),
        ];
        let a = analyse(&prog, MARK as u32);
        assert_eq!((a[0].value(), a[0].scope()), (0x200, Some(Scope::Whole)));
        // After a call r1 is no longer the context.
        let prog = [insn(0x85, 0, 0, 0, 5), insn(0x62, 1, 0, MARK, 1)];
        assert!(analyse(&prog, MARK as u32).is_empty());
    }

    #[test]
    fn masked_update_is_bitwise_and_tests_are_reads() {
        // r2 = *(u32 *)(r1 + mark); if r2 & 0x8000 ... ; r2 &= ~0xff0000; r2 |= 0x40000; store
        let prog = [
            insn(0x61, 2, 1, MARK, 0),
            insn(0xbf, 3, 2, 0, 0),
            insn(0x57, 3, 0, 0, 0xff0000),
            insn(0x15, 3, 0, 1, 0x80000),
            insn(0x57, 2, 0, 0, !0xff0000),
            insn(0x47, 2, 0, 0, 0x40000),
            insn(0x63, 1, 2, MARK, 0),
            insn(0x95, 0, 0, 0, 0),
        ];
        let a = analyse(&prog, MARK as u32);
        assert_eq!(
            a[0],
            Access::read(MarkKind::Packet, 0x80000, 0xff0000, false)
        );
        assert_eq!(
            (a[1].value(), a[1].mask(), a[1].scope()),
            (0x40000, 0xff0000, Some(Scope::Bits))
        );
        // A store of something unknown is a whole write of a value not visible.
        let prog = [insn(0x61, 2, 1, 0, 0), insn(0x63, 1, 2, MARK, 0)];
        let a = analyse(&prog, MARK as u32);
        assert!(is_opaque(&a[0]));
        // Other offsets are not the mark.
        assert!(analyse(&[insn(0x62, 1, 0, 8, 1)], MARK as u32).is_empty());
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn any_code_is_handled(raw in proptest::collection::vec(proptest::prelude::any::<u64>(), 0..64), off in 0u32..256) {
            let _ = analyse(&raw, off);
        }
    }
}
