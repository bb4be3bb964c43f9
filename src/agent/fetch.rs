//! An agent's download round: the catalog, then each item it lacks, at its slot, checked.
//!
//! Owns [`round`]: `GET /v1/catalog`, then for every item whose digest the agent does not hold
//! under that name, a wait for the download slot (urgent items never wait), the download
//! (`X-Gup-Client-Id` named, 429 and 503 waited out by `Retry-After`, network failures retried
//! with backoff, a partial download resumed with `Range` and `If-Range`), the SHA-256 check
//! while the bytes stream, and the install through the home. A body that does not match its
//! digest (or runs past the catalog's size) is discarded and the next server is tried. It
//! must never install bytes it has not checked, and never touch the agent's saved state: it
//! returns what it installed and the loop records it.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::time::{timeout, Instant};

use super::ctx::{backoff, net_kind, status_kind, Ctx, IDLE_TIMEOUT, REQUEST_TIMEOUT};
use super::home::{hash_file, safe_name, Held};
use super::wire::{retry_after, Catalog, CatalogItem};

/// Attempts of one item on one server before it is given up for this round.
const MAX_ATTEMPTS: u32 = 5;
/// A `Retry-After` longer than this is taken as this.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);

/// What a round did.
#[derive(Debug, Default)]
pub struct Round {
    /// The catalog revision it worked from (none: no catalog).
    pub revision: Option<u64>,
    /// Items installed: name and what it now holds.
    pub installed: Vec<(String, Held)>,
    /// Digests that failed this round.
    pub failed: Vec<String>,
    /// Whether the agent was stopped before the round ended.
    pub stopped: bool,
}

enum Got {
    Ok(u64),
    /// Not this round (gone from the catalog, refused, or too many failures).
    Failed,
    /// Bytes that do not match: try the next server.
    Mismatch,
    Stopped,
}

/// One round against `bases` (the server in use first).
pub async fn round(
    ctx: Arc<Ctx>,
    bases: Vec<String>,
    slot_at: Option<Instant>,
    have: BTreeMap<String, Held>,
    given_up: HashSet<String>,
) -> Round {
    let mut out = Round::default();
    let Some(catalog) = fetch_catalog(&ctx, &bases).await else {
        out.stopped = ctx.stop.is_cancelled();
        return out;
    };
    out.revision = Some(catalog.revision);
    let mut names = HashSet::new();
    for item in catalog.items {
        let sha = item.sha256.to_ascii_lowercase();
        if !names.insert(item.name.clone()) || given_up.contains(&sha) {
            continue;
        }
        if have.get(&item.name).is_some_and(|h| h.sha256 == sha) {
            continue;
        }
        if !safe_name(&item.name) || sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit())
        {
            tracing::warn!(name = %item.name, "skipping a catalog item whose name or digest cannot be a file");
            ctx.obs.error("bad_item");
            out.failed.push(sha);
            continue;
        }
        if !item.urgent {
            if let Some(at) = slot_at {
                let wait = at.saturating_duration_since(Instant::now());
                if !wait.is_zero() && !ctx.nap(wait).await {
                    out.stopped = true;
                    return out;
                }
            }
        }
        match download(&ctx, &bases, &item, &sha, catalog.revision).await {
            Got::Ok(size) => {
                let old = have.get(&item.name).map(|h| h.sha256.clone());
                match ctx.home.install(&item.name, &sha, old.as_deref()) {
                    Ok(()) => {
                        tracing::info!(name = %item.name, sha256 = %sha, size, "installed");
                        out.installed.push((
                            item.name.clone(),
                            Held {
                                sha256: sha,
                                version: item.version.clone(),
                                size,
                            },
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(name = %item.name, error = %e, "cannot install a checked download");
                        ctx.obs.error("install");
                        out.failed.push(sha);
                    }
                }
            }
            Got::Failed | Got::Mismatch => {
                ctx.obs.download_failed();
                out.failed.push(sha);
            }
            Got::Stopped => {
                out.stopped = true;
                return out;
            }
        }
    }
    out
}

async fn fetch_catalog(ctx: &Ctx, bases: &[String]) -> Option<Catalog> {
    for (attempt, base) in bases
        .iter()
        .cycle()
        .take(bases.len().max(1) * 2)
        .enumerate()
    {
        if ctx.stop.is_cancelled() {
            return None;
        }
        let t0 = Instant::now();
        let sent = ctx
            .http
            .get(format!("{base}/v1/catalog"))
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                ctx.obs.latency(t0.elapsed());
                match r.json::<Catalog>().await {
                    Ok(c) => return Some(c),
                    Err(e) => ctx.obs.error(if e.is_decode() {
                        "catalog_json"
                    } else {
                        net_kind(&e)
                    }),
                }
            }
            Ok(r) => ctx.obs.error(&status_kind("catalog", r.status())),
            Err(e) => ctx.obs.error(net_kind(&e)),
        }
        if !ctx.nap(backoff(attempt as u32 + 1)).await {
            return None;
        }
    }
    None
}

