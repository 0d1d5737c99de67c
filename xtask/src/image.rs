//! `cargo xtask image`: the daemon's OCI image, built without a container registry: a Debian
//! root file system from Debian's own packages (mmdebstrap), the release binary (its eBPF
//! objects are embedded) added, imported into podman. And its test (`cargo xtask test`): the
//! image traces a throwaway namespace of the host and another container's namespace with only
//! the capabilities the README documents.
use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Instant,
};

use anyhow::{bail, ensure, Context, Result};

use crate::cmd;

/// What the daemon runs: the inventory reads the ruleset with these tools.
const PACKAGES: &[&str] = &["nftables", "iptables", "iproute2"];
const SUITE: &str = "bookworm";
const MIRRORS: &[&str] = &[
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
];

/// The capabilities the image runs with (the README's and the DaemonSet's set).
pub const CAPS: &[&str] = &[
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_NET_ADMIN",
    "CAP_SYS_ADMIN",
    "CAP_SYS_PTRACE",
    "CAP_SYSLOG",
    "CAP_DAC_READ_SEARCH",
];

pub fn tag() -> String {
    format!("localhost/fwmark-trace:{}", env!("CARGO_PKG_VERSION"))
}

/// The Debian root without the daemon (the .deb's test installs into it).
pub fn base_tag() -> String {
    format!("localhost/fwmark-trace-base:{SUITE}")
}

fn dir() -> PathBuf {
    crate::daemon::target_dir().join("image")
}

/// podman as this machine runs it: crun refuses hybrid cgroups, runc with cgroupfs does not.
pub fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
    c
}

/// `podman run` with explicit limits (the defaults podman derives here are refused).
pub fn podman_run() -> Command {
    let mut c = podman();
    c.args([
        "run",
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
    ]);
    c
}

/// `podman run` as the agent runs: once, in the host's network and process namespaces, with
/// the documented capabilities only and the host's BTF.
pub fn as_agent() -> Command {
    let mut c = podman_run();
    c.args([
        "--rm",
        "--net",
        "host",
        "--pid",
        "host",
        "--cap-drop",
        "ALL",
    ]);
    for cap in CAPS {
        c.args(["--cap-add", cap]);
    }
    c.args(["-v", "/sys/kernel/btf:/sys/kernel/btf:ro"]);
    c
}

/// The root file system as a tarball, cached by what goes into it (a rerun reuses it; a
/// changed package list builds a new one, about 3 minutes).
fn base_rootfs() -> Result<PathBuf> {
    let tar = dir().join(format!("base-{SUITE}-minbase-{}.tar", PACKAGES.join("-")));
    if tar.exists() {
        return Ok(tar);
    }
    fs::create_dir_all(dir())?;
    println!("image: building a Debian {SUITE} root with mmdebstrap (a few minutes, once)");
    let part = tar.with_extension("part");
    cmd::run(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", "--format=tar", "--quiet"])
            .arg(format!("--include={}", PACKAGES.join(",")))
            .args([SUITE, path_str(&part)?])
            .args(MIRRORS),
    )?;
    fs::rename(&part, &tar)?;
    Ok(tar)
}

