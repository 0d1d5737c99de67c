//! `fwmark-trace inventory`: every place on a node that reads or writes packet-mark or
//! conntrack-mark bits, with value and mask, attributed to its owner, and the conflicts between
//! owners. A library first (`Inventory::read`, then queries: `owner_names`, `writer_of` — what
//! trace's attribution asks —, `conflicts`, `by_bit`), a command second (`command`).
//!
//! One module per source, each returning `Finding` places: `nft` (nft rules, iptables-nft's
//! included), `iptables` (iptables-legacy tables), `iprule`, `xfrm` (policies and states),
//! `wireguard` (device fwmarks), `sockets` (SO_MARK), `bpf` (tc and cgroup programs),
//! `ovs` (Open vSwitch flows), `conntrack` (marks in use). `owners` attributes, `conflicts`
//! compares, `render` prints.
pub(crate) mod bits;
pub(crate) mod bpf;
pub(crate) mod conflicts;
pub(crate) mod conntrack;
pub(crate) mod iprule;
pub(crate) mod iptables;
pub(crate) mod model;
pub(crate) mod nft;
pub(crate) mod nl;
pub(crate) mod ovs;
pub(crate) mod owners;
pub(crate) mod render;
pub(crate) mod sockets;
pub(crate) mod wireguard;
pub(crate) mod xfrm;

use std::{collections::BTreeSet, path::PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;

pub(crate) use conflicts::Conflict;
pub(crate) use model::{Entry, Finding, MarkKind, Netns, Op, OwnerRef, Place, Scope};

use crate::{
    nodestate::nft::ChainId,
    registry::{NameId, Registry},
};

/// Which sources to read (all by default; trace start-up may skip the slow ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sources {
    pub(crate) nft: bool,
    pub(crate) iptables_legacy: bool,
    pub(crate) ip_rules: bool,
    pub(crate) xfrm: bool,
    pub(crate) wireguard: bool,
    pub(crate) sockets: bool,
    pub(crate) bpf: bool,
    pub(crate) ovs: bool,
    pub(crate) conntrack: bool,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            nft: true,
            iptables_legacy: true,
            ip_rules: true,
            xfrm: true,
            wireguard: true,
            sockets: true,
            bpf: true,
            ovs: true,
            conntrack: true,
        }
    }
}

/// Which namespaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Namespaces {
    /// The calling thread's.
    Current,
    /// An `ip netns` name or a path such as /proc/PID/ns/net.
    One(String),
    /// Every namespace: /run/netns names, then the unnamed ones processes hold.
    All,
}

/// A source that could not be read, or was skipped, and why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Note {
    pub(crate) netns: Option<Netns>,
    pub(crate) source: &'static str,
    pub(crate) message: String,
}

/// One bit's readers and writers in one namespace.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct BitUse {
    pub(crate) netns: Option<Netns>,
    pub(crate) mark: MarkKind,
    #[serde(serialize_with = "model::hex")]
    pub(crate) bit: u32,
    pub(crate) writers: Vec<usize>,
    pub(crate) readers: Vec<usize>,
    /// Conntrack entries holding a value with this bit.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) held: Vec<usize>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct Inventory {
    pub(crate) namespaces: Vec<Netns>,
    pub(crate) entries: Vec<Entry>,
    pub(crate) notes: Vec<Note>,
}

