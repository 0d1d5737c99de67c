//! The words for what the kernel side did: the start-up report (a line per observer or group,
//! logged and in the `plan` record), the changes of the observers while running, and why a
//! kernel lacks something. `kernel/` keeps these typed (`kernel::startup`).
use std::fmt;

use serde::Serialize;

use crate::{
    clock::Timestamp,
    kernel::{
        features::{Choice, Feature, NfBackend, NoNetfilter, TcBackend, Unavailable},
        netfilter::{NfSite, PRIO_FIRST, PRIO_LAST},
        observers::Observers,
        plan::PlanMode,
        startup::{NfChange, NfLinked, NothingAttached, Status},
        tc_placement::{Placement, Reason},
        tcx::{Removal, TcChangeKind, TcObserverChange, TcStartup},
    },
    netstack::{Family, NfHook, TcDir},
};

/// One line of the start-up report.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct AttachStatus {
    pub(crate) point: String,
    pub(crate) ok: bool,
    pub(crate) detail: String,
    /// Per-interface detail under a summary entry: printed only at debug level.
    pub(crate) detail_only: bool,
}

/// The observer plan, as the JSON output's first record (`kind: "plan"`) and again after a
/// re-plan: which observers, and why each is there.
#[derive(Serialize)]
pub(crate) struct PlanRecord {
    pub(crate) time: Timestamp,
    pub(crate) kind: &'static str,
    pub(crate) mode: PlanMode,
    pub(crate) observers: Vec<AttachStatus>,
    pub(crate) netfilter: Vec<PlannedSite>,
}

/// One netfilter observer and the reason it sits there.
#[derive(Serialize)]
pub(crate) struct PlannedSite {
    pub(crate) family: Family,
    pub(crate) hook: NfHook,
    pub(crate) priority: i32,
    pub(crate) why: String,
}

