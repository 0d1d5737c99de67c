//! Daemons side by side on the clsact back-end: each one's cls_bpf filters carry its identity
//! (its pid, in the filter's handle), so a daemon removes only its own and those of daemons no
//! longer running, never a running one's.

use std::time::Duration;

use fwmark_trace_tests::*;
use serde_json::Value;

/// A lab whose veth-a has a clsact qdisc with a foreign egress filter that sets 0x66: where the
/// clsact back-end attaches (it adds no qdisc), and a change for its observers to see.
fn lab(tag: &str) -> Lab {
    let lab = Lab::new(tag).expect("lab");
    attach_clsact_mark_setter(&lab.a, lab::VETH_A, 0x66);
    lab
}

/// Per packet: counted in the kernel, the datagrams to two ports within one interval would be
/// one record whose exemplar is the first port's.
fn start(lab: &Lab) -> Daemon {
    Daemon::start(&[
        "--netns",
        &lab.a,
        "--tc-observers",
        "clsact",
        "--per-packet",
    ])
}

/// A daemon's observers on veth-a: first and last, ingress and egress.
fn four_filters() -> Vec<String> {
    let mut out: Vec<String> = [
        "egress prio 1 fwm_tc_eg_first",
        "egress prio 65535 fwm_tc_eg_last",
        "ingress prio 1 fwm_tc_in_first",
        "ingress prio 65535 fwm_tc_in_last",
    ]
    .iter()
    .map(|f| format!("{} {f}", lab::VETH_A))
    .collect();
    out.sort();
    out
}

/// The foreign filter's change to 0x66 of the datagrams to `port` is among the events, as the
/// clsact back-end reports it: seen by its last egress observer, after its first.
fn assert_saw_the_filter(events: &[Value], port: u16, who: &str) {
    let tr = marked(events, port, "0x66");
    let e = tr
        .first()
        .unwrap_or_else(|| panic!("{who} saw no transition to port {port}: {events:#?}"));
    assert_eq!(e["at"]["layer"], "tc", "{who}: {e}");
    assert_eq!(e["at"]["position"], "last", "{who}: {e}");
    assert_eq!(e["segment"]["from"]["position"], "first", "{who}: {e}");
    // Only the foreign filter between: the other daemon's observers are not programs there.
    let programs = e["segment"]["programs"].as_array().map_or(0, Vec::len);
    assert_eq!(programs, 1, "{who}: {e}");
}

fn saw(events: &[Value], port: u16) -> bool {
    !marked(events, port, "0x66").is_empty()
}

/// SIGKILL, and unlike `Daemon::kill` no check that all is released: a filter, and the
/// program in it, stays in the kernel until someone removes it.
fn kill_leaving_filters(mut d: Daemon) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.pid() as i32, libc::SIGKILL) };
    let exited = wait_until(scaled(Duration::from_secs(10)), || d.try_wait().is_some());
    assert!(exited, "fwmark-trace outlived SIGKILL");
}

/// Each filter's handle is the daemon's: its pid in the low 22 bits, the same on all four.
fn assert_handles_name(d: &Daemon) {
    let handles: Vec<u32> = d.ready["tc_filters"]
        .as_array()
        .expect("tc_filters")
        .iter()
        .map(|f| {
            let h = f["handle"]
                .as_str()
                .unwrap_or_else(|| panic!("no handle: {f}"));
            u32::from_str_radix(h.trim_start_matches("0x"), 16).expect("a hex handle")
        })
        .collect();
    assert_eq!(handles.len(), 4, "{}", d.ready);
    assert!(handles.iter().all(|h| *h == handles[0]), "{handles:x?}");
    assert_eq!(handles[0] & 0x3f_ffff, d.pid(), "{handles:x?}");
}

#[test]
fn two_daemons_on_the_clsact_back_end_keep_each_others_filters() {
    let lab = lab("cls2");
    let d1 = start(&lab);
    assert_eq!(filters_of(&lab.a, &d1.ready), four_filters());
    let d2 = start(&lab);
    assert_eq!(
        filters_of(&lab.a, &d1.ready),
        four_filters(),
        "the second daemon took the first one's filters"
    );
    assert_eq!(filters_of(&lab.a, &d2.ready), four_filters());
    assert_handles_name(&d1);
    assert_handles_name(&d2);
    assert_ne!(
        d1.ready["tc_filters"][0]["handle"],
        d2.ready["tc_filters"][0]["handle"]
    );
    send_udp(&lab.a, lab::ADDR_B, 9981, 2, None);
    let ready1 = d1.ready.clone();
    // `stop` checks that the second daemon's filters went with it.
    let e2 = d2.stop_when("the transition", |ev| saw(ev, 9981));
    assert_saw_the_filter(&e2, 9981, "the second daemon");
    assert_eq!(
        filters_of(&lab.a, &ready1),
        four_filters(),
        "stopping the second daemon took the first one's filters"
    );
    // The first still observes.
    send_udp(&lab.a, lab::ADDR_B, 9982, 2, None);
    let e1 = d1.stop_when("both transitions", |ev| saw(ev, 9981) && saw(ev, 9982));
    assert_saw_the_filter(&e1, 9981, "the first daemon");
    assert_saw_the_filter(&e1, 9982, "the first daemon, alone");
}

#[test]
fn a_killed_daemons_filters_are_removed_a_running_ones_are_not() {
    let lab = lab("clsk");
    let running = start(&lab);
    let killed = start(&lab);
    let killed_ready = killed.ready.clone();
    kill_leaving_filters(killed);
    assert_eq!(
        filters_of(&lab.a, &killed_ready),
        four_filters(),
        "a killed daemon's filters stay until someone removes them"
    );
    let next = start(&lab);
    assert_eq!(
        filters_of(&lab.a, &killed_ready),
        Vec::<String>::new(),
        "the killed daemon's filters outlived the next start"
    );
    assert_eq!(
        filters_of(&lab.a, &running.ready),
        four_filters(),
        "the next start took a running daemon's filters"
    );
    assert_eq!(filters_of(&lab.a, &next.ready), four_filters());
    send_udp(&lab.a, lab::ADDR_B, 9983, 2, None);
    let e = next.stop_when("the transition", |ev| saw(ev, 9983));
    assert_saw_the_filter(&e, 9983, "the next daemon");
    let e = running.stop_when("the transition", |ev| saw(ev, 9983));
    assert_saw_the_filter(&e, 9983, "the running daemon");
}
