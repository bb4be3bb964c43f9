//! The node's outbox: uploads accepted from clients, durable and bounded, until an upstream
//! accepts them.
//!
//! Owns two lanes of [`Placed`] uploads in `store::Kv`, each its own tree: `critical` (an
//! upload holding a critical event), always forwarded first, and `normal`. A lane holds
//! records `q/{seq:020}` in arrival order and a `meta` record with what it holds ([`Fill`]:
//! bytes, records, events), written in the same atomic batch as every push and removal, so a
//! restart reads the counts in O(1) and the next sequence number with `Kv::last`, whatever
//! the length of the queue. The bound `events.outbox_max_bytes` is over both lanes: an upload
//! without a critical event is refused once the outbox would hold more than three quarters
//! of it, a critical one once it would hold more than all of it (a quarter is kept for them).
//! Reading for forwarding visits a page from the lane's first record, never the whole tree.
//! A data dir of the previous format (one tree `outbox`) is moved into the lanes at open, in
//! bounded batches. Entries are flushed to disk before the 202 and removed only after an
//! upstream accepted them. It must never talk to the network: the node's relay forwards.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::core::fault::{Fault, Internal, Kind};
use crate::core::proto::{Placed, Upload};
use crate::serve::metrics::Metrics;
use crate::store::{Batch, Kv, Store, StoreError};

/// Where an upload waits: its lane decides what goes first and how much room it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Uploads holding a critical event: forwarded first, refused only when the outbox is full.
    Critical,
    /// Everything else: refused once the outbox holds three quarters of its bound.
    Normal,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Critical, Lane::Normal];

    /// The lane of an upload.
    pub fn of(upload: &Upload) -> Lane {
        if upload.is_critical() {
            Lane::Critical
        } else {
            Lane::Normal
        }
    }

    /// The `lane` label of `gup_outbox_bytes`.
    pub fn name(self) -> &'static str {
        match self {
            Lane::Critical => "critical",
            Lane::Normal => "normal",
        }
    }

    fn tree(self) -> &'static str {
        match self {
            Lane::Critical => "outbox_critical",
            Lane::Normal => "outbox_normal",
        }
    }

    fn index(self) -> usize {
        match self {
            Lane::Critical => 0,
            Lane::Normal => 1,
        }
    }
}

/// The prefix of a lane's queued records.
const RECORDS: &str = "q/";
/// The key of a lane's [`Fill`].
const META: &str = "meta";
/// The prefix of records that could not be read back, set aside so the lane moves on.
const UNREADABLE: &str = "bad/";
/// The tree of the previous format: `{seq:020}` -> [`Placed`], both lanes in one.
const OLD_TREE: &str = "outbox";
/// A migration step moves at most this many records or bytes in one batch.
const MIGRATE_RECORDS: usize = 10_000;
const MIGRATE_BYTES: u64 = 8 << 20;
/// The `Retry-After` of a refusal: about how long an upstream that just came back takes to
/// make room (the relay sends at least 8 MiB per batch), and the longest an upstream backs
/// off, so that clients do not hammer a node whose upstream is away.
pub const FULL_RETRY_AFTER_S: u64 = 30;

fn record_key(seq: u64) -> String {
    format!("{RECORDS}{seq:020}")
}

fn seq_of(key: &str, prefix: &str) -> Option<u64> {
    key.strip_prefix(prefix)?.parse().ok()
}

/// What a lane holds, as stored in its `meta` record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fill {
    /// Bytes of the records' JSON.
    pub bytes: u64,
    pub records: u64,
    /// Events and applications in them.
    pub events: u64,
}

impl Fill {
    fn add(&mut self, bytes: u64, events: u64) {
        self.bytes += bytes;
        self.records += 1;
        self.events += events;
    }

    fn sub(&mut self, bytes: u64, events: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
        self.records = self.records.saturating_sub(1);
        self.events = self.events.saturating_sub(events);
        if self.records == 0 {
            // An empty lane holds nothing, whatever a count drifted to.
            *self = Fill::default();
        }
    }
}

/// Why an upload was not queued, or the outbox could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "the event outbox is full: it holds {held} bytes, and {adding} more would take it over \
         {limit} (the room for {lane} uploads of its {max} bytes) while no upstream takes them; \
         retry later"
    )]
    Full {
        lane: &'static str,
        held: u64,
        adding: u64,
        limit: u64,
        max: u64,
    },
    #[error("encoding an upload: {0}")]
    Encode(#[source] serde_json::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Internal(#[from] Internal),
}

