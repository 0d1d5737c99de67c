//! `fwmark-trace inventory [--json] [--netns NAME|PATH | --all-netns] [--check]`: exit 0, or
//! with `--check` 1 when owners conflict (for a platform team's CI) and 2 on errors.
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use super::{render, Inventory, Namespaces, Sources};
use crate::registry::{Registry, RegistryArgs};

#[derive(Args, Clone, Debug, Default)]
pub struct InventoryArgs {
    /// One JSON document (entries, by_bit, conflicts, notes) instead of readable text.
    #[arg(long)]
    pub json: bool,
    /// Look inside this network namespace (a name under /run/netns, or a path).
    #[arg(long, value_name = "NAME|PATH", conflicts_with = "all_netns")]
    pub netns: Option<String>,
    /// Every network namespace: /run/netns names and those processes hold.
    #[arg(long)]
    pub all_netns: bool,
    /// Exit 1 when owners conflict, 0 when none do, 2 on an error.
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

fn inventory(args: &InventoryArgs) -> Result<ExitCode> {
    crate::trace::require_root("fwmark-trace inventory")?;
    let reg = Registry::load(&args.registry)?;
    let which = match (&args.netns, args.all_netns) {
        (Some(ns), _) => Namespaces::One(ns.clone()),
        (None, true) => Namespaces::All,
        (None, false) => Namespaces::Current,
    };
    let inv = Inventory::read(&reg, &which, Sources::default())?;
    let conflicts = inv.conflicts();
    if args.json {
        print!("{}", render::json(&inv, &conflicts));
    } else {
        print!("{}", render::human(&inv, &conflicts));
    }
    Ok(if args.check && !conflicts.is_empty() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

pub fn run(args: &InventoryArgs) -> Result<ExitCode> {
    match inventory(args) {
        Err(e) if args.check => {
            eprintln!("fwmark-trace: error: {e:#}");
            Ok(ExitCode::from(2))
        }
        other => other,
    }
}
