//! Layer 4: the one client API that manager and node both serve.
//!
//! Owns every client endpoint — heartbeat, catalog, content, deltas, settings, policy, stream,
//! events, applications, `/v1/sync` and the node-token batches — written once over a
//! [`Role`], the narrow interface that says where a role places clients and where accepted
//! uploads go. Both roles answer heartbeats with the same settings and the same
//! `download_slot`, gate content with the same slot policy (`core::slots`), and file events
//! under the same placement. It reads blobs from `store` only; when a blob in the catalog is
//! missing it asks the role's [`content::Fetcher`] (a node's upstream) to bring it into the
//! store. The `[limits]` it enforces itself (push streams and new client ids per address,
//! stream age) change live on a reload ([`set_limits`], which also hands the connection limits
//! to the accept loop's [`crate::http::limits::LiveLimits`]). It must never talk to an
//! upstream itself, never write to the store but the deltas it computes (`delta`), and never
//! serve a digest that is neither in a retained catalog revision nor a delta to an item of one.

pub mod clients;
pub mod conditional;
pub mod content;
pub mod delta;
pub mod documents;
pub mod fast;
pub mod health;
pub mod identity;
pub mod limit;
pub mod metrics;
pub mod stream;

use std::sync::{Arc, RwLock};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;

use crate::core::catalog::CatalogHistory;
use crate::core::credential::Enrolled;
use crate::core::digest::{Digest, DigestError};
use crate::core::fault::{Fault, Internal, Kind};
use crate::core::fleet::NodeReport;
use crate::core::proto::{Heartbeat, Origin, Placed, Placement, BATCH_LIMIT, BODY_LIMIT};
use crate::core::settings::Directory;
use crate::core::slots::{SlotLog, SlotRecord, Slots};
use crate::http::auth;
use crate::http::error::{ApiError, Refused};
use crate::http::shutdown::Shutdown;
use crate::store::hot::HotBlobs;
use crate::store::{Kv, Store};

/// What differs between the roles behind the one client API.
pub trait Role: Send + Sync + 'static {
    /// Places a client from its heartbeat (validated) and records it: the manager resolves
    /// its group in the registry; a node answers from its mirror and queues the heartbeat
    /// for its upstream.
    fn heartbeat(
        &self,
        hb: &Heartbeat,
        origin: Origin,
        now: DateTime<Utc>,
    ) -> Result<Placement, ApiError>;

    /// Takes validated reports of downstream nodes (`POST /v1/node/reports`): the manager
    /// records them in its node table; a node keeps the latest of each to relay upward,
    /// stamping itself as `via` where none is set.
    fn reports(&self, reports: Vec<NodeReport>, now: DateTime<Utc>) -> Result<(), ApiError>;

    /// Where a client is as this server knows it; None for a client it never placed.
    fn placement(&self, client_id: &str) -> Option<Placement>;

    /// Takes validated uploads durably: returns only once they survive a crash. The manager
    /// stores them (and raises notifications); a node queues them for its upstream.
    fn accept(&self, uploads: Vec<Placed>) -> BoxFuture<'_, Result<(), ApiError>>;

    /// Enrols a client with an enrolment token: the manager checks the token and issues the
    /// credential (durably); a node relays the enrolment upstream (503 while none answers).
    fn enroll<'a>(
        &'a self,
        client_id: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Enrolled, ApiError>>;
}

