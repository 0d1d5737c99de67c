//! Loads the kernel object and attaches every observer: tp_btf tracepoints (aya; the common
//! crate's `TRACEPOINTS` table), netfilter links (raw, see `netfilter.rs`) or else fentry/fexit
//! on the chain evaluators (`nf_chains.rs`), and tc programs (see `tcx.rs`). An observation
//! point that cannot attach is reported with the kernel's reason (a `startup::Status`) and the
//! run goes on without it. `Observers::start` is a row of steps, one function each.
use std::{
    collections::{BTreeSet, HashMap},
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
    time::Instant,
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::BtfTracePoint,
    Btf, Ebpf, EbpfLoader,
};
use fwmark_trace_common::{
    layer, lost_reason, AggKey, AggValue, Config, Control, FlowFilter, Offsets, GLOBAL_CONFIG,
    MAP_AGG, MAP_CONTROL, MAP_EVENTS, MAP_IFACES, MAP_LOST, OFFSET_MISSING, TRACEPOINTS,
};

use super::{
    btf::{self, KernelBtf},
    counts::KernelCounts,
    features::{self, Feature, NfBackend, TcBackend},
    netfilter::{NfPrograms, NfSite, RawObject},
    nf_chains::{self, Found},
    object::OBJECT,
    plan::{NfPlan, PlanMode},
    startup::{self, NfChange, NfLinked, NothingAttached, Status},
    sys,
    tc_placement::Placement,
    tcx::{Interface, OwnFilter, TcObserverChange, TcObservers},
};
use crate::nodestate::{nft, watch::Watcher};

pub(crate) struct Options {
    pub(crate) mark: Option<crate::mark::MarkMatch>,
    /// Network namespace inode to report (0: all).
    pub(crate) netns: u32,
    pub(crate) ifaces: Option<Vec<String>>,
    pub(crate) full_path: bool,
    pub(crate) ring_bytes: u32,
    /// Features that must be available (else: an error instead of degrading).
    pub(crate) require: Vec<Feature>,
    pub(crate) nf_backend: NfBackend,
    pub(crate) tc_backend: TcBackend,
    /// Report routing table lookups.
    pub(crate) routes: bool,
    /// Report every drop, also of packets whose mark nothing changed.
    pub(crate) all_drops: bool,
    /// Count transitions and drops in the kernel instead of reporting each packet.
    pub(crate) aggregate: bool,
    /// Distinct transitions the counting map holds (`agg_entries`).
    pub(crate) agg_entries: u32,
    /// The followed flows, pre-filtered in the kernel.
    pub(crate) flow: FlowFilter,
}

/// Everything this run loaded and attached, kept until it exits (dropping it detaches all).
pub(crate) struct Observers {
    ebpf: Ebpf,
    /// The netfilter back-end in use (`None`: netfilter is not observed).
    nf_backend: Option<NfBackend>,
    tc: Option<TcObservers>,
    plan: NfPlan,
    chains: Vec<nft::Chain>,
    drop_reasons: HashMap<u32, String>,
    report: Vec<Status>,
    /// Kernel-side log records (aya-log); keeping it keeps its ring buffer alive.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Kept to link band observers for chains that appear during the run.
    nf: Option<NfPrograms>,
    nf_links: Vec<OwnedFd>,
    /// nftables change notifications: the ruleset is read again only after one (`None`:
    /// unavailable, read at every refresh).
    nft_watch: Option<Watcher>,
}

/// What the kernel tells about itself before anything is loaded.
struct KernelFacts {
    btf: Arc<KernelBtf>,
    offsets: Offsets,
    drop_reasons: HashMap<u32, String>,
}

