//! Raw `bpf()` calls for what aya 0.14 cannot do: loading a program of a type it lacks
//! (netfilter) and creating links from attributes we fill ourselves.
use std::{
    ffi::CString,
    io,
    os::fd::{FromRawFd, OwnedFd, RawFd},
};

use anyhow::{bail, Result};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type};

/// Issues one `bpf()` command that returns a new file descriptor.
pub fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
    let ret = bpf_raw(cmd, attr)?;
    // SAFETY: on success these commands return a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// A `bpf()` command that returns no file descriptor (0 on success), e.g. BPF_OBJ_PIN.
pub fn bpf_status(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<()> {
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
pub fn attr() -> bpf_attr {
    // SAFETY: all-zero is a valid bpf_attr.
    unsafe { std::mem::zeroed() }
}

/// BPF_PROG_LOAD of a GPL program; on failure loads again with the verifier log so the error
/// says why (its last lines).
pub fn prog_load(
    prog_type: bpf_prog_type,
    attach_type: bpf_attach_type,
    name: &str,
    insns: &[bpf_insn],
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
    match attempt(0) {
        Ok(fd) => Ok(fd),
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
