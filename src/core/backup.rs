//! The manager's backup file: what is in it, how it is written, and how it is checked.
//!
//! Owns the archive format both ends agree on: a tar of named entries whose last entry,
//! [`MANIFEST`], lists every other entry in order with its size and SHA-256, next to the
//! archive's [`BACKUP_FORMAT`], the gup version and data dir format that made it, when, and
//! what is inside. The manifest comes last because the archive is written as a stream (a
//! 1 GiB blob never sits in memory, so nothing is hashed before it is sent). [`verify`]
//! reads a whole archive and refuses it unless every entry is one this format names, each
//! matches its manifest line and a blob's bytes match its name; a restore runs it before it
//! writes anything. It must never decide what a role keeps in its data dir: the entries'
//! meaning is the manager's.
//!
//! | entry | what |
//! |---|---|
//! | `records.jsonl` | the database records, one JSON line each (`store::export`) |
//! | `catalog.json` | the catalog history served at the snapshot |
//! | `files/<name>` | the signing key and the tokens the data dir keeps ([`FILES`]) |
//! | `blobs/<sha256>` | with content: the bytes of every blob `catalog.json` names |
//! | `manifest.json` | the [`Manifest`], last |

use std::io::{Read, Write};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::digest::Digest;

/// The version of this archive format; [`verify`] refuses any other.
pub const BACKUP_FORMAT: u32 = 1;
/// The manifest's entry name: always the last entry.
pub const MANIFEST: &str = "manifest.json";
/// The database records.
pub const RECORDS: &str = "records.jsonl";
/// The catalog history.
pub const CATALOG: &str = "catalog.json";
/// Where blobs go: `blobs/<sha256>`.
pub const BLOBS: &str = "blobs/";
/// Where data dir files go: `files/<name>`.
pub const FILES_DIR: &str = "files/";
/// The data dir files a backup may hold, by name: secrets every one, so a backup file is a
/// secret too.
pub const FILES: &[&str] = &["catalog.key", "admin.token", "node.token"];
/// The largest manifest [`verify`] reads (a manifest line per blob: a million blobs fit).
const MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// What can be wrong with a backup file.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("reading the backup: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a gup backup: {0}")]
    NotABackup(String),
    #[error(
        "the backup is of archive format {found}; this gup ({}) reads format {BACKUP_FORMAT}",
        env!("CARGO_PKG_VERSION")
    )]
    Format { found: u32 },
    #[error("the backup is damaged: {0}")]
    Damaged(String),
}

/// One entry as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    pub name: String,
    pub size: u64,
    pub sha256: Digest,
}

/// The last entry of a backup: what made it and what is in it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// [`BACKUP_FORMAT`] of the writer.
    pub format: u32,
    /// The role whose data dir this is (`manager`).
    pub role: String,
    /// The gup version that wrote it.
    pub gup_version: String,
    /// The data dir format of the records (`store::FORMAT` of the writer): a restore by an
    /// older gup refuses a newer one, a newer gup upgrades it at the next start.
    pub store_format: u32,
    pub created_at: DateTime<Utc>,
    /// Whether the blobs of the catalog are inside.
    pub with_content: bool,
    /// The current catalog revision at the snapshot.
    pub catalog_revision: u64,
    /// How many database records (lines of [`RECORDS`]).
    pub records: u64,
    /// Every other entry, in archive order.
    pub entries: Vec<EntryInfo>,
}

impl Manifest {
    /// The blobs listed, with their sizes.
    pub fn blobs(&self) -> impl Iterator<Item = (Digest, u64)> + '_ {
        self.entries.iter().filter_map(|e| {
            let hex = e.name.strip_prefix(BLOBS)?;
            Some((hex.parse().ok()?, e.size))
        })
    }

    /// Bytes of every entry together.
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

/// What a backup's entry name means, or why it is not one of this format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryName {
    Records,
    Catalog,
    File(&'static str),
    Blob(Digest),
    Manifest,
}

impl EntryName {
    pub fn parse(name: &str) -> Result<EntryName, BackupError> {
        let unknown = || BackupError::NotABackup(format!("unexpected entry {name:?}"));
        Ok(match name {
            RECORDS => EntryName::Records,
            CATALOG => EntryName::Catalog,
            MANIFEST => EntryName::Manifest,
            _ => {
                if let Some(f) = name.strip_prefix(FILES_DIR) {
                    let known = FILES.iter().find(|k| **k == f).ok_or_else(unknown)?;
                    EntryName::File(known)
                } else if let Some(hex) = name.strip_prefix(BLOBS) {
                    EntryName::Blob(hex.parse().map_err(|_| unknown())?)
                } else {
                    return Err(unknown());
                }
            }
        })
    }
}

