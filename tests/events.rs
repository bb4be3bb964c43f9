//! End to end through real processes: events and learned applications flowing up.
//! - 500 events accepted by a node while the manager is down survive a SIGKILL of the node
//!   and all arrive once the manager starts, each stored once;
//! - a critical event goes up at once, a non-critical one waits for the node's next
//!   heartbeat batch (asserted on order); a critical event relayed by a node raises a
//!   notification;
//! - several critical events of one kind in one damper period give one notification with
//!   the count; a `risk` `cookie` is not critical; `gup admin events --kind` lists the
//!   events of that kind;
//! - a notification is posted to the webhook, retried after a failure;
//! - application learning is refused (403 `learning_off`, naming the switch) until both the
//!   site and the group switch are on; then uploads are accepted and `gup admin apps
//!   search` finds them;
//! - bad event bodies are 400 naming the field, oversized ones 413 `body_too_large`; an
//!   events `limit` over 10000 is 400 naming `limit`.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

fn event(id: &str, kind: &str, subkind: &str) -> Value {
    json!({"id": id, "kind": kind, "subkind": subkind, "time": "2026-11-24T10:00:00Z", "data": {"n": id}})
}

async fn notifications(manager: &str) -> Vec<Value> {
    let (status, v) = admin_call(manager, Method::GET, "/v1/admin/notifications", None).await;
    assert_eq!(status, 200, "{v}");
    v["notifications"].as_array().unwrap().clone()
}

