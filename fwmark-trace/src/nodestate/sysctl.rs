//! The sysctls that make routing mark-aware: per-interface `rp_filter` and `src_valid_mark`
//! (the reverse-path check uses the packet's mark only with `src_valid_mark=1`), and the global
//! `fwmark_reflect` / `tcp_fwmark_accept` (replies the kernel builds take the request's mark).
use std::{collections::BTreeMap, fs};

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub(crate) struct Sysctls {
    /// Per interface (and "all"/"default"): rp_filter value.
    pub(crate) rp_filter: BTreeMap<String, u8>,
    pub(crate) src_valid_mark: BTreeMap<String, u8>,
    pub(crate) fwmark_reflect: u8,
    /// net.ipv6.fwmark_reflect (IPv6 has its own).
    pub(crate) fwmark_reflect6: u8,
    pub(crate) tcp_fwmark_accept: u8,
}

fn read_u8(path: &str) -> Option<u8> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

impl Sysctls {
    /// Reads /proc/sys/net of the calling thread's network namespace (procfs follows it).
    pub(crate) fn read() -> Self {
        let mut s = Sysctls {
            fwmark_reflect: read_u8("/proc/sys/net/ipv4/fwmark_reflect").unwrap_or(0),
            fwmark_reflect6: read_u8("/proc/sys/net/ipv6/fwmark_reflect").unwrap_or(0),
            tcp_fwmark_accept: read_u8("/proc/sys/net/ipv4/tcp_fwmark_accept").unwrap_or(0),
            ..Default::default()
        };
        if let Ok(dir) = fs::read_dir("/proc/sys/net/ipv4/conf") {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let base = format!("/proc/sys/net/ipv4/conf/{name}");
                if let Some(v) = read_u8(&format!("{base}/rp_filter")) {
                    s.rp_filter.insert(name.clone(), v);
                }
                if let Some(v) = read_u8(&format!("{base}/src_valid_mark")) {
                    s.src_valid_mark.insert(name, v);
                }
            }
        }
        s
    }

    /// The effective rp_filter of an interface: the maximum of `all` and the interface's.
    pub(crate) fn rp_filter_of(&self, iface: &str) -> u8 {
        let all = self.rp_filter.get("all").copied().unwrap_or(0);
        all.max(self.rp_filter.get(iface).copied().unwrap_or(0))
    }

    /// `src_valid_mark` is in effect when either `all` or the interface has it.
    pub(crate) fn src_valid_mark_of(&self, iface: &str) -> bool {
        self.src_valid_mark.get("all").copied().unwrap_or(0) == 1
            || self.src_valid_mark.get(iface).copied().unwrap_or(0) == 1
    }
}
