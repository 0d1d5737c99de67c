//! `why --nftrace` (opt-in, it changes the ruleset while it runs): a temporary table sets
//! `meta nftrace set 1` on the selected traffic before every other chain, `nft monitor trace`
//! runs alongside, and the rules that dropped a flow's packets are named exactly.
//!
//! The table goes with the daemon however it ends: a guard child waits for the end of its
//! input (a pipe from the daemon, closed when the watch ends or the daemon dies, kill -9
//! included) and then deletes it. Its name carries the daemon's pid; one left by a dead
//! daemon all the same (the guard killed too) is removed at the next start. (nftables' `owner`
//! flag would have the kernel remove it with a socket, but nft 1.0.6, Debian 12's, then prints
//! unreadable JSON for the whole ruleset.)
use std::{
    io::{BufRead, BufReader},
    net::IpAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
};

use std::io::Write as _;

use anyhow::{Context, Result};

use crate::{
    flows::Selection,
    nodestate::nft::{Chain, ChainId},
};

/// The table's name is this with the daemon's pid after it.
const TABLE_PREFIX: &str = "fwmark_trace_nftrace";

fn table() -> String {
    format!("{TABLE_PREFIX}_{}", std::process::id())
}

/// A rule that ended a traced packet with `drop`, and the packet's addresses.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DropRule {
    pub(crate) chain: ChainId,
    /// The rule as nft printed it.
    pub(crate) rule: String,
    /// From the `packet:` line nft printed for that trace id.
    pub(crate) saddr: Option<IpAddr>,
    pub(crate) daddr: Option<IpAddr>,
}

/// nft match expressions for the selection (each rule sets nftrace on one side of it).
fn matches(sel: &Selection) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(f) = &sel.flow {
        let ip = if f.src.is_ipv6() { "ip6" } else { "ip" };
        for (a, b) in [(f.src, f.dst), (f.dst, f.src)] {
            out.push(format!(
                "{ip} saddr {a} {ip} daddr {b} meta l4proto {}",
                f.proto
            ));
        }
    } else if let Some(h) = &sel.host {
        let ip = if h.is_ipv6() { "ip6" } else { "ip" };
        out.push(format!("{ip} saddr {h}"));
        out.push(format!("{ip} daddr {h}"));
    } else if let Some(p) = sel.port {
        out.push(format!("th sport {p}"));
        out.push(format!("th dport {p}"));
    } else if let Some(p) = &sel.proto {
        out.push(format!("meta l4proto {p}"));
    }
    out
}

pub(crate) fn ruleset(sel: &Selection, table: &str) -> String {
    let rules: String = matches(sel)
        .iter()
        .map(|m| format!("  {m} meta nftrace set 1\n"))
        .collect();
    format!(
        "table inet {table} {{\n chain pre {{\n  type filter hook prerouting priority -400; policy accept;\n{rules} }}\n chain out {{\n  type filter hook output priority -400; policy accept;\n{rules} }}\n}}\n"
    )
}

/// Tables of daemons no longer running (kernels without the owner flag keep them).
fn remove_leftovers() {
    let Ok(out) = Command::new("nft")
        .args(["list", "tables", "inet"])
        .output()
    else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.trim().strip_prefix("table inet ") else {
            continue;
        };
        let pid = name
            .strip_prefix(TABLE_PREFIX)
            .and_then(|p| p.strip_prefix('_'))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|p| !std::path::Path::new(&format!("/proc/{p}")).exists()) {
            let _ = Command::new("nft")
                .args(["delete", "table", "inet", name])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The running monitor and its table; dropping it stops the monitor and removes the table.
pub(crate) struct NfTrace {
    /// Deletes the table once its input (our pipe) ends.
    guard: Child,
    monitor: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl NfTrace {
    /// Installs the table and starts the monitor in the calling thread's namespace.
    pub(crate) fn start(sel: &Selection) -> Result<Self> {
        remove_leftovers();
        let table = table();
        // First the guard: from here on the table cannot outlive us.
        let guard = Command::new("sh")
            .args([
                "-c",
                r#"cat > /dev/null; nft delete table inet "$0" 2> /dev/null"#,
            ])
            .arg(&table)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .context("running the nftrace table's guard (sh)")?;
        // Dropped on error: the guard's input ends and it removes whatever was made.
        let mut this = Self {
            guard,
            monitor: None,
            lines: Arc::new(Mutex::new(Vec::new())),
        };
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("running nft")?;
        nft.stdin
            .take()
            .context("nft stdin")?
            .write_all(ruleset(sel, &table).as_bytes())?;
        if !nft.wait()?.success() {
            anyhow::bail!("could not install the nftrace table");
        }
        let monitor = this.monitor.insert(
            Command::new("nft")
                .args(["monitor", "trace"])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .context("running nft monitor trace")?,
        );
        let out = monitor.stdout.take().context("nft monitor stdout")?;
        let sink = this.lines.clone();
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(mut v) = sink.lock() {
                    v.push(l);
                }
            }
        });
        Ok(this)
    }

    /// Stops the monitor and returns the drop verdicts it saw.
    pub(crate) fn finish(mut self) -> Vec<DropRule> {
        self.stop_monitor();
        // Give the reader thread the last buffered lines.
        thread::sleep(std::time::Duration::from_millis(100));
        let lines = self.lines.lock().map(|v| v.clone()).unwrap_or_default();
        parse(&lines)
    }
}

