//! The deltas the manager lists on catalog items.
//!
//! Owns deciding which deltas a current item should list (one from each of the
//! `deltas.from_versions` versions of its name before it that the retained revisions name and
//! the store holds), having them computed in the background by the server's one delta engine
//! (`serve::delta`: it bounds the computations at once, computes a pair once and records what
//! it gave), and listing them on the item in a new catalog revision, signed, persisted and
//! pushed under the publish lock, only while the item is still current. It runs after every
//! publish, after the scrub found a blob rotten, and once at start: a manager stopped before
//! a new version's deltas were listed, or whose listed delta was lost, computes what is
//! missing when it starts again. It must never hold the publish lock while computing (a
//! publish must not wait for a delta), never keep a publish waiting for its deltas, and never
//! list a delta whose blob is not stored.

use std::sync::Arc;

use super::Manager;
use crate::core::catalog::{CatalogHistory, DeltaRef};
use crate::core::digest::Digest;
use crate::core::fault::Internal;
use crate::core::proto::Change;
use crate::http::error::ApiError;
use crate::serve::delta::{Asker, Outcome};
use crate::store::Store;

/// A current item and the earlier versions it lacks a stored delta from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Wanted {
    name: String,
    sha256: Digest,
    /// Newest first.
    from: Vec<Digest>,
}

/// What the current items of `history` lack: for each, the earlier versions (at most
/// `from_versions`, held in `store`) it lists no delta from, or lists one whose blob is gone.
fn wanted(history: &CatalogHistory, from_versions: usize, store: &Store) -> Vec<Wanted> {
    let current = history.current();
    current
        .items
        .iter()
        .filter_map(|item| {
            let from: Vec<Digest> = history
                .previous_versions(&item.name, &item.sha256, from_versions)
                .into_iter()
                .map(|(d, _)| d)
                .filter(|d| store.contains(d))
                .filter(|d| match item.deltas.iter().find(|x| x.from_sha256 == *d) {
                    Some(listed) => !store.contains(&listed.sha256),
                    None => true,
                })
                .collect();
            (!from.is_empty()).then(|| Wanted {
                name: item.name.clone(),
                sha256: item.sha256,
                from,
            })
        })
        .collect()
}

