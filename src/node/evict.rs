//! Eviction: which blobs leave the store when it is over its disk budget, and when.
//!
//! Owns the ranking ([`plan`]: blobs in no retained catalog revision go first, least recently
//! read first, then blobs only the older retained revisions hold, oldest revision first;
//! items of the current revision and blobs a response is reading are never chosen) and the
//! node's loop that removes what the plan names, through `store`, after every stored blob and
//! catalog change. It must never remove a blob the plan did not name.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::Node;
use crate::core::catalog::CatalogHistory;
use crate::core::digest::Digest;
use crate::store::BlobMeta;

/// The blobs to remove, in order, so that the store holds at most `budget - reserve` bytes
/// (room for a blob of `reserve` bytes about to arrive). It may not get there when the current
/// revision alone is larger: then it names everything it may.
pub fn plan(
    blobs: &[(Digest, BlobMeta)],
    history: &CatalogHistory,
    in_use: &HashSet<Digest>,
    budget: u64,
    reserve: u64,
) -> Vec<Digest> {
    let target = budget.saturating_sub(reserve);
    let mut total: u64 = blobs.iter().map(|(_, m)| m.size).sum();
    if total <= target {
        return Vec::new();
    }
    // digest -> position of the newest retained revision holding it (higher = newer).
    let mut newest: HashMap<Digest, usize> = HashMap::new();
    for (i, rev) in history.revisions().enumerate() {
        for item in &rev.catalog.items {
            newest.insert(item.sha256, i);
        }
    }
    let current: HashSet<Digest> = history.current().items.iter().map(|i| i.sha256).collect();
    let mut candidates: Vec<(u8, usize, i64, Digest, u64)> = blobs
        .iter()
        .filter(|(d, _)| !current.contains(d) && !in_use.contains(d))
        .map(|(d, m)| {
            let (tier, age) = match newest.get(d) {
                None => (0, 0),
                Some(i) => (1, *i),
            };
            (tier, age, m.last_access.timestamp_millis(), *d, m.size)
        })
        .collect();
    candidates.sort();
    let mut out = Vec::new();
    for (_, _, _, d, size) in candidates {
        if total <= target {
            break;
        }
        total -= size;
        out.push(d);
    }
    out
}

impl Node {
    /// Keeps the store within `cache.max_bytes` after every stored blob and catalog change.
    pub(super) async fn evict_loop(self: Arc<Self>) {
        let mut changed = self.catalog_changed.subscribe();
        loop {
            self.enforce_budget(0).await;
            tokio::select! {
                _ = self.fetches.stored.notified() => {}
                _ = changed.changed() => {}
                _ = tokio::time::sleep(self.sync_interval) => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// Evicts what `evict::plan` names so that `reserve` more bytes fit in the budget.
    pub(super) async fn enforce_budget(&self, reserve: u64) {
        let store = &self.served.store;
        let victims = match self.served.catalog.read() {
            Ok(history) => plan(
                &store.list(),
                &history,
                &store.in_use(),
                self.max_bytes,
                reserve,
            ),
            Err(_) => return,
        };
        for digest in victims {
            match store.remove(&digest).await {
                Ok(()) => {
                    // A cached mapping would keep the unlinked file's space until dropped.
                    self.served.hot.remove(&digest);
                    tracing::info!(%digest, "evicted to stay within cache.max_bytes")
                }
                Err(e) => tracing::warn!(%digest, error = %e, "eviction failed"),
            }
        }
        if store.total_bytes() > self.max_bytes {
            tracing::warn!(
                bytes = store.total_bytes(),
                max_bytes = self.max_bytes,
                "over cache.max_bytes: the current catalog revision alone is larger"
            );
        }
        self.served
            .metrics
            .cache_bytes
            .set(store.total_bytes() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, Utc};

    fn meta(size: u64, age_s: i64) -> BlobMeta {
        let t = Utc::now() - Duration::seconds(age_s);
        BlobMeta {
            size,
            stored_at: t,
            last_access: t,
        }
    }

    #[test]
    fn orphans_first_by_lru_then_oldest_revisions_never_current_or_in_use() {
        let now = Utc::now();
        let d = |s: &str| Digest::of(s.as_bytes());
        let mut h = CatalogHistory::new(3);
        h.publish("a", Some("1"), d("a1"), 10, false, now).unwrap();
        h.publish("a", Some("2"), d("a2"), 10, false, now).unwrap();
        h.publish("a", Some("3"), d("a3"), 10, false, now).unwrap();
        h.publish("a", Some("4"), d("a4"), 10, false, now).unwrap(); // a1 falls out
        let blobs = vec![
            (d("a1"), meta(10, 5)),
            (d("orphan-old"), meta(10, 100)),
            (d("orphan-new"), meta(10, 1)),
            (d("a2"), meta(10, 0)),
            (d("a3"), meta(10, 0)),
            (d("a4"), meta(10, 0)),
        ];
        let none = HashSet::new();
        // 60 bytes, budget 60: nothing to do.
        assert!(plan(&blobs, &h, &none, 60, 0).is_empty());
        // Budget 30: the three orphans (LRU first), then a2 (the oldest retained revision).
        assert_eq!(
            plan(&blobs, &h, &none, 30, 0),
            vec![d("orphan-old"), d("a1"), d("orphan-new")]
        );
        assert_eq!(
            plan(&blobs, &h, &none, 20, 0),
            vec![d("orphan-old"), d("a1"), d("orphan-new"), d("a2")]
        );
        // Room for 10 more bytes is one more eviction; the current item never goes.
        assert_eq!(plan(&blobs, &h, &none, 20, 10).len(), 5);
        assert!(!plan(&blobs, &h, &none, 0, 0).contains(&d("a4")));
        // A blob being read is skipped.
        let busy: HashSet<Digest> = [d("orphan-old")].into_iter().collect();
        assert!(!plan(&blobs, &h, &busy, 30, 0).contains(&d("orphan-old")));
    }
}
