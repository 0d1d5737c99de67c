//! Whose entry is it. In order of evidence:
//! 1. **by name**: a table, chain, interface or process name matches an owner's `chains`
//!    patterns (or a process is named after the owner, `tailscaled` → tailscale), or a BPF
//!    program's name its `program:` patterns (`program:cil_from_container`: Cilium's
//!    from-container program, which the kernel keeps as `cil_from_contai`); among the
//!    versions of that owner, the one whose mask holds the entry's bits;
//! 2. **by value**: a value the entry reads or writes is one the owner names (0xca6c →
//!    wg-quick, 0x80000 under 0xff0000 → tailscale), within the owner's bits;
//! 3. **by mask**: the entry's bits fit inside a bitwise owner's mask. A guess (`guess`): a
//!    write it is the only evidence for is no owner's in conflicts (`Entry::party`).
//!
//! Ties go to the owner with the fewest bits (the most specific claim), then to owners whose
//! names appear elsewhere in the same namespace, then to registry order; the others are kept
//! as `also`.
use super::model::{Access, By, Entry, MarkKind, OwnerRef, Scope};
use crate::registry::{Owner, OwnerId, Registry, Style};

/// The owner's bits in `mark` (its `ct_mask` for the conntrack mark, when it has one).
fn mask_of(o: &Owner, mark: MarkKind) -> u32 {
    match mark {
        MarkKind::Conntrack => o.ct_mask.unwrap_or(o.mask),
        MarkKind::Packet => o.mask,
    }
}

/// Whether `o` names value `v` (whole, or in one of its fields).
fn names_value(o: &Owner, v: u32) -> bool {
    v != 0
        && (o.value_name(v).is_some()
            || o.fields.iter().any(|f| {
                crate::registry::lookup(&f.values, v & f.mask).is_some() && v & !f.mask == 0
            }))
}

/// Whether an access lies inside the owner's bits: a whole assignment fits an owner that
/// writes whole values, or a bitwise one whose named value it assigns (Calico eBPF's raw
/// OUTPUT sets exactly 0x3000000); anything else fits when its bits are inside the mask.
fn fits(o: &Owner, a: &Access) -> bool {
    if o.style == Style::WholeMark {
        return true;
    }
    let mask = mask_of(o, a.mark);
    if a.scope() == Some(Scope::Whole) {
        return names_value(o, a.value()) && a.value() & !mask == 0;
    }
    let bits = a.bits();
    bits != 0 && bits & !mask == 0
}

/// Every access of the entry fits the owner.
fn consistent(o: &Owner, e: &Entry) -> bool {
    e.access.iter().all(|a| fits(o, a))
}

/// Names of processes carry this prefix among an entry's names (the rest are table, chain and
/// interface names, matched against the owner's patterns).
pub(crate) const PROCESS: &str = "process:";

/// Names of BPF programs carry this prefix among an entry's names, and the owner's patterns
/// for its programs among its `chains` (`program:cil_to_netdev`, `program:calico_tc*`).
pub(crate) const PROGRAM: &str = "program:";

/// How much of a program's name the kernel keeps (BPF_OBJ_NAME_LEN less the NUL); loaders cut
/// longer names there (`cil_from_container` is listed as `cil_from_contai`).
const PROGRAM_NAME_MAX: usize = 15;

/// Whether a loaded program's name matches a program pattern (`*` = any suffix): the name
/// itself, or, when the kernel cut it, the start of what the pattern names.
fn program_matches(pattern: &str, name: &str) -> bool {
    let cut = name.len() == PROGRAM_NAME_MAX;
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix) || (cut && prefix.starts_with(name)),
        None => name == pattern || (cut && pattern.starts_with(name)),
    }
}

/// Whether `name` (an entry's) points at `o`: a table, chain or interface matching its
/// patterns, a process named after it (`tailscaled` is tailscale's), a BPF program matching
/// its `program:` patterns.
fn named(o: &Owner, name: &str) -> bool {
    if let Some(prog) = name.strip_prefix(PROGRAM) {
        return o
            .chains
            .iter()
            .filter_map(|p| p.strip_prefix(PROGRAM))
            .any(|p| program_matches(p, prog));
    }
    match name.strip_prefix(PROCESS) {
        Some(comm) => o.name.len() >= 4 && comm.starts_with(&o.name),
        None => o.owns_chain(name),
    }
}

