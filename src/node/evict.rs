//! Eviction: which blobs leave the store when it is over its disk budget, and when.
//!
//! Owns the ranking ([`plan`]: blobs in no retained catalog revision go first, least recently
//! read first (edge deltas among them: they are cache), then blobs only the older retained
//! revisions hold, oldest revision first; items of the current revision, the deltas they list
//! and blobs a response is reading are never chosen) and the node's loop that removes what
//! the plan names, through `store`, after every stored blob and catalog change, and with them
//! the records of the edge deltas that went (and the edge deltas whose `to` left the catalog).
//! It must never remove a blob the plan did not name, except an edge delta no client may ask
//! for any more.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::Node;
use crate::core::catalog::CatalogHistory;
use crate::core::digest::Digest;
use crate::store::BlobMeta;

/// The disk the store may use and what the node knows of its filesystem.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// `cache.max_bytes`.
    pub max_bytes: u64,
    /// `cache.high_watermark_percent` and `cache.low_watermark_percent`.
    pub high_percent: u8,
    pub low_percent: u8,
    /// `cache.min_free_bytes`.
    pub min_free_bytes: u64,
}

impl Budget {
    /// The budget `[cache]` sets.
    pub fn of(cache: &crate::core::config::CacheSection) -> Budget {
        Budget {
            max_bytes: cache.max_bytes,
            high_percent: cache.high_watermark_percent,
            low_percent: cache.low_watermark_percent,
            min_free_bytes: cache.min_free_bytes,
        }
    }

    fn share(&self, percent: u8) -> u64 {
        (u128::from(self.max_bytes) * u128::from(percent) / 100) as u64
    }

    /// How many bytes of blobs to get down to, or None when nothing needs to go: with
    /// `total` bytes stored and a blob of `reserve` bytes about to arrive, eviction starts
    /// when they would pass the high watermark and goes down to the low one (room for the
    /// new blob kept), and it takes whatever more it must so that the filesystem, with `free`
    /// bytes free now, keeps `min_free_bytes` after the new blob.
    pub fn target(&self, total: u64, reserve: u64, free: Option<u64>) -> Option<u64> {
        let mut target = None;
        if total.saturating_add(reserve) > self.share(self.high_percent) {
            target = Some(self.share(self.low_percent).saturating_sub(reserve));
        }
        if let Some(free) = free {
            let wanted = self.min_free_bytes.saturating_add(reserve);
            if free < wanted {
                let floor = total.saturating_sub(wanted - free);
                target = Some(target.map_or(floor, |t: u64| t.min(floor)));
            }
        }
        target.filter(|t| *t < total)
    }
}

