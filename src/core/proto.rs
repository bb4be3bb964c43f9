//! The wire of the client API and of node-to-upstream calls, as plain data.
//!
//! Owns every request and answer body the roles exchange (heartbeat and its reply, the
//! download slot, events and applications, the node-token batches, the `/v1/sync` snapshot,
//! the publish answer), their validation (bounded fields, with a message naming the field),
//! the push events of `/v1/stream` and a parser for their text, and the body limits. Manager,
//! node, agents and the load tester all speak through these types, so the roles cannot drift
//! apart. It must never hold state, do I/O or decide where a client belongs.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::catalog::Catalog;
use super::digest::Digest;
use super::fault::{Fault, Kind};
use super::settings::{Directory, LoginMode, Os, DEFAULT_GROUP};

/// Largest JSON body of the client and admin API.
pub const BODY_LIMIT: usize = 1 << 20;
/// Largest batch a node may send on its node-token endpoints.
pub const BATCH_LIMIT: usize = 16 << 20;
/// Largest batch a node sends: half of [`BATCH_LIMIT`], so one event accepted at
/// [`BODY_LIMIT`] always fits upstream with the heartbeats that travel with it.
pub const FORWARD_BATCH: usize = 8 << 20;

/// Largest `/v1/sync` snapshot a node reads from an upstream: 64 MiB.
pub const SNAPSHOT_READ_LIMIT: usize = 64 << 20;

/// Largest `/v1/sync` snapshot (the directory plus the catalog, serialized) that a directory
/// change at the manager may produce: 48 MiB, below [`SNAPSHOT_READ_LIMIT`], so every node
/// can always mirror, with room for the catalog to grow between directory changes. A change
/// that would go over it, and does not shrink the snapshot, is refused with 413.
pub const MAX_SNAPSHOT_BYTES: usize = 48 << 20;

/// Longest client id.
pub const MAX_CLIENT_ID: usize = 128;
/// Longest event id.
pub const MAX_EVENT_ID: usize = 128;

/// A body that breaks a rule of the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    /// The offending field, e.g. `events[3].time`.
    pub field: String,
    pub reason: String,
}

impl Fault for Invalid {
    fn kind(&self) -> Kind {
        Kind::BadInput
    }

    fn code(&self) -> &'static str {
        "bad_request"
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Invalid {
    Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Text of at most `max` characters without control characters.
fn check_text(field: &str, v: Option<&str>, max: usize) -> Result<(), Invalid> {
    if let Some(s) = v {
        if s.chars().count() > max {
            return Err(invalid(field, format!("at most {max} characters")));
        }
        if s.chars().any(char::is_control) {
            return Err(invalid(field, "control characters are not allowed"));
        }
    }
    Ok(())
}

/// A client id: required, 1 to [`MAX_CLIENT_ID`] characters, no control characters.
pub fn check_client_id(client_id: &str) -> Result<(), Invalid> {
    if client_id.is_empty() {
        return Err(invalid("client_id", "is required"));
    }
    check_text("client_id", Some(client_id), MAX_CLIENT_ID)
}

// === heartbeats ===

/// `POST /v1/heartbeat` body. Unknown fields are ignored, so that a newer client's
/// heartbeat still reaches an older server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
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
    /// An enrolment token, on the first heartbeat of a client that has no credential yet.
    /// Never relayed: the server that takes it enrols the client and drops it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enroll_token: Option<String>,
    /// When the client sent this heartbeat, by its own clock (set by the agent; relayed as
    /// it is). The manager records it no later than the time the first server received the
    /// heartbeat: a clock running ahead cannot put a client's last heartbeat in the future.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
}

impl Heartbeat {
    /// `client_id` required, 1 to 128 characters; text fields bounded.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_client_id(&self.client_id)?;
        check_text("install_group", self.install_group.as_deref(), 64)?;
        check_text("location", self.location.as_deref(), 64)?;
        check_text("client_version", self.client_version.as_deref(), 64)?;
        check_text("user", self.user.as_deref(), 256)?;
        check_text("enroll_token", self.enroll_token.as_deref(), 256)?;
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

