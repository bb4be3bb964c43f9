//! The node's outbox: uploads accepted from clients, durable, until an upstream accepts them.
//!
//! Owns the queue of [`Placed`] uploads in `store::Kv` (an entry is flushed to disk before the
//! 202 and removed only after an upstream accepted it), in arrival order, with counts of what
//! it holds kept in memory. It must never talk to the network: the node's relay forwards what
//! it holds.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::core::proto::Placed;
use crate::store::{Kv, Store, StoreError};

fn seq_key(n: u64) -> String {
    format!("{n:020}")
}

/// A node's queue of accepted uploads not yet accepted upstream.
#[derive(Clone)]
pub struct Outbox {
    kv: Kv,
    /// The next sequence number (keys sort by it).
    next: Arc<AtomicU64>,
    /// Queued uploads holding a critical event, and queued events and applications: kept
    /// in memory so that neither question scans the queue.
    critical: Arc<AtomicUsize>,
    queued: Arc<AtomicUsize>,
}

impl Outbox {
    pub fn open(store: &Store) -> Result<Outbox, StoreError> {
        let kv = store.kv("outbox")?;
        let all = kv.scan::<Placed>("")?;
        let last = all
            .last()
            .and_then(|(k, _)| k.parse::<u64>().ok())
            .unwrap_or(0);
        let critical = all.iter().filter(|(_, u)| u.upload.is_critical()).count();
        let queued = all.iter().map(|(_, u)| u.upload.count()).sum();
        Ok(Outbox {
            kv,
            next: Arc::new(AtomicU64::new(last + 1)),
            critical: Arc::new(AtomicUsize::new(critical)),
            queued: Arc::new(AtomicUsize::new(queued)),
        })
    }

    /// Appends uploads, in order, and makes them durable (one flush) before returning.
    pub async fn push_all(&self, uploads: &[Placed]) -> Result<(), StoreError> {
        for upload in uploads {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            self.kv.put(&seq_key(n), upload)?;
        }
        self.kv.flush().await?;
        for upload in uploads {
            self.queued
                .fetch_add(upload.upload.count(), Ordering::Relaxed);
            if upload.upload.is_critical() {
                self.critical.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// The oldest uploads, up to `max_bytes` of JSON (at least one), with their keys.
    pub fn peek(&self, max_bytes: usize) -> Result<Vec<(String, Placed)>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for (k, u) in self.kv.scan::<Placed>("")? {
            let size = serde_json::to_vec(&u).map(|v| v.len()).unwrap_or(0);
            if !out.is_empty() && bytes + size > max_bytes {
                break;
            }
            bytes += size;
            out.push((k, u));
        }
        Ok(out)
    }

    /// Whether any queued upload holds a critical event.
    pub fn has_critical(&self) -> Result<bool, StoreError> {
        Ok(self.critical.load(Ordering::Relaxed) > 0)
    }

    /// Removes what an upstream accepted, durably.
    pub async fn remove(&self, keys: &[String]) -> Result<(), StoreError> {
        let mut critical = 0;
        let mut count = 0;
        for k in keys {
            // Two forwarders may race for a key: only the one that takes it counts it.
            if let Some(u) = self.kv.take::<Placed>(k)? {
                critical += usize::from(u.upload.is_critical());
                count += u.upload.count();
            }
        }
        self.kv.flush().await?;
        let sub = |a: &AtomicUsize, n: usize| {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        };
        sub(&self.critical, critical);
        sub(&self.queued, count);
        Ok(())
    }

    /// Events (and applications) queued.
    pub fn queued(&self) -> Result<usize, StoreError> {
        Ok(self.queued.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::proto::{Event, EventUpload, Upload};

    fn placed(upload: Upload) -> Placed {
        Placed {
            upload,
            placement: None,
        }
    }

    fn ev(id: &str, kind: &str, subkind: Option<&str>) -> Event {
        Event {
            id: id.into(),
            kind: kind.into(),
            subkind: subkind.map(str::to_string),
            time: "2026-11-24T10:00:00Z".into(),
            data: serde_json::json!({}),
        }
    }

    #[tokio::test]
    async fn outbox_survives_reopen_in_order_and_removes_what_was_accepted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let outbox = Outbox::open(&store).unwrap();
            for i in 0..3 {
                let u = placed(Upload::Events(EventUpload {
                    client_id: format!("c{i}"),
                    events: vec![ev(&i.to_string(), "system_change", None)],
                }));
                outbox.push_all(&[u]).await.unwrap();
            }
            assert!(!outbox.has_critical().unwrap());
        }
        let store = Store::open(dir.path()).unwrap();
        let outbox = Outbox::open(&store).unwrap();
        let page = outbox.peek(1 << 20).unwrap();
        assert_eq!(page.len(), 3);
        assert!(matches!(&page[0].1.upload, Upload::Events(u) if u.client_id == "c0"));
        // A tiny budget still yields one.
        assert_eq!(outbox.peek(1).unwrap().len(), 1);
        outbox.remove(&[page[0].0.clone()]).await.unwrap();
        assert_eq!(outbox.queued().unwrap(), 2);
        // New pushes go after what is there.
        outbox
            .push_all(&[placed(Upload::Events(EventUpload {
                client_id: "c9".into(),
                events: vec![ev("9", "risk", None)],
            }))])
            .await
            .unwrap();
        let page = outbox.peek(1 << 20).unwrap();
        assert!(matches!(&page.last().unwrap().1.upload, Upload::Events(u) if u.client_id == "c9"));
        assert!(outbox.has_critical().unwrap());
    }
}
