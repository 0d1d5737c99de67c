//! tc observers: first and last in the ingress and egress paths of an interface, so a change
//! between them is pinned to the programs in between. Two back-ends: tcx (kernel 6.6+), first
//! and last in the tcx chains (foreign programs listed with the tcx query); and before tcx,
//! direct-action cls_bpf filters at the first and last priority of a clsact qdisc (foreign
//! filters listed with a filter dump). The clsact back-end never adds a qdisc to the node: it
//! observes interfaces that already have clsact, which is where classic tc code runs. Filters,
//! unlike tcx links, outlive a killed daemon, and several daemons may observe one interface: so
//! each filter carries its daemon's identity in its handle (`FilterOwner`), and before attaching
//! a daemon removes only the filters of daemons no longer running. Which interfaces get
//! observers is `tc_placement`'s decision; every refresh re-reads the interfaces, their chains
//! and the namespace's qdiscs and attaches or detaches to match.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    os::{fd::AsFd, unix::fs::MetadataExt},
    time::Instant,
};

use anyhow::{Context, Result};
use aya::{
    programs::{
        links::LinkOrder,
        tc::{NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle},
        Link, SchedClassifier, TcAttachType,
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
    /// Who this daemon is, in the handles of its filters (the clsact back-end).
    me: Identity,
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
            me: Identity::current()?,
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
                (None, Some(reason)) => {
                    match attach_all(ebpf, self.backend, &self.me, ifindex, &name) {
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
                    }
                }
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
    /// As `tc filter show` prints it: this daemon's `FilterOwner`.
    pub(crate) handle: String,
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
                        handle: format!("{:#x}", self.me.owner.handle()),
                        program,
                    }
                })
            })
            .collect()
    }
}

/// Whether a program is a fwmark-trace tc observer, this daemon's or another's.
fn ours(name: &str) -> bool {
    name.starts_with("fwm_tc_")
}

