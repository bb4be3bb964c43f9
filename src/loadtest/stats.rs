//! What the agents of a run count while they run: outcomes, bytes (full blobs and deltas),
//! latencies, rebuild times, download starts, when a revision was first learned and heard of,
//! errors and delta fallbacks by kind, and which agents are done.
//!
//! Owns [`Stats`] (one per run, shared by every agent through its `Watch`: atomic counters
//! and short-held mutexes) and `lock` (a mutex guard that ignores poisoning). It only records
//! what the agents saw; it never sends a request and never makes a figure up (the report is
//! built from it in `report`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::LoadtestError;

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// When the first client learned a revision with a slot, and the slot's window.
#[derive(Clone, Copy)]
pub(super) struct Learned {
    pub(super) at: Instant,
    pub(super) window_s: Option<u64>,
}

pub(super) struct Stats {
    pub(super) downloads_ok: AtomicU64,
    pub(super) downloads_failed: AtomicU64,
    pub(super) digest_mismatches: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) heartbeats: AtomicU64,
    pub(super) deferrals: AtomicU64,
    pub(super) events_sent: AtomicU64,
    pub(super) stream_connects: AtomicU64,
    /// Bytes of full blobs verified.
    pub(super) full_bytes: AtomicU64,
    /// Bytes of listed deltas that rebuilt a checked version.
    pub(super) delta_bytes: AtomicU64,
    /// Bytes of edge deltas that rebuilt a checked version.
    pub(super) edge_delta_bytes: AtomicU64,
    /// Bytes of deltas that arrived and rebuilt nothing.
    pub(super) wasted_delta_bytes: AtomicU64,
    pub(super) via_full: AtomicU64,
    pub(super) via_delta: AtomicU64,
    pub(super) via_edge_delta: AtomicU64,
    /// Edge deltas the target had none of (404).
    pub(super) no_delta: AtomicU64,
    /// Deltas that failed, by kind (`delta_digest`, `delta_decode`, ...).
    pub(super) fallbacks: Mutex<BTreeMap<String, u64>>,
    /// Microseconds of each rebuild (decoding and hashing).
    pub(super) rebuild: Mutex<Histogram<u64>>,
    /// When clients heard of each revision, by revision.
    pub(super) heard: Mutex<BTreeMap<u64, Heard>>,
    pub(super) errors: Mutex<BTreeMap<String, u64>>,
    /// Microseconds to response headers.
    pub(super) latency: Mutex<Histogram<u64>>,
    /// (catalog revision, start) of every download start.
    pub(super) starts: Mutex<Vec<(u64, Instant)>>,
    pub(super) learned: Mutex<BTreeMap<u64, Learned>>,
    /// The effective `randomization.window_s` last seen (0 when randomization is off).
    pub(super) settings_window_s: Mutex<Option<u64>>,
    /// The connection mode the agents last ran in.
    pub(super) mode: Mutex<Option<crate::agent::ConnectionMode>>,
    /// The longest effective heartbeat interval seen, in ms.
    pub(super) max_interval_ms: AtomicU64,
    /// Per agent: done (has the newest revision it knows, and its events are uploaded).
    pub(super) settled: Vec<AtomicBool>,
    /// Per agent: has every item of the newest revision it knows (what the progress bar
    /// counts: a client is through as soon as its download is verified, not one heartbeat
    /// later when its last event went up).
    pub(super) current: Vec<AtomicBool>,
}

impl Stats {
    /// A client heard of `revision` for the first time, now.
    pub(super) fn heard(&self, revision: u64) {
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

    pub(super) fn new(clients: usize) -> Result<Stats, LoadtestError> {
        let latency = Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .map_err(|e| LoadtestError::Http(format!("histogram: {e}")))?;
        let rebuild = latency.clone();
        Ok(Stats {
            downloads_ok: AtomicU64::new(0),
            downloads_failed: AtomicU64::new(0),
            digest_mismatches: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            deferrals: AtomicU64::new(0),
            events_sent: AtomicU64::new(0),
            stream_connects: AtomicU64::new(0),
            full_bytes: AtomicU64::new(0),
            delta_bytes: AtomicU64::new(0),
            edge_delta_bytes: AtomicU64::new(0),
            wasted_delta_bytes: AtomicU64::new(0),
            via_full: AtomicU64::new(0),
            via_delta: AtomicU64::new(0),
            via_edge_delta: AtomicU64::new(0),
            no_delta: AtomicU64::new(0),
            fallbacks: Mutex::new(BTreeMap::new()),
            rebuild: Mutex::new(rebuild),
            heard: Mutex::new(BTreeMap::new()),
            errors: Mutex::new(BTreeMap::new()),
            latency: Mutex::new(latency),
            starts: Mutex::new(Vec::new()),
            learned: Mutex::new(BTreeMap::new()),
            settings_window_s: Mutex::new(None),
            mode: Mutex::new(None),
            max_interval_ms: AtomicU64::new(0),
            settled: (0..clients).map(|_| AtomicBool::new(false)).collect(),
            current: (0..clients).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    pub(super) fn inc(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(super) fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub(super) fn error(&self, kind: impl Into<String>) {
        *lock(&self.errors).entry(kind.into()).or_insert(0) += 1;
    }

    pub(super) fn current_count(&self) -> usize {
        self.current
            .iter()
            .filter(|b| b.load(Ordering::Relaxed))
            .count()
    }

    pub(super) fn settled_count(&self) -> usize {
        self.settled
            .iter()
            .filter(|b| b.load(Ordering::Relaxed))
            .count()
    }
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
