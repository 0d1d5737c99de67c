//! Why replies die: the verdict on a flow's two paths and the node state (`verdict`),
//! nftables' own trace of it (`nftrace`), and both in words and JSON (`render`, above the
//! outputs it writes through). The `why` command (commands/why.rs) runs them.
pub(crate) mod nftrace;
pub(crate) mod render;
pub(crate) mod verdict;
