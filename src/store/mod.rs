//! The content store: immutable blobs on disk named by SHA-256, plus the one sled database.
//!
//! Owns every file under `data_dir/blobs` and `data_dir/tmp`, the data dir's `lock` (one
//! process at a time, its pid inside), its `format` file (the one version check of every
//! start, and the upgrade it runs: module `format`), the mark of a restore in progress, the
//! export and import of its records (`export`), and every sled call in the crate
//! (other modules persist their state through the narrow [`Kv`] interface, so the engine could
//! change in this one file). A blob becomes visible only after its bytes were written to a temp
//! file, hashed while written, fsynced, checked against the expected digest, renamed into
//! place and the directory fsynced: a crash at any point never leaves a visible blob whose
//! bytes do not match its name. This module must never talk to the network or decide what is
//! in a catalog; it stores and reads bytes and records.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::core::digest::Digest;
use crate::core::fault::{Fault, Kind};

mod db;
mod export;
pub mod format;
pub mod hot;
mod kv;
pub mod scrub;
#[cfg(test)]
mod tests;
mod writer;

pub use export::{Export, Recorded};
pub use format::FORMAT;
pub use kv::{Batch, Kv};
pub use writer::BlobWriter;

/// How stale a blob's persisted last-access time may get before a read writes it back.
const ACCESS_PERSIST_SECS: i64 = 60;

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("database: {0}")]
    Db(#[from] sled::Error),
    #[error("digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("record {key:?} is not valid: {source}")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("background task failed: {0}")]
    Join(String),
    #[error("the database is being reopened after a failed write")]
    Reopening,
    /// Another process (or another store of this one) has the data dir open.
    #[error("data dir {dir} is in use by another process{}: stop it, or give this one another --data-dir", match pid { Some(p) => format!(" (pid {p})"), None => String::new() })]
    InUse { dir: String, pid: Option<u32> },
    #[error(
        "trees {first:?} and {second:?} are of different databases: no atomic write spans them"
    )]
    Apart { first: String, second: String },
    /// The data dir was made or upgraded by a newer gup.
    #[error(
        "data dir {dir} has format {found}, but this gup ({}) reads formats up to {}: run the newer gup that wrote it, or restore a backup into a new dir",
        env!("CARGO_PKG_VERSION"),
        format::FORMAT
    )]
    TooNew { dir: String, found: u32 },
    #[error("{path} should hold the data dir's format number, but says {text:?}")]
    BadFormatFile { path: String, text: String },
    /// A restore into this dir did not finish (stopped, or the disk failed).
    #[error("data dir {dir} holds a restore that did not finish ({RESTORING} is there): empty the dir and run `gup manager restore` again")]
    Unfinished { dir: String },
    /// A restore must build a new data dir.
    #[error(
        "--data-dir {dir} is not empty: a restore builds a new data dir (give a new or empty one)"
    )]
    NotEmpty { dir: String },
    #[error("a backup of this data dir is already being taken: wait for it to finish")]
    ExportBusy,
    #[error("the database took more than {limit} bytes of writes while the backup read it; try again when it is quieter")]
    ExportOverrun { limit: u64 },
    #[error("records line {line}: {reason}")]
    BadRecord { line: u64, reason: String },
}

impl Fault for StoreError {
    /// A store error is always this server's own failure, never an upstream's. A disk that
    /// cannot take writes now is a wait (503 with a Retry-After): the store heals by itself
    /// once it can.
    fn kind(&self) -> Kind {
        match self {
            // Bytes that did not match what was asked for came from whoever sent them; the
            // store only noticed. Callers that fetched them say whose fault it was.
            StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. } => Kind::BadInput,
            e if e.is_disk_failure() => Kind::Unavailable { retry_after_s: 30 },
            StoreError::ExportBusy => Kind::Conflict,
            StoreError::ExportOverrun { .. } => Kind::Unavailable { retry_after_s: 60 },
            _ => Kind::Local,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            StoreError::DigestMismatch { .. } => "digest_mismatch",
            StoreError::SizeMismatch { .. } => "size_mismatch",
            e if e.is_disk_failure() => "storage_unavailable",
            StoreError::ExportBusy => "backup_running",
            StoreError::ExportOverrun { .. } => "backup_overrun",
            _ => "storage",
        }
    }
}

