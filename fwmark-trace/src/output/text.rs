//! The words: how points, segments and attribution warnings read for a person. Both the
//! human lines and the JSON's `description`/`message` fields come from here.
use std::{borrow::Cow, fmt, fmt::Write as _};

use crate::{
    attribution::Finding,
    place::{Between, Encapsulator, Layer, PointInfo, Segment, Tunnel, TunnelDir},
    registry::Registry,
};

/// `(a, b)` after a value, for the named values it holds; nothing when none.
struct Meanings<'a>(&'a [String]);

impl fmt::Display for Meanings<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " ({})", self.0.join(", "))
        }
    }
}

/// `a, b, c` of anything shown.
pub(crate) fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Its name, or `?` when unknown.
pub(crate) fn or_unknown<T: fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "?".into(), |v| v.to_string())
}

/// A short label for a point: "netfilter output ipv4 prio -149", "tc egress veth0 (first)".
impl fmt::Display for PointInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dev = || {
            self.ifname
                .clone()
                .unwrap_or_else(|| format!("if{}", self.ifindex))
        };
        match self.layer {
            Layer::Netfilter => write!(
                f,
                "netfilter {} {} prio {}",
                or_unknown(self.hook),
                or_unknown(self.family),
                or_unknown(self.priority)
            ),
            Layer::Tc => write!(
                f,
                "tc {} {} ({})",
                or_unknown(self.hook),
                dev(),
                or_unknown(self.position)
            ),
            Layer::Tracepoint => write!(f, "{} {}", or_unknown(self.hook), dev()),
            Layer::Socket => f.write_str("socket (SO_MARK)"),
            Layer::None => f.write_str("before the first observer"),
            other => other.fmt(f),
        }
    }
}

/// The segment's description: where the change happened, in words.
impl fmt::Display for Segment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (from, to) = (&self.from, &self.to);
        match &self.between {
            Between::SocketAndObserver => write!(
                f,
                "between the sending socket (its SO_MARK) and {to}: no observer in between (a writer the plan did not foresee)"
            ),
            Between::Socket => f.write_str("socket: SO_MARK of the sending socket"),
            Between::BeforeFirstObserver => write!(
                f,
                "before the first observer ({to}): the mark was already set"
            ),
            Between::NetnsCrossing { from, to } => write!(
                f,
                "kernel: the packet crossed from netns {from} to {to} (veth/dev_forward_skb scrubs skb->mark)"
            ),
            Between::NdTailroom => f.write_str(
                "kernel: ICMPv6 ND/MLD packet; skb->reserved_tailroom shares storage with skb->mark",
            ),
            Between::Netfilter(band) => {
                let range = band
                    .range
                    .map_or("?".into(), |[a, b]| format!("{a}..{b}"));
                write!(
                    f,
                    "netfilter {} {}, priority {range}",
                    band.hook,
                    or_unknown(band.family)
                )?;
                if !band.chains.is_empty() {
                    write!(f, ": {}", list(&band.chains))?;
                }
                if !band.mark_writers.is_empty() {
                    write!(f, " (marks written in {})", list(&band.mark_writers))?;
                }
                Ok(())
            }
            Between::TcChain { programs, .. } => {
                let chain = if self.tc_filters {
                    "clsact filter"
                } else {
                    "tcx program"
                };
                if programs.is_empty() {
                    write!(f, "{to}: the {chain}s around our observer(s)")
                } else {
                    write!(f, "{to}: {chain}(s) {}", list(programs))
                }
            }
            Between::TcEgressAfterChain {
                from_first,
                programs,
            } => {
                let dev = to.ifname.as_deref().unwrap_or_default();
                if *from_first {
                    let tcx = if programs.is_empty() {
                        String::new()
                    } else {
                        format!("tcx program(s) {}, then ", list(programs))
                    };
                    write!(
                        f,
                        "tc egress {dev}: {tcx}clsact/cls_bpf filters and actions after the tcx chain"
                    )
                } else {
                    write!(
                        f,
                        "tc egress {dev} after the tcx chain: clsact/cls_bpf filters and actions"
                    )
                }
            }
            Between::TcIngressAfterChain => write!(
                f,
                "tc ingress {} after the tcx chain: clsact/cls_bpf filters, netdev ingress hook",
                from.ifname.as_deref().unwrap_or_default()
            ),
            Between::Hooks => write!(
                f,
                "between netfilter hooks ({from} → {to}): routing decision, xfrm, or the stack"
            ),
            Between::Path => write!(f, "between {from} and {to}"),
            Between::Tunnel(t) => t.fmt(f),
            Between::Ovs(p) => {
                write!(
                    f,
                    "Open vSwitch bridge {}: in {}, out {}",
                    p.bridge, p.in_port, p.out_port
                )?;
                if !p.mark_writers.is_empty() {
                    write!(f, " (flows writing pkt_mark: {})", p.mark_writers.join("; "))?;
                }
                Ok(())
            }
        }
    }
}

