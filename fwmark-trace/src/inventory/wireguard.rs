//! WireGuard devices' fwmarks: the mark a device puts on the encrypted UDP packets it sends
//! (wg-quick sets it to its table id, 51820 = 0xca6c, so its own traffic skips the tunnel). The
//! kernel module answers over generic netlink (family "wireguard", WG_CMD_GET_DEVICE →
//! WGDEVICE_A_FWMARK) for every link of kind "wireguard"; userspace implementations
//! (wireguard-go, boringtun) answer on their UAPI socket, /var/run/wireguard/IFNAME.sock
//! (`get=1` → `fwmark=N`), for the interfaces of that name in this namespace.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::Result;
use netlink_sys::protocols;

use super::model::{Access, Place, RawEntry, WgImpl};
use super::nl::{attr, attrs, u16_ne, u32_ne, RawMessage};
use crate::nodestate::netlink::dump;

/// GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_ATTR_FAMILY_ID/NAME (include/uapi/linux/genetlink.h).
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
/// include/uapi/linux/wireguard.h.
const WG_CMD_GET_DEVICE: u8 = 0;
const WGDEVICE_A_IFINDEX: u16 = 1;
const WGDEVICE_A_IFNAME: u16 = 2;
const WGDEVICE_A_LISTEN_PORT: u16 = 6;
const WGDEVICE_A_FWMARK: u16 = 7;
/// struct genlmsghdr: cmd, version, reserved.
const GENL_HDR: usize = 4;
/// Where userspace implementations keep their UAPI sockets.
pub(crate) const UAPI_DIR: &str = "/var/run/wireguard";

/// A WireGuard device and its fwmark (0: none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Device {
    pub(crate) ifname: String,
    pub(crate) ifindex: u32,
    pub(crate) listen_port: u16,
    pub(crate) fwmark: u32,
}

fn genl(kind: u16, cmd: u8, attributes: &[u8]) -> RawMessage {
    let mut body = vec![cmd, 1, 0, 0];
    body.extend_from_slice(attributes);
    RawMessage { kind, body }
}

fn genl_attrs(m: &RawMessage) -> impl Iterator<Item = (u16, &[u8])> {
    attrs(m.body.get(GENL_HDR..).unwrap_or_default())
}

/// The id of generic netlink family `name`, from a CTRL_CMD_GETFAMILY dump.
pub(crate) fn family_id(messages: &[RawMessage], name: &str) -> Option<u16> {
    messages.iter().find_map(|m| {
        let (mut id, mut found) = (None, false);
        for (k, v) in genl_attrs(m) {
            match k {
                CTRL_ATTR_FAMILY_ID => id = u16_ne(v),
                CTRL_ATTR_FAMILY_NAME => {
                    found = v.split(|b| *b == 0).next() == Some(name.as_bytes())
                }
                _ => {}
            }
        }
        id.filter(|_| found)
    })
}

/// The device a WG_CMD_GET_DEVICE dump describes (its first message carries the device's
/// attributes; later ones continue its peer list).
pub(crate) fn decode_device(messages: &[RawMessage]) -> Option<Device> {
    let m = messages.first()?;
    let mut d = Device {
        ifname: String::new(),
        ifindex: 0,
        listen_port: 0,
        fwmark: 0,
    };
    for (k, v) in genl_attrs(m) {
        match k {
            WGDEVICE_A_IFINDEX => d.ifindex = u32_ne(v)?,
            WGDEVICE_A_IFNAME => {
                d.ifname = String::from_utf8_lossy(v.split(|b| *b == 0).next().unwrap_or_default())
                    .into_owned()
            }
            WGDEVICE_A_LISTEN_PORT => d.listen_port = u16_ne(v)?,
            WGDEVICE_A_FWMARK => d.fwmark = u32_ne(v)?,
            _ => {}
        }
    }
    Some(d)
}

/// fwmark and listen port from a UAPI `get=1` answer (`fwmark=51820`, decimal; absent: 0).
pub(crate) fn parse_uapi(text: &str) -> Option<(u32, u16)> {
    let (mut fwmark, mut port, mut errno) = (0, 0, None);
    for line in text.lines() {
        match line.split_once('=') {
            Some(("fwmark", v)) => fwmark = v.trim().parse().ok()?,
            Some(("listen_port", v)) => port = v.trim().parse().ok()?,
            Some(("errno", v)) => errno = v.trim().parse::<i32>().ok(),
            _ => {}
        }
    }
    (errno == Some(0)).then_some((fwmark, port))
}

/// The kernel's WireGuard devices (`links`: their ifindexes, `Links::wireguard`) with their
/// fwmarks.
pub(crate) fn kernel_devices(links: &[u32]) -> Result<Vec<Device>> {
    if links.is_empty() {
        return Ok(Vec::new());
    }
    let families = dump(
        protocols::NETLINK_GENERIC,
        genl(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, &[]),
    )?;
    let Some(id) = family_id(&families, "wireguard") else {
        anyhow::bail!("links of kind wireguard but no generic netlink family \"wireguard\"");
    };
    let mut out = Vec::new();
    for &ifindex in links {
        let req = genl(
            id,
            WG_CMD_GET_DEVICE,
            &attr(WGDEVICE_A_IFINDEX, &ifindex.to_ne_bytes()),
        );
        out.extend(decode_device(&dump(protocols::NETLINK_GENERIC, req)?));
    }
    Ok(out)
}

