//! The scrub: every stored blob is read back and re-hashed in the background, so that bytes
//! that rotted on disk after they were verified (a bad sector, a stray write, an operator's
//! mistake) are found and never served again.
//!
//! Owns the pass over the blobs (each is due once `scrub_interval_s` has passed since it was
//! last verified, or since it was stored: a blob is verified as it is written), its pacing
//! (`scrub_bytes_per_sec` over the whole store, so a scrub is a steady trickle rather than a
//! burst), each blob's `verified_at` in the index, and the quarantine: a blob whose bytes no
//! longer match its name leaves the index first (no response opens it again from then on) and
//! its file moves to `data_dir/quarantine/`, which keeps the newest [`QUARANTINE_KEEP`] files
//! for an operator to look at. What a role does about a rotten blob (fetch it again, raise a
//! notification, drop it from its memory cache, count it) is the role's: it hears of it
//! through [`ScrubSink`]. This module must never talk to the network or decide what is in a
//! catalog, and never delete a blob whose bytes match.
//!
//! The pacing is a few lines of arithmetic (bytes read against the time they may take) rather
//! than a rate-limiter crate: the scrub is one sequential reader, so there is nothing to share
//! or refill between callers.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest as _, Sha256};

use super::{io, Store, StoreError};
use crate::core::digest::Digest;

/// Bytes read per blocking call: large enough that the thread hand-off costs nothing against
/// the read, small enough that the pacing is smooth and memory bounded (one chunk at a time).
const CHUNK: usize = 1 << 20;

/// Quarantined files kept; older ones are deleted, so a failing disk cannot fill itself with
/// them.
pub const QUARANTINE_KEEP: usize = 16;

/// How long the scrub sleeps at most before it looks for newly due blobs (less when the
/// interval is shorter).
const IDLE_MAX: Duration = Duration::from_secs(60);

/// What the scrub is told to do (`[store]` of either role).
#[derive(Debug, Clone, Copy)]
pub struct ScrubOptions {
    /// Each blob is verified again this long after its last verification. Zero: no scrub.
    pub interval: Duration,
    /// The pace of reading, over all blobs.
    pub bytes_per_sec: u64,
}

/// A blob whose bytes did not match its name, now out of the store.
#[derive(Debug, Clone)]
pub struct Corrupt {
    pub digest: Digest,
    pub size: u64,
    /// What the bytes hash to now (None when the file's length was already wrong).
    pub actual: Option<Digest>,
    /// Where its file went (None when it could not be moved and was deleted instead).
    pub quarantined: Option<PathBuf>,
}

/// Who hears of what the scrub did.
pub trait ScrubSink: Send + Sync {
    /// A blob of `bytes` bytes matched its name.
    fn verified(&self, bytes: u64);
    /// A blob did not and is out of the store; the role decides what follows.
    fn corrupt(&self, c: Corrupt);
}

/// What reading a blob back found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Good,
    /// The bytes hash to `actual`, or the file's length is not the index's (`actual` None).
    Rotten {
        actual: Option<Digest>,
    },
    /// The blob left the store while it was read (evicted, collected).
    Gone,
}

/// Paces reads at `bytes_per_sec`: each read may start once the bytes before it have had
/// their time. Time spent idle is not saved up as credit for a burst later.
pub struct Pacer {
    bytes_per_sec: u64,
    since: Instant,
    bytes: u64,
}

impl Pacer {
    pub fn new(bytes_per_sec: u64) -> Pacer {
        Pacer {
            bytes_per_sec: bytes_per_sec.max(1),
            since: Instant::now(),
            bytes: 0,
        }
    }

    /// How long to wait before reading on, having just read `n` more bytes.
    fn after(&mut self, n: u64) -> Duration {
        let now = Instant::now();
        let due = Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_sec as f64);
        if now.duration_since(self.since) > due + Duration::from_secs(1) {
            // Idle for a while: start counting afresh.
            self.since = now;
            self.bytes = 0;
        }
        self.bytes += n;
        let due = Duration::from_secs_f64(self.bytes as f64 / self.bytes_per_sec as f64);
        due.saturating_sub(now.duration_since(self.since))
    }
}

