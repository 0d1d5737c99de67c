//! Pods and containers, by network namespace. containerd, CRI-O, docker and podman run their
//! containers with runc, which keeps a `state.json` per container under its root directory:
//! the container's init pid (its /proc/PID/ns/net is the container's namespace) and the OCI
//! annotations, as `key=value` labels. Kubernetes's annotations name the pod; the container's
//! own name comes from an annotation (CRI) or from containers/storage (podman).
//!
//! Read once per tick by the daemon: a directory listing, and the state files that changed
//! since the last read (they are tens of kilobytes; most never change).
use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::Mutex,
    time::SystemTime,
};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// A Kubernetes pod: `NAMESPACE/NAME`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct PodName {
    pub(crate) namespace: String,
    pub(crate) name: String,
}

impl fmt::Display for PodName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl FromStr for PodName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(PodName {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
        }
    }
}

/// Who lives in a network namespace: a pod (and its containers), or a container started
/// outside Kubernetes (no pod).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct Container {
    pub(crate) pod: Option<PodName>,
    /// The container's name; a pod's application containers, comma-separated (they share the
    /// pod's namespace; its sandbox, the "pause" container, is not named).
    pub(crate) name: Option<String>,
    /// The runtime's container id (the sandbox's, for a pod).
    pub(crate) id: String,
}

impl fmt::Display for Container {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.pod, &self.name) {
            (Some(pod), _) => write!(f, "pod {pod}"),
            (None, Some(name)) => write!(f, "container {name}"),
            (None, None) => write!(f, "container {}", self.id.get(..12).unwrap_or(&self.id)),
        }
    }
}

/// A container as the records show it: `{"namespace", "name"}` of its pod, `"container"`,
/// `"id"` (what events, `why` and the inventory write).
pub(crate) struct ContainerJson<'a>(pub(crate) &'a Container);

impl Serialize for ContainerJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Json<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            namespace: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            name: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            container: Option<&'a str>,
            id: &'a str,
        }
        let c = self.0;
        Json {
            namespace: c.pod.as_ref().map(|p| p.namespace.as_str()),
            name: c.pod.as_ref().map(|p| p.name.as_str()),
            container: c.name.as_deref(),
            id: &c.id,
        }
        .serialize(s)
    }
}

/// `serialize_with` for an optional container, as `ContainerJson`.
pub(crate) fn json<S: serde::Serializer>(c: &Option<Container>, s: S) -> Result<S::Ok, S::Error> {
    c.as_ref().map(ContainerJson).serialize(s)
}

/// How a runc root holds its containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `ROOT/ID/state.json`.
    Flat,
    /// `ROOT/NAMESPACE/ID/state.json` (one directory per containerd namespace).
    PerNamespace,
}

/// runc's roots: its default (CRI-O, podman, plain runc), containerd's (k8s.io, moby,
/// default…) and docker's.
const ROOTS: [(&str, Layout); 3] = [
    ("/run/runc", Layout::Flat),
    ("/run/containerd/runc", Layout::PerNamespace),
    ("/run/docker/runtime-runc", Layout::PerNamespace),
];

/// What a `state.json` says, the parts used here.
#[derive(Clone, Debug, PartialEq)]
struct State {
    id: String,
    pid: u32,
    /// The init process's start time (clock ticks after boot): a pid reused by another
    /// process after the container died has another one.
    start: u64,
    /// OCI annotations, and runc's own `bundle`.
    labels: HashMap<String, String>,
}

/// Reads the parts of a `state.json`; None for anything else (never panics).
fn parse_state(text: &[u8]) -> Option<State> {
    #[derive(Deserialize)]
    struct Raw {
        id: String,
        init_process_pid: u32,
        #[serde(default)]
        init_process_start: u64,
        #[serde(default)]
        config: RawConfig,
    }
    #[derive(Default, Deserialize)]
    struct RawConfig {
        #[serde(default)]
        labels: Vec<String>,
    }
    let raw: Raw = serde_json::from_slice(text).ok()?;
    if raw.init_process_pid == 0 {
        return None;
    }
    let labels = raw
        .config
        .labels
        .iter()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Some(State {
        id: raw.id,
        pid: raw.init_process_pid,
        start: raw.init_process_start,
        labels,
    })
}