/// The blobs to remove, in order, so that the store holds at most `target` bytes. It may not
/// get there when the current revision alone is larger: then it names everything it may.
pub fn plan(
    blobs: &[(Digest, BlobMeta)],
    history: &CatalogHistory,
    in_use: &HashSet<Digest>,
    target: u64,
) -> Vec<Digest> {
    let mut total: u64 = blobs.iter().map(|(_, m)| m.size).sum();
    if total <= target {
        return Vec::new();
    }
    // digest -> position of the newest retained revision holding it (higher = newer). An
    // item's listed deltas rank with it.
    let mut newest: HashMap<Digest, usize> = HashMap::new();
    for (i, rev) in history.revisions().enumerate() {
        for item in &rev.catalog.items {
            for (d, _) in item.blobs() {
                newest.insert(d, i);
            }
        }
    }
    let current: HashSet<Digest> = history
        .current()
        .items
        .iter()
        .flat_map(|i| i.blobs().map(|(d, _)| d))
        .collect();
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
    /// The disk budget in force.
    pub(super) fn budget(&self) -> Budget {
        match self.budget.read() {
            Ok(b) => *b,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// Keeps the store within `cache.max_bytes` after every stored blob and catalog change.
    pub(super) async fn evict_loop(self: Arc<Self>) {
        let mut changed = self.catalog_changed.subscribe();
        loop {
            self.drop_stale_deltas().await;
            self.enforce_budget(0).await;
            tokio::select! {
                _ = self.fetches.stored.notified() => {}
                _ = changed.changed() => {}
                _ = tokio::time::sleep(self.sync_interval) => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// Removes the edge deltas whose `to` left the retained catalog, with their records: no
    /// client may ask for them any more.
    async fn drop_stale_deltas(&self) {
        let stale = match self.served.catalog.read() {
            Ok(history) => self.served.deltas.prune(|to| history.contains(to)),
            Err(_) => return,
        };
        let stale = match stale {
            Ok(stale) => stale,
            Err(e) => {
                tracing::warn!(error = %e, "could not prune the delta records");
                return;
            }
        };
        for digest in stale {
            // Never one the catalog lists (a delta an item lists is fetched, not computed),
            // nor one a response reads (it stays an orphan, evicted later).
            let listed = self.served.catalog().is_ok_and(|h| h.contains(&digest));
            if listed || self.served.store.in_use().contains(&digest) {
                continue;
            }
            self.served.hot.remove(&digest);
            match self.served.store.remove(&digest).await {
                Ok(()) => tracing::debug!(%digest, "edge delta removed: its `to` left the catalog"),
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "could not remove a stale edge delta")
                }
            }
        }
    }

    /// Evicts what `evict::plan` names so that `reserve` more bytes fit in the budget and
    /// on the filesystem (see [`Budget::target`]).
    pub(super) async fn enforce_budget(&self, reserve: u64) {
        let store = &self.served.store;
        let budget = self.budget();
        let target = budget.target(store.total_bytes(), reserve, store.free_bytes());
        let victims = match (target, self.served.catalog.read()) {
            (Some(target), Ok(history)) => plan(&store.list(), &history, &store.in_use(), target),
            _ => Vec::new(),
        };
        let before = store.total_bytes();
        let mut evicted = 0usize;
        for digest in victims {
            match store.remove(&digest).await {
                Ok(()) => {
                    // A cached mapping would keep the unlinked file's space until dropped.
                    self.served.hot.remove(&digest);
                    // An edge delta that went is computed again when next asked for.
                    if let Err(e) = self.served.deltas.forget_blob(&digest) {
                        tracing::warn!(%digest, error = %e, "could not drop an evicted delta's record");
                    }
                    evicted += 1;
                    tracing::debug!(%digest, "evicted");
                }
                Err(e) => tracing::warn!(%digest, error = %e, "eviction failed"),
            }
        }
        if evicted > 0 {
            tracing::info!(
                blobs = evicted,
                bytes = before.saturating_sub(store.total_bytes()),
                store_bytes = store.total_bytes(),
                target = target.unwrap_or_default(),
                "evicted down to the low watermark (or to keep cache.min_free_bytes free)"
            );
        }
        if store.total_bytes() > budget.max_bytes {
            tracing::warn!(
                bytes = store.total_bytes(),
                max_bytes = budget.max_bytes,
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
            verified_at: None,
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
        // 60 bytes, target 60: nothing to do.
        assert!(plan(&blobs, &h, &none, 60).is_empty());
        // Target 30: the three orphans (LRU first), then a2 (the oldest retained revision).
        assert_eq!(
            plan(&blobs, &h, &none, 30),
            vec![d("orphan-old"), d("a1"), d("orphan-new")]
        );
        assert_eq!(
            plan(&blobs, &h, &none, 20),
            vec![d("orphan-old"), d("a1"), d("orphan-new"), d("a2")]
        );
        assert_eq!(plan(&blobs, &h, &none, 10).len(), 5);
        // The current item never goes.
        assert!(!plan(&blobs, &h, &none, 0).contains(&d("a4")));
        // A blob being read is skipped.
        let busy: HashSet<Digest> = [d("orphan-old")].into_iter().collect();
        assert!(!plan(&blobs, &h, &busy, 30).contains(&d("orphan-old")));
    }

    #[test]
    fn listed_deltas_rank_with_their_item_and_edge_deltas_go_first() {
        let now = Utc::now();
        let d = |s: &str| Digest::of(s.as_bytes());
        let delta = |from: &str, blob: &str| crate::core::catalog::DeltaRef {
            from_sha256: d(from),
            sha256: d(blob),
            size: 5,
        };
        let mut h = CatalogHistory::new(3);
        h.publish("a", Some("1"), d("a1"), 10, false, now).unwrap();
        h.publish("a", Some("2"), d("a2"), 10, false, now).unwrap();
        h.set_deltas("a", &d("a2"), vec![delta("a1", "a1-a2")])
            .unwrap();
        h.publish("a", Some("3"), d("a3"), 10, false, now).unwrap();
        h.set_deltas("a", &d("a3"), vec![delta("a2", "a2-a3")])
            .unwrap();
        let blobs = vec![
            (d("a2"), meta(10, 100)),
            (d("a1-a2"), meta(5, 100)),
            (d("a3"), meta(10, 100)),
            (d("a2-a3"), meta(5, 100)),
            (d("edge"), meta(5, 1)),
        ];
        let none = HashSet::new();
        let all = plan(&blobs, &h, &none, 0);
        // The edge delta (in no revision) goes first, though read most recently; the current
        // item's delta never goes; the older item's delta ranks with it.
        assert_eq!(all[0], d("edge"));
        assert!(!all.contains(&d("a2-a3")) && !all.contains(&d("a3")));
        assert!(all.contains(&d("a1-a2")) && all.contains(&d("a2")));
    }

    #[test]
    fn eviction_starts_at_the_high_watermark_and_stops_at_the_low_one() {
        let b = Budget {
            max_bytes: 1000,
            high_percent: 95,
            low_percent: 85,
            min_free_bytes: 100,
        };
        let plenty = Some(1 << 30);
        // Below the high watermark nothing goes, even with a blob about to arrive.
        assert_eq!(b.target(900, 0, plenty), None);
        assert_eq!(b.target(900, 50, plenty), None);
        // Past it: down to the low watermark, with room for the arriving blob.
        assert_eq!(b.target(951, 0, plenty), Some(850));
        assert_eq!(b.target(900, 60, plenty), Some(790));
        // So the next blobs arrive without evicting again: 850 + 60 + 40 is still under 950.
        assert_eq!(b.target(850 + 60, 40, plenty), None);
        // A filesystem short of min_free_bytes takes what it lacks, whatever the budget says.
        assert_eq!(b.target(500, 0, Some(40)), Some(440));
        assert_eq!(b.target(500, 10, Some(40)), Some(430));
        assert_eq!(b.target(951, 0, Some(40)), Some(850));
        assert_eq!(b.target(951, 0, Some(0)), Some(850));
        // More than is stored cannot be freed: everything the plan may.
        assert_eq!(b.target(50, 0, Some(0)), Some(0));
        // Unknown free space: the watermarks alone.
        assert_eq!(b.target(500, 0, None), None);
    }
}
