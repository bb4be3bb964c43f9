//! The node's side of the WAN: the upstream list and the calls a node makes to it.
//!
//! Owns the HTTP client to the upstreams (manager or another node) and the outbound proxy it
//! goes through, the order they are tried in (priority = list order, first that answers wins,
//! jittered backoff for one that failed, back to a higher one when it answers again), their
//! health (`gup_upstream_up`, `gup_upstream_state`), and the calls: the `/v1/sync` snapshot,
//! heartbeat and upload batches, the push stream, a blob's body, enrolments and the node
//! reports, each presenting the node token of the server it goes to. Every failure says which
//! server and whether a retry may help; a failure of this node's own (its disk) is never
//! blamed on an upstream and never makes it try another. It must never answer clients or
//! write to the store (`fetch` fills the store), nor show a proxy's credentials.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use reqwest::StatusCode;

use crate::core::credential::{EnrollRequest, Enrolled};
use crate::core::digest::Digest;
use crate::core::fleet::ReportBatch;
use crate::core::proto::{
    BatchReply, DownloadSlot, HeartbeatBatch, PrefetchSlotReply, PrefetchSlotRequest, Snapshot,
    UploadBatch, SNAPSHOT_READ_LIMIT,
};
use crate::http::auth::Token;
use crate::serve::metrics::{
    Metrics, UPSTREAM_DOWN, UPSTREAM_HELD, UPSTREAM_NOT_TRIED, UPSTREAM_UP,
};

pub use super::upstream_error::{EnrolRelayError, UpstreamError};

/// The server, ETag and reported staleness of the snapshot a node last mirrored.
type LastSync = (url::Url, String, Option<DateTime<Utc>>);

/// What a sync brought.
pub enum Synced {
    /// A new snapshot (checked), with its ETag when the server sent one.
    New {
        snapshot: Box<Snapshot>,
        etag: Option<String>,
    },
    /// The snapshot last mirrored from this server is still current (304), and this is what
    /// it said of its own staleness.
    Unchanged { stale_since: Option<DateTime<Utc>> },
}

/// Most items a mirrored catalog may hold.
const MAX_CATALOG_ITEMS: usize = 100_000;

/// The longest `Retry-After` an upstream is obeyed for; a longer one is cut to this.
pub const MAX_RETRY_AFTER_S: u64 = 3600;

/// The error for a non-success answer: [`UpstreamError::Busy`] for a 429 or 503 that says
/// when to come back (`Retry-After` in seconds or as an HTTP date, at most
/// [`MAX_RETRY_AFTER_S`]), else [`UpstreamError::Status`].
fn status_error(server: String, resp: &reqwest::Response) -> UpstreamError {
    let status = resp.status();
    let busy = status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE;
    let retry_after_s = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let v = v.trim();
            v.parse::<u64>().ok().or_else(|| {
                let at = httpdate::parse_http_date(v).ok()?;
                let wait = at.duration_since(std::time::SystemTime::now()).ok()?;
                Some(wait.as_secs_f64().ceil() as u64)
            })
        });
    match retry_after_s {
        Some(s) if busy => UpstreamError::Busy {
            server,
            status,
            retry_after_s: s.clamp(1, MAX_RETRY_AFTER_S),
        },
        _ => UpstreamError::Status { server, status },
    }
}

struct Health {
    /// Delays before the next try after each consecutive failure (jittered, 0.5 s to 30 s).
    backoff: backon::ExponentialBackoff,
    /// Skip this server until then (another in the list is tried meanwhile).
    retry_at: Option<tokio::time::Instant>,
    /// The server said when to come back (`Retry-After`): not asked before then, even when
    /// every server is backing off.
    held_until: Option<tokio::time::Instant>,
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

/// One upstream list as configured, with the HTTP client that reaches it (proxy, CA) and how
/// each of its servers is doing: what a reload replaces whole. A call holds the list it
/// started with, so a fetch in flight finishes on the server and client it began with.
struct List {
    servers: Vec<url::Url>,
    /// Per server, in list order: the node token presented to it (its own, else the list's
    /// default), so that a node and a manager with different node tokens can share a list.
    tokens: Vec<Option<Token>>,
    http: reqwest::Client,
    /// Where the calls go out, for the log and the status page (credentials redacted).
    proxy: Option<String>,
    /// Per server, in list order: backoff after failures.
    health: Mutex<Vec<Health>>,
}

/// One server of one list, as a call chose it: later calls for the same job (the prefetch
/// slot of the revision it mirrored, the body of a blob) go to the same server even when a
/// reload replaced the list meanwhile.
#[derive(Clone)]
pub struct Picked {
    list: Arc<List>,
    i: usize,
}

impl std::fmt::Debug for Picked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Picked").field(&self.url().as_str()).finish()
    }
}