/// What the client API reads: one server's mirror or source of truth.
pub struct Served {
    pub store: Store,
    pub catalog: Arc<RwLock<CatalogHistory>>,
    /// Groups, settings and policies (the manager's own, or a node's mirror).
    pub directory: Arc<RwLock<Directory>>,
    /// Push notifications of this server.
    pub changes: Arc<stream::Changes>,
    pub metrics: Arc<metrics::Metrics>,
    pub readiness: Arc<health::Readiness>,
    /// Download slots of this server's clients.
    pub slots: Slots,
    /// Prefetch slots of the nodes that use this server as their upstream (`node_slots`).
    pub node_slots: Slots,
    /// None on the manager: what is in its catalog is in its store.
    pub fetcher: Option<Arc<dyn content::Fetcher>>,
    /// The budget all content responses share (`serve.max_bytes_per_sec`).
    pub lan: limit::ByteLimiter,
    /// `serve.max_concurrent_downloads` (None: unlimited).
    pub downloads: Option<Arc<tokio::sync::Semaphore>>,
    /// Small, often-read blobs in memory (`cache.memory_bytes`).
    pub hot: Arc<HotBlobs>,
    /// The current catalog's wire bytes and their ETag, serialized once per revision.
    pub catalog_body: RwLock<Option<(String, bytes::Bytes)>>,
    /// Ends push streams at shutdown.
    pub shutdown: Shutdown,
    /// Push streams each client address holds (`limits.max_streams_per_address`).
    pub streams: Arc<crate::http::slot::PerAddress>,
    /// Client ids each address may introduce (`limits.new_clients_per_minute`).
    pub newcomers: Newcomers,
    /// The credential check of client calls.
    pub identity: identity::Gate,
    /// Download starts of the current revision, for the status page.
    pub starts: crate::core::starts::Starts,
    /// The delta engine (`deltas.*`): edge deltas, and the manager's listed ones.
    pub deltas: Arc<delta::Deltas>,
}

/// How fast one address may introduce client ids this server never placed: a keyed rate
/// limiter (governor), its idle addresses forgotten now and then so it stays small. Its rate
/// can change while it is in use ([`Newcomers::set_per_minute`], a config reload).
pub struct Newcomers {
    rate: RwLock<NewcomerRate>,
    checks: std::sync::atomic::AtomicU64,
}

/// One rate's limiter (None: no limit).
struct NewcomerRate {
    limiter: Option<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>,
    per_minute: u32,
}

impl NewcomerRate {
    fn new(per_minute: u32) -> NewcomerRate {
        NewcomerRate {
            limiter: std::num::NonZeroU32::new(per_minute)
                .map(|n| governor::RateLimiter::keyed(governor::Quota::per_minute(n))),
            per_minute,
        }
    }
}

impl Newcomers {
    fn new(per_minute: u32) -> Newcomers {
        Newcomers {
            rate: RwLock::new(NewcomerRate::new(per_minute)),
            checks: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// From now on, `per_minute` per address (0: no limit); a no-op when it is the rate
    /// already. A new rate starts every address afresh (what each introduced under the old
    /// one is forgotten).
    pub fn set_per_minute(&self, per_minute: u32) {
        let mut rate = match self.rate.write() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if rate.per_minute != per_minute {
            *rate = NewcomerRate::new(per_minute);
        }
    }

    /// Whether `addr` may introduce one more client id now.
    pub fn admit(&self, addr: std::net::IpAddr) -> Result<(), ServeError> {
        let rate = match self.rate.read() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        let Some(limiter) = &rate.limiter else {
            return Ok(());
        };
        let n = self
            .checks
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % 1024 == 1023 {
            limiter.retain_recent();
        }
        limiter
            .check_key(&addr)
            .map_err(|_| ServeError::TooManyNewClients {
                retry_after_s: (60 / rate.per_minute.max(1) as u64).max(1),
            })
    }
}

/// The parts of a [`Served`] each role chooses.
pub struct ServedOptions {
    pub fetcher: Option<Arc<dyn content::Fetcher>>,
    pub readiness: health::Readiness,
    pub max_bytes_per_sec: u64,
    pub max_concurrent_downloads: usize,
    pub memory_bytes: u64,
    pub memory_item_max_bytes: u64,
    /// The `[limits]` the client API enforces itself (push streams and new client ids per
    /// address, stream age).
    pub limits: crate::core::config::LimitsSection,
    /// The key client credentials verify with, when this server was given one (None: the
    /// one the mirrored directory names).
    pub credential_key: Option<crate::core::signing::PublicKey>,
    /// How deltas are computed here (`[deltas]`).
    pub deltas: crate::core::config::DeltaLimits,
}

impl Served {
    /// The client API's state over `store`, with the catalog and directory a role loaded.
    pub fn new(
        store: Store,
        catalog: CatalogHistory,
        directory: Directory,
        metrics: Arc<metrics::Metrics>,
        shutdown: Shutdown,
        opts: ServedOptions,
    ) -> Result<Served, crate::store::StoreError> {
        let slots = Slots::new(Box::new(KvSlotLog(store.kv("slots")?)));
        let node_slots = Slots::new(Box::new(KvSlotLog(store.kv("node_slots")?)));
        let limits = &opts.limits;
        let deltas = Arc::new(delta::Deltas::new(
            store.clone(),
            opts.deltas,
            metrics.clone(),
        )?);
        Ok(Served {
            deltas,
            streams: crate::http::slot::PerAddress::new(limits.max_streams_per_address),
            newcomers: Newcomers::new(limits.new_clients_per_minute),
            identity: identity::Gate::new(opts.credential_key.clone()),
            catalog: Arc::new(RwLock::new(catalog)),
            directory: Arc::new(RwLock::new(directory)),
            changes: Arc::new(stream::Changes::new(
                metrics.stream_clients.clone(),
                std::time::Duration::from_secs(limits.stream_max_age_s),
            )),
            readiness: Arc::new(opts.readiness),
            slots,
            node_slots,
            fetcher: opts.fetcher,
            lan: limit::ByteLimiter::new(opts.max_bytes_per_sec),
            downloads: (opts.max_concurrent_downloads > 0)
                .then(|| Arc::new(tokio::sync::Semaphore::new(opts.max_concurrent_downloads))),
            hot: Arc::new(HotBlobs::new(opts.memory_bytes, opts.memory_item_max_bytes)),
            catalog_body: RwLock::new(None),
            starts: crate::core::starts::Starts::default(),
            store,
            metrics,
            shutdown,
        })
    }

    /// The catalog history, read-locked.
    pub fn catalog(&self) -> Result<std::sync::RwLockReadGuard<'_, CatalogHistory>, Internal> {
        self.catalog
            .read()
            .map_err(|_| Internal::poisoned("catalog"))
    }

    /// Forgets the client and node slots of revisions older than `oldest` (no longer
    /// retained).
    pub fn prune_slots(&self, oldest: u64) -> Result<(), crate::core::slots::SlotError> {
        self.slots.prune(oldest)?;
        self.node_slots.prune(oldest)
    }

    /// The directory, read-locked.
    pub fn directory(&self) -> Result<std::sync::RwLockReadGuard<'_, Directory>, Internal> {
        self.directory
            .read()
            .map_err(|_| Internal::poisoned("directory"))
    }

