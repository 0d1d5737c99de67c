//! End to end: real nft/iptables rules change marks at known hooks and priorities inside a
//! throwaway namespace, the real daemon traces them, and the JSON events must say exactly what
//! changed, where (hook, family, priority band, chain), and why packets died.

use fwmark_trace_tests::*;
use serde_json::Value;

const RULES: &str = r#"
table inet t {
    chain mangle_out {
        type route hook output priority mangle; policy accept;
        udp dport 9999 meta mark set 0x100
        udp dport 9998 meta mark set 0x8000
        udp dport 9996 meta mark set 0x100
    }
    chain filter_out {
        type filter hook output priority filter; policy accept;
        meta mark & 0x8000 == 0x8000 drop
    }
    chain post {
        type filter hook postrouting priority 0; policy accept;
        udp dport 9999 meta mark set meta mark | 0x4000
    }
}
"#;

fn lab_with_rules(tag: &str) -> Lab {
    let lab = Lab::new(tag).expect("lab");
    lab::nft(&lab.a, RULES).expect("nft rules");
    lab
}

fn first<'a>(evs: &[&'a Value], what: &str) -> &'a Value {
    evs.first()
        .copied()
        .unwrap_or_else(|| panic!("no {what} event"))
}

/// Traces A while it sends two datagrams to B's `port`; the first transition they show.
fn traced_transition(lab: &Lab, port: u16, what: &str) -> Value {
    let d = Daemon::start(&["--netns", &lab.a]);
    send_udp(&lab.a, lab::ADDR_B, port, 2, None);
    let events = d.stop_when(what, |ev| !events_to(ev, "transition", port).is_empty());
    first(&events_to(&events, "transition", port), what).clone()
}

#[test]
fn transitions_carry_hook_band_chain_and_values() {
    let lab = lab_with_rules("tr");
    let d = Daemon::start(&["--netns", &lab.a]);
    send_udp(&lab.a, lab::ADDR_B, 9999, 3, None);
    let events = d.stop();
    let tr = events_to(&events, "transition", 9999);

    let set = first(&marked(&events, 9999, "0x100"), "0x0→0x100");
    assert_eq!(set["mark"]["old"], "0x0");
    assert_eq!(set["mark"]["set"], "0x100");
    let seg = &set["segment"];
    assert_eq!(seg["layer"], "netfilter", "{set}");
    assert_eq!(seg["hook"], "output");
    assert_eq!(seg["family"], "ipv4");
    // Links: the band starts just after conntrack (-200), which bounds a band of its own;
    // fentry/fexit (kernels before 6.4): exactly the chain's priority.
    assert_band(seg, -150, [-199, -149]);
    assert_eq!(seg["chains"], serde_json::json!(["inet t/mangle_out@-150"]));
    assert_eq!(set["tuple"]["proto"], "udp");
    assert_eq!(set["tuple"]["src"], lab::ADDR_A);
    assert_eq!(set["tuple"]["dst"], lab::ADDR_B);

    let or = first(&marked(&events, 9999, "0x4100"), "0x100→0x4100");
    assert_eq!(or["mark"]["old"], "0x100");
    assert_eq!(or["mark"]["set"], "0x4000");
    assert_eq!(or["mark"]["cleared"], "0x0");
    assert_eq!(or["segment"]["hook"], "postrouting");
    assert_band(&or["segment"], 0, [i32::MIN + 1, 1]);
    assert_eq!(
        or["segment"]["chains"],
        serde_json::json!(["inet t/post@0"])
    );
    // Same packet: the second transition follows the first.
    assert!(tr
        .iter()
        .any(|e| e["packet_id"] == or["packet_id"] && e["mark"]["new"] == "0x100"));
    // Only transitions were reported for this flow (no full-path noise).
    assert!(events_to(&events, "observe", 9999).is_empty());
}

/// The segment's band holds `prio`: `links` is the band BPF netfilter links give; the
/// fentry/fexit back-end gives the chain's own priority, [prio, prio + 1].
fn assert_band(seg: &Value, prio: i32, links: [i32; 2]) {
    let range = &seg["priority_range"];
    assert!(
        *range == serde_json::json!(links) || *range == serde_json::json!([prio, prio + 1]),
        "{seg}"
    );
}

#[test]
fn netfilter_drop_reports_reason_and_mark() {
    let lab = lab_with_rules("drop");
    let d = Daemon::start(&["--netns", &lab.a]);
    send_udp(&lab.a, lab::ADDR_B, 9998, 2, None);
    let events = d.stop();
    let drops = events_to(&events, "drop", 9998);
    let drop = first(&drops, "drop");
    assert_eq!(drop["drop_reason"], "NETFILTER_DROP", "{drop}");
    assert_eq!(drop["mark"]["new"], "0x8000");
    // The mark that doomed it was reported being set, in the mangle band, before the drop.
    assert!(events_to(&events, "transition", 9998)
        .iter()
        .any(|e| e["mark"]["new"] == "0x8000" && e["segment"]["hook"] == "output"));
}

