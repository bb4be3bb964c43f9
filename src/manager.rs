//! The management server: the source of truth nodes mirror.
//!
//! Owns the manager's state (catalog history, published blobs through `store`, tokens) and
//! its routes: the shared client routes of `serve`, `/v1/sync` for nodes, and the admin API
//! behind the admin token. Publishing streams the request body into the store (a 1 GiB
//! package is never held in memory). It must never fetch from anywhere: nothing is upstream
//! of the manager.

use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use chrono::Utc;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::api::{self, ApiError, JsonBody};
use crate::auth::{self, Token, TokenError};
use crate::catalog::{CatalogError, CatalogHistory};
use crate::clients::{self, ClientsError, Heartbeat, Registry};
use crate::config::ManagerConfig;
use crate::digest::Digest;
use crate::events::{
    ApplicationUpload, EventQuery, EventStore, EventUpload, EventsError, Origin, Upload,
    UploadBatch,
};
use crate::metrics::Metrics;
use crate::serve::Placements;
use crate::serve::{self, Readiness, Served};
use crate::server;
use crate::settings::{Directory, PutOutcome, SettingsError};
use crate::store::{Kv, Store, StoreError};
use crate::stream::{Change, Changes};

/// Largest JSON body of the client and admin API.
pub const BODY_LIMIT: usize = 1 << 20;
/// Largest batch a node may send on its node-token endpoints.
pub const BATCH_LIMIT: usize = 16 << 20;

