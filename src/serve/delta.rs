//! Deltas at this server: computing each pair once, keeping it, and `GET /v1/delta/{from}/{to}`.
//!
//! Owns [`Deltas`], the one delta engine of a server (manager or node): at most
//! `deltas.max_concurrent` computations at once (one per core by default) on blocking
//! threads, over both versions mapped from the store, a computation per pair however many ask
//! (single-flight, driven to its end even when every asker goes away), at most
//! `deltas.max_waiting` edge computations waiting for a turn (beyond, 503 with a Retry-After),
//! and the record of what each pair gave (`deltas` tree: the delta blob, or that none was
//! worth having), so a pair is computed again only when its blob went. A delta is stored
//! through the store's writer like any blob, reserved against collection and eviction from
//! before it is visible until its record is written. Also the endpoint: a delta the catalog
//! lists is served like `/v1/content` (fetched upstream by a node that lacks it); otherwise
//! one is computed here when this server holds both versions and `to` is an item of its
//! catalog. It must never compute for a `to` outside the retained catalog (an untrusted client
//! must not make it work on arbitrary pairs), never fetch `from` (or an edge delta) upstream,
//! never trust a delta (clients check the rebuilt bytes), and never list one in the catalog:
//! that is the manager's (`manager::deltas`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use serde::{Deserialize, Serialize};

use super::conditional::{if_none_match, not_modified, BLOB_CACHE};
use super::content::{admit_download, parse_digest, send_blob, Fetch};
use super::metrics::{DeltaAnswer, Metrics};
use super::Api;
use crate::core::config::DeltaLimits;
use crate::core::delta::{self, DeltaError};
use crate::core::digest::Digest;
use crate::core::fault::{Fault, Kind};
use crate::http::error::ApiError;
use crate::http::extract::Path;
use crate::store::{Batch, Kv, Store, StoreError};

/// The key-value tree of the delta records (left out of backups: they are cache).
pub const TREE: &str = "deltas";

/// Bytes handed to the blob writer at a time when a delta is stored: the writer copies what
/// it is given, so this bounds the copy beside the delta itself.
const WRITE_CHUNK: usize = 1 << 20;

/// The Retry-After of a 503 when `deltas.max_waiting` computations wait.
const BUSY_RETRY_S: u64 = 5;

/// A delta blob this server holds: its digest and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaBlob {
    pub sha256: Digest,
    pub size: u64,
}

/// What a pair gave, as recorded at `p/<from>/<to>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct PairRecord {
    /// None: the delta would have been larger than half of `to`.
    delta: Option<DeltaBlob>,
}

/// The pair a delta blob was computed for, as recorded at `b/<delta>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct BlobRecord {
    from: Digest,
    to: Digest,
}

/// What asking for a pair gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The delta, stored.
    Delta(DeltaBlob),
    /// No delta smaller than half of `to` exists.
    NotWorth,
    /// A version is larger than `deltas.max_item_bytes` (or deltas are off): not tried.
    TooLarge,
    /// This server does not hold one of the versions.
    NotHeld(Digest),
}

/// Who is asking: a client at the edge waits in the bounded queue; the manager's own listing
/// (one pair at a time) always waits for its turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    Edge,
    Listing,
}

/// Why a delta could not be had or answered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaFailure {
    /// 404 `no_delta`: the client takes the full blob.
    #[error("{0}")]
    NoDelta(String),
    #[error("{waiting} delta computations are waiting (deltas.max_waiting); retry shortly")]
    Busy { waiting: usize },
    #[error("computing the delta: {0}")]
    Compute(String),
    /// Storing or reading the versions failed on this server; `retry_after_s` when the disk
    /// refuses writes for now.
    #[error("delta store: {message}")]
    Store {
        message: String,
        retry_after_s: Option<u64>,
    },
}

