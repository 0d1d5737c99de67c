//! Attribution: whose bits a transition changed, what they mean, and whether someone clobbered
//! someone else's. Input: the registry (possibly narrowed to a profile), the old and new mark
//! and conntrack mark, and the nft chains in the segment where the change happened (which name
//! the writer). Output: one `Attribution` per distinct transition, shared by the events that
//! made it (`Attributor` keeps them, and counts them for the summary).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    sync::Arc,
};

use by_address::ByAddress;
use serde::Serialize;

use crate::{
    event::TraceEvent,
    inventory::{Inventory, MarkKind},
    mark::Mark,
    nodestate::nft::{Chain, ChainId, ChainOrigin},
    place::{MarkFate, Segment},
    registry::{lookup, Owner, Registry, Style},
    stack::serialize_as_display,
};

#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Attribution {
    /// The owner whose rules sit where the change happened (from nft table/chain names), or
    /// whose value a socket's SO_MARK is.
    pub(crate) writer: Option<String>,
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
    pub(crate) owner: String,
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

#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Recognized {
    pub(crate) owner: String,
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
        writer: String,
        old: Mark,
        new: Mark,
        victim: String,
        lost: Mark,
    },
    /// A whole-mark writer's value sets bits another owner owns.
    ValueSetsForeignBits {
        writer: String,
        value: Mark,
        bits: Mark,
        victim: String,
        meanings: Vec<String>,
    },
    /// A writer changed (or only cleared) bits another owner also owns.
    Clobber {
        writer: String,
        cleared: bool,
        bits: Mark,
        victim: String,
        meanings: Vec<String>,
    },
    /// No writer is known and one change touched several owners' bits.
    MultiOwner { parts: Vec<(String, Mark)> },
    /// Bits changed that no selected owner claims.
    Unowned { bits: Mark },
    /// An owner that matches an exact value now sees it with foreign bits.
    ExactMatchBroken {
        owner: String,
        value: Mark,
        meaning: String,
        mark: Mark,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Warning {
    pub(crate) finding: Finding,
    /// The owners concerned, by name.
    pub(crate) owners: Vec<String>,
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

/// One transition to attribute.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Change<'a> {
    pub(crate) old: u32,
    pub(crate) new: u32,
    /// Conntrack marks, when a conntrack entry is attached on both sides.
    pub(crate) ct: Option<(u32, u32)>,
    /// The nft base chains in the segment ("inet calico/cali-POSTROUTING@-150").
    pub(crate) chains: &'a [Chain],
    /// Regular chains those chains reach that write a mark ("ip mangle/KUBE-MARK-MASQ"): with
    /// iptables-nft the base chain is the table's, the owner's name is on these.
    pub(crate) mark_writers: &'a [ChainId],
    /// The mark came from the sending socket (SO_MARK): a recognised value names the writer.
    pub(crate) socket: bool,
    /// The owner (registry id) of the rule or program in the segment whose write can have made
    /// the change, from the node's inventory: the writer by what it writes, not by its name.
    pub(crate) written_by: Option<&'a str>,
    /// Owner names with something on this node (the inventory): without a profile only these
    /// are named. None: every registered owner may be.
    pub(crate) present: Option<&'a BTreeSet<String>>,
    /// The segment names the writer itself and it is no registry owner (an xfrm state whose
    /// output mark made the change): no owner is taken for the writer by name or value.
    pub(crate) written_outside: bool,
}

impl Change<'_> {
    /// Whether `o` may be named here: it has something on the node, or nothing says otherwise.
    fn eligible(&self, o: &Owner) -> bool {
        self.present.is_none_or(|p| p.contains(&o.name))
    }
}

fn field_value(v: u32, mask: u32, number: bool) -> FieldValue {
    if number && mask != 0 {
        FieldValue::Number(v >> mask.trailing_zeros())
    } else {
        FieldValue::Bits(Mark(v))
    }
}

/// Whether an owner's rules are among these chains (by table or chain name).
fn writes_here(o: &Owner, c: &Change) -> bool {
    let named = |id: &ChainId| o.owns_chain(&id.table) || o.owns_chain(&id.name);
    c.chains
        .iter()
        .filter(|ch| ch.origin != ChainOrigin::Kernel)
        .any(|ch| named(&ch.id))
        || c.mark_writers.iter().any(named)
}

