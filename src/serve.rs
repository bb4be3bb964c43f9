//! Answers clients: the read side of the client API that manager and node share.
//!
//! Owns `GET /v1/catalog`, `GET|HEAD /v1/content/{sha256}` with RFC 9110 semantics (strong
//! ETag = the SHA-256, single ranges, suffix ranges, 416, If-None-Match, If-Range), plus
//! `/healthz`, `/readyz` and `/metrics`. It reads blobs from `store` only; when a blob in the
//! catalog is missing it asks the role's [`Fetcher`] (a node's upstream) to bring it into the
//! store first. It must never write to the store or talk to an upstream itself, and never
//! serve a digest that is not in a retained catalog revision.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use serde::Serialize;

use crate::api::ApiError;
use crate::catalog::CatalogHistory;
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::settings::Directory;
use crate::store::Store;
use crate::stream::Changes;

/// Frame size for sending a blob (stored or arriving): the unit of LAN pacing and of the
/// served-bytes count.
const FRAME: usize = 1 << 20;

/// Stored blobs up to this size are read into memory (their body then goes out in one write
/// with the head); larger ones are mapped, and a plain-HTTP connection sends them from the
/// page cache with sendfile (`zerocopy`).
const READ_INTO_MEMORY: u64 = 64 << 10;

/// How far a fetch into a temp file has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// This many bytes are in the temp file; none of them verified yet.
    Running(u64),
    /// The whole blob arrived and its digest checked.
    Verified,
    /// The fetch failed (or its digest did not match): every reader must cut its response.
    Failed,
}

/// Where a missing blob can be read from while it is fetched.
pub enum Attached {
    /// Already complete in the store.
    Stored,
    /// Growing in a temp file: read what `progress` says is there.
    Growing {
        file: tokio::fs::File,
        progress: tokio::sync::watch::Receiver<Progress>,
    },
}

/// Brings a blob that is in the catalog but not in the store into the store (a node's
/// upstream). Concurrent calls for one digest share one fetch, and each caller can read the
/// bytes as they arrive.
pub trait Fetcher: Send + Sync + 'static {
    fn attach(&self, digest: Digest, size: u64) -> BoxFuture<'static, Result<Attached, ApiError>>;
}

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

/// What the shared client routes read.
pub struct Served {
    pub store: Store,
    pub catalog: Arc<RwLock<CatalogHistory>>,
    pub metrics: Arc<Metrics>,
    /// None on the manager: what is in its catalog is in its store.
    pub fetcher: Option<Arc<dyn Fetcher>>,
    pub readiness: Arc<Readiness>,
    /// Groups, settings and policies (the manager's own, or a node's mirror).
    pub directory: Arc<RwLock<Directory>>,
    /// Push notifications of this server.
    pub changes: Arc<Changes>,
    /// The budget all content responses share (`serve.max_bytes_per_sec`).
    pub lan: crate::limit::ByteLimiter,
    /// Download slots of this server.
    pub slots: crate::slots::Slots,
    /// Where a named client belongs (its settings decide its window).
    pub placements: Arc<dyn Placements>,
    /// `serve.max_concurrent_downloads` (None: unlimited).
    pub downloads: Option<Arc<tokio::sync::Semaphore>>,
    /// Small, often-read blobs in memory (`cache.memory_bytes`).
    pub hot: Arc<crate::hot::HotBlobs>,
    /// The current catalog's wire bytes and their ETag, serialized once per revision.
    pub catalog_body: RwLock<Option<(String, bytes::Bytes)>>,
}

/// Where a client belongs as this server knows it: (group, location).
pub trait Placements: Send + Sync {
    fn placement(&self, client_id: &str) -> (String, Option<String>);
}

