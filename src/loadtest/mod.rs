//! The load tester behind `gup loadtest`: a crowd of agents in one process, what they
//! measure, and the report.
//!
//! Owns running N agents (the same code as `gup agent`, `crate::agent`, with their state in
//! memory: content is checked while it streams and then dropped) against one target, their
//! first heartbeats spread evenly over the ramp, each reporting through a `Watch` into one
//! [`Stats`]; ending the run; and the [`Report`], whose counters are this run's: the
//! target's `/metrics` counters are read before and after and the difference reported. What
//! the agents do is what the settings say (mode, slots, critical events), unless `--mode`
//! overrides the settings' mode. With `--holding FILE` every agent starts holding that file as
//! the current version of its item (one copy in memory for the whole crowd), so that its
//! first round wants only the newer version and rebuilds it from a delta as `gup agent`
//! would (`--no-deltas`: the full blob, to compare); the rebuilds of the crowd run at most
//! one per core at a time, on blocking threads, with at most [`DELTA_MEMORY`] bytes of deltas
//! in memory at once. It must never send anything to any host but the target URL
//! (no proxies, no redirects followed), every loop in it is bounded in count or by the run's
//! deadline, and nothing in the report is ever hard-coded: every figure is counted from what
//! the agents saw, or read from the target's `/metrics`.
//!
//! The parts: this file holds the options and [`run`]; `watch` is each agent's observer;
//! `stats` is what the agents count; `report` turns the counts into the [`Report`] and its
//! text forms.

use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

mod report;
mod stats;
mod watch;

pub use crate::agent::ConnectionMode as Mode;
pub use report::{Latency, Report, BUCKETS};
pub use stats::Heard;

use crate::agent::patch::MAX_DELTA_ITEM;
use crate::agent::wire::{normalize_target, parse_metric};
use crate::agent::{
    http_clients, Agent, Ctx, Holding, Home, Identity, Knobs, Rebuilds, MIN_HEARTBEAT,
    REQUEST_TIMEOUT,
};
use report::{build_report, Target};
use stats::Stats;
use watch::Watch;

/// Rounds in which a load-test agent tries a blob before giving it up (a run must end).
pub const MAX_ITEM_ROUNDS: u32 = 3;
/// The counters of the target read before and after a run: blob fetches started upstream,
/// bytes received from upstream (a node's WAN), content bytes sent to clients (its LAN).
const RUN_COUNTERS: [&str; 3] = [
    "gup_upstream_fetches_total",
    "gup_upstream_bytes_total",
    "gup_served_bytes_total",
];
/// Delta bytes the whole crowd holds in memory at once (downloading, or waiting for and in
/// their rebuild): 1 GiB. An agent waits for room before it downloads a delta, so a crowd of
/// thousands rebuilding a 100 MiB item never holds thousands of deltas while the cores
/// rebuild a few at a time.
pub const DELTA_MEMORY: u64 = 1 << 30;

/// What one run does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Base URL of a node or manager (`http://host:port`, optionally with a path prefix).
    pub target: String,
    pub clients: usize,
    /// `install_group` sent in heartbeats (none: the server's `default`).
    pub group: Option<String>,
    /// Overrides the settings' `mode` (none: each agent follows its settings).
    pub mode: Option<Mode>,
    /// First heartbeats are spread evenly over this (none: one heartbeat interval of the
    /// group's settings, after `time_scale`).
    pub ramp: Option<Duration>,
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
    /// Every client enrols with this token on its first heartbeat (a site whose
    /// `client_auth` is `required` admits no client without one).
    pub enroll_token: Option<String>,
    /// Whether the agents rebuild new versions from deltas (`--no-deltas`: full blobs).
    pub use_deltas: bool,
    /// The version every agent starts holding (`--holding FILE`), shared in memory.
    pub holding: Option<Arc<Holding>>,
    /// Rebuilds running at once across the crowd (none: one per core).
    pub rebuilds: Option<usize>,
}

impl Options {
    /// Defaults for everything but the target and the number of clients.
    pub fn new(target: impl Into<String>, clients: usize) -> Options {
        Options {
            target: target.into(),
            clients,
            group: None,
            mode: None,
            ramp: None,
            duration: Duration::from_secs(60),
            os: "windows".into(),
            client_version: "12.1.5".into(),
            time_scale: 1.0,
            id_prefix: "lt-".into(),
            progress: false,
            events_per_client: 2,
            enroll_token: None,
            use_deltas: true,
            holding: None,
            rebuilds: None,
        }
    }
}

/// Reads `path` (at most [`MAX_DELTA_ITEM`] bytes: larger items are never rebuilt from
/// deltas) as the version every agent holds of the item `name` (none: the file's name).
pub fn holding_from_file(
    path: &std::path::Path,
    name: Option<String>,
) -> Result<Holding, LoadtestError> {
    let bad = |reason: String| LoadtestError::BadOption {
        option: "holding",
        reason: format!("{}: {reason}", path.display()),
    };
    let name = match name {
        Some(n) => n,
        None => path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| bad("no file name to use as the item's name".into()))?,
    };
    if !crate::agent::home::safe_name(&name) {
        return Err(bad(format!("{name:?} cannot be an item name")));
    }
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let len = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    if len > MAX_DELTA_ITEM {
        return Err(bad(format!(
            "{len} bytes; agents rebuild only items of at most {MAX_DELTA_ITEM} bytes from deltas"
        )));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_DELTA_ITEM + 1),
        &mut bytes,
    )
    .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_DELTA_ITEM {
        return Err(bad("grew past the bound while it was read".into()));
    }
    Ok(Holding::new(name, bytes.into()))
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
    let base = normalize_target(&opts.target).map_err(|reason| LoadtestError::BadTarget {
        url: opts.target.clone(),
        reason,
    })?;
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
    if opts.rebuilds == Some(0) {
        return Err(bad("rebuilds", "must be at least 1"));
    }
    Ok(base)
}

