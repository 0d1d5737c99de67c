//! The run's counters: events by kind, drops by reason, transitions per owner, clobbers per
//! owner pair, lost events. Written at the end of a run and served live as metrics.
use std::{collections::BTreeMap, fmt};

use serde::Serialize;

use crate::{
    attribution::{AttributionCounts, ClobberCount},
    events::TraceEvent,
};

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub kind: &'static str,
    pub duration_s: f64,
    pub events: BTreeMap<&'static str, u64>,
    /// Packets reported (a kernel-counted event stands for many).
    pub total_events: u64,
    /// Event records written (what `--count` limits).
    #[serde(skip)]
    pub records: u64,
    pub lost: u64,
    /// Drops by the kernel's reason.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub drops: BTreeMap<String, u64>,
    /// Transitions that changed each owner's bits.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub owners: BTreeMap<String, u64>,
    /// Clobber/conflict warnings per owner pair.
    pub clobbers: Vec<ClobberCount>,
}

impl Summary {
    pub fn new() -> Self {
        Self {
            kind: "summary",
            ..Default::default()
        }
    }

    /// Counts an event: as many packets as it stands for (kernel-counted events carry a count).
    pub fn count(&mut self, ev: &TraceEvent) {
        let n = ev.count.unwrap_or(1);
        self.records += 1;
        *self.events.entry(ev.kind).or_default() += n;
        self.total_events += n;
        if let Some(reason) = &ev.drop_reason {
            match self.drops.get_mut(reason) {
                Some(c) => *c += n,
                None => {
                    self.drops.insert(reason.clone(), n);
                }
            }
        }
    }

    /// Takes the attribution counters (kept by the decoder, per shared attribution).
    pub fn attributions(&mut self, counts: &AttributionCounts) {
        (self.owners, self.clobbers) = counts.totals();
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "summary: {} events in {:.1}s",
            self.total_events, self.duration_s
        )?;
        for (k, n) in &self.events {
            write!(f, ", {k} {n}")?;
        }
        write!(f, "; lost {}", self.lost)?;
        let list = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.drops.is_empty() {
            write!(f, "\n  drops by reason: {}", list(&self.drops))?;
        }
        if !self.owners.is_empty() {
            write!(f, "\n  transitions by owner: {}", list(&self.owners))?;
        }
        for c in &self.clobbers {
            write!(f, "\n  {} {}: {}", c.kind, c.owners, c.count)?;
        }
        Ok(())
    }
}
