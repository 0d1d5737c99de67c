//! Why replies die: the verdict on a flow's two paths and the node state (`verdict`), and
//! nftables' own trace of it (`nftrace`). Their words and JSON are output/why.rs; the `why`
//! command (commands/why.rs) runs them.
pub(crate) mod nftrace;
pub(crate) mod verdict;
