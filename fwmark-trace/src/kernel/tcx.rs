//! tcx observers: first and last in the ingress and egress chains of every traced interface,
//! so a change between them is pinned to the programs in between (listed with the tcx prog
//! query). Interfaces are re-read periodically: new ones get observers, vanished ones lose them.
use std::collections::{BTreeMap, HashSet};

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

#[derive(Default)]
pub struct Interface {
    pub name: String,
    links: Vec<(usize, SchedClassifierLinkId)>,
    /// Foreign programs between our first and last observers, per direction.
    pub chain: [Vec<ForeignProgram>; 2],
}

/// Attached interfaces by ifindex.
#[derive(Default)]
pub struct TcObservers {
    pub interfaces: BTreeMap<u32, Interface>,
    /// `None`: every interface of the namespace; otherwise only these names.
    only: Option<Vec<String>>,
}

pub enum Change {
    Attached(String),
    Detached(String),
    Failed(String, String),
    /// The foreign programs between our observers changed: (interface, direction, programs).
    Programs(String, &'static str, String),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Attached(n) => write!(f, "tcx attached to new interface {n}"),
            Change::Detached(n) => write!(f, "interface {n} vanished"),
            Change::Failed(n, why) => write!(f, "tcx NOT attached to {n}: {why}"),
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
    pub fn load(ebpf: &mut Ebpf, only: Option<Vec<String>>) -> Result<Self> {
        for (name, _, _) in PROGRAMS {
            program(ebpf, name)?
                .load()
                .with_context(|| format!("loading tcx program {name}"))?;
        }
        Ok(Self {
            interfaces: BTreeMap::new(),
            only,
        })
    }

    /// Attaches to new interfaces and forgets vanished ones; returns what changed.
    pub fn refresh(&mut self, ebpf: &mut Ebpf) -> Result<Vec<Change>> {
        let present = list_interfaces()?;
        let wanted: Vec<(u32, String)> = present
            .into_iter()
            .filter(|(_, n)| self.only.as_ref().is_none_or(|o| o.contains(n)))
            .collect();
        let alive: HashSet<u32> = wanted.iter().map(|(i, _)| *i).collect();
        let mut changes = Vec::new();
        let gone: Vec<u32> = self
            .interfaces
            .keys()
            .filter(|i| !alive.contains(i))
            .copied()
            .collect();
        for ifindex in gone {
            let iface = self.interfaces.remove(&ifindex).unwrap_or_default();
            for (p, link) in iface.links {
                // The device took its links with it; detaching only releases our handle.
                let _ = program(ebpf, PROGRAMS[p].0).map(|prog| prog.detach(link));
            }
            changes.push(Change::Detached(iface.name));
        }
        for (ifindex, name) in wanted {
            let std::collections::btree_map::Entry::Vacant(slot) = self.interfaces.entry(ifindex)
            else {
                continue;
            };
            match attach_all(ebpf, &name) {
                Ok(links) => {
                    changes.push(Change::Attached(name.clone()));
                    slot.insert(Interface {
                        name,
                        links,
                        chain: Default::default(),
                    });
                }
                Err(err) => changes.push(Change::Failed(name, format!("{err:#}"))),
            }
        }
        for iface in self.interfaces.values_mut() {
            for dir in [tc_dir::INGRESS, tc_dir::EGRESS] {
                let Ok((_, progs)) = SchedClassifier::query_tcx(&iface.name, attach_type(dir))
                else {
                    continue;
                };
                let foreign: Vec<ForeignProgram> = progs
                    .iter()
                    .filter_map(|p| {
                        let name = p.name_as_str().unwrap_or("").to_owned();
                        (!name.starts_with("fwm_tc_")).then(|| ForeignProgram { id: p.id(), name })
                    })
                    .collect();
                if foreign != iface.chain[dir as usize] {
                    // Another datapath came or went: the operator wants to know.
                    let list: Vec<String> = foreign.iter().map(|p| p.to_string()).collect();
                    let list = if list.is_empty() {
                        "none now".into()
                    } else {
                        list.join(", ")
                    };
                    changes.push(Change::Programs(iface.name.clone(), dir_name(dir), list));
                    iface.chain[dir as usize] = foreign;
                }
            }
        }
        Ok(changes)
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
                for (p, link) in links {
                    let _ = program(ebpf, PROGRAMS[p].0).map(|prog| prog.detach(link));
                }
                return Err(err).with_context(|| format!("tcx {name} on {ifname}"));
            }
        }
    }
    Ok(links)
}
