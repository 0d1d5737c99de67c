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
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
    /// What its rules, or the rules of the chains it reaches, can write.
    pub writes: Writes,
}

/// Which marks a chain's rules can write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Writes {
    pub packet: bool,
    pub conntrack: bool,
}

impl Writes {
    /// What cannot be read (iptables-legacy tables) is taken to write both.
    pub const UNKNOWN: Writes = Writes {
        packet: true,
        conntrack: true,
    };

    pub fn any(self) -> bool {
        self.packet || self.conntrack
    }

    fn or(self, o: Writes) -> Writes {
        Writes {
            packet: self.packet || o.packet,
            conntrack: self.conntrack || o.conntrack,
        }
    }
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
            writes: Writes::default(),
        })
        .collect()
}

/// iptables-legacy tables at their fixed priorities (include/uapi/linux/netfilter_ipv4.h), as
/// listed in /proc/net/ip{,6}_tables_names: nft cannot show their rules, so they may write.
pub fn legacy_tables() -> Vec<Chain> {
    const TABLES: [(&str, i32, &[u8]); 5] = [
        ("raw", -300, &[0, 3]),
        ("mangle", -150, &[0, 1, 2, 3, 4]),
        ("nat", -100, &[0, 1, 3, 4]),
        ("filter", 0, &[1, 2, 3]),
        ("security", 50, &[1, 2, 3]),
    ];
    let mut out = Vec::new();
    for (family, file) in [("ip", "ip_tables_names"), ("ip6", "ip6_tables_names")] {
        let names = std::fs::read_to_string(format!("/proc/net/{file}")).unwrap_or_default();
        for (table, prio, hooks) in TABLES {
            if !names.lines().any(|l| l.trim() == table) {
                continue;
            }
            for &hook in hooks {
                // NAT's postrouting and input chains sit at +100.
                let priority = if table == "nat" && (hook == 1 || hook == 4) {
                    100
                } else {
                    prio
                };
                out.push(Chain {
                    family: family.into(),
                    table: format!("{table} (iptables-legacy)"),
                    name: hook_name(hook).to_uppercase(),
                    hook,
                    priority,
                    mark_writers: Vec::new(),
                    writes: Writes::UNKNOWN,
                });
            }
        }
    }
    out
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
pub(crate) fn nft(args: &[&str]) -> Result<Vec<u8>> {
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
pub(crate) type ChainKey = (String, String, String);

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
            let base = (family.clone(), table.clone(), name.clone());
            let (mark_writers, writes) = graph.writers_below(&base);
            Some(Chain {
                family,
                table,
                name,
                hook,
                priority: i32::try_from(c.get("prio")?.as_i64()?).ok()?,
                mark_writers,
                writes,
            })
        })
        .collect()
}

/// Which chains each chain jumps to, and what each chain's own rules write.
pub(crate) struct Graph {
    pub(crate) jumps: HashMap<ChainKey, Vec<String>>,
    writes: HashMap<ChainKey, Writes>,
}

impl Graph {
    pub(crate) fn new(items: &[Value]) -> Self {
        let mut g = Graph {
            jumps: HashMap::new(),
            writes: HashMap::new(),
        };
        // Named verdict maps (`vmap @name`): the chains their elements jump to.
        let mut maps: HashMap<ChainKey, Vec<String>> = HashMap::new();
        for m in objects(items, "map") {
            if let Some(k) = key(m, "name") {
                jump_targets(
                    m.get("elem").unwrap_or(&Value::Null),
                    &[],
                    maps.entry(k).or_default(),
                );
            }
        }
        for rule in objects(items, "rule") {
            let (Some(k), Some(expr)) = (key(rule, "chain"), rule.get("expr")) else {
                continue;
            };
            let named: Vec<(ChainKey, Vec<String>)> = maps
                .iter()
                .filter(|((f, t, _), _)| (f, t) == (&k.0, &k.1))
                .map(|(mk, targets)| (mk.clone(), targets.clone()))
                .collect();
            jump_targets(expr, &named, g.jumps.entry(k.clone()).or_default());
            let w = writes_of(expr);
            if w.any() {
                let e = g.writes.entry(k).or_default();
                *e = e.or(w);
            }
        }
        g
    }

    /// The chains reachable from `base` (itself left out) that write a mark, nearest first,
    /// and what `base` and they can write together.
    fn writers_below(&self, base: &ChainKey) -> (Vec<String>, Writes) {
        let (family, table, _) = base;
        let mut writes = self.writes.get(base).copied().unwrap_or_default();
        let mut seen = HashSet::from([base.clone()]);
        let mut queue = std::collections::VecDeque::from([base.clone()]);
        let mut out = Vec::new();
        while let Some(k) = queue.pop_front() {
            for target in self.jumps.get(&k).into_iter().flatten() {
                let t = (family.clone(), table.clone(), target.clone());
                if seen.insert(t.clone()) {
                    if let Some(w) = self.writes.get(&t) {
                        writes = writes.or(*w);
                        out.push(format!("{family} {table}/{target}"));
                    }
                    queue.push_back(t);
                }
            }
        }
        (out, writes)
    }
}

