//! Attribution: whose bits a transition changed, what they mean, and whether someone clobbered
//! someone else's. Input: the registry (possibly narrowed to a profile), the old and new mark
//! and conntrack mark, and the nft tables/chains in the segment where the change happened
//! (which name the writer). Output: one `Attribution` per transition.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::Serialize;

use crate::{
    events::hex,
    registry::{lookup, Owner, Registry, Style},
    rendered::Rendered,
};

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Attribution {
    /// The owner whose rules sit where the change happened (from nft table/chain names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writer: Option<String>,
    pub owners: Vec<OwnerChange>,
    /// Changed bits no candidate owner claims (hex, omitted when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unowned_bits: Option<String>,
    /// Whole-mark values recognised in the old or new mark.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recognized: Vec<Recognized>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Warning>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OwnerChange {
    pub owner: String,
    /// Changed bits inside this owner's mask (or field).
    pub bits: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub old_value: String,
    pub new_value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meaning: Option<String>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Recognized {
    pub owner: String,
    pub value: String,
    pub meaning: String,
    /// "old" or "new".
    pub side: &'static str,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Warning {
    /// multi-owner, clobber, whole-overwrite, unowned, exact-match-broken.
    pub kind: &'static str,
    pub message: String,
    pub owners: Vec<String>,
}

/// One transition to attribute.
#[derive(Clone, Copy, Debug, Default)]
pub struct Change<'a> {
    pub old: u32,
    pub new: u32,
    /// Conntrack marks, when a conntrack entry is attached on both sides.
    pub ct: Option<(u32, u32)>,
    /// Labels of the nft chains in the segment ("inet calico/cali-POSTROUTING@-150").
    pub chains: &'a [String],
    /// Regular chains those chains reach that write a mark ("ip mangle/KUBE-MARK-MASQ"): with
    /// iptables-nft the base chain is the table's, the owner's name is on these.
    pub mark_writers: &'a [String],
    /// The mark came from the sending socket (SO_MARK): a recognised value names the writer.
    pub socket: bool,
}

fn field_value(v: u32, mask: u32, number: bool) -> String {
    if number && mask != 0 {
        (v >> mask.trailing_zeros()).to_string()
    } else {
        hex(v)
    }
}

/// Table and chain names of a chain label "family table/chain@prio".
fn chain_names(label: &str) -> impl Iterator<Item = &str> {
    let body = label.split_once(' ').map_or(label, |(_, b)| b);
    let body = body.rsplit_once('@').map_or(body, |(b, _)| b);
    body.split('/')
}

/// Whether an owner is a candidate for these changed bits. An owner of all 32 bits takes part
/// only when a value of theirs is recognised, or it writes here, or a profile selected it and
/// it has a layout to decode (Cilium's fields): otherwise every whole-value owner (wg-quick,
/// Mullvad, …) would claim every change.
fn candidate(o: &Owner, changed: u32, profiled: bool, named: bool) -> bool {
    o.mask & changed != 0 && (o.mask != u32::MAX || named || (profiled && !o.fields.is_empty()))
}

/// " (name, …)" for the named values of `o` that `bits` hold, whole or per field.
fn meanings(o: &Owner, bits: u32) -> String {
    let names: Vec<&str> = lookup(&o.values, bits)
        .into_iter()
        .chain(
            o.fields
                .iter()
                .filter_map(|f| lookup(&f.values, bits & f.mask)),
        )
        .collect();
    if names.is_empty() {
        String::new()
    } else {
        format!(" ({})", names.join(", "))
    }
}

/// Changed bits of one owner, split by field.
fn split(o: &Owner, c: &Change, changed: u32, out: &mut Vec<OwnerChange>) {
    let mine = changed & o.mask;
    let mut rest = mine;
    for f in o.fields.iter().filter(|f| f.mask & mine != 0) {
        rest &= !f.mask;
        out.push(OwnerChange {
            owner: o.id(),
            bits: hex(mine & f.mask),
            field: Some(f.name.clone()),
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
            owner: o.id(),
            bits: hex(rest),
            field: None,
            old_value: hex(c.old & o.mask),
            new_value: hex(c.new & o.mask),
            meaning,
        });
    }
}

