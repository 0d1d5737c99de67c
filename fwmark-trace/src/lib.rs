//! fwmark-trace: traces Linux packet marks (`skb->mark`) across tc, netfilter, routing and
//! sockets, and attributes every changed bit to its registered owner.
//!
//! Data path, one module per arrow:
//! kernel observers (`kernel`) → events (`events`) → tracking (`tracking`) →
//! attribution (`registry`, `attribution`) → outputs (`output`).