/// Why the manager could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error("clients: {0}")]
    Clients(#[from] ClientsError),
    #[error("events: {0}")]
    Events(#[from] EventsError),
    #[error("tls: {0}")]
    Tls(#[from] server::TlsError),
    #[error("{0}")]
    Signing(#[from] crate::signing::SignError),
}

const CATALOG_KEY: &str = "history";
const DIRECTORY_KEY: &str = "directory";

/// A running manager's state.
pub struct Manager {
    served: Arc<Served>,
    catalog_kv: Kv,
    directory_kv: Kv,
    registry: Registry,
    events: EventStore,
    http: reqwest::Client,
    webhook: Option<String>,
    admin_token: Token,
    node_token: Token,
    /// Serializes catalog changes with their persistence, so revisions hit disk in order.
    publish_lock: tokio::sync::Mutex<()>,
    /// Signs each catalog revision.
    catalog_key: crate::signing::CatalogKey,
    /// Serializes directory changes with their persistence.
    admin_lock: tokio::sync::Mutex<()>,
    shutdown: server::Shutdown,
    limits: server::Limits,
    tls: Option<server::Tls>,
}

/// Tokens a manager uses, resolved from config, files, or its data dir.
pub fn tokens(config: &ManagerConfig) -> Result<(Token, Token), TokenError> {
    let m = &config.manager;
    let file = |f: &str| (!f.is_empty()).then(|| std::path::PathBuf::from(f));
    let admin = auth::resolve(
        Some(&m.admin_token),
        file(&m.admin_token_file).as_deref(),
        &m.data_dir,
        "admin",
    )?;
    let node = auth::resolve(
        Some(&m.node_token),
        file(&m.node_token_file).as_deref(),
        &m.data_dir,
        "node",
    )?;
    Ok((admin, node))
}

impl Manager {
    /// Opens the data dir: store, catalog, tokens.
    pub fn open(
        config: &ManagerConfig,
        shutdown: server::Shutdown,
    ) -> Result<Arc<Manager>, ManagerError> {
        let store = Store::open(&config.manager.data_dir)?;
        let (admin_token, node_token) = tokens(config)?;
        let catalog_kv = store.kv("catalog")?;
        let mut history: CatalogHistory = catalog_kv
            .get(CATALOG_KEY)?
            .unwrap_or_else(|| CatalogHistory::new(config.manager.retain_revisions));
        history.set_retain(config.manager.retain_revisions);
        let catalog_key = crate::signing::CatalogKey::load_or_create(&config.manager.data_dir)?;
        history.sign_current(|c| catalog_key.sign(c));
        let directory_kv = store.kv("settings")?;
        let directory: Directory = directory_kv.get(DIRECTORY_KEY)?.unwrap_or_default();
        let registry = Registry::open(&store)?;
        let store_slots = store.kv("slots")?;
        let events = EventStore::open(&store)?;
        let m = &config.manager;
        let tls = if m.tls_cert.is_empty() {
            None
        } else {
            Some(server::tls_acceptor(
                std::path::Path::new(&m.tls_cert),
                std::path::Path::new(&m.tls_key),
            )?)
        };
        let limits = config.limits.resolve(server::open_file_limit());
        tracing::info!(
            revision = history.revision(),
            blobs = store.list().len(),
            groups = directory.groups.len(),
            "manager state loaded"
        );
        let metrics = Arc::new(Metrics::new());
        let served = Arc::new(Served {
            store,
            catalog: Arc::new(RwLock::new(history)),
            changes: Arc::new(Changes::new(metrics.stream_clients.clone())),
            metrics,
            fetcher: None,
            readiness: Arc::new(Readiness::ready()),
            directory: Arc::new(RwLock::new(directory)),
            lan: crate::limit::ByteLimiter::new(0),
            slots: crate::slots::Slots::new(store_slots),
            placements: Arc::new(registry.clone()),
            downloads: None,
            hot: Arc::new(crate::hot::HotBlobs::new(
                crate::config::DEFAULT_MEMORY_BYTES,
                crate::config::DEFAULT_MEMORY_ITEM_MAX_BYTES,
            )),
            catalog_body: RwLock::new(None),
        });
        Ok(Arc::new(Manager {
            served,
            catalog_kv,
            directory_kv,
            registry,
            events,
            http: reqwest::Client::new(),
            webhook: (!config.notifications.webhook_url.is_empty())
                .then(|| config.notifications.webhook_url.clone()),
            admin_token,
            node_token,
            publish_lock: tokio::sync::Mutex::new(()),
            catalog_key,
            admin_lock: tokio::sync::Mutex::new(()),
            shutdown,
            limits,
            tls,
        }))
    }

    /// All routes of the manager.
    pub fn router(self: &Arc<Self>) -> Router {
        let publishing = Router::new()
            .route("/v1/admin/content", post(publish))
            .with_state(self.clone());
        let batches = Router::new()
            .route("/v1/node/heartbeats", post(node_heartbeats))
            .route("/v1/node/events", post(node_events))
            .layer(DefaultBodyLimit::max(BATCH_LIMIT))
            .with_state(self.clone());
        let rest = Router::new()
            .route("/v1/admin/content/{name}", delete(unpublish))
            .route("/v1/admin/site", put(put_site).get(get_site))
            .route("/v1/admin/groups", get(list_groups))
            .route(
                "/v1/admin/groups/{group}",
                put(put_group).delete(delete_group),
            )
            .route(
                "/v1/admin/groups/{group}/settings",
                put(put_settings).get(get_admin_settings),
            )
            .route("/v1/admin/groups/{group}/policy", put(put_policy))
            .route("/v1/admin/clients", get(list_clients))
            .route("/v1/admin/clients/{id}", delete(delete_client))
            .route("/v1/admin/clients/{id}/move", post(move_client))
            .route("/v1/admin/users/{user}", put(put_user))
            .route("/v1/heartbeat", post(heartbeat))
            .route("/v1/events", post(post_events))
            .route("/v1/applications", post(post_applications))
            .route("/v1/admin/events", get(admin_events))
            .route("/v1/admin/notifications", get(admin_notifications))
            .route("/v1/admin/applications", get(admin_applications))
            .route("/v1/stream", get(stream))
            .route("/v1/sync", get(sync))
            .layer(DefaultBodyLimit::max(BODY_LIMIT))
            .with_state(self.clone());
        serve::finish_router(
            serve::client_router(self.served.clone())
                .merge(publishing)
                .merge(batches)
                .merge(rest),
        )
    }

    /// Serves until `shutdown`, then flushes the store.
    pub async fn run(self: Arc<Self>, listener: TcpListener) -> Result<(), ManagerError> {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, tls = self.tls.is_some(), max_connections = self.limits.max_connections, "manager listening");
        server::run(
            listener,
            self.router(),
            self.shutdown.clone().wait(),
            self.limits.clone(),
            self.tls.clone(),
        )
        .await?;
        self.served.store.flush().await?;
        self.registry.flush().await?;
        tracing::info!("manager stopped");
        Ok(())
    }

    /// The public half of the catalog signing key (hex).
    pub fn catalog_public_key(&self) -> String {
        self.catalog_key.public_hex()
    }

    fn directory(&self) -> Result<std::sync::RwLockReadGuard<'_, Directory>, ApiError> {
        self.served
            .directory
            .read()
            .map_err(|_| ApiError::internal("directory lock poisoned"))
    }

    /// Applies `f` to the directory, persists the result durably, then pushes the changes
    /// `f` reports. Nothing changes when `f` fails.
    async fn change_directory<T>(
        &self,
        f: impl FnOnce(&mut Directory) -> Result<(T, Vec<Change>), ApiError>,
    ) -> Result<T, ApiError> {
        let _guard = self.admin_lock.lock().await;
        let (out, changes, copy) = {
            let mut dir = self
                .served
                .directory
                .write()
                .map_err(|_| ApiError::internal("directory lock poisoned"))?;
            let mut draft = dir.clone();
            let (out, changes) = f(&mut draft)?;
            *dir = draft.clone();
            (out, changes, draft)
        };
        self.directory_kv
            .put(DIRECTORY_KEY, &copy)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.directory_kv
            .flush()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
        self.served.changes.send_all(changes);
        Ok(out)
    }

    async fn persist_catalog(&self) -> Result<(), ApiError> {
        let history = self
            .served
            .catalog
            .read()
            .map_err(|_| ApiError::internal("catalog lock poisoned"))?
            .clone();
        self.catalog_kv
            .put(CATALOG_KEY, &history)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        // Slots of revisions no longer retained are not needed any more.
        if let Err(e) = self.served.slots.prune(history.oldest_revision()) {
            tracing::warn!(error = %e, "could not prune old download slots");
        }
        self.catalog_kv
            .flush()
            .await
            .map_err(|e| ApiError::internal(e.to_string()))
    }
}

fn catalog_error(e: CatalogError) -> ApiError {
    match e {
        CatalogError::VersionConflict { .. } => ApiError::conflict(e.to_string()),
        CatalogError::UnknownName(_) => ApiError::not_found(e.to_string()),
        CatalogError::Invalid { .. } => ApiError::bad_request("bad_request", e.to_string()),
        CatalogError::Backwards { .. } => ApiError::internal(e.to_string()),
    }
}

#[derive(Deserialize)]
struct PublishQuery {
    name: Option<String>,
    version: Option<String>,
    #[serde(default)]
    urgent: Option<String>,
}

/// The answer to a publish.
#[derive(Serialize, Deserialize, Debug)]
pub struct PublishResult {
    pub sha256: Digest,
    pub size: u64,
    pub revision: u64,
    pub name: String,
    pub version: String,
}

async fn publish(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    query: Result<Query<PublishQuery>, QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let Query(q) = query.map_err(|e| api::from_rejection(e.status(), e.body_text()))?;
    let name = q.name.ok_or_else(|| {
        ApiError::bad_request("bad_request", "query parameter `name` is required")
    })?;
    crate::catalog::validate_label("name", &name).map_err(catalog_error)?;
    if let Some(v) = &q.version {
        crate::catalog::validate_label("version", v).map_err(catalog_error)?;
    }
    let urgent = match q.urgent.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "bad_request",
                format!("query parameter `urgent` must be true or false, got {other:?}"),
            ))
        }
    };
    let store = &m.served.store;
    let mut writer = store
        .writer()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request("body_incomplete", format!("reading the upload: {e}"))
        })?;
        writer
            .write(&chunk)
            .await
            .map_err(|e| ApiError::internal(e.to_string()))?;
    }
    let (digest, meta) = writer
        .finish(None)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;

    let _guard = m.publish_lock.lock().await;
    let outcome = {
        let mut catalog = m
            .served
            .catalog
            .write()
            .map_err(|_| ApiError::internal("catalog lock poisoned"))?;
        let r = catalog.publish(
            &name,
            q.version.as_deref(),
            digest,
            meta.size,
            urgent,
            Utc::now(),
        );
        catalog.sign_current(|c| m.catalog_key.sign(c));
        r
    };
    let published = match outcome {
        Ok(p) => p,
        Err(e) => {
            let referenced = m
                .served
                .catalog
                .read()
                .map(|c| c.contains(&digest))
                .unwrap_or(true);
            if !referenced {
                let _ = store.remove(&digest).await;
            }
            return Err(catalog_error(e));
        }
    };
    if published.created {
        m.persist_catalog().await?;
        m.served.changes.send(Change::Catalog {
            revision: published.revision,
        });
    }
    let version = q
        .version
        .unwrap_or_else(|| digest.to_hex()[..12].to_string());
    tracing::info!(%name, %version, sha256 = %digest, size = meta.size, revision = published.revision, created = published.created, "published");
    let status = if published.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(PublishResult {
            sha256: digest,
            size: meta.size,
            revision: published.revision,
            name,
            version,
        }),
    )
        .into_response())
}

