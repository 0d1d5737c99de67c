//! Sockets with SO_MARK: their packets start with that mark. sock_diag (NETLINK_SOCK_DIAG,
//! inet_diag_req_v2) dumps the namespace's TCP, UDP and raw sockets, IPv4 and IPv6; with
//! CAP_NET_ADMIN each reply carries INET_DIAG_MARK. The process holding a socket is found by
//! its inode among /proc/*/fd.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
};

use anyhow::Result;
use netlink_packet_core::Emitable;
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SOCK_DIAG_BY_FAMILY},
    inet::{nlas::Nla, ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags},
};
use netlink_sys::protocols;

use super::model::{Access, Place, RawEntry, SockProto};
use super::nl::RawMessage;
use crate::nodestate::netlink::dump;

const IPPROTO_RAW: u8 = 255;

/// A marked socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Marked {
    pub(crate) proto: SockProto,
    pub(crate) local: SocketAddr,
    pub(crate) remote: Option<SocketAddr>,
    pub(crate) inode: u32,
    pub(crate) mark: u32,
}

/// The dump request for one family and protocol. Raw sockets are asked for with IPPROTO_RAW
/// in `sdiag_raw_protocol` (the byte after `idiag_ext`), as `ss` does: every raw protocol.
pub(crate) fn request(family: u8, proto: SockProto) -> RawMessage {
    let protocol = match proto {
        SockProto::Tcp => IPPROTO_TCP,
        SockProto::Udp => IPPROTO_UDP,
        SockProto::Raw => IPPROTO_RAW,
    };
    let req = InetRequest {
        family,
        protocol,
        extensions: ExtensionFlags::empty(),
        states: StateFlags::all(),
        socket_id: if family == AF_INET6 {
            SocketId::new_v6()
        } else {
            SocketId::new_v4()
        },
    };
    let mut body = vec![0; req.buffer_len()];
    req.emit(&mut body);
    if proto == SockProto::Raw {
        body[3] = IPPROTO_RAW;
    }
    RawMessage {
        kind: SOCK_DIAG_BY_FAMILY,
        body,
    }
}

/// The marked sockets among a dump's replies.
pub(crate) fn decode(proto: SockProto, messages: &[RawMessage]) -> Vec<Marked> {
    messages
        .iter()
        .filter(|m| m.kind == SOCK_DIAG_BY_FAMILY)
        .filter_map(|m| {
            let r = <InetResponse as netlink_packet_core::Parseable<[u8]>>::parse(&m.body).ok()?;
            let mark = r.nlas.iter().find_map(|n| match n {
                Nla::Mark(v) => Some(*v),
                _ => None,
            })?;
            let id = &r.header.socket_id;
            let remote = SocketAddr::new(id.destination_address, id.destination_port);
            Some(Marked {
                proto,
                local: SocketAddr::new(id.source_address, id.source_port),
                remote: (id.destination_port != 0 || !remote.ip().is_unspecified())
                    .then_some(remote),
                inode: r.header.inode,
                mark,
            })
        })
        .filter(|s| s.mark != 0)
        .collect()
}

/// pid and command of the processes holding these socket inodes.
pub(crate) fn holders(inodes: &HashSet<u32>) -> HashMap<u32, (u32, String)> {
    let mut out = HashMap::new();
    if inodes.is_empty() {
        return out;
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.filter_map(|e| e.ok()) {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.filter_map(|e| e.ok()) {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u32>().ok());
            if let Some(i) = inode.filter(|i| inodes.contains(i)) {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                out.entry(i).or_insert((pid, comm.trim().to_owned()));
            }
        }
    }
    out
}

/// Every marked socket of this namespace, with its process.
pub(crate) fn read() -> Result<Vec<RawEntry>> {
    let mut marked = Vec::new();
    for family in [AF_INET, AF_INET6] {
        for proto in [SockProto::Tcp, SockProto::Udp, SockProto::Raw] {
            match dump(protocols::NETLINK_SOCK_DIAG, request(family, proto)) {
                Ok(m) => marked.extend(decode(proto, &m)),
                // Raw sockets need raw_diag, which a kernel may lack.
                Err(_) if proto == SockProto::Raw => {}
                Err(e) => return Err(e),
            }
        }
    }
    marked.sort_by_key(|s| (s.mark, s.local, s.inode));
    let who = holders(&marked.iter().map(|s| s.inode).collect());
    Ok(marked
        .into_iter()
        .map(|s| {
            let (pid, comm) = who.get(&s.inode).cloned().unzip();
            let text = format!(
                "{} {} SO_MARK {:#x}{}",
                s.proto.name(),
                s.local,
                s.mark,
                comm.as_ref().map(|c| format!(" ({c})")).unwrap_or_default()
            );
            RawEntry {
                names: comm
                    .iter()
                    .map(|c| format!("{}{c}", super::owners::PROCESS))
                    .collect(),
                text,
                access: vec![Access::origin(s.mark)],
                place: Place::Socket {
                    proto: s.proto,
                    local: s.local,
                    remote: s.remote,
                    inode: s.inode,
                    pid,
                    comm,
                },
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_sock_diag::inet::InetResponseHeader;

    #[test]
    fn requests_and_replies() {
        let r = request(AF_INET, SockProto::Raw);
        assert_eq!(&r.body[..4], &[AF_INET, IPPROTO_RAW, 0, IPPROTO_RAW]);
        assert_eq!(request(AF_INET6, SockProto::Udp).body[1], IPPROTO_UDP);

        let mut id = SocketId::new_v4();
        id.source_port = 51820;
        let resp = |mark: Option<u32>| {
            let r = InetResponse {
                header: InetResponseHeader {
                    family: AF_INET,
                    state: 7,
                    timer: None,
                    socket_id: id.clone(),
                    recv_queue: 0,
                    send_queue: 0,
                    uid: 0,
                    inode: 4242,
                },
                nlas: mark.map(Nla::Mark).into_iter().collect(),
            };
            let mut body = vec![0; r.buffer_len()];
            r.emit(&mut body);
            RawMessage {
                kind: SOCK_DIAG_BY_FAMILY,
                body,
            }
        };
        let got = decode(
            SockProto::Udp,
            &[resp(Some(0xca6c)), resp(None), resp(Some(0))],
        );
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].inode, got[0].mark, got[0].local.port()),
            (4242, 0xca6c, 51820)
        );
        assert_eq!(got[0].remote, None);
    }

    #[test]
    fn finds_its_own_socket_holder() {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = {
            use std::os::fd::AsRawFd;
            let link = std::fs::read_link(format!("/proc/self/fd/{}", sock.as_raw_fd())).unwrap();
            let s = link.to_string_lossy().into_owned();
            s.trim_start_matches("socket:[")
                .trim_end_matches(']')
                .parse::<u32>()
                .unwrap()
        };
        let who = holders(&HashSet::from([inode]));
        assert_eq!(who[&inode].0, std::process::id());
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn any_bytes_are_handled(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = decode(SockProto::Tcp, &[RawMessage { kind: SOCK_DIAG_BY_FAMILY, body }]);
        }
    }
}
