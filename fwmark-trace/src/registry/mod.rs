//! The mark-owner registry: who uses which bits of the packet mark (and conntrack mark). The
//! built-in entries ship as `registry/builtin.toml` (documented, with the source of each
//! fact); users add or override entries with `--registry FILE`, every `*.toml` in
//! `/etc/fwmark-trace/registry.d/`, or `--owner NAME=MASK`, and pick the software their node
//! runs with `--owners a,b` (or `profile = [...]` in a registry file). An entry is `owner.rs`,
//! the file format `file.rs`; the `registry` command is `commands/registry.rs`.
pub(crate) mod file;
mod owner;

pub(crate) use owner::{lookup, Owner, Style};

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::nodestate::nft::ChainId;

pub(crate) const BUILTIN: &str = include_str!("../../registry/builtin.toml");
pub(crate) const SYSTEM_DIR: &str = "/etc/fwmark-trace/registry.d";

/// One registry entry (an owner, one version of it): its index in the registry. Attribution
/// carries and compares these; the name is looked up only where it is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct OwnerId(u16);

/// An owner with every version together (`kube-proxy`): what warnings and the node's presence
/// are about. The index of the owner's first entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct NameId(u16);

#[cfg(test)]
impl OwnerId {
    /// An id of no particular entry, for tests that never look it up.
    pub(crate) const ANY: OwnerId = OwnerId(0);
}

#[cfg(test)]
impl NameId {
    /// A name of no particular owner, for tests that never look it up.
    pub(crate) const ANY: NameId = NameId(0);
}

/// The owners, in the order their ids index: they are only added or replaced in place, so an
/// id handed out stays the same entry.
#[derive(Clone, Debug, Default)]
pub(crate) struct Registry {
    owners: Vec<Owner>,
    /// Per entry, its name's id (kept with `owners`).
    names: Vec<NameId>,
    /// Whether a profile narrowed the owners to the software this node runs.
    profiled: bool,
}

/// Where the registry comes from: files, quick owners and the profile (from the flags).
#[derive(Clone, Debug, Default)]
pub(crate) struct RegistrySources {
    /// Registry files, read after the built-in one and the system directory.
    pub(crate) files: Vec<PathBuf>,
    /// `NAME=MASK` quick bitwise owners.
    pub(crate) quick: Vec<String>,
    /// The software this node runs: attribute only to these owners.
    pub(crate) profile: Vec<String>,
    /// Skip /etc/fwmark-trace/registry.d/.
    pub(crate) no_system: bool,
}

/// Ids are `u16`: registry files defining this many entries are refused.
const MAX_OWNERS: usize = u16::MAX as usize + 1;

impl Registry {
    fn new(owners: Vec<Owner>, profiled: bool) -> Self {
        let mut reg = Self {
            owners,
            names: Vec::new(),
            profiled,
        };
        reg.index_names();
        reg
    }

    /// Recomputes each entry's name id (after entries were added or replaced).
    fn index_names(&mut self) {
        let names = {
            let mut first: HashMap<&str, NameId> = HashMap::new();
            self.entries()
                .map(|(id, o)| *first.entry(&o.name).or_insert(NameId(id.0)))
                .collect()
        };
        self.names = names;
    }

    pub(crate) fn builtin() -> Result<Self> {
        let (owners, _) = file::parse(BUILTIN, "built-in")?;
        Ok(Self::new(owners, false))
    }

    /// Adds owners; an entry with the id of an existing one replaces it.
    pub(crate) fn merge(&mut self, owners: Vec<Owner>) {
        for o in owners {
            match self.owners.iter_mut().find(|x| x.id() == o.id()) {
                Some(slot) => *slot = o,
                None => self.owners.push(o),
            }
        }
        // Every id must fit a `u16`: `load` refuses files that reach the limit.
        self.owners.truncate(MAX_OWNERS);
        self.index_names();
    }

    /// Every entry, in id order.
    pub(crate) fn owners(&self) -> &[Owner] {
        &self.owners
    }

