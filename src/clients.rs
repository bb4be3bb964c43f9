//! Clients and their heartbeats: the wire form, the manager's registry, and the reply.
//!
//! Owns the heartbeat body and its validation, the client registry of the manager (records
//! with install group, current group, login mode and last user, kept after a delete so that a
//! reconnect can honour `use_last_group`), the user -> group map, and the heartbeat reply that
//! manager and node both build from a `settings::Directory`. Group resolution itself is
//! `settings::resolve_client_group`. It must never talk to the network or read settings from
//! anywhere but the directory it is given.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::settings::{ClientHistory, Directory, HeartbeatFacts, LoginMode, Os};
use crate::store::{Kv, Store, StoreError};

/// What can go wrong in the registry.
#[derive(Debug, thiserror::Error)]
pub enum ClientsError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("no client {0:?}")]
    UnknownClient(String),
    #[error("no group {0:?}")]
    UnknownGroup(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `POST /v1/heartbeat` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub client_id: String,
    #[serde(default)]
    pub install_group: Option<String>,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub os: Option<Os>,
    #[serde(default)]
    pub client_version: Option<String>,
    /// Login mode: computer or user.
    #[serde(default)]
    pub mode: Option<LoginMode>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub policy_serial: Option<u64>,
    #[serde(default)]
    pub catalog_revision: Option<u64>,
}

fn check_text(field: &'static str, v: &Option<String>, max: usize) -> Result<(), ClientsError> {
    if let Some(s) = v {
        if s.chars().count() > max {
            return Err(ClientsError::Invalid {
                field,
                reason: format!("at most {max} characters"),
            });
        }
        if s.chars().any(char::is_control) {
            return Err(ClientsError::Invalid {
                field,
                reason: "control characters are not allowed".into(),
            });
        }
    }
    Ok(())
}

impl Heartbeat {
    /// `client_id` required, 1 to 128 characters; text fields bounded.
    pub fn validate(&self) -> Result<(), ClientsError> {
        if self.client_id.is_empty() {
            return Err(ClientsError::Invalid {
                field: "client_id",
                reason: "is required".into(),
            });
        }
        check_text("client_id", &Some(self.client_id.clone()), 128)?;
        check_text("install_group", &self.install_group, 64)?;
        check_text("location", &self.location, 64)?;
        check_text("client_version", &self.client_version, 64)?;
        check_text("user", &self.user, 256)?;
        Ok(())
    }

    pub fn os(&self) -> Os {
        self.os.unwrap_or_default()
    }

    pub fn login_mode(&self) -> LoginMode {
        self.mode.unwrap_or_default()
    }

    /// The location, with empty meaning none.
    pub fn location(&self) -> Option<&str> {
        self.location.as_deref().filter(|l| !l.is_empty())
    }
}

/// What the manager remembers of a client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientRecord {
    pub client_id: String,
    pub install_group: String,
    pub group: String,
    pub last_moved_group: Option<String>,
    pub login_mode: LoginMode,
    /// The user of the last user-mode heartbeat.
    pub last_user: Option<String>,
    pub os: Os,
    pub client_version: Option<String>,
    pub location: Option<String>,
    pub address: Option<String>,
    pub first_seen: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// The heartbeat interval in force at the last heartbeat: overdue after 3 of them.
    pub heartbeat_interval_s: u64,
    /// Deleted by an admin: hidden from listings, remembered for a reconnect.
    #[serde(default)]
    pub deleted: bool,
}

impl ClientRecord {
    pub fn overdue(&self, now: DateTime<Utc>) -> bool {
        let secs = (now - self.last_seen).num_seconds();
        secs > 0 && secs as u64 > self.heartbeat_interval_s.saturating_mul(3)
    }

    fn history(&self) -> ClientHistory {
        ClientHistory {
            install_group: self.install_group.clone(),
            group: self.group.clone(),
            last_moved_group: self.last_moved_group.clone(),
            login_mode: self.login_mode,
            last_user: self.last_user.clone(),
        }
    }
}

/// One line of `GET /v1/admin/clients`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientView {
    #[serde(flatten)]
    pub record: ClientRecord,
    pub overdue: bool,
}

/// The download slot of a heartbeat reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DownloadSlot {
    pub catalog_revision: u64,
    pub not_before: DateTime<Utc>,
    pub delay_s: u64,
    pub window_s: u64,
}

