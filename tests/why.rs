//! `fwmark-trace why` against real kernel state: one scenario per cause of a disappearing
//! reply. Topology: A and B joined by two veth pairs (veth-a/veth-b and a2/b2); B serves UDP
//! echo on 10.9.9.9:7; A routes 10.9.9.9 via veth-a in main and via a2 in table 100 for
//! `fwmark 0x4000/0x4000`; B sends everything for A's 10.77.0.1 back through b2, so replies
//! arrive on a2. The client in A marks its requests 0x4000 with SO_MARK.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use fwmark_trace_tests::*;
use serde_json::Value;

fn two_path(tag: &str) -> Lab {
    let lab = Lab::new(tag).expect("lab");
    lab.add_second_path().expect("second path");
    lab
}

/// Runs `why --json` in A while the client talks to the echo server (see `why_at`).
fn why(lab: &Lab, extra: &[&str]) -> (Value, bool, i32) {
    why_then(lab, extra, || {})
}

/// `why`, with `after` run once the client is done, while `why` still watches.
fn why_then(lab: &Lab, extra: &[&str], after: impl FnOnce()) -> (Value, bool, i32) {
    why_at(
        lab,
        &Watch {
            extra,
            ..Watch::echo(lab)
        },
        after,
    )
}

/// One `why` run: where it watches, what it selects, the echo server's address in B, the
/// client's target and SO_MARK, and the prefix of the flow label to report on.
struct Watch<'a> {
    ns: &'a str,
    select: &'a [&'a str],
    extra: &'a [&'a str],
    server: (&'a str, u16),
    target: (&'a str, u16),
    client_mark: u32,
    /// Another client instead of the UDP echo one (true: it got its reply).
    client: Option<&'a dyn Fn() -> bool>,
    flow: &'a str,
}

impl<'a> Watch<'a> {
    /// The client in A, marking its requests 0x4000, talks to the echo service; `why` in A.
    fn echo(lab: &'a Lab) -> Self {
        Watch {
            ns: &lab.a,
            select: &["--port", "7"],
            extra: &[],
            server: (lab::SERVICE, 7),
            target: (lab::SERVICE, 7),
            client_mark: 0x4000,
            client: None,
            flow: "udp 10.77.0.1:",
        }
    }

    /// `ping` (a raw-socket echo request from A to B) instead; `why` in A.
    fn ping(lab: &'a Lab, ping: &'a dyn Fn() -> bool) -> Self {
        Watch {
            select: &["--proto", "icmp", "--all"],
            server: (lab::ADDR_B, 7),
            client: Some(ping),
            flow: "icmp 10.77.0.1 -> 10.77.0.2",
            ..Watch::echo(lab)
        }
    }
}

/// Starts `fwmark-trace ARGS` (a `why`) and waits for its READY=1 on $NOTIFY_SOCKET, as
/// systemd would; its stderr lines arrive on the receiver.
fn why_ready(
    args: &[&str],
    stdout: Stdio,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let notify = NotifySocket::new();
    let mut child = Command::new(bin())
        .args(args)
        .env("NOTIFY_SOCKET", &notify.path)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = line_reader(child.stderr.take().unwrap());
    if let Err(why) = notify.wait_ready(&mut child) {
        panic!("{why}: {:#?}", stderr.try_iter().collect::<Vec<_>>());
    }
    (child, stderr)
}

/// Every part is in the report's summary.
fn assert_summary_has(r: &Value, parts: &[&str]) {
    let summary = r["summary"].as_str().unwrap();
    for part in parts {
        assert!(summary.contains(part), "{part:?} missing: {summary}");
    }
}

/// Runs `why --json` while the client talks to the echo server; returns the report for the
/// flow, whether the client got a reply, and `why`'s exit code (README: 1 when a watched flow
/// lost its reply, 0 when every one was delivered).
fn why_at(lab: &Lab, w: &Watch, after: impl FnOnce()) -> (Value, bool, i32) {
    require_root();
    let stop = StopOnDrop::new();
    let server = lab::echo_server(&lab.b, w.server.0, w.server.1, stop.flag());
    let mut args = vec!["why", "--netns", w.ns, "--duration", "4s", "--json"];
    args.extend(w.select.iter().chain(w.extra));
    let (child, stderr) = why_ready(&args, Stdio::piped());
    let replied = match w.client {
        Some(client) => client(),
        None => lab::echo_client(&lab.a, w.target.0, w.target.1, w.client_mark).expect("client"),
    };
    after();
    let out = child.wait_with_output().unwrap();
    drop(stop);
    server.join().unwrap().expect("echo server");
    let log: Vec<String> = stderr.try_iter().collect();
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "why output is not JSON ({e}): {}\n{log:#?}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    check_why(&doc);
    let flow = doc["flows"]
        .as_array()
        .and_then(|f| {
            f.iter()
                .find(|f| f["flow"].as_str().is_some_and(|s| s.starts_with(w.flow)))
        })
        .cloned()
        .unwrap_or_else(|| panic!("no report for the flow: {doc:#}"));
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("why: {}", out.status));
    (flow, replied, code)
}

