//! `fwmark-trace soak` (also `cargo xtask soak --minutes N`): run the real daemon for a while
//! against mixed traffic (UDP bursts, short TCP streams) and interface churn in a lab, sample
//! its `--stats` records (RSS, events, lost, tracked packets) and say whether RSS stayed flat.
use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::Value;

use crate::lab::{self, Lab};

#[derive(Args, Clone, Debug)]
pub(crate) struct SoakArgs {
    /// How long to run.
    #[arg(long, default_value_t = 60)]
    pub(crate) seconds: u64,
}

const RULES: &str = "table inet soak {\n chain out {\n type route hook output priority mangle; policy accept;\n meta mark set meta mark | 0x100\n }\n chain post {\n type filter hook postrouting priority 0; policy accept;\n meta mark set meta mark & 0xfffffeff\n }\n}\n";

/// Sends a burst of UDP datagrams from inside namespace `ns`.
fn burst(ns: &str, count: usize) {
    let ns = ns.to_owned();
    let _ = thread::spawn(move || -> Result<()> {
        crate::netns::enter(&ns)?;
        let sock = lab::udp_socket(false, 0)?;
        for i in 0..count {
            let _ = sock.send_to(b"soak", (lab::ADDR_B, 9000 + (i % 64) as u16));
        }
        Ok(())
    })
    .join();
}

pub(crate) fn run(args: &SoakArgs) -> Result<()> {
    crate::privileges::check("fwmark-trace soak", crate::privileges::Command::Lab)?;
    let lab = Lab::new("soak")?;
    lab::nft(&lab.a, RULES)?;
    let mut daemon = Command::new(std::env::current_exe()?)
        .args(["trace", "--json", "--stats", "2s", "--netns", &lab.a])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = daemon.stdout.take().context("daemon stdout")?;
    let (tx, rx) = mpsc::channel::<Value>();
    let reader = thread::spawn(move || {
        let mut events = 0u64;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v["kind"] == "stats" || v["kind"] == "summary" => {
                    let _ = tx.send(v);
                }
                _ => events += 1,
            }
        }
        events
    });

    let start = Instant::now();
    let deadline = start + Duration::from_secs(args.seconds);
    let mut churn = 0u32;
    while Instant::now() < deadline {
        burst(&lab.a, 2000);
        let t = start.elapsed().as_secs();
        if t.is_multiple_of(5) {
            // Interface churn: a veth appears, the previous one goes.
            let name = format!("churn{churn}");
            let _ = lab::exec(
                &lab.a,
                &[
                    "ip",
                    "link",
                    "add",
                    &name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &format!("{name}p"),
                ],
            );
            let _ = lab::exec(&lab.a, &["ip", "link", "set", &name, "up"]);
            if churn > 0 {
                let _ = lab::exec(
                    &lab.a,
                    &["ip", "link", "del", &format!("churn{}", churn - 1)],
                );
            }
            churn += 1;
        }
        if t % 10 == 3 {
            let _ = lab.iperf(5202, "-t 1");
        }
        thread::sleep(Duration::from_millis(500));
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGINT) };
    let status = daemon.wait()?;
    let events = reader.join().unwrap_or(0);
    let records: Vec<Value> = rx.try_iter().collect();
    if !status.success() {
        bail!("the daemon failed during the soak ({status})");
    }
    let stats: Vec<&Value> = records.iter().filter(|v| v["kind"] == "stats").collect();
    let summary = records.iter().find(|v| v["kind"] == "summary");
    println!(
        "{:>6} {:>10} {:>10} {:>8} {:>9} {:>6}",
        "t(s)", "rss kB", "events", "lost", "tracked", "ifaces"
    );
    for (i, s) in stats.iter().enumerate() {
        println!(
            "{:>6} {:>10} {:>10} {:>8} {:>9} {:>6}",
            (i + 1) * 2,
            s["rss_kb"],
            s["events"],
            s["lost"],
            s["tracked_packets"],
            s["interfaces"]
        );
    }
    let rss: Vec<u64> = stats.iter().filter_map(|s| s["rss_kb"].as_u64()).collect();
    if rss.len() < 4 {
        bail!("too few stats records ({}) to judge RSS", rss.len());
    }
    // After a warm-up fifth, the second half may not grow past the first half's peak by more
    // than 10% + 2 MiB (allocator noise).
    let warm = rss.len() / 5;
    let mid = warm + (rss.len() - warm) / 2;
    let first = rss[warm..mid].iter().copied().max().unwrap_or(0);
    let second = rss[mid..].iter().copied().max().unwrap_or(0);
    let flat = second <= first + first / 10 + 2048;
    println!(
        "events {} (summary {}), lost {}, churned interfaces {churn}",
        events,
        summary.map_or(Value::Null, |s| s["total_events"].clone()),
        summary.map_or(Value::Null, |s| s["lost"].clone()),
    );
    println!(
        "rss first half peak {first} kB, second half peak {second} kB: rss flat: {}",
        if flat { "yes" } else { "NO" }
    );
    if !flat {
        bail!("RSS grew during the soak ({first} kB -> {second} kB)");
    }
    Ok(())
}
