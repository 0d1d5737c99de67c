//! `cargo xtask vm-test`: the demo and a smoke set of integration tests on kernels other than
//! the host's. Each kernel is Debian's generic build (the cloud flavour lacks 9p), downloaded
//! with apt but not installed, and booted by virtme-ng under QEMU with software emulation (KVM
//! guests die of an emulation failure on this machine). virtme-ng shares this machine's root
//! filesystem with the guest, so the guest runs the binaries built here by their host paths.
use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{cmd, setup};

/// The kernels `--kernel` names, each with the apt package names of its builds (the newest is
/// taken).
const KERNELS: &[(&str, &str)] = &[
    ("6.1", r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$"),
    ("6.12", r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$"),
];

/// One test of the smoke set, run on its own in every guest whose kernel is at least `since`.
struct Smoke {
    bin: &'static str,
    name: &'static str,
    since: &'static str,
    /// Run a second time with `--nf-observers fentry` where the kernel also has BPF netfilter
    /// links (the default there): fentry/fexit is proven on a kernel newer than 6.1 too.
    fentry_too: bool,
}

const fn smoke(name: &'static str, since: &'static str, fentry_too: bool) -> Smoke {
    Smoke {
        bin: "trace",
        name,
        since,
        fentry_too,
    }
}

/// A test of another target than `trace`, without a second back-end run.
const fn smoke_of(bin: &'static str, name: &'static str, since: &'static str) -> Smoke {
    Smoke {
        bin,
        name,
        since,
        fentry_too: false,
    }
}

const ANY: &str = "0";
/// Debian's 6.12 has the modules this host's kernel lacks (esp4, geneve, wireguard): tests
/// that need them run there (and fail, never skip, when one is missing).
const MODULES_SINCE: &str = "6.12";
/// BPF netfilter links arrived in 6.4: from there `--nf-observers fentry` is a choice.
const LINKS_SINCE: &str = "6.4";

const SMOKE: &[Smoke] = &[
    smoke("transitions_carry_hook_band_chain_and_values", ANY, true),
    smoke("netfilter_drop_reports_reason_and_mark", ANY, true),
    smoke("iptables_mark_is_seen_in_its_table_band", ANY, true),
    smoke("socket_mark_is_attributed_to_so_mark", ANY, false),
    smoke("ipv6_transitions_are_reported_as_ipv6", ANY, true),
    smoke(
        "clsact_back_end_names_the_filter_between_its_observers",
        ANY,
        false,
    ),
    // It asserts what the tcx back-end sees, and tcx arrived in 6.6.
    smoke(
        "classic_tc_filter_after_the_tcx_chain_is_named",
        "6.6",
        false,
    ),
    smoke("conntrack_mark_changes_are_transitions", ANY, true),
    smoke("nothing_stays_attached_after_sigint_or_sigkill", ANY, false),
    smoke_of(
        "tunnel",
        "esp_output_mark_names_its_state_not_an_owner",
        MODULES_SINCE,
    ),
    smoke_of(
        "tunnel",
        "esp_state_and_policy_marks_are_in_the_inventory",
        MODULES_SINCE,
    ),
    smoke_of(
        "tunnel",
        "esp_decrypted_packet_names_the_state_that_decrypted_it",
        MODULES_SINCE,
    ),
    smoke_of(
        "tunnel",
        "geneve_keeps_the_inner_mark_on_the_outer_packet",
        MODULES_SINCE,
    ),
    smoke_of(
        "tunnel",
        "wireguard_puts_its_fwmark_on_the_outer_packet",
        MODULES_SINCE,
    ),
    smoke_of(
        "tunnel",
        "vxlan_keeps_the_inner_mark_on_the_outer_packet_within_a_netns",
        MODULES_SINCE,
    ),
    smoke_of(
        "ovs",
        "open_vswitch_datapath_names_the_bridge_ports_and_flow",
        MODULES_SINCE,
    ),
    smoke_of(
        "why",
        "cause6_reply_bypasses_the_ipsec_tunnel_the_request_took",
        MODULES_SINCE,
    ),
];

/// QEMU, depmod for the extracted modules, and what virtme-ng needs for its initramfs
/// (busybox) and to read a kernel image's version (file).
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "kmod", "busybox-static", "file"];
const VIRTME_NG_VERSION: &str = "1.42";

/// A demo or test that hangs in a guest is ended after this long (TCG is several times slower
/// than the host).
const STEP_TIMEOUT_SECS: u32 = 180;
/// A whole guest (boot, steps, power-off) is killed after this long.
const GUEST_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// A kernel ready to boot: its image, and its modules (with modules.dep) beside it.
struct Kernel {
    name: &'static str,
    vmlinuz: PathBuf,
}

/// What one guest step did, from its markers on the console.
struct Step {
    name: String,
    /// `None`: the guest ended before the step did.
    rc: Option<i32>,
    secs: f64,
    /// The first error line of a failure.
    note: String,
}

pub fn run(kernel: &str, command: Option<&str>) -> Result<()> {
    setup::run()?;
    setup::apt_install("vm packages", VM_PACKAGES)?;
    let vm = crate::daemon::target_dir().join("vm");
    fs::create_dir_all(&vm)?;
    let vng_dir = virtme_ng(&vm)?;
    let _lock = lock(&vm)?;
    let kernels = KERNELS
        .iter()
        .filter(|(name, _)| kernel == "all" || kernel == *name)
        .map(|(name, pattern)| prepare_kernel(&vm, name, pattern))
        .collect::<Result<Vec<_>>>()?;

    let built = match command {
        Some(_) => None,
        None => Some((
            crate::daemon::build(true, crate::daemon::Build::Product)?,
            test_binaries()?,
        )),
    };
    let steps_for = |k: &Kernel| -> Result<Vec<(String, String)>> {
        let Some((daemon, tests)) = &built else {
            let file = vm.join("run.sh");
            fs::write(&file, format!("{}\n", command.unwrap_or_default()))?;
            return Ok(vec![("run".to_string(), format!("bash {}", quote(&file)))]);
        };
        let mut steps = vec![(
            "demo".to_string(),
            format!("timeout {STEP_TIMEOUT_SECS} {} demo", quote(daemon)),
        )];
        // The tests run this daemon (see tests/src/lib.rs).
        let env = format!("env {}={}", crate::daemon::DAEMON_ENV, quote(daemon));
        for t in SMOKE {
            if numbers(k.name) < numbers(t.since) {
                continue;
            }
            let exe = tests
                .iter()
                .find(|(b, _)| b == t.bin)
                .map(|(_, exe)| exe)
                .with_context(|| format!("cargo built no test binary {:?}", t.bin))?;
            let run = format!(
                "{env} timeout {STEP_TIMEOUT_SECS} {} --exact {} --test-threads=1 --color=never",
                quote(exe),
                t.name
            );
            steps.push((format!("test {}::{}", t.bin, t.name), run.clone()));
            if t.fentry_too && numbers(k.name) >= numbers(LINKS_SINCE) {
                steps.push((
                    format!("test {}::{} (fentry)", t.bin, t.name),
                    format!("env FWMARK_TEST_TRACE_ARGS='--nf-observers fentry' {run}"),
                ));
            }
        }
        Ok(steps)
    };

    let start = Instant::now();
    let mut results = Vec::new();
    for k in &kernels {
        let dir = vm.join(k.name);
        let script = dir.join("guest.sh");
        let steps = steps_for(k)?;
        fs::write(&script, guest_script(&steps))?;
        println!("vm-test: booting {} ({})", k.name, k.vmlinuz.display());
        let t = Instant::now();
        let (boot, lines) = boot(&vng_dir, k, &script, &dir.join("console.log"))?;
        match boot {
            Some(secs) => println!("vm-test: {} booted in {secs:.1}s", k.name),
            None => println!("vm-test: {} did not boot", k.name),
        }
        results.push((k.name, boot, parse_steps(&lines, &steps), t.elapsed()));
    }

    if command.is_some() {
        // The command's output was shown as it came; its exit status is the answer.
        let rc = results
            .iter()
            .flat_map(|(_, _, steps, _)| steps.iter().map(|s| s.rc.unwrap_or(1)))
            .find(|&rc| rc != 0);
        return match rc {
            None => Ok(()),
            Some(rc) => std::process::exit(rc),
        };
    }
    summary(&results, start.elapsed())
}

/// Installs virtme-ng into a venv of its own (check-first); returns the venv's bin/.
fn virtme_ng(vm: &Path) -> Result<PathBuf> {
    let venv = vm.join("venv");
    let bin = venv.join("bin");
    let have = Command::new(bin.join("vng")).arg("--version").output();
    if have.is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .trim_end()
            .ends_with(VIRTME_NG_VERSION)
    }) {
        cmd::step("virtme-ng", "ok");
        return Ok(bin);
    }
    cmd::step("virtme-ng", &format!("installing {VIRTME_NG_VERSION}"));
    cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    cmd::run(
        Command::new(bin.join("pip"))
            .args(["install", "-q"])
            .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
    )?;
    Ok(bin)
}

