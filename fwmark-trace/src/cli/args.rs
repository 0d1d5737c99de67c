//! The flags of each command (clap), and how they become the run's configuration. Defaults
//! shown in `--help` are the configurations' own (`trace::RING_SIZE`, `trace::INTERVAL`; a
//! test checks the ones clap spells out).
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Subcommand};

use super::bounds;
use crate::{
    commands::{
        demo::{DemoConfig, Scenario},
        inventory::InventoryConfig,
        registry::Request,
        show::ShowConfig,
        trace::{self, TraceConfig},
        why::WhyConfig,
    },
    event::Tuple,
    flows::Selection,
    inventory::Namespaces,
    kernel::features::{Feature, NfBackend, TcBackend},
    mark::MarkMatch,
    netstack::Proto,
    nodestate::pods::PodName,
    output::{file::FileOptions, Format},
    registry,
};

/// `--netns`, or `--pod` as the namespace spec `netns::path_of` resolves.
fn netns_spec(netns: &Option<String>, pod: &Option<PodName>) -> Option<String> {
    netns
        .clone()
        .or_else(|| pod.as_ref().map(|p| format!("{}{p}", crate::netns::POD)))
}

fn format(json: bool) -> Format {
    if json {
        Format::Json
    } else {
        Format::Human
    }
}

/// How diagnostics on stderr are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum LogFormat {
    /// `fwmark-trace: warning: …`, one line each.
    #[default]
    Text,
    /// One JSON object a line: {"time", "level", "message"} (for journald and log shippers).
    Json,
}

/// Where the registry comes from.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct RegistryArgs {
    /// Add or override owners from a TOML registry file (repeatable).
    #[arg(long = "registry", value_name = "FILE", global = true)]
    files: Vec<PathBuf>,
    /// Quick bitwise owner: NAME=MASK (repeatable), e.g. myapp=0xf0000000.
    #[arg(long = "owner", value_name = "NAME=MASK", global = true)]
    owner: Vec<String>,
    /// The software this node runs (comma-separated owner names): attribute only to these.
    #[arg(
        long = "owners",
        value_name = "A,B,…",
        value_delimiter = ',',
        global = true
    )]
    owners: Vec<String>,
    /// Do not read /etc/fwmark-trace/registry.d/.
    #[arg(long, global = true)]
    no_system_registry: bool,
}

impl RegistryArgs {
    pub(crate) fn sources(&self) -> registry::RegistrySources {
        registry::RegistrySources {
            files: self.files.clone(),
            quick: self.owner.clone(),
            profile: self.owners.clone(),
            no_system: self.no_system_registry,
        }
    }
}

/// Which flows to follow.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct FlowArgs {
    /// One flow: 'PROTO SRC:PORT -> DST:PORT' (either direction matches; IPv6 as [ADDR]:PORT; no ports for icmp).
    #[arg(long, value_name = "FLOW")]
    flow: Option<Tuple>,
    /// Flows to or from this address.
    #[arg(long)]
    host: Option<std::net::IpAddr>,
    /// Flows with this port on either side.
    #[arg(long)]
    port: Option<u16>,
    /// Flows of this protocol (tcp, udp, icmp, … or a number).
    #[arg(long)]
    proto: Option<Proto>,
}

