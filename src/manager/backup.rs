//! Backup and restore of the manager: `GET /v1/admin/backup` and `gup manager restore`.
//!
//! Owns taking a consistent snapshot of a serving manager and streaming it as a backup file
//! (the format is `core::backup`'s), and building a new data dir from one.
//!
//! **The snapshot.** The database records are exported as `store::export` describes: every
//! write is recorded while the trees are read, and the snapshot is the moment recording
//! stops, which is taken under the publish lock. No publish, unpublish or collection is half
//! done then (each holds that lock from its blob becoming visible until the catalog is
//! persisted), so the catalog captured at that moment, `catalog.json`, is the one the
//! manager serves, and each blob it names is stored; each is held (`Store::hold`) before the
//! lock is released, so the collection cannot remove one while it streams. A publish during
//! the backup therefore lands either before the snapshot (its revision and blob are in it)
//! or after (neither is): never a catalog naming a blob the backup lacks. Everything else
//! (settings, registry, events, notifications, applications, enrolment, node table, slots)
//! is in the records as of the same moment, each atomic batch whole or absent, so an event
//! that got its 202 before the backup began is in it. The signing key and the tokens the
//! data dir keeps are copied as files: the backup file is a secret.
//!
//! **Streaming.** The records go to an unlinked scratch file first (local disk, fast), so
//! the recording lasts as long as reading the database takes, not as long as the client
//! takes to download; then the archive streams through a bounded channel from a blocking
//! thread, one 256 KiB chunk at a time: a 1 GiB blob never sits in memory. An archive that
//! cannot be finished (a blob rotten on disk, a read error) ends the response with an error,
//! so the client sees a cut stream, never a short file that looks whole.
//!
//! **Restore.** The file is read twice: first whole, checking every entry against its
//! manifest line and keeping the small entries (the catalog, the files), before anything is
//! written; then the records are imported, the catalog put, the files made (0600), and the
//! blobs written through the store's writer, which checks each against its digest again.
//! The dir stays marked unfinished until the end (a start refuses it), and a restore that
//! fails removes what it wrote. It must never write into a dir that holds anything.

use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::Manager;
use crate::core::backup::{
    self, ArchiveWriter, BackupError, EntryName, Hashing, Manifest, BACKUP_FORMAT, BLOBS, FILES,
    FILES_DIR,
};
use crate::core::catalog::CatalogHistory;
use crate::core::digest::Digest;
use crate::core::fault::{Fault, Internal, Kind};
use crate::http::error::ApiError;
use crate::http::extract::Query;
use crate::store::{ReadGuard, Store, StoreError, FORMAT};

/// The tree of the catalog history: `catalog.json` in a backup, not among its records.
pub const CATALOG_TREE: &str = "catalog";

/// The delta engine's records, left out of a backup: they are cache, and the edge deltas they
/// name are not in it (the deltas the catalog lists are, with the catalog's blobs).
const DELTAS_TREE: &str = crate::serve::delta::TREE;

/// Bytes per chunk of the streamed archive.
const CHUNK: usize = 256 << 10;
/// Chunks queued for the client at most.
const QUEUED_CHUNKS: usize = 4;
/// The largest `catalog.json` a restore reads: a little over what a sync snapshot may hold.
const MAX_CATALOG_BYTES: u64 = 80 << 20;
/// The largest data dir file (key or token) a restore reads.
const MAX_FILE_BYTES: u64 = 64 << 10;

/// Why a backup could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum BackupFailure {
    #[error("query parameter `content` must be true or false, got {0:?}")]
    BadContent(String),
    #[error("blob {0} of the catalog is not stored (the scrub may have found it rotten): publish it again, or back up without content")]
    MissingBlob(Digest),
    #[error("reading {path}: {source}")]
    File {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing the records: {0}")]
    Scratch(std::io::Error),
}

