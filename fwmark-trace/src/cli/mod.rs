//! The command line: the commands (clap), the logger every diagnostic goes through, and the
//! exit code — 0 nothing found, 1 found (a lost reply, overlapping or conflicting owners), 2 an error (clap's
//! own usage errors exit 2 too, among them every out-of-bounds value: see `bounds`), 141 a
//! report whose reader went away (`| head`), quietly.
mod args;
mod bounds;

use std::{io::Write, process::ExitCode};

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use log::{Level, LevelFilter};

use self::args::{
    DemoArgs, InventoryArgs, LogFormat, RegistryArgs, RegistryCmd, ShowArgs, TraceArgs, WhyArgs,
};
use crate::{
    commands::{self, demo, print, show, trace, why, Outcome, STDOUT},
    output::text::escape_lines,
};

#[derive(Parser, Debug)]
#[command(
    name = "fwmark-trace",
    version = concat!(env!("CARGO_PKG_VERSION"), " (", env!("FWMARK_TRACE_COMMIT"), ")"),
    about = "Trace Linux packet marks (skb->mark) across tc, netfilter, routing and sockets, and name who changed which bits.",
    after_help = "Exit status: 0 nothing found, 1 found (a lost reply, overlapping or conflicting owners), 2 error."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Only warnings and errors on stderr.
    #[arg(short, long, global = true)]
    quiet: bool,
    /// More detail on stderr (-v: debug, -vv: trace). RUST_LOG overrides both.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// How diagnostics on stderr are written.
    #[arg(long, global = true, value_enum, default_value_t)]
    log_format: LogFormat,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Attach the observers and print every mark transition and drop.
    // Boxed: its flags are most of the command line's size.
    Trace(Box<TraceArgs>),
    /// Decode and attribute a recording made with `trace --record FILE`.
    Show(ShowArgs),
    /// Build two throwaway network namespaces with mark-changing rules, trace some traffic
    /// through them, print the transitions and clean everything up.
    Demo(DemoArgs),
    /// Watch flows and say where and why their replies died (rp_filter, netfilter drop,
    /// connmark restore, xfrm policy…), with the evidence. Exits 1 when a reply was lost.
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff).
    Man,
    /// Measure tracing overhead against the alternatives (run by `cargo xtask bench`).
    #[cfg(feature = "bench")]
    Bench(crate::commands::bench::BenchArgs),
    /// Run the daemon under mixed traffic and interface churn; report RSS over time (run by
    /// `cargo xtask soak`).
    #[cfg(feature = "bench")]
    Soak(crate::commands::bench::soak::SoakArgs),
    /// Measure the userspace pipeline (decode, attribution, JSON) on synthetic events.
    #[cfg(feature = "bench")]
    #[command(hide = true)]
    BenchPipeline(crate::commands::bench::pipeline::BenchPipelineArgs),
}

/// Exit 2.
const ERROR: u8 = 2;
/// The status of a command whose stdout was closed by its reader (`| head`): what a SIGPIPE
/// would give (128 + 13), without a word. `trace` says so instead (exit 2): a daemon's reader
/// going away is worth a line.
const CLOSED_STDOUT: u8 = 141;
/// Whether `err` is stdout closed by its reader.
fn closed_stdout(err: &anyhow::Error) -> bool {
    let pipe = err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    });
    pipe && err.chain().any(|e| e.to_string() == STDOUT)
}

/// Whether a panic is `print!`'s on a closed stdout (commands outside `cli` print with it).
fn closed_stdout_panic(payload: &(dyn std::any::Any + Send)) -> bool {
    let text = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or_default();
    text.starts_with("failed printing to stdout")
        && text.contains(&format!("os error {}", libc::EPIPE))
}

/// One diagnostic as a line of `format`, without its newline.
fn log_line(format: LogFormat, level: Level, text: &str) -> String {
    match format {
        LogFormat::Text => {
            let prefix = match level {
                Level::Error => "error: ",
                Level::Warn => "warning: ",
                Level::Info => "",
                Level::Debug | Level::Trace => "debug: ",
            };
            // Names from the node (interfaces, chains, owners) are in these lines.
            format!("fwmark-trace: {prefix}{}", escape_lines(text))
        }
        // serde_json escapes control characters: the object stays on one line.
        LogFormat::Json => serde_json::json!({
            "time": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            "level": level.as_str().to_ascii_lowercase(),
            "message": text,
        })
        .to_string(),
    }
}

/// Diagnostics on stderr, one line each: `fwmark-trace: …`, `fwmark-trace: warning: …`, or
/// JSON objects (`--log-format json`).
fn init_logging(cli: &Cli) {
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => LevelFilter::Warn,
        (false, 0) => LevelFilter::Info,
        (false, 1) => LevelFilter::Debug,
        (false, _) => LevelFilter::Trace,
    };
    let format = cli.log_format;
    env_logger::Builder::new()
        // Other crates (aya) only when something is wrong, unless asked.
        .filter_level(LevelFilter::Warn)
        .filter_module("fwmark_trace", level)
        .parse_env("RUST_LOG")
        .format(move |f, record| {
            let text = record.args().to_string();
            writeln!(f, "{}", log_line(format, record.level(), &text))
        })
        .init();
}

