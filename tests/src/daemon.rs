//! The daemon under test: `fwmark-trace trace --json --output FILE` as a child process. It is
//! ready when its `ready` record is in the file (the record names what it attached); it stops
//! by SIGINT (a clean exit with a summary), SIGKILL or by itself, and every way of stopping
//! checks that what the ready record named is gone (`released`).
use std::{
    io::{BufRead, BufReader, Read},
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    bin, extra_trace_args, ready_wait, released, require_root, scaled, unique, wait_until,
};

/// How long a test waits for the events it expects before stopping the daemon anyway (the
/// assertions then say what was missing). Counted transitions come once per interval, and the
/// output file is flushed once a second.
fn event_wait() -> Duration {
    scaled(Duration::from_secs(20))
}

/// A running `fwmark-trace trace --json` writing to a file.
pub struct Daemon {
    child: Child,
    pub output: PathBuf,
    stderr: mpsc::Receiver<String>,
    pub stderr_lines: Vec<String>,
    /// Its `ready` record: the programs, links and tc filters it attached, its back-ends.
    pub ready: Value,
    /// The namespace it traces (`--netns`), where its tc filters sit.
    netns: Option<String>,
}

impl Daemon {
    /// Starts the daemon (output to a temp file) and waits for its ready record.
    pub fn start(args: &[&str]) -> Daemon {
        let output = std::env::temp_dir().join(format!("fwmark-trace-test-{}.jsonl", unique()));
        Self::start_writing(output, args)
    }

    /// Starts the daemon writing its records to `output` and waits for its ready record.
    pub fn start_writing(output: PathBuf, args: &[&str]) -> Daemon {
        Self::start_in(output, args, &[])
    }

    /// Starts the daemon with these environment variables besides the test's own (e.g.
    /// where a private Open vSwitch runs).
    pub fn start_with_env(args: &[&str], env: &[(&str, &Path)]) -> Daemon {
        let output = std::env::temp_dir().join(format!("fwmark-trace-test-{}.jsonl", unique()));
        Self::start_in(output, args, env)
    }

    fn start_in(output: PathBuf, args: &[&str], env: &[(&str, &Path)]) -> Daemon {
        require_root();
        let extra = extra_trace_args();
        let mut child = Command::new(bin())
            .envs(env.iter().copied())
            .arg("trace")
            .arg("--json")
            .arg("--output")
            .arg(&output)
            .args(args)
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fwmark-trace");
        let stderr = line_reader(child.stderr.take().expect("stderr"));
        let mut d = Daemon {
            child,
            output,
            stderr,
            stderr_lines: Vec::new(),
            ready: Value::Null,
            netns: value_of(args.iter().copied(), "--netns").map(str::to_owned),
        };
        let is_ready = |r: &Value| r["kind"] == "ready";
        if !d.wait_for(ready_wait(), |records| records.iter().any(is_ready)) {
            d.collect_stderr();
            panic!(
                "no ready record from fwmark-trace within {:?}: {:#?}",
                ready_wait(),
                d.stderr_lines
            );
        }
        d.ready = d.records().into_iter().find(is_ready).expect("ready");
        let all = args.iter().copied().chain(extra.iter().map(String::as_str));
        assert_backends(all, &d.ready);
        d
    }

    /// Its complete records so far (the file may end in a line being written).
    pub fn records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(&self.output).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        parse_lines(complete)
    }

    /// Its observer plans so far (`kind: "plan"`): the first, and one after each re-plan.
    pub fn plans(&self) -> Vec<Value> {
        plans_of(&self.records())
    }

    /// Polls the output until `done` holds for the records so far (true) or `timeout` passes
    /// (false). Panics when the daemon exits first.
    pub fn wait_for(&mut self, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> bool {
        wait_until(timeout, || {
            if done(&self.records()) {
                return true;
            }
            if let Some(status) = self.try_wait() {
                self.collect_stderr();
                panic!(
                    "fwmark-trace exited ({status}) while a test waited on its output: {:#?}",
                    self.stderr_lines
                );
            }
            false
        })
    }

    /// Waits until a plan record satisfies `done` (the plan is written again after each
    /// re-plan); panics when none does in time.
    pub fn wait_for_plan(&mut self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let found = |records: &[Value]| plans_of(records).into_iter().find(|p| done(p));
        if !self.wait_for(event_wait(), |r| found(r).is_some()) {
            panic!("no plan {what} in time: {:#?}", self.plans());
        }
        found(&self.records()).expect("plan")
    }

    /// Waits for a stderr line containing `needle` (what the daemon tells a person: changes of
    /// its tc observers, a deleted namespace); panics when it does not come in time.
    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + scaled(timeout);
        while Instant::now() < deadline {
            match self.stderr.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.stderr_lines.push(line);
                    if hit {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(st) = self.try_wait() {
                        self.collect_stderr();
                        panic!(
                            "fwmark-trace exited ({st}) before {needle:?}: {:#?}",
                            self.stderr_lines
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!(
            "fwmark-trace did not print {needle:?} in time: {:#?}",
            self.stderr_lines
        );
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the events so far satisfy `seen` (or a while: the assertions then say what
    /// is missing), then stops the daemon (`stop`). For events the kernel makes after the
    /// sender returns: a packet waiting for ARP, a receive in softirq, a report per interval.
    pub fn stop_when(mut self, what: &str, seen: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        if !self.wait_for(event_wait(), |records| seen(&events_of(records))) {
            eprintln!("gave up waiting for {what}; stopping the daemon anyway");
        }
        self.stop()
    }

    /// SIGINT, a clean exit, everything it attached released; the records it wrote without
    /// the plans and the ready record (`stop_with_plans` for those).
    pub fn stop(self) -> Vec<Value> {
        events_of(&self.stop_all())
    }

    /// Stops the daemon (`stop`): its observer plans and its other records.
    pub fn stop_with_plans(self) -> (Vec<Value>, Vec<Value>) {
        let records = self.stop_all();
        (plans_of(&records), events_of(&records))
    }

    fn stop_all(mut self) -> Vec<Value> {
        // The daemon drains its ring buffer and the kernel's counts before its summary.
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGINT) };
        let status = self.child.wait().expect("wait");
        self.collect_stderr();
        assert!(
            status.success(),
            "fwmark-trace failed: {status}: {:#?}",
            self.stderr_lines
        );
        self.assert_released();
        parse_lines(&std::fs::read_to_string(&self.output).unwrap_or_default())
    }

    /// SIGKILL: nothing it attached may outlive it.
    pub fn kill(mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGKILL) };
        self.child.wait().expect("wait");
        self.assert_released();
    }

    /// Waits for the daemon to exit by itself (`--count`, a deleted namespace, an error);
    /// everything it attached must then be released. Panics when it does not exit in time.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut status = None;
        wait_until(scaled(timeout), || {
            status = self.try_wait();
            status.is_some()
        });
        self.collect_stderr();
        let status = status.unwrap_or_else(|| {
            panic!(
                "fwmark-trace did not exit in time: {:#?}",
                self.stderr_lines
            )
        });
        self.assert_released();
        status
    }

    fn assert_released(&self) {
        released::assert_released(&self.ready, self.netns.as_deref());
    }

    /// Moves what the daemon printed so far (all of it once it has exited) to `stderr_lines`.
    fn collect_stderr(&mut self) {
        let exited = self.child.try_wait().ok().flatten().is_some();
        // Once it has exited, the reader thread gets the rest and then the end of the pipe.
        let wait = Duration::from_millis(if exited { 1000 } else { 0 });
        while let Ok(line) = self.stderr.recv_timeout(wait) {
            self.stderr_lines.push(line);
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.output);
    }
}