    /// The user, with empty meaning none.
    pub fn user(&self) -> Option<&str> {
        self.user.as_deref().filter(|u| !u.is_empty())
    }
}

/// The download slot of a heartbeat reply.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DownloadSlot {
    pub catalog_revision: u64,
    pub not_before: DateTime<Utc>,
    /// `not_before` as seconds from now (rounded up), for clients with skewed clocks.
    pub delay_s: u64,
    pub window_s: u64,
    /// When the window opened at this server (the revision became available here), so that
    /// a client or a load tester can tell where in the window its slot falls.
    pub window_start: DateTime<Utc>,
}

/// `POST /v1/node/slot` (node token): a node asks its upstream when to prefetch a revision.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PrefetchSlotRequest {
    /// The asking node's id (checked like a client id).
    pub node_id: String,
    /// The revision it mirrored and would fetch.
    pub catalog_revision: u64,
    /// Its `upstream.prefetch_window_s` (the upstream caps it at 86,400).
    pub window_s: u64,
}

/// `POST /v1/node/slot` answer: the node's slot, or null to fetch at once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PrefetchSlotReply {
    pub download_slot: Option<DownloadSlot>,
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
    /// The credential issued by this heartbeat's enrolment, to keep and send from now on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

impl HeartbeatReply {
    /// The reply to `hb` from a client placed in `group`.
    pub fn new(
        dir: &Directory,
        hb: &Heartbeat,
        group: &str,
        catalog_revision: u64,
        download_slot: Option<DownloadSlot>,
    ) -> HeartbeatReply {
        let location = hb.location();
        let policy_serial = dir.policy_serial(group);
        HeartbeatReply {
            client_id: hb.client_id.clone(),
            group: group.to_string(),
            settings: settings_json(dir, group, location),
            policy_serial,
            catalog_revision,
            next_heartbeat_s: dir.effective(group, location).heartbeat_interval_s,
            download_slot,
            policy_changed: hb.policy_serial != Some(policy_serial),
            catalog_changed: hb.catalog_revision != Some(catalog_revision),
            credential: None,
        }
    }
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

/// Where a client belongs as a server knows it: its group and the location of its last
/// heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Placement {
    pub group: String,
    #[serde(default)]
    pub location: Option<String>,
}

impl Placement {
    /// Where a client nobody has placed counts: `default`, no location.
    pub fn unknown() -> Placement {
        Placement {
            group: DEFAULT_GROUP.to_string(),
            location: None,
        }
    }
}

/// One heartbeat relayed by a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayedHeartbeat {
    pub heartbeat: Heartbeat,
    /// The client's address as the node saw it.
    pub address: Option<String>,
    /// The node the client is behind (the first node that relayed it); a node relaying a
    /// relayed heartbeat keeps it, so a chain keeps the nearest node. None from an older node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    /// When the first server received the heartbeat (that server's clock), passed along so
    /// the manager never takes the time a relay reached it for the time the client sent it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<DateTime<Utc>>,
}

/// Where a heartbeat came from, as the server placing it learns: the client's address, and
/// for a relayed one the node it is behind and when the first server received it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    pub address: Option<String>,
    pub via: Option<String>,
    pub received_at: Option<DateTime<Utc>>,
}

impl Origin {
    /// A heartbeat a client sent to this server itself.
    pub fn direct(address: Option<String>) -> Origin {
        Origin {
            address,
            ..Origin::default()
        }
    }
}

/// `POST /v1/node/heartbeats` body.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct HeartbeatBatch {
    pub heartbeats: Vec<RelayedHeartbeat>,
}

/// The group the upstream placed a relayed client in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Assignment {
    pub client_id: String,
    pub group: String,
}

/// `POST /v1/node/heartbeats` answer.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct BatchReply {
    pub assignments: Vec<Assignment>,
    /// Heartbeats refused as invalid, by client id, with the reason.
    pub rejected: Vec<(String, String)>,
}

// === events and applications ===

/// One event as a client sends it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub id: String,
    pub kind: String,
    #[serde(default)]
    pub subkind: Option<String>,
    /// RFC 3339, as sent.
    pub time: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

/// Critical events (contract): kind `risk` except subkind `cookie`, and kind `intrusion`.
pub fn is_critical(kind: &str, subkind: Option<&str>) -> bool {
    match kind {
        "risk" => subkind != Some("cookie"),
        "intrusion" => true,
        _ => false,
    }
}

impl Event {
    pub fn is_critical(&self) -> bool {
        is_critical(&self.kind, self.subkind.as_deref())
    }

