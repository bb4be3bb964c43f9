//! The one sled database of a data directory, and how it heals after a failed write.
//!
//! Owns the `sled::Db` and its trees. sled refuses every write for good once one failed (a
//! full disk, measured: every later insert and flush answers the same ENOSPC even after space
//! returns), and its file lock is held while any handle lives. So a write that fails marks the
//! database broken; the next use at least a second later drops every handle, reopens it and
//! proves it can write (a probe record, flushed, and a small file in `tmp/`, synced) before
//! trusting it again. Trees are looked up here on every use, never kept elsewhere, so that a
//! reopen can drop them all. It must never hide a failure: an operation that failed fails,
//! and only the next one may find the database healed.
//!
//! Also owns the journal of an export (`export`): while one reads the trees, every write
//! through [`Database::write`] is also recorded, in the order the writes took effect.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::StoreError;

/// Free bytes a disk needs before a broken database is reopened on it.
const MIN_FREE_TO_HEAL: u64 = 1 << 20;

/// How often a broken database is tried again.
const HEAL_EVERY: Duration = Duration::from_secs(1);

/// How long a reopen waits for handles still held by operations in flight to go.
const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// How long opening at start waits for the lock of a handle still closing.
const OPEN_WAIT: Duration = Duration::from_secs(2);

struct Open {
    db: sled::Db,
    trees: HashMap<String, sled::Tree>,
}

/// The sled database, reopened in place when a failed write left it unusable.
pub(super) struct Database {
    path: PathBuf,
    /// Where the probe file of a heal is written (the store's `tmp/`).
    probe_dir: PathBuf,
    /// None only while a heal reopens it.
    open: RwLock<Option<Open>>,
    broken: AtomicBool,
    last_heal: Mutex<Option<Instant>>,
    /// The journal of the export in progress, if any. Writers hold the read side for the
    /// length of their sled call, so starting and stopping a recording waits for writes in
    /// flight and no write falls between the two; while recording, the inner lock orders
    /// each write with its journal entry.
    recording: RwLock<Option<Mutex<Journal>>>,
}

/// Bytes of keys and values the journal of one export holds at most: past it the export
/// fails ([`StoreError::ExportOverrun`]) rather than take memory without end.
pub const MAX_JOURNAL_BYTES: u64 = 256 << 20;

/// One recorded write: `value` None is a removal.
pub(super) struct Op {
    pub tree: Arc<str>,
    pub key: sled::IVec,
    pub value: Option<sled::IVec>,
}

/// The writes made while an export reads the trees.
#[derive(Default)]
pub(super) struct Journal {
    pub ops: Vec<Op>,
    bytes: u64,
    /// More than [`MAX_JOURNAL_BYTES`] were written: the export fails.
    pub overrun: bool,
}

impl Journal {
    pub(super) fn push(&mut self, tree: &Arc<str>, key: &sled::IVec, value: Option<&sled::IVec>) {
        if self.overrun {
            return;
        }
        self.bytes += (key.len() + value.map_or(0, |v| v.len())) as u64;
        if self.bytes > MAX_JOURNAL_BYTES {
            self.overrun = true;
            self.ops = Vec::new();
            return;
        }
        self.ops.push(Op {
            tree: tree.clone(),
            key: key.clone(),
            value: value.cloned(),
        });
    }
}

fn config(path: &Path) -> sled::Config {
    sled::Config::new().path(path).flush_every_ms(Some(500))
}

