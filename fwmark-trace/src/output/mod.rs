//! Outputs, written once over the typed events: a readable line per event (default) or one
//! JSON object per line (`--json`), to stdout or a file, plus the run's counters (end-of-run
//! summary, `--metrics` endpoint).
mod human;
pub mod metrics;
pub mod ready;
pub mod summary;

use std::{
    fs::File,
    io::{self, BufWriter, Write},
    path::Path,
};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::events::TraceEvent;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Human,
    Json,
}

pub struct Output {
    format: Format,
    out: Box<dyn Write + Send>,
    /// Flush after every event: someone is watching (a terminal, a pipe to jq).
    live: bool,
    /// One record is serialised here, then written in one call (serde_json's many small
    /// writes through a `dyn Write` cost more than the serialisation itself).
    line: Vec<u8>,
}

/// A userspace-generated record: events the kernel could not deliver.
#[derive(Serialize)]
pub struct LostRecord<'a> {
    pub time: &'a str,
    pub kind: &'static str,
    pub lost: u64,
    pub total_lost: u64,
}

/// Where the trace loop sends what it produces: `Output` writes it; `why` collects flows.
pub trait Sink {
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
pub struct StatsRecord {
    pub time: String,
    pub kind: &'static str,
    pub rss_kb: u64,
    pub events: u64,
    pub lost: u64,
    pub tracked_packets: usize,
    pub interfaces: usize,
}

impl Output {
    /// Writes to any sink (benchmarks use `io::sink()`), flushing only at the end.
    pub fn to_writer(format: Format, out: Box<dyn Write + Send>) -> Self {
        Self {
            format,
            out,
            live: false,
            line: Vec::with_capacity(1024),
        }
    }

    pub fn new(format: Format, path: Option<&Path>) -> Result<Self> {
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
        })
    }

    pub fn event(&mut self, ev: &TraceEvent) -> Result<()> {
        self.line.clear();
        match self.format {
            Format::Json => serde_json::to_writer(&mut self.line, ev)?,
            Format::Human => self.line.extend_from_slice(human::line(ev).as_bytes()),
        }
        self.line.push(b'\n');
        self.out.write_all(&self.line)?;
        self.maybe_flush()
    }

    pub fn lost(&mut self, rec: &LostRecord) -> Result<()> {
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

    pub fn stats(&mut self, rec: &StatsRecord) -> Result<()> {
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

    pub fn summary(&mut self, summary: &summary::Summary) -> Result<()> {
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

    pub fn flush(&mut self) -> Result<()> {
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
