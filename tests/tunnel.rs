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

/// The ESP state from A to B: SPI 0x100, null ciphers (what is under test is the mark, not
/// the crypto), with `extra` (e.g. an output mark).
fn esp_state(ns: &str, extra: &str) {
    // (Empty keys are arguments of their own: `lab::ip` splits at spaces.)
    let state = format!("xfrm state add src 10.77.0.1 dst 10.77.0.2 proto esp spi 0x100 reqid 1 mode tunnel enc cipher_null KEY auth digest_null KEY {extra}");
    let mut args = vec!["-n", ns];
    args.extend(
        state
            .split_whitespace()
            .map(|w| if w == "KEY" { "" } else { w }),
    );
    lab::run("ip", &args).expect("xfrm state");
}

/// An ESP tunnel from A to B whose state writes an output mark (`output-mark 0x300 mask
/// 0xf00`, Cilium's encryption nibble), taken by the policy for packets marked 0x100/0xf00.
fn esp_tunnel(ns: &str) {
    esp_state(ns, "output-mark 0x300 mask 0xf00");
    lab::ip(
        ns,
        "xfrm policy add src 10.77.0.1/32 dst 10.77.0.2/32 proto udp dir out mark 0x100 mask 0xf00 tmpl src 10.77.0.1 dst 10.77.0.2 proto esp reqid 1 mode tunnel",
    )
    .expect("xfrm policy");
}

#[test]
fn esp_output_mark_names_its_state_not_an_owner() {
    if !modules_or_skip("esp_output_mark_names_its_state_not_an_owner", &["esp4"]) {
        return;
    }
    let lab = Lab::new("esp").expect("lab");
    esp_tunnel(&lab.a);
    let d = Daemon::start(&["--netns", &lab.a]);
    // The socket's SO_MARK selects the policy; the state rewrites the nibble.
    send_udp(&lab.a, lab::ADDR_B, 9200, 3, Some(0x100));
    let by_xfrm = |e: &&Value| e["kind"] == "transition" && e["segment"]["layer"] == "xfrm";
    let events = d.stop_when("the ESP packet's transition", |evs| {
        evs.iter().any(|e| by_xfrm(&e))
    });
    let tr = events
        .iter()
        .find(by_xfrm)
        .unwrap_or_else(|| panic!("no xfrm transition: {events:#?}"));
    assert_eq!(tr["mark"]["old"], "0x100", "{tr}");
    assert_eq!(tr["mark"]["new"], "0x300", "{tr}");
    assert_eq!(tr["mark_fate"], "set-by-xfrm-state", "{tr}");
    assert_eq!(tr["tuple"]["proto"], "esp", "{tr}");
    let t = tunnel_of(tr);
    assert_eq!(t["direction"], "encap", "{tr}");
    assert_eq!(t["xfrm_spi"], "0x100", "{tr}");
    let sa = &t["xfrm_state"];
    assert_eq!(sa["spi"], 0x100, "{tr}");
    assert_eq!(sa["mode"], "tunnel", "{tr}");
    assert_eq!(sa["reqid"], 1, "{tr}");
    assert_eq!(sa["output_mark"], "0x300/0xf00", "{tr}");
    assert_eq!(sa["dst"], lab::ADDR_B, "{tr}");
    // The state wrote it: no registry owner whose bits 0x300 overlaps is its writer.
    assert!(tr["attribution"]["writer"].is_null(), "{tr}");
    let desc = tr["segment"]["description"].as_str().unwrap_or_default();
    assert!(desc.contains("spi 0x100 "), "{desc}");
}