impl Fault for BackupFailure {
    fn kind(&self) -> Kind {
        match self {
            BackupFailure::BadContent(_) => Kind::BadInput,
            BackupFailure::MissingBlob(_) => Kind::Conflict,
            BackupFailure::File { .. } | BackupFailure::Scratch(_) => Kind::Local,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            BackupFailure::BadContent(_) => "bad_request",
            BackupFailure::MissingBlob(_) => "blob_missing",
            BackupFailure::File { .. } | BackupFailure::Scratch(_) => "storage",
        }
    }
}

#[derive(Deserialize)]
pub struct BackupQuery {
    content: Option<String>,
}

/// Everything the archive is written from, captured at the snapshot.
struct Captured {
    created_at: DateTime<Utc>,
    records: std::fs::File,
    records_len: u64,
    record_count: u64,
    catalog_json: Vec<u8>,
    catalog_revision: u64,
    files: Vec<(&'static str, Vec<u8>)>,
    /// The blobs of the catalog, held until each is streamed (empty without content).
    blobs: Vec<(Digest, ReadGuard)>,
    with_content: bool,
}

/// `GET /v1/admin/backup[?content=true]`: the backup file, streamed.
pub async fn backup(
    State(m): State<Arc<Manager>>,
    Query(q): Query<BackupQuery>,
) -> Result<Response, ApiError> {
    let with_content = match q.content.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => return Err(BackupFailure::BadContent(other.to_string()).into()),
    };
    let captured = capture(&m, with_content).await?;
    tracing::info!(
        records = captured.record_count,
        revision = captured.catalog_revision,
        blobs = captured.blobs.len(),
        with_content,
        "backup: snapshot taken; streaming it"
    );
    let name = format!(
        "gup-manager-{}.tar",
        captured.created_at.format("%Y%m%dT%H%M%SZ")
    );
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(QUEUED_CHUNKS);
    let store = m.served.store.clone();
    tokio::task::spawn_blocking(move || {
        let out = ChannelWriter { tx: tx.clone() };
        match write_archive(&store, out, captured) {
            Ok(manifest) => tracing::info!(
                entries = manifest.entries.len(),
                bytes = manifest.total_bytes(),
                "backup: streamed"
            ),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                tracing::warn!("backup: the client went away before the end")
            }
            Err(e) => {
                tracing::error!(error = %e, "backup: cut short");
                let _ = tx.blocking_send(Err(e));
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_string()),
            (header::CACHE_CONTROL, "no-store".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

fn joined(e: tokio::task::JoinError) -> ApiError {
    Internal(format!("a backup task failed: {e}")).into()
}

/// Exports the records and captures the snapshot (see the module doc).
async fn capture(m: &Arc<Manager>, with_content: bool) -> Result<Captured, ApiError> {
    let store = m.served.store.clone();
    let created_at = Utc::now();
    let export = store.begin_export()?;
    let scratch = store.scratch_file()?;
    let (export, out, first) = tokio::task::spawn_blocking(move || {
        let mut out = BufWriter::with_capacity(CHUNK, scratch);
        let n = export.write_records(&mut out, &[CATALOG_TREE, DELTAS_TREE]);
        (export, out, n)
    })
    .await
    .map_err(joined)?;
    let first = first?;
    let (recorded, history, blobs) = {
        let _guard = m.publish_lock.lock().await;
        let recorded = export.stop()?;
        let history: CatalogHistory = m.served.catalog()?.clone();
        let mut blobs = Vec::new();
        if with_content {
            for d in history.digests() {
                let held = store.hold(&d).ok_or(BackupFailure::MissingBlob(d))?;
                blobs.push((d, held));
            }
        }
        (recorded, history, blobs)
    };
    let (records, records_len, record_count) = tokio::task::spawn_blocking(move || {
        let mut out = out;
        let journal = recorded.write(&mut out, &[CATALOG_TREE, DELTAS_TREE])?;
        let mut file = out
            .into_inner()
            .map_err(|e| BackupFailure::Scratch(e.into_error()))?;
        file.flush().map_err(BackupFailure::Scratch)?;
        let len = file
            .stream_position()
            .and_then(|len| file.rewind().map(|()| len))
            .map_err(BackupFailure::Scratch)?;
        Ok::<_, ApiError>((file, len, first + journal))
    })
    .await
    .map_err(joined)??;
    let mut files = Vec::new();
    for name in FILES {
        let path = store.data_dir().join(name);
        match std::fs::read(&path) {
            Ok(bytes) => files.push((*name, bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(BackupFailure::File {
                    path: path.display().to_string(),
                    source,
                }
                .into())
            }
        }
    }
    let catalog_json =
        serde_json::to_vec(&history).map_err(|e| Internal(format!("encoding the catalog: {e}")))?;
    Ok(Captured {
        created_at,
        records,
        records_len,
        record_count,
        catalog_json,
        catalog_revision: history.revision(),
        files,
        blobs,
        with_content,
    })
}

/// Writes the archive of `c` to `out` (blocking).
fn write_archive(store: &Store, out: ChannelWriter, c: Captured) -> std::io::Result<Manifest> {
    let mut w = ArchiveWriter::new(BufWriter::with_capacity(CHUNK, out), c.created_at);
    w.append(backup::RECORDS, c.records_len, BufReader::new(c.records))?;
    w.append_bytes(backup::CATALOG, &c.catalog_json)?;
    for (name, bytes) in &c.files {
        w.append_bytes(&format!("{FILES_DIR}{name}"), bytes)?;
    }
    for (digest, held) in c.blobs {
        let (file, size) = store.blob_file(&digest).map_err(std::io::Error::other)?;
        let got = w.append(&format!("{BLOBS}{digest}"), size, BufReader::new(file))?;
        if got != digest {
            return Err(std::io::Error::other(format!(
                "blob {digest} on disk has bytes whose SHA-256 is {got}: the scrub will quarantine it"
            )));
        }
        drop(held);
    }
    let manifest = Manifest {
        format: BACKUP_FORMAT,
        role: "manager".to_string(),
        gup_version: env!("CARGO_PKG_VERSION").to_string(),
        store_format: FORMAT,
        created_at: c.created_at,
        with_content: c.with_content,
        catalog_revision: c.catalog_revision,
        records: c.record_count,
        entries: Vec::new(),
    };
    let (out, manifest) = w.finish(manifest)?;
    let mut out = out.into_inner().map_err(|e| e.into_error())?;
    out.flush()?;
    Ok(manifest)
}

/// Hands what is written to the response, a chunk at a time, waiting while the client is
/// behind; a client that went away is a broken pipe.
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away")
            })?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// === impl restore ===

/// Why a restore did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Backup {
        path: String,
        #[source]
        source: BackupError,
    },
    #[error("{path} is a backup of a {role}, not of a manager")]
    Role { path: String, role: String },
    #[error("{path} was made by gup {version} with data dir format {found}; this gup ({}) reads formats up to {FORMAT}: restore it with a newer gup", env!("CARGO_PKG_VERSION"))]
    TooNew {
        path: String,
        version: String,
        found: u32,
    },
    #[error("{path}: {what}")]
    Content { path: String, what: String },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl RestoreError {
    /// Whether the operator gave something unusable (a dir that is not empty, a file that is
    /// not a good backup), as opposed to the restore failing while it wrote.
    pub fn is_bad_input(&self) -> bool {
        match self {
            RestoreError::Store(e) => e.is_refusal(),
            RestoreError::Write { .. } => false,
            _ => true,
        }
    }
}

/// What a restore wrote.
#[derive(Debug)]
pub struct Restored {
    pub manifest: Manifest,
    /// Record lines imported.
    pub records: u64,
    pub blobs: usize,
}

/// What the first read keeps: the catalog and the data dir files.
struct Kept {
    catalog: CatalogHistory,
    files: Vec<(&'static str, Vec<u8>)>,
}

/// Builds a new manager data dir at `data_dir` (absent or empty) from the backup `file`.
pub async fn restore(file: &Path, data_dir: &Path) -> Result<Restored, RestoreError> {
    let path = file.display().to_string();
    // The dir first: a wrong one is told before a large file is read.
    refuse_non_empty(data_dir)?;
    let (manifest, kept) = first_read(file)?;
    if manifest.role != "manager" {
        return Err(RestoreError::Role {
            path,
            role: manifest.role,
        });
    }
    if manifest.store_format > FORMAT {
        return Err(RestoreError::TooNew {
            path,
            version: manifest.gup_version,
            found: manifest.store_format,
        });
    }
    if manifest.with_content {
        let blobs: std::collections::HashSet<Digest> = manifest.blobs().map(|(d, _)| d).collect();
        if let Some(d) = kept
            .catalog
            .digests()
            .into_iter()
            .find(|d| !blobs.contains(d))
        {
            return Err(RestoreError::Content {
                path,
                what: format!("the catalog names blob {d}, which is not in the backup"),
            });
        }
    }
    let existed = data_dir.exists();
    let store = Store::create_for_restore(data_dir, manifest.store_format)?;
    let written = second_read(&store, file, &manifest, kept).await;
    let done = match written {
        Ok(r) => store
            .restored()
            .await
            .map(|()| r)
            .map_err(RestoreError::from),
        Err(e) => Err(e),
    };
    drop(store);
    if done.is_err() {
        remove_written(data_dir, existed);
    }
    done
}

fn refuse_non_empty(data_dir: &Path) -> Result<(), RestoreError> {
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => match entries.next() {
            None => Ok(()),
            Some(_) => Err(StoreError::NotEmpty {
                dir: data_dir.display().to_string(),
            }
            .into()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(RestoreError::Open {
            path: data_dir.display().to_string(),
            source,
        }),
    }
}

/// Removes what a failed restore wrote: the dir's contents (it was empty), and the dir
/// itself when the restore made it.
fn remove_written(data_dir: &Path, existed: bool) {
    if !existed {
        let _ = std::fs::remove_dir_all(data_dir);
        return;
    }
    if let Ok(entries) = std::fs::read_dir(data_dir) {
        for e in entries.flatten() {
            let p = e.path();
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
        }
    }
}

fn open(file: &Path) -> Result<BufReader<std::fs::File>, RestoreError> {
    std::fs::File::open(file)
        .map(|f| BufReader::with_capacity(1 << 20, f))
        .map_err(|source| RestoreError::Open {
            path: file.display().to_string(),
            source,
        })
}

/// Verifies the whole file against its manifest and keeps its small entries.
fn first_read(file: &Path) -> Result<(Manifest, Kept), RestoreError> {
    let path = file.display().to_string();
    let bad = |source: BackupError| RestoreError::Backup {
        path: path.clone(),
        source,
    };
    let manifest = backup::verify(open(file)?).map_err(bad)?;
    // The small entries, read again now that they are known good (a catalog of up to
    // tens of MiB; keys and tokens of bytes).
    let mut catalog = None;
    let mut files = Vec::new();
    let mut archive = tar::Archive::new(open(file)?);
    let entries = archive
        .entries()
        .map_err(|e| bad(BackupError::Damaged(e.to_string())))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(BackupError::Damaged(e.to_string())))?;
        let kind = EntryName::parse(&backup::entry_name(&entry).map_err(bad)?).map_err(bad)?;
        let limit = match kind {
            EntryName::Catalog => MAX_CATALOG_BYTES,
            EntryName::File(_) => MAX_FILE_BYTES,
            _ => continue,
        };
        if entry.size() > limit {
            return Err(RestoreError::Content {
                path,
                what: format!(
                    "an entry of {} bytes, over its bound of {limit}",
                    entry.size()
                ),
            });
        }
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| bad(BackupError::Io(e)))?;
        match kind {
            EntryName::Catalog => {
                let history: CatalogHistory =
                    serde_json::from_slice(&bytes).map_err(|e| RestoreError::Content {
                        path: path.clone(),
                        what: format!("{}: {e}", backup::CATALOG),
                    })?;
                catalog = Some(history);
            }
            EntryName::File(name) => files.push((name, bytes)),
            _ => {}
        }
    }
    let catalog = catalog.ok_or_else(|| bad(BackupError::Damaged("no catalog".into())))?;
    Ok((manifest, Kept { catalog, files }))
}

/// Writes the records, the catalog, the files and the blobs into the new store.
async fn second_read(
    store: &Store,
    file: &Path,
    manifest: &Manifest,
    kept: Kept,
) -> Result<Restored, RestoreError> {
    let path = file.display().to_string();
    let changed = |what: String| RestoreError::Content {
        path: path.clone(),
        what: format!("{what} changed since it was verified"),
    };
    let mut archive = tar::Archive::new(open(file)?);
    let entries = archive
        .entries()
        .map_err(|e| changed(format!("the file ({e})")))?;
    let mut records = 0;
    let mut blobs = 0;
    for (i, entry) in entries.enumerate() {
        let entry = entry.map_err(|e| changed(format!("the file ({e})")))?;
        let name = backup::entry_name(&entry).map_err(|e| changed(e.to_string()))?;
        let listed = manifest.entries.get(i);
        match EntryName::parse(&name).map_err(|e| changed(e.to_string()))? {
            EntryName::Records => {
                let mut reader = Hashing::new(entry);
                records = store.import_records(BufReader::new(&mut reader))?;
                // What the import did not read (nothing, in a good file) counts too.
                std::io::copy(&mut reader, &mut std::io::sink())
                    .map_err(|e| changed(format!("{name} ({e})")))?;
                let (sha, _) = reader.finish();
                if listed.map(|l| l.sha256) != Some(sha) {
                    return Err(changed(name));
                }
            }
            EntryName::Blob(digest) => {
                write_blob(store, entry, &digest)
                    .await
                    .map_err(|e| match e {
                        BlobFailure::Read(e) => changed(format!("{name} ({e})")),
                        BlobFailure::Store(e) if e.is_mismatch() => changed(name.clone()),
                        BlobFailure::Store(e) => RestoreError::Store(e),
                    })?;
                blobs += 1;
            }
            EntryName::Catalog | EntryName::File(_) | EntryName::Manifest => {}
        }
    }
    store
        .kv(CATALOG_TREE)?
        .put(super::CATALOG_KEY, &kept.catalog)?;
    for (name, bytes) in kept.files {
        let target: PathBuf = store.data_dir().join(name);
        crate::core::secret_file::create_once(&target, &bytes).map_err(|source| {
            RestoreError::Write {
                path: target.display().to_string(),
                source,
            }
        })?;
    }
    Ok(Restored {
        manifest: manifest.clone(),
        records,
        blobs,
    })
}

enum BlobFailure {
    Read(std::io::Error),
    Store(StoreError),
}

/// Streams one blob entry through the store's writer, checked against its name.
async fn write_blob(
    store: &Store,
    mut entry: impl Read,
    digest: &Digest,
) -> Result<(), BlobFailure> {
    let mut writer = store.writer().await.map_err(BlobFailure::Store)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(BlobFailure::Read)?;
        if n == 0 {
            break;
        }
        writer.write(&buf[..n]).await.map_err(BlobFailure::Store)?;
    }
    writer
        .finish(Some((digest, None)))
        .await
        .map_err(BlobFailure::Store)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dir_with_anything_in_it_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(refuse_non_empty(dir.path()).is_ok());
        assert!(refuse_non_empty(&dir.path().join("new")).is_ok());
        std::fs::write(dir.path().join("x"), b"").unwrap();
        let e = refuse_non_empty(dir.path()).unwrap_err();
        assert!(e.is_bad_input());
        assert!(e.to_string().contains("not empty"), "{e}");
    }
}
