//! The manager's client registry: who the clients are and which group each is in.
//!
//! Owns the client records (install group, current group, login mode and last user, kept
//! after a delete so that a reconnect can honour `use_last_group`) and the user -> group map,
//! persisted through `store::Kv`, and the listing of clients a page at a time (no request
//! visits more than `page::SCAN_LIMIT` records). Group resolution itself is the pure
//! `core::settings::resolve_client_group`. It must never talk to the network or read settings
//! from anywhere but the directory it is given.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::page::{self, BadLimit, DEFAULT_LIMIT, MAX_LIMIT, SCAN_LIMIT};
use crate::core::fault::{Fault, Kind};
use crate::core::proto::{Heartbeat, Origin, Placement};
use crate::core::settings::{ClientHistory, Directory, HeartbeatFacts, LoginMode, Os};
use crate::store::{Kv, Store, StoreError};

/// What can go wrong in the registry.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("no client {0:?}")]
    UnknownClient(String),
    #[error("no group {0:?}")]
    UnknownGroup(String),
    #[error(transparent)]
    Limit(#[from] BadLimit),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Fault for RegistryError {
    fn kind(&self) -> Kind {
        match self {
            RegistryError::Invalid { .. } => Kind::BadInput,
            RegistryError::UnknownClient(_) | RegistryError::UnknownGroup(_) => Kind::NotFound,
            RegistryError::Limit(e) => e.kind(),
            RegistryError::Store(e) => e.kind(),
        }
    }

    fn code(&self) -> &'static str {
        match self {
            RegistryError::Invalid { .. } => "bad_request",
            RegistryError::UnknownClient(_) | RegistryError::UnknownGroup(_) => "not_found",
            RegistryError::Limit(e) => e.code(),
            RegistryError::Store(e) => e.code(),
        }
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
    /// An admin moved the client and has not deleted it since: user-mode heartbeats do not
    /// move it (a quarantined laptop stays in quarantine whoever logs in).
    #[serde(default)]
    pub admin_hold: bool,
    /// The node the client is behind (the nearest node that relayed its last heartbeat), or
    /// [`DIRECT`] for a client that talks to the manager itself.
    #[serde(default = "direct")]
    pub via: String,
    /// When the client sent its last heartbeat: its own `sent_at`, else when the first
    /// server received it, never later than that (a clock running ahead is cut to it), and
    /// never the time a relay reached the manager (that is `last_seen`). None in records of
    /// an older manager.
    #[serde(default)]
    pub sent_at: Option<DateTime<Utc>>,
}

/// The `via` of a client that talks to the manager itself.
pub const DIRECT: &str = "direct";

fn direct() -> String {
    DIRECT.to_string()
}

/// When the client sent `hb`, as the manager records it: the client's `sent_at` no later
/// than when the first server received it (`received_at`, no later than `now`), else that
/// time. A client whose clock runs ahead is not refused (its heartbeat is still the truth of
/// its state); its time is cut to the first server's, which is the latest it can have sent.
pub fn sent_at(
    hb: &Heartbeat,
    received_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> DateTime<Utc> {
    let first = received_at.map_or(now, |t| t.min(now));
    hb.sent_at.map_or(first, |t| t.min(first))
}

impl ClientRecord {
    pub fn overdue(&self, now: DateTime<Utc>) -> bool {
        overdue(self.last_seen, self.heartbeat_interval_s, now)
    }

    fn history(&self) -> ClientHistory {
        ClientHistory {
            install_group: self.install_group.clone(),
            group: self.group.clone(),
            last_moved_group: self.last_moved_group.clone(),
            login_mode: self.login_mode,
            last_user: self.last_user.clone(),
            admin_hold: self.admin_hold,
        }
    }
}

/// Whether a client last seen at `last_seen` that heartbeats every `interval_s` is overdue
/// at `now`: no heartbeat for three intervals.
fn overdue(last_seen: DateTime<Utc>, interval_s: u64, now: DateTime<Utc>) -> bool {
    let secs = (now - last_seen).num_seconds();
    secs > 0 && secs as u64 > interval_s.saturating_mul(3)
}

/// Group -> (live clients, of them overdue).
pub type GroupCounts = std::collections::BTreeMap<String, (u64, u64)>;

/// One line of `GET /v1/admin/clients`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientView {
    #[serde(flatten)]
    pub record: ClientRecord,
    pub overdue: bool,
}

