//! JSON lines (`--json`): one object per record, as `schema/trace-records.schema.json`
//! describes. Events share their points, segments and attributions (`Arc`s from the decoder and
//! the attributor); each is rendered once and its JSON copied into every event that has it,
//! instead of escaping the same strings again per event.
use std::{collections::HashMap, sync::Arc};

use by_address::ByAddress;
use serde::{ser::SerializeStruct, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::{
    attribution::{Attribution, FieldRef, FieldValue, OwnerChange, Warning},
    clock::Timestamp,
    event::{
        CtMark, DropReason, EventKind, Interval, MarkChange, RouteLookup, TraceEvent, Tuple,
        XfrmRef,
    },
    mark::Mark,
    netstack::Family,
    nodestate::{links::TunnelKind, pods::ContainerJson},
    output::text::FindingText,
    place::{Encapsulator, Hook, Layer, MarkFate, PointInfo, Segment, Tunnel, TunnelDir},
    registry::Registry,
};

fn raw<T: Serialize>(v: &T) -> Box<RawValue> {
    serde_json::value::to_raw_value(v).expect("event parts are plain data and always serialise")
}

/// JSON already rendered, per shared value; bounded (it starts over when full).
struct Cache<T>(HashMap<ByAddress<Arc<T>>, Box<RawValue>>);

impl<T> Default for Cache<T> {
    fn default() -> Self {
        Cache(HashMap::new())
    }
}

impl<T> Cache<T> {
    const MAX: usize = 65536;

    /// Keeping the `Arc` in the key keeps its address from being reused by another value.
    fn get(&mut self, v: &Arc<T>, render: impl FnOnce(&T) -> Box<RawValue>) -> &RawValue {
        if self.0.len() >= Self::MAX && !self.0.contains_key(&ByAddress(v.clone())) {
            self.0.clear();
        }
        self.0
            .entry(ByAddress(v.clone()))
            .or_insert_with(|| render(v))
    }
}

/// Writes events as JSON with the shared parts rendered once.
#[derive(Default)]
pub(crate) struct EventWriter {
    points: Cache<PointInfo>,
    segments: Cache<Segment>,
    attributions: Cache<Attribution>,
    /// Names the attributions' owners.
    registry: Arc<Registry>,
}

/// An event as JSON: its own fields, and the shared parts as rendered JSON.
#[derive(Serialize)]
struct EventJson<'a> {
    time: Timestamp,
    ts_ns: u64,
    packet_id: u64,
    kind: EventKind,
    at: &'a RawValue,
    /// The pod (or container) of the point's namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<ContainerJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    segment: Option<&'a RawValue>,
    mark: MarkChange,
    #[serde(skip_serializing_if = "Option::is_none")]
    ct_mark: Option<CtMark>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tuple: Option<Tuple>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drop_reason: Option<&'a DropReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attribution: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<RouteLookup>,
    #[serde(skip_serializing_if = "Option::is_none")]
    socket_mark: Option<Mark>,
    /// What an encapsulation step did to the mark.
    #[serde(skip_serializing_if = "Option::is_none")]
    mark_fate: Option<MarkFate>,
    #[serde(skip_serializing_if = "Option::is_none")]
    decrypted_by: Option<&'a XfrmRef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    interval: Option<Interval>,
}

impl EventWriter {
    /// Names owners by `registry` from now on (the attributor's).
    pub(crate) fn set_registry(&mut self, registry: &Arc<Registry>) {
        self.registry = registry.clone();
        self.attributions = Cache::default();
    }

    pub(crate) fn write(&mut self, ev: &TraceEvent, out: &mut Vec<u8>) -> serde_json::Result<()> {
        let Self {
            points,
            segments,
            attributions,
            registry,
        } = self;
        let json = EventJson {
            time: ev.time,
            ts_ns: ev.ts_ns,
            packet_id: ev.packet_id,
            kind: ev.kind,
            at: points.get(&ev.at, raw),
            pod: ev.at.pod.as_deref().map(ContainerJson),
            segment: ev
                .segment
                .as_ref()
                .map(|s| segments.get(s, |s| raw(&SegmentJson(s)))),
            mark: ev.mark,
            ct_mark: ev.ct_mark,
            tuple: ev.tuple,
            drop_reason: ev.drop_reason.as_ref(),
            attribution: ev
                .attribution
                .as_ref()
                .map(|a| attributions.get(a, |a| raw(&AttributionJson(a, registry)))),
            route: ev.route,
            socket_mark: ev.socket_mark,
            mark_fate: ev
                .segment
                .as_ref()
                .and_then(|s| s.tunnel())
                .map(|t| t.fate(ev.mark.old.0, ev.mark.new.0)),
            decrypted_by: ev.decrypted_by.as_ref(),
            count: ev.count,
            interval: ev.interval,
        };
        serde_json::to_writer(out, &json)
    }
}

