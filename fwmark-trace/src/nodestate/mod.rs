//! State of the node that decides what marks do: nftables chains (priority bands), `ip rule`s
//! and routes, xfrm policies, and the sysctls that make routing mark-aware.
pub(crate) mod links;
pub(crate) mod netlink;
pub(crate) mod nft;
pub(crate) mod pods;
pub(crate) mod programs;
pub(crate) mod sysctl;
pub(crate) mod watch;

use std::{fmt, sync::Arc};

use serde::Serialize;

use crate::{
    clock::Timestamp,
    mark::Mark,
    netstack::{serialize_as_display, Family},
};

/// Everything `why` reasons with, read in the traced namespace. The lists are shared: a
/// history of states holds each unchanged list once (see `History::observe`).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub(crate) struct NodeState {
    pub(crate) rules: Arc<Vec<netlink::IpRule>>,
    pub(crate) routes: Arc<Vec<netlink::Route>>,
    pub(crate) xfrm: Arc<Vec<netlink::XfrmPolicy>>,
    pub(crate) sysctls: Arc<sysctl::Sysctls>,
    /// nft rules that read or write the packet or conntrack mark.
    pub(crate) mark_rules: Arc<Vec<nft::MarkRule>>,
    /// nft base chains (hook, priority): they name the band a mark changed or a packet died in.
    #[serde(rename = "nft_chains", serialize_with = "chain_labels")]
    pub(crate) chains: Arc<Vec<nft::Chain>>,
    /// Non-fatal problems reading state (e.g. no xfrm support).
    pub(crate) errors: Vec<String>,
}

impl NodeState {
    /// Reads the calling thread's namespace. The ruleset is listed once: its base chains are
    /// read here, its mark rules by `mark_rules` (the inventory's reader) from the same items.
    pub(crate) fn read(
        mark_rules: impl FnOnce(&[serde_json::Value]) -> anyhow::Result<Vec<nft::MarkRule>>,
    ) -> Self {
        let mut s = NodeState::default();
        match netlink::rules() {
            Ok(r) => s.rules = Arc::new(r),
            Err(e) => s.errors.push(format!("ip rules: {e:#}")),
        }
        match netlink::routes() {
            Ok(r) => s.routes = Arc::new(r),
            Err(e) => s.errors.push(format!("routes: {e:#}")),
        }
        match netlink::xfrm_policies() {
            Ok(p) => s.xfrm = Arc::new(p),
            Err(e) => s.errors.push(format!("xfrm policies: {e:#}")),
        }
        s.sysctls = Arc::new(sysctl::Sysctls::read());
        match nft::read_items() {
            Ok(items) => {
                match mark_rules(&items) {
                    Ok(r) => s.mark_rules = Arc::new(r),
                    Err(e) => s.errors.push(format!("nft rules: {e:#}")),
                }
                s.chains = Arc::new(nft::parse_chains(&items));
            }
            Err(e) => {
                s.errors.push(format!("nft rules: {e:#}"));
                s.errors.push(format!("nft chains: {e:#}"));
            }
        }
        s
    }

    /// Takes `before`'s copy of every list equal to this one's (one copy in memory).
    fn share_unchanged(&mut self, before: &NodeState) {
        fn share<T: PartialEq>(now: &mut Arc<T>, before: &Arc<T>) {
            if now == before {
                *now = Arc::clone(before);
            }
        }
        share(&mut self.rules, &before.rules);
        share(&mut self.routes, &before.routes);
        share(&mut self.xfrm, &before.xfrm);
        share(&mut self.sysctls, &before.sysctls);
        share(&mut self.mark_rules, &before.mark_rules);
        share(&mut self.chains, &before.chains);
    }

