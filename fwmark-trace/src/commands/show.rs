//! `fwmark-trace show`: a recording (`recording`) decoded, attributed and written as `trace`
//! would have.
use std::{
    collections::HashMap,
    fs::File,
    io::{BufReader, Read},
    path::{Path, PathBuf},
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};

use super::Outcome;
use crate::{
    attribution::Attributor,
    clock::Timestamp,
    decode::Decoder,
    output::{summary::Summary, text::escape_controls, Format, LostRecord, Output},
    pipeline::Pipeline,
    recording::{Frame, Reader},
    registry::{self, Registry},
};

/// What `show` reads and where it writes.
pub(crate) struct ShowConfig {
    pub(crate) file: PathBuf,
    pub(crate) format: Format,
    pub(crate) output: Option<PathBuf>,
    pub(crate) registry: registry::RegistrySources,
}

/// Whether two paths name the same file (device and inode: through symlinks and hard links).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Decodes, attributes and writes every record of a recording up to its end or its first
/// damage (`Reader::damage` says which), and counts them.
pub(crate) fn replay<R: Read>(
    reader: &mut Reader<R>,
    registry: &Registry,
    out: &mut Output,
) -> Result<Summary> {
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
                        let attributor = Attributor::new(registry.clone());
                        out.set_registry(attributor.registry());
                        pipeline = Some(Pipeline {
                            decoder: Decoder::new(ctx.topology, reasons).with_boot(boot),
                            attributor,
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
            Frame::Lost(l) => {
                out.lost(&LostRecord {
                    time: Timestamp(UNIX_EPOCH + Duration::from_nanos(l.time_unix_ns)),
                    kind: "lost",
                    lost: l.lost,
                    total_lost: l.total_lost,
                    reasons: Some(l.reasons),
                })?;
                summary.lost = l.total_lost;
            }
        }
    }
    if let Some(p) = &pipeline {
        summary.attribution = p.attributor.totals();
    }
    Ok(summary)
}

/// `fwmark-trace show`: decodes and attributes a recording. `Found` (exit 1) when the recording
/// is cut short or damaged: what was intact is shown, and one warning says where it stopped.
pub(crate) fn show(cfg: &ShowConfig) -> Result<Outcome> {
    if let Some(output) = cfg.output.as_deref().filter(|o| same_file(o, &cfg.file)) {
        bail!(
            "--output {} is the recording {} itself: writing there would destroy it",
            output.display(),
            cfg.file.display()
        );
    }
    let registry = Registry::load(&cfg.registry)?;
    let file = File::open(&cfg.file)
        .with_context(|| format!("opening recording {}", cfg.file.display()))?;
    let mut reader = Reader::new(BufReader::with_capacity(1 << 20, file))
        .with_context(|| cfg.file.display().to_string())?;
    let mut out = Output::new(cfg.format, cfg.output.as_deref())?;
    let summary =
        replay(&mut reader, &registry, &mut out).with_context(|| cfg.file.display().to_string())?;
    if cfg.format == Format::Json {
        out.summary(&summary)?;
    }
    out.flush()?;
    // Names in it come from the recording (drop reasons, owners): no raw control characters.
    let text = summary.to_string();
    let lines: Vec<_> = text.lines().map(escape_controls).collect();
    log::info!("{}", lines.join("\n"));
    Ok(match reader.damage() {
        None => Outcome::Clean,
        Some(d) => {
            log::warn!("{}: {d}", escape_controls(&cfg.file.display().to_string()));
            Outcome::Found
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_output_may_not_be_the_recording() {
        let dir = std::env::temp_dir().join(format!("fwmt-same-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rec = dir.join("a.rec");
        std::fs::write(&rec, b"FWMTREC5\n").unwrap();
        let (link, hard, other) = (dir.join("l"), dir.join("h"), dir.join("o"));
        std::os::unix::fs::symlink(&rec, &link).unwrap();
        std::fs::hard_link(&rec, &hard).unwrap();
        std::fs::write(&other, b"FWMTREC5\n").unwrap();
        assert!(same_file(&rec, &rec));
        assert!(same_file(&link, &rec));
        assert!(same_file(&hard, &rec));
        assert!(!same_file(&other, &rec));
        assert!(!same_file(&dir.join("missing"), &rec));
        let cfg = ShowConfig {
            file: rec.clone(),
            format: Format::Json,
            output: Some(link),
            registry: registry::RegistrySources::default(),
        };
        let err = show(&cfg).unwrap_err().to_string();
        assert!(err.contains("is the recording"), "{err}");
        assert_eq!(std::fs::read(&rec).unwrap(), b"FWMTREC5\n");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