/// `POST /v1/heartbeat` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatReply {
    pub client_id: String,
    pub group: String,
    /// Effective settings for the group and location, with `serial`.
    pub settings: serde_json::Value,
    pub policy_serial: u64,
    pub catalog_revision: u64,
    pub next_heartbeat_s: u64,
    pub download_slot: Option<DownloadSlot>,
    /// Whether the client's `policy_serial` / `catalog_revision` are behind.
    pub policy_changed: bool,
    pub catalog_changed: bool,
}

/// Effective settings of `group` at `location` as the wire shows them: with `serial`.
pub fn settings_json(dir: &Directory, group: &str, location: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::to_value(dir.effective(group, location))
        .unwrap_or_else(|_| serde_json::json!({}));
    if let Some(obj) = v.as_object_mut() {
        obj.insert("serial".into(), dir.settings_serial(group).into());
    }
    v
}

/// The policy serial a client of `group` should have (0: no policy anywhere up the tree).
pub fn policy_serial(dir: &Directory, group: &str) -> u64 {
    dir.policy(group).map_or(0, |(_, p)| p.serial)
}

/// Builds the heartbeat reply for a client placed in `group`.
pub fn reply(
    dir: &Directory,
    hb: &Heartbeat,
    group: &str,
    catalog_revision: u64,
    download_slot: Option<DownloadSlot>,
) -> HeartbeatReply {
    let location = hb.location();
    let effective = dir.effective(group, location);
    let policy_serial = policy_serial(dir, group);
    HeartbeatReply {
        client_id: hb.client_id.clone(),
        group: group.to_string(),
        settings: settings_json(dir, group, location),
        policy_serial,
        catalog_revision,
        next_heartbeat_s: effective.heartbeat_interval_s,
        download_slot,
        policy_changed: hb.policy_serial != Some(policy_serial),
        catalog_changed: hb.catalog_revision != Some(catalog_revision),
    }
}

/// The manager's client registry, persisted in sled.
#[derive(Clone)]
pub struct Registry {
    clients: Kv,
    users: Kv,
}

impl Registry {
    pub fn open(store: &Store) -> Result<Registry, ClientsError> {
        Ok(Registry {
            clients: store.kv("clients")?,
            users: store.kv("users")?,
        })
    }

    pub fn get(&self, client_id: &str) -> Result<Option<ClientRecord>, ClientsError> {
        Ok(self.clients.get(client_id)?)
    }

