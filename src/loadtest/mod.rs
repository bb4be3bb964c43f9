//! The load tester behind `gup loadtest`: simulated clients, what they measure, and the report.
//!
//! Owns N simulated clients that behave as the contract says a client does (heartbeats at the
//! interval the server gives, divided by `time_scale`; in push mode a held `/v1/stream`; the
//! catalog, then every new blob at the download slot the server handed out, honouring 429/503
//! `Retry-After`; a SHA-256 check of every body while it streams; events uploaded by the
//! critical-event rule), the measurements they take (outcomes, bytes, download-start spread,
//! latencies to response headers, errors by kind) and the [`Report`] with its text forms. It
//! is an independent client of the contract: it shares no code with the server side (not the
//! crate's wire types nor its SSE parser) and speaks only the wire format, over the target's
//! public HTTP API and never around it. It must never send anything to any host but the
//! target URL (no proxies, no redirects followed), every loop in it is bounded in count or by
//! the run deadline, and nothing in the report is ever hard-coded: every figure is counted
//! from what the clients saw, or read from the target's `/metrics`.
//!
//! The parts, one concept a file: this file holds the options and [`run`], the orchestration
//! (check the target, start the clients, end the run, read `/metrics`); `client` is one
//! simulated client (heartbeats, events, the state all clients share), `download` its download
//! rounds (catalog, blobs, the digest check), `stream` its held push stream; `stats` is what
//! the clients count while they run; `report` turns the counts into the [`Report`] and its
//! text forms; `wire` is the load tester's own copy of the wire contract (request and reply
//! bodies, the SSE parser, the contract's client-side rules).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};

mod client;
mod download;
mod report;
mod shared;
mod stats;
mod stream;
mod wire;

pub use report::{Latency, Report, BUCKETS};
pub use stats::Heard;

use client::{Client, MIN_HEARTBEAT};
use report::build_report;
use shared::{Shared, REQUEST_TIMEOUT};
use stats::Stats;
use wire::{normalize_target, parse_metric};

/// First heartbeats are spread over this much time (no SYN flood).
const STAGGER: Duration = Duration::from_secs(1);

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

#[cfg(test)]
mod tests;
