//! Settings: the group tree, the communications settings each group (and each location of a
//! group) sets for itself, how they inherit down the tree, the site-wide settings, the policy
//! documents, and the pure rules that decide which group a (re)connecting client belongs to.
//!
//! Everything here is plain data plus pure functions. This module must never do I/O, read the
//! clock (times only arrive as arguments), speak HTTP or touch storage: callers persist a
//! [`Directory`] by serializing it with serde, and a node that receives one in `/v1/sync`
//! computes effective settings with exactly the same code as the manager.
//!
//! Resolution order for a key of group G at location L (contract, "Resolutions"): the first
//! that sets it among G@L, G, parent@L, parent, ..., default@L, default, then the built-in
//! default. Group-only keys are never read from a location.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::fault::{Fault, Kind};

/// Name of the root group. It always exists, has no parent and cannot be deleted.
pub const DEFAULT_GROUP: &str = "default";

/// Largest heartbeat interval and randomization window accepted: one week, in seconds.
pub const MAX_INTERVAL_S: u64 = 604_800;

/// Longest group or location name.
pub const MAX_NAME_LEN: usize = 64;

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
        }
    }

    fn code(&self) -> &'static str {
        match self {
            SettingsError::BadRequest { .. } => "bad_setting",
            SettingsError::NotFound(_) => "not_found",
            SettingsError::Conflict(_) => "conflict",
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

// === Keys ===

/// Where a key may be set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Only on a group; setting it on a location is rejected naming the key.
    GroupOnly,
    /// On a group, and a location of a group may override it.
    Location,
}

/// One leaf settings key: its dotted path, scope, validator and how it lands in [`Settings`].
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// Dotted path, e.g. `randomization.window_s`.
    pub path: &'static str,
    /// Whether a location may override it.
    pub scope: Scope,
    /// Checks a value and returns its normalized form, or a message naming the key and rule.
    validate: fn(&'static str, &Value) -> Result<Value, String>,
    /// Writes an already validated value into a `Settings`; false if it does not fit.
    apply: fn(&mut Settings, &Value) -> bool,
}

impl KeySpec {
    /// Validates `value` for this key and returns the normalized value to store.
    pub fn validate(&self, value: &Value) -> Result<Value, SettingsError> {
        (self.validate)(self.path, value).map_err(|m| SettingsError::bad(self.path, m))
    }

    /// The built-in default of this key as JSON.
    pub fn default_value(&self) -> Value {
        let all = serde_json::to_value(Settings::default()).unwrap_or(Value::Null);
        all.pointer(&format!("/{}", self.path.replace('.', "/")))
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Validates and writes `value` into `settings`; false (and `settings` untouched) when
    /// the value is invalid, so a corrupt mirror falls through to the next level.
    fn try_apply(&self, settings: &mut Settings, value: &Value) -> bool {
        match (self.validate)(self.path, value) {
            Ok(norm) => (self.apply)(settings, &norm),
            Err(_) => false,
        }
    }
}

fn set<T: DeserializeOwned>(slot: &mut T, v: &Value) -> bool {
    match T::deserialize(v) {
        Ok(x) => {
            *slot = x;
            true
        }
        Err(_) => false,
    }
}

fn v_bool(path: &'static str, v: &Value) -> Result<Value, String> {
    match v {
        Value::Bool(_) => Ok(v.clone()),
        other => Err(format!("{path} must be a boolean (got {})", brief(other))),
    }
}

fn v_heartbeat(path: &'static str, v: &Value) -> Result<Value, String> {
    v_int_range(path, v, 1, MAX_INTERVAL_S)
}

fn v_window(path: &'static str, v: &Value) -> Result<Value, String> {
    v_int_range(path, v, 0, MAX_INTERVAL_S)
}

fn v_int_range(path: &'static str, v: &Value, lo: u64, hi: u64) -> Result<Value, String> {
    match v.as_u64() {
        Some(n) if (lo..=hi).contains(&n) => Ok(Value::from(n)),
        _ => Err(format!(
            "{path} must be an integer from {lo} to {hi} (got {})",
            brief(v)
        )),
    }
}

fn v_mode(path: &'static str, v: &Value) -> Result<Value, String> {
    match v.as_str().map(ConnectionMode::from_str) {
        Some(Ok(m)) => Ok(Value::from(m.as_str())),
        _ => Err(format!(
            "{path} must be \"push\" or \"pull\" (got {})",
            brief(v)
        )),
    }
}

fn v_servers(path: &'static str, v: &Value) -> Result<Value, String> {
    let items = v.as_array().ok_or_else(|| {
        format!(
            "{path} must be an array of {{url, priority}} objects (got {})",
            brief(v)
        )
    })?;
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let obj = item.as_object().ok_or_else(|| {
            format!(
                "{at} must be an object {{url, priority}} (got {})",
                brief(item)
            )
        })?;
        if let Some(k) = obj.keys().find(|k| *k != "url" && *k != "priority") {
            return Err(format!(
                "{at} has unknown field {k:?} (only url and priority are allowed)"
            ));
        }
        let url = obj
            .get("url")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("{at}.url is required and must be a string"))?;
        let parsed = url::Url::parse(url)
            .map_err(|e| format!("{at}.url {url:?} is not a valid URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!(
                "{at}.url {url:?} must use http or https (got scheme {:?})",
                parsed.scheme()
            ));
        }
        let priority = obj
            .get("priority")
            .and_then(Value::as_u64)
            .filter(|p| *p >= 1)
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| {
                format!(
                    "{at}.priority must be an integer from 1 to {} (got {})",
                    u32::MAX,
                    obj.get("priority")
                        .map(brief)
                        .unwrap_or_else(|| "nothing".into())
                )
            })?;
        out.push(ManagementServer {
            url: url.to_string(),
            priority,
        });
    }
    // Stable: equal priorities keep the order the admin gave.
    out.sort_by_key(|s| s.priority);
    serde_json::to_value(out).map_err(|e| format!("{path}: {e}"))
}

/// The eleven leaf keys, in the contract's order.
pub const KEYS: &[KeySpec] = &[
    KeySpec {
        path: "communication_enabled",
        scope: Scope::Location,
        validate: v_bool,
        apply: |s, v| set(&mut s.communication_enabled, v),
    },
    KeySpec {
        // The contract does not let a location override the server list.
        path: "management_servers",
        scope: Scope::GroupOnly,
        validate: v_servers,
        apply: |s, v| set(&mut s.management_servers, v),
    },
    KeySpec {
        path: "download_policies_and_content",
        scope: Scope::GroupOnly,
        validate: v_bool,
        apply: |s, v| set(&mut s.download_policies_and_content, v),
    },
    KeySpec {
        path: "mode",
        scope: Scope::Location,
        validate: v_mode,
        apply: |s, v| set(&mut s.mode, v),
    },
    KeySpec {
        path: "heartbeat_interval_s",
        scope: Scope::Location,
        validate: v_heartbeat,
        apply: |s, v| set(&mut s.heartbeat_interval_s, v),
    },
    KeySpec {
        path: "learn_applications",
        scope: Scope::Location,
        validate: v_bool,
        apply: |s, v| set(&mut s.learn_applications, v),
    },
    KeySpec {
        path: "upload_critical_events_immediately",
        scope: Scope::Location,
        validate: v_bool,
        apply: |s, v| set(&mut s.upload_critical_events_immediately, v),
    },
    KeySpec {
        path: "randomization.enabled",
        scope: Scope::Location,
        validate: v_bool,
        apply: |s, v| set(&mut s.randomization.enabled, v),
    },
    KeySpec {
        path: "randomization.window_s",
        scope: Scope::Location,
        validate: v_window,
        apply: |s, v| set(&mut s.randomization.window_s, v),
    },
    KeySpec {
        path: "reconnection.use_last_group",
        scope: Scope::GroupOnly,
        validate: v_bool,
        apply: |s, v| set(&mut s.reconnection.use_last_group, v),
    },
    KeySpec {
        path: "reconnection.use_last_mode",
        scope: Scope::GroupOnly,
        validate: v_bool,
        apply: |s, v| set(&mut s.reconnection.use_last_mode, v),
    },
];

/// Looks up a key by its dotted path.
pub fn key_spec(path: &str) -> Option<&'static KeySpec> {
    KEYS.iter().find(|k| k.path == path)
}

/// Whether `prefix` is an object holding leaf keys (`randomization`, `reconnection`).
fn is_key_prefix(prefix: &str) -> bool {
    KEYS.iter().any(|k| {
        k.path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.'))
    })
}

// === Overrides ===

/// The keys one group or one location sets itself: dotted path -> validated JSON value.
/// A key that is absent inherits. Only [`Directory::put_settings`] adds keys, after
/// validation; values coming from a mirror are validated again when resolved.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Overrides(BTreeMap<String, Value>);

impl Overrides {
    /// An empty set (inherits everything).
    pub fn new() -> Self {
        Overrides::default()
    }

    /// The value set for a dotted path, if any.
    pub fn get(&self, path: &str) -> Option<&Value> {
        self.0.get(path)
    }

    /// Whether nothing is set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Number of keys set.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The keys set, as (dotted path, value), sorted by path.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The keys set, as nested JSON (`{"randomization":{"window_s":60}}`).
    pub fn to_nested(&self) -> Value {
        let mut root = Map::new();
        for (path, v) in &self.0 {
            insert_path(&mut root, path, v.clone());
        }
        Value::Object(root)
    }
}