impl StoreError {
    /// Whether this is the disk refusing writes (full, read-only, failing) rather than a
    /// problem of one file or record.
    pub fn is_disk_failure(&self) -> bool {
        match self {
            StoreError::Io { source, .. } => is_disk_failure(source),
            StoreError::Db(sled::Error::Io(source)) => {
                is_disk_failure(source) || source.kind() == std::io::ErrorKind::StorageFull
            }
            StoreError::Reopening => true,
            _ => false,
        }
    }

    /// Whether the data dir cannot be used as it is by this process: another one has it, a
    /// newer gup wrote it, its format file is unreadable, a restore into it did not finish,
    /// or (for a restore) it is not empty. The operator must act: a usage error (exit 2),
    /// not a failure that a retry could cure.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            StoreError::InUse { .. }
                | StoreError::TooNew { .. }
                | StoreError::BadFormatFile { .. }
                | StoreError::Unfinished { .. }
                | StoreError::NotEmpty { .. }
        )
    }

    /// Whether the bytes given did not match what they should be (the sender's fault), as
    /// opposed to the store failing to keep them (this server's fault).
    pub fn is_mismatch(&self) -> bool {
        matches!(
            self,
            StoreError::DigestMismatch { .. } | StoreError::SizeMismatch { .. }
        )
    }
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// What the index knows of a stored blob.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobMeta {
    pub size: u64,
    pub stored_at: DateTime<Utc>,
    /// Last time a client read it; eviction picks the least recent first.
    pub last_access: DateTime<Utc>,
    /// Last time the scrub read it back and found it matching (None: not since it was
    /// stored, when it was verified as written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<DateTime<Utc>>,
}

/// The blob store and database of one role's data directory. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    /// The data dir's `lock` file, holding its flock for as long as the store lives: two
    /// processes on one data dir would clean each other's temp files and fight over sled's own
    /// lock, whose error says nothing of who holds it.
    _lock: std::fs::File,
    data_dir: PathBuf,
    blobs_dir: PathBuf,
    tmp_dir: PathBuf,
    /// Where the scrub moves rotten blobs (`scrub`).
    quarantine_dir: PathBuf,
    db: Arc<db::Database>,
    /// digest (hex) -> [`BlobMeta`].
    index: Kv,
    /// The index in memory, so that the serving hot path never decodes a sled record.
    /// `persisted_access` is the last-access time last written to sled.
    memory: RwLock<HashMap<Digest, (BlobMeta, DateTime<Utc>)>>,
    bytes: AtomicU64,
    /// How many responses are reading each blob now; eviction never removes those.
    readers: std::sync::Mutex<HashMap<Digest, usize>>,
    /// The held mappings of large blobs being served, by digest, with the `stored_at` of the
    /// copy mapped: a reader of a blob already mapped takes a slice of that mapping
    /// ([`crate::sys::zerocopy::map_shared`]). At most one entry per blob; entries whose
    /// mapping has ended are dropped at the next insert, so it is bounded by the blobs in
    /// use plus those ended since.
    mapped: std::sync::Mutex<HashMap<Digest, (DateTime<Utc>, crate::sys::zerocopy::Shared)>>,
}

/// A stored blob's bytes, ready to serve: read into memory when small, mapped when large.
/// While the bytes of a mapped blob (or any slice of them) live, the blob counts as in use.
pub struct OpenBlob {
    pub bytes: bytes::Bytes,
    pub meta: BlobMeta,
}

