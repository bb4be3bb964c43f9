//! Secret files a server makes once at first start (tokens, the catalog key), safely when
//! two processes race to make the same one.
//!
//! Owns [`create_once`]: the contents go to a private temp file beside the target (mode
//! 0600, synced), which is then hard-linked to the target name. `link(2)` fails when the name
//! exists, so exactly one racer wins and nobody ever sees the file half written; a loser is
//! told [`Made::Existed`] and reads the winner's file. (Measured before: `gup manager &` and
//! `gup manager --print-node-token` started together failed 2 times in 30 with `File exists`,
//! and the loser went on with an empty token.) It must never overwrite an existing file.

use std::io::Write;
use std::path::Path;

/// Whether [`create_once`] made the file or found one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    /// This call made it with the given contents.
    Created,
    /// It existed already (made earlier, or by a racer a moment ago): read it.
    Existed,
}

/// Makes `path` with `contents` (mode 0600) unless it exists. Creates the parent directory.
pub fn create_once(path: &Path, contents: &[u8]) -> std::io::Result<Made> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    if path.exists() {
        return Ok(Made::Existed);
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{file_name}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = write_private(&tmp, contents);
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            // The new name is durable only once the directory is.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(Made::Created)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(Made::Existed),
        Err(e) => Err(e),
    }
}

fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_racer_wins_and_the_others_read_its_file_whole() {
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("sub").join("x.token");
            let made: Vec<(Made, String)> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|i| {
                        let path = path.clone();
                        s.spawn(move || {
                            let mine = format!("secret-{round}-{i}\n");
                            let m = create_once(&path, mine.as_bytes()).unwrap();
                            (m, mine)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let winners: Vec<&String> = made
                .iter()
                .filter(|(m, _)| *m == Made::Created)
                .map(|(_, s)| s)
                .collect();
            assert_eq!(winners.len(), 1, "exactly one racer makes the file");
            assert_eq!(&std::fs::read_to_string(&path).unwrap(), winners[0]);
            let left: Vec<_> = std::fs::read_dir(path.parent().unwrap())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(left.len(), 1, "no temp file is left behind: {left:?}");
        }
    }

    #[cfg(unix)]
    #[test]
    fn private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        assert_eq!(create_once(&path, b"a").unwrap(), Made::Created);
        assert_eq!(create_once(&path, b"b").unwrap(), Made::Existed);
        assert_eq!(std::fs::read(&path).unwrap(), b"a");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
