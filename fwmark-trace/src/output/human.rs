//! One readable line per event (with indented detail lines).
use std::fmt::Write as _;

use crate::{
    attribution::{Attribution, FieldRef},
    event::{EventKind, TraceEvent},
};

pub(crate) fn line(ev: &TraceEvent) -> String {
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
    match &ev.segment {
        Some(seg) => {
            let _ = write!(s, "\n    in   {seg}");
            if let Some(t) = seg.tunnel() {
                let _ = write!(s, " (mark {})", t.fate(m.old.0, m.new.0));
            }
        }
        None => {
            let hook = ev.at.hook.map_or(String::new(), |h| h.to_string());
            let _ = write!(s, " at {} {hook}", ev.at.layer);
        }
    }
    if let Some(ifname) = &ev.at.ifname {
        let _ = write!(s, " [{ifname}]");
    }
    if let Some(a) = &ev.attribution {
        attribution(&mut s, a);
    }
    if let Some(t) = &ev.tuple {
        let _ = write!(s, "\n    flow {t}");
    }
    s
}

/// The `bits` line (owner, field, bits, meaning), the writer and the `!!` warning lines.
fn attribution(s: &mut String, a: &Attribution) {
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
            format!("{}{what} {}{meaning}", o.owner, o.bits)
        })
        .collect();
    if let Some(u) = a.unowned_bits {
        who.push(format!("unowned {u}"));
    }
    for r in &a.recognized {
        who.push(format!(
            "{} {} = {} \"{}\"",
            r.side, r.value, r.owner, r.meaning
        ));
    }
    if !who.is_empty() {
        let _ = write!(s, "\n    bits {}", who.join("; "));
    }
    if let Some(w) = &a.writer {
        let _ = write!(s, " (written by {w})");
    }
    for w in &a.warnings {
        let _ = write!(s, "\n    !! {}: {}", w.kind(), w.finding);
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
        let text = line(&ev);
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
        let text = line(&d.decode(&fixtures::synthetic(4)));
        assert!(text.contains("DROP"), "{text}");
        assert!(text.contains("reason NETFILTER_DROP"), "{text}");
    }
}
