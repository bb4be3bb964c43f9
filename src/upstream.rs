//! The node's side of the WAN: the upstream list, snapshots, and blob fetches into the store.
//!
//! Owns the HTTP client to the upstreams (manager or another node), the order they are tried
//! in (priority = list order, first that answers wins), and fetching a blob into `store` with
//! its digest verified before it becomes visible. Concurrent requests for one blob share one
//! fetch. It must never answer clients: it fills the store, and `serve` reads from there.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use reqwest::StatusCode;

use crate::api::ApiError;
use crate::auth::Token;
use crate::digest::Digest;
use crate::metrics::Metrics;
use crate::mirror::Snapshot;
use crate::serve::{Attached, Fetcher, Progress};
use crate::store::{Store, StoreError};

/// What can go wrong talking to an upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("{server}: {source}")]
    Http {
        server: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{server}: answered {status}")]
    Status { server: String, status: StatusCode },
    #[error("{server}: no byte for {secs} s")]
    Idle { server: String, secs: u64 },
    #[error("{server}: {source}")]
    Store {
        server: String,
        #[source]
        source: StoreError,
    },
    #[error("no upstream answered: {}", .0.join("; "))]
    AllFailed(Vec<String>),
    #[error("building the HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("upstream CA file {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("{server}: catalog refused: {reason}")]
    Signature { server: String, reason: String },
    #[error("{server}: refused: {reason}")]
    Refused { server: String, reason: String },
}

/// Largest `/v1/sync` answer a node accepts.
const MAX_SNAPSHOT_BYTES: usize = 64 << 20;
/// Most items a mirrored catalog may hold.
const MAX_CATALOG_ITEMS: usize = 100_000;

type SharedFetch = Shared<BoxFuture<'static, Result<(), Arc<UpstreamError>>>>;

/// What the node knows of one upstream's health.
struct Health {
    /// Delays before the next try after each consecutive failure (jittered, 0.5 s to 30 s).
    backoff: backon::ExponentialBackoff,
    /// Skip this server until then (another in the list is tried meanwhile).
    retry_at: Option<tokio::time::Instant>,
    /// How its last call went (None: not tried yet); failures are logged on a change.
    last_ok: Option<bool>,
}

fn new_backoff() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// The upstream list and the in-flight fetches.
pub struct Upstream {
    servers: Vec<url::Url>,
    token: Option<Token>,
    http: reqwest::Client,
    idle_timeout: Duration,
    store: Store,
    metrics: Arc<Metrics>,
    /// Per server, in list order: backoff after failures.
    health: Mutex<Vec<Health>>,
    /// Verifies catalog signatures when configured.
    catalog_key: Option<crate::signing::PublicKey>,
    /// How often a node held to a lower-priority upstream checks whether a higher one is back.
    probe_interval: Duration,
    /// The WAN budget all blob fetches share.
    wan: crate::limit::ByteLimiter,
    /// Notified after each blob is stored (the node then checks its disk budget).
    pub stored: tokio::sync::Notify,
    /// One entry per blob being fetched; later askers attach to it.
    inflight: Mutex<HashMap<Digest, SharedFetch>>,
    /// The temp file and progress of the attempt now running for a blob, for readers that
    /// stream it while it arrives.
    attempts: Mutex<HashMap<Digest, (std::path::PathBuf, tokio::sync::watch::Receiver<Progress>)>>,
}

/// How a node talks to its upstreams (from `[upstream]`).
pub struct UpstreamOptions {
    /// Highest priority first.
    pub servers: Vec<url::Url>,
    /// The node token presented upstream.
    pub token: Option<Token>,
    /// CA certificates trusted for https upstreams besides the system roots.
    pub ca_file: Option<std::path::PathBuf>,
    /// A call or blob fetch that receives no byte this long is abandoned.
    pub idle_timeout: Duration,
    /// How often a stream held to a lower-priority upstream probes the higher ones.
    pub probe_interval: Duration,
    /// WAN budget, 0 = unlimited.
    pub max_bytes_per_sec: u64,
    /// When set, a snapshot whose catalog is unsigned or wrongly signed is refused.
    pub catalog_key: Option<crate::signing::PublicKey>,
}

