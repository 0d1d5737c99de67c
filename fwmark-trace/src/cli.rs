//! The command line: `trace` (live tracing), `demo` (a self-contained tour in throwaway
//! namespaces) and `registry` (the owner registry).
use clap::{Parser, Subcommand};

use crate::{
    bench::BenchArgs,
    demo::DemoArgs,
    inventory::cli::InventoryArgs,
    pipeline_bench::BenchPipelineArgs,
    recording::ShowArgs,
    registry::{cli::RegistryCmd, RegistryArgs},
    soak::SoakArgs,
    trace::TraceArgs,
    why::WhyArgs,
};

#[derive(Parser, Debug)]
#[command(
    name = "fwmark-trace",
    version,
    about = "Trace Linux packet marks (skb->mark) across tc, netfilter, routing and sockets, and name who changed which bits."
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Attach the observers and print every mark transition and drop.
    Trace(TraceArgs),
    /// Decode and attribute a recording made with `trace --record FILE`.
    Show(ShowArgs),
    /// Build two throwaway network namespaces with mark-changing rules, trace some traffic
    /// through them, print the transitions and clean everything up.
    Demo(DemoArgs),
    /// Watch flows and say where and why their replies died (rp_filter, netfilter drop,
    /// connmark restore, xfrm policy…), with the evidence.
    Why(WhyArgs),
    /// Every place that reads or writes packet-mark or conntrack-mark bits (nft and iptables
    /// rules, ip rules, xfrm, WireGuard, SO_MARK sockets, BPF programs, conntrack), with its
    /// owner, grouped by bit, and the conflicts between owners; `--check` exits 1 on conflicts.
    Inventory(InventoryArgs),
    /// The mark-owner registry: list owners, show one's layout, check owners for overlaps.
    Registry {
        #[command(subcommand)]
        cmd: RegistryCmd,
        #[command(flatten)]
        args: RegistryArgs,
    },
    /// Measure tracing overhead against the alternatives (run by `cargo xtask bench`).
    Bench(BenchArgs),
    /// Run the daemon under mixed traffic and interface churn; report RSS over time (run by
    /// `cargo xtask soak`).
    Soak(SoakArgs),
    /// Measure the userspace pipeline (decode, attribution, JSON) on synthetic events.
    #[command(hide = true)]
    BenchPipeline(BenchPipelineArgs),
}
