//! Events and learned applications: what flows from clients up to the manager.
//!
//! Owns the wire forms (`POST /v1/events`, `POST /v1/applications`, and the node-token batch
//! form), their validation, the critical-event rule, the node's durable outbox (an entry is
//! flushed to disk before the 202 and removed only after an upstream accepted it), and the
//! manager's records: each event stored once per (client_id, id), admin notifications with
//! their damper, and the application inventory. It must never talk to the network: the node
//! forwards what the outbox holds through `upstream`, the manager's routes call in here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::{Kv, Store, StoreError};

/// Longest event id.
pub const MAX_ID: usize = 128;

/// What can go wrong with events.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> EventsError {
    EventsError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// One event as a client sends it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub id: String,
    pub kind: String,
    #[serde(default)]
    pub subkind: Option<String>,
    /// RFC 3339, as sent.
    pub time: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Event {
    /// Critical events (contract): kind `risk` except subkind `cookie`, and kind `intrusion`.
    pub fn is_critical(&self) -> bool {
        match self.kind.as_str() {
            "risk" => self.subkind.as_deref() != Some("cookie"),
            "intrusion" => true,
            _ => false,
        }
    }

    /// The event's time, parsed.
    pub fn parsed_time(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.time)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// `POST /v1/events` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventUpload {
    pub client_id: String,
    pub events: Vec<Event>,
}

fn check_client_id(client_id: &str) -> Result<(), EventsError> {
    if client_id.is_empty() {
        return Err(invalid("client_id", "is required"));
    }
    if client_id.chars().count() > 128 || client_id.chars().any(char::is_control) {
        return Err(invalid(
            "client_id",
            "1 to 128 characters, no control characters",
        ));
    }
    Ok(())
}

impl EventUpload {
    /// Every event needs an `id` of 1 to 128 characters, a `kind`, and an RFC 3339 `time`.
    pub fn validate(&self) -> Result<(), EventsError> {
        check_client_id(&self.client_id)?;
        for (i, e) in self.events.iter().enumerate() {
            if e.id.is_empty() || e.id.chars().count() > MAX_ID {
                return Err(invalid(
                    format!("events[{i}].id"),
                    format!("must be 1 to {MAX_ID} characters"),
                ));
            }
            if e.kind.is_empty() || e.kind.chars().count() > 64 {
                return Err(invalid(
                    format!("events[{i}].kind"),
                    "must be 1 to 64 characters",
                ));
            }
            if e.parsed_time().is_none() {
                return Err(invalid(
                    format!("events[{i}].time"),
                    format!("{:?} is not an RFC 3339 time", e.time),
                ));
            }
        }
        Ok(())
    }
}

/// One application a client reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Application {
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
}

/// `POST /v1/applications` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplicationUpload {
    pub client_id: String,
    pub applications: Vec<Application>,
}

impl ApplicationUpload {
    pub fn validate(&self) -> Result<(), EventsError> {
        check_client_id(&self.client_id)?;
        for (i, a) in self.applications.iter().enumerate() {
            if a.name.is_empty() || a.name.chars().count() > 256 {
                return Err(invalid(
                    format!("applications[{i}].name"),
                    "must be 1 to 256 characters",
                ));
            }
        }
        Ok(())
    }
}

/// What a node's outbox holds and forwards, and what `POST /v1/node/events` carries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Upload {
    Events(EventUpload),
    Applications(ApplicationUpload),
}

impl Upload {
    pub fn is_critical(&self) -> bool {
        match self {
            Upload::Events(u) => u.events.iter().any(Event::is_critical),
            Upload::Applications(_) => false,
        }
    }

    pub fn count(&self) -> usize {
        match self {
            Upload::Events(u) => u.events.len(),
            Upload::Applications(u) => u.applications.len(),
        }
    }
}

/// `POST /v1/node/events` body: uploads a node accepted from its clients, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct UploadBatch {
    pub uploads: Vec<Upload>,
}

// === node: the durable outbox ===

