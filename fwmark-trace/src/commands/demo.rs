//! `fwmark-trace demo`: a self-contained tour. Builds a lab (namespaces A and B over a veth),
//! installs nft rules in A that set, OR and clear mark bits the way real owners do (kube-proxy's
//! masquerade bit, the legacy kubelet drop bit and KUBE-FIREWALL, Calico clearing its per-packet
//! bits), an `ip rule` by fwmark, sockets with SO_MARK (wg-quick's 0xCA6C, Tailscale's bypass
//! 0x80000), sends a little UDP from A to B, traces it inside A with the owner profile of such a
//! node, and cleans everything up. Two documented collisions show up as warnings.
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use anyhow::Result;
use log::{info, warn};

use super::{
    trace::{self, TraceConfig},
    why::{self, WhyConfig},
};
use crate::{
    flows::Selection,
    lab::{self, Lab},
    netstack::Proto,
    output::Format,
    registry,
};

/// Which tour.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Scenario {
    /// Owners setting, OR-ing and clearing bits; two documented collisions.
    Marks,
    /// A policy-routed request whose unmarked reply dies in rp_filter, diagnosed by `why`.
    LostReply,
    /// The marks scenario's namespace inventoried (`fwmark-trace inventory`): every reader and
    /// writer with its owner, and the two documented collisions as conflicts.
    Inventory,
}

#[derive(Clone, Debug)]
pub(crate) struct DemoConfig {
    pub(crate) scenario: Scenario,
    pub(crate) format: Format,
    /// How long to trace.
    pub(crate) duration: Duration,
}

/// The software the demo pretends the node runs (`--owners`).
pub(crate) const PROFILE: [&str; 4] = ["kube-proxy", "tailscale", "calico", "wg-quick"];

/// wg-quick's default fwmark (51820) and tailscaled's bypass mark, as SO_MARK.
const WG_QUICK_MARK: u32 = 0xCA6C;
const TAILSCALE_BYPASS: u32 = 0x80000;

