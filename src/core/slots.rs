//! Randomized download slots: when each client may start downloading a catalog revision.
//!
//! Owns the whole slot policy, used by manager and node alike: which `download_slot` a
//! heartbeat reply carries ([`Slots::for_heartbeat`]), and whether a named client asking for
//! a blob at the content door must wait ([`Slots::admit`]). Per (revision, window) the window
//! is split into buckets (one per second up to 600, wider beyond), and each new client gets
//! the less loaded of two random buckets still in the future (the "power of two choices"),
//! then a random moment inside it. A slot is recorded through the caller's [`SlotLog`] the
//! moment it is given, so it is stable across heartbeats and restarts. A client first seen
//! late in the window gets a slot in what remains; after the window there is no slot.
//!
//! The two answers agree: a heartbeat that says `download_slot: null` while the window is
//! open records a pass for that revision, so the door never makes that client wait for it.
//! This module must never read the clock or touch storage itself: callers pass `now` and a
//! [`SlotLog`].

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::catalog::CatalogHistory;
use super::digest::Digest;
use super::fault::{Fault, Kind};
use super::proto::DownloadSlot;
use super::settings::Settings;

/// Most buckets a window is split into.
pub const MAX_BUCKETS: u64 = 600;

/// How many random buckets a new client chooses between.
const CHOICES: usize = 2;

/// A recorded slot: the offset into the window of one revision, or a pass.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlotRecord {
    pub window_s: u64,
    pub offset_ms: u64,
    /// A pass: the client was told it has nothing to wait for in this revision. Not counted
    /// in the balance (no download start is expected at its moment).
    #[serde(default)]
    pub pass: bool,
}

/// Where slots are kept, so that they survive restarts (the caller's storage).
pub trait SlotLog: Send + Sync {
    /// Every record of `revision`, with its client.
    fn load(&self, revision: u64) -> Result<Vec<(String, SlotRecord)>, String>;
    /// Records one client's slot of `revision`.
    fn save(&self, revision: u64, client: &str, record: &SlotRecord) -> Result<(), String>;
    /// Forgets every record of revisions older than `oldest`.
    fn prune(&self, oldest: u64) -> Result<(), String>;
}

/// Why a client may not download now, or why the slot book failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("client {client:?} may download catalog revision {revision} from {}", .not_before.to_rfc3339())]
    BeforeSlot {
        client: String,
        revision: u64,
        not_before: DateTime<Utc>,
        /// Whole seconds until `not_before`, rounded up (at least 1).
        retry_after_s: u64,
    },
    #[error("slot records: {0}")]
    Records(String),
}

impl Fault for SlotError {
    fn kind(&self) -> Kind {
        match self {
            SlotError::BeforeSlot { retry_after_s, .. } => Kind::TooEarly {
                retry_after_s: *retry_after_s,
            },
            SlotError::Records(_) => Kind::Local,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            SlotError::BeforeSlot { .. } => "before_slot",
            SlotError::Records(_) => "slot_records",
        }
    }

    fn details(&self) -> Option<serde_json::Value> {
        match self {
            SlotError::BeforeSlot { not_before, .. } => {
                Some(serde_json::json!({ "not_before": not_before }))
            }
            SlotError::Records(_) => None,
        }
    }
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