pub fn attribute(reg: &Registry, c: &Change) -> Attribution {
    let changed = c.old ^ c.new;
    let mut a = Attribution::default();

    for o in reg.owners.iter().filter(|o| o.style == Style::WholeMark) {
        for (side, v) in [("old", c.old), ("new", c.new)] {
            if let Some(meaning) = o.value_name(v).filter(|_| v != 0) {
                a.recognized.push(Recognized {
                    owner: o.id(),
                    value: hex(v),
                    meaning: meaning.to_owned(),
                    side,
                });
            }
        }
    }
    let mut writers: Vec<&Owner> = reg
        .owners
        .iter()
        .filter(|o| {
            c.chains
                .iter()
                .chain(c.mark_writers)
                .any(|l| chain_names(l).any(|n| o.owns_chain(n)))
        })
        .collect();
    if writers.iter().any(|w| w.name != writers[0].name) {
        // Owners sharing rule names (Calico's iptables and eBPF modes): keep those whose
        // bits the change stayed within.
        writers.retain(|w| changed & !w.mask == 0);
    }
    let writer = match writers.as_slice() {
        [first, rest @ ..] if rest.iter().all(|w| w.name == first.name) => {
            // Several versions match: the one whose bits hold the change, else one that
            // writes whole values.
            writers
                .iter()
                .copied()
                .find(|w| changed & !w.mask == 0)
                .or_else(|| {
                    writers
                        .iter()
                        .copied()
                        .find(|w| w.style == Style::WholeMark)
                })
                .or(Some(*first))
        }
        _ => None,
    };
    let writer = writer.or_else(|| {
        let r = a.recognized.iter().find(|r| c.socket && r.side == "new")?;
        reg.owners.iter().find(|o| o.id() == r.owner)
    });
    a.writer = writer.map(Owner::id);

    let named = |o: &Owner| {
        a.recognized.iter().any(|r| r.owner == o.id()) || writer.is_some_and(|w| w.id() == o.id())
    };
    let candidates: Vec<&Owner> = reg
        .owners
        .iter()
        .filter(|o| candidate(o, changed, reg.profiled, named(o)))
        .collect();
    for o in &candidates {
        split(o, c, changed, &mut a.owners);
    }
    if let Some((old, new)) = c.ct.filter(|(o, n)| o != n) {
        let ct_changed = old ^ new;
        for o in reg.owners.iter() {
            let Some(m) = o.ct_mask.filter(|m| m & ct_changed != 0) else {
                continue;
            };
            if !(m != u32::MAX || named(o) || (reg.profiled && !o.fields.is_empty())) {
                continue;
            }
            a.owners.push(OwnerChange {
                owner: o.id(),
                bits: hex((old ^ new) & m),
                field: Some("ct".into()),
                old_value: hex(old & m),
                new_value: hex(new & m),
                meaning: None,
            });
        }
    }
    let claimed = candidates.iter().fold(0, |acc, o| acc | o.mask);
    let unowned = changed & !claimed;
    a.unowned_bits = (unowned != 0).then(|| hex(unowned));
    a.warnings = warnings(reg, c, changed, writer, &candidates, unowned);
    a
}