/// The loaded object.
struct Loaded {
    ebpf: Ebpf,
    /// For the programs aya cannot load (netfilter, fentry/fexit).
    raw: Result<RawObject>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

/// The netfilter observers attached.
struct Netfilter {
    plan: NfPlan,
    nf: Option<NfPrograms>,
    links: Vec<OwnedFd>,
}

impl Observers {
    /// Loads and attaches everything in the current network namespace (the caller has
    /// entered the traced one). Fails only when nothing useful could be attached.
    pub(crate) fn start(opts: &Options) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!("this binary was built without its eBPF object (AYA_BUILD_SKIP); rebuild with `cargo xtask build`");
        }
        let mut kernel = read_kernel(&opts.require)?;
        let mut report = Vec::new();
        let nf_backend = choose_nf_backend(opts.nf_backend, &kernel.btf, &mut report)?;
        // For fentry, the evaluators this kernel has: their argument layouts go into the
        // configuration the observers are loaded with.
        let evaluators = match nf_backend {
            Some(NfBackend::Fentry) => find_evaluators(&mut kernel, &mut report),
            _ => Vec::new(),
        };
        let aya_btf = Btf::from_sys_fs().context("reading kernel BTF for aya")?;
        let Loaded {
            mut ebpf,
            raw,
            logger,
        } = load(opts, kernel.offsets, &aya_btf)?;
        if let Some(names) = &opts.ifaces {
            only_interfaces(&mut ebpf, names)?;
        }
        attach_tracepoints(&mut ebpf, &aya_btf, opts.routes, &mut report);
        // Listening before the first read: a change in between is not missed.
        let nft_watch = Watcher::nftables().ok();
        let chains = read_chains().map(|(c, _)| c).unwrap_or_else(|err| {
            report.push(Status::ChainsUnread(err));
            Vec::new()
        });
        let mode = if opts.full_path {
            PlanMode::Full
        } else {
            PlanMode::Writers
        };
        let netfilter = attach_netfilter(nf_backend, raw, &evaluators, &chains, mode, &mut report);
        let tc = load_tc(&mut ebpf, opts, &mut report)?;
        set_ct_watch(&mut ebpf, &chains, mode)?;
        let mut me = Self {
            ebpf,
            nf_backend,
            tc,
            plan: netfilter.plan,
            chains,
            drop_reasons: kernel.drop_reasons,
            report,
            logger,
            nf: netfilter.nf,
            nf_links: netfilter.links,
            nft_watch,
        };
        let changes = me.refresh_interfaces()?;
        if let Some(tc) = &me.tc {
            me.report.push(Status::Tc(tc.startup(changes)));
        }
        // The tcx summary is fine with no interface needing observers, but that attached nothing.
        let tc_interfaces = me.tc.as_ref().map_or(0, |t| t.interfaces().len());
        if !startup::attached_something(&me.report, tc_interfaces) {
            let report = std::mem::take(&mut me.report);
            return Err(NothingAttached(report).into());
        }
        Ok(me)
    }

    /// Attaches and detaches tc observers to match the interfaces as they are now.
    pub(crate) fn refresh_interfaces(&mut self) -> Result<Vec<TcObserverChange>> {
        match &mut self.tc {
            Some(tc) => tc.refresh(&mut self.ebpf),
            None => Ok(Vec::new()),
        }
    }

    /// Re-reads the nft chains; when they changed, updates the chain names segments show and
    /// links band observers for new chain priorities. Returns what changed, for the log, and
    /// the ruleset listed then (the node inventory reads its rules from it, not from a second
    /// listing).
    pub(crate) fn refresh_chains(&mut self) -> (Vec<NfChange>, Option<Vec<serde_json::Value>>) {
        if self.nft_watch.as_mut().is_some_and(|w| !w.changed()) {
            return (Vec::new(), None);
        }
        let Ok((chains, ruleset)) = read_chains() else {
            return (Vec::new(), None);
        };
        if chains == self.chains {
            return (Vec::new(), None);
        }
        let mut changes = vec![NfChange::Chains(chains.len())];
        if let Some(nf) = &self.nf {
            for site in self.plan.additions(&chains) {
                match nf.link(site) {
                    Ok((fd, prio)) => {
                        self.nf_links.push(fd);
                        self.plan.add(NfSite {
                            priority: prio,
                            ..site
                        });
                        changes.push(NfChange::BandAdded(site));
                    }
                    Err(err) => changes.push(NfChange::BandFailed(site, err)),
                }
            }
        }
        if let Err(err) = set_ct_watch(&mut self.ebpf, &chains, self.plan.mode) {
            changes.push(NfChange::CtWatchNotUpdated(err));
        }
        self.chains = chains;
        (changes, Some(ruleset))
    }

    /// How start-up went, step by step.
    pub(crate) fn report(&self) -> &[Status] {
        &self.report
    }

    /// Where the netfilter observers are.
    pub(crate) fn plan(&self) -> &NfPlan {
        &self.plan
    }

    /// The nft base chains (and kernel users of the hooks) as last read.
    pub(crate) fn chains(&self) -> &[nft::Chain] {
        &self.chains
    }

    /// The kernel's drop reason names, by value.
    pub(crate) fn drop_reasons(&self) -> &HashMap<u32, String> {
        &self.drop_reasons
    }

    /// The netfilter back-end in use (`None`: netfilter is not observed).
    pub(crate) fn nf_backend(&self) -> Option<NfBackend> {
        self.nf_backend
    }

    /// The tc back-end in use (`None`: tc is not observed).
    pub(crate) fn tc_backend(&self) -> Option<TcBackend> {
        self.tc.as_ref().map(TcObservers::backend)
    }

    /// The interfaces with tc observers, by ifindex.
    pub(crate) fn tc_interfaces(&self) -> impl Iterator<Item = (&u32, &Interface)> {
        self.tc.iter().flat_map(|t| t.interfaces())
    }

    /// The classic tc filters this run attached (the clsact back-end).
    pub(crate) fn own_filters(&self) -> Vec<OwnFilter> {
        self.tc
            .as_ref()
            .map(TcObservers::own_filters)
            .unwrap_or_default()
    }

    /// The kernel's counts of transitions (`--count`), taken out of the object.
    pub(crate) fn take_counts(&mut self) -> Result<KernelCounts> {
        KernelCounts::take(&mut self.ebpf)
    }

    /// The kernel ids of every program this run has loaded and of every link holding one of
    /// them (tracepoints, netfilter, fentry/fexit, tcx): what must be gone once it has exited.
    pub(crate) fn attached_ids(&self) -> (Vec<u32>, Vec<u32>) {
        let mut programs: BTreeSet<u32> = self
            .ebpf
            .programs()
            .filter_map(|(_, p)| p.info().ok())
            .map(|info| info.id())
            .collect();
        programs.extend(self.nf.iter().flat_map(NfPrograms::ids));
        // fentry/fexit programs are held by their links alone.
        programs.extend(
            self.nf_links
                .iter()
                .filter_map(|link| sys::link_ids(link.as_fd()).ok())
                .map(|(_, prog)| prog),
        );
        let links = aya::programs::loaded_links()
            .filter_map(Result::ok)
            .filter(|link| programs.contains(&link.program_id()))
            .map(|link| link.id())
            .collect::<BTreeSet<u32>>();
        (programs.into_iter().collect(), links.into_iter().collect())
    }

    /// Starts a new reporting interval: counted transitions take fresh exemplars in it.
    pub(crate) fn next_epoch(&mut self) -> Result<()> {
        update_control(&mut self.ebpf, |c| c.epoch = c.epoch.wrapping_add(1))
    }

    /// Writes pending kernel log records to the daemon's log.
    pub(crate) fn flush_log(&mut self) {
        if let Some(logger) = &mut self.logger {
            logger.flush();
        }
    }

    pub(crate) fn take_ring(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map(MAP_EVENTS).context("EVENTS map")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Packets with per-packet state in the kernel (LRU map occupancy).
    pub(crate) fn tracked_packets(&self) -> usize {
        self.ebpf
            .map("PACKETS")
            .and_then(|m| {
                aya::maps::HashMap::<_, u64, fwmark_trace_common::PacketState>::try_from(m).ok()
            })
            // Ended packets stay as tombstones until reused or evicted: count live ones (a packet
            // that ended without a report is still live here until its address is reused).
            .map_or(0, |m| {
                m.iter()
                    .filter_map(Result::ok)
                    .filter(|(_, v)| v.live())
                    .count()
            })
    }

    /// Events the kernel lost since load, per reason.
    pub(crate) fn lost(&self) -> Lost {
        let reason = |r: u32| -> u64 {
            self.ebpf
                .map(MAP_LOST)
                .and_then(|m| PerCpuArray::<_, u64>::try_from(m).ok())
                .and_then(|a| a.get(&r, 0).ok())
                .map(|v| v.iter().sum())
                .unwrap_or(0)
        };
        Lost {
            ring_full: reason(lost_reason::RING_FULL),
            count_map_full: reason(lost_reason::COUNT_MAP_FULL),
            ..Lost::default()
        }
    }
}

