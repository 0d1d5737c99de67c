//! `--output FILE`: an event file that is safe to point anywhere and that log shippers can
//! follow.
//!
//! - It is opened without following a symbolic link (`O_NOFOLLOW`: a link is refused, its
//!   target untouched) and created with mode 0600 (the umask may narrow it): records name
//!   addresses, ports and processes.
//! - It is opened early (a path that cannot be written fails before anything is attached) but
//!   emptied only when the first record is written, after the arguments, the registry and the
//!   attachment have succeeded: a failed run leaves yesterday's file as it was. `--append`
//!   keeps what it holds. Writes always append (`O_APPEND`), so a file truncated under us
//!   (logrotate's `copytruncate`) gets no hole.
//! - `--rotate-size BYTES`: before a record would take FILE past BYTES, FILE becomes FILE.1
//!   (FILE.1 becomes FILE.2, … up to FILE.N for `--rotate-keep N`, the oldest dropped) and a new
//!   FILE is started; records are never split (one larger than BYTES gets a file of its own).
//! - `reopen` (SIGHUP) closes FILE and opens it again by name, appending, as logrotate expects
//!   after moving it away.
use std::{
    ffi::OsString,
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

/// How an output file is opened and rotated (the `trace` flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FileOptions {
    /// Keep what the file holds (`--append`) instead of emptying it.
    pub(crate) append: bool,
    /// Rotate before the file would grow past this many bytes (`--rotate-size`).
    pub(crate) rotate_size: Option<u64>,
    /// How many rotated files to keep (`--rotate-keep`): FILE.1 … FILE.N.
    pub(crate) rotate_keep: u32,
}

/// Rotated files kept unless told.
pub(crate) const ROTATE_KEEP: u32 = 5;

/// Opens (creating with mode 0600) `path` for appending, refusing a symbolic link.
pub(crate) fn open(path: &Path) -> Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            let link = path.symlink_metadata().is_ok_and(|m| m.is_symlink());
            if e.raw_os_error() == Some(libc::ELOOP) && link {
                anyhow::anyhow!(
                    "output file {} is a symbolic link: refusing to follow it (name the file itself)",
                    path.display()
                )
            } else {
                anyhow::Error::new(e).context(format!("opening output file {}", path.display()))
            }
        })
}

/// `FILE.n`.
fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = OsString::from(path.as_os_str());
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// An output file (see the module's documentation).
pub(crate) struct LogFile {
    path: PathBuf,
    opts: FileOptions,
    out: BufWriter<File>,
    /// Bytes in FILE (what it held when opened for appending, and what was written since).
    size: u64,
    /// Nothing written yet and not `--append`: empty the file at the first write.
    empty_first: bool,
    /// The last byte written ended a line (rotation happens only there).
    line_start: bool,
    /// A regular file (a FIFO or a device is neither emptied nor rotated).
    regular: bool,
}

