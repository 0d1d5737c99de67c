//! `fwmark-trace demo`: a self-contained tour. Builds a lab (namespaces A and B over a veth),
//! installs nft rules in A that set, OR and clear mark bits the way real owners do (kube-proxy's
//! masquerade bit, Tailscale's bypass bit, Calico clearing its per-packet bits, the legacy
//! kubelet drop bit), an `ip rule` by fwmark, a socket with SO_MARK (wg-quick's 0xCA6C), sends
//! a little UDP from A to B, traces it inside A and cleans everything up.
use std::{net::UdpSocket, os::fd::AsRawFd, thread, time::Duration};

use anyhow::Result;
use clap::Args;

use crate::{
    lab::{self, Lab},
    trace::{self, TraceArgs},
};

#[derive(Args, Clone, Debug)]
pub struct DemoArgs {
    /// One JSON object per line instead of readable lines.
    #[arg(long)]
    pub json: bool,
    /// How long to trace.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

/// The rules the demo installs in namespace A (one table, removed with the namespace).
pub const RULESET: &str = r#"
table inet fwmark_demo {
    chain out_mangle {
        type route hook output priority mangle; policy accept;
        udp dport 5201 meta mark set meta mark | 0x4000 comment "kube-proxy: masquerade bit"
        udp dport 5202 meta mark set meta mark | 0x8000 comment "legacy kubelet: KUBE-MARK-DROP"
    }
    chain out_filter {
        type filter hook output priority filter; policy accept;
        udp dport 5201 meta mark set meta mark | 0x80000 comment "tailscale: bypass bit"
        udp dport 5201 ct mark set meta mark comment "connmark save"
        meta mark & 0x8000 == 0x8000 drop comment "legacy KUBE-FIREWALL: drop marked"
    }
    chain post_mangle {
        type filter hook postrouting priority mangle; policy accept;
        meta mark set meta mark & 0xffe4ffff comment "calico: clear accept/pass/scratch bits 0x1b0000"
    }
    chain post_srcnat {
        type filter hook postrouting priority srcnat; policy accept;
        meta mark & 0x4000 == 0x4000 meta mark set meta mark ^ 0x4000 comment "kube-proxy: clear masquerade bit"
    }
}
"#;

/// wg-quick's default fwmark (51820).
const SOCKET_MARK: u32 = 0xCA6C;

/// Sends the demo traffic from the calling thread's namespace (A).
fn traffic() -> Result<()> {
    let plain = UdpSocket::bind("0.0.0.0:0")?;
    let marked = UdpSocket::bind("0.0.0.0:0")?;
    // SAFETY: setsockopt on an open socket with a u32 value.
    let rc = unsafe {
        libc::setsockopt(
            marked.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&SOCKET_MARK as *const u32).cast(),
            4,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    for _ in 0..3 {
        for port in [5201, 5202] {
            // A drop by netfilter surfaces as EPERM to the sender: expected here.
            let _ = plain.send_to(b"fwmark-trace demo", (lab::ADDR_B, port));
        }
        // 0xCA6C contains 0x8000: the legacy KUBE-FIREWALL rule drops it (collision #7 in the
        // owner notes), so this send fails too.
        let _ = marked.send_to(b"fwmark-trace demo", (lab::ADDR_B, 5203));
        thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

pub fn run(args: &DemoArgs) -> Result<()> {
    trace::require_root("fwmark-trace demo")?;
    let lab = Lab::new("demo")?;
    lab.nft(&lab.a, RULESET)?;
    lab.exec(
        &lab.a,
        &[
            "ip",
            "rule",
            "add",
            "fwmark",
            "0x4000/0x4000",
            "lookup",
            "100",
            "pref",
            "1000",
        ],
    )?;
    lab.exec(
        &lab.a,
        &[
            "ip",
            "route",
            "add",
            "10.77.0.0/24",
            "dev",
            lab::VETH_A,
            "table",
            "100",
        ],
    )?;
    eprintln!(
        "fwmark-trace demo: namespaces {} and {} joined by {}/{}; nft table inet fwmark_demo and `ip rule fwmark 0x4000/0x4000 lookup 100` in {}",
        lab.a, lab.b, lab::VETH_A, lab::VETH_B, lab.a
    );
    let targs = TraceArgs {
        json: args.json,
        netns: Some(lab.a.clone()),
        duration: Some(args.duration),
        ring_size: 4 << 20,
        ..Default::default()
    };
    let sender = std::cell::RefCell::new(None);
    let res = trace::run(&targs, || {
        *sender.borrow_mut() = Some(thread::spawn(traffic));
    });
    if let Some(t) = sender.into_inner() {
        if let Ok(Err(err)) = t.join() {
            eprintln!("fwmark-trace demo: traffic: {err:#}");
        }
    }
    drop(lab);
    eprintln!("fwmark-trace demo: namespaces removed");
    res.map(|_| ())
}