impl PlanRecord {
    /// The plan of `obs` as it stands.
    pub(crate) fn of(obs: &Observers) -> Self {
        let netfilter = obs
            .plan()
            .sites()
            .iter()
            .map(|site| {
                let before: Vec<String> = obs
                    .chains()
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
            mode: obs.plan().mode,
            observers: lines(obs.report()),
            netfilter,
        }
    }
}

/// The start-up report, a line per observer or group (and per tc change, as detail).
pub(crate) fn lines(report: &[Status]) -> Vec<AttachStatus> {
    report.iter().flat_map(status_lines).collect()
}

fn line(point: impl Into<String>, ok: bool, detail: String) -> AttachStatus {
    AttachStatus {
        point: point.into(),
        ok,
        detail,
        detail_only: false,
    }
}

fn status_lines(s: &Status) -> Vec<AttachStatus> {
    let ok = s.ok();
    let one = |point: &str, detail: String| vec![line(point, ok, detail)];
    match s {
        Status::NfBackend(Ok((backend, choice))) => one("netfilter", nf_backend(*backend, choice)),
        Status::NfBackend(Err(why)) => one("netfilter", format!("not observed: {why}")),
        Status::EvaluatorMissing(e, err) => one(
            "netfilter fentry",
            format!("{} ({}) not observed: {err:#}", e.func, e.what),
        ),
        Status::Evaluator {
            evaluator: e,
            built_in,
            attached,
        } => {
            let label = if *built_in {
                format!("{} (built in)", e.func)
            } else {
                format!("{} (module {})", e.func, e.module)
            };
            let detail = match attached {
                Ok(()) => format!("{label}: entry and exit of {}", e.what),
                Err(err) => format!("{label}: {err:#}"),
            };
            one("netfilter fentry", detail)
        }
        Status::Tracepoint(t, attached) => {
            let detail = match attached {
                Ok(()) => "attached".into(),
                Err(err) => format!("{err:#}"),
            };
            one(&format!("tp_btf {}", t.target), detail)
        }
        Status::ChainsUnread(err) => one("nftables chain bands", format!("{err:#}")),
        Status::NfProgramsUnloaded(err) => one("netfilter programs", format!("{err:#}")),
        Status::NfLinks(linked) => one("netfilter ipv4+ipv6", nf_links(linked)),
        Status::NfLinkFailed(site, err) => one("netfilter link", format!("{}: {err}", Site(site))),
        Status::TcBackend {
            backend, choice, ..
        } => one("tc", tc_backend(*backend, choice)),
        Status::TcUnloaded(backend, err) => one(tc_label(*backend), format!("{err:#}")),
        Status::Tc(tc) => tc_lines(tc),
    }
}

fn nf_backend(backend: NfBackend, choice: &Choice) -> String {
    const FENTRY: &str = "fentry/fexit on the chain evaluators";
    match (backend, choice) {
        (NfBackend::Fentry, Choice::Fallback(no_links)) => {
            format!("{FENTRY}: no BPF netfilter links on this kernel (before 6.4; {no_links})")
        }
        (NfBackend::Fentry, Choice::Asked) => format!("{FENTRY} (--nf-observers fentry)"),
        (NfBackend::Fentry, Choice::Available) => FENTRY.into(),
        (NfBackend::Links | NfBackend::Auto, _) => {
            "BPF netfilter links (this kernel has them)".into()
        }
    }
}

fn tc_backend(backend: TcBackend, choice: &Choice) -> String {
    const FILTERS: &str = "cls_bpf filters in clsact qdiscs";
    match (backend, choice) {
        (TcBackend::Clsact, Choice::Fallback(why)) => {
            format!("{FILTERS}: no tcx on this kernel (before 6.6; {why})")
        }
        (TcBackend::Clsact, Choice::Asked) => format!("{FILTERS} (--tc-observers clsact)"),
        (TcBackend::Clsact, Choice::Available) => FILTERS.into(),
        (TcBackend::Tcx | TcBackend::Auto, _) => "tcx (this kernel has it)".into(),
    }
}

/// The start-up line for netfilter: how many observers, where, and why there.
fn nf_links(l: &NfLinked) -> String {
    let (linked, total) = (l.linked, l.planned);
    let merged = if l.merged > 0 {
        format!(", {} priorities merged", l.merged)
    } else {
        String::new()
    };
    match l.mode {
        PlanMode::Full => format!(
            "{linked}/{total} links (every hook: first, last and after each chain priority{merged})"
        ),
        PlanMode::Writers if l.writers.is_empty() => {
            "no observer: no chain writes a packet or conntrack mark (changes made elsewhere are seen at the next observer)".into()
        }
        PlanMode::Writers => {
            let writers: Vec<String> = l.writers.iter().map(|c| c.to_string()).collect();
            format!(
                "{linked}/{total} links, on the hooks whose chains write a mark: first priority and after each of {}{merged}",
                writers.join(", ")
            )
        }
    }
}

/// The label of a tc back-end in reports.
fn tc_label(backend: TcBackend) -> &'static str {
    match backend {
        TcBackend::Clsact => "tc filter",
        TcBackend::Tcx | TcBackend::Auto => "tcx",
    }
}

