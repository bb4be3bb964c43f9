//! One simulated client, and the state all of them share.
//!
//! Owns [`Client`]: its loop (heartbeats at the interval the server gives, divided by
//! `time_scale`; in push mode a held stream, see `stream`; a download round whenever a
//! heartbeat names a revision it lacks, see `download`), its events (made once it has its
//! downloads, uploaded as the critical-event rule in `wire` says), and when it counts as done.
//! What every client task shares is in `shared`. A client behaves as the contract says
//! a client does and speaks only the public HTTP API of the target: it must never send to any
//! URL but one under the target it was given (through [`Shared::url`]), and every one of its
//! loops ends by the run deadline or a bounded count.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::{sleep_until, Instant};

use super::download::{download_job, JobOutcome};
use super::shared::{backoff, Shared, REQUEST_TIMEOUT};
use super::stats::{lock, net_kind, status_kind, Learned, Stats};
use super::stream::stream_task;
use super::wire::{
    critical_at_once, is_critical, slot_delay, EventOut, EventsBody, HeartbeatBody, HeartbeatReply,
};
use super::Mode;

/// Heartbeats never come faster than this, whatever the time scale.
pub(super) const MIN_HEARTBEAT: Duration = Duration::from_millis(200);
/// Rounds (one per heartbeat that finds the client behind) in which a client tries a blob.
pub(super) const MAX_ITEM_ROUNDS: u32 = 3;
/// Uploads of held events before a client drops them.
const MAX_EVENT_ATTEMPTS: u32 = 3;

/// A spawned task that is cancelled when its owner is dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn wait_job<T>(job: &mut Option<AbortOnDrop<T>>) -> Result<T, JoinError> {
    match job {
        Some(j) => (&mut j.0).await,
        None => std::future::pending().await,
    }
}

enum Posted {
    Sent,
    Dropped,
    Retry,
}

pub(super) struct Client {
    sh: Arc<Shared>,
    idx: usize,
    id: String,
    policy_serial: u64,
    /// The revision whose every item this client has (or gave up on).
    catalog_rev: u64,
    /// The newest revision heard of (heartbeat or push).
    known_rev: u64,
    /// Digests downloaded, or given up after `MAX_ITEM_ROUNDS`.
    done: HashSet<String>,
    rounds: HashMap<String, u32>,
    interval: Duration,
    critical_at_once: bool,
    events_made: bool,
    pending: Vec<EventOut>,
    event_attempts: u32,
}

impl Client {
    pub(super) fn new(sh: Arc<Shared>, idx: usize, id: String) -> Client {
        Client {
            sh,
            idx,
            id,
            policy_serial: 0,
            catalog_rev: 0,
            known_rev: 0,
            done: HashSet::new(),
            rounds: HashMap::new(),
            interval: MIN_HEARTBEAT,
            critical_at_once: false,
            events_made: false,
            pending: Vec::new(),
            event_attempts: 0,
        }
    }

