//! Single-flight blob fetches: one upstream fetch per blob however many clients ask.
//!
//! Owns the in-flight fetches (one shared future per digest, driven to the end even when
//! every asker goes away), the attempt now running for each (its temp file and progress, for
//! readers that stream a blob while it arrives, woken by a watch when an attempt starts or
//! bytes land), receiving a body into `store` under the WAN budget, and the `serve` view of
//! all this ([`NodeFetcher`]). A body whose digest or size does not match (or that runs past
//! its declared size: cut there) is the server's fault and the next server is tried; a store
//! failure is this node's and ends the fetch without blaming anyone. A blob that does not fit
//! on the disk, or whose fetch failed for want of disk, is not fetched again for a while: the
//! requests meanwhile get 503 with a Retry-After instead of a new WAN transfer each. A fetch
//! that panics ends as a failure, so a later request starts afresh. It must never make a blob
//! visible before its digest checked.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use tokio::sync::watch;

use super::upstream::{Upstream, UpstreamError};
use crate::core::digest::Digest;
use crate::serve::content::{Attached, FetchError, Fetcher, Progress};
use crate::serve::limit::ByteLimiter;
use crate::serve::metrics::Metrics;
use crate::store::{BlobWriter, Store, StoreError};

type SharedFetch = Shared<BoxFuture<'static, Result<(), Arc<UpstreamError>>>>;

/// How long a blob whose fetch failed for want of disk is not fetched again.
const NO_ROOM_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

/// Room a fetch leaves free on the disk beyond the blob itself, for the database and temp
/// files of the fetches beside it.
const FREE_MARGIN: u64 = 16 << 20;

/// The attempt a fetch is on, as readers attaching to it see it.
#[derive(Clone)]
enum Attempt {
    /// No body is arriving now (before the first answer, or between servers).
    Waiting,
    /// A body is arriving into this temp file.
    Growing {
        path: PathBuf,
        progress: watch::Receiver<Progress>,
    },
}

/// One blob being fetched.
struct Inflight {
    done: SharedFetch,
    attempt: watch::Receiver<Attempt>,
}

/// The node's blob fetches.
pub struct Fetches {
    upstream: Arc<Upstream>,
    store: Store,
    metrics: Arc<Metrics>,
    /// The WAN budget all blob fetches share (`upstream.max_bytes_per_sec`).
    wan: ByteLimiter,
    /// Notified after each blob is stored (the node then checks its disk budget).
    pub stored: tokio::sync::Notify,
    inflight: Mutex<HashMap<Digest, Inflight>>,
    /// Blobs that did not fit, or whose fetch failed for want of disk, and until when they
    /// are not fetched again. At most one entry per blob of the catalog.
    no_room: Mutex<HashMap<Digest, std::time::Instant>>,
    /// `cache.min_free_bytes`: a fetch must leave this much of the filesystem free.
    min_free_bytes: std::sync::atomic::AtomicU64,
    /// Makes room for a blob of this many bytes before a client's miss fetches it (the
    /// node's eviction, set once the node exists).
    room: std::sync::OnceLock<RoomMaker>,
}

/// Evicts so that a blob of the given size fits (see `evict`).
pub type RoomMaker = Arc<dyn Fn(u64) -> BoxFuture<'static, ()> + Send + Sync>;

impl Fetches {
    pub fn new(
        upstream: Arc<Upstream>,
        store: Store,
        metrics: Arc<Metrics>,
        max_bytes_per_sec: u64,
        min_free_bytes: u64,
    ) -> Fetches {
        Fetches {
            upstream,
            store,
            metrics,
            wan: ByteLimiter::new(max_bytes_per_sec),
            stored: tokio::sync::Notify::new(),
            inflight: Mutex::new(HashMap::new()),
            no_room: Mutex::new(HashMap::new()),
            min_free_bytes: std::sync::atomic::AtomicU64::new(min_free_bytes),
            room: std::sync::OnceLock::new(),
        }
    }

