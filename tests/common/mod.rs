//! Integration-test harness: a throwaway lab (fwmark_trace::lab), traffic sent from inside a
//! namespace, and the real daemon run as a child process whose JSON events the tests read.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::{
    io::{BufRead, BufReader},
    net::UdpSocket,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub use fwmark_trace::lab::{
    self, attach_clsact_mark_setter, attach_tcx_mark_setter as attach_mark_setter, tcx_chain, Lab,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_fwmark-trace");

pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "integration tests attach eBPF programs: run them as root (cargo xtask test)"
    );
}

/// A running `fwmark-trace trace --json` writing to a temp file.
pub struct Daemon {
    child: Child,
    pub output: PathBuf,
    pub stderr: mpsc::Receiver<String>,
    pub stderr_lines: Vec<String>,
}

impl Daemon {
    /// Starts the daemon and waits until it reports that it is tracing.
    pub fn start(args: &[&str]) -> Daemon {
        require_root();
        let output = std::env::temp_dir().join(format!(
            "fwmark-trace-test-{}-{}.jsonl",
            std::process::id(),
            rand_suffix()
        ));
        let mut child = Command::new(BIN)
            .arg("trace")
            .arg("--json")
            .arg("--output")
            .arg(&output)
            .args(args)
            .args(extra_trace_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn fwmark-trace");
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut d = Daemon {
            child,
            output,
            stderr: rx,
            stderr_lines: Vec::new(),
        };
        d.wait_for_stderr("tracing (", ready_wait());
        d
    }

    pub fn wait_for_stderr(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            match self.stderr.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let hit = line.contains(needle);
                    self.stderr_lines.push(line);
                    if hit {
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Ok(Some(st)) = self.child.try_wait() {
                        panic!(
                            "fwmark-trace exited ({st}) before {needle:?}: {:#?}",
                            self.stderr_lines
                        );
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!(
            "fwmark-trace did not print {needle:?} in time: {:#?}",
            self.stderr_lines
        );
    }

    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGINT, wait for a clean exit, return the JSON records it wrote.
    /// Stops the daemon: its observer plans (`read_plans`) and its other records.
    pub fn stop_with_plans(self) -> (Vec<Value>, Vec<Value>) {
        let output = self.output.clone();
        let keep = output.with_extension("kept");
        let _ = std::fs::remove_file(&keep);
        // `stop` removes the output file (Drop): keep a link to read the plans from.
        std::fs::hard_link(&output, &keep).expect("link the output");
        let events = self.stop();
        let plans = read_plans(&keep);
        let _ = std::fs::remove_file(&keep);
        (plans, events)
    }

    pub fn stop(mut self) -> Vec<Value> {
        // Give the ring buffer consumer a moment to catch up with the last packets.
        thread::sleep(Duration::from_millis(500));
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().expect("wait");
        self.stderr_lines.extend(self.stderr.try_iter());
        assert!(
            status.success(),
            "fwmark-trace failed: {status}: {:#?}",
            self.stderr_lines
        );
        read_jsonl(&self.output)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.output);
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// The records of a JSON output file, without the observer plan (see `read_plans`).
pub fn read_jsonl(path: &PathBuf) -> Vec<Value> {
    read_records(path)
        .into_iter()
        .filter(|r| r["kind"] != "plan")
        .collect()
}

/// The observer plan records (`kind: "plan"`): the first line, and one after each re-plan.
pub fn read_plans(path: &PathBuf) -> Vec<Value> {
    read_records(path)
        .into_iter()
        .filter(|r| r["kind"] == "plan")
        .collect()
}

fn read_records(path: &PathBuf) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// Sends `count` UDP datagrams to `dst:port` from inside namespace `ns` (a thread that enters
/// it), optionally from a socket with SO_MARK. Send errors (a netfilter drop) are ignored.
pub fn send_udp(ns: &str, dst: &str, port: u16, count: usize, so_mark: Option<u32>) {
    let (ns, dst) = (ns.to_owned(), dst.to_owned());
    thread::spawn(move || {
        fwmark_trace::netns::enter(&ns).expect("enter netns");
        let sock = lab::udp_socket(dst.contains(':'), so_mark.unwrap_or(0)).expect("socket");
        for _ in 0..count {
            let _ = sock.send_to(b"fwmark-trace test", (dst.as_str(), port));
            thread::sleep(Duration::from_millis(20));
        }
    })
    .join()
    .expect("sender thread");
}

/// Sends one UDP datagram over IPv6 with a hop-by-hop options header (one PadN option), as
/// MLD and router-alert traffic carry, from inside `ns`.
pub fn send_udp6_with_hop_by_hop(ns: &str, dst: &str, port: u16) {
    use std::os::fd::AsRawFd;
    let (ns, dst) = (ns.to_owned(), dst.to_owned());
    thread::spawn(move || {
        fwmark_trace::netns::enter(&ns).expect("enter netns");
        let sock = lab::udp_socket(true, 0).expect("socket");
        // struct ipv6_opt_hdr: next header (the kernel fills it), length 0 (8 octets), then
        // PadN (type 1) with 4 bytes of padding.
        let hbh: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
        const IPV6_HOPOPTS: libc::c_int = 54;
        // SAFETY: a valid socket and an 8-byte buffer.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IPV6,
                IPV6_HOPOPTS,
                hbh.as_ptr().cast(),
                hbh.len() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "IPV6_HOPOPTS: {}", std::io::Error::last_os_error());
        sock.send_to(b"fwmark-trace test", (dst.as_str(), port))
            .expect("send");
    })
    .join()
    .expect("sender thread");
}

/// Sends one ICMP echo request from a raw socket inside `ns` (as ping does) and waits up to a
/// second for the echo reply on it.
pub fn ping_raw(ns: &str, dst: &str) -> bool {
    let (ns, dst) = (ns.to_owned(), dst.to_owned());
    thread::spawn(move || {
        fwmark_trace::netns::enter(&ns).expect("enter netns");
        // SAFETY: plain socket calls on buffers we own.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 1,
                tv_usec: 0,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
            // Echo request: type 8, code 0, checksum, id 0x4242, sequence 1, payload.
            let mut msg = [8u8, 0, 0, 0, 0x42, 0x42, 0, 1, b'f', b'w', b'm', b't'];
            let sum: u32 = msg
                .chunks(2)
                .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
                .sum();
            let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
            msg[2..4].copy_from_slice(&sum.to_be_bytes());
            let addr: std::net::Ipv4Addr = dst.parse().unwrap();
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(addr.octets()),
                },
                sin_zero: [0; 8],
            };
            libc::sendto(
                fd,
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            );
            // Replies come with their IP header; wait for an echo reply (type 0).
            let mut buf = [0u8; 256];
            let mut got = false;
            for _ in 0..8 {
                let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                if n <= 0 {
                    break;
                }
                let ihl = usize::from(buf[0] & 0xf) * 4;
                if n as usize > ihl && buf[ihl] == 0 {
                    got = true;
                    break;
                }
            }
            libc::close(fd);
            got
        }
    })
    .join()
    .expect("ping thread")
}

