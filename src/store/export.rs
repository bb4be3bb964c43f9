//! Exporting the database as a consistent snapshot while it is written, and importing one.
//!
//! Owns [`Export`] and the record line format both directions share. sled has no snapshot:
//! an iteration reads each leaf when it reaches it, so a batch written meanwhile may be seen
//! in part, and trees are read one after the other. So an export first starts **recording**
//! every write made through the store (the database's journal, `db`), then reads every tree,
//! then stops recording: the snapshot is the moment recording stopped. Each key's value then
//! is its last write in the journal when it has one (a removal removes it), and otherwise the
//! value the iteration read, which did not change while it read (no write touched it). So the
//! records, followed by the journal's writes in the order they were made, applied in turn,
//! give exactly the database at that moment, across all trees, with every atomic batch
//! either whole or absent. Outside an export this costs a writer one uncontended read lock;
//! during one, writes take turns on the journal's lock. The journal is bounded
//! ([`super::db::MAX_JOURNAL_BYTES`]): an export whose writes overrun it fails rather than
//! grow without end. An import writes straight into a new store's trees, before anything
//! else uses it (a restore), so nothing is recorded then.
//!
//! A record is one JSON line: `{"tree", "key", "value"}` (the value as stored: every value
//! written through `Kv` is JSON), `{"tree", "key", "removed": true}` for a journal's removal,
//! and `key_hex`/`value_hex` for bytes that are not UTF-8 or JSON. The store's own trees (the
//! blob index, rebuilt from the blobs themselves; the heal probe) are never exported nor
//! imported. It must never decide what the records mean.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::db::Op;
use super::{Store, StoreError};

/// Trees of the store itself: never in an export.
const OWN_TREES: &[&str] = &["blobs", "probe", "__sled__default"];

/// Records an import writes per batch at most.
const IMPORT_BATCH: usize = 10_000;
/// Bytes an import writes per batch at most (a batch stops growing once it holds this much).
const IMPORT_BATCH_BYTES: u64 = 16 << 20;

/// One record line.
#[derive(Serialize, Deserialize)]
struct Line {
    tree: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<Box<RawValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    removed: bool,
}

fn write_line(
    out: &mut dyn Write,
    tree: &str,
    key: &[u8],
    value: Option<&[u8]>,
) -> Result<(), StoreError> {
    let (key, key_hex) = match std::str::from_utf8(key) {
        Ok(k) => (Some(k.to_string()), None),
        Err(_) => (None, Some(hex::encode(key))),
    };
    let (value, value_hex, removed) = match value {
        None => (None, None, true),
        Some(v) => match std::str::from_utf8(v)
            .ok()
            .and_then(|s| RawValue::from_string(s.to_string()).ok())
        {
            Some(raw) => (Some(raw), None, false),
            None => (None, Some(hex::encode(v)), false),
        },
    };
    let line = Line {
        tree: tree.to_string(),
        key,
        key_hex,
        value,
        value_hex,
        removed,
    };
    let fail = |e: std::io::Error| super::io("writing the export")(e);
    serde_json::to_writer(&mut *out, &line).map_err(|e| fail(std::io::Error::other(e)))?;
    out.write_all(b"\n").map_err(fail)
}

/// [`write_line`] for the store's unit tests.
#[cfg(test)]
pub(super) fn tests_line(out: &mut Vec<u8>, tree: &str, key: &[u8], value: Option<&[u8]>) {
    write_line(out, tree, key, value).expect("writing to memory");
}

fn excluded(tree: &str, skip: &[&str]) -> bool {
    OWN_TREES.contains(&tree) || skip.contains(&tree)
}

/// An export in progress: writes are recorded until [`Export::stop`] (or the drop).
pub struct Export {
    store: Store,
    stopped: bool,
}

/// The writes made while an export read the trees, in the order they were made.
pub struct Recorded {
    ops: Vec<Op>,
}

impl Store {
    /// Starts an export: from now on every write is recorded. One export at a time
    /// ([`StoreError::ExportBusy`]).
    pub fn begin_export(&self) -> Result<Export, StoreError> {
        self.inner.db.start_recording()?;
        Ok(Export {
            store: self.clone(),
            stopped: false,
        })
    }