impl Served {
    /// The current catalog as served: ETag, wire bytes (serialized once per revision) and
    /// the manager's signature of exactly those bytes.
    fn catalog_body(&self) -> Result<(String, bytes::Bytes, Option<String>), ApiError> {
        let history = self
            .catalog
            .read()
            .map_err(|_| ApiError::internal("catalog lock poisoned"))?;
        let etag = history.etag();
        let signature = history.signature().map(str::to_string);
        if let Ok(cached) = self.catalog_body.read() {
            if let Some((tag, body)) = cached.as_ref() {
                if *tag == etag {
                    return Ok((etag, body.clone(), signature));
                }
            }
        }
        let body = bytes::Bytes::from(crate::signing::catalog_bytes(&history.current()));
        if let Ok(mut cached) = self.catalog_body.write() {
            *cached = Some((etag.clone(), body.clone()));
        }
        Ok((etag, body, signature))
    }

    /// `GET /v1/sync`: everything this server holds that a node mirrors, with its ETag.
    /// The caller checks the node token first.
    pub fn sync_response(&self, headers: &HeaderMap) -> Result<Response, ApiError> {
        let (catalog, catalog_signature) = {
            let history = self
                .catalog
                .read()
                .map_err(|_| ApiError::internal("catalog lock poisoned"))?;
            (history.current(), history.signature().map(str::to_string))
        };
        let directory = self
            .directory
            .read()
            .map_err(|_| ApiError::internal("directory lock poisoned"))?
            .clone();
        let (etag, bytes) = crate::mirror::Snapshot {
            directory,
            catalog,
            catalog_signature,
        }
        .encode()
        .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(json_bytes_with_etag(headers, &etag, bytes))
    }

    /// The `download_slot` of a heartbeat reply: the slot for the current revision when the
    /// client has not got it yet, randomization is on, some new item is not urgent, and the
    /// window has not passed.
    pub fn download_slot(
        &self,
        client_id: &str,
        reported_revision: Option<u64>,
        group: &str,
        location: Option<&str>,
        now: DateTime<Utc>,
    ) -> Option<crate::clients::DownloadSlot> {
        let settings = self.directory.read().ok()?.effective(group, location);
        let window_s = settings.randomization.window_s;
        if !settings.randomization.enabled || window_s == 0 {
            return None;
        }
        let (revision, available_at) = {
            let history = self.catalog.read().ok()?;
            let current = history.revisions().last()?;
            if reported_revision == Some(current.catalog.revision) {
                return None;
            }
            let known: std::collections::HashSet<Digest> = history
                .revisions()
                .find(|r| Some(r.catalog.revision) == reported_revision)
                .map(|r| r.catalog.items.iter().map(|i| i.sha256).collect())
                .unwrap_or_default();
            let waits = current
                .catalog
                .items
                .iter()
                .any(|i| !known.contains(&i.sha256) && !i.urgent);
            if !waits {
                return None;
            }
            (current.catalog.revision, current.available_at)
        };
        let slot = match self
            .slots
            .slot(client_id, revision, available_at, window_s, now)
        {
            Ok(s) => s?,
            Err(e) => {
                tracing::warn!(error = %e, "could not record a download slot");
                return None;
            }
        };
        Some(crate::clients::DownloadSlot {
            catalog_revision: revision,
            not_before: slot,
            delay_s: crate::slots::secs_until(slot, now),
            window_s,
        })
    }