#[test]
fn tc_egress_sees_the_mark_set_in_netfilter() {
    let lab = lab_with_rules("tc");
    let d = Daemon::start(&["--netns", &lab.a, "--full-path"]);
    send_udp(&lab.a, lab::ADDR_B, 9996, 2, None);
    // The first datagram waits for ARP: its tc and net_dev_queue come when the reply does.
    let events = d.stop_when("the datagrams at tc and net_dev_queue", |ev| {
        let at = |k: &str, v: &str| {
            ev.iter()
                .any(|e| e["tuple"]["dport"] == 9996 && e["at"][k] == v)
        };
        at("position", "first") && at("position", "last") && at("hook", "net_dev_queue")
    });
    let at_tc: Vec<&Value> = events
        .iter()
        .filter(|e| e["tuple"]["dport"] == 9996 && e["at"]["layer"] == "tc")
        .collect();
    assert!(!at_tc.is_empty(), "no tc observation of the packet");
    for e in &at_tc {
        assert_eq!(e["at"]["hook"], "egress");
        assert_eq!(e["at"]["ifname"], lab::VETH_A);
        assert_eq!(e["mark"]["new"], "0x100", "{e}");
    }
    let positions: Vec<&str> = at_tc
        .iter()
        .filter_map(|e| e["at"]["position"].as_str())
        .collect();
    assert!(
        positions.contains(&"first") && positions.contains(&"last"),
        "{positions:?}"
    );
    // net_dev_queue runs after the tcx chain and still sees it.
    assert!(events.iter().any(|e| e["tuple"]["dport"] == 9996
        && e["at"]["hook"] == "net_dev_queue"
        && e["mark"]["new"] == "0x100"));
}

#[test]
fn iptables_mark_is_seen_in_its_table_band() {
    let lab = Lab::new("ipt").expect("lab");
    lab::exec(
        &lab.a,
        &[
            "iptables",
            "-t",
            "mangle",
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "--dport",
            "9995",
            "-j",
            "MARK",
            "--set-xmark",
            "0x2000/0x2000",
        ],
    )
    .expect("iptables");
    let e = traced_transition(&lab, 9995, "iptables transition");
    assert_eq!(e["mark"]["new"], "0x2000");
    assert_eq!(e["segment"]["hook"], "output");
    let range = e["segment"]["priority_range"].as_array().expect("range");
    let (lo, hi) = (range[0].as_i64().unwrap(), range[1].as_i64().unwrap());
    // The band holds mangle's -150 (fentry/fexit: exactly [-150, -149]).
    assert!(
        lo <= -150 && -150 < hi,
        "mangle priority -150 not inside {range:?}"
    );
}

#[test]
fn ipv6_transitions_are_reported_as_ipv6() {
    let lab = lab_with_rules("v6");
    let d = Daemon::start(&["--netns", &lab.a]);
    send_udp(&lab.a, lab::ADDR6_B, 9999, 2, None);
    let events = d.stop();
    let tr = events_to(&events, "transition", 9999);
    let e = first(&tr, "ipv6 transition");
    assert_eq!(e["segment"]["family"], "ipv6");
    assert_eq!(e["tuple"]["dst"], lab::ADDR6_B);
}

#[test]
fn ipv6_extension_headers_are_skipped_for_the_tuple() {
    let lab = lab_with_rules("v6ext");
    let d = Daemon::start(&["--netns", &lab.a]);
    send_udp6_with_hop_by_hop(&lab.a, lab::ADDR6_B, 9999);
    let events = d.stop();
    // Found by its port: the UDP header was found behind the hop-by-hop header.
    let tr = events_to(&events, "transition", 9999);
    let e = first(&tr, "transition of the packet with a hop-by-hop header");
    assert_eq!(e["tuple"]["proto"], "udp", "{e}");
    assert_eq!(e["tuple"]["dst"], lab::ADDR6_B);
}

#[test]
fn socket_mark_is_attributed_to_so_mark() {
    let lab = Lab::new("sock").expect("lab");
    let d = Daemon::start(&["--netns", &lab.a]);
    send_udp(&lab.a, lab::ADDR_B, 9994, 2, Some(0xCA6C));
    // No rule here: the first observer is net_dev_queue, after ARP for the first datagram.
    let events = d.stop_when("the SO_MARK transition", |ev| {
        !events_to(ev, "transition", 9994).is_empty()
    });
    let tr = events_to(&events, "transition", 9994);
    let e = first(&tr, "SO_MARK transition");
    assert_eq!(e["mark"]["old"], "0x0");
    assert_eq!(e["mark"]["new"], "0xca6c");
    assert_eq!(e["segment"]["layer"], "socket", "{e}");
}

#[test]
fn mark_filter_keeps_only_matching_events() {
    let lab = lab_with_rules("filter");
    let d = Daemon::start(&["--netns", &lab.a, "--mark", "0x4000/0x4000"]);
    send_udp(&lab.a, lab::ADDR_B, 9999, 2, None);
    send_udp(&lab.a, lab::ADDR_B, 9998, 2, None);
    let events = d.stop();
    let evs: Vec<&Value> = events.iter().filter(|e| e["kind"] != "summary").collect();
    assert!(
        !evs.is_empty(),
        "the 0x4000 transition should pass the filter"
    );
    for e in evs {
        let (old, new) = (mark_of(&e["mark"]["old"]), mark_of(&e["mark"]["new"]));
        assert!(old & 0x4000 != 0 || new & 0x4000 != 0, "{e}");
    }
}

