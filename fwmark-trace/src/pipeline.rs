//! The userspace data path for one record: decode (raw record → typed event, with where it
//! happened) then attribution (whose bits changed). The trace loop, `show` and the pipeline
//! benchmark all go through here, then hand the event to the outputs.
use fwmark_trace_common::Event;

use crate::{
    attribution::Attributor,
    decode::Decoder,
    event::{Interval, TraceEvent},
    place::Topology,
};

pub(crate) struct Pipeline {
    pub(crate) decoder: Decoder,
    pub(crate) attributor: Attributor,
}

impl Pipeline {
    /// One packet's record.
    pub(crate) fn event(&mut self, raw: &Event) -> TraceEvent {
        let mut ev = self.decoder.decode(raw);
        self.attributor.attribute(&mut ev);
        ev
    }

    /// A record the kernel counted `packets` times in `interval` (`raw` is one of them).
    pub(crate) fn counted(&mut self, raw: &Event, packets: u64, interval: Interval) -> TraceEvent {
        let mut ev = self.decoder.decode(raw);
        ev.count = Some(packets);
        ev.interval = Some(interval);
        self.attributor.attribute(&mut ev);
        ev
    }

    /// A new topology (interfaces, tc chains, nft chains): names made with the old one go.
    /// Returns whether it changed.
    pub(crate) fn set_topology(&mut self, topology: Topology) -> bool {
        let changed = self.decoder.set_topology(topology);
        if changed {
            self.attributor.topology_changed();
        }
        changed
    }
}
