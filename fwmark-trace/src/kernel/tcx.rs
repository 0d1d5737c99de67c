//! tcx observers: first and last in the ingress and egress chains of an interface, so a change
//! between them is pinned to the programs in between (listed with the tcx prog query). Which
//! interfaces get them is `tc_placement`'s decision; every refresh re-reads the interfaces,
//! their tcx chains and the namespace's qdiscs and attaches or detaches to match.
use std::collections::{BTreeMap, HashMap, HashSet};

use anyhow::{Context, Result};
use aya::{
    programs::{
        links::LinkOrder,
        tc::{SchedClassifierLinkId, TcAttachOptions},
        SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use fwmark_trace_common::{tc_dir, tc_slot};

use super::{
    observers::AttachStatus,
    tc_placement::{self, Placement, Reason},
};
use crate::nodestate::netlink::{self, TcQdisc};

/// The four tcx observer programs: (name, direction, position).
pub const PROGRAMS: [(&str, u8, u8); 4] = [
    ("fwm_tc_in_first", tc_dir::INGRESS, tc_slot::FIRST),
    ("fwm_tc_in_last", tc_dir::INGRESS, tc_slot::LAST),
    ("fwm_tc_eg_first", tc_dir::EGRESS, tc_slot::FIRST),
    ("fwm_tc_eg_last", tc_dir::EGRESS, tc_slot::LAST),
];

/// A program of someone else's in a tcx chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForeignProgram {
    pub id: u32,
    pub name: String,
}

impl std::fmt::Display for ForeignProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (id {})", self.name, self.id)
    }
}

pub struct Interface {
    pub name: String,
    links: Vec<(usize, SchedClassifierLinkId)>,
    /// Foreign programs between our first and last observers, per direction.
    pub chain: [Vec<ForeignProgram>; 2],
    pub reason: Reason,
}

/// The interfaces that carry observers, by ifindex.
pub struct TcObservers {
    pub interfaces: BTreeMap<u32, Interface>,
    /// `None`: every interface of the namespace; otherwise only these names.
    only: Option<Vec<String>>,
    placement: Placement,
    /// Interfaces considered at the last refresh.
    pub in_scope: usize,
    /// The last qdisc dump (kept when a dump fails).
    qdiscs: HashMap<u32, TcQdisc>,
    /// Attach failures already said, by (ifindex, error): retried every refresh, said once.
    failures: HashSet<(u32, String)>,
}

pub enum Removal {
    Vanished,
    NotNeeded,
}

pub enum Change {
    Added(String, Reason),
    Removed(String, Removal),
    Failed(String, String),
    /// The foreign programs between our observers changed: (interface, direction, programs).
    Programs(String, &'static str, String),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Added(n, why) => write!(f, "tcx observers added on {n}: {why}"),
            Change::Removed(n, Removal::Vanished) => {
                write!(f, "tcx observers removed from {n}: interface vanished")
            }
            Change::Removed(n, Removal::NotNeeded) => {
                write!(f, "tcx observers removed from {n}: no foreign tc left")
            }
            Change::Failed(n, why) => {
                write!(f, "tcx observers NOT attached to {n}: {why} (retrying)")
            }
            Change::Programs(n, dir, progs) => {
                write!(f, "tcx {dir} of {n} runs between our observers: {progs}")
            }
        }
    }
}