/// The programs of one of `ifname`'s tcx chains, or the filters of its clsact qdisc, that are
/// not ours (`None`: the query failed). Another fwmark-trace's observers are not foreign
/// either: they only read the mark, so they change nothing between ours, and a second daemon
/// coming or going must not read as another datapath on every interface.
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
    me: &Identity,
    ifindex: u32,
    ifname: &str,
) -> Result<Vec<(usize, SchedClassifierLinkId)>> {
    if backend == TcBackend::Clsact {
        remove_leftovers(me, ifindex, ifname);
    }
    let mut links = Vec::new();
    for (i, (name, dir, slot)) in PROGRAMS.into_iter().enumerate() {
        let first = slot == tc_slot::FIRST;
        let options = match backend {
            // Beside other daemons' filters at the same priority: one handle each.
            TcBackend::Clsact => TcAttachOptions::Netlink(NlOptions {
                priority: filter_priority(slot),
                handle: TcHandle::from(me.owner.handle()),
                ..Default::default()
            }),
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

/// Whose a filter of ours is, carried in its handle: filters outlive a killed daemon, and the
/// handle is what the kernel keeps of who attached them. Bits 0-21 hold the daemon's pid (pids
/// stay below 2^22, the kernel's PID_MAX_LIMIT) and bits 22-31 a tag of its pid namespace, 1 to
/// 1023, since a pid names a process only in its own namespace. The handle is never 0 (0 asks
/// the kernel to pick one), and the handles the kernel picks, counting up from 1, have tag 0:
/// no daemon's. Each daemon thus has one handle, at all four places its filters go, and two
/// daemons share a priority as two filters of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FilterOwner {
    pid_ns: u16,
    pid: u32,
}

const PID_BITS: u32 = 22;

impl FilterOwner {
    fn handle(self) -> u32 {
        u32::from(self.pid_ns) << PID_BITS | self.pid
    }

    fn of_handle(handle: u32) -> Self {
        Self {
            pid_ns: (handle >> PID_BITS) as u16,
            pid: handle & ((1 << PID_BITS) - 1),
        }
    }
}

/// This daemon: its `FilterOwner`, and its command name, which tells a running daemon from
/// another process that got a dead daemon's pid.
struct Identity {
    owner: FilterOwner,
    comm: String,
}

impl Identity {
    fn current() -> Result<Self> {
        let ns = std::fs::metadata("/proc/self/ns/pid").context("reading /proc/self/ns/pid")?;
        let comm = running_command("self").context("reading /proc/self/stat")?;
        Ok(Self {
            owner: FilterOwner {
                pid_ns: (ns.ino() % 1023) as u16 + 1,
                pid: std::process::id(),
            },
            comm,
        })
    }

    /// Whether a filter of ours with this handle is a leftover this daemon may remove: its
    /// daemon was of our pid namespace and no longer runs. A filter of another pid namespace
    /// (or of no daemon: a kernel-picked handle) is never judged, so never removed. A process
    /// with our command name at that pid counts as the daemon: keeping a dead daemon's filter
    /// is the safe mistake. Our own pid is a leftover: where we attach we hold no filter, so
    /// one with our handle is an earlier process's that had our pid.
    fn leftover(&self, handle: u32) -> bool {
        let owner = FilterOwner::of_handle(handle);
        owner.pid_ns == self.owner.pid_ns
            && (owner.pid == self.owner.pid
                || running_command(&owner.pid.to_string()).is_none_or(|c| c != self.comm))
    }
}

/// The command name of process `pid` (a number, or `self`) from /proc/PID/stat; `None` when
/// there is no such process, or it has exited and waits to be reaped (a zombie holds nothing).
fn running_command(pid: &str) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE …": the name may hold spaces and parentheses, so up to the last ')'.
    let (start, end) = (stat.find('(')?, stat.rfind(')')?);
    let state = stat[end + 1..].split_whitespace().next()?;
    (state != "Z").then(|| stat[start + 1..end].to_owned())
}

/// Removes from `ifname`'s clsact qdisc the filters named as our observers whose daemon no
/// longer runs (`Identity::leftover`), saying so once for the interface. Best effort: a filter
/// that stays only costs its program's run on each packet, and ours go beside it under our own
/// handle.
fn remove_leftovers(me: &Identity, ifindex: u32, ifname: &str) {
    let (mut removed, mut pids) = (0, BTreeSet::new());
    for dir in [tc_dir::INGRESS, tc_dir::EGRESS] {
        let Ok(filters) = netlink::tc_filters(ifindex, dir == tc_dir::EGRESS) else {
            continue;
        };
        for f in filters {
            let Some((name, _)) = &f.program else {
                continue;
            };
            if !PROGRAMS.iter().any(|(p, _, _)| p == name) || !me.leftover(f.handle) {
                continue;
            }
            let handle = TcHandle::from(f.handle);
            let link =
                SchedClassifierLink::attached(ifname, attach_type(dir), f.priority, handle, None);
            match link.map_err(anyhow::Error::from).and_then(|l| Ok(l.detach()?)) {
                Ok(()) => {
                    removed += 1;
                    pids.insert(FilterOwner::of_handle(f.handle).pid);
                }
                Err(err) => log::warn!(
                    "could not remove tc filter {name} (prio {}, handle {:#x}) from {ifname} {}, left by a fwmark-trace no longer running: {err:#}",
                    f.priority,
                    f.handle,
                    dir_name(dir)
                ),
            }
        }
    }
    if removed > 0 {
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        log::info!(
            "removed {removed} tc filters from {ifname} left by fwmark-trace pid {}, no longer running",
            pids.join(", ")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_names_its_daemon() {
        let me = Identity::current().unwrap();
        assert_eq!(me.owner.pid, std::process::id());
        assert!((1..=1023).contains(&me.owner.pid_ns));
        let handle = me.owner.handle();
        assert_ne!(handle, 0);
        assert_eq!(FilterOwner::of_handle(handle), me.owner);
        // The largest pid the kernel hands out keeps its namespace tag.
        let last = FilterOwner {
            pid_ns: 1023,
            pid: (1 << PID_BITS) - 1,
        };
        assert_eq!(FilterOwner::of_handle(last.handle()), last);
        // Handles the kernel picks itself belong to no daemon.
        assert_eq!(FilterOwner::of_handle(1).pid_ns, 0);
    }

    #[test]
    fn only_our_namespaces_dead_daemons_leave_leftovers() {
        let mut sleep = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // A daemon is a running process with the daemon's command name: here `sleep`.
        let me = Identity {
            comm: "sleep".into(),
            ..Identity::current().unwrap()
        };
        let ns = me.owner.pid_ns;
        let handle = |pid_ns, pid| FilterOwner { pid_ns, pid }.handle();
        let other_ns = ns % 1023 + 1;
        assert!(!me.leftover(handle(ns, sleep.id())), "a running daemon");
        assert!(
            !me.leftover(handle(other_ns, 0x3f_fffe)),
            "another namespace's"
        );
        assert!(!me.leftover(1), "a handle the kernel picked");
        assert!(
            me.leftover(me.owner.handle()),
            "our pid: an earlier process's"
        );
        // Another program at that pid: the daemon's pid reused.
        let other = Identity {
            comm: "fwmark-trace".into(),
            ..Identity::current().unwrap()
        };
        assert!(other.leftover(handle(ns, sleep.id())), "pid reused");
        // Killed: a zombie until reaped, then gone; a daemon neither way.
        sleep.kill().unwrap();
        let pid = sleep.id().to_string();
        while running_command(&pid).is_some() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(me.leftover(handle(ns, sleep.id())), "a zombie");
        sleep.wait().unwrap();
        assert!(me.leftover(handle(ns, sleep.id())), "an exited daemon");
    }
}