/// Whether an owner of `mask` (its packet-mark or its conntrack-mark bits) is a candidate for
/// these changed bits. An owner of all 32 bits takes part only when a value of theirs is
/// recognised, or it writes here, or a profile selected it and it has a layout to decode
/// (Cilium's fields): otherwise every whole-value owner (wg-quick, Mullvad, …) would claim
/// every change.
fn candidate(o: &Owner, mask: u32, changed: u32, profiled: bool, named: bool) -> bool {
    mask & changed != 0 && (mask != u32::MAX || named || (profiled && !o.fields.is_empty()))
}

/// The named values of `o` that `bits` hold, whole or per field.
fn meanings(o: &Owner, bits: u32) -> Vec<String> {
    lookup(&o.values, bits)
        .into_iter()
        .chain(
            o.fields
                .iter()
                .filter_map(|f| lookup(&f.values, bits & f.mask)),
        )
        .map(str::to_owned)
        .collect()
}

/// Changed bits of one owner, split by field.
fn split(o: &Owner, c: &Change, changed: u32, out: &mut Vec<OwnerChange>) {
    let mine = changed & o.mask;
    let mut rest = mine;
    for f in o.fields.iter().filter(|f| f.mask & mine != 0) {
        rest &= !f.mask;
        out.push(OwnerChange {
            owner: o.id(),
            bits: Mark(mine & f.mask),
            field: Some(FieldRef::Named(f.name.clone())),
            old_value: field_value(c.old & f.mask, f.mask, f.number),
            new_value: field_value(c.new & f.mask, f.mask, f.number),
            meaning: lookup(&f.values, c.new & f.mask).map(str::to_owned),
        });
    }
    if rest != 0 {
        let meaning = o
            .value_name(c.new & o.mask)
            .or_else(|| o.value_name(c.new))
            .map(str::to_owned);
        out.push(OwnerChange {
            owner: o.id(),
            bits: Mark(rest),
            field: None,
            old_value: FieldValue::Bits(Mark(c.old & o.mask)),
            new_value: FieldValue::Bits(Mark(c.new & o.mask)),
            meaning,
        });
    }
}

/// The writer by name: the owner whose tables or chains sit in the segment (or the chains
/// they reach).
fn named_writer<'r>(reg: &'r Registry, c: &Change) -> Option<&'r Owner> {
    let changed = c.old ^ c.new;
    let mut writers: Vec<&Owner> = reg.owners.iter().filter(|o| writes_here(o, c)).collect();
    if writers.iter().any(|w| w.name != writers[0].name) {
        // Owners sharing rule names (Calico's iptables and eBPF modes): keep those whose
        // bits the change stayed within.
        writers.retain(|w| changed & !w.mask == 0);
    }
    match writers.as_slice() {
        [first, rest @ ..] if rest.iter().all(|w| w.name == first.name) => {
            // Several versions match: the one whose bits hold the change, else one that
            // writes whole values.
            writers
                .iter()
                .copied()
                .find(|w| changed & !w.mask == 0)
                .or_else(|| {
                    writers
                        .iter()
                        .copied()
                        .find(|w| w.style == Style::WholeMark)
                })
                .or(Some(*first))
        }
        _ => None,
    }
}

/// Who wrote the change, by the best evidence there is: the inventory's rule or program in
/// the segment that writes such a change; else the owner whose chains sit there; else the
/// owner whose whole value the new mark is (a socket's SO_MARK, or a rule assigning it under
/// a name that says nothing), one with something on the node first.
fn writer<'r>(reg: &'r Registry, c: &Change, recognized: &[Recognized]) -> Option<&'r Owner> {
    if c.written_outside {
        return None;
    }
    let by_id = |id: &str| reg.owners.iter().find(|o| o.id() == id);
    if let Some(o) = c.written_by.and_then(by_id) {
        return Some(o);
    }
    if let Some(o) = named_writer(reg, c) {
        return Some(o);
    }
    let valued: Vec<&Owner> = recognized
        .iter()
        .filter(|r| r.side == Side::New)
        .filter_map(|r| by_id(&r.owner))
        .collect();
    valued
        .iter()
        .copied()
        .find(|o| c.eligible(o))
        .or(valued.first().copied().filter(|_| c.socket))
}

