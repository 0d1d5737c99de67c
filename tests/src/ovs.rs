//! Open vSwitch run privately for one test: its database, sockets, pidfiles and logs in a
//! scratch directory (`OVS_RUNDIR`, which the daemon's OVS reads honour too), ovs-vswitchd in a
//! throwaway namespace. Dropped however the test ends: the bridge deleted, both daemons
//! stopped, the directory and the namespace removed.
use std::process::Command;

use crate::{Netns, Scratch};

/// Where the bridge's packets are switched.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Datapath {
    /// ovs-vswitchd itself (`datapath_type=netdev`): no kernel module, no kernel path.
    Userspace,
    /// The kernel's openvswitch module (the guests of the kernel matrix have it).
    Kernel,
}

pub struct Ovs {
    pub dir: Scratch,
    pub ns: Netns,
    pub bridge: String,
    datapath: Datapath,
}

impl Ovs {
    /// Starts ovsdb-server and ovs-vswitchd (in a new namespace). None, saying why, when
    /// ovs-vswitchd cannot start on this machine.
    pub fn start(tag: &str, datapath: Datapath) -> Option<Ovs> {
        crate::require_root();
        let ovs = Ovs {
            dir: Scratch::dir(tag),
            ns: Netns::new(tag),
            bridge: format!("fwmtbr{}", std::process::id() % 100_000),
            datapath,
        };
        let dir = ovs.dir.0.to_str().unwrap().to_owned();
        let db = format!("{dir}/conf.db");
        let sock = format!("unix:{dir}/db.sock");
        ovs.tool(
            "ovsdb-tool",
            &["create", &db, "/usr/share/openvswitch/vswitch.ovsschema"],
        )
        .expect("ovsdb-tool create");
        let pidfile = |d: &str| format!("--pidfile={dir}/{d}.pid");
        let logfile = |d: &str| format!("--log-file={dir}/{d}.log");
        ovs.tool(
            "ovsdb-server",
            &[
                &format!("--remote=p{sock}"),
                &pidfile("ovsdb-server"),
                &logfile("ovsdb-server"),
                "--detach",
                "--no-chdir",
                &db,
            ],
        )
        .unwrap_or_else(|e| panic!("ovsdb-server: {e}{}", ovs.log("ovsdb-server")));
        ovs.tool("ovs-vsctl", &["--timeout=5", "--no-wait", "init"])
            .expect("ovs-vsctl init");
        let mut args = vec!["netns", "exec", &ovs.ns.name, "ovs-vswitchd", &sock];
        let (pid, log) = (pidfile("ovs-vswitchd"), logfile("ovs-vswitchd"));
        args.extend([pid.as_str(), &log, "--detach", "--no-chdir"]);
        if datapath == Datapath::Userspace {
            args.push("--disable-system");
        }
        if let Err(e) = ovs.tool("ip", &args) {
            eprintln!(
                "SKIPPED: ovs-vswitchd cannot start here\n{e}{}",
                ovs.log("ovs-vswitchd")
            );
            return None;
        }
        Some(ovs)
    }

    /// Adds the bridge with these `Bridge` settings (e.g. `protocols=OpenFlow13`).
    pub fn add_bridge(&self, settings: &[&str]) {
        let br = self.bridge.as_str();
        let mut set = settings.to_vec();
        if self.datapath == Datapath::Userspace {
            set.push("datapath_type=netdev");
        }
        let mut args = vec!["--timeout=10", "add-br", br];
        if !set.is_empty() {
            args.extend(["--", "set", "bridge", br]);
            args.extend(set);
        }
        self.tool("ovs-vsctl", &args)
            .unwrap_or_else(|e| panic!("add-br: {e}{}", self.log("ovs-vswitchd")));
    }

    /// An OVS tool run against this instance: stdout, or stderr when it fails.
    pub fn tool(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(tool)
            .args(args)
            .envs(self.env())
            .output()
            .unwrap_or_else(|e| panic!("{tool} (apt install openvswitch-switch): {e}"));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The environment that points OVS's tools (and the daemon's OVS reads) here.
    pub fn env(&self) -> [(&'static str, &std::path::Path); 3] {
        let d = self.dir.0.as_path();
        [("OVS_RUNDIR", d), ("OVS_DBDIR", d), ("OVS_LOGDIR", d)]
    }

    pub fn log(&self, daemon: &str) -> String {
        std::fs::read_to_string(self.dir.0.join(format!("{daemon}.log"))).unwrap_or_default()
    }
}

impl Drop for Ovs {
    fn drop(&mut self) {
        let _ = self.tool(
            "ovs-vsctl",
            &["--timeout=5", "--if-exists", "del-br", &self.bridge],
        );
        for daemon in ["ovs-vswitchd", "ovsdb-server"] {
            if self
                .tool("ovs-appctl", &["--timeout=5", "-t", daemon, "exit"])
                .is_err()
            {
                // Not answering: stopped by its pid.
                let pid = std::fs::read_to_string(self.dir.0.join(format!("{daemon}.pid")));
                if let Ok(pid) = pid.unwrap_or_default().trim().parse::<i32>() {
                    // SAFETY: a signal to the daemon's pid, read from its own pidfile.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                }
            }
        }
    }
}
