//! `fwmark-trace inventory` against real state in throwaway namespaces: the owners' own rule
//! sets (../shared/real-rules: kube-proxy's and kubelet's iptables rules, Tailscale's
//! iptables rules and ip rules, Istio's iptables and nftables TPROXY rules), the rules
//! wg-quick installs (a userspace WireGuard device with fwmark 0xca6c, its nft table and ip
//! rule), an xfrm policy with a mark, a tc program setting a mark, sockets with SO_MARK, a
//! marked conntrack entry and Open vSwitch flows (a private ovs-vswitchd, userspace datapath).
//! Every entry is asserted (kind, owner, value/mask, read or write) and every documented
//! collision shows up as a conflict; `--check` exits 1 on them.
use std::process::Command;

use fwmark_trace_tests::*;
use serde_json::Value;

/// A cgroup program is in every namespace's inventory: the test that loads one runs alone
/// (write), every other inventory runs beside the others (read).
static NODE_WIDE: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn cli(args: &[&str]) -> (i32, String, String) {
    let _others = NODE_WIDE.read().unwrap_or_else(|e| e.into_inner());
    run(args)
}

/// The JSON inventory of namespace `ns`.
fn inventory(ns: &str) -> Value {
    let _others = NODE_WIDE.read().unwrap_or_else(|e| e.into_inner());
    inventory_alone(ns)
}

fn inventory_alone(ns: &str) -> Value {
    require_root();
    let (code, out, err) = run(&["inventory", "--netns", ns, "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

/// The entries of kind `what` whose `text` (or iptables line) contains `needle`.
fn entries<'a>(doc: &'a Value, what: &str, needle: &str) -> Vec<&'a Value> {
    doc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["what"] == what
                && (e["text"].as_str().unwrap_or("").contains(needle)
                    || e["iptables"].as_str().unwrap_or("").contains(needle))
        })
        .collect()
}

fn one<'a>(doc: &'a Value, what: &str, needle: &str) -> &'a Value {
    let found = entries(doc, what, needle);
    assert_eq!(found.len(), 1, "{what} {needle:?}: {found:#?}\n{doc:#}");
    found[0]
}

/// Asserts an entry's owner and accesses: `spec` is "OWNER by BY: ACCESS; ACCESS…", each
/// access "OP MARK VALUE/MASK [SCOPE]" (e.g. "tailscale by value: read packet 0x80000/0xff0000").
fn check(e: &Value, spec: &str) {
    let (who, access) = spec.split_once(": ").expect("OWNER by BY: ACCESS");
    let (owner, by) = who.rsplit_once(" by ").expect("OWNER by BY");
    assert_eq!(e["owner"]["id"], owner, "{e:#}");
    assert_eq!(e["owner"]["by"], by, "{e:#}");
    let got: Vec<String> = e["access"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let s = |k: &str| a[k].as_str().unwrap_or("").to_owned();
            let scope = a["scope"]
                .as_str()
                .map(|s| format!(" {s}"))
                .unwrap_or_default();
            format!(
                "{} {} {}/{}{scope}",
                s("op"),
                s("mark"),
                s("value"),
                s("mask")
            )
        })
        .collect();
    assert_eq!(got.join("; "), access, "{e:#}");
}

/// Checks expected entries, one a line: "WHAT :: TEXT :: OWNER by BY: ACCESS; …" (the entry of
/// kind WHAT whose text contains TEXT, then as `check`).
fn expect_entries(doc: &Value, table: &str) {
    for line in table.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let mut f = line.splitn(3, " :: ");
        let (Some(what), Some(needle), Some(spec)) = (f.next(), f.next(), f.next()) else {
            panic!("bad expectation {line:?}");
        };
        check(one(doc, what, needle), spec);
    }
}

/// The conflicts as (kind, owner, owner, bits).
fn conflicts(doc: &Value) -> Vec<(String, String, String, String)> {
    doc["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let s = |v: &Value| v.as_str().unwrap().to_owned();
            (
                s(&c["kind"]),
                s(&c["owners"][0]),
                s(&c["owners"][1]),
                s(&c["bits"]),
            )
        })
        .collect()
}

/// Asserts that each expected conflict, one a line ("KIND OWNER OWNER BITS"), is among `c`.
fn expect_conflicts(c: &[(String, String, String, String)], table: &str) {
    for line in table.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(has(c, f[0], f[1], f[2], f[3]), "no {line:?} among {c:#?}");
    }
}

fn has(c: &[(String, String, String, String)], kind: &str, a: &str, b: &str, bits: &str) -> bool {
    c.iter()
        .any(|x| (x.0.as_str(), x.1.as_str(), x.2.as_str(), x.3.as_str()) == (kind, a, b, bits))
}

/// The one nft rule of chain `chain` whose text contains `needle`.
fn in_chain<'a>(doc: &'a Value, chain: &str, needle: &str) -> &'a Value {
    let found: Vec<&Value> = entries(doc, "nft-rule", needle)
        .into_iter()
        .filter(|e| e["chain"] == chain)
        .collect();
    assert_eq!(found.len(), 1, "{chain} {needle:?}: {found:#?}");
    found[0]
}

