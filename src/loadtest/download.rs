//! A simulated client's download round: the catalog, then every blob it lacks, each at the
//! download slot the server handed out (urgent items at once).
//!
//! Owns the round (`download_job`), the catalog request and the download of one blob, which
//! honours 429/503 `Retry-After` until the deadline, retries network errors, 5xx and cut
//! bodies a bounded number of times, and checks the SHA-256 of every body while it streams.
//! It only ever asks the target's public `/v1/catalog` and `/v1/content/{sha256}`, through
//! [`Shared::url`]; it never waits past the run deadline and never counts a body it has not
//! verified as a download.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sha2::{Digest as _, Sha256};
use tokio::time::{timeout, Instant};

use super::shared::{backoff, Shared, REQUEST_TIMEOUT};
use super::stats::{lock, net_kind, status_kind, Stats};
use super::wire::{retry_after, Catalog};

/// Content: response headers must come within this, and then no gap between chunks may be
/// longer (a long download over a slow link is fine; a stalled one is not).
const CONTENT_IDLE: Duration = Duration::from_secs(60);
/// Tries of one request on network errors and 5xx (429/503 are bounded by the deadline).
const MAX_ATTEMPTS: u32 = 5;

#[derive(Default)]
pub(super) struct JobOutcome {
    pub(super) fetched_rev: Option<u64>,
    pub(super) ok: Vec<String>,
    pub(super) failed: Vec<String>,
}

enum Fetch {
    Ok,
    Failed,
    Deadline,
}

/// One download round: the catalog, then each item not yet done, waiting for the slot
/// (urgent items never wait).
pub(super) async fn download_job(
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
