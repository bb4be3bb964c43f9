//! Unit tests of the store: the write path, crash leftovers, the index and the kv trees.

use super::writer::Stages;
use super::*;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

async fn ingest(
    store: &Store,
    bytes: &[u8],
    expected: Option<&Digest>,
) -> Result<Digest, StoreError> {
    let mut w = store.writer().await?;
    for chunk in bytes.chunks(7000) {
        w.write(chunk).await?;
    }
    w.finish(expected.map(|d| (d, Some(bytes.len() as u64))))
        .await
        .map(|(d, _)| d)
}

fn tmp_entries(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("tmp")).unwrap().count()
}

#[tokio::test]
async fn stores_under_two_level_fanout_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let d = ingest(&store, &data, Some(&Digest::of(&data)))
        .await
        .unwrap();
    let hex = d.to_hex();
    let path = dir
        .path()
        .join("blobs")
        .join(&hex[..2])
        .join(&hex[2..4])
        .join(&hex);
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(store.get(&d).unwrap().size, data.len() as u64);
    assert_eq!(store.total_bytes(), data.len() as u64);
    assert_eq!(tmp_entries(dir.path()), 0);
}

#[tokio::test]
async fn digest_mismatch_is_rejected_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let wrong = Digest::of(b"something else");
    let err = ingest(&store, b"the real bytes", Some(&wrong))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(!store.contains(&Digest::of(b"the real bytes")));
    assert!(!store.contains(&wrong));
    assert_eq!(tmp_entries(dir.path()), 0);
    assert!(scan_blob_files(&dir.path().join("blobs"))
        .unwrap()
        .is_empty());
    assert_eq!(store.total_bytes(), 0);
}

#[tokio::test]
async fn dropped_writer_removes_its_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut w = store.writer().await.unwrap();
    w.write(&[1u8; 3 << 20]).await.unwrap();
    assert_eq!(tmp_entries(dir.path()), 1);
    drop(w);
    assert_eq!(tmp_entries(dir.path()), 0);
}

#[tokio::test]
async fn on_disk_follows_the_writing_stage() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut w = store.writer().await.unwrap();
    w.write(&[7u8; 3 << 20]).await.unwrap();
    assert_eq!(w.len(), 3 << 20);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while w.on_disk() < 3 << 20 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(w.on_disk(), 3 << 20);
    let on_file = std::fs::metadata(w.tmp_path()).unwrap().len();
    assert_eq!(on_file, 3 << 20);
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_failed_write_is_reported_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // A writer whose writing stage writes to /dev/full: every write fails with ENOSPC.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let tmp_path = dir.path().join("tmp").join("full.part");
    std::fs::write(&tmp_path, b"").unwrap();
    let on_disk = Arc::new(AtomicU64::new(0));
    let mut w = BlobWriter {
        store: store.clone(),
        tmp_path,
        stages: Some(Stages::start(full, on_disk.clone())),
        buffer: Vec::new(),
        accepted: 0,
        on_disk,
    };
    // The queues hold a few blocks, so the failure shows in a later write or in finish.
    let mut result = Ok(());
    for _ in 0..16 {
        result = w.write(&[1u8; 1 << 20]).await;
        if result.is_err() {
            break;
        }
    }
    let err = match result {
        Err(e) => {
            drop(w);
            e
        }
        Ok(()) => w.finish(None).await.unwrap_err(),
    };
    assert!(
        err.to_string().contains("No space left"),
        "the error names the cause: {err}"
    );
    assert_eq!(tmp_entries(dir.path()), 0);
    assert_eq!(store.total_bytes(), 0);
}

