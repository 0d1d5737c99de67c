//! Attribution: whose bits a transition changed, what they mean, and whether someone clobbered
//! someone else's. `model` holds the results (a leaf: the event carries one), `rules` finds
//! them from the registry, `attributor` applies the rules to each event, once per distinct
//! transition, and counts them for the summary.
mod attributor;
pub(crate) mod model;
mod rules;

pub(crate) use attributor::{Attributor, NamespaceInventory};
pub(crate) use model::{
    Attribution, FieldRef, FieldValue, Finding, OwnerChange, Totals, Warning, WarningKind,
};
pub(crate) use rules::{attribute, Transition};
