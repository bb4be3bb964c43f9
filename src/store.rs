//! The content store: immutable blobs on disk named by SHA-256, plus the one sled database.
//!
//! Owns every file under `data_dir/blobs` and `data_dir/tmp`, and every sled call in the crate
//! (other modules persist their state through the narrow [`Kv`] interface, so the engine could
//! change in this one file). A blob becomes visible only after its bytes were written to a temp
//! file, hashed while written, fsynced, checked against the expected digest, renamed into
//! place and the directory fsynced: a crash at any point never leaves a visible blob whose
//! bytes do not match its name. This module must never talk to the network or decide what is
//! in a catalog; it stores and reads bytes and records.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// Size of the blocks a [`BlobWriter`] fills before handing them to its hashing and writing
/// stages.
const WRITE_BUFFER: usize = 1 << 20;

/// How many blocks each stage of a [`BlobWriter`] may have queued.
const PIPELINE_DEPTH: usize = 4;

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
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
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
}

/// The blob store and database of one role's data directory. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    blobs_dir: PathBuf,
    tmp_dir: PathBuf,
    db: sled::Db,
    index: sled::Tree,
    /// The index in memory, so that the serving hot path never decodes a sled record.
    /// `persisted_access` is the last-access time last written to sled.
    memory: RwLock<HashMap<Digest, (BlobMeta, DateTime<Utc>)>>,
    bytes: AtomicU64,
    /// How many responses are reading each blob now; eviction never removes those.
    readers: std::sync::Mutex<HashMap<Digest, usize>>,
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