pub(crate) fn attribute(reg: &Registry, c: &Change) -> Attribution {
    let changed = c.old ^ c.new;
    let mut a = Attribution::default();

    for o in reg.owners.iter().filter(|o| o.style == Style::WholeMark) {
        for (side, v) in [(Side::Old, c.old), (Side::New, c.new)] {
            if let Some(meaning) = o.value_name(v).filter(|_| v != 0) {
                a.recognized.push(Recognized {
                    owner: o.id(),
                    value: Mark(v),
                    meaning: meaning.to_owned(),
                    side,
                });
            }
        }
    }
    let writer = writer(reg, c, &a.recognized);
    a.writer = writer.map(Owner::id);
    let is_writer = |o: &Owner| writer.is_some_and(|w| std::ptr::eq(w, o));
    // Without a profile, owners with nothing on the node are not named (the writer is: it
    // was just seen writing).
    let eligible = |o: &Owner| c.eligible(o) || is_writer(o);
    a.recognized
        .retain(|r| reg.owners.iter().any(|o| o.id() == r.owner && eligible(o)));
    // Owners narrowed to a profile or to the node's own may decode layouts of all 32 bits.
    let scoped = reg.profiled || c.present.is_some();
    let named = |o: &Owner| a.recognized.iter().any(|r| r.owner == o.id()) || is_writer(o);
    let candidates: Vec<&Owner> = reg
        .owners
        .iter()
        .filter(|o| eligible(o) && candidate(o, o.mask, changed, scoped, named(o)))
        .collect();
    for o in &candidates {
        split(o, c, changed, &mut a.owners);
    }
    if let Some((old, new)) = c.ct.filter(|(o, n)| o != n) {
        let ct_changed = old ^ new;
        for o in reg.owners.iter().filter(|o| eligible(o)) {
            let Some(m) = o
                .ct_mask
                .filter(|&m| candidate(o, m, ct_changed, scoped, named(o)))
            else {
                continue;
            };
            a.owners.push(OwnerChange {
                owner: o.id(),
                bits: Mark(ct_changed & m),
                field: Some(FieldRef::Conntrack),
                old_value: FieldValue::Bits(Mark(old & m)),
                new_value: FieldValue::Bits(Mark(new & m)),
                meaning: None,
            });
        }
    }
    let claimed = candidates.iter().fold(0, |acc, o| acc | o.mask);
    let unowned = changed & !claimed;
    a.unowned_bits = (unowned != 0).then_some(Mark(unowned));
    a.warnings = warnings(reg, c, writer, &candidates, unowned);
    a
}

/// Other owners (by name: versions of the writer are the writer) holding changed bits. One
/// entry per other owner: of its versions, the one holding the most changed bits.
fn others<'r>(w: &Owner, candidates: &[&'r Owner], changed: u32) -> Vec<(&'r Owner, u32)> {
    let mut all: Vec<(&Owner, u32)> = candidates
        .iter()
        .filter(|o| o.name != w.name && o.mask & changed != 0)
        .map(|o| (*o, o.mask & changed))
        .collect();
    all.sort_by_key(|(_, bits)| std::cmp::Reverse(bits.count_ones()));
    let mut v: Vec<(&Owner, u32)> = Vec::new();
    for (o, bits) in all {
        if !v.iter().any(|(x, b)| x.name == o.name && bits & !b == 0) {
            v.push((o, bits));
        }
    }
    v
}

/// A whole-mark writer over other owners: the bits it wiped and the bits its value sets.
fn whole_writer_warnings(w: &Owner, c: &Change, candidates: &[&Owner]) -> Vec<Warning> {
    let changed = c.old ^ c.new;
    let (cleared, set) = (c.old & !c.new, c.new & changed);
    let mut out = Vec::new();
    for (o, _) in others(w, candidates, changed) {
        let owners = vec![w.name.clone(), o.name.clone()];
        if o.mask & cleared != 0 {
            out.push(Warning {
                finding: Finding::WholeOverwrite {
                    writer: w.id(),
                    old: Mark(c.old),
                    new: Mark(c.new),
                    victim: o.id(),
                    lost: Mark(o.mask & cleared),
                },
                owners: owners.clone(),
            });
        }
        if o.mask & set != 0 {
            let bits = o.mask & set;
            out.push(Warning {
                finding: Finding::ValueSetsForeignBits {
                    writer: w.id(),
                    value: Mark(c.new),
                    bits: Mark(bits),
                    victim: o.id(),
                    meanings: meanings(o, bits),
                },
                owners,
            });
        }
    }
    out
}

