//! Open vSwitch flows. A flow matching `pkt_mark` (skb->mark) or `ct_mark` reads it; its
//! actions write it: `set_field:V[/M]->pkt_mark`, `load:V->NXM_NX_PKT_MARK[a..b]` (V shifted
//! into the bits a..b), `move:SRC->NXM_NX_PKT_MARK[…]` and `pop:NXM_NX_PKT_MARK[…]` (a value
//! not visible), the same for the conntrack mark, inside `ct(commit,exec(…))` too.
//!
//! The flows come from the tools (`ovs-vsctl list-br`, `ovs-ofctl dump-flows`), which find
//! the database and the bridges through `OVS_RUNDIR` like everywhere else. The tools reach
//! ovs-vswitchd through files, from any namespace: a bridge's flows are listed in the
//! namespace holding the bridge's own interface (its local port, which ovs-vswitchd creates
//! in the namespace it runs in), so that `--all-netns` lists them once.
use std::{
    ffi::CString,
    process::{Command, Output},
};

use anyhow::{bail, Context, Result};

use super::bits::Bits;
use super::model::{Access, MarkKind, Place, RawEntry};
use crate::mark::parse_u32;

/// The OpenFlow versions ovs-ofctl may negotiate: bridges restricted to newer ones
/// (`protocols=OpenFlow13`, Antrea's OpenFlow15) refuse ovs-ofctl's default OpenFlow10.
const VERSIONS: &str = "OpenFlow10,OpenFlow11,OpenFlow12,OpenFlow13,OpenFlow14,OpenFlow15";

/// OFP_DEFAULT_PRIORITY: the priority of a flow printed without `priority=`.
const DEFAULT_PRIORITY: u16 = 32768;

/// Counters `dump-flows` prints without `--no-stats`: not part of a flow's text.
const STATS: &[&str] = &["duration", "n_packets", "n_bytes", "idle_age", "hard_age"];

/// One flow of `ovs-ofctl dump-flows`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct OvsFlow {
    pub(crate) table: u8,
    pub(crate) priority: u16,
    pub(crate) cookie: u64,
    /// As `dump-flows --no-stats` prints it.
    pub(crate) text: String,
    /// Its matches' reads, then its actions' writes in order.
    pub(crate) access: Vec<Access>,
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// The mark a field name is: `pkt_mark`/`NXM_NX_PKT_MARK`, `ct_mark`/`NXM_NX_CT_MARK`.
fn mark_field(name: &str) -> Option<MarkKind> {
    match name {
        "pkt_mark" | "NXM_NX_PKT_MARK" => Some(MarkKind::Packet),
        "ct_mark" | "NXM_NX_CT_MARK" => Some(MarkKind::Conntrack),
        _ => None,
    }
}

/// `V/M` or `V` (all 32 bits).
fn masked(s: &str) -> Option<(u32, u32)> {
    match s.split_once('/') {
        Some((v, m)) => Some((parse_u32(v)?, parse_u32(m)?)),
        None => Some((parse_u32(s)?, u32::MAX)),
    }
}

/// A subfield of a mark, `NXM_NX_PKT_MARK[]`, `[3]` or `[8..9]`: the mark, the bits and the
/// lowest bit's index. None for other fields (and bits a 32-bit mark does not have).
fn subfield(s: &str) -> Option<(MarkKind, u32, u32)> {
    let (name, range) = s.strip_suffix(']')?.split_once('[')?;
    let mark = mark_field(name)?;
    if range.is_empty() {
        return Some((mark, u32::MAX, 0));
    }
    let (lo, hi) = match range.split_once("..") {
        Some((lo, hi)) => (lo.parse::<u32>().ok()?, hi.parse::<u32>().ok()?),
        None => {
            let bit = range.parse::<u32>().ok()?;
            (bit, bit)
        }
    };
    if lo > hi || hi > 31 {
        return None;
    }
    Some((mark, (u32::MAX >> (31 - hi)) & (u32::MAX << lo), lo))
}

/// A write of bits `mask` whose value the flow does not show (a register's, a stack's).
fn unknown(mark: MarkKind, mask: u32) -> Option<Access> {
    Bits {
        keep: !mask,
        unknown: mask,
        ..Bits::default()
    }
    .write(mark)
}

