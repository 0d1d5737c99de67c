//! Transitions and drops counted in the kernel (the `AGG` per-CPU map, the default mode): each
//! interval, how many packets made each distinct transition since the last read, with one
//! exemplar packet. The kernel only ever adds, so nothing is lost between reading and
//! resetting; the deltas come from the previous totals kept here.
use std::collections::HashMap;

use anyhow::{Context, Result};
use aya::maps::PerCpuArray;
use aya::{
    maps::{MapData, PerCpuHashMap},
    Ebpf,
};
use fwmark_trace_common::{AggKey, AggValue, Event, MAP_AGG, MAP_COUNTED};

/// A transition counted during one interval.
pub(crate) struct Counted {
    pub(crate) packets: u64,
    /// The earliest packet of it the kernel kept (on any CPU).
    pub(crate) exemplar: Event,
}

pub(crate) struct KernelCounts {
    map: PerCpuHashMap<MapData, AggKey, AggValue>,
    /// Each key's total at the previous read.
    totals: HashMap<AggKey, u64>,
    /// Packets the kernel counted since load (`MAP_COUNTED`).
    counted: PerCpuArray<MapData, u64>,
    /// Packets read out of the map since load, and those that went with evicted entries.
    reported: u64,
    evicted: u64,
}

impl KernelCounts {
    pub(crate) fn take(ebpf: &mut Ebpf) -> Result<Self> {
        let map = ebpf.take_map(MAP_AGG).context("AGG map")?;
        let counted = ebpf.take_map(MAP_COUNTED).context("COUNTED map")?;
        Ok(Self {
            map: PerCpuHashMap::try_from(map)?,
            totals: HashMap::new(),
            counted: PerCpuArray::try_from(counted)?,
            reported: 0,
            evicted: 0,
        })
    }

    /// Packets counted in entries the LRU evicted before they were read: lost.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted
    }

    /// What was counted since the last call.
    pub(crate) fn read(&mut self) -> Vec<Counted> {
        // Read before the map: what the map shows then includes at least these.
        let counted: u64 = self.counted.get(&0, 0).map(|v| v.iter().sum()).unwrap_or(0);
        let mut out = Vec::new();
        let mut totals = HashMap::with_capacity(self.totals.len());
        for (key, values) in self.map.iter().filter_map(Result::ok) {
            let total: u64 = values.iter().map(|v| v.count).sum();
            // A CPU's value is created empty when another CPU creates the entry. The newest
            // exemplar is of this interval.
            let Some(exemplar) = values
                .iter()
                .filter(|v| v.count > 0 && v.exemplar.kind != 0)
                .map(|v| v.exemplar)
                .max_by_key(|e| e.ts_ns)
            else {
                continue;
            };
            totals.insert(key, total);
            if let Some(packets) = delta(self.totals.get(&key).copied(), total) {
                out.push(Counted { packets, exemplar });
            }
        }
        // Keys the LRU evicted are forgotten with it, and what they counted since the last
        // read is lost: the kernel counted more than was read out.
        self.totals = totals;
        self.reported += out.iter().map(|c| c.packets).sum::<u64>();
        self.evicted = self.evicted.max(counted.saturating_sub(self.reported));
        out.sort_by_key(|c| c.exemplar.ts_ns);
        out
    }
}

/// Packets since the last read, from a key's previous and current totals. A total that went
/// down was evicted and counted afresh: all of it is new.
fn delta(before: Option<u64>, now: u64) -> Option<u64> {
    let n = match before {
        Some(b) if b <= now => now - b,
        _ => now,
    };
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::delta;

    #[test]
    fn deltas_from_totals() {
        assert_eq!(delta(None, 3), Some(3));
        assert_eq!(delta(Some(3), 3), None);
        assert_eq!(delta(Some(3), 10), Some(7));
        // Evicted and counted again since.
        assert_eq!(delta(Some(10), 2), Some(2));
        assert_eq!(delta(None, 0), None);
    }
}
