//! The nftables base chains of the traced network namespace (`nft -j list chains`), and the
//! netfilter observer plan derived from them: besides the first and last priority of every hook,
//! one observer just after each distinct chain priority, so a mark change is pinned to the band
//! holding one chain priority (e.g. "output ipv4, -150..0: inet fw/mangle_out").
//!
//! Chains are read from `nft -j list ruleset`: its rules say which regular chains a base chain
//! jumps to and which of them write a mark, so a change in "ip mangle/OUTPUT" (iptables-nft)
//! can be put down to the KUBE-… or cali-… chain that wrote it.
use std::collections::{HashMap, HashSet};
use std::process::Command;

use anyhow::{bail, Context, Result};
use fwmark_trace_common::NF_SLOTS;
use serde_json::Value;

use crate::kernel::netfilter::{NfSite, FAMILIES, HOOKS, PRIO_FIRST, PRIO_LAST};

/// A base chain: it sits on a hook at a priority.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// nft family: ip, ip6, inet (others never reach the IPv4/IPv6 hooks).
    pub family: String,
    pub table: String,
    pub name: String,
    pub hook: u8,
    pub priority: i32,
    /// Regular chains it reaches by jump or goto (verdict maps included) that write the packet
    /// or conntrack mark, as "family table/chain".
    pub mark_writers: Vec<String>,
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
            mark_writers: Vec::new(),
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
    Ok(parse_chains(&items(&nft(&["-j", "list", "ruleset"])?)?))
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
    Ok(parse_names(&items(&nft(&["-j", "list", "chains"])?)?))
}

/// The base chains and every (table, chain) name, from one `nft -j list ruleset`.
pub fn read_chains_and_names() -> Result<(Vec<Chain>, Vec<ChainName>)> {
    let items = items(&nft(&["-j", "list", "ruleset"])?)?;
    Ok((parse_chains(&items), parse_names(&items)))
}

/// The objects of nft JSON output (`{"nftables": [{"chain": …}, {"rule": …}, …]}`).
pub fn items(json: &[u8]) -> Result<Vec<Value>> {
    let mut doc: Value = serde_json::from_slice(json).context("parsing nft JSON output")?;
    // `get_mut`, not indexing: indexing a JSON value that is not an object panics.
    Ok(match doc.get_mut("nftables").map(Value::take) {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    })
}

/// The `kind` objects ("chain", "rule") among `items`.
fn objects<'a>(items: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> {
    items.iter().filter_map(move |i| i.get(kind))
}

pub fn parse_names(items: &[Value]) -> Vec<ChainName> {
    objects(items, "chain")
        .filter_map(|c| {
            let name = |k: &str| c.get(k)?.as_str().map(str::to_owned);
            Some((name("table")?, name("name")?))
        })
        .collect()
}

/// A chain's identity: (family, table, name).
type ChainKey = (String, String, String);

fn key(o: &Value, name: &str) -> Option<ChainKey> {
    let s = |k: &str| o.get(k)?.as_str().map(str::to_owned);
    Some((s("family")?, s("table")?, s(name)?))
}

pub fn parse_chains(items: &[Value]) -> Vec<Chain> {
    let graph = Graph::new(items);
    objects(items, "chain")
        .filter_map(|c| {
            let hook = hook_number(c.get("hook")?.as_str()?)?;
            let (family, table, name) = key(c, "name")?;
            if !matches!(family.as_str(), "ip" | "ip6" | "inet") {
                return None;
            }
            let mark_writers = graph.writers_below(&(family.clone(), table.clone(), name.clone()));
            Some(Chain {
                family,
                table,
                name,
                hook,
                priority: i32::try_from(c.get("prio")?.as_i64()?).ok()?,
                mark_writers,
            })
        })
        .collect()
}

/// Which chains each chain jumps to, and which chains write a mark.
struct Graph {
    jumps: HashMap<ChainKey, Vec<String>>,
    writes: HashSet<ChainKey>,
}

impl Graph {
    fn new(items: &[Value]) -> Self {
        let mut g = Graph {
            jumps: HashMap::new(),
            writes: HashSet::new(),
        };
        for rule in objects(items, "rule") {
            let (Some(k), Some(expr)) = (key(rule, "chain"), rule.get("expr")) else {
                continue;
            };
            jump_targets(expr, g.jumps.entry(k.clone()).or_default());
            if writes_mark(expr) {
                g.writes.insert(k);
            }
        }
        g
    }

    /// The chains reachable from `base` (itself left out) that write a mark, nearest first.
    fn writers_below(&self, base: &ChainKey) -> Vec<String> {
        let (family, table, _) = base;
        let mut seen = HashSet::from([base.clone()]);
        let mut queue = std::collections::VecDeque::from([base.clone()]);
        let mut out = Vec::new();
        while let Some(k) = queue.pop_front() {
            for target in self.jumps.get(&k).into_iter().flatten() {
                let t = (family.clone(), table.clone(), target.clone());
                if seen.insert(t.clone()) {
                    if self.writes.contains(&t) {
                        out.push(format!("{family} {table}/{target}"));
                    }
                    queue.push_back(t);
                }
            }
        }
        out
    }
}

/// Every jump or goto target anywhere in a rule's expressions (verdict maps included).
fn jump_targets(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x.get("target").and_then(Value::as_str) {
                    Some(t) if k == "jump" || k == "goto" => out.push(t.to_owned()),
                    _ => jump_targets(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| jump_targets(x, out)),
        _ => {}
    }
}

