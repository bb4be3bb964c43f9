//! Randomized download slots: when each client may start downloading a catalog revision.
//!
//! Owns the whole slot policy, used by manager and node alike: which `download_slot` a
//! heartbeat reply carries ([`Slots::for_heartbeat`]), whether a named client asking for a
//! blob at the content door must wait ([`Slots::admit`]), and the slots nodes take from their
//! upstream for their prefetch (the same book, keyed by node id). Per (revision, window) the
//! window is split into buckets (one per second up to 600, wider beyond). A new client takes
//! the earliest bucket still ahead that is below the fill level, the level being the clients
//! this server expects over the buckets (its census: the clients that asked it lately, see
//! [`Slots::note`]); once every bucket ahead is at that level, the earliest of the least
//! loaded. Inside its bucket the client's moment is the next point of a van der Corput
//! sequence, so that the moments of every bucket spread evenly and any one-second interval,
//! aligned or not, holds close to the mean. A slot is recorded through the caller's
//! [`SlotLog`] the moment it is given, so it is stable across heartbeats and restarts. A
//! client first seen late gets a slot in what remains; after the window there is no slot.
//!
//! The two answers agree: a heartbeat that says `download_slot: null` while the window is
//! open records a pass for that revision, so the door never makes that client wait for it.
//! This module must never read the clock or touch storage itself: callers pass `now` and a
//! [`SlotLog`].

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};

use super::catalog::CatalogHistory;
use super::digest::Digest;
use super::fault::{Fault, Kind};
use super::proto::DownloadSlot;
use super::settings::Settings;

/// Most buckets a window is split into.
pub const MAX_BUCKETS: u64 = 600;

/// Most clients the census keeps (about 100 bytes each): beyond it, clients not yet counted
/// are not added until expired ones are swept (the expected count is then a lower bound).
pub const MAX_CENSUS: usize = 200_000;

/// A client counts in the census for this many of its heartbeat intervals after it asked.
pub const CENSUS_INTERVALS: i64 = 3;

/// A node counts in its upstream's census of prefetch slots for this long after it asked
/// (nodes ask once per revision, not every heartbeat).
pub const NODE_CENSUS_S: i64 = 7 * 24 * 3600;

/// The longest prefetch window a node may ask for (`upstream.prefetch_window_s`).
pub const MAX_PREFETCH_WINDOW_S: u64 = 86_400;

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
    /// Slots per bucket (passes not counted): the balance.
    counts: Vec<u32>,
    /// Moments handed out per bucket, passes replaced included: the index of the next point
    /// of the bucket's low-discrepancy sequence.
    placed: Vec<u32>,
    /// Clients this server expects to ask in this window (its census when the book opened).
    expected: usize,
    /// Where every bucket's sequence starts, in `[0, 1)`: the same for all buckets of a book
    /// (so that their moments stay evenly spread across bucket edges), different per revision
    /// and the same after a restart.
    phase: f64,
    /// Each client's offset, and whether it is a pass.
    assigned: HashMap<String, (u64, bool)>,
}

/// The `i`-th point of the base-2 van der Corput sequence, in `[0, 1)`: every prefix of the
/// sequence is spread evenly over the interval.
fn van_der_corput(i: u32) -> f64 {
    i.reverse_bits() as f64 / (1u64 << 32) as f64
}

impl Book {
    fn new(revision: u64, window_s: u64, expected: usize) -> Book {
        let buckets = window_s.clamp(1, MAX_BUCKETS);
        // The golden ratio's fractional part: successive revisions' phases spread evenly.
        let phase = (revision as f64 * 0.618_033_988_749_895).fract();
        Book {
            bucket_ms: (window_s * 1000 / buckets).max(1),
            counts: vec![0; buckets as usize],
            placed: vec![0; buckets as usize],
            expected,
            phase,
            assigned: HashMap::new(),
        }
    }

    fn bucket_of(&self, offset_ms: u64) -> usize {
        ((offset_ms / self.bucket_ms) as usize).min(self.counts.len() - 1)
    }

    fn record(&mut self, client: String, r: &SlotRecord) {
        if !r.pass {
            let b = self.bucket_of(r.offset_ms);
            self.counts[b] += 1;
            self.placed[b] += 1;
        }
        self.assigned.insert(client, (r.offset_ms, r.pass));
    }

