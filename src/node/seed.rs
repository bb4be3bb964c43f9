//! Offline seeding: content carried to a branch on a disk enters a stopped node's store.
//!
//! Owns `gup node seed`: walking a source directory, picking the files whose SHA-256 is in
//! the node's mirrored catalog (any retained revision), and writing them through the store's
//! writer, which hashes, fsyncs and verifies each one against the catalog's digest and size
//! exactly as it does an upstream fetch. It must never store a file that is not in the
//! catalog, never run beside a node on the same data dir (the store's lock refuses that), and
//! never create a data dir: a node that never synced has no catalog to seed against.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use sha2::Digest as _;

use super::CATALOG_KEY;
use crate::core::catalog::{CatalogHistory, CatalogItem};
use crate::core::digest::Digest;
use crate::store::{Store, StoreError};

/// How deep the walk goes below the source directory (a loop of bind mounts must end).
const MAX_DEPTH: usize = 64;

/// Size of the reads that feed the hash and the writer.
const CHUNK: usize = 1 << 20;

/// What to seed from and into.
pub struct SeedOptions {
    /// The node's data dir (`node.data_dir`); it must hold a mirrored catalog.
    pub data_dir: PathBuf,
    /// The directory read recursively.
    pub source: PathBuf,
    /// `cache.retain_revisions`: which mirrored revisions count as the catalog.
    pub retain_revisions: usize,
    /// `cache.min_free_bytes`: the import stops before the data dir's filesystem has less.
    pub min_free_bytes: u64,
}

/// A file of the source and what became of it, its path relative to the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seeded {
    pub path: PathBuf,
    /// The catalog item it is (None for a file not in the catalog or not read).
    pub item: Option<(String, String, u64)>,
}

/// What a seed did, file by file (paths relative to the source, in walk order).
#[derive(Debug, Default)]
pub struct SeedReport {
    /// Verified and stored now.
    pub imported: Vec<Seeded>,
    /// In the catalog and in the store already.
    pub already_stored: Vec<Seeded>,
    /// Not in the catalog (their bytes match no item of any retained revision).
    pub not_in_catalog: Vec<Seeded>,
    /// Could not be read (the reason), or changed while read.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Why a seed could not run. `BadInput` is the user's to fix (exit 2); the others are
/// failures of this run (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The store's lock is held: a node runs on this data dir.
    #[error("data dir {dir} is in use by a running node{pid}: stop the node first, then seed")]
    InUse { dir: String, pid: String },
    /// The data dir's filesystem would be left with less than `cache.min_free_bytes`.
    #[error("stopped before {path}: storing its {size} bytes would leave less than cache.min_free_bytes ({min_free}) free under the data dir")]
    NoRoom {
        path: String,
        size: u64,
        min_free: u64,
    },
}