/// Inserts `v` at a dotted `path`, making intermediate objects as needed.
fn insert_path(map: &mut Map<String, Value>, path: &str, v: Value) {
    match path.split_once('.') {
        None => {
            map.insert(path.to_string(), v);
        }
        Some((head, rest)) => {
            let entry = map
                .entry(head.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(m) = entry {
                insert_path(m, rest, v);
            } else {
                let mut m = Map::new();
                insert_path(&mut m, rest, v);
                *entry = Value::Object(m);
            }
        }
    }
}

// === Site, policy, group ===

/// Site-wide settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SiteSettings {
    /// Gate for application learning: off forces every group's effective
    /// `learn_applications` to false and makes `/v1/applications` answer 403.
    pub application_learning: bool,
    /// At most one admin notification per (group, kind) per this many seconds.
    pub notification_damper_s: u64,
}

impl Default for SiteSettings {
    fn default() -> Self {
        SiteSettings {
            application_learning: false,
            notification_damper_s: 3600,
        }
    }
}

/// A group's policy document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// From the directory's one counter, so a serial (and so an ETag) is never reused.
    pub serial: u64,
    /// Any JSON the admin stored.
    pub document: Value,
}

/// One group of the tree.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// `None` only for `default`, the root.
    pub parent: Option<String>,
    /// Keys this group sets itself.
    #[serde(default)]
    pub own: Overrides,
    /// Location name -> the keys that location overrides. A location absent here uses the
    /// group's settings (`use_group_settings: true`).
    #[serde(default)]
    pub locations: BTreeMap<String, Overrides>,
    /// This group's own policy; `None` inherits the nearest ancestor's.
    #[serde(default)]
    pub policy: Option<Policy>,
    /// Counter value at the last change of this group's own keys, locations or parent; the
    /// settings ETag is the largest such serial up the chain (see
    /// [`Directory::settings_serial`]).
    #[serde(default)]
    pub serial: u64,
}

/// Result of [`Directory::put_group`]: maps to 201, 200 and 200.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The group did not exist (HTTP 201).
    Created,
    /// The group moved to another parent (HTTP 200).
    Changed,
    /// The group already had this parent (HTTP 200, nothing changed, no serial bump).
    Unchanged,
}

/// One row of the admin group listing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Parent name; `None` for `default`.
    pub parent: Option<String>,
    /// Number of direct children.
    pub children: usize,
    /// The keys the group sets itself, nested JSON.
    pub settings: Value,
    /// Location name -> the keys it overrides, nested JSON.
    pub locations: BTreeMap<String, Value>,
    /// Serial of the group's own policy, if it has one.
    pub policy_serial: Option<u64>,
    /// The group's effective settings serial (see [`Directory::settings_serial`]).
    pub serial: u64,
}

/// Checks a group or location name: 1 to 64 characters of `[A-Za-z0-9._-]`, and not `.` or
/// `..` (they would not survive URL path normalization).
pub fn validate_name(key: &str, name: &str) -> Result<(), SettingsError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if name.is_empty() || name.len() > MAX_NAME_LEN || !ok_chars {
        return Err(SettingsError::bad(
            key,
            format!(
                "{key} name {:?} must be 1 to {MAX_NAME_LEN} characters of A-Z a-z 0-9 . _ -",
                name.chars().take(80).collect::<String>()
            ),
        ));
    }
    if name == "." || name == ".." {
        return Err(SettingsError::bad(
            key,
            format!("{key} name {name:?} is reserved"),
        ));
    }
    Ok(())
}

// === Directory ===

/// The whole mirrored state: group tree, per-group keys and location overrides, policies and
/// site settings. The manager owns it; a node receives it in `/v1/sync` and computes effective
/// settings with the same code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Directory {
    /// Group name -> group. Always holds `default`.
    pub groups: BTreeMap<String, Group>,
    /// Site-wide settings.
    #[serde(default)]
    pub site: SiteSettings,
    /// One counter for settings serials, site serials and policy serials, so an ETag is
    /// never reused. Bumped on every change.
    pub counter: u64,
    /// Counter value at the last site settings change; part of every settings serial since
    /// `application_learning` gates `learn_applications` everywhere.
    #[serde(default)]
    pub site_serial: u64,
}

impl Default for Directory {
    /// Only `default` (no parent, serial 0), counter 0, default site settings.
    fn default() -> Self {
        let mut groups = BTreeMap::new();
        groups.insert(DEFAULT_GROUP.to_string(), Group::default());
        Directory {
            groups,
            site: SiteSettings::default(),
            counter: 0,
            site_serial: 0,
        }
    }
}

/// A flattened, validated settings body: dotted path -> new value (`None` = inherit).
type Changes = BTreeMap<&'static str, Option<Value>>;

impl Directory {
    fn bump(&mut self) -> u64 {
        self.counter = self.counter.saturating_add(1);
        self.counter
    }