/// The ready record names what the daemon attached, all of it there while it traces; after
/// SIGINT and after SIGKILL none of it is left (`stop` and `kill` check each id, and its
/// namespace's tc and nft).
#[test]
fn nothing_stays_attached_after_sigint_or_sigkill() {
    let lab = Lab::new("clean").expect("lab");
    let attached = |d: &Daemon| {
        let (programs, links) = (ids(&d.ready, "programs"), ids(&d.ready, "links"));
        // At least the tracepoints: a program and a link each.
        assert!(
            programs.len() >= 4 && links.len() >= 4,
            "too little attached: {}",
            d.ready
        );
        assert!(
            programs.iter().all(|&id| program_exists(id))
                && links.iter().all(|&id| link_exists(id)),
            "named but not loaded while tracing: {}",
            d.ready
        );
    };
    let d = Daemon::start(&["--netns", &lab.a, "--full-path"]);
    attached(&d);
    let events = d.stop();
    assert_eq!(
        events.last().map(|e| e["kind"].clone()),
        Some(Value::from("summary"))
    );

    let d = Daemon::start(&["--netns", &lab.a, "--full-path"]);
    attached(&d);
    d.kill();
}

#[test]
fn bad_input_gets_one_clear_error_and_nothing_attached() {
    require_root();
    let lab = Lab::new("bad").expect("lab");
    // A port already taken on loopback, for the metrics endpoint.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = busy.local_addr().unwrap().to_string();
    let cases: [(&[&str], &str); 6] = [
        (&["trace", "--mark", "zz"], "not a 32-bit number"),
        (
            &["trace", "--metrics", "localhost"],
            "invalid socket address",
        ),
        (&["trace", "--metrics", &busy], "cannot listen"),
        (&["trace", "--netns", "fwmt-no-such-netns"], "not found"),
        (
            &["trace", "--netns", &lab.a, "--iface", "nosuch0"],
            "interface nosuch0 not found",
        ),
        (&["trace", "--ring-size", "1000"], "power of two"),
    ];
    for (args, expect) in cases {
        // Fails, never ready, nothing left in the namespace it was given.
        let (_, err) = trace_fails(args);
        assert!(err.contains(expect), "{args:?}: {err}");
        assert!(
            err.lines().filter(|l| l.contains("error:")).count() == 1,
            "{args:?}: {err}"
        );
    }
}

#[test]
fn new_interfaces_are_picked_up_and_iface_filter_applies() {
    let lab = lab_with_rules("churn");
    let mut d = Daemon::start(&["--netns", &lab.a, "--full-path"]);
    lab::ip(&lab.a, "link add late0 type veth peer name late1").expect("veth");
    d.wait_for_stderr(
        "tcx observers added on late",
        std::time::Duration::from_secs(10),
    );
    lab::exec(&lab.a, &["ip", "link", "del", "late0"]).expect("del veth");
    d.wait_for_stderr("vanished", std::time::Duration::from_secs(10));
    let events = d.stop();
    assert!(events.iter().any(|e| e["kind"] == "summary"));

    // With --iface only that interface's events are reported: A's datagrams to B go over
    // veth-a, those to itself over lo.
    let d = Daemon::start(&["--netns", &lab.a, "--full-path", "--iface", "lo"]);
    send_udp(&lab.a, lab::ADDR_B, 9999, 2, None);
    send_udp(&lab.a, lab::ADDR_A, 9999, 2, None);
    let on_lo = |e: &Value| e["at"]["ifname"] == "lo" || e["segment"]["from"]["ifname"] == "lo";
    let looped = |e: &Value| e["tuple"]["dst"] == lab::ADDR_A && on_lo(e);
    let events = d.stop_when("the datagrams over lo", |ev| ev.iter().any(looped));
    let evs: Vec<&Value> = events.iter().filter(|e| e["kind"] != "summary").collect();
    assert!(evs.iter().any(|e| looped(e)), "nothing seen on lo: {evs:?}");
    assert!(evs.iter().all(|e| on_lo(e)), "events outside lo: {evs:?}");
}

#[test]
fn count_stops_after_n_events() {
    let lab = lab_with_rules("count");
    let mut d = Daemon::start(&["--netns", &lab.a, "--count", "2"]);
    send_udp(&lab.a, lab::ADDR_B, 9999, 5, None);
    let status = d.wait_exit(std::time::Duration::from_secs(10));
    assert!(status.success(), "--count 2: {status}");
    let events = read_jsonl(&d.output);
    let n = events.iter().filter(|e| e["kind"] != "summary").count();
    assert_eq!(n, 2);
}

