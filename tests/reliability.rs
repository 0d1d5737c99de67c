//! Faults a node throws at a tracer: kill -9 and restart, two daemons at once, the traced
//! namespace deleted mid-run, output that stops accepting data, bad input of every kind, and a
//! short soak with traffic and interface churn whose RSS must stay flat.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use fwmark_trace_tests::*;
use serde_json::Value;

const RULES: &str = "table inet t {\n chain out {\n type route hook output priority mangle; policy accept;\n udp dport 9970 meta mark set 0x70\n }\n}\n";

fn lab() -> Lab {
    let lab = Lab::new("rel").expect("lab");
    lab::nft(&lab.a, RULES).expect("nft");
    lab
}

fn saw_transition(events: &[serde_json::Value]) -> bool {
    !marked(events, 9970, "0x70").is_empty()
}

#[test]
fn sigkill_then_restart_and_two_daemons_at_once() {
    let lab = lab();
    // Killed: nothing of it left (`kill` checks).
    Daemon::start(&["--netns", &lab.a]).kill();
    // Restart at once: the new daemon attaches cleanly and traces.
    let d1 = Daemon::start(&["--netns", &lab.a]);
    // A second daemon on the same hooks: the kernel refuses two BPF hooks at one priority, so it
    // takes the next free ones; both must see the change.
    let d2 = Daemon::start(&["--netns", &lab.a]);
    send_udp(&lab.a, lab::ADDR_B, 9970, 2, None);
    let (e1, e2) = (d1.stop(), d2.stop());
    assert!(saw_transition(&e1), "first daemon missed the transition");
    assert!(saw_transition(&e2), "second daemon missed the transition");
}

#[test]
fn deleted_netns_stops_the_run_cleanly() {
    let lab = lab();
    let mut d = Daemon::start(&["--netns", &lab.a]);
    lab::run("ip", &["netns", "del", &lab.a]).expect("delete netns");
    d.wait_for_stderr("was deleted; stopping", Duration::from_secs(10));
    let status = d.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
}

fn one_error_line(stderr: &str, expect: &str) {
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(errors[0].contains(expect), "{stderr}");
}

/// `trace --json --full-path` in `lab.a` with `extra` flags, its stdout read up to its ready
/// record (on stdout, after the plan): the child, the rest of its stdout, the record.
fn spawn_until_ready(
    lab: &Lab,
    extra: &[&str],
) -> (
    std::process::Child,
    std::io::Lines<BufReader<std::process::ChildStdout>>,
    Value,
) {
    let mut child = Command::new(bin())
        .args(["trace", "--json", "--full-path", "--netns", &lab.a])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = lines
        .by_ref()
        .map_while(Result::ok)
        .map(|l| serde_json::from_str::<Value>(&l).expect("a JSON record"))
        .find(|r| r["kind"] == "ready")
        .expect("a ready record");
    (child, lines, ready)
}

#[test]
fn stdout_closed_early_is_a_clear_error() {
    require_root();
    let lab = lab();
    let (child, mut lines, ready) = spawn_until_ready(&lab, &[]);
    // Like `| head -1`: read one event, then close the pipe while events keep coming.
    let sender = {
        let ns = lab.a.clone();
        std::thread::spawn(move || {
            for _ in 0..50 {
                send_udp(&ns, lab::ADDR_B, 9970, 5, None);
            }
        })
    };
    assert!(lines.next().is_some(), "no event before closing");
    drop(lines);
    let out = child.wait_with_output().unwrap();
    sender.join().unwrap();
    assert!(!out.status.success());
    one_error_line(&String::from_utf8_lossy(&out.stderr), "Broken pipe");
    assert_released(&ready, Some(&lab.a));
}

