//! The integration-test harness (this crate's library): a throwaway lab (fwmark_trace::lab),
//! traffic sent from inside a namespace, the real daemon run as a child process whose JSON
//! records the tests read, and checks that what a daemon attached is gone after it exits.
//!
//! Every test stands alone, so the tests run in parallel: its own namespaces (names unique per
//! process and call), its daemons traced into them (`--netns`), readiness from the daemon's
//! `ready` record, and checks on the programs and links that record names, not on the whole
//! system's list (other tests' daemons load the same programs at the same time).
pub mod daemon;
pub mod metrics;
pub mod ovs;
pub mod released;
pub mod schema;
pub mod tc;
pub mod traffic;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub use daemon::*;
pub use fwmark_trace::lab::{self, Lab};
pub use metrics::*;
pub use ovs::{Datapath, Ovs};
pub use released::*;
pub use schema::*;
pub use tc::*;
pub use traffic::*;

/// The daemon binary under test, from `FWMARK_TRACE_BIN` (`cargo xtask test` and `vm-test`
/// build it and set it: a test crate cannot ask cargo for another package's binary).
pub fn bin() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = std::env::var("FWMARK_TRACE_BIN").unwrap_or_else(|_| {
            panic!(
                "FWMARK_TRACE_BIN is not set: run the integration tests with `cargo xtask test`, \
                 or build the daemon (cargo build -p fwmark-trace) and set FWMARK_TRACE_BIN to \
                 its path (target/debug/fwmark-trace)"
            )
        });
        assert!(
            std::path::Path::new(&bin).is_file(),
            "FWMARK_TRACE_BIN={bin} is not a file"
        );
        bin
    })
}

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "integration tests attach eBPF programs: run them as root (cargo xtask test)"
    );
}

/// `<pid>-<n>`, different for every call in every test process: names of namespaces, files
/// and pins that tests running at the same time must not share.
pub fn unique() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A path in the temp directory unique to this call (`unique`), removed on drop (a directory
/// with what is in it), even when the test fails.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// A file name, e.g. `Scratch::file("rec", "rec")`.
    pub fn file(tag: &str, ext: &str) -> Self {
        Self(std::env::temp_dir().join(format!("fwmark-trace-{tag}-{}.{ext}", unique())))
    }

    /// A directory, created.
    pub fn dir(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fwmark-trace-{tag}-{}", unique()));
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        Self(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A stop flag for a server thread, set when dropped (also when an assertion fails first).
pub struct StopOnDrop(Arc<AtomicBool>);

impl StopOnDrop {
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(false)))
    }

    /// The flag the server thread watches.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }
}

impl Default for StopOnDrop {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Runs `f` on a thread inside network namespace `ns` and returns what it returns (a panic in
/// it is this caller's panic).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_owned();
    thread::spawn(move || {
        fwmark_trace::netns::enter(&ns).unwrap_or_else(|e| panic!("entering {ns}: {e:#}"));
        f()
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Runs the daemon binary with `args` to completion: its exit code (-1 if killed), stdout and
/// stderr.
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .output()
        .expect("run fwmark-trace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `done` every 50 ms until it holds (true) or `timeout` passes (false): for waiting on
/// something observable, never a fixed sleep.
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Events of one kind whose tuple goes to `dport`.
pub fn events_to<'a>(events: &'a [Value], kind: &str, dport: u16) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["tuple"]["dport"] == dport)
        .collect()
}

/// The transitions to `dport` whose new mark is `new`.
pub fn marked<'a>(events: &'a [Value], dport: u16, new: &str) -> Vec<&'a Value> {
    events_to(events, "transition", dport)
        .into_iter()
        .filter(|e| e["mark"]["new"] == new)
        .collect()
}

/// The packets a set of counted events stands for.
pub fn packets(evs: &[&Value]) -> u64 {
    evs.iter().map(|e| e["count"].as_u64().unwrap_or(1)).sum()
}

