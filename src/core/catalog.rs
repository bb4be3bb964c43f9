//! The catalog: which content is published, as numbered revisions.
//!
//! Owns the catalog model of the wire (`{revision, items}`), the publishing rules of the
//! manager (a name holds its latest version; same bytes again is not a change; same name and
//! version with other bytes is a conflict), and the retained history that decides what "in the
//! catalog" means (any retained revision). A node keeps the same history of the revisions it
//! mirrored, with the time each became available to it. This module must never touch bytes of
//! content or the disk: persistence is the caller's, through `store::Kv`.

use std::collections::VecDeque;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::digest::Digest;
use super::fault::{Fault, Kind};

/// One published package.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CatalogItem {
    pub name: String,
    pub version: String,
    pub sha256: Digest,
    pub size: u64,
    pub published_at: DateTime<Utc>,
    /// Urgent items skip download randomization: an outbreak fix goes out at once.
    #[serde(default)]
    pub urgent: bool,
    /// Deltas to this version from earlier ones (`deltas.from_versions`), each smaller than
    /// half of it; left out of the JSON when there are none, so catalogs signed before deltas
    /// existed verify as they were.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deltas: Vec<DeltaRef>,
}

/// Most deltas one catalog item may list.
pub const MAX_DELTAS_PER_ITEM: usize = 16;

impl CatalogItem {
    /// Every blob this item brings into the catalog with its size: its own bytes first, then
    /// each delta it lists. What "in the catalog" means for serving, fetching, prefetching,
    /// eviction and collection is decided from this one list.
    pub fn blobs(&self) -> impl Iterator<Item = (Digest, u64)> + '_ {
        std::iter::once((self.sha256, self.size))
            .chain(self.deltas.iter().map(|d| (d.sha256, d.size)))
    }

    /// Whether `digest` is this item's bytes or one of its deltas.
    pub fn holds(&self, digest: &Digest) -> bool {
        self.sha256 == *digest || self.deltas.iter().any(|d| d.sha256 == *digest)
    }
}

impl Catalog {
    /// Whether `self` holds the same items as `before` (names, versions, digests, sizes,
    /// publication times, urgency) and differs from it at most in the deltas they list: a
    /// revision that only adds deltas. It offers nothing new to download, so it keeps the
    /// moment its items became available (download slots, prefetch slots).
    pub fn only_deltas_differ(&self, before: &Catalog) -> bool {
        self.items.len() == before.items.len()
            && self.items.iter().zip(&before.items).all(|(a, b)| {
                a.name == b.name
                    && a.version == b.version
                    && a.sha256 == b.sha256
                    && a.size == b.size
                    && a.published_at == b.published_at
                    && a.urgent == b.urgent
            })
    }
}

/// One delta a catalog item lists: from the version with digest `from_sha256`, the delta blob
/// `sha256` of `size` bytes rebuilds this item's bytes (see `core::delta`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeltaRef {
    pub from_sha256: Digest,
    pub sha256: Digest,
    pub size: u64,
}

/// The wire form of `GET /v1/catalog`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Catalog {
    pub revision: u64,
    pub items: Vec<CatalogItem>,
}

/// Why a catalog change or a mirrored catalog was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CatalogError {
    #[error("{name} {version} is already published with other bytes ({existing})")]
    VersionConflict {
        name: String,
        version: String,
        existing: Digest,
    },
    #[error("no published content is named {0:?}")]
    UnknownName(String),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("catalog revision went backwards: have {have}, got {got}")]
    Backwards { have: u64, got: u64 },
}

impl Fault for CatalogError {
    fn kind(&self) -> Kind {
        match self {
            CatalogError::VersionConflict { .. } => Kind::Conflict,
            CatalogError::UnknownName(_) => Kind::NotFound,
            CatalogError::Invalid { .. } => Kind::BadInput,
            CatalogError::Backwards { .. } => Kind::Local,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            CatalogError::VersionConflict { .. } => "conflict",
            CatalogError::UnknownName(_) => "not_found",
            CatalogError::Invalid { .. } => "bad_request",
            CatalogError::Backwards { .. } => "catalog_backwards",
        }
    }
}

/// A catalog revision as this server holds it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revision {
    pub catalog: Catalog,
    /// When this revision became available at this server (the start of its slot window).
    pub available_at: DateTime<Utc>,
    /// The manager's ed25519 signature of the catalog's wire bytes (hex), passed on by nodes.
    #[serde(default)]
    pub signature: Option<String>,
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// False when the same name, version and bytes were already current.
    pub created: bool,
    pub revision: u64,
}

