//! Settings: the group tree, the communications settings each group (and each location of a
//! group) sets for itself, how they inherit down the tree, the site-wide settings, the policy
//! documents, and the pure rules that decide which group a (re)connecting client belongs to.
//!
//! This folder owns that whole model, one concept per file: this file holds the small enums,
//! the effective [`Settings`] a client receives, and the errors; `keys` the eleven leaf keys,
//! their validators and the keys one group or location sets itself ([`Overrides`]);
//! `directory` the group tree ([`Directory`]), the changes admins make to it and how it is
//! read back; `reconnection` the rules of [`resolve_client_group`]. Every public item is
//! re-exported here, so callers only ever name `core::settings::X`.
//!
//! Everything here is plain data plus pure functions. This module must never do I/O, read the
//! clock (times only arrive as arguments), speak HTTP or touch storage: callers persist a
//! [`Directory`] by serializing it with serde, and a node that receives one in `/v1/sync`
//! computes effective settings with exactly the same code as the manager.
//!
//! Resolution order for a key of group G at location L (contract, "Resolutions"): the first
//! that sets it among G@L, G, parent@L, parent, ..., default@L, default, then the built-in
//! default. Group-only keys are never read from a location.
//!
//! Within the crate, nothing in this folder imports anything outside `crate::core`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fault::{Fault, Kind};

mod check;
mod directory;
mod keys;
mod reconnection;
mod site;

pub use directory::{
    validate_name, ClientAuth, Directory, Group, GroupInfo, Policy, PutOutcome, SiteSettings,
    DEFAULT_GROUP, MAX_DAMPER_S, MAX_GROUP_DEPTH, MAX_NAME_LEN, MAX_POLICY_BYTES,
};
pub use keys::{key_spec, KeySpec, Overrides, Scope, KEYS, MAX_INTERVAL_S};
pub use reconnection::{resolve_client_group, ClientHistory, HeartbeatFacts};

// === Errors ===

/// What went wrong with a settings request; `Display` is a one-line message naming what and
/// why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// The request is malformed or breaks a rule. `key` names the offending key (a dotted
    /// settings path, or `group`, `location`, `parent`, `body`, ...); `message` is the full
    /// human sentence and always mentions the key.
    #[error("{message}")]
    BadRequest {
        /// The offending key, for clients that want to highlight a field.
        key: String,
        /// One line naming the key and the rule it broke.
        message: String,
    },
    /// The named group does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is well formed but the current state forbids it.
    #[error("{0}")]
    Conflict(String),
    /// A document over its bound (a policy over `MAX_POLICY_BYTES`).
    #[error("{0}")]
    TooLarge(String),
}

impl SettingsError {
    fn bad(key: &str, message: impl Into<String>) -> Self {
        SettingsError::BadRequest {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

impl Fault for SettingsError {
    fn kind(&self) -> Kind {
        match self {
            SettingsError::BadRequest { .. } => Kind::BadInput,
            SettingsError::NotFound(_) => Kind::NotFound,
            SettingsError::Conflict(_) => Kind::Conflict,
            SettingsError::TooLarge(_) => Kind::TooLarge,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            SettingsError::BadRequest { .. } => "bad_setting",
            SettingsError::NotFound(_) => "not_found",
            SettingsError::Conflict(_) => "conflict",
            SettingsError::TooLarge(_) => "policy_too_large",
        }
    }
}

/// A short rendering of a JSON value for error messages, so a huge body cannot make a huge
/// error line.
fn brief(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let cut: String = s.chars().take(57).collect();
        format!("{cut}...")
    } else {
        s
    }
}

// === Small enums ===

/// Connection mode in settings (`mode` key, `--mode`): how a client learns of changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionMode {
    /// Hold `/v1/stream` open and hear of changes at once.
    Push,
    /// Learn of changes at the next heartbeat.
    #[default]
    Pull,
}

/// Login mode in a heartbeat (`mode` key of the heartbeat body): whether the client belongs
/// to a group by computer or by its logged-in user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoginMode {
    /// The computer's group decides.
    #[default]
    Computer,
    /// The logged-in user's group decides (see [`resolve_client_group`]).
    User,
}