#[tokio::test]
async fn crash_leftovers_are_cleaned_and_index_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let d = {
        let store = Store::open(dir.path()).unwrap();
        let d = ingest(&store, b"persisted blob", None).await.unwrap();
        store.kv("meta").unwrap().put("answer", &42u32).unwrap();
        store.flush().await.unwrap();
        // A crash mid-write leaves a temp file behind (a killed process runs no Drop).
        std::fs::write(dir.path().join("tmp").join("0123.part"), b"half written").unwrap();
        d
    };
    assert_eq!(tmp_entries(dir.path()), 1);
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(tmp_entries(dir.path()), 0);
    let meta = store.get(&d).unwrap();
    assert_eq!(meta.size, b"persisted blob".len() as u64);
    let v: Option<u32> = store.kv("meta").unwrap().get("answer").unwrap();
    assert_eq!(v, Some(42));
    // Small: read into memory; nothing stays in use once read.
    let read = store.open_blob(&d, 1 << 20, true).await.unwrap().unwrap();
    assert_eq!(&read.bytes[..], b"persisted blob");
    assert!(store.in_use().is_empty());
    // Large (here: anything over 0 bytes): mapped, in use while any slice of it lives.
    let mapped = store.open_blob(&d, 0, true).await.unwrap().unwrap();
    assert_eq!(&mapped.bytes[..], b"persisted blob");
    let tail = mapped.bytes.slice(10..);
    drop(mapped);
    assert!(store.in_use().contains(&d), "a mapped blob is in use");
    assert_eq!(&tail[..], b"blob");
    drop(tail);
    assert!(store.in_use().is_empty());
    // Mapped without holding it (a cache entry): readable, not in use.
    let unheld = store.open_blob(&d, 0, false).await.unwrap().unwrap();
    assert_eq!(&unheld.bytes[..], b"persisted blob");
    assert!(store.in_use().is_empty());
}

#[tokio::test]
async fn concurrent_readers_of_a_large_blob_share_one_mapping_of_that_very_copy() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let content: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let d = ingest(&store, &content, None).await.unwrap();
    let a = store.open_blob(&d, 0, true).await.unwrap().unwrap();
    let b = store.open_blob(&d, 0, true).await.unwrap().unwrap();
    assert_eq!(
        a.bytes.as_ptr(),
        b.bytes.as_ptr(),
        "a second reader maps again"
    );
    assert!(b.bytes[..] == content[..]);
    // Unheld readers (cache entries) map on their own: they must not pin the blob.
    let unheld = store.open_blob(&d, 0, false).await.unwrap().unwrap();
    assert_ne!(unheld.bytes.as_ptr(), a.bytes.as_ptr());
    drop(unheld);
    // In use while either lives, and only while.
    drop(a);
    assert!(store.in_use().contains(&d));
    drop(b);
    assert!(store.in_use().is_empty());
    // Ended: the next reader maps anew, and is in use again.
    let c = store.open_blob(&d, 0, true).await.unwrap().unwrap();
    assert!(c.bytes[..] == content[..]);
    assert!(store.in_use().contains(&d));
    // The same digest stored again (after its removal) is another copy: never the old
    // mapping, which its reader still holds.
    let held = c.bytes.clone();
    drop(c);
    store.forget(&d).unwrap();
    let again = ingest(&store, &content, None).await.unwrap();
    assert_eq!(again, d);
    let fresh = store.open_blob(&d, 0, true).await.unwrap().unwrap();
    assert_ne!(
        fresh.bytes.as_ptr(),
        held.as_ptr(),
        "a new copy took the old mapping"
    );
    assert!(fresh.bytes[..] == content[..]);
}

#[tokio::test]
async fn a_blob_renamed_before_indexing_is_indexed_and_a_lost_file_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (kept, lost) = {
        let store = Store::open(dir.path()).unwrap();
        let kept = ingest(&store, b"kept", None).await.unwrap();
        let lost = ingest(&store, b"lost", None).await.unwrap();
        store.flush().await.unwrap();
        // Simulate: the index entry for `kept` never made it, the file for `lost` is gone.
        store.inner.index.remove(&kept.to_hex()).unwrap();
        std::fs::remove_file(store.blob_path(&lost)).unwrap();
        store.flush().await.unwrap();
        (kept, lost)
    };
    let store = Store::open(dir.path()).unwrap();
    assert!(store.contains(&kept));
    assert!(!store.contains(&lost));
    assert_eq!(store.total_bytes(), 4);
}

