//! What attribution finds, as data: whose bits a transition changed, what they mean, and the
//! warnings. Owners are registry ids (`OwnerId`, `NameId`): the outputs name them. The event
//! carries it; the rules that fill it and the attributor (attribution/) import the event.
use std::{collections::BTreeMap, fmt, sync::Arc};

use crate::{
    mark::Mark,
    netstack::serialize_as_display,
    registry::{NameId, OwnerId, Registry},
};

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Attribution {
    /// The owner whose rules sit where the change happened (from nft table/chain names), or
    /// whose value a socket's SO_MARK is.
    pub(crate) writer: Option<OwnerId>,
    pub(crate) owners: Vec<OwnerChange>,
    /// Changed bits no candidate owner claims.
    pub(crate) unowned_bits: Option<Mark>,
    /// Whole-mark values recognised in the old or new mark.
    pub(crate) recognized: Vec<Recognized>,
    pub(crate) warnings: Vec<Warning>,
}

/// Where an owner's changed bits sit: one of its named fields, or the conntrack mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum FieldRef {
    Named(String),
    Conntrack,
}

/// A field's value: its bits, or (fields that hold numbers) the number they make.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FieldValue {
    Bits(Mark),
    Number(u32),
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OwnerChange {
    pub(crate) owner: OwnerId,
    /// Changed bits inside this owner's mask (or field).
    pub(crate) bits: Mark,
    pub(crate) field: Option<FieldRef>,
    pub(crate) old_value: FieldValue,
    pub(crate) new_value: FieldValue,
    pub(crate) meaning: Option<String>,
}

/// The mark before or after the change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Old,
    New,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Old => "old",
            Side::New => "new",
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Recognized {
    pub(crate) owner: OwnerId,
    pub(crate) value: Mark,
    pub(crate) meaning: String,
    pub(crate) side: Side,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum WarningKind {
    MultiOwner,
    Clobber,
    WholeOverwrite,
    Unowned,
    ExactMatchBroken,
}

impl fmt::Display for WarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WarningKind::MultiOwner => "multi-owner",
            WarningKind::Clobber => "clobber",
            WarningKind::WholeOverwrite => "whole-overwrite",
            WarningKind::Unowned => "unowned",
            WarningKind::ExactMatchBroken => "exact-match-broken",
        })
    }
}

serialize_as_display!(Side, WarningKind);

/// What a warning found (`output` says it in words).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Finding {
    /// A whole-mark writer replaced the mark and a bitwise owner lost bits.
    WholeOverwrite {
        writer: OwnerId,
        old: Mark,
        new: Mark,
        victim: OwnerId,
        lost: Mark,
    },
    /// A whole-mark writer's value sets bits another owner owns.
    ValueSetsForeignBits {
        writer: OwnerId,
        value: Mark,
        bits: Mark,
        victim: OwnerId,
        meanings: Vec<String>,
    },
    /// A writer changed (or only cleared) bits another owner also owns.
    Clobber {
        writer: OwnerId,
        cleared: bool,
        bits: Mark,
        victim: OwnerId,
        meanings: Vec<String>,
    },
    /// No writer is known and one change touched several owners' bits.
    MultiOwner { parts: Vec<(OwnerId, Mark)> },
    /// Bits changed that no selected owner claims.
    Unowned { bits: Mark },
    /// An owner that matches an exact value now sees it with foreign bits.
    ExactMatchBroken {
        owner: OwnerId,
        value: Mark,
        meaning: String,
        mark: Mark,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Warning {
    pub(crate) finding: Finding,
    /// The owners concerned, every version together.
    pub(crate) owners: Vec<NameId>,
}

impl Warning {
    pub(crate) fn kind(&self) -> WarningKind {
        match self.finding {
            Finding::WholeOverwrite { .. } => WarningKind::WholeOverwrite,
            Finding::ValueSetsForeignBits { .. } | Finding::Clobber { .. } => WarningKind::Clobber,
            Finding::MultiOwner { .. } => WarningKind::MultiOwner,
            Finding::Unowned { .. } => WarningKind::Unowned,
            Finding::ExactMatchBroken { .. } => WarningKind::ExactMatchBroken,
        }
    }
}

/// Totals over attributed transitions: per owner, and warnings per (kind, owners). Keeps the
/// registry its ids index, for the outputs to name them.
#[derive(Clone, Debug, Default)]
pub(crate) struct Totals {
    registry: Arc<Registry>,
    /// Transitions that changed each owner's bits (an owner counted once per transition).
    owners: BTreeMap<OwnerId, u64>,
    warnings: BTreeMap<(WarningKind, Vec<NameId>), u64>,
}

impl Totals {
    pub(crate) fn new(registry: Arc<Registry>) -> Self {
        Totals {
            registry,
            ..Default::default()
        }
    }

    /// Counts `n` transitions attributed as `a`.
    pub(crate) fn add(&mut self, a: &Attribution, n: u64) {
        let mut owners: Vec<OwnerId> = a.owners.iter().map(|o| o.owner).collect();
        owners.sort_unstable();
        owners.dedup();
        for owner in owners {
            *self.owners.entry(owner).or_default() += n;
        }
        for w in &a.warnings {
            *self
                .warnings
                .entry((w.kind(), w.owners.clone()))
                .or_default() += n;
        }
    }

    /// The registry the ids index.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Transitions per owner, in id order.
    pub(crate) fn by_owner(&self) -> impl Iterator<Item = (OwnerId, u64)> + '_ {
        self.owners.iter().map(|(o, n)| (*o, *n))
    }

    /// Warnings per (kind, owners).
    pub(crate) fn by_warning(&self) -> impl Iterator<Item = (WarningKind, &[NameId], u64)> + '_ {
        self.warnings.iter().map(|((k, o), n)| (*k, &o[..], *n))
    }
}