/// Events of one kind whose tuple goes to `dport`.
pub fn events_to<'a>(events: &'a [Value], kind: &str, dport: u16) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["tuple"]["dport"] == dport)
        .collect()
}

/// Program names of loaded eBPF programs, from the kernel's own listing.
pub fn loaded_programs() -> Vec<String> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "list"])
        .output()
        .expect("bpftool");
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub fn ours_loaded() -> Vec<String> {
    loaded_programs()
        .into_iter()
        .filter(|n| n.starts_with("fwm_"))
        .collect()
}

/// Our programs still loaded once the kernel has had time to release them: links close with
/// the process, programs go after an RCU grace period.
pub fn wait_unloaded() -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = ours_loaded();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `count` UDP datagrams as fast as possible from inside `ns`.
pub fn send_udp_burst(ns: &str, dst: &str, port: u16, count: usize) {
    let (ns, dst) = (ns.to_owned(), dst.to_owned());
    thread::spawn(move || {
        fwmark_trace::netns::enter(&ns).expect("enter netns");
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for _ in 0..count {
            let _ = sock.send_to(b"burst", (dst.as_str(), port));
        }
    })
    .join()
    .expect("burst thread");
}

/// A real rule set from the owners' own repositories, read where CI lays `shared/` beside the
/// project root (`../shared/real-rules/FILE`); never copied into the project.
pub fn real_rules(file: &str) -> PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("project root");
    let path = root.join("../shared/real-rules").join(file);
    assert!(
        path.is_file(),
        "real rule set {} missing (shared/ must sit beside the project root)",
        path.display()
    );
    path
}

