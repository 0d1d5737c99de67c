//! Netfilter observers for kernels without BPF netfilter links (before 6.4): fentry and fexit
//! on the functions that evaluate one base chain, `nft_do_chain` (nftables: its chain argument
//! leads to the base chain's priority) and `ipt_do_table`/`ip6t_do_table` (iptables-legacy:
//! the table has it). Every base chain is observed on entry and on exit, so a change is pinned
//! to the chains at one priority, as narrowly as links around each chain would. On most
//! distribution kernels these functions live in modules (nf_tables, ip_tables, ip6_tables):
//! the module's BTF gives the layouts of their arguments, and its BTF object is what the
//! programs attach with. The layouts are frozen into the observers' configuration at load, so
//! a module loaded after start-up is not observed (said once).
use std::{
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use anyhow::{Context, Result};
use aya_obj::generated::{bpf_attach_type, bpf_prog_type};
use fwmark_trace_common::Offsets;

use super::{
    btf::{self, KernelBtf},
    netfilter::RawObject,
    sys::{self, AttachTarget},
};

/// A chain evaluator and the observers of its entry and exit.
pub(crate) struct Evaluator {
    pub(crate) func: &'static str,
    pub(crate) module: &'static str,
    /// The fentry and fexit programs.
    programs: [&'static str; 2],
    /// What it evaluates (for the start-up report).
    pub(crate) what: &'static str,
    /// Fills the offsets its observers read, from the BTF that has its types.
    offsets: fn(&KernelBtf, &mut Offsets) -> Result<()>,
}

pub(crate) const EVALUATORS: [Evaluator; 3] = [
    Evaluator {
        func: "nft_do_chain",
        module: "nf_tables",
        programs: ["fwm_nft_in", "fwm_nft_out"],
        what: "every nftables base chain (iptables-nft's too)",
        offsets: btf::nft_offsets,
    },
    Evaluator {
        func: "ipt_do_table",
        module: "ip_tables",
        programs: ["fwm_ipt_in", "fwm_ipt_out"],
        what: "iptables-legacy tables, IPv4",
        offsets: btf::xt_offsets,
    },
    Evaluator {
        func: "ip6t_do_table",
        module: "ip6_tables",
        programs: ["fwm_ip6t_in", "fwm_ip6t_out"],
        what: "iptables-legacy tables, IPv6",
        offsets: btf::xt_offsets,
    },
];

/// An evaluator this kernel has, ready to attach to.
pub(crate) struct Found {
    pub(crate) evaluator: &'static Evaluator,
    btf_id: u32,
    /// The module's BTF object (`None`: built into vmlinux).
    module_btf: Option<OwnedFd>,
}

impl Found {
    /// Whether the function is built into vmlinux rather than in its module.
    pub(crate) fn built_in(&self) -> bool {
        self.module_btf.is_none()
    }
}

/// Finds `e`'s function in its module's BTF (when loaded as a module) or in vmlinux's, and
/// fills the offsets its observers read. `Err`: why it cannot be observed.
pub(crate) fn find(
    e: &'static Evaluator,
    vmlinux: &Arc<KernelBtf>,
    into: &mut Offsets,
) -> Result<Found> {
    let (btf, module_btf) = match KernelBtf::load_module(vmlinux, e.module) {
        Some(btf) => {
            let fd = sys::module_btf(e.module)
                .with_context(|| format!("finding the BTF object of module {}", e.module))?;
            (Arc::new(btf?), Some(fd))
        }
        None => (vmlinux.clone(), None),
    };
    let btf_id = btf.func_id(e.func).with_context(|| {
        format!(
            "module {} is not loaded (nothing uses it yet) and {} is not built in",
            e.module, e.func
        )
    })?;
    // All or nothing: a program's offsets are either all there or it is not loaded.
    let mut offsets = *into;
    (e.offsets)(&btf, &mut offsets).with_context(|| format!("{}'s argument layout", e.func))?;
    *into = offsets;
    Ok(Found {
        evaluator: e,
        btf_id,
        module_btf,
    })
}

/// Loads and attaches the entry and exit observers of `found`; the links detach when dropped.
pub(crate) fn attach(obj: &RawObject, found: &Found) -> Result<Vec<OwnedFd>> {
    let target = AttachTarget {
        btf_id: found.btf_id,
        module_btf: found.module_btf.as_ref().map(|fd| fd.as_fd()),
    };
    let kinds = [
        bpf_attach_type::BPF_TRACE_FENTRY,
        bpf_attach_type::BPF_TRACE_FEXIT,
    ];
    found
        .evaluator
        .programs
        .iter()
        .zip(kinds)
        .map(|(name, kind)| {
            let prog = obj.load(
                name,
                bpf_prog_type::BPF_PROG_TYPE_TRACING,
                kind,
                Some(target),
            )?;
            // The link holds the program: its own descriptor can go.
            sys::attach_tracing(&prog).with_context(|| format!("attaching {name}"))
        })
        .collect()
}
