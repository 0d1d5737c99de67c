//! `fwmark-trace bench-pipeline`: how many events per second the userspace pipeline (decode →
//! attribution → JSON) handles on one core, fed with synthetic raw records through the same
//! code path the ring buffer consumer uses. Used by `cargo xtask bench`.
use std::{
    io,
    time::{Duration, Instant},
};

use anyhow::Result;
use clap::Args;
use fwmark_trace_common::Event;
use serde::Serialize;

use crate::{
    attribution::Attributor,
    decode::Decoder,
    fixtures,
    output::{summary::Summary, Format, Output},
    pipeline::Pipeline,
    registry::Registry,
};

#[derive(Args, Clone, Debug)]
pub(crate) struct BenchPipelineArgs {
    /// Number of synthetic events to push through the pipeline.
    #[arg(long, default_value_t = 2_000_000)]
    pub(crate) events: u64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct PipelineResult {
    pub(crate) events: u64,
    pub(crate) seconds: f64,
    pub(crate) events_per_second: f64,
}

pub(crate) fn run(args: &BenchPipelineArgs) -> Result<PipelineResult> {
    let topology = fixtures::topology();
    let mut pipeline = Pipeline {
        decoder: Decoder::new(topology, [(12, "NETFILTER_DROP".to_string())].into()),
        attributor: Attributor::new(Registry::builtin()?),
    };
    let mut out = Output::to_writer(Format::Json, Box::new(io::BufWriter::new(io::sink())));
    out.set_registry(pipeline.attributor.registry());
    let raw: Vec<Event> = (0..4096).map(fixtures::synthetic).collect();
    let mut summary = Summary::default();
    let start = Instant::now();
    for i in 0..args.events {
        // What the ring buffer consumer does with each record (`trace::Run::drain`).
        let ev = pipeline.event(&raw[(i % 4096) as usize]);
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