    /// Heartbeats, stream, downloads and events until the deadline (or until aborted).
    pub(super) async fn run(mut self, start_delay: Duration) {
        let sh = self.sh.clone();
        if !sh.nap_until(Instant::now() + start_delay).await {
            return;
        }
        let (tx, mut rx) = watch::channel(0u64);
        let mut tx = Some(tx);
        let mut stream: Option<AbortOnDrop<()>> = None;
        let mut push_live = sh.mode == Mode::Push;
        let mut job: Option<AbortOnDrop<JobOutcome>> = None;
        let mut next_hb = Instant::now();
        let mut hb_failures = 0u32;
        loop {
            tokio::select! {
                _ = sleep_until(sh.deadline) => break,
                _ = sleep_until(next_hb) => {
                    match self.heartbeat().await {
                        Some(reply) => {
                            hb_failures = 0;
                            next_hb = Instant::now() + self.interval;
                            // Held events go right after the heartbeat.
                            self.flush_events().await;
                            if sh.mode == Mode::Push && stream.is_none() {
                                if let Some(tx) = tx.take() {
                                    let task = stream_task(sh.clone(), self.id.clone(), tx);
                                    stream = Some(AbortOnDrop(tokio::spawn(task)));
                                }
                            }
                            if job.is_none() {
                                job = self.start_job(&reply);
                            }
                            if job.is_none() {
                                self.make_events().await;
                            }
                        }
                        None => {
                            hb_failures += 1;
                            next_hb = Instant::now() + backoff(hb_failures);
                        }
                    }
                }
                changed = rx.changed(), if push_live => {
                    match changed {
                        Ok(()) => {
                            let rev = *rx.borrow_and_update();
                            if rev > self.known_rev.max(self.catalog_rev) {
                                self.known_rev = rev;
                                next_hb = Instant::now();
                            }
                        }
                        Err(_) => push_live = false,
                    }
                }
                out = wait_job(&mut job) => {
                    job = None;
                    match out {
                        Ok(out) => {
                            if self.finish_job(out) {
                                next_hb = Instant::now();
                            }
                            self.make_events().await;
                        }
                        Err(e) if e.is_cancelled() => {}
                        Err(_) => sh.stats.error("internal"),
                    }
                }
            }
            let settled = self.settled(job.is_none());
            sh.stats.settled[self.idx].store(settled, Ordering::Relaxed);
        }
    }

    /// Done: has every item of the newest revision it knows, has uploaded its events.
    fn settled(&self, idle: bool) -> bool {
        idle && self.known_rev > 0
            && self.catalog_rev >= self.known_rev
            && self.events_made
            && self.pending.is_empty()
    }

    /// One heartbeat; `None` when it failed (counted).
    async fn heartbeat(&mut self) -> Option<HeartbeatReply> {
        let sh = self.sh.clone();
        let body = HeartbeatBody {
            client_id: &self.id,
            install_group: sh.group.as_deref(),
            os: &sh.os,
            client_version: &sh.client_version,
            mode: "computer",
            policy_serial: self.policy_serial,
            catalog_revision: self.catalog_rev,
        };
        let t0 = Instant::now();
        let resp = sh
            .http
            .post(sh.url("/v1/heartbeat"))
            .json(&body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                sh.stats.error(net_kind(&e));
                return None;
            }
        };
        sh.stats.latency_since(t0);
        if !resp.status().is_success() {
            sh.stats.error(status_kind("heartbeat", resp.status()));
            return None;
        }
        let reply: HeartbeatReply = match resp.json().await {
            Ok(r) => r,
            Err(e) => {
                sh.stats.error(if e.is_decode() {
                    "heartbeat_json"
                } else {
                    net_kind(&e)
                });
                return None;
            }
        };
        Stats::inc(&sh.stats.heartbeats, 1);
        let secs = reply.next_heartbeat_s.unwrap_or(300.0).max(0.0) / sh.time_scale;
        self.interval = Duration::from_secs_f64(secs.min(86_400.0)).max(MIN_HEARTBEAT);
        sh.stats.max_interval_ms.fetch_max(
            u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.policy_serial = reply.policy_serial;
        let upload_now = reply
            .settings
            .get("upload_critical_events_immediately")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(true);
        self.critical_at_once = critical_at_once(upload_now, &sh.os, &sh.client_version);
        let enabled = reply
            .settings
            .pointer("/randomization/enabled")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(true);
        let window = reply
            .settings
            .pointer("/randomization/window_s")
            .and_then(serde_json::Value::as_u64);
        if let Some(w) = window {
            *lock(&sh.stats.settings_window_s) = Some(if enabled { w } else { 0 });
        }
        self.known_rev = self.known_rev.max(reply.catalog_revision);
        Some(reply)
    }

