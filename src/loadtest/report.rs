//! The [`Report`] of a run: its fields, how it is built from the clients' counts, and its text
//! forms (the summary table, the start histogram).
//!
//! Owns the report's types ([`Report`], [`Latency`], [`Heard`]), the histogram layout
//! (bucket width and count for a window, bucketing of download starts, peak over mean) and
//! `build_report`, which reads [`Stats`] once the clients are stopped. It never sends a
//! request and never hard-codes a figure: every number in a report is counted by the clients
//! (see `stats`) or was read from the target's `/metrics` (by `run`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::stats::{lock, Heard, Stats};
use super::{Mode, Options};

/// Buckets of the start histogram for windows of 60 s and more.
pub const BUCKETS: usize = 60;

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
/// - `bytes` are the bytes of verified downloads: full blobs, and the deltas that rebuilt a
///   version whose SHA-256 then matched. A version rebuilt from a delta counts as one
///   download in `downloads_ok`; a delta that failed (a fallback) is not a failed download:
///   the full blob that follows is the download.
/// - Deltas: `full_bytes` (full blobs), `delta_bytes` (listed deltas that rebuilt a checked
///   version), `edge_delta_bytes` (the same for deltas asked of the target), over all
///   clients, and `wasted_delta_bytes` (delta bytes that arrived and rebuilt nothing);
///   `installs` counts versions by how they came (`full`, `delta`, `edge_delta`);
///   `delta_fallbacks` counts the deltas that failed by why (`delta_digest`, `delta_decode`,
///   `delta_size`, `delta_rebuilt_digest`, `delta_too_large`, `delta_download`, ...), each
///   followed by the full blob; `no_delta` the edge deltas the target had none of (404);
///   `rebuild_ms` the time of each rebuild (decoding and hashing, not the wait for a core).
/// - `wan_bytes` and `lan_bytes`: `gup_upstream_bytes_total` (bytes the target received
///   from its upstream: a node's WAN; 0 at a manager) and `gup_served_bytes_total` (content
///   bytes it sent its clients: the LAN) from its `/metrics`, after the run less before.
/// - `start_histogram` counts download starts (the moment a 200's headers arrived) of the
///   newest catalog revision any client downloaded (`histogram_revision`), per bucket of
///   `bucket_s` seconds from the window start: when the server says the window opened (the
///   slot's `window_start`: a node's window opens when it has the revision, which may be after
///   it first announced it), else the earliest heartbeat reply that announced that revision
///   with a download slot, or the earliest start when no client got a slot.
///   `bucket_s` is `window_s / 60`, at least 1 s; the histogram has 60 buckets, or one per
///   second when the window is shorter than 60 s (so that the buckets cover the window and
///   no more). Starts after the window land in the last bucket. `window_s` comes from the
///   slots, else from the effective `randomization.window_s` (0 when randomization is off,
///   then 60 buckets of 1 s).
/// - `peak_to_mean` is the most starts in any one-second interval (sliding, not aligned to
///   the buckets) over the mean starts per second across the window (across the span of the
///   starts when there is no window): what the target felt. 1.0 is perfectly even; 0.0 when
///   nothing started. `bucket_peak_to_mean` is the largest bucket of `start_histogram` over
///   the mean bucket, beside it.
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
    /// The largest bucket of `start_histogram` over the mean bucket.
    #[serde(default)]
    pub bucket_peak_to_mean: f64,
    /// Whether the clients used deltas (`--no-deltas`: false).
    #[serde(default)]
    pub use_deltas: bool,
    /// The SHA-256 of the version every client started holding (`--holding FILE`).
    #[serde(default)]
    pub holding_sha256: Option<String>,
    #[serde(default)]
    pub full_bytes: u64,
    #[serde(default)]
    pub delta_bytes: u64,
    #[serde(default)]
    pub edge_delta_bytes: u64,
    #[serde(default)]
    pub wasted_delta_bytes: u64,
    #[serde(default)]
    pub installs: Installs,
    /// Deltas that failed, by why; the full blob followed each.
    #[serde(default)]
    pub delta_fallbacks: BTreeMap<String, u64>,
    #[serde(default)]
    pub no_delta: u64,
    /// Rebuilds from deltas (decoding and hashing), in milliseconds.
    #[serde(default)]
    pub rebuild_ms: Latency,
    #[serde(default)]
    pub rebuilds: u64,
    /// `gup_upstream_bytes_total` of the target over the run (a node's WAN bytes).
    #[serde(default)]
    pub wan_bytes: u64,
    /// `gup_served_bytes_total` of the target over the run (the LAN bytes).
    #[serde(default)]
    pub lan_bytes: u64,
}

/// Versions the clients installed, by how they came.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installs {
    pub full: u64,
    pub delta: u64,
    pub edge_delta: u64,
}

/// What `run` read from the target's `/metrics`: after the run less before.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Target {
    pub(super) upstream_fetches: u64,
    pub(super) wan_bytes: u64,
    pub(super) lan_bytes: u64,
}