async fn unpublish(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let _guard = m.publish_lock.lock().await;
    let revision = {
        let mut catalog = m
            .served
            .catalog
            .write()
            .map_err(|_| ApiError::internal("catalog lock poisoned"))?;
        let r = catalog
            .unpublish(&name, Utc::now())
            .map_err(catalog_error)?;
        catalog.sign_current(|c| m.catalog_key.sign(c));
        r
    };
    m.persist_catalog().await?;
    m.served.changes.send(Change::Catalog { revision });
    tracing::info!(%name, revision, "unpublished");
    Ok(Json(
        serde_json::json!({"name": name, "revision": revision}),
    ))
}

async fn sync(State(m): State<Arc<Manager>>, headers: HeaderMap) -> Result<Response, ApiError> {
    m.node_token.check(&headers, "node")?;
    m.served.sync_response(&headers)
}

// === settings and groups ===

/// A settings error on the wire: 400 naming the key, 404, or 409.
pub fn settings_error(e: SettingsError) -> ApiError {
    let message = e.to_string();
    match e {
        SettingsError::BadRequest { .. } => ApiError::bad_request("bad_setting", message),
        SettingsError::NotFound(_) => ApiError::not_found(message),
        SettingsError::Conflict(_) => ApiError::conflict(message),
    }
}

