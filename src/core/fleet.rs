//! The wire of fleet visibility: what a node reports of itself to its upstream, and the
//! batch it is carried in.
//!
//! Owns [`NodeReport`] (a node's id, name, version, where it can be reached, which upstream
//! it uses, the catalog revision it mirrors and since when, its staleness, cache, traffic,
//! queue, clients, uptime and sync interval), [`ReportBatch`] (`POST /v1/node/reports`), and
//! their validation: every text bounded, every number sane, at most [`MAX_REPORTS_PER_BATCH`]
//! reports per batch, with a message naming the field. A report is untrusted input even
//! behind the node token: a wrong node must not be able to make the manager hold unbounded
//! text. It must never hold state, read the clock or decide when a node is overdue (that is
//! the manager's, from the report's `sync_interval_s`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::proto::{check_client_id, Invalid};

/// Most reports one `POST /v1/node/reports` carries. A node relays the latest report of
/// each node behind it (at most `node::report::MAX_RELAYED` of them) and splits them into
/// batches of this many; 1,000 reports of about 1 KiB each stay far below the node-token
/// body limit (`proto::BATCH_LIMIT`, 16 MiB) even with every text field at its bound.
pub const MAX_REPORTS_PER_BATCH: usize = 1_000;
/// Longest node name (`node.name`).
pub const MAX_NODE_NAME: usize = 128;
/// Longest URL in a report (advertised URL, upstream): enough for any real one.
pub const MAX_REPORT_URL: usize = 2_048;
/// Longest gup version string.
pub const MAX_VERSION: usize = 64;
/// Longest sync interval a report may claim: the same bound as `upstream.sync_interval_s`.
pub const MAX_SYNC_INTERVAL_S: u64 = 86_400;

/// What a node says of itself, each sync interval, to its upstream (which relays it on up
/// until it reaches the manager).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeReport {
    /// The node's id (`node-<16 hex>`, made at its first start and kept).
    pub node_id: String,
    /// `node.name`, by default the host name.
    pub name: String,
    /// The gup version the node runs.
    pub version: String,
    /// Where clients and downstream nodes reach it (`node.advertised_url`); None when not
    /// configured and not derivable from a specific listen address.
    #[serde(default)]
    pub advertised_url: Option<String>,
    /// The upstream it mirrored from last (None before its first sync).
    #[serde(default)]
    pub upstream: Option<String>,
    /// The catalog revision it mirrors, and when that revision became available there.
    pub catalog_revision: u64,
    #[serde(default)]
    pub catalog_mirrored_at: Option<DateTime<Utc>>,
    /// Since when no upstream has answered it (None: fresh).
    #[serde(default)]
    pub stale_since: Option<DateTime<Utc>>,
    /// Bytes of blobs in its cache, its budget (`cache.max_bytes`), and how many blobs.
    pub cache_bytes: u64,
    pub cache_budget_bytes: u64,
    pub blobs: u64,
    /// Bytes fetched from its upstreams (WAN) and served to its clients (LAN) since start.
    pub wan_bytes: u64,
    pub lan_bytes: u64,
    /// Cache hits over hits and misses since start (None before any content request).
    #[serde(default)]
    pub hit_ratio: Option<f64>,
    /// Events accepted and not yet forwarded.
    pub events_queued: u64,
    /// Distinct clients whose heartbeats it relayed in its last relay round (one sync
    /// interval while its upstream answers).
    pub clients_last_interval: u64,
    pub uptime_s: u64,
    /// Its `upstream.sync_interval_s`: the manager calls it overdue after three of these
    /// without a report.
    pub sync_interval_s: u64,
    /// The node this report came through (the first node between the reporter and the
    /// manager), stamped by that node; None for a node that reports to the manager directly.
    #[serde(default)]
    pub via: Option<String>,
}

/// `POST /v1/node/reports` body (node token).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
pub struct ReportBatch {
    pub reports: Vec<NodeReport>,
}

fn invalid(field: String, reason: impl Into<String>) -> Invalid {
    Invalid {
        field,
        reason: reason.into(),
    }
}

/// Text of at most `max` characters without control characters.
fn bounded(field: String, v: &str, max: usize) -> Result<(), Invalid> {
    if v.chars().count() > max {
        return Err(invalid(field, format!("at most {max} characters")));
    }
    if v.chars().any(char::is_control) {
        return Err(invalid(field, "control characters are not allowed"));
    }
    Ok(())
}

/// An id as client ids are checked (1 to 128 characters, no control characters), with the
/// field named as given.
fn check_id(field: String, id: &str) -> Result<(), Invalid> {
    check_client_id(id).map_err(|e| invalid(field, e.reason))
}

