//! `fwmark-trace why`: watch matching flows with every observation point and routing lookups,
//! then, per flow that lost its reply (or every flow with `--all`), say where the reply died
//! and why (`verdict`), with the evidence, both paths and the node state it reasoned with.
use std::{sync::Arc, time::Duration};

use anyhow::{bail, Result};
use log::{info, warn};

use super::trace::{self, TraceConfig};
use crate::why::{nftrace, verdict};
use crate::{
    clock::{monotonic_ns, Timestamp},
    event::TraceEvent,
    flows::{FlowTracker, Selection},
    nodestate::{links::list_interfaces, sysctl::Sysctls, watch::Watcher, History, NodeState},
    output::{
        summary::Summary,
        text::list,
        why::{text, ReportJson, WhyDocument},
        LostRecord, Sink, StatsRecord,
    },
    registry::{self, Registry},
};

/// What to watch and how to answer.
#[derive(Clone, Debug, Default)]
pub(crate) struct WhyConfig {
    pub(crate) select: Selection,
    pub(crate) duration: Duration,
    /// Watch inside this network namespace (a name under /run/netns, or a path).
    pub(crate) netns: Option<String>,
    /// Every flow, not only those whose reply was lost.
    pub(crate) all: bool,
    pub(crate) json: bool,
    /// Name the exact nft rule that dropped a packet (a temporary nftrace table).
    pub(crate) nftrace: bool,
    pub(crate) registry: registry::RegistrySources,
}

/// Collects the watched flows' events instead of printing them.
struct Collector<'a> {
    select: &'a Selection,
    flows: FlowTracker,
    /// Node state, checked every second: verdicts use what was in force when the reply died.
    node: History,
    /// Rule/route/xfrm/nftables change notifications (made at the first tick, inside the
    /// traced namespace; `None` inside when they are unavailable: every tick reads all).
    watch: Option<Option<Watcher>>,
    /// Events the kernel lost while watching (in all).
    lost: u64,
}

impl Collector<'_> {
    /// Reads the node state of the calling thread's namespace into the history: all of it the
    /// first time and after a change notification, otherwise only the sysctls (which mostly
    /// change without one).
    fn read_node(&mut self) {
        let watch = self.watch.get_or_insert_with(|| Watcher::new().ok());
        let quiet = watch.as_mut().is_some_and(|w| !w.changed());
        let state = match self.node.latest() {
            Some(last) if quiet => NodeState {
                sysctls: Arc::new(Sysctls::read()),
                ..last.clone()
            },
            _ => {
                let mut s = NodeState::read(crate::inventory::nft::mark_rules);
                Arc::make_mut(&mut s.chains).retain(|c| !nftrace::is_ours(c));
                s
            }
        };
        if self.node.observe(monotonic_ns(), Timestamp::now(), state) {
            if let Some(change) = self.node.changes().last() {
                info!("node state changed: {}", list(&change.changed));
            }
        }
    }
}

impl Sink for Collector<'_> {
    fn event(&mut self, ev: &TraceEvent) -> Result<()> {
        // Routing lookups carry partial tuples (no source yet, or reversed): the tracker joins
        // them to flows it already follows.
        // NAT'ed packets no longer match the selection; their conntrack entry still does.
        // Encapsulated ones (the request's ESP packet) are a followed packet under another
        // tuple.
        if ev.route.is_some()
            || self.flows.follows_ct(ev.ct_id)
            || self.flows.follows_packet(ev.packet_id)
            || ev.tuple.as_ref().is_some_and(|t| self.select.wants(t))
        {
            self.flows.add(ev);
        }
        Ok(())
    }
    fn lost(&mut self, rec: &LostRecord) -> Result<()> {
        warn!(
            "{} events lost: verdicts drawn from what was not seen are inconclusive",
            rec.lost
        );
        self.lost = rec.total_lost;
        Ok(())
    }
    fn stats(&mut self, _: &StatsRecord) -> Result<()> {
        Ok(())
    }
    fn summary(&mut self, _: &Summary) -> Result<()> {
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
    fn tick(&mut self) -> Result<()> {
        self.read_node();
        Ok(())
    }
}