/// The retained revisions, oldest first; the last is current.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CatalogHistory {
    revisions: VecDeque<Revision>,
    /// How many revisions count as "in the catalog".
    retain: usize,
    /// Where each digest first appears, built on the first lookup after a change: serving
    /// asks on every content request, and a scan of every item of every revision would make
    /// that cost grow with the catalog.
    #[serde(skip)]
    index: FindIndex,
}

/// Where each digest first appears in the retained revisions, items and deltas apart.
#[derive(Default)]
struct Lookup {
    /// An item's digest -> (revision number, position of the item in it).
    items: std::collections::HashMap<Digest, (u64, usize)>,
    /// A listed delta's digest -> (revision number, item position, delta position).
    deltas: std::collections::HashMap<Digest, (u64, usize, usize)>,
}

/// The [`Lookup`] of the earliest revision of each digest, built on first use.
#[derive(Default)]
struct FindIndex(std::sync::OnceLock<Lookup>);

impl Clone for FindIndex {
    fn clone(&self) -> Self {
        FindIndex::default()
    }
}

impl PartialEq for FindIndex {
    /// A cache of the revisions: never part of what a history is.
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for FindIndex {}

impl std::fmt::Debug for FindIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FindIndex")
    }
}

/// Names and versions are printable, short, and safe in a header or a file name.
pub fn validate_label(field: &'static str, value: &str) -> Result<(), CatalogError> {
    if value.is_empty() || value.len() > 128 {
        return Err(CatalogError::Invalid {
            field,
            reason: "must be 1 to 128 characters".into(),
        });
    }
    if value.chars().all(|c| c == '.') {
        return Err(CatalogError::Invalid {
            field,
            reason: "must not be only dots".into(),
        });
    }
    if let Some(c) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+')))
    {
        return Err(CatalogError::Invalid {
            field,
            reason: format!("{c:?} is not allowed (use letters, digits, '.', '_', '-', '+')"),
        });
    }
    Ok(())
}

impl CatalogHistory {
    /// An empty history (revision 0, no items).
    pub fn new(retain: usize) -> CatalogHistory {
        CatalogHistory {
            revisions: VecDeque::new(),
            retain: retain.max(1),
            index: FindIndex::default(),
        }
    }

    /// Changes how many revisions are retained (from configuration at start-up).
    pub fn set_retain(&mut self, retain: usize) {
        self.retain = retain.max(1);
        self.trim();
    }

    /// Drops revisions beyond `retain`. Every change of the revisions ends here, so this is
    /// also where the lookup index is invalidated.
    fn trim(&mut self) {
        while self.revisions.len() > self.retain {
            self.revisions.pop_front();
        }
        self.index = FindIndex::default();
    }

    /// The current revision's catalog (revision 0 and no items before the first publish).
    pub fn current(&self) -> Catalog {
        self.revisions
            .back()
            .map(|r| r.catalog.clone())
            .unwrap_or_default()
    }

    pub fn revision(&self) -> u64 {
        self.revisions.back().map_or(0, |r| r.catalog.revision)
    }

    /// The retained revisions, oldest first.
    pub fn revisions(&self) -> impl DoubleEndedIterator<Item = &Revision> {
        self.revisions.iter()
    }

    /// Whether `digest` is in any retained revision: an item's bytes or a delta an item
    /// lists ([`CatalogItem::blobs`]).
    pub fn contains(&self, digest: &Digest) -> bool {
        let index = self.lookup();
        index.items.contains_key(digest) || index.deltas.contains_key(digest)
    }

    /// The size of a blob in any retained revision (an item's or a listed delta's).
    pub fn size_of(&self, digest: &Digest) -> Option<u64> {
        if let Some((_, item)) = self.find(digest) {
            return Some(item.size);
        }
        self.find_delta(digest).map(|(_, _, d)| d.size)
    }

    fn lookup(&self) -> &Lookup {
        self.index.0.get_or_init(|| {
            let mut index = Lookup::default();
            for r in &self.revisions {
                for (at, item) in r.catalog.items.iter().enumerate() {
                    index
                        .items
                        .entry(item.sha256)
                        .or_insert((r.catalog.revision, at));
                    for (k, d) in item.deltas.iter().enumerate() {
                        index
                            .deltas
                            .entry(d.sha256)
                            .or_insert((r.catalog.revision, at, k));
                    }
                }
            }
            index
        })
    }

