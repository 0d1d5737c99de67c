//! The nftables base chains of the traced network namespace (`nft -j list chains`), and the
//! netfilter observer plan derived from them: besides the first and last priority of every hook,
//! one observer just after each distinct chain priority, so a mark change is pinned to the band
//! holding one chain priority (e.g. "output ipv4, -150..0: inet fw/mangle_out").
use std::process::Command;

use anyhow::{bail, Context, Result};
use fwmark_trace_common::NF_SLOTS;
use serde_json::Value;

use crate::kernel::netfilter::{NfSite, FAMILIES, HOOKS, PRIO_FIRST, PRIO_LAST};

/// A base chain: it sits on a hook at a priority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chain {
    /// nft family: ip, ip6, inet (others never reach the IPv4/IPv6 hooks).
    pub family: String,
    pub table: String,
    pub name: String,
    pub hook: u8,
    pub priority: i32,
}

/// Table name of the kernel's own hook users (not nft chains, but they bound bands too).
pub const KERNEL: &str = "kernel";

/// Kernel hook users worth a band boundary: conntrack attaches the `nf_conn` (and with it the
/// ct mark) at NF_IP_PRI_CONNTRACK = -200 on prerouting and output
/// (include/uapi/linux/netfilter_ipv4.h); an observer just after it separates the ct mark a
/// connection starts with from one a rule sets later.
pub fn kernel_users() -> Vec<Chain> {
    [0, 3]
        .into_iter()
        .map(|hook| Chain {
            family: "inet".into(),
            table: KERNEL.into(),
            name: "conntrack".into(),
            hook,
            priority: -200,
        })
        .collect()
}

impl Chain {
    pub fn label(&self) -> String {
        if self.table == KERNEL {
            return format!("{}@{} (kernel)", self.name, self.priority);
        }
        format!(
            "{} {}/{}@{}",
            self.family, self.table, self.name, self.priority
        )
    }

    /// Whether the chain runs for packets of NFPROTO `family` (2 = IPv4, 10 = IPv6).
    pub fn covers(&self, family: u8) -> bool {
        matches!(
            (self.family.as_str(), family),
            ("inet", _) | ("ip", 2) | ("ip6", 10)
        )
    }
}

pub fn hook_number(name: &str) -> Option<u8> {
    Some(match name {
        "prerouting" => 0,
        "input" => 1,
        "forward" => 2,
        "output" => 3,
        "postrouting" => 4,
        _ => return None,
    })
}

pub fn hook_name(hook: u8) -> &'static str {
    ["prerouting", "input", "forward", "output", "postrouting"]
        .get(hook as usize)
        .copied()
        .unwrap_or("unknown-hook")
}

/// Reads the base chains of the current network namespace. No `nft` binary or no permission is
/// an error; an empty ruleset is not.
pub fn read_chains() -> Result<Vec<Chain>> {
    parse_chains(&nft(&["-j", "list", "chains"])?)
}

/// Runs `nft ARGS` in the calling thread's namespace; its stdout, or its error in one line.
fn nft(args: &[&str]) -> Result<Vec<u8>> {
    let cmd = format!("nft {}", args.join(" "));
    let out = Command::new("nft")
        .args(args)
        .output()
        .with_context(|| format!("running `{cmd}` (is nftables installed?)"))?;
    if !out.status.success() {
        // One line: nft explains itself over several.
        let why = String::from_utf8_lossy(&out.stderr);
        bail!(
            "`{cmd}` failed: {}",
            why.trim().lines().collect::<Vec<_>>().join("; ")
        );
    }
    Ok(out.stdout)
}

/// A (table, chain) name pair.
pub type ChainName = (String, String);

/// Every table and chain name of the current namespace (base and regular chains, iptables-nft's
/// included): what registry owners are recognised by.
pub fn read_names() -> Result<Vec<ChainName>> {
    parse_names(&nft(&["-j", "list", "chains"])?)
}

/// The base chains and every (table, chain) name, from one `nft -j list chains`.
pub fn read_chains_and_names() -> Result<(Vec<Chain>, Vec<ChainName>)> {
    let json = nft(&["-j", "list", "chains"])?;
    Ok((parse_chains(&json)?, parse_names(&json)?))
}

/// The `chain` objects of `nft -j list chains` output.
fn chain_objects(json: &[u8]) -> Result<Vec<Value>> {
    let doc: Value = serde_json::from_slice(json).context("parsing nft JSON output")?;
    let items = doc["nftables"].as_array().cloned().unwrap_or_default();
    Ok(items
        .into_iter()
        .filter_map(|mut i| i.get_mut("chain").map(Value::take))
        .collect())
}

pub fn parse_names(json: &[u8]) -> Result<Vec<ChainName>> {
    Ok(chain_objects(json)?
        .iter()
        .filter_map(|c| {
            let name = |k: &str| c.get(k)?.as_str().map(str::to_owned);
            Some((name("table")?, name("name")?))
        })
        .collect())
}

