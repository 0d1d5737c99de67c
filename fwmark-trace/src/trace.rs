//! `fwmark-trace trace`: attach the observers, stream events from the ring buffer (tokio),
//! decode and write them, and on SIGINT/SIGTERM, `--duration` or `--count` stop cleanly with a
//! summary. Every attachment is owned by a file descriptor of this process, so nothing stays
//! attached after exit, whatever the exit.
use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use aya::maps::{MapData, RingBuf};
use clap::Args;
use fwmark_trace_common::Event;
use tokio::{io::unix::AsyncFd, signal::unix, time};

use crate::{
    events::{self, Decoder, Interval},
    kernel::counts::KernelCounts,
    kernel::features::{Feature, NfBackend, TcBackend},
    kernel::observers::{Observers, Options},
    netns,
    output::{
        metrics::{self, Gauges},
        summary::Summary,
        Format, LostRecord, Output, Sink, StatsRecord,
    },
    recording::Recorder,
    registry::{Registry, RegistryArgs},
    tracking::{flows::FlowSelect, segment::Topology},
};

#[derive(Args, Clone, Debug, Default)]
pub struct TraceArgs {
    /// One JSON object per line instead of readable lines.
    #[arg(long)]
    pub json: bool,
    /// Write events to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Only events whose old or new mark matches VALUE[/MASK] (hex 0x.. or decimal).
    #[arg(long, value_name = "VALUE[/MASK]", value_parser = parse_mark_arg)]
    pub mark: Option<(u32, u32)>,
    /// Only events on this interface (repeatable); tc observers attach only there.
    #[arg(long = "iface", value_name = "NAME")]
    pub ifaces: Vec<String>,
    /// Trace inside this network namespace (a name under /run/netns, or a path).
    #[arg(long, value_name = "NAME|PATH")]
    pub netns: Option<String>,
    /// Stop after this long (e.g. 10s, 2m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many events.
    #[arg(long)]
    pub count: Option<u64>,
    /// Report every observation point of every packet (first sight, unchanged points, end of
    /// life), not only transitions and drops.
    #[arg(long)]
    pub full_path: bool,
    /// One event per packet through the ring buffer, instead of each distinct transition
    /// counted in the kernel and reported once per interval (--full-path and followed flows
    /// are per packet anyway).
    #[arg(long)]
    pub per_packet: bool,
    /// Per packet, at ring-buffer speed: write the kernel's raw records to FILE, decoded and
    /// attributed later by `fwmark-trace show FILE` (nothing is lost to a busy consumer). The
    /// output gets the plan and the summary.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// How often counted transitions are reported (e.g. 1s, 10s).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Ring buffer size in bytes (a power of two, at least one page).
    #[arg(long, default_value_t = 4 << 20, value_parser = parse_ring_size)]
    pub ring_size: u32,
    /// Also report routing table lookups (table, flow mark, result) as `route` events.
    #[arg(long)]
    pub routes: bool,
    /// Report every drop; by default only drops of packets whose mark was written on their
    /// path (by a rule, a program or their socket) are reported.
    #[arg(long)]
    pub all_drops: bool,
    /// Every SECS seconds, write a `stats` record (RSS, events, lost, tracked packets).
    #[arg(long, value_name = "SECS")]
    pub stats: Option<u64>,
    /// Serve the run's counters (events, drops by reason, transitions by owner, clobbers,
    /// lost) in the Prometheus text format at http://ADDR/metrics, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Fail instead of degrading when this kernel feature is unavailable (repeatable).
    #[arg(long, value_enum, value_name = "FEATURE")]
    pub require: Vec<Feature>,
    /// Netfilter observers: links (kernel 6.4+) or fentry/fexit on the chain evaluators;
    /// auto picks links where the kernel has them.
    #[arg(long, value_enum, default_value = "auto", value_name = "BACKEND")]
    pub nf_observers: NfBackend,
    /// tc observers: tcx (kernel 6.6+) or cls_bpf filters in existing clsact qdiscs; auto
    /// picks tcx where the kernel has it.
    #[arg(long, value_enum, default_value = "auto", value_name = "BACKEND")]
    pub tc_observers: TcBackend,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Follow only these flows, at every observation point and with their routing lookups.
    #[command(flatten)]
    pub select: FlowSelect,
}