    /// The group name if it exists, else `default`.
    pub fn resolve_group<'a>(&'a self, name: &str) -> &'a str {
        match self.groups.get_key_value(name) {
            Some((k, _)) => k.as_str(),
            None => DEFAULT_GROUP,
        }
    }

    /// The chain from the resolved group up to the root, nearest first. Cycle-safe and
    /// always ending with `default` (when it exists), even for a corrupt mirror.
    pub fn ancestors<'a>(&'a self, group: &str) -> Vec<(&'a str, &'a Group)> {
        let mut out: Vec<(&'a str, &'a Group)> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut cur = Some(self.resolve_group(group));
        while let Some(name) = cur {
            let Some((k, g)) = self.groups.get_key_value(name) else {
                break;
            };
            if !seen.insert(k.as_str()) {
                break;
            }
            out.push((k.as_str(), g));
            cur = g.parent.as_deref();
        }
        if !seen.contains(DEFAULT_GROUP) {
            if let Some((k, g)) = self.groups.get_key_value(DEFAULT_GROUP) {
                out.push((k.as_str(), g));
            }
        }
        out
    }

    /// The group and all its descendants (pre-order, children sorted by name). Empty for an
    /// unknown group.
    pub fn descendants(&self, group: &str) -> Vec<String> {
        if !self.groups.contains_key(group) {
            return Vec::new();
        }
        let mut children: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, g) in &self.groups {
            if let Some(p) = g.parent.as_deref() {
                children.entry(p).or_default().push(name.as_str());
            }
        }
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        let mut stack = vec![group];
        while let Some(name) = stack.pop() {
            if !seen.insert(name) {
                continue;
            }
            out.push(name.to_string());
            if let Some(kids) = children.get(name) {
                stack.extend(kids.iter().rev());
            }
        }
        out
    }

    /// Creates `name` under `parent`, or moves it there.
    ///
    /// Errors: a bad name (`group`) -> BadRequest; `parent` unknown -> BadRequest naming
    /// `parent`; `default` can never be given a parent -> Conflict; a move that would put a
    /// group under itself or one of its descendants -> Conflict naming the cycle. Creating or
    /// moving bumps the counter and sets the group's serial to it.
    pub fn put_group(&mut self, name: &str, parent: &str) -> Result<PutOutcome, SettingsError> {
        validate_name("group", name)?;
        if name == DEFAULT_GROUP {
            return Err(SettingsError::Conflict(
                "group default is the root of the tree and cannot have a parent".into(),
            ));
        }
        if !self.groups.contains_key(parent) {
            return Err(SettingsError::bad(
                "parent",
                format!("parent group {parent:?} does not exist"),
            ));
        }
        match self.groups.get(name) {
            None => {
                let serial = self.bump();
                self.groups.insert(
                    name.to_string(),
                    Group {
                        parent: Some(parent.to_string()),
                        serial,
                        ..Group::default()
                    },
                );
                Ok(PutOutcome::Created)
            }
            Some(g) if g.parent.as_deref() == Some(parent) => Ok(PutOutcome::Unchanged),
            Some(_) => {
                // Walk up from the new parent; meeting `name` means a cycle.
                let chain: Vec<&str> = self.ancestors(parent).iter().map(|(n, _)| *n).collect();
                if let Some(pos) = chain.iter().position(|n| *n == name) {
                    let mut cycle: Vec<&str> = chain.iter().take(pos + 1).copied().collect();
                    cycle.reverse();
                    cycle.push(name);
                    return Err(SettingsError::Conflict(format!(
                        "moving group {name} under {parent} would create a cycle: {} (parent -> child)",
                        cycle.join(" -> ")
                    )));
                }
                let serial = self.bump();
                if let Some(g) = self.groups.get_mut(name) {
                    g.parent = Some(parent.to_string());
                    g.serial = serial;
                }
                Ok(PutOutcome::Changed)
            }
        }
    }

    /// Deletes a group. Unknown -> NotFound; `default` -> Conflict; a group with children ->
    /// Conflict naming them; `has_clients` (the caller's registry knows) -> Conflict.
    pub fn delete_group(&mut self, name: &str, has_clients: bool) -> Result<(), SettingsError> {
        if !self.groups.contains_key(name) {
            return Err(SettingsError::NotFound(format!(
                "group {name} does not exist"
            )));
        }
        if name == DEFAULT_GROUP {
            return Err(SettingsError::Conflict(
                "group default cannot be deleted".into(),
            ));
        }
        let kids: Vec<&str> = self
            .groups
            .iter()
            .filter(|(_, g)| g.parent.as_deref() == Some(name))
            .map(|(n, _)| n.as_str())
            .collect();
        if !kids.is_empty() {
            return Err(SettingsError::Conflict(format!(
                "group {name} still has child groups: {}",
                kids.join(", ")
            )));
        }
        if has_clients {
            return Err(SettingsError::Conflict(format!(
                "group {name} still has clients; move or delete them first"
            )));
        }
        self.groups.remove(name);
        Ok(())
    }

    /// Flattens and validates a partial settings body (nested or dotted keys).
    fn parse_body(
        body: &Value,
        location: Option<&str>,
    ) -> Result<(Changes, Option<bool>), SettingsError> {
        let obj = body.as_object().ok_or_else(|| {
            SettingsError::bad(
                "body",
                format!(
                    "body must be a JSON object of settings (got {})",
                    brief(body)
                ),
            )
        })?;
        let mut raw: Vec<(&'static KeySpec, &Value)> = Vec::new();
        let mut use_group = None;
        for (k, v) in obj {
            if k == "use_group_settings" {
                if location.is_none() {
                    return Err(SettingsError::bad(
                        k,
                        "use_group_settings only applies to a location (?location=L)",
                    ));
                }
                match v {
                    Value::Bool(b) => use_group = Some(*b),
                    other => {
                        return Err(SettingsError::bad(
                            k,
                            format!(
                                "use_group_settings must be a boolean (got {})",
                                brief(other)
                            ),
                        ))
                    }
                }
            } else if let Some(spec) = key_spec(k) {
                raw.push((spec, v));
            } else if is_key_prefix(k) {
                match v {
                    // `"randomization": null` resets every key under it.
                    Value::Null => raw.extend(
                        KEYS.iter()
                            .filter(|s| s.path.starts_with(&format!("{k}.")))
                            .map(|s| (s, v)),
                    ),
                    Value::Object(m) => {
                        for (sub, sv) in m {
                            let full = format!("{k}.{sub}");
                            let spec = key_spec(&full).ok_or_else(|| {
                                SettingsError::bad(&full, format!("unknown settings key {full}"))
                            })?;
                            raw.push((spec, sv));
                        }
                    }
                    other => {
                        return Err(SettingsError::bad(
                            k,
                            format!("{k} must be an object (got {})", brief(other)),
                        ))
                    }
                }
            } else {
                return Err(SettingsError::bad(k, format!("unknown settings key {k}")));
            }
        }
        let mut changes = Changes::new();
        for (spec, v) in raw {
            if location.is_some() && spec.scope == Scope::GroupOnly {
                return Err(SettingsError::bad(
                    spec.path,
                    format!(
                        "{} is group-only and cannot be set on a location",
                        spec.path
                    ),
                ));
            }
            let value = if v.is_null() {
                None
            } else {
                Some(spec.validate(v)?)
            };
            if changes.insert(spec.path, value).is_some() {
                return Err(SettingsError::bad(
                    spec.path,
                    format!("{} is set twice in one body", spec.path),
                ));
            }
        }
        if use_group == Some(true) && !changes.is_empty() {
            return Err(SettingsError::bad(
                "use_group_settings",
                "use_group_settings: true clears the location override and cannot be combined with other keys",
            ));
        }
        Ok((changes, use_group))
    }

    /// Sets some of a group's (or one of its locations') own keys from a partial body.
    ///
    /// The body nests (`{"randomization":{"window_s":60}}`) or uses dotted keys
    /// (`{"randomization.window_s":60}`); a key set to `null` goes back to inheriting. With a
    /// location: group-only keys are rejected naming the key, `{"use_group_settings": true}`
    /// alone removes the location's override, `{"use_group_settings": false}` alone creates an
    /// empty one. All-or-nothing: on any error nothing changes.
    ///
    /// Returns the groups whose effective settings may have changed (the group and all its
    /// descendants), or an empty list when the body changed nothing (then no serial moves).
    pub fn put_settings(
        &mut self,
        group: &str,
        location: Option<&str>,
        body: &Value,
    ) -> Result<Vec<String>, SettingsError> {
        if let Some(l) = location {
            validate_name("location", l)?;
        }
        let current = self
            .groups
            .get(group)
            .ok_or_else(|| SettingsError::NotFound(format!("group {group} does not exist")))?;
        let (changes, use_group) = Self::parse_body(body, location)?;

        let mut next = current.clone();
        match location {
            None => apply_changes(&mut next.own, changes),
            Some(l) if use_group == Some(true) => {
                next.locations.remove(l);
            }
            Some(l) => {
                // Any key (or `use_group_settings: false`) makes the location override; an
                // empty body leaves it as it is.
                if !changes.is_empty() || use_group == Some(false) {
                    let ov = next.locations.entry(l.to_string()).or_default();
                    apply_changes(ov, changes);
                }
            }
        }
        if next == *current {
            return Ok(Vec::new());
        }
        next.serial = self.bump();
        self.groups.insert(group.to_string(), next);
        Ok(self.descendants(group))
    }

    /// Effective settings for a group (unknown -> `default`) at an optional location.
    ///
    /// Per key, the first that sets it among G@L, G, parent@L, parent, ..., default@L,
    /// default, then the built-in default. Group-only keys are never read from a location. A
    /// stored value that fails validation (corrupt mirror) is skipped. `learn_applications`
    /// is forced false unless the site's `application_learning` is on.
    pub fn effective(&self, group: &str, location: Option<&str>) -> Settings {
        let chain = self.ancestors(group);
        let mut s = Settings::default();
        for spec in KEYS {
            'levels: for (_, g) in &chain {
                if let (Some(l), Scope::Location) = (location, spec.scope) {
                    if let Some(v) = g.locations.get(l).and_then(|o| o.get(spec.path)) {
                        if spec.try_apply(&mut s, v) {
                            break 'levels;
                        }
                    }
                }
                if let Some(v) = g.own.get(spec.path) {
                    if spec.try_apply(&mut s, v) {
                        break 'levels;
                    }
                }
            }
        }
        if !self.site.application_learning {
            s.learn_applications = false;
        }
        s
    }

    /// The settings serial of a group (unknown -> `default`): the largest serial over the
    /// group and its ancestors and the site serial, so a change anywhere up the chain or in
    /// the site settings gives a new value.
    pub fn settings_serial(&self, group: &str) -> u64 {
        self.ancestors(group)
            .iter()
            .map(|(_, g)| g.serial)
            .fold(self.site_serial, u64::max)
    }

    /// A strong ETag (quotes included) for `GET /v1/groups/{group}/settings`. It names the
    /// resolved group as well as the serial: once a group is deleted its URL serves
    /// `default`'s settings, whose serial alone may equal one the deleted group once served.
    pub fn settings_etag(&self, group: &str, location: Option<&str>) -> String {
        let resolved = self.resolve_group(group);
        let serial = self.settings_serial(group);
        match location {
            Some(l) => format!("\"s{serial}-{resolved}@{l}\""),
            None => format!("\"s{serial}-{resolved}\""),
        }
    }

    /// Stores a group's policy document; returns its new serial (from the one counter).
    pub fn put_policy(&mut self, group: &str, document: Value) -> Result<u64, SettingsError> {
        if !self.groups.contains_key(group) {
            return Err(SettingsError::NotFound(format!(
                "group {group} does not exist"
            )));
        }
        let serial = self.bump();
        if let Some(g) = self.groups.get_mut(group) {
            g.policy = Some(Policy { serial, document });
        }
        Ok(serial)
    }

    /// Why application learning is refused for a client of `group` at `location`, if it is:
    /// the site switch first, then the group's effective `learn_applications`.
    pub fn learning_refusal(&self, group: &str, location: Option<&str>) -> Option<String> {
        if !self.site.application_learning {
            return Some("application learning is off for the site (application_learning)".into());
        }
        if !self.effective(group, location).learn_applications {
            return Some(format!(
                "application learning is off for group {group:?} (learn_applications)"
            ));
        }
        None
    }

    /// The policy serial a client of `group` should have (0: no policy anywhere up the tree).
    pub fn policy_serial(&self, group: &str) -> u64 {
        self.policy(group).map_or(0, |(_, p)| p.serial)
    }

    /// The policy that applies to a group (unknown -> `default`'s chain): its own or the
    /// nearest ancestor's, with the name of the group that owns it.
    pub fn policy(&self, group: &str) -> Option<(&str, &Policy)> {
        self.ancestors(group)
            .into_iter()
            .find_map(|(name, g)| g.policy.as_ref().map(|p| (name, p)))
    }

    /// Updates site settings from a partial body `{application_learning: bool,
    /// notification_damper_s: integer >= 0}`; `null` restores a key's default. Unknown key ->
    /// BadRequest. All-or-nothing; a change bumps the counter and the site serial.
    pub fn put_site(&mut self, body: &Value) -> Result<(), SettingsError> {
        let obj = body.as_object().ok_or_else(|| {
            SettingsError::bad(
                "body",
                format!(
                    "body must be a JSON object of site settings (got {})",
                    brief(body)
                ),
            )
        })?;
        let mut next = self.site.clone();
        let defaults = SiteSettings::default();
        for (k, v) in obj {
            match k.as_str() {
                "application_learning" => {
                    next.application_learning = match v {
                        Value::Null => defaults.application_learning,
                        Value::Bool(b) => *b,
                        other => {
                            return Err(SettingsError::bad(
                                k,
                                format!(
                                    "application_learning must be a boolean (got {})",
                                    brief(other)
                                ),
                            ))
                        }
                    }
                }
                "notification_damper_s" => {
                    next.notification_damper_s = match v {
                        Value::Null => defaults.notification_damper_s,
                        other => other.as_u64().ok_or_else(|| {
                            SettingsError::bad(
                                k,
                                format!(
                                    "notification_damper_s must be an integer >= 0 (got {})",
                                    brief(other)
                                ),
                            )
                        })?,
                    }
                }
                other => {
                    return Err(SettingsError::bad(
                        other,
                        format!(
                            "unknown site settings key {other} (known: application_learning, notification_damper_s)"
                        ),
                    ))
                }
            }
        }
        if next != self.site {
            self.site = next;
            self.site_serial = self.bump();
        }
        Ok(())
    }

    /// The admin listing: every group with its parent, number of children, own keys, location
    /// overrides, own policy serial and settings serial, sorted by name.
    pub fn groups_list(&self) -> Vec<GroupInfo> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for g in self.groups.values() {
            if let Some(p) = g.parent.as_deref() {
                *counts.entry(p).or_default() += 1;
            }
        }
        self.groups
            .iter()
            .map(|(name, g)| GroupInfo {
                name: name.clone(),
                parent: g.parent.clone(),
                children: counts.get(name.as_str()).copied().unwrap_or(0),
                settings: g.own.to_nested(),
                locations: g
                    .locations
                    .iter()
                    .map(|(l, o)| (l.clone(), o.to_nested()))
                    .collect(),
                policy_serial: g.policy.as_ref().map(|p| p.serial),
                serial: self.settings_serial(name),
            })
            .collect()
    }

    /// Checks a directory received from elsewhere (a mirror, a file): `default` exists with no
    /// parent, every other group has an existing parent, there are no cycles, names are valid,
    /// and every stored key is known, valid and allowed where it is.
    pub fn check(&self) -> Result<(), SettingsError> {
        match self.groups.get(DEFAULT_GROUP) {
            Some(g) if g.parent.is_none() => {}
            Some(_) => {
                return Err(SettingsError::Conflict(
                    "group default must not have a parent".into(),
                ))
            }
            None => return Err(SettingsError::NotFound("group default is missing".into())),
        }
        for (name, g) in &self.groups {
            validate_name("group", name)?;
            if name != DEFAULT_GROUP {
                match g.parent.as_deref() {
                    Some(p) if self.groups.contains_key(p) => {}
                    Some(p) => {
                        return Err(SettingsError::NotFound(format!(
                            "group {name} has unknown parent {p}"
                        )))
                    }
                    None => {
                        return Err(SettingsError::Conflict(format!(
                            "group {name} has no parent"
                        )))
                    }
                }
                // Walking up from `name` must reach default without meeting a group twice.
                let mut seen = BTreeSet::new();
                let mut cur = name.as_str();
                while cur != DEFAULT_GROUP {
                    if !seen.insert(cur) {
                        return Err(SettingsError::Conflict(format!(
                            "group {name} is part of a parent cycle"
                        )));
                    }
                    match self.groups.get(cur).and_then(|g| g.parent.as_deref()) {
                        Some(p) => cur = p,
                        None => break,
                    }
                }
            }
            check_overrides(&g.own, None)?;
            for (l, o) in &g.locations {
                validate_name("location", l)?;
                check_overrides(o, Some(l))?;
            }
        }
        Ok(())
    }
}

