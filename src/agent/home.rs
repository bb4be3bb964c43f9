//! Where an agent keeps what it knows: a directory for `gup agent`, memory for each agent of
//! `gup loadtest`.
//!
//! Owns the layout of the data dir and every write into it: `client_id` (mode 0600),
//! `state.json` (the [`Saved`] state: group, settings and serials, catalog revision, slot,
//! items, the server in use and why), `policy.json`, `content/<name>` (the current version of
//! each item), `versions/<name>/<sha256>` (the previous ones, `--keep-versions` of them),
//! `partial/<sha256>` (a download in progress, resumed with `Range` after a restart; a listed
//! delta's blob too, and a version rebuilt from a delta before it is installed) and
//! `spool/` (events waiting, see `spool`). It also gives the current version's bytes to
//! rebuild from ([`Home::held_bytes`]: read from `content/<name>`, or, for the agents of a
//! load test, one [`Holding`] in memory that the whole crowd shares). Every file is replaced atomically (written beside
//! it, synced, renamed, the directory synced), so a kill -9 at any moment leaves the old
//! version or the new one, never a mix. It must never write a content file whose SHA-256 it
//! has not checked, and never a path built from a name it did not check ([`safe_name`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::wire::DownloadSlot;

/// The longest item name an agent writes to disk.
const MAX_NAME: usize = 200;

/// Why the data dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Bad { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One item an agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub sha256: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub size: u64,
}

/// What an agent keeps across restarts (`state.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Saved {
    /// What the agent was started as (for `gup agent status`).
    pub install_group: Option<String>,
    pub location: Option<String>,
    pub login_mode: String,
    pub user: Option<String>,
    /// The group the server last placed the client in.
    pub group: Option<String>,
    /// The settings last heard (the JSON as served, `serial` included).
    pub settings: serde_json::Value,
    pub policy_serial: u64,
    /// The catalog revision whose every item the agent holds.
    pub catalog_revision: u64,
    /// The newest revision a server named.
    pub known_revision: u64,
    /// The download slot of the newest revision fetched or being fetched.
    pub slot: Option<DownloadSlot>,
    /// The current item of each name.
    pub items: BTreeMap<String, Held>,
    /// The server in use and why it was chosen.
    pub server: Option<String>,
    pub server_why: String,
    /// Fingerprint of the applications last reported (none: not reported yet).
    pub apps_reported: Option<String>,
    /// When this state was written (RFC 3339).
    pub updated_at: String,
    /// How the agent got its versions: full blobs or deltas, and the deltas that failed.
    pub deltas: DeltaCounts,
}

/// How an agent got the versions it installed (`gup agent status`), added up over its life.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeltaCounts {
    /// Versions installed from their full blob.
    pub via_full: u64,
    /// Versions rebuilt from a delta the catalog listed.
    pub via_delta: u64,
    /// Versions rebuilt from a delta the server made on request (`GET /v1/delta/..`).
    pub via_edge_delta: u64,
    /// Bytes of full blobs received (verified).
    pub full_bytes: u64,
    /// Bytes of listed deltas that rebuilt an installed version.
    pub delta_bytes: u64,
    /// Bytes of edge deltas that rebuilt an installed version.
    pub edge_delta_bytes: u64,
    /// Bytes of deltas received that rebuilt nothing (a fallback followed).
    pub wasted_delta_bytes: u64,
    /// Deltas tried that failed (download, decoding, size, digest): the full blob was taken.
    pub fallbacks: u64,
    /// Edge deltas the server had none of (404): the full blob was taken.
    pub no_delta: u64,
    /// Why the last fallback happened.
    pub last_fallback: Option<String>,
}

impl DeltaCounts {
    /// Adds `other` (one round's counts) to these; the last fallback's reason is the newest.
    pub fn add(&mut self, other: &DeltaCounts) {
        self.via_full += other.via_full;
        self.via_delta += other.via_delta;
        self.via_edge_delta += other.via_edge_delta;
        self.full_bytes += other.full_bytes;
        self.delta_bytes += other.delta_bytes;
        self.edge_delta_bytes += other.edge_delta_bytes;
        self.wasted_delta_bytes += other.wasted_delta_bytes;
        self.fallbacks += other.fallbacks;
        self.no_delta += other.no_delta;
        if other.last_fallback.is_some() {
            self.last_fallback = other.last_fallback.clone();
        }
    }
}

