//! The node: a branch office's Group Update Provider.
//!
//! Owns the node's wiring and its mirror: the catalog and the settings directory of its
//! upstream (persisted, so a restart serves what it had), kept fresh by one push stream to
//! the upstream (or polling in pull mode); prefetching through `upstream`; answering client
//! heartbeats from the mirror and relaying them upstream in batches; its own push stream for
//! its clients. Group resolution stays the manager's: known clients get the manager's answer,
//! new ones their install group until it arrives. It must never answer a client with bytes
//! that did not come through the store, and never ask an upstream for a digest that is not in
//! its mirrored catalog.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::api::{self, ApiError, JsonBody};
use crate::auth::{self, Token, TokenError};
use crate::catalog::CatalogHistory;
use crate::clients::{self, Heartbeat, HeartbeatReply};
use crate::config::NodeConfig;
use crate::events::{ApplicationUpload, EventUpload, EventsError, Outbox, Upload, UploadBatch};
use crate::manager::{
    Assignment, BatchReply, HeartbeatBatch, RelayedHeartbeat, BATCH_LIMIT, BODY_LIMIT,
};
use crate::metrics::Metrics;
use crate::serve::{self, Readiness, Served};
use crate::server::{self, Shutdown};
use crate::settings::{ConnectionMode, Directory};
use crate::store::{Kv, Store, StoreError};
use crate::stream::{Change, Changes};
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
    #[error("upstream sent an invalid directory: {0}")]
    BadDirectory(String),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error("events: {0}")]
    Events(#[from] EventsError),
    #[error("tls: {0}")]
    Tls(#[from] server::TlsError),
}

/// Largest batch of uploads forwarded upstream at once (upstreams accept 16 MiB).
const FORWARD_BATCH: usize = 8 << 20;

const CATALOG_KEY: &str = "history";
const DIRECTORY_KEY: &str = "directory";

/// A node's state.
pub struct Node {
    served: Arc<Served>,
    upstream: Arc<Upstream>,
    catalog_kv: Kv,
    directory_kv: Kv,
    /// client id -> the group the manager placed it in.
    assignments: Kv,
    /// Group and location of clients, for slot checks.
    placements: Arc<NodePlacements>,
    /// Events and applications accepted, durable, waiting for an upstream to accept them.
    outbox: Outbox,
    /// Wakes the forwarder when a critical event arrives.
    critical: Notify,
    /// Heartbeats waiting to be relayed upstream, the latest per client.
    relay: Mutex<HashMap<String, RelayedHeartbeat>>,
    /// Checked on `/v1/sync` and batches when another node uses this one as its upstream.
    node_token: Token,
    mode: ConnectionMode,
    sync_interval: Duration,
    prefetch: bool,
    /// `cache.max_bytes`.
    max_bytes: u64,
    /// Wakes the prefetch worker when the mirrored catalog changed.
    catalog_changed: tokio::sync::watch::Sender<u64>,
    /// Wakes the mirror loop when the upstream pushed an event.
    upstream_event: Notify,
    shutdown: Shutdown,
    limits: server::Limits,
    tls: Option<server::Tls>,
}

impl Node {
    /// Opens the data dir and restores the mirror of an earlier run.
    pub fn open(config: &NodeConfig, shutdown: Shutdown) -> Result<Arc<Node>, NodeError> {
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
        let directory_kv = store.kv("settings")?;
        let directory: Directory = directory_kv.get(DIRECTORY_KEY)?.unwrap_or_default();
        let readiness = Arc::new(Readiness::default());
        if history.revisions().next().is_some() {
            // Ready from what we had; stale until an upstream confirms it.
            readiness.mark_restored(Utc::now());
        }
        let tls = if n.tls_cert.is_empty() {
            None
        } else {
            Some(server::tls_acceptor(
                std::path::Path::new(&n.tls_cert),
                std::path::Path::new(&n.tls_key),
            )?)
        };
        let limits = config.limits.resolve(server::open_file_limit());
        let upstream_ca = (!config.upstream.ca_file.is_empty())
            .then(|| std::path::PathBuf::from(&config.upstream.ca_file));
        let catalog_key = match config.upstream.catalog_public_key.as_str() {
            "" => None,
            key => Some(
                crate::signing::PublicKey::parse(key)
                    .map_err(|e| NodeError::BadUpstream(format!("catalog_public_key: {e}")))?,
            ),
        };
        let metrics = Arc::new(Metrics::new());
        let upstream = Upstream::new(
            crate::upstream::UpstreamOptions {
                servers,
                token: upstream_token,
                ca_file: upstream_ca,
                idle_timeout: Duration::from_secs(config.upstream.idle_timeout_s),
                probe_interval: Duration::from_secs(config.upstream.sync_interval_s),
                max_bytes_per_sec: config.upstream.max_bytes_per_sec,
                catalog_key,
            },
            store.clone(),
            metrics.clone(),
        )?;
        let assignments = store.kv("assignments")?;
        let outbox = Outbox::open(&store)?;
        let locations = store.kv("locations")?;
        let slots = crate::slots::Slots::new(store.kv("slots")?);
        let directory = Arc::new(RwLock::new(directory));
        let placements = Arc::new(NodePlacements {
            assignments: assignments.clone(),
            locations: locations.clone(),
            directory: directory.clone(),
        });
        let served = Arc::new(Served {
            store,
            catalog: Arc::new(RwLock::new(history)),
            changes: Arc::new(Changes::new(metrics.stream_clients.clone())),
            metrics,
            fetcher: Some(Arc::new(UpstreamFetcher(upstream.clone()))),
            readiness,
            directory,
            lan: crate::limit::ByteLimiter::new(config.serve.max_bytes_per_sec),
            slots,
            placements: placements.clone(),
            downloads: (config.serve.max_concurrent_downloads > 0).then(|| {
                Arc::new(tokio::sync::Semaphore::new(
                    config.serve.max_concurrent_downloads,
                ))
            }),
            hot: Arc::new(crate::hot::HotBlobs::new(
                config.cache.memory_bytes,
                config.cache.memory_item_max_bytes,
            )),
            catalog_body: RwLock::new(None),
        });
        Ok(Arc::new(Node {
            served,
            upstream,
            catalog_kv,
            directory_kv,
            assignments,
            placements,
            outbox,
            critical: Notify::new(),
            relay: Mutex::new(HashMap::new()),
            node_token,
            mode: config.upstream.mode,
            sync_interval: Duration::from_secs(config.upstream.sync_interval_s),
            prefetch: config.cache.prefetch,
            max_bytes: config.cache.max_bytes,
            catalog_changed: tokio::sync::watch::channel(0).0,
            upstream_event: Notify::new(),
            shutdown,
            limits,
            tls,
        }))
    }

    /// All routes of the node.
    pub fn router(self: &Arc<Self>) -> Router {
        let batches = Router::new()
            .route("/v1/node/heartbeats", post(node_heartbeats))
            .route("/v1/node/events", post(node_events))
            .layer(DefaultBodyLimit::max(BATCH_LIMIT))
            .with_state(self.clone());
        let own = Router::new()
            .route("/v1/sync", get(sync))
            .route("/v1/heartbeat", post(heartbeat))
            .route("/v1/events", post(post_events))
            .route("/v1/applications", post(post_applications))
            .route("/v1/stream", get(stream))
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .with_state(self.clone());
        serve::finish_router(
            serve::client_router(self.served.clone())
                .merge(batches)
                .merge(own),
        )
    }

    /// Serves and mirrors until `shutdown`.
    pub async fn run(self: Arc<Self>, listener: TcpListener) -> Result<(), NodeError> {
        let addr = listener.local_addr()?;
        let upstreams: Vec<String> = self
            .upstream
            .servers()
            .iter()
            .map(|u| u.to_string())
            .collect();
        tracing::info!(%addr, ?upstreams, mode = ?self.mode, tls = self.tls.is_some(), max_connections = self.limits.max_connections, "node listening");
        let shutdown = self.shutdown.clone();
        let mut tasks = vec![
            tokio::spawn(self.clone().mirror_loop()),
            tokio::spawn(self.clone().prefetch_loop()),
            tokio::spawn(self.clone().relay_loop()),
            tokio::spawn(self.clone().evict_loop()),
            tokio::spawn(self.clone().critical_loop()),
        ];
        self.update_queued();
        if self.mode == ConnectionMode::Push {
            tasks.push(tokio::spawn(self.clone().push_loop()));
        }
        server::run(
            listener,
            self.router(),
            shutdown.wait(),
            self.limits.clone(),
            self.tls.clone(),
        )
        .await?;
        // One last relay so heartbeats received just before shutdown are not lost (events
        // are durable in the outbox and go at the next start if not now).
        self.relay_once().await;
        self.forward(false).await;
        for t in tasks {
            t.abort();
        }
        self.served.store.flush().await?;
        tracing::info!("node stopped");
        Ok(())
    }

    /// Syncs at start, then on each upstream event (push) or every `sync_interval` (pull).
    async fn mirror_loop(self: Arc<Self>) {
        let mut last_ok: Option<bool> = None;
        // In push mode a resync also happens now and then, in case an event was missed.
        let period = match self.mode {
            ConnectionMode::Pull => self.sync_interval,
            ConnectionMode::Push => self.sync_interval.max(Duration::from_secs(300)),
        };
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
                _ = tokio::time::sleep(period) => {}
                _ = self.upstream_event.notified() => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// Holds the upstream push stream; reconnects with jittered backoff.
    async fn push_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let me = self.clone();
            let on_event = move |_event: &str| me.upstream_event.notify_one();
            let result = tokio::select! {
                r = self.upstream.follow_stream(&on_event) => r,
                _ = self.shutdown.clone().wait() => return,
            };
            match result {
                Ok(server) => {
                    tracing::info!(%server, "upstream push stream ended; reconnecting");
                    backoff = Duration::from_millis(500);
                }
                Err(e) => {
                    tracing::debug!(error = %e, "upstream push stream unavailable");
                    // Let the mirror loop notice the outage too.
                    self.upstream_event.notify_one();
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            let jitter = rand::random_range(0.5..1.0);
            tokio::select! {
                _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// One sync: fetch the snapshot, mirror it, persist it, push what changed to our own
    /// streams. Returns the server that answered.
    pub async fn sync_once(&self) -> Result<String, NodeError> {
        let (index, snapshot) = self.upstream.snapshot().await?;
        snapshot
            .directory
            .check()
            .map_err(|e| NodeError::BadDirectory(e.to_string()))?;
        let mut changes = Vec::new();
        let new_history = {
            let mut history = self
                .served
                .catalog
                .write()
                .map_err(|_| NodeError::BadUpstream("catalog lock poisoned".into()))?;
            match history.mirror(snapshot.catalog, snapshot.catalog_signature, Utc::now()) {
                Ok(true) => {
                    changes.push(Change::Catalog {
                        revision: history.revision(),
                    });
                    Some(history.clone())
                }
                Ok(false) => None,
                Err(e) => {
                    tracing::warn!(error = %e, "upstream catalog refused");
                    None
                }
            }
        };
        let new_directory = {
            let mut dir = self
                .served
                .directory
                .write()
                .map_err(|_| NodeError::BadUpstream("directory lock poisoned".into()))?;
            if *dir == snapshot.directory {
                None
            } else {
                changes.extend(directory_changes(&dir, &snapshot.directory));
                *dir = snapshot.directory;
                Some(dir.clone())
            }
        };
        if let Some(history) = &new_history {
            self.catalog_kv.put(CATALOG_KEY, history)?;
        }
        if let Some(dir) = &new_directory {
            self.directory_kv.put(DIRECTORY_KEY, dir)?;
        }
        if new_history.is_some() || new_directory.is_some() {
            self.served.store.flush().await?;
        }
        if let Some(history) = new_history {
            tracing::info!(
                revision = history.revision(),
                "mirrored a new catalog revision"
            );
            self.catalog_changed.send_replace(history.revision());
            // Slots of revisions no longer retained are not needed any more.
            if let Err(e) = self.served.slots.prune(history.oldest_revision()) {
                tracing::warn!(error = %e, "could not prune old download slots");
            }
        }
        self.served.changes.send_all(changes);
        self.served.readiness.mark_synced();
        Ok(self.upstream.servers()[index].to_string())
    }

    /// Fetches every item of the current catalog the store lacks, whenever it changes.
    async fn prefetch_loop(self: Arc<Self>) {
        if !self.prefetch {
            return;
        }
        let mut changed = self.catalog_changed.subscribe();
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
                tracing::debug!(sha256 = %item.sha256, "prefetching");
                self.enforce_budget(item.size).await;
                if let Err(e) = self.upstream.fetch(item.sha256, item.size).await {
                    tracing::warn!(name = %item.name, sha256 = %item.sha256, error = %e, "prefetch failed; will retry");
                }
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(self.sync_interval) => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// Keeps the store within `cache.max_bytes` after every stored blob and catalog change.
    async fn evict_loop(self: Arc<Self>) {
        let mut changed = self.catalog_changed.subscribe();
        loop {
            self.enforce_budget(0).await;
            tokio::select! {
                _ = self.upstream.stored.notified() => {}
                _ = changed.changed() => {}
                _ = tokio::time::sleep(self.sync_interval) => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// Evicts what `evict::plan` names so that `reserve` more bytes fit in the budget.
    async fn enforce_budget(&self, reserve: u64) {
        let store = &self.served.store;
        let victims = match self.served.catalog.read() {
            Ok(history) => crate::evict::plan(
                &store.list(),
                &history,
                &store.in_use(),
                self.max_bytes,
                reserve,
            ),
            Err(_) => return,
        };
        for digest in victims {
            match store.remove(&digest).await {
                Ok(()) => {
                    // A cached mapping would keep the unlinked file's space until dropped.
                    self.served.hot.remove(&digest);
                    tracing::info!(%digest, "evicted to stay within cache.max_bytes")
                }
                Err(e) => tracing::warn!(%digest, error = %e, "eviction failed"),
            }
        }
        if store.total_bytes() > self.max_bytes {
            tracing::warn!(
                bytes = store.total_bytes(),
                max_bytes = self.max_bytes,
                "over cache.max_bytes: the current catalog revision alone is larger"
            );
        }
        self.served
            .metrics
            .cache_bytes
            .set(store.total_bytes() as i64);
    }

    /// Relays queued heartbeats upstream every `sync_interval`, and with them every queued
    /// event and application.
    async fn relay_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.sync_interval) => {}
                _ = self.shutdown.clone().wait() => return,
            }
            self.relay_once().await;
            self.forward(false).await;
        }
    }

    /// Forwards critical events at once: on each arrival, and again with backoff until an
    /// upstream accepts them.
    async fn critical_loop(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(250);
        loop {
            let pending = self.outbox.has_critical().unwrap_or(false);
            if pending && !self.forward(true).await {
                let jitter = rand::random_range(0.5..1.0);
                tokio::select! {
                    _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                    _ = self.critical.notified() => {}
                    _ = self.shutdown.clone().wait() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
            backoff = Duration::from_millis(250);
            tokio::select! {
                _ = self.critical.notified() => {}
                _ = self.shutdown.clone().wait() => return,
            }
        }
    }

    /// Sends what the outbox holds (only uploads with critical events when `only_critical`)
    /// in batches of at most 8 MiB; removes each batch once an upstream accepted it. Returns
    /// false when an upstream could not be reached.
    async fn forward(&self, only_critical: bool) -> bool {
        let mut sent_keys: std::collections::HashSet<String> = Default::default();
        loop {
            let page = match self.outbox.peek(FORWARD_BATCH * 4) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "reading the event outbox");
                    return false;
                }
            };
            let mut keys = Vec::new();
            let mut uploads = Vec::new();
            let mut bytes = 0;
            for (k, u) in page {
                if sent_keys.contains(&k) || (only_critical && !u.is_critical()) {
                    continue;
                }
                let size = serde_json::to_vec(&u).map(|v| v.len()).unwrap_or(0);
                if !uploads.is_empty() && bytes + size > FORWARD_BATCH {
                    break;
                }
                bytes += size;
                keys.push(k);
                uploads.push(u);
            }
            if uploads.is_empty() {
                self.update_queued();
                return true;
            }
            let count: usize = uploads.iter().map(Upload::count).sum();
            let batch = UploadBatch { uploads };
            match self.upstream.forward_uploads(&batch).await {
                Ok(()) => {
                    if let Err(e) = self.outbox.remove(&keys).await {
                        tracing::error!(error = %e, "could not drop forwarded events from the outbox");
                        return false;
                    }
                    self.served.metrics.events_forwarded.inc_by(count as u64);
                    sent_keys.extend(keys);
                    self.update_queued();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "forwarding events failed; they stay queued");
                    return false;
                }
            }
        }
    }

    fn update_queued(&self) {
        if let Ok(n) = self.outbox.queued() {
            self.served.metrics.events_queued.set(n as i64);
        }
    }

    /// Queues an upload durably (before its 202) and wakes the forwarder for critical events.
    async fn enqueue(&self, upload: Upload) -> Result<(), ApiError> {
        let critical = upload.is_critical();
        self.outbox
            .push(&upload)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.served
            .metrics
            .events_queued
            .inc_by(upload.count() as i64);
        if critical {
            self.critical.notify_one();
        }
        Ok(())
    }

    async fn relay_once(&self) {
        let batch: Vec<RelayedHeartbeat> = match self.relay.lock() {
            Ok(mut q) => q.drain().map(|(_, v)| v).collect(),
            Err(_) => return,
        };
        if batch.is_empty() {
            return;
        }
        let batch = HeartbeatBatch { heartbeats: batch };
        match self.upstream.relay_heartbeats(&batch).await {
            Ok(reply) => {
                for Assignment { client_id, group } in reply.assignments {
                    if let Err(e) = self.assignments.put(&client_id, &group) {
                        tracing::warn!(error = %e, "could not record a client's group");
                    }
                }
                for (client, why) in reply.rejected {
                    tracing::warn!(%client, %why, "upstream refused a relayed heartbeat");
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat relay failed; keeping them for the next try");
                if let Ok(mut q) = self.relay.lock() {
                    for hb in batch.heartbeats {
                        // A newer heartbeat of the same client wins.
                        q.entry(hb.heartbeat.client_id.clone()).or_insert(hb);
                    }
                }
            }
        }
    }

    /// The group a client is in as far as this node knows: the manager's last answer, else
    /// its install group.
    fn group_of(&self, dir: &Directory, client_id: &str, install_group: Option<&str>) -> String {
        self.placements.group_of(dir, client_id, install_group)
    }

    /// Answers a heartbeat from the mirror and queues it for the upstream.
    fn answer(&self, hb: Heartbeat, address: Option<String>) -> Result<HeartbeatReply, ApiError> {
        hb.validate()
            .map_err(|e| ApiError::bad_request("bad_request", e.to_string()))?;
        let revision = self
            .served
            .catalog
            .read()
            .map_err(|_| ApiError::internal("catalog lock poisoned"))?
            .revision();
        let dir = self
            .served
            .directory
            .read()
            .map_err(|_| ApiError::internal("directory lock poisoned"))?;
        let group = self.group_of(&dir, &hb.client_id, hb.install_group.as_deref());
        // Until the manager's answer arrives, the install group is this node's answer; the
        // stream filter and later heartbeats read it from here.
        if let Ok(None) = self.assignments.get::<String>(&hb.client_id) {
            let _ = self.assignments.put(&hb.client_id, &group);
        }
        self.placements
            .remember_location(&hb.client_id, hb.location());
        drop(dir);
        let slot = self.served.download_slot(
            &hb.client_id,
            hb.catalog_revision,
            &group,
            hb.location(),
            Utc::now(),
        );
        let dir = self
            .served
            .directory
            .read()
            .map_err(|_| ApiError::internal("directory lock poisoned"))?;
        let reply = clients::reply(&dir, &hb, &group, revision, slot);
        if let Ok(mut q) = self.relay.lock() {
            q.insert(
                hb.client_id.clone(),
                RelayedHeartbeat {
                    heartbeat: hb,
                    address,
                },
            );
        }
        Ok(reply)
    }
}

/// Where a node's clients belong: the manager's answer (or the install group until it
/// arrives) and the location of their last heartbeat.
pub struct NodePlacements {
    assignments: Kv,
    locations: Kv,
    directory: Arc<RwLock<Directory>>,
}

impl NodePlacements {
    fn group_of(&self, dir: &Directory, client_id: &str, install_group: Option<&str>) -> String {
        match self.assignments.get::<String>(client_id).ok().flatten() {
            Some(g) => dir.resolve_group(&g).to_string(),
            None => dir.resolve_group(install_group.unwrap_or("")).to_string(),
        }
    }

    /// Records a client's location when it changed (its window may depend on it).
    fn remember_location(&self, client_id: &str, location: Option<&str>) {
        let known: Option<String> = self.locations.get(client_id).ok().flatten();
        if known.as_deref() != location {
            let r = match location {
                Some(l) => self.locations.put(client_id, &l.to_string()),
                None => self.locations.remove(client_id),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not record a client's location");
            }
        }
    }
}

impl crate::serve::Placements for NodePlacements {
    fn placement(&self, client_id: &str) -> (String, Option<String>) {
        let group = match self.directory.read() {
            Ok(dir) => self.group_of(&dir, client_id, None),
            Err(_) => crate::settings::DEFAULT_GROUP.to_string(),
        };
        (group, self.locations.get(client_id).ok().flatten())
    }
}

/// What changed between two directories, as stream events.
fn directory_changes(old: &Directory, new: &Directory) -> Vec<Change> {
    let mut out = Vec::new();
    for g in new.groups.keys() {
        let known = old.groups.contains_key(g);
        let serial = new.settings_serial(g);
        if !known || old.settings_serial(g) != serial || old.site != new.site {
            out.push(Change::Settings {
                group: g.clone(),
                serial,
            });
        }
        let policy = clients::policy_serial(new, g);
        if !known || clients::policy_serial(old, g) != policy {
            out.push(Change::Policy {
                group: g.clone(),
                serial: policy,
            });
        }
    }
    out
}

async fn sync(State(n): State<Arc<Node>>, headers: HeaderMap) -> Result<Response, ApiError> {
    n.node_token.check(&headers, "node")?;
    if !n.served.readiness.is_ready() {
        return Err(ApiError::unavailable(
            "this node has not synced with its upstream yet",
        ));
    }
    n.served.sync_response(&headers)
}

async fn heartbeat(
    State(n): State<Arc<Node>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    JsonBody(hb): JsonBody<Heartbeat>,
) -> Result<Json<HeartbeatReply>, ApiError> {
    n.answer(hb, Some(peer.ip().to_string())).map(Json)
}

/// A downstream node relays its clients' heartbeats here (chaining): answered from our mirror
/// and relayed further up with ours.
async fn node_heartbeats(
    State(n): State<Arc<Node>>,
    headers: HeaderMap,
    JsonBody(batch): JsonBody<HeartbeatBatch>,
) -> Result<Json<BatchReply>, ApiError> {
    n.node_token.check(&headers, "node")?;
    let mut reply = BatchReply::default();
    for item in batch.heartbeats {
        let id = item.heartbeat.client_id.clone();
        match n.answer(item.heartbeat, item.address) {
            Ok(r) => reply.assignments.push(Assignment {
                client_id: id,
                group: r.group,
            }),
            Err(e) => reply.rejected.push((id, e.message)),
        }
    }
    Ok(Json(reply))
}

async fn post_events(
    State(n): State<Arc<Node>>,
    JsonBody(upload): JsonBody<EventUpload>,
) -> Result<Response, ApiError> {
    upload.validate().map_err(crate::manager::events_error)?;
    let accepted = upload.events.len();
    n.enqueue(Upload::Events(upload)).await?;
    Ok(accepted_response(accepted))
}

fn accepted_response(accepted: usize) -> Response {
    use axum::response::IntoResponse;
    (
        axum::http::StatusCode::ACCEPTED,
        Json(serde_json::json!({ "accepted": accepted })),
    )
        .into_response()
}

async fn post_applications(
    State(n): State<Arc<Node>>,
    JsonBody(upload): JsonBody<ApplicationUpload>,
) -> Result<Response, ApiError> {
    upload.validate().map_err(crate::manager::events_error)?;
    let (group, location) = crate::serve::Placements::placement(&*n.placements, &upload.client_id);
    let refusal = {
        let dir = n
            .served
            .directory
            .read()
            .map_err(|_| ApiError::internal("directory lock poisoned"))?;
        crate::manager::learning_refusal(&dir, &group, location.as_deref())
    };
    if let Some(why) = refusal {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "learning_off",
            why,
        ));
    }
    let accepted = upload.applications.len();
    n.enqueue(Upload::Applications(upload)).await?;
    Ok(accepted_response(accepted))
}

/// A downstream node forwards its queue here (chaining): queued and forwarded further up.
async fn node_events(
    State(n): State<Arc<Node>>,
    headers: HeaderMap,
    JsonBody(batch): JsonBody<UploadBatch>,
) -> Result<Response, ApiError> {
    n.node_token.check(&headers, "node")?;
    let mut accepted = 0;
    for u in batch.uploads {
        match &u {
            Upload::Events(e) => e.validate().map_err(crate::manager::events_error)?,
            Upload::Applications(a) => a.validate().map_err(crate::manager::events_error)?,
        }
        accepted += u.count();
        n.enqueue(u).await?;
    }
    Ok(accepted_response(accepted))
}

#[derive(Deserialize)]
struct StreamQuery {
    client_id: Option<String>,
}

async fn stream(
    State(n): State<Arc<Node>>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| api::from_rejection(e.status(), e.body_text()))?;
    let client = q.client_id.filter(|c| !c.is_empty());
    let current = {
        let n = n.clone();
        let client = client.clone();
        move || {
            let revision = n.served.catalog.read().map(|c| c.revision()).unwrap_or(0);
            let Ok(dir) = n.served.directory.read() else {
                return Vec::new();
            };
            let groups: Vec<String> = match &client {
                None => dir.groups.keys().cloned().collect(),
                Some(id) => vec![n.group_of(&dir, id, None)],
            };
            crate::manager::state_changes(&dir, groups, revision)
        }
    };
    let me = n.clone();
    let filter = move |c: &Change| match (&client, c.group()) {
        (None, _) | (_, None) => true,
        (Some(id), Some(g)) => match me.served.directory.read() {
            Ok(dir) => me.group_of(&dir, id, None) == g,
            Err(_) => true,
        },
    };
    Ok(n.served
        .changes
        .respond(current, filter, n.shutdown.clone()))
}
