//! `fwmark-trace inventory`: every place on a node that reads or writes packet-mark or
//! conntrack-mark bits, with value and mask, attributed to its owner, and the conflicts between
//! owners. A library first, a command second (`commands::inventory`). Its front door is
//! `Inventory`: `read` for the namespaces' sources, `refresh` to read again only the sources
//! that changed, then the queries: `owner_names`, `writer_of` — what trace's attribution
//! asks —, `conflicts`, `by_bit`. `Refresher` keeps one fresh in the background.
//!
//! One module per source, each returning `RawEntry` places: `nft` (nft rules, iptables-nft's
//! included), `iptables` (iptables-legacy tables), `iprule`, `xfrm` (policies and states),
//! `wireguard` (device fwmarks), `sockets` (SO_MARK), `bpf` (tc and cgroup programs),
//! `ovs` (Open vSwitch flows), `conntrack` (marks in use). `owners` attributes, `conflicts`
//! compares, `render` prints.
mod bits;
mod bpf;
mod conflicts;
mod conntrack;
mod iprule;
pub(crate) mod iptables;
mod model;
pub(crate) mod nft;
mod nl;
pub(crate) mod ovs;
mod owners;
mod refresher;
pub(crate) mod render;
mod sockets;
pub(crate) mod wireguard;
mod xfrm;

use std::{collections::BTreeSet, path::PathBuf};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

pub(crate) use conflicts::Conflict;
pub(crate) use model::{Entry, MarkKind, Netns, Op, OwnerRef, Place, RawEntry, Scope};
pub(crate) use refresher::Refresher;

use crate::{
    nodestate::nft::ChainId,
    registry::{NameId, Registry},
};

/// Where entries come from: one reader each (in the order a whole read takes them, which is
/// the order of the entries).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Source {
    Nft,
    IptablesLegacy,
    IpRules,
    Xfrm,
    Wireguard,
    Sockets,
    /// tc programs per namespace, cgroup programs node-wide.
    Bpf,
    Ovs,
    Conntrack,
}

impl Source {
    const ALL: [Source; 9] = [
        Source::Nft,
        Source::IptablesLegacy,
        Source::IpRules,
        Source::Xfrm,
        Source::Wireguard,
        Source::Sockets,
        Source::Bpf,
        Source::Ovs,
        Source::Conntrack,
    ];

    /// The source of an entry's place.
    fn of(place: &Place) -> Source {
        match place {
            Place::NftRule { .. } => Source::Nft,
            Place::IptablesRule { .. } => Source::IptablesLegacy,
            Place::IpRule { .. } => Source::IpRules,
            Place::XfrmPolicy { .. } | Place::XfrmState { .. } => Source::Xfrm,
            Place::Wireguard { .. } => Source::Wireguard,
            Place::Socket { .. } => Source::Sockets,
            Place::BpfProgram { .. } => Source::Bpf,
            Place::OvsFlow { .. } => Source::Ovs,
            Place::Conntrack { .. } => Source::Conntrack,
        }
    }

    /// Reads this source in the calling thread's namespace: per part, under the name its
    /// notes carry, what it found or why it could not. `programs`: the node's BPF programs;
    /// `ruleset`: this namespace's nft ruleset when already listed.
    fn read_here(
        self,
        programs: &[bpf::Program],
        ruleset: Option<&[Value]>,
    ) -> Vec<(&'static str, Result<Vec<RawEntry>>)> {
        use crate::netstack::Family;
        match self {
            Source::Nft => vec![(
                "nft",
                match ruleset {
                    Some(items) => nft::from_items(items),
                    None => nft::read(),
                },
            )],
            Source::IptablesLegacy => [
                (Family::Ipv4, "iptables-legacy-save"),
                (Family::Ipv6, "ip6tables-legacy-save"),
            ]
            .into_iter()
            .filter(|(family, _)| !crate::nodestate::nft::legacy_table_names(*family).is_empty())
            .map(|(family, tool)| {
                let found = match iptables::save(tool) {
                    Ok(Some(text)) => Ok(iptables::found(&text, family)),
                    Ok(None) => Err(anyhow::anyhow!("iptables-legacy tables are in use but {tool} is not installed: their rules are not listed")),
                    Err(e) => Err(e),
                };
                ("iptables-legacy", found)
            })
            .collect(),
            Source::IpRules => vec![("ip rules", iprule::read())],
            Source::Xfrm => vec![
                ("xfrm policies", xfrm::policies()),
                ("xfrm states", xfrm::states()),
            ],
            Source::Wireguard => vec![("wireguard", wireguard::read())],
            Source::Sockets => vec![("sockets", sockets::read())],
            Source::Bpf => vec![("bpf programs", bpf::tc_here(programs))],
            Source::Ovs => vec![("ovs", ovs::read())],
            Source::Conntrack => vec![("conntrack", conntrack::read())],
        }
    }
}

