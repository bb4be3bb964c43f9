//! Push: change notifications as server-sent events on `GET /v1/stream`.
//!
//! Owns the change broadcast of one server (manager or node) and the SSE response: the
//! current state on connect, then `settings`, `policy` and `catalog` events as they happen,
//! a keep-alive comment every 15 s, and a clean end at shutdown. A subscriber that falls
//! behind gets the current state again rather than a gap. It must never decide what changed:
//! the owners of settings and catalog send their changes here.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::server::Shutdown;

/// How often an idle stream carries a comment line.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// One change, as an event name and its JSON data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Change {
    Settings { group: String, serial: u64 },
    Policy { group: String, serial: u64 },
    Catalog { revision: u64 },
}

impl Change {
    fn event(&self) -> Event {
        let (name, data) = match self {
            Change::Settings { group, serial } => (
                "settings",
                serde_json::json!({"group": group, "serial": serial}),
            ),
            Change::Policy { group, serial } => (
                "policy",
                serde_json::json!({"group": group, "serial": serial}),
            ),
            Change::Catalog { revision } => ("catalog", serde_json::json!({"revision": revision})),
        };
        Event::default().event(name).data(data.to_string())
    }

    /// The group a settings or policy change is about.
    pub fn group(&self) -> Option<&str> {
        match self {
            Change::Settings { group, .. } | Change::Policy { group, .. } => Some(group),
            Change::Catalog { .. } => None,
        }
    }
}

/// The change broadcast of one server.
pub struct Changes {
    tx: broadcast::Sender<Change>,
    /// Open push connections (`gup_stream_clients`).
    gauge: Gauge,
}

impl Changes {
    pub fn new(gauge: Gauge) -> Changes {
        let (tx, _) = broadcast::channel(4096);
        Changes { tx, gauge }
    }

    /// Tells every subscriber.
    pub fn send(&self, change: Change) {
        let _ = self.tx.send(change);
    }

    pub fn send_all(&self, changes: impl IntoIterator<Item = Change>) {
        for c in changes {
            self.send(c);
        }
    }

    /// An SSE response: `current()` on connect (and again after lagging), then the changes
    /// that pass `filter`, until shutdown.
    pub fn respond<F, C>(&self, current: C, filter: F, shutdown: Shutdown) -> Response
    where
        F: Fn(&Change) -> bool + Send + 'static,
        C: Fn() -> Vec<Change> + Send + 'static,
    {
        let rx = self.tx.subscribe();
        let guard = GaugeGuard::new(self.gauge.clone());
        let state = State {
            rx,
            queue: current().into(),
            filter,
            current,
            _guard: guard,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(c) = st.queue.pop_front() {
                    return Some((Ok::<Event, Infallible>(c.event()), st));
                }
                match st.rx.recv().await {
                    Ok(c) => {
                        if (st.filter)(&c) {
                            st.queue.push_back(c);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        st.queue.extend((st.current)());
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .take_until(shutdown.wait());
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
            .into_response()
    }
}

struct State<F, C> {
    rx: broadcast::Receiver<Change>,
    queue: VecDeque<Change>,
    filter: F,
    current: C,
    _guard: GaugeGuard,
}

/// Counts an open stream for as long as it lives.
struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(g: Gauge) -> GaugeGuard {
        g.inc();
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Parses SSE text incrementally: feed bytes, get back the event names seen.
#[derive(Default)]
pub struct EventParser {
    buf: Vec<u8>,
    name: Option<String>,
    data: String,
}

impl EventParser {
    /// Returns every complete event (name, data) in what has arrived so far.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if self.name.is_some() || !self.data.is_empty() {
                    let name = self.name.take().unwrap_or_else(|| "message".into());
                    out.push((name, std::mem::take(&mut self.data)));
                }
            } else if let Some(v) = line.strip_prefix("event:") {
                self.name = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(v.trim_start());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parser_splits_events_and_ignores_comments() {
        let mut p = EventParser::default();
        assert!(p.feed(b": keep-alive\n\nevent: cata").is_empty());
        let got = p.feed(b"log\ndata: {\"revision\":3}\n\nevent: settings\ndata: {}\n\n");
        assert_eq!(
            got,
            vec![
                ("catalog".to_string(), "{\"revision\":3}".to_string()),
                ("settings".to_string(), "{}".to_string())
            ]
        );
    }
}
