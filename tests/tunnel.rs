//! Tunnels: a packet followed from its inner life into the outer packet. VXLAN between two
//! namespaces of a lab, on this host's kernel: the mark a rule set on the inner packet rides on
//! the outer one when the tunnel's socket is in the same namespace (the double-masquerade case,
//! kubernetes/kubernetes#92035), and is scrubbed when the tunnel device was moved into another
//! namespace than its socket (`skb_scrub_packet`, cilium/pwru#194).

use fwmark_trace_tests::*;
use serde_json::Value;

/// `ip link add NAME type vxlan id VNI …` in `ns` over the lab's veth, with `addr` on it.
fn vxlan(ns: &str, name: &str, vni: u32, port: u16, local: &str, remote: &str) {
    lab::ip(
        ns,
        &format!(
            "link add {name} type vxlan id {vni} local {local} remote {remote} dstport {port} dev {}",
            if local == lab::ADDR_A { lab::VETH_A } else { lab::VETH_B }
        ),
    )
    .expect("vxlan device");
}

fn up(ns: &str, name: &str, addr: &str) {
    lab::ip(ns, &format!("addr add {addr}/24 dev {name}")).expect("address");
    lab::ip(ns, &format!("link set {name} up")).expect("link up");
}

/// Marks UDP to `dport` with 0x4000 on output (kube-proxy's masquerade bit).
fn mark_rule(ns: &str, dport: u16) {
    lab::nft(
        ns,
        &format!(
            "table inet kube {{
                chain out {{
                    type route hook output priority mangle; policy accept;
                    udp dport {dport} meta mark set meta mark | 0x4000
                }}
            }}"
        ),
    )
    .expect("nft");
}

fn tunnel_of(ev: &Value) -> &Value {
    &ev["segment"]["tunnel"]
}

#[test]
fn vxlan_keeps_the_inner_mark_on_the_outer_packet_within_a_netns() {
    let lab = Lab::new("vxk").expect("lab");
    vxlan(&lab.a, "vxk0", 42, 4789, lab::ADDR_A, lab::ADDR_B);
    vxlan(&lab.b, "vxk0", 42, 4789, lab::ADDR_B, lab::ADDR_A);
    up(&lab.a, "vxk0", "10.78.0.1");
    up(&lab.b, "vxk0", "10.78.0.2");
    mark_rule(&lab.a, 9100);

    let d = Daemon::start(&["--netns", &lab.a]);
    send_udp(&lab.a, "10.78.0.2", 9100, 3, None);
    let encapsulated = |evs: &[Value]| {
        evs.iter()
            .any(|e| e["kind"] == "tunnel" && e["tuple"]["dport"] == 4789)
    };
    let events = d.stop_when("the outer packet's tunnel event", encapsulated);

    // The rule marked the inner packet…
    assert!(
        !marked(&events, 9100, "0x4000").is_empty(),
        "no 0x4000 transition on the inner packet: {events:#?}"
    );
    // …and the outer packet carries it: reported as kept, by the VXLAN device.
    let tunnel = events
        .iter()
        .find(|e| e["kind"] == "tunnel" && e["tuple"]["dport"] == 4789)
        .unwrap_or_else(|| panic!("no tunnel event for the outer packet: {events:#?}"));
    assert_eq!(tunnel["mark"]["new"], "0x4000", "{tunnel}");
    assert_eq!(tunnel["mark_fate"], "kept", "{tunnel}");
    assert_eq!(tunnel["segment"]["layer"], "tunnel", "{tunnel}");
    let t = tunnel_of(tunnel);
    assert_eq!(t["direction"], "encap", "{tunnel}");
    assert_eq!(t["device"]["ifname"], "vxk0", "{tunnel}");
    assert_eq!(t["device"]["kind"]["type"], "vxlan", "{tunnel}");
    assert_eq!(t["device"]["kind"]["vni"], 42, "{tunnel}");
    assert!(t.get("crossed_netns").is_none(), "{tunnel}");
    // The outer tuple is the underlay's.
    assert_eq!(tunnel["tuple"]["src"], lab::ADDR_A);
    assert_eq!(tunnel["tuple"]["dst"], lab::ADDR_B);
    assert_eq!(tunnel["tuple"]["proto"], "udp");
}

#[test]
fn vxlan_with_its_socket_in_another_netns_scrubs_the_mark() {
    let lab = Lab::new("vxs").expect("lab");
    let pod = Netns::new("vxs-pod");
    // Made in A (its UDP socket stays there), then moved into the pod's namespace.
    vxlan(&lab.a, "vxs0", 43, 4790, lab::ADDR_A, lab::ADDR_B);
    lab::ip(&lab.a, &format!("link set vxs0 netns {}", pod.name)).expect("move");
    vxlan(&lab.b, "vxs0", 43, 4790, lab::ADDR_B, lab::ADDR_A);
    up(&pod.name, "vxs0", "10.79.0.1");
    up(&lab.b, "vxs0", "10.79.0.2");
    mark_rule(&pod.name, 9101);

    let d = Daemon::start(&["--netns", &pod.name]);
    send_udp(&pod.name, "10.79.0.2", 9101, 3, None);
    // (The device's own IPv6 neighbour discovery goes through it too, with its tailroom
    // value where the mark is: only the marked datagrams are ours.)
    let scrubbed = |e: &&Value| {
        e["kind"] == "transition"
            && e["segment"]["layer"] == "tunnel"
            && e["tuple"]["dport"] == 4790
            && e["mark"]["old"] == "0x4000"
    };
    let events = d.stop_when("the scrubbed outer packet", |evs| {
        evs.iter().any(|e| scrubbed(&e))
    });

    let tr = events
        .iter()
        .find(scrubbed)
        .unwrap_or_else(|| panic!("no tunnel transition for the outer packet: {events:#?}"));
    assert_eq!(tr["mark"]["old"], "0x4000", "{tr}");
    assert_eq!(tr["mark"]["new"], "0x0", "{tr}");
    assert_eq!(tr["mark_fate"], "cleared-crossing-netns", "{tr}");
    let t = tunnel_of(tr);
    assert_eq!(t["direction"], "encap", "{tr}");
    assert_eq!(t["device"]["ifname"], "vxs0", "{tr}");
    assert_eq!(t["device"]["kind"]["vni"], 43, "{tr}");
    let crossed = t["crossed_netns"].as_array().expect("crossed_netns");
    assert_ne!(crossed[0], crossed[1], "{tr}");
    // The kernel did it: no owner is named as its writer.
    assert!(tr["attribution"].is_null(), "{tr}");
}
