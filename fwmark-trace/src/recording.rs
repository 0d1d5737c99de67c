//! Record now, show later: `trace --record FILE` writes the kernel's raw per-packet records to a
//! file at ring-buffer speed (no decoding, no attribution, no JSON while tracing), with the
//! context needed to name them; `fwmark-trace show FILE` decodes and attributes them afterwards
//! with the same code the live output uses.
//!
//! Format: the magic line `FWMTREC3\n`, then frames of `tag: u8, len: u32 (little endian),
//! payload`: `C` a context (JSON: topology, drop reason names, boot time), valid for the records
//! after it; `E` raw `Event` records, back to back. A file cut short (the daemon was killed) ends
//! at its last whole record.
use std::{
    collections::HashMap,
    fs::File,
    io::{BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use fwmark_trace_common::Event;
use serde::{Deserialize, Serialize};

use crate::{
    attribution::Attributor,
    decode::Decoder,
    output::{summary::Summary, Format, Output},
    pipeline::Pipeline,
    place::Topology,
    registry::{self, Registry},
};

/// 2: `Point` carries a priority (16 bytes); 3: the topology's chains and sites are typed
/// (hooks and families by name).
const MAGIC: &[u8; 9] = b"FWMTREC4\n";
const CONTEXT: u8 = b'C';
const EVENTS: u8 = b'E';
/// A frame larger than this is not one we wrote.
const MAX_FRAME: u32 = 64 << 20;

/// What is needed to name recorded points: as the daemon knew it when they were recorded.
#[derive(Serialize, Deserialize)]
pub(crate) struct Context {
    pub(crate) topology: Topology,
    pub(crate) drop_reasons: Vec<(u32, String)>,
    /// Wall-clock time of CLOCK_MONOTONIC's zero on the recording machine (ns since the epoch).
    pub(crate) boot_unix_ns: u64,
}

pub(crate) struct Recorder {
    out: BufWriter<File>,
    pending: Vec<u8>,
    pub(crate) records: u64,
}

impl Recorder {
    pub(crate) fn create(path: &Path) -> Result<Self> {
        let file =
            File::create(path).with_context(|| format!("creating recording {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC)?;
        Ok(Self {
            out,
            pending: Vec::with_capacity(1 << 20),
            records: 0,
        })
    }

    pub(crate) fn context(&mut self, decoder: &Decoder) -> Result<()> {
        self.flush_events()?;
        let ctx = ContextRef {
            topology: decoder.topology(),
            drop_reasons: decoder
                .drop_reasons()
                .iter()
                .map(|(k, r)| (*k, r.to_string()))
                .collect(),
            boot_unix_ns: decoder
                .boot()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64,
        };
        frame(&mut self.out, CONTEXT, &serde_json::to_vec(&ctx)?)
    }

    /// One raw record as the kernel wrote it.
    pub(crate) fn record(&mut self, raw: &[u8]) -> Result<()> {
        self.pending.extend_from_slice(raw);
        self.records += 1;
        if self.pending.len() >= 1 << 20 {
            self.flush_events()?;
        }
        Ok(())
    }

    fn flush_events(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            frame(&mut self.out, EVENTS, &self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self) -> Result<()> {
        self.flush_events()?;
        self.out.flush().context("writing the recording")
    }
}

fn frame(out: &mut impl Write, tag: u8, payload: &[u8]) -> Result<()> {
    out.write_all(&[tag])?;
    out.write_all(&(payload.len() as u32).to_le_bytes())?;
    out.write_all(payload)?;
    Ok(())
}

/// `Context` by reference, for writing without cloning the topology.
#[derive(Serialize)]
struct ContextRef<'a> {
    topology: &'a Topology,
    drop_reasons: Vec<(u32, String)>,
    boot_unix_ns: u64,
}

/// A frame read back.
pub(crate) enum Frame {
    Context(Box<Context>),
    Events(Vec<Event>),
}

/// Reads the frames of a recording. Anything that is not one (bad magic, a bad context) is an
/// error; a file cut short ends at its last whole record.
pub(crate) struct Reader<R> {
    input: R,
}

impl<R: Read> Reader<R> {
    pub(crate) fn new(mut input: R) -> Result<Self> {
        let mut magic = [0u8; 9];
        input
            .read_exact(&mut magic)
            .context("not a fwmark-trace recording (too short)")?;
        if magic.starts_with(b"FWMTREC") && &magic != MAGIC {
            bail!(
                "a recording of another fwmark-trace version ({}; this one reads {})",
                String::from_utf8_lossy(&magic).trim(),
                String::from_utf8_lossy(MAGIC).trim()
            );
        }
        if &magic != MAGIC {
            bail!("not a fwmark-trace recording (no FWMTREC header)");
        }
        Ok(Self { input })
    }

    /// The next frame; `None` at the end.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>> {
        let mut head = [0u8; 5];
        if !read_full(&mut self.input, &mut head)? {
            return Ok(None);
        }
        let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]);
        if len > MAX_FRAME {
            bail!("corrupt recording: a frame of {len} bytes");
        }
        let mut payload = vec![0u8; len as usize];
        let whole = read_full(&mut self.input, &mut payload)?;
        match head[0] {
            CONTEXT if whole => Ok(Some(Frame::Context(Box::new(
                serde_json::from_slice(&payload).context("corrupt recording context")?,
            )))),
            CONTEXT => Ok(None),
            EVENTS => Ok(Some(Frame::Events(events_of(&payload)))),
            t => bail!("corrupt recording: unknown frame {t:#x}"),
        }
    }
}

/// Fills `buf`; false if the input ended first (the part read is left in `buf`, zeroed after).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<bool> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..])? {
            0 => {
                buf[at..].fill(0);
                return Ok(at == buf.len());
            }
            n => at += n,
        }
    }
    Ok(true)
}

