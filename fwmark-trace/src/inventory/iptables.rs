//! iptables rules as `iptables-save` prints them: the legacy tables (`iptables-legacy-save`,
//! `ip6tables-legacy-save`, whose rules nft cannot show) and, for iptables-nft's tables, the
//! arguments nft's JSON leaves out (its `xt` expressions name a target such as MARK but carry
//! no values). Marks: `-m mark`, `-m connmark` (reads), `-j MARK`, `-j CONNMARK`, `-j TPROXY
//! --tproxy-mark` (writes), with iptables' semantics (see `bits`).
use std::collections::{HashMap, HashSet};
use std::process::Command;

use anyhow::{bail, Context, Result};

use super::bits::Bits;
use super::model::{Access, MarkKind, Place, RawEntry};
use crate::mark::parse_u32;
use crate::netstack::Family;
use crate::nodestate::nft::jump_walk;

/// One `-A CHAIN …` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SavedRule {
    pub(crate) table: String,
    pub(crate) chain: String,
    /// 1-based position in its chain.
    pub(crate) position: usize,
    /// The line as printed (`-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000`).
    pub(crate) line: String,
    pub(crate) args: Vec<String>,
}

/// Parses `iptables-save` output: every rule of every table, in order.
pub(crate) fn parse_save(text: &str) -> Vec<SavedRule> {
    let mut table = String::new();
    let mut counts: HashMap<(String, String), usize> = HashMap::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(t) = line.strip_prefix('*') {
            table = t.trim().to_owned();
            continue;
        }
        let Some(rest) = line.strip_prefix("-A ") else {
            continue;
        };
        let args = split_args(rest);
        let Some(chain) = args.first().cloned() else {
            continue;
        };
        let n = counts.entry((table.clone(), chain.clone())).or_default();
        *n += 1;
        out.push(SavedRule {
            table: table.clone(),
            chain,
            position: *n,
            line: line.to_owned(),
            args: args[1..].to_vec(),
        });
    }
    out
}

/// Splits a rule's arguments as a shell would: `--comment "a b"` is one word.
fn split_args(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut any) = (false, false);
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// `V` or `V/M` (a missing mask is all 32 bits).
fn value_mask(s: &str) -> Option<(u32, u32)> {
    match s.split_once('/') {
        Some((v, m)) => Some((parse_u32(v)?, parse_u32(m)?)),
        None => Some((parse_u32(s)?, u32::MAX)),
    }
}

/// The option after `name` in `args` (its first occurrence from `from` on).
fn opt<'a>(args: &'a [String], from: usize, name: &str) -> Option<&'a str> {
    let i = args[from..].iter().position(|a| a == name)? + from;
    args.get(i + 1).map(String::as_str)
}