impl Fault for OutboxError {
    fn kind(&self) -> Kind {
        match self {
            OutboxError::Full { .. } => Kind::Unavailable {
                retry_after_s: FULL_RETRY_AFTER_S,
            },
            OutboxError::Store(e) => e.kind(),
            OutboxError::Encode(_) | OutboxError::Internal(_) => Kind::Local,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            OutboxError::Full { .. } => "outbox_full",
            OutboxError::Store(e) => e.code(),
            OutboxError::Encode(_) | OutboxError::Internal(_) => "internal",
        }
    }
}

/// What removing a queued upload takes: its key and what it counted for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    key: String,
    bytes: u64,
    events: u64,
}

impl Ticket {
    /// Bytes of the upload's JSON, as it goes in a batch.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Events or applications it holds.
    pub fn events(&self) -> u64 {
        self.events
    }
}

/// One queued upload, read for forwarding.
#[derive(Debug)]
pub struct Queued {
    pub ticket: Ticket,
    pub placed: Placed,
}

/// What the outbox keeps in memory of a lane (the disk has the same in `meta`).
#[derive(Debug, Default)]
struct LaneState {
    fill: Fill,
    /// The next sequence number.
    next: u64,
    /// No record below this sequence number is left: a page is visited from here, so that
    /// the keys removed before it are not walked again.
    head: u64,
}

/// A node's bounded queue of accepted uploads not yet accepted upstream.
pub struct Outbox {
    /// By [`Lane::index`].
    lanes: [Kv; 2],
    /// Pushes and removals change a lane's records and its `meta` under this lock, so the
    /// counts on disk and here always agree; the bound is checked under it.
    state: Mutex<[LaneState; 2]>,
    /// `events.outbox_max_bytes`.
    max_bytes: u64,
    metrics: Arc<Metrics>,
}

impl Outbox {
    /// Opens both lanes, reading their counts and next sequence numbers (O(1) in the length
    /// of the queue), and moves the queue of an older data dir into them.
    pub fn open(
        store: &Store,
        max_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Outbox, OutboxError> {
        let lanes = [
            store.kv(Lane::Critical.tree())?,
            store.kv(Lane::Normal.tree())?,
        ];
        let mut state: [LaneState; 2] = Default::default();
        for (kv, s) in lanes.iter().zip(state.iter_mut()) {
            s.fill = kv.get::<Fill>(META)?.unwrap_or_default();
            s.next = match kv.last::<serde::de::IgnoredAny>(RECORDS)? {
                Some((k, _)) => seq_of(&k, RECORDS).map_or(1, |n| n + 1),
                None => 1,
            };
        }
        let outbox = Outbox {
            lanes,
            state: Mutex::new(state),
            max_bytes,
            metrics,
        };
        outbox.migrate(&store.kv(OLD_TREE)?)?;
        outbox.publish(&*outbox.lock()?);
        Ok(outbox)
    }

    fn lock(&self) -> Result<MutexGuard<'_, [LaneState; 2]>, Internal> {
        self.state.lock().map_err(|_| Internal::poisoned("outbox"))
    }

    /// Sets the gauges from the counts (called under the lock, so they never go back).
    fn publish(&self, state: &[LaneState; 2]) {
        for lane in Lane::ALL {
            let fill = state[lane.index()].fill;
            self.metrics
                .outbox_bytes(lane.name())
                .set(fill.bytes as i64);
        }
        let events: u64 = state.iter().map(|s| s.fill.events).sum();
        self.metrics.events_queued.set(events as i64);
        self.metrics.outbox_max_bytes.set(self.max_bytes as i64);
    }

    /// Appends records to a lane with its new `meta`, in one atomic batch. Called under the
    /// lock.
    fn append(
        &self,
        state: &mut LaneState,
        lane: Lane,
        records: &[(Box<RawValue>, u64)],
    ) -> Result<(), OutboxError> {
        let mut batch = Batch::default();
        let mut fill = state.fill;
        let mut next = state.next;
        for (raw, events) in records {
            let bytes = batch.put(&record_key(next), raw)?;
            fill.add(bytes, *events);
            next += 1;
        }
        batch.put(META, &fill)?;
        self.lanes[lane.index()].apply(batch)?;
        state.fill = fill;
        state.next = next;
        Ok(())
    }