/// The write one action makes, if it writes a mark.
fn action(token: &str) -> Option<Access> {
    let (verb, arg) = token.split_once(':')?;
    match verb {
        "set_field" => {
            let (value, field) = arg.split_once("->")?;
            let mark = mark_field(field)?;
            match masked(value) {
                Some((v, m)) => Bits::set_mark(v & m, m).write(mark),
                None => unknown(mark, u32::MAX),
            }
        }
        "load" => {
            let (value, dst) = arg.split_once("->")?;
            let (mark, mask, shift) = subfield(dst)?;
            match parse_u64(value) {
                Some(v) => Bits::set_mark((v << shift) as u32 & mask, mask).write(mark),
                None => unknown(mark, mask),
            }
        }
        "move" => {
            let (src, dst) = arg.split_once("->")?;
            let (mark, mask, _) = subfield(dst)?;
            match subfield(src) {
                // The other mark's same bits: a save or restore.
                Some((from, m, _)) if from != mark && m == mask => {
                    Bits::copy_masked(from, mask, mask).write(mark)
                }
                _ => unknown(mark, mask),
            }
        }
        "pop" => {
            let (mark, mask, _) = subfield(arg)?;
            unknown(mark, mask)
        }
        _ => None,
    }
}

/// The writes of a flow's actions, nested ones (`ct(commit,exec(…))`, `clone(…)`) included;
/// not those inside `learn(…)`: they are the actions of the flows it adds.
fn writes(actions: &str) -> Vec<Access> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0usize, 0);
    // The depth at which a `learn(` opened, while inside it.
    let mut learn: Option<usize> = None;
    let ends = actions
        .char_indices()
        .filter(|(_, c)| matches!(c, ',' | '(' | ')'))
        .chain([(actions.len(), ',')]);
    for (i, c) in ends {
        let token = actions[start..i].trim();
        start = i + 1;
        if learn.is_none() {
            if c == '(' && token == "learn" {
                learn = Some(depth);
            } else if let Some(a) = action(token) {
                out.push(a);
            }
        }
        match c {
            '(' => depth += 1,
            ')' => {
                depth = depth.saturating_sub(1);
                if learn == Some(depth) {
                    learn = None;
                }
            }
            _ => {}
        }
    }
    out
}

/// Whether a token of a dump-flows line is left out of the flow's text: a counter, or a zero
/// cookie or table (which `--no-stats` does not print either).
fn left_out(token: &str) -> bool {
    let t = token.trim_end_matches([' ', ',']);
    let (key, value) = t.split_once('=').unwrap_or((t, ""));
    STATS.contains(&key) || (matches!(key, "cookie" | "table") && parse_u64(value) == Some(0))
}

/// A line of `ovs-ofctl dump-flows`:
/// ` cookie=0x2a, duration=1.2s, table=1, n_packets=0, n_bytes=0, priority=5,ct_mark=0x1/0x1,ip
/// actions=…`. The fields before the match end with ", ", flags (`reset_counts`) with a
/// space, the match's fields are joined by ","; table 0, cookie 0 and priority 32768 are not
/// printed. None for other lines (the `NXST_FLOW reply` header) and flows it cannot read.
pub(crate) fn parse_flow(line: &str) -> Option<OvsFlow> {
    let line = line.trim();
    let (head, actions) = match line.strip_prefix("actions=") {
        Some(a) => ("", a),
        None => line.split_once(" actions=")?,
    };
    let mut flow = OvsFlow {
        table: 0,
        priority: DEFAULT_PRIORITY,
        cookie: 0,
        text: String::new(),
        access: Vec::new(),
    };
    for token in head.split([',', ' ']).filter(|t| !t.is_empty()) {
        let (key, value) = token.split_once('=').unwrap_or((token, ""));
        match key {
            "table" => flow.table = value.parse().ok()?,
            "priority" => flow.priority = value.parse().ok()?,
            "cookie" => flow.cookie = parse_u64(value)?,
            _ => {
                if let Some(mark) = mark_field(key) {
                    let (v, m) = masked(value)?;
                    if m != 0 {
                        flow.access.push(Access::read(mark, v, m, false));
                    }
                }
            }
        }
    }
    flow.access.extend(writes(actions));
    flow.text = line
        .split_inclusive(' ')
        .filter(|t| !left_out(t))
        .collect::<String>()
        .trim_end()
        .to_owned();
    Some(flow)
}

/// The entry of a flow of `bridge` that reads or writes a mark.
fn found(bridge: &str, flow: OvsFlow) -> Option<RawEntry> {
    (!flow.access.is_empty()).then(|| RawEntry {
        place: Place::OvsFlow {
            bridge: bridge.to_owned(),
            table: flow.table,
            priority: flow.priority,
            cookie: flow.cookie,
        },
        text: flow.text,
        access: flow.access,
        names: vec![bridge.to_owned()],
    })
}