impl Store {
    /// Verifies blobs as they fall due, forever (the role aborts the task at shutdown). A
    /// failure to read one is logged and the blob tried again at its next turn.
    pub async fn scrub_loop(self, opts: ScrubOptions, sink: Arc<dyn ScrubSink>) {
        if opts.interval.is_zero() {
            return;
        }
        let mut pacer = Pacer::new(opts.bytes_per_sec);
        let mut warned_slow = false;
        loop {
            let (due, next) = self.due(opts.interval, Utc::now());
            let due_bytes: u64 = due.iter().map(|(_, size)| size).sum();
            let pass_s = due_bytes / opts.bytes_per_sec.max(1);
            if !warned_slow && pass_s > opts.interval.as_secs() {
                warned_slow = true;
                tracing::warn!(
                    bytes = due_bytes,
                    bytes_per_sec = opts.bytes_per_sec,
                    seconds = pass_s,
                    "the scrub cannot verify every blob within store.scrub_interval_s at store.scrub_bytes_per_sec"
                );
            }
            for (digest, _) in due {
                match self.verify(&digest, &mut pacer).await {
                    Ok(Verdict::Good) => sink.verified(self.get(&digest).map_or(0, |m| m.size)),
                    Ok(Verdict::Gone) => {}
                    Ok(Verdict::Rotten { actual }) => match self.quarantine(&digest, actual) {
                        Ok(Some(c)) => {
                            tracing::error!(%digest, actual = ?c.actual, quarantined = ?c.quarantined, "a stored blob no longer matches its digest: out of the store");
                            sink.corrupt(c);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(%digest, error = %e, "could not quarantine a rotten blob")
                        }
                    },
                    Err(e) => {
                        tracing::warn!(%digest, error = %e, "could not scrub a blob; tried again later")
                    }
                }
            }
            // A blob stored while this sleeps is due an interval after it was stored: waking
            // at least once an interval finds it at most one interval late.
            let wait = next
                .and_then(|t| (t - Utc::now()).to_std().ok())
                .unwrap_or(IDLE_MAX)
                .min(opts.interval)
                .clamp(Duration::from_millis(100), IDLE_MAX);
            tokio::time::sleep(wait).await;
        }
    }

    /// The blobs due for a scrub at `now`, the least recently verified first, and when the
    /// next one not yet due will be.
    fn due(
        &self,
        interval: Duration,
        now: DateTime<Utc>,
    ) -> (Vec<(Digest, u64)>, Option<DateTime<Utc>>) {
        let interval = chrono::Duration::from_std(interval).unwrap_or(chrono::Duration::MAX);
        let mut due = Vec::new();
        let mut next: Option<DateTime<Utc>> = None;
        for (digest, meta) in self.list() {
            let last = meta.verified_at.unwrap_or(meta.stored_at);
            let at = last
                .checked_add_signed(interval)
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            if at <= now {
                due.push((last, digest, meta.size));
            } else if next.is_none_or(|n| at < n) {
                next = Some(at);
            }
        }
        due.sort();
        (due.into_iter().map(|(_, d, s)| (d, s)).collect(), next)
    }

    /// Reads `digest` back at the pacer's speed and compares; a good blob's `verified_at`
    /// becomes now.
    pub async fn verify(&self, digest: &Digest, pacer: &mut Pacer) -> Result<Verdict, StoreError> {
        let Some(meta) = self.get(digest) else {
            return Ok(Verdict::Gone);
        };
        let path = self.blob_path(digest);
        let file = match std::fs::File::open(&path) {
            Ok(f) => Arc::new(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Verdict::Gone),
            Err(e) => return Err(io(format!("opening {}", path.display()))(e)),
        };
        let len = file
            .metadata()
            .map_err(io(format!("reading {}", path.display())))?
            .len();
        if len != meta.size {
            return Ok(self.still_stored(digest, Verdict::Rotten { actual: None }));
        }
        let mut hasher = Sha256::new();
        let mut offset = 0u64;
        while offset < meta.size {
            let n = CHUNK.min((meta.size - offset) as usize);
            let f = file.clone();
            let (h, read) = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n];
                let read = f.read_exact_at(&mut buf, offset);
                hasher.update(&buf);
                (hasher, read)
            })
            .await
            .map_err(|e| StoreError::Join(e.to_string()))?;
            hasher = h;
            if let Err(e) = read {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    return Ok(self.still_stored(digest, Verdict::Rotten { actual: None }));
                }
                return Err(io(format!("reading {}", path.display()))(e));
            }
            offset += n as u64;
            let wait = pacer.after(n as u64);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
        let actual = Digest::from_hasher(hasher);
        if actual != *digest {
            return Ok(self.still_stored(
                digest,
                Verdict::Rotten {
                    actual: Some(actual),
                },
            ));
        }
        self.mark_verified(digest, Utc::now())?;
        Ok(Verdict::Good)
    }

    /// `verdict`, or Gone when the blob left the store while it was read (its file may have
    /// been unlinked and replaced by then: the reading says nothing of what is there now).
    fn still_stored(&self, digest: &Digest, verdict: Verdict) -> Verdict {
        if self.contains(digest) {
            verdict
        } else {
            Verdict::Gone
        }
    }

    /// Takes a rotten blob out of the store: out of the index first (so no response opens it
    /// from then on), then its file into `quarantine/` (or deleted when it cannot be moved).
    /// None when it was no longer stored.
    pub fn quarantine(
        &self,
        digest: &Digest,
        actual: Option<Digest>,
    ) -> Result<Option<Corrupt>, StoreError> {
        let Some(meta) = self.forget(digest)? else {
            return Ok(None);
        };
        let from = self.blob_path(digest);
        let dir = &self.inner.quarantine_dir;
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let to = dir.join(format!(
            "{}.{}",
            digest.to_hex(),
            Utc::now().timestamp_millis()
        ));
        let quarantined = match std::fs::rename(&from, &to) {
            Ok(()) => Some(to),
            Err(e) => {
                tracing::warn!(%digest, error = %e, "could not move a rotten blob to quarantine; deleting it");
                let _ = std::fs::remove_file(&from);
                None
            }
        };
        trim_quarantine(dir);
        Ok(Some(Corrupt {
            digest: *digest,
            size: meta.size,
            actual,
            quarantined,
        }))
    }
}