    /// 429 for a named client asking for `digest` before its slot. A blob in several retained
    /// revisions uses the earliest one's slot the client holds (a client that was given a
    /// slot for an older revision keeps it; one that heard of the blob only with a newer
    /// revision downloads it at that revision's slot, as its heartbeat said); a client that
    /// holds none (it never sent a heartbeat) gets one for the earliest revision on its first
    /// request. An urgent item never waits.
    fn check_slot(
        &self,
        client_id: &str,
        digest: &Digest,
        now: DateTime<Utc>,
    ) -> Result<(), ApiError> {
        let (group, location) = self.placements.placement(client_id);
        let settings = self
            .directory
            .read()
            .map_err(|_| ApiError::internal("directory lock poisoned"))?
            .effective(&group, location.as_deref());
        let window_s = settings.randomization.window_s;
        if !settings.randomization.enabled || window_s == 0 {
            return Ok(());
        }
        // (revision, available_at) of every retained revision holding the blob, oldest first.
        let holding: Vec<(u64, DateTime<Utc>)> = {
            let history = self
                .catalog
                .read()
                .map_err(|_| ApiError::internal("catalog lock poisoned"))?;
            let mut holding = Vec::new();
            for rev in history.revisions() {
                if let Some(item) = rev.catalog.items.iter().find(|i| &i.sha256 == digest) {
                    if item.urgent {
                        return Ok(());
                    }
                    holding.push((rev.catalog.revision, rev.available_at));
                }
            }
            holding
        };
        let Some(&(first_rev, first_at)) = holding.first() else {
            return Ok(());
        };
        let store_err = |e: crate::store::StoreError| ApiError::internal(e.to_string());
        let mut slot = None;
        let mut revision = first_rev;
        for (rev, at) in &holding {
            if let Some(t) = self
                .slots
                .held(client_id, *rev, *at, window_s)
                .map_err(store_err)?
            {
                slot = Some(t);
                revision = *rev;
                break;
            }
        }
        if slot.is_none() {
            slot = self
                .slots
                .slot(client_id, first_rev, first_at, window_s, now)
                .map_err(store_err)?;
        }
        match slot {
            Some(t) if t > now => {
                self.metrics.slot_deferrals.inc();
                let wait = crate::slots::secs_until(t, now).max(1);
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "before_slot",
                    format!(
                        "client {client_id:?} may download catalog revision {revision} from {}",
                        t.to_rfc3339()
                    ),
                )
                .with_header("retry-after", wait.to_string());
                e.extra = Some(serde_json::json!({ "not_before": t }));
                Err(e)
            }
            _ => Ok(()),
        }
    }
}

/// The routes every role serves to clients.
pub fn client_router(served: Arc<Served>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/catalog", get(catalog))
        .route("/v1/content/{sha256}", get(content))
        .route("/v1/groups/{group}/settings", get(group_settings))
        .route("/v1/groups/{group}/policy", get(group_policy))
        .with_state(served)
}

