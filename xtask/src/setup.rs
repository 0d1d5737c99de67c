//! `cargo xtask setup`: install what a fresh machine lacks, check-first so a second run takes
//! a few seconds. Every step prints "ok" or what it installs.
use std::{
    env, fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::cmd::{self, output, step};

/// Debian packages the daemon, the demo, the tests and the benchmark use.
const APT_PACKAGES: &[&str] = &[
    "nftables",
    "iptables",
    "iproute2",
    "bpftool",
    "iperf3",
    "bpftrace",
    "tcpdump",
    "conntrack",
    "procps",
    "ethtool",
    "strace",
    // The inventory tests run a userspace WireGuard device (wg-quick's fwmark) where the
    // kernel has no WireGuard module.
    "wireguard-tools",
    "wireguard-go",
    // The inventory tests run Open vSwitch (userspace datapath: no kernel module needed) for
    // its flows' pkt_mark and ct_mark.
    "openvswitch-switch",
    // The pod tests run podman containers with runc (whose state names pods), from a busybox
    // root filesystem (no registry needed).
    "podman",
    "runc",
    "busybox-static",
    // The image (a Debian root from Debian's packages), the .deb (dpkg-deb is dpkg's), and
    // the venv kubernetes-validate is installed into.
    "mmdebstrap",
    "python3-venv",
];

/// bpf-linker release known to build against the nightly's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn run() -> Result<()> {
    cmd::require_root("setup")?;
    apt()?;
    nightly()?;
    bpf_linker()?;
    crate::fuzz::setup()?;
    crate::manifests::setup()?;
    mounts()?;
    Ok(())
}

fn apt() -> Result<()> {
    apt_install("apt packages", APT_PACKAGES)
}

/// Installs those of `packages` that are not installed yet (one `apt-get update` first).
pub fn apt_install(name: &str, packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step(name, "ok");
        return Ok(());
    }
    step(name, &format!("installing {}", missing.join(" ")));
    cmd::run(Command::new("apt-get").arg("update").arg("-q"))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn nightly() -> Result<()> {
    let have = output("rustup", &["toolchain", "list"]).unwrap_or_default();
    if !have.lines().any(|l| l.starts_with("nightly")) {
        step("nightly toolchain", "installing");
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("the eBPF crate needs a nightly toolchain (rustup toolchain install nightly)")?;
    }
    // rust-src for -Z build-std=core; clippy to lint the eBPF crate.
    let comps = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    for comp in ["rust-src", "clippy"] {
        if comps.lines().any(|l| l.starts_with(comp)) {
            step(&format!("nightly {comp}"), "ok");
            continue;
        }
        step(&format!("nightly {comp}"), "installing");
        cmd::run(Command::new("rustup").args([
            "component",
            "add",
            comp,
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

/// The nightly's own libLLVM (`lib/libLLVM.so.<major>.<minor>-rust-…`) and its major version.
fn nightly_llvm() -> Result<(PathBuf, String)> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])
        .context("asking the nightly toolchain for its sysroot")?;
    let lib = Path::new(sysroot.trim()).join("lib");
    for entry in fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if let Some(ver) = name.strip_prefix("libLLVM.so.") {
            let major = ver.split('.').next().unwrap_or_default().to_owned();
            return Ok((path, major));
        }
    }
    bail!(
        "no libLLVM.so.* in the nightly toolchain ({})",
        lib.display()
    )
}

fn bpf_linker() -> Result<()> {
    // A working bpf-linker runs on its own (its RUNPATH must reach the nightly's libLLVM).
    if output("bpf-linker", &["--version"]).is_some() {
        step("bpf-linker", "ok");
        return Ok(());
    }
    let (libllvm, major) = nightly_llvm()?;
    step(
        "bpf-linker",
        &format!(
            "building {BPF_LINKER_VERSION} against the nightly's LLVM {major} (about a minute)"
        ),
    );
    // A prefix whose lib/ holds the nightly's libLLVM under both names the build and the
    // loader look for; it stays, as bpf-linker's RUNPATH points at it.
    let home = env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| env::var("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = home.join("bpf-linker-llvm");
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib)?;
    for name in [
        "libLLVM.so".into(),
        libllvm.file_name().unwrap_or_default().to_owned(),
    ] {
        let link = lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let feature = format!("llvm-{major}");
    cmd::run(
        Command::new("cargo")
            .args([
                "install",
                "--locked",
                "--force",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args(["--no-default-features", "--features", &feature])
            .env("LLVM_PREFIX", &prefix)
            .env(format!("LLVM_SYS_{major}1_PREFIX"), &prefix),
    )?;
    if output("bpf-linker", &["--version"]).is_none() {
        bail!("bpf-linker was built but does not run (is ~/.cargo/bin on PATH?)");
    }
    Ok(())
}

fn mounts() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    for (fstype, dir) in [("bpf", "/sys/fs/bpf"), ("tracefs", "/sys/kernel/tracing")] {
        let mounted = mounts.lines().any(|l| {
            l.split_whitespace().nth(1) == Some(dir) && l.split_whitespace().nth(2) == Some(fstype)
        });
        if mounted {
            step(&format!("{fstype} at {dir}"), "ok");
            continue;
        }
        step(&format!("{fstype} at {dir}"), "mounting");
        fs::create_dir_all(dir).ok();
        cmd::run(Command::new("mount").args(["-t", fstype, fstype, dir]))?;
    }
    Ok(())
}