#[test]
fn tcx_program_between_observers_is_named() {
    let lab = Lab::new("tcx").expect("lab");
    // Full path: observers on every interface, the program lands between them.
    let mut d = Daemon::start(&["--netns", &lab.a, "--full-path"]);
    let (_link, id) = attach_mark_setter(&lab.a, lab::VETH_A, 0x77);
    // The daemon re-reads tcx chains every second and says what it found.
    d.wait_for_stderr(
        &format!("tcx egress of veth-a runs between our observers: test_setmark (id {id})"),
        std::time::Duration::from_secs(10),
    );
    send_udp(&lab.a, lab::ADDR_B, 9993, 2, None);
    let events = d.stop_when("the tcx transition", |ev| {
        !events_to(ev, "transition", 9993).is_empty()
    });
    let tr = events_to(&events, "transition", 9993);
    let e = first(&tr, "tcx transition");
    assert_eq!(e["mark"]["new"], "0x77");
    assert_eq!(e["segment"]["layer"], "tc", "{e}");
    assert_eq!(e["segment"]["hook"], "egress");
    assert_eq!(
        e["segment"]["programs"],
        serde_json::json!([format!("test_setmark (id {id})")])
    );
    assert_eq!(e["at"]["position"], "last");
}

#[test]
fn tcx_program_added_during_the_run_gets_observers_around_it() {
    let lab = Lab::new("tcxlate").expect("lab");
    let mut d = Daemon::start(&["--netns", &lab.a]);
    let (link, id) = attach_mark_setter(&lab.a, lab::VETH_A, 0x77);
    let program = format!("test_setmark (id {id})");
    d.wait_for_stderr(
        &format!("tcx observers added on veth-a: foreign program {program} on egress"),
        std::time::Duration::from_secs(10),
    );
    send_udp(&lab.a, lab::ADDR_B, 9991, 3, None);
    // Counted transitions are named at the end of their interval: let every packet be reported
    // while the program is still there (the names are those of the chain at the report).
    let reported = d.wait_for(std::time::Duration::from_secs(20), |r| {
        packets(&marked(r, 9991, "0x77")) >= 3
    });
    assert!(
        reported,
        "the 3 packets were not reported while the program ran"
    );
    // Gone again: so are our observers.
    drop(link);
    d.wait_for_stderr(
        "tcx observers removed from veth-a: no foreign tc left",
        std::time::Duration::from_secs(10),
    );
    let events = d.stop();
    let set = marked(&events, 9991, "0x77");
    assert_eq!(
        packets(&set),
        3,
        "every packet's change is counted: {set:#?}"
    );
    for e in &set {
        assert_eq!(e["segment"]["layer"], "tc", "{e}");
        assert_eq!(e["segment"]["hook"], "egress", "{e}");
        assert_eq!(
            e["segment"]["programs"],
            serde_json::json!([program]),
            "{e}"
        );
    }
}

#[test]
fn interfaces_without_tc_get_tcx_observers_only_in_full_path() {
    let lab = Lab::new("place").expect("lab");
    let ours = || {
        tcx_chain(&lab.a, lab::VETH_A)
            .into_iter()
            .filter(|p| p.starts_with("fwm_tc_"))
            .count()
    };
    let d = Daemon::start(&["--netns", &lab.a]);
    assert_eq!(ours(), 0, "tcx observers where no tc program runs");
    let plan = &d.plans()[0];
    assert!(
        plan["observers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["point"] == "tcx"
                && o["detail"]
                    .as_str()
                    .is_some_and(|d| d.starts_with("observers on 0 of 2 interfaces"))),
        "{plan:#}"
    );
    d.stop();
    let d = Daemon::start(&["--netns", &lab.a, "--full-path"]);
    assert_eq!(ours(), 4, "full path: first and last, ingress and egress");
    d.stop();
}

#[test]
fn classic_tc_filter_after_the_tcx_chain_is_named() {
    let lab = Lab::new("clsact").expect("lab");
    attach_clsact_mark_setter(&lab.a, lab::VETH_A, 0x66);
    let e = traced_transition(&lab, 9992, "clsact transition");
    assert_eq!(e["mark"]["new"], "0x66");
    assert_eq!(e["at"]["hook"], "net_dev_queue", "{e}");
    assert_eq!(e["segment"]["layer"], "tc", "{e}");
    assert_eq!(e["segment"]["hook"], "egress");
    assert!(
        e["segment"]["description"]
            .as_str()
            .unwrap()
            .contains("clsact"),
        "{e}"
    );
    // After our last tcx observer: the classic filters, not the tcx chain.
    assert_eq!(e["segment"]["from"]["position"], "last", "{e}");
}

