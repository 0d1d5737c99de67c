//! Open vSwitch's kernel datapath writing `pkt_mark` (= skb->mark) between two ports: the
//! transition is the datapath's, named by its bridge, ports and the flow that sets the mark.
//! Needs the openvswitch module (the 6.12 guest of the kernel matrix has it).

use fwmark_trace_tests::*;
use serde_json::Value;

#[test]
fn open_vswitch_datapath_names_the_bridge_ports_and_flow() {
    let test = "open_vswitch_datapath_names_the_bridge_ports_and_flow";
    if !modules_or_skip(test, &["openvswitch"]) {
        return;
    }
    let Some(ovs) = Ovs::start("ovs-dp", Datapath::Kernel) else {
        panic!("{test}: ovs-vswitchd does not start with the kernel datapath");
    };
    let (x, y) = (Netns::new("ovs-x"), Netns::new("ovs-y"));
    let sw = ovs.ns.name.as_str();
    for (ns, dev, port, addr) in [(&x, "x0", "p1", "10.83.0.1"), (&y, "y0", "p2", "10.83.0.2")] {
        lab::ip(
            &ns.name,
            &format!("link add {dev} type veth peer name {port} netns {sw}"),
        )
        .expect("veth");
        lab::ip(&ns.name, &format!("addr add {addr}/24 dev {dev}")).expect("address");
        lab::ip(&ns.name, &format!("link set {dev} up")).expect("up");
        lab::ip(sw, &format!("link set {port} up")).expect("up");
    }
    ovs.add_bridge(&[]);
    let br = ovs.bridge.as_str();
    ovs.tool(
        "ovs-vsctl",
        &[
            "--timeout=10",
            "add-port",
            br,
            "p1",
            "--",
            "add-port",
            br,
            "p2",
        ],
    )
    .unwrap_or_else(|e| panic!("add-port: {e}{}", ovs.log("ovs-vswitchd")));
    ovs.tool("ovs-ofctl", &["del-flows", br])
        .expect("del-flows");
    for flow in [
        "priority=10,in_port=p1,actions=set_field:0x7->pkt_mark,output:p2",
        "priority=10,in_port=p2,actions=output:p1",
    ] {
        ovs.tool("ovs-ofctl", &["add-flow", br, flow])
            .unwrap_or_else(|e| panic!("add-flow {flow}: {e}"));
    }

    let d = Daemon::start_with_env(&["--netns", sw], &ovs.env());
    send_udp(&x.name, "10.83.0.2", 9300, 3, None);
    let by_ovs = |e: &&Value| e["kind"] == "transition" && e["segment"]["layer"] == "ovs";
    let events = d.stop_when("the datapath's transition", |evs| {
        evs.iter()
            .any(|e| by_ovs(&e) && e["tuple"]["dport"] == 9300)
    });
    let tr = events
        .iter()
        .filter(by_ovs)
        .find(|e| e["tuple"]["dport"] == 9300)
        .unwrap_or_else(|| panic!("no transition in the OVS datapath: {events:#?}"));
    assert_eq!(tr["mark"]["old"], "0x0", "{tr}");
    assert_eq!(tr["mark"]["new"], "0x7", "{tr}");
    let path = &tr["segment"]["ovs"];
    assert_eq!(path["bridge"], br, "{tr}");
    assert_eq!(path["in_port"], "p1", "{tr}");
    assert_eq!(path["out_port"], "p2", "{tr}");
    let flows: Vec<&str> = path["flows"]
        .as_array()
        .unwrap_or_else(|| panic!("no flows named: {tr}"))
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        flows.len() == 1 && flows[0].contains("in_port") && flows[0].contains("0x7"),
        "the flow that sets pkt_mark: {tr}"
    );
}
