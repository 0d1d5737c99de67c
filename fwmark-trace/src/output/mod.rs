//! Outputs, written once over the typed events: a readable line per event (default) or one
//! JSON object per line (`--json`), to stdout or a file, plus the run's counters (end-of-run
//! summary, `--metrics` endpoint). Text is made here (`text`: the words for points, segments
//! and warnings) and nowhere before.
mod human;
pub(crate) mod json;
pub(crate) mod metrics;
pub(crate) mod ready;
pub(crate) mod summary;
pub(crate) mod text;
pub(crate) mod why;

use std::{
    fs::File,
    io::{self, BufWriter, Write},
    path::Path,
};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::event::{Timestamp, TraceEvent};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Human,
    Json,
}

pub(crate) struct Output {
    format: Format,
    out: Box<dyn Write + Send>,
    /// Flush after every event: someone is watching (a terminal, a pipe to jq).
    live: bool,
    /// One record is serialised here, then written in one call (serde_json's many small
    /// writes through a `dyn Write` cost more than the serialisation itself).
    line: Vec<u8>,
    json: json::EventWriter,
}

/// A userspace-generated record: events the kernel could not deliver.
#[derive(Serialize)]
pub(crate) struct LostRecord {
    pub(crate) time: Timestamp,
    pub(crate) kind: &'static str,
    pub(crate) lost: u64,
    pub(crate) total_lost: u64,
}

/// Where the trace loop sends what it produces: `Output` writes it; `why` collects flows.
pub(crate) trait Sink {
    fn event(&mut self, ev: &TraceEvent) -> Result<()>;
    fn lost(&mut self, rec: &LostRecord) -> Result<()>;
    fn stats(&mut self, rec: &StatsRecord) -> Result<()>;
    fn summary(&mut self, summary: &summary::Summary) -> Result<()>;
    fn flush(&mut self) -> Result<()>;
    /// The observer plan (JSON output only: people read it from the start-up lines).
    fn plan(&mut self, _plan: &crate::kernel::observers::PlanRecord) -> Result<()> {
        Ok(())
    }
    /// Everything is attached (JSON output only; see `ready`).
    fn ready(&mut self, _ready: &ready::ReadyRecord) -> Result<()> {
        Ok(())
    }
    /// Called once a second while tracing (inside the traced namespace).
    fn tick(&mut self) -> Result<()> {
        Ok(())
    }
}

/// A periodic health record (`--stats`): the metrics output.
#[derive(Serialize)]
pub(crate) struct StatsRecord {
    pub(crate) time: Timestamp,
    pub(crate) kind: &'static str,
    pub(crate) rss_kb: u64,
    pub(crate) events: u64,
    pub(crate) lost: u64,
    pub(crate) tracked_packets: usize,
    pub(crate) interfaces: usize,
}

impl Output {
    /// Writes to any sink (benchmarks use `io::sink()`), flushing only at the end.
    #[cfg(feature = "bench")]
    pub(crate) fn to_writer(format: Format, out: Box<dyn Write + Send>) -> Self {
        Self {
            format,
            out,
            live: false,
            line: Vec::with_capacity(1024),
            json: json::EventWriter::default(),
        }
    }

    pub(crate) fn new(format: Format, path: Option<&Path>) -> Result<Self> {
        let (out, live): (Box<dyn Write + Send>, bool) = match path {
            Some(p) => (
                Box::new(BufWriter::new(File::create(p).with_context(|| {
                    format!("creating output file {}", p.display())
                })?)),
                false,
            ),
            None => (Box::new(BufWriter::new(io::stdout())), true),
        };
        Ok(Self {
            format,
            out,
            live,
            line: Vec::with_capacity(1024),
            json: json::EventWriter::default(),
        })
    }

    pub(crate) fn event(&mut self, ev: &TraceEvent) -> Result<()> {
        self.line.clear();
        match self.format {
            Format::Json => self.json.write(ev, &mut self.line)?,
            Format::Human => self.line.extend_from_slice(human::line(ev).as_bytes()),
        }
        self.line.push(b'\n');
        self.out.write_all(&self.line)?;
        self.maybe_flush()
    }

    pub(crate) fn lost(&mut self, rec: &LostRecord) -> Result<()> {
        match self.format {
            Format::Json => serde_json::to_writer(&mut self.out, rec)?,
            Format::Human => write!(
                self.out,
                "{} LOST {} events (ring buffer full; {} in total)",
                rec.time, rec.lost, rec.total_lost
            )?,
        }
        self.out.write_all(b"\n")?;
        self.maybe_flush()
    }

