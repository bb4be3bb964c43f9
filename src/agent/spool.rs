//! Events waiting to be uploaded: files in `DIR/spool/` for `gup agent`, a list in memory for a
//! load-test agent.
//!
//! Owns the spool's format and bounds. Other programs (and `gup agent event`) drop one event
//! per file, `*.json`, written under another name and renamed in (so a half-written file is
//! never read): `{kind, subkind, data}` and optionally `id` and `time`; a missing `id` is the
//! file's stem and a missing `time` the file's modification time, so that an event re-sent
//! after a crash keeps its id and the server stores it once. A file is removed only after the
//! server answered 202 for it: a kill -9 loses none. A file that does not decode or is over
//! [`MAX_EVENT_BYTES`] moves to `spool/bad/` (logged), never blocking the rest. It must never
//! send anything: the agent uploads what [`Spool::batch`] gives and then calls
//! [`Spool::remove`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;

use super::home::{write_atomic, HomeError};
use super::wire::EventOut;

/// Events a spool holds at most; `gup agent event` refuses more (a load-test agent drops the
/// oldest).
pub const MAX_SPOOLED: usize = 100_000;
/// One event file's size at most.
pub const MAX_EVENT_BYTES: u64 = 64 * 1024;
/// Events in one upload at most.
pub const BATCH_EVENTS: usize = 500;
/// JSON bytes of one upload at most (the servers take 1 MiB).
pub const BATCH_BYTES: usize = 512 * 1024;

/// Why an event could not be spooled.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("the spool holds {MAX_SPOOLED} events already; the agent uploads them when it can reach a server")]
    Full,
    #[error("event: {0}")]
    Bad(String),
    #[error(transparent)]
    Home(#[from] HomeError),
}

/// An event file as other programs write it.
#[derive(Deserialize)]
struct Dropped {
    #[serde(default)]
    id: Option<String>,
    kind: String,
    #[serde(default)]
    subkind: String,
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    data: serde_json::Value,
}

/// An event's place in the spool (its file name, or its position in memory).
pub type Key = String;

/// The events waiting.
#[derive(Debug)]
pub struct Spool {
    dir: Option<PathBuf>,
    /// Dir spool: the events read so far, by file name (files are read once). Memory spool:
    /// the events themselves, by a sequence key.
    known: Mutex<BTreeMap<Key, EventOut>>,
    next: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Spool {
    /// The spool under `root/spool` (none: in memory).
    pub fn new(root: Option<&Path>) -> Spool {
        Spool {
            dir: root.map(|r| r.join("spool")),
            known: Mutex::new(BTreeMap::new()),
            next: Mutex::new(0),
        }
    }

    /// Adds an event (a file for a dir spool), checking its kind and size.
    pub fn add(&self, ev: EventOut) -> Result<(), SpoolError> {
        if ev.kind.is_empty() || ev.kind.len() > 64 || ev.subkind.len() > 64 {
            return Err(SpoolError::Bad(
                "kind must be 1 to 64 characters, subkind at most 64".into(),
            ));
        }
        let bytes = serde_json::to_vec(&ev).map_err(|e| SpoolError::Bad(e.to_string()))?;
        if bytes.len() as u64 > MAX_EVENT_BYTES {
            return Err(SpoolError::Bad(format!(
                "an event is at most {MAX_EVENT_BYTES} bytes of JSON"
            )));
        }
        match &self.dir {
            Some(dir) => {
                if count_files(dir) >= MAX_SPOOLED {
                    return Err(SpoolError::Full);
                }
                let name = format!(
                    "{:013}-{:08x}.json",
                    chrono::Utc::now().timestamp_millis().max(0),
                    rand::random::<u32>()
                );
                write_atomic(&dir.join(name), &bytes, 0o600)?;
            }
            None => {
                let mut known = lock(&self.known);
                if known.len() >= MAX_SPOOLED {
                    known.pop_first();
                }
                let mut next = lock(&self.next);
                *next += 1;
                known.insert(format!("{:020}", *next), ev);
            }
        }
        Ok(())
    }

    /// Reads files dropped since the last look and forgets files gone; oldest first.
    fn refresh(&self) {
        let Some(dir) = &self.dir else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".json") && !n.starts_with('.'))
            .collect();
        names.sort();
        names.truncate(MAX_SPOOLED);
        let mut known = lock(&self.known);
        known.retain(|k, _| names.binary_search(k).is_ok());
        for name in names {
            if known.contains_key(&name) {
                continue;
            }
            let path = dir.join(&name);
            match read_event(&path, &name) {
                Ok(ev) => {
                    known.insert(name, ev);
                }
                Err(reason) => {
                    tracing::warn!(file = %path.display(), %reason, "spooled event set aside in spool/bad");
                    let bad = dir.join("bad");
                    let _ = std::fs::create_dir_all(&bad);
                    let _ = std::fs::rename(&path, bad.join(&name));
                }
            }
        }
    }

    /// The oldest events, at most [`BATCH_EVENTS`] and [`BATCH_BYTES`] of JSON; only the
    /// critical ones when `critical_only`.
    pub fn batch(&self, critical_only: bool) -> Vec<(Key, EventOut)> {
        self.refresh();
        let known = lock(&self.known);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for (k, ev) in known.iter() {
            if critical_only && !ev.is_critical() {
                continue;
            }
            let size = serde_json::to_vec(ev).map(|b| b.len()).unwrap_or(0) + 1;
            if out.len() >= BATCH_EVENTS || (bytes + size > BATCH_BYTES && !out.is_empty()) {
                break;
            }
            bytes += size;
            out.push((k.clone(), ev.clone()));
        }
        out
    }

    /// Whether a critical event waits.
    pub fn has_critical(&self) -> bool {
        self.refresh();
        lock(&self.known).values().any(EventOut::is_critical)
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.refresh();
        lock(&self.known).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets uploaded events (a dir spool removes their files).
    pub fn remove(&self, keys: &[Key]) {
        let mut known = lock(&self.known);
        for k in keys {
            known.remove(k);
            if let Some(dir) = &self.dir {
                if let Err(e) = std::fs::remove_file(dir.join(k)) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(file = %k, error = %e, "cannot remove an uploaded event's file; it will be sent again and stored once");
                    }
                }
            }
        }
    }
}