impl Picked {
    /// The server's name (its URL).
    pub fn name(&self) -> String {
        self.list.servers[self.i].to_string()
    }

    fn url(&self) -> &url::Url {
        &self.list.servers[self.i]
    }
}

/// A list built and checked by [`Upstream::prepare`], waiting for [`Upstream::install`].
pub struct Prepared(List);

/// The upstream list and how each server is doing.
pub struct Upstream {
    /// The list in force; a reload swaps it whole.
    list: RwLock<Arc<List>>,
    /// Bumped at every swap: a push stream held to the old list ends and reconnects.
    replaced: tokio::sync::watch::Sender<u64>,
    idle_timeout: Duration,
    metrics: Arc<Metrics>,
    /// Verifies catalog signatures when configured.
    catalog_key: Option<crate::core::signing::PublicKey>,
    /// How often a node held to a lower-priority upstream checks whether a higher one is back.
    probe_interval: Duration,
    /// The server, ETag and reported staleness of the snapshot last mirrored.
    last_sync: Mutex<Option<LastSync>>,
}

/// One upstream and the node token presented to it.
pub struct Server {
    pub url: url::Url,
    pub token: Option<Token>,
}

/// The outbound proxy of the calls to upstreams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyChoice {
    /// `upstream.proxy`: every call goes through it (hosts in `NO_PROXY` excepted); the
    /// environment's proxies are not read.
    Configured(String),
    /// Empty `upstream.proxy`: reqwest reads `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and
    /// `NO_PROXY` (or their lower-case forms) as curl does, loopback included.
    Environment,
}

/// The upstream list of `[upstream]`: what a reload may replace.
pub struct ListOptions {
    /// Highest priority first, each with its token.
    pub servers: Vec<Server>,
    /// Where the calls go out.
    pub proxy: ProxyChoice,
    /// CA certificates trusted for https upstreams besides the system roots.
    pub ca_file: Option<std::path::PathBuf>,
}

/// How a node talks to its upstreams (from `[upstream]`).
pub struct UpstreamOptions {
    pub list: ListOptions,
    /// A call or blob fetch that receives no byte this long is abandoned.
    pub idle_timeout: Duration,
    /// How often a stream held to a lower-priority upstream probes the higher ones.
    pub probe_interval: Duration,
    /// When set, a snapshot whose catalog is unsigned or wrongly signed is refused.
    pub catalog_key: Option<crate::core::signing::PublicKey>,
}

