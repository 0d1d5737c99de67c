//! Outputs, written once over the typed events: a readable line per event (default) or one
//! JSON object per line (`--json`), to stdout or a file, plus the run's counters (end-of-run
//! summary, `--metrics` endpoint). Text is made here (`text`: the words for points, segments
//! and warnings) and nowhere before.
pub(crate) mod file;
mod human;
pub(crate) mod json;
pub(crate) mod metrics;
mod queue;
pub(crate) mod ready;
pub(crate) mod startup;
pub(crate) mod summary;
pub(crate) mod text;
pub(crate) mod why;

use std::{
    io::{self, BufWriter, Write},
    path::Path,
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, Result};
use serde::Serialize;

use self::{
    file::{FileOptions, LogFile},
    queue::Destination,
};
use crate::{clock::Timestamp, event::TraceEvent, registry::Registry};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Human,
    Json,
}

/// Where an `Output` writes: stdout (or any writer), an output file, or either of them on
/// the output thread (`queue`).
enum Dest {
    /// A writer and what it is ("stdout").
    Stream(Box<dyn Write + Send>, &'static str),
    File(LogFile),
    Queued(queue::Queue),
}

impl queue::Destination for Dest {
    /// What a failed write failed on, for its error.
    fn what(&self) -> String {
        match self {
            Dest::Stream(_, name) => format!("writing to {name}"),
            Dest::File(f) => format!("writing output file {}", f.path().display()),
            Dest::Queued(q) => q.what().to_owned(),
        }
    }

    fn write_all(&mut self, b: &[u8]) -> Result<()> {
        let written = match self {
            Dest::Stream(w, _) => w.write_all(b),
            Dest::File(f) => f.write_all(b),
            Dest::Queued(q) => return q.send(b),
        };
        written.with_context(|| self.what())
    }

    /// Written through to the reader (on the output thread: as soon as it gets to it).
    fn flush(&mut self) -> Result<()> {
        let flushed = match self {
            Dest::Stream(w, _) => w.flush(),
            Dest::File(f) => f.flush(),
            Dest::Queued(q) => {
                q.flush();
                return Ok(());
            }
        };
        flushed.with_context(|| self.what())
    }

