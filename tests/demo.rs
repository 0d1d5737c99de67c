//! The demo, as a new user runs it: its JSON lines follow the published schema and show the
//! two documented collisions; its inventory tour lists them as conflicts.
use fwmark_trace_tests::*;
use serde_json::Value;

fn demo(args: &[&str]) -> (i32, String, String) {
    require_root();
    run(&[["demo"].as_slice(), args].concat())
}

#[test]
fn demo_shows_both_documented_collisions_in_schema_valid_json() {
    let (code, out, err) = demo(&["--json"]);
    assert_eq!(code, 0, "{err}");
    // parse_lines checks every record against schema/trace-records.schema.json.
    let records = parse_lines(&out);
    let summary = records
        .iter()
        .find(|r| r["kind"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {out}"));
    let clobbers: Vec<&Value> = summary["clobbers"].as_array().unwrap().iter().collect();
    assert!(!clobbers.is_empty(), "{summary}");
    for pair in ["calico × tailscale", "wg-quick × kube-proxy"] {
        assert!(
            clobbers
                .iter()
                .any(|c| c["owners"] == pair && c["count"].as_u64() > Some(0)),
            "{pair} missing: {summary}"
        );
    }
    assert!(err.contains("namespaces removed"), "{err}");
}

#[test]
fn demo_inventory_lists_both_collisions_as_conflicts() {
    let (code, out, err) = demo(&["--scenario", "inventory", "--json"]);
    assert_eq!(code, 0, "{err}");
    let doc: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let pairs: Vec<String> = doc["conflicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{} {}", c["owners"][0], c["owners"][1]))
        .collect();
    for (a, b) in [("calico", "tailscale"), ("kube-proxy", "wg-quick")] {
        let pair = format!("\"{a}\" \"{b}\"");
        assert!(pairs.contains(&pair), "{pair} missing: {pairs:#?}");
    }
}