/// A node's queue of accepted uploads not yet accepted upstream.
#[derive(Clone)]
pub struct Outbox {
    kv: Kv,
    /// The next sequence number (keys sort by it).
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Queued uploads holding a critical event, and queued events and applications: kept
    /// in memory so that neither question scans the queue.
    critical: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

fn seq_key(n: u64) -> String {
    format!("{n:020}")
}

impl Outbox {
    pub fn open(store: &Store) -> Result<Outbox, EventsError> {
        let kv = store.kv("outbox")?;
        let all = kv.scan::<Upload>("")?;
        let last = all
            .last()
            .and_then(|(k, _)| k.parse::<u64>().ok())
            .unwrap_or(0);
        let critical = all.iter().filter(|(_, u)| u.is_critical()).count();
        let queued = all.iter().map(|(_, u)| u.count()).sum();
        Ok(Outbox {
            kv,
            next: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(last + 1)),
            critical: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(critical)),
            queued: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(queued)),
        })
    }

    /// Appends an upload and makes it durable before returning.
    pub async fn push(&self, upload: &Upload) -> Result<(), EventsError> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.kv.put(&seq_key(n), upload)?;
        self.kv.flush().await?;
        self.queued
            .fetch_add(upload.count(), std::sync::atomic::Ordering::Relaxed);
        if upload.is_critical() {
            self.critical
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// The oldest uploads, up to `max_bytes` of JSON (at least one), with their keys.
    pub fn peek(&self, max_bytes: usize) -> Result<Vec<(String, Upload)>, EventsError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (k, u) in self.kv.scan::<Upload>("")? {
            let size = serde_json::to_vec(&u).map(|v| v.len()).unwrap_or(0);
            if !out.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            out.push((k, u));
        }
        Ok(out)
    }

    /// Whether any queued upload holds a critical event.
    pub fn has_critical(&self) -> Result<bool, EventsError> {
        Ok(self.critical.load(std::sync::atomic::Ordering::Relaxed) > 0)
    }

    /// Removes what an upstream accepted, durably.
    pub async fn remove(&self, keys: &[String]) -> Result<(), EventsError> {
        let mut critical = 0;
        let mut count = 0;
        for k in keys {
            // Two forwarders may race for a key: only the one that takes it counts it.
            if let Some(u) = self.kv.take::<Upload>(k)? {
                critical += usize::from(u.is_critical());
                count += u.count();
            }
        }
        self.kv.flush().await?;
        let sub = |a: &std::sync::atomic::AtomicUsize, n: usize| {
            let _ = a.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |v| Some(v.saturating_sub(n)),
            );
        };
        sub(&self.critical, critical);
        sub(&self.queued, count);
        Ok(())
    }

    /// Events (and applications) queued.
    pub fn queued(&self) -> Result<usize, EventsError> {
        Ok(self.queued.load(std::sync::atomic::Ordering::Relaxed))
    }
}

// === manager: events, notifications, applications ===

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
}

/// An admin notification: critical events of one (group, kind) within a damper period.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Notification {
    pub id: u64,
    pub group: String,
    pub kind: String,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    /// Events counted onto it, its first included.
    pub count: u64,
    /// The first event's client and id.
    pub client_id: String,
    pub event_id: String,
}

/// One learned application and the clients that have it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LearnedApplication {
    pub name: String,
    pub version: Option<String>,
    pub path: Option<String>,
    pub sha256: Option<String>,
    /// client id -> (first seen, last seen).
    pub clients: BTreeMap<String, (DateTime<Utc>, DateTime<Utc>)>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
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

/// Default and largest page of `GET /v1/admin/events`.
pub const DEFAULT_LIMIT: usize = 1000;
pub const MAX_LIMIT: usize = 10_000;

/// The manager's event records.
#[derive(Clone)]
pub struct EventStore {
    events: Kv,
    ids: Kv,
    notifications: Kv,
    apps: Kv,
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Serializes notification updates (read-modify-write).
    notify_lock: std::sync::Arc<std::sync::Mutex<()>>,
}