/// A real rule set from the owners' own repositories, read where CI lays `shared/` beside the
/// project root (`../shared/real-rules/FILE`); never copied into the project.
pub fn real_rules(file: &str) -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("project root");
    let path = root.join("../shared/real-rules").join(file);
    assert!(
        path.is_file(),
        "real rule set {} missing (shared/ must sit beside the project root)",
        path.display()
    );
    path
}

/// Loads an iptables-restore file into namespace `ns` with `tool` (`iptables-nft-restore`,
/// `ip6tables-nft-restore`), `--noflush` as the owners load theirs.
pub fn restore_rules(ns: &str, tool: &str, file: &std::path::Path) {
    let input = std::fs::File::open(file).expect("open rule file");
    let out = Command::new("ip")
        .args(["netns", "exec", ns, tool, "--noflush"])
        .stdin(input)
        .output()
        .expect("run iptables-restore");
    assert!(
        out.status.success(),
        "{tool} {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs every line of an `ip -batch` style file (comments skipped) as `ip -n NS LINE`: lines may
/// carry options such as `-6`, which `ip -batch` does not take.
pub fn ip_lines(ns: &str, file: &std::path::Path) {
    let text = std::fs::read_to_string(file).expect("read ip file");
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        lab::ip(ns, line).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

/// One more throwaway namespace beside a Lab's two, deleted on drop (with its links, rules
/// and routes), even when the test fails.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("fwmt-{tag}-{}", unique());
        lab::run("ip", &["netns", "add", &name]).expect("ip netns add");
        let ns = Netns { name };
        lab::run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]).expect("lo up");
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// Parses a JSON mark ("0x4000").
pub fn mark_of(v: &Value) -> u32 {
    u32::from_str_radix(
        v.as_str()
            .unwrap_or_else(|| panic!("not a mark: {v}"))
            .trim_start_matches("0x"),
        16,
    )
    .unwrap_or_else(|e| panic!("bad mark {v}: {e}"))
}

/// Arguments every test daemon gets besides its own, from `FWMARK_TEST_TRACE_ARGS` (`cargo
/// xtask vm-test` runs netfilter tests again with `--nf-observers fentry` where links exist).
pub fn extra_trace_args() -> Vec<String> {
    std::env::var("FWMARK_TEST_TRACE_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// How long a daemon may take to start: 30 s, or `FWMARK_TEST_READY_SECS` (set by `cargo
/// xtask vm-test`: under software emulation the verifier alone takes tens of seconds).
pub fn ready_wait() -> Duration {
    let secs = std::env::var("FWMARK_TEST_READY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// `base` as long on this machine, longer where daemons start slowly (`FWMARK_TEST_READY_SECS`
/// above its default 30 s: a guest under emulation): how long to wait for anything else.
pub fn scaled(base: Duration) -> Duration {
    base.mul_f64((ready_wait().as_secs_f64() / 30.0).max(1.0))
}

/// Loads the kernel modules a test needs (ESP, Geneve, WireGuard, Open vSwitch: none is built
/// into this host's kernel, all are in the guests of `cargo xtask vm-test`). When one is
/// missing the test is skipped, saying so, unless `FWMARK_TEST_REQUIRE_MODULES` is set (the
/// guests set it: there a missing module fails the test).
pub fn modules_or_skip(test: &str, modules: &[&str]) -> bool {
    for m in modules {
        let loaded = Command::new("modprobe")
            .arg(m)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !loaded {
            assert!(
                std::env::var_os("FWMARK_TEST_REQUIRE_MODULES").is_none(),
                "{test}: kernel module {m} is required here (FWMARK_TEST_REQUIRE_MODULES) but does not load"
            );
            eprintln!(
                "SKIPPED {test}: this kernel has no module {m} (the kernel matrix runs it: cargo xtask vm-test --kernel 6.12)"
            );
            return false;
        }
    }
    true
}
