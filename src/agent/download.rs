//! Every download of the agent, full blobs and deltas alike: [`download`] and what it is
//! told ([`Want`]) and answers ([`Got`]).
//!
//! Owns the exchange with the servers for one body: `X-Gup-Client-Id` named, 429 and 503
//! waited out by `Retry-After`, network failures retried with backoff, a partial download
//! resumed with `Range` and `If-Range` (blobs named by their digest: full ones and listed
//! deltas), the SHA-256 check while the bytes stream, a body cut at its bound. A body that
//! does not match its digest (or runs past its bound) is discarded and the next server is
//! tried. It must never decide what to download (`fetch` and `rebuild` do) nor install
//! anything: it hands back checked bytes or a partial file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::time::{timeout, Instant};

use super::ctx::{backoff, net_kind, status_kind, Ctx, IDLE_TIMEOUT};
use super::home::hash_file;
use super::wire::retry_after;

/// Attempts of one item on one server before it is given up for this round.
const MAX_ATTEMPTS: u32 = 5;
/// A `Retry-After` longer than this is taken as this.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// What a body kept in memory reserves before its first byte (it grows as bytes arrive, up to
/// its download's bound).
const KEEP_RESERVE: usize = 1 << 20;

/// How a download ended.
pub(super) enum Got {
    Ok(Body),
    /// Not this round (gone from the catalog, refused, or too many failures).
    Failed,
    /// Bytes that do not match: try the next server.
    Mismatch,
    /// The server has no such delta (404 to `GET /v1/delta/..`).
    NoDelta,
    /// The body ran past its bound (an edge delta over half the item).
    TooLarge,
    Stopped,
}

/// A body that arrived whole (and matched its digest, when it has one).
pub(super) struct Body {
    pub(super) len: u64,
    /// The bytes, when the download keeps them in memory (deltas).
    pub(super) kept: Option<Vec<u8>>,
}

/// What is downloaded: a full blob, a listed delta's blob, or an edge delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Full,
    Delta,
    Edge,
}

impl Want<'_> {
    /// Body bytes received so far.
    pub(super) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Kind {
    /// The prefix of its error kinds (`content_503`, `delta_content_cut`, `delta_4xx`).
    fn what(self) -> &'static str {
        match self {
            Kind::Full => "content",
            Kind::Delta => "delta_content",
            Kind::Edge => "delta",
        }
    }
}

/// One download: where, what its bytes must match, and its bound.
pub(super) struct Want<'a> {
    /// The path after the base URL (`/v1/content/{sha}`, `/v1/delta/{from}/{to}`).
    pub(super) path: String,
    /// The SHA-256 the body must have (none for an edge delta: what it rebuilds is checked).
    /// A download with a digest keeps its partial bytes under it and resumes with `Range`.
    pub(super) digest: Option<&'a str>,
    /// The most bytes the body may have (the catalog's size; half the item for a delta).
    pub(super) limit: Option<u64>,
    /// Keep the bytes in memory (deltas), at most `limit` of them.
    pub(super) keep: bool,
    pub(super) kind: Kind,
    /// Body bytes received over every attempt and server (what a failed delta wasted).
    pub(super) received: AtomicU64,
}