/// Asks a UAPI socket for its configuration.
fn uapi_get(path: &Path) -> Result<String> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    s.write_all(b"get=1\n\n")?;
    let mut text = String::new();
    for line in BufReader::new(s).lines() {
        let line = line?;
        if line.is_empty() {
            break;
        }
        text.push_str(&line);
        text.push('\n');
    }
    Ok(text)
}

/// Userspace devices whose interface is in this namespace.
fn userspace_devices(skip: &[Device]) -> Vec<Device> {
    let Ok(dir) = std::fs::read_dir(UAPI_DIR) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for path in dir.filter_map(|e| e.ok().map(|e| e.path())) {
        let Some(name) = path
            .extension()
            .filter(|x| *x == "sock")
            .and_then(|_| path.file_stem())
            .and_then(|s| s.to_str())
        else {
            continue;
        };
        let Ok(cname) = std::ffi::CString::new(name) else {
            continue;
        };
        // SAFETY: a NUL-terminated name; the lookup happens in this thread's namespace.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 || skip.iter().any(|d| d.ifname == name) {
            continue;
        }
        let Some((fwmark, listen_port)) = uapi_get(&path).ok().as_deref().and_then(parse_uapi)
        else {
            continue;
        };
        out.push(Device {
            ifname: name.to_owned(),
            ifindex,
            listen_port,
            fwmark,
        });
    }
    out
}

fn found(d: Device, implementation: WgImpl) -> Option<RawEntry> {
    (d.fwmark != 0).then(|| RawEntry {
        text: format!(
            "interface {}: fwmark {:#x}, listen-port {}",
            d.ifname, d.fwmark, d.listen_port
        ),
        access: vec![Access::origin(d.fwmark)],
        names: vec![d.ifname.clone()],
        place: Place::Wireguard {
            ifname: d.ifname,
            ifindex: d.ifindex,
            listen_port: d.listen_port,
            implementation,
        },
    })
}

/// Every WireGuard device of this namespace that has a fwmark.
pub(crate) fn read() -> Result<Vec<RawEntry>> {
    let kernel = kernel_devices(&crate::nodestate::links::read()?.wireguard())?;
    let user = userspace_devices(&kernel);
    Ok(kernel
        .into_iter()
        .filter_map(|d| found(d, WgImpl::Kernel))
        .chain(user.into_iter().filter_map(|d| found(d, WgImpl::Userspace)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_family_and_decodes_a_device() {
        let mut fam = attr(CTRL_ATTR_FAMILY_ID, &0x15u16.to_ne_bytes());
        fam.extend(attr(CTRL_ATTR_FAMILY_NAME, b"wireguard\0"));
        let other = genl(
            GENL_ID_CTRL,
            1,
            &[
                attr(CTRL_ATTR_FAMILY_ID, &0x14u16.to_ne_bytes()),
                attr(CTRL_ATTR_FAMILY_NAME, b"wireguar\0"),
            ]
            .concat(),
        );
        let msgs = [other, genl(GENL_ID_CTRL, 1, &fam)];
        assert_eq!(family_id(&msgs, "wireguard"), Some(0x15));
        assert_eq!(family_id(&msgs[..1], "wireguard"), None);

        let dev = [
            attr(WGDEVICE_A_IFINDEX, &7u32.to_ne_bytes()),
            attr(WGDEVICE_A_IFNAME, b"wg0\0"),
            attr(WGDEVICE_A_LISTEN_PORT, &51820u16.to_ne_bytes()),
            attr(WGDEVICE_A_FWMARK, &0xca6cu32.to_ne_bytes()),
            attr(0x8000 | 8, &[]),
        ]
        .concat();
        let d = decode_device(&[genl(0x15, WG_CMD_GET_DEVICE, &dev)]).unwrap();
        assert_eq!(
            d,
            Device {
                ifname: "wg0".into(),
                ifindex: 7,
                listen_port: 51820,
                fwmark: 0xca6c
            }
        );
        let f = found(d, WgImpl::Kernel).unwrap();
        assert_eq!(f.access, vec![Access::origin(0xca6c)]);
        assert_eq!(f.place.label(), "wireguard wg0");
        assert!(decode_device(&[]).is_none());
    }

    #[test]
    fn parses_uapi_answers() {
        let text = "private_key=00\nlisten_port=51820\nfwmark=51820\npublic_key=11\nerrno=0\n";
        assert_eq!(parse_uapi(text), Some((51820, 51820)));
        assert_eq!(parse_uapi("listen_port=1\nerrno=0\n"), Some((0, 1)));
        assert_eq!(parse_uapi("errno=22\n"), None);
        assert_eq!(parse_uapi("fwmark=x\nerrno=0\n"), None);
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn any_bytes_are_handled(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200), text in "(\\PC|\n){0,200}") {
            let m = [RawMessage { kind: GENL_ID_CTRL, body }];
            let _ = family_id(&m, "wireguard");
            let _ = decode_device(&m);
            let _ = parse_uapi(&text);
        }
    }
}