    /// The event's time, parsed.
    pub fn parsed_time(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.time)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// `POST /v1/events` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventUpload {
    pub client_id: String,
    pub events: Vec<Event>,
}

impl EventUpload {
    /// Every event needs an `id` of 1 to 128 characters, a `kind`, and an RFC 3339 `time`.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_client_id(&self.client_id)?;
        for (i, e) in self.events.iter().enumerate() {
            if e.id.is_empty() || e.id.chars().count() > MAX_EVENT_ID {
                return Err(invalid(
                    format!("events[{i}].id"),
                    format!("must be 1 to {MAX_EVENT_ID} characters"),
                ));
            }
            if e.kind.is_empty() || e.kind.chars().count() > 64 {
                return Err(invalid(
                    format!("events[{i}].kind"),
                    "must be 1 to 64 characters",
                ));
            }
            check_text(&format!("events[{i}].subkind"), e.subkind.as_deref(), 64)?;
            if e.parsed_time().is_none() {
                return Err(invalid(
                    format!("events[{i}].time"),
                    format!("{:?} is not an RFC 3339 time", e.time),
                ));
            }
        }
        Ok(())
    }
}

/// One application a client reports.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Application {
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
}

/// `POST /v1/applications` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApplicationUpload {
    pub client_id: String,
    pub applications: Vec<Application>,
}

impl ApplicationUpload {
    pub fn validate(&self) -> Result<(), Invalid> {
        check_client_id(&self.client_id)?;
        for (i, a) in self.applications.iter().enumerate() {
            if a.name.is_empty() || a.name.chars().count() > 256 {
                return Err(invalid(
                    format!("applications[{i}].name"),
                    "must be 1 to 256 characters",
                ));
            }
            check_text(&format!("applications[{i}].name"), Some(&a.name), 256)?;
            check_text(
                &format!("applications[{i}].version"),
                a.version.as_deref(),
                128,
            )?;
            check_text(&format!("applications[{i}].path"), a.path.as_deref(), 1024)?;
            if let Some(sha) = &a.sha256 {
                if sha.parse::<Digest>().is_err() {
                    return Err(invalid(
                        format!("applications[{i}].sha256"),
                        "must be 64 lower-case hex characters",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// An upload of events or applications, as a node queues and forwards it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Upload {
    Events(EventUpload),
    Applications(ApplicationUpload),
}

impl Upload {
    pub fn client_id(&self) -> &str {
        match self {
            Upload::Events(u) => &u.client_id,
            Upload::Applications(u) => &u.client_id,
        }
    }

    pub fn is_critical(&self) -> bool {
        match self {
            Upload::Events(u) => u.events.iter().any(Event::is_critical),
            Upload::Applications(_) => false,
        }
    }

    /// Events or applications it holds.
    pub fn count(&self) -> usize {
        match self {
            Upload::Events(u) => u.events.len(),
            Upload::Applications(u) => u.applications.len(),
        }
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            Upload::Events(u) => u.validate(),
            Upload::Applications(u) => u.validate(),
        }
    }
}

/// An upload with where the server that accepted it placed its client. The upstream files
/// the events under its own placement of the client when it has one, else under this one:
/// a client first seen by a node is placed there before the upstream heard of it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Placed {
    #[serde(flatten)]
    pub upload: Upload,
    /// None in records of an older node, which sent no placement.
    #[serde(default)]
    pub placement: Option<Placement>,
}

/// `POST /v1/node/events` body: uploads a node accepted from its clients, oldest first, and
/// the heartbeats of their clients it has not relayed yet. The upstream applies the
/// heartbeats first, so that every event is filed under its client's real group even when
/// the client was first seen in this very batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct UploadBatch {
    #[serde(default)]
    pub heartbeats: Vec<RelayedHeartbeat>,
    pub uploads: Vec<Placed>,
}

// === mirroring ===

/// What `GET /v1/sync` returns: the group tree with each group's own keys, location
/// overrides and policy, the site settings, and the current catalog.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub directory: Directory,
    pub catalog: Catalog,
    /// The manager's signature of `catalog` (hex ed25519 over its wire bytes).
    #[serde(default)]
    pub catalog_signature: Option<String>,
    /// Since when the server sending it has had no upstream answering (a node in an
    /// outage); None when it is fresh (always, for the manager).
    #[serde(default)]
    pub stale_since: Option<DateTime<Utc>>,
}

impl Snapshot {
    /// Serializes the snapshot with a strong ETag derived from its bytes, so any change,
    /// including a deleted group, changes the tag.
    pub fn encode(&self) -> Result<(String, Vec<u8>), serde_json::Error> {
        let bytes = serde_json::to_vec(self)?;
        let digest = Digest::of(&bytes).to_hex();
        Ok((format!("\"sync-{}\"", &digest[..16]), bytes))
    }
}

/// The answer to a publish.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct PublishResult {
    pub sha256: Digest,
    pub size: u64,
    pub revision: u64,
    pub name: String,
    pub version: String,
}

// === push ===

pub use super::push::{directory_changes, state_changes, Change};

/// Longest line and longest event (its data) [`EventParser`] takes: an upstream that sends
/// more is refused, rather than grown into.
pub const MAX_SSE_LINE: usize = 64 << 10;

/// Server-sent events that break the bounds of [`EventParser`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("a line of more than {MAX_SSE_LINE} bytes")]
    LineTooLong,
    #[error("an event of more than {MAX_SSE_LINE} bytes of data")]
    EventTooLarge,
}

