//! The admin notifications: at most one per (group, kind) per damper period, counting what
//! it held back and listing the first [`MAX_EVENT_IDS`] ids of the events it counts, listed
//! newest first, acknowledged by an admin, and delivered once to the admin's webhook.
//!
//! Owns the [`Notification`] records in [`NOTICES_TREE`] (`n/{id:020}` each,
//! `p/{group}\0{kind}\0{id:020}` the latest of a (group, kind)), how critical events raise or
//! count them (planned into the same atomic step as the events, see
//! [`EventStore::accept`]), their pages, acknowledging them, and the webhook call.
//! Notification ids come from the event store's counters, so they are numbered under the
//! same lock as the events that raise them. A node gone overdue raises one too
//! ([`EventStore::raise_node`], damped per node: `d/{node}\0{kind}\0{id:020}` finds the
//! latest about a node).
//!
//! **Acknowledging** sets `acked_at` on the record, once (again is a no-op that answers the
//! record as it is). An acknowledged notification is closed: it counts no further event, so
//! the next critical event of its (group, kind) raises a new one within the damper period
//! rather than vanishing into a notification the admin has cleared (so at most one more per
//! acknowledgement). Acknowledging them all walks newest first in atomic batches of
//! [`ACK_BATCH`], each under the intake lock (intake counts onto a notification with a read
//! and a write under that lock), and then records the highest id it covered
//! (`s/acked_through`): the next one stops there, and so does the listing of unacknowledged
//! ones, so neither walks the history again. It must never store events or decide where a
//! client belongs.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[cfg(doc)]
use super::events::NOTICES_TREE;
use super::events::{exhausted, Counters, EventStore, EventsError, StoredEvent};
use super::page::{self, part, seq_part, DEFAULT_LIMIT, MAX_LIMIT};
use crate::core::fault::{Fault, Kind};
use crate::core::proto::is_critical;
use crate::store::{Batch, StoreError};

/// An admin notification: critical events of one (group, kind) within a damper period, or a
/// node gone overdue (kind `node_overdue`, one per node within a damper period).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Notification {
    pub id: u64,
    pub group: String,
    pub kind: String,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
    /// Events counted onto it, its first included.
    pub count: u64,
    /// The first event's client and id (for `node_overdue`: the node's id, and empty).
    pub client_id: String,
    pub event_id: String,
    /// The node a `node_overdue` notification is about (its `group` is then `default`, the
    /// root of the tree every node serves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The content a `content_corrupt` notification is about: its item's name and version
    /// (empty when no retained revision lists it any more) and its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// The ids of the events it counts, in arrival order, the first [`MAX_EVENT_IDS`] of
    /// them (`count` goes on beyond): so an admin finds the events, not only the first.
    /// Empty for `node_overdue`, and on notifications stored before this field was.
    #[serde(default)]
    pub event_ids: Vec<String>,
    /// When an admin acknowledged it (`POST /v1/admin/notifications/{id}/ack`); null while
    /// it is open. An acknowledged notification counts no further events: the next one of
    /// its (group, kind), or node, raises a new notification.
    #[serde(default)]
    pub acked_at: Option<DateTime<Utc>>,
}

impl Notification {
    /// A notification `id` of `kind` raised `now`, counting one, about nothing yet: its
    /// group is `default` (the root of the tree) until the caller says otherwise.
    fn new(id: u64, kind: &str, now: DateTime<Utc>) -> Notification {
        Notification {
            id,
            group: crate::core::settings::DEFAULT_GROUP.to_string(),
            kind: kind.to_string(),
            first_at: now,
            last_at: now,
            count: 1,
            client_id: String::new(),
            event_id: String::new(),
            node_id: None,
            item: None,
            version: None,
            sha256: None,
            event_ids: Vec::new(),
            acked_at: None,
        }
    }
}

/// Event ids a notification lists at most (its `count` counts them all): a bound on the
/// record, which is rewritten at every event it counts.
pub const MAX_EVENT_IDS: usize = 100;

/// Notifications one ack of them all rewrites per atomic batch (with the intake lock held
/// for that batch only).
pub const ACK_BATCH: usize = 1_000;

/// Every notification with an id at or below the value at this key is acknowledged: where
/// the next acknowledgement of them all stops walking, and where `unacked` listing stops.
const ACKED_THROUGH_KEY: &str = "s/acked_through";

