//! `cargo xtask dist`: the release artifacts under target/dist/: a tarball (the binary with its
//! eBPF objects embedded, completions, man page, JSON schemas, deploy/ with the systemd unit)
//! and a .deb. And the .deb's test (`cargo xtask test`): installed into the image's Debian
//! root, where there is no Rust, it runs `--version`, `inventory` and a short `trace`.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, ensure, Context, Result};

use crate::{cmd, image};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn dir() -> PathBuf {
    crate::daemon::target_dir().join("dist")
}

/// What the binary prints for `args` (completions, the man page).
fn generate(bin: &Path, args: &[&str], to: &Path) -> Result<()> {
    let out = Command::new(bin).args(args).output()?;
    ensure!(out.status.success(), "{} {args:?} failed", bin.display());
    fs::create_dir_all(to.parent().context("no parent")?)?;
    fs::write(to, out.stdout).with_context(|| format!("writing {}", to.display()))
}

/// The files both artifacts ship, under `root` at the places `layout` gives.
fn install(bin: &Path, root: &Path, layout: &Layout) -> Result<()> {
    let put = |rel: &str| root.join(rel);
    fs::create_dir_all(put(layout.bin))?;
    fs::copy(bin, put(layout.bin).join("fwmark-trace"))?;
    generate(
        bin,
        &["completions", "bash"],
        &put(layout.bash).join("fwmark-trace"),
    )?;
    generate(
        bin,
        &["completions", "zsh"],
        &put(layout.zsh).join("_fwmark-trace"),
    )?;
    generate(
        bin,
        &["completions", "fish"],
        &put(layout.fish).join("fwmark-trace.fish"),
    )?;
    let man = put(layout.man).join("fwmark-trace.1");
    generate(bin, &["man"], &man)?;
    if layout.gzip_man {
        // Debian's policy: man pages compressed, reproducibly (-n: no name or time inside).
        cmd::run(Command::new("gzip").args(["-9nf"]).arg(&man))?;
    }
    fs::create_dir_all(put(layout.schema))?;
    for entry in fs::read_dir(root_dir("schema"))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            fs::copy(&path, put(layout.schema).join(path.file_name().unwrap()))?;
        }
    }
    // The unit and the user it runs as (deploy/systemd/), where the layout installs them.
    for (from, to) in [
        ("fwmark-trace.service", layout.unit),
        ("fwmark-trace.sysusers.conf", layout.sysusers),
    ] {
        let from = root_dir("deploy/systemd").join(from);
        if let Some((dir, name)) = to.filter(|_| from.exists()) {
            fs::create_dir_all(put(dir))?;
            fs::copy(&from, put(dir).join(name))?;
        }
    }
    if let Some(to) = layout.deploy {
        cmd::run(
            Command::new("cp")
                .arg("-r")
                .arg(root_dir("deploy"))
                .arg(put(to)),
        )?;
    }
    Ok(())
}

fn root_dir(rel: &str) -> PathBuf {
    root().join(rel)
}

/// Where each kind of file goes, relative to the artifact's root.
struct Layout {
    bin: &'static str,
    bash: &'static str,
    zsh: &'static str,
    fish: &'static str,
    man: &'static str,
    gzip_man: bool,
    schema: &'static str,
    unit: Option<(&'static str, &'static str)>,
    sysusers: Option<(&'static str, &'static str)>,
    deploy: Option<&'static str>,
}

/// The tarball: bin/ and share/ (deploy/ in it holds the unit).
const TARBALL: Layout = Layout {
    bin: "bin",
    bash: "share/completions",
    zsh: "share/completions",
    fish: "share/completions",
    man: "share/man/man1",
    gzip_man: false,
    schema: "share/schema",
    unit: None,
    sysusers: None,
    deploy: Some("share/deploy"),
};

/// The .deb: Debian's places.
const DEB: Layout = Layout {
    bin: "usr/bin",
    bash: "usr/share/bash-completion/completions",
    zsh: "usr/share/zsh/vendor-completions",
    fish: "usr/share/fish/vendor_completions.d",
    man: "usr/share/man/man1",
    gzip_man: true,
    schema: "usr/share/fwmark-trace/schema",
    unit: Some(("lib/systemd/system", "fwmark-trace.service")),
    sysusers: Some(("usr/lib/sysusers.d", "fwmark-trace.conf")),
    deploy: None,
};