    fn revision_numbered(&self, revision: u64) -> Option<&Revision> {
        self.revisions
            .iter()
            .find(|r| r.catalog.revision == revision)
    }

    /// The earliest retained revision holding an item whose bytes are `digest`, with the
    /// item (never a delta: see [`CatalogHistory::find_delta`]).
    pub fn find(&self, digest: &Digest) -> Option<(&Revision, &CatalogItem)> {
        let (revision, at) = *self.lookup().items.get(digest)?;
        let r = self.revision_numbered(revision)?;
        r.catalog.items.get(at).map(|i| (r, i))
    }

    /// The earliest retained revision listing the delta blob `digest`, with the item it
    /// rebuilds and the delta.
    pub fn find_delta(&self, digest: &Digest) -> Option<(&Revision, &CatalogItem, &DeltaRef)> {
        let (revision, at, k) = *self.lookup().deltas.get(digest)?;
        let r = self.revision_numbered(revision)?;
        let item = r.catalog.items.get(at)?;
        item.deltas.get(k).map(|d| (r, item, d))
    }

    /// A delta some retained revision lists from the bytes `from` to the item bytes `to`.
    pub fn delta_between(&self, from: &Digest, to: &Digest) -> Option<&DeltaRef> {
        self.revisions
            .iter()
            .rev()
            .flat_map(|r| r.catalog.items.iter())
            .filter(|i| i.sha256 == *to)
            .find_map(|i| i.deltas.iter().find(|d| d.from_sha256 == *from))
    }

