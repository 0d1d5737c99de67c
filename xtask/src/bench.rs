//! `cargo xtask bench`: the harness build's `fwmark-trace bench`, and with `--against REV` the
//! daemon of another revision measured in the same rounds (a regression shows side by side).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::{
    cmd,
    daemon::{build_with, cargo, run_daemon, target_dir, Build},
};

pub(crate) fn run(against: Option<&str>, args: &[String]) -> Result<()> {
    let dir = target_dir().join("bench");
    fs::create_dir_all(&dir)?;
    let mut all = vec!["bench".to_string(), "--output".into()];
    all.push(dir.join("latest.json").display().to_string());
    if let Some(rev) = against {
        let (sha, bin) = build_revision(rev, &dir)?;
        all.extend([
            "--against-bin".into(),
            bin.display().to_string(),
            "--against-name".into(),
            sha,
        ]);
    }
    all.extend(args.iter().cloned());
    run_daemon(true, Build::Harness, &all)
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn git() -> Command {
    let mut c = Command::new("git");
    c.arg("-C").arg(workspace());
    c
}

/// Builds `rev`'s daemon the way the bench builds this one (release, harness) in a worktree
/// under `dir`/against-SHA/, removed afterwards; returns (short sha, binary). Its target dir
/// is its own and kept next to the worktree: fwmark-trace's build script builds the eBPF
/// crate inside the target dir, and two checkouts sharing one break each other's builds;
/// kept, the dependencies are not rebuilt by the next run.
fn build_revision(rev: &str, dir: &Path) -> Result<(String, PathBuf)> {
    let sha = cmd::output(
        "git",
        &[
            "-C",
            &workspace().display().to_string(),
            "rev-parse",
            "--verify",
            "--short",
            &format!("{rev}^{{commit}}"),
        ],
    )
    .with_context(|| format!("{rev:?} is not a commit of this repository"))?
    .trim()
    .to_owned();
    let base = dir.join(format!("against-{sha}"));
    let tree = Worktree::add(&base.join("tree"), &sha)?;
    println!("xtask: building {sha} in {}", tree.0.display());
    let mut c = cargo();
    c.current_dir(&tree.0)
        .env("CARGO_TARGET_DIR", base.join("target"));
    let bin = build_with(c, true, Build::Harness).with_context(|| format!("building {sha}"))?;
    Ok((sha, bin))
}

/// A detached git worktree, removed when dropped (also when the build fails).
struct Worktree(PathBuf);

impl Worktree {
    fn add(path: &Path, sha: &str) -> Result<Self> {
        // One left by a run that was killed.
        if path.exists() {
            drop(Worktree(path.to_owned()));
            let _ = fs::remove_dir_all(path);
        }
        let _ = git().args(["worktree", "prune"]).status();
        cmd::run(
            git()
                .args(["worktree", "add", "--detach"])
                .arg(path)
                .arg(sha),
        )?;
        Ok(Worktree(path.to_owned()))
    }
}

impl Drop for Worktree {
    fn drop(&mut self) {
        let removed = git()
            .args(["worktree", "remove", "--force"])
            .arg(&self.0)
            .status();
        if !removed.is_ok_and(|s| s.success()) {
            eprintln!("xtask: could not remove the worktree {}", self.0.display());
        }
    }
}