/// One version of an item held in memory, for the agents of a load test to start from
/// (`gup loadtest --holding FILE`): one copy shared by the whole crowd, never written.
pub struct Holding {
    pub name: String,
    pub sha256: String,
    pub bytes: bytes::Bytes,
}

impl Holding {
    /// `bytes` held under `name` (its SHA-256 computed here).
    pub fn new(name: String, bytes: bytes::Bytes) -> Holding {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        Holding {
            name,
            sha256,
            bytes,
        }
    }
}

impl std::fmt::Debug for Holding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holding")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Whether `name` can be a file name under `content/`: not empty, at most 200 bytes, no path
/// separator, NUL or control character, not `.`-led (no `..`, no hidden files).
pub fn safe_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control())
}

/// Writes `bytes` to `path` atomically: a temp file beside it, synced, renamed over, the
/// directory synced. The file gets `mode` on Unix.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), HomeError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{:016x}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        let mut f = opts.open(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io(path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Syncs a directory so that a rename in it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<(), HomeError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

fn make_dir(path: &Path) -> Result<(), HomeError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(path).map_err(io(path))
}

/// The SHA-256 state and length of the file at `path`, read in 256 KiB blocks.
pub fn hash_file(path: &Path) -> std::io::Result<(Sha256, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            return Ok((h, len));
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
}

/// A new client id: `agent-` and 16 random hex digits.
pub fn new_client_id() -> String {
    format!("agent-{:016x}", rand::random::<u64>())
}

/// Whether `id` is one a server accepts: 1 to 128 printable ASCII characters, no space.
pub fn valid_client_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// An agent's data dir, or none (a load-test agent keeps everything in memory).
#[derive(Debug, Clone)]
pub struct Home {
    root: Option<PathBuf>,
    keep_versions: usize,
    /// In memory only: the version every agent of a load test starts holding.
    holding: Option<Arc<Holding>>,
}

impl Home {
    /// Everything in memory: content is checked and dropped, state lives as long as the agent.
    pub fn memory() -> Home {
        Home {
            root: None,
            keep_versions: 0,
            holding: None,
        }
    }

    /// In memory, starting with `holding` as the current version of its name (the agent's
    /// first round then wants only what is newer, and may rebuild it from a delta).
    pub fn memory_holding(holding: Arc<Holding>) -> Home {
        Home {
            holding: Some(holding),
            ..Home::memory()
        }
    }

    /// The data dir `root`, made (mode 0700) with its sub-directories if missing.
    pub fn dir(root: &Path, keep_versions: usize) -> Result<Home, HomeError> {
        for sub in ["", "content", "versions", "partial", "spool"] {
            make_dir(&root.join(sub))?;
        }
        Ok(Home {
            root: Some(root.to_path_buf()),
            keep_versions,
            holding: None,
        })
    }

