//! What the status page may know of each upstream: how its last call went, read-only.
//!
//! Owns the one read of the upstreams' health from outside `upstream` (a child module, so
//! `Health` stays private). It must never change a server's health nor hand out anything
//! but its state: no token, no backoff to tamper with.

use super::Upstream;

impl Upstream {
    /// Per server of the list in force, in list order: how its last call went (None: not
    /// tried yet).
    pub fn last_calls(&self) -> Vec<(url::Url, Option<bool>)> {
        let list = self.current();
        let calls: Vec<Option<bool>> = match list.health.lock() {
            Ok(health) => health.iter().map(|h| h.last_ok).collect(),
            Err(_) => vec![None; list.servers.len()],
        };
        list.servers.iter().cloned().zip(calls).collect()
    }
}
