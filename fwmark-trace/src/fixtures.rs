//! Synthetic raw records and a topology to name them with, for unit tests and the pipeline
//! benchmark: a realistic mix of netfilter band transitions, tc chain changes and drops, IPv4
//! and IPv6, as the kernel would report them.
use fwmark_trace_common::{
    kind, layer, nf_hook, nfproto, tc_dir, tc_slot, tracepoint, Event, Point,
};

use crate::{
    kernel::plan::{NfPlan, PlanMode},
    netstack::{NfHook, NftFamily},
    nodestate::nft::{self, Chain, ChainId, ChainOrigin, Writes},
    place::Topology,
};

/// Record `i` of the mix.
pub(crate) fn synthetic(i: u64) -> Event {
    let at = |layer, hook, slot| Point {
        layer,
        hook,
        slot,
        family: 0,
        ifindex: 2,
        netns: 1,
        priority: 0,
    };
    let nf = |hook, slot| Point {
        family: if i.is_multiple_of(4) {
            nfproto::IPV6
        } else {
            nfproto::IPV4
        },
        ..at(layer::NETFILTER, hook, slot)
    };
    let (out, post) = (nf_hook::LOCAL_OUT, nf_hook::POST_ROUTING);
    let (prev, at, k) = match i % 5 {
        0 => (nf(out, 0), nf(out, 2), kind::TRANSITION),
        1 => (nf(out, 2), nf(out, 1), kind::TRANSITION),
        2 => (nf(post, 0), nf(post, 1), kind::TRANSITION),
        3 => (
            at(layer::TC, tc_dir::EGRESS, tc_slot::FIRST),
            at(layer::TC, tc_dir::EGRESS, tc_slot::LAST),
            kind::TRANSITION,
        ),
        _ => (
            nf(out, 1),
            at(layer::TRACEPOINT, tracepoint::KFREE_SKB, 0),
            kind::DROP,
        ),
    };
    let v6 = i.is_multiple_of(4);
    let mut ev = Event {
        ts_ns: 1_000_000 + i * 1000,
        packet_id: i / 3,
        at,
        prev,
        old_mark: (i as u32) & 0x4000,
        new_mark: ((i as u32) & 0x4000) | 0x80000,
        kind: k,
        drop_reason: 12,
        ip_version: if v6 { 6 } else { 4 },
        l4_proto: if i.is_multiple_of(2) { 6 } else { 17 },
        sport: 40000 + (i % 1000) as u16,
        dport: 5201,
        ..Default::default()
    };
    ev.saddr[..4].copy_from_slice(&[10, 77, 0, 1]);
    ev.daddr[..4].copy_from_slice(&[10, 77, 0, 2]);
    ev
}

/// An nft base chain that writes nothing and reaches no writer.
pub(crate) fn chain(
    family: NftFamily,
    table: &str,
    name: &str,
    hook: NfHook,
    priority: i32,
) -> Chain {
    Chain {
        id: ChainId {
            family,
            table: table.into(),
            name: name.into(),
        },
        origin: ChainOrigin::Nft,
        hook,
        priority,
        mark_writers: vec![],
        writes: Writes::default(),
    }
}

/// One mangle chain on output at -150 (and conntrack), every boundary observed, `veth-a` as
/// interface 2, namespace 1.
pub(crate) fn topology() -> Topology {
    let chains = vec![chain(
        NftFamily::Inet,
        "bench",
        "mangle_out",
        NfHook::Output,
        -150,
    )];
    let mut topology = Topology {
        plan: Some(NfPlan::new(&chains, PlanMode::Full)),
        chains: [chains, nft::kernel_users()].concat(),
        own_netns: 1,
        ..Default::default()
    };
    topology.ifnames.insert(2, "veth-a".into());
    topology
}

/// `nft -j list ruleset` with base chains of three families and a regular chain.
#[cfg(test)]
pub(crate) const NFT_SAMPLE: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
      {"chain": {"family": "inet", "table": "fw", "name": "mangle_out", "handle": 1,
                 "type": "route", "hook": "output", "prio": -150, "policy": "accept"}},
      {"chain": {"family": "ip", "table": "fw", "name": "filter_out", "handle": 2,
                 "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}},
      {"chain": {"family": "ip6", "table": "x", "name": "helper", "handle": 3}},
      {"chain": {"family": "bridge", "table": "b", "name": "c", "handle": 4,
                 "hook": "output", "prio": 5}}]}"#;

/// iptables-nft's mangle OUTPUT jumping to a KUBE- chain (MARK target) and going to a cali-
/// chain via a verdict map that jumps further to one writing with `ct mark set`; a chain
/// that writes but is never reached; a jump loop.
#[cfg(test)]
pub(crate) const NFT_RULESET: &str = r#"{"nftables": [
      {"chain": {"family": "ip", "table": "mangle", "name": "OUTPUT", "hook": "output", "prio": -150}},
      {"chain": {"family": "ip", "table": "mangle", "name": "KUBE-MARK-MASQ"}},
      {"chain": {"family": "ip", "table": "mangle", "name": "cali-OUTPUT"}},
      {"chain": {"family": "ip", "table": "mangle", "name": "cali-save"}},
      {"chain": {"family": "ip", "table": "mangle", "name": "ISTIO_OUTPUT"}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "OUTPUT", "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
        {"jump": {"target": "KUBE-MARK-MASQ"}}]}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "OUTPUT", "expr": [
        {"vmap": {"key": {"meta": {"key": "oifname"}},
                  "data": {"set": [["eth0", {"goto": {"target": "cali-OUTPUT"}}]]}}}]}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "KUBE-MARK-MASQ", "expr": [
        {"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "MARK"}}]}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "cali-OUTPUT", "expr": [
        {"jump": {"target": "cali-save"}}, {"jump": {"target": "OUTPUT"}}]}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "cali-save", "expr": [
        {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"meta": {"key": "mark"}}}}]}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "ISTIO_OUTPUT", "expr": [
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1337}}]}}]}"#;
