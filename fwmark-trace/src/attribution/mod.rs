//! Attribution: whose bits a transition changed, what they mean, and whether someone clobbered
//! someone else's. The results are data the event carries (`event::attribution`); `rules` finds
//! them from the registry, `attributor` applies the rules to each event, once per distinct
//! transition, and counts them for the summary.
mod attributor;
mod rules;

pub(crate) use crate::event::attribution::{
    Attribution, FieldRef, FieldValue, Finding, OwnerChange, Totals, Warning, WarningKind,
};
pub(crate) use attributor::{Attributor, NamespaceInventory};
pub(crate) use rules::{attribute, Transition};
