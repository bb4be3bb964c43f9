//! Configuration of the manager and node roles: the one place where every key has its default.
//!
//! Owns the TOML file shapes (`config/manager.toml`, `config/node.toml` document them), loading
//! with unknown keys rejected (a typo in a security setting must not pass silently), and
//! validation with a message naming the key. Command-line flags are applied on top by `cli`.
//! This module must never start anything or touch the network.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[path = "config_upstream.rs"]
mod upstream;
pub use upstream::{redact_credentials, validate_proxy, UpstreamServer};

/// Default port of the manager.
pub const MANAGER_PORT: u16 = 8014;
/// Default port of a node.
pub const NODE_PORT: u16 = 2967;
/// The upstream a node uses when none is configured.
pub const DEFAULT_UPSTREAM: &str = "http://127.0.0.1:8014";

/// A configuration problem, always naming the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn bad(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[limits]` (both roles)
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest request head in bytes (request line and headers); beyond it, 431.
    pub max_header_bytes: usize,
    /// Seconds a client gets to send a whole request head; then the connection is closed.
    pub header_read_timeout_s: u64,
    /// Connections at once; 0 derives it from the open-file limit (raised to the hard limit
    /// at start-up) less 256 kept for files and upstream connections.
    pub max_connections: usize,
    /// Serving threads, each with its own runtime; 0 means one per CPU core.
    pub threads: usize,
    /// Connections at once from one client address; 0 means no limit beyond
    /// `max_connections`.
    pub max_connections_per_address: usize,
    /// Push streams (`/v1/stream`) at once from one client address; 0 means no limit.
    pub max_streams_per_address: usize,
    /// Client ids one address may introduce per minute (a heartbeat, upload or named
    /// download from an id this server never placed); 0 means no limit.
    pub new_clients_per_minute: u32,
    /// A request body that sends no byte for this many seconds is cut.
    pub body_read_timeout_s: u64,
    /// A push stream whose client does not take an event or keep-alive within this many
    /// seconds is closed.
    pub stream_write_timeout_s: u64,
    /// Push streams end after about this many seconds (each within 10% of it, so that
    /// reconnects spread); the client reconnects.
    pub stream_max_age_s: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        LimitsSection {
            max_header_bytes: 16 * 1024,
            header_read_timeout_s: 10,
            max_connections: 0,
            threads: 0,
            max_connections_per_address: 1024,
            max_streams_per_address: 512,
            new_clients_per_minute: 600,
            body_read_timeout_s: 30,
            stream_write_timeout_s: 60,
            stream_max_age_s: 3600,
        }
    }
}

impl LimitsSection {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1024..=1 << 20).contains(&self.max_header_bytes) {
            return Err(bad(
                "limits.max_header_bytes",
                format!("must be 1024 to 1048576 (got {})", self.max_header_bytes),
            ));
        }
        if !(1..=3600).contains(&self.header_read_timeout_s) {
            return Err(bad(
                "limits.header_read_timeout_s",
                format!(
                    "must be 1 to 3600 seconds (got {})",
                    self.header_read_timeout_s
                ),
            ));
        }
        for (key, secs) in [
            ("limits.body_read_timeout_s", self.body_read_timeout_s),
            ("limits.stream_write_timeout_s", self.stream_write_timeout_s),
        ] {
            if !(1..=3600).contains(&secs) {
                return Err(bad(key, format!("must be 1 to 3600 seconds (got {secs})")));
            }
        }
        if !(60..=604_800).contains(&self.stream_max_age_s) {
            return Err(bad(
                "limits.stream_max_age_s",
                format!(
                    "must be 60 to 604800 seconds (got {})",
                    self.stream_max_age_s
                ),
            ));
        }
        if self.threads > 1024 {
            return Err(bad(
                "limits.threads",
                format!("must be 0 (one per core) to 1024 (got {})", self.threads),
            ));
        }
        Ok(())
    }
}

/// Checks that TLS is configured with both files or neither.
fn validate_tls(section: &str, cert: &str, key: &str) -> Result<(), ConfigError> {
    match (cert.is_empty(), key.is_empty()) {
        (true, true) | (false, false) => Ok(()),
        (false, true) => Err(bad(
            &format!("{section}.tls_key"),
            "is needed with tls_cert",
        )),
        (true, false) => Err(bad(
            &format!("{section}.tls_cert"),
            "is needed with tls_key",
        )),
    }
}

/// A token file that will be read (its token is not given directly) must exist, be readable
/// and hold a token: found now, this is bad config (exit 2 naming `key` and the file), not a
/// failure at the first request. `flag` is the command-line flag that sets the same key.
fn validate_token_file(key: &str, flag: &str, token: &str, file: &str) -> Result<(), ConfigError> {
    if !token.is_empty() || file.is_empty() {
        return Ok(());
    }
    match std::fs::read_to_string(file) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(bad(
            key,
            format!("token file {file} does not exist (set by {key} or {flag})"),
        )),
        Err(e) => Err(bad(key, format!("cannot read token file {file}: {e}"))),
        Ok(text) if text.trim().is_empty() => Err(bad(key, format!("token file {file} is empty"))),
        Ok(_) => Ok(()),
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: LogFormat,
    /// What is logged: a `tracing` filter such as `info` or `info,gup::node=debug`
    /// (`RUST_LOG`, when set at start, wins).
    pub level: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::default(),
            level: "info".into(),
        }
    }
}

impl LogSection {
    fn validate(&self) -> Result<(), ConfigError> {
        let ok = !self.level.trim().is_empty()
            && self.level.len() <= 1024
            && self
                .level
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ",=_:.-".contains(c));
        if !ok {
            return Err(bad(
                "log.level",
                format!(
                    "must be a filter such as \"info\" or \"info,gup::node=debug\", got {:?}",
                    self.level
                ),
            ));
        }
        Ok(())
    }
}

/// What a reload of the config file changes: the keys whose new value takes effect now, and
/// those that keep their running value until a restart (each `section.key`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    pub live: Vec<String>,
    pub restart: Vec<String>,
}

