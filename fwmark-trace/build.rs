//! Builds the kernel-side crate (fwmark-trace-ebpf) with the nightly toolchain for
//! bpfel-unknown-none and drops the object into OUT_DIR, where `src/kernel/observers.rs`
//! embeds it. `AYA_BUILD_SKIP=1` skips the eBPF build (an empty object is embedded and the
//! daemon refuses to start), which keeps `cargo check`/unit tests fast for pure-logic work.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let ebpf = aya_build::Package {
        name: "fwmark-trace-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../fwmark-trace-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Nightly)?;
    println!("cargo:rerun-if-changed=../fwmark-trace-common/src");
    commit();
    let obj = PathBuf::from(env::var("OUT_DIR")?).join("fwmark-trace");
    if !obj.exists() {
        fs::write(&obj, [])?;
    }
    Ok(())
}

/// `FWMARK_TRACE_COMMIT`: the short git commit `--version` names ("unknown" outside git, e.g.
/// a crate tarball).
fn commit() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=FWMARK_TRACE_COMMIT={commit}");
    // HEAD moves on a checkout, the branch it names on a commit (packed-refs once packed);
    // only files that exist, or cargo would rerun this script on every build.
    let branch = git(&["symbolic-ref", "-q", "HEAD"]);
    let paths = ["HEAD", "packed-refs"]
        .into_iter()
        .map(String::from)
        .chain(branch);
    for path in paths {
        let file = git(&["rev-parse", "--path-format=absolute", "--git-path", &path]);
        if let Some(file) = file.filter(|f| std::path::Path::new(f).exists()) {
            println!("cargo:rerun-if-changed={file}");
        }
    }
}
