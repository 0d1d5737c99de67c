//! A throwaway two-host lab: network namespaces A and B joined by a veth pair, removed again on
//! drop (deleting a namespace takes its veth end, nft tables, ip rules and routes with it).
//! Used by `demo`, the integration tests and the benchmark, so they all build the same thing.
use std::{
    io::Write,
    net::UdpSocket,
    os::fd::AsRawFd,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};

pub const ADDR_A: &str = "10.77.0.1";
pub const ADDR_B: &str = "10.77.0.2";
pub const ADDR6_A: &str = "fd77::1";
pub const ADDR6_B: &str = "fd77::2";
/// Interface names (each lives in its own namespace, so they never clash between labs).
pub const VETH_A: &str = "veth-a";
pub const VETH_B: &str = "veth-b";

/// The rules the demo installs in namespace A (the inventory tests too), one table per owner
/// named the way the owner names its own (removed with the namespace).
pub const DEMO_RULESET: &str = r#"
table ip kube-proxy {
    chain mark-for-masquerade {
        type filter hook output priority -100; policy accept;
        udp dport 5201 meta mark set meta mark | 0x4000
    }
    chain masquerading {
        type filter hook postrouting priority 100; policy accept;
        meta mark & 0x4000 == 0x4000 meta mark set meta mark ^ 0x4000
    }
}
table ip kubelet {
    chain KUBE-MARK-DROP {
        type route hook output priority mangle; policy accept;
        udp dport 5202 meta mark set meta mark | 0x8000
    }
    chain KUBE-FIREWALL {
        type filter hook output priority filter; policy accept;
        meta mark & 0x8000 == 0x8000 drop
    }
}
table inet calico {
    chain cali-POSTROUTING {
        type filter hook postrouting priority mangle; policy accept;
        meta mark set meta mark & 0xffe4ffff
    }
}
"#;

/// Sets SO_MARK on a socket: its packets start with this mark.
pub fn set_mark(sock: &UdpSocket, mark: u32) -> Result<()> {
    if mark == 0 {
        return Ok(());
    }
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
    Ok(())
}

/// A UDP socket (IPv4, or IPv6 when `v6`) whose packets start with `SO_MARK` = `mark` (0: none).
pub fn udp_socket(v6: bool, mark: u32) -> Result<UdpSocket> {
    let sock = UdpSocket::bind(if v6 { "[::]:0" } else { "0.0.0.0:0" })?;
    set_mark(&sock, mark)?;
    Ok(sock)
}

/// The service address B answers on in the two-path lab (UDP echo on port 7).
pub const SERVICE: &str = "10.9.9.9";

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

/// `ip -n NS ARGS…` with ARGS written as one string ("rule add fwmark 0x4000 lookup 100").
pub fn ip(ns: &str, args: &str) -> Result<String> {
    let mut all = vec!["-n", ns];
    all.extend(args.split_whitespace());
    run("ip", &all)
}

/// Runs a command inside namespace `ns`.
pub fn exec(ns: &str, cmd: &[&str]) -> Result<String> {
    let mut args = vec!["netns", "exec", ns];
    args.extend_from_slice(cmd);
    run("ip", &args)
}

