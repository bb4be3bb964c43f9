//! Push: change notifications as server-sent events on `GET /v1/stream`.
//!
//! Owns the change broadcast of one server (manager or node) and the SSE response (the events
//! themselves are `proto::Change`): the
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
use tokio::sync::broadcast;

use crate::core::proto::Change;
use crate::http::shutdown::Shutdown;

/// How often an idle stream carries a comment line.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn event(change: &Change) -> Event {
    Event::default()
        .event(change.name())
        .data(change.data().to_string())
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
                    return Some((Ok::<Event, Infallible>(event(&c)), st));
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