impl TraceArgs {
    /// Whether transitions are counted in the kernel (the default) rather than sent per packet.
    pub fn counted(&self) -> bool {
        !(self.per_packet || self.full_path || self.select.active() || self.record.is_some())
    }
}

fn parse_mark_arg(s: &str) -> Result<(u32, u32), String> {
    events::parse_mark(s).map_err(|e| e.to_string())
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two of at least 4096"));
    }
    Ok(n)
}

pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN): run it with sudo");
    }
    Ok(())
}

/// Attaches everything in the current (or `--netns`) namespace and runs until stopped.
/// `on_ready` runs once everything is attached (the demo starts its traffic there).
pub fn run(args: &TraceArgs, on_ready: impl FnOnce()) -> Result<Summary> {
    let mut out = Output::new(
        if args.json {
            Format::Json
        } else {
            Format::Human
        },
        args.output.as_deref(),
    )?;
    run_into(args, &mut out, on_ready)
}

/// Like `run`, sending everything to `sink` (`why` collects flows this way).
pub fn run_into(args: &TraceArgs, sink: &mut dyn Sink, on_ready: impl FnOnce()) -> Result<Summary> {
    // Bad registry files or owner names fail before anything is attached.
    let registry = Registry::load(&args.registry)?;
    require_root("fwmark-trace trace")?;
    // In the node's namespace, before entering a traced one.
    let endpoint = args.metrics.map(metrics::bind).transpose()?;
    let netns = match &args.netns {
        Some(spec) => netns::enter(spec)?,
        None => 0,
    };
    let own_netns = netns::current()?;
    let opts = Options {
        mark: args.mark,
        netns,
        ifaces: (!args.ifaces.is_empty()).then(|| args.ifaces.clone()),
        // A followed flow is shown at every point, with the tables its lookups chose.
        full_path: args.full_path || args.select.active(),
        ring_bytes: args.ring_size,
        require: args.require.clone(),
        nf_backend: args.nf_observers,
        tc_backend: args.tc_observers,
        routes: args.routes || args.select.active(),
        all_drops: args.all_drops,
        aggregate: args.counted(),
        flow: args.select.kernel_filter(),
    };
    let mut obs = Observers::start(&opts)?;
    // Per-interface detail only at debug level (RUST_LOG=debug): hundreds of lines otherwise.
    let detail = log::log_enabled!(log::Level::Debug);
    for s in obs.report.iter().filter(|s| detail || !s.detail_only) {
        eprintln!(
            "fwmark-trace: [{}] {}: {}",
            if s.ok { "ok" } else { "--" },
            s.point,
            s.detail
        );
    }
    if !registry.profiled {
        // Built-in owners overlap; name the software whose rules are here so the user can say.
        let found = registry.detect(&obs.chain_names);
        if !found.is_empty() {
            let profile = crate::registry::cli::profile(&found);
            eprintln!("fwmark-trace: the ruleset holds rules of {}; attribution lists every candidate owner: narrow it with --owners {profile}", profile.replace(',', ", "));
        }
    }
    let attached = obs.report.iter().filter(|s| s.ok && !s.detail_only).count();
    if let Some(l) = &endpoint {
        eprintln!(
            "fwmark-trace: metrics at http://{}/metrics",
            l.local_addr()?
        );
    }
    eprintln!("fwmark-trace: tracing ({attached} observation groups attached, netns {own_netns}); Ctrl-C to stop");

    on_ready();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let summary = rt.block_on(stream(&mut obs, sink, args, own_netns, registry, endpoint))?;
    eprintln!("fwmark-trace: {summary}");
    Ok(summary)
}

fn topology(obs: &Observers, own_netns: u32) -> Topology {
    let mut t = Topology {
        plan: Some(obs.plan.clone()),
        chains: obs.chains.clone(),
        own_netns,
        ..Default::default()
    };
    if let Some(tc) = &obs.tc {
        t.tc_filters = tc.backend == crate::kernel::features::TcBackend::Clsact;
        for (ifindex, iface) in &tc.interfaces {
            t.ifnames.insert(*ifindex, iface.name.clone());
            for (dir, progs) in iface.chain.iter().enumerate() {
                t.tc_programs.insert(
                    (*ifindex, dir as u8),
                    progs.iter().map(|p| p.to_string()).collect(),
                );
            }
        }
    }
    if let Ok(all) = crate::kernel::tcx::list_interfaces() {
        for (i, n) in all {
            t.ifnames.entry(i).or_insert(n);
        }
    }
    t
}

