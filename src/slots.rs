//! Randomized download slots: when each client may start downloading a catalog revision.
//!
//! Owns the assignment of slots, used by manager and node alike: per (revision, window) the
//! window is split into buckets (one per second up to 600, wider beyond), and each new client
//! gets the less loaded of two random buckets still in the future (the "power of two choices"),
//! then a random moment inside it. Starts are thus near-even over the window instead of the
//! clumps that each client picking its own time gives. A slot is persisted the moment it is
//! given (`store::Kv`), so it is stable across heartbeats and restarts. A client first seen
//! late in the window gets a slot in what remains; after the window there is no slot (download
//! at once). This module must never read the clock: callers pass `now`, so that tests drive
//! time (paused tokio time) and every server decides with one instant per request.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::store::{Kv, StoreError};

/// Most buckets a window is split into.
pub const MAX_BUCKETS: u64 = 600;

/// How many random buckets a new client chooses between.
const CHOICES: usize = 2;

/// A persisted slot: the offset into the window of one revision.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Stored {
    window_s: u64,
    offset_ms: u64,
}

/// The assignments of one (revision, window).
struct Book {
    bucket_ms: u64,
    counts: Vec<u32>,
    assigned: HashMap<String, u64>,
}

impl Book {
    fn new(window_s: u64) -> Book {
        let buckets = window_s.clamp(1, MAX_BUCKETS);
        Book {
            bucket_ms: (window_s * 1000 / buckets).max(1),
            counts: vec![0; buckets as usize],
            assigned: HashMap::new(),
        }
    }

    fn record(&mut self, client: String, offset_ms: u64) {
        let b = ((offset_ms / self.bucket_ms) as usize).min(self.counts.len() - 1);
        self.counts[b] += 1;
        self.assigned.insert(client, offset_ms);
    }

    /// A new offset for a client arriving `elapsed_ms` into the window.
    fn choose(&self, elapsed_ms: u64, rng: &mut impl Rng) -> u64 {
        let n = self.counts.len();
        let first = ((elapsed_ms / self.bucket_ms) as usize).min(n - 1);
        let mut best = first + rng.random_range(0..n - first);
        for _ in 1..CHOICES {
            let other = first + rng.random_range(0..n - first);
            if self.counts[other] < self.counts[best] {
                best = other;
            }
        }
        let start = best as u64 * self.bucket_ms;
        let offset = start + rng.random_range(0..self.bucket_ms);
        offset.max(elapsed_ms)
    }
}

/// The slot book of one server.
pub struct Slots {
    kv: Kv,
    books: Mutex<HashMap<(u64, u64), Book>>,
}

fn key(revision: u64, client: &str) -> String {
    format!("{revision:020}/{client}")
}

impl Slots {
    pub fn new(kv: Kv) -> Slots {
        Slots {
            kv,
            books: Mutex::new(HashMap::new()),
        }
    }

    /// Loads the book of (revision, window) from disk the first time it is needed.
    fn load(&self, revision: u64, window_s: u64) -> Result<Book, StoreError> {
        let mut book = Book::new(window_s);
        for (k, v) in self.kv.scan::<Stored>(&format!("{revision:020}/"))? {
            if v.window_s == window_s {
                if let Some((_, client)) = k.split_once('/') {
                    book.record(client.to_string(), v.offset_ms);
                }
            }
        }
        Ok(book)
    }

