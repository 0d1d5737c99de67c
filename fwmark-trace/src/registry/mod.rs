//! The mark-owner registry: who uses which bits of the packet mark (and conntrack mark). The
//! built-in entries ship as `registry/builtin.toml` (documented, with the source of each
//! fact); users add or override entries with `--registry FILE`, every `*.toml` in
//! `/etc/fwmark-trace/registry.d/`, or `--owner NAME=MASK`, and pick the software their node
//! runs with `--owners a,b` (or `profile = [...]` in a registry file).
pub mod cli;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use toml::Spanned;

pub const BUILTIN: &str = include_str!("../../registry/builtin.toml");
pub const SYSTEM_DIR: &str = "/etc/fwmark-trace/registry.d";

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Style {
    /// Owns the bits under its mask and leaves the others alone.
    Bitwise,
    /// Writes whole 32-bit values (any foreign bit is lost or breaks its matches).
    WholeMark,
}

/// A named sub-range of an owner's mask (Cilium's magic nibble, its identity bits…).
#[derive(Clone, Debug, PartialEq)]
pub struct Field {
    pub name: String,
    pub mask: u32,
    /// Decode as a number (shifted down) rather than as named values.
    pub number: bool,
    /// Named values, in mark position (not shifted).
    pub values: Vec<(u32, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    pub name: String,
    pub version: Option<String>,
    pub aliases: Vec<String>,
    pub description: String,
    pub source: String,
    pub style: Style,
    pub mask: u32,
    pub ct_mask: Option<u32>,
    /// Matches whole values (e.g. `ip rule fwmark 0xca6c` without a mask).
    pub reads_exact: bool,
    /// Named values of the whole mark.
    pub values: Vec<(u32, String)>,
    /// nft table/chain name patterns of this owner's rules (`*` = any suffix).
    pub chains: Vec<String>,
    pub fields: Vec<Field>,
    /// Where the entry came from: "built-in", a file path, or "--owner".
    pub origin: String,
}

impl Owner {
    /// `name` or `name@version`.
    pub fn id(&self) -> String {
        match &self.version {
            Some(v) => format!("{}@{v}", self.name),
            None => self.name.clone(),
        }
    }

    /// Whether `name` designates this entry: its id, its name (every version), or an alias.
    pub fn answers_to(&self, name: &str) -> bool {
        self.id() == name
            || self.name == name
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }

    pub fn value_name(&self, v: u32) -> Option<&str> {
        lookup(&self.values, v)
    }

    /// Whether an nft table or chain name is one of this owner's.
    pub fn owns_chain(&self, name: &str) -> bool {
        self.chains.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        })
    }
}

pub fn lookup(values: &[(u32, String)], v: u32) -> Option<&str> {
    values
        .iter()
        .find(|(x, _)| *x == v)
        .map(|(_, n)| n.as_str())
}

#[derive(Clone, Debug, Default)]
pub struct Registry {
    pub owners: Vec<Owner>,
    /// Whether a profile narrowed the owners to the software this node runs.
    pub profiled: bool,
}

