//! The node: a branch office's Group Update Provider.
//!
//! Owns the node's wiring and its [`Role`] behind the shared client API: a heartbeat is
//! answered from the mirror (the client's group as the upstream last placed it, or its
//! install group until the upstream's answer arrives) and queued for the upstream; accepted
//! uploads go to the durable outbox. Its parts: the upstream list (`upstream`), single-flight
//! fetches into the store (`fetch`), the mirror of catalog and directory kept fresh by push or
//! pull (`mirror`), the relay of heartbeats and uploads (`relay`, `outbox`), its reports to
//! its upstream and those of the nodes behind it (`report`), eviction within the disk
//! budget (`evict`), and seeding a stopped node's store from a carried disk (`seed`). Group
//! resolution stays the manager's. It must never answer a client with bytes that did not
//! come through the store, and never ask an upstream for a digest that is not in its
//! mirrored catalog.

mod evict;
pub mod fetch;
mod mirror;
pub mod outbox;
mod relay;
mod reload;
mod repair;
pub mod report;
pub mod seed;
pub mod status_page;
pub mod upstream;
mod upstream_error;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::core::catalog::CatalogHistory;
use crate::core::config::NodeConfig;
use crate::core::credential::{EnrollRequest, Enrolled};
use crate::core::fleet::NodeReport;
use crate::core::proto::{Heartbeat, Origin, Placed, Placement, RelayedHeartbeat};
use crate::core::settings::{ConnectionMode, Directory};
use crate::http::auth::{self, Token, TokenError};
use crate::http::error::ApiError;
use crate::http::server::{self, Serving};
use crate::http::shutdown::Shutdown;
use crate::http::tls::{self, TlsError};
use crate::serve::health::Readiness;
use crate::serve::metrics::Metrics;
use crate::serve::{self, Api, Role, Served, ServedOptions};
use crate::store::{Kv, Store, StoreError};
use fetch::{Fetches, NodeFetcher};
use relay::{Relay, RelayOptions};
use upstream::{Upstream, UpstreamError};