fn warnings(
    reg: &Registry,
    c: &Change,
    changed: u32,
    writer: Option<&Owner>,
    candidates: &[&Owner],
    unowned: u32,
) -> Vec<Warning> {
    let mut out = Vec::new();
    let cleared = c.old & !c.new;
    // Other owners (by name: versions of the writer are the writer) holding changed bits.
    // One entry per other owner: of its versions, the one holding the most changed bits.
    let others = |w: &Owner| -> Vec<(&Owner, u32)> {
        let mut all: Vec<(&Owner, u32)> = candidates
            .iter()
            .filter(|o| o.name != w.name && o.mask & changed != 0)
            .map(|o| (*o, o.mask & changed))
            .collect();
        all.sort_by_key(|(_, bits)| std::cmp::Reverse(bits.count_ones()));
        let mut v: Vec<(&Owner, u32)> = Vec::new();
        for (o, bits) in all {
            if !v.iter().any(|(x, b)| x.name == o.name && bits & !b == 0) {
                v.push((o, bits));
            }
        }
        v
    };
    match writer {
        Some(w)
            if w.style == Style::WholeMark && (changed & !w.mask != 0 || c.new & !w.mask == 0) =>
        {
            let set = c.new & changed;
            for (o, _) in others(w) {
                if o.mask & cleared != 0 {
                    out.push(Warning {
                        kind: "whole-overwrite",
                        message: format!(
                            "{} replaced the whole mark ({} -> {}): {} lost bits {}",
                            w.id(),
                            hex(c.old),
                            hex(c.new),
                            o.id(),
                            hex(o.mask & cleared)
                        ),
                        owners: vec![w.name.clone(), o.name.clone()],
                    });
                }
                if o.mask & set != 0 {
                    let bits = o.mask & set;
                    let meaning = meanings(o, bits);
                    out.push(Warning {
                        kind: "clobber",
                        message: format!(
                            "{}'s value {} sets {}, which {} owns{}",
                            w.id(),
                            hex(c.new),
                            hex(bits),
                            o.id(),
                            meaning
                        ),
                        owners: vec![w.name.clone(), o.name.clone()],
                    });
                }
            }
        }
        Some(w) => {
            for (o, bits) in others(w) {
                let verb = if bits & cleared == bits {
                    "cleared"
                } else {
                    "changed"
                };
                out.push(Warning {
                    kind: "clobber",
                    message: format!(
                        "{} {verb} {}, which {} also owns{}",
                        w.id(),
                        hex(bits),
                        o.id(),
                        meanings(o, bits)
                    ),
                    owners: vec![w.name.clone(), o.name.clone()],
                });
            }
        }
        None => {
            // No single owner holds every changed bit: one write touched several owners.
            if !candidates.is_empty() && !candidates.iter().any(|o| changed & !o.mask == 0) {
                let mut names: Vec<String> = candidates.iter().map(|o| o.name.clone()).collect();
                names.dedup();
                if names.len() > 1 {
                    let parts: Vec<String> = candidates
                        .iter()
                        .map(|o| format!("{} {}", o.id(), hex(o.mask & changed)))
                        .collect();
                    out.push(Warning {
                        kind: "multi-owner",
                        message: format!(
                            "one change touched bits of several owners: {}",
                            parts.join(", ")
                        ),
                        owners: names,
                    });
                }
            }
        }
    }
    if reg.profiled && unowned != 0 {
        out.push(Warning {
            kind: "unowned",
            message: format!(
                "bits {} changed that no selected owner claims",
                hex(unowned)
            ),
            owners: vec![],
        });
    }
    for o in reg.owners.iter().filter(|o| o.reads_exact) {
        for (v, meaning) in o.values.iter().filter(|(v, _)| *v != 0) {
            if c.new & v == *v && c.new != *v && (c.old == *v || changed & !v != 0) {
                out.push(Warning {
                    kind: "exact-match-broken",
                    message: format!(
                        "{} matches the exact value {} ({meaning}); the mark is now {} with foreign bits {}",
                        o.id(), hex(*v), hex(c.new), hex(c.new & !v)
                    ),
                    owners: vec![o.name.clone()],
                });
            }
        }
    }
    out
}

/// Counts attributed transitions for the summary and the metrics: per owner, and warnings per
/// (kind, owners). Attributions are shared (`Arc`), so events are counted per attribution (a
/// pointer hash per event) and grouped into the totals when the decoder drops its cache.
#[derive(Debug, Default)]
pub struct AttributionCounts {
    seen: HashMap<*const Rendered<Attribution>, (Arc<Rendered<Attribution>>, u64)>,
    totals: Totals,
}

