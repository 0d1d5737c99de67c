//! Netlink families without a typed crate here (ctnetlink, generic netlink): a message as its
//! type and body bytes, sent and received with `nodestate::netlink::dump`, and its attributes
//! walked with netlink-packet-core's iterator.
use std::convert::Infallible;

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkHeader, NetlinkSerializable, NlasIterator,
};

/// One netlink message: its type and the bytes after the header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RawMessage {
    pub(crate) kind: u16,
    pub(crate) body: Vec<u8>,
}

impl NetlinkSerializable for RawMessage {
    fn message_type(&self) -> u16 {
        self.kind
    }

    fn buffer_len(&self) -> usize {
        self.body.len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        buffer[..self.body.len()].copy_from_slice(&self.body);
    }
}

impl NetlinkDeserializable for RawMessage {
    type Error = Infallible;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Infallible> {
        Ok(RawMessage {
            kind: header.message_type,
            body: payload.to_vec(),
        })
    }
}

/// The attributes of `buf` as (type without flags, value); stops at the first malformed one.
pub(crate) fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    NlasIterator::new(buf).map_while(|a| {
        let a = a.ok()?;
        let (kind, len) = (a.kind(), usize::from(a.length()));
        // The buffer runs from the attribute's header to the end of `buf`.
        let inner: &[u8] = a.into_inner();
        Some((kind, inner.get(4..len)?))
    })
}

/// One attribute: type, then value, padded to 4 bytes (to build requests and test input).
pub(crate) fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut out = Vec::with_capacity(len.next_multiple_of(4));
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(len.next_multiple_of(4), 0);
    out
}

pub(crate) fn u32_ne(v: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(v.get(..4)?.try_into().ok()?))
}

pub(crate) fn u16_ne(v: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(v.get(..2)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_round_trip() {
        let mut buf = attr(7, &0xca6cu32.to_ne_bytes());
        buf.extend(attr(2, b"wg0\0"));
        buf.extend(attr(0x8000 | 8, &[]));
        let got: Vec<(u16, Vec<u8>)> = attrs(&buf).map(|(k, v)| (k, v.to_vec())).collect();
        assert_eq!(got.len(), 3);
        assert_eq!(u32_ne(&got[0].1), Some(0xca6c));
        assert_eq!(got[1], (2, b"wg0\0".to_vec()));
        assert_eq!(got[2].0, 8, "the nested flag is not part of the type");
        assert_eq!(u16_ne(&[1]), None);
    }

    proptest::proptest! {
        #![proptest_config(crate::testing::fixed_seed())]
        #[test]
        fn any_bytes_are_handled(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            let _ = attrs(&bytes).count();
        }
    }
}