    /// The book of (revision, window), loaded from disk the first time.
    fn book<'a>(
        &self,
        books: &'a mut HashMap<(u64, u64), Book>,
        revision: u64,
        window_s: u64,
    ) -> Result<&'a mut Book, StoreError> {
        Ok(match books.entry((revision, window_s)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(self.load(revision, window_s)?)
            }
        })
    }

    /// The slot `client` already holds for `revision`, if any (never assigns one).
    pub fn held(
        &self,
        client: &str,
        revision: u64,
        available_at: DateTime<Utc>,
        window_s: u64,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        if window_s == 0 {
            return Ok(None);
        }
        let mut books = self
            .books
            .lock()
            .map_err(|_| StoreError::Join("slot book lock poisoned".into()))?;
        let book = self.book(&mut books, revision, window_s)?;
        Ok(book
            .assigned
            .get(client)
            .map(|offset| available_at + Duration::milliseconds(*offset as i64)))
    }

    /// The moment `client` may start downloading `revision`, which became available at this
    /// server at `available_at` with a randomization window of `window_s`. None: no wait
    /// (window 0, or the client first asks after the window).
    pub fn slot(
        &self,
        client: &str,
        revision: u64,
        available_at: DateTime<Utc>,
        window_s: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, StoreError> {
        if window_s == 0 {
            return Ok(None);
        }
        let mut books = self
            .books
            .lock()
            .map_err(|_| StoreError::Join("slot book lock poisoned".into()))?;
        let book = self.book(&mut books, revision, window_s)?;
        if let Some(offset) = book.assigned.get(client) {
            return Ok(Some(available_at + Duration::milliseconds(*offset as i64)));
        }
        let elapsed_ms = (now - available_at).num_milliseconds().max(0) as u64;
        if elapsed_ms >= window_s * 1000 {
            return Ok(None);
        }
        let offset = book.choose(elapsed_ms, &mut rand::rng());
        self.kv.put(
            &key(revision, client),
            &Stored {
                window_s,
                offset_ms: offset,
            },
        )?;
        book.record(client.to_string(), offset);
        Ok(Some(available_at + Duration::milliseconds(offset as i64)))
    }

    /// Forgets the books of revisions older than `oldest` (no longer retained).
    pub fn prune(&self, oldest: u64) -> Result<(), StoreError> {
        if let Ok(mut books) = self.books.lock() {
            books.retain(|(rev, _), _| *rev >= oldest);
        }
        for (k, _) in self.kv.scan::<Stored>("")? {
            let rev: u64 = k
                .split('/')
                .next()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
            if rev < oldest {
                self.kv.remove(&k)?;
            }
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), StoreError> {
        self.kv.flush().await
    }
}

/// Whole seconds from `now` until `t`, rounded up (0 when `t` has passed).
pub fn secs_until(t: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
    let ms = (t - now).num_milliseconds();
    if ms <= 0 {
        0
    } else {
        (ms as u64).div_ceil(1000)
    }
}

/// Peak over mean of `counts` (0 when empty).
pub fn peak_to_mean(counts: &[u32]) -> f64 {
    let total: u64 = counts.iter().map(|c| *c as u64).sum();
    if counts.is_empty() || total == 0 {
        return 0.0;
    }
    let mean = total as f64 / counts.len() as f64;
    counts.iter().copied().max().unwrap_or(0) as f64 / mean
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    /// Wall time driven by tokio's (paused) clock, from a fixed origin.
    fn now(origin: DateTime<Utc>, start: tokio::time::Instant) -> DateTime<Utc> {
        origin + Duration::from_std(tokio::time::Instant::now() - start).unwrap()
    }

    fn open(dir: &std::path::Path) -> (Store, Slots) {
        let store = Store::open(dir).unwrap();
        let slots = Slots::new(store.kv("slots").unwrap());
        (store, slots)
    }

    #[tokio::test(start_paused = true)]
    async fn stable_across_heartbeats_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let origin = Utc::now();
        let t0 = tokio::time::Instant::now();
        let available = origin;
        let first = {
            let (store, slots) = open(dir.path());
            let a = slots
                .slot("pc-1", 7, available, 60, now(origin, t0))
                .unwrap()
                .unwrap();
            tokio::time::advance(std::time::Duration::from_secs(5)).await;
            let b = slots
                .slot("pc-1", 7, available, 60, now(origin, t0))
                .unwrap()
                .unwrap();
            assert_eq!(a, b, "same slot at the next heartbeat");
            assert!(a >= available && a < available + Duration::seconds(60));
            slots.flush().await.unwrap();
            drop(slots);
            drop(store);
            a
        };
        tokio::time::advance(std::time::Duration::from_secs(30)).await;
        let (_store, slots) = open(dir.path());
        let again = slots
            .slot("pc-1", 7, available, 60, now(origin, t0))
            .unwrap()
            .unwrap();
        assert_eq!(first, again, "same slot after a restart");
        // Another revision is another slot.
        assert!(slots
            .slot("pc-1", 8, available, 60, now(origin, t0))
            .unwrap()
            .is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn late_arrivals_get_what_remains_and_none_after_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, slots) = open(dir.path());
        let origin = Utc::now();
        let t0 = tokio::time::Instant::now();
        tokio::time::advance(std::time::Duration::from_secs(45)).await;
        for i in 0..200 {
            let t = now(origin, t0);
            let s = slots
                .slot(&format!("late-{i}"), 1, origin, 60, t)
                .unwrap()
                .unwrap();
            assert!(s >= t, "never in the past");
            assert!(s < origin + Duration::seconds(60), "inside the window");
        }
        tokio::time::advance(std::time::Duration::from_secs(15)).await;
        assert_eq!(
            slots.slot("after", 1, origin, 60, now(origin, t0)).unwrap(),
            None
        );
        // Window 0: randomization effectively off.
        assert_eq!(
            slots.slot("x", 2, origin, 0, now(origin, t0)).unwrap(),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn balanced_better_than_chance() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, slots) = open(dir.path());
        let origin = Utc::now();
        let t0 = tokio::time::Instant::now();
        let mut counts = vec![0u32; 60];
        for i in 0..3000 {
            let s = slots
                .slot(&format!("c{i}"), 1, origin, 60, now(origin, t0))
                .unwrap()
                .unwrap();
            counts[((s - origin).num_milliseconds() / 1000) as usize] += 1;
        }
        let p = peak_to_mean(&counts);
        assert!(p <= 1.15, "peak/mean {p}");
    }

    #[tokio::test]
    async fn prune_forgets_old_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, slots) = open(dir.path());
        let t = Utc::now();
        slots.slot("a", 1, t, 60, t).unwrap();
        slots.slot("a", 2, t, 60, t).unwrap();
        slots.prune(2).unwrap();
        assert_eq!(slots.held("a", 1, t, 60).unwrap(), None);
        assert!(slots.held("a", 2, t, 60).unwrap().is_some());
    }

    #[test]
    fn rounding() {
        let t = Utc::now();
        assert_eq!(secs_until(t, t), 0);
        assert_eq!(secs_until(t + Duration::milliseconds(1), t), 1);
        assert_eq!(secs_until(t + Duration::milliseconds(1001), t), 2);
        assert_eq!(secs_until(t - Duration::seconds(3), t), 0);
        assert_eq!(peak_to_mean(&[1, 1, 2]), 1.5);
        assert_eq!(peak_to_mean(&[]), 0.0);
    }
}
