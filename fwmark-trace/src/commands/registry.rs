//! `fwmark-trace registry list | show NAME | check [OWNER…] | detect`: browse the registry,
//! check a set of owners for overlapping bits (exit code 1 when they overlap, for a platform
//! team's CI), and find which owners' rules the node's ruleset holds.
use std::fmt::Write as _;

use anyhow::{bail, Result};

use super::Outcome;
use crate::{
    nodestate::nft,
    registry::{Owner, Registry, RegistrySources, Style},
};

/// What `fwmark-trace registry` was asked.
#[derive(Clone, Debug)]
pub(crate) enum Request {
    List,
    Show(String),
    /// These owners (all when none) for overlaps.
    Check(Vec<String>),
    /// In this network namespace (the current one when none).
    Detect(Option<String>),
}

/// Runs a registry request; `Found` when `check` found overlapping owners.
pub(crate) fn run(req: &Request, sources: &RegistrySources) -> Result<Outcome> {
    let reg = Registry::load(sources)?;
    let out = match req {
        Request::List => list(&reg),
        Request::Show(name) => {
            let owners = reg.get(name);
            if owners.is_empty() {
                bail!("unknown owner {name:?}; `fwmark-trace registry list` shows every owner");
            }
            owners
                .iter()
                .map(|o| show(o))
                .collect::<Vec<_>>()
                .join("\n")
        }
        Request::Detect(netns) => {
            if let Some(ns) = netns {
                crate::netns::enter(ns)?;
            }
            detect_report(&reg.detect(&nft::read_names()?))
        }
        Request::Check(owners) => {
            let sel = if owners.is_empty() {
                reg
            } else {
                reg.select(owners)?
            };
            let (text, overlaps) = check(sel.owners());
            crate::commands::print_text(&text)?;
            return Ok(if overlaps {
                Outcome::Found
            } else {
                Outcome::Clean
            });
        }
    };
    crate::commands::print_text(&out)?;
    Ok(Outcome::Clean)
}

/// What `detect` found, one owner a line with the names that gave it away.
pub(crate) fn detect_report(found: &[(String, Vec<String>)]) -> String {
    if found.is_empty() {
        return "no registered owner's tables or chains in this ruleset\n".into();
    }
    let width = found.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    let mut s = String::new();
    for (name, hits) in found {
        let more = hits.len().saturating_sub(4);
        let shown = hits.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
        let more = if more > 0 {
            format!(" (+{more} more)")
        } else {
            String::new()
        };
        let _ = writeln!(s, "{name:<width$}  {shown}{more}");
    }
    let _ = writeln!(s, "suggested profile: --owners {}", profile(found));
    s
}

/// The `--owners` value naming what `detect` found.
pub(crate) fn profile(found: &[(String, Vec<String>)]) -> String {
    found
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn style(o: &Owner) -> &'static str {
    match o.style {
        Style::Bitwise => "bitwise",
        Style::WholeMark => "whole-mark",
    }
}

pub(crate) fn list(reg: &Registry) -> String {
    let width = reg.owners().iter().map(|o| o.id().len()).max().unwrap_or(0);
    let mut s = String::new();
    for o in reg.owners() {
        let _ = writeln!(
            s,
            "{:<width$}  {:<10}  {:#010x}  {}",
            o.id(),
            style(o),
            o.mask,
            o.description
        );
    }
    s
}

/// A 32-bit ruler (bit 31 on the left) with one letter per bit naming the field that owns it.
pub(crate) fn bitmap(o: &Owner) -> String {
    let mut s = String::from("bit   31      24      16       8       0\n      ");
    let mut legend = String::new();
    let letters: Vec<char> = ('a'..='z').collect();
    for bit in (0..32).rev() {
        let m = 1u32 << bit;
        let c = match o.fields.iter().position(|f| f.mask & m != 0) {
            Some(i) => letters[i % letters.len()],
            None if o.mask & m != 0 => '#',
            None => '.',
        };
        s.push(c);
        if bit % 8 == 0 && bit != 0 {
            s.push(' ');
        }
    }
    s.push('\n');
    for (i, f) in o.fields.iter().enumerate() {
        let _ = writeln!(
            legend,
            "      {} = {} ({:#x}{})",
            letters[i % letters.len()],
            f.name,
            f.mask,
            if f.number { ", a number" } else { "" }
        );
    }
    if o.mask & !o.fields.iter().fold(0, |a, f| a | f.mask) != 0 {
        legend.push_str("      # = owned, no named field\n");
    }
    s + &legend
}

