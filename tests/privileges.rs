//! Least privilege: the daemon as nobody (uid 65534) holding only the capabilities it needs
//! (setpriv, with no_new_privs as the systemd unit sets it), what it says when one is missing,
//! and the systemd unit.
use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use fwmark_trace_tests::*;
use serde_json::Value;

const PORT: u16 = 9971;
const RULES: &str = "table inet t {\n chain out {\n type route hook output priority mangle; policy accept;\n udp dport 9971 meta mark set 0x71\n }\n}\n";

/// What `trace` cannot run without.
const REQUIRED: &str = "+bpf,+perfmon,+net_admin";
/// Everything `trace` uses but CAP_SYS_PTRACE.
const ALL_BUT_PTRACE: &str = "+bpf,+perfmon,+net_admin,+sys_admin,+syslog,+dac_read_search";

const NOBODY: u32 = 65534;

fn lab() -> Lab {
    let lab = Lab::new("priv").expect("lab");
    lab::nft(&lab.a, RULES).expect("nft");
    lab
}

/// `fwmark-trace ARGS` as nobody holding exactly `caps` (setpriv's syntax, e.g. "+bpf"),
/// inside namespace `ns` when given (entered by `ip netns exec`, as root: the daemon's own
/// setns would need CAP_SYS_ADMIN).
fn as_nobody(ns: Option<&str>, caps: &str, args: &[&str]) -> Command {
    let mut cmd = match ns {
        Some(ns) => {
            let mut ip = Command::new("ip");
            ip.args(["netns", "exec", ns, "setpriv"]);
            ip
        }
        None => Command::new("setpriv"),
    };
    let set = format!("-all,{caps}");
    cmd.arg(format!("--reuid={NOBODY}"))
        .arg(format!("--regid={NOBODY}"))
        .args(["--clear-groups", "--nnp"])
        .arg(format!("--inh-caps={set}"))
        .arg(format!("--ambient-caps={set}"))
        .arg(format!("--bounding-set={set}"))
        .arg(bin())
        .args(args);
    cmd
}

/// A directory nobody may write its output file into, removed on drop.
fn output_dir() -> (Scratch, PathBuf) {
    let dir = Scratch::dir("priv");
    std::os::unix::fs::chown(&dir.0, Some(NOBODY), Some(NOBODY)).expect("chown");
    let file = dir.0.join("events.jsonl");
    (dir, file)
}

/// A daemon running as nobody, killed on drop (when an assertion fails first).
struct Nobody {
    child: Child,
    output: PathBuf,
    _dir: Scratch,
}

impl Nobody {
    /// `trace --json --output FILE ARGS` in `ns` with `caps`; waits for its ready record.
    fn start(ns: &str, caps: &str, args: &[&str]) -> (Nobody, Value) {
        let (dir, output) = output_dir();
        let out = output.to_str().expect("a UTF-8 path");
        let all = [&["trace", "--json", "--output", out], args].concat();
        let child = as_nobody(Some(ns), caps, &all)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn setpriv");
        let mut d = Nobody {
            child,
            output,
            _dir: dir,
        };
        let ready = |d: &Nobody| d.records().into_iter().find(|r| r["kind"] == "ready");
        // Twice the usual wait: loading is CPU-bound and these daemons start side by side.
        wait_until(ready_wait() * 2, || {
            ready(&d).is_some() || d.child.try_wait().ok().flatten().is_some()
        });
        let Some(record) = ready(&d) else {
            let _ = d.child.kill();
            panic!("no ready record as nobody: {}", d.stderr());
        };
        (d, record)
    }

    fn records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        parse_lines(complete)
    }

    /// SIGINT: a clean exit. Its stderr.
    fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let exited = wait_until(scaled(Duration::from_secs(10)), || {
            self.child.try_wait().ok().flatten().is_some()
        });
        let stderr = self.stderr();
        assert!(exited, "no exit after SIGINT: {stderr}");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "{status}: {stderr}");
        stderr
    }

    /// Its stderr, once it has exited (killed otherwise).
    fn stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut text = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut text);
        }
        text
    }
}