/// Loads an nft ruleset (nft -f syntax) into namespace `ns`.
pub fn nft(ns: &str, ruleset: &str) -> Result<()> {
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

/// Sets `net.ipv4.conf.<key>` values inside namespace `ns`.
pub fn sysctl(ns: &str, kv: &[(&str, &str)]) -> Result<()> {
    for (k, v) in kv {
        exec(ns, &["sysctl", "-qw", &format!("net.ipv4.conf.{k}={v}")])?;
    }
    Ok(())
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
        ip(
            &lab.a,
            &format!(
                "link add {VETH_A} type veth peer name {VETH_B} netns {}",
                lab.b
            ),
        )?;
        for (ns, dev, v4, v6) in [
            (&lab.a, VETH_A, ADDR_A, ADDR6_A),
            (&lab.b, VETH_B, ADDR_B, ADDR6_B),
        ] {
            ip(ns, &format!("addr add {v4}/24 dev {dev}"))?;
            ip(ns, &format!("addr add {v6}/64 dev {dev} nodad"))?;
            ip(ns, &format!("link set {dev} up"))?;
            ip(ns, "link set lo up")?;
        }
        Ok(lab)
    }

    /// One iperf3 run from A to B (`client_args` e.g. "-t 3 -J -u -l 64 -b 0"): starts a
    /// one-off server in B, returns the client's stdout.
    pub fn iperf(&self, port: u16, client_args: &str) -> Result<Vec<u8>> {
        let mut server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.b,
                "iperf3",
                "-s",
                "-1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (is it installed?)")?;
        thread::sleep(Duration::from_millis(300));
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.a,
                "iperf3",
                "-c",
                ADDR_B,
                "-p",
                &port.to_string(),
            ])
            .args(client_args.split_whitespace())
            .stderr(Stdio::null())
            .output();
        let _ = server.wait();
        Ok(out?.stdout)
    }

    /// A second path for the "disappearing reply" scenarios: veth a2/b2 (10.78.0.0/24), B serves
    /// SERVICE on its lo, A routes SERVICE via veth-a in main and via a2 in table 100 for
    /// `fwmark 0x4000/0x4000` (policy routing by mark), and B sends everything for A's ADDR_A
    /// back through b2, so replies arrive on a2.
    pub fn add_second_path(&self) -> Result<()> {
        let (a, b) = (self.a.as_str(), self.b.as_str());
        ip(a, &format!("link add a2 type veth peer name b2 netns {b}"))?;
        ip(a, "addr add 10.78.0.1/24 dev a2")?;
        ip(b, "addr add 10.78.0.2/24 dev b2")?;
        ip(a, "link set a2 up")?;
        ip(b, "link set b2 up")?;
        ip(b, &format!("addr add {SERVICE}/32 dev lo"))?;
        ip(
            a,
            &format!("route add {SERVICE}/32 via 10.77.0.2 dev {VETH_A}"),
        )?;
        ip(
            a,
            &format!("route add {SERVICE}/32 via 10.78.0.2 dev a2 table 100"),
        )?;
        ip(a, "rule add fwmark 0x4000/0x4000 lookup 100 pref 1000")?;
        ip(b, &format!("route add {ADDR_A}/32 via 10.78.0.1 dev b2"))?;
        // ARP towards A's a2 must come from B's link address: with SERVICE as sender, A's
        // rp_filter would refuse the ARP itself and the reply would never leave B.
        sysctl(
            b,
            &[
                ("all.rp_filter", "0"),
                ("b2.rp_filter", "0"),
                ("default.rp_filter", "0"),
                ("all.arp_announce", "2"),
                ("b2.arp_announce", "2"),
            ],
        )
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

/// UDP echo on `addr:port` inside `ns` until `stop` is set.
pub fn echo_server(
    ns: &str,
    addr: &str,
    port: u16,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<()>> {
    let (ns, addr) = (ns.to_owned(), addr.to_owned());
    thread::spawn(move || {
        crate::netns::enter(&ns)?;
        let sock = UdpSocket::bind((addr.as_str(), port))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut buf = [0u8; 512];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(&buf[..n], from);
            }
        }
        Ok(())
    })
}

/// From inside `ns`, sends three requests to `dst:port` from ADDR_A with SO_MARK `mark`;
/// true when a reply came back.
pub fn echo_client(ns: &str, dst: &str, port: u16, mark: u32) -> Result<bool> {
    let (ns, dst) = (ns.to_owned(), dst.to_owned());
    thread::spawn(move || -> Result<bool> {
        crate::netns::enter(&ns)?;
        let sock = UdpSocket::bind((ADDR_A, 0))?;
        set_mark(&sock, mark)?;
        sock.set_read_timeout(Some(Duration::from_millis(300)))?;
        let mut got = false;
        for _ in 0..3 {
            let _ = sock.send_to(b"fwmark-trace", (dst.as_str(), port));
            let mut buf = [0u8; 64];
            got |= sock.recv_from(&mut buf).is_ok();
        }
        Ok(got)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("echo client panicked"))?
}
