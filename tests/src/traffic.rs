//! Traffic from inside a namespace: UDP (paced, bursts, IPv6 with extension headers), ICMP
//! echo from a raw socket, TCP echo servers and clients with SO_MARK.
use std::{
    net::UdpSocket,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::{in_netns, lab, StopOnDrop};

/// Sends `count` UDP datagrams to `dst:port` from inside namespace `ns` (a thread that enters
/// it), optionally from a socket with SO_MARK. Send errors (a netfilter drop) are ignored.
pub fn send_udp(ns: &str, dst: &str, port: u16, count: usize, so_mark: Option<u32>) {
    let dst = dst.to_owned();
    in_netns(ns, move || {
        let sock = lab::udp_socket(dst.contains(':'), so_mark.unwrap_or(0)).expect("socket");
        for _ in 0..count {
            let _ = sock.send_to(b"fwmark-trace test", (dst.as_str(), port));
            thread::sleep(Duration::from_millis(20));
        }
    });
}

/// UDP sockets with these SO_MARKs opened inside `ns` (they stay in it; closed on drop), as
/// daemons such as tailscaled or wg-quick hold theirs for as long as they run.
pub fn marked_sockets(ns: &str, marks: &[u32]) -> Vec<UdpSocket> {
    let marks = marks.to_vec();
    in_netns(ns, move || {
        marks
            .iter()
            .map(|m| lab::udp_socket(false, *m).expect("socket"))
            .collect()
    })
}

/// Sends one UDP datagram over IPv6 with a hop-by-hop options header (one PadN option), as
/// MLD and router-alert traffic carry, from inside `ns`.
pub fn send_udp6_with_hop_by_hop(ns: &str, dst: &str, port: u16) {
    use std::os::fd::AsRawFd;
    let dst = dst.to_owned();
    in_netns(ns, move || {
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
    });
}

/// Sends one ICMP echo request from a raw socket inside `ns` (as ping does) and waits up to a
/// second for the echo reply on it.
pub fn ping_raw(ns: &str, dst: &str) -> bool {
    let dst = dst.to_owned();
    in_netns(ns, move || {
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
}

/// Sends `count` UDP datagrams as fast as possible from inside `ns`.
pub fn send_udp_burst(ns: &str, dst: &str, port: u16, count: usize) {
    let dst = dst.to_owned();
    in_netns(ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        for _ in 0..count {
            let _ = sock.send_to(b"burst", (dst.as_str(), port));
        }
    });
}

/// A TCP echo server on `addr:port` inside `ns` until the returned guard drops (also when an
/// assertion fails first): every connection is echoed (one thread each, idle ones closed after
/// 2 s). The thread ends by itself once stopped; it is not joined.
pub fn tcp_echo_server(ns: &str, addr: &str, port: u16) -> StopOnDrop {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let (ns, addr) = (ns.to_owned(), addr.to_owned());
    let (ready_tx, ready_rx) = mpsc::channel();
    let guard = StopOnDrop::new();
    let stop = guard.flag();
    thread::spawn(move || {
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
    guard
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
    let dst = dst.to_owned();
    in_netns(ns, move || {
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
}
