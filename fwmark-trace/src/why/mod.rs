//! `fwmark-trace why`: watch matching flows with every observation point and routing lookups,
//! then, per flow that lost its reply (or every flow with `--all`), print both paths, where the
//! reply died and a plain-language verdict with its evidence (`--json`: one JSON document).
pub mod verdict;

use std::{net::IpAddr, time::Duration};

use anyhow::{anyhow, bail, Result};
use clap::Args;
use serde::Serialize;

use crate::{
    events::{TraceEvent, Tuple},
    kernel::tcx,
    nodestate::{nft, NodeState},
    output::{summary::Summary, LostRecord, Sink, StatsRecord},
    registry::{Registry, RegistryArgs},
    trace::{self, TraceArgs},
    tracking::flows::FlowTracker,
};

#[derive(Args, Clone, Debug, Default)]
pub struct WhyArgs {
    /// One flow: 'PROTO SRC:PORT -> DST:PORT' (either direction matches).
    #[arg(long, value_parser = parse_flow)]
    pub flow: Option<FlowSpec>,
    /// Flows to or from this address.
    #[arg(long)]
    pub host: Option<IpAddr>,
    /// Flows with this port on either side.
    #[arg(long)]
    pub port: Option<u16>,
    /// Flows of this protocol (tcp, udp, icmp, …).
    #[arg(long)]
    pub proto: Option<String>,
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
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Clone, Debug, PartialEq)]
pub struct FlowSpec {
    pub proto: String,
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
}

/// `udp 10.0.0.1:40000 -> 10.0.0.2:80` (IPv6 as `[fd00::1]:80`).
pub fn parse_flow(s: &str) -> Result<FlowSpec, String> {
    let err = || {
        format!("--flow {s:?}: expected 'PROTO SRC:PORT -> DST:PORT', e.g. 'udp 10.0.0.1:40000 -> 10.0.0.2:53'")
    };
    let (proto, rest) = s.trim().split_once(' ').ok_or_else(err)?;
    let (a, b) = rest.split_once("->").ok_or_else(err)?;
    let ep = |e: &str| -> Result<(IpAddr, u16), String> {
        let e = e.trim();
        let (ip, port) = e.rsplit_once(':').ok_or_else(err)?;
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        Ok((
            ip.parse().map_err(|_| err())?,
            port.parse().map_err(|_| err())?,
        ))
    };
    let ((src, sport), (dst, dport)) = (ep(a)?, ep(b)?);
    Ok(FlowSpec {
        proto: proto.to_lowercase(),
        src,
        sport,
        dst,
        dport,
    })
}

impl WhyArgs {
    /// Whether a packet's 5-tuple is one the user asked about.
    fn wants(&self, t: &Tuple) -> bool {
        let has = |ip: &IpAddr| t.src == ip.to_string() || t.dst == ip.to_string();
        self.flow.as_ref().is_none_or(|f| {
            t.proto == f.proto
                && ((t.src == f.src.to_string()
                    && t.sport == f.sport
                    && t.dst == f.dst.to_string()
                    && t.dport == f.dport)
                    || (t.dst == f.src.to_string()
                        && t.dport == f.sport
                        && t.src == f.dst.to_string()
                        && t.sport == f.dport))
        }) && self.host.as_ref().is_none_or(has)
            && self.port.is_none_or(|p| t.sport == p || t.dport == p)
            && self.proto.as_ref().is_none_or(|p| &t.proto == p)
    }
}

/// Collects the watched flows' events instead of printing them.
struct Collector<'a> {
    args: &'a WhyArgs,
    flows: FlowTracker,
}

impl Sink for Collector<'_> {
    fn event(&mut self, ev: &TraceEvent) -> Result<()> {
        // Routing lookups carry partial tuples (no source yet, or reversed): the tracker joins
        // them to flows it already follows.
        if ev.route.is_some() || ev.tuple.as_ref().is_some_and(|t| self.args.wants(t)) {
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
}

#[derive(Serialize)]
struct Document<'a> {
    flows: Vec<verdict::Report>,
    flows_seen: usize,
    flows_evicted: u64,
    node: &'a NodeState,
}

pub fn run(args: &WhyArgs) -> Result<bool> {
    if args.flow.is_none() && args.host.is_none() && args.port.is_none() && args.proto.is_none() {
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
    };
    trace::run_into(&targs, &mut collector, || {})?;
    // Still inside the traced namespace: read its state now.
    let state = NodeState::read();
    let chains = nft::read_chains().unwrap_or_default();
    let registry = Registry::load(&args.registry)?;
    let names: Vec<(u32, String)> = tcx::list_interfaces().unwrap_or_default();
    let ifname = |i: u32| names.iter().find(|(x, _)| *x == i).map(|(_, n)| n.clone());
    let cx = verdict::Context {
        state: &state,
        chains: &chains,
        registry: &registry,
        ifname: &ifname,
    };
    let all: Vec<verdict::Report> = collector
        .flows
        .flows()
        .map(|f| verdict::judge(f, &cx))
        .collect();
    let seen = all.len();
    let reports: Vec<verdict::Report> = all
        .into_iter()
        .filter(|r| args.all || r.verdict != "delivered")
        .collect();
    let lost = reports.iter().any(|r| r.verdict != "delivered");
    if args.json {
        let doc = Document {
            flows: reports,
            flows_seen: seen,
            flows_evicted: collector.flows.evicted,
            node: &state,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_specs() {
        let f = parse_flow("udp 10.0.0.1:40000 -> 10.0.0.2:53").unwrap();
        assert_eq!((f.proto.as_str(), f.sport, f.dport), ("udp", 40000, 53));
        assert!(parse_flow("[fd00::1]:1 -> [fd00::2]:2").is_err());
        assert_eq!(
            parse_flow("tcp [fd00::1]:1 -> [fd00::2]:2").unwrap().dst,
            "fd00::2".parse::<IpAddr>().unwrap()
        );
        assert!(parse_flow("udp 10.0.0.1 -> 10.0.0.2:53").is_err());
    }

    #[test]
    fn selection_matches_both_directions() {
        let args = WhyArgs {
            flow: Some(parse_flow("udp 10.0.0.1:4 -> 10.0.0.2:7").unwrap()),
            ..Default::default()
        };
        let t = |src: &str, sport, dst: &str, dport| Tuple {
            proto: "udp".into(),
            src: src.into(),
            sport,
            dst: dst.into(),
            dport,
        };
        assert!(args.wants(&t("10.0.0.1", 4, "10.0.0.2", 7)));
        assert!(args.wants(&t("10.0.0.2", 7, "10.0.0.1", 4)));
        assert!(!args.wants(&t("10.0.0.2", 7, "10.0.0.1", 5)));
        let port = WhyArgs {
            port: Some(7),
            ..Default::default()
        };
        assert!(port.wants(&t("10.0.0.2", 7, "10.0.0.1", 5)));
    }
}
