//! Record now, show later: `trace --record FILE` writes the kernel's raw per-packet records to a
//! file at ring-buffer speed (no decoding, no attribution, no JSON while tracing), with the
//! context needed to name them; `fwmark-trace show FILE` decodes and attributes them afterwards
//! with the same code the live output uses.
//!
//! Format: the magic line `FWMTREC5\n`, then frames. A frame is a 13-byte header — `tag: u8`,
//! `len: u32`, `crc: u32` (CRC-32C of the payload), `head_crc: u32` (CRC-32C of the 9 bytes
//! before it), integers little endian — and `len` bytes of payload:
//!
//! - `C` a context (JSON: topology, drop reason names, boot time), valid for the records after
//!   it; at most `MAX_CONTEXT` bytes;
//! - `E` raw `Event` records back to back: a whole number of them, at most `MAX_EVENTS` bytes;
//! - `L` events lost, written when the count grew: `time: u64` (ns since the epoch), then the
//!   totals per reason so far, `ring_full: u64`, `count_map_full: u64`, `evicted: u64` (see
//!   `kernel::observers::Lost`); their sum must exceed the previous frame's;
//! - `Z` the end, written when the run finishes: `records: u64` and the three lost totals,
//!   which must match what came before it.
//!
//! Nothing is shown that the file does not hold intact: a frame is used only once its header
//! and payload pass their checksums and its length fits its kind. A recording cut short (the
//! daemon was killed, its disk filled up) or damaged ends at the last intact frame before the
//! damage; `show` says where (byte offset, frame number) and what it recovered, once, and exits 1.
use std::{
    fs::File,
    io::{self, BufWriter, Read, Write},
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, ensure, Context as _, Result};
use fwmark_trace_common::Event;
use serde::{Deserialize, Serialize};

use crate::{decode::Decoder, kernel::observers::Lost as LostCounts, place::Topology};

/// 2: `Point` carries a priority (16 bytes); 3: the topology's chains and sites are typed
/// (hooks and families by name); 5: checksummed frames, lost and end frames.
const MAGIC: &[u8; 9] = b"FWMTREC5\n";
const CONTEXT: u8 = b'C';
const EVENTS: u8 = b'E';
const LOST: u8 = b'L';
const END: u8 = b'Z';
/// A frame's header: tag, length, payload checksum, header checksum.
const HEADER: usize = 13;
/// One raw record.
const RECORD: usize = std::mem::size_of::<Event>();
/// The largest context frame we write is far smaller (a topology as JSON).
const MAX_CONTEXT: u32 = 64 << 20;
/// The largest events frame read; the recorder writes frames of about `EVENTS_FRAME` bytes.
const MAX_EVENTS: u32 = 1 << 20;
/// An events frame is written once this many bytes of records wait: a torn frame loses at most
/// this much, and the checksum is computed on data still in the cache.
const EVENTS_FRAME: usize = 64 << 10;
const LOST_LEN: u32 = 32;
const END_LEN: u32 = 32;

/// What is needed to name recorded points, as the daemon knew it when they were recorded (a
/// context frame's payload).
#[derive(Serialize, Deserialize)]
pub(crate) struct Naming {
    pub(crate) topology: Topology,
    pub(crate) drop_reasons: Vec<(u32, String)>,
    /// Wall-clock time of CLOCK_MONOTONIC's zero on the recording machine (ns since the epoch).
    pub(crate) boot_unix_ns: u64,
}

/// Writes a recording: to a file (`create`), or to any writer in tests.
pub(crate) struct Recorder<W: Write = BufWriter<File>> {
    out: W,
    pending: Vec<u8>,
    /// An events frame is written once this many bytes wait.
    frame_bytes: usize,
    pub(crate) records: u64,
    /// The lost counts as last recorded.
    lost: LostCounts,
}

impl Recorder {
    pub(crate) fn create(path: &Path) -> Result<Self> {
        // As private as any output file, never through a link; a new recording replaces it.
        let file = crate::output::file::open(path)?;
        file.set_len(0)
            .with_context(|| format!("emptying recording {}", path.display()))?;
        Recorder::to_writer(BufWriter::with_capacity(1 << 20, file), EVENTS_FRAME)
    }
}