    /// Starts downloading when the reply names a revision this client does not have.
    fn start_job(&mut self, reply: &HeartbeatReply) -> Option<AbortOnDrop<JobOutcome>> {
        let rev = reply.catalog_revision;
        if rev <= self.catalog_rev {
            return None;
        }
        let now = Instant::now();
        let slot_at = reply.download_slot.as_ref().map(|slot| {
            let mut learned = lock(&self.sh.stats.learned);
            let entry = learned.entry(rev).or_insert(Learned {
                at: now,
                window_s: slot.window_s,
            });
            if now < entry.at {
                entry.at = now;
            }
            if entry.window_s.is_none() {
                entry.window_s = slot.window_s;
            }
            now + slot_delay(slot, chrono::Utc::now())
        });
        let task = download_job(
            self.sh.clone(),
            self.id.clone(),
            rev,
            slot_at,
            self.done.clone(),
        );
        Some(AbortOnDrop(tokio::spawn(task)))
    }

    /// Takes a finished download round in; true when a newer revision waits (heartbeat now).
    fn finish_job(&mut self, out: JobOutcome) -> bool {
        self.done.extend(out.ok);
        let mut retry_later = false;
        for d in out.failed {
            let r = self.rounds.entry(d.clone()).or_insert(0);
            *r += 1;
            if *r >= MAX_ITEM_ROUNDS {
                self.done.insert(d);
            } else {
                retry_later = true;
            }
        }
        let Some(rev) = out.fetched_rev else {
            return false;
        };
        self.known_rev = self.known_rev.max(rev);
        if retry_later {
            return false;
        }
        self.catalog_rev = self.catalog_rev.max(rev);
        self.known_rev > self.catalog_rev
    }

    /// Once, when the client first has nothing left to download: its events. A critical one
    /// goes at once when the rule says so; the rest wait for the next heartbeat.
    async fn make_events(&mut self) {
        if self.events_made || self.catalog_rev < self.known_rev {
            return;
        }
        self.events_made = true;
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut critical = Vec::new();
        for n in 0..self.sh.events_per_client {
            let (kind, subkind) = if n == 0 {
                ("risk", "virus")
            } else {
                ("system_change", "loadtest")
            };
            let ev = EventOut {
                id: format!("{}-{n}", self.id),
                kind,
                subkind,
                time: now.clone(),
                data: serde_json::json!({"loadtest": true, "seq": n}),
            };
            if is_critical(kind, subkind) {
                critical.push(ev);
            } else {
                self.pending.push(ev);
            }
        }
        if critical.is_empty() {
            return;
        }
        if self.critical_at_once {
            if let Posted::Retry = self.post_events(&critical).await {
                self.pending.extend(critical);
            }
        } else {
            self.pending.extend(critical);
        }
    }

    /// Uploads the held events (right after a heartbeat).
    async fn flush_events(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.pending);
        match self.post_events(&events).await {
            Posted::Sent | Posted::Dropped => {}
            Posted::Retry => {
                self.event_attempts += 1;
                if self.event_attempts >= MAX_EVENT_ATTEMPTS {
                    self.sh.stats.error("events_dropped");
                } else {
                    self.pending = events;
                }
            }
        }
    }

    async fn post_events(&self, events: &[EventOut]) -> Posted {
        let sh = &self.sh;
        let body = EventsBody {
            client_id: &self.id,
            events,
        };
        let t0 = Instant::now();
        let resp = sh
            .http
            .post(sh.url("/v1/events"))
            .json(&body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        match resp {
            Err(e) => {
                sh.stats.error(net_kind(&e));
                Posted::Retry
            }
            Ok(r) => {
                sh.stats.latency_since(t0);
                let status = r.status();
                if status == reqwest::StatusCode::ACCEPTED || status.is_success() {
                    Stats::inc(&sh.stats.events_sent, events.len() as u64);
                    Posted::Sent
                } else {
                    sh.stats.error(status_kind("events", status));
                    if status.is_server_error() {
                        Posted::Retry
                    } else {
                        Posted::Dropped
                    }
                }
            }
        }
    }
}
