//! The bounded flags: every duration, count and size is checked here, when the arguments are
//! parsed, so that a value the run cannot use (`--interval 292500000000years`, a ring the
//! kernel refuses) is one clear usage error (exit 2) before anything is attached or any file
//! is touched. Nothing here slices a string by bytes: any input gives a value or an error.
use std::time::Duration;

const SECOND: Duration = Duration::from_secs(1);
const DAY: Duration = Duration::from_secs(24 * 60 * 60);
const YEAR: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// How long a run may last (`trace --duration`, `why --duration`): more than zero, at most
/// a year (longer runs need no deadline).
pub(crate) const RUN: (Duration, Duration) = (Duration::from_millis(1), YEAR);
/// A reporting period (`--interval`, and the demo's `--duration`, which is its interval):
/// 100 ms (the trace loop reports no faster) to a day.
pub(crate) const INTERVAL: (Duration, Duration) = (Duration::from_millis(100), DAY);
/// The `--stats` period: a second (stats are taken on the once-a-second tick) to a day.
pub(crate) const STATS: (Duration, Duration) = (SECOND, DAY);
/// The ring buffer (`--ring-size`): a power of two from a page (at least 4 KiB) to 1 GiB.
pub(crate) const RING_MAX: u64 = 1 << 30;
/// `--rotate-size`: 4 KiB to 1 TiB.
pub(crate) const ROTATE_SIZE: (u64, u64) = (4 << 10, 1 << 40);
/// `--rotate-keep`: 1 to 100 rotated files.
pub(crate) const ROTATE_KEEP: (u32, u32) = (1, 100);

fn within(d: Duration, (min, max): (Duration, Duration)) -> Result<Duration, String> {
    let show = |d: Duration| humantime::format_duration(d).to_string();
    if d < min || d > max {
        return Err(format!(
            "{} is outside {}..={}",
            show(d),
            show(min),
            show(max)
        ));
    }
    Ok(d)
}

fn duration(s: &str, range: (Duration, Duration)) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration such as 10s or 2m ({e})"))?;
    within(d, range)
}

/// `trace --duration`, `why --duration`.
pub(crate) fn run_duration(s: &str) -> Result<Duration, String> {
    duration(s, RUN)
}

/// `--interval`, `demo --duration`.
pub(crate) fn interval(s: &str) -> Result<Duration, String> {
    duration(s, INTERVAL)
}

/// `--stats`.
pub(crate) fn stats(s: &str) -> Result<Duration, String> {
    duration(s, STATS)
}

/// `--count`: at least one record.
pub(crate) fn count(s: &str) -> Result<u64, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("0 records: the count must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "{s:?} is not a number of records (1 to {})",
            u64::MAX
        )),
    }
}

/// A number of bytes: digits, optionally followed by K, M, G or T (binary: KiB, MiB, …;
/// `KiB` and `k` are spelt the same way).
pub(crate) fn bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let number: String = t.chars().take_while(char::is_ascii_digit).collect();
    let unit: String = t.chars().skip_while(char::is_ascii_digit).collect();
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{s:?} is not a size in bytes (e.g. 4096, 64K, 4M, 1G)"
            ))
        }
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size in bytes (e.g. 4096, 64K, 4M, 1G)"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// The system's page size (the smallest ring buffer the kernel accepts).
fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).unwrap_or(4096).max(4096)
}

/// `--ring-size`: a power of two the kernel accepts for a BPF ring buffer, at least a page,
/// at most `RING_MAX`.
pub(crate) fn ring_size(s: &str) -> Result<u32, String> {
    let n = bytes(s)?;
    let min = page_size();
    if n < min || n > RING_MAX || !n.is_power_of_two() {
        return Err(format!(
            "{n} bytes: the ring size must be a power of two from {min} (a page) to {RING_MAX} (1 GiB)"
        ));
    }
    u32::try_from(n).map_err(|_| format!("{n} is too large"))
}

/// `--count-memory`.
pub(crate) fn count_memory(s: &str) -> Result<u64, String> {
    let n = bytes(s)?;
    if !(1 << 20..=1 << 30).contains(&n) {
        return Err(format!(
            "{n} bytes: the counting memory must be from 1M to 1G"
        ));
    }
    Ok(n)
}

/// `--rotate-size`.
pub(crate) fn rotate_size(s: &str) -> Result<u64, String> {
    let n = bytes(s)?;
    let (min, max) = ROTATE_SIZE;
    if n < min || n > max {
        return Err(format!(
            "{n} bytes: the rotation size must be from {min} (4 KiB) to {max} (1 TiB)"
        ));
    }
    Ok(n)
}

/// `--rotate-keep`.
pub(crate) fn rotate_keep(s: &str) -> Result<u32, String> {
    let (min, max) = ROTATE_KEEP;
    match s.trim().parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: keep from {min} to {max} rotated files")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bounds_are_enforced() {
        assert_eq!(interval("1s"), Ok(SECOND));
        assert_eq!(interval("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(interval("1day"), Ok(DAY));
        for bad in [
            "0s",
            "99ms",
            "25h",
            "292500000000years",
            "soon",
            "",
            "1 s s",
        ] {
            assert!(interval(bad).is_err(), "{bad}");
        }
        assert!(run_duration("365days").is_ok() && run_duration("366days").is_err());
        assert!(run_duration("0s").is_err());
        assert!(stats("1s").is_ok() && stats("500ms").is_err() && stats("2days").is_err());
        let e = interval("292500000000years").unwrap_err();
        assert!(e.contains("outside 100ms..=1day"), "{e}");
        assert_eq!(count("2"), Ok(2));
        assert!(count("0").is_err() && count("-1").is_err() && count("many").is_err());
        assert!(count("18446744073709551616").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(bytes("4096"), Ok(4096));
        assert_eq!(bytes("64K"), Ok(64 << 10));
        assert_eq!(bytes("4MiB"), Ok(4 << 20));
        assert_eq!(bytes(" 1g "), Ok(1 << 30));
        for bad in [
            "",
            "K",
            "4X",
            "-1",
            "1.5M",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(ring_size("4M"), Ok(4 << 20));
        assert_eq!(ring_size("1G"), Ok(1 << 30));
        for bad in ["1000", "2048", "3M", "2G", "0"] {
            assert!(ring_size(bad).is_err(), "{bad}");
        }
        assert_eq!(rotate_size("4K"), Ok(4096));
        assert!(rotate_size("4095").is_err() && rotate_size("2T").is_err());
        assert_eq!(rotate_keep("5"), Ok(5));
        assert!(rotate_keep("0").is_err() && rotate_keep("101").is_err());
    }

    proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        /// Any text, and numbers with any unit, give a value within bounds or an error.
        #[test]
        fn parsers_never_panic(s in "\\PC{0,24}", n: u64, unit in "\\PC{0,6}") {
            let with_unit = format!("{n}{unit}");
            for s in [s.as_str(), with_unit.as_str()] {
                if let Ok(d) = run_duration(s) { prop_assert!(d >= RUN.0 && d <= RUN.1); }
                if let Ok(d) = interval(s) { prop_assert!(d >= INTERVAL.0 && d <= INTERVAL.1); }
                if let Ok(d) = stats(s) { prop_assert!(d >= STATS.0 && d <= STATS.1); }
                if let Ok(r) = ring_size(s) { prop_assert!(r.is_power_of_two() && u64::from(r) <= RING_MAX); }
                if let Ok(r) = rotate_size(s) { prop_assert!(r >= ROTATE_SIZE.0 && r <= ROTATE_SIZE.1); }
                let _ = (count(s), bytes(s), rotate_keep(s));
            }
        }
    }
}
