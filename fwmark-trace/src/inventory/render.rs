//! The inventory for people (grouped by namespace, then by bit, then the conflicts) and as one
//! JSON document (`entries`, `by_bit`, `conflicts`, `notes`).
use std::fmt::Write as _;

use serde::Serialize;

use super::{BitUse, Conflict, Entry, Inventory, MarkKind, Netns, Note, Scope};

/// The `--json` document.
#[derive(Serialize)]
pub(crate) struct Document<'a> {
    pub(crate) namespaces: &'a [Netns],
    pub(crate) owners: Vec<String>,
    pub(crate) entries: &'a [Entry],
    pub(crate) by_bit: Vec<BitUse>,
    pub(crate) conflicts: &'a [Conflict],
    pub(crate) notes: &'a [Note],
}

/// Per namespace, mark and bit in use: who writes, reads or holds it. A whole assignment
/// writes every bit, so it is among the writers of every bit in use in its namespace (a
/// node-wide one, a cgroup program's, in every namespace), besides the bits it sets or copies.
pub(crate) fn by_bit(inv: &Inventory) -> Vec<BitUse> {
    let mut uses = inv.by_bit();
    for e in &inv.entries {
        for a in e.access.iter().filter(|a| a.scope() == Some(Scope::Whole)) {
            for u in uses
                .iter_mut()
                .filter(|u| u.mark == a.mark && (e.netns.is_none() || u.netns == e.netns))
            {
                if !u.writers.contains(&e.id) {
                    u.writers.push(e.id);
                    u.writers.sort_unstable();
                }
            }
        }
    }
    uses
}