/// One field (`hook`, `chain`) of each base chain an nft rule is reached from.
fn reached_from<'a>(e: &'a Value, field: &str) -> Vec<&'a str> {
    e["reached_from"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b[field].as_str().unwrap())
        .collect()
}

/// Gives WireGuard interface `ifname` in `ns` a fresh key, wg-quick's port and its fwmark 0xca6c.
fn wg_set(ns: &str, ifname: &str) {
    let key = lab::run("wg", &["genkey"]).expect("wg genkey");
    let keyfile = std::env::temp_dir().join(format!("fwmt-wg-{}-{ifname}", std::process::id()));
    std::fs::write(&keyfile, key.trim()).unwrap();
    let key = keyfile.to_str().unwrap();
    let set = lab::exec(
        ns,
        &[
            "wg",
            "set",
            ifname,
            "private-key",
            key,
            "listen-port",
            "51820",
            "fwmark",
            "0xca6c",
        ],
    );
    let _ = std::fs::remove_file(&keyfile);
    set.expect("wg set");
}

/// The demo's namespace: every reader and writer with its owner, the two documented
/// collisions (#1 Calico × Tailscale, #7 wg-quick × kube) as conflicts, `--check` exits 1.
#[test]
fn demo_namespace_lists_every_reader_and_writer_and_both_collisions() {
    let lab = Lab::new("inv-demo").expect("lab");
    lab::nft(&lab.a, lab::DEMO_RULESET).expect("nft");
    lab::ip(&lab.a, "rule add fwmark 0x4000/0x4000 lookup 100 pref 1000").expect("ip rule");
    let _sockets = marked_sockets(&lab.a, &[0xca6c, 0x80000]);
    let doc = inventory(&lab.a);
    assert_eq!(doc["entries"].as_array().unwrap().len(), 8, "{doc:#}");
    expect_entries(
        &doc,
        "
        nft-rule :: meta mark | 0x00004000 :: kube-proxy@current by name: write packet 0x4000/0x4000 bits
        nft-rule :: meta mark ^ 0x00004000 :: kube-proxy@current by name: read packet 0x4000/0x4000; write packet 0x0/0x4000 bits
        nft-rule :: meta mark | 0x00008000 :: kube-proxy@legacy-kubelet<1.28 by name: write packet 0x8000/0x8000 bits
        nft-rule :: == 0x00008000 drop :: kube-proxy@legacy-kubelet<1.28 by name: read packet 0x8000/0x8000
        nft-rule :: 0xffe4ffff :: calico by name: write packet 0x0/0x1b0000 bits
        ip-rule :: fwmark 0x4000/0x4000 lookup 100 :: kube-proxy@current by value: read packet 0x4000/0x4000
        socket :: SO_MARK 0xca6c :: wg-quick by value: write packet 0xca6c/0xffffffff origin
        socket :: SO_MARK 0x80000 :: tailscale by value: write packet 0x80000/0xffffffff origin
        ",
    );
    let sock = one(&doc, "socket", "SO_MARK 0x80000");
    assert_eq!(sock["pid"], std::process::id(), "{sock:#}");
    let c = conflicts(&doc);
    expect_conflicts(
        &c,
        "
        shared-write calico tailscale 0x80000
        foreign-reader kube-proxy wg-quick 0xc000
        shared-write kube-proxy wg-quick 0xc000
        ",
    );
    assert_eq!(c.len(), 3, "{c:#?}");
    // By bit: 0x8000 is written by kubelet's rule and wg-quick's socket, read by KUBE-FIREWALL.
    let bit = doc["by_bit"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["bit"] == "0x8000" && u["mark"] == "packet")
        .expect("bit 15");
    assert_eq!(bit["writers"].as_array().unwrap().len(), 2, "{bit}");
    assert_eq!(bit["readers"].as_array().unwrap().len(), 1, "{bit}");

    // Human output and --check (CI): exit 1 on conflicts, 0 without.
    let (code, out, _) = cli(&["inventory", "--netns", &lab.a, "--check"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("!! shared-write calico × tailscale"), "{out}");
    assert!(
        out.contains("!! foreign-reader kube-proxy × wg-quick"),
        "{out}"
    );
    assert!(out.contains("0x00008000 (bit 15)  written by"), "{out}");
    let (code, out, _) = cli(&["inventory", "--netns", &lab.b, "--check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("conflicts: none"), "{out}");
    // --all-netns includes the lab's namespaces.
    let (code, out, err) = cli(&["inventory", "--all-netns", "--json"]);
    assert_eq!(code, 0, "{err}");
    let all: Value = serde_json::from_str(&out).unwrap();
    let names: Vec<&str> = all["namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert!(
        names.contains(&lab.a.as_str()) && names.contains(&lab.b.as_str()),
        "{names:?}"
    );
    assert!(has(
        &conflicts(&all),
        "shared-write",
        "calico",
        "tailscale",
        "0x80000"
    ));
}

/// kube-proxy's iptables rules (iptables-nft: values from iptables-nft-save) and the legacy
/// kubelet's firewall in iptables-legacy.
#[test]
fn kube_proxy_iptables_nft_and_kubelet_legacy_rules() {
    let ns = Netns::new("inv-kube");
    restore_rules(
        &ns.name,
        "iptables-nft-restore",
        &real_rules("kube-proxy-nodeport.rules"),
    );
    restore_rules(
        &ns.name,
        "iptables-legacy-restore",
        &real_rules("kubelet-legacy-firewall.rules"),
    );
    let doc = inventory(&ns.name);
    let masq = one(&doc, "nft-rule", "-A KUBE-MARK-MASQ -j MARK");
    check(
        masq,
        "kube-proxy@current by name: write packet 0x4000/0x4000 bits",
    );
    assert_eq!(
        masq["iptables"],
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"
    );
    // Reached from nat PREROUTING and OUTPUT through KUBE-SERVICES … KUBE-SVC/KUBE-SEP.
    let from = reached_from(masq, "hook");
    assert!(
        from.contains(&"prerouting") && from.contains(&"output"),
        "{masq:#}"
    );
    let xor = one(
        &doc,
        "nft-rule",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
    );
    check(
        xor,
        "kube-proxy@current by name: write packet 0x0/0x4000 bits",
    );
    assert_eq!(xor["access"][0]["toggles"], "0x4000");
    expect_entries(
        &doc,
        "
        nft-rule :: -A KUBE-FORWARD :: kube-proxy@current by name: read packet 0x4000/0x4000
        iptables-rule :: --mark 0x8000/0x8000 -j DROP :: kube-proxy@legacy-kubelet<1.28 by name: read packet 0x8000/0x8000
        ",
    );
    // The legacy tables: kubelet's drop bit.
    let drop = one(&doc, "iptables-rule", "KUBE-MARK-DROP -j MARK");
    check(
        drop,
        "kube-proxy@legacy-kubelet<1.28 by name: write packet 0x8000/0x8000 bits",
    );
    assert_eq!(drop["what"], "iptables-rule");
    // One owner, two versions: no conflict.
    assert!(conflicts(&doc).is_empty(), "{:#?}", conflicts(&doc));
}

/// Tailscale's iptables rules and ip rules beside Calico's clear of 0x1b0000: collision #1.
#[test]
fn tailscale_rules_and_calico_collide() {
    let ns = tailscale_node("inv-ts");
    lab::nft(&ns.name, "table inet calico {\n chain cali-POSTROUTING {\n type filter hook postrouting priority mangle; policy accept;\n meta mark set meta mark & 0xffe4ffff\n }\n}\n").expect("nft");
    let doc = inventory(&ns.name);
    expect_entries(
        &doc,
        "
        nft-rule :: -A ts-forward -i tailscale0 -j MARK :: tailscale by name: write packet 0x40000/0xff0000 bits
        nft-rule :: -A ts-forward -m mark --mark 0x40000/0xff0000 -j ACCEPT :: tailscale by name: read packet 0x40000/0xff0000
        nft-rule :: CONNMARK --restore-mark :: tailscale by mask: write packet 0x0/0xff0000 bits
        ",
    );
    let save = one(&doc, "nft-rule", "CONNMARK --save-mark");
    check(
        save,
        "tailscale by mask: read packet 0x0/0xff0000; write ct 0x0/0xff0000 bits",
    );
    assert_eq!(save["access"][1]["copy_from"], "packet");
    let rules = entries(&doc, "ip-rule", "fwmark 0x80000/0xff0000");
    assert_eq!(rules.len(), 6, "v4 and v6, three each: {rules:#?}");
    for r in &rules {
        check(r, "tailscale by value: read packet 0x80000/0xff0000");
    }
    assert!(rules.iter().any(|r| r["family"] == "ipv6"));
    let c = conflicts(&doc);
    expect_conflicts(
        &c,
        "
        shared-write calico tailscale 0x1b0000
        foreign-reader tailscale calico 0x1b0000
        ",
    );
}

/// Istio's TPROXY rules, iptables (TPROXY stays an xt target: its mark comes from
/// iptables-nft-save) and the nftables backend (`inet istio-proxy-*`).
#[test]
fn istio_iptables_and_nftables_backends() {
    let ns = Netns::new("inv-istio");
    restore_rules(
        &ns.name,
        "iptables-nft-restore",
        &real_rules("istio-tproxy.v4.rules"),
    );
    let doc = inventory(&ns.name);
    expect_entries(
        &doc,
        "
        nft-rule :: TPROXY :: istio@sidecar-tproxy by name: write packet 0x539/0xffffffff whole
        nft-rule :: -A ISTIO_DIVERT -j MARK :: istio@sidecar-tproxy by name: write packet 0x539/0xffffffff whole
        ",
    );
    let restore = one(&doc, "nft-rule", "CONNMARK --restore-mark");
    check(restore, "istio@sidecar-tproxy by value: read ct 0x539/0xffffffff; write packet 0x0/0xffffffff whole");

    let nft = Netns::new("inv-istio-nft");
    let text = std::fs::read_to_string(real_rules("istio-nft-tproxy.nft")).unwrap();
    lab::nft(&nft.name, &text).expect("nft");
    let doc = inventory(&nft.name);
    let owner = "istio@sidecar-tproxy-nftables";
    let divert = in_chain(&doc, "istio-divert", "meta mark set");
    check(
        divert,
        "istio@sidecar-tproxy-nftables by name: write packet 0x539/0xffffffff whole",
    );
    let from = reached_from(divert, "chain");
    assert_eq!(from, ["prerouting"], "through istio-inbound: {divert:#}");
    let save = in_chain(&doc, "prerouting", "ct mark set");
    check(save, "istio@sidecar-tproxy-nftables by name: read packet 0x539/0xffffffff; write ct 0x0/0xffffffff whole");
    assert!(doc["owners"].as_array().unwrap().iter().any(|o| o == owner));
    // registry detect knows the backend too.
    let (code, out, _) = cli(&["registry", "detect", "--netns", &nft.name]);
    assert_eq!(code, 0);
    assert!(
        out.contains("istio") && out.contains("istio-proxy-mangle"),
        "{out}"
    );
}

/// wireguard-go, killed when the test ends however it ends, with the UAPI socket it leaves.
struct Child(std::process::Child, String);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

/// What wg-quick sets up (a WireGuard device with fwmark 0xca6c — userspace wireguard-go, this
/// kernel has no WireGuard module —, its nft table and `not fwmark` rule) beside the legacy
/// kubelet's KUBE-FIREWALL: collision #7; plus an xfrm policy with a mark, a tc program
/// setting one and a marked conntrack entry.
#[test]
fn wireguard_xfrm_tc_program_and_conntrack() {
    let lab = Lab::new("inv-wg").expect("lab");
    let ns = lab.a.clone();
    let ifname = format!("wgi{}", std::process::id() % 10000);
    let go = Command::new("ip")
        .args(["netns", "exec", &ns, "wireguard-go", &ifname])
        .env("WG_PROCESS_FOREGROUND", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("wireguard-go (apt install wireguard-go)");
    let sock = format!("/var/run/wireguard/{ifname}.sock");
    let _go = Child(go, sock.clone());
    wait_until(std::time::Duration::from_secs(5), || {
        std::path::Path::new(&sock).exists()
    });
    wg_set(&ns, &ifname);
    // wg-quick's add_default: rule and nft table.
    lab::ip(&ns, "rule add not fwmark 0xca6c table 51820 pref 32765").expect("rule");
    lab::nft(&ns, &format!("table ip wg-quick-{ifname} {{\n chain premangle {{\n type filter hook prerouting priority mangle; policy accept;\n meta l4proto udp meta mark set ct mark\n }}\n chain postmangle {{\n type filter hook postrouting priority mangle; policy accept;\n meta l4proto udp meta mark 0x0000ca6c ct mark set meta mark\n }}\n}}\n"))
        .expect("nft");
    restore_rules(
        &ns,
        "iptables-nft-restore",
        &real_rules("kubelet-legacy-firewall.rules"),
    );
    // Weave's IPsec bit on a blocking policy; a marked conntrack entry; a tc program.
    lab::ip(&ns, "xfrm policy add dir out src 10.0.0.0/24 dst 10.1.0.0/24 mark 0x20000 mask 0x20000 action block")
        .expect("xfrm policy");
    lab::exec(
        &ns,
        &[
            "conntrack",
            "-I",
            "-p",
            "udp",
            "-s",
            "10.77.0.1",
            "-d",
            "10.77.0.2",
            "--sport",
            "4000",
            "--dport",
            "4001",
            "--timeout",
            "120",
            "--mark",
            "0x80",
        ],
    )
    .expect("conntrack -I");
    let (_link, prog_id) = attach_mark_setter(&ns, lab::VETH_A, 0x200);

    let doc = inventory(&ns);
    let wg = one(&doc, "wireguard", &ifname);
    check(
        wg,
        "wg-quick by value: write packet 0xca6c/0xffffffff origin",
    );
    assert_eq!(
        (wg["implementation"].as_str(), wg["listen_port"].as_u64()),
        (Some("userspace"), Some(51820))
    );
    // wireguard-go's own UDP sockets carry the fwmark too, with their process.
    let socks = entries(&doc, "socket", "SO_MARK 0xca6c");
    assert!(
        !socks.is_empty() && socks.iter().all(|s| s["comm"] == "wireguard-go"),
        "{socks:#?}"
    );
    expect_entries(
        &doc,
        "
        ip-rule :: not fwmark 0xca6c :: wg-quick by value: read packet 0xca6c/0xffffffff
        nft-rule :: meta mark set ct mark :: wg-quick by name: write packet 0x0/0xffffffff whole
        xfrm-policy :: mark 0x20000/0x20000 :: weave by value: read packet 0x20000/0x20000
        ",
    );
    let ct = doc["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["what"] == "conntrack")
        .expect("conntrack");
    check(
        ct,
        "aws-vpc-cni@iptables by value: holds ct 0x80/0xffffffff",
    );
    let prog = one(&doc, "bpf-program", "test_setmark");
    assert_eq!(prog["id"], prog_id);
    assert_eq!(prog["attached"][0]["via"], "tcx");
    assert_eq!(prog["attached"][0]["direction"], "egress");
    check(prog, "cilium by value: write packet 0x200/0xffffffff whole");
    let c = conflicts(&doc);
    expect_conflicts(
        &c,
        "
        foreign-reader kube-proxy wg-quick 0xc000
        whole-overwrite wg-quick kube-proxy 0xc000
        exact-match wg-quick kube-proxy 0xc000
        ",
    );
    let _ = lab::ip(&ns, &format!("link del {ifname}"));
}

#[test]
fn bad_input_is_one_clear_error() {
    require_root();
    let (code, _, err) = cli(&["inventory", "--netns", "fwmt-no-such-netns"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("network namespace \"fwmt-no-such-netns\" not found"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let (code, _, err) = cli(&["inventory", "--check", "--netns", "fwmt-no-such-netns"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli(&["inventory", "--netns", "x", "--all-netns"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, _, err) = cli(&["inventory", "--bogus"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = cli(&["inventory", "--owners", "calicoo"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown owner \"calicoo\""), "{err}");
}

/// A cgroup skb program assigning Calico eBPF's bypass mark (whole, 0x3000000, as its raw
/// OUTPUT rule does): cgroups are not bound to a namespace, so it is listed node-wide.
#[test]
fn cgroup_program_is_node_wide() {
    require_root();
    let _alone = NODE_WIDE.write().unwrap_or_else(|e| e.into_inner());
    let fd = cgroup_mark_setter(0x3000000);
    let ns = Netns::new("inv-cg");
    let doc = inventory_alone(&ns.name);
    let e = one(&doc, "bpf-program", "test_cg_mark");
    assert!(e["netns"].is_null(), "{e:#}");
    assert_eq!(e["prog_type"], "cgroup-skb");
    check(
        e,
        "calico-ebpf by value: write packet 0x3000000/0xffffffff whole",
    );
    let (_, out, _) = run(&["inventory", "--netns", &ns.name]);
    assert!(
        out.contains("node-wide (cgroup programs, in every namespace): "),
        "{out}"
    );
    drop(fd);
}

/// A kernel WireGuard device's fwmark (generic netlink) and a raw socket's SO_MARK (raw_diag),
/// where the kernel has them: Debian's 6.12 in `cargo xtask vm-test --kernel 6.12 --run …`
/// (this machine's kernel has neither module). Elsewhere it says so and stops.
#[test]
fn kernel_wireguard_and_raw_socket_marks() {
    use std::os::fd::{FromRawFd, OwnedFd};
    require_root();
    for module in ["wireguard", "raw_diag"] {
        let _ = Command::new("modprobe")
            .arg(module)
            .stderr(std::process::Stdio::null())
            .status();
    }
    let ns = Netns::new("inv-kwg");
    if lab::ip(&ns.name, "link add wg0 type wireguard").is_err() {
        eprintln!("kernel_wireguard_and_raw_socket_marks: this kernel has no WireGuard: not run");
        return;
    }
    wg_set(&ns.name, "wg0");
    // A raw ICMP socket with Istio's 0x539, held open in the namespace.
    let raw = in_netns(&ns.name, || {
        // SAFETY: a new socket we own, and a u32 option value.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let mark: u32 = 0x539;
            let rc = libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                4,
            );
            assert_eq!(rc, 0);
            OwnedFd::from_raw_fd(fd)
        }
    });
    let doc = inventory(&ns.name);
    let wg = one(&doc, "wireguard", "wg0");
    assert_eq!(wg["implementation"], "kernel", "{wg:#}");
    assert_eq!(wg["listen_port"], 51820);
    check(
        wg,
        "wg-quick by value: write packet 0xca6c/0xffffffff origin",
    );
    if std::path::Path::new("/sys/module/raw_diag").exists() {
        let r = one(&doc, "socket", "SO_MARK 0x539");
        assert_eq!(r["proto"], "raw", "{r:#}");
        assert_eq!(r["owner"]["name"], "istio", "{r:#}");
    } else {
        eprintln!("kernel_wireguard_and_raw_socket_marks: no raw_diag: raw sockets not checked");
    }
    drop(raw);
}

/// A flow matching and setting pkt_mark, and one matching ct_mark, loading bits 8..9 of
/// pkt_mark and committing a ct_mark bit, on a bridge that speaks only OpenFlow13: each is an
/// `ovs-flow` entry with its reads and writes, in the namespace of the bridge's interface
/// (ovs-vswitchd's) and not in another one.
#[test]
fn open_vswitch_flows() {
    require_root();
    let Some(ovs) = Ovs::start("inv-ovs", Datapath::Userspace) else {
        return;
    };
    let dir = ovs.dir.0.to_str().unwrap().to_owned();
    let br = ovs.bridge.as_str();
    ovs.add_bridge(&["protocols=OpenFlow13"]);
    for flow in [
        "table=0,priority=100,pkt_mark=0x4/0x4,actions=set_field:0x7->pkt_mark,normal",
        "table=1,cookie=0x2a,priority=5,ip,ct_mark=0x1/0x1,actions=load:0x3->NXM_NX_PKT_MARK[8..9],ct(commit,exec(set_field:0x20/0x20->ct_mark)),resubmit(,2)",
        "table=2,priority=1,actions=drop",
    ] {
        ovs.tool("ovs-ofctl", &["-O", "OpenFlow13", "add-flow", br, flow])
            .unwrap_or_else(|e| panic!("add-flow {flow}: {e}"));
    }

    let inventory_with_ovs = |ns: &str| -> Value {
        let _others = NODE_WIDE.read().unwrap_or_else(|e| e.into_inner());
        let out = Command::new(bin())
            .args(["inventory", "--netns", ns, "--json"])
            .env("OVS_RUNDIR", &dir)
            .output()
            .expect("run fwmark-trace");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("bad JSON ({e}): {stdout}"))
    };
    let doc = inventory_with_ovs(&ovs.ns.name);
    assert!(
        doc["notes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["source"] != "ovs"),
        "{:#}",
        doc["notes"]
    );
    let flows = entries(&doc, "ovs-flow", "");
    assert_eq!(flows.len(), 2, "the drop flow has no mark: {flows:#?}");
    let accesses = |e: &Value| -> Vec<String> {
        e["access"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let s = |k: &str| a[k].as_str().unwrap_or("-").to_owned();
                format!(
                    "{} {} {}/{} {}",
                    s("op"),
                    s("mark"),
                    s("value"),
                    s("mask"),
                    s("scope")
                )
            })
            .collect()
    };
    let set = one(&doc, "ovs-flow", "pkt_mark=0x4/0x4");
    assert_eq!(
        (
            &set["bridge"],
            &set["table"],
            &set["priority"],
            &set["cookie"]
        ),
        (
            &Value::from(br),
            &Value::from(0),
            &Value::from(100),
            &Value::from("0x0")
        ),
        "{set:#}"
    );
    assert_eq!(
        set["text"], "priority=100,pkt_mark=0x4/0x4 actions=set_field:0x7->pkt_mark,NORMAL",
        "{set:#}"
    );
    assert_eq!(
        accesses(set),
        ["read packet 0x4/0x4 -", "write packet 0x7/0xffffffff whole"],
        "{set:#}"
    );
    let ct = one(&doc, "ovs-flow", "ct_mark=0x1/0x1");
    assert_eq!(
        (&ct["table"], &ct["priority"], &ct["cookie"]),
        (&Value::from(1), &Value::from(5), &Value::from("0x2a")),
        "{ct:#}"
    );
    assert_eq!(
        accesses(ct),
        [
            "read ct 0x1/0x1 -",
            "write packet 0x300/0x300 bits",
            "write ct 0x20/0x20 bits"
        ],
        "{ct:#}"
    );
    // The same OVS seen from another namespace: its bridges are not there.
    let other = Netns::new("inv-ovs-other");
    let doc = inventory_with_ovs(&other.name);
    assert!(entries(&doc, "ovs-flow", "").is_empty(), "{doc:#}");
}

// Issue 21, item 10: an inventory that bit overlap cannot fool. A whole assignment writes
// every bit, an unowned one too; attribution by mask alone is a guess that never silences a
// conflict; tc programs are known by their owners' program names. Each case below passed
// `--check` before.

/// The conflict of `kind` between `a` and `b` (in that order), as JSON.
fn conflict<'a>(doc: &'a Value, kind: &str, a: &str, b: &str) -> &'a Value {
    doc["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == kind && c["owners"][0] == a && c["owners"][1] == b)
        .unwrap_or_else(|| panic!("no {kind} {a} × {b} among {:#}", doc["conflicts"]))
}

/// `--check`'s exit code in `ns`, with its output.
fn check_exit(ns: &str) -> (i32, String) {
    let (code, out, err) = cli(&["inventory", "--netns", ns, "--check"]);
    (code, format!("{out}{err}"))
}

/// Tailscale's rules (iptables-nft and ip rules, from its own test case) in a new namespace
/// with a `tailscale0` device.
fn tailscale_node(tag: &str) -> Netns {
    let ns = Netns::new(tag);
    lab::ip(&ns.name, "link add tailscale0 type veth peer name ts-peer").expect("veth");
    for dev in ["tailscale0", "ts-peer"] {
        lab::ip(&ns.name, &format!("link set {dev} up")).expect("link up");
    }
    restore_rules(
        &ns.name,
        "iptables-nft-restore",
        &real_rules("tailscale-subnet-router.v4.rules"),
    );
    ip_lines(&ns.name, &real_rules("tailscale-subnet-router.ip"));
    ns
}

/// A Cilium endpoint's host-side veth `lxc1` in `ns`, with a cls_bpf program named as
/// Cilium names its from-container program (`cil_from_container`, kept by the kernel as
/// `cil_from_contai`) assigning the whole mark `mark`, as `set_identity_mark` and the IPsec
/// path do (cilium/cilium bpf/lib/identity.h, bpf_lxc.c).
fn cilium_endpoint(ns: &str, mark: u32) {
    lab::ip(ns, "link add lxc1 type veth peer name lxc1-pod").expect("veth");
    for dev in ["lxc1", "lxc1-pod"] {
        lab::ip(ns, &format!("link set {dev} up")).expect("link up");
    }
    attach_named_clsact_mark_setter(ns, "lxc1", "cil_from_container", mark);
}

/// Reviewer's case 1: `meta mark set 0x1` in a prerouting chain of a table nobody owns
/// erases Tailscale's bypass bit, which `ip rule fwmark 0x80000/0xff0000` reads. It is a
/// write of every bit (by bit: among the writers of 0x80000) and conflicts with Tailscale,
/// though no owner is found for it.
#[test]
fn an_unowned_whole_assignment_writes_every_bit_and_conflicts() {
    let ns = tailscale_node("inv-whole");
    lab::nft(&ns.name, "table inet t {\n chain pre {\n type filter hook prerouting priority mangle; policy accept;\n meta mark set 0x1\n }\n}\n").expect("nft");
    let doc = inventory(&ns.name);
    let set = one(&doc, "nft-rule", "meta mark set 0x00000001");
    assert!(set["owner"].is_null(), "{set:#}");
    assert_eq!(
        (
            &set["access"][0]["op"],
            &set["access"][0]["value"],
            &set["access"][0]["mask"],
            &set["access"][0]["scope"]
        ),
        (
            &Value::from("write"),
            &Value::from("0x1"),
            &Value::from("0xffffffff"),
            &Value::from("whole")
        ),
        "{set:#}"
    );
    let id = set["id"].clone();
    let bypass = doc["by_bit"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["bit"] == "0x80000" && u["mark"] == "packet")
        .expect("bit 19");
    assert!(
        bypass["writers"].as_array().unwrap().contains(&id),
        "{bypass}"
    );
    expect_conflicts(
        &conflicts(&doc),
        "
        whole-overwrite unowned tailscale 0xff0000
        foreign-reader tailscale unowned 0xff0000
        ",
    );
    let c = conflict(&doc, "whole-overwrite", "unowned", "tailscale");
    assert!(c["entries"].as_array().unwrap().contains(&id), "{c:#}");
    let (code, out) = check_exit(&ns.name);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("!! whole-overwrite unowned × tailscale: something unowned assigns the whole packet mark"),
        "{out}"
    );
}

/// Reviewer's case 2 (and tailscale/tailscale#4917's shape): a rule in a table with a
/// neutral name clearing exactly Tailscale's bypass bit fits only Tailscale's bits. It is
/// attributed to Tailscale by mask, marked as a guess, and stays a conflict with Tailscale's
/// own rules; Tailscale's connmark restore (a copy of its own bits, by mask too) is no
/// conflict.
#[test]
fn a_guess_by_mask_never_silences_a_conflict() {
    let ns = tailscale_node("inv-guess");
    // Tailscale alone: its restore (by mask) copies its own bits, no conflict.
    let (code, out) = check_exit(&ns.name);
    assert_eq!(code, 0, "{out}");
    lab::nft(&ns.name, "table inet mangle2 {\n chain post {\n type filter hook postrouting priority mangle; policy accept;\n meta mark set meta mark & 0xfff7ffff\n }\n}\n").expect("nft");
    let doc = inventory(&ns.name);
    let clear = one(&doc, "nft-rule", "meta mark & 0xfff7ffff");
    check(clear, "tailscale by mask: write packet 0x0/0x80000 bits");
    assert_eq!(clear["owner"]["guess"], true, "{clear:#}");
    let restore = one(&doc, "nft-rule", "CONNMARK --restore-mark");
    check(restore, "tailscale by mask: write packet 0x0/0xff0000 bits");
    expect_conflicts(
        &conflicts(&doc),
        "
        shared-write tailscale unowned 0x80000
        foreign-reader tailscale unowned 0x80000
        ",
    );
    for c in doc["conflicts"].as_array().unwrap() {
        assert_eq!(
            c["guesses"],
            Value::from(vec![clear["id"].clone()]),
            "{c:#}"
        );
    }
    let (code, out) = check_exit(&ns.name);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("→ tailscale (by mask, a guess)")
            && out.contains("!! shared-write tailscale × unowned")
            && out.contains(&format!("not named: #{} tailscale", clear["id"])),
        "{out}"
    );
}

/// cilium/cilium#21330: Cilium's from-container program assigns the whole mark, identity in
/// the upper half and cluster ID 133 (0x85) in the low byte; AWS VPC CNI's CONNMARK restore
/// under 0x80 (its iptables rules, aws/amazon-vpc-cni-k8s pkg/networkutils/network.go, as its
/// network_test.go expects them) rewrites bit 7 of it. The program is Cilium's by its name.
#[test]
fn cilium_program_and_aws_vpc_cni_restore_collide() {
    let ns = Netns::new("inv-cil-aws");
    cilium_endpoint(&ns.name, 0x1234_0f85);
    let rules = Scratch::file("aws-cni", "rules");
    std::fs::write(
        &rules.0,
        "*mangle
-A PREROUTING -i eth0 -m comment --comment \"AWS, primary ENI\" -m addrtype --dst-type LOCAL --limit-iface-in -j CONNMARK --set-mark 0x80/0x80
-A PREROUTING -i eni+ -m comment --comment \"AWS, primary ENI\" -j CONNMARK --restore-mark --mask 0x80
COMMIT
*nat
:AWS-CONNMARK-CHAIN-0 - [0:0]
-A PREROUTING -i eni+ -m comment --comment \"AWS, outbound connections\" -j AWS-CONNMARK-CHAIN-0
-A PREROUTING -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --restore-mark --mask 0x80
-A AWS-CONNMARK-CHAIN-0 -d 10.0.0.0/16 -m comment --comment \"AWS CONNMARK CHAIN, VPC CIDR\" -j RETURN
-A AWS-CONNMARK-CHAIN-0 -m comment --comment \"AWS, CONNMARK\" -j CONNMARK --set-xmark 0x80/0x80
COMMIT
",
    )
    .unwrap();
    restore_rules(&ns.name, "iptables-nft-restore", &rules.0);
    lab::ip(&ns.name, "rule add pref 1024 fwmark 0x80/0x80 lookup main").expect("ip rule");
    let doc = inventory(&ns.name);
    let prog = one(&doc, "bpf-program", "cil_from_contai");
    assert_eq!(prog["attached"][0]["via"], "clsact", "{prog:#}");
    check(
        prog,
        "cilium by name: write packet 0x12340f85/0xffffffff whole",
    );
    let restores = entries(
        &doc,
        "nft-rule",
        "--restore-mark --nfmask 0x80 --ctmask 0x80",
    );
    assert_eq!(restores.len(), 2, "mangle and nat: {restores:#?}");
    for r in &restores {
        check(
            r,
            "aws-vpc-cni@iptables by mask: write packet 0x0/0x80 bits",
        );
    }
    expect_entries(
        &doc,
        "
        ip-rule :: fwmark 0x80/0x80 :: aws-vpc-cni@iptables by value: read packet 0x80/0x80
        nft-rule :: AWS-CONNMARK-CHAIN-0 -m comment --comment \"AWS, CONNMARK\" :: aws-vpc-cni@iptables by name: write ct 0x80/0x80 bits
        ",
    );
    expect_conflicts(
        &conflicts(&doc),
        "
        whole-overwrite cilium aws-vpc-cni 0x80
        foreign-reader aws-vpc-cni cilium 0x80
        ",
    );
    let c = conflict(&doc, "whole-overwrite", "cilium", "aws-vpc-cni");
    for r in &restores {
        assert!(c["entries"].as_array().unwrap().contains(&r["id"]), "{c:#}");
    }
    let (code, out) = check_exit(&ns.name);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("→ cilium (by name)"), "{out}");
}

/// cilium/cilium#35338 (#36104): Cilium's identity bits carry Tailscale's 0x80000 (identity
/// 8: 0x00080f00), so Tailscale's `fwmark 0x80000/0xff0000` rules route Cilium's packets.
#[test]
fn cilium_identity_and_tailscale_collide() {
    let ns = tailscale_node("inv-cil-ts");
    cilium_endpoint(&ns.name, 0x0008_0f00);
    let doc = inventory(&ns.name);
    check(
        one(&doc, "bpf-program", "cil_from_contai"),
        "cilium by name: write packet 0x80f00/0xffffffff whole",
    );
    expect_conflicts(
        &conflicts(&doc),
        "
        whole-overwrite cilium tailscale 0xff0000
        foreign-reader tailscale cilium 0xff0000
        ",
    );
    assert_eq!(check_exit(&ns.name).0, 1);
}

/// cilium/cilium#12185: a mangle rule `MARK and 0xfff1ffff` (a built-in chain: no name)
/// strips bits 17-19 of Cilium's identity. The rule fits only Tailscale's bits (a guess,
/// Tailscale is not here): the conflict is Cilium's with something unowned.
#[test]
fn a_mangle_and_mark_and_cilium_identity_collide() {
    let ns = Netns::new("inv-cil-and");
    cilium_endpoint(&ns.name, 0x1234_0f00);
    let rules = Scratch::file("and-mark", "rules");
    std::fs::write(
        &rules.0,
        "*mangle\n-A POSTROUTING -j MARK --and-mark 0xfff1ffff\nCOMMIT\n",
    )
    .unwrap();
    restore_rules(&ns.name, "iptables-nft-restore", &rules.0);
    let doc = inventory(&ns.name);
    let and = one(&doc, "nft-rule", "-A POSTROUTING -j MARK");
    check(and, "tailscale by mask: write packet 0x0/0xe0000 bits");
    expect_conflicts(&conflicts(&doc), "whole-overwrite cilium unowned 0xe0000");
    let c = conflict(&doc, "whole-overwrite", "cilium", "unowned");
    assert_eq!(c["guesses"], Value::from(vec![and["id"].clone()]), "{c:#}");
    assert_eq!(check_exit(&ns.name).0, 1);
}

/// cilium/cilium#8516, #15350: Cilium's IPsec mark (MARK_MAGIC_ENCRYPT 0xe00, key index 8
/// in 0xf000: 0x8e00) carries the legacy kubelet's drop bit 0x8000, which KUBE-FIREWALL
/// drops, and clears its masquerade bit 0x4000 (kubelet's real rules).
#[test]
fn cilium_ipsec_key_and_kubelet_drop_bit_collide() {
    let ns = Netns::new("inv-cil-ipsec");
    cilium_endpoint(&ns.name, 0x8e00);
    restore_rules(
        &ns.name,
        "iptables-nft-restore",
        &real_rules("kubelet-legacy-firewall.rules"),
    );
    let doc = inventory(&ns.name);
    check(
        one(&doc, "bpf-program", "cil_from_contai"),
        "cilium by name: write packet 0x8e00/0xffffffff whole",
    );
    expect_conflicts(
        &conflicts(&doc),
        "
        whole-overwrite cilium kube-proxy 0xc000
        foreign-reader kube-proxy cilium 0xc000
        ",
    );
    assert_eq!(check_exit(&ns.name).0, 1);
}