/// Which sources to read (all by default; trace leaves conntrack out).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Sources(u16);

impl Sources {
    pub(crate) const NONE: Sources = Sources(0);
    pub(crate) const ALL: Sources = Sources((1 << Source::ALL.len()) - 1);

    pub(crate) const fn contains(self, s: Source) -> bool {
        self.0 & Self::bit(s) != 0
    }

    pub(crate) const fn with(self, s: Source) -> Sources {
        Sources(self.0 | Self::bit(s))
    }

    pub(crate) const fn without(self, s: Source) -> Sources {
        Sources(self.0 & !Self::bit(s))
    }

    pub(crate) const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Those of `self` and of `other`.
    pub(crate) fn and(self, other: Sources) -> Sources {
        Sources(self.0 | other.0)
    }

    fn iter(self) -> impl Iterator<Item = Source> {
        Source::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    const fn bit(s: Source) -> u16 {
        1 << s as u16
    }
}

impl Default for Sources {
    fn default() -> Self {
        Sources::ALL
    }
}

impl From<Source> for Sources {
    fn from(s: Source) -> Self {
        Sources::NONE.with(s)
    }
}

/// Which namespaces.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) enum Namespaces {
    /// The calling thread's.
    #[default]
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
    /// The reader it came from (none: the namespace itself), whose next read replaces it.
    #[serde(skip)]
    from: Option<Source>,
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

/// What the namespaces have that reads or writes marks, attributed. Its parts are read
/// through `read` and `refresh` and seen through the queries below.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Inventory {
    which: Namespaces,
    /// The namespaces read, and what to enter to read each again (None: the calling thread's).
    namespaces: Vec<Netns>,
    paths: Vec<Option<PathBuf>>,
    entries: Vec<Entry>,
    notes: Vec<Note>,
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

/// What a source found, or why not, under the name its note carries.
type Part = (Source, &'static str, Result<Vec<RawEntry>>);

/// Reads `sources` in the namespace at `path` (None: the calling thread's) on a thread of its
/// own, since entering a namespace changes the thread's. Err: the reader panicked; Ok(Err):
/// the namespace could not be entered.
fn read_in(
    path: Option<&std::path::Path>,
    sources: Sources,
    programs: &[bpf::Program],
    ruleset: Option<&[Value]>,
) -> std::thread::Result<Result<Vec<Part>>> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<Vec<Part>> {
            if let Some(p) = path {
                crate::netns::enter(&p.to_string_lossy())?;
            }
            Ok(sources
                .iter()
                .flat_map(|source| {
                    source
                        .read_here(programs, ruleset)
                        .into_iter()
                        .map(move |(name, found)| (source, name, found))
                })
                .collect())
        })
        .join()
    })
}

impl Inventory {
    /// Reads the namespaces' sources and attributes every entry with `reg`.
    pub(crate) fn read(reg: &Registry, which: &Namespaces, sources: Sources) -> Result<Self> {
        let (paths, namespaces) = namespaces(which)?.into_iter().unzip();
        let mut inv = Inventory {
            which: which.clone(),
            namespaces,
            paths,
            ..Default::default()
        };
        inv.refresh(reg, sources, None)?;
        Ok(inv)
    }

    /// Reads `sources` again in the namespaces read (what the others found stays) and
    /// attributes every entry anew: what a change of rules or programs needs, without
    /// reading what did not change. `ruleset`: the calling thread's namespace's nft ruleset,
    /// when the caller listed it already (used only for that namespace).
    pub(crate) fn refresh(
        &mut self,
        reg: &Registry,
        sources: Sources,
        ruleset: Option<&[Value]>,
    ) -> Result<()> {
        self.forget(sources);
        let ruleset = ruleset.filter(|_| self.which == Namespaces::Current);
        // Listed once for the node: each namespace takes the tc programs attached there.
        let programs = if sources.contains(Source::Bpf) {
            bpf::programs().unwrap_or_else(|e| {
                self.note(None, Some(Source::Bpf), "bpf programs", format!("{e:#}"));
                Vec::new()
            })
        } else {
            Vec::new()
        };
        let mut gone = Vec::new();
        for (i, ns) in self.namespaces.clone().into_iter().enumerate() {
            let read = read_in(self.paths[i].as_deref(), sources, &programs, ruleset)
                .map_err(|_| anyhow::anyhow!("reading namespace {}: a reader panicked", ns.name))?;
            match read {
                Ok(parts) => {
                    for (source, name, found) in parts {
                        match found {
                            Ok(f) => self.add(Some(ns.clone()), f),
                            Err(e) => {
                                self.note(Some(ns.clone()), Some(source), name, format!("{e:#}"))
                            }
                        }
                    }
                }
                // A namespace that went away while listing: said, not fatal with --all-netns.
                Err(e) if self.which == Namespaces::All => {
                    self.note(Some(ns), None, "netns", format!("{e:#}"));
                    gone.push(i);
                }
                Err(e) => return Err(e),
            }
        }
        for i in gone.into_iter().rev() {
            let ns = self.namespaces.remove(i);
            self.paths.remove(i);
            self.entries
                .retain(|e| e.netns.as_ref().is_none_or(|n| n.inode != ns.inode));
        }
        if sources.contains(Source::Bpf) {
            self.add(None, bpf::cgroup(&programs));
        }
        self.settle(reg);
        Ok(())
    }

