//! `fwmark-trace why`: watch matching flows with every observation point and routing lookups,
//! then, per flow that lost its reply (or every flow with `--all`), print both paths, where the
//! reply died and a plain-language verdict with its evidence (`--json`: one JSON document).
pub mod nftrace;
pub mod verdict;

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use serde::Serialize;

use crate::{
    events::{self, TraceEvent},
    kernel::tcx,
    nodestate::{sysctl::Sysctls, watch::Watcher, History, NodeState, Snapshot},
    output::{summary::Summary, LostRecord, Sink, StatsRecord},
    registry::{Registry, RegistryArgs},
    trace::{self, TraceArgs},
    tracking::flows::{FlowSelect, FlowTracker},
};

#[derive(Args, Clone, Debug, Default)]
pub struct WhyArgs {
    #[command(flatten)]
    pub select: FlowSelect,
    /// How long to watch.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Watch inside this network namespace (a name under /run/netns, or a path).
    #[arg(long, value_name = "NAME|PATH")]
    pub netns: Option<String>,
    /// Report every flow, not only those whose reply was lost.
    #[arg(long)]
    pub all: bool,
    /// One JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also name the exact nft rule that dropped a packet (adds a temporary table setting
    /// `meta nftrace set 1` on the selected traffic while watching; opt-in).
    #[arg(long)]
    pub nftrace: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Collects the watched flows' events instead of printing them.
struct Collector<'a> {
    args: &'a WhyArgs,
    flows: FlowTracker,
    /// Node state, checked every second: verdicts use what was in force when the reply died.
    node: History,
    /// Rule/route/xfrm/nftables change notifications (made at the first tick, inside the
    /// traced namespace; `None` inside when they are unavailable: every tick reads all).
    watch: Option<Option<Watcher>>,
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
                sysctls: Sysctls::read(),
                ..last.clone()
            },
            _ => {
                let mut s = NodeState::read();
                s.chains.retain(|c| !nftrace::is_ours(c));
                s
            }
        };
        let time = events::rfc3339(std::time::SystemTime::now());
        if self.node.observe(events::monotonic_ns(), time, state) {
            if let Some(change) = self.node.changes().last() {
                let what = change.changed.join(", ");
                eprintln!("fwmark-trace: node state changed: {what}");
            }
        }
    }
}

impl Sink for Collector<'_> {
    fn event(&mut self, ev: &TraceEvent) -> Result<()> {
        // Routing lookups carry partial tuples (no source yet, or reversed): the tracker joins
        // them to flows it already follows.
        // NAT'ed packets no longer match the selection; their conntrack entry still does.
        if ev.route.is_some()
            || self.flows.follows_ct(ev.ct_id)
            || ev.tuple.as_ref().is_some_and(|t| self.args.select.wants(t))
        {
            self.flows.add(ev);
        }
        Ok(())
    }
    fn lost(&mut self, rec: &LostRecord) -> Result<()> {
        eprintln!("fwmark-trace: {} events lost (ring buffer full)", rec.lost);
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

#[derive(Serialize)]
struct Document<'a> {
    flows: Vec<verdict::Report>,
    flows_seen: usize,
    flows_evicted: u64,
    /// The state at the end of the watch.
    node: &'a NodeState,
    /// Changes to it while watching (each verdict used the state in force at its flow's end).
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    node_changes: &'a [Snapshot],
}

pub fn run(args: &WhyArgs) -> Result<bool> {
    run_with(args, || {})
}

/// Like `run`; `on_ready` runs once the observers are attached (the demo sends traffic there).
pub fn run_with(args: &WhyArgs, on_ready: impl FnOnce()) -> Result<bool> {
    if !args.select.active() {
        bail!("say which flows to watch: --flow, --host, --port or --proto");
    }
    let targs = TraceArgs {
        netns: args.netns.clone(),
        duration: Some(args.duration),
        full_path: true,
        routes: true,
        ring_size: 16 << 20,
        registry: args.registry.clone(),
        ..Default::default()
    };
    let mut collector = Collector {
        args,
        flows: FlowTracker::new(4096, 512),
        node: History::default(),
        watch: None,
    };
    let tracer = std::cell::RefCell::new(None);
    trace::run_into(&targs, &mut collector, || {
        // Now inside the traced namespace.
        if args.nftrace {
            match nftrace::NfTrace::start(&args.select) {
                Ok(t) => *tracer.borrow_mut() = Some(t),
                Err(e) => eprintln!("fwmark-trace: --nftrace unavailable: {e:#}"),
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
    let end_ns = events::monotonic_ns();
    let empty = NodeState::default();
    let registry = Registry::load(&args.registry)?;
    let names: Vec<(u32, String)> = tcx::list_interfaces().unwrap_or_default();
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
            let start = first.map_or(0, |s| s.ts_ns);
            // Changes that can concern this flow (not the other family's rules and routes).
            let other = if f.ipv6() { "IPv4" } else { "IPv6" };
            let concern = |c: &&Snapshot| c.changed.iter().any(|w| !w.starts_with(other));
            for c in history.changes_between(start, end_ns).filter(concern) {
                let when = if c.since_ns <= decided { "before" } else { "after" };
                report.evidence.push(format!(
                    "node state changed at {} ({}), {when} the flow's last packet; the verdict uses the state in force then",
                    c.time,
                    c.changed.join(", ")
                ));
            }
            report
        })
        .collect();
    let seen = all.len();
    let reports: Vec<verdict::Report> = all
        .into_iter()
        .filter(|r| args.all || !verdict::healthy(r.verdict))
        .collect();
    let lost = reports.iter().any(|r| !verdict::healthy(r.verdict));
    if args.json {
        let doc = Document {
            flows: reports,
            flows_seen: seen,
            flows_evicted: collector.flows.evicted,
            node: history.latest().unwrap_or(&empty),
            node_changes: history.changes(),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| anyhow!(e))?
        );
    } else {
        print!("{}", text(&reports, seen));
    }
    Ok(lost)
}

fn text(reports: &[verdict::Report], seen: usize) -> String {
    let mut s = String::new();
    if seen == 0 {
        s += "no matching flow was seen\n";
    } else if reports.is_empty() {
        s += &format!("{seen} matching flow(s), every reply delivered (--all shows them)\n");
    }
    for r in reports {
        s += &format!("\n== {}\nverdict: {} — {}\n", r.flow, r.verdict, r.summary);
        for e in &r.evidence {
            s += &format!("  evidence: {e}\n");
        }
        for (name, path) in [("request", &r.request), ("reply", &r.reply)] {
            s += &format!("  {name} path:\n");
            if path.is_empty() {
                s += "    (nothing seen)\n";
            }
            for st in path.iter() {
                let ct = st.ct_mark.map_or(String::new(), |c| format!(" ct {c:#x}"));
                let extra = st
                    .drop_reason
                    .as_deref()
                    .map_or(String::new(), |r| format!(" DROP {r}"));
                s += &format!("    {:<52} mark {:#x}{ct}{extra}\n", st.point, st.mark);
            }
        }
    }
    s
}