/// Whether `s` is a SHA-256 in lower-case hex (what a file under `partial/` may be named).
pub(super) fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where the bytes of a download go while they arrive: the partial file (a download with a
/// digest, in a data dir), memory (a delta: at most its download's bound), both, or neither
/// (a load-test agent's full blob: hashed and dropped).
struct Sink {
    path: Option<PathBuf>,
    file: Option<tokio::fs::File>,
    kept: Option<Vec<u8>>,
    hasher: Sha256,
    len: u64,
}

impl Sink {
    /// Opens the partial download of `want` (resuming what is there) or a sink in memory.
    async fn open(ctx: &Ctx, want: &Want<'_>) -> std::io::Result<Sink> {
        let reserve = want
            .limit
            .map_or(KEEP_RESERVE, |l| (l as usize).min(KEEP_RESERVE));
        let kept = want.keep.then(|| Vec::with_capacity(reserve));
        let Some(path) = want.digest.and_then(|d| ctx.home.partial_path(d)) else {
            return Ok(Sink {
                path: None,
                file: None,
                kept,
                hasher: Sha256::new(),
                len: 0,
            });
        };
        let (p, keep, limit) = (path.clone(), want.keep, want.limit);
        // The bytes already there are hashed again (and read back, when kept) on a blocking
        // thread; a partial longer than the bound starts over.
        let (hasher, len, kept) = tokio::task::spawn_blocking(move || {
            let fresh = (Sha256::new(), 0, kept);
            let len = match std::fs::metadata(&p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(fresh),
                Err(e) => return Err(e),
                Ok(m) => m.len(),
            };
            if limit.is_some_and(|l| len > l) {
                std::fs::remove_file(&p)?;
                return Ok(fresh);
            }
            if keep {
                let bytes = std::fs::read(&p)?;
                let hasher = Sha256::new_with_prefix(&bytes);
                Ok((hasher, bytes.len() as u64, Some(bytes)))
            } else {
                let (hasher, len) = hash_file(&p)?;
                Ok((hasher, len, None))
            }
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
            kept,
            hasher,
            len,
        })
    }

    /// Starts over from byte 0.
    async fn reset(&mut self) -> std::io::Result<()> {
        self.hasher = Sha256::new();
        self.len = 0;
        if let Some(k) = &mut self.kept {
            k.clear();
        }
        if let Some(f) = &mut self.file {
            f.set_len(0).await?;
        }
        Ok(())
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        if let Some(k) = &mut self.kept {
            k.extend_from_slice(bytes);
        }
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

/// Downloads `want` for the item `name`, trying the servers in order after a mismatch.
pub(super) async fn download(
    ctx: &Ctx,
    bases: &[String],
    want: &Want<'_>,
    name: &str,
    rev: u64,
) -> Got {
    for base in bases {
        match download_from(ctx, base, want, rev).await {
            Got::Mismatch => {
                tracing::warn!(server = %base, name = %name, path = %want.path, "bytes do not match their digest; discarded, trying the next server");
                continue;
            }
            other => return other,
        }
    }
    Got::Mismatch
}

async fn download_from(ctx: &Ctx, base: &str, want: &Want<'_>, rev: u64) -> Got {
    let url = format!("{base}{}", want.path);
    let what = want.kind.what();
    let mut failures = 0u32;
    loop {
        if ctx.stop.is_cancelled() {
            return Got::Stopped;
        }
        let mut sink = match Sink::open(ctx, want).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(path = %want.path, error = %e, "cannot open the partial download");
                ctx.obs.error("partial_io");
                if let Some(d) = want.digest {
                    ctx.home.discard_partial(d);
                }
                return Got::Failed;
            }
        };
        let resume_from = sink.len;
        let mut req = ctx.http.get(&url).header("X-Gup-Client-Id", &ctx.client_id);
        if let (true, Some(d)) = (resume_from > 0, want.digest) {
            req = req
                .header(reqwest::header::RANGE, format!("bytes={resume_from}-"))
                .header(reqwest::header::IF_RANGE, format!("\"{d}\""));
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
                ctx.obs.error(&format!("{what}_{status}"));
                match next_try(&mut failures) {
                    Some(_) => continue,
                    None => return Got::Failed,
                }
            }
            404 if want.kind == Kind::Edge => return Got::NoDelta,
            429 | 503 => {
                if status == 429 {
                    ctx.obs.deferred();
                } else {
                    ctx.obs.error(&format!("{what}_503"));
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
                ctx.obs.error(&status_kind(what, resp.status()));
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
                    if want
                        .limit
                        .is_some_and(|l| sink.len + bytes.len() as u64 > l)
                    {
                        sink.discard();
                        if want.kind == Kind::Edge {
                            // Cut off: a delta this large is not worth having.
                            return Got::TooLarge;
                        }
                        ctx.obs.error(&format!("{what}_overrun"));
                        return Got::Mismatch;
                    }
                    want.received
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if let Err(e) = sink.write(&bytes).await {
                        tracing::warn!(error = %e, "cannot write the download");
                        ctx.obs.error("partial_io");
                        break false;
                    }
                }
                Ok(Ok(None)) => break true,
                Ok(Err(_)) => {
                    ctx.obs.error(&format!("{what}_cut"));
                    break false;
                }
                Err(_) => {
                    ctx.obs.error(&format!("{what}_idle"));
                    break false;
                }
            }
        };
        if !complete {
            // What arrived stays for the next attempt to resume from (a download named by
            // its digest; the others start over).
            let _ = sink.sync().await;
            match next_try(&mut failures) {
                Some(d) if ctx.nap(d).await => continue,
                Some(_) => return Got::Stopped,
                None => return Got::Failed,
            }
        }
        if let Some(d) = want.digest {
            if sink.digest() != d {
                if want.kind == Kind::Full {
                    ctx.obs.digest_mismatch();
                } else {
                    ctx.obs.error("delta_digest");
                }
                sink.discard();
                return Got::Mismatch;
            }
        }
        if let Err(e) = sink.sync().await {
            tracing::warn!(error = %e, "cannot sync the download");
            ctx.obs.error("partial_io");
            sink.discard();
            return Got::Failed;
        }
        return Got::Ok(Body {
            len: sink.len,
            kept: sink.kept.take(),
        });
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
