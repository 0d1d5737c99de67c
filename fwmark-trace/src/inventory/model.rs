//! The inventory's data model: one `Entry` per place that reads or writes packet-mark or
//! conntrack-mark bits (an nft or iptables rule, an ip rule, an xfrm policy or state, a
//! WireGuard device, a socket, a BPF program, an Open vSwitch flow, the conntrack table), each
//! with its typed accesses (value, mask, whole or bitwise) and the owner it was attributed to.
//! Text appears only where a person reads it (`text`, `describe`) and in the JSON rendering.
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Serialize, Serializer};

pub(crate) use crate::{mark::MarkKind, nodestate::nft::BaseChain};
use crate::{
    mark::{Mark, MarkMatch},
    netstack::Family,
    nodestate::{
        netlink::{RuleAction, XfrmAction, XfrmDir},
        nft::ChainId,
    },
    registry::{NameId, OwnerId},
};

/// Serialises a mark or mask as `0x…` (how every mark in fwmark-trace's JSON reads).
pub(crate) fn hex<S: Serializer>(v: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

/// Serialises a 64-bit number (an OpenFlow cookie) as `0x…`.
pub(crate) fn hex64<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

/// How much of the mark a write replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Scope {
    /// Changes only the bits under its mask (`--or-mark`, `meta mark set meta mark | V`).
    Bits,
    /// Assigns all 32 bits of a mark packets already carry: every bit outside its value is
    /// cleared (`meta mark set ct mark & 0x80`, `--set-mark V` without a mask, `skb->mark = V`).
    Whole,
    /// The first mark of the packets it sends (SO_MARK, a WireGuard device's fwmark): whole, but
    /// there are no earlier bits to lose.
    Origin,
}

/// What an access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub(crate) enum Op {
    /// Tests the mark with its `MarkMatch` (exact when the mask is all 32 bits).
    Read,
    /// Sets the bits of `value` under `mask` (bits of the mask outside `value` are cleared).
    Write {
        scope: Scope,
        /// Bits flipped (xor) rather than set.
        #[serde(serialize_with = "hex", skip_serializing_if = "is_zero")]
        toggles: u32,
        /// Bits copied from the other mark (a save or restore), and which mark that is.
        #[serde(serialize_with = "hex", skip_serializing_if = "is_zero")]
        copies: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        copy_from: Option<MarkKind>,
        /// False when the written value is not visible (a program's register, a map lookup).
        known: bool,
    },
    /// Conntrack entries carry this mark (state, not a rule).
    Holds { count: u64 },
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// One read or write of one mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Access {
    pub(crate) mark: MarkKind,
    /// A read's test; a write's value under the bits it may change (never negated).
    pub(crate) masked: MarkMatch,
    pub(crate) op: Op,
}

/// `{"mark", "value", "mask", "op", …}`: the match's parts side by side, a read's negation
/// after its `op` (how the JSON has always read).
impl Serialize for Access {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Flat<'a> {
            mark: MarkKind,
            value: Mark,
            mask: Mark,
            #[serde(flatten)]
            op: &'a Op,
            #[serde(skip_serializing_if = "Option::is_none")]
            negated: Option<bool>,
        }
        Flat {
            mark: self.mark,
            value: self.masked.value,
            mask: self.masked.mask,
            op: &self.op,
            negated: self.is_read().then_some(self.masked.negated),
        }
        .serialize(s)
    }
}

impl Access {
    pub(crate) fn read(mark: MarkKind, value: u32, mask: u32, negated: bool) -> Self {
        Access {
            mark,
            masked: MarkMatch::new(Mark(value), Mark(mask)).negate(negated),
            op: Op::Read,
        }
    }

    /// `op` on `value` under `mask` (the value taken as it is: a write's toggled bits are not
    /// in it, a write is never negated).
    pub(crate) fn new(mark: MarkKind, value: u32, mask: u32, op: Op) -> Self {
        Access {
            mark,
            masked: MarkMatch {
                value: Mark(value),
                mask: Mark(mask),
                negated: false,
            },
            op,
        }
    }

