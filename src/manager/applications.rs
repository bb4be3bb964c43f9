//! The manager's inventory of learned applications: which applications clients run.
//!
//! Owns one record per application (name, version, path, sha256, first and last seen, how
//! many clients have it) and one per (application, client) pair, in [`TREE`]:
//!
//! | key | value |
//! |---|---|
//! | `a/{app}` | the [`AppRecord`] |
//! | `p/{app}/{client}` | that client's [`Sighting`] |
//!
//! where `{app}` is 32 hex digits of the SHA-256 of (lower-case name, version, sha256). An
//! upload that repeats what is known writes nothing: a pair already recorded is written again
//! only when its last-seen is a day old ([`LAST_SEEN_EVERY_S`]), so no upload rewrites a
//! record that grows with the number of clients. Searches visit at most [`SCAN_LIMIT`]
//! records and list at most [`CLIENTS_SHOWN`] clients per application. Persistence is through
//! `store::Kv`. It must never decide whether learning is on (the serving layer asks first).

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::page::{self, part, BadLimit, SCAN_LIMIT};
use crate::core::digest::Digest;
use crate::core::fault::{Fault, Internal, Kind};
use crate::core::proto::{Application, ApplicationUpload};
use crate::store::{Batch, Kv, Store, StoreError};

/// The tree of application and pair records.
pub const TREE: &str = "inventory";

/// How often a known (application, client) pair's last-seen is written again, in seconds.
pub const LAST_SEEN_EVERY_S: i64 = 86_400;

/// Clients listed with each application in a search answer (the first by client id);
/// `client_count` says how many there are.
pub const CLIENTS_SHOWN: usize = 100;

/// Default page of `GET /v1/admin/applications`: smaller than the other listings, since
/// each application carries up to [`CLIENTS_SHOWN`] clients.
pub const DEFAULT_APPS: usize = 100;
/// Largest page of `GET /v1/admin/applications`.
pub const MAX_APPS: usize = 1000;

/// What can go wrong with the inventory.
#[derive(Debug, thiserror::Error)]
pub enum AppsError {
    #[error(transparent)]
    Limit(#[from] BadLimit),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Internal(#[from] Internal),
}

impl Fault for AppsError {
    fn kind(&self) -> Kind {
        match self {
            AppsError::Limit(e) => e.kind(),
            AppsError::Store(e) => e.kind(),
            AppsError::Internal(e) => e.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            AppsError::Limit(e) => e.code(),
            AppsError::Store(e) => e.code(),
            AppsError::Internal(e) => e.code(),
        }
    }
}

/// One learned application.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AppRecord {
    /// 32 hex digits naming the application in keys and cursors.
    pub id: String,
    pub name: String,
    pub version: Option<String>,
    /// As the first client to report it gave it.
    pub path: Option<String>,
    pub sha256: Option<String>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// Clients that reported it.
    pub client_count: u64,
}

/// When one client reported one application.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Sighting {
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// One client of an application, as a search answers it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClientSeen {
    pub client_id: String,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
}

/// One application in a search answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AppView {
    #[serde(flatten)]
    pub app: AppRecord,
    /// At most [`CLIENTS_SHOWN`], in client id order.
    pub clients: Vec<ClientSeen>,
}

/// A search of `GET /v1/admin/applications`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AppQuery {
    /// Text the name or path contains (case-insensitive); empty or absent: every one.
    pub q: Option<String>,
    pub limit: Option<usize>,
    /// The id of the last application of the previous page.
    pub after: Option<String>,
}

/// One answer of `GET /v1/admin/applications`; like the events, a page may be short while
/// `next` is set.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AppPage {
    pub applications: Vec<AppView>,
    pub next: Option<String>,
}

/// The id of an application: what makes two reports the same application.
pub(super) fn app_id(name: &str, version: Option<&str>, sha256: Option<&str>) -> String {
    let identity = serde_json::json!([name.to_lowercase(), version, sha256]).to_string();
    Digest::of(identity.as_bytes()).to_hex()[..32].to_string()
}

fn app_key(id: &str) -> String {
    format!("a/{id}")
}

fn pairs_prefix(id: &str) -> String {
    format!("p/{id}/")
}

pub(super) fn pair_key(id: &str, client: &str) -> String {
    format!("p/{id}/{}", part(client))
}

/// The manager's application inventory.
#[derive(Clone)]
pub struct Inventory {
    kv: Kv,
    /// Held while a pair is looked up and written, so two uploads of one new pair count its
    /// client once.
    writing: Arc<Mutex<()>>,
    /// Records one search visits at most: [`SCAN_LIMIT`], smaller in tests.
    scan_limit: usize,
}

impl Inventory {
    /// Opens the inventory (a data dir of the previous format is moved over first, by
    /// `migrate::previous_format`).
    pub fn open(store: &Store) -> Result<Inventory, AppsError> {
        let kv = store.kv(TREE)?;
        Ok(Inventory {
            kv,
            writing: Arc::new(Mutex::new(())),
            scan_limit: SCAN_LIMIT,
        })
    }