    /// Writes the record lines of an export (records, then its journal) into this store's
    /// database, in order, in batches per tree; for a restore into a new data dir, before
    /// anything else uses it. Returns how many lines it applied. Blocking.
    pub fn import_records(&self, input: impl BufRead) -> Result<u64, StoreError> {
        let mut applied = 0u64;
        let mut current: Option<(String, sled::Batch, usize, u64)> = None;
        let flush = |c: Option<(String, sled::Batch, usize, u64)>| -> Result<(), StoreError> {
            if let Some((tree, batch, _, _)) = c {
                let t = self.inner.db.tree(&tree)?;
                self.inner.db.check(t.apply_batch(batch))?;
            }
            Ok(())
        };
        for (i, line) in input.lines().enumerate() {
            let n = i as u64 + 1;
            let line = line.map_err(super::io("reading the records"))?;
            if line.trim().is_empty() {
                continue;
            }
            let bad = |reason: String| StoreError::BadRecord { line: n, reason };
            let l: Line = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
            if excluded(&l.tree, &[]) {
                return Err(bad(format!("tree {:?} is the store's own", l.tree)));
            }
            let key = match (l.key, l.key_hex) {
                (Some(k), None) => k.into_bytes(),
                (None, Some(h)) => hex::decode(h).map_err(|e| bad(format!("key_hex: {e}")))?,
                _ => return Err(bad("exactly one of key and key_hex".to_string())),
            };
            let value = match (l.value, l.value_hex, l.removed) {
                (Some(v), None, false) => Some(v.get().as_bytes().to_vec()),
                (None, Some(h), false) => {
                    Some(hex::decode(h).map_err(|e| bad(format!("value_hex: {e}")))?)
                }
                (None, None, true) => None,
                _ => {
                    return Err(bad(
                        "exactly one of value, value_hex and removed".to_string()
                    ))
                }
            };
            let full = current.as_ref().is_some_and(|(t, _, ops, bytes)| {
                *t != l.tree || *ops >= IMPORT_BATCH || *bytes >= IMPORT_BATCH_BYTES
            });
            if full {
                flush(current.take())?;
            }
            let (_, batch, ops, bytes) =
                current.get_or_insert_with(|| (l.tree.clone(), sled::Batch::default(), 0, 0));
            *ops += 1;
            *bytes += (key.len() + value.as_ref().map_or(0, Vec::len)) as u64;
            match value {
                Some(v) => batch.insert(key, v),
                None => batch.remove(key),
            }
            applied += 1;
        }
        flush(current.take())?;
        Ok(applied)
    }
}

impl Export {
    /// Writes every record of every tree (but the store's own and `skip`) to `out`, one
    /// line each, tree by tree in key order; returns how many. Blocking: call it off the
    /// async threads.
    pub fn write_records(&self, out: &mut dyn Write, skip: &[&str]) -> Result<u64, StoreError> {
        let db = &self.store.inner.db;
        let mut count = 0u64;
        for name in db.tree_names()? {
            if excluded(&name, skip) {
                continue;
            }
            let tree = db.tree(&name)?;
            for entry in tree.iter() {
                let (k, v) = db.check(entry)?;
                write_line(out, &name, &k, Some(&v))?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// Stops recording: the snapshot is now. Fails when the writes made meanwhile overran
    /// the journal's bound.
    pub fn stop(mut self) -> Result<Recorded, StoreError> {
        self.stopped = true;
        let journal = self.store.inner.db.stop_recording()?;
        if journal.overrun {
            return Err(StoreError::ExportOverrun {
                limit: super::db::MAX_JOURNAL_BYTES,
            });
        }
        Ok(Recorded { ops: journal.ops })
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.store.inner.db.stop_recording();
        }
    }
}

impl Recorded {
    /// Writes the recorded writes (but those to the store's own trees and `skip`) to `out`,
    /// one line each, in the order they were made; returns how many.
    pub fn write(&self, out: &mut dyn Write, skip: &[&str]) -> Result<u64, StoreError> {
        let mut count = 0u64;
        for op in &self.ops {
            if excluded(&op.tree, skip) {
                continue;
            }
            write_line(out, &op.tree, &op.key, op.value.as_deref())?;
            count += 1;
        }
        Ok(count)
    }

    /// How many writes were recorded.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}