#[tokio::test]
async fn same_bytes_twice_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let a = ingest(&store, b"same", None).await.unwrap();
    let b = ingest(&store, b"same", None).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(store.list().len(), 1);
    assert_eq!(store.total_bytes(), 4);
    store.remove(&a).await.unwrap();
    assert_eq!(store.total_bytes(), 0);
    assert!(!store.blob_path(&a).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_flushes_all_complete_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let kv = store.kv("q").unwrap();
        let mut tasks = Vec::new();
        for i in 0..200u32 {
            let kv = kv.clone();
            tasks.push(tokio::spawn(async move {
                kv.put(&format!("{i:04}"), &i).unwrap();
                kv.flush().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.kv("q").unwrap().scan::<u32>("").unwrap().len(), 200);
}

#[tokio::test]
async fn kv_put_if_absent_and_scan() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let kv = store.kv("t").unwrap();
    assert!(kv.put_if_absent("a/1", &1u8).unwrap());
    assert!(!kv.put_if_absent("a/1", &2u8).unwrap());
    kv.put("a/2", &3u8).unwrap();
    kv.put("b/1", &4u8).unwrap();
    let got: Vec<(String, u8)> = kv.scan("a/").unwrap();
    assert_eq!(got, vec![("a/1".into(), 1), ("a/2".into(), 3)]);
}

#[tokio::test]
async fn kv_visits_by_prefix_both_ways_and_applies_batches_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let kv = store.kv("t").unwrap();
    assert!(kv.is_empty().unwrap());
    let mut batch = Batch::default();
    for (k, v) in [("a/1", 1u8), ("a/2", 2), ("a/3", 3), ("b/1", 4)] {
        batch.put(k, &v).unwrap();
    }
    batch.remove("a/3");
    assert!(batch.bytes() >= 4);
    kv.apply(batch).unwrap();
    assert!(
        !kv.contains("a/3").unwrap(),
        "a later remove in the batch wins"
    );
    assert!(kv.contains("b/1").unwrap());
    let mut forward = Vec::new();
    kv.visit::<u8>("a/", "a/", false, |k, v| {
        forward.push((k, v));
        true
    })
    .unwrap();
    assert_eq!(forward, vec![("a/1".into(), 1), ("a/2".into(), 2)]);
    let mut from = Vec::new();
    kv.visit::<u8>("a/", "a/2", false, |k, _| {
        from.push(k);
        true
    })
    .unwrap();
    assert_eq!(from, vec!["a/2".to_string()]);
    let mut backwards = Vec::new();
    kv.visit::<u8>("a/", "a/", true, |k, _| {
        backwards.push(k);
        true
    })
    .unwrap();
    assert_eq!(backwards, vec!["a/2".to_string(), "a/1".to_string()]);
    let mut down_from = Vec::new();
    kv.visit::<u8>("a/", "a/1", true, |k, _| {
        down_from.push(k);
        true
    })
    .unwrap();
    assert_eq!(down_from, vec!["a/1".to_string()]);
    assert_eq!(kv.last::<u8>("a/").unwrap(), Some(("a/2".into(), 2)));
    assert_eq!(kv.last::<u8>("").unwrap(), Some(("b/1".into(), 4)));
    assert_eq!(kv.last::<u8>("c/").unwrap(), None);
    kv.flush().await.unwrap();
    assert!(store.writable());
}

#[test]
fn the_database_is_private_to_its_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let _store = Store::open(dir.path()).unwrap();
    let db = dir.path().join("db");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&db), 0o700);
    for entry in std::fs::read_dir(&db).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
        }
    }
}

#[test]
fn a_data_dir_in_use_is_refused_naming_the_holders_pid() {
    let dir = tempfile::tempdir().unwrap();
    let first = Store::open(dir.path()).unwrap();
    let second = Store::open(dir.path())
        .err()
        .expect("the second open is refused");
    let text = second.to_string();
    assert!(
        matches!(second, StoreError::InUse { pid: Some(p), .. } if p == std::process::id()),
        "{text}"
    );
    assert!(text.contains("in use by another process (pid "), "{text}");
    drop(first);
    Store::open(dir.path()).expect("free again once the first store is gone");
}

#[test]
fn a_batch_on_two_trees_is_applied_together_and_only_within_one_database() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b) = (store.kv("a").unwrap(), store.kv("b").unwrap());
    let (mut first, mut second) = (Batch::default(), Batch::default());
    assert!(first.is_empty());
    first.put("k", &1u64).unwrap();
    second.put("k", &2u64).unwrap();
    second.remove("gone");
    assert!(!first.is_empty());
    a.apply_with(first, &b, second).unwrap();
    assert_eq!(a.get::<u64>("k").unwrap(), Some(1));
    assert_eq!(b.get::<u64>("k").unwrap(), Some(2));
    let other_dir = tempfile::tempdir().unwrap();
    let other = Store::open(other_dir.path()).unwrap();
    let elsewhere = other.kv("b").unwrap();
    let mut batch = Batch::default();
    batch.put("k", &3u64).unwrap();
    let e = a
        .apply_with(batch, &elsewhere, Batch::default())
        .unwrap_err();
    assert!(matches!(e, StoreError::Apart { .. }), "{e}");
    assert_eq!(a.get::<u64>("k").unwrap(), Some(1));
}

