//! `fwmark-trace inventory [--json] [--netns NAME|PATH | --all-netns] [--check]`: the inventory
//! printed; with `--check`, conflicts between owners are what the exit status reports (1).
use anyhow::Result;

use super::Outcome;
use crate::{
    inventory::{render, Inventory, Namespaces, Sources},
    output::Format,
    registry::{self, Registry},
};

/// What to inventory and how to answer.
#[derive(Clone, Debug)]
pub(crate) struct InventoryConfig {
    pub(crate) format: Format,
    pub(crate) which: Namespaces,
    /// Conflicts make the exit status 1 (for a platform team's CI).
    pub(crate) check: bool,
    pub(crate) registry: registry::RegistrySources,
}

pub(crate) fn run(cfg: &InventoryConfig) -> Result<Outcome> {
    crate::privileges::check("fwmark-trace inventory", (&cfg.which).into())?;
    let reg = Registry::load(&cfg.registry)?;
    let inv = Inventory::read(&reg, &cfg.which, Sources::default())?;
    let conflicts = inv.conflicts();
    match cfg.format {
        Format::Json => print!("{}", render::json(&inv, &conflicts)),
        Format::Human => crate::commands::print_text(&render::human(&inv, &conflicts))?,
    }
    Ok(if cfg.check && !conflicts.is_empty() {
        Outcome::Found
    } else {
        Outcome::Clean
    })
}