/// Builds both artifacts; returns the .deb's path.
pub fn run() -> Result<PathBuf> {
    let bin = crate::daemon::build_stripped(&dir())?;
    let arch = cmd::output("dpkg", &["--print-architecture"])
        .context("dpkg --print-architecture")?
        .trim()
        .to_owned();
    let machine = match arch.as_str() {
        "amd64" => "x86_64",
        "arm64" => "aarch64",
        other => other,
    };

    let name = format!("fwmark-trace-{VERSION}-{machine}-linux");
    let tree = dir().join(&name);
    let _ = fs::remove_dir_all(&tree);
    install(&bin, &tree, &TARBALL)?;
    let tarball = dir().join(format!("{name}.tar.gz"));
    cmd::run(
        Command::new("tar")
            .args(["-czf"])
            .arg(&tarball)
            .args(["--owner=0", "--group=0", "--sort=name", "-C"])
            .arg(dir())
            .arg(&name),
    )?;
    fs::remove_dir_all(&tree)?;
    println!("dist: {}", tarball.display());

    let tree = dir().join("deb");
    let _ = fs::remove_dir_all(&tree);
    install(&bin, &tree, &DEB)?;
    fs::create_dir_all(tree.join("DEBIAN"))?;
    let commit = cmd::output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    fs::write(
        tree.join("DEBIAN/control"),
        format!(
            "Package: fwmark-trace\n\
             Version: {VERSION}\n\
             Architecture: {arch}\n\
             Maintainer: fwmark-trace developers <fwmark-trace@users.noreply.github.com>\n\
             Depends: nftables, iptables, iproute2\n\
             Section: net\n\
             Priority: optional\n\
             Homepage: https://github.com/fwmark-trace/fwmark-trace\n\
             Description: trace Linux packet marks (skb->mark) and name who changed them\n \
             An eBPF daemon showing every packet mark transition across tc, netfilter,\n \
             routing and sockets, with the owner of the bits (commit {}).\n",
            commit.trim()
        ),
    )?;
    // The unit's user, where systemd is (not in a container's minimal root).
    let postinst = tree.join("DEBIAN/postinst");
    fs::write(
        &postinst,
        "#!/bin/sh\nset -e\n\
         if [ \"$1\" = configure ] && command -v systemd-sysusers >/dev/null; then\n\
         \tsystemd-sysusers fwmark-trace.conf\nfi\n",
    )?;
    fs::set_permissions(&postinst, fs::Permissions::from_mode(0o755))?;
    let deb = dir().join(format!("fwmark-trace_{VERSION}_{arch}.deb"));
    cmd::run(
        Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "--build"])
            .arg(&tree)
            .arg(&deb)
            .stdout(Stdio::null()),
    )?;
    fs::remove_dir_all(&tree)?;
    println!("dist: {}", deb.display());
    Ok(deb)
}

/// The .deb's test: a container of the image's Debian root (no Rust, no binary), the .deb
/// installed with dpkg, then `--version` (naming the commit), `inventory` and a 2-second
/// `trace`, with the image's capabilities.
pub fn test() -> Result<()> {
    let deb = run()?;
    image::base_image()?;
    let commit = cmd::output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    let script = format!(
        "set -e\n\
         if command -v cargo || command -v rustc; then echo 'Rust is here'; exit 1; fi\n\
         dpkg -i /dist/{deb}\n\
         v=$(fwmark-trace --version)\n\
         echo \"installed: $v\"\n\
         case \"$v\" in *'({commit})') ;; *) echo 'the version does not name {commit}'; exit 1;; esac\n\
         fwmark-trace inventory || [ $? = 1 ]  # 1: conflicts found\n\
         fwmark-trace trace --json --duration 2s > /tmp/trace.jsonl\n\
         grep -q '\"kind\":\"summary\"' /tmp/trace.jsonl\n\
         echo package test passed\n",
        deb = deb.file_name().unwrap().to_string_lossy(),
        commit = commit.trim(),
    );
    let out = image::as_agent()
        .arg("-v")
        .arg(format!("{}:/dist:ro", dir().display()))
        .args([&image::base_tag(), "bash", "-c", &script])
        .output()
        .context("starting podman run")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("the .deb's test failed ({}):\n{text}", out.status);
    }
    for line in text
        .lines()
        .filter(|l| l.starts_with("installed:") || l.ends_with("passed"))
    {
        println!("package: {line}");
    }
    Ok(())
}