impl Store {
    /// Opens (creating if needed) the store under `data_dir`, removes temp files a crash left
    /// behind, and reconciles the index with the blob files.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let blobs_dir = data_dir.join("blobs");
        let tmp_dir = data_dir.join("tmp");
        for dir in [data_dir, &blobs_dir, &tmp_dir] {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let removed = clean_dir(&tmp_dir)?;
        if removed > 0 {
            tracing::info!(removed, dir = %tmp_dir.display(), "removed temp files left by an earlier run");
        }
        let db = sled::Config::new()
            .path(data_dir.join("db"))
            .flush_every_ms(Some(500))
            .open()?;
        let index = db.open_tree("blobs")?;
        let store = Store {
            inner: Arc::new(Inner {
                blobs_dir,
                tmp_dir,
                db,
                index,
                memory: RwLock::new(HashMap::new()),
                bytes: AtomicU64::new(0),
                readers: std::sync::Mutex::new(HashMap::new()),
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
        for entry in self.inner.index.iter() {
            let (key, value) = entry?;
            let Ok(digest) = std::str::from_utf8(&key).unwrap_or("").parse::<Digest>() else {
                self.inner.index.remove(&key)?;
                continue;
            };
            let meta: BlobMeta = match serde_json::from_slice(&value) {
                Ok(m) => m,
                Err(_) => {
                    self.inner.index.remove(&key)?;
                    continue;
                }
            };
            let path = self.blob_path(&digest);
            match std::fs::metadata(&path) {
                Ok(md) if md.len() == meta.size => {
                    memory.insert(digest, (meta, meta.last_access));
                }
                _ => {
                    tracing::warn!(%digest, "index entry without a matching blob file; dropped");
                    self.inner.index.remove(&key)?;
                }
            }
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
        self.inner.index.flush()?;
        Ok(())
    }

    fn put_index(&self, digest: &Digest, meta: &BlobMeta) -> Result<(), StoreError> {
        let value = serde_json::to_vec(meta).map_err(|source| StoreError::Decode {
            key: digest.to_hex(),
            source,
        })?;
        self.inner.index.insert(digest.to_hex().as_bytes(), value)?;
        Ok(())
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
    /// as a long-lived cache entry needs (the evicting node drops the entry too).
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
        let path = self.blob_path(digest);
        let loaded = tokio::task::spawn_blocking(move || {
            load_blob(&path, meta.size, read_max, hold.then_some(guard))
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?;
        match loaded {
            Ok(bytes) => Ok(Some(OpenBlob { bytes, meta })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::error!(%digest, "indexed blob file is missing; dropping the entry");
                self.forget(digest)?;
                Ok(None)
            }
            Err(e) => Err(io(format!("opening blob {digest}"))(e)),
        }
    }

    /// Marks a blob as read now (the eviction order), for a read served without the store,
    /// such as from the hot-blob cache.
    pub fn mark_read(&self, digest: &Digest) -> Result<(), StoreError> {
        self.touch(digest).map(|_| ())
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
        self.inner.index.remove(digest.to_hex().as_bytes())?;
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
        self.inner.index.flush_async().await?;
        Ok(())
    }

    /// Starts writing a new blob into a temp file.
    pub async fn writer(&self) -> Result<BlobWriter, StoreError> {
        let name = format!(
            "{:016x}{:016x}.part",
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let tmp_path = self.inner.tmp_dir.join(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(io(format!("creating {}", tmp_path.display())))?;
        let on_disk = Arc::new(AtomicU64::new(0));
        Ok(BlobWriter {
            store: self.clone(),
            tmp_path,
            stages: Some(Stages::start(file, on_disk.clone())),
            buffer: Vec::with_capacity(WRITE_BUFFER),
            accepted: 0,
            on_disk,
        })
    }

    /// A named key-value tree for another module's records.
    pub fn kv(&self, name: &str) -> Result<Kv, StoreError> {
        Ok(Kv {
            tree: self.inner.db.open_tree(name)?,
            commit: Arc::new(GroupCommit::default()),
        })
    }

    /// Makes every database write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush_async().await?;
        Ok(())
    }
}

/// Removes every entry of `dir`; returns how many.
/// Reads (`size <= read_max`) or maps a blob file of `size` bytes.
fn load_blob(
    path: &Path,
    size: u64,
    read_max: u64,
    guard: Option<ReadGuard>,
) -> std::io::Result<bytes::Bytes> {
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
        return Ok(bytes::Bytes::from(buf));
    }
    // Blob files are never written after they are renamed into place (see
    // `Store::open_blob`): the contract of `zerocopy::map`.
    let hold = guard.map(|g| Box::new(g) as Box<dyn Send>);
    let zero_copy = crate::zerocopy::sendfile_pays(size);
    crate::zerocopy::map(std::sync::Arc::new(file), 0, size as usize, hold, zero_copy)
}

/// Starts writing `len` bytes at `offset` of `file` to the disk now, without waiting: the
/// disk then works while the next blocks are hashed, and the final fsync only waits for the
/// rest (without it, the whole blob reaches the disk at the fsync, after all the hashing).
/// Durability still comes from that fsync; this is only a head start, so failure is ignored.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the call; sync_file_range reads no memory.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
    }
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

fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("fsync of directory {}", dir.display())))
}

/// A blob being written. Dropped before [`BlobWriter::finish`], it removes its temp file.
///
/// Bytes flow through two stages that run side by side on blocking threads, each fed by its
/// own bounded queue of [`WRITE_BUFFER`]-sized blocks: one hashes, one writes (and starts the
/// block's writeback). Neither waits for the other block by block, so ingest runs at the speed
/// of the slower stage, not of their sum or of lock-step rounds; at most [`PIPELINE_DEPTH`]
/// blocks per stage are in flight, which bounds the memory one ingest holds.
pub struct BlobWriter {
    store: Store,
    tmp_path: PathBuf,
    /// The two stages; `None` once [`BlobWriter::finish`] took them.
    stages: Option<Stages>,
    buffer: Vec<u8>,
    /// Bytes handed to the stages so far.
    accepted: u64,
    /// Bytes the writing stage has put into the temp file.
    on_disk: Arc<AtomicU64>,
}

/// The hashing and writing stages of one [`BlobWriter`].
struct Stages {
    to_hash: tokio::sync::mpsc::Sender<bytes::Bytes>,
    to_write: tokio::sync::mpsc::Sender<bytes::Bytes>,
    hashing: tokio::task::JoinHandle<Sha256>,
    writing: tokio::task::JoinHandle<(std::fs::File, std::io::Result<()>)>,
}

impl Stages {
    fn start(file: std::fs::File, on_disk: Arc<AtomicU64>) -> Stages {
        let (to_hash, mut hash_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(PIPELINE_DEPTH);
        let (to_write, mut write_rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(PIPELINE_DEPTH);
        let hashing = tokio::task::spawn_blocking(move || {
            let mut hasher = Sha256::new();
            while let Some(block) = hash_rx.blocking_recv() {
                hasher.update(&block[..]);
            }
            hasher
        });
        let writing = tokio::task::spawn_blocking(move || {
            let mut file = file;
            let mut offset = 0u64;
            while let Some(block) = write_rx.blocking_recv() {
                if let Err(e) = file.write_all(&block[..]) {
                    // Dropping the queue makes the next send fail; `finish` reports this.
                    return (file, Err(e));
                }
                start_writeback(&file, offset, block.len() as u64);
                offset += block.len() as u64;
                on_disk.store(offset, Ordering::Release);
            }
            (file, Ok(()))
        });
        Stages {
            to_hash,
            to_write,
            hashing,
            writing,
        }
    }

    /// Closes both queues and waits for both stages to finish what they were given.
    async fn join(self) -> Result<(std::fs::File, std::io::Result<()>, Sha256), StoreError> {
        let Stages {
            to_hash,
            to_write,
            hashing,
            writing,
        } = self;
        drop(to_hash);
        drop(to_write);
        let (hashed, written) = tokio::join!(hashing, writing);
        let hasher = hashed.map_err(|e| StoreError::Join(e.to_string()))?;
        let (file, result) = written.map_err(|e| StoreError::Join(e.to_string()))?;
        Ok((file, result, hasher))
    }
}

impl BlobWriter {
    /// Appends bytes. They are hashed and written in large blocks off the async threads.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        self.buffer.extend_from_slice(chunk);
        if self.buffer.len() >= WRITE_BUFFER {
            self.drain().await?;
        }
        Ok(())
    }

    /// Bytes accepted so far.
    pub fn len(&self) -> u64 {
        self.accepted + self.buffer.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes already in the temp file (readers of the temp file may read this far).
    pub fn on_disk(&self) -> u64 {
        self.on_disk.load(Ordering::Acquire)
    }

    /// The temp file being written (readers may follow it while it grows).
    pub fn tmp_path(&self) -> &Path {
        &self.tmp_path
    }

    /// Hands the filled buffer to both stages, waiting only while a queue is full.
    async fn drain(&mut self) -> Result<(), StoreError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let Some(stages) = self.stages.as_ref() else {
            return Err(StoreError::Join("writer used after it finished".into()));
        };
        let block = bytes::Bytes::from(std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(WRITE_BUFFER),
        ));
        let len = block.len() as u64;
        let sent = stages.to_write.send(block.clone()).await.is_ok()
            && stages.to_hash.send(block).await.is_ok();
        if !sent {
            // A stage stopped early: only the writing stage can (a failed write); join both
            // to report its error.
            let stages = self
                .stages
                .take()
                .ok_or_else(|| StoreError::Join("writer used after it finished".into()))?;
            let (_, result, _) = stages.join().await?;
            result.map_err(io(format!("writing {}", self.tmp_path.display())))?;
            return Err(StoreError::Join("a write stage stopped".into()));
        }
        self.accepted += len;
        Ok(())
    }

    /// Finishes the blob: fsyncs it, checks it against `expected` (digest and size when
    /// given), renames it into place, fsyncs the directory and records it in the index.
    /// The same bytes stored before are simply found again.
    pub async fn finish(
        mut self,
        expected: Option<(&Digest, Option<u64>)>,
    ) -> Result<(Digest, BlobMeta), StoreError> {
        self.drain().await?;
        let Some(stages) = self.stages.take() else {
            return Err(StoreError::Join("writer used after it finished".into()));
        };
        let (file, written, hasher) = stages.join().await?;
        written.map_err(io(format!("writing {}", self.tmp_path.display())))?;
        let tmp = self.tmp_path.clone();
        let (digest, result) = tokio::task::spawn_blocking(move || {
            let r = file.sync_all();
            (Digest::from_hasher(hasher), r)
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?;
        result.map_err(io(format!("fsync of {}", tmp.display())))?;
        let size = self.accepted;
        if let Some((want, want_size)) = expected {
            if *want != digest {
                return Err(StoreError::DigestMismatch {
                    expected: *want,
                    actual: digest,
                });
            }
            if let Some(want_size) = want_size {
                if want_size != size {
                    return Err(StoreError::SizeMismatch {
                        expected: want_size,
                        actual: size,
                    });
                }
            }
        }
        if let Some(meta) = self.store.get(&digest) {
            // Already stored: the temp file is removed when `self` drops.
            return Ok((digest, meta));
        }
        let dest = self.store.blob_path(&digest);
        let store = self.store.clone();
        let tmp = self.tmp_path.clone();
        let dest2 = dest.clone();
        let store_root = self.store.inner.blobs_dir.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            let dir = dest2.parent().unwrap_or(Path::new("."));
            // The fan-out directories are made once; their parents need an fsync only then.
            let created = !dir.exists();
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            std::fs::rename(&tmp, &dest2)
                .map_err(io(format!("renaming into {}", dest2.display())))?;
            fsync_dir(dir)?;
            if created {
                let mut up = dir.parent();
                while let Some(d) = up {
                    fsync_dir(d)?;
                    if d == store_root.as_path() {
                        break;
                    }
                    up = d.parent();
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))??;
        // The temp file is gone now; make Drop a no-op.
        self.tmp_path = PathBuf::new();
        let now = Utc::now();
        let meta = BlobMeta {
            size,
            stored_at: now,
            last_access: now,
        };
        // The blob is durable now (file and directory fsynced). Its index entry is flushed by
        // sled in the background: if a crash loses it, start-up indexes the file again
        // (`reconcile`), so no fsync of the index is needed on this path.
        store.put_index(&digest, &meta)?;
        if let Ok(mut g) = store.inner.memory.write() {
            if g.insert(digest, (meta, now)).is_none() {
                store.inner.bytes.fetch_add(size, Ordering::Relaxed);
            }
        }
        Ok((digest, meta))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if !self.tmp_path.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Decodes the JSON records of a sled iterator.
fn decode_all<T: DeserializeOwned>(iter: sled::Iter) -> Result<Vec<(String, T)>, StoreError> {
    let mut out = Vec::new();
    for entry in iter {
        let (k, v) = entry?;
        let key = String::from_utf8_lossy(&k).into_owned();
        let value = serde_json::from_slice(&v).map_err(|source| StoreError::Decode {
            key: key.clone(),
            source,
        })?;
        out.push((key, value));
    }
    Ok(out)
}

/// A named tree of JSON records: the narrow database interface the rest of the crate uses.
#[derive(Clone)]
pub struct Kv {
    tree: sled::Tree,
    /// Group commit: concurrent `flush` calls share one disk flush.
    commit: Arc<GroupCommit>,
}

/// Counts writes and flushes so that a flush that started after a write covers it.
#[derive(Default)]
struct GroupCommit {
    /// Bumped by every `flush` call before it waits (its write is done by then).
    requested: AtomicU64,
    /// The highest request number a finished flush covers.
    flushed: AtomicU64,
    lock: tokio::sync::Mutex<()>,
}

impl Kv {
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.tree.get(key.as_bytes())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| StoreError::Decode {
                    key: key.to_string(),
                    source,
                }),
        }
    }

    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Decode {
            key: key.to_string(),
            source,
        })?;
        self.tree.insert(key.as_bytes(), bytes)?;
        Ok(())
    }

    /// Stores `value` only if `key` is absent; returns whether it stored it.
    pub fn put_if_absent<T: Serialize>(&self, key: &str, value: &T) -> Result<bool, StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Decode {
            key: key.to_string(),
            source,
        })?;
        Ok(self
            .tree
            .compare_and_swap(key.as_bytes(), None as Option<&[u8]>, Some(bytes))?
            .is_ok())
    }

    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.tree.remove(key.as_bytes())?;
        Ok(())
    }

    /// Removes a record and returns it, atomically (None when it was not there).
    pub fn take<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.tree.remove(key.as_bytes())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| StoreError::Decode {
                    key: key.to_string(),
                    source,
                }),
        }
    }

    /// Every record whose key starts with `prefix`, in key order.
    pub fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(String, T)>, StoreError> {
        decode_all(self.tree.scan_prefix(prefix.as_bytes()))
    }

    /// Visits the records whose key is `from` or after it, in key order, one at a time,
    /// until `visit` returns false: a page of a large tree never loads the rest of it.
    pub fn visit_from<T: DeserializeOwned>(
        &self,
        from: &str,
        mut visit: impl FnMut(String, T) -> bool,
    ) -> Result<(), StoreError> {
        for entry in self.tree.range(from.as_bytes()..) {
            let (k, v) = entry?;
            let key = String::from_utf8_lossy(&k).into_owned();
            let value = serde_json::from_slice(&v).map_err(|source| StoreError::Decode {
                key: key.clone(),
                source,
            })?;
            if !visit(key, value) {
                break;
            }
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Makes this tree's writes so far durable before the caller acknowledges them.
    /// Concurrent callers share flushes: one that waited while another flushed after its
    /// write returns without flushing again (group commit).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let mine = self.commit.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _turn = self.commit.lock.lock().await;
        if self.commit.flushed.load(Ordering::SeqCst) >= mine {
            return Ok(());
        }
        // Every request numbered up to here wrote before asking: this flush covers them all.
        let covers = self.commit.requested.load(Ordering::SeqCst);
        self.tree.flush_async().await?;
        self.commit.flushed.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn ingest(
        store: &Store,
        bytes: &[u8],
        expected: Option<&Digest>,
    ) -> Result<Digest, StoreError> {
        let mut w = store.writer().await?;
        for chunk in bytes.chunks(7000) {
            w.write(chunk).await?;
        }
        w.finish(expected.map(|d| (d, Some(bytes.len() as u64))))
            .await
            .map(|(d, _)| d)
    }

    fn tmp_entries(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("tmp")).unwrap().count()
    }

    #[tokio::test]
    async fn stores_under_two_level_fanout_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let d = ingest(&store, &data, Some(&Digest::of(&data)))
            .await
            .unwrap();
        let hex = d.to_hex();
        let path = dir
            .path()
            .join("blobs")
            .join(&hex[..2])
            .join(&hex[2..4])
            .join(&hex);
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(store.get(&d).unwrap().size, data.len() as u64);
        assert_eq!(store.total_bytes(), data.len() as u64);
        assert_eq!(tmp_entries(dir.path()), 0);
    }

    #[tokio::test]
    async fn digest_mismatch_is_rejected_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let wrong = Digest::of(b"something else");
        let err = ingest(&store, b"the real bytes", Some(&wrong))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&Digest::of(b"the real bytes")));
        assert!(!store.contains(&wrong));
        assert_eq!(tmp_entries(dir.path()), 0);
        assert!(scan_blob_files(&dir.path().join("blobs"))
            .unwrap()
            .is_empty());
        assert_eq!(store.total_bytes(), 0);
    }

    #[tokio::test]
    async fn dropped_writer_removes_its_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.writer().await.unwrap();
        w.write(&[1u8; 3 << 20]).await.unwrap();
        assert_eq!(tmp_entries(dir.path()), 1);
        drop(w);
        assert_eq!(tmp_entries(dir.path()), 0);
    }

    #[tokio::test]
    async fn on_disk_follows_the_writing_stage() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut w = store.writer().await.unwrap();
        w.write(&[7u8; 3 << 20]).await.unwrap();
        assert_eq!(w.len(), 3 << 20);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while w.on_disk() < 3 << 20 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(w.on_disk(), 3 << 20);
        let on_file = std::fs::metadata(w.tmp_path()).unwrap().len();
        assert_eq!(on_file, 3 << 20);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_failed_write_is_reported_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // A writer whose writing stage writes to /dev/full: every write fails with ENOSPC.
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let tmp_path = dir.path().join("tmp").join("full.part");
        std::fs::write(&tmp_path, b"").unwrap();
        let on_disk = Arc::new(AtomicU64::new(0));
        let mut w = BlobWriter {
            store: store.clone(),
            tmp_path,
            stages: Some(Stages::start(full, on_disk.clone())),
            buffer: Vec::new(),
            accepted: 0,
            on_disk,
        };
        // The queues hold a few blocks, so the failure shows in a later write or in finish.
        let mut result = Ok(());
        for _ in 0..16 {
            result = w.write(&[1u8; 1 << 20]).await;
            if result.is_err() {
                break;
            }
        }
        let err = match result {
            Err(e) => {
                drop(w);
                e
            }
            Ok(()) => w.finish(None).await.unwrap_err(),
        };
        assert!(
            err.to_string().contains("No space left"),
            "the error names the cause: {err}"
        );
        assert_eq!(tmp_entries(dir.path()), 0);
        assert_eq!(store.total_bytes(), 0);
    }

    #[tokio::test]
    async fn crash_leftovers_are_cleaned_and_index_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let d = {
            let store = Store::open(dir.path()).unwrap();
            let d = ingest(&store, b"persisted blob", None).await.unwrap();
            store.kv("meta").unwrap().put("answer", &42u32).unwrap();
            store.flush().await.unwrap();
            // A crash mid-write leaves a temp file behind (a killed process runs no Drop).
            std::fs::write(dir.path().join("tmp").join("0123.part"), b"half written").unwrap();
            d
        };
        assert_eq!(tmp_entries(dir.path()), 1);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(tmp_entries(dir.path()), 0);
        let meta = store.get(&d).unwrap();
        assert_eq!(meta.size, b"persisted blob".len() as u64);
        let v: Option<u32> = store.kv("meta").unwrap().get("answer").unwrap();
        assert_eq!(v, Some(42));
        // Small: read into memory; nothing stays in use once read.
        let read = store.open_blob(&d, 1 << 20, true).await.unwrap().unwrap();
        assert_eq!(&read.bytes[..], b"persisted blob");
        assert!(store.in_use().is_empty());
        // Large (here: anything over 0 bytes): mapped, in use while any slice of it lives.
        let mapped = store.open_blob(&d, 0, true).await.unwrap().unwrap();
        assert_eq!(&mapped.bytes[..], b"persisted blob");
        let tail = mapped.bytes.slice(10..);
        drop(mapped);
        assert!(store.in_use().contains(&d), "a mapped blob is in use");
        assert_eq!(&tail[..], b"blob");
        drop(tail);
        assert!(store.in_use().is_empty());
        // Mapped without holding it (a cache entry): readable, not in use.
        let unheld = store.open_blob(&d, 0, false).await.unwrap().unwrap();
        assert_eq!(&unheld.bytes[..], b"persisted blob");
        assert!(store.in_use().is_empty());
    }

    #[tokio::test]
    async fn a_blob_renamed_before_indexing_is_indexed_and_a_lost_file_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, lost) = {
            let store = Store::open(dir.path()).unwrap();
            let kept = ingest(&store, b"kept", None).await.unwrap();
            let lost = ingest(&store, b"lost", None).await.unwrap();
            store.flush().await.unwrap();
            // Simulate: the index entry for `kept` never made it, the file for `lost` is gone.
            store.inner.index.remove(kept.to_hex().as_bytes()).unwrap();
            std::fs::remove_file(store.blob_path(&lost)).unwrap();
            store.flush().await.unwrap();
            (kept, lost)
        };
        let store = Store::open(dir.path()).unwrap();
        assert!(store.contains(&kept));
        assert!(!store.contains(&lost));
        assert_eq!(store.total_bytes(), 4);
    }

    #[tokio::test]
    async fn same_bytes_twice_are_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = ingest(&store, b"same", None).await.unwrap();
        let b = ingest(&store, b"same", None).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(store.list().len(), 1);
        assert_eq!(store.total_bytes(), 4);
        store.remove(&a).await.unwrap();
        assert_eq!(store.total_bytes(), 0);
        assert!(!store.blob_path(&a).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_flushes_all_complete_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let kv = store.kv("q").unwrap();
            let mut tasks = Vec::new();
            for i in 0..200u32 {
                let kv = kv.clone();
                tasks.push(tokio::spawn(async move {
                    kv.put(&format!("{i:04}"), &i).unwrap();
                    kv.flush().await.unwrap();
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.kv("q").unwrap().scan::<u32>("").unwrap().len(), 200);
    }

    #[tokio::test]
    async fn kv_put_if_absent_and_scan() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let kv = store.kv("t").unwrap();
        assert!(kv.put_if_absent("a/1", &1u8).unwrap());
        assert!(!kv.put_if_absent("a/1", &2u8).unwrap());
        kv.put("a/2", &3u8).unwrap();
        kv.put("b/1", &4u8).unwrap();
        let got: Vec<(String, u8)> = kv.scan("a/").unwrap();
        assert_eq!(got, vec![("a/1".into(), 1), ("a/2".into(), 3)]);
    }
}
