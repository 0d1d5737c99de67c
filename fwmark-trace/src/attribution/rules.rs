//! Who wrote which bits: pure functions over the registry. Input: the registry (possibly
//! narrowed to a profile), the old and new mark and conntrack mark, and the nft chains in the
//! segment where the change happened (which name the writer). Output: an `Attribution`, its
//! owners as registry ids.
use std::collections::BTreeSet;

use crate::{
    event::attribution::{
        Attribution, FieldRef, FieldValue, Finding, OwnerChange, Recognized, Side, Warning,
    },
    mark::Mark,
    nodestate::nft::{Chain, ChainId, ChainOrigin},
    registry::{lookup, NameId, Owner, OwnerId, Registry, Style},
};

/// One transition to attribute.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Transition<'a> {
    pub(crate) old: u32,
    pub(crate) new: u32,
    /// Conntrack marks, when a conntrack entry is attached on both sides.
    pub(crate) ct: Option<(u32, u32)>,
    /// The nft base chains in the segment ("inet calico/cali-POSTROUTING@-150").
    pub(crate) chains: &'a [Chain],
    /// Regular chains those chains reach that write a mark ("ip mangle/KUBE-MARK-MASQ"): with
    /// iptables-nft the base chain is the table's, the owner's name is on these.
    pub(crate) mark_writers: &'a [ChainId],
    /// The mark came from the sending socket (SO_MARK): a recognised value names the writer.
    pub(crate) socket: bool,
    /// The owner of the rule or program in the segment whose write can have made the change,
    /// from the node's inventory: the writer by what it writes, not by its name.
    pub(crate) written_by: Option<OwnerId>,
    /// Owners with something on this node (the inventory): without a profile only these are
    /// named. None: every registered owner may be.
    pub(crate) present: Option<&'a BTreeSet<NameId>>,
    /// The segment names the writer itself and it is no registry owner (an xfrm state whose
    /// output mark made the change): no owner is taken for the writer by name or value.
    pub(crate) written_outside: bool,
}

impl Transition<'_> {
    /// Whether `o` may be named here: it has something on the node, or nothing says otherwise.
    fn eligible(&self, reg: &Registry, o: OwnerId) -> bool {
        self.present.is_none_or(|p| p.contains(&reg.name_of(o)))
    }
}

fn field_value(v: u32, mask: u32, number: bool) -> FieldValue {
    if number && mask != 0 {
        FieldValue::Number(v >> mask.trailing_zeros())
    } else {
        FieldValue::Bits(Mark(v))
    }
}

/// Whether an owner's rules are among these chains (by table or chain name).
fn writes_here(o: &Owner, c: &Transition) -> bool {
    let named = |id: &ChainId| o.owns_chain(&id.table) || o.owns_chain(&id.name);
    c.chains
        .iter()
        .filter(|ch| ch.origin != ChainOrigin::Kernel)
        .any(|ch| named(&ch.id))
        || c.mark_writers.iter().any(named)
}

/// Whether an owner of `mask` (its packet-mark or its conntrack-mark bits) is a candidate for
/// these changed bits. An owner of all 32 bits takes part only when a value of theirs is
/// recognised, or it writes here, or a profile selected it and it has a layout to decode
/// (Cilium's fields): otherwise every whole-value owner (wg-quick, Mullvad, …) would claim
/// every change.
fn candidate(o: &Owner, mask: u32, changed: u32, profiled: bool, named: bool) -> bool {
    mask & changed != 0 && (mask != u32::MAX || named || (profiled && !o.fields.is_empty()))
}

/// The named values of `o` that `bits` hold, whole or per field.
fn meanings(o: &Owner, bits: u32) -> Vec<String> {
    lookup(&o.values, bits)
        .into_iter()
        .chain(
            o.fields
                .iter()
                .filter_map(|f| lookup(&f.values, bits & f.mask)),
        )
        .map(str::to_owned)
        .collect()
}