/// JSON 404 / 405 for every router of a role.
pub fn finish_router(router: Router) -> Router {
    router
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
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

async fn readyz(State(s): State<Arc<Served>>) -> Response {
    let ready = s.readiness.is_ready();
    let body = ReadyBody {
        ready,
        stale_since: s.readiness.stale_since(),
        error: (!ready).then_some("not_ready"),
        message: (!ready).then_some("not synced with an upstream yet"),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(s): State<Arc<Served>>) -> Response {
    s.metrics.cache_bytes.set(s.store.total_bytes() as i64);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// A JSON body with a strong ETag, or 304 when the client has it.
pub fn json_with_etag<T: Serialize>(headers: &HeaderMap, etag: &str, value: &T) -> Response {
    if if_none_match(headers, etag) {
        return not_modified(etag);
    }
    match serde_json::to_vec(value) {
        Ok(body) => json_bytes_with_etag(headers, etag, body),
        Err(e) => ApiError::internal(format!("encoding response: {e}")).into_response(),
    }
}

/// Serialized JSON with a strong ETag, or 304 when the client has it.
pub fn json_bytes_with_etag(headers: &HeaderMap, etag: &str, body: impl IntoResponse) -> Response {
    if if_none_match(headers, etag) {
        return not_modified(etag);
    }
    let mut resp = (StatusCode::OK, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn not_modified(etag: &str) -> Response {
    let mut resp = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(v) = HeaderValue::from_str(etag) {
        resp.headers_mut().insert(header::ETAG, v);
    }
    resp
}

async fn catalog(State(s): State<Arc<Served>>, headers: HeaderMap) -> Response {
    let (etag, body, signature) = match s.catalog_body() {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let mut resp = json_bytes_with_etag(&headers, &etag, body);
    // The signature covers exactly these bytes; clients can check a node did not invent them.
    if let Some(v) = signature.and_then(|sig| HeaderValue::from_str(&sig).ok()) {
        resp.headers_mut().insert("x-gup-catalog-signature", v);
    }
    resp
}

#[derive(serde::Deserialize)]
struct LocationQuery {
    location: Option<String>,
}

async fn group_settings(
    State(s): State<Arc<Served>>,
    Path(group): Path<String>,
    query: Result<axum::extract::Query<LocationQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let axum::extract::Query(q) =
        query.map_err(|e| crate::api::from_rejection(e.status(), e.body_text()))?;
    let location = q.location.as_deref().filter(|l| !l.is_empty());
    if let Some(l) = location {
        crate::settings::validate_name("location", l)
            .map_err(|e| ApiError::bad_request("bad_request", e.to_string()))?;
    }
    let dir = s
        .directory
        .read()
        .map_err(|_| ApiError::internal("directory lock poisoned"))?;
    if !dir.groups.contains_key(&group) {
        return Err(ApiError::not_found(format!("no group {group:?}")));
    }
    let etag = dir.settings_etag(&group, location);
    let body = crate::clients::settings_json(&dir, &group, location);
    Ok(json_with_etag(&headers, &etag, &body))
}

async fn group_policy(
    State(s): State<Arc<Served>>,
    Path(group): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let dir = s
        .directory
        .read()
        .map_err(|_| ApiError::internal("directory lock poisoned"))?;
    if !dir.groups.contains_key(&group) {
        return Err(ApiError::not_found(format!("no group {group:?}")));
    }
    let (serial, document) = match dir.policy(&group) {
        Some((_, p)) => (p.serial, p.document.clone()),
        None => (0, serde_json::Value::Null),
    };
    let etag = format!("\"policy-{serial}-{group}\"");
    let body = serde_json::json!({"group": group, "serial": serial, "policy": document});
    Ok(json_with_etag(&headers, &etag, &body))
}

async fn content(
    State(s): State<Arc<Served>>,
    Path(sha256): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let digest: Digest = sha256
        .parse()
        .map_err(|e| ApiError::bad_request("bad_digest", format!("{sha256:?}: {e}")))?;
    let size = {
        let catalog = s
            .catalog
            .read()
            .map_err(|_| ApiError::internal("catalog lock poisoned"))?;
        match catalog.find(&digest) {
            Some((_, item)) => item.size,
            None => {
                return Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_in_catalog",
                    format!("{digest} is not in the catalog"),
                ))
            }
        }
    };
    let etag = format!("\"{digest}\"");
    // Conditionals are decided before any byte is fetched: a client that has it needs nothing.
    if if_none_match(&headers, &etag) {
        return Ok(not_modified(&etag));
    }
    if let Some(client) = headers.get("x-gup-client-id").and_then(|v| v.to_str().ok()) {
        if !client.is_empty() && method == Method::GET {
            s.check_slot(client, &digest, Utc::now())?;
        }
    }
    let permit = match (&s.downloads, method == Method::GET) {
        (Some(sem), true) => match sem.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                let wait = rand::random_range(1..=5u32);
                return Err(ApiError::unavailable(
                    "this server is at serve.max_concurrent_downloads; retry shortly",
                )
                .with_header("retry-after", wait.to_string()));
            }
        },
        _ => None,
    };
    if let Some(body) = s.hot.get(&digest) {
        s.metrics.cache_hits.inc();
        // The eviction order still learns of the read; a failure here costs nothing served.
        let _ = s.store.mark_read(&digest);
        return blob_response(
            &s,
            Source::Stored(body, permit),
            size,
            &etag,
            &method,
            &headers,
        )
        .await;
    }
    // A blob the hot cache may keep is opened without holding it in use: the cache entry
    // must not pin it against eviction (the node drops evicted blobs from the cache).
    let keep = size <= s.hot.item_max();
    let opened = s
        .store
        .open_blob(&digest, READ_INTO_MEMORY, !keep)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let open = match opened {
        Some(found) => {
            s.metrics.cache_hits.inc();
            found
        }
        None => {
            let Some(fetcher) = &s.fetcher else {
                return Err(ApiError::internal(format!(
                    "{digest} is in the catalog but not in the store"
                )));
            };
            s.metrics.cache_misses.inc();
            match fetcher.attach(digest, size).await? {
                Attached::Stored => s
                    .store
                    .open_blob(&digest, READ_INTO_MEMORY, !keep)
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?
                    .ok_or_else(|| {
                        ApiError::unavailable(format!("{digest} could not be fetched"))
                    })?,
                Attached::Growing { file, progress } => {
                    let source = Source::Growing {
                        file,
                        progress,
                        permit,
                    };
                    return blob_response(&s, source, size, &etag, &method, &headers).await;
                }
            }
        }
    };
    if keep {
        s.hot.offer(digest, &open.bytes);
    }
    let size = open.meta.size;
    let source = Source::Stored(open.bytes, permit);
    blob_response(&s, source, size, &etag, &method, &headers).await
}

/// The bytes behind a content response.
pub enum Source {
    /// The bytes of a verified blob (in memory or mapped; a mapping keeps the blob from
    /// eviction while any slice of it lives), and the download permit the response holds.
    Stored(bytes::Bytes, Option<tokio::sync::OwnedSemaphorePermit>),
    /// A temp file still being fetched: its last byte is withheld until the digest checks,
    /// and the response is cut if it fails.
    Growing {
        file: tokio::fs::File,
        progress: tokio::sync::watch::Receiver<Progress>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    },
}

struct GrowingRead {
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    file: Arc<std::fs::File>,
    progress: tokio::sync::watch::Receiver<Progress>,
    pos: u64,
    end: u64,
    len: u64,
    served: prometheus_client::metrics::counter::Counter,
    by: Arc<Served>,
}

fn cut(why: &str) -> std::io::Error {
    std::io::Error::other(why.to_string())
}

/// Streams `[start, start+count)` of a growing temp file of a blob of `len` bytes.
fn growing_body(g: GrowingRead) -> Body {
    let stream = futures_util::stream::unfold(Some(g), |state| async move {
        let mut g = state?;
        loop {
            if g.pos >= g.end {
                return None;
            }
            let available = match *g.progress.borrow() {
                Progress::Verified => g.len,
                // The last byte waits for the digest: no client ever holds a complete
                // response of unverified bytes.
                Progress::Running(n) => n.min(g.len.saturating_sub(1)),
                Progress::Failed => return Some((Err(cut("upstream fetch failed")), None)),
            };
            let limit = available.min(g.end);
            if g.pos < limit {
                let want = (limit - g.pos).min(FRAME as u64) as usize;
                // Only bytes the fetch has written are mapped: nothing here can fault.
                let zero_copy = crate::zerocopy::sendfile_pays(g.len);
                let frame = match crate::zerocopy::map(g.file.clone(), g.pos, want, None, zero_copy)
                {
                    Ok(f) => f,
                    Err(e) => return Some((Err(e), None)),
                };
                g.pos += want as u64;
                g.by.lan.take(want).await;
                g.served.inc_by(want as u64);
                return Some((Ok(frame), Some(g)));
            }
            if g.progress.changed().await.is_err() && *g.progress.borrow() != Progress::Verified {
                return Some((Err(cut("upstream fetch ended")), None));
            }
        }
    });
    Body::from_stream(stream)
}

/// What a request asks of a representation of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeDecision {
    /// The whole representation (no Range, an ignored Range, or several ranges).
    Full,
    /// Bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

/// RFC 9110 §14.2 and §13.1.5: decides between 200, 206 and 416 for one representation.
pub fn decide_range(headers: &HeaderMap, etag: &str, len: u64) -> RangeDecision {
    let Some(range) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeDecision::Full;
    };
    // If-Range: the range applies only when the validator matches strongly. A date never
    // matches: blobs carry no Last-Modified.
    if let Some(if_range) = headers.get(header::IF_RANGE) {
        let matches = if_range.to_str().map(|v| v.trim() == etag).unwrap_or(false);
        if !matches {
            return RangeDecision::Full;
        }
    }
    use http_range_header::{EndPosition, RangeUnsatisfiableError, StartPosition};
    let parsed = match http_range_header::parse_range_header(range) {
        Ok(p) => p,
        // "bytes=-0" is well-formed but selects nothing.
        Err(RangeUnsatisfiableError::ZeroSuffix) => return RangeDecision::Unsatisfiable,
        // A Range the server cannot parse is ignored (§14.2).
        Err(_) => return RangeDecision::Full,
    };
    if parsed.ranges.len() != 1 {
        return RangeDecision::Full;
    }
    let r = parsed.ranges[0];
    match r.start {
        StartPosition::Index(start) => {
            let end = match r.end {
                EndPosition::Index(end) if end < start => return RangeDecision::Full,
                EndPosition::Index(end) => end,
                EndPosition::LastByte => u64::MAX,
            };
            if start >= len {
                return RangeDecision::Unsatisfiable;
            }
            RangeDecision::Partial {
                start,
                end: end.min(len - 1),
            }
        }
        StartPosition::FromLast(n) => {
            if len == 0 || n == 0 {
                return RangeDecision::Unsatisfiable;
            }
            // A suffix longer than the representation selects all of it (§14.1.3).
            RangeDecision::Partial {
                start: len - n.min(len),
                end: len - 1,
            }
        }
    }
}

/// RFC 9110 §13.1.2: weak comparison against our one strong ETag; `*` matches.
pub fn if_none_match(headers: &HeaderMap, etag: &str) -> bool {
    let bare = etag.trim_start_matches("W/");
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|t| t == "*" || t.trim_start_matches("W/") == bare)
}

