//! The node: a branch office's Group Update Provider.
//!
//! Owns the node's wiring and its mirror loop: it keeps the mirrored catalog (persisted, so a
//! restart serves what it had), re-syncs with the first upstream that answers, prefetches new
//! content through `upstream`, and serves clients through `serve`. It must never answer a
//! client with bytes that did not come through the store, and never ask an upstream for a
//! digest that is not in its mirrored catalog.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use chrono::Utc;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::api::ApiError;
use crate::auth::{self, Token, TokenError};
use crate::catalog::CatalogHistory;
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::mirror::Snapshot;
use crate::serve::{self, Readiness, Served};
use crate::server::{self, Shutdown};
use crate::store::{Kv, Store, StoreError};
use crate::upstream::{Upstream, UpstreamError, UpstreamFetcher};

/// Why the node could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("upstream.servers: {0}")]
    BadUpstream(String),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

const CATALOG_KEY: &str = "history";

/// A node's state.
pub struct Node {
    served: Arc<Served>,
    upstream: Arc<Upstream>,
    catalog_kv: Kv,
    /// Checked on `/v1/sync` when another node uses this one as its upstream.
    node_token: Token,
    sync_interval: Duration,
    prefetch: bool,
    /// Wakes the prefetch worker when the mirrored catalog changed.
    catalog_changed: Notify,
}