    /// Registers or updates a client from a heartbeat and decides its group.
    pub fn heartbeat(
        &self,
        dir: &Directory,
        hb: &Heartbeat,
        address: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<ClientRecord, ClientsError> {
        hb.validate()?;
        let prior: Option<ClientRecord> = self.clients.get(&hb.client_id)?;
        let reconnect = match &prior {
            None => true,
            Some(p) => p.deleted || p.overdue(now),
        };
        let history = prior.as_ref().map(ClientRecord::history);
        let install = hb.install_group.clone().unwrap_or_default();
        let user = hb.user.as_deref().filter(|u| !u.is_empty());
        let facts = HeartbeatFacts {
            install_group: &install,
            os: hb.os(),
            login_mode: hb.login_mode(),
            user,
            reconnect,
        };
        let group = crate::settings::resolve_client_group(dir, history.as_ref(), &facts, |u| {
            self.users.get::<String>(u).ok().flatten()
        });
        let effective = dir.effective(&group, hb.location());
        let install_group = match &prior {
            Some(p) if !p.install_group.is_empty() => p.install_group.clone(),
            _ => dir.resolve_group(&install).to_string(),
        };
        let record = ClientRecord {
            client_id: hb.client_id.clone(),
            install_group,
            group,
            last_moved_group: prior.as_ref().and_then(|p| p.last_moved_group.clone()),
            login_mode: hb.login_mode(),
            last_user: match hb.login_mode() {
                LoginMode::User => user
                    .map(str::to_string)
                    .or_else(|| prior.as_ref().and_then(|p| p.last_user.clone())),
                LoginMode::Computer => prior.as_ref().and_then(|p| p.last_user.clone()),
            },
            os: hb.os(),
            client_version: hb.client_version.clone(),
            location: hb.location().map(str::to_string),
            address,
            first_seen: prior.as_ref().map_or(now, |p| p.first_seen),
            last_seen: now,
            heartbeat_interval_s: effective.heartbeat_interval_s,
            deleted: false,
        };
        self.clients.put(&record.client_id, &record)?;
        Ok(record)
    }

    /// Every client that is not deleted, with whether it is overdue.
    pub fn list(&self, now: DateTime<Utc>) -> Result<Vec<ClientView>, ClientsError> {
        Ok(self
            .clients
            .scan::<ClientRecord>("")?
            .into_iter()
            .filter(|(_, r)| !r.deleted)
            .map(|(_, r)| ClientView {
                overdue: r.overdue(now),
                record: r,
            })
            .collect())
    }

    /// Moves a client to `group` (an admin action).
    pub fn move_client(
        &self,
        dir: &Directory,
        client_id: &str,
        group: &str,
    ) -> Result<ClientRecord, ClientsError> {
        if !dir.groups.contains_key(group) {
            return Err(ClientsError::UnknownGroup(group.to_string()));
        }
        let mut r: ClientRecord = self
            .clients
            .get(client_id)?
            .filter(|r: &ClientRecord| !r.deleted)
            .ok_or_else(|| ClientsError::UnknownClient(client_id.to_string()))?;
        r.group = group.to_string();
        r.last_moved_group = Some(group.to_string());
        self.clients.put(client_id, &r)?;
        Ok(r)
    }

    /// Deletes a client: hidden, but its history is kept for a reconnect.
    pub fn delete(&self, client_id: &str) -> Result<(), ClientsError> {
        let mut r: ClientRecord = self
            .clients
            .get(client_id)?
            .filter(|r: &ClientRecord| !r.deleted)
            .ok_or_else(|| ClientsError::UnknownClient(client_id.to_string()))?;
        r.deleted = true;
        self.clients.put(client_id, &r)?;
        Ok(())
    }

    /// Maps a user to a group (user mode).
    pub fn set_user(&self, dir: &Directory, user: &str, group: &str) -> Result<(), ClientsError> {
        if user.is_empty() || user.chars().count() > 256 || user.chars().any(char::is_control) {
            return Err(ClientsError::Invalid {
                field: "user",
                reason: "1 to 256 characters, no control characters".into(),
            });
        }
        if !dir.groups.contains_key(group) {
            return Err(ClientsError::UnknownGroup(group.to_string()));
        }
        self.users.put(user, &group.to_string())?;
        Ok(())
    }

    /// Whether any live client is in `group`.
    pub fn has_clients(&self, group: &str) -> Result<bool, ClientsError> {
        Ok(self
            .clients
            .scan::<ClientRecord>("")?
            .iter()
            .any(|(_, r)| !r.deleted && r.group == group))
    }

    pub async fn flush(&self) -> Result<(), ClientsError> {
        self.clients.flush().await?;
        Ok(())
    }
}

impl crate::serve::Placements for Registry {
    /// A live client's group and location; an unknown client counts as `default`.
    fn placement(&self, client_id: &str) -> (String, Option<String>) {
        match self.clients.get::<ClientRecord>(client_id).ok().flatten() {
            Some(r) if !r.deleted => (r.group, r.location),
            _ => (crate::settings::DEFAULT_GROUP.to_string(), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn hb(id: &str, install: &str) -> Heartbeat {
        Heartbeat {
            client_id: id.into(),
            install_group: Some(install.into()),
            ..Default::default()
        }
    }

    fn setup() -> (tempfile::TempDir, Registry, Directory) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let reg = Registry::open(&store).unwrap();
        let mut d = Directory::default();
        d.put_group("branch", "default").unwrap();
        d.put_group("lab", "default").unwrap();
        (dir, reg, d)
    }

    #[test]
    fn heartbeat_validation() {
        assert!(matches!(
            hb("", "x").validate(),
            Err(ClientsError::Invalid {
                field: "client_id",
                ..
            })
        ));
        assert!(hb(&"x".repeat(129), "x").validate().is_err());
        assert!(hb("ok", "x").validate().is_ok());
        let bad: Result<Heartbeat, _> = serde_json::from_str(r#"{"client_id":"a","os":"beos"}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn reconnection_cases() {
        let (_t, reg, mut d) = setup();
        let now = Utc::now();
        // 1. Install group.
        let r = reg.heartbeat(&d, &hb("c1", "branch"), None, now).unwrap();
        assert_eq!(r.group, "branch");
        // Unknown install group -> default.
        let r = reg.heartbeat(&d, &hb("c2", "nowhere"), None, now).unwrap();
        assert_eq!(r.group, "default");
        // A moved client that keeps heartbeating stays.
        reg.move_client(&d, "c1", "lab").unwrap();
        let r = reg.heartbeat(&d, &hb("c1", "branch"), None, now).unwrap();
        assert_eq!(r.group, "lab");
        // Deleted, then reconnects: back to install group (lab has no use_last_group).
        reg.delete("c1").unwrap();
        assert!(reg
            .list(now)
            .unwrap()
            .iter()
            .all(|v| v.record.client_id != "c1"));
        let r = reg.heartbeat(&d, &hb("c1", "branch"), None, now).unwrap();
        assert_eq!(r.group, "branch");
        // 2. use_last_group on the last group: a deleted client reconnects there.
        d.put_settings(
            "lab",
            None,
            &serde_json::json!({"reconnection": {"use_last_group": true}}),
        )
        .unwrap();
        reg.move_client(&d, "c1", "lab").unwrap();
        reg.delete("c1").unwrap();
        let r = reg.heartbeat(&d, &hb("c1", "branch"), None, now).unwrap();
        assert_eq!(r.group, "lab");
        // Overdue counts as a reconnect too; Linux ignores use_last_group.
        let mut linux = hb("c1", "branch");
        linux.os = Some(Os::Linux);
        let later = now + Duration::seconds(3 * 300 + 1);
        let r = reg.heartbeat(&d, &linux, None, later).unwrap();
        assert_eq!(r.group, "branch");
        let c1 = |t| {
            reg.list(t)
                .unwrap()
                .into_iter()
                .find(|v| v.record.client_id == "c1")
                .unwrap()
        };
        assert!(!c1(later).overdue);
        assert!(c1(later + Duration::seconds(901)).overdue);
        assert!(reg
            .list(later)
            .unwrap()
            .iter()
            .any(|v| v.record.client_id == "c2" && v.overdue));
    }

    #[test]
    fn user_mode_follows_the_user_unless_use_last_mode() {
        let (_t, reg, mut d) = setup();
        let now = Utc::now();
        reg.set_user(&d, "alice", "lab").unwrap();
        reg.set_user(&d, "bob", "branch").unwrap();
        assert!(reg.set_user(&d, "carol", "missing").is_err());
        let mut h = hb("c", "default");
        h.mode = Some(LoginMode::User);
        h.user = Some("alice".into());
        assert_eq!(reg.heartbeat(&d, &h, None, now).unwrap().group, "lab");
        h.user = Some("bob".into());
        assert_eq!(reg.heartbeat(&d, &h, None, now).unwrap().group, "branch");
        // use_last_mode on the current group: a new user does not move it.
        d.put_settings(
            "branch",
            None,
            &serde_json::json!({"reconnection.use_last_mode": true}),
        )
        .unwrap();
        h.user = Some("alice".into());
        assert_eq!(reg.heartbeat(&d, &h, None, now).unwrap().group, "branch");
        assert!(reg.has_clients("branch").unwrap());
        assert!(!reg.has_clients("lab").unwrap());
    }

    #[test]
    fn reply_carries_effective_settings_and_changes() {
        let (_t, _reg, mut d) = setup();
        d.put_settings(
            "branch",
            None,
            &serde_json::json!({"heartbeat_interval_s": 60}),
        )
        .unwrap();
        let serial = d
            .put_policy("default", serde_json::json!({"scan": true}))
            .unwrap();
        let mut h = hb("c", "branch");
        h.policy_serial = Some(serial);
        let r = reply(&d, &h, "branch", 4, None);
        assert_eq!(r.next_heartbeat_s, 60);
        assert_eq!(r.settings["heartbeat_interval_s"], 60);
        assert_eq!(r.settings["serial"], d.settings_serial("branch"));
        assert_eq!(r.policy_serial, serial);
        assert!(!r.policy_changed);
        assert!(r.catalog_changed);
        assert!(r.download_slot.is_none());
    }
}
