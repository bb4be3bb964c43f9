//! Moving a data dir of the previous format to the current one, once, at open.
//!
//! Owns reading the trees the manager wrote before (`applications`: one record per
//! application holding every client) into the current ones, in bounded batches: at most
//! [`BATCH_RECORDS`] records are written at a time, then the source is removed from the old
//! tree. Each step is safe to repeat: a crash between writing and removing leaves records
//! that the next open writes again with the same keys and values, then removes. When the
//! old tree is empty (every open after the first) it costs one lookup. It must never run
//! while the manager serves.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::applications::{app_id, pair_key, AppRecord, Sighting};
use crate::store::{Batch, Kv, Store, StoreError};

/// Records moved per batch at most.
pub const BATCH_RECORDS: usize = 10_000;

/// One old record: its key and its value, decoded only when it is moved.
type Old = (String, serde_json::Value);

/// Logs a record of the old format that does not decode; it is dropped with its batch.
fn unreadable(tree: &str, key: &str, e: &serde_json::Error) {
    tracing::warn!(tree, key, error = %e, "dropping a record of the previous format that does not decode");
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
