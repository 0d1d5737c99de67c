//! What the fuzz targets (`fuzz/`, run by `cargo xtask fuzz`) call: one entry point per kind of
//! untrusted input, handing any bytes to the real parser and then to what uses its result, as
//! the daemon does. Whatever the bytes, none of them may panic (an error is a fine answer).
//!
//! The tests below replay every committed corpus and regression input through the same entry
//! points, so `cargo test` checks them without cargo-fuzz or a nightly toolchain.
use std::{io::BufRead, path::Path, sync::OnceLock};

use crate::{
    inventory::{self, Inventory, RawEntry},
    kernel::plan::{NfPlan, PlanMode},
    netstack::Family,
    nodestate::nft,
    output::{Format, Output},
    recording::Reader,
    registry::{self, Registry},
    why::nftrace,
};

/// A fuzz target's entry point: any bytes.
pub type Entry = fn(&[u8]);

/// The fuzz targets: each one's name (its directories under `fuzz/`) and its entry point.
pub const TARGETS: &[(&str, Entry)] = &[
    ("recording", recording),
    ("registry", registry_file),
    ("nft_json", nft_json),
    ("nft_text", nft_text),
    ("iptables_save", iptables_save),
    ("nft_trace", nft_trace),
];

/// The built-in registry, parsed once: what every input is attributed with.
fn builtin() -> &'static Registry {
    static BUILTIN: OnceLock<Registry> = OnceLock::new();
    BUILTIN.get_or_init(|| Registry::builtin().expect("the built-in registry parses"))
}

/// A recording file, as `fwmark-trace show` reads it: its frames, then every record decoded,
/// attributed and written in both output formats (to /dev/null). Then again with every
/// frame's checksums made right: else nearly every change the fuzzer makes to a frame would
/// only fail its checksum, and the parsing behind them would go untested.
pub fn recording(data: &[u8]) {
    show(data);
    let fixed = with_checksums_fixed(data);
    if fixed != data {
        show(&fixed);
    }
}

/// What `recording::show` does with a recording, in memory, in both output formats.
fn show(data: &[u8]) {
    for format in [Format::Human, Format::Json] {
        let Ok(mut reader) = Reader::new(data) else {
            return;
        };
        let mut out = Output::new(format, Some(Path::new("/dev/null"))).expect("/dev/null opens");
        if let Ok(summary) = crate::commands::show::replay(&mut reader, builtin(), &mut out) {
            let _ = out.summary(&summary);
            let _ = out.flush();
            let _ = summary.to_string();
        }
        let _ = reader.damage().map(ToString::to_string);
    }
}

/// `data` with each frame's payload and header checksums recomputed (frames found by their
/// length fields, as the format in `recording` lays them out: a 9-byte magic line, then a
/// 13-byte header `tag, len, crc, head_crc` before each payload).
fn with_checksums_fixed(data: &[u8]) -> Vec<u8> {
    const MAGIC: usize = 9;
    const HEADER: usize = 13;
    let mut out = data.to_vec();
    let mut at = MAGIC;
    while at + HEADER <= out.len() {
        let len = u32::from_le_bytes([out[at + 1], out[at + 2], out[at + 3], out[at + 4]]);
        let end = (at + HEADER).saturating_add(len as usize).min(out.len());
        let crc = crc32c(&out[at + HEADER..end]);
        out[at + 5..at + 9].copy_from_slice(&crc.to_le_bytes());
        let head = crc32c(&out[at..at + 9]);
        out[at + 9..at + HEADER].copy_from_slice(&head.to_le_bytes());
        at = end;
    }
    out
}

/// CRC-32C (Castagnoli), as recordings use: a byte at a time, from a table made once.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: OnceLock<[u32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| {
        std::array::from_fn(|i| {
            (0..8).fold(i as u32, |c, _| match c & 1 {
                1 => (c >> 1) ^ 0x82F6_3B78,
                _ => c >> 1,
            })
        })
    });
    !data.iter().fold(!0u32, |c, &b| {
        (c >> 8) ^ table[((c ^ u32::from(b)) & 0xff) as usize]
    })
}

