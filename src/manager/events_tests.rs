//! The event store: stored once with its dedupe key and index entries together, queried by
//! index with bounded pages, cursors that never wrap, notifications found from the end, and
//! the move from the previous format.

use super::*;
use crate::core::proto::Event;
use crate::manager::migrate::previous_format;
use chrono::Duration;

fn ev(id: &str, kind: &str, subkind: Option<&str>) -> Event {
    Event {
        id: id.into(),
        kind: kind.into(),
        subkind: subkind.map(str::to_string),
        time: "2026-11-24T10:00:00Z".into(),
        data: serde_json::json!({}),
    }
}

fn at(id: &str, kind: &str, time: DateTime<Utc>) -> Event {
    Event {
        time: time.to_rfc3339(),
        ..ev(id, kind, None)
    }
}

fn placed(group: &str) -> Placement {
    Placement {
        group: group.into(),
        location: None,
    }
}

fn open() -> (tempfile::TempDir, Store, EventStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let es = EventStore::open(&store).unwrap();
    (dir, store, es)
}

/// Every record of a tree, as JSON.
fn dump(store: &Store, tree: &str) -> Vec<(String, serde_json::Value)> {
    store.kv(tree).unwrap().scan("").unwrap()
}

/// Every page of `q`, following `next` (bounded); the events and the number of pages.
fn all_pages(es: &EventStore, q: &EventQuery) -> (Vec<StoredEvent>, usize) {
    let mut q = q.clone();
    let mut out = Vec::new();
    for pages in 1..=10_000 {
        let page = es.query(&q).unwrap();
        out.extend(page.events);
        match page.next {
            Some(n) => q.after = Some(n),
            None => return (out, pages),
        }
    }
    panic!("the pages did not end");
}

