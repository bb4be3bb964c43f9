//! Repair: what the node does when its store's scrub finds a blob rotten.
//!
//! Owns the node's [`ScrubSink`]: the rotten blob (already out of the store) is dropped from
//! the hot cache, counted (`gup_scrub_failures_total`), and fetched again from the upstream
//! when a retained catalog revision still lists it, at once (a blob the node had is owed to
//! its clients now; it never waits for a prefetch slot again). A client asking meanwhile
//! shares that one fetch. It must never serve or keep the rotten bytes, and never fetch a
//! digest its catalog does not list.

use std::sync::{Arc, RwLock};

use super::fetch::Fetches;
use crate::core::catalog::CatalogHistory;
use crate::serve::metrics::Metrics;
use crate::store::hot::HotBlobs;
use crate::store::scrub::{Corrupt, ScrubSink};

/// The node's answer to rot.
pub struct Repair {
    pub metrics: Arc<Metrics>,
    pub hot: Arc<HotBlobs>,
    pub catalog: Arc<RwLock<CatalogHistory>>,
    pub fetches: Arc<Fetches>,
}

impl ScrubSink for Repair {
    fn verified(&self, bytes: u64) {
        self.metrics.scrub_bytes.inc_by(bytes);
    }

    fn corrupt(&self, c: Corrupt) {
        self.metrics.scrub_failures.inc();
        self.hot.remove(&c.digest);
        let listed = self
            .catalog
            .read()
            .map(|h| h.contains(&c.digest))
            .unwrap_or(false);
        if !listed {
            tracing::warn!(digest = %c.digest, "a rotten blob no retained revision lists: not fetched again");
            return;
        }
        let fetches = self.fetches.clone();
        tokio::spawn(async move {
            match fetches.fetch(c.digest, c.size).await {
                Ok(()) => {
                    tracing::info!(digest = %c.digest, "fetched again after the scrub found it rotten")
                }
                Err(e) => {
                    tracing::warn!(digest = %c.digest, error = %e, "fetching a rotten blob again failed; a client's request or the next prefetch tries again")
                }
            }
        });
    }
}