pub(crate) fn run(cfg: &WhyConfig) -> Result<bool> {
    run_with(cfg, || {})
}

/// Like `run`; `on_ready` runs once the observers are attached (the demo sends traffic there).
/// True when a watched flow lost its reply.
pub(crate) fn run_with(cfg: &WhyConfig, on_ready: impl FnOnce()) -> Result<bool> {
    if !cfg.select.active() {
        bail!("say which flows to watch: --flow, --host, --port or --proto");
    }
    let tcfg = TraceConfig {
        netns: cfg.netns.clone(),
        duration: Some(cfg.duration),
        full_path: true,
        routes: true,
        ring_size: 16 << 20,
        registry: cfg.registry.clone(),
        ..Default::default()
    };
    let mut collector = Collector {
        select: &cfg.select,
        flows: FlowTracker::new(4096, 512),
        node: History::default(),
        watch: None,
        lost: 0,
    };
    let tracer = std::cell::RefCell::new(None);
    trace::run_into(&tcfg, &mut collector, trace::Owners::Unread, || {
        // Now inside the traced namespace.
        if cfg.nftrace {
            match nftrace::NfTrace::start(&cfg.select) {
                Ok(t) => *tracer.borrow_mut() = Some(t),
                Err(e) => warn!("--nftrace unavailable: {e:#}"),
            }
        }
        on_ready()
    })?;
    let nft_drops = tracer
        .into_inner()
        .map(nftrace::NfTrace::finish)
        .unwrap_or_default();
    // Still inside the traced namespace: read its state once more.
    collector.read_node();
    let history = &collector.node;
    let end_ns = monotonic_ns();
    let empty = NodeState::default();
    let registry = Registry::load(&cfg.registry)?;
    let names: Vec<(u32, String)> = list_interfaces().unwrap_or_default();
    let ifname = |i: u32| names.iter().find(|(x, _)| *x == i).map(|(_, n)| n.clone());
    let all: Vec<verdict::Report> = collector
        .flows
        .flows()
        .map(|f| {
            // The flow's last packet is where its fate was decided.
            let (first, last) = (f.steps.first(), f.steps.last());
            let decided = last.map_or(end_ns, |s| s.ts_ns);
            let cx = verdict::Context {
                state: history.at(decided).unwrap_or(&empty),
                registry: &registry,
                ifname: &ifname,
                nft_drops: &nft_drops,
            };
            let mut report = verdict::judge(f, &cx);
            report.cause = report.cause.with_lost(collector.lost);
            let start = first.map_or(0, |s| s.ts_ns);
            // Changes that can concern this flow (not the other family's rules and routes).
            for c in history
                .changes_between(start, end_ns)
                .filter(|c| c.changed.iter().any(|w| w.concerns(f.family())))
            {
                report.evidence.push(verdict::Evidence::NodeChanged {
                    time: c.time,
                    changes: c.changed.clone(),
                    before_last_packet: c.since_ns <= decided,
                });
            }
            report
        })
        .collect();
    let seen = all.len();
    let reports: Vec<verdict::Report> = all
        .into_iter()
        .filter(|r| cfg.all || !r.cause.verdict().healthy())
        .collect();
    let lost = reports.iter().any(|r| !r.cause.verdict().healthy());
    if cfg.json {
        let doc = WhyDocument {
            flows: reports.iter().map(ReportJson).collect(),
            flows_seen: seen,
            flows_evicted: collector.flows.evicted,
            node: history.latest().unwrap_or(&empty),
            node_changes: history.changes(),
        };
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        crate::commands::print_text(&text(&reports, seen))?;
    }
    Ok(lost)
}
