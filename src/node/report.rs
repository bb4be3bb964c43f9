//! The node's reports to its upstream: its own, and the latest of each node behind it.
//!
//! Owns building this node's [`NodeReport`] (from its config, mirror, store, metrics and
//! relay), the reports of downstream nodes held for relay ([`Relayed`]: the latest per node
//! id, at most [`MAX_RELAYED`], each sent upward once and forgotten when it expires), the
//! `via` stamp (this node's id on a report that came to it without one, so the manager learns
//! the first node between a reporter and itself), and sending them all with each relay round
//! in batches of at most [`MAX_REPORTS_PER_BATCH`]. It must never decide whether a node is
//! overdue (the manager's) and never hold a report without a bound.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Node;
use crate::core::fleet::{NodeReport, ReportBatch, MAX_REPORTS_PER_BATCH};

/// Most downstream nodes whose latest report a node holds for relay: the manager's own bound
/// on its node table (`manager::nodes::MAX_NODES`), so a mid-tree node can carry a whole
/// fleet. When full, the report received longest ago makes room for a new node (a stale
/// report is the least worth relaying).
pub const MAX_RELAYED: usize = 10_000;
/// A held report expires after this many of its node's sync intervals: by then the manager
/// calls that node overdue anyway, and a report nobody renewed has nothing left to say.
pub const RELAY_EXPIRY_INTERVALS: u32 = 3;

/// One downstream report held for relay.
struct Held {
    report: NodeReport,
    received: Instant,
    /// Sent upward and accepted: not sent again until a newer report replaces it.
    sent: bool,
    /// Tells a report apart from the one that replaced it while a send was under way.
    generation: u64,
}

/// Reports of downstream nodes waiting to go upward, the latest per node id.
pub struct Relayed {
    held: Mutex<HashMap<String, Held>>,
    /// [`MAX_RELAYED`], smaller in tests.
    max: usize,
    next_generation: std::sync::atomic::AtomicU64,
}