/// What acknowledging refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("no notification {0:?}")]
    NoSuch(String),
    #[error("all: must be true to acknowledge every notification (use /v1/admin/notifications/{{id}}/ack for one)")]
    NotAll,
}

impl Fault for AckError {
    fn kind(&self) -> Kind {
        match self {
            AckError::NoSuch(_) => Kind::NotFound,
            AckError::NotAll => Kind::BadInput,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            AckError::NoSuch(_) => "no_such_notification",
            AckError::NotAll => "bad_request",
        }
    }
}

/// What acknowledging every notification did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AckedAll {
    /// Notifications acknowledged now (those acknowledged before are not counted).
    pub acked: u64,
    /// Every notification with an id up to this one is now acknowledged (0: there is none).
    pub through: u64,
    pub acked_at: DateTime<Utc>,
}

/// A page of `GET /v1/admin/notifications`, newest first.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NoticeQuery {
    pub limit: Option<usize>,
    /// The id of the last notification of the previous page: this page holds older ones.
    pub after: Option<u64>,
    /// Only the notifications not acknowledged. Such a page visits at most the scan bound's
    /// worth of notifications, so it may be short while `next` is set.
    #[serde(default)]
    pub unacked: bool,
}

/// One answer of `GET /v1/admin/notifications`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct NoticePage {
    pub notifications: Vec<Notification>,
    pub next: Option<u64>,
}

pub(super) fn notice_key(id: u64) -> String {
    format!("n/{}", seq_part(id))
}

/// Adds a notification and its (group, kind) entry to `batch`.
pub(super) fn put_notice(batch: &mut Batch, n: &Notification) -> Result<(), StoreError> {
    batch.put(&notice_key(n.id), n)?;
    let latest = format!(
        "p/{}\0{}\0{}",
        part(&n.group),
        part(&n.kind),
        seq_part(n.id)
    );
    batch.put(&latest, &n.id)?;
    Ok(())
}

/// The prefix of the entries that find the latest notification of `kind` about node `node`.
fn node_prefix(node: &str, kind: &str) -> String {
    format!("d/{}\0{}\0", part(node), part(kind))
}

