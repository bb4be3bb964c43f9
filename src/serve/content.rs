//! Content: `GET|HEAD /v1/content/{sha256}`, from the store or from a blob still arriving.
//!
//! Owns the content endpoint (catalog membership, conditionals before any byte moves, the
//! slot gate for named clients, `serve.max_concurrent_downloads`), the bodies of stored blobs
//! (from memory, or mapped and sent with sendfile) and of blobs still being fetched (the last
//! byte withheld until the digest checks, cut if it fails), and the [`Fetcher`] interface a
//! node's upstream implements. It must never serve a digest outside the retained catalog,
//! nor a complete response of unverified bytes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use chrono::Utc;
use futures_util::future::BoxFuture;

use super::conditional::{decide_range, if_none_match, not_modified, RangeDecision, BLOB_CACHE};
use super::metrics::{ServedBytes, ServedFrom};
use super::{Api, ServeError, Served};
use crate::core::digest::Digest;
use crate::core::fault::{Fault, Internal, Kind};
use crate::core::proto::{check_client_id, Invalid, Placement};
use crate::http::error::ApiError;
use crate::http::extract::Path;

/// Frame size for sending a blob (stored or arriving): the unit of LAN pacing and of the
/// served-bytes count.
const FRAME: usize = 1 << 20;

/// Stored blobs up to this size are read into memory (their body then goes out in one write
/// with the head); larger ones are mapped, and a plain-HTTP connection sends them from the
/// page cache with sendfile (`sys::zerocopy`).
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

/// Why a missing blob could not be brought into the store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// Every upstream failed; the last one tried, and whether a later try may work.
    #[error("fetching {digest}: {message}")]
    Upstream {
        digest: Digest,
        server: Option<String>,
        retryable: bool,
        message: String,
    },
    /// This server failed to keep the bytes (a lock, a bug): no upstream's fault.
    #[error("fetching {digest}: {message}")]
    Local { digest: Digest, message: String },
    /// Every upstream asked this server to wait (`Retry-After`); it asks none before then.
    #[error("fetching {digest}: {message}")]
    Busy {
        digest: Digest,
        message: String,
        retry_after_s: u64,
    },
    /// This server cannot take the bytes now (its disk is full or failing, or the blob does
    /// not fit): no upstream's fault, and no fetch is started until the retry.
    #[error("fetching {digest}: {message}")]
    NoRoom {
        digest: Digest,
        message: String,
        retry_after_s: u64,
    },
}

impl Fault for FetchError {
    fn kind(&self) -> Kind {
        match self {
            FetchError::Upstream { retryable, .. } => Kind::Upstream {
                retryable: *retryable,
            },
            FetchError::Local { .. } => Kind::Local,
            FetchError::NoRoom { retry_after_s, .. } | FetchError::Busy { retry_after_s, .. } => {
                Kind::Unavailable {
                    retry_after_s: *retry_after_s,
                }
            }
        }
    }

    fn code(&self) -> &'static str {
        match self {
            FetchError::Upstream { .. } => "upstream_failed",
            FetchError::Local { .. } => "fetch_failed",
            FetchError::NoRoom { .. } => "storage_unavailable",
            FetchError::Busy { .. } => "upstream_busy",
        }
    }
}

/// Brings a blob that is in the catalog but not in the store into the store (a node's
/// upstream). Concurrent calls for one digest share one fetch, and each caller can read the
/// bytes as they arrive.
pub trait Fetcher: Send + Sync + 'static {
    fn attach(&self, digest: Digest, size: u64)
        -> BoxFuture<'static, Result<Attached, FetchError>>;
}

impl Served {
    /// The slot gate: a named client asking before its slot gets 429 (counted).
    pub(super) fn admit_download(
        &self,
        client: &str,
        placement: Option<Placement>,
        digest: &Digest,
    ) -> Result<(), ApiError> {
        let placement = placement.unwrap_or_else(Placement::unknown);
        let settings = self
            .directory()?
            .effective(&placement.group, placement.location.as_deref());
        let history = self.catalog()?;
        match self
            .slots
            .admit(client, digest, &settings, &history, Utc::now())
        {
            Ok(()) => Ok(()),
            Err(e) => {
                if matches!(e, crate::core::slots::SlotError::BeforeSlot { .. }) {
                    self.metrics.slot_deferrals.inc();
                }
                Err(e.into())
            }
        }
    }
}