/// Changed bits of one owner, split by field.
fn split(reg: &Registry, id: OwnerId, c: &Transition, changed: u32, out: &mut Vec<OwnerChange>) {
    let o = reg.owner(id);
    let mine = changed & o.mask;
    let mut rest = mine;
    for f in o.fields.iter().filter(|f| f.mask & mine != 0) {
        rest &= !f.mask;
        out.push(OwnerChange {
            owner: id,
            bits: Mark(mine & f.mask),
            field: Some(FieldRef::Named(f.name.clone())),
            old_value: field_value(c.old & f.mask, f.mask, f.number),
            new_value: field_value(c.new & f.mask, f.mask, f.number),
            meaning: lookup(&f.values, c.new & f.mask).map(str::to_owned),
        });
    }
    if rest != 0 {
        let meaning = o
            .value_name(c.new & o.mask)
            .or_else(|| o.value_name(c.new))
            .map(str::to_owned);
        out.push(OwnerChange {
            owner: id,
            bits: Mark(rest),
            field: None,
            old_value: FieldValue::Bits(Mark(c.old & o.mask)),
            new_value: FieldValue::Bits(Mark(c.new & o.mask)),
            meaning,
        });
    }
}

/// The writer by name: the owner whose tables or chains sit in the segment (or the chains
/// they reach).
fn named_writer(reg: &Registry, c: &Transition) -> Option<OwnerId> {
    let changed = c.old ^ c.new;
    let mask = |w: &OwnerId| reg.owner(*w).mask;
    let mut writers: Vec<OwnerId> = reg
        .entries()
        .filter(|(_, o)| writes_here(o, c))
        .map(|(id, _)| id)
        .collect();
    let same_name = |a: OwnerId, b: OwnerId| reg.name_of(a) == reg.name_of(b);
    if writers.iter().any(|w| !same_name(*w, writers[0])) {
        // Owners sharing rule names (Calico's iptables and eBPF modes): keep those whose
        // bits the change stayed within.
        writers.retain(|w| changed & !mask(w) == 0);
    }
    match writers.as_slice() {
        [first, rest @ ..] if rest.iter().all(|w| same_name(*w, *first)) => {
            // Several versions match: the one whose bits hold the change, else one that
            // writes whole values.
            writers
                .iter()
                .copied()
                .find(|w| changed & !mask(w) == 0)
                .or_else(|| {
                    writers
                        .iter()
                        .copied()
                        .find(|w| reg.owner(*w).style == Style::WholeMark)
                })
                .or(Some(*first))
        }
        _ => None,
    }
}

/// Who wrote the change, by the best evidence there is: the inventory's rule or program in
/// the segment that writes such a change; else the owner whose chains sit there; else the
/// owner whose whole value the new mark is (a socket's SO_MARK, or a rule assigning it under
/// a name that says nothing), one with something on the node first.
fn writer(reg: &Registry, c: &Transition, recognized: &[Recognized]) -> Option<OwnerId> {
    if c.written_outside {
        return None;
    }
    if let Some(o) = c.written_by {
        return Some(o);
    }
    if let Some(o) = named_writer(reg, c) {
        return Some(o);
    }
    let valued: Vec<OwnerId> = recognized
        .iter()
        .filter(|r| r.side == Side::New)
        .map(|r| r.owner)
        .collect();
    valued
        .iter()
        .copied()
        .find(|o| c.eligible(reg, *o))
        .or(valued.first().copied().filter(|_| c.socket))
}

