//! Layer 5: `gup agent`, the endpoint client that honours every communications setting; a
//! crowd of them is `gup loadtest`.
//!
//! Owns the client side of the contract: [`Options`] (what `gup agent` is started with), its
//! checks, [`run`] (an agent on a data dir until SIGTERM/SIGINT or the stop token),
//! [`status`] and [`add_event`] (the `status` and `event` subcommands). The parts, one concept
//! a file: `client` is the loop and what each setting does; `servers` which server it talks
//! to; `fetch` a download round and every download; `rebuild` which delta to use and the
//! rebuild of a new version from it; `patch` the delta decoder; `stream` the push stream;
//! `home` the data dir and its atomic writes; `spool` the events waiting; `apps` the applications it reports; `comms` its
//! reading of the settings; `ctx` what its tasks share and the [`Observer`] a load test
//! counts through; `wire` its own copy of the wire contract. Like every client it speaks only
//! the public client API, never imports the servers' code (`core::proto`, `serve`), and sends
//! to no URL but those of its server list.

mod apps;
mod client;
pub mod comms;
mod ctx;
mod download;
mod fetch;
pub mod home;
pub mod patch;
mod rebuild;
mod servers;
pub mod spool;
mod stream;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use client::{Agent, MIN_HEARTBEAT};
pub use comms::ConnectionMode;
pub use ctx::{http_clients, Ctx, Identity, Knobs, Observer, Quiet, Rebuilds, REQUEST_TIMEOUT};
pub use home::{DeltaCounts, Holding, Home};

use home::{load_state, valid_client_id};
use spool::{Spool, SpoolError};
use tokio_util::sync::CancellationToken;
use wire::{normalize_target, EventOut};

/// Versions of each item kept beside the current one unless told otherwise.
pub const DEFAULT_KEEP_VERSIONS: usize = 2;

/// What `gup agent` is started with.
#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    /// Where it starts (`--server`, at least one).
    pub servers: Vec<String>,
    pub install_group: String,
    pub location: Option<String>,
    pub os: String,
    pub client_version: String,
    /// `computer` or `user`.
    pub login_mode: String,
    pub user: Option<String>,
    pub client_id: Option<String>,
    pub apps_dirs: Vec<PathBuf>,
    pub keep_versions: usize,
    /// Sent on the first heartbeat while the data dir holds no credential.
    pub enroll_token: Option<String>,
    /// Rebuild new versions from deltas when an older version is held (default true;
    /// `--no-deltas` turns it off: always the full blob).
    pub use_deltas: bool,
}