/// Seeds the store of `opts.data_dir` from `opts.source`.
pub async fn seed(opts: &SeedOptions) -> Result<SeedReport, SeedError> {
    let source = &opts.source;
    match std::fs::metadata(source) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(SeedError::BadInput(format!(
                "{} is not a directory",
                source.display()
            )))
        }
        Err(e) => {
            return Err(SeedError::BadInput(format!(
                "cannot read the source directory {}: {e}",
                source.display()
            )))
        }
    }
    // Opening a store creates its data dir; a seed must not make a node out of a typo.
    if !opts.data_dir.join("db").is_dir() {
        return Err(SeedError::BadInput(format!(
            "{} is not a node's data dir (no db/ in it): start the node once against its upstream so that it mirrors the catalog, stop it, then seed",
            opts.data_dir.display()
        )));
    }
    let store = match Store::open(&opts.data_dir) {
        Ok(s) => s,
        Err(StoreError::InUse { dir, pid }) => {
            return Err(SeedError::InUse {
                dir,
                pid: pid.map_or(String::new(), |p| format!(" (pid {p})")),
            })
        }
        Err(e) => return Err(e.into()),
    };
    let mut history: CatalogHistory = store
        .kv("catalog")?
        .get(CATALOG_KEY)?
        .unwrap_or_else(|| CatalogHistory::new(opts.retain_revisions));
    history.set_retain(opts.retain_revisions);
    if history.revisions().next().is_none() {
        return Err(SeedError::BadInput(format!(
            "the node in {} has no mirrored catalog yet: start it once against its upstream, stop it, then seed",
            opts.data_dir.display()
        )));
    }
    // A file of a size no item has is not hashed at all.
    let sizes: HashSet<u64> = history
        .revisions()
        .flat_map(|r| r.catalog.items.iter().map(|i| i.size))
        .collect();
    let mut report = SeedReport::default();
    let files = walk(source, &mut report.unreadable);
    for path in files {
        let rel = path.strip_prefix(source).unwrap_or(&path).to_path_buf();
        let len = match std::fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) => {
                report.unreadable.push((rel, e.to_string()));
                continue;
            }
        };
        let not_in = |rel: PathBuf| Seeded {
            path: rel,
            item: None,
        };
        if !sizes.contains(&len) {
            report.not_in_catalog.push(not_in(rel));
            continue;
        }
        let digest = match hash_file(&path).await {
            Ok(d) => d,
            Err(e) => {
                report.unreadable.push((rel, e.to_string()));
                continue;
            }
        };
        let Some((_, item)) = history.find(&digest) else {
            report.not_in_catalog.push(not_in(rel));
            continue;
        };
        let seeded = Seeded {
            path: rel.clone(),
            item: Some(describe(item)),
        };
        if store.contains(&digest) {
            report.already_stored.push(seeded);
            continue;
        }
        if let Some(free) = store.free_bytes() {
            if free < item.size.saturating_add(opts.min_free_bytes) {
                return Err(SeedError::NoRoom {
                    path: rel.display().to_string(),
                    size: item.size,
                    min_free: opts.min_free_bytes,
                });
            }
        }
        match import(&store, &path, item).await {
            Ok(()) => report.imported.push(seeded),
            Err(ImportError::Read(e)) => report.unreadable.push((rel, e.to_string())),
            Err(ImportError::Store(e)) if e.is_mismatch() => {
                report
                    .unreadable
                    .push((rel, format!("changed while read: {e}")));
            }
            Err(ImportError::Store(e)) => return Err(e.into()),
        }
    }
    store.flush().await?;
    Ok(report)
}

fn describe(item: &CatalogItem) -> (String, String, u64) {
    (item.name.clone(), item.version.clone(), item.size)
}

/// Every regular file under `dir` (symbolic links to files followed, to directories not),
/// sorted by path; directories that cannot be read go to `unreadable`.
fn walk(dir: &Path, unreadable: &mut Vec<(PathBuf, String)>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, depth)) = pending.pop() {
        let rel = || d.strip_prefix(dir).unwrap_or(&d).to_path_buf();
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) => {
                unreadable.push((rel(), e.to_string()));
                continue;
            }
        };
        for entry in entries {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    unreadable.push((rel(), e.to_string()));
                    continue;
                }
            };
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if depth + 1 < MAX_DEPTH {
                    pending.push((path, depth + 1));
                }
            } else if kind.is_file()
                || (kind.is_symlink() && std::fs::metadata(&path).is_ok_and(|m| m.is_file()))
            {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The SHA-256 of a file, read off the async threads.
async fn hash_file(path: &Path) -> std::io::Result<Digest> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                return Ok(Digest::from_hasher(hasher));
            }
            hasher.update(&buf[..n]);
        }
    })
    .await
    .map_err(std::io::Error::other)?
}

enum ImportError {
    Read(std::io::Error),
    Store(StoreError),
}