impl<W: Write> Recorder<W> {
    fn to_writer(mut out: W, frame_bytes: usize) -> Result<Self> {
        out.write_all(MAGIC)?;
        Ok(Self {
            out,
            pending: Vec::with_capacity(frame_bytes + RECORD),
            frame_bytes,
            records: 0,
            lost: LostCounts::default(),
        })
    }

    pub(crate) fn context(&mut self, decoder: &Decoder) -> Result<()> {
        self.flush_events()?;
        let ctx = NamingRef {
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
        let json = serde_json::to_vec(&ctx)?;
        ensure!(
            json.len() <= MAX_CONTEXT as usize,
            "recording: a context of {} bytes is too large",
            json.len()
        );
        frame(&mut self.out, CONTEXT, &json)
    }

    /// One raw record as the kernel wrote it.
    pub(crate) fn record(&mut self, raw: &[u8]) -> Result<()> {
        ensure!(
            raw.len() == RECORD,
            "recording: a record of {} bytes",
            raw.len()
        );
        self.pending.extend_from_slice(raw);
        self.records += 1;
        if self.pending.len() >= self.frame_bytes {
            self.flush_events()?;
        }
        Ok(())
    }

    /// Events lost so far, per reason (ring buffer full, counting map full, evicted unread): a
    /// lost frame when their sum grew, after the records that came before.
    pub(crate) fn lost(&mut self, now: LostCounts) -> Result<()> {
        if now.total() <= self.lost.total() {
            return Ok(());
        }
        self.flush_events()?;
        let time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let mut payload = Vec::with_capacity(LOST_LEN as usize);
        payload.extend_from_slice(&time.to_le_bytes());
        payload.extend_from_slice(&lost_bytes(&now));
        self.lost = now;
        frame(&mut self.out, LOST, &payload)
    }

    fn flush_events(&mut self) -> Result<()> {
        if !self.pending.is_empty() {
            frame(&mut self.out, EVENTS, &self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// The end of the run: what waits, the lost counts if they grew, the end frame, then
    /// everything to the file.
    pub(crate) fn finish(&mut self, lost: LostCounts) -> Result<()> {
        self.flush_events()?;
        self.lost(lost)?;
        let mut payload = Vec::with_capacity(END_LEN as usize);
        payload.extend_from_slice(&self.records.to_le_bytes());
        payload.extend_from_slice(&lost_bytes(&self.lost));
        frame(&mut self.out, END, &payload)?;
        self.out.flush().context("writing the recording")
    }
}

/// The lost counts as written: ring_full, count_map_full, evicted.
fn lost_bytes(l: &LostCounts) -> [u8; 24] {
    let mut b = [0u8; 24];
    b[..8].copy_from_slice(&l.ring_full.to_le_bytes());
    b[8..16].copy_from_slice(&l.count_map_full.to_le_bytes());
    b[16..].copy_from_slice(&l.evicted.to_le_bytes());
    b
}

fn frame(out: &mut impl Write, tag: u8, payload: &[u8]) -> Result<()> {
    let mut head = [0u8; HEADER];
    head[0] = tag;
    head[1..5].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    head[5..9].copy_from_slice(&crc32c(payload).to_le_bytes());
    let head_crc = crc32c(&head[..9]);
    head[9..].copy_from_slice(&head_crc.to_le_bytes());
    out.write_all(&head)?;
    out.write_all(payload)?;
    Ok(())
}

/// `Naming` by reference, for writing without cloning the topology.
#[derive(Serialize)]
struct NamingRef<'a> {
    topology: &'a Topology,
    drop_reasons: Vec<(u32, String)>,
    boot_unix_ns: u64,
}

/// A frame read back.
pub(crate) enum Frame {
    Context(Box<Naming>),
    Events(Vec<Event>),
    Lost(LostFrame),
}

/// Events lost (an `L` frame): since the previous one, in all, and the totals per reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LostFrame {
    pub(crate) lost: u64,
    pub(crate) total_lost: u64,
    pub(crate) reasons: LostCounts,
    /// When the daemon saw the count grow (ns since the epoch).
    pub(crate) time_unix_ns: u64,
}

/// Where a recording stops being intact, and what was read before it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Damage {
    /// Byte offset of the first frame not read (the damaged one).
    pub(crate) offset: u64,
    /// Its number (the first frame is 1).
    pub(crate) frame: u64,
    pub(crate) what: String,
    /// The intact frames before it, the event records and the lost frames they held.
    pub(crate) frames: u64,
    pub(crate) events: u64,
    pub(crate) lost_frames: u64,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cut short or damaged at byte {} (frame {}): {}; recovered the {} intact frame(s) before it ({} events, {} lost records), nothing after",
            self.offset, self.frame, self.what, self.frames, self.events, self.lost_frames
        )
    }
}

