//! tc observers: first and last in the ingress and egress paths of an interface, so a change
//! between them is pinned to the programs in between. Two back-ends: tcx (kernel 6.6+), first
//! and last in the tcx chains (foreign programs listed with the tcx query); and before tcx,
//! direct-action cls_bpf filters at the first and last priority of a clsact qdisc (foreign
//! filters listed with a filter dump). The clsact back-end never adds a qdisc to the node: it
//! observes interfaces that already have clsact, which is where classic tc code runs. Filters,
//! unlike tcx links, outlive a killed daemon: ones left by an earlier run are removed before
//! attaching. Which interfaces get observers is `tc_placement`'s decision; every refresh
//! re-reads the interfaces, their chains and the namespace's qdiscs and attaches or detaches to
//! match.
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    os::fd::AsFd,
    time::Instant,
};

use anyhow::{Context, Result};
use aya::{
    programs::{
        links::LinkOrder,
        tc::{self as aya_tc, NlOptions, SchedClassifierLinkId, TcAttachOptions},
        SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use fwmark_trace_common::{tc_dir, tc_slot};

use super::{
    features::TcBackend,
    observers::AttachStatus,
    sys,
    tc_placement::{self, Placement, Reason},
};
use crate::nodestate::netlink::{self, TcQdisc};

/// The four tc observer programs: (name, direction, position).
pub(crate) const PROGRAMS: [(&str, u8, u8); 4] = [
    ("fwm_tc_in_first", tc_dir::INGRESS, tc_slot::FIRST),
    ("fwm_tc_in_last", tc_dir::INGRESS, tc_slot::LAST),
    ("fwm_tc_eg_first", tc_dir::EGRESS, tc_slot::FIRST),
    ("fwm_tc_eg_last", tc_dir::EGRESS, tc_slot::LAST),
];

/// A program of someone else's in a tcx chain, or a classic filter (`id` 0 unless cls_bpf).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct ForeignProgram {
    pub(crate) id: u32,
    pub(crate) name: String,
}

impl std::fmt::Display for ForeignProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (id {})", self.name, self.id)
    }
}

pub(crate) struct Interface {
    pub(crate) name: String,
    links: Vec<(usize, SchedClassifierLinkId)>,
    /// Foreign programs (or filters) between our first and last observers, per direction.
    pub(crate) chain: [Vec<ForeignProgram>; 2],
    pub(crate) reason: Reason,
}

/// The interfaces that carry observers, by ifindex.
pub(crate) struct TcObservers {
    /// `Tcx` or `Clsact`.
    pub(crate) backend: TcBackend,
    pub(crate) interfaces: BTreeMap<u32, Interface>,
    /// `None`: every interface of the namespace; otherwise only these names.
    only: Option<Vec<String>>,
    placement: Placement,
    /// Interfaces considered at the last refresh.
    pub(crate) in_scope: usize,
    /// The last qdisc dump (kept when a dump fails).
    qdiscs: HashMap<u32, TcQdisc>,
    /// Attach failures already said, by (ifindex, error): retried every refresh, said once.
    failures: HashSet<(u32, String)>,
}

pub(crate) enum Removal {
    Vanished,
    NotNeeded,
}

/// A change of the observers, under the back-end's label ("tcx", "tc filter").
pub(crate) struct Change(pub &'static str, pub(crate) ChangeKind);

pub(crate) enum ChangeKind {
    Added(String, Reason),
    Removed(String, Removal),
    Failed(String, String),
    /// The foreign programs between our observers changed: (interface, direction, programs).
    Programs(String, &'static str, String),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tc = self.0;
        match &self.1 {
            ChangeKind::Added(n, why) => write!(f, "{tc} observers added on {n}: {why}"),
            ChangeKind::Removed(n, Removal::Vanished) => {
                write!(f, "{tc} observers removed from {n}: interface vanished")
            }
            ChangeKind::Removed(n, Removal::NotNeeded) => {
                write!(f, "{tc} observers removed from {n}: no foreign tc left")
            }
            ChangeKind::Failed(n, why) => {
                write!(f, "{tc} observers NOT attached to {n}: {why} (retrying)")
            }
            ChangeKind::Programs(n, dir, progs) => {
                write!(f, "{tc} {dir} of {n} runs between our observers: {progs}")
            }
        }
    }
}

/// The label of a back-end in reports.
pub(crate) fn backend_label(backend: TcBackend) -> &'static str {
    match backend {
        TcBackend::Clsact => "tc filter",
        _ => "tcx",
    }
}

