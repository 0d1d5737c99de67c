//! A throwaway two-host lab: network namespaces A and B joined by a veth pair, removed again on
//! drop (deleting a namespace takes its veth end, nft tables, ip rules and routes with it).
//! Used by `demo`, the integration tests and the benchmark, so they all build the same thing.
use std::{
    io::Write,
    net::UdpSocket,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context, Result};

pub const ADDR_A: &str = "10.77.0.1";
pub const ADDR_B: &str = "10.77.0.2";
pub const ADDR6_A: &str = "fd77::1";
pub const ADDR6_B: &str = "fd77::2";
/// Interface names (each lives in its own namespace, so they never clash between labs).
pub const VETH_A: &str = "veth-a";
pub const VETH_B: &str = "veth-b";

/// A UDP socket (IPv4, or IPv6 when `v6`) whose packets start with `SO_MARK` = `mark` (0: none).
pub fn udp_socket(v6: bool, mark: u32) -> Result<UdpSocket> {
    let sock = UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" })?;
    if mark != 0 {
        // SAFETY: setsockopt on an open socket with a u32 value.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                4,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("setting SO_MARK");
        }
    }
    Ok(sock)
}

pub struct Lab {
    pub a: String,
    pub b: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Lab {
    /// Creates `fwmt-<tag>-<pid>-<n>-{a,b}` with addresses on both ends, links up.
    pub fn new(tag: &str) -> Result<Self> {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let base = format!("fwmt-{tag}-{}-{n}", std::process::id());
        let lab = Self {
            a: format!("{base}-a"),
            b: format!("{base}-b"),
        };
        for ns in [&lab.a, &lab.b] {
            run("ip", &["netns", "add", ns])?;
        }
        run(
            "ip",
            &[
                "-n", &lab.a, "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B,
                "netns", &lab.b,
            ],
        )?;
        for (ns, dev, v4, v6) in [
            (&lab.a, VETH_A, ADDR_A, ADDR6_A),
            (&lab.b, VETH_B, ADDR_B, ADDR6_B),
        ] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    dev,
                    "nodad",
                ],
            )?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// Runs a command inside namespace `ns`.
    pub fn exec(&self, ns: &str, cmd: &[&str]) -> Result<String> {
        let mut args = vec!["netns", "exec", ns];
        args.extend_from_slice(cmd);
        run("ip", &args)
    }

    /// Loads an nft ruleset (nft -f syntax) into namespace `ns`.
    pub fn nft(&self, ns: &str, ruleset: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running nft (is nftables installed?)")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "nft -f failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn delete(&self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.delete();
    }
}
