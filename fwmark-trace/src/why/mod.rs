//! Why replies die: the verdict on a flow's two paths and the node state (`verdict`), and
//! nftables' own trace of it (`nftrace`). The `why` command (commands/why.rs) runs them.
pub(crate) mod nftrace;
pub(crate) mod verdict;