/// A pod's sandbox ("pause") container, which holds the pod's namespace.
fn is_sandbox(labels: &HashMap<String, String>) -> bool {
    let is = |k: &str, v: &str| labels.get(k).is_some_and(|x| x == v);
    is("io.kubernetes.cri.container-type", "sandbox")
        || is("io.kubernetes.cri-o.ContainerType", "sandbox")
        || is("io.kubernetes.docker.type", "podsandbox")
        || is("io.kubernetes.container.name", "POD")
}

/// The first of these annotations present.
fn first<'a>(labels: &'a HashMap<String, String>, keys: &[&str]) -> Option<&'a str> {
    keys.iter()
        .find_map(|k| labels.get(*k))
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// Names a container from its annotations (CRI-O's and podman's, then containerd's);
/// `storage_name` finds the name podman gave it.
fn describe(state: &State, storage_name: impl FnOnce(&State) -> Option<String>) -> Container {
    let l = &state.labels;
    let pod = match (
        first(
            l,
            &[
                "io.kubernetes.pod.namespace",
                "io.kubernetes.cri.sandbox-namespace",
            ],
        ),
        first(
            l,
            &["io.kubernetes.pod.name", "io.kubernetes.cri.sandbox-name"],
        ),
    ) {
        (Some(namespace), Some(name)) => Some(PodName {
            namespace: namespace.into(),
            name: name.into(),
        }),
        _ => None,
    };
    let name = if is_sandbox(l) {
        None
    } else {
        first(
            l,
            &[
                "io.kubernetes.container.name",
                "io.kubernetes.cri.container-name",
            ],
        )
        .map(str::to_owned)
        .or_else(|| storage_name(state))
    };
    Container {
        pod,
        name,
        id: state.id.clone(),
    }
}

/// The name podman (containers/storage) gave a container: its bundle is
/// `STORAGE/overlay-containers/ID/userdata`, and `STORAGE/overlay-containers/containers.json`
/// lists every container's names.
fn storage_name(state: &State) -> Option<String> {
    #[derive(Deserialize)]
    struct Entry {
        id: String,
        #[serde(default)]
        names: Vec<String>,
    }
    let bundle = Path::new(state.labels.get("bundle")?);
    let list = bundle.parent()?.parent()?.join("containers.json");
    let text = std::fs::read(list).ok()?;
    let entries: Vec<Entry> = serde_json::from_slice(&text).ok()?;
    entries
        .into_iter()
        .find(|e| e.id == state.id)
        .and_then(|e| e.names.into_iter().next())
}

/// Whether `pid` is still the process that `start` says (field 22 of /proc/PID/stat).
fn alive(pid: u32, start: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The command name (field 2) may hold spaces and parentheses: count after its last ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let started = after
        .split_whitespace()
        .nth(19)
        .and_then(|f| f.parse().ok());
    start == 0 || started == Some(start)
}

/// A running container: who it is, and its init process and namespace.
#[derive(Clone, Debug)]
struct Running {
    container: Container,
    sandbox: bool,
    pid: u32,
    netns: u32,
}

/// Parsed state files by path, with the modification time they were read at.
type Cache = HashMap<PathBuf, (SystemTime, Option<(State, Container, bool)>)>;

static CACHE: Mutex<Option<Cache>> = Mutex::new(None);

/// Every `state.json` under the roots.
fn state_files() -> Vec<PathBuf> {
    let dirs = |p: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(p)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for (root, layout) in ROOTS {
        let containers = match layout {
            Layout::Flat => dirs(Path::new(root)),
            Layout::PerNamespace => dirs(Path::new(root)).iter().flat_map(|d| dirs(d)).collect(),
        };
        out.extend(containers.into_iter().map(|c| c.join("state.json")));
    }
    out.sort();
    out
}

