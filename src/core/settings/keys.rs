//! The leaf settings keys: their dotted paths, where each may be set ([`Scope`]), the
//! validators that check and normalize a value, and how a value lands in [`Settings`]
//! ([`KEYS`], [`key_spec`]); and [`Overrides`], the keys one group or one location sets
//! itself.
//!
//! Pure data and functions: this file must never do I/O, read the clock, speak HTTP or touch
//! storage, and it knows nothing of the group tree (that is `directory`'s).

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{brief, ConnectionMode, ManagementServer, Settings, SettingsError};

/// Largest heartbeat interval and randomization window accepted: one week, in seconds.
pub const MAX_INTERVAL_S: u64 = 604_800;

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
    pub(super) fn try_apply(&self, settings: &mut Settings, value: &Value) -> bool {
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
pub(super) fn is_key_prefix(prefix: &str) -> bool {
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
///
/// [`Directory::put_settings`]: super::Directory::put_settings
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Overrides(pub(super) BTreeMap<String, Value>);

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

#[cfg(test)]
#[path = "keys_tests.rs"]
mod tests;