    /// The same inventory, with searches visiting at most `records` each (at least 1).
    pub fn with_scan_limit(mut self, records: usize) -> Inventory {
        self.scan_limit = records.max(1);
        self
    }

    /// Records what a client reports it runs. A pair already known is written again only
    /// when its last-seen is [`LAST_SEEN_EVERY_S`] old; a new pair is written with its
    /// application's record (client count, last seen) in one atomic batch.
    pub fn add(&self, upload: &ApplicationUpload, now: DateTime<Utc>) -> Result<(), AppsError> {
        let _turn = self
            .writing
            .lock()
            .map_err(|_| Internal::poisoned("inventory"))?;
        for a in &upload.applications {
            self.add_one(&upload.client_id, a, now)?;
        }
        Ok(())
    }

    fn add_one(&self, client: &str, a: &Application, now: DateTime<Utc>) -> Result<(), AppsError> {
        let id = app_id(&a.name, a.version.as_deref(), a.sha256.as_deref());
        let pair = pair_key(&id, client);
        let known = self.kv.get::<Sighting>(&pair)?;
        if let Some(s) = &known {
            if (now - s.last_seen).num_seconds() < LAST_SEEN_EVERY_S {
                return Ok(());
            }
        }
        let mut app = self
            .kv
            .get::<AppRecord>(&app_key(&id))?
            .unwrap_or_else(|| AppRecord {
                id: id.clone(),
                name: a.name.clone(),
                version: a.version.clone(),
                path: a.path.clone(),
                sha256: a.sha256.clone(),
                first_seen: now,
                last_seen: now,
                client_count: 0,
            });
        app.last_seen = app.last_seen.max(now);
        let sighting = match known {
            Some(s) => Sighting {
                first_seen: s.first_seen,
                last_seen: now,
            },
            None => {
                app.client_count += 1;
                Sighting {
                    first_seen: now,
                    last_seen: now,
                }
            }
        };
        let mut batch = Batch::default();
        batch.put(&pair, &sighting)?;
        batch.put(&app_key(&id), &app)?;
        self.kv.apply(batch)?;
        Ok(())
    }

    /// Applications whose name or path contains `q.q` (case-insensitive; all when empty),
    /// in id order after `q.after`, each with its first [`CLIENTS_SHOWN`] clients. Stops
    /// after [`SCAN_LIMIT`] records with `next` where it stopped.
    pub fn search(&self, q: &AppQuery) -> Result<AppPage, AppsError> {
        let limit = page::limit(q.limit, DEFAULT_APPS, MAX_APPS)?;
        let text = q.q.as_deref().unwrap_or("").to_lowercase();
        // The smallest key after the cursor's: the cursor itself is on the previous page.
        let from = match q.after.as_deref().filter(|a| !a.is_empty()) {
            Some(a) => format!("{}\0", app_key(a)),
            None => "a/".to_string(),
        };
        let mut found: Vec<AppRecord> = Vec::new();
        let mut scanned = 0usize;
        let mut last: Option<String> = None;
        let mut stopped = false;
        self.kv.visit::<AppRecord>("a/", &from, false, |_, app| {
            let fits = text.is_empty()
                || app.name.to_lowercase().contains(&text)
                || app
                    .path
                    .as_deref()
                    .is_some_and(|p| p.to_lowercase().contains(&text));
            if fits && found.len() == limit {
                stopped = true;
                return false;
            }
            last = Some(app.id.clone());
            if fits {
                found.push(app);
            }
            scanned += 1;
            if scanned >= self.scan_limit {
                stopped = true;
                return false;
            }
            true
        })?;
        let mut applications = Vec::with_capacity(found.len());
        for app in found {
            let clients = self.clients_of(&app.id)?;
            applications.push(AppView { app, clients });
        }
        Ok(AppPage {
            applications,
            next: if stopped { last } else { None },
        })
    }

    /// The first [`CLIENTS_SHOWN`] clients of an application, by client id.
    fn clients_of(&self, id: &str) -> Result<Vec<ClientSeen>, AppsError> {
        let prefix = pairs_prefix(id);
        let mut out = Vec::new();
        self.kv
            .visit::<Sighting>(&prefix, &prefix, false, |key, s| {
                let client = key.strip_prefix(&prefix).unwrap_or(&key);
                out.push(ClientSeen {
                    client_id: unescape(client),
                    first_seen: s.first_seen,
                    last_seen: s.last_seen,
                });
                out.len() < CLIENTS_SHOWN
            })?;
        Ok(out)
    }
}

/// A key part back as the text it was made from (the inverse of `page::part`).
fn unescape(text: &str) -> String {
    if !text.contains('%') {
        return text.to_string();
    }
    text.replace("%00", "\0").replace("%25", "%")
}

#[cfg(test)]
#[path = "applications_tests.rs"]
mod tests;
