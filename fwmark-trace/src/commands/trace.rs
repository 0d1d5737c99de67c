//! `fwmark-trace trace`: attach the observers, stream records from the ring buffer (tokio),
//! decode and attribute them (`pipeline`), write them, and on SIGINT/SIGTERM, `--duration` or
//! `--count` stop cleanly with a summary. Every attachment is owned by a file descriptor of
//! this process, so nothing stays attached after exit, whatever the exit.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use fwmark_trace_common::Event;
use log::{debug, info, log_enabled, warn, Level};
use tokio::{io::unix::AsyncFd, signal::unix, time};

use crate::{
    attribution::{Attributor, NamespaceInventory},
    clock::Timestamp,
    decode::Decoder,
    event::Interval,
    flows::Selection,
    inventory::{Inventory, Refresher, Source, Sources},
    kernel::{
        counts::{Counted, KernelCounts},
        features::{Feature, NfBackend, TcBackend},
        observers::{agg_entries, Lost, Observers, Options, AGG_BUDGET},
    },
    mark::MarkMatch,
    netns,
    nodestate::links::TunnelKind,
    output::{
        file::FileOptions,
        metrics::{self, Gauges},
        ready::{self, ReadyRecord},
        startup::{self, PlanRecord},
        summary::Summary,
        Format, LostRecord, Output, Sink, StatsRecord,
    },
    pipeline::Pipeline,
    place::Topology,
    recording::Recorder,
    registry::{self, Registry},
};

/// The ring buffer's size unless told (bytes).
pub(crate) const RING_SIZE: u32 = 4 << 20;
/// How often counted transitions are reported unless told.
pub(crate) const INTERVAL: Duration = Duration::from_secs(1);

/// What to trace, where, and how to report it.
#[derive(Clone, Debug)]
pub(crate) struct TraceConfig {
    pub(crate) format: Format,
    /// Events go to this file instead of stdout.
    pub(crate) output: Option<PathBuf>,
    /// How that file is opened and rotated (`--append`, `--rotate-size`, `--rotate-keep`).
    pub(crate) output_file: FileOptions,
    /// Only events whose old or new mark matches.
    pub(crate) mark: Option<MarkMatch>,
    /// Only events on these interfaces (tc observers attach only there).
    pub(crate) ifaces: Vec<String>,
    /// Trace inside this network namespace (a name under /run/netns, or a path).
    pub(crate) netns: Option<String>,
    pub(crate) duration: Option<Duration>,
    /// Stop after this many event records.
    pub(crate) count: Option<u64>,
    /// Every observation point of every packet.
    pub(crate) full_path: bool,
    /// One event per packet instead of counted in the kernel.
    pub(crate) per_packet: bool,
    /// Raw records to this file (see `recording`).
    pub(crate) record: Option<PathBuf>,
    pub(crate) interval: Duration,
    /// Ring buffer bytes: a power of two, at least a page.
    pub(crate) ring_size: u32,
    /// Kernel memory for the counting map (`--count-memory`), for all CPUs together.
    pub(crate) count_memory: u64,
    /// Routing lookups as `route` events.
    pub(crate) routes: bool,
    /// Every drop, not only of packets whose mark was written.
    pub(crate) all_drops: bool,
    /// A `stats` record this often.
    pub(crate) stats: Option<Duration>,
    /// Serve the counters for Prometheus here.
    pub(crate) metrics: Option<SocketAddr>,
    /// Transitions per pod in the metrics (`--metrics-pods`).
    pub(crate) metrics_pods: bool,
    /// Kernel features whose absence is an error rather than a degradation.
    pub(crate) require: Vec<Feature>,
    pub(crate) nf_backend: NfBackend,
    pub(crate) tc_backend: TcBackend,
    pub(crate) registry: registry::RegistrySources,
    /// Follow only these flows, at every observation point and with their routing lookups.
    pub(crate) select: Selection,
}

impl Default for TraceConfig {
    fn default() -> Self {
        Self {
            format: Format::Human,
            output: None,
            output_file: FileOptions::default(),
            mark: None,
            ifaces: Vec::new(),
            netns: None,
            duration: None,
            count: None,
            full_path: false,
            per_packet: false,
            record: None,
            interval: INTERVAL,
            ring_size: RING_SIZE,
            count_memory: AGG_BUDGET,
            routes: false,
            all_drops: false,
            stats: None,
            metrics: None,
            metrics_pods: false,
            require: Vec::new(),
            nf_backend: NfBackend::Auto,
            tc_backend: TcBackend::Auto,
            registry: registry::RegistrySources::default(),
            select: Selection::default(),
        }
    }
}