#[test]
fn stored_once_queried_paged_and_damped() {
    let (_t, _s, es) = open();
    let now = Utc::now();
    let up = EventUpload {
        client_id: "c".into(),
        events: (0..5)
            .map(|i| ev(&i.to_string(), "risk", Some("virus")))
            .collect(),
    };
    let stored = es.add_events(&up, &placed("branch"), now).unwrap();
    assert_eq!(stored.len(), 5);
    // Re-sent ids are stored once.
    assert!(es
        .add_events(&up, &placed("branch"), now)
        .unwrap()
        .is_empty());
    // Damper: one notification counting all five.
    let created = es.notify(&stored, 3600, now).unwrap();
    assert_eq!(created.len(), 1);
    let n = es.notifications(&NoticeQuery::default()).unwrap();
    assert_eq!(n.notifications.len(), 1);
    assert_eq!(n.notifications[0].count, 5);
    // After the period, a new one; with damper 0, one per event.
    let later = now + Duration::seconds(3601);
    es.notify(&stored[..1], 3600, later).unwrap();
    let count = |es: &EventStore| {
        es.notifications(&NoticeQuery::default())
            .unwrap()
            .notifications
            .len()
    };
    assert_eq!(count(&es), 2);
    es.notify(&stored[..2], 0, later).unwrap();
    assert_eq!(count(&es), 4);
    // Pagination.
    let first = es
        .query(&EventQuery {
            limit: Some(2),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(first.events.len(), 2);
    let rest = es
        .query(&EventQuery {
            limit: Some(10),
            after: first.next,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rest.events.len(), 3);
    assert_eq!(rest.next, None);
    for bad in [0, 10_001] {
        let e = es
            .query(&EventQuery {
                limit: Some(bad),
                ..Default::default()
            })
            .unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
    }
}

#[test]
fn a_record_its_dedupe_key_and_its_index_entries_are_written_together() {
    let (_t, store, es) = open();
    let now = Utc::now();
    // The same id twice in one upload, and a kind with a NUL in it.
    let up = EventUpload {
        client_id: "pc-1".into(),
        events: vec![
            ev("a", "risk", None),
            ev("a", "risk", None),
            ev("b", "x\0y", None),
        ],
    };
    let stored = es.add_events(&up, &placed("lab"), now).unwrap();
    assert_eq!(stored.len(), 2);
    let keys: Vec<String> = dump(&store, LOG_TREE).into_iter().map(|(k, _)| k).collect();
    let seq = |n: u64| seq_part(n);
    let mut want = vec![
        format!("c/pc-1\0{}", seq(1)),
        format!("c/pc-1\0{}", seq(2)),
        format!("g/lab\0{}", seq(1)),
        format!("g/lab\0{}", seq(2)),
        "i/pc-1\0a".to_string(),
        "i/pc-1\0b".to_string(),
        format!("k/risk\0{}", seq(1)),
        format!("k/x%00y\0{}", seq(2)),
        format!("r/{}", seq(1)),
        format!("r/{}", seq(2)),
        format!("t/{}", seq(1)),
        format!("t/{}", seq(2)),
    ];
    want.sort();
    assert_eq!(keys, want, "six entries per event, in one tree");
    // Written in one batch: nothing else went to any other tree of the store.
    assert!(dump(&store, "events").is_empty());
    assert!(dump(&store, "event_ids").is_empty());
    // A re-send of both writes nothing at all.
    let before = dump(&store, LOG_TREE);
    assert!(es.add_events(&up, &placed("lab"), now).unwrap().is_empty());
    assert_eq!(dump(&store, LOG_TREE), before);
    // The NUL kind is found by its own name only.
    let by_kind = |k: &str| {
        es.query(&EventQuery {
            kind: Some(k.into()),
            ..Default::default()
        })
        .unwrap()
        .events
        .len()
    };
    assert_eq!(by_kind("x\0y"), 1);
    assert_eq!(by_kind("x"), 0);
}

#[test]
fn queries_by_any_filter_match_a_plain_filter_over_everything() {
    let (_t, _s, es) = open();
    let base = "2026-11-24T10:00:00Z".parse::<DateTime<Utc>>().unwrap();
    let mut everything = Vec::new();
    for i in 0..120u32 {
        let client = format!("c{}", i % 7);
        let kind = ["risk", "scan", "system_change"][(i % 3) as usize];
        let group = ["lab", "branch"][(i % 2) as usize];
        let time = base + Duration::seconds(i64::from((i * 37) % 120));
        let up = EventUpload {
            client_id: client,
            events: vec![at(&format!("e{i}"), kind, time)],
        };
        everything.extend(es.add_events(&up, &placed(group), base).unwrap());
    }
    let since = base + Duration::seconds(60);
    let clients = [None, Some("c3")];
    let groups = [None, Some("lab")];
    let kinds = [None, Some("scan")];
    let sinces = [None, Some(since)];
    for c in clients {
        for g in groups {
            for k in kinds {
                for s in sinces {
                    let q = EventQuery {
                        client: c.map(str::to_string),
                        group: g.map(str::to_string),
                        kind: k.map(str::to_string),
                        since: s,
                        limit: Some(4),
                        after: None,
                    };
                    let want: Vec<u64> = everything
                        .iter()
                        .filter(|e| c.is_none_or(|c| e.client_id == c))
                        .filter(|e| g.is_none_or(|g| e.group == g))
                        .filter(|e| k.is_none_or(|k| e.kind == k))
                        .filter(|e| s.is_none_or(|s| e.time >= s))
                        .map(|e| e.seq)
                        .collect();
                    let (got, _) = all_pages(&es, &q);
                    let got: Vec<u64> = got.iter().map(|e| e.seq).collect();
                    assert_eq!(got, want, "{c:?} {g:?} {k:?} {s:?}");
                }
            }
        }
    }
}

#[test]
fn the_scan_bound_answers_a_short_page_with_next() {
    let (_t, _s, es) = open();
    let es = es.with_scan_limit(10);
    let now = Utc::now();
    // 100 events of kind "scan", one "intrusion" in the middle (seq 50).
    for i in 1..=100 {
        let kind = if i == 50 { "intrusion" } else { "scan" };
        let up = EventUpload {
            client_id: "pc".into(),
            events: vec![ev(&format!("e{i}"), kind, None)],
        };
        es.add_events(&up, &placed("lab"), now).unwrap();
    }
    // Walking the client index for the one intrusion: ten entries a page.
    let q = EventQuery {
        client: Some("pc".into()),
        kind: Some("intrusion".into()),
        ..Default::default()
    };
    let first = es.query(&q).unwrap();
    assert!(first.events.is_empty(), "nothing in the first ten");
    assert_eq!(first.next, Some(10), "next is where the scan stopped");
    let (found, pages) = all_pages(&es, &q);
    assert_eq!(found.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![50]);
    // Ten pages of ten entries, then the empty page that says the end.
    assert_eq!(pages, 11);
    // The same through the seq order with a since that nothing meets.
    let none = EventQuery {
        since: Some(now + Duration::days(3650)),
        ..Default::default()
    };
    let page = es.query(&none).unwrap();
    assert!(page.events.is_empty());
    assert_eq!(page.next, Some(10));
    // A full page stops at the bound too, and the next page continues after it.
    let page = es
        .query(&EventQuery {
            limit: Some(1000),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(page.events.len(), 10);
    assert_eq!(page.next, Some(10));
}

#[test]
fn a_cursor_near_the_end_of_u64_does_not_wrap() {
    let (_t, _s, es) = open();
    let up = EventUpload {
        client_id: "pc".into(),
        events: vec![ev("1", "risk", None), ev("2", "scan", None)],
    };
    es.add_events(&up, &placed("lab"), Utc::now()).unwrap();
    for after in [u64::MAX, u64::MAX - 1, 2, 1_000_000] {
        for q in [
            EventQuery::default(),
            EventQuery {
                kind: Some("risk".into()),
                ..Default::default()
            },
            EventQuery {
                since: Some(Utc::now() - Duration::days(3650)),
                ..Default::default()
            },
        ] {
            let page = es
                .query(&EventQuery {
                    after: Some(after),
                    ..q
                })
                .unwrap();
            assert_eq!(page, EventPage::default(), "after {after}");
        }
    }
    let page = es
        .query(&EventQuery {
            after: Some(1),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(page.events.len(), 1);
    // Notifications: after 0 and after 1 are before the first; u64::MAX is past the newest.
    let stored = es.query(&EventQuery::default()).unwrap().events;
    es.notify(&stored, 0, Utc::now()).unwrap();
    let notices = |after| {
        es.notifications(&NoticeQuery {
            limit: None,
            after: Some(after),
            unacked: false,
        })
        .unwrap()
        .notifications
        .len()
    };
    assert_eq!(notices(0), 0);
    assert_eq!(notices(1), 0);
    assert_eq!(notices(u64::MAX), 1);
}

#[test]
fn the_next_seq_and_notification_id_come_from_the_last_records() {
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    {
        let store = Store::open(dir.path()).unwrap();
        let es = EventStore::open(&store).unwrap();
        let up = EventUpload {
            client_id: "pc".into(),
            events: vec![ev("1", "risk", None), ev("2", "risk", None)],
        };
        let stored = es.add_events(&up, &placed("lab"), now).unwrap();
        es.notify(&stored, 0, now).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    let es = EventStore::open(&store).unwrap();
    let up = EventUpload {
        client_id: "pc".into(),
        events: vec![ev("2", "risk", None), ev("3", "risk", None)],
    };
    let stored = es.add_events(&up, &placed("lab"), now).unwrap();
    assert_eq!(stored.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3]);
    let created = es.notify(&stored, 0, now).unwrap();
    assert_eq!(created[0].id, 3);
    let page = es.notifications(&NoticeQuery::default()).unwrap();
    let ids: Vec<u64> = page.notifications.iter().map(|n| n.id).collect();
    assert_eq!(ids, vec![3, 2, 1], "newest first");
}

#[test]
fn notifications_page_newest_first_and_the_damper_finds_the_latest() {
    let (_t, _s, es) = open();
    let now = Utc::now();
    let mut stored = Vec::new();
    for g in ["a", "b", "c"] {
        let up = EventUpload {
            client_id: format!("pc-{g}"),
            events: vec![ev("1", "risk", None), ev("2", "intrusion", None)],
        };
        stored.extend(es.add_events(&up, &placed(g), now).unwrap());
    }
    assert_eq!(es.notify(&stored, 3600, now).unwrap().len(), 6);
    // Within the period every (group, kind) counts onto its own latest notification.
    assert!(es.notify(&stored, 3600, now).unwrap().is_empty());
    let later = now + Duration::seconds(4000);
    assert_eq!(es.notify(&stored[..1], 3600, later).unwrap().len(), 1);
    assert!(es.notify(&stored[..1], 3600, later).unwrap().is_empty());
    let mut ids = Vec::new();
    let mut q = NoticeQuery {
        limit: Some(3),
        after: None,
        unacked: false,
    };
    for _ in 0..10 {
        let page = es.notifications(&q).unwrap();
        assert!(page.notifications.len() <= 3);
        ids.extend(page.notifications.iter().map(|n| (n.id, n.count)));
        match page.next {
            Some(n) => q.after = Some(n),
            None => break,
        }
    }
    assert_eq!(
        ids,
        vec![(7, 2), (6, 2), (5, 2), (4, 2), (3, 2), (2, 2), (1, 2)],
        "newest first, each counting what its period held back"
    );
}

#[test]
fn the_previous_format_is_moved_once_and_a_lost_record_can_be_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let now = "2026-11-24T10:00:00Z".parse::<DateTime<Utc>>().unwrap();
    let old_event = |seq: u64, id: &str| StoredEvent {
        conflict_of: None,
        id: id.into(),
        client_id: "pc".into(),
        group: "lab".into(),
        location: None,
        kind: "risk".into(),
        subkind: None,
        time: now,
        data: serde_json::json!({"n": seq}),
        received_at: now,
        seq,
    };
    {
        let store = Store::open(dir.path()).unwrap();
        let events = store.kv("events").unwrap();
        let ids = store.kv("event_ids").unwrap();
        for seq in 1..=25_000u64 {
            let e = old_event(seq * 2, &format!("e{seq}"));
            events.put(&seq_part(e.seq), &e).unwrap();
            ids.put(&format!("pc\0{}", e.id), &e.seq).unwrap();
        }
        // The old format's loss: a dedupe key whose record never got written.
        ids.put("pc\0lost", &60_000u64).unwrap();
        let notices = store.kv("notifications").unwrap();
        let n = Notification {
            id: 50_001,
            group: "lab".into(),
            kind: "risk".into(),
            first_at: now,
            last_at: now,
            count: 3,
            client_id: "pc".into(),
            event_id: "e1".into(),
            node_id: None,
            item: None,
            version: None,
            sha256: None,
            event_ids: Vec::new(),
            acked_at: None,
        };
        notices
            .put(&format!("lab\0risk\0{}", seq_part(n.id)), &n)
            .unwrap();
        // A crash during a previous move: the first record is already in the new tree.
        let log = store.kv(LOG_TREE).unwrap();
        let mut batch = Batch::default();
        put_event(&mut batch, &old_event(2, "e1")).unwrap();
        log.apply(batch).unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    previous_format(&store).unwrap();
    let es = EventStore::open(&store).unwrap();
    assert!(dump(&store, "events").is_empty());
    assert!(dump(&store, "event_ids").is_empty());
    assert!(dump(&store, "notifications").is_empty());
    let (all, _) = all_pages(
        &es,
        &EventQuery {
            limit: Some(10_000),
            ..Default::default()
        },
    );
    assert_eq!(all.len(), 25_000, "each moved once");
    assert_eq!(all[0], old_event(2, "e1"));
    assert_eq!(all.last().map(|e| e.seq), Some(50_000));
    let by_client = es
        .query(&EventQuery {
            client: Some("pc".into()),
            after: Some(49_990),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(by_client.events.len(), 5, "the moved events are indexed");
    // The event whose key was left without its record is stored when sent again; a moved
    // one (the same content) is not.
    let moved = Event {
        data: serde_json::json!({"n": 14}),
        ..ev("e7", "risk", None)
    };
    let again = EventUpload {
        client_id: "pc".into(),
        events: vec![ev("lost", "risk", None), moved],
    };
    let stored = es.add_events(&again, &placed("lab"), now).unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].id, "lost");
    assert_eq!(stored[0].seq, 50_001, "after the last moved record");
    // The notification kept its id and is the latest of (lab, risk).
    assert!(es.notify(&stored, 3600, now).unwrap().is_empty());
    let page = es.notifications(&NoticeQuery::default()).unwrap();
    assert_eq!(page.notifications.len(), 1);
    assert_eq!(page.notifications[0].count, 4);
    // A second open moves nothing and changes nothing.
    let before = dump(&store, LOG_TREE);
    drop(es);
    previous_format(&store).unwrap();
    let _es = EventStore::open(&store).unwrap();
    assert_eq!(dump(&store, LOG_TREE), before);
}

fn upload(client: &str, events: Vec<Event>) -> EventUpload {
    EventUpload {
        client_id: client.into(),
        events,
    }
}

#[test]
fn an_id_reused_with_other_content_is_a_conflict_stored_once() {
    let (t, store, es) = open();
    let now = Utc::now();
    let first = ev("42", "system_change", None);
    es.add_events(&upload("pc", vec![first.clone()]), &placed("lab"), now)
        .unwrap();
    let real = Event {
        data: serde_json::json!({"port": 445, "proto": "tcp"}),
        ..ev("42", "intrusion", Some("port_scan"))
    };
    // The same content is a re-send, other content a conflict: once per content, also
    // when it comes twice in one upload.
    let intake = es
        .accept(
            &upload("pc", vec![first.clone(), real.clone(), real.clone()]),
            &placed("lab"),
            3600,
            now,
        )
        .unwrap();
    assert_eq!(intake.stored.len(), 1);
    assert_eq!(intake.conflicts, 1);
    let c = &intake.stored[0];
    assert_eq!(c.conflict_of, Some(1));
    assert_eq!(c.kind, "intrusion");
    // A critical conflict raises a notification like any event.
    assert_eq!(intake.created.len(), 1);
    assert_eq!(intake.created[0].event_id, "42");
    // Its data in another key order, and its time written another way, is the same content.
    let reordered = Event {
        data: serde_json::from_str(r#"{"proto": "tcp", "port": 445}"#).unwrap(),
        time: "2026-11-24T11:00:00+01:00".into(),
        ..real.clone()
    };
    let again = es
        .accept(&upload("pc", vec![reordered]), &placed("lab"), 3600, now)
        .unwrap();
    assert!(again.stored.is_empty(), "{:?}", again.stored);
    // A second, different content is a second conflict of the same first record.
    let other = Event {
        time: "2026-11-24T12:00:00Z".into(),
        ..real.clone()
    };
    let second = es
        .add_events(&upload("pc", vec![other]), &placed("lab"), now)
        .unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].conflict_of, Some(1));
    assert_eq!(es.conflicts().unwrap(), 2);
    // Another client's "42" is its own first record.
    let theirs = es
        .add_events(&upload("pc-2", vec![real]), &placed("lab"), now)
        .unwrap();
    assert_eq!(theirs[0].conflict_of, None);
    // The admin query shows the mark; the count survives a reopen.
    let page = es.query(&EventQuery::default()).unwrap();
    let marks: Vec<Option<u64>> = page.events.iter().map(|e| e.conflict_of).collect();
    assert_eq!(marks, vec![None, Some(1), Some(1), None]);
    let json = serde_json::to_value(&page.events[1]).unwrap();
    assert_eq!(json["conflict_of"], 1);
    assert!(serde_json::to_value(&page.events[0])
        .unwrap()
        .get("conflict_of")
        .is_none());
    drop(es);
    drop(store);
    let store = Store::open(t.path()).unwrap();
    let es = EventStore::open(&store).unwrap();
    assert_eq!(es.conflicts().unwrap(), 2);
    let keys: Vec<String> = dump(&store, LOG_TREE).into_iter().map(|(k, _)| k).collect();
    assert_eq!(keys.iter().filter(|k| k.starts_with("x/pc\0")).count(), 2);
    assert!(keys.contains(&"s/conflicts".to_string()));
}

#[test]
fn accept_writes_the_events_and_their_notifications_together() {
    let (_t, store, es) = open();
    let now = Utc::now();
    let events = vec![
        ev("1", "intrusion", None),
        ev("2", "intrusion", None),
        ev("3", "risk", Some("virus")),
        ev("4", "risk", Some("cookie")),
        ev("5", "system_change", None),
    ];
    let intake = es
        .accept(&upload("pc", events.clone()), &placed("lab"), 3600, now)
        .unwrap();
    assert_eq!(intake.stored.len(), 5);
    // One per (group, kind): intrusion counting two, risk one; the cookie is not critical.
    let mut counts: Vec<(String, u64)> = intake
        .created
        .iter()
        .map(|n| (n.kind.clone(), n.count))
        .collect();
    counts.sort();
    assert_eq!(
        counts,
        vec![("intrusion".to_string(), 2), ("risk".to_string(), 1)]
    );
    let stored: Vec<(String, serde_json::Value)> = dump(&store, NOTICES_TREE);
    assert_eq!(
        stored.len(),
        4,
        "two notifications and their (group, kind) entries"
    );
    // A re-send counts nothing; a new event in the period counts onto the same one.
    assert!(es
        .accept(&upload("pc", events), &placed("lab"), 3600, now)
        .unwrap()
        .created
        .is_empty());
    let more = es
        .accept(
            &upload("pc", vec![ev("6", "intrusion", None)]),
            &placed("lab"),
            3600,
            now,
        )
        .unwrap();
    assert!(more.created.is_empty());
    let page = es.notifications(&NoticeQuery::default()).unwrap();
    let total: u64 = page.notifications.iter().map(|n| n.count).sum();
    assert_eq!(total, 4);
    // Damper 0: every critical event raises its own, numbered on.
    let each = es
        .accept(
            &upload(
                "pc",
                vec![ev("7", "intrusion", None), ev("8", "intrusion", None)],
            ),
            &placed("lab"),
            0,
            now,
        )
        .unwrap();
    let ids: Vec<u64> = each.created.iter().map(|n| n.id).collect();
    assert_eq!(ids, vec![3, 4]);
}

#[test]
fn a_dedupe_key_without_its_record_does_not_drop_the_event() {
    let (_t, store, es) = open();
    let now = Utc::now();
    // A damaged store: a dedupe key pointing at no record.
    store
        .kv(LOG_TREE)
        .unwrap()
        .put("i/pc\0lost", &7u64)
        .unwrap();
    let stored = es
        .add_events(
            &upload("pc", vec![ev("lost", "risk", None)]),
            &placed("lab"),
            now,
        )
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].conflict_of, None);
    assert!(es
        .add_events(
            &upload("pc", vec![ev("lost", "risk", None)]),
            &placed("lab"),
            now
        )
        .unwrap()
        .is_empty());
    // A key pointing at another event's record: the same.
    store
        .kv(LOG_TREE)
        .unwrap()
        .put("i/pc\0astray", &stored[0].seq)
        .unwrap();
    let astray = es
        .add_events(
            &upload("pc", vec![ev("astray", "risk", None)]),
            &placed("lab"),
            now,
        )
        .unwrap();
    assert_eq!(astray.len(), 1);
    assert_eq!(astray[0].conflict_of, None);
}

#[test]
fn a_notification_lists_its_event_ids_up_to_the_bound_and_counts_on() {
    let (_t, _s, es) = open();
    let now = Utc::now();
    let up = EventUpload {
        client_id: "pc".into(),
        events: (0..150)
            .map(|i| ev(&format!("e{i}"), "intrusion", None))
            .collect(),
    };
    let intake = es.accept(&up, &placed("lab"), 3600, now).unwrap();
    assert_eq!(intake.created.len(), 1);
    let n = &es
        .notifications(&NoticeQuery::default())
        .unwrap()
        .notifications[0];
    assert_eq!(n.count, 150);
    assert_eq!(n.event_ids.len(), super::super::notices::MAX_EVENT_IDS);
    assert_eq!(n.event_ids[0], "e0");
    assert_eq!(n.event_ids[99], "e99");
    assert_eq!(n.acked_at, None);
    // A record of before these fields decodes, with none of them.
    let old = serde_json::json!({"id": 7, "group": "g", "kind": "risk", "first_at": now,
        "last_at": now, "count": 2, "client_id": "pc", "event_id": "x"});
    let old: Notification = serde_json::from_value(old).unwrap();
    assert!(old.event_ids.is_empty() && old.acked_at.is_none());
}

#[test]
fn an_acked_notification_counts_no_more_and_acking_again_changes_nothing() {
    let (_t, _s, es) = open();
    let now = Utc::now();
    let send = |id: &str, at| {
        let up = EventUpload {
            client_id: "pc".into(),
            events: vec![ev(id, "intrusion", None)],
        };
        es.accept(&up, &placed("lab"), 3600, at).unwrap().created
    };
    assert_eq!(send("a", now).len(), 1);
    assert!(send("b", now).is_empty(), "damped: counted onto the first");
    let acked = es.ack("1", now + Duration::seconds(5)).unwrap();
    assert_eq!(acked.acked_at, Some(now + Duration::seconds(5)));
    assert_eq!(acked.event_ids, vec!["a", "b"]);
    let again = es.ack("1", now + Duration::seconds(60)).unwrap();
    assert_eq!(again, acked, "idempotent: the first acknowledgement stays");
    // Within the damper period, yet a new notification: the admin cleared the old one.
    let created = send("c", now + Duration::seconds(10));
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].event_ids, vec!["c"]);
    assert!(send("d", now + Duration::seconds(11)).is_empty());
    let first = &es
        .notifications(&NoticeQuery::default())
        .unwrap()
        .notifications[1];
    assert_eq!(first.count, 2, "the acknowledged one counted nothing more");
    for unknown in ["3", "0", "x", "18446744073709551616"] {
        let e = es.ack(unknown, now).unwrap_err();
        assert_eq!(e.code(), "no_such_notification");
        assert!(e.to_string().contains(unknown), "{e}");
    }
    // A node gone overdue again after its notification was acknowledged is notified again.
    assert!(es
        .raise_node("n1", "node_overdue", 3600, now)
        .unwrap()
        .is_some());
    assert!(es
        .raise_node("n1", "node_overdue", 3600, now)
        .unwrap()
        .is_none());
    es.ack("3", now).unwrap();
    assert!(es
        .raise_node("n1", "node_overdue", 3600, now)
        .unwrap()
        .is_some());
}

#[test]
fn acking_all_covers_what_was_raised_up_to_a_bound_and_the_unacked_list_shrinks() {
    let (_t, _s, es) = open();
    let es = es.with_scan_limit(4);
    let now = Utc::now();
    // Ten notifications (damper 0: each critical event raises one).
    let up = EventUpload {
        client_id: "pc".into(),
        events: (0..10)
            .map(|i| ev(&format!("e{i}"), "risk", None))
            .collect(),
    };
    es.accept(&up, &placed("lab"), 0, now).unwrap();
    es.ack("9", now).unwrap();
    let unacked = |es: &EventStore| {
        let mut q = NoticeQuery {
            unacked: true,
            limit: Some(3),
            ..Default::default()
        };
        let mut ids = Vec::new();
        for _ in 0..100 {
            let page = es.notifications(&q).unwrap();
            ids.extend(page.notifications.iter().map(|n| n.id));
            match page.next {
                Some(n) => q.after = Some(n),
                None => return ids,
            }
        }
        panic!("the pages did not end");
    };
    assert_eq!(unacked(&es), vec![10, 8, 7, 6, 5, 4, 3, 2, 1]);
    // Up to 6: the newer ones stay open; 9 keeps its own time.
    let later = now + Duration::seconds(30);
    let done = es.ack_all(Some(6), later).unwrap();
    assert_eq!((done.acked, done.through), (6, 6));
    assert_eq!(unacked(&es), vec![10, 8, 7]);
    let done = es.ack_all(None, later).unwrap();
    assert_eq!((done.acked, done.through), (3, 10));
    assert!(unacked(&es).is_empty());
    assert_eq!(es.ack_all(None, later).unwrap().acked, 0);
    let all = es
        .notifications(&NoticeQuery::default())
        .unwrap()
        .notifications;
    assert_eq!(all.len(), 10);
    assert!(all.iter().all(|n| n.acked_at.is_some()));
    assert_eq!(all[1].acked_at, Some(now), "9 was acknowledged first");
    // One raised after is open, and the next ack of all reaches it.
    let up = EventUpload {
        client_id: "pc".into(),
        events: vec![ev("late", "risk", None)],
    };
    es.accept(&up, &placed("lab"), 0, later).unwrap();
    assert_eq!(unacked(&es), vec![11]);
    assert_eq!(es.ack_all(None, later).unwrap().acked, 1);
}
