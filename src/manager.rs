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
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::Utc;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::api::{self, ApiError};
use crate::auth::{self, Token, TokenError};
use crate::catalog::{CatalogError, CatalogHistory};
use crate::config::ManagerConfig;
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::mirror::Snapshot;
use crate::serve::{self, Readiness, Served};
use crate::server;
use crate::store::{Kv, Store, StoreError};

/// Why the manager could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
}

const CATALOG_KEY: &str = "history";

/// A running manager's state.
pub struct Manager {
    served: Arc<Served>,
    catalog_kv: Kv,
    admin_token: Token,
    node_token: Token,
    /// Serializes catalog changes with their persistence, so revisions hit disk in order.
    publish_lock: tokio::sync::Mutex<()>,
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
    pub fn open(config: &ManagerConfig) -> Result<Arc<Manager>, ManagerError> {
        let store = Store::open(&config.manager.data_dir)?;
        let (admin_token, node_token) = tokens(config)?;
        let catalog_kv = store.kv("catalog")?;
        let mut history: CatalogHistory = catalog_kv
            .get(CATALOG_KEY)?
            .unwrap_or_else(|| CatalogHistory::new(config.manager.retain_revisions));
        history.set_retain(config.manager.retain_revisions);
        tracing::info!(
            revision = history.revision(),
            blobs = store.list().len(),
            "manager state loaded"
        );
        let served = Arc::new(Served {
            store,
            catalog: Arc::new(RwLock::new(history)),
            metrics: Arc::new(Metrics::new()),
            fetcher: None,
            readiness: Arc::new(Readiness::ready()),
        });
        Ok(Arc::new(Manager {
            served,
            catalog_kv,
            admin_token,
            node_token,
            publish_lock: tokio::sync::Mutex::new(()),
        }))
    }

    /// All routes of the manager.
    pub fn router(self: &Arc<Self>) -> Router {
        let admin = Router::new()
            .route("/v1/admin/content", post(publish))
            .route("/v1/admin/content/{name}", delete(unpublish))
            .route("/v1/sync", get(sync))
            .with_state(self.clone());
        serve::finish_router(serve::client_router(self.served.clone()).merge(admin))
    }

    /// Serves until `shutdown`, then flushes the store.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: server::Shutdown,
    ) -> Result<(), ManagerError> {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "manager listening");
        server::run(listener, self.router(), shutdown.wait()).await?;
        self.served.store.flush().await?;
        tracing::info!("manager stopped");
        Ok(())
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
        catalog.publish(
            &name,
            q.version.as_deref(),
            digest,
            meta.size,
            urgent,
            Utc::now(),
        )
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
    let revision = m
        .served
        .catalog
        .write()
        .map_err(|_| ApiError::internal("catalog lock poisoned"))?
        .unpublish(&name, Utc::now())
        .map_err(catalog_error)?;
    m.persist_catalog().await?;
    tracing::info!(%name, revision, "unpublished");
    Ok(Json(
        serde_json::json!({"name": name, "revision": revision}),
    ))
}

async fn sync(State(m): State<Arc<Manager>>, headers: HeaderMap) -> Result<Response, ApiError> {
    m.node_token.check(&headers, "node")?;
    let snapshot = m.snapshot()?;
    Ok(serve::json_with_etag(&headers, &snapshot.etag(), &snapshot))
}
