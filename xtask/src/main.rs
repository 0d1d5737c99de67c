//! Build steps that are not plain `cargo build`: machine set-up, building and running the
//! daemon as root, the demo, the full test run, the benchmark and the runs on other kernels
//! (vm-test). `cargo xtask --help`.
mod bench;
mod cmd;
mod dist;
mod fuzz;
mod image;
mod manifests;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::Instant,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

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
    /// Set up, then run every check and test: fmt, clippy (userspace and eBPF), unit and
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

/// The integration tests' package (tests/): not a default member; its tests run the daemon
/// binary found in `DAEMON_ENV`.
pub(crate) const TESTS: &str = "fwmark-trace-tests";
pub(crate) const DAEMON_ENV: &str = "FWMARK_TRACE_BIN";

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn timed(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let start = Instant::now();
    let res = f();
    println!(
        "xtask: {name} {} in {:.1}s",
        if res.is_ok() { "done" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    res
}

/// What the daemon is built for: users (the product), or the benchmark and soak harness.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Build {
    Product,
    Harness,
}

/// Builds the daemon and returns the path of its binary (asks cargo, so CARGO_TARGET_DIR
/// and profiles are respected).
pub(crate) fn build(release: bool, what: Build) -> Result<PathBuf> {
    build_with(cargo(), release, what)
}

/// The release binary without its debug info, written into `dir` (a fifth of the size;
/// symbols stay, and the embedded eBPF object is data): what the package and the image ship.
pub(crate) fn build_stripped(dir: &Path) -> Result<PathBuf> {
    let bin = build(true, Build::Product)?;
    std::fs::create_dir_all(dir)?;
    let out = dir.join("fwmark-trace");
    cmd::run(
        Command::new("strip")
            .args(["--strip-debug", "-o"])
            .arg(&out)
            .arg(&bin),
    )?;
    Ok(out)
}

/// `build` with a cargo command set up by the caller (another checkout, its own target dir).
pub(crate) fn build_with(mut c: Command, release: bool, what: Build) -> Result<PathBuf> {
    c.args([
        "build",
        "-p",
        "fwmark-trace",
        "--bin",
        "fwmark-trace",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        c.arg("--release");
    }
    if what == Build::Harness {
        c.args(["--features", "bench"]);
    }
    let out = c
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        anyhow::bail!("cargo build failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["executable"].as_str().map(PathBuf::from))
        .find(|p| p.file_name().is_some_and(|n| n == "fwmark-trace"))
        .context("cargo build did not report the fwmark-trace binary")
}

fn run_daemon(release: bool, what: Build, args: &[String]) -> Result<()> {
    cmd::require_root("run")?;
    let bin = build(release, what)?;
    cmd::run(Command::new(bin).args(args))
}

fn test(args: &[String]) -> Result<()> {
    cmd::require_root("test")?;
    timed("fmt", || {
        cmd::run(cargo().args(["fmt", "--all", "--", "--check"]))
    })?;
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

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
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
