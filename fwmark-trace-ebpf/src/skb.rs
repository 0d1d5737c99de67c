//! Reading `struct sk_buff` and friends from kernel memory. Offsets come from the daemon
//! (kernel BTF, `Config::offsets`), so nothing here is tied to one kernel build; every read goes
//! through `bpf_probe_read_kernel`, which the verifier accepts from tc, netfilter and tracing
//! programs alike.
use core::ffi::c_void;

use aya_ebpf::helpers::generated;
use fwmark_trace_common::{Event, Offsets, OFFSET_MISSING};

/// Reads a `T` at `base + off`; 0 (as `T::default()`) when the field is missing or unreadable.
/// The helper zeroes the destination when the read faults, so its result is not checked: an
/// error branch per read multiplies the paths the verifier walks (seconds of load time).
#[inline(always)]
pub fn read<T: Copy + Default>(base: u64, off: u32) -> T {
    if off == OFFSET_MISSING {
        return T::default();
    }
    // Not zeroed first: the helper writes every byte (zeroes on a fault), and zeroing a
    // byte-aligned struct is a call to memset, a subprogram, which 6.1's verifier cannot
    // track precision through (it then stops pruning and gives up at 1M instructions).
    let mut v = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: `v` is writable for `size_of::<T>()` bytes; the helper reads any kernel address
    // without faulting and writes every byte of `v` (zeroes when the read fails), so `v` is
    // initialised, and `T` is plain data (offsets, integers, pointers as integers).
    unsafe {
        generated::bpf_probe_read_kernel(
            v.as_mut_ptr().cast(),
            size_of::<T>() as u32,
            (base + off as u64) as *const c_void,
        );
        v.assume_init()
    }
}

/// Loads a `T` at `base + off` with a plain load, for pointers the verifier knows the BTF type
/// of (netfilter and tp_btf arguments, and pointers loaded through them): one instruction
/// instead of a helper call. `off` must be a field of that type (a known constant).
#[inline(always)]
pub fn load<T: Copy + Default>(base: u64, off: u32) -> T {
    if off == OFFSET_MISSING {
        return T::default();
    }
    // SAFETY: not an ordinary dereference. `base` is a pointer the verifier knows the BTF type
    // of, and `off` a member of that type: it checks the access against BTF and emits a
    // fault-safe load (a bad pointer reads 0). Volatile, so LLVM keeps it one plain load.
    unsafe { core::ptr::read_volatile((base + off as u64) as *const T) }
}

/// A field of the `sk_buff` (or of a struct reached through it): a plain load when the observer
/// got a BTF-typed pointer (`BTF`), a helper read otherwise (tc's context).
#[inline(always)]
pub fn field<const BTF: bool, T: Copy + Default>(base: u64, off: u32) -> T {
    if BTF {
        load(base, off)
    } else {
        read(base, off)
    }
}

/// The conntrack state attached to a packet.
pub struct Ct {
    /// The `nf_conn` address, used only as an identity.
    pub id: u64,
    pub attached: bool,
    pub mark: u32,
    pub info: u8,
}

/// `skb->_nfct` holds `struct nf_conn *` with `enum ip_conntrack_info` in its low 3 bits.
#[inline(always)]
pub fn conntrack<const BTF: bool>(skb: u64, off: &Offsets) -> Ct {
    // `_nfct` is an integer to the verifier: the nf_conn behind it is read with the helper.
    let nfct: u64 = field::<BTF, _>(skb, off.skb_nfct);
    let conn = nfct & !7;
    Ct {
        id: conn,
        attached: conn != 0,
        mark: read(conn, off.nf_conn_mark),
        info: (nfct & 7) as u8,
    }
}

/// TCP_TIME_WAIT and TCP_NEW_SYN_RECV: `skb->sk` is then a mini socket without `sk_mark`.
const TCP_TIME_WAIT: u8 = 6;
const TCP_NEW_SYN_RECV: u8 = 12;

/// The packet's socket's SO_MARK, when it has a full socket (`BTF`: see `field`; `skb->sk`
/// is then a BTF-typed `struct sock *` too).
#[inline(always)]
pub fn socket_mark<const BTF: bool>(skb: u64, off: &Offsets) -> Option<u32> {
    let sk: u64 = field::<BTF, _>(skb, off.skb_sk);
    if sk == 0 || off.sock_sk_mark == OFFSET_MISSING {
        return None;
    }
    let state: u8 = field::<BTF, _>(sk, off.sock_state);
    (state != TCP_TIME_WAIT && state != TCP_NEW_SYN_RECV)
        .then(|| field::<BTF, _>(sk, off.sock_sk_mark))
}

/// The SO_MARK of the packet's socket, when it has a full one.
#[inline(always)]
pub fn fill_socket<const BTF: bool>(ev: &mut Event, skb: u64, off: &Offsets) {
    if let Some(mark) = socket_mark::<BTF>(skb, off) {
        ev.sk_mark = mark;
        ev.sk_flags = fwmark_trace_common::SK_FULL;
    }
}

