//! `fwmark-trace bench` (run through `cargo xtask bench`): what tracing costs, side by side
//! with what a user would use instead, in one run. Traffic crosses a lab veth (namespace A to
//! B) with nft rules changing the mark twice per packet; every round runs every mode on every
//! workload, interleaved, and each mode is reported as a ratio to the baseline of the same
//! round (median and spread over rounds), with the events each tool emitted and lost. For the
//! fwmark-trace modes the observers' own kernel cost is read from `bpf_stats`
//! (`kernel.bpf_stats_enabled=1` for the run): invocations per packet and ns per invocation.
//! The userspace pipeline alone is measured on synthetic records.
use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use serde_json::Value;

use self::pipeline::BenchPipelineArgs;
use crate::lab::{self, Lab};

pub(crate) mod pipeline;
pub(crate) mod soak;

#[derive(Args, Clone, Debug)]
pub(crate) struct BenchArgs {
    /// Rounds of every mode × workload (median and spread are over rounds).
    #[arg(long, default_value_t = 3)]
    pub(crate) rounds: usize,
    /// Seconds of traffic per measurement.
    #[arg(long, default_value_t = 3)]
    pub(crate) seconds: u64,
    /// Write the full results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// Another fwmark-trace binary (the code before a change): the modes in `AGAINST_MODES`
    /// also run with it, in the same rounds, so the two compare side by side.
    #[arg(long, value_name = "PATH")]
    pub(crate) against_bin: Option<PathBuf>,
    /// What the other binary is called in the table (e.g. its commit); default "before".
    #[arg(long, value_name = "NAME", requires = "against_bin")]
    pub(crate) against_name: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Mode {
    Baseline,
    /// `trace`: transitions counted in the kernel, reported once per interval.
    FwmarkTrace,
    /// `trace --per-packet`: one ring-buffer event per packet.
    FwmarkTracePerPacket,
    /// `trace --record FILE`: per packet, raw records to a file (shown later).
    FwmarkTraceRecord,
    FwmarkTraceNoMatch,
    FwmarkTraceFullPath,
    /// `--port` of a flow that carries no traffic: what `why` and `trace --flow` cost while
    /// everything else on the node is unrelated to the flows followed.
    FwmarkTraceOtherFlow,
    NftMonitorTrace,
    Bpftrace,
}

const MODES: [Mode; 9] = [
    Mode::Baseline,
    Mode::FwmarkTrace,
    Mode::FwmarkTracePerPacket,
    Mode::FwmarkTraceRecord,
    Mode::FwmarkTraceNoMatch,
    Mode::FwmarkTraceFullPath,
    Mode::FwmarkTraceOtherFlow,
    Mode::NftMonitorTrace,
    Mode::Bpftrace,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Workload {
    /// TCP stream, Gbit/s.
    Tcp,
    /// UDP with 64-byte payloads, received packets/s.
    Udp64,
    /// The same runs, counted at the sender: datagrams sent per second. The server drops
    /// much of what an unthrottled client sends, so a tracer that slows the sender can lose
    /// less at the receiver; both views are shown.
    Udp64Sent,
}

/// Which fwmark-trace binary a mode runs: this build, or `--against-bin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Daemon {
    Current,
    Against,
}

/// One line of the table: a mode and the binary that runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
struct Variant {
    mode: Mode,
    daemon: Daemon,
}

impl Variant {
    /// The mode's name; `@NAME` when the other binary runs it.
    fn name(self, against_name: &str) -> String {
        match self.daemon {
            Daemon::Current => kebab(self.mode),
            Daemon::Against => format!("{}@{against_name}", kebab(self.mode)),
        }
    }
}

/// The kebab-case name serde gives a unit variant.
fn kebab(v: impl Serialize) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The modes that also run with `--against-bin`, the ones a regression shows in: the default,
/// a filter that matches nothing (the kernel's fast path alone) and per-packet events. Only
/// flags that binaries since 2cab65a accept.
const AGAINST_MODES: [Mode; 3] = [
    Mode::FwmarkTrace,
    Mode::FwmarkTracePerPacket,
    Mode::FwmarkTraceNoMatch,
];

/// Every mode with this build; with `against`, each of `AGAINST_MODES` with the other binary
/// too, right after its own (where the table shows it).
fn variants(against: bool) -> Vec<Variant> {
    let mut v = Vec::new();
    for mode in MODES {
        v.push(Variant {
            mode,
            daemon: Daemon::Current,
        });
        if against && AGAINST_MODES.contains(&mode) {
            v.push(Variant {
                mode,
                daemon: Daemon::Against,
            });
        }
    }
    v
}

/// Workloads as run (`Udp64Sent` is derived from the `Udp64` runs).
const RUNS: [Workload; 2] = [Workload::Tcp, Workload::Udp64];
const WORKLOADS: [Workload; 3] = [Workload::Tcp, Workload::Udp64, Workload::Udp64Sent];

/// Two mark changes per packet: OR a bit at output (mangle), clear it at postrouting.
const RULES: &str = r#"
table inet bench {
    chain out {
        type route hook output priority mangle; policy accept;
        meta mark set meta mark | 0x4000
    }
    chain post {
        type filter hook postrouting priority 0; policy accept;
        meta mark set meta mark & 0xffffbfff
    }
}
"#;

/// Every packet traced by nftables (what `nft monitor trace` needs).
const NFTRACE: &str = r#"
table inet benchtrace {
    chain out { type filter hook output priority -350; policy accept; meta nftrace set 1; }
    chain pre { type filter hook prerouting priority -350; policy accept; meta nftrace set 1; }
}
"#;

const BPFTRACE: &str = "tracepoint:net:net_dev_queue { printf(\"%x\\n\", ((struct sk_buff *)args->skbaddr)->mark); } \
                        tracepoint:net:netif_receive_skb { printf(\"%x\\n\", ((struct sk_buff *)args->skbaddr)->mark); }";

impl Mode {
    /// Modes that run the daemon (whose programs `bpf_stats` measures).
    fn is_fwmark_trace(self) -> bool {
        matches!(
            self,
            Mode::FwmarkTrace
                | Mode::FwmarkTracePerPacket
                | Mode::FwmarkTraceRecord
                | Mode::FwmarkTraceNoMatch
                | Mode::FwmarkTraceFullPath
                | Mode::FwmarkTraceOtherFlow
        )
    }
}

#[derive(Clone, Debug, Serialize)]
struct Sample {
    round: usize,
    /// The cost round (bpf_stats on): its samples give `bpf`, not the throughput figures.
    costing: bool,
    workload: Workload,
    #[serde(flatten)]
    variant: Variant,
    /// Gbit/s (tcp) or packets/s (udp64).
    value: f64,
    events: Option<u64>,
    lost: Option<u64>,
    /// fwmark-trace default mode on TCP: the daemon's CPU (% of one core) and peak RSS.
    cpu_percent: Option<f64>,
    rss_kb: Option<u64>,
    /// Packets the workload moved: UDP datagrams the client sent (iperf3's `packets`), TCP
    /// received bytes / 1448 (an estimate of MSS-sized segments).
    packets: f64,
    /// UDP datagrams the server received (`packets - lost_packets`); None for TCP.
    packets_received: Option<f64>,
    /// fwmark-trace modes: the daemon's programs' kernel cost over the workload.
    bpf: Option<BpfCost>,
}

/// One of the daemon's BPF programs: `run_cnt` / `run_time_ns` deltas over the workload.
#[derive(Clone, Debug, Serialize)]
struct ProgCost {
    id: u32,
    name: String,
    run_cnt: u64,
    run_time_ns: u64,
    /// run_time_ns / run_cnt (None when it did not run).
    ns_per_inv: Option<f64>,
}

/// The observers' kernel cost in one sample, from `bpf_stats` read just before the workload
/// starts and just after it ends (so iperf3's control connection is in it, a handful of
/// packets). Global tracepoints (`consume_skb`, `kfree_skb`, `net_dev_queue`,
/// `netif_receive_skb`) also fire for unrelated skbs elsewhere on the machine (root namespace
/// traffic, netlink, …), which adds a little to the invocations.
#[derive(Clone, Debug, Serialize)]
struct BpfCost {
    /// Every `fwm_` program the daemon held at the end, ran or not.
    programs: Vec<ProgCost>,
    /// Programs the daemon held at the start and no longer at the end (their counts are lost).
    gone: Vec<String>,
    invocations: u64,
    run_time_ns: u64,
    /// invocations / `Sample::packets`.
    inv_per_packet: f64,
    /// Median over the programs that ran of each program's own mean (run_time / run_cnt),
    /// unweighted: every observer counts once, however often it ran.
    ns_per_inv_median: Option<f64>,
    /// Weighted: total run_time / total invocations.
    ns_per_inv_mean: Option<f64>,
    /// Kernel time of all observers per packet: run_time_ns / `Sample::packets`.
    ns_per_packet: f64,
}

#[derive(Debug, Serialize)]
struct Row {
    workload: Workload,
    #[serde(flatten)]
    variant: Variant,
    median_ratio: f64,
    min_ratio: f64,
    max_ratio: f64,
    median_value: f64,
    events_median: Option<u64>,
    lost_total: Option<u64>,
    /// Medians over rounds of the samples' `inv_per_packet` and `ns_per_inv_median`.
    inv_per_packet_median: Option<f64>,
    ns_per_inv_median: Option<f64>,
}

/// One mode on one workload, this build against the other binary (throughput rounds only).
#[derive(Debug, Serialize)]
struct Comparison {
    workload: Workload,
    mode: Mode,
    before_median: f64,
    now_median: f64,
    /// now_median / before_median.
    ratio: f64,
    /// now / before within each round, the least and the most (the two ran minutes apart at
    /// most, so a round's noise is mostly shared).
    min_round_ratio: f64,
    max_round_ratio: f64,
    /// The cost round's `Row::ns_per_inv_median` of each.
    ns_per_inv_before: Option<f64>,
    ns_per_inv_now: Option<f64>,
}

#[derive(Serialize)]
struct BenchReport {
    machine: String,
    kernel: String,
    rounds: usize,
    seconds: u64,
    /// `--against-name` when another binary ran too.
    against: Option<String>,
    rows: Vec<Row>,
    /// This build against the other binary, per workload and mode of `AGAINST_MODES`.
    comparisons: Vec<Comparison>,
    samples: Vec<Sample>,
    pipeline: pipeline::PipelineResult,
    daemon_cpu_percent: Option<f64>,
    daemon_rss_kb: Option<u64>,
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled=1` while this lives; the previous value is written back on drop
/// (so also when the run fails with an error or panics; not on SIGKILL).
struct BpfStatsEnabled {
    old: String,
}

impl BpfStatsEnabled {
    fn enable() -> Result<Self> {
        let old = fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("reading {BPF_STATS_SYSCTL}"))?
            .trim()
            .to_owned();
        fs::write(BPF_STATS_SYSCTL, "1")
            .with_context(|| format!("writing 1 to {BPF_STATS_SYSCTL}"))?;
        Ok(Self { old })
    }
}

impl Drop for BpfStatsEnabled {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS_SYSCTL, &self.old) {
            eprintln!(
                "bench: could not restore kernel.bpf_stats_enabled={}: {e}",
                self.old
            );
        }
    }
}

/// IDs of the BPF programs a process holds: every program or link fd's `prog_id` in its
/// fdinfo (netfilter programs are loaded with raw `bpf()` calls, the rest through aya; both
/// keep an fd).
fn held_prog_ids(pid: u32) -> HashSet<u32> {
    let mut ids = HashSet::new();
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for entry in dir.flatten() {
        let Ok(text) = fs::read_to_string(entry.path()) else {
            continue;
        };
        ids.extend(text.lines().find_map(|l| {
            l.strip_prefix("prog_id:")
                .and_then(|v| v.trim().parse::<u32>().ok())
        }));
    }
    ids
}

/// (id → (name, run_cnt, run_time_ns)) of the daemon's programs: loaded programs named `fwm_…`
/// that the daemon holds (another fwmark-trace running at the same time is not counted). If
/// the daemon's fdinfo shows none, every `fwm_` program is taken.
fn daemon_prog_stats(pid: u32) -> BTreeMap<u32, (String, u64, u64)> {
    let held = held_prog_ids(pid);
    let mut all = BTreeMap::new();
    for info in aya::programs::loaded_programs().flatten() {
        let Some(name) = info.name_as_str() else {
            continue;
        };
        if !name.starts_with("fwm_") {
            continue;
        }
        all.insert(
            info.id(),
            (
                name.to_owned(),
                info.run_count(),
                info.run_time().as_nanos() as u64,
            ),
        );
    }
    if all.keys().any(|id| held.contains(id)) {
        all.retain(|id, _| held.contains(id));
    }
    all
}

/// The cost between two readings of `daemon_prog_stats`, per packet of the workload.
fn bpf_cost(
    before: &BTreeMap<u32, (String, u64, u64)>,
    after: &BTreeMap<u32, (String, u64, u64)>,
    packets: f64,
) -> BpfCost {
    let programs: Vec<ProgCost> = after
        .iter()
        .map(|(&id, (name, cnt, ns))| {
            // A program loaded during the workload (a re-plan, tcx observers added) started
            // from zero with the statistics on.
            let (c0, t0) = before.get(&id).map_or((0, 0), |(_, c, t)| (*c, *t));
            let run_cnt = cnt.saturating_sub(c0);
            let run_time_ns = ns.saturating_sub(t0);
            ProgCost {
                id,
                name: name.clone(),
                run_cnt,
                run_time_ns,
                ns_per_inv: (run_cnt > 0).then(|| run_time_ns as f64 / run_cnt as f64),
            }
        })
        .collect();
    let gone = before
        .iter()
        .filter(|(id, _)| !after.contains_key(id))
        .map(|(_, (name, _, _))| name.clone())
        .collect();
    let invocations: u64 = programs.iter().map(|p| p.run_cnt).sum();
    let run_time_ns: u64 = programs.iter().map(|p| p.run_time_ns).sum();
    let per_prog: Vec<f64> = programs.iter().filter_map(|p| p.ns_per_inv).collect();
    let packets = packets.max(1.0);
    BpfCost {
        gone,
        invocations,
        run_time_ns,
        inv_per_packet: invocations as f64 / packets,
        ns_per_inv_median: (!per_prog.is_empty()).then(|| median(per_prog)),
        ns_per_inv_mean: (invocations > 0).then(|| run_time_ns as f64 / invocations as f64),
        ns_per_packet: run_time_ns as f64 / packets,
        programs,
    }
}

/// A running tracer and how to read what it emitted.
struct Tracer {
    child: Child,
    out: PathBuf,
    mode: Mode,
}

fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) if line.contains(needle) => return Ok(()),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Some(st) = child.try_wait()? {
                    bail!("tracer exited early ({st})");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("tracer closed its output before {needle:?}")
            }
        }
    }
    bail!("tracer did not start in time")
}

/// Lines of a pipe, forwarded to a channel (and, when given, appended to a file).
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// Starts a mode's tracer; `bin` is the fwmark-trace binary for the daemon modes.
fn start(mode: Mode, bin: &Path, lab: &Lab, dir: &Path) -> Result<Option<Tracer>> {
    let out = dir.join(format!("{mode:?}.out"));
    let daemon = |extra: &[&str]| -> Result<Child> {
        let mut c = Command::new(bin)
            .args(["trace", "--json", "--netns", &lab.a, "--output"])
            .arg(&out)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let rx = lines_of(c.stderr.take().context("stderr")?);
        wait_for_line(&rx, "tracing (", &mut c)?;
        Ok(c)
    };
    let child = match mode {
        Mode::Baseline => return Ok(None),
        Mode::FwmarkTrace => daemon(&[])?,
        Mode::FwmarkTracePerPacket => daemon(&["--per-packet"])?,
        Mode::FwmarkTraceRecord => {
            let rec = dir.join("record.rec").display().to_string();
            daemon(&["--record", &rec])?
        }
        Mode::FwmarkTraceNoMatch => daemon(&["--mark", "0xdead0000/0xffff0000"])?,
        Mode::FwmarkTraceFullPath => daemon(&["--full-path"])?,
        Mode::FwmarkTraceOtherFlow => daemon(&["--port", "1"])?,
        Mode::NftMonitorTrace => {
            lab::nft(&lab.a, NFTRACE)?;
            let c = Command::new("ip")
                .args(["netns", "exec", &lab.a, "nft", "monitor", "trace"])
                .stdout(fs::File::create(&out)?)
                .stderr(Stdio::null())
                .spawn()?;
            // nft subscribes to the trace group at once; give it a moment.
            thread::sleep(Duration::from_millis(500));
            c
        }
        Mode::Bpftrace => {
            let mut c = Command::new("bpftrace")
                .args(["-e", BPFTRACE, "-o"])
                .arg(&out)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !fs::read_to_string(&out)
                .unwrap_or_default()
                .contains("Attaching")
            {
                if Instant::now() > deadline || c.try_wait()?.is_some() {
                    bail!("bpftrace did not start");
                }
                thread::sleep(Duration::from_millis(200));
            }
            c
        }
    };
    Ok(Some(Tracer { child, out, mode }))
}

/// Stops a tracer; returns (events, lost) as far as the tool tells.
fn stop(mut t: Tracer, lab: &Lab) -> Result<(Option<u64>, Option<u64>)> {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGINT) };
    t.child.wait()?;
    let text = fs::read_to_string(&t.out).unwrap_or_default();
    let _ = fs::remove_file(&t.out);
    Ok(match t.mode {
        Mode::NftMonitorTrace => {
            lab::exec(&lab.a, &["nft", "delete", "table", "inet", "benchtrace"])?;
            (
                Some(text.lines().filter(|l| l.starts_with("trace id")).count() as u64),
                None,
            )
        }
        Mode::Bpftrace => {
            let lost = text
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("Lost ")?
                        .split_whitespace()
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
                .sum();
            let events = text
                .lines()
                .filter(|l| !l.is_empty() && u32::from_str_radix(l, 16).is_ok())
                .count();
            (Some(events as u64), Some(lost))
        }
        _ => {
            let summary: Value = text
                .lines()
                .last()
                .and_then(|l| serde_json::from_str(l).ok())
                .unwrap_or(Value::Null);
            (summary["total_events"].as_u64(), summary["lost"].as_u64())
        }
    })
}

/// What one iperf3 run measured.
struct IperfResult {
    /// Gbit/s (TCP) or received packets/s (UDP).
    value: f64,
    /// UDP: datagrams sent per second.
    sent_per_s: Option<f64>,
    /// See `Sample::packets`.
    packets: f64,
    packets_received: Option<f64>,
}

/// TCP payload bytes per segment on the lab veth (MTU 1500, IPv4, TCP timestamps): turns
/// iperf3's bytes into a packet count. An estimate: with GSO/GRO on veth an observer sees far
/// fewer, larger skbs than this, and the ACKs going back also pass the observers, so TCP's
/// inv/pkt is per 1448-byte segment of payload, not per skb.
const TCP_SEGMENT_BYTES: f64 = 1448.0;

/// One iperf3 run from A to B.
fn iperf(lab: &Lab, w: Workload, seconds: u64) -> Result<IperfResult> {
    let udp = if w == Workload::Udp64 {
        " -u -l 64 -b 0"
    } else {
        ""
    };
    let out = lab.iperf(5201, &format!("-t {seconds} -J{udp}"))?;
    let v: Value = serde_json::from_slice(&out).context("parsing iperf3 JSON")?;
    if let Some(e) = v["error"].as_str() {
        bail!("iperf3: {e}");
    }
    Ok(match w {
        Workload::Tcp => {
            let r = &v["end"]["sum_received"];
            IperfResult {
                value: r["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
                sent_per_s: None,
                packets: r["bytes"].as_f64().unwrap_or(0.0) / TCP_SEGMENT_BYTES,
                packets_received: None,
            }
        }
        Workload::Udp64 | Workload::Udp64Sent => {
            let s = &v["end"]["sum"];
            // `packets` is what the client sent, `lost_packets` the server's gaps in the
            // sequence numbers. The lost ones overflowed the server's socket buffer after
            // every observer had seen them, so sent packets are the divisor for the
            // invocations per packet.
            let sent = s["packets"].as_f64().unwrap_or(0.0);
            let got = sent - s["lost_packets"].as_f64().unwrap_or(0.0);
            let secs = s["seconds"].as_f64().unwrap_or(1.0).max(0.001);
            IperfResult {
                value: got / secs,
                sent_per_s: Some(sent / secs),
                packets: sent,
                packets_received: Some(got),
            }
        }
    })
}

/// (utime + stime) clock ticks of a process.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn peak_rss_kb(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub(crate) fn run(args: &BenchArgs) -> Result<()> {
    crate::privileges::check("fwmark-trace bench", crate::privileges::Command::Lab)?;
    let dir = std::env::temp_dir().join(format!("fwmark-trace-bench-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let lab = Lab::new("bench")?;
    lab::nft(&lab.a, RULES)?;
    let me = std::env::current_exe()?;
    let against_name = args.against_name.as_deref().unwrap_or("before");
    let all = variants(args.against_bin.is_some());
    let mut samples = Vec::new();
    let started = Instant::now();
    // Round 0 measures the observers' kernel cost with bpf_stats on (which itself adds ~50 ns
    // to every invocation); the throughput rounds after it run with the statistics off.
    for round in 0..=args.rounds {
        let costing = round == 0;
        let stats = costing.then(BpfStatsEnabled::enable).transpose()?;
        for workload in RUNS {
            // Rotate the order each round so no mode always runs first or last.
            let mut order = all.clone();
            order.rotate_left(round % all.len());
            for variant in order {
                let mode = variant.mode;
                eprint!(
                    "\rbench: round {}/{} {workload:?} {}                    ",
                    round + 1,
                    args.rounds,
                    variant.name(against_name)
                );
                let bin = match variant.daemon {
                    Daemon::Current => me.as_path(),
                    Daemon::Against => args.against_bin.as_deref().context("--against-bin")?,
                };
                let tracer = start(mode, bin, &lab, &dir)?;
                let pid = tracer.as_ref().map(|t| t.child.id());
                let daemon_pid = pid.filter(|_| mode.is_fwmark_trace() && costing);
                let progs0 = daemon_pid.map(daemon_prog_stats);
                let ticks0 = pid.and_then(cpu_ticks);
                let t0 = Instant::now();
                let run = iperf(&lab, workload, args.seconds)?;
                let elapsed = t0.elapsed().as_secs_f64();
                let bpf = daemon_pid
                    .zip(progs0)
                    .map(|(pid, before)| bpf_cost(&before, &daemon_prog_stats(pid), run.packets));
                let measured = variant
                    == Variant {
                        mode: Mode::FwmarkTrace,
                        daemon: Daemon::Current,
                    }
                    && workload == Workload::Tcp
                    && !costing;
                let (cpu, rss) = match (pid, measured) {
                    (Some(pid), true) => {
                        // SAFETY: sysconf has no preconditions.
                        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
                        let cpu = cpu_ticks(pid)
                            .zip(ticks0)
                            .map(|(b, a)| (b - a) as f64 / hz / elapsed * 100.0);
                        (cpu, peak_rss_kb(pid))
                    }
                    _ => (None, None),
                };
                let (events, lost) = match tracer {
                    Some(t) => stop(t, &lab)?,
                    None => (None, None),
                };
                let sample = Sample {
                    round,
                    costing,
                    workload,
                    variant,
                    value: run.value,
                    events,
                    lost,
                    cpu_percent: cpu,
                    rss_kb: rss,
                    packets: run.packets,
                    packets_received: run.packets_received,
                    bpf,
                };
                if let Some(sent) = run.sent_per_s {
                    samples.push(Sample {
                        workload: Workload::Udp64Sent,
                        value: sent,
                        ..sample.clone()
                    });
                }
                samples.push(sample);
            }
        }
        drop(stats);
    }
    eprintln!(
        "\rbench: traffic done in {:.0}s; measuring the userspace pipeline",
        started.elapsed().as_secs_f64()
    );
    drop(lab);
    let _ = fs::remove_dir_all(&dir);
    let pipeline = pipeline::run(&BenchPipelineArgs { events: 2_000_000 })?;

    let rows = summarize(&samples, &all);
    let comparisons = compare(&samples, &rows);
    // One 3-second sample of CPU ticks is coarse: report the median over rounds.
    let cpu: Vec<f64> = samples.iter().filter_map(|s| s.cpu_percent).collect();
    let rss = samples.iter().filter_map(|s| s.rss_kb).max();
    let report = BenchReport {
        machine: format!(
            "{} cores, {} MiB",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            mem_mib()
        ),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        rounds: args.rounds,
        seconds: args.seconds,
        against: args.against_bin.is_some().then(|| against_name.to_owned()),
        rows,
        comparisons,
        samples: samples.clone(),
        pipeline,
        daemon_cpu_percent: (!cpu.is_empty()).then(|| median(cpu)),
        daemon_rss_kb: rss,
    };
    print!("{}", table(&report));
    if let Some(path) = &args.output {
        fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("results: {}", path.display());
    }
    Ok(())
}

fn mem_mib() -> u64 {
    fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kb| kb / 1024)
}

fn summarize(samples: &[Sample], variants: &[Variant]) -> Vec<Row> {
    let mut rows = Vec::new();
    for workload in WORKLOADS {
        for &variant in variants {
            let ratios: Vec<f64> = samples
                .iter()
                .filter(|s| s.workload == workload && s.variant == variant && !s.costing)
                .filter_map(|s| {
                    let base = samples.iter().find(|b| {
                        b.round == s.round
                            && b.workload == workload
                            && b.variant.mode == Mode::Baseline
                    })?;
                    (base.value > 0.0).then(|| s.value / base.value)
                })
                .collect();
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.workload == workload && s.variant == variant && !s.costing)
                .collect();
            let costed: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.workload == workload && s.variant == variant && s.costing)
                .collect();
            let events: Vec<f64> = mine
                .iter()
                .filter_map(|s| s.events.map(|e| e as f64))
                .collect();
            rows.push(Row {
                workload,
                variant,
                median_ratio: median(ratios.clone()),
                min_ratio: ratios.iter().copied().fold(f64::INFINITY, f64::min),
                max_ratio: ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                median_value: median(mine.iter().map(|s| s.value).collect()),
                events_median: (!events.is_empty()).then(|| median(events) as u64),
                lost_total: mine.iter().map(|s| s.lost).sum(),
                inv_per_packet_median: median_of(
                    costed
                        .iter()
                        .map(|s| s.bpf.as_ref().map(|b| b.inv_per_packet)),
                ),
                ns_per_inv_median: median_of(
                    costed
                        .iter()
                        .map(|s| s.bpf.as_ref().and_then(|b| b.ns_per_inv_median)),
                ),
            });
        }
    }
    rows
}

/// This build against the other binary for every mode both ran (none without `--against-bin`).
fn compare(samples: &[Sample], rows: &[Row]) -> Vec<Comparison> {
    let mut out = Vec::new();
    for before in rows.iter().filter(|r| r.variant.daemon == Daemon::Against) {
        let now_variant = Variant {
            daemon: Daemon::Current,
            ..before.variant
        };
        let Some(now) = rows
            .iter()
            .find(|r| r.workload == before.workload && r.variant == now_variant)
        else {
            continue;
        };
        // round → value, throughput rounds only.
        let by_round = |variant: Variant| -> BTreeMap<usize, f64> {
            samples
                .iter()
                .filter(|s| !s.costing && s.workload == before.workload && s.variant == variant)
                .map(|s| (s.round, s.value))
                .collect()
        };
        let then = by_round(before.variant);
        let per_round: Vec<f64> = by_round(now_variant)
            .iter()
            .filter_map(|(round, now)| {
                let b = then.get(round)?;
                (*b > 0.0).then(|| now / b)
            })
            .collect();
        out.push(Comparison {
            workload: before.workload,
            mode: before.variant.mode,
            before_median: before.median_value,
            now_median: now.median_value,
            ratio: now.median_value / before.median_value,
            min_round_ratio: per_round.iter().copied().fold(f64::INFINITY, f64::min),
            max_round_ratio: per_round.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            ns_per_inv_before: before.ns_per_inv_median,
            ns_per_inv_now: now.ns_per_inv_median,
        });
    }
    out
}

/// Median of the values present, None if none is.
fn median_of(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.flatten().collect();
    (!v.is_empty()).then(|| median(v))
}

/// A workload's figure with its unit.
fn shown(workload: Workload, value: f64) -> String {
    match workload {
        Workload::Tcp => format!("{value:.2} Gbit/s"),
        Workload::Udp64 | Workload::Udp64Sent => format!("{value:.0} pkt/s"),
    }
}

fn table(r: &BenchReport) -> String {
    let against = r.against.as_deref().unwrap_or("before");
    let names: Vec<String> = r.rows.iter().map(|row| row.variant.name(against)).collect();
    let w = names.iter().map(String::len).max().unwrap_or(0).max(26);
    let mut s = format!(
        "\nfwmark-trace bench: {} rounds × {} s per run, kernel {}, {}\n\n{:<10} {:<w$} {:>12} {:>9} {:>17} {:>12} {:>10} {:>8} {:>7}\n",
        r.rounds, r.seconds, r.kernel, r.machine, "workload", "mode", "median", "vs base", "spread", "events", "lost", "inv/pkt", "ns/inv"
    );
    for (row, name) in r.rows.iter().zip(&names) {
        s += &format!(
            "{:<10} {:<w$} {:>12} {:>8.1}% {:>8.1}%..{:>5.1}% {:>12} {:>10} {:>8} {:>7}\n",
            kebab(row.workload),
            name,
            shown(row.workload, row.median_value),
            (row.median_ratio - 1.0) * 100.0,
            (row.min_ratio - 1.0) * 100.0,
            (row.max_ratio - 1.0) * 100.0,
            row.events_median.map_or("-".into(), |e| e.to_string()),
            row.lost_total.map_or("?".into(), |l| l.to_string()),
            row.inv_per_packet_median
                .map_or("-".into(), |v| format!("{v:.2}")),
            row.ns_per_inv_median
                .map_or("-".into(), |v| format!("{v:.0}")),
        );
    }
    if !r.comparisons.is_empty() {
        s += &format!(
            "\n{against} → now: ratio of the medians (the least..most of the rounds' own ratios), \
             ns/inv from the cost round\n"
        );
    }
    let ns = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    for c in &r.comparisons {
        s += &format!(
            "{:<10} {:<26} {:>14} → {:>14} {:>6.1}% ({:.1}%..{:.1}%)  ns/inv {} → {}\n",
            kebab(c.workload),
            kebab(c.mode),
            shown(c.workload, c.before_median),
            shown(c.workload, c.now_median),
            (c.ratio - 1.0) * 100.0,
            (c.min_round_ratio - 1.0) * 100.0,
            (c.max_round_ratio - 1.0) * 100.0,
            ns(c.ns_per_inv_before),
            ns(c.ns_per_inv_now),
        );
    }
    s += &format!(
        "\nuserspace pipeline (decode + attribution + JSON, one core): {:.0} events/s\n",
        r.pipeline.events_per_second
    );
    s += "inv/pkt: invocations of the daemon's programs per packet (UDP: datagrams sent; TCP: \
          received bytes / 1448, GSO makes real skbs fewer); ns/inv: median over its programs \
          that ran of each one's mean run time (unweighted; bpf_stats adds ~50 ns each)\n";
    if let (Some(cpu), Some(rss)) = (r.daemon_cpu_percent, r.daemon_rss_kb) {
        s += &format!(
            "fwmark-trace during TCP: {cpu:.1}% of one core (median over rounds), peak RSS {} MiB\n",
            rss / 1024
        );
    }
    s
}
