//! The manager's event records.
//!
//! Owns each event stored once per (client_id, id, content) under the group its client was
//! placed in and the paged queries over them; the notifications critical events raise are
//! `notices`' (planned into the same step here). All event data lives in one tree,
//! [`LOG_TREE`], so that an event's
//! record, its dedupe key, its index entries and the conflict count are written in one
//! atomic batch, and the notifications it raises or counts in the same step
//! ([`EventStore::accept`], one transaction over both trees): after any crash all of them
//! are there or none, so an acknowledged event is never lost, a re-sent one is never stored
//! twice, and a notification counts exactly the stored critical events.
//!
//! An id re-sent with other content (kind, subkind, time as an instant, or data) is a
//! **conflict**: stored as a record of its own whose `conflict_of` is the seq of the id's
//! first record, counted (`s/conflicts`, the `gup_event_conflicts_total` metric), and
//! notified like any event; the same conflicting content again is stored once. There is no
//! bound per id: any cap would let whoever fills it first hide the real event again (the
//! pre-sent-ids attack of issue 16), and a refusal would stall a node, which keeps a
//! refused batch queued. Conflicts are bounded as every event is: each is one event of an
//! upload within the 1 MiB body limit, and detecting one costs one key lookup however many
//! variants an id has.
//!
//! | key | value |
//! |---|---|
//! | `r/{seq:020}` | the [`StoredEvent`] |
//! | `i/{client}\0{id}` | the seq of the id's first record: the dedupe key |
//! | `x/{client}\0{id}\0{content sha256}` | the seq of a conflict with that content |
//! | `s/conflicts` | how many conflicts are stored |
//! | `s/expired_through` | the greatest seq retention deleted (`retention`): seqs continue after it |
//! | `c/{client}\0{seq:020}`, `g/{group}\0{seq:020}`, `k/{kind}\0{seq:020}` | the event's time, so `since` needs no record |
//! | `t/{seq:020}` | the event's time: a `since` alone walks these small entries, not the records |
//!
//! Notifications live in [`NOTICES_TREE`] (see `notices`). Free text in a key is escaped
//! (`page::part`).
//! Nothing is loaded whole: the next seq is the last record's at open (or after the last
//! one retention deleted), a query walks the
//! most selective index it is given and visits at most [`SCAN_LIMIT`] entries. Persistence
//! is through `store::Kv`. It must never decide where a client belongs.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};

use super::page::{self, part, seq_after, seq_part, BadLimit, DEFAULT_LIMIT, MAX_LIMIT};
use crate::core::digest::Digest;
use crate::core::fault::{Fault, Internal, Kind};
use crate::core::proto::{Event, EventUpload, Placement};
use crate::store::{Batch, Kv, Store, StoreError};

pub(super) use super::notices::put_notice;
pub use super::notices::{
    deliver_webhook, AckError, AckedAll, NoticePage, NoticeQuery, Notification,
};
pub use super::page::SCAN_LIMIT;

/// The one tree of event records, dedupe keys and index entries.
pub const LOG_TREE: &str = "event_log";
/// The tree of admin notifications.
pub const NOTICES_TREE: &str = "notices";

/// What can go wrong with the event records.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error(transparent)]
    Limit(#[from] BadLimit),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Internal(#[from] Internal),
    #[error(transparent)]
    Ack(#[from] AckError),
}

impl Fault for EventsError {
    fn kind(&self) -> Kind {
        match self {
            EventsError::Limit(e) => e.kind(),
            EventsError::Store(e) => e.kind(),
            EventsError::Internal(e) => e.kind(),
            EventsError::Ack(e) => e.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            EventsError::Limit(e) => e.code(),
            EventsError::Store(e) => e.code(),
            EventsError::Internal(e) => e.code(),
            EventsError::Ack(e) => e.code(),
        }
    }
}

/// An event as the manager keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StoredEvent {
    pub id: String,
    pub client_id: String,
    pub group: String,
    pub location: Option<String>,
    pub kind: String,
    pub subkind: Option<String>,
    pub time: DateTime<Utc>,
    pub data: serde_json::Value,
    pub received_at: DateTime<Utc>,
    /// Position in arrival order; the pagination cursor.
    pub seq: u64,
    /// Set on a conflict: an upload that reused the id of the record with this seq (the
    /// id's first) with other content. Absent on an id's first record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict_of: Option<u64>,
}