/// Where the bytes of a download go while they arrive.
struct Sink {
    path: Option<PathBuf>,
    file: Option<tokio::fs::File>,
    hasher: Sha256,
    len: u64,
}

impl Sink {
    /// Opens the partial download of `sha` (resuming what is there) or a sink in memory.
    async fn open(ctx: &Ctx, sha: &str) -> std::io::Result<Sink> {
        let Some(path) = ctx.home.partial_path(sha) else {
            return Ok(Sink {
                path: None,
                file: None,
                hasher: Sha256::new(),
                len: 0,
            });
        };
        let p = path.clone();
        // The bytes already there are hashed again on a blocking thread.
        let (hasher, len) = tokio::task::spawn_blocking(move || match hash_file(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((Sha256::new(), 0)),
            other => other,
        })
        .await
        .map_err(std::io::Error::other)??;
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await?;
        Ok(Sink {
            path: Some(path),
            file: Some(file),
            hasher,
            len,
        })
    }

    /// Starts over from byte 0.
    async fn reset(&mut self) -> std::io::Result<()> {
        self.hasher = Sha256::new();
        self.len = 0;
        if let Some(f) = &mut self.file {
            f.set_len(0).await?;
        }
        Ok(())
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        if let Some(f) = &mut self.file {
            f.write_all(bytes).await?;
        }
        Ok(())
    }

    /// Flushes and syncs what is written (so a resume after a crash starts from it).
    async fn sync(&mut self) -> std::io::Result<()> {
        if let Some(f) = &mut self.file {
            f.flush().await?;
            f.sync_data().await?;
        }
        Ok(())
    }

