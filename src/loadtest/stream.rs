//! A push-mode client's held `/v1/stream`: reconnected with a jittered backoff until the
//! deadline, and the newest catalog revision announced on it passed on to the client.
//!
//! Owns `stream_task` only. It asks nothing but the target's public `GET /v1/stream`
//! (through [`Shared::url`]), reads it with the load tester's own SSE parser (`wire`, never
//! the crate's), never reconnects past the run deadline, and drops a stream that stays silent
//! for longer than `STREAM_IDLE`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{timeout, Instant};

use super::shared::{backoff, Shared, REQUEST_TIMEOUT};
use super::stats::{net_kind, status_kind, Stats};
use super::wire::{CatalogEvent, SseParser};

/// A push stream with no byte (not even a keep-alive comment) for this long is reconnected.
const STREAM_IDLE: Duration = Duration::from_secs(90);

/// Holds `/v1/stream` until the deadline, reconnecting with a jittered backoff, and passes
/// on the newest catalog revision announced.
pub(super) async fn stream_task(sh: Arc<Shared>, id: String, tx: watch::Sender<u64>) {
    let url = sh.url("/v1/stream");
    let mut failures = 0u32;
    while Instant::now() < sh.deadline {
        let sent = timeout(
            REQUEST_TIMEOUT,
            sh.stream_http
                .get(&url)
                .query(&[("client_id", id.as_str())])
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .send(),
        )
        .await;
        match sent {
            Ok(Ok(mut resp)) if resp.status().is_success() => {
                Stats::inc(&sh.stats.stream_connects, 1);
                failures = 0;
                let mut parser = SseParser::default();
                loop {
                    match timeout(STREAM_IDLE, resp.chunk()).await {
                        Ok(Ok(Some(bytes))) => {
                            for (name, data) in parser.feed(&bytes) {
                                if name != "catalog" {
                                    continue;
                                }
                                if let Ok(ev) = serde_json::from_str::<CatalogEvent>(&data) {
                                    let newer = tx.send_if_modified(|cur| {
                                        let newer = ev.revision > *cur;
                                        if newer {
                                            *cur = ev.revision;
                                        }
                                        newer
                                    });
                                    if newer {
                                        sh.stats.heard(ev.revision);
                                    }
                                }
                            }
                        }
                        Ok(Ok(None)) => {
                            sh.stats.error("stream_closed");
                            break;
                        }
                        Ok(Err(_)) => {
                            sh.stats.error("stream_dropped");
                            break;
                        }
                        Err(_) => {
                            sh.stats.error("stream_idle");
                            break;
                        }
                    }
                }
            }
            Ok(Ok(resp)) => {
                sh.stats.error(status_kind("stream", resp.status()));
                failures += 1;
            }
            Ok(Err(e)) => {
                sh.stats.error(format!("stream_{}", net_kind(&e)));
                failures += 1;
            }
            Err(_) => {
                sh.stats.error("stream_timeout");
                failures += 1;
            }
        }
        if !sh.nap_until(Instant::now() + backoff(failures)).await {
            return;
        }
    }
}
