//! Hot blobs: often-read verified blobs kept ready to send, so that a request for one costs no
//! file open, no read and no thread hand-off. Small ones are copies in memory; larger ones
//! are read-only mappings (page cache, sent with sendfile by `zerocopy`).
//!
//! Owns a cache bounded by bytes (`cache.memory_bytes`), admitting blobs up to
//! `cache.memory_item_max_bytes`, least-recently/frequently used out first (quick_cache's
//! CLOCK-Pro, which keeps one scan of cold blobs from flushing the hot ones). It is filled only
//! by `serve` with bytes the store handed out, which are verified by construction; it must
//! never hold bytes of a fetch still running, and it is never the source of truth: losing an
//! entry only costs one read from the store.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use quick_cache::sync::Cache;

use crate::core::digest::Digest;

/// Weighs an entry by its body length (at least 1, so empty blobs still count).
#[derive(Clone)]
struct ByLength;

/// A body with the `stored_at` of the blob it was read from: a copy is good only while the
/// store still holds that very blob (not one stored again since, after the scrub found it
/// rotten, say).
type Entry = (Bytes, DateTime<Utc>);

impl quick_cache::Weighter<Digest, Entry> for ByLength {
    fn weight(&self, _: &Digest, entry: &Entry) -> u64 {
        (entry.0.len() as u64).max(1)
    }
}

/// The hot-blob cache of one server. Cheap to share behind an `Arc`.
pub struct HotBlobs {
    /// None when `capacity` is 0: the cache is off.
    cache: Option<Cache<Digest, Entry, ByLength>>,
    item_max: u64,
}

impl HotBlobs {
    /// A cache of at most `capacity` bytes of bodies, each at most `item_max` bytes.
    /// `capacity == 0` turns it off.
    pub fn new(capacity: u64, item_max: u64) -> HotBlobs {
        let cache = (capacity > 0 && item_max > 0).then(|| {
            // The estimate only sizes the hash tables; assume blobs of about 16 KiB.
            let estimated = (capacity / (16 << 10)).clamp(16, 1 << 20) as usize;
            Cache::with_weighter(estimated, capacity, ByLength)
        });
        HotBlobs { cache, item_max }
    }

    /// The largest body the cache admits (0 when off).
    pub fn item_max(&self) -> u64 {
        if self.cache.is_some() {
            self.item_max
        } else {
            0
        }
    }

    /// The body of `digest` and the `stored_at` of the blob it came from, when it is hot.
    /// The caller serves it only if the store still holds a blob of that `stored_at`.
    pub fn get(&self, digest: &Digest) -> Option<Entry> {
        self.cache.as_ref()?.get(digest)
    }

    /// Offers a body read from the store's blob stored at `stored_at`; kept when small
    /// enough. The caller guarantees `body` is the whole blob `digest`.
    pub fn offer(&self, digest: Digest, body: &Bytes, stored_at: DateTime<Utc>) {
        if let Some(cache) = &self.cache {
            if body.len() as u64 <= self.item_max {
                cache.insert(digest, (body.clone(), stored_at));
            }
        }
    }

    /// Forgets `digest` (its blob left the store).
    pub fn remove(&self, digest: &Digest) {
        if let Some(cache) = &self.cache {
            cache.remove(digest);
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.cache.as_ref().map(|c| c.weight()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        let hex = format!("{n:02x}").repeat(32);
        hex.parse().expect("a valid digest")
    }

    #[test]
    fn keeps_small_bodies_and_refuses_big_ones() {
        let hot = HotBlobs::new(1 << 20, 1000);
        hot.offer(digest(1), &Bytes::from(vec![7u8; 1000]), Utc::now());
        hot.offer(digest(2), &Bytes::from(vec![7u8; 1001]), Utc::now());
        assert_eq!(hot.get(&digest(1)).map(|b| b.0.len()), Some(1000));
        assert!(hot.get(&digest(2)).is_none());
        assert_eq!(hot.item_max(), 1000);
    }

    #[test]
    fn stays_within_its_byte_budget() {
        let capacity = 64 << 10;
        let hot = HotBlobs::new(capacity, 4 << 10);
        for n in 0..100u8 {
            hot.offer(digest(n), &Bytes::from(vec![n; 4 << 10]), Utc::now());
            assert!(hot.bytes() <= capacity, "holds {} bytes", hot.bytes());
        }
        let kept = (0..100u8)
            .filter(|n| hot.get(&digest(*n)).is_some())
            .count();
        assert!(kept > 0 && kept <= 16, "kept {kept} of 100");
        // What it returns is what was offered.
        for n in 0..100u8 {
            if let Some((b, _)) = hot.get(&digest(n)) {
                assert!(b.iter().all(|x| *x == n));
            }
        }
    }

    #[test]
    fn zero_capacity_is_off() {
        let hot = HotBlobs::new(0, 1000);
        hot.offer(digest(1), &Bytes::from_static(b"x"), Utc::now());
        assert!(hot.get(&digest(1)).is_none());
        assert_eq!(hot.item_max(), 0);
        assert_eq!(hot.bytes(), 0);
    }
}
