//! The manager's records of the events clients uploaded and the admin notifications.
//!
//! Owns each event stored once per (client_id, id) under the group its client was placed in,
//! paged with a cursor; admin notifications for critical events with their damper; and the
//! delivery of a new notification to the admin's webhook. (Learned applications are
//! `applications`'.)
//! Persistence is through `store::Kv`. It must never decide where a client belongs.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::core::fault::{Fault, Kind};
use crate::core::proto::{is_critical, EventUpload, Placement};
use crate::store::{Kv, Store, StoreError};

/// What can go wrong with the event records.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Fault for EventsError {
    fn kind(&self) -> Kind {
        match self {
            EventsError::Invalid { .. } => Kind::BadInput,
            EventsError::Store(e) => e.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            EventsError::Invalid { .. } => "bad_request",
            EventsError::Store(e) => e.code(),
        }
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> EventsError {
    EventsError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn seq_key(n: u64) -> String {
    format!("{n:020}")
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
    next: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Serializes notification updates (read-modify-write).
    notify_lock: std::sync::Arc<std::sync::Mutex<()>>,
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
            next: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(last + 1)),
            notify_lock: std::sync::Arc::new(std::sync::Mutex::new(())),
        })
    }

    /// Stores each event of `upload` once per (client_id, id). Returns the events newly
    /// stored (for notifications).
    pub fn add_events(
        &self,
        upload: &EventUpload,
        origin: &Placement,
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
            if !is_critical(&e.kind, e.subkind.as_deref()) {
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

    /// Makes everything stored so far durable (before a 202).
    pub async fn flush(&self) -> Result<(), EventsError> {
        self.events.flush().await?;
        Ok(())
    }
}

/// POSTs a notification to the webhook, retrying with backoff (5 tries).
pub async fn deliver_webhook(http: reqwest::Client, url: String, n: Notification) {
    use backon::{ExponentialBuilder, Retryable};
    let send = || async {
        http.post(&url)
            .timeout(std::time::Duration::from_secs(10))
            .json(&n)
            .send()
            .await
            .and_then(|r| r.error_for_status())
    };
    let result = send
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(std::time::Duration::from_millis(500))
                .with_max_times(5)
                .with_jitter(),
        )
        .sleep(tokio::time::sleep)
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, %url, "notification webhook failed after retries");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::proto::Event;
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
    fn stored_once_queried_paged_and_damped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let es = EventStore::open(&store).unwrap();
        let origin = Placement {
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
}