/// Marks a blob as being read; dropping it ends the read.
pub struct ReadGuard {
    store: Store,
    digest: Digest,
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        if let Ok(mut r) = self.store.inner.readers.lock() {
            if let Some(n) = r.get_mut(&self.digest) {
                *n -= 1;
                if *n == 0 {
                    r.remove(&self.digest);
                }
            }
        }
    }
}

/// How long opening waits for the data dir's lock held by a store of this process that is
/// still closing (as [`db`] waits for sled's).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes the flock of `data_dir/lock` and writes this process's id into it, waiting up to
/// [`LOCK_WAIT`]; [`StoreError::InUse`] names the holder's pid when its file says it.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::io::{Read, Seek, Write};
    let path = data_dir.join("lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io(format!("opening {}", path.display())))?;
    let started = std::time::Instant::now();
    loop {
        if crate::sys::try_lock_exclusive(&file)
            .map_err(io(format!("locking {}", path.display())))?
        {
            break;
        }
        if started.elapsed() >= LOCK_WAIT {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(StoreError::InUse {
                dir: data_dir.display().to_string(),
                pid: text.trim().parse().ok(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let written = file
        .set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()));
    written.map_err(io(format!("writing {}", path.display())))?;
    Ok(file)
}

/// The file a restore keeps in the data dir until it has finished: a start refuses the dir
/// while it is there.
pub const RESTORING: &str = "restore.incomplete";

/// A role's upgrade of its own records from an older data dir format (`from`) to
/// [`FORMAT`], run by [`Store::open_with`] before the new format is recorded. Each step must
/// be safe to run again (a crash before the format is written runs it again).
pub type Upgrade<'a> = &'a dyn Fn(&Store, u32) -> Result<(), StoreError>;

/// No records of a role to upgrade.
pub fn no_upgrade(_: &Store, _: u32) -> Result<(), StoreError> {
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the store under `data_dir`, as [`Store::open_with`] with
    /// no records of a role to upgrade.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_with(data_dir, &no_upgrade)
    }

    /// Opens (creating if needed) the store under `data_dir`: checks its format (refusing a
    /// newer one before sled touches it, [`StoreError::TooNew`]), removes temp files a crash
    /// left behind, reconciles the index with the blob files, and upgrades a dir of an older
    /// format in place (`upgrade`, then the new format recorded).
    pub fn open_with(data_dir: &Path, upgrade: Upgrade<'_>) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(io(format!("creating {}", data_dir.display())))?;
        // Before anything else is touched: temp files may be another process's.
        let lock = lock_data_dir(data_dir)?;
        if data_dir.join(RESTORING).exists() {
            return Err(StoreError::Unfinished {
                dir: data_dir.display().to_string(),
            });
        }
        let found = format::read(data_dir)?;
        format::check(data_dir, found)?;
        if found == format::Found::New {
            format::write(data_dir, FORMAT)?;
        }
        let store = Store::open_locked(data_dir, lock)?;
        if let format::Found::Format(from) = found {
            if from < FORMAT {
                tracing::info!(dir = %data_dir.display(), from, to = FORMAT, "upgrading the data dir");
                upgrade(&store, from)?;
                store.inner.db.flush_blocking()?;
                format::write(data_dir, FORMAT)?;
                tracing::info!(dir = %data_dir.display(), from, to = FORMAT, "upgraded the data dir");
            }
        }
        Ok(store)
    }

    /// Makes a new store under `data_dir` for a restore, which must be absent or an empty
    /// directory ([`StoreError::NotEmpty`]): the dir is marked unfinished ([`RESTORING`])
    /// until [`Store::restored`], and its format is recorded as `format`, the backup's (a
    /// dir of an older format is upgraded at its first start, as any other).
    pub fn create_for_restore(data_dir: &Path, format: u32) -> Result<Store, StoreError> {
        let not_empty = || StoreError::NotEmpty {
            dir: data_dir.display().to_string(),
        };
        match std::fs::read_dir(data_dir) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(not_empty());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return Err(not_empty()),
            Err(e) => return Err(io(format!("reading {}", data_dir.display()))(e)),
        }
        if format > FORMAT {
            return Err(StoreError::TooNew {
                dir: data_dir.display().to_string(),
                found: format,
            });
        }
        std::fs::create_dir_all(data_dir)
            .map_err(io(format!("creating {}", data_dir.display())))?;
        let lock = lock_data_dir(data_dir)?;
        let marker = data_dir.join(RESTORING);
        std::fs::File::create(&marker)
            .and_then(|f| f.sync_all())
            .map_err(io(format!("creating {}", marker.display())))?;
        fsync_dir(data_dir)?;
        format::write(data_dir, format)?;
        Store::open_locked(data_dir, lock)
    }

    /// Ends a restore begun by [`Store::create_for_restore`]: every record durable, then the
    /// unfinished mark removed.
    pub async fn restored(&self) -> Result<(), StoreError> {
        self.flush().await?;
        let marker = self.inner.data_dir.join(RESTORING);
        std::fs::remove_file(&marker).map_err(io(format!("removing {}", marker.display())))?;
        fsync_dir(&self.inner.data_dir)
    }

    /// The data dir this store is in.
    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    fn open_locked(data_dir: &Path, lock: std::fs::File) -> Result<Store, StoreError> {
        let blobs_dir = data_dir.join("blobs");
        let tmp_dir = data_dir.join("tmp");
        let db_dir = data_dir.join("db");
        for dir in [&blobs_dir, &tmp_dir] {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        // The database holds the registry, events and settings: readable by this user only.
        private_dir(&db_dir)?;
        let removed = clean_dir(&tmp_dir)?;
        if removed > 0 {
            tracing::info!(removed, dir = %tmp_dir.display(), "removed temp files left by an earlier run");
        }
        let db = Arc::new(db::Database::open(&db_dir, &tmp_dir)?);
        private_files(&db_dir)?;
        let index = Kv::new(db.clone(), "blobs");
        let store = Store {
            inner: Arc::new(Inner {
                _lock: lock,
                data_dir: data_dir.to_path_buf(),
                blobs_dir,
                tmp_dir,
                quarantine_dir: data_dir.join("quarantine"),
                db,
                index,
                memory: RwLock::new(HashMap::new()),
                bytes: AtomicU64::new(0),
                readers: std::sync::Mutex::new(HashMap::new()),
                mapped: std::sync::Mutex::new(HashMap::new()),
            }),
        };
        store.reconcile()?;
        Ok(store)
    }

    /// Loads the index into memory, drops entries whose file is gone, and indexes blob files
    /// that were renamed into place just before a crash (their name was verified before the
    /// rename, so they are good).
    fn reconcile(&self) -> Result<(), StoreError> {
        let mut memory = HashMap::new();
        let mut dropped = Vec::new();
        let mut entries: Vec<(String, serde_json::Value)> = Vec::new();
        self.inner.index.visit("", "", false, |k, v| {
            entries.push((k, v));
            true
        })?;
        for (key, value) in entries {
            let (Ok(digest), Ok(meta)) = (
                key.parse::<Digest>(),
                serde_json::from_value::<BlobMeta>(value),
            ) else {
                dropped.push(key);
                continue;
            };
            let path = self.blob_path(&digest);
            match std::fs::metadata(&path) {
                Ok(md) if md.len() == meta.size => {
                    memory.insert(digest, (meta, meta.last_access));
                }
                _ => {
                    tracing::warn!(%digest, "index entry without a matching blob file; dropped");
                    dropped.push(key);
                }
            }
        }
        for key in dropped {
            self.inner.index.remove(&key)?;
        }
        for (digest, size) in scan_blob_files(&self.inner.blobs_dir)? {
            if memory.contains_key(&digest) {
                continue;
            }
            let now = Utc::now();
            let meta = BlobMeta {
                size,
                stored_at: now,
                last_access: now,
                verified_at: None,
            };
            self.put_index(&digest, &meta)?;
            memory.insert(digest, (meta, now));
            tracing::info!(%digest, "indexed a blob file that was stored just before a crash");
        }
        let total = memory.values().map(|(m, _)| m.size).sum();
        self.inner.bytes.store(total, Ordering::Relaxed);
        if let Ok(mut guard) = self.inner.memory.write() {
            *guard = memory;
        }
        Ok(())
    }

    fn put_index(&self, digest: &Digest, meta: &BlobMeta) -> Result<(), StoreError> {
        self.inner.index.put(&digest.to_hex(), meta)
    }

    /// Where the blob named `digest` lives: `blobs/<byte0>/<byte1>/<hex>`.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.to_hex();
        self.inner
            .blobs_dir
            .join(&hex[0..2])
            .join(&hex[2..4])
            .join(hex)
    }

    /// The index entry of a stored blob.
    pub fn get(&self, digest: &Digest) -> Option<BlobMeta> {
        let guard = self.inner.memory.read().ok()?;
        guard.get(digest).map(|(m, _)| *m)
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.get(digest).is_some()
    }

    /// Total bytes of stored blobs.
    pub fn total_bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// Every stored blob with its index entry.
    pub fn list(&self) -> Vec<(Digest, BlobMeta)> {
        match self.inner.memory.read() {
            Ok(g) => g.iter().map(|(d, (m, _))| (*d, *m)).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Marks a stored blob as being read until the guard drops, so that neither the
    /// manager's collection nor a node's eviction removes it meanwhile (a backup holds the
    /// blobs of the catalog it captured this way). None when it is not stored.
    pub fn hold(&self, digest: &Digest) -> Option<ReadGuard> {
        let mut r = self.inner.readers.lock().ok()?;
        if !self.contains(digest) {
            return None;
        }
        *r.entry(*digest).or_insert(0) += 1;
        Some(ReadGuard {
            store: self.clone(),
            digest: *digest,
        })
    }

    /// Marks `digest` as in use before it is stored, until the guard drops: a blob this
    /// process is about to store and then record elsewhere (a computed delta) must not be
    /// collected or evicted in the moment between. Callers that choose what to remove list
    /// the blobs before they ask [`Store::in_use`], so a blob that became visible under a
    /// reservation is always seen in use.
    pub fn reserve(&self, digest: &Digest) -> Option<ReadGuard> {
        let mut r = self.inner.readers.lock().ok()?;
        *r.entry(*digest).or_insert(0) += 1;
        Some(ReadGuard {
            store: self.clone(),
            digest: *digest,
        })
    }

    /// A stored blob's file, opened for reading, with its size (checked against the
    /// index). Blocking.
    pub fn blob_file(&self, digest: &Digest) -> Result<(std::fs::File, u64), StoreError> {
        let meta = self.get(digest).ok_or_else(|| StoreError::Io {
            context: format!("blob {digest}"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not stored"),
        })?;
        let path = self.blob_path(digest);
        let file = std::fs::File::open(&path).map_err(io(format!("opening blob {digest}")))?;
        let len = file
            .metadata()
            .map_err(io(format!("reading blob {digest}")))?
            .len();
        if len != meta.size {
            return Err(StoreError::SizeMismatch {
                expected: meta.size,
                actual: len,
            });
        }
        Ok((file, len))
    }

    /// The whole of a stored blob mapped read-only (never copied into memory), held in use
    /// (safe from collection and eviction) while any slice of it lives; None when it is not
    /// stored. Blocking. What a delta is computed from: both versions as slices.
    pub fn map_blob(&self, digest: &Digest) -> Result<Option<bytes::Bytes>, StoreError> {
        let Some(guard) = self.hold(digest) else {
            return Ok(None);
        };
        let (file, len) = match self.blob_file(digest) {
            Ok(found) => found,
            Err(StoreError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let len = usize::try_from(len).map_err(|_| StoreError::SizeMismatch {
            expected: len,
            actual: usize::MAX as u64,
        })?;
        // Blob files are never written after they are renamed into place: the contract of
        // `zerocopy::map`.
        let hold: crate::sys::zerocopy::Hold = Box::new(guard);
        crate::sys::zerocopy::map(Arc::new(file), 0, len, Some(hold), false)
            .map(Some)
            .map_err(io(format!("mapping blob {digest}")))
    }

    /// A new temp file under `tmp/`, already unlinked: it is gone once the handle drops,
    /// even after a crash. Blocking.
    pub fn scratch_file(&self) -> Result<std::fs::File, StoreError> {
        let path = self.inner.tmp_dir.join(format!(
            "{:016x}{:016x}.scratch",
            rand::random::<u64>(),
            rand::random::<u64>()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| self.failed(io(format!("creating {}", path.display()))(e)))?;
        std::fs::remove_file(&path).map_err(io(format!("removing {}", path.display())))?;
        Ok(file)
    }

    /// The blobs some response is reading now.
    pub fn in_use(&self) -> std::collections::HashSet<Digest> {
        match self.inner.readers.lock() {
            Ok(r) => r.keys().copied().collect(),
            Err(_) => Default::default(),
        }
    }

    /// The bytes of a stored blob, or None when it is not stored. Blobs of at most
    /// `read_max` bytes are read into memory; larger ones are mapped, so that serving them
    /// copies nothing in user space and needs no thread hand-off per chunk.
    ///
    /// Mapping is sound here because a blob file is immutable once renamed into `blobs/`:
    /// nothing in gup writes or truncates it again, and eviction unlinks it, which leaves an
    /// existing mapping intact. (A disk read error under a mapping raises SIGBUS instead of
    /// an error; that is the price of not copying, the same one Varnish's file storage pays.)
    ///
    /// With `hold`, a mapping keeps the blob marked in use (safe from eviction) while any
    /// slice of it lives, as a response needs. Without, eviction may unlink the file while it
    /// is mapped; the bytes stay readable and the disk space returns when the mapping goes,
    /// as a long-lived cache entry needs (the evicting node drops the entry too). Held
    /// mappings are shared: a reader of a copy already mapped and held gets that mapping
    /// (`mapped`), so concurrent downloads of one blob fault its pages in once.
    pub async fn open_blob(
        &self,
        digest: &Digest,
        read_max: u64,
        hold: bool,
    ) -> Result<Option<OpenBlob>, StoreError> {
        let guard = {
            let Ok(mut r) = self.inner.readers.lock() else {
                return Err(StoreError::Join("reader lock poisoned".into()));
            };
            *r.entry(*digest).or_insert(0) += 1;
            ReadGuard {
                store: self.clone(),
                digest: *digest,
            }
        };
        let Some(meta) = self.touch(digest)? else {
            return Ok(None);
        };
        // A held mapping of this very copy already serving: one more slice of it (its own
        // guard keeps the blob in use; this one's is dropped).
        let share = hold && meta.size > read_max;
        if share {
            if let Some(bytes) = self.shared_mapping(digest, meta.stored_at) {
                return Ok(Some(OpenBlob { bytes, meta }));
            }
        }
        let path = self.blob_path(digest);
        let loaded = tokio::task::spawn_blocking(move || {
            load_blob(&path, meta.size, read_max, hold.then_some(guard))
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?;
        match loaded {
            Ok((bytes, shared)) => {
                if let (true, Some(shared)) = (share, shared) {
                    if let Ok(mut m) = self.inner.mapped.lock() {
                        m.retain(|_, (_, s)| s.is_live());
                        m.insert(*digest, (meta.stored_at, shared));
                    }
                }
                Ok(Some(OpenBlob { bytes, meta }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::error!(%digest, "indexed blob file is missing; dropping the entry");
                self.forget(digest)?;
                Ok(None)
            }
            Err(e) => Err(io(format!("opening blob {digest}"))(e)),
        }
    }

    /// The whole of the held mapping of `digest`'s copy stored at `stored_at`, while one lives.
    fn shared_mapping(&self, digest: &Digest, stored_at: DateTime<Utc>) -> Option<bytes::Bytes> {
        let m = self.inner.mapped.lock().ok()?;
        let (at, shared) = m.get(digest)?;
        (*at == stored_at).then(|| shared.bytes()).flatten()
    }

    /// Marks a blob as read now (the eviction order), for a read served without the store,
    /// such as from the hot-blob cache, and returns its index entry. None when the blob is no
    /// longer stored (evicted, collected, or quarantined by the scrub): a copy held elsewhere
    /// must not be served then, nor when the entry's `stored_at` is not the copy's. Failing
    /// to persist the time is logged, not returned: it costs nothing served.
    pub fn mark_read(&self, digest: &Digest) -> Option<BlobMeta> {
        match self.touch(digest) {
            Ok(meta) => meta,
            Err(e) => {
                tracing::debug!(%digest, error = %e, "could not persist a blob's read time");
                self.get(digest)
            }
        }
    }

    /// Records that the scrub found the blob matching at `at`.
    pub(crate) fn mark_verified(
        &self,
        digest: &Digest,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let Ok(mut guard) = self.inner.memory.write() else {
            return Ok(());
        };
        let Some((meta, _)) = guard.get_mut(digest) else {
            return Ok(());
        };
        meta.verified_at = Some(at);
        // Written under the lock: a blob forgotten meanwhile must not get its entry back.
        let meta = *meta;
        self.put_index(digest, &meta)
    }

    /// Marks a blob as read now; writes the time to sled at most once a minute per blob.
    fn touch(&self, digest: &Digest) -> Result<Option<BlobMeta>, StoreError> {
        let now = Utc::now();
        let persist = {
            let Ok(mut guard) = self.inner.memory.write() else {
                return Ok(None);
            };
            let Some((meta, persisted)) = guard.get_mut(digest) else {
                return Ok(None);
            };
            meta.last_access = now;
            if (now - *persisted).num_seconds() >= ACCESS_PERSIST_SECS {
                *persisted = now;
                Some(*meta)
            } else {
                None
            }
        };
        if let Some(meta) = persist {
            self.put_index(digest, &meta)?;
        }
        Ok(self.get(digest))
    }

    fn forget(&self, digest: &Digest) -> Result<Option<BlobMeta>, StoreError> {
        let removed = match self.inner.memory.write() {
            Ok(mut g) => g.remove(digest).map(|(m, _)| m),
            Err(_) => None,
        };
        if let Some(m) = removed {
            self.inner.bytes.fetch_sub(m.size, Ordering::Relaxed);
        }
        self.inner.index.remove(&digest.to_hex())?;
        Ok(removed)
    }

    /// Removes a blob from the index and the disk.
    pub async fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        self.forget(digest)?;
        match tokio::fs::remove_file(self.blob_path(digest)).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing blob {digest}"))(e)),
        }
        self.inner.index.flush().await
    }

    /// A named key-value tree for another module's records.
    pub fn kv(&self, name: &str) -> Result<Kv, StoreError> {
        // Opened now, so that a bad database shows at start-up rather than on first use.
        self.inner.db.tree(name)?;
        Ok(Kv::new(self.inner.db.clone(), name))
    }

    /// Makes every database write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush().await
    }

    /// Bytes the filesystem of this store still takes, when it can tell.
    pub fn free_bytes(&self) -> Option<u64> {
        crate::sys::free_bytes(&self.inner.tmp_dir).ok()
    }

    /// Whether the store can write now. When it could not, this tries (at most once a
    /// second) to reopen the database and prove that a record and a file can be written.
    pub fn writable(&self) -> bool {
        self.inner.db.heal_if_due()
    }

    /// Passes a failure of a blob write on, noting first when it was the disk refusing
    /// writes: then [`Store::writable`] says no until a probe write works again.
    pub(crate) fn failed(&self, e: StoreError) -> StoreError {
        if e.is_disk_failure() {
            self.inner.db.mark_broken();
        }
        e
    }
}

/// Makes `dir` (created if needed) accessible to this user only (0700).
fn private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io(format!("making {} private", dir.display())))
}

/// Makes the files directly in `dir` readable and writable by this user only (0600).
fn private_files(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    let entries = std::fs::read_dir(dir).map_err(io(format!("reading {}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_file() {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(io(format!("making {} private", path.display())))?;
        }
    }
    Ok(())
}

/// Whether an I/O error means the disk cannot take writes (full, read-only, failing), as
/// opposed to a problem with one file.
fn is_disk_failure(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EROFS) | Some(libc::EIO)
    )
}

/// A blob's bytes: read into memory up to `read_max` bytes, else mapped, with the handle
/// that shares the mapping.
fn load_blob(
    path: &Path,
    size: u64,
    read_max: u64,
    guard: Option<ReadGuard>,
) -> std::io::Result<(bytes::Bytes, Option<crate::sys::zerocopy::Shared>)> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let on_disk = file.metadata()?.len();
    if on_disk != size {
        return Err(std::io::Error::other(format!(
            "the blob file has {on_disk} bytes, the index says {size}"
        )));
    }
    if size <= read_max || size == 0 {
        let mut buf = Vec::with_capacity(size as usize);
        file.take(size).read_to_end(&mut buf)?;
        if buf.len() as u64 != size {
            return Err(std::io::Error::other("the blob file shrank while read"));
        }
        return Ok((bytes::Bytes::from(buf), None));
    }
    // Blob files are never written after they are renamed into place (see
    // `Store::open_blob`): the contract of `zerocopy::map`.
    let hold = guard.map(|g| Box::new(g) as crate::sys::zerocopy::Hold);
    let zero_copy = crate::sys::zerocopy::sendfile_pays(size);
    let (bytes, shared) = crate::sys::zerocopy::map_shared(
        std::sync::Arc::new(file),
        size as usize,
        hold,
        zero_copy,
    )?;
    Ok((bytes, Some(shared)))
}

fn clean_dir(dir: &Path) -> Result<usize, StoreError> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir).map_err(io(format!("reading {}", dir.display())))? {
        let entry = entry.map_err(io(format!("reading {}", dir.display())))?;
        let path = entry.path();
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(io(format!("removing {}", path.display())))?;
        removed += 1;
    }
    Ok(removed)
}

/// Every well-named blob file under the two-level fan-out, with its size.
fn scan_blob_files(blobs_dir: &Path) -> Result<Vec<(Digest, u64)>, StoreError> {
    let mut out = Vec::new();
    let read = |p: &Path| std::fs::read_dir(p).map_err(io(format!("reading {}", p.display())));
    for l1 in read(blobs_dir)? {
        let l1 = l1.map_err(io("reading blob fan-out"))?.path();
        if !l1.is_dir() {
            continue;
        }
        for l2 in read(&l1)? {
            let l2 = l2.map_err(io("reading blob fan-out"))?.path();
            if !l2.is_dir() {
                continue;
            }
            for f in read(&l2)? {
                let f = f.map_err(io("reading blob fan-out"))?;
                let name = f.file_name();
                let Some(digest) = name.to_str().and_then(|s| s.parse::<Digest>().ok()) else {
                    continue;
                };
                let len = f.metadata().map_err(io("reading blob metadata"))?.len();
                out.push((digest, len));
            }
        }
    }
    Ok(out)
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("fsync of directory {}", dir.display())))
}