    /// Puts the `[limits]` the client API enforces itself in force (a config reload): push
    /// streams per address and new client ids per minute for what arrives from now on, the
    /// age of streams started from now on. Streams open keep their place and their age.
    pub fn set_limits(&self, limits: &crate::core::config::LimitsSection) {
        self.streams.set_max(limits.max_streams_per_address);
        self.newcomers.set_per_minute(limits.new_clients_per_minute);
        self.changes
            .set_max_age(std::time::Duration::from_secs(limits.stream_max_age_s));
    }
}

/// Puts a reloaded `[limits]` in force, all but `threads` (the serving threads are built at
/// start), and records in `running` what now is: connections accepted from now on are
/// admitted and served by the new values and the client API's own limits change
/// ([`Served::set_limits`]); nothing open is closed. A `max_connections` of 0 derives again
/// from the open-file limit now in force.
pub fn set_limits(
    served: &Served,
    serving: &crate::http::server::Serving,
    running: &mut crate::core::config::LimitsSection,
    new: &crate::core::config::LimitsSection,
) {
    served.set_limits(new);
    serving
        .limits
        .set(crate::http::limits::Limits::from_section(
            new,
            crate::sys::open_file_limit(),
        ));
    *running = crate::core::config::LimitsSection {
        threads: running.threads,
        ..new.clone()
    };
}

/// The state every client route sees: the served data and the role behind it.
#[derive(Clone)]
pub struct Api {
    pub served: Arc<Served>,
    pub role: Arc<dyn Role>,
}

