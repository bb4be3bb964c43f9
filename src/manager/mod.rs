//! The management server: the source of truth nodes mirror.
//!
//! Owns the manager's state (catalog history, published blobs through `store`, the settings
//! directory, the client registry, the node table, the event records, the application
//! inventory, tokens, the catalog signing key), its [`Role`] behind the shared client API
//! (heartbeats resolve groups in the registry, node reports go to the node table, uploads
//! are stored and raise notifications, and are deleted past their retention), the admin API
//! behind the admin token, and the bound on what a directory change may make of the
//! `/v1/sync` snapshot. It must never fetch from anywhere: nothing is upstream of the
//! manager.

mod admin;
pub mod applications;
pub mod backup;
mod deltas;
pub mod enrol;
pub mod events;
mod migrate;
pub mod nodes;
pub mod notices;
pub mod page;
mod publish;
pub mod registry;
mod reload;
pub mod retention;
pub mod session;
pub mod status_page;
mod upkeep;

use std::sync::{Arc, RwLock};

use axum::Router;
use chrono::{DateTime, Utc};
use futures_util::future::BoxFuture;
use tokio::net::TcpListener;

use crate::core::catalog::CatalogHistory;
use crate::core::config::ManagerConfig;
use crate::core::credential::Enrolled;
use crate::core::fault::Internal;
use crate::core::fleet::NodeReport;
use crate::core::proto::{Change, Heartbeat, Origin, Placed, Placement, Snapshot, Upload};
use crate::core::settings::Directory;
use crate::http::auth::{self, Token, TokenError};
use crate::http::error::ApiError;
use crate::http::server::{self, Serving};
use crate::http::shutdown::Shutdown;
use crate::http::tls::{self, TlsError};
use crate::serve::health::Readiness;
use crate::serve::metrics::Metrics;
use crate::serve::{self, Api, Role, Served, ServedOptions};
use crate::store::{Kv, Store, StoreError};
use applications::{AppsError, Inventory};
use events::{EventStore, EventsError, Notification};
use registry::{Registry, RegistryError};

use crate::core::proto::MAX_SNAPSHOT_BYTES;
pub use admin::Oversized;

/// A testing knob, deliberately not in the config: entries one listing request visits at
/// most (`page::SCAN_LIMIT` without it), so that end-to-end tests can see short pages
/// without storing 50,000 events.
const SCAN_LIMIT_ENV: &str = "GUP_TEST_SCAN_LIMIT";