    /// A new offset for a client arriving `elapsed_ms` into the window: the earliest bucket
    /// that starts at or after `elapsed_ms` and is below the fill level (the expected clients
    /// over the buckets, or one more than the least loaded bucket ahead once they are all
    /// there), at the bucket's next evenly spread moment. In the last bucket, not before
    /// `elapsed_ms`.
    fn choose(&self, elapsed_ms: u64) -> u64 {
        let n = self.counts.len();
        let first = (elapsed_ms.div_ceil(self.bucket_ms) as usize).min(n - 1);
        let ahead = &self.counts[first..];
        let least = ahead.iter().copied().min().unwrap_or(0);
        let level = (self.expected.div_ceil(n) as u32).max(least + 1);
        let b = first + ahead.iter().position(|c| *c < level).unwrap_or(0);
        let j = self.placed[b];
        let point = (van_der_corput(j) + self.phase).fract();
        let inside = ((self.bucket_ms as f64 * point) as u64).min(self.bucket_ms - 1);
        (b as u64 * self.bucket_ms + inside).max(elapsed_ms)
    }
}

/// The clients a server expects: who asked it lately, with the window their settings give
/// and until when they count (a few heartbeat intervals after they last asked).
#[derive(Default)]
struct Census {
    seen: HashMap<String, (u64, DateTime<Utc>)>,
}

impl Census {
    fn note(&mut self, client: &str, window_s: u64, until: DateTime<Utc>, now: DateTime<Utc>) {
        if let Some(entry) = self.seen.get_mut(client) {
            *entry = (window_s, until);
            return;
        }
        if self.seen.len() >= MAX_CENSUS {
            self.seen.retain(|_, (_, u)| *u > now);
            if self.seen.len() >= MAX_CENSUS {
                return;
            }
        }
        self.seen.insert(client.to_string(), (window_s, until));
    }

    fn expected(&self, window_s: u64, now: DateTime<Utc>) -> usize {
        self.seen
            .values()
            .filter(|(w, until)| *w == window_s && *until > now)
            .count()
    }
}

