//! One readable line per event.
use crate::events::TraceEvent;

pub fn line(ev: &TraceEvent) -> String {
    let time = ev.time.get(11..26).unwrap_or(&ev.time);
    let mut s = format!(
        "{time} pkt {:>#14x} {:<10}",
        ev.packet_id,
        ev.kind.to_uppercase()
    );
    if ev.mark.old != ev.mark.new || ev.kind == "transition" {
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
    if let Some(t) = &ev.tuple {
        s += &format!(
            "\n    flow {} {}:{} -> {}:{}",
            t.proto, t.src, t.sport, t.dst, t.dport
        );
    }
    s
}
