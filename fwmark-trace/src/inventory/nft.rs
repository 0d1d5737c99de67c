//! nft rules that read or write the packet or conntrack mark, derived structurally from `nft -j
//! list ruleset`: `match` expressions on `meta mark`/`ct mark` (under `&` masks, against values
//! or sets, in verdict-map keys) are reads; `mangle` statements on them are writes, their value
//! expressions (`&`, `|`, `^`, the other mark, constants) evaluated bit by bit (`bits`). Each rule
//! names the base chains that reach it through jumps, gotos and verdict maps (the graph of
//! `nodestate::nft`). iptables-nft rules are nft rules, but their MARK, CONNMARK and TPROXY
//! targets (and some matches) stay `xt` expressions whose values nft's JSON leaves out: those
//! rules take their accesses from the same rule in `iptables-nft-save` (same chain, same
//! position). Rule text comes from `nft -a list ruleset` (by handle).
use std::collections::HashMap;

use anyhow::Result;
use serde_json::Value;

use super::bits::Bits;
use super::iptables::{self, SavedRule};
use super::model::{Access, BaseChain, MarkKind, Op, Place, RawEntry};
use crate::{
    netstack::{Family, NftFamily},
    nodestate::nft::{
        base_chains, binop, chain_id, mark_exprs, mark_kind, number, without_counts, ChainId,
        Graph, MarkExpr, MarkRule,
    },
};

/// What a value expression writes into `target`, bit by bit.
fn eval(v: &Value, target: MarkKind) -> Bits {
    if let Some(n) = number(v) {
        return Bits::constant(n);
    }
    if let Some(m) = mark_kind(v) {
        return if m == target {
            Bits::same()
        } else {
            Bits::copy_of(m)
        };
    }
    let Some((op, a, b)) = binop(v) else {
        return Bits::unknown();
    };
    let (x, c) = match (number(a), number(b)) {
        (_, Some(c)) => (eval(a, target), c),
        (Some(c), None) => (eval(b, target), c),
        (None, None) => return Bits::unknown(),
    };
    match op {
        "&" => x.and(c),
        "|" => x.or(c),
        _ => x.xor(c),
    }
}

/// The mark accesses of one rule's expressions (`mark_exprs`, values evaluated bit by bit),
/// and the names of the `xt` expressions among them (iptables-nft targets and matches whose
/// values nft cannot show).
pub(crate) fn rule_accesses(expr: &[Value]) -> (Vec<Access>, Vec<&str>) {
    let mut out = Vec::new();
    let mut xt = Vec::new();
    for e in mark_exprs(expr) {
        match e {
            MarkExpr::Test { mark, test } => out.push(Access {
                mark,
                masked: test,
                op: Op::Read,
            }),
            MarkExpr::Set { mark, value } => out.extend(eval(value, mark).write(mark)),
            MarkExpr::Xt { name, .. } => xt.push(name),
        }
    }
    (out, xt)
}

/// What the `xt` expressions of a rule write when their values are not known: their marks,
/// values unknown.
fn xt_unknown_writes(expr: &[Value]) -> Vec<Access> {
    mark_exprs(expr)
        .into_iter()
        .flat_map(|e| match e {
            MarkExpr::Xt { writes, .. } => writes.kinds().map(Access::unknown_write).collect(),
            _ => Vec::new(),
        })
        .collect()
}

/// Rule texts by (family, table, chain, handle), from `nft -a list ruleset`.
pub(crate) fn rule_texts(text: &str) -> HashMap<(ChainId, u64), String> {
    let mut table: Option<(NftFamily, String)> = None;
    let mut chain = String::new();
    let mut out = HashMap::new();
    for line in text.lines().map(str::trim) {
        let (body, handle) = match line.rsplit_once("# handle ") {
            Some((b, h)) => (b.trim(), h.trim().parse::<u64>().ok()),
            None => (line, None),
        };
        let words: Vec<&str> = body.split_whitespace().collect();
        match words.as_slice() {
            ["table", f, t, ..] => table = f.parse().ok().map(|f| (f, t.to_string())),
            ["chain", c, ..] => chain = c.to_string(),
            _ => {
                if let (Some(h), Some((family, table))) = (handle, &table) {
                    let id = ChainId {
                        family: *family,
                        table: table.clone(),
                        name: chain.clone(),
                    };
                    out.insert((id, h), without_counts(&words));
                }
            }
        }
    }
    out
}

/// For each chain, the base chains that reach it (itself included when it is one).
fn reached_from(items: &[Value]) -> HashMap<ChainId, Vec<BaseChain>> {
    let graph = Graph::new(items);
    let mut out: HashMap<ChainId, Vec<BaseChain>> = HashMap::new();
    for base in base_chains(items) {
        for k in graph.reachable(&base.id) {
            out.entry(k).or_default().push(base.clone());
        }
    }
    out
}