/// Sends the demo traffic from the calling thread's namespace (A). Sends that netfilter drops
/// fail with EPERM: expected here.
fn traffic() -> Result<()> {
    let socket = |mark| lab::udp_socket(false, mark);
    let (plain, wg, ts) = (
        socket(0)?,
        socket(WG_QUICK_MARK)?,
        socket(TAILSCALE_BYPASS)?,
    );
    for _ in 0..3 {
        // kube-proxy marks for masquerade, then clears the bit before masquerading.
        let _ = plain.send_to(b"fwmark-trace demo", (lab::ADDR_B, 5201));
        // The legacy kubelet drop bit: KUBE-FIREWALL drops it.
        let _ = plain.send_to(b"fwmark-trace demo", (lab::ADDR_B, 5202));
        // 0xCA6C contains 0x8000: KUBE-FIREWALL drops wg-quick's traffic (collision #7).
        let _ = wg.send_to(b"fwmark-trace demo", (lab::ADDR_B, 5203));
        // Calico's postrouting clear of 0x1B0000 strips Tailscale's bypass bit (collision #1).
        let _ = ts.send_to(b"fwmark-trace demo", (lab::ADDR_B, 5204));
        thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

pub(crate) fn run(args: &DemoConfig) -> Result<()> {
    crate::privileges::check("fwmark-trace demo", crate::privileges::Command::Lab)?;
    match args.scenario {
        Scenario::LostReply => return lost_reply(args),
        Scenario::Inventory => return inventory(args),
        Scenario::Marks => {}
    }
    let lab = marks_lab()?;
    info!(
        "demo: namespaces {} and {} joined by {}/{}; in {}: nft tables kube-proxy, kubelet, calico, `ip rule fwmark 0x4000/0x4000 lookup 100`, sockets with SO_MARK {WG_QUICK_MARK:#x} (wg-quick) and {TAILSCALE_BYPASS:#x} (tailscale); owners: {}",
        lab.a, lab.b, lab::VETH_A, lab::VETH_B, lab.a, PROFILE.join(",")
    );
    let targs = TraceConfig {
        format: args.format,
        netns: Some(lab.a.clone()),
        duration: Some(args.duration),
        // One report of the counted transitions, at the end.
        interval: args.duration,
        registry: registry::RegistrySources {
            profile: PROFILE.map(String::from).to_vec(),
            ..Default::default()
        },
        ..Default::default()
    };
    let sender = std::cell::RefCell::new(None);
    let res = trace::run(&targs, || {
        *sender.borrow_mut() = Some(thread::spawn(traffic));
    });
    if let Some(t) = sender.into_inner() {
        if let Ok(Err(err)) = t.join() {
            warn!("demo: traffic: {err:#}");
        }
    }
    drop(lab);
    info!("demo: namespaces removed");
    res.map(|_| ())
}

/// The marks scenario's lab: namespace A with the demo's nft tables, its `ip rule` and the
/// route of table 100.
fn marks_lab() -> Result<Lab> {
    let lab = Lab::new("demo")?;
    lab::nft(&lab.a, lab::DEMO_RULESET)?;
    lab::ip(&lab.a, "rule add fwmark 0x4000/0x4000 lookup 100 pref 1000")?;
    lab::ip(
        &lab.a,
        &format!("route add 10.77.0.0/24 dev {} table 100", lab::VETH_A),
    )?;
    Ok(lab)
}

/// The inventory of the marks scenario's namespace A, with wg-quick's and Tailscale's marked
/// sockets open in it (as they would be on such a node).
fn inventory(args: &DemoConfig) -> Result<()> {
    use crate::inventory::{render, Inventory, Namespaces, Sources};
    let lab = marks_lab()?;
    let ns = lab.a.clone();
    let sockets = thread::spawn(move || -> Result<_> {
        crate::netns::enter(&ns)?;
        Ok((
            lab::udp_socket(false, WG_QUICK_MARK)?,
            lab::udp_socket(false, TAILSCALE_BYPASS)?,
        ))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("socket thread panicked"))??;
    info!(
        "demo: namespace {} with nft tables kube-proxy, kubelet, calico, `ip rule fwmark 0x4000/0x4000 lookup 100` and UDP sockets with SO_MARK {WG_QUICK_MARK:#x} (wg-quick) and {TAILSCALE_BYPASS:#x} (tailscale); its inventory (`fwmark-trace inventory --netns {}`):",
        lab.a, lab.a
    );
    let reg = crate::registry::Registry::builtin()?;
    let res = Inventory::read(&reg, &Namespaces::One(lab.a.clone()), Sources::default());
    drop(sockets);
    drop(lab);
    let inv = res?;
    let conflicts = inv.conflicts();
    match args.format {
        Format::Json => print!("{}", render::json(&inv, &conflicts)),
        Format::Human => crate::commands::print_text(&render::human(&inv, &conflicts))?,
    }
    info!("demo: namespaces removed");
    Ok(())
}

/// The "disappearing reply" tour: requests marked 0x4000 are policy-routed out via a2, replies
/// come back on a2 unmarked, and rp_filter drops them; `why` explains it.
fn lost_reply(args: &DemoConfig) -> Result<()> {
    let lab = Lab::new("demo")?;
    lab.add_second_path()?;
    lab::sysctl(
        &lab.a,
        &[
            ("all.rp_filter", "1"),
            ("a2.rp_filter", "1"),
            ("all.src_valid_mark", "0"),
        ],
    )?;
    info!(
        "demo: in {}: `ip rule fwmark 0x4000/0x4000 lookup 100` sends {} via a2; replies come back on a2 without the mark; rp_filter=1",
        lab.a,
        lab::SERVICE
    );
    let stop = Arc::new(AtomicBool::new(false));
    let server = lab::echo_server(&lab.b, lab::SERVICE, 7, stop.clone());
    let client = std::cell::RefCell::new(None);
    let why_args = WhyConfig {
        select: Selection {
            port: Some(7),
            proto: Some(Proto::UDP),
            ..Default::default()
        },
        netns: Some(lab.a.clone()),
        duration: args.duration,
        json: args.format == Format::Json,
        ..Default::default()
    };
    let res = why::run_with(&why_args, || {
        let ns = lab.a.clone();
        *client.borrow_mut() = Some(thread::spawn(move || {
            lab::echo_client(&ns, lab::SERVICE, 7, 0x4000)
        }));
    });
    if let Some(c) = client.into_inner() {
        let replied = c.join().ok().and_then(Result::ok).unwrap_or(false);
        info!(
            "demo: the client {} its replies",
            if replied { "got" } else { "never got" }
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = server.join();
    drop(lab);
    info!("demo: namespaces removed. The fix here: restore the mark on replies (`ct mark set meta mark` on output, `meta mark set ct mark` on prerouting) and set src_valid_mark=1.");
    res.map(|_| ())
}
