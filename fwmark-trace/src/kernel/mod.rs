//! Kernel observers: the eBPF object, how each kind of observer is attached (netfilter links or
//! fentry/fexit, tcx or clsact filters, tracepoints), where the netfilter ones go (`plan`), the
//! kernel facts they need (BTF offsets, drop reason names), what they counted, and how start-up
//! went (`startup`: typed; `output::startup` words it). Nothing here imports the event model or
//! anything above it.
pub(crate) mod btf;
pub(crate) mod counts;
pub(crate) mod features;
pub(crate) mod netfilter;
pub(crate) mod nf_chains;
pub(crate) mod object;
pub(crate) mod observers;
pub(crate) mod plan;
pub(crate) mod startup;
pub(crate) mod sys;
pub(crate) mod tc_placement;
pub(crate) mod tcx;
