//! The `/v1/sync` snapshot: everything a node mirrors from its upstream, in one document.
//!
//! Owns the wire shape of the snapshot and its entity tag. The manager builds it from its
//! state; a node serves its own mirror in the same shape (so nodes chain). It must never hold
//! state or logic of its own beyond the shape.

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::settings::Directory;

/// What `GET /v1/sync` returns: the group tree with each group's own keys, location
/// overrides and policy, the site settings, and the current catalog.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    pub directory: Directory,
    pub catalog: Catalog,
    /// The manager's signature of `catalog` (hex ed25519 over its wire bytes).
    #[serde(default)]
    pub catalog_signature: Option<String>,
}

impl Snapshot {
    /// Serializes the snapshot with a strong ETag derived from its bytes, so any change,
    /// including a deleted group, changes the tag.
    pub fn encode(&self) -> Result<(String, Vec<u8>), serde_json::Error> {
        let bytes = serde_json::to_vec(self)?;
        let digest = crate::digest::Digest::of(&bytes).to_hex();
        Ok((format!("\"sync-{}\"", &digest[..16]), bytes))
    }
}
