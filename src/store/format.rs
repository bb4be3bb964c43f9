//! The data dir's format version: the one check every start goes through.
//!
//! Owns `data_dir/format`, a one-line text file holding the format number of the data dir,
//! written when the dir is made and after each upgrade. A file beside the database rather
//! than a sled key: it is read before sled opens anything, so an older gup refuses a newer
//! dir without its sled ever touching (and perhaps rewriting) the newer files, and it says
//! what the dir is even if the engine under `db/` changes one day; `cat DIR/format` answers
//! an operator. The price, that it is not written atomically with the records an upgrade
//! moves, is paid by the upgrades: each step is safe to repeat, so a crash between the last
//! record moved and the new number written only runs the step again.
//!
//! | format | made by | what changed |
//! |---|---|---|
//! | 1 | gup 0.1.0 and before (no `format` file) | |
//! | 2 | this gup | the `format` file; the manager's trees of the older event format are moved once, at the upgrade, instead of being looked for at every start |
//!
//! It must never downgrade a dir, nor start on one of a format it does not know.

use std::io::Write;
use std::path::Path;

use super::{fsync_dir, io, StoreError};

/// The format this gup writes, and the newest it reads.
pub const FORMAT: u32 = 2;

/// The format of a data dir made before the format was recorded (no `format` file beside a
/// database): gup 0.1.0's.
pub const UNRECORDED: u32 = 1;

/// The file's name in the data dir.
pub const FORMAT_FILE: &str = "format";

/// What the data dir says of its format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Nothing yet: a new data dir.
    New,
    /// Made by a gup that wrote this format (or [`UNRECORDED`] for one with a database and
    /// no file).
    Format(u32),
}

/// Reads the data dir's format.
pub(super) fn read(data_dir: &Path) -> Result<Found, StoreError> {
    let path = data_dir.join(FORMAT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let n = text
                .trim()
                .parse::<u32>()
                .map_err(|_| StoreError::BadFormatFile {
                    path: path.display().to_string(),
                    text: text.trim().chars().take(40).collect(),
                })?;
            Ok(Found::Format(n))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if data_dir.join("db").exists() {
                Ok(Found::Format(UNRECORDED))
            } else {
                Ok(Found::New)
            }
        }
        Err(e) => Err(io(format!("reading {}", path.display()))(e)),
    }
}

/// Refuses a format newer than this gup's.
pub(super) fn check(data_dir: &Path, found: Found) -> Result<(), StoreError> {
    match found {
        Found::Format(n) if n > FORMAT => Err(StoreError::TooNew {
            dir: data_dir.display().to_string(),
            found: n,
        }),
        _ => Ok(()),
    }
}

/// Records `format` durably: a temp file, synced, renamed over the old one, the directory
/// synced.
pub(super) fn write(data_dir: &Path, format: u32) -> Result<(), StoreError> {
    let path = data_dir.join(FORMAT_FILE);
    let tmp = data_dir.join(format!(".{FORMAT_FILE}.{}.tmp", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            writeln!(f, "{format}")?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(format!("writing {}", path.display()))(e));
    }
    fsync_dir(data_dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_unrecorded_and_written() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), Found::New);
        std::fs::create_dir(dir.path().join("db")).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Found::Format(UNRECORDED));
        write(dir.path(), FORMAT).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Found::Format(FORMAT));
        assert!(check(dir.path(), Found::Format(FORMAT)).is_ok());
        let e = check(dir.path(), Found::Format(FORMAT + 1)).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(&format!("format {}", FORMAT + 1)), "{text}");
        assert!(text.contains(&format!("up to {FORMAT}")), "{text}");
        std::fs::write(dir.path().join(FORMAT_FILE), "two\n").unwrap();
        assert!(matches!(
            read(dir.path()),
            Err(StoreError::BadFormatFile { .. })
        ));
    }
}