    /// New `upstream.max_bytes_per_sec` and `cache.min_free_bytes` (a config reload).
    pub fn set_limits(&self, wan_bytes_per_sec: u64, min_free_bytes: u64) {
        self.wan.set_rate(wan_bytes_per_sec);
        self.min_free_bytes
            .store(min_free_bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets what makes room before a client's miss is fetched (once; later calls are
    /// ignored).
    pub fn set_room_maker(&self, room: RoomMaker) {
        let _ = self.room.set(room);
    }

    /// Whether a fetch of `digest` may start for a client now: one already running is
    /// joined; a new one first makes room (eviction), then must fit on the disk.
    async fn admit(&self, digest: &Digest, size: u64) -> Option<FetchError> {
        if self.store.contains(digest) {
            return None;
        }
        if self.inflight.lock().is_ok_and(|f| f.contains_key(digest)) {
            return None;
        }
        if let Some(room) = self.room.get() {
            room(size).await;
        }
        self.no_room(digest, size)
    }

    /// Why `digest` (of `size` bytes) is not fetched now, if it is not: it failed for want
    /// of disk a moment ago, or the disk has no room for it.
    fn no_room(&self, digest: &Digest, size: u64) -> Option<FetchError> {
        let now = std::time::Instant::now();
        if let Ok(mut held) = self.no_room.lock() {
            held.retain(|_, until| *until > now);
            if let Some(until) = held.get(digest) {
                return Some(FetchError::NoRoom {
                    digest: *digest,
                    message: "the last fetch failed for want of disk; not fetched again yet".into(),
                    retry_after_s: until.saturating_duration_since(now).as_secs().max(1),
                });
            }
        }
        let free = self.store.free_bytes()?;
        let keep = FREE_MARGIN.max(
            self.min_free_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        let needs = size.saturating_add(keep);
        (free < needs).then(|| FetchError::NoRoom {
            digest: *digest,
            message: format!(
                "{size} bytes do not fit: the disk has {free} bytes free and keeps {keep} (cache.min_free_bytes)"
            ),
            retry_after_s: NO_ROOM_BACKOFF.as_secs(),
        })
    }

    /// Why a prefetch of `size` bytes must wait: the filesystem would keep less than
    /// `cache.min_free_bytes` free after it (0 keeps nothing back: a prefetch then fails only
    /// when the disk itself is full, as it always did).
    pub(super) fn below_min_free(&self, digest: &Digest, size: u64) -> Option<FetchError> {
        let keep = self
            .min_free_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        if keep == 0 {
            return None;
        }
        let free = self.store.free_bytes()?;
        (free < size.saturating_add(keep)).then(|| FetchError::NoRoom {
            digest: *digest,
            message: format!(
                "{size} bytes would leave less than cache.min_free_bytes ({keep}) of the disk's {free} free bytes"
            ),
            retry_after_s: NO_ROOM_BACKOFF.as_secs(),
        })
    }

    /// Remembers that `digest` failed for want of disk.
    fn held_back(&self, digest: Digest) {
        if let Ok(mut held) = self.no_room.lock() {
            held.insert(digest, std::time::Instant::now() + NO_ROOM_BACKOFF);
        }
    }

    /// Brings `digest` into the store, sharing the fetch with everyone asking at once.
    /// Returns its end and a view of its attempts.
    fn start(
        self: &Arc<Self>,
        digest: Digest,
        size: u64,
    ) -> (SharedFetch, watch::Receiver<Attempt>) {
        let Ok(mut inflight) = self.inflight.lock() else {
            let err = Arc::new(UpstreamError::Local(StoreError::Join(
                "fetch table lock poisoned".into(),
            )));
            let (_, rx) = watch::channel(Attempt::Waiting);
            return (futures_util::future::ready(Err(err)).boxed().shared(), rx);
        };
        if let Some(f) = inflight.get(&digest) {
            return (f.done.clone(), f.attempt.clone());
        }
        let (tx, rx) = watch::channel(Attempt::Waiting);
        let me = self.clone();
        let done = async move {
            // A panic ends this fetch as a failure; without the catch it would poison the
            // shared future, and every later request for the blob would panic with it.
            let run = std::panic::AssertUnwindSafe(me.fetch_any(digest, size, &tx));
            let result = match run.catch_unwind().await {
                Ok(r) => r,
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "a panic".into());
                    tracing::error!(%digest, %why, "a blob fetch panicked");
                    Err(UpstreamError::Local(StoreError::Join(format!(
                        "the fetch panicked: {why}"
                    ))))
                }
            };
            if let Err(e) = &result {
                if e.is_no_room() {
                    me.held_back(digest);
                }
            }
            if let Ok(mut inflight) = me.inflight.lock() {
                inflight.remove(&digest);
            }
            result.map_err(Arc::new)
        }
        .boxed()
        .shared();
        inflight.insert(
            digest,
            Inflight {
                done: done.clone(),
                attempt: rx.clone(),
            },
        );
        // Driven even if every asker goes away: the bytes are wanted anyway.
        tokio::spawn(done.clone());
        (done, rx)
    }

    /// Brings `digest` into the store (prefetch); resolves when it is stored or failed.
    pub async fn fetch(
        self: &Arc<Self>,
        digest: Digest,
        size: u64,
    ) -> Result<(), Arc<UpstreamError>> {
        self.start(digest, size).0.await
    }

    async fn fetch_any(
        &self,
        digest: Digest,
        size: u64,
        attempt: &watch::Sender<Attempt>,
    ) -> Result<(), UpstreamError> {
        if self.store.contains(&digest) {
            return Ok(());
        }
        self.upstream
            .first_that_answers(|at| {
                self.metrics.upstream_fetches.inc();
                async move {
                    let r = self.fetch_from(&at, digest, size, attempt).await;
                    attempt.send_replace(Attempt::Waiting);
                    if let Err(e) = &r {
                        tracing::warn!(%digest, error = %e, "blob fetch failed");
                    }
                    r
                }
            })
            .await
            .map(|_| ())
    }

    async fn fetch_from(
        &self,
        at: &super::upstream::Picked,
        digest: Digest,
        size: u64,
        attempt: &watch::Sender<Attempt>,
    ) -> Result<(), UpstreamError> {
        let resp = self.upstream.blob(at, &digest).await?;
        let name = at.name();
        let mut writer = self.store.writer().await.map_err(UpstreamError::Local)?;
        let (tx, rx) = watch::channel(Progress::Running(0));
        attempt.send_replace(Attempt::Growing {
            path: writer.tmp_path().to_path_buf(),
            progress: rx,
        });
        let result = match self.receive(&name, size, &mut writer, resp, &tx).await {
            Ok(()) => writer
                .finish(Some((&digest, Some(size))))
                .await
                .map(|_| ())
                .map_err(|e| {
                    if e.is_mismatch() {
                        UpstreamError::Mismatch {
                            server: name.clone(),
                            source: e,
                        }
                    } else {
                        UpstreamError::Local(e)
                    }
                }),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                tx.send_replace(Progress::Verified);
                self.stored.notify_one();
                tracing::info!(%digest, size, server = %name, "blob fetched and verified");
                Ok(())
            }
            Err(e) => {
                tx.send_replace(Progress::Failed);
                Err(e)
            }
        }
    }