/// Events lost, per reason, since the observers were loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub(crate) struct Lost {
    /// The ring buffer had no room (per packet: events; counted: transitions' exemplars).
    pub(crate) ring_full: u64,
    /// The counting map refused a new transition (packets).
    pub(crate) count_map_full: u64,
    /// Packets counted in entries the counting map evicted before the daemon read them.
    pub(crate) evicted: u64,
    /// Records the output had no room for: its reader stalled (`output::queue`; not in
    /// recordings, which are written by the draining loop itself).
    pub(crate) output: u64,
}

impl Lost {
    pub(crate) fn total(&self) -> u64 {
        self.ring_full + self.count_map_full + self.evicted + self.output
    }
}

/// How many distinct transitions the counting map holds: as many as `budget` bytes allow on
/// every possible CPU (a per-CPU map: its memory is entries × value × CPUs), within bounds.
pub(crate) fn agg_entries(budget: u64, cpus: u64) -> u32 {
    // Per entry and CPU: the value, and the key and the kernel's bookkeeping once per entry
    // (counted per CPU too, to stay under the budget).
    let per_entry = (size_of::<AggValue>() + size_of::<AggKey>() + 64) as u64 * cpus.max(1);
    (budget / per_entry).clamp(AGG_MIN_ENTRIES as u64, AGG_MAX_ENTRIES as u64) as u32
}