impl Default for Relayed {
    fn default() -> Self {
        Relayed {
            held: Mutex::new(HashMap::new()),
            max: MAX_RELAYED,
            next_generation: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl Relayed {
    /// Keeps validated reports received from downstream, stamping `via` with `own_id` where
    /// none is set; a newer report of a node replaces the one held.
    pub fn keep(&self, reports: Vec<NodeReport>, own_id: &str, now: Instant) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        for mut report in reports {
            if report.node_id == own_id {
                // A loop in the tree (or a node that copied this one's data dir): this node
                // reports itself.
                continue;
            }
            if report.via.is_none() {
                report.via = Some(own_id.to_string());
            }
            if !held.contains_key(&report.node_id) && held.len() >= self.max {
                let oldest = held
                    .iter()
                    .min_by_key(|(_, h)| h.received)
                    .map(|(id, _)| id.clone());
                if let Some(id) = oldest {
                    held.remove(&id);
                }
            }
            let generation = self
                .next_generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            held.insert(
                report.node_id.clone(),
                Held {
                    report,
                    received: now,
                    sent: false,
                    generation,
                },
            );
        }
    }

    /// Forgets expired reports; returns the ones not sent yet, with their generations.
    fn unsent(&self, now: Instant) -> Vec<(NodeReport, u64)> {
        let Ok(mut held) = self.held.lock() else {
            return Vec::new();
        };
        held.retain(|_, h| {
            let life = Duration::from_secs(h.report.sync_interval_s) * RELAY_EXPIRY_INTERVALS;
            now.saturating_duration_since(h.received) <= life
        });
        held.values()
            .filter(|h| !h.sent)
            .map(|h| (h.report.clone(), h.generation))
            .collect()
    }

    /// Marks as sent the reports of `sent` that no newer one replaced meanwhile.
    fn settle(&self, sent: &[(String, u64)]) {
        if let Ok(mut held) = self.held.lock() {
            for (id, generation) in sent {
                if let Some(h) = held.get_mut(id) {
                    if h.generation == *generation {
                        h.sent = true;
                    }
                }
            }
        }
    }

    /// How many reports are held.
    pub fn len(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The host name (Linux: `/proc/sys/kernel/hostname`, else `/etc/hostname`), when it reads
/// as a valid node name. Read from the kernel rather than with a crate: the product runs on
/// Linux, and two file reads at start-up need no dependency.
pub fn host_name() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| {
            !s.is_empty()
                && s.chars().count() <= crate::core::fleet::MAX_NODE_NAME
                && !s.chars().any(char::is_control)
        })
}

/// The advertised URL: `node.advertised_url` when set, else `listen` when it is a specific
/// address (https with TLS configured), else none.
pub fn advertised_url(config: &crate::core::config::NodeSection) -> Option<String> {
    if !config.advertised_url.is_empty() {
        return Some(config.advertised_url.clone());
    }
    if config.listen.ip().is_unspecified() {
        return None;
    }
    let scheme = if config.tls_cert.is_empty() {
        "http"
    } else {
        "https"
    };
    Some(format!("{scheme}://{}", config.listen))
}

impl Node {
    /// This node's report now; `clients` is how many distinct clients its last relay round
    /// carried heartbeats of.
    fn own_report(&self, clients: usize) -> NodeReport {
        let s = &self.served;
        let (revision, mirrored_at) = match s.catalog() {
            Ok(h) => (h.revision(), h.revisions().last().map(|r| r.available_at)),
            Err(_) => (0, None),
        };
        let m = &s.metrics;
        let (hits, misses) = (m.cache_hits.get(), m.cache_misses.get());
        NodeReport {
            node_id: self.id.clone(),
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            advertised_url: self.advertised_url.clone(),
            upstream: self.upstream.in_use(),
            catalog_revision: revision,
            catalog_mirrored_at: mirrored_at,
            stale_since: s.readiness.stale_since(),
            cache_bytes: s.store.total_bytes(),
            cache_budget_bytes: self.budget().max_bytes,
            blobs: s.store.list().len() as u64,
            wan_bytes: m.upstream_bytes.get(),
            lan_bytes: m.served_bytes.get(),
            hit_ratio: (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64),
            events_queued: u64::try_from(m.events_queued.get()).unwrap_or(0),
            clients_last_interval: clients as u64,
            uptime_s: self.started.elapsed().as_secs(),
            sync_interval_s: self.sync_interval.as_secs().max(1),
            via: None,
        }
    }

    /// Sends this node's report and the unsent reports of the nodes behind it upward, in
    /// batches of at most [`MAX_REPORTS_PER_BATCH`]; a batch no upstream accepted stays for
    /// the next round (its own report is made anew then).
    pub(super) async fn send_reports(&self, clients: usize) {
        let mut all = vec![(self.own_report(clients), None)];
        all.extend(
            self.relayed
                .unsent(Instant::now())
                .into_iter()
                .map(|(r, g)| (r, Some(g))),
        );
        for chunk in all.chunks(MAX_REPORTS_PER_BATCH) {
            let batch = ReportBatch {
                reports: chunk.iter().map(|(r, _)| r.clone()).collect(),
            };
            match self.upstream.post_reports(&batch).await {
                Ok(()) => {
                    let sent: Vec<(String, u64)> = chunk
                        .iter()
                        .filter_map(|(r, g)| g.map(|g| (r.node_id.clone(), g)))
                        .collect();
                    self.relayed.settle(&sent);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "node reports not sent; they go with the next round");
                    return;
                }
            }
        }
    }

    /// Keeps reports of downstream nodes for relay ([`crate::serve::Role::reports`]).
    pub(super) fn keep_reports(&self, reports: Vec<NodeReport>) {
        self.relayed.keep(reports, &self.id, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::fleet::sample_report;

    #[test]
    fn relayed_reports_get_the_nearest_via_and_keep_the_one_they_had() {
        let r = Relayed::default();
        let mut far = sample_report("node-far");
        far.via = Some("node-mid".into());
        r.keep(
            vec![sample_report("node-near"), far],
            "node-me",
            Instant::now(),
        );
        let mut got = r.unsent(Instant::now());
        got.sort_by(|a, b| a.0.node_id.cmp(&b.0.node_id));
        assert_eq!(got[0].0.via.as_deref(), Some("node-mid"));
        assert_eq!(got[1].0.via.as_deref(), Some("node-me"));
        // Its own id coming back (a loop) is not held.
        r.keep(vec![sample_report("node-me")], "node-me", Instant::now());
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn relayed_reports_are_bounded_latest_per_node_and_sent_once() {
        let r = Relayed {
            max: 3,
            ..Relayed::default()
        };
        let t0 = Instant::now();
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            r.keep(
                vec![sample_report(id)],
                "me",
                t0 + Duration::from_millis(i as u64),
            );
        }
        // A fourth node pushes out the report received longest ago.
        r.keep(
            vec![sample_report("d")],
            "me",
            t0 + Duration::from_millis(9),
        );
        assert_eq!(r.len(), 3);
        let ids: std::collections::HashSet<String> =
            r.unsent(t0).into_iter().map(|(x, _)| x.node_id).collect();
        assert!(!ids.contains("a") && ids.contains("d"), "{ids:?}");
        // The latest of a node replaces the one held.
        let mut newer = sample_report("b");
        newer.catalog_revision = 7;
        r.keep(vec![newer], "me", t0 + Duration::from_millis(10));
        assert_eq!(r.len(), 3);
        let unsent = r.unsent(t0);
        let b = unsent.iter().find(|(x, _)| x.node_id == "b").unwrap();
        assert_eq!(b.0.catalog_revision, 7);
        // Sent: not sent again; a report that replaced it meanwhile still goes.
        let sent: Vec<(String, u64)> = unsent
            .iter()
            .map(|(x, g)| (x.node_id.clone(), *g))
            .collect();
        r.keep(
            vec![sample_report("c")],
            "me",
            t0 + Duration::from_millis(11),
        );
        r.settle(&sent);
        let left: Vec<String> = r.unsent(t0).into_iter().map(|(x, _)| x.node_id).collect();
        assert_eq!(left, ["c"]);
    }

    #[test]
    fn a_relayed_report_expires_after_three_of_its_intervals() {
        let r = Relayed::default();
        let t0 = Instant::now();
        let mut rep = sample_report("a");
        rep.sync_interval_s = 2;
        r.keep(vec![rep], "me", t0);
        assert_eq!(r.unsent(t0 + Duration::from_secs(6)).len(), 1);
        assert!(r.unsent(t0 + Duration::from_secs(7)).is_empty());
        assert!(r.is_empty());
    }
}
