//! State of the node read from the kernel and tools: nftables chains (priority bands).
pub mod nft;