/// Every jump or goto target anywhere in a rule's expressions: inline verdict maps, and named
/// ones (`"data": "@name"`, their targets in `named`).
fn jump_targets(v: &Value, named: &[(ChainKey, Vec<String>)], out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x.get("target").and_then(Value::as_str) {
                    Some(t) if k == "jump" || k == "goto" => out.push(t.to_owned()),
                    _ => jump_targets(x, named, out),
                }
            }
            if let Some(name) = m
                .get("vmap")
                .and_then(|v| v.get("data"))
                .and_then(Value::as_str)
            {
                let name = name.trim_start_matches('@');
                for ((_, _, n), targets) in named {
                    if n == name {
                        out.extend(targets.iter().cloned());
                    }
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| jump_targets(x, named, out)),
        _ => {}
    }
}

/// Which marks a rule sets: nft's `meta mark set`/`ct mark set`, or iptables-nft's targets
/// kept as `xt` expressions (MARK; CONNMARK, which saves to or restores from the ct mark;
/// TPROXY's --tproxy-mark).
fn writes_of(expr: &Value) -> Writes {
    let Some(exprs) = expr.as_array() else {
        return Writes::default();
    };
    exprs.iter().fold(Writes::default(), |w, e| {
        let mangled = &e["mangle"]["key"];
        let target = (e["xt"]["type"] == "target")
            .then(|| e["xt"]["name"].as_str())
            .flatten();
        w.or(Writes {
            packet: mangled["meta"]["key"] == "mark"
                || matches!(target, Some("MARK" | "CONNMARK" | "TPROXY")),
            conntrack: mangled["ct"]["key"] == "mark" || target == Some("CONNMARK"),
        })
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
pub(crate) fn without_counts(words: &[&str]) -> String {
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

/// Where netfilter observers go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlanMode {
    /// Only where a mark can change: on the hooks with chains that write one, the hook's
    /// first priority and just after each writing chain (and after conntrack where a rule
    /// writes the ct mark after it). A change made elsewhere is seen by the next observer.
    #[default]
    Writers,
    /// First and last of every hook and after every chain: every point of a packet's path
    /// (full path, followed flows, `why`).
    Full,
}

/// Which priority each netfilter slot program is linked at, per family and hook.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NfPlan {
    pub mode: PlanMode,
    sites: Vec<NfSite>,
    /// Chain priorities that did not get an observer of their own (more than the slots allow).
    pub merged: usize,
}

/// Whether `c` bounds a band in `mode` on its hook, among `chains` of that hook and family.
fn bounds_band(mode: PlanMode, c: &Chain, hook_chains: &[&Chain]) -> bool {
    match mode {
        PlanMode::Full => true,
        // Conntrack attaches the ct mark: an observer after it separates the ct mark a
        // connection starts with from one a rule sets, and starts the writers' first band.
        PlanMode::Writers if c.table == KERNEL => hook_chains
            .iter()
            .any(|w| w.writes.any() && w.priority > c.priority),
        PlanMode::Writers => c.writes.any(),
    }
}

/// Whether the hook's first priority needs an observer: in `Writers` mode only when a writer
/// sits before every other boundary (else the boundary starts the first writer's band).
fn needs_first(mode: PlanMode, hook_chains: &[&Chain]) -> bool {
    let kernel = hook_chains
        .iter()
        .filter(|c| c.table == KERNEL && bounds_band(mode, c, hook_chains))
        .map(|c| c.priority)
        .min();
    mode == PlanMode::Full
        || hook_chains
            .iter()
            .any(|c| c.writes.any() && kernel.is_none_or(|k| c.priority < k))
}

impl NfPlan {
    /// No link observers (the netfilter observers are fentry/fexit ones, or there are none).
    pub fn none(mode: PlanMode) -> Self {
        Self {
            mode,
            sites: Vec::new(),
            merged: 0,
        }
    }

    pub fn new(chains: &[Chain], mode: PlanMode) -> Self {
        let mut sites = Vec::new();
        let mut merged = 0;
        for family in FAMILIES {
            for hook in HOOKS {
                let here: Vec<&Chain> = chains
                    .iter()
                    .filter(|c| c.hook == hook && c.covers(family))
                    .collect();
                if mode == PlanMode::Writers && !here.iter().any(|c| c.writes.any()) {
                    // Nothing on this hook writes a mark: no observer.
                    continue;
                }
                let mut prios: Vec<i32> = here
                    .iter()
                    .filter(|c| bounds_band(mode, c, &here))
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
                if needs_first(mode, &here) {
                    site(0, PRIO_FIRST);
                }
                if mode == PlanMode::Full {
                    site(1, PRIO_LAST);
                }
                for (i, p) in picked.into_iter().enumerate() {
                    site(i + 2, p);
                }
            }
        }
        Self {
            mode,
            sites,
            merged,
        }
    }

    /// Observers a changed ruleset needs that this plan lacks (a hook that now has a writer,
    /// new chain priorities), each on a free slot of its hook; priorities beyond the slots stay
    /// merged. Observers no longer needed stay (they cost an unchanged-mark probe).
    pub fn additions(&self, chains: &[Chain]) -> Vec<NfSite> {
        let wanted = NfPlan::new(chains, self.mode);
        let mut out: Vec<NfSite> = Vec::new();
        for w in wanted.sites.iter() {
            let same_hook = |s: &&NfSite| s.family == w.family && s.hook == w.hook;
            if w.slot < 2 {
                // First and last keep their slots.
                if !self
                    .sites
                    .iter()
                    .filter(same_hook)
                    .any(|s| s.slot == w.slot)
                {
                    out.push(*w);
                }
                continue;
            }
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
                .filter(|s| *s >= 2)
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
        let plan = NfPlan::new(&chains, PlanMode::Full);
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

    /// The default plan: observers only on hooks whose chains write, after each writer (and
    /// after conntrack where a ct-mark writer follows it); none where nothing writes.
    #[test]
    fn writers_plan_observes_only_where_marks_change() {
        let mut chains = parse_chains(&items(RULESET.as_bytes()).unwrap());
        chains.push(Chain {
            family: "inet".into(),
            table: "f".into(),
            name: "filter_out".into(),
            hook: 3,
            priority: 0,
            ..Default::default()
        });
        chains.extend(kernel_users());
        let plan = NfPlan::new(&chains, PlanMode::Writers);
        let at = |family, hook| -> Vec<i32> {
            let mut p: Vec<i32> = plan
                .sites()
                .iter()
                .filter(|s| s.family == family && s.hook == hook)
                .map(|s| s.priority)
                .collect();
            p.sort();
            p
        };
        // ip mangle/OUTPUT reaches writers: conntrack bounds their first band (nothing before
        // it writes, so the hook's first priority needs no observer); the filter chain at 0
        // writes nothing and gets no observer of its own.
        assert_eq!(at(2, 3), vec![-199, -149]);
        assert!(at(10, 3).is_empty(), "the writer is ip, not ip6");
        assert!(at(2, 0).is_empty() && at(2, 4).is_empty());
        // Full mode keeps every boundary.
        let full = NfPlan::new(&chains, PlanMode::Full);
        // 20 first/last; bands: IPv4 output -199, -149, 1; IPv6 output -199, 1; prerouting -199 ×2.
        assert_eq!(full.sites().len(), 20 + 3 + 2 + 2);
        // A writer appearing on another hook is an addition with its first observer.
        let mut more = chains.clone();
        more.push(Chain {
            family: "ip".into(),
            table: "x".into(),
            name: "post".into(),
            hook: 4,
            priority: 100,
            writes: Writes {
                packet: true,
                conntrack: false,
            },
            ..Default::default()
        });
        let adds = plan.additions(&more);
        assert_eq!(
            adds.iter()
                .map(|s| (s.hook, s.slot, s.priority))
                .collect::<Vec<_>>(),
            vec![(4, 0, PRIO_FIRST), (4, 2, 101)],
            "postrouting has no conntrack boundary: its first priority starts the band"
        );
    }

    #[test]
    fn writes_are_read_from_rules_targets_and_named_verdict_maps() {
        let doc = r#"{"nftables": [
          {"chain": {"family": "inet", "table": "t", "name": "pre", "hook": "prerouting", "prio": -150}},
          {"chain": {"family": "inet", "table": "t", "name": "tp"}},
          {"map": {"family": "inet", "table": "t", "name": "ports", "type": "inet_service", "map": "verdict",
                   "elem": [[80, {"jump": {"target": "tp"}}]]}},
          {"rule": {"family": "inet", "table": "t", "chain": "pre", "expr": [
            {"vmap": {"key": {"payload": {"protocol": "tcp", "field": "dport"}}, "data": "@ports"}}]}},
          {"rule": {"family": "inet", "table": "t", "chain": "tp", "expr": [
            {"xt": {"type": "target", "name": "TPROXY"}}]}}]}"#;
        let chains = parse_chains(&items(doc.as_bytes()).unwrap());
        assert_eq!(chains[0].mark_writers, vec!["inet t/tp"]);
        assert!(chains[0].writes.packet && !chains[0].writes.conntrack);
    }

    #[test]
    fn additions_take_free_slots_for_new_priorities() {
        let chains = sample();
        let plan = NfPlan::new(&chains[..1], PlanMode::Full);
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
        assert!(NfPlan::new(&chains, PlanMode::Full)
            .additions(&chains)
            .is_empty());
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
                writes: Writes::default(),
            })
            .collect();
        let plan = NfPlan::new(&chains, PlanMode::Full);
        assert_eq!(plan.merged, 20 - (NF_SLOTS - 2));
        let slots = plan
            .sites()
            .iter()
            .filter(|s| s.family == 2 && s.hook == 0)
            .count();
        assert_eq!(slots, NF_SLOTS);
    }
}