    /// The value, as the bits it reads or sets.
    pub(crate) fn value(&self) -> u32 {
        self.masked.value.0
    }

    /// The mask: the bits it reads or may change.
    pub(crate) fn mask(&self) -> u32 {
        self.masked.mask.0
    }

    /// A write of a constant whole value that starts the packets of a socket or device.
    pub(crate) fn origin(value: u32) -> Self {
        Access::new(
            MarkKind::Packet,
            value,
            u32::MAX,
            Op::Write {
                scope: Scope::Origin,
                toggles: 0,
                copies: 0,
                copy_from: None,
                known: true,
            },
        )
    }

    /// A write whose value the ruleset does not show (an `xt` target without its save line).
    pub(crate) fn unknown_write(mark: MarkKind) -> Self {
        Access::new(
            mark,
            0,
            u32::MAX,
            Op::Write {
                scope: Scope::Whole,
                toggles: 0,
                copies: 0,
                copy_from: None,
                known: false,
            },
        )
    }

    pub(crate) fn is_read(&self) -> bool {
        matches!(self.op, Op::Read)
    }

    pub(crate) fn is_write(&self) -> bool {
        matches!(self.op, Op::Write { .. })
    }

    /// Whether this write can have turned `old` into `new` (this mark's values before and
    /// after; `other`: the other mark, which a save or restore copies, when known). What its
    /// constant bits set, flip and keep must agree with the change; bits it copies or cannot
    /// be seen to write may be anything.
    pub(crate) fn explains(&self, old: u32, new: u32, other: Option<u32>) -> bool {
        let Op::Write {
            scope,
            toggles,
            copies,
            known,
            ..
        } = self.op
        else {
            return false;
        };
        let changed = old ^ new;
        if scope == Scope::Origin {
            return new == self.value();
        }
        // Bits outside the mask are kept (a whole write's mask is all of them).
        if changed & !self.mask() != 0 {
            return false;
        }
        if !known {
            return true;
        }
        let fixed = self.mask() & !toggles & !copies;
        let copied = other.is_none_or(|o| (new ^ o) & copies == 0);
        new & fixed == self.value() & fixed && changed & toggles == toggles && copied
    }

    pub(crate) fn scope(&self) -> Option<Scope> {
        match self.op {
            Op::Write { scope, .. } => Some(scope),
            _ => None,
        }
    }

    /// A read of all 32 bits (`ip rule fwmark V` without a mask, nft `meta mark V`).
    pub(crate) fn is_exact_read(&self) -> bool {
        self.is_read() && self.mask() == u32::MAX
    }

    /// The bits that say whose access this is: a read's mask (an exact read's value), a bitwise
    /// write's mask, a whole or origin write's value and copied bits, a conntrack value.
    pub(crate) fn bits(&self) -> u32 {
        match self.op {
            Op::Read if self.mask() == u32::MAX => self.value(),
            Op::Read => self.mask(),
            Op::Write {
                scope: Scope::Bits, ..
            } => self.mask(),
            Op::Write { copies, .. } => self.value() | copies,
            Op::Holds { .. } => self.value(),
        }
    }

    /// The bits a write decides itself: those it sets, clears or flips, all of its bits when
    /// its value is not visible; not those it copies from the other mark (a save or restore
    /// moves bits, it does not make them). Nothing for a read.
    pub(crate) fn decided(&self) -> u32 {
        match self.op {
            Op::Write { known: false, .. } => self.written(),
            Op::Write { copies, .. } => self.written() & !copies,
            _ => 0,
        }
    }

    /// The bits a write may change: its mask, for an origin write the bits it sets.
    pub(crate) fn written(&self) -> u32 {
        match self.op {
            Op::Write {
                scope: Scope::Origin,
                ..
            } => self.value(),
            Op::Write { .. } => self.mask(),
            _ => 0,
        }
    }

