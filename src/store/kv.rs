//! The key-value index: named trees of JSON records in the one sled database.
//!
//! Owns [`Kv`], the narrow database interface the rest of the crate persists through: single
//! records, atomic batches of writes to one tree (or to two, together), ordered visits that decode one record at a
//! time (a page of a large tree never loads the rest of it), and the group commit that lets
//! concurrent acknowledgements share one disk flush. Every write goes through
//! `Database::write`, so that an export in progress records it. A `Kv` looks its tree up on every use,
//! so that a database reopened after a failed write (`db`) serves it again. Every sled call of
//! the crate is in `store`; this file must never know what the records mean.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::db::{Database, Journal};
use super::StoreError;

fn encode<T: Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Decode {
        key: key.to_string(),
        source,
    })
}

fn decode<T: DeserializeOwned>(key: &[u8], value: &[u8]) -> Result<(String, T), StoreError> {
    let key = String::from_utf8_lossy(key).into_owned();
    match serde_json::from_slice(value) {
        Ok(v) => Ok((key, v)),
        Err(source) => Err(StoreError::Decode { key, source }),
    }
}

/// A named tree of JSON records: the narrow database interface the rest of the crate uses.
#[derive(Clone)]
pub struct Kv {
    db: Arc<Database>,
    name: Arc<str>,
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

/// Writes to one tree that take effect together or not at all ([`Kv::apply`]).
#[derive(Default)]
pub struct Batch {
    /// In the order added (a later write of a key wins, as in sled's batch); kept as a
    /// list so that an export's journal can record them.
    ops: Vec<(sled::IVec, Option<sled::IVec>)>,
    /// Bytes of the values put, for callers that keep a byte count.
    bytes: u64,
}

impl Batch {
    /// Puts `value` at `key` when the batch is applied; returns the encoded size.
    pub fn put<T: Serialize>(&mut self, key: &str, value: &T) -> Result<u64, StoreError> {
        let bytes = encode(key, value)?;
        let len = bytes.len() as u64;
        self.bytes += len;
        self.ops.push((key.as_bytes().into(), Some(bytes.into())));
        Ok(len)
    }

    /// Removes `key` when the batch is applied.
    pub fn remove(&mut self, key: &str) {
        self.ops.push((key.as_bytes().into(), None));
    }

    /// Whether nothing was added.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Bytes of the values put so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The batch as sled applies it (values are shared, not copied).
    fn to_sled(&self) -> sled::Batch {
        let mut b = sled::Batch::default();
        for (k, v) in &self.ops {
            match v {
                Some(v) => b.insert(k.clone(), v.clone()),
                None => b.remove(k.clone()),
            }
        }
        b
    }

    /// Records every write in an export's journal.
    fn record(&self, tree: &Arc<str>, journal: &mut Journal) {
        for (k, v) in &self.ops {
            journal.push(tree, k, v.as_ref());
        }
    }
}

impl Kv {
    pub(super) fn new(db: Arc<Database>, name: &str) -> Kv {
        Kv {
            db,
            name: name.into(),
            commit: Arc::new(GroupCommit::default()),
        }
    }

    fn tree(&self) -> Result<sled::Tree, StoreError> {
        self.db.tree(&self.name)
    }

    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        let tree = self.tree()?;
        match self.db.check(tree.get(key.as_bytes()))? {
            None => Ok(None),
            Some(v) => decode::<T>(key.as_bytes(), &v).map(|(_, v)| Some(v)),
        }
    }

    /// Whether a record is stored at `key`, without decoding it.
    pub fn contains(&self, key: &str) -> Result<bool, StoreError> {
        let tree = self.tree()?;
        self.db.check(tree.contains_key(key.as_bytes()))
    }

    pub fn put<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StoreError> {
        let value: sled::IVec = encode(key, value)?.into();
        let key: sled::IVec = key.as_bytes().into();
        let tree = self.tree()?;
        self.db.write(
            || self.db.check(tree.insert(key.clone(), value.clone())),
            |_, j| j.push(&self.name, &key, Some(&value)),
        )?;
        Ok(())
    }