/// Every client route, the node-token routes behind `node_token`, and JSON answers for
/// unknown endpoints and methods. A role merges its own routes (the manager's admin API) in
/// before calling [`finish`].
pub fn router(api: Api, node_token: auth::Accepted) -> Router {
    let open = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/v1/catalog", get(documents::catalog))
        .route("/v1/content/{sha256}", get(content::content))
        .route("/v1/delta/{from}/{to}", get(delta::delta))
        .route("/v1/groups/{group}/settings", get(documents::settings))
        .route("/v1/groups/{group}/policy", get(documents::policy))
        .route("/v1/heartbeat", post(clients::heartbeat))
        .route("/v1/events", post(clients::events))
        .route("/v1/applications", post(clients::applications))
        .route("/v1/stream", get(clients::stream))
        .layer(DefaultBodyLimit::max(BODY_LIMIT));
    let nodes = Router::new()
        .route("/v1/sync", get(documents::sync))
        .route("/v1/node/heartbeats", post(clients::node_heartbeats))
        .route("/v1/node/events", post(clients::node_events))
        .route("/v1/node/enroll", post(clients::node_enroll))
        .route("/v1/node/slot", post(clients::node_slot))
        .route("/v1/node/reports", post(clients::node_reports))
        .layer(DefaultBodyLimit::max(BATCH_LIMIT));
    open.merge(auth::require(nodes, node_token, "node"))
        .with_state(api)
}

/// JSON 404 and 405 for a role's whole router, and every request's time to its response
/// head in `gup_request_duration_seconds{route}` (push streams served lean bypass it).
pub fn finish(router: Router, metrics: &Arc<metrics::Metrics>) -> Router {
    let metrics = metrics.clone();
    router
        .fallback(|| async { ApiError::from(Refused::NoEndpoint) })
        .method_not_allowed_fallback(|| async { ApiError::from(Refused::Method) })
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let metrics = metrics.clone();
                async move {
                    let route = req
                        .extensions()
                        .get::<axum::extract::MatchedPath>()
                        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
                    let started = std::time::Instant::now();
                    let response = next.run(req).await;
                    metrics.request_took(&route, started.elapsed().as_secs_f64());
                    response
                }
            },
        ))
}

/// How a role serves its connections: its `[limits]` (live: [`set_limits`]), TLS, push
/// streams served lean, and refused connections counted in `gup_refused_total`.
pub fn serving(
    limits: &crate::core::config::LimitsSection,
    tls: Option<crate::http::tls::Tls>,
    metrics: &Arc<metrics::Metrics>,
) -> crate::http::server::Serving {
    let metrics = metrics.clone();
    crate::http::server::Serving {
        limits: crate::http::limits::LiveLimits::new(crate::http::limits::Limits::from_section(
            limits,
            crate::sys::open_file_limit(),
        )),
        tls,
        lean: Some(lean()),
        // Set by the role once its served state exists (`fast::fast_path`).
        fast: None,
        on_refused: Some(Arc::new(move |limit| {
            metrics.refused(limit).inc();
        })),
    }
}

/// The connections served without hyper: push streams (`GET /v1/stream`).
pub fn lean() -> crate::http::server::Lean {
    crate::http::server::Lean {
        peek: 15,
        matches: |first| {
            first.starts_with(b"GET /v1/stream?") || first.starts_with(b"GET /v1/stream ")
        },
    }
}

/// What the client API refuses on its own account.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    #[error("{given:?}: {reason}")]
    BadDigest { given: String, reason: DigestError },
    #[error("{0} is not in the catalog")]
    NotInCatalog(Digest),
    #[error("no group {0:?}")]
    NoGroup(String),
    #[error("{0}")]
    BadName(String),
    #[error("this server has not synced with an upstream yet")]
    NotReady,
    #[error("this server is at serve.max_concurrent_downloads; retry shortly")]
    AtCapacity { retry_after_s: u64 },
    #[error("{0}")]
    LearningOff(String),
    #[error("the blob has {0} bytes")]
    RangeNotSatisfiable(u64),
    #[error("{0} is in the catalog but not in the store (lost, or found corrupt by the scrub and quarantined: publish its bytes again)")]
    NotStored(Digest),
    #[error("this address holds as many push streams as limits.max_streams_per_address allows")]
    TooManyStreams,
    #[error("this address introduced as many new client ids as limits.new_clients_per_minute allows; retry later")]
    TooManyNewClients { retry_after_s: u64 },
}

