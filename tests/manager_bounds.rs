//! End to end through real processes: the manager's records stay bounded under abuse.
//! - events are paged by any filter with cursors that never wrap (an `after` near u64::MAX
//!   is an empty last page), and a re-sent id is accepted and stored once;
//! - a filter that matches little answers a short page with `next` at the scan bound, and
//!   `gup admin events` says where to continue;
//! - clients are paged (`limit`, `after` exclusive, 400 naming `limit`), and
//!   `gup admin client list` prints every page, as one list with `--json`;
//! - a policy over 1 MiB is refused with 413 naming the group;
//! - the same applications uploaded again and again leave one record with its client count.

mod common;

use std::process::Command;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

fn event(id: &str, kind: &str, time: &str) -> Value {
    json!({"id": id, "kind": kind, "subkind": "virus", "time": time, "data": {"id": id}})
}

/// `gup admin ARGS` against `manager`; (exit code, stdout, stderr).
fn admin_cli(manager: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(gup())
        .args(["admin", "--manager", manager, "--token", ADMIN_TOKEN])
        .args(args)
        .output()
        .expect("run gup admin");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every event a query finds, following `next` (at most `pages` pages); the events and
/// the number of pages it took.
async fn follow(manager: &str, query: &str, pages: usize) -> (Vec<Value>, usize) {
    let mut out = Vec::new();
    let mut after: Option<u64> = None;
    for n in 1..=pages {
        let path = match after {
            Some(a) => format!("/v1/admin/events?{query}&after={a}"),
            None => format!("/v1/admin/events?{query}"),
        };
        let (status, v) = admin_call(manager, Method::GET, &path, None).await;
        assert_eq!(status, 200, "{path}: {v}");
        out.extend(v["events"].as_array().unwrap().iter().cloned());
        match v["next"].as_u64() {
            Some(next) => after = Some(next),
            None => return (out, n),
        }
    }
    panic!("{query}: more than {pages} pages");
}

async fn heartbeat(base: &str, client: &str, group: &str) {
    let (status, v) = post_json(
        base,
        "/v1/heartbeat",
        json!({"client_id": client, "install_group": group}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_paged_by_filters_and_cursors_that_never_wrap() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let m = manager.url.as_str();
    let (status, _) = admin_call(
        m,
        Method::PUT,
        "/v1/admin/groups/lab",
        Some(json!({"parent": "default"})),
    )
    .await;
    assert_eq!(status, 201);
    heartbeat(m, "pc-lab", "lab").await;
    heartbeat(m, "pc-hq", "default").await;
    // 30 events of pc-lab (scan and update alternating, ten a day over three days), 20
    // of pc-hq.
    let lab: Vec<Value> = (0..30)
        .map(|i| {
            let kind = if i % 2 == 0 { "scan" } else { "update" };
            let time = format!("2026-11-{}T{:02}:00:00Z", 20 + i / 10, i % 10);
            event(&format!("l{i}"), kind, &time)
        })
        .collect();
    let (status, v) = post_json(
        m,
        "/v1/events",
        json!({"client_id": "pc-lab", "events": lab}),
    )
    .await;
    assert_eq!((status, v["accepted"].clone()), (202, json!(30)));
    let hq: Vec<Value> = (0..20)
        .map(|i| event(&format!("h{i}"), "scan", "2026-11-25T10:00:00Z"))
        .collect();
    let (status, v) = post_json(m, "/v1/events", json!({"client_id": "pc-hq", "events": hq})).await;
    assert_eq!((status, v["accepted"].clone()), (202, json!(20)));
    // A re-send is accepted and counted, and stored once.
    let again =
        json!({"client_id": "pc-hq", "events": [event("h3", "scan", "2026-11-25T10:00:00Z")]});
    let (status, v) = post_json(m, "/v1/events", again).await;
    assert_eq!((status, v["accepted"].clone()), (202, json!(1)));

    let (all, pages) = follow(m, "limit=7", 20).await;
    assert_eq!(all.len(), 50, "each event once");
    assert_eq!(pages, 8);
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in seq order");
    let (scans, _) = follow(m, "kind=scan&limit=4", 20).await;
    assert_eq!(scans.len(), 35);
    assert!(scans.iter().all(|e| e["kind"] == "scan"));
    let (lab_scans, _) = follow(m, "group=lab&kind=scan&limit=4", 20).await;
    assert_eq!(lab_scans.len(), 15);
    assert!(lab_scans
        .iter()
        .all(|e| e["client_id"] == "pc-lab" && e["group"] == "lab"));
    let (by_client, _) = follow(m, "client=pc-hq&group=default&limit=3", 20).await;
    assert_eq!(by_client.len(), 20);
    // since filters on the event's time: pc-lab's last day (10 events) and all of pc-hq.
    let (recent, _) = follow(m, "since=2026-11-22T00:00:00Z&limit=6", 20).await;
    assert_eq!(recent.len(), 30);
    let (recent_lab, _) = follow(m, "client=pc-lab&since=2026-11-22T05:00:00Z", 5).await;
    assert_eq!(recent_lab.len(), 5);
    let (nothing, _) = follow(m, "kind=intrusion", 2).await;
    assert!(nothing.is_empty());

    // Cursors at and near the end of u64: an empty last page, never the first again.
    for after in [u64::MAX, u64::MAX - 1, 1_000_000] {
        for filter in ["", "&kind=scan", "&since=2026-01-01T00:00:00Z"] {
            let path = format!("/v1/admin/events?after={after}{filter}");
            let (status, v) = admin_call(m, Method::GET, &path, None).await;
            assert_eq!(status, 200, "{path}");
            assert_eq!(v, json!({"events": [], "next": null}), "{path}");
        }
    }
    // One past u64::MAX does not parse, and limit over 10000 is 400 naming limit.
    for path in [
        "/v1/admin/events?after=18446744073709551616",
        "/v1/admin/events?limit=10001",
    ] {
        let (status, v) = admin_call(m, Method::GET, path, None).await;
        assert_eq!(status, 400, "{path}: {v}");
    }
    let (_, v) = admin_call(m, Method::GET, "/v1/admin/events?limit=10001", None).await;
    assert!(v["message"].as_str().unwrap().contains("limit"), "{v}");

    // The CLI shows a page and where to continue.
    let (code, out, err) = admin_cli(m, &["events", "--kind", "scan", "--limit", "5"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.contains(" scan ")).count(),
        5,
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("more: --after ")),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_matches_little_answers_a_short_page_with_next() {
    let dir = tempfile::tempdir().unwrap();
    // Ten entries a request instead of 50,000 (a testing knob of the manager).
    let manager = start_manager_env(&dir.path().join("m"), &[], &[("GUP_TEST_SCAN_LIMIT", "10")]);
    let m = manager.url.as_str();
    let events: Vec<Value> = (1..=40)
        .map(|i| {
            let kind = if i == 25 { "intrusion" } else { "scan" };
            event(&format!("e{i}"), kind, "2026-11-24T10:00:00Z")
        })
        .collect();
    let (status, _) = post_json(
        m,
        "/v1/events",
        json!({"client_id": "pc", "events": events}),
    )
    .await;
    assert_eq!(status, 202);
    // The first ten entries hold no intrusion: an empty page that says where it stopped.
    let (status, v) = admin_call(
        m,
        Method::GET,
        "/v1/admin/events?client=pc&kind=intrusion",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["events"], json!([]));
    assert_eq!(v["next"], 10);
    let (found, pages) = follow(m, "client=pc&kind=intrusion", 10).await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["id"], "e25");
    assert_eq!(pages, 5, "ten entries a page, the last page empty");
    // A page asked for 1000 holds what ten entries gave, and continues.
    let (_, v) = admin_call(m, Method::GET, "/v1/admin/events?limit=1000", None).await;
    assert_eq!(v["events"].as_array().unwrap().len(), 10);
    assert_eq!(v["next"], 10);
    let (code, out, err) = admin_cli(m, &["events", "--client", "pc", "--kind", "intrusion"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("more: --after 10"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_paged_and_the_cli_prints_every_page() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let m = manager.url.as_str();
    for i in 0..25 {
        heartbeat(m, &format!("pc-{i:02}"), "default").await;
    }
    let (status, _) = admin_call(m, Method::DELETE, "/v1/admin/clients/pc-05", None).await;
    assert_eq!(status, 200);
    let ids = |v: &Value| -> Vec<String> {
        v["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["client_id"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, first) = admin_call(m, Method::GET, "/v1/admin/clients?limit=10", None).await;
    assert_eq!(status, 200);
    assert_eq!(ids(&first).len(), 10);
    assert_eq!(ids(&first)[0], "pc-00");
    assert!(
        !ids(&first).contains(&"pc-05".to_string()),
        "deleted clients are hidden"
    );
    let after = first["next"].as_str().unwrap().to_string();
    let (_, second) = admin_call(
        m,
        Method::GET,
        &format!("/v1/admin/clients?limit=10&after={after}"),
        None,
    )
    .await;
    assert!(
        ids(&second).iter().all(|id| *id > after),
        "after is exclusive"
    );
    let (_, last) = admin_call(
        m,
        Method::GET,
        &format!(
            "/v1/admin/clients?limit=10&after={}",
            second["next"].as_str().unwrap()
        ),
        None,
    )
    .await;
    assert_eq!(last["next"], Value::Null);
    let mut seen = [ids(&first), ids(&second), ids(&last)].concat();
    let total = seen.len();
    seen.dedup();
    assert_eq!((total, seen.len()), (24, 24));
    for q in ["limit=10001", "limit=0"] {
        let (status, v) = admin_call(m, Method::GET, &format!("/v1/admin/clients?{q}"), None).await;
        assert_eq!(status, 400, "{q}: {v}");
        assert!(v["message"].as_str().unwrap().contains("limit"), "{v}");
    }
    // The CLI follows next: 24 clients in pages of 7.
    let (code, out, err) = admin_cli(m, &["client", "list", "--page", "7"]);
    assert_eq!(code, 0, "{err}");
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("pc-")).collect();
    assert_eq!(rows.len(), 24, "{out}");
    assert!(
        rows[0].starts_with("pc-00") && rows[23].starts_with("pc-24"),
        "{out}"
    );
    let (code, out, err) = admin_cli(m, &["client", "list", "--page", "7", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("one JSON document");
    assert_eq!(ids(&v).len(), 24);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_over_a_mebibyte_is_refused_naming_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let m = manager.url.as_str();
    let (status, _) = admin_call(
        m,
        Method::PUT,
        "/v1/admin/groups/branch-7",
        Some(json!({"parent": "default"})),
    )
    .await;
    assert_eq!(status, 201);
    let policy = |bytes: usize| json!({ "rules": "x".repeat(bytes) });
    // Just over 1 MiB (read by the handler) and well over it (refused by the route's limit).
    for size in [(1 << 20) + 10, (1 << 20) + (200 << 10)] {
        let (status, v) = admin_call(
            m,
            Method::PUT,
            "/v1/admin/groups/branch-7/policy",
            Some(policy(size)),
        )
        .await;
        assert_eq!(status, 413, "{size}: {v}");
        assert_eq!(v["error"], "policy_too_large");
        assert!(v["message"].as_str().unwrap().contains("branch-7"), "{v}");
    }
    // Just under it is a new policy.
    let (status, v) = admin_call(
        m,
        Method::PUT,
        "/v1/admin/groups/branch-7/policy",
        Some(policy((1 << 20) - 100)),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["serial"].as_u64().is_some());
    // Through the CLI, the refusal names the group too.
    let file = dir.path().join("big.json");
    std::fs::write(&file, policy((1 << 20) + (200 << 10)).to_string()).unwrap();
    let (code, _, err) = admin_cli(m, &["policy", "set", "branch-7", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("branch-7"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_applications_leave_the_inventory_at_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let m = manager.url.as_str();
    let (status, _) = admin_call(
        m,
        Method::PUT,
        "/v1/admin/site",
        Some(json!({"application_learning": true})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = admin_call(
        m,
        Method::PUT,
        "/v1/admin/groups/default/settings",
        Some(json!({"learn_applications": true})),
    )
    .await;
    assert_eq!(status, 200);
    let app = json!({"name": "Notepad++", "version": "8.6", "path": "C:/Tools/notepad++.exe"});
    for _ in 0..200 {
        let (status, v) = post_json(
            m,
            "/v1/applications",
            json!({"client_id": "pc-1", "applications": [app.clone(), app.clone()]}),
        )
        .await;
        assert_eq!(status, 202, "{v}");
    }
    let (status, v) = post_json(
        m,
        "/v1/applications",
        json!({"client_id": "pc-2", "applications": [app]}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let (status, v) = admin_call(m, Method::GET, "/v1/admin/applications?q=notepad", None).await;
    assert_eq!(status, 200);
    let apps = v["applications"].as_array().unwrap();
    assert_eq!(apps.len(), 1, "{v}");
    assert_eq!(apps[0]["client_count"], 2);
    let clients: Vec<&str> = apps[0]["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(clients, vec!["pc-1", "pc-2"]);
    assert_eq!(v["next"], Value::Null);
    // The CLI's CLIENTS column is the count.
    let (code, out, err) = admin_cli(m, &["apps", "search", "notepad"]);
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("Notepad++"))
        .expect(&out);
    assert_eq!(row.split_whitespace().nth(3), Some("2"), "{out}");
}
