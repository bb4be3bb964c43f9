//! What push streams announce: the change events of `/v1/stream`.
//!
//! Owns [`Change`] (a settings, policy or catalog change, its SSE name and data), the state a
//! stream starts with, and what changed between two directories. Pure data and functions: it
//! must never hold a connection or read the clock.

use serde::{Deserialize, Serialize};

use super::settings::Directory;

/// One change pushed on `/v1/stream`, as an event name and its JSON data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Change {
    Settings { group: String, serial: u64 },
    Policy { group: String, serial: u64 },
    Catalog { revision: u64 },
}

impl Change {
    /// The SSE event name.
    pub fn name(&self) -> &'static str {
        match self {
            Change::Settings { .. } => "settings",
            Change::Policy { .. } => "policy",
            Change::Catalog { .. } => "catalog",
        }
    }

    /// The SSE data: `{"group","serial"}` or `{"revision"}`.
    pub fn data(&self) -> serde_json::Value {
        match self {
            Change::Settings { group, serial } | Change::Policy { group, serial } => {
                serde_json::json!({"group": group, "serial": serial})
            }
            Change::Catalog { revision } => serde_json::json!({"revision": revision}),
        }
    }

    /// The group a settings or policy change is about.
    pub fn group(&self) -> Option<&str> {
        match self {
            Change::Settings { group, .. } | Change::Policy { group, .. } => Some(group),
            Change::Catalog { .. } => None,
        }
    }
}

/// The current settings and policy serials of `groups` and the catalog revision: what a
/// stream starts with.
pub fn state_changes(
    dir: &Directory,
    groups: impl IntoIterator<Item = String>,
    revision: u64,
) -> Vec<Change> {
    let mut out = Vec::new();
    for g in groups {
        out.push(Change::Settings {
            serial: dir.settings_serial(&g),
            group: g.clone(),
        });
        out.push(Change::Policy {
            serial: dir.policy_serial(&g),
            group: g,
        });
    }
    out.push(Change::Catalog { revision });
    out
}

/// What changed between two directories, as push events (a mirror that took a new snapshot).
pub fn directory_changes(old: &Directory, new: &Directory) -> Vec<Change> {
    let mut out = Vec::new();
    for g in new.groups.keys() {
        let known = old.groups.contains_key(g);
        let serial = new.settings_serial(g);
        if !known || old.settings_serial(g) != serial || old.site != new.site {
            out.push(Change::Settings {
                group: g.clone(),
                serial,
            });
        }
        let policy = new.policy_serial(g);
        if !known || old.policy_serial(g) != policy {
            out.push(Change::Policy {
                group: g.clone(),
                serial: policy,
            });
        }
    }
    out
}
