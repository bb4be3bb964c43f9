//! End to end through real processes: download slots and admission control.
//! - a heartbeat through a node carries a `download_slot` for the current revision inside
//!   the window, and the slot is stable at the next heartbeat;
//! - a named content request (`X-Gup-Client-Id`) before its slot gets 429 `before_slot` with
//!   `Retry-After` and `not_before`, counted in `gup_slot_deferrals_total`;
//! - unnamed requests are not slot-checked; an urgent item never waits, even for a named
//!   client;
//! - `serve.max_concurrent_downloads` answers 503 `unavailable` with a short `Retry-After`
//!   when full, and frees the place when a download ends.

mod common;

use common::*;
use serde_json::{json, Value};

struct Slotted {
    dir: tempfile::TempDir,
    manager: Proc,
    node: Proc,
    sha: String,
    /// A client whose slot is at least 5 s away, and its slot.
    id: String,
    slot: Value,
}

async fn heartbeat(node: &str, id: &str) -> Value {
    heartbeat_ok(node, json!({"client_id": id, "catalog_revision": 0})).await
}

/// A manager spreading downloads over 60 s, a node, one release mirrored, and a client of
/// the node whose slot is at least 5 s away.
async fn slotted() -> Slotted {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let (status, v) = admin_call(
        &manager.url,
        reqwest::Method::PUT,
        "/v1/admin/groups/default/settings",
        Some(json!({"randomization": {"window_s": 60}})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let node = start_node(&dir.path().join("n"), &[&manager.url], &[]);
    let data = random_bytes(200_000, 77);
    let sha = publish_and_wait(&manager.url, &[&node.url], "defs", "1", &data).await;
    // Slots are spread over the 60 s: among 60 clients one is at least 5 s away.
    let mut waiting = None;
    for i in 0..60 {
        let id = format!("pc-{i}");
        let v = heartbeat(&node.url, &id).await;
        let slot = &v["download_slot"];
        assert_eq!(slot["catalog_revision"], 1, "{v}");
        assert_eq!(slot["window_s"], 60, "{v}");
        if slot["delay_s"].as_u64().unwrap() >= 5 {
            waiting = Some((id, slot.clone()));
            break;
        }
    }
    let (id, slot) = waiting.expect("some slot at least 5 s away");
    Slotted {
        dir,
        manager,
        node,
        sha,
        id,
        slot,
    }
}

async fn download(node: &str, sha: &str, id: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(format!("{node}/v1/content/{sha}"));
    if let Some(id) = id {
        req = req.header("x-gup-client-id", id);
    }
    req.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_through_a_node_carries_a_slot_for_the_revision_inside_the_window() {
    let s = slotted().await;
    assert_eq!(s.slot["catalog_revision"], 1, "{}", s.slot);
    assert_eq!(s.slot["window_s"], 60, "{}", s.slot);
    // The precise moment is less than a window from now (the revision became available at
    // the node before the heartbeat); `delay_s` is whole seconds rounded up, so at most the
    // window.
    let not_before =
        chrono::DateTime::parse_from_rfc3339(s.slot["not_before"].as_str().unwrap()).unwrap();
    assert!(
        not_before < chrono::Utc::now() + chrono::Duration::seconds(60),
        "{}",
        s.slot
    );
    let delay = s.slot["delay_s"].as_u64().unwrap();
    assert!((5..=60).contains(&delay), "{}", s.slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_is_stable_at_the_next_heartbeat() {
    let s = slotted().await;
    let again = heartbeat(&s.node.url, &s.id).await;
    assert_eq!(again["download_slot"]["not_before"], s.slot["not_before"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_request_before_its_slot_is_429_with_retry_after_and_not_before() {
    let s = slotted().await;
    let r = download(&s.node.url, &s.sha, Some(&s.id)).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "before_slot");
    assert_eq!(v["not_before"], s.slot["not_before"]);
    assert_eq!(
        metric(
            &reqwest::Client::new(),
            &s.node.url,
            "gup_slot_deferrals_total"
        )
        .await,
        1.0,
        "the deferral is counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unnamed_request_is_not_slot_checked() {
    let s = slotted().await;
    let r = download(&s.node.url, &s.sha, None).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_urgent_item_never_waits_even_for_a_named_client() {
    let s = slotted().await;
    let fix = random_bytes(10_000, 78);
    let fix_file = s.dir.path().join("fix.bin");
    std::fs::write(&fix_file, &fix).unwrap();
    // `--urgent`, and no `--version`: the CLI itself, not `publish_and_wait`.
    let (code, out) = admin_cli(
        &s.manager.url,
        &[
            "publish",
            fix_file.to_str().unwrap(),
            "--name",
            "outbreak-fix",
            "--urgent",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let fix_sha = sha256_hex(&fix);
    wait_mirrored(&s.node.url, &fix_sha).await;
    let r = download(&s.node.url, &fix_sha, Some(&s.id)).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap()[..] == fix[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_downloads_answers_503_when_full_and_frees_the_place_after() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    // One download at a time, at 1 MiB/s: a 3 MiB download holds the only place ~3 s.
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&manager.url],
        "[serve]\nmax_concurrent_downloads = 1\nmax_bytes_per_sec = 1048576\n",
        &[],
    );
    let client = reqwest::Client::new();
    let data = random_bytes(3 << 20, 79);
    let sha = publish_and_wait(&manager.url, &[&node.url], "big", "1", &data).await;
    let url = format!("{}/v1/content/{sha}", node.url);
    let u2 = url.clone();
    wait_for(20, "node has the blob", || {
        let (c, u) = (client.clone(), u2.clone());
        async move { (c.head(&u).send().await.ok()?.status() == 200).then_some(()) }
    })
    .await;
    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let second = client.get(&url).send().await.unwrap();
    assert_eq!(second.status(), 503, "full");
    let retry: u64 = second.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5).contains(&retry), "{retry}");
    let v: Value = second.json().await.unwrap();
    assert_eq!(v["error"], "unavailable");
    // When the first finishes, the place is free again.
    assert!(first.bytes().await.unwrap()[..] == data[..]);
    let third = client.get(&url).send().await.unwrap();
    assert_eq!(third.status(), 200, "free again");
}