/// Runs an OVS tool; None when it is not installed.
fn tool(name: &str, args: &[&str]) -> Result<Option<Output>> {
    match Command::new(name).args(args).output() {
        Ok(o) => Ok(Some(o)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("running {name}")),
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).trim().to_owned()
}

/// The bridges in the database; None when OVS is not installed or its database is not
/// running (no OVS on this node, not an error).
fn bridges() -> Result<Option<Vec<String>>> {
    let Some(out) = tool("ovs-vsctl", &["--timeout=2", "list-br"])? else {
        return Ok(None);
    };
    if !out.status.success() {
        let err = stderr(&out);
        if err.contains("database connection failed") {
            return Ok(None);
        }
        bail!("`ovs-vsctl list-br` failed: {err}");
    }
    Ok(Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
    ))
}

/// Whether the bridge's interface is in this thread's namespace.
fn here(bridge: &str) -> bool {
    let Ok(name) = CString::new(bridge) else {
        return false;
    };
    // SAFETY: a NUL-terminated name; the lookup happens in this thread's namespace.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// The flows of one bridge.
fn flows(bridge: &str) -> Result<Vec<OvsFlow>> {
    let args = [
        "--timeout=2",
        "-O",
        VERSIONS,
        "--no-stats",
        "--no-names",
        "dump-flows",
        bridge,
    ];
    let Some(out) = tool("ovs-ofctl", &args)? else {
        bail!("ovs-vsctl is installed but ovs-ofctl is not: the flows of {bridge} are not listed");
    };
    if !out.status.success() {
        bail!("`ovs-ofctl dump-flows {bridge}` failed: {}", stderr(&out));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(parse_flow)
        .collect())
}

/// The ports of one bridge, by name.
fn ports(bridge: &str) -> Result<Vec<String>> {
    let Some(out) = tool("ovs-vsctl", &["--timeout=2", "list-ports", bridge])? else {
        return Ok(Vec::new());
    };
    if !out.status.success() {
        bail!("`ovs-vsctl list-ports {bridge}` failed: {}", stderr(&out));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// A bridge of this namespace as the trace names its datapath: its ports, and the flows that
/// write the packet mark.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Bridge {
    pub(crate) name: String,
    pub(crate) ports: Vec<String>,
    /// The flows (as `dump-flows --no-stats` prints them) with a write of `pkt_mark`.
    pub(crate) mark_writers: Vec<String>,
}

/// The bridges of this namespace (see `here`).
pub(crate) fn bridges_here() -> Result<Vec<Bridge>> {
    let Some(bridges) = bridges()? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for name in bridges.into_iter().filter(|b| here(b)) {
        let writes_mark = |f: &OvsFlow| {
            f.access.iter().any(|a| {
                a.mark == MarkKind::Packet && matches!(a.op, super::model::Op::Write { .. })
            })
        };
        out.push(Bridge {
            ports: ports(&name)?,
            mark_writers: flows(&name)?
                .into_iter()
                .filter(writes_mark)
                .map(|f| f.text)
                .collect(),
            name,
        });
    }
    Ok(out)
}

/// The flows of this namespace's bridges that read or write a mark.
pub(crate) fn read() -> Result<Vec<RawEntry>> {
    let Some(bridges) = bridges()? else {
        return Ok(Vec::new());
    };
    let mut found_all = Vec::new();
    for bridge in bridges.iter().filter(|b| here(b)) {
        found_all.extend(flows(bridge)?.into_iter().filter_map(|f| found(bridge, f)));
    }
    Ok(found_all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::model::{Op, Scope};

    /// Reads and writes as (op, mark, value, mask, scope) for short comparisons.
    fn summary(f: &OvsFlow) -> Vec<String> {
        f.access
            .iter()
            .map(|a| {
                let mark = match a.mark {
                    MarkKind::Packet => "pkt",
                    MarkKind::Conntrack => "ct",
                };
                let (op, scope) = match a.op {
                    Op::Read => ("read", String::new()),
                    Op::Write {
                        scope,
                        known,
                        copies,
                        ..
                    } => {
                        let s = format!("{scope:?}").to_lowercase();
                        let extra = match (known, copies) {
                            (false, _) => " unknown".to_owned(),
                            (true, 0) => String::new(),
                            (true, c) => format!(" copies {c:#x}"),
                        };
                        ("write", format!(" {s}{extra}"))
                    }
                    Op::Holds { .. } => ("holds", String::new()),
                };
                format!("{op} {mark} {:#x}/{:#x}{scope}", a.value(), a.mask())
            })
            .collect()
    }

    fn flow(line: &str) -> OvsFlow {
        parse_flow(line).unwrap_or_else(|| panic!("not a flow: {line:?}"))
    }

    #[test]
    fn reads_the_flow_fields_and_leaves_the_counters_out() {
        // ovs-ofctl dump-flows (OpenFlow10, with counters).
        let f = flow(" cookie=0x0, duration=1.2s, table=0, n_packets=0, n_bytes=0, priority=100,in_port=p1 actions=load:0x7->NXM_NX_PKT_MARK[],output:p2");
        assert_eq!((f.table, f.priority, f.cookie), (0, 100, 0));
        assert_eq!(
            f.text,
            "priority=100,in_port=p1 actions=load:0x7->NXM_NX_PKT_MARK[],output:p2"
        );
        assert_eq!(summary(&f), ["write pkt 0x7/0xffffffff whole"]);
        let f = flow(" cookie=0x2a, duration=0.020s, table=1, n_packets=3, n_bytes=180, idle_timeout=100, idle_age=0, priority=5,ct_mark=0x1/0x1,ip actions=output:1");
        assert_eq!((f.table, f.priority, f.cookie), (1, 5, 0x2a));
        assert_eq!(
            f.text,
            "cookie=0x2a, table=1, idle_timeout=100, priority=5,ct_mark=0x1/0x1,ip actions=output:1"
        );
        assert_eq!(summary(&f), ["read ct 0x1/0x1"]);
        // --no-stats, OpenFlow13+: flags after a space, default priority and table not printed.
        let f = flow(" idle_timeout=100, reset_counts pkt_mark=0x7 actions=drop");
        assert_eq!((f.table, f.priority, f.cookie), (0, 32768, 0));
        assert_eq!(
            f.text,
            "idle_timeout=100, reset_counts pkt_mark=0x7 actions=drop"
        );
        assert_eq!(summary(&f), ["read pkt 0x7/0xffffffff"]);
        let f = flow(" cookie=0x0, duration=5.1s, table=2, n_packets=0, n_bytes=0, idle_age=5, actions=NORMAL");
        assert_eq!((f.table, f.text.as_str()), (2, "table=2, actions=NORMAL"));
        assert!(f.access.is_empty());
        assert_eq!(flow("actions=drop").priority, 32768);
        // Decimal values, and a cookie of all 64 bits.
        let f = flow(" cookie=0xffffffffffffffff, priority=65535,pkt_mark=16/48 actions=drop");
        assert_eq!((f.cookie, f.priority), (u64::MAX, 65535));
        assert_eq!(summary(&f), ["read pkt 0x10/0x30"]);
        // Headers and empty lines are not flows.
        assert_eq!(parse_flow("NXST_FLOW reply (xid=0x4):"), None);
        assert_eq!(parse_flow("OFPST_FLOW reply (OF1.3) (xid=0x2):"), None);
        assert_eq!(parse_flow(""), None);
        assert_eq!(parse_flow(" table=300, actions=drop"), None);
    }

    #[test]
    fn set_field_and_load_forms() {
        // The same flow dumped with OpenFlow10 (load) and OpenFlow15 (set_field).
        let of10 = flow(" cookie=0x2a, table=1, priority=5,ct_mark=0x1/0x1,ip actions=load:0x3->NXM_NX_PKT_MARK[8..9],load:0x1->NXM_NX_PKT_MARK[3],move:NXM_NX_REG0[0..7]->NXM_NX_PKT_MARK[16..23],ct(commit,exec(load:0x1->NXM_NX_CT_MARK[])),load:0x1->NXM_NX_PKT_MARK[2],load:0x7->NXM_NX_PKT_MARK[],move:NXM_NX_CT_MARK[]->NXM_NX_PKT_MARK[],pop:NXM_NX_PKT_MARK[0..3],output:1");
        let of15 = flow(" cookie=0x2a, table=1, reset_counts priority=5,ct_mark=0x1/0x1,ip actions=set_field:0x300/0x300->pkt_mark,set_field:0x8/0x8->pkt_mark,move:NXM_NX_REG0[0..7]->NXM_NX_PKT_MARK[16..23],ct(commit,exec(set_field:0x1->ct_mark)),set_field:0x4/0x4->pkt_mark,set_field:0x7->pkt_mark,move:NXM_NX_CT_MARK[]->NXM_NX_PKT_MARK[],pop:NXM_NX_PKT_MARK[0..3],output:1");
        let want = [
            "read ct 0x1/0x1",
            "write pkt 0x300/0x300 bits",
            "write pkt 0x8/0x8 bits",
            "write pkt 0x0/0xff0000 bits unknown",
            "write ct 0x1/0xffffffff whole",
            "write pkt 0x4/0x4 bits",
            "write pkt 0x7/0xffffffff whole",
            "write pkt 0x0/0xffffffff whole copies 0xffffffff",
            "write pkt 0x0/0xf bits unknown",
        ];
        assert_eq!(summary(&of10), want);
        assert_eq!(summary(&of15), want);
        let restore = of10.access[7];
        assert!(matches!(
            restore.op,
            Op::Write {
                copy_from: Some(MarkKind::Conntrack),
                ..
            }
        ));
        // A masked ct mark written in ct's exec, a pkt mark in clone; a learned flow's
        // actions are not this flow's.
        let f = flow(" table=1, priority=6,ct_mark=0x5,ip actions=ct(commit,exec(set_field:0x1->ct_mark,set_field:0x2/0x2->ct_mark)),set_field:0x8->pkt_mark,clone(set_field:0x10/0x10->pkt_mark,output:2)");
        assert_eq!(
            summary(&f),
            [
                "read ct 0x5/0xffffffff",
                "write ct 0x1/0xffffffff whole",
                "write ct 0x2/0x2 bits",
                "write pkt 0x8/0xffffffff whole",
                "write pkt 0x10/0x10 bits",
            ]
        );
        let f = flow(" table=2, actions=learn(table=3,load:NXM_NX_REG0[]->NXM_NX_PKT_MARK[]),resubmit(,3),load:0x1->NXM_NX_PKT_MARK[31]");
        assert_eq!(summary(&f), ["write pkt 0x80000000/0x80000000 bits"]);
        // Bits a 32-bit mark does not have, registers, other fields: no access.
        let f = flow(" actions=load:0x1->NXM_NX_PKT_MARK[32],load:0x1->NXM_NX_REG0[],set_field:0x1->reg1,push:NXM_NX_PKT_MARK[]");
        assert!(f.access.is_empty());
        // A value a load cannot have: the bits are written, the value is not known.
        let f = flow(" actions=load:0xfffffffffffffffffffff->NXM_NX_PKT_MARK[0..7]");
        assert_eq!(summary(&f), ["write pkt 0x0/0xff bits unknown"]);
    }

    #[test]
    fn entries_are_flows_with_marks() {
        let f = flow(" priority=100,pkt_mark=0x4/0x4 actions=set_field:0x7->pkt_mark,NORMAL");
        let e = found("br-int", f).unwrap();
        assert_eq!(
            e.place,
            Place::OvsFlow {
                bridge: "br-int".into(),
                table: 0,
                priority: 100,
                cookie: 0
            }
        );
        assert_eq!(e.names, ["br-int"]);
        assert_eq!(e.place.label(), "ovs br-int table 0 priority 100");
        assert_eq!(
            e.access[1].describe(),
            "writes packet mark: sets 0x7, clears every other bit (whole)"
        );
        assert_eq!(e.access[1].scope(), Some(Scope::Whole));
        assert!(found("br-int", flow(" priority=0 actions=NORMAL")).is_none());
        let json = serde_json::to_value(&e.place).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"what": "ovs-flow", "bridge": "br-int", "table": 0,
                               "priority": 100, "cookie": "0x0"})
        );
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        /// Any line, and lines made of the words the parser looks for: no panic, and every
        /// access's value lies inside its mask.
        #[test]
        fn any_line_is_handled(
            text in "\\PC{0,200}",
            words in "( |,|\\(|\\)|actions=|pkt_mark=|ct_mark=|table=|priority=|cookie=|learn|ct|exec|set_field:|load:|move:|pop:|->|/|NXM_NX_PKT_MARK|NXM_NX_CT_MARK|pkt_mark|\\[|\\]|\\.\\.|0x[0-9a-f]{0,18}|[0-9]{1,3}){0,60}",
        ) {
            let _ = parse_flow(&text);
            if let Some(f) = parse_flow(&words) {
                for a in &f.access {
                    proptest::prop_assert_eq!(a.value() & !a.mask(), 0);
                }
            }
        }
    }
}
