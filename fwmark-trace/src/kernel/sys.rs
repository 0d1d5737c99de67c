//! Raw `bpf()` calls for what aya 0.14 cannot do: loading a program of a type it lacks
//! (netfilter) and creating links from attributes we fill ourselves.
use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    time::Instant,
};

use anyhow::{bail, Result};
use aya_obj::generated::{
    bpf_attach_type, bpf_attr, bpf_btf_info, bpf_cmd, bpf_insn, bpf_link_info, bpf_prog_info,
    bpf_prog_type,
};

/// Issues one `bpf()` command that returns a new file descriptor.
pub(crate) fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let ret = bpf_raw(cmd, attr)?;
    // SAFETY: on success these commands return a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// A `bpf()` command that returns no file descriptor (0 on success), e.g. BPF_OBJ_PIN.
pub(crate) fn bpf_status(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
    bpf_raw(cmd, attr).map(|_| ())
}

fn bpf_raw(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a fully initialised bpf_attr; the kernel reads at most its size.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

/// A zeroed attribute block (valid for every command).
pub(crate) fn attr() -> bpf_attr {
    // SAFETY: all-zero is a valid bpf_attr.
    unsafe { std::mem::zeroed() }
}

/// The kernel function a tracing program attaches to: its BTF id, in the BTF object of the
/// module that has it (`None`: vmlinux).
#[derive(Clone, Copy)]
pub(crate) struct AttachTarget<'a> {
    pub(crate) btf_id: u32,
    pub(crate) module_btf: Option<BorrowedFd<'a>>,
}

/// BPF_PROG_LOAD of a GPL program; on failure loads again with the verifier log so the error
/// says why (its last lines).
pub(crate) fn prog_load(
    prog_type: bpf_prog_type,
    attach_type: bpf_attach_type,
    name: &str,
    insns: &[bpf_insn],
    target: Option<AttachTarget>,
) -> Result<OwnedFd> {
    let license = CString::new("GPL")?;
    let mut log = vec![0u8; 1 << 20];
    let mut attempt = |log_level: u32| {
        let mut attr = attr();
        // SAFETY: the prog-load variant of the union is the one BPF_PROG_LOAD reads.
        let a = unsafe { &mut attr.__bindgen_anon_3 };
        a.prog_type = prog_type as u32;
        a.expected_attach_type = attach_type as u32;
        a.insns = insns.as_ptr() as u64;
        a.insn_cnt = insns.len() as u32;
        a.license = license.as_ptr() as u64;
        if let Some(t) = target {
            a.attach_btf_id = t.btf_id;
            if let Some(fd) = t.module_btf {
                a.__bindgen_anon_1.attach_btf_obj_fd = fd.as_raw_fd() as u32;
            }
        }
        for (dst, src) in a.prog_name.iter_mut().zip(name.bytes().take(15)) {
            *dst = src as libc::c_char;
        }
        if log_level > 0 {
            a.log_level = log_level;
            a.log_buf = log.as_mut_ptr() as u64;
            a.log_size = log.len() as u32;
        }
        bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr)
    };
    let started = Instant::now();
    match attempt(0) {
        Ok(fd) => {
            log_verified(name, fd.as_fd(), started);
            Ok(fd)
        }
        Err(err) => {
            let _ = attempt(1);
            let text = String::from_utf8_lossy(&log);
            let lines: Vec<&str> = text.trim_end_matches('\0').lines().collect();
            let tail = lines[lines.len().saturating_sub(8)..].join(" | ");
            if tail.is_empty() {
                bail!("loading {name}: {err}");
            }
            bail!("loading {name}: {err}; verifier: {tail}")
        }
    }
}

/// Logs (debug) how long the verifier took over a program and how many instructions it walked:
/// what decides whether a kernel's verifier accepts the observers in reasonable time.
pub(crate) fn log_verified(name: &str, prog: BorrowedFd, started: Instant) {
    let took = started.elapsed();
    // verified_insns is 0 before 5.16 and when the query fails.
    let verified = obj_info::<bpf_prog_info>(prog).map_or(0, |i| i.verified_insns);
    log::debug!("loaded {name}: {verified} instructions verified in {took:.1?}");
}

/// BPF_OBJ_GET_INFO_BY_FD into `info`, the info struct of the object's kind (bpf_prog_info,
/// bpf_link_info, bpf_btf_info): the kernel fills what it knows of it.
pub(crate) fn get_info<T>(fd: BorrowedFd, info: &mut T) -> io::Result<()> {
    let mut a = attr();
    a.info.bpf_fd = fd.as_raw_fd() as u32;
    a.info.info_len = std::mem::size_of::<T>() as u32;
    a.info.info = info as *mut T as u64;
    bpf_status(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut a)
}

/// `get_info` into a zeroed struct.
pub(crate) fn obj_info<T>(fd: BorrowedFd) -> io::Result<T> {
    // SAFETY: every bpf_*_info is plain integers, for which all-zero is valid.
    let mut info: T = unsafe { std::mem::zeroed() };
    get_info(fd, &mut info)?;
    Ok(info)
}

/// The kernel's id of a loaded program.
pub(crate) fn prog_id(prog: BorrowedFd) -> io::Result<u32> {
    obj_info::<bpf_prog_info>(prog).map(|i| i.id)
}

/// A link's kernel id and the id of the program it holds.
pub(crate) fn link_ids(link: BorrowedFd) -> io::Result<(u32, u32)> {
    obj_info::<bpf_link_info>(link).map(|i| (i.id, i.prog_id))
}

/// Attaches a loaded fentry/fexit program (BPF_RAW_TRACEPOINT_OPEN without a name: the oldest
/// way, on every kernel from 5.5); the returned link detaches when closed.
pub(crate) fn attach_tracing(prog: &OwnedFd) -> io::Result<OwnedFd> {
    let mut a = attr();
    a.raw_tracepoint.prog_fd = prog.as_raw_fd() as u32;
    bpf(bpf_cmd::BPF_RAW_TRACEPOINT_OPEN, &mut a)
}

/// The kernel's BTF object of a loaded module (what programs attaching to its functions are
/// loaded against), found by name among the kernel's BTF objects.
pub(crate) fn module_btf(module: &str) -> io::Result<OwnedFd> {
    let mut id = 0;
    loop {
        let mut a = attr();
        a.__bindgen_anon_6.__bindgen_anon_1.start_id = id;
        // ENOENT after the last one.
        bpf_status(bpf_cmd::BPF_BTF_GET_NEXT_ID, &mut a)?;
        // SAFETY: the kernel wrote next_id of the same union.
        id = unsafe { a.__bindgen_anon_6.next_id };
        let mut a = attr();
        a.__bindgen_anon_6.__bindgen_anon_1.btf_id = id;
        // Gone in between: the next one.
        let Ok(fd) = bpf(bpf_cmd::BPF_BTF_GET_FD_BY_ID, &mut a) else {
            continue;
        };
        let mut name = [0u8; 64];
        // SAFETY: all-zero is a valid bpf_btf_info.
        let mut info: bpf_btf_info = unsafe { std::mem::zeroed() };
        info.name = name.as_mut_ptr() as u64;
        info.name_len = name.len() as u32;
        get_info(fd.as_fd(), &mut info)?;
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        if info.kernel_btf != 0 && &name[..len] == module.as_bytes() {
            return Ok(fd);
        }
    }
}
