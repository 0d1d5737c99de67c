//! Loads the kernel object and attaches every observer: tp_btf tracepoints (aya), netfilter
//! links (raw, see `netfilter.rs`) or else fentry/fexit on the chain evaluators
//! (`nf_chains.rs`), and tc programs (see `tcx.rs`). An observation point that cannot attach
//! is reported with the kernel's reason and the run goes on without it.
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
    lost_reason, AggKey, AggValue, Config, Control, FlowFilter, GLOBAL_CONFIG, MAP_AGG,
    MAP_CONTROL, MAP_EVENTS, MAP_IFACES, MAP_LOST, OFFSET_MISSING,
};

use super::plan::{NfPlan, PlanMode};
use super::{
    btf::{self, KernelBtf},
    features::{self, Feature, NfBackend, TcBackend},
    netfilter::{NfPrograms, NfSite, RawObject, PRIO_FIRST, PRIO_LAST},
    nf_chains, sys,
    tc_placement::Placement,
    tcx::{self, TcObservers},
};
use crate::{
    event::Timestamp,
    nodestate::{nft, watch::Watcher},
    stack::{Family, NfHook},
};

/// The kernel object built from fwmark-trace-ebpf (see build.rs).
pub(super) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fwmark-trace"));

/// The tp_btf observers: (program, tracepoint, whether it observes routing lookups, which
/// only `--routes` and followed flows want).
const TRACEPOINTS: [(&str, &str, bool); 6] = [
    ("fwm_rx", "netif_receive_skb", false),
    ("fwm_dev_queue", "net_dev_queue", false),
    ("fwm_kfree", "kfree_skb", false),
    ("fwm_consume", "consume_skb", false),
    ("fwm_fib", "fib_table_lookup", true),
    ("fwm_fib6", "fib6_table_lookup", true),
];

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

/// One line of the start-up report.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct AttachStatus {
    pub(crate) point: String,
    pub(crate) ok: bool,
    pub(crate) detail: String,
    /// Per-interface detail under a summary entry: printed only at debug level.
    pub(crate) detail_only: bool,
}

/// The observer plan, as the JSON output's first record (`kind: "plan"`) and again after a
/// re-plan: which observers, and why each is there.
#[derive(serde::Serialize)]
pub(crate) struct PlanRecord {
    pub(crate) time: Timestamp,
    pub(crate) kind: &'static str,
    pub(crate) mode: PlanMode,
    pub(crate) observers: Vec<AttachStatus>,
    pub(crate) netfilter: Vec<PlannedSite>,
}

/// One netfilter observer and the reason it sits there.
#[derive(serde::Serialize)]
pub(crate) struct PlannedSite {
    pub(crate) family: Family,
    pub(crate) hook: NfHook,
    pub(crate) priority: i32,
    pub(crate) why: String,
}

pub(crate) struct Observers {
    pub(crate) ebpf: Ebpf,
    /// The netfilter back-end in use (`None`: netfilter is not observed).
    pub(crate) nf_backend: Option<NfBackend>,
    pub(crate) tc: Option<TcObservers>,
    pub(crate) plan: NfPlan,
    pub(crate) chains: Vec<nft::Chain>,
    pub(crate) drop_reasons: HashMap<u32, String>,
    pub(crate) report: Vec<AttachStatus>,
    /// Kernel-side log records (aya-log); keeping it keeps its ring buffer alive.
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// Kept to link band observers for chains that appear during the run.
    nf: Option<NfPrograms>,
    nf_links: Vec<OwnedFd>,
    /// nftables change notifications: the ruleset is read again only after one (`None`:
    /// unavailable, read at every refresh).
    nft_watch: Option<Watcher>,
}