    /// See `Sink::reopen`: only a file reopens.
    fn reopen(&mut self) -> Result<()> {
        match self {
            Dest::File(f) => {
                f.reopen()?;
                log::info!("reopened output file {}", f.path().display());
            }
            Dest::Queued(q) => q.reopen(),
            Dest::Stream(..) => {}
        }
        Ok(())
    }
}

pub(crate) struct Output {
    format: Format,
    out: Dest,
    /// Flush after every event: someone is watching (a terminal, a pipe to jq).
    live: bool,
    /// One record is serialised here, then written in one call (serde_json's many small
    /// writes through a `dyn Write` cost more than the serialisation itself; a rotated file
    /// never splits a record).
    line: Vec<u8>,
    json: json::EventWriter,
    /// Names the events' owners (the attributor's registry: see `set_registry`).
    registry: Arc<Registry>,
    /// The write that failed, when the output is used as a `Sink` (see `Sink::failed`).
    error: Option<anyhow::Error>,
}

/// A userspace-generated record: events the kernel could not deliver.
#[derive(Serialize)]
pub(crate) struct LostRecord {
    pub(crate) time: Timestamp,
    pub(crate) kind: &'static str,
    pub(crate) lost: u64,
    pub(crate) total_lost: u64,
    /// The totals per reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reasons: Option<crate::kernel::observers::Lost>,
}

/// Where the trace loop sends what it produces: `Output` writes it; `why` collects flows.
pub(crate) trait Sink {
    fn event(&mut self, ev: &TraceEvent) -> Result<()>;
    fn lost(&mut self, rec: &LostRecord) -> Result<()>;
    fn stats(&mut self, rec: &StatsRecord) -> Result<()>;
    fn summary(&mut self, summary: &summary::Summary) -> Result<()>;
    fn flush(&mut self) -> Result<()>;
    /// The registry whose owner ids the events carry (the attributor's), to name them by.
    fn set_registry(&mut self, _registry: &Arc<Registry>) {}
    /// Closes the output file and opens it again by name (SIGHUP; see `file`).
    fn reopen(&mut self) -> Result<()> {
        Ok(())
    }
    /// Whether the sink can no longer write (a full disk, a closed pipe). The trace loop then
    /// stops as if signalled: what was counted still goes to stderr as the summary, and the
    /// run's error (`Output::take_error`) follows it. A failed sink drops what it is given.
    fn failed(&self) -> bool {
        false
    }
    /// The observer plan (JSON output only: people read it from the start-up lines).
    fn plan(&mut self, _plan: &startup::PlanRecord) -> Result<()> {
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
    /// Records dropped because the writer could not keep up (see `queue`).
    fn dropped(&self) -> u64 {
        0
    }
    /// The end: everything written and flushed, waiting at most until `by` for a slow
    /// writer; returns the records left unwritten.
    fn finish(&mut self, _by: Instant) -> Result<u64> {
        self.flush().map(|()| 0)
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
        Self::with(format, Dest::Stream(out, "the output"), false)
    }

    fn with(format: Format, out: Dest, live: bool) -> Self {
        Self {
            format,
            out,
            live,
            line: Vec::with_capacity(1024),
            json: json::EventWriter::default(),
            registry: Arc::default(),
            error: None,
        }
    }

    /// To `path` (see `file`: no symlink followed, mode 0600, emptied at the first record), or
    /// to stdout.
    pub(crate) fn new(format: Format, path: Option<&Path>) -> Result<Self> {
        Self::open(format, path, FileOptions::default())
    }

    /// Like `new`, with `--append` and rotation.
    pub(crate) fn open(format: Format, path: Option<&Path>, opts: FileOptions) -> Result<Self> {
        Ok(match path {
            Some(p) => Self::with(format, Dest::File(LogFile::open(p, opts)?), false),
            None => {
                let stdout = Box::new(BufWriter::new(io::stdout()));
                Self::with(format, Dest::Stream(stdout, "stdout"), true)
            }
        })
    }

    /// The same output written on a thread of its own, behind a bounded queue (`queue`): the
    /// daemon's, which a stalled reader must not stop.
    pub(crate) fn queued(mut self) -> Result<Self> {
        let dest = std::mem::replace(&mut self.out, Dest::Stream(Box::new(io::sink()), "-"));
        self.out = Dest::Queued(queue::Queue::spawn(dest, self.live)?);
        // The thread flushes whenever it catches up.
        self.live = false;
        Ok(self)
    }

    /// Names the owners in events by `registry`: the one whose ids they carry (the
    /// attributor's).
    pub(crate) fn set_registry(&mut self, registry: &Arc<Registry>) {
        self.registry = registry.clone();
        self.json.set_registry(registry);
    }

    /// The error that made this output fail as a `Sink`, if one did.
    pub(crate) fn take_error(&mut self) -> Option<anyhow::Error> {
        match &self.out {
            Dest::Queued(q) if self.error.is_none() && q.failed() => Some(q.take_error()),
            _ => self.error.take(),
        }
    }

    /// Writes the record serialised in `line` (adding its newline), in one call.
    fn put(&mut self, flush: bool) -> Result<()> {
        self.line.push(b'\n');
        self.out.write_all(&self.line)?;
        if flush || self.live {
            self.flush()?;
        }
        Ok(())
    }

    /// A record serialised as JSON.
    fn put_json(&mut self, rec: &impl Serialize, flush: bool) -> Result<()> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, rec)?;
        self.put(flush)
    }

    pub(crate) fn event(&mut self, ev: &TraceEvent) -> Result<()> {
        self.line.clear();
        match self.format {
            Format::Json => self.json.write(ev, &mut self.line)?,
            Format::Human => {
                let line = human::line(ev, &self.registry);
                self.line.extend_from_slice(line.as_bytes());
            }
        }
        self.put(false)
    }

    pub(crate) fn lost(&mut self, rec: &LostRecord) -> Result<()> {
        if self.format == Format::Json {
            return self.put_json(rec, false);
        }
        self.line.clear();
        write!(
            self.line,
            "{} LOST {} events ({} in total",
            rec.time, rec.lost, rec.total_lost
        )?;
        if let Some(r) = &rec.reasons {
            let reasons = [
                ("ring buffer full", r.ring_full),
                ("counting map full", r.count_map_full),
                ("evicted unread", r.evicted),
                ("output reader stalled", r.output),
            ];
            for (what, n) in reasons.iter().filter(|(_, n)| *n > 0) {
                write!(self.line, "; {what}: {n}")?;
            }
        }
        self.line.push(b')');
        self.put(false)
    }

