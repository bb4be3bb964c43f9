//! Moving a data dir of an older format to the current one, once, at open (the store's
//! version check calls [`upgrade`]).
//!
//! Owns reading the trees the manager wrote before (`events` and `event_ids`,
//! `notifications`, `applications`) into the current ones, in bounded batches: at most
//! [`BATCH_RECORDS`] records or [`BATCH_BYTES`] bytes are written at a time, then removed
//! from the old tree. Each step is safe to repeat: a crash between writing a batch and
//! removing its source leaves records that the next open finds already moved (their keys
//! and values are the same) and only removes; a crash before the new format is recorded
//! runs it again, which finds nothing left to move. The old dedupe keys are not carried over:
//! every moved event gets its own from its record, so a key the old format wrote without
//! its record (a crash between the two writes) no longer makes a re-sent event be dropped.
//! It must never run while the manager serves.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::de::IgnoredAny;
use serde::Deserialize;

use super::applications::{app_id, pair_key, AppRecord, Sighting};
use super::events::{has_event, put_event, put_notice, Notification, StoredEvent};
use crate::store::{Batch, Kv, Store, StoreError};

/// Records moved per batch at most.
pub const BATCH_RECORDS: usize = 10_000;
/// Bytes written per batch at most (a batch stops growing once it holds this much).
pub const BATCH_BYTES: u64 = 16 << 20;

/// The manager's part of upgrading a data dir of format `from` (`store::format`), run by
/// the store's version check at open, before anything else reads the records.
pub(super) fn upgrade(store: &Store, from: u32) -> Result<(), StoreError> {
    if from < 2 {
        // Format 1 (gup 0.1.0) may still hold the trees of the event format before it.
        previous_format(store)?;
    }
    Ok(())
}

/// Moves every tree of the previous format (events, notifications, applications) into the
/// current ones; run by [`upgrade`] for a data dir of format 1.
pub(super) fn previous_format(store: &Store) -> Result<(), StoreError> {
    events(store, &store.kv(super::events::LOG_TREE)?)?;
    notifications(store, &store.kv(super::events::NOTICES_TREE)?)?;
    applications(store, &store.kv(super::applications::TREE)?)?;
    Ok(())
}

/// One old record: its key and its value, decoded only when it is moved.
type Old = (String, serde_json::Value);

/// The next records of `old`, at most [`BATCH_RECORDS`] and about [`BATCH_BYTES`].
fn next_batch(old: &Kv) -> Result<Vec<Old>, StoreError> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    old.visit::<serde_json::Value>("", "", false, |key, value| {
        bytes += value.to_string().len() as u64;
        out.push((key, value));
        out.len() < BATCH_RECORDS && bytes < BATCH_BYTES
    })?;
    Ok(out)
}

/// Removes `keys` from `old` in one batch.
fn remove_all(old: &Kv, keys: impl IntoIterator<Item = String>) -> Result<(), StoreError> {
    let mut batch = Batch::default();
    for key in keys {
        batch.remove(&key);
    }
    old.apply(batch)
}

/// Logs a record of the old format that does not decode; it is dropped with its batch.
fn unreadable(tree: &str, key: &str, e: &serde_json::Error) {
    tracing::warn!(tree, key, error = %e, "dropping a record of the previous format that does not decode");
}

/// Moves the events of the previous format (`events`: seq -> record; `event_ids`: the
/// dedupe keys) into `log`, each with its seq, dedupe key and index entries.
pub(super) fn events(store: &Store, log: &Kv) -> Result<u64, StoreError> {
    let old = store.kv("events")?;
    let old_ids = store.kv("event_ids")?;
    if old.is_empty()? && old_ids.is_empty()? {
        return Ok(0);
    }
    let mut moved = 0u64;
    loop {
        let chunk = next_batch(&old)?;
        if chunk.is_empty() {
            break;
        }
        let mut batch = Batch::default();
        let mut keys = Vec::with_capacity(chunk.len());
        let mut seen = std::collections::HashSet::new();
        for (key, value) in chunk {
            match serde_json::from_value::<StoredEvent>(value) {
                Ok(e) => {
                    // Moved before a crash (same seq), or a second record of one id.
                    if seen.insert((e.client_id.clone(), e.id.clone())) && !has_event(log, &e)? {
                        put_event(&mut batch, &e)?;
                        moved += 1;
                    }
                }
                Err(err) => unreadable("events", &key, &err),
            }
            keys.push(key);
        }
        log.apply(batch)?;
        remove_all(&old, keys)?;
    }
    loop {
        let mut keys = Vec::new();
        old_ids.visit::<IgnoredAny>("", "", false, |key, _| {
            keys.push(key);
            keys.len() < BATCH_RECORDS
        })?;
        if keys.is_empty() {
            break;
        }
        remove_all(&old_ids, keys)?;
    }
    tracing::info!(
        events = moved,
        "moved the events of the previous format into {}",
        super::events::LOG_TREE
    );
    Ok(moved)
}