/// Streams `path` through the store's writer, which hashes it again and makes it visible only
/// if its digest and size are the item's (a file that changed since it was hashed is
/// refused, not stored under a wrong name).
async fn import(store: &Store, path: &Path, item: &CatalogItem) -> Result<(), ImportError> {
    use tokio::io::AsyncReadExt;
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(ImportError::Read)?;
    let mut writer = store.writer().await.map_err(ImportError::Store)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = file.read(&mut buf).await.map_err(ImportError::Read)?;
        if n == 0 {
            break;
        }
        writer.write(&buf[..n]).await.map_err(ImportError::Store)?;
        if writer.len() > item.size {
            // Grew since it was hashed: not the item; the temp file goes with the writer.
            return Err(ImportError::Store(StoreError::SizeMismatch {
                expected: item.size,
                actual: writer.len(),
            }));
        }
    }
    writer
        .finish(Some((&item.sha256, Some(item.size))))
        .await
        .map_err(ImportError::Store)?;
    tracing::info!(digest = %item.sha256, size = item.size, name = %item.name, "seeded");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history_with(items: &[(&str, &[u8])]) -> CatalogHistory {
        let mut h = CatalogHistory::new(3);
        let now = chrono::Utc::now();
        let catalog = crate::core::catalog::Catalog {
            revision: 1,
            items: items
                .iter()
                .map(|(name, bytes)| CatalogItem {
                    name: name.to_string(),
                    version: "1".into(),
                    sha256: Digest::of(bytes),
                    size: bytes.len() as u64,
                    published_at: now,
                    urgent: false,
                    deltas: Vec::new(),
                })
                .collect(),
        };
        h.mirror(catalog, None, now).unwrap();
        h
    }

    fn opts(data: &Path, source: &Path) -> SeedOptions {
        SeedOptions {
            data_dir: data.to_path_buf(),
            source: source.to_path_buf(),
            retain_revisions: 3,
            min_free_bytes: 0,
        }
    }

    #[tokio::test]
    async fn only_files_of_the_catalog_are_imported_and_each_is_verified() {
        let data = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let wanted = b"the defs".to_vec();
        let mut same_size = wanted.clone();
        same_size[0] ^= 1;
        {
            let store = Store::open(data.path()).unwrap();
            store
                .kv("catalog")
                .unwrap()
                .put(CATALOG_KEY, &history_with(&[("defs", &wanted)]))
                .unwrap();
        }
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/defs.bin"), &wanted).unwrap();
        std::fs::write(src.path().join("copy.bin"), &wanted).unwrap();
        std::fs::write(src.path().join("rotten.bin"), &same_size).unwrap();
        std::fs::write(src.path().join("notes.txt"), b"unrelated").unwrap();
        let r = seed(&opts(data.path(), src.path())).await.unwrap();
        let paths = |v: &[Seeded]| v.iter().map(|s| s.path.clone()).collect::<Vec<_>>();
        assert_eq!(paths(&r.imported), vec![PathBuf::from("a/b/defs.bin")]);
        assert_eq!(paths(&r.already_stored), vec![PathBuf::from("copy.bin")]);
        assert_eq!(
            paths(&r.not_in_catalog),
            vec![PathBuf::from("notes.txt"), PathBuf::from("rotten.bin")]
        );
        assert!(r.unreadable.is_empty(), "{:?}", r.unreadable);
        let store = Store::open(data.path()).unwrap();
        assert!(store.contains(&Digest::of(&wanted)));
        assert_eq!(store.list().len(), 1, "nothing else entered the store");
    }

    #[tokio::test]
    async fn a_seed_needs_a_node_that_mirrored_a_catalog() {
        let data = tempfile::tempdir().unwrap();
        let src = tempfile::tempdir().unwrap();
        let nowhere = data.path().join("nowhere");
        let e = seed(&opts(&nowhere, src.path())).await.unwrap_err();
        assert!(matches!(e, SeedError::BadInput(_)), "{e}");
        assert!(!nowhere.exists(), "no data dir is made");
        drop(Store::open(data.path()).unwrap());
        let e = seed(&opts(data.path(), src.path())).await.unwrap_err();
        assert!(e.to_string().contains("no mirrored catalog"), "{e}");
        let e = seed(&opts(data.path(), &src.path().join("gone")))
            .await
            .unwrap_err();
        assert!(matches!(e, SeedError::BadInput(_)), "{e}");
    }
}