/// Parses SSE text incrementally: feed bytes, get back the events seen. Each byte is looked
/// at once (a line that grows over many reads is not searched again from its start), and a
/// line or an event over [`MAX_SSE_LINE`] is an error.
#[derive(Default)]
pub struct EventParser {
    buf: Vec<u8>,
    /// Bytes of `buf` already known to hold no newline.
    scanned: usize,
    name: Option<String>,
    data: String,
}

impl EventParser {
    /// Returns every complete event (name, data) in what has arrived so far.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<(String, String)>, SseError> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = self.buf[start + self.scanned..]
            .iter()
            .position(|b| *b == b'\n')
        {
            let end = start + self.scanned + pos;
            self.scanned = 0;
            if end - start > MAX_SSE_LINE {
                return Err(SseError::LineTooLong);
            }
            let line = String::from_utf8_lossy(&self.buf[start..end]).into_owned();
            start = end + 1;
            let line = line.trim_end_matches('\r');
            if line.is_empty() {
                if self.name.is_some() || !self.data.is_empty() {
                    let name = self.name.take().unwrap_or_else(|| "message".into());
                    out.push((name, std::mem::take(&mut self.data)));
                }
            } else if let Some(v) = line.strip_prefix("event:") {
                self.name = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                if self.data.len() + v.len() > MAX_SSE_LINE {
                    return Err(SseError::EventTooLarge);
                }
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(v.trim_start());
            }
        }
        self.buf.drain(..start);
        self.scanned = self.buf.len();
        if self.buf.len() > MAX_SSE_LINE {
            return Err(SseError::LineTooLong);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, kind: &str, subkind: Option<&str>) -> Event {
        Event {
            id: id.into(),
            kind: kind.into(),
            subkind: subkind.map(str::to_string),
            time: "2026-11-24T10:00:00Z".into(),
            data: serde_json::json!({}),
        }
    }

