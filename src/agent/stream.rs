//! An agent's push stream: `GET /v1/stream?client_id=ID` held open on the server in use.
//!
//! Owns the connection (its own, never pooled), reading the events (`settings`, `policy`,
//! `catalog`) and passing each on to the agent's loop as a [`Pushed`], reconnecting with
//! backoff when the stream ends, and idleness (no byte, not even the keep-alive comment, for
//! [`IDLE_TIMEOUT`]: the stream is dropped and opened again). It must never act on an event
//! itself: the loop decides (a heartbeat at once), so that push and pull share one path.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::time::timeout;

use super::ctx::{backoff, net_kind, status_kind, Ctx, IDLE_TIMEOUT, REQUEST_TIMEOUT};
use super::wire::{CatalogEvent, SseParser};

/// One event of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    Settings { group: String, serial: u64 },
    Policy { group: String, serial: u64 },
    Catalog { revision: u64 },
}

#[derive(serde::Deserialize)]
struct GroupSerial {
    #[serde(default)]
    group: String,
    #[serde(default)]
    serial: u64,
}

fn parse(name: &str, data: &str) -> Option<Pushed> {
    match name {
        "settings" => {
            let g: GroupSerial = serde_json::from_str(data).ok()?;
            Some(Pushed::Settings {
                group: g.group,
                serial: g.serial,
            })
        }
        "policy" => {
            let g: GroupSerial = serde_json::from_str(data).ok()?;
            Some(Pushed::Policy {
                group: g.group,
                serial: g.serial,
            })
        }
        "catalog" => {
            let c: CatalogEvent = serde_json::from_str(data).ok()?;
            Some(Pushed::Catalog {
                revision: c.revision,
            })
        }
        _ => None,
    }
}

/// Holds the stream on `base` until the agent stops or the task is aborted.
pub async fn hold(ctx: Arc<Ctx>, base: String, tx: mpsc::Sender<Pushed>) {
    let url = format!("{base}/v1/stream");
    let mut failures = 0u32;
    let mut newest = 0u64;
    while !ctx.stop.is_cancelled() {
        let sent = timeout(
            REQUEST_TIMEOUT,
            ctx.signed(ctx.stream_http.get(&url))
                .query(&[("client_id", ctx.client_id.as_str())])
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .send(),
        )
        .await;
        match sent {
            Ok(Ok(mut resp)) if resp.status().is_success() => {
                ctx.obs.stream_connected();
                failures = 0;
                let mut parser = SseParser::default();
                loop {
                    let chunk = tokio::select! {
                        _ = ctx.stop.cancelled() => return,
                        c = timeout(IDLE_TIMEOUT, resp.chunk()) => c,
                    };
                    match chunk {
                        Ok(Ok(Some(bytes))) => {
                            for (name, data) in parser.feed(&bytes) {
                                let Some(ev) = parse(&name, &data) else {
                                    continue;
                                };
                                if let Pushed::Catalog { revision } = ev {
                                    if revision > newest {
                                        newest = revision;
                                        ctx.obs.heard(revision);
                                    }
                                }
                                // A full queue already holds a wake-up for the loop.
                                let _ = tx.try_send(ev);
                            }
                        }
                        Ok(Ok(None)) => {
                            ctx.obs.error("stream_closed");
                            break;
                        }
                        Ok(Err(_)) => {
                            ctx.obs.error("stream_dropped");
                            break;
                        }
                        Err(_) => {
                            ctx.obs.error("stream_idle");
                            break;
                        }
                    }
                }
            }
            Ok(Ok(resp)) => {
                ctx.obs.error(&status_kind("stream", resp.status()));
                failures += 1;
            }
            Ok(Err(e)) => {
                ctx.obs.error(&format!("stream_{}", net_kind(&e)));
                failures += 1;
            }
            Err(_) => {
                ctx.obs.error("stream_timeout");
                failures += 1;
            }
        }
        if !ctx.nap(backoff(failures)).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_events_are_read_and_others_ignored() {
        assert_eq!(
            parse("settings", r#"{"group":"lab","serial":3}"#),
            Some(Pushed::Settings {
                group: "lab".into(),
                serial: 3
            })
        );
        assert_eq!(
            parse("policy", r#"{"group":"lab","serial":9}"#),
            Some(Pushed::Policy {
                group: "lab".into(),
                serial: 9
            })
        );
        assert_eq!(
            parse("catalog", r#"{"revision":4}"#),
            Some(Pushed::Catalog { revision: 4 })
        );
        assert_eq!(parse("other", "{}"), None);
        assert_eq!(parse("catalog", "not json"), None);
    }
}