/// Whether this kernel has tcx (6.6+): a tcx query of loopback fails on older kernels.
pub(crate) fn has_tcx() -> std::result::Result<(), String> {
    SchedClassifier::query_tcx("lo", TcAttachType::Ingress)
        .map(drop)
        .map_err(|e| e.to_string())
}

pub(crate) fn dir_name(dir: u8) -> &'static str {
    if dir == tc_dir::INGRESS {
        "ingress"
    } else {
        "egress"
    }
}

fn attach_type(dir: u8) -> TcAttachType {
    if dir == tc_dir::INGRESS {
        TcAttachType::Ingress
    } else {
        TcAttachType::Egress
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?;
    Ok(prog.try_into()?)
}

/// Lists the interfaces of the current network namespace (ifindex, name).
pub(crate) fn list_interfaces() -> Result<Vec<(u32, String)>> {
    // SAFETY: if_nameindex returns a NULL-terminated array we free with if_freenameindex.
    unsafe {
        let head = libc::if_nameindex();
        if head.is_null() {
            return Err(std::io::Error::last_os_error()).context("listing interfaces");
        }
        let mut out = Vec::new();
        let mut p = head;
        while (*p).if_index != 0 {
            let name = std::ffi::CStr::from_ptr((*p).if_name)
                .to_string_lossy()
                .into_owned();
            out.push(((*p).if_index, name));
            p = p.add(1);
        }
        libc::if_freenameindex(head);
        Ok(out)
    }
}

impl TcObservers {
    pub(crate) fn load(
        ebpf: &mut Ebpf,
        only: Option<Vec<String>>,
        placement: Placement,
        backend: TcBackend,
    ) -> Result<Self> {
        for (name, _, _) in PROGRAMS {
            let p = program(ebpf, name)?;
            let started = Instant::now();
            p.load()
                .with_context(|| format!("loading tc program {name}"))?;
            sys::log_verified(name, p.fd()?.as_fd(), started);
        }
        Ok(Self {
            backend,
            interfaces: BTreeMap::new(),
            only,
            placement,
            in_scope: 0,
            qdiscs: HashMap::new(),
            failures: HashSet::new(),
        })
    }

    /// Attaches observers where they are now needed and detaches them where they no longer
    /// are; returns what changed. One interface listing, one qdisc dump and one tcx query per
    /// interface and direction: cheap enough for every second on hundreds of interfaces.
    pub(crate) fn refresh(&mut self, ebpf: &mut Ebpf) -> Result<Vec<Change>> {
        let wanted: Vec<(u32, String)> = list_interfaces()?
            .into_iter()
            .filter(|(_, n)| self.only.as_ref().is_none_or(|o| o.contains(n)))
            .collect();
        self.in_scope = wanted.len();
        match netlink::tc_qdiscs() {
            Ok(q) => self.qdiscs = q,
            Err(err) => log::debug!("qdisc dump failed, keeping the last one: {err:#}"),
        }
        let alive: HashSet<u32> = wanted.iter().map(|(i, _)| *i).collect();
        let label = backend_label(self.backend);
        let change = |kind| Change(label, kind);
        let mut changes = Vec::new();
        let gone: Vec<u32> = self
            .interfaces
            .keys()
            .filter(|i| !alive.contains(i))
            .copied()
            .collect();
        for ifindex in gone {
            // The device took its links with it; detaching only releases our handles.
            let iface = self.detach(ebpf, ifindex);
            changes.push(change(ChangeKind::Removed(iface.name, Removal::Vanished)));
        }
        self.failures.retain(|(i, _)| alive.contains(i));
        for (ifindex, name) in wanted {
            let known = self.interfaces.get(&ifindex).map(|i| &i.chain);
            let chain = [tc_dir::INGRESS, tc_dir::EGRESS].map(|dir| {
                // A failed query keeps what we knew.
                foreign_programs(self.backend, ifindex, &name, dir)
                    .or_else(|| known.map(|k| k[dir as usize].clone()))
                    .unwrap_or_default()
            });
            let qdisc = self.qdiscs.get(&ifindex).copied();
            // Filters need a clsact qdisc, which the daemon does not add.
            let reason = match (self.backend, qdisc) {
                (TcBackend::Clsact, Some(TcQdisc::Clsact))
                | (TcBackend::Tcx | TcBackend::Auto, _) => {
                    tc_placement::reason(self.placement, &chain, qdisc)
                }
                (TcBackend::Clsact, _) => None,
            };
            match (self.interfaces.get_mut(&ifindex), reason) {
                (Some(iface), Some(reason)) => {
                    for dir in [tc_dir::INGRESS, tc_dir::EGRESS] {
                        let now = &chain[dir as usize];
                        if *now != iface.chain[dir as usize] {
                            // Another datapath came or went: the operator wants to know.
                            changes.push(change(ChangeKind::Programs(
                                name.clone(),
                                dir_name(dir),
                                program_list(now),
                            )));
                        }
                    }
                    iface.chain = chain;
                    iface.reason = reason;
                }
                (Some(_), None) => {
                    self.detach(ebpf, ifindex);
                    changes.push(change(ChangeKind::Removed(name, Removal::NotNeeded)));
                }
                (None, Some(reason)) => match attach_all(ebpf, self.backend, &name) {
                    Ok(links) => {
                        self.failures.retain(|(i, _)| *i != ifindex);
                        changes.push(change(ChangeKind::Added(name.clone(), reason.clone())));
                        let iface = Interface {
                            name,
                            links,
                            chain,
                            reason,
                        };
                        self.interfaces.insert(ifindex, iface);
                    }
                    Err(err) => {
                        let why = format!("{err:#}");
                        if self.failures.insert((ifindex, why.clone())) {
                            changes.push(change(ChangeKind::Failed(name, why)));
                        }
                    }
                },
                (None, None) => {}
            }
        }
        Ok(changes)
    }

    fn detach(&mut self, ebpf: &mut Ebpf, ifindex: u32) -> Interface {
        let mut iface = self
            .interfaces
            .remove(&ifindex)
            .expect("attached interface");
        detach_links(ebpf, std::mem::take(&mut iface.links));
        iface
    }

    /// The start-up report: a summary line (and one for failures), with every change of the
    /// first refresh as detail.
    pub(crate) fn report(&self, changes: &[Change]) -> Vec<AttachStatus> {
        const NAMED: usize = 4;
        let named: Vec<String> = self
            .interfaces
            .values()
            .take(NAMED)
            .map(|i| match i.reason {
                Reason::Everywhere => i.name.clone(),
                ref why => format!("{} ({why})", i.name),
            })
            .collect();
        let more = if self.interfaces.len() > NAMED {
            ", …"
        } else {
            ""
        };
        let label = backend_label(self.backend);
        let scope = match (self.backend, self.placement) {
            (TcBackend::Clsact, _) => {
                "cls_bpf filters first and last; only where a clsact qdisc is (none is added)"
            }
            (_, Placement::WhereNeeded) => "foreign tc programs or clsact/ingress qdisc",
            (_, Placement::Everywhere) => "full path: every interface",
        };
        let mut out = vec![AttachStatus {
            point: label.into(),
            ok: true,
            detail: format!(
                "observers on {} of {} interfaces ({scope}){}{}{more}",
                self.interfaces.len(),
                self.in_scope,
                if named.is_empty() { "" } else { ": " },
                named.join(", ")
            ),
            detail_only: false,
        }];
        let failed: Vec<(&String, &String)> = changes
            .iter()
            .filter_map(|c| match &c.1 {
                ChangeKind::Failed(n, why) => Some((n, why)),
                _ => None,
            })
            .collect();
        if let Some((_, why)) = failed.first() {
            let names: Vec<&str> = failed.iter().take(NAMED).map(|(n, _)| n.as_str()).collect();
            out.push(AttachStatus {
                point: label.into(),
                ok: false,
                detail: format!(
                    "observers NOT attached on {} interfaces ({}{}), e.g.: {why}",
                    failed.len(),
                    names.join(", "),
                    if failed.len() > NAMED { ", …" } else { "" }
                ),
                detail_only: false,
            });
        }
        out.extend(changes.iter().map(|c| AttachStatus {
            point: label.into(),
            ok: !matches!(c.1, ChangeKind::Failed(..)),
            // Under the point "tcx": "tcx observers added on …" reads "tcx: observers added on …".
            detail: c.to_string()[label.len()..].trim_start().to_owned(),
            detail_only: true,
        }));
        out
    }
}

/// A classic filter this run put in a clsact qdisc (the clsact back-end). Filters are not
/// links: they are named by place, and outlive a killed daemon.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct OwnFilter {
    pub(crate) ifindex: u32,
    pub(crate) ifname: String,
    pub(crate) direction: &'static str,
    pub(crate) priority: u16,
    pub(crate) program: &'static str,
}