/// A segment with its description and the names of what is in it.
pub(crate) struct SegmentJson<'a>(pub(crate) &'a Segment);

impl Serialize for SegmentJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Json<'a> {
            layer: Layer,
            description: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            hook: Option<Hook>,
            #[serde(skip_serializing_if = "Option::is_none")]
            family: Option<Family>,
            #[serde(skip_serializing_if = "Option::is_none")]
            priority_range: Option<[i32; 2]>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            chains: Vec<String>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            mark_writers: Vec<String>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            programs: Vec<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            tunnel: Option<TunnelJson<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            ovs: Option<OvsJson<'a>>,
            from: &'a PointInfo,
        }
        let seg = self.0;
        Json {
            layer: seg.layer(),
            description: seg.to_string(),
            hook: seg.hook(),
            family: seg.band().and_then(|b| b.family),
            priority_range: seg.band().and_then(|b| b.range),
            chains: seg.chains().iter().map(ToString::to_string).collect(),
            mark_writers: seg.mark_writers().iter().map(ToString::to_string).collect(),
            programs: seg.programs().iter().map(ToString::to_string).collect(),
            tunnel: seg.tunnel().map(TunnelJson),
            ovs: seg.ovs().map(|p| OvsJson {
                bridge: &p.bridge,
                in_port: &p.in_port,
                out_port: &p.out_port,
                flows: &p.mark_writers,
            }),
            from: &seg.from,
        }
        .serialize(s)
    }
}

/// A way through an Open vSwitch bridge.
#[derive(Serialize)]
struct OvsJson<'a> {
    bridge: &'a str,
    in_port: &'a str,
    out_port: &'a str,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    flows: &'a [String],
}

/// An encapsulation step: its direction, the device or xfrm state, the namespaces.
struct TunnelJson<'a>(&'a Tunnel);

impl Serialize for TunnelJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Device<'a> {
            ifindex: u32,
            netns: u32,
            #[serde(skip_serializing_if = "Option::is_none")]
            ifname: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            kind: Option<&'a TunnelKind>,
        }
        #[derive(Serialize)]
        struct Json<'a> {
            direction: TunnelDir,
            #[serde(skip_serializing_if = "Option::is_none")]
            device: Option<Device<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            xfrm_spi: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            xfrm_state: Option<&'a crate::nodestate::netlink::XfrmState>,
            #[serde(skip_serializing_if = "Option::is_none")]
            crossed_netns: Option<[u32; 2]>,
        }
        let t = self.0;
        let (device, xfrm_spi, xfrm_state) = match &t.by {
            Encapsulator::Device {
                ifindex,
                netns,
                name,
                kind,
            } => (
                Some(Device {
                    ifindex: *ifindex,
                    netns: *netns,
                    ifname: name.as_deref(),
                    kind: kind.as_ref(),
                }),
                None,
                None,
            ),
            Encapsulator::Xfrm { spi, state } => {
                (None, spi.map(|s| format!("{s:#x}")), state.as_ref())
            }
        };
        Json {
            direction: t.dir,
            device,
            xfrm_spi,
            xfrm_state,
            crossed_netns: t.crossed.map(|(a, b)| [a, b]),
        }
        .serialize(s)
    }
}

/// An attribution with its owners named by the registry and its warnings' messages.
pub(crate) struct AttributionJson<'a>(pub(crate) &'a Attribution, pub(crate) &'a Registry);

