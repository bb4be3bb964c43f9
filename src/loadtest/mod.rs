//! The load tester behind `gup loadtest`: simulated clients, what they measure, and the report.
//!
//! Owns N simulated clients that behave as the contract says a client does (heartbeats at the
//! interval the server gives, divided by `time_scale`; in push mode a held `/v1/stream`; the
//! catalog, then every new blob at the download slot the server handed out, honouring 429/503
//! `Retry-After`; a SHA-256 check of every body while it streams; events uploaded by the
//! critical-event rule), the measurements they take (outcomes, bytes, download-start spread,
//! latencies to response headers, errors by kind) and the [`Report`] with its text forms. It
//! is an independent client of the contract: it shares no code with the server side and
//! speaks only the wire format. It must never send anything to any host but the target URL
//! (no proxies, no redirects followed), every loop in it is bounded in count or by the run
//! deadline, and nothing in the report is ever hard-coded: every figure is counted from what
//! the clients saw, or read from the target's `/metrics`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::{sleep_until, timeout, Instant};

/// Buckets of the start histogram for windows of 60 s and more.
pub const BUCKETS: usize = 60;
/// Heartbeats never come faster than this, whatever the time scale.
const MIN_HEARTBEAT: Duration = Duration::from_millis(200);
/// First heartbeats are spread over this much time (no SYN flood).
const STAGGER: Duration = Duration::from_secs(1);
/// Whole-request limit for the small JSON requests (heartbeat, catalog, events, metrics).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Content: response headers must come within this, and then no gap between chunks may be
/// longer (a long download over a slow link is fine; a stalled one is not).
const CONTENT_IDLE: Duration = Duration::from_secs(60);
/// A push stream with no byte (not even a keep-alive comment) for this long is reconnected.
const STREAM_IDLE: Duration = Duration::from_secs(90);
/// Tries of one request on network errors and 5xx (429/503 are bounded by the deadline).
const MAX_ATTEMPTS: u32 = 5;
/// Rounds (one per heartbeat that finds the client behind) in which a client tries a blob.
const MAX_ITEM_ROUNDS: u32 = 3;
/// Uploads of held events before a client drops them.
const MAX_EVENT_ATTEMPTS: u32 = 3;
/// Windows clients at this version or later upload critical events at once (contract).
const CRITICAL_MIN_VERSION: [u64; 3] = [12, 1, 4];

/// What one run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base URL of a node or manager (`http://host:port`, optionally with a path prefix).
    pub target: String,
    pub clients: usize,
    /// `install_group` sent in heartbeats (none: the server's `default`).
    pub group: Option<String>,
    pub mode: Mode,
    /// Total run time: the run ends then, whatever is left (or earlier, see [`run`]).
    pub duration: Duration,
    /// `windows`, `mac` or `linux`, sent in heartbeats.
    pub os: String,
    /// Sent in heartbeats, e.g. `12.1.5`.
    pub client_version: String,
    /// Divides `next_heartbeat_s` (10.0 -> heartbeats 10x as often); at least 1. Download
    /// slots are the server's and are never scaled.
    pub time_scale: f64,
    /// Client ids are `{id_prefix}{n:06}`, n from 1.
    pub id_prefix: String,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Events each client uploads once it has its downloads (one critical, the rest not).
    pub events_per_client: usize,
}

impl Options {
    /// Defaults for everything but the target and the number of clients.
    pub fn new(target: impl Into<String>, clients: usize) -> Options {
        Options {
            target: target.into(),
            clients,
            group: None,
            mode: Mode::Pull,
            duration: Duration::from_secs(60),
            os: "windows".into(),
            client_version: "12.1.5".into(),
            time_scale: 1.0,
            id_prefix: "lt-".into(),
            progress: false,
            events_per_client: 2,
        }
    }
}

/// How simulated clients hear of a new catalog revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Hold `GET /v1/stream?client_id=ID` and heartbeat at once on a newer `catalog` event.
    Push,
    /// Learn of a new revision at the next heartbeat.
    #[default]
    Pull,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Push => "push",
            Mode::Pull => "pull",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "push" => Ok(Mode::Push),
            "pull" => Ok(Mode::Pull),
            other => Err(format!("{other:?} is not push or pull")),
        }
    }
}

/// Why a run could not start. Once started, a run always ends with a report: network trouble
/// during the run is counted in `errors`, never returned.
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("bad target URL {url:?}: {reason}")]
    BadTarget { url: String, reason: String },
    #[error("bad option {option}: {reason}")]
    BadOption {
        option: &'static str,
        reason: String,
    },
    #[error("target {url} unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

/// Latencies in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// The load test report (`--report FILE`). The contract fixes the first ten keys; the rest
/// are extras.
///
/// - `downloads_ok` / `downloads_failed` count blob downloads (one client, one blob, one
///   attempt round); a digest mismatch counts in both `digest_mismatches` and
///   `downloads_failed`. A download still waiting on a 429/503 when the run ends counts in
///   `errors["gave_up"]`, not in `downloads_failed`; one still waiting for its slot counts
///   nowhere (see `clients_done`).
/// - `bytes` are the bytes of verified downloads.
/// - `start_histogram` counts download starts (the moment a 200's headers arrived) of the
///   newest catalog revision any client downloaded (`histogram_revision`), per bucket of
///   `bucket_s` seconds from the window start: the earliest heartbeat reply that announced
///   that revision with a download slot, or the earliest start when no client got a slot.
///   `bucket_s` is `window_s / 60`, at least 1 s; the histogram has 60 buckets, or one per
///   second when the window is shorter than 60 s (so that the buckets cover the window and
///   no more). Starts after the window land in the last bucket. `window_s` comes from the
///   slots, else from the effective `randomization.window_s` (0 when randomization is off,
///   then 60 buckets of 1 s).
/// - `peak_to_mean` is the largest bucket over the mean bucket (1.0 is perfectly even; 0.0
///   when nothing started).
/// - `latency_ms` is over every HTTP request the clients made, measured to the arrival of
///   the response headers: heartbeats, catalog, content (including 429/503 answers) and
///   events; not the push stream. `latency_samples` counts them.
/// - `upstream_fetches` is `gup_upstream_fetches_total` from the target's `/metrics` at the
///   end (0 when absent).
/// - `errors` counts by kind: `connect`, `timeout`, `request`, `body` (network), `<what>_4xx`
///   / `<what>_5xx` / `<what>_404` (answers), `content_cut` (a body cut short), `gave_up`,
///   `stream_*`, `events_*`, `metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub clients: usize,
    pub downloads_ok: u64,
    pub downloads_failed: u64,
    pub digest_mismatches: u64,
    pub bytes: u64,
    pub start_histogram: Vec<u64>,
    pub peak_to_mean: f64,
    pub latency_ms: Latency,
    pub upstream_fetches: u64,
    pub errors: BTreeMap<String, u64>,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub mode: Mode,
    /// How long the run took.
    #[serde(default)]
    pub duration_s: f64,
    /// Whether the run ended before `--duration` because every client was done.
    #[serde(default)]
    pub ended_early: bool,
    /// Clients that, at the end, had every item of the newest catalog they knew and had
    /// uploaded their events.
    #[serde(default)]
    pub clients_done: usize,
    #[serde(default)]
    pub window_s: f64,
    #[serde(default)]
    pub bucket_s: f64,
    #[serde(default)]
    pub histogram_revision: Option<u64>,
    /// Starts counted in `start_histogram`.
    #[serde(default)]
    pub download_starts: u64,
    #[serde(default)]
    pub heartbeats: u64,
    /// 429 answers honoured (the client waited `Retry-After` and asked again).
    #[serde(default)]
    pub deferrals: u64,
    /// Events the target accepted (202).
    #[serde(default)]
    pub events_sent: u64,
    /// Push streams opened (reconnects included).
    #[serde(default)]
    pub stream_connects: u64,
    /// Per catalog revision: when push clients first heard of it on their stream (on
    /// connect, or pushed to an open stream), by the clients' own clocks.
    #[serde(default)]
    pub push_heard: Vec<Heard>,
    #[serde(default)]
    pub latency_samples: u64,
}

