//! One readable line per event (with indented detail lines).
use std::fmt::Write as _;

use super::text::{escape_controls, FindingText};
use crate::{
    attribution::{Attribution, FieldRef},
    event::{EventKind, TraceEvent},
    registry::Registry,
};

/// The event's lines, joined: each line passes through `escape_controls` on its own, so a name
/// (interface, chain, table, program, owner, drop reason) cannot put a control character on the
/// terminal, nor a line break that looks like one of ours.
pub(crate) fn line(ev: &TraceEvent, registry: &Registry) -> String {
    let lines = lines(ev, registry);
    let mut s = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for (i, l) in lines.iter().enumerate() {
        if i > 0 {
            s.push('\n');
        }
        s.push_str(&escape_controls(l));
    }
    s
}

/// The first line, then the indented detail lines, unescaped (owners named by `registry`).
fn lines(ev: &TraceEvent, registry: &Registry) -> Vec<String> {
    let time = ev.time.to_string();
    let time = time.get(11..26).unwrap_or(&time);
    let kind = ev.kind.name().to_uppercase();
    let mut s = match ev.count {
        // Counted in the kernel: how many packets, and one of them.
        Some(n) => format!("{time} {n:>8}× {kind:<10} e.g. pkt {:#x}", ev.packet_id),
        None => format!("{time} pkt {:>#14x} {kind:<10}", ev.packet_id),
    };
    let m = &ev.mark;
    if let Some(r) = &ev.route {
        let _ = write!(s, " table {} mark {} -> {}", r.table, r.flow_mark, r.result);
    } else if m.changed() || ev.kind == EventKind::Transition {
        let _ = write!(
            s,
            " mark {} -> {} (+{} -{})",
            m.old,
            m.new,
            m.set(),
            m.cleared()
        );
    } else {
        let _ = write!(s, " mark {}", m.new);
    }
    if let Some(ct) = &ev.ct_mark {
        if ct.changed {
            let _ = write!(s, " ct {} -> {}", ct.old, ct.new);
        } else {
            let _ = write!(s, " ct {}", ct.new);
        }
    }
    if let Some(r) = &ev.drop_reason {
        let _ = write!(s, " reason {r}");
    }
    let mut lines = vec![s];
    match &ev.segment {
        Some(seg) => {
            let mut l = format!("    in   {seg}");
            if let Some(t) = seg.tunnel() {
                let _ = write!(l, " (mark {})", t.fate(m.old.0, m.new.0));
            }
            lines.push(l);
        }
        None => {
            let hook = ev.at.hook.map_or(String::new(), |h| h.to_string());
            let _ = write!(lines[0], " at {} {hook}", ev.at.layer);
        }
    }
    if let Some(ifname) = &ev.at.ifname {
        if let Some(l) = lines.last_mut() {
            let _ = write!(l, " [{ifname}]");
        }
    }
    if let Some(pod) = &ev.at.pod {
        if let Some(l) = lines.last_mut() {
            let _ = write!(l, " {pod}");
        }
    }
    if let Some(a) = &ev.attribution {
        attribution(&mut lines, a, registry);
    }
    if let Some(t) = &ev.tuple {
        lines.push(format!("    flow {t}"));
    }
    lines
}

/// The `bits` line (owner, field, bits, meaning), the writer and the `!!` warning lines.
fn attribution(lines: &mut Vec<String>, a: &Attribution, reg: &Registry) {
    let mut who: Vec<String> = a
        .owners
        .iter()
        .map(|o| {
            let what = match &o.field {
                Some(FieldRef::Named(f)) => format!(" {f}"),
                Some(FieldRef::Conntrack) => " ct".into(),
                None => String::new(),
            };
            let meaning = o
                .meaning
                .as_deref()
                .map_or(String::new(), |m| format!(" \"{m}\""));
            format!("{}{what} {}{meaning}", reg.owner(o.owner).id(), o.bits)
        })
        .collect();
    if let Some(u) = a.unowned_bits {
        who.push(format!("unowned {u}"));
    }
    for r in &a.recognized {
        who.push(format!(
            "{} {} = {} \"{}\"",
            r.side,
            r.value,
            reg.owner(r.owner).id(),
            r.meaning
        ));
    }
    if !who.is_empty() {
        lines.push(format!("    bits {}", who.join("; ")));
    }
    if let Some(w) = a.writer {
        if let Some(l) = lines.last_mut() {
            let _ = write!(l, " (written by {})", reg.owner(w).id());
        }
    }
    for w in &a.warnings {
        lines.push(format!(
            "    !! {}: {}",
            w.kind(),
            FindingText(&w.finding, reg)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode::Decoder, fixtures};

    #[test]
    fn transition_line_shows_values_bits_segment_and_flow() {
        let mut d = Decoder::new(fixtures::topology(), Default::default());
        let ev = d.decode(&fixtures::synthetic(1));
        let text = line(&ev, &Registry::default());
        assert!(
            text.contains("TRANSITION mark 0x0 -> 0x80000 (+0x80000 -0x0)"),
            "{text}"
        );
        assert!(text.contains("\n    in   netfilter output ipv4"), "{text}");
        assert!(
            text.contains("\n    flow udp 10.77.0.1:40001 -> 10.77.0.2:5201"),
            "{text}"
        );
    }

    #[test]
    fn drop_line_names_the_reason() {
        let mut d = Decoder::new(fixtures::topology(), [(12, "NETFILTER_DROP".into())].into());
        let text = line(&d.decode(&fixtures::synthetic(4)), &Registry::default());
        assert!(text.contains("DROP"), "{text}");
        assert!(text.contains("reason NETFILTER_DROP"), "{text}");
    }

    /// Names from the kernel or the node (an interface, a drop reason) reach the terminal with
    /// their control characters escaped; the line's own structure stays.
    #[test]
    fn control_characters_in_names_are_escaped() {
        let mut d = Decoder::new(
            fixtures::topology(),
            [(12, "EVIL\x1b]0;pwned\x07_DROP".into())].into(),
        );
        let mut ev = d.decode(&fixtures::synthetic(4));
        let mut at = (*ev.at).clone();
        at.ifname = Some("veth\x1b[2J\r0".into());
        ev.at = std::sync::Arc::new(at);
        let text = line(&ev, &Registry::default());
        assert!(
            text.contains("reason EVIL\\x1b]0;pwned\\x07_DROP"),
            "{text}"
        );
        assert!(text.contains("[veth\\x1b[2J\\r0]"), "{text}");
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        // The detail lines are still lines.
        let transition = line(&d.decode(&fixtures::synthetic(1)), &Registry::default());
        assert!(transition.contains("\n    in   "), "{transition}");
    }
}