impl Serialize for AttributionJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Json<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            writer: Option<String>,
            owners: Vec<OwnerJson<'a>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            unowned_bits: Option<Mark>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            recognized: Vec<RecognizedJson<'a>>,
            #[serde(skip_serializing_if = "Vec::is_empty")]
            warnings: Vec<WarningJson<'a>>,
        }
        let (a, reg) = (self.0, self.1);
        Json {
            writer: a.writer.map(|w| reg.owner(w).id()),
            owners: a.owners.iter().map(|o| OwnerJson(o, reg)).collect(),
            unowned_bits: a.unowned_bits,
            recognized: a
                .recognized
                .iter()
                .map(|r| RecognizedJson {
                    owner: reg.owner(r.owner).id(),
                    value: r.value,
                    meaning: &r.meaning,
                    side: r.side,
                })
                .collect(),
            warnings: a.warnings.iter().map(|w| WarningJson(w, reg)).collect(),
        }
        .serialize(s)
    }
}

/// A whole-mark value recognised, its owner named.
#[derive(Serialize)]
struct RecognizedJson<'a> {
    owner: String,
    value: Mark,
    meaning: &'a str,
    side: crate::event::attribution::Side,
}

struct OwnerJson<'a>(&'a OwnerChange, &'a Registry);

impl Serialize for OwnerJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let o = self.0;
        let value = |v: FieldValue| match v {
            FieldValue::Bits(m) => m.to_string(),
            FieldValue::Number(n) => n.to_string(),
        };
        let mut st = s.serialize_struct("OwnerChange", 6)?;
        st.serialize_field("owner", &self.1.owner(o.owner).id())?;
        st.serialize_field("bits", &o.bits)?;
        match &o.field {
            Some(FieldRef::Named(name)) => st.serialize_field("field", name)?,
            Some(FieldRef::Conntrack) => st.serialize_field("field", "ct")?,
            None => st.skip_field("field")?,
        }
        st.serialize_field("old_value", &value(o.old_value))?;
        st.serialize_field("new_value", &value(o.new_value))?;
        match &o.meaning {
            Some(m) => st.serialize_field("meaning", m)?,
            None => st.skip_field("meaning")?,
        }
        st.end()
    }
}

pub(crate) struct WarningJson<'a>(pub(crate) &'a Warning, pub(crate) &'a Registry);

impl Serialize for WarningJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (w, reg) = (self.0, self.1);
        let owners: Vec<&str> = w.owners.iter().map(|n| reg.name(*n)).collect();
        let mut st = s.serialize_struct("Warning", 3)?;
        st.serialize_field("kind", &w.kind())?;
        st.serialize_field("message", &FindingText(&w.finding, reg).to_string())?;
        st.serialize_field("owners", &owners)?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode::Decoder, fixtures};

    #[test]
    fn shared_parts_are_rendered_as_the_value_would_be() {
        let mut d = Decoder::new(fixtures::topology(), Default::default());
        let ev = d.decode(&fixtures::synthetic(1));
        let mut w = EventWriter::default();
        let (mut first, mut again) = (Vec::new(), Vec::new());
        w.write(&ev, &mut first).unwrap();
        w.write(&ev, &mut again).unwrap();
        assert_eq!(first, again, "the cached JSON is the same JSON");
        let v: serde_json::Value = serde_json::from_slice(&first).unwrap();
        let seg = ev.segment.as_deref().unwrap();
        assert_eq!(
            v["segment"],
            serde_json::to_value(SegmentJson(seg)).unwrap()
        );
        assert_eq!(v["segment"]["description"], seg.to_string());
        assert_eq!(v["at"], serde_json::to_value(&*ev.at).unwrap());
        assert_eq!(v["mark"]["new"], "0x80000");
        assert!(v.get("pod").is_none(), "no pod where none lives");
    }

    #[test]
    fn events_name_the_pod_of_their_namespace() {
        use crate::nodestate::pods::{Container, PodName};
        let mut topo = fixtures::topology();
        let pod = Container {
            pod: Some(PodName {
                namespace: "shop".into(),
                name: "web".into(),
            }),
            name: Some("nginx".into()),
            id: "abc".into(),
        };
        topo.pods.insert(1, Arc::new(pod));
        let mut d = Decoder::new(topo, Default::default());
        let ev = d.decode(&fixtures::synthetic(1));
        let mut out = Vec::new();
        EventWriter::default().write(&ev, &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v["pod"],
            serde_json::json!({"namespace": "shop", "name": "web", "container": "nginx", "id": "abc"})
        );
        let errors: Vec<String> = crate::output::tests::schema()
            .iter_errors(&v)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{v}\n{errors:#?}");
        let reg = Registry::default();
        assert!(super::super::human::line(&ev, &reg).contains(" pod shop/web"));
    }
}