    pub(crate) fn stats(&mut self, rec: &StatsRecord) -> Result<()> {
        match self.format {
            Format::Json => serde_json::to_writer(&mut self.out, rec)?,
            Format::Human => write!(
                self.out,
                "{} STATS rss {} kB, {} events, {} lost, {} packets tracked, {} interfaces",
                rec.time, rec.rss_kb, rec.events, rec.lost, rec.tracked_packets, rec.interfaces
            )?,
        }
        self.out.write_all(b"\n")?;
        self.flush()
    }

    pub(crate) fn summary(&mut self, summary: &summary::Summary) -> Result<()> {
        serde_json::to_writer(&mut self.out, summary)?;
        self.out.write_all(b"\n")?;
        self.maybe_flush()
    }

    fn maybe_flush(&mut self) -> Result<()> {
        if self.live {
            self.flush()?;
        }
        Ok(())
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        self.out.flush().context("writing output")
    }
}

impl Sink for Output {
    fn event(&mut self, ev: &TraceEvent) -> Result<()> {
        Output::event(self, ev)
    }
    fn lost(&mut self, rec: &LostRecord) -> Result<()> {
        Output::lost(self, rec)
    }
    fn stats(&mut self, rec: &StatsRecord) -> Result<()> {
        Output::stats(self, rec)
    }
    fn summary(&mut self, summary: &summary::Summary) -> Result<()> {
        Output::summary(self, summary)
    }
    fn flush(&mut self) -> Result<()> {
        Output::flush(self)
    }
    fn plan(&mut self, plan: &crate::kernel::observers::PlanRecord) -> Result<()> {
        if matches!(self.format, Format::Json) {
            serde_json::to_writer(&mut self.out, plan)?;
            self.out.write_all(b"\n")?;
            self.maybe_flush()?;
        }
        Ok(())
    }
    fn ready(&mut self, ready: &ready::ReadyRecord) -> Result<()> {
        if matches!(self.format, Format::Json) {
            serde_json::to_writer(&mut self.out, ready)?;
            self.out.write_all(b"\n")?;
            // Whoever waits for it reads it now, from a file too.
            self.flush()?;
        }
        Ok(())
    }
    /// A file gets what was written at least once a second (someone may be following it).
    fn tick(&mut self) -> Result<()> {
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, io};

    use super::*;
    use crate::{
        attribution::Attributor, decode::Decoder, fixtures, pipeline::Pipeline, registry::Registry,
    };

    /// The published schema of `trace --json` records.
    pub(crate) fn schema() -> jsonschema::Validator {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../schema/trace-records.schema.json"))
                .expect("the schema is JSON");
        jsonschema::validator_for(&schema).expect("the schema is a JSON Schema")
    }

    /// A shared buffer the output writes into.
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_records_follow_the_published_schema() {
        let buf = Buffer::default();
        let mut out = Output {
            format: Format::Json,
            out: Box::new(buf.clone()),
            live: false,
            line: Vec::new(),
            json: json::EventWriter::default(),
        };
        let mut p = Pipeline {
            decoder: Decoder::new(
                fixtures::topology(),
                HashMap::from([(12, "NETFILTER_DROP".into())]),
            ),
            attributor: Attributor::new(Registry::builtin().unwrap()),
        };
        let mut summary = summary::Summary::default();
        for i in 0..64 {
            let ev = p.event(&fixtures::synthetic(i));
            out.event(&ev).unwrap();
            summary.count(&ev);
        }
        let now = Timestamp::now();
        let interval = crate::event::Interval {
            start: now,
            end: now,
        };
        out.event(&p.counted(&fixtures::synthetic(3), 7, interval))
            .unwrap();
        out.lost(&LostRecord {
            time: now,
            kind: "lost",
            lost: 1,
            total_lost: 2,
        })
        .unwrap();
        out.stats(&StatsRecord {
            time: now,
            kind: "stats",
            rss_kb: 1,
            events: 2,
            lost: 0,
            tracked_packets: 3,
            interfaces: 4,
        })
        .unwrap();
        summary.attribution = p.attributor.totals();
        out.summary(&summary).unwrap();
        out.flush().unwrap();
        let schema = schema();
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let mut kinds = std::collections::BTreeSet::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            kinds.insert(v["kind"].as_str().unwrap_or("?").to_owned());
            let errors: Vec<String> = schema.iter_errors(&v).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{line}\n{errors:#?}");
        }
        for k in ["transition", "drop", "lost", "stats", "summary"] {
            assert!(kinds.contains(k), "no {k} record in {kinds:?}");
        }
    }
}
