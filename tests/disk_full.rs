//! End to end through real processes, on a small tmpfs (needs root; skipped otherwise): a
//! full disk heals without a restart.
//! - a node asked for a blob that cannot fit answers 503 with a Retry-After and fetches
//!   nothing over the WAN however often it is asked, and does not blame its upstream;
//! - a node whose disk filled up says so on `/readyz` (503 `storage_unavailable`) and
//!   answers writes with 503; once space returns it is ready, takes events and fetches the
//!   blob, without a restart;
//! - a manager whose disk filled up answers heartbeats and publishes with 503 and says so on
//!   `/readyz`; once space returns it answers them again, without a restart.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use reqwest::Method;
use serde_json::json;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and reads no memory of ours.
    unsafe { libc::geteuid() == 0 }
}

/// A tmpfs of `size` mounted at `dir` for as long as this lives.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mount a tmpfs at {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }

    /// Fills what is left with a file (the disk is then full), or empties it again.
    fn fill(&self, full: bool) {
        let filler = self.0.join("filler");
        if full {
            let mut f = std::fs::File::create(&filler).unwrap();
            let block = vec![0u8; 1 << 20];
            while std::io::Write::write_all(&mut f, &block).is_ok() {}
            let _ = std::io::Write::write_all(&mut f, &[0u8; 4096]);
            let _ = f.sync_all();
        } else {
            std::fs::remove_file(&filler).unwrap();
        }
    }

    fn resize(&self, size: &str) {
        let status = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

async fn status_of(base: &str, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("{base}{path}")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or_default())
}

fn event(id: &str) -> serde_json::Value {
    json!({"client_id": "pc", "events": [{
        "id": id, "kind": "system_change", "time": "2026-12-03T10:00:00Z",
    }]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_that_cannot_fit_is_refused_without_fetching_it_again_and_again() {
    if !is_root() {
        eprintln!("needs root to mount a tmpfs; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let big = random_bytes(24 << 20, 61);
    let sha = publish_and_wait(&manager.url, &[], "big", "1", &big).await;
    let disk = Tmpfs::mount(&dir.path().join("n"), "12m");
    let node = start_node_toml(
        &disk.0,
        &[&manager.url],
        // A disk this small keeps no more than the fetch's own margin free.
        "\n[cache]\nprefetch = false\nmin_free_bytes = 0\n",
        &[],
    );
    wait_ready(&node.url).await;
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let r = client
            .get(format!("{}/v1/content/{sha}", node.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["error"], "storage_unavailable", "{v}");
    }
    assert_eq!(
        metric(&client, &node.url, "gup_upstream_fetches_total").await,
        0.0,
        "nothing was fetched over the WAN"
    );
    assert_eq!(
        upstream_up(&client, &node.url, &manager.url).await,
        Some(1.0),
        "the upstream is not blamed for the node's disk"
    );
    // Room comes: the same request fetches it and serves the right bytes.
    disk.resize("96m");
    let got = client
        .get(format!("{}/v1/content/{sha}", node.url))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert!(got.bytes().await.unwrap()[..] == big[..]);
    assert_eq!(node.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_disk_filled_heals_when_space_returns() {
    if !is_root() {
        eprintln!("needs root to mount a tmpfs; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let small = random_bytes(1 << 20, 62);
    let disk = Tmpfs::mount(&dir.path().join("n"), "32m");
    let node = start_node_toml(
        &disk.0,
        &[&manager.url],
        "\n[cache]\nmin_free_bytes = 0\n",
        &[],
    );
    wait_ready(&node.url).await;
    let (status, v) = post_json(&node.url, "/v1/events", event("before")).await;
    assert_eq!(status, 202, "{v}");

    disk.fill(true);
    // The database has some room of its own left; once it is used up, uploads are refused
    // with 503 (not accepted and lost, not 500), and readiness says why.
    let mut refused = None;
    for i in 0..20_000 {
        let (status, v) = post_json(&node.url, "/v1/events", event(&format!("during-{i}"))).await;
        match status {
            202 => continue,
            503 => {
                refused = Some(v);
                break;
            }
            other => panic!("upload {i} on the full disk: {other} {v}"),
        }
    }
    let refused = refused.expect("the full disk refuses an upload");
    assert_eq!(refused["error"], "storage_unavailable", "{refused}");
    let (status, v) = status_of(&node.url, "/readyz").await;
    assert_eq!(
        (status, v["error"].clone()),
        (503, json!("storage_unavailable")),
        "{v}"
    );

    // Space returns: ready again, events taken, new content fetched, with no restart.
    disk.fill(false);
    wait_for(30, "the node is ready again", || {
        let u = node.url.clone();
        async move { (status_of(&u, "/readyz").await.0 == 200).then_some(()) }
    })
    .await;
    let (status, v) = post_json(&node.url, "/v1/events", event("after")).await;
    assert_eq!(status, 202, "{v}");
    publish_and_wait(&manager.url, &[&node.url], "small", "1", &small).await;
    let got = reqwest::get(format!("{}/v1/content/{}", node.url, sha256_hex(&small)))
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    assert!(got.bytes().await.unwrap()[..] == small[..]);
    assert_eq!(node.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_whose_disk_filled_heals_when_space_returns() {
    if !is_root() {
        eprintln!("needs root to mount a tmpfs; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(&dir.path().join("m"), "32m");
    let manager = start_manager(&disk.0, &[]);
    let hb = json!({"client_id": "pc-1", "install_group": "default"});
    let (status, _) = post_json(&manager.url, "/v1/heartbeat", hb.clone()).await;
    assert_eq!(status, 200);

    disk.fill(true);
    // The database has some room of its own left; once it is used up, changes are refused
    // with 503, and readiness says why.
    let mut refused = None;
    for i in 0..20_000u64 {
        let (status, v) = admin_call(
            &manager.url,
            Method::PUT,
            "/v1/admin/groups/default/settings",
            Some(json!({"heartbeat_interval_s": 60 + i % 1000})),
        )
        .await;
        match status {
            200 => continue,
            503 => {
                refused = Some(v);
                break;
            }
            other => panic!("change {i} on the full disk: {other} {v}"),
        }
    }
    let refused = refused.expect("the full disk refuses a change");
    assert_eq!(refused["error"], "storage_unavailable", "{refused}");
    let (status, v) = status_of(&manager.url, "/readyz").await;
    assert_eq!(
        (status, v["error"].clone()),
        (503, json!("storage_unavailable")),
        "{v}"
    );

    disk.fill(false);
    wait_for(30, "the manager is ready again", || {
        let u = manager.url.clone();
        async move { (status_of(&u, "/readyz").await.0 == 200).then_some(()) }
    })
    .await;
    let (status, v) = admin_call(
        &manager.url,
        Method::PUT,
        "/v1/admin/groups/default/settings",
        Some(json!({"heartbeat_interval_s": 120})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = post_json(&manager.url, "/v1/heartbeat", hb).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["next_heartbeat_s"], 120);
    publish_and_wait(&manager.url, &[], "after", "1", &random_bytes(100_000, 63)).await;
    assert_eq!(manager.stop(), Some(0));
}