/// A bitwise writer that changed bits other owners also own.
fn bitwise_writer_warnings(w: &Owner, c: &Change, candidates: &[&Owner]) -> Vec<Warning> {
    let changed = c.old ^ c.new;
    let cleared = c.old & !c.new;
    others(w, candidates, changed)
        .into_iter()
        .map(|(o, bits)| Warning {
            finding: Finding::Clobber {
                writer: w.id(),
                cleared: bits & cleared == bits,
                bits: Mark(bits),
                victim: o.id(),
                meanings: meanings(o, bits),
            },
            owners: vec![w.name.clone(), o.name.clone()],
        })
        .collect()
}

/// No single owner holds every changed bit and no writer is known: one write touched several
/// owners.
fn multi_owner_warning(changed: u32, candidates: &[&Owner]) -> Option<Warning> {
    if candidates.is_empty() || candidates.iter().any(|o| changed & !o.mask == 0) {
        return None;
    }
    let mut names: Vec<String> = candidates.iter().map(|o| o.name.clone()).collect();
    names.dedup();
    (names.len() > 1).then(|| Warning {
        finding: Finding::MultiOwner {
            parts: candidates
                .iter()
                .map(|o| (o.id(), Mark(o.mask & changed)))
                .collect(),
        },
        owners: names,
    })
}

/// Owners that match exact values and now see one of them with foreign bits.
fn exact_match_warnings(reg: &Registry, c: &Change) -> Vec<Warning> {
    let changed = c.old ^ c.new;
    let mut out = Vec::new();
    for o in reg.owners.iter().filter(|o| o.reads_exact && c.eligible(o)) {
        for (v, meaning) in o.values.iter().filter(|(v, _)| *v != 0) {
            if c.new & v == *v && c.new != *v && (c.old == *v || changed & !v != 0) {
                out.push(Warning {
                    finding: Finding::ExactMatchBroken {
                        owner: o.id(),
                        value: Mark(*v),
                        meaning: meaning.clone(),
                        mark: Mark(c.new),
                    },
                    owners: vec![o.name.clone()],
                });
            }
        }
    }
    out
}

fn warnings(
    reg: &Registry,
    c: &Change,
    writer: Option<&Owner>,
    candidates: &[&Owner],
    unowned: u32,
) -> Vec<Warning> {
    let changed = c.old ^ c.new;
    let mut out = match writer {
        Some(w)
            if w.style == Style::WholeMark && (changed & !w.mask != 0 || c.new & !w.mask == 0) =>
        {
            whole_writer_warnings(w, c, candidates)
        }
        Some(w) => bitwise_writer_warnings(w, c, candidates),
        None => multi_owner_warning(changed, candidates)
            .into_iter()
            .collect(),
    };
    if reg.profiled && unowned != 0 {
        out.push(Warning {
            finding: Finding::Unowned {
                bits: Mark(unowned),
            },
            owners: vec![],
        });
    }
    out.extend(exact_match_warnings(reg, c));
    out
}

/// Totals over attributed transitions: per owner, and warnings per (kind, owners).
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Totals {
    /// Transitions that changed each owner's bits (an owner counted once per transition).
    pub(crate) owners: BTreeMap<String, u64>,
    pub(crate) warnings: BTreeMap<(WarningKind, Vec<String>), u64>,
}

impl Totals {
    fn add(&mut self, a: &Attribution, n: u64) {
        let mut names: Vec<&str> = a.owners.iter().map(|o| o.owner.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            *self.owners.entry(name.to_string()).or_default() += n;
        }
        for w in &a.warnings {
            *self
                .warnings
                .entry((w.kind(), w.owners.clone()))
                .or_default() += n;
        }
    }
}

/// (old mark, new mark, conntrack marks, segment).
type Key = (u32, u32, Option<(u32, u32)>, ByAddress<Arc<Segment>>);

/// Attributes events and counts what it attributed. Attributions depend only on the marks and
/// the segment: each is computed once and shared. Events are counted per attribution (a
/// pointer hash per event) and grouped into the totals when the cache is dropped.
pub(crate) struct Attributor {
    registry: Registry,
    /// What the traced namespace has (without a profile): who writes there, and whom to name.
    node: Option<Node>,
    /// Holding the segment in the key keeps its address from being reused by another.
    cache: HashMap<Key, Arc<Attribution>>,
    seen: HashMap<ByAddress<Arc<Attribution>>, u64>,
    totals: Totals,
}