/// One vm-test at a time: guests share this machine's two cores, and the kernel cache.
fn lock(vm: &Path) -> Result<fs::File> {
    let file = fs::File::create(vm.join(".lock"))?;
    let fd = file.as_raw_fd();
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        println!("vm-test: waiting for another vm-test to finish");
        // SAFETY: as above.
        if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
            bail!("locking {}", vm.join(".lock").display());
        }
    }
    Ok(file)
}

/// Downloads the newest build of a kernel into target/vm/<name>/<package>/ (check-first),
/// extracted, with modules.dep: virtme-ng finds `lib/modules/<version>` above the image and
/// links it into the guest's /lib/modules, where modprobe then loads from.
fn prepare_kernel(vm: &Path, name: &'static str, pattern: &str) -> Result<Kernel> {
    let package = newest_package(pattern)?;
    let dir = vm.join(name);
    let root = dir.join(&package);
    let ready = root.join(".ready");
    let what = format!("kernel {name}");
    if ready.exists() {
        cmd::step(&what, &format!("ok ({package})"));
    } else {
        cmd::step(&what, &format!("downloading {package}"));
        // An older build of this kernel, or one half extracted, goes.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&root)?;
        cmd::run(
            Command::new("apt-get")
                // The _apt user cannot write into target/.
                .args(["download", "-q", "-o", "APT::Sandbox::User=root", &package])
                .current_dir(&dir),
        )?;
        let deb = fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
        fs::remove_file(&deb)?;
        // The package's own modules.dep is made on installation, not shipped.
        let version = module_version(&root)?;
        cmd::run(Command::new("depmod").arg("-b").arg(&root).arg(&version))?;
        fs::write(&ready, "")?;
    }
    let version = module_version(&root)?;
    Ok(Kernel {
        name,
        vmlinuz: root.join("boot").join(format!("vmlinuz-{version}")),
    })
}