/// The slot book of one server.
pub struct Slots {
    log: Box<dyn SlotLog>,
    books: Mutex<HashMap<(u64, u64), Book>>,
    census: Mutex<Census>,
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

/// The most starts in any one-second interval (sliding, not aligned to buckets) over the
/// mean starts per second across a window of `window_s` (the span of the starts, at least one
/// second, when `window_s` is 0). `offsets_s` are the starts in seconds from the window's
/// start, in any order; 0.0 when there are none.
pub fn sliding_peak_to_mean(offsets_s: &[f64], window_s: f64) -> f64 {
    let mut t: Vec<f64> = offsets_s
        .iter()
        .copied()
        .filter(|o| o.is_finite())
        .collect();
    if t.is_empty() {
        return 0.0;
    }
    t.sort_by(f64::total_cmp);
    // The busiest interval can always be slid right until its left edge is a start.
    let mut peak = 0;
    let mut end = 0;
    for (i, left) in t.iter().enumerate() {
        while end < t.len() && t[end] < left + 1.0 {
            end += 1;
        }
        peak = peak.max(end - i);
    }
    let span = if window_s > 0.0 {
        window_s
    } else {
        (t[t.len() - 1] - t[0]).max(1.0)
    };
    peak as f64 / (t.len() as f64 / span.max(1.0))
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
            census: Mutex::new(Census::default()),
        }
    }

    /// Counts `client` among those expected in windows of `window_s` until `until` (callers:
    /// a few heartbeat intervals from now). A book opened while it counts fills its buckets
    /// up to the expected clients over the buckets, earliest first.
    pub fn note(&self, client: &str, window_s: u64, until: DateTime<Utc>, now: DateTime<Utc>) {
        if let Ok(mut census) = self.census.lock() {
            census.note(client, window_s, until, now);
        }
    }

    /// Runs `f` on the book of (revision, window), loaded from the log the first time.
    fn with_book<T>(
        &self,
        revision: u64,
        window_s: u64,
        now: DateTime<Utc>,
        f: impl FnOnce(&mut Book) -> Result<T, SlotError>,
    ) -> Result<T, SlotError> {
        let mut books = self
            .books
            .lock()
            .map_err(|_| SlotError::Records("slot book lock poisoned".into()))?;
        let book = match books.entry((revision, window_s)) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                // Counted once, when the book opens: the clients expected over its window.
                let expected = self
                    .census
                    .lock()
                    .map(|c| c.expected(window_s, now))
                    .unwrap_or(0);
                let mut book = Book::new(revision, window_s, expected);
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

    /// The slot `client` already holds for `revision`, if any (a pass counts as a slot that
    /// has begun: the window's start, or `now` while the window has not started, as on a node
    /// waiting for its prefetch slot); never assigns one.
    pub fn held(
        &self,
        client: &str,
        revision: u64,
        available_at: DateTime<Utc>,
        window_s: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, SlotError> {
        if window_s == 0 {
            return Ok(None);
        }
        self.with_book(revision, window_s, now, |book| {
            Ok(book.assigned.get(client).map(|(offset, pass)| {
                if *pass {
                    available_at.min(now)
                } else {
                    at(available_at, *offset)
                }
            }))
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
        self.with_book(revision, window_s, now, |book| {
            let elapsed_ms = (now - available_at).num_milliseconds().max(0) as u64;
            if let Some(&(offset, _)) = book.assigned.get(client) {
                // A pass replaces a slot still ahead: the client was just told it has nothing
                // to wait for, and the door must agree.
                if !(pass && offset > elapsed_ms) {
                    return Ok(Some(at(available_at, offset)));
                }
                let b = book.bucket_of(offset);
                book.counts[b] = book.counts[b].saturating_sub(1);
            } else if elapsed_ms >= window_s.saturating_mul(1000) {
                return Ok(None);
            }
            let offset_ms = if pass { 0 } else { book.choose(elapsed_ms) };
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
        let interval_s = i64::try_from(settings.heartbeat_interval_s).unwrap_or(i64::MAX / 4);
        let until = now + Duration::seconds(interval_s.saturating_mul(CENSUS_INTERVALS));
        self.note(client, window_s, until, now);
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
        // A revision that only lists deltas keeps the slots of the ones it amends: a client
        // given one there keeps it (the door, `admit`, uses the earliest revision's too).
        let mut kept = None;
        for earlier in history
            .revisions()
            .rev()
            .skip(1)
            .take_while(|r| current.catalog.only_deltas_differ(&r.catalog))
        {
            let (rev, at) = (earlier.catalog.revision, earlier.available_at);
            if let Some(t) = self.held(client, rev, at, window_s, now)? {
                kept = Some(t);
            }
        }
        let slot = match kept {
            Some(t) => (t > now).then_some(t),
            None => self.slot(client, revision, current.available_at, window_s, now)?,
        };
        Ok(slot.map(|not_before| DownloadSlot {
            catalog_revision: revision,
            not_before,
            delay_s: secs_until(not_before, now),
            window_s,
            window_start: current.available_at,
        }))
    }

    /// The slot of node `node` for prefetching `revision` within `window_s` (the node's
    /// `upstream.prefetch_window_s`, at most [`MAX_PREFETCH_WINDOW_S`]): a slot from the same
    /// balancer, in a book of its own (the caller keeps one [`Slots`] for nodes). None: go at
    /// once (window 0, a revision this server no longer or not yet holds, or the window has
    /// passed).
    pub fn for_prefetch(
        &self,
        node: &str,
        revision: u64,
        window_s: u64,
        history: &CatalogHistory,
        now: DateTime<Utc>,
    ) -> Result<Option<DownloadSlot>, SlotError> {
        let window_s = window_s.min(MAX_PREFETCH_WINDOW_S);
        if window_s == 0 {
            return Ok(None);
        }
        self.note(node, window_s, now + Duration::seconds(NODE_CENSUS_S), now);
        let Some(rev) = history.revisions().find(|r| r.catalog.revision == revision) else {
            return Ok(None);
        };
        let slot = self.slot(node, revision, rev.available_at, window_s, now)?;
        Ok(slot.map(|not_before| DownloadSlot {
            catalog_revision: revision,
            not_before,
            delay_s: secs_until(not_before, now),
            window_s,
            window_start: rev.available_at,
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
        // A listed delta waits for the slot of the item it rebuilds, as that item would.
        let digest = match history.find(digest) {
            Some(_) => digest,
            None => history
                .find_delta(digest)
                .map_or(digest, |(_, item, _)| &item.sha256),
        };
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
            if let Some(t) = self.held(client, *rev, *available_at, window_s, now)? {
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