impl Served {
    /// Counts a download start of `digest` now, when it is in the current revision.
    pub fn note_download_start(&self, digest: &Digest) {
        // The catalog lock is let go before the directory's is taken: never both at once.
        let current = match self.catalog() {
            Ok(history) => history
                .revisions()
                .last()
                .filter(|r| r.catalog.items.iter().any(|i| i.sha256 == *digest))
                .map(|r| (r.catalog.revision, r.available_at)),
            Err(_) => None,
        };
        let Some((revision, available_at)) = current else {
            return;
        };
        let window = || match self.directory() {
            Ok(dir) => {
                let r = dir.effective("default", None).randomization;
                if r.enabled && r.window_s > 0 {
                    r.window_s
                } else {
                    crate::core::starts::NO_WINDOW_S
                }
            }
            Err(_) => crate::core::starts::NO_WINDOW_S,
        };
        self.starts
            .record(revision, available_at, window, Utc::now());
    }
}

pub async fn content(
    State(api): State<Api>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(sha256): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let s = &api.served;
    let digest = parse_digest(&sha256)?;
    // An item's bytes or a delta an item lists: both are in the catalog.
    let Some(size) = s.catalog()?.size_of(&digest) else {
        return Err(ServeError::NotInCatalog(digest).into());
    };
    let etag = format!("\"{digest}\"");
    // Conditionals are decided before any byte is fetched: a client that has it needs nothing.
    if if_none_match(&headers, &etag) {
        return Ok(not_modified(&etag, BLOB_CACHE));
    }
    let permit = admit_download(&api, peer, &method, &headers, &digest)?;
    send_blob(s, digest, size, Fetch::Allowed, permit, &method, &headers).await
}

/// A digest from a path: 64 lower-case hex, else 400 naming what is wrong with it.
pub(super) fn parse_digest(given: &str) -> Result<Digest, ServeError> {
    given.parse().map_err(|reason| ServeError::BadDigest {
        given: given.to_string(),
        reason,
    })
}

/// The door of a download of `gate`'s bytes (or of a delta to them): a named client asking
/// before its slot gets 429, and beyond `serve.max_concurrent_downloads` a GET gets 503. The
/// permit it returns is the response's to hold.
pub(super) fn admit_download(
    api: &Api,
    peer: std::net::SocketAddr,
    method: &Method,
    headers: &HeaderMap,
    gate: &Digest,
) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ApiError> {
    let s = &api.served;
    if let Some(value) = headers.get("x-gup-client-id") {
        let client = value.to_str().map_err(|_| Invalid {
            field: "x-gup-client-id".into(),
            reason: "must be visible ASCII".into(),
        })?;
        if !client.is_empty() && method == Method::GET {
            check_client_id(client).map_err(|e| Invalid {
                field: "x-gup-client-id".into(),
                reason: e.reason,
            })?;
            // A client never seen gets a slot recorded now: that costs its address one of
            // its new client ids.
            let placement = api.admit(client, peer.ip())?;
            s.admit_download(client, placement, gate)?;
        }
    }
    match (&s.downloads, method == Method::GET) {
        (Some(sem), true) => match sem.clone().try_acquire_owned() {
            Ok(p) => Ok(Some(p)),
            Err(_) => Err(ServeError::AtCapacity {
                retry_after_s: rand::random_range(1..=5),
            }
            .into()),
        },
        _ => Ok(None),
    }
}

/// Whether a blob missing from the store may be fetched through the role's [`Fetcher`]:
/// only one the catalog lists (an edge delta is this server's own and never upstream's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fetch {
    Allowed,
    Never,
}