impl Fault for DeltaFailure {
    fn kind(&self) -> Kind {
        match self {
            DeltaFailure::NoDelta(_) => Kind::NotFound,
            DeltaFailure::Busy { .. } => Kind::Unavailable {
                retry_after_s: BUSY_RETRY_S,
            },
            DeltaFailure::Compute(_) => Kind::Local,
            DeltaFailure::Store { retry_after_s, .. } => match retry_after_s {
                Some(s) => Kind::Unavailable { retry_after_s: *s },
                None => Kind::Local,
            },
        }
    }

    fn code(&self) -> &'static str {
        match self {
            DeltaFailure::NoDelta(_) => "no_delta",
            DeltaFailure::Busy { .. } => "delta_busy",
            DeltaFailure::Compute(_) => "delta_failed",
            DeltaFailure::Store {
                retry_after_s: Some(_),
                ..
            } => "storage_unavailable",
            DeltaFailure::Store { .. } => "storage",
        }
    }
}

impl From<StoreError> for DeltaFailure {
    fn from(e: StoreError) -> DeltaFailure {
        let retry_after_s = match e.kind() {
            Kind::Unavailable { retry_after_s } => Some(retry_after_s),
            _ => None,
        };
        DeltaFailure::Store {
            message: e.to_string(),
            retry_after_s,
        }
    }
}

type Flight = Shared<BoxFuture<'static, Result<Outcome, DeltaFailure>>>;

/// The delta engine of one server (see the module doc).
pub struct Deltas {
    store: Store,
    /// `p/<from>/<to>` -> [`PairRecord`]; `b/<delta>` -> [`BlobRecord`]. Bounded by the
    /// pairs of a blob this server holds and an item of its retained catalog; a record goes
    /// when its `to` leaves the catalog ([`Deltas::prune`]) or its blob leaves the store.
    kv: Kv,
    limits: DeltaLimits,
    /// One permit per computation that may run at once.
    turns: Arc<tokio::sync::Semaphore>,
    /// Computations started and still waiting for a turn.
    waiting: Arc<AtomicUsize>,
    /// The computation of each pair now running or waiting; at most `max_concurrent` plus
    /// `max_waiting` edge ones, and the one pair a manager's listing waits on.
    inflight: Mutex<HashMap<(Digest, Digest), Flight>>,
    metrics: Arc<Metrics>,
}

fn pair_key(from: &Digest, to: &Digest) -> String {
    format!("p/{from}/{to}")
}

fn blob_key(delta: &Digest) -> String {
    format!("b/{delta}")
}

