//! Packet identity: the daemon follows a packet by its `struct sk_buff *`. Two ways to get that
//! wrong, each reported by a user with real rules (../shared/real-rules): treating a new buffer
//! head on the same sk_buff as a new packet, and taking a recycled sk_buff (a new packet at the
//! address of one that ended where no tracepoint fires, e.g. TCP's silent frees) for the old
//! one. One test per report, with the rules that showed it, in throwaway namespaces.

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use fwmark_trace_tests::*;
use serde_json::Value;

fn short(e: &Value) -> String {
    let mut e = e.clone();
    if let Some(o) = e.as_object_mut() {
        o.remove("attribution");
        o.remove("time");
    }
    e.to_string()
}

fn offending(what: &str, bad: &[&Value], total: usize) -> String {
    format!(
        "{} of {total} {what}; first ones:\n{}",
        bad.len(),
        bad.iter()
            .take(3)
            .map(|e| short(e))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// A "first sight" of a packet: where the daemon started a new packet id (with --full-path
/// `first_seen`; a mark already set at first sight is a transition from before the first
/// observer).
fn first_sight(e: &Value) -> bool {
    e["kind"] == "first_seen" || (e["kind"] == "transition" && e["segment"]["layer"] == "unknown")
}

const NODEPORT: u16 = 3001;
/// The endpoint of the rules' ns1/svc1 (KUBE-SEP-… DNAT --to-destination 10.180.0.1:80): the
/// backend namespace carries that address.
const ENDPOINT: &str = "10.180.0.1";
const NODE_TO_ENDPOINT: &str = "10.180.0.2";

/// Report 1: kube-proxy NodePort. A client connects to the node's NodePort, kube-proxy's rules
/// mark the first packet for masquerade (0x4000) and DNAT it to the endpoint in a third
/// namespace; the node forwards it and KUBE-POSTROUTING clears the bit before MASQUERADE.
/// Every packet of those connections was made in the client or the server namespace: in the
/// node it must keep the packet id it got on entering (no second first sight at a netfilter
/// hook), and the masquerade bit must change only in netfilter, set and cleared on the same
/// packet. (What moves the head here: not the DNAT, which writes TCP's clone in place, but
/// ip_forward's skb_cow of every still-cloned packet — SYN, data, FIN, either direction —
/// between the PREROUTING and FORWARD hooks.)
#[test]
fn kube_proxy_nodeport_forwarded_packets_keep_their_identity() {
    let lab = Lab::new("kpnp").expect("lab"); // a: client, b: the node
    let backend = Netns::new("kpnp-ep");
    let node = lab.b.as_str();
    lab::ip(
        node,
        &format!(
            "link add kp-node type veth peer name kp-ep netns {}",
            backend.name
        ),
    )
    .expect("veth to the endpoint");
    lab::ip(node, &format!("addr add {NODE_TO_ENDPOINT}/24 dev kp-node")).unwrap();
    lab::ip(node, "link set kp-node up").unwrap();
    lab::ip(&backend.name, &format!("addr add {ENDPOINT}/24 dev kp-ep")).unwrap();
    lab::ip(&backend.name, "link set kp-ep up").unwrap();
    lab::exec(node, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]).unwrap();
    restore_rules(
        node,
        "iptables-nft-restore",
        &real_rules("kube-proxy-nodeport.rules"),
    );
    let _srv = tcp_echo_server(&backend.name, ENDPOINT, 80);

    let d = Daemon::start(&["--netns", node, "--owners", "kube-proxy", "--full-path"]);
    let (ports, echoed) = tcp_traffic(
        &lab.a,
        lab::ADDR_B,
        NODEPORT,
        0,
        20,
        256 << 10,
        Duration::from_secs(10),
    );
    let events = d.stop();
    assert!(
        ports.len() >= 10 && echoed > 0,
        "NodePort traffic did not get through (ports {ports:?}, {echoed} bytes echoed)"
    );

    let tcp: Vec<&Value> = events
        .iter()
        .filter(|e| e["tuple"]["proto"] == "tcp")
        .collect();
    let masq: Vec<&Value> = tcp
        .iter()
        .copied()
        .filter(|e| {
            e["kind"] == "transition"
                && (mark_of(&e["mark"]["old"]) ^ mark_of(&e["mark"]["new"])) & 0x4000 != 0
        })
        .collect();
    assert!(
        masq.iter()
            .any(|e| mark_of(&e["mark"]["new"]) & 0x4000 != 0),
        "KUBE-MARK-MASQ never set 0x4000: {tcp:#?}"
    );

    // 1. Every change of the masquerade bit happened in a netfilter band (KUBE-MARK-MASQ in
    // nat PREROUTING, KUBE-POSTROUTING's xor), never "before the first observer".
    let not_nf: Vec<&Value> = masq
        .iter()
        .copied()
        .filter(|e| e["segment"]["layer"] != "netfilter")
        .collect();
    // 2. The packet KUBE-MARK-MASQ marked at PREROUTING is the one KUBE-POSTROUTING clears.
    let marked: HashSet<&Value> = masq
        .iter()
        .filter(|e| {
            mark_of(&e["mark"]["new"]) & 0x4000 != 0
                && e["segment"]["layer"] == "netfilter"
                && e["segment"]["hook"] == "prerouting"
        })
        .map(|e| &e["packet_id"])
        .collect();
    let cleared: Vec<&Value> = masq
        .iter()
        .copied()
        .filter(|e| mark_of(&e["mark"]["new"]) & 0x4000 == 0)
        .collect();
    let orphan: Vec<&Value> = cleared
        .iter()
        .copied()
        .filter(|e| !marked.contains(&e["packet_id"]))
        .collect();
    // 3. Packets made elsewhere are first seen where they enter the traced namespace
    // (netif_receive_skb on the node's veth); a first sight at a netfilter hook is a second
    // packet id for a packet already being followed.
    let entries = tcp.iter().filter(|e| first_sight(e)).count();
    let again: Vec<&Value> = tcp
        .iter()
        .copied()
        .filter(|e| first_sight(e) && e["at"]["hook"] != "netif_receive_skb")
        .collect();
    let mut problems = Vec::new();
    if !not_nf.is_empty() {
        problems.push(format!(
            "masquerade bit changed outside netfilter: {}",
            offending("0x4000 transitions", &not_nf, masq.len())
        ));
    }
    if !orphan.is_empty() {
        problems.push(format!(
            "0x4000 cleared on a packet id KUBE-MARK-MASQ did not mark: {}",
            offending("clears", &orphan, cleared.len())
        ));
    }
    if !again.is_empty() {
        problems.push(format!(
            "forwarded packets got a second packet id in the node: {}",
            offending("first sights", &again, entries)
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
}

/// The Istio pod's address in the lab (lab::ADDR_A on veth-a: traffic to it from inside the
/// namespace goes over lo) and the application port behind the sidecar.
const APP_PORT: u16 = 9080;
/// Istio's inbound TPROXY mark, 1337 (the sidecar's upstream sockets carry it as SO_MARK:
/// `OUTPUT -o lo -m mark --mark 1337 -j RETURN` is there for them).
const ISTIO_MARK: u32 = 1337;

/// Report 2: Istio's TPROXY rules on loopback. The sidecar (SO_MARK 1337) talks to the app
/// over lo; the rules save the mark in the connection at PREROUTING and restore it on the
/// app's packets at OUTPUT. No packet goes from the input hook to the output hook: a
/// segment "input → output" is a new packet taken for one that ended silently in TCP.
#[test]
fn istio_tproxy_loopback_new_packets_are_not_old_ones() {
    let lab = Lab::new("istio").expect("lab");
    let pod = lab.a.as_str();
    restore_rules(
        pod,
        "iptables-nft-restore",
        &real_rules("istio-tproxy.v4.rules"),
    );
    let _app = tcp_echo_server(pod, lab::ADDR_A, APP_PORT);

    let d = Daemon::start(&["--netns", pod, "--owners", "istio"]);
    let (ports, echoed) = tcp_traffic(
        pod,
        lab::ADDR_A,
        APP_PORT,
        ISTIO_MARK,
        300,
        8 << 20,
        Duration::from_secs(15),
    );
    let events = d.stop();
    assert!(
        ports.len() >= 100 && echoed > (1 << 20),
        "loopback traffic did not flow (ports {ports:?}, {echoed} bytes echoed)"
    );
    let tr: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "transition" && e["tuple"]["proto"] == "tcp")
        .collect();
    // The rules did their part: the app's packets got 1337 restored from the connection.
    assert!(
        tr.iter().any(|e| mark_of(&e["mark"]["new"]) == ISTIO_MARK
            && e["segment"]["layer"] == "netfilter"
            && e["segment"]["hook"] == "output"),
        "CONNMARK --restore-mark never set 0x539 at output: {} transitions",
        tr.len()
    );
    let bad: Vec<&Value> = tr
        .iter()
        .copied()
        .filter(|e| e["segment"]["from"]["hook"] == "input" && e["at"]["hook"] == "output")
        .collect();
    assert!(
        bad.is_empty(),
        "a packet went from the input hook to the output hook: {}",
        offending("tcp transitions", &bad, tr.len())
    );
    // Nothing clears the mark at the end of a life: a change seen there is an unrelated
    // buffer (netlink, unix) at the address of a pure ACK TCP freed without a tracepoint.
    let ended: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["kind"] == "transition"
                && matches!(e["at"]["hook"].as_str(), Some("consume_skb" | "kfree_skb"))
        })
        .collect();
    assert!(
        ended.is_empty(),
        "transitions at the end of a life: {}",
        offending("transitions", &ended, events.len())
    );
}

const TS_BYPASS: u32 = 0x80000;
const TS_PORT: u16 = 9081;

/// Report 3: Tailscale's subnet-router rules (iptables + ip rules) on a node whose sockets
/// carry the bypass mark 0x80000 as SO_MARK (tailscaled's own). Every packet those sockets
/// send starts life with that mark: its first mark comes from the socket, never from the
/// kernel's namespace crossing (a recycled sk_buff last seen in the peer's namespace).
#[test]
fn tailscale_so_mark_packets_start_at_the_socket() {
    let lab = Lab::new("ts").expect("lab");
    let node = lab.a.as_str();
    // The rules' tailscale0: a veth end instead of a TUN (as the .ip file's header says).
    lab::ip(
        node,
        &format!(
            "link add tailscale0 type veth peer name ts-peer netns {}",
            lab.b
        ),
    )
    .expect("tailscale0");
    lab::ip(node, "link set tailscale0 up").unwrap();
    lab::ip(&lab.b, "link set ts-peer up").unwrap();
    ip_lines(node, &real_rules("tailscale-subnet-router.ip"));
    restore_rules(
        node,
        "iptables-nft-restore",
        &real_rules("tailscale-subnet-router.v4.rules"),
    );
    restore_rules(
        node,
        "ip6tables-nft-restore",
        &real_rules("tailscale-subnet-router.v6.rules"),
    );
    let _peer = tcp_echo_server(&lab.b, lab::ADDR_B, TS_PORT);

    let d = Daemon::start(&["--netns", node, "--owners", "tailscale"]);
    send_udp(node, lab::ADDR_B, TS_PORT, 5, Some(TS_BYPASS));
    let (ports, echoed) = tcp_traffic(
        node,
        lab::ADDR_B,
        TS_PORT,
        TS_BYPASS,
        200,
        8 << 20,
        Duration::from_secs(15),
    );
    let events = d.stop();
    assert!(
        ports.len() >= 100 && echoed > (1 << 20),
        "bypass-marked traffic did not flow (ports {ports:?}, {echoed} bytes echoed)"
    );
    // Packets the marked sockets sent (the peer's replies get 0x80000 restored from the
    // connection mark at PREROUTING: a netfilter change, not a first mark).
    let sent: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["kind"] == "transition"
                && e["tuple"]["src"] == lab::ADDR_A
                && e["tuple"]["dst"] == lab::ADDR_B
                && e["tuple"]["dport"] == TS_PORT
        })
        .collect();
    let first_marks: Vec<&Value> = sent
        .iter()
        .copied()
        .filter(|e| mark_of(&e["mark"]["new"]) == TS_BYPASS && mark_of(&e["mark"]["old"]) == 0)
        .collect();
    let by_layer = first_marks.iter().fold(HashMap::new(), |mut m, e| {
        *m.entry(e["segment"]["layer"].as_str().unwrap_or("?"))
            .or_insert(0usize) += 1;
        m
    });
    assert!(
        by_layer.get("socket").copied().unwrap_or(0) > 0,
        "no SO_MARK transition at all: {by_layer:?}"
    );
    let bad: Vec<&Value> = first_marks
        .iter()
        .copied()
        .filter(|e| e["segment"]["layer"] != "socket")
        .collect();
    assert!(
        bad.is_empty(),
        "first marks not from the socket ({by_layer:?}): {}",
        offending("0x0 → 0x80000 transitions", &bad, first_marks.len())
    );
}