impl FlowArgs {
    fn selection(&self) -> Selection {
        Selection {
            flow: self.flow,
            host: self.host,
            port: self.port,
            proto: self.proto,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub(crate) struct TraceArgs {
    /// One JSON object per line instead of readable lines.
    #[arg(long)]
    json: bool,
    /// Write events to FILE instead of stdout (created with mode 0600; a symbolic link is
    /// refused; emptied only once tracing has started, unless --append). SIGHUP reopens it.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Keep what the output file holds and add to it, instead of emptying it.
    #[arg(long, requires = "output")]
    append: bool,
    /// Rotate the output file before it grows past BYTES (4K to 1T; e.g. 100M): FILE becomes
    /// FILE.1, FILE.1 becomes FILE.2, … (records are never split).
    #[arg(long, value_name = "BYTES", requires = "output", value_parser = bounds::rotate_size)]
    rotate_size: Option<u64>,
    /// How many rotated files to keep, FILE.1 … FILE.N (1 to 100; the oldest is dropped).
    #[arg(long, value_name = "N", default_value_t = crate::output::file::ROTATE_KEEP,
          requires = "rotate_size", value_parser = bounds::rotate_keep)]
    rotate_keep: u32,
    /// Only events whose old or new mark matches VALUE[/MASK] (hex 0x.. or decimal).
    #[arg(long, value_name = "VALUE[/MASK]")]
    mark: Option<MarkMatch>,
    /// Only events on this interface (repeatable); tc observers attach only there.
    #[arg(long = "iface", value_name = "NAME")]
    ifaces: Vec<String>,
    /// Trace inside this network namespace (a name under /run/netns, or a path).
    #[arg(long, value_name = "NAME|PATH")]
    netns: Option<String>,
    /// Trace inside this Kubernetes pod's network namespace (as runc's state names it).
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "netns")]
    pod: Option<PodName>,
    /// Stop after this long (e.g. 10s, 2m; at most a year).
    #[arg(long, value_parser = bounds::run_duration)]
    duration: Option<Duration>,
    /// Stop after this many events (at least 1).
    #[arg(long, value_parser = bounds::count)]
    count: Option<u64>,
    /// Report every observation point of every packet (first sight, unchanged points, end of
    /// life), not only transitions and drops.
    #[arg(long)]
    full_path: bool,
    /// One event per packet through the ring buffer, instead of each distinct transition
    /// counted in the kernel and reported once per interval (--full-path and followed flows
    /// are per packet anyway).
    #[arg(long)]
    per_packet: bool,
    /// Per packet, at ring-buffer speed: write the kernel's raw records to FILE, decoded and
    /// attributed later by `fwmark-trace show FILE` (nothing is lost to a busy consumer). The
    /// output gets the plan and the summary.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// How often counted transitions are reported (e.g. 1s, 10s; 100ms to 1 day).
    #[arg(long, default_value = "1s", value_parser = bounds::interval)]
    interval: Duration,
    /// Ring buffer size in bytes, e.g. 4M (a power of two from a page to 1G).
    #[arg(long, default_value_t = trace::RING_SIZE, value_parser = bounds::ring_size)]
    ring_size: u32,
    /// Kernel memory for counting transitions (the default mode), whatever the CPU count,
    /// e.g. 32M (1M to 1G). Distinct transitions beyond what it holds in an interval are
    /// reported as lost (count_map_full).
    #[arg(long, value_name = "BYTES", default_value = "32M", value_parser = bounds::count_memory)]
    count_memory: u64,
    /// Also report routing table lookups (table, flow mark, result) as `route` events.
    #[arg(long)]
    routes: bool,
    /// Report every drop; by default only drops of packets whose mark was written on their
    /// path (by a rule, a program or their socket) are reported.
    #[arg(long)]
    all_drops: bool,
    /// Every DURATION (e.g. 10s; 1s to 1 day), write a `stats` record (RSS, events, lost,
    /// tracked packets).
    #[arg(long, value_name = "DURATION", value_parser = bounds::stats)]
    stats: Option<Duration>,
    /// Serve the run's counters (events, drops by reason, transitions by owner, clobbers,
    /// lost) in the Prometheus text format at http://ADDR/metrics, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Also count transitions per Kubernetes pod in the metrics
    /// (`fwmark_trace_pod_transitions_total{pod="NAMESPACE/NAME"}`): one series per pod that
    /// had one.
    #[arg(long, requires = "metrics")]
    metrics_pods: bool,
    /// Fail instead of degrading when this kernel feature is unavailable (repeatable).
    #[arg(long, value_enum, value_name = "FEATURE")]
    require: Vec<Feature>,
    /// Netfilter observers: links (kernel 6.4+) or fentry/fexit on the chain evaluators;
    /// auto picks links where the kernel has them.
    #[arg(long, value_enum, default_value = "auto", value_name = "BACKEND")]
    nf_observers: NfBackend,
    /// tc observers: tcx (kernel 6.6+) or cls_bpf filters in existing clsact qdiscs; auto
    /// picks tcx where the kernel has it.
    #[arg(long, value_enum, default_value = "auto", value_name = "BACKEND")]
    tc_observers: TcBackend,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Follow only these flows, at every observation point and with their routing lookups.
    #[command(flatten)]
    select: FlowArgs,
}