#[derive(Clone, Debug, Default)]
struct Totals {
    owners: BTreeMap<String, u64>,
    clobbers: BTreeMap<(&'static str, String), u64>,
}

impl Totals {
    fn add(&mut self, a: &Attribution, n: u64) {
        let mut names: Vec<&str> = a.owners.iter().map(|o| o.owner.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            *self.owners.entry(name.to_string()).or_default() += n;
        }
        for w in &a.warnings {
            *self
                .clobbers
                .entry((w.kind, w.owners.join(" × ")))
                .or_default() += n;
        }
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct ClobberCount {
    pub kind: &'static str,
    pub owners: String,
    pub count: u64,
}

impl AttributionCounts {
    /// Counts `packets` packets with attribution `a`.
    pub fn add(&mut self, a: &Arc<Rendered<Attribution>>, packets: u64) {
        self.seen
            .entry(Arc::as_ptr(a))
            .or_insert_with(|| (a.clone(), 0))
            .1 += packets;
    }

    /// Moves the per-attribution counts into the totals (the decoder's cache is being dropped,
    /// so these attributions will not be seen again; this keeps memory bounded).
    pub fn fold(&mut self) {
        for (a, n) in std::mem::take(&mut self.seen).into_values() {
            self.totals.add(&a, n);
        }
    }

    /// Transitions that changed each owner's bits (an owner counted once per transition), and
    /// the warnings per (kind, owners): one pass over the attributions for both.
    pub fn totals(&self) -> (BTreeMap<String, u64>, Vec<ClobberCount>) {
        let mut t = self.totals.clone();
        for (a, n) in self.seen.values() {
            t.add(a, *n);
        }
        let clobbers = t
            .clobbers
            .into_iter()
            .map(|((kind, owners), count)| ClobberCount {
                kind,
                owners,
                count,
            })
            .collect();
        (t.owners, clobbers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg() -> Registry {
        Registry::builtin().unwrap()
    }

    fn ch(old: u32, new: u32) -> Change<'static> {
        Change {
            old,
            new,
            ..Default::default()
        }
    }

    fn owners_of(a: &Attribution) -> Vec<&str> {
        a.owners.iter().map(|o| o.owner.as_str()).collect()
    }

    #[test]
    fn bitwise_bits_go_to_their_owners() {
        let a = attribute(&reg(), &ch(0, 0x4000));
        assert!(owners_of(&a).contains(&"kube-proxy@current"), "{a:?}");
        let kp = a
            .owners
            .iter()
            .find(|o| o.owner == "kube-proxy@current")
            .unwrap();
        assert_eq!(kp.meaning.as_deref(), Some("masquerade"));
        assert!(
            !owners_of(&a).contains(&"cilium"),
            "all-32-bit owners only with a profile"
        );
        assert_eq!(a.unowned_bits, None);
    }

    #[test]
    fn whole_values_and_fields_are_decoded() {
        let a = attribute(&reg(), &ch(0, 0xca6c));
        assert!(
            a.recognized
                .iter()
                .any(|r| r.owner == "wg-quick" && r.side == "new"),
            "{a:?}"
        );
        let a = attribute(&reg(), &ch(0, 0x539));
        assert!(a
            .recognized
            .iter()
            .any(|r| r.owner == "istio@sidecar-tproxy"));

        let cilium = reg().select(&["cilium".into()]).unwrap();
        let a = attribute(&cilium, &ch(0, 0x0012_0e00));
        let magic = a
            .owners
            .iter()
            .find(|o| o.field.as_deref() == Some("magic"))
            .unwrap();
        assert_eq!(magic.meaning.as_deref(), Some("encrypt"));
        let id = a
            .owners
            .iter()
            .find(|o| o.field.as_deref() == Some("identity"))
            .unwrap();
        assert_eq!(id.new_value, "18");
    }

    #[test]
    fn profile_limits_candidates_and_flags_unowned() {
        let sel = reg().select(&["kube-proxy".into()]).unwrap();
        let a = attribute(&sel, &ch(0, 0x84000));
        assert_eq!(a.unowned_bits.as_deref(), Some("0x80000"));
        assert!(a.warnings.iter().any(|w| w.kind == "unowned"));
    }

    #[test]
    fn multi_owner_without_a_known_writer() {
        let a = attribute(&reg(), &ch(0, 0x84000));
        assert!(a.warnings.iter().any(|w| w.kind == "multi-owner"), "{a:?}");
    }

    /// iptables-nft: the band holds only "ip nat/OUTPUT"; the owner's name is on the chain it
    /// jumps to that writes the mark.
    #[test]
    fn writer_named_by_the_chain_the_base_chain_jumps_to() {
        let chains = ["ip nat/OUTPUT@-100".to_string()];
        let below = ["ip nat/KUBE-MARK-MASQ".to_string()];
        let c = Change {
            old: 0,
            new: 0x4000,
            chains: &chains,
            ..Default::default()
        };
        assert_eq!(attribute(&reg(), &c).writer, None);
        let a = attribute(
            &reg(),
            &Change {
                mark_writers: &below,
                ..c
            },
        );
        assert_eq!(a.writer.as_deref(), Some("kube-proxy@current"));
    }

    /// Collision 1 (mark-owners.md): Tailscale's bypass bit cleared by Calico's entry clear.
    #[test]
    fn calico_clearing_tailscale_bypass_is_a_clobber() {
        let chains = ["inet calico/cali-POSTROUTING@-150".to_string()];
        let c = Change {
            old: 0x80000,
            new: 0,
            chains: &chains,
            ..Default::default()
        };
        let a = attribute(&reg(), &c);
        assert_eq!(a.writer.as_deref(), Some("calico"));
        let w = a
            .warnings
            .iter()
            .find(|w| w.kind == "clobber")
            .expect("clobber");
        assert_eq!(w.owners, ["calico", "tailscale"]);
        assert!(
            w.message.contains("cleared 0x80000") && w.message.contains("bypass"),
            "{}",
            w.message
        );
    }

    /// Collision 5: AWS VPC CNI nft restore overwrites Calico eBPF's seen mark.
    #[test]
    fn aws_nft_restore_overwrites_calico_ebpf() {
        let chains = ["ip aws-cni/nat-prerouting@-90".to_string()];
        let c = Change {
            old: 0x0100_0000,
            new: 0x80,
            chains: &chains,
            ..Default::default()
        };
        let a = attribute(&reg(), &c);
        assert_eq!(a.writer.as_deref(), Some("aws-vpc-cni@nftables>=1.23"));
        let w = a
            .warnings
            .iter()
            .find(|w| w.kind == "whole-overwrite" && w.owners.contains(&"calico-ebpf".to_string()));
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
            &Change {
                old: 0,
                new: 0xca6c,
                socket: true,
                ..Default::default()
            },
        );
        assert_eq!(a.writer.as_deref(), Some("wg-quick"));
        let w = a
            .warnings
            .iter()
            .find(|w| w.kind == "clobber" && w.message.contains("sets 0xc000"))
            .expect("clobber");
        assert!(w.message.contains("drop (KUBE-FIREWALL)"), "{}", w.message);
    }

    #[test]
    fn exact_match_readers_break_on_foreign_bits() {
        let a = attribute(&reg(), &ch(0xca6c, 0xca6c | 0x4000_0000));
        assert!(
            a.warnings
                .iter()
                .any(|w| w.kind == "exact-match-broken" && w.owners == ["wg-quick"]),
            "{a:?}"
        );
    }

    #[test]
    fn ct_bits_are_attributed() {
        let c = Change {
            ct: Some((0, 0x80)),
            ..Default::default()
        };
        let a = attribute(&reg(), &c);
        assert!(a
            .owners
            .iter()
            .any(|o| o.owner.starts_with("aws-vpc-cni") && o.field.as_deref() == Some("ct")));
    }

    #[test]
    fn counter_sums_per_pair() {
        let chains = ["inet calico/cali-POSTROUTING@-150".to_string()];
        let a = Rendered::new(attribute(
            &reg(),
            &Change {
                old: 0x80000,
                new: 0,
                chains: &chains,
                ..Default::default()
            },
        ));
        let mut c = AttributionCounts::default();
        c.add(&a, 1);
        c.fold();
        c.add(&a, 1);
        let (owners, clobbers) = c.totals();
        assert_eq!(owners.get("tailscale"), Some(&2));
        assert_eq!(owners.get("calico"), Some(&2));
        assert_eq!(
            clobbers,
            vec![ClobberCount {
                kind: "clobber",
                owners: "calico × tailscale".into(),
                count: 2
            }]
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
                let parse = |s: &str| u32::from_str_radix(s.trim_start_matches("0x"), 16).unwrap();
                let covered = a.owners.iter().filter(|o| o.field.as_deref() != Some("ct")).fold(0, |acc, o| acc | parse(&o.bits))
                    | a.unowned_bits.as_deref().map_or(0, parse);
                prop_assert_eq!(covered, old ^ new);
            }
        }
    }
}