#[test]
fn cause1_policy_routed_request_unmarked_reply_fails_rp_filter() {
    let lab = two_path("why-rpf");
    lab::sysctl(
        &lab.a,
        &[
            ("all.rp_filter", "1"),
            ("a2.rp_filter", "1"),
            ("all.src_valid_mark", "0"),
        ],
    )
    .expect("sysctl");
    let (r, replied, code) = why(&lab, &[]);
    assert!(!replied, "the reply should die");
    assert_eq!(r["verdict"], "rp-filter", "{r:#}");
    assert_eq!(code, 1, "why's exit code for a lost reply");
    assert_eq!(r["drop"]["reason"], "IP_RPFILTER");
    let summary = r["summary"].as_str().unwrap();
    assert!(
        summary.contains("`1000: fwmark 0x4000/0x4000 lookup 100` did not match"),
        "{summary}"
    );
    assert!(
        summary.contains("table main → reverse path to 10.9.9.9 via veth-a"),
        "{summary}"
    );
    assert!(
        summary.contains("≠ arrival a2") && summary.contains("src_valid_mark=0"),
        "{summary}"
    );
    assert_eq!(r["mark_diff"]["bits"], "0x4000");
    // The request's routing lookup found table 100.
    assert!(
        r["request"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["table"] == 100 && s["route_result"] == "ok"),
        "{r:#}"
    );
}

/// The operator fixes rp_filter while `why` still watches: the verdict must still explain the
/// drop with the state in force when the reply died, and say that the state changed later.
#[test]
fn verdict_uses_the_state_in_force_when_the_reply_died() {
    let lab = two_path("why-chg");
    let strict = [
        ("all.rp_filter", "1"),
        ("a2.rp_filter", "1"),
        ("all.src_valid_mark", "0"),
    ];
    lab::sysctl(&lab.a, &strict).expect("sysctl");
    let (r, replied, code) = why_then(&lab, &[], || {
        lab::sysctl(&lab.a, &[("all.rp_filter", "0"), ("a2.rp_filter", "0")]).expect("sysctl");
        // A rule change arrives as a netlink notification (a full re-read).
        lab::ip(
            &lab.a,
            "rule add fwmark 0x8000/0x8000 lookup 200 priority 900",
        )
        .expect("ip rule");
    });
    assert!(!replied, "the reply should die");
    assert_eq!(r["verdict"], "rp-filter", "{r:#}");
    assert_eq!(code, 1, "why's exit code for a lost reply");
    // The values in force at the drop, not the fixed ones read at the end.
    let summary = r["summary"].as_str().unwrap();
    assert!(
        summary.contains("rp_filter=1, src_valid_mark=0"),
        "{summary}"
    );
    let evidence: Vec<&str> = r["evidence"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        evidence.iter().any(|e| e.contains("node state changed")
            && e.contains("sysctls")
            && e.contains("after the flow's last packet")),
        "{evidence:#?}"
    );
    assert!(
        evidence
            .iter()
            .any(|e| e.contains("node state changed") && e.contains("ip rules")),
        "{evidence:#?}"
    );
}