pub(crate) fn json(inv: &Inventory, conflicts: &[Conflict]) -> String {
    let doc = Document {
        namespaces: &inv.namespaces,
        owners: inv.owners_present(),
        entries: &inv.entries,
        by_bit: by_bit(inv),
        conflicts,
        notes: &inv.notes,
    };
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

fn owner_of(e: &Entry) -> String {
    match &e.owner {
        Some(o) => {
            let by = if o.guess {
                format!("{}, a guess", o.by.label())
            } else {
                o.by.label().to_owned()
            };
            if o.also.is_empty() {
                format!("{} (by {by})", o.id)
            } else {
                format!("{} (by {by}; also {})", o.id, o.also.join(", "))
            }
        }
        None => "unowned".into(),
    }
}

fn entry(s: &mut String, e: &Entry) {
    let _ = writeln!(s, "  #{:<3} {}  → {}", e.id, e.place.label(), owner_of(e));
    if !e.text.is_empty() {
        let _ = writeln!(s, "         {}", e.text);
    }
    for a in &e.access {
        let _ = writeln!(s, "         {}", a.describe());
    }
}

fn ids(inv: &Inventory, list: &[usize]) -> String {
    list.iter()
        .map(|i| format!("#{i} {}", inv.entries[*i].owner_id()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One namespace's section (or the node-wide one when `ns` is None).
fn section(s: &mut String, inv: &Inventory, ns: Option<&Netns>, uses: &[BitUse]) {
    let entries: Vec<&Entry> = inv
        .entries
        .iter()
        .filter(|e| e.netns.as_ref() == ns)
        .collect();
    match ns {
        Some(n) => {
            let pod = n.pod.as_ref().map_or(String::new(), |p| format!(", {p}"));
            let _ = writeln!(
                s,
                "netns {} (inode {}{pod}): {} entries",
                n.name,
                n.inode,
                entries.len()
            );
        }
        None if entries.is_empty() => return,
        None => {
            let _ = writeln!(
                s,
                "node-wide (cgroup programs, in every namespace): {} entries",
                entries.len()
            );
        }
    }
    for e in &entries {
        entry(s, e);
    }
    for mark in [MarkKind::Packet, MarkKind::Conntrack] {
        let here: Vec<&BitUse> = uses
            .iter()
            .filter(|u| u.netns.as_ref() == ns && u.mark == mark)
            .collect();
        if here.is_empty() {
            continue;
        }
        let _ = writeln!(s, "  by bit, {}:", mark.label());
        for u in here {
            let mut parts = Vec::new();
            if !u.writers.is_empty() {
                parts.push(format!("written by {}", ids(inv, &u.writers)));
            }
            if !u.readers.is_empty() {
                parts.push(format!("read by {}", ids(inv, &u.readers)));
            }
            if !u.held.is_empty() {
                parts.push(format!("held by {}", ids(inv, &u.held)));
            }
            let _ = writeln!(
                s,
                "    {:#010x} (bit {:>2})  {}",
                u.bit,
                u.bit.trailing_zeros(),
                parts.join("; ")
            );
        }
        let whole: Vec<usize> = entries
            .iter()
            .filter(|e| {
                e.access
                    .iter()
                    .any(|a| a.mark == mark && a.scope() == Some(Scope::Whole))
            })
            .map(|e| e.id)
            .collect();
        if !whole.is_empty() {
            let _ = writeln!(s, "    every bit  assigned whole by {}", ids(inv, &whole));
        }
    }
}

pub(crate) fn human(inv: &Inventory, conflicts: &[Conflict]) -> String {
    let mut s = String::new();
    let uses = by_bit(inv);
    for ns in &inv.namespaces {
        section(&mut s, inv, Some(ns), &uses);
    }
    section(&mut s, inv, None, &uses);
    for n in &inv.notes {
        let at = n
            .netns
            .as_ref()
            .map(|n| format!(" in {}", n.name))
            .unwrap_or_default();
        let _ = writeln!(s, "note: {}{at}: {}", n.source, n.message);
    }
    if conflicts.is_empty() {
        s.push_str("conflicts: none\n");
        return s;
    }
    let _ = writeln!(s, "conflicts: {}", conflicts.len());
    for c in conflicts {
        let at = c
            .netns
            .as_ref()
            .map(|n| format!(" [{}]", n.name))
            .unwrap_or_default();
        let refs: Vec<String> = c.entries.iter().map(|i| format!("#{i}")).collect();
        let _ = writeln!(
            s,
            "  !! {} {} × {}: {} ({}){at}",
            c.kind.label(),
            c.owners[0],
            c.owners[1],
            c.message,
            refs.join(", ")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{inventory::bits::Bits, nodestate::nft::items, registry::Registry};

    /// Tailscale's bypass rule read by an ip-rule-like reader, an unowned `meta mark set 0x1`
    /// and a neutral clear of the bypass bit, as nft rules in one namespace.
    fn inventory() -> Inventory {
        let ruleset = r#"{"nftables": [
          {"chain": {"family": "inet", "table": "t", "name": "pre", "hook": "prerouting", "prio": -150}},
          {"chain": {"family": "inet", "table": "t", "name": "post", "hook": "postrouting", "prio": -150}},
          {"chain": {"family": "ip", "table": "filter", "name": "ts-forward"}},
          {"rule": {"family": "inet", "table": "t", "chain": "pre", "handle": 2, "expr": [
            {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}}]}},
          {"rule": {"family": "inet", "table": "t", "chain": "post", "handle": 3, "expr": [
            {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"&": [{"meta": {"key": "mark"}}, 4294443007]}}}]}},
          {"rule": {"family": "ip", "table": "filter", "chain": "ts-forward", "handle": 4, "expr": [
            {"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, 16711680]}, "right": 524288}}]}}]}"#;
        let reg = Registry::builtin().unwrap();
        let mut inv = Inventory::default();
        let ns = Netns {
            inode: 7,
            name: "test".into(),
            pod: None,
        };
        inv.namespaces.push(ns.clone());
        let found = crate::inventory::nft::found(&items(ruleset.as_bytes()).unwrap(), "", &[]);
        inv.add(Some(ns), found);
        inv.attribute(&reg);
        inv
    }

    #[test]
    fn a_whole_write_is_a_writer_of_every_bit_in_use_and_guesses_say_so() {
        let inv = inventory();
        let whole = inv
            .entries
            .iter()
            .find(|e| e.access.iter().any(|a| a.scope() == Some(Scope::Whole)))
            .expect("the assignment");
        assert_eq!(whole.access[0].value(), 1);
        assert!(whole.owner.is_none());
        let uses = by_bit(&inv);
        let bypass = uses.iter().find(|u| u.bit == 0x80000).expect("bit 19");
        assert!(bypass.writers.contains(&whole.id), "{bypass:?}");
        assert!(uses
            .iter()
            .filter(|u| u.bit != 1)
            .all(|u| u.writers.contains(&whole.id)));
        let text = human(&inv, &inv.conflicts());
        assert!(text.contains("→ tailscale (by mask, a guess)"), "{text}");
        assert!(
            text.contains("!! whole-overwrite unowned × tailscale"),
            "{text}"
        );
        assert!(
            text.contains("!! foreign-reader tailscale × unowned"),
            "{text}"
        );
        let doc: serde_json::Value = serde_json::from_str(&json(&inv, &inv.conflicts())).unwrap();
        assert!(doc["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["owner"]["guess"] == true));
        // Nothing whole, nothing added.
        let mut one = Inventory::default();
        one.entries.push(Entry {
            access: vec![Bits::same().or(0x4000).write(MarkKind::Packet).unwrap()],
            ..whole.clone()
        });
        assert_eq!(by_bit(&one), one.by_bit());
    }
}
