//! Netfilter observers. aya 0.14 has no BPF_PROG_TYPE_NETFILTER, so the `fwm_nf_*` programs,
//! which live in the same object as the aya-loaded ones, are parsed again with aya-obj,
//! relocated against the maps aya already created (so they share the ring buffer, the per-packet
//! state and the `.rodata` configuration), loaded with a raw BPF_PROG_LOAD and linked with
//! BPF_LINK_CREATE (pf, hooknum, priority). Links are file descriptors: closing them (also by
//! the process dying) detaches them.
use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::maps::{Map, MapData};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_insn, bpf_prog_type};
use fwmark_trace_common::NF_SLOTS;

/// NFPROTO_IPV4 / NFPROTO_IPV6 (include/uapi/linux/netfilter.h).
pub const FAMILIES: [u8; 2] = [2, 10];
/// NF_INET_PRE_ROUTING .. NF_INET_POST_ROUTING.
pub const HOOKS: [u8; 5] = [0, 1, 2, 3, 4];
/// The kernel refuses INT_MIN and INT_MAX (reserved for the hooks' own first/last users).
pub const PRIO_FIRST: i32 = i32::MIN + 1;
pub const PRIO_LAST: i32 = i32::MAX - 1;

pub fn slot_program_name(slot: usize) -> String {
    format!("fwm_nf_{slot}")
}

/// One netfilter program per priority slot, loaded and ready to link.
pub struct NfPrograms {
    progs: Vec<OwnedFd>,
}

/// Where one observer sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NfSite {
    pub family: u8,
    pub hook: u8,
    pub slot: u8,
    pub priority: i32,
}

fn bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<OwnedFd> {
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
    // SAFETY: on success BPF_PROG_LOAD and BPF_LINK_CREATE return a new file descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) })
}

/// The `MapData` behind any `aya::maps::Map` variant (aya 0.14 has no accessor for it).
fn map_data(map: &Map) -> &MapData {
    macro_rules! variants {
        ($($v:ident),*) => {
            match map { $(Map::$v(d) => d,)* }
        };
    }
    variants!(
        Array,
        ArrayOfMaps,
        BloomFilter,
        CgroupArray,
        CgroupStorage,
        CgrpStorage,
        CpuMap,
        DevMap,
        DevMapHash,
        HashMap,
        HashOfMaps,
        InodeStorage,
        LpmTrie,
        LruHashMap,
        PerCpuArray,
        PerCpuCgroupStorage,
        PerCpuHashMap,
        PerCpuLruHashMap,
        PerfEventArray,
        ProgramArray,
        Queue,
        RingBuf,
        ReusePortSockArray,
        SockHash,
        SockMap,
        SkStorage,
        Stack,
        StackTraceMap,
        Unsupported,
        XskMap
    )
}

impl NfPrograms {
    /// Parses `object` again and loads the netfilter slot programs against aya's maps.
    pub fn load<'a>(object: &[u8], maps: impl Iterator<Item = (&'a str, &'a Map)>) -> Result<Self> {
        let mut obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
        let fds: HashMap<String, RawFd> = maps
            .map(|(name, map)| (name.to_owned(), map_data(map).fd().as_fd().as_raw_fd()))
            .collect();
        let obj_maps = obj.maps.clone();
        let relocs = obj_maps
            .iter()
            .map(|(name, map)| {
                let fd = *fds
                    .get(name)
                    .ok_or_else(|| anyhow!("map {name} was not created by the loader"))?;
                Ok((name.as_str(), fd, map))
            })
            .collect::<Result<Vec<_>>>()?;
        let text_sections: HashSet<usize> = obj.functions.keys().map(|(s, _)| *s).collect();
        obj.relocate_maps(relocs.into_iter(), &text_sections)
            .context("relocating maps of the netfilter programs")?;
        obj.relocate_calls(&text_sections)
            .context("relocating calls of the netfilter programs")?;

        let license = CString::new("GPL")?;
        let progs = (0..NF_SLOTS)
            .map(|slot| {
                let name = slot_program_name(slot);
                let prog = obj
                    .programs
                    .get(&name)
                    .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
                let insns = &obj.functions[&prog.function_key()].instructions;
                load_one(&name, insns, &license)
            })
            .collect::<Result<_>>()?;
        Ok(Self { progs })
    }

    /// Links the program of `site.slot` at (family, hook, priority). The kernel refuses a BPF
    /// hook at a priority another hook already holds (EBUSY); then the nearest free priority
    /// towards the middle is used, and returned.
    pub fn link(&self, site: NfSite) -> io::Result<(OwnedFd, i32)> {
        let step = if site.priority > 0 { -1 } else { 1 };
        let mut prio = site.priority;
        loop {
            match self.link_at(site, prio) {
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && (prio - site.priority).abs() < 16 =>
                {
                    prio += step
                }
                res => return res.map(|fd| (fd, prio)),
            }
        }
    }

    fn link_at(&self, site: NfSite, priority: i32) -> io::Result<OwnedFd> {
        let prog = &self.progs[site.slot as usize];
        // SAFETY: zeroed is a valid bpf_attr; we fill the link_create variant.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        let lc = unsafe { &mut attr.link_create };
        lc.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
        lc.attach_type = bpf_attach_type::BPF_NETFILTER as u32;
        let nf = unsafe { &mut lc.__bindgen_anon_3.netfilter };
        nf.pf = site.family as u32;
        nf.hooknum = site.hook as u32;
        nf.priority = priority;
        bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)
    }
}

fn load_one(name: &str, insns: &[bpf_insn], license: &CString) -> Result<OwnedFd> {
    let mut log = vec![0u8; 1 << 20];
    let attempt = |log_level: u32, log: &mut [u8]| {
        // SAFETY: zeroed is a valid bpf_attr; we fill the prog-load variant.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        let a = unsafe { &mut attr.__bindgen_anon_3 };
        a.prog_type = bpf_prog_type::BPF_PROG_TYPE_NETFILTER as u32;
        a.expected_attach_type = bpf_attach_type::BPF_NETFILTER as u32;
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
    match attempt(0, &mut log) {
        Ok(fd) => Ok(fd),
        Err(err) => {
            // Load again with the verifier log so the error says why.
            let _ = attempt(1, &mut log);
            let text = String::from_utf8_lossy(&log);
            let tail: Vec<&str> = text.trim_end_matches('\0').lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            if tail.is_empty() {
                bail!("loading netfilter program {name}: {err}");
            }
            bail!(
                "loading netfilter program {name}: {err}; verifier: {}",
                tail.join(" | ")
            )
        }
    }
}
