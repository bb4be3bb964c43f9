//! Retention of the manager's events: the oldest go once they are past `events.retain_days`
//! or outside the newest `events.max_count`, in the background, without stalling intake.
//!
//! Owns which events are due, how one is deleted ([`EventStore::expire_step`]) and the
//! background loop that deletes them ([`Manager::expire_loop`]).
//!
//! - **Age is by `received_at`**, when the manager stored the event, not by the event's own
//!   `time`: retention bounds what this server holds, and a client's clock (or an agent that
//!   was offline for a month) must not decide how long the manager keeps an event.
//!   `received_at` is taken under the intake lock as seqs are given out, so seq order is
//!   arrival order and the due events are always a prefix of the records: a step walks
//!   `r/` from its start and stops at the first event still kept. (After the wall clock
//!   steps back, a few events may briefly sit behind a younger one; they go with it.)
//! - **The count is by seq**: an event is outside the newest `max_count` when its seq is
//!   at least `max_count` below the next one. Seqs are given out without gaps and only
//!   retention deletes records, oldest first, so this is exactly "keep the newest
//!   `max_count`", found with no count kept anywhere and no extra write per upload.
//! - **Deleting an event removes every key that points at it** in one atomic batch: its
//!   record, its time entry and its client, group and kind entries, and its dedupe key
//!   (`i/`, when it points at this record) or, for a conflict, its conflict key (`x/`, when
//!   it points at this record) with the conflict count (`s/conflicts`) lowered to match.
//!   After a crash an event is there whole or not at all: no query ever finds an index
//!   entry without its record, and the conflict count is the conflicts stored.
//! - **Bounded steps, intake first.** A step deletes at most [`EXPIRE_BATCH`] events, about
//!   as many keys as one upload writes, so the write lock sled holds while it applies a
//!   batch stalls an upload no longer than another upload would. It walks and plans without
//!   the intake lock (intake writes only new seqs, and a dedupe or conflict key only where
//!   none is), and takes the lock only to write a batch that lowers the conflict count.
//!   Between steps the [`Pacer`] pauses: as long as the step took while no upload arrives
//!   (a backlog, such as the first start after an upgrade or a lowered `max_count`, then
//!   costs at most half of one core), nineteen times as long while uploads arrive (a
//!   twentieth). Deleting an event costs intake about twice what storing it did, so under
//!   uploads that keep the cores busy retention falls behind and catches up when they
//!   pause; age-based deletion keeps up as long as the average rate of uploads does. Only a
//!   store past `max_count` by more than a tenth of it stops the yielding: a long flood
//!   must not fill the disk. `cargo bench --bench retention` measures intake with and
//!   without a backlog being deleted beside it.
//! - **Seqs are never reused**: each step also records the greatest seq it deleted
//!   (`s/expired_through`), and the store numbers on after it even when no record is left.
//! - **Dedupe ends with the event.** Its dedupe key goes with it, so a copy re-sent after
//!   its deletion is stored again, as a new event (and notified again if critical). Kept
//!   dedupe keys would grow without bound, which is what retention is for, and the case is
//!   rare: a node re-sends only what is still in its outbox and an agent only its spool,
//!   both of which drop an upload as soon as it was accepted, so a re-send comes within
//!   minutes or hours of the first, not `retain_days` later. The count bound can delete
//!   young events, but only under a flood past `max_count`, when storing a re-sent one
//!   again is the least of it.
//!
//! Notifications are not events: they stay (an acknowledged one clears the list, see
//! `notices`), and their `event_ids` may name events deleted since. It must never delete
//! an event that is still within both bounds.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::events::{
    conflict_key, dedupe_key, index_prefix, record_key, stored_digest, EventStore, EventsError,
    StoredEvent, CONFLICTS_KEY, EXPIRED_KEY,
};
use super::page::{seq_after, seq_part};
use super::Manager;
use crate::core::config::ManagerEventsSection;
use crate::core::fault::Internal;
use crate::store::{Batch, StoreError};

/// Events one retention step deletes at most: about 800 keys in one atomic batch, as many
/// as one upload of 100 events writes. sled applies a batch under a write lock that every
/// other write waits for, so a step stalls intake for as long as it writes; at this size
/// that is about as long as an upload's own write, so the two interleave evenly (1,000 a
/// step would stall uploads ten times as long; `cargo bench --bench retention` measures
/// both).
pub const EXPIRE_BATCH: usize = 100;

/// How often the manager looks for due events once none are left: an event goes within
/// this long of passing `retain_days`, and the store exceeds `max_count` by at most what
/// arrives in this long. A look that finds nothing due reads one record.
pub const EXPIRE_INTERVAL: Duration = Duration::from_secs(10);

