//! The manager's table of nodes: the latest report of every node in the tree below it.
//!
//! Owns the node records (each node's last [`NodeReport`], when the manager received it, and
//! whether its going overdue was notified), persisted through `store::Kv` (tree [`TREE`]) so a
//! restarted manager still knows its nodes and can still call a dead one overdue; the bound
//! on them ([`MAX_NODES`]); `GET /v1/admin/nodes`; and the background check that raises one
//! `node_overdue` notification when a node goes quiet. A node is **overdue** when no report
//! of it arrived for three of its own sync intervals. It must never talk to a node: it only
//! hears what reports bring.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::Manager;
use crate::core::fault::{Fault, Internal, Kind};
use crate::core::fleet::NodeReport;
use crate::http::error::ApiError;
use crate::store::{Kv, Store, StoreError};

/// The kv tree of node records: `{node_id}` -> [`NodeEntry`].
pub const TREE: &str = "nodes";
/// Most nodes the table holds: 10,000, an order of magnitude beyond the largest fleets this
/// product serves (a node per branch office), and small enough to hold in memory (about
/// 1 KiB a record, 10 MiB at most) and to walk every [`CHECK_INTERVAL`]. A report of a node
/// the table does not know while it is full is refused (logged), never made room for: the
/// nodes already known are real, and an id made up behind the node token must not push
/// them out.
pub const MAX_NODES: usize = 10_000;
/// How often the manager looks for nodes that went overdue: a walk over at most
/// [`MAX_NODES`] records in memory costs well under a millisecond, and a second keeps the
/// notification within a second of the moment a node became overdue.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Sync intervals without a report after which a node is overdue.
pub const OVERDUE_INTERVALS: u64 = 3;
/// The notification kind a node going overdue raises.
pub const NODE_OVERDUE: &str = "node_overdue";

/// What can go wrong with the node table.
#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Internal(#[from] Internal),
}

impl Fault for NodesError {
    fn kind(&self) -> Kind {
        match self {
            NodesError::Store(e) => e.kind(),
            NodesError::Internal(e) => e.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            NodesError::Store(e) => e.code(),
            NodesError::Internal(e) => e.code(),
        }
    }
}

/// What the manager keeps of a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeEntry {
    pub report: NodeReport,
    /// When the manager received the report (its own clock: overdue is judged on it, never
    /// on a node's).
    pub received_at: DateTime<Utc>,
    /// Its going overdue was notified: a node that stays down is notified once; its next
    /// report clears this.
    #[serde(default)]
    pub notified: bool,
}

impl NodeEntry {
    /// No report for [`OVERDUE_INTERVALS`] of the node's sync intervals.
    pub fn overdue(&self, now: DateTime<Utc>) -> bool {
        let quiet = (now - self.received_at).num_milliseconds();
        let allowed = self
            .report
            .sync_interval_s
            .saturating_mul(OVERDUE_INTERVALS)
            .saturating_mul(1000);
        quiet > 0 && quiet as u64 > allowed
    }
}

/// One node of `GET /v1/admin/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeView {
    #[serde(flatten)]
    pub report: NodeReport,
    pub received_at: DateTime<Utc>,
    /// The manager's catalog revision minus the node's (0 when the node is level or ahead).
    pub revisions_behind: u64,
    pub overdue: bool,
}

/// `GET /v1/admin/nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct NodesPage {
    pub nodes: Vec<NodeView>,
}

/// The manager's node table: in memory, written through to the store.
pub struct NodeTable {
    kv: Kv,
    entries: Mutex<BTreeMap<String, NodeEntry>>,
    /// [`MAX_NODES`], smaller in tests.
    max: usize,
}

impl NodeTable {
    /// Loads the table from the store (it never holds more than [`MAX_NODES`] records).
    pub fn open(store: &Store) -> Result<NodeTable, NodesError> {
        let kv = store.kv(TREE)?;
        let entries: BTreeMap<String, NodeEntry> = kv.scan::<NodeEntry>("")?.into_iter().collect();
        Ok(NodeTable {
            kv,
            entries: Mutex::new(entries),
            max: MAX_NODES,
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, NodeEntry>>, Internal> {
        self.entries.lock().map_err(|_| Internal::poisoned("nodes"))
    }

    /// Records validated reports received `now`; returns the ids refused because the table
    /// is full.
    pub fn record(
        &self,
        reports: Vec<NodeReport>,
        now: DateTime<Utc>,
    ) -> Result<Vec<String>, NodesError> {
        let mut entries = self.lock()?;
        let mut refused = Vec::new();
        for report in reports {
            if !entries.contains_key(&report.node_id) && entries.len() >= self.max {
                refused.push(report.node_id);
                continue;
            }
            let entry = NodeEntry {
                report,
                received_at: now,
                notified: false,
            };
            self.kv.put(&entry.report.node_id, &entry)?;
            entries.insert(entry.report.node_id.clone(), entry);
        }
        Ok(refused)
    }

    /// Every node, in id order, as the admin API shows it against the manager's `revision`.
    pub fn list(&self, revision: u64, now: DateTime<Utc>) -> Result<NodesPage, NodesError> {
        let entries = self.lock()?;
        let nodes = entries
            .values()
            .map(|e| NodeView {
                report: e.report.clone(),
                received_at: e.received_at,
                revisions_behind: revision.saturating_sub(e.report.catalog_revision),
                overdue: e.overdue(now),
            })
            .collect();
        Ok(NodesPage { nodes })
    }

    /// The nodes overdue at `now` and not yet notified, marked notified (durably, so a
    /// restarted manager does not notify them again).
    pub fn newly_overdue(&self, now: DateTime<Utc>) -> Result<Vec<NodeEntry>, NodesError> {
        let mut entries = self.lock()?;
        let mut out = Vec::new();
        for e in entries.values_mut() {
            if !e.notified && e.overdue(now) {
                e.notified = true;
                self.kv.put(&e.report.node_id, &*e)?;
                out.push(e.clone());
            }
        }
        Ok(out)
    }

    /// Makes the records durable (at shutdown, and after a notification).
    pub async fn flush(&self) -> Result<(), NodesError> {
        self.kv.flush().await?;
        Ok(())
    }
}

impl Manager {
    /// Every [`CHECK_INTERVAL`] until shutdown: a node gone overdue raises one `node_overdue`
    /// notification (damped per node, `notification_damper_s`), delivered to the webhook.
    pub(super) async fn overdue_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(CHECK_INTERVAL) => {}
                _ = self.shutdown.clone().wait() => return,
            }
            if let Err(e) = self.check_overdue(Utc::now()).await {
                tracing::warn!(error = %e, "could not check nodes for overdue");
            }
        }
    }