    /// What it does, in words: "sets 0x4000", "clears 0x1b0000", "= ct mark & 0x80 (whole)",
    /// "matches & 0x8000 == 0x8000".
    pub(crate) fn describe(&self) -> String {
        let m = self.mark.label();
        match self.op {
            Op::Read => {
                let op = if self.masked.negated { "!=" } else { "==" };
                if self.mask() == u32::MAX {
                    format!("reads {m} {op} {:#x} (exact)", self.value())
                } else {
                    format!("reads {m} & {:#x} {op} {:#x}", self.mask(), self.value())
                }
            }
            Op::Holds { count } => {
                format!("{count} conntrack entries with ct mark {:#x}", self.value())
            }
            Op::Write {
                scope,
                toggles,
                copies,
                copy_from,
                known,
            } => {
                let mut parts = Vec::new();
                if !known {
                    parts.push("a value not visible".to_owned());
                }
                if let Some(from) = copy_from.filter(|_| copies != 0) {
                    let whole = if copies == u32::MAX {
                        String::new()
                    } else {
                        format!(" & {copies:#x}")
                    };
                    parts.push(format!("copies {}{whole}", from.label()));
                }
                let set = self.value() & !copies;
                if set != 0 {
                    parts.push(format!("sets {set:#x}"));
                }
                if toggles != 0 {
                    parts.push(format!("toggles {toggles:#x}"));
                }
                let cleared = self.mask() & !self.value() & !toggles & !copies;
                match scope {
                    Scope::Bits if cleared != 0 => parts.push(format!("clears {cleared:#x}")),
                    Scope::Whole => parts.push("clears every other bit (whole)".into()),
                    _ => {}
                }
                if parts.is_empty() {
                    parts.push(format!("= {:#x}", self.value()));
                }
                let what = match scope {
                    Scope::Origin => "starts its packets with",
                    _ => "writes",
                };
                if scope == Scope::Origin {
                    format!("{what} {m} {:#x}", self.value())
                } else {
                    format!("{what} {m}: {}", parts.join(", "))
                }
            }
        }
    }
}

/// A network namespace, by inode (what the kernel reports) and the name it was found by.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub(crate) struct Netns {
    pub(crate) inode: u32,
    /// `ip netns` name, `pid N` (found through /proc/N/ns/net), or `current`.
    pub(crate) name: String,
    /// The pod or container that lives in it (runc's state says).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "crate::nodestate::pods::json"
    )]
    pub(crate) pod: Option<crate::nodestate::pods::Container>,
}

impl Netns {
    pub(crate) fn named(inode: u32, name: String) -> Self {
        Netns {
            inode,
            name,
            pod: None,
        }
    }
}

/// How a WireGuard device is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum WgImpl {
    /// The kernel module (generic netlink family "wireguard").
    Kernel,
    /// wireguard-go, boringtun…: a TUN device and a UAPI socket in /var/run/wireguard.
    Userspace,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum SockProto {
    Tcp,
    Udp,
    Raw,
}

impl SockProto {
    pub(crate) fn name(self) -> &'static str {
        match self {
            SockProto::Tcp => "tcp",
            SockProto::Udp => "udp",
            SockProto::Raw => "raw",
        }
    }
}

/// Program types that can write the packet mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum BpfKind {
    /// tc classifier (tcx or cls_bpf).
    SchedCls,
    /// tc action.
    SchedAct,
    /// cgroup skb ingress/egress.
    CgroupSkb,
    /// cgroup sock (socket creation: `bpf_sock.mark`).
    CgroupSock,
}

/// Where a BPF program is attached in the namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Attachment {
    pub(crate) ifname: String,
    /// ingress or egress.
    pub(crate) direction: &'static str,
    /// tcx or clsact (a classic cls_bpf filter).
    pub(crate) via: &'static str,
}

