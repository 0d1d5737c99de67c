//! Build steps that are not plain `cargo build`: machine set-up, building and running the
//! daemon as root, the demo, the full test run, the benchmark and the runs on other kernels
//! (vm-test). `cargo xtask --help`.
mod bench;
mod cmd;
mod daemon;
mod dist;
mod fuzz;
mod image;
mod layers;
mod manifests;
mod setup;
mod vm;

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::{
    cmd::timed,
    daemon::{build, cargo, run_daemon, target_dir, Build, DAEMON_ENV, TESTS},
};

#[derive(Parser)]
#[command(about = "fwmark-trace build tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks (apt packages, nightly rust-src, bpf-linker, mounts).
    Setup,
    /// Set up, then build the daemon (and its eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, and run the daemon as root with these arguments.
    Run {
        #[arg(long)]
        release: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, build and run the self-contained demo (the main job).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run every check and test: fmt, the import layers, clippy (userspace and eBPF), unit and
    /// integration tests (as root), then the kernel matrix (`vm-test --kernel all`).
    Test {
        /// Skip the kernel matrix (a quicker loop while working; CI runs it).
        #[arg(long)]
        no_vm: bool,
        /// Passed to the test binaries (e.g. a test name filter); implies --no-vm.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Lint the eBPF crate with the nightly toolchain for the BPF target.
    ClippyEbpf,
    /// Check the import graph: no circle of files, no import from a lower layer of the daemon
    /// to a higher one (the layers are in xtask/src/layers.rs; part of `test`).
    Layers,
    /// Set up, build (release) and make the OCI image localhost/fwmark-trace:VERSION from
    /// Debian's packages (no registry), loaded into podman.
    Image {
        /// Also write it as an OCI archive.
        #[arg(long, value_name = "FILE")]
        archive: Option<PathBuf>,
        /// Then run its test (part of `test`): trace a host and a container namespace.
        #[arg(long)]
        test: bool,
    },
    /// Set up, build (release) and write target/dist/: the tarball and the .deb.
    Dist {
        /// Then run its test (part of `test`): install the .deb in a clean Debian root.
        #[arg(long)]
        test: bool,
    },
    /// Set up, then fuzz the parsers of untrusted input (fuzz/): every target, or TARGET, for
    /// 5 minutes each unless libFuzzer's ARGS say otherwise (e.g. -- -max_total_time=3600).
    Fuzz {
        target: Option<String>,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build (release) and soak the daemon: mixed traffic and interface churn for N
    /// minutes, RSS over time, events, lost, map occupancy.
    Soak {
        #[arg(long, default_value_t = 5)]
        minutes: u64,
    },
    /// Set up, build (release) and benchmark against baseline, nft monitor trace and bpftrace;
    /// prints a table and writes target/bench/latest.json.
    Bench {
        /// Also run the main daemon modes with this git revision's build (the code before a
        /// change), side by side in the same rounds.
        #[arg(long, value_name = "REV")]
        against: Option<String>,
        /// Passed to `fwmark-trace bench` (e.g. -- --rounds 5 --seconds 5).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Set up, then run the demo and a smoke set of integration tests on Debian's 6.1 and 6.12
    /// kernels, each booted under QEMU by virtme-ng (software emulation); prints a table.
    VmTest {
        #[arg(long, default_value = "all", value_parser = ["6.1", "6.12", "all"])]
        kernel: String,
        /// Run only this shell command in the guest (same set-up), with its exit status.
        #[arg(long)]
        run: Option<String>,
    },
}

/// The userspace packages (the eBPF crate is built for the BPF target by fwmark-trace's build.rs).
const PACKAGES: [&str; 6] = [
    "-p",
    "fwmark-trace",
    "-p",
    "fwmark-trace-common",
    "-p",
    "xtask",
];

fn test(args: &[String]) -> Result<()> {
    cmd::require_root("test")?;
    timed("fmt", || {
        cmd::run(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
    timed("layers", layers::check)?;
    timed("clippy", || {
        cmd::run(cargo().arg("clippy").args(PACKAGES).args([
            "-p",
            TESTS,
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]))
    })?;
    timed("clippy (eBPF)", clippy_ebpf)?;
    timed("unit tests", || {
        cmd::run(cargo().arg("test").args(PACKAGES).arg("--").args(args))
    })?;
    timed("fuzz", fuzz::run)?;
    timed("integration tests", || {
        // The soak test runs the harness's `soak` command: the daemon under test has it.
        let daemon = build(false, Build::Harness)?;
        let mut c = cargo();
        c.args(["test", "-p", TESTS]).env(DAEMON_ENV, daemon);
        if std::env::var_os("RUST_TEST_THREADS").is_none() {
            c.env("RUST_TEST_THREADS", test_threads().to_string());
        }
        cmd::run(c.arg("--").args(args))
    })?;
    timed("manifests", manifests::test)?;
    timed("image", image::test)?;
    timed("package", dist::test)
}

/// Integration tests at once: each has its own namespaces and checks only what its own
/// daemons attached, so they run in parallel; and they mostly wait (a daemon's start, its
/// report interval, `why`'s watch), so more than one per core. Measured on 2 cores: one per
/// core (the harness's default) 148-214 s, 4 threads 100 s, 8 threads 104 s.
/// `RUST_TEST_THREADS` or `-- --test-threads=N` choose otherwise.
fn test_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    cores.max(4)
}

fn clippy_ebpf() -> Result<()> {
    cmd::run(
        Command::new("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "clippy",
                "-p",
                "fwmark-trace-ebpf",
            ])
            .args([
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
            ])
            .args(["--", "-D", "warnings"])
            .env("CARGO_TARGET_DIR", target_dir().join("ebpf-clippy"))
            .env(
                "CARGO_ENCODED_RUSTFLAGS",
                "--cfg=bpf_target_arch=\"x86_64\"",
            )
            .env_remove("RUSTC")
            .env_remove("CARGO"),
    )
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.task {
        Task::Setup => timed("setup", setup::run),
        Task::Build { release } => {
            setup::run().and_then(|_| build(release, Build::Product).map(|_| ()))
        }
        Task::Run { release, args } => {
            setup::run().and_then(|_| run_daemon(release, Build::Product, &args))
        }
        Task::Demo { args } => setup::run().and_then(|_| {
            let mut all = vec!["demo".to_string()];
            all.extend(args);
            run_daemon(true, Build::Product, &all)
        }),
        Task::Test { no_vm, args } => timed("setup", setup::run)
            .and_then(|_| test(&args))
            .and_then(|_| match no_vm || !args.is_empty() {
                true => Ok(()),
                false => timed("kernel matrix", || vm::run("all", None)),
            }),
        Task::ClippyEbpf => clippy_ebpf(),
        Task::Layers => layers::check(),
        Task::Image { archive, test } => {
            setup::run().and_then(|_| image::run(archive.as_deref(), test))
        }
        Task::Dist { test } => setup::run().and_then(|_| match test {
            true => timed("package", dist::test),
            false => dist::run().map(|_| ()),
        }),
        Task::Fuzz { target, args } => {
            setup::run().and_then(|_| fuzz::explore(target.as_deref(), &args))
        }
        Task::Soak { minutes } => setup::run().and_then(|_| {
            run_daemon(
                true,
                Build::Harness,
                &[
                    "soak".into(),
                    "--seconds".into(),
                    (minutes * 60).to_string(),
                ],
            )
        }),
        Task::Bench { against, args } => {
            setup::run().and_then(|_| bench::run(against.as_deref(), &args))
        }
        Task::VmTest { kernel, run } => vm::run(&kernel, run.as_deref()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
