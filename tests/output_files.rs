//! `--output FILE` as an operator and a log shipper meet it: a symbolic link refused, an
//! existing file left alone by a run that fails, files only their owner reads, `--append`,
//! size rotation, reopening on SIGHUP, a failed write that still gives the summary; and bad
//! input that once panicked (a non-ASCII owner name, a duration of 292 billion years) is one
//! clear error, exit 2, with nothing attached.
use std::{
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use fwmark_trace_tests::*;
use serde_json::Value;

const PORT: u16 = 9971;
const RULES: &str = "table inet t {\n chain out {\n type route hook output priority mangle; policy accept;\n udp dport 9971 meta mark set 0x71\n }\n}\n";

fn lab() -> Lab {
    let lab = Lab::new("out").expect("lab");
    lab::nft(&lab.a, RULES).expect("nft");
    lab
}

fn one_error_line(stderr: &str, expect: &str) {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(expect), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Only the owner may read or write it (the umask may take more away).
fn assert_private(path: &Path) {
    let mode = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{} has mode {mode:o}", path.display());
}

fn numbered(path: &Path, n: u32) -> PathBuf {
    PathBuf::from(format!("{}.{n}", path.display()))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// The records of a JSON output (or rotated) file, checked against the schema.
fn records(path: &Path) -> Vec<Value> {
    parse_lines(&read(path))
}

fn transitions(records: &[Value]) -> usize {
    records
        .iter()
        .filter(|r| r["kind"] == "transition" && r["tuple"]["dport"] == PORT)
        .count()
}

#[test]
fn a_symlinked_output_is_refused_and_its_target_untouched() {
    require_root();
    let lab = lab();
    let dir = Scratch::dir("symlink");
    let target = dir.0.join("precious");
    std::fs::write(&target, "yesterday's events\n").unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).unwrap();
    let link = dir.0.join("events.jsonl");
    symlink(&target, &link).unwrap();
    let (code, _, err) = run(&[
        "trace",
        "--json",
        "--output",
        link.to_str().unwrap(),
        "--netns",
        &lab.a,
    ]);
    assert_eq!(code, 2, "{err}");
    one_error_line(&err, "is a symbolic link");
    assert_eq!(read(&target), "yesterday's events\n");
    let mode = std::fs::metadata(&target).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o640, "target's mode changed");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    released::assert_nothing_left(&lab.a, None);
}

#[test]
fn a_run_that_fails_leaves_an_existing_output_file_intact() {
    require_root();
    let lab = lab();
    let dir = Scratch::dir("intact");
    let file = dir.0.join("events.jsonl");
    let yesterday = "{\"kind\":\"summary\",\"yesterday\":true}\n";
    let cases: [(&[&str], &str); 3] = [
        // Refused while the arguments are checked, before the file is opened.
        (&["--owners", "kube-prxy"], "unknown owner \"kube-prxy\""),
        (&["--owners", "ééx"], "unknown owner \"ééx\""),
        // Refused after the file is opened, before anything is written to it.
        (
            &["--netns", "fwmark-trace-no-such-netns"],
            "network namespace \"fwmark-trace-no-such-netns\" not found",
        ),
    ];
    for (args, expect) in cases {
        std::fs::write(&file, yesterday).unwrap();
        let mut argv = vec!["trace", "--json", "--output", file.to_str().unwrap()];
        if !args.contains(&"--netns") {
            argv.extend(["--netns", &lab.a]);
        }
        argv.extend(args);
        let (code, _, err) = run(&argv);
        assert_eq!(code, 2, "{args:?}: {err}");
        one_error_line(&err, expect);
        assert_eq!(read(&file), yesterday, "{args:?} touched the file");
    }
    released::assert_nothing_left(&lab.a, None);
}

#[test]
fn output_files_are_private_and_append_keeps_what_was_there() {
    require_root();
    let lab = lab();
    let dir = Scratch::dir("append");
    let file = dir.0.join("events.jsonl");
    // A first run makes the file: mode 0600.
    let d = Daemon::start_writing(file.clone(), &["--netns", &lab.a]);
    assert_private(&file);
    let first = read(&file);
    assert!(first.contains("\"kind\":\"ready\""), "{first}");
    // Kept by name: the daemon's harness removes its output file when it is done.
    let kept = dir.0.join("kept.jsonl");
    std::fs::hard_link(&file, &kept).unwrap();
    d.stop();
    let first = read(&kept);
    std::fs::rename(&kept, &file).unwrap();
    // A second run with --append adds its records after the first run's.
    let (code, _, err) = run(&[
        "trace",
        "--json",
        "--output",
        file.to_str().unwrap(),
        "--append",
        "--netns",
        &lab.a,
        "--duration",
        "2s",
    ]);
    assert_eq!(code, 0, "{err}");
    let both = read(&file);
    assert!(both.starts_with(&first), "the first run's records are gone");
    let second = records(&file).split_off(parse_lines(&first).len());
    let ready = second
        .iter()
        .find(|r| r["kind"] == "ready")
        .unwrap_or_else(|| panic!("no ready record from the second run: {both}"));
    assert!(second.iter().any(|r| r["kind"] == "summary"), "{both}");
    assert_released(ready, Some(lab.a.as_str()));
    // Without --append a run empties the file, once it has started.
    let (code, _, err) = run(&[
        "trace",
        "--json",
        "--output",
        file.to_str().unwrap(),
        "--netns",
        &lab.a,
        "--duration",
        "1s",
    ]);
    assert_eq!(code, 0, "{err}");
    let third = records(&file);
    assert_eq!(
        third.iter().filter(|r| r["kind"] == "ready").count(),
        1,
        "{third:?}"
    );
}

#[test]
fn rotation_at_the_size_limit_keeps_n_files() {
    require_root();
    let lab = lab();
    let dir = Scratch::dir("rotate");
    let file = dir.0.join("events.jsonl");
    let limit = 4096u64;
    // Per packet: only the marked test traffic makes events (the plan and the ready record,
    // on which the harness waits, stay in FILE until it comes).
    let mut d = Daemon::start_writing(
        file.clone(),
        &[
            "--netns",
            &lab.a,
            "--per-packet",
            "--rotate-size",
            "4K",
            "--rotate-keep",
            "2",
        ],
    );
    // Traffic until the file has been rotated twice (FILE.2 exists) and FILE.1 is full.
    let rotated = wait_until(scaled(Duration::from_secs(30)), || {
        send_udp_burst(&lab.a, lab::ADDR_B, PORT, 50);
        assert!(d.try_wait().is_none(), "the daemon exited");
        numbered(&file, 2).exists()
    });
    assert!(rotated, "no rotation: {} bytes in FILE", read(&file).len());
    // Stopped first: a rotation renames the files one after the other.
    let events = d.stop();
    assert!(events.iter().any(|r| r["kind"] == "summary"));
    let mut rotated_transitions = 0;
    for path in [numbered(&file, 1), numbered(&file, 2)] {
        assert_private(&path);
        let text = read(&path);
        // Whole records, each valid; at most the limit, unless one record alone is larger.
        assert!(text.ends_with('\n'), "{} ends mid-record", path.display());
        let recs = records(&path);
        assert!(
            text.len() as u64 <= limit || recs.len() == 1,
            "{} has {} bytes in {} records",
            path.display(),
            text.len(),
            recs.len()
        );
        rotated_transitions += transitions(&recs);
    }
    assert!(!numbered(&file, 3).exists(), "only two rotated files kept");
    assert!(rotated_transitions > 0, "the rotated files hold no events");
}

#[test]
fn sighup_reopens_the_output_file_by_name() {
    require_root();
    let lab = lab();
    let dir = Scratch::dir("sighup");
    let file = dir.0.join("events.jsonl");
    let moved = dir.0.join("events.jsonl.old");
    let mut d = Daemon::start_writing(file.clone(), &["--netns", &lab.a, "--interval", "300ms"]);
    // logrotate without copytruncate: move the file away, then SIGHUP.
    std::fs::rename(&file, &moved).unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGHUP) };
    d.wait_for_stderr("reopened output file", Duration::from_secs(10));
    assert!(file.exists(), "no new output file after SIGHUP");
    assert_private(&file);
    let got = d.wait_for(scaled(Duration::from_secs(20)), |records| {
        send_udp(&lab.a, lab::ADDR_B, PORT, 2, None);
        transitions(records) > 0
    });
    assert!(got, "no events in the reopened file");
    // The daemon still runs and stops cleanly; the moved file kept what came before.
    let events = d.stop();
    assert!(events.iter().any(|r| r["kind"] == "summary"));
    let before = records(&moved);
    assert!(before.iter().any(|r| r["kind"] == "ready"), "{before:?}");
}