/// A page of `GET /v1/admin/clients`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ClientQuery {
    pub limit: Option<usize>,
    /// Only the clients currently in this group (its subgroups not included).
    pub group: Option<String>,
    /// The last client id of the previous page (exclusive).
    pub after: Option<String>,
}

/// One answer of `GET /v1/admin/clients`: `next` is the `after` of the following page, or
/// null at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClientPage {
    pub clients: Vec<ClientView>,
    pub next: Option<String>,
}

/// The manager's client registry, persisted in sled.
#[derive(Clone)]
pub struct Registry {
    clients: Kv,
    users: Kv,
    /// Records one listing visits at most: [`SCAN_LIMIT`], smaller in tests.
    scan_limit: usize,
}

impl Registry {
    pub fn open(store: &Store) -> Result<Registry, RegistryError> {
        Ok(Registry {
            clients: store.kv("clients")?,
            users: store.kv("users")?,
            scan_limit: SCAN_LIMIT,
        })
    }

    /// The same registry, with listings visiting at most `records` each (at least 1).
    pub fn with_scan_limit(mut self, records: usize) -> Registry {
        self.scan_limit = records.max(1);
        self
    }

    pub fn get(&self, client_id: &str) -> Result<Option<ClientRecord>, RegistryError> {
        Ok(self.clients.get(client_id)?)
    }