/// The tc observers at start-up: a summary line (and one for failures), with every change of
/// the first refresh as detail.
fn tc_lines(tc: &TcStartup) -> Vec<AttachStatus> {
    const NAMED: usize = 4;
    let named: Vec<String> = tc
        .observed
        .iter()
        .take(NAMED)
        .map(|(name, reason)| match reason {
            Reason::Everywhere => name.clone(),
            why => format!("{name} ({why})"),
        })
        .collect();
    let more = if tc.observed.len() > NAMED {
        ", …"
    } else {
        ""
    };
    let label = tc_label(tc.backend);
    let scope = match (tc.backend, tc.placement) {
        (TcBackend::Clsact, _) => {
            "cls_bpf filters first and last; only where a clsact qdisc is (none is added)"
        }
        (_, Placement::WhereNeeded) => "foreign tc programs or clsact/ingress qdisc",
        (_, Placement::Everywhere) => "full path: every interface",
    };
    let mut out = vec![line(
        label,
        true,
        format!(
            "observers on {} of {} interfaces ({scope}){}{}{more}",
            tc.observed.len(),
            tc.in_scope,
            if named.is_empty() { "" } else { ": " },
            named.join(", ")
        ),
    )];
    let failed: Vec<&TcObserverChange> = tc
        .changes
        .iter()
        .filter(|c| matches!(c.what, TcChangeKind::Failed { .. }))
        .collect();
    if let Some(first) = failed.first() {
        let names: Vec<&str> = failed
            .iter()
            .take(NAMED)
            .map(|c| c.ifname.as_str())
            .collect();
        out.push(line(
            label,
            false,
            format!(
                "observers NOT attached on {} interfaces ({}{}), e.g.: {}",
                failed.len(),
                names.join(", "),
                if failed.len() > NAMED { ", …" } else { "" },
                FailedWhy(first)
            ),
        ));
    }
    out.extend(tc.changes.iter().map(|c| AttachStatus {
        point: label.into(),
        ok: !matches!(c.what, TcChangeKind::Failed { .. }),
        // Under the point "tcx": "tcx observers added on …" reads "tcx: observers added on …".
        detail: ChangeDetail(c).to_string(),
        detail_only: true,
    }));
    out
}

/// A tc change without its back-end's label: "observers added on eth0: …".
struct ChangeDetail<'a>(&'a TcObserverChange);

impl fmt::Display for ChangeDetail<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        let n = &c.ifname;
        match &c.what {
            TcChangeKind::Added(why) => write!(f, "observers added on {n}: {why}"),
            TcChangeKind::Removed(Removal::Vanished) => {
                write!(f, "observers removed from {n}: interface vanished")
            }
            TcChangeKind::Removed(Removal::NotNeeded) => {
                write!(f, "observers removed from {n}: no foreign tc left")
            }
            TcChangeKind::Failed { .. } => {
                write!(
                    f,
                    "observers NOT attached to {n}: {} (retrying)",
                    FailedWhy(c)
                )
            }
            TcChangeKind::Programs(dir, progs) if progs.is_empty() => {
                write!(f, "{dir} of {n} runs between our observers: none now")
            }
            TcChangeKind::Programs(dir, progs) => {
                let list: Vec<String> = progs.iter().map(|p| p.to_string()).collect();
                write!(
                    f,
                    "{dir} of {n} runs between our observers: {}",
                    list.join(", ")
                )
            }
        }
    }
}

/// Why attaching failed: "tcx fwm_tc_in_first on eth0: …".
struct FailedWhy<'a>(&'a TcObserverChange);

impl fmt::Display for FailedWhy<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = self.0;
        match &c.what {
            TcChangeKind::Failed { program, error } => write!(
                f,
                "{} {program} on {}: {error:#}",
                tc_label(c.backend),
                c.ifname
            ),
            _ => Ok(()),
        }
    }
}

/// As the log says it: "tcx observers added on eth0: …".
impl fmt::Display for TcObserverChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", tc_label(self.backend), ChangeDetail(self))
    }
}

/// "ipv4 output prio -150".
struct Site<'a>(&'a NfSite);

impl fmt::Display for Site<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        write!(f, "{} {} prio {}", s.family, s.hook, s.priority)
    }
}

impl fmt::Display for NfChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NfChange::Chains(n) => write!(f, "nft chains changed ({n} base chains)"),
            NfChange::BandAdded(site) => write!(f, "band observer added at {}", Site(site)),
            NfChange::BandFailed(site, err) => write!(f, "band observer at {}: {err}", Site(site)),
            NfChange::CtWatchNotUpdated(err) => {
                write!(f, "conntrack mark watch not updated: {err:#}")
            }
        }
    }
}

impl fmt::Display for NothingAttached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("no observation point could be attached:")?;
        for s in lines(&self.0) {
            write!(f, "\n  {}: {}", s.point, s.detail)?;
        }
        Ok(())
    }
}

