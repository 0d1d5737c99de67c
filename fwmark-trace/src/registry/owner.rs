//! One registry entry: an owner (one version of it), the bits it uses and how (`Style`), its
//! named fields and values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Style {
    /// Owns the bits under its mask and leaves the others alone.
    Bitwise,
    /// Writes whole 32-bit values (any foreign bit is lost or breaks its matches).
    WholeMark,
}

/// A named sub-range of an owner's mask (Cilium's magic nibble, its identity bits…).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Field {
    pub(crate) name: String,
    pub(crate) mask: u32,
    /// Decode as a number (shifted down) rather than as named values.
    pub(crate) number: bool,
    /// Named values, in mark position (not shifted).
    pub(crate) values: Vec<(u32, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Owner {
    pub(crate) name: String,
    pub(crate) version: Option<String>,
    pub(crate) aliases: Vec<String>,
    pub(crate) description: String,
    pub(crate) source: String,
    pub(crate) style: Style,
    pub(crate) mask: u32,
    pub(crate) ct_mask: Option<u32>,
    /// Matches whole values (e.g. `ip rule fwmark 0xca6c` without a mask).
    pub(crate) reads_exact: bool,
    /// Named values of the whole mark.
    pub(crate) values: Vec<(u32, String)>,
    /// nft table/chain name patterns of this owner's rules (`*` = any suffix).
    pub(crate) chains: Vec<String>,
    pub(crate) fields: Vec<Field>,
    /// Where the entry came from: "built-in", a file path, or "--owner".
    pub(crate) origin: String,
}

impl Owner {
    /// `name` or `name@version`.
    pub(crate) fn id(&self) -> String {
        match &self.version {
            Some(v) => format!("{}@{v}", self.name),
            None => self.name.clone(),
        }
    }

    /// Whether `name` designates this entry: its id, its name (every version), or an alias.
    pub(crate) fn answers_to(&self, name: &str) -> bool {
        self.id() == name
            || self.name == name
            || self.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    }

    pub(crate) fn value_name(&self, v: u32) -> Option<&str> {
        lookup(&self.values, v)
    }

    /// Whether an nft table or chain name is one of this owner's.
    pub(crate) fn owns_chain(&self, name: &str) -> bool {
        self.chains.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        })
    }
}

pub(crate) fn lookup(values: &[(u32, String)], v: u32) -> Option<&str> {
    values
        .iter()
        .find(|(x, _)| *x == v)
        .map(|(_, n)| n.as_str())
}
