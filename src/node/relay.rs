//! The relay: client heartbeats and uploads on their way to the upstream.
//!
//! Owns the heartbeats not yet confirmed by an upstream (the latest per client, relayed in
//! batches every `upstream.sync_interval_s`), the durable outbox of uploads, and forwarding
//! it: critical events at once (and again with backoff until accepted), the rest with each
//! batch. An upload travels with the pending heartbeat of its client, so the upstream can
//! place a client first seen here before it files the client's events. It must never drop an
//! upload an upstream did not accept.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use super::outbox::Outbox;
use super::Node;
use crate::core::proto::{
    Assignment, HeartbeatBatch, Placed, RelayedHeartbeat, UploadBatch, FORWARD_BATCH,
};
use crate::store::{Store, StoreError};

/// Heartbeats and uploads waiting for an upstream.
pub struct Relay {
    /// Uploads accepted, durable, waiting for an upstream to accept them.
    outbox: Outbox,
    /// Wakes the forwarder when a critical event arrives.
    critical: Notify,
    /// Heartbeats no upstream has confirmed yet, the latest per client.
    pending: Mutex<HashMap<String, RelayedHeartbeat>>,
}

impl Relay {
    pub fn open(store: &Store) -> Result<Relay, StoreError> {
        Ok(Relay {
            outbox: Outbox::open(store)?,
            critical: Notify::new(),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Queues a client's heartbeat for the upstream (a newer one replaces an older).
    pub fn queue(&self, hb: RelayedHeartbeat) {
        if let Ok(mut q) = self.pending.lock() {
            q.insert(hb.heartbeat.client_id.clone(), hb);
        }
    }

    /// The pending heartbeats of `clients`.
    fn pending_of<'a>(&self, clients: impl IntoIterator<Item = &'a str>) -> Vec<RelayedHeartbeat> {
        let Ok(q) = self.pending.lock() else {
            return Vec::new();
        };
        let mut seen = HashSet::new();
        clients
            .into_iter()
            .filter(|c| seen.insert(*c))
            .filter_map(|c| q.get(c).cloned())
            .collect()
    }
}

/// JSON size of a value, as it goes in a batch.
fn json_len<T: serde::Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map(|b| b.len()).unwrap_or(0)
}

impl Node {
    /// Relays pending heartbeats upstream every `sync_interval`, and with them every queued
    /// upload.
    pub(super) async fn relay_loop(self: std::sync::Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.sync_interval) => {}
                _ = self.shutdown.clone().wait() => return,
            }
            self.relay_once().await;
            self.forward(false).await;
        }
    }

    /// Forwards critical events at once: on each arrival, and again with backoff until an
    /// upstream accepts them.
    pub(super) async fn critical_loop(self: std::sync::Arc<Self>) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let pending = self.relay.outbox.has_critical().unwrap_or(false);
            if pending && !self.forward(true).await {
                let jitter = rand::random_range(0.5..1.0);
                tokio::select! {
                    _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    _ = self.relay.critical.notified() => {}
                    _ = self.shutdown.clone().wait() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            backoff = Duration::from_millis(250);
            tokio::select! {
                _ = self.relay.critical.notified() => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// Sends what the outbox holds (only uploads with critical events when `only_critical`)
    /// in batches of at most [`FORWARD_BATCH`] bytes, each with the pending heartbeats of its
    /// clients; removes each batch once an upstream accepted it. Returns false when an
    /// upstream could not be reached.
    pub(super) async fn forward(&self, only_critical: bool) -> bool {
        let mut sent_keys: HashSet<String> = HashSet::new();
        loop {
            let page = match self.relay.outbox.peek(FORWARD_BATCH * 4) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "reading the event outbox");
                    return false;
                }
            };
            let mut keys = Vec::new();
            let mut uploads: Vec<Placed> = Vec::new();
            let mut heartbeats = Vec::new();
            let mut with_heartbeat: HashSet<String> = HashSet::new();
            let mut bytes = 0;
            for (k, u) in page {
                if sent_keys.contains(&k) || (only_critical && !u.upload.is_critical()) {
                    continue;
                }
                let client = u.upload.client_id().to_string();
                let hb = if with_heartbeat.contains(&client) {
                    None
                } else {
                    self.relay.pending_of([client.as_str()]).pop()
                };
                let size = json_len(&u) + hb.as_ref().map_or(0, json_len);
                if !uploads.is_empty() && bytes + size > FORWARD_BATCH {
                    break;
                }
                bytes += size;
                if let Some(hb) = hb {
                    with_heartbeat.insert(client);
                    heartbeats.push(hb);
                }
                keys.push(k);
                uploads.push(u);
            }
            if uploads.is_empty() {
                self.update_queued();
                return true;
            }
            let count: usize = uploads.iter().map(|u| u.upload.count()).sum();
            let batch = UploadBatch {
                heartbeats,
                uploads,
            };
            match self.upstream.forward_uploads(&batch).await {
                Ok(()) => {
                    if let Err(e) = self.relay.outbox.remove(&keys).await {
                        tracing::error!(error = %e, "could not drop forwarded events from the outbox");
                        return false;
                    }
                    self.served.metrics.events_forwarded.inc_by(count as u64);
                    sent_keys.extend(keys);
                    self.update_queued();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "forwarding events failed; they stay queued");
                    return false;
                }
            }
        }
    }

    pub(super) fn update_queued(&self) {
        if let Ok(n) = self.relay.outbox.queued() {
            self.served.metrics.events_queued.set(n as i64);
        }
    }

    /// Queues uploads durably (before their 202) and wakes the forwarder for critical events.
    pub(super) async fn enqueue(&self, uploads: &[Placed]) -> Result<(), StoreError> {
        self.relay.outbox.push_all(uploads).await?;
        let count: usize = uploads.iter().map(|u| u.upload.count()).sum();
        self.served.metrics.events_queued.inc_by(count as i64);
        if uploads.iter().any(|u| u.upload.is_critical()) {
            self.relay.critical.notify_one();
        }
        Ok(())
    }

    /// Relays the pending heartbeats; those an upstream confirmed (and that no newer one
    /// replaced meanwhile) stop being pending, and the upstream's placements are recorded.
    pub(super) async fn relay_once(&self) {
        let batch: Vec<RelayedHeartbeat> = match self.relay.pending.lock() {
            Ok(q) => q.values().cloned().collect(),
            Err(_) => return,
        };
        if batch.is_empty() {
            return;
        }
        let batch = HeartbeatBatch { heartbeats: batch };
        match self.upstream.relay_heartbeats(&batch).await {
            Ok(reply) => {
                if let Ok(mut q) = self.relay.pending.lock() {
                    for sent in &batch.heartbeats {
                        if q.get(&sent.heartbeat.client_id) == Some(sent) {
                            q.remove(&sent.heartbeat.client_id);
                        }
                    }
                }
                for Assignment { client_id, group } in reply.assignments {
                    if let Err(e) = self.assignments.put(&client_id, &group) {
                        tracing::warn!(error = %e, "could not record a client's group");
                    }
                }
                for (client, why) in reply.rejected {
                    tracing::warn!(%client, %why, "upstream refused a relayed heartbeat");
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat relay failed; keeping them for the next try");
            }
        }
    }
}
