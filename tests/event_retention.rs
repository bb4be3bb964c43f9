//! End to end through a real manager: event retention (issue 20.3).
//! - a manager file with an `[events]` section is a manager file to `check-config`, and a
//!   bad `events.retain_days` exits 2 naming the key;
//! - with `events.max_count = 10`, the oldest events beyond the newest ten are deleted at
//!   start and then by the background look (every 10 s) while the manager runs, and the log
//!   says how many;
//! - an event re-sent after its deletion is stored again, as a new event (documented).

mod common;

use common::*;
use serde_json::{json, Value};

async fn post(manager: &str, client: &str, ids: std::ops::Range<u32>) {
    let events: Vec<Value> = ids
        .map(|i| json!({"id": format!("e{i}"), "kind": "scan", "subkind": "full", "time": "2026-11-24T10:00:00Z", "data": {"i": i}}))
        .collect();
    let (status, v) = post_json(
        manager,
        "/v1/events",
        json!({"client_id": client, "events": events}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
}

fn event_ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_beyond_max_count_are_deleted_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("manager.toml");
    std::fs::write(&config, "[events]\nretain_days = 90\nmax_count = 10\n").unwrap();
    let out = std::process::Command::new(gup())
        .args(["check-config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid manager config"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[manager]\n[events]\nretain_days = 0\n").unwrap();
    let out = std::process::Command::new(gup())
        .args(["check-config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("events.retain_days must be 1 to 36500")
            || err.contains("events.retain_days: must be 1 to 36500"),
        "{err}"
    );

    let data = dir.path().join("m");
    let flags = ["--config", config.to_str().unwrap()];
    let manager = start_manager(&data, &flags);
    post(&manager.url, "pc-1", 0..15).await;
    post(&manager.url, "pc-2", 15..30).await;
    assert_eq!(all_events(&manager.url).await.len(), 30);
    manager.stop();

    // At start, the first pass deletes the oldest twenty.
    let manager = start_manager(&data, &flags);
    let m = manager.url.clone();
    let kept = wait_for(20, "the newest ten are left", || {
        let m = m.clone();
        async move {
            let events = all_events(&m).await;
            (events.len() == 10).then_some(events)
        }
    })
    .await;
    let expected: Vec<String> = (20..30).map(|i| format!("e{i}")).collect();
    assert_eq!(event_ids(&kept), expected);

    // Re-sent after its deletion, e0 is a new event.
    post(&m, "pc-1", 0..1).await;
    let events = all_events(&m).await;
    assert_eq!(events.len(), 11, "{events:?}");
    assert_eq!(events[10]["id"], "e0");
    assert_eq!(events[10]["seq"], 31);

    // While running: the background look brings it back to ten.
    post(&m, "pc-3", 100..105).await;
    let kept = wait_for(30, "retention runs in the background", || {
        let m = m.clone();
        async move {
            let events = all_events(&m).await;
            (events.len() == 10).then_some(events)
        }
    })
    .await;
    assert_eq!(kept[0]["id"], "e26", "{kept:?}");
    assert!(manager.log_text().contains("events past retention deleted"));
    manager.stop();
}