/// B marks what arrives on veth-b with `STMT 0x10` (`ct mark set`, `meta mark set`) and
/// `fwmark 0x10 lookup 110` would route replies back via veth-b; the main table says b2.
fn server_routes_by_mark(tag: &str, stmt: &str) -> Lab {
    let lab = two_path(tag);
    lab::nft(
        &lab.b,
        &format!("table inet srv {{\n chain pre {{ type filter hook prerouting priority mangle; policy accept; iifname \"veth-b\" {stmt} 0x10; }}\n}}\n"),
    )
    .expect("nft");
    lab::ip(
        &lab.b,
        &format!("route add {}/32 dev veth-b table 110", lab::ADDR_A),
    )
    .expect("route");
    lab::ip(&lab.b, "rule add fwmark 0x10/0x10 lookup 110 pref 900").expect("rule");
    lab
}

/// Cause 1 seen from the server: requests arriving on veth-b get ct mark 0x10, and
/// `fwmark 0x10 lookup 110` would send replies back the same way, but nothing restores the ct
/// mark onto the reply: it takes the main table and leaves by b2.
#[test]
fn cause1_server_side_reply_leaves_by_another_interface() {
    let lab = server_routes_by_mark("why-srv", "ct mark set");
    let (r, _, code) = why_at(
        &lab,
        &Watch {
            ns: &lab.b,
            client_mark: 0,
            select: &["--port", "7", "--all"],
            ..Watch::echo(&lab)
        },
        || {},
    );
    assert_eq!(r["verdict"], "reply-misrouted", "{r:#}");
    assert_eq!(code, 1, "why's exit code for a misrouted reply");
    assert_summary_has(
        &r,
        &[
            "left via b2, not veth-b",
            "ct mark 0x10 was not restored",
            "`900: fwmark 0x10/0x10 lookup 110` did not match",
            "table main",
        ],
    );
    assert!(
        r["evidence"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().contains("meta mark set ct mark")),
        "{r:#}"
    );
}

/// The kernel answers pings itself: marked echo requests (0x10 on arrival at veth-b) would have
/// their replies routed back by `fwmark 0x10 lookup 110`, but the reply takes the request's mark
/// only with net.ipv4.fwmark_reflect=1. Off: it leaves by b2 and why says so; on: it leaves
/// where the request arrived.
#[test]
fn server_side_echo_reply_takes_the_mark_only_with_fwmark_reflect() {
    let lab = server_routes_by_mark("why-refl", "meta mark set");
    let ping = || ping_raw(&lab.a, lab::ADDR_B);
    let watch = |reflect: &str| {
        lab::exec(
            &lab.b,
            &[
                "sysctl",
                "-qw",
                &format!("net.ipv4.fwmark_reflect={reflect}"),
            ],
        )
        .expect("sysctl");
        why_at(
            &lab,
            &Watch {
                ns: &lab.b,
                ..Watch::ping(&lab, &ping)
            },
            || {},
        )
    };
    let (off, _, code) = watch("0");
    assert_eq!(off["verdict"], "reply-misrouted", "{off:#}");
    assert_eq!(code, 1, "why's exit code for a misrouted reply");
    let summary = off["summary"].as_str().unwrap();
    for part in [
        "left via b2, not veth-b",
        "fwmark_reflect=0",
        "`900: fwmark 0x10/0x10 lookup 110` did not match",
    ] {
        assert!(summary.contains(part), "{part:?} missing: {summary}");
    }
    let (on, _, code) = watch("1");
    assert_eq!(on["verdict"], "reply-sent", "{on:#}");
    assert_eq!(code, 0, "why's exit code for a reply sent");
    assert!(
        on["summary"].as_str().unwrap().contains("left via veth-b"),
        "{on:#}"
    );
}