/// A registry file (`--registry FILE`, `/etc/fwmark-trace/registry.d/*.toml`): its owners
/// merged over the built-in ones, its profile applied, and the `registry` command's reports.
pub fn registry_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((owners, profile)) = registry::file::parse(text, "fuzz.toml") else {
        return;
    };
    let mut reg = builtin().clone();
    reg.merge(owners);
    if let Some(names) = profile {
        reg = reg.select(&names).unwrap_or(reg);
    }
    use crate::commands::registry::{bitmap, check, list, show};
    let _ = list(&reg);
    for o in reg.owners() {
        let _ = (show(o), bitmap(o));
    }
    let _ = check(reg.owners());
}

/// `nft -j list ruleset`: the base chains and the chains below them that write marks, where
/// observers would go, and the inventory's mark rules (joined with iptables-nft-save's lines
/// for the kube-proxy chains of `KUBE_SAVE`, so that join is reached too).
pub fn nft_json(data: &[u8]) {
    let Ok(items) = nft::items(data) else {
        return;
    };
    let _ = nft::parse_names(&items);
    let chains = nft::parse_chains(&items);
    let _: Vec<String> = chains.iter().map(ToString::to_string).collect();
    let _ = NfPlan::new(&chains, PlanMode::Full);
    let _ = NfPlan::new(&chains, PlanMode::Writers);
    let saves = [(Family::Ipv4, inventory::iptables::parse_save(KUBE_SAVE))];
    inventory_of(inventory::nft::found(&items, "", &saves));
}

/// iptables-nft-save's view of kube-proxy's nat rules (values nft's JSON leaves out).
const KUBE_SAVE: &str = "*nat\n-A POSTROUTING -j KUBE-POSTROUTING\n\
    -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
    -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\nCOMMIT\n";

/// `nft -a list ruleset`: each rule's text by chain and handle.
pub fn nft_text(data: &[u8]) {
    let _ = inventory::nft::rule_texts(&String::from_utf8_lossy(data));
}

/// `iptables-save` (the legacy tables): the rules that read or write marks, as the inventory
/// attributes, compares and prints them.
pub fn iptables_save(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    inventory_of(inventory::iptables::found(&text, Family::Ipv4));
}

/// The inventory of `found`: attributed with the built-in registry, its conflicts, printed.
fn inventory_of(found: Vec<RawEntry>) {
    let mut inv = Inventory::default();
    inv.add(None, found);
    inv.attribute(builtin());
    let conflicts = inv.conflicts();
    let _ = inventory::render::human(&inv, &conflicts);
    let _ = inventory::render::json(&inv, &conflicts);
}

/// `nft monitor trace` output (`why --nftrace`), read line by line as `NfTrace` reads it: the
/// drop verdicts, and the one for each flow they name.
pub fn nft_trace(data: &[u8]) {
    let lines: Vec<String> = data.lines().map_while(Result::ok).collect();
    let drops = nftrace::parse(&lines);
    for d in &drops {
        if let (Some(a), Some(b)) = (d.saddr, d.daddr) {
            let _ = nftrace::for_flow(&drops, a, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::{crc32c, with_checksums_fixed, TARGETS};

    fn fuzz_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
    }

    /// Fixing the checksums of an intact recording changes nothing: the fix-up writes what the
    /// recorder writes.
    #[test]
    fn checksums_are_fixed_as_the_recorder_writes_them() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let seed = std::fs::read(fuzz_dir().join("corpus/recording/transitions.rec")).unwrap();
        assert_eq!(with_checksums_fixed(&seed), seed);
    }

    /// Every committed input of every target (its seed corpus and the regression inputs the
    /// fuzzer found) goes through its entry point without a panic.
    #[test]
    fn corpora_and_regressions_replay() {
        let fuzz = fuzz_dir();
        for (target, entry) in TARGETS {
            let mut seeds = 0;
            for kind in ["corpus", "regressions"] {
                let Ok(dir) = std::fs::read_dir(fuzz.join(kind).join(target)) else {
                    continue;
                };
                for file in dir {
                    let path = file.unwrap().path();
                    let data = std::fs::read(&path).unwrap();
                    let res = std::panic::catch_unwind(|| entry(&data));
                    assert!(res.is_ok(), "{target}: {} panics", path.display());
                    seeds += 1;
                }
            }
            assert!(
                seeds > 0,
                "{target}: no committed inputs in {}",
                fuzz.display()
            );
        }
    }
}