impl List {
    /// Builds the client for `opts` (reads the CA file, checks the proxy); touches nothing
    /// in force.
    fn build(opts: ListOptions, idle_timeout: Duration) -> Result<List, UpstreamError> {
        let ListOptions {
            servers,
            proxy,
            ca_file,
        } = opts;
        let (servers, tokens): (Vec<url::Url>, Vec<Option<Token>>) =
            servers.into_iter().map(|s| (s.url, s.token)).unzip();
        let health = servers.iter().map(|_| Health::new()).collect();
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
        let (builder, proxy) = with_proxy(builder, &proxy)?;
        let http = builder
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(idle_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("gup-node/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(UpstreamError::Client)?;
        Ok(List {
            servers,
            tokens,
            http,
            proxy,
            health: Mutex::new(health),
        })
    }

    /// Whether server `i` of this list is server `j` of `other`, token included.
    fn same_server(&self, i: usize, other: &List, j: usize) -> bool {
        let secret = |t: &Option<Token>| t.as_ref().map(|t| t.secret().to_string());
        self.servers[i] == other.servers[j] && secret(&self.tokens[i]) == secret(&other.tokens[j])
    }
}

impl Health {
    fn new() -> Health {
        Health {
            backoff: new_backoff(),
            retry_at: None,
            held_until: None,
            last_ok: None,
        }
    }
}

impl Upstream {
    pub fn new(opts: UpstreamOptions, metrics: Arc<Metrics>) -> Result<Upstream, UpstreamError> {
        let UpstreamOptions {
            list,
            idle_timeout,
            probe_interval,
            catalog_key,
        } = opts;
        let list = List::build(list, idle_timeout)?;
        for s in &list.servers {
            metrics.upstream_state(s.as_str(), UPSTREAM_NOT_TRIED);
        }
        Ok(Upstream {
            list: RwLock::new(Arc::new(list)),
            replaced: tokio::sync::watch::channel(0).0,
            idle_timeout,
            metrics,
            catalog_key,
            probe_interval,
            last_sync: Mutex::new(None),
        })
    }

    /// Builds and checks a new list (a reload): the CA file read, the proxy checked. Nothing
    /// changes until [`Self::install`].
    pub fn prepare(&self, opts: ListOptions) -> Result<Prepared, UpstreamError> {
        List::build(opts, self.idle_timeout).map(Prepared)
    }

    /// Whether `prepared` presents another token to any server than the list in force does
    /// (a token file rewritten under the same path).
    pub fn tokens_differ(&self, prepared: &Prepared) -> bool {
        let (old, new) = (self.current(), &prepared.0);
        old.servers.len() != new.servers.len()
            || (0..new.servers.len()).any(|i| !old.same_server(i, new, i))
    }

    /// Puts a prepared list in force. A server that stays (same URL, same token) keeps its
    /// health; calls in flight finish on the list they started with; the push stream
    /// reconnects, in the new order.
    pub fn install(&self, prepared: Prepared) {
        let new = prepared.0;
        let old = self.current();
        if let (Ok(old_health), Ok(mut new_health)) = (old.health.lock(), new.health.lock()) {
            for (j, h) in new_health.iter_mut().enumerate() {
                if let Some(i) = (0..old.servers.len()).find(|i| old.same_server(*i, &new, j)) {
                    *h = Health {
                        backoff: new_backoff(),
                        retry_at: old_health[i].retry_at,
                        held_until: old_health[i].held_until,
                        last_ok: old_health[i].last_ok,
                    };
                }
            }
        }
        for s in old.servers.iter().filter(|s| !new.servers.contains(s)) {
            self.metrics.forget_upstream(s.as_str());
        }
        let kept: Vec<Option<bool>> = new
            .health
            .lock()
            .map(|h| h.iter().map(|h| h.last_ok).collect())
            .unwrap_or_default();
        for (j, s) in new.servers.iter().enumerate() {
            let state = match kept.get(j).copied().flatten() {
                None => UPSTREAM_NOT_TRIED,
                Some(true) => UPSTREAM_UP,
                Some(false) => UPSTREAM_DOWN,
            };
            self.metrics.upstream_state(s.as_str(), state);
        }
        match self.list.write() {
            Ok(mut l) => *l = Arc::new(new),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(new),
        }
        self.replaced.send_modify(|n| *n += 1);
    }

    /// The list in force.
    fn current(&self) -> Arc<List> {
        match self.list.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The servers of the list in force, highest priority first.
    pub fn servers(&self) -> Vec<url::Url> {
        self.current().servers.clone()
    }

    fn url(server: &url::Url, path: &str) -> String {
        format!("{}{}", server.as_str().trim_end_matches('/'), path)
    }

    /// Where the calls go out (credentials redacted), None when straight to the servers.
    pub fn proxy(&self) -> Option<String> {
        self.current().proxy.clone()
    }

    /// `req` with the node token of the server `at`.
    fn authorized(at: &Picked, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match at.list.tokens.get(at.i).and_then(Option::as_ref) {
            Some(t) => req.bearer_auth(t.secret()),
            None => req,
        }
    }

    /// A GET of `path` on the server `at`, with its token.
    fn get(at: &Picked, path: &str) -> reqwest::RequestBuilder {
        Self::authorized(at, at.list.http.get(Self::url(at.url(), path)))
    }

    /// Server `i` of the list in force.
    #[cfg(test)]
    fn pick(&self, i: usize) -> Picked {
        Picked {
            list: self.current(),
            i,
        }
    }

    /// The servers to try now, by priority: those not backing off first; when every one is
    /// backing off, all but those that said when to come back (an outage is retried at the
    /// caller's pace, a `Retry-After` is obeyed). Err: every server is held, and the seconds
    /// until the first may be asked again.
    fn order(list: &List) -> Result<Vec<usize>, u64> {
        let now = tokio::time::Instant::now();
        let Ok(health) = list.health.lock() else {
            return Ok((0..list.servers.len()).collect());
        };
        let ready: Vec<usize> = (0..list.servers.len())
            .filter(|i| health[*i].retry_at.is_none_or(|t| t <= now))
            .collect();
        if !ready.is_empty() {
            return Ok(ready);
        }
        let free: Vec<usize> = (0..list.servers.len())
            .filter(|i| health[*i].held_until.is_none_or(|t| t <= now))
            .collect();
        if !free.is_empty() {
            return Ok(free);
        }
        let first = health.iter().filter_map(|h| h.held_until).min();
        Err(first.map_or(1, |t| {
            t.duration_since(now).as_secs_f64().ceil().max(1.0) as u64
        }))
    }

    /// Holds the server `at` for `secs` (it answered `Retry-After`).
    fn hold(&self, at: &Picked, secs: u64) {
        if let Ok(mut health) = at.list.health.lock() {
            let until = tokio::time::Instant::now() + Duration::from_secs(secs);
            health[at.i].retry_at = Some(until);
            health[at.i].held_until = Some(until);
        }
        self.metrics
            .upstream_state(at.url().as_str(), UPSTREAM_HELD);
    }

    /// Records how a call to the server `at` went: success resets its backoff, failure
    /// pushes its next try out.
    /// Returns true when this changed the server's state (so callers log a change once).
    fn mark(&self, at: &Picked, ok: bool) -> bool {
        let mut changed = false;
        if let Ok(mut health) = at.list.health.lock() {
            let h = &mut health[at.i];
            changed = h.last_ok != Some(ok);
            h.last_ok = Some(ok);
            if ok {
                h.backoff = new_backoff();
                h.retry_at = None;
                h.held_until = None;
            } else {
                let delay = h.backoff.next().unwrap_or(Duration::from_secs(30));
                h.retry_at = Some(tokio::time::Instant::now() + delay);
            }
        }
        // A server a reload removed is not brought back into the metrics.
        if !Arc::ptr_eq(&at.list, &self.current()) {
            return changed;
        }
        let server = at.url().as_str();
        self.metrics.upstream_up(server).set(i64::from(ok));
        let state = if ok { UPSTREAM_UP } else { UPSTREAM_DOWN };
        self.metrics.upstream_state(server, state);
        changed
    }

    /// Calls `op` on each server in [`Self::order`] until one succeeds. A local failure
    /// stops at once: it would fail with every server, and it is no server's fault.
    pub async fn first_that_answers<T, F, Fut>(&self, op: F) -> Result<(Picked, T), UpstreamError>
    where
        F: Fn(Picked) -> Fut,
        Fut: std::future::Future<Output = Result<T, UpstreamError>>,
    {
        let mut failures = Vec::new();
        let mut retryable = false;
        let list = self.current();
        let order =
            Self::order(&list).map_err(|retry_after_s| UpstreamError::Held { retry_after_s })?;
        for i in order {
            let at = Picked {
                list: list.clone(),
                i,
            };
            match op(at.clone()).await {
                Ok(v) => {
                    self.mark(&at, true);
                    return Ok((at, v));
                }
                Err(e) if e.is_local() => return Err(e),
                Err(e) => {
                    // A blob that fails its digest is the server's fault as far as this node
                    // can tell; either way the next server is tried.
                    if self.mark(&at, false) {
                        tracing::warn!(server = %at.url(), error = %e, "upstream failed; trying the next one");
                    }
                    if let UpstreamError::Busy { retry_after_s, .. } = &e {
                        self.hold(&at, *retry_after_s);
                    }
                    retryable |= e.retryable();
                    failures.push(e.to_string());
                }
            }
        }
        Err(UpstreamError::AllFailed {
            failures,
            retryable,
        })
    }

    /// The snapshot of the first upstream that answers, in priority order, with its index.
    pub async fn snapshot(&self) -> Result<(Picked, Synced), UpstreamError> {
        self.first_that_answers(|at| async move { self.snapshot_from(&at).await })
            .await
    }

    /// Records the snapshot the node has mirrored from the server `at` (its ETag and what it
    /// said of its own staleness), so that the next sync asks only whether it changed.
    pub fn mirrored(&self, at: &Picked, etag: String, stale_since: Option<DateTime<Utc>>) {
        if let Ok(mut last) = self.last_sync.lock() {
            *last = Some((at.url().clone(), etag, stale_since));
        }
    }

    async fn snapshot_from(&self, at: &Picked) -> Result<Synced, UpstreamError> {
        let name = at.name();
        let http = |source| UpstreamError::Http {
            server: name.clone(),
            source,
        };
        let known = self
            .last_sync
            .lock()
            .ok()
            .and_then(|l| l.clone())
            .filter(|(url, _, _)| url == at.url());
        let mut req = Self::get(at, "/v1/sync").timeout(self.idle_timeout);
        if let Some((_, etag, _)) = &known {
            req = req.header(reqwest::header::IF_NONE_MATCH, etag.as_str());
        }
        let resp = req.send().await.map_err(http)?;
        if resp.status() == StatusCode::NOT_MODIFIED {
            if let Some((_, _, stale_since)) = known {
                return Ok(Synced::Unchanged { stale_since });
            }
        }
        if !resp.status().is_success() {
            return Err(status_error(name.clone(), &resp));
        }
        let etag = resp
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        // A snapshot is read with a size cap: a huge or endless answer is refused, not
        // buffered without bound.
        let mut body = resp.bytes_stream();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(http)?;
            if bytes.len() + chunk.len() > SNAPSHOT_READ_LIMIT {
                return Err(UpstreamError::Refused {
                    server: name,
                    reason: format!("snapshot larger than {SNAPSHOT_READ_LIMIT} bytes"),
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
        // A directory that breaks its bounds (a cycle, a chain too deep, a policy too large)
        // is this server's fault: the next one is tried.
        snapshot
            .directory
            .check()
            .map_err(|e| refused(format!("invalid directory: {e}")))?;
        crate::core::catalog::validate_catalog(&snapshot.catalog)
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
        Ok(Synced::New {
            snapshot: Box::new(snapshot),
            etag,
        })
    }

    /// POSTs `body` as JSON with the node token to `path` on server `i`; a non-2xx answer is
    /// an error.
    async fn post_json<B: serde::Serialize + ?Sized>(
        &self,
        at: &Picked,
        path: &str,
        body: &B,
    ) -> Result<reqwest::Response, UpstreamError> {
        let name = at.name();
        let req = at
            .list
            .http
            .post(Self::url(at.url(), path))
            .timeout(self.idle_timeout)
            .json(body);
        let resp =
            Self::authorized(at, req)
                .send()
                .await
                .map_err(|source| UpstreamError::Http {
                    server: name.clone(),
                    source,
                })?;
        if !resp.status().is_success() {
            return Err(status_error(name, &resp));
        }
        Ok(resp)
    }

    /// Asks the server `at` (the one the revision was mirrored from) when this node may
    /// prefetch it: None to fetch at once.
    pub async fn prefetch_slot(
        &self,
        at: &Picked,
        req: &PrefetchSlotRequest,
    ) -> Result<Option<DownloadSlot>, UpstreamError> {
        let resp = self.post_json(at, "/v1/node/slot", req).await?;
        let reply: PrefetchSlotReply = resp.json().await.map_err(|source| UpstreamError::Http {
            server: at.name(),
            source,
        })?;
        Ok(reply.download_slot)
    }

    /// Relays a batch of client heartbeats to the first upstream that accepts it.
    pub async fn relay_heartbeats(
        &self,
        batch: &HeartbeatBatch,
    ) -> Result<BatchReply, UpstreamError> {
        self.first_that_answers(|at| async move {
            let resp = self.post_json(&at, "/v1/node/heartbeats", batch).await?;
            resp.json::<BatchReply>()
                .await
                .map_err(|source| UpstreamError::Http {
                    server: at.name(),
                    source,
                })
        })
        .await
        .map(|(_, r)| r)
    }

    /// Relays a client's enrolment to the first upstream that answers. An upstream's refusal
    /// (a 4xx with its JSON error: a bad token, an enrolled id) is its answer and passes back
    /// as it is; silence or a 5xx tries the next server.
    pub async fn enroll(&self, req: &EnrollRequest) -> Result<Enrolled, EnrolRelayError> {
        let answered = self
            .first_that_answers(|at| async move {
                let name = at.name();
                let call = at
                    .list
                    .http
                    .post(Self::url(at.url(), "/v1/node/enroll"))
                    .timeout(self.idle_timeout)
                    .json(req);
                let resp = Self::authorized(&at, call).send().await.map_err(|source| {
                    UpstreamError::Http {
                        server: name.clone(),
                        source,
                    }
                })?;
                let status = resp.status();
                if status.is_server_error() {
                    return Err(status_error(name, &resp));
                }
                let body: serde_json::Value =
                    resp.json().await.map_err(|source| UpstreamError::Http {
                        server: name.clone(),
                        source,
                    })?;
                if status.is_success() {
                    return serde_json::from_value::<Enrolled>(body)
                        .map(Ok)
                        .map_err(|e| UpstreamError::Refused {
                            server: name,
                            reason: format!("an enrolment answer that is not one: {e}"),
                        });
                }
                let text = |k: &str| {
                    body.get(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or("")
                        .to_string()
                };
                Ok(Err(EnrolRelayError::Refused {
                    status: status.as_u16(),
                    code: crate::core::credential::enrol_refusal_code(&text("error")),
                    message: text("message"),
                }))
            })
            .await;
        match answered {
            Ok((_, answer)) => answer,
            Err(e) => Err(EnrolRelayError::Unreachable(e.to_string())),
        }
    }

    /// Forwards queued uploads (events, applications) to the first upstream that accepts them.
    pub async fn forward_uploads(&self, batch: &UploadBatch) -> Result<(), UpstreamError> {
        self.first_that_answers(|at| async move {
            self.post_json(&at, "/v1/node/events", batch)
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
        // Subscribed before connecting, so a reload during the connect is not missed.
        let mut replaced = self.replaced.subscribe();
        let (at, resp) = self
            .first_that_answers(|at| async move {
                let name = at.name();
                let resp = Self::get(&at, "/v1/stream")
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
        let name = at.name();
        tracing::info!(server = %name, "holding the upstream push stream");
        let mut parser = crate::core::proto::EventParser::default();
        let mut body = resp.bytes_stream();
        // The upstream sends a keep-alive at least every 15 s: silence means it is gone.
        let idle = crate::serve::stream::KEEP_ALIVE * 3;
        let mut probe = tokio::time::interval(self.probe_interval);
        probe.tick().await;
        loop {
            tokio::select! {
                next = tokio::time::timeout(idle, body.next()) => match next {
                    Ok(Some(Ok(chunk))) => match parser.feed(&chunk) {
                        Ok(events) => {
                            for (event, _data) in events {
                                on_event(&event);
                            }
                        }
                        Err(e) => {
                            self.mark(&at, false);
                            return Err(UpstreamError::Refused {
                                server: name,
                                reason: format!("push stream: {e}"),
                            });
                        }
                    },
                    Ok(Some(Err(e))) => {
                        self.mark(&at, false);
                        return Err(UpstreamError::Http { server: name, source: e });
                    }
                    Ok(None) => return Ok(name),
                    Err(_) => {
                        self.mark(&at, false);
                        return Err(UpstreamError::Idle { server: name, secs: idle.as_secs() });
                    }
                },
                _ = probe.tick(), if at.i > 0 => {
                    if let Some(better) = self.higher_priority_answering(&at).await {
                        tracing::info!(from = %name, to = %better, "a higher-priority upstream answers again; moving back");
                        return Ok(name);
                    }
                }
                _ = replaced.changed() => {
                    tracing::info!(server = %name, "the upstream list changed; reconnecting the push stream");
                    return Ok(name);
                }
            }
        }
    }

    /// The first server of `at`'s list above it whose `/readyz` answers 200 now.
    async fn higher_priority_answering(&self, at: &Picked) -> Option<String> {
        for (i, server) in at.list.servers.iter().enumerate().take(at.i) {
            let ok = at
                .list
                .http
                .get(Self::url(server, "/readyz"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                let better = Picked {
                    list: at.list.clone(),
                    i,
                };
                self.mark(&better, true);
                return Some(server.to_string());
            }
        }
        None
    }

    /// Asks the server `at` for the bytes of `digest`: the response, once it answered 200.
    pub async fn blob(
        &self,
        at: &Picked,
        digest: &Digest,
    ) -> Result<reqwest::Response, UpstreamError> {
        let name = at.name();
        let resp = Self::get(at, &format!("/v1/content/{digest}"))
            .send()
            .await
            .map_err(|source| UpstreamError::Http {
                server: name.clone(),
                source,
            })?;
        if resp.status() != StatusCode::OK {
            return Err(status_error(name, &resp));
        }
        Ok(resp)
    }

    /// How long a call or fetch may go without a byte.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }

    /// The upstream this node mirrored from last (None before its first sync).
    pub fn in_use(&self) -> Option<String> {
        let last = self.last_sync.lock().ok()?;
        last.as_ref().map(|(url, _, _)| url.to_string())
    }

    /// Sends a batch of node reports to the first upstream that accepts it.
    pub async fn post_reports(&self, batch: &ReportBatch) -> Result<(), UpstreamError> {
        self.first_that_answers(|at| async move {
            self.post_json(&at, "/v1/node/reports", batch)
                .await
                .map(drop)
        })
        .await
        .map(drop)
    }
}

/// Applies the proxy choice to the client; returns it with what to show of the proxy
/// (credentials redacted), None when calls go straight to the servers.
fn with_proxy(
    builder: reqwest::ClientBuilder,
    choice: &ProxyChoice,
) -> Result<(reqwest::ClientBuilder, Option<String>), UpstreamError> {
    use crate::core::config::redact_credentials;
    match choice {
        ProxyChoice::Configured(raw) => {
            let shown = redact_credentials(raw);
            let refused = |reason: String| UpstreamError::Proxy {
                shown: shown.clone(),
                reason,
            };
            // The URL as the url crate writes it (credentials percent-encoded), since
            // hyper-util drops a proxy it cannot read as a URI without a word, and the calls
            // would then go direct.
            let url = url::Url::parse(raw).map_err(|e| refused(e.to_string()))?;
            if url.as_str().parse::<axum::http::Uri>().is_err() {
                return Err(refused("not a URI an HTTP client can use".into()));
            }
            let proxy = reqwest::Proxy::all(url.as_str())
                .map_err(|_| refused("not a proxy URL reqwest accepts".into()))?
                .no_proxy(reqwest::NoProxy::from_env());
            Ok((builder.proxy(proxy), Some(shown)))
        }
        ProxyChoice::Environment => Ok((builder, environment_proxy())),
    }
}

/// The proxies the environment gives the client (as reqwest reads them: the upper-case name
/// first, `ALL_PROXY` for a scheme without its own), redacted, for the log and the status
/// page; warns of a value the client will ignore, since then the calls go direct.
fn environment_proxy() -> Option<String> {
    use crate::core::config::redact_credentials;
    // reqwest ignores proxy variables in a CGI process (httpoxy).
    if std::env::var_os("REQUEST_METHOD").is_some() {
        return None;
    }
    fn first(names: [&'static str; 2]) -> Option<(&'static str, String)> {
        names
            .into_iter()
            .find_map(|n| std::env::var(n).ok().map(|v| (n, v)))
            .filter(|(_, v)| !v.is_empty())
    }
    let mut shown = Vec::new();
    for names in [
        ["HTTPS_PROXY", "https_proxy"],
        ["HTTP_PROXY", "http_proxy"],
        ["ALL_PROXY", "all_proxy"],
    ] {
        let Some((name, value)) = first(names) else {
            continue;
        };
        let usable = value
            .parse::<axum::http::Uri>()
            .ok()
            .filter(|u| u.authority().is_some())
            .is_some_and(|u| matches!(u.scheme_str(), None | Some("http" | "https")));
        let value = redact_credentials(&value);
        if usable {
            shown.push(format!("{name}={value}"));
        } else {
            tracing::warn!(variable = name, value = %value, "a proxy variable that is not an http(s) proxy URL: the node cannot use it");
        }
    }
    if shown.is_empty() {
        return None;
    }
    if let Some((name, value)) = first(["NO_PROXY", "no_proxy"]) {
        shown.push(format!("{name}={value}"));
    }
    Some(format!("environment: {}", shown.join(", ")))
}

#[path = "upstream_state.rs"]
mod state;
#[cfg(test)]
#[path = "upstream_tests.rs"]
mod tests;