/// What the entry is and where it sits.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "what", rename_all = "kebab-case")]
pub(crate) enum Place {
    /// A rule of the nft ruleset (iptables-nft's rules included: `iptables` then holds the
    /// rule as iptables-nft-save prints it).
    NftRule {
        #[serde(flatten)]
        chain: ChainId,
        handle: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        iptables: Option<String>,
        reached_from: Vec<BaseChain>,
        /// Its verdict drops (or rejects) the packets it matches.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        drops: bool,
    },
    /// A rule of the iptables-legacy tables (`iptables-legacy-save`).
    IptablesRule {
        family: Family,
        table: String,
        chain: String,
        /// 1-based position in its chain.
        position: usize,
        reached_from: Vec<String>,
    },
    IpRule {
        family: Family,
        priority: u32,
        table: u32,
        action: RuleAction,
    },
    XfrmPolicy {
        dir: XfrmDir,
        action: XfrmAction,
        src: IpNet,
        dst: IpNet,
        priority: u32,
    },
    XfrmState {
        src: IpAddr,
        dst: IpAddr,
        #[serde(serialize_with = "hex")]
        spi: u32,
        proto: u8,
    },
    Wireguard {
        ifname: String,
        ifindex: u32,
        listen_port: u16,
        implementation: WgImpl,
    },
    Socket {
        proto: SockProto,
        local: SocketAddr,
        #[serde(skip_serializing_if = "Option::is_none")]
        remote: Option<SocketAddr>,
        inode: u32,
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        comm: Option<String>,
    },
    BpfProgram {
        id: u32,
        name: String,
        prog_type: BpfKind,
        attached: Vec<Attachment>,
    },
    /// An Open vSwitch flow (`ovs-ofctl dump-flows`).
    OvsFlow {
        bridge: String,
        table: u8,
        priority: u16,
        #[serde(serialize_with = "hex64")]
        cookie: u64,
    },
    /// Conntrack entries of one mark value.
    Conntrack { entries: u64 },
}

impl Place {
    /// Where, in a few words: "nft ip kube-proxy/mark-for-masquerade #3", "socket udp
    /// 0.0.0.0:5000 (pid 42 tailscaled)", "bpf program 42 set_mark (tcx egress veth-a)".
    pub(crate) fn label(&self) -> String {
        match self {
            Place::NftRule { chain, handle, .. } => format!("nft {chain} #{handle}"),
            Place::IptablesRule {
                family,
                table,
                chain,
                position,
                ..
            } => {
                let tool = match family {
                    Family::Ipv4 => "iptables-legacy",
                    Family::Ipv6 => "ip6tables-legacy",
                };
                format!("{tool} {table}/{chain} #{position}")
            }
            Place::IpRule {
                family, priority, ..
            } => {
                let v = if *family == Family::Ipv6 { " -6" } else { "" };
                format!("ip{v} rule {priority}")
            }
            Place::XfrmPolicy { dir, .. } => format!("xfrm policy {dir:?}").to_lowercase(),
            Place::XfrmState { spi, .. } => format!("xfrm state spi {spi:#x}"),
            Place::Wireguard {
                ifname,
                implementation,
                ..
            } => match implementation {
                WgImpl::Kernel => format!("wireguard {ifname}"),
                WgImpl::Userspace => format!("wireguard {ifname} (userspace)"),
            },
            Place::Socket {
                proto,
                local,
                pid,
                comm,
                ..
            } => {
                let who = match (pid, comm) {
                    (Some(p), Some(c)) => format!(" (pid {p} {c})"),
                    _ => String::new(),
                };
                format!("socket {} {local}{who}", proto.name())
            }
            Place::BpfProgram {
                id, name, attached, ..
            } => {
                let at: Vec<String> = attached
                    .iter()
                    .map(|a| format!("{} {} {}", a.via, a.direction, a.ifname))
                    .collect();
                if at.is_empty() {
                    format!("bpf program {id} {name}")
                } else {
                    format!("bpf program {id} {name} ({})", at.join(", "))
                }
            }
            Place::OvsFlow {
                bridge,
                table,
                priority,
                cookie,
            } => {
                let cookie = if *cookie == 0 {
                    String::new()
                } else {
                    format!(" cookie {cookie:#x}")
                };
                format!("ovs {bridge} table {table} priority {priority}{cookie}")
            }
            Place::Conntrack { .. } => "conntrack table".into(),
        }
    }
}