fn check_overrides(o: &Overrides, location: Option<&str>) -> Result<(), SettingsError> {
    for (k, v) in o.iter() {
        let spec = key_spec(k)
            .ok_or_else(|| SettingsError::bad(k, format!("unknown settings key {k}")))?;
        if location.is_some() && spec.scope == Scope::GroupOnly {
            return Err(SettingsError::bad(
                k,
                format!("{k} is group-only and cannot be set on a location"),
            ));
        }
        spec.validate(v)?;
    }
    Ok(())
}

fn apply_changes(target: &mut Overrides, changes: Changes) {
    for (path, value) in changes {
        match value {
            Some(v) => {
                target.0.insert(path.to_string(), v);
            }
            None => {
                target.0.remove(path);
            }
        }
    }
}

// === Reconnection ===

/// What the registry remembers about a client, as far as group resolution needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientHistory {
    /// The group the client was installed into (from its first heartbeat).
    pub install_group: String,
    /// The group the client is in now: where it was last moved to or placed.
    pub group: String,
    /// The group an admin last moved it to, if any. Informational: resolution reads `group`.
    #[serde(default)]
    pub last_moved_group: Option<String>,
    /// Login mode at its last heartbeat. Informational: resolution reads the heartbeat's.
    #[serde(default)]
    pub login_mode: LoginMode,
    /// The user at its last user-mode heartbeat; a different user now is a "new user".
    #[serde(default)]
    pub last_user: Option<String>,
}

/// The facts of one heartbeat that group resolution needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatFacts<'a> {
    /// `install_group` from the heartbeat; unknown means `default`.
    pub install_group: &'a str,
    /// The client's platform; decides whether the reconnection keys apply.
    pub os: Os,
    /// Heartbeat `mode` (login mode).
    pub login_mode: LoginMode,
    /// Heartbeat `user`; an empty string counts as no user.
    pub user: Option<&'a str>,
    /// True when there was no record, the record was deleted, or it went overdue (no
    /// heartbeat for 3 intervals). The caller decides; this function never reads the clock.
    pub reconnect: bool,
}

/// Decides which group a heartbeating client belongs to. Pure: `user_group` maps a user name
/// to the group configured with `PUT /v1/admin/users/{user}`. Always returns an existing group.
pub fn resolve_client_group(
    dir: &Directory,
    prior: Option<&ClientHistory>,
    hb: &HeartbeatFacts,
    user_group: impl Fn(&str) -> Option<String>,
) -> String {
    let exists = |g: &str| dir.groups.contains_key(g);

    // Steps 1 and 2: the computer's group.
    let current: String = match prior {
        // 1. No record at all (new, or deleted): the heartbeat's install group; unknown ->
        //    default.
        None => dir.resolve_group(hb.install_group).to_string(),
        // 1. A record and no reconnect: the client stays in its current group, so a moved
        //    client that keeps its heartbeats stays where it was moved.
        Some(p) if !hb.reconnect => dir.resolve_group(&p.group).to_string(),
        // 2. A reconnect with a record (it went overdue): back to the install group, unless
        //    the last group (still existing) has `reconnection.use_last_group` on and the
        //    client is Windows or Mac (no effect on Linux).
        Some(p) => {
            let stay = exists(&p.group)
                && hb.os.honours_use_last_group()
                && dir.effective(&p.group, None).reconnection.use_last_group;
            if stay {
                p.group.clone()
            } else if !p.install_group.is_empty() && exists(&p.install_group) {
                p.install_group.clone()
            } else {
                // The recorded install group is gone: fall back to the heartbeat's.
                dir.resolve_group(hb.install_group).to_string()
            }
        }
    };

    // Step 3: user mode.
    let user = hb.user.filter(|u| !u.is_empty());
    let result = match (hb.login_mode, user) {
        (LoginMode::User, Some(u)) => {
            // A mapping to a group that no longer exists counts as no mapping.
            let mapped = user_group(u).filter(|g| exists(g));
            let previous = prior.and_then(|p| p.last_user.as_deref());
            if previous == Some(u) {
                // Same user as before: a client that keeps its heartbeats stays where it is
                // (an admin's move sticks); after a reconnect it follows its user's mapping.
                if hb.reconnect {
                    mapped.unwrap_or(current)
                } else {
                    current
                }
            } else {
                // A new user (or the first one): moves the client to the user's group, unless
                // `use_last_mode` is on for the current group (read on the group from steps
                // 1-2) and the client is Windows (no effect elsewhere); a user with no
                // mapping keeps the current group.
                let keep = hb.os.honours_use_last_mode()
                    && dir.effective(&current, None).reconnection.use_last_mode;
                if keep {
                    current
                } else {
                    mapped.unwrap_or(current)
                }
            }
        }
        // Computer mode, or user mode without a user: the computer's group.
        _ => current,
    };

    // Step 4: always an existing group.
    dir.resolve_group(&result).to_string()
}

