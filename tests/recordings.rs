//! Recordings that never lie: real transitions recorded from a throwaway lab (`trace --record`),
//! then cut short, damaged or shown onto themselves. `show` shows exactly the intact frames,
//! says once where the damage is (byte offset, frame) and exits 1; it never invents an event;
//! it refuses to write its output over the recording (exit 2, the file untouched).

use std::{path::Path, time::Duration};

use fwmark_trace_tests::*;
use serde_json::Value;

const PORT: u16 = 9981;
const RULES: &str = "table inet rec {\n chain out {\n type route hook output priority mangle; policy accept;\n udp dport 9981 meta mark set 0x70\n }\n}\n";
/// The frame header: tag, length, payload checksum, header checksum.
const HEADER: usize = 13;
const MAGIC: &[u8] = b"FWMTREC5\n";

/// A frame of a recording: where it starts, its tag and payload length.
#[derive(Clone, Copy, Debug)]
struct Frame {
    offset: usize,
    tag: u8,
    len: usize,
}

/// The frames of an intact recording (walked by their headers).
fn frames(data: &[u8]) -> Vec<Frame> {
    assert!(data.starts_with(MAGIC), "not a version 5 recording");
    let mut out = Vec::new();
    let mut at = MAGIC.len();
    while at < data.len() {
        let len = u32::from_le_bytes(data[at + 1..at + 5].try_into().unwrap()) as usize;
        out.push(Frame {
            offset: at,
            tag: data[at],
            len,
        });
        at += HEADER + len;
    }
    assert_eq!(at, data.len(), "frames end with the file");
    assert_eq!(out.last().map(|f| f.tag), Some(b'Z'), "an end frame last");
    out
}

/// `fwmark-trace show ARGS`: exit code, its JSON records (schema-checked), stderr.
fn show(args: &[&str]) -> (i32, Vec<Value>, String) {
    let (code, out, err) = run(&[&["show"][..], args].concat());
    (code, parse_lines(&out), err)
}

/// The event records (not the summary, not `lost` records).
fn events(records: &[Value]) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["kind"] != "summary" && r["kind"] != "lost")
        .cloned()
        .collect()
}

fn warnings(stderr: &str) -> Vec<&str> {
    stderr.lines().filter(|l| l.contains("warning:")).collect()
}

/// A recording of real transitions: `packets` UDP datagrams marked by an nft rule in a
/// throwaway lab. Returns the file and the records `show --json` prints for it.
fn record(tag: &str, packets: usize) -> (Scratch, Vec<Value>) {
    let lab = Lab::new(tag).expect("lab");
    lab::nft(&lab.a, RULES).expect("nft");
    let rec = Scratch::file(tag, "rec");
    let rec_s = rec.0.display().to_string();
    let d = Daemon::start(&["--netns", &lab.a, "--record", &rec_s]);
    send_udp_burst(&lab.a, lab::ADDR_B, PORT, packets);
    let live = d.stop();
    drop(lab);
    let (code, shown, err) = show(&[&rec_s, "--json"]);
    assert_eq!(code, 0, "{err}");
    assert!(warnings(&err).is_empty(), "{err}");
    // The recording's summary counts what the live run counted.
    let (l, s) = (live.last().unwrap(), shown.last().unwrap());
    assert_eq!(
        (&l["total_events"], &l["lost"]),
        (&s["total_events"], &s["lost"])
    );
    (rec, shown)
}

/// Records of `Event` size in the events frames among `frames`.
fn records_in(frames: &[Frame], record_size: usize) -> usize {
    frames
        .iter()
        .filter(|f| f.tag == b'E')
        .map(|f| f.len / record_size)
        .sum()
}

/// The size of one record: the events frames' bytes over the events shown.
fn record_size(frames: &[Frame], shown: usize) -> usize {
    let bytes: usize = frames.iter().filter(|f| f.tag == b'E').map(|f| f.len).sum();
    assert!(
        shown > 0 && bytes.is_multiple_of(shown),
        "{bytes} bytes, {shown} events"
    );
    bytes / shown
}

fn write(path: &Path, data: &[u8]) {
    std::fs::write(path, data).expect("write the damaged copy");
}