/// The lines `r` gives, one at a time, from a thread.
pub fn line_reader(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The records of JSON lines, each checked against the published schema.
pub fn parse_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}"));
            crate::schema::check_record(&v);
            v
        })
        .collect()
}

/// The records of a JSON output file, without the plans and the ready record.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    events_of(&parse_lines(
        &std::fs::read_to_string(path).unwrap_or_default(),
    ))
}

fn events_of(records: &[Value]) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["kind"] != "plan" && r["kind"] != "ready")
        .cloned()
        .collect()
}

fn plans_of(records: &[Value]) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["kind"] == "plan")
        .cloned()
        .collect()
}

/// The value after `flag` in an argument list (`--netns NAME`).
fn value_of<'a>(mut args: impl Iterator<Item = &'a str>, flag: &str) -> Option<&'a str> {
    args.by_ref().find(|a| *a == flag)?;
    args.next()
}

/// The back-ends the arguments asked for are the ones the ready record says are in use: a
/// test run with `--nf-observers fentry` (vm-test's "(fentry)" steps) proves fentry.
fn assert_backends<'a>(args: impl Iterator<Item = &'a str> + Clone, ready: &Value) {
    for (flag, layer) in [("--nf-observers", "netfilter"), ("--tc-observers", "tc")] {
        if let Some(want) = value_of(args.clone(), flag).filter(|w| *w != "auto") {
            assert_eq!(
                ready["backends"][layer], want,
                "{flag} {want}, but the ready record says: {ready}"
            );
        }
    }
}

/// Runs `fwmark-trace trace ARGS` that must fail: with `--json --output` added, so that it is
/// seen never to have been ready, and with nothing of ours left in its `--netns` namespace.
/// Returns its exit code and stderr.
pub fn trace_fails(args: &[&str]) -> (i32, String) {
    require_root();
    assert_eq!(args.first(), Some(&"trace"), "{args:?}");
    let output = std::env::temp_dir().join(format!("fwmark-trace-fail-{}.jsonl", unique()));
    let out = Command::new(bin())
        .arg("trace")
        .arg("--json")
        .arg("--output")
        .arg(&output)
        .args(&args[1..])
        .output()
        .expect("run fwmark-trace");
    let records = std::fs::read_to_string(&output).unwrap_or_default();
    let _ = std::fs::remove_file(&output);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} should fail: {stderr}");
    assert!(
        !records.contains("\"kind\":\"ready\""),
        "{args:?} failed after it was ready: {records}"
    );
    let netns = value_of(args.iter().copied(), "--netns");
    if let Some(ns) = netns.filter(|ns| fwmark_trace::netns::path_of(ns).exists()) {
        released::assert_nothing_left(ns, None);
    }
    (out.status.code().unwrap_or(-1), stderr)
}

/// A socket a child tells it is ready on, as systemd's `$NOTIFY_SOCKET` (sd_notify(3)): how a
/// test knows `why`, which has no event stream, is watching.
pub struct NotifySocket {
    sock: UnixDatagram,
    pub path: PathBuf,
}

impl NotifySocket {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("fwmark-trace-notify-{}.sock", unique()));
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        Self { sock, path }
    }

    /// Waits for `READY=1` from `child`; `Err` when it exits first or does not say it in time.
    pub fn wait_ready(&self, child: &mut Child) -> Result<(), String> {
        let deadline = Instant::now() + ready_wait();
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                if String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return Ok(());
                }
            }
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Err(format!(
                    "fwmark-trace exited ({status}) before it was ready"
                ));
            }
        }
        Err(format!(
            "fwmark-trace did not say READY=1 within {:?}",
            ready_wait()
        ))
    }
}

impl Default for NotifySocket {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