/// iptables' own tables, the ones iptables-nft keeps in nft tables of the same names.
const IPTABLES_TABLES: [&str; 5] = ["raw", "mangle", "nat", "filter", "security"];

/// The mark rules of the current namespace's ruleset (`nft -j`, with each rule's text from
/// `nft -a`, and iptables-nft's values from iptables-nft-save where nft hides them).
pub(crate) fn read() -> Result<Vec<RawEntry>> {
    from_items(&crate::nodestate::nft::read_items()?)
}

/// `read`, with the ruleset's JSON items already listed (`items`).
pub(super) fn from_items(items: &[Value]) -> Result<Vec<RawEntry>> {
    use crate::nodestate::nft::nft;
    let text = String::from_utf8_lossy(&nft(&["-a", "list", "ruleset"])?).into_owned();
    let mut saves = Vec::new();
    for (family, tool) in [
        (Family::Ipv4, "iptables-nft-save"),
        (Family::Ipv6, "ip6tables-nft-save"),
    ] {
        let has = items.iter().filter_map(|i| i.get("table")).any(|t| {
            t.get("family")
                .and_then(|f| f.as_str())
                .and_then(|f| f.parse::<crate::netstack::NftFamily>().ok())
                == Some(iptables_family(family))
                && t.get("name")
                    .and_then(|n| n.as_str())
                    .is_some_and(|n| IPTABLES_TABLES.contains(&n))
        });
        if has {
            if let Some(text) = iptables::save(tool).ok().flatten() {
                saves.push((family, iptables::parse_save(&text)));
            }
        }
    }
    Ok(found(items, &text, &saves))
}

/// The current namespace's nft mark rules as the node state keeps them (what `why` reasons
/// with when a reply died in a chain), from its ruleset's JSON `items`.
pub(crate) fn mark_rules(items: &[Value]) -> Result<Vec<MarkRule>> {
    Ok(from_items(items)?
        .into_iter()
        .filter_map(|f| {
            let Place::NftRule {
                chain,
                reached_from,
                drops,
                ..
            } = f.place
            else {
                return None;
            };
            Some(MarkRule {
                chain,
                reached_from: reached_from.into_iter().map(|b| b.id).collect(),
                rule: f.text,
                matches: f
                    .access
                    .iter()
                    .filter(|a| a.is_read() && a.mark == MarkKind::Packet)
                    .map(|a| a.masked)
                    .collect(),
                writes: f.access.iter().any(Access::is_write),
                drops,
            })
        })
        .collect())
}

/// The mark rules of a ruleset. `saves` holds iptables-nft-save's rules per family (for the
/// tables iptables-nft manages).
pub(crate) fn found(
    items: &[Value],
    text: &str,
    saves: &[(Family, Vec<SavedRule>)],
) -> Vec<RawEntry> {
    let texts = rule_texts(text);
    let reach = reached_from(items);
    let rules: Vec<&Value> = items.iter().filter_map(|i| i.get("rule")).collect();
    // (family, table, chain) → number of rules, to check positions against iptables-nft-save.
    let mut per_chain: HashMap<ChainId, usize> = HashMap::new();
    for r in &rules {
        if let Some(k) = chain_id(r, "chain") {
            *per_chain.entry(k).or_default() += 1;
        }
    }
    let mut saved: HashMap<ChainId, Vec<&SavedRule>> = HashMap::new();
    for (family, list) in saves {
        for s in list {
            saved
                .entry(ChainId {
                    family: iptables_family(*family),
                    table: s.table.clone(),
                    name: s.chain.clone(),
                })
                .or_default()
                .push(s);
        }
    }
    let mut position: HashMap<ChainId, usize> = HashMap::new();
    let mut out = Vec::new();
    for r in rules {
        let Some(k) = chain_id(r, "chain") else {
            continue;
        };
        let pos = position.entry(k.clone()).or_default();
        *pos += 1;
        let expr = r
            .get("expr")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        let (mut access, xt) = rule_accesses(expr);
        // The same rule as iptables-nft-save prints it, when the chain lines up.
        let line = saved
            .get(&k)
            .filter(|s| s.len() == per_chain[&k])
            .and_then(|s| s.get(*pos - 1));
        if !xt.is_empty() {
            match line {
                Some(l) => access = iptables::accesses(&l.args),
                None => access.extend(xt_unknown_writes(expr)),
            }
        }
        if access.is_empty() {
            continue;
        }
        let handle = r.get("handle").and_then(Value::as_u64).unwrap_or(0);
        let text = texts
            .get(&(k.clone(), handle))
            .cloned()
            .or_else(|| line.map(|l| l.line.clone()))
            .unwrap_or_default();
        out.push(RawEntry {
            names: vec![k.table.clone(), k.name.clone()],
            text,
            access,
            place: Place::NftRule {
                iptables: line.map(|l| l.line.clone()),
                reached_from: reach.get(&k).cloned().unwrap_or_default(),
                chain: k,
                handle,
                drops: expr
                    .iter()
                    .any(|e| e.get("drop").is_some() || e.get("reject").is_some()),
            },
        });
    }
    out
}