    /// The data dir, if any.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The client id: the one in `client_id` if there is one (a `given` one must match it),
    /// else `given`, else a new one; written (mode 0600) on first start.
    pub fn client_id(&self, given: Option<&str>) -> Result<String, HomeError> {
        let Some(root) = &self.root else {
            return Ok(given.map(str::to_string).unwrap_or_else(new_client_id));
        };
        let path = root.join("client_id");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let id = text.trim().to_string();
                if !valid_client_id(&id) {
                    return Err(HomeError::Bad {
                        path,
                        reason: "not a client id (1 to 128 printable characters)".into(),
                    });
                }
                if let Some(g) = given {
                    if g != id {
                        return Err(HomeError::Bad {
                            path,
                            reason: format!(
                                "this data dir belongs to client {id:?}, not --client-id {g:?}"
                            ),
                        });
                    }
                }
                Ok(id)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = given.map(str::to_string).unwrap_or_else(new_client_id);
                write_atomic(&path, format!("{id}\n").as_bytes(), 0o600)?;
                Ok(id)
            }
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The credential this client got when it enrolled (`credential`, mode 0600), if any.
    pub fn credential(&self) -> Result<Option<String>, HomeError> {
        let Some(root) = &self.root else {
            return Ok(None);
        };
        let path = root.join("credential");
        match std::fs::read_to_string(&path) {
            Ok(text) if text.trim().is_empty() => Ok(None),
            Ok(text) => Ok(Some(text.trim().to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Keeps the credential an enrolment brought (memory: nothing).
    pub fn save_credential(&self, credential: &str) -> Result<(), HomeError> {
        match &self.root {
            Some(root) => write_atomic(
                &root.join("credential"),
                format!("{credential}\n").as_bytes(),
                0o600,
            ),
            None => Ok(()),
        }
    }

    /// The saved state; a `state.json` that does not decode is set aside as
    /// `state.json.bad` (logged) and the agent starts afresh: it only costs downloads again.
    pub fn load(&self) -> Result<Saved, HomeError> {
        let Some(root) = &self.root else {
            let mut saved = Saved::default();
            if let Some(h) = &self.holding {
                saved.items.insert(
                    h.name.clone(),
                    Held {
                        sha256: h.sha256.clone(),
                        version: None,
                        size: h.bytes.len() as u64,
                    },
                );
            }
            return Ok(saved);
        };
        load_state(root, true)
    }

    /// Writes the state (memory: nothing).
    pub fn save(&self, saved: &Saved) -> Result<(), HomeError> {
        let Some(root) = &self.root else {
            return Ok(());
        };
        let mut saved = saved.clone();
        saved.updated_at = chrono::Utc::now().to_rfc3339();
        let bytes = serde_json::to_vec_pretty(&saved).map_err(|e| HomeError::Bad {
            path: root.join("state.json"),
            reason: e.to_string(),
        })?;
        write_atomic(&root.join("state.json"), &bytes, 0o600)
    }

    /// Replaces `policy.json` with `bytes` (memory: nothing).
    pub fn write_policy(&self, bytes: &[u8]) -> Result<(), HomeError> {
        match &self.root {
            Some(root) => write_atomic(&root.join("policy.json"), bytes, 0o644),
            None => Ok(()),
        }
    }

    /// The partial download of `sha256`, if kept on disk.
    pub fn partial_path(&self, sha256: &str) -> Option<PathBuf> {
        self.root.as_ref().map(|r| r.join("partial").join(sha256))
    }

    /// Whether the bytes of `held`, the current version of `name`, can be had to rebuild from
    /// (at most `max` bytes): a cheap look before a delta is downloaded.
    pub fn can_give(&self, name: &str, held: &Held, max: u64) -> bool {
        match &self.root {
            None => self.holding.as_ref().is_some_and(|h| {
                h.name == name && h.sha256 == held.sha256 && h.bytes.len() as u64 <= max
            }),
            Some(root) => std::fs::metadata(root.join("content").join(name))
                .is_ok_and(|m| m.is_file() && m.len() <= max),
        }
    }

    /// The bytes of `held`, the current version of `name`, to rebuild from: at most `max`
    /// bytes, read whole into memory (blocking: call it off the async threads). Its digest is
    /// not checked here: a reference that changed on disk rebuilds bytes whose SHA-256 fails.
    pub fn held_bytes(&self, name: &str, held: &Held, max: u64) -> Result<bytes::Bytes, HomeError> {
        let Some(root) = &self.root else {
            return match &self.holding {
                Some(h) if h.name == name && h.sha256 == held.sha256 => Ok(h.bytes.clone()),
                _ => Err(HomeError::Bad {
                    path: PathBuf::from(name),
                    reason: "this agent keeps no content in memory".into(),
                }),
            };
        };
        let path = root.join("content").join(name);
        let f = std::fs::File::open(&path).map_err(io(&path))?;
        let len = f.metadata().map_err(io(&path))?.len();
        if len > max {
            return Err(HomeError::Bad {
                path,
                reason: format!("{len} bytes, more than the {max} rebuilt from"),
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        // One byte more than expected shows a file that grew meanwhile.
        std::io::Read::read_to_end(&mut std::io::Read::take(f, len + 1), &mut bytes)
            .map_err(io(&path))?;
        if bytes.len() as u64 != len {
            return Err(HomeError::Bad {
                path,
                reason: "changed while it was read".into(),
            });
        }
        Ok(bytes.into())
    }

    /// Writes a version rebuilt from a delta (its SHA-256 checked) as the partial of `sha256`,
    /// synced, ready for [`Home::install`] (memory: nothing).
    pub fn write_partial(&self, sha256: &str, bytes: &[u8]) -> Result<(), HomeError> {
        let Some(path) = self.partial_path(sha256) else {
            return Ok(());
        };
        let result = (|| {
            let mut f = std::fs::File::create(&path).map_err(io(&path))?;
            f.write_all(bytes).map_err(io(&path))?;
            f.sync_data().map_err(io(&path))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        result
    }

    /// Drops a partial download.
    pub fn discard_partial(&self, sha256: &str) {
        if let Some(p) = self.partial_path(sha256) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Makes the checked partial of `new` the current `content/<name>`; the one it replaces
    /// (`old`) moves to `versions/<name>/`, of which the newest `keep_versions` stay.
    pub fn install(&self, name: &str, new: &str, old: Option<&str>) -> Result<(), HomeError> {
        let Some(root) = &self.root else {
            return Ok(());
        };
        let current = root.join("content").join(name);
        let partial = root.join("partial").join(new);
        if let Some(old) = old.filter(|o| *o != new) {
            if current.exists() {
                let dir = root.join("versions").join(name);
                make_dir(&dir)?;
                let kept = dir.join(old);
                std::fs::rename(&current, &kept).map_err(io(&kept))?;
                sync_dir(&dir)?;
            }
        }
        std::fs::rename(&partial, &current).map_err(io(&current))?;
        sync_dir(&root.join("content"))?;
        self.prune_versions(name)
    }

    /// Keeps the newest `keep_versions` files of `versions/<name>/`.
    fn prune_versions(&self, name: &str) -> Result<(), HomeError> {
        let Some(root) = &self.root else {
            return Ok(());
        };
        let dir = root.join("versions").join(name);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Ok(());
        };
        let mut files: Vec<(std::time::SystemTime, PathBuf)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let modified = e.metadata().ok()?.modified().ok()?;
                Some((modified, e.path()))
            })
            .collect();
        files.sort_by_key(|f| std::cmp::Reverse(f.0));
        for (_, path) in files.into_iter().skip(self.keep_versions) {
            std::fs::remove_file(&path).map_err(io(&path))?;
        }
        Ok(())
    }
}

/// Reads `root/state.json` (for `gup agent status` too, which never sets a bad file aside).
pub fn load_state(root: &Path, set_aside_bad: bool) -> Result<Saved, HomeError> {
    let path = root.join("state.json");
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(s) => Ok(s),
            Err(e) if set_aside_bad => {
                tracing::warn!(path = %path.display(), error = %e, "state file does not decode; set aside as state.json.bad, starting afresh");
                let _ = std::fs::rename(&path, root.join("state.json.bad"));
                Ok(Saved::default())
            }
            Err(e) => Err(HomeError::Bad {
                path,
                reason: e.to_string(),
            }),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Saved::default()),
        Err(e) => Err(io(&path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_content_are_refused() {
        for bad in [
            "", ".", "..", "../x", "a/b", "a\\b", ".hidden", "a\0b", "a\nb",
        ] {
            assert!(!safe_name(bad), "{bad:?}");
        }
        assert!(!safe_name(&"x".repeat(201)));
        for good in ["defs.bin", "engine 12.1", "définitions"] {
            assert!(safe_name(good), "{good:?}");
        }
    }

    #[test]
    fn the_client_id_is_made_once_private_and_a_different_given_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::dir(dir.path(), 2).unwrap();
        let id = home.client_id(None).unwrap();
        assert!(valid_client_id(&id));
        assert_eq!(home.client_id(None).unwrap(), id);
        assert_eq!(home.client_id(Some(&id)).unwrap(), id);
        assert!(home.client_id(Some("other")).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("client_id"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn install_keeps_the_previous_versions_it_is_told_to() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::dir(dir.path(), 2).unwrap();
        let mut old: Option<String> = None;
        for n in 0..4 {
            let sha = format!("{n:064}");
            std::fs::write(home.partial_path(&sha).unwrap(), format!("v{n}")).unwrap();
            home.install("defs.bin", &sha, old.as_deref()).unwrap();
            old = Some(sha);
            // Distinct modification times for the pruning order.
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let current = std::fs::read_to_string(dir.path().join("content/defs.bin")).unwrap();
        assert_eq!(current, "v3");
        let mut kept: Vec<String> = std::fs::read_dir(dir.path().join("versions/defs.bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        kept.sort();
        assert_eq!(kept, vec![format!("{:064}", 1), format!("{:064}", 2)]);
    }

    #[test]
    fn the_version_held_is_read_back_to_rebuild_from_within_its_bound() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::dir(dir.path(), 2).unwrap();
        let sha = format!("{:064}", 1);
        std::fs::write(home.partial_path(&sha).unwrap(), b"version one").unwrap();
        home.install("defs.bin", &sha, None).unwrap();
        let held = Held {
            sha256: sha.clone(),
            version: None,
            size: 11,
        };
        assert!(home.can_give("defs.bin", &held, 100));
        assert_eq!(
            &home.held_bytes("defs.bin", &held, 100).unwrap()[..],
            b"version one"
        );
        // Over the bound, or a name not held: not given.
        assert!(!home.can_give("defs.bin", &held, 10));
        assert!(home.held_bytes("defs.bin", &held, 10).is_err());
        assert!(!home.can_give("other.bin", &held, 100));
        assert!(home.held_bytes("other.bin", &held, 100).is_err());
        // A rebuilt version becomes the partial that installs.
        let new = format!("{:064}", 2);
        home.write_partial(&new, b"version two").unwrap();
        home.install("defs.bin", &new, Some(&sha)).unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("content/defs.bin")).unwrap(),
            b"version two"
        );
    }

    #[test]
    fn a_crowd_in_memory_starts_holding_one_shared_version() {
        let h = Arc::new(Holding::new(
            "defs.bin".into(),
            bytes::Bytes::from_static(b"v1"),
        ));
        let home = Home::memory_holding(h.clone());
        let saved = home.load().unwrap();
        let held = saved.items.get("defs.bin").unwrap();
        assert_eq!(held.sha256, hex::encode(Sha256::digest(b"v1")));
        assert_eq!(held.size, 2);
        assert!(home.can_give("defs.bin", held, 10));
        assert_eq!(&home.held_bytes("defs.bin", held, 10).unwrap()[..], b"v1");
        // Once it moved on (a version it keeps no bytes of), or for another name: nothing.
        let other = Held {
            sha256: format!("{:064}", 7),
            ..held.clone()
        };
        assert!(!home.can_give("defs.bin", &other, 10));
        assert!(!home.can_give("x.bin", held, 10));
        assert!(!Home::memory().can_give("defs.bin", held, 10));
        assert!(Home::memory().load().unwrap().items.is_empty());
        // Nothing is written anywhere.
        home.write_partial(&held.sha256, b"v2").unwrap();
    }

    #[test]
    fn delta_counts_add_up_and_keep_the_newest_reason() {
        let mut total = DeltaCounts::default();
        let round = DeltaCounts {
            via_delta: 1,
            delta_bytes: 10,
            fallbacks: 1,
            last_fallback: Some("a".into()),
            ..DeltaCounts::default()
        };
        total.add(&round);
        total.add(&DeltaCounts {
            via_full: 1,
            full_bytes: 100,
            ..DeltaCounts::default()
        });
        assert_eq!(
            (
                total.via_delta,
                total.delta_bytes,
                total.via_full,
                total.full_bytes,
                total.fallbacks
            ),
            (1, 10, 1, 100, 1)
        );
        assert_eq!(total.last_fallback.as_deref(), Some("a"));
        // An old state.json without the counts reads as zero counts.
        let old: Saved = serde_json::from_str(r#"{"catalog_revision": 3}"#).unwrap();
        assert_eq!(old.deltas, DeltaCounts::default());
    }

    #[test]
    fn a_state_that_does_not_decode_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::dir(dir.path(), 2).unwrap();
        std::fs::write(dir.path().join("state.json"), b"{not json").unwrap();
        assert!(load_state(dir.path(), false).is_err());
        assert_eq!(home.load().unwrap(), Saved::default());
        assert!(dir.path().join("state.json.bad").exists());
        let saved = Saved {
            catalog_revision: 4,
            ..Saved::default()
        };
        home.save(&saved).unwrap();
        assert_eq!(home.load().unwrap().catalog_revision, 4);
    }
}