// === Tests ===

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bad_key(e: SettingsError) -> String {
        match e {
            SettingsError::BadRequest { key, message } => {
                assert!(
                    message.contains(&key),
                    "message {message:?} should name key {key:?}"
                );
                key
            }
            other => panic!("expected BadRequest, got {other:?}"),
        }
    }

    fn tree() -> Directory {
        // default -> a -> b, default -> c
        let mut d = Directory::default();
        d.put_group("a", "default").unwrap();
        d.put_group("b", "a").unwrap();
        d.put_group("c", "default").unwrap();
        d
    }

    // --- defaults and JSON shape ---

    #[test]
    fn settings_json_matches_contract_exactly() {
        let s = serde_json::to_string(&Settings::default()).unwrap();
        assert_eq!(
            s,
            r#"{"communication_enabled":true,"management_servers":[],"download_policies_and_content":true,"mode":"pull","heartbeat_interval_s":300,"learn_applications":false,"upload_critical_events_immediately":true,"randomization":{"enabled":true,"window_s":3600},"reconnection":{"use_last_group":false,"use_last_mode":false}}"#
        );
        let back: Settings = serde_json::from_str(&s).unwrap();
        assert_eq!(back, Settings::default());
    }

    #[test]
    fn every_default_in_the_contract_table() {
        let d = Directory::default();
        let s = d.effective("default", None);
        assert!(s.communication_enabled);
        assert!(s.management_servers.is_empty());
        assert!(s.download_policies_and_content);
        assert_eq!(s.mode, ConnectionMode::Pull);
        assert_eq!(s.heartbeat_interval_s, 300);
        assert!(!s.learn_applications);
        assert!(s.upload_critical_events_immediately);
        assert!(s.randomization.enabled);
        assert_eq!(s.randomization.window_s, 3600);
        assert!(!s.reconnection.use_last_group);
        assert!(!s.reconnection.use_last_mode);
        let site = SiteSettings::default();
        assert!(!site.application_learning);
        assert_eq!(site.notification_damper_s, 3600);
        assert_eq!(Os::default(), Os::Windows);
        assert_eq!(d.groups.len(), 1);
        assert_eq!(d.groups["default"].parent, None);
        assert_eq!(d.groups["default"].serial, 0);
        assert_eq!(d.counter, 0);
    }

    #[test]
    fn keys_table_has_eleven_keys_with_contract_scopes() {
        assert_eq!(KEYS.len(), 11);
        let group_only: Vec<&str> = KEYS
            .iter()
            .filter(|k| k.scope == Scope::GroupOnly)
            .map(|k| k.path)
            .collect();
        assert_eq!(
            group_only,
            [
                "management_servers",
                "download_policies_and_content",
                "reconnection.use_last_group",
                "reconnection.use_last_mode"
            ]
        );
        assert_eq!(
            key_spec("randomization.window_s").unwrap().default_value(),
            json!(3600)
        );
        assert_eq!(key_spec("mode").unwrap().default_value(), json!("pull"));
        assert_eq!(
            key_spec("management_servers").unwrap().default_value(),
            json!([])
        );
        // Every key's default survives its own validator.
        for k in KEYS {
            k.validate(&k.default_value()).unwrap();
        }
    }

    #[test]
    fn enums_serde_and_parse() {
        assert_eq!(
            serde_json::to_value(ConnectionMode::Push).unwrap(),
            json!("push")
        );
        assert_eq!(
            serde_json::to_value(LoginMode::User).unwrap(),
            json!("user")
        );
        assert_eq!(serde_json::to_value(Os::Mac).unwrap(), json!("mac"));
        assert_eq!("linux".parse::<Os>().unwrap(), Os::Linux);
        assert_eq!(
            "computer".parse::<LoginMode>().unwrap(),
            LoginMode::Computer
        );
        assert!("bsd".parse::<Os>().unwrap_err().contains("os"));
        assert!("Push".parse::<ConnectionMode>().is_err());
    }

    // --- inheritance and locations ---

    #[test]
    fn inheritance_three_levels() {
        let mut d = tree();
        d.put_settings(
            "default",
            None,
            &json!({"heartbeat_interval_s": 60, "mode": "push"}),
        )
        .unwrap();
        d.put_settings(
            "a",
            None,
            &json!({"randomization": {"window_s": 120}, "mode": "pull"}),
        )
        .unwrap();
        d.put_settings("b", None, &json!({"randomization.enabled": false}))
            .unwrap();
        let b = d.effective("b", None);
        assert_eq!(b.heartbeat_interval_s, 60); // from default
        assert_eq!(b.mode, ConnectionMode::Pull); // from a, beats default
        assert_eq!(b.randomization.window_s, 120); // from a
        assert!(!b.randomization.enabled); // from b
        assert!(b.communication_enabled); // built-in
        let a = d.effective("a", None);
        assert!(a.randomization.enabled);
        let c = d.effective("c", None);
        assert_eq!(c.mode, ConnectionMode::Push);
        assert_eq!(c.randomization.window_s, 3600);
    }

    #[test]
    fn unknown_group_resolves_to_default() {
        let mut d = tree();
        d.put_settings("default", None, &json!({"heartbeat_interval_s": 77}))
            .unwrap();
        assert_eq!(d.effective("nope", None).heartbeat_interval_s, 77);
        assert_eq!(d.resolve_group("nope"), "default");
        assert_eq!(d.resolve_group("b"), "b");
        assert_eq!(d.settings_serial("nope"), d.settings_serial("default"));
    }

    #[test]
    fn location_precedence_follows_resolution_order() {
        let mut d = tree();
        let w = |d: &Directory, g: &str, l: Option<&str>| d.effective(g, l).randomization.window_s;
        // default@L beats built-in only.
        d.put_settings(
            "default",
            Some("office"),
            &json!({"randomization.window_s": 1}),
        )
        .unwrap();
        assert_eq!(w(&d, "b", Some("office")), 1);
        assert_eq!(w(&d, "b", None), 3600);
        // default beats default@L? No: default@L beats default.
        d.put_settings("default", None, &json!({"randomization.window_s": 2}))
            .unwrap();
        assert_eq!(w(&d, "b", Some("office")), 1);
        assert_eq!(w(&d, "b", None), 2);
        // parent (a) beats default@L.
        d.put_settings("a", None, &json!({"randomization.window_s": 3}))
            .unwrap();
        assert_eq!(w(&d, "b", Some("office")), 3);
        // parent@L beats parent.
        d.put_settings("a", Some("office"), &json!({"randomization.window_s": 4}))
            .unwrap();
        assert_eq!(w(&d, "b", Some("office")), 4);
        assert_eq!(w(&d, "b", Some("remote")), 3);
        // G beats parent@L.
        d.put_settings("b", None, &json!({"randomization.window_s": 5}))
            .unwrap();
        assert_eq!(w(&d, "b", Some("office")), 5);
        // G@L beats G.
        d.put_settings("b", Some("office"), &json!({"randomization.window_s": 6}))
            .unwrap();
        assert_eq!(w(&d, "b", Some("office")), 6);
        assert_eq!(w(&d, "b", None), 5);
        // A location override only overrides the keys it sets.
        assert_eq!(d.effective("b", Some("office")).mode, ConnectionMode::Pull);
    }

    #[test]
    fn group_only_key_rejected_on_location_naming_it() {
        let mut d = tree();
        for body in [
            json!({"download_policies_and_content": false}),
            json!({"management_servers": []}),
            json!({"reconnection": {"use_last_group": true}}),
            json!({"reconnection.use_last_mode": true}),
        ] {
            let e = d.put_settings("a", Some("office"), &body).unwrap_err();
            let SettingsError::BadRequest { key, message } = e else {
                panic!()
            };
            assert!(message.contains("group-only"), "{message}");
            assert!(message.contains(&key));
        }
        assert!(d.groups["a"].locations.is_empty());
        // A corrupt mirror holding a group-only key on a location is not read.
        d.groups
            .get_mut("a")
            .unwrap()
            .locations
            .entry("office".into())
            .or_default()
            .0
            .insert("download_policies_and_content".into(), json!(false));
        assert!(
            d.effective("a", Some("office"))
                .download_policies_and_content
        );
        assert!(d.check().is_err());
    }

    #[test]
    fn use_group_settings_clears_and_creates() {
        let mut d = tree();
        let changed = d
            .put_settings("a", Some("office"), &json!({"use_group_settings": false}))
            .unwrap();
        assert_eq!(changed, ["a", "b"]);
        assert!(d.groups["a"].locations["office"].is_empty());
        d.put_settings("a", Some("office"), &json!({"mode": "push"}))
            .unwrap();
        assert_eq!(d.effective("a", Some("office")).mode, ConnectionMode::Push);
        d.put_settings("a", Some("office"), &json!({"use_group_settings": true}))
            .unwrap();
        assert!(!d.groups["a"].locations.contains_key("office"));
        assert_eq!(d.effective("a", Some("office")).mode, ConnectionMode::Pull);
        // Clearing what is not there changes nothing.
        let before = d.clone();
        assert!(d
            .put_settings("a", Some("office"), &json!({"use_group_settings": true}))
            .unwrap()
            .is_empty());
        assert_eq!(d, before);
        // true with other keys is contradictory.
        let e = d
            .put_settings(
                "a",
                Some("office"),
                &json!({"use_group_settings": true, "mode": "push"}),
            )
            .unwrap_err();
        assert_eq!(bad_key(e), "use_group_settings");
        // Not a boolean; not on a group.
        let e = d
            .put_settings("a", Some("office"), &json!({"use_group_settings": 1}))
            .unwrap_err();
        assert_eq!(bad_key(e), "use_group_settings");
        let e = d
            .put_settings("a", None, &json!({"use_group_settings": true}))
            .unwrap_err();
        assert_eq!(bad_key(e), "use_group_settings");
    }

    #[test]
    fn null_goes_back_to_inheriting() {
        let mut d = tree();
        d.put_settings("default", None, &json!({"heartbeat_interval_s": 30}))
            .unwrap();
        d.put_settings("a", None, &json!({"heartbeat_interval_s": 90, "randomization": {"enabled": false, "window_s": 5}}))
            .unwrap();
        assert_eq!(d.effective("b", None).heartbeat_interval_s, 90);
        d.put_settings("a", None, &json!({"heartbeat_interval_s": null}))
            .unwrap();
        assert_eq!(d.effective("b", None).heartbeat_interval_s, 30);
        assert!(d.groups["a"].own.get("heartbeat_interval_s").is_none());
        // A null object resets every key under it.
        d.put_settings("a", None, &json!({"randomization": null}))
            .unwrap();
        assert!(d.groups["a"].own.is_empty());
        // Dotted null, on a location.
        d.put_settings("a", Some("remote"), &json!({"mode": "push"}))
            .unwrap();
        d.put_settings("a", Some("remote"), &json!({"mode": null}))
            .unwrap();
        assert!(d.groups["a"].locations["remote"].is_empty());
        // Null for something never set changes nothing.
        let serial = d.groups["a"].serial;
        assert!(d
            .put_settings("a", None, &json!({"mode": null}))
            .unwrap()
            .is_empty());
        assert_eq!(d.groups["a"].serial, serial);
    }

    #[test]
    fn nested_and_dotted_bodies_are_equivalent() {
        let mut d1 = Directory::default();
        let mut d2 = Directory::default();
        d1.put_settings(
            "default",
            None,
            &json!({"randomization": {"window_s": 60}, "mode": "push"}),
        )
        .unwrap();
        d2.put_settings(
            "default",
            None,
            &json!({"randomization.window_s": 60, "mode": "push"}),
        )
        .unwrap();
        assert_eq!(d1, d2);
        assert_eq!(
            d1.groups["default"].own.to_nested(),
            json!({"randomization": {"window_s": 60}, "mode": "push"})
        );
        let e = d1
            .put_settings(
                "default",
                None,
                &json!({"randomization": {"window_s": 1}, "randomization.window_s": 2}),
            )
            .unwrap_err();
        assert_eq!(bad_key(e), "randomization.window_s");
    }

    // --- validation ---

    #[test]
    fn every_validation_rule_names_the_key() {
        let cases: &[(Value, &str)] = &[
            (
                json!({"communication_enabled": "yes"}),
                "communication_enabled",
            ),
            (
                json!({"download_policies_and_content": 1}),
                "download_policies_and_content",
            ),
            (
                json!({"learn_applications": null, "upload_critical_events_immediately": 0}),
                "upload_critical_events_immediately",
            ),
            (json!({"learn_applications": "true"}), "learn_applications"),
            (
                json!({"randomization": {"enabled": 1}}),
                "randomization.enabled",
            ),
            (
                json!({"reconnection": {"use_last_group": "on"}}),
                "reconnection.use_last_group",
            ),
            (
                json!({"reconnection.use_last_mode": []}),
                "reconnection.use_last_mode",
            ),
            (json!({"heartbeat_interval_s": 0}), "heartbeat_interval_s"),
            (
                json!({"heartbeat_interval_s": 604801}),
                "heartbeat_interval_s",
            ),
            (json!({"heartbeat_interval_s": 1.5}), "heartbeat_interval_s"),
            (json!({"heartbeat_interval_s": -5}), "heartbeat_interval_s"),
            (
                json!({"heartbeat_interval_s": "60"}),
                "heartbeat_interval_s",
            ),
            (
                json!({"randomization": {"window_s": 604801}}),
                "randomization.window_s",
            ),
            (
                json!({"randomization.window_s": -1}),
                "randomization.window_s",
            ),
            (json!({"mode": "PUSH"}), "mode"),
            (json!({"mode": 1}), "mode"),
            (
                json!({"management_servers": "http://x"}),
                "management_servers",
            ),
            (json!({"management_servers": [1]}), "management_servers"),
            (
                json!({"management_servers": [{"url": "ftp://x", "priority": 1}]}),
                "management_servers",
            ),
            (
                json!({"management_servers": [{"url": "not a url", "priority": 1}]}),
                "management_servers",
            ),
            (
                json!({"management_servers": [{"url": "http://x", "priority": 0}]}),
                "management_servers",
            ),
            (
                json!({"management_servers": [{"url": "http://x", "priority": 4294967296u64}]}),
                "management_servers",
            ),
            (
                json!({"management_servers": [{"url": "http://x"}]}),
                "management_servers",
            ),
            (
                json!({"management_servers": [{"priority": 1}]}),
                "management_servers",
            ),
            (
                json!({"management_servers": [{"url": "http://x", "priority": 1, "weight": 2}]}),
                "management_servers",
            ),
            (json!({"bogus": 1}), "bogus"),
            (
                json!({"randomization": {"bogus": 1}}),
                "randomization.bogus",
            ),
            (json!({"randomization": 5}), "randomization"),
            (json!({"randomization.bogus": 5}), "randomization.bogus"),
        ];
        for (body, key) in cases {
            let mut d = tree();
            let before = d.clone();
            let e = d.put_settings("a", None, body).unwrap_err();
            assert_eq!(e.kind(), Kind::BadInput);
            assert_eq!(&bad_key(e), key, "body {body}");
            assert_eq!(d, before, "nothing changes on error: {body}");
        }
        let mut d = tree();
        let e = d.put_settings("a", None, &json!([1])).unwrap_err();
        assert_eq!(bad_key(e), "body");
    }

    #[test]
    fn validation_is_all_or_nothing() {
        let mut d = tree();
        let before = d.clone();
        let e = d
            .put_settings(
                "a",
                None,
                &json!({"mode": "push", "heartbeat_interval_s": 0}),
            )
            .unwrap_err();
        assert_eq!(bad_key(e), "heartbeat_interval_s");
        assert_eq!(d, before);
        let e = d
            .put_settings(
                "a",
                Some("office"),
                &json!({"mode": "push", "management_servers": []}),
            )
            .unwrap_err();
        assert_eq!(bad_key(e), "management_servers");
        assert_eq!(d, before);
    }

    #[test]
    fn boundaries_accepted() {
        let mut d = Directory::default();
        d.put_settings(
            "default",
            None,
            &json!({"heartbeat_interval_s": 604800, "randomization": {"window_s": 0}}),
        )
        .unwrap();
        d.put_settings("default", None, &json!({"heartbeat_interval_s": 1}))
            .unwrap();
        let s = d.effective("default", None);
        assert_eq!(s.heartbeat_interval_s, 1);
        assert_eq!(s.randomization.window_s, 0);
        d.put_settings("default", None, &json!({"randomization.window_s": 604800}))
            .unwrap();
    }

    #[test]
    fn management_servers_sorted_stably_by_priority() {
        let mut d = tree();
        d.put_settings(
            "a",
            None,
            &json!({"management_servers": [
                {"url": "https://c.example", "priority": 2},
                {"priority": 1, "url": "http://a.example:8014"},
                {"url": "https://b.example", "priority": 2},
                {"url": "http://z.example", "priority": 1}
            ]}),
        )
        .unwrap();
        let s = d.effective("b", None);
        let urls: Vec<&str> = s
            .management_servers
            .iter()
            .map(|m| m.url.as_str())
            .collect();
        assert_eq!(
            urls,
            [
                "http://a.example:8014",
                "http://z.example",
                "https://c.example",
                "https://b.example"
            ]
        );
        // Empty list is a real value: "the manager itself", overriding a parent's list.
        d.put_settings("b", None, &json!({"management_servers": []}))
            .unwrap();
        assert!(d.effective("b", None).management_servers.is_empty());
        assert_eq!(d.effective("a", None).management_servers.len(), 4);
    }

    #[test]
    fn put_settings_unknown_group_and_bad_location() {
        let mut d = tree();
        let e = d
            .put_settings("nope", None, &json!({"mode": "push"}))
            .unwrap_err();
        assert_eq!(e.kind(), Kind::NotFound);
        let e = d
            .put_settings("a", Some("bad/loc"), &json!({"mode": "push"}))
            .unwrap_err();
        assert_eq!(bad_key(e), "location");
        let e = d
            .put_settings("a", Some(""), &json!({"mode": "push"}))
            .unwrap_err();
        assert_eq!(bad_key(e), "location");
    }

    #[test]
    fn put_settings_returns_group_and_descendants_and_bumps() {
        let mut d = tree();
        let c0 = d.counter;
        let changed = d.put_settings("a", None, &json!({"mode": "push"})).unwrap();
        assert_eq!(changed, ["a", "b"]);
        assert_eq!(d.counter, c0 + 1);
        assert_eq!(d.groups["a"].serial, d.counter);
        let changed = d
            .put_settings("default", None, &json!({"mode": "push"}))
            .unwrap();
        assert_eq!(changed, ["default", "a", "b", "c"]);
        // Same value again: no change, no bump.
        let c1 = d.counter;
        assert!(d
            .put_settings("a", None, &json!({"mode": "push"}))
            .unwrap()
            .is_empty());
        assert!(d
            .put_settings("a", Some("office"), &json!({}))
            .unwrap()
            .is_empty());
        assert_eq!(d.counter, c1);
    }

    // --- group tree ---

    #[test]
    fn put_group_outcomes_and_name_rules() {
        let mut d = Directory::default();
        assert_eq!(d.put_group("a", "default").unwrap(), PutOutcome::Created);
        assert_eq!(d.put_group("a", "default").unwrap(), PutOutcome::Unchanged);
        assert_eq!(d.put_group("b", "default").unwrap(), PutOutcome::Created);
        let s = d.groups["a"].serial;
        assert_eq!(d.put_group("a", "b").unwrap(), PutOutcome::Changed);
        assert!(d.groups["a"].serial > s);
        assert_eq!(d.groups["a"].parent.as_deref(), Some("b"));
        let long = "x".repeat(65);
        for bad in ["", "a b", "a/b", "é", ".", "..", long.as_str()] {
            let e = d.put_group(bad, "default").unwrap_err();
            assert_eq!(bad_key(e), "group", "{bad:?}");
        }
        d.put_group(&"x".repeat(64), "default").unwrap();
        d.put_group("A-z_0.9", "default").unwrap();
        let e = d.put_group("q", "missing").unwrap_err();
        assert_eq!(bad_key(e), "parent");
        // default stays the root.
        for p in ["default", "a"] {
            let e = d.put_group("default", p).unwrap_err();
            assert_eq!(e.kind(), Kind::Conflict);
        }
        assert_eq!(d.groups["default"].parent, None);
    }

    #[test]
    fn reparenting_cycle_rejected_naming_the_cycle() {
        let mut d = tree();
        d.put_group("x", "b").unwrap(); // default -> a -> b -> x
        let before = d.clone();
        let e = d.put_group("a", "x").unwrap_err();
        assert_eq!(e.kind(), Kind::Conflict);
        let msg = e.to_string();
        assert!(msg.contains("a -> b -> x -> a"), "{msg}");
        let e = d.put_group("a", "a").unwrap_err();
        assert!(e.to_string().contains("cycle"), "{e}");
        assert_eq!(d, before);
        // A legal move.
        assert_eq!(d.put_group("x", "c").unwrap(), PutOutcome::Changed);
        assert_eq!(d.descendants("a"), ["a", "b"]);
        assert_eq!(d.descendants("c"), ["c", "x"]);
    }

    #[test]
    fn reparenting_changes_inheritance_and_serials() {
        let mut d = tree();
        d.put_settings("a", None, &json!({"heartbeat_interval_s": 10}))
            .unwrap();
        d.put_settings("c", None, &json!({"heartbeat_interval_s": 20}))
            .unwrap();
        assert_eq!(d.effective("b", None).heartbeat_interval_s, 10);
        let s = d.settings_serial("b");
        d.put_group("b", "c").unwrap();
        assert_eq!(d.effective("b", None).heartbeat_interval_s, 20);
        assert!(d.settings_serial("b") > s);
    }

    #[test]
    fn delete_group_rules() {
        let mut d = tree();
        let e = d.delete_group("default", false).unwrap_err();
        assert_eq!(e.kind(), Kind::Conflict);
        let e = d.delete_group("a", false).unwrap_err();
        assert_eq!(e.kind(), Kind::Conflict);
        assert!(e.to_string().contains('b'), "{e}");
        let e = d.delete_group("b", true).unwrap_err();
        assert_eq!(e.kind(), Kind::Conflict);
        assert!(e.to_string().contains("clients"));
        let e = d.delete_group("nope", false).unwrap_err();
        assert_eq!(e.kind(), Kind::NotFound);
        d.delete_group("b", false).unwrap();
        d.delete_group("a", false).unwrap();
        assert!(!d.groups.contains_key("a"));
        assert_eq!(d.resolve_group("a"), "default");
    }

    #[test]
    fn descendants_and_listing() {
        let mut d = tree();
        assert_eq!(d.descendants("default"), ["default", "a", "b", "c"]);
        assert_eq!(d.descendants("b"), ["b"]);
        assert!(d.descendants("nope").is_empty());
        d.put_settings("a", None, &json!({"randomization.window_s": 60}))
            .unwrap();
        d.put_settings("a", Some("office"), &json!({"mode": "push"}))
            .unwrap();
        let serial = d.put_policy("a", json!({"av": true})).unwrap();
        let list = d.groups_list();
        let names: Vec<&str> = list.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "default"]);
        let a = &list[0];
        assert_eq!(a.parent.as_deref(), Some("default"));
        assert_eq!(a.children, 1);
        assert_eq!(a.settings, json!({"randomization": {"window_s": 60}}));
        assert_eq!(a.locations["office"], json!({"mode": "push"}));
        assert_eq!(a.policy_serial, Some(serial));
        assert_eq!(list[3].children, 2);
        assert_eq!(list[3].policy_serial, None);
    }

    // --- serials and policies ---

    #[test]
    fn settings_serial_follows_ancestors_and_site() {
        let mut d = tree();
        let b0 = d.settings_serial("b");
        let c0 = d.settings_serial("c");
        d.put_settings("default", None, &json!({"mode": "push"}))
            .unwrap();
        let b1 = d.settings_serial("b");
        assert!(b1 > b0);
        assert!(d.settings_serial("c") > c0);
        d.put_settings("a", Some("office"), &json!({"mode": "pull"}))
            .unwrap();
        let b2 = d.settings_serial("b");
        assert!(b2 > b1);
        let c2 = d.settings_serial("c");
        // A sibling's change does not touch c.
        d.put_settings("b", None, &json!({"mode": "pull"})).unwrap();
        assert_eq!(d.settings_serial("c"), c2);
        // Site changes move every serial.
        d.put_site(&json!({"application_learning": true})).unwrap();
        assert!(d.settings_serial("c") > c2);
        assert_eq!(d.settings_serial("c"), d.site_serial);
        // ETags name the resolved group.
        assert_ne!(d.settings_etag("nope", None), d.settings_etag("c", None));
        assert_eq!(
            d.settings_etag("nope", None),
            d.settings_etag("default", None)
        );
        assert!(d.settings_etag("c", Some("office")).starts_with('"'));
    }

    #[test]
    fn policy_inheritance_and_one_counter() {
        let mut d = tree();
        assert!(d.policy("b").is_none());
        let s1 = d.put_policy("default", json!({"p": 1})).unwrap();
        let (owner, p) = d.policy("b").unwrap();
        assert_eq!((owner, p.serial), ("default", s1));
        d.put_settings("c", None, &json!({"mode": "push"})).unwrap();
        let s2 = d.put_policy("a", json!({"p": 2})).unwrap();
        assert!(s2 > s1 + 1, "settings and policy share the counter");
        assert!(s2 > d.groups["c"].serial);
        let (owner, p) = d.policy("b").unwrap();
        assert_eq!((owner, p.serial, &p.document), ("a", s2, &json!({"p": 2})));
        assert_eq!(d.policy("c").unwrap().0, "default");
        assert_eq!(d.policy("unknown").unwrap().0, "default");
        let s3 = d.put_policy("a", json!({"p": 3})).unwrap();
        assert!(s3 > s2);
        assert_eq!(
            d.put_policy("nope", json!(null)).unwrap_err().code(),
            "not_found"
        );
        // Policies do not move settings serials.
        let before = d.settings_serial("b");
        d.put_policy("b", json!({})).unwrap();
        assert_eq!(d.settings_serial("b"), before);
    }

    // --- site ---

    #[test]
    fn learn_applications_gated_by_site() {
        let mut d = tree();
        d.put_settings("a", None, &json!({"learn_applications": true}))
            .unwrap();
        assert!(!d.effective("b", None).learn_applications);
        d.put_site(&json!({"application_learning": true})).unwrap();
        assert!(d.effective("b", None).learn_applications);
        assert!(!d.effective("c", None).learn_applications);
        d.put_site(&json!({"application_learning": false})).unwrap();
        assert!(!d.effective("a", None).learn_applications);
    }

    #[test]
    fn put_site_rules() {
        let mut d = Directory::default();
        d.put_site(&json!({"notification_damper_s": 0})).unwrap();
        assert_eq!(d.site.notification_damper_s, 0);
        assert!(!d.site.application_learning);
        let before = d.clone();
        for (body, key) in [
            (
                json!({"application_learning": "yes"}),
                "application_learning",
            ),
            (
                json!({"notification_damper_s": -1}),
                "notification_damper_s",
            ),
            (
                json!({"notification_damper_s": 1.5}),
                "notification_damper_s",
            ),
            (json!({"application_learning": true, "color": 1}), "color"),
            (json!(true), "body"),
        ] {
            let e = d.put_site(&body).unwrap_err();
            assert_eq!(bad_key(e), key);
            assert_eq!(d, before);
        }
        d.put_site(&json!({"notification_damper_s": null})).unwrap();
        assert_eq!(d.site.notification_damper_s, 3600);
        let c = d.counter;
        d.put_site(&json!({"notification_damper_s": 3600})).unwrap();
        assert_eq!(d.counter, c, "no change, no bump");
    }

    // --- serde and mirrors ---

    #[test]
    fn directory_serde_round_trip() {
        let mut d = tree();
        d.put_settings(
            "a",
            None,
            &json!({"management_servers": [{"url": "http://m:8014", "priority": 1}]}),
        )
        .unwrap();
        d.put_settings("b", Some("remote"), &json!({"heartbeat_interval_s": 900}))
            .unwrap();
        d.put_policy("a", json!({"rules": [1, 2]})).unwrap();
        d.put_site(&json!({"application_learning": true})).unwrap();
        let text = serde_json::to_string(&d).unwrap();
        let back: Directory = serde_json::from_str(&text).unwrap();
        assert_eq!(back, d);
        back.check().unwrap();
        assert_eq!(
            back.effective("b", Some("remote")),
            d.effective("b", Some("remote"))
        );
        // Overrides serialize as a plain map of dotted keys.
        let v = serde_json::to_value(&d.groups["b"]).unwrap();
        assert_eq!(
            v["locations"]["remote"],
            json!({"heartbeat_interval_s": 900})
        );
        // Minimal input: defaults fill in.
        let min: Directory =
            serde_json::from_value(json!({"groups": {"default": {"parent": null}}, "counter": 0}))
                .unwrap();
        assert_eq!(min, Directory::default());
    }

    #[test]
    fn corrupt_mirror_is_survivable_and_detected() {
        // A cycle (a <-> b) and an invalid stored value.
        let d: Directory = serde_json::from_value(json!({
            "groups": {
                "default": {"parent": null, "own": {"heartbeat_interval_s": 42}},
                "a": {"parent": "b", "own": {"heartbeat_interval_s": 0, "mode": "push"}},
                "b": {"parent": "a"}
            },
            "counter": 3
        }))
        .unwrap();
        let s = d.effective("a", None);
        assert_eq!(
            s.heartbeat_interval_s, 42,
            "invalid value skipped, default reached"
        );
        assert_eq!(s.mode, ConnectionMode::Push);
        assert_eq!(d.descendants("a"), ["a", "b"]);
        assert!(d.check().is_err());
        let missing: Directory =
            serde_json::from_value(json!({"groups": {}, "counter": 0})).unwrap();
        assert_eq!(missing.effective("x", None), Settings::default());
        assert_eq!(missing.check().unwrap_err().code(), "not_found");
        tree().check().unwrap();
    }

    #[test]
    fn error_codes_and_display() {
        let e = SettingsError::bad("mode", "mode must be \"push\" or \"pull\"");
        assert_eq!(e.kind(), Kind::BadInput);
        assert_eq!(e.to_string(), "mode must be \"push\" or \"pull\"");
        assert_eq!(SettingsError::Conflict("x".into()).code(), "conflict");
        assert_eq!(SettingsError::NotFound("x".into()).code(), "not_found");
        // Long values are shortened in messages.
        let mut d = Directory::default();
        let e = d
            .put_settings("default", None, &json!({"mode": "p".repeat(10_000)}))
            .unwrap_err();
        assert!(e.to_string().len() < 200);
        assert!(!e.to_string().contains('\n'));
    }

    // --- reconnection ---

    fn hb(install: &str, os: Os, reconnect: bool) -> HeartbeatFacts<'_> {
        HeartbeatFacts {
            install_group: install,
            os,
            login_mode: LoginMode::Computer,
            user: None,
            reconnect,
        }
    }

    fn hist(install: &str, group: &str) -> ClientHistory {
        ClientHistory {
            install_group: install.into(),
            group: group.into(),
            last_moved_group: Some(group.into()),
            login_mode: LoginMode::Computer,
            last_user: None,
        }
    }

    fn no_users(_: &str) -> Option<String> {
        None
    }

    fn users(u: &str) -> Option<String> {
        match u {
            "alice" => Some("a".into()),
            "bob" => Some("c".into()),
            "ghost" => Some("deleted-group".into()),
            _ => None,
        }
    }

    #[test]
    fn rule1_new_client_uses_install_group() {
        let d = tree();
        assert_eq!(
            resolve_client_group(&d, None, &hb("b", Os::Windows, true), no_users),
            "b"
        );
        assert_eq!(
            resolve_client_group(&d, None, &hb("nope", Os::Windows, true), no_users),
            "default"
        );
        // reconnect flag does not matter without a record
        assert_eq!(
            resolve_client_group(&d, None, &hb("c", Os::Linux, false), no_users),
            "c"
        );
    }

    #[test]
    fn rule1_moved_client_keeping_heartbeats_stays() {
        let d = tree();
        let p = hist("a", "c");
        for os in [Os::Windows, Os::Mac, Os::Linux] {
            assert_eq!(
                resolve_client_group(&d, Some(&p), &hb("a", os, false), no_users),
                "c"
            );
        }
    }

    #[test]
    fn rule2_reconnect_returns_to_install_group() {
        let d = tree();
        let p = hist("a", "c");
        for os in [Os::Windows, Os::Mac, Os::Linux] {
            assert_eq!(
                resolve_client_group(&d, Some(&p), &hb("a", os, true), no_users),
                "a"
            );
        }
        // The record's install group wins over the heartbeat's.
        assert_eq!(
            resolve_client_group(&d, Some(&p), &hb("b", Os::Windows, true), no_users),
            "a"
        );
        // A deleted recorded install group falls back to the heartbeat's.
        let p = hist("gone", "c");
        assert_eq!(
            resolve_client_group(&d, Some(&p), &hb("b", Os::Windows, true), no_users),
            "b"
        );
        let p = hist("", "c");
        assert_eq!(
            resolve_client_group(&d, Some(&p), &hb("nope", Os::Windows, true), no_users),
            "default"
        );
    }

    #[test]
    fn rule2_use_last_group_windows_and_mac_only() {
        let mut d = tree();
        d.put_settings(
            "c",
            None,
            &json!({"reconnection": {"use_last_group": true}}),
        )
        .unwrap();
        let p = hist("a", "c");
        assert_eq!(
            resolve_client_group(&d, Some(&p), &hb("a", Os::Windows, true), no_users),
            "c"
        );
        assert_eq!(
            resolve_client_group(&d, Some(&p), &hb("a", Os::Mac, true), no_users),
            "c"
        );
        assert_eq!(
            resolve_client_group(&d, Some(&p), &hb("a", Os::Linux, true), no_users),
            "a"
        );
        // Read on the last group, not the install group.
        let mut d2 = tree();
        d2.put_settings("a", None, &json!({"reconnection.use_last_group": true}))
            .unwrap();
        assert_eq!(
            resolve_client_group(&d2, Some(&p), &hb("a", Os::Windows, true), no_users),
            "a"
        );
        // Inherited from an ancestor counts.
        let mut d3 = tree();
        d3.put_settings(
            "default",
            None,
            &json!({"reconnection.use_last_group": true}),
        )
        .unwrap();
        assert_eq!(
            resolve_client_group(&d3, Some(&p), &hb("a", Os::Mac, true), no_users),
            "c"
        );
        // A last group that no longer exists cannot be stayed in.
        let p = hist("a", "gone");
        assert_eq!(
            resolve_client_group(&d3, Some(&p), &hb("a", Os::Windows, true), no_users),
            "a"
        );
    }

    fn user_hb<'a>(install: &'a str, os: Os, reconnect: bool, user: &'a str) -> HeartbeatFacts<'a> {
        HeartbeatFacts {
            install_group: install,
            os,
            login_mode: LoginMode::User,
            user: Some(user),
            reconnect,
        }
    }

    #[test]
    fn rule3_new_user_moves_to_users_group() {
        let d = tree();
        // First user, no record.
        assert_eq!(
            resolve_client_group(&d, None, &user_hb("b", Os::Linux, true, "alice"), users),
            "a"
        );
        // New user replacing alice.
        let mut p = hist("b", "a");
        p.last_user = Some("alice".into());
        assert_eq!(
            resolve_client_group(
                &d,
                Some(&p),
                &user_hb("b", Os::Windows, false, "bob"),
                users
            ),
            "c"
        );
        // Unmapped new user keeps the current group.
        assert_eq!(
            resolve_client_group(
                &d,
                Some(&p),
                &user_hb("b", Os::Windows, false, "carol"),
                users
            ),
            "a"
        );
        // Mapping to a deleted group counts as no mapping.
        assert_eq!(
            resolve_client_group(
                &d,
                Some(&p),
                &user_hb("b", Os::Windows, false, "ghost"),
                users
            ),
            "a"
        );
        // Computer mode ignores users; user mode without a user too.
        let mut h = user_hb("b", Os::Windows, false, "bob");
        h.login_mode = LoginMode::Computer;
        assert_eq!(resolve_client_group(&d, Some(&p), &h, users), "a");
        let mut h = user_hb("b", Os::Windows, false, "");
        h.user = None;
        assert_eq!(resolve_client_group(&d, Some(&p), &h, users), "a");
        let h = user_hb("b", Os::Windows, false, "");
        assert_eq!(resolve_client_group(&d, Some(&p), &h, users), "a");
    }

    #[test]
    fn rule3_same_user_is_stable() {
        let d = tree();
        let mut p = hist("b", "a");
        p.last_user = Some("alice".into());
        p.login_mode = LoginMode::User;
        assert_eq!(
            resolve_client_group(
                &d,
                Some(&p),
                &user_hb("b", Os::Windows, false, "alice"),
                users
            ),
            "a"
        );
        // Same unmapped user: current group.
        let mut p = hist("b", "c");
        p.last_user = Some("carol".into());
        assert_eq!(
            resolve_client_group(
                &d,
                Some(&p),
                &user_hb("b", Os::Windows, false, "carol"),
                users
            ),
            "c"
        );
        // Same user, moved by an admin, still heartbeating: the move sticks.
        let mut p = hist("b", "c");
        p.last_user = Some("alice".into());
        assert_eq!(
            resolve_client_group(
                &d,
                Some(&p),
                &user_hb("b", Os::Windows, false, "alice"),
                users
            ),
            "c"
        );
        // Same user after a reconnect still lands in the user's group.
        let mut p = hist("b", "c");
        p.last_user = Some("alice".into());
        assert_eq!(
            resolve_client_group(&d, Some(&p), &user_hb("b", Os::Mac, true, "alice"), users),
            "a"
        );
    }

    #[test]
    fn rule3_use_last_mode_windows_only_read_on_current_group() {
        let mut d = tree();
        d.put_settings("a", None, &json!({"reconnection.use_last_mode": true}))
            .unwrap();
        let mut p = hist("b", "a");
        p.last_user = Some("alice".into());
        // Windows: stays in the previous user's group.
        assert_eq!(
            resolve_client_group(
                &d,
                Some(&p),
                &user_hb("b", Os::Windows, false, "bob"),
                users
            ),
            "a"
        );
        // Mac and Linux: no effect.
        assert_eq!(
            resolve_client_group(&d, Some(&p), &user_hb("b", Os::Mac, false, "bob"), users),
            "c"
        );
        assert_eq!(
            resolve_client_group(&d, Some(&p), &user_hb("b", Os::Linux, false, "bob"), users),
            "c"
        );
        // Read on the current group (after steps 1-2), not on the user's target group.
        let mut d2 = tree();
        d2.put_settings("c", None, &json!({"reconnection.use_last_mode": true}))
            .unwrap();
        assert_eq!(
            resolve_client_group(
                &d2,
                Some(&p),
                &user_hb("b", Os::Windows, false, "bob"),
                users
            ),
            "c"
        );
        // After a reconnect the current group is the install group b (child of a): inherited on.
        let mut p2 = hist("b", "c");
        p2.last_user = Some("alice".into());
        assert_eq!(
            resolve_client_group(
                &d,
                Some(&p2),
                &user_hb("b", Os::Windows, true, "bob"),
                users
            ),
            "b"
        );
    }

    #[test]
    fn rules_combined_use_last_group_then_user() {
        let mut d = tree();
        d.put_settings(
            "c",
            None,
            &json!({"reconnection": {"use_last_group": true, "use_last_mode": true}}),
        )
        .unwrap();
        let mut p = hist("b", "c");
        p.last_user = Some("bob".into());
        // Reconnect on Windows: stays in c (use_last_group), new user alice, use_last_mode on c -> stays.
        assert_eq!(
            resolve_client_group(
                &d,
                Some(&p),
                &user_hb("b", Os::Windows, true, "alice"),
                users
            ),
            "c"
        );
        // Mac: stays in c by use_last_group, but use_last_mode has no effect -> alice's group a.
        assert_eq!(
            resolve_client_group(&d, Some(&p), &user_hb("b", Os::Mac, true, "alice"), users),
            "a"
        );
        // Linux: back to b, then alice's group a.
        assert_eq!(
            resolve_client_group(&d, Some(&p), &user_hb("b", Os::Linux, true, "alice"), users),
            "a"
        );
    }

    #[test]
    fn rule4_result_always_exists() {
        let d = tree();
        let p = hist("gone1", "gone2");
        let g = resolve_client_group(&d, Some(&p), &hb("gone3", Os::Windows, false), no_users);
        assert_eq!(g, "default");
        let g = resolve_client_group(&d, Some(&p), &hb("gone3", Os::Windows, true), no_users);
        assert_eq!(g, "default");
        let empty: Directory = serde_json::from_value(json!({"groups": {}, "counter": 0})).unwrap();
        assert_eq!(
            resolve_client_group(&empty, None, &hb("x", Os::Windows, true), users),
            "default"
        );
    }
}
