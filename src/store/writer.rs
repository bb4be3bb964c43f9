//! Writing a blob: the temp file, the hashing and writing stages, and the move into place.
//!
//! Owns [`BlobWriter`]: bytes go to a temp file under `tmp/` while they are hashed, then the
//! file is fsynced, checked against the expected digest and size, renamed into `blobs/` and the
//! directory fsynced; only then does the index learn of it. A writer dropped before
//! [`BlobWriter::finish`] removes its temp file. It must never make a blob visible whose bytes
//! do not match its name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chrono::Utc;
use sha2::{Digest as _, Sha256};

use super::{fsync_dir, io, BlobMeta, Store, StoreError};
use crate::core::digest::Digest;

/// Size of the blocks a [`BlobWriter`] fills before handing them to its hashing and writing
/// stages.
const WRITE_BUFFER: usize = 1 << 20;

/// How many blocks each stage of a [`BlobWriter`] may have queued.
const PIPELINE_DEPTH: usize = 4;

/// A blob being written. Dropped before [`BlobWriter::finish`], it removes its temp file.
///
/// Bytes flow through two stages that run side by side on blocking threads, each fed by its
/// own bounded queue of [`WRITE_BUFFER`]-sized blocks: one hashes, one writes (and starts the
/// block's writeback). Neither waits for the other block by block, so ingest runs at the speed
/// of the slower stage, not of their sum or of lock-step rounds; at most [`PIPELINE_DEPTH`]
/// blocks per stage are in flight, which bounds the memory one ingest holds.
pub struct BlobWriter {
    pub(super) store: Store,
    pub(super) tmp_path: PathBuf,
    /// The two stages; `None` once [`BlobWriter::finish`] took them.
    pub(super) stages: Option<Stages>,
    pub(super) buffer: Vec<u8>,
    /// Bytes handed to the stages so far.
    pub(super) accepted: u64,
    /// Bytes the writing stage has put into the temp file.
    pub(super) on_disk: Arc<AtomicU64>,
}

/// The hashing and writing stages of one [`BlobWriter`].
pub(super) struct Stages {
    to_hash: tokio::sync::mpsc::Sender<bytes::Bytes>,
    to_write: tokio::sync::mpsc::Sender<bytes::Bytes>,
    hashing: tokio::task::JoinHandle<Sha256>,
    writing: tokio::task::JoinHandle<(std::fs::File, std::io::Result<()>)>,
}

impl Stages {
    pub(super) fn start(file: std::fs::File, on_disk: Arc<AtomicU64>) -> Stages {
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
                crate::sys::start_writeback(&file, offset, block.len() as u64);
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

impl Store {
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
            .map_err(|e| self.failed(io(format!("creating {}", tmp_path.display()))(e)))?;
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
}

impl BlobWriter {
    /// Appends bytes. They are hashed and written in large blocks off the async threads.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        self.buffer.extend_from_slice(chunk);
        if self.buffer.len() >= WRITE_BUFFER {
            if let Err(e) = self.drain().await {
                return Err(self.store.failed(e));
            }
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
        self,
        expected: Option<(&Digest, Option<u64>)>,
    ) -> Result<(Digest, BlobMeta), StoreError> {
        let store = self.store.clone();
        self.complete(expected).await.map_err(|e| store.failed(e))
    }

    async fn complete(
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
            verified_at: None,
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