impl StoredEvent {
    /// Whether `e` (at `time`) has this record's content: kind, subkind, time as an
    /// instant, and data.
    fn same_content(&self, e: &Event, time: &DateTime<Utc>) -> bool {
        self.kind == e.kind
            && self.subkind == e.subkind
            && self.time == *time
            && self.data == e.data
    }
}

/// What one upload did ([`EventStore::accept`]).
#[derive(Debug, Default)]
pub struct Intake {
    /// The records stored now, conflicts among them; a re-sent event is not.
    pub stored: Vec<StoredEvent>,
    /// How many of `stored` are conflicts.
    pub conflicts: u64,
    /// The notifications raised now (for the webhook); counted ones are not.
    pub created: Vec<Notification>,
}

/// A filter of `GET /v1/admin/events`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct EventQuery {
    pub kind: Option<String>,
    pub client: Option<String>,
    pub group: Option<String>,
    /// On the event's `time`.
    pub since: Option<DateTime<Utc>>,
    pub limit: Option<usize>,
    /// The cursor: the `seq` after which to continue.
    pub after: Option<u64>,
}

/// One answer of `GET /v1/admin/events`: a page may be short, or empty, while `next` is set
/// (the walk reached [`SCAN_LIMIT`] entries); `next` null means nothing further matches.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct EventPage {
    pub events: Vec<StoredEvent>,
    pub next: Option<u64>,
}

/// An event's time as index entries keep it: (seconds, nanoseconds) since the epoch, which
/// order as the times do and compare exactly with a `since`.
type Stamp = (i64, u32);

fn stamp(t: &DateTime<Utc>) -> Stamp {
    (t.timestamp(), t.timestamp_subsec_nanos())
}

pub(super) fn record_key(seq: u64) -> String {
    format!("r/{}", seq_part(seq))
}

pub(super) fn dedupe_key(client: &str, id: &str) -> String {
    format!("i/{}\0{}", part(client), part(id))
}

pub(super) fn conflict_key(client: &str, id: &str, content: &str) -> String {
    format!("x/{}\0{}\0{content}", part(client), part(id))
}

/// The key of the number of conflicts stored.
pub(super) const CONFLICTS_KEY: &str = "s/conflicts";

/// The key of the greatest seq retention deleted (`retention`), so that the next seq
/// continues after it even when no record is left.
pub(super) const EXPIRED_KEY: &str = "s/expired_through";

/// The SHA-256 (hex) of an event's content: kind, subkind, time as an instant and data, the
/// data's object keys in sorted order, so that one content always gives one digest.
fn content_digest(e: &Event, time: &DateTime<Utc>) -> String {
    digest_of(&e.kind, e.subkind.as_deref(), time, &e.data)
}

/// [`content_digest`] of a stored record: the digest its conflict key was written under.
pub(super) fn stored_digest(e: &StoredEvent) -> String {
    digest_of(&e.kind, e.subkind.as_deref(), &e.time, &e.data)
}

fn digest_of(
    kind: &str,
    subkind: Option<&str>,
    time: &DateTime<Utc>,
    data: &serde_json::Value,
) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    let (secs, nanos) = stamp(time);
    let head = serde_json::json!([kind, subkind, secs, nanos]);
    h.update(head.to_string().as_bytes());
    h.update(b"\n");
    canonical(data, &mut h);
    Digest::from_hasher(h).to_hex()
}