fn clients_error(e: ClientsError) -> ApiError {
    let message = e.to_string();
    match e {
        ClientsError::Invalid { .. } => ApiError::bad_request("bad_request", message),
        ClientsError::UnknownClient(_) | ClientsError::UnknownGroup(_) => {
            ApiError::not_found(message)
        }
        ClientsError::Store(_) => ApiError::internal(message),
    }
}

/// Settings changes for `groups`, as pushed to streams.
fn settings_changes(dir: &Directory, groups: &[String]) -> Vec<Change> {
    groups
        .iter()
        .map(|g| Change::Settings {
            group: g.clone(),
            serial: dir.settings_serial(g),
        })
        .collect()
}

/// The current settings and policy serials of `groups` and the catalog revision: what a
/// stream starts with (manager and node alike).
pub fn state_changes(
    dir: &Directory,
    groups: impl IntoIterator<Item = String>,
    revision: u64,
) -> Vec<Change> {
    let mut out = Vec::new();
    for g in groups {
        out.push(Change::Settings {
            serial: dir.settings_serial(&g),
            group: g.clone(),
        });
        out.push(Change::Policy {
            serial: clients::policy_serial(dir, &g),
            group: g,
        });
    }
    out.push(Change::Catalog { revision });
    out
}

async fn get_site(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let site = m.directory()?.site.clone();
    Ok(Json(serde_json::to_value(site).unwrap_or_default()))
}

async fn put_site(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let site = m
        .change_directory(|d| {
            let before = d.site.clone();
            d.put_site(&body).map_err(settings_error)?;
            // learn_applications depends on the site switch: every group's settings change.
            let changes = if d.site != before {
                let all: Vec<String> = d.groups.keys().cloned().collect();
                settings_changes(d, &all)
            } else {
                Vec::new()
            };
            Ok((d.site.clone(), changes))
        })
        .await?;
    Ok(Json(serde_json::to_value(site).unwrap_or_default()))
}

