//! End to end through real processes: content integrity over time and the manager's disk.
//! - one byte of a stored blob flipped on disk on a node: within the scrub interval the node
//!   has taken it out (`gup_scrub_failures_total` 1, the file in `quarantine/`), fetched it
//!   again from its upstream (one new fetch) and serves the right bytes; on the manager: it
//!   stops serving the blob and raises one `content_corrupt` notification naming the item. No
//!   response asked for after the scrub found the rot carries the rotten bytes;
//! - publishing 5 versions with `retain_revisions = 3` leaves the manager's blob directory
//!   with the retained blobs only, and `gup_store_bytes` says so.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;

/// Where a data dir keeps the blob named `sha` (hex).
fn blob_file(data_dir: &Path, sha: &str) -> PathBuf {
    data_dir
        .join("blobs")
        .join(&sha[0..2])
        .join(&sha[2..4])
        .join(sha)
}

/// Flips one bit of the byte at `at` in place (the same file, as a stray write would).
fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    f.sync_all().unwrap();
}

fn manager_config(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("manager.toml");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&path, toml).unwrap();
    path
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// GETs `url` until `done` says the repair is complete, checking every response asked for
/// once `found` held (read before the request) never carries `rotten`. Returns the last
/// response's status and body.
async fn watch_responses(
    client: &reqwest::Client,
    base: &str,
    sha: &str,
    rotten: &[u8],
    mut until: impl FnMut(u16, &[u8], bool) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = metric(client, base, "gup_scrub_failures_total").await >= 1.0;
        let r = client
            .get(format!("{base}/v1/content/{sha}"))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.bytes().await.unwrap_or_default();
        if found {
            assert!(
                body[..] != rotten[..],
                "{base}: a response asked for after the scrub found the rot carried the rotten bytes"
            );
        }
        if until(status, &body, found) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{base}: no repair within 60 s (found {found}, last status {status})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rot_is_found_by_the_scrub_and_never_served_again() {
    let tmp = tempfile::tempdir().unwrap();
    let scrub = "[store]\nscrub_interval_s = 1\n";
    let cfg = manager_config(tmp.path(), scrub);
    let mdir = tmp.path().join("m");
    let manager = start_manager(&mdir, &["--config", cfg.to_str().unwrap()]);
    let ndir = tmp.path().join("n");
    let node = start_node_toml(
        &ndir,
        &[&manager.url],
        &format!("prefetch_window_s = 0\n{scrub}"),
        &[],
    );
    wait_ready(&node.url).await;
    // Larger than the hot cache admits (4 MiB): every response reads the store.
    let data = random_bytes(5 << 20, 20);
    let sha = publish_and_wait(&manager.url, &[&node.url], "defs", "1.0", &data).await;
    let client = reqwest::Client::new();
    let node_blob = blob_file(&ndir, &sha);
    wait_for(30, "the node prefetches defs", || {
        let f = node_blob.clone();
        async move { f.exists().then_some(()) }
    })
    .await;
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        1.0
    );

    // === The node ===
    let mut rotten = data.clone();
    let at = 3 << 20;
    rotten[at] ^= 0x10;
    flip(&node_blob, at as u64);
    watch_responses(&client, &node.url, &sha, &rotten, |status, body, found| {
        found && status == 200 && body[..] == data[..]
    })
    .await;
    assert_eq!(
        metric(&client, &node.url, "gup_scrub_failures_total").await,
        1.0
    );
    let quarantined = files_under(&ndir.join("quarantine"));
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(std::fs::read(&quarantined[0]).unwrap(), rotten);
    // Stored again, right, by one new fetch however many requests came meanwhile.
    wait_for(30, "the node stores defs again", || {
        let (f, want) = (node_blob.clone(), sha.clone());
        async move {
            std::fs::read(&f)
                .ok()
                .filter(|b| sha256_hex(b) == want)
                .map(|_| ())
        }
    })
    .await;
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        2.0
    );

    // === The manager ===
    let manager_blob = blob_file(&mdir, &sha);
    flip(&manager_blob, at as u64);
    watch_responses(&client, &manager.url, &sha, &rotten, |status, _, found| {
        found && status != 200
    })
    .await;
    assert!(!manager_blob.exists(), "the rotten blob left blobs/");
    assert_eq!(files_under(&mdir.join("quarantine")).len(), 1);
    // Scrubs go on (every second); the one rotten blob raised one notification.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, v) = admin_call(&manager.url, Method::GET, "/v1/admin/notifications", None).await;
    assert_eq!(status, 200, "{v}");
    let corrupt: Vec<&serde_json::Value> = v["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["kind"] == "content_corrupt")
        .collect();
    assert_eq!(corrupt.len(), 1, "{v}");
    assert_eq!(corrupt[0]["item"], "defs", "{v}");
    assert_eq!(corrupt[0]["version"], "1.0", "{v}");
    assert_eq!(corrupt[0]["sha256"], sha.as_str(), "{v}");
    assert_eq!(
        metric(&client, &manager.url, "gup_scrub_failures_total").await,
        1.0
    );
    // The node keeps serving its good copy.
    let r = client
        .get(format!("{}/v1/content/{sha}", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap()[..] == data[..]);
    // Publishing the same bytes again cures the manager: same revision, served again.
    let (status, v) = admin_call(&manager.url, Method::GET, "/v1/catalog", None).await;
    assert_eq!(status, 200, "{v}");
    let revision = v["revision"].clone();
    publish_and_wait(&manager.url, &[], "defs", "1.0", &data).await;
    let r = client
        .get(format!("{}/v1/content/{sha}", manager.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap()[..] == data[..]);
    let (_, v) = admin_call(&manager.url, Method::GET, "/v1/catalog", None).await;
    assert_eq!(
        v["revision"], revision,
        "the same bytes are not a new revision"
    );
    assert_eq!(node.stop(), Some(0));
    assert_eq!(manager.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_leave_the_manager_with_their_revisions() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = manager_config(tmp.path(), "[manager]\nretain_revisions = 3\n");
    let mdir = tmp.path().join("m");
    let manager = start_manager(&mdir, &["--config", cfg.to_str().unwrap()]);
    let client = reqwest::Client::new();
    let versions: Vec<Vec<u8>> = (0..5)
        .map(|i| random_bytes(200_000 + i, 40 + i as u64))
        .collect();
    let mut shas = Vec::new();
    for (i, data) in versions.iter().enumerate() {
        shas.push(publish_and_wait(&manager.url, &[], "defs", &format!("{i}"), data).await);
    }
    let retained: std::collections::BTreeSet<String> = shas[2..].iter().cloned().collect();
    let want_bytes: f64 = versions[2..].iter().map(|v| v.len() as f64).sum();
    wait_for(
        30,
        "the manager collects the blobs of dropped revisions",
        || {
            let (dir, want) = (mdir.join("blobs"), retained.clone());
            async move {
                let held: std::collections::BTreeSet<String> = files_under(&dir)
                    .iter()
                    .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
                    .collect();
                (held == want).then_some(())
            }
        },
    )
    .await;
    assert_eq!(
        metric(&client, &manager.url, "gup_store_bytes").await,
        want_bytes
    );
    // The retained ones are still served; a dropped one is not in the catalog.
    for sha in &shas[2..] {
        let r = client
            .get(format!("{}/v1/content/{sha}", manager.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = client
        .get(format!("{}/v1/content/{}", manager.url, shas[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(manager.stop(), Some(0));
}
