//! End to end through real processes: an agent killed with kill -9 in the middle of a
//! download resumes it after a restart with `Range`, from the bytes it kept in
//! `partial/<sha256>`, and installs exactly the published bytes. The node in front of it
//! sends at most 4 MiB/s (`serve.max_bytes_per_sec`) so that a 12 MiB download is slow enough
//! to be cut; the node's `gup_served_bytes_total` shows it sent the blob about once, not
//! once and a half as a restart from byte 0 would.

mod common;

use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_by_kill_9_resumes_with_range_after_a_restart() {
    const SIZE: usize = 12 << 20;
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let (status, v) = admin_call(
        &manager.url,
        Method::PUT,
        "/v1/admin/groups/default/settings",
        Some(json!({"heartbeat_interval_s": 1, "randomization": {"enabled": false}})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&manager.url],
        "[serve]\nmax_bytes_per_sec = 4194304\n",
        &[],
    );
    wait_ready(&node.url).await;
    let data = random_bytes(SIZE, 7);
    let sha = publish_and_wait(&manager.url, &[&node.url], "defs.bin", "1", &data).await;
    // The node has the blob before the agent asks, so that every byte it serves is counted.
    wait_served(&node.url, &sha, 30, "the node holds the blob").await;
    let c = reqwest::Client::new();
    let served_before = metric(&c, &node.url, "gup_served_bytes_total").await;

    let a = dir.path().join("a");
    let agent = start_agent(&a, &[&node.url], "default", &["--client-id", "pc-resume"]);
    let partial = a.join("partial").join(&sha);
    let kept = wait_for(30, "half the download is on disk", || {
        let len = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        async move { (len >= SIZE as u64 / 2).then_some(len) }
    })
    .await;
    agent.kill9();
    let after_kill = std::fs::metadata(&partial).unwrap().len();
    assert!(
        after_kill >= kept && after_kill < SIZE as u64,
        "cut mid-way: {after_kill}"
    );
    assert!(!a.join("content/defs.bin").exists());

    let _agent = start_agent(&a, &[&node.url], "default", &["--client-id", "pc-resume"]);
    let path = a.join("content/defs.bin");
    wait_for(30, "the resumed download is installed", || {
        let ok = std::fs::metadata(&path).is_ok_and(|m| m.len() == SIZE as u64);
        async move { ok.then_some(()) }
    })
    .await;
    assert!(
        std::fs::read(&path).unwrap() == data,
        "the installed bytes are the release"
    );
    assert!(!partial.exists(), "the partial became the content");
    // Resumed: about one blob served (what was in flight at the kill is sent again); a
    // restart from byte 0 would have served at least 1.5 blobs.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let served = metric(&c, &node.url, "gup_served_bytes_total").await - served_before;
    assert!(
        served < SIZE as f64 * 1.25,
        "served {served} bytes for a {SIZE}-byte blob"
    );
}