impl NfTrace {
    fn stop_monitor(&mut self) {
        if let Some(mut m) = self.monitor.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

impl Drop for NfTrace {
    fn drop(&mut self) {
        self.stop_monitor();
        // The end of its input: the guard deletes the table (waited for, so that what is read
        // next is the node's own ruleset).
        drop(self.guard.stdin.take());
        let _ = self.guard.wait();
    }
}

/// The address after `key` among a line's words (`ip saddr 10.0.0.1` → 10.0.0.1; the
/// `ether saddr` before it is not one).
fn addr_after(words: &[&str], key: &str) -> Option<IpAddr> {
    words
        .windows(2)
        .find_map(|w| (w[0] == key).then(|| w[1].parse().ok()).flatten())
}

/// `inet f in` → the chain.
fn chain_id(s: &str) -> Option<ChainId> {
    let mut words = s.split_whitespace();
    Some(ChainId {
        family: words.next()?.parse().ok()?,
        table: words.next()?.to_owned(),
        name: words.next()?.to_owned(),
    })
}

/// Pairs each `(verdict drop)` rule line with its trace id's `packet:` line.
pub(crate) fn parse(lines: &[String]) -> Vec<DropRule> {
    let mut packets: Vec<(&str, &str)> = Vec::new();
    let mut out = Vec::new();
    for l in lines {
        let Some(rest) = l.strip_prefix("trace id ") else {
            continue;
        };
        let Some((id, rest)) = rest.split_once(' ') else {
            continue;
        };
        if let Some((_, pkt)) = rest.split_once(" packet: ") {
            packets.push((id, pkt));
        } else if let Some((chain, rule)) = rest.split_once(" rule ") {
            let (Some(rule), Some(chain)) = (rule.strip_suffix("(verdict drop)"), chain_id(chain))
            else {
                continue;
            };
            let packet: Vec<&str> = packets
                .iter()
                .rev()
                .find(|(i, _)| *i == id)
                .map_or("", |(_, p)| *p)
                .split_whitespace()
                .collect();
            out.push(DropRule {
                chain,
                rule: rule.trim().to_owned(),
                saddr: addr_after(&packet, "saddr"),
                daddr: addr_after(&packet, "daddr"),
            });
        }
    }
    out
}

/// The drop rule that concerns the flow between `a` and `b` (either direction).
pub(crate) fn for_flow(drops: &[DropRule], a: IpAddr, b: IpAddr) -> Option<&DropRule> {
    drops.iter().rev().find(|d| {
        let pair = (d.saddr, d.daddr);
        pair == (Some(a), Some(b)) || pair == (Some(b), Some(a))
    })
}

/// Our own table is not one of the node's chains.
pub(crate) fn is_ours(c: &Chain) -> bool {
    c.id.table.starts_with(TABLE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_drop_verdicts_with_their_packet() {
        let lines: Vec<String> = [
            "trace id ec3b inet t out packet: oif \"lo\" ip saddr 10.0.0.1 ip daddr 10.0.0.2 udp dport 9",
            "trace id ec3b inet t out rule udp dport 9 meta nftrace set 1 (verdict continue)",
            "trace id 37e3 inet f in packet: iif \"a2\" ether saddr 7a:2e:1b:00:00:01 ether daddr 7a:2e:1b:00:00:02 ip saddr 10.0.0.2 ip daddr 10.0.0.1 udp sport 9",
            "trace id 37e3 inet f in rule udp sport 9 meta mark & 0x00004000 == 0x00000000 drop (verdict drop)",
        ]
        .map(String::from)
        .to_vec();
        let drops = parse(&lines);
        assert_eq!(drops.len(), 1);
        assert_eq!(drops[0].chain.to_string(), "inet f/in");
        assert_eq!(
            drops[0].rule,
            "udp sport 9 meta mark & 0x00004000 == 0x00000000 drop"
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(for_flow(&drops, ip("10.0.0.1"), ip("10.0.0.2")).is_some());
        assert!(for_flow(&drops, ip("10.0.0.1"), ip("10.0.0.3")).is_none());
    }

    #[test]
    fn ruleset_traces_both_directions() {
        let sel = Selection {
            port: Some(7),
            ..Default::default()
        };
        let r = ruleset(&sel, "t");
        assert!(
            r.contains("th sport 7 meta nftrace set 1")
                && r.contains("th dport 7 meta nftrace set 1"),
            "{r}"
        );
        assert!(r.contains("table inet t {") && r.contains("priority -400"));
    }
}