    fn record(&mut self, client: String, r: &SlotRecord) {
        if !r.pass {
            let b = ((r.offset_ms / self.bucket_ms) as usize).min(self.counts.len() - 1);
            self.counts[b] += 1;
        }
        self.assigned.insert(client, r.offset_ms);
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
    log: Box<dyn SlotLog>,
    books: Mutex<HashMap<(u64, u64), Book>>,
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

fn at(available_at: DateTime<Utc>, offset_ms: u64) -> DateTime<Utc> {
    available_at + Duration::milliseconds(offset_ms as i64)
}

impl Slots {
    pub fn new(log: Box<dyn SlotLog>) -> Slots {
        Slots {
            log,
            books: Mutex::new(HashMap::new()),
        }
    }

    /// Runs `f` on the book of (revision, window), loaded from the log the first time.
    fn with_book<T>(
        &self,
        revision: u64,
        window_s: u64,
        f: impl FnOnce(&mut Book) -> Result<T, SlotError>,
    ) -> Result<T, SlotError> {
        let mut books = self
            .books
            .lock()
            .map_err(|_| SlotError::Records("slot book lock poisoned".into()))?;
        let book = match books.entry((revision, window_s)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let mut book = Book::new(window_s);
                for (client, r) in self.log.load(revision).map_err(SlotError::Records)? {
                    if r.window_s == window_s {
                        book.record(client, &r);
                    }
                }
                e.insert(book)
            }
        };
        f(book)
    }

    /// The slot `client` already holds for `revision` (a pass counts as a slot at the start
    /// of the window), if any; never assigns one.
    pub fn held(
        &self,
        client: &str,
        revision: u64,
        available_at: DateTime<Utc>,
        window_s: u64,
    ) -> Result<Option<DateTime<Utc>>, SlotError> {
        if window_s == 0 {
            return Ok(None);
        }
        self.with_book(revision, window_s, |book| {
            Ok(book.assigned.get(client).map(|o| at(available_at, *o)))
        })
    }

    /// The moment `client` may start downloading `revision`, which became available at this
    /// server at `available_at` with a randomization window of `window_s`: the slot it holds,
    /// else a new one, recorded. None: no wait (window 0, or first asked after the window).
    pub fn slot(
        &self,
        client: &str,
        revision: u64,
        available_at: DateTime<Utc>,
        window_s: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, SlotError> {
        self.assign(client, revision, available_at, window_s, now, false)
    }

    /// Gives `client` a slot (or, with `pass`, a pass at the window's start) unless it holds
    /// one already; inside the window only.
    fn assign(
        &self,
        client: &str,
        revision: u64,
        available_at: DateTime<Utc>,
        window_s: u64,
        now: DateTime<Utc>,
        pass: bool,
    ) -> Result<Option<DateTime<Utc>>, SlotError> {
        if window_s == 0 {
            return Ok(None);
        }
        self.with_book(revision, window_s, |book| {
            let elapsed_ms = (now - available_at).num_milliseconds().max(0) as u64;
            if let Some(&offset) = book.assigned.get(client) {
                // A pass replaces a slot still ahead: the client was just told it has nothing
                // to wait for, and the door must agree.
                if !(pass && offset > elapsed_ms) {
                    return Ok(Some(at(available_at, offset)));
                }
                let b = ((offset / book.bucket_ms) as usize).min(book.counts.len() - 1);
                book.counts[b] = book.counts[b].saturating_sub(1);
            } else if elapsed_ms >= window_s.saturating_mul(1000) {
                return Ok(None);
            }
            let offset_ms = if pass {
                0
            } else {
                book.choose(elapsed_ms, &mut rand::rng())
            };
            let record = SlotRecord {
                window_s,
                offset_ms,
                pass,
            };
            self.log
                .save(revision, client, &record)
                .map_err(SlotError::Records)?;
            book.record(client.to_string(), &record);
            Ok(Some(at(available_at, offset_ms)))
        })
    }

    /// The `download_slot` of a heartbeat reply, for a client with effective `settings` that
    /// reports it holds catalog revision `reported`: the slot of the current revision when
    /// randomization is on, the client lacks some item of it that is not urgent, and the
    /// window has not passed; else None. A None while the window is open is recorded as a
    /// pass, so [`Slots::admit`] lets the client download that revision at once.
    pub fn for_heartbeat(
        &self,
        client: &str,
        reported: Option<u64>,
        settings: &Settings,
        history: &CatalogHistory,
        now: DateTime<Utc>,
    ) -> Result<Option<DownloadSlot>, SlotError> {
        let window_s = settings.randomization.window_s;
        if !settings.randomization.enabled || window_s == 0 {
            return Ok(None);
        }
        let Some(current) = history.revisions().last() else {
            return Ok(None);
        };
        let revision = current.catalog.revision;
        let known: HashSet<Digest> = history
            .revisions()
            .find(|r| Some(r.catalog.revision) == reported)
            .map(|r| r.catalog.items.iter().map(|i| i.sha256).collect())
            .unwrap_or_default();
        let waits = reported != Some(revision)
            && current
                .catalog
                .items
                .iter()
                .any(|i| !known.contains(&i.sha256) && !i.urgent);
        if !waits {
            self.assign(client, revision, current.available_at, window_s, now, true)?;
            return Ok(None);
        }
        let slot = self.slot(client, revision, current.available_at, window_s, now)?;
        Ok(slot.map(|not_before| DownloadSlot {
            catalog_revision: revision,
            not_before,
            delay_s: secs_until(not_before, now),
            window_s,
        }))
    }

    /// Whether `client`, with effective `settings`, may download `digest` now. A blob in
    /// several retained revisions uses the earliest one's slot the client holds (a client
    /// given a slot for an older revision keeps it; one that heard of the blob only with a
    /// newer revision waits for that revision's slot, as its heartbeat said); a client that
    /// holds none (it never sent a heartbeat here) gets one for the earliest revision on its
    /// first request. An urgent item never waits.
    pub fn admit(
        &self,
        client: &str,
        digest: &Digest,
        settings: &Settings,
        history: &CatalogHistory,
        now: DateTime<Utc>,
    ) -> Result<(), SlotError> {
        let window_s = settings.randomization.window_s;
        if !settings.randomization.enabled || window_s == 0 {
            return Ok(());
        }
        // (revision, available_at) of every retained revision holding the blob, oldest first.
        let mut holding = Vec::new();
        for rev in history.revisions() {
            if let Some(item) = rev.catalog.items.iter().find(|i| &i.sha256 == digest) {
                if item.urgent {
                    return Ok(());
                }
                holding.push((rev.catalog.revision, rev.available_at));
            }
        }
        let Some(&(first_rev, first_at)) = holding.first() else {
            return Ok(());
        };
        let mut found = None;
        for (rev, available_at) in &holding {
            if let Some(t) = self.held(client, *rev, *available_at, window_s)? {
                found = Some((*rev, t));
                break;
            }
        }
        let (revision, slot) = match found {
            Some((rev, t)) => (rev, Some(t)),
            None => (
                first_rev,
                self.slot(client, first_rev, first_at, window_s, now)?,
            ),
        };
        match slot {
            Some(t) if t > now => Err(SlotError::BeforeSlot {
                client: client.to_string(),
                revision,
                not_before: t,
                retry_after_s: secs_until(t, now).max(1),
            }),
            _ => Ok(()),
        }
    }

    /// Forgets the books of revisions older than `oldest` (no longer retained).
    pub fn prune(&self, oldest: u64) -> Result<(), SlotError> {
        if let Ok(mut books) = self.books.lock() {
            books.retain(|(rev, _), _| *rev >= oldest);
        }
        self.log.prune(oldest).map_err(SlotError::Records)
    }
}

#[cfg(test)]
#[path = "slots_tests.rs"]
mod tests;
