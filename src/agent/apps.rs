//! The applications an agent reports when learning is on: the executables under its
//! `--apps-dir` directories.
//!
//! Owns the scan (bounded: [`MAX_DEPTH`] levels, [`MAX_FILES`] files, symlinks not followed),
//! what counts as an executable (a file with an execute bit, or a name ending in `.exe`,
//! `.dll`, `.msi`, `.app`), each one's name, path, size and SHA-256 (hashed again only when its
//! size or modification time changed), and the fingerprint that tells the agent whether the
//! set changed since it last reported. It must never send anything and never follow a link
//! out of the directories it was given.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest as _, Sha256};

use super::home::hash_file;
use super::wire::AppOut;

/// Directory levels under an `--apps-dir` that are scanned.
pub const MAX_DEPTH: usize = 8;
/// Files one scan reports at most.
pub const MAX_FILES: usize = 10_000;

/// What a scan remembers of a file so that an unchanged one is not hashed again.
#[derive(Debug, Default)]
pub struct Scanner {
    seen: HashMap<PathBuf, (u64, SystemTime, String)>,
}

fn looks_executable(path: &Path, meta: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if meta.permissions().mode() & 0o111 != 0 {
            return true;
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        matches!(
            e.to_ascii_lowercase().as_str(),
            "exe" | "dll" | "msi" | "app"
        )
    })
}

impl Scanner {
    /// The executables under `dirs`, sorted by path, and their fingerprint.
    pub fn scan(&mut self, dirs: &[PathBuf]) -> (Vec<AppOut>, String) {
        let mut found: BTreeMap<PathBuf, AppOut> = BTreeMap::new();
        let mut next: HashMap<PathBuf, (u64, SystemTime, String)> = HashMap::new();
        let mut stack: Vec<(PathBuf, usize)> = dirs.iter().map(|d| (d.clone(), 0)).collect();
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.filter_map(Result::ok) {
                if found.len() >= MAX_FILES {
                    break;
                }
                let path = entry.path();
                // symlink_metadata: a link is neither followed nor reported.
                let Ok(meta) = std::fs::symlink_metadata(&path) else {
                    continue;
                };
                if meta.is_dir() {
                    if depth < MAX_DEPTH {
                        stack.push((path, depth + 1));
                    }
                    continue;
                }
                if !meta.is_file() || !looks_executable(&path, &meta) {
                    continue;
                }
                let size = meta.len();
                let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                let sha = match self.seen.get(&path) {
                    Some((s, m, sha)) if *s == size && *m == mtime => sha.clone(),
                    _ => match hash_file(&path) {
                        Ok((h, _)) => hex::encode(h.finalize()),
                        Err(_) => continue,
                    },
                };
                next.insert(path.clone(), (size, mtime, sha.clone()));
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                found.insert(
                    path.clone(),
                    AppOut {
                        name,
                        version: None,
                        path: path.to_string_lossy().into_owned(),
                        size,
                        sha256: sha,
                    },
                );
            }
        }
        self.seen = next;
        let apps: Vec<AppOut> = found.into_values().collect();
        let mut h = Sha256::new();
        for a in &apps {
            h.update(a.path.as_bytes());
            h.update([0]);
            h.update(a.size.to_le_bytes());
            h.update(a.sha256.as_bytes());
        }
        (apps, hex::encode(h.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_are_found_and_a_change_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/tool.exe"), b"MZ").unwrap();
        std::fs::write(dir.path().join("readme.txt"), b"text").unwrap();
        let mut s = Scanner::default();
        let (apps, fp) = s.scan(&[dir.path().to_path_buf()]);
        assert_eq!(apps.len(), 1);
        assert_eq!(apps[0].name, "tool.exe");
        assert_eq!(apps[0].size, 2);
        assert_eq!(apps[0].sha256, hex::encode(Sha256::digest(b"MZ")));
        assert_eq!(s.scan(&[dir.path().to_path_buf()]).1, fp, "unchanged");
        std::fs::write(dir.path().join("sub/tool.exe"), b"MZ2").unwrap();
        assert_ne!(s.scan(&[dir.path().to_path_buf()]).1, fp);
    }
}