async fn stream(
    obs: &mut Observers,
    out: &mut dyn Sink,
    args: &TraceArgs,
    own_netns: u32,
    registry: Registry,
    endpoint: Option<std::net::TcpListener>,
) -> Result<Summary> {
    let endpoint = endpoint
        .map(tokio::net::TcpListener::from_std)
        .transpose()?;
    let started = Instant::now();
    let mut decoder = Decoder::new(topology(obs, own_netns), obs.drop_reasons.clone());
    decoder.registry = Some(registry);
    // SAFETY: the AsyncFd owns the ring buffer, so its fd stays open while registered.
    let mut ring =
        unsafe { AsyncFd::register(obs.take_ring()?) }.context("polling the ring buffer")?;
    let mut summary = Summary::new();
    out.plan(&obs.plan_record())?;
    let mut counts = args
        .counted()
        .then(|| KernelCounts::take(&mut obs.ebpf))
        .transpose()?;
    let mut recorder = args.record.as_deref().map(Recorder::create).transpose()?;
    if let Some(r) = recorder.as_mut() {
        r.context(&decoder)?;
    }
    let period = args.interval.max(Duration::from_millis(100));
    // The first report after one whole interval (tokio's first tick is immediate).
    let mut interval = time::interval_at(time::Instant::now() + period, period);
    let mut interval_start = SystemTime::now();
    let mut tick = time::interval(Duration::from_secs(1));
    let mut drain_tick = time::interval(Duration::from_millis(50));
    let mut sigterm = unix::signal(unix::SignalKind::terminate())?;
    let mut sigint = unix::signal(unix::SignalKind::interrupt())?;
    let deadline = time::sleep(args.duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    let mut lost_seen = 0u64;
    let limit = args.count.unwrap_or(u64::MAX);
    let mut last_stats = Instant::now();
    let mut ticks = 0u64;
    let metrics_addr = endpoint.as_ref().and_then(|l| l.local_addr().ok());
    crate::output::ready::announce(obs, out, own_netns, metrics_addr)?;

    'run: loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let done = drain(guard.get_inner_mut(), &mut decoder, out, &mut summary, limit, &args.select, recorder.as_mut())?;
                guard.clear_ready();
                if done {
                    break 'run;
                }
            }
            _ = interval.tick(), if counts.is_some() => {
                let now = SystemTime::now();
                if let Some(c) = counts.as_mut() {
                    obs.next_epoch()?;
                    if report_counts(c, &mut decoder, out, &mut summary, limit, (interval_start, now))? {
                        break 'run;
                    }
                }
                interval_start = now;
            }
            // The kernel wakes us only for large batches; drain the rest often.
            _ = drain_tick.tick() => {
                if drain(ring.get_mut(), &mut decoder, out, &mut summary, limit, &args.select, recorder.as_mut())? {
                    break 'run;
                }
            }
            _ = tick.tick() => {
                obs.flush_log();
                out.tick()?;
                let lost = obs.lost();
                if lost > lost_seen {
                    let now = events::rfc3339(SystemTime::now());
                    out.lost(&LostRecord { time: &now, kind: "lost", lost: lost - lost_seen, total_lost: lost })?;
                    lost_seen = lost;
                }
                for change in obs.refresh_interfaces()? {
                    eprintln!("fwmark-trace: {change}");
                }
                ticks += 1;
                if ticks.is_multiple_of(3) {
                    let changes = obs.refresh_chains();
                    for change in &changes {
                        eprintln!("fwmark-trace: {change}");
                    }
                    if !changes.is_empty() {
                        out.plan(&obs.plan_record())?;
                    }
                }
                if decoder.set_topology(topology(obs, own_netns)) {
                    if let Some(r) = recorder.as_mut() {
                        r.context(&decoder)?;
                    }
                }
                if let Some(spec) = args.netns.as_deref().filter(|s| !netns::path_of(s).exists()) {
                    // We hold the namespace alive ourselves; what we traced is gone for everyone else.
                    eprintln!("fwmark-trace: network namespace {spec} was deleted; stopping");
                    break;
                }
                if let Some(every) = args.stats.filter(|s| *s > 0) {
                    if last_stats.elapsed() >= Duration::from_secs(every) {
                        last_stats = Instant::now();
                        let g = gauges(obs);
                        out.stats(&StatsRecord {
                            time: events::rfc3339(SystemTime::now()),
                            kind: "stats",
                            rss_kb: g.rss_kb,
                            events: summary.total_events,
                            lost: obs.lost(),
                            tracked_packets: g.tracked_packets,
                            interfaces: g.interfaces,
                        })?;
                    }
                }
            }
            conn = metrics::accept(endpoint.as_ref()) => {
                if let Ok(conn) = conn {
                    summary.lost = obs.lost();
                    summary.attributions(&decoder.counts);
                    metrics::respond(conn, metrics::render(&summary, &gauges(obs)));
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
        }
    }
    // Whatever the kernel counted or wrote before we stopped is still reported.
    if let Some(c) = counts.as_mut() {
        report_counts(
            c,
            &mut decoder,
            out,
            &mut summary,
            limit,
            (interval_start, SystemTime::now()),
        )?;
    }
    drain(
        ring.get_mut(),
        &mut decoder,
        out,
        &mut summary,
        limit,
        &args.select,
        recorder.as_mut(),
    )?;
    if let Some(r) = recorder.as_mut() {
        r.finish()?;
        eprintln!(
            "fwmark-trace: recorded {} records; show them with `fwmark-trace show {}`",
            r.records,
            args.record
                .as_deref()
                .unwrap_or(std::path::Path::new("FILE"))
                .display()
        );
    }
    summary.lost = obs.lost();
    summary.attributions(&decoder.counts);
    summary.duration_s = started.elapsed().as_secs_f64();
    if args.json {
        out.summary(&summary)?;
    }
    out.flush()?;
    Ok(summary)
}

