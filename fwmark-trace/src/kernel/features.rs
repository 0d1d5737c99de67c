//! What this kernel lets us use, probed at start-up rather than assumed. fentry/fexit would
//! give function-level observers (routing, xfrm) where a kernel allows them; where it does not
//! (here: loading fails with EPERM by policy) the daemon says so and uses tracepoints and
//! hooks only. `--require FEATURE` turns a missing feature into an error instead.
use std::fmt;

use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};
use clap::ValueEnum;

use super::{btf::KernelBtf, sys};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Feature {
    /// fentry/fexit programs (BPF_PROG_TYPE_TRACING).
    Fentry,
    /// BPF netfilter links (BPF_PROG_TYPE_NETFILTER, kernel >= 6.4).
    Netfilter,
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Feature::Fentry => "fentry/fexit",
            Feature::Netfilter => "netfilter programs",
        })
    }
}

/// `r0 = 0; exit`: the smallest program, enough to ask the kernel whether a type loads.
const RETURN_0: [u64; 2] = [0xb7, 0x95];

fn load_trivial(
    prog_type: bpf_prog_type,
    attach: bpf_attach_type,
    btf_id: u32,
) -> std::io::Result<()> {
    let mut attr: bpf_attr = sys::attr();
    // SAFETY: the prog-load variant of the union is the one BPF_PROG_LOAD reads.
    let a = unsafe { &mut attr.__bindgen_anon_3 };
    a.prog_type = prog_type as u32;
    a.expected_attach_type = attach as u32;
    a.insns = RETURN_0.as_ptr() as u64;
    a.insn_cnt = RETURN_0.len() as u32;
    a.license = c"GPL".as_ptr() as u64;
    a.attach_btf_id = btf_id;
    sys::bpf(bpf_cmd::BPF_PROG_LOAD, &mut attr).map(drop)
}

/// Ok, or the kernel's reason the feature is unavailable.
pub fn probe(feature: Feature, btf: &KernelBtf) -> Result<(), String> {
    let res = match feature {
        Feature::Fentry => {
            let Some(id) = btf.func_id("consume_skb") else {
                return Err("kernel BTF has no consume_skb function".into());
            };
            load_trivial(
                bpf_prog_type::BPF_PROG_TYPE_TRACING,
                bpf_attach_type::BPF_TRACE_FENTRY,
                id,
            )
        }
        Feature::Netfilter => load_trivial(
            bpf_prog_type::BPF_PROG_TYPE_NETFILTER,
            bpf_attach_type::BPF_NETFILTER,
            0,
        ),
    };
    res.map_err(|e| format!("BPF_PROG_LOAD: {e}"))
}