/// Feeds `v` to `h` as JSON with every object's keys sorted (whatever order serde_json
/// keeps them in).
fn canonical(v: &serde_json::Value, h: &mut sha2::Sha256) {
    use serde_json::Value;
    use sha2::Digest as _;
    match v {
        Value::Object(m) => {
            let mut entries: Vec<_> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            h.update(b"{");
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                h.update(Value::String(k.clone()).to_string().as_bytes());
                h.update(b":");
                canonical(v, h);
            }
            h.update(b"}");
        }
        Value::Array(items) => {
            h.update(b"[");
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    h.update(b",");
                }
                canonical(v, h);
            }
            h.update(b"]");
        }
        other => h.update(other.to_string().as_bytes()),
    }
}

/// The prefix of one index's entries for `value` (`c` client, `g` group, `k` kind).
pub(super) fn index_prefix(tag: char, value: &str) -> String {
    format!("{tag}/{}\0", part(value))
}

/// Adds an id's first record, its dedupe key and its index entries to `batch`.
pub(super) fn put_event(batch: &mut Batch, e: &StoredEvent) -> Result<(), StoreError> {
    batch.put(&dedupe_key(&e.client_id, &e.id), &e.seq)?;
    put_record(batch, e)
}

/// Adds a conflict's record, its key (by content digest) and its index entries to `batch`.
fn put_conflict(batch: &mut Batch, e: &StoredEvent, content: &str) -> Result<(), StoreError> {
    batch.put(&conflict_key(&e.client_id, &e.id, content), &e.seq)?;
    put_record(batch, e)
}

/// Adds a record and its index entries to `batch`.
fn put_record(batch: &mut Batch, e: &StoredEvent) -> Result<(), StoreError> {
    let seq = seq_part(e.seq);
    batch.put(&format!("r/{seq}"), e)?;
    let time = stamp(&e.time);
    for (tag, value) in [('c', &e.client_id), ('g', &e.group), ('k', &e.kind)] {
        batch.put(&format!("{}{seq}", index_prefix(tag, value)), &time)?;
    }
    batch.put(&format!("t/{seq}"), &time)?;
    Ok(())
}

/// Whether `kv` holds the dedupe key of `e` (the event was stored before).
pub(super) fn has_event(kv: &Kv, e: &StoredEvent) -> Result<bool, StoreError> {
    kv.contains(&dedupe_key(&e.client_id, &e.id))
}

/// The greatest sequence number among the keys of `kv` under `prefix` (0 when none), found
/// with one lookup from the end.
fn last_seq(kv: &Kv, prefix: &str) -> Result<u64, StoreError> {
    Ok(kv
        .last::<IgnoredAny>(prefix)?
        .and_then(|(key, _)| seq_after(&key, prefix))
        .unwrap_or(0))
}

pub(super) fn exhausted(what: &str) -> Internal {
    Internal(format!("{what} numbers are exhausted"))
}

/// What intake keeps between uploads: the numbers the next write continues from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Counters {
    /// The next event's seq.
    pub(super) seq: u64,
    /// The next notification's id.
    pub(super) notice: u64,
    /// Conflicts stored (the value at [`CONFLICTS_KEY`]).
    pub(super) conflicts: u64,
}

/// The manager's event records.
#[derive(Clone)]
pub struct EventStore {
    pub(super) log: Kv,
    pub(super) notices: Kv,
    /// Held while an upload is checked against the dedupe keys and written with the
    /// notifications it raises or counts, so that two uploads of one id cannot both store
    /// it and two events cannot both raise the notification of a (group, kind). Updated
    /// only after a write succeeded.
    counters: Arc<Mutex<Counters>>,
    /// Entries one query visits at most: [`SCAN_LIMIT`], smaller in tests.
    pub(super) scan_limit: usize,
    /// Held by a retention step ([`EventStore::expire_step`]) from its walk to its write,
    /// so that two steps never plan the deletion of the same records. Intake never takes
    /// it.
    pub(super) expiring: Arc<Mutex<()>>,
    /// Uploads intake has begun: retention yields while this moves (`retention::Pacer`).
    pub(super) intakes: Arc<AtomicU64>,
}