/// The namespaces to read: (what to enter, None for the current one; how it is named).
fn namespaces(which: &Namespaces) -> Result<Vec<(Option<PathBuf>, Netns)>> {
    use crate::netns::inode;
    match which {
        Namespaces::Current => Ok(vec![(
            None,
            Netns {
                inode: crate::netns::current()?,
                name: "current".into(),
                pod: None,
            },
        )]),
        Namespaces::One(spec) => {
            let path = crate::netns::resolve(spec)?;
            if !path.exists() {
                bail!(
                    "network namespace {spec:?} not found (looked for {})",
                    path.display()
                );
            }
            let ino = inode(&path)?;
            Ok(vec![(
                Some(path),
                Netns {
                    inode: ino,
                    name: spec.clone(),
                    pod: crate::nodestate::pods::by_netns().remove(&ino),
                },
            )])
        }
        Namespaces::All => {
            let mut out: Vec<(Option<PathBuf>, Netns)> = Vec::new();
            let mut seen = BTreeSet::new();
            let mut named: Vec<PathBuf> = std::fs::read_dir("/run/netns")
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            named.sort();
            for p in named {
                let (Ok(ino), Some(name)) = (inode(&p), p.file_name().and_then(|n| n.to_str()))
                else {
                    continue;
                };
                if seen.insert(ino) {
                    let name = name.to_owned();
                    out.push((Some(p), Netns::named(ino, name)));
                }
            }
            let mut pids: Vec<u32> = std::fs::read_dir("/proc")
                .context("listing /proc")?
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            pids.sort_unstable();
            for pid in pids {
                let p = PathBuf::from(format!("/proc/{pid}/ns/net"));
                let Ok(ino) = inode(&p) else { continue };
                if seen.insert(ino) {
                    let name = format!("pid {pid}");
                    out.push((Some(p), Netns::named(ino, name)));
                }
            }
            // Containers' namespaces are named by their pod (or container) too.
            let mut pods = crate::nodestate::pods::by_netns();
            for (_, ns) in &mut out {
                ns.pod = pods.remove(&ns.inode);
            }
            Ok(out)
        }
    }
}

/// Reads every source in the calling thread's namespace.
fn read_here(
    sources: Sources,
    programs: &[bpf::Program],
) -> (Vec<Finding>, Vec<(&'static str, String)>) {
    use crate::stack::Family;
    let mut found = Vec::new();
    let mut notes = Vec::new();
    let mut take = |source: &'static str, r: Result<Vec<Finding>>| match r {
        Ok(f) => found.extend(f),
        Err(e) => notes.push((source, format!("{e:#}"))),
    };
    if sources.nft {
        take("nft", nft::read());
    }
    if sources.iptables_legacy {
        for (family, tool) in [
            (Family::Ipv4, "iptables-legacy-save"),
            (Family::Ipv6, "ip6tables-legacy-save"),
        ] {
            if crate::nodestate::nft::legacy_table_names(family).is_empty() {
                continue;
            }
            take("iptables-legacy", match iptables::save(tool) {
                Ok(Some(text)) => Ok(iptables::found(&text, family)),
                Ok(None) => Err(anyhow::anyhow!("iptables-legacy tables are in use but {tool} is not installed: their rules are not listed")),
                Err(e) => Err(e),
            });
        }
    }
    if sources.ip_rules {
        take("ip rules", iprule::read());
    }
    if sources.xfrm {
        take("xfrm policies", xfrm::policies());
        take("xfrm states", xfrm::states());
    }
    if sources.wireguard {
        take("wireguard", wireguard::read());
    }
    if sources.sockets {
        take("sockets", sockets::read());
    }
    if sources.bpf {
        take("bpf programs", bpf::tc_here(programs));
    }
    if sources.ovs {
        take("ovs", ovs::read());
    }
    if sources.conntrack {
        take("conntrack", conntrack::read());
    }
    (found, notes)
}