/// Every record of every tree but the store's own, as raw bytes.
fn dump(store: &Store) -> std::collections::BTreeMap<(String, Vec<u8>), Vec<u8>> {
    let db = &store.inner.db;
    let mut out = std::collections::BTreeMap::new();
    for name in db.tree_names().unwrap() {
        if ["blobs", "probe", "__sled__default"].contains(&name.as_str()) {
            continue;
        }
        for entry in db.tree(&name).unwrap().iter() {
            let (k, v) = entry.unwrap();
            out.insert((name.clone(), k.to_vec()), v.to_vec());
        }
    }
    out
}

#[test]
fn an_export_while_writes_go_on_imports_as_the_database_at_its_stop() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b) = (store.kv("a").unwrap(), store.kv("b").unwrap());
    for i in 0..3000u64 {
        a.put(&format!("k{i:05}"), &i).unwrap();
        b.put(&format!("k{i:05}"), &(i * 2)).unwrap();
    }
    let export = store.begin_export().unwrap();
    assert!(matches!(store.begin_export(), Err(StoreError::ExportBusy)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Writes of every kind, in both trees, while the trees are read: batches spanning both,
    // removals, takes, puts of new keys, puts only where absent.
    let writer = {
        let (a, b, stop) = (a.clone(), b.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 200_000 {
                n += 1;
                let i = n * 7919 % 3000;
                let (mut x, mut y) = (Batch::default(), Batch::default());
                x.put(&format!("k{i:05}"), &(n + 1_000_000)).unwrap();
                y.put(&format!("k{i:05}"), &(n + 2_000_000)).unwrap();
                y.remove(&format!("k{:05}", (i + 1) % 3000));
                a.apply_with(x, &b, y).unwrap();
                a.put(&format!("new{n:06}"), &n).unwrap();
                if n.is_multiple_of(3) {
                    a.remove(&format!("k{:05}", (i + 2) % 3000)).unwrap();
                }
                if n.is_multiple_of(5) {
                    let _ = b.take::<u64>(&format!("k{:05}", (i + 3) % 3000)).unwrap();
                }
                b.put_if_absent(&format!("k{:05}", (i + 4) % 3000), &n)
                    .unwrap();
            }
            n
        })
    };
    let mut records = Vec::new();
    let read = export.write_records(&mut records, &[]).unwrap();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 0 && read > 0);
    let recorded = export.stop().unwrap();
    assert!(!recorded.is_empty(), "writes overlapped the reading");
    recorded.write(&mut records, &[]).unwrap();
    // Nothing is written after the stop, so the database now is the database then.
    let want = dump(&store);
    assert!(
        store.begin_export().is_ok(),
        "one export at a time, not one ever"
    );

    let other = tempfile::tempdir().unwrap();
    let copy = Store::open(other.path()).unwrap();
    let lines = copy.import_records(&records[..]).unwrap();
    assert_eq!(lines as usize, records.split(|b| *b == b'\n').count() - 1);
    assert_eq!(dump(&copy), want, "every tree, every key, every value");
}

