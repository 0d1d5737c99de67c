//! The per-event attributor: attributes each event's change once per distinct transition (a
//! cache keyed by the marks and the segment), counts what it attributed for the totals, and
//! asks the traced namespace's inventory who writes there (`NamespaceInventory`).
use std::{
    collections::{BTreeSet, HashMap},
    sync::Arc,
};

use by_address::ByAddress;

use super::rules::{attribute, Transition};
use crate::{
    event::{
        attribution::{Attribution, Totals},
        TraceEvent,
    },
    inventory::{Inventory, MarkKind},
    nodestate::nft::ChainId,
    place::{Layer, MarkFate, Segment},
    registry::{NameId, OwnerId, Registry},
};

/// (old mark, new mark, conntrack marks, segment).
type Key = (u32, u32, Option<(u32, u32)>, ByAddress<Arc<Segment>>);

/// Attributes events and counts what it attributed. Attributions depend only on the marks and
/// the segment: each is computed once and shared. Events are counted per attribution (a
/// pointer hash per event) and grouped into the totals when the cache is dropped.
pub(crate) struct Attributor {
    registry: Arc<Registry>,
    /// What the traced namespace has (without a profile): who writes there, and whom to name.
    node: Option<NamespaceInventory>,
    /// Holding the segment in the key keeps its address from being reused by another.
    cache: HashMap<Key, Arc<Attribution>>,
    seen: HashMap<ByAddress<Arc<Attribution>>, u64>,
    totals: Totals,
}

/// The traced namespace's inventory, as attribution uses it: the owners present there, and
/// the writer of a change by the rule or program that makes it.
pub(crate) struct NamespaceInventory {
    inventory: Inventory,
    /// The traced namespace (its inode).
    netns: u32,
    present: BTreeSet<NameId>,
}

impl NamespaceInventory {
    pub(crate) fn new(inventory: Inventory, netns: u32) -> Self {
        let present = inventory.owner_names(netns);
        NamespaceInventory {
            inventory,
            netns,
            present,
        }
    }

    /// Owners (every version together) with something in the traced namespace.
    pub(crate) fn present(&self) -> &BTreeSet<NameId> {
        &self.present
    }

    /// The owner whose rule or program in `seg` writes such a change: the packet mark's when
    /// it changed, else the conntrack mark's.
    fn writer(
        &self,
        seg: &Segment,
        (old, new): (u32, u32),
        ct: Option<(u32, u32)>,
    ) -> Option<OwnerId> {
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
            .map(|o| o.owner)
    }
}

impl Attributor {
    /// Distinct attributions kept before the cache starts over.
    const CACHE: usize = 65536;

    pub(crate) fn new(registry: impl Into<Arc<Registry>>) -> Self {
        let registry = registry.into();
        Self {
            totals: Totals::new(registry.clone()),
            registry,
            node: None,
            cache: HashMap::new(),
            seen: HashMap::new(),
        }
    }

    /// The registry the attributions' owner ids index (what the outputs name them by).
    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
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
                let a = Arc::new(attribute(
                    &self.registry,
                    &Transition {
                        old,
                        new,
                        ct,
                        chains: seg.chains(),
                        mark_writers: seg.mark_writers(),
                        socket: seg.layer() == Layer::Socket,
                        written_by: node.and_then(|n| n.writer(seg, (old, new), ct)),
                        present: node.map(NamespaceInventory::present),
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
        match a.writer {
            Some(w) if seg.layer() == Layer::Socket => {
                node.present.insert(self.registry.name_of(w))
            }
            _ => false,
        }
    }

    /// Attributes with what the node has from now on (a fresh inventory); none with a
    /// profile, which names the owners itself.
    pub(crate) fn set_node(&mut self, node: NamespaceInventory) {
        if !self.registry.profiled() {
            self.node = Some(node);
            self.topology_changed();
        }
    }

    /// Owners the node's inventory found, when attribution is narrowed to them.
    pub(crate) fn present(&self) -> Option<&BTreeSet<NameId>> {
        self.node.as_ref().map(NamespaceInventory::present)
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
