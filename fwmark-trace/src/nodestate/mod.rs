//! State of the node that decides what marks do: nftables chains (priority bands), `ip rule`s
//! and routes, xfrm policies, and the sysctls that make routing mark-aware.
pub mod netlink;
pub mod nft;
pub mod sysctl;

use serde::Serialize;

/// Everything `why` reasons with, read in the traced namespace.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeState {
    pub rules: Vec<netlink::IpRule>,
    pub routes: Vec<netlink::Route>,
    pub xfrm: Vec<netlink::XfrmPolicy>,
    pub sysctls: sysctl::Sysctls,
    /// nft rules that read or write the packet or conntrack mark.
    pub mark_rules: Vec<nft::MarkRule>,
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
        s
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