    /// Receives a blob body into `writer`, telling readers how far it got.
    async fn receive(
        &self,
        name: &str,
        size: u64,
        writer: &mut BlobWriter,
        resp: reqwest::Response,
        tx: &watch::Sender<Progress>,
    ) -> Result<(), UpstreamError> {
        let idle = self.upstream.idle_timeout();
        let mut body = resp.bytes_stream();
        let mut told = 0u64;
        loop {
            let next =
                tokio::time::timeout(idle, body.next())
                    .await
                    .map_err(|_| UpstreamError::Idle {
                        server: name.to_string(),
                        secs: idle.as_secs(),
                    })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|source| UpstreamError::Http {
                server: name.to_string(),
                source,
            })?;
            // A body running past its declared size is cut there: it is not the blob.
            let total = writer.len() + chunk.len() as u64;
            if total > size {
                return Err(UpstreamError::Mismatch {
                    server: name.to_string(),
                    source: StoreError::SizeMismatch {
                        expected: size,
                        actual: total,
                    },
                });
            }
            self.wan.take(chunk.len()).await;
            self.metrics.upstream_bytes.inc_by(chunk.len() as u64);
            writer.write(&chunk).await.map_err(UpstreamError::Local)?;
            // The writing stage moves on by itself; tell readers whenever it got further.
            let on_disk = writer.on_disk();
            if on_disk != told {
                told = on_disk;
                tx.send_replace(Progress::Running(on_disk));
            }
        }
        Ok(())
    }
}

/// The node's fetches as `serve` sees them.
pub struct NodeFetcher(pub Arc<Fetches>);

impl Fetcher for NodeFetcher {
    fn attach(
        &self,
        digest: Digest,
        size: u64,
    ) -> BoxFuture<'static, Result<Attached, FetchError>> {
        let fetches = self.0.clone();
        async move {
            if let Some(e) = fetches.admit(&digest, size).await {
                return Err(e);
            }
            let (mut done, mut attempt) = fetches.start(digest, size);
            loop {
                if fetches.store.contains(&digest) {
                    return Ok(Attached::Stored);
                }
                let growing = match &*attempt.borrow_and_update() {
                    Attempt::Growing { path, progress } => Some((path.clone(), progress.clone())),
                    Attempt::Waiting => None,
                };
                if let Some((path, progress)) = growing {
                    // Renamed into the store (or removed) since, when this fails: then the
                    // next change or the end of the fetch says what happened.
                    if let Ok(file) = tokio::fs::File::open(&path).await {
                        return Ok(Attached::Growing { file, progress });
                    }
                }
                tokio::select! {
                    biased;
                    r = &mut done => {
                        return r.map(|()| Attached::Stored).map_err(|e| fetch_error(digest, &e));
                    }
                    // An attempt started or ended (or the fetch ended: then `done` is ready).
                    _ = attempt.changed() => {}
                }
            }
        }
        .boxed()
    }
}

fn fetch_error(digest: Digest, e: &UpstreamError) -> FetchError {
    if let UpstreamError::Held { retry_after_s } = e {
        FetchError::Busy {
            digest,
            message: e.to_string(),
            retry_after_s: *retry_after_s,
        }
    } else if e.is_no_room() {
        FetchError::NoRoom {
            digest,
            message: e.to_string(),
            retry_after_s: NO_ROOM_BACKOFF.as_secs(),
        }
    } else if e.is_local() {
        FetchError::Local {
            digest,
            message: e.to_string(),
        }
    } else {
        FetchError::Upstream {
            digest,
            server: e.server().map(str::to_string),
            retryable: e.retryable(),
            message: e.to_string(),
        }
    }
}