/// The running containers runc knows of.
fn running() -> Vec<Running> {
    let mut guard = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = guard.get_or_insert_with(HashMap::new);
    let files = state_files();
    cache.retain(|path, _| files.contains(path));
    let mut out = Vec::new();
    for path in files {
        let Ok(modified) = std::fs::metadata(&path).and_then(|m| m.modified()) else {
            continue;
        };
        let entry = cache
            .entry(path.clone())
            .or_insert((SystemTime::UNIX_EPOCH, None));
        if entry.0 != modified || entry.1.is_none() {
            let parsed = std::fs::read(&path).ok().and_then(|t| parse_state(&t));
            let described = parsed.map(|s| {
                let c = describe(&s, storage_name);
                let sandbox = is_sandbox(&s.labels);
                (s, c, sandbox)
            });
            *entry = (modified, described);
        }
        let Some((state, container, sandbox)) = &entry.1 else {
            continue;
        };
        if !alive(state.pid, state.start) {
            continue;
        }
        // The namespace's inode is its id (`net->ns.inum`); netns.rs resolves pods, not this.
        let Ok(netns) = std::fs::metadata(netns_file(state.pid)).map(|m| m.ino() as u32) else {
            continue;
        };
        out.push(Running {
            container: container.clone(),
            sandbox: *sandbox,
            pid: state.pid,
            netns,
        });
    }
    out
}