impl Drop for Nobody {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn nobody_with_the_required_capabilities_traces() {
    require_root();
    let lab = lab();
    let (d, ready) = Nobody::start(&lab.a, REQUIRED, &[]);
    send_udp(&lab.a, lab::ADDR_B, PORT, 3, None);
    let seen = wait_until(scaled(Duration::from_secs(20)), || {
        !marked(&d.records(), PORT, "0x71").is_empty()
    });
    let stderr = d.stop();
    assert!(seen, "no transition to 0x71 traced as nobody: {stderr}");
    // Degraded, and said so: without CAP_SYS_ADMIN other programs cannot be listed.
    assert!(
        stderr.contains("warning: without CAP_SYS_ADMIN other BPF programs"),
        "{stderr}"
    );
    assert_released(&ready, Some(&lab.a));
}

/// One error line naming `cap`, exit 2, never ready, nothing of ours in `ns`.
fn refused(out: Output, output_file: &std::path::Path, cap: &str, ns: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("fwmark-trace: error: fwmark-trace trace needs ")
            && lines[0].contains(cap),
        "{stderr}"
    );
    let records = std::fs::read_to_string(output_file).unwrap_or_default();
    assert!(!records.contains("\"ready\""), "{records}");
    assert_nothing_left(ns, None);
}

#[test]
fn a_missing_required_capability_is_one_error_and_nothing_attached() {
    require_root();
    let lab = lab();
    let (_dir, output) = output_dir();
    let out = output.to_str().expect("a UTF-8 path");
    let trace = ["trace", "--json", "--output", out];
    let no_bpf = as_nobody(Some(&lab.a), "+perfmon,+net_admin", &trace)
        .output()
        .expect("run setpriv");
    refused(
        no_bpf,
        &output,
        "CAP_BPF (to load its eBPF programs)",
        &lab.a,
    );
    // --netns enters the namespace itself: setns(2) needs CAP_SYS_ADMIN.
    let enter = [&trace[..], &["--netns", &lab.a]].concat();
    let no_setns = as_nobody(None, REQUIRED, &enter)
        .output()
        .expect("run setpriv");
    refused(no_setns, &output, "CAP_SYS_ADMIN", &lab.a);
}

#[test]
fn a_missing_optional_capability_is_one_warning_and_the_run_goes_on() {
    require_root();
    let lab = lab();
    let (d, ready) = Nobody::start(&lab.a, ALL_BUT_PTRACE, &["--log-format", "json"]);
    let stderr = d.stop();
    let warnings: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .filter(|v: &Value| {
            v["level"] == "warn"
                && v["message"]
                    .as_str()
                    .unwrap_or("")
                    .starts_with("without CAP_")
        })
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    let message = warnings[0]["message"].as_str().unwrap_or_default();
    assert_eq!(
        message,
        "without CAP_SYS_PTRACE the processes of other users holding marked sockets are not named"
    );
    assert!(warnings[0]["time"].is_string(), "{stderr}");
    assert_released(&ready, Some(&lab.a));
}

#[test]
fn the_systemd_unit_verifies() {
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/systemd/fwmark-trace.service");
    let text = std::fs::read_to_string(&unit).expect("read the unit");
    for cap in ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("AmbientCapabilities=") && l.contains(cap)),
            "{cap} not in AmbientCapabilities="
        );
    }
    // systemd-analyze checks that ExecStart's program exists: the unit names where the package
    // installs it, the test the binary under test.
    let dir = Scratch::dir("unit");
    let copy = dir.0.join("fwmark-trace.service");
    std::fs::write(&copy, text.replace("/usr/bin/fwmark-trace", bin())).expect("write");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("systemd-analyze (package systemd: cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