    /// Every digest in any retained revision: items and the deltas they list.
    pub fn digests(&self) -> Vec<Digest> {
        let mut out: Vec<Digest> = self
            .revisions
            .iter()
            .flat_map(|r| {
                r.catalog
                    .items
                    .iter()
                    .flat_map(|i| i.blobs().map(|(d, _)| d))
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Up to `n` earlier versions of `name` in the retained revisions (digest and size),
    /// newest first, without `sha256` itself: what a new version's deltas are computed from.
    pub fn previous_versions(&self, name: &str, sha256: &Digest, n: usize) -> Vec<(Digest, u64)> {
        let mut out: Vec<(Digest, u64)> = Vec::new();
        for r in self.revisions.iter().rev() {
            if out.len() >= n {
                break;
            }
            for i in &r.catalog.items {
                if i.name == name && i.sha256 != *sha256 && !out.iter().any(|(d, _)| *d == i.sha256)
                {
                    out.push((i.sha256, i.size));
                }
            }
        }
        out.truncate(n);
        out
    }

    /// Lists `deltas` on the current item `name` whose bytes are `sha256`, in a new revision
    /// (manager only; the caller signs and persists it). Deltas that are the item itself, not
    /// smaller than it, or from a version listed already are left out, and at most
    /// [`MAX_DELTAS_PER_ITEM`] are kept. None, and nothing changes, when the item moved on
    /// meanwhile (another version published, or unpublished) or it lists exactly these
    /// already. The new revision keeps the moment the item became available: it offers
    /// nothing new to download, so it must not restart anyone's download window.
    pub fn set_deltas(
        &mut self,
        name: &str,
        sha256: &Digest,
        deltas: Vec<DeltaRef>,
    ) -> Option<u64> {
        let last = self.revisions.back()?;
        let at = last
            .catalog
            .items
            .iter()
            .position(|i| i.name == name && i.sha256 == *sha256)?;
        let item = &last.catalog.items[at];
        let mut kept: Vec<DeltaRef> = Vec::new();
        for d in deltas {
            let fits =
                d.from_sha256 != item.sha256 && d.sha256 != item.sha256 && d.size < item.size;
            if fits
                && kept.len() < MAX_DELTAS_PER_ITEM
                && !kept.iter().any(|k| k.from_sha256 == d.from_sha256)
            {
                kept.push(d);
            }
        }
        if kept == item.deltas {
            return None;
        }
        let available_at = last.available_at;
        let mut items = last.catalog.items.clone();
        items[at].deltas = kept;
        let revision = self.revision() + 1;
        self.revisions.push_back(Revision {
            catalog: Catalog { revision, items },
            available_at,
            signature: None,
        });
        self.trim();
        Some(revision)
    }

    fn push(&mut self, items: Vec<CatalogItem>, now: DateTime<Utc>) -> u64 {
        let revision = self.revision() + 1;
        self.revisions.push_back(Revision {
            catalog: Catalog { revision, items },
            available_at: now,
            signature: None,
        });
        self.trim();
        revision
    }

    /// Publishes `name` at `version` (default: the first 12 hex digits of the digest, so new
    /// bytes are a new version). Manager only.
    pub fn publish(
        &mut self,
        name: &str,
        version: Option<&str>,
        sha256: Digest,
        size: u64,
        urgent: bool,
        now: DateTime<Utc>,
    ) -> Result<Published, CatalogError> {
        validate_label("name", name)?;
        let version = match version {
            Some(v) => {
                validate_label("version", v)?;
                v.to_string()
            }
            None => sha256.to_hex()[..12].to_string(),
        };
        // A version keeps its bytes for as long as any retained revision remembers it.
        for r in &self.revisions {
            for i in &r.catalog.items {
                if i.name == name && i.version == version && i.sha256 != sha256 {
                    return Err(CatalogError::VersionConflict {
                        name: name.into(),
                        version,
                        existing: i.sha256,
                    });
                }
            }
        }
        let current = self.current();
        let same = |i: &CatalogItem| {
            i.name == name && i.version == version && i.sha256 == sha256 && i.urgent == urgent
        };
        if current.items.iter().any(same) {
            // Already published: the revision that published it (the oldest of the unbroken
            // run of retained revisions ending at the current one that hold it), not the
            // current one, which may have come later for another package.
            let revision = self
                .revisions
                .iter()
                .rev()
                .take_while(|r| r.catalog.items.iter().any(same))
                .last()
                .map_or(current.revision, |r| r.catalog.revision);
            return Ok(Published {
                created: false,
                revision,
            });
        }
        let mut items: Vec<CatalogItem> = current
            .items
            .into_iter()
            .filter(|i| i.name != name)
            .collect();
        items.push(CatalogItem {
            name: name.to_string(),
            version,
            sha256,
            size,
            published_at: now,
            urgent,
            deltas: Vec::new(),
        });
        items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Published {
            created: true,
            revision: self.push(items, now),
        })
    }

    /// Removes `name` from the catalog (a new revision). Manager only.
    pub fn unpublish(&mut self, name: &str, now: DateTime<Utc>) -> Result<u64, CatalogError> {
        let current = self.current();
        if !current.items.iter().any(|i| i.name == name) {
            return Err(CatalogError::UnknownName(name.to_string()));
        }
        let items = current
            .items
            .into_iter()
            .filter(|i| i.name != name)
            .collect();
        Ok(self.push(items, now))
    }

    /// Takes an upstream's catalog as the new current revision (node only). Returns whether
    /// it was new. The upstream's catalog is checked first: names unique, sizes plausible.
    pub fn mirror(
        &mut self,
        catalog: Catalog,
        signature: Option<String>,
        now: DateTime<Utc>,
    ) -> Result<bool, CatalogError> {
        validate_catalog(&catalog)?;
        let have = self.revision();
        if catalog.revision == have && !self.revisions.is_empty() {
            return Ok(false);
        }
        if catalog.revision < have {
            // An upstream with an older view (a lagging chained node): keep ours.
            return Err(CatalogError::Backwards {
                have,
                got: catalog.revision,
            });
        }
        // A revision that only adds deltas keeps the moment its items became available here.
        let available_at = match self.revisions.back() {
            Some(last) if catalog.only_deltas_differ(&last.catalog) => last.available_at,
            _ => now,
        };
        self.revisions.push_back(Revision {
            catalog,
            available_at,
            signature,
        });
        self.trim();
        Ok(true)
    }

    /// The oldest retained revision number (0 when there is none).
    pub fn oldest_revision(&self) -> u64 {
        self.revisions.front().map_or(0, |r| r.catalog.revision)
    }

    /// The current revision's signature.
    pub fn signature(&self) -> Option<&str> {
        self.revisions.back().and_then(|r| r.signature.as_deref())
    }

    /// Signs the current revision if it is not signed yet (manager).
    pub fn sign_current(&mut self, sign: impl FnOnce(&Catalog) -> String) {
        if let Some(r) = self.revisions.back_mut() {
            if r.signature.is_none() {
                r.signature = Some(sign(&r.catalog));
            }
        }
    }

    /// The strong entity tag of the current catalog.
    pub fn etag(&self) -> String {
        format!("\"catalog-{}\"", self.revision())
    }
}

/// Checks what an upstream sent before a node believes it.
pub fn validate_catalog(catalog: &Catalog) -> Result<(), CatalogError> {
    let mut names: Vec<&str> = catalog.items.iter().map(|i| i.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(CatalogError::Invalid {
            field: "items",
            reason: format!("name {:?} appears twice", w[0]),
        });
    }
    for item in &catalog.items {
        validate_label("name", &item.name)?;
        validate_label("version", &item.version)?;
        if item.deltas.len() > MAX_DELTAS_PER_ITEM {
            return Err(CatalogError::Invalid {
                field: "deltas",
                reason: format!(
                    "{} lists {} deltas (at most {MAX_DELTAS_PER_ITEM})",
                    item.name,
                    item.deltas.len()
                ),
            });
        }
        if let Some(d) = item.deltas.iter().find(|d| {
            d.from_sha256 == item.sha256 || d.sha256 == item.sha256 || d.size >= item.size
        }) {
            return Err(CatalogError::Invalid {
                field: "deltas",
                reason: format!(
                    "{}: a delta from {} that is the item itself or not smaller than it",
                    item.name, d.from_sha256
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Digest {
        Digest::of(s.as_bytes())
    }

    #[test]
    fn publish_rules() {
        let now = Utc::now();
        let mut h = CatalogHistory::new(3);
        assert_eq!(h.revision(), 0);
        let p = h.publish("defs", Some("1"), d("a"), 1, false, now).unwrap();
        assert_eq!(
            p,
            Published {
                created: true,
                revision: 1
            }
        );
        // Same bytes again: not a change.
        let p = h.publish("defs", Some("1"), d("a"), 1, false, now).unwrap();
        assert_eq!(
            p,
            Published {
                created: false,
                revision: 1
            }
        );
        // Same name and version, other bytes: conflict.
        let e = h
            .publish("defs", Some("1"), d("b"), 1, false, now)
            .unwrap_err();
        assert!(matches!(e, CatalogError::VersionConflict { .. }));
        // A new version replaces the name's item.
        h.publish("defs", Some("2"), d("b"), 1, false, now).unwrap();
        assert_eq!(h.current().items.len(), 1);
        assert_eq!(h.current().items[0].version, "2");
        // The old digest is still "in the catalog" through a retained revision.
        assert!(h.contains(&d("a")));
        assert_eq!(h.find(&d("a")).unwrap().0.catalog.revision, 1);
        // Default version comes from the digest.
        h.publish("engine", None, d("e"), 1, true, now).unwrap();
        assert_eq!(h.current().items[0].name, "defs");
        assert_eq!(h.current().items[1].version, d("e").to_hex()[..12]);
        assert!(h.current().items[1].urgent);
    }

    #[test]
    fn the_same_bytes_again_name_the_revision_that_published_them() {
        let now = Utc::now();
        let mut h = CatalogHistory::new(3);
        h.publish("defs", Some("1"), d("a"), 1, false, now).unwrap();
        h.publish("engine", Some("7"), d("e"), 1, false, now)
            .unwrap();
        assert_eq!(h.revision(), 2);
        let p = h.publish("defs", Some("1"), d("a"), 1, false, now).unwrap();
        assert_eq!(
            p,
            Published {
                created: false,
                revision: 1
            },
            "defs 1 came in revision 1; revision 2 was the engine's"
        );
        assert_eq!(h.revision(), 2, "nothing new was made");
    }

    #[test]
    fn find_answers_the_earliest_revision_and_follows_every_change() {
        let now = Utc::now();
        let mut h = CatalogHistory::new(2);
        h.publish("x", Some("1"), d("1"), 1, false, now).unwrap();
        assert_eq!(h.find(&d("1")).map(|(r, _)| r.catalog.revision), Some(1));
        // Asked before and after each change: the index must not answer from a stale view.
        h.publish("y", Some("1"), d("2"), 7, false, now).unwrap();
        let (r, item) = h.find(&d("1")).unwrap();
        assert_eq!((r.catalog.revision, item.name.as_str()), (1, "x"));
        assert_eq!(
            h.find(&d("2")).map(|(r, i)| (r.catalog.revision, i.size)),
            Some((2, 7))
        );
        h.publish("z", Some("1"), d("3"), 1, false, now).unwrap();
        // Revision 1 is gone; d("1") is still in revisions 2 and 3.
        assert_eq!(h.find(&d("1")).map(|(r, _)| r.catalog.revision), Some(2));
        h.unpublish("x", now).unwrap();
        h.unpublish("y", now).unwrap();
        // Retained now: 4 (y, z) and 5 (z).
        assert!(h.find(&d("1")).is_none());
        assert_eq!(h.find(&d("2")).map(|(r, _)| r.catalog.revision), Some(4));
        assert_eq!(h.find(&d("3")).map(|(r, _)| r.catalog.revision), Some(4));
        // A round trip through serde rebuilds the index.
        let back: CatalogHistory =
            serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
        assert_eq!(back, h);
        assert_eq!(back.find(&d("3")).map(|(r, _)| r.catalog.revision), Some(4));
    }

    #[test]
    fn retention_drops_old_revisions() {
        let now = Utc::now();
        let mut h = CatalogHistory::new(2);
        h.publish("x", Some("1"), d("1"), 1, false, now).unwrap();
        h.publish("x", Some("2"), d("2"), 1, false, now).unwrap();
        h.publish("x", Some("3"), d("3"), 1, false, now).unwrap();
        assert!(!h.contains(&d("1")));
        assert!(h.contains(&d("2")));
        assert!(h.contains(&d("3")));
        assert_eq!(h.revision(), 3);
        let r = h.unpublish("x", now).unwrap();
        assert_eq!(r, 4);
        assert!(h.current().items.is_empty());
        assert!(h.contains(&d("3")));
        assert!(matches!(
            h.unpublish("x", now),
            Err(CatalogError::UnknownName(_))
        ));
    }

    #[test]
    fn mirror_accepts_new_rejects_invalid_and_backwards() {
        let now = Utc::now();
        let mut h = CatalogHistory::new(3);
        let item = |name: &str| CatalogItem {
            name: name.into(),
            version: "1".into(),
            sha256: d(name),
            size: 1,
            published_at: now,
            urgent: false,
            deltas: Vec::new(),
        };
        let c = Catalog {
            revision: 5,
            items: vec![item("a")],
        };
        assert!(h.mirror(c.clone(), None, now).unwrap());
        assert!(!h.mirror(c, None, now).unwrap());
        let dup = Catalog {
            revision: 6,
            items: vec![item("a"), item("a")],
        };
        assert!(matches!(
            h.mirror(dup, None, now),
            Err(CatalogError::Invalid { .. })
        ));
        let old = Catalog {
            revision: 4,
            items: vec![],
        };
        assert!(matches!(
            h.mirror(old, None, now),
            Err(CatalogError::Backwards { .. })
        ));
        assert_eq!(h.revision(), 5);
    }

    fn delta(from: &str, blob: &str, size: u64) -> DeltaRef {
        DeltaRef {
            from_sha256: d(from),
            sha256: d(blob),
            size,
        }
    }

    #[test]
    fn set_deltas_lists_them_in_a_new_revision_only_while_the_item_is_current() {
        let t0 = Utc::now();
        let later = t0 + chrono::Duration::seconds(30);
        let mut h = CatalogHistory::new(10);
        h.publish("defs", Some("1"), d("v1"), 100, false, t0)
            .unwrap();
        h.publish("defs", Some("2"), d("v2"), 100, false, t0)
            .unwrap();
        h.publish("engine", Some("1"), d("e1"), 100, false, later)
            .unwrap();
        let before = h.revisions().last().unwrap().available_at;
        let r = h.set_deltas("defs", &d("v2"), vec![delta("v1", "v1-v2", 10)]);
        assert_eq!(r, Some(4));
        let current = h.current();
        let item = current.items.iter().find(|i| i.name == "defs").unwrap();
        assert_eq!(item.deltas, vec![delta("v1", "v1-v2", 10)]);
        // Nothing new to download: the revision keeps the moment its items were available.
        assert_eq!(h.revisions().last().unwrap().available_at, before);
        assert!(h
            .current()
            .only_deltas_differ(&h.revisions().nth(2).unwrap().catalog));
        // The delta is in the catalog now, with its own size; `find` stays for items.
        assert!(h.contains(&d("v1-v2")));
        assert_eq!(h.size_of(&d("v1-v2")), Some(10));
        assert!(h.find(&d("v1-v2")).is_none());
        let (rev, of, listed) = h.find_delta(&d("v1-v2")).unwrap();
        assert_eq!(
            (rev.catalog.revision, of.sha256, listed.size),
            (4, d("v2"), 10)
        );
        assert_eq!(
            h.delta_between(&d("v1"), &d("v2")).map(|x| x.size),
            Some(10)
        );
        assert!(h.delta_between(&d("v2"), &d("v1")).is_none());
        assert!(h.digests().contains(&d("v1-v2")));
        // The same list again is no change.
        assert_eq!(
            h.set_deltas("defs", &d("v2"), vec![delta("v1", "v1-v2", 10)]),
            None
        );
        // Deltas that are the item, not smaller than it, or a second one from the same
        // version are left out; so is the 17th.
        let mut many = vec![
            delta("v2", "x", 1),
            delta("v0", "big", 100),
            delta("v1", "v1-v2", 10),
            delta("v1", "again", 9),
        ];
        many.extend((0..20).map(|k| delta(&format!("old{k}"), &format!("dk{k}"), 5)));
        h.set_deltas("defs", &d("v2"), many).unwrap();
        let listed = h.current().items[0].deltas.clone();
        assert_eq!(listed.len(), MAX_DELTAS_PER_ITEM);
        assert_eq!(listed[0], delta("v1", "v1-v2", 10));
        assert!(validate_catalog(&h.current()).is_ok());
        // The item moved on: nothing changes.
        h.publish("defs", Some("3"), d("v3"), 100, false, later)
            .unwrap();
        let rev = h.revision();
        assert_eq!(
            h.set_deltas("defs", &d("v2"), vec![delta("v1", "late", 1)]),
            None
        );
        assert_eq!(h.set_deltas("nothing", &d("v2"), vec![]), None);
        assert_eq!(h.revision(), rev);
        h.unpublish("defs", later).unwrap();
        assert_eq!(
            h.set_deltas("defs", &d("v3"), vec![delta("v2", "v2-v3", 1)]),
            None
        );
    }

    #[test]
    fn previous_versions_are_the_retained_ones_of_that_name_newest_first() {
        let now = Utc::now();
        let mut h = CatalogHistory::new(4);
        for v in 1..=5 {
            h.publish(
                "defs",
                Some(&v.to_string()),
                d(&format!("v{v}")),
                v,
                false,
                now,
            )
            .unwrap();
        }
        h.publish("engine", Some("1"), d("e1"), 1, false, now)
            .unwrap();
        // Retained: revisions 3 to 6 (v3, v4, v5, v5 + engine).
        assert_eq!(
            h.previous_versions("defs", &d("v5"), 3),
            vec![(d("v4"), 4), (d("v3"), 3)]
        );
        assert_eq!(h.previous_versions("defs", &d("v5"), 1), vec![(d("v4"), 4)]);
        assert!(h.previous_versions("defs", &d("v5"), 0).is_empty());
        assert!(h.previous_versions("engine", &d("e1"), 3).is_empty());
    }

    #[test]
    fn a_mirrored_revision_that_only_adds_deltas_keeps_its_available_at() {
        let t0 = Utc::now();
        let later = t0 + chrono::Duration::seconds(60);
        let mut manager = CatalogHistory::new(5);
        manager
            .publish("defs", Some("1"), d("v1"), 100, false, t0)
            .unwrap();
        manager
            .publish("defs", Some("2"), d("v2"), 100, false, t0)
            .unwrap();
        let mut node = CatalogHistory::new(5);
        node.mirror(manager.current(), None, t0).unwrap();
        manager.set_deltas("defs", &d("v2"), vec![delta("v1", "v1-v2", 10)]);
        assert!(node.mirror(manager.current(), None, later).unwrap());
        assert_eq!(node.revisions().last().unwrap().available_at, t0);
        assert!(node.contains(&d("v1-v2")));
        // A revision with new bytes is available from when it arrived.
        manager
            .publish("defs", Some("3"), d("v3"), 100, false, later)
            .unwrap();
        node.mirror(manager.current(), None, later).unwrap();
        assert_eq!(node.revisions().last().unwrap().available_at, later);
    }

    #[test]
    fn labels() {
        assert!(validate_label("name", "engine-x86_64.1+b").is_ok());
        assert!(validate_label("name", "").is_err());
        assert!(validate_label("name", "../etc").is_err());
        assert!(validate_label("name", "a b").is_err());
        assert!(validate_label("version", "..").is_err());
        assert!(validate_label("version", "1.2.3").is_ok());
    }
}