pub(crate) fn show(o: &Owner) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{} ({}, mask {:#010x})", o.id(), style(o), o.mask);
    let _ = writeln!(s, "  {}", o.description);
    s += &bitmap(o);
    for f in &o.fields {
        for (v, name) in &f.values {
            let _ = writeln!(s, "  {}: {v:#x} = {name}", f.name);
        }
    }
    for (v, name) in &o.values {
        let _ = writeln!(s, "  value {v:#x} = {name}");
    }
    if let Some(ct) = o.ct_mask {
        let _ = writeln!(s, "  conntrack mark: {ct:#x}");
    }
    if o.reads_exact {
        let _ = writeln!(
            s,
            "  matches whole values: any foreign bit breaks its rules"
        );
    }
    if !o.chains.is_empty() {
        let _ = writeln!(s, "  rules: {}", o.chains.join(", "));
    }
    if !o.aliases.is_empty() {
        let _ = writeln!(s, "  aliases: {}", o.aliases.join(", "));
    }
    let _ = writeln!(s, "  source: {} [{}]", o.source, o.origin);
    s
}

/// Pairwise overlaps of skb-mark masks (versions of one owner are not compared with each
/// other): a conflict matrix, then one line per overlapping pair with the exact mask.
pub(crate) fn check(owners: &[Owner]) -> (String, bool) {
    let ids: Vec<String> = owners.iter().map(Owner::id).collect();
    let w = ids.iter().map(String::len).max().unwrap_or(0).max(5);
    let mut s = format!("{:w$}", "");
    for i in 0..owners.len() {
        let _ = write!(s, " {:>3}", i + 1);
    }
    s.push('\n');
    let mut pairs = Vec::new();
    for (i, a) in owners.iter().enumerate() {
        let _ = write!(s, "{:<w$}", format!("{} {}", i + 1, ids[i]));
        for (j, b) in owners.iter().enumerate() {
            let overlap = a.mask & b.mask;
            let cell = if i == j || a.name == b.name {
                "  -"
            } else if overlap != 0 {
                if i < j {
                    pairs.push((i, j, overlap));
                }
                "  X"
            } else {
                "  ."
            };
            s.push(' ');
            s.push_str(cell);
        }
        s.push('\n');
    }
    if pairs.is_empty() {
        s.push_str("no overlapping bits\n");
    }
    for (i, j, m) in &pairs {
        let _ = writeln!(s, "overlap {} × {}: {m:#010x}", ids[*i], ids[*j]);
    }
    (s, !pairs.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cilium_and_calico_overlap_on_calicos_bits() {
        let reg = Registry::builtin()
            .unwrap()
            .select(&["cilium".into(), "calico".into()])
            .unwrap();
        let (text, overlaps) = check(reg.owners());
        assert!(overlaps);
        let calico = reg.get("calico")[0].mask;
        assert!(
            text.contains(&format!(
                "overlap cilium × calico: {:#010x}",
                reg.get("cilium")[0].mask & calico
            )),
            "{text}"
        );
    }

    #[test]
    fn disjoint_owners_pass() {
        let reg = Registry::builtin()
            .unwrap()
            .select(&[
                "kube-proxy@current".into(),
                "cni-portmap".into(),
                "aws-vpc-cni@iptables".into(),
            ])
            .unwrap();
        let (text, overlaps) = check(reg.owners());
        assert!(!overlaps, "{text}");
    }

    #[test]
    fn check_is_symmetric() {
        let reg = Registry::builtin().unwrap();
        let (fwd, a) = check(
            reg.select(&["tailscale".into(), "weave".into()])
                .unwrap()
                .owners(),
        );
        let (rev, b) = check(
            reg.select(&["weave".into(), "tailscale".into()])
                .unwrap()
                .owners(),
        );
        assert_eq!(a, b);
        assert!(fwd.contains("0x00060000") && rev.contains("0x00060000"));
    }

    #[test]
    fn bitmap_marks_fields() {
        let reg = Registry::builtin().unwrap();
        let text = bitmap(reg.get("cilium")[0]);
        assert!(
            text.contains("aaaa ") && text.contains("a = magic"),
            "{text}"
        );
    }
}