impl TraceArgs {
    pub(crate) fn config(&self) -> TraceConfig {
        TraceConfig {
            format: format(self.json),
            output: self.output.clone(),
            output_file: FileOptions {
                append: self.append,
                rotate_size: self.rotate_size,
                rotate_keep: self.rotate_keep,
            },
            mark: self.mark,
            ifaces: self.ifaces.clone(),
            netns: netns_spec(&self.netns, &self.pod),
            duration: self.duration,
            count: self.count,
            full_path: self.full_path,
            per_packet: self.per_packet,
            record: self.record.clone(),
            interval: self.interval,
            ring_size: self.ring_size,
            count_memory: self.count_memory,
            routes: self.routes,
            all_drops: self.all_drops,
            stats: self.stats,
            metrics: self.metrics,
            metrics_pods: self.metrics_pods,
            require: self.require.clone(),
            nf_backend: self.nf_observers,
            tc_backend: self.tc_observers,
            registry: self.registry.sources(),
            select: self.select.selection(),
        }
    }
}

#[derive(Args, Clone, Debug)]
pub(crate) struct WhyArgs {
    #[command(flatten)]
    select: FlowArgs,
    /// How long to watch (at most a year).
    #[arg(long, default_value = "10s", value_parser = bounds::run_duration)]
    duration: Duration,
    /// Watch inside this network namespace (a name under /run/netns, or a path).
    #[arg(long, value_name = "NAME|PATH")]
    netns: Option<String>,
    /// Watch inside this Kubernetes pod's network namespace (as runc's state names it).
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with = "netns")]
    pod: Option<PodName>,
    /// Report every flow, not only those whose reply was lost.
    #[arg(long)]
    all: bool,
    /// One JSON document instead of text.
    #[arg(long)]
    json: bool,
    /// Also name the exact nft rule that dropped a packet (adds a temporary table setting
    /// `meta nftrace set 1` on the selected traffic while watching; opt-in).
    #[arg(long)]
    nftrace: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

impl WhyArgs {
    pub(crate) fn config(&self) -> WhyConfig {
        WhyConfig {
            select: self.select.selection(),
            duration: self.duration,
            netns: netns_spec(&self.netns, &self.pod),
            all: self.all,
            json: self.json,
            nftrace: self.nftrace,
            registry: self.registry.sources(),
        }
    }
}

#[derive(Args, Clone, Debug)]
pub(crate) struct ShowArgs {
    /// The recording (`trace --record FILE`).
    file: PathBuf,
    /// One JSON object per line instead of readable lines.
    #[arg(long)]
    json: bool,
    /// Write events to FILE instead of stdout (created with mode 0600; a symbolic link is
    /// refused).
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    #[command(flatten)]
    registry: RegistryArgs,
}

impl ShowArgs {
    pub(crate) fn config(&self) -> ShowConfig {
        ShowConfig {
            file: self.file.clone(),
            format: format(self.json),
            output: self.output.clone(),
            registry: self.registry.sources(),
        }
    }
}

#[derive(Args, Clone, Debug)]
pub(crate) struct DemoArgs {
    /// Which tour.
    #[arg(long, value_enum, default_value = "marks")]
    scenario: Scenario,
    /// One JSON object per line instead of readable lines.
    #[arg(long)]
    json: bool,
    /// How long to trace (100ms to 1 day: also the demo's reporting interval).
    #[arg(long, default_value = "3s", value_parser = bounds::interval)]
    duration: Duration,
}