pub(crate) fn attribute(reg: &Registry, c: &Transition) -> Attribution {
    let changed = c.old ^ c.new;
    let mut a = Attribution::default();

    for (id, o) in reg.entries().filter(|(_, o)| o.style == Style::WholeMark) {
        for (side, v) in [(Side::Old, c.old), (Side::New, c.new)] {
            if let Some(meaning) = o.value_name(v).filter(|_| v != 0) {
                a.recognized.push(Recognized {
                    owner: id,
                    value: Mark(v),
                    meaning: meaning.to_owned(),
                    side,
                });
            }
        }
    }
    let writer = writer(reg, c, &a.recognized);
    a.writer = writer;
    let is_writer = |o: OwnerId| writer == Some(o);
    // Without a profile, owners with nothing on the node are not named (the writer is: it
    // was just seen writing).
    let eligible = |o: OwnerId| c.eligible(reg, o) || is_writer(o);
    a.recognized.retain(|r| eligible(r.owner));
    // Owners narrowed to a profile or to the node's own may decode layouts of all 32 bits.
    let scoped = reg.profiled() || c.present.is_some();
    let named = |o: OwnerId| a.recognized.iter().any(|r| r.owner == o) || is_writer(o);
    let candidates: Vec<OwnerId> = reg
        .entries()
        .filter(|(id, o)| eligible(*id) && candidate(o, o.mask, changed, scoped, named(*id)))
        .map(|(id, _)| id)
        .collect();
    for id in &candidates {
        split(reg, *id, c, changed, &mut a.owners);
    }
    if let Some((old, new)) = c.ct.filter(|(o, n)| o != n) {
        let ct_changed = old ^ new;
        for (id, o) in reg.entries().filter(|(id, _)| eligible(*id)) {
            let Some(m) = o
                .ct_mask
                .filter(|&m| candidate(o, m, ct_changed, scoped, named(id)))
            else {
                continue;
            };
            a.owners.push(OwnerChange {
                owner: id,
                bits: Mark(ct_changed & m),
                field: Some(FieldRef::Conntrack),
                old_value: FieldValue::Bits(Mark(old & m)),
                new_value: FieldValue::Bits(Mark(new & m)),
                meaning: None,
            });
        }
    }
    let claimed = candidates.iter().fold(0, |acc, o| acc | reg.owner(*o).mask);
    let unowned = changed & !claimed;
    a.unowned_bits = (unowned != 0).then_some(Mark(unowned));
    a.warnings = warnings(reg, c, writer, &candidates, unowned);
    a
}

/// Other owners (by name: versions of the writer are the writer) holding changed bits. One
/// entry per other owner: of its versions, the one holding the most changed bits.
fn others(reg: &Registry, w: OwnerId, candidates: &[OwnerId], changed: u32) -> Vec<(OwnerId, u32)> {
    let name = |o: OwnerId| reg.name_of(o);
    let mut all: Vec<(OwnerId, u32)> = candidates
        .iter()
        .map(|o| (*o, reg.owner(*o).mask & changed))
        .filter(|(o, bits)| name(*o) != name(w) && *bits != 0)
        .collect();
    all.sort_by_key(|(_, bits)| std::cmp::Reverse(bits.count_ones()));
    let mut v: Vec<(OwnerId, u32)> = Vec::new();
    for (o, bits) in all {
        if !v.iter().any(|(x, b)| name(*x) == name(o) && bits & !b == 0) {
            v.push((o, bits));
        }
    }
    v
}

/// A whole-mark writer over other owners: the bits it wiped and the bits its value sets.
fn whole_writer_warnings(
    reg: &Registry,
    w: OwnerId,
    c: &Transition,
    candidates: &[OwnerId],
) -> Vec<Warning> {
    let changed = c.old ^ c.new;
    let (cleared, set) = (c.old & !c.new, c.new & changed);
    let mut out = Vec::new();
    for (victim, _) in others(reg, w, candidates, changed) {
        let o = reg.owner(victim);
        let owners = vec![reg.name_of(w), reg.name_of(victim)];
        if o.mask & cleared != 0 {
            out.push(Warning {
                finding: Finding::WholeOverwrite {
                    writer: w,
                    old: Mark(c.old),
                    new: Mark(c.new),
                    victim,
                    lost: Mark(o.mask & cleared),
                },
                owners: owners.clone(),
            });
        }
        if o.mask & set != 0 {
            let bits = o.mask & set;
            out.push(Warning {
                finding: Finding::ValueSetsForeignBits {
                    writer: w,
                    value: Mark(c.new),
                    bits: Mark(bits),
                    victim,
                    meanings: meanings(o, bits),
                },
                owners,
            });
        }
    }
    out
}

/// A bitwise writer that changed bits other owners also own.
fn bitwise_writer_warnings(
    reg: &Registry,
    w: OwnerId,
    c: &Transition,
    candidates: &[OwnerId],
) -> Vec<Warning> {
    let changed = c.old ^ c.new;
    let cleared = c.old & !c.new;
    others(reg, w, candidates, changed)
        .into_iter()
        .map(|(victim, bits)| Warning {
            finding: Finding::Clobber {
                writer: w,
                cleared: bits & cleared == bits,
                bits: Mark(bits),
                victim,
                meanings: meanings(reg.owner(victim), bits),
            },
            owners: vec![reg.name_of(w), reg.name_of(victim)],
        })
        .collect()
}

