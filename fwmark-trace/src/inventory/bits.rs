//! What a mark write does to each of the 32 bits, whatever wrote it: nft's `meta mark set
//! meta mark & A ^ B`, iptables' `--set-xmark V/M`, CONNMARK's `--restore-mark --nfmask N
//! --ctmask C`, a BPF program's `(mark & ~M) | V`. Every bit of the result is one of: the old
//! bit kept, the old bit flipped, 1, 0, a bit copied from the other mark, or unknown. From
//! that follow the written mask, the value, and whether the write is whole or bitwise.
use super::model::{Access, MarkKind, Op, Scope};

/// The result of a write, bit by bit (bits in none of the sets are 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Bits {
    pub(crate) keep: u32,
    pub(crate) flip: u32,
    pub(crate) ones: u32,
    /// Copied from `copy_from`.
    pub(crate) copy: u32,
    pub(crate) copy_from: Option<MarkKind>,
    pub(crate) unknown: u32,
}

impl Bits {
    /// A constant.
    pub(crate) fn constant(v: u32) -> Self {
        Bits {
            ones: v,
            ..Default::default()
        }
    }

    /// The written mark itself, unchanged.
    pub(crate) fn same() -> Self {
        Bits {
            keep: u32::MAX,
            ..Default::default()
        }
    }

    /// The other mark, copied whole.
    pub(crate) fn copy_of(from: MarkKind) -> Self {
        Bits {
            copy: u32::MAX,
            copy_from: Some(from),
            ..Default::default()
        }
    }

    /// Nothing known.
    pub(crate) fn unknown() -> Self {
        Bits {
            unknown: u32::MAX,
            ..Default::default()
        }
    }

    /// The value when it is a constant.
    #[cfg(test)]
    pub(crate) fn as_constant(&self) -> Option<u32> {
        (self.keep | self.flip | self.copy | self.unknown == 0).then_some(self.ones)
    }

    fn restrict(self, m: u32) -> Self {
        Bits {
            keep: self.keep & m,
            flip: self.flip & m,
            ones: self.ones & m,
            copy: self.copy & m,
            copy_from: self.copy_from.filter(|_| self.copy & m != 0),
            unknown: self.unknown & m,
        }
    }

    pub(crate) fn and(self, c: u32) -> Self {
        self.restrict(c)
    }

    pub(crate) fn or(self, c: u32) -> Self {
        let mut b = self.restrict(!c);
        b.ones |= c;
        b
    }

    pub(crate) fn xor(self, c: u32) -> Self {
        let zeros = !(self.keep | self.flip | self.ones | self.copy | self.unknown);
        let mut b = self.restrict(!c);
        b.keep |= self.flip & c;
        b.flip |= self.keep & c;
        b.ones |= zeros & c;
        // A flipped copy is not a copy any more.
        b.unknown |= (self.copy | self.unknown) & c;
        b
    }

    /// iptables `MARK --set-xmark V/M` (and TPROXY's `--tproxy-mark V/M`): (mark & ~M) ^ V.
    pub(crate) fn set_xmark(value: u32, mask: u32) -> Self {
        Self::same().and(!mask).xor(value)
    }

    /// iptables `MARK --set-mark V/M`: (mark & ~M) | V.
    pub(crate) fn set_mark(value: u32, mask: u32) -> Self {
        Self::same().and(!mask).or(value)
    }

    /// CONNMARK `--save-mark`/`--restore-mark` with `--nfmask`/`--ctmask`: into the written
    /// mark, (written & ~into_mask) ^ (other & from_mask).
    pub(crate) fn copy_masked(from: MarkKind, into_mask: u32, from_mask: u32) -> Self {
        Bits {
            keep: !into_mask & !from_mask,
            copy: into_mask & from_mask,
            copy_from: Some(from).filter(|_| into_mask & from_mask != 0),
            unknown: !into_mask & from_mask,
            ..Default::default()
        }
    }

