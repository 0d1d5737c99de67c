//! The end-of-run summary: events by kind, lost events, how long the run lasted.
use std::{collections::BTreeMap, fmt};

use serde::Serialize;

use crate::attribution::ClobberCount;

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub kind: &'static str,
    pub duration_s: f64,
    pub events: BTreeMap<&'static str, u64>,
    pub total_events: u64,
    pub lost: u64,
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

    pub fn count(&mut self, kind: &'static str) {
        *self.events.entry(kind).or_default() += 1;
        self.total_events += 1;
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
        for c in &self.clobbers {
            write!(f, "\n  {} {}: {}", c.kind, c.owners, c.count)?;
        }
        Ok(())
    }
}