/// How many push clients heard of a catalog revision, and when the first and the last did
/// (Unix time in milliseconds, read by each client as the event arrived).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Heard {
    pub revision: u64,
    pub clients: u64,
    pub first_unix_ms: u64,
    pub last_unix_ms: u64,
}

impl Report {
    /// A readable table of the report.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(s, "  {k:<20} {v}");
        };
        row("target", self.target.clone());
        row(
            "clients",
            format!(
                "{} ({} mode), {} done",
                self.clients, self.mode, self.clients_done
            ),
        );
        row(
            "duration",
            format!(
                "{:.1} s{}",
                self.duration_s,
                if self.ended_early {
                    " (ended early: all done)"
                } else {
                    ""
                }
            ),
        );
        row("downloads ok", self.downloads_ok.to_string());
        row("downloads failed", self.downloads_failed.to_string());
        row("digest mismatches", self.digest_mismatches.to_string());
        row(
            "bytes",
            format!(
                "{} ({:.1} MiB)",
                self.bytes,
                self.bytes as f64 / (1024.0 * 1024.0)
            ),
        );
        row("heartbeats", self.heartbeats.to_string());
        row("deferrals (429)", self.deferrals.to_string());
        row("events sent", self.events_sent.to_string());
        row("stream connects", self.stream_connects.to_string());
        for h in &self.push_heard {
            row(
                "push heard",
                format!(
                    "revision {}: {} clients, first to last {} ms (last at unix ms {})",
                    h.revision,
                    h.clients,
                    h.last_unix_ms.saturating_sub(h.first_unix_ms),
                    h.last_unix_ms
                ),
            );
        }
        row(
            "latency ms",
            format!(
                "p50 {:.2}  p99 {:.2}  max {:.2}  ({} requests)",
                self.latency_ms.p50, self.latency_ms.p99, self.latency_ms.max, self.latency_samples
            ),
        );
        row("upstream fetches", self.upstream_fetches.to_string());
        row(
            "start spread",
            match self.histogram_revision {
                Some(rev) => format!(
                    "peak/mean {:.2}: {} starts of revision {rev} in {} buckets of {:.2} s (window {} s)",
                    self.peak_to_mean,
                    self.download_starts,
                    self.start_histogram.len(),
                    self.bucket_s,
                    self.window_s
                ),
                None => "no download started".into(),
            },
        );
        row(
            "errors",
            if self.errors.is_empty() {
                "none".into()
            } else {
                self.errors
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            },
        );
        format!("gup loadtest report\n{s}")
    }

    /// `start_histogram` as text: one line per bucket (its start offset, count and a bar of
    /// `#` scaled to at most 50), then the peak/mean line.
    pub fn histogram_text(&self) -> String {
        let mut s = String::new();
        let peak = self.start_histogram.iter().copied().max().unwrap_or(0);
        for (i, n) in self.start_histogram.iter().enumerate() {
            let bar = if peak == 0 {
                0
            } else {
                ((*n as f64 / peak as f64) * 50.0).round() as usize
            };
            let _ = writeln!(
                s,
                "{:>8.1}s {:>7} {}",
                i as f64 * self.bucket_s,
                n,
                "#".repeat(bar)
            );
        }
        let total: u64 = self.start_histogram.iter().sum();
        let mean = if self.start_histogram.is_empty() {
            0.0
        } else {
            total as f64 / self.start_histogram.len() as f64
        };
        let _ = writeln!(
            s,
            "peak/mean {:.2} (peak {peak}, mean {mean:.2}, {total} starts)",
            self.peak_to_mean
        );
        s
    }
}

// ---------------------------------------------------------------------------------------
// Pure parts: version rule, critical events, histogram, metrics text.

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
fn is_critical(kind: &str, subkind: &str) -> bool {
    (kind == "risk" && subkind != "cookie") || kind == "intrusion"
}

/// Whether a client uploads critical events at once (else with its next heartbeat).
fn critical_at_once(upload_immediately: bool, os: &str, client_version: &str) -> bool {
    upload_immediately && os == "windows" && version_at_least(client_version, &CRITICAL_MIN_VERSION)
}

/// Bucket width and count for a window: `window_s / 60` wide, at least 1 s; enough buckets
/// to cover the window, at most 60 (and 60 when there is no window).
fn layout(window_s: f64) -> (f64, usize) {
    let bucket_s = (window_s / BUCKETS as f64).max(1.0);
    if window_s.is_finite() && window_s >= 1.0 {
        let n = (window_s / bucket_s).ceil() as usize;
        (bucket_s, n.clamp(1, BUCKETS))
    } else {
        (1.0, BUCKETS)
    }
}

/// Counts offsets (seconds from the window start) into `n` buckets of `bucket_s`; later
/// ones land in the last bucket, earlier ones in the first.
fn bucketize(offsets: &[f64], bucket_s: f64, n: usize) -> Vec<u64> {
    let mut h = vec![0u64; n.max(1)];
    let last = h.len() - 1;
    for &o in offsets {
        let i = if o.is_finite() && o > 0.0 {
            ((o / bucket_s) as usize).min(last)
        } else {
            0
        };
        h[i] += 1;
    }
    h
}

/// Largest bucket over the mean bucket; 0.0 with no starts.
fn peak_to_mean(h: &[u64]) -> f64 {
    let total: u64 = h.iter().sum();
    if total == 0 || h.is_empty() {
        return 0.0;
    }
    let peak = h.iter().copied().max().unwrap_or(0) as f64;
    peak / (total as f64 / h.len() as f64)
}

/// The value of a counter in Prometheus text (summed over label sets); `None` when absent.
fn parse_metric(text: &str, name: &str) -> Option<u64> {
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
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<f64> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let s: f64 = v.trim().parse().ok()?;
    (s.is_finite() && s >= 0.0).then_some(s)
}

/// How long to wait for a slot. `delay_s` is whole seconds; `not_before` is precise, so it
/// is used when this host's clock agrees with it (within 1.5 s of `delay_s`), plus 20 ms so
/// as not to arrive a hair early; `delay_s` otherwise (a skewed clock).
fn slot_delay(slot: &DownloadSlot, now: chrono::DateTime<chrono::Utc>) -> Duration {
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

/// Checks and normalizes the target: http(s), a host, no query; no trailing slash.
fn normalize_target(url: &str) -> Result<String, LoadtestError> {
    let bad = |reason: &str| LoadtestError::BadTarget {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("a base URL takes no query or fragment"));
    }
    Ok(parsed.as_str().trim_end_matches('/').to_string())
}

// ---------------------------------------------------------------------------------------
// Wire structs (our own: this module is an independent client of the contract).

#[derive(Serialize)]
struct HeartbeatBody<'a> {
    client_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    install_group: Option<&'a str>,
    os: &'a str,
    client_version: &'a str,
    mode: &'static str,
    policy_serial: u64,
    catalog_revision: u64,
}