/// A reader that hashes and counts what passes through it.
pub struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> Hashing<R> {
    pub fn new(inner: R) -> Hashing<R> {
        Hashing {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// The digest and byte count of what was read.
    pub fn finish(self) -> (Digest, u64) {
        (Digest::from_hasher(self.hasher), self.count)
    }
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// Writes a backup archive entry by entry, collecting the manifest's lines.
pub struct ArchiveWriter<W: Write> {
    tar: tar::Builder<W>,
    entries: Vec<EntryInfo>,
    mtime: u64,
}

impl<W: Write> ArchiveWriter<W> {
    /// An archive whose entries are dated `created_at`.
    pub fn new(out: W, created_at: DateTime<Utc>) -> ArchiveWriter<W> {
        ArchiveWriter {
            tar: tar::Builder::new(out),
            entries: Vec::new(),
            mtime: created_at.timestamp().max(0) as u64,
        }
    }

    /// Appends the entry `name` of exactly `size` bytes read from `data`, hashing them; a
    /// reader that ends early is an error (the archive is then unusable). Returns the
    /// entry's digest.
    pub fn append(&mut self, name: &str, size: u64, data: impl Read) -> std::io::Result<Digest> {
        let mut header = tar::Header::new_gnu();
        header.set_size(size);
        header.set_mode(0o600);
        header.set_mtime(self.mtime);
        header.set_entry_type(tar::EntryType::Regular);
        let mut reader = Hashing::new(data.take(size));
        self.tar.append_data(&mut header, name, &mut reader)?;
        let (sha256, count) = reader.finish();
        if count != size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{name}: {count} bytes where {size} were announced"),
            ));
        }
        self.entries.push(EntryInfo {
            name: name.to_string(),
            size,
            sha256,
        });
        Ok(sha256)
    }

    /// Appends `bytes` as the entry `name`.
    pub fn append_bytes(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<Digest> {
        self.append(name, bytes.len() as u64, bytes)
    }

    /// Writes the manifest (with `manifest.entries` set to what was appended) and the end
    /// of the archive; returns the writer and the manifest.
    pub fn finish(mut self, mut manifest: Manifest) -> std::io::Result<(W, Manifest)> {
        manifest.entries = std::mem::take(&mut self.entries);
        let json = serde_json::to_vec_pretty(&manifest).map_err(std::io::Error::other)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(json.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(self.mtime);
        header.set_entry_type(tar::EntryType::Regular);
        self.tar.append_data(&mut header, MANIFEST, &json[..])?;
        let out = self.tar.into_inner()?;
        Ok((out, manifest))
    }
}

/// Reads a whole archive from `input` and checks it: every entry is one this format names,
/// a regular file, listed once in the manifest (the last entry) in the same order with the
/// same size and SHA-256, and a blob's SHA-256 is its name. Returns the manifest.
pub fn verify(input: impl Read) -> Result<Manifest, BackupError> {
    let mut archive = tar::Archive::new(input);
    let mut seen: Vec<EntryInfo> = Vec::new();
    let mut manifest: Option<Manifest> = None;
    let entries = archive
        .entries()
        .map_err(|e| BackupError::NotABackup(e.to_string()))?;
    for entry in entries {
        let entry = entry.map_err(|e| damaged_or_not(&seen, e))?;
        if manifest.is_some() {
            return Err(BackupError::Damaged(
                "an entry follows the manifest".to_string(),
            ));
        }
        let name = entry_name(&entry)?;
        if !entry.header().entry_type().is_file() {
            return Err(BackupError::NotABackup(format!(
                "entry {name:?} is not a regular file"
            )));
        }
        let size = entry.size();
        let kind = EntryName::parse(&name)?;
        if kind == EntryName::Manifest {
            if size > MAX_MANIFEST_BYTES {
                return Err(BackupError::NotABackup(format!(
                    "its manifest has {size} bytes, over {MAX_MANIFEST_BYTES}"
                )));
            }
            let mut text = Vec::with_capacity(size as usize);
            let mut entry = entry;
            entry.read_to_end(&mut text)?;
            let m: Manifest = serde_json::from_slice(&text)
                .map_err(|e| BackupError::NotABackup(format!("its manifest: {e}")))?;
            manifest = Some(m);
            continue;
        }
        if seen.iter().any(|e| e.name == name) {
            return Err(BackupError::Damaged(format!(
                "entry {name:?} appears twice"
            )));
        }
        let mut reader = Hashing::new(entry);
        std::io::copy(&mut reader, &mut std::io::sink())
            .map_err(|e| BackupError::Damaged(format!("entry {name:?}: {e}")))?;
        let (sha256, count) = reader.finish();
        if count != size {
            return Err(BackupError::Damaged(format!(
                "entry {name:?} is cut short ({count} of {size} bytes)"
            )));
        }
        if let EntryName::Blob(d) = kind {
            if d != sha256 {
                return Err(BackupError::Damaged(format!(
                    "blob {d} holds bytes whose SHA-256 is {sha256}"
                )));
            }
        }
        seen.push(EntryInfo { name, size, sha256 });
    }
    let Some(manifest) = manifest else {
        return Err(if seen.is_empty() {
            BackupError::NotABackup("it holds no entries".to_string())
        } else {
            BackupError::Damaged("it ends before its manifest (cut short?)".to_string())
        });
    };
    if manifest.format != BACKUP_FORMAT {
        return Err(BackupError::Format {
            found: manifest.format,
        });
    }
    check_listing(&manifest.entries, &seen)?;
    if !seen.iter().any(|e| e.name == RECORDS) || !seen.iter().any(|e| e.name == CATALOG) {
        return Err(BackupError::Damaged(format!(
            "it lacks {RECORDS} or {CATALOG}"
        )));
    }
    Ok(manifest)
}

/// Compares the manifest's listing with the entries read.
fn check_listing(listed: &[EntryInfo], seen: &[EntryInfo]) -> Result<(), BackupError> {
    for (i, l) in listed.iter().enumerate() {
        let Some(s) = seen.get(i) else {
            return Err(BackupError::Damaged(format!(
                "the manifest lists {:?}, which is not in the archive",
                l.name
            )));
        };
        if s.name != l.name {
            return Err(BackupError::Damaged(format!(
                "entry {} is {:?} where the manifest lists {:?}",
                i + 1,
                s.name,
                l.name
            )));
        }
        if s.size != l.size || s.sha256 != l.sha256 {
            return Err(BackupError::Damaged(format!(
                "entry {:?} does not match the manifest (size {} vs {}, sha256 {} vs {})",
                s.name, s.size, l.size, s.sha256, l.sha256
            )));
        }
    }
    if let Some(extra) = seen.get(listed.len()) {
        return Err(BackupError::Damaged(format!(
            "entry {:?} is not in the manifest",
            extra.name
        )));
    }
    Ok(())
}

/// An entry's name as UTF-8 (every name this format writes is).
pub fn entry_name<R: Read>(entry: &tar::Entry<'_, R>) -> Result<String, BackupError> {
    let bytes = entry.path_bytes();
    std::str::from_utf8(&bytes)
        .map(str::to_string)
        .map_err(|_| BackupError::NotABackup("an entry's name is not UTF-8".to_string()))
}

/// A tar error after some entries were read means a damaged archive; at the start, no
/// archive at all.
fn damaged_or_not(seen: &[EntryInfo], e: std::io::Error) -> BackupError {
    if seen.is_empty() {
        BackupError::NotABackup(e.to_string())
    } else {
        BackupError::Damaged(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            format: BACKUP_FORMAT,
            role: "manager".into(),
            gup_version: "test".into(),
            store_format: 2,
            created_at: Utc::now(),
            with_content: true,
            catalog_revision: 1,
            records: 1,
            entries: vec![],
        }
    }

    fn archive(blob: &[u8], name_of_blob: Option<&str>) -> Vec<u8> {
        let mut w = ArchiveWriter::new(Vec::new(), Utc::now());
        w.append_bytes(RECORDS, b"{}\n").unwrap();
        w.append_bytes(CATALOG, b"{}").unwrap();
        w.append_bytes("files/catalog.key", b"00").unwrap();
        let name = match name_of_blob {
            Some(n) => n.to_string(),
            None => format!("{BLOBS}{}", Digest::of(blob)),
        };
        w.append_bytes(&name, blob).unwrap();
        w.finish(manifest()).unwrap().0
    }

    #[test]
    fn a_written_archive_verifies_and_lists_its_entries() {
        let bytes = archive(b"hello", None);
        let m = verify(&bytes[..]).unwrap();
        assert_eq!(m.entries.len(), 4);
        assert_eq!(
            m.blobs().collect::<Vec<_>>(),
            vec![(Digest::of(b"hello"), 5)]
        );
    }

    #[test]
    fn damage_anywhere_is_found() {
        let good = archive(b"hello world", None);
        // Every byte flipped in an entry's data is noticed (headers are checksummed by tar).
        let at = good.windows(11).position(|w| w == b"hello world").unwrap();
        let mut bad = good.clone();
        bad[at] ^= 1;
        assert!(matches!(verify(&bad[..]), Err(BackupError::Damaged(_))));
        // Cut short: the manifest is missing.
        let cut = &good[..good.len() / 2];
        assert!(verify(cut).is_err());
        // Not a tar at all.
        assert!(matches!(
            verify(&b"just some text"[..]),
            Err(BackupError::NotABackup(_)) | Err(BackupError::Damaged(_))
        ));
        // A blob whose bytes are not its name.
        let wrong = archive(b"abc", Some(&format!("{BLOBS}{}", Digest::of(b"xyz"))));
        let e = verify(&wrong[..]).unwrap_err().to_string();
        assert!(e.contains("SHA-256"), "{e}");
        // An entry this format does not name.
        let odd = archive(b"abc", Some("etc/passwd"));
        assert!(matches!(verify(&odd[..]), Err(BackupError::NotABackup(_))));
    }

    #[test]
    fn another_archive_format_is_refused() {
        let mut w = ArchiveWriter::new(Vec::new(), Utc::now());
        w.append_bytes(RECORDS, b"").unwrap();
        w.append_bytes(CATALOG, b"{}").unwrap();
        let mut m = manifest();
        m.format = BACKUP_FORMAT + 1;
        let bytes = w.finish(m).unwrap().0;
        assert!(matches!(
            verify(&bytes[..]),
            Err(BackupError::Format { found }) if found == BACKUP_FORMAT + 1
        ));
    }
}