/// The keys whose values differ between `running` and `new`, sorted into those `live` names
/// (a key, or a section as `"limits."`) and the rest.
pub fn plan_reload<T: Serialize>(running: &T, new: &T, live: &[&str]) -> ReloadPlan {
    fn flatten(
        v: &toml::Value,
        prefix: &str,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    flatten(v, &format!("{prefix}{k}."), out);
                }
            }
            other => {
                out.insert(prefix.trim_end_matches('.').to_string(), other.to_string());
            }
        }
    }
    let values = |c: &T| {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(v) = toml::Value::try_from(c) {
            flatten(&v, "", &mut out);
        }
        out
    };
    let (old, new) = (values(running), values(new));
    let mut plan = ReloadPlan::default();
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for key in keys {
        if old.get(key) == new.get(key) {
            continue;
        }
        let is_live = live
            .iter()
            .any(|l| key == l || (l.ends_with('.') && key.starts_with(l)));
        if is_live {
            plan.live.push(key.clone());
        } else {
            plan.restart.push(key.clone());
        }
    }
    plan
}

/// `[store]` of either role: the background scrub of the blobs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// Each blob is read back and re-hashed this long after it was last verified (0: never).
    pub scrub_interval_s: u64,
    /// How fast the scrub reads, over all blobs.
    pub scrub_bytes_per_sec: u64,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            scrub_interval_s: 86_400,
            scrub_bytes_per_sec: 50 << 20,
        }
    }
}

impl StoreSection {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.scrub_interval_s > 366 * 86_400 {
            return Err(bad(
                "store.scrub_interval_s",
                format!(
                    "must be 0 (no scrub) to 31622400 seconds (a year), got {}",
                    self.scrub_interval_s
                ),
            ));
        }
        if self.scrub_bytes_per_sec < 1 << 20 {
            return Err(bad(
                "store.scrub_bytes_per_sec",
                format!(
                    "must be at least 1048576 (1 MiB/s), got {}",
                    self.scrub_bytes_per_sec
                ),
            ));
        }
        Ok(())
    }
}

// === deltas (both roles) ===

/// Default `deltas.from_versions` of the manager.
pub const DEFAULT_DELTA_FROM_VERSIONS: usize = 3;
/// Default (and largest) `deltas.max_item_bytes`: two versions of at most 1 GiB together fit
/// the widest window zstd decodes (2 GiB, `core::delta::MAX_WINDOW_LOG`).
pub const DEFAULT_DELTA_MAX_ITEM_BYTES: u64 = 1 << 30;
/// Default `deltas.max_waiting`.
pub const DEFAULT_DELTA_MAX_WAITING: usize = 16;
/// The keys only a manager's `[deltas]` has, for telling the role of a file.
const MANAGER_DELTAS_KEYS: [&str; 1] = ["from_versions"];

/// How a server computes deltas, whichever role it has (see `serve::delta`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaLimits {
    /// No delta is computed from or to a blob larger than this (0: none at all).
    pub max_item_bytes: u64,
    /// Computations at once; 0 is one per core.
    pub max_concurrent: usize,
    /// Edge computations that may wait for one of those; beyond, 503 with a Retry-After.
    pub max_waiting: usize,
}

impl Default for DeltaLimits {
    fn default() -> Self {
        DeltaLimits {
            max_item_bytes: DEFAULT_DELTA_MAX_ITEM_BYTES,
            max_concurrent: 0,
            max_waiting: DEFAULT_DELTA_MAX_WAITING,
        }
    }
}

impl DeltaLimits {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_item_bytes > DEFAULT_DELTA_MAX_ITEM_BYTES {
            return Err(bad(
                "deltas.max_item_bytes",
                format!(
                    "must be 0 (no deltas) to {DEFAULT_DELTA_MAX_ITEM_BYTES} (1 GiB: two versions together must fit zstd's 2 GiB window), got {}",
                    self.max_item_bytes
                ),
            ));
        }
        if self.max_concurrent > 1024 {
            return Err(bad(
                "deltas.max_concurrent",
                format!(
                    "must be 0 (one per core) to 1024, got {}",
                    self.max_concurrent
                ),
            ));
        }
        if self.max_waiting > 10_000 {
            return Err(bad(
                "deltas.max_waiting",
                format!("must be 0 to 10000, got {}", self.max_waiting),
            ));
        }
        Ok(())
    }
}

/// `[deltas]` of the manager: the deltas it lists on catalog items, and those it computes
/// at the edge (`GET /v1/delta/{from}/{to}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ManagerDeltasSection {
    /// A new version of an item gets a delta from each of this many earlier versions (those
    /// the retained revisions name and the store holds); 0 lists none.
    pub from_versions: usize,
    /// No delta is computed from or to a blob larger than this, in bytes (0: none at all,
    /// not at the edge either).
    pub max_item_bytes: u64,
    /// Delta computations at once (listed and edge together); 0 is one per core.
    pub max_concurrent: usize,
    /// Edge computations that may wait for a free one; beyond, 503 with a Retry-After.
    pub max_waiting: usize,
}

impl Default for ManagerDeltasSection {
    fn default() -> Self {
        let limits = DeltaLimits::default();
        ManagerDeltasSection {
            from_versions: DEFAULT_DELTA_FROM_VERSIONS,
            max_item_bytes: limits.max_item_bytes,
            max_concurrent: limits.max_concurrent,
            max_waiting: limits.max_waiting,
        }
    }
}

impl ManagerDeltasSection {
    /// The computing limits of this section.
    pub fn limits(&self) -> DeltaLimits {
        DeltaLimits {
            max_item_bytes: self.max_item_bytes,
            max_concurrent: self.max_concurrent,
            max_waiting: self.max_waiting,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let most = super::catalog::MAX_DELTAS_PER_ITEM;
        if self.from_versions > most {
            return Err(bad(
                "deltas.from_versions",
                format!(
                    "must be 0 (no deltas listed) to {most} (the most an item lists), got {}",
                    self.from_versions
                ),
            ));
        }
        self.limits().validate()
    }
}

/// `[deltas]` of a node: the deltas it computes at the edge (`GET /v1/delta/{from}/{to}`).
/// The deltas the catalog lists it mirrors like any blob.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeDeltasSection {
    /// No delta is computed from or to a blob larger than this, in bytes (0: none).
    pub max_item_bytes: u64,
    /// Delta computations at once; 0 is one per core.
    pub max_concurrent: usize,
    /// Computations that may wait for a free one; beyond, 503 with a Retry-After.
    pub max_waiting: usize,
}

impl Default for NodeDeltasSection {
    fn default() -> Self {
        let limits = DeltaLimits::default();
        NodeDeltasSection {
            max_item_bytes: limits.max_item_bytes,
            max_concurrent: limits.max_concurrent,
            max_waiting: limits.max_waiting,
        }
    }
}