impl Node {
    /// Opens the data dir and restores the mirror of an earlier run.
    pub fn open(config: &NodeConfig) -> Result<Arc<Node>, NodeError> {
        let n = &config.node;
        let store = Store::open(&n.data_dir)?;
        let file = |f: &str| (!f.is_empty()).then(|| std::path::PathBuf::from(f));
        let node_token = auth::resolve(
            Some(&n.node_token),
            file(&n.node_token_file).as_deref(),
            &n.data_dir,
            "node",
        )?;
        let upstream_token = if !config.upstream.token.is_empty() {
            Some(Token::new(config.upstream.token.clone()))
        } else if let Some(f) = file(&config.upstream.token_file) {
            Some(auth::read_token_file(&f)?)
        } else {
            None
        };
        let servers = config
            .upstreams()
            .iter()
            .map(|s| crate::config::validate_url(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(NodeError::BadUpstream)?;
        let catalog_kv = store.kv("catalog")?;
        let mut history: CatalogHistory = catalog_kv
            .get(CATALOG_KEY)?
            .unwrap_or_else(|| CatalogHistory::new(config.cache.retain_revisions));
        history.set_retain(config.cache.retain_revisions);
        let readiness = Arc::new(Readiness::default());
        if history.revisions().next().is_some() {
            // Ready from what we had; stale until an upstream confirms it.
            readiness.mark_restored(Utc::now());
        }
        let metrics = Arc::new(Metrics::new());
        let upstream = Upstream::new(
            servers,
            upstream_token,
            Duration::from_secs(config.upstream.idle_timeout_s),
            store.clone(),
            metrics.clone(),
        )?;
        let served = Arc::new(Served {
            store,
            catalog: Arc::new(RwLock::new(history)),
            metrics,
            fetcher: Some(Arc::new(UpstreamFetcher(upstream.clone()))),
            readiness,
        });
        Ok(Arc::new(Node {
            served,
            upstream,
            catalog_kv,
            node_token,
            sync_interval: Duration::from_secs(config.upstream.sync_interval_s),
            prefetch: config.cache.prefetch,
            catalog_changed: Notify::new(),
        }))
    }

    /// All routes of the node.
    pub fn router(self: &Arc<Self>) -> Router {
        let own = Router::new()
            .route("/v1/sync", get(sync))
            .with_state(self.clone());
        serve::finish_router(serve::client_router(self.served.clone()).merge(own))
    }

    /// Serves and mirrors until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: Shutdown,
    ) -> Result<(), NodeError> {
        let addr = listener.local_addr()?;
        let upstreams: Vec<String> = self
            .upstream
            .servers()
            .iter()
            .map(|u| u.to_string())
            .collect();
        tracing::info!(%addr, ?upstreams, "node listening");
        let mirror = tokio::spawn(self.clone().mirror_loop(shutdown.clone()));
        let prefetch = tokio::spawn(self.clone().prefetch_loop(shutdown.clone()));
        server::run(listener, self.router(), shutdown.wait()).await?;
        mirror.abort();
        prefetch.abort();
        self.served.store.flush().await?;
        tracing::info!("node stopped");
        Ok(())
    }

    /// Syncs with the upstream list every `sync_interval`.
    async fn mirror_loop(self: Arc<Self>, shutdown: Shutdown) {
        let mut last_ok: Option<bool> = None;
        loop {
            match self.sync_once().await {
                Ok(server) => {
                    if last_ok != Some(true) {
                        tracing::info!(%server, "synced with upstream");
                    }
                    last_ok = Some(true);
                }
                Err(e) => {
                    if last_ok != Some(false) {
                        tracing::warn!(error = %e, "no upstream answered; serving what we have");
                    }
                    last_ok = Some(false);
                    self.served.readiness.mark_stale(Utc::now());
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.sync_interval) => {}
                _ = shutdown.clone().wait() => return,
            }
        }
    }

    /// One sync: fetch the snapshot, mirror it, persist it. Returns the server that answered.
    pub async fn sync_once(&self) -> Result<String, NodeError> {
        let (index, snapshot) = self.upstream.snapshot().await?;
        let changed = {
            let mut history = self
                .served
                .catalog
                .write()
                .map_err(|_| NodeError::BadUpstream("catalog lock poisoned".into()))?;
            match history.mirror(snapshot.catalog, Utc::now()) {
                Ok(changed) => changed.then(|| history.clone()),
                Err(e) => {
                    tracing::warn!(error = %e, "upstream catalog refused");
                    None
                }
            }
        };
        if let Some(history) = changed {
            self.catalog_kv.put(CATALOG_KEY, &history)?;
            self.catalog_kv.flush().await?;
            tracing::info!(
                revision = history.revision(),
                "mirrored a new catalog revision"
            );
            self.catalog_changed.notify_one();
        }
        self.served.readiness.mark_synced();
        Ok(self.upstream.servers()[index].to_string())
    }

    /// Fetches every item of the current catalog the store lacks, whenever it changes.
    async fn prefetch_loop(self: Arc<Self>, shutdown: Shutdown) {
        if !self.prefetch {
            return;
        }
        loop {
            let wanted: Vec<_> = match self.served.catalog.read() {
                Ok(c) => c
                    .current()
                    .items
                    .into_iter()
                    .filter(|i| !self.served.store.contains(&i.sha256))
                    .collect(),
                Err(_) => Vec::new(),
            };
            for item in wanted {
                if let Err(e) = self.upstream.fetch(item.sha256, item.size).await {
                    tracing::warn!(name = %item.name, sha256 = %item.sha256, error = %e, "prefetch failed; will retry at the next sync");
                }
            }
            tokio::select! {
                _ = self.catalog_changed.notified() => {}
                _ = tokio::time::sleep(self.sync_interval) => {}
                _ = shutdown.clone().wait() => return,
            }
        }
    }

    fn snapshot(&self) -> Result<Snapshot, ApiError> {
        let catalog = self
            .served
            .catalog
            .read()
            .map_err(|_| ApiError::internal("catalog lock poisoned"))?
            .current();
        Ok(Snapshot { catalog })
    }
}

async fn sync(State(n): State<Arc<Node>>, headers: HeaderMap) -> Result<Response, ApiError> {
    n.node_token.check(&headers, "node")?;
    if !n.served.readiness.is_ready() {
        return Err(ApiError::unavailable(
            "this node has not synced with its upstream yet",
        ));
    }
    let snapshot = n.snapshot()?;
    Ok(serve::json_with_etag(&headers, &snapshot.etag(), &snapshot))
}