impl LogFile {
    pub(crate) fn open(path: &Path, opts: FileOptions) -> Result<Self> {
        let file = open(path)?;
        let meta = file
            .metadata()
            .with_context(|| format!("output file {}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            opts,
            out: BufWriter::new(file),
            size: meta.len(),
            empty_first: !opts.append,
            line_start: true,
            regular: meta.is_file(),
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Closes FILE and opens it again by name (appending; a new FILE when it was moved away).
    pub(crate) fn reopen(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("writing output file {}", self.path.display()))?;
        let file = open(&self.path)?;
        let meta = file
            .metadata()
            .with_context(|| format!("output file {}", self.path.display()))?;
        self.size = meta.len();
        self.regular = meta.is_file();
        self.out = BufWriter::new(file);
        Ok(())
    }

    /// FILE → FILE.1 → … → FILE.N (the oldest dropped), then a new FILE.
    fn rotate(&mut self) -> io::Result<()> {
        self.out.flush()?;
        let keep = self.opts.rotate_keep.max(1);
        for n in (1..keep).rev() {
            match std::fs::rename(numbered(&self.path, n), numbered(&self.path, n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&self.path, numbered(&self.path, 1))?;
        let file = open(&self.path).map_err(|e| io::Error::other(format!("{e:#}")))?;
        // FILE may have been made again since the rename; ours starts at its end.
        self.size = file.metadata()?.len();
        self.out = BufWriter::new(file);
        Ok(())
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.empty_first {
            self.empty_first = false;
            if self.regular {
                self.out.get_ref().set_len(0)?;
                self.size = 0;
            }
        }
        if let Some(limit) = self.opts.rotate_size {
            let after = self.size.saturating_add(buf.len() as u64);
            if self.regular && self.line_start && self.size > 0 && after > limit {
                self.rotate()?;
            }
        }
        self.out.write_all(buf)?;
        self.size = self.size.saturating_add(buf.len() as u64);
        self.line_start = buf.last() == Some(&b'\n');
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    /// A temporary directory, removed on drop.
    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "fwmark-trace-unit-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn refuses_a_symlink_and_creates_0600() {
        let d = Dir::new("link");
        let target = d.0.join("target");
        std::fs::write(&target, "keep\n").unwrap();
        let link = d.0.join("link");
        symlink(&target, &link).unwrap();
        let e = LogFile::open(&link, FileOptions::default())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(read(&target), "keep\n");
        let f = d.0.join("new");
        LogFile::open(&f, FileOptions::default()).unwrap();
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & !0o600, 0, "{mode:o}");
    }

    #[test]
    fn empties_only_at_the_first_write_unless_appending() {
        let d = Dir::new("empty");
        let f = d.0.join("out");
        std::fs::write(&f, "old\n").unwrap();
        let mut w = LogFile::open(&f, FileOptions::default()).unwrap();
        w.flush().unwrap();
        assert_eq!(read(&f), "old\n", "opened, nothing written: intact");
        w.write_all(b"new\n").unwrap();
        w.flush().unwrap();
        assert_eq!(read(&f), "new\n");
        let opts = FileOptions {
            append: true,
            ..Default::default()
        };
        let mut w = LogFile::open(&f, opts).unwrap();
        w.write_all(b"more\n").unwrap();
        w.flush().unwrap();
        assert_eq!(read(&f), "new\nmore\n");
    }

    #[test]
    fn rotates_whole_lines_and_keeps_n() {
        let d = Dir::new("rotate");
        let f = d.0.join("out");
        let opts = FileOptions {
            append: false,
            rotate_size: Some(10),
            rotate_keep: 2,
        };
        let mut w = LogFile::open(&f, opts).unwrap();
        for line in [
            "aaaa\n", "bbbb\n", "cc", "cc\n", "dddd\n", "eeee\n", "ffff\n", "gggg\n",
        ] {
            w.write_all(line.as_bytes()).unwrap();
        }
        w.flush().unwrap();
        // a+b fill the 10 bytes; "cc" starts a record that would pass them: rotation, and the
        // record's second half follows it into the new file. The first file is dropped when
        // the third rotation needs its place.
        assert_eq!(read(&f), "gggg\n");
        assert_eq!(read(&numbered(&f, 1)), "eeee\nffff\n");
        assert_eq!(read(&numbered(&f, 2)), "cccc\ndddd\n");
        assert!(!numbered(&f, 3).exists(), "only two kept");
    }

    #[test]
    fn reopen_starts_a_new_file_after_a_move() {
        let d = Dir::new("reopen");
        let f = d.0.join("out");
        let mut w = LogFile::open(&f, FileOptions::default()).unwrap();
        w.write_all(b"one\n").unwrap();
        std::fs::rename(&f, d.0.join("moved")).unwrap();
        w.reopen().unwrap();
        w.write_all(b"two\n").unwrap();
        w.flush().unwrap();
        assert_eq!(read(&d.0.join("moved")), "one\n");
        assert_eq!(read(&f), "two\n");
    }
}
