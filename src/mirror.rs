//! The `/v1/sync` snapshot: everything a node mirrors from its upstream, in one document.
//!
//! Owns the wire shape of the snapshot and its entity tag. The manager builds it from its
//! state; a node serves its own mirror in the same shape (so nodes chain). It must never hold
//! state or logic of its own beyond the shape.

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;

/// What `GET /v1/sync` returns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub catalog: Catalog,
}

impl Snapshot {
    /// Strong ETag: changes whenever anything in the snapshot changes.
    pub fn etag(&self) -> String {
        format!("\"sync-{}\"", self.catalog.revision)
    }
}
