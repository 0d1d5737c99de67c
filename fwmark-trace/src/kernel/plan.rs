//! The netfilter observer plan: at which priorities of which hooks the link observers sit
//! (one program per priority slot). Besides the first and last priority of a hook, an observer
//! just after each distinct chain priority pins a mark change to the band holding one chain
//! priority (e.g. "output ipv4, -150..0: inet fw/mangle_out"); by default only where a chain
//! can write a mark.
use fwmark_trace_common::NF_SLOTS;
use serde::{Deserialize, Serialize};

use super::netfilter::{NfSite, PRIO_FIRST, PRIO_LAST};
use crate::{
    netstack::{Family, NfHook},
    nodestate::nft::{Chain, ChainOrigin},
};

/// Where netfilter observers go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum PlanMode {
    /// Only where a mark can change: on the hooks with chains that write one, the hook's
    /// first priority and just after each writing chain (and after conntrack where a rule
    /// writes the ct mark after it). A change made elsewhere is seen by the next observer.
    #[default]
    Writers,
    /// First and last of every hook and after every chain: every point of a packet's path
    /// (full path, followed flows, `why`).
    Full,
}

/// Which priority each netfilter slot program is linked at, per family and hook.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct NfPlan {
    pub(crate) mode: PlanMode,
    sites: Vec<NfSite>,
    /// Chain priorities that did not get an observer of their own (more than the slots allow).
    pub(crate) merged: usize,
}

/// Whether `c` bounds a band in `mode` on its hook, among `chains` of that hook and family.
fn bounds_band(mode: PlanMode, c: &Chain, hook_chains: &[&Chain]) -> bool {
    match mode {
        PlanMode::Full => true,
        // Conntrack attaches the ct mark: an observer after it separates the ct mark a
        // connection starts with from one a rule sets, and starts the writers' first band.
        PlanMode::Writers if c.origin == ChainOrigin::Kernel => hook_chains
            .iter()
            .any(|w| w.writes.any() && w.priority > c.priority),
        PlanMode::Writers => c.writes.any(),
    }
}

/// Whether the hook's first priority needs an observer: in `Writers` mode only when a writer
/// sits before every other boundary (else the boundary starts the first writer's band).
fn needs_first(mode: PlanMode, hook_chains: &[&Chain]) -> bool {
    let kernel = hook_chains
        .iter()
        .filter(|c| c.origin == ChainOrigin::Kernel && bounds_band(mode, c, hook_chains))
        .map(|c| c.priority)
        .min();
    mode == PlanMode::Full
        || hook_chains
            .iter()
            .any(|c| c.writes.any() && kernel.is_none_or(|k| c.priority < k))
}

impl NfPlan {
    /// No link observers (the netfilter observers are fentry/fexit ones, or there are none).
    pub(crate) fn none(mode: PlanMode) -> Self {
        Self {
            mode,
            sites: Vec::new(),
            merged: 0,
        }
    }

    pub(crate) fn new(chains: &[Chain], mode: PlanMode) -> Self {
        let mut sites = Vec::new();
        let mut merged = 0;
        for family in [Family::Ipv4, Family::Ipv6] {
            for hook in NfHook::ALL {
                let here: Vec<&Chain> = chains
                    .iter()
                    .filter(|c| c.hook == hook && c.covers(family))
                    .collect();
                if mode == PlanMode::Writers && !here.iter().any(|c| c.writes.any()) {
                    // Nothing on this hook writes a mark: no observer.
                    continue;
                }
                let mut prios: Vec<i32> = here
                    .iter()
                    .filter(|c| bounds_band(mode, c, &here))
                    .map(|c| c.priority.saturating_add(1))
                    .filter(|p| *p > PRIO_FIRST && *p < PRIO_LAST)
                    .collect();
                prios.sort_unstable();
                prios.dedup();
                let interior = NF_SLOTS - 2;
                merged += prios.len().saturating_sub(interior);
                // Keep the band boundaries spread over the hook when they do not all fit.
                let picked: Vec<i32> = if prios.len() <= interior {
                    prios
                } else {
                    (0..interior)
                        .map(|i| prios[i * prios.len() / interior])
                        .collect()
                };
                let mut site = |slot: usize, priority| {
                    sites.push(NfSite {
                        family,
                        hook,
                        slot: slot as u8,
                        priority,
                    })
                };
                if needs_first(mode, &here) {
                    site(0, PRIO_FIRST);
                }
                if mode == PlanMode::Full {
                    site(1, PRIO_LAST);
                }
                for (i, p) in picked.into_iter().enumerate() {
                    site(i + 2, p);
                }
            }
        }
        Self {
            mode,
            sites,
            merged,
        }
    }