/// Reads the frames of a recording. What is not a recording (no magic, another version's) is an
/// error; a recording cut short or damaged ends at its last intact frame (`damage` says where).
pub(crate) struct Reader<R> {
    input: R,
    /// Byte offset of the next frame.
    offset: u64,
    frames: u64,
    events: u64,
    lost_frames: u64,
    /// The lost counts of the last lost frame.
    lost: LostCounts,
    /// The end frame was read.
    ended: bool,
    done: bool,
    damage: Option<Damage>,
}

impl<R: Read> Reader<R> {
    pub(crate) fn new(mut input: R) -> Result<Self> {
        let mut magic = [0u8; 9];
        let n = read_up_to(&mut input, &mut magic)?;
        let mut reader = Self {
            input,
            offset: n as u64,
            frames: 0,
            events: 0,
            lost_frames: 0,
            lost: LostCounts::default(),
            ended: false,
            done: false,
            damage: None,
        };
        if n < MAGIC.len() && magic[..n] == MAGIC[..n] {
            // Cut short inside its first line (an empty file: killed before anything reached it).
            let _ = reader.damaged(format!(
                "the file ends inside its {}-byte header ({n} bytes)",
                MAGIC.len()
            ));
            return Ok(reader);
        }
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
        Ok(reader)
    }

    /// Where the recording stopped being intact, once `next_frame` has said `None`.
    pub(crate) fn damage(&self) -> Option<&Damage> {
        self.damage.as_ref()
    }

    /// Marks the recording damaged at the next frame: nothing more is read.
    fn damaged(&mut self, what: String) -> Option<Frame> {
        self.done = true;
        self.damage = Some(Damage {
            offset: self.offset,
            frame: self.frames + 1,
            what,
            frames: self.frames,
            events: self.events,
            lost_frames: self.lost_frames,
        });
        None
    }

