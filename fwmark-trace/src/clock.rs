//! Time: wall-clock timestamps as every record shows them, and the kernel's monotonic clock
//! that event timestamps count.
use std::{
    fmt,
    time::{Duration, SystemTime},
};

use crate::netstack::serialize_as_display;

/// Wall-clock time, shown as RFC 3339 (UTC, microseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Timestamp(pub(crate) SystemTime);

impl Timestamp {
    pub(crate) fn now() -> Self {
        Timestamp(SystemTime::now())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_rfc3339_micros(self.0).fmt(f)
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock kernel timestamps (`bpf_ktime_get_ns`) count.
pub(crate) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer to it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Wall-clock time of CLOCK_MONOTONIC's zero on this machine.
pub(crate) fn boot_time() -> SystemTime {
    SystemTime::now() - Duration::from_nanos(monotonic_ns())
}

serialize_as_display!(Timestamp);