/// Deletes all but the newest [`QUARANTINE_KEEP`] files of `dir` (best effort).
fn trim_quarantine(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let modified = e.metadata().ok()?.modified().ok()?;
            Some((modified, e.path()))
        })
        .collect();
    if files.len() <= QUARANTINE_KEEP {
        return;
    }
    files.sort();
    let excess = files.len() - QUARANTINE_KEEP;
    for (_, path) in files.into_iter().take(excess) {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Seen {
        verified: Mutex<u64>,
        corrupt: Mutex<Vec<Corrupt>>,
    }

    impl ScrubSink for Seen {
        fn verified(&self, bytes: u64) {
            *self.verified.lock().unwrap() += bytes;
        }
        fn corrupt(&self, c: Corrupt) {
            self.corrupt.lock().unwrap().push(c);
        }
    }

    async fn put(store: &Store, bytes: &[u8]) -> Digest {
        let mut w = store.writer().await.unwrap();
        w.write(bytes).await.unwrap();
        w.finish(None).await.unwrap().0
    }

    fn flip(store: &Store, digest: &Digest, at: u64) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(store.blob_path(digest))
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    }

    #[tokio::test]
    async fn a_rotten_blob_is_quarantined_and_a_good_one_only_marked_verified() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = put(&store, &vec![7u8; 3 * CHUNK + 5]).await;
        let bad = put(&store, b"these bytes will rot").await;
        flip(&store, &bad, 3);
        let mut p = Pacer::new(u64::MAX);
        assert_eq!(store.verify(&good, &mut p).await.unwrap(), Verdict::Good);
        assert!(store.get(&good).unwrap().verified_at.is_some());
        let Verdict::Rotten { actual } = store.verify(&bad, &mut p).await.unwrap() else {
            panic!("the flipped byte went unnoticed");
        };
        assert!(actual.is_some_and(|a| a != bad));
        let c = store.quarantine(&bad, actual).unwrap().unwrap();
        assert!(!store.contains(&bad));
        assert!(!store.blob_path(&bad).exists());
        assert!(c.quarantined.as_ref().unwrap().exists());
        assert_eq!(store.total_bytes(), (3 * CHUNK + 5) as u64);
        assert!(store
            .open_blob(&bad, 1 << 20, false)
            .await
            .unwrap()
            .is_none());
        // Gone once out, and the store reopens without it.
        assert_eq!(store.verify(&bad, &mut p).await.unwrap(), Verdict::Gone);
        assert!(store.quarantine(&bad, None).unwrap().is_none());
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert!(!store.contains(&bad) && store.contains(&good));
    }

    #[tokio::test]
    async fn a_truncated_blob_is_rotten_too() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = put(&store, b"0123456789").await;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(store.blob_path(&d))
            .unwrap();
        f.set_len(4).unwrap();
        let mut p = Pacer::new(u64::MAX);
        assert_eq!(
            store.verify(&d, &mut p).await.unwrap(),
            Verdict::Rotten { actual: None }
        );
    }

    #[tokio::test]
    async fn the_loop_finds_rot_within_the_interval_and_tells_the_sink() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let good = put(&store, &[1u8; 1000]).await;
        let bad = put(&store, &[2u8; 1000]).await;
        flip(&store, &bad, 999);
        let seen = Arc::new(Seen::default());
        let task = tokio::spawn(store.clone().scrub_loop(
            ScrubOptions {
                interval: Duration::from_millis(200),
                bytes_per_sec: 50 << 20,
            },
            seen.clone(),
        ));
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.corrupt.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the scrub never found the rot");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        task.abort();
        let corrupt = seen.corrupt.lock().unwrap().clone();
        assert_eq!(corrupt.len(), 1);
        assert_eq!(corrupt[0].digest, bad);
        assert!(store.contains(&good) && !store.contains(&bad));
        assert!(*seen.verified.lock().unwrap() >= 1000);
    }

    #[test]
    fn the_pacer_holds_the_rate_and_saves_no_credit_while_idle() {
        let mut p = Pacer::new(100 << 20);
        // 100 MiB/s: 10 MiB at once must wait about 0.1 s.
        let w = p.after(10 << 20);
        assert!(
            w > Duration::from_millis(80) && w <= Duration::from_millis(100),
            "{w:?}"
        );
        // After a long idle time the count starts afresh rather than allowing a burst.
        p.since -= Duration::from_secs(10);
        let w = p.after(10 << 20);
        assert!(w > Duration::from_millis(80), "{w:?}");
    }
}
