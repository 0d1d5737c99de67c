//! Network namespaces: entering the one to trace (netfilter links and tcx attachments are made
//! in the caller's namespace) and naming namespaces by inode number (what the kernel reports).
use std::{fs::File, os::fd::AsRawFd, os::unix::fs::MetadataExt, path::PathBuf};

use anyhow::{bail, Context, Result};

/// How `--pod NAMESPACE/NAME` is passed on as a namespace spec: `pod:NAMESPACE/NAME`.
pub const POD: &str = "pod:";

/// `NAME` (as made by `ip netns add`, under /run/netns), a path such as /proc/PID/ns/net, or a
/// running pod (`pod:NAMESPACE/NAME`, its init process's namespace file).
pub fn path_of(spec: &str) -> PathBuf {
    if spec.starts_with(POD) {
        // A pod that is not running has no namespace file: the spec, which does not exist.
        return resolve(spec).unwrap_or_else(|_| PathBuf::from(spec));
    }
    if spec.contains('/') {
        PathBuf::from(spec)
    } else {
        PathBuf::from("/run/netns").join(spec)
    }
}

/// The namespace file of a spec, or why there is none (a pod that is not running).
pub fn resolve(spec: &str) -> Result<PathBuf> {
    match spec.strip_prefix(POD) {
        Some(pod) => {
            let pod = pod
                .parse::<crate::nodestate::pods::PodName>()
                .map_err(anyhow::Error::msg)?;
            crate::nodestate::pods::netns_path(&pod)
        }
        None => Ok(path_of(spec)),
    }
}

/// Inode number of a namespace file (equals the kernel's `net->ns.inum`).
pub fn inode(path: &std::path::Path) -> Result<u32> {
    Ok(std::fs::metadata(path)
        .with_context(|| format!("network namespace {}", path.display()))?
        .ino() as u32)
}

pub fn current() -> Result<u32> {
    inode(std::path::Path::new("/proc/thread-self/ns/net"))
}

/// Moves the calling thread into the namespace; threads it spawns afterwards inherit it, so
/// call this before starting the async runtime.
pub fn enter(spec: &str) -> Result<u32> {
    let path = resolve(spec)?;
    let file = File::open(&path).with_context(|| {
        format!(
            "network namespace {spec:?} not found (looked for {})",
            path.display()
        )
    })?;
    // SAFETY: plain syscall on an open namespace fd.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!(
            "entering network namespace {spec:?}: {}",
            std::io::Error::last_os_error()
        );
    }
    current()
}
