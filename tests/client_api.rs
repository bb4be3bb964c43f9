//! End to end through real processes: the one client API behaves the same on both roles.
//! - a heartbeat to the manager carries the `download_slot` a node would give, and the
//!   manager's content door makes a named client wait for it (429, `Retry-After`);
//! - a client whose heartbeat answer said `download_slot: null` is never answered 429, by the
//!   manager or by a node;
//! - a new client's first critical event, uploaded through one node or through two chained
//!   nodes before any heartbeat was relayed on its own, is filed under the group the manager
//!   places the client in (here a user-mode mapping no node knows), and so is its admin
//!   notification.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// A manager whose default group spreads downloads over 60 s, with one package published.
async fn manager_with_a_release(dir: &std::path::Path) -> (Proc, String) {
    let manager = start_manager(&dir.join("m"), &[]);
    let (status, v) = admin_call(
        &manager.url,
        Method::PUT,
        "/v1/admin/groups/default/settings",
        Some(json!({"randomization": {"window_s": 60}})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let sha = publish_and_wait(&manager.url, &[], "defs", "1", &random_bytes(50_000, 9)).await;
    (manager, sha)
}

async fn heartbeat(base: &str, id: &str, revision: u64) -> Value {
    let (status, v) = post_json(
        base,
        "/v1/heartbeat",
        json!({"client_id": id, "catalog_revision": revision}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v
}

async fn download(base: &str, sha: &str, id: &str) -> reqwest::Response {
    reqwest::Client::new()
        .get(format!("{base}/v1/content/{sha}"))
        .header("x-gup-client-id", id)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_heartbeat_carries_a_download_slot_and_its_door_enforces_it() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, sha) = manager_with_a_release(dir.path()).await;
    let mut waiting = None;
    for i in 0..60 {
        let id = format!("direct-{i}");
        let v = heartbeat(&manager.url, &id, 0).await;
        let slot = &v["download_slot"];
        assert_eq!(slot["catalog_revision"], 1, "{v}");
        assert_eq!(slot["window_s"], 60, "{v}");
        if slot["delay_s"].as_u64().unwrap() >= 5 {
            waiting = Some((id, slot["not_before"].clone()));
            break;
        }
    }
    let (id, not_before) = waiting.expect("some slot at least 5 s away");
    let r = download(&manager.url, &sha, &id).await;
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "before_slot");
    assert_eq!(v["not_before"], not_before);
}

/// Twenty clients that report the current revision are each told `download_slot: null`,
/// and each downloads at once from `base`.
async fn clients_told_null_download_at_once(base: &str, sha: &str) {
    for i in 0..20 {
        let id = format!("current-{i}");
        let v = heartbeat(base, &id, 1).await;
        assert!(v["download_slot"].is_null(), "{v}");
        let r = download(base, sha, &id).await;
        assert_eq!(r.status(), 200, "{id} was told null and then refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_told_null_by_the_manager_is_never_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, sha) = manager_with_a_release(dir.path()).await;
    clients_told_null_download_at_once(&manager.url, &sha).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_told_null_by_a_node_is_never_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, sha) = manager_with_a_release(dir.path()).await;
    let node = start_node(&dir.path().join("n"), &[&manager.url], &[]);
    let client = reqwest::Client::new();
    let (c, u, s) = (client.clone(), node.url.clone(), sha.clone());
    wait_for(20, "the node mirrors the release", || {
        let (c, u, s) = (c.clone(), u.clone(), s.clone());
        async move { catalog_has(&c, &u, &s).await.then_some(()) }
    })
    .await;
    clients_told_null_download_at_once(&node.url, &sha).await;
}

/// A manager where user `alice` belongs to group `finance`, and a branch group clients are
/// installed into.
async fn manager_with_a_user_mapping(dir: &std::path::Path) -> Proc {
    let manager = start_manager(&dir.join("m"), &[]);
    for (group, body) in [
        ("finance", json!({"parent": "default"})),
        ("branch", json!({"parent": "default"})),
    ] {
        let (status, v) = admin_call(
            &manager.url,
            Method::PUT,
            &format!("/v1/admin/groups/{group}"),
            Some(body),
        )
        .await;
        assert_eq!(status, 201, "{v}");
    }
    let (status, v) = admin_call(
        &manager.url,
        Method::PUT,
        "/v1/admin/users/alice",
        Some(json!({"group": "finance"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    manager
}

/// A node that relays heartbeats on their own only every 300 s: within a test, a client's
/// heartbeat reaches the manager only with its events.
fn slow_relay_node(dir: &std::path::Path, upstream: &str) -> Proc {
    start_node_toml(dir, &[upstream], "sync_interval_s = 300\n", &[])
}

/// A new client heartbeats `base` in user mode as alice, installed into `branch`, then
/// uploads one critical event.
async fn new_client_reports_a_virus(base: &str, id: &str) {
    let hb = json!({
        "client_id": id, "install_group": "branch", "mode": "user", "user": "alice",
        "os": "windows", "client_version": "12.1.5", "catalog_revision": 0,
    });
    let (status, v) = post_json(base, "/v1/heartbeat", hb).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["group"], "branch",
        "a node places a new client in its install group"
    );
    let events = json!({"client_id": id, "events": [{
        "id": "e1", "kind": "risk", "subkind": "virus", "time": "2026-12-03T10:00:00Z",
        "data": {"file": "eicar.com"},
    }]});
    let (status, v) = post_json(base, "/v1/events", events).await;
    assert_eq!(status, 202, "{v}");
}

/// The manager files the client's event and its notification under `finance`.
async fn filed_under_the_real_group(manager: &str, id: &str) {
    let events = wait_for(30, "the event reaches the manager", || async move {
        let (_, v) = admin_call(
            manager,
            Method::GET,
            &format!("/v1/admin/events?client={id}"),
            None,
        )
        .await;
        let events = v["events"].as_array()?.clone();
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["group"], "finance", "{events:?}");
    let (_, v) = admin_call(manager, Method::GET, "/v1/admin/notifications", None).await;
    let notes = v["notifications"].as_array().unwrap();
    assert_eq!(notes.len(), 1, "{v}");
    assert_eq!(notes[0]["group"], "finance", "{v}");
    assert_eq!(notes[0]["kind"], "risk", "{v}");
    let (_, v) = admin_call(manager, Method::GET, "/v1/admin/clients", None).await;
    let record = v["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["client_id"] == id)
        .cloned()
        .expect("the manager registered the client");
    assert_eq!(record["group"], "finance", "{record}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_clients_first_critical_event_through_a_node_is_filed_under_its_real_group() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager_with_a_user_mapping(dir.path()).await;
    let node = slow_relay_node(&dir.path().join("n"), &manager.url);
    wait_ready(&node.url).await;
    new_client_reports_a_virus(&node.url, "new-pc").await;
    filed_under_the_real_group(&manager.url, "new-pc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_clients_first_critical_event_through_two_nodes_is_filed_under_its_real_group() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager_with_a_user_mapping(dir.path()).await;
    let upper = slow_relay_node(&dir.path().join("n1"), &manager.url);
    wait_ready(&upper.url).await;
    let lower = slow_relay_node(&dir.path().join("n2"), &upper.url);
    wait_ready(&lower.url).await;
    new_client_reports_a_virus(&lower.url, "far-pc").await;
    filed_under_the_real_group(&manager.url, "far-pc").await;
}