#[test]
fn a_failed_write_is_one_error_after_the_summary() {
    require_root();
    let lab = lab();
    // A device that is always full, and a pipe whose reader has gone.
    let (code, _, err) = run(&[
        "trace",
        "--json",
        "--output",
        "/dev/full",
        "--netns",
        &lab.a,
    ]);
    assert_eq!(code, 2, "{err}");
    one_error_line(
        &err,
        "writing output file /dev/full: No space left on device",
    );
    assert!(err.contains("fwmark-trace: summary:"), "{err}");
    released::assert_nothing_left(&lab.a, None);

    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin())
        .args(["trace", "--json", "--netns", &lab.a])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    one_error_line(&err, "writing to stdout: Broken pipe");
    assert!(err.contains("fwmark-trace: summary:"), "{err}");
    released::assert_nothing_left(&lab.a, None);
}

#[test]
fn reports_to_a_closed_stdout_end_quietly() {
    require_root();
    for args in [
        &["registry", "list"][..],
        &["registry", "check"],
        &["man"],
        &["completions", "bash"],
        &["inventory"],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin())
            .args(args)
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        // As a SIGPIPE would end it, without a word.
        assert_eq!(out.status.code(), Some(141), "{args:?}: {err}");
        assert_eq!(err, "", "{args:?}");
    }
}