/// A reader that stops reading (stdout a pipe nobody drains): the daemon drops what its
/// output queue cannot hold and counts it as lost, its metrics go on answering, and SIGTERM
/// still ends it within a second, everything detached. Before the output had its own thread
/// the daemon blocked in `write` and never served the signal.
#[test]
fn stalled_stdout_reader_then_sigterm() {
    require_root();
    let lab = lab();
    let (mut child, lines, ready) = spawn_until_ready(&lab, &["--metrics", "127.0.0.1:0"]);
    let stderr = line_reader(child.stderr.take().unwrap());
    let addr = ready["metrics"]
        .as_str()
        .expect("the metrics address")
        .to_owned();
    // From here on nobody reads stdout; the pipe stays open (`_stalled`).
    let _stalled = lines;
    let overflowed = wait_until(scaled(Duration::from_secs(30)), || {
        send_udp_burst(&lab.a, lab::ADDR_B, 9970, 2000);
        sample(&scrape(&addr), "fwmark_trace_lost_events_total") > 0
    });
    let signalled = Instant::now();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_until(Duration::from_secs(10), || {
        child.try_wait().expect("try_wait").is_some()
    });
    let took = signalled.elapsed();
    if !status {
        let _ = child.kill();
    }
    let status = child.wait().expect("wait");
    let stderr: Vec<String> = stderr.iter().collect();
    assert!(
        overflowed,
        "no records counted lost while stdout was stalled:\n{}",
        stderr.join("\n")
    );
    assert!(
        status.success() && took < Duration::from_secs(3),
        "SIGTERM with a stalled stdout: {status} after {took:?}\n{}",
        stderr.join("\n")
    );
    let lost = stderr.iter().find_map(|l| {
        l.split("; lost ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    });
    assert!(
        lost.is_some_and(|n| n > 0),
        "the summary does not count the dropped records:\n{}",
        stderr.join("\n")
    );
    assert_released(&ready, Some(&lab.a));
}

/// Names from the node reach terminals escaped: an interface named with an escape sequence
/// (ESC [2J clears the screen; the kernel takes any byte but '/', ':' and white space) shows
/// as `\x1b[2J` in the start-up lines and the events, never as the raw byte.
#[test]
fn names_with_control_characters_are_escaped() {
    require_root();
    let lab = lab();
    let name = "e\x1b[2Jx";
    let made = lab::run(
        "ip",
        &[
            "-n", &lab.a, "link", "add", name, "type", "veth", "peer", "name", "esc-peer",
        ],
    );
    made.expect("an interface named with ESC");
    lab::run("ip", &["-n", &lab.a, "link", "set", name, "up"]).expect("up");
    lab::run("ip", &["-n", &lab.a, "link", "set", "esc-peer", "up"]).expect("up");
    let (code, stdout, stderr) = run(&[
        "trace",
        "--netns",
        &lab.a,
        "--full-path",
        "--duration",
        "2s",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !stdout.contains('\x1b') && !stderr.contains('\x1b'),
        "a raw ESC reached the terminal:\n{stdout}\n{stderr}"
    );
    assert!(stderr.contains("e\\x1b[2Jx"), "{stderr}");
}

/// A tmpfs too small for the events, unmounted even when the test fails.
struct TinyFs(std::path::PathBuf);

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn full_filesystem_is_a_clear_error() {
    require_root();
    let lab = lab();
    let dir = std::env::temp_dir().join(format!("fwmark-trace-tinyfs-{}", unique()));
    std::fs::create_dir_all(&dir).unwrap();
    let fs = TinyFs(dir.clone());
    lab::run(
        "mount",
        &[
            "-t",
            "tmpfs",
            "-o",
            "size=16k",
            "tmpfs",
            dir.to_str().unwrap(),
        ],
    )
    .expect("mount tmpfs");
    let mut d = Daemon::start_writing(
        dir.join("events.jsonl"),
        &["--full-path", "--netns", &lab.a],
    );
    // Events until the file system is full and the daemon has given up.
    wait_until(scaled(Duration::from_secs(20)), || {
        send_udp_burst(&lab.a, lab::ADDR_B, 9970, 500);
        d.try_wait().is_some()
    });
    let status = d.wait_exit(Duration::from_secs(10));
    assert!(!status.success(), "should fail on ENOSPC");
    one_error_line(&d.stderr_lines.join("\n"), "No space left on device");
    drop(d);
    drop(fs);
}

#[test]
fn bad_input_gets_one_clear_error() {
    require_root();
    let cases: [(&[&str], &str); 8] = [
        (&["trace", "--duration", "soon"], "--duration"),
        (&["trace", "--count", "many"], "--count"),
        (&["trace", "--mark", "0x100/0xf"], "outside its mask"),
        (&["trace", "--require", "warp-drive"], "--require"),
        (
            &["trace", "--registry", "/nonexistent/r.toml"],
            "cannot read",
        ),
        (&["trace", "--owner", "x"], "NAME=MASK"),
        (&["trace", "--require", "fentry"], "lacks fentry"),
        (&["trace", "--iface"], "--iface"),
    ];
    for (args, expect) in cases {
        // Fails, and was never ready.
        let (_, err) = trace_fails(args);
        one_error_line(&err, expect);
    }
    // Not root, no capabilities: a clear refusal naming them (dropping to nobody with setpriv).
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            bin(),
            "trace",
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    one_error_line(&String::from_utf8_lossy(&out.stderr), "needs CAP_BPF");
}

#[test]
fn short_soak_keeps_rss_flat() {
    require_root();
    let (code, text, err) = run(&["soak", "--seconds", "30"]);
    assert_eq!(code, 0, "{text}\n{err}");
    assert!(text.contains("rss flat: yes"), "{text}");
}