    /// Appends uploads, each to its lane in order, and makes them durable (one flush) before
    /// returning. All or nothing against the bound: the whole call is refused when the
    /// outbox would hold more than three quarters of its bound (any upload without a
    /// critical event in it) or more than the bound (only critical ones).
    pub async fn push_all(&self, uploads: &[Placed]) -> Result<(), OutboxError> {
        let mut parts: [Vec<(Box<RawValue>, u64)>; 2] = Default::default();
        let mut adding = 0;
        for u in uploads {
            // Encoded once, outside the lock; the record is these very bytes.
            let raw = serde_json::value::to_raw_value(u).map_err(OutboxError::Encode)?;
            adding += raw.get().len() as u64;
            parts[Lane::of(&u.upload).index()].push((raw, u.upload.count() as u64));
        }
        if adding == 0 {
            return Ok(());
        }
        {
            let mut state = self.lock()?;
            let held: u64 = state.iter().map(|s| s.fill.bytes).sum();
            let (lane, limit) = if parts[Lane::Normal.index()].is_empty() {
                (Lane::Critical, self.max_bytes)
            } else {
                (Lane::Normal, self.max_bytes - self.max_bytes / 4)
            };
            if held + adding > limit {
                self.metrics.outbox_refused.inc();
                return Err(OutboxError::Full {
                    lane: lane.name(),
                    held,
                    adding,
                    limit,
                    max: self.max_bytes,
                });
            }
            for lane in Lane::ALL {
                let records = &parts[lane.index()];
                if !records.is_empty() {
                    let result = self.append(&mut state[lane.index()], lane, records);
                    // What was written shows even when a later part failed.
                    self.publish(&state);
                    result?;
                }
            }
        }
        self.flush().await
    }

    /// Makes the outbox's writes durable. Every caller flushes through one `Kv`, so that
    /// concurrent acknowledgements share one disk flush whatever lane they wrote.
    async fn flush(&self) -> Result<(), OutboxError> {
        Ok(self.lanes[0].flush().await?)
    }

    /// The oldest uploads of `lane`, up to `max_bytes` of JSON (at least one when there is
    /// any). Visits the lane from its first record and stops after the page: it never
    /// decodes more than the page and the one record that did not fit.
    pub fn peek(&self, lane: Lane, max_bytes: usize) -> Result<Vec<Queued>, OutboxError> {
        loop {
            let from = record_key(self.lock()?[lane.index()].head);
            let mut out = Vec::new();
            let mut bytes = 0u64;
            let mut unreadable = None;
            self.lanes[lane.index()].visit::<Box<RawValue>>(
                RECORDS,
                &from,
                false,
                |key, raw| {
                    let size = raw.get().len() as u64;
                    if !out.is_empty() && bytes + size > max_bytes as u64 {
                        return false;
                    }
                    match serde_json::from_str::<Placed>(raw.get()) {
                        Ok(placed) => {
                            bytes += size;
                            let events = placed.upload.count() as u64;
                            out.push(Queued {
                                ticket: Ticket {
                                    key,
                                    bytes: size,
                                    events,
                                },
                                placed,
                            });
                            true
                        }
                        Err(e) => {
                            unreadable = Some((key, raw, e));
                            false
                        }
                    }
                },
            )?;
            match unreadable {
                Some((key, raw, e)) if out.is_empty() => {
                    // A record that cannot be read would stop the lane for good: set it aside
                    // (kept on disk under `bad/`) and read on.
                    tracing::error!(lane = lane.name(), %key, error = %e, "an outbox record cannot be read; set aside under bad/");
                    self.set_aside(lane, &key, &raw)?;
                }
                _ => return Ok(out),
            }
        }
    }

    /// Moves an unreadable record out of the queue, with its lane's counts, in one batch.
    fn set_aside(&self, lane: Lane, key: &str, raw: &RawValue) -> Result<(), OutboxError> {
        let mut state = self.lock()?;
        let s = &mut state[lane.index()];
        let mut fill = s.fill;
        fill.sub(raw.get().len() as u64, 0);
        let mut batch = Batch::default();
        batch.remove(key);
        // Stamped, so that a sequence number used again after a restart of an emptied lane
        // never overwrites an earlier one.
        let stamp = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        batch.put(&format!("{UNREADABLE}{key}/{stamp}"), &raw)?;
        batch.put(META, &fill)?;
        self.lanes[lane.index()].apply(batch)?;
        s.fill = fill;
        if let Some(n) = seq_of(key, RECORDS) {
            s.head = s.head.max(n + 1);
        }
        self.publish(&state);
        Ok(())
    }