async fn list_groups(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let groups = m.directory()?.groups_list();
    Ok(Json(serde_json::json!({ "groups": groups })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ParentBody {
    parent: Option<String>,
}

async fn put_group(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    Path(group): Path<String>,
    JsonBody(body): JsonBody<ParentBody>,
) -> Result<Response, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let parent = body
        .parent
        .unwrap_or_else(|| crate::settings::DEFAULT_GROUP.to_string());
    let outcome = m
        .change_directory(|d| {
            let o = d.put_group(&group, &parent).map_err(settings_error)?;
            let changes = if o == PutOutcome::Unchanged {
                Vec::new()
            } else {
                let mut c = settings_changes(d, &d.descendants(&group));
                c.extend(d.descendants(&group).into_iter().map(|g| Change::Policy {
                    serial: clients::policy_serial(d, &g),
                    group: g,
                }));
                c
            };
            Ok((o, changes))
        })
        .await?;
    let status = if outcome == PutOutcome::Created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(serde_json::json!({"group": group, "parent": parent})),
    )
        .into_response())
}

async fn delete_group(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    Path(group): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let has_clients = m.registry.has_clients(&group).map_err(clients_error)?;
    m.change_directory(|d| {
        d.delete_group(&group, has_clients)
            .map_err(settings_error)?;
        Ok(((), Vec::new()))
    })
    .await?;
    Ok(Json(serde_json::json!({"deleted": group})))
}

#[derive(Deserialize)]
struct LocationQuery {
    location: Option<String>,
}

async fn put_settings(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    Path(group): Path<String>,
    query: Result<Query<LocationQuery>, QueryRejection>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let Query(q) = query.map_err(|e| api::from_rejection(e.status(), e.body_text()))?;
    let location = q.location.filter(|l| !l.is_empty());
    let effective = m
        .change_directory(|d| {
            let changed = d
                .put_settings(&group, location.as_deref(), &body)
                .map_err(settings_error)?;
            let changes = settings_changes(d, &changed);
            Ok((
                clients::settings_json(d, &group, location.as_deref()),
                changes,
            ))
        })
        .await?;
    Ok(Json(effective))
}

async fn get_admin_settings(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    Path(group): Path<String>,
    query: Result<Query<LocationQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let Query(q) = query.map_err(|e| api::from_rejection(e.status(), e.body_text()))?;
    let location = q.location.filter(|l| !l.is_empty());
    let dir = m.directory()?;
    let Some(g) = dir.groups.get(&group) else {
        return Err(ApiError::not_found(format!("no group {group:?}")));
    };
    let own = g.own.to_nested();
    let location_override = location
        .as_deref()
        .and_then(|l| g.locations.get(l))
        .map(|o| o.to_nested());
    Ok(Json(serde_json::json!({
        "group": group,
        "location": location,
        "own": own,
        "location_override": location_override,
        "effective": clients::settings_json(&dir, &group, location.as_deref()),
    })))
}

async fn put_policy(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    Path(group): Path<String>,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let serial = m
        .change_directory(|d| {
            let serial = d.put_policy(&group, body).map_err(settings_error)?;
            // Every descendant whose effective policy is now this one hears of it.
            let changes = d
                .descendants(&group)
                .into_iter()
                .filter(|g| clients::policy_serial(d, g) == serial)
                .map(|g| Change::Policy { group: g, serial })
                .collect();
            Ok((serial, changes))
        })
        .await?;
    Ok(Json(serde_json::json!({"group": group, "serial": serial})))
}

// === clients ===

async fn heartbeat(
    State(m): State<Arc<Manager>>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    JsonBody(hb): JsonBody<Heartbeat>,
) -> Result<Json<clients::HeartbeatReply>, ApiError> {
    hb.validate().map_err(clients_error)?;
    let revision = m
        .served
        .catalog
        .read()
        .map_err(|_| ApiError::internal("catalog lock poisoned"))?
        .revision();
    let dir = m.directory()?.clone();
    let record = m
        .registry
        .heartbeat(&dir, &hb, Some(peer.ip().to_string()), Utc::now())
        .map_err(clients_error)?;
    Ok(Json(clients::reply(
        &dir,
        &hb,
        &record.group,
        revision,
        None,
    )))
}

