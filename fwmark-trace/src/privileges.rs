//! Least privilege: the capabilities each command needs, checked against the process's
//! effective set before anything is attached. A missing required one is one error naming it
//! (exit 2); a missing optional one is one warning saying what is lost, and the run goes on.
//! Root holds them all; a dedicated user gets them from systemd (`AmbientCapabilities=`) or
//! `setpriv` (README, "Privileges").
use std::sync::Once;

use anyhow::{bail, Context, Result};

/// The capabilities the commands use (numbers from linux/capability.h).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Capability {
    DacOverride,
    DacReadSearch,
    NetAdmin,
    SysPtrace,
    SysAdmin,
    Syslog,
    Perfmon,
    Bpf,
}

impl Capability {
    fn number(self) -> u32 {
        match self {
            Capability::DacOverride => 1,
            Capability::DacReadSearch => 2,
            Capability::NetAdmin => 12,
            Capability::SysPtrace => 19,
            Capability::SysAdmin => 21,
            Capability::Syslog => 34,
            Capability::Perfmon => 38,
            Capability::Bpf => 39,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Capability::DacOverride => "CAP_DAC_OVERRIDE",
            Capability::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Capability::NetAdmin => "CAP_NET_ADMIN",
            Capability::SysPtrace => "CAP_SYS_PTRACE",
            Capability::SysAdmin => "CAP_SYS_ADMIN",
            Capability::Syslog => "CAP_SYSLOG",
            Capability::Perfmon => "CAP_PERFMON",
            Capability::Bpf => "CAP_BPF",
        }
    }
}

/// A capability set, as the kernel's 64-bit mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CapSet(u64);

impl CapSet {
    /// This process's effective set.
    pub(crate) fn effective() -> Result<CapSet> {
        let status =
            std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        CapSet::from_status(&status).context("no CapEff in /proc/self/status")
    }

    /// The `CapEff:` line of a /proc/PID/status text (hex).
    fn from_status(status: &str) -> Option<CapSet> {
        let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
        u64::from_str_radix(hex.trim(), 16).ok().map(CapSet)
    }

    pub(crate) fn has(self, cap: Capability) -> bool {
        self.0 & (1 << cap.number()) != 0
    }
}

/// Which network namespaces a command works in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WhichNetns {
    /// Its own.
    Own,
    /// One it enters (`--netns`: setns).
    Other,
    /// Every one, those only other processes hold too (`inventory --all-netns`).
    Every,
}

/// The commands that touch the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Command {
    /// `trace` and `why`.
    Trace(WhichNetns),
    Inventory(WhichNetns),
    /// `demo`, `bench`, `soak`: they build namespaces of their own.
    Lab,
}

impl From<&crate::inventory::Namespaces> for Command {
    fn from(which: &crate::inventory::Namespaces) -> Command {
        use crate::inventory::Namespaces;
        Command::Inventory(match which {
            Namespaces::Current => WhichNetns::Own,
            Namespaces::One(_) => WhichNetns::Other,
            Namespaces::All => WhichNetns::Every,
        })
    }
}

/// What a command uses capabilities for: all of `caps` together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Need {
    caps: &'static [Capability],
    required: bool,
    /// Required: what it is for. Optional: what is lost without it.
    why: &'static str,
}

impl Need {
    /// The names of those of its capabilities `caps` lacks ("" when none).
    fn missing(&self, caps: CapSet) -> String {
        let names: Vec<&str> = self
            .caps
            .iter()
            .filter(|c| !caps.has(**c))
            .map(|c| c.name())
            .collect();
        names.join(" and ")
    }
}

const fn required(caps: &'static [Capability], why: &'static str) -> Need {
    Need {
        caps,
        required: true,
        why,
    }
}

const fn optional(caps: &'static [Capability], why: &'static str) -> Need {
    Need {
        caps,
        required: false,
        why,
    }
}