impl EventStore {
    /// Opens the event records (a data dir of the previous format is moved over first, by
    /// `migrate::previous_format`).
    pub fn open(store: &Store) -> Result<EventStore, EventsError> {
        let log = store.kv(LOG_TREE)?;
        let notices = store.kv(NOTICES_TREE)?;
        // Retention may have deleted every record: its high-water mark keeps seqs from
        // being given out twice.
        let expired = log.get::<u64>(EXPIRED_KEY)?.unwrap_or(0);
        let next_seq = last_seq(&log, "r/")?
            .max(expired)
            .checked_add(1)
            .ok_or_else(|| exhausted("event"))?;
        let next_id = last_seq(&notices, "n/")?
            .checked_add(1)
            .ok_or_else(|| exhausted("notification"))?;
        let conflicts = log.get::<u64>(CONFLICTS_KEY)?.unwrap_or(0);
        Ok(EventStore {
            log,
            notices,
            counters: Arc::new(Mutex::new(Counters {
                seq: next_seq,
                notice: next_id,
                conflicts,
            })),
            scan_limit: SCAN_LIMIT,
            expiring: Arc::new(Mutex::new(())),
            intakes: Arc::new(AtomicU64::new(0)),
        })
    }

    /// How many conflicts are stored (for `gup_event_conflicts_total` at start).
    pub fn conflicts(&self) -> Result<u64, EventsError> {
        Ok(self.lock()?.conflicts)
    }