    /// The parts that differ from `before` (read errors aside).
    /// Rules and routes per family: an IPv6 route appearing (say, once an address passed DAD)
    /// says nothing about an IPv4 flow.
    pub(crate) fn changed_since(&self, before: &NodeState) -> Vec<StateChange> {
        let rules_differ = |family: Family| {
            let of = |r: &&netlink::IpRule| r.family == family;
            !self
                .rules
                .iter()
                .filter(of)
                .eq(before.rules.iter().filter(of))
        };
        let routes_differ = |family: Family| {
            let of = |r: &&netlink::Route| Family::of(&r.destination.addr()) == family;
            !self
                .routes
                .iter()
                .filter(of)
                .eq(before.routes.iter().filter(of))
        };
        let mut out = Vec::new();
        for family in [Family::Ipv4, Family::Ipv6] {
            if rules_differ(family) {
                out.push(StateChange::Rules(family));
            }
        }
        for family in [Family::Ipv4, Family::Ipv6] {
            if routes_differ(family) {
                out.push(StateChange::Routes(family));
            }
        }
        for (what, changed) in [
            (StateChange::Xfrm, self.xfrm != before.xfrm),
            (StateChange::Sysctls, self.sysctls != before.sysctls),
            (StateChange::MarkRules, self.mark_rules != before.mark_rules),
            (StateChange::Chains, self.chains != before.chains),
        ] {
            if changed {
                out.push(what);
            }
        }
        out
    }

    /// The rules of `family` a packet with `mark` walks, in order (a simplified model of the
    /// kernel's rule walk: every rule whose fwmark test it passes). Each family has its own
    /// rule list: an IPv6 packet never sees an IPv4 rule.
    pub(crate) fn rules_for(&self, family: Family, mark: Mark) -> Vec<&netlink::IpRule> {
        self.rules
            .iter()
            .filter(|r| r.family == family && r.mark_matches(mark))
            .collect()
    }
}

/// A part of the node state that changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StateChange {
    Rules(Family),
    Routes(Family),
    Xfrm,
    Sysctls,
    MarkRules,
    Chains,
}

impl StateChange {
    /// Whether a flow of `family` can be concerned (the other family's rules and routes not).
    pub(crate) fn concerns(self, family: Family) -> bool {
        match self {
            StateChange::Rules(f) | StateChange::Routes(f) => f == family,
            _ => true,
        }
    }
}

impl fmt::Display for StateChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let family = |fam: &Family| match fam {
            Family::Ipv4 => "IPv4",
            Family::Ipv6 => "IPv6",
        };
        match self {
            StateChange::Rules(fam) => write!(f, "{} ip rules", family(fam)),
            StateChange::Routes(fam) => write!(f, "{} routes", family(fam)),
            StateChange::Xfrm => f.write_str("xfrm policies"),
            StateChange::Sysctls => f.write_str("sysctls"),
            StateChange::MarkRules => f.write_str("nft mark rules"),
            StateChange::Chains => f.write_str("nft chains"),
        }
    }
}

serialize_as_display!(StateChange);

/// Chains as `hook: family table/chain@priority`, how a person reads them.
fn chain_labels<S: serde::Serializer>(
    chains: &Arc<Vec<nft::Chain>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(chains.iter().map(|c| format!("{}: {c}", c.hook)))
}

/// The node's state as it changed during a run: a verdict must reason with the rules that were
/// in force when the packet died, not with whatever an operator changed since. Bounded: the
/// most recent `History::KEPT` states (interface churn changes it every second).
#[derive(Debug, Default)]
pub(crate) struct History {
    snapshots: Vec<Snapshot>,
    /// Older states dropped to stay within `KEPT`.
    pub(crate) forgotten: u64,
}

#[derive(Debug, Serialize)]
pub(crate) struct Snapshot {
    /// When this state was first read.
    pub(crate) time: Timestamp,
    /// Kernel monotonic time of that read (the clock events carry).
    #[serde(skip)]
    pub(crate) since_ns: u64,
    /// What differs from the previous snapshot.
    pub(crate) changed: Vec<StateChange>,
    #[serde(skip)]
    pub(crate) state: NodeState,
}

impl History {
    /// States kept: a few minutes of changes every second, each a full copy of the state.
    const KEPT: usize = 256;

    /// Records `state` read at `now_ns` if it differs from the last one; true when it did.
    /// Beyond `KEPT` the oldest goes (the next one becomes the first state known).
    pub(crate) fn observe(&mut self, now_ns: u64, time: Timestamp, mut state: NodeState) -> bool {
        let changed = match self.snapshots.last() {
            Some(last) if last.state == state => return false,
            Some(last) => state.changed_since(&last.state),
            None => Vec::new(),
        };
        if let Some(last) = self.snapshots.last() {
            state.share_unchanged(&last.state);
        }
        if self.snapshots.len() >= Self::KEPT {
            self.snapshots.remove(0);
            self.forgotten += 1;
        }
        self.snapshots.push(Snapshot {
            time,
            since_ns: now_ns,
            changed,
            state,
        });
        true
    }

