//! The key-value index: named trees of JSON records in the one sled database.
//!
//! Owns [`Kv`], the narrow database interface the rest of the crate persists through, and the
//! group commit that lets concurrent acknowledgements share one disk flush. Every sled call of
//! the crate is in `store`; this file must never know what the records mean.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::StoreError;

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
    pub(super) fn new(tree: sled::Tree) -> Kv {
        Kv {
            tree,
            commit: Arc::new(GroupCommit::default()),
        }
    }

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