    /// Observers a changed ruleset needs that this plan lacks (a hook that now has a writer,
    /// new chain priorities), each on a free slot of its hook; priorities beyond the slots stay
    /// merged. Observers no longer needed stay (they cost an unchanged-mark probe).
    pub(crate) fn additions(&self, chains: &[Chain]) -> Vec<NfSite> {
        let wanted = NfPlan::new(chains, self.mode);
        let mut out: Vec<NfSite> = Vec::new();
        for w in wanted.sites.iter() {
            let same_hook = |s: &&NfSite| s.family == w.family && s.hook == w.hook;
            if w.slot < 2 {
                // First and last keep their slots.
                if !self
                    .sites
                    .iter()
                    .filter(same_hook)
                    .any(|s| s.slot == w.slot)
                {
                    out.push(*w);
                }
                continue;
            }
            // A linked site may sit a little off its wanted priority (EBUSY retries).
            let present = self
                .sites
                .iter()
                .filter(same_hook)
                .any(|s| s.priority.abs_diff(w.priority) < 16);
            if present {
                continue;
            }
            let used = self
                .sites
                .iter()
                .chain(out.iter())
                .filter(same_hook)
                .map(|s| s.slot)
                .filter(|s| *s >= 2)
                .max()
                .unwrap_or(1);
            if (used as usize) + 1 < NF_SLOTS {
                out.push(NfSite {
                    slot: used + 1,
                    ..*w
                });
            }
        }
        out
    }

    pub(crate) fn add(&mut self, site: NfSite) {
        self.sites.push(site);
    }

    /// Records the priority a site was actually linked at (see `NfPrograms::link`).
    pub(crate) fn set_priority(&mut self, site: NfSite, priority: i32) {
        if let Some(s) = self.sites.iter_mut().find(|s| **s == site) {
            s.priority = priority;
        }
    }

    pub(crate) fn sites(&self) -> &[NfSite] {
        &self.sites
    }

    pub(crate) fn priority(&self, family: Family, hook: NfHook, slot: u8) -> Option<i32> {
        self.sites
            .iter()
            .find(|s| s.family == family && s.hook == hook && s.slot == slot)
            .map(|s| s.priority)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        fixtures::{NFT_RULESET, NFT_SAMPLE},
        netstack::NftFamily,
        nodestate::nft::{items, kernel_users, parse_chains, Writes},
    };

    const V4: Family = Family::Ipv4;
    const V6: Family = Family::Ipv6;
    const OUT: NfHook = NfHook::Output;

    fn sample() -> Vec<Chain> {
        parse_chains(&items(NFT_SAMPLE.as_bytes()).unwrap())
    }

    fn chain(
        family: NftFamily,
        table: &str,
        name: &str,
        hook: NfHook,
        priority: i32,
        writes: Writes,
    ) -> Chain {
        Chain {
            writes,
            ..crate::fixtures::chain(family, table, name, hook, priority)
        }
    }

    #[test]
    fn plan_places_an_observer_after_each_chain_priority() {
        let chains = sample();
        let plan = NfPlan::new(&chains, PlanMode::Full);
        // IPv4 output: first, last, after -150, after 0.
        assert_eq!(plan.priority(V4, OUT, 0), Some(PRIO_FIRST));
        assert_eq!(plan.priority(V4, OUT, 1), Some(PRIO_LAST));
        assert_eq!(plan.priority(V4, OUT, 2), Some(-149));
        assert_eq!(plan.priority(V4, OUT, 3), Some(1));
        // IPv6 output only has the inet chain.
        assert_eq!(plan.priority(V6, OUT, 2), Some(-149));
        assert_eq!(plan.priority(V6, OUT, 3), None);
        // 2 families × 5 hooks × (first, last) + 3 band observers.
        assert_eq!(plan.sites().len(), 23);
        assert_eq!(plan.merged, 0);
    }

