//! fwmark-trace command-line entry point: parse, dispatch, one clear error line on failure.
use std::process::ExitCode;

use clap::Parser;
use fwmark_trace::{
    bench,
    cli::{Cli, Cmd},
    demo, inventory, pipeline_bench, recording, registry, soak, trace, why,
};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let res = match &cli.cmd {
        Cmd::Trace(args) => trace::run(args, || {}).map(|_| ExitCode::SUCCESS),
        Cmd::Show(args) => recording::show(args).map(|s| {
            eprintln!("fwmark-trace: {s}");
            ExitCode::SUCCESS
        }),
        Cmd::Demo(args) => demo::run(args).map(|_| ExitCode::SUCCESS),
        Cmd::Inventory(args) => inventory::cli::run(args),
        Cmd::Registry { cmd, args } => registry::cli::run(cmd, args),
        Cmd::Bench(args) => bench::run(args).map(|_| ExitCode::SUCCESS),
        Cmd::Soak(args) => soak::run(args).map(|_| ExitCode::SUCCESS),
        // Exit 1 when a watched flow lost its reply (scriptable), 0 when all were delivered.
        Cmd::Why(args) => why::run(args).map(|lost| ExitCode::from(u8::from(lost))),
        Cmd::BenchPipeline(args) => pipeline_bench::run(args).map(|r| {
            println!("{}", serde_json::to_string(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }),
    };
    res.unwrap_or_else(|err| {
        eprintln!("fwmark-trace: error: {err:#}");
        ExitCode::FAILURE
    })
}