const LOAD: Need = required(&[Capability::Bpf], "to load its eBPF programs");
const TRACEPOINTS: Need = required(
    &[Capability::Perfmon],
    "to attach them to tracepoints and kernel functions",
);
const HOOKS: Need = required(
    &[Capability::NetAdmin],
    "to attach them to tc and netfilter hooks",
);
const ENTER: Need = required(
    &[Capability::SysAdmin],
    "to enter another network namespace",
);
const RUN_NETNS: Need = required(
    &[Capability::DacOverride],
    "to name its namespaces in /run/netns",
);
const RULES: Need = required(
    &[Capability::NetAdmin],
    "to read nftables rules, xfrm state and socket marks",
);
const OTHER_PROGRAMS: Need = optional(
    &[Capability::SysAdmin],
    "other BPF programs and links cannot be listed: their mark writes are not in the inventory",
);
const HIDDEN: Need = optional(
    &[Capability::Syslog],
    "other BPF programs' instructions are hidden by kernel.kptr_restrict (or perf_event_paranoid): their mark writes are not in the inventory",
);
// Listing another user's /proc/PID/fd is a permission check, reading its links a ptrace one.
const SOCKET_OWNERS: Need = optional(
    &[Capability::SysPtrace, Capability::DacReadSearch],
    "the processes of other users holding marked sockets are not named",
);
const PROCESS_NAMESPACES: Need = optional(
    &[Capability::SysPtrace],
    "namespaces only other users' processes hold are left out",
);

/// What `command` uses; `syslog_shows`: whether CAP_SYSLOG shows other programs' instructions
/// on this node, hidden without it (`instructions_hidden`).
fn needs(command: Command, syslog_shows: bool) -> Vec<Need> {
    let mut needs = match command {
        Command::Trace(_) => vec![LOAD, TRACEPOINTS, HOOKS],
        Command::Inventory(_) => vec![RULES],
        Command::Lab => vec![LOAD, TRACEPOINTS, HOOKS, ENTER, RUN_NETNS],
    };
    match command {
        Command::Trace(WhichNetns::Other) | Command::Inventory(WhichNetns::Other) => {
            needs.push(ENTER)
        }
        Command::Inventory(WhichNetns::Every) => needs.extend([ENTER, PROCESS_NAMESPACES]),
        Command::Trace(_) | Command::Inventory(_) => needs.push(OTHER_PROGRAMS),
        Command::Lab => {}
    }
    needs.push(SOCKET_OWNERS);
    if syslog_shows {
        needs.push(HIDDEN);
    }
    needs
}

/// Whether the kernel hides other programs' translated instructions from a process (its
/// `kallsyms_show_value`): open to all only with kernel.kptr_restrict 0 and
/// kernel.perf_event_paranoid at most 1; with kptr_restrict 1 (or paranoid above 1) only to
/// CAP_SYSLOG; with 2 to nobody.
fn instructions_hidden(kptr_restrict: i32, perf_event_paranoid: i32, syslog: bool) -> bool {
    match kptr_restrict {
        0 if perf_event_paranoid <= 1 => false,
        0 | 1 => !syslog,
        _ => true,
    }
}