#[test]
fn an_export_leaves_out_the_stores_own_trees_and_the_ones_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.kv("keep").unwrap().put("k", &"v").unwrap();
    store.kv("skip").unwrap().put("k", &"v").unwrap();
    store
        .put_index(
            &Digest::of(b"x"),
            &BlobMeta {
                size: 1,
                stored_at: Utc::now(),
                last_access: Utc::now(),
                verified_at: None,
            },
        )
        .unwrap();
    let export = store.begin_export().unwrap();
    let mut out = Vec::new();
    assert_eq!(export.write_records(&mut out, &["skip"]).unwrap(), 1);
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text, "{\"tree\":\"keep\",\"key\":\"k\",\"value\":\"v\"}\n");
    drop(export);
    // A record of the store's own trees, or a line that is not a record, is refused.
    let other = tempfile::tempdir().unwrap();
    let copy = Store::open(other.path()).unwrap();
    for bad in [
        "{\"tree\":\"blobs\",\"key\":\"k\",\"value\":1}\n",
        "{\"tree\":\"t\",\"value\":1}\n",
        "{\"tree\":\"t\",\"key\":\"k\"}\n",
        "not json\n",
    ] {
        let e = copy.import_records(bad.as_bytes()).unwrap_err();
        assert!(
            matches!(e, StoreError::BadRecord { line: 1, .. }),
            "{bad}: {e}"
        );
    }
    // Bytes that are neither UTF-8 keys nor JSON values go through as hex.
    let mut raw = Vec::new();
    super::export::tests_line(&mut raw, "t", &[0xff, 0], Some(&[0xfe]));
    let n = copy.import_records(&raw[..]).unwrap();
    assert_eq!(n, 1);
    let got = copy.inner.db.tree("t").unwrap().get([0xff, 0]).unwrap();
    assert_eq!(got.as_deref(), Some(&[0xfe][..]));
}

#[test]
fn the_format_is_checked_and_an_older_dir_upgraded_once() {
    let dir = tempfile::tempdir().unwrap();
    // A new dir records the current format.
    drop(Store::open(dir.path()).unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("format")).unwrap(),
        format!("{FORMAT}\n")
    );
    // A dir with a database but no format file is format 1: upgraded once.
    std::fs::remove_file(dir.path().join("format")).unwrap();
    let calls = std::sync::Mutex::new(Vec::new());
    let upgrade = |_: &Store, from: u32| {
        calls.lock().unwrap().push(from);
        Ok(())
    };
    drop(Store::open_with(dir.path(), &upgrade).unwrap());
    drop(Store::open_with(dir.path(), &upgrade).unwrap());
    assert_eq!(*calls.lock().unwrap(), vec![format::UNRECORDED]);
    // A failed upgrade leaves the old format recorded, so the next start tries again.
    std::fs::write(dir.path().join("format"), "1\n").unwrap();
    let failing = |_: &Store, _: u32| Err(StoreError::Join("no".into()));
    assert!(Store::open_with(dir.path(), &failing).is_err());
    assert_eq!(
        std::fs::read_to_string(dir.path().join("format")).unwrap(),
        "1\n"
    );
    // A newer format is refused before the database is opened.
    let newer = tempfile::tempdir().unwrap();
    std::fs::write(newer.path().join("format"), format!("{}\n", FORMAT + 1)).unwrap();
    let e = Store::open(newer.path()).err().expect("refused");
    assert!(
        matches!(e, StoreError::TooNew { .. }) && e.is_refusal(),
        "{e}"
    );
    assert!(!newer.path().join("db").exists(), "sled never opened it");
}

#[tokio::test]
async fn a_restore_builds_only_into_an_empty_dir_and_is_marked_until_done() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), b"").unwrap();
    let e = Store::create_for_restore(dir.path(), FORMAT)
        .err()
        .expect("refused");
    assert!(matches!(e, StoreError::NotEmpty { .. }), "{e}");
    let target = dir.path().join("new");
    let store = Store::create_for_restore(&target, format::UNRECORDED).unwrap();
    assert!(target.join(RESTORING).exists());
    let held = Store::open(&target).err().expect("in use while restoring");
    assert!(matches!(held, StoreError::InUse { .. }), "{held}");
    drop(store);
    let e = Store::open(&target)
        .err()
        .expect("an unfinished restore is refused");
    assert!(
        matches!(e, StoreError::Unfinished { .. }) && e.is_refusal(),
        "{e}"
    );
    std::fs::remove_file(target.join(RESTORING)).unwrap();
    let store = Store::create_for_restore(&dir.path().join("again"), FORMAT).unwrap();
    store.restored().await.unwrap();
    assert!(!dir.path().join("again").join(RESTORING).exists());
    drop(store);
    drop(Store::open(&dir.path().join("again")).unwrap());
    // The backup's older format is what the next start upgrades from.
    let calls = std::sync::Mutex::new(Vec::new());
    let upgrade = |_: &Store, from: u32| {
        calls.lock().unwrap().push(from);
        Ok(())
    };
    drop(Store::open_with(&target, &upgrade).unwrap());
    assert_eq!(*calls.lock().unwrap(), vec![format::UNRECORDED]);
}