/// Streams `len` bytes of an open blob with the headers of the content API.
pub async fn blob_response(
    served_by: &Arc<Served>,
    source: Source,
    len: u64,
    etag: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let decision = decide_range(headers, etag, len);
    // Static values are not parsed again on every response.
    let mut builder = Response::builder()
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )
        .header(header::ETAG, etag)
        .header(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"))
        .header(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=31536000, immutable"),
        );
    let (status, start, count) = match decision {
        RangeDecision::Full => (StatusCode::OK, 0, len),
        RangeDecision::Partial { start, end } => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeDecision::Unsatisfiable => {
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the blob has {len} bytes"),
            )
            .with_header("content-range", format!("bytes */{len}")));
        }
    };
    builder = builder.status(status).header(header::CONTENT_LENGTH, count);
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        let served = served_by.metrics.served_bytes.clone();
        match source {
            Source::Stored(bytes, permit) => {
                let range = bytes.slice(start as usize..(start + count) as usize);
                stored_body(range, permit, served, served_by)
            }
            Source::Growing {
                file,
                progress,
                permit,
            } => {
                let file = Arc::new(file.into_std().await);
                growing_body(GrowingRead {
                    _permit: permit,
                    file,
                    progress,
                    pos: start,
                    end: start + count,
                    len,
                    served,
                    by: served_by.clone(),
                })
            }
        }
    };
    builder
        .body(body)
        .map_err(|e| ApiError::internal(format!("building response: {e}")))
}