pub fn dir_name(dir: u8) -> &'static str {
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
pub fn list_interfaces() -> Result<Vec<(u32, String)>> {
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
    pub fn load(ebpf: &mut Ebpf, only: Option<Vec<String>>, placement: Placement) -> Result<Self> {
        for (name, _, _) in PROGRAMS {
            program(ebpf, name)?
                .load()
                .with_context(|| format!("loading tcx program {name}"))?;
        }
        Ok(Self {
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
    pub fn refresh(&mut self, ebpf: &mut Ebpf) -> Result<Vec<Change>> {
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
            changes.push(Change::Removed(iface.name, Removal::Vanished));
        }
        self.failures.retain(|(i, _)| alive.contains(i));
        for (ifindex, name) in wanted {
            let known = self.interfaces.get(&ifindex).map(|i| &i.chain);
            let chain = [tc_dir::INGRESS, tc_dir::EGRESS].map(|dir| {
                // A failed query keeps what we knew.
                foreign_programs(&name, dir)
                    .or_else(|| known.map(|k| k[dir as usize].clone()))
                    .unwrap_or_default()
            });
            let reason =
                tc_placement::reason(self.placement, &chain, self.qdiscs.get(&ifindex).copied());
            match (self.interfaces.get_mut(&ifindex), reason) {
                (Some(iface), Some(reason)) => {
                    for dir in [tc_dir::INGRESS, tc_dir::EGRESS] {
                        let now = &chain[dir as usize];
                        if *now != iface.chain[dir as usize] {
                            // Another datapath came or went: the operator wants to know.
                            changes.push(Change::Programs(
                                name.clone(),
                                dir_name(dir),
                                program_list(now),
                            ));
                        }
                    }
                    iface.chain = chain;
                    iface.reason = reason;
                }
                (Some(_), None) => {
                    self.detach(ebpf, ifindex);
                    changes.push(Change::Removed(name, Removal::NotNeeded));
                }
                (None, Some(reason)) => match attach_all(ebpf, &name) {
                    Ok(links) => {
                        self.failures.retain(|(i, _)| *i != ifindex);
                        changes.push(Change::Added(name.clone(), reason.clone()));
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
                            changes.push(Change::Failed(name, why));
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
    pub fn report(&self, changes: &[Change]) -> Vec<AttachStatus> {
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
        let scope = match self.placement {
            Placement::WhereNeeded => "foreign tc programs or clsact/ingress qdisc",
            Placement::Everywhere => "full path: every interface",
        };
        let mut out = vec![AttachStatus {
            point: "tcx".into(),
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
            .filter_map(|c| match c {
                Change::Failed(n, why) => Some((n, why)),
                _ => None,
            })
            .collect();
        if let Some((_, why)) = failed.first() {
            let names: Vec<&str> = failed.iter().take(NAMED).map(|(n, _)| n.as_str()).collect();
            out.push(AttachStatus {
                point: "tcx".into(),
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
            point: "tcx".into(),
            ok: !matches!(c, Change::Failed(..)),
            // Under the point "tcx": "tcx observers added on …" reads "tcx: observers added on …".
            detail: c.to_string().trim_start_matches("tcx ").to_owned(),
            detail_only: true,
        }));
        out
    }
}

/// The programs of one of `ifname`'s tcx chains that are not ours (`None`: the query failed).
fn foreign_programs(ifname: &str, dir: u8) -> Option<Vec<ForeignProgram>> {
    let (_, progs) = SchedClassifier::query_tcx(ifname, attach_type(dir)).ok()?;
    Some(
        progs
            .iter()
            .filter_map(|p| {
                let name = p.name_as_str().unwrap_or("").to_owned();
                (!name.starts_with("fwm_tc_")).then(|| ForeignProgram { id: p.id(), name })
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

fn attach_all(ebpf: &mut Ebpf, ifname: &str) -> Result<Vec<(usize, SchedClassifierLinkId)>> {
    let mut links = Vec::new();
    for (i, (name, dir, slot)) in PROGRAMS.into_iter().enumerate() {
        let order = if slot == tc_slot::FIRST {
            LinkOrder::first()
        } else {
            LinkOrder::last()
        };
        let prog = program(ebpf, name)?;
        match prog.attach_with_options(ifname, attach_type(dir), TcAttachOptions::TcxOrder(order)) {
            Ok(link) => links.push((i, link)),
            Err(err) => {
                // Leave nothing half-attached on this interface.
                detach_links(ebpf, links);
                return Err(err).with_context(|| format!("tcx {name} on {ifname}"));
            }
        }
    }
    Ok(links)
}