/// "vxlan0 (vxlan (VNI 42, port 4789)) encapsulated it", "xfrm state spi 0x100 (src … dst …)
/// encapsulated it", with the namespaces when the outer packet lives in another one.
impl fmt::Display for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.by {
            Encapsulator::Device {
                ifindex,
                netns,
                name,
                kind,
            } => {
                let dev = name.clone().unwrap_or_else(|| format!("if{ifindex}"));
                write!(f, "tunnel device {dev} in netns {netns}")?;
                if let Some(k) = kind {
                    write!(f, " ({k})")?;
                }
            }
            Encapsulator::Xfrm { spi, state } => match (state, spi) {
                (Some(sa), _) => write!(f, "xfrm state {sa}")?,
                (None, Some(spi)) => write!(
                    f,
                    "xfrm state spi {spi:#x} (not among this namespace's states)"
                )?,
                (None, None) => f.write_str("xfrm")?,
            },
        }
        f.write_str(match self.dir {
            TunnelDir::Encap => " encapsulated the packet",
            TunnelDir::Decap => " decapsulated the packet",
        })?;
        if let Some((from, to)) = self.crossed {
            write!(
                f,
                "; the outer side is in another netns ({from} → {to}): skb_scrub_packet clears the mark"
            )?;
        }
        Ok(())
    }
}

/// A warning's message, its owners named by the registry.
pub(crate) struct FindingText<'a>(pub(crate) &'a Finding, pub(crate) &'a Registry);

impl fmt::Display for FindingText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = |o: &crate::registry::OwnerId| self.1.owner(*o).id();
        match self.0 {
            Finding::WholeOverwrite {
                writer,
                old,
                new,
                victim,
                lost,
            } => write!(
                f,
                "{} replaced the whole mark ({old} -> {new}): {} lost bits {lost}",
                id(writer),
                id(victim)
            ),
            Finding::ValueSetsForeignBits {
                writer,
                value,
                bits,
                victim,
                meanings,
            } => write!(
                f,
                "{}'s value {value} sets {bits}, which {} owns{}",
                id(writer),
                id(victim),
                Meanings(meanings)
            ),
            Finding::Clobber {
                writer,
                cleared,
                bits,
                victim,
                meanings,
            } => write!(
                f,
                "{} {} {bits}, which {} also owns{}",
                id(writer),
                if *cleared { "cleared" } else { "changed" },
                id(victim),
                Meanings(meanings)
            ),
            Finding::MultiOwner { parts } => write!(
                f,
                "one change touched bits of several owners: {}",
                parts
                    .iter()
                    .map(|(o, bits)| format!("{} {bits}", id(o)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Finding::Unowned { bits } => {
                write!(f, "bits {bits} changed that no selected owner claims")
            }
            Finding::ExactMatchBroken {
                owner,
                value,
                meaning,
                mark,
            } => write!(
                f,
                "{} matches the exact value {value} ({meaning}); the mark is now {mark} with foreign bits {}",
                id(owner),
                *mark & !*value
            ),
        }
    }
}

/// Whether a character must not reach a terminal as it is: the control characters (C0 such as
/// ESC, CR, BEL, and DEL and the C1 controls, which include the one-byte CSI) and the
/// bidirectional-text controls that reorder what is displayed.
fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `s` as text safe for a terminal: control characters written as escapes (`\x1b`, `\r`, `\n`,
/// `\t`, `\u{9b}`), so names from the kernel, the node or a recording (interfaces, chains,
/// tables, programs, owners, drop reasons) cannot move the cursor, retitle the window or
/// rewrite what was printed before. The human output passes every line through it; JSON is
/// escaped by serde.
pub(crate) fn escape_controls(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unprintable) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 && unprintable(c) => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if unprintable(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Text of several lines made safe line by line (`escape_controls`), its line breaks kept:
/// reports (why, inventory, registry) and diagnostics, which hold names from the node.
pub(crate) fn escape_lines(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && unprintable(c)) {
        return Cow::Borrowed(s);
    }
    let lines: Vec<Cow<str>> = s.split('\n').map(escape_controls).collect();
    Cow::Owned(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_their_breaks() {
        assert!(matches!(escape_lines("a\nb ✓\n"), Cow::Borrowed(_)));
        assert_eq!(
            escape_lines("eth\x1b[2J0\n  x\ry\n"),
            "eth\\x1b[2J0\n  x\\ry\n"
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert!(matches!(escape_controls("eth0 ñ ✓"), Cow::Borrowed(_)));
        assert_eq!(
            escape_controls("a\x1b[2Jb\rc\x07d\ne\tf\x7fg\u{9b}h\u{202e}i\0"),
            "a\\x1b[2Jb\\rc\\x07d\\ne\\tf\\x7fg\\u{9b}h\\u{202e}i\\x00"
        );
    }
}
