//! Publishing content: `POST /v1/admin/content` and `DELETE /v1/admin/content/{name}`.
//!
//! Owns streaming an upload into the store (a 1 GiB package is never held in memory), adding
//! it to the catalog (a new revision, signed, persisted, pushed), and unpublishing. The same
//! bytes again are not a new revision; the same name and version with other bytes is a
//! conflict. It must never leave a blob in the store that no retained revision references
//! because its publish was refused; blobs that fall out of the retained revisions later are
//! `upkeep`'s to collect.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Utc;
use futures_util::StreamExt;
use serde::Deserialize;

use super::Manager;
use crate::core::catalog::validate_label;
use crate::core::fault::{Fault, Internal, Kind};
use crate::core::proto::{Change, PublishResult};
use crate::http::error::ApiError;
use crate::http::extract::{Path, Query};

/// What a publish request lacks or gets wrong beyond the catalog's own rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("query parameter `name` is required")]
    NoName,
    #[error("query parameter `urgent` must be true or false, got {0:?}")]
    BadUrgent(String),
    #[error("reading the upload: {0}")]
    Body(String),
}

impl Fault for PublishError {
    fn kind(&self) -> Kind {
        Kind::BadInput
    }

    fn code(&self) -> &'static str {
        match self {
            PublishError::NoName | PublishError::BadUrgent(_) => "bad_request",
            PublishError::Body(_) => "body_incomplete",
        }
    }
}

#[derive(Deserialize)]
pub struct PublishQuery {
    name: Option<String>,
    version: Option<String>,
    #[serde(default)]
    urgent: Option<String>,
}

pub async fn publish(
    State(m): State<Arc<Manager>>,
    Query(q): Query<PublishQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let name = q.name.ok_or(PublishError::NoName)?;
    validate_label("name", &name)?;
    if let Some(v) = &q.version {
        validate_label("version", v)?;
    }
    let urgent = match q.urgent.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => return Err(PublishError::BadUrgent(other.to_string()).into()),
    };
    let store = &m.served.store;
    let mut writer = store.writer().await?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| PublishError::Body(e.to_string()))?;
        writer.write(&chunk).await?;
    }
    // The lock comes before the blob is visible: the garbage collection (which takes it
    // too) must never see a blob stored for a publish that has not reached the catalog.
    let _guard = m.publish_lock.lock().await;
    let (digest, meta) = writer.finish(None).await?;

    let outcome = {
        let mut catalog = m
            .served
            .catalog
            .write()
            .map_err(|_| Internal::poisoned("catalog"))?;
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
                .catalog()
                .map(|c| c.contains(&digest))
                .unwrap_or(true);
            if !referenced {
                let _ = store.remove(&digest).await;
            }
            return Err(e.into());
        }
    };
    if published.created {
        m.persist_catalog().await?;
        m.served.changes.send(Change::Catalog {
            revision: published.revision,
        });
        // A blob may have left the retained revisions.
        m.catalog_changed.notify_one();
        // The new version's deltas are computed in the background: this answer does not wait.
        m.deltas_wanted.notify_one();
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

pub async fn unpublish(
    State(m): State<Arc<Manager>>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let _guard = m.publish_lock.lock().await;
    let revision = {
        let mut catalog = m
            .served
            .catalog
            .write()
            .map_err(|_| Internal::poisoned("catalog"))?;
        let r = catalog.unpublish(&name, Utc::now())?;
        catalog.sign_current(|c| m.catalog_key.sign(c));
        r
    };
    m.persist_catalog().await?;
    m.served.changes.send(Change::Catalog { revision });
    m.catalog_changed.notify_one();
    tracing::info!(%name, revision, "unpublished");
    Ok(Json(
        serde_json::json!({"name": name, "revision": revision}),
    ))
}