impl TcObservers {
    /// The filters this run has attached (none with tcx, whose observers are links).
    pub(crate) fn own_filters(&self) -> Vec<OwnFilter> {
        if self.backend != TcBackend::Clsact {
            return Vec::new();
        }
        self.interfaces
            .iter()
            .flat_map(|(ifindex, iface)| {
                iface.links.iter().map(move |(p, _)| {
                    let (program, dir, slot) = PROGRAMS[*p];
                    OwnFilter {
                        ifindex: *ifindex,
                        ifname: iface.name.clone(),
                        direction: dir_name(dir),
                        priority: filter_priority(slot),
                        program,
                    }
                })
            })
            .collect()
    }
}

fn ours(name: &str) -> bool {
    name.starts_with("fwm_tc_")
}

/// The programs of one of `ifname`'s tcx chains, or the filters of its clsact qdisc, that are
/// not ours (`None`: the query failed).
fn foreign_programs(
    backend: TcBackend,
    ifindex: u32,
    ifname: &str,
    dir: u8,
) -> Option<Vec<ForeignProgram>> {
    if backend == TcBackend::Clsact {
        let filters = netlink::tc_filters(ifindex, dir == tc_dir::EGRESS).ok()?;
        return Some(
            filters
                .into_iter()
                .filter(|f| !f.program.as_ref().is_some_and(|(n, _)| ours(n)))
                .map(|f| match f.program {
                    Some((name, id)) => ForeignProgram { id, name },
                    None => ForeignProgram {
                        id: 0,
                        name: format!("{} filter prio {}", f.kind, f.priority),
                    },
                })
                .collect(),
        );
    }
    let (_, progs) = SchedClassifier::query_tcx(ifname, attach_type(dir)).ok()?;
    Some(
        progs
            .iter()
            .filter_map(|p| {
                let name = p.name_as_str().unwrap_or("").to_owned();
                (!ours(&name)).then(|| ForeignProgram { id: p.id(), name })
            })
            .collect(),
    )
}