impl NodeDeltasSection {
    /// The computing limits of this section.
    pub fn limits(&self) -> DeltaLimits {
        DeltaLimits {
            max_item_bytes: self.max_item_bytes,
            max_concurrent: self.max_concurrent,
            max_waiting: self.max_waiting,
        }
    }
}

// === manager ===

/// `config/manager.toml`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ManagerConfig {
    pub manager: ManagerSection,
    pub store: StoreSection,
    pub events: ManagerEventsSection,
    pub notifications: NotificationsSection,
    pub deltas: ManagerDeltasSection,
    pub limits: LimitsSection,
    pub log: LogSection,
}

/// Default `events.retain_days` of the manager.
pub const DEFAULT_RETAIN_DAYS: u32 = 90;
/// Default `events.max_count` of the manager: ten million events, about 18 GiB of sled on
/// disk (1.8 KiB an event of a few hundred bytes with its index entries, measured by
/// `cargo bench --bench retention` and `--bench events`), and 90 days of 110,000 events a
/// day: a fleet of 10,000 clients sending eleven a day each.
pub const DEFAULT_MAX_EVENTS: u64 = 10_000_000;
/// The keys of a manager's `[events]`, for telling the role of a file.
const MANAGER_EVENTS_KEYS: [&str; 2] = ["retain_days", "max_count"];
/// The keys of a node's `[events]`.
const NODE_EVENTS_KEYS: [&str; 1] = ["outbox_max_bytes"];

/// `[events]` of the manager: how long and how many events it keeps (a background task
/// deletes the oldest beyond either bound, `manager::retention`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ManagerEventsSection {
    /// Events received longer ago than this many days are deleted (by when the manager
    /// received them, not by the time the client gave them).
    pub retain_days: u32,
    /// At most this many events are kept: beyond it the oldest are deleted.
    pub max_count: u64,
}

impl Default for ManagerEventsSection {
    fn default() -> Self {
        ManagerEventsSection {
            retain_days: DEFAULT_RETAIN_DAYS,
            max_count: DEFAULT_MAX_EVENTS,
        }
    }
}

impl ManagerEventsSection {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=36_500).contains(&self.retain_days) {
            return Err(bad(
                "events.retain_days",
                format!("must be 1 to 36500 days (got {})", self.retain_days),
            ));
        }
        if !(1..=1_000_000_000).contains(&self.max_count) {
            return Err(bad(
                "events.max_count",
                format!("must be 1 to 1000000000 (got {})", self.max_count),
            ));
        }
        Ok(())
    }
}

/// `[notifications]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsSection {
    /// Where new admin notifications are POSTed as JSON (empty: none), retried with backoff.
    pub webhook_url: String,
}

/// `[manager]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ManagerSection {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Empty: use `admin_token_file`, else the token kept in the data dir.
    pub admin_token: String,
    pub admin_token_file: String,
    /// Also accepted while admins move to a new admin token (empty: none).
    pub admin_token_previous: String,
    /// What nodes must present on `/v1/sync` and batch calls.
    pub node_token: String,
    pub node_token_file: String,
    /// Also accepted while nodes move to a new node token (empty: none).
    pub node_token_previous: String,
    /// How many catalog revisions count as "in the catalog".
    pub retain_revisions: usize,
    /// PEM certificate chain and private key: with both, the port speaks only TLS.
    pub tls_cert: String,
    pub tls_key: String,
}

impl Default for ManagerSection {
    fn default() -> Self {
        ManagerSection {
            listen: SocketAddr::from(([0, 0, 0, 0], MANAGER_PORT)),
            data_dir: PathBuf::from("gup-data/manager"),
            admin_token: String::new(),
            admin_token_file: String::new(),
            admin_token_previous: String::new(),
            node_token: String::new(),
            node_token_file: String::new(),
            node_token_previous: String::new(),
            retain_revisions: 3,
            tls_cert: String::new(),
            tls_key: String::new(),
        }
    }
}

impl ManagerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.manager;
        if m.data_dir.as_os_str().is_empty() {
            return Err(bad("manager.data_dir", "must not be empty"));
        }
        if !(1..=1000).contains(&m.retain_revisions) {
            return Err(bad(
                "manager.retain_revisions",
                format!("must be 1 to 1000 (got {})", m.retain_revisions),
            ));
        }
        validate_tls("manager", &m.tls_cert, &m.tls_key)?;
        self.store.validate()?;
        self.log.validate()?;
        validate_token_file(
            "manager.admin_token_file",
            "--admin-token-file",
            &m.admin_token,
            &m.admin_token_file,
        )?;
        validate_token_file(
            "manager.node_token_file",
            "--node-token-file",
            &m.node_token,
            &m.node_token_file,
        )?;
        self.limits.validate()?;
        self.events.validate()?;
        self.deltas.validate()?;
        let hook = &self.notifications.webhook_url;
        if !hook.is_empty() {
            validate_url(hook).map_err(|e| bad("notifications.webhook_url", e))?;
        }
        Ok(())
    }
}

// === node ===

/// `config/node.toml`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    pub node: NodeSection,
    pub upstream: UpstreamSection,
    pub cache: CacheSection,
    pub store: StoreSection,
    pub serve: ServeSection,
    pub events: NodeEventsSection,
    pub deltas: NodeDeltasSection,
    pub limits: LimitsSection,
    pub log: LogSection,
}

/// `[events]` of a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeEventsSection {
    /// Bytes of uploads the outbox holds while no upstream takes them. Uploads without a
    /// critical event are refused (503) once it holds three quarters of this, critical ones
    /// once it is full: a quarter stays for them.
    pub outbox_max_bytes: u64,
}

impl Default for NodeEventsSection {
    fn default() -> Self {
        NodeEventsSection {
            outbox_max_bytes: 256 << 20,
        }
    }
}

/// `[serve]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ServeSection {
    /// LAN budget shared by all clients' downloads, bytes per second; 0 = unlimited.
    pub max_bytes_per_sec: u64,
    /// Content downloads answered at once; beyond, 503 with a short Retry-After. 0 = unlimited.
    pub max_concurrent_downloads: usize,
}

