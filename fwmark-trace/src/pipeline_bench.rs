//! `fwmark-trace bench-pipeline`: how many events per second the userspace pipeline (decode →
//! attribution → JSON) handles on one core, fed with synthetic raw records through the same
//! code path the ring buffer consumer uses. Used by `cargo xtask bench`.
use std::{
    io,
    time::{Duration, Instant},
};

use anyhow::Result;
use clap::Args;
use fwmark_trace_common::{kind, layer, tc_dir, tc_slot, tracepoint, Event, Point};
use serde::Serialize;

use crate::{
    events::Decoder,
    nodestate::nft::{self, Chain, NfPlan, PlanMode, Writes},
    output::{summary::Summary, Format, Output},
    registry::Registry,
    tracking::segment::Topology,
};

#[derive(Args, Clone, Debug)]
pub struct BenchPipelineArgs {
    /// Number of synthetic events to push through the pipeline.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PipelineResult {
    pub events: u64,
    pub seconds: f64,
    pub events_per_second: f64,
}

/// A realistic mix: netfilter band transitions, tc observations, drops, IPv4 and IPv6.
pub fn synthetic(i: u64) -> Event {
    let nf = |hook, slot| Point {
        layer: layer::NETFILTER,
        hook,
        slot,
        family: if i.is_multiple_of(4) { 10 } else { 2 },
        ifindex: 2,
        netns: 1,
        priority: 0,
    };
    let (prev, at, k) = match i % 5 {
        0 => (nf(3, 0), nf(3, 2), kind::TRANSITION),
        1 => (nf(3, 2), nf(3, 1), kind::TRANSITION),
        2 => (nf(4, 0), nf(4, 1), kind::TRANSITION),
        3 => (
            Point {
                layer: layer::TC,
                hook: tc_dir::EGRESS,
                slot: tc_slot::FIRST,
                family: 0,
                ifindex: 2,
                netns: 1,
                priority: 0,
            },
            Point {
                layer: layer::TC,
                hook: tc_dir::EGRESS,
                slot: tc_slot::LAST,
                family: 0,
                ifindex: 2,
                netns: 1,
                priority: 0,
            },
            kind::TRANSITION,
        ),
        _ => (
            nf(3, 1),
            Point {
                layer: layer::TRACEPOINT,
                hook: tracepoint::KFREE_SKB,
                slot: 0,
                family: 0,
                ifindex: 2,
                netns: 1,
                priority: 0,
            },
            kind::DROP,
        ),
    };
    let mut ev = Event {
        ts_ns: 1_000_000 + i * 1000,
        packet_id: i / 3,
        at,
        prev,
        old_mark: (i as u32) & 0x4000,
        new_mark: ((i as u32) & 0x4000) | 0x80000,
        kind: k,
        drop_reason: 12,
        ip_version: if i.is_multiple_of(4) { 6 } else { 4 },
        l4_proto: if i.is_multiple_of(2) { 6 } else { 17 },
        sport: 40000 + (i % 1000) as u16,
        dport: 5201,
        ..Default::default()
    };
    ev.saddr[..4].copy_from_slice(&[10, 77, 0, 1]);
    ev.daddr[..4].copy_from_slice(&[10, 77, 0, 2]);
    ev
}

pub fn run(args: &BenchPipelineArgs) -> Result<PipelineResult> {
    let chains = vec![Chain {
        family: "inet".into(),
        table: "bench".into(),
        name: "mangle_out".into(),
        hook: 3,
        priority: -150,
        mark_writers: vec![],
        writes: Writes::default(),
    }];
    let mut topology = Topology {
        plan: Some(NfPlan::new(&chains, PlanMode::Full)),
        chains: [chains, nft::kernel_users()].concat(),
        own_netns: 1,
        ..Default::default()
    };
    topology.ifnames.insert(2, "veth-a".into());
    let mut decoder = Decoder::new(topology, [(12, "NETFILTER_DROP".to_string())].into());
    decoder.registry = Some(Registry::builtin()?);
    let mut out = Output::to_writer(Format::Json, Box::new(io::BufWriter::new(io::sink())));
    let raw: Vec<Event> = (0..4096).map(synthetic).collect();
    let mut summary = Summary::new();
    let start = Instant::now();
    for i in 0..args.events {
        // What the ring buffer consumer does with each record (`trace::drain`).
        let ev = decoder.decode(&raw[(i % 4096) as usize]);
        out.event(&ev)?;
        summary.count(&ev);
    }
    out.flush()?;
    let seconds = start.elapsed().max(Duration::from_nanos(1)).as_secs_f64();
    Ok(PipelineResult {
        events: args.events,
        seconds,
        events_per_second: args.events as f64 / seconds,
    })
}
