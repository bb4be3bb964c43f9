//! End to end through real processes: `gup node seed`, a branch started from a carried disk.
//! - a node that mirrored the catalog but fetched nothing (prefetch off) is stopped; seeding
//!   it from a directory that holds a catalog file (in a subdirectory), a corrupted copy of
//!   the same size and an unrelated file imports the one and lists the others as skipped,
//!   exit 0; a second seed finds the file already stored;
//! - restarted with its upstream gone, the node serves the seeded blob, byte for byte, with
//!   no upstream fetch (`gup_upstream_fetches_total` 0);
//! - a running node's data dir is refused with one line naming it (exit 1); a missing source
//!   directory and a data dir that never synced get one line and exit 2.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// `gup node seed --data-dir DATA SOURCE`: (exit code, stdout, stderr).
fn seed(data: &Path, source: &Path) -> (i32, String, String) {
    let out = Command::new(gup())
        .args(["node", "seed", "--data-dir"])
        .arg(data)
        .arg(source)
        .output()
        .expect("run gup node seed");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_seeded_from_a_directory_serves_the_content_with_no_upstream_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let n_dir = dir.path().join("n");
    let no_prefetch = "\n[cache]\nprefetch = false\n";
    let node = start_node_toml(&n_dir, &[&manager.url], no_prefetch, &[]);
    let data = random_bytes(300_000, 21);
    let sha = publish_and_wait(&manager.url, &[&node.url], "defs", "1", &data).await;
    let client = reqwest::Client::new();
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        0.0,
        "prefetch is off: the node mirrored the catalog and fetched nothing"
    );

    // The carried disk: the release in a subdirectory, a same-size copy with one byte
    // flipped, and an unrelated file.
    let carried = dir.path().join("carried");
    std::fs::create_dir_all(carried.join("deep/er")).unwrap();
    std::fs::write(carried.join("deep/er/defs.bin"), &data).unwrap();
    let mut rotten = data.clone();
    rotten[1000] ^= 0x55;
    std::fs::write(carried.join("rotten.bin"), &rotten).unwrap();
    std::fs::write(carried.join("notes.txt"), b"not content").unwrap();

    // A running node's data dir is refused, in one line.
    let (code, out, err) = seed(&n_dir, &carried);
    assert_eq!(code, 1, "stdout: {out}\nstderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("in use by a running node") && err.contains(n_dir.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(node.stop(), Some(0));

    let (code, out, err) = seed(&n_dir, &carried);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    assert!(
        out.contains("imported: deep/er/defs.bin (defs 1, 300000 bytes)"),
        "{out}"
    );
    assert!(
        out.contains("skipped, not in the catalog: notes.txt"),
        "{out}"
    );
    assert!(
        out.contains("skipped, not in the catalog: rotten.bin"),
        "{out}"
    );
    assert_eq!(
        out.lines().last(),
        Some("imported 1, already stored 0, skipped 2 not in the catalog"),
        "{out}"
    );
    let (code, out, _) = seed(&n_dir, &carried);
    assert_eq!(code, 0);
    assert!(out.contains("already stored: deep/er/defs.bin"), "{out}");
    assert_eq!(
        out.lines().last(),
        Some("imported 0, already stored 1, skipped 2 not in the catalog"),
        "{out}"
    );

    // Bad input: one line, exit 2, and no data dir made from a typo.
    let (code, _, err) = seed(&n_dir, &dir.path().join("no-such-dir"));
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("no-such-dir"), "{err}");
    let typo = dir.path().join("nn");
    let (code, _, err) = seed(&typo, &carried);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a node's data dir"), "{err}");
    assert!(!typo.exists());

    // The upstream is gone; the node serves what was seeded, fetching nothing.
    let m_url = manager.url.clone();
    assert_eq!(manager.stop(), Some(0));
    let node = start_node_toml(&n_dir, &[&m_url], "", &[]);
    let body = wait_served(&node.url, &sha, 30, "the seeded blob").await;
    assert!(body[..] == data[..], "the seeded bytes");
    // Past a prefetch pass and a failed sync, still nothing was fetched.
    wait_for(30, "the node notices its upstream is gone", || {
        let log = node.log_text();
        async move { log.contains("no upstream answered").then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        0.0,
        "served from the seeded store"
    );
}