    /// The next intact frame; `None` at the end, or where the recording stops being intact
    /// (then `damage` says why). An error only when reading fails.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>> {
        if self.done {
            return Ok(None);
        }
        let mut head = [0u8; HEADER];
        let n = read_up_to(&mut self.input, &mut head)?;
        if n == 0 {
            if self.ended {
                self.done = true;
                return Ok(None);
            }
            return Ok(self.damaged(
                "the recording ends without its end frame (the daemon stopped before finishing it: killed, or its disk filled up)".into(),
            ));
        }
        if n < HEADER {
            return Ok(self.damaged(format!(
                "the file ends inside the frame's {HEADER}-byte header ({n} bytes)"
            )));
        }
        let word =
            |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let (tag, len, crc, head_crc) = (head[0], word(1), word(5), word(9));
        if crc32c(&head[..9]) != head_crc {
            return Ok(self.damaged(
                "the frame's header fails its checksum (its type or length is damaged)".into(),
            ));
        }
        if self.ended {
            return Ok(self.damaged("a frame after the end frame".into()));
        }
        let fits = match tag {
            CONTEXT => len > 0 && len <= MAX_CONTEXT,
            EVENTS => len > 0 && len <= MAX_EVENTS && (len as usize).is_multiple_of(RECORD),
            LOST => len == LOST_LEN,
            END => len == END_LEN,
            t => return Ok(self.damaged(format!("an unknown frame type {t:#04x}"))),
        };
        if !fits {
            return Ok(self.damaged(format!(
                "a {} frame of {len} bytes (not a length this kind of frame has)",
                tag as char
            )));
        }
        let mut payload = Vec::new();
        (&mut self.input)
            .take(u64::from(len))
            .read_to_end(&mut payload)?;
        if payload.len() < len as usize {
            return Ok(self.damaged(format!(
                "the file ends inside the frame ({} of its {len} bytes)",
                payload.len()
            )));
        }
        if crc32c(&payload) != crc {
            return Ok(self.damaged("the frame's contents fail their checksum".into()));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&payload[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let lost_at = |at: usize| LostCounts {
            ring_full: u64_at(at),
            count_map_full: u64_at(at + 8),
            evicted: u64_at(at + 16),
            ..LostCounts::default()
        };
        let frame = match tag {
            CONTEXT => match serde_json::from_slice(&payload) {
                Ok(ctx) => Frame::Context(Box::new(ctx)),
                Err(e) => return Ok(self.damaged(format!("a context that does not parse ({e})"))),
            },
            EVENTS => Frame::Events(events_of(&payload)),
            LOST => {
                let reasons = lost_at(8);
                let before = self.lost.total();
                let total = reasons
                    .ring_full
                    .checked_add(reasons.count_map_full)
                    .and_then(|t| t.checked_add(reasons.evicted));
                match total {
                    Some(total) if total > before => Frame::Lost(LostFrame {
                        lost: total - before,
                        total_lost: total,
                        reasons,
                        time_unix_ns: u64_at(0),
                    }),
                    _ => {
                        return Ok(self.damaged(format!(
                            "a lost frame whose counts do not add up ({reasons:?} after {before} in total)"
                        )))
                    }
                }
            }
            _ => {
                let (records, lost) = (u64_at(0), lost_at(8));
                if (records, lost) != (self.events, self.lost) {
                    // The file's counts, any values: `total()` would overflow on some (a panic).
                    let claimed = lost
                        .ring_full
                        .saturating_add(lost.count_map_full)
                        .saturating_add(lost.evicted);
                    return Ok(self.damaged(format!(
                        "the end frame counts {records} records and {claimed} lost events, the frames before it {} and {}",
                        self.events,
                        self.lost.total()
                    )));
                }
                self.ended = true;
                self.offset += (HEADER + payload.len()) as u64;
                self.frames += 1;
                return self.next_frame();
            }
        };
        self.offset += (HEADER + payload.len()) as u64;
        self.frames += 1;
        match &frame {
            Frame::Events(evs) => self.events += evs.len() as u64,
            Frame::Lost(l) => {
                self.lost_frames += 1;
                self.lost = l.reasons;
            }
            Frame::Context(_) => {}
        }
        Ok(Some(frame))
    }
}

/// Reads until `buf` is full or the input ends: how many bytes it got.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the recording"),
        }
    }
    Ok(at)
}

/// The records of an events frame (a whole number of them: checked by the reader).
fn events_of(data: &[u8]) -> Vec<Event> {
    data.chunks_exact(RECORD)
        // SAFETY: `Event` is plain integers (any bytes are a value); read unaligned.
        .map(|c| unsafe { std::ptr::read_unaligned(c.as_ptr().cast::<Event>()) })
        .collect()
}

