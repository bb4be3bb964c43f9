//! The agent's own copy of the wire contract, and the contract's rules a client applies.
//!
//! Owns the request and reply bodies an agent sends and parses (heartbeat, download slot,
//! catalog, catalog event, events, applications), the incremental SSE parser of the push
//! stream, the critical-event rule (kinds, and the Windows client version from which critical
//! events go at once), `Retry-After`, the wait for a download slot, the server URL check, and
//! counters read from a server's Prometheus `/metrics`. These are deliberately independent
//! copies: this module must never use the crate's own wire types (`crate::core::proto`) or
//! SSE parser, so that the agent (and the load tester, a crowd of agents) checks the wire
//! contract as an outside client would, never the server's reading of it. Everything here is
//! pure: it sends nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Windows clients at this version or later upload critical events at once (contract).
const CRITICAL_MIN_VERSION: [u64; 3] = [12, 1, 4];

/// Parses a dotted version of numbers; anything else is `None` (counts as below any version).
fn parse_version(v: &str) -> Option<Vec<u64>> {
    if v.is_empty() {
        return None;
    }
    v.split('.').map(|p| p.parse::<u64>().ok()).collect()
}

/// Whether `v` is at least `min`, comparing as dotted numbers (missing parts are 0);
/// unparsable counts as below.
fn version_at_least(v: &str, min: &[u64]) -> bool {
    let Some(parts) = parse_version(v) else {
        return false;
    };
    let n = parts.len().max(min.len());
    for i in 0..n {
        let a = parts.get(i).copied().unwrap_or(0);
        let b = min.get(i).copied().unwrap_or(0);
        if a != b {
            return a > b;
        }
    }
    true
}

/// The contract's critical events: kind `risk` (except subkind `cookie`) and kind `intrusion`.
pub fn is_critical(kind: &str, subkind: &str) -> bool {
    (kind == "risk" && subkind != "cookie") || kind == "intrusion"
}

/// Whether a client uploads critical events at once (else with its next heartbeat).
pub fn critical_at_once(upload_immediately: bool, os: &str, client_version: &str) -> bool {
    upload_immediately && os == "windows" && version_at_least(client_version, &CRITICAL_MIN_VERSION)
}

/// The value of a counter in Prometheus text (summed over label sets); `None` when absent.
pub fn parse_metric(text: &str, name: &str) -> Option<u64> {
    let mut sum: Option<f64> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(metric), Some(value)) = (parts.next(), parts.next()) else {
            continue;
        };
        let bare = metric.split('{').next().unwrap_or(metric);
        if bare == name {
            if let Ok(v) = value.parse::<f64>() {
                *sum.get_or_insert(0.0) += v;
            }
        }
    }
    sum.map(|v| v.max(0.0) as u64)
}

/// `Retry-After` in seconds (whole or fractional); HTTP dates are not supported (None).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<f64> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let s: f64 = v.trim().parse().ok()?;
    (s.is_finite() && s >= 0.0).then_some(s)
}

/// Seconds since the slot's window opened at the server, by this host's clock: negative when
/// it opens later (a node announces a revision before its prefetch slot). None when the
/// server did not say, or when the answer is beyond the window or a day ahead (a skewed
/// clock).
pub fn window_age(slot: &DownloadSlot, now: chrono::DateTime<chrono::Utc>) -> Option<f64> {
    let start = chrono::DateTime::parse_from_rfc3339(slot.window_start.as_deref()?).ok()?;
    let age = (now - start.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0;
    (-86_400.0..=slot.window_s.unwrap_or(0) as f64)
        .contains(&age)
        .then_some(age)
}

/// How long to wait for a slot. `delay_s` is whole seconds; `not_before` is precise, so it
/// is used when this host's clock agrees with it (within 1.5 s of `delay_s`), plus 20 ms so
/// as not to arrive a hair early; `delay_s` otherwise (a skewed clock).
pub fn slot_delay(slot: &DownloadSlot, now: chrono::DateTime<chrono::Utc>) -> Duration {
    let coarse = if slot.delay_s.is_finite() {
        slot.delay_s.clamp(0.0, 86_400.0 * 365.0)
    } else {
        0.0
    };
    let precise = slot
        .not_before
        .as_deref()
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        .map(|t| (t.with_timezone(&chrono::Utc) - now).num_milliseconds() as f64 / 1000.0)
        .filter(|p| (p - coarse).abs() <= 1.5);
    match precise {
        Some(p) => Duration::from_secs_f64(p.max(0.0) + 0.02),
        None => Duration::from_secs_f64(coarse),
    }
}

/// Checks a server's base URL (`http` or `https`, a host, no query or fragment) and gives it
/// without a trailing `/`; the error says why not.
pub fn normalize_target(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| e.to_string())?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("the scheme must be http or https".into());
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err("no host".into());
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err("a base URL takes no query or fragment".into());
    }
    Ok(parsed.as_str().trim_end_matches('/').to_string())
}