#[test]
fn non_ascii_owner_names_are_one_clear_error() {
    require_root();
    for args in [
        &["registry", "check", "ééx"][..],
        &["registry", "check", "--owners", "ééx"],
        &["registry", "show", "ééx"],
        &["registry", "list", "--owners", "é,日本"],
        &["registry", "list", "--owner", "ééx=0x1"],
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        one_error_line(&err, "");
    }
    // In a registry file's profile.
    let file = Scratch::file("profile", "toml");
    std::fs::write(&file.0, "profile = [\"ééx\"]\n").unwrap();
    let (code, _, err) = run(&["registry", "list", "--registry", file.0.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    one_error_line(&err, "unknown owner \"ééx\"");
    // And on the way to tracing: nothing attached.
    let lab = lab();
    let (code, err) = trace_fails(&["trace", "--netns", &lab.a, "--owners", "ééx"]);
    assert_eq!(code, 2, "{err}");
    one_error_line(&err, "unknown owner \"ééx\"");
}

#[test]
fn out_of_bounds_durations_and_sizes_are_usage_errors() {
    require_root();
    let lab = lab();
    let cases: [(&[&str], &str); 9] = [
        (&["--interval", "292500000000years"], "--interval"),
        (&["--count-memory", "2T"], "--count-memory"),
        (&["--interval", "1ms"], "--interval"),
        (&["--duration", "292500000000years"], "--duration"),
        (&["--stats", "100years"], "--stats"),
        (&["--count", "0"], "--count"),
        (&["--ring-size", "8G"], "--ring-size"),
        (&["--rotate-size", "1"], "--rotate-size"),
        (
            &["--rotate-size", "1M", "--rotate-keep", "0"],
            "--rotate-keep",
        ),
    ];
    for (args, expect) in cases {
        let argv = [&["trace", "--netns", lab.a.as_str()][..], args].concat();
        let (code, err) = trace_fails(&argv);
        assert_eq!(code, 2, "{args:?}: {err}");
        one_error_line(&err, expect);
    }
    for args in [
        &["why", "--port", "1", "--duration", "292500000000years"][..],
        &["demo", "--duration", "292500000000years"],
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        one_error_line(&err, "--duration");
    }
    released::assert_nothing_left(&lab.a, None);
}