    fn digest(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    fn discard(self) {
        drop(self.file);
        if let Some(p) = self.path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Counts a failed attempt: the backoff before the next one, or none when the item is given
/// up for this round.
fn next_try(failures: &mut u32) -> Option<Duration> {
    *failures += 1;
    (*failures < MAX_ATTEMPTS).then(|| backoff(*failures))
}

/// Downloads one item, trying the servers in order after a mismatch.
async fn download(ctx: &Ctx, bases: &[String], item: &CatalogItem, sha: &str, rev: u64) -> Got {
    for base in bases {
        match download_from(ctx, base, item, sha, rev).await {
            Got::Mismatch => {
                tracing::warn!(server = %base, name = %item.name, sha256 = %sha, "bytes do not match their digest; discarded, trying the next server");
                continue;
            }
            other => return other,
        }
    }
    Got::Mismatch
}

async fn download_from(ctx: &Ctx, base: &str, item: &CatalogItem, sha: &str, rev: u64) -> Got {
    let url = format!("{base}/v1/content/{sha}");
    let mut failures = 0u32;
    loop {
        if ctx.stop.is_cancelled() {
            return Got::Stopped;
        }
        let mut sink = match Sink::open(ctx, sha).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(sha256 = %sha, error = %e, "cannot open the partial download");
                ctx.obs.error("partial_io");
                ctx.home.discard_partial(sha);
                return Got::Failed;
            }
        };
        let resume_from = sink.len;
        let mut req = ctx.http.get(&url).header("X-Gup-Client-Id", &ctx.client_id);
        if resume_from > 0 {
            req = req
                .header(reqwest::header::RANGE, format!("bytes={resume_from}-"))
                .header(reqwest::header::IF_RANGE, format!("\"{sha}\""));
        }
        let t0 = Instant::now();
        let mut resp = match timeout(IDLE_TIMEOUT, req.send()).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                ctx.obs.error(net_kind(&e));
                match next_try(&mut failures) {
                    Some(d) if ctx.nap(d).await => continue,
                    Some(_) => return Got::Stopped,
                    None => return Got::Failed,
                }
            }
            Err(_) => {
                ctx.obs.error("timeout");
                match next_try(&mut failures) {
                    Some(_) => continue,
                    None => return Got::Failed,
                }
            }
        };
        ctx.obs.latency(t0.elapsed());
        let status = resp.status().as_u16();
        match status {
            200 => {
                if resume_from > 0 {
                    if let Err(e) = sink.reset().await {
                        tracing::warn!(error = %e, "cannot restart the partial download");
                        ctx.obs.error("partial_io");
                        sink.discard();
                        return Got::Failed;
                    }
                }
            }
            206 if resume_from > 0 && content_range_start(&resp) == Some(resume_from) => {}
            206 | 416 => {
                // A range the agent did not ask for, or a partial longer than the blob.
                drop(resp);
                sink.discard();
                ctx.obs.error(&format!("content_{status}"));
                match next_try(&mut failures) {
                    Some(_) => continue,
                    None => return Got::Failed,
                }
            }
            429 | 503 => {
                if status == 429 {
                    ctx.obs.deferred();
                } else {
                    ctx.obs.error("content_503");
                }
                let wait = retry_after(resp.headers()).unwrap_or(1.0);
                let jitter: f64 = rand::rng().random_range(0.0..=0.1);
                drop(resp);
                let d = Duration::from_secs_f64(wait * (1.0 + jitter)).min(MAX_WAIT);
                if !ctx.nap(d).await {
                    return Got::Stopped;
                }
                continue;
            }
            _ => {
                ctx.obs.error(&status_kind("content", resp.status()));
                if resp.status().is_server_error() {
                    match next_try(&mut failures) {
                        Some(d) if ctx.nap(d).await => continue,
                        Some(_) => return Got::Stopped,
                        None => return Got::Failed,
                    }
                }
                return Got::Failed;
            }
        }
        ctx.obs.download_started(rev);
        let limit = item.size;
        let complete = loop {
            let chunk = tokio::select! {
                _ = ctx.stop.cancelled() => {
                    let _ = sink.sync().await;
                    return Got::Stopped;
                }
                c = timeout(IDLE_TIMEOUT, resp.chunk()) => c,
            };
            match chunk {
                Ok(Ok(Some(bytes))) => {
                    if limit.is_some_and(|l| sink.len + bytes.len() as u64 > l) {
                        ctx.obs.error("content_overrun");
                        sink.discard();
                        return Got::Mismatch;
                    }
                    if let Err(e) = sink.write(&bytes).await {
                        tracing::warn!(error = %e, "cannot write the download");
                        ctx.obs.error("partial_io");
                        break false;
                    }
                }
                Ok(Ok(None)) => break true,
                Ok(Err(_)) => {
                    ctx.obs.error("content_cut");
                    break false;
                }
                Err(_) => {
                    ctx.obs.error("content_idle");
                    break false;
                }
            }
        };
        if !complete {
            // What arrived stays for the next attempt to resume from.
            let _ = sink.sync().await;
            match next_try(&mut failures) {
                Some(d) if ctx.nap(d).await => continue,
                Some(_) => return Got::Stopped,
                None => return Got::Failed,
            }
        }
        if sink.digest() != sha {
            ctx.obs.digest_mismatch();
            sink.discard();
            return Got::Mismatch;
        }
        if let Err(e) = sink.sync().await {
            tracing::warn!(error = %e, "cannot sync the download");
            ctx.obs.error("partial_io");
            sink.discard();
            return Got::Failed;
        }
        ctx.obs.downloaded(sink.len);
        return Got::Ok(sink.len);
    }
}

/// The first byte of a 206's `Content-Range: bytes a-b/n`.
fn content_range_start(resp: &reqwest::Response) -> Option<u64> {
    let v = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)?
        .to_str()
        .ok()?;
    let rest = v.strip_prefix("bytes ")?;
    rest.split('-').next()?.trim().parse().ok()
}
