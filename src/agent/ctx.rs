//! What every task of one agent shares, and what an agent tells whoever watches it.
//!
//! Owns [`Identity`] (what the agent says it is: install group, location, OS, version, login
//! mode and user), [`Ctx`] (the HTTP clients, the home, the observer, the stop token, the
//! identity, the knobs and the [`Rebuilds`] bounds), [`Observer`] (the calls a load test
//! counts; an agent run by `gup agent` has the quiet one, [`Quiet`]), the retry backoff, and
//! the request timeouts.
//! It must never hold the agent's changing state: that belongs to the agent's loop.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use super::comms::ConnectionMode;
use super::home::Home;

/// Whole-request limit of the small JSON requests (heartbeat, settings, policy, catalog,
/// events, applications).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A server that does not accept a connection this fast counts as not answering.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A download or stream that sends no byte this long is cut.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What an agent says it is in each heartbeat.
#[derive(Debug, Clone)]
pub struct Identity {
    pub install_group: Option<String>,
    pub location: Option<String>,
    /// `windows`, `mac` or `linux`.
    pub os: String,
    pub client_version: String,
    /// Login mode: `computer` or `user`.
    pub login_mode: String,
    pub user: Option<String>,
}

/// What a load test counts; every call has a quiet default.
pub trait Observer: Send + Sync {
    /// A response's headers arrived this long after its request was sent.
    fn latency(&self, _took: Duration) {}
    /// Something went wrong, by kind (`connect`, `timeout`, `heartbeat_503`, ...).
    fn error(&self, _kind: &str) {}
    /// A heartbeat was answered; the next comes after `interval`; the settings say this
    /// randomization window (0: off) and mode.
    fn heartbeat(&self, _interval: Duration, _window_s: u64, _mode: ConnectionMode) {}
    /// A download round for `revision` starts, with the slot's window if it has a slot and
    /// how many seconds ago that window opened at the server (negative: it opens later), when
    /// it said so.
    fn learned(&self, _revision: u64, _window_s: Option<u64>, _window_age: Option<f64>) {}
    /// A blob's download starts (its response is 200/206).
    fn download_started(&self, _revision: u64) {}
    /// A full blob arrived whole and checked.
    fn downloaded(&self, _bytes: u64) {}
    /// A version was rebuilt from a delta of `bytes` (listed, or an edge delta when `edge`)
    /// and checked; the rebuild (decoding and hashing) took `rebuild`.
    fn delta_used(&self, _bytes: u64, _edge: bool, _rebuild: Duration) {}
    /// A delta was tried and did not give the new version (`kind` says why: `delta_digest`,
    /// `delta_decode`, ...); `wasted` of its bytes had arrived. The full blob follows.
    fn delta_fallback(&self, _kind: &str, _wasted: u64) {}
    /// A server had no edge delta (404): the full blob follows.
    fn no_delta(&self) {}
    /// A blob was given up on for this round.
    fn download_failed(&self) {}
    /// A blob's bytes did not match its digest.
    fn digest_mismatch(&self) {}
    /// A 429 before the slot.
    fn deferred(&self) {}
    /// A push stream was opened.
    fn stream_connected(&self) {}
    /// A push stream named catalog `revision`, newer than any it named before.
    fn heard(&self, _revision: u64) {}
    /// `n` events got a 202.
    fn events_sent(&self, _n: u64) {}
    /// Whether the agent has every item of the newest revision it knows and nothing to upload.
    fn settled(&self, _settled: bool) {}
    /// Whether the agent has every item of the newest revision it knows (its downloads are
    /// done, verified), whatever it has still to upload.
    fn current(&self, _current: bool) {}
}

/// The observer of an agent nobody counts.
pub struct Quiet;

impl Observer for Quiet {}

/// Knobs a load test turns; an agent run by `gup agent` has the defaults.
#[derive(Debug, Clone)]
pub struct Knobs {
    /// Divides the heartbeat interval (at least 1).
    pub time_scale: f64,
    /// Overrides the settings' `mode` (none: the settings say).
    pub mode: Option<ConnectionMode>,
    /// Rounds in which a blob is tried before it is given up (none: never given up).
    pub max_item_rounds: Option<u32>,
    /// Events the agent makes itself once it has its downloads (one critical, the rest not).
    pub make_events: usize,
    /// The first heartbeat waits this long.
    pub first_delay: Duration,
    /// Whether the agent rebuilds new versions from deltas (`gup agent --no-deltas`,
    /// `gup loadtest --no-deltas` turn it off): off, it always takes the full blob.
    pub use_deltas: bool,
}

impl Default for Knobs {
    fn default() -> Knobs {
        Knobs {
            time_scale: 1.0,
            mode: None,
            max_item_rounds: None,
            make_events: 0,
            first_delay: Duration::ZERO,
            use_deltas: true,
        }
    }
}