fn sysctl(name: &str) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/sys/kernel/{name}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Checks the effective capabilities for `command` (`what` names it in the error): an error
/// naming every missing required one; a warning per missing optional one, once a process.
pub(crate) fn check(what: &str, command: Command) -> Result<()> {
    let caps = CapSet::effective()?;
    let kptr = sysctl("kptr_restrict").unwrap_or(0);
    let paranoid = sysctl("perf_event_paranoid").unwrap_or(2);
    let hidden = |syslog| instructions_hidden(kptr, paranoid, syslog);
    let needs = needs(command, hidden(false) && !hidden(true));
    let missing: Vec<(String, &Need)> = needs
        .iter()
        .map(|n| (n.missing(caps), n))
        .filter(|(names, _)| !names.is_empty())
        .collect();
    let fatal: Vec<String> = missing
        .iter()
        .filter(|(_, n)| n.required)
        .map(|(names, n)| format!("{names} ({})", n.why))
        .collect();
    if !fatal.is_empty() {
        bail!(
            "{what} needs {}: run it as root or grant them (README, \"Privileges\")",
            fatal.join(", ")
        );
    }
    static WARNED: Once = Once::new();
    WARNED.call_once(|| {
        for (names, n) in missing {
            log::warn!("without {names} {}", n.why);
        }
        if hidden(true) {
            log::warn!("kernel.kptr_restrict={kptr} hides other BPF programs' instructions: their mark writes are not in the inventory");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tfwmark-trace\nCapInh:\t0000000000000000\nCapPrm:\t000000c000001000\nCapEff:\t000000c000001000\nCapBnd:\t000001ffffffffff\n";

    #[test]
    fn the_effective_set_is_read_from_status() {
        let caps = CapSet::from_status(STATUS).unwrap();
        for cap in [Capability::Bpf, Capability::Perfmon, Capability::NetAdmin] {
            assert!(caps.has(cap), "{}", cap.name());
        }
        for cap in [
            Capability::SysAdmin,
            Capability::Syslog,
            Capability::SysPtrace,
        ] {
            assert!(!caps.has(cap), "{}", cap.name());
        }
        let root = CapSet::from_status("CapEff:\t000001ffffffffff\n").unwrap();
        assert!(root.has(Capability::Bpf) && root.has(Capability::DacOverride));
        assert_eq!(CapSet::from_status("CapPrm:\t0\n"), None);
        assert_eq!(CapSet::from_status("CapEff:\tzz\n"), None);
    }

    #[test]
    fn this_process_has_a_set() {
        CapSet::effective().unwrap();
    }

    #[test]
    fn entering_a_namespace_makes_sys_admin_required() {
        let sys_admin = |c| {
            needs(c, false)
                .into_iter()
                .find(|n| n.caps == [Capability::SysAdmin])
                .map(|n| n.required)
        };
        assert_eq!(sys_admin(Command::Trace(WhichNetns::Own)), Some(false));
        assert_eq!(sys_admin(Command::Trace(WhichNetns::Other)), Some(true));
        assert_eq!(sys_admin(Command::Inventory(WhichNetns::Every)), Some(true));
        assert_eq!(sys_admin(Command::Lab), Some(true));
    }

    #[test]
    fn tracing_requires_bpf_perfmon_and_net_admin_only() {
        let req: Vec<Capability> = needs(Command::Trace(WhichNetns::Own), true)
            .into_iter()
            .filter(|n| n.required)
            .flat_map(|n| n.caps.iter().copied())
            .collect();
        assert_eq!(
            req,
            [Capability::Bpf, Capability::Perfmon, Capability::NetAdmin]
        );
    }

    #[test]
    fn a_need_names_only_what_is_missing() {
        let ptrace = CapSet(1 << Capability::SysPtrace.number());
        assert_eq!(SOCKET_OWNERS.missing(ptrace), "CAP_DAC_READ_SEARCH");
        assert_eq!(
            SOCKET_OWNERS.missing(CapSet(0)),
            "CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH"
        );
        assert_eq!(SOCKET_OWNERS.missing(CapSet(u64::MAX)), "");
    }

    #[test]
    fn syslog_matters_only_where_the_kernel_hides_instructions() {
        assert!(!instructions_hidden(0, 1, false));
        assert!(instructions_hidden(0, 2, false));
        assert!(!instructions_hidden(0, 2, true));
        assert!(instructions_hidden(1, 0, false));
        assert!(!instructions_hidden(1, 0, true));
        assert!(instructions_hidden(2, 0, true));
        let syslog = |hidden| {
            needs(Command::Trace(WhichNetns::Own), hidden)
                .iter()
                .any(|n| n.caps == [Capability::Syslog])
        };
        assert!(syslog(true) && !syslog(false));
    }
}