impl TraceConfig {
    /// Whether transitions are counted in the kernel (the default) rather than sent per packet.
    pub(crate) fn counted(&self) -> bool {
        !(self.per_packet || self.full_path || self.select.active() || self.record.is_some())
    }
}

/// The capabilities tracing needs where `cfg` traces (`privileges`).
pub(crate) fn require_capabilities(cfg: &TraceConfig) -> Result<()> {
    use crate::privileges::{check, Command, WhichNetns};
    let netns = match cfg.netns {
        Some(_) => WhichNetns::Other,
        None => WhichNetns::Own,
    };
    check("fwmark-trace trace", Command::Trace(netns))
}

/// Attaches everything in the current (or `--netns`) namespace and runs until stopped.
/// `on_ready` runs once everything is attached (the demo starts its traffic there).
pub(crate) fn run(cfg: &TraceConfig, on_ready: impl FnOnce()) -> Result<Summary> {
    // What the arguments can get wrong fails before the output file is opened (a misspelt
    // owner must not touch yesterday's log); the file is emptied only at the first record.
    Registry::load(&cfg.registry)?;
    require_capabilities(cfg)?;
    // Written on a thread of its own: a reader that stops reading must not stop the daemon.
    let mut out = Output::open(cfg.format, cfg.output.as_deref(), cfg.output_file)?.queued()?;
    let summary = run_into(cfg, &mut out, Owners::Named, on_ready)?;
    // A failed write stopped the run: its summary is on stderr, its error comes now.
    match out.take_error() {
        Some(err) => Err(err),
        None => Ok(summary),
    }
}

/// Like `run`, sending everything to `sink` (`why` collects flows this way, its `owners`
/// unread).
pub(crate) fn run_into(
    cfg: &TraceConfig,
    sink: &mut dyn Sink,
    owners: Owners,
    on_ready: impl FnOnce(),
) -> Result<Summary> {
    // Bad registry files or owner names fail before anything is attached.
    let registry = Registry::load(&cfg.registry)?;
    require_capabilities(cfg)?;
    // In the node's namespace, before entering a traced one.
    let endpoint = cfg.metrics.map(metrics::bind).transpose()?;
    let netns = match &cfg.netns {
        Some(spec) => netns::enter(spec)?,
        None => 0,
    };
    let own_netns = netns::current()?;
    let opts = Options {
        mark: cfg.mark,
        netns,
        ifaces: (!cfg.ifaces.is_empty()).then(|| cfg.ifaces.clone()),
        // A followed flow is shown at every point, with the tables its lookups chose.
        full_path: cfg.full_path || cfg.select.active(),
        ring_bytes: cfg.ring_size,
        require: cfg.require.clone(),
        nf_backend: cfg.nf_backend,
        tc_backend: cfg.tc_backend,
        routes: cfg.routes || cfg.select.active(),
        all_drops: cfg.all_drops,
        aggregate: cfg.counted(),
        // Sized by memory, not by CPU count (a per-CPU map grows with the CPUs).
        agg_entries: agg_entries(
            cfg.count_memory,
            aya::util::nr_cpus().map_or(1, |n| n as u64),
        ),
        flow: cfg.select.kernel_filter(),
    };
    let descriptors = raise_nofile();
    info!("descriptors: up to {descriptors} (the tc observers take 4 per interface)");
    let mut obs = Observers::start(&opts)?;
    // Per-interface detail only at debug level (RUST_LOG=debug): hundreds of lines otherwise.
    let detail = log_enabled!(Level::Debug);
    for s in startup::lines(obs.report())
        .iter()
        .filter(|s| detail || !s.detail_only)
    {
        let line = format!(
            "[{}] {}: {}",
            if s.ok { "ok" } else { "--" },
            s.point,
            s.detail
        );
        if s.detail_only {
            debug!("{line}");
        } else {
            info!("{line}");
        }
    }
    // Without a profile, attribution names the owners with something here (the inventory of
    // this namespace's rules, programs, sockets and devices) and finds writers by what they
    // write.
    let node = (owners == Owners::Named && !registry.profiled())
        .then(|| read_node(&registry))
        .flatten();
    let mut attributor = Attributor::new(registry);
    let node = node.map(|(refresher, inv)| {
        attributor.set_node(NamespaceInventory::new(inv, own_netns));
        refresher
    });
    if let Some(present) = attributor.present() {
        let registry = attributor.registry();
        let mut present: Vec<&str> = present.iter().map(|o| registry.name(*o)).collect();
        present.sort_unstable();
        info!(
            "owners with mark rules, programs or sockets here: {}; attribution names only these (--owners chooses)",
            if present.is_empty() { "none".into() } else { present.join(", ") }
        );
    }
    if let Some(l) = &endpoint {
        info!("metrics at http://{}/metrics", l.local_addr()?);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    sink.set_registry(attributor.registry());
    let summary = rt.block_on(stream(
        &mut obs,
        sink,
        cfg,
        own_netns,
        (attributor, node),
        endpoint,
        on_ready,
    ))?;
    info!("{summary}");
    Ok(summary)
}

/// What the run's reader takes of attribution: `trace` writes it, and names with the node's
/// inventory only the owners present; `why` reads none of it, so it reads no inventory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Owners {
    Named,
    Unread,
}