/// The mark reads and writes of one rule's arguments.
pub(crate) fn accesses(args: &[String]) -> Vec<Access> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        match (args[i].as_str(), args.get(i + 1).map(String::as_str)) {
            ("-m" | "--match", Some(m @ ("mark" | "connmark"))) => {
                let mark = if m == "mark" {
                    MarkKind::Packet
                } else {
                    MarkKind::Conntrack
                };
                // `[!] --mark V[/M]` up to the next module or target.
                let mut j = i + 2;
                let mut negated = false;
                while j < args.len() && !matches!(args[j].as_str(), "-m" | "-j" | "-g") {
                    match args[j].as_str() {
                        "!" => negated = true,
                        "--mark" => {
                            if let Some((v, m)) = args.get(j + 1).and_then(|s| value_mask(s)) {
                                out.push(Access::read(mark, v, m, negated));
                            }
                            negated = false;
                        }
                        _ => {}
                    }
                    j += 1;
                }
                i = j;
                continue;
            }
            ("-j", Some(target)) => {
                out.extend(target_write(target, &args[i + 2..]));
                break;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// What MARK, CONNMARK and TPROXY write, from their options.
fn target_write(target: &str, opts: &[String]) -> Option<Access> {
    let get = |name: &str| opt(opts, 0, name);
    let vm = |name: &str| get(name).and_then(value_mask);
    let num = |name: &str| get(name).and_then(parse_u32);
    let (mark, bits) = match target {
        "MARK" | "CONNMARK" => {
            let mark = if target == "MARK" {
                MarkKind::Packet
            } else {
                MarkKind::Conntrack
            };
            if let Some((v, m)) = vm("--set-xmark") {
                (mark, Bits::set_xmark(v, m))
            } else if let Some((v, m)) = vm("--set-mark") {
                (mark, Bits::set_mark(v, m))
            } else if let Some(v) = num("--or-mark") {
                (mark, Bits::same().or(v))
            } else if let Some(v) = num("--and-mark") {
                (mark, Bits::same().and(v))
            } else if let Some(v) = num("--xor-mark") {
                (mark, Bits::same().xor(v))
            } else if target == "CONNMARK" {
                let both = num("--mask").unwrap_or(u32::MAX);
                let nf = num("--nfmask").unwrap_or(both);
                let ct = num("--ctmask").unwrap_or(both);
                if opts.iter().any(|a| a == "--save-mark") {
                    // ct = (ct & ~ctmask) ^ (mark & nfmask)
                    (
                        MarkKind::Conntrack,
                        Bits::copy_masked(MarkKind::Packet, ct, nf),
                    )
                } else if opts.iter().any(|a| a == "--restore-mark") {
                    // mark = (mark & ~nfmask) ^ (ct & ctmask)
                    (
                        MarkKind::Packet,
                        Bits::copy_masked(MarkKind::Conntrack, nf, ct),
                    )
                } else {
                    return None;
                }
            } else {
                return None;
            }
        }
        "TPROXY" => {
            let (v, m) = vm("--tproxy-mark").or_else(|| vm("--on-mark"))?;
            (MarkKind::Packet, Bits::set_xmark(v, m))
        }
        _ => return None,
    };
    bits.write(mark)
}

/// The target or chain a rule jumps or goes to (`-j X`, `-g X`).
fn jump_of(args: &[String]) -> Option<&str> {
    let i = args.iter().position(|a| a == "-j" || a == "-g")?;
    args.get(i + 1).map(String::as_str)
}

/// Built-in chains: where the kernel enters a table.
const BUILTIN: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// For every (table, chain) with rules: the built-in chains ("mangle/PREROUTING") that reach
/// it through jumps and gotos.
pub(crate) fn reached_from(rules: &[SavedRule]) -> HashMap<(String, String), Vec<String>> {
    // Chains are what rules are appended to; anything else after -j is a target.
    let chains: HashSet<(&str, &str)> = rules
        .iter()
        .map(|r| (r.table.as_str(), r.chain.as_str()))
        .collect();
    let mut jumps: HashMap<(&str, &str), Vec<&str>> = HashMap::new();
    for r in rules {
        if let Some(t) = jump_of(&r.args).filter(|t| chains.contains(&(r.table.as_str(), *t))) {
            jumps
                .entry((r.table.as_str(), r.chain.as_str()))
                .or_default()
                .push(t);
        }
    }
    let mut out: HashMap<(String, String), Vec<String>> = HashMap::new();
    let tables: HashSet<&str> = rules.iter().map(|r| r.table.as_str()).collect();
    for table in tables {
        for base in BUILTIN {
            let below = |c: &&str| jumps.get(&(table, *c)).cloned().unwrap_or_default();
            for c in jump_walk(base, below) {
                out.entry((table.to_owned(), c.to_owned()))
                    .or_default()
                    .push(format!("{table}/{base}"));
            }
        }
    }
    for v in out.values_mut() {
        v.sort();
        v.dedup();
    }
    out
}

/// The rules of an `iptables-save` text that read or write a mark.
pub(crate) fn found(text: &str, family: Family) -> Vec<RawEntry> {
    let rules = parse_save(text);
    let reach = reached_from(&rules);
    rules
        .into_iter()
        .filter_map(|r| {
            let access = accesses(&r.args);
            if access.is_empty() {
                return None;
            }
            let reached = reach
                .get(&(r.table.clone(), r.chain.clone()))
                .cloned()
                .unwrap_or_default();
            Some(RawEntry {
                names: vec![r.chain.clone()],
                text: r.line,
                access,
                place: Place::IptablesRule {
                    family,
                    table: r.table,
                    chain: r.chain,
                    position: r.position,
                    reached_from: reached,
                },
            })
        })
        .collect()
}

/// Runs an `*-save` tool in the calling thread's namespace: its output, None when the tool is
/// not installed.
pub(crate) fn save(tool: &str) -> Result<Option<String>> {
    let out = match Command::new(tool).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("running {tool}")),
    };
    if !out.status.success() {
        bail!(
            "`{tool}` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(Some(String::from_utf8_lossy(&out.stdout).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::model::{Op, Scope};

    const KUBE: &str = "# Generated by iptables-save\n*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-MARK-MASQ - [0:0]\n:KUBE-POSTROUTING - [0:0]\n-A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\nCOMMIT\n*filter\n-A INPUT -j KUBE-FIREWALL\n-A KUBE-FIREWALL -m comment --comment \"kubernetes firewall for dropping marked packets\" -m mark --mark 0x8000/0x8000 -j DROP\nCOMMIT\n";

    #[test]
    fn kube_rules_as_iptables_save_prints_them() {
        let f = found(KUBE, Family::Ipv4);
        assert_eq!(f.len(), 4, "{f:#?}");
        let or = &f[0].access[0];
        assert_eq!(
            (or.value(), or.mask(), or.scope()),
            (0x4000, 0x4000, Some(Scope::Bits))
        );
        let neg = &f[1].access[0];
        assert_eq!(*neg, Access::read(MarkKind::Packet, 0x4000, 0x4000, true));
        assert!(matches!(
            f[2].access[0].op,
            Op::Write {
                toggles: 0x4000,
                ..
            }
        ));
        let drop = &f[3];
        assert_eq!(
            drop.access,
            vec![Access::read(MarkKind::Packet, 0x8000, 0x8000, false)]
        );
        assert!(
            matches!(&drop.place, Place::IptablesRule { chain, position: 1, reached_from, .. }
            if chain == "KUBE-FIREWALL" && reached_from == &["filter/INPUT"])
        );
        assert!(
            matches!(&f[1].place, Place::IptablesRule { position: 1, reached_from, .. }
            if reached_from == &["nat/POSTROUTING"])
        );
        // KUBE-MARK-MASQ is reached from nowhere here.
        assert!(
            matches!(&f[0].place, Place::IptablesRule { reached_from, .. } if reached_from.is_empty())
        );
    }

    #[test]
    fn connmark_tproxy_and_user_forms() {
        let a = |s: &str| accesses(&split_args(s));
        // Tailscale: save/restore under 0xff0000 (bitwise).
        let save = a("-m conntrack --ctstate NEW -m mark ! --mark 0x0/0xff0000 -j CONNMARK --save-mark --nfmask 0xff0000 --ctmask 0xff0000");
        assert_eq!(save[0], Access::read(MarkKind::Packet, 0, 0xff0000, true));
        assert_eq!(
            (save[1].mark, save[1].mask(), save[1].scope()),
            (MarkKind::Conntrack, 0xff0000, Some(Scope::Bits))
        );
        // Istio: restore with default masks (whole), reading ct 1337 exactly.
        let restore = a("-p tcp -m connmark --mark 1337 -j CONNMARK --restore-mark");
        assert_eq!(
            restore[0],
            Access::read(MarkKind::Conntrack, 1337, u32::MAX, false)
        );
        assert_eq!(
            (restore[1].mark, restore[1].scope()),
            (MarkKind::Packet, Some(Scope::Whole))
        );
        assert!(matches!(
            restore[1].op,
            Op::Write {
                copy_from: Some(MarkKind::Conntrack),
                ..
            }
        ));
        let tp = a("! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff");
        assert_eq!((tp[0].value(), tp[0].scope()), (0x539, Some(Scope::Whole)));
        assert_eq!(a("-j MARK --set-mark 1337")[0].scope(), Some(Scope::Whole));
        assert_eq!(a("-j MARK --or-mark 0x004000")[0].mask(), 0x4000);
        assert_eq!(a("-j MARK --and-mark 0xffff3fff")[0].mask(), 0xc000);
        assert_eq!(
            a("-j CONNMARK --set-xmark 0x80/0x80")[0].mark,
            MarkKind::Conntrack
        );
        assert_eq!(a("-j CONNMARK --save-mark --mask 0x80")[0].mask(), 0x80);
        assert!(a("-j ACCEPT").is_empty() && a("-j MARK").is_empty());
        assert_eq!(
            split_args("-m comment --comment \"a \\\"b\\\" c\" -j X"),
            ["-m", "comment", "--comment", "a \"b\" c", "-j", "X"]
        );
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn any_text_is_handled(text in "(\\PC|\n){0,300}") {
            let _ = found(&text, Family::Ipv6);
        }

        /// Random words drawn from the options the parser looks for.
        #[test]
        fn any_options_are_handled(words in proptest::collection::vec(proptest::sample::select(vec![
            "-A", "X", "-m", "mark", "connmark", "!", "--mark", "0x10/0x30", "zz", "-j", "-g", "MARK",
            "CONNMARK", "TPROXY", "--set-xmark", "--set-mark", "--or-mark", "--save-mark", "--restore-mark",
            "--nfmask", "--ctmask", "--mask", "--tproxy-mark", "1/", "/", "0xffffffff", "*nat", "\n"]), 0..30)) {
            let _ = found(&words.join(" "), Family::Ipv4);
        }
    }
}
