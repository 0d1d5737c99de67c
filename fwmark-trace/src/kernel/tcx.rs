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
        Link, SchedClassifier,
    },
    Ebpf,
};

use fwmark_trace_common::{tc_slot, TC_OBSERVERS};

use super::{
    features::TcBackend,
    sys,
    tc_placement::{self, Placement, Reason},
};
use crate::{
    netstack::TcDir,
    nodestate::{
        links::list_interfaces,
        netlink::{self, TcQdisc},
        programs::{attach_type, foreign_programs, ForeignProgram, TcChain},
    },
};

/// Where in a direction's chain an observer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    First,
    Last,
}

/// A tc observer program, typed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TcProgram {
    pub(crate) name: &'static str,
    pub(crate) dir: TcDir,
    pub(crate) slot: Slot,
}

impl TcProgram {
    /// The `i`th line of the common crate's `tc_observers!` table, typed.
    fn at(i: usize) -> Self {
        let o = &TC_OBSERVERS[i];
        Self {
            name: o.program,
            dir: TcDir::from_raw(o.dir),
            slot: if o.slot == tc_slot::FIRST {
                Slot::First
            } else {
                Slot::Last
            },
        }
    }

    /// Every tc observer program, in the table's order.
    fn all() -> impl Iterator<Item = Self> {
        (0..TC_OBSERVERS.len()).map(Self::at)
    }
}

pub(crate) struct Interface {
    pub(crate) name: String,
    links: Vec<(usize, SchedClassifierLinkId)>,
    /// Foreign programs (or filters) between our first and last observers, per direction
    /// (`TcDir::ALL` order).
    pub(crate) chain: [Vec<ForeignProgram>; 2],
    pub(crate) reason: Reason,
}