/// The counting map's size bounds: a few hundred distinct transitions are always kept; more
/// than 2^16 distinct ones in an interval is no longer a summary.
const AGG_MIN_ENTRIES: u32 = 256;
const AGG_MAX_ENTRIES: u32 = 1 << 16;

/// The counting map's default memory budget, whatever the CPU count.
pub(crate) const AGG_BUDGET: u64 = 32 << 20;

/// Netfilter observers compare conntrack marks only while some rule writes one (always in full
/// mode): otherwise an unchanged packet mark is all they read.
fn set_ct_watch(ebpf: &mut Ebpf, chains: &[nft::Chain], mode: PlanMode) -> Result<()> {
    let watch = mode == PlanMode::Full || chains.iter().any(|c| c.writes.conntrack);
    update_control(ebpf, |c| c.ct_watch = watch as u32)
}

/// Changes the settings the observers read while running (`Control`).
fn update_control(ebpf: &mut Ebpf, change: impl FnOnce(&mut Control)) -> Result<()> {
    let mut control: aya::maps::Array<_, Control> =
        aya::maps::Array::try_from(ebpf.map_mut(MAP_CONTROL).context("CONTROL map")?)?;
    let mut c = control.get(&0, 0)?;
    change(&mut c);
    control.set(0, c, 0)?;
    Ok(())
}

/// The kernel's BTF and what it gives (struct offsets, drop reason names); fails when a
/// feature `--require` asked for is missing.
fn read_kernel(require: &[Feature]) -> Result<KernelFacts> {
    let btf = Arc::new(KernelBtf::load().context(
        "reading kernel BTF from /sys/kernel/btf/vmlinux (kernel built without CONFIG_DEBUG_INFO_BTF?)",
    )?);
    let offsets = btf::offsets(&btf).context("finding kernel struct offsets in BTF")?;
    let drop_reasons = btf::drop_reason_names(&btf).unwrap_or_default();
    for feature in require {
        if let Err(why) = features::probe(*feature, &btf) {
            bail!("this kernel lacks {feature} ({why}), which --require asked for");
        }
    }
    Ok(KernelFacts {
        btf,
        offsets,
        drop_reasons,
    })
}

/// The netfilter back-end (`None`: netfilter is not observed); an error when the one asked
/// for is missing.
fn choose_nf_backend(
    want: NfBackend,
    btf: &KernelBtf,
    report: &mut Vec<Status>,
) -> Result<Option<NfBackend>> {
    match features::netfilter_backend(want, btf) {
        Err(why) if want != NfBackend::Auto => bail!("--nf-observers {want:?}: {why}"),
        chosen => {
            let backend = chosen.as_ref().ok().map(|(b, _)| *b);
            report.push(Status::NfBackend(chosen));
            Ok(backend)
        }
    }
}

/// The chain evaluators this kernel has, with their argument layouts put into the offsets.
fn find_evaluators(kernel: &mut KernelFacts, report: &mut Vec<Status>) -> Vec<Found> {
    let mut found = Vec::new();
    for e in &nf_chains::EVALUATORS {
        match nf_chains::find(e, &kernel.btf, &mut kernel.offsets) {
            Ok(f) => found.push(f),
            Err(err) => report.push(Status::EvaluatorMissing(e, err)),
        }
    }
    found
}