impl Deltas {
    /// The engine over `store` with its records in the store's [`TREE`].
    pub fn new(
        store: Store,
        limits: DeltaLimits,
        metrics: Arc<Metrics>,
    ) -> Result<Deltas, StoreError> {
        let kv = store.kv(TREE)?;
        let turns = match limits.max_concurrent {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Ok(Deltas {
            store,
            kv,
            limits,
            turns: Arc::new(tokio::sync::Semaphore::new(turns)),
            waiting: Arc::new(AtomicUsize::new(0)),
            inflight: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// What the records say of a pair whose delta (if any) is still stored.
    fn recorded(&self, from: &Digest, to: &Digest) -> Result<Option<Outcome>, StoreError> {
        let Some(record) = self.kv.get::<PairRecord>(&pair_key(from, to))? else {
            return Ok(None);
        };
        Ok(match record.delta {
            None => Some(Outcome::NotWorth),
            Some(blob) if self.store.contains(&blob.sha256) => Some(Outcome::Delta(blob)),
            // Its blob went (evicted, collected, quarantined): computed again when asked.
            Some(_) => None,
        })
    }

    /// The delta from `from` to `to`, computed now unless the records have it: a delta of
    /// at most half of `to`, stored as a blob. The caller decides whether `to` may be asked
    /// for (it must be an item of the retained catalog).
    pub async fn get_or_compute(
        self: &Arc<Self>,
        from: Digest,
        to: Digest,
        asker: Asker,
    ) -> Result<Outcome, DeltaFailure> {
        if let Some(known) = self.recorded(&from, &to)? {
            return Ok(known);
        }
        let sizes = (self.store.get(&from), self.store.get(&to));
        let (from_size, to_size) = match sizes {
            (Some(f), Some(t)) => (f.size, t.size),
            (None, _) => return Ok(Outcome::NotHeld(from)),
            (_, None) => return Ok(Outcome::NotHeld(to)),
        };
        let max = self.limits.max_item_bytes;
        if max == 0 || from_size > max || to_size > max || to_size < 2 {
            return Ok(Outcome::TooLarge);
        }
        let flight = {
            let Ok(mut inflight) = self.inflight.lock() else {
                return Err(DeltaFailure::Compute("delta table lock poisoned".into()));
            };
            match inflight.get(&(from, to)) {
                Some(f) => f.clone(),
                None => {
                    let waiting = self.waiting.load(Ordering::SeqCst);
                    let no_turn = self.turns.available_permits() == 0;
                    if asker == Asker::Edge && no_turn && waiting >= self.limits.max_waiting {
                        self.metrics.deltas_busy.inc();
                        return Err(DeltaFailure::Busy { waiting });
                    }
                    // Counted as waiting from now (not from when the task first runs), so the
                    // next asker sees it.
                    self.waiting.fetch_add(1, Ordering::SeqCst);
                    self.metrics.deltas_waiting.inc();
                    let f = self.clone().flight(from, to).boxed().shared();
                    inflight.insert((from, to), f.clone());
                    // Driven even if every asker goes away: the work is wanted anyway.
                    tokio::spawn(f.clone());
                    f
                }
            }
        };
        flight.await
    }

    /// One pair's computation: a turn, the delta, the blob, the record.
    async fn flight(self: Arc<Self>, from: Digest, to: Digest) -> Result<Outcome, DeltaFailure> {
        let turn = self.turns.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        self.metrics.deltas_waiting.dec();
        let result = match turn {
            Ok(_turn) => self.compute_and_store(from, to).await,
            Err(_) => Err(DeltaFailure::Compute("the delta engine closed".into())),
        };
        if let Err(e) = &result {
            tracing::warn!(%from, %to, error = %e, "delta computation failed");
        }
        if let Ok(mut inflight) = self.inflight.lock() {
            inflight.remove(&(from, to));
        }
        result
    }

    async fn compute_and_store(&self, from: Digest, to: Digest) -> Result<Outcome, DeltaFailure> {
        let started = Instant::now();
        let store = self.store.clone();
        let computed = tokio::task::spawn_blocking(move || compute_blobs(&store, &from, &to))
            .await
            .map_err(|e| DeltaFailure::Compute(format!("the computation panicked: {e}")))??;
        let seconds = started.elapsed().as_secs_f64();
        self.metrics.delta_seconds.observe(seconds);
        let (digest, bytes) = match computed {
            Computed::Delta(digest, bytes) => (digest, bytes),
            Computed::NotWorth => {
                self.metrics.deltas_unworthy.inc();
                self.kv
                    .put(&pair_key(&from, &to), &PairRecord { delta: None })?;
                tracing::info!(%from, %to, seconds, "no delta worth having: over half the new version");
                return Ok(Outcome::NotWorth);
            }
            Computed::Gone(d) => return Ok(Outcome::NotHeld(d)),
        };
        // Reserved before it is visible, until its record says what it is: neither the
        // manager's collection nor a node's eviction may take it in between.
        let _reserved = self.store.reserve(&digest);
        let mut writer = self.store.writer().await?;
        for chunk in bytes.chunks(WRITE_CHUNK) {
            writer.write(chunk).await?;
        }
        let size = bytes.len() as u64;
        drop(bytes);
        writer.finish(Some((&digest, Some(size)))).await?;
        let blob = DeltaBlob {
            sha256: digest,
            size,
        };
        let mut batch = Batch::default();
        batch
            .put(&pair_key(&from, &to), &PairRecord { delta: Some(blob) })
            .map_err(DeltaFailure::from)?;
        batch
            .put(&blob_key(&digest), &BlobRecord { from, to })
            .map_err(DeltaFailure::from)?;
        self.kv.apply(batch)?;
        self.metrics.deltas_computed.inc();
        tracing::info!(%from, %to, delta = %digest, size, seconds, "delta computed and stored");
        Ok(Outcome::Delta(blob))
    }

    /// Whether `digest` is a delta blob this engine computed.
    pub fn is_delta(&self, digest: &Digest) -> bool {
        self.kv.contains(&blob_key(digest)).unwrap_or(false)
    }

    /// Every delta blob with a record, with the `to` it rebuilds.
    pub fn recorded_blobs(&self) -> Result<Vec<(Digest, Digest)>, StoreError> {
        let mut out = Vec::new();
        self.kv.visit("b/", "b/", false, |key, r: BlobRecord| {
            if let Some(d) = key.strip_prefix("b/").and_then(|h| h.parse().ok()) {
                out.push((d, r.to));
            }
            true
        })?;
        Ok(out)
    }

    /// Drops the records of every pair whose `to` is no longer wanted (`keep` says no: it left
    /// the retained catalog); returns their delta blobs, for the caller to remove.
    pub fn prune(&self, keep: impl Fn(&Digest) -> bool) -> Result<Vec<Digest>, StoreError> {
        let mut gone: Vec<(String, Option<Digest>)> = Vec::new();
        self.kv.visit("p/", "p/", false, |key, r: PairRecord| {
            let to = key
                .rsplit('/')
                .next()
                .and_then(|h| h.parse::<Digest>().ok());
            if to.is_none_or(|to| !keep(&to)) {
                gone.push((key, r.delta.map(|b| b.sha256)));
            }
            true
        })?;
        if gone.is_empty() {
            return Ok(Vec::new());
        }
        let mut batch = Batch::default();
        let mut blobs = Vec::new();
        for (key, delta) in gone {
            batch.remove(&key);
            if let Some(d) = delta {
                batch.remove(&blob_key(&d));
                blobs.push(d);
            }
        }
        self.kv.apply(batch)?;
        Ok(blobs)
    }

    /// Forgets the record of a delta blob that left the store (evicted); a blob that is no
    /// delta is not recorded, and nothing happens.
    pub fn forget_blob(&self, digest: &Digest) -> Result<(), StoreError> {
        let Some(r) = self.kv.get::<BlobRecord>(&blob_key(digest))? else {
            return Ok(());
        };
        let mut batch = Batch::default();
        batch.remove(&blob_key(digest));
        batch.remove(&pair_key(&r.from, &r.to));
        self.kv.apply(batch)
    }
}

/// What a computation on a blocking thread gave.
enum Computed {
    Delta(Digest, Vec<u8>),
    NotWorth,
    /// A version left the store before it could be mapped.
    Gone(Digest),
}

/// Maps both versions and computes the delta, at most half of `to` (blocking).
fn compute_blobs(store: &Store, from: &Digest, to: &Digest) -> Result<Computed, DeltaFailure> {
    let Some(old) = store.map_blob(from)? else {
        return Ok(Computed::Gone(*from));
    };
    let Some(new) = store.map_blob(to)? else {
        return Ok(Computed::Gone(*to));
    };
    match delta::compute(&old, &new, new.len() / 2) {
        Ok(Some(bytes)) => Ok(Computed::Delta(Digest::of(&bytes), bytes)),
        Ok(None) | Err(DeltaError::TooLarge(_)) => Ok(Computed::NotWorth),
        Err(e) => Err(DeltaFailure::Compute(e.to_string())),
    }
}

/// `GET|HEAD /v1/delta/{from}/{to}`: a delta the catalog lists, else one computed here (see
/// the module doc); 404 `no_delta` when there is none to have.
pub async fn delta(
    State(api): State<Api>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path((from, to)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let answer = answer(&api, peer, &from, &to, &method, &headers).await;
    let metrics = &api.served.metrics;
    match &answer {
        Ok((kind, _)) => metrics.delta_answered(*kind),
        Err(e) if e.code == "no_delta" => metrics.delta_answered(DeltaAnswer::None),
        Err(_) => {}
    }
    answer.map(|(_, response)| response)
}

async fn answer(
    api: &Api,
    peer: std::net::SocketAddr,
    from: &str,
    to: &str,
    method: &Method,
    headers: &HeaderMap,
) -> Result<(DeltaAnswer, Response), ApiError> {
    let s = &api.served;
    let (from, to) = (parse_digest(from)?, parse_digest(to)?);
    let (to_size, listed, from_is_delta) = {
        let history = s.catalog()?;
        (
            history.find(&to).map(|(_, item)| item.size),
            history.delta_between(&from, &to).cloned(),
            history.find_delta(&from).is_some(),
        )
    };
    let no = |why: String| -> ApiError { DeltaFailure::NoDelta(why).into() };
    if to_size.is_none() {
        return Err(no(format!(
            "{to} is not an item of this server's catalog: no delta to it"
        )));
    }
    if from == to {
        return Err(no("from and to are the same version".into()));
    }
    if let Some(d) = listed {
        let response = serve(
            api,
            peer,
            d.sha256,
            d.size,
            Fetch::Allowed,
            &to,
            method,
            headers,
        );
        return Ok((DeltaAnswer::Listed, response.await?));
    }
    let engine = &s.deltas;
    if from_is_delta || engine.is_delta(&from) {
        return Err(no(format!("{from} is a delta, not a version")));
    }
    // Known already: answered without a turn (and conditionals decided before any byte).
    if let Some(Outcome::Delta(blob)) = engine.recorded(&from, &to)? {
        let response = serve(
            api,
            peer,
            blob.sha256,
            blob.size,
            Fetch::Never,
            &to,
            method,
            headers,
        );
        return Ok((DeltaAnswer::Edge, response.await?));
    }
    for (digest, what) in [(&from, "from"), (&to, "to")] {
        if !s.store.contains(digest) {
            return Err(no(format!(
                "this server does not hold {digest} (`{what}`), so it cannot compute a delta (it never fetches a version for this)"
            )));
        }
    }
    // The client's slot (and the download bound) before any work: a client that may not
    // download `to` yet makes this server compute nothing.
    let permit = admit_download(api, peer, method, headers, &to)?;
    let blob = match engine.get_or_compute(from, to, Asker::Edge).await? {
        Outcome::Delta(blob) => blob,
        Outcome::NotWorth => {
            return Err(no(format!(
                "a delta from {from} to {to} would be larger than half of it"
            )))
        }
        Outcome::TooLarge => {
            return Err(no(format!(
                "no deltas are computed for versions larger than deltas.max_item_bytes ({})",
                engine.limits.max_item_bytes
            )))
        }
        Outcome::NotHeld(d) => {
            return Err(no(format!(
                "this server does not hold {d}, so it cannot compute a delta"
            )))
        }
    };
    if if_none_match(headers, &format!("\"{}\"", blob.sha256)) {
        return Ok((
            DeltaAnswer::Edge,
            not_modified(&format!("\"{}\"", blob.sha256), BLOB_CACHE),
        ));
    }
    let response = send_blob(
        s,
        blob.sha256,
        blob.size,
        Fetch::Never,
        permit,
        method,
        headers,
    );
    Ok((DeltaAnswer::Edge, response.await?))
}

/// Serves the delta blob `digest`: conditionals first, then the client's door for `to`'s
/// download, then the bytes like `/v1/content`.
#[allow(clippy::too_many_arguments)]
async fn serve(
    api: &Api,
    peer: std::net::SocketAddr,
    digest: Digest,
    size: u64,
    fetch: Fetch,
    to: &Digest,
    method: &Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let etag = format!("\"{digest}\"");
    if if_none_match(headers, &etag) {
        return Ok(not_modified(&etag, BLOB_CACHE));
    }
    let permit = admit_download(api, peer, method, headers, to)?;
    send_blob(&api.served, digest, size, fetch, permit, method, headers).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that do not compress (xorshift).
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    async fn put(store: &Store, bytes: &[u8]) -> Digest {
        let mut w = store.writer().await.unwrap();
        w.write(bytes).await.unwrap();
        w.finish(None).await.unwrap().0
    }

    fn engine(store: &Store, max_concurrent: usize, max_waiting: usize) -> Arc<Deltas> {
        let limits = DeltaLimits {
            max_item_bytes: 1 << 30,
            max_concurrent,
            max_waiting,
        };
        Arc::new(Deltas::new(store.clone(), limits, Arc::new(Metrics::new())).unwrap())
    }

    /// Two versions 4 KiB apart, stored.
    async fn versions(store: &Store, seed: u64) -> (Vec<u8>, Digest, Vec<u8>, Digest) {
        let old = noise(seed, 512 << 10);
        let mut new = old.clone();
        new[70_000..74_096].copy_from_slice(&noise(seed + 100, 4096));
        let (a, b) = (put(store, &old).await, put(store, &new).await);
        (old, a, new, b)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pair_asked_for_at_once_is_computed_once_and_rebuilds_the_new_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (old, a, new, b) = versions(&store, 1).await;
        let e = engine(&store, 1, 4);
        let asks: Vec<_> = (0..8)
            .map(|_| {
                let e = e.clone();
                tokio::spawn(async move { e.get_or_compute(a, b, Asker::Edge).await })
            })
            .collect();
        let mut blobs = Vec::new();
        for ask in asks {
            match ask.await.unwrap().unwrap() {
                Outcome::Delta(blob) => blobs.push(blob),
                other => panic!("{other:?}"),
            }
        }
        assert!(blobs.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(e.metrics.deltas_computed.get(), 1, "one computation");
        let blob = blobs[0];
        let bytes = store.map_blob(&blob.sha256).unwrap().unwrap();
        assert_eq!(bytes.len() as u64, blob.size);
        assert!(blob.size < 8192, "{}", blob.size);
        let mut out = vec![0u8; new.len()];
        delta::apply(&old, &bytes, &mut out).unwrap();
        assert!(out == new);
        // Asked again later: from the record.
        assert_eq!(
            e.get_or_compute(a, b, Asker::Edge).await.unwrap(),
            Outcome::Delta(blob)
        );
        assert_eq!(e.metrics.deltas_computed.get(), 1);
        assert!(e.is_delta(&blob.sha256) && !e.is_delta(&a));
        assert_eq!(e.recorded_blobs().unwrap(), vec![(blob.sha256, b)]);
        // Once its blob went, the pair is computed again (the same bytes).
        store.remove(&blob.sha256).await.unwrap();
        assert_eq!(
            e.get_or_compute(a, b, Asker::Edge).await.unwrap(),
            Outcome::Delta(blob)
        );
        assert_eq!(e.metrics.deltas_computed.get(), 2);
    }

    #[tokio::test]
    async fn a_delta_not_worth_having_is_recorded_and_not_computed_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (
            put(&store, &noise(1, 64 << 10)).await,
            put(&store, &noise(2, 64 << 10)).await,
        );
        let e = engine(&store, 1, 4);
        for _ in 0..2 {
            assert_eq!(
                e.get_or_compute(a, b, Asker::Edge).await.unwrap(),
                Outcome::NotWorth
            );
        }
        assert_eq!(e.metrics.deltas_unworthy.get(), 1);
        let missing = Digest::of(b"not stored");
        assert_eq!(
            e.get_or_compute(missing, b, Asker::Edge).await.unwrap(),
            Outcome::NotHeld(missing)
        );
        let off = Arc::new(
            Deltas::new(
                store.clone(),
                DeltaLimits {
                    max_item_bytes: 1000,
                    ..DeltaLimits::default()
                },
                Arc::new(Metrics::new()),
            )
            .unwrap(),
        );
        let c = put(&store, &noise(5, 64 << 10)).await;
        assert_eq!(
            off.get_or_compute(a, c, Asker::Edge).await.unwrap(),
            Outcome::TooLarge
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn beyond_max_waiting_an_edge_ask_is_busy_and_a_listing_waits_its_turn() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_, a, _, b) = versions(&store, 1).await;
        let (_, c, _, d) = versions(&store, 2).await;
        let e = engine(&store, 1, 1);
        // Every turn taken.
        let held = e.turns.clone().acquire_owned().await.unwrap();
        let first = {
            let e = e.clone();
            tokio::spawn(async move { e.get_or_compute(a, b, Asker::Edge).await })
        };
        // The first waits; a second pair finds the queue full.
        let mut waited = 0;
        while e.waiting.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            waited += 1;
            assert!(waited < 1000, "the first never queued");
        }
        let busy = e.get_or_compute(c, d, Asker::Edge).await.unwrap_err();
        assert_eq!(busy, DeltaFailure::Busy { waiting: 1 });
        assert_eq!(busy.kind(), Kind::Unavailable { retry_after_s: 5 });
        assert_eq!(busy.code(), "delta_busy");
        assert_eq!(e.metrics.deltas_busy.get(), 1);
        // Asking for the pair already waiting joins it instead.
        let joined = {
            let e = e.clone();
            tokio::spawn(async move { e.get_or_compute(a, b, Asker::Edge).await })
        };
        // A listing is never refused: it waits its turn.
        let listing = {
            let e = e.clone();
            tokio::spawn(async move { e.get_or_compute(c, d, Asker::Listing).await })
        };
        drop(held);
        for t in [first, joined, listing] {
            assert!(matches!(t.await.unwrap(), Ok(Outcome::Delta(_))));
        }
        assert_eq!(e.metrics.deltas_computed.get(), 2);
        assert_eq!(e.waiting.load(Ordering::SeqCst), 0);
        assert_eq!(e.metrics.deltas_waiting.get(), 0);
    }

    #[tokio::test]
    async fn prune_drops_the_pairs_whose_to_went_and_forget_drops_an_evicted_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (_, a, _, b) = versions(&store, 1).await;
        let (_, c, _, d) = versions(&store, 2).await;
        let unrelated = put(&store, &noise(77, 64 << 10)).await;
        let e = engine(&store, 2, 4);
        let Outcome::Delta(ab) = e.get_or_compute(a, b, Asker::Edge).await.unwrap() else {
            panic!()
        };
        let Outcome::Delta(cd) = e.get_or_compute(c, d, Asker::Edge).await.unwrap() else {
            panic!()
        };
        assert_eq!(
            e.get_or_compute(unrelated, b, Asker::Edge).await.unwrap(),
            Outcome::NotWorth
        );
        // `b` left the catalog: its two records go, and the one delta blob is named.
        assert_eq!(e.prune(|to| *to != b).unwrap(), vec![ab.sha256]);
        assert_eq!(e.recorded_blobs().unwrap(), vec![(cd.sha256, d)]);
        assert!(e.recorded(&unrelated, &b).unwrap().is_none());
        assert!(e.prune(|_| true).unwrap().is_empty());
        // An evicted delta's records go; any other blob is no delta and changes nothing.
        e.forget_blob(&a).unwrap();
        e.forget_blob(&cd.sha256).unwrap();
        assert!(e.recorded_blobs().unwrap().is_empty());
        assert!(e.recorded(&c, &d).unwrap().is_none());
    }
}