/// Before tcx (forced here, chosen by itself on kernels before 6.6): our cls_bpf filters first
/// and last in the existing clsact qdisc pin the change to the foreign filter between them.
#[test]
fn clsact_back_end_names_the_filter_between_its_observers() {
    let lab = Lab::new("clsf").expect("lab");
    attach_clsact_mark_setter(&lab.a, lab::VETH_A, 0x66);
    let d = Daemon::start(&["--netns", &lab.a, "--tc-observers", "clsact"]);
    // Its filters, first and last in veth-a's egress (and ingress): named by place.
    let filters: Vec<(&Value, &Value, &Value)> = d.ready["tc_filters"]
        .as_array()
        .expect("tc_filters")
        .iter()
        .map(|f| (&f["ifname"], &f["direction"], &f["priority"]))
        .collect();
    for prio in [1, 65535] {
        assert!(
            filters.contains(&(&lab::VETH_A.into(), &"egress".into(), &prio.into())),
            "{}",
            d.ready
        );
    }
    send_udp(&lab.a, lab::ADDR_B, 9991, 2, None);
    // `stop` also checks that the filters went with the daemon.
    let events = d.stop_when("the clsact transition", |ev| {
        !events_to(ev, "transition", 9991).is_empty()
    });
    let tr = events_to(&events, "transition", 9991);
    let e = first(&tr, "clsact back-end transition");
    assert_eq!(e["mark"]["new"], "0x66");
    assert_eq!(e["at"]["layer"], "tc", "{e}");
    assert_eq!(e["at"]["position"], "last", "{e}");
    let seg = &e["segment"];
    assert_eq!(seg["layer"], "tc", "{e}");
    assert_eq!(seg["hook"], "egress", "{e}");
    assert_eq!(seg["from"]["position"], "first", "{e}");
    assert_eq!(seg["programs"].as_array().map_or(0, |p| p.len()), 1, "{e}");
    let description = seg["description"].as_str().unwrap_or_default();
    assert!(description.contains("clsact filter"), "{e}");
}

#[test]
fn ring_overflow_is_counted_and_reported() {
    let lab = lab_with_rules("lost");
    // One page of ring (~39 events) against a burst of thousands of observations.
    let d = Daemon::start(&["--netns", &lab.a, "--full-path", "--ring-size", "4096"]);
    send_udp_burst(&lab.a, lab::ADDR_B, 9999, 3000);
    // `lost` records come once a second.
    let events = d.stop_when("a lost record", |ev| ev.iter().any(|e| e["kind"] == "lost"));
    let summary = events.last().expect("summary");
    assert_eq!(summary["kind"], "summary");
    let lost = summary["lost"].as_u64().unwrap();
    assert!(lost > 0, "a 4 KiB ring should overflow: {summary}");
    let reported: u64 = events
        .iter()
        .filter(|e| e["kind"] == "lost")
        .map(|e| e["lost"].as_u64().unwrap())
        .sum();
    assert!(
        reported > 0 && reported <= lost,
        "lost records {reported} vs summary {lost}"
    );
    // The daemon kept running and delivered events after the overflow.
    assert!(summary["total_events"].as_u64().unwrap() > 0);
}

#[test]
fn followed_flows_are_filtered_in_the_kernel() {
    let lab = lab_with_rules("kfilter");
    // The same one-page ring and burst that overflow above, but only port 9990 is followed:
    // the burst's observations never reach the ring, the followed packets' all do.
    let d = Daemon::start(&["--netns", &lab.a, "--port", "9990", "--ring-size", "4096"]);
    send_udp_burst(&lab.a, lab::ADDR_B, 9999, 3000);
    send_udp(&lab.a, lab::ADDR_B, 9990, 2, None);
    let events = d.stop_when("the followed packets' points", |ev| {
        events_to(ev, "observe", 9990).len() >= 2
    });
    let summary = events.last().expect("summary");
    assert_eq!(summary["lost"], 0, "{summary}");
    let followed = events_to(&events, "observe", 9990);
    assert!(
        followed.len() >= 2,
        "every point of the followed packets: {followed:?}"
    );
    assert!(
        events
            .iter()
            .all(|e| e["tuple"]["dport"] != 9999 && e["tuple"]["sport"] != 9999),
        "unrelated traffic was reported"
    );
}

#[test]
fn conntrack_mark_changes_are_transitions() {
    let lab = Lab::new("ct").expect("lab");
    lab::nft(
        &lab.a,
        "table ip c {\n chain out {\n type filter hook output priority 0; policy accept;\n udp dport 9992 ct mark set 0x42\n }\n}\n",
    )
    .expect("nft");
    let d = Daemon::start(&["--netns", &lab.a]);
    send_udp(&lab.a, lab::ADDR_B, 9992, 1, None);
    let events = d.stop();
    let tr = events_to(&events, "transition", 9992);
    let e = first(&tr, "ct mark transition");
    assert_eq!(e["mark"]["old"], e["mark"]["new"], "skb mark untouched");
    assert_eq!(e["ct_mark"]["old"], "0x0");
    assert_eq!(e["ct_mark"]["new"], "0x42");
    assert_eq!(e["ct_mark"]["changed"], true);
    assert_eq!(e["ct_mark"]["state"], "new");
    assert_eq!(e["segment"]["chains"], serde_json::json!(["ip c/out@0"]));
}