/// Where an event's client belongs when it is stored.
pub struct Origin {
    pub group: String,
    pub location: Option<String>,
}

impl EventStore {
    pub fn open(store: &Store) -> Result<EventStore, EventsError> {
        let events = store.kv("events")?;
        let last = events
            .scan::<StoredEvent>("")?
            .last()
            .map(|(_, e)| e.seq)
            .unwrap_or(0);
        Ok(EventStore {
            events,
            ids: store.kv("event_ids")?,
            notifications: store.kv("notifications")?,
            apps: store.kv("applications")?,
            next: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(last + 1)),
            notify_lock: std::sync::Arc::new(std::sync::Mutex::new(())),
        })
    }

    /// Stores each event of `upload` once per (client_id, id). Returns the events newly
    /// stored (for notifications).
    pub fn add_events(
        &self,
        upload: &EventUpload,
        origin: &Origin,
        now: DateTime<Utc>,
    ) -> Result<Vec<StoredEvent>, EventsError> {
        let mut stored = Vec::new();
        for e in &upload.events {
            let Some(time) = e.parsed_time() else {
                continue;
            };
            let id_key = format!("{}\u{0}{}", upload.client_id, e.id);
            let seq = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if !self.ids.put_if_absent(&id_key, &seq)? {
                continue;
            }
            let record = StoredEvent {
                id: e.id.clone(),
                client_id: upload.client_id.clone(),
                group: origin.group.clone(),
                location: origin.location.clone(),
                kind: e.kind.clone(),
                subkind: e.subkind.clone(),
                time,
                data: e.data.clone(),
                received_at: now,
                seq,
            };
            self.events.put(&seq_key(seq), &record)?;
            stored.push(record);
        }
        Ok(stored)
    }

    /// Raises or counts notifications for the critical events among `stored`. At most one
    /// notification per (group, kind) per `damper_s`; 0 means every event notifies. Returns
    /// the notifications created (for the webhook).
    pub fn notify(
        &self,
        stored: &[StoredEvent],
        damper_s: u64,
        now: DateTime<Utc>,
    ) -> Result<Vec<Notification>, EventsError> {
        let _guard = self.notify_lock.lock();
        let mut created = Vec::new();
        for e in stored {
            let critical = match e.kind.as_str() {
                "risk" => e.subkind.as_deref() != Some("cookie"),
                "intrusion" => true,
                _ => false,
            };
            if !critical {
                continue;
            }
            let prefix = format!("{}\u{0}{}\u{0}", e.group, e.kind);
            let latest = self.notifications.scan::<Notification>(&prefix)?.pop();
            match latest {
                Some((key, mut n))
                    if damper_s > 0 && (now - n.first_at).num_seconds() < damper_s as i64 =>
                {
                    n.count += 1;
                    n.last_at = now;
                    self.notifications.put(&key, &n)?;
                }
                _ => {
                    let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let n = Notification {
                        id,
                        group: e.group.clone(),
                        kind: e.kind.clone(),
                        first_at: now,
                        last_at: now,
                        count: 1,
                        client_id: e.client_id.clone(),
                        event_id: e.id.clone(),
                    };
                    self.notifications.put(&format!("{prefix}{id:020}"), &n)?;
                    created.push(n);
                }
            }
        }
        Ok(created)
    }

    /// Every notification, newest first.
    pub fn notifications(&self) -> Result<Vec<Notification>, EventsError> {
        let mut all: Vec<Notification> = self
            .notifications
            .scan::<Notification>("")?
            .into_iter()
            .map(|(_, n)| n)
            .collect();
        all.sort_by(|a, b| b.first_at.cmp(&a.first_at).then(b.id.cmp(&a.id)));
        Ok(all)
    }

    /// A page of events matching `q`, and the cursor of the next page.
    pub fn query(&self, q: &EventQuery) -> Result<(Vec<StoredEvent>, Option<u64>), EventsError> {
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(invalid("limit", format!("must be 1 to {MAX_LIMIT}")));
        }
        let start = q.after.map_or(0, |a| a + 1);
        let mut out: Vec<StoredEvent> = Vec::new();
        let mut more = false;
        self.events
            .visit_from::<StoredEvent>(&seq_key(start), |_, e| {
                let keep = q.kind.as_ref().is_none_or(|k| *k == e.kind)
                    && q.client.as_ref().is_none_or(|c| *c == e.client_id)
                    && q.group.as_ref().is_none_or(|g| *g == e.group)
                    && q.since.is_none_or(|s| e.time >= s);
                if !keep {
                    return true;
                }
                if out.len() == limit {
                    more = true;
                    return false;
                }
                out.push(e);
                true
            })?;
        let next = if more {
            out.last().map(|e| e.seq)
        } else {
            None
        };
        Ok((out, next))
    }

    /// Records what a client reports it runs.
    pub fn add_applications(
        &self,
        upload: &ApplicationUpload,
        now: DateTime<Utc>,
    ) -> Result<(), EventsError> {
        for a in &upload.applications {
            let key = format!(
                "{}\u{0}{}\u{0}{}",
                a.name.to_lowercase(),
                a.version.as_deref().unwrap_or(""),
                a.sha256.as_deref().unwrap_or("")
            );
            let mut app =
                self.apps
                    .get::<LearnedApplication>(&key)?
                    .unwrap_or(LearnedApplication {
                        name: a.name.clone(),
                        version: a.version.clone(),
                        path: a.path.clone(),
                        sha256: a.sha256.clone(),
                        clients: BTreeMap::new(),
                        first_seen: now,
                        last_seen: now,
                    });
            app.last_seen = now;
            app.clients
                .entry(upload.client_id.clone())
                .and_modify(|(_, last)| *last = now)
                .or_insert((now, now));
            self.apps.put(&key, &app)?;
        }
        Ok(())
    }

    /// Applications whose name or path contains `q` (case-insensitive); all when empty.
    pub fn search_applications(&self, q: &str) -> Result<Vec<LearnedApplication>, EventsError> {
        let q = q.to_lowercase();
        Ok(self
            .apps
            .scan::<LearnedApplication>("")?
            .into_iter()
            .map(|(_, a)| a)
            .filter(|a| {
                q.is_empty()
                    || a.name.to_lowercase().contains(&q)
                    || a.path
                        .as_deref()
                        .is_some_and(|p| p.to_lowercase().contains(&q))
            })
            .collect())
    }

    /// Makes everything stored so far durable (before a 202).
    pub async fn flush(&self) -> Result<(), EventsError> {
        self.events.flush().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn ev(id: &str, kind: &str, subkind: Option<&str>) -> Event {
        Event {
            id: id.into(),
            kind: kind.into(),
            subkind: subkind.map(str::to_string),
            time: "2026-11-24T10:00:00Z".into(),
            data: serde_json::json!({}),
        }
    }

    #[test]
    fn critical_rule_and_validation() {
        assert!(ev("1", "risk", Some("virus")).is_critical());
        assert!(ev("1", "risk", None).is_critical());
        assert!(!ev("1", "risk", Some("cookie")).is_critical());
        assert!(ev("1", "intrusion", None).is_critical());
        assert!(!ev("1", "system_change", None).is_critical());
        let mut u = EventUpload {
            client_id: "c".into(),
            events: vec![ev("1", "risk", None)],
        };
        assert!(u.validate().is_ok());
        u.events[0].id = "x".repeat(129);
        let e = u.validate().unwrap_err().to_string();
        assert!(e.starts_with("events[0].id"), "{e}");
        u.events[0].id = "ok".into();
        u.events[0].time = "yesterday".into();
        assert!(u
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("events[0].time"));
        u.events[0].time = "2026-11-24T10:00:00+02:00".into();
        u.events[0].kind = String::new();
        assert!(u
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("events[0].kind"));
        u.client_id = String::new();
        assert!(u
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("client_id"));
    }

    #[tokio::test]
    async fn outbox_survives_reopen_in_order_and_removes_what_was_accepted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let outbox = Outbox::open(&store).unwrap();
            for i in 0..3 {
                let u = Upload::Events(EventUpload {
                    client_id: format!("c{i}"),
                    events: vec![ev(&i.to_string(), "system_change", None)],
                });
                outbox.push(&u).await.unwrap();
            }
            assert!(!outbox.has_critical().unwrap());
        }
        let store = Store::open(dir.path()).unwrap();
        let outbox = Outbox::open(&store).unwrap();
        let page = outbox.peek(1 << 20).unwrap();
        assert_eq!(page.len(), 3);
        assert!(matches!(&page[0].1, Upload::Events(u) if u.client_id == "c0"));
        // A tiny budget still yields one.
        assert_eq!(outbox.peek(1).unwrap().len(), 1);
        outbox.remove(&[page[0].0.clone()]).await.unwrap();
        assert_eq!(outbox.queued().unwrap(), 2);
        // New pushes go after what is there.
        outbox
            .push(&Upload::Events(EventUpload {
                client_id: "c9".into(),
                events: vec![ev("9", "risk", None)],
            }))
            .await
            .unwrap();
        let page = outbox.peek(1 << 20).unwrap();
        assert!(matches!(&page.last().unwrap().1, Upload::Events(u) if u.client_id == "c9"));
        assert!(outbox.has_critical().unwrap());
    }

    #[test]
    fn stored_once_queried_paged_and_damped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let es = EventStore::open(&store).unwrap();
        let origin = Origin {
            group: "branch".into(),
            location: None,
        };
        let now = Utc::now();
        let up = EventUpload {
            client_id: "c".into(),
            events: (0..5)
                .map(|i| ev(&i.to_string(), "risk", Some("virus")))
                .collect(),
        };
        let stored = es.add_events(&up, &origin, now).unwrap();
        assert_eq!(stored.len(), 5);
        // Re-sent ids are accepted and stored once.
        assert!(es.add_events(&up, &origin, now).unwrap().is_empty());
        // Damper: one notification counting all five.
        let created = es.notify(&stored, 3600, now).unwrap();
        assert_eq!(created.len(), 1);
        let n = es.notifications().unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].count, 5);
        // After the period, a new one; with damper 0, one per event.
        let later = now + Duration::seconds(3601);
        es.notify(&stored[..1], 3600, later).unwrap();
        assert_eq!(es.notifications().unwrap().len(), 2);
        es.notify(&stored[..2], 0, later).unwrap();
        assert_eq!(es.notifications().unwrap().len(), 4);
        // Pagination and filters.
        let (page, next) = es
            .query(&EventQuery {
                limit: Some(2),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(page.len(), 2);
        let (rest, end) = es
            .query(&EventQuery {
                limit: Some(10),
                after: next,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(rest.len(), 3);
        assert_eq!(end, None);
        let (none, _) = es
            .query(&EventQuery {
                kind: Some("intrusion".into()),
                ..Default::default()
            })
            .unwrap();
        assert!(none.is_empty());
        assert!(es
            .query(&EventQuery {
                limit: Some(10_001),
                ..Default::default()
            })
            .is_err());
    }

    #[test]
    fn applications_inventory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let es = EventStore::open(&store).unwrap();
        let now = Utc::now();
        for c in ["a", "b"] {
            es.add_applications(
                &ApplicationUpload {
                    client_id: c.into(),
                    applications: vec![Application {
                        name: "Notepad++".into(),
                        version: Some("8.6".into()),
                        path: Some("C:\\Program Files\\Notepad++\\notepad++.exe".into()),
                        sha256: None,
                    }],
                },
                now,
            )
            .unwrap();
        }
        let found = es.search_applications("notepad").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].clients.len(), 2);
        assert!(es.search_applications("program files").unwrap().len() == 1);
        assert!(es.search_applications("chrome").unwrap().is_empty());
    }
}
