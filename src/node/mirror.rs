//! The mirror: the node's copy of its upstream's catalog and directory, kept fresh.
//!
//! Owns syncing (`/v1/sync` at start, then on each event of the one push stream the node
//! holds to its upstream, or every `upstream.sync_interval_s` in pull mode), persisting the
//! mirror so a restart serves what it had, telling the node's own push clients what changed,
//! and prefetching new catalog items at the prefetch slot the upstream gives this node (the
//! moment a new revision becomes available to the node's own clients), with the deltas they
//! list (a revision that only lists deltas asks for no new slot). It must never accept a
//! directory that fails its checks or a catalog that goes backwards, and never prefetch a
//! non-urgent item before its slot.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use super::upstream::{Picked, Synced};
use super::{Node, NodeError, CATALOG_KEY, DIRECTORY_KEY};
use crate::core::catalog::{Catalog, CatalogItem};
use crate::core::digest::Digest;
use crate::core::fault::Internal;
use crate::core::proto::{directory_changes, Change, PrefetchSlotRequest};

impl Node {
    /// Syncs at start, then on each upstream event (push) or every `sync_interval` (pull).
    pub(super) async fn mirror_loop(self: Arc<Self>) {
        let mut last_ok: Option<bool> = None;
        // In push mode the stream brings changes at once; the conditional resync every
        // interval (a 304 when nothing changed) catches a missed event and an upstream that
        // went stale, which no event tells.
        let period = self.sync_interval;
        loop {
            match self.sync_once().await {
                Ok(server) => {
                    self.served.metrics.mirrored(Utc::now());
                    if last_ok != Some(true) {
                        tracing::info!(%server, "synced with upstream");
                    }
                    last_ok = Some(true);
                }
                Err(e) => {
                    if last_ok != Some(false) {
                        tracing::warn!(error = %e, "no upstream answered; serving what we have");
                    }
                    last_ok = Some(false);
                    self.served.readiness.mark_stale(Utc::now());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.upstream_event.notified() => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// Holds the upstream push stream; reconnects with jittered backoff.
    pub(super) async fn push_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let me = self.clone();
            let on_event = move |_event: &str| me.upstream_event.notify_one();
            let result = tokio::select! {
                r = self.upstream.follow_stream(&on_event) => r,
                _ = self.shutdown.clone().wait() => return,
            };
            match result {
                Ok(server) => {
                    tracing::info!(%server, "upstream push stream ended; reconnecting");
                    backoff = Duration::from_millis(500);
                }
                Err(e) => {
                    if e.retryable() {
                        tracing::debug!(error = %e, "upstream push stream unavailable");
                    } else {
                        tracing::warn!(error = %e, "upstream push stream refused");
                    }
                    // Let the mirror loop notice the outage too.
                    self.upstream_event.notify_one();
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            let jitter = rand::random_range(0.5..1.0);
            tokio::select! {
                _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// One sync: fetch the snapshot, mirror it, persist it, push what changed to our own
    /// streams. Returns the server that answered.
    pub async fn sync_once(&self) -> Result<String, NodeError> {
        // The snapshot was checked (catalog, signature, directory) before it came here.
        let (at, synced) = self.upstream.snapshot().await?;
        let (snapshot, etag) = match synced {
            Synced::New { snapshot, etag } => (*snapshot, etag),
            Synced::Unchanged { stale_since } => {
                // Nothing changed upstream; this node is as stale as its upstream says.
                self.served.readiness.mark_synced_as(stale_since);
                return Ok(at.name());
            }
        };
        let stale_since = snapshot.stale_since;
        let available_at = self.prefetch_moment(&at, &snapshot.catalog).await;
        let mut changes = Vec::new();
        let new_history = {
            let mut history = self
                .served
                .catalog
                .write()
                .map_err(|_| Internal::poisoned("catalog"))?;
            match history.mirror(snapshot.catalog, snapshot.catalog_signature, available_at) {
                Ok(true) => {
                    changes.push(Change::Catalog {
                        revision: history.revision(),
                    });
                    Some(history.clone())
                }
                Ok(false) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "upstream catalog refused");
                    None
                }
            }
        };
        let new_directory = {
            let mut dir = self
                .served
                .directory
                .write()
                .map_err(|_| Internal::poisoned("directory"))?;
            if *dir == snapshot.directory {
                None
            } else {
                changes.extend(directory_changes(&dir, &snapshot.directory));
                *dir = snapshot.directory;
                Some(dir.clone())
            }
        };
        if let Some(history) = &new_history {
            self.catalog_kv.put(CATALOG_KEY, history)?;
        }
        if let Some(dir) = &new_directory {
            self.directory_kv.put(DIRECTORY_KEY, dir)?;
        }
        if new_history.is_some() || new_directory.is_some() {
            self.served.store.flush().await?;
        }
        if let Some(history) = new_history {
            tracing::info!(
                revision = history.revision(),
                "mirrored a new catalog revision"
            );
            self.catalog_changed.send_replace(history.revision());
            // Slots of revisions no longer retained are not needed any more.
            if let Err(e) = self.served.prune_slots(history.oldest_revision()) {
                tracing::warn!(error = %e, "could not prune old download slots");
            }
        }
        self.served.changes.send_all(changes);
        // A node behind a stale node is as stale as it: staleness passes down the chain.
        self.served.readiness.mark_synced_as(stale_since);
        if let Some(etag) = etag {
            self.upstream.mirrored(&at, etag, stale_since);
        }
        Ok(at.name())
    }

    /// When this node may prefetch `catalog`, just synced from the server `at`: now, unless it
    /// is a new revision with a non-urgent item the store lacks; then the slot the upstream
    /// gives this node within `upstream.prefetch_window_s` (kept inside now and now plus the
    /// window, whatever the clocks say). The revision becomes available to this node's
    /// clients at that moment: their windows start there. An ask that fails (an upstream
    /// without `/v1/node/slot`, silence) means now: no worse than before slots.
    async fn prefetch_moment(&self, at: &Picked, catalog: &Catalog) -> DateTime<Utc> {
        let now = Utc::now();
        let (have, only_deltas) = self.served.catalog().map_or((0, false), |c| {
            let current = c.current();
            (c.revision(), catalog.only_deltas_differ(&current))
        });
        if only_deltas && have > 0 {
            // A revision that only lists deltas keeps the moment of the one it amends (the
            // history does that itself): no new slot to ask for.
            return now;
        }
        let waits = self.prefetch
            && self.prefetch_window_s > 0
            && catalog.revision > have
            && catalog
                .items
                .iter()
                .any(|i| !i.urgent && !self.served.store.contains(&i.sha256));
        if !waits {
            if catalog.revision > have {
                self.served.metrics.prefetch_slot.set(0.0);
            }
            return now;
        }
        let req = PrefetchSlotRequest {
            node_id: self.id.clone(),
            catalog_revision: catalog.revision,
            window_s: self.prefetch_window_s,
        };
        let at = match self.upstream.prefetch_slot(at, &req).await {
            Ok(Some(slot)) => {
                let latest = now + chrono::Duration::seconds(self.prefetch_window_s as i64);
                let at = slot.not_before.clamp(now, latest);
                tracing::info!(revision = catalog.revision, not_before = %at, "prefetch slot from the upstream");
                at
            }
            Ok(None) => now,
            Err(e) => {
                tracing::warn!(error = %e, "no prefetch slot from the upstream; prefetching at once");
                now
            }
        };
        let gauge = if at > now {
            at.timestamp_micros() as f64 / 1e6
        } else {
            0.0
        };
        self.served.metrics.prefetch_slot.set(gauge);
        at
    }

    /// Fetches every blob of the current catalog the store lacks (each item's bytes, then the
    /// deltas it lists), whenever it changes: those of urgent items at once, the others from
    /// the revision's prefetch slot (its `available_at`) on.
    pub(super) async fn prefetch_loop(self: Arc<Self>) {
        if !self.prefetch {
            return;
        }
        let mut changed = self.catalog_changed.subscribe();
        loop {
            let (wanted, slot) = match self.served.catalog.read() {
                Ok(c) => (
                    c.current().items.iter().flat_map(Wanted::of).collect(),
                    c.revisions().last().map(|r| r.available_at),
                ),
                Err(_) => (Vec::new(), None),
            };
            let wanted: Vec<Wanted> = wanted
                .into_iter()
                .filter(|w: &Wanted| !self.served.store.contains(&w.sha256))
                .collect();
            let early = slot.is_some_and(|t| t > Utc::now());
            let (now, later): (Vec<Wanted>, Vec<Wanted>) =
                wanted.into_iter().partition(|w| w.urgent || !early);
            for item in now {
                tracing::debug!(sha256 = %item.sha256, delta = item.delta, "prefetching");
                self.enforce_budget(item.size).await;
                // Whatever the budget says, the filesystem keeps cache.min_free_bytes.
                if let Some(e) = self.fetches.below_min_free(&item.sha256, item.size) {
                    tracing::warn!(name = %item.name, sha256 = %item.sha256, delta = item.delta, error = %e, "not prefetched: no room on the disk; will retry");
                    continue;
                }
                if let Err(e) = self.fetches.fetch(item.sha256, item.size).await {
                    tracing::warn!(name = %item.name, sha256 = %item.sha256, delta = item.delta, error = %e, "prefetch failed; will retry");
                }
            }
            let wait = match (later.is_empty(), slot) {
                (false, Some(t)) => (t - Utc::now()).to_std().unwrap_or(Duration::ZERO),
                _ => self.sync_interval,
            };
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }
}

/// One blob the prefetch wants: an item's bytes or a delta it lists, with the item's urgency.
struct Wanted {
    name: String,
    sha256: Digest,
    size: u64,
    urgent: bool,
    /// A delta the item lists (for the logs).
    delta: bool,
}

impl Wanted {
    /// The blobs `item` brings into the catalog, its own first.
    fn of(item: &CatalogItem) -> Vec<Wanted> {
        item.blobs()
            .map(|(sha256, size)| Wanted {
                name: item.name.clone(),
                sha256,
                size,
                urgent: item.urgent,
                delta: sha256 != item.sha256,
            })
            .collect()
    }
}