/// Whether sled refused to open because another handle (this process's, still closing, or
/// another process's) holds the database's file lock.
fn is_locked(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Opens the database, waiting up to `wait` for a lock that a handle still closing holds
/// (sled's background writes of a database just dropped in this process finish a moment
/// after the drop).
fn open_waiting(path: &Path, wait: Duration) -> Result<sled::Db, sled::Error> {
    let started = Instant::now();
    loop {
        match config(path).open() {
            Err(e) if is_locked(&e) && started.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

impl Database {
    pub(super) fn open(path: &Path, probe_dir: &Path) -> Result<Database, StoreError> {
        let db = open_waiting(path, OPEN_WAIT)?;
        Ok(Database {
            path: path.to_path_buf(),
            probe_dir: probe_dir.to_path_buf(),
            open: RwLock::new(Some(Open {
                db,
                trees: HashMap::new(),
            })),
            broken: AtomicBool::new(false),
            last_heal: Mutex::new(None),
            recording: RwLock::new(None),
        })
    }

    /// Runs one write `f` (a single sled call), and when an export is recording, records
    /// what it wrote (`record`, given `f`'s result) in the same step.
    pub(super) fn write<T>(
        &self,
        f: impl FnOnce() -> Result<T, StoreError>,
        record: impl FnOnce(&T, &mut Journal),
    ) -> Result<T, StoreError> {
        let gate = self
            .recording
            .read()
            .map_err(|_| StoreError::Join("export lock poisoned".into()))?;
        match gate.as_ref() {
            None => f(),
            Some(journal) => {
                let mut journal = journal
                    .lock()
                    .map_err(|_| StoreError::Join("export journal poisoned".into()))?;
                let out = f()?;
                record(&out, &mut journal);
                Ok(out)
            }
        }
    }

    /// Starts recording writes for an export ([`StoreError::ExportBusy`] while another is).
    pub(super) fn start_recording(&self) -> Result<(), StoreError> {
        let mut gate = self
            .recording
            .write()
            .map_err(|_| StoreError::Join("export lock poisoned".into()))?;
        if gate.is_some() {
            return Err(StoreError::ExportBusy);
        }
        *gate = Some(Mutex::new(Journal::default()));
        Ok(())
    }

    /// Stops recording and hands over what was recorded.
    pub(super) fn stop_recording(&self) -> Result<Journal, StoreError> {
        let mut gate = self
            .recording
            .write()
            .map_err(|_| StoreError::Join("export lock poisoned".into()))?;
        let journal = gate
            .take()
            .ok_or(StoreError::Join("no export is recording".into()))?;
        journal
            .into_inner()
            .map_err(|_| StoreError::Join("export journal poisoned".into()))
    }

    /// The names of every tree the database holds (those that are not UTF-8 left out: every
    /// tree gup makes is named by a `&str`).
    pub(super) fn tree_names(&self) -> Result<Vec<String>, StoreError> {
        let guard = self
            .open
            .read()
            .map_err(|_| StoreError::Join("database lock poisoned".into()))?;
        let open = guard.as_ref().ok_or(StoreError::Reopening)?;
        let mut names: Vec<String> = open
            .db
            .tree_names()
            .into_iter()
            .filter_map(|n| String::from_utf8(n.to_vec()).ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// Makes every write so far durable, blocking (for start-up, before any async use).
    pub(super) fn flush_blocking(&self) -> Result<(), StoreError> {
        let db = self
            .open
            .read()
            .map_err(|_| StoreError::Join("database lock poisoned".into()))?
            .as_ref()
            .map(|o| o.db.clone())
            .ok_or(StoreError::Reopening)?;
        let r = db.flush();
        self.check(r).map(|_| ())
    }

    /// Whether the last write worked (or a heal proved it can write again).
    pub(super) fn writable(&self) -> bool {
        !self.broken.load(Ordering::Relaxed)
    }

    /// Records how an operation went: a failed write or flush marks the database broken.
    pub(super) fn check<T>(&self, r: Result<T, sled::Error>) -> Result<T, StoreError> {
        if let Err(e @ sled::Error::Io(_)) = &r {
            if !self.broken.swap(true, Ordering::Relaxed) {
                tracing::error!(error = %e, "the database cannot write; it is reopened once it can");
            }
        }
        r.map_err(StoreError::from)
    }

    /// The tree named `name` now (after healing the database first when it is broken and a
    /// try is due).
    pub(super) fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        if !self.writable() {
            self.heal_if_due();
        }
        if let Some(t) = self
            .open
            .read()
            .map_err(|_| StoreError::Join("database lock poisoned".into()))?
            .as_ref()
            .and_then(|o| o.trees.get(name))
        {
            return Ok(t.clone());
        }
        let mut guard = self
            .open
            .write()
            .map_err(|_| StoreError::Join("database lock poisoned".into()))?;
        let open = guard.as_mut().ok_or(StoreError::Reopening)?;
        if let Some(t) = open.trees.get(name) {
            return Ok(t.clone());
        }
        let tree = self.check(open.db.open_tree(name))?;
        open.trees.insert(name.to_string(), tree.clone());
        Ok(tree)
    }

    /// Makes every write so far durable.
    pub(super) async fn flush(&self) -> Result<(), StoreError> {
        let db = self
            .open
            .read()
            .map_err(|_| StoreError::Join("database lock poisoned".into()))?
            .as_ref()
            .map(|o| o.db.clone())
            .ok_or(StoreError::Reopening)?;
        let r = db.flush_async().await;
        self.check(r).map(|_| ())
    }

    /// Marks the database broken from outside (a blob write found the disk full): the next
    /// heal proves it can write again.
    pub(super) fn mark_broken(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }

    /// Tries to heal when broken and the last try is at least [`HEAL_EVERY`] ago. Returns
    /// whether the database is writable now.
    pub(super) fn heal_if_due(&self) -> bool {
        if self.writable() {
            return true;
        }
        {
            let Ok(mut last) = self.last_heal.lock() else {
                return false;
            };
            if last.is_some_and(|t| t.elapsed() < HEAL_EVERY) {
                return false;
            }
            *last = Some(Instant::now());
        }
        // Reopening drops the database, reads included, until it is open again: not worth it
        // while the disk is still full.
        let open = self.open.read().map(|o| o.is_some()).unwrap_or(false);
        if open && crate::sys::free_bytes(&self.probe_dir).is_ok_and(|free| free < MIN_FREE_TO_HEAL)
        {
            return false;
        }
        match self.heal() {
            Ok(()) => {
                self.broken.store(false, Ordering::Relaxed);
                tracing::info!(path = %self.path.display(), "the database writes again");
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "the database still cannot write");
                false
            }
        }
    }

    /// Drops every handle, reopens, and proves a write and a file in `tmp/` work.
    fn heal(&self) -> Result<(), StoreError> {
        let mut guard = self
            .open
            .write()
            .map_err(|_| StoreError::Join("database lock poisoned".into()))?;
        // Every tree and the database go before the reopen: sled holds its file lock while
        // any handle lives. Operations in flight hold clones for a moment; wait for them.
        *guard = None;
        let db = open_waiting(&self.path, REOPEN_WAIT)?;
        // Reads work on the reopened database whatever the probe finds.
        let probe_db = db.clone();
        *guard = Some(Open {
            db,
            trees: HashMap::new(),
        });
        drop(guard);
        let probe = probe_db.open_tree("probe")?;
        probe.insert(b"probe", &b"1"[..])?;
        probe_db.flush()?;
        let file = self.probe_dir.join("probe.part");
        let wrote = std::fs::write(&file, vec![0u8; 64 << 10])
            .and_then(|()| std::fs::File::open(&file)?.sync_all());
        let _ = std::fs::remove_file(&file);
        wrote.map_err(super::io("writing a probe file"))
    }
}
