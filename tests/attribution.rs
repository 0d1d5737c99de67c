//! Owner attribution end to end: real rules in a throwaway namespace reproduce collisions
//! documented in the owner research (mark-owners.md), and the JSON events must name the owners,
//! the writer and the clobber; plus the `registry` command as a platform team's CI uses it.

use fwmark_trace_tests::*;
use serde_json::Value;

fn warnings<'a>(e: &'a Value, kind: &str) -> Vec<&'a Value> {
    e["attribution"]["warnings"]
        .as_array()
        .map(|w| w.iter().filter(|w| w["kind"] == kind).collect())
        .unwrap_or_default()
}

/// Collision 1: Tailscale's bypass mark (SO_MARK 0x80000 on tailscaled's sockets) is cleared by
/// Calico's chain-entry clear of 0x1B0000.
#[test]
fn calico_clearing_tailscale_bypass_is_flagged() {
    let lab = Lab::new("ts-cali").expect("lab");
    lab::nft(
        &lab.a,
        "table inet calico {\n chain cali-POSTROUTING {\n type filter hook postrouting priority mangle; policy accept;\n meta mark set meta mark & 0xffe4ffff\n }\n}\n",
    )
    .expect("nft");
    let d = Daemon::start(&["--netns", &lab.a, "--owners", "tailscale,calico"]);
    send_udp(&lab.a, lab::ADDR_B, 9981, 2, Some(0x80000));
    let events = d.stop();
    let tr = events_to(&events, "transition", 9981);

    let born = tr
        .iter()
        .find(|e| e["segment"]["layer"] == "socket")
        .expect("SO_MARK transition");
    let ts = born["attribution"]["owners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["owner"] == "tailscale")
        .expect("tailscale bits");
    assert_eq!(ts["bits"], "0x80000");
    assert_eq!(ts["meaning"], "bypass");

    let cleared = tr
        .iter()
        .find(|e| e["mark"]["cleared"] == "0x80000")
        .expect("the clear");
    assert_eq!(
        cleared["segment"]["chains"],
        serde_json::json!(["inet calico/cali-POSTROUTING@-150"])
    );
    assert_eq!(cleared["attribution"]["writer"], "calico");
    let w = warnings(cleared, "clobber");
    assert_eq!(w.len(), 1, "{cleared}");
    assert_eq!(w[0]["owners"], serde_json::json!(["calico", "tailscale"]));
    assert!(w[0]["message"].as_str().unwrap().contains("bypass"));

    let summary = events.last().unwrap();
    let c = summary["clobbers"].as_array().unwrap();
    assert!(
        c.iter().any(|c| c["kind"] == "clobber"
            && c["owners"] == "calico × tailscale"
            && c["count"].as_u64() >= Some(2)),
        "{summary}"
    );
}

/// Collision 5: AWS VPC CNI's nft backend restores `meta mark set ct mark & 0x80`, which
/// assigns the whole mark and wipes Calico eBPF's "seen" mark 0x01000000.
#[test]
fn aws_cni_nft_restore_wipes_calico_ebpf_mark() {
    let lab = Lab::new("aws").expect("lab");
    lab::nft(
        &lab.b,
        r#"
table inet calico {
    chain cali-ebpf-seen {
        type filter hook prerouting priority raw; policy accept;
        udp dport 9982 meta mark set meta mark | 0x1000000
    }
}
table ip aws-cni {
    chain mangle-prerouting {
        type filter hook prerouting priority mangle; policy accept;
        udp dport 9982 ct mark set ct mark | 0x80
    }
    chain nat-prerouting {
        type nat hook prerouting priority -90; policy accept;
        ct mark & 0x80 == 0x80 meta mark set ct mark & 0x80
    }
}
"#,
    )
    .expect("nft");
    let d = Daemon::start(&["--netns", &lab.b]);
    send_udp(&lab.a, lab::ADDR_B, 9982, 1, None);
    // B receives it in softirq (and the first datagram waits for ARP): after the send returns.
    let events = d.stop_when("the restore in B", |ev| {
        !marked(ev, 9982, "0x80").is_empty()
    });
    let tr = events_to(&events, "transition", 9982);
    let restore = tr
        .iter()
        .find(|e| e["mark"]["new"] == "0x80")
        .expect("the restore");
    assert_eq!(restore["mark"]["old"], "0x1000000");
    assert_eq!(restore["segment"]["hook"], "prerouting");
    assert_eq!(
        restore["attribution"]["writer"],
        "aws-vpc-cni@nftables>=1.23"
    );
    let w = warnings(restore, "whole-overwrite");
    assert!(
        w.iter()
            .any(|w| w["owners"] == serde_json::json!(["aws-vpc-cni", "calico-ebpf"])),
        "{restore}"
    );
    // The mark it wiped was recognised as Calico eBPF's when it was set.
    let seen = tr
        .iter()
        .find(|e| e["mark"]["new"] == "0x1000000")
        .expect("the seen mark");
    assert!(seen["attribution"]["owners"]
        .as_array()
        .unwrap()
        .iter()
        .any(|o| o["owner"] == "calico-ebpf" && o["meaning"] == "seen"));
}

/// kube-proxy's masquerade bit the way kube-proxy writes it with iptables(-nft): the nat base
/// chains are the table's own (OUTPUT, POSTROUTING) and the MARK targets sit in KUBE- chains
/// they jump to. The writer is named from those chains.
#[test]
fn iptables_writer_is_named_from_the_chain_jumped_to() {
    let lab = Lab::new("kp-ipt").expect("lab");
    let ipt = |args: &str| {
        let mut cmd = vec!["iptables", "-t", "nat"];
        cmd.extend(args.split_whitespace());
        lab::exec(&lab.a, &cmd).expect("iptables");
    };
    ipt("-N KUBE-MARK-MASQ");
    ipt("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000");
    ipt("-N KUBE-POSTROUTING");
    ipt("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN");
    ipt("-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000");
    // MASQUERADE is also what turns conntrack (and with it the nat chains) on in the namespace.
    ipt("-A KUBE-POSTROUTING -j MASQUERADE");
    ipt("-A OUTPUT -p udp --dport 9983 -j KUBE-MARK-MASQ");
    ipt("-A POSTROUTING -j KUBE-POSTROUTING");
    let d = Daemon::start(&["--netns", &lab.a, "--owners", "kube-proxy"]);
    send_udp(&lab.a, lab::ADDR_B, 9983, 1, None);
    let events = d.stop();
    let tr = events_to(&events, "transition", 9983);
    for (set, hook, chain, writer) in [
        (
            "0x4000",
            "output",
            "ip nat/OUTPUT@-100",
            "ip nat/KUBE-MARK-MASQ",
        ),
        (
            "0x0",
            "postrouting",
            "ip nat/POSTROUTING@100",
            "ip nat/KUBE-POSTROUTING",
        ),
    ] {
        let e = tr
            .iter()
            .find(|e| e["mark"]["new"] == set && e["segment"]["hook"] == hook)
            .unwrap_or_else(|| panic!("no {hook} transition to {set}: {tr:#?}"));
        assert_eq!(e["segment"]["chains"], serde_json::json!([chain]), "{e}");
        assert_eq!(
            e["segment"]["mark_writers"],
            serde_json::json!([writer]),
            "{e}"
        );
        assert_eq!(e["attribution"]["writer"], "kube-proxy@current", "{e}");
    }
}

#[test]
fn registry_check_exits_nonzero_on_overlap() {
    let (code, out, _) = run(&["registry", "check", "cilium", "calico"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("overlap cilium × calico: 0xffff0000"), "{out}");
    let (code, out, _) = run(&[
        "registry",
        "check",
        "kube-proxy@current",
        "cni-portmap",
        "aws-vpc-cni@iptables",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no overlapping bits"));
    let (code, out, _) = run(&["registry", "show", "tailscale"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("0x80000 = bypass") && out.contains("source: tailscale/tailscale"),
        "{out}"
    );
}

#[test]
fn user_registry_files_extend_and_bad_ones_are_rejected() {
    let scratch = Scratch::dir("reg");
    let dir = &scratch.0;
    let good = dir.join("good.toml");
    std::fs::write(&good, "[[owner]]\nname = \"myapp\"\nstyle = \"bitwise\"\nmask = \"0x3\"\ndescription = \"ours\"\nsource = \"us\"\n").unwrap();
    let (code, out, err) = run(&[
        "registry",
        "check",
        "--registry",
        good.to_str().unwrap(),
        "myapp",
        "kube-proxy",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = run(&[
        "registry",
        "check",
        "--owner",
        "mine=0x4001",
        "mine",
        "kube-proxy@current",
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("0x00004000"), "{out}");

    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[owner]]\nname = \"x\"\nstyle = \"bitwise\"\nmask = \"0xZZ\"\n",
    )
    .unwrap();
    let (code, _, err) = run(&["registry", "list", "--registry", bad.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("registry {}, line 4: mask", bad.display())),
        "{err}"
    );
    // A bad registry stops `trace` before anything is attached (it is never ready).
    let (_, err) = trace_fails(&["trace", "--registry", bad.to_str().unwrap()]);
    assert!(err.contains("line 4"), "{err}");
    let (_, err) = trace_fails(&["trace", "--owners", "calicoo"]);
    assert!(err.contains("unknown owner \"calicoo\""), "{err}");
}

#[test]
fn owners_are_detected_from_the_ruleset() {
    require_root();
    let lab = Lab::new("detect").expect("lab");
    lab::nft(
        &lab.a,
        "table inet calico {\n chain cali-POSTROUTING {\n type filter hook postrouting priority mangle; policy accept;\n meta mark set meta mark & 0xffe4ffff\n }\n}\n",
    )
    .expect("nft");
    // kube-proxy's chain and rule, made the way kube-proxy does (iptables, here iptables-nft).
    let iptables = |args: &str| {
        let mut cmd = vec!["iptables", "-t", "nat"];
        cmd.extend(args.split_whitespace());
        lab::exec(&lab.a, &cmd).expect("iptables");
    };
    iptables("-N KUBE-MARK-MASQ");
    iptables("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000");
    let (code, out, err) = run(&["registry", "detect", "--netns", &lab.a]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("calico") && out.contains("cali-POSTROUTING"),
        "{out}"
    );
    assert!(
        out.contains("kube-proxy") && out.contains("KUBE-MARK-MASQ"),
        "{out}"
    );
    assert!(!out.contains("cilium"), "{out}");
    assert!(out.contains("suggested profile: --owners "), "{out}");
    // `trace` names, at start-up, the owners its attribution considers: those whose rules
    // are here (the inventory), when no profile names them.
    let mut d = Daemon::start(&["--netns", &lab.a]);
    d.wait_for_stderr(
        "owners with mark rules, programs or sockets here: calico, kube-proxy;",
        std::time::Duration::from_secs(10),
    );
    drop(d.stop());
    // An empty namespace has nothing to detect.
    let (code, out, _) = run(&["registry", "detect", "--netns", &lab.b]);
    assert_eq!(code, 0);
    assert!(out.contains("no registered owner"), "{out}");
}

/// Every owner any warning or bit of these events names.
fn named_owners(events: &[&Value]) -> Vec<String> {
    let mut out: Vec<String> = events
        .iter()
        .flat_map(|e| {
            let a = &e["attribution"];
            let owners = a["owners"].as_array().into_iter().flatten();
            let warned = a["warnings"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|w| w["owners"].as_array().into_iter().flatten());
            owners
                .map(|o| o["owner"].clone())
                .chain(warned.cloned())
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A chain whose name says nothing (`inet t/x`) assigns wg-quick's whole value 0xCA6C over
/// Tailscale's bypass bit (tailscaled's socket mark): flagged by what the rule writes, with the
/// default options and with `--owners` naming both; owners with nothing here are not named.
#[test]
fn a_neutral_chain_overwriting_another_owners_bit_is_flagged() {
    const PORT: u16 = 9931;
    let lab = Lab::new("neutral").expect("lab");
    lab::nft(
        &lab.a,
        &format!("table inet t {{\n chain x {{\n type route hook output priority mangle; policy accept;\n udp dport {PORT} meta mark set 0xca6c\n }}\n}}\n"),
    )
    .expect("nft");
    // tailscaled runs on this node: its socket is open before tracing starts.
    let _tailscaled = marked_sockets(&lab.a, &[0x80000]);
    for owners in [None, Some("wg-quick,tailscale")] {
        let mut args = vec!["--netns", lab.a.as_str()];
        if let Some(o) = owners {
            args.extend(["--owners", o]);
        }
        let d = Daemon::start(&args);
        send_udp(&lab.a, lab::ADDR_B, PORT, 2, Some(0x80000));
        let events = d.stop();
        let tr = events_to(&events, "transition", PORT);
        let over = tr
            .iter()
            .find(|e| e["mark"]["old"] == "0x80000" && e["mark"]["new"] == "0xca6c")
            .unwrap_or_else(|| panic!("no 0x80000 -> 0xca6c transition ({owners:?}): {tr:#?}"));
        assert_eq!(
            over["segment"]["chains"],
            serde_json::json!(["inet t/x@-150"]),
            "{over}"
        );
        assert_eq!(over["attribution"]["writer"], "wg-quick", "{over}");
        let w = warnings(over, "whole-overwrite");
        assert_eq!(w.len(), 1, "{owners:?}: {over}");
        assert_eq!(w[0]["owners"], serde_json::json!(["wg-quick", "tailscale"]));
        // Only owners with something here: no NetworkManager (which also claims 0xca6c), no
        // Calico or kube-proxy (whose bits 0xca6c and 0x80000 touch).
        let named = named_owners(&tr);
        assert!(!named.is_empty(), "{tr:#?}");
        for n in &named {
            assert!(
                n == "wg-quick" || n == "tailscale",
                "{owners:?}: {n} named, with nothing on this node: {named:?}"
            );
        }
    }
}

/// Istio's real TPROXY rules (iptables-nft): the sidecar's connection mark 1337 is restored on
/// the app's packets by CONNMARK in the built-in `ip mangle/OUTPUT`, whose name says nothing of
/// Istio. The writer is found by what the rule writes, with the default options.
#[test]
fn istio_restore_in_a_builtin_chain_is_istios() {
    const PORT: u16 = 9080;
    let lab = Lab::new("istio-attr").expect("lab");
    let pod = lab.a.as_str();
    restore_rules(
        pod,
        "iptables-nft-restore",
        &real_rules("istio-tproxy.v4.rules"),
    );
    let _server = tcp_echo_server(pod, lab::ADDR_A, PORT);
    let d = Daemon::start(&["--netns", pod]);
    let (ports, _) = tcp_traffic(
        pod,
        lab::ADDR_A,
        PORT,
        1337,
        20,
        64 << 10,
        std::time::Duration::from_secs(10),
    );
    let events = d.stop();
    assert!(!ports.is_empty(), "no connection was made");
    let restored: Vec<&Value> = events
        .iter()
        .filter(|e| {
            e["kind"] == "transition"
                && e["mark"]["new"] == "0x539"
                && e["segment"]["hook"] == "output"
                && e["segment"]["chains"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c == "ip mangle/OUTPUT@-150"))
        })
        .collect();
    assert!(
        !restored.is_empty(),
        "no restore of 0x539 in ip mangle/OUTPUT"
    );
    for e in &restored {
        let writer = e["attribution"]["writer"].as_str().unwrap_or_default();
        assert!(writer.starts_with("istio"), "writer {writer:?}: {e}");
    }
    let named = named_owners(&restored);
    assert!(
        named.iter().all(|n| n.starts_with("istio")),
        "owners with nothing here named: {named:?}"
    );
}

/// Tailscale's real subnet-router rules (iptables-nft): a connection tailscaled marks 0x80000 has
/// its mark saved to the conntrack mark in the built-in `ip mangle/OUTPUT`, and restored onto the
/// replies in `ip mangle/PREROUTING` (CONNMARK, mask 0xff0000). Neither chain's name says
/// Tailscale: both writes are Tailscale's by what they write, with the default options.
#[test]
fn tailscale_connmark_restore_in_prerouting_is_tailscales() {
    const PORT: u16 = 9441;
    let lab = Lab::new("ts-attr").expect("lab");
    restore_rules(
        &lab.a,
        "iptables-nft-restore",
        &real_rules("tailscale-subnet-router.v4.rules"),
    );
    let _server = tcp_echo_server(&lab.b, lab::ADDR_B, PORT);
    let d = Daemon::start(&["--netns", &lab.a]);
    let (ports, _) = tcp_traffic(
        &lab.a,
        lab::ADDR_B,
        PORT,
        0x80000,
        5,
        0,
        std::time::Duration::from_secs(10),
    );
    let events = d.stop();
    assert!(!ports.is_empty(), "no connection was made");
    let in_chain = |e: &&Value, chain: &str| {
        e["kind"] == "transition"
            && e["segment"]["chains"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c == chain))
    };
    let saved: Vec<&Value> = events
        .iter()
        .filter(|e| in_chain(e, "ip mangle/OUTPUT@-150") && e["ct_mark"]["new"] == "0x80000")
        .collect();
    let restored: Vec<&Value> = events
        .iter()
        .filter(|e| {
            in_chain(e, "ip mangle/PREROUTING@-150")
                && e["mark"]["old"] == "0x0"
                && e["mark"]["new"] == "0x80000"
        })
        .collect();
    assert!(!saved.is_empty(), "no save of 0x80000 to the ct mark");
    assert!(!restored.is_empty(), "no restore of 0x80000 in PREROUTING");
    for e in saved.iter().chain(&restored) {
        assert_eq!(e["attribution"]["writer"], "tailscale", "{e}");
    }
    let named = named_owners(&[saved, restored].concat());
    assert_eq!(named, ["tailscale"], "owners with nothing here named");
}