impl Upstream {
    pub fn new(
        opts: UpstreamOptions,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Upstream>, UpstreamError> {
        let UpstreamOptions {
            servers,
            token,
            ca_file,
            idle_timeout,
            probe_interval,
            max_bytes_per_sec,
            catalog_key,
        } = opts;
        let health = servers
            .iter()
            .map(|_| Health {
                backoff: new_backoff(),
                retry_at: None,
                last_ok: None,
            })
            .collect();
        for s in &servers {
            metrics.upstream_up(s.as_str()).set(0);
        }
        let mut builder = reqwest::Client::builder();
        if let Some(path) = ca_file.as_deref() {
            let ca_err = |reason: String| UpstreamError::Ca {
                path: path.display().to_string(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_err("no PEM certificate in it".into()));
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(idle_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("gup-node/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(UpstreamError::Client)?;
        Ok(Arc::new(Upstream {
            servers,
            token,
            http,
            idle_timeout,
            store,
            metrics,
            health: Mutex::new(health),
            catalog_key,
            probe_interval,
            wan: crate::limit::ByteLimiter::new(max_bytes_per_sec),
            stored: tokio::sync::Notify::new(),
            inflight: Mutex::new(HashMap::new()),
            attempts: Mutex::new(HashMap::new()),
        }))
    }

    pub fn servers(&self) -> &[url::Url] {
        &self.servers
    }

    fn url(server: &url::Url, path: &str) -> String {
        format!("{}{}", server.as_str().trim_end_matches('/'), path)
    }

    fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.get(url);
        match &self.token {
            Some(t) => req.bearer_auth(t.secret()),
            None => req,
        }
    }

    /// The servers to try now, by priority: those not backing off first; when every one is
    /// backing off, all of them (an outage is retried at the caller's pace).
    fn order(&self) -> Vec<usize> {
        let now = tokio::time::Instant::now();
        let Ok(health) = self.health.lock() else {
            return (0..self.servers.len()).collect();
        };
        let ready: Vec<usize> = (0..self.servers.len())
            .filter(|i| health[*i].retry_at.is_none_or(|t| t <= now))
            .collect();
        if ready.is_empty() {
            (0..self.servers.len()).collect()
        } else {
            ready
        }
    }

    /// Records how a call to server `i` went: success resets its backoff, failure pushes its
    /// next try out.
    /// Returns true when this changed the server's state (so callers log a change once).
    fn mark(&self, i: usize, ok: bool) -> bool {
        let mut changed = false;
        if let Ok(mut health) = self.health.lock() {
            let h = &mut health[i];
            changed = h.last_ok != Some(ok);
            h.last_ok = Some(ok);
            if ok {
                h.backoff = new_backoff();
                h.retry_at = None;
            } else {
                let delay = h.backoff.next().unwrap_or(Duration::from_secs(30));
                h.retry_at = Some(tokio::time::Instant::now() + delay);
            }
        }
        self.metrics
            .upstream_up(self.servers[i].as_str())
            .set(i64::from(ok));
        changed
    }

    /// Calls `op` on each server in [`Self::order`] until one succeeds.
    async fn first_that_answers<T, F, Fut>(&self, op: F) -> Result<(usize, T), UpstreamError>
    where
        F: Fn(usize) -> Fut,
        Fut: std::future::Future<Output = Result<T, UpstreamError>>,
    {
        let mut failures = Vec::new();
        for i in self.order() {
            match op(i).await {
                Ok(v) => {
                    self.mark(i, true);
                    return Ok((i, v));
                }
                Err(e) => {
                    // A blob that fails its digest is the blob's fault as much as the
                    // server's; either way the next server is tried.
                    if self.mark(i, false) {
                        tracing::warn!(server = %self.servers[i], error = %e, "upstream failed; trying the next one");
                    }
                    failures.push(e.to_string());
                }
            }
        }
        Err(UpstreamError::AllFailed(failures))
    }

    /// The snapshot of the first upstream that answers, in priority order, with its index.
    pub async fn snapshot(&self) -> Result<(usize, Snapshot), UpstreamError> {
        self.first_that_answers(|i| self.snapshot_from(&self.servers[i]))
            .await
    }

    async fn snapshot_from(&self, server: &url::Url) -> Result<Snapshot, UpstreamError> {
        let name = server.to_string();
        let http = |source| UpstreamError::Http {
            server: name.clone(),
            source,
        };
        let resp = self
            .get(&Self::url(server, "/v1/sync"))
            .timeout(self.idle_timeout)
            .send()
            .await
            .map_err(http)?;
        if !resp.status().is_success() {
            return Err(UpstreamError::Status {
                server: name.clone(),
                status: resp.status(),
            });
        }
        // A snapshot is read with a size cap: a huge or endless answer is refused, not
        // buffered without bound.
        let mut body = resp.bytes_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(http)?;
            if bytes.len() + chunk.len() > MAX_SNAPSHOT_BYTES {
                return Err(UpstreamError::Refused {
                    server: name,
                    reason: format!("snapshot larger than {MAX_SNAPSHOT_BYTES} bytes"),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        let refused = |reason: String| UpstreamError::Refused {
            server: name.clone(),
            reason,
        };
        let snapshot: Snapshot = serde_json::from_slice(&bytes)
            .map_err(|e| refused(format!("invalid snapshot: {e}")))?;
        if snapshot.catalog.items.len() > MAX_CATALOG_ITEMS {
            return Err(refused(format!(
                "catalog of {} items (at most {MAX_CATALOG_ITEMS})",
                snapshot.catalog.items.len()
            )));
        }
        crate::catalog::validate_catalog(&snapshot.catalog)
            .map_err(|e| refused(format!("invalid catalog: {e}")))?;
        if let Some(key) = &self.catalog_key {
            if let Err(e) = key.verify(&snapshot.catalog, snapshot.catalog_signature.as_deref()) {
                tracing::warn!(server = %name, error = %e, "refusing a catalog whose signature does not verify");
                return Err(UpstreamError::Signature {
                    server: name,
                    reason: e.to_string(),
                });
            }
        }
        Ok(snapshot)
    }

    /// POSTs `body` as JSON with the node token to `path` on server `i`; a non-2xx answer is
    /// an error.
    async fn post_json<B: serde::Serialize + ?Sized>(
        &self,
        i: usize,
        path: &str,
        body: &B,
    ) -> Result<reqwest::Response, UpstreamError> {
        let server = &self.servers[i];
        let name = server.to_string();
        let mut req = self
            .http
            .post(Self::url(server, path))
            .timeout(self.idle_timeout)
            .json(body);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t.secret());
        }
        let resp = req.send().await.map_err(|source| UpstreamError::Http {
            server: name.clone(),
            source,
        })?;
        if !resp.status().is_success() {
            return Err(UpstreamError::Status {
                server: name,
                status: resp.status(),
            });
        }
        Ok(resp)
    }

    /// Relays a batch of client heartbeats to the first upstream that accepts it.
    pub async fn relay_heartbeats(
        &self,
        batch: &crate::manager::HeartbeatBatch,
    ) -> Result<crate::manager::BatchReply, UpstreamError> {
        self.first_that_answers(|i| async move {
            let resp = self.post_json(i, "/v1/node/heartbeats", batch).await?;
            resp.json::<crate::manager::BatchReply>()
                .await
                .map_err(|source| UpstreamError::Http {
                    server: self.servers[i].to_string(),
                    source,
                })
        })
        .await
        .map(|(_, r)| r)
    }

    /// Forwards queued uploads (events, applications) to the first upstream that accepts them.
    pub async fn forward_uploads(
        &self,
        batch: &crate::events::UploadBatch,
    ) -> Result<(), UpstreamError> {
        self.first_that_answers(|i| async move {
            self.post_json(i, "/v1/node/events", batch)
                .await
                .map(|_| ())
        })
        .await
        .map(|_| ())
    }

    /// Holds `/v1/stream` to the first upstream that answers and calls `on_event` for every
    /// event; returns when the stream ends or fails, or when a higher-priority upstream
    /// answers again (the caller reconnects, in priority order).
    pub async fn follow_stream(
        &self,
        on_event: &(dyn Fn(&str) + Send + Sync),
    ) -> Result<String, UpstreamError> {
        let (index, resp) = self
            .first_that_answers(|i| async move {
                let server = &self.servers[i];
                let name = server.to_string();
                let resp = self
                    .get(&Self::url(server, "/v1/stream"))
                    .send()
                    .await
                    .map_err(|source| UpstreamError::Http {
                        server: name.clone(),
                        source,
                    })?;
                if !resp.status().is_success() {
                    return Err(UpstreamError::Status {
                        server: name,
                        status: resp.status(),
                    });
                }
                Ok(resp)
            })
            .await?;
        let name = self.servers[index].to_string();
        tracing::info!(server = %name, "holding the upstream push stream");
        let mut parser = crate::stream::EventParser::default();
        let mut body = resp.bytes_stream();
        // The upstream sends a keep-alive at least every 15 s: silence means it is gone.
        let idle = crate::stream::KEEP_ALIVE * 3;
        let mut probe = tokio::time::interval(self.probe_interval);
        probe.tick().await;
        loop {
            tokio::select! {
                next = tokio::time::timeout(idle, body.next()) => match next {
                    Ok(Some(Ok(chunk))) => {
                        for (event, _data) in parser.feed(&chunk) {
                            on_event(&event);
                        }
                    }
                    Ok(Some(Err(e))) => {
                        self.mark(index, false);
                        return Err(UpstreamError::Http { server: name, source: e });
                    }
                    Ok(None) => return Ok(name),
                    Err(_) => {
                        self.mark(index, false);
                        return Err(UpstreamError::Idle { server: name, secs: idle.as_secs() });
                    }
                },
                _ = probe.tick(), if index > 0 => {
                    if let Some(better) = self.higher_priority_answering(index).await {
                        tracing::info!(from = %name, to = %better, "a higher-priority upstream answers again; moving back");
                        return Ok(name);
                    }
                }
            }
        }
    }

    /// The first server above `index` whose `/readyz` answers 200 now.
    async fn higher_priority_answering(&self, index: usize) -> Option<String> {
        for (i, server) in self.servers.iter().enumerate().take(index) {
            let ok = self
                .http
                .get(Self::url(server, "/readyz"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                self.mark(i, true);
                return Some(server.to_string());
            }
        }
        None
    }

    /// Brings `digest` into the store, sharing the fetch with everyone asking at once.
    pub fn fetch(self: &Arc<Self>, digest: Digest, size: u64) -> SharedFetch {
        let Ok(mut inflight) = self.inflight.lock() else {
            let err = Arc::new(UpstreamError::AllFailed(vec!["lock poisoned".into()]));
            return futures_util::future::ready(Err(err)).boxed().shared();
        };
        if let Some(f) = inflight.get(&digest) {
            return f.clone();
        }
        let me = self.clone();
        let fut = async move {
            let result = me.fetch_any(digest, size).await.map_err(Arc::new);
            if let Ok(mut inflight) = me.inflight.lock() {
                inflight.remove(&digest);
            }
            result
        }
        .boxed()
        .shared();
        inflight.insert(digest, fut.clone());
        // Drive it even if every asker goes away: the bytes are wanted anyway.
        tokio::spawn(fut.clone());
        fut
    }

    async fn fetch_any(&self, digest: Digest, size: u64) -> Result<(), UpstreamError> {
        if self.store.contains(&digest) {
            return Ok(());
        }
        self.first_that_answers(|i| {
            self.metrics.upstream_fetches.inc();
            async move {
                let r = self.fetch_from(&self.servers[i], digest, size).await;
                if let Err(e) = &r {
                    tracing::warn!(%digest, error = %e, "blob fetch failed; trying the next upstream");
                }
                r
            }
        })
        .await
        .map(|_| ())
    }

    async fn fetch_from(
        &self,
        server: &url::Url,
        digest: Digest,
        size: u64,
    ) -> Result<(), UpstreamError> {
        let name = server.to_string();
        let resp = self
            .get(&Self::url(server, &format!("/v1/content/{digest}")))
            .send()
            .await
            .map_err(|source| UpstreamError::Http {
                server: name.clone(),
                source,
            })?;
        if resp.status() != StatusCode::OK {
            return Err(UpstreamError::Status {
                server: name,
                status: resp.status(),
            });
        }
        let store_err = |source| UpstreamError::Store {
            server: name.clone(),
            source,
        };
        let mut writer = self.store.writer().await.map_err(store_err)?;
        let (tx, rx) = tokio::sync::watch::channel(Progress::Running(0));
        if let Ok(mut a) = self.attempts.lock() {
            a.insert(digest, (writer.tmp_path().to_path_buf(), rx));
        }
        let result = self.receive(&name, &mut writer, resp, &tx).await;
        let result = match result {
            Ok(()) => writer
                .finish(Some((&digest, Some(size))))
                .await
                .map(|_| ())
                .map_err(store_err),
            Err(e) => Err(e),
        };
        if let Ok(mut a) = self.attempts.lock() {
            a.remove(&digest);
        }
        match result {
            Ok(()) => {
                let _ = tx.send(Progress::Verified);
                self.stored.notify_one();
                tracing::info!(%digest, size, server = %name, "blob fetched and verified");
                Ok(())
            }
            Err(e) => {
                let _ = tx.send(Progress::Failed);
                Err(e)
            }
        }
    }

    /// Receives a blob body into `writer`, telling readers how far it got.
    async fn receive(
        &self,
        name: &str,
        writer: &mut crate::store::BlobWriter,
        resp: reqwest::Response,
        tx: &tokio::sync::watch::Sender<Progress>,
    ) -> Result<(), UpstreamError> {
        let name = name.to_string();
        let store_err = |source| UpstreamError::Store {
            server: name.clone(),
            source,
        };
        let mut body = resp.bytes_stream();
        let mut told = 0u64;
        loop {
            let next = tokio::time::timeout(self.idle_timeout, body.next())
                .await
                .map_err(|_| UpstreamError::Idle {
                    server: name.clone(),
                    secs: self.idle_timeout.as_secs(),
                })?;
            let Some(chunk) = next else { break };
            let chunk = chunk.map_err(|source| UpstreamError::Http {
                server: name.clone(),
                source,
            })?;
            self.wan.take(chunk.len()).await;
            self.metrics.upstream_bytes.inc_by(chunk.len() as u64);
            writer.write(&chunk).await.map_err(store_err)?;
            // The writing stage moves on by itself; tell readers whenever it got further.
            let on_disk = writer.on_disk();
            if on_disk != told {
                told = on_disk;
                let _ = tx.send(Progress::Running(on_disk));
            }
        }
        Ok(())
    }

    /// The temp file of the attempt now running for `digest`, opened for reading.
    async fn open_attempt(&self, digest: &Digest) -> Option<Attached> {
        let (path, progress) = self.attempts.lock().ok()?.get(digest).cloned()?;
        // The file may have been renamed into the store (or removed) since: then None.
        let file = tokio::fs::File::open(&path).await.ok()?;
        Some(Attached::Growing { file, progress })
    }
}

/// The upstream as the `serve` module sees it.
pub struct UpstreamFetcher(pub Arc<Upstream>);

impl Fetcher for UpstreamFetcher {
    fn attach(&self, digest: Digest, size: u64) -> BoxFuture<'static, Result<Attached, ApiError>> {
        let up = self.0.clone();
        let mut fetch = up.fetch(digest, size);
        async move {
            loop {
                if up.store.contains(&digest) {
                    return Ok(Attached::Stored);
                }
                if let Some(growing) = up.open_attempt(&digest).await {
                    return Ok(growing);
                }
                // Between attempts, or before the first response arrived: wait a moment or
                // for the whole fetch to end.
                tokio::select! {
                    r = &mut fetch => {
                        return r.map(|()| Attached::Stored).map_err(|e| {
                            ApiError::new(
                                axum::http::StatusCode::BAD_GATEWAY,
                                "upstream_failed",
                                format!("fetching {digest}: {e}"),
                            )
                        });
                    }
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        }
        .boxed()
    }
}