#[derive(Deserialize)]
struct HeartbeatReply {
    #[serde(default)]
    settings: serde_json::Value,
    #[serde(default)]
    policy_serial: u64,
    #[serde(default)]
    catalog_revision: u64,
    #[serde(default)]
    next_heartbeat_s: Option<f64>,
    #[serde(default)]
    download_slot: Option<DownloadSlot>,
}

#[derive(Deserialize)]
struct DownloadSlot {
    #[serde(default)]
    not_before: Option<String>,
    #[serde(default)]
    delay_s: f64,
    #[serde(default)]
    window_s: Option<u64>,
}

#[derive(Deserialize)]
struct Catalog {
    revision: u64,
    #[serde(default)]
    items: Vec<CatalogItem>,
}

#[derive(Deserialize)]
struct CatalogItem {
    sha256: String,
    #[serde(default)]
    urgent: bool,
}

#[derive(Deserialize)]
struct CatalogEvent {
    revision: u64,
}

#[derive(Serialize, Clone)]
struct EventOut {
    id: String,
    kind: &'static str,
    subkind: &'static str,
    time: String,
    data: serde_json::Value,
}

#[derive(Serialize)]
struct EventsBody<'a> {
    client_id: &'a str,
    events: &'a [EventOut],
}

/// Incremental SSE parser: feed bytes, get complete `(event, data)` pairs; comments skipped.
#[derive(Default)]
struct SseParser {
    buf: Vec<u8>,
    name: Option<String>,
    data: String,
}