/// No single owner holds every changed bit and no writer is known: one write touched several
/// owners.
fn multi_owner_warning(reg: &Registry, changed: u32, candidates: &[OwnerId]) -> Option<Warning> {
    let mask = |o: &OwnerId| reg.owner(*o).mask;
    if candidates.is_empty() || candidates.iter().any(|o| changed & !mask(o) == 0) {
        return None;
    }
    let mut names: Vec<NameId> = candidates.iter().map(|o| reg.name_of(*o)).collect();
    names.dedup();
    (names.len() > 1).then(|| Warning {
        finding: Finding::MultiOwner {
            parts: candidates
                .iter()
                .map(|o| (*o, Mark(mask(o) & changed)))
                .collect(),
        },
        owners: names,
    })
}

/// Owners that match exact values and now see one of them with foreign bits.
fn exact_match_warnings(reg: &Registry, c: &Transition) -> Vec<Warning> {
    let changed = c.old ^ c.new;
    let mut out = Vec::new();
    for (id, o) in reg
        .entries()
        .filter(|(id, o)| o.reads_exact && c.eligible(reg, *id))
    {
        for (v, meaning) in o.values.iter().filter(|(v, _)| *v != 0) {
            if c.new & v == *v && c.new != *v && (c.old == *v || changed & !v != 0) {
                out.push(Warning {
                    finding: Finding::ExactMatchBroken {
                        owner: id,
                        value: Mark(*v),
                        meaning: meaning.clone(),
                        mark: Mark(c.new),
                    },
                    owners: vec![reg.name_of(id)],
                });
            }
        }
    }
    out
}