impl NodeReport {
    /// Every text bounded, the hit ratio a ratio, the sync interval 1 to 86,400 s; `at`
    /// prefixes the field names (`reports[3].`).
    pub fn validate(&self, at: &str) -> Result<(), Invalid> {
        let f = |name: &str| format!("{at}{name}");
        check_id(f("node_id"), &self.node_id)?;
        if self.name.is_empty() {
            return Err(invalid(f("name"), "is required"));
        }
        bounded(f("name"), &self.name, MAX_NODE_NAME)?;
        bounded(f("version"), &self.version, MAX_VERSION)?;
        for (name, v) in [
            ("advertised_url", &self.advertised_url),
            ("upstream", &self.upstream),
        ] {
            if let Some(v) = v {
                bounded(f(name), v, MAX_REPORT_URL)?;
            }
        }
        if let Some(r) = self.hit_ratio {
            if !(0.0..=1.0).contains(&r) {
                return Err(invalid(f("hit_ratio"), "must be between 0 and 1"));
            }
        }
        if !(1..=MAX_SYNC_INTERVAL_S).contains(&self.sync_interval_s) {
            return Err(invalid(
                f("sync_interval_s"),
                format!("must be 1 to {MAX_SYNC_INTERVAL_S} seconds"),
            ));
        }
        if let Some(via) = &self.via {
            check_id(f("via"), via)?;
        }
        Ok(())
    }
}

impl ReportBatch {
    /// At most [`MAX_REPORTS_PER_BATCH`] reports, each valid.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.reports.len() > MAX_REPORTS_PER_BATCH {
            return Err(invalid(
                "reports".into(),
                format!("at most {MAX_REPORTS_PER_BATCH} reports per batch"),
            ));
        }
        for (i, r) in self.reports.iter().enumerate() {
            r.validate(&format!("reports[{i}]."))?;
        }
        Ok(())
    }
}

/// A valid report of node `id`, for tests here and in the modules that keep reports.
#[cfg(test)]
pub(crate) fn sample_report(id: &str) -> NodeReport {
    NodeReport {
        node_id: id.into(),
        name: "branch".into(),
        version: "0.1.0".into(),
        advertised_url: Some("http://10.0.0.2:2967".into()),
        upstream: Some("http://127.0.0.1:8014/".into()),
        catalog_revision: 3,
        catalog_mirrored_at: None,
        stale_since: None,
        cache_bytes: 10,
        cache_budget_bytes: 100,
        blobs: 1,
        wan_bytes: 10,
        lan_bytes: 30,
        hit_ratio: Some(0.5),
        events_queued: 0,
        clients_last_interval: 2,
        uptime_s: 5,
        sync_interval_s: 10,
        via: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str) -> NodeReport {
        sample_report(id)
    }

    #[test]
    fn a_report_names_the_field_it_breaks() {
        assert!(report("node-1").validate("").is_ok());
        let field = |r: NodeReport| r.validate("reports[0].").unwrap_err().field;
        let mut r = report("");
        assert_eq!(field(r.clone()), "reports[0].node_id");
        r = report("n");
        r.name = "x".repeat(MAX_NODE_NAME + 1);
        assert_eq!(field(r.clone()), "reports[0].name");
        r.name = "bad\nname".into();
        assert_eq!(field(r.clone()), "reports[0].name");
        r = report("n");
        r.hit_ratio = Some(1.5);
        assert_eq!(field(r.clone()), "reports[0].hit_ratio");
        r.hit_ratio = Some(f64::NAN);
        assert_eq!(field(r.clone()), "reports[0].hit_ratio");
        r = report("n");
        r.sync_interval_s = 0;
        assert_eq!(field(r.clone()), "reports[0].sync_interval_s");
        r.sync_interval_s = MAX_SYNC_INTERVAL_S + 1;
        assert_eq!(field(r.clone()), "reports[0].sync_interval_s");
        r = report("n");
        r.advertised_url = Some("u".repeat(MAX_REPORT_URL + 1));
        assert_eq!(field(r.clone()), "reports[0].advertised_url");
        r = report("n");
        r.via = Some(String::new());
        assert_eq!(field(r), "reports[0].via");
    }

    #[test]
    fn a_batch_holds_at_most_its_bound() {
        let mut b = ReportBatch {
            reports: vec![report("n"); MAX_REPORTS_PER_BATCH],
        };
        assert!(b.validate().is_ok());
        b.reports.push(report("n"));
        assert_eq!(b.validate().unwrap_err().field, "reports");
        b.reports.truncate(2);
        b.reports[1].version = "v".repeat(MAX_VERSION + 1);
        assert_eq!(b.validate().unwrap_err().field, "reports[1].version");
    }
}