fn newest_package(pattern: &str) -> Result<String> {
    let find = || {
        cmd::output("apt-cache", &["search", "--names-only", pattern])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .max_by_key(|name| numbers(name))
            .map(str::to_owned)
    };
    if let Some(package) = find() {
        return Ok(package);
    }
    // A new machine may not have read its package lists yet.
    cmd::run(Command::new("apt-get").args(["update", "-q"]))?;
    find().with_context(|| format!("apt knows no package matching {pattern}"))
}

/// The numbers in a package name, so that `6.1.0-9` sorts below `6.1.0-10`.
fn numbers(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The one kernel version an extracted package has modules for.
fn module_version(root: &Path) -> Result<String> {
    let modules = root.join("lib/modules");
    let entry = fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .next()
        .context("the kernel package has no modules")??;
    Ok(entry.file_name().to_string_lossy().into_owned())
}

/// Builds the integration tests and returns (target name, executable) of each. Release: under
/// emulation a debug daemon can take longer to start than the tests wait for it.
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let out = crate::daemon::cargo()
        .args([
            "test",
            "-p",
            crate::daemon::TESTS,
            "--no-run",
            "--release",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"]["kind"] == serde_json::json!(["test"]))
        .filter_map(|v| {
            let exe = v["executable"].as_str()?;
            Some((v["target"]["name"].as_str()?.to_owned(), exe.into()))
        })
        .collect())
}

fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// The script the guest runs: the mounts virtme-ng leaves out, then each step between two
/// marker lines the host reads back from the console.
fn guest_script(steps: &[(String, String)]) -> String {
    let mut s = String::from(
        r#"# Written by `cargo xtask vm-test`; runs as root in the guest, which sees this machine's
# root filesystem read-only, with /etc, /usr, /var, /tmp overlaid writable and /run a tmpfs.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Under emulation the verifier alone takes tens of seconds: the tests wait longer for a daemon.
export FWMARK_TEST_READY_SECS=150
# Tests that need modules this host lacks (ESP, Geneve, WireGuard, OVS) run here, never skip.
export FWMARK_TEST_REQUIRE_MODULES=1
# Kernel messages would cut into this script's lines on the console they share.
dmesg -n 1
# virtme-ng mounts proc, sysfs, tracefs and cgroup2, but no bpffs.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
echo "VMTEST ready $(uname -r)"
step() {
    local name=$1 t0=$EPOCHREALTIME
    shift
    echo "VMTEST start $name"
    "$@"
    local rc=$? t1=$EPOCHREALTIME
    echo "VMTEST end $name rc=$rc us=$(( ${t1//[.,]/} - ${t0//[.,]/} ))"
}
"#,
    );
    for (name, command) in steps {
        s.push_str(&format!("step '{name}' {command}\n"));
    }
    s.push_str(
        r#"echo "guest modules: $(lsmod | awk 'NR > 1 { print $1 }' | sort | tr '\n' ' ')"
dmesg --level=emerg,alert,crit,err,warn | tail -n 20 | sed 's/^/guest dmesg: /'
echo "VMTEST done"
"#,
    );
    s
}

/// Boots a kernel running `script`; shows the guest's output (the kernel's boot messages only
/// go to `log`) and returns the seconds until the guest was ready, and every console line.
fn boot(
    vng_dir: &Path,
    kernel: &Kernel,
    script: &Path,
    log: &Path,
) -> Result<(Option<f64>, Vec<String>)> {
    let (reader, writer) = std::io::pipe()?;
    let mut child = {
        let mut c = Command::new(vng_dir.join("vng"));
        // --verbose: with no udev in the guest, the script's output can only come back on the
        // console, which virtme-ng shows only when verbose.
        c.args(["--verbose", "--disable-kvm", "--force-9p"])
            .args(["--memory", "2G", "--cpus", "2", "--run"])
            .arg(&kernel.vmlinuz)
            .arg("--")
            .arg(format!("bash {}", quote(script)))
            // virtme-ng runs its virtme-run from PATH.
            .env("PATH", path_with(vng_dir))
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer)
            // Its own group, to kill QEMU with it on a timeout.
            .process_group(0);
        c.spawn().context("starting vng")?
        // The command, and with it this process's end of the pipe, goes here.
    };
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
            buf.clear();
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let start = Instant::now();
    let mut log = fs::File::create(log)?;
    let mut lines = Vec::new();
    let mut ready = None;
    loop {
        let left = GUEST_TIMEOUT.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                writeln!(log, "{line}")?;
                if !is_kernel_message(&line) {
                    println!("  {line}");
                }
                if ready.is_none() && marker(&line).is_some_and(|m| m.starts_with("ready")) {
                    ready = Some(start.elapsed().as_secs_f64());
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                println!(
                    "vm-test: {} still running after {GUEST_TIMEOUT:?}: killed",
                    kernel.name
                );
                // SAFETY: kill has no preconditions; the group is the one vng leads.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    child.wait()?;
    Ok((ready, lines))
}

fn path_with(dir: &Path) -> String {
    let path = std::env::var("PATH").unwrap_or_default();
    format!("{}:{path}", dir.display())
}

/// `[    1.234567] ...`: a kernel message (the guest's boot log).
fn is_kernel_message(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|l| l.split_once(']'))
        .is_some_and(|(t, _)| t.trim().parse::<f64>().is_ok())
}

/// The text after `VMTEST ` in a console line.
fn marker(line: &str) -> Option<&str> {
    line.find("VMTEST ").map(|i| &line[i + "VMTEST ".len()..])
}

/// Each step's result from its markers; a test passes only if it ran (`--exact` with a name
/// that no longer exists would run nothing, and pass).
fn parse_steps(lines: &[String], steps: &[(String, String)]) -> Vec<Step> {
    steps
        .iter()
        .map(|(name, _)| {
            let mut step = Step {
                name: name.clone(),
                rc: None,
                secs: 0.0,
                note: String::new(),
            };
            let start = format!("start {name}");
            let Some(from) = lines.iter().position(|l| marker(l) == Some(&start)) else {
                step.note = "the guest ended before this step".into();
                return step;
            };
            let end = format!("end {name} ");
            let rest = &lines[from + 1..];
            let Some(to) = rest
                .iter()
                .position(|l| marker(l).is_some_and(|m| m.starts_with(&end)))
            else {
                step.note = "the guest ended during this step".into();
                return step;
            };
            for field in marker(&rest[to]).unwrap_or_default().split_whitespace() {
                if let Some(rc) = field.strip_prefix("rc=") {
                    step.rc = rc.parse().ok();
                } else if let Some(us) = field.strip_prefix("us=") {
                    step.secs = us.parse::<f64>().unwrap_or(0.0) / 1e6;
                }
            }
            let output = &rest[..to];
            let ran = output
                .iter()
                .any(|l| l.contains("test result: ok. 1 passed"));
            if name.starts_with("test ") && step.rc == Some(0) && !ran {
                step.rc = Some(1);
                step.note = "no test of that name ran".into();
            } else if step.rc == Some(124) {
                // timeout(1)'s status.
                step.note = format!("timed out after {STEP_TIMEOUT_SECS}s");
            } else if step.rc != Some(0) {
                step.note = first_error(output);
            }
            step
        })
        .collect()
}

/// A failure's message: a test's panic message, else the first line that says error.
fn first_error(output: &[String]) -> String {
    let output: Vec<&str> = output
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty() && !is_kernel_message(l))
        .collect();
    let line = match output.iter().position(|l| l.contains("panicked at")) {
        Some(i) => output.get(i + 1).unwrap_or(&output[i]),
        None => output
            .iter()
            .find(|l| l.to_lowercase().contains("error"))
            .or(output.last())
            .unwrap_or(&""),
    };
    line.chars().take(160).collect()
}

fn summary(results: &[(&str, Option<f64>, Vec<Step>, Duration)], total: Duration) -> Result<()> {
    println!("\nvm-test summary");
    println!(
        "{:<7} {:<62} {:<6} {:>8}",
        "kernel", "step", "result", "seconds"
    );
    let mut failed = 0;
    for (kernel, boot, steps, secs) in results {
        match boot {
            Some(b) => println!("{kernel:<7} {:<62} {:<6} {b:>8.1}", "boot", "ok"),
            None => {
                failed += 1;
                println!("{kernel:<7} {:<62} FAIL", "boot");
            }
        }
        for s in steps {
            let ok = s.rc == Some(0);
            failed += usize::from(!ok);
            println!(
                "{kernel:<7} {:<62} {:<6} {:>8.1}  {}",
                s.name,
                if ok { "ok" } else { "FAIL" },
                s.secs,
                s.note
            );
        }
        println!(
            "{kernel:<7} {:<62} {:<6} {:>8.1}",
            "total",
            "",
            secs.as_secs_f64()
        );
    }
    println!("vm-test: all kernels in {:.1}s", total.as_secs_f64());
    if failed > 0 {
        bail!("{failed} vm-test step(s) failed");
    }
    Ok(())
}