impl DemoArgs {
    pub(crate) fn config(&self) -> DemoConfig {
        DemoConfig {
            scenario: self.scenario,
            format: format(self.json),
            duration: self.duration,
        }
    }
}

#[derive(Args, Clone, Debug)]
pub(crate) struct InventoryArgs {
    /// One JSON document (entries, by_bit, conflicts, notes) instead of readable text.
    #[arg(long)]
    json: bool,
    /// Look inside this network namespace (a name under /run/netns, or a path).
    #[arg(long, value_name = "NAME|PATH", conflicts_with = "all_netns")]
    netns: Option<String>,
    /// Look inside this Kubernetes pod's network namespace (as runc's state names it).
    #[arg(long, value_name = "NAMESPACE/NAME", conflicts_with_all = ["netns", "all_netns"])]
    pod: Option<PodName>,
    /// Every network namespace: /run/netns names and those processes hold.
    #[arg(long)]
    all_netns: bool,
    /// Exit 1 when owners conflict (0 when none do, 2 on an error).
    #[arg(long)]
    check: bool,
    #[command(flatten)]
    registry: RegistryArgs,
}

impl InventoryArgs {
    pub(crate) fn config(&self) -> InventoryConfig {
        InventoryConfig {
            format: format(self.json),
            which: match (netns_spec(&self.netns, &self.pod), self.all_netns) {
                (Some(ns), _) => Namespaces::One(ns),
                (None, true) => Namespaces::All,
                (None, false) => Namespaces::Current,
            },
            check: self.check,
            registry: self.registry.sources(),
        }
    }
}

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum RegistryCmd {
    /// Every owner: id, style, mask, description.
    List,
    /// One owner's layout as a bit map, with fields, named values, ct mask and source.
    Show { name: String },
    /// Overlapping bits between owners (all when none are named); exits 1 on any overlap.
    Check {
        /// Owners to check (all when none, or those of --owners).
        // Its own id: `--owners`, the global flag, is another argument.
        #[arg(id = "check_owners", value_name = "OWNER")]
        owners: Vec<String>,
    },
    /// Owners whose nft tables or chains (iptables-nft's included) are in the ruleset, and the
    /// `--owners` profile they suggest.
    Detect {
        /// Look inside this network namespace (a name under /run/netns, or a path).
        #[arg(long, value_name = "NAME|PATH")]
        netns: Option<String>,
    },
}

