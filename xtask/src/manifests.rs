//! The Kubernetes manifests' offline check (`cargo xtask test`): deploy/kustomize/base
//! validated against the schemas of a pinned Kubernetes version by kubernetes-validate (they
//! ship with it: no network), strictly (an unknown field fails).
use std::{fs, path::PathBuf, process::Command};

use anyhow::{bail, ensure, Context, Result};

use crate::cmd;

/// The oldest Kubernetes release still commonly run that the manifests must suit.
const KUBERNETES: &str = "1.30.0";
/// kubernetes-validate, pinned: its schemas are the test's input.
const VALIDATOR_VERSION: &str = "1.37.0";

fn base() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/kustomize/base")
}

/// A Python venv under target/ (Debian's Python refuses pip installs into the system).
fn venv() -> PathBuf {
    crate::daemon::target_dir().join("python")
}

fn validator() -> PathBuf {
    venv().join("bin/kubernetes-validate")
}

/// The setup step: kubernetes-validate installed from PyPI into the venv, once.
pub fn setup() -> Result<()> {
    let have = Command::new(validator()).arg("--version").output();
    if have.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == VALIDATOR_VERSION) {
        cmd::step("kubernetes-validate", "ok");
        return Ok(());
    }
    cmd::step(
        "kubernetes-validate",
        &format!("installing {VALIDATOR_VERSION} into {}", venv().display()),
    );
    cmd::run(Command::new("python3").args(["-m", "venv"]).arg(venv()))?;
    cmd::run(
        Command::new(venv().join("bin/pip"))
            .args(["install", "--quiet"])
            .arg(format!("kubernetes-validate=={VALIDATOR_VERSION}")),
    )
}

/// The files kustomization.yaml lists under `resources:` (a plain list of file names).
fn resources(kustomization: &str) -> Vec<String> {
    kustomization
        .lines()
        .skip_while(|l| !l.starts_with("resources:"))
        .skip(1)
        .take_while(|l| l.starts_with("  ") || l.trim().is_empty())
        .filter_map(|l| l.trim().strip_prefix("- ").map(str::to_owned))
        .collect()
}

pub fn test() -> Result<()> {
    let dir = base();
    let kustomization = fs::read_to_string(dir.join("kustomization.yaml"))
        .context("reading deploy/kustomize/base/kustomization.yaml")?;
    let listed = resources(&kustomization);
    // Every manifest in the directory is applied: none forgotten in the list, none missing.
    let mut present: Vec<String> = fs::read_dir(&dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    present.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    ensure!(
        sorted == present,
        "kustomization.yaml lists {listed:?} but the directory holds {present:?}"
    );

    let mut files: Vec<PathBuf> = listed.iter().map(|f| dir.join(f)).collect();
    // Rendered as `kubectl apply -k` would, when kubectl is here (it is not Debian's): the
    // kustomization's own fields (namespace, labels) then get validated in place.
    if cmd::output("kubectl", &["version", "--client"]).is_some() {
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(&dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "kubectl kustomize failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let rendered = crate::daemon::target_dir().join("kustomize-base.yaml");
        fs::write(&rendered, out.stdout)?;
        files.push(rendered);
    }
    let out = Command::new(validator())
        .args(["--strict", "--kubernetes-version", KUBERNETES])
        .args(&files)
        .output()
        .context("running kubernetes-validate (cargo xtask setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // It exits 0 on warnings (e.g. a kind it has no schema for): fail on those too.
    if !out.status.success() || !text.lines().all(|l| l.starts_with("INFO")) {
        bail!(
            "the manifests are not valid Kubernetes {KUBERNETES}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!(
        "manifests: {} files valid for Kubernetes {KUBERNETES}",
        files.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_the_listed_files() {
        let k = "kind: Kustomization\nresources:\n  - a.yaml\n\n  - b.yaml\nimages:\n  - name: x\n";
        assert_eq!(resources(k), ["a.yaml", "b.yaml"]);
    }
}