/// Loads the object with its configuration.
fn load(opts: &Options, offsets: Offsets, aya_btf: &Btf) -> Result<Loaded> {
    let (mark_value, mark_mask) = opts.mark.map_or((0, 0), |m| (m.value.0, m.mask.0));
    let config = Config {
        offsets,
        mark_value,
        mark_mask,
        netns: opts.netns,
        iface_filter: opts.ifaces.is_some() as u32,
        full_path: opts.full_path as u32,
        own_netns: crate::netns::current()?,
        routes: opts.routes as u32,
        all_drops: opts.all_drops as u32,
        aggregate: opts.aggregate as u32,
        flow: opts.flow,
    };
    debug_assert!(config.offsets.skb_mark != OFFSET_MISSING);
    let mut ebpf = EbpfLoader::new()
        .btf(Some(aya_btf))
        .override_global(GLOBAL_CONFIG, &config, true)
        .map_max_entries(MAP_EVENTS, opts.ring_bytes)
        .map_max_entries(MAP_AGG, opts.agg_entries)
        // Kernel-side log statements below the daemon's log level are skipped in the kernel.
        .override_global("AYA_LOG_LEVEL", &(log::max_level() as u8), false)
        .load(OBJECT)
        .context("loading the eBPF object (are you root?)")?;
    // Relocate the raw-loaded programs while every map is still in `ebpf` (the logger takes
    // its ring buffer out); they are loaded and attached later.
    let raw = RawObject::new(OBJECT, ebpf.maps());
    let logger = aya_log::EbpfLogger::init(&mut ebpf)
        .map_err(|err| log::debug!("aya-log not active: {err}"))
        .ok();
    Ok(Loaded { ebpf, raw, logger })
}

/// Reports only the interfaces `names` (`--iface`).
fn only_interfaces(ebpf: &mut Ebpf, names: &[String]) -> Result<()> {
    let present = crate::nodestate::links::list_interfaces()?;
    let mut map: BpfHashMap<_, u32, u8> =
        BpfHashMap::try_from(ebpf.map_mut(MAP_IFACES).context("IFACES map")?)?;
    for name in names {
        let (index, _) = present.iter().find(|(_, n)| n == name).with_context(|| {
            format!("interface {name} not found in the traced network namespace")
        })?;
        map.insert(index, 1, 0)?;
    }
    Ok(())
}

/// Loads and attaches the tp_btf observers (those of routing lookups only with `routes`).
fn attach_tracepoints(ebpf: &mut Ebpf, aya_btf: &Btf, routes: bool, report: &mut Vec<Status>) {
    for t in TRACEPOINTS {
        if t.layer == layer::ROUTING && !routes {
            continue;
        }
        let res = (|| -> Result<()> {
            let p: &mut BtfTracePoint =
                ebpf.program_mut(t.program).context("missing")?.try_into()?;
            let started = Instant::now();
            p.load(t.target, aya_btf)?;
            sys::log_verified(t.program, p.fd()?.as_fd(), started);
            p.attach()?;
            Ok(())
        })();
        report.push(Status::Tracepoint(t, res));
    }
}

/// The nft base chains, with the kernel's own users of the hooks and legacy tables.
fn read_chains() -> Result<(Vec<nft::Chain>, Vec<serde_json::Value>)> {
    let ruleset = nft::read_items()?;
    let mut chains = nft::parse_chains(&ruleset);
    chains.extend(nft::kernel_users());
    chains.extend(nft::legacy_tables());
    Ok((chains, ruleset))
}

/// Attaches the netfilter observers: fentry/fexit on `evaluators`, or links where `mode`
/// places them around `chains`.
fn attach_netfilter(
    backend: Option<NfBackend>,
    raw: Result<RawObject>,
    evaluators: &[Found],
    chains: &[nft::Chain],
    mode: PlanMode,
    report: &mut Vec<Status>,
) -> Netfilter {
    let mut done = Netfilter {
        plan: NfPlan::none(mode),
        nf: None,
        links: Vec::new(),
    };
    match (backend, raw) {
        (None, _) => {}
        (Some(_), Err(err)) => report.push(Status::NfProgramsUnloaded(err)),
        (Some(NfBackend::Fentry), Ok(raw)) => {
            for found in evaluators {
                let attached = nf_chains::attach(&raw, found).map(|links| done.links.extend(links));
                report.push(Status::Evaluator {
                    evaluator: found.evaluator,
                    built_in: found.built_in(),
                    attached,
                });
            }
        }
        (Some(_), Ok(raw)) => {
            done.plan = NfPlan::new(chains, mode);
            match NfPrograms::load(&raw) {
                Ok(progs) => {
                    link_plan(&progs, &mut done.plan, chains, &mut done.links, report);
                    done.nf = Some(progs);
                }
                Err(err) => report.push(Status::NfProgramsUnloaded(err)),
            }
        }
    }
    done
}