impl RegistryCmd {
    pub(crate) fn request(&self) -> Request {
        match self {
            RegistryCmd::List => Request::List,
            RegistryCmd::Show { name } => Request::Show(name.clone()),
            RegistryCmd::Check { owners } => Request::Check(owners.clone()),
            RegistryCmd::Detect { netns } => Request::Detect(netns.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Trace {
        #[command(flatten)]
        args: TraceArgs,
    }

    #[test]
    fn flag_defaults_are_the_configuration_defaults() {
        let cfg = Trace::parse_from(["trace"]).args.config();
        let default = TraceConfig::default();
        assert_eq!(cfg.interval, default.interval);
        assert_eq!(cfg.ring_size, default.ring_size);
        assert_eq!(cfg.count_memory, default.count_memory);
        assert_eq!(cfg.format, default.format);
        assert!(cfg.counted());
    }

    #[test]
    fn typed_flags_parse_and_bad_ones_fail() {
        let cfg = Trace::parse_from([
            "trace",
            "--mark",
            "0x4000/0x4000",
            "--flow",
            "udp 10.0.0.1:4 -> 10.0.0.2:7",
            "--stats",
            "10s",
        ])
        .args
        .config();
        assert_eq!(cfg.mark.unwrap().to_string(), "0x4000/0x4000");
        assert_eq!(cfg.select.flow.unwrap().dport, 7);
        assert_eq!(cfg.stats, Some(Duration::from_secs(10)));
        for bad in [
            &["trace", "--mark", "0x100/0xf"][..],
            &["trace", "--flow", "udp 10.0.0.1 -> 10.0.0.2:7"],
            &["trace", "--ring-size", "1000"],
            &["trace", "--stats", "soon"],
        ] {
            assert!(Trace::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_and_sizes_are_bounded_at_parsing() {
        for bad in [
            &["trace", "--interval", "292500000000years"][..],
            &["trace", "--interval", "1ms"],
            &["trace", "--duration", "292500000000years"],
            &["trace", "--duration", "0s"],
            &["trace", "--stats", "100years"],
            &["trace", "--count", "0"],
            &["trace", "--ring-size", "8G"],
            &["trace", "--rotate-size", "1K", "--output", "f"],
            &[
                "trace",
                "--rotate-keep",
                "0",
                "--rotate-size",
                "1M",
                "--output",
                "f",
            ],
        ] {
            let e = Trace::try_parse_from(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?}"));
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad:?}: {e}"
            );
        }
        let cfg = Trace::parse_from(["trace", "--ring-size", "16M", "--interval", "1day"])
            .args
            .config();
        assert_eq!(cfg.ring_size, 16 << 20);
        assert_eq!(cfg.interval, Duration::from_secs(86400));
    }

    #[test]
    fn pod_is_a_namespace_spec_and_excludes_netns() {
        let cfg = Trace::parse_from(["trace", "--pod", "shop/web"])
            .args
            .config();
        assert_eq!(cfg.netns.as_deref(), Some("pod:shop/web"));
        for bad in [
            &["trace", "--pod", "web"][..],
            &["trace", "--pod", "shop/web", "--netns", "x"],
        ] {
            assert!(Trace::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn output_file_flags() {
        let cfg = Trace::parse_from(["trace", "--output", "f"]).args.config();
        assert_eq!(
            cfg.output_file,
            FileOptions {
                rotate_keep: 5,
                ..Default::default()
            }
        );
        let cfg = Trace::parse_from([
            "trace",
            "--output",
            "f",
            "--append",
            "--rotate-size",
            "64K",
            "--rotate-keep",
            "3",
        ])
        .args
        .config();
        assert_eq!(
            cfg.output_file,
            FileOptions {
                append: true,
                rotate_size: Some(64 << 10),
                rotate_keep: 3
            }
        );
        // Each needs what it acts on.
        for bad in [
            &["trace", "--append"][..],
            &["trace", "--rotate-size", "1M"],
            &["trace", "--output", "f", "--rotate-keep", "2"],
        ] {
            let e = Trace::try_parse_from(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad:?}"));
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::MissingRequiredArgument,
                "{bad:?}"
            );
        }
    }

    mod props {
        use proptest::prelude::*;

        use super::*;

        proptest! {
            #![proptest_config(crate::testing::fixed_seed())]
            /// Any value of any valued flag gives a configuration or a usage error.
            #[test]
            fn any_flag_value_never_panics(value in "\\PC{0,24}", flag in 0usize..14) {
                let flags = [
                    "--interval", "--duration", "--stats", "--ring-size", "--count",
                    "--rotate-size", "--mark", "--flow", "--host", "--port", "--proto",
                    "--owners", "--owner", "--metrics",
                ];
                let args = ["trace", "--output", "f", "--rotate-size", "1M", "--rotate-keep", "2", flags[flag], &value];
                if let Ok(t) = Trace::try_parse_from(args) {
                    let cfg = t.args.config();
                    prop_assert!(cfg.interval >= bounds::INTERVAL.0 && cfg.interval <= bounds::INTERVAL.1);
                    prop_assert!(cfg.duration.is_none_or(|d| d <= bounds::RUN.1));
                    let _ = crate::registry::Registry::load(&crate::registry::RegistrySources {
                        no_system: true,
                        ..cfg.registry
                    });
                }
            }
        }
    }
}
