//! The kernel object built from fwmark-trace-ebpf (see build.rs): the observers load their
//! programs from it, through aya or raw (`netfilter::RawObject`).
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fwmark-trace"));