/// How an owner was decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum By {
    /// A table, chain, interface or process name matched the owner's patterns.
    Name,
    /// A value the access reads or writes is one the owner names.
    Value,
    /// The bits fit inside the owner's mask: a guess, which never makes a write that sets,
    /// clears or flips bits its guessed owner's in a conflict.
    Mask,
}

impl By {
    pub(crate) fn label(self) -> &'static str {
        match self {
            By::Name => "name",
            By::Value => "value",
            By::Mask => "mask",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct OwnerRef {
    /// The registry entry, as trace's attribution takes it (of the registry the inventory
    /// was attributed with).
    #[serde(skip)]
    pub(crate) owner: OwnerId,
    /// Its name (every version together), as attribution compares it.
    #[serde(skip)]
    pub(crate) name_id: NameId,
    /// Registry id (`kube-proxy@current`).
    pub(crate) id: String,
    /// Owner name, every version together (`kube-proxy`): what conflicts compare.
    pub(crate) name: String,
    pub(crate) by: By,
    /// Attributed by mask alone (`by: mask`): nothing names the entry as this owner's.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub(crate) guess: bool,
    /// Other owners that fit as well (same evidence), best first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) also: Vec<String>,
}

/// One place that reads or writes mark bits.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Entry {
    /// Index in `Inventory::entries` (stable within one inventory).
    pub(crate) id: usize,
    /// None: node-wide (cgroup BPF programs are not bound to a namespace).
    pub(crate) netns: Option<Netns>,
    #[serde(flatten)]
    pub(crate) place: Place,
    /// The rule or object as its tool prints it.
    pub(crate) text: String,
    pub(crate) access: Vec<Access>,
    pub(crate) owner: Option<OwnerRef>,
    /// Names the owner may be recognised by (tables, chains, interfaces, processes).
    #[serde(skip)]
    pub(crate) names: Vec<String>,
}

/// What conflicts call a side no owner stands for.
pub(crate) const UNOWNED: &str = "unowned";

impl Entry {
    pub(crate) fn owner_name(&self) -> Option<&str> {
        self.owner.as_ref().map(|o| o.name.as_str())
    }

    pub(crate) fn owner_id(&self) -> &str {
        self.owner.as_ref().map_or(UNOWNED, |o| o.id.as_str())
    }

    /// A write attributed by mask alone that sets, clears or flips bits: its guessed owner is
    /// not taken as its writer (a copy, a read or a conntrack value keeps the guess).
    pub(crate) fn guessed_writer(&self) -> bool {
        self.owner.as_ref().is_some_and(|o| o.guess) && self.writes().any(|a| a.decided() != 0)
    }

    /// Whom the entry stands for in conflicts: its owner's name; `unowned` when no owner is
    /// found or when it is a guessed writer, so that a guess never silences a conflict.
    pub(crate) fn party(&self) -> &str {
        match &self.owner {
            Some(o) if !self.guessed_writer() => &o.name,
            _ => UNOWNED,
        }
    }

    pub(crate) fn writes(&self) -> impl Iterator<Item = &Access> {
        self.access.iter().filter(|a| a.is_write())
    }
}

/// What a source found at one place, before it is numbered and attributed (what each source
/// returns).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct RawEntry {
    pub(crate) place: Place,
    pub(crate) text: String,
    pub(crate) access: Vec<Access>,
    pub(crate) names: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(scope: Scope, value: u32, mask: u32) -> Access {
        Access::new(
            MarkKind::Packet,
            value,
            mask,
            Op::Write {
                scope,
                toggles: 0,
                copies: 0,
                copy_from: None,
                known: true,
            },
        )
    }

