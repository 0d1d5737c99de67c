//! Marks as values: which mark (`MarkKind`), a packet or conntrack mark (`Mark`, 32 bits) and
//! the one value/mask type (`MarkMatch`) every test, match and access of a mark is expressed in.
//! Shown and parsed in hex (every owner documents its bits in hex), decimal accepted on input.
use std::{
    fmt,
    ops::{BitAnd, BitOr, BitXor, Not},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Which mark: the packet's (`skb->mark`, nft `meta mark`, SO_MARK) or its connection's
/// (`nf_conn->mark`, nft `ct mark`, CONNMARK).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum MarkKind {
    Packet,
    #[serde(rename = "ct")]
    Conntrack,
}

impl MarkKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            MarkKind::Packet => "packet mark",
            MarkKind::Conntrack => "ct mark",
        }
    }
}

/// A packet mark (`skb->mark`) or conntrack mark (`nf_conn->mark`).
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Mark(pub(crate) u32);

impl Mark {
    pub(crate) const ZERO: Mark = Mark(0);
    pub(crate) const ALL: Mark = Mark(u32::MAX);

    pub(crate) fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Whether every bit set here is set in `other`.
    pub(crate) fn within(self, other: Mark) -> bool {
        self.0 & !other.0 == 0
    }
}

/// `0x1234` or `4660`: the form every input of marks takes.
pub(crate) fn parse_u32(s: &str) -> Option<u32> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Debug for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mark {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_u32(s)
            .map(Mark)
            .ok_or_else(|| format!("{:?} is not a 32-bit number (use 0x1234 or 4660)", s.trim()))
    }
}

impl Serialize for Mark {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mark {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl BitAnd for Mark {
    type Output = Mark;
    fn bitand(self, o: Mark) -> Mark {
        Mark(self.0 & o.0)
    }
}

impl BitOr for Mark {
    type Output = Mark;
    fn bitor(self, o: Mark) -> Mark {
        Mark(self.0 | o.0)
    }
}

impl BitXor for Mark {
    type Output = Mark;
    fn bitxor(self, o: Mark) -> Mark {
        Mark(self.0 ^ o.0)
    }
}

impl Not for Mark {
    type Output = Mark;
    fn not(self) -> Mark {
        Mark(!self.0)
    }
}

/// `VALUE/MASK`: a mark matches when `mark & mask == value` (no mask: all 32 bits), or when it
/// does not if `negated` (`meta mark != V`, `-m mark ! --mark V`). A write's bits are one too:
/// after it, `mark & mask == value` for the bits it sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct MarkMatch {
    pub(crate) value: Mark,
    pub(crate) mask: Mark,
    pub(crate) negated: bool,
}

impl MarkMatch {
    /// `value` under `mask` (bits of `value` outside the mask dropped, as the kernel compares).
    pub(crate) fn new(value: Mark, mask: Mark) -> Self {
        MarkMatch {
            value: value & mask,
            mask,
            negated: false,
        }
    }

    /// The opposite test.
    pub(crate) fn negate(self, negated: bool) -> Self {
        MarkMatch {
            negated: self.negated != negated,
            ..self
        }
    }

    pub(crate) fn is_exact(&self) -> bool {
        self.mask == Mark::ALL
    }

    pub(crate) fn matches(&self, mark: Mark) -> bool {
        (mark & self.mask == self.value) != self.negated
    }

    /// As a rule's test reads: `mark & 0x8000 == 0x8000`, `mark != 0x1` (exact).
    pub(crate) fn as_test(&self) -> impl fmt::Display + '_ {
        struct Test<'a>(&'a MarkMatch);
        impl fmt::Display for Test<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let m = self.0;
                let op = if m.negated { "!=" } else { "==" };
                if m.is_exact() {
                    write!(f, "mark {op} {}", m.value)
                } else {
                    write!(f, "mark & {} {op} {}", m.mask, m.value)
                }
            }
        }
        Test(self)
    }
}

/// `0x4000/0x4000`, `0x100` (all 32 bits); `!` before a negated one.
impl fmt::Display for MarkMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.negated {
            f.write_str("!")?;
        }
        if self.is_exact() {
            write!(f, "{}", self.value)
        } else {
            write!(f, "{}/{}", self.value, self.mask)
        }
    }
}

impl FromStr for MarkMatch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (value, mask) = match s.split_once('/') {
            Some((v, m)) => (v.parse::<Mark>()?, m.parse::<Mark>()?),
            None => (s.parse::<Mark>()?, Mark::ALL),
        };
        if !value.within(mask) {
            return Err(format!("mark {value} has bits outside its mask {mask}"));
        }
        Ok(MarkMatch {
            value,
            mask,
            negated: false,
        })
    }
}

impl Serialize for MarkMatch {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MarkMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn forms() {
        let m = |s: &str| s.parse::<MarkMatch>();
        assert_eq!(m("0x100").unwrap(), MarkMatch::new(Mark(0x100), Mark::ALL));
        let masked = m("0x4000/0x4000").unwrap();
        assert_eq!((masked.value, masked.mask), (Mark(0x4000), Mark(0x4000)));
        assert_eq!(masked.to_string(), "0x4000/0x4000");
        assert_eq!(m("1337").unwrap().value, Mark(0x539));
        assert!(m("0x100/0xf").is_err());
        assert!(m("zz").is_err());
        assert!(m("0x1ffffffff").is_err());
        assert!(masked.matches(Mark(0x4100)) && !masked.matches(Mark(0x100)));
        assert_eq!(serde_json::to_string(&Mark(0xca6c)).unwrap(), "\"0xca6c\"");
        let not = masked.negate(true);
        assert!(!not.matches(Mark(0x4100)) && not.matches(Mark(0x100)));
        assert_eq!(not.as_test().to_string(), "mark & 0x4000 != 0x4000");
        assert_eq!(
            MarkMatch::new(Mark(1), Mark::ALL).as_test().to_string(),
            "mark == 0x1"
        );
    }

    proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn parsing_never_panics_and_round_trips(s in ".{0,24}", v: u32, m: u32) {
            let _ = s.parse::<MarkMatch>();
            let mm = MarkMatch::new(Mark(v), Mark(m));
            prop_assert_eq!(mm.to_string().parse::<MarkMatch>(), Ok(mm));
        }
    }
}