impl fmt::Display for Feature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Feature::Fentry => "fentry/fexit",
            Feature::Netfilter => "BPF netfilter links",
        })
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unavailable::NoBtfFunction(func) => write!(f, "kernel BTF has no {func} function"),
            Unavailable::Load(e) => write!(f, "BPF_PROG_LOAD: {e}"),
            Unavailable::TcxQuery(e) => e.fmt(f),
        }
    }
}

impl fmt::Display for NoNetfilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoNetfilter::NoLinks(why) => write!(f, "no BPF netfilter links ({why})"),
            NoNetfilter::NoFentry(why) => write!(f, "no fentry/fexit ({why})"),
            NoNetfilter::Neither { links, fentry } => write!(
                f,
                "neither BPF netfilter links ({links}) nor fentry/fexit ({fentry})"
            ),
        }
    }
}

/// Why an interface carries tc observers: "foreign program cil_to_netdev (id 42) on egress".
impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Foreign(chain) => {
                let parts: Vec<String> = TcDir::ALL
                    .iter()
                    .zip(chain)
                    .filter(|(_, progs)| !progs.is_empty())
                    .map(|(dir, progs)| {
                        let list: Vec<String> = progs.iter().map(|p| p.to_string()).collect();
                        let s = if progs.len() > 1 { "s" } else { "" };
                        format!("foreign program{s} {} on {dir}", list.join(", "))
                    })
                    .collect();
                f.write_str(&parts.join("; "))
            }
            Reason::Qdisc(q) => write!(f, "{q} qdisc"),
            Reason::Everywhere => f.write_str("full path"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nodestate::{netlink::TcQdisc, programs::ForeignProgram};

    fn prog(name: &str, id: u32) -> ForeignProgram {
        ForeignProgram {
            id,
            name: name.into(),
        }
    }

    #[test]
    fn reasons_read_as_sentences() {
        let egress = Reason::Foreign([vec![], vec![prog("test_setmark", 42)]]);
        assert_eq!(
            egress.to_string(),
            "foreign program test_setmark (id 42) on egress"
        );
        let both = Reason::Foreign([vec![prog("a", 1), prog("b", 2)], vec![prog("c", 3)]]);
        assert_eq!(
            both.to_string(),
            "foreign programs a (id 1), b (id 2) on ingress; foreign program c (id 3) on egress"
        );
        assert_eq!(Reason::Qdisc(TcQdisc::Clsact).to_string(), "clsact qdisc");
    }

    #[test]
    fn tc_changes_read_with_their_back_end() {
        let change = |what| TcObserverChange {
            backend: TcBackend::Clsact,
            ifname: "eth0".into(),
            what,
        };
        let added = change(TcChangeKind::Added(Reason::Qdisc(TcQdisc::Clsact)));
        assert_eq!(
            added.to_string(),
            "tc filter observers added on eth0: clsact qdisc"
        );
        let none = change(TcChangeKind::Programs(TcDir::Egress, vec![]));
        assert_eq!(
            none.to_string(),
            "tc filter egress of eth0 runs between our observers: none now"
        );
        let failed = change(TcChangeKind::Failed {
            program: "fwm_tc_in_first",
            error: anyhow::anyhow!("EBUSY"),
        });
        assert_eq!(
            failed.to_string(),
            "tc filter observers NOT attached to eth0: tc filter fwm_tc_in_first on eth0: EBUSY (retrying)"
        );
        let lines = tc_lines(&TcStartup {
            backend: TcBackend::Clsact,
            placement: Placement::WhereNeeded,
            observed: vec![],
            in_scope: 3,
            changes: vec![failed],
        });
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[1].detail,
            "observers NOT attached on 1 interfaces (eth0), e.g.: tc filter fwm_tc_in_first on eth0: EBUSY"
        );
        assert_eq!(
            lines[2].detail,
            "observers NOT attached to eth0: tc filter fwm_tc_in_first on eth0: EBUSY (retrying)"
        );
    }
}