/// Imports `tar` as `tag` unless podman has it from this very tarball (its path and time are
/// in the image's comment), replacing the older image of that tag.
fn import(tar: &Path, tag: &str, changes: &[String]) -> Result<()> {
    let stamp = format!("{} {:?}", tar.display(), fs::metadata(tar)?.modified()?);
    let comment = cmd::output("podman", &["image", "inspect", "-f", "{{.Comment}}", tag]);
    if comment.is_some_and(|c| c.trim() == stamp) {
        return Ok(());
    }
    let old = cmd::output("podman", &["image", "inspect", "-f", "{{.Id}}", tag]);
    let mut c = podman();
    c.args(["import", "--quiet", "--message", &stamp]);
    for change in changes {
        c.args(["--change", change]);
    }
    let out = c.arg(tar).arg(tag).stdout(Stdio::null()).status()?;
    ensure!(
        out.success(),
        "podman import {} {tag} failed",
        tar.display()
    );
    // The replaced image, unless a container still uses it (then it stays, untagged).
    if let Some(old) = old {
        let _ = podman()
            .args(["rmi", old.trim()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    Ok(())
}

/// The Debian root imported as `base_tag()`; returns its tarball.
pub fn base_image() -> Result<PathBuf> {
    let base = base_rootfs()?;
    import(&base, &base_tag(), &[])?;
    Ok(base)
}

/// Builds the release daemon and both images; returns the daemon's tag.
pub fn build() -> Result<String> {
    let bin = crate::daemon::build_stripped(&dir())?;
    let base = base_image()?;
    // The image's tarball: the root, and the daemon appended at /usr/bin.
    let stage = dir().join("stage");
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(stage.join("usr/bin"))?;
    fs::copy(&bin, stage.join("usr/bin/fwmark-trace"))?;
    let tar = dir().join("fwmark-trace.tar");
    fs::copy(&base, &tar)?;
    cmd::run(
        Command::new("tar")
            .args(["--append", "--owner=0", "--group=0", "-f"])
            .arg(&tar)
            .arg("-C")
            .arg(&stage)
            .arg("./usr/bin/fwmark-trace"),
    )?;
    let tag = tag();
    let revision = cmd::output("git", &["rev-parse", "HEAD"]).unwrap_or_default();
    import(
        &tar,
        &tag,
        &[
            r#"ENTRYPOINT ["/usr/bin/fwmark-trace"]"#.into(),
            r#"CMD ["trace", "--json"]"#.into(),
            format!(
                "LABEL org.opencontainers.image.revision={}",
                revision.trim()
            ),
        ],
    )?;
    println!("image: {tag}");
    Ok(tag)
}

/// `cargo xtask image [--archive FILE] [--test]`.
pub fn run(archive: Option<&Path>, test: bool) -> Result<()> {
    let tag = build()?;
    if let Some(file) = archive {
        let _ = fs::remove_file(file);
        cmd::run(
            podman()
                .args(["save", "--quiet", "--format", "oci-archive", "-o"])
                .arg(file)
                .arg(&tag),
        )?;
        println!("image: wrote {}", file.display());
    }
    match test {
        true => crate::cmd::timed("image", || check(&tag)),
        false => Ok(()),
    }
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("a non-UTF-8 path")
}

/// Commands run when dropped, failure or not: what a test set up goes away.
#[derive(Default)]
pub struct Cleanup(Vec<Command>);

impl Cleanup {
    pub fn push(&mut self, mut c: Command) {
        c.stdout(Stdio::null()).stderr(Stdio::null());
        self.0.push(c);
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in self.0.iter_mut().rev() {
            let _ = c.status();
        }
    }
}

/// The mark the tests' nft rules set on their UDP.
const MARK: &str = "0x1234";

/// nft commands setting `MARK` on the UDP a namespace sends to port 9.
fn mark_rules() -> String {
    format!(
        "add table inet fwt_image; \
         add chain inet fwt_image out {{ type filter hook output priority 0; }}; \
         add rule inet fwt_image out udp dport 9 meta mark set {MARK}"
    )
}

/// A shell command sending UDP to port 9 of the loopback for a few seconds.
const SEND: &str = "for i in $(seq 50); do echo x > /dev/udp/127.0.0.1/9 || true; sleep 0.1; done";

/// The image's test: the daemon in a container traces a namespace of the host, then another
/// container's, each with an nft rule marking UDP; a transition to the mark must show up.
pub fn test() -> Result<()> {
    check(&build()?)
}

fn check(tag: &str) -> Result<()> {
    let id = std::process::id();
    let mut cleanup = Cleanup::default();

    // A named namespace of the host, under /run/netns (mounted into the container).
    let netns = format!("fwt-image-{id}");
    cmd::run(Command::new("ip").args(["netns", "add", &netns]))?;
    let mut delete = Command::new("ip");
    delete.args(["netns", "delete", &netns]);
    cleanup.push(delete);
    let in_netns = |args: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &netns]).args(args);
        c
    };
    cmd::run(&mut in_netns(&["ip", "link", "set", "lo", "up"]))?;
    cmd::run(&mut in_netns(&["nft", &mark_rules()]))?;
    trace(tag, &netns, in_netns(&["bash", "-c", SEND])).context("tracing a host namespace")?;

    // Another container (no network of its own but its loopback), traced by its pid.
    let peer = format!("fwt-image-peer-{id}");
    cmd::run(
        podman_run()
            .args(["-d", "--rm", "--network", "none", "--name", &peer])
            .args(["--entrypoint", "sleep", tag, "120"])
            .stdout(Stdio::null()),
    )?;
    let mut remove = podman();
    remove.args(["rm", "--force", "--time", "0", &peer]);
    cleanup.push(remove);
    let pid = cmd::output("podman", &["inspect", "-f", "{{.State.Pid}}", &peer])
        .context("asking podman for the container's pid")?;
    let pid = pid.trim();
    let in_peer = |args: &[&str]| {
        let mut c = Command::new("nsenter");
        c.args(["-t", pid, "-n"]).args(args);
        c
    };
    cmd::run(&mut in_peer(&["nft", &mark_rules()]))?;
    trace(
        tag,
        &format!("/proc/{pid}/ns/net"),
        in_peer(&["bash", "-c", SEND]),
    )
    .context("tracing another container's namespace")?;
    Ok(())
}

/// Runs the image's `trace --json --netns NETNS` with the documented capabilities only; once
/// it is ready, runs `traffic`; fails unless a transition to `MARK` was reported.
fn trace(tag: &str, netns: &str, mut traffic: Command) -> Result<()> {
    let mut c = as_agent();
    c.args(["-v", "/run/netns:/run/netns:ro"])
        .args([tag, "trace", "--json", "--netns", netns, "--duration", "8s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    println!("image: {c:?}");
    let start = Instant::now();
    let mut daemon = c.spawn().context("starting podman run")?;
    let stdout = daemon.stdout.take().context("no stdout")?;
    let mut lines = Vec::new();
    let mut sender: Option<Child> = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if sender.is_none() && line.contains(r#""kind":"ready""#) {
            sender = Some(traffic.stdout(Stdio::null()).spawn()?);
        }
        lines.push(line);
    }
    let out = daemon.wait_with_output()?;
    if let Some(mut s) = sender {
        let _ = s.kill();
        let _ = s.wait();
    }
    let marked = lines.iter().any(|l| {
        serde_json::from_str::<serde_json::Value>(l)
            .is_ok_and(|v| v["kind"] == "transition" && v["mark"]["new"] == MARK)
    });
    if !out.status.success() || !marked {
        bail!(
            "no transition to {MARK} in {netns} after {:.1}s ({}):\nstdout:\n{}\nstderr:\n{}",
            start.elapsed().as_secs_f64(),
            out.status,
            lines.join("\n"),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!(
        "image: traced {netns}: transition to {MARK} seen ({} records)",
        lines.len()
    );
    Ok(())
}