/// Why the node could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("event outbox: {0}")]
    Outbox(#[from] outbox::OutboxError),
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error("upstream: {0}")]
    Upstream(#[from] UpstreamError),
    #[error("upstream.servers: {0}")]
    BadUpstream(String),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Internal(#[from] crate::core::fault::Internal),
}

impl NodeError {
    /// Whether the data dir cannot be used as it is (in use, newer, an unfinished restore):
    /// the operator must act (exit 2).
    pub fn is_refusal(&self) -> bool {
        matches!(self, NodeError::Store(e) if e.is_refusal())
    }
}

const CATALOG_KEY: &str = "history";
/// How long the last relay at shutdown may take.
const FINAL_RELAY: Duration = Duration::from_secs(5);
const DIRECTORY_KEY: &str = "directory";

/// A node's state.
pub struct Node {
    /// This node's id: made at its first start, kept in its store (`node`/`id`); how its
    /// upstream tells it apart from other nodes.
    id: String,
    served: Arc<Served>,
    upstream: Arc<Upstream>,
    fetches: Arc<Fetches>,
    catalog_kv: Kv,
    directory_kv: Kv,
    /// client id -> the group the upstream placed it in (or its install group until then).
    assignments: Kv,
    /// client id -> the location of its last heartbeat (its window may depend on it).
    locations: Kv,
    /// Heartbeats and uploads on their way upstream.
    relay: Relay,
    /// Reports of the nodes behind this one, on their way upstream.
    relayed: report::Relayed,
    /// `node.name` (default the host name) and the advertised URL, as reported upstream.
    name: String,
    advertised_url: Option<String>,
    /// When this node started (its reported uptime).
    started: std::time::Instant,
    /// Checked on `/v1/sync` and batches when another node uses this one as its upstream.
    node_token: auth::Accepted,
    mode: ConnectionMode,
    sync_interval: Duration,
    prefetch: bool,
    /// `upstream.prefetch_window_s`.
    prefetch_window_s: u64,
    /// `cache.max_bytes`, its watermarks and `cache.min_free_bytes` (a reload changes them).
    budget: std::sync::RwLock<evict::Budget>,
    /// `[store]`: the background scrub.
    scrub: crate::store::scrub::ScrubOptions,
    /// Wakes the prefetch worker when the mirrored catalog changed.
    catalog_changed: tokio::sync::watch::Sender<u64>,
    /// Wakes the mirror loop when the upstream pushed an event.
    upstream_event: Notify,
    shutdown: Shutdown,
    serving: Serving,
    /// The last hour of the counters the status page plots.
    history: status_page::PageHistory,
    /// TLS of the port, when it speaks TLS (a reload swaps the certificate).
    certs: Option<Arc<tls::Certs>>,
    /// The config in force (what a reload compares the file with).
    running: std::sync::Mutex<NodeConfig>,
}

impl Node {
    /// Opens the data dir and restores the mirror of an earlier run.
    pub fn open(config: &NodeConfig, shutdown: Shutdown) -> Result<Arc<Node>, NodeError> {
        let n = &config.node;
        // No records of the node's change between formats: the outbox moves an older queue
        // itself at open (it needs the lanes' counts), as it always did.
        let store = Store::open(&n.data_dir)?;
        let node_token = auth::resolve(&n.node_token, &n.node_token_file, &n.data_dir, "node")?;
        let catalog_kv = store.kv("catalog")?;
        let mut history: CatalogHistory = catalog_kv
            .get(CATALOG_KEY)?
            .unwrap_or_else(|| CatalogHistory::new(config.cache.retain_revisions));
        history.set_retain(config.cache.retain_revisions);
        let directory_kv = store.kv("settings")?;
        let directory: Directory = directory_kv.get(DIRECTORY_KEY)?.unwrap_or_default();
        let readiness = Readiness::default();
        if history.revisions().next().is_some() {
            // Ready from what we had; stale until an upstream confirms it.
            readiness.mark_restored(Utc::now());
        }
        let metrics = Arc::new(Metrics::new());
        let certs = tls::optional(&n.tls_cert, &n.tls_key)?;
        let serving = serve::serving(
            &config.limits,
            certs.as_ref().map(|c| c.acceptor.clone()),
            &metrics,
        );
        let catalog_key = match config.upstream.catalog_public_key.as_str() {
            "" => None,
            key => Some(
                crate::core::signing::PublicKey::parse(key)
                    .map_err(|e| NodeError::BadUpstream(format!("catalog_public_key: {e}")))?,
            ),
        };
        let upstream = Arc::new(Upstream::new(
            upstream::UpstreamOptions {
                list: upstream_list(config)?,
                idle_timeout: Duration::from_secs(config.upstream.idle_timeout_s),
                probe_interval: Duration::from_secs(config.upstream.sync_interval_s),
                catalog_key: catalog_key.clone(),
            },
            metrics.clone(),
        )?);
        let fetches = Arc::new(Fetches::new(
            upstream.clone(),
            store.clone(),
            metrics.clone(),
            config.upstream.max_bytes_per_sec,
            config.cache.min_free_bytes,
        ));
        let relay = Relay::open(
            &store,
            RelayOptions {
                outbox_max_bytes: config.events.outbox_max_bytes,
                max_pending_heartbeats: config.upstream.max_pending_heartbeats,
            },
            metrics.clone(),
        )?;
        let assignments = store.kv("assignments")?;
        let locations = store.kv("locations")?;
        let id = node_id(&store)?;
        let name = match n.name.as_str() {
            "" => report::host_name().unwrap_or_else(|| id.clone()),
            name => name.to_string(),
        };
        let served = Served::new(
            store,
            history,
            directory,
            metrics,
            shutdown.clone(),
            ServedOptions {
                fetcher: Some(Arc::new(NodeFetcher(fetches.clone()))),
                readiness,
                max_bytes_per_sec: config.serve.max_bytes_per_sec,
                max_concurrent_downloads: config.serve.max_concurrent_downloads,
                memory_bytes: config.cache.memory_bytes,
                memory_item_max_bytes: config.cache.memory_item_max_bytes,
                limits: config.limits.clone(),
                credential_key: catalog_key.clone(),
                deltas: config.deltas.limits(),
            },
        )?;
        Ok(Arc::new(Node {
            id,
            served: Arc::new(served),
            upstream,
            fetches,
            catalog_kv,
            directory_kv,
            assignments,
            locations,
            relay,
            relayed: report::Relayed::default(),
            name,
            advertised_url: report::advertised_url(n),
            started: std::time::Instant::now(),
            node_token: auth::Accepted::new(node_token, Token::optional(&n.node_token_previous)),
            mode: config.upstream.mode,
            sync_interval: Duration::from_secs(config.upstream.sync_interval_s),
            prefetch: config.cache.prefetch,
            prefetch_window_s: config.upstream.prefetch_window_s,
            budget: std::sync::RwLock::new(evict::Budget::of(&config.cache)),
            scrub: crate::store::scrub::ScrubOptions {
                interval: Duration::from_secs(config.store.scrub_interval_s),
                bytes_per_sec: config.store.scrub_bytes_per_sec,
            },
            catalog_changed: tokio::sync::watch::channel(0).0,
            upstream_event: Notify::new(),
            shutdown,
            serving,
            history: Default::default(),
            certs,
            running: std::sync::Mutex::new(config.clone()),
        }))
    }

    /// This node's id (made at its first start, persisted).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// All routes of the node: the client API and the status page.
    pub fn router(self: &Arc<Self>) -> Router {
        let api = Api {
            served: self.served.clone(),
            role: self.clone(),
        };
        let page = status_page::routes(self.clone());
        serve::finish(
            serve::router(api, self.node_token.clone()).merge(page),
            &self.served.metrics,
        )
    }

    /// Serves and mirrors until `shutdown`.
    pub async fn run(self: Arc<Self>, listener: TcpListener) -> Result<(), NodeError> {
        let addr = listener.local_addr()?;
        let upstreams: Vec<String> = self
            .upstream
            .servers()
            .iter()
            .map(|u| u.to_string())
            .collect();
        let proxy = self.upstream.proxy().unwrap_or_else(|| "none".into());
        tracing::info!(node_id = %self.id, %addr, ?upstreams, %proxy, mode = ?self.mode, tls = self.serving.tls.is_some(), max_connections = self.serving.limits.get().max_connections, "node listening");
        // A client's miss makes room first, as a prefetch does (the node outlives neither).
        let weak = Arc::downgrade(&self);
        self.fetches.set_room_maker(Arc::new(move |size| {
            let node = weak.clone();
            Box::pin(async move {
                if let Some(node) = node.upgrade() {
                    node.enforce_budget(size).await;
                }
            })
        }));
        let repair = repair::Repair {
            metrics: self.served.metrics.clone(),
            hot: self.served.hot.clone(),
            catalog: self.served.catalog.clone(),
            fetches: self.fetches.clone(),
        };
        let mut tasks = vec![
            tokio::spawn(
                self.served
                    .store
                    .clone()
                    .scrub_loop(self.scrub, Arc::new(repair)),
            ),
            tokio::spawn(self.clone().mirror_loop()),
            tokio::spawn(match self.certs.clone() {
                Some(c) => futures_util::future::Either::Left(tls::watch(c, tls::WATCH_INTERVAL)),
                None => futures_util::future::Either::Right(std::future::ready(())),
            }),
            tokio::spawn(self.clone().prefetch_loop()),
            tokio::spawn(self.clone().relay_loop()),
            tokio::spawn(self.clone().evict_loop()),
            tokio::spawn(self.clone().critical_loop()),
            tokio::spawn(self.clone().sample_loop()),
        ];
        if self.mode == ConnectionMode::Push {
            tasks.push(tokio::spawn(self.clone().push_loop()));
        }
        // Hot blobs on plain connections are answered without the router (issue 23).
        let serving = Serving {
            fast: Some(serve::fast::fast_path(self.served.clone())),
            ..self.serving.clone()
        };
        server::run(
            listener,
            self.router(),
            self.shutdown.clone().wait(),
            serving,
        )
        .await?;
        // One last relay so heartbeats received just before shutdown are not lost (events
        // are durable in the outbox and go at the next start if not now), bounded in time:
        // a long queue must not hold the shutdown.
        let last = async {
            self.relay_once().await;
            self.forward(false, Some(FINAL_RELAY)).await;
        };
        if tokio::time::timeout(FINAL_RELAY, last).await.is_err() {
            tracing::info!(
                "stopping with heartbeats or events still to relay; they go at the next start"
            );
        }
        for t in tasks {
            t.abort();
        }
        self.served.store.flush().await?;
        tracing::info!("node stopped");
        Ok(())
    }

    /// The group a client is in as far as this node knows: the upstream's last answer, else
    /// its install group.
    fn group_of(&self, dir: &Directory, client_id: &str, install_group: Option<&str>) -> String {
        match self.assignments.get::<String>(client_id).ok().flatten() {
            Some(g) => dir.resolve_group(&g).to_string(),
            None => dir.resolve_group(install_group.unwrap_or("")).to_string(),
        }
    }

    /// Records a client's location when it changed.
    fn remember_location(&self, client_id: &str, location: Option<&str>) {
        let known: Option<String> = self.locations.get(client_id).ok().flatten();
        if known.as_deref() != location {
            let r = match location {
                Some(l) => self.locations.put(client_id, &l.to_string()),
                None => self.locations.remove(client_id),
            };
            if let Err(e) = r {
                tracing::warn!(error = %e, "could not record a client's location");
            }
        }
    }
}

/// The node's upstream list as `[upstream]` and the flags give it: each server with its own
/// token (or token file), else the list's default; the proxy; the CA file. Read at start and
/// at every reload (token files are read here, so a bad one fails the reload whole).
fn upstream_list(config: &NodeConfig) -> Result<upstream::ListOptions, NodeError> {
    let file = |f: &str| (!f.is_empty()).then(|| std::path::PathBuf::from(f));
    let token_of = |token: &str, token_file: &str| -> Result<Option<Token>, NodeError> {
        Ok(if !token.is_empty() {
            Some(Token::new(token))
        } else if let Some(f) = file(token_file) {
            Some(auth::read_token_file(&f)?)
        } else {
            None
        })
    };
    let default_token = token_of(&config.upstream.token, &config.upstream.token_file)?;
    let servers = config
        .upstreams()
        .iter()
        .map(|s| {
            let url = crate::core::config::validate_url(&s.url).map_err(NodeError::BadUpstream)?;
            let token = match s.has_own_token() {
                true => token_of(&s.token, &s.token_file)?,
                false => default_token.clone(),
            };
            Ok(upstream::Server { url, token })
        })
        .collect::<Result<Vec<_>, NodeError>>()?;
    let proxy = match config.upstream.proxy.as_str() {
        "" => upstream::ProxyChoice::Environment,
        url => upstream::ProxyChoice::Configured(url.to_string()),
    };
    Ok(upstream::ListOptions {
        servers,
        proxy,
        ca_file: file(&config.upstream.ca_file),
    })
}

/// The node's id from its store, made (`node-` and 16 random hex digits) and kept at the
/// first start.
fn node_id(store: &Store) -> Result<String, StoreError> {
    let kv = store.kv("node")?;
    if let Some(id) = kv.get::<String>("id")? {
        return Ok(id);
    }
    let id = format!("node-{}", hex::encode(rand::random::<[u8; 8]>()));
    kv.put("id", &id)?;
    Ok(id)
}

impl Role for Node {
    fn heartbeat(
        &self,
        hb: &Heartbeat,
        origin: Origin,
        now: DateTime<Utc>,
    ) -> Result<Placement, ApiError> {
        let group = {
            let dir = self.served.directory()?;
            self.group_of(&dir, &hb.client_id, hb.install_group.as_deref())
        };
        // Until the upstream's answer arrives, the install group is this node's answer; the
        // stream filter, the slot gate and later heartbeats read it from here.
        if self.assignments.get::<String>(&hb.client_id)?.is_none() {
            self.assignments.put(&hb.client_id, &group)?;
        }
        self.remember_location(&hb.client_id, hb.location());
        // The nearest node stamps itself, and the first server's time travels on.
        self.relay.queue(RelayedHeartbeat {
            heartbeat: hb.clone(),
            address: origin.address,
            via: origin.via.or_else(|| Some(self.id.clone())),
            received_at: origin.received_at.or(Some(now)),
        });
        Ok(Placement {
            group,
            location: hb.location().map(str::to_string),
        })
    }

    fn placement(&self, client_id: &str) -> Option<Placement> {
        let assigned: String = self.assignments.get(client_id).ok().flatten()?;
        let group = match self.served.directory() {
            Ok(dir) => dir.resolve_group(&assigned).to_string(),
            Err(_) => assigned,
        };
        Some(Placement {
            group,
            location: self.locations.get(client_id).ok().flatten(),
        })
    }

    fn reports(&self, reports: Vec<NodeReport>, _now: DateTime<Utc>) -> Result<(), ApiError> {
        self.keep_reports(reports);
        Ok(())
    }

    fn accept(&self, uploads: Vec<Placed>) -> BoxFuture<'_, Result<(), ApiError>> {
        Box::pin(async move {
            self.enqueue(&uploads).await?;
            Ok(())
        })
    }

    fn enroll<'a>(
        &'a self,
        client_id: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Enrolled, ApiError>> {
        Box::pin(async move {
            let req = EnrollRequest {
                client_id: client_id.to_string(),
                token: token.to_string(),
            };
            Ok(self.upstream.enroll(&req).await?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_keeps_the_id_it_made_at_its_first_start() {
        let dir = tempfile::tempdir().unwrap();
        let first = node_id(&Store::open(dir.path()).unwrap()).unwrap();
        assert!(first.starts_with("node-") && first.len() == 21, "{first}");
        let again = node_id(&Store::open(dir.path()).unwrap()).unwrap();
        assert_eq!(first, again);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(first, node_id(&Store::open(other.path()).unwrap()).unwrap());
    }
}
