//! Running commands with one clear line when they fail.
use std::{
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};

/// One line of the set-up's report: what, and its state ("ok", "installing …").
pub fn step(name: &str, state: &str) {
    println!("setup: {name:<28} {state}");
}

/// Runs a command inheriting stdio; fails naming the command.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Runs a command and returns its stdout when it succeeds, `None` otherwise.
pub fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} must run as root (it installs packages and attaches eBPF programs); try: sudo -E cargo xtask {what}");
    }
    Ok(())
}

/// Runs a step of a longer task and says how long it took and whether it failed.
pub fn timed(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let start = Instant::now();
    let res = f();
    println!(
        "xtask: {name} {} in {:.1}s",
        if res.is_ok() { "done" } else { "FAILED" },
        start.elapsed().as_secs_f64()
    );
    res
}
