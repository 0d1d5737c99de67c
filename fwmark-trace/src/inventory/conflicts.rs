//! Conflicts between owners, from the entries of one namespace (node-wide entries, cgroup
//! programs, take part in every namespace: marks do not cross namespaces, the kernel scrubs
//! them on the way). Four kinds, each naming both owners, the bits, the entries:
//! - `shared-write`: bits written by two owners;
//! - `foreign-reader`: a reader of its owner's bits that another owner writes;
//! - `whole-overwrite`: a write assigning the whole mark over bits another owner reads or
//!   writes bitwise;
//! - `exact-match`: an exact-value reader (`ip rule fwmark V` without a mask) while another
//!   owner writes bits bitwise: any foreign bit breaks the match.
//!
//! Order on the packet path is not considered (an inventory has no path): a conflict says two
//! owners' rules can meet on one packet's mark, not that they do for every packet.
//!
//! A side is an entry's `party` (`Entry::party`): its owner's name, or `unowned` for an entry
//! no owner is found for and for a write attributed by mask alone that sets, clears or flips
//! bits (a guess names nobody). An unowned side conflicts with every owner's entries like an
//! owner would (a whole assignment nobody claims is a `whole-overwrite` of every bit it
//! changes); two unowned sides are not compared (nothing says they are two owners).
use std::collections::BTreeMap;

use serde::Serialize;

use super::model::{hex, Access, Entry, MarkKind, Netns, Scope, UNOWNED};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum ConflictKind {
    SharedWrite,
    ForeignReader,
    WholeOverwrite,
    ExactMatch,
}

impl ConflictKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            ConflictKind::SharedWrite => "shared-write",
            ConflictKind::ForeignReader => "foreign-reader",
            ConflictKind::WholeOverwrite => "whole-overwrite",
            ConflictKind::ExactMatch => "exact-match",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub(crate) struct Conflict {
    pub(crate) kind: ConflictKind,
    pub(crate) mark: MarkKind,
    /// The namespace both sides are in (None: both node-wide).
    pub(crate) netns: Option<Netns>,
    /// shared-write: the two writers (sorted); foreign-reader and exact-match: the reader,
    /// then the writer; whole-overwrite: the whole writer, then the owner losing bits.
    pub(crate) owners: [String; 2],
    #[serde(serialize_with = "hex")]
    pub(crate) bits: u32,
    /// Entry ids of both sides.
    pub(crate) entries: Vec<usize>,
    /// Entries among them attributed by mask alone whose writes count as unowned here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) guesses: Vec<usize>,
    pub(crate) message: String,
}

/// What one access of `a` against one access of `b` (another owner) gives, if anything.
fn pair(x: &Access, y: &Access) -> Option<(ConflictKind, u32)> {
    if x.mark != y.mark {
        return None;
    }
    let (xs, ys) = (x.scope(), y.scope());
    let hit = |k, bits: u32| (bits != 0).then_some((k, bits));
    if x.is_write() && y.is_write() {
        // Whole × bitwise is the whole writer's (x's) overwrite; two whole writers share all.
        return match (xs, ys) {
            (Some(Scope::Whole), Some(Scope::Whole)) => hit(ConflictKind::SharedWrite, u32::MAX),
            (Some(Scope::Whole), _) => hit(ConflictKind::WholeOverwrite, y.written()),
            (_, Some(Scope::Whole)) => None,
            _ => hit(ConflictKind::SharedWrite, x.written() & y.written()),
        };
    }
    if x.is_exact_read() && y.is_write() {
        return match ys {
            Some(Scope::Bits) => hit(ConflictKind::ExactMatch, y.written()),
            _ => None,
        };
    }
    if x.is_read() && y.is_write() {
        return hit(ConflictKind::ForeignReader, x.mask() & y.written());
    }
    if x.is_write() && xs == Some(Scope::Whole) && y.is_read() {
        return hit(ConflictKind::WholeOverwrite, y.bits());
    }
    None
}

fn message(kind: ConflictKind, mark: MarkKind, owners: &[String; 2], bits: u32) -> String {
    let who = |o: &str| {
        if o == UNOWNED {
            "something unowned".to_owned()
        } else {
            o.to_owned()
        }
    };
    let (a, b) = (who(&owners[0]), who(&owners[1]));
    let m = mark.label();
    match kind {
        ConflictKind::SharedWrite if bits == u32::MAX => {
            format!("{a} and {b} both assign the whole {m}")
        }
        ConflictKind::SharedWrite => format!("{a} and {b} both write {bits:#x} of the {m}"),
        ConflictKind::ForeignReader => {
            format!("{a} reads {bits:#x} of the {m}, which {b} writes")
        }
        ConflictKind::WholeOverwrite => {
            format!("{a} assigns the whole {m}, over {b}'s bits {bits:#x}")
        }
        ConflictKind::ExactMatch => format!(
            "{a} matches whole {m} values, and {b} writes {bits:#x}: a packet carrying them fails the match"
        ),
    }
}