impl Observers {
    /// Loads and attaches everything in the current network namespace (the caller has
    /// entered the traced one). Fails only when nothing useful could be attached.
    pub(crate) fn start(opts: &Options) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!("this binary was built without its eBPF object (AYA_BUILD_SKIP); rebuild with `cargo xtask build`");
        }
        let kbtf = Arc::new(KernelBtf::load().context(
            "reading kernel BTF from /sys/kernel/btf/vmlinux (kernel built without CONFIG_DEBUG_INFO_BTF?)",
        )?);
        let mut offsets = btf::offsets(&kbtf).context("finding kernel struct offsets in BTF")?;
        let drop_reasons = btf::drop_reason_names(&kbtf).unwrap_or_default();
        for feature in &opts.require {
            if let Err(why) = features::probe(*feature, &kbtf) {
                bail!("this kernel lacks {feature} ({why}), which --require asked for");
            }
        }
        let mut report = Vec::new();
        // The netfilter back-end, and for fentry the evaluators this kernel has: their argument
        // layouts go into the configuration the observers are loaded with.
        let nf_backend = match features::netfilter_backend(opts.nf_backend, &kbtf) {
            Ok((backend, why)) => {
                report.push(note("netfilter", true, why));
                Some(backend)
            }
            Err(why) if opts.nf_backend != NfBackend::Auto => {
                bail!("--nf-observers {:?}: {why}", opts.nf_backend)
            }
            Err(why) => {
                report.push(note("netfilter", false, format!("not observed: {why}")));
                None
            }
        };
        let mut evaluators = Vec::new();
        if nf_backend == Some(NfBackend::Fentry) {
            for e in &nf_chains::EVALUATORS {
                match nf_chains::find(e, &kbtf, &mut offsets) {
                    Ok(found) => evaluators.push(found),
                    Err(err) => report.push(note(
                        "netfilter fentry",
                        false,
                        format!("{} ({}) not observed: {err:#}", e.func, e.what),
                    )),
                }
            }
        }
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
        let aya_btf = Btf::from_sys_fs().context("reading kernel BTF for aya")?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&aya_btf))
            .override_global(GLOBAL_CONFIG, &config, true)
            .map_max_entries(MAP_EVENTS, opts.ring_bytes)
            .map_max_entries(MAP_AGG, opts.agg_entries)
            // Kernel-side log statements below the daemon's log level are skipped in the kernel.
            .override_global("AYA_LOG_LEVEL", &(log::max_level() as u8), false)
            .load(OBJECT)
            .context("loading the eBPF object (are you root?)")?;
        // Relocate the raw-loaded programs while every map is still in `ebpf` (the logger takes
        // its ring buffer out); they are loaded and attached further down.
        let raw = RawObject::new(OBJECT, ebpf.maps());
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|err| log::debug!("aya-log not active: {err}"))
            .ok();

        if let Some(names) = &opts.ifaces {
            let present = tcx::list_interfaces()?;
            let mut map: BpfHashMap<_, u32, u8> =
                BpfHashMap::try_from(ebpf.map_mut(MAP_IFACES).context("IFACES map")?)?;
            for name in names {
                let (index, _) = present.iter().find(|(_, n)| n == name).with_context(|| {
                    format!("interface {name} not found in the traced network namespace")
                })?;
                map.insert(index, 1, 0)?;
            }
        }

        for (prog, tp, routing) in TRACEPOINTS {
            if routing && !opts.routes {
                continue;
            }
            let res = (|| -> Result<()> {
                let p: &mut BtfTracePoint =
                    ebpf.program_mut(prog).context("missing")?.try_into()?;
                let started = Instant::now();
                p.load(tp, &aya_btf)?;
                sys::log_verified(prog, p.fd()?.as_fd(), started);
                p.attach()?;
                Ok(())
            })();
            report.push(status(format!("tp_btf {tp}"), res));
        }

        // Listening before the first read: a change in between is not missed.
        let nft_watch = Watcher::nftables().ok();
        let mut chains = match nft::read_chains() {
            Ok(c) => c,
            Err(err) => {
                report.push(status("nftables chain bands".into(), Err(err)));
                Default::default()
            }
        };
        chains.extend(nft::kernel_users());
        chains.extend(nft::legacy_tables());
        let mode = if opts.full_path {
            PlanMode::Full
        } else {
            PlanMode::Writers
        };
        let mut nf_links = Vec::new();
        let mut nf = None;
        let plan = match (nf_backend, raw) {
            (None, _) => NfPlan::none(mode),
            (Some(_), Err(err)) => {
                report.push(status("netfilter programs".into(), Err(err)));
                NfPlan::none(mode)
            }
            (Some(NfBackend::Fentry), Ok(raw)) => {
                for found in &evaluators {
                    let res = nf_chains::attach(&raw, found).map(|links| nf_links.extend(links));
                    report.push(AttachStatus {
                        point: "netfilter fentry".into(),
                        ok: res.is_ok(),
                        detail: match res {
                            Ok(()) => format!(
                                "{}: entry and exit of {}",
                                found.label(),
                                found.evaluator.what
                            ),
                            Err(err) => format!("{}: {err:#}", found.label()),
                        },
                        detail_only: false,
                    });
                }
                NfPlan::none(mode)
            }
            (Some(_), Ok(raw)) => {
                let mut plan = NfPlan::new(&chains, mode);
                match NfPrograms::load(&raw) {
                    Ok(progs) => {
                        link_plan(&progs, &mut plan, &chains, &mut nf_links, &mut report);
                        nf = Some(progs);
                    }
                    Err(err) => report.push(status("netfilter programs".into(), Err(err))),
                }
                plan
            }
        };

        // Full path shows every point of a packet's path; otherwise only where tc can write.
        let placement = if opts.full_path {
            Placement::Everywhere
        } else {
            Placement::WhereNeeded
        };
        let tc = match tc_backend(opts.tc_backend) {
            Ok((backend, why)) => {
                let loaded = TcObservers::load(&mut ebpf, opts.ifaces.clone(), placement, backend);
                let label = tcx::backend_label(backend);
                report.push(note("tc", loaded.is_ok(), why));
                match loaded {
                    Ok(tc) => Some(tc),
                    Err(err) => {
                        report.push(status(label.into(), Err(err)));
                        None
                    }
                }
            }
            Err(why) => bail!("--tc-observers {:?}: {why}", opts.tc_backend),
        };
        set_ct_watch(&mut ebpf, &chains, mode)?;
        let mut me = Self {
            ebpf,
            nf_backend,
            tc,
            plan,
            chains,
            drop_reasons,
            report,
            logger,
            nf,
            nf_links,
            nft_watch,
        };
        let changes = me.refresh_interfaces()?;
        if let Some(tc) = &me.tc {
            me.report.extend(tc.report(&changes));
        }
        // The tcx summary is fine with no interface needing observers, but that attached nothing.
        let tc_attached = me.tc.as_ref().is_some_and(|t| !t.interfaces.is_empty());
        let tc_label = me.tc.as_ref().map(|t| tcx::backend_label(t.backend));
        if !tc_attached
            && !me
                .report
                .iter()
                .any(|s| s.ok && Some(&*s.point) != tc_label)
        {
            bail!(
                "no observation point could be attached:\n{}",
                me.report
                    .iter()
                    .map(|s| format!("  {}: {}", s.point, s.detail))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        Ok(me)
    }

    pub(crate) fn refresh_interfaces(&mut self) -> Result<Vec<tcx::Change>> {
        match &mut self.tc {
            Some(tc) => tc.refresh(&mut self.ebpf),
            None => Ok(Vec::new()),
        }
    }

    /// Re-reads the nft chains; when they changed, updates the chain names segments show and
    /// links band observers for new chain priorities. Returns what changed, for the log, and
    /// the ruleset listed then (the node inventory reads its rules from it, not from a second
    /// listing).
    pub(crate) fn refresh_chains(&mut self) -> (Vec<String>, Option<Vec<serde_json::Value>>) {
        if self.nft_watch.as_mut().is_some_and(|w| !w.changed()) {
            return (Vec::new(), None);
        }
        let Ok(ruleset) = nft::read_items() else {
            return (Vec::new(), None);
        };
        let mut chains = nft::parse_chains(&ruleset);
        chains.extend(nft::kernel_users());
        chains.extend(nft::legacy_tables());
        if chains == self.chains {
            return (Vec::new(), None);
        }
        let mut changes = vec![format!("nft chains changed ({} base chains)", chains.len())];
        if let Some(nf) = &self.nf {
            for site in self.plan.additions(&chains) {
                match nf.link(site) {
                    Ok((fd, prio)) => {
                        self.nf_links.push(fd);
                        self.plan.add(NfSite {
                            priority: prio,
                            ..site
                        });
                        changes.push(format!("band observer added at {}", site_label(&site)));
                    }
                    Err(err) => {
                        changes.push(format!("band observer at {}: {err}", site_label(&site)))
                    }
                }
            }
        }
        if let Err(err) = set_ct_watch(&mut self.ebpf, &chains, self.plan.mode) {
            changes.push(format!("conntrack mark watch not updated: {err:#}"));
        }
        self.chains = chains;
        (changes, Some(ruleset))
    }

    /// The plan as it stands (see `PlanRecord`).
    pub(crate) fn plan_record(&self) -> PlanRecord {
        let netfilter = self
            .plan
            .sites()
            .iter()
            .map(|site| {
                let before: Vec<String> = self
                    .chains
                    .iter()
                    .filter(|c| c.hook == site.hook && c.covers(site.family))
                    .filter(|c| c.priority.saturating_add(1) == site.priority)
                    .map(|c| c.to_string())
                    .collect();
                let why = match site.priority {
                    PRIO_FIRST => "the hook's first priority: bounds the first band".into(),
                    PRIO_LAST => "the hook's last priority".into(),
                    _ if before.is_empty() => "after a chain priority".into(),
                    _ => format!("after {}", before.join(", ")),
                };
                PlannedSite {
                    family: site.family,
                    hook: site.hook,
                    priority: site.priority,
                    why,
                }
            })
            .collect();
        PlanRecord {
            time: Timestamp::now(),
            kind: "plan",
            mode: self.plan.mode,
            observers: self.report.clone(),
            netfilter,
        }
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

/// The start-up line for netfilter: how many observers, where, and why there.
fn nf_summary(plan: &NfPlan, chains: &[nft::Chain], linked: usize) -> AttachStatus {
    let total = plan.sites().len();
    let merged = if plan.merged > 0 {
        format!(", {} priorities merged", plan.merged)
    } else {
        String::new()
    };
    let detail = match plan.mode {
        PlanMode::Full => format!(
            "{linked}/{total} links (every hook: first, last and after each chain priority{merged})"
        ),
        PlanMode::Writers => {
            let writers: Vec<String> = chains
                .iter()
                .filter(|c| c.writes.any())
                .map(|c| c.to_string())
                .collect();
            if writers.is_empty() {
                "no observer: no chain writes a packet or conntrack mark (changes made elsewhere are seen at the next observer)".into()
            } else {
                format!(
                    "{linked}/{total} links, on the hooks whose chains write a mark: first priority and after each of {}{merged}",
                    writers.join(", ")
                )
            }
        }
    };
    AttachStatus {
        point: "netfilter ipv4+ipv6".into(),
        ok: total == 0 || linked > 0,
        detail,
        detail_only: false,
    }
}

/// The tc back-end to use, with why.
fn tc_backend(want: TcBackend) -> Result<(TcBackend, String), String> {
    match (want, tcx::has_tcx()) {
        (TcBackend::Auto | TcBackend::Tcx, Ok(())) => {
            Ok((TcBackend::Tcx, "tcx (this kernel has it)".into()))
        }
        (TcBackend::Auto, Err(why)) => Ok((
            TcBackend::Clsact,
            format!("cls_bpf filters in clsact qdiscs: no tcx on this kernel (before 6.6; {why})"),
        )),
        (TcBackend::Clsact, _) => Ok((
            TcBackend::Clsact,
            "cls_bpf filters in clsact qdiscs (--tc-observers clsact)".into(),
        )),
        (TcBackend::Tcx, Err(why)) => Err(format!("no tcx on this kernel ({why})")),
    }
}

/// Links every site of `plan`, moving a site whose priority was taken to where it was linked;
/// failures are reported once per distinct reason.
fn link_plan(
    progs: &NfPrograms,
    plan: &mut NfPlan,
    chains: &[nft::Chain],
    links: &mut Vec<OwnedFd>,
    report: &mut Vec<AttachStatus>,
) {
    let mut failures: HashMap<String, usize> = HashMap::new();
    for site in plan.sites().to_vec() {
        match progs.link(site) {
            Ok((fd, prio)) => {
                plan.set_priority(site, prio);
                links.push(fd)
            }
            Err(err) => {
                *failures
                    .entry(format!("{}: {err}", site_label(&site)))
                    .or_default() += 1
            }
        }
    }
    report.push(nf_summary(plan, chains, links.len()));
    for (why, _) in failures {
        report.push(note("netfilter link", false, why));
    }
}

fn note(point: &str, ok: bool, detail: String) -> AttachStatus {
    AttachStatus {
        point: point.into(),
        ok,
        detail,
        detail_only: false,
    }
}

fn site_label(s: &NfSite) -> String {
    format!("{} {} prio {}", s.family, s.hook, s.priority)
}

fn status(point: String, res: Result<()>) -> AttachStatus {
    AttachStatus {
        point,
        ok: res.is_ok(),
        detail: res.map_or_else(|err| format!("{err:#}"), |()| "attached".into()),
        detail_only: false,
    }
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
}