/// Whether a rule sets the packet or conntrack mark: nft's `meta mark set`/`ct mark set`, or
/// iptables-nft's MARK and CONNMARK targets (kept as `xt` expressions).
fn writes_mark(expr: &Value) -> bool {
    let Some(exprs) = expr.as_array() else {
        return false;
    };
    exprs.iter().any(|e| {
        let mangled = &e["mangle"]["key"];
        mangled["meta"]["key"] == "mark"
            || mangled["ct"]["key"] == "mark"
            || (e["xt"]["type"] == "target"
                && matches!(e["xt"]["name"].as_str(), Some("MARK" | "CONNMARK")))
    })
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

    fn sample() -> Vec<Chain> {
        parse_chains(&items(SAMPLE.as_bytes()).unwrap())
    }

    /// iptables-nft's mangle OUTPUT jumping to a KUBE- chain (MARK target) and going to a cali-
    /// chain via a verdict map that jumps further to one writing with `ct mark set`; a chain
    /// that writes but is never reached; a jump loop.
    const RULESET: &str = r#"{"nftables": [
      {"chain": {"family": "ip", "table": "mangle", "name": "OUTPUT", "hook": "output", "prio": -150}},
      {"chain": {"family": "ip", "table": "mangle", "name": "KUBE-MARK-MASQ"}},
      {"chain": {"family": "ip", "table": "mangle", "name": "cali-OUTPUT"}},
      {"chain": {"family": "ip", "table": "mangle", "name": "cali-save"}},
      {"chain": {"family": "ip", "table": "mangle", "name": "ISTIO_OUTPUT"}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "OUTPUT", "expr": [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
        {"jump": {"target": "KUBE-MARK-MASQ"}}]}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "OUTPUT", "expr": [
        {"vmap": {"key": {"meta": {"key": "oifname"}},
                  "data": {"set": [["eth0", {"goto": {"target": "cali-OUTPUT"}}]]}}}]}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "KUBE-MARK-MASQ", "expr": [
        {"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "MARK"}}]}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "cali-OUTPUT", "expr": [
        {"jump": {"target": "cali-save"}}, {"jump": {"target": "OUTPUT"}}]}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "cali-save", "expr": [
        {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"meta": {"key": "mark"}}}}]}},
      {"rule": {"family": "ip", "table": "mangle", "chain": "ISTIO_OUTPUT", "expr": [
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1337}}]}}]}"#;

    #[test]
    fn base_chains_name_the_chains_below_them_that_write_marks() {
        let chains = parse_chains(&items(RULESET.as_bytes()).unwrap());
        assert_eq!(chains.len(), 1);
        assert_eq!(
            chains[0].mark_writers,
            vec!["ip mangle/KUBE-MARK-MASQ", "ip mangle/cali-save"]
        );
        // `list chains` output (no rules): no writers, the chains all the same.
        let bare: Vec<Value> = items(RULESET.as_bytes())
            .unwrap()
            .into_iter()
            .filter(|i| i.get("rule").is_none())
            .collect();
        assert!(parse_chains(&bare)[0].mark_writers.is_empty());
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn any_bytes_are_handled(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            if let Ok(items) = items(&bytes) {
                let _ = parse_chains(&items);
            }
        }

        /// Random bytes are rarely JSON: generate JSON documents of any shape instead.
        #[test]
        fn any_json_is_handled(doc in json(), wrap in proptest::bool::ANY) {
            let doc = if wrap { serde_json::json!({ "nftables": doc }) } else { doc };
            if let Ok(items) = items(doc.to_string().as_bytes()) {
                let _ = parse_chains(&items);
                let _ = parse_names(&items);
            }
        }
    }

    /// Any JSON value, with the keys nft's output uses so that parsers go deep.
    fn json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let key = prop::sample::select(vec![
            "chain", "rule", "family", "table", "name", "hook", "prio", "expr", "jump", "goto",
            "target", "vmap", "mangle", "key", "meta", "ct", "xt", "type", "nftables", "x",
        ]);
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            prop::sample::select(vec!["output", "ip", "inet", "mark", "MARK", "t", ""])
                .prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 6, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| {
                    Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                }),
            ]
        })
    }

    /// Found by the property test on a fresh machine: JSON that is not an object panicked.
    #[test]
    fn json_that_is_not_nft_output_is_an_empty_ruleset() {
        for doc in [
            "0",
            "[]",
            "\"x\"",
            "null",
            "{\"nftables\": 3}",
            "{\"nftables\": [1, {\"chain\": 3}, {\"rule\": []}]}",
        ] {
            let items = items(doc.as_bytes()).unwrap();
            assert!(parse_chains(&items).is_empty(), "{doc}");
            assert!(parse_names(&items).is_empty(), "{doc}");
        }
    }

    #[test]
    fn parses_base_chains_only() {
        let chains = sample();
        assert_eq!(chains.len(), 2);
        assert_eq!(chains[0].label(), "inet fw/mangle_out@-150");
        assert_eq!(chains[1].hook, 3);
        assert!(chains[0].covers(10) && !chains[1].covers(10));
    }

    #[test]
    fn plan_places_an_observer_after_each_chain_priority() {
        let chains = sample();
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
        let chains = sample();
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
                mark_writers: vec![],
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
