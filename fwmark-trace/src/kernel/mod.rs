//! Kernel observers: the eBPF object, how each kind of observer is attached, and the kernel
//! facts (BTF offsets, drop reason names) they need.
pub mod btf;
pub mod counts;
pub mod features;
pub mod netfilter;
pub mod nf_chains;
pub mod observers;
pub mod sys;
pub mod tc_placement;
pub mod tcx;