/// Loads an iptables-restore file into namespace `ns` with `tool` (`iptables-nft-restore`,
/// `ip6tables-nft-restore`), `--noflush` as the owners load theirs.
pub fn restore_rules(ns: &str, tool: &str, file: &std::path::Path) {
    let input = std::fs::File::open(file).expect("open rule file");
    let out = Command::new("ip")
        .args(["netns", "exec", ns, tool, "--noflush"])
        .stdin(input)
        .output()
        .expect("run iptables-restore");
    assert!(
        out.status.success(),
        "{tool} {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs every line of an `ip -batch` style file (comments skipped) as `ip -n NS LINE`: lines may
/// carry options such as `-6`, which `ip -batch` does not take.
pub fn ip_lines(ns: &str, file: &std::path::Path) {
    let text = std::fs::read_to_string(file).expect("read ip file");
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut args = vec!["-n", ns];
        args.extend(line.split_whitespace());
        lab::run("ip", &args).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    }
}

/// One more throwaway namespace beside a Lab's two, deleted on drop (with its links, rules
/// and routes), even when the test fails.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!(
            "fwmt-{tag}-{}-{}",
            std::process::id(),
            rand_suffix() % 1_000_000
        );
        lab::run("ip", &["netns", "add", &name]).expect("ip netns add");
        let ns = Netns { name };
        lab::run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]).expect("lo up");
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// A TCP echo server on `addr:port` inside `ns` until `stop` is set: every connection is
/// echoed (one thread each, idle ones closed after 2 s).
pub fn tcp_echo_server(
    ns: &str,
    addr: &str,
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> thread::JoinHandle<()> {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let (ns, addr) = (ns.to_owned(), addr.to_owned());
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = thread::spawn(move || {
        fwmark_trace::netns::enter(&ns).expect("enter netns");
        let l = std::net::TcpListener::bind((addr.as_str(), port)).expect("bind tcp server");
        l.set_nonblocking(true).unwrap();
        ready_tx.send(()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut c, _)) => {
                    thread::spawn(move || {
                        c.set_nonblocking(false).unwrap();
                        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = c.read(&mut buf) {
                            if n == 0 || c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
                Err(_) => thread::sleep(Duration::from_millis(2)),
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("tcp server ready");
    h
}

/// A blocking IPv4 TCP connection from the calling thread's namespace with SO_MARK `mark`
/// (0: none) set before connecting; connect, reads and writes time out after 2 s.
pub fn tcp_connect(dst: std::net::SocketAddrV4, mark: u32) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a socket we own (closed by the TcpStream, or here).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let tv = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        if mark != 0
            && libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                4,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: dst.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        if libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// TCP traffic from inside `ns` to an echo server at `dst`, from sockets with SO_MARK `mark`:
/// `conns` short connections (connect, 64 bytes there and back, close), then one stream of
/// `stream_bytes` echoed in 16 KiB rounds. Bounded: every call times out after 2 s, and the
/// whole run stops after `limit`. Returns the local ports used and the bytes echoed back.
pub fn tcp_traffic(
    ns: &str,
    dst: &str,
    port: u16,
    mark: u32,
    conns: usize,
    stream_bytes: usize,
    limit: Duration,
) -> (Vec<u16>, usize) {
    use std::io::{Read, Write};
    let (ns, dst) = (ns.to_owned(), dst.to_owned());
    thread::spawn(move || {
        fwmark_trace::netns::enter(&ns).expect("enter netns");
        let to = std::net::SocketAddrV4::new(dst.parse().expect("IPv4 address"), port);
        let deadline = Instant::now() + limit;
        let (mut ports, mut echoed) = (Vec::new(), 0);
        let mut round = |c: &mut std::net::TcpStream, data: &[u8]| -> bool {
            if c.write_all(data).is_err() {
                return false;
            }
            let mut buf = vec![0u8; data.len()];
            let ok = c.read_exact(&mut buf).is_ok();
            if ok {
                echoed += data.len();
            }
            ok
        };
        for _ in 0..conns {
            if Instant::now() > deadline {
                break;
            }
            if let Ok(mut c) = tcp_connect(to, mark) {
                ports.push(c.local_addr().unwrap().port());
                round(&mut c, &[0x5a; 64]);
            }
        }
        if stream_bytes > 0 {
            if let Ok(mut c) = tcp_connect(to, mark) {
                ports.push(c.local_addr().unwrap().port());
                let chunk = vec![0xa5u8; 16 << 10];
                let mut sent = 0;
                while sent < stream_bytes && Instant::now() < deadline && round(&mut c, &chunk) {
                    sent += chunk.len();
                }
            }
        }
        (ports, echoed)
    })
    .join()
    .expect("tcp client thread")
}

/// Parses a JSON mark ("0x4000").
pub fn mark_of(v: &Value) -> u32 {
    u32::from_str_radix(
        v.as_str()
            .unwrap_or_else(|| panic!("not a mark: {v}"))
            .trim_start_matches("0x"),
        16,
    )
    .unwrap_or_else(|e| panic!("bad mark {v}: {e}"))
}

/// Arguments every test daemon gets besides its own, from `FWMARK_TEST_TRACE_ARGS` (`cargo
/// xtask vm-test` runs netfilter tests again with `--nf-observers fentry` where links exist).
pub fn extra_trace_args() -> Vec<String> {
    std::env::var("FWMARK_TEST_TRACE_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// How long a daemon may take to start: 30 s, or `FWMARK_TEST_READY_SECS` (set by `cargo
/// xtask vm-test`: under software emulation the verifier alone takes tens of seconds).
pub fn ready_wait() -> Duration {
    let secs = std::env::var("FWMARK_TEST_READY_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}
