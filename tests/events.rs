//! End to end through real processes: events and learned applications flowing up.
//! - 500 events accepted by a node while the manager is down survive a SIGKILL of the node
//!   and all arrive once the manager starts, each stored once;
//! - a critical event goes up at once, a non-critical one waits for the node's next
//!   heartbeat batch (asserted on order);
//! - several critical events in one damper period give one notification with the count;
//! - application learning is refused (403) until both the site and the group switch are on;
//! - bad event bodies are 400 naming the field, oversized ones 413.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

fn event(id: &str, kind: &str, subkind: &str) -> Value {
    json!({"id": id, "kind": kind, "subkind": subkind, "time": "2026-11-24T10:00:00Z", "data": {"n": id}})
}

async fn admin_get(manager: &str, path: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{manager}{path}"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Every stored event, following the cursor.
async fn all_events(manager: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after: Option<u64> = None;
    loop {
        let path = match after {
            Some(a) => format!("/v1/admin/events?limit=200&after={a}"),
            None => "/v1/admin/events?limit=200".to_string(),
        };
        let v = admin_get(manager, &path).await;
        out.extend(v["events"].as_array().unwrap().iter().cloned());
        match v["next"].as_u64() {
            Some(n) => after = Some(n),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_survive_outage_and_sigkill_and_arrive_once() {
    let dir = tempfile::tempdir().unwrap();
    let m_addr = format!("127.0.0.1:{}", free_port());
    let m_url = format!("http://{m_addr}");
    let n_dir = dir.path().join("n");
    let node = start_node(&n_dir, &[&m_url], &[]);
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
        let body = json!({"client_id": format!("pc-{c}"), "events": events});
        for _ in 0..(1 + c % 2) {
            let r = client
                .post(format!("{}/v1/events", node.url))
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["accepted"], 10);
        }
    }
    assert!(metric(&client, &node.url, "gup_events_queued").await >= 500.0);
    node.kill9();

    let node = start_node(&n_dir, &[&m_url], &[]);
    assert!(metric(&client, &node.url, "gup_events_queued").await >= 500.0);
    let manager = start_manager_on(&dir.path().join("m"), &m_addr, &[]);
    let mu = manager.url.clone();
    let events = wait_for(60, "all 500 events reach the manager", || {
        let u = mu.clone();
        async move {
            let all = all_events(&u).await;
            (all.len() >= 500).then_some(all)
        }
    })
    .await;
    // Give any duplicate a chance to show, then check each is stored once.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let events = if events.len() == 500 {
        all_events(&manager.url).await
    } else {
        events
    };
    assert_eq!(events.len(), 500);
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
    assert_eq!(keys.len(), 500);
    let nu = node.url.clone();
    wait_for(20, "the outbox drains", || {
        let (c, u) = (client.clone(), nu.clone());
        async move { (metric(&c, &u, "gup_events_queued").await == 0.0).then_some(()) }
    })
    .await;
    assert!(metric(&client, &node.url, "gup_events_forwarded_total").await >= 500.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_goes_at_once_non_critical_with_the_heartbeat_batch() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    // Heartbeat batches every 5 s: only the critical path can beat that.
    let node = start_node_toml(
        &dir.path().join("n"),
        &[&manager.url],
        "sync_interval_s = 5\n",
        &[],
    );
    let client = reqwest::Client::new();
    // Let the first batch tick pass so the next is a full interval away.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for (id, kind) in [("routine", "system_change"), ("alarm", "intrusion")] {
        let r = client
            .post(format!("{}/v1/events", node.url))
            .json(&json!({"client_id": "pc-1", "events": [event(id, kind, "")]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
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
    // One notification for the critical event.
    let n = admin_get(&manager.url, "/v1/admin/notifications").await;
    assert_eq!(n["notifications"][0]["kind"], "intrusion");
    assert_eq!(n["notifications"][0]["count"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damper_learning_gate_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let client = reqwest::Client::new();
    let post = |path: &'static str, body: Value| {
        let (c, u) = (client.clone(), manager.url.clone());
        async move {
            c.post(format!("{u}{path}"))
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    // Damper: four critical events of one kind and group in one period -> one notification.
    for i in 0..4 {
        let r = post(
            "/v1/events",
            json!({"client_id": "pc-9", "events": [event(&format!("v{i}"), "risk", "virus")]}),
        )
        .await;
        assert_eq!(r.status(), 202);
    }
    // A cookie is not critical.
    post(
        "/v1/events",
        json!({"client_id": "pc-9", "events": [event("c1", "risk", "cookie")]}),
    )
    .await;
    let n = admin_get(&manager.url, "/v1/admin/notifications").await;
    let ns = n["notifications"].as_array().unwrap();
    assert_eq!(ns.len(), 1, "{n}");
    assert_eq!(ns[0]["count"], 4);
    assert_eq!(ns[0]["group"], "default");
    let out = Command::new(gup())
        .args([
            "admin",
            "--manager",
            &manager.url,
            "--token",
            ADMIN_TOKEN,
            "events",
            "--kind",
            "risk",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(
        text.lines().filter(|l| l.contains("pc-9")).count(),
        5,
        "{text}"
    );
    // limit over 10000 is 400 naming limit.
    let r = client
        .get(format!("{}/v1/admin/events?limit=10001", manager.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().unwrap().contains("limit"));

    // Learning gate.
    let apps = json!({"client_id": "pc-9", "applications": [{"name": "Notepad++", "version": "8.6", "path": "C:/Tools/notepad++.exe"}]});
    let r = post("/v1/applications", apps.clone()).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("application_learning"),
        "{v}"
    );
    let r = client
        .put(format!("{}/v1/admin/site", manager.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"application_learning": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = post("/v1/applications", apps.clone()).await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("learn_applications"),
        "{v}"
    );
    let r = client
        .put(format!("{}/v1/admin/groups/default/settings", manager.url))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"learn_applications": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = post("/v1/applications", apps).await;
    assert_eq!(r.status(), 202);
    let out = Command::new(gup())
        .args([
            "admin",
            "--manager",
            &manager.url,
            "--token",
            ADMIN_TOKEN,
            "apps",
            "search",
            "notepad",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("Notepad++") && text.contains("8.6"), "{text}");

    // Validation: 400 naming the field; over 1 MiB: 413.
    let r = post(
        "/v1/events",
        json!({"client_id": "pc-9", "events": [{"kind": "risk", "time": "2026-11-24T10:00:00Z"}]}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let r = post(
        "/v1/events",
        json!({"client_id": "pc-9", "events": [{"id": "x", "kind": "risk", "time": "noon"}]}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"].as_str().unwrap().contains("events[0].time"),
        "{v}"
    );
    let big = "x".repeat(1_100_000);
    let r = post("/v1/events", json!({"client_id": "pc-9", "events": [{"id": "big", "kind": "k", "time": "2026-11-24T10:00:00Z", "data": big}]})).await;
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"], "body_too_large");
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
    let r = reqwest::Client::new()
        .post(format!("{}/v1/events", manager.url))
        .json(&json!({"client_id": "pc-1", "events": [event("i1", "intrusion", "portscan")]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
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