impl Spool {
    /// Sets aside events a server refused as bad (a dir spool moves their files to
    /// `spool/bad/`), so they never block the others.
    pub fn reject(&self, keys: &[Key]) {
        let mut known = lock(&self.known);
        for k in keys {
            known.remove(k);
            if let Some(dir) = &self.dir {
                let bad = dir.join("bad");
                let _ = std::fs::create_dir_all(&bad);
                let _ = std::fs::rename(dir.join(k), bad.join(k));
            }
        }
    }
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|e| e.filter_map(Result::ok).count())
        .unwrap_or(0)
}

fn read_event(path: &Path, name: &str) -> Result<EventOut, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > MAX_EVENT_BYTES {
        return Err(format!("over {MAX_EVENT_BYTES} bytes"));
    }
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let d: Dropped = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    if d.kind.is_empty() || d.kind.len() > 64 || d.subkind.len() > 64 {
        return Err("kind must be 1 to 64 characters, subkind at most 64".into());
    }
    let stem = name.trim_end_matches(".json");
    let id =
        d.id.filter(|i| !i.is_empty())
            .unwrap_or_else(|| stem.to_string());
    if id.len() > 128 {
        return Err("id over 128 characters".into());
    }
    let time = d.time.unwrap_or_else(|| {
        let at: chrono::DateTime<chrono::Utc> = meta
            .modified()
            .map(Into::into)
            .unwrap_or_else(|_| chrono::Utc::now());
        at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    });
    Ok(EventOut {
        id,
        kind: d.kind,
        subkind: d.subkind,
        time,
        data: d.data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, kind: &str, subkind: &str) -> EventOut {
        EventOut {
            id: id.into(),
            kind: kind.into(),
            subkind: subkind.into(),
            time: "2026-12-03T00:00:00Z".into(),
            data: serde_json::json!({}),
        }
    }

    #[test]
    fn dropped_files_are_read_once_removed_after_upload_and_bad_ones_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("spool")).unwrap();
        let spool = Spool::new(Some(dir.path()));
        spool.add(ev("a", "system_change", "x")).unwrap();
        std::fs::write(
            dir.path().join("spool/0000000000001-other.json"),
            br#"{"kind":"risk","subkind":"virus"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("spool/0000000000002-bad.json"), b"{").unwrap();
        assert_eq!(spool.len(), 2);
        assert!(dir.path().join("spool/bad/0000000000002-bad.json").exists());
        assert!(spool.has_critical());
        let critical = spool.batch(true);
        assert_eq!(critical.len(), 1);
        assert_eq!(
            critical[0].1.id, "0000000000001-other",
            "the stem is the id"
        );
        spool.remove(&[critical[0].0.clone()]);
        assert!(!spool.has_critical());
        let rest = spool.batch(false);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].1.id, "a");
        spool.remove(&[rest[0].0.clone()]);
        assert!(spool.is_empty());
        assert_eq!(
            count_files(&dir.path().join("spool")),
            1,
            "only bad/ is left"
        );
    }

    #[test]
    fn batches_are_bounded_and_bad_events_refused() {
        let spool = Spool::new(None);
        for n in 0..(BATCH_EVENTS + 10) {
            spool.add(ev(&n.to_string(), "system_change", "x")).unwrap();
        }
        assert_eq!(spool.batch(false).len(), BATCH_EVENTS);
        assert!(spool.add(ev("k", "", "")).is_err());
        let mut big = ev("big", "risk", "virus");
        big.data = serde_json::json!("x".repeat(MAX_EVENT_BYTES as usize));
        assert!(matches!(spool.add(big), Err(SpoolError::Bad(_))));
    }
}
