//! Push: change notifications as server-sent events on `GET /v1/stream`.
//!
//! Owns the change broadcast of one server (manager or node) and the SSE response (the events
//! themselves are `proto::Change`): the current state on connect, then `settings`, `policy`
//! and `catalog` events as they happen, a keep-alive comment every 15 s, and an end at
//! shutdown or when the stream reaches its age (`limits.stream_max_age_s`, each stream within
//! 10% of it, so that the reconnects spread; a reload changes the age of streams started
//! after it, never of those open). A subscriber that falls behind gets the current state again
//! rather than a gap. Ages are checked on a tick that one task broadcasts for every stream, so
//! an idle stream holds no timer of its own. It must never decide what
//! changed: the owners of settings and catalog send their changes here.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
// tokio's clock (the system's outside tests): paused-time tests can age a stream.
use tokio::time::Instant;

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

/// What the broadcast carries: a change for clients, or the tick streams check their age on.
#[derive(Clone)]
enum Message {
    Change(Change),
    Tick,
}

/// The change broadcast of one server.
pub struct Changes {
    tx: broadcast::Sender<Message>,
    /// Open push connections (`gup_stream_clients`).
    gauge: Gauge,
    /// How long a stream started now lives (each within 10% of it), in milliseconds; shared
    /// with the ticker, whose period follows it.
    max_age_ms: Arc<AtomicU64>,
    /// Started with the first stream: the task that broadcasts [`Message::Tick`].
    ticker: OnceLock<()>,
}

impl Changes {
    pub fn new(gauge: Gauge, max_age: Duration) -> Changes {
        let (tx, _) = broadcast::channel(4096);
        Changes {
            tx,
            gauge,
            max_age_ms: Arc::new(AtomicU64::new(millis(max_age))),
            ticker: OnceLock::new(),
        }
    }

    /// Streams started from now on live about `max_age`; those open keep the age they
    /// started with.
    pub fn set_max_age(&self, max_age: Duration) {
        self.max_age_ms.store(millis(max_age), Ordering::Relaxed);
    }

    /// How long a stream started now lives.
    pub fn max_age(&self) -> Duration {
        Duration::from_millis(self.max_age_ms.load(Ordering::Relaxed))
    }

    /// Tells every subscriber.
    pub fn send(&self, change: Change) {
        let _ = self.tx.send(Message::Change(change));
    }

    pub fn send_all(&self, changes: impl IntoIterator<Item = Change>) {
        for c in changes {
            self.send(c);
        }
    }

    /// Ticks a few times per `max_age` as it is at each tick (at least every minute), while
    /// any stream listens.
    fn start_ticker(&self) {
        self.ticker.get_or_init(|| {
            let tx = self.tx.clone();
            let max_age_ms = self.max_age_ms.clone();
            tokio::spawn(async move {
                loop {
                    let max_age = Duration::from_millis(max_age_ms.load(Ordering::Relaxed));
                    let every = (max_age / 8)
                        .min(Duration::from_secs(60))
                        .max(Duration::from_millis(10));
                    tokio::time::sleep(every).await;
                    let _ = tx.send(Message::Tick);
                }
            });
        });
    }

    /// An SSE response: `current()` on connect (and again after lagging), then the changes
    /// that pass `filter`, until shutdown or the stream's age; `hold` lives as long as the
    /// stream (a per-address place, say).
    pub fn respond<F, C, H>(&self, current: C, filter: F, shutdown: Shutdown, hold: H) -> Response
    where
        F: Fn(&Change) -> bool + Send + 'static,
        C: Fn() -> Vec<Change> + Send + 'static,
        H: Send + 'static,
    {
        self.start_ticker();
        let rx = self.tx.subscribe();
        let guard = GaugeGuard::new(self.gauge.clone());
        let end = Instant::now() + self.max_age().mul_f64(rand::random_range(0.9..1.1));
        let state = State {
            rx,
            queue: current().into(),
            filter,
            current,
            end,
            _guard: guard,
            _hold: hold,
        };
        let stream = futures_util::stream::unfold(state, |mut st| async move {
            loop {
                if let Some(c) = st.queue.pop_front() {
                    return Some((Ok::<Event, Infallible>(event(&c)), st));
                }
                match st.rx.recv().await {
                    Ok(Message::Change(c)) => {
                        if (st.filter)(&c) {
                            st.queue.push_back(c);
                        }
                    }
                    Ok(Message::Tick) => {
                        if Instant::now() >= st.end {
                            // Its age: the client reconnects, and long-lived streams cannot
                            // pile up for ever.
                            return None;
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

/// `d` in whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct State<F, C, H> {
    rx: broadcast::Receiver<Message>,
    queue: VecDeque<Change>,
    filter: F,
    current: C,
    /// When this stream reaches its age.
    end: Instant,
    _guard: GaugeGuard,
    _hold: H,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A lowered `stream_max_age_s` (a reload) ends the streams started after it at the new
    /// age, and leaves the age of a stream already open alone.
    #[tokio::test(start_paused = true)]
    async fn a_new_max_age_ends_streams_started_after_it_and_not_those_open() {
        let (_trigger, shutdown) = crate::http::shutdown::shutdown_pair();
        let changes = Changes::new(Gauge::default(), Duration::from_secs(3600));
        let open = changes.respond(Vec::new, |_: &Change| true, shutdown.clone(), ());
        changes.set_max_age(Duration::from_secs(60));
        assert_eq!(changes.max_age(), Duration::from_secs(60));
        let started = Instant::now();
        let new = changes.respond(Vec::new, |_: &Change| true, shutdown.clone(), ());
        let open = tokio::spawn(axum::body::to_bytes(open.into_body(), usize::MAX));
        axum::body::to_bytes(new.into_body(), usize::MAX)
            .await
            .unwrap();
        let lived = started.elapsed();
        // Within 10% of 60 s, checked on a tick of at most a minute, then an eighth of it.
        assert!(
            lived >= Duration::from_secs(54) && lived <= Duration::from_secs(68),
            "{lived:?}"
        );
        assert!(!open.is_finished(), "the open stream keeps its hour");
        open.abort();
    }
}