fn netns_file(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// Who lives in each network namespace, by inode, of the containers runc runs.
pub(crate) fn by_netns() -> HashMap<u32, Container> {
    merge(running())
}

/// One entry per namespace: the containers sharing one (a pod's) make one, with the pod's
/// sandbox's id and its application containers' names.
fn merge(running: Vec<Running>) -> HashMap<u32, Container> {
    let mut names: HashMap<u32, BTreeSet<String>> = HashMap::new();
    let mut out: HashMap<u32, Container> = HashMap::new();
    for r in running {
        if let Some(n) = &r.container.name {
            names.entry(r.netns).or_default().insert(n.clone());
        }
        let slot = out.entry(r.netns).or_insert_with(|| r.container.clone());
        if slot.pod.is_none() {
            slot.pod = r.container.pod.clone();
        }
        if r.sandbox {
            slot.id = r.container.id.clone();
        }
    }
    for (ns, c) in &mut out {
        c.name = names
            .remove(ns)
            .map(|n| n.into_iter().collect::<Vec<_>>().join(","));
    }
    out
}

/// The namespace file of a running pod (its sandbox's, or any of its containers').
pub(crate) fn netns_path(pod: &PodName) -> Result<PathBuf> {
    let running = running();
    let mine = running
        .iter()
        .filter(|r| r.container.pod.as_ref() == Some(pod))
        .max_by_key(|r| r.sandbox);
    if let Some(r) = mine {
        return Ok(netns_file(r.pid));
    }
    let known: BTreeSet<String> = running
        .iter()
        .filter_map(|r| r.container.pod.as_ref().map(ToString::to_string))
        .collect();
    let roots: Vec<&str> = ROOTS.iter().map(|(r, _)| *r).collect();
    let known = match known.len() {
        0 => "no pod is running".to_string(),
        _ => format!(
            "running pods: {}",
            known.into_iter().collect::<Vec<_>>().join(", ")
        ),
    };
    bail!(
        "no running pod {pod} in runc's state ({}): {known}",
        roots.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(labels: &[&str]) -> String {
        serde_json::json!({
            "id": "abc123",
            "init_process_pid": 42,
            "init_process_start": 1000,
            "config": { "labels": labels, "mounts": [] },
            "namespace_paths": { "NEWNET": "/proc/42/ns/net" },
        })
        .to_string()
    }

    #[test]
    fn kubernetes_annotations_name_the_pod() {
        let s = parse_state(
            state(&[
                "io.kubernetes.pod.name=web",
                "io.kubernetes.pod.namespace=shop",
                "io.kubernetes.container.name=nginx",
                "bundle=/x",
            ])
            .as_bytes(),
        )
        .unwrap();
        assert_eq!((s.pid, s.start, s.id.as_str()), (42, 1000, "abc123"));
        let c = describe(&s, |_| Some("unused".into()));
        assert_eq!(c.pod, Some("shop/web".parse().unwrap()));
        assert_eq!(c.name.as_deref(), Some("nginx"));
        assert_eq!(c.to_string(), "pod shop/web");
    }

    #[test]
    fn containerd_sandboxes_have_no_container_name() {
        let s = parse_state(
            state(&[
                "io.kubernetes.cri.sandbox-name=web",
                "io.kubernetes.cri.sandbox-namespace=shop",
                "io.kubernetes.cri.container-type=sandbox",
            ])
            .as_bytes(),
        )
        .unwrap();
        let c = describe(&s, |_| Some("k8s_POD".into()));
        assert_eq!(
            (c.pod.unwrap().to_string(), c.name),
            ("shop/web".into(), None)
        );
    }

    #[test]
    fn plain_containers_are_named_by_their_storage_name() {
        let s =
            parse_state(state(&["io.container.manager=libpod", "odd label"]).as_bytes()).unwrap();
        let c = describe(&s, |_| Some("fwtest".into()));
        assert_eq!((c.pod.as_ref(), c.name.as_deref()), (None, Some("fwtest")));
        assert_eq!(c.to_string(), "container fwtest");
        let c = describe(&s, |_| None);
        assert_eq!(c.to_string(), "container abc123");
    }

    #[test]
    fn odd_state_files_are_skipped() {
        for odd in [
            "",
            "null",
            "[]",
            "{}",
            r#"{"id": "x"}"#,
            r#"{"id": "x", "init_process_pid": -1}"#,
            r#"{"id": "x", "init_process_pid": 0}"#,
            r#"{"id": 5, "init_process_pid": 7}"#,
            r#"{"id": "x", "init_process_pid": 7, "config": {"labels": [1, 2]}}"#,
            "\u{0}\u{ff}",
        ] {
            assert_eq!(parse_state(odd.as_bytes()), None, "{odd:?}");
        }
        // No config, labels null-free: still a container.
        let s = parse_state(br#"{"id": "x", "init_process_pid": 7}"#).unwrap();
        assert!(s.labels.is_empty());
    }

    #[test]
    fn containers_sharing_a_namespace_are_one_pod() {
        let pod = Some(PodName {
            namespace: "shop".into(),
            name: "web".into(),
        });
        let run = |id: &str, name: Option<&str>, sandbox| Running {
            container: Container {
                pod: pod.clone(),
                name: name.map(Into::into),
                id: id.into(),
            },
            sandbox,
            pid: 1,
            netns: 7,
        };
        let m = merge(vec![
            run("b", Some("sidecar"), false),
            run("a", None, true),
            run("c", Some("app"), false),
        ]);
        assert_eq!(m.len(), 1);
        assert_eq!(m[&7].id, "a");
        assert_eq!(m[&7].name.as_deref(), Some("app,sidecar"));
    }

    #[test]
    fn pod_names_parse() {
        assert_eq!(
            "shop/web".parse::<PodName>().unwrap().to_string(),
            "shop/web"
        );
        for bad in ["", "web", "/web", "shop/", "a/b/c"] {
            assert!(bad.parse::<PodName>().is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn parsing_never_panics(s in "\\PC{0,200}") {
            if let Some(st) = parse_state(s.as_bytes()) {
                let _ = describe(&st, |_| None);
            }
            let _ = s.parse::<PodName>();
        }
    }
}