/// The shortest pause between two steps of one pass, so that even steps that find little
/// leave the intake lock and the disk to others.
const MIN_PAUSE: Duration = Duration::from_millis(1);

/// While uploads arrive, the pause after a step is this many times as long as the step:
/// retention then takes at most a twentieth of one core (see [`Pacer`]).
pub const BUSY_PAUSE_FACTOR: u32 = 19;

/// Past `max_count` by more than this part of it (a tenth), the store is running away
/// (a long flood) and retention no longer yields: the disk comes before intake's speed.
pub const RUNAWAY_PART: u64 = 10;

/// The bounds retention keeps the events within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Events received longer ago than this many days are deleted.
    pub retain_days: u32,
    /// At most this many events are kept: the newest.
    pub max_count: u64,
}

impl From<&ManagerEventsSection> for Retention {
    fn from(c: &ManagerEventsSection) -> Retention {
        Retention {
            retain_days: c.retain_days,
            max_count: c.max_count,
        }
    }
}

/// What one retention step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expired {
    /// Events deleted, each with every key that pointed at it.
    pub events: u64,
    /// How many of them were conflicts.
    pub conflicts: u64,
    /// More events are due: another step should follow (after a pause).
    pub more: bool,
    /// How many events past `max_count` the store held when the step began.
    pub over_count: u64,
}

/// What a step reads of a record: its age and the parts of its keys. The rest (its data
/// above all) is skipped as it is parsed, never built: a step would otherwise decode and
/// hold up to [`EXPIRE_BATCH`] events of up to 1 MiB each.
#[derive(Deserialize)]
struct Due {
    seq: u64,
    client_id: String,
    id: String,
    group: String,
    kind: String,
    received_at: DateTime<Utc>,
    #[serde(default)]
    conflict_of: Option<u64>,
}

/// Paces the steps of a pass so that intake comes first: after a step, a pause as long as
/// the step while no upload arrived since the previous step (retention then takes at most
/// half of one core), [`BUSY_PAUSE_FACTOR`] times as long while uploads arrive (at most a
/// twentieth). Deleting an event costs intake about twice what storing one does (sled
/// writes a tombstone per key, under the same write lock, after reading the record), so
/// every step taken beside a busy intake slows it; retention yields, and catches up when
/// the uploads pause. Only a store past `max_count` by more than a tenth of it
/// ([`RUNAWAY_PART`]) stops the yielding, so that a long flood cannot fill the disk.
pub struct Pacer {
    /// The intake count at the previous step.
    seen: u64,
}

impl Pacer {
    pub fn new(events: &EventStore) -> Pacer {
        Pacer {
            seen: events.intakes.load(Ordering::Relaxed),
        }
    }

    /// The pause after step `done`, which took `step`, under `retention`.
    pub fn pause_after(
        &mut self,
        events: &EventStore,
        retention: &Retention,
        done: &Expired,
        step: Duration,
    ) -> Duration {
        let now = events.intakes.load(Ordering::Relaxed);
        let busy = now != self.seen;
        self.seen = now;
        let runaway = done.over_count > retention.max_count / RUNAWAY_PART;
        let pause = step.max(MIN_PAUSE);
        if busy && !runaway {
            pause * BUSY_PAUSE_FACTOR
        } else {
            pause
        }
    }
}