/// The traced namespace's inventory, read now for attribution to name the owners present
/// (conntrack entries left out: they hold marks, they do not write them), and what reads it
/// again as rules and programs change. None when it cannot be read: it is said, and
/// attribution goes on by names.
fn read_node(registry: &Registry) -> Option<(Refresher, Inventory)> {
    match Refresher::start(registry, Sources::ALL.without(Source::Conntrack)) {
        Ok(read) => Some(read),
        Err(err) => {
            warn!("node inventory unavailable ({err:#}): attribution considers every registered owner");
            None
        }
    }
}

/// The next node inventory read, once back (never without a node).
async fn next_read(node: Option<&mut Refresher>) -> Result<Inventory> {
    match node {
        Some(n) => n.next().await,
        None => std::future::pending().await,
    }
}

/// This namespace's Open vSwitch bridges (ports, flows writing pkt_mark), read through OVS's
/// tools: only where a kernel datapath is, and again at most every `OvsView::EVERY` (each read
/// runs a process per bridge).
#[derive(Default)]
struct OvsView {
    read_at: Option<Instant>,
    bridges: Vec<crate::inventory::ovs::Bridge>,
}

impl OvsView {
    const EVERY: Duration = Duration::from_secs(10);

    fn bridges(&mut self, datapath: bool) -> Vec<crate::inventory::ovs::Bridge> {
        if !datapath {
            self.bridges.clear();
        } else if self.read_at.is_none_or(|t| t.elapsed() >= Self::EVERY) {
            self.read_at = Some(Instant::now());
            self.bridges = crate::inventory::ovs::bridges_here().unwrap_or_else(|e| {
                debug!("reading Open vSwitch bridges: {e:#}");
                Vec::new()
            });
        }
        self.bridges.clone()
    }
}

fn topology(obs: &Observers, own_netns: u32, ovs: &mut OvsView) -> Topology {
    let mut t = Topology {
        plan: Some(obs.plan().clone()),
        chains: obs.chains().to_vec(),
        own_netns,
        ..Default::default()
    };
    t.tc_filters = obs.tc_backend() == Some(TcBackend::Clsact);
    for (ifindex, iface) in obs.tc_interfaces() {
        t.ifnames.insert(*ifindex, iface.name.clone());
        for (dir, progs) in crate::netstack::TcDir::ALL.into_iter().zip(&iface.chain) {
            t.tc_programs.insert((*ifindex, dir), progs.clone());
        }
    }
    // One link dump: names, tunnel devices (named by kind and id: without them an
    // encapsulation is still reported, by ifindex) and whether OVS has a datapath here.
    let links = crate::nodestate::links::read().unwrap_or_else(|e| {
        debug!("listing links: {e:#}");
        Default::default()
    });
    for (i, n) in &links.names {
        t.ifnames.entry(*i).or_insert_with(|| n.clone());
    }
    t.ovs = ovs.bridges(links.openvswitch);
    // A WireGuard device puts its fwmark on its outer packets.
    let wireguard = links.wireguard();
    t.tunnels = links.tunnels;
    if !wireguard.is_empty() {
        match crate::inventory::wireguard::kernel_devices(&wireguard) {
            Ok(devices) => {
                for d in devices {
                    if let Some(TunnelKind::Wireguard { fwmark }) = t.tunnels.get_mut(&d.ifindex) {
                        *fwmark = Some(d.fwmark);
                    }
                }
            }
            Err(e) => debug!("reading WireGuard devices: {e:#}"),
        }
    }
    match crate::nodestate::netlink::xfrm_states() {
        Ok(states) => t.xfrm_states = states,
        Err(e) => debug!("listing xfrm states: {e:#}"),
    }
    t.pods = crate::nodestate::pods::by_netns()
        .into_iter()
        .map(|(ns, c)| (ns, std::sync::Arc::new(c)))
        .collect();
    t
}