/// Score of `o` for an entry; None when nothing points at it. Higher is better.
fn score(o: &Owner, e: &Entry) -> Option<(By, i64)> {
    let specific = -i64::from(o.mask.count_ones());
    let consistent = consistent(o, e);
    let by_name = e.names.iter().any(|n| named(o, n));
    // An entry assigning the whole mark is most like an owner that writes whole values.
    let whole = e.writes().any(|a| a.scope() == Some(Scope::Whole));
    let bonus = if whole && o.style == Style::WholeMark {
        500
    } else {
        0
    };
    if by_name {
        // Versions of one owner share names: the one whose bits hold the entry wins.
        let fit = if consistent { 1000 } else { 0 };
        return Some((By::Name, 3000 + fit + bonus + specific));
    }
    let valued = e.access.iter().any(|a| names_value(o, a.value()));
    if valued && consistent {
        return Some((By::Value, 2000 + bonus + specific));
    }
    if o.style == Style::Bitwise && consistent {
        return Some((By::Mask, 1000 + specific));
    }
    None
}

/// The owner of an entry. `present`: owner names recognised by name elsewhere in the same
/// namespace (they win ties).
pub(crate) fn attribute(reg: &Registry, e: &Entry, present: &[String]) -> Option<OwnerRef> {
    let mut scored: Vec<(OwnerId, &Owner, By, i64)> = reg
        .entries()
        .filter_map(|(id, o)| score(o, e).map(|(by, s)| (id, o, by, s)))
        .collect();
    let here = |o: &Owner| present.contains(&o.name);
    // Stable: registry order breaks the last ties.
    scored.sort_by_key(|(_, o, _, s)| (std::cmp::Reverse(*s), !here(o)));
    let (owner, best, by, top) = *scored.first()?;
    Some(OwnerRef {
        owner,
        name_id: reg.name_of(owner),
        id: best.id(),
        name: best.name.clone(),
        by,
        guess: by == By::Mask,
        also: scored
            .iter()
            .skip(1)
            .filter(|(_, o, _, s)| *s == top && o.name != best.name)
            .map(|(_, o, _, _)| o.id())
            .collect(),
    })
}