impl Manager {
    /// Lists what is missing at start, then after every wake (a publish, a rotten blob).
    pub(super) async fn deltas_loop(self: Arc<Self>) {
        loop {
            self.list_missing_deltas().await;
            tokio::select! {
                _ = self.deltas_wanted.notified() => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// Computes and lists every delta a current item lacks; returns how many it listed.
    pub(super) async fn list_missing_deltas(&self) -> usize {
        let n = self.delta_from_versions;
        if n == 0 {
            return 0;
        }
        let wanted = match self.served.catalog() {
            Ok(history) => wanted(&history, n, &self.served.store),
            Err(_) => return 0,
        };
        let mut listed = 0;
        for w in wanted {
            let mut found = Vec::new();
            for from in &w.from {
                let engine = &self.served.deltas;
                match engine.get_or_compute(*from, w.sha256, Asker::Listing).await {
                    Ok(Outcome::Delta(blob)) => found.push(DeltaRef {
                        from_sha256: *from,
                        sha256: blob.sha256,
                        size: blob.size,
                    }),
                    Ok(outcome) => {
                        tracing::debug!(name = %w.name, %from, to = %w.sha256, ?outcome, "no delta listed")
                    }
                    Err(e) => {
                        tracing::warn!(name = %w.name, %from, to = %w.sha256, error = %e, "delta not computed; tried again at the next publish or start")
                    }
                }
            }
            if found.is_empty() {
                continue;
            }
            match self.list_deltas(&w, found).await {
                Ok(n) => listed += n,
                Err(e) => {
                    tracing::error!(name = %w.name, error = %e, "could not list the deltas computed")
                }
            }
        }
        listed
    }

    /// Lists `found` on the item `w` names, if it is still current, in a new revision;
    /// returns how many of them it lists.
    async fn list_deltas(&self, w: &Wanted, found: Vec<DeltaRef>) -> Result<usize, ApiError> {
        let _guard = self.publish_lock.lock().await;
        let store = &self.served.store;
        let revision = {
            let mut catalog = self
                .served
                .catalog
                .write()
                .map_err(|_| Internal::poisoned("catalog"))?;
            let current = catalog.current();
            let Some(item) = current
                .items
                .iter()
                .find(|i| i.name == w.name && i.sha256 == w.sha256)
            else {
                // Moved on meanwhile: the blobs stay while their records' `to` is retained.
                return Ok(0);
            };
            // The new ones first (newest version first), then those listed before; only
            // blobs still stored.
            let mut merged = found.clone();
            merged.extend(
                item.deltas
                    .iter()
                    .filter(|d| !found.iter().any(|f| f.from_sha256 == d.from_sha256))
                    .cloned(),
            );
            merged.retain(|d| store.contains(&d.sha256));
            let revision = catalog.set_deltas(&w.name, &w.sha256, merged);
            if revision.is_some() {
                catalog.sign_current(|c| self.catalog_key.sign(c));
            }
            revision
        };
        let Some(revision) = revision else {
            return Ok(0);
        };
        self.persist_catalog().await?;
        self.served.changes.send(Change::Catalog { revision });
        // A listed delta that was replaced may be unreferenced now.
        self.catalog_changed.notify_one();
        self.served.metrics.deltas_listed.inc_by(found.len() as u64);
        let bytes: u64 = found.iter().map(|d| d.size).sum();
        tracing::info!(name = %w.name, sha256 = %w.sha256, deltas = found.len(), bytes, revision, "deltas listed");
        Ok(found.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config::ManagerConfig;

    /// Bytes that do not compress (xorshift).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    async fn store_blob(m: &Manager, bytes: &[u8]) -> Digest {
        let mut w = m.served.store.writer().await.unwrap();
        w.write(bytes).await.unwrap();
        w.finish(None).await.unwrap().0
    }

    fn publish(m: &Manager, name: &str, version: &str, d: Digest, size: u64) {
        let mut c = m.served.catalog.write().unwrap();
        c.publish(name, Some(version), d, size, false, chrono::Utc::now())
            .unwrap();
        c.sign_current(|c| m.catalog_key.sign(c));
    }

    fn open(dir: &std::path::Path, from_versions: usize) -> Arc<Manager> {
        let mut config = ManagerConfig::default();
        config.manager.data_dir = dir.to_path_buf();
        config.manager.retain_revisions = 10;
        config.deltas.from_versions = from_versions;
        let (_trigger, shutdown) = crate::http::shutdown::shutdown_pair();
        Manager::open(&config, shutdown).unwrap()
    }

    #[tokio::test]
    async fn a_new_version_lists_deltas_from_the_earlier_ones_it_holds_and_gc_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 2);
        let v1 = noise(1, 256 << 10);
        let mut v2 = v1.clone();
        v2[1000..5096].copy_from_slice(&noise(2, 4096));
        let mut v3 = v2.clone();
        v3[90_000..94_096].copy_from_slice(&noise(3, 4096));
        let unrelated = noise(9, 256 << 10);
        let (d1, d2, d3) = (
            store_blob(&m, &v1).await,
            store_blob(&m, &v2).await,
            store_blob(&m, &v3).await,
        );
        let du = store_blob(&m, &unrelated).await;
        publish(&m, "defs", "1", d1, v1.len() as u64);
        publish(&m, "defs", "2", d2, v2.len() as u64);
        publish(&m, "defs", "3", d3, v3.len() as u64);
        publish(&m, "other", "1", du, unrelated.len() as u64);
        let before = m.served.catalog().unwrap().revision();
        assert_eq!(m.list_missing_deltas().await, 2);
        let history = m.served.catalog().unwrap().clone();
        assert_eq!(history.revision(), before + 1, "one revision for the item");
        assert!(history.signature().is_some(), "signed like every revision");
        let item = history.current().items[0].clone();
        assert_eq!(item.sha256, d3);
        let froms: Vec<Digest> = item.deltas.iter().map(|d| d.from_sha256).collect();
        assert_eq!(froms, vec![d2, d1], "newest version first");
        // Each rebuilds v3 and is small.
        for (listed, old) in item.deltas.iter().zip([&v2, &v1]) {
            let blob = std::fs::read(m.served.store.blob_path(&listed.sha256)).unwrap();
            assert_eq!(blob.len() as u64, listed.size);
            assert!(listed.size < 20_000, "{}", listed.size);
            let mut out = vec![0u8; v3.len()];
            crate::core::delta::apply(old, &blob, &mut out).unwrap();
            assert!(out == v3);
        }
        // Persisted: a restart reads the same catalog, and has nothing left to do.
        let stored: CatalogHistory = m
            .catalog_kv
            .get(super::super::CATALOG_KEY)
            .unwrap()
            .unwrap();
        assert_eq!(stored.current(), history.current());
        assert_eq!(m.list_missing_deltas().await, 0);
        // The collection keeps the listed deltas.
        m.collect().await;
        for d in &item.deltas {
            assert!(m.served.store.contains(&d.sha256));
        }
        // A lost delta blob is computed again (the same bytes): the listing stands as it was.
        let lost = item.deltas[0].sha256;
        m.served.store.remove(&lost).await.unwrap();
        assert_eq!(m.list_missing_deltas().await, 0);
        assert!(m.served.store.contains(&lost));
        assert_eq!(m.served.catalog().unwrap().revision(), before + 1);
    }

    #[tokio::test]
    async fn no_delta_is_listed_when_it_is_not_worth_it_or_the_item_moved_on() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 3);
        let (a, b) = (noise(1, 64 << 10), noise(2, 64 << 10));
        let (da, db) = (store_blob(&m, &a).await, store_blob(&m, &b).await);
        publish(&m, "defs", "1", da, a.len() as u64);
        publish(&m, "defs", "2", db, b.len() as u64);
        let rev = m.served.catalog().unwrap().revision();
        assert_eq!(m.list_missing_deltas().await, 0);
        assert_eq!(m.served.catalog().unwrap().revision(), rev);
        assert_eq!(m.served.metrics.deltas_unworthy.get(), 1);
        // Asked again: the record answers, nothing is computed.
        assert_eq!(m.list_missing_deltas().await, 0);
        assert_eq!(m.served.metrics.deltas_unworthy.get(), 1);
        // A listing for an item that moved on changes nothing.
        let w = Wanted {
            name: "defs".into(),
            sha256: da,
            from: vec![db],
        };
        let found = vec![DeltaRef {
            from_sha256: db,
            sha256: Digest::of(b"x"),
            size: 1,
        }];
        assert_eq!(m.list_deltas(&w, found).await.unwrap(), 0);
        assert_eq!(m.served.catalog().unwrap().revision(), rev);
    }

    #[tokio::test]
    async fn from_versions_zero_lists_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let m = open(dir.path(), 0);
        let a = noise(1, 64 << 10);
        let mut b = a.clone();
        b[0] ^= 1;
        let (da, db) = (store_blob(&m, &a).await, store_blob(&m, &b).await);
        publish(&m, "defs", "1", da, a.len() as u64);
        publish(&m, "defs", "2", db, b.len() as u64);
        assert_eq!(m.list_missing_deltas().await, 0);
        assert_eq!(m.served.metrics.deltas_computed.get(), 0);
    }
}