/// The node's inventory as attribution uses it.
pub(crate) struct Node {
    pub(crate) inventory: Inventory,
    /// The traced namespace (its inode).
    pub(crate) netns: u32,
    present: BTreeSet<String>,
}

impl Node {
    pub(crate) fn new(inventory: Inventory, netns: u32) -> Self {
        let present = inventory.owner_names(netns);
        Node {
            inventory,
            netns,
            present,
        }
    }

    /// Owner names with something in the traced namespace.
    pub(crate) fn present(&self) -> &BTreeSet<String> {
        &self.present
    }

    /// The owner whose rule or program in `seg` writes such a change: the packet mark's when
    /// it changed, else the conntrack mark's.
    fn writer(
        &self,
        seg: &Segment,
        (old, new): (u32, u32),
        ct: Option<(u32, u32)>,
    ) -> Option<String> {
        let chains: Vec<ChainId> = seg.chains().iter().map(|c| c.id.clone()).collect();
        let programs: Vec<u32> = seg.programs().iter().map(|p| p.id).collect();
        let (mark, change) = match ct {
            Some((ct_old, ct_new)) if old == new => {
                (MarkKind::Conntrack, (ct_old, ct_new, Some(new)))
            }
            _ => (MarkKind::Packet, (old, new, ct.map(|(_, n)| n))),
        };
        self.inventory
            .writer_of(
                self.netns,
                &chains,
                &programs,
                seg.ovs().map(|p| p.bridge.as_str()),
                mark,
                change,
            )
            .map(|o| o.id.clone())
    }
}

impl Attributor {
    /// Distinct attributions kept before the cache starts over.
    const CACHE: usize = 65536;

    pub(crate) fn new(registry: Registry) -> Self {
        Self {
            registry,
            node: None,
            cache: HashMap::new(),
            seen: HashMap::new(),
            totals: Totals::default(),
        }
    }

    /// Attributes a change (not the kernel's own: a namespace scrub, ND/MLD tailroom) and
    /// counts the packets the event stands for.
    pub(crate) fn attribute(&mut self, ev: &mut TraceEvent) {
        let Some(seg) = ev.segment.as_ref().filter(|s| !s.by_kernel()) else {
            return;
        };
        // The conntrack mark changed between two points that both had an entry.
        let ct = ev.ct_mark.filter(|c| c.changed).map(|c| (c.old.0, c.new.0));
        if !ev.mark.changed() && ct.is_none() {
            return;
        }
        if self.cache.len() > Self::CACHE {
            self.cache.clear();
            self.fold();
        }
        let (old, new) = (ev.mark.old.0, ev.mark.new.0);
        let key = (old, new, ct, ByAddress(seg.clone()));
        let a = match self.cache.get(&key) {
            Some(a) => a.clone(),
            None => {
                let node = self.node.as_ref();
                let written_by = node.and_then(|n| n.writer(seg, (old, new), ct));
                let a = Arc::new(attribute(
                    &self.registry,
                    &Change {
                        old,
                        new,
                        ct,
                        chains: seg.chains(),
                        mark_writers: seg.mark_writers(),
                        socket: seg.layer() == crate::place::Layer::Socket,
                        written_by: written_by.as_deref(),
                        present: node.map(Node::present),
                        written_outside: seg
                            .tunnel()
                            .is_some_and(|t| t.fate(old, new) == MarkFate::SetByXfrmState),
                    },
                ));
                // A socket's SO_MARK is something on the node too, seen as it writes: its
                // owner may be named from now on (the inventory read at start-up may not have
                // had the socket), so what was attributed without it goes.
                if self.socket_writer_joins(seg, &a) {
                    self.cache.clear();
                } else {
                    self.cache.insert(key, a.clone());
                }
                a
            }
        };
        *self.seen.entry(ByAddress(a.clone())).or_default() += ev.packets();
        ev.attribution = Some(a);
    }

    /// Whether `a` is a socket's write by an owner not yet among those present, who now is.
    fn socket_writer_joins(&mut self, seg: &Segment, a: &Attribution) -> bool {
        let Some(node) = self.node.as_mut() else {
            return false;
        };
        let writer = a
            .writer
            .as_ref()
            .and_then(|id| self.registry.get(id).first().copied());
        match writer {
            Some(w) if seg.layer() == crate::place::Layer::Socket => {
                node.present.insert(w.name.clone())
            }
            _ => false,
        }
    }