/// One heartbeat relayed by a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayedHeartbeat {
    pub heartbeat: Heartbeat,
    /// The client's address as the node saw it.
    pub address: Option<String>,
}

/// `POST /v1/node/heartbeats` body.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HeartbeatBatch {
    pub heartbeats: Vec<RelayedHeartbeat>,
}

/// The group the manager placed a relayed client in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignment {
    pub client_id: String,
    pub group: String,
}

/// `POST /v1/node/heartbeats` answer.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct BatchReply {
    pub assignments: Vec<Assignment>,
    /// Heartbeats refused as invalid, by client id, with the reason.
    pub rejected: Vec<(String, String)>,
}

async fn node_heartbeats(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    JsonBody(batch): JsonBody<HeartbeatBatch>,
) -> Result<Json<BatchReply>, ApiError> {
    m.node_token.check(&headers, "node")?;
    let dir = m.directory()?.clone();
    let now = Utc::now();
    let mut reply = BatchReply::default();
    for item in batch.heartbeats {
        match m
            .registry
            .heartbeat(&dir, &item.heartbeat, item.address, now)
        {
            Ok(r) => reply.assignments.push(Assignment {
                client_id: r.client_id,
                group: r.group,
            }),
            Err(ClientsError::Invalid { field, reason }) => reply
                .rejected
                .push((item.heartbeat.client_id, format!("{field}: {reason}"))),
            Err(e) => return Err(clients_error(e)),
        }
    }
    Ok(Json(reply))
}

async fn list_clients(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let clients = m.registry.list(Utc::now()).map_err(clients_error)?;
    Ok(Json(serde_json::json!({ "clients": clients })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    group: String,
}

async fn move_client(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<GroupBody>,
) -> Result<Json<clients::ClientRecord>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let dir = m.directory()?.clone();
    let record = m
        .registry
        .move_client(&dir, &id, &body.group)
        .map_err(clients_error)?;
    m.registry.flush().await.map_err(clients_error)?;
    // A pushed client hears of its new group's settings at once.
    m.served.changes.send(Change::Settings {
        group: record.group.clone(),
        serial: dir.settings_serial(&record.group),
    });
    Ok(Json(record))
}

async fn delete_client(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    m.registry.delete(&id).map_err(clients_error)?;
    m.registry.flush().await.map_err(clients_error)?;
    Ok(Json(serde_json::json!({"deleted": id})))
}

async fn put_user(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    Path(user): Path<String>,
    JsonBody(body): JsonBody<GroupBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let dir = m.directory()?.clone();
    m.registry
        .set_user(&dir, &user, &body.group)
        .map_err(clients_error)?;
    m.registry.flush().await.map_err(clients_error)?;
    Ok(Json(serde_json::json!({"user": user, "group": body.group})))
}

#[derive(Deserialize)]
struct StreamQuery {
    client_id: Option<String>,
}

async fn stream(
    State(m): State<Arc<Manager>>,
    query: Result<Query<StreamQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| api::from_rejection(e.status(), e.body_text()))?;
    let client = q.client_id.filter(|c| !c.is_empty());
    let current = {
        let m = m.clone();
        let client = client.clone();
        move || {
            let revision = m.served.catalog.read().map(|c| c.revision()).unwrap_or(0);
            let Ok(dir) = m.served.directory.read() else {
                return Vec::new();
            };
            let groups: Vec<String> = match &client {
                None => dir.groups.keys().cloned().collect(),
                Some(id) => vec![m.registry.placement(id).0],
            };
            state_changes(&dir, groups, revision)
        }
    };
    let registry = m.registry.clone();
    let filter = move |c: &Change| match (&client, c.group()) {
        (None, _) | (_, None) => true,
        (Some(id), Some(g)) => registry.placement(id).0 == g,
    };
    Ok(m.served
        .changes
        .respond(current, filter, m.shutdown.clone()))
}

// === events, notifications, applications ===

/// An events error on the wire: 400 naming the field.
pub fn events_error(e: EventsError) -> ApiError {
    match e {
        EventsError::Invalid { .. } => ApiError::bad_request("bad_request", e.to_string()),
        EventsError::Store(_) => ApiError::internal(e.to_string()),
    }
}