    /// Registers or updates a client from a heartbeat and decides its group.
    pub fn heartbeat(
        &self,
        dir: &Directory,
        hb: &Heartbeat,
        origin: Origin,
        now: DateTime<Utc>,
    ) -> Result<ClientRecord, RegistryError> {
        hb.validate().map_err(|e| RegistryError::Invalid {
            field: "heartbeat",
            reason: e.to_string(),
        })?;
        let prior: Option<ClientRecord> = self.clients.get(&hb.client_id)?;
        let reconnect = match &prior {
            None => true,
            Some(p) => p.deleted || p.overdue(now),
        };
        let history = prior.as_ref().map(ClientRecord::history);
        let install = hb.install_group.clone().unwrap_or_default();
        let user = hb.user();
        let facts = HeartbeatFacts {
            install_group: &install,
            os: hb.os(),
            login_mode: hb.login_mode(),
            user,
            reconnect,
        };
        let group =
            crate::core::settings::resolve_client_group(dir, history.as_ref(), &facts, |u| {
                self.users.get::<String>(u).ok().flatten()
            });
        let effective = dir.effective(&group, hb.location());
        let install_group = match &prior {
            Some(p) if !p.install_group.is_empty() => p.install_group.clone(),
            _ => dir.resolve_group(&install).to_string(),
        };
        // The hold lasts while the client stays where the admin put it.
        let admin_hold = prior.as_ref().is_some_and(|p| {
            p.admin_hold && !p.deleted && p.last_moved_group.as_ref() == Some(&group)
        });
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
            address: origin.address,
            via: origin.via.unwrap_or_else(direct),
            sent_at: Some(sent_at(hb, origin.received_at, now)),
            first_seen: prior.as_ref().map_or(now, |p| p.first_seen),
            last_seen: now,
            heartbeat_interval_s: effective.heartbeat_interval_s,
            deleted: false,
            admin_hold,
        };
        self.clients.put(&record.client_id, &record)?;
        Ok(record)
    }

    /// A page of the clients that are not deleted (and in `q.group` when given), in client
    /// id order after `q.after` (exclusive), with whether each is overdue. Stops after
    /// [`SCAN_LIMIT`] records (deleted and filtered-out ones count) with `next` where it
    /// stopped, so a page may be short while `next` is set.
    pub fn list(&self, q: &ClientQuery, now: DateTime<Utc>) -> Result<ClientPage, RegistryError> {
        let limit = page::limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
        // Client ids hold no NUL: the smallest key after the cursor is the cursor and a NUL.
        let from = match q.after.as_deref().filter(|a| !a.is_empty()) {
            Some(a) => format!("{a}\0"),
            None => String::new(),
        };
        let mut clients: Vec<ClientView> = Vec::new();
        let mut scanned = 0usize;
        let mut last: Option<String> = None;
        let mut stopped = false;
        self.clients
            .visit::<ClientRecord>("", &from, false, |key, r| {
                let listed = !r.deleted && q.group.as_ref().is_none_or(|g| *g == r.group);
                if listed && clients.len() == limit {
                    stopped = true;
                    return false;
                }
                if listed {
                    clients.push(ClientView {
                        overdue: r.overdue(now),
                        record: r,
                    });
                }
                last = Some(key);
                scanned += 1;
                if scanned >= self.scan_limit {
                    stopped = true;
                    return false;
                }
                true
            })?;
        Ok(ClientPage {
            clients,
            next: if stopped { last } else { None },
        })
    }

    /// Moves a client to `group` (an admin action).
    pub fn move_client(
        &self,
        dir: &Directory,
        client_id: &str,
        group: &str,
    ) -> Result<ClientRecord, RegistryError> {
        if !dir.groups.contains_key(group) {
            return Err(RegistryError::UnknownGroup(group.to_string()));
        }
        let mut r: ClientRecord = self
            .clients
            .get(client_id)?
            .filter(|r: &ClientRecord| !r.deleted)
            .ok_or_else(|| RegistryError::UnknownClient(client_id.to_string()))?;
        r.group = group.to_string();
        r.last_moved_group = Some(group.to_string());
        r.admin_hold = true;
        self.clients.put(client_id, &r)?;
        Ok(r)
    }

    /// Deletes a client: hidden, but its history is kept for a reconnect.
    pub fn delete(&self, client_id: &str) -> Result<(), RegistryError> {
        let mut r: ClientRecord = self
            .clients
            .get(client_id)?
            .filter(|r: &ClientRecord| !r.deleted)
            .ok_or_else(|| RegistryError::UnknownClient(client_id.to_string()))?;
        r.deleted = true;
        r.admin_hold = false;
        self.clients.put(client_id, &r)?;
        Ok(())
    }

    /// Maps a user to a group (user mode).
    pub fn set_user(&self, dir: &Directory, user: &str, group: &str) -> Result<(), RegistryError> {
        if user.is_empty() || user.chars().count() > 256 || user.chars().any(char::is_control) {
            return Err(RegistryError::Invalid {
                field: "user",
                reason: "1 to 256 characters, no control characters".into(),
            });
        }
        if !dir.groups.contains_key(group) {
            return Err(RegistryError::UnknownGroup(group.to_string()));
        }
        self.users.put(user, &group.to_string())?;
        Ok(())
    }

    /// Whether any live client is in `group`: records are visited one at a time (only their
    /// group and whether deleted decoded) until the first match.
    pub fn has_clients(&self, group: &str) -> Result<bool, RegistryError> {
        #[derive(Deserialize)]
        struct Membership {
            group: String,
            #[serde(default)]
            deleted: bool,
        }
        let mut found = false;
        self.clients.visit::<Membership>("", "", false, |_, r| {
            found = !r.deleted && r.group == group;
            !found
        })?;
        Ok(found)
    }

    /// Per group, its live clients and how many of them are overdue at `now`, visiting at
    /// most `max_records` records (only the fields needed decoded); true when it stopped
    /// there before the end. For the status page, which counts in the background.
    pub fn tally(
        &self,
        now: DateTime<Utc>,
        max_records: usize,
    ) -> Result<(GroupCounts, bool), RegistryError> {
        #[derive(Deserialize)]
        struct Seen {
            group: String,
            #[serde(default)]
            deleted: bool,
            last_seen: DateTime<Utc>,
            heartbeat_interval_s: u64,
        }
        let mut out = GroupCounts::new();
        let mut visited = 0usize;
        let mut stopped = false;
        self.clients.visit::<Seen>("", "", false, |_, r| {
            if visited == max_records {
                stopped = true;
                return false;
            }
            visited += 1;
            if !r.deleted {
                let late = overdue(r.last_seen, r.heartbeat_interval_s, now);
                let e = out.entry(r.group).or_default();
                e.0 += 1;
                e.1 += late as u64;
            }
            true
        })?;
        Ok((out, stopped))
    }

    pub async fn flush(&self) -> Result<(), RegistryError> {
        self.clients.flush().await?;
        Ok(())
    }
}