    pub(super) fn lock(&self) -> Result<std::sync::MutexGuard<'_, Counters>, Internal> {
        self.counters
            .lock()
            .map_err(|_| Internal::poisoned("event intake"))
    }

    /// The same records, with queries visiting at most `entries` each (at least 1).
    pub fn with_scan_limit(mut self, entries: usize) -> EventStore {
        self.scan_limit = entries.max(1);
        self
    }

    /// Stores the events of `upload` as [`EventStore::accept`] does, raising no
    /// notification. Returns the records stored.
    pub fn add_events(
        &self,
        upload: &EventUpload,
        origin: &Placement,
        now: DateTime<Utc>,
    ) -> Result<Vec<StoredEvent>, EventsError> {
        Ok(self.intake(upload, origin, None, now)?.stored)
    }

    /// Stores each event of `upload` once per (client_id, id, content): an id's first
    /// upload as its record, the same content again not at all, other content as a
    /// conflict (once per content). The records, their keys and index entries, the conflict
    /// count, and the notifications the critical ones among them raise or count (damper
    /// `damper_s`, as [`EventStore::notify`]) are written in one atomic step.
    pub fn accept(
        &self,
        upload: &EventUpload,
        origin: &Placement,
        damper_s: u64,
        now: DateTime<Utc>,
    ) -> Result<Intake, EventsError> {
        self.intake(upload, origin, Some(damper_s), now)
    }

    fn intake(
        &self,
        upload: &EventUpload,
        origin: &Placement,
        damper_s: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<Intake, EventsError> {
        self.intakes.fetch_add(1, Ordering::Relaxed);
        let mut counters = self.lock()?;
        let mut next = *counters;
        let mut batch = Batch::default();
        let client = upload.client_id.as_str();
        // The first record of each id met so far: stored before (read once) or in this
        // upload; None when the id is new.
        let mut firsts: HashMap<&str, Option<StoredEvent>> = HashMap::new();
        // The conflicts of this upload, by (id, content digest).
        let mut variants: HashSet<(&str, String)> = HashSet::new();
        let mut out = Intake::default();
        for e in &upload.events {
            // `EventUpload::validate` refuses an upload with a time that does not parse
            // (400) before it gets here.
            let Some(time) = e.parsed_time() else {
                continue;
            };
            let first = match firsts.get(e.id.as_str()) {
                Some(known) => known.clone(),
                None => {
                    let found = self.first_record(client, &e.id)?;
                    firsts.insert(e.id.as_str(), found.clone());
                    found
                }
            };
            let mut record = StoredEvent {
                id: e.id.clone(),
                client_id: upload.client_id.clone(),
                group: origin.group.clone(),
                location: origin.location.clone(),
                kind: e.kind.clone(),
                subkind: e.subkind.clone(),
                time,
                data: e.data.clone(),
                received_at: now,
                seq: next.seq,
                conflict_of: None,
            };
            match first {
                None => {
                    put_event(&mut batch, &record)?;
                    firsts.insert(e.id.as_str(), Some(record.clone()));
                }
                Some(first) if first.same_content(e, &time) => continue,
                Some(first) => {
                    let content = content_digest(e, &time);
                    let key = conflict_key(client, &e.id, &content);
                    if variants.contains(&(e.id.as_str(), content.clone()))
                        || self.log.contains(&key)?
                    {
                        continue;
                    }
                    record.conflict_of = Some(first.seq);
                    put_conflict(&mut batch, &record, &content)?;
                    variants.insert((e.id.as_str(), content));
                    next.conflicts = next
                        .conflicts
                        .checked_add(1)
                        .ok_or_else(|| exhausted("conflict"))?;
                    out.conflicts += 1;
                }
            }
            out.stored.push(record);
            next.seq = next.seq.checked_add(1).ok_or_else(|| exhausted("event"))?;
        }
        if out.stored.is_empty() {
            return Ok(out);
        }
        if out.conflicts > 0 {
            batch.put(CONFLICTS_KEY, &next.conflicts)?;
        }
        let mut notices = Batch::default();
        if let Some(damper_s) = damper_s {
            out.created = self.plan_notices(&out.stored, damper_s, now, &mut next, &mut notices)?;
        }
        if notices.is_empty() {
            self.log.apply(batch)?;
        } else {
            self.log.apply_with(batch, &self.notices, notices)?;
        }
        *counters = next;
        drop(counters);
        for c in out.stored.iter().filter(|e| e.conflict_of.is_some()) {
            tracing::warn!(client = %c.client_id, id = %c.id, seq = c.seq, conflict_of = ?c.conflict_of, "an upload reused an event id with other content: stored as a conflict");
        }
        Ok(out)
    }

    /// The first record stored for (client, id), if any. A dedupe key whose record is
    /// missing or is another event's (never written by this format; possible only in a
    /// damaged store) counts as absent, so that the event is stored again rather than
    /// dropped.
    fn first_record(&self, client: &str, id: &str) -> Result<Option<StoredEvent>, StoreError> {
        let Some(seq) = self.log.get::<u64>(&dedupe_key(client, id))? else {
            return Ok(None);
        };
        Ok(self
            .log
            .get::<StoredEvent>(&record_key(seq))?
            .filter(|r| r.client_id == client && r.id == id))
    }

    /// A page of events matching `q` in seq order, and the cursor of the next page. Walks
    /// the most selective index given (client, then group, then kind; the times in seq
    /// order for a `since` alone; the records when nothing is given), fetches only the
    /// records that match, and stops after
    /// [`SCAN_LIMIT`] entries with the page found so far and `next` where it stopped. A
    /// cursor at or past the end is an empty page.
    pub fn query(&self, q: &EventQuery) -> Result<EventPage, EventsError> {
        let limit = page::limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
        let Some(start) = q.after.map_or(Some(0), |a| a.checked_add(1)) else {
            return Ok(EventPage::default());
        };
        let mut walk = Walk::new(limit, self.scan_limit);
        let filters = [('c', &q.client), ('g', &q.group), ('k', &q.kind)];
        let given: Vec<(char, &str)> = filters
            .iter()
            .filter_map(|(tag, v)| v.as_deref().map(|v| (*tag, v)))
            .collect();
        let since = q.since.as_ref().map(stamp);
        if let Some(((tag, value), others)) = given.split_first() {
            let prefix = index_prefix(*tag, value);
            let from = format!("{prefix}{}", seq_part(start));
            self.log
                .visit::<Stamp>(&prefix, &from, false, |key, time| {
                    let Some(seq) = seq_after(&key, &prefix) else {
                        return walk.pass(None);
                    };
                    if since.is_some_and(|s| time < s) {
                        return walk.pass(Some(seq));
                    }
                    match self.matching(seq, others, q) {
                        Ok(Some(e)) => walk.take(e),
                        Ok(None) => walk.pass(Some(seq)),
                        Err(e) => walk.fail(e),
                    }
                })?;
        } else if let Some(since) = since {
            let from = format!("t/{}", seq_part(start));
            self.log.visit::<Stamp>("t/", &from, false, |key, time| {
                let Some(seq) = seq_after(&key, "t/") else {
                    return walk.pass(None);
                };
                if time < since {
                    return walk.pass(Some(seq));
                }
                match self.matching(seq, &[], q) {
                    Ok(Some(e)) => walk.take(e),
                    Ok(None) => walk.pass(Some(seq)),
                    Err(e) => walk.fail(e),
                }
            })?;
        } else {
            self.log
                .visit::<StoredEvent>("r/", &record_key(start), false, |_, e| walk.take(e))?;
        }
        walk.finish()
    }

    /// The record of `seq` if it matches `q`: the other indexes given are asked first (a
    /// key lookup each), so a record is read only when it is likely to match.
    fn matching(
        &self,
        seq: u64,
        others: &[(char, &str)],
        q: &EventQuery,
    ) -> Result<Option<StoredEvent>, StoreError> {
        for (tag, value) in others {
            let key = format!("{}{}", index_prefix(*tag, value), seq_part(seq));
            if !self.log.contains(&key)? {
                return Ok(None);
            }
        }
        let Some(e) = self.log.get::<StoredEvent>(&record_key(seq))? else {
            return Ok(None);
        };
        let fits = q.kind.as_ref().is_none_or(|k| *k == e.kind)
            && q.client.as_ref().is_none_or(|c| *c == e.client_id)
            && q.group.as_ref().is_none_or(|g| *g == e.group)
            && q.since.is_none_or(|s| e.time >= s);
        Ok(fits.then_some(e))
    }

    /// Makes everything stored so far durable (before a 202).
    pub async fn flush(&self) -> Result<(), EventsError> {
        self.log.flush().await?;
        Ok(())
    }
}