/// The interfaces that carry observers, by ifindex.
pub(crate) struct TcObservers {
    /// `Tcx` or `Clsact`.
    backend: TcBackend,
    interfaces: BTreeMap<u32, Interface>,
    /// `None`: every interface of the namespace; otherwise only these names.
    only: Option<Vec<String>>,
    placement: Placement,
    /// Interfaces considered at the last refresh.
    in_scope: usize,
    /// The last qdisc dump (kept when a dump fails).
    qdiscs: HashMap<u32, TcQdisc>,
    /// Attach failures already said, by (ifindex, program, OS error): retried every refresh,
    /// said once.
    failures: HashSet<(u32, &'static str, Option<i32>)>,
    /// Who this daemon is, in the handles of its filters (the clsact back-end).
    me: Identity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Removal {
    Vanished,
    NotNeeded,
}

/// A change of the tc observers on one interface, found by a refresh.
pub(crate) struct TcObserverChange {
    pub(crate) backend: TcBackend,
    pub(crate) ifname: String,
    pub(crate) what: TcChangeKind,
}

pub(crate) enum TcChangeKind {
    Added(Reason),
    Removed(Removal),
    /// Attaching `program` failed (tried again at the next refresh).
    Failed {
        program: &'static str,
        error: anyhow::Error,
    },
    /// The foreign programs between our observers in one direction changed to these.
    Programs(TcDir, Vec<ForeignProgram>),
}

/// The tc observers at start-up: where they are, and what the first refresh did.
pub(crate) struct TcStartup {
    pub(crate) backend: TcBackend,
    pub(crate) placement: Placement,
    /// The interfaces with observers, by ifindex: name and why.
    pub(crate) observed: Vec<(String, Reason)>,
    /// Interfaces considered.
    pub(crate) in_scope: usize,
    pub(crate) changes: Vec<TcObserverChange>,
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier> {
    let prog = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?;
    Ok(prog.try_into()?)
}

/// The chain our observers go into with `backend`.
fn chain_of(backend: TcBackend) -> TcChain {
    match backend {
        TcBackend::Clsact => TcChain::ClsactFilters,
        TcBackend::Tcx | TcBackend::Auto => TcChain::Tcx,
    }
}

/// The OS error at the root of `err`, if it has one: what tells two attach failures apart.
fn os_error(err: &anyhow::Error) -> Option<i32> {
    err.chain()
        .find_map(|e| e.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::raw_os_error)
}

impl TcObservers {
    pub(crate) fn load(
        ebpf: &mut Ebpf,
        only: Option<Vec<String>>,
        placement: Placement,
        backend: TcBackend,
    ) -> Result<Self> {
        for TcProgram { name, .. } in TcProgram::all() {
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

    pub(crate) fn backend(&self) -> TcBackend {
        self.backend
    }

    /// The interfaces that carry observers, by ifindex.
    pub(crate) fn interfaces(&self) -> &BTreeMap<u32, Interface> {
        &self.interfaces
    }

    /// Attaches observers where they are now needed and detaches them where they no longer
    /// are; returns what changed. One interface listing, one qdisc dump and one tcx query per
    /// interface and direction: cheap enough for every second on hundreds of interfaces.
    pub(crate) fn refresh(&mut self, ebpf: &mut Ebpf) -> Result<Vec<TcObserverChange>> {
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
        let backend = self.backend;
        let change = |ifname: String, what| TcObserverChange {
            backend,
            ifname,
            what,
        };
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
            changes.push(change(iface.name, TcChangeKind::Removed(Removal::Vanished)));
        }
        self.failures.retain(|(i, _, _)| alive.contains(i));
        for (ifindex, name) in wanted {
            let known = self.interfaces.get(&ifindex).map(|i| &i.chain);
            let chain = [0, 1].map(|d| {
                // A failed query keeps what we knew.
                foreign_programs(chain_of(backend), ifindex, &name, TcDir::ALL[d], ours)
                    .or_else(|| known.map(|k| k[d].clone()))
                    .unwrap_or_default()
            });
            let qdisc = self.qdiscs.get(&ifindex).copied();
            // Filters need a clsact qdisc, which the daemon does not add.
            let reason = match (backend, qdisc) {
                (TcBackend::Clsact, Some(TcQdisc::Clsact))
                | (TcBackend::Tcx | TcBackend::Auto, _) => {
                    tc_placement::reason(self.placement, &chain, qdisc)
                }
                (TcBackend::Clsact, _) => None,
            };
            match (self.interfaces.get_mut(&ifindex), reason) {
                (Some(iface), Some(reason)) => {
                    for (d, dir) in TcDir::ALL.into_iter().enumerate() {
                        if chain[d] != iface.chain[d] {
                            // Another datapath came or went: the operator wants to know.
                            changes.push(change(
                                name.clone(),
                                TcChangeKind::Programs(dir, chain[d].clone()),
                            ));
                        }
                    }
                    iface.chain = chain;
                    iface.reason = reason;
                }
                (Some(_), None) => {
                    self.detach(ebpf, ifindex);
                    changes.push(change(name, TcChangeKind::Removed(Removal::NotNeeded)));
                }
                (None, Some(reason)) => match attach_all(ebpf, backend, &self.me, ifindex, &name) {
                    Ok(links) => {
                        self.failures.retain(|(i, _, _)| *i != ifindex);
                        changes.push(change(name.clone(), TcChangeKind::Added(reason.clone())));
                        let iface = Interface {
                            name,
                            links,
                            chain,
                            reason,
                        };
                        self.interfaces.insert(ifindex, iface);
                    }
                    Err((program, error)) => {
                        if self.failures.insert((ifindex, program, os_error(&error))) {
                            changes.push(change(name, TcChangeKind::Failed { program, error }));
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

    /// The start-up report: where the observers are after the first refresh, which made
    /// `changes`.
    pub(crate) fn startup(&self, changes: Vec<TcObserverChange>) -> TcStartup {
        TcStartup {
            backend: self.backend,
            placement: self.placement,
            observed: self
                .interfaces
                .values()
                .map(|i| (i.name.clone(), i.reason.clone()))
                .collect(),
            in_scope: self.in_scope,
            changes,
        }
    }
}

/// A classic filter this run put in a clsact qdisc (the clsact back-end). Filters are not
/// links: they are named by place, and outlive a killed daemon.
#[derive(Clone, Debug)]
pub(crate) struct OwnFilter {
    pub(crate) ifindex: u32,
    pub(crate) ifname: String,
    pub(crate) dir: TcDir,
    pub(crate) priority: u16,
    /// This daemon's `FilterOwner`.
    pub(crate) handle: u32,
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
                    let TcProgram { name, dir, slot } = TcProgram::at(*p);
                    OwnFilter {
                        ifindex: *ifindex,
                        ifname: iface.name.clone(),
                        dir,
                        priority: filter_priority(slot),
                        handle: self.me.owner.handle(),
                        program: name,
                    }
                })
            })
            .collect()
    }
}

/// Whether a program is a fwmark-trace tc observer, this daemon's or another's. Another
/// fwmark-trace's observers are not foreign: they only read the mark, so they change nothing
/// between ours, and a second daemon coming or going must not read as another datapath on
/// every interface.
fn ours(name: &str) -> bool {
    name.starts_with("fwm_tc_")
}

fn detach_links(ebpf: &mut Ebpf, links: Vec<(usize, SchedClassifierLinkId)>) {
    for (p, link) in links {
        let _ = program(ebpf, TcProgram::at(p).name).map(|prog| prog.detach(link));
    }
}

/// The first and last filter priorities of a qdisc (0 asks the kernel to choose).
const FILTER_PRIO_FIRST: u16 = 1;
const FILTER_PRIO_LAST: u16 = u16::MAX;

/// Where an observer's filter goes in the clsact back-end.
fn filter_priority(slot: Slot) -> u16 {
    match slot {
        Slot::First => FILTER_PRIO_FIRST,
        Slot::Last => FILTER_PRIO_LAST,
    }
}

/// Attaches the four observers to `ifname`, or none: `Err` names the program that failed.
fn attach_all(
    ebpf: &mut Ebpf,
    backend: TcBackend,
    me: &Identity,
    ifindex: u32,
    ifname: &str,
) -> Result<Vec<(usize, SchedClassifierLinkId)>, (&'static str, anyhow::Error)> {
    if backend == TcBackend::Clsact {
        remove_leftovers(me, ifindex, ifname);
    }
    let mut links = Vec::new();
    for (i, TcProgram { name, dir, slot }) in TcProgram::all().enumerate() {
        let options = match backend {
            // Beside other daemons' filters at the same priority: one handle each.
            TcBackend::Clsact => TcAttachOptions::Netlink(NlOptions {
                priority: filter_priority(slot),
                handle: TcHandle::from(me.owner.handle()),
                ..Default::default()
            }),
            _ => TcAttachOptions::TcxOrder(match slot {
                Slot::First => LinkOrder::first(),
                Slot::Last => LinkOrder::last(),
            }),
        };
        let attached = program(ebpf, name)
            .and_then(|prog| Ok(prog.attach_with_options(ifname, attach_type(dir), options)?));
        match attached {
            Ok(link) => links.push((i, link)),
            Err(err) => {
                // Leave nothing half-attached on this interface.
                detach_links(ebpf, links);
                return Err((name, err));
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
    for dir in TcDir::ALL {
        let Ok(filters) = netlink::tc_filters(ifindex, dir == TcDir::Egress) else {
            continue;
        };
        for f in filters {
            let Some((name, _)) = &f.program else {
                continue;
            };
            if !TC_OBSERVERS.iter().any(|o| o.program == name) || !me.leftover(f.handle) {
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
                    dir
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