    #[test]
    fn a_write_explains_the_changes_it_can_make() {
        let or = write(Scope::Bits, 0x4000, 0x4000);
        assert!(or.explains(0x100, 0x4100, None));
        assert!(!or.explains(0x100, 0x4200, None), "0x200 is not its bit");
        assert!(
            !or.explains(0x4100, 0x100, None),
            "it sets, it does not clear"
        );
        let clear = write(Scope::Bits, 0, 0x1b0000);
        assert!(clear.explains(0x80000, 0, None) && !clear.explains(0, 0x80000, None));
        let whole = write(Scope::Whole, 0xca6c, u32::MAX);
        assert!(whole.explains(0x80000, 0xca6c, None) && !whole.explains(0, 0xca6d, None));
        let restore = Access {
            op: Op::Write {
                scope: Scope::Whole,
                toggles: 0,
                copies: 0x80,
                copy_from: Some(MarkKind::Conntrack),
                known: true,
            },
            ..write(Scope::Whole, 0, u32::MAX)
        };
        // `meta mark set ct mark & 0x80`: everything but the copied bit goes.
        assert!(restore.explains(0x0100_0000, 0x80, Some(0x80)));
        assert!(restore.explains(0x0100_0000, 0, None));
        assert!(!restore.explains(0x0100_0000, 0x80, Some(0)));
        assert!(!restore.explains(0, 0x100, None));
        let xor = Access {
            op: Op::Write {
                scope: Scope::Bits,
                toggles: 0x4000,
                copies: 0,
                copy_from: None,
                known: true,
            },
            ..write(Scope::Bits, 0, 0x4000)
        };
        assert!(xor.explains(0x4000, 0, None) && xor.explains(0, 0x4000, None));
        assert!(!xor.explains(0x4000, 0x4000, None));
        let unknown = Access::unknown_write(MarkKind::Packet);
        assert!(unknown.explains(1, 2, None));
        // What each write decides itself (not what it copies).
        assert_eq!(or.decided(), 0x4000);
        assert_eq!(restore.decided(), !0x80, "a whole copy clears the rest");
        let bitwise_copy = Access {
            op: Op::Write {
                scope: Scope::Bits,
                toggles: 0,
                copies: 0xff0000,
                copy_from: Some(MarkKind::Conntrack),
                known: true,
            },
            ..write(Scope::Bits, 0, 0xff0000)
        };
        assert_eq!(bitwise_copy.decided(), 0);
        assert_eq!(unknown.decided(), u32::MAX);
        assert_eq!(Access::read(MarkKind::Packet, 1, 1, false).decided(), 0);
        assert!(Access::origin(0xca6c).explains(0, 0xca6c, None));
        assert!(!Access::read(MarkKind::Packet, 1, 1, false).explains(0, 1, None));
    }

    #[test]
    fn bits_and_descriptions() {
        let or = write(Scope::Bits, 0x4000, 0x4000);
        assert_eq!((or.bits(), or.written()), (0x4000, 0x4000));
        assert_eq!(or.describe(), "writes packet mark: sets 0x4000");
        let clear = write(Scope::Bits, 0, 0x1b0000);
        assert_eq!(clear.describe(), "writes packet mark: clears 0x1b0000");
        let origin = Access::origin(0xca6c);
        assert_eq!((origin.bits(), origin.written()), (0xca6c, 0xca6c));
        assert_eq!(
            origin.describe(),
            "starts its packets with packet mark 0xca6c"
        );
        let exact = Access::read(MarkKind::Packet, 0xca6c, u32::MAX, true);
        assert!(exact.is_exact_read());
        assert_eq!(exact.bits(), 0xca6c);
        assert_eq!(exact.describe(), "reads packet mark != 0xca6c (exact)");
        let masked = Access::read(MarkKind::Conntrack, 0x40000, 0xff0000, false);
        assert_eq!(masked.bits(), 0xff0000);
        assert_eq!(masked.describe(), "reads ct mark & 0xff0000 == 0x40000");
        assert_eq!(
            serde_json::to_value(exact).unwrap(),
            serde_json::json!({"mark": "packet", "value": "0xca6c", "mask": "0xffffffff",
                               "op": "read", "negated": true})
        );
        let json = serde_json::to_value(or).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"mark": "packet", "value": "0x4000", "mask": "0x4000",
                               "op": "write", "scope": "bits", "known": true})
        );
    }
}