/// `dev->ifindex` and `dev_net(dev)->ns.inum`.
#[inline(always)]
pub fn dev_ids(dev: u64, off: &Offsets) -> (u32, u32) {
    let net: u64 = read(dev, off.dev_nd_net);
    (read(dev, off.dev_ifindex), read(net, off.net_ns_inum))
}

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Ipv4Hdr {
    vihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    saddr: [u8; 4],
    daddr: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Ipv6Hdr {
    vtc_flow: u32,
    payload_len: u16,
    next: u8,
    hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_SCTP: u8 = 132;
/// ESP's header starts with its SPI where ports would be: read as the two "ports" (high and
/// low half), it names the xfrm state that made the packet.
const IPPROTO_ESP: u8 = 50;

/// IPv6 extension headers (RFC 8200 §4): hop-by-hop, routing and destination options are
/// `{next, len in 8-octet units not counting the first}`; a fragment header is 8 octets.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// MLD packets carry one (hop-by-hop); a few cover what hosts send in practice.
const IPV6_MAX_EXTENSIONS: usize = 4;

/// Follows extension headers from `next` at `at` to the upper-layer protocol and where its
/// header starts (`None` past the first fragment: no ports there).
#[inline(always)]
fn skip_ipv6_extensions(mut next: u8, mut at: u64) -> (u8, Option<u64>) {
    for _ in 0..IPV6_MAX_EXTENSIONS {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let h: [u8; 2] = read(at, 0);
                next = h[0];
                at += (h[1] as u64 + 1) * 8;
            }
            IPV6_FRAGMENT => {
                // next, reserved, fragment offset (13 bits) and flags.
                let h: [u8; 4] = read(at, 0);
                next = h[0];
                if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                    return (next, None);
                }
                at += 8;
            }
            _ => break,
        }
    }
    (next, Some(at))
}

/// Fills the 5-tuple of `ev`. `l3_at_data`: the IP header starts at `skb->data` (true at
/// `netif_receive_skb`, before the stack resets the network header); elsewhere it is at
/// `skb->head + skb->network_header`. The `sk_buff`'s own fields are read as `field` does;
/// the headers, in packet memory, always with the helper.
#[inline(always)]
pub fn fill_tuple<const BTF: bool>(
    ev: &mut Event,
    skb: u64,
    head: u64,
    off: &Offsets,
    l3_at_data: bool,
) {
    let proto: u16 = u16::from_be(field::<BTF, _>(skb, off.skb_protocol));
    let l3: u64 = if l3_at_data {
        field::<BTF, _>(skb, off.skb_data)
    } else {
        let nh: u16 = field::<BTF, _>(skb, off.skb_network_header);
        if head == 0 || nh == u16::MAX {
            return;
        }
        head + nh as u64
    };
    if l3 == 0 {
        return;
    }
    let l4 = match proto {
        ETH_P_IP => {
            let ip: Ipv4Hdr = read(l3, 0);
            if ip.vihl >> 4 != 4 {
                return;
            }
            ev.ip_version = 4;
            ev.l4_proto = ip.proto;
            ev.saddr[..4].copy_from_slice(&ip.saddr);
            ev.daddr[..4].copy_from_slice(&ip.daddr);
            // Only the first fragment carries ports.
            if u16::from_be(ip.frag_off) & 0x1fff != 0 {
                return;
            }
            l3 + ((ip.vihl & 0xf) as u64) * 4
        }
        ETH_P_IPV6 => {
            let ip: Ipv6Hdr = read(l3, 0);
            ev.ip_version = 6;
            ev.saddr = ip.saddr;
            ev.daddr = ip.daddr;
            let (next, l4) = skip_ipv6_extensions(ip.next, l3 + 40);
            ev.l4_proto = next;
            match l4 {
                Some(l4) => l4,
                None => return,
            }
        }
        _ => return,
    };
    if matches!(
        ev.l4_proto,
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP | IPPROTO_ESP
    ) {
        let ports: [u16; 2] = read(l4, 0);
        ev.sport = u16::from_be(ports[0]);
        ev.dport = u16::from_be(ports[1]);
    }
}

/// `XFRM_MAX_DEPTH`: the most states a sec_path holds.
const XFRM_MAX_DEPTH: i32 = 6;

/// The SPI of the xfrm state that decrypted the packet (the last in its sec_path), when one
/// did: helper reads, made only for a reported event.
#[inline(always)]
pub fn fill_sec_path(ev: &mut Event, skb: u64, off: &Offsets) {
    let id = off.skb_ext_sec_path;
    if id == OFFSET_MISSING || id >= 8 || off.skb_ext_offset == OFFSET_MISSING {
        return;
    }
    let active: u8 = read(skb, off.skb_active_extensions);
    if active & (1 << id) == 0 {
        return;
    }
    let ext: u64 = read(skb, off.skb_extensions);
    let chunk: u8 = read(ext, off.skb_ext_offset + id);
    let sp = ext + chunk as u64 * 8;
    let len: i32 = read(sp, off.sec_path_len);
    if !(1..=XFRM_MAX_DEPTH).contains(&len) || off.sec_path_xvec == OFFSET_MISSING {
        return;
    }
    let x: u64 = read(sp, off.sec_path_xvec + (len as u32 - 1) * 8);
    ev.sec_spi = u32::from_be(read(x, off.xfrm_state_spi));
}