/// Cut mid-frame (a torn tail, as kill -9 or a full disk leaves): exactly the events of the
/// frames before the cut, one warning naming the offset and the frame, exit 1. Then with a
/// frame's length field damaged: nothing invented, exit 1.
#[test]
fn a_torn_or_damaged_recording_shows_exactly_its_intact_prefix() {
    require_root();
    // Enough records for more than one events frame (64 KiB each).
    let (rec, shown) = record("rect", 1000);
    let all = events(&shown);
    let marked = marked(&all, PORT, "0x70");
    assert!(marked.len() >= 1000, "{} transitions", marked.len());
    let data = std::fs::read(&rec.0).unwrap();
    let fr = frames(&data);
    let size = record_size(&fr, all.len());
    let ev_frames: Vec<usize> = (0..fr.len()).filter(|&i| fr[i].tag == b'E').collect();
    assert!(ev_frames.len() >= 2, "{fr:?}");
    let copy = Scratch::file("rect-copy", "rec");
    let copy_s = copy.0.display().to_string();

    // (a) Cut in the middle of the second events frame.
    let victim = ev_frames[1];
    let f = fr[victim];
    write(&copy.0, &data[..f.offset + HEADER + f.len / 2]);
    let (code, records, err) = show(&[&copy_s, "--json"]);
    assert_eq!(code, 1, "{err}");
    let prefix = records_in(&fr[..victim], size);
    assert!(prefix > 0);
    assert_eq!(events(&records), all[..prefix], "exactly the intact prefix");
    let w = warnings(&err);
    assert_eq!(w.len(), 1, "{err}");
    let at = format!("byte {} (frame {})", f.offset, victim + 1);
    assert!(w[0].contains(&at), "{err}");
    assert!(w[0].contains(&format!("{prefix} events")), "{err}");
    // The human output says the same and exits the same.
    let (code, text, err) = run(&["show", &copy_s]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(warnings(&err).len(), 1, "{err}");
    assert_eq!(text.lines().filter(|l| l.contains(" pkt ")).count(), prefix);

    // Cut right after a frame header, and at the last byte: never an invented event.
    for cut in [f.offset + HEADER, data.len() - 1] {
        write(&copy.0, &data[..cut]);
        let (code, records, err) = show(&[&copy_s, "--json"]);
        assert_eq!(code, 1, "cut at {cut}: {err}");
        let got = events(&records);
        assert_eq!(got, all[..got.len()], "cut at {cut}");
        assert_eq!(warnings(&err).len(), 1, "{err}");
    }

    // (b) The second events frame's length field damaged, one bit or to a huge value.
    let len_at = f.offset + 1;
    for damage in [0x0000_0100u32, 0x0007_1c40] {
        let mut bad = data.clone();
        let len = u32::from_le_bytes(bad[len_at..len_at + 4].try_into().unwrap());
        bad[len_at..len_at + 4].copy_from_slice(&(len ^ damage).to_le_bytes());
        write(&copy.0, &bad);
        let (code, records, err) = show(&[&copy_s, "--json"]);
        assert_eq!(code, 1, "{err}");
        assert_eq!(events(&records), all[..prefix], "length ^ {damage:#x}");
        let w = warnings(&err);
        assert_eq!(w.len(), 1, "{err}");
        assert!(w[0].contains(&at), "{err}");
    }
    // A bit flipped in a record of the first events frame: that frame and everything after
    // it is withheld, not shown altered.
    let first = fr[ev_frames[0]];
    let mut bad = data.clone();
    bad[first.offset + HEADER + size + 20] ^= 0x10;
    write(&copy.0, &bad);
    let (code, records, err) = show(&[&copy_s, "--json"]);
    assert_eq!(code, 1, "{err}");
    assert!(events(&records).is_empty(), "{records:#?}");
    assert!(err.contains("checksum"), "{err}");
}

/// `show X --output X` (also through a symlink or a hard link) refuses before touching
/// anything: one error, exit 2, the recording unchanged.
#[test]
fn show_refuses_to_write_over_its_recording() {
    require_root();
    let (rec, _) = record("recx", 5);
    let before = std::fs::read(&rec.0).unwrap();
    let dir = Scratch::dir("recx-links");
    let (sym, hard) = (dir.0.join("sym.jsonl"), dir.0.join("hard.jsonl"));
    std::os::unix::fs::symlink(&rec.0, &sym).unwrap();
    std::fs::hard_link(&rec.0, &hard).unwrap();
    let rec_s = rec.0.display().to_string();
    for out in [rec.0.clone(), sym, hard] {
        let out_s = out.display().to_string();
        for json in [true, false] {
            let mut args = vec!["show", &rec_s, "--output", &out_s];
            if json {
                args.push("--json");
            }
            let (code, stdout, err) = run(&args);
            assert_eq!(code, 2, "{out_s}: {err}");
            assert!(stdout.is_empty(), "{stdout}");
            let errors: Vec<&str> = err.lines().filter(|l| l.contains("error:")).collect();
            assert_eq!(errors.len(), 1, "{err}");
            assert!(errors[0].contains("is the recording"), "{err}");
            assert_eq!(std::fs::read(&rec.0).unwrap(), before, "{out_s}");
        }
    }
    // Another file is fine.
    let other = dir.0.join("other.jsonl");
    let (code, _, err) = run(&[
        "show",
        &rec_s,
        "--json",
        "--output",
        &other.display().to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!read_jsonl(&other).is_empty());
}

/// Killed with SIGKILL while recording: `show` exits 1 with one warning and shows nothing that
/// was not recorded (before, a frame cut after its header came out as all-zero events).
#[test]
fn a_recording_of_a_killed_daemon_is_reported_cut_short() {
    require_root();
    let lab = Lab::new("reck").expect("lab");
    lab::nft(&lab.a, RULES).expect("nft");
    let rec = Scratch::file("reck", "rec");
    let rec_s = rec.0.display().to_string();
    let d = Daemon::start(&["--netns", &lab.a, "--record", &rec_s]);
    send_udp_burst(&lab.a, lab::ADDR_B, PORT, 3000);
    d.kill();
    let (code, records, err) = show(&[&rec_s, "--json"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(warnings(&err).len(), 1, "{err}");
    assert!(err.contains("cut short or damaged at byte"), "{err}");
    for e in events(&records) {
        assert_eq!(e["kind"], "transition", "{e}");
        assert_eq!(e["tuple"]["dport"], PORT, "{e}");
        assert_eq!(e["mark"]["new"], "0x70", "{e}");
    }
}

/// Lost events, per reason, are in the recording: `show` reports them as `lost` records (with
/// their reasons) and in its summary, as the live run counted them.
#[test]
fn recordings_carry_lost_counts_and_reasons() {
    require_root();
    // The smallest ring (one page) and a burst: the kernel loses records.
    let lab = Lab::new("recl").expect("lab");
    lab::nft(&lab.a, RULES).expect("nft");
    let rec = Scratch::file("recl", "rec");
    let rec_s = rec.0.display().to_string();
    let mut d = Daemon::start(&["--netns", &lab.a, "--record", &rec_s, "--ring-size", "4096"]);
    send_udp_burst(&lab.a, lab::ADDR_B, PORT, 20000);
    // The live output reports the loss at its next tick, the recording with it.
    d.wait_for(scaled(Duration::from_secs(5)), |records| {
        records.iter().any(|r| r["kind"] == "lost")
    });
    let live = d.stop();
    drop(lab);
    let (code, shown, err) = show(&[&rec_s, "--json"]);
    assert_eq!(code, 0, "{err}");
    let summary = live.last().expect("a summary");
    let lost: Vec<&Value> = shown.iter().filter(|r| r["kind"] == "lost").collect();
    assert_eq!(shown.last().unwrap()["lost"], summary["lost"], "{summary}");
    let total = summary["lost"].as_u64().unwrap();
    let sum: u64 = lost.iter().map(|l| l["lost"].as_u64().unwrap()).sum();
    assert_eq!(sum, total, "{lost:#?}");
    if total == 0 {
        eprintln!("the kernel lost nothing this time: the lost records are not exercised");
        return;
    }
    let last = lost.last().unwrap();
    assert_eq!(last["total_lost"], total);
    let r = &last["reasons"];
    let by_reason: u64 = ["ring_full", "count_map_full", "evicted"]
        .iter()
        .map(|k| r[k].as_u64().expect("a count per reason"))
        .sum();
    assert_eq!(by_reason, total, "{last}");
    assert!(r["ring_full"].as_u64().unwrap() > 0, "{last}");
    // Every loss the live run reported is in the recording, with the same reasons.
    for l in live.iter().filter(|r| r["kind"] == "lost") {
        assert!(
            lost.iter()
                .any(|s| s["total_lost"] == l["total_lost"] && s["reasons"] == l["reasons"]),
            "{l} not in {lost:#?}"
        );
    }
}
