//! What start-up did, typed: one `Status` per observer or group of observers, and what the
//! observers report when they change while running. `output::startup` words them.
use std::io;

use fwmark_trace_common::TracepointObserver;

use super::{
    features::{Choice, NfBackend, NoNetfilter, TcBackend},
    netfilter::NfSite,
    nf_chains::Evaluator,
    plan::PlanMode,
    tcx::TcStartup,
};
use crate::nodestate::nft;

/// One step of start-up and how it went.
pub(crate) enum Status {
    /// The netfilter back-end, and why; or why netfilter is not observed.
    NfBackend(Result<(NfBackend, Choice), NoNetfilter>),
    /// A chain evaluator this kernel cannot have observed (the fentry back-end).
    EvaluatorMissing(&'static Evaluator, anyhow::Error),
    /// A chain evaluator's entry and exit observers (the fentry back-end).
    Evaluator {
        evaluator: &'static Evaluator,
        built_in: bool,
        attached: anyhow::Result<()>,
    },
    Tracepoint(&'static TracepointObserver, anyhow::Result<()>),
    /// The nft base chains could not be read: no band observers.
    ChainsUnread(anyhow::Error),
    /// The netfilter programs could not be loaded.
    NfProgramsUnloaded(anyhow::Error),
    /// The netfilter link observers placed.
    NfLinks(NfLinked),
    /// A netfilter link observer the kernel refused.
    NfLinkFailed(NfSite, io::Error),
    /// The tc back-end, why, and whether its programs loaded.
    TcBackend {
        backend: TcBackend,
        choice: Choice,
        loaded: bool,
    },
    /// The tc programs could not be loaded.
    TcUnloaded(TcBackend, anyhow::Error),
    /// The tc observers after the first refresh.
    Tc(TcStartup),
}

/// The netfilter link observers at start-up.
pub(crate) struct NfLinked {
    pub(crate) mode: PlanMode,
    /// Sites planned, and linked.
    pub(crate) planned: usize,
    pub(crate) linked: usize,
    /// Chain priorities without an observer of their own.
    pub(crate) merged: usize,
    /// The chains that write a mark (what the observers in `Writers` mode are around).
    pub(crate) writers: Vec<nft::Chain>,
}

impl Status {
    /// Whether it went well (the report's `ok`).
    pub(crate) fn ok(&self) -> bool {
        match self {
            Status::NfBackend(r) => r.is_ok(),
            Status::Evaluator { attached, .. } => attached.is_ok(),
            Status::Tracepoint(_, attached) => attached.is_ok(),
            Status::NfLinks(l) => l.planned == 0 || l.linked > 0,
            Status::TcBackend { loaded, .. } => *loaded,
            Status::Tc(_) => true,
            Status::EvaluatorMissing(..)
            | Status::ChainsUnread(_)
            | Status::NfProgramsUnloaded(_)
            | Status::NfLinkFailed(..)
            | Status::TcUnloaded(..) => false,
        }
    }

    /// Whether it is about the tc observers themselves (rather than the tc back-end's choice).
    fn is_tc_observers(&self) -> bool {
        matches!(self, Status::Tc(_) | Status::TcUnloaded(..))
    }
}

/// Start-up attached nothing that observes: the steps, and how each went.
pub(crate) struct NothingAttached(pub(crate) Vec<Status>);

impl std::error::Error for NothingAttached {}

/// As an error is shown: its words (`output::startup`).
impl std::fmt::Debug for NothingAttached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Whether start-up observes anything: tc observers on an interface, or anything else that
/// went well.
pub(crate) fn attached_something(report: &[Status], tc_interfaces: usize) -> bool {
    tc_interfaces > 0 || report.iter().any(|s| s.ok() && !s.is_tc_observers())
}

/// A change of the netfilter observers while running, after the nft chains changed.
pub(crate) enum NfChange {
    /// The base chains changed (how many there are now).
    Chains(usize),
    BandAdded(NfSite),
    BandFailed(NfSite, io::Error),
    CtWatchNotUpdated(anyhow::Error),
}