    async fn check_overdue(&self, now: DateTime<Utc>) -> Result<(), ApiError> {
        let gone = self.nodes.newly_overdue(now)?;
        if gone.is_empty() {
            return Ok(());
        }
        let damper = self.served.directory()?.site.notification_damper_s;
        let mut created = Vec::new();
        for e in &gone {
            let id = &e.report.node_id;
            tracing::warn!(node = %id, name = %e.report.name, last_report = %e.received_at, "node overdue");
            if let Some(n) = self.events.raise_node(id, NODE_OVERDUE, damper, now)? {
                created.push(n);
            }
        }
        self.nodes.flush().await?;
        self.events.flush().await?;
        for n in created {
            if let Some(url) = &self.webhook {
                tokio::spawn(super::events::deliver_webhook(
                    self.http.clone(),
                    url.clone(),
                    n,
                ));
            }
        }
        Ok(())
    }
}

/// `GET /v1/admin/nodes`: every node with its last report, `received_at`,
/// `revisions_behind`, `via` and `overdue`.
pub(super) async fn admin_nodes(
    State(m): State<Arc<Manager>>,
) -> Result<Json<NodesPage>, ApiError> {
    let revision = m.served.catalog()?.revision();
    Ok(Json(m.nodes.list(revision, Utc::now())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fleet::sample_report;

    fn table(dir: &std::path::Path) -> NodeTable {
        NodeTable::open(&Store::open(dir).unwrap()).unwrap()
    }

    #[test]
    fn a_node_is_overdue_after_three_of_its_intervals_and_notified_once() {
        let dir = tempfile::tempdir().unwrap();
        let t = table(dir.path());
        let now = Utc::now();
        let mut r = sample_report("node-a");
        r.sync_interval_s = 10;
        t.record(vec![r.clone()], now).unwrap();
        let at = |s: i64| now + chrono::Duration::seconds(s);
        assert!(
            t.newly_overdue(at(30)).unwrap().is_empty(),
            "30 s is not over 3 x 10 s"
        );
        let gone = t.newly_overdue(at(31)).unwrap();
        assert_eq!(gone.len(), 1);
        assert!(
            t.newly_overdue(at(100)).unwrap().is_empty(),
            "staying down is not news"
        );
        let page = t.list(5, at(100)).unwrap();
        assert!(page.nodes[0].overdue);
        assert_eq!(page.nodes[0].revisions_behind, 2);
        // A new report brings it back, and a second silence is notified again.
        t.record(vec![r], at(100)).unwrap();
        assert!(!t.list(5, at(101)).unwrap().nodes[0].overdue);
        assert_eq!(t.newly_overdue(at(131)).unwrap().len(), 1);
    }

    #[test]
    fn the_table_survives_a_reopen_and_still_judges_a_dead_node() {
        let dir = tempfile::tempdir().unwrap();
        let now = Utc::now();
        {
            let t = table(dir.path());
            t.record(vec![sample_report("node-a"), sample_report("node-b")], now)
                .unwrap();
        }
        let t = table(dir.path());
        let later = now + chrono::Duration::seconds(31);
        let page = t.list(3, later).unwrap();
        let ids: Vec<_> = page
            .nodes
            .iter()
            .map(|n| n.report.node_id.as_str())
            .collect();
        assert_eq!(ids, ["node-a", "node-b"]);
        assert!(page.nodes.iter().all(|n| n.overdue));
        assert_eq!(t.newly_overdue(later).unwrap().len(), 2, "one each");
    }

    #[test]
    fn a_full_table_refuses_new_nodes_and_keeps_updating_known_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = table(dir.path());
        t.max = 2;
        let now = Utc::now();
        let refused = t
            .record(
                vec![
                    sample_report("node-a"),
                    sample_report("node-b"),
                    sample_report("node-c"),
                ],
                now,
            )
            .unwrap();
        assert_eq!(refused, ["node-c"]);
        let mut a = sample_report("node-a");
        a.catalog_revision = 9;
        assert!(t.record(vec![a], now).unwrap().is_empty());
        let page = t.list(9, now).unwrap();
        assert_eq!(page.nodes.len(), 2);
        assert_eq!(page.nodes[0].revisions_behind, 0);
    }
}
