//! `--metrics ADDR`: the run's counters (the same ones the end-of-run summary shows) for a
//! node's monitoring to scrape: encoded by `prometheus-client` (OpenMetrics text) and served
//! by a small axum endpoint. Each scrape asks the trace loop, which owns the counters, for a
//! fresh rendering (`Scrapes`), so nothing is shared behind a lock.
use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result};
use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore},
};

use super::summary::Summary;

/// Values read from the kernel side at scrape time.
pub(crate) struct Gauges {
    pub(crate) tracked_packets: usize,
    pub(crate) interfaces: usize,
    pub(crate) rss_kb: u64,
}

/// Binds before the daemon enters a traced namespace, so the endpoint lives in the node's own
/// namespace; a bad or busy address fails before anything is attached.
pub(crate) fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--metrics {addr}: cannot listen"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OwnerLabel {
    owner: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabel {
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WarningLabels {
    kind: String,
    owners: String,
}

/// A counter family with these samples.
fn counters<L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync>(
    samples: impl IntoIterator<Item = (L, u64)>,
) -> Family<L, Counter> {
    let family = Family::<L, Counter>::default();
    for (labels, n) in samples {
        family.get_or_create(&labels).inc_by(n);
    }
    family
}

fn gauge(v: u64) -> Gauge {
    let g = Gauge::default();
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
    g
}

/// The counters and gauges in the OpenMetrics text format.
pub(crate) fn render(s: &Summary, g: &Gauges) -> String {
    let mut reg = Registry::with_prefix("fwmark_trace");
    reg.register(
        "events",
        "Events reported, by kind",
        counters(s.events.iter().map(|(k, n)| {
            let kind = k.to_string();
            (KindLabel { kind }, *n)
        })),
    );
    reg.register(
        "drops",
        "Packet drops reported, by the kernel's drop reason",
        counters(s.drops.iter().map(|(r, n)| {
            let reason = r.to_string();
            (ReasonLabel { reason }, *n)
        })),
    );
    reg.register(
        "owner_transitions",
        "Mark transitions that changed bits of this registered owner",
        counters(
            s.owners()
                .into_iter()
                .map(|(owner, n)| (OwnerLabel { owner }, n)),
        ),
    );
    reg.register(
        "warnings",
        "Clobber and conflict warnings, by kind and owners involved",
        counters(s.warnings().into_iter().map(|(kind, owners, n)| {
            let kind = kind.to_string();
            (WarningLabels { kind, owners }, n)
        })),
    );
    if let Some(by_pod) = &s.by_pod {
        reg.register(
            "pod_transitions",
            "Mark transitions in a pod's (or container's) network namespace",
            counters(by_pod.iter().map(|(p, n)| {
                let pod = p.clone();
                (PodLabel { pod }, *n)
            })),
        );
    }
    let lost = Counter::<u64>::default();
    lost.inc_by(s.lost);
    reg.register(
        "lost_events",
        "Events lost: the ring buffer or the counting map was full, counts were evicted unread, or the output's reader stalled",
        lost,
    );
    reg.register(
        "tracked_packets",
        "Packets with state in the kernel's per-packet map",
        gauge(g.tracked_packets as u64),
    );
    reg.register(
        "interfaces",
        "Interfaces with tc observers attached",
        gauge(g.interfaces as u64),
    );
    reg.register(
        "resident_memory_bytes",
        "Resident memory of the daemon",
        gauge(g.rss_kb * 1024),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &reg);
    out
}

/// A scrape waiting for its rendering.
pub(crate) type Scrape = oneshot::Sender<String>;

/// Connections served at once: more wait in the kernel's backlog, so scrapers cannot take the
/// daemon's descriptors.
const MAX_CONNECTIONS: usize = 8;
/// A connection with nothing read or written for this long is closed.
const IDLE: Duration = Duration::from_secs(10);

/// The endpoint's listener: accepts a connection only while fewer than `MAX_CONNECTIONS` are
/// open, and gives each an idle timeout.
struct Capped {
    listener: tokio::net::TcpListener,
    slots: Arc<Semaphore>,
}

impl axum::serve::Listener for Capped {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        loop {
            let Ok(permit) = self.slots.clone().acquire_owned().await else {
                // Never closed: nothing more would be accepted.
                return std::future::pending().await;
            };
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    let idle = Box::pin(tokio::time::sleep(IDLE));
                    return (
                        Conn {
                            stream,
                            idle,
                            _permit: permit,
                        },
                        addr,
                    );
                }
                // Out of descriptors and the like: wait a little rather than spin.
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An accepted connection: its slot is given back when it closes; it times out when idle.
struct Conn {
    stream: tokio::net::TcpStream,
    idle: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    /// Fails once idle too long; otherwise starts the idle time again when `progress`.
    fn idle(&mut self, cx: &mut Context<'_>, progress: bool) -> std::io::Result<()> {
        if progress {
            self.idle.as_mut().reset(tokio::time::Instant::now() + IDLE);
        } else if self.idle.as_mut().poll(cx).is_ready() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        Ok(())
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        self.idle(cx, r.is_ready())?;
        r
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.idle(cx, r.is_ready())?;
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Serves `GET /metrics` on `listener` (inside the running tokio runtime); each request
/// arrives on the returned channel for the trace loop to answer with `render`.
pub(crate) fn serve(listener: std::net::TcpListener) -> Result<mpsc::Receiver<Scrape>> {
    let (tx, rx) = mpsc::channel::<Scrape>(16);
    let listener = Capped {
        listener: tokio::net::TcpListener::from_std(listener)?,
        slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
    };
    let app = Router::new().route("/metrics", get(scrape)).with_state(tx);
    tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            log::warn!("metrics endpoint stopped: {err}");
        }
    });
    Ok(rx)
}

async fn scrape(State(tx): State<mpsc::Sender<Scrape>>) -> impl IntoResponse {
    let (reply, rendered) = oneshot::channel();
    let body = match tx.send(reply).await {
        Ok(()) => rendered.await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

/// The next scrape, or never when there is no endpoint.
pub(crate) async fn next(rx: Option<&mut mpsc::Receiver<Scrape>>) -> Option<Scrape> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        attribution::{Attribution, FieldValue, Finding, OwnerChange, Totals, Warning},
        event::{DropReason, EventKind},
        mark::Mark,
        registry::{file::parse_owner_flag, Registry},
    };

    #[test]
    fn renders_counters_with_escaped_labels() {
        // An owner whose name needs escaping in a label.
        let mut reg = Registry::builtin().unwrap();
        let mut odd = parse_owner_flag("odd=0x1").unwrap();
        odd.name = "tai\"scale".into();
        reg.merge(vec![odd]);
        let (kube, calico, odd) = (
            reg.find("kube-proxy@legacy-kubelet<1.28").unwrap(),
            reg.find("calico").unwrap(),
            reg.find("tai\"scale").unwrap(),
        );
        let bits = FieldValue::Bits(Mark(0));
        let changed = Attribution {
            owners: vec![OwnerChange {
                owner: kube,
                bits: Mark(0x8000),
                field: None,
                old_value: bits,
                new_value: bits,
                meaning: None,
            }],
            ..Default::default()
        };
        let clobbered = Attribution {
            warnings: vec![Warning {
                finding: Finding::Clobber {
                    writer: calico,
                    cleared: true,
                    bits: Mark(1),
                    victim: odd,
                    meanings: vec![],
                },
                owners: vec![reg.name_of(calico), reg.name_of(odd)],
            }],
            ..Default::default()
        };
        let mut attribution = Totals::new(reg.into());
        attribution.add(&changed, 3);
        attribution.add(&clobbered, 1);
        let s = Summary {
            events: BTreeMap::from([(EventKind::Transition, 3)]),
            drops: BTreeMap::from([(DropReason::NetfilterDrop, 2)]),
            attribution,
            lost: 5,
            by_pod: Some(BTreeMap::from([("shop/web".into(), 4)])),
            ..Default::default()
        };
        let text = render(
            &s,
            &Gauges {
                tracked_packets: 7,
                interfaces: 2,
                rss_kb: 10,
            },
        );
        for line in [
            "# TYPE fwmark_trace_events counter",
            "fwmark_trace_events_total{kind=\"transition\"} 3",
            "fwmark_trace_drops_total{reason=\"NETFILTER_DROP\"} 2",
            "fwmark_trace_owner_transitions_total{owner=\"kube-proxy@legacy-kubelet<1.28\"} 3",
            "fwmark_trace_warnings_total{kind=\"clobber\",owners=\"calico × tai\\\"scale\"} 1",
            "fwmark_trace_pod_transitions_total{pod=\"shop/web\"} 4",
            "fwmark_trace_lost_events_total 5",
            "fwmark_trace_tracked_packets 7",
            "fwmark_trace_resident_memory_bytes 10240",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