/// The pieces of one run's loop that the arms share, and its steps.
struct Run<'a> {
    obs: &'a mut Observers,
    out: &'a mut dyn Sink,
    cfg: &'a TraceConfig,
    own_netns: u32,
    pipeline: Pipeline,
    summary: Summary,
    recorder: Option<Recorder>,
    limit: u64,
    /// What the kernel counts (the default), reported once per interval.
    counts: Option<KernelCounts>,
    /// When the interval being counted began.
    interval_start: SystemTime,
    /// The node's inventory attribution names the owners with (none with a profile, for
    /// `why`, or when it could not be read at start-up).
    node: Option<Refresher>,
    /// Records drained while the node is read again: attributed once it is back, as they
    /// would have been had it been read before they were drained.
    held: Vec<Held>,
    ovs: OvsView,
    gauges: GaugeCache,
    /// Lost events already reported.
    lost_seen: u64,
    /// The last interface refresh failed (said once, tried again every tick).
    refresh_failed: bool,
    ticks: u64,
    last_stats: Instant,
}

/// A record waiting for the node's inventory.
enum Held {
    Record(Event),
    Counted(Counted, Interval),
}

/// Whether the run goes on after a tick.
#[derive(Debug, PartialEq, Eq)]
enum Tick {
    Go,
    /// The traced namespace is gone.
    Stop,
}

async fn stream(
    obs: &mut Observers,
    out: &mut dyn Sink,
    cfg: &TraceConfig,
    own_netns: u32,
    (attributor, node): (Attributor, Option<Refresher>),
    endpoint: Option<std::net::TcpListener>,
    on_ready: impl FnOnce(),
) -> Result<Summary> {
    let metrics_addr = endpoint.as_ref().and_then(|l| l.local_addr().ok());
    let mut scrapes = endpoint.map(metrics::serve).transpose()?;
    let started = Instant::now();
    // SAFETY: the AsyncFd owns the ring buffer, so its fd stays open while registered.
    let mut ring =
        unsafe { AsyncFd::register(obs.take_ring()?) }.context("polling the ring buffer")?;
    let mut run = Run::new(obs, out, cfg, own_netns, attributor, node)?;
    let period = cfg.interval.max(Duration::from_millis(100));
    // The first report after one whole interval (tokio's first tick is immediate).
    let mut interval = time::interval_at(time::Instant::now() + period, period);
    let mut tick = time::interval(Duration::from_secs(1));
    let mut drain_tick = time::interval(Duration::from_millis(50));
    let mut sigterm = unix::signal(unix::SignalKind::terminate())?;
    let mut sigint = unix::signal(unix::SignalKind::interrupt())?;
    // SIGHUP reopens the output file by name (logrotate moved it away); only with a file, so
    // that a hangup still ends a run that writes to a terminal.
    let mut sighup = cfg
        .output
        .is_some()
        .then(|| unix::signal(unix::SignalKind::hangup()))
        .transpose()?;
    // Ready only now: a Ctrl-C (or a test's SIGINT) from here on stops the run cleanly.
    let attached = startup::lines(run.obs.report())
        .iter()
        .filter(|s| s.ok && !s.detail_only)
        .count();
    info!("tracing ({attached} observation groups attached, netns {own_netns}); Ctrl-C to stop");
    // Ready: the record (JSON), then systemd.
    run.out
        .ready(&ReadyRecord::new(run.obs, own_netns, metrics_addr))?;
    ready::notify_systemd();
    on_ready();
    let deadline = time::sleep(cfg.duration.unwrap_or(Duration::from_secs(u64::MAX / 4)));
    tokio::pin!(deadline);
    let mut signalled_at = None;

    'run: loop {
        // A write failed (full disk, closed pipe): stop as if signalled, with the summary.
        if run.out.failed() {
            break;
        }
        tokio::select! {
            guard = ring.readable_mut(), if run.draining() => {
                let mut guard = guard?;
                match run.drain(guard.get_inner_mut())? {
                    Drained::Empty => guard.clear_ready(),
                    // Still more under sustained load: signals, ticks and scrapes go first.
                    Drained::Budget => {
                        drop(guard);
                        tokio::task::yield_now().await;
                    }
                    Drained::Limit => break 'run,
                }
            }
            _ = interval.tick(), if run.counts.is_some() => {
                if run.report_interval()? {
                    break;
                }
            }
            // The kernel wakes us only for large batches; drain the rest often.
            _ = drain_tick.tick() => {
                if run.drain(ring.get_mut())? == Drained::Limit {
                    break;
                }
            }
            _ = tick.tick() => {
                if run.tick()? == Tick::Stop {
                    break;
                }
            }
            read = next_read(run.node.as_mut()) => {
                if run.node_read(read)? {
                    break;
                }
            }
            Some(reply) = metrics::next(scrapes.as_mut()) => run.scrape(reply),
            Some(()) = signalled(sighup.as_mut()) => run.out.reopen()?,
            _ = sigint.recv() => {
                signalled_at = Some(Instant::now());
                break;
            }
            _ = sigterm.recv() => {
                signalled_at = Some(Instant::now());
                break;
            }
            _ = &mut deadline => break,
        }
    }
    // What the kernel wrote before the stop: as much as the ring held then (under sustained
    // load it never runs empty), and after a signal only as long as the time allows.
    let drain_by = signalled_at.map(|at| at + STOP_WITHIN / 2);
    run.release_at_stop(drain_by.unwrap_or_else(|| Instant::now() + FINISH_WAIT))
        .await?;
    // Whatever the kernel counted or wrote before we stopped is still reported.
    run.report_counts(SystemTime::now())?;
    let mut left = cfg.ring_size as usize / std::mem::size_of::<Event>() + DRAIN_BUDGET;
    while run.drain(ring.get_mut())? == Drained::Budget {
        left = left.saturating_sub(DRAIN_BUDGET);
        if left == 0 || drain_by.is_some_and(|t| Instant::now() >= t) {
            warn!("stopped with records still in the ring buffer: they were not read");
            break;
        }
    }
    run.finish(started, signalled_at)
}