impl SseParser {
    /// Bounded: a line longer than 1 MiB without a newline is dropped.
    fn feed(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
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

// ---------------------------------------------------------------------------------------
// Shared state and measurements.

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// When the first client learned a revision with a slot, and the slot's window.
#[derive(Clone, Copy)]
struct Learned {
    at: Instant,
    window_s: Option<u64>,
}

struct Stats {
    downloads_ok: AtomicU64,
    downloads_failed: AtomicU64,
    digest_mismatches: AtomicU64,
    bytes: AtomicU64,
    heartbeats: AtomicU64,
    deferrals: AtomicU64,
    events_sent: AtomicU64,
    stream_connects: AtomicU64,
    /// When clients heard of each revision, by revision.
    heard: Mutex<BTreeMap<u64, Heard>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Microseconds to response headers.
    latency: Mutex<Histogram<u64>>,
    /// (catalog revision, start) of every download start.
    starts: Mutex<Vec<(u64, Instant)>>,
    learned: Mutex<BTreeMap<u64, Learned>>,
    /// The effective `randomization.window_s` last seen (0 when randomization is off).
    settings_window_s: Mutex<Option<u64>>,
    /// The longest effective heartbeat interval seen, in ms.
    max_interval_ms: AtomicU64,
    /// Per client: done (see `Client::settled`).
    settled: Vec<AtomicBool>,
}

impl Stats {
    /// A client heard of `revision` for the first time, now.
    fn heard(&self, revision: u64) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Ok(mut h) = self.heard.lock() {
            let e = h.entry(revision).or_insert(Heard {
                revision,
                clients: 0,
                first_unix_ms: now,
                last_unix_ms: now,
            });
            e.clients += 1;
            e.first_unix_ms = e.first_unix_ms.min(now);
            e.last_unix_ms = e.last_unix_ms.max(now);
        }
    }

    fn new(clients: usize) -> Result<Stats, LoadtestError> {
        let latency = Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .map_err(|e| LoadtestError::Http(format!("histogram: {e}")))?;
        Ok(Stats {
            downloads_ok: AtomicU64::new(0),
            downloads_failed: AtomicU64::new(0),
            digest_mismatches: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            deferrals: AtomicU64::new(0),
            events_sent: AtomicU64::new(0),
            stream_connects: AtomicU64::new(0),
            heard: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            latency: Mutex::new(latency),
            starts: Mutex::new(Vec::new()),
            learned: Mutex::new(BTreeMap::new()),
            settings_window_s: Mutex::new(None),
            max_interval_ms: AtomicU64::new(0),
            settled: (0..clients).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    fn inc(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn error(&self, kind: impl Into<String>) {
        *lock(&self.errors).entry(kind.into()).or_insert(0) += 1;
    }

    fn latency_since(&self, t0: Instant) {
        let us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
        lock(&self.latency).saturating_record(us.max(1));
    }

    fn settled_count(&self) -> usize {
        self.settled
            .iter()
            .filter(|b| b.load(Ordering::Relaxed))
            .count()
    }
}

/// The error kind of a failed request.
fn net_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    }
}

/// The error kind of an answer: `what_404`, `what_4xx`, `what_503`, `what_5xx`, ...
fn status_kind(what: &str, status: reqwest::StatusCode) -> String {
    match status.as_u16() {
        404 | 429 | 503 => format!("{what}_{}", status.as_u16()),
        400..=499 => format!("{what}_4xx"),
        500..=599 => format!("{what}_5xx"),
        other => format!("{what}_{other}"),
    }
}

/// Jittered exponential backoff: 0.5 s doubling to 10 s, times 0.5..1.5.
fn backoff(failures: u32) -> Duration {
    let base = (0.5 * 2f64.powi(failures.min(6) as i32)).min(10.0);
    let jitter: f64 = rand::rng().random_range(0.5..1.5);
    Duration::from_secs_f64(base * jitter)
}

struct Shared {
    http: reqwest::Client,
    /// For push streams: a connection of its own each, never one pooled after other
    /// requests, as an agent holds its long-lived stream (and never pooled afterwards).
    stream_http: reqwest::Client,
    base: String,
    group: Option<String>,
    os: String,
    client_version: String,
    mode: Mode,
    time_scale: f64,
    events_per_client: usize,
    deadline: Instant,
    stats: Stats,
}

impl Shared {
    /// Sleeps until `at` or the deadline; false when the deadline came first.
    async fn nap_until(&self, at: Instant) -> bool {
        if at >= self.deadline {
            sleep_until(self.deadline).await;
            return false;
        }
        sleep_until(at).await;
        true
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

/// A spawned task that is cancelled when its owner is dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn wait_job<T>(job: &mut Option<AbortOnDrop<T>>) -> Result<T, JoinError> {
    match job {
        Some(j) => (&mut j.0).await,
        None => std::future::pending().await,
    }
}

// ---------------------------------------------------------------------------------------
// One simulated client.

#[derive(Default)]
struct JobOutcome {
    fetched_rev: Option<u64>,
    ok: Vec<String>,
    failed: Vec<String>,
}

enum Fetch {
    Ok,
    Failed,
    Deadline,
}

enum Posted {
    Sent,
    Dropped,
    Retry,
}

struct Client {
    sh: Arc<Shared>,
    idx: usize,
    id: String,
    policy_serial: u64,
    /// The revision whose every item this client has (or gave up on).
    catalog_rev: u64,
    /// The newest revision heard of (heartbeat or push).
    known_rev: u64,
    /// Digests downloaded, or given up after `MAX_ITEM_ROUNDS`.
    done: HashSet<String>,
    rounds: HashMap<String, u32>,
    interval: Duration,
    critical_at_once: bool,
    events_made: bool,
    pending: Vec<EventOut>,
    event_attempts: u32,
}

impl Client {
    fn new(sh: Arc<Shared>, idx: usize, id: String) -> Client {
        Client {
            sh,
            idx,
            id,
            policy_serial: 0,
            catalog_rev: 0,
            known_rev: 0,
            done: HashSet::new(),
            rounds: HashMap::new(),
            interval: MIN_HEARTBEAT,
            critical_at_once: false,
            events_made: false,
            pending: Vec::new(),
            event_attempts: 0,
        }
    }

    /// Heartbeats, stream, downloads and events until the deadline (or until aborted).
    async fn run(mut self, start_delay: Duration) {
        let sh = self.sh.clone();
        if !sh.nap_until(Instant::now() + start_delay).await {
            return;
        }
        let (tx, mut rx) = watch::channel(0u64);
        let mut tx = Some(tx);
        let mut stream: Option<AbortOnDrop<()>> = None;
        let mut push_live = sh.mode == Mode::Push;
        let mut job: Option<AbortOnDrop<JobOutcome>> = None;
        let mut next_hb = Instant::now();
        let mut hb_failures = 0u32;
        loop {
            tokio::select! {
                _ = sleep_until(sh.deadline) => break,
                _ = sleep_until(next_hb) => {
                    match self.heartbeat().await {
                        Some(reply) => {
                            hb_failures = 0;
                            next_hb = Instant::now() + self.interval;
                            // Held events go right after the heartbeat.
                            self.flush_events().await;
                            if sh.mode == Mode::Push && stream.is_none() {
                                if let Some(tx) = tx.take() {
                                    let task = stream_task(sh.clone(), self.id.clone(), tx);
                                    stream = Some(AbortOnDrop(tokio::spawn(task)));
                                }
                            }
                            if job.is_none() {
                                job = self.start_job(&reply);
                            }
                            if job.is_none() {
                                self.make_events().await;
                            }
                        }
                        None => {
                            hb_failures += 1;
                            next_hb = Instant::now() + backoff(hb_failures);
                        }
                    }
                }
                changed = rx.changed(), if push_live => {
                    match changed {
                        Ok(()) => {
                            let rev = *rx.borrow_and_update();
                            if rev > self.known_rev.max(self.catalog_rev) {
                                self.known_rev = rev;
                                next_hb = Instant::now();
                            }
                        }
                        Err(_) => push_live = false,
                    }
                }
                out = wait_job(&mut job) => {
                    job = None;
                    match out {
                        Ok(out) => {
                            if self.finish_job(out) {
                                next_hb = Instant::now();
                            }
                            self.make_events().await;
                        }
                        Err(e) if e.is_cancelled() => {}
                        Err(_) => sh.stats.error("internal"),
                    }
                }
            }
            let settled = self.settled(job.is_none());
            sh.stats.settled[self.idx].store(settled, Ordering::Relaxed);
        }
    }

    /// Done: has every item of the newest revision it knows, has uploaded its events.
    fn settled(&self, idle: bool) -> bool {
        idle && self.known_rev > 0
            && self.catalog_rev >= self.known_rev
            && self.events_made
            && self.pending.is_empty()
    }

    /// One heartbeat; `None` when it failed (counted).
    async fn heartbeat(&mut self) -> Option<HeartbeatReply> {
        let sh = self.sh.clone();
        let body = HeartbeatBody {
            client_id: &self.id,
            install_group: sh.group.as_deref(),
            os: &sh.os,
            client_version: &sh.client_version,
            mode: "computer",
            policy_serial: self.policy_serial,
            catalog_revision: self.catalog_rev,
        };
        let t0 = Instant::now();
        let resp = sh
            .http
            .post(sh.url("/v1/heartbeat"))
            .json(&body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                sh.stats.error(net_kind(&e));
                return None;
            }
        };
        sh.stats.latency_since(t0);
        if !resp.status().is_success() {
            sh.stats.error(status_kind("heartbeat", resp.status()));
            return None;
        }
        let reply: HeartbeatReply = match resp.json().await {
            Ok(r) => r,
            Err(e) => {
                sh.stats.error(if e.is_decode() {
                    "heartbeat_json"
                } else {
                    net_kind(&e)
                });
                return None;
            }
        };
        Stats::inc(&sh.stats.heartbeats, 1);
        let secs = reply.next_heartbeat_s.unwrap_or(300.0).max(0.0) / sh.time_scale;
        self.interval = Duration::from_secs_f64(secs.min(86_400.0)).max(MIN_HEARTBEAT);
        sh.stats.max_interval_ms.fetch_max(
            u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.policy_serial = reply.policy_serial;
        let upload_now = reply
            .settings
            .get("upload_critical_events_immediately")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(true);
        self.critical_at_once = critical_at_once(upload_now, &sh.os, &sh.client_version);
        let enabled = reply
            .settings
            .pointer("/randomization/enabled")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(true);
        let window = reply
            .settings
            .pointer("/randomization/window_s")
            .and_then(serde_json::Value::as_u64);
        if let Some(w) = window {
            *lock(&sh.stats.settings_window_s) = Some(if enabled { w } else { 0 });
        }
        self.known_rev = self.known_rev.max(reply.catalog_revision);
        Some(reply)
    }

    /// Starts downloading when the reply names a revision this client does not have.
    fn start_job(&mut self, reply: &HeartbeatReply) -> Option<AbortOnDrop<JobOutcome>> {
        let rev = reply.catalog_revision;
        if rev <= self.catalog_rev {
            return None;
        }
        let now = Instant::now();
        let slot_at = reply.download_slot.as_ref().map(|slot| {
            let mut learned = lock(&self.sh.stats.learned);
            let entry = learned.entry(rev).or_insert(Learned {
                at: now,
                window_s: slot.window_s,
            });
            if now < entry.at {
                entry.at = now;
            }
            if entry.window_s.is_none() {
                entry.window_s = slot.window_s;
            }
            now + slot_delay(slot, chrono::Utc::now())
        });
        let task = download_job(
            self.sh.clone(),
            self.id.clone(),
            rev,
            slot_at,
            self.done.clone(),
        );
        Some(AbortOnDrop(tokio::spawn(task)))
    }

    /// Takes a finished download round in; true when a newer revision waits (heartbeat now).
    fn finish_job(&mut self, out: JobOutcome) -> bool {
        self.done.extend(out.ok);
        let mut retry_later = false;
        for d in out.failed {
            let r = self.rounds.entry(d.clone()).or_insert(0);
            *r += 1;
            if *r >= MAX_ITEM_ROUNDS {
                self.done.insert(d);
            } else {
                retry_later = true;
            }
        }
        let Some(rev) = out.fetched_rev else {
            return false;
        };
        self.known_rev = self.known_rev.max(rev);
        if retry_later {
            return false;
        }
        self.catalog_rev = self.catalog_rev.max(rev);
        self.known_rev > self.catalog_rev
    }

    /// Once, when the client first has nothing left to download: its events. A critical one
    /// goes at once when the rule says so; the rest wait for the next heartbeat.
    async fn make_events(&mut self) {
        if self.events_made || self.catalog_rev < self.known_rev {
            return;
        }
        self.events_made = true;
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let mut critical = Vec::new();
        for n in 0..self.sh.events_per_client {
            let (kind, subkind) = if n == 0 {
                ("risk", "virus")
            } else {
                ("system_change", "loadtest")
            };
            let ev = EventOut {
                id: format!("{}-{n}", self.id),
                kind,
                subkind,
                time: now.clone(),
                data: serde_json::json!({"loadtest": true, "seq": n}),
            };
            if is_critical(kind, subkind) {
                critical.push(ev);
            } else {
                self.pending.push(ev);
            }
        }
        if critical.is_empty() {
            return;
        }
        if self.critical_at_once {
            if let Posted::Retry = self.post_events(&critical).await {
                self.pending.extend(critical);
            }
        } else {
            self.pending.extend(critical);
        }
    }

    /// Uploads the held events (right after a heartbeat).
    async fn flush_events(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let events = std::mem::take(&mut self.pending);
        match self.post_events(&events).await {
            Posted::Sent | Posted::Dropped => {}
            Posted::Retry => {
                self.event_attempts += 1;
                if self.event_attempts >= MAX_EVENT_ATTEMPTS {
                    self.sh.stats.error("events_dropped");
                } else {
                    self.pending = events;
                }
            }
        }
    }

    async fn post_events(&self, events: &[EventOut]) -> Posted {
        let sh = &self.sh;
        let body = EventsBody {
            client_id: &self.id,
            events,
        };
        let t0 = Instant::now();
        let resp = sh
            .http
            .post(sh.url("/v1/events"))
            .json(&body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        match resp {
            Err(e) => {
                sh.stats.error(net_kind(&e));
                Posted::Retry
            }
            Ok(r) => {
                sh.stats.latency_since(t0);
                let status = r.status();
                if status == reqwest::StatusCode::ACCEPTED || status.is_success() {
                    Stats::inc(&sh.stats.events_sent, events.len() as u64);
                    Posted::Sent
                } else {
                    sh.stats.error(status_kind("events", status));
                    if status.is_server_error() {
                        Posted::Retry
                    } else {
                        Posted::Dropped
                    }
                }
            }
        }
    }
}

/// One download round: the catalog, then each item not yet done, waiting for the slot
/// (urgent items never wait).
async fn download_job(
    sh: Arc<Shared>,
    id: String,
    rev: u64,
    slot_at: Option<Instant>,
    skip: HashSet<String>,
) -> JobOutcome {
    let mut out = JobOutcome::default();
    let Some(cat) = fetch_catalog(&sh).await else {
        return out;
    };
    out.fetched_rev = Some(cat.revision);
    let mut seen = HashSet::new();
    for item in cat.items {
        let digest = item.sha256.to_ascii_lowercase();
        if skip.contains(&digest) || !seen.insert(digest.clone()) {
            continue;
        }
        if !item.urgent {
            if let Some(at) = slot_at {
                if !sh.nap_until(at).await {
                    return out;
                }
            }
        }
        match download_one(&sh, &id, rev, &digest).await {
            Fetch::Ok => out.ok.push(digest),
            Fetch::Failed => out.failed.push(digest),
            Fetch::Deadline => return out,
        }
    }
    out
}

async fn fetch_catalog(sh: &Shared) -> Option<Catalog> {
    for attempt in 1..=MAX_ATTEMPTS {
        let t0 = Instant::now();
        let resp = sh
            .http
            .get(sh.url("/v1/catalog"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        match resp {
            Err(e) => sh.stats.error(net_kind(&e)),
            Ok(r) => {
                sh.stats.latency_since(t0);
                let status = r.status();
                if status.is_success() {
                    match r.json::<Catalog>().await {
                        Ok(c) => return Some(c),
                        Err(e) => sh.stats.error(if e.is_decode() {
                            "catalog_json"
                        } else {
                            net_kind(&e)
                        }),
                    }
                } else {
                    sh.stats.error(status_kind("catalog", status));
                    if status.is_client_error() {
                        return None;
                    }
                }
            }
        }
        if !sh.nap_until(Instant::now() + backoff(attempt)).await {
            return None;
        }
    }
    None
}

/// Downloads one blob, hashing it as it streams. Honours 429/503 `Retry-After` until the
/// deadline; retries network errors, 5xx and cut bodies `MAX_ATTEMPTS` times.
async fn download_one(sh: &Shared, id: &str, rev: u64, digest: &str) -> Fetch {
    let url = sh.url(&format!("/v1/content/{digest}"));
    let mut failures = 0u32;
    loop {
        if Instant::now() >= sh.deadline {
            return Fetch::Deadline;
        }
        let t0 = Instant::now();
        let sent = timeout(
            CONTENT_IDLE,
            sh.http.get(&url).header("X-Gup-Client-Id", id).send(),
        )
        .await;
        let mut resp = match sent {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                sh.stats.error(net_kind(&e));
                failures += 1;
                if failures >= MAX_ATTEMPTS {
                    Stats::inc(&sh.stats.downloads_failed, 1);
                    return Fetch::Failed;
                }
                if !sh.nap_until(Instant::now() + backoff(failures)).await {
                    return Fetch::Deadline;
                }
                continue;
            }
            Err(_) => {
                sh.stats.error("timeout");
                failures += 1;
                if failures >= MAX_ATTEMPTS {
                    Stats::inc(&sh.stats.downloads_failed, 1);
                    return Fetch::Failed;
                }
                continue;
            }
        };
        sh.stats.latency_since(t0);
        let status = resp.status();
        match status.as_u16() {
            200 => {}
            429 | 503 => {
                if status.as_u16() == 429 {
                    Stats::inc(&sh.stats.deferrals, 1);
                } else {
                    sh.stats.error("content_503");
                }
                let wait = retry_after(resp.headers()).unwrap_or(1.0);
                let jitter: f64 = rand::rng().random_range(0.0..=0.1);
                let at =
                    Instant::now() + Duration::from_secs_f64((wait * (1.0 + jitter)).min(86_400.0));
                drop(resp);
                if !sh.nap_until(at).await {
                    sh.stats.error("gave_up");
                    return Fetch::Deadline;
                }
                continue;
            }
            _ => {
                sh.stats.error(status_kind("content", status));
                failures += 1;
                if status.is_server_error() && failures < MAX_ATTEMPTS {
                    if !sh.nap_until(Instant::now() + backoff(failures)).await {
                        return Fetch::Deadline;
                    }
                    continue;
                }
                Stats::inc(&sh.stats.downloads_failed, 1);
                return Fetch::Failed;
            }
        }
        lock(&sh.stats.starts).push((rev, Instant::now()));
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        let complete = loop {
            match timeout(CONTENT_IDLE, resp.chunk()).await {
                Ok(Ok(Some(bytes))) => {
                    hasher.update(&bytes);
                    len += bytes.len() as u64;
                }
                Ok(Ok(None)) => break true,
                Ok(Err(_)) => {
                    sh.stats.error("content_cut");
                    break false;
                }
                Err(_) => {
                    sh.stats.error("content_idle");
                    break false;
                }
            }
        };
        if !complete {
            failures += 1;
            if failures >= MAX_ATTEMPTS {
                Stats::inc(&sh.stats.downloads_failed, 1);
                return Fetch::Failed;
            }
            if !sh.nap_until(Instant::now() + backoff(failures)).await {
                return Fetch::Deadline;
            }
            continue;
        }
        if hex::encode(hasher.finalize()) == digest {
            Stats::inc(&sh.stats.downloads_ok, 1);
            Stats::inc(&sh.stats.bytes, len);
            return Fetch::Ok;
        }
        Stats::inc(&sh.stats.digest_mismatches, 1);
        Stats::inc(&sh.stats.downloads_failed, 1);
        return Fetch::Failed;
    }
}

/// Holds `/v1/stream` until the deadline, reconnecting with a jittered backoff, and passes
/// on the newest catalog revision announced.
async fn stream_task(sh: Arc<Shared>, id: String, tx: watch::Sender<u64>) {
    let url = sh.url("/v1/stream");
    let mut failures = 0u32;
    while Instant::now() < sh.deadline {
        let sent = timeout(
            REQUEST_TIMEOUT,
            sh.stream_http
                .get(&url)
                .query(&[("client_id", id.as_str())])
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .send(),
        )
        .await;
        match sent {
            Ok(Ok(mut resp)) if resp.status().is_success() => {
                Stats::inc(&sh.stats.stream_connects, 1);
                failures = 0;
                let mut parser = SseParser::default();
                loop {
                    match timeout(STREAM_IDLE, resp.chunk()).await {
                        Ok(Ok(Some(bytes))) => {
                            for (name, data) in parser.feed(&bytes) {
                                if name != "catalog" {
                                    continue;
                                }
                                if let Ok(ev) = serde_json::from_str::<CatalogEvent>(&data) {
                                    let newer = tx.send_if_modified(|cur| {
                                        let newer = ev.revision > *cur;
                                        if newer {
                                            *cur = ev.revision;
                                        }
                                        newer
                                    });
                                    if newer {
                                        sh.stats.heard(ev.revision);
                                    }
                                }
                            }
                        }
                        Ok(Ok(None)) => {
                            sh.stats.error("stream_closed");
                            break;
                        }
                        Ok(Err(_)) => {
                            sh.stats.error("stream_dropped");
                            break;
                        }
                        Err(_) => {
                            sh.stats.error("stream_idle");
                            break;
                        }
                    }
                }
            }
            Ok(Ok(resp)) => {
                sh.stats.error(status_kind("stream", resp.status()));
                failures += 1;
            }
            Ok(Err(e)) => {
                sh.stats.error(format!("stream_{}", net_kind(&e)));
                failures += 1;
            }
            Err(_) => {
                sh.stats.error("stream_timeout");
                failures += 1;
            }
        }
        if !sh.nap_until(Instant::now() + backoff(failures)).await {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The run.

fn validate(opts: &Options) -> Result<String, LoadtestError> {
    let bad = |option, reason: &str| LoadtestError::BadOption {
        option,
        reason: reason.to_string(),
    };
    let base = normalize_target(&opts.target)?;
    if opts.clients == 0 {
        return Err(bad("clients", "must be at least 1"));
    }
    if opts.duration.is_zero() {
        return Err(bad("duration", "must be more than 0"));
    }
    if !(opts.time_scale.is_finite() && opts.time_scale >= 1.0) {
        return Err(bad("time_scale", "must be a number of at least 1"));
    }
    if !matches!(opts.os.as_str(), "windows" | "mac" | "linux") {
        return Err(bad("os", "must be windows, mac or linux"));
    }
    Ok(base)
}

/// Runs the load test and returns its report.
///
/// Checks the target first (`GET /healthz` must get an answer within 5 s, else
/// [`LoadtestError::Unreachable`]). Then starts `clients` tasks, their first heartbeats spread
/// over at most 1 s, and ends at `duration`, or earlier once every client is done (has every
/// item of the newest catalog revision it knows, of a revision above 0, and has uploaded its
/// events) and stays so for one full heartbeat interval (the longest seen, after time
/// scaling). Every task is cancelled at the end; the target's `/metrics` is read last.
pub async fn run(opts: Options) -> Result<Report, LoadtestError> {
    let base = validate(&opts)?;
    // The two clients differ only in pooling.
    let client = |builder: reqwest::ClientBuilder| {
        builder
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .user_agent("gup-loadtest")
            .build()
            .map_err(|e| LoadtestError::Http(e.to_string()))
    };
    let http = client(
        reqwest::Client::builder()
            .pool_max_idle_per_host(opts.clients.saturating_mul(2).max(64))
            .pool_idle_timeout(Duration::from_secs(90)),
    )?;
    let stream_http = client(reqwest::Client::builder().pool_max_idle_per_host(0))?;
    let unreachable = |reason: String| LoadtestError::Unreachable {
        url: base.clone(),
        reason,
    };
    match timeout(
        Duration::from_secs(5),
        http.get(format!("{base}/healthz")).send(),
    )
    .await
    {
        Ok(Ok(resp)) => {
            if !resp.status().is_success() {
                tracing::warn!(status = %resp.status(), "the target's /healthz is not 2xx");
            }
        }
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable("no answer within 5 s".into())),
    }

    let start = Instant::now();
    let deadline = start + opts.duration;
    let sh = Arc::new(Shared {
        http,
        stream_http,
        base: base.clone(),
        group: opts.group.clone(),
        os: opts.os.clone(),
        client_version: opts.client_version.clone(),
        mode: opts.mode,
        time_scale: opts.time_scale,
        events_per_client: opts.events_per_client,
        deadline,
        stats: Stats::new(opts.clients)?,
    });
    let pb = if opts.progress {
        let pb =
            ProgressBar::with_draw_target(Some(opts.clients as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} clients done  {msg}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb
    } else {
        ProgressBar::hidden()
    };

    let mut set = JoinSet::new();
    for i in 0..opts.clients {
        let delay = STAGGER.mul_f64(i as f64 / opts.clients as f64);
        let id = format!("{}{:06}", opts.id_prefix, i + 1);
        set.spawn(Client::new(sh.clone(), i, id).run(delay));
    }

    let mut all_done_since: Option<Instant> = None;
    let mut ended_early = false;
    loop {
        tokio::select! {
            _ = sleep_until(deadline) => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let done = sh.stats.settled_count();
        let st = &sh.stats;
        pb.set_position(done as u64);
        pb.set_message(format!(
            "downloads ok {} failed {}  heartbeats {}  429s {}",
            Stats::get(&st.downloads_ok),
            Stats::get(&st.downloads_failed),
            Stats::get(&st.heartbeats),
            Stats::get(&st.deferrals),
        ));
        if done == opts.clients {
            let since = *all_done_since.get_or_insert_with(Instant::now);
            let interval =
                Duration::from_millis(Stats::get(&st.max_interval_ms)).max(MIN_HEARTBEAT);
            if since.elapsed() >= interval {
                ended_early = true;
                break;
            }
        } else {
            all_done_since = None;
        }
    }
    let clients_done = sh.stats.settled_count();
    set.shutdown().await;
    pb.finish();
    let elapsed = start.elapsed();

    let upstream_fetches = read_upstream_fetches(&sh).await;
    Ok(build_report(
        &sh,
        &opts,
        elapsed,
        ended_early,
        clients_done,
        upstream_fetches,
    ))
}

async fn read_upstream_fetches(sh: &Shared) -> u64 {
    let resp = sh
        .http
        .get(sh.url("/metrics"))
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await;
    let text = match resp {
        Ok(r) if r.status().is_success() => r.text().await.ok(),
        _ => None,
    };
    match text {
        Some(t) => parse_metric(&t, "gup_upstream_fetches_total").unwrap_or(0),
        None => {
            sh.stats.error("metrics");
            0
        }
    }
}

fn build_report(
    sh: &Shared,
    opts: &Options,
    elapsed: Duration,
    ended_early: bool,
    clients_done: usize,
    upstream_fetches: u64,
) -> Report {
    let st = &sh.stats;
    let starts = lock(&st.starts).clone();
    let settings_window = *lock(&st.settings_window_s);
    let histogram_revision = starts.iter().map(|(r, _)| *r).max();
    let (window_s, offsets) = match histogram_revision {
        None => (settings_window.unwrap_or(0), Vec::new()),
        Some(rev) => {
            let times: Vec<Instant> = starts
                .iter()
                .filter(|(r, _)| *r == rev)
                .map(|(_, t)| *t)
                .collect();
            let learned = lock(&st.learned).get(&rev).copied();
            let first = times.iter().min().copied().unwrap_or_else(Instant::now);
            let window_start = learned.map_or(first, |l| l.at);
            let window_s = learned
                .and_then(|l| l.window_s)
                .or(settings_window)
                .unwrap_or(0);
            let offsets = times
                .iter()
                .map(|t| t.saturating_duration_since(window_start).as_secs_f64())
                .collect();
            (window_s, offsets)
        }
    };
    let (bucket_s, n) = layout(window_s as f64);
    let start_histogram = bucketize(&offsets, bucket_s, n);
    let latency = lock(&st.latency);
    let ms = |us: u64| us as f64 / 1000.0;
    let latency_ms = if latency.is_empty() {
        Latency::default()
    } else {
        Latency {
            p50: ms(latency.value_at_quantile(0.5)),
            p99: ms(latency.value_at_quantile(0.99)),
            max: ms(latency.max()),
        }
    };
    Report {
        clients: opts.clients,
        downloads_ok: Stats::get(&st.downloads_ok),
        downloads_failed: Stats::get(&st.downloads_failed),
        digest_mismatches: Stats::get(&st.digest_mismatches),
        bytes: Stats::get(&st.bytes),
        peak_to_mean: peak_to_mean(&start_histogram),
        download_starts: offsets.len() as u64,
        start_histogram,
        latency_ms,
        upstream_fetches,
        errors: lock(&st.errors).clone(),
        target: sh.base.clone(),
        mode: opts.mode,
        duration_s: elapsed.as_secs_f64(),
        ended_early,
        clients_done,
        window_s: window_s as f64,
        bucket_s,
        histogram_revision,
        heartbeats: Stats::get(&st.heartbeats),
        deferrals: Stats::get(&st.deferrals),
        events_sent: Stats::get(&st.events_sent),
        stream_connects: Stats::get(&st.stream_connects),
        push_heard: st
            .heard
            .lock()
            .map(|h| h.values().cloned().collect())
            .unwrap_or_default(),
        latency_samples: latency.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_as_dotted_numbers() {
        let min = CRITICAL_MIN_VERSION;
        for v in [
            "12.1.4", "12.1.5", "12.2", "13", "12.10.0", "12.1.4.1", "012.1.4",
        ] {
            assert!(version_at_least(v, &min), "{v}");
        }
        for v in [
            "12.1.3",
            "12.1",
            "12",
            "11.9.9",
            "",
            "abc",
            "12.1.4-beta",
            "12..4",
            " 12.1.4",
        ] {
            assert!(!version_at_least(v, &min), "{v}");
        }
    }

    #[test]
    fn critical_events_go_at_once_only_for_windows_at_12_1_4_with_the_setting() {
        assert!(critical_at_once(true, "windows", "12.1.4"));
        assert!(critical_at_once(true, "windows", "12.2.0"));
        assert!(!critical_at_once(false, "windows", "12.1.4"));
        assert!(!critical_at_once(true, "windows", "12.1.3"));
        assert!(!critical_at_once(true, "windows", "twelve"));
        assert!(!critical_at_once(true, "mac", "12.1.5"));
        assert!(!critical_at_once(true, "linux", "13.0"));
    }

    #[test]
    fn critical_kinds_follow_the_contract() {
        assert!(is_critical("risk", "virus"));
        assert!(!is_critical("risk", "cookie"));
        assert!(is_critical("intrusion", "port_scan"));
        assert!(!is_critical("system_change", "virus"));
    }

    #[test]
    fn layout_covers_the_window() {
        assert_eq!(layout(3600.0), (60.0, 60));
        assert_eq!(layout(60.0), (1.0, 60));
        assert_eq!(layout(20.0), (1.0, 20));
        assert_eq!(layout(20.5), (1.0, 21));
        assert_eq!(layout(0.0), (1.0, 60));
        assert_eq!(layout(90.0), (1.5, 60));
    }

    #[test]
    fn bucketing_and_peak_to_mean() {
        // Even: one start per bucket.
        let even: Vec<f64> = (0..60).map(|i| i as f64 + 0.5).collect();
        let h = bucketize(&even, 1.0, 60);
        assert!(h.iter().all(|n| *n == 1));
        assert!((peak_to_mean(&h) - 1.0).abs() < 1e-9);
        // All at once: the peak is 60 times the mean.
        let h = bucketize(&[0.1; 30], 1.0, 60);
        assert_eq!(h[0], 30);
        assert!((peak_to_mean(&h) - 60.0).abs() < 1e-9);
        // After the window: the last bucket; before it: the first.
        let h = bucketize(&[500.0, -3.0, f64::NAN, 59.99], 1.0, 60);
        assert_eq!((h[0], h[59]), (2, 2));
        // Nothing started.
        assert_eq!(peak_to_mean(&bucketize(&[], 1.0, 60)), 0.0);
        assert_eq!(peak_to_mean(&[]), 0.0);
        // Bucket width scales.
        let h = bucketize(&[0.0, 59.9, 60.0, 3599.0], 60.0, 60);
        assert_eq!((h[0], h[1], h[59]), (2, 1, 1));
    }

    #[test]
    fn slot_delay_prefers_a_consistent_not_before() {
        let now = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let slot = |nb: Option<&str>, delay_s: f64| DownloadSlot {
            not_before: nb.map(str::to_string),
            delay_s,
            window_s: Some(20),
        };
        let precise = slot(Some("2030-01-01T00:00:15.250Z"), 16.0);
        assert_eq!(slot_delay(&precise, now), Duration::from_millis(15_270));
        // A skewed clock: not_before far from delay_s, so delay_s wins.
        let skewed = slot(Some("2030-01-01T01:00:00Z"), 16.0);
        assert_eq!(slot_delay(&skewed, now), Duration::from_secs(16));
        assert_eq!(slot_delay(&slot(None, 3.0), now), Duration::from_secs(3));
        assert_eq!(slot_delay(&slot(Some("junk"), 0.0), now), Duration::ZERO);
        let past = slot(Some("2029-12-31T23:59:59.500Z"), 0.0);
        assert_eq!(slot_delay(&past, now), Duration::from_millis(20));
    }

    #[test]
    fn metrics_text_is_read() {
        let text =
            "# HELP gup_upstream_fetches Blob fetches.\n# TYPE gup_upstream_fetches counter\n\
                    gup_upstream_fetches_total 7\ngup_upstream_fetches_total_other 100\n\
                    gup_upstream_bytes_total 12345\n";
        assert_eq!(parse_metric(text, "gup_upstream_fetches_total"), Some(7));
        let labelled = "gup_upstream_fetches_total{upstream=\"a\"} 2\ngup_upstream_fetches_total{upstream=\"b\"} 3.0\n";
        assert_eq!(
            parse_metric(labelled, "gup_upstream_fetches_total"),
            Some(5)
        );
        assert_eq!(parse_metric("", "gup_upstream_fetches_total"), None);
    }

    #[test]
    fn sse_is_parsed_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.feed(b": keep-alive\n\nevent: cata").is_empty());
        let got = p.feed(b"log\r\ndata: {\"revision\":3}\r\n\r\nevent: settings\ndata: {}\n\n");
        assert_eq!(
            got,
            vec![
                ("catalog".to_string(), "{\"revision\":3}".to_string()),
                ("settings".to_string(), "{}".to_string())
            ]
        );
    }

    #[test]
    fn targets_are_checked() {
        assert_eq!(
            normalize_target("http://127.0.0.1:2967/").unwrap(),
            "http://127.0.0.1:2967"
        );
        assert_eq!(
            normalize_target("https://gup.example/prefix/").unwrap(),
            "https://gup.example/prefix"
        );
        assert!(normalize_target("ftp://x").is_err());
        assert!(normalize_target("not a url").is_err());
        assert!(normalize_target("http://x/?a=b").is_err());
    }

    #[test]
    fn options_are_checked() {
        let ok = Options::new("http://127.0.0.1:1", 1);
        assert!(validate(&ok).is_ok());
        let mut o = ok.clone();
        o.time_scale = 0.5;
        assert!(matches!(
            validate(&o),
            Err(LoadtestError::BadOption {
                option: "time_scale",
                ..
            })
        ));
        let mut o = ok.clone();
        o.clients = 0;
        assert!(validate(&o).is_err());
        let mut o = ok;
        o.os = "beos".into();
        assert!(validate(&o).is_err());
        assert_eq!("push".parse::<Mode>(), Ok(Mode::Push));
        assert!("both".parse::<Mode>().is_err());
    }

    #[test]
    fn report_json_has_every_contract_key() {
        let r = Report {
            clients: 3,
            start_histogram: vec![1, 2, 0],
            peak_to_mean: 2.0,
            bucket_s: 1.0,
            ..Report::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        for key in [
            "clients",
            "downloads_ok",
            "downloads_failed",
            "digest_mismatches",
            "bytes",
            "start_histogram",
            "peak_to_mean",
            "latency_ms",
            "upstream_fetches",
            "errors",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        for key in ["p50", "p99", "max"] {
            assert!(v["latency_ms"].get(key).is_some(), "latency_ms.{key}");
        }
        assert!(v["errors"].is_object());
        assert!(v["start_histogram"].is_array());
        assert_eq!(v["mode"], "pull");
        let back: Report = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        // The text forms.
        let text = r.histogram_text();
        assert_eq!(text.lines().count(), 4);
        assert!(text.lines().nth(1).unwrap().ends_with(&"#".repeat(50)));
        assert!(text.contains("peak/mean 2.00"));
        assert!(r.summary().contains("downloads ok"));
    }

    /// Event batches a fake target received: (client id, ["id:kind"]).
    type Batches = Arc<Mutex<Vec<(String, Vec<String>)>>>;

    /// A tiny HTTP/1.1 server (one request per connection) that plays a target: slot 0,
    /// one good blob answered with a 429 first, one blob whose bytes do not match.
    async fn fake_target() -> (String, Batches) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let good = b"hello".to_vec();
        let good_digest = hex::encode(Sha256::digest(&good));
        let bad_digest = hex::encode(Sha256::digest(b"world"));
        let batches: Batches = Arc::default();
        let deferred: Arc<Mutex<HashSet<String>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let b2 = batches.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut sock, _)) = listener.accept().await else {
                    return;
                };
                let (good, gd, bd) = (good.clone(), good_digest.clone(), bad_digest.clone());
                let (batches, deferred) = (b2.clone(), deferred.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < head_end + len {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let body: serde_json::Value =
                        serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or_default();
                    let line = head.lines().next().unwrap_or("").to_string();
                    let client = head
                        .lines()
                        .find_map(|l| l.strip_prefix("x-gup-client-id:"))
                        .map(|v| v.trim().to_string());
                    let json = |v: serde_json::Value| (200, v.to_string().into_bytes(), "");
                    let (status, bytes, extra): (u16, Vec<u8>, &str) = if line
                        .starts_with("get /healthz")
                    {
                        json(serde_json::json!({}))
                    } else if line.starts_with("post /v1/heartbeat") {
                        assert_eq!(body["os"], "windows");
                        assert_eq!(body["mode"], "computer");
                        json(serde_json::json!({
                            "client_id": body["client_id"], "group": "default",
                            "settings": {"upload_critical_events_immediately": true,
                                         "randomization": {"enabled": true, "window_s": 4}},
                            "policy_serial": 0, "catalog_revision": 1, "next_heartbeat_s": 1,
                            "download_slot": {"catalog_revision": 1, "delay_s": 0, "window_s": 4,
                                              "not_before": "2020-01-01T00:00:00Z"}
                        }))
                    } else if line.starts_with("get /v1/catalog") {
                        json(serde_json::json!({"revision": 1, "items": [
                            {"name": "a", "version": "1", "sha256": gd, "size": 5, "urgent": false},
                            {"name": "b", "version": "1", "sha256": bd, "size": 5, "urgent": false}
                        ]}))
                    } else if line.starts_with(&format!("get /v1/content/{gd}")) {
                        let c = client.unwrap_or_default();
                        if lock(&deferred).insert(c) {
                            (429, b"{}".to_vec(), "Retry-After: 0\r\n")
                        } else {
                            (200, good, "")
                        }
                    } else if line.starts_with(&format!("get /v1/content/{bd}")) {
                        (200, b"WORLD".to_vec(), "")
                    } else if line.starts_with("post /v1/events") {
                        let ids = body["events"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|e| {
                                format!(
                                    "{}:{}",
                                    e["id"].as_str().unwrap(),
                                    e["kind"].as_str().unwrap()
                                )
                            })
                            .collect();
                        lock(&batches).push((body["client_id"].as_str().unwrap().to_string(), ids));
                        (202, b"{\"accepted\":1}".to_vec(), "")
                    } else if line.starts_with("get /metrics") {
                        (
                            200,
                            b"# TYPE gup_upstream_fetches counter\ngup_upstream_fetches_total 4\n"
                                .to_vec(),
                            "",
                        )
                    } else {
                        (404, b"{\"error\":\"not_found\"}".to_vec(), "")
                    };
                    let head = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
                        bytes.len()
                    );
                    let _ = sock.write_all(head.as_bytes()).await;
                    let _ = sock.write_all(&bytes).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        (format!("http://{addr}"), batches)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn clients_download_verify_defer_and_upload_events() {
        let (target, batches) = fake_target().await;
        let mut o = Options::new(target, 3);
        o.duration = Duration::from_secs(15);
        let r = run(o).await.unwrap();
        assert_eq!(r.clients, 3);
        assert_eq!(r.downloads_ok, 3, "{r:?}");
        assert_eq!(r.bytes, 15);
        // The bad blob is tried in MAX_ITEM_ROUNDS rounds by each client.
        assert_eq!(r.digest_mismatches, 3 * MAX_ITEM_ROUNDS as u64, "{r:?}");
        assert_eq!(r.downloads_failed, r.digest_mismatches);
        assert_eq!(r.deferrals, 3);
        assert_eq!(r.upstream_fetches, 4);
        assert_eq!(r.events_sent, 6);
        assert!(r.ended_early, "{r:?}");
        assert_eq!(r.clients_done, 3);
        assert_eq!(r.window_s, 4.0);
        assert_eq!(r.start_histogram.len(), 4);
        assert_eq!(r.download_starts, 3 + 3 * MAX_ITEM_ROUNDS as u64);
        assert!(r.latency_ms.max >= r.latency_ms.p50 && r.latency_samples > 0);
        // The critical event went at once, on its own; the other with the next heartbeat.
        let batches = lock(&batches).clone();
        assert_eq!(batches.len(), 6);
        for n in 1..=3 {
            let id = format!("lt-{n:06}");
            let mine: Vec<_> = batches.iter().filter(|(c, _)| *c == id).collect();
            assert_eq!(mine[0].1, vec![format!("{id}-0:risk")]);
            assert_eq!(mine[1].1, vec![format!("{id}-1:system_change")]);
        }
    }

    #[tokio::test]
    async fn an_unreachable_target_is_an_error() {
        // Bind then drop a listener: a loopback port that refuses connections.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut o = Options::new(format!("http://127.0.0.1:{port}"), 2);
        o.duration = Duration::from_secs(1);
        assert!(matches!(
            run(o).await,
            Err(LoadtestError::Unreachable { .. })
        ));
    }
}
