//! State of the node that decides what marks do: nftables chains (priority bands), `ip rule`s
//! and routes, xfrm policies, and the sysctls that make routing mark-aware.
pub mod netlink;
pub mod nft;
pub mod sysctl;
pub mod watch;

use serde::Serialize;

/// Everything `why` reasons with, read in the traced namespace.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodeState {
    pub rules: Vec<netlink::IpRule>,
    pub routes: Vec<netlink::Route>,
    pub xfrm: Vec<netlink::XfrmPolicy>,
    pub sysctls: sysctl::Sysctls,
    /// nft rules that read or write the packet or conntrack mark.
    pub mark_rules: Vec<nft::MarkRule>,
    /// nft base chains (hook, priority): they name the band a mark changed or a packet died in.
    #[serde(rename = "nft_chains", serialize_with = "chain_labels")]
    pub chains: Vec<nft::Chain>,
    /// Non-fatal problems reading state (e.g. no xfrm support).
    pub errors: Vec<String>,
}

impl NodeState {
    pub fn read() -> Self {
        let mut s = NodeState::default();
        match netlink::rules() {
            Ok(r) => s.rules = r,
            Err(e) => s.errors.push(format!("ip rules: {e:#}")),
        }
        match netlink::routes() {
            Ok(r) => s.routes = r,
            Err(e) => s.errors.push(format!("routes: {e:#}")),
        }
        match netlink::xfrm_policies() {
            Ok(p) => s.xfrm = p,
            Err(e) => s.errors.push(format!("xfrm policies: {e:#}")),
        }
        s.sysctls = sysctl::Sysctls::read();
        match nft::read_mark_rules() {
            Ok(r) => s.mark_rules = r,
            Err(e) => s.errors.push(format!("nft rules: {e:#}")),
        }
        match nft::read_chains() {
            Ok(c) => s.chains = c,
            Err(e) => s.errors.push(format!("nft chains: {e:#}")),
        }
        s
    }

    /// The parts that differ from `before` (read errors aside).
    /// Rules and routes per family: an IPv6 route appearing (say, once an address passed DAD)
    /// says nothing about an IPv4 flow.
    pub fn changed_since(&self, before: &NodeState) -> Vec<&'static str> {
        let rules_differ = |v6: bool| {
            let of = |r: &&netlink::IpRule| r.ipv6 == v6;
            !self
                .rules
                .iter()
                .filter(of)
                .eq(before.rules.iter().filter(of))
        };
        let routes_differ = |v6: bool| {
            let of = |r: &&netlink::Route| r.destination.contains(':') == v6;
            !self
                .routes
                .iter()
                .filter(of)
                .eq(before.routes.iter().filter(of))
        };
        [
            ("IPv4 ip rules", rules_differ(false)),
            ("IPv6 ip rules", rules_differ(true)),
            ("IPv4 routes", routes_differ(false)),
            ("IPv6 routes", routes_differ(true)),
            ("xfrm policies", self.xfrm != before.xfrm),
            ("sysctls", self.sysctls != before.sysctls),
            ("nft mark rules", self.mark_rules != before.mark_rules),
            ("nft chains", self.chains != before.chains),
        ]
        .into_iter()
        .filter_map(|(what, changed)| changed.then_some(what))
        .collect()
    }

    /// The IPv4 rules a packet with `mark` walks, in order, up to the first matching lookup
    /// whose table has routes (a simplified model of the kernel's rule walk).
    pub fn rules_for(&self, mark: u32) -> Vec<&netlink::IpRule> {
        self.rules
            .iter()
            .filter(|r| !r.ipv6 && r.mark_matches(mark))
            .collect()
    }
}

/// Chains as `hook: family table/chain@priority`, how a person reads them.
fn chain_labels<S: serde::Serializer>(chains: &[nft::Chain], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        chains
            .iter()
            .map(|c| format!("{}: {}", nft::hook_name(c.hook), c.label())),
    )
}

/// The node's state as it changed during a run: a verdict must reason with the rules that were
/// in force when the packet died, not with whatever an operator changed since.
#[derive(Debug, Default)]
pub struct History {
    snapshots: Vec<Snapshot>,
}

#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// When this state was first read (RFC 3339).
    pub time: String,
    /// Kernel monotonic time of that read (the clock events carry).
    #[serde(skip)]
    pub since_ns: u64,
    /// What differs from the previous snapshot.
    pub changed: Vec<&'static str>,
    #[serde(skip)]
    pub state: NodeState,
}

impl History {
    /// Records `state` read at `now_ns` if it differs from the last one; true when it did.
    pub fn observe(&mut self, now_ns: u64, time: String, state: NodeState) -> bool {
        let changed = match self.snapshots.last() {
            Some(last) if last.state == state => return false,
            Some(last) => state.changed_since(&last.state),
            None => Vec::new(),
        };
        self.snapshots.push(Snapshot {
            time,
            since_ns: now_ns,
            changed,
            state,
        });
        true
    }

    /// The state in effect at `ts_ns` (the first one read, for times before it).
    pub fn at(&self, ts_ns: u64) -> Option<&NodeState> {
        self.snapshots
            .iter()
            .rev()
            .find(|s| s.since_ns <= ts_ns)
            .or(self.snapshots.first())
            .map(|s| &s.state)
    }

    pub fn latest(&self) -> Option<&NodeState> {
        self.snapshots.last().map(|s| &s.state)
    }

    /// Every change after the first read.
    pub fn changes(&self) -> &[Snapshot] {
        self.snapshots.get(1..).unwrap_or_default()
    }

    /// Changes that happened between `from_ns` and `to_ns`.
    pub fn changes_between(&self, from_ns: u64, to_ns: u64) -> impl Iterator<Item = &Snapshot> {
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
        s.sysctls.rp_filter.insert("all".into(), v);
        s
    }

    #[test]
    fn history_keeps_changes_and_answers_by_time() {
        let mut h = History::default();
        assert!(h.observe(100, "t0".into(), with_rp_filter(1)));
        assert!(!h.observe(200, "t1".into(), with_rp_filter(1)));
        assert!(h.observe(300, "t2".into(), with_rp_filter(0)));
        assert_eq!(h.changes().len(), 1);
        assert_eq!(h.changes()[0].changed, ["sysctls"]);
        let rp = |ts| h.at(ts).unwrap().sysctls.rp_filter["all"];
        assert_eq!((rp(50), rp(250), rp(300), rp(900)), (1, 1, 0, 0));
        assert_eq!(h.changes_between(0, 299).count(), 0);
        assert_eq!(h.changes_between(250, 400).count(), 1);
        assert_eq!(h.latest().unwrap().sysctls.rp_filter["all"], 0);
    }

    #[test]
    fn changes_are_named_per_family() {
        let before = with_rp_filter(1);
        let mut after = before.clone();
        after.routes.push(netlink::Route {
            table: 254,
            destination: "fe80::/64".into(),
            gateway: None,
            oif: Some(2),
            kind: "unicast".into(),
        });
        assert_eq!(after.changed_since(&before), ["IPv6 routes"]);
    }
}
