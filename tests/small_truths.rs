//! End to end through real processes: what the servers report matches what happened.
//! - every 304 (content, catalog, settings, policy; manager and node) carries the ETag and
//!   `Cache-Control` its 200 carries (RFC 9110 §15.4.5);
//! - `/healthz`, `/readyz` and `/metrics` say `Cache-Control: no-store`;
//! - after N events through a node, `gup_events_forwarded_total` is N and
//!   `gup_events_queued` is 0;
//! - a node behind a node shows `stale_since` soon after the manager goes down, and clears
//!   it when the manager returns;
//! - a node that has never synced answers heartbeats 503 with a Retry-After, not built-in
//!   defaults;
//! - `gup admin settings set --location` labels a key set on the location as `settings get`
//!   does.

mod common;

use common::*;
use reqwest::header::{CACHE_CONTROL, ETAG, IF_NONE_MATCH};
use serde_json::json;

/// GET `url`, then again with its ETag: the 304 carries the 200's ETag and Cache-Control.
async fn a_304_keeps_its_headers(url: &str) {
    let c = reqwest::Client::new();
    let first = c.get(url).send().await.unwrap();
    assert_eq!(first.status(), 200, "{url}");
    let etag = first.headers()[ETAG].clone();
    let cache = first.headers()[CACHE_CONTROL].clone();
    let again = c
        .get(url)
        .header(IF_NONE_MATCH, etag.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 304, "{url}");
    assert_eq!(again.headers().get(ETAG), Some(&etag), "{url}: ETag");
    assert_eq!(
        again.headers().get(CACHE_CONTROL),
        Some(&cache),
        "{url}: Cache-Control"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_304_carries_the_etag_and_cache_control_of_its_200() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let (status, _) = admin_call(
        &manager.url,
        reqwest::Method::PUT,
        "/v1/admin/groups/default/policy",
        Some(json!({"scan": "daily"})),
    )
    .await;
    assert_eq!(status, 200);
    let node = start_node(&dir.path().join("n"), &[&manager.url], &[]);
    let sha = publish_and_wait(
        &manager.url,
        &[&node.url],
        "defs",
        "1",
        &random_bytes(5000, 1),
    )
    .await;
    for base in [&manager.url, &node.url] {
        for path in [
            format!("/v1/content/{sha}"),
            "/v1/catalog".to_string(),
            "/v1/groups/default/settings".to_string(),
            "/v1/groups/default/policy".to_string(),
        ] {
            a_304_keeps_its_headers(&format!("{base}{path}")).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_are_never_stored() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = reqwest::get(format!("{}{path}", manager.url))
            .await
            .unwrap();
        assert_eq!(r.headers()[CACHE_CONTROL], "no-store", "{path}");
    }
}

async fn stale_since(base: &str) -> serde_json::Value {
    get_json(base, "/readyz").await.1["stale_since"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_node_shows_the_managers_outage_and_its_end() {
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let manager = start_manager_on(&dir.path().join("m"), &listen, &[]);
    let upper = start_node(&dir.path().join("n1"), &[&manager.url], &[]);
    wait_ready(&upper.url).await;
    let lower = start_node(&dir.path().join("n2"), &[&upper.url], &[]);
    wait_ready(&lower.url).await;
    assert!(stale_since(&lower.url).await.is_null());

    assert_eq!(manager.stop(), Some(0));
    let since = wait_for(20, "the lower node says it is stale", || {
        let u = lower.url.clone();
        async move {
            let s = stale_since(&u).await;
            (!s.is_null()).then_some(s)
        }
    })
    .await;
    assert_eq!(
        since,
        stale_since(&upper.url).await,
        "as stale as its upstream says, since the same moment"
    );

    let _manager = start_manager_on(&dir.path().join("m"), &listen, &[]);
    wait_for(30, "the lower node is fresh again", || {
        let u = lower.url.clone();
        async move { stale_since(&u).await.is_null().then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_synced_answers_heartbeats_503() {
    let dir = tempfile::tempdir().unwrap();
    let nobody = format!("http://127.0.0.1:{}", free_port());
    let node = start_node(&dir.path().join("n"), &[&nobody], &[]);
    let r = reqwest::Client::new()
        .post(format!("{}/v1/heartbeat", node.url))
        .json(&json!({"client_id": "pc"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "not_ready");
}

/// The SET BY column of `key` in a settings table.
fn set_by(table: &str, key: &str) -> String {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(key))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("")
        .to_string()
}

#[test]
fn settings_set_on_a_location_labels_keys_as_settings_get_does() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let (code, set) = admin_cli(
        &manager.url,
        &[
            "settings",
            "set",
            "default",
            "--location",
            "office",
            "heartbeat_interval_s=60",
        ],
    );
    assert_eq!(code, 0, "{set}");
    let (code, get) = admin_cli(
        &manager.url,
        &["settings", "get", "default", "--location", "office"],
    );
    assert_eq!(code, 0, "{get}");
    assert_eq!(set_by(&set, "heartbeat_interval_s"), "location", "{set}");
    assert_eq!(set_by(&get, "heartbeat_interval_s"), "location", "{get}");
    assert_eq!(set_by(&set, "mode"), set_by(&get, "mode"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_event_counters_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let node = start_node(&dir.path().join("n"), &[&manager.url], &[]);
    wait_ready(&node.url).await;
    // Critical ones (forwarded at once, and again with each batch) and routine ones.
    for i in 0..20 {
        let kind = if i % 2 == 0 { "risk" } else { "system_change" };
        let events = json!({"client_id": format!("pc-{}", i % 4), "events": [
            {"id": format!("a{i}"), "kind": kind, "time": "2026-12-03T10:00:00Z"},
            {"id": format!("b{i}"), "kind": "system_change", "time": "2026-12-03T10:00:00Z"}]});
        let (status, v) = post_json(&node.url, "/v1/events", events).await;
        assert_eq!(status, 202, "{v}");
    }
    let m = manager.url.clone();
    wait_for(30, "all 40 events reach the manager", || {
        let m = m.clone();
        async move { (all_events(&m).await.len() == 40).then_some(()) }
    })
    .await;
    let c = reqwest::Client::new();
    let n = node.url.clone();
    wait_for(10, "the node's counters settle", || {
        let (c, n) = (c.clone(), n.clone());
        async move {
            let queued = metric(&c, &n, "gup_events_queued").await;
            (queued == 0.0).then_some(())
        }
    })
    .await;
    assert_eq!(
        metric(&c, &node.url, "gup_events_forwarded_total").await,
        40.0
    );
}