// ---- file format ----------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    profile: Option<Vec<String>>,
    #[serde(default)]
    owner: Vec<RawOwner>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOwner {
    name: Spanned<String>,
    version: Option<String>,
    #[serde(default)]
    aliases: Vec<String>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    source: String,
    style: Spanned<String>,
    mask: Spanned<String>,
    ct_mask: Option<Spanned<String>>,
    #[serde(default)]
    reads_exact: bool,
    #[serde(default)]
    values: BTreeMap<Spanned<String>, String>,
    #[serde(default)]
    chains: Vec<String>,
    #[serde(default)]
    fields: Vec<RawField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawField {
    name: String,
    mask: Spanned<String>,
    #[serde(default)]
    number: bool,
    #[serde(default)]
    values: BTreeMap<Spanned<String>, String>,
}

/// Parses `0x1234` or `4660` (marks are 32 bits).
pub fn parse_u32(s: &str) -> Option<u32> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// A file being parsed: turns byte spans into "file, line N: reason" errors.
struct Source<'a> {
    origin: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn line(&self, span: std::ops::Range<usize>) -> usize {
        self.text[..span.start.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn err(&self, span: std::ops::Range<usize>, reason: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "registry {}, line {}: {reason}",
            self.origin,
            self.line(span)
        )
    }

    fn number(&self, s: &Spanned<String>, what: &str) -> Result<u32> {
        parse_u32(s.get_ref()).ok_or_else(|| {
            self.err(
                s.span(),
                format!(
                    "{what} {:?} is not a 32-bit number (0x… or decimal)",
                    s.get_ref()
                ),
            )
        })
    }

    fn values(
        &self,
        raw: &BTreeMap<Spanned<String>, String>,
        within: u32,
        what: &str,
    ) -> Result<Vec<(u32, String)>> {
        raw.iter()
            .map(|(k, name)| {
                let v = self.number(k, "value")?;
                if v & !within != 0 {
                    return Err(self.err(
                        k.span(),
                        format!("value {v:#x} has bits outside {what} {within:#x}"),
                    ));
                }
                Ok((v, name.clone()))
            })
            .collect()
    }
}

/// Parses one registry file's text: its owners and its optional profile.
pub fn parse(text: &str, origin: &str) -> Result<(Vec<Owner>, Option<Vec<String>>)> {
    let src = Source { origin, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| {
        let reason = e.message().to_owned();
        match e.span() {
            Some(span) => src.err(span, reason),
            None => anyhow!("registry {origin}: {reason}"),
        }
    })?;
    let mut owners = Vec::new();
    for o in raw.owner {
        let name = o.name.get_ref();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(src.err(
                o.name.span(),
                format!("owner name {name:?} must be lowercase letters, digits and '-'"),
            ));
        }
        let style = match o.style.get_ref().as_str() {
            "bitwise" => Style::Bitwise,
            "whole-mark" => Style::WholeMark,
            other => {
                return Err(src.err(
                    o.style.span(),
                    format!("style {other:?} is neither \"bitwise\" nor \"whole-mark\""),
                ))
            }
        };
        let mask = src.number(&o.mask, "mask")?;
        let fields = o
            .fields
            .iter()
            .map(|f| {
                let fmask = src.number(&f.mask, "field mask")?;
                if fmask & !mask != 0 {
                    return Err(src.err(
                        f.mask.span(),
                        format!(
                            "field {} mask {fmask:#x} is outside the owner's mask {mask:#x}",
                            f.name
                        ),
                    ));
                }
                Ok(Field {
                    name: f.name.clone(),
                    mask: fmask,
                    number: f.number,
                    values: src.values(&f.values, fmask, "field mask")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Whole-mark owners name whole values; bitwise owners only values inside their bits.
        let within = if style == Style::Bitwise {
            mask
        } else {
            u32::MAX
        };
        let owner = Owner {
            name: name.clone(),
            version: o.version,
            aliases: o.aliases,
            description: o.description,
            source: o.source,
            style,
            mask,
            ct_mask: o
                .ct_mask
                .as_ref()
                .map(|m| src.number(m, "ct_mask"))
                .transpose()?,
            reads_exact: o.reads_exact,
            values: src.values(&o.values, within, "mask")?,
            chains: o.chains,
            fields,
            origin: origin.to_owned(),
        };
        if owners.iter().any(|x: &Owner| x.id() == owner.id()) {
            return Err(src.err(
                o.name.span(),
                format!("owner {} is defined twice in this file", owner.id()),
            ));
        }
        owners.push(owner);
    }
    Ok((owners, raw.profile))
}

/// Where the registry comes from (the CLI flags).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct RegistryArgs {
    /// Add or override owners from a TOML registry file (repeatable).
    #[arg(long = "registry", value_name = "FILE", global = true)]
    pub files: Vec<PathBuf>,
    /// Quick bitwise owner: NAME=MASK (repeatable), e.g. myapp=0xf0000000.
    #[arg(long = "owner", value_name = "NAME=MASK", global = true)]
    pub owner: Vec<String>,
    /// The software this node runs (comma-separated owner names): attribute only to these.
    #[arg(
        long = "owners",
        value_name = "A,B,…",
        value_delimiter = ',',
        global = true
    )]
    pub owners: Vec<String>,
    /// Do not read /etc/fwmark-trace/registry.d/.
    #[arg(long, global = true)]
    pub no_system_registry: bool,
}

impl Registry {
    pub fn builtin() -> Result<Self> {
        let (owners, _) = parse(BUILTIN, "built-in")?;
        Ok(Self {
            owners,
            profiled: false,
        })
    }

    /// Adds owners; an entry with the id of an existing one replaces it.
    pub fn merge(&mut self, owners: Vec<Owner>) {
        for o in owners {
            match self.owners.iter_mut().find(|x| x.id() == o.id()) {
                Some(slot) => *slot = o,
                None => self.owners.push(o),
            }
        }
    }

    /// Built-in, then the system directory, then `--registry` files, then `--owner`; then the
    /// profile (`--owners`, else the last `profile` a file set).
    pub fn load(args: &RegistryArgs) -> Result<Self> {
        let mut reg = Self::builtin()?;
        let mut files: Vec<PathBuf> = Vec::new();
        if !args.no_system_registry && Path::new(SYSTEM_DIR).is_dir() {
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
            let (owners, p) = parse(&text, &path.display().to_string())?;
            reg.merge(owners);
            profile = p.or(profile);
        }
        for spec in &args.owner {
            reg.merge(vec![parse_owner_flag(spec)?]);
        }
        let profile = if args.owners.is_empty() {
            profile
        } else {
            Some(args.owners.clone())
        };
        match profile {
            Some(names) => reg.select(&names),
            None => Ok(reg),
        }
    }

    /// Keeps only the owners these names designate (ids, names or aliases).
    pub fn select(&self, names: &[String]) -> Result<Self> {
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
        Ok(Self {
            owners,
            profiled: true,
        })
    }

    fn suggest(&self, name: &str) -> String {
        let lname = name.to_ascii_lowercase();
        let mut close: Vec<String> = self
            .owners
            .iter()
            .map(|o| o.name.clone())
            .filter(|n| {
                n.contains(&lname)
                    || lname.contains(n.as_str())
                    || n.starts_with(&lname[..lname.len().min(3)])
            })
            .collect();
        close.dedup();
        if close.is_empty() {
            "; `fwmark-trace registry list` shows every owner".into()
        } else {
            format!("; did you mean {}?", close.join(", "))
        }
    }

    /// Owners (by name, every version together) whose tables or chains appear among `names`
    /// ((table, chain) pairs from the ruleset), each with the names that matched.
    pub fn detect(&self, names: &[(String, String)]) -> Vec<(String, Vec<String>)> {
        let mut found: Vec<(String, Vec<String>)> = Vec::new();
        for o in &self.owners {
            let mut hits: Vec<String> = names
                .iter()
                .flat_map(|(t, c)| [t, c])
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

    pub fn get(&self, name: &str) -> Vec<&Owner> {
        self.owners.iter().filter(|o| o.answers_to(name)).collect()
    }
}

/// `--owner NAME=MASK`: a quick bitwise owner.
pub fn parse_owner_flag(spec: &str) -> Result<Owner> {
    let (name, mask) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("--owner {spec:?}: expected NAME=MASK, e.g. myapp=0xf0000000"))?;
    let mask = parse_u32(mask)
        .ok_or_else(|| anyhow!("--owner {spec:?}: mask {mask:?} is not a 32-bit number"))?;
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!("--owner {spec:?}: name must be lowercase letters, digits and '-'");
    }
    Ok(Owner {
        name: name.to_owned(),
        version: None,
        aliases: vec![],
        description: "given with --owner".into(),
        source: "--owner".into(),
        style: Style::Bitwise,
        mask,
        ct_mask: None,
        reads_exact: false,
        values: vec![],
        chains: vec![],
        fields: vec![],
        origin: "--owner".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_owners_by_their_tables_and_chains() {
        let reg = Registry::builtin().unwrap();
        let names: Vec<(String, String)> = [
            ("nat", "KUBE-MARK-MASQ"),
            ("nat", "KUBE-SERVICES"),
            ("filter", "INPUT"),
            ("calico", "cali-POSTROUTING"),
            ("t", "ts-input"),
            ("istio-proxy-mangle", "istio-divert"),
        ]
        .iter()
        .map(|(t, c)| (t.to_string(), c.to_string()))
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
