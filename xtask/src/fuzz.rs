//! The fuzz targets (fuzz/, cargo-fuzz): one per parser of untrusted input, each over its
//! committed corpus (fuzz/corpus/TARGET) and the inputs that once broke it
//! (fuzz/regressions/TARGET).
//!
//! `cargo xtask test` runs every target briefly and deterministically: a fixed seed, a fixed
//! number of runs, and what it finds kept in a scratch directory (never in the committed
//! corpus). `cargo xtask fuzz [TARGET] [-- ARGS]` fuzzes for longer, keeping what it finds in
//! target/fuzz-corpus/TARGET; ARGS go to libFuzzer.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::{
    cmd::{self, output, step},
    daemon::target_dir,
};

/// The cargo-fuzz release the runs are made with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Runs per target in the test run: 4-40 s each on 2 cores (the recording and iptables-save
/// targets are the slowest), about 2 minutes for all six.
const TEST_RUNS: u32 = 100_000;

/// Per target, when `cargo xtask fuzz` is given no libFuzzer limit of its own.
const EXPLORE_SECONDS: u32 = 300;

/// One input taking longer than this is a failure (a parser that hangs).
const TIMEOUT_SECONDS: u32 = 10;

/// Set-up step: installs the pinned cargo-fuzz when it is missing (or another release).
pub(crate) fn setup() -> Result<()> {
    let have = output("cargo-fuzz", &["--version"]).unwrap_or_default();
    if have.split_whitespace().nth(1) == Some(CARGO_FUZZ_VERSION) {
        step("cargo-fuzz", "ok");
        return Ok(());
    }
    step(
        "cargo-fuzz",
        &format!("installing {CARGO_FUZZ_VERSION} (a few minutes)"),
    );
    cmd::run(Command::new("cargo").args([
        "install",
        "--locked",
        "--force",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))
}

fn project_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ is in the project root")
}

fn fuzz_dir() -> PathBuf {
    project_root().join("fuzz")
}

/// The fuzz targets: fuzz/fuzz_targets/*.rs, sorted.
fn targets() -> Result<Vec<String>> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut out: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(str::to_owned))
        .collect();
    out.sort();
    Ok(out)
}

/// `cargo fuzz SUBCOMMAND` with the nightly toolchain (cargo-fuzz needs it), from the project
/// root. No sanitizer: the parsers are safe Rust, so what fuzzing finds is panics (debug
/// assertions and overflow checks on), hangs and runaway memory, which libFuzzer sees without
/// one; AddressSanitizer would make every run 4-5 times slower and ten times bigger. The fuzz
/// targets need no eBPF object: AYA_BUILD_SKIP spares its build (fwmark-trace's build.rs).
fn cargo_fuzz(subcommand: &str) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz", subcommand])
        .args(["--sanitizer", "none"])
        .current_dir(project_root())
        .env("AYA_BUILD_SKIP", "1")
        .env_remove("RUSTC")
        .env_remove("CARGO");
    c
}

/// Fuzzes `target`: new inputs go to `scratch`, the committed ones are read only.
fn fuzz(target: &str, scratch: &Path, libfuzzer_args: &[String]) -> Result<()> {
    fs::create_dir_all(scratch)?;
    let mut c = cargo_fuzz("run");
    c.arg(target).arg(scratch);
    for kind in ["corpus", "regressions"] {
        let dir = fuzz_dir().join(kind).join(target);
        if dir.is_dir() {
            c.arg(dir);
        }
    }
    c.arg("--")
        .arg(format!("-timeout={TIMEOUT_SECONDS}"))
        .args(libfuzzer_args);
    cmd::run(&mut c).with_context(|| {
        format!("fuzz target {target} failed: the input is in fuzz/artifacts/{target}/; fix the parser and add the input to fuzz/regressions/{target}/")
    })
}

/// The test run's step: every target, `TEST_RUNS` runs from seed 1, from a fresh scratch
/// corpus (the same run every time); quiet but for libFuzzer's final statistics.
pub(crate) fn run() -> Result<()> {
    cmd::run(&mut cargo_fuzz("build"))?;
    let scratch = target_dir().join("fuzz-scratch");
    let _ = fs::remove_dir_all(&scratch);
    let args = [
        "-seed=1".to_owned(),
        format!("-runs={TEST_RUNS}"),
        "-verbosity=0".to_owned(),
        "-print_final_stats=1".to_owned(),
    ];
    for target in targets()? {
        fuzz(&target, &scratch.join(&target), &args)?;
    }
    Ok(())
}

/// `cargo xtask fuzz [TARGET] [-- ARGS]`: each target (or TARGET) in turn, for
/// `EXPLORE_SECONDS` unless ARGS say otherwise; what is found stays in target/fuzz-corpus/.
pub(crate) fn explore(target: Option<&str>, args: &[String]) -> Result<()> {
    let all = targets()?;
    let chosen: Vec<String> = match target {
        Some(t) if all.iter().any(|a| a == t) => vec![t.to_owned()],
        Some(t) => bail!("no fuzz target {t:?} (there are: {})", all.join(", ")),
        None => all,
    };
    let mut args = args.to_vec();
    if !args
        .iter()
        .any(|a| a.starts_with("-runs=") || a.starts_with("-max_total_time="))
    {
        args.push(format!("-max_total_time={EXPLORE_SECONDS}"));
    }
    for t in chosen {
        fuzz(&t, &target_dir().join("fuzz-corpus").join(&t), &args)?;
    }
    Ok(())
}
