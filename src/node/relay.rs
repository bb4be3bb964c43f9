//! The relay: client heartbeats and uploads on their way to the upstream.
//!
//! Owns the heartbeats not yet confirmed by an upstream (the latest per client, for at most
//! `upstream.max_pending_heartbeats` clients, relayed every `upstream.sync_interval_s` in
//! batches of at most [`FORWARD_BATCH`] bytes), the durable outbox of uploads, and
//! forwarding it: the critical lane at once (and again with backoff until accepted) and
//! before each batch of the normal lane, which goes with each relay. An upload travels with
//! the pending heartbeat of its client, so the upstream can place a client first seen here
//! before it files the client's events. A heartbeat batch that an upstream refuses for good
//! (413, 400: the same answer on every retry) is dropped and the batches after it still go,
//! so one bad batch never stops the relay. It must never drop an upload an upstream did not
//! accept.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::outbox::{Lane, Outbox, OutboxError};
use super::Node;
use crate::core::proto::{
    Assignment, HeartbeatBatch, Placed, RelayedHeartbeat, UploadBatch, FORWARD_BATCH,
};
use crate::serve::metrics::Metrics;
use crate::store::Store;

/// Bytes of a batch's JSON besides its items (`{"heartbeats":[],"uploads":[]}`), rounded up.
const ENVELOPE: usize = 64;
/// The first batch after a failure that may pass is at most this large: while no upstream
/// answers, each try costs a small batch, not [`FORWARD_BATCH`] bytes read, encoded and
/// thrown away every interval.
const PROBE_BATCH: usize = 64 << 10;

/// What the relay is bounded by (from the config).
pub struct RelayOptions {
    /// `events.outbox_max_bytes`.
    pub outbox_max_bytes: u64,
    /// `upstream.max_pending_heartbeats`.
    pub max_pending_heartbeats: usize,
}

/// Heartbeats and uploads waiting for an upstream.
pub struct Relay {
    /// Uploads accepted, durable, waiting for an upstream to accept them.
    outbox: Outbox,
    /// Wakes the forwarder when a critical event arrives.
    critical: Notify,
    /// Heartbeats no upstream has confirmed yet, the latest per client.
    pending: Mutex<HashMap<String, RelayedHeartbeat>>,
    /// Most clients with a pending heartbeat: memory stays bounded under a flood of new ids.
    max_pending: usize,
    /// One forwarder at a time, so a page is never sent twice and every batch looks at the
    /// critical lane first.
    forwarding: tokio::sync::Mutex<()>,
    /// Whether the last call upstream failed in a way that may pass: the next one probes
    /// with a small batch ([`PROBE_BATCH`]).
    failing: AtomicBool,
    metrics: Arc<Metrics>,
}

/// How a forwarding pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    /// Nothing (of what was asked for) is left.
    Drained,
    /// The time budget ran out with more to send.
    More,
    /// No upstream took a batch, or the outbox failed: the rest waits.
    Failed,
}

/// How sending one page of a lane went.
enum Page {
    Sent,
    Empty,
    Failed,
}

