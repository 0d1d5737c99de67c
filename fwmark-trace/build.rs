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
    let obj = PathBuf::from(env::var("OUT_DIR")?).join("fwmark-trace");
    if !obj.exists() {
        fs::write(&obj, [])?;
    }
    Ok(())
}