/// How long after SIGINT/SIGTERM the output may still take (detaching follows it).
const STOP_WITHIN: Duration = Duration::from_millis(700);
/// How long a run ended by `--duration` or `--count` waits for a slow reader.
const FINISH_WAIT: Duration = Duration::from_secs(5);

/// What `drain` left in the ring.
#[derive(Debug, PartialEq, Eq)]
enum Drained {
    Empty,
    /// It stopped with more waiting: after `DRAIN_BUDGET` records, or with as many held for
    /// the node's inventory as the ring holds (the rest waits in the ring until it is back).
    Budget,
    /// `--count` is reached.
    Limit,
}

/// Records one `drain` takes before the loop serves its other arms.
const DRAIN_BUDGET: usize = 4096;

/// Raises the soft limit on open descriptors to the hard one (the tc observers take four per
/// interface: a node with hundreds of interfaces exceeds the usual 1024) and returns it.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit through a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                ..lim
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    lim.rlim_cur
}

/// Events lost so far, per reason: the kernel's, what the counting map evicted unread, and
/// what the output had no room for.
fn lost_now(obs: &Observers, counts: Option<&KernelCounts>, output: u64) -> Lost {
    Lost {
        evicted: counts.map_or(0, KernelCounts::evicted),
        output,
        ..obs.lost()
    }
}

/// The next delivery of `signal`, if there is one to wait for.
async fn signalled(signal: Option<&mut unix::Signal>) -> Option<()> {
    match signal {
        Some(s) => s.recv().await,
        None => std::future::pending().await,
    }
}

/// What `--stats` records and the metrics read from the kernel side and the process.
/// The gauges scrapes and stats records show. Counting the tracked packets walks the kernel's
/// per-packet map (65,536 entries, two syscalls each) on the draining thread: done again at
/// most every `GaugeCache::EVERY`, not per scrape.
#[derive(Default)]
struct GaugeCache {
    walked: Option<(Instant, usize)>,
}

impl GaugeCache {
    const EVERY: Duration = Duration::from_secs(30);

    fn get(&mut self, obs: &Observers) -> Gauges {
        let tracked_packets = match self.walked {
            Some((at, n)) if at.elapsed() < Self::EVERY => n,
            _ => {
                let n = obs.tracked_packets();
                self.walked = Some((Instant::now(), n));
                n
            }
        };
        Gauges {
            tracked_packets,
            interfaces: obs.tc_interfaces().count(),
            rss_kb: rss_kb(),
        }
    }
}