/// `[node]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// What a downstream node must present when this node is its upstream (chaining).
    pub node_token: String,
    pub node_token_file: String,
    /// Also accepted while downstream nodes move to a new node token (empty: none).
    pub node_token_previous: String,
    /// PEM certificate chain and private key: with both, the port speaks only TLS.
    pub tls_cert: String,
    pub tls_key: String,
    /// The name this node reports to its upstream; empty: the host name.
    pub name: String,
    /// The URL this node reports as where it is reached; empty: derived from `listen` when
    /// that is a specific address, else none (a node on all interfaces cannot know which of
    /// its addresses its clients use).
    pub advertised_url: String,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            listen: SocketAddr::from(([0, 0, 0, 0], NODE_PORT)),
            data_dir: PathBuf::from("gup-data/node"),
            node_token: String::new(),
            node_token_file: String::new(),
            node_token_previous: String::new(),
            tls_cert: String::new(),
            tls_key: String::new(),
            name: String::new(),
            advertised_url: String::new(),
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSection {
    /// Management servers (or nodes), highest priority first. Empty: `DEFAULT_UPSTREAM`.
    /// Each entry may carry its own token; those without one present `token`.
    #[serde(deserialize_with = "upstream::deserialize_servers")]
    pub servers: Vec<UpstreamServer>,
    /// The node token this node presents upstream (to every server without one of its own).
    pub token: String,
    pub token_file: String,
    /// The outbound proxy every call to an upstream goes through (http or https URL,
    /// credentials allowed). Empty: the `HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY` environment,
    /// if any. `NO_PROXY` names hosts reached directly either way.
    pub proxy: String,
    /// `push`: hold one `/v1/stream` to the upstream and re-sync on each event; `pull`: re-sync
    /// every `sync_interval_s`.
    pub mode: super::settings::ConnectionMode,
    /// Seconds between re-syncs in pull mode, and between heartbeat batches relayed upstream.
    pub sync_interval_s: u64,
    /// An upstream fetch that receives no byte for this long is abandoned.
    pub idle_timeout_s: u64,
    /// WAN budget for blob fetches, bytes per second; 0 = unlimited.
    pub max_bytes_per_sec: u64,
    /// PEM file of CA certificates trusted for https upstreams (added to the system roots).
    pub ca_file: String,
    /// The manager's catalog public key (hex); when set, unsigned or wrongly signed catalogs
    /// are refused.
    pub catalog_public_key: String,
    /// Clients whose latest heartbeat waits to be relayed; beyond it, heartbeats of further
    /// clients are answered but not relayed until there is room (counted).
    pub max_pending_heartbeats: usize,
    /// The window within which the upstream gives this node its slot to prefetch a new
    /// revision's non-urgent items, seconds; 0 = prefetch at once.
    pub prefetch_window_s: u64,
}

impl Default for UpstreamSection {
    fn default() -> Self {
        UpstreamSection {
            servers: Vec::new(),
            token: String::new(),
            token_file: String::new(),
            proxy: String::new(),
            mode: super::settings::ConnectionMode::Push,
            sync_interval_s: 10,
            idle_timeout_s: 30,
            max_bytes_per_sec: 0,
            ca_file: String::new(),
            catalog_public_key: String::new(),
            max_pending_heartbeats: 100_000,
            prefetch_window_s: 300,
        }
    }
}

/// Default `cache.memory_bytes` (the manager uses it too).
pub const DEFAULT_MEMORY_BYTES: u64 = 256 << 20;
/// Default `cache.memory_item_max_bytes` (the manager uses it too).
pub const DEFAULT_MEMORY_ITEM_MAX_BYTES: u64 = 4 << 20;

/// `[cache]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSection {
    /// Fetch new catalog items as soon as the node hears of them (else on first request).
    pub prefetch: bool,
    /// How many mirrored catalog revisions count as "in the catalog".
    pub retain_revisions: usize,
    /// Disk budget for blobs, in bytes.
    pub max_bytes: u64,
    /// Memory budget for copies of small, often-read blobs, in bytes (0: off).
    pub memory_bytes: u64,
    /// Largest blob kept in memory, in bytes.
    pub memory_item_max_bytes: u64,
    /// Eviction starts when the blobs (with one about to arrive) would pass this percentage
    /// of `max_bytes`...
    pub high_watermark_percent: u8,
    /// ...and stops once they are down to this one, so that a full cache evicts in batches,
    /// not one blob per new blob.
    pub low_watermark_percent: u8,
    /// Bytes the filesystem keeps free whatever `max_bytes` says: below it the node evicts
    /// what it may and fetches nothing that would not fit above it.
    pub min_free_bytes: u64,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            prefetch: true,
            retain_revisions: 3,
            max_bytes: 10 << 30,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            memory_item_max_bytes: DEFAULT_MEMORY_ITEM_MAX_BYTES,
            high_watermark_percent: 95,
            low_watermark_percent: 85,
            min_free_bytes: 1 << 30,
        }
    }
}

impl NodeConfig {
    /// The upstream list to use (the default when none is configured).
    pub fn upstreams(&self) -> Vec<UpstreamServer> {
        if self.upstream.servers.is_empty() {
            vec![UpstreamServer::from(DEFAULT_UPSTREAM)]
        } else {
            self.upstream.servers.clone()
        }
    }