/// Links every site of `plan`, moving a site whose priority was taken to where it was linked;
/// failures are reported once per site.
fn link_plan(
    progs: &NfPrograms,
    plan: &mut NfPlan,
    chains: &[nft::Chain],
    links: &mut Vec<OwnedFd>,
    report: &mut Vec<Status>,
) {
    let mut failures: Vec<(NfSite, std::io::Error)> = Vec::new();
    for site in plan.sites().to_vec() {
        match progs.link(site) {
            Ok((fd, prio)) => {
                plan.set_priority(site, prio);
                links.push(fd)
            }
            Err(err) if !failures.iter().any(|(s, _)| *s == site) => failures.push((site, err)),
            Err(_) => {}
        }
    }
    report.push(Status::NfLinks(NfLinked {
        mode: plan.mode,
        planned: plan.sites().len(),
        linked: links.len(),
        merged: plan.merged,
        writers: chains.iter().filter(|c| c.writes.any()).cloned().collect(),
    }));
    report.extend(
        failures
            .into_iter()
            .map(|(site, err)| Status::NfLinkFailed(site, err)),
    );
}

/// Chooses the tc back-end and loads the tc programs (`None`: they could not be loaded); an
/// error when the back-end asked for is missing.
fn load_tc(
    ebpf: &mut Ebpf,
    opts: &Options,
    report: &mut Vec<Status>,
) -> Result<Option<TcObservers>> {
    let (backend, choice) = match features::tc_backend(opts.tc_backend) {
        Ok(chosen) => chosen,
        Err(why) => bail!(
            "--tc-observers {:?}: no tcx on this kernel ({why})",
            opts.tc_backend
        ),
    };
    // Full path shows every point of a packet's path; otherwise only where tc can write.
    let placement = if opts.full_path {
        Placement::Everywhere
    } else {
        Placement::WhereNeeded
    };
    let loaded = TcObservers::load(ebpf, opts.ifaces.clone(), placement, backend);
    report.push(Status::TcBackend {
        backend,
        choice,
        loaded: loaded.is_ok(),
    });
    Ok(loaded
        .map_err(|err| report.push(Status::TcUnloaded(backend, err)))
        .ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counting_map_fits_its_budget_whatever_the_cpus() {
        let bytes = |cpus| {
            agg_entries(AGG_BUDGET, cpus) as u64
                * (size_of::<AggValue>() + size_of::<AggKey>() + 64) as u64
                * cpus
        };
        for cpus in [1, 2, 16, 128] {
            assert!(bytes(cpus) <= AGG_BUDGET, "{cpus} CPUs");
        }
        assert_eq!(agg_entries(AGG_BUDGET, 1), AGG_MAX_ENTRIES);
        // Many CPUs, a small budget: never fewer than the floor.
        assert_eq!(agg_entries(1 << 20, 1024), AGG_MIN_ENTRIES);
    }

    /// The eBPF crate makes its tracepoint and tc programs from the same tables: each is
    /// there, of its kind.
    #[test]
    fn the_object_has_every_program_of_the_tables() {
        if OBJECT.is_empty() {
            eprintln!("skipped: built without the eBPF object (AYA_BUILD_SKIP)");
            return;
        }
        let obj = aya_obj::Object::parse(OBJECT).unwrap();
        for t in TRACEPOINTS {
            let prog = obj.programs.get(t.program);
            assert!(
                prog.is_some_and(|p| matches!(p.section, aya_obj::ProgramSection::BtfTracePoint)),
                "{}",
                t.program
            );
        }
        for t in fwmark_trace_common::TC_OBSERVERS {
            let prog = obj.programs.get(t.program);
            assert!(
                prog.is_some_and(|p| matches!(p.section, aya_obj::ProgramSection::SchedClassifier)),
                "{}",
                t.program
            );
        }
    }
}
