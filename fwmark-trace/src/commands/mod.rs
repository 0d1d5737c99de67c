//! The commands, each a module: `trace` (the daemon), `show` (a recording), `why` (lost
//! replies), `inventory`, `registry`, `demo`, and with the `bench` feature `bench` and `soak`.
//! `cli` parses the command line into their configurations; what they found is an `Outcome`.
#[cfg(feature = "bench")]
pub(crate) mod bench;
pub(crate) mod demo;
pub(crate) mod inventory;
pub(crate) mod registry;
pub(crate) mod show;
pub(crate) mod trace;
pub(crate) mod why;

use std::io::Write;

use anyhow::{Context, Result};

use crate::output::text::escape_lines;

/// What a command found, as its exit code says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Exit 0.
    Clean,
    /// Exit 1: a lost reply, overlapping owners, conflicts (`inventory --check`).
    Found,
}

/// What a failed write to stdout says (`print`, and `output` for events).
pub(crate) const STDOUT: &str = "writing to stdout";

/// Writes a command's report to stdout; a reader that went away ends the command quietly.
pub(crate) fn print(text: impl AsRef<[u8]>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_ref())
        .and_then(|()| out.flush())
        .context(STDOUT)
}

/// A report for people: names from the node in it cannot drive the terminal (see
/// `escape_lines`).
pub(crate) fn print_text(text: &str) -> Result<()> {
    print(escape_lines(text).as_bytes())
}