impl Relay {
    pub fn open(
        store: &Store,
        options: RelayOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Relay, OutboxError> {
        Ok(Relay {
            outbox: Outbox::open(store, options.outbox_max_bytes, metrics.clone())?,
            critical: Notify::new(),
            pending: Mutex::new(HashMap::new()),
            max_pending: options.max_pending_heartbeats,
            forwarding: tokio::sync::Mutex::new(()),
            failing: AtomicBool::new(false),
            metrics,
        })
    }

    /// Queues a client's heartbeat for the upstream (a newer one replaces an older). A new
    /// client beyond `max_pending` is not queued (counted in `gup_relay_dropped`): its
    /// heartbeat was answered, and a later one is queued once there is room.
    pub fn queue(&self, hb: RelayedHeartbeat) {
        let Ok(mut q) = self.pending.lock() else {
            return;
        };
        if q.len() >= self.max_pending && !q.contains_key(&hb.heartbeat.client_id) {
            self.metrics.relay_dropped.inc();
            return;
        }
        q.insert(hb.heartbeat.client_id.clone(), hb);
        self.metrics.relay_pending.set(q.len() as i64);
    }

    /// The next batch of pending heartbeats: those of `ids[*next..]` still pending, up to
    /// `max_bytes` of batch JSON (at least one); `next` moves past them.
    fn next_batch(&self, ids: &[String], next: &mut usize, max_bytes: usize) -> HeartbeatBatch {
        let mut batch = HeartbeatBatch::default();
        let Ok(q) = self.pending.lock() else {
            *next = ids.len();
            return batch;
        };
        let mut bytes = ENVELOPE;
        while let Some(id) = ids.get(*next) {
            if let Some(hb) = q.get(id) {
                let size = json_len(hb) + 1;
                if !batch.heartbeats.is_empty() && bytes + size > max_bytes {
                    break;
                }
                bytes += size;
                batch.heartbeats.push(hb.clone());
            }
            *next += 1;
        }
        batch
    }

    /// The largest batch to send now: a small one while the upstream is failing.
    fn batch_bytes(&self) -> usize {
        match self.failing.load(Ordering::Relaxed) {
            true => PROBE_BATCH,
            false => FORWARD_BATCH,
        }
    }

    /// Records whether the last call found an upstream that answers (an answer of 413 or
    /// 400 is one); after one that found none, the next call probes with a small batch.
    fn answered(&self, answered: bool) {
        self.failing.store(!answered, Ordering::Relaxed);
    }

    /// Stops counting as pending the heartbeats of `batch` that no newer one replaced.
    fn settle(&self, batch: &HeartbeatBatch) {
        if let Ok(mut q) = self.pending.lock() {
            for sent in &batch.heartbeats {
                if q.get(&sent.heartbeat.client_id) == Some(sent) {
                    q.remove(&sent.heartbeat.client_id);
                }
            }
            self.metrics.relay_pending.set(q.len() as i64);
        }
    }
}

/// JSON size of a value, as it goes in a batch (counted, not built).
fn json_len<T: serde::Serialize>(v: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    match serde_json::to_writer(&mut c, v) {
        Ok(()) => c.0,
        Err(_) => 0,
    }
}

impl Node {
    /// Relays pending heartbeats upstream every `sync_interval`, and forwards the outbox
    /// with them: for at most one interval at a time, so that heartbeats keep going while a
    /// long queue drains, and at once again while there is more.
    pub(super) async fn relay_loop(self: std::sync::Arc<Self>) {
        let mut more = false;
        loop {
            if more {
                if self.shutdown.is_shutting_down() {
                    return;
                }
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(self.sync_interval) => {}
                    _ = self.shutdown.clone().wait() => return,
                }
            }
            let clients = self.relay_once().await;
            self.send_reports(clients).await;
            more = self.forward(false, Some(self.sync_interval)).await == Pass::More;
        }
    }