pub fn parse_chains(json: &[u8]) -> Result<Vec<Chain>> {
    Ok(chain_objects(json)?
        .iter()
        .filter_map(|c| {
            let hook = hook_number(c.get("hook")?.as_str()?)?;
            let family = c.get("family")?.as_str()?;
            if !matches!(family, "ip" | "ip6" | "inet") {
                return None;
            }
            Some(Chain {
                family: family.to_owned(),
                table: c.get("table")?.as_str()?.to_owned(),
                name: c.get("name")?.as_str()?.to_owned(),
                hook,
                priority: i32::try_from(c.get("prio")?.as_i64()?).ok()?,
            })
        })
        .collect())
}

/// An nft rule that reads or writes the packet mark or the conntrack mark.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MarkRule {
    /// "inet fw/mangle_out".
    pub chain: String,
    pub rule: String,
    /// Whether it writes a mark (`mark set`), rather than only matching one.
    pub writes: bool,
}

/// Rules mentioning `mark` in `nft list ruleset` text (iptables-nft rules included, shown as
/// nft translates them).
pub fn parse_mark_rules(ruleset: &str) -> Vec<MarkRule> {
    let (mut table, mut chain) = (String::new(), String::new());
    let mut out = Vec::new();
    for line in ruleset.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["table", family, name, ..] => table = format!("{family} {name}"),
            ["chain", name, ..] => chain = name.to_string(),
            _ if line.contains("mark") && !line.starts_with("type ") => out.push(MarkRule {
                chain: format!("{table}/{chain}"),
                rule: without_counts(&words),
                writes: line.contains("mark set"),
            }),
            _ => {}
        }
    }
    out
}

/// A rule's words without its counter's values (`counter packets 3 bytes 180` → `counter`):
/// they change with every packet, the rule does not.
fn without_counts(words: &[&str]) -> String {
    let mut out: Vec<&str> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        out.push(words[i]);
        i += 1;
        if words[i - 1] == "counter" {
            while i + 1 < words.len() && matches!(words[i], "packets" | "bytes") {
                i += 2;
            }
        }
    }
    out.join(" ")
}

pub fn read_mark_rules() -> Result<Vec<MarkRule>> {
    Ok(parse_mark_rules(&String::from_utf8_lossy(&nft(&[
        "list", "ruleset",
    ])?)))
}

/// Which priority each netfilter slot program is linked at, per family and hook.
#[derive(Clone, Debug, PartialEq)]
pub struct NfPlan {
    sites: Vec<NfSite>,
    /// Chain priorities that did not get an observer of their own (more than the slots allow).
    pub merged: usize,
}

impl NfPlan {
    pub fn new(chains: &[Chain]) -> Self {
        let mut sites = Vec::new();
        let mut merged = 0;
        for family in FAMILIES {
            for hook in HOOKS {
                let mut prios: Vec<i32> = chains
                    .iter()
                    .filter(|c| c.hook == hook && c.covers(family))
                    .map(|c| c.priority.saturating_add(1))
                    .filter(|p| *p > PRIO_FIRST && *p < PRIO_LAST)
                    .collect();
                prios.sort_unstable();
                prios.dedup();
                let interior = NF_SLOTS - 2;
                merged += prios.len().saturating_sub(interior);
                // Keep the band boundaries spread over the hook when they do not all fit.
                let picked: Vec<i32> = if prios.len() <= interior {
                    prios
                } else {
                    (0..interior)
                        .map(|i| prios[i * prios.len() / interior])
                        .collect()
                };
                let mut site = |slot: usize, priority| {
                    sites.push(NfSite {
                        family,
                        hook,
                        slot: slot as u8,
                        priority,
                    })
                };
                site(0, PRIO_FIRST);
                site(1, PRIO_LAST);
                for (i, p) in picked.into_iter().enumerate() {
                    site(i + 2, p);
                }
            }
        }
        Self { sites, merged }
    }

    /// Band observers a changed ruleset needs that this plan lacks (new chain priorities), each
    /// on the next free slot of its hook; priorities beyond the slots stay merged.
    pub fn additions(&self, chains: &[Chain]) -> Vec<NfSite> {
        let wanted = NfPlan::new(chains);
        let mut out: Vec<NfSite> = Vec::new();
        for w in wanted.sites.iter().filter(|w| w.slot >= 2) {
            let same_hook = |s: &&NfSite| s.family == w.family && s.hook == w.hook;
            // A linked site may sit a little off its wanted priority (EBUSY retries).
            let present = self
                .sites
                .iter()
                .filter(same_hook)
                .any(|s| s.priority.abs_diff(w.priority) < 16);
            if present {
                continue;
            }
            let used = self
                .sites
                .iter()
                .chain(out.iter())
                .filter(same_hook)
                .map(|s| s.slot)
                .max()
                .unwrap_or(1);
            if (used as usize) + 1 < NF_SLOTS {
                out.push(NfSite {
                    slot: used + 1,
                    ..*w
                });
            }
        }
        out
    }

