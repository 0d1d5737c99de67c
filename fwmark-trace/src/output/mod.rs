//! Outputs, written once over the typed events: a readable line per event (default) or one
//! JSON object per line (`--json`), to stdout or a file, plus the run's counters (end-of-run
//! summary, `--metrics` endpoint). Text is made here (`text`: the words for points, segments
//! and warnings) and nowhere before.
mod human;
pub(crate) mod json;
pub(crate) mod metrics;
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
}