/// The nft table family iptables-nft keeps a family's tables in.
pub(crate) fn iptables_family(f: Family) -> NftFamily {
    match f {
        Family::Ipv4 => NftFamily::Ip,
        Family::Ipv6 => NftFamily::Ip6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::model::Scope;
    use crate::netstack::NfHook;
    use crate::nodestate::nft::items;

    fn json(s: &str) -> Vec<Value> {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn reads_and_writes_from_expressions() {
        // udp dport 5201 meta mark set meta mark | 0x4000
        let (a, _) = rule_accesses(&json(
            r#"[{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 5201}},
                {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, 16384]}}}]"#,
        ));
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].value(), a[0].mask(), a[0].scope()),
            (0x4000, 0x4000, Some(Scope::Bits))
        );
        // meta mark & 0x8000 == 0x8000 drop
        let (a, _) = rule_accesses(&json(
            r#"[{"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 32768]}, "right": 32768}}, {"drop": null}]"#,
        ));
        assert_eq!(
            a,
            vec![Access::read(MarkKind::Packet, 0x8000, 0x8000, false)]
        );
        // AWS VPC CNI: ct mark & 0x80 == 0x80 meta mark set ct mark & 0x80 (whole)
        let (a, _) = rule_accesses(&json(
            r#"[{"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 128]}, "right": 128}},
                {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"&": [{"ct": {"key": "mark"}}, 128]}}}]"#,
        ));
        assert_eq!(a[0], Access::read(MarkKind::Conntrack, 0x80, 0x80, false));
        assert_eq!((a[1].mask(), a[1].scope()), (u32::MAX, Some(Scope::Whole)));
        // wg-quick postmangle: meta mark 0xca6c ct mark set meta mark (exact read, whole ct copy)
        let (a, _) = rule_accesses(&json(
            r#"[{"match": {"op": "==", "left": {"meta": {"key": "mark"}}, "right": 51820}},
                {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"meta": {"key": "mark"}}}}]"#,
        ));
        assert!(a[0].is_exact_read());
        assert_eq!(
            (a[1].mark, a[1].scope()),
            (MarkKind::Conntrack, Some(Scope::Whole))
        );
        // A set and a verdict map on the mark; an xt target.
        let expr = json(
            r#"[{"match": {"op": "!=", "left": {"meta": {"key": "mark"}}, "right": {"set": [1, 2]}}},
                {"vmap": {"key": {"&": [{"meta": {"key": "mark"}}, 240]}, "data": {"set": [[16, {"jump": {"target": "a"}}]]}}},
                {"xt": {"type": "target", "name": "MARK"}}]"#,
        );
        let (a, xt) = rule_accesses(&expr);
        assert_eq!(a.len(), 3);
        assert_eq!(a[2], Access::read(MarkKind::Packet, 16, 0xf0, false));
        assert_eq!(xt, ["MARK"]);
        // A value nft computes from a map: written, value unknown.
        let (a, _) = rule_accesses(&json(
            r#"[{"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"map": {"key": {"payload": {"protocol": "ip", "field": "saddr"}}, "data": "@m"}}}}]"#,
        ));
        assert!(matches!(
            a[0].op,
            Op::Write {
                known: false,
                scope: Scope::Whole,
                ..
            }
        ));
    }

    /// iptables-nft's kube rules: the MARK target is `xt` in nft's JSON; its values come from
    /// iptables-nft-save's line at the same position. Reached through the jump from POSTROUTING.
    #[test]
    fn xt_targets_take_values_from_iptables_save() {
        let doc = r#"{"nftables": [
          {"chain": {"family": "ip", "table": "nat", "name": "POSTROUTING", "handle": 1, "hook": "postrouting", "prio": 100}},
          {"chain": {"family": "ip", "table": "nat", "name": "KUBE-POSTROUTING", "handle": 2}},
          {"rule": {"family": "ip", "table": "nat", "chain": "POSTROUTING", "handle": 3, "expr": [{"jump": {"target": "KUBE-POSTROUTING"}}]}},
          {"rule": {"family": "ip", "table": "nat", "chain": "KUBE-POSTROUTING", "handle": 4, "expr": [
            {"match": {"op": "!=", "left": {"&": [{"meta": {"key": "mark"}}, 16384]}, "right": 16384}}, {"return": null}]}},
          {"rule": {"family": "ip", "table": "nat", "chain": "KUBE-POSTROUTING", "handle": 5, "expr": [
            {"counter": {"packets": 0, "bytes": 0}}, {"xt": {"type": "target", "name": "MARK"}}]}}]}"#;
        let text = "table ip nat { # handle 9\n\tchain KUBE-POSTROUTING { # handle 2\n\t\tmeta mark & 0x00004000 != 0x00004000 counter packets 3 bytes 9 return # handle 4\n\t\tcounter packets 0 bytes 0 meta mark set mark xor 0x4000 # handle 5\n\t}\n}\n";
        let save = iptables::parse_save("*nat\n-A POSTROUTING -j KUBE-POSTROUTING\n-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\nCOMMIT\n");
        let items = items(doc.as_bytes()).unwrap();
        let f = found(&items, text, &[(Family::Ipv4, save)]);
        assert_eq!(f.len(), 2);
        assert_eq!(
            f[0].text,
            "meta mark & 0x00004000 != 0x00004000 counter return"
        );
        assert!(matches!(
            f[1].access[0].op,
            Op::Write {
                toggles: 0x4000,
                known: true,
                ..
            }
        ));
        let Place::NftRule {
            iptables,
            reached_from,
            handle,
            ..
        } = &f[1].place
        else {
            panic!()
        };
        assert_eq!(
            iptables.as_deref(),
            Some("-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0")
        );
        assert_eq!(*handle, 5);
        assert_eq!(reached_from.len(), 1);
        assert_eq!(
            (reached_from[0].id.name.as_str(), reached_from[0].hook),
            ("POSTROUTING", NfHook::Postrouting)
        );
        // Without the save line the write is there, its value unknown.
        let f = found(&items, text, &[]);
        assert!(matches!(f[1].access[0].op, Op::Write { known: false, .. }));
    }

    /// CONNMARK writes the ct mark (--save-mark, --set-xmark) or the packet mark
    /// (--restore-mark): without its options, either may have been written.
    #[test]
    fn connmark_writes_both_marks_until_its_options_say_which() {
        let doc = r#"{"nftables": [
          {"chain": {"family": "ip", "table": "mangle", "name": "PREROUTING", "hook": "prerouting", "prio": -150}},
          {"rule": {"family": "ip", "table": "mangle", "chain": "PREROUTING", "handle": 2, "expr": [
            {"xt": {"type": "target", "name": "CONNMARK"}}]}}]}"#;
        let items = items(doc.as_bytes()).unwrap();
        let marks = |f: &[RawEntry]| -> Vec<(MarkKind, bool)> {
            f[0].access
                .iter()
                .map(|a| (a.mark, matches!(a.op, Op::Write { known: true, .. })))
                .collect()
        };
        assert_eq!(
            marks(&found(&items, "", &[])),
            [(MarkKind::Packet, false), (MarkKind::Conntrack, false)]
        );
        let saved = |line: &str| {
            let save = iptables::parse_save(&format!("*mangle\n{line}\nCOMMIT\n"));
            marks(&found(&items, "", &[(Family::Ipv4, save)]))
        };
        assert_eq!(
            saved("-A PREROUTING -j CONNMARK --restore-mark"),
            [(MarkKind::Packet, true)]
        );
        assert_eq!(
            saved("-A PREROUTING -j CONNMARK --save-mark"),
            [(MarkKind::Conntrack, true)]
        );
        assert_eq!(
            saved("-A PREROUTING -j CONNMARK --set-xmark 0x1/0x1"),
            [(MarkKind::Conntrack, true)]
        );
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn any_text_is_handled(text in "(\\PC|\n){0,300}") {
            let _ = rule_texts(&text);
        }

        #[test]
        fn any_json_is_handled(doc in json_value()) {
            let items = vec![serde_json::json!({"rule": {"family": "ip", "table": "t", "chain": "c", "expr": doc.clone()}}), doc.clone()];
            let _ = found(&items, "", &[]);
            if let Some(a) = doc.as_array() {
                let _ = rule_accesses(a);
            }
        }
    }

    /// JSON built from the keys and operators the parser looks at.
    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        crate::testing::json_with(
            &[
                "match", "mangle", "vmap", "xt", "left", "right", "key", "value", "meta", "ct",
                "&", "|", "^", "set", "data", "op", "name", "chain", "hook", "x",
            ],
            &["mark", "==", "!=", "MARK", "0x10", "output", ""],
        )
    }
}
