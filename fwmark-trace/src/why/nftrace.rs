//! `why --nftrace` (opt-in, it changes the ruleset while it runs): a temporary table sets
//! `meta nftrace set 1` on the selected traffic before every other chain, `nft monitor trace`
//! runs alongside, and the rules that dropped a flow's packets are named exactly. The table
//! is removed when the watch ends, also on errors.
use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
};

use anyhow::{Context, Result};

use crate::{nodestate::nft::Chain, tracking::flows::FlowSelect};

const TABLE: &str = "fwmark_trace_nftrace";

/// A rule that ended a traced packet with `drop`, and the packet it saw.
#[derive(Clone, Debug, PartialEq)]
pub struct DropRule {
    /// "inet f in".
    pub chain: String,
    pub rule: String,
    /// The `packet:` line nft printed for that trace id (addresses, ports, mark).
    pub packet: String,
}

/// nft match expressions for the selection (each rule sets nftrace on one side of it).
fn matches(sel: &FlowSelect) -> Vec<String> {
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

pub fn ruleset(sel: &FlowSelect) -> String {
    let rules: String = matches(sel)
        .iter()
        .map(|m| format!("  {m} meta nftrace set 1\n"))
        .collect();
    format!(
        "table inet {TABLE} {{\n chain pre {{\n  type filter hook prerouting priority -400; policy accept;\n{rules} }}\n chain out {{\n  type filter hook output priority -400; policy accept;\n{rules} }}\n}}\n"
    )
}

/// The running monitor and its table; dropping it stops the monitor and removes the table.
pub struct NfTrace {
    monitor: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl NfTrace {
    /// Installs the table and starts the monitor in the calling thread's namespace.
    pub fn start(sel: &FlowSelect) -> Result<Self> {
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .context("running nft")?;
        use std::io::Write;
        nft.stdin
            .take()
            .context("nft stdin")?
            .write_all(ruleset(sel).as_bytes())?;
        if !nft.wait()?.success() {
            anyhow::bail!("could not install the nftrace table");
        }
        let mut monitor = Command::new("nft")
            .args(["monitor", "trace"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("running nft monitor trace")?;
        let out = monitor.stdout.take().context("nft monitor stdout")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(mut v) = sink.lock() {
                    v.push(l);
                }
            }
        });
        Ok(Self { monitor, lines })
    }

    /// Stops the monitor and returns the drop verdicts it saw.
    pub fn finish(mut self) -> Vec<DropRule> {
        let _ = self.monitor.kill();
        let _ = self.monitor.wait();
        // Give the reader thread the last buffered lines.
        thread::sleep(std::time::Duration::from_millis(100));
        let lines = self.lines.lock().map(|v| v.clone()).unwrap_or_default();
        parse(&lines)
    }
}

impl Drop for NfTrace {
    fn drop(&mut self) {
        let _ = self.monitor.kill();
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", TABLE])
            .status();
    }
}

/// Pairs each `(verdict drop)` rule line with its trace id's `packet:` line.
pub fn parse(lines: &[String]) -> Vec<DropRule> {
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
            if let Some(rule) = rule.strip_suffix("(verdict drop)") {
                let packet = packets
                    .iter()
                    .rev()
                    .find(|(i, _)| *i == id)
                    .map_or("", |(_, p)| *p);
                out.push(DropRule {
                    chain: chain.to_owned(),
                    rule: rule.trim().to_owned(),
                    packet: packet.trim().to_owned(),
                });
            }
        }
    }
    out
}

/// The drop rule that concerns this flow (its packet line names both addresses).
pub fn for_flow<'a>(drops: &'a [DropRule], src: &str, dst: &str) -> Option<&'a DropRule> {
    drops
        .iter()
        .rev()
        .find(|d| d.packet.contains(src) && d.packet.contains(dst))
}

/// Our own table is not one of the node's chains.
pub fn is_ours(c: &Chain) -> bool {
    c.table == TABLE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_drop_verdicts_with_their_packet() {
        let lines: Vec<String> = [
            "trace id ec3b inet t out packet: oif \"lo\" ip saddr 10.0.0.1 ip daddr 10.0.0.2 udp dport 9",
            "trace id ec3b inet t out rule udp dport 9 meta nftrace set 1 (verdict continue)",
            "trace id 37e3 inet f in packet: iif \"a2\" ip saddr 10.0.0.2 ip daddr 10.0.0.1 udp sport 9",
            "trace id 37e3 inet f in rule udp sport 9 meta mark & 0x00004000 == 0x00000000 drop (verdict drop)",
        ]
        .map(String::from)
        .to_vec();
        let drops = parse(&lines);
        assert_eq!(drops.len(), 1);
        assert_eq!(drops[0].chain, "inet f in");
        assert_eq!(
            drops[0].rule,
            "udp sport 9 meta mark & 0x00004000 == 0x00000000 drop"
        );
        assert!(for_flow(&drops, "10.0.0.1", "10.0.0.2").is_some());
        assert!(for_flow(&drops, "10.0.0.1", "10.0.0.3").is_none());
    }

    #[test]
    fn ruleset_traces_both_directions() {
        let sel = FlowSelect {
            port: Some(7),
            ..Default::default()
        };
        let r = ruleset(&sel);
        assert!(
            r.contains("th sport 7 meta nftrace set 1")
                && r.contains("th dport 7 meta nftrace set 1"),
            "{r}"
        );
        assert!(r.contains("priority -400"));
    }
}