    /// Every entry with its id.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (OwnerId, &Owner)> {
        // `merge` keeps at most MAX_OWNERS entries: every index fits.
        (0..=u16::MAX).map(OwnerId).zip(&self.owners)
    }

    /// The entry `id` stands for (an id from this registry).
    pub(crate) fn owner(&self, id: OwnerId) -> &Owner {
        &self.owners[usize::from(id.0)]
    }

    /// The name (every version together) of entry `id`.
    pub(crate) fn name_of(&self, id: OwnerId) -> NameId {
        self.names[usize::from(id.0)]
    }

    /// How a name id reads (`kube-proxy`).
    pub(crate) fn name(&self, name: NameId) -> &str {
        &self.owners[usize::from(name.0)].name
    }

    /// The entry whose id (`name` or `name@version`) is exactly `id`.
    #[cfg(test)]
    pub(crate) fn find(&self, id: &str) -> Option<OwnerId> {
        self.entries().find(|(_, o)| o.id() == id).map(|(i, _)| i)
    }

    /// Whether a profile narrowed the owners to the software this node runs.
    pub(crate) fn profiled(&self) -> bool {
        self.profiled
    }

    /// Built-in, then the system directory, then `--registry` files, then `--owner`; then the
    /// profile (`--owners`, else the last `profile` a file set).
    pub(crate) fn load(args: &RegistrySources) -> Result<Self> {
        let mut reg = Self::builtin()?;
        let mut files: Vec<PathBuf> = Vec::new();
        if !args.no_system && Path::new(SYSTEM_DIR).is_dir() {
            let mut sys: Vec<PathBuf> = std::fs::read_dir(SYSTEM_DIR)
                .with_context(|| format!("reading {SYSTEM_DIR}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            sys.sort();
            files.extend(sys);
        }
        files.extend(args.files.iter().cloned());
        let mut profile = None;
        for path in &files {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("registry {}: cannot read", path.display()))?;
            let (owners, p) = file::parse(&text, &path.display().to_string())?;
            reg.merge(owners);
            profile = p.or(profile);
        }
        for spec in &args.quick {
            reg.merge(vec![file::parse_owner_flag(spec)?]);
        }
        if reg.owners.len() >= MAX_OWNERS {
            bail!("the registry files define {MAX_OWNERS} owners or more: too many to tell apart");
        }
        let profile = if args.profile.is_empty() {
            profile
        } else {
            Some(args.profile.clone())
        };
        match profile {
            Some(names) => reg.select(&names),
            None => Ok(reg),
        }
    }

    /// Keeps only the owners these names designate (ids, names or aliases).
    pub(crate) fn select(&self, names: &[String]) -> Result<Self> {
        let mut owners = Vec::new();
        for name in names.iter().map(|n| n.trim()).filter(|n| !n.is_empty()) {
            let hits: Vec<&Owner> = self.owners.iter().filter(|o| o.answers_to(name)).collect();
            if hits.is_empty() {
                bail!("unknown owner {name:?}{}", self.suggest(name));
            }
            for o in hits {
                if !owners.iter().any(|x: &Owner| x.id() == o.id()) {
                    owners.push(o.clone());
                }
            }
        }
        Ok(Self::new(owners, true))
    }

    fn suggest(&self, name: &str) -> String {
        let lname = name.to_ascii_lowercase();
        // The first three characters (not bytes: a name may be any text).
        let head: String = lname.chars().take(3).collect();
        let mut close: Vec<String> = self
            .owners
            .iter()
            .map(|o| o.name.clone())
            .filter(|n| n.contains(&lname) || lname.contains(n.as_str()) || n.starts_with(&head))
            .collect();
        close.dedup();
        if close.is_empty() {
            "; `fwmark-trace registry list` shows every owner".into()
        } else {
            format!("; did you mean {}?", close.join(", "))
        }
    }

    /// Owners (by name, every version together) whose tables or chains appear among `names`
    /// (every chain of the ruleset), each with the names that matched.
    pub(crate) fn detect(&self, names: &[ChainId]) -> Vec<(String, Vec<String>)> {
        let mut found: Vec<(String, Vec<String>)> = Vec::new();
        for o in &self.owners {
            let mut hits: Vec<String> = names
                .iter()
                .flat_map(|c| [&c.table, &c.name])
                .filter(|n| o.owns_chain(n))
                .cloned()
                .collect();
            if hits.is_empty() {
                continue;
            }
            match found.iter_mut().find(|(n, _)| *n == o.name) {
                Some((_, prev)) => prev.append(&mut hits),
                None => found.push((o.name.clone(), hits)),
            }
        }
        for (_, hits) in &mut found {
            hits.sort();
            hits.dedup();
        }
        found
    }

    pub(crate) fn get(&self, name: &str) -> Vec<&Owner> {
        self.owners.iter().filter(|o| o.answers_to(name)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{
        file::{parse, parse_owner_flag},
        *,
    };
    use crate::netstack::NftFamily;

    #[test]
    fn detects_owners_by_their_tables_and_chains() {
        let reg = Registry::builtin().unwrap();
        let names: Vec<ChainId> = [
            ("nat", "KUBE-MARK-MASQ"),
            ("nat", "KUBE-SERVICES"),
            ("filter", "INPUT"),
            ("calico", "cali-POSTROUTING"),
            ("t", "ts-input"),
            ("istio-proxy-mangle", "istio-divert"),
        ]
        .iter()
        .map(|(t, c)| ChainId {
            family: NftFamily::Ip,
            table: t.to_string(),
            name: c.to_string(),
        })
        .collect();
        let found = reg.detect(&names);
        let owners: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert!(owners.contains(&"kube-proxy"), "{found:?}");
        assert!(owners.contains(&"calico"), "{found:?}");
        assert!(owners.contains(&"tailscale"), "{found:?}");
        // Istio's nftables backend, by its tables.
        let istio = &found.iter().find(|(n, _)| n == "istio").expect("istio").1;
        assert_eq!(istio, &["istio-proxy-mangle"]);
        assert!(!owners.contains(&"cilium"), "{found:?}");
        // Versions fold into one owner; evidence is listed once.
        let kube = &found.iter().find(|(n, _)| n == "kube-proxy").unwrap().1;
        assert_eq!(kube, &["KUBE-MARK-MASQ", "KUBE-SERVICES"]);
        assert!(reg.detect(&[]).is_empty());
    }

    #[test]
    fn builtin_parses_and_covers_the_researched_owners() {
        let reg = Registry::builtin().unwrap();
        for name in [
            "cilium",
            "kube-proxy",
            "calico",
            "calico-ebpf",
            "weave",
            "flannel",
            "aws-vpc-cni",
            "cni-portmap",
            "istio",
            "aws-app-mesh",
            "antrea",
            "ovn-kubernetes",
            "tailscale",
            "wg-quick",
            "networkmanager-wireguard",
            "systemd-networkd",
            "docker",
            "firewalld",
            "kube-router",
            "mullvad",
            "strongswan",
            "envoy",
            "netbird",
            "talos-kubespan",
            "linkerd",
        ] {
            assert!(!reg.get(name).is_empty(), "{name} missing");
        }
        // Corrections to the public registry.
        let istio = reg.get("istio@sidecar-tproxy")[0];
        assert_eq!(istio.value_name(0x539), Some("inbound tproxy (1337)"));
        assert_eq!(reg.get("tailscale")[0].mask, 0xff0000);
        assert_eq!(reg.get("cilium")[0].mask, u32::MAX);
        // Versions of one owner.
        let k: Vec<String> = reg.get("kube-proxy").iter().map(|o| o.id()).collect();
        assert_eq!(k, ["kube-proxy@current", "kube-proxy@legacy-kubelet<1.28"]);
        // An id names one version exactly; anything near it names none.
        for near in [
            "kube-proxy@",
            "kube-proxy@curren",
            "kube-proxy@current2",
            "@current",
        ] {
            assert!(reg.get(near).is_empty(), "{near}");
        }
        assert_eq!(reg.get("kube-proxy@current").len(), 1);
        assert!(
            reg.owners.iter().all(|o| !o.source.is_empty()),
            "every entry cites a source"
        );
    }

    #[test]
    fn bad_files_name_file_line_and_reason() {
        let text = "[[owner]]\nname = \"x\"\nstyle = \"bitwise\"\nmask = \"0xZZ\"\n";
        let e = parse(text, "/etc/x.toml").unwrap_err().to_string();
        assert_eq!(
            e,
            "registry /etc/x.toml, line 4: mask \"0xZZ\" is not a 32-bit number (0x… or decimal)"
        );
        let e = parse(
            "[[owner]]\nname = \"x\"\nstyle = \"sideways\"\nmask = \"1\"\n",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("registry f, line 3: style \"sideways\""),
            "{e}"
        );
        let e = parse("[[owner]]\nname = \"x\"\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line") && e.contains("missing field"), "{e}");
        let e = parse("[[owner]]\nname = \"x\"\nstyle = \"bitwise\"\nmask = \"0xf0\"\nvalues = { \"0x1\" = \"a\" }\n", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 5") && e.contains("outside"), "{e}");
        let e = parse(
            "[[owner]]\nname = \"x\"\nstyle = \"bitwise\"\nmask = \"0xf0\"\ncolour = 1\n",
            "f",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 5") && e.contains("unknown field"), "{e}");
        let twice = "[[owner]]\nname = \"x\"\nstyle = \"bitwise\"\nmask = \"1\"\n[[owner]]\nname = \"x\"\nstyle = \"bitwise\"\nmask = \"2\"\n";
        assert!(parse(twice, "f")
            .unwrap_err()
            .to_string()
            .contains("line 6"));
        let field = "[[owner]]\nname = \"x\"\nstyle = \"bitwise\"\nmask = \"0xf0\"\n[[owner.fields]]\nname = \"f\"\nmask = \"0xf00\"\n";
        assert!(parse(field, "f")
            .unwrap_err()
            .to_string()
            .contains("line 7"));
    }

    #[test]
    fn overrides_owner_flag_and_profiles() {
        let mut reg = Registry::builtin().unwrap();
        let n = reg.owners.len();
        let (o, profile) = parse(
            "profile = [\"tailscale\", \"myapp\"]\n[[owner]]\nname = \"tailscale\"\nstyle = \"bitwise\"\nmask = \"0xff00000\"\n[[owner]]\nname = \"myapp\"\nstyle = \"bitwise\"\nmask = \"0xf\"\n",
            "user.toml",
        )
        .unwrap();
        reg.merge(o);
        assert_eq!(reg.owners.len(), n + 1);
        assert_eq!(reg.get("tailscale")[0].mask, 0xff00000);
        assert_eq!(reg.get("tailscale")[0].origin, "user.toml");
        assert_eq!(profile.unwrap(), ["tailscale", "myapp"]);

        assert_eq!(
            parse_owner_flag("app=0xf0000000").unwrap().mask,
            0xf000_0000
        );
        assert!(parse_owner_flag("app").is_err());
        assert!(parse_owner_flag("App=1").is_err());
        assert!(parse_owner_flag("app=zz").is_err());

        let sel = reg.select(&["Kubernetes".into(), "cilium".into()]).unwrap();
        assert!(sel.profiled);
        assert_eq!(sel.owners.len(), 3, "two kube-proxy versions and cilium");
        // Not ASCII: suggestions compare characters, not bytes.
        for odd in ["ééx", "é", "日本語", "a\u{301}b"] {
            let e = reg.select(&[odd.into()]).unwrap_err().to_string();
            assert!(e.contains("unknown owner"), "{e}");
        }
        let e = reg.select(&["calicoo".into()]).unwrap_err().to_string();
        assert!(
            e.contains("unknown owner \"calicoo\"") && e.contains("calico"),
            "{e}"
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::testing::fixed_seed())]
            /// Arbitrary text, and arbitrary edits of the built-in file, never panic the parser.
            #[test]
            fn parser_never_panics(text in "(\\PC|\n){0,400}") {
                let _ = parse(&text, "fuzz");
            }

            /// Any owner name (`--owners`, `registry check`, a file's profile) and any
            /// `--owner` spec is a selection or an error.
            #[test]
            fn any_owner_name_never_panics(name in "\\PC{0,12}", spec in "\\PC{0,16}") {
                let reg = Registry::builtin().unwrap();
                let _ = reg.select(std::slice::from_ref(&name));
                let _ = reg.get(&name);
                let _ = parse_owner_flag(&spec);
                let _ = parse(&format!("profile = [{name:?}]\n"), "fuzz")
                    .map(|(_, p)| reg.select(&p.unwrap_or_default()));
            }

            #[test]
            fn mutated_builtin_never_panics(at in 0usize..BUILTIN.len(), len in 0usize..40, with in "\\PC{0,8}") {
                let mut text = BUILTIN.to_owned();
                let start = (0..=at).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
                let end = (start + len..=text.len()).find(|i| text.is_char_boundary(*i)).unwrap_or(text.len());
                text.replace_range(start..end, &with);
                let _ = parse(&text, "fuzz");
            }
        }
    }

    #[test]
    fn chain_patterns() {
        let reg = Registry::builtin().unwrap();
        let calico = reg.get("calico")[0];
        assert!(calico.owns_chain("cali-POSTROUTING") && !calico.owns_chain("KUBE-MARK-MASQ"));
        assert!(reg.get("aws-vpc-cni@nftables>=1.23")[0].owns_chain("aws-cni"));
        // Istio's nftables backend: its tables name the writer (what attribution matches).
        let nft = reg.get("istio@sidecar-tproxy-nftables")[0];
        assert!(nft.owns_chain("istio-proxy-mangle") && !nft.owns_chain("ISTIO_DIVERT"));
        assert_eq!(nft.value_name(0x539), Some("inbound tproxy (1337)"));
    }
}