/// The body of a stored blob's selected bytes. Without a LAN budget or a download permit to
/// hold, a body up to [`FRAME`] is one frame that hyper writes with the head in one call;
/// otherwise it goes out in frames of [`FRAME`] bytes, each paced by the LAN budget. Either
/// way the bytes are slices of one buffer (or mapping): nothing is copied in user space.
fn stored_body(
    bytes: bytes::Bytes,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    served: prometheus_client::metrics::counter::Counter,
    by: &Arc<Served>,
) -> Body {
    let unlimited = by.lan.is_unlimited();
    if unlimited && permit.is_none() && bytes.len() <= FRAME {
        served.inc_by(bytes.len() as u64);
        return Body::from(bytes);
    }
    let by = by.clone();
    let frames = futures_util::stream::unfold((bytes, permit), move |(mut rest, permit)| {
        let by = by.clone();
        let served = served.clone();
        async move {
            if rest.is_empty() {
                return None;
            }
            let frame = rest.split_to(rest.len().min(FRAME));
            if !unlimited {
                by.lan.take(frame.len()).await;
            }
            served.inc_by(frame.len() as u64);
            Some((Ok::<_, std::io::Error>(frame), (rest, permit)))
        }
    });
    Body::from_stream(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, v.parse().unwrap());
        }
        m
    }

    const E: &str = "\"abc\"";

    #[test]
    fn ranges() {
        use RangeDecision::*;
        assert_eq!(decide_range(&h(&[]), E, 100), Full);
        assert_eq!(
            decide_range(&h(&[("range", "bytes=0-9")]), E, 100),
            Partial { start: 0, end: 9 }
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=90-")]), E, 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=90-500")]), E, 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=-10")]), E, 100),
            Partial { start: 90, end: 99 }
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=-500")]), E, 100),
            Partial { start: 0, end: 99 }
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=100-")]), E, 100),
            Unsatisfiable
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=-0")]), E, 100),
            Unsatisfiable
        );
        assert_eq!(
            decide_range(&h(&[("range", "bytes=0-0")]), E, 0),
            Unsatisfiable
        );
        assert_eq!(decide_range(&h(&[("range", "bytes=5-3")]), E, 100), Full);
        assert_eq!(decide_range(&h(&[("range", "items=0-3")]), E, 100), Full);
        assert_eq!(
            decide_range(&h(&[("range", "bytes=0-1,5-6")]), E, 100),
            Full
        );
    }

    #[test]
    fn if_range_and_if_none_match() {
        use RangeDecision::*;
        let r = [("range", "bytes=0-9"), ("if-range", E)];
        assert_eq!(decide_range(&h(&r), E, 100), Partial { start: 0, end: 9 });
        let r = [("range", "bytes=0-9"), ("if-range", "\"other\"")];
        assert_eq!(decide_range(&h(&r), E, 100), Full);
        let r = [("range", "bytes=0-9"), ("if-range", "W/\"abc\"")];
        assert_eq!(decide_range(&h(&r), E, 100), Full);
        let r = [
            ("range", "bytes=0-9"),
            ("if-range", "Tue, 15 Nov 1994 08:12:31 GMT"),
        ];
        assert_eq!(decide_range(&h(&r), E, 100), Full);
        assert!(if_none_match(&h(&[("if-none-match", E)]), E));
        assert!(if_none_match(
            &h(&[("if-none-match", "\"x\", W/\"abc\"")]),
            E
        ));
        assert!(if_none_match(&h(&[("if-none-match", "*")]), E));
        assert!(!if_none_match(&h(&[("if-none-match", "\"x\"")]), E));
        assert!(!if_none_match(&h(&[]), E));
    }
}