    /// The state in effect at `ts_ns` (the first one read, for times before it).
    pub(crate) fn at(&self, ts_ns: u64) -> Option<&NodeState> {
        self.snapshots
            .iter()
            .rev()
            .find(|s| s.since_ns <= ts_ns)
            .or(self.snapshots.first())
            .map(|s| &s.state)
    }

    pub(crate) fn latest(&self) -> Option<&NodeState> {
        self.snapshots.last().map(|s| &s.state)
    }

    /// Every change after the first read.
    pub(crate) fn changes(&self) -> &[Snapshot] {
        self.snapshots.get(1..).unwrap_or_default()
    }

    /// Changes that happened between `from_ns` and `to_ns`.
    pub(crate) fn changes_between(
        &self,
        from_ns: u64,
        to_ns: u64,
    ) -> impl Iterator<Item = &Snapshot> {
        self.changes()
            .iter()
            .filter(move |s| (from_ns..=to_ns).contains(&s.since_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_rp_filter(v: u8) -> NodeState {
        let mut s = NodeState::default();
        Arc::make_mut(&mut s.sysctls)
            .rp_filter
            .insert("all".into(), v);
        s
    }

    #[test]
    fn history_keeps_changes_and_answers_by_time() {
        let mut h = History::default();
        let t = Timestamp::now();
        assert!(h.observe(100, t, with_rp_filter(1)));
        assert!(!h.observe(200, t, with_rp_filter(1)));
        assert!(h.observe(300, t, with_rp_filter(0)));
        assert_eq!(h.changes().len(), 1);
        assert_eq!(h.changes()[0].changed, [StateChange::Sysctls]);
        let rp = |ts| h.at(ts).unwrap().sysctls.rp_filter["all"];
        assert_eq!((rp(50), rp(250), rp(300), rp(900)), (1, 1, 0, 0));
        assert_eq!(h.changes_between(0, 299).count(), 0);
        assert_eq!(h.changes_between(250, 400).count(), 1);
        assert_eq!(h.latest().unwrap().sysctls.rp_filter["all"], 0);
    }

    #[test]
    fn history_is_bounded() {
        let mut h = History::default();
        let t = Timestamp::now();
        for i in 0..History::KEPT as u64 + 10 {
            assert!(h.observe(i * 10, t, with_rp_filter((i % 2) as u8)));
        }
        assert_eq!(h.snapshots.len(), History::KEPT);
        assert_eq!(h.forgotten, 10);
        // Before the oldest state kept: that state (the first one known now).
        assert_eq!(h.at(0).unwrap().sysctls.rp_filter["all"], 0);
        assert_eq!(h.changes().len(), History::KEPT - 1);
    }

    #[test]
    fn changes_are_named_per_family() {
        let before = with_rp_filter(1);
        let mut after = before.clone();
        Arc::make_mut(&mut after.routes).push(netlink::Route {
            table: netlink::TABLE_MAIN,
            destination: "fe80::/64".parse().unwrap(),
            gateway: None,
            oif: Some(2),
            kind: netlink_packet_route::route::RouteType::Unicast,
        });
        assert_eq!(
            after.changed_since(&before),
            [StateChange::Routes(Family::Ipv6)]
        );
    }

    #[test]
    fn rules_are_walked_per_family() {
        let rule = |family, priority| netlink::IpRule {
            family,
            priority,
            fwmark: Some("0x4000/0x4000".parse().unwrap()),
            invert: false,
            table: 100,
            action: netlink::RuleAction::Lookup,
            iif: None,
            suppress_prefixlen: None,
        };
        let state = NodeState {
            rules: Arc::new(vec![rule(Family::Ipv4, 10), rule(Family::Ipv6, 20)]),
            ..NodeState::default()
        };
        let walked = |family| -> Vec<u32> {
            state
                .rules_for(family, Mark(0x4000))
                .iter()
                .map(|r| r.priority)
                .collect()
        };
        assert_eq!(
            (walked(Family::Ipv4), walked(Family::Ipv6)),
            (vec![10], vec![20])
        );
    }
}