/// Owners recognised by name among a namespace's entries (what ties prefer).
pub(crate) fn present_by_name(reg: &Registry, entries: &[Entry]) -> Vec<String> {
    let mut out: Vec<String> = reg
        .owners()
        .iter()
        .filter(|o| entries.iter().any(|e| e.names.iter().any(|n| named(o, n))))
        .map(|o| o.name.clone())
        .collect();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::bits::Bits;
    use crate::inventory::model::Place;

    fn entry(names: &[&str], access: Vec<Access>) -> Entry {
        Entry {
            id: 0,
            netns: None,
            place: Place::Conntrack { entries: 0 },
            text: String::new(),
            access,
            owner: None,
            names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn owner(e: &Entry) -> (String, By) {
        let reg = Registry::builtin().unwrap();
        let o = attribute(&reg, e, &[]).expect("an owner");
        (o.id, o.by)
    }

    #[test]
    fn names_pick_the_version_whose_bits_fit() {
        let or = |v| Bits::same().or(v).write(MarkKind::Packet).unwrap();
        assert_eq!(
            owner(&entry(&["kubelet", "KUBE-MARK-DROP"], vec![or(0x8000)])),
            ("kube-proxy@legacy-kubelet<1.28".into(), By::Name)
        );
        assert_eq!(
            owner(&entry(
                &["kube-proxy", "mark-for-masquerade"],
                vec![or(0x4000)]
            )),
            ("kube-proxy@current".into(), By::Name)
        );
        let clear = Bits::same()
            .and(0xffe4ffff)
            .write(MarkKind::Packet)
            .unwrap();
        assert_eq!(
            owner(&entry(&["calico", "cali-POSTROUTING"], vec![clear])),
            ("calico".into(), By::Name)
        );
        assert_eq!(
            owner(&entry(
                &["process:tailscaled"],
                vec![Access::origin(0x80000)]
            ))
            .0,
            "tailscale"
        );
    }

    #[test]
    fn values_then_masks() {
        assert_eq!(
            owner(&entry(&[], vec![Access::origin(0xca6c)])),
            ("wg-quick".into(), By::Value)
        );
        assert_eq!(
            owner(&entry(&[], vec![Access::origin(0x80000)])),
            ("tailscale".into(), By::Value)
        );
        // 0x539 is Istio's either way; ambient's 0xfff claim is the tighter one.
        assert_eq!(
            owner(&entry(&[], vec![Access::origin(0x539)])).0,
            "istio@ambient"
        );
        let bypass = Access::read(MarkKind::Packet, 0x80000, 0xff0000, false);
        assert_eq!(
            owner(&entry(&[], vec![bypass])),
            ("tailscale".into(), By::Value)
        );
        let masq = Access::read(MarkKind::Packet, 0x4000, 0x4000, false);
        assert_eq!(owner(&entry(&[], vec![masq])).0, "kube-proxy@current");
        // No value named, bits inside kube's 0xc000: by mask, the tightest owner.
        let odd = Access::read(MarkKind::Packet, 0, 0xc000, false);
        assert_eq!(
            owner(&entry(&[], vec![odd])),
            ("kube-proxy@legacy-kubelet<1.28".into(), By::Mask)
        );
        // Calico eBPF's whole 0x3000000 (raw OUTPUT, bypass): its named value.
        let bypass = Bits::constant(0x3000000).write(MarkKind::Packet).unwrap();
        assert_eq!(
            owner(&entry(&[], vec![bypass])),
            ("calico-ebpf".into(), By::Value)
        );
        // Istio's TPROXY rule (whole 0x539) by its chain: the sidecar, which writes whole values.
        let tproxy = Bits::constant(0x539).write(MarkKind::Packet).unwrap();
        assert_eq!(
            owner(&entry(&["mangle", "ISTIO_TPROXY"], vec![tproxy])).0,
            "istio@sidecar-tproxy"
        );
        // Nothing fits: unowned.
        let reg = Registry::builtin().unwrap();
        assert!(attribute(&reg, &entry(&[], vec![Access::origin(0x7000)]), &[]).is_none());
    }

    #[test]
    fn programs_by_their_owners_program_names() {
        let whole = Bits::constant(0x1234_0f85).write(MarkKind::Packet).unwrap();
        // Unnamed, Cilium's identity layout names no value: nobody's.
        let reg = Registry::builtin().unwrap();
        let bare = entry(&["program:test_setmark"], vec![whole]);
        assert!(attribute(&reg, &bare, &[]).is_none());
        // The kernel keeps 15 characters of `cil_from_container`; either form names Cilium.
        for name in ["program:cil_from_contai", "program:cil_to_netdev"] {
            let o = attribute(&reg, &entry(&[name], vec![whole]), &[]).unwrap();
            assert_eq!((o.id.as_str(), o.by, o.guess), ("cilium", By::Name, false));
        }
        // Cut names match only what they are the start of; full names must be whole.
        assert!(attribute(&reg, &entry(&["program:cil_from_cont"], vec![whole]), &[]).is_none());
        assert!(program_matches("cil_to_netdev", "cil_to_netdev"));
        assert!(!program_matches("cil_to_netdev", "cil_to_net"));
        assert!(program_matches("calico_tc*", "calico_tc_skb_a"));
        assert!(program_matches(
            "calico_tc_skb_accepted*",
            "calico_tc_skb_a"
        ));
        // Calico eBPF's tc programs; a program's name is no chain name and a chain's no
        // program's (`calico*` names Calico's tables, not its programs).
        let seen = Bits::same().or(0x100_0000).write(MarkKind::Packet).unwrap();
        assert_eq!(
            owner(&entry(&["program:cali_tc_preambl"], vec![seen])),
            ("calico-ebpf".into(), By::Name)
        );
        let calico = &reg.get("calico")[0];
        assert!(!named(calico, "program:calico_tc_main") && named(calico, "calico"));
        assert!(!named(reg.get("cilium")[0], "cil_from_container"));
    }

    #[test]
    fn a_mask_alone_is_a_guess() {
        let reg = Registry::builtin().unwrap();
        let clear = Bits::same()
            .and(0xfff7_ffff)
            .write(MarkKind::Packet)
            .unwrap();
        let o = attribute(&reg, &entry(&["t", "post"], vec![clear]), &[]).unwrap();
        assert_eq!(
            (o.id.as_str(), o.by, o.guess),
            ("tailscale", By::Mask, true)
        );
        let json = serde_json::to_value(&o).unwrap();
        assert_eq!(json["by"], "mask");
        assert_eq!(json["guess"], true);
        let named = attribute(&reg, &entry(&["ts-forward"], vec![clear]), &[]).unwrap();
        assert!(!named.guess && serde_json::to_value(&named).unwrap().get("guess").is_none());
    }

    #[test]
    fn ties_prefer_owners_present_by_name() {
        let reg = Registry::builtin().unwrap();
        let e = entry(
            &[],
            vec![Access::read(MarkKind::Packet, 0x4000, 0x4000, false)],
        );
        let o = attribute(&reg, &e, &["flannel".into()]).unwrap();
        assert_eq!(o.id, "flannel");
        assert!(o.also.contains(&"kube-proxy@current".to_string()), "{o:?}");
    }
}