#[cfg(test)]
mod slot_tests {
    //! Slots in heartbeats and at the content door, with paused tokio time.
    use super::*;
    use crate::settings::Directory;

    struct Fixed;
    impl Placements for Fixed {
        fn placement(&self, _: &str) -> (String, Option<String>) {
            ("default".into(), None)
        }
    }

    fn served(dir: &std::path::Path) -> Served {
        let store = Store::open(dir).unwrap();
        let slots = crate::slots::Slots::new(store.kv("slots").unwrap());
        let metrics = Arc::new(Metrics::new());
        Served {
            store,
            catalog: Arc::new(RwLock::new(CatalogHistory::new(3))),
            changes: Arc::new(Changes::new(metrics.stream_clients.clone())),
            metrics,
            fetcher: None,
            readiness: Arc::new(Readiness::ready()),
            directory: Arc::new(RwLock::new(Directory::default())),
            lan: crate::limit::ByteLimiter::new(0),
            slots,
            placements: Arc::new(Fixed),
            downloads: None,
            hot: Arc::new(crate::hot::HotBlobs::new(0, 0)),
            catalog_body: RwLock::new(None),
        }
    }

    /// Wall time from tokio's paused clock.
    fn now(origin: DateTime<Utc>, start: tokio::time::Instant) -> DateTime<Utc> {
        origin + chrono::Duration::from_std(tokio::time::Instant::now() - start).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_slots_urgent_bypass_and_randomization_off() {
        let tmp = tempfile::tempdir().unwrap();
        let s = served(tmp.path());
        let origin = Utc::now();
        let t0 = tokio::time::Instant::now();
        s.directory
            .write()
            .unwrap()
            .put_settings(
                "default",
                None,
                &serde_json::json!({"randomization.window_s": 60}),
            )
            .unwrap();
        // Nothing published: nothing to download, no slot.
        assert!(s
            .download_slot("c", Some(0), "default", None, now(origin, t0))
            .is_none());
        let defs = Digest::of(b"defs");
        s.catalog
            .write()
            .unwrap()
            .publish("defs", Some("1"), defs, 4, false, origin)
            .unwrap();
        let slot = s
            .download_slot("c", Some(0), "default", None, now(origin, t0))
            .unwrap();
        assert_eq!(slot.catalog_revision, 1);
        assert_eq!(slot.window_s, 60);
        assert!(
            slot.not_before >= origin && slot.not_before < origin + chrono::Duration::seconds(60)
        );
        // Stable at the next heartbeat, and the delay shrinks as time passes.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        let again = s
            .download_slot("c", Some(0), "default", None, now(origin, t0))
            .unwrap();
        assert_eq!(again.not_before, slot.not_before);
        // A client already at the current revision has nothing to wait for.
        assert!(s
            .download_slot("c", Some(1), "default", None, now(origin, t0))
            .is_none());

        // At the door: before the slot, 429 with Retry-After and not_before; after, allowed.
        let many: Vec<String> = (0..50).map(|i| format!("w{i}")).collect();
        let waiting = many
            .iter()
            .find(|c| {
                let t = now(origin, t0);
                s.download_slot(c, Some(0), "default", None, t)
                    .unwrap()
                    .not_before
                    > t + chrono::Duration::seconds(2)
            })
            .unwrap();
        let e = s.check_slot(waiting, &defs, now(origin, t0)).unwrap_err();
        assert_eq!(e.status, StatusCode::TOO_MANY_REQUESTS);
        let retry: u64 = e
            .headers
            .iter()
            .find(|(k, _)| *k == "retry-after")
            .unwrap()
            .1
            .parse()
            .unwrap();
        assert!((1..=60).contains(&retry));
        assert!(e.extra.unwrap()["not_before"].is_string());
        assert_eq!(s.metrics.slot_deferrals.get(), 1);
        tokio::time::advance(std::time::Duration::from_secs(60)).await;
        assert!(s.check_slot(waiting, &defs, now(origin, t0)).is_ok());
        // After the window: no slot for a newcomer, downloads at once.
        assert!(s
            .download_slot("newcomer", Some(0), "default", None, now(origin, t0))
            .is_none());

        // An urgent release never waits.
        let fix = Digest::of(b"outbreak fix");
        let t = now(origin, t0);
        s.catalog
            .write()
            .unwrap()
            .publish("fix", Some("1"), fix, 4, true, t)
            .unwrap();
        assert!(s.check_slot("w-late", &fix, t).is_ok());
        // ...and a client that only lacks urgent items gets no slot.
        assert!(s
            .download_slot("w-late", Some(2), "default", None, t)
            .is_none());

        // Randomization off: no slot and no wait.
        let plain = Digest::of(b"plain");
        s.catalog
            .write()
            .unwrap()
            .publish("plain", Some("1"), plain, 4, false, t)
            .unwrap();
        assert!(s.download_slot("x", Some(2), "default", None, t).is_some());
        s.directory
            .write()
            .unwrap()
            .put_settings(
                "default",
                None,
                &serde_json::json!({"randomization": {"enabled": false}}),
            )
            .unwrap();
        assert!(s.download_slot("y", Some(2), "default", None, t).is_none());
        assert!(s.check_slot("y", &plain, t).is_ok());
    }
}
