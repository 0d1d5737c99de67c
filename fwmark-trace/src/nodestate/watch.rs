//! Change notifications for the node state `why` reasons with, so that it is read again only
//! when something changed: a full read (every rule, route, xfrm policy and the nft ruleset)
//! costs far more on a large node than a one-second tick can afford.
use std::io::ErrorKind;

use anyhow::{Context, Result};
use netlink_sys::{protocols, Socket, SocketAddr};

/// Multicast groups (include/uapi/linux/rtnetlink.h, xfrm.h, netfilter/nfnetlink.h).
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV4_RULE: u32 = 8;
const RTNLGRP_IPV6_ROUTE: u32 = 11;
const RTNLGRP_IPV6_RULE: u32 = 19;
const XFRMNLGRP_POLICY: u32 = 2;
const NFNLGRP_NFTABLES: u32 = 7;

const GROUPS: [(isize, &[u32]); 3] = [
    (
        protocols::NETLINK_ROUTE,
        &[
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV4_RULE,
            RTNLGRP_IPV6_ROUTE,
            RTNLGRP_IPV6_RULE,
        ],
    ),
    (protocols::NETLINK_XFRM, &[XFRMNLGRP_POLICY]),
    (protocols::NETLINK_NETFILTER, &[NFNLGRP_NFTABLES]),
];

/// Listens, in the calling thread's namespace, for rule, route, xfrm policy and nftables
/// changes.
pub(crate) struct Watcher {
    sockets: Vec<Socket>,
    buf: Vec<u8>,
}

impl Watcher {
    pub(crate) fn new() -> Result<Self> {
        Self::with(&GROUPS)
    }

    /// nftables changes only (what the tracer re-reads its chain bands on).
    pub(crate) fn nftables() -> Result<Self> {
        Self::with(&GROUPS[2..])
    }

    fn with(groups: &[(isize, &[u32])]) -> Result<Self> {
        let mut sockets = Vec::new();
        for &(protocol, groups) in groups {
            let mut s = Socket::new(protocol).context("opening a netlink socket")?;
            s.bind(&SocketAddr::new(0, 0))?;
            for g in groups {
                s.add_membership(*g)
                    .with_context(|| format!("joining netlink group {g}"))?;
            }
            s.set_non_blocking(true)?;
            sockets.push(s);
        }
        Ok(Self {
            sockets,
            buf: vec![0; 1 << 16],
        })
    }

    /// Whether a notification arrived since the last call (all are drained). An overrun
    /// socket (ENOBUFS: more changes than it could queue) counts as a change too.
    pub(crate) fn changed(&mut self) -> bool {
        let mut any = false;
        for s in &self.sockets {
            loop {
                match s.recv(&mut &mut self.buf[..], 0) {
                    Ok(0) => break,
                    Ok(_) => any = true,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        any = true;
                        break;
                    }
                }
            }
        }
        any
    }
}