    /// Removes what an upstream accepted, durably, with the lane's counts in the same batch.
    /// `tickets` are the first of the lane, as [`Outbox::peek`] gave them; one already gone
    /// (removed by another forwarder) is not counted twice. Returns the events (and
    /// applications) this call removed.
    pub async fn remove(&self, lane: Lane, tickets: &[Ticket]) -> Result<u64, OutboxError> {
        if tickets.is_empty() {
            return Ok(0);
        }
        let mut removed = 0;
        {
            let mut state = self.lock()?;
            let kv = &self.lanes[lane.index()];
            let s = &mut state[lane.index()];
            let mut fill = s.fill;
            let mut batch = Batch::default();
            let mut head = s.head;
            for t in tickets {
                if kv.contains(&t.key)? {
                    batch.remove(&t.key);
                    fill.sub(t.bytes, t.events);
                    removed += t.events;
                }
                if let Some(n) = seq_of(&t.key, RECORDS) {
                    head = head.max(n + 1);
                }
            }
            batch.put(META, &fill)?;
            kv.apply(batch)?;
            s.fill = fill;
            s.head = head;
            self.publish(&state);
        }
        self.flush().await?;
        Ok(removed)
    }

    /// What `lane` holds.
    pub fn fill(&self, lane: Lane) -> Result<Fill, OutboxError> {
        Ok(self.lock()?[lane.index()].fill)
    }

    /// Whether `lane` holds anything.
    pub fn has(&self, lane: Lane) -> bool {
        self.fill(lane).is_ok_and(|f| f.records > 0)
    }

    /// Events (and applications) queued in both lanes.
    pub fn queued(&self) -> Result<u64, OutboxError> {
        Ok(self.lock()?.iter().map(|s| s.fill.events).sum())
    }

    /// Moves the records of the previous format's tree into the lanes, in batches of at most
    /// [`MIGRATE_RECORDS`] records or [`MIGRATE_BYTES`] bytes: each batch is appended to its
    /// lanes first and removed from the old tree after, so a crash in between queues it
    /// twice (the upstream stores each event once) and never loses it. The bound does not
    /// apply: these were acknowledged. A record that cannot be read stays where it was.
    fn migrate(&self, old: &Kv) -> Result<(), OutboxError> {
        if old.is_empty()? {
            return Ok(());
        }
        tracing::info!("moving the event outbox of an earlier version into its two lanes");
        let (mut moved, mut from) = (0u64, String::new());
        loop {
            let mut page: Vec<(String, Box<RawValue>)> = Vec::new();
            let mut bytes = 0;
            old.visit::<Box<RawValue>>("", &from, false, |key, raw| {
                bytes += raw.get().len() as u64;
                page.push((key, raw));
                page.len() < MIGRATE_RECORDS && bytes < MIGRATE_BYTES
            })?;
            let Some((last, _)) = page.last() else {
                break;
            };
            // The key right after the last one visited.
            from = format!("{last}\u{0}");
            let mut parts: [Vec<(Box<RawValue>, u64)>; 2] = Default::default();
            let mut done = Batch::default();
            for (key, raw) in page {
                match serde_json::from_str::<Placed>(raw.get()) {
                    Ok(p) => {
                        let events = p.upload.count() as u64;
                        parts[Lane::of(&p.upload).index()].push((raw, events));
                        done.remove(&key);
                        moved += 1;
                    }
                    Err(e) => {
                        tracing::error!(%key, error = %e, "an old outbox record cannot be read; left in the tree `outbox`");
                    }
                }
            }
            let mut state = self.lock()?;
            for lane in Lane::ALL {
                let records = &parts[lane.index()];
                if !records.is_empty() {
                    self.append(&mut state[lane.index()], lane, records)?;
                }
            }
            old.apply(done)?;
        }
        tracing::info!(uploads = moved, "moved the old event outbox into its lanes");
        Ok(())
    }
}

#[cfg(test)]
#[path = "outbox_tests.rs"]
mod tests;