/// Resident set size of this process (kB), from /proc.
pub(crate) fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

impl<'a> Run<'a> {
    fn new(
        obs: &'a mut Observers,
        out: &'a mut dyn Sink,
        cfg: &'a TraceConfig,
        own_netns: u32,
        attributor: Attributor,
        node: Option<Refresher>,
    ) -> Result<Self> {
        let mut ovs = OvsView::default();
        let decoder = Decoder::new(
            topology(obs, own_netns, &mut ovs),
            obs.drop_reasons().clone(),
        );
        out.plan(&PlanRecord::of(obs))?;
        let counts = cfg.counted().then(|| obs.take_counts()).transpose()?;
        let mut recorder = cfg.record.as_deref().map(Recorder::create).transpose()?;
        if let Some(r) = recorder.as_mut() {
            r.context(&decoder)?;
        }
        Ok(Run {
            obs,
            out,
            cfg,
            own_netns,
            pipeline: Pipeline {
                decoder,
                attributor,
            },
            summary: Summary {
                by_pod: cfg.metrics_pods.then(BTreeMap::new),
                ..Summary::default()
            },
            recorder,
            limit: cfg.count.unwrap_or(u64::MAX),
            counts,
            interval_start: SystemTime::now(),
            node,
            held: Vec::new(),
            ovs,
            gauges: GaugeCache::default(),
            lost_seen: 0,
            refresh_failed: false,
            ticks: 0,
            last_stats: Instant::now(),
        })
    }

    /// Events lost so far, per reason: the kernel's, what the counting map evicted unread, and
    /// what the output had no room for.
    fn lost(&self) -> Lost {
        lost_now(self.obs, self.counts.as_ref(), self.out.dropped())
    }

    /// Whether the node is being read again (records wait for it).
    fn holding(&self) -> bool {
        self.node.as_ref().is_some_and(Refresher::reading)
    }

    /// Whether the ring is drained now: not while as many records are held as it holds.
    fn draining(&self) -> bool {
        self.held.len() < self.cfg.ring_size as usize / std::mem::size_of::<Event>()
    }

    /// Writes the records waiting in the ring (raw to the recorder when recording), at most
    /// `DRAIN_BUDGET` of them.
    fn drain(&mut self, rb: &mut RingBuf<MapData>) -> Result<Drained> {
        for _ in 0..DRAIN_BUDGET {
            if self.summary.records >= self.limit {
                return Ok(Drained::Limit);
            }
            if !self.draining() {
                return Ok(Drained::Budget);
            }
            let Some(item) = rb.next() else {
                return Ok(Drained::Empty);
            };
            if item.len() < std::mem::size_of::<Event>() {
                continue;
            }
            if let Some(r) = self.recorder.as_mut() {
                r.record(&item[..std::mem::size_of::<Event>()])?;
                self.summary.records += 1;
                self.summary.total_events += 1;
                continue;
            }
            // SAFETY: the kernel wrote a whole `Event` (length checked above); the ring only
            // guarantees 8-byte alignment, so it is read unaligned.
            let raw: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            drop(item);
            if self.holding() {
                self.held.push(Held::Record(raw));
            } else {
                self.write_record(&raw)?;
            }
        }
        Ok(Drained::Budget)
    }

    /// One packet's record, decoded, attributed and written (unless `--flow` and the like
    /// leave it out).
    fn write_record(&mut self, raw: &Event) -> Result<()> {
        let ev = self.pipeline.event(raw);
        if self.cfg.select.active() && !self.cfg.select.wants_event(&ev) {
            return Ok(());
        }
        self.out.event(&ev)?;
        self.summary.count(&ev);
        Ok(())
    }

    /// One transition the kernel counted in `interval`, written.
    fn write_counted(&mut self, c: &Counted, interval: Interval) -> Result<()> {
        let ev = self.pipeline.counted(&c.exemplar, c.packets, interval);
        self.out.event(&ev)?;
        self.summary.count(&ev);
        Ok(())
    }

    /// The interval's end: the kernel counts into a new epoch and what it counted in this one
    /// is written. True when `--count` is reached.
    fn report_interval(&mut self) -> Result<bool> {
        self.obs.next_epoch()?;
        self.report_counts(SystemTime::now())
    }