    pub(crate) fn stats(&mut self, rec: &StatsRecord) -> Result<()> {
        if self.format == Format::Json {
            return self.put_json(rec, true);
        }
        self.line.clear();
        write!(
            self.line,
            "{} STATS rss {} kB, {} events, {} lost, {} packets tracked, {} interfaces",
            rec.time, rec.rss_kb, rec.events, rec.lost, rec.tracked_packets, rec.interfaces
        )?;
        self.put(true)
    }

    pub(crate) fn summary(&mut self, summary: &summary::Summary) -> Result<()> {
        self.put_json(summary, false)
    }

    pub(crate) fn flush(&mut self) -> Result<()> {
        self.out.flush()
    }

    fn reopen(&mut self) -> Result<()> {
        self.out.reopen()
    }

    /// As a `Sink`: the first failure is kept (`take_error`) and everything after it dropped.
    fn sink(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) -> Result<()> {
        if self.error.is_none() {
            if let Err(e) = f(self) {
                self.error = Some(e);
            }
        }
        Ok(())
    }
}

/// The trace loop's output: a failed write does not end the loop by an error (which would
/// lose the summary) but makes the sink `failed` (see `Sink::failed`).
impl Sink for Output {
    fn event(&mut self, ev: &TraceEvent) -> Result<()> {
        self.sink(|o| o.event(ev))
    }
    fn lost(&mut self, rec: &LostRecord) -> Result<()> {
        self.sink(|o| o.lost(rec))
    }
    fn stats(&mut self, rec: &StatsRecord) -> Result<()> {
        self.sink(|o| o.stats(rec))
    }
    fn summary(&mut self, summary: &summary::Summary) -> Result<()> {
        self.sink(|o| o.summary(summary))
    }
    fn flush(&mut self) -> Result<()> {
        self.sink(Output::flush)
    }
    fn set_registry(&mut self, registry: &Arc<Registry>) {
        Output::set_registry(self, registry);
    }
    fn reopen(&mut self) -> Result<()> {
        self.sink(Output::reopen)
    }
    fn failed(&self) -> bool {
        self.error.is_some() || matches!(&self.out, Dest::Queued(q) if q.failed())
    }
    fn dropped(&self) -> u64 {
        match &self.out {
            Dest::Queued(q) => q.dropped(),
            _ => 0,
        }
    }
    fn finish(&mut self, by: Instant) -> Result<u64> {
        let Dest::Queued(q) = &mut self.out else {
            self.sink(Output::flush)?;
            return Ok(0);
        };
        match q.finish(by) {
            Ok(unwritten) => Ok(unwritten),
            Err(e) => {
                self.error.get_or_insert(e);
                Ok(0)
            }
        }
    }
    fn plan(&mut self, plan: &startup::PlanRecord) -> Result<()> {
        if matches!(self.format, Format::Json) {
            self.sink(|o| o.put_json(plan, false))?;
        }
        Ok(())
    }
    fn ready(&mut self, ready: &ready::ReadyRecord) -> Result<()> {
        if matches!(self.format, Format::Json) {
            // Whoever waits for it reads it now, from a file too.
            self.sink(|o| o.put_json(ready, true))?;
        }
        Ok(())
    }
    /// A file gets what was written at least once a second (someone may be following it).
    fn tick(&mut self) -> Result<()> {
        self.sink(Output::flush)
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
        let mut out = Output::with(
            Format::Json,
            Dest::Stream(Box::new(buf.clone()), "a buffer"),
            false,
        );
        let mut p = Pipeline {
            decoder: Decoder::new(
                fixtures::topology(),
                HashMap::from([(12, "NETFILTER_DROP".into())]),
            ),
            attributor: Attributor::new(Registry::builtin().unwrap()),
        };
        out.set_registry(p.attributor.registry());
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
            reasons: Some(crate::kernel::observers::Lost {
                ring_full: 1,
                count_map_full: 0,
                evicted: 1,
                output: 1,
            }),
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
