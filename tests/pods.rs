//! Pods and containers named from runc's state: podman containers started with the Kubernetes
//! annotations CRI-O and containerd set (`io.kubernetes.pod.name`, `…namespace`) stand for
//! pods. The image is a busybox root filesystem imported once (no registry is needed).
use std::{
    path::Path,
    process::{Command, Stdio},
    sync::OnceLock,
    time::Duration,
};

use fwmark_trace_tests::*;
use serde_json::Value;

const IMAGE: &str = "localhost/fwmark-test:latest";

/// podman as it runs containers here (runc, cgroupfs), bounded in time; its stdout.
fn podman(args: &[&str]) -> Result<String, String> {
    let out = Command::new("timeout")
        .args([
            "60",
            "podman",
            "--runtime",
            "runc",
            "--cgroup-manager",
            "cgroupfs",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("podman: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether podman and runc are here (`cargo xtask setup` installs them); says so when not.
fn podman_or_skip(test: &str) -> bool {
    let have = |tool: &str| {
        Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let ok = have("podman") && have("runc") && Path::new("/bin/busybox").exists();
    if !ok {
        eprintln!("skipping {test}: podman, runc and busybox-static are needed");
    }
    ok
}

/// The busybox image, imported once per test process (again only when it is gone).
fn image() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        if podman(&["image", "exists", IMAGE]).is_ok() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("fwmark-rootfs-{}", unique()));
        let bin = dir.join("root/bin");
        std::fs::create_dir_all(&bin).expect("rootfs dir");
        std::fs::copy("/bin/busybox", bin.join("busybox")).expect("copy busybox");
        for applet in ["sh", "sleep"] {
            std::os::unix::fs::symlink("busybox", bin.join(applet)).expect("applet link");
        }
        let tar = dir.join("rootfs.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(dir.join("root"))
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("tar");
        assert!(status.success(), "tar of the rootfs");
        podman(&["import", &tar.to_string_lossy(), IMAGE]).expect("podman import");
        let _ = std::fs::remove_dir_all(&dir);
    });
}

/// A running container, removed when dropped (whatever the test's outcome).
struct Container {
    name: String,
    pid: u32,
}

impl Container {
    /// `sleep 600` without a network (only its own loopback), with these annotations.
    fn start(tag: &str, annotations: &[String]) -> Container {
        image();
        // The guard first: a container that started but failed later is removed too.
        let mut c = Container {
            name: format!("fwmark-{tag}-{}", unique()),
            pid: 0,
        };
        let mut args: Vec<&str> = vec![
            "run",
            "-d",
            "--name",
            &c.name,
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ];
        for a in annotations {
            args.extend(["--annotation", a.as_str()]);
        }
        args.extend([IMAGE, "/bin/sleep", "600"]);
        podman(&args).expect("podman run");
        let pid = podman(&["inspect", "-f", "{{.State.Pid}}", &c.name]).expect("inspect");
        c.pid = pid.parse().expect("a pid");
        assert!(c.pid > 0, "container {} has no process", c.name);
        c
    }

    fn netns(&self) -> String {
        format!("/proc/{}/ns/net", self.pid)
    }

    fn inode(&self) -> u32 {
        fwmark_trace::netns::inode(Path::new(&self.netns())).expect("netns inode")
    }

    fn nft(&self, rules: &str) {
        use std::io::Write;
        let mut child = Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-n", "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("nsenter nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("rules");
        assert!(child.wait().expect("nft").success(), "nft rules");
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.name]);
    }
}

/// Kubernetes's annotations for pod shop/NAME (each test its own pod: they run in parallel).
fn pod(name: &str) -> [String; 2] {
    [
        format!("io.kubernetes.pod.name={name}"),
        "io.kubernetes.pod.namespace=shop".into(),
    ]
}

const RULES: &str = "table inet t {
    chain out {
        type route hook output priority mangle; policy accept;
        udp dport 9990 meta mark set 0x77
    }
}";

#[test]
fn pod_events_name_their_pod() {
    if !podman_or_skip("pod_events_name_their_pod") {
        return;
    }
    let c = Container::start("pod", &pod("web"));
    c.nft(RULES);
    let args = [
        "--pod",
        "shop/web",
        "--metrics",
        "127.0.0.1:0",
        "--metrics-pods",
    ];
    let mut d = Daemon::start(&args);
    assert_eq!(d.ready["netns"], c.inode(), "traces the pod's namespace");
    send_udp(&c.netns(), "127.0.0.1", 9990, 3, None);
    // Counted in the kernel, reported once per interval: then in the pod's series.
    let addr = d.ready["metrics"].as_str().expect("metrics").to_owned();
    d.wait_for(Duration::from_secs(10), |r| {
        !marked(r, 9990, "0x77").is_empty()
    });
    let body = scrape(&addr);
    assert!(
        sample(
            &body,
            "fwmark_trace_pod_transitions_total{pod=\"shop/web\"}"
        ) >= 1,
        "{body}"
    );
    let events = d.stop_when("the pod's transition", |ev| {
        !marked(ev, 9990, "0x77").is_empty()
    });
    let seen = marked(&events, 9990, "0x77");
    let ev = seen.first().expect("a 0x0 -> 0x77 transition");
    assert_eq!(ev["mark"]["old"], "0x0");
    assert_eq!(ev["pod"]["namespace"], "shop", "{ev}");
    assert_eq!(ev["pod"]["name"], "web", "{ev}");
    assert_eq!(ev["pod"]["container"], c.name.as_str(), "{ev}");
    check_record(ev);
}

#[test]
fn unknown_pods_are_one_error() {
    if !podman_or_skip("unknown_pods_are_one_error") {
        return;
    }
    let (code, stderr) = trace_fails(&["trace", "--pod", "shop/nope"]);
    assert_eq!(code, 2, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("no running pod shop/nope"), "{stderr}");
    // Not a pod name at all: a usage error.
    let (code, _, stderr) = run(&["trace", "--pod", "web"]);
    assert_eq!(code, 2, "{stderr}");
}

#[test]
fn inventory_names_pods_and_containers() {
    if !podman_or_skip("inventory_names_pods_and_containers") {
        return;
    }
    let in_pod = Container::start("inv", &pod("inv"));
    let plain = Container::start("plain", &[]);
    let (code, out, stderr) = run(&["inventory", "--all-netns", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let doc: Value = serde_json::from_str(&out).expect("inventory JSON");
    let ns_of = |inode: u32| {
        doc["namespaces"]
            .as_array()
            .and_then(|l| l.iter().find(|n| n["inode"] == inode))
            .cloned()
            .unwrap_or_else(|| panic!("namespace {inode} not listed: {doc}"))
    };
    let p = ns_of(in_pod.inode());
    assert_eq!(
        (&p["pod"]["namespace"], &p["pod"]["name"]),
        (&Value::from("shop"), &Value::from("inv")),
        "{p}"
    );
    let n = ns_of(plain.inode());
    assert_eq!(n["pod"]["container"], plain.name.as_str(), "{n}");
    assert!(n["pod"].get("namespace").is_none(), "{n}");
    // One pod's namespace alone.
    let (code, out, stderr) = run(&["inventory", "--pod", "shop/inv", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let doc: Value = serde_json::from_str(&out).expect("inventory JSON");
    assert_eq!(doc["namespaces"][0]["inode"], in_pod.inode(), "{doc}");
    assert_eq!(doc["namespaces"][0]["pod"]["name"], "inv", "{doc}");
}