    /// Writes what the kernel counted since the interval began until `end`, one event per
    /// distinct transition; true when `--count` is reached.
    fn report_counts(&mut self, end: SystemTime) -> Result<bool> {
        let interval = Interval {
            start: Timestamp(std::mem::replace(&mut self.interval_start, end)),
            end: Timestamp(end),
        };
        let Some(counts) = self.counts.as_mut() else {
            return Ok(false);
        };
        let mut counted = counts.read();
        // Sockets' own marks first: the owners they show are on the node for what follows.
        counted.sort_by_key(|c| c.exemplar.prev.layer != fwmark_trace_common::layer::SOCKET);
        if self.holding() {
            self.held
                .extend(counted.into_iter().map(|c| Held::Counted(c, interval)));
            return Ok(false);
        }
        for c in counted {
            if self.summary.records >= self.limit {
                return Ok(true);
            }
            self.write_counted(&c, interval)?;
        }
        Ok(self.summary.records >= self.limit)
    }

    /// The once-a-second jobs, in order.
    fn tick(&mut self) -> Result<Tick> {
        self.obs.flush_log();
        self.out.tick()?;
        self.report_lost()?;
        let programs_changed = self.refresh_interfaces();
        let ruleset = self.refresh_chains()?;
        self.refresh_node(programs_changed, ruleset);
        self.refresh_topology()?;
        if let Some(spec) = self.netns_gone() {
            // We hold the namespace alive ourselves; what we traced is gone for everyone else.
            warn!("network namespace {spec} was deleted; stopping");
            return Ok(Tick::Stop);
        }
        self.report_stats()?;
        Ok(Tick::Go)
    }

    /// A `lost` record when more events were lost since the last one.
    fn report_lost(&mut self) -> Result<()> {
        let reasons = self.lost();
        let lost = reasons.total();
        if lost > self.lost_seen {
            self.out.lost(&LostRecord {
                time: Timestamp::now(),
                kind: "lost",
                lost: lost - self.lost_seen,
                total_lost: lost,
                reasons: Some(reasons),
            })?;
            if let Some(r) = self.recorder.as_mut() {
                // The recording's own counts: it is written here, not by the output.
                r.lost(Lost {
                    output: 0,
                    ..reasons
                })?;
            }
            self.lost_seen = lost;
        }
        Ok(())
    }

    /// Observers for new interfaces and tc programs; whether any changed.
    fn refresh_interfaces(&mut self) -> bool {
        // A failed refresh (out of descriptors, a netlink hiccup) is said once and tried
        // again next tick: the observers already attached go on.
        match self.obs.refresh_interfaces() {
            Ok(changes) => {
                self.refresh_failed = false;
                for change in &changes {
                    info!("{change}");
                }
                !changes.is_empty()
            }
            Err(e) => {
                if !self.refresh_failed {
                    self.refresh_failed = true;
                    warn!("re-reading the interfaces failed ({e:#}); trying again every second");
                }
                false
            }
        }
    }

    /// Every third tick, band observers for new nft chains (and a new plan record); the
    /// ruleset listed, when the chains changed.
    fn refresh_chains(&mut self) -> Result<Option<Vec<serde_json::Value>>> {
        self.ticks += 1;
        if !self.ticks.is_multiple_of(3) {
            return Ok(None);
        }
        let (changes, ruleset) = self.obs.refresh_chains();
        for change in &changes {
            info!("{change}");
        }
        if changes.is_empty() {
            return Ok(None);
        }
        self.out.plan(&PlanRecord::of(self.obs))?;
        Ok(ruleset)
    }

    /// New rules or tc programs: who writes what, read again (only what changed, off the
    /// draining thread: see `Refresher`).
    fn refresh_node(&mut self, programs_changed: bool, ruleset: Option<Vec<serde_json::Value>>) {
        let Some(node) = self.node.as_mut() else {
            return;
        };
        let mut changed = Sources::NONE;
        if programs_changed {
            changed = changed.with(Source::Bpf);
        }
        if ruleset.is_some() {
            // The chains list both: nft's ruleset and iptables-legacy's tables.
            changed = changed.with(Source::Nft).with(Source::IptablesLegacy);
        }
        node.read(changed, ruleset);
    }

    /// Interfaces, tc chains, nft chains, tunnels and pods as segments name them.
    fn refresh_topology(&mut self) -> Result<()> {
        let topology = topology(self.obs, self.own_netns, &mut self.ovs);
        if self.pipeline.set_topology(topology) {
            if let Some(r) = self.recorder.as_mut() {
                r.context(&self.pipeline.decoder)?;
            }
        }
        Ok(())
    }