impl Inventory {
    /// Reads the namespaces' sources and attributes every entry with `reg`.
    pub(crate) fn read(reg: &Registry, which: &Namespaces, sources: Sources) -> Result<Self> {
        let list = namespaces(which)?;
        let mut inv = Inventory::default();
        let programs = if sources.bpf {
            match bpf::programs() {
                Ok(p) => p,
                Err(e) => {
                    inv.note(None, "bpf programs", format!("{e:#}"));
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let mut per_ns: Vec<(Netns, Vec<Finding>)> = Vec::new();
        for (path, ns) in list {
            let progs = programs.clone();
            let res = std::thread::spawn(move || -> Result<_> {
                if let Some(p) = path {
                    crate::netns::enter(&p.to_string_lossy())?;
                }
                Ok(read_here(sources, &progs))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("reading namespace {}: a reader panicked", ns.name))?;
            match res {
                Ok((found, notes)) => {
                    for (source, message) in notes {
                        inv.note(Some(ns.clone()), source, message);
                    }
                    per_ns.push((ns.clone(), found));
                }
                // A namespace that went away while listing: said, not fatal with --all-netns.
                Err(e) if *which == Namespaces::All => {
                    inv.note(Some(ns.clone()), "netns", format!("{e:#}"));
                    continue;
                }
                Err(e) => return Err(e),
            }
            inv.namespaces.push(ns);
        }
        for (ns, found) in per_ns {
            inv.add(Some(ns), found);
        }
        inv.add(None, bpf::cgroup(&programs));
        inv.attribute(reg);
        Ok(inv)
    }

    fn note(&mut self, netns: Option<Netns>, source: &'static str, message: String) {
        self.notes.push(Note {
            netns,
            source,
            message,
        });
    }

    /// Adds found places as entries of `netns` (numbered, not yet attributed).
    pub(crate) fn add(&mut self, netns: Option<Netns>, found: Vec<Finding>) {
        for f in found {
            self.entries.push(Entry {
                id: self.entries.len(),
                netns: netns.clone(),
                place: f.place,
                text: f.text,
                access: f.access,
                owner: None,
                names: f.names,
            });
        }
    }

    /// Attributes every entry (ties go to owners recognised by name in the same namespace).
    pub(crate) fn attribute(&mut self, reg: &Registry) {
        let groups: Vec<Option<Netns>> = self
            .entries
            .iter()
            .map(|e| e.netns.clone())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        for g in groups {
            let members: Vec<Entry> = self
                .entries
                .iter()
                .filter(|e| e.netns.is_none() || e.netns == g)
                .cloned()
                .collect();
            let present = owners::present_by_name(reg, &members);
            for e in self.entries.iter_mut().filter(|e| e.netns == g) {
                e.owner = owners::attribute(reg, e, &present);
            }
        }
    }

    /// Registry ids of the owners of any entry, sorted.
    pub(crate) fn owners_present(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter_map(|e| e.owner.as_ref().map(|o| o.id.clone()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// Entries in namespace `inode` (node-wide ones included).
    pub(crate) fn in_netns(&self, inode: u32) -> impl Iterator<Item = &Entry> {
        self.entries
            .iter()
            .filter(move |e| e.netns.as_ref().is_none_or(|n| n.inode == inode))
    }

    /// Owner names (every version together) with something in namespace `netns`, node-wide
    /// entries included: whom attribution may name without `--owners`.
    pub(crate) fn owner_names(&self, netns: u32) -> BTreeSet<NameId> {
        self.in_netns(netns)
            .filter_map(|e| e.owner.as_ref().map(|o| o.name_id))
            .collect()
    }

    /// The owner of the writes, among the rules of `chains` (and the chains they reach), the
    /// BPF programs `programs` and the flows of OVS `bridge` in namespace `netns`, that can
    /// have turned `old` into `new`
    /// (`mark`; `other`: the other mark, when known). None when no write can, or when writes
    /// of different owners can: the change is then nobody's in particular.
    pub(crate) fn writer_of(
        &self,
        netns: u32,
        chains: &[ChainId],
        programs: &[u32],
        bridge: Option<&str>,
        mark: MarkKind,
        (old, new, other): (u32, u32, Option<u32>),
    ) -> Option<&OwnerRef> {
        let here = |e: &Entry| match &e.place {
            Place::OvsFlow { bridge: b, .. } => bridge == Some(b.as_str()),
            Place::NftRule {
                chain,
                reached_from,
                ..
            } => chains
                .iter()
                .any(|c| c == chain || reached_from.iter().any(|b| b.id == *c)),
            Place::BpfProgram { id, .. } => programs.contains(id),
            _ => false,
        };
        let mut owners = self
            .in_netns(netns)
            .filter(|e| here(e))
            .filter(|e| {
                e.writes()
                    .any(|a| a.mark == mark && a.explains(old, new, other))
            })
            .map(|e| e.owner.as_ref());
        let first = owners.next()??;
        owners
            .all(|o| o.is_some_and(|o| o.name_id == first.name_id))
            .then_some(first)
    }

    pub(crate) fn conflicts(&self) -> Vec<Conflict> {
        conflicts::conflicts(&self.entries)
    }

    /// Per namespace, mark and bit in use: who writes, reads or holds it. A whole write counts
    /// for the bits it sets or copies (it clears all the others: see its access).
    pub(crate) fn by_bit(&self) -> Vec<BitUse> {
        let mut out: Vec<BitUse> = Vec::new();
        for e in &self.entries {
            for a in &e.access {
                for bit in (0..32).map(|b| 1u32 << b).filter(|b| a.bits() & b != 0) {
                    let slot = match out
                        .iter_mut()
                        .position(|u| u.netns == e.netns && u.mark == a.mark && u.bit == bit)
                    {
                        Some(i) => &mut out[i],
                        None => {
                            out.push(BitUse {
                                netns: e.netns.clone(),
                                mark: a.mark,
                                bit,
                                writers: vec![],
                                readers: vec![],
                                held: vec![],
                            });
                            out.last_mut().expect("just pushed")
                        }
                    };
                    let list = match a.op {
                        Op::Read => &mut slot.readers,
                        Op::Write { .. } => &mut slot.writers,
                        Op::Holds { .. } => &mut slot.held,
                    };
                    if list.last() != Some(&e.id) {
                        list.push(e.id);
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.netns, a.mark, a.bit).cmp(&(&b.netns, b.mark, b.bit)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{nodestate::nft::items, stack::NftFamily};

    /// Two base chains writing marks: a neutral name assigning wg-quick's value, and
    /// kube-proxy's masquerade chain (reached by a jump) OR-ing its bit.
    const RULESET: &str = r#"{"nftables": [
      {"chain": {"family": "inet", "table": "t", "name": "x", "hook": "output", "prio": -150}},
      {"chain": {"family": "ip", "table": "kube-proxy", "name": "nat-output", "hook": "output", "prio": -100}},
      {"chain": {"family": "ip", "table": "kube-proxy", "name": "mark-for-masquerade"}},
      {"rule": {"family": "inet", "table": "t", "chain": "x", "handle": 2, "expr": [
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 51820}}]}},
      {"rule": {"family": "ip", "table": "kube-proxy", "chain": "nat-output", "handle": 3, "expr": [
        {"jump": {"target": "mark-for-masquerade"}}]}},
      {"rule": {"family": "ip", "table": "kube-proxy", "chain": "mark-for-masquerade", "handle": 4, "expr": [
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"|": [{"meta": {"key": "mark"}}, 16384]}}}]}}]}"#;

    fn inventory() -> Inventory {
        let reg = Registry::builtin().unwrap();
        let mut inv = Inventory::default();
        let found = nft::found(&items(RULESET.as_bytes()).unwrap(), "", &[]);
        let ns = Netns {
            inode: 7,
            name: "test".into(),
            pod: None,
        };
        inv.add(Some(ns), found);
        inv.attribute(&reg);
        inv
    }

    fn id(family: NftFamily, table: &str, name: &str) -> ChainId {
        ChainId {
            family,
            table: table.into(),
            name: name.into(),
        }
    }

    #[test]
    fn the_writer_is_the_rule_whose_write_explains_the_change() {
        let inv = inventory();
        let x = id(NftFamily::Inet, "t", "x");
        let kube = id(NftFamily::Ip, "kube-proxy", "nat-output");
        let writer = |chains: &[ChainId], old, new| {
            inv.writer_of(7, chains, &[], None, MarkKind::Packet, (old, new, None))
                .map(|o| o.id.clone())
        };
        // The neutral chain's rule assigns 0xca6c: wg-quick's, by value.
        assert_eq!(
            writer(std::slice::from_ref(&x), 0x80000, 0xca6c).as_deref(),
            Some("wg-quick")
        );
        // kube-proxy's write sits in the chain its base chain jumps to.
        assert_eq!(
            writer(std::slice::from_ref(&kube), 0x100, 0x4100).as_deref(),
            Some("kube-proxy@current")
        );
        // Nothing there writes that; in both bands, only the write that fits counts.
        assert_eq!(writer(std::slice::from_ref(&x), 0, 0x4000), None);
        assert_eq!(
            writer(&[x, kube], 0, 0x4000).as_deref(),
            Some("kube-proxy@current")
        );
        // Another namespace has none of these rules.
        assert!(inv
            .writer_of(8, &[], &[], None, MarkKind::Packet, (0, 0xca6c, None))
            .is_none());
        let reg = Registry::builtin().unwrap();
        let names: Vec<&str> = inv
            .owner_names(7)
            .into_iter()
            .map(|n| reg.name(n))
            .collect();
        assert!(
            names.contains(&"wg-quick") && names.contains(&"kube-proxy"),
            "{names:?}"
        );
        assert!(inv.owner_names(8).is_empty());
    }
}
