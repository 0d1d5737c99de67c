//! The nftables ruleset of the traced network namespace (`nft -j list ruleset`): its base
//! chains (hook, priority), which regular chains each reaches by jump, goto or verdict map, and
//! which of them write the packet or conntrack mark — so a change in "ip mangle/OUTPUT"
//! (iptables-nft) can be put down to the KUBE-… or cali-… chain that wrote it. The kernel's own
//! hook users (conntrack) and iptables-legacy tables are listed beside them: they bound priority
//! bands too.
use std::{
    collections::{HashMap, HashSet},
    fmt,
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    mark::Mark,
    stack::{serialize_as_display, Family, NfHook, NftFamily},
};

/// A chain's identity: family, table and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct ChainId {
    pub(crate) family: NftFamily,
    pub(crate) table: String,
    #[serde(rename = "chain")]
    pub(crate) name: String,
}

/// `inet fw/mangle_out`.
impl fmt::Display for ChainId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.family, self.table, self.name)
    }
}

/// Who put a hook user there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ChainOrigin {
    /// An nftables base chain (iptables-nft's included).
    #[default]
    Nft,
    /// An iptables-legacy table: nft cannot show its rules.
    IptablesLegacy,
    /// The kernel's own hook user (conntrack).
    Kernel,
}

/// A base chain: it sits on a hook at a priority.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Chain {
    pub(crate) id: ChainId,
    pub(crate) origin: ChainOrigin,
    pub(crate) hook: NfHook,
    pub(crate) priority: i32,
    /// Regular chains it reaches by jump or goto (verdict maps included) that write the packet
    /// or conntrack mark.
    pub(crate) mark_writers: Vec<ChainId>,
    /// What its rules, or the rules of the chains it reaches, can write.
    pub(crate) writes: Writes,
}

/// Which marks a chain's rules can write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Writes {
    pub(crate) packet: bool,
    pub(crate) conntrack: bool,
}

impl Writes {
    /// What cannot be read (iptables-legacy tables) is taken to write both.
    pub(crate) const UNKNOWN: Writes = Writes {
        packet: true,
        conntrack: true,
    };

    pub(crate) fn any(self) -> bool {
        self.packet || self.conntrack
    }

    fn or(self, o: Writes) -> Writes {
        Writes {
            packet: self.packet || o.packet,
            conntrack: self.conntrack || o.conntrack,
        }
    }
}

/// Kernel hook users worth a band boundary: conntrack attaches the `nf_conn` (and with it the
/// ct mark) at NF_IP_PRI_CONNTRACK = -200 on prerouting and output
/// (include/uapi/linux/netfilter_ipv4.h); an observer just after it separates the ct mark a
/// connection starts with from one a rule sets later.
pub(crate) fn kernel_users() -> Vec<Chain> {
    [NfHook::Prerouting, NfHook::Output]
        .into_iter()
        .map(|hook| Chain {
            id: ChainId {
                family: NftFamily::Inet,
                table: "kernel".into(),
                name: "conntrack".into(),
            },
            origin: ChainOrigin::Kernel,
            hook,
            priority: -200,
            mark_writers: Vec::new(),
            writes: Writes::default(),
        })
        .collect()
}

