//! What this kernel lets us use, probed at start-up rather than assumed, and which observer
//! back-end each layer uses: netfilter links (6.4+) or else fentry/fexit on the chain
//! evaluators; tcx (6.6+) or else clsact cls_bpf filters. `--require FEATURE` turns a missing
//! feature into an error; `--nf-observers`/`--tc-observers` pick a back-end instead of the
//! kernel's best.
use aya::programs::{ProgramError, SchedClassifier, TcAttachType};
use aya_obj::generated::{bpf_attach_type, bpf_attr, bpf_cmd, bpf_prog_type};
use clap::ValueEnum;

use super::{btf::KernelBtf, sys};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Feature {
    /// fentry/fexit programs (BPF_PROG_TYPE_TRACING).
    Fentry,
    /// BPF netfilter links (BPF_PROG_TYPE_NETFILTER, kernel >= 6.4).
    Netfilter,
}

/// Netfilter observers (`--nf-observers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum NfBackend {
    /// BPF netfilter links where the kernel has them (6.4+), else fentry/fexit.
    #[default]
    Auto,
    /// BPF netfilter links around the chains that matter.
    Links,
    /// fentry/fexit on nft_do_chain, ipt_do_table and ip6t_do_table.
    Fentry,
}

/// tc observers (`--tc-observers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub(crate) enum TcBackend {
    /// tcx where the kernel has it (6.6+), else clsact filters.
    #[default]
    Auto,
    /// First and last in the tcx chains.
    Tcx,
    /// Direct-action cls_bpf filters first and last in clsact qdiscs that are already there.
    Clsact,
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

/// Why this kernel lacks something.
#[derive(Debug)]
pub(crate) enum Unavailable {
    /// Its BTF has no such function (the probe attaches to it).
    NoBtfFunction(&'static str),
    /// It refused to load a program of the type.
    Load(std::io::Error),
    /// A tcx query (of loopback) failed: no tcx before 6.6.
    TcxQuery(Box<ProgramError>),
}

/// Why a back-end is the one used.
#[derive(Debug)]
pub(crate) enum Choice {
    /// The kernel has it.
    Available,
    /// The kernel lacks the better one (for this reason).
    Fallback(Unavailable),
    /// The command line asked for it.
    Asked,
}

/// Why netfilter cannot be observed as asked.
#[derive(Debug)]
pub(crate) enum NoNetfilter {
    NoLinks(Unavailable),
    NoFentry(Unavailable),
    Neither {
        links: Unavailable,
        fentry: Unavailable,
    },
}

/// Ok, or the kernel's reason the feature is unavailable.
pub(crate) fn probe(feature: Feature, btf: &KernelBtf) -> Result<(), Unavailable> {
    let res = match feature {
        Feature::Fentry => {
            let Some(id) = btf.func_id("consume_skb") else {
                return Err(Unavailable::NoBtfFunction("consume_skb"));
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
    res.map_err(Unavailable::Load)
}

/// The netfilter back-end to use, `Links` or `Fentry`, and why; or why there is none.
pub(crate) fn netfilter_backend(
    want: NfBackend,
    btf: &KernelBtf,
) -> Result<(NfBackend, Choice), NoNetfilter> {
    let links = probe(Feature::Netfilter, btf);
    let fentry = probe(Feature::Fentry, btf);
    match (want, links, fentry) {
        (NfBackend::Auto | NfBackend::Links, Ok(()), _) => {
            Ok((NfBackend::Links, Choice::Available))
        }
        (NfBackend::Auto, Err(no_links), Ok(())) => {
            Ok((NfBackend::Fentry, Choice::Fallback(no_links)))
        }
        (NfBackend::Fentry, _, Ok(())) => Ok((NfBackend::Fentry, Choice::Asked)),
        (NfBackend::Links, Err(why), _) => Err(NoNetfilter::NoLinks(why)),
        (NfBackend::Fentry, _, Err(why)) => Err(NoNetfilter::NoFentry(why)),
        (NfBackend::Auto, Err(links), Err(fentry)) => Err(NoNetfilter::Neither { links, fentry }),
    }
}

/// Whether this kernel has tcx (6.6+): a tcx query of loopback fails on older kernels.
fn has_tcx() -> Result<(), Unavailable> {
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress)
        .map(drop)
        .map_err(|e| Unavailable::TcxQuery(Box::new(e)))
}

/// The tc back-end to use, `Tcx` or `Clsact`, and why; or why not the one asked for (tcx).
pub(crate) fn tc_backend(want: TcBackend) -> Result<(TcBackend, Choice), Unavailable> {
    match (want, has_tcx()) {
        (TcBackend::Auto | TcBackend::Tcx, Ok(())) => Ok((TcBackend::Tcx, Choice::Available)),
        (TcBackend::Auto, Err(why)) => Ok((TcBackend::Clsact, Choice::Fallback(why))),
        (TcBackend::Clsact, _) => Ok((TcBackend::Clsact, Choice::Asked)),
        (TcBackend::Tcx, Err(why)) => Err(why),
    }
}