    #[test]
    fn a_heartbeat_needs_a_bounded_client_id_and_a_known_os() {
        let hb = |id: &str| Heartbeat {
            client_id: id.into(),
            ..Default::default()
        };
        assert_eq!(hb("").validate().unwrap_err().field, "client_id");
        assert_eq!(
            hb(&"x".repeat(129)).validate().unwrap_err().field,
            "client_id"
        );
        assert!(hb("ok").validate().is_ok());
        let bad: Result<Heartbeat, _> = serde_json::from_str(r#"{"client_id":"a","os":"beos"}"#);
        assert!(bad.is_err());
    }

    #[test]
    fn critical_events_are_risk_but_cookies_and_intrusion() {
        assert!(ev("1", "risk", Some("virus")).is_critical());
        assert!(ev("1", "risk", None).is_critical());
        assert!(!ev("1", "risk", Some("cookie")).is_critical());
        assert!(ev("1", "intrusion", None).is_critical());
        assert!(!ev("1", "system_change", None).is_critical());
    }

    #[test]
    fn event_validation_names_the_field() {
        let mut u = EventUpload {
            client_id: "c".into(),
            events: vec![ev("1", "risk", None)],
        };
        assert!(u.validate().is_ok());
        u.events[0].id = "x".repeat(129);
        assert_eq!(u.validate().unwrap_err().field, "events[0].id");
        u.events[0].id = "ok".into();
        u.events[0].time = "yesterday".into();
        assert_eq!(u.validate().unwrap_err().field, "events[0].time");
        u.events[0].time = "2026-11-24T10:00:00+02:00".into();
        u.events[0].kind = String::new();
        assert_eq!(u.validate().unwrap_err().field, "events[0].kind");
        u.client_id = String::new();
        assert_eq!(u.validate().unwrap_err().field, "client_id");
    }

    #[test]
    fn a_queued_upload_without_a_placement_still_decodes() {
        // What an older node's outbox holds: the upload alone.
        let old = serde_json::to_string(&Upload::Events(EventUpload {
            client_id: "c".into(),
            events: vec![ev("1", "risk", None)],
        }))
        .unwrap();
        let placed: Placed = serde_json::from_str(&old).unwrap();
        assert_eq!(placed.placement, None);
        assert_eq!(placed.upload.client_id(), "c");
        let again = Placed {
            placement: Some(Placement {
                group: "branch".into(),
                location: None,
            }),
            ..placed
        };
        let text = serde_json::to_string(&again).unwrap();
        assert_eq!(serde_json::from_str::<Placed>(&text).unwrap(), again);
    }

    #[test]
    fn the_sse_parser_splits_events_and_ignores_comments() {
        let mut p = EventParser::default();
        assert!(p.feed(b": keep-alive\n\nevent: cata").unwrap().is_empty());
        let got = p
            .feed(b"log\ndata: {\"revision\":3}\n\nevent: settings\ndata: {}\n\n")
            .unwrap();
        assert_eq!(
            got,
            vec![
                ("catalog".to_string(), "{\"revision\":3}".to_string()),
                ("settings".to_string(), "{}".to_string())
            ]
        );
    }

    #[test]
    fn a_reply_carries_effective_settings_and_what_changed() {
        let mut d = Directory::default();
        d.put_group("branch", "default").unwrap();
        d.put_settings(
            "branch",
            None,
            &serde_json::json!({"heartbeat_interval_s": 60}),
        )
        .unwrap();
        let serial = d
            .put_policy("default", serde_json::json!({"scan": true}))
            .unwrap();
        let mut h = Heartbeat {
            client_id: "c".into(),
            install_group: Some("branch".into()),
            ..Default::default()
        };
        h.policy_serial = Some(serial);
        let r = HeartbeatReply::new(&d, &h, "branch", 4, None);
        assert_eq!(r.next_heartbeat_s, 60);
        assert_eq!(r.settings["heartbeat_interval_s"], 60);
        assert_eq!(r.settings["serial"], d.settings_serial("branch"));
        assert_eq!(r.policy_serial, serial);
        assert!(!r.policy_changed);
        assert!(r.catalog_changed);
        assert!(r.download_slot.is_none());
    }

    #[test]
    fn the_sse_parser_refuses_a_line_or_an_event_over_its_bound() {
        let mut p = EventParser::default();
        let chunk = vec![b'x'; 4096];
        let mut refused = None;
        for i in 0..64 {
            if let Err(e) = p.feed(&chunk) {
                refused = Some((i, e));
                break;
            }
        }
        assert_eq!(refused.map(|(_, e)| e), Some(SseError::LineTooLong));
        let mut p = EventParser::default();
        let line = format!("data: {}\n", "y".repeat(1000));
        let mut refused = None;
        for _ in 0..100 {
            if let Err(e) = p.feed(line.as_bytes()) {
                refused = Some(e);
                break;
            }
        }
        assert_eq!(refused, Some(SseError::EventTooLarge));
    }

    #[test]
    fn application_fields_are_bounded() {
        let app = |sha: Option<&str>, path: usize| ApplicationUpload {
            client_id: "c".into(),
            applications: vec![Application {
                name: "x".into(),
                version: Some("1".into()),
                path: Some("p".repeat(path)),
                sha256: sha.map(str::to_string),
            }],
        };
        assert!(app(None, 10).validate().is_ok());
        assert_eq!(
            app(None, 1025).validate().unwrap_err().field,
            "applications[0].path"
        );
        assert_eq!(
            app(Some("ABC"), 1).validate().unwrap_err().field,
            "applications[0].sha256"
        );
    }
}