/// iptables-legacy tables at their fixed priorities (include/uapi/linux/netfilter_ipv4.h), as
/// listed in /proc/net/ip{,6}_tables_names: nft cannot show their rules, so they may write.
pub(crate) fn legacy_tables() -> Vec<Chain> {
    use NfHook::*;
    const TABLES: [(&str, i32, &[NfHook]); 5] = [
        ("raw", -300, &[Prerouting, Output]),
        ("mangle", -150, &NfHook::ALL),
        ("nat", -100, &[Prerouting, Input, Output, Postrouting]),
        ("filter", 0, &[Input, Forward, Output]),
        ("security", 50, &[Input, Forward, Output]),
    ];
    let mut out = Vec::new();
    for (family, file) in [
        (NftFamily::Ip, "ip_tables_names"),
        (NftFamily::Ip6, "ip6_tables_names"),
    ] {
        let names = std::fs::read_to_string(format!("/proc/net/{file}")).unwrap_or_default();
        for (table, prio, hooks) in TABLES {
            if !names.lines().any(|l| l.trim() == table) {
                continue;
            }
            for &hook in hooks {
                // NAT's postrouting and input chains sit at +100.
                let priority = if table == "nat" && matches!(hook, Input | Postrouting) {
                    100
                } else {
                    prio
                };
                out.push(Chain {
                    id: ChainId {
                        family,
                        table: table.into(),
                        name: hook.name().to_uppercase(),
                    },
                    origin: ChainOrigin::IptablesLegacy,
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
    /// Whether the chain runs for packets of `family`.
    pub(crate) fn covers(&self, family: Family) -> bool {
        self.id.family.covers(family)
    }
}

/// `inet fw/mangle_out@-150`, `ip mangle (iptables-legacy)/OUTPUT@-150`, `conntrack@-200 (kernel)`.
impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ChainId {
            family,
            table,
            name,
        } = &self.id;
        match self.origin {
            ChainOrigin::Kernel => write!(f, "{name}@{} (kernel)", self.priority),
            ChainOrigin::IptablesLegacy => write!(
                f,
                "{family} {table} (iptables-legacy)/{name}@{}",
                self.priority
            ),
            ChainOrigin::Nft => write!(f, "{}@{}", self.id, self.priority),
        }
    }
}

/// Reads the base chains of the current network namespace. No `nft` binary or no permission is
/// an error; an empty ruleset is not.
pub(crate) fn read_chains() -> Result<Vec<Chain>> {
    Ok(parse_chains(&read_items()?))
}

/// The calling thread's namespace's ruleset (`nft -j list ruleset`), as its items.
pub(crate) fn read_items() -> Result<Vec<Value>> {
    items(&nft(&["-j", "list", "ruleset"])?)
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

/// Every chain of the current namespace (base and regular, iptables-nft's included): what
/// registry owners are recognised by.
pub(crate) fn read_names() -> Result<Vec<ChainId>> {
    Ok(parse_names(&items(&nft(&["-j", "list", "chains"])?)?))
}

/// The objects of nft JSON output (`{"nftables": [{"chain": …}, {"rule": …}, …]}`).
pub(crate) fn items(json: &[u8]) -> Result<Vec<Value>> {
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

pub(crate) fn parse_names(items: &[Value]) -> Vec<ChainId> {
    objects(items, "chain")
        .filter_map(|c| chain_id(c, "name"))
        .collect()
}

/// The identity of a chain object (`name_key` "name"), or of a rule's or map's chain or table
/// (`name_key` "chain", or "name" for a map: a map shares a chain's namespace of names).
pub(crate) fn chain_id(o: &Value, name_key: &str) -> Option<ChainId> {
    let s = |k: &str| o.get(k)?.as_str();
    Some(ChainId {
        family: s("family")?.parse().ok()?,
        table: s("table")?.to_owned(),
        name: s(name_key)?.to_owned(),
    })
}

pub(crate) fn parse_chains(items: &[Value]) -> Vec<Chain> {
    let graph = Graph::new(items);
    objects(items, "chain")
        .filter_map(|c| {
            let hook: NfHook = c.get("hook")?.as_str()?.parse().ok()?;
            let id = chain_id(c, "name")?;
            if !matches!(id.family, NftFamily::Ip | NftFamily::Ip6 | NftFamily::Inet) {
                return None;
            }
            let (mark_writers, writes) = graph.writers_below(&id);
            Some(Chain {
                id,
                origin: ChainOrigin::Nft,
                hook,
                priority: i32::try_from(c.get("prio")?.as_i64()?).ok()?,
                mark_writers,
                writes,
            })
        })
        .collect()
}

/// Which chains each chain jumps to (by name, within its table), and what each chain's own
/// rules write.
pub(crate) struct Graph {
    jumps: HashMap<ChainId, Vec<String>>,
    writes: HashMap<ChainId, Writes>,
}

impl Graph {
    pub(crate) fn new(items: &[Value]) -> Self {
        let mut g = Graph {
            jumps: HashMap::new(),
            writes: HashMap::new(),
        };
        // Named verdict maps (`vmap @name`): the chains their elements jump to.
        let mut maps: HashMap<ChainId, Vec<String>> = HashMap::new();
        for m in objects(items, "map") {
            if let Some(k) = chain_id(m, "name") {
                jump_targets(
                    m.get("elem").unwrap_or(&Value::Null),
                    &[],
                    maps.entry(k).or_default(),
                );
            }
        }
        for rule in objects(items, "rule") {
            let (Some(k), Some(expr)) = (chain_id(rule, "chain"), rule.get("expr")) else {
                continue;
            };
            let named: Vec<(ChainId, Vec<String>)> = maps
                .iter()
                .filter(|(m, _)| (m.family, &m.table) == (k.family, &k.table))
                .map(|(m, targets)| (m.clone(), targets.clone()))
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

    /// `from` and every chain its jumps and gotos reach (within its table), nearest first.
    pub(crate) fn reachable(&self, from: &ChainId) -> Vec<ChainId> {
        let mut out = vec![from.clone()];
        let mut seen = HashSet::from([from.clone()]);
        let mut next = 0;
        while let Some(k) = out.get(next).cloned() {
            next += 1;
            for target in self.jumps.get(&k).into_iter().flatten() {
                let t = ChainId {
                    name: target.clone(),
                    ..k.clone()
                };
                if seen.insert(t.clone()) {
                    out.push(t);
                }
            }
        }
        out
    }

    /// The chains reachable from `base` (itself left out) that write a mark, nearest first,
    /// and what `base` and they can write together.
    fn writers_below(&self, base: &ChainId) -> (Vec<ChainId>, Writes) {
        let mut writes = self.writes.get(base).copied().unwrap_or_default();
        let mut out = Vec::new();
        for c in self.reachable(base).into_iter().skip(1) {
            if let Some(w) = self.writes.get(&c) {
                writes = writes.or(*w);
                out.push(c);
            }
        }
        (out, writes)
    }
}

/// Every jump or goto target anywhere in a rule's expressions: inline verdict maps, and named
/// ones (`"data": "@name"`, their targets in `named`).
fn jump_targets(v: &Value, named: &[(ChainId, Vec<String>)], out: &mut Vec<String>) {
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
                for (map, targets) in named {
                    if map.name == name {
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

/// An nft rule that reads or writes the packet mark or the conntrack mark (read by the
/// inventory: `inventory::nft::mark_rules`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct MarkRule {
    #[serde(serialize_with = "as_text")]
    pub(crate) chain: ChainId,
    /// The base chains that reach it (its own when it is one).
    #[serde(skip)]
    pub(crate) reached_from: Vec<ChainId>,
    /// The rule as `nft list ruleset` shows it.
    pub(crate) rule: String,
    /// Its tests of the packet mark.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) matches: Vec<MarkTest>,
    /// Whether it writes a mark, rather than only matching one.
    pub(crate) writes: bool,
    /// Whether its verdict drops (or rejects) the packets it matches.
    pub(crate) drops: bool,
}

impl MarkRule {
    /// Whether it runs for packets going through base chain `base`.
    pub(crate) fn runs_in(&self, base: &ChainId) -> bool {
        self.chain == *base || self.reached_from.contains(base)
    }
}

/// `mark & mask == value` (or `!=`): a rule's test of the packet mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MarkTest {
    pub(crate) value: Mark,
    pub(crate) mask: Mark,
    pub(crate) negated: bool,
}

impl MarkTest {
    /// Whether a packet with `mark` passes the test.
    pub(crate) fn holds(&self, mark: Mark) -> bool {
        (mark & self.mask == self.value) != self.negated
    }
}

impl fmt::Display for MarkTest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.negated { "!=" } else { "==" };
        if self.mask == Mark::ALL {
            write!(f, "mark {op} {}", self.value)
        } else {
            write!(f, "mark & {} {op} {}", self.mask, self.value)
        }
    }
}

serialize_as_display!(MarkTest);

fn as_text<S: serde::Serializer>(id: &ChainId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{NFT_RULESET, NFT_SAMPLE};

    fn writers(c: &Chain) -> Vec<String> {
        c.mark_writers.iter().map(ToString::to_string).collect()
    }

    fn sample() -> Vec<Chain> {
        parse_chains(&items(NFT_SAMPLE.as_bytes()).unwrap())
    }

    #[test]
    fn base_chains_name_the_chains_below_them_that_write_marks() {
        let chains = parse_chains(&items(NFT_RULESET.as_bytes()).unwrap());
        assert_eq!(chains.len(), 1);
        assert_eq!(
            writers(&chains[0]),
            ["ip mangle/KUBE-MARK-MASQ", "ip mangle/cali-save"]
        );
        // `list chains` output (no rules): no writers, the chains all the same.
        let bare: Vec<Value> = items(NFT_RULESET.as_bytes())
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
        crate::testing::json_with(
            &[
                "chain", "rule", "family", "table", "name", "hook", "prio", "expr", "jump", "goto",
                "target", "vmap", "mangle", "key", "meta", "ct", "xt", "type", "nftables", "x",
            ],
            &["output", "ip", "inet", "mark", "MARK", "t", ""],
        )
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
        assert_eq!(chains[0].to_string(), "inet fw/mangle_out@-150");
        assert_eq!(chains[1].hook, NfHook::Output);
        assert!(chains[0].covers(Family::Ipv6) && !chains[1].covers(Family::Ipv6));
    }

    #[test]
    fn counter_values_are_not_part_of_a_rule() {
        let rule = |l: &str| without_counts(&l.split_whitespace().collect::<Vec<_>>());
        let quiet = rule("meta mark & 0x00008000 == 0x00008000 counter packets 0 bytes 0 drop");
        assert_eq!(quiet, "meta mark & 0x00008000 == 0x00008000 counter drop");
        assert_eq!(
            rule("meta mark & 0x00008000 == 0x00008000 counter packets 7 bytes 420 drop"),
            quiet
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
        assert_eq!(writers(&chains[0]), ["inet t/tp"]);
        assert!(chains[0].writes.packet && !chains[0].writes.conntrack);
    }
}
