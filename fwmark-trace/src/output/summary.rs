//! The run's counters: events by kind, drops by reason, transitions per owner, warnings per
//! owner pair, lost events. Written at the end of a run and served live as metrics.
use std::{collections::BTreeMap, fmt};

use serde::{ser::SerializeStruct, Serialize, Serializer};

use crate::{
    attribution::{Totals, WarningKind},
    event::{DropReason, EventKind, TraceEvent},
};

#[derive(Debug, Default)]
pub(crate) struct Summary {
    pub(crate) duration_s: f64,
    pub(crate) events: BTreeMap<EventKind, u64>,
    /// Packets reported (a kernel-counted event stands for many).
    pub(crate) total_events: u64,
    /// Event records written (what `--count` limits).
    pub(crate) records: u64,
    pub(crate) lost: u64,
    /// Drops by the kernel's reason.
    pub(crate) drops: BTreeMap<DropReason, u64>,
    /// Transitions per owner and warnings per (kind, owners), from the attributor (owners as
    /// registry ids: named here).
    pub(crate) attribution: Totals,
    /// Transitions per Kubernetes pod (NAMESPACE/NAME), when asked (`--metrics-pods`): one
    /// series per pod is the operator's choice, not a default.
    pub(crate) by_pod: Option<BTreeMap<String, u64>>,
}

impl Summary {
    /// Counts an event: as many packets as it stands for (kernel-counted events carry a count).
    pub(crate) fn count(&mut self, ev: &TraceEvent) {
        let n = ev.packets();
        self.records += 1;
        *self.events.entry(ev.kind).or_default() += n;
        self.total_events += n;
        if let Some(reason) = &ev.drop_reason {
            *self.drops.entry(reason.clone()).or_default() += n;
        }
        let pod = ev.at.pod.as_ref().and_then(|c| c.pod.as_ref());
        if let (Some(by_pod), Some(pod)) = (&mut self.by_pod, pod) {
            if ev.kind == EventKind::Transition {
                *by_pod.entry(pod.to_string()).or_default() += n;
            }
        }
    }

    /// Transitions per owner, by registry id (`kube-proxy@current`), in the order of those.
    pub(crate) fn owners(&self) -> BTreeMap<String, u64> {
        let reg = self.attribution.registry();
        self.attribution
            .by_owner()
            .map(|(o, n)| (reg.owner(o).id(), n))
            .collect()
    }

    /// Warnings per (kind, owners), owners as "a × b", in the order of kind then names.
    pub(crate) fn warnings(&self) -> Vec<(WarningKind, String, u64)> {
        let reg = self.attribution.registry();
        let mut named: Vec<(WarningKind, Vec<&str>, u64)> = self
            .attribution
            .by_warning()
            .map(|(kind, owners, n)| (kind, owners.iter().map(|o| reg.name(*o)).collect(), n))
            .collect();
        named.sort();
        named
            .into_iter()
            .map(|(kind, owners, n)| (kind, owners.join(" × "), n))
            .collect()
    }
}

/// A count map keyed by the names of its keys.
fn by_name<K: fmt::Display>(m: &BTreeMap<K, u64>) -> BTreeMap<String, u64> {
    m.iter().map(|(k, n)| (k.to_string(), *n)).collect()
}

impl Serialize for Summary {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Clobber {
            kind: WarningKind,
            owners: String,
            count: u64,
        }
        let mut st = s.serialize_struct("Summary", 8)?;
        st.serialize_field("kind", "summary")?;
        st.serialize_field("duration_s", &self.duration_s)?;
        st.serialize_field("events", &by_name(&self.events))?;
        st.serialize_field("total_events", &self.total_events)?;
        st.serialize_field("lost", &self.lost)?;
        if !self.drops.is_empty() {
            st.serialize_field("drops", &by_name(&self.drops))?;
        }
        let owners = self.owners();
        if !owners.is_empty() {
            st.serialize_field("owners", &owners)?;
        }
        let clobbers: Vec<Clobber> = self
            .warnings()
            .into_iter()
            .map(|(kind, owners, count)| Clobber {
                kind,
                owners,
                count,
            })
            .collect();
        st.serialize_field("clobbers", &clobbers)?;
        st.end()
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
        let list = |m: Vec<(String, u64)>| {
            m.into_iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if !self.drops.is_empty() {
            let drops = self.drops.iter().map(|(r, n)| (r.to_string(), *n));
            write!(f, "\n  drops by reason: {}", list(drops.collect()))?;
        }
        let owners = self.owners();
        if !owners.is_empty() {
            write!(
                f,
                "\n  transitions by owner: {}",
                list(owners.into_iter().collect())
            )?;
        }
        for (kind, owners, n) in self.warnings() {
            write!(f, "\n  {kind} {owners}: {n}")?;
        }
        Ok(())
    }
}
