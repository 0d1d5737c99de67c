//! fwmark-trace: traces Linux packet marks (`skb->mark`) across tc, netfilter, routing and
//! sockets, and attributes every changed bit to its registered owner.
//!
//! Data path, one module per arrow:
//! kernel observers (`kernel`) → events (`events`) → tracking (`tracking`) →
//! attribution (`registry`, `attribution`) → outputs (`output`).

pub mod attribution;
pub mod bench;
pub mod cli;
pub mod demo;
pub mod events;
pub mod kernel;
pub mod lab;
pub mod netns;
pub mod nodestate;
pub mod output;
pub mod pipeline_bench;
pub mod registry;
pub mod rendered;
pub mod soak;
pub mod trace;
pub mod tracking;
pub mod why;