/// `n` bytes as a reader wants them: `1234 (1.2 MiB)`.
fn mib(n: u64) -> String {
    format!("{n} ({:.1} MiB)", n as f64 / (1024.0 * 1024.0))
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
        row("bytes", mib(self.bytes));
        let per_client = |n: u64| mib(n / self.clients.max(1) as u64);
        row(
            "installed via",
            format!(
                "full {}, delta {}, edge delta {} (deltas {})",
                self.installs.full,
                self.installs.delta,
                self.installs.edge_delta,
                if self.use_deltas { "on" } else { "off" }
            ),
        );
        row(
            "full bytes",
            format!(
                "{}; per client {}",
                mib(self.full_bytes),
                per_client(self.full_bytes)
            ),
        );
        let deltas = self.delta_bytes + self.edge_delta_bytes;
        row(
            "delta bytes",
            format!(
                "{}, edge {}; per client {}; wasted {}",
                mib(deltas),
                self.edge_delta_bytes,
                per_client(deltas),
                self.wasted_delta_bytes
            ),
        );
        row(
            "delta fallbacks",
            if self.delta_fallbacks.is_empty() {
                format!("none; no edge delta {}", self.no_delta)
            } else {
                format!(
                    "{}; no edge delta {}",
                    self.delta_fallbacks
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                    self.no_delta
                )
            },
        );
        row(
            "rebuild ms",
            format!(
                "p50 {:.2}  p99 {:.2}  max {:.2}  ({} rebuilds)",
                self.rebuild_ms.p50, self.rebuild_ms.p99, self.rebuild_ms.max, self.rebuilds
            ),
        );
        row("target WAN bytes", mib(self.wan_bytes));
        row("target LAN bytes", mib(self.lan_bytes));
        row("heartbeats", self.heartbeats.to_string());
        row("deferrals (429)", self.deferrals.to_string());
        row("events sent", self.events_sent.to_string());
        row("stream connects", self.stream_connects.to_string());
        for h in &self.push_heard {
            row(
                "push heard",
                format!(
                    "revision {}: {} clients, first to last {} ms (last at {})",
                    h.revision,
                    h.clients,
                    h.last_unix_ms.saturating_sub(h.first_unix_ms),
                    human_time(h.last_unix_ms)
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
                    "peak/mean {:.2} in any 1 s ({:.2} by bucket): {} starts of revision {rev} in {} buckets of {:.2} s (window {} s)",
                    self.peak_to_mean,
                    self.bucket_peak_to_mean,
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
        let _ = writeln!(
            s,
            "download starts per {} s, by seconds since the release was announced{}:",
            trim_float(self.bucket_s),
            match self.histogram_revision {
                Some(r) => format!(" (revision {r})"),
                None => String::new(),
            }
        );
        let _ = writeln!(s, "{:>9} {:>7}", "from", "starts");
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
            "largest bucket over the mean bucket {:.2} (peak {peak}, mean {mean:.2}, {total} starts); most starts in any 1 s over the mean per second {:.2}",
            self.bucket_peak_to_mean, self.peak_to_mean
        );
        s
    }
}

/// A Unix time in milliseconds as a reader wants it: `2026-11-25 10:22:33.123 UTC`.
pub(super) fn human_time(unix_ms: u64) -> String {
    i64::try_from(unix_ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3f UTC").to_string())
        .unwrap_or_else(|| format!("{unix_ms} ms after 1970"))
}

/// `0.5` as "0.5", `1.0` as "1".
fn trim_float(x: f64) -> String {
    let t = format!("{x:.2}");
    t.trim_end_matches('0').trim_end_matches('.').to_string()
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

pub(super) fn build_report(
    st: &Stats,
    base: &str,
    opts: &Options,
    elapsed: Duration,
    ended_early: bool,
    clients_done: usize,
    target: Target,
) -> Report {
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
    let rebuild = lock(&st.rebuild);
    let ms = |us: u64| us as f64 / 1000.0;
    let quantiles = |h: &hdrhistogram::Histogram<u64>| {
        if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                p50: ms(h.value_at_quantile(0.5)),
                p99: ms(h.value_at_quantile(0.99)),
                max: ms(h.max()),
            }
        }
    };
    let latency_ms = quantiles(&latency);
    Report {
        clients: opts.clients,
        downloads_ok: Stats::get(&st.downloads_ok),
        downloads_failed: Stats::get(&st.downloads_failed),
        digest_mismatches: Stats::get(&st.digest_mismatches),
        bytes: Stats::get(&st.bytes),
        peak_to_mean: crate::core::slots::sliding_peak_to_mean(&offsets, window_s as f64),
        bucket_peak_to_mean: peak_to_mean(&start_histogram),
        download_starts: offsets.len() as u64,
        start_histogram,
        latency_ms,
        upstream_fetches: target.upstream_fetches,
        errors: lock(&st.errors).clone(),
        target: base.to_string(),
        mode: opts.mode.or(*lock(&st.mode)).unwrap_or_default(),
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
        use_deltas: opts.use_deltas,
        holding_sha256: opts.holding.as_ref().map(|h| h.sha256.clone()),
        full_bytes: Stats::get(&st.full_bytes),
        delta_bytes: Stats::get(&st.delta_bytes),
        edge_delta_bytes: Stats::get(&st.edge_delta_bytes),
        wasted_delta_bytes: Stats::get(&st.wasted_delta_bytes),
        installs: Installs {
            full: Stats::get(&st.via_full),
            delta: Stats::get(&st.via_delta),
            edge_delta: Stats::get(&st.via_edge_delta),
        },
        delta_fallbacks: lock(&st.fallbacks).clone(),
        no_delta: Stats::get(&st.no_delta),
        rebuild_ms: quantiles(&rebuild),
        rebuilds: rebuild.len(),
        wan_bytes: target.wan_bytes,
        lan_bytes: target.lan_bytes,
    }
}

#[cfg(test)]
#[path = "report_tests.rs"]
mod tests;