/// Why the manager could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("token: {0}")]
    Token(#[from] TokenError),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error("clients: {0}")]
    Registry(#[from] RegistryError),
    #[error("events: {0}")]
    Events(#[from] EventsError),
    #[error("applications: {0}")]
    Apps(#[from] AppsError),
    #[error("tls: {0}")]
    Tls(#[from] TlsError),
    #[error("{0}")]
    Signing(#[from] crate::core::signing::SignError),
    #[error("enrolment: {0}")]
    Enrol(#[from] enrol::EnrolError),
    #[error("nodes: {0}")]
    Nodes(#[from] nodes::NodesError),
}

impl ManagerError {
    /// Whether the data dir cannot be used as it is (in use, newer, an unfinished restore):
    /// the operator must act (exit 2).
    pub fn is_refusal(&self) -> bool {
        matches!(self, ManagerError::Store(e) if e.is_refusal())
    }
}

const CATALOG_KEY: &str = "history";
const DIRECTORY_KEY: &str = "directory";

/// A running manager's state.
pub struct Manager {
    served: Arc<Served>,
    catalog_kv: Kv,
    directory_kv: Kv,
    registry: Registry,
    /// The latest report of every node below this manager (`GET /v1/admin/nodes`).
    nodes: nodes::NodeTable,
    enrolment: enrol::Enrolment,
    events: EventStore,
    /// How long and how many events are kept (`[events]`), enforced by
    /// [`Manager::expire_loop`].
    retention: retention::Retention,
    apps: Inventory,
    http: reqwest::Client,
    webhook: Option<String>,
    admin_token: auth::Accepted,
    node_token: auth::Accepted,
    /// Serializes catalog changes with their persistence, so revisions hit disk in order.
    publish_lock: tokio::sync::Mutex<()>,
    /// Signs each catalog revision.
    catalog_key: crate::core::signing::CatalogKey,
    /// Serializes directory changes with their persistence.
    admin_lock: tokio::sync::Mutex<()>,
    shutdown: Shutdown,
    serving: Serving,
    /// Logins of the status page.
    sessions: session::Sessions,
    /// The last hour of the counters the status page plots.
    history: status_page::PageHistory,
    /// Clients per group as last counted for the status page.
    tally: RwLock<status_page::Tally>,
    /// Wakes the garbage collection after a catalog change (`upkeep`).
    catalog_changed: tokio::sync::Notify,
    /// Wakes the listing of deltas after a publish (`deltas`).
    deltas_wanted: tokio::sync::Notify,
    /// `deltas.from_versions`: the earlier versions a new one gets a delta from.
    delta_from_versions: usize,
    /// `[store]`: the background scrub.
    scrub: crate::store::scrub::ScrubOptions,
    /// TLS of the port, when it speaks TLS (a reload swaps the certificate).
    certs: Option<Arc<tls::Certs>>,
    /// The config in force (what a reload compares the file with).
    running: std::sync::Mutex<ManagerConfig>,
}

/// Tokens a manager uses, resolved from config, files, or its data dir.
pub fn tokens(config: &ManagerConfig) -> Result<(Token, Token), TokenError> {
    let m = &config.manager;
    let admin = auth::resolve(&m.admin_token, &m.admin_token_file, &m.data_dir, "admin")?;
    let node = auth::resolve(&m.node_token, &m.node_token_file, &m.data_dir, "node")?;
    Ok((admin, node))
}

impl Manager {
    /// Opens the data dir: store, catalog, directory, registry, events, tokens.
    pub fn open(config: &ManagerConfig, shutdown: Shutdown) -> Result<Arc<Manager>, ManagerError> {
        let m = &config.manager;
        let store = Store::open_with(&m.data_dir, &migrate::upgrade)?;
        let (admin_token, node_token) = tokens(config)?;
        let catalog_kv = store.kv("catalog")?;
        let mut history: CatalogHistory = catalog_kv
            .get(CATALOG_KEY)?
            .unwrap_or_else(|| CatalogHistory::new(m.retain_revisions));
        history.set_retain(m.retain_revisions);
        let catalog_key = crate::core::signing::CatalogKey::load_or_create(&m.data_dir)?;
        history.sign_current(|c| catalog_key.sign(c));
        let directory_kv = store.kv("settings")?;
        let mut directory: Directory = directory_kv.get(DIRECTORY_KEY)?.unwrap_or_default();
        // Nodes learn the key credentials verify with from the directory they mirror.
        directory.credential_key = Some(catalog_key.public_hex());
        let scan_limit = std::env::var(SCAN_LIMIT_ENV)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(page::SCAN_LIMIT);
        let registry = Registry::open(&store)?.with_scan_limit(scan_limit);
        let enrolment = enrol::Enrolment::open(&store)?;
        let node_table = nodes::NodeTable::open(&store)?;
        let events = EventStore::open(&store)?.with_scan_limit(scan_limit);
        let apps = Inventory::open(&store)?.with_scan_limit(scan_limit);
        let metrics = Arc::new(Metrics::new());
        metrics.event_conflicts.inc_by(events.conflicts()?);
        let certs = tls::optional(&m.tls_cert, &m.tls_key)?;
        let serving = serve::serving(
            &config.limits,
            certs.as_ref().map(|c| c.acceptor.clone()),
            &metrics,
        );
        tracing::info!(
            revision = history.revision(),
            blobs = store.list().len(),
            groups = directory.groups.len(),
            "manager state loaded"
        );
        let served = Served::new(
            store,
            history,
            directory,
            metrics,
            shutdown.clone(),
            ServedOptions {
                fetcher: None,
                readiness: Readiness::ready(),
                max_bytes_per_sec: 0,
                max_concurrent_downloads: 0,
                memory_bytes: crate::core::config::DEFAULT_MEMORY_BYTES,
                memory_item_max_bytes: crate::core::config::DEFAULT_MEMORY_ITEM_MAX_BYTES,
                limits: config.limits.clone(),
                credential_key: Some(catalog_key.public()),
                deltas: config.deltas.limits(),
            },
        )?;
        Ok(Arc::new(Manager {
            served: Arc::new(served),
            catalog_kv,
            directory_kv,
            registry,
            nodes: node_table,
            enrolment,
            events,
            retention: retention::Retention::from(&config.events),
            apps,
            http: reqwest::Client::new(),
            webhook: (!config.notifications.webhook_url.is_empty())
                .then(|| config.notifications.webhook_url.clone()),
            admin_token: auth::Accepted::new(admin_token, Token::optional(&m.admin_token_previous)),
            node_token: auth::Accepted::new(node_token, Token::optional(&m.node_token_previous)),
            publish_lock: tokio::sync::Mutex::new(()),
            catalog_key,
            admin_lock: tokio::sync::Mutex::new(()),
            shutdown,
            serving,
            sessions: Default::default(),
            history: Default::default(),
            tally: Default::default(),
            catalog_changed: tokio::sync::Notify::new(),
            deltas_wanted: tokio::sync::Notify::new(),
            delta_from_versions: config.deltas.from_versions,
            scrub: crate::store::scrub::ScrubOptions {
                interval: std::time::Duration::from_secs(config.store.scrub_interval_s),
                bytes_per_sec: config.store.scrub_bytes_per_sec,
            },
            certs,
            running: std::sync::Mutex::new(config.clone()),
        }))
    }

    /// All routes of the manager: the client API and the admin API behind the admin token.
    pub fn router(self: &Arc<Self>) -> Router {
        let api = Api {
            served: self.served.clone(),
            role: self.clone(),
        };
        let admin = auth::require(
            admin::routes(self.clone()),
            self.admin_token.clone(),
            "admin",
        );
        let page = status_page::routes(self.clone());
        serve::finish(
            serve::router(api, self.node_token.clone())
                .merge(admin)
                .merge(page),
            &self.served.metrics,
        )
    }

    /// Serves until `shutdown`, then flushes the store.
    pub async fn run(self: Arc<Self>, listener: TcpListener) -> Result<(), ManagerError> {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, tls = self.serving.tls.is_some(), max_connections = self.serving.limits.get().max_connections, "manager listening");
        let upkeep = upkeep::Upkeep(Arc::downgrade(&self));
        let tasks = [
            tokio::spawn(
                self.served
                    .store
                    .clone()
                    .scrub_loop(self.scrub, Arc::new(upkeep)),
            ),
            tokio::spawn(self.clone().collect_loop()),
            tokio::spawn(self.clone().deltas_loop()),
            tokio::spawn(match self.certs.clone() {
                Some(c) => futures_util::future::Either::Left(tls::watch(c, tls::WATCH_INTERVAL)),
                None => futures_util::future::Either::Right(std::future::ready(())),
            }),
            tokio::spawn(self.clone().overdue_loop()),
            tokio::spawn(self.clone().sample_loop()),
            tokio::spawn(self.clone().tally_loop()),
            tokio::spawn(self.clone().expire_loop()),
        ];
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
        for t in tasks {
            t.abort();
        }
        self.served.store.flush().await?;
        self.registry.flush().await?;
        self.nodes.flush().await?;
        tracing::info!("manager stopped");
        Ok(())
    }

    /// The public half of the catalog signing key (hex).
    pub fn catalog_public_key(&self) -> String {
        self.catalog_key.public_hex()
    }

    /// Applies `f` to the directory, persists the result durably, then pushes the changes
    /// `f` reports. Nothing changes when `f` fails, or when the change would make the
    /// `/v1/sync` snapshot larger than [`MAX_SNAPSHOT_BYTES`] without shrinking it (413
    /// naming `what`, the thing changed).
    async fn change_directory<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut Directory) -> Result<(T, Vec<Change>), ApiError>,
    ) -> Result<T, ApiError> {
        let _guard = self.admin_lock.lock().await;
        let before = self.served.directory()?.clone();
        let mut draft = before.clone();
        let (out, changes) = f(&mut draft)?;
        self.check_snapshot(what, &before, &draft, MAX_SNAPSHOT_BYTES)?;
        {
            let mut dir = self
                .served
                .directory
                .write()
                .map_err(|_| Internal::poisoned("directory"))?;
            *dir = draft.clone();
        }
        self.directory_kv.put(DIRECTORY_KEY, &draft)?;
        self.directory_kv.flush().await?;
        self.served.changes.send_all(changes);
        Ok(out)
    }

    /// Refuses a directory `after` whose snapshot (with the current catalog) is larger than
    /// `limit`, unless it is no larger than with the directory `before` (so a change that
    /// shrinks an oversized snapshot, a delete say, always goes through).
    fn check_snapshot(
        &self,
        what: &str,
        before: &Directory,
        after: &Directory,
        limit: usize,
    ) -> Result<(), ApiError> {
        let (catalog, catalog_signature) = {
            let history = self.served.catalog()?;
            (history.current(), history.signature().map(str::to_string))
        };
        let size = |directory: &Directory| -> Result<usize, ApiError> {
            snapshot_size(&Snapshot {
                directory: directory.clone(),
                catalog: catalog.clone(),
                catalog_signature: catalog_signature.clone(),
                stale_since: None,
            })
            .map_err(|e| Internal(format!("measuring the snapshot: {e}")).into())
        };
        let size_after = size(after)?;
        if size_after <= limit || size_after <= size(before)? {
            return Ok(());
        }
        Err(Oversized::Snapshot {
            what: what.to_string(),
            size: size_after,
            limit,
        }
        .into())
    }

    /// Persists the catalog history durably and drops slots of revisions no longer retained.
    async fn persist_catalog(&self) -> Result<(), ApiError> {
        let history = self.served.catalog()?.clone();
        self.catalog_kv.put(CATALOG_KEY, &history)?;
        if let Err(e) = self.served.prune_slots(history.oldest_revision()) {
            tracing::warn!(error = %e, "could not prune old download slots");
        }
        self.catalog_kv.flush().await?;
        Ok(())
    }

    /// Stores uploads, raises notifications, makes them durable, then calls the webhook.
    async fn store_uploads(&self, uploads: Vec<Placed>) -> Result<(), ApiError> {
        let now = Utc::now();
        let damper = self.served.directory()?.site.notification_damper_s;
        let mut created: Vec<Notification> = Vec::new();
        for placed in uploads {
            let placement = placed.placement.unwrap_or_else(Placement::unknown);
            match placed.upload {
                Upload::Events(u) => {
                    // The events and the notifications they raise or count, in one step.
                    let intake = self.events.accept(&u, &placement, damper, now)?;
                    self.served.metrics.event_conflicts.inc_by(intake.conflicts);
                    created.extend(intake.created);
                }
                Upload::Applications(u) => self.apps.add(&u, now)?,
            }
        }
        // Durable before the 202 (the caller answers after this returns).
        self.events.flush().await?;
        for n in created {
            tracing::warn!(group = %n.group, kind = %n.kind, client = %n.client_id, "critical event: admin notification raised");
            if let Some(url) = &self.webhook {
                tokio::spawn(events::deliver_webhook(self.http.clone(), url.clone(), n));
            }
        }
        Ok(())
    }
}

impl Role for Manager {
    fn heartbeat(
        &self,
        hb: &Heartbeat,
        origin: Origin,
        now: DateTime<Utc>,
    ) -> Result<Placement, ApiError> {
        let dir = self.served.directory()?;
        let record = self.registry.heartbeat(&dir, hb, origin, now)?;
        Ok(Placement {
            group: record.group,
            location: record.location,
        })
    }

    fn placement(&self, client_id: &str) -> Option<Placement> {
        self.registry.placement(client_id)
    }

    fn reports(&self, reports: Vec<NodeReport>, now: DateTime<Utc>) -> Result<(), ApiError> {
        let refused = self.nodes.record(reports, now)?;
        if !refused.is_empty() {
            tracing::warn!(refused = refused.len(), first = %refused[0], max = nodes::MAX_NODES, "node table full: reports of new nodes refused");
        }
        Ok(())
    }

    fn accept(&self, uploads: Vec<Placed>) -> BoxFuture<'_, Result<(), ApiError>> {
        Box::pin(self.store_uploads(uploads))
    }

    fn enroll<'a>(
        &'a self,
        client_id: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Enrolled, ApiError>> {
        Box::pin(async move {
            let enrolled = {
                let dir = self.served.directory()?;
                self.enrolment
                    .enrol(&dir, &self.catalog_key, client_id, token, Utc::now())?
            };
            // The credential is answered only once its record survives a crash.
            self.enrolment.flush().await?;
            Ok(enrolled)
        })
    }
}

/// The bytes `snapshot` serializes to, counted without holding them.
fn snapshot_size(snapshot: &Snapshot) -> Result<usize, serde_json::Error> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, snapshot)?;
    Ok(count.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_change_that_would_grow_the_snapshot_past_its_bound_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ManagerConfig::default();
        config.manager.data_dir = dir.path().to_path_buf();
        let (_trigger, shutdown) = crate::http::shutdown::shutdown_pair();
        let m = Manager::open(&config, shutdown).unwrap();
        let small = m.served.directory().unwrap().clone();
        let mut big = small.clone();
        big.put_group("lab", "default").unwrap();
        let doc = serde_json::json!({ "blob": "x".repeat(100_000) });
        big.put_policy("lab", doc).unwrap();
        let what = "the policy of group \"lab\"";
        let e = m.check_snapshot(what, &small, &big, 50_000).unwrap_err();
        assert_eq!(e.status.as_u16(), 413);
        assert_eq!(e.code, "snapshot_too_large");
        assert!(e.message.contains(what), "{}", e.message);
        // A change that shrinks an oversized snapshot goes through, and so does any change
        // under the bound.
        assert!(m.check_snapshot("deleting", &big, &small, 50_000).is_ok());
        assert!(m
            .check_snapshot(what, &small, &big, MAX_SNAPSHOT_BYTES)
            .is_ok());
        // The size counted is the snapshot's: the catalog's bytes are in it.
        let directory = big.clone();
        let catalog = m.served.catalog().unwrap().current();
        let whole = serde_json::to_vec(&Snapshot {
            directory,
            catalog,
            catalog_signature: m.served.catalog().unwrap().signature().map(str::to_string),
            stale_since: None,
        })
        .unwrap();
        let limit = whole.len();
        assert!(m.check_snapshot(what, &small, &big, limit).is_ok());
        assert!(m.check_snapshot(what, &small, &big, limit - 1).is_err());
    }
}