#[test]
fn followed_flow_shows_every_point_and_its_routing_lookups() {
    let lab = Lab::new("flow").expect("lab");
    lab::ip(&lab.a, "rule add fwmark 0x4000/0x4000 lookup 100 pref 1000").unwrap();
    lab::ip(
        &lab.a,
        &format!("route add 10.77.0.0/24 dev {} table 100", lab::VETH_A),
    )
    .unwrap();
    let d = Daemon::start(&["--netns", &lab.a, "--port", "9960", "--proto", "udp"]);
    send_udp(&lab.a, lab::ADDR_B, 9960, 2, Some(0x4000));
    send_udp(&lab.a, lab::ADDR_B, 9961, 2, Some(0x4000));
    let at_tc = |e: &Value| e["kind"] == "observe" && e["at"]["layer"] == "tc";
    let events = d.stop_when("the flow at tc", |ev| {
        events_to(ev, "observe", 9960).into_iter().any(at_tc)
    });
    let evs: Vec<&Value> = events.iter().filter(|e| e["kind"] != "summary").collect();
    assert!(evs.iter().any(|e| at_tc(e)), "every point of the flow");
    assert!(
        evs.iter()
            .all(|e| e["kind"] == "route" || e["tuple"]["dport"] == 9960),
        "unselected events"
    );
    let lookup = evs
        .iter()
        .find(|e| e["kind"] == "route" && e["route"]["table"] == 100)
        .expect("the lookup that chose table 100");
    assert_eq!(lookup["route"]["result"], "ok");
    assert_eq!(lookup["route"]["flow_mark"], "0x4000");
}

#[test]
fn ipv6_routing_lookups_show_the_fwmark_table() {
    let lab = Lab::new("route6").expect("lab");
    lab::ip(
        &lab.a,
        "-6 rule add fwmark 0x4000/0x4000 lookup 100 pref 1000",
    )
    .unwrap();
    lab::ip(
        &lab.a,
        &format!("-6 route add fd77::/64 dev {} table 100", lab::VETH_A),
    )
    .unwrap();
    let d = Daemon::start(&["--netns", &lab.a, "--routes", "--port", "9959"]);
    send_udp(&lab.a, lab::ADDR6_B, 9959, 2, Some(0x4000));
    let events = d.stop();
    let routes: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "route" && e["at"]["family"] == "ipv6")
        .collect();
    let hit = routes
        .iter()
        .find(|e| e["route"]["table"] == 100)
        .unwrap_or_else(|| panic!("no IPv6 lookup in table 100: {routes:?}"));
    assert_eq!(hit["route"]["result"], "ok");
    assert_eq!(hit["route"]["flow_mark"], "0x4000");
    assert_eq!(hit["tuple"]["dst"], lab::ADDR6_B);
}

#[test]
fn chains_added_during_the_run_get_their_band() {
    let lab = Lab::new("late").expect("lab");
    let mut d = Daemon::start(&["--netns", &lab.a]);
    lab::nft(
        &lab.a,
        "table inet late {\n chain out { type filter hook output priority 50; policy accept; udp dport 9958 meta mark set 0x58; }\n}\n",
    )
    .unwrap();
    d.wait_for_plan("with an observer after the new chain", |p| {
        has_site(p, "ipv4", "output", 51)
    });
    send_udp(&lab.a, lab::ADDR_B, 9958, 2, None);
    let events = d.stop();
    let tr = events_to(&events, "transition", 9958);
    let e = first(&tr, "transition by the late chain");
    assert_eq!(
        e["segment"]["chains"],
        serde_json::json!(["inet late/out@50"]),
        "{e}"
    );
    assert_eq!(e["segment"]["priority_range"][1], 51);
}

/// Whether a plan record has a netfilter observer at (family, hook, priority).
fn has_site(plan: &Value, family: &str, hook: &str, priority: i32) -> bool {
    plan["netfilter"].as_array().is_some_and(|sites| {
        sites
            .iter()
            .any(|s| s["family"] == family && s["hook"] == hook && s["priority"] == priority)
    })
}

#[test]
fn metrics_endpoint_serves_the_run_counters() {
    let lab = lab_with_rules("metrics");
    // Port 0: the kernel picks a free one, and the ready record says which.
    let d = Daemon::start(&["--netns", &lab.a, "--metrics", "127.0.0.1:0"]);
    let addr = d.ready["metrics"]
        .as_str()
        .expect("the ready record has the metrics address")
        .to_owned();
    let before = scrape(&addr);
    assert!(
        before.contains("# TYPE fwmark_trace_lost_events counter"),
        "{before}"
    );
    send_udp(&lab.a, lab::ADDR_B, 9999, 3, None); // 0x0 → 0x100 → 0x4100
    send_udp(&lab.a, lab::ADDR_B, 9998, 2, None); // 0x8000, then dropped
                                                  // Counted in the kernel, reported (and so counted here) once per interval.
    let mut body = String::new();
    wait_until(std::time::Duration::from_secs(10), || {
        body = scrape(&addr);
        sample(&body, "fwmark_trace_drops_total{reason=\"NETFILTER_DROP\"}") >= 2
    });
    assert!(
        sample(&body, "fwmark_trace_events_total{kind=\"transition\"}") >= 6,
        "{body}"
    );
    assert!(
        sample(&body, "fwmark_trace_drops_total{reason=\"NETFILTER_DROP\"}") >= 2,
        "{body}"
    );
    // 0x4000 is kube-proxy's masquerade bit in the built-in registry; 0x8000 its legacy drop bit.
    assert!(
        sample(
            &body,
            "fwmark_trace_owner_transitions_total{owner=\"kube-proxy@current\"}"
        ) >= 3,
        "{body}"
    );
    assert_eq!(sample(&body, "fwmark_trace_lost_events_total"), 0, "{body}");
    // No tc program in the lab: no interface needs tc observers.
    assert!(body.contains("\nfwmark_trace_interfaces 0\n"), "{body}");
    // The end-of-run summary carries the same counters.
    let events = d.stop();
    let summary = events
        .iter()
        .find(|e| e["kind"] == "summary")
        .expect("summary");
    assert!(
        summary["drops"]["NETFILTER_DROP"].as_u64().unwrap_or(0) >= 2,
        "{summary}"
    );
    assert!(
        summary["owners"]["kube-proxy@current"]
            .as_u64()
            .unwrap_or(0)
            >= 3,
        "{summary}"
    );
}

