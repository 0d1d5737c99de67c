//! Netfilter observers on BPF netfilter links (kernels from 6.4). aya 0.14 has no
//! BPF_PROG_TYPE_NETFILTER, so the `fwm_nf_*` programs, which live in the same object as the
//! aya-loaded ones, are parsed again with aya-obj (`RawObject`), relocated against the maps aya
//! already created (so they share the ring buffer, the per-packet state and the `.rodata`
//! configuration), loaded with a raw BPF_PROG_LOAD and linked with BPF_LINK_CREATE (pf,
//! hooknum, priority). Links are file descriptors: closing them (also by the process dying)
//! detaches them.
use std::{
    collections::{HashMap, HashSet},
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd, RawFd},
};

use anyhow::{anyhow, Context, Result};
use aya::maps::{Map, MapData};
use aya_obj::generated::{bpf_attach_type, bpf_cmd, bpf_prog_type};
use fwmark_trace_common::NF_SLOTS;

use super::sys;
use crate::netstack::{Family, NfHook};

/// The kernel refuses INT_MIN and INT_MAX (reserved for the hooks' own first/last users).
pub(crate) const PRIO_FIRST: i32 = i32::MIN + 1;
pub(crate) const PRIO_LAST: i32 = i32::MAX - 1;

pub(crate) fn slot_program_name(slot: usize) -> String {
    format!("fwm_nf_{slot}")
}

/// One netfilter program per priority slot, loaded and ready to link.
pub(crate) struct NfPrograms {
    progs: Vec<OwnedFd>,
}

/// Where one observer sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct NfSite {
    pub(crate) family: Family,
    pub(crate) hook: NfHook,
    pub(crate) slot: u8,
    pub(crate) priority: i32,
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

/// The eBPF object parsed again with aya-obj and relocated against the maps aya created, for
/// the programs aya 0.14 cannot load itself: netfilter programs, and fentry/fexit on module
/// functions (they need the module's BTF object).
pub(crate) struct RawObject {
    obj: aya_obj::Object,
}

impl RawObject {
    pub(crate) fn new<'a>(
        object: &[u8],
        maps: impl Iterator<Item = (&'a str, &'a Map)>,
    ) -> Result<Self> {
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
            .context("relocating maps of the raw-loaded programs")?;
        obj.relocate_calls(&text_sections)
            .context("relocating calls of the raw-loaded programs")?;
        Ok(Self { obj })
    }

    /// Loads program `name` (see `sys::prog_load`).
    pub(crate) fn load(
        &self,
        name: &str,
        prog_type: bpf_prog_type,
        attach_type: bpf_attach_type,
        target: Option<sys::AttachTarget>,
    ) -> Result<OwnedFd> {
        let prog = self
            .obj
            .programs
            .get(name)
            .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
        let insns = &self.obj.functions[&prog.function_key()].instructions;
        sys::prog_load(prog_type, attach_type, name, insns, target)
    }
}

impl NfPrograms {
    /// Loads the netfilter slot programs.
    pub(crate) fn load(obj: &RawObject) -> Result<Self> {
        let progs = (0..NF_SLOTS)
            .map(|slot| {
                obj.load(
                    &slot_program_name(slot),
                    bpf_prog_type::BPF_PROG_TYPE_NETFILTER,
                    bpf_attach_type::BPF_NETFILTER,
                    None,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self { progs })
    }

    /// The kernel ids of the slot programs.
    pub(crate) fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.progs
            .iter()
            .filter_map(|p| sys::prog_id(p.as_fd()).ok())
    }

    /// Links the program of `site.slot` at (family, hook, priority). The kernel refuses a BPF
    /// hook at a priority another hook already holds (EBUSY); then the nearest free priority
    /// towards the middle is used, and returned.
    pub(crate) fn link(&self, site: NfSite) -> io::Result<(OwnedFd, i32)> {
        let step = if site.priority > 0 { -1 } else { 1 };
        let mut prio = site.priority;
        loop {
            match self.link_at(site, prio) {
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && prio.abs_diff(site.priority) < 16 =>
                {
                    prio += step
                }
                res => return res.map(|fd| (fd, prio)),
            }
        }
    }

    fn link_at(&self, site: NfSite, priority: i32) -> io::Result<OwnedFd> {
        let prog = &self.progs[site.slot as usize];
        let mut attr = sys::attr();
        // SAFETY: the link_create variant of the union is the one BPF_LINK_CREATE reads; `attr`
        // is zeroed, a valid value of every variant.
        let lc = unsafe { &mut attr.link_create };
        lc.__bindgen_anon_1.prog_fd = prog.as_raw_fd() as u32;
        lc.attach_type = bpf_attach_type::BPF_NETFILTER as u32;
        // SAFETY: the netfilter variant is the one a BPF_NETFILTER link reads; integers only,
        // zeroed.
        let nf = unsafe { &mut lc.__bindgen_anon_3.netfilter };
        nf.pf = site.family.raw() as u32;
        nf.hooknum = site.hook.raw() as u32;
        nf.priority = priority;
        sys::bpf(bpf_cmd::BPF_LINK_CREATE, &mut attr)
    }
}

#[cfg(test)]
mod tests {
    use aya_obj::generated::{bpf_insn, BPF_CALL, BPF_JMP, BPF_PSEUDO_CALL};

    /// A call of another function of the object (BPF-to-BPF), not of a helper.
    fn calls_a_function(insn: &bpf_insn) -> bool {
        u32::from(insn.code) == BPF_JMP | BPF_CALL && u32::from(insn.src_reg()) == BPF_PSEUDO_CALL
    }

    /// 6.1's verifier cannot carry precision marks through a subprogram: with one call (the
    /// memset LLVM emits for zeroing a struct, an entry point macro's body not inlined) it
    /// stops pruning and gives up at 1M instructions. Every observer must be one function.
    #[test]
    fn no_observer_calls_a_subprogram() {
        let object = super::super::object::OBJECT;
        if object.is_empty() {
            eprintln!("skipped: built without the eBPF object (AYA_BUILD_SKIP)");
            return;
        }
        let obj = aya_obj::Object::parse(object).unwrap();
        assert!(!obj.programs.is_empty());
        let mut calling: Vec<String> = obj
            .programs
            .iter()
            .filter_map(|(name, prog)| {
                let insns = &obj.functions[&prog.function_key()].instructions;
                let calls = insns.iter().filter(|i| calls_a_function(i)).count();
                (calls > 0).then(|| format!("{name} ({calls})"))
            })
            .collect();
        calling.sort();
        assert!(calling.is_empty(), "BPF-to-BPF calls in {calling:?}");
    }
}