#[test]
fn esp_state_and_policy_marks_are_in_the_inventory() {
    if !modules_or_skip("esp_state_and_policy_marks_are_in_the_inventory", &["esp4"]) {
        return;
    }
    let lab = Lab::new("espinv").expect("lab");
    esp_tunnel(&lab.a);
    let (code, out, err) = run(&["inventory", "--netns", &lab.a, "--json"]);
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let entries = doc["entries"].as_array().expect("entries");
    let of = |what: &str| {
        entries
            .iter()
            .find(|e| e["what"] == what)
            .unwrap_or_else(|| panic!("no {what}: {doc:#}"))
    };
    let state = of("xfrm-state");
    assert!(
        state["text"]
            .as_str()
            .unwrap_or_default()
            .contains("spi 0x100 "),
        "{state}"
    );
    let write = state["access"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["op"] == "write")
        .unwrap_or_else(|| panic!("the state's output mark is no write: {state}"));
    assert_eq!(
        (&write["value"], &write["mask"]),
        (&"0x300".into(), &"0xf00".into()),
        "{state}"
    );
    let policy = of("xfrm-policy");
    let read = &policy["access"][0];
    assert_eq!(read["op"], "read", "{policy}");
    assert_eq!(
        (&read["value"], &read["mask"]),
        (&"0x100".into(), &"0xf00".into()),
        "{policy}"
    );
}

/// Geneve within a namespace: like VXLAN, the outer packet keeps the inner one's mark.
#[test]
fn geneve_keeps_the_inner_mark_on_the_outer_packet() {
    if !modules_or_skip(
        "geneve_keeps_the_inner_mark_on_the_outer_packet",
        &["geneve"],
    ) {
        return;
    }
    let lab = Lab::new("gnv").expect("lab");
    lab::ip(&lab.a, "link add gnv0 type geneve id 77 remote 10.77.0.2").expect("geneve");
    lab::ip(&lab.b, "link add gnv0 type geneve id 77 remote 10.77.0.1").expect("geneve");
    up(&lab.a, "gnv0", "10.80.0.1");
    up(&lab.b, "gnv0", "10.80.0.2");
    mark_rule(&lab.a, 9102);
    let d = Daemon::start(&["--netns", &lab.a]);
    send_udp(&lab.a, "10.80.0.2", 9102, 3, None);
    // Geneve's UDP port.
    let outer = |e: &&Value| e["kind"] == "tunnel" && e["tuple"]["dport"] == 6081;
    let events = d.stop_when("the Geneve outer packet", |evs| {
        evs.iter().any(|e| outer(&e))
    });
    let ev = events
        .iter()
        .find(outer)
        .unwrap_or_else(|| panic!("no tunnel event: {events:#?}"));
    assert_eq!(ev["mark"]["new"], "0x4000", "{ev}");
    assert_eq!(ev["mark_fate"], "kept", "{ev}");
    let t = tunnel_of(ev);
    assert_eq!(t["device"]["ifname"], "gnv0", "{ev}");
    assert_eq!(t["device"]["kind"]["type"], "geneve", "{ev}");
    assert_eq!(t["device"]["kind"]["vni"], 77, "{ev}");
}

