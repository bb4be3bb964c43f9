//! The inventory: one record per application and per pair, repeats that write nothing,
//! bounded answers, and the move from the previous format.

use super::*;
use crate::manager::migrate::previous_format;
use chrono::Duration;
use std::collections::BTreeMap;

fn notepad() -> Application {
    Application {
        name: "Notepad++".into(),
        version: Some("8.6".into()),
        path: Some("C:\\Program Files\\Notepad++\\notepad++.exe".into()),
        sha256: None,
    }
}

fn upload(client: &str, apps: Vec<Application>) -> ApplicationUpload {
    ApplicationUpload {
        client_id: client.into(),
        applications: apps,
    }
}

fn open() -> (tempfile::TempDir, Store, Inventory) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let inv = Inventory::open(&store).unwrap();
    (dir, store, inv)
}

/// Every record of every tree the inventory could touch, as JSON.
fn dump(store: &Store) -> Vec<(String, String, serde_json::Value)> {
    let mut out = Vec::new();
    for tree in [TREE, "applications"] {
        for (k, v) in store
            .kv(tree)
            .unwrap()
            .scan::<serde_json::Value>("")
            .unwrap()
        {
            out.push((tree.to_string(), k, v));
        }
    }
    out
}

fn search(inv: &Inventory, q: &str) -> AppPage {
    inv.search(&AppQuery {
        q: Some(q.into()),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn one_record_per_application_and_per_client() {
    let (_t, store, inv) = open();
    let now = Utc::now();
    for c in ["a", "b"] {
        inv.add(&upload(c, vec![notepad()]), now).unwrap();
    }
    let found = search(&inv, "notepad");
    assert_eq!(found.applications.len(), 1);
    let app = &found.applications[0];
    assert_eq!(app.app.client_count, 2);
    let clients: Vec<&str> = app.clients.iter().map(|c| c.client_id.as_str()).collect();
    assert_eq!(clients, vec!["a", "b"]);
    assert_eq!(search(&inv, "program files").applications.len(), 1);
    assert!(search(&inv, "chrome").applications.is_empty());
    // Three records: the application and two pairs.
    assert_eq!(dump(&store).len(), 3);
}

#[test]
fn an_upload_that_repeats_what_is_known_writes_nothing() {
    let (_t, store, inv) = open();
    let now = Utc::now();
    let many: Vec<Application> = (0..50)
        .map(|i| Application {
            name: format!("app-{i}"),
            ..notepad()
        })
        .collect();
    inv.add(&upload("pc-1", many.clone()), now).unwrap();
    let before = dump(&store);
    // The same upload again, a thousand tiny ones naming one known application, and
    // the same within one upload: nothing changes, not even a last-seen.
    inv.add(&upload("pc-1", many.clone()), now + Duration::hours(1))
        .unwrap();
    for i in 0..1000 {
        let t = now + Duration::seconds(i);
        inv.add(&upload("pc-1", vec![many[7].clone(), many[7].clone()]), t)
            .unwrap();
    }
    assert_eq!(dump(&store), before);
    // A day later the pair's last-seen is written once, and then again not for a day.
    let tomorrow = now + Duration::seconds(LAST_SEEN_EVERY_S);
    inv.add(&upload("pc-1", vec![many[7].clone()]), tomorrow)
        .unwrap();
    let after = dump(&store);
    let changed: Vec<_> = after.iter().filter(|r| !before.contains(r)).collect();
    assert_eq!(
        changed.len(),
        2,
        "the pair and its application: {changed:?}"
    );
    inv.add(
        &upload("pc-1", vec![many[7].clone()]),
        tomorrow + Duration::hours(3),
    )
    .unwrap();
    assert_eq!(dump(&store), after);
    let app = &search(&inv, "app-7").applications[0];
    assert_eq!(app.app.client_count, 1);
    assert_eq!(app.app.last_seen, tomorrow);
    assert_eq!(app.clients[0].first_seen, now);
    assert_eq!(app.clients[0].last_seen, tomorrow);
}

#[test]
fn a_search_lists_at_most_a_hundred_clients_and_pages_applications() {
    let (_t, _s, inv) = open();
    let now = Utc::now();
    for c in 0..150 {
        inv.add(&upload(&format!("pc-{c:03}"), vec![notepad()]), now)
            .unwrap();
    }
    for i in 0..30 {
        let a = Application {
            name: format!("tool-{i}"),
            path: None,
            ..notepad()
        };
        inv.add(&upload("pc-000", vec![a]), now).unwrap();
    }
    let app = &search(&inv, "NOTEPAD").applications[0];
    assert_eq!(app.app.client_count, 150);
    assert_eq!(app.clients.len(), CLIENTS_SHOWN);
    assert_eq!(app.clients[0].client_id, "pc-000");
    assert_eq!(app.clients[99].client_id, "pc-099");
    // Thirty tools, seven a page.
    let mut names = Vec::new();
    let mut q = AppQuery {
        q: Some("tool-".into()),
        limit: Some(7),
        after: None,
    };
    for _ in 0..10 {
        let page = inv.search(&q).unwrap();
        assert!(page.applications.len() <= 7);
        names.extend(page.applications.into_iter().map(|a| a.app.name));
        match page.next {
            Some(n) => q.after = Some(n),
            None => break,
        }
    }
    names.sort();
    let mut want: Vec<String> = (0..30).map(|i| format!("tool-{i}")).collect();
    want.sort();
    assert_eq!(names, want);
    for bad in [0, MAX_APPS + 1] {
        let e = inv
            .search(&AppQuery {
                limit: Some(bad),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }
    // The scan bound: a page may be short while next is set.
    let inv = inv.with_scan_limit(5);
    let page = search(&inv, "notepad");
    assert!(page.applications.len() <= 1);
    assert!(page.next.is_some());
}

#[test]
fn the_previous_format_is_moved_once() {
    let dir = tempfile::tempdir().unwrap();
    let now = "2026-11-24T10:00:00Z".parse::<DateTime<Utc>>().unwrap();
    {
        let store = Store::open(dir.path()).unwrap();
        let old = store.kv("applications").unwrap();
        let clients: BTreeMap<String, (DateTime<Utc>, DateTime<Utc>)> = (0..12_000)
            .map(|c| (format!("pc-{c:05}"), (now, now + Duration::hours(1))))
            .collect();
        let record = serde_json::json!({
            "name": "Notepad++", "version": "8.6", "path": "C:/npp.exe", "sha256": null,
            "clients": clients, "first_seen": now, "last_seen": now + Duration::hours(1),
        });
        old.put("notepad++\u{0}8.6\u{0}", &record).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    previous_format(&store).unwrap();
    let inv = Inventory::open(&store).unwrap();
    assert!(store.kv("applications").unwrap().is_empty().unwrap());
    let app = &search(&inv, "notepad").applications[0];
    assert_eq!(app.app.client_count, 12_000);
    assert_eq!(app.app.first_seen, now);
    assert_eq!(app.clients.len(), CLIENTS_SHOWN);
    assert_eq!(app.clients[0].last_seen, now + Duration::hours(1));
    // The moved pairs are known: the same report again writes nothing.
    let before = dump(&store);
    inv.add(
        &upload("pc-00042", vec![notepad()]),
        now + Duration::hours(2),
    )
    .unwrap();
    assert_eq!(dump(&store), before);
    drop(inv);
    previous_format(&store).unwrap();
    let _inv = Inventory::open(&store).unwrap();
    assert_eq!(dump(&store), before);
}