    /// The `--netns` traced, when it was deleted.
    fn netns_gone(&self) -> Option<&str> {
        self.cfg
            .netns
            .as_deref()
            .filter(|s| !netns::path_of(s).exists())
    }

    /// A `stats` record every `--stats`.
    fn report_stats(&mut self) -> Result<()> {
        let Some(every) = self.cfg.stats.filter(|s| !s.is_zero()) else {
            return Ok(());
        };
        if self.last_stats.elapsed() < every {
            return Ok(());
        }
        self.last_stats = Instant::now();
        let g = self.gauges.get(self.obs);
        self.out.stats(&StatsRecord {
            time: Timestamp::now(),
            kind: "stats",
            rss_kb: g.rss_kb,
            events: self.summary.total_events,
            lost: self.lost().total(),
            tracked_packets: g.tracked_packets,
            interfaces: g.interfaces,
        })
    }

    /// The node's inventory read again: attribution uses it from now on, the records held for
    /// it first; what changed meanwhile is read next. True when `--count` is reached.
    fn node_read(&mut self, read: Result<Inventory>) -> Result<bool> {
        self.node_arrived(read);
        if let Some(node) = self.node.as_mut() {
            node.read(Sources::NONE, None);
        }
        self.release()
    }

    /// A node read is back: attribution uses it from now on (the last one, when it failed).
    fn node_arrived(&mut self, read: Result<Inventory>) {
        let Some(node) = self.node.as_mut() else {
            return;
        };
        match node.arrived(read) {
            Ok(inv) => self
                .pipeline
                .attributor
                .set_node(NamespaceInventory::new(inv, self.own_netns)),
            Err(err) => warn!(
                "re-reading the node inventory failed ({err:#}): attribution goes on with the last one"
            ),
        }
    }

    /// Writes the records held for the node's inventory; true when `--count` is reached.
    fn release(&mut self) -> Result<bool> {
        for held in std::mem::take(&mut self.held) {
            if self.summary.records >= self.limit {
                return Ok(true);
            }
            match held {
                Held::Record(raw) => self.write_record(&raw)?,
                Held::Counted(c, interval) => self.write_counted(&c, interval)?,
            }
        }
        Ok(self.summary.records >= self.limit)
    }

    /// At the stop, the node read under way is waited for until `by` (then what was held
    /// for it is attributed with the node as it was); none is started after it.
    async fn release_at_stop(&mut self, by: Instant) -> Result<()> {
        if let Some(node) = self.node.as_mut().filter(|n| n.reading()) {
            let wait = by.saturating_duration_since(Instant::now());
            match time::timeout(wait, node.next()).await {
                Ok(read) => self.node_arrived(read),
                Err(_) => {
                    warn!("the node's inventory was not read again in time: the last records are attributed with the one before");
                    node.abandon();
                }
            }
        }
        self.release()?;
        Ok(())
    }

    /// Answers a metrics scrape.
    fn scrape(&mut self, reply: metrics::Scrape) {
        self.summary.lost = self.lost().total();
        self.summary.attribution = self.pipeline.attributor.totals();
        let _ = reply.send(metrics::render(&self.summary, &self.gauges.get(self.obs)));
    }

    /// The recording closed, the summary written, the output finished.
    fn finish(mut self, started: Instant, signalled_at: Option<Instant>) -> Result<Summary> {
        if let Some(r) = self.recorder.as_mut() {
            r.finish(lost_now(self.obs, self.counts.as_ref(), 0))?;
            info!(
                "recorded {} records; show them with `fwmark-trace show {}`",
                r.records,
                self.cfg
                    .record
                    .as_deref()
                    .unwrap_or(std::path::Path::new("FILE"))
                    .display()
            );
        }
        let mut summary = std::mem::take(&mut self.summary);
        summary.lost = self.lost().total();
        summary.attribution = self.pipeline.attributor.totals();
        summary.duration_s = started.elapsed().as_secs_f64();
        if self.cfg.format == Format::Json {
            self.out.summary(&summary)?;
        }
        // A signal ends the daemon within a second whatever its reader does; otherwise the
        // reader gets longer to take the rest.
        let by = match signalled_at {
            Some(at) => at + STOP_WITHIN,
            None => Instant::now() + FINISH_WAIT,
        };
        let unwritten = self.out.finish(by)?;
        if unwritten > 0 {
            warn!("{unwritten} records were not written: the output's reader did not keep up");
            summary.lost += unwritten;
        }
        Ok(summary)
    }
}