/// Answers with the blob `digest` of `size` bytes: from the hot cache, the store, or (with
/// [`Fetch::Allowed`]) a fetch still arriving.
pub(super) async fn send_blob(
    s: &Arc<Served>,
    digest: Digest,
    size: u64,
    fetch: Fetch,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    if let Some((body, stored_at)) = s.hot.get(&digest) {
        // The eviction order learns of the read, and the store says the copy is of the blob
        // it holds now: a copy of a blob the scrub found rotten (or that left the store, or
        // was stored again since) is never served.
        if s.store
            .mark_read(&digest)
            .is_some_and(|m| m.stored_at == stored_at)
        {
            s.metrics.cache_hits.inc();
            let source = Source::Stored(body, ServedFrom::Memory, permit);
            return blob_response(s, source, size, &digest, method, headers).await;
        }
        s.hot.remove(&digest);
    }
    // A blob the hot cache may keep is opened without holding it in use: the cache entry
    // must not pin it against eviction (the node drops evicted blobs from the cache).
    let keep = size <= s.hot.item_max();
    let open = match s.store.open_blob(&digest, READ_INTO_MEMORY, !keep).await? {
        Some(found) => {
            s.metrics.cache_hits.inc();
            found
        }
        None => {
            let (Some(fetcher), Fetch::Allowed) = (&s.fetcher, fetch) else {
                return Err(ServeError::NotStored(digest).into());
            };
            s.metrics.cache_misses.inc();
            match fetcher.attach(digest, size).await? {
                Attached::Stored => s
                    .store
                    .open_blob(&digest, READ_INTO_MEMORY, !keep)
                    .await?
                    .ok_or(ServeError::NotStored(digest))?,
                Attached::Growing { file, progress } => {
                    let source = Source::Growing {
                        file,
                        progress,
                        permit,
                    };
                    return blob_response(s, source, size, &digest, method, headers).await;
                }
            }
        }
    };
    if keep {
        s.hot.offer(digest, &open.bytes, open.meta.stored_at);
    }
    let size = open.meta.size;
    let source = Source::Stored(open.bytes, ServedFrom::Disk, permit);
    blob_response(s, source, size, &digest, method, headers).await
}

/// The bytes behind a content response.
pub enum Source {
    /// The bytes of a verified blob (in memory or mapped; a mapping keeps the blob from
    /// eviction while any slice of it lives), where they were found, and the download permit
    /// the response holds.
    Stored(
        bytes::Bytes,
        ServedFrom,
        Option<tokio::sync::OwnedSemaphorePermit>,
    ),
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
    served: ServedBytes,
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
                let zero_copy = crate::sys::zerocopy::sendfile_pays(g.len);
                let frame =
                    match crate::sys::zerocopy::map(g.file.clone(), g.pos, want, None, zero_copy) {
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

/// Streams `len` bytes of an open blob with the headers of the content API.
pub async fn blob_response(
    served_by: &Arc<Served>,
    source: Source,
    len: u64,
    digest: &Digest,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let etag = &format!("\"{digest}\"");
    let decision = decide_range(headers, etag, len);
    // Static values are not parsed again on every response.
    let mut builder = Response::builder()
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )
        .header(header::ETAG, etag)
        .header(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"))
        .header(header::CACHE_CONTROL, HeaderValue::from_static(BLOB_CACHE));
    let (status, start, count) = match decision {
        RangeDecision::Full => (StatusCode::OK, 0, len),
        RangeDecision::Partial { start, end } => {
            builder = builder.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeDecision::Unsatisfiable => return Err(ServeError::RangeNotSatisfiable(len).into()),
    };
    builder = builder.status(status).header(header::CONTENT_LENGTH, count);
    // A download starts once: a resumed range (not from byte 0) is the same download.
    if start == 0 && method == Method::GET {
        served_by.note_download_start(digest);
    }
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        match source {
            Source::Stored(bytes, from, permit) => {
                let served = served_by.metrics.served(from);
                let range = bytes.slice(start as usize..(start + count) as usize);
                stored_body(range, permit, served, served_by)
            }
            Source::Growing {
                file,
                progress,
                permit,
            } => {
                let file = Arc::new(file.into_std().await);
                let served = served_by.metrics.served(ServedFrom::Arriving);
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
        .map_err(|e| Internal(format!("building response: {e}")).into())
}

/// The body of a stored blob's selected bytes. Without a LAN budget or a download permit to
/// hold, a body up to [`FRAME`] is one frame that hyper writes with the head in one call;
/// otherwise it goes out in frames of [`FRAME`] bytes, each paced by the LAN budget. Either
/// way the bytes are slices of one buffer (or mapping): nothing is copied in user space.
fn stored_body(
    bytes: bytes::Bytes,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    served: ServedBytes,
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
