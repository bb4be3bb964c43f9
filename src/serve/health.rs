//! Health: `/healthz` (alive), `/readyz` (ready to serve) and `/metrics` (Prometheus text).
//!
//! Owns [`Readiness`], whether a server has something to serve (a node: synced once, or a
//! mirror restored from disk) and since when its view is stale. It must never decide when a
//! server is synced: the node's mirror marks it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Serialize;

use super::Api;

/// Whether this server has synced and whether its view is stale.
#[derive(Default)]
pub struct Readiness {
    synced: AtomicBool,
    stale_since: Mutex<Option<DateTime<Utc>>>,
}

impl Readiness {
    /// Ready from the start (the manager is its own source of truth).
    pub fn ready() -> Readiness {
        let r = Readiness::default();
        r.synced.store(true, Ordering::Relaxed);
        r
    }

    /// An upstream answered: ready and fresh.
    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
        if let Ok(mut s) = self.stale_since.lock() {
            *s = None;
        }
    }

    /// An upstream answered, and says it has been stale since `since` (None: fresh): this
    /// server is as stale as its upstream.
    pub fn mark_synced_as(&self, since: Option<DateTime<Utc>>) {
        self.synced.store(true, Ordering::Relaxed);
        if let Ok(mut s) = self.stale_since.lock() {
            *s = since;
        }
    }

    /// Has a mirror from an earlier run (ready), not yet confirmed by an upstream.
    pub fn mark_restored(&self, since: DateTime<Utc>) {
        self.synced.store(true, Ordering::Relaxed);
        self.mark_stale(since);
    }

    /// No upstream answered: keeps the first moment it went stale.
    pub fn mark_stale(&self, now: DateTime<Utc>) {
        if let Ok(mut s) = self.stale_since.lock() {
            s.get_or_insert(now);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn stale_since(&self) -> Option<DateTime<Utc>> {
        self.stale_since.lock().ok().and_then(|s| *s)
    }
}

/// `Cache-Control: no-store`: a health answer or a metric kept by a cache would be a lie.
const NO_STORE: [(header::HeaderName, &str); 1] =
    [(header::CACHE_CONTROL, super::conditional::NO_STORE)];

pub async fn healthz() -> Response {
    (NO_STORE, Json(serde_json::json!({"status": "ok"}))).into_response()
}

#[derive(Serialize)]
struct ReadyBody {
    ready: bool,
    stale_since: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'static str>,
}

/// Ready: synced (or restored from disk) and able to write to its store.
pub async fn readyz(State(api): State<Api>) -> Response {
    let readiness = &api.served.readiness;
    let synced = readiness.is_ready();
    let writable = api.served.store.writable();
    let ready = synced && writable;
    let (error, message) = match (synced, writable) {
        (false, _) => (Some("not_ready"), Some("not synced with an upstream yet")),
        (true, false) => (
            Some("storage_unavailable"),
            Some("the store cannot write (a full or failing disk); it heals when it can"),
        ),
        (true, true) => (None, None),
    };
    let body = ReadyBody {
        ready,
        stale_since: readiness.stale_since(),
        error,
        message,
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, NO_STORE, Json(body)).into_response()
}

pub async fn metrics(State(api): State<Api>) -> Response {
    let s = &api.served;
    s.metrics.cache_bytes.set(s.store.total_bytes() as i64);
    s.metrics.store_writable.set(i64::from(s.store.writable()));
    (
        [
            (
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            ),
            NO_STORE[0].clone(),
        ],
        s.metrics.render(),
    )
        .into_response()
}
