//! What every simulated client task of one run shares.
//!
//! Owns [`Shared`] (the HTTP clients, the target, the options, the deadline, the [`Stats`]),
//! the whole-request timeout of small requests, and the retry backoff. It must never hold a
//! client's own state: that is `client`'s.

use std::time::Duration;

use rand::Rng;
use tokio::time::{sleep_until, Instant};

use super::stats::Stats;
use super::Mode;

/// Whole-request limit for the small JSON requests (heartbeat, catalog, events, metrics).
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Jittered exponential backoff: 0.5 s doubling to 10 s, times 0.5..1.5.
pub(super) fn backoff(failures: u32) -> Duration {
    let base = (0.5 * 2f64.powi(failures.min(6) as i32)).min(10.0);
    let jitter: f64 = rand::rng().random_range(0.5..1.5);
    Duration::from_secs_f64(base * jitter)
}

pub(super) struct Shared {
    pub(super) http: reqwest::Client,
    /// For push streams: a connection of its own each, never one pooled after other
    /// requests, as an agent holds its long-lived stream (and never pooled afterwards).
    pub(super) stream_http: reqwest::Client,
    pub(super) base: String,
    pub(super) group: Option<String>,
    pub(super) os: String,
    pub(super) client_version: String,
    pub(super) mode: Mode,
    pub(super) time_scale: f64,
    pub(super) events_per_client: usize,
    pub(super) deadline: Instant,
    pub(super) stats: Stats,
}

impl Shared {
    /// Sleeps until `at` or the deadline; false when the deadline came first.
    pub(super) async fn nap_until(&self, at: Instant) -> bool {
        if at >= self.deadline {
            sleep_until(self.deadline).await;
            return false;
        }
        sleep_until(at).await;
        true
    }

    pub(super) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}