impl EventStore {
    /// Raises a notification of `kind` about node `node_id`, damped per node: within
    /// `damper_s` (0: never) of the latest one about that node and kind, that one counts it
    /// instead and None is returned. Durable after [`EventStore::flush`].
    pub fn raise_node(
        &self,
        node_id: &str,
        kind: &str,
        damper_s: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<Notification>, EventsError> {
        self.raise_damped(&node_prefix(node_id, kind), damper_s, now, |id| {
            Notification {
                client_id: node_id.to_string(),
                node_id: Some(node_id.to_string()),
                ..Notification::new(id, kind, now)
            }
        })
    }

    /// Raises a notification of `kind` about stored content (`digest`, listed as item
    /// `name` `version`), damped per digest as [`EventStore::raise_node`] is per node.
    pub fn raise_content(
        &self,
        digest: &crate::core::digest::Digest,
        name: &str,
        version: &str,
        kind: &str,
        damper_s: u64,
        now: DateTime<Utc>,
    ) -> Result<Option<Notification>, EventsError> {
        let hex = digest.to_hex();
        let prefix = format!("b/{}\0{}\0", part(&hex), part(kind));
        self.raise_damped(&prefix, damper_s, now, |id| Notification {
            item: Some(name.to_string()),
            version: Some(version.to_string()),
            sha256: Some(hex.clone()),
            ..Notification::new(id, kind, now)
        })
    }

    /// Raises the notification `make` builds (given its id), damped by the latest one under
    /// `prefix`: within `damper_s` (0: never) of that one's first, it counts this instead
    /// and None is returned. Durable after [`EventStore::flush`].
    fn raise_damped(
        &self,
        prefix: &str,
        damper_s: u64,
        now: DateTime<Utc>,
        make: impl FnOnce(u64) -> Notification,
    ) -> Result<Option<Notification>, EventsError> {
        let mut counters = self.lock()?;
        let damper = i64::try_from(damper_s).unwrap_or(i64::MAX);
        if let Some((_, id)) = self.notices.last::<u64>(prefix)? {
            if let Some(mut n) = self.notices.get::<Notification>(&notice_key(id))? {
                if n.acked_at.is_none() && damper > 0 && (now - n.first_at).num_seconds() < damper {
                    n.count += 1;
                    n.last_at = now;
                    self.notices.put(&notice_key(id), &n)?;
                    return Ok(None);
                }
            }
        }
        let n = make(counters.notice);
        let next =
            n.id.checked_add(1)
                .ok_or_else(|| exhausted("notification"))?;
        let mut batch = Batch::default();
        batch.put(&notice_key(n.id), &n)?;
        batch.put(&format!("{prefix}{}", seq_part(n.id)), &n.id)?;
        self.notices.apply(batch)?;
        counters.notice = next;
        Ok(Some(n))
    }

    /// Raises or counts notifications for the critical events among `stored`, in one
    /// atomic batch. At most one notification per (group, kind) per `damper_s`; 0 means
    /// every event notifies. Returns the notifications created (for the webhook).
    /// [`EventStore::accept`] does this in the same step as it stores the events.
    pub fn notify(
        &self,
        stored: &[StoredEvent],
        damper_s: u64,
        now: DateTime<Utc>,
    ) -> Result<Vec<Notification>, EventsError> {
        let mut counters = self.lock()?;
        let mut next = *counters;
        let mut batch = Batch::default();
        let created = self.plan_notices(stored, damper_s, now, &mut next, &mut batch)?;
        if !batch.is_empty() {
            self.notices.apply(batch)?;
        }
        *counters = next;
        Ok(created)
    }

    /// Puts into `batch` what the critical events among `stored` do to the notifications:
    /// each raises one, numbered from `next.notice`, or counts onto the latest of its
    /// (group, kind) while that is younger than `damper_s` (0: every event raises one).
    /// The latest of a (group, kind) is found with one lookup from the end of its entries,
    /// or among those this batch already touched. Returns the notifications raised.
    pub(super) fn plan_notices(
        &self,
        stored: &[StoredEvent],
        damper_s: u64,
        now: DateTime<Utc>,
        next: &mut Counters,
        batch: &mut Batch,
    ) -> Result<Vec<Notification>, EventsError> {
        let damper = i64::try_from(damper_s).unwrap_or(i64::MAX);
        // Every notification this batch raised or counted onto, by id, and whether it
        // raised it; and the latest of each (group, kind) among them.
        let mut touched: BTreeMap<u64, (Notification, bool)> = BTreeMap::new();
        let mut latest: HashMap<(String, String), u64> = HashMap::new();
        for e in stored {
            if !is_critical(&e.kind, e.subkind.as_deref()) {
                continue;
            }
            let at = (e.group.clone(), e.kind.clone());
            if !latest.contains_key(&at) {
                let prefix = format!("p/{}\0{}\0", part(&e.group), part(&e.kind));
                if let Some((_, id)) = self.notices.last::<u64>(&prefix)? {
                    if let Some(n) = self.notices.get::<Notification>(&notice_key(id))? {
                        touched.insert(id, (n, false));
                        latest.insert(at.clone(), id);
                    }
                }
            }
            let current = latest.get(&at).and_then(|id| touched.get_mut(id));
            match current {
                Some((n, _))
                    if n.acked_at.is_none()
                        && damper > 0
                        && (now - n.first_at).num_seconds() < damper =>
                {
                    n.count += 1;
                    n.last_at = now;
                    if n.event_ids.len() < MAX_EVENT_IDS {
                        n.event_ids.push(e.id.clone());
                    }
                }
                _ => {
                    let n = Notification {
                        group: e.group.clone(),
                        client_id: e.client_id.clone(),
                        event_id: e.id.clone(),
                        event_ids: vec![e.id.clone()],
                        ..Notification::new(next.notice, &e.kind, now)
                    };
                    next.notice = next
                        .notice
                        .checked_add(1)
                        .ok_or_else(|| exhausted("notification"))?;
                    latest.insert(at, n.id);
                    touched.insert(n.id, (n, true));
                }
            }
        }
        let mut created = Vec::new();
        for (n, raised) in touched.into_values() {
            if raised {
                put_notice(batch, &n)?;
                created.push(n);
            } else {
                batch.put(&notice_key(n.id), &n)?;
            }
        }
        Ok(created)
    }

    /// Notifications newest first, at most `limit`, older than the id `after`; with
    /// `unacked`, only those not acknowledged, visiting at most the scan bound's worth (the
    /// page then ends short with `next` where it stopped) and none at or below the last
    /// acknowledgement of them all.
    pub fn notifications(&self, q: &NoticeQuery) -> Result<NoticePage, EventsError> {
        let limit = page::limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
        let from = match q.after.map(|a| a.checked_sub(1)) {
            None => "n/".to_string(),
            Some(Some(before)) => notice_key(before),
            Some(None) => return Ok(NoticePage::default()),
        };
        let floor = if q.unacked { self.acked_through()? } else { 0 };
        let mut out: Vec<Notification> = Vec::new();
        // The id to continue below when the page ends before the notifications do.
        let mut next = None;
        let mut visited = 0usize;
        let mut last = None;
        self.notices
            .visit::<Notification>("n/", &from, true, |_, n| {
                if n.id <= floor {
                    return false;
                }
                if out.len() == limit {
                    next = last;
                    return false;
                }
                if q.unacked && visited == self.scan_limit {
                    next = last;
                    return false;
                }
                visited += 1;
                last = Some(n.id);
                if !q.unacked || n.acked_at.is_none() {
                    out.push(n);
                }
                true
            })?;
        Ok(NoticePage {
            notifications: out,
            next,
        })
    }

    /// Every notification with an id at or below this is acknowledged (0: none known).
    fn acked_through(&self) -> Result<u64, EventsError> {
        Ok(self.notices.get::<u64>(ACKED_THROUGH_KEY)?.unwrap_or(0))
    }

    /// Acknowledges notification `id` at `now` and returns it; one acknowledged before keeps
    /// its `acked_at` (acknowledging is idempotent). Durable after [`EventStore::flush`].
    pub fn ack(&self, id: &str, now: DateTime<Utc>) -> Result<Notification, EventsError> {
        let no_such = || AckError::NoSuch(id.to_string());
        let seq: u64 = id.parse().map_err(|_| no_such())?;
        // Under the intake lock: intake counts onto notifications with a read and a write.
        let _counters = self.lock()?;
        let key = notice_key(seq);
        let mut n = self
            .notices
            .get::<Notification>(&key)?
            .ok_or_else(no_such)?;
        if n.acked_at.is_none() {
            n.acked_at = Some(now);
            self.notices.put(&key, &n)?;
        }
        Ok(n)
    }

    /// Acknowledges at `now` every notification raised so far (with `up_to`, those with an
    /// id up to it), newest first in batches of [`ACK_BATCH`], each one atomic and under the
    /// intake lock alone; it walks no further down than the last such acknowledgement
    /// reached. Durable after [`EventStore::flush`].
    pub fn ack_all(&self, up_to: Option<u64>, now: DateTime<Utc>) -> Result<AckedAll, EventsError> {
        let newest = self.lock()?.notice.saturating_sub(1);
        let top = up_to.map_or(newest, |u| u.min(newest));
        let floor = self.acked_through()?;
        let mut acked = 0u64;
        let mut cursor = top;
        while cursor > floor {
            let _counters = self.lock()?;
            let mut open = Vec::new();
            let mut visited = 0usize;
            let mut lowest = None;
            self.notices
                .visit::<Notification>("n/", &notice_key(cursor), true, |_, n| {
                    if n.id <= floor || visited == ACK_BATCH {
                        return false;
                    }
                    visited += 1;
                    lowest = Some(n.id);
                    if n.acked_at.is_none() {
                        open.push(n);
                    }
                    true
                })?;
            if !open.is_empty() {
                let mut batch = Batch::default();
                for mut n in open {
                    n.acked_at = Some(now);
                    batch.put(&notice_key(n.id), &n)?;
                    acked += 1;
                }
                self.notices.apply(batch)?;
            }
            match lowest {
                Some(id) if id > floor + 1 && visited == ACK_BATCH => cursor = id - 1,
                _ => break,
            }
        }
        if top > floor {
            self.notices.put(ACKED_THROUGH_KEY, &top)?;
        }
        Ok(AckedAll {
            acked,
            through: top.max(floor),
            acked_at: now,
        })
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