impl EventStore {
    /// Deletes up to `batch` (at least 1) of the oldest events due at `now`: received more
    /// than `retain_days` before it, or outside the newest `max_count`. Each goes with its
    /// index entries and its dedupe or conflict key in one atomic batch (see the module
    /// doc). An oldest record that cannot be read (a damaged store) is deleted on its own,
    /// with its time entry, so that it stops neither retention nor the listing.
    pub fn expire_step(
        &self,
        retention: &Retention,
        now: DateTime<Utc>,
        batch: usize,
    ) -> Result<Expired, EventsError> {
        let batch = batch.max(1);
        let _only = self
            .expiring
            .lock()
            .map_err(|_| Internal::poisoned("event retention"))?;
        let keep_from = self.lock()?.seq.saturating_sub(retention.max_count);
        let oldest_kept = now - chrono::Duration::days(i64::from(retention.retain_days));
        let mut due: Vec<Due> = Vec::new();
        let mut more = false;
        let walked = self.log.visit::<Due>("r/", "r/", false, |_, e| {
            if e.seq >= keep_from && e.received_at >= oldest_kept {
                return false;
            }
            if due.len() == batch {
                more = true;
                return false;
            }
            due.push(e);
            true
        });
        match walked {
            Ok(()) => {}
            Err(StoreError::Decode { key, source }) if due.is_empty() => {
                return self.drop_unreadable(&key, &source.to_string());
            }
            // The unreadable record goes at the next step, once these are gone.
            Err(StoreError::Decode { .. }) => more = true,
            Err(e) => return Err(e.into()),
        }
        let over_count = due.first().map_or(0, |e| keep_from.saturating_sub(e.seq));
        if due.is_empty() {
            return Ok(Expired::default());
        }
        let mut out = Batch::default();
        let mut conflicts = 0u64;
        for e in &due {
            let seq = seq_part(e.seq);
            out.remove(&record_key(e.seq));
            out.remove(&format!("t/{seq}"));
            for (tag, value) in [('c', &e.client_id), ('g', &e.group), ('k', &e.kind)] {
                out.remove(&format!("{}{seq}", index_prefix(tag, value)));
            }
            let key = match e.conflict_of {
                None => dedupe_key(&e.client_id, &e.id),
                Some(_) => {
                    conflicts += 1;
                    // A conflict's key ends in the digest of its content: read it whole
                    // (conflicts are rare). One that no longer decodes keeps its key.
                    match self.log.get::<StoredEvent>(&record_key(e.seq)) {
                        Ok(Some(r)) => conflict_key(&e.client_id, &e.id, &stored_digest(&r)),
                        Ok(None) | Err(StoreError::Decode { .. }) => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            // Only a key that points at this record is its own: a key another record
            // wrote (possible only in a damaged store) stays with that record. A key that
            // cannot be read goes: intake could not read it either.
            match self.log.get::<u64>(&key) {
                Ok(Some(s)) if s == e.seq => out.remove(&key),
                Ok(_) => {}
                Err(StoreError::Decode { .. }) => out.remove(&key),
                Err(e) => return Err(e.into()),
            }
        }
        // `due` is in seq order: its last is the greatest seq deleted.
        if let Some(last) = due.last() {
            out.put(EXPIRED_KEY, &last.seq)?;
        }
        if conflicts > 0 {
            // The count is intake's too: lowered under its lock, with the records.
            let mut counters = self.lock()?;
            let left = counters.conflicts.saturating_sub(conflicts);
            out.put(CONFLICTS_KEY, &left)?;
            self.log.apply(out)?;
            counters.conflicts = left;
        } else {
            self.log.apply(out)?;
        }
        Ok(Expired {
            events: due.len() as u64,
            conflicts,
            more,
            over_count,
        })
    }

    /// Deletes the record at `key`, which does not decode, with its time entry.
    fn drop_unreadable(&self, key: &str, why: &str) -> Result<Expired, EventsError> {
        let Some(seq) = seq_after(key, "r/") else {
            return Err(Internal(format!("event retention stopped at {key:?}: {why}")).into());
        };
        tracing::warn!(%key, error = %why, "an event record that cannot be read was deleted by retention (its index entries may stay; queries skip them)");
        let mut out = Batch::default();
        out.remove(key);
        out.remove(&format!("t/{}", seq_part(seq)));
        out.put(EXPIRED_KEY, &seq)?;
        self.log.apply(out)?;
        Ok(Expired {
            events: 1,
            more: true,
            ..Expired::default()
        })
    }
}

impl Manager {
    /// Deletes the events past retention until shutdown: a pass of steps (each on a
    /// blocking thread, paused after as [`Pacer`] says) until none are due, then a
    /// look every [`EXPIRE_INTERVAL`]. The first pass starts at once.
    pub(super) async fn expire_loop(self: std::sync::Arc<Self>) {
        let retention = self.retention;
        let mut pacer = Pacer::new(&self.events);
        loop {
            let mut pass = Expired::default();
            let started = Instant::now();
            loop {
                let events = self.events.clone();
                let step_started = Instant::now();
                let step = tokio::task::spawn_blocking(move || {
                    events.expire_step(&retention, Utc::now(), EXPIRE_BATCH)
                })
                .await;
                let step = match step {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not delete events past retention");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the event retention step stopped");
                        break;
                    }
                };
                pass.events += step.events;
                pass.conflicts += step.conflicts;
                self.served.metrics.events_expired.inc_by(step.events);
                if !step.more {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(pacer.pause_after(&self.events, &retention, &step, step_started.elapsed())) => {}
                    _ = self.shutdown.clone().wait() => return,
                }
            }
            if pass.events > 0 {
                tracing::info!(
                    expired = pass.events,
                    conflicts = pass.conflicts,
                    took_ms = started.elapsed().as_millis() as u64,
                    retain_days = retention.retain_days,
                    max_count = retention.max_count,
                    "events past retention deleted"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(EXPIRE_INTERVAL) => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }
}

#[cfg(test)]
#[path = "retention_tests.rs"]
mod tests;