/// `POST /v1/heartbeat` body.
#[derive(Serialize)]
pub struct HeartbeatBody<'a> {
    pub client_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub install_group: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub location: Option<&'a str>,
    pub os: &'a str,
    pub client_version: &'a str,
    /// Login mode: `computer` or `user`.
    pub mode: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    pub policy_serial: u64,
    pub catalog_revision: u64,
    /// Sent while the client has no credential: the reply then carries one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enroll_token: Option<&'a str>,
    /// When the agent sent it, by its clock: the manager shows it as the client's last
    /// heartbeat (cut to the first server's time when the clock runs ahead).
    pub sent_at: chrono::DateTime<chrono::Utc>,
}

/// The parts of a heartbeat reply a client acts on; the rest is ignored.
#[derive(Deserialize)]
pub struct HeartbeatReply {
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub settings: serde_json::Value,
    #[serde(default)]
    pub policy_serial: u64,
    #[serde(default)]
    pub catalog_revision: u64,
    #[serde(default)]
    pub next_heartbeat_s: Option<f64>,
    #[serde(default)]
    pub download_slot: Option<DownloadSlot>,
    /// The credential an enrolment issued.
    #[serde(default)]
    pub credential: Option<String>,
}

/// A heartbeat reply's download slot.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq)]
pub struct DownloadSlot {
    #[serde(default)]
    pub catalog_revision: u64,
    #[serde(default)]
    pub not_before: Option<String>,
    #[serde(default)]
    pub delay_s: f64,
    #[serde(default)]
    pub window_s: Option<u64>,
    /// When the window opened at the server (RFC 3339); absent from older servers.
    #[serde(default)]
    pub window_start: Option<String>,
}

/// `GET /v1/catalog`.
#[derive(Deserialize)]
pub struct Catalog {
    pub revision: u64,
    #[serde(default)]
    pub items: Vec<CatalogItem>,
}

/// One item of the catalog.
#[derive(Deserialize, Clone, Debug)]
pub struct CatalogItem {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    pub sha256: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub urgent: bool,
    /// Deltas to this version from earlier ones.
    #[serde(default)]
    pub deltas: Vec<DeltaRef>,
}

/// One delta a catalog item lists: from the version `from_sha256`, the blob `sha256` of
/// `size` bytes rebuilds the item.
#[derive(Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeltaRef {
    pub from_sha256: String,
    pub sha256: String,
    pub size: u64,
}

/// The `data` of a `catalog` stream event.
#[derive(Deserialize)]
pub struct CatalogEvent {
    pub revision: u64,
}

/// One event as uploaded.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EventOut {
    pub id: String,
    pub kind: String,
    #[serde(default)]
    pub subkind: String,
    pub time: String,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl EventOut {
    /// Whether the contract calls this event critical.
    pub fn is_critical(&self) -> bool {
        is_critical(&self.kind, &self.subkind)
    }
}

/// `POST /v1/events` body.
#[derive(Serialize)]
pub struct EventsBody<'a> {
    pub client_id: &'a str,
    pub events: &'a [EventOut],
}

/// One application as reported.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct AppOut {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// `POST /v1/applications` body.
#[derive(Serialize)]
pub struct AppsBody<'a> {
    pub client_id: &'a str,
    pub applications: &'a [AppOut],
}

#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    name: Option<String>,
    data: String,
}

impl SseParser {
    /// Bounded: a line longer than 1 MiB without a newline is dropped.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if self.name.is_some() || !self.data.is_empty() {
                    let name = self.name.take().unwrap_or_else(|| "message".into());
                    out.push((name, std::mem::take(&mut self.data)));
                }
            } else if let Some(v) = line.strip_prefix("event:") {
                self.name = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if self.buf.len() > 1 << 20 {
            self.buf.clear();
        }
        out
    }
}

#[cfg(test)]
#[path = "wire_tests.rs"]
mod tests;