/// Why learning is refused for a client, if it is.
pub fn learning_refusal(dir: &Directory, group: &str, location: Option<&str>) -> Option<String> {
    if !dir.site.application_learning {
        return Some("application learning is off for the site (application_learning)".into());
    }
    if !dir.effective(group, location).learn_applications {
        return Some(format!(
            "application learning is off for group {group:?} (learn_applications)"
        ));
    }
    None
}

impl Manager {
    /// Stores uploads (from a client or a node), raises notifications, makes them durable.
    async fn accept(&self, uploads: &[Upload]) -> Result<(), ApiError> {
        let now = Utc::now();
        let damper = self.directory()?.site.notification_damper_s;
        let mut created = Vec::new();
        for upload in uploads {
            match upload {
                Upload::Events(u) => {
                    let (group, location) = self.registry.placement(&u.client_id);
                    let stored = self
                        .events
                        .add_events(u, &Origin { group, location }, now)
                        .map_err(events_error)?;
                    created.extend(
                        self.events
                            .notify(&stored, damper, now)
                            .map_err(events_error)?,
                    );
                }
                Upload::Applications(u) => {
                    self.events.add_applications(u, now).map_err(events_error)?
                }
            }
        }
        self.events.flush().await.map_err(events_error)?;
        for n in created {
            tracing::warn!(group = %n.group, kind = %n.kind, client = %n.client_id, "critical event: admin notification raised");
            if let Some(url) = &self.webhook {
                tokio::spawn(deliver_webhook(self.http.clone(), url.clone(), n));
            }
        }
        Ok(())
    }
}

/// POSTs a notification to the webhook, retrying with backoff (5 tries).
async fn deliver_webhook(http: reqwest::Client, url: String, n: crate::events::Notification) {
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

async fn post_events(
    State(m): State<Arc<Manager>>,
    JsonBody(upload): JsonBody<EventUpload>,
) -> Result<Response, ApiError> {
    upload.validate().map_err(events_error)?;
    let accepted = upload.events.len();
    m.accept(&[Upload::Events(upload)]).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "accepted": accepted })),
    )
        .into_response())
}

async fn post_applications(
    State(m): State<Arc<Manager>>,
    JsonBody(upload): JsonBody<ApplicationUpload>,
) -> Result<Response, ApiError> {
    upload.validate().map_err(events_error)?;
    let (group, location) = m.registry.placement(&upload.client_id);
    let refusal = learning_refusal(&*m.directory()?, &group, location.as_deref());
    if let Some(why) = refusal {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "learning_off", why));
    }
    let accepted = upload.applications.len();
    m.accept(&[Upload::Applications(upload)]).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "accepted": accepted })),
    )
        .into_response())
}

async fn node_events(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    JsonBody(batch): JsonBody<UploadBatch>,
) -> Result<Response, ApiError> {
    m.node_token.check(&headers, "node")?;
    for u in &batch.uploads {
        match u {
            Upload::Events(e) => e.validate().map_err(events_error)?,
            Upload::Applications(a) => a.validate().map_err(events_error)?,
        }
    }
    let accepted: usize = batch.uploads.iter().map(Upload::count).sum();
    m.accept(&batch.uploads).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "accepted": accepted })),
    )
        .into_response())
}

async fn admin_events(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    query: Result<Query<EventQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let Query(q) = query.map_err(|e| api::from_rejection(e.status(), e.body_text()))?;
    let (events, next) = m.events.query(&q).map_err(events_error)?;
    Ok(Json(serde_json::json!({ "events": events, "next": next })))
}

async fn admin_notifications(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let notifications = m.events.notifications().map_err(events_error)?;
    Ok(Json(serde_json::json!({ "notifications": notifications })))
}

#[derive(Deserialize)]
struct AppQuery {
    q: Option<String>,
}

async fn admin_applications(
    State(m): State<Arc<Manager>>,
    headers: HeaderMap,
    query: Result<Query<AppQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    m.admin_token.check(&headers, "admin")?;
    let Query(q) = query.map_err(|e| api::from_rejection(e.status(), e.body_text()))?;
    let apps = m
        .events
        .search_applications(q.q.as_deref().unwrap_or(""))
        .map_err(events_error)?;
    Ok(Json(serde_json::json!({ "applications": apps })))
}
