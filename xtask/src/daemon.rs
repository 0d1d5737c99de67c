//! Building the daemon (product or harness, debug or release) with cargo, and running it.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::cmd;

/// The integration tests' package (tests/): not a default member; its tests run the daemon
/// binary found in `DAEMON_ENV`.
pub(crate) const TESTS: &str = "fwmark-trace-tests";
pub(crate) const DAEMON_ENV: &str = "FWMARK_TRACE_BIN";

pub(crate) fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
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

pub(crate) fn run_daemon(release: bool, what: Build, args: &[String]) -> Result<()> {
    cmd::require_root("run")?;
    let bin = build(release, what)?;
    cmd::run(Command::new(bin).args(args))
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
}