/// Why an agent cannot start, or a subcommand cannot do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A flag's value is wrong (exit code 2).
    #[error("{flag}: {reason}")]
    Usage { flag: &'static str, reason: String },
    #[error(transparent)]
    Home(#[from] home::HomeError),
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

fn usage(flag: &'static str, reason: impl Into<String>) -> AgentError {
    AgentError::Usage {
        flag,
        reason: reason.into(),
    }
}

fn text_flag(flag: &'static str, v: Option<&str>, max: usize) -> Result<(), AgentError> {
    match v {
        Some(t) if t.is_empty() || t.len() > max => {
            Err(usage(flag, format!("must be 1 to {max} characters")))
        }
        Some(t) if t.chars().any(char::is_control) => {
            Err(usage(flag, "must not hold control characters"))
        }
        _ => Ok(()),
    }
}

impl Options {
    /// Checks every flag; the error names the one that is wrong.
    pub fn check(&self) -> Result<Vec<String>, AgentError> {
        if self.servers.is_empty() {
            return Err(usage("--server", "give at least one server URL"));
        }
        let servers = self
            .servers
            .iter()
            .map(|s| normalize_target(s).map_err(|r| usage("--server", format!("{s:?}: {r}"))))
            .collect::<Result<Vec<_>, _>>()?;
        text_flag("--install-group", Some(&self.install_group), 64)?;
        text_flag("--location", self.location.as_deref(), 64)?;
        text_flag("--client-version", Some(&self.client_version), 64)?;
        text_flag("--user", self.user.as_deref(), 256)?;
        if !matches!(self.os.as_str(), "windows" | "mac" | "linux") {
            return Err(usage("--os", "must be windows, mac or linux"));
        }
        match (self.login_mode.as_str(), &self.user) {
            ("user", None) => return Err(usage("--user", "--login-mode user needs --user")),
            ("computer" | "user", _) => {}
            _ => return Err(usage("--login-mode", "must be computer or user")),
        }
        if let Some(id) = &self.client_id {
            if !valid_client_id(id) {
                return Err(usage(
                    "--client-id",
                    "must be 1 to 128 printable characters without spaces",
                ));
            }
        }
        text_flag("--enroll-token", self.enroll_token.as_deref(), 256)?;
        if self.keep_versions > 100 {
            return Err(usage("--keep-versions", "at most 100"));
        }
        for d in &self.apps_dirs {
            if !d.is_dir() {
                return Err(usage(
                    "--apps-dir",
                    format!("{} is not a directory", d.display()),
                ));
            }
        }
        Ok(servers)
    }
}

/// Runs an agent on its data dir until `stop` is cancelled.
pub async fn run(opts: Options, stop: CancellationToken) -> Result<(), AgentError> {
    let servers = opts.check()?;
    let home = Home::dir(&opts.data_dir, opts.keep_versions)?;
    let client_id = home.client_id(opts.client_id.as_deref())?;
    let credential = home.credential()?;
    if credential.is_none() && opts.enroll_token.is_none() {
        tracing::info!("no credential and no enrolment token: this works only where the site's client_auth is open");
    }
    let (http, stream_http) = http_clients(8).map_err(AgentError::Http)?;
    let ctx = Ctx {
        http,
        stream_http,
        home,
        obs: Arc::new(Quiet),
        stop,
        client_id: client_id.clone(),
        id: Identity {
            install_group: Some(opts.install_group.clone()),
            location: opts.location.clone(),
            os: opts.os.clone(),
            client_version: opts.client_version.clone(),
            login_mode: opts.login_mode.clone(),
            user: opts.user.clone(),
        },
        knobs: Knobs {
            use_deltas: opts.use_deltas,
            ..Knobs::default()
        },
        // One rebuild at a time; room for the largest delta worth listing (half the largest
        // item rebuilt), so one agent never waits on itself.
        rebuilds: Arc::new(Rebuilds::new(1, patch::MAX_DELTA_ITEM / 2)),
        credential: std::sync::RwLock::new(credential),
        enroll_token: opts.enroll_token.clone(),
    };
    tracing::info!(client_id = %client_id, data_dir = %opts.data_dir.display(), servers = ?servers, "agent starting");
    Agent::new(ctx, servers, opts.apps_dirs.clone())?
        .run()
        .await;
    tracing::info!("agent stopped");
    Ok(())
}

/// What `gup agent status` shows.
#[derive(Debug, serde::Serialize)]
pub struct Status {
    pub client_id: Option<String>,
    pub install_group: Option<String>,
    pub group: Option<String>,
    pub location: Option<String>,
    pub login_mode: String,
    pub user: Option<String>,
    pub settings_serial: u64,
    pub policy_serial: u64,
    pub catalog_revision: u64,
    pub known_revision: u64,
    pub download_slot: Option<wire::DownloadSlot>,
    pub server: Option<String>,
    pub server_why: String,
    pub mode: ConnectionMode,
    pub communication_enabled: bool,
    pub download_policies_and_content: bool,
    pub items: std::collections::BTreeMap<String, home::Held>,
    pub events_waiting: usize,
    /// Whether the data dir holds a credential (the client enrolled).
    pub enrolled: bool,
    /// How the versions it installed came: full blobs or deltas, bytes of each, fallbacks.
    pub deltas: DeltaCounts,
    pub updated_at: String,
}

/// The status of the agent whose data dir is `dir` (running or not).
pub fn status(dir: &Path) -> Result<Status, AgentError> {
    if !dir.join("state.json").exists() && !dir.join("client_id").exists() {
        return Err(usage(
            "--data-dir",
            format!(
                "{} holds no agent (no client_id, no state.json)",
                dir.display()
            ),
        ));
    }
    let saved = load_state(dir, false)?;
    let client_id = std::fs::read_to_string(dir.join("client_id"))
        .ok()
        .map(|s| s.trim().to_string());
    let comms = comms::Comms::from_json(&saved.settings);
    let events_waiting = Spool::new(Some(dir)).len();
    Ok(Status {
        client_id,
        install_group: saved.install_group,
        group: saved.group,
        location: saved.location,
        login_mode: saved.login_mode,
        user: saved.user,
        settings_serial: comms.serial,
        policy_serial: saved.policy_serial,
        catalog_revision: saved.catalog_revision,
        known_revision: saved.known_revision,
        download_slot: saved.slot,
        server: saved.server,
        server_why: saved.server_why,
        mode: comms.mode,
        communication_enabled: comms.communication_enabled,
        download_policies_and_content: comms.download_policies_and_content,
        items: saved.items,
        events_waiting,
        enrolled: dir.join("credential").exists(),
        deltas: saved.deltas,
        updated_at: saved.updated_at,
    })
}

impl Status {
    /// The human form of `gup agent status`.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let or = |v: &Option<String>, d: &str| v.clone().unwrap_or_else(|| d.to_string());
        let _ = writeln!(s, "client id        {}", or(&self.client_id, "(none yet)"));
        let _ = writeln!(
            s,
            "enrolled         {}",
            if self.enrolled { "yes" } else { "no" }
        );
        let _ = writeln!(
            s,
            "group            {} (installed in {})",
            or(&self.group, "(not placed yet)"),
            or(&self.install_group, "default")
        );
        let _ = writeln!(s, "location         {}", or(&self.location, "(none)"));
        let _ = writeln!(
            s,
            "login            {}{}",
            self.login_mode,
            self.user
                .as_ref()
                .map(|u| format!(" as {u}"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "server           {} ({})",
            or(&self.server, "(none answered yet)"),
            self.server_why
        );
        let _ = writeln!(
            s,
            "settings         serial {}, mode {}, communication {}, downloads {}",
            self.settings_serial,
            self.mode,
            if self.communication_enabled {
                "on"
            } else {
                "off"
            },
            if self.download_policies_and_content {
                "on"
            } else {
                "off"
            }
        );
        let _ = writeln!(s, "policy           serial {}", self.policy_serial);
        let _ = writeln!(
            s,
            "catalog          revision {} held, {} known",
            self.catalog_revision, self.known_revision
        );
        let slot = match &self.download_slot {
            Some(d) => format!(
                "revision {} not before {}",
                d.catalog_revision,
                d.not_before.as_deref().unwrap_or("?")
            ),
            None => "none".into(),
        };
        let _ = writeln!(s, "download slot    {slot}");
        let _ = writeln!(s, "events waiting   {}", self.events_waiting);
        let _ = writeln!(s, "content          {} items", self.items.len());
        for (name, h) in &self.items {
            let _ = writeln!(
                s,
                "  {name}  {}  {} bytes  {}",
                h.version.as_deref().unwrap_or("-"),
                h.size,
                &h.sha256[..h.sha256.len().min(12)]
            );
        }
        let d = &self.deltas;
        let _ = writeln!(
            s,
            "installed via    full {} ({} bytes), delta {} ({} bytes), edge delta {} ({} bytes)",
            d.via_full,
            d.full_bytes,
            d.via_delta,
            d.delta_bytes,
            d.via_edge_delta,
            d.edge_delta_bytes
        );
        let _ = writeln!(
            s,
            "delta fallbacks  {} ({} delta bytes wasted), no edge delta {}{}",
            d.fallbacks,
            d.wasted_delta_bytes,
            d.no_delta,
            d.last_fallback
                .as_ref()
                .map(|w| format!("; last: {w}"))
                .unwrap_or_default()
        );
        let _ = writeln!(s, "state written    {}", self.updated_at);
        s
    }
}

/// `gup agent event`: spools one event for the agent of `dir` to upload.
pub fn add_event(
    dir: &Path,
    kind: &str,
    subkind: Option<&str>,
    data: Option<&str>,
) -> Result<String, AgentError> {
    if !dir.join("spool").is_dir() {
        return Err(usage(
            "--data-dir",
            format!(
                "{} has no spool/ (start the agent on it once)",
                dir.display()
            ),
        ));
    }
    let data = match data {
        Some(d) => {
            serde_json::from_str(d).map_err(|e| usage("--data", format!("not JSON: {e}")))?
        }
        None => serde_json::json!({}),
    };
    let id = format!("{:032x}", rand::random::<u128>());
    let ev = EventOut {
        id: id.clone(),
        kind: kind.to_string(),
        subkind: subkind.unwrap_or("").to_string(),
        time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        data,
    };
    Spool::new(Some(dir)).add(ev).map_err(|e| match e {
        SpoolError::Bad(reason) => usage("--kind", reason),
        other => other.into(),
    })?;
    Ok(id)
}