    /// The default plan: observers only on hooks whose chains write, after each writer (and
    /// after conntrack where a ct-mark writer follows it); none where nothing writes.
    #[test]
    fn writers_plan_observes_only_where_marks_change() {
        let mut chains = parse_chains(&items(NFT_RULESET.as_bytes()).unwrap());
        chains.push(chain(
            NftFamily::Inet,
            "f",
            "filter_out",
            OUT,
            0,
            Writes::default(),
        ));
        chains.extend(kernel_users());
        let plan = NfPlan::new(&chains, PlanMode::Writers);
        let at = |family, hook| -> Vec<i32> {
            let mut p: Vec<i32> = plan
                .sites()
                .iter()
                .filter(|s| s.family == family && s.hook == hook)
                .map(|s| s.priority)
                .collect();
            p.sort();
            p
        };
        // ip mangle/OUTPUT reaches writers: conntrack bounds their first band (nothing before
        // it writes, so the hook's first priority needs no observer); the filter chain at 0
        // writes nothing and gets no observer of its own.
        assert_eq!(at(V4, OUT), vec![-199, -149]);
        assert!(at(V6, OUT).is_empty(), "the writer is ip, not ip6");
        assert!(at(V4, NfHook::Prerouting).is_empty() && at(V4, NfHook::Postrouting).is_empty());
        // Full mode keeps every boundary.
        let full = NfPlan::new(&chains, PlanMode::Full);
        // 20 first/last; bands: IPv4 output -199, -149, 1; IPv6 output -199, 1; prerouting -199 ×2.
        assert_eq!(full.sites().len(), 20 + 3 + 2 + 2);
        // A writer appearing on another hook is an addition with its first observer.
        let mut more = chains.clone();
        more.push(chain(
            NftFamily::Ip,
            "x",
            "post",
            NfHook::Postrouting,
            100,
            Writes {
                packet: true,
                conntrack: false,
            },
        ));
        let adds = plan.additions(&more);
        assert_eq!(
            adds.iter()
                .map(|s| (s.hook, s.slot, s.priority))
                .collect::<Vec<_>>(),
            vec![
                (NfHook::Postrouting, 0, PRIO_FIRST),
                (NfHook::Postrouting, 2, 101)
            ],
            "postrouting has no conntrack boundary: its first priority starts the band"
        );
    }

    #[test]
    fn additions_take_free_slots_for_new_priorities() {
        let chains = sample();
        let plan = NfPlan::new(&chains[..1], PlanMode::Full);
        let adds = plan.additions(&chains);
        // The ip filter_out chain at 0 is new for IPv4 output only.
        assert_eq!(
            adds,
            vec![NfSite {
                family: V4,
                hook: OUT,
                slot: 3,
                priority: 1
            }]
        );
        assert!(NfPlan::new(&chains, PlanMode::Full)
            .additions(&chains)
            .is_empty());
    }

    #[test]
    fn plan_merges_when_slots_run_out() {
        let chains: Vec<Chain> = (0..20)
            .map(|i| {
                let name = format!("c{i}");
                chain(
                    NftFamily::Ip,
                    "t",
                    &name,
                    NfHook::Prerouting,
                    i * 10,
                    Writes::default(),
                )
            })
            .collect();
        let plan = NfPlan::new(&chains, PlanMode::Full);
        assert_eq!(plan.merged, 20 - (NF_SLOTS - 2));
        let slots = plan
            .sites()
            .iter()
            .filter(|s| s.family == V4 && s.hook == NfHook::Prerouting)
            .count();
        assert_eq!(slots, NF_SLOTS);
    }
}