/// CRC-32C (Castagnoli: reflected polynomial 0x82F63B78, initial and final value all ones),
/// table driven, eight bytes at a time ("slicing by 8"); tables made at compile time.
fn crc32c(data: &[u8]) -> u32 {
    const fn tables() -> [[u32; 256]; 8] {
        let mut t = [[0u32; 256]; 8];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut bit = 0;
            while bit < 8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
                bit += 1;
            }
            t[0][i] = c;
            i += 1;
        }
        let mut i = 0;
        while i < 256 {
            let mut k = 1;
            while k < 8 {
                let prev = t[k - 1][i];
                t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
                k += 1;
            }
            i += 1;
        }
        t
    }
    static T: [[u32; 256]; 8] = tables();
    let mut c = !0u32;
    let mut chunks = data.chunks_exact(8);
    for b in &mut chunks {
        let lo = c ^ u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let hi = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        c = T[7][(lo & 0xff) as usize]
            ^ T[6][((lo >> 8) & 0xff) as usize]
            ^ T[5][((lo >> 16) & 0xff) as usize]
            ^ T[4][(lo >> 24) as usize]
            ^ T[3][(hi & 0xff) as usize]
            ^ T[2][((hi >> 8) & 0xff) as usize]
            ^ T[1][((hi >> 16) & 0xff) as usize]
            ^ T[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = (c >> 8) ^ T[0][((c ^ u32::from(b)) & 0xff) as usize];
    }
    !c
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use proptest::prelude::*;

    fn event(i: u64) -> Event {
        Event {
            ts_ns: 1000 + i,
            packet_id: i,
            new_mark: 0x40 * i as u32,
            ..Default::default()
        }
    }

    fn bytes(e: &Event) -> Vec<u8> {
        // SAFETY: viewing a plain-integer struct without padding as bytes.
        unsafe { std::slice::from_raw_parts((e as *const Event).cast::<u8>(), RECORD) }.to_vec()
    }

    /// What a recording is made of.
    #[derive(Clone, Debug)]
    enum Step {
        Context,
        Records(u64),
        /// Events lost to the ring buffer, to the counting map, evicted.
        Lost(u64, u64, u64),
    }

    /// A recording of `ops` with events frames of `frame_records` records; the events written.
    fn recording(ops: &[Step], frame_records: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
        let mut r = Recorder::to_writer(Vec::new(), frame_records * RECORD).unwrap();
        let d = Decoder::new(
            Topology::default(),
            HashMap::from([(2, "NOT_SPECIFIED".into())]),
        );
        let (mut written, mut lost) = (Vec::new(), LostCounts::default());
        for op in ops {
            match op {
                Step::Context => r.context(&d).unwrap(),
                Step::Records(n) => {
                    for _ in 0..*n {
                        let e = bytes(&event(written.len() as u64));
                        r.record(&e).unwrap();
                        written.push(e);
                    }
                }
                Step::Lost(ring, map, evicted) => {
                    lost.ring_full += ring;
                    lost.count_map_full += map;
                    lost.evicted += evicted;
                    r.lost(lost).unwrap();
                }
            }
        }
        r.finish(lost).unwrap();
        (r.out, written)
    }

    struct Read {
        frames: Vec<Frame>,
        events: Vec<Vec<u8>>,
        damage: Option<Damage>,
    }

    fn read(data: &[u8]) -> Result<Read> {
        let mut r = Reader::new(data)?;
        let mut frames = Vec::new();
        while let Some(f) = r.next_frame()? {
            frames.push(f);
        }
        let events = frames
            .iter()
            .flat_map(|f| match f {
                Frame::Events(e) => e.iter().map(bytes).collect(),
                _ => Vec::new(),
            })
            .collect();
        Ok(Read {
            frames,
            events,
            damage: r.damage,
        })
    }

    /// Each intact frame's end offset and the events in the frames up to it.
    fn boundaries(data: &[u8]) -> Vec<(u64, usize)> {
        let mut r = Reader::new(data).unwrap();
        let mut out = vec![(r.offset, 0)];
        loop {
            let f = r.next_frame().unwrap();
            out.push((r.offset, r.events as usize));
            if f.is_none() {
                break;
            }
        }
        assert!(r.damage.is_none(), "{:?}", r.damage);
        out
    }

    const OPS: &[Step] = &[
        Step::Context,
        Step::Records(3),
        Step::Lost(2, 0, 0),
        Step::Records(4),
        Step::Context,
        Step::Records(1),
        Step::Lost(1, 3, 1),
        // Nothing more lost: no frame.
        Step::Lost(0, 0, 0),
    ];

    #[test]
    fn crc32c_matches_known_vectors() {
        // The check value of CRC-32C, and RFC 3720's (iSCSI) test vectors.
        assert_eq!(crc32c(b""), 0);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62A8_AB43);
        let up: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c(&up), 0x46DD_794E);
        let down: Vec<u8> = (0..32).rev().collect();
        assert_eq!(crc32c(&down), 0x113F_DB5C);
        // Every length and alignment against the polynomial bit by bit.
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + i / 5) as u8).collect();
        for start in 0..8 {
            for end in start..data.len() {
                let part = &data[start..end];
                let mut c = !0u32;
                for &b in part {
                    c ^= u32::from(b);
                    for _ in 0..8 {
                        c = if c & 1 == 1 {
                            (c >> 1) ^ 0x82F6_3B78
                        } else {
                            c >> 1
                        };
                    }
                }
                assert_eq!(crc32c(part), !c, "{start}..{end}");
            }
        }
    }

    #[test]
    fn records_come_back_with_their_context_and_lost_counts() {
        let (data, written) = recording(OPS, 2);
        let back = read(&data).unwrap();
        assert!(back.damage.is_none(), "{:?}", back.damage);
        assert_eq!(back.events, written);
        assert!(
            matches!(&back.frames[0], Frame::Context(c) if c.drop_reasons == vec![(2, "NOT_SPECIFIED".to_string())])
        );
        let lost: Vec<LostFrame> = back
            .frames
            .iter()
            .filter_map(|f| match f {
                Frame::Lost(l) => Some(*l),
                _ => None,
            })
            .collect();
        assert_eq!(
            lost.iter()
                .map(|l| (l.lost, l.total_lost))
                .collect::<Vec<_>>(),
            [(2, 2), (5, 7)]
        );
        assert_eq!(
            lost[1].reasons,
            LostCounts {
                ring_full: 3,
                count_map_full: 3,
                evicted: 1,
                ..LostCounts::default()
            }
        );
        assert!(lost[0].time_unix_ns > 0);
        // Events frames hold whole records, at most `frame_records` of them.
        for f in &back.frames {
            if let Frame::Events(e) = f {
                assert!((1..=2).contains(&e.len()));
            }
        }
    }

    /// Cut at every byte: never an event that was not written, exactly the events of the frames
    /// wholly before the cut, and the damage named at the first frame not whole.
    #[test]
    fn a_recording_cut_anywhere_yields_exactly_its_intact_prefix() {
        let (data, written) = recording(OPS, 2);
        let bounds = boundaries(&data);
        for cut in 0..data.len() {
            let back = read(&data[..cut]).unwrap_or_else(|e| panic!("cut {cut}: {e:#}"));
            // The last frame wholly before the cut (inside the magic: none).
            let (start, frame, n) = match bounds.iter().rposition(|(end, _)| *end as usize <= cut) {
                Some(i) => (bounds[i].0, i as u64 + 1, bounds[i].1),
                None => (cut as u64, 1, 0),
            };
            assert_eq!(back.events, written[..n], "cut at {cut}");
            let d = back
                .damage
                .unwrap_or_else(|| panic!("cut at {cut}: not reported"));
            assert_eq!(
                (d.offset, d.frame, d.events),
                (start, frame, n as u64),
                "cut at {cut}: {d}"
            );
        }
        assert!(read(&data).unwrap().damage.is_none());
    }

    /// A bit flipped anywhere (a frame's type, length, checksum or payload) is detected; what
    /// comes before it is shown, nothing else.
    #[test]
    fn a_flipped_bit_anywhere_is_detected() {
        let (data, written) = recording(OPS, 2);
        let bounds = boundaries(&data);
        for bit in 0..data.len() * 8 {
            let mut bad = data.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let Ok(back) = read(&bad) else {
                assert!(bit / 8 < MAGIC.len(), "bit {bit}: an error after the magic");
                continue;
            };
            let d = back
                .damage
                .unwrap_or_else(|| panic!("bit {bit}: not detected"));
            // Damaged in the frame holding the bit: the frames before it are shown, whole.
            let (start, n) = *bounds
                .iter()
                .rev()
                .find(|(end, _)| *end as usize <= bit / 8)
                .unwrap();
            assert_eq!(d.offset, start, "bit {bit}: {d}");
            assert_eq!(back.events, written[..n], "bit {bit}");
        }
    }

    /// A frame whose checksums hold but whose length is not one we write (not whole records,
    /// too large, the wrong size for its kind) ends the read there.
    #[test]
    fn lengths_are_bounded_even_with_good_checksums() {
        let (mut data, _) = recording(&[Step::Context], 2);
        // Drop the end frame; append a crafted frame.
        data.truncate(data.len() - HEADER - END_LEN as usize);
        let ok = read(&data).unwrap();
        assert!(ok.damage.unwrap().what.contains("without its end frame"));
        let cases: Vec<(u8, Vec<u8>)> = vec![
            (EVENTS, vec![0u8; RECORD + 1]),
            (EVENTS, vec![0u8; RECORD - 1]),
            (EVENTS, Vec::new()),
            (LOST, vec![1; LOST_LEN as usize + 1]),
            // Counts that do not grow.
            (LOST, vec![0; LOST_LEN as usize]),
            (END, vec![0u8; END_LEN as usize - 1]),
            (b'X', vec![0u8; 8]),
        ];
        for (tag, payload) in cases {
            let mut bad = data.clone();
            frame(&mut bad, tag, &payload).unwrap();
            let back = read(&bad).unwrap();
            let d = back.damage.expect("detected");
            assert_eq!(d.offset as usize, data.len(), "{d}");
            assert!(back.events.is_empty());
        }
        // A length beyond the maximum, with a header checksum that holds: refused before
        // anything is read or allocated.
        let mut bad = data.clone();
        let mut head = [0u8; HEADER];
        head[0] = EVENTS;
        head[1..5].copy_from_slice(&(MAX_EVENTS + RECORD as u32).to_le_bytes());
        let c = crc32c(&head[..9]);
        head[9..].copy_from_slice(&c.to_le_bytes());
        bad.extend_from_slice(&head);
        let d = read(&bad).unwrap().damage.unwrap();
        assert!(d.what.contains("not a length"), "{d}");
        // An events frame missing from the middle: the end frame's count says so.
        let (data, _) = recording(&[Step::Context, Step::Records(4)], 2);
        let second = HEADER + 2 * RECORD;
        let ends: Vec<u64> = boundaries(&data).iter().map(|b| b.0).collect();
        let mut cut = data[..ends[2] as usize].to_vec();
        cut.extend_from_slice(&data[ends[2] as usize + second..]);
        let back = read(&cut).unwrap();
        assert_eq!(back.events.len(), 2);
        assert!(back.damage.unwrap().what.contains("end frame counts"));
    }

    #[test]
    fn other_files_are_errors() {
        assert!(read(b"FWMTREC4\nwhatever").is_err());
        assert!(read(b"GIF89a, not a recording").is_err());
        // Cut inside the magic: a damaged (empty) recording.
        let d = read(&MAGIC[..4]).unwrap().damage.unwrap();
        assert_eq!((d.offset, d.frame, d.events), (4, 1, 0));
        assert!(read(b"").unwrap().damage.is_some());
    }

    fn op() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Context),
            (0..12u64).prop_map(Step::Records),
            (0..1000u64, 0..3u64, 0..3u64).prop_map(|(a, b, c)| Step::Lost(a, b, c)),
        ]
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]

        /// Any recording, cut anywhere and with bits flipped anywhere: the events shown are a
        /// prefix of those written; all of them, without a warning, only when nothing was done
        /// to it.
        #[test]
        fn damage_never_invents_events(
            ops in proptest::collection::vec(op(), 0..12),
            frame_records in 1..6usize,
            cut in any::<proptest::sample::Index>(),
            flips in proptest::collection::vec(any::<proptest::sample::Index>(), 0..3),
        ) {
            let mut ops = ops;
            ops.insert(0, Step::Context);
            let (data, written) = recording(&ops, frame_records);
            let whole = read(&data).unwrap();
            prop_assert!(whole.damage.is_none());
            prop_assert_eq!(&whole.events, &written);
            let mut bad = data[..cut.index(data.len() + 1)].to_vec();
            let len = bad.len();
            for f in &flips {
                if len > 0 {
                    bad[f.index(len)] ^= 1 << (f.index(len) % 8);
                }
            }
            if let Ok(back) = read(&bad) {
                prop_assert!(back.events.len() <= written.len());
                prop_assert_eq!(&back.events[..], &written[..back.events.len()]);
                if bad != data {
                    prop_assert!(back.damage.is_some());
                }
            }
        }

        #[test]
        fn any_bytes_are_an_error_or_frames(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut data = MAGIC.to_vec();
            data.extend(tail);
            let _ = read(&data);
            let _ = read(&data[MAGIC.len()..]);
        }
    }
}
