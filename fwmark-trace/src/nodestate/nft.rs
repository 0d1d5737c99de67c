//! The nftables ruleset of the traced network namespace (`nft -j list ruleset`): its base
//! chains (hook, priority), which regular chains each reaches by jump, goto or verdict map, and
//! which of them write the packet or conntrack mark — so a change in "ip mangle/OUTPUT"
//! (iptables-nft) can be put down to the KUBE-… or cali-… chain that wrote it. The kernel's own
//! hook users (conntrack) and iptables-legacy tables are listed beside them: they bound priority
//! bands too. Which expressions read or write a mark (`mark_exprs`), which chains are base
//! chains (`base_chains`) and what a chain reaches (`jump_walk`) are decided here, once: the
//! inventory builds on the same answers.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    fmt,
    hash::Hash,
    process::Command,
};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    mark::{parse_u32, Mark, MarkKind, MarkMatch},
    netstack::{Family, NfHook, NftFamily},
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

    fn of(mark: MarkKind) -> Writes {
        Writes {
            packet: mark == MarkKind::Packet,
            conntrack: mark == MarkKind::Conntrack,
        }
    }

    /// The marks written, packet mark first.
    pub(crate) fn kinds(self) -> impl Iterator<Item = MarkKind> {
        [
            (self.packet, MarkKind::Packet),
            (self.conntrack, MarkKind::Conntrack),
        ]
        .into_iter()
        .filter_map(|(w, k)| w.then_some(k))
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

/// The iptables-legacy tables in use in the calling thread's namespace, as the kernel lists them
/// (`thread-self`, not `/proc/net`, which is the main thread's: namespaces are entered per
/// thread with setns).
pub(crate) fn legacy_table_names(family: Family) -> Vec<String> {
    let file = match family {
        Family::Ipv4 => "/proc/thread-self/net/ip_tables_names",
        Family::Ipv6 => "/proc/thread-self/net/ip6_tables_names",
    };
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// iptables-legacy tables at their fixed priorities (include/uapi/linux/netfilter_ipv4.h), as
/// `legacy_table_names` lists them: nft cannot show their rules, so they may write.
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
    for (family, nft_family) in [
        (Family::Ipv4, NftFamily::Ip),
        (Family::Ipv6, NftFamily::Ip6),
    ] {
        let names = legacy_table_names(family);
        for (table, prio, hooks) in TABLES {
            if !names.iter().any(|n| n == table) {
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
                        family: nft_family,
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

/// The calling thread's namespace's ruleset (`nft -j list ruleset`), as its items. No `nft`
/// binary or no permission is an error; an empty ruleset is not.
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

/// A base chain as the ruleset declares it, of any family (bridge, arp and netdev included,
/// when their hook is one of netfilter's five): the hook it sits on and its priority, absent
/// when the ruleset gives none (nft always does; anything else is not taken for 0).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub(crate) struct BaseChain {
    #[serde(flatten)]
    pub(crate) id: ChainId,
    pub(crate) hook: NfHook,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) priority: Option<i32>,
}

/// Every base chain of a ruleset's items (chains with a hook).
pub(crate) fn base_chains(items: &[Value]) -> impl Iterator<Item = BaseChain> + '_ {
    objects(items, "chain").filter_map(|c| {
        Some(BaseChain {
            hook: c.get("hook")?.as_str()?.parse().ok()?,
            id: chain_id(c, "name")?,
            priority: c
                .get("prio")
                .and_then(Value::as_i64)
                .and_then(|p| i32::try_from(p).ok()),
        })
    })
}

/// The base chains the observers' bands are made of: those of the IP families (the others
/// never see an IPv4 or IPv6 packet at these hooks) with a priority (a band needs one).
pub(crate) fn parse_chains(items: &[Value]) -> Vec<Chain> {
    let graph = Graph::new(items);
    base_chains(items)
        .filter(|b| {
            matches!(
                b.id.family,
                NftFamily::Ip | NftFamily::Ip6 | NftFamily::Inet
            )
        })
        .filter_map(|b| {
            let (mark_writers, writes) = graph.writers_below(&b.id);
            Some(Chain {
                priority: b.priority?,
                id: b.id,
                origin: ChainOrigin::Nft,
                hook: b.hook,
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
        jump_walk(from.clone(), |k| {
            self.jumps
                .get(k)
                .into_iter()
                .flatten()
                .map(|target| ChainId {
                    name: target.clone(),
                    ..k.clone()
                })
                .collect()
        })
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

/// `from` and every chain reached from it by following `jumps` (a chain's jump and goto
/// targets), breadth first: nearest first, each once (loops end). nft's and iptables' graphs
/// alike.
pub(crate) fn jump_walk<K: Clone + Eq + Hash>(from: K, jumps: impl Fn(&K) -> Vec<K>) -> Vec<K> {
    let mut out = Vec::new();
    let mut seen = HashSet::from([from.clone()]);
    let mut queue = VecDeque::from([from]);
    while let Some(k) = queue.pop_front() {
        for t in jumps(&k) {
            if seen.insert(t.clone()) {
                queue.push_back(t);
            }
        }
        out.push(k);
    }
    out
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

/// Which marks a rule's expressions can write (`mark_exprs`' writes).
fn writes_of(expr: &Value) -> Writes {
    let exprs = expr.as_array().map(Vec::as_slice).unwrap_or_default();
    mark_exprs(exprs)
        .iter()
        .fold(Writes::default(), |w, e| match e {
            MarkExpr::Test { .. } => w,
            MarkExpr::Set { mark, .. } => w.or(Writes::of(*mark)),
            MarkExpr::Xt { writes, .. } => w.or(*writes),
        })
}

/// A mark access among a rule's expressions, as the ruleset shows it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum MarkExpr<'a> {
    /// `meta mark`/`ct mark` (under a constant `&` mask) compared with a value: one per value of
    /// a set, one per key of a verdict map.
    Test { mark: MarkKind, test: MarkMatch },
    /// `meta mark set …`/`ct mark set …`, with the expression of the value written.
    Set { mark: MarkKind, value: &'a Value },
    /// An iptables-nft target or match nft keeps as `xt`: its name, and what it may write.
    Xt { name: &'a str, writes: Writes },
}

/// The mark reads and writes among a rule's expressions.
pub(crate) fn mark_exprs(expr: &[Value]) -> Vec<MarkExpr<'_>> {
    let mut out = Vec::new();
    for e in expr {
        if let Some(m) = e.get("match") {
            let negated = m.get("op").and_then(Value::as_str) == Some("!=");
            if let Some((mark, mask)) = m.get("left").and_then(masked_mark) {
                for v in values(m.get("right").unwrap_or(&Value::Null)) {
                    let test = MarkMatch::new(Mark(v), mask).negate(negated);
                    out.push(MarkExpr::Test { mark, test });
                }
            }
        } else if let Some(m) = e.get("mangle") {
            if let Some(mark) = m.get("key").and_then(mark_kind) {
                let value = m.get("value").unwrap_or(&Value::Null);
                out.push(MarkExpr::Set { mark, value });
            }
        } else if let Some(vm) = e.get("vmap") {
            // `meta mark & M vmap { V: jump x, … }`: one test per key.
            if let Some((mark, mask)) = vm.get("key").and_then(masked_mark) {
                let keys = vm
                    .get("data")
                    .and_then(|d| d.get("set"))
                    .and_then(Value::as_array);
                for v in keys
                    .into_iter()
                    .flatten()
                    .filter_map(|el| number(el.get(0)?))
                {
                    let test = MarkMatch::new(Mark(v), mask);
                    out.push(MarkExpr::Test { mark, test });
                }
            }
        } else if let Some(name) = e.get("xt").and_then(|x| x.get("name")?.as_str()) {
            if let Some(writes) = xt_writes(name) {
                out.push(MarkExpr::Xt { name, writes });
            }
        }
    }
    out
}

/// What an iptables target or match that touches marks may write, when nft's JSON hides its
/// options (None: it does not touch marks). As xt_MARK.c, xt_CONNMARK.c and xt_TPROXY.c do:
/// MARK and TPROXY's `--tproxy-mark` set the packet mark; CONNMARK's `--set-mark`/`--set-xmark`
/// and `--save-mark` set the ct mark, its `--restore-mark` the packet mark, so without its
/// options it may write either. The `mark` and `connmark` matches only read.
fn xt_writes(name: &str) -> Option<Writes> {
    let packet = Writes::of(MarkKind::Packet);
    match name {
        "MARK" | "TPROXY" => Some(packet),
        "CONNMARK" => Some(Writes::UNKNOWN),
        "mark" | "connmark" => Some(Writes::default()),
        _ => None,
    }
}

/// `meta mark` or `ct mark`.
pub(crate) fn mark_kind(v: &Value) -> Option<MarkKind> {
    let key = |k: &str| v.get(k)?.get("key")?.as_str();
    match (key("meta"), key("ct")) {
        (Some("mark"), _) => Some(MarkKind::Packet),
        (_, Some("mark")) => Some(MarkKind::Conntrack),
        _ => None,
    }
}

/// A number, as nft's JSON writes one (a number, or a string `0x…`).
pub(crate) fn number(v: &Value) -> Option<u32> {
    match v {
        Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        Value::String(s) => parse_u32(s),
        _ => None,
    }
}

/// A binary operation `{"&": [a, b]}` (nft JSON nests longer chains).
pub(crate) fn binop(v: &Value) -> Option<(&str, &Value, &Value)> {
    let obj = v.as_object()?;
    let (op, args) = obj.iter().next()?;
    if obj.len() != 1 || !matches!(op.as_str(), "&" | "|" | "^") {
        return None;
    }
    match args.as_array()?.as_slice() {
        [a, b] => Some((op.as_str(), a, b)),
        _ => None,
    }
}

/// A mark as a test reads it, possibly under a constant `&` mask.
fn masked_mark(v: &Value) -> Option<(MarkKind, Mark)> {
    if let Some(m) = mark_kind(v) {
        return Some((m, Mark::ALL));
    }
    match binop(v)? {
        ("&", a, b) => Some((mark_kind(a)?, Mark(number(b)?))),
        _ => None,
    }
}

/// Numbers of a set (`{"set": [1, 2]}`) or a single number.
fn values(v: &Value) -> Vec<u32> {
    match v.get("set").and_then(Value::as_array) {
        Some(items) => items.iter().filter_map(number).collect(),
        None => number(v).into_iter().collect(),
    }
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
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "as_tests")]
    pub(crate) matches: Vec<MarkMatch>,
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

/// Tests as a rule reads them: `mark & 0x8000 == 0x8000`.
fn as_tests<S: serde::Serializer>(tests: &[MarkMatch], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(tests.iter().map(|t| t.as_test().to_string()))
}

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

    #[test]
    fn xt_targets_write_what_the_kernel_makes_them_write() {
        let writes = |name: &str| {
            let expr = vec![serde_json::json!({"xt": {"type": "target", "name": name}})];
            writes_of(&Value::Array(expr))
        };
        let packet = Writes {
            packet: true,
            conntrack: false,
        };
        assert_eq!(writes("MARK"), packet);
        assert_eq!(writes("TPROXY"), packet);
        // Options hidden: --save-mark/--set-mark write the ct mark, --restore-mark the packet's.
        assert_eq!(writes("CONNMARK"), Writes::UNKNOWN);
        assert!(!writes("connmark").any() && !writes("mark").any() && !writes("DNAT").any());
        let expr: Vec<Value> = serde_json::from_str(
            r#"[{"match": {"op": "!=", "left": {"&": [{"ct": {"key": "mark"}}, 240]}, "right": 16}},
                {"mangle": {"key": {"ct": {"key": "mark"}}, "value": 1}}]"#,
        )
        .unwrap();
        let found = mark_exprs(&expr);
        assert_eq!(
            found[0],
            MarkExpr::Test {
                mark: MarkKind::Conntrack,
                test: MarkMatch::new(Mark(16), Mark(240)).negate(true),
            }
        );
        assert!(matches!(
            found[1],
            MarkExpr::Set {
                mark: MarkKind::Conntrack,
                ..
            }
        ));
    }

    #[test]
    fn base_chains_of_every_family_with_their_priority_as_given() {
        let doc = r#"{"nftables": [
          {"chain": {"family": "bridge", "table": "b", "name": "fwd", "hook": "forward", "prio": -200}},
          {"chain": {"family": "inet", "table": "t", "name": "out", "hook": "output"}},
          {"chain": {"family": "ip", "table": "t", "name": "pre", "hook": "prerouting", "prio": 10}},
          {"chain": {"family": "ip", "table": "t", "name": "regular"}}]}"#;
        let items = items(doc.as_bytes()).unwrap();
        let all: Vec<_> = base_chains(&items)
            .map(|b| (b.id.to_string(), b.priority))
            .collect();
        assert_eq!(
            all,
            [
                ("bridge b/fwd".to_owned(), Some(-200)),
                ("inet t/out".to_owned(), None),
                ("ip t/pre".to_owned(), Some(10)),
            ]
        );
        // Bands: IP families with a priority only.
        let bands: Vec<_> = parse_chains(&items)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(bands, ["ip t/pre@10"]);
    }

    #[test]
    fn the_jump_walk_is_breadth_first_and_ends_on_loops() {
        let jumps = HashMap::from([(1, vec![2, 3]), (2, vec![4, 1]), (3, vec![4]), (4, vec![2])]);
        let walk = jump_walk(1, |k| jumps.get(k).cloned().unwrap_or_default());
        assert_eq!(walk, [1, 2, 3, 4]);
    }
}