fn warnings(
    reg: &Registry,
    c: &Transition,
    writer: Option<OwnerId>,
    candidates: &[OwnerId],
    unowned: u32,
) -> Vec<Warning> {
    let changed = c.old ^ c.new;
    let mut out = match writer.map(|w| (w, reg.owner(w))) {
        Some((w, o))
            if o.style == Style::WholeMark && (changed & !o.mask != 0 || c.new & !o.mask == 0) =>
        {
            whole_writer_warnings(reg, w, c, candidates)
        }
        Some((w, _)) => bitwise_writer_warnings(reg, w, c, candidates),
        None => multi_owner_warning(reg, changed, candidates)
            .into_iter()
            .collect(),
    };
    if reg.profiled() && unowned != 0 {
        out.push(Warning {
            finding: Finding::Unowned {
                bits: Mark(unowned),
            },
            owners: vec![],
        });
    }
    out.extend(exact_match_warnings(reg, c));
    out
}
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        event::attribution::{Totals, WarningKind},
        netstack::{NfHook, NftFamily},
    };

    fn reg() -> Registry {
        Registry::builtin().unwrap()
    }

    fn ch(old: u32, new: u32) -> Transition<'static> {
        Transition {
            old,
            new,
            ..Default::default()
        }
    }

    fn id(family: NftFamily, table: &str, name: &str) -> ChainId {
        ChainId {
            family,
            table: table.into(),
            name: name.into(),
        }
    }

    fn base(family: NftFamily, table: &str, name: &str, priority: i32) -> Chain {
        crate::fixtures::chain(family, table, name, NfHook::Output, priority)
    }

    /// The registry ids (`name@version`) of the owners whose bits changed.
    fn owners_of(reg: &Registry, a: &Attribution) -> Vec<String> {
        a.owners.iter().map(|o| reg.owner(o.owner).id()).collect()
    }

    fn writer_of(reg: &Registry, a: &Attribution) -> Option<String> {
        a.writer.map(|w| reg.owner(w).id())
    }

    fn names<'r>(reg: &'r Registry, w: &Warning) -> Vec<&'r str> {
        w.owners.iter().map(|n| reg.name(*n)).collect()
    }

    fn find(reg: &Registry, id: &str) -> OwnerId {
        reg.find(id).unwrap()
    }

    fn kinds(a: &Attribution) -> Vec<WarningKind> {
        a.warnings.iter().map(Warning::kind).collect()
    }

    #[test]
    fn bitwise_bits_go_to_their_owners() {
        let reg = reg();
        let a = attribute(&reg, &ch(0, 0x4000));
        assert!(
            owners_of(&reg, &a).contains(&"kube-proxy@current".into()),
            "{a:?}"
        );
        let kp = a
            .owners
            .iter()
            .find(|o| o.owner == find(&reg, "kube-proxy@current"))
            .unwrap();
        assert_eq!(kp.meaning.as_deref(), Some("masquerade"));
        assert!(
            !owners_of(&reg, &a).contains(&"cilium".into()),
            "all-32-bit owners only with a profile"
        );
        assert_eq!(a.unowned_bits, None);
    }

    #[test]
    fn whole_values_and_fields_are_decoded() {
        let reg = reg();
        let a = attribute(&reg, &ch(0, 0xca6c));
        assert!(
            a.recognized
                .iter()
                .any(|r| r.owner == find(&reg, "wg-quick") && r.side == Side::New),
            "{a:?}"
        );
        let a = attribute(&reg, &ch(0, 0x539));
        assert!(a
            .recognized
            .iter()
            .any(|r| r.owner == find(&reg, "istio@sidecar-tproxy")));

        let cilium = reg.select(&["cilium".into()]).unwrap();
        let a = attribute(&cilium, &ch(0, 0x0012_0e00));
        let field = |name: &str| {
            a.owners
                .iter()
                .find(|o| o.field == Some(FieldRef::Named(name.into())))
                .unwrap()
        };
        assert_eq!(field("magic").meaning.as_deref(), Some("encrypt"));
        assert_eq!(field("identity").new_value, FieldValue::Number(18));
    }

    #[test]
    fn profile_limits_candidates_and_flags_unowned() {
        let sel = reg().select(&["kube-proxy".into()]).unwrap();
        let a = attribute(&sel, &ch(0, 0x84000));
        assert_eq!(a.unowned_bits, Some(Mark(0x80000)));
        assert!(kinds(&a).contains(&WarningKind::Unowned));
    }

    #[test]
    fn multi_owner_without_a_known_writer() {
        let a = attribute(&reg(), &ch(0, 0x84000));
        assert!(kinds(&a).contains(&WarningKind::MultiOwner), "{a:?}");
    }

    /// iptables-nft: the band holds only "ip nat/OUTPUT"; the owner's name is on the chain it
    /// jumps to that writes the mark.
    #[test]
    fn writer_named_by_the_chain_the_base_chain_jumps_to() {
        let chains = [base(NftFamily::Ip, "nat", "OUTPUT", -100)];
        let below = [id(NftFamily::Ip, "nat", "KUBE-MARK-MASQ")];
        let c = Transition {
            old: 0,
            new: 0x4000,
            chains: &chains,
            ..Default::default()
        };
        assert_eq!(attribute(&reg(), &c).writer, None);
        let reg = reg();
        let a = attribute(
            &reg,
            &Transition {
                mark_writers: &below,
                ..c
            },
        );
        assert_eq!(writer_of(&reg, &a).as_deref(), Some("kube-proxy@current"));
    }

    fn calico_clears_bypass() -> Attribution {
        let chains = [base(NftFamily::Inet, "calico", "cali-POSTROUTING", -150)];
        attribute(
            &reg(),
            &Transition {
                old: 0x80000,
                new: 0,
                chains: &chains,
                ..Default::default()
            },
        )
    }

    /// Collision 1 (mark-owners.md): Tailscale's bypass bit cleared by Calico's entry clear.
    #[test]
    fn calico_clearing_tailscale_bypass_is_a_clobber() {
        let (reg, a) = (reg(), calico_clears_bypass());
        assert_eq!(writer_of(&reg, &a).as_deref(), Some("calico"));
        let w = a
            .warnings
            .iter()
            .find(|w| w.kind() == WarningKind::Clobber)
            .expect("clobber");
        assert_eq!(names(&reg, w), ["calico", "tailscale"]);
        assert_eq!(
            w.finding,
            Finding::Clobber {
                writer: find(&reg, "calico"),
                cleared: true,
                bits: Mark(0x80000),
                victim: find(&reg, "tailscale"),
                meanings: vec!["bypass".into()],
            }
        );
    }

    /// Collision 5: AWS VPC CNI nft restore overwrites Calico eBPF's seen mark.
    #[test]
    fn aws_nft_restore_overwrites_calico_ebpf() {
        let chains = [base(NftFamily::Ip, "aws-cni", "nat-prerouting", -90)];
        let c = Transition {
            old: 0x0100_0000,
            new: 0x80,
            chains: &chains,
            ..Default::default()
        };
        let reg = reg();
        let a = attribute(&reg, &c);
        assert_eq!(
            writer_of(&reg, &a).as_deref(),
            Some("aws-vpc-cni@nftables>=1.23")
        );
        let w = a.warnings.iter().find(|w| {
            w.kind() == WarningKind::WholeOverwrite && names(&reg, w).contains(&"calico-ebpf")
        });
        assert!(w.is_some(), "{:?}", a.warnings);
    }

    /// Collision 7: wg-quick's 0xCA6C (a socket mark) contains kube's 0x4000 and 0x8000.
    #[test]
    fn wg_quick_socket_mark_carries_kube_bits() {
        let sel = reg()
            .select(&["wg-quick".into(), "kube-proxy".into()])
            .unwrap();
        let a = attribute(
            &sel,
            &Transition {
                old: 0,
                new: 0xca6c,
                socket: true,
                ..Default::default()
            },
        );
        assert_eq!(writer_of(&sel, &a).as_deref(), Some("wg-quick"));
        let found = a.warnings.iter().find_map(|w| match &w.finding {
            Finding::ValueSetsForeignBits { bits, meanings, .. } if *bits == Mark(0xc000) => {
                Some(meanings)
            }
            _ => None,
        });
        assert!(
            found.is_some_and(|m| m.iter().any(|m| m == "drop (KUBE-FIREWALL)")),
            "{:?}",
            a.warnings
        );
    }

    /// Owners present on the node, by name (in the built-in registry).
    fn present(names: &[&str]) -> BTreeSet<NameId> {
        let reg = reg();
        let name = |n: &&str| reg.entries().find(|(_, o)| o.name == *n).unwrap().0;
        names.iter().map(|n| reg.name_of(name(n))).collect()
    }

    /// The case: a chain with a name that says nothing assigns wg-quick's whole value
    /// over Tailscale's bypass bit; flagged by what it wrote, with and without a profile.
    #[test]
    fn a_whole_value_over_another_owners_bit_is_flagged_whatever_the_chain_is_called() {
        let chains = [base(NftFamily::Inet, "t", "x", -150)];
        let change = Transition {
            old: 0x80000,
            new: 0xca6c,
            chains: &chains,
            ..Default::default()
        };
        let here = present(&["wg-quick", "tailscale", "kube-proxy"]);
        let profile = reg()
            .select(&["wg-quick".into(), "tailscale".into(), "kube-proxy".into()])
            .unwrap();
        for (registry, c) in [
            // By value alone: the new mark is wg-quick's whole value.
            (reg(), change),
            // The inventory found the rule and its owner (by value, too).
            (
                reg(),
                Transition {
                    written_by: reg().find("wg-quick"),
                    present: Some(&here),
                    ..change
                },
            ),
            (profile, change),
        ] {
            let a = attribute(&registry, &c);
            assert_eq!(
                writer_of(&registry, &a).as_deref(),
                Some("wg-quick"),
                "{a:?}"
            );
            let pairs: Vec<(WarningKind, Vec<&str>)> = a
                .warnings
                .iter()
                .map(|w| (w.kind(), names(&registry, w)))
                .collect();
            assert!(
                pairs.contains(&(WarningKind::WholeOverwrite, vec!["wg-quick", "tailscale"])),
                "{pairs:?}"
            );
            assert!(
                pairs.contains(&(WarningKind::Clobber, vec!["wg-quick", "kube-proxy"])),
                "{pairs:?}"
            );
        }
    }

    /// Without a profile, an owner with nothing on the node is never named: wg-quick's socket
    /// mark on a node running kube-proxy names neither NetworkManager (which also claims
    /// 0xca6c) nor Calico, Antrea…
    #[test]
    fn owners_with_nothing_here_are_not_named() {
        let socket = Transition {
            old: 0,
            new: 0xca6c,
            socket: true,
            ..Default::default()
        };
        let reg = reg();
        let everyone = attribute(&reg, &socket);
        // Every owner named, by name.
        let named = |a: &Attribution| -> BTreeSet<&str> {
            a.owners
                .iter()
                .map(|o| reg.name(reg.name_of(o.owner)))
                .chain(a.recognized.iter().map(|r| reg.name(reg.name_of(r.owner))))
                .chain(a.warnings.iter().flat_map(|w| names(&reg, w)))
                .collect()
        };
        assert!(named(&everyone).contains("networkmanager-wireguard"));
        let here = present(&["kube-proxy"]);
        let a = attribute(
            &reg,
            &Transition {
                present: Some(&here),
                ..socket
            },
        );
        // The writer was just seen writing: it is named; the others only if present.
        assert_eq!(writer_of(&reg, &a).as_deref(), Some("wg-quick"));
        for n in named(&a) {
            assert!(["wg-quick", "kube-proxy"].contains(&n), "{n} named: {a:?}");
        }
        // A change no writer explains, with nobody present: no owner at all.
        let empty = present(&[]);
        let a = attribute(
            &reg,
            &Transition {
                present: Some(&empty),
                ..ch(0, 0x84000)
            },
        );
        assert!(a.owners.is_empty() && a.warnings.is_empty(), "{a:?}");
        assert_eq!(a.unowned_bits, Some(Mark(0x84000)));
    }

    #[test]
    fn exact_match_readers_break_on_foreign_bits() {
        let reg = reg();
        let a = attribute(&reg, &ch(0xca6c, 0xca6c | 0x4000_0000));
        assert!(
            a.warnings.iter().any(
                |w| w.kind() == WarningKind::ExactMatchBroken && names(&reg, w) == ["wg-quick"]
            ),
            "{a:?}"
        );
    }

    #[test]
    fn ct_bits_are_attributed() {
        let c = Transition {
            ct: Some((0, 0x80)),
            ..Default::default()
        };
        let reg = reg();
        let a = attribute(&reg, &c);
        assert!(a
            .owners
            .iter()
            .any(|o| reg.owner(o.owner).name == "aws-vpc-cni"
                && o.field == Some(FieldRef::Conntrack)));
    }

    #[test]
    fn totals_sum_per_pair() {
        let a = calico_clears_bypass();
        let mut t = Totals::new(reg().into());
        t.add(&a, 1);
        t.add(&a, 1);
        let reg = t.registry();
        let owners: BTreeMap<String, u64> =
            t.by_owner().map(|(o, n)| (reg.owner(o).id(), n)).collect();
        assert_eq!(owners.get("tailscale"), Some(&2));
        assert_eq!(owners.get("calico"), Some(&2));
        let warnings: Vec<(WarningKind, Vec<&str>, u64)> = t
            .by_warning()
            .map(|(k, o, n)| (k, o.iter().map(|o| reg.name(*o)).collect(), n))
            .collect();
        assert_eq!(
            warnings,
            [(WarningKind::Clobber, vec!["calico", "tailscale"], 2)]
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::testing::fixed_seed())]
            /// Owner bits plus unowned bits cover exactly the changed bits; nothing panics.
            #[test]
            fn bits_cover_the_change(old: u32, new: u32, profile in proptest::bool::ANY) {
                let r = if profile { reg().select(&["calico".into(), "kube-proxy".into()]).unwrap() } else { reg() };
                let a = attribute(&r, &ch(old, new));
                let covered = a.owners.iter().filter(|o| o.field != Some(FieldRef::Conntrack)).fold(0, |acc, o| acc | o.bits.0)
                    | a.unowned_bits.map_or(0, |m| m.0);
                prop_assert_eq!(covered, old ^ new);
            }
        }
    }
}