impl Fault for ServeError {
    fn kind(&self) -> Kind {
        match self {
            ServeError::BadDigest { .. } | ServeError::BadName(_) => Kind::BadInput,
            ServeError::NotInCatalog(_) | ServeError::NoGroup(_) => Kind::NotFound,
            ServeError::NotReady => Kind::Unavailable { retry_after_s: 5 },
            ServeError::AtCapacity { retry_after_s } => Kind::Unavailable {
                retry_after_s: *retry_after_s,
            },
            ServeError::LearningOff(_) => Kind::Forbidden,
            ServeError::RangeNotSatisfiable(len) => Kind::RangeNotSatisfiable { len: *len },
            ServeError::NotStored(_) => Kind::Local,
            ServeError::TooManyStreams => Kind::Unavailable { retry_after_s: 60 },
            ServeError::TooManyNewClients { retry_after_s } => Kind::TooEarly {
                retry_after_s: *retry_after_s,
            },
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ServeError::BadDigest { .. } => "bad_digest",
            ServeError::BadName(_) => "bad_request",
            ServeError::NotInCatalog(_) => "not_in_catalog",
            ServeError::NoGroup(_) => "not_found",
            ServeError::NotReady => "not_ready",
            ServeError::AtCapacity { .. } => "unavailable",
            ServeError::LearningOff(_) => "learning_off",
            ServeError::RangeNotSatisfiable(_) => "range_not_satisfiable",
            ServeError::NotStored(_) => "not_stored",
            ServeError::TooManyStreams => "too_many_streams",
            ServeError::TooManyNewClients { .. } => "too_many_new_clients",
        }
    }
}

/// Slot records in the store's key-value index: `<revision:020>/<client>` -> record.
pub struct KvSlotLog(pub Kv);

fn slot_key(revision: u64, client: &str) -> String {
    format!("{revision:020}/{client}")
}

impl SlotLog for KvSlotLog {
    fn load(&self, revision: u64) -> Result<Vec<(String, SlotRecord)>, String> {
        let prefix = format!("{revision:020}/");
        let records = self
            .0
            .scan::<SlotRecord>(&prefix)
            .map_err(|e| e.to_string())?;
        Ok(records
            .into_iter()
            .filter_map(|(k, r)| Some((k.split_once('/')?.1.to_string(), r)))
            .collect())
    }

    fn save(&self, revision: u64, client: &str, record: &SlotRecord) -> Result<(), String> {
        self.0
            .put(&slot_key(revision, client), record)
            .map_err(|e| e.to_string())
    }

    fn prune(&self, oldest: u64) -> Result<(), String> {
        let keep_from = slot_key(oldest, "");
        for (k, _) in self.0.scan::<SlotRecord>("").map_err(|e| e.to_string())? {
            if k < keep_from {
                self.0.remove(&k).map_err(|e| e.to_string())?;
            } else {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_rate_of_newcomers_applies_at_once() {
        let n = Newcomers::new(1);
        let a: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        assert!(n.admit(a).is_ok());
        assert!(n.admit(a).is_err(), "one per minute");
        n.set_per_minute(0);
        assert!((0..100).all(|_| n.admit(a).is_ok()), "0: no limit");
        n.set_per_minute(2);
        assert!(n.admit(a).is_ok() && n.admit(a).is_ok());
        assert!(n.admit(a).is_err(), "two per minute");
        n.set_per_minute(2);
        assert!(n.admit(a).is_err(), "the same rate: nothing forgotten");
    }

    #[test]
    fn slot_records_survive_a_reopen_and_prune_drops_only_old_revisions() {
        let dir = tempfile::tempdir().unwrap();
        let record = SlotRecord {
            window_s: 60,
            offset_ms: 1234,
            pass: false,
        };
        {
            let store = Store::open(dir.path()).unwrap();
            let log = KvSlotLog(store.kv("slots").unwrap());
            log.save(1, "a/b", &record).unwrap();
            log.save(2, "c", &record).unwrap();
            log.save(10, "d", &record).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let log = KvSlotLog(store.kv("slots").unwrap());
        assert_eq!(log.load(1).unwrap(), vec![("a/b".to_string(), record)]);
        log.prune(2).unwrap();
        assert!(log.load(1).unwrap().is_empty());
        assert_eq!(log.load(2).unwrap().len(), 1);
        assert_eq!(log.load(10).unwrap().len(), 1, "revision 10 sorts after 2");
    }
}