/// Moves the notifications of the previous format (`notifications`: `group\0kind\0id` ->
/// notification) into `notices`, each with its id.
pub(super) fn notifications(store: &Store, notices: &Kv) -> Result<u64, StoreError> {
    let old = store.kv("notifications")?;
    let mut moved = 0u64;
    loop {
        let chunk = next_batch(&old)?;
        if chunk.is_empty() {
            break;
        }
        let mut batch = Batch::default();
        let mut keys = Vec::with_capacity(chunk.len());
        for (key, value) in chunk {
            match serde_json::from_value::<Notification>(value) {
                Ok(n) => {
                    put_notice(&mut batch, &n)?;
                    moved += 1;
                }
                Err(err) => unreadable("notifications", &key, &err),
            }
            keys.push(key);
        }
        notices.apply(batch)?;
        remove_all(&old, keys)?;
    }
    if moved > 0 {
        tracing::info!(
            notifications = moved,
            "moved the notifications of the previous format"
        );
    }
    Ok(moved)
}

/// An application as the previous format kept it: one record holding every client.
#[derive(Deserialize)]
struct OldApplication {
    name: String,
    version: Option<String>,
    path: Option<String>,
    sha256: Option<String>,
    /// client id -> (first seen, last seen).
    clients: BTreeMap<String, (DateTime<Utc>, DateTime<Utc>)>,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
}

/// Moves the applications of the previous format (`applications`: one record per
/// application holding all its clients) into `inventory`, one application at a time, its
/// pairs in batches of at most [`BATCH_RECORDS`], its record last.
pub(super) fn applications(store: &Store, inventory: &Kv) -> Result<u64, StoreError> {
    let old = store.kv("applications")?;
    let mut moved = 0u64;
    loop {
        let mut next: Option<Old> = None;
        old.visit::<serde_json::Value>("", "", false, |key, value| {
            next = Some((key, value));
            false
        })?;
        let Some((key, value)) = next else {
            break;
        };
        match serde_json::from_value::<OldApplication>(value) {
            Ok(a) => {
                move_application(inventory, &a)?;
                moved += 1;
            }
            Err(err) => unreadable("applications", &key, &err),
        }
        old.remove(&key)?;
    }
    if moved > 0 {
        tracing::info!(
            applications = moved,
            "moved the applications of the previous format"
        );
    }
    Ok(moved)
}

fn move_application(inventory: &Kv, a: &OldApplication) -> Result<(), StoreError> {
    let id = app_id(&a.name, a.version.as_deref(), a.sha256.as_deref());
    let clients: Vec<_> = a.clients.iter().collect();
    for chunk in clients.chunks(BATCH_RECORDS) {
        let mut batch = Batch::default();
        for (client, (first_seen, last_seen)) in chunk {
            let sighting = Sighting {
                first_seen: *first_seen,
                last_seen: *last_seen,
            };
            batch.put(&pair_key(&id, client), &sighting)?;
        }
        inventory.apply(batch)?;
    }
    let record = AppRecord {
        id: id.clone(),
        name: a.name.clone(),
        version: a.version.clone(),
        path: a.path.clone(),
        sha256: a.sha256.clone(),
        first_seen: a.first_seen,
        last_seen: a.last_seen,
        client_count: a.clients.len() as u64,
    };
    inventory.put(&format!("a/{id}"), &record)
}