    /// Drops what `sources` found, and their notes.
    fn forget(&mut self, sources: Sources) {
        self.entries
            .retain(|e| !sources.contains(Source::of(&e.place)));
        self.notes
            .retain(|n| n.from.is_none_or(|s| !sources.contains(s)));
    }

    fn note(
        &mut self,
        netns: Option<Netns>,
        from: Option<Source>,
        source: &'static str,
        message: String,
    ) {
        self.notes.push(Note {
            netns,
            source,
            message,
            from,
        });
    }

    /// Puts the entries in the order a whole read gives them (by namespace, then source; the
    /// node-wide ones last), numbers them and attributes them.
    fn settle(&mut self, reg: &Registry) {
        let namespaces = &self.namespaces;
        let position = |netns: &Option<Netns>| {
            netns.as_ref().map_or(usize::MAX, |n| {
                namespaces
                    .iter()
                    .position(|m| m.inode == n.inode)
                    .unwrap_or(usize::MAX - 1)
            })
        };
        self.entries
            .sort_by_key(|e| (position(&e.netns), Source::of(&e.place)));
        for (id, e) in self.entries.iter_mut().enumerate() {
            e.id = id;
        }
        self.attribute(reg);
    }

    /// Adds found places as entries of `netns` (numbered, not yet attributed).
    pub(crate) fn add(&mut self, netns: Option<Netns>, found: Vec<RawEntry>) {
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
    use crate::{netstack::NftFamily, nodestate::nft::items};

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
    fn sources_are_a_set() {
        let trace = Sources::ALL.without(Source::Conntrack);
        assert!(trace.contains(Source::Nft) && !trace.contains(Source::Conntrack));
        assert_eq!(Sources::default(), Sources::ALL);
        assert!(Sources::NONE.is_empty());
        let changed = Sources::from(Source::Bpf).and(Source::Nft.into());
        assert_eq!(
            changed.iter().collect::<Vec<_>>(),
            [Source::Nft, Source::Bpf]
        );
    }

    /// Reading one source again replaces its entries only; the entries keep a whole read's
    /// order (by namespace, then source) and are numbered and attributed anew.
    #[test]
    fn a_refreshed_source_replaces_only_its_own_entries() {
        let reg = Registry::builtin().unwrap();
        let mut inv = inventory();
        inv.namespaces.push(Netns {
            inode: 7,
            name: "test".into(),
            pod: None,
        });
        let nft_entries = inv.entries.len();
        let ns = inv.namespaces[0].clone();
        let socket = |port: u16| RawEntry {
            place: Place::Socket {
                proto: model::SockProto::Udp,
                local: ([0, 0, 0, 0], port).into(),
                remote: None,
                inode: 1,
                pid: None,
                comm: None,
            },
            text: String::new(),
            access: vec![],
            names: vec![],
        };
        inv.add(Some(ns.clone()), vec![socket(1)]);
        inv.note(
            Some(ns.clone()),
            Some(Source::Sockets),
            "sockets",
            "old".into(),
        );
        inv.settle(&reg);
        // The sockets read again: the old socket and its note go, the rules stay, first.
        inv.forget(Source::Sockets.into());
        inv.add(Some(ns.clone()), vec![socket(2)]);
        inv.settle(&reg);
        assert!(inv.notes.is_empty());
        assert_eq!(inv.entries.len(), nft_entries + 1);
        let last = inv.entries.last().unwrap();
        assert!(matches!(&last.place, Place::Socket { local, .. } if local.port() == 2));
        assert_eq!(last.id, nft_entries);
        // The nft rules read again come before the sockets, as in a whole read.
        inv.forget(Source::Nft.into());
        assert_eq!(inv.entries.len(), 1);
        let found = nft::found(&items(RULESET.as_bytes()).unwrap(), "", &[]);
        inv.add(Some(ns), found);
        inv.settle(&reg);
        assert!(matches!(
            inv.entries.last().unwrap().place,
            Place::Socket { .. }
        ));
        assert!(inv.entries.iter().enumerate().all(|(i, e)| e.id == i));
        assert_eq!(
            inv.writer_of(
                7,
                &[id(NftFamily::Inet, "t", "x")],
                &[],
                None,
                MarkKind::Packet,
                (0, 0xca6c, None)
            )
            .map(|o| o.id.as_str()),
            Some("wg-quick")
        );
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