    /// Attributes with what the node has from now on (a fresh inventory); none with a
    /// profile, which names the owners itself.
    pub(crate) fn set_node(&mut self, node: Node) {
        if !self.registry.profiled {
            self.node = Some(node);
            self.topology_changed();
        }
    }

    /// Owner names the node's inventory found, when attribution is narrowed to them.
    pub(crate) fn present(&self) -> Option<&BTreeSet<String>> {
        self.node.as_ref().map(Node::present)
    }

    /// Forgets the cached attributions (the segments they were made for are gone).
    pub(crate) fn topology_changed(&mut self) {
        self.cache.clear();
        self.fold();
    }

    /// Moves the per-attribution counts into the totals, keeping memory bounded.
    fn fold(&mut self) {
        for (a, n) in std::mem::take(&mut self.seen) {
            self.totals.add(&a, n);
        }
    }

    /// The totals so far.
    pub(crate) fn totals(&self) -> Totals {
        let mut t = self.totals.clone();
        for (a, n) in &self.seen {
            t.add(a, *n);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::{NfHook, NftFamily};

    fn reg() -> Registry {
        Registry::builtin().unwrap()
    }

    fn ch(old: u32, new: u32) -> Change<'static> {
        Change {
            old,
            new,
            ..Default::default()
        }
    }

    fn id(family: NftFamily, table: &str, name: &str) -> ChainId {
        ChainId {
            family,
            table: table.into(),
            name: name.into(),
        }
    }

    fn base(family: NftFamily, table: &str, name: &str, priority: i32) -> Chain {
        crate::fixtures::chain(family, table, name, NfHook::Output, priority)
    }

    fn owners_of(a: &Attribution) -> Vec<&str> {
        a.owners.iter().map(|o| o.owner.as_str()).collect()
    }

    fn kinds(a: &Attribution) -> Vec<WarningKind> {
        a.warnings.iter().map(Warning::kind).collect()
    }

    #[test]
    fn bitwise_bits_go_to_their_owners() {
        let a = attribute(&reg(), &ch(0, 0x4000));
        assert!(owners_of(&a).contains(&"kube-proxy@current"), "{a:?}");
        let kp = a
            .owners
            .iter()
            .find(|o| o.owner == "kube-proxy@current")
            .unwrap();
        assert_eq!(kp.meaning.as_deref(), Some("masquerade"));
        assert!(
            !owners_of(&a).contains(&"cilium"),
            "all-32-bit owners only with a profile"
        );
        assert_eq!(a.unowned_bits, None);
    }

    #[test]
    fn whole_values_and_fields_are_decoded() {
        let a = attribute(&reg(), &ch(0, 0xca6c));
        assert!(
            a.recognized
                .iter()
                .any(|r| r.owner == "wg-quick" && r.side == Side::New),
            "{a:?}"
        );
        let a = attribute(&reg(), &ch(0, 0x539));
        assert!(a
            .recognized
            .iter()
            .any(|r| r.owner == "istio@sidecar-tproxy"));

        let cilium = reg().select(&["cilium".into()]).unwrap();
        let a = attribute(&cilium, &ch(0, 0x0012_0e00));
        let field = |name: &str| {
            a.owners
                .iter()
                .find(|o| o.field == Some(FieldRef::Named(name.into())))
                .unwrap()
        };
        assert_eq!(field("magic").meaning.as_deref(), Some("encrypt"));
        assert_eq!(field("identity").new_value, FieldValue::Number(18));
    }

    #[test]
    fn profile_limits_candidates_and_flags_unowned() {
        let sel = reg().select(&["kube-proxy".into()]).unwrap();
        let a = attribute(&sel, &ch(0, 0x84000));
        assert_eq!(a.unowned_bits, Some(Mark(0x80000)));
        assert!(kinds(&a).contains(&WarningKind::Unowned));
    }

    #[test]
    fn multi_owner_without_a_known_writer() {
        let a = attribute(&reg(), &ch(0, 0x84000));
        assert!(kinds(&a).contains(&WarningKind::MultiOwner), "{a:?}");
    }

    /// iptables-nft: the band holds only "ip nat/OUTPUT"; the owner's name is on the chain it
    /// jumps to that writes the mark.
    #[test]
    fn writer_named_by_the_chain_the_base_chain_jumps_to() {
        let chains = [base(NftFamily::Ip, "nat", "OUTPUT", -100)];
        let below = [id(NftFamily::Ip, "nat", "KUBE-MARK-MASQ")];
        let c = Change {
            old: 0,
            new: 0x4000,
            chains: &chains,
            ..Default::default()
        };
        assert_eq!(attribute(&reg(), &c).writer, None);
        let a = attribute(
            &reg(),
            &Change {
                mark_writers: &below,
                ..c
            },
        );
        assert_eq!(a.writer.as_deref(), Some("kube-proxy@current"));
    }

    fn calico_clears_bypass() -> Attribution {
        let chains = [base(NftFamily::Inet, "calico", "cali-POSTROUTING", -150)];
        attribute(
            &reg(),
            &Change {
                old: 0x80000,
                new: 0,
                chains: &chains,
                ..Default::default()
            },
        )
    }

    /// Collision 1 (mark-owners.md): Tailscale's bypass bit cleared by Calico's entry clear.
    #[test]
    fn calico_clearing_tailscale_bypass_is_a_clobber() {
        let a = calico_clears_bypass();
        assert_eq!(a.writer.as_deref(), Some("calico"));
        let w = a
            .warnings
            .iter()
            .find(|w| w.kind() == WarningKind::Clobber)
            .expect("clobber");
        assert_eq!(w.owners, ["calico", "tailscale"]);
        assert_eq!(
            w.finding,
            Finding::Clobber {
                writer: "calico".into(),
                cleared: true,
                bits: Mark(0x80000),
                victim: "tailscale".into(),
                meanings: vec!["bypass".into()],
            }
        );
    }

    /// Collision 5: AWS VPC CNI nft restore overwrites Calico eBPF's seen mark.
    #[test]
    fn aws_nft_restore_overwrites_calico_ebpf() {
        let chains = [base(NftFamily::Ip, "aws-cni", "nat-prerouting", -90)];
        let c = Change {
            old: 0x0100_0000,
            new: 0x80,
            chains: &chains,
            ..Default::default()
        };
        let a = attribute(&reg(), &c);
        assert_eq!(a.writer.as_deref(), Some("aws-vpc-cni@nftables>=1.23"));
        let w = a.warnings.iter().find(|w| {
            w.kind() == WarningKind::WholeOverwrite && w.owners.contains(&"calico-ebpf".to_string())
        });
        assert!(w.is_some(), "{:?}", a.warnings);
    }

    /// Collision 7: wg-quick's 0xCA6C (a socket mark) contains kube's 0x4000 and 0x8000.
    #[test]
    fn wg_quick_socket_mark_carries_kube_bits() {
        let sel = reg()
            .select(&["wg-quick".into(), "kube-proxy".into()])
            .unwrap();
        let a = attribute(
            &sel,
            &Change {
                old: 0,
                new: 0xca6c,
                socket: true,
                ..Default::default()
            },
        );
        assert_eq!(a.writer.as_deref(), Some("wg-quick"));
        let found = a.warnings.iter().find_map(|w| match &w.finding {
            Finding::ValueSetsForeignBits { bits, meanings, .. } if *bits == Mark(0xc000) => {
                Some(meanings)
            }
            _ => None,
        });
        assert!(
            found.is_some_and(|m| m.iter().any(|m| m == "drop (KUBE-FIREWALL)")),
            "{:?}",
            a.warnings
        );
    }

    fn present(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// The case: a chain with a name that says nothing assigns wg-quick's whole value
    /// over Tailscale's bypass bit; flagged by what it wrote, with and without a profile.
    #[test]
    fn a_whole_value_over_another_owners_bit_is_flagged_whatever_the_chain_is_called() {
        let chains = [base(NftFamily::Inet, "t", "x", -150)];
        let change = Change {
            old: 0x80000,
            new: 0xca6c,
            chains: &chains,
            ..Default::default()
        };
        let here = present(&["wg-quick", "tailscale", "kube-proxy"]);
        let profile = reg()
            .select(&["wg-quick".into(), "tailscale".into(), "kube-proxy".into()])
            .unwrap();
        for (registry, c) in [
            // By value alone: the new mark is wg-quick's whole value.
            (reg(), change),
            // The inventory found the rule and its owner (by value, too).
            (
                reg(),
                Change {
                    written_by: Some("wg-quick"),
                    present: Some(&here),
                    ..change
                },
            ),
            (profile, change),
        ] {
            let a = attribute(&registry, &c);
            assert_eq!(a.writer.as_deref(), Some("wg-quick"), "{a:?}");
            let pairs: Vec<(WarningKind, &[String])> = a
                .warnings
                .iter()
                .map(|w| (w.kind(), &w.owners[..]))
                .collect();
            assert!(
                pairs.contains(&(
                    WarningKind::WholeOverwrite,
                    &["wg-quick".into(), "tailscale".into()][..]
                )),
                "{pairs:?}"
            );
            assert!(
                pairs.contains(&(
                    WarningKind::Clobber,
                    &["wg-quick".into(), "kube-proxy".into()][..]
                )),
                "{pairs:?}"
            );
        }
    }

    /// Without a profile, an owner with nothing on the node is never named: wg-quick's socket
    /// mark on a node running kube-proxy names neither NetworkManager (which also claims
    /// 0xca6c) nor Calico, Antrea…
    #[test]
    fn owners_with_nothing_here_are_not_named() {
        let socket = Change {
            old: 0,
            new: 0xca6c,
            socket: true,
            ..Default::default()
        };
        let everyone = attribute(&reg(), &socket);
        let named = |a: &Attribution| -> BTreeSet<String> {
            a.owners
                .iter()
                .map(|o| o.owner.clone())
                .chain(a.recognized.iter().map(|r| r.owner.clone()))
                .chain(a.warnings.iter().flat_map(|w| w.owners.clone()))
                .collect()
        };
        assert!(named(&everyone).contains("networkmanager-wireguard"));
        let here = present(&["kube-proxy"]);
        let a = attribute(
            &reg(),
            &Change {
                present: Some(&here),
                ..socket
            },
        );
        // The writer was just seen writing: it is named; the others only if present.
        assert_eq!(a.writer.as_deref(), Some("wg-quick"));
        for n in named(&a) {
            let name = n.split('@').next().unwrap_or(&n).to_owned();
            assert!(
                ["wg-quick", "kube-proxy"].contains(&name.as_str()),
                "{n} named: {a:?}"
            );
        }
        // A change no writer explains, with nobody present: no owner at all.
        let empty = present(&[]);
        let a = attribute(
            &reg(),
            &Change {
                present: Some(&empty),
                ..ch(0, 0x84000)
            },
        );
        assert!(a.owners.is_empty() && a.warnings.is_empty(), "{a:?}");
        assert_eq!(a.unowned_bits, Some(Mark(0x84000)));
    }

    #[test]
    fn exact_match_readers_break_on_foreign_bits() {
        let a = attribute(&reg(), &ch(0xca6c, 0xca6c | 0x4000_0000));
        assert!(
            a.warnings
                .iter()
                .any(|w| w.kind() == WarningKind::ExactMatchBroken && w.owners == ["wg-quick"]),
            "{a:?}"
        );
    }

    #[test]
    fn ct_bits_are_attributed() {
        let c = Change {
            ct: Some((0, 0x80)),
            ..Default::default()
        };
        let a = attribute(&reg(), &c);
        assert!(a
            .owners
            .iter()
            .any(|o| o.owner.starts_with("aws-vpc-cni") && o.field == Some(FieldRef::Conntrack)));
    }

    #[test]
    fn totals_sum_per_pair() {
        let a = calico_clears_bypass();
        let mut t = Totals::default();
        t.add(&a, 1);
        t.add(&a, 1);
        assert_eq!(t.owners.get("tailscale"), Some(&2));
        assert_eq!(t.owners.get("calico"), Some(&2));
        assert_eq!(
            t.warnings,
            BTreeMap::from([(
                (
                    WarningKind::Clobber,
                    vec!["calico".to_string(), "tailscale".to_string()]
                ),
                2
            )])
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::testing::fixed_seed())]
            /// Owner bits plus unowned bits cover exactly the changed bits; nothing panics.
            #[test]
            fn bits_cover_the_change(old: u32, new: u32, profile in proptest::bool::ANY) {
                let r = if profile { reg().select(&["calico".into(), "kube-proxy".into()]).unwrap() } else { reg() };
                let a = attribute(&r, &ch(old, new));
                let covered = a.owners.iter().filter(|o| o.field != Some(FieldRef::Conntrack)).fold(0, |acc, o| acc | o.bits.0)
                    | a.unowned_bits.map_or(0, |m| m.0);
                prop_assert_eq!(covered, old ^ new);
            }
        }
    }
}