impl Registry {
    /// Where a live client is; None for one never seen or deleted.
    pub fn placement(&self, client_id: &str) -> Option<Placement> {
        match self.clients.get::<ClientRecord>(client_id).ok().flatten() {
            Some(r) if !r.deleted => Some(Placement {
                group: r.group,
                location: r.location,
            }),
            _ => None,
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

    /// Every listed client, following `next` (bounded).
    fn all(reg: &Registry, now: DateTime<Utc>) -> Vec<ClientView> {
        let mut out = Vec::new();
        let mut q = ClientQuery::default();
        for _ in 0..1000 {
            let page = reg.list(&q, now).unwrap();
            out.extend(page.clients);
            match page.next {
                Some(n) => q.after = Some(n),
                None => return out,
            }
        }
        panic!("the listing did not end");
    }

    #[test]
    fn reconnection_cases() {
        let (_t, reg, mut d) = setup();
        let now = Utc::now();
        // 1. Install group.
        let r = reg
            .heartbeat(&d, &hb("c1", "branch"), Origin::default(), now)
            .unwrap();
        assert_eq!(r.group, "branch");
        // Unknown install group -> default.
        let r = reg
            .heartbeat(&d, &hb("c2", "nowhere"), Origin::default(), now)
            .unwrap();
        assert_eq!(r.group, "default");
        // A moved client that keeps heartbeating stays.
        reg.move_client(&d, "c1", "lab").unwrap();
        let r = reg
            .heartbeat(&d, &hb("c1", "branch"), Origin::default(), now)
            .unwrap();
        assert_eq!(r.group, "lab");
        // Deleted, then reconnects: back to install group (lab has no use_last_group).
        reg.delete("c1").unwrap();
        assert!(all(&reg, now).iter().all(|v| v.record.client_id != "c1"));
        let r = reg
            .heartbeat(&d, &hb("c1", "branch"), Origin::default(), now)
            .unwrap();
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
        let r = reg
            .heartbeat(&d, &hb("c1", "branch"), Origin::default(), now)
            .unwrap();
        assert_eq!(r.group, "lab");
        // Overdue counts as a reconnect too; Linux ignores use_last_group.
        let mut linux = hb("c1", "branch");
        linux.os = Some(Os::Linux);
        let later = now + Duration::seconds(3 * 300 + 1);
        let r = reg.heartbeat(&d, &linux, Origin::default(), later).unwrap();
        assert_eq!(r.group, "branch");
        let c1 = |t| {
            all(&reg, t)
                .into_iter()
                .find(|v| v.record.client_id == "c1")
                .unwrap()
        };
        assert!(!c1(later).overdue);
        assert!(c1(later + Duration::seconds(901)).overdue);
        assert!(all(&reg, later)
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
        assert_eq!(
            reg.heartbeat(&d, &h, Origin::default(), now).unwrap().group,
            "lab"
        );
        h.user = Some("bob".into());
        assert_eq!(
            reg.heartbeat(&d, &h, Origin::default(), now).unwrap().group,
            "branch"
        );
        // use_last_mode on the current group: a new user does not move it.
        d.put_settings(
            "branch",
            None,
            &serde_json::json!({"reconnection.use_last_mode": true}),
        )
        .unwrap();
        h.user = Some("alice".into());
        assert_eq!(
            reg.heartbeat(&d, &h, Origin::default(), now).unwrap().group,
            "branch"
        );
        assert!(reg.has_clients("branch").unwrap());
        assert!(!reg.has_clients("lab").unwrap());
    }

    #[test]
    fn an_admin_move_holds_against_user_mode_until_a_delete() {
        let (_t, reg, mut d) = setup();
        let now = Utc::now();
        d.put_group("quarantine", "default").unwrap();
        reg.set_user(&d, "alice", "lab").unwrap();
        reg.set_user(&d, "bob", "branch").unwrap();
        let mut h = hb("c", "default");
        h.mode = Some(LoginMode::User);
        h.user = Some("alice".into());
        assert_eq!(
            reg.heartbeat(&d, &h, Origin::default(), now).unwrap().group,
            "lab"
        );
        reg.move_client(&d, "c", "quarantine").unwrap();
        // A new user, the same user, a computer-mode heartbeat: all stay in quarantine.
        for user in ["bob", "alice", "bob"] {
            h.user = Some(user.into());
            let r = reg.heartbeat(&d, &h, Origin::default(), now).unwrap();
            assert_eq!(r.group, "quarantine", "user {user}");
            assert!(r.admin_hold);
        }
        // Moved again by the admin: held there.
        reg.move_client(&d, "c", "branch").unwrap();
        h.user = Some("alice".into());
        assert_eq!(
            reg.heartbeat(&d, &h, Origin::default(), now).unwrap().group,
            "branch"
        );
        // Deleted: the hold ends; the reconnect follows the rules again.
        reg.delete("c").unwrap();
        let r = reg.heartbeat(&d, &h, Origin::default(), now).unwrap();
        assert!(!r.admin_hold);
        assert_eq!(r.group, "lab", "a new record follows alice's mapping");
        h.user = Some("bob".into());
        assert_eq!(
            reg.heartbeat(&d, &h, Origin::default(), now).unwrap().group,
            "branch"
        );
    }
}

#[cfg(test)]
mod paging_tests {
    use super::*;

    fn registry_with(n: usize) -> (tempfile::TempDir, Registry, Directory, DateTime<Utc>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let reg = Registry::open(&store).unwrap();
        let mut d = Directory::default();
        d.put_group("lab", "default").unwrap();
        let now = Utc::now();
        for i in 0..n {
            let hb = Heartbeat {
                client_id: format!("c{i:03}"),
                ..Default::default()
            };
            reg.heartbeat(&d, &hb, Origin::default(), now).unwrap();
        }
        (dir, reg, d, now)
    }

    #[test]
    fn pages_follow_after_exclusively_and_skip_deleted_clients() {
        let (_t, reg, _d, now) = registry_with(25);
        reg.delete("c010").unwrap();
        let q = |limit, after: Option<&str>| ClientQuery {
            limit: Some(limit),
            after: after.map(str::to_string),
            group: None,
        };
        let first = reg.list(&q(10, None), now).unwrap();
        let ids: Vec<_> = first
            .clients
            .iter()
            .map(|c| c.record.client_id.clone())
            .collect();
        assert_eq!(ids.first().map(String::as_str), Some("c000"));
        assert_eq!(ids.len(), 10);
        // Where the walk stopped: the deleted c010 was visited looking for an 11th.
        assert_eq!(first.next.as_deref(), Some("c010"));
        let second = reg.list(&q(10, first.next.as_deref()), now).unwrap();
        assert_eq!(
            second.clients[0].record.client_id, "c011",
            "c010 is deleted"
        );
        let third = reg.list(&q(10, second.next.as_deref()), now).unwrap();
        assert_eq!(third.clients.len(), 4);
        assert_eq!(third.next, None);
        // A cursor past the end is an empty last page.
        let past = reg.list(&q(10, Some("zzz")), now).unwrap();
        assert!(past.clients.is_empty() && past.next.is_none());
        assert!(reg.list(&q(10_001, None), now).is_err());
        assert!(reg.list(&q(0, None), now).is_err());
    }

    #[test]
    fn the_scan_bound_answers_a_short_page_with_next() {
        let (_t, reg, _d, now) = registry_with(30);
        for i in 0..20 {
            reg.delete(&format!("c{i:03}")).unwrap();
        }
        let reg = reg.with_scan_limit(8);
        let page = reg.list(&ClientQuery::default(), now).unwrap();
        assert!(page.clients.is_empty(), "eight deleted records visited");
        assert_eq!(page.next.as_deref(), Some("c007"));
        let mut seen = Vec::new();
        let mut q = ClientQuery::default();
        for _ in 0..10 {
            let page = reg.list(&q, now).unwrap();
            seen.extend(page.clients.into_iter().map(|c| c.record.client_id));
            match page.next {
                Some(n) => q.after = Some(n),
                None => break,
            }
        }
        let want: Vec<String> = (20..30).map(|i| format!("c{i:03}")).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn has_clients_stops_at_the_first_live_member() {
        let (_t, reg, d, _now) = registry_with(5);
        assert!(reg.has_clients("default").unwrap());
        assert!(!reg.has_clients("lab").unwrap());
        reg.move_client(&d, "c003", "lab").unwrap();
        assert!(reg.has_clients("lab").unwrap());
        reg.delete("c003").unwrap();
        assert!(!reg.has_clients("lab").unwrap());
    }

    #[test]
    fn a_record_shows_the_nearest_node_and_a_send_time_never_in_the_future() {
        let dir = tempfile::tempdir().unwrap();
        let reg = Registry::open(&Store::open(dir.path()).unwrap()).unwrap();
        let mut d = Directory::default();
        d.put_group("branch", "default").unwrap();
        let hb = |id: &str, group: &str| Heartbeat {
            client_id: id.into(),
            install_group: Some(group.into()),
            ..Default::default()
        };
        let now = Utc::now();
        let direct = reg
            .heartbeat(&d, &hb("c1", "branch"), Origin::default(), now)
            .unwrap();
        assert_eq!(direct.via, DIRECT);
        assert_eq!(
            direct.sent_at,
            Some(now),
            "no sent_at: when it was received"
        );
        let mut h = hb("c2", "branch");
        let first = now - chrono::Duration::seconds(20);
        h.sent_at = Some(first - chrono::Duration::seconds(1));
        let origin = Origin {
            address: None,
            via: Some("node-a".into()),
            received_at: Some(first),
        };
        let relayed = reg.heartbeat(&d, &h, origin.clone(), now).unwrap();
        assert_eq!(relayed.via, "node-a");
        assert_eq!(relayed.sent_at, h.sent_at, "the client's own time");
        assert_eq!(relayed.last_seen, now);
        // A clock an hour ahead is cut to the first server's time.
        h.sent_at = Some(now + chrono::Duration::hours(1));
        let skewed = reg.heartbeat(&d, &h, origin, now).unwrap();
        assert_eq!(skewed.sent_at, Some(first));
        // A relay claiming a first reception after now is cut to now.
        h.sent_at = None;
        let late = Origin {
            received_at: Some(now + chrono::Duration::hours(1)),
            ..Origin::default()
        };
        assert_eq!(reg.heartbeat(&d, &h, late, now).unwrap().sent_at, Some(now));
    }
}