#[test]
fn transitions_are_counted_in_the_kernel_and_add_up_to_the_packets_sent() {
    let lab = lab_with_rules("agg");
    let d = Daemon::start(&["--netns", &lab.a, "--interval", "300ms"]);
    send_udp(&lab.a, lab::ADDR_B, 9999, 40, None);
    let events = d.stop();
    // Each distinct transition is a record with a count and an interval, not one per packet.
    for new in ["0x100", "0x4100"] {
        let these = marked(&events, 9999, new);
        assert!(!these.is_empty(), "no transition to {new}");
        assert!(
            these
                .iter()
                .all(|e| e["count"].as_u64().is_some() && e["interval"]["start"].is_string()),
            "{these:#?}"
        );
        assert_eq!(packets(&these), 40, "every packet counted once: {these:#?}");
        assert!(
            these.len() < 40,
            "counted, not reported per packet: {}",
            these.len()
        );
    }
    // The summary counts packets the same way.
    let summary = events.last().unwrap();
    assert!(
        summary["events"]["transition"].as_u64().unwrap() >= 80,
        "{summary}"
    );
}

#[test]
fn per_packet_mode_reports_every_packet() {
    let lab = lab_with_rules("pp");
    let d = Daemon::start(&["--netns", &lab.a, "--per-packet"]);
    send_udp(&lab.a, lab::ADDR_B, 9999, 10, None);
    let events = d.stop();
    let set = marked(&events, 9999, "0x100");
    let ids: std::collections::HashSet<&Value> = set.iter().map(|e| &e["packet_id"]).collect();
    assert_eq!((set.len(), ids.len()), (10, 10), "{set:#?}");
    assert!(set.iter().all(|e| e["count"].is_null()));
}

/// The default plan observes only where a mark can change, and follows the ruleset: a writer
/// added while tracing gets its observers and every packet after that is reported.
#[test]
fn observer_plan_follows_the_ruleset() {
    let lab = Lab::new("plan").expect("lab");
    let mut d = Daemon::start(&["--netns", &lab.a, "--interval", "300ms"]);
    // Nothing writes a mark yet: no netfilter observer at all.
    send_udp(&lab.a, lab::ADDR_B, 9957, 3, None);
    lab::nft(
        &lab.a,
        "table ip late {\n chain post { type filter hook postrouting priority 10; policy accept; udp dport 9957 meta mark set 0x57; }\n}\n",
    )
    .unwrap();
    d.wait_for_plan("with an observer after the new chain", |p| {
        has_site(p, "ipv4", "postrouting", 11)
    });
    send_udp(&lab.a, lab::ADDR_B, 9957, 25, None);
    let (plans, events) = d.stop_with_plans();
    assert!(
        plans.len() >= 2,
        "a plan at start and after the change: {plans:#?}"
    );
    assert_eq!(plans[0]["mode"], "writers");
    assert_eq!(plans[0]["netfilter"], serde_json::json!([]), "{}", plans[0]);
    let last = plans.last().unwrap();
    let sites: Vec<(&Value, &Value)> = last["netfilter"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (&s["hook"], &s["priority"]))
        .collect();
    assert!(
        sites.contains(&(&"postrouting".into(), &11.into())),
        "an observer after the new chain: {last}"
    );
    assert!(
        last["netfilter"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["hook"] == "postrouting"),
        "only the hook that writes: {last}"
    );
    let tr = marked(&events, 9957, "0x57");
    assert_eq!(packets(&tr), 25, "every packet after the re-plan: {tr:#?}");
    let e = tr[0];
    assert_eq!(e["segment"]["layer"], "netfilter", "{e}");
    assert_eq!(
        e["segment"]["chains"],
        serde_json::json!(["ip late/post@10"]),
        "{e}"
    );
}