    /// Gives the upstream `url` (compared as URLs: `http://h:1` and `http://h:1/` are one) its
    /// own token or token file, for `--upstream-token-for` / `--upstream-token-file-for`.
    /// With no list configured, the default upstream is the list. Err: `url` is not in it.
    pub fn set_upstream_token(
        &mut self,
        url: &str,
        token: Option<String>,
        token_file: Option<String>,
    ) -> Result<(), String> {
        let wanted = validate_url(url)?;
        let mut list = self.upstreams();
        let mut found = false;
        for s in list.iter_mut() {
            if url::Url::parse(&s.url).is_ok_and(|u| u == wanted) {
                found = true;
                if let Some(t) = &token {
                    s.token = t.clone();
                }
                if let Some(f) = &token_file {
                    s.token_file = f.clone();
                }
            }
        }
        if !found {
            let known: Vec<&str> = list.iter().map(|s| s.url.as_str()).collect();
            return Err(format!(
                "{url} is not in the upstream list ({})",
                known.join(", ")
            ));
        }
        self.upstream.servers = list;
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.data_dir.as_os_str().is_empty() {
            return Err(bad("node.data_dir", "must not be empty"));
        }
        upstream::validate_servers(&self.upstream.servers)?;
        validate_proxy(&self.upstream.proxy)?;
        let u = &self.upstream;
        if !(1..=86_400).contains(&u.sync_interval_s) {
            return Err(bad(
                "upstream.sync_interval_s",
                format!("must be 1 to 86400 seconds (got {})", u.sync_interval_s),
            ));
        }
        if !(1..=86_400).contains(&u.idle_timeout_s) {
            return Err(bad(
                "upstream.idle_timeout_s",
                format!("must be 1 to 86400 seconds (got {})", u.idle_timeout_s),
            ));
        }
        validate_tls("node", &self.node.tls_cert, &self.node.tls_key)?;
        self.store.validate()?;
        self.log.validate()?;
        let name = &self.node.name;
        if name.chars().count() > super::fleet::MAX_NODE_NAME || name.chars().any(char::is_control)
        {
            return Err(bad(
                "node.name",
                format!(
                    "at most {} characters, no control characters",
                    super::fleet::MAX_NODE_NAME
                ),
            ));
        }
        if !self.node.advertised_url.is_empty() {
            if self.node.advertised_url.len() > super::fleet::MAX_REPORT_URL {
                return Err(bad(
                    "node.advertised_url",
                    format!("at most {} characters", super::fleet::MAX_REPORT_URL),
                ));
            }
            validate_url(&self.node.advertised_url).map_err(|m| bad("node.advertised_url", m))?;
        }
        validate_token_file(
            "upstream.token_file",
            "--upstream-token-file",
            &u.token,
            &u.token_file,
        )?;
        validate_token_file(
            "node.node_token_file",
            "--node-token-file",
            &self.node.node_token,
            &self.node.node_token_file,
        )?;
        if !u.catalog_public_key.is_empty() {
            super::signing::PublicKey::parse(&u.catalog_public_key)
                .map_err(|e| bad("upstream.catalog_public_key", e.to_string()))?;
        }
        self.limits.validate()?;
        if self.cache.max_bytes < 1 << 20 {
            return Err(bad(
                "cache.max_bytes",
                format!(
                    "must be at least 1048576 (1 MiB), got {}",
                    self.cache.max_bytes
                ),
            ));
        }
        if self.cache.memory_item_max_bytes > self.cache.memory_bytes && self.cache.memory_bytes > 0
        {
            return Err(bad(
                "cache.memory_item_max_bytes",
                format!(
                    "must not exceed cache.memory_bytes ({}), got {}",
                    self.cache.memory_bytes, self.cache.memory_item_max_bytes
                ),
            ));
        }
        if self.cache.memory_item_max_bytes > 1 << 30 {
            return Err(bad(
                "cache.memory_item_max_bytes",
                format!(
                    "must be at most 1073741824 (1 GiB), got {}",
                    self.cache.memory_item_max_bytes
                ),
            ));
        }
        if !(1..=10_000_000).contains(&u.max_pending_heartbeats) {
            return Err(bad(
                "upstream.max_pending_heartbeats",
                format!("must be 1 to 10000000 (got {})", u.max_pending_heartbeats),
            ));
        }
        if u.prefetch_window_s > crate::core::slots::MAX_PREFETCH_WINDOW_S {
            return Err(bad(
                "upstream.prefetch_window_s",
                format!(
                    "must be 0 to {} seconds (got {})",
                    crate::core::slots::MAX_PREFETCH_WINDOW_S,
                    u.prefetch_window_s
                ),
            ));
        }
        if self.events.outbox_max_bytes < 1 << 20 {
            return Err(bad(
                "events.outbox_max_bytes",
                format!(
                    "must be at least 1048576 (1 MiB), got {}",
                    self.events.outbox_max_bytes
                ),
            ));
        }
        let c = &self.cache;
        if !(1..=100).contains(&c.high_watermark_percent) {
            return Err(bad(
                "cache.high_watermark_percent",
                format!("must be 1 to 100 (got {})", c.high_watermark_percent),
            ));
        }
        if c.low_watermark_percent > c.high_watermark_percent {
            return Err(bad(
                "cache.low_watermark_percent",
                format!(
                    "must be at most cache.high_watermark_percent ({}), got {}",
                    c.high_watermark_percent, c.low_watermark_percent
                ),
            ));
        }
        if !(1..=1000).contains(&self.cache.retain_revisions) {
            return Err(bad(
                "cache.retain_revisions",
                format!("must be 1 to 1000 (got {})", self.cache.retain_revisions),
            ));
        }
        self.deltas.limits().validate()?;
        Ok(())
    }
}

/// An upstream URL must be absolute http(s) with a host.
pub fn validate_url(s: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("{s:?} must use http or https"));
    }
    if u.host_str().is_none() {
        return Err(format!("{s:?} has no host"));
    }
    Ok(u)
}

// === loading ===

/// Which role a config file is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Manager,
    Node,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Manager => "manager",
            Role::Node => "node",
        })
    }
}

/// Infers the role from the file's sections: `[manager]` or `[notifications]`, or
/// `[node]`/`[upstream]`/`[cache]`/`[serve]`. Both roles have an `[events]` section, told
/// apart by its keys (`retain_days`, `max_count`: manager; `outbox_max_bytes`: node); an
/// `[events]` with neither decides nothing (and an unknown key in it is named when the file
/// is parsed for its role).
pub fn infer_role(text: &str) -> Result<Role, ConfigError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    // What in the file belongs to each role, named as a message would name it: its own
    // sections, and its own keys of the sections both roles have.
    let said = |sections: &[&str], keys: &[(&str, &[&str])]| -> Vec<String> {
        let mut out: Vec<String> = sections
            .iter()
            .filter(|k| table.contains_key(**k))
            .map(|k| format!("[{k}]"))
            .collect();
        for (section, names) in keys {
            let within = table.get(*section).and_then(|v| v.as_table());
            out.extend(
                names
                    .iter()
                    .filter(|k| within.is_some_and(|t| t.contains_key(**k)))
                    .map(|k| format!("{section}.{k}")),
            );
        }
        out
    };
    let manager = said(
        &["manager", "notifications"],
        &[
            ("events", &MANAGER_EVENTS_KEYS),
            ("deltas", &MANAGER_DELTAS_KEYS),
        ],
    );
    // `[limits]`, `[log]`, `[store]` and the rest of `[deltas]` belong to both roles and
    // decide nothing.
    let node = said(
        &["node", "upstream", "cache", "serve"],
        &[("events", &NODE_EVENTS_KEYS)],
    );
    match (manager.is_empty(), node.is_empty()) {
        (false, true) => Ok(Role::Manager),
        (true, false) => Ok(Role::Node),
        (false, false) => Err(bad(
            manager[0].trim_matches(|c| c == '[' || c == ']'),
            format!(
                "a file is for one role: it has manager keys ({}) and node keys ({})",
                manager.join(", "),
                node.join(", ")
            ),
        )),
        (true, true) => Err(bad(
            "(file)",
            "cannot tell the role: expected a [manager] or a [node] section",
        )),
    }
}

