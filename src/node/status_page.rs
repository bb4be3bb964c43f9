//! The node's status page: `GET /`, read-only, with no token and no secret.
//!
//! Owns gathering a [`NodeView`] from the node's state (its upstreams' last calls, the
//! mirror's freshness, the catalog against the store, cache use against `cache.max_bytes`,
//! the download starts of the current revision) and the per-minute history of WAN bytes, LAN
//! bytes and heartbeats its plots and client figure read, sampled by [`Node::sample_loop`].
//! It must never put a token, a credential or a client id on the page, and never change
//! anything: a page load only reads.

use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::Utc;

use super::Node;
use crate::core::fault::Internal;
use crate::http::error::ApiError;
use crate::page::history::{self, History};
use crate::page::node_page::{self, ItemRow, NodeView, UpstreamRow, UpstreamState};

/// The counters the node page plots, in [`Counters`] order: upstream bytes (WAN), served
/// bytes (LAN), heartbeats received.
pub type Counters = History<3>;

/// The node's page history, shared by its sampler and its page.
pub type PageHistory = Arc<Mutex<Counters>>;

/// The status route (no token: the page holds nothing secret).
pub fn routes(node: Arc<Node>) -> Router {
    Router::new().route("/", get(status)).with_state(node)
}

async fn status(State(node): State<Arc<Node>>) -> Result<Response, ApiError> {
    let view = node.status_view()?;
    let html = node_page::render(&view);
    Ok(([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response())
}

impl Node {
    fn counters(&self) -> [u64; 3] {
        let m = &self.served.metrics;
        [
            m.upstream_bytes.get(),
            m.served_bytes.get(),
            m.heartbeats_received.get(),
        ]
    }

    /// Samples the page's counters until shutdown.
    pub(super) async fn sample_loop(self: Arc<Self>) {
        let me = self.clone();
        history::sample_every(
            self.history.clone(),
            move || me.counters(),
            self.shutdown.clone(),
        )
        .await
    }

    /// What the status page shows now.
    pub fn status_view(&self) -> Result<NodeView, Internal> {
        let now = Utc::now();
        let s = &self.served;
        let upstreams = self
            .upstream
            .last_calls()
            .into_iter()
            .map(|(url, last)| UpstreamRow {
                url: url.to_string(),
                state: match last {
                    None => UpstreamState::NotTried,
                    Some(true) => UpstreamState::Up,
                    Some(false) => UpstreamState::Down,
                },
            })
            .collect();
        let (revision, revision_at, items) = {
            let history = s.catalog()?;
            match history.revisions().last() {
                Some(r) => (
                    r.catalog.revision,
                    Some(r.available_at),
                    r.catalog
                        .items
                        .iter()
                        .map(|i| ItemRow {
                            name: i.name.clone(),
                            version: i.version.clone(),
                            sha256: i.sha256.to_string(),
                            size: i.size,
                            urgent: i.urgent,
                            cached: s.store.contains(&i.sha256),
                        })
                        .collect(),
                ),
                None => (0, None, Vec::new()),
            }
        };
        let heartbeat_interval_s = s
            .directory()?
            .effective("default", None)
            .heartbeat_interval_s;
        let live = self.counters();
        let (rates, recent) = {
            let h = self
                .history
                .lock()
                .map_err(|_| Internal::poisoned("page history"))?;
            let ts = now.timestamp();
            (
                h.rates(ts, live),
                h.growth_over(ts, heartbeat_interval_s, live)[2],
            )
        };
        let [wan, lan, _] = rates;
        Ok(NodeView {
            node_id: self.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            now,
            upstreams,
            proxy: self.upstream.proxy(),
            ready: s.readiness.is_ready(),
            stale_since: s.readiness.stale_since(),
            revision,
            revision_at,
            items,
            cache_bytes: s.store.total_bytes(),
            cache_budget: self.budget().max_bytes,
            blobs: s.store.list().len(),
            wan,
            lan,
            starts: s.starts.of(revision),
            heartbeat_interval_s,
            recent_heartbeats: recent,
            stream_clients: s.metrics.stream_clients.get(),
        })
    }
}
