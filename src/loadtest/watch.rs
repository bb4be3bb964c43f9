//! What one agent of the crowd tells the run's [`Stats`].
//!
//! Owns [`Watch`], the [`Observer`] each agent of a load test reports through: it turns every
//! call into a count, a latency sample, a download start or a "heard" moment in the shared
//! [`Stats`], and marks its agent settled or not. It only records; it never sends a request
//! and never changes what an agent does.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::stats::{lock, Learned, Stats};
use crate::agent::{ConnectionMode, Observer};

/// The observer of agent number `idx`.
pub(super) struct Watch {
    pub(super) stats: Arc<Stats>,
    pub(super) idx: usize,
}

impl Observer for Watch {
    fn latency(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        lock(&self.stats.latency).saturating_record(us.max(1));
    }

    fn error(&self, kind: &str) {
        self.stats.error(kind);
    }

    fn heartbeat(&self, interval: Duration, window_s: u64, mode: ConnectionMode) {
        Stats::inc(&self.stats.heartbeats, 1);
        self.stats.max_interval_ms.fetch_max(
            u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        *lock(&self.stats.settings_window_s) = Some(window_s);
        *lock(&self.stats.mode) = Some(mode);
    }

    fn learned(&self, revision: u64, window_s: Option<u64>, window_age: Option<f64>) {
        // The window opens at the server apart from when this client heard of it (later: a
        // node announces a revision before its prefetch slot; earlier: a client that
        // heartbeats late): count from the opening when the server says.
        let heard = Instant::now();
        let now = match window_age {
            Some(age) if age >= 0.0 => heard.checked_sub(Duration::from_secs_f64(age)),
            Some(ahead) => heard.checked_add(Duration::from_secs_f64(-ahead)),
            None => None,
        }
        .unwrap_or(heard);
        let mut learned = lock(&self.stats.learned);
        let e = learned
            .entry(revision)
            .or_insert(Learned { at: now, window_s });
        if now < e.at {
            e.at = now;
        }
        if e.window_s.is_none() {
            e.window_s = window_s;
        }
    }

    fn download_started(&self, revision: u64) {
        lock(&self.stats.starts).push((revision, Instant::now()));
    }

    fn downloaded(&self, bytes: u64) {
        Stats::inc(&self.stats.downloads_ok, 1);
        Stats::inc(&self.stats.bytes, bytes);
        Stats::inc(&self.stats.via_full, 1);
        Stats::inc(&self.stats.full_bytes, bytes);
    }

    fn delta_used(&self, bytes: u64, edge: bool, rebuild: Duration) {
        Stats::inc(&self.stats.downloads_ok, 1);
        Stats::inc(&self.stats.bytes, bytes);
        if edge {
            Stats::inc(&self.stats.via_edge_delta, 1);
            Stats::inc(&self.stats.edge_delta_bytes, bytes);
        } else {
            Stats::inc(&self.stats.via_delta, 1);
            Stats::inc(&self.stats.delta_bytes, bytes);
        }
        let us = u64::try_from(rebuild.as_micros()).unwrap_or(u64::MAX);
        lock(&self.stats.rebuild).saturating_record(us.max(1));
    }

    fn delta_fallback(&self, kind: &str, wasted: u64) {
        Stats::inc(&self.stats.wasted_delta_bytes, wasted);
        *lock(&self.stats.fallbacks)
            .entry(kind.to_string())
            .or_insert(0) += 1;
    }

    fn no_delta(&self) {
        Stats::inc(&self.stats.no_delta, 1);
    }

    fn download_failed(&self) {
        Stats::inc(&self.stats.downloads_failed, 1);
    }

    fn digest_mismatch(&self) {
        Stats::inc(&self.stats.digest_mismatches, 1);
    }

    fn deferred(&self) {
        Stats::inc(&self.stats.deferrals, 1);
    }

    fn stream_connected(&self) {
        Stats::inc(&self.stats.stream_connects, 1);
    }

    fn heard(&self, revision: u64) {
        self.stats.heard(revision);
    }

    fn events_sent(&self, n: u64) {
        Stats::inc(&self.stats.events_sent, n);
    }

    fn settled(&self, settled: bool) {
        if let Some(s) = self.stats.settled.get(self.idx) {
            s.store(settled, Ordering::Relaxed);
        }
    }

    fn current(&self, current: bool) {
        if let Some(s) = self.stats.current.get(self.idx) {
            s.store(current, Ordering::Relaxed);
        }
    }
}