    /// Forwards critical events at once: on each arrival, and again with backoff until an
    /// upstream accepts them. It yields the forwarder after each interval, so a flood of
    /// critical uploads does not hold up the heartbeats.
    pub(super) async fn critical_loop(self: std::sync::Arc<Self>) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let pass = match self.relay.outbox.has(Lane::Critical) {
                true => self.forward(true, Some(self.sync_interval)).await,
                false => Pass::Drained,
            };
            match pass {
                Pass::More => {
                    if self.shutdown.is_shutting_down() {
                        return;
                    }
                }
                Pass::Failed => {
                    let jitter = rand::random_range(0.5..1.0);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                        _ = self.relay.critical.notified() => {}
                        _ = self.shutdown.clone().wait() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
                Pass::Drained => {
                    backoff = Duration::from_millis(250);
                    tokio::select! {
                        _ = self.relay.critical.notified() => {}
                        _ = self.shutdown.clone().wait() => return,
                    }
                }
            }
        }
    }

    /// Sends what the outbox holds, page by page, the critical lane first and again before
    /// each page of the normal lane (only the critical lane when `only_critical`), each page
    /// removed once an upstream accepted it. Stops after `budget` with more to send.
    pub(super) async fn forward(&self, only_critical: bool, budget: Option<Duration>) -> Pass {
        let started = Instant::now();
        let _turn = self.relay.forwarding.lock().await;
        loop {
            if budget.is_some_and(|b| started.elapsed() >= b) {
                return Pass::More;
            }
            match self.forward_page(Lane::Critical).await {
                Page::Sent => continue,
                Page::Empty => {}
                Page::Failed => return Pass::Failed,
            }
            if only_critical {
                return Pass::Drained;
            }
            match self.forward_page(Lane::Normal).await {
                Page::Sent => {}
                Page::Empty => return Pass::Drained,
                Page::Failed => return Pass::Failed,
            }
        }
    }

    /// Sends the first page of `lane`, at most [`FORWARD_BATCH`] bytes with the pending
    /// heartbeats of its clients, and removes it once an upstream accepted it.
    async fn forward_page(&self, lane: Lane) -> Page {
        let max = self.relay.batch_bytes();
        let page = match self.relay.outbox.peek(lane, max) {
            Ok(p) if p.is_empty() => return Page::Empty,
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, lane = lane.name(), "reading the event outbox");
                return Page::Failed;
            }
        };
        let mut tickets = Vec::new();
        let mut uploads: Vec<Placed> = Vec::new();
        let mut heartbeats = Vec::new();
        {
            let Ok(pending) = self.relay.pending.lock() else {
                return Page::Failed;
            };
            let mut with_heartbeat: HashSet<String> = HashSet::new();
            let mut bytes = ENVELOPE;
            for q in page {
                let client = q.placed.upload.client_id();
                let hb = match with_heartbeat.contains(client) {
                    true => None,
                    false => pending.get(client),
                };
                let size = q.ticket.bytes() as usize + 1 + hb.map_or(0, |h| json_len(h) + 1);
                if !uploads.is_empty() && bytes + size > max {
                    // The rest of the page leads the next one.
                    break;
                }
                bytes += size;
                if let Some(hb) = hb {
                    with_heartbeat.insert(client.to_string());
                    heartbeats.push(hb.clone());
                }
                tickets.push(q.ticket);
                uploads.push(q.placed);
            }
        }
        let batch = UploadBatch {
            heartbeats,
            uploads,
        };
        if let Err(e) = self.upstream.forward_uploads(&batch).await {
            tracing::debug!(error = %e, lane = lane.name(), "forwarding events failed; they stay queued");
            self.relay.answered(!e.retryable());
            if !e.retryable() {
                tracing::warn!(error = %e, lane = lane.name(), "upstream refused a batch of events; they stay queued");
            }
            return Page::Failed;
        }
        self.relay.answered(true);
        match self.relay.outbox.remove(lane, &tickets).await {
            // Counted once: what another forwarder already removed is not forwarded twice.
            Ok(removed) => {
                self.served.metrics.events_forwarded.inc_by(removed);
            }
            Err(e) => {
                tracing::error!(error = %e, "could not drop forwarded events from the outbox");
                return Page::Failed;
            }
        }
        Page::Sent
    }

    /// Queues uploads durably (before their 202) and wakes the forwarder for critical events.
    pub(super) async fn enqueue(&self, uploads: &[Placed]) -> Result<(), OutboxError> {
        self.relay.outbox.push_all(uploads).await?;
        if uploads.iter().any(|u| u.upload.is_critical()) {
            self.relay.critical.notify_one();
        }
        Ok(())
    }

    /// Relays the pending heartbeats in batches of at most [`FORWARD_BATCH`] bytes; those
    /// an upstream confirmed (and that no newer one replaced meanwhile) stop being pending,
    /// and the upstream's placements are recorded. A batch refused for good is dropped and
    /// the next one sent; a failure that may pass keeps it and the rest for the next try.
    /// Returns how many distinct clients had a heartbeat pending.
    pub(super) async fn relay_once(&self) -> usize {
        let ids: Vec<String> = match self.relay.pending.lock() {
            Ok(q) => q.keys().cloned().collect(),
            Err(_) => return 0,
        };
        let mut next = 0;
        while next < ids.len() {
            let batch = self
                .relay
                .next_batch(&ids, &mut next, self.relay.batch_bytes());
            if batch.heartbeats.is_empty() {
                continue;
            }
            match self.upstream.relay_heartbeats(&batch).await {
                Ok(reply) => {
                    self.relay.answered(true);
                    self.relay.settle(&batch);
                    for Assignment { client_id, group } in reply.assignments {
                        if let Err(e) = self.assignments.put(&client_id, &group) {
                            tracing::warn!(error = %e, "could not record a client's group");
                        }
                    }
                    for (client, why) in reply.rejected {
                        tracing::warn!(%client, %why, "upstream refused a relayed heartbeat");
                    }
                }
                Err(e) if !e.retryable() => {
                    let n = batch.heartbeats.len();
                    tracing::warn!(error = %e, heartbeats = n, "upstream refused a heartbeat batch for good; dropped it (their next heartbeats go again)");
                    self.relay.answered(true);
                    self.relay.settle(&batch);
                    self.served.metrics.relay_dropped.inc_by(n as u64);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "heartbeat relay failed; keeping them for the next try");
                    self.relay.answered(false);
                    return ids.len();
                }
            }
        }
        ids.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::proto::Heartbeat;

    fn relay(dir: &std::path::Path, max_pending: usize) -> Relay {
        let store = Store::open(dir).unwrap();
        let options = RelayOptions {
            outbox_max_bytes: 1 << 20,
            max_pending_heartbeats: max_pending,
        };
        Relay::open(&store, options, Arc::new(Metrics::new())).unwrap()
    }

    fn hb(id: &str, user_len: usize) -> RelayedHeartbeat {
        RelayedHeartbeat {
            heartbeat: Heartbeat {
                client_id: id.into(),
                user: Some("u".repeat(user_len)),
                client_version: Some("1".repeat(64)),
                ..Heartbeat::default()
            },
            address: Some("127.0.0.1".into()),
            via: None,
            received_at: None,
        }
    }

    #[test]
    fn pending_heartbeats_are_bounded_by_client_and_the_latest_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let r = relay(dir.path(), 2);
        r.queue(hb("a", 1));
        r.queue(hb("b", 1));
        r.queue(hb("c", 1));
        // A newer heartbeat of a pending client still replaces the older one when full.
        r.queue(hb("a", 2));
        let q = r.pending.lock().unwrap();
        assert_eq!(q.len(), 2);
        assert!(!q.contains_key("c"));
        assert_eq!(q["a"], hb("a", 2));
        assert_eq!(r.metrics.relay_dropped.get(), 1);
        assert_eq!(r.metrics.relay_pending.get(), 2);
    }

    #[test]
    fn heartbeat_batches_stay_within_the_byte_bound_and_cover_every_client() {
        let dir = tempfile::tempdir().unwrap();
        let r = relay(dir.path(), 100_000);
        for i in 0..3000 {
            r.queue(hb(&format!("client-{i:05}"), 256));
        }
        let ids: Vec<String> = r.pending.lock().unwrap().keys().cloned().collect();
        let max = 64 << 10;
        let (mut next, mut seen, mut batches) = (0, HashSet::new(), 0);
        while next < ids.len() {
            let batch = r.next_batch(&ids, &mut next, max);
            let len = serde_json::to_vec(&batch).unwrap().len();
            assert!(len <= max, "a batch of {len} bytes");
            assert!(!batch.heartbeats.is_empty());
            for h in &batch.heartbeats {
                assert!(seen.insert(h.heartbeat.client_id.clone()));
            }
            batches += 1;
        }
        assert_eq!(seen.len(), 3000);
        assert!(batches > 10, "{batches} batches");
        // Settling a batch forgets exactly what was sent, not a newer heartbeat.
        let mut next = 0;
        let first = r.next_batch(&ids, &mut next, max);
        let replaced = first.heartbeats[0].heartbeat.client_id.clone();
        r.queue(hb(&replaced, 7));
        r.settle(&first);
        let q = r.pending.lock().unwrap();
        assert_eq!(q.len(), 3000 - first.heartbeats.len() + 1);
        assert!(q.contains_key(&replaced));
    }

    #[test]
    fn a_heartbeat_larger_than_the_bound_still_goes_alone() {
        let dir = tempfile::tempdir().unwrap();
        let r = relay(dir.path(), 10);
        r.queue(hb("a", 256));
        r.queue(hb("b", 256));
        let ids: Vec<String> = vec!["a".into(), "gone".into(), "b".into()];
        let mut next = 0;
        assert_eq!(r.next_batch(&ids, &mut next, 10).heartbeats.len(), 1);
        assert_eq!(r.next_batch(&ids, &mut next, 10).heartbeats.len(), 1);
        assert_eq!(next, 3);
    }
}