fn program_list(progs: &[ForeignProgram]) -> String {
    if progs.is_empty() {
        return "none now".into();
    }
    let list: Vec<String> = progs.iter().map(|p| p.to_string()).collect();
    list.join(", ")
}

fn detach_links(ebpf: &mut Ebpf, links: Vec<(usize, SchedClassifierLinkId)>) {
    for (p, link) in links {
        let _ = program(ebpf, PROGRAMS[p].0).map(|prog| prog.detach(link));
    }
}

/// The first and last filter priorities of a qdisc (0 asks the kernel to choose).
const FILTER_PRIO_FIRST: u16 = 1;
const FILTER_PRIO_LAST: u16 = u16::MAX;

/// Where an observer's filter goes in the clsact back-end.
fn filter_priority(slot: u8) -> u16 {
    if slot == tc_slot::FIRST {
        FILTER_PRIO_FIRST
    } else {
        FILTER_PRIO_LAST
    }
}

fn attach_all(
    ebpf: &mut Ebpf,
    backend: TcBackend,
    ifname: &str,
) -> Result<Vec<(usize, SchedClassifierLinkId)>> {
    let mut links = Vec::new();
    for (i, (name, dir, slot)) in PROGRAMS.into_iter().enumerate() {
        let first = slot == tc_slot::FIRST;
        let options = match backend {
            TcBackend::Clsact => {
                // Not attached here, so a filter of that name is a killed run's leftover.
                let _ = aya_tc::qdisc_detach_program(ifname, attach_type(dir), name);
                TcAttachOptions::Netlink(NlOptions {
                    priority: filter_priority(slot),
                    ..Default::default()
                })
            }
            _ => TcAttachOptions::TcxOrder(if first {
                LinkOrder::first()
            } else {
                LinkOrder::last()
            }),
        };
        let prog = program(ebpf, name)?;
        match prog.attach_with_options(ifname, attach_type(dir), options) {
            Ok(link) => links.push((i, link)),
            Err(err) => {
                // Leave nothing half-attached on this interface.
                detach_links(ebpf, links);
                let what = backend_label(backend);
                return Err(err).with_context(|| format!("{what} {name} on {ifname}"));
            }
        }
    }
    Ok(links)
}
