//! Upkeep of the manager's store: garbage collection of blobs no retained revision lists (nor
//! an edge delta to an item of one), and what follows when the scrub finds a blob rotten.
//!
//! Owns the collection ([`Manager::collect`]: under the publish lock, so a blob stored for a
//! publish that has not reached the catalog yet is never taken; a blob some response is
//! reading now is left for the next round) and its loop (after every catalog change and every
//! [`COLLECT_INTERVAL`]), and the manager's [`ScrubSink`]: a rotten blob (already out of the
//! store, so it is never served again: nodes asking get an error and try another upstream)
//! is dropped from the hot cache, counted (`gup_scrub_failures_total`), and raises one admin
//! notification of kind `content_corrupt` naming the item, damped per blob. The cure is to
//! publish the same bytes again, which stores the blob again under the same revision. It must
//! never remove a blob a retained revision lists (an item's or a delta's), nor an edge delta whose
//! `to` is in one.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::Manager;
use crate::core::digest::Digest;
use crate::store::scrub::{Corrupt, ScrubSink};

/// How often the collection runs besides after each catalog change: it catches blobs a
/// response was still reading last time.
pub const COLLECT_INTERVAL: Duration = Duration::from_secs(60);

/// The notification kind of a blob the scrub found rotten.
pub const CONTENT_CORRUPT: &str = "content_corrupt";

impl Manager {
    /// Collects after every catalog change and every [`COLLECT_INTERVAL`].
    pub(super) async fn collect_loop(self: Arc<Self>) {
        loop {
            self.collect().await;
            tokio::select! {
                _ = self.catalog_changed.notified() => {}
                _ = tokio::time::sleep(COLLECT_INTERVAL) => {}
            }
        }
    }

    /// Removes every stored blob no retained revision lists, that is no edge delta to an
    /// item of one, and that no response reads; returns how many blobs and bytes went.
    pub(super) async fn collect(&self) -> (usize, u64) {
        let _guard = self.publish_lock.lock().await;
        let store = &self.served.store;
        // Listed before asking what is in use: a blob made visible under a reservation (a
        // delta on its way to its record) is then always seen in use.
        let blobs = store.list();
        let in_use = store.in_use();
        let deltas = &self.served.deltas;
        let victims: Vec<(Digest, u64)> = match self.served.catalog() {
            Ok(history) => {
                // Edge deltas whose `to` left the retained revisions go with their records;
                // the others are kept like the catalog's blobs.
                let edge = deltas
                    .prune(|to| history.contains(to))
                    .and_then(|_| deltas.recorded_blobs());
                let edge: std::collections::HashSet<Digest> = match edge {
                    Ok(recorded) => recorded.into_iter().map(|(d, _)| d).collect(),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read the delta records; nothing collected");
                        return (0, 0);
                    }
                };
                blobs
                    .into_iter()
                    .filter(|(d, _)| {
                        !history.contains(d) && !edge.contains(d) && !in_use.contains(d)
                    })
                    .map(|(d, m)| (d, m.size))
                    .collect()
            }
            Err(_) => return (0, 0),
        };
        let (mut blobs, mut bytes) = (0, 0);
        for (digest, size) in victims {
            match store.remove(&digest).await {
                Ok(()) => {
                    self.served.hot.remove(&digest);
                    blobs += 1;
                    bytes += size;
                    tracing::debug!(%digest, size, "collected: in no retained revision");
                }
                Err(e) => tracing::warn!(%digest, error = %e, "could not collect a blob"),
            }
        }
        if blobs > 0 {
            tracing::info!(
                blobs,
                bytes,
                store_bytes = store.total_bytes(),
                "collected blobs no retained revision lists"
            );
        }
        self.served
            .metrics
            .cache_bytes
            .set(store.total_bytes() as i64);
        (blobs, bytes)
    }

    /// Raises (or counts) the notification of a rotten blob and calls the webhook.
    async fn corrupt_found(&self, c: Corrupt) {
        let item = match self.served.catalog() {
            Ok(h) => h
                .find(&c.digest)
                .map(|(_, i)| (i.name.clone(), i.version.clone())),
            Err(_) => None,
        };
        let (name, version) = item.unwrap_or_default();
        let damper = match self.served.directory() {
            Ok(d) => d.site.notification_damper_s,
            Err(_) => 0,
        };
        let now = chrono::Utc::now();
        let raised =
            self.events
                .raise_content(&c.digest, &name, &version, CONTENT_CORRUPT, damper, now);
        let flushed = self.events.flush().await;
        match (raised, flushed) {
            (Ok(Some(n)), Ok(())) => {
                tracing::error!(item = %name, %version, digest = %c.digest, "admin notification raised: stored content is corrupt");
                if let Some(url) = &self.webhook {
                    tokio::spawn(super::events::deliver_webhook(
                        self.http.clone(),
                        url.clone(),
                        n,
                    ));
                }
            }
            (Ok(_), Ok(())) => {}
            (Err(e), _) => {
                tracing::error!(digest = %c.digest, error = %e, "could not raise the notification of a corrupt blob")
            }
            (_, Err(e)) => {
                tracing::error!(digest = %c.digest, error = %e, "could not persist the notification of a corrupt blob")
            }
        }
    }
}

/// The manager's answer to rot (see the module doc).
pub struct Upkeep(pub Weak<Manager>);

impl ScrubSink for Upkeep {
    fn verified(&self, bytes: u64) {
        if let Some(m) = self.0.upgrade() {
            m.served.metrics.scrub_bytes.inc_by(bytes);
        }
    }

    fn corrupt(&self, c: Corrupt) {
        let Some(m) = self.0.upgrade() else {
            return;
        };
        m.served.metrics.scrub_failures.inc();
        m.served.hot.remove(&c.digest);
        // A listed delta that was rotten is computed again (the same bytes).
        m.deltas_wanted.notify_one();
        tokio::spawn(async move { m.corrupt_found(c).await });
    }
}