/// Every conflict among `entries`, one per (kind, mark, namespace, owners) with the bits and
/// entries merged.
pub(crate) fn conflicts(entries: &[Entry]) -> Vec<Conflict> {
    type Key = (Option<Netns>, ConflictKind, MarkKind, [String; 2]);
    let mut found: BTreeMap<Key, (u32, Vec<usize>)> = BTreeMap::new();
    for x in entries {
        for y in entries {
            let (ox, oy) = (x.party(), y.party());
            // Different owners (at least one of them known), in one namespace (or one of them
            // everywhere).
            if ox == oy || (x.netns.is_some() && y.netns.is_some() && x.netns != y.netns) {
                continue;
            }
            let netns = x.netns.clone().or_else(|| y.netns.clone());
            for a in &x.access {
                for b in &y.access {
                    let Some((kind, bits)) = pair(a, b) else {
                        continue;
                    };
                    let owners = if kind == ConflictKind::SharedWrite && ox > oy {
                        [oy.to_owned(), ox.to_owned()]
                    } else {
                        [ox.to_owned(), oy.to_owned()]
                    };
                    let slot = found
                        .entry((netns.clone(), kind, a.mark, owners))
                        .or_default();
                    slot.0 |= bits;
                    slot.1.extend([x.id, y.id]);
                }
            }
        }
    }
    found
        .into_iter()
        .map(|((netns, kind, mark, owners), (bits, mut ids))| {
            ids.sort_unstable();
            ids.dedup();
            // Unowned sides that fit an owner's bits: said, so the guess is not lost.
            let guessed: Vec<(usize, &str)> = ids
                .iter()
                .filter_map(|i| entries.iter().find(|e| e.id == *i))
                .filter(|e| e.guessed_writer())
                .filter_map(|e| Some((e.id, e.owner_name()?)))
                .collect();
            let mut message = message(kind, mark, &owners, bits);
            if !guessed.is_empty() {
                let list: Vec<String> = guessed.iter().map(|(i, o)| format!("#{i} {o}")).collect();
                message.push_str(&format!(" (by mask only, not named: {})", list.join(", ")));
            }
            let guesses = guessed.into_iter().map(|(i, _)| i).collect();
            Conflict {
                message,
                kind,
                mark,
                netns,
                owners,
                bits,
                entries: ids,
                guesses,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::bits::Bits;
    use crate::inventory::model::{By, OwnerRef, Place};
    use crate::registry::{NameId, OwnerId};

    fn entry(id: usize, owner: &str, access: Vec<Access>) -> Entry {
        Entry {
            id,
            netns: Some(Netns {
                inode: 1,
                name: "a".into(),
                pod: None,
            }),
            place: Place::Conntrack { entries: 0 },
            text: String::new(),
            access,
            owner: Some(OwnerRef {
                owner: OwnerId::ANY,
                name_id: NameId::ANY,
                id: owner.into(),
                name: owner.into(),
                by: By::Name,
                guess: false,
                also: vec![],
            }),
            names: vec![],
        }
    }

    /// An entry attributed by mask alone (a guess) to `owner`, or to nobody.
    fn guessed(id: usize, owner: Option<&str>, access: Vec<Access>) -> Entry {
        let mut e = entry(id, "x", access);
        e.owner = owner.map(|o| OwnerRef {
            owner: OwnerId::ANY,
            name_id: NameId::ANY,
            id: o.into(),
            name: o.into(),
            by: By::Mask,
            guess: true,
            also: vec![],
        });
        e
    }

    fn w(b: Bits) -> Access {
        b.write(MarkKind::Packet).unwrap()
    }

    fn kinds(c: &[Conflict]) -> Vec<(ConflictKind, [&str; 2], u32)> {
        c.iter()
            .map(|c| (c.kind, [c.owners[0].as_str(), c.owners[1].as_str()], c.bits))
            .collect()
    }

    #[test]
    fn the_demo_collisions() {
        let read = |v, m| Access::read(MarkKind::Packet, v, m, false);
        let e = [
            entry(0, "kube-proxy", vec![w(Bits::same().or(0x4000))]),
            entry(1, "kube-proxy", vec![read(0x8000, 0x8000)]),
            entry(2, "calico", vec![w(Bits::same().and(0xffe4ffff))]),
            entry(3, "wg-quick", vec![Access::origin(0xca6c)]),
            entry(4, "tailscale", vec![Access::origin(0x80000)]),
        ];
        let c = conflicts(&e);
        assert_eq!(
            kinds(&c),
            vec![
                (ConflictKind::SharedWrite, ["calico", "tailscale"], 0x80000),
                (
                    ConflictKind::SharedWrite,
                    ["kube-proxy", "wg-quick"],
                    0x4000
                ),
                (
                    ConflictKind::ForeignReader,
                    ["kube-proxy", "wg-quick"],
                    0x8000
                ),
            ]
        );
        assert_eq!(c[2].entries, vec![1, 3]);
        assert_eq!(
            c[2].message,
            "kube-proxy reads 0x8000 of the packet mark, which wg-quick writes"
        );
    }

    #[test]
    fn whole_writers_and_exact_readers() {
        let aws = w(Bits::copy_of(MarkKind::Conntrack).and(0x80));
        let e = [
            entry(0, "aws-vpc-cni", vec![aws]),
            entry(1, "calico-ebpf", vec![w(Bits::same().or(0x1000000))]),
            entry(
                2,
                "wg-quick",
                vec![Access::read(MarkKind::Packet, 0xca6c, u32::MAX, true)],
            ),
            entry(3, "istio", vec![w(Bits::constant(0x539))]),
        ];
        let c = conflicts(&e);
        assert!(
            kinds(&c).contains(&(
                ConflictKind::WholeOverwrite,
                ["aws-vpc-cni", "calico-ebpf"],
                0x1000000
            )),
            "{c:#?}"
        );
        assert!(kinds(&c).contains(&(
            ConflictKind::ExactMatch,
            ["wg-quick", "calico-ebpf"],
            0x1000000
        )));
        assert!(kinds(&c).contains(&(
            ConflictKind::SharedWrite,
            ["aws-vpc-cni", "istio"],
            u32::MAX
        )));
        assert!(kinds(&c).contains(&(ConflictKind::WholeOverwrite, ["istio", "wg-quick"], 0xca6c)));
        // Other namespaces do not meet; one owner never conflicts with itself.
        let mut other = entry(5, "calico", vec![w(Bits::same().and(0))]);
        other.netns = Some(Netns {
            inode: 2,
            name: "b".into(),
            pod: None,
        });
        assert!(conflicts(&[entry(0, "x", vec![w(Bits::same().or(1))]), other]).is_empty());
        assert!(conflicts(&[
            entry(0, "x", vec![w(Bits::same().or(1))]),
            entry(1, "x", vec![w(Bits::same().or(1))])
        ])
        .is_empty());
    }

    #[test]
    fn unowned_whole_writers_and_guessed_writers_conflict() {
        let bypass = Access::read(MarkKind::Packet, 0x80000, 0xff0000, false);
        let ts = entry(0, "tailscale", vec![bypass]);
        // `meta mark set 0x1`, nobody's: it writes every bit Tailscale reads.
        let set = guessed(1, None, vec![w(Bits::constant(1))]);
        let c = conflicts(&[ts.clone(), set.clone()]);
        assert_eq!(
            kinds(&c),
            vec![
                (
                    ConflictKind::ForeignReader,
                    ["tailscale", "unowned"],
                    0xff0000
                ),
                (
                    ConflictKind::WholeOverwrite,
                    ["unowned", "tailscale"],
                    0xff0000
                ),
            ]
        );
        assert_eq!(
            c[1].message,
            "something unowned assigns the whole packet mark, over tailscale's bits 0xff0000"
        );
        assert!(c[1].guesses.is_empty());
        // A clear of exactly Tailscale's bypass bit in a table of no name fits Tailscale's
        // bits: a guess, so it is no one's writer and the conflict stays.
        let clear = guessed(2, Some("tailscale"), vec![w(Bits::same().and(0xfff7_ffff))]);
        assert!(clear.guessed_writer() && clear.party() == UNOWNED);
        let c = conflicts(&[ts.clone(), clear.clone()]);
        assert_eq!(
            kinds(&c),
            vec![(
                ConflictKind::ForeignReader,
                ["tailscale", "unowned"],
                0x80000
            )]
        );
        assert_eq!(c[0].guesses, vec![2]);
        assert!(c[0]
            .message
            .ends_with("(by mask only, not named: #2 tailscale)"));
        // A guessed copy of the owner's own bits (Tailscale's restore) keeps the guess.
        let restore = guessed(
            3,
            Some("tailscale"),
            vec![w(Bits::copy_masked(
                MarkKind::Conntrack,
                0xff0000,
                0xff0000,
            ))],
        );
        assert!(!restore.guessed_writer() && restore.party() == "tailscale");
        assert!(conflicts(&[ts.clone(), restore]).is_empty());
        // Two sides nobody claims are not compared.
        assert!(conflicts(&[set, clear]).is_empty());
        // The serialised conflict lists the guesses only when there are some.
        let json = serde_json::to_value(
            &conflicts(&[ts.clone(), guessed(4, None, vec![w(Bits::constant(1))])])[0],
        )
        .unwrap();
        assert!(json.get("guesses").is_none(), "{json}");
    }
}
