//! One readable line per event.
use crate::events::TraceEvent;

pub fn line(ev: &TraceEvent) -> String {
    let time = ev.time.get(11..26).unwrap_or(&ev.time);
    let mut s = match ev.count {
        // Counted in the kernel: how many packets, and one of them.
        Some(n) => format!(
            "{time} {:>8}× {:<10} e.g. pkt {:#x}",
            n,
            ev.kind.to_uppercase(),
            ev.packet_id
        ),
        None => format!(
            "{time} pkt {:>#14x} {:<10}",
            ev.packet_id,
            ev.kind.to_uppercase()
        ),
    };
    if let Some(r) = &ev.route {
        s += &format!(" table {} mark {} -> {}", r.table, r.flow_mark, r.result);
    } else if ev.mark.old != ev.mark.new || ev.kind == "transition" {
        s += &format!(
            " mark {} -> {} (+{} -{})",
            ev.mark.old, ev.mark.new, ev.mark.set, ev.mark.cleared
        );
    } else {
        s += &format!(" mark {}", ev.mark.new);
    }
    if let Some(ct) = &ev.ct_mark {
        if ct.changed {
            s += &format!(" ct {} -> {}", ct.old, ct.new);
        } else {
            s += &format!(" ct {}", ct.new);
        }
    }
    if let Some(r) = &ev.drop_reason {
        s += &format!(" reason {r}");
    }
    match &ev.segment {
        Some(seg) => s += &format!("\n    in   {}", seg.description),
        None => s += &format!(" at {} {}", ev.at.layer, ev.at.hook.unwrap_or("")),
    }
    if let Some(ifname) = &ev.at.ifname {
        s += &format!(" [{ifname}]");
    }
    if let Some(a) = &ev.attribution {
        let mut who: Vec<String> = a
            .owners
            .iter()
            .map(|o| {
                let what = o
                    .field
                    .as_deref()
                    .map_or(String::new(), |f| format!(" {f}"));
                let meaning = o
                    .meaning
                    .as_deref()
                    .map_or(String::new(), |m| format!(" \"{m}\""));
                format!("{}{what} {}{meaning}", o.owner, o.bits)
            })
            .collect();
        if let Some(u) = &a.unowned_bits {
            who.push(format!("unowned {u}"));
        }
        for r in &a.recognized {
            who.push(format!(
                "{} {} = {} \"{}\"",
                r.side, r.value, r.owner, r.meaning
            ));
        }
        if !who.is_empty() {
            s += &format!("\n    bits {}", who.join("; "));
        }
        if let Some(w) = &a.writer {
            s += &format!(" (written by {w})");
        }
        for w in &a.warnings {
            s += &format!("\n    !! {}: {}", w.kind, w.message);
        }
    }
    if let Some(t) = &ev.tuple {
        s += &format!("\n    flow {}", t.label());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{events::Decoder, pipeline_bench::synthetic, tracking::segment::Topology};

    #[test]
    fn transition_line_shows_values_bits_segment_and_flow() {
        let mut d = Decoder::new(Topology::default(), Default::default());
        let ev = d.decode(&synthetic(1));
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
        let mut d = Decoder::new(Topology::default(), [(12, "NETFILTER_DROP".into())].into());
        let text = line(&d.decode(&synthetic(4)));
        assert!(text.contains("DROP"), "{text}");
        assert!(text.contains("reason NETFILTER_DROP"), "{text}");
    }
}