/// Posts `events` from `client` to `base/v1/events`; asserts 202.
async fn post_events(base: &str, client: &str, events: Vec<Value>) -> Value {
    let (status, v) = post_json(
        base,
        "/v1/events",
        json!({"client_id": client, "events": events}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_accepted_during_an_outage_survive_a_sigkill_and_arrive_once() {
    let dir = tempfile::tempdir().unwrap();
    let m_addr = format!("127.0.0.1:{}", free_port());
    let m_url = format!("http://{m_addr}");
    let n_dir = dir.path().join("n");
    // One sync first (a node that never synced cannot check who its clients are).
    let first = start_manager_on(&dir.path().join("m"), &m_addr, &[]);
    let node = start_node(&n_dir, &[&m_url], &[]);
    wait_ready(&node.url).await;
    first.kill9();
    let client = reqwest::Client::new();
    // 500 events from 50 clients, some sent twice; the manager is not running.
    for c in 0..50 {
        let events: Vec<Value> = (0..10)
            .map(|i| {
                event(
                    &format!("e{i}"),
                    if i == 0 { "risk" } else { "system_change" },
                    "x",
                )
            })
            .collect();
        for _ in 0..(1 + c % 2) {
            let v = post_events(&node.url, &format!("pc-{c}"), events.clone()).await;
            assert_eq!(v["accepted"], 10);
        }
    }
    assert!(
        metric(&client, &node.url, "gup_events_queued").await >= 500.0,
        "queued while the manager is down"
    );
    node.kill9();

    let node = start_node(&n_dir, &[&m_url], &[]);
    assert!(
        metric(&client, &node.url, "gup_events_queued").await >= 500.0,
        "still queued after the SIGKILL"
    );
    let manager = start_manager_on(&dir.path().join("m"), &m_addr, &[]);
    let nu = node.url.clone();
    wait_for(60, "the outbox drains", || {
        let (c, u) = (client.clone(), nu.clone());
        async move { (metric(&c, &u, "gup_events_queued").await == 0.0).then_some(()) }
    })
    .await;
    assert!(
        metric(&client, &node.url, "gup_events_forwarded_total").await >= 500.0,
        "forwarded"
    );
    // The manager stored each batch before accepting it, so with the outbox empty every
    // event (and any duplicate) is there.
    let events = all_events(&manager.url).await;
    assert_eq!(events.len(), 500, "every event arrived, once");
    let mut keys: Vec<(String, String)> = events
        .iter()
        .map(|e| {
            (
                e["client_id"].as_str().unwrap().to_string(),
                e["id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 500, "each (client_id, id) stored once");
}

/// A manager and a node that sends heartbeat batches every 5 s: only the critical path can
/// beat that. (The node's first batch goes a whole interval after it starts.)
fn manager_and_slow_batching_node(dir: &std::path::Path) -> (Proc, Proc) {
    let manager = start_manager(&dir.join("m"), &[]);
    let node = start_node_toml(
        &dir.join("n"),
        &[&manager.url],
        "sync_interval_s = 5\n",
        &[],
    );
    (manager, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_event_goes_up_at_once_and_a_routine_one_with_the_next_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, node) = manager_and_slow_batching_node(dir.path());
    post_events(
        &node.url,
        "pc-1",
        vec![event("routine", "system_change", "")],
    )
    .await;
    post_events(&node.url, "pc-1", vec![event("alarm", "intrusion", "")]).await;
    let mu = manager.url.clone();
    let first = wait_for(10, "the critical event reaches the manager", || {
        let u = mu.clone();
        async move {
            let all = all_events(&u).await;
            (!all.is_empty()).then_some(all)
        }
    })
    .await;
    assert_eq!(
        first.len(),
        1,
        "only the critical event went at once: {first:?}"
    );
    assert_eq!(first[0]["id"], "alarm");
    assert_eq!(first[0]["group"], "default");
    let both = wait_for(20, "the routine event arrives with the batch", || {
        let u = mu.clone();
        async move {
            let all = all_events(&u).await;
            (all.len() == 2).then_some(all)
        }
    })
    .await;
    assert_eq!(both[1]["id"], "routine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_event_relayed_by_a_node_raises_a_notification() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, node) = manager_and_slow_batching_node(dir.path());
    post_events(&node.url, "pc-1", vec![event("alarm", "intrusion", "")]).await;
    let mu = manager.url.clone();
    let n = wait_for(10, "a notification", || {
        let u = mu.clone();
        async move {
            let n = notifications(&u).await;
            (!n.is_empty()).then_some(n)
        }
    })
    .await;
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0]["kind"], "intrusion");
    assert_eq!(n[0]["group"], "default");
    assert_eq!(n[0]["count"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_events_of_one_kind_in_a_damper_period_give_one_notification_with_the_count() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    for i in 0..4 {
        post_events(
            &manager.url,
            "pc-9",
            vec![event(&format!("v{i}"), "risk", "virus")],
        )
        .await;
    }
    let n = notifications(&manager.url).await;
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0]["kind"], "risk");
    assert_eq!(n[0]["count"], 4);
    assert_eq!(n[0]["group"], "default");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_risk_cookie_event_is_not_critical() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    post_events(&manager.url, "pc-9", vec![event("c1", "risk", "cookie")]).await;
    post_events(&manager.url, "pc-9", vec![event("v1", "risk", "virus")]).await;
    let n = notifications(&manager.url).await;
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0]["count"], 1, "the cookie is not counted: {n:?}");
    assert_eq!(all_events(&manager.url).await.len(), 2, "both are stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gup_admin_events_lists_the_events_of_a_kind() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let mut events: Vec<Value> = (0..4)
        .map(|i| event(&format!("v{i}"), "risk", "virus"))
        .collect();
    events.push(event("c1", "risk", "cookie"));
    events.push(event("s1", "system_change", ""));
    post_events(&manager.url, "pc-9", events).await;
    let (code, out) = admin_cli(&manager.url, &["events", "--kind", "risk"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains("pc-9")).count(),
        5,
        "the five risk events, not the system change: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_events_limit_over_10000_is_400_naming_limit() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let (status, v) = admin_call(
        &manager.url,
        Method::GET,
        "/v1/admin/events?limit=10001",
        None,
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "bad_request");
    assert!(v["message"].as_str().unwrap().contains("limit"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_are_posted_to_the_webhook_with_retries() {
    use axum::routing::post;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    // A receiver that fails the first delivery, then records.
    let calls = Arc::new(AtomicUsize::new(0));
    let got = Arc::new(tokio::sync::Mutex::new(Vec::<Value>::new()));
    let (c2, g2) = (calls.clone(), got.clone());
    let app = axum::Router::new().route(
        "/hook",
        post(move |axum::Json(v): axum::Json<Value>| {
            let (calls, got) = (c2.clone(), g2.clone());
            async move {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                got.lock().await.push(v);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("manager.toml");
    std::fs::write(&cfg, format!("[notifications]\nwebhook_url = \"{hook}\"\n")).unwrap();
    let manager = start_manager(&dir.path().join("m"), &["--config", cfg.to_str().unwrap()]);
    post_events(
        &manager.url,
        "pc-1",
        vec![event("i1", "intrusion", "portscan")],
    )
    .await;
    let delivered = wait_for(20, "the webhook receives the notification", || {
        let g = got.clone();
        async move { g.lock().await.first().cloned() }
    })
    .await;
    assert_eq!(delivered["kind"], "intrusion");
    assert_eq!(delivered["group"], "default");
    assert!(
        calls.load(Ordering::SeqCst) >= 2,
        "the first failure was retried"
    );
}

fn notepad() -> Value {
    json!({"client_id": "pc-9", "applications": [{"name": "Notepad++", "version": "8.6", "path": "C:/Tools/notepad++.exe"}]})
}

/// Uploads applications to the manager; asserts 403 `learning_off` with a message naming
/// `switch`.
async fn refused_naming(manager: &str, switch: &str) {
    let (status, v) = post_json(manager, "/v1/applications", notepad()).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"], "learning_off", "{v}");
    assert!(v["message"].as_str().unwrap().contains(switch), "{v}");
}

async fn site_learning_on(manager: &str) {
    let (status, v) = admin_call(
        manager,
        Method::PUT,
        "/v1/admin/site",
        Some(json!({"application_learning": true})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_are_refused_while_site_learning_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    refused_naming(&manager.url, "application_learning").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_are_refused_while_the_groups_learn_applications_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    site_learning_on(&manager.url).await;
    refused_naming(&manager.url, "learn_applications").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_both_switches_on_applications_are_accepted_and_found_by_apps_search() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    site_learning_on(&manager.url).await;
    let (status, v) = admin_call(
        &manager.url,
        Method::PUT,
        "/v1/admin/groups/default/settings",
        Some(json!({"learn_applications": true})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = post_json(&manager.url, "/v1/applications", notepad()).await;
    assert_eq!(status, 202, "{v}");
    let (code, out) = admin_cli(&manager.url, &["apps", "search", "notepad"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Notepad++") && out.contains("8.6"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_without_an_id_is_400() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let (status, v) = post_json(
        &manager.url,
        "/v1/events",
        json!({"client_id": "pc-9", "events": [{"kind": "risk", "time": "2026-11-24T10:00:00Z"}]}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "bad_json");
    assert!(v["message"].as_str().unwrap().contains("`id`"), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_with_an_invalid_time_is_400_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let (status, v) = post_json(
        &manager.url,
        "/v1/events",
        json!({"client_id": "pc-9", "events": [{"id": "x", "kind": "risk", "time": "noon"}]}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"], "bad_request");
    assert!(
        v["message"].as_str().unwrap().contains("events[0].time"),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_upload_over_1_mib_is_413_body_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let big = "x".repeat(1_100_000);
    let (status, v) = post_json(
        &manager.url,
        "/v1/events",
        json!({"client_id": "pc-9", "events": [{"id": "big", "kind": "k", "time": "2026-11-24T10:00:00Z", "data": big}]}),
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(v["error"], "body_too_large");
}