    pub fn add(&mut self, site: NfSite) {
        self.sites.push(site);
    }

    /// Records the priority a site was actually linked at (see `NfPrograms::link`).
    pub fn set_priority(&mut self, site: NfSite, priority: i32) {
        if let Some(s) = self.sites.iter_mut().find(|s| **s == site) {
            s.priority = priority;
        }
    }

    pub fn sites(&self) -> &[NfSite] {
        &self.sites
    }

    pub fn priority(&self, family: u8, hook: u8, slot: u8) -> Option<i32> {
        self.sites
            .iter()
            .find(|s| s.family == family && s.hook == hook && s.slot == slot)
            .map(|s| s.priority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
      {"chain": {"family": "inet", "table": "fw", "name": "mangle_out", "handle": 1,
                 "type": "route", "hook": "output", "prio": -150, "policy": "accept"}},
      {"chain": {"family": "ip", "table": "fw", "name": "filter_out", "handle": 2,
                 "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}},
      {"chain": {"family": "ip6", "table": "x", "name": "helper", "handle": 3}},
      {"chain": {"family": "bridge", "table": "b", "name": "c", "handle": 4,
                 "hook": "output", "prio": 5}}]}"#;

    proptest::proptest! {
        #[test]
        fn any_json_is_handled(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse_chains(&bytes);
        }
    }

    #[test]
    fn parses_base_chains_only() {
        let chains = parse_chains(SAMPLE.as_bytes()).unwrap();
        assert_eq!(chains.len(), 2);
        assert_eq!(chains[0].label(), "inet fw/mangle_out@-150");
        assert_eq!(chains[1].hook, 3);
        assert!(chains[0].covers(10) && !chains[1].covers(10));
    }

    #[test]
    fn plan_places_an_observer_after_each_chain_priority() {
        let chains = parse_chains(SAMPLE.as_bytes()).unwrap();
        let plan = NfPlan::new(&chains);
        // IPv4 output: first, last, after -150, after 0.
        assert_eq!(plan.priority(2, 3, 0), Some(PRIO_FIRST));
        assert_eq!(plan.priority(2, 3, 1), Some(PRIO_LAST));
        assert_eq!(plan.priority(2, 3, 2), Some(-149));
        assert_eq!(plan.priority(2, 3, 3), Some(1));
        // IPv6 output only has the inet chain.
        assert_eq!(plan.priority(10, 3, 2), Some(-149));
        assert_eq!(plan.priority(10, 3, 3), None);
        // 2 families × 5 hooks × (first, last) + 3 band observers.
        assert_eq!(plan.sites().len(), 23);
        assert_eq!(plan.merged, 0);
    }

    #[test]
    fn mark_rules_are_found_with_their_chain() {
        let text = "table inet fw {\n\tchain out {\n\t\ttype route hook output priority mangle; policy accept;\n\t\tudp dport 5201 meta mark set meta mark | 0x00004000\n\t\tip daddr 10.0.0.1 accept\n\t}\n}\ntable ip filter {\n\tchain INPUT {\n\t\tmeta mark & 0x00008000 == 0x00008000 counter packets 0 bytes 0 drop\n\t}\n}\n";
        let rules = parse_mark_rules(text);
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].chain, "inet fw/out");
        assert!(rules[0].writes && !rules[1].writes);
        assert_eq!(rules[1].chain, "ip filter/INPUT");
        // Counter values are not part of the rule (they change with every packet).
        assert_eq!(
            rules[1].rule,
            "meta mark & 0x00008000 == 0x00008000 counter drop"
        );
        let busier = text.replace("packets 0 bytes 0", "packets 7 bytes 420");
        assert_eq!(parse_mark_rules(&busier), rules);
    }

    #[test]
    fn additions_take_free_slots_for_new_priorities() {
        let chains = parse_chains(SAMPLE.as_bytes()).unwrap();
        let plan = NfPlan::new(&chains[..1]);
        let adds = plan.additions(&chains);
        // The ip filter_out chain at 0 is new for IPv4 output only.
        assert_eq!(
            adds,
            vec![NfSite {
                family: 2,
                hook: 3,
                slot: 3,
                priority: 1
            }]
        );
        assert!(NfPlan::new(&chains).additions(&chains).is_empty());
    }

    #[test]
    fn plan_merges_when_slots_run_out() {
        let chains: Vec<Chain> = (0..20)
            .map(|i| Chain {
                family: "ip".into(),
                table: "t".into(),
                name: format!("c{i}"),
                hook: 0,
                priority: i * 10,
            })
            .collect();
        let plan = NfPlan::new(&chains);
        assert_eq!(plan.merged, 20 - (NF_SLOTS - 2));
        let slots = plan
            .sites()
            .iter()
            .filter(|s| s.family == 2 && s.hook == 0)
            .count();
        assert_eq!(slots, NF_SLOTS);
    }
}