/// The bounds on rebuilding versions from deltas, shared by every agent of a process (one for
/// `gup agent`, one for a whole load test).
#[derive(Debug)]
pub struct Rebuilds {
    /// Rebuilds running at once. A rebuild is CPU-bound (zstd decoding, then SHA-256), so a
    /// load test gets one per core and `gup agent` one; each holds an old version and a new
    /// one (each at most `patch::MAX_DELTA_ITEM`) in memory while it runs.
    pub cpu: tokio::sync::Semaphore,
    /// Delta bytes held in memory at once (while they download and until their rebuild ends),
    /// in KiB; an agent waits for room before it downloads a delta. Its size is `memory_kib`.
    pub memory: tokio::sync::Semaphore,
    /// The whole of `memory`: a delta larger than this takes all of it.
    pub memory_kib: u32,
}

impl Rebuilds {
    /// `cpu` rebuilds at once (at least 1), `memory_bytes` of deltas in memory at once.
    pub fn new(cpu: usize, memory_bytes: u64) -> Rebuilds {
        let memory_kib = u32::try_from(memory_bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .max(1);
        Rebuilds {
            cpu: tokio::sync::Semaphore::new(cpu.max(1)),
            memory: tokio::sync::Semaphore::new(memory_kib as usize),
            memory_kib,
        }
    }

    /// The permits of `memory` a delta of `bytes` takes.
    pub fn kib_of(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.memory_kib)
    }
}

/// What every task of one agent shares.
pub struct Ctx {
    pub http: reqwest::Client,
    /// For the push stream: a connection of its own, never pooled.
    pub stream_http: reqwest::Client,
    pub home: Home,
    pub obs: Arc<dyn Observer>,
    pub stop: CancellationToken,
    pub client_id: String,
    pub id: Identity,
    pub knobs: Knobs,
    /// What bounds rebuilds from deltas (shared by every agent of a load test).
    pub rebuilds: Arc<Rebuilds>,
    /// The credential every call for this client carries (`X-Gup-Credential`), once enrolled.
    pub credential: std::sync::RwLock<Option<String>>,
    /// The enrolment token the first heartbeat sends while there is no credential.
    pub enroll_token: Option<String>,
}

/// The header a client's credential travels in.
pub const CREDENTIAL_HEADER: &str = "X-Gup-Credential";

impl Ctx {
    /// The credential, if this client has one.
    pub fn credential(&self) -> Option<String> {
        self.credential
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Keeps a credential an enrolment brought: in memory, and in the data dir.
    pub fn set_credential(&self, credential: String) {
        if let Err(e) = self.home.save_credential(&credential) {
            tracing::warn!(error = %e, "could not keep the credential; enrolling again after a restart");
        }
        *self
            .credential
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(credential);
    }

    /// `req` with the credential, when there is one.
    pub fn signed(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.credential() {
            Some(c) => req.header(CREDENTIAL_HEADER, c),
            None => req,
        }
    }

    /// Sleeps `d`; false when the agent is stopping.
    pub async fn nap(&self, d: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(d) => true,
        }
    }
}

/// Builds the two HTTP clients of an agent (or of a crowd of them: they share these).
pub fn http_clients(pool: usize) -> Result<(reqwest::Client, reqwest::Client), String> {
    let build = |builder: reqwest::ClientBuilder| {
        builder
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .user_agent(concat!("gup-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())
    };
    let http = build(
        reqwest::Client::builder()
            .pool_max_idle_per_host(pool.max(4))
            .pool_idle_timeout(Duration::from_secs(90)),
    )?;
    let stream_http = build(reqwest::Client::builder().pool_max_idle_per_host(0))?;
    Ok((http, stream_http))
}

/// Jittered exponential backoff: 0.5 s doubling to 10 s, times 0.5..1.5.
pub fn backoff(failures: u32) -> Duration {
    let base = (0.5 * 2f64.powi(failures.min(6) as i32)).min(10.0);
    let jitter: f64 = rand::rng().random_range(0.5..1.5);
    Duration::from_secs_f64(base * jitter)
}

/// The kind of a request error, for counting.
pub fn net_kind(e: &reqwest::Error) -> &'static str {
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

/// The kind of an unexpected answer: `what_404`, `what_4xx`, `what_503`, `what_5xx`, ...
pub fn status_kind(what: &str, status: reqwest::StatusCode) -> String {
    match status.as_u16() {
        404 | 429 | 503 => format!("{what}_{}", status.as_u16()),
        400..=499 => format!("{what}_4xx"),
        500..=599 => format!("{what}_5xx"),
        other => format!("{what}_{other}"),
    }
}