/// Why a walk over the records stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// It reached the end: nothing further matches.
    End,
    /// The page is full and another match follows.
    Full,
    /// It visited the scan bound's worth of entries.
    Bound,
}

/// One query's walk: the page so far, how far it went and why it stopped.
struct Walk {
    limit: usize,
    scan_limit: usize,
    out: Vec<StoredEvent>,
    scanned: usize,
    /// The seq of the last entry visited: where the next page starts.
    last: Option<u64>,
    stop: Stop,
    error: Option<StoreError>,
}

impl Walk {
    fn new(limit: usize, scan_limit: usize) -> Walk {
        Walk {
            limit,
            scan_limit,
            out: Vec::new(),
            scanned: 0,
            last: None,
            stop: Stop::End,
            error: None,
        }
    }

    /// Counts a visited entry; false (stop) at the scan bound.
    fn visited(&mut self, seq: Option<u64>) -> bool {
        if seq.is_some() {
            self.last = seq;
        }
        self.scanned += 1;
        if self.scanned >= self.scan_limit {
            self.stop = Stop::Bound;
            return false;
        }
        true
    }

    /// An entry that does not match.
    fn pass(&mut self, seq: Option<u64>) -> bool {
        self.visited(seq)
    }

    /// A match: onto the page, or, with the page full, the sign that more follow.
    fn take(&mut self, e: StoredEvent) -> bool {
        if self.out.len() == self.limit {
            self.stop = Stop::Full;
            return false;
        }
        let seq = e.seq;
        self.out.push(e);
        self.visited(Some(seq))
    }

    fn fail(&mut self, e: StoreError) -> bool {
        self.error = Some(e);
        false
    }

    /// The page, with `next` at the last entry visited unless the walk reached the end (the
    /// entries between the last match and that point matched nothing).
    fn finish(self) -> Result<EventPage, EventsError> {
        if let Some(e) = self.error {
            return Err(e.into());
        }
        let next = match self.stop {
            Stop::End => None,
            Stop::Full | Stop::Bound => self.last,
        };
        Ok(EventPage {
            events: self.out,
            next,
        })
    }
}

#[cfg(test)]
#[path = "events_tests.rs"]
mod tests;