/// ping reads echo replies from a raw socket, which gets a clone; the original then finds no
/// ping socket (NO_SOCKET). That is a delivered reply, not a lost one.
#[test]
fn ping_reply_read_from_a_raw_socket_is_delivered() {
    let lab = Lab::new("why-ping").expect("lab");
    let ping = || ping_raw(&lab.a, lab::ADDR_B);
    let (r, replied, code) = why_at(&lab, &Watch::ping(&lab, &ping), || {});
    assert!(replied, "the echo reply should reach the raw socket");
    assert_eq!(r["verdict"], "delivered", "{r:#}");
    assert_eq!(code, 0, "why's exit code for a delivered reply");
}

const CONNMARK: &str = "table inet cm {
 chain out { type route hook output priority mangle; policy accept; ct mark set meta mark; }
 chain pre { type filter hook prerouting priority mangle; policy accept; meta mark set ct mark; }
}\n";

#[test]
fn cause2_connmark_restore_with_the_wrong_mask_loses_a_bit() {
    let lab = two_path("why-cm");
    lab::sysctl(
        &lab.a,
        &[("all.rp_filter", "1"), ("all.src_valid_mark", "1")],
    )
    .expect("sysctl");
    lab::nft(&lab.a, CONNMARK).unwrap();
    lab::nft(
        &lab.a,
        "table inet other {
 chain raw { type filter hook prerouting priority raw; policy accept; iifname \"a2\" meta mark set meta mark | 0x100; }
 chain in { type filter hook input priority 0; policy accept; iifname \"a2\" udp sport 7 meta mark & 0x100 == 0 drop; }
}\n",
    )
    .unwrap();
    let (r, replied, code) = why(&lab, &[]);
    assert!(!replied);
    assert_eq!(r["verdict"], "connmark-restore-mask", "{r:#}");
    assert_eq!(code, 1, "why's exit code for a lost reply");
    assert!(
        r["summary"].as_str().unwrap().contains("losing bits 0x100"),
        "{r:#}"
    );
    assert_eq!(r["drop"]["reason"], "NETFILTER_DROP");
}

#[test]
fn cause3_filter_drops_replies_without_the_bit() {
    let lab = two_path("why-nf");
    lab::sysctl(&lab.a, &[("all.rp_filter", "0"), ("a2.rp_filter", "0")]).expect("sysctl");
    lab::nft(
        &lab.a,
        "table inet f {\n chain in { type filter hook input priority 0; policy accept; iifname \"a2\" udp sport 7 meta mark & 0x4000 == 0 drop; }\n}\n",
    )
    .unwrap();
    // Without --nftrace: the dropping rule is named from the ruleset in force, with the bits
    // its test looks at and whose they are.
    let (r, replied, code) = why(&lab, &[]);
    assert!(!replied);
    assert_eq!(r["verdict"], "netfilter-drop", "{r:#}");
    assert_eq!(code, 1, "why's exit code for a lost reply");
    let summary = r["summary"].as_str().unwrap();
    assert!(
        summary.contains("meta mark & 0x00004000 == 0x00000000 drop` in inet f/in, which tests bits 0x4000: kube-proxy"),
        "{summary}"
    );
    let evidence = r["evidence"].to_string();
    assert!(
        evidence.contains("dropping rule in inet f/in")
            && evidence.contains("tests mark & 0x4000 == 0x0")
            && evidence.contains("the reply's mark passed it"),
        "{evidence}"
    );
    assert!(
        r["drop"]["rule"].is_null(),
        "no nftrace, no traced rule: {r:#}"
    );
    // --nftrace names the exact rule too, and leaves no table behind.
    let (r, _, _) = why(&lab, &["--nftrace"]);
    let rule = r["drop"]["rule"].as_str().expect("nft rule");
    assert!(
        rule.starts_with("inet f/in: ")
            && rule.contains("meta mark & 0x00004000 == 0x00000000 drop"),
        "{rule}"
    );
    let tables = lab::exec(&lab.a, &["nft", "list", "tables"]).unwrap();
    assert!(!tables.contains("fwmark_trace_nftrace"), "{tables}");
    assert_eq!(r["drop"]["hook"], "input");
    assert_eq!(r["drop"]["chains"], serde_json::json!(["inet f/in@0"]));
}

#[test]
fn cause4_xfrm_policy_selected_by_mark_blocks_the_reply() {
    let lab = two_path("why-xfrm");
    lab::sysctl(&lab.a, &[("all.rp_filter", "0"), ("a2.rp_filter", "0")]).expect("sysctl");
    lab::ip(
        &lab.a,
        "xfrm policy add src 10.9.9.9/32 dst 10.77.0.1/32 dir in action block mark 0 mask 0x4000",
    )
    .expect("xfrm policy");
    let (r, replied, code) = why(&lab, &[]);
    assert!(!replied);
    assert_eq!(r["verdict"], "xfrm-policy", "{r:#}");
    assert_eq!(code, 1, "why's exit code for a lost reply");
    assert_eq!(r["drop"]["reason"], "XFRM_POLICY");
    assert!(
        r["summary"]
            .as_str()
            .unwrap()
            .contains("mark 0x0/0x4000 action block"),
        "{r:#}"
    );
}

#[test]
fn cause5_healthy_flow_is_reported_delivered() {
    let lab = two_path("why-ok");
    lab::sysctl(
        &lab.a,
        &[
            ("all.rp_filter", "1"),
            ("a2.rp_filter", "1"),
            ("all.src_valid_mark", "1"),
        ],
    )
    .expect("sysctl");
    lab::nft(&lab.a, CONNMARK).unwrap();
    let (r, replied, code) = why(&lab, &["--all"]);
    assert!(replied, "the reply should arrive");
    assert_eq!(r["verdict"], "delivered", "{r:#}");
    assert_eq!(code, 0, "why's exit code for a delivered reply");
    assert!(r["last_reply_point"].as_str().is_some());
}

/// `ip -n NS xfrm LINE`, where `KEY` stands for an empty argument (null ciphers' keys):
/// `lab::ip` splits at spaces and would pass `""` as two quote characters.
fn xfrm(ns: &str, line: &str) {
    let mut args = vec!["-n", ns, "xfrm"];
    args.extend(
        line.split_whitespace()
            .map(|w| if w == "KEY" { "" } else { w }),
    );
    lab::run("ip", &args).unwrap_or_else(|e| panic!("ip xfrm {line}: {e:#}"));
}

/// The request goes into an ESP tunnel (A's out policy takes the client's SO_MARK 0x100 under
/// 0xf00, state SPI 0x100, null ciphers); B decrypts it (the same state, and an in policy
/// with its template) and answers in the clear (no out policy there); A's in policy wants ESP
/// from B (reqid 2), so the plain reply dies with XFRM_POLICY. `why` names A's in policy, the
/// state the request went through and the out policy its mark selected.
#[test]
fn cause6_reply_bypasses_the_ipsec_tunnel_the_request_took() {
    if !modules_or_skip(
        "cause6_reply_bypasses_the_ipsec_tunnel_the_request_took",
        &["esp4"],
    ) {
        return;
    }
    let lab = Lab::new("why-esp").expect("lab");
    let (a, b) = (lab::ADDR_A, lab::ADDR_B);
    let sa = format!("state add src {a} dst {b} proto esp spi 0x100 reqid 1 mode tunnel enc cipher_null KEY auth digest_null KEY");
    let request = format!("src {a}/32 dst {b}/32 proto udp");
    let to_b = format!("tmpl src {a} dst {b} proto esp reqid 1 mode tunnel");
    xfrm(&lab.a, &sa);
    xfrm(
        &lab.a,
        &format!("policy add {request} dir out mark 0x100 mask 0xf00 {to_b}"),
    );
    xfrm(
        &lab.a,
        &format!("policy add src {b}/32 dst {a}/32 proto udp dir in tmpl src {b} dst {a} proto esp reqid 2 mode tunnel"),
    );
    xfrm(&lab.b, &sa);
    xfrm(&lab.b, &format!("policy add {request} dir in {to_b}"));
    let (r, replied, code) = why_at(
        &lab,
        &Watch {
            server: (b, 7),
            target: (b, 7),
            client_mark: 0x100,
            ..Watch::echo(&lab)
        },
        || {},
    );
    assert!(!replied, "the plain reply should die");
    assert_eq!(r["verdict"], "xfrm-policy", "{r:#}");
    assert_eq!(code, 1, "why's exit code for a lost reply");
    assert_eq!(r["drop"]["reason"], "XFRM_POLICY", "{r:#}");
    // B decrypted the request and answered: the reply reached A.
    assert!(!r["reply"].as_array().unwrap().is_empty(), "{r:#}");
    let x = &r["xfrm"];
    assert_eq!(x["reply_decrypted"], false, "{r:#}");
    let inbound = &x["inbound_policy"];
    assert_eq!(
        (&inbound["direction"], &inbound["src"], &inbound["dst"]),
        (
            &"in".into(),
            &format!("{b}/32").into(),
            &format!("{a}/32").into()
        ),
        "{x:#}"
    );
    assert_eq!(x["required"][0]["proto"], 50, "{x:#}");
    assert_eq!(x["required"][0]["reqid"], 2, "{x:#}");
    assert_eq!(x["required"][0]["mode"], "tunnel", "{x:#}");
    // The request's step into the tunnel, named by its SPI's state.
    let tunnel = &x["request_tunnel"];
    assert_eq!(tunnel["spi"], "0x100", "{r:#}");
    assert_eq!(tunnel["state"]["spi"], 0x100, "{x:#}");
    assert_eq!(tunnel["state"]["reqid"], 1, "{x:#}");
    assert_eq!(tunnel["state"]["dst"], b, "{x:#}");
    assert_eq!(x["request_mark"], "0x100", "{x:#}");
    let out = &x["outbound_policies"];
    assert_eq!(out.as_array().map(Vec::len), Some(1), "{x:#}");
    assert_eq!(out[0]["direction"], "out", "{x:#}");
    assert_eq!(out[0]["mark"], "0x100/0xf00", "{x:#}");
    assert_eq!(out[0]["templates"][0]["reqid"], 1, "{x:#}");
    assert_summary_has(&r, &[
        "came back outside the IPsec tunnel (no decryption step on its path)",
        "action allow tmpl src 10.77.0.2 dst 10.77.0.1 proto esp reqid 2 mode tunnel",
        "requires proto esp (reqid 2, mode tunnel, 10.77.0.2 → 10.77.0.1) → XFRM_POLICY",
        "the request went into the tunnel by state spi 0x100 10.77.0.1 → 10.77.0.2 reqid 1 mode tunnel",
        "its mark 0x100 selected `xfrm policy dir out src 10.77.0.1/32 dst 10.77.0.2/32 mark 0x100/0xf00",
    ]);
}

/// Request and reply join through their conntrack entry across NAT: a DNAT'ed "service address"
/// (like a kube-proxy ClusterIP) is followed to the backend and back.
#[test]
fn flows_are_followed_across_nat() {
    let lab = Lab::new("why-nat").expect("lab");
    lab::exec(
        &lab.a,
        &["ip", "route", "add", "10.66.6.6/32", "dev", lab::VETH_A],
    )
    .unwrap();
    lab::nft(
        &lab.a,
        "table ip svc {\n chain out { type nat hook output priority -100; policy accept; ip daddr 10.66.6.6 udp dport 9950 dnat to 10.77.0.2:9951; }\n}\n",
    )
    .unwrap();
    let (r, replied, code) = why_at(
        &lab,
        &Watch {
            select: &["--host", "10.66.6.6", "--all"],
            server: (lab::ADDR_B, 9951),
            target: ("10.66.6.6", 9950),
            ..Watch::echo(&lab)
        },
        || {},
    );
    assert!(replied, "the NAT'ed reply should arrive");
    assert_eq!(r["verdict"], "delivered", "{r:#}");
    assert_eq!(code, 0, "why's exit code for a delivered reply");
    assert!(
        r["flow"].as_str().unwrap().ends_with("-> 10.66.6.6:9950"),
        "{r:#}"
    );
    let natted = |path: &str| {
        r[path].as_array().unwrap().iter().any(|s| {
            s["nat_tuple"]
                .as_str()
                .is_some_and(|t| t.contains("10.77.0.2"))
        })
    };
    assert!(
        natted("request"),
        "request after DNAT joined the flow: {r:#}"
    );
    assert!(
        natted("reply"),
        "reply before de-NAT joined the flow: {r:#}"
    );
}

/// `why --nftrace` killed with SIGKILL leaves no table marking traffic for nftrace: its guard
/// removes it as the daemon dies, and a fresh run works at once.
#[test]
fn nftrace_table_goes_with_a_killed_daemon() {
    require_root();
    let lab = Lab::new("why-kill").expect("lab");
    let tables = || lab::exec(&lab.a, &["nft", "list", "tables"]).unwrap_or_default();
    let why = [
        "why",
        "--netns",
        &lab.a,
        "--port",
        "7",
        "--duration",
        "60s",
        "--nftrace",
    ];
    let (mut child, _stderr) = why_ready(&why, Stdio::null());
    assert!(
        wait_until(scaled(Duration::from_secs(5)), || tables()
            .contains("fwmark_trace_nftrace")),
        "no nftrace table while it runs: {}",
        tables()
    );
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        wait_until(scaled(Duration::from_secs(5)), || !tables()
            .contains("fwmark_trace_nftrace")),
        "the killed daemon's table stayed: {}",
        tables()
    );
    // A fresh run installs its own and removes it.
    let (code, _, err) = run(&[
        "why",
        "--netns",
        &lab.a,
        "--port",
        "7",
        "--duration",
        "1s",
        "--nftrace",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("--nftrace unavailable"), "{err}");
    assert!(!tables().contains("fwmark_trace_nftrace"), "{}", tables());
}

/// 10,000 flows through `why` (a datagram each, from as many source ports): it keeps the
/// 4,096 most recently seen, counts the others as evicted, answers for every one it kept, and
/// its memory stays bounded meanwhile (peak RSS read while it watches).
#[test]
fn ten_thousand_flows_keep_why_bounded() {
    require_root();
    const FLOWS: u16 = 10_000;
    let lab = Lab::new("many").expect("lab");
    let args = [
        "why",
        "--netns",
        &lab.a,
        "--port",
        "9976",
        "--duration",
        "12s",
        "--json",
        "--all",
    ];
    let (mut child, stderr) = why_ready(&args, Stdio::piped());
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut stdout, &mut text).map(|_| text)
    });
    in_netns(&lab.a, move || {
        // Source ports chosen here: ephemeral ones repeat within 10,000 binds.
        for port in 20_000..20_000 + FLOWS {
            let sock = std::net::UdpSocket::bind(("0.0.0.0", port)).expect("bind");
            let _ = sock.send_to(b"flow", (lab::ADDR_B, 9976));
        }
    });
    let status = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    while child.try_wait().expect("try_wait").is_none() {
        if let Ok(s) = std::fs::read_to_string(&status) {
            let hwm = s.lines().find_map(|l| l.strip_prefix("VmHWM:"));
            let kb = hwm.and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok());
            peak_kb = peak_kb.max(kb.unwrap_or(0));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = reader.join().unwrap().expect("why's output");
    let log: Vec<String> = stderr.iter().collect();
    let doc: Value = serde_json::from_slice(&out).unwrap_or_else(|e| {
        panic!("why output is not JSON ({e}):\n{log:#?}");
    });
    check_why(&doc);
    let (seen, evicted) = (doc["flows_seen"].as_u64(), doc["flows_evicted"].as_u64());
    let reports = doc["flows"].as_array().map_or(0, Vec::len) as u64;
    assert_eq!(seen, Some(4096), "{log:#?}");
    assert_eq!(reports, 4096, "a report per flow kept (--all)");
    // Every datagram made a flow, unless its events were lost (then said on stderr).
    let lost = log.iter().any(|l| l.contains("events lost"));
    let total = seen.unwrap_or(0) + evicted.unwrap_or(0);
    assert!(
        total == u64::from(FLOWS) || (lost && total > 4096),
        "{total} flows of {FLOWS}: {log:#?}"
    );
    // Bounded: the flows kept (4,096 × a few steps), a 16 MiB ring and the node state.
    assert!(peak_kb < 256 * 1024, "peak RSS {peak_kb} kB");
}
