//! "Ready": every observer attached, signal handlers in place, the consumer about to run. Said
//! for machines in two ways: a `ready` record in the JSON output naming what this run attached,
//! by kernel id (a supervisor, or a test, can then check that exactly these are gone once the
//! daemon has exited), and `READY=1` on systemd's `$NOTIFY_SOCKET` (a `Type=notify` unit;
//! also how `why`, which has no event stream, tells that it watches).
use std::{net::SocketAddr, os::unix::net::UnixDatagram};

use serde::Serialize;

use crate::{
    clock::Timestamp,
    kernel::{
        features::{NfBackend, TcBackend},
        observers::Observers,
        tcx::OwnFilter,
    },
    netstack::TcDir,
};

/// The `ready` record (`kind: "ready"`), written once, after the plan, and flushed at once.
#[derive(Serialize)]
pub(crate) struct ReadyRecord {
    pub(crate) time: Timestamp,
    pub(crate) kind: &'static str,
    pub(crate) pid: u32,
    /// The traced network namespace (inode number).
    pub(crate) netns: u32,
    /// Every program this run loaded, by kernel id.
    pub(crate) programs: Vec<u32>,
    /// Every link holding one of them, by kernel id (tracepoints, netfilter, fentry, tcx).
    pub(crate) links: Vec<u32>,
    /// Classic tc filters (clsact back-end): not links, so named by place.
    pub(crate) tc_filters: Vec<FilterRecord>,
    pub(crate) backends: Backends,
    /// The `--metrics` endpoint's address (with port 0, the port the kernel chose).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) metrics: Option<SocketAddr>,
}

/// A classic tc filter this run put in a clsact qdisc, as `tc filter show` names it.
#[derive(Serialize)]
pub(crate) struct FilterRecord {
    pub(crate) ifindex: u32,
    pub(crate) ifname: String,
    pub(crate) direction: TcDir,
    pub(crate) priority: u16,
    /// As `tc filter show` prints it: this daemon's `FilterOwner`.
    pub(crate) handle: String,
    pub(crate) program: &'static str,
}

impl From<OwnFilter> for FilterRecord {
    fn from(f: OwnFilter) -> Self {
        Self {
            ifindex: f.ifindex,
            ifname: f.ifname,
            direction: f.dir,
            priority: f.priority,
            handle: format!("{:#x}", f.handle),
            program: f.program,
        }
    }
}

/// The back-end each layer uses: netfilter `links`, `fentry` or `none`; tc `tcx`, `clsact` or
/// `none`.
#[derive(Serialize)]
pub(crate) struct Backends {
    pub(crate) netfilter: &'static str,
    pub(crate) tc: &'static str,
}

impl ReadyRecord {
    pub(crate) fn new(obs: &Observers, netns: u32, metrics: Option<SocketAddr>) -> Self {
        let (programs, links) = obs.attached_ids();
        Self {
            time: Timestamp::now(),
            kind: "ready",
            pid: std::process::id(),
            netns,
            programs,
            links,
            tc_filters: obs
                .own_filters()
                .into_iter()
                .map(FilterRecord::from)
                .collect(),
            backends: Backends {
                netfilter: match obs.nf_backend() {
                    Some(NfBackend::Fentry) => "fentry",
                    Some(_) => "links",
                    None => "none",
                },
                tc: match obs.tc_backend() {
                    Some(TcBackend::Clsact) => "clsact",
                    Some(_) => "tcx",
                    None => "none",
                },
            },
            metrics,
        }
    }
}

/// `READY=1` to the datagram socket at `$NOTIFY_SOCKET` (sd_notify(3)), when there is one. A
/// path only: an abstract socket name would be looked up in the traced namespace.
pub(crate) fn notify_systemd() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let msg = format!("READY=1\nSTATUS=tracing\nMAINPID={}\n", std::process::id());
    let sent = UnixDatagram::unbound().and_then(|s| s.send_to(msg.as_bytes(), &path));
    if let Err(err) = sent {
        log::warn!(
            "telling $NOTIFY_SOCKET ({}) we are ready: {err}",
            path.display()
        );
    }
}