/// Runs the load test and returns its report.
///
/// Checks the target first (`GET /healthz` must get an answer within 5 s, else
/// [`LoadtestError::Unreachable`]) and reads its counters. Then starts `clients` agents,
/// their first heartbeats spread evenly over the ramp, and ends at `duration`, or earlier
/// once every agent is done (has every item of the newest catalog revision it knows, of a
/// revision above 0, and has uploaded its events) and stays so for one full heartbeat
/// interval (the longest seen, after time scaling). Every agent is stopped at the end; the
/// target's counters are read again last.
pub async fn run(opts: Options) -> Result<Report, LoadtestError> {
    let base = validate(&opts)?;
    let (http, stream_http) =
        http_clients(opts.clients.saturating_mul(2).max(64)).map_err(LoadtestError::Http)?;
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
        Ok(Err(e)) => {
            let cause =
                crate::core::fault::io_cause(&e).unwrap_or_else(|| crate::core::fault::chain(&e));
            return Err(unreachable(cause));
        }
        Err(_) => return Err(unreachable("no answer within 5 s".into())),
    }
    let stats = Arc::new(Stats::new(opts.clients)?);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rebuilds = Arc::new(Rebuilds::new(opts.rebuilds.unwrap_or(cores), DELTA_MEMORY));
    let before = read_counters(&http, &base).await;
    let ramp = match opts.ramp {
        Some(r) => r,
        None => group_interval(&http, &base, opts.group.as_deref())
            .await
            .div_f64(opts.time_scale),
    };

    let start = Instant::now();
    let deadline = start + opts.duration;
    let stop = CancellationToken::new();
    let pb = if opts.progress {
        let pb =
            ProgressBar::with_draw_target(Some(opts.clients as u64), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} clients have the release  {msg}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb
    } else {
        ProgressBar::hidden()
    };

    let mut set = JoinSet::new();
    for i in 0..opts.clients {
        let ctx = Ctx {
            http: http.clone(),
            stream_http: stream_http.clone(),
            home: match &opts.holding {
                Some(h) => Home::memory_holding(h.clone()),
                None => Home::memory(),
            },
            obs: Arc::new(Watch {
                stats: stats.clone(),
                idx: i,
            }),
            stop: stop.clone(),
            client_id: format!("{}{:06}", opts.id_prefix, i + 1),
            id: Identity {
                install_group: opts.group.clone(),
                location: None,
                os: opts.os.clone(),
                client_version: opts.client_version.clone(),
                login_mode: "computer".into(),
                user: None,
            },
            knobs: Knobs {
                time_scale: opts.time_scale,
                mode: opts.mode,
                max_item_rounds: Some(MAX_ITEM_ROUNDS),
                make_events: opts.events_per_client,
                first_delay: ramp.mul_f64(i as f64 / opts.clients as f64),
                use_deltas: opts.use_deltas,
            },
            rebuilds: rebuilds.clone(),
            credential: std::sync::RwLock::new(None),
            enroll_token: opts.enroll_token.clone(),
        };
        match Agent::new(ctx, vec![base.clone()], Vec::new()) {
            Ok(agent) => {
                set.spawn(agent.run());
            }
            Err(e) => stats.error(format!("agent: {e}")),
        }
    }

    let mut all_done_since: Option<Instant> = None;
    let mut ended_early = false;
    loop {
        tokio::select! {
            _ = sleep_until(deadline) => break,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        let done = stats.settled_count();
        let st = &stats;
        pb.set_position(stats.current_count() as u64);
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
    let clients_done = stats.settled_count();
    stop.cancel();
    if timeout(Duration::from_secs(10), async {
        while set.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        set.shutdown().await;
    }
    pb.finish();
    let elapsed = start.elapsed();

    let after = read_counters(&http, &base).await;
    let counters = match (before, after) {
        (Some(b), Some(a)) => std::array::from_fn(|i| a[i].saturating_sub(b[i])),
        _ => {
            stats.error("metrics");
            [0; 3]
        }
    };
    Ok(build_report(
        &stats,
        &base,
        &opts,
        elapsed,
        ended_early,
        clients_done,
        Target {
            upstream_fetches: counters[0],
            wan_bytes: counters[1],
            lan_bytes: counters[2],
        },
    ))
}

/// The group's heartbeat interval (300 s when the target does not say).
async fn group_interval(http: &reqwest::Client, base: &str, group: Option<&str>) -> Duration {
    let group = group.unwrap_or("default");
    let secs = match http
        .get(format!("{base}/v1/groups/{group}/settings"))
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
    {
        Ok(r) if r.status().is_success() => {
            r.json::<serde_json::Value>().await.ok().and_then(|v| {
                v.get("heartbeat_interval_s")
                    .and_then(serde_json::Value::as_u64)
            })
        }
        _ => None,
    };
    Duration::from_secs(secs.unwrap_or(300).min(86_400))
}

/// The target's [`RUN_COUNTERS`], or none when its `/metrics` does not answer.
async fn read_counters(http: &reqwest::Client, base: &str) -> Option<[u64; 3]> {
    let resp = http
        .get(format!("{base}/metrics"))
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let text = resp.text().await.ok()?;
    Some(RUN_COUNTERS.map(|name| parse_metric(&text, name).unwrap_or(0)))
}

#[cfg(test)]
mod tests;