/// A writer where no observer sits (a classic tc filter on an interface the plan gave no tc
/// observers) is still reported, by the next observer, with a segment that spans the gap.
#[test]
fn a_change_where_no_observer_sits_is_seen_by_the_next_one() {
    let lab = Lab::new("gap").expect("lab");
    let d = Daemon::start(&["--netns", &lab.a, "--interval", "300ms"]);
    // Added after start: until the next refresh nothing observes tc on veth-a.
    attach_clsact_mark_setter(&lab.a, lab::VETH_A, 0x77);
    send_udp(&lab.a, lab::ADDR_B, 9956, 5, None);
    // Seen at net_dev_queue: the first datagram only once ARP is answered.
    let events = d.stop_when("the 5 packets at net_dev_queue", |ev| {
        packets(&marked(ev, 9956, "0x77")) >= 5
    });
    let tr = marked(&events, 9956, "0x77");
    assert_eq!(packets(&tr), 5, "{tr:#?}");
    let e = tr[0];
    assert_eq!(e["at"]["hook"], "net_dev_queue", "{e}");
    assert_ne!(e["segment"]["layer"], "unknown", "{e}");
}

/// Record now, show later: raw per-packet records at ring-buffer speed, decoded and attributed
/// afterwards into the same events the live per-packet output gives.
#[test]
fn recorded_packets_are_shown_later_with_their_segments() {
    let lab = lab_with_rules("rec");
    let rec = Scratch::file("rec", "rec");
    let rec_s = rec.0.display().to_string();
    let d = Daemon::start(&["--netns", &lab.a, "--record", &rec_s]);
    send_udp(&lab.a, lab::ADDR_B, 9999, 12, None);
    let summary = d.stop();
    drop(lab);
    let out = std::process::Command::new(bin())
        .args(["show", &rec_s, "--json"])
        .output()
        .expect("fwmark-trace show");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let set = marked(&shown, 9999, "0x100");
    assert_eq!(set.len(), 12, "one event per packet: {set:#?}");
    let e = set[0];
    assert_eq!(
        e["segment"]["chains"],
        serde_json::json!(["inet t/mangle_out@-150"]),
        "{e}"
    );
    assert_eq!(
        e["segment"]["priority_range"],
        serde_json::json!([-199, -149])
    );
    assert!(e["attribution"].is_object(), "{e}");
    // The live run's summary counted the records it wrote, and lost none.
    let live = summary.last().unwrap();
    assert_eq!(live["lost"], 0, "{live}");
    assert!(live["total_events"].as_u64().unwrap() >= 24, "{live}");
}

/// A drop is reported for a packet whose mark was written on its way (above), not for one
/// nothing marked — unless every drop is asked for.
#[test]
fn drops_of_unmarked_packets_only_with_all_drops() {
    let lab = Lab::new("nodrop").expect("lab");
    // 9955 dropped unmarked; 9954 marked by a rule first, then dropped the same way.
    lab::nft(
        &lab.a,
        "table ip d {\n chain marker { type route hook output priority mangle; policy accept; udp dport 9954 meta mark set 0x1; }\n chain out { type filter hook output priority 0; policy accept; udp dport { 9954, 9955 } drop; }\n}\n",
    )
    .unwrap();
    let d = Daemon::start(&["--netns", &lab.a]);
    send_udp(&lab.a, lab::ADDR_B, 9955, 3, None);
    send_udp(&lab.a, lab::ADDR_B, 9954, 1, None);
    let events = d.stop();
    assert!(events_to(&events, "drop", 9955).is_empty(), "{events:#?}");
    // The marked packet's drop is reported: this run did see the traffic die.
    assert_eq!(packets(&events_to(&events, "drop", 9954)), 1, "{events:#?}");
    let d = Daemon::start(&["--netns", &lab.a, "--all-drops"]);
    send_udp(&lab.a, lab::ADDR_B, 9955, 3, None);
    let events = d.stop();
    let drops = events_to(&events, "drop", 9955);
    assert_eq!(packets(&drops), 3, "{drops:#?}");
    assert_eq!(drops[0]["drop_reason"], "NETFILTER_DROP");
}

/// Scrapers that connect and say nothing cannot take the daemon's descriptors: it serves a few
/// connections at once (the rest wait in the kernel's backlog) and closes idle ones, and a
/// real scrape gets through.
#[test]
fn idle_metrics_connections_do_not_exhaust_the_daemon() {
    let lab = lab_with_rules("metrics-idle");
    let d = Daemon::start(&["--netns", &lab.a, "--metrics", "127.0.0.1:0"]);
    let addr = d.ready["metrics"]
        .as_str()
        .expect("metrics address")
        .to_owned();
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", d.pid())).map_or(0, |d| d.count());
    let before = fds();
    let idle: Vec<std::net::TcpStream> = (0..200)
        .filter_map(|_| {
            let a = addr.parse().ok()?;
            std::net::TcpStream::connect_timeout(&a, std::time::Duration::from_secs(1)).ok()
        })
        .collect();
    assert!(idle.len() >= 100, "only {} connections made", idle.len());
    std::thread::sleep(std::time::Duration::from_millis(500));
    let during = fds();
    assert!(
        during <= before + 16,
        "{} idle connections took {} descriptors ({before} → {during})",
        idle.len(),
        during - before
    );
    // The first ones hold every slot; idle, they are closed after a while and a real scrape
    // gets its turn (the others, gone, are accepted and closed at once).
    let mut idle = idle;
    idle.truncate(8);
    let body = scrape(&addr);
    assert!(body.contains("fwmark_trace_lost_events"), "{body}");
    drop(idle);
    d.stop();
}
