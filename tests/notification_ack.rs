//! End to end through a real manager: notifications an admin can clear (issue 20.4).
//! - critical events raise one damped notification that lists the ids of the events it
//!   counts (`event_ids`, in arrival order) beside its `count`;
//! - `POST /v1/admin/notifications/{id}/ack` answers the notification with `acked_at`;
//!   again is 200 with the same `acked_at`; an unknown id is 404 `no_such_notification`
//!   naming it; without the admin token it is 401;
//! - an acknowledged notification counts no more: the next critical event of its (group,
//!   kind) raises a new one within the damper period;
//! - `?unacked=true` hides acknowledged ones; `POST /v1/admin/notifications/ack` needs
//!   `{"all": true}` (400 naming `all` otherwise) and acknowledges every one up to `up_to`;
//! - `gup admin notifications [--unacked]`, `ack ID` and `ack --all`: output, exit 0;
//!   an unknown id exits 1 with one line naming it; neither ID nor --all exits 2;
//! - the status page shows which notifications are open.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

/// Posts critical events (kind `intrusion`) with `ids` from `client` to the manager.
async fn critical(manager: &str, client: &str, ids: &[&str]) {
    let events: Vec<Value> = ids
        .iter()
        .map(|id| json!({"id": id, "kind": "intrusion", "subkind": "port_scan", "time": "2026-11-24T10:00:00Z", "data": {}}))
        .collect();
    let (status, v) = post_json(
        manager,
        "/v1/events",
        json!({"client_id": client, "events": events}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
}

/// The notifications listed at `query` (newest first).
async fn listed(manager: &str, query: &str) -> Vec<Value> {
    let path = format!("/v1/admin/notifications{query}");
    let (status, v) = admin_call(manager, Method::GET, &path, None).await;
    assert_eq!(status, 200, "{path}: {v}");
    v["notifications"].as_array().unwrap().clone()
}

fn ids(notes: &[Value]) -> Vec<u64> {
    notes.iter().map(|n| n["id"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_acknowledges_notifications_by_id_and_all_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let m = manager.url.as_str();

    // One notification counting three events, each id listed.
    critical(m, "pc-1", &["a", "b"]).await;
    critical(m, "pc-2", &["c"]).await;
    let notes = listed(m, "").await;
    assert_eq!(notes.len(), 1, "{notes:?}");
    let first = &notes[0];
    assert_eq!(first["count"], 3, "{first}");
    assert_eq!(first["event_ids"], json!(["a", "b", "c"]), "{first}");
    assert_eq!(first["acked_at"], Value::Null, "{first}");
    let id = first["id"].as_u64().unwrap();

    // Acknowledged through the API; again changes nothing.
    let ack = format!("/v1/admin/notifications/{id}/ack");
    let (status, acked) = admin_call(m, Method::POST, &ack, None).await;
    assert_eq!(status, 200, "{acked}");
    assert_eq!(acked["id"], id);
    assert!(acked["acked_at"].is_string(), "{acked}");
    assert_eq!(acked["event_ids"], first["event_ids"]);
    let (status, again) = admin_call(m, Method::POST, &ack, None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, acked, "acknowledging twice is idempotent");

    // Unknown ids are 404 naming them; no token is 401.
    for unknown in ["999", "abc"] {
        let path = format!("/v1/admin/notifications/{unknown}/ack");
        let (status, e) = admin_call(m, Method::POST, &path, None).await;
        assert_eq!(status, 404, "{path}: {e}");
        assert_eq!(e["error"], "no_such_notification", "{e}");
        assert!(
            e["message"].as_str().unwrap().contains(unknown),
            "{path}: {e}"
        );
    }
    let r = reqwest::Client::new()
        .post(format!("{m}{ack}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Closed: the next critical event raises a new one, though within the damper period.
    critical(m, "pc-1", &["d"]).await;
    let notes = listed(m, "").await;
    assert_eq!(ids(&notes), vec![id + 1, id], "{notes:?}");
    assert_eq!(notes[0]["event_ids"], json!(["d"]));
    assert_eq!(
        notes[1]["count"], 3,
        "the acknowledged one counted nothing more"
    );
    assert_eq!(ids(&listed(m, "?unacked=true").await), vec![id + 1]);

    // Through the CLI: the list shows ids and which are open; ack ID; ack --all.
    let (code, out) = admin_cli(m, &["notifications", "--unacked"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ID"), "{out}");
    assert!(out.contains("ACKED"), "{out}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{out}");
    assert!(rows[0].starts_with(&format!("{} ", id + 1)), "{out}");
    let (code, out) = admin_cli(m, &["notifications", "ack", &(id + 1).to_string()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("acknowledged"), "{out}");
    assert!(listed(m, "?unacked=true").await.is_empty());
    let (code, out) = admin_cli(m, &["notifications", "ack", "999"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
    assert!(
        out.contains("no_such_notification") && out.contains("999"),
        "{out}"
    );
    let (code, out) = admin_cli(m, &["notifications", "ack"]);
    assert_eq!(code, 2, "{out}");

    // Undamped from here (every critical event notifies). The body must say all; up_to
    // leaves a newer one open.
    let (status, v) = admin_call(
        m,
        Method::PUT,
        "/v1/admin/site",
        Some(json!({"notification_damper_s": 0})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    critical(m, "pc-1", &["e"]).await;
    critical(m, "pc-3", &["f"]).await;
    let open = ids(&listed(m, "?unacked=true").await);
    assert_eq!(open, vec![id + 3, id + 2]);
    let path = "/v1/admin/notifications/ack";
    for body in [
        json!({}),
        json!({"all": false}),
        json!({"all": true, "every": 1}),
    ] {
        let (status, e) = admin_call(m, Method::POST, path, Some(body.clone())).await;
        assert_eq!(status, 400, "{body}: {e}");
        let text = e["message"].as_str().unwrap();
        assert!(
            text.contains("all") || text.contains("every"),
            "{body}: {e}"
        );
    }
    let (status, v) = admin_call(
        m,
        Method::POST,
        path,
        Some(json!({"all": true, "up_to": id + 2})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["acked"], 1, "{v}");
    assert_eq!(v["through"], id + 2, "{v}");
    assert_eq!(ids(&listed(m, "?unacked=true").await), vec![id + 3]);

    // The status page says which are open.
    critical(m, "pc-1", &["h"]).await;
    let page = reqwest::Client::new()
        .get(format!("{m}/admin"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("acknowledged"), "the column");
    assert!(page.contains(">open<"), "the new one is open");

    let (code, out) = admin_cli(m, &["notifications", "ack", "--all"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("2 notifications acknowledged"), "{out}");
    assert!(listed(m, "?unacked=true").await.is_empty());
    let all = listed(m, "").await;
    assert!(all.iter().all(|n| n["acked_at"].is_string()), "{all:?}");
    let (code, out) = admin_cli(m, &["notifications", "ack", "--all", "--json"]);
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["acked"], 0, "{v}");
    manager.stop();
}
