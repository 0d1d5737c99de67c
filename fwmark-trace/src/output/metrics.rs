//! `--metrics ADDR`: the run's counters (the same ones the end-of-run summary shows) served
//! over HTTP in the Prometheus text format, for a node's monitoring to scrape.
use std::{fmt::Write, net::SocketAddr, time::Duration};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use super::summary::Summary;

/// Values read from the kernel side at scrape time.
pub struct Gauges {
    pub tracked_packets: usize,
    pub interfaces: usize,
    pub rss_kb: u64,
}

/// Binds before the daemon enters a traced namespace, so the endpoint lives in the node's own
/// namespace; a bad or busy address fails before anything is attached.
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)
        .with_context(|| format!("--metrics {addr}: cannot listen"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Label values escaped as the text format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

pub fn render(s: &Summary, g: &Gauges) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "fwmark_trace_events_total",
        "counter",
        "Events reported, by kind.",
        s.events
            .iter()
            .map(|(k, n)| (format!("{{kind=\"{k}\"}}"), *n)),
    );
    family(
        &mut out,
        "fwmark_trace_drops_total",
        "counter",
        "Packet drops reported, by the kernel's drop reason.",
        s.drops
            .iter()
            .map(|(r, n)| (format!("{{reason=\"{}\"}}", label(r)), *n)),
    );
    family(
        &mut out,
        "fwmark_trace_owner_transitions_total",
        "counter",
        "Mark transitions that changed bits of this registered owner.",
        s.owners
            .iter()
            .map(|(o, n)| (format!("{{owner=\"{}\"}}", label(o)), *n)),
    );
    family(
        &mut out,
        "fwmark_trace_warnings_total",
        "counter",
        "Clobber and conflict warnings, by kind and owners involved.",
        s.clobbers.iter().map(|c| {
            let labels = format!("{{kind=\"{}\",owners=\"{}\"}}", c.kind, label(&c.owners));
            (labels, c.count)
        }),
    );
    let one = |v: u64| [(String::new(), v)];
    family(
        &mut out,
        "fwmark_trace_lost_events_total",
        "counter",
        "Events the kernel could not deliver (ring buffer full).",
        one(s.lost),
    );
    family(
        &mut out,
        "fwmark_trace_tracked_packets",
        "gauge",
        "Packets with state in the kernel's per-packet map.",
        one(g.tracked_packets as u64),
    );
    family(
        &mut out,
        "fwmark_trace_interfaces",
        "gauge",
        "Interfaces with tc observers attached.",
        one(g.interfaces as u64),
    );
    family(
        &mut out,
        "fwmark_trace_resident_memory_bytes",
        "gauge",
        "Resident memory of the daemon.",
        one(g.rss_kb * 1024),
    );
    out
}

/// Answers one scrape with `body` (already rendered), off the event loop.
pub fn respond(mut conn: TcpStream, body: String) {
    tokio::spawn(async move {
        // Read the request head (whatever the path: there is one page), then answer and close.
        let mut buf = [0u8; 2048];
        let mut head = Vec::new();
        let read = async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .is_err()
        {
            return;
        }
        let reply = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let _ =
            tokio::time::timeout(Duration::from_secs(2), conn.write_all(reply.as_bytes())).await;
        let _ = conn.shutdown().await;
    });
}

/// Accepts the next scrape, or never resolves when there is no endpoint.
pub async fn accept(l: Option<&TcpListener>) -> std::io::Result<TcpStream> {
    match l {
        Some(l) => l.accept().await.map(|(c, _)| c),
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::ClobberCount;

    #[test]
    fn renders_counters_with_escaped_labels() {
        let mut s = Summary::new();
        s.events.insert("transition", 3);
        s.drops.insert("NETFILTER_DROP".into(), 2);
        s.owners.insert("kube-proxy@legacy-kubelet<1.28".into(), 3);
        s.clobbers.push(ClobberCount {
            kind: "clobber",
            owners: "calico × tailscale".into(),
            count: 1,
        });
        s.lost = 5;
        let text = render(
            &s,
            &Gauges {
                tracked_packets: 7,
                interfaces: 2,
                rss_kb: 10,
            },
        );
        for line in [
            "# TYPE fwmark_trace_events_total counter",
            "fwmark_trace_events_total{kind=\"transition\"} 3",
            "fwmark_trace_drops_total{reason=\"NETFILTER_DROP\"} 2",
            "fwmark_trace_owner_transitions_total{owner=\"kube-proxy@legacy-kubelet<1.28\"} 3",
            "fwmark_trace_warnings_total{kind=\"clobber\",owners=\"calico × tailscale\"} 1",
            "fwmark_trace_lost_events_total 5",
            "fwmark_trace_tracked_packets 7",
            "fwmark_trace_resident_memory_bytes 10240",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