    /// The write of this result into `mark`, or None when it changes nothing.
    pub(crate) fn write(&self, mark: MarkKind) -> Option<Access> {
        let changed = !self.keep;
        if changed == 0 {
            return None;
        }
        let whole = self.keep | self.flip == 0;
        let mask = if whole { u32::MAX } else { changed };
        Some(Access::new(
            mark,
            self.ones & mask,
            mask,
            Op::Write {
                scope: if whole { Scope::Whole } else { Scope::Bits },
                toggles: self.flip,
                copies: self.copy,
                copy_from: self.copy_from.filter(|_| self.copy != 0),
                known: self.unknown == 0,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(b: Bits) -> Access {
        b.write(MarkKind::Packet).unwrap()
    }

    #[test]
    fn or_and_xor_are_bitwise() {
        let or = w(Bits::same().or(0x4000));
        assert_eq!(
            (or.value(), or.mask(), or.scope()),
            (0x4000, 0x4000, Some(Scope::Bits))
        );
        let clear = w(Bits::same().and(0xffe4ffff));
        assert_eq!((clear.value(), clear.mask()), (0, 0x1b0000));
        let xor = w(Bits::same().xor(0x4000));
        assert_eq!(xor.mask(), 0x4000);
        assert!(matches!(
            xor.op,
            Op::Write {
                toggles: 0x4000,
                ..
            }
        ));
        // Tailscale's nft form of --set-mark 0x40000/0xff0000.
        let ts = w(Bits::same().and(0xff00ffff).xor(0x40000));
        assert_eq!((ts.value(), ts.mask()), (0x40000, 0xff0000));
        assert!(matches!(ts.op, Op::Write { toggles: 0, .. }));
    }

    #[test]
    fn assignments_are_whole() {
        let aws = Bits::copy_of(MarkKind::Conntrack).and(0x80);
        let a = w(aws);
        assert_eq!(
            (a.value(), a.mask(), a.scope()),
            (0, u32::MAX, Some(Scope::Whole))
        );
        assert!(matches!(
            a.op,
            Op::Write {
                copies: 0x80,
                copy_from: Some(MarkKind::Conntrack),
                ..
            }
        ));
        let istio = w(Bits::constant(0x539));
        assert_eq!(
            (istio.value(), istio.mask(), istio.scope()),
            (0x539, u32::MAX, Some(Scope::Whole))
        );
        assert_eq!(Bits::constant(5).as_constant(), Some(5));
        assert_eq!(Bits::same().as_constant(), None);
        assert_eq!(Bits::same().write(MarkKind::Packet), None);
    }

    #[test]
    fn iptables_semantics() {
        // --set-xmark 0x4000/0x4000 (save's form of --or-mark 0x4000)
        assert_eq!(w(Bits::set_xmark(0x4000, 0x4000)).mask(), 0x4000);
        // --xor-mark 0x4000 = --set-xmark 0x4000/0x0
        let x = w(Bits::set_xmark(0x4000, 0));
        assert_eq!(x.mask(), 0x4000);
        assert!(matches!(
            x.op,
            Op::Write {
                toggles: 0x4000,
                ..
            }
        ));
        // --set-mark 1337 (no mask): whole
        assert_eq!(
            w(Bits::set_mark(1337, u32::MAX)).scope(),
            Some(Scope::Whole)
        );
        // CONNMARK --restore-mark --nfmask 0xff0000 --ctmask 0xff0000: bitwise copy
        let r = w(Bits::copy_masked(MarkKind::Conntrack, 0xff0000, 0xff0000));
        assert_eq!((r.mask(), r.scope()), (0xff0000, Some(Scope::Bits)));
        assert!(matches!(
            r.op,
            Op::Write {
                copies: 0xff0000,
                known: true,
                ..
            }
        ));
        // --restore-mark with the default masks: a whole copy
        let all = w(Bits::copy_masked(MarkKind::Conntrack, u32::MAX, u32::MAX));
        assert_eq!(all.scope(), Some(Scope::Whole));
        // Unequal masks: bits outside nfmask mix both marks.
        let odd = w(Bits::copy_masked(MarkKind::Conntrack, 0xff, 0xffff));
        assert!(matches!(odd.op, Op::Write { known: false, .. }));
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        /// The categories stay disjoint whatever is combined, and a write's value lies inside
        /// its mask.
        #[test]
        fn categories_stay_disjoint(ops in proptest::collection::vec((0u8..3, proptest::prelude::any::<u32>()), 0..8)) {
            let mut b = Bits::same();
            for (op, c) in ops {
                b = match op { 0 => b.and(c), 1 => b.or(c), _ => b.xor(c) };
                let sets = [b.keep, b.flip, b.ones, b.copy, b.unknown];
                for (i, x) in sets.iter().enumerate() {
                    for y in &sets[i + 1..] {
                        proptest::prop_assert_eq!(x & y, 0);
                    }
                }
            }
            if let Some(a) = b.write(MarkKind::Packet) {
                proptest::prop_assert_eq!(a.value() & !a.mask(), 0);
            }
        }
    }
}