    /// Stores `value` only if `key` is absent; returns whether it stored it.
    pub fn put_if_absent<T: Serialize>(&self, key: &str, value: &T) -> Result<bool, StoreError> {
        let value: sled::IVec = encode(key, value)?.into();
        let key: sled::IVec = key.as_bytes().into();
        let tree = self.tree()?;
        let swapped = self.db.write(
            || {
                let r = self.db.check(tree.compare_and_swap(
                    key.clone(),
                    None as Option<&[u8]>,
                    Some(value.clone()),
                ))?;
                Ok(r.is_ok())
            },
            |swapped, j| {
                if *swapped {
                    j.push(&self.name, &key, Some(&value))
                }
            },
        )?;
        Ok(swapped)
    }

    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        self.remove_raw(key)?;
        Ok(())
    }

    /// Removes `key`, returning the bytes that were there.
    fn remove_raw(&self, key: &str) -> Result<Option<sled::IVec>, StoreError> {
        let key: sled::IVec = key.as_bytes().into();
        let tree = self.tree()?;
        self.db.write(
            || self.db.check(tree.remove(key.clone())),
            |old, j| {
                if old.is_some() {
                    j.push(&self.name, &key, None)
                }
            },
        )
    }

    /// Removes a record and returns it, atomically (None when it was not there).
    pub fn take<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.remove_raw(key)? {
            None => Ok(None),
            Some(v) => decode::<T>(key.as_bytes(), &v).map(|(_, v)| Some(v)),
        }
    }

    /// Applies every write of `batch`, atomically: after a crash, all of them or none.
    pub fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let tree = self.tree()?;
        self.db.write(
            || self.db.check(tree.apply_batch(batch.to_sled())),
            |_, j| batch.record(&self.name, j),
        )
    }

    /// Applies `batch` to this tree and `other_batch` to `other`, atomically: after a crash,
    /// every write of both or none (one sled transaction over the two trees). Both must be
    /// trees of the same database.
    pub fn apply_with(
        &self,
        batch: Batch,
        other: &Kv,
        other_batch: Batch,
    ) -> Result<(), StoreError> {
        use sled::transaction::{ConflictableTransactionError, TransactionError};
        use sled::Transactional;
        if !Arc::ptr_eq(&self.db, &other.db) {
            return Err(StoreError::Apart {
                first: self.name.to_string(),
                second: other.name.to_string(),
            });
        }
        let (mine, theirs) = (self.tree()?, other.tree()?);
        let (ours, others) = (batch.to_sled(), other_batch.to_sled());
        self.db.write(
            || {
                let r = (&mine, &theirs).transaction(|(a, b)| {
                    a.apply_batch(&ours)?;
                    b.apply_batch(&others)?;
                    Ok::<(), ConflictableTransactionError<std::convert::Infallible>>(())
                });
                match r {
                    Ok(()) => Ok(()),
                    Err(TransactionError::Storage(e)) => self.db.check(Err(e)),
                    Err(TransactionError::Abort(never)) => match never {},
                }
            },
            |_, j| {
                batch.record(&self.name, j);
                other_batch.record(&other.name, j);
            },
        )
    }

    /// Every record whose key starts with `prefix`, in key order. For a small tree only:
    /// [`Kv::visit`] reads a large one a record at a time.
    pub fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        self.visit(prefix, prefix, false, |k, v| {
            out.push((k, v));
            true
        })?;
        Ok(out)
    }

    /// Visits the records whose key starts with `prefix`, from `from` on (or, with
    /// `backwards`, from `from` down; `from` is the prefix itself to start at an end), in
    /// key order, one at a time, until `visit` returns false.
    pub fn visit<T: DeserializeOwned>(
        &self,
        prefix: &str,
        from: &str,
        backwards: bool,
        mut visit: impl FnMut(String, T) -> bool,
    ) -> Result<(), StoreError> {
        let tree = self.tree()?;
        let p = prefix.as_bytes();
        let lower = p.to_vec();
        type Entries = Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>>;
        let iter: Entries = if !backwards {
            let start = if from.as_bytes() > p {
                from.as_bytes()
            } else {
                p
            };
            Box::new(tree.range(start.to_vec()..))
        } else if from != prefix {
            Box::new(tree.range(lower..=from.as_bytes().to_vec()).rev())
        } else {
            match prefix_end(p) {
                Some(upper) => Box::new(tree.range(lower..upper).rev()),
                None => Box::new(tree.range(lower..).rev()),
            }
        };
        for entry in iter {
            let (k, v) = self.db.check(entry)?;
            if !k.starts_with(p) {
                break;
            }
            let (key, value) = decode(&k, &v)?;
            if !visit(key, value) {
                break;
            }
        }
        Ok(())
    }

    /// Visits the records whose key is `from` or after it, in key order, one at a time,
    /// until `visit` returns false.
    pub fn visit_from<T: DeserializeOwned>(
        &self,
        from: &str,
        visit: impl FnMut(String, T) -> bool,
    ) -> Result<(), StoreError> {
        self.visit("", from, false, visit)
    }

    /// The record with the greatest key that starts with `prefix`.
    pub fn last<T: DeserializeOwned>(
        &self,
        prefix: &str,
    ) -> Result<Option<(String, T)>, StoreError> {
        let mut found = None;
        self.visit(prefix, prefix, true, |k, v| {
            found = Some((k, v));
            false
        })?;
        Ok(found)
    }

    /// Whether the tree holds no record (cheap: it looks for a first key).
    pub fn is_empty(&self) -> Result<bool, StoreError> {
        let tree = self.tree()?;
        Ok(self.db.check(tree.first())?.is_none())
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
        self.db.flush().await?;
        self.commit.flushed.fetch_max(covers, Ordering::SeqCst);
        Ok(())
    }
}

/// The smallest key greater than every key starting with `prefix` (None: there is none, the
/// prefix is empty or all 0xff).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}