/// A command that reports what it saw but finds nothing to exit 1 for.
fn clean<T>(r: Result<T>) -> Result<Outcome> {
    r.map(|_| Outcome::Clean)
}

fn run(cli: &Cli) -> Result<Outcome> {
    match &cli.cmd {
        Cmd::Trace(args) => clean(trace::run(&args.config(), || {})),
        Cmd::Show(args) => show::show(&args.config()),
        Cmd::Demo(args) => clean(demo::run(&args.config())),
        Cmd::Why(args) => why::run(&args.config()).map(|lost| match lost {
            true => Outcome::Found,
            false => Outcome::Clean,
        }),
        Cmd::Inventory(args) => commands::inventory::run(&args.config()),
        Cmd::Registry { cmd, args } => commands::registry::run(&cmd.request(), &args.sources()),
        Cmd::Completions { shell } => {
            // Into memory first: clap_complete panics on a failed write.
            let mut text = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "fwmark-trace", &mut text);
            clean(print(text))
        }
        Cmd::Man => {
            let mut text = Vec::new();
            clap_mangen::Man::new(Cli::command()).render(&mut text)?;
            clean(print(text))
        }
        #[cfg(feature = "bench")]
        Cmd::Bench(args) => clean(crate::commands::bench::run(args)),
        #[cfg(feature = "bench")]
        Cmd::Soak(args) => clean(crate::commands::bench::soak::run(args)),
        #[cfg(feature = "bench")]
        Cmd::BenchPipeline(args) => crate::commands::bench::pipeline::run(args)
            .and_then(|r| clean(print(serde_json::to_string(&r).unwrap_or_default() + "\n"))),
    }
}

/// The program: parse, run, one clear error line on failure.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    // `print!` panics on a closed stdout: that panic says nothing, unwinds (every guard cleans
    // up: namespaces, nft tables) and ends the command quietly below.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !closed_stdout_panic(info.payload()) {
            default_hook(info);
        }
    }));
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&cli)));
    let daemon = matches!(cli.cmd, Cmd::Trace(_));
    match ran {
        Ok(Ok(Outcome::Clean)) => ExitCode::SUCCESS,
        Ok(Ok(Outcome::Found)) => ExitCode::from(1),
        Ok(Err(err)) if !daemon && closed_stdout(&err) => ExitCode::from(CLOSED_STDOUT),
        Ok(Err(err)) => {
            log::error!("{err:#}");
            ExitCode::from(ERROR)
        }
        Err(panic) if closed_stdout_panic(&*panic) => ExitCode::from(CLOSED_STDOUT),
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn registry_check_takes_names_and_the_global_owners() {
        let cli =
            Cli::try_parse_from(["fwmark-trace", "registry", "check", "--owners", "a,b", "c"])
                .unwrap();
        let Cmd::Registry { cmd, args } = cli.cmd else {
            panic!("not registry")
        };
        assert!(
            matches!(cmd.request(), crate::commands::registry::Request::Check(o) if o == ["c"])
        );
        assert_eq!(args.sources().profile, ["a", "b"]);
    }

    #[test]
    fn log_lines_in_both_formats() {
        assert_eq!(
            log_line(LogFormat::Text, Level::Warn, "x"),
            "fwmark-trace: warning: x"
        );
        let line = log_line(LogFormat::Json, Level::Error, "bad\nname\x1b");
        assert!(!line.contains('\n') && !line.contains('\x1b'), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["message"], "bad\nname\x1b");
        assert!(
            v["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
    }

    #[test]
    fn closed_stdout_is_told_apart() {
        let pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(closed_stdout(&anyhow::Error::new(pipe).context(STDOUT)));
        let pipe = std::io::Error::from(std::io::ErrorKind::BrokenPipe);
        assert!(!closed_stdout(
            &anyhow::Error::new(pipe).context("writing output file f")
        ));
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(!closed_stdout(&anyhow::Error::new(full).context(STDOUT)));
        let payload: Box<dyn std::any::Any + Send> = Box::new(format!(
            "failed printing to stdout: {}",
            std::io::Error::from_raw_os_error(libc::EPIPE)
        ));
        assert!(closed_stdout_panic(&*payload));
        assert!(!closed_stdout_panic(&"index out of bounds"));
    }

    #[test]
    fn man_page_and_completions_come_from_the_definitions() {
        let mut man = Vec::new();
        clap_mangen::Man::new(Cli::command())
            .render(&mut man)
            .unwrap();
        let man = String::from_utf8(man).unwrap();
        assert!(
            man.contains("fwmark\\-trace") && man.contains("Exit status"),
            "{man}"
        );
        let mut bash = Vec::new();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut Cli::command(),
            "fwmark-trace",
            &mut bash,
        );
        let bash = String::from_utf8(bash).unwrap();
        assert!(
            bash.contains("--nf-observers") && bash.contains("why"),
            "completions"
        );
    }
}