/// A client's operating system. Some settings only apply to some platforms (contract,
/// "Platforms").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Os {
    /// Windows: the default when a heartbeat does not say.
    #[default]
    Windows,
    /// macOS.
    Mac,
    /// Linux.
    Linux,
}

macro_rules! str_enum {
    ($ty:ident, $what:literal, $($var:ident => $s:literal),+) => {
        impl $ty {
            /// The wire spelling.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$var => $s),+ }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($ty::$var),)+
                    other => Err(format!(
                        concat!($what, " must be one of {} (got {:?})"),
                        [$($s),+].join(", "),
                        other
                    )),
                }
            }
        }
    };
}

str_enum!(ConnectionMode, "mode", Push => "push", Pull => "pull");
str_enum!(LoginMode, "mode", Computer => "computer", User => "user");
str_enum!(Os, "os", Windows => "windows", Mac => "mac", Linux => "linux");

impl Os {
    /// Whether `reconnection.use_last_group` has any effect for this platform (Windows, Mac).
    pub fn honours_use_last_group(self) -> bool {
        matches!(self, Os::Windows | Os::Mac)
    }

    /// Whether `reconnection.use_last_mode` has any effect for this platform (Windows only).
    pub fn honours_use_last_mode(self) -> bool {
        matches!(self, Os::Windows)
    }

    /// Whether `upload_critical_events_immediately` has any effect for this platform
    /// (Windows only).
    pub fn honours_immediate_upload(self) -> bool {
        matches!(self, Os::Windows)
    }
}

// === Effective settings ===

/// One entry of the management server list a client talks to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManagementServer {
    /// Base URL, `http` or `https`.
    pub url: String,
    /// Lower numbers are tried first; clients pick at random among equal priorities.
    pub priority: u32,
}

/// Download randomization: spreads download starts over a window after each catalog revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Randomization {
    /// Off means no download slot: clients download at once.
    pub enabled: bool,
    /// Width of the window in seconds; 0 behaves like off.
    pub window_s: u64,
}

impl Default for Randomization {
    fn default() -> Self {
        Randomization {
            enabled: true,
            window_s: 3600,
        }
    }
}

/// What a reconnecting client does (group-only keys; see [`resolve_client_group`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Reconnection {
    /// On: a reconnecting Windows or Mac client stays in the group it was last in instead
    /// of returning to its install group.
    pub use_last_group: bool,
    /// On: a new user on a Windows client in user mode does not move the client to the
    /// user's group; it stays in the previous user's group.
    pub use_last_mode: bool,
}

/// Fully resolved effective settings for one group and location, serialized exactly as the
/// contract's nested JSON (field order included). Responses add `serial` beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Off: the client stops talking to its servers (except to learn this flag changed).
    pub communication_enabled: bool,
    /// Empty means "the manager itself". Sorted by priority (stable).
    pub management_servers: Vec<ManagementServer>,
    /// Group-only: whether clients download policies and content at all.
    pub download_policies_and_content: bool,
    /// Push or pull.
    pub mode: ConnectionMode,
    /// Seconds between heartbeats.
    pub heartbeat_interval_s: u64,
    /// Effective value is false unless the site-wide `application_learning` is on.
    pub learn_applications: bool,
    /// Windows clients at 12.1.4 or later upload critical events at once when on.
    pub upload_critical_events_immediately: bool,
    /// Download slot randomization.
    pub randomization: Randomization,
    /// Reconnection behaviour (group-only).
    pub reconnection: Reconnection,
}

impl Default for Settings {
    /// The contract's built-in defaults.
    fn default() -> Self {
        Settings {
            communication_enabled: true,
            management_servers: Vec::new(),
            download_policies_and_content: true,
            mode: ConnectionMode::Pull,
            heartbeat_interval_s: 300,
            learn_applications: false,
            upload_critical_events_immediately: true,
            randomization: Randomization::default(),
            reconnection: Reconnection::default(),
        }
    }
}

// === Tests ===

#[cfg(test)]
mod test_support;

#[cfg(test)]
mod tests;