/// Parses a TOML config, with errors naming the key on one line.
pub fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| toml_error(text, &e))
}

/// Reads and parses a config file.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad("(file)", format!("cannot read {}: {e}", path.display())))?;
    parse(&text)
}

/// Turns a multi-line toml error into one line naming `section.key`.
fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e.message().trim().replace('\n', " ");
    // A nested reader that knows the key says so first: `upstream.servers[1]: ...`.
    if let Some((key, rest)) = message.split_once(": ") {
        let keyish = |c: char| c.is_ascii_alphanumeric() || "_.[]".contains(c);
        if key.contains('.') && key.chars().all(keyish) {
            let line = e
                .span()
                .map(|sp| text[..sp.start.min(text.len())].matches('\n').count() + 1);
            return bad(
                key,
                match line {
                    Some(n) => format!("{rest} (line {n})"),
                    None => rest.to_string(),
                },
            );
        }
    }
    let Some(span) = e.span() else {
        return bad("(file)", message);
    };
    let before = &text[..span.start.min(text.len())];
    let line_no = before.matches('\n').count() + 1;
    let section = before
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim().to_string());
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line
        .split('=')
        .next()
        .map(str::trim)
        .filter(|k| !k.is_empty() && !k.starts_with('['));
    // serde names unknown fields itself: "unknown field `x`, expected ...".
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|r| r.split('`').next())
        .filter(|k| !k.is_empty());
    let key = unknown.or(key);
    let full = match (section, key) {
        (Some(s), Some(k)) => format!("{s}.{k}"),
        (None, Some(k)) => k.to_string(),
        (Some(s), None) => s,
        (None, None) => "(file)".to_string(),
    };
    // A header like `[]` or a quoted empty key names nothing: point at the file.
    let full = if full.trim_matches('.').is_empty() {
        "(file)".to_string()
    } else {
        full
    };
    bad(&full, format!("{message} (line {line_no})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        ManagerConfig::default().validate().unwrap();
        NodeConfig::default().validate().unwrap();
        assert_eq!(
            NodeConfig::default().upstreams(),
            vec![UpstreamServer::from(DEFAULT_UPSTREAM)]
        );
        assert_eq!(ManagerConfig::default().manager.listen.port(), 8014);
        assert_eq!(NodeConfig::default().node.listen.port(), 2967);
    }

    #[test]
    fn a_reload_sorts_changed_keys_into_live_and_restart() {
        let old = NodeConfig::default();
        let mut new = old.clone();
        assert_eq!(
            plan_reload(&old, &new, &["log.level"]),
            ReloadPlan::default()
        );
        new.log.level = "debug".into();
        new.node.listen = "127.0.0.1:1".parse().unwrap();
        new.limits.max_connections = 5;
        new.node.node_token_previous = "old".into();
        let plan = plan_reload(
            &old,
            &new,
            &["log.level", "limits.", "node.node_token_previous"],
        );
        assert_eq!(
            plan.live,
            vec![
                "limits.max_connections",
                "log.level",
                "node.node_token_previous"
            ]
        );
        assert_eq!(plan.restart, vec!["node.listen"]);
        let mut bad_level = NodeConfig::default();
        bad_level.log.level = "info; rm -rf".into();
        assert_eq!(bad_level.validate().unwrap_err().key, "log.level");
    }

    #[test]
    fn scrub_and_watermark_keys_are_checked_by_name() {
        let mut n = NodeConfig::default();
        n.store.scrub_bytes_per_sec = 1000;
        assert_eq!(n.validate().unwrap_err().key, "store.scrub_bytes_per_sec");
        let mut n = NodeConfig::default();
        n.store.scrub_interval_s = 400 * 86_400;
        assert_eq!(n.validate().unwrap_err().key, "store.scrub_interval_s");
        n.store.scrub_interval_s = 0;
        n.validate().expect("0 turns the scrub off");
        let mut n = NodeConfig::default();
        n.cache.low_watermark_percent = 96;
        assert_eq!(n.validate().unwrap_err().key, "cache.low_watermark_percent");
        n.cache.high_watermark_percent = 0;
        assert_eq!(
            n.validate().unwrap_err().key,
            "cache.high_watermark_percent"
        );
        let mut m = ManagerConfig::default();
        m.store.scrub_bytes_per_sec = 0;
        assert_eq!(m.validate().unwrap_err().key, "store.scrub_bytes_per_sec");
        let parsed: ManagerConfig = parse("[store]\nscrub_interval_s = 5\n").unwrap();
        assert_eq!(parsed.store.scrub_interval_s, 5);
        assert_eq!(
            infer_role("[store]\nscrub_interval_s = 5\n[node]\n").unwrap(),
            Role::Node
        );
    }

    #[test]
    fn an_upstream_entry_is_a_url_or_a_table_with_its_own_token() {
        let n: NodeConfig = parse(
            "[upstream]\ntoken = \"dflt\"\nservers = [\n  \"http://a:2967\",\n  { url = \"http://m:8014\", token = \"t1\" },\n  { url = \"http://c:1\", token_file = \"/x\" },\n]\n",
        )
        .unwrap();
        let s = &n.upstream.servers;
        assert_eq!(s[0], UpstreamServer::from("http://a:2967"));
        assert!(!s[0].has_own_token());
        assert_eq!(
            (s[1].url.as_str(), s[1].token.as_str()),
            ("http://m:8014", "t1")
        );
        assert_eq!(s[2].token_file, "/x");
        // Written back, plain entries stay strings and the others tables.
        let text = toml::to_string(&n).unwrap();
        assert_eq!(parse::<NodeConfig>(&text).unwrap(), n, "{text}");
        assert!(text.contains("\"http://a:2967\""), "{text}");

        let e = parse::<NodeConfig>(
            "[upstream]\nservers = [\n  \"http://a:1\",\n  { url = \"http://m:8014\", tokn = \"t\" },\n]\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "upstream.servers[1]", "{e}");
        assert!(e.message.contains("tokn"), "{e}");
        let e = parse::<NodeConfig>("[upstream]\nservers = [{ token = \"t\" }]\n").unwrap_err();
        assert_eq!(e.key, "upstream.servers[0]", "{e}");
        assert!(e.message.contains("url"), "{e}");
        let e = parse::<NodeConfig>("[upstream]\nservers = [\"http://a:1\", 5]\n").unwrap_err();
        assert_eq!(e.key, "upstream.servers[1]", "{e}");
        let e = parse::<NodeConfig>("[upstream]\nservers = \"http://a:1\"\n").unwrap_err();
        assert_eq!(e.key, "upstream.servers", "{e}");

        // A token file that will be read is checked where it is named.
        let dir = tempfile::tempdir().unwrap();
        let mut n = NodeConfig::default();
        n.upstream.servers = vec![
            "http://a:1".into(),
            UpstreamServer {
                url: "http://m:8014".into(),
                token_file: dir.path().join("gone").display().to_string(),
                ..Default::default()
            },
        ];
        let e = n.validate().unwrap_err();
        assert_eq!(e.key, "upstream.servers[1].token_file", "{e}");
        n.upstream.servers[1].token = "given".into();
        n.validate()
            .expect("a token given directly wins: the file is not read");
    }

    #[test]
    fn a_token_for_one_upstream_is_set_by_its_url() {
        let mut n = NodeConfig::default();
        n.set_upstream_token("http://127.0.0.1:8014/", Some("t".into()), None)
            .expect("the default upstream is the list when none is configured");
        assert_eq!(n.upstream.servers.len(), 1);
        assert_eq!(n.upstream.servers[0].token, "t");
        n.upstream.servers = vec!["http://a:1/".into(), "http://m:8014".into()];
        n.set_upstream_token("http://M:8014", None, Some("/f".into()))
            .unwrap();
        assert_eq!(n.upstream.servers[1].token_file, "/f");
        assert!(!n.upstream.servers[0].has_own_token());
        let e = n
            .set_upstream_token("http://other:1", Some("t".into()), None)
            .unwrap_err();
        assert!(
            e.contains("not in the upstream list") && e.contains("http://a:1/"),
            "{e}"
        );
        assert!(n.set_upstream_token("nonsense", None, None).is_err());
    }

    #[test]
    fn the_proxy_key_is_checked_by_name() {
        let mut n = NodeConfig::default();
        n.upstream.proxy = "http://user:pw@127.0.0.1:3128".into();
        n.validate().unwrap();
        n.upstream.proxy = "ftp://user:pw@127.0.0.1:21".into();
        let e = n.validate().unwrap_err();
        assert_eq!(e.key, "upstream.proxy");
        assert!(!e.to_string().contains("pw@"), "{e}");
    }

    #[test]
    fn a_token_file_that_will_be_read_must_hold_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.token");
        let mut n = NodeConfig::default();
        n.upstream.token_file = missing.display().to_string();
        let e = n.validate().unwrap_err();
        assert_eq!(e.key, "upstream.token_file");
        assert!(e.message.contains(&n.upstream.token_file), "{e}");
        assert!(e.message.contains("does not exist"), "{e}");
        std::fs::write(&missing, "  \n").unwrap();
        assert!(n.validate().unwrap_err().message.contains("is empty"));
        std::fs::write(&missing, "t0ken\n").unwrap();
        n.validate().unwrap();
        let mut m = ManagerConfig::default();
        m.manager.admin_token_file = dir.path().join("gone").display().to_string();
        assert_eq!(m.validate().unwrap_err().key, "manager.admin_token_file");
        m.manager.admin_token = "given".into();
        m.validate()
            .expect("a token given directly wins: the file is not read");
    }

    #[test]
    fn shipped_examples_parse_to_the_defaults() {
        let m: ManagerConfig = parse(include_str!("../../config/manager.toml")).unwrap();
        assert_eq!(m, ManagerConfig::default());
        let n: NodeConfig = parse(include_str!("../../config/node.toml")).unwrap();
        assert_eq!(n, NodeConfig::default());
        assert_eq!(
            infer_role(include_str!("../../config/manager.toml")),
            Ok(Role::Manager)
        );
        assert_eq!(
            infer_role(include_str!("../../config/node.toml")),
            Ok(Role::Node)
        );
    }

    /// Every key of every section is written out in the shipped examples (the defaults
    /// above prove their values; this proves none is left undocumented).
    #[test]
    fn shipped_examples_show_every_key() {
        fn keys(v: &toml::Value, prefix: &str, out: &mut Vec<String>) {
            if let toml::Value::Table(t) = v {
                for (k, v) in t {
                    let name = format!("{prefix}{k}");
                    match v {
                        toml::Value::Table(_) => keys(v, &format!("{name}."), out),
                        _ => out.push(name),
                    }
                }
            }
        }
        let check = |text: &str, defaults: toml::Value| {
            let shipped: toml::Value = toml::from_str(text).unwrap();
            let (mut want, mut have) = (Vec::new(), Vec::new());
            keys(&defaults, "", &mut want);
            keys(&shipped, "", &mut have);
            let missing: Vec<_> = want.iter().filter(|k| !have.contains(k)).collect();
            assert!(missing.is_empty(), "undocumented keys: {missing:?}");
        };
        check(
            include_str!("../../config/manager.toml"),
            toml::Value::try_from(ManagerConfig::default()).unwrap(),
        );
        check(
            include_str!("../../config/node.toml"),
            toml::Value::try_from(NodeConfig::default()).unwrap(),
        );
    }

    #[test]
    fn an_events_section_tells_the_roles_apart_by_its_keys() {
        let manager = "[manager]\ndata_dir = \"m\"\n[events]\nretain_days = 30\n";
        assert_eq!(infer_role(manager), Ok(Role::Manager));
        // The manager's keys alone are enough, and so are the node's.
        assert_eq!(
            infer_role("[events]\nmax_count = 1000\n"),
            Ok(Role::Manager)
        );
        assert_eq!(
            infer_role("[events]\noutbox_max_bytes = 1048576\n"),
            Ok(Role::Node)
        );
        assert_eq!(
            infer_role("[node]\n[events]\noutbox_max_bytes = 1048576\n"),
            Ok(Role::Node)
        );
        // An [events] of neither role decides nothing; parsing for the role names the key.
        assert_eq!(
            infer_role("[manager]\n[events]\nretain_dayz = 3\n"),
            Ok(Role::Manager)
        );
        let e = parse::<ManagerConfig>("[manager]\n[events]\nretain_dayz = 3\n").unwrap_err();
        assert_eq!(e.key, "events.retain_dayz");
        assert_eq!(infer_role("[events]\n").unwrap_err().key, "(file)");
        // A node's [events] key in a manager file is a mix, named as such.
        let e = infer_role("[manager]\n[events]\noutbox_max_bytes = 1048576\n").unwrap_err();
        assert_eq!(e.key, "manager");
        assert!(e.message.contains("events.outbox_max_bytes"), "{e}");
        let e = infer_role("[cache]\n[events]\nretain_days = 3\n").unwrap_err();
        assert_eq!(e.key, "events.retain_days");
        assert!(e.message.contains("[cache]"), "{e}");
        let m: ManagerConfig = parse(manager).unwrap();
        assert_eq!(m.events.retain_days, 30);
        assert_eq!(m.events.max_count, DEFAULT_MAX_EVENTS);
        m.validate().unwrap();
    }

    #[test]
    fn delta_bounds_are_checked_naming_the_key() {
        let mut m = ManagerConfig::default();
        assert_eq!(m.deltas.from_versions, 3);
        m.deltas.from_versions = 0;
        m.validate().unwrap();
        m.deltas.from_versions = 17;
        let e = m.validate().unwrap_err();
        assert_eq!(e.key, "deltas.from_versions");
        assert!(e.message.contains("16"), "{e}");
        m = ManagerConfig::default();
        m.deltas.max_item_bytes = (1 << 30) + 1;
        assert_eq!(m.validate().unwrap_err().key, "deltas.max_item_bytes");
        let mut n = NodeConfig::default();
        n.deltas.max_concurrent = 2000;
        assert_eq!(n.validate().unwrap_err().key, "deltas.max_concurrent");
        n = NodeConfig::default();
        n.deltas.max_waiting = 10_001;
        assert_eq!(n.validate().unwrap_err().key, "deltas.max_waiting");
        // `from_versions` is the manager's: it tells the role, and a node refuses it.
        assert_eq!(
            infer_role("[deltas]\nfrom_versions = 1\n"),
            Ok(Role::Manager)
        );
        assert_eq!(
            infer_role("[node]\n[deltas]\nmax_waiting = 1\n"),
            Ok(Role::Node)
        );
        let e = parse::<NodeConfig>("[deltas]\nfrom_versions = 1\n").unwrap_err();
        assert_eq!(e.key, "deltas.from_versions");
        let e = infer_role("[node]\n[deltas]\nfrom_versions = 1\n").unwrap_err();
        assert!(e.message.contains("deltas.from_versions"), "{e}");
    }

    #[test]
    fn retention_bounds_are_checked_naming_the_key() {
        let mut m = ManagerConfig::default();
        assert_eq!(m.events.retain_days, 90);
        m.events.retain_days = 0;
        let e = m.validate().unwrap_err();
        assert_eq!(e.key, "events.retain_days");
        assert_eq!(
            e.to_string(),
            "events.retain_days: must be 1 to 36500 days (got 0)"
        );
        m.events.retain_days = 36_500;
        m.validate().unwrap();
        m.events.max_count = 0;
        assert_eq!(m.validate().unwrap_err().key, "events.max_count");
        m.events.max_count = 1_000_000_001;
        assert_eq!(m.validate().unwrap_err().key, "events.max_count");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse::<NodeConfig>("[upstream]\nsync_intervall_s = 3\n").unwrap_err();
        assert_eq!(e.key, "upstream.sync_intervall_s");
        let e = parse::<NodeConfig>("[upstream]\nsync_interval_s = \"x\"\n").unwrap_err();
        assert_eq!(e.key, "upstream.sync_interval_s");
        assert!(!e.to_string().contains('\n'));
        let mut n = NodeConfig::default();
        n.upstream.sync_interval_s = 0;
        assert_eq!(n.validate().unwrap_err().key, "upstream.sync_interval_s");
        n = NodeConfig::default();
        n.upstream.servers = vec!["ftp://x".into()];
        assert_eq!(n.validate().unwrap_err().key, "upstream.servers[0]");
        n.upstream.servers = vec![
            "http://a:1".into(),
            UpstreamServer {
                url: "gopher://b".into(),
                ..Default::default()
            },
        ];
        assert_eq!(n.validate().unwrap_err().key, "upstream.servers[1]");
        n.upstream.servers = vec!["ftp://x".into()];
        assert_eq!(n.validate().unwrap_err().key, "upstream.servers[0]");
        n = NodeConfig::default();
        n.limits.threads = 5000;
        assert_eq!(n.validate().unwrap_err().key, "limits.threads");
        n = NodeConfig::default();
        n.cache.memory_bytes = 1 << 20;
        n.cache.memory_item_max_bytes = 2 << 20;
        assert_eq!(n.validate().unwrap_err().key, "cache.memory_item_max_bytes");
        // 0 turns the memory cache off, whatever the item limit.
        n.cache.memory_bytes = 0;
        n.validate().unwrap();
        let e = infer_role("[log]\nformat = \"json\"\n").unwrap_err();
        assert_eq!(e.key, "(file)");
        // Found by fuzzing: an empty quoted key still gets a non-empty name in the error.
        let e = parse::<NodeConfig>("\"\"=9").unwrap_err();
        assert!(!e.key.is_empty(), "{e}");
        let e = parse::<NodeConfig>("[]\n''=\n").unwrap_err();
        assert!(!e.key.is_empty(), "{e}");
        let fuzzed = "1=['''=J1=33\n'=J\r\n''=\r\n''=\r\n[3#5#\r\n[31=33\n1=3\r\n''=\r\n\"\"\"1''=\r\n[]\x00\x00\x003\r\n''=\r\n''=\r\n[3#5#\r\n[3#6#\r\n";
        for e in [
            parse::<NodeConfig>(fuzzed).unwrap_err(),
            parse::<ManagerConfig>(fuzzed).unwrap_err(),
        ] {
            assert!(!e.key.is_empty() && !e.to_string().contains('\n'), "{e}");
        }
    }
}
