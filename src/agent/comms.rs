//! The communications settings as an agent reads them from a heartbeat reply or a settings
//! response.
//!
//! Owns [`Comms`]: the keys of the settings JSON that change what a client does, each with the
//! contract's built-in default when a server leaves it out or sends a value of the wrong type.
//! It is the agent's own reading (never `crate::core::settings`), so an agent acts on what the
//! wire says. It must never send anything; it only reads JSON.

use serde::{Deserialize, Serialize};

/// How a client hears of changes (settings key `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionMode {
    /// Hold `GET /v1/stream` and act on an event at once.
    Push,
    /// Learn of changes at the next heartbeat.
    #[default]
    Pull,
}

impl ConnectionMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionMode::Push => "push",
            ConnectionMode::Pull => "pull",
        }
    }
}

impl std::fmt::Display for ConnectionMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ConnectionMode {
    type Err = String;
    fn from_str(s: &str) -> Result<ConnectionMode, String> {
        match s {
            "push" => Ok(ConnectionMode::Push),
            "pull" => Ok(ConnectionMode::Pull),
            other => Err(format!("{other:?} is not push or pull")),
        }
    }
}

/// One entry of `management_servers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerEntry {
    pub url: String,
    pub priority: u32,
}

/// What the settings tell a client to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comms {
    pub serial: u64,
    pub communication_enabled: bool,
    pub management_servers: Vec<ServerEntry>,
    pub download_policies_and_content: bool,
    pub mode: ConnectionMode,
    pub heartbeat_interval_s: u64,
    pub learn_applications: bool,
    pub upload_critical_events_immediately: bool,
    pub randomization_enabled: bool,
    pub window_s: u64,
}

impl Default for Comms {
    /// The contract's built-in defaults (what a client does before it has heard any).
    fn default() -> Comms {
        Comms {
            serial: 0,
            communication_enabled: true,
            management_servers: Vec::new(),
            download_policies_and_content: true,
            mode: ConnectionMode::Pull,
            heartbeat_interval_s: 300,
            learn_applications: false,
            upload_critical_events_immediately: true,
            randomization_enabled: true,
            window_s: 3600,
        }
    }
}

impl Comms {
    /// Reads the settings JSON; a key that is missing or of the wrong type keeps its default.
    pub fn from_json(v: &serde_json::Value) -> Comms {
        let d = Comms::default();
        let flag = |key: &str, default: bool| {
            v.pointer(key)
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(default)
        };
        let number = |key: &str, default: u64| {
            v.pointer(key)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(default)
        };
        let servers = v
            .get("management_servers")
            .and_then(serde_json::Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|e| {
                        let url = e.get("url")?.as_str()?.to_string();
                        let priority = e
                            .get("priority")
                            .and_then(serde_json::Value::as_u64)
                            .unwrap_or(0);
                        Some(ServerEntry {
                            url,
                            priority: u32::try_from(priority).unwrap_or(u32::MAX),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mode = match v.get("mode").and_then(serde_json::Value::as_str) {
            Some("push") => ConnectionMode::Push,
            _ => ConnectionMode::Pull,
        };
        Comms {
            serial: number("/serial", 0),
            communication_enabled: flag("/communication_enabled", d.communication_enabled),
            management_servers: servers,
            download_policies_and_content: flag(
                "/download_policies_and_content",
                d.download_policies_and_content,
            ),
            mode,
            heartbeat_interval_s: number("/heartbeat_interval_s", d.heartbeat_interval_s),
            learn_applications: flag("/learn_applications", d.learn_applications),
            upload_critical_events_immediately: flag(
                "/upload_critical_events_immediately",
                d.upload_critical_events_immediately,
            ),
            randomization_enabled: flag("/randomization/enabled", d.randomization_enabled),
            window_s: number("/randomization/window_s", d.window_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_is_read_and_a_missing_or_mistyped_one_keeps_its_default() {
        let c = Comms::from_json(&serde_json::json!({
            "serial": 7,
            "communication_enabled": false,
            "management_servers": [{"url": "http://127.0.0.1:1", "priority": 2}, {"bad": 1}],
            "download_policies_and_content": false,
            "mode": "push",
            "heartbeat_interval_s": 60,
            "learn_applications": true,
            "upload_critical_events_immediately": false,
            "randomization": {"enabled": false, "window_s": 30},
        }));
        assert_eq!(c.serial, 7);
        assert!(!c.communication_enabled);
        assert_eq!(
            c.management_servers,
            vec![ServerEntry {
                url: "http://127.0.0.1:1".into(),
                priority: 2
            }]
        );
        assert!(!c.download_policies_and_content);
        assert_eq!(c.mode, ConnectionMode::Push);
        assert_eq!(c.heartbeat_interval_s, 60);
        assert!(c.learn_applications);
        assert!(!c.upload_critical_events_immediately);
        assert!(!c.randomization_enabled);
        assert_eq!(c.window_s, 30);

        let c = Comms::from_json(&serde_json::json!({"mode": 3, "heartbeat_interval_s": "x"}));
        assert_eq!(c, Comms::default());
    }
}