/// Whole records in `data` (a trailing partial one is dropped).
fn events_of(data: &[u8]) -> Vec<Event> {
    data.chunks_exact(std::mem::size_of::<Event>())
        // SAFETY: `Event` is plain integers (any bytes are a value); read unaligned.
        .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<Event>()) })
        .collect()
}

/// What `show` reads and where it writes.
pub(crate) struct ShowConfig {
    pub(crate) file: PathBuf,
    pub(crate) format: Format,
    pub(crate) output: Option<PathBuf>,
    pub(crate) registry: registry::Sources,
}

/// `fwmark-trace show`: decodes and attributes a recording.
pub(crate) fn show(cfg: &ShowConfig) -> Result<Summary> {
    let registry = Registry::load(&cfg.registry)?;
    let file = File::open(&cfg.file)
        .with_context(|| format!("opening recording {}", cfg.file.display()))?;
    let mut reader = Reader::new(BufReader::with_capacity(1 << 20, file))
        .with_context(|| cfg.file.display().to_string())?;
    let mut out = Output::new(cfg.format, cfg.output.as_deref())?;
    let mut summary = Summary::default();
    let mut pipeline: Option<Pipeline> = None;
    while let Some(frame) = reader.next_frame()? {
        match frame {
            Frame::Context(ctx) => {
                let boot = UNIX_EPOCH + Duration::from_nanos(ctx.boot_unix_ns);
                let reasons: HashMap<u32, String> = ctx.drop_reasons.into_iter().collect();
                match pipeline.as_mut() {
                    Some(p) => {
                        p.set_topology(ctx.topology);
                    }
                    None => {
                        pipeline = Some(Pipeline {
                            decoder: Decoder::new(ctx.topology, reasons).with_boot(boot),
                            attributor: Attributor::new(registry.clone()),
                        });
                    }
                }
            }
            Frame::Events(evs) => {
                let p = pipeline
                    .as_mut()
                    .context("corrupt recording: records before any context")?;
                for raw in &evs {
                    let ev = p.event(raw);
                    out.event(&ev)?;
                    summary.count(&ev);
                }
            }
        }
    }
    if let Some(p) = &pipeline {
        summary.attribution = p.attributor.totals();
    }
    if cfg.format == Format::Json {
        out.summary(&summary)?;
    }
    out.flush()?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recording(events: &[Event]) -> Vec<u8> {
        let dir = std::env::temp_dir().join(format!("fwmt-rec-{}", std::process::id()));
        let mut r = Recorder::create(&dir).unwrap();
        let d = Decoder::new(
            Topology::default(),
            HashMap::from([(2, "NOT_SPECIFIED".into())]),
        );
        r.context(&d).unwrap();
        for e in events {
            // SAFETY: viewing a plain-integer struct as bytes.
            let bytes = unsafe {
                std::slice::from_raw_parts((e as *const Event).cast::<u8>(), size_of::<Event>())
            };
            r.record(bytes).unwrap();
        }
        r.finish().unwrap();
        let data = std::fs::read(&dir).unwrap();
        let _ = std::fs::remove_file(&dir);
        data
    }

    fn frames(data: &[u8]) -> Result<Vec<Frame>> {
        let mut r = Reader::new(data)?;
        let mut out = Vec::new();
        while let Some(f) = r.next_frame()? {
            out.push(f);
        }
        Ok(out)
    }

    #[test]
    fn records_come_back_with_their_context() {
        let evs: Vec<Event> = (1..=3)
            .map(|i| Event {
                packet_id: i,
                new_mark: 0x40 * i as u32,
                ..Default::default()
            })
            .collect();
        let data = recording(&evs);
        let f = frames(&data).unwrap();
        assert!(
            matches!(&f[0], Frame::Context(c) if c.drop_reasons == vec![(2, "NOT_SPECIFIED".to_string())])
        );
        let Frame::Events(back) = &f[1] else {
            panic!("no events")
        };
        assert_eq!(
            back.iter().map(|e| e.new_mark).collect::<Vec<_>>(),
            [0x40, 0x80, 0xc0]
        );
        // Cut anywhere: no panic, whole records only.
        for cut in 0..data.len() {
            if let Ok(f) = frames(&data[..cut]) {
                let n: usize = f
                    .iter()
                    .map(|f| match f {
                        Frame::Events(e) => e.len(),
                        Frame::Context(_) => 0,
                    })
                    .sum();
                assert!(n <= 3);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn any_bytes_are_an_error_or_frames(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let mut data = MAGIC.to_vec();
            data.extend(tail);
            let _ = frames(&data);
            let _ = frames(&data[MAGIC.len()..]);
        }
    }
}