/// A kernel WireGuard tunnel from A to B with wg-quick's fwmark 0xca6c: the device puts its
/// fwmark on the outer packets, over the inner packet's mark.
#[test]
fn wireguard_puts_its_fwmark_on_the_outer_packet() {
    if !modules_or_skip(
        "wireguard_puts_its_fwmark_on_the_outer_packet",
        &["wireguard"],
    ) {
        return;
    }
    let lab = Lab::new("wgt").expect("lab");
    let keys = Scratch::dir("wgt-keys");
    let key = |name: &str| {
        let private = lab::run("wg", &["genkey"]).expect("wg genkey (wireguard-tools)");
        let path = keys.0.join(name);
        std::fs::write(&path, private.trim()).expect("key file");
        let public = lab::exec(
            &lab.a,
            &["sh", "-c", &format!("wg pubkey < {}", path.display())],
        )
        .expect("wg pubkey");
        (path, public.trim().to_owned())
    };
    let ((key_a, pub_a), (key_b, pub_b)) = (key("a"), key("b"));
    for (ns, own, key, peer, peer_addr) in [
        (&lab.a, "10.81.0.1", &key_a, &pub_b, lab::ADDR_B),
        (&lab.b, "10.81.0.2", &key_b, &pub_a, lab::ADDR_A),
    ] {
        lab::ip(ns, "link add wgt0 type wireguard").expect("wireguard link");
        lab::exec(
            ns,
            &[
                "wg",
                "set",
                "wgt0",
                "private-key",
                &key.display().to_string(),
                "listen-port",
                "51820",
                "fwmark",
                "0xca6c",
                "peer",
                peer,
                "allowed-ips",
                "10.81.0.0/24",
                "endpoint",
                &format!("{peer_addr}:51820"),
            ],
        )
        .expect("wg set");
        up(ns, "wgt0", own);
    }
    mark_rule(&lab.a, 9103);
    let d = Daemon::start(&["--netns", &lab.a]);
    send_udp(&lab.a, "10.81.0.2", 9103, 3, None);
    // The data packets' outer side (the handshake's packets are the device's own).
    let outer = |e: &&Value| {
        e["segment"]["tunnel"]["device"]["ifname"] == "wgt0" && e["tuple"]["dport"] == 51820
    };
    let events = d.stop_when("the WireGuard outer packet", |evs| {
        evs.iter().any(|e| outer(&e))
    });
    let ev = events
        .iter()
        .find(outer)
        .unwrap_or_else(|| panic!("no encapsulation by wgt0: {events:#?}"));
    assert_eq!(ev["kind"], "transition", "{ev}");
    assert_eq!(ev["mark"]["old"], "0x4000", "{ev}");
    assert_eq!(ev["mark"]["new"], "0xca6c", "{ev}");
    assert_eq!(ev["mark_fate"], "set-by-tunnel-fwmark", "{ev}");
    let kind = &tunnel_of(ev)["device"]["kind"];
    assert_eq!(kind["type"], "wireguard", "{ev}");
    assert_eq!(kind["fwmark"], 0xca6c, "{ev}");
}

/// B decrypts A's ESP packets (the state, and the inbound policy tunnel mode needs): the inner
/// packet, marked by a rule at prerouting after its decryption, names the state that
/// decrypted it.
#[test]
fn esp_decrypted_packet_names_the_state_that_decrypted_it() {
    let test = "esp_decrypted_packet_names_the_state_that_decrypted_it";
    if !modules_or_skip(test, &["esp4"]) {
        return;
    }
    let lab = Lab::new("espin").expect("lab");
    esp_tunnel(&lab.a);
    esp_state(&lab.b, "");
    lab::ip(
        &lab.b,
        "xfrm policy add src 10.77.0.1/32 dst 10.77.0.2/32 proto udp dir in tmpl src 10.77.0.1 dst 10.77.0.2 proto esp reqid 1 mode tunnel",
    )
    .expect("xfrm policy in");
    lab::nft(
        &lab.b,
        "table inet t {
            chain pre {
                type filter hook prerouting priority mangle; policy accept;
                udp dport 9201 meta mark set 0x4000
            }
        }",
    )
    .expect("nft");
    let d = Daemon::start(&["--netns", &lab.b]);
    send_udp(&lab.a, lab::ADDR_B, 9201, 3, Some(0x100));
    let marked_inner = |e: &&Value| {
        e["kind"] == "transition" && e["tuple"]["dport"] == 9201 && e["mark"]["new"] == "0x4000"
    };
    let events = d.stop_when("the decrypted packet's transition", |evs| {
        evs.iter().any(|e| marked_inner(&e))
    });
    let tr = events
        .iter()
        .find(marked_inner)
        .unwrap_or_else(|| panic!("no transition of the decrypted packet: {events:#?}"));
    let by = &tr["decrypted_by"];
    assert_eq!(by["spi"], "0x100", "{tr}");
    assert_eq!(by["state"]["src"], lab::ADDR_A, "{tr}");
    assert_eq!(by["state"]["mode"], "tunnel", "{tr}");
    assert_eq!(tr["segment"]["hook"], "prerouting", "{tr}");
}