/// Resident set size of this process (kB), from /proc.
/// What `--stats` records and the metrics read from the kernel side and the process.
fn gauges(obs: &Observers) -> Gauges {
    Gauges {
        tracked_packets: obs.tracked_packets(),
        interfaces: obs.tc.as_ref().map_or(0, |t| t.interfaces.len()),
        rss_kb: rss_kb(),
    }
}

pub fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Writes what the kernel counted in the interval `span`, one event per distinct transition;
/// true when `--count` is reached.
fn report_counts(
    counts: &mut KernelCounts,
    decoder: &mut Decoder,
    out: &mut dyn Sink,
    summary: &mut Summary,
    limit: u64,
    span: (SystemTime, SystemTime),
) -> Result<bool> {
    let interval = Interval {
        start: events::rfc3339(span.0),
        end: events::rfc3339(span.1),
    };
    for c in counts.read() {
        if summary.records >= limit {
            return Ok(true);
        }
        let mut ev = decoder.decode_counted(&c.exemplar, c.packets);
        ev.count = Some(c.packets);
        ev.interval = Some(interval.clone());
        out.event(&ev)?;
        summary.count(&ev);
    }
    Ok(summary.records >= limit)
}

/// Writes every record waiting in the ring (raw to `recorder` when recording); true when
/// `--count` is reached.
fn drain(
    rb: &mut RingBuf<MapData>,
    decoder: &mut Decoder,
    out: &mut dyn Sink,
    summary: &mut Summary,
    limit: u64,
    select: &FlowSelect,
    mut recorder: Option<&mut Recorder>,
) -> Result<bool> {
    while summary.records < limit {
        let Some(item) = rb.next() else {
            return Ok(false);
        };
        if item.len() < std::mem::size_of::<Event>() {
            continue;
        }
        if let Some(r) = recorder.as_deref_mut() {
            r.record(&item[..std::mem::size_of::<Event>()])?;
            summary.records += 1;
            summary.total_events += 1;
            continue;
        }
        // SAFETY: the kernel wrote a whole `Event`; the ring only guarantees 8-byte alignment.
        let raw: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        drop(item);
        let ev = decoder.decode(&raw);
        if select.active() {
            let keep = match (&ev.tuple, &ev.route) {
                (Some(t), Some(_)) => select.wants_route(t),
                (Some(t), None) => select.wants(t),
                (None, _) => false,
            };
            if !keep {
                continue;
            }
        }
        out.event(&ev)?;
        summary.count(&ev);
    }
    Ok(true)
}
