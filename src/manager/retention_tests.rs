//! Retention: events past `retain_days` (by `received_at`) or outside the newest
//! `max_count` go oldest first, each with every key that pointed at it; conflicts lower the
//! count; seqs are never given out twice; an unreadable oldest record stops nothing; and
//! intake keeps working while steps run beside it.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::core::proto::{Event, EventUpload, Placement};
use crate::manager::events::{EventQuery, StoredEvent, LOG_TREE};
use crate::store::{Kv, Store};
use chrono::Duration;

fn ev(id: &str, kind: &str) -> Event {
    Event {
        id: id.into(),
        kind: kind.into(),
        subkind: Some("virus".into()),
        time: "2026-11-24T10:00:00Z".into(),
        data: serde_json::json!({"n": id}),
    }
}

fn upload(client: &str, events: Vec<Event>) -> EventUpload {
    EventUpload {
        client_id: client.into(),
        events,
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

fn keep(retain_days: u32, max_count: u64) -> Retention {
    Retention {
        retain_days,
        max_count,
    }
}

/// Steps until none are due; the events deleted.
fn expire_all(es: &EventStore, r: &Retention, now: DateTime<Utc>, batch: usize) -> u64 {
    let mut total = 0;
    for _ in 0..100_000 {
        let x = es.expire_step(r, now, batch).unwrap();
        total += x.events;
        if !x.more {
            return total;
        }
    }
    panic!("retention did not finish");
}

fn all(es: &EventStore) -> Vec<StoredEvent> {
    es.query(&EventQuery {
        limit: Some(10_000),
        ..Default::default()
    })
    .unwrap()
    .events
}

/// Checks that every key of the event tree belongs to a stored record and every record has
/// all its keys: no index entry, dedupe or conflict key outlives its event, and the conflict
/// count is the conflicts stored. Returns the seqs of the records.
fn check_whole(log: &Kv) -> BTreeSet<u64> {
    let entries: Vec<(String, serde_json::Value)> = log.scan("").unwrap();
    let mut records: BTreeMap<u64, StoredEvent> = BTreeMap::new();
    for (k, v) in &entries {
        if let Some(seq) = seq_after(k, "r/") {
            records.insert(seq, serde_json::from_value(v.clone()).unwrap());
        }
    }
    let mut seen = 0usize;
    for (k, v) in &entries {
        let tail = |k: &str| k[k.len() - 20..].parse::<u64>().unwrap();
        match &k[..2] {
            "r/" => seen += 1,
            "t/" | "c/" | "g/" | "k/" => {
                let seq = tail(k);
                assert!(records.contains_key(&seq), "{k:?} outlived its record");
                seen += 1;
            }
            "i/" | "x/" => {
                let seq = v.as_u64().unwrap();
                let r = records
                    .get(&seq)
                    .unwrap_or_else(|| panic!("{k:?} points at gone record {seq}"));
                assert_eq!(r.conflict_of.is_some(), &k[..2] == "x/", "{k:?}");
            }
            "s/" => {}
            _ => panic!("unexpected key {k:?}"),
        }
    }
    // Each record: itself, its time entry and its three index entries.
    assert_eq!(seen, records.len() * 5, "every record has all its entries");
    let conflicts = records.values().filter(|r| r.conflict_of.is_some()).count() as u64;
    assert_eq!(
        log.get::<u64>("s/conflicts").unwrap().unwrap_or(0),
        conflicts
    );
    records.keys().copied().collect()
}

#[test]
fn events_past_retain_days_go_by_received_at_with_every_key() {
    let (_t, store, es) = open();
    let now = Utc::now();
    let old = now - Duration::days(91);
    // The old ones carry a recent `time`: age is by when the manager received them.
    for c in 0..5 {
        let events = (0..30).map(|i| ev(&format!("e{i}"), "risk")).collect();
        es.add_events(&upload(&format!("pc{c}"), events), &placed("lab"), old)
            .unwrap();
    }
    let young = es
        .add_events(
            &upload("pc0", vec![ev("young", "risk"), ev("e1-new", "scan")]),
            &placed("office"),
            now - Duration::days(89),
        )
        .unwrap();
    let r = keep(90, 1_000_000);
    // Bounded steps: 150 old events in steps of 40.
    let first = es.expire_step(&r, now, 40).unwrap();
    assert_eq!((first.events, first.more), (40, true));
    assert_eq!(expire_all(&es, &r, now, 40), 110);
    let left = all(&es);
    assert_eq!(left, young);
    let log = store.kv(LOG_TREE).unwrap();
    assert_eq!(check_whole(&log).len(), 2);
    // Nothing of the old events answers a query any more.
    for q in [
        EventQuery {
            client: Some("pc1".into()),
            ..Default::default()
        },
        EventQuery {
            group: Some("lab".into()),
            ..Default::default()
        },
        EventQuery {
            since: Some(now - Duration::days(1000)),
            kind: Some("risk".into()),
            ..Default::default()
        },
    ] {
        let page = es.query(&q).unwrap();
        assert!(page.events.iter().all(|e| e.id == "young"), "{q:?}");
    }
    // Nothing more is due; a day later the young ones are.
    assert_eq!(es.expire_step(&r, now, 40).unwrap(), Expired::default());
    assert_eq!(expire_all(&es, &r, now + Duration::days(2), 40), 2);
    assert!(all(&es).is_empty());
}

#[test]
fn beyond_max_count_the_oldest_go_and_seqs_continue_after_them() {
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    {
        let store = Store::open(dir.path()).unwrap();
        let es = EventStore::open(&store).unwrap();
        for u in 0..5 {
            let events = (0..5).map(|i| ev(&format!("u{u}-{i}"), "scan")).collect();
            es.add_events(&upload("pc", events), &placed("lab"), now)
                .unwrap();
        }
        let first = es.expire_step(&keep(90, 10), now, 4).unwrap();
        assert_eq!(
            (first.events, first.over_count),
            (4, 15),
            "15 past the bound"
        );
        assert_eq!(expire_all(&es, &keep(90, 10), now, 4), 11);
        let left: Vec<u64> = all(&es).iter().map(|e| e.seq).collect();
        assert_eq!(left, (16..=25).collect::<Vec<_>>(), "the newest ten");
        check_whole(&store.kv(LOG_TREE).unwrap());
        // Then everything, by age.
        assert_eq!(
            expire_all(&es, &keep(1, 10), now + Duration::days(2), 4),
            10
        );
        assert!(all(&es).is_empty());
    }
    // With no record left, a reopened store still numbers on after the deleted ones.
    let store = Store::open(dir.path()).unwrap();
    let es = EventStore::open(&store).unwrap();
    let stored = es
        .add_events(&upload("pc", vec![ev("next", "scan")]), &placed("lab"), now)
        .unwrap();
    assert_eq!(stored[0].seq, 26);
}

#[test]
fn a_deleted_conflict_lowers_the_count_and_a_resent_copy_is_stored_again() {
    let (_t, store, es) = open();
    let old = Utc::now() - Duration::days(100);
    let first = ev("dup", "risk");
    let other = Event {
        data: serde_json::json!({"other": true}),
        ..first.clone()
    };
    es.add_events(&upload("pc", vec![first.clone()]), &placed("lab"), old)
        .unwrap();
    let c = es
        .add_events(&upload("pc", vec![other.clone()]), &placed("lab"), old)
        .unwrap();
    assert_eq!(c[0].conflict_of, Some(1));
    assert_eq!(es.conflicts().unwrap(), 1);
    let now = Utc::now();
    // A young conflict of another id stays, and stays counted.
    es.add_events(&upload("pc", vec![ev("keep", "risk")]), &placed("lab"), now)
        .unwrap();
    let kept = es
        .add_events(
            &upload(
                "pc",
                vec![Event {
                    data: serde_json::json!({"v": 2}),
                    ..ev("keep", "risk")
                }],
            ),
            &placed("lab"),
            now,
        )
        .unwrap();
    assert!(kept[0].conflict_of.is_some());
    assert_eq!(es.conflicts().unwrap(), 2);
    let x = es.expire_step(&keep(90, 1000), now, 100).unwrap();
    assert_eq!((x.events, x.conflicts, x.more), (2, 1, false));
    assert_eq!(es.conflicts().unwrap(), 1);
    let log = store.kv(LOG_TREE).unwrap();
    assert_eq!(check_whole(&log).len(), 2);
    // The dedupe key went with the event: a copy re-sent now is a new event.
    let again = es
        .add_events(&upload("pc", vec![first]), &placed("lab"), now)
        .unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].conflict_of, None);
    // And the conflict count survives a reopen as the records say.
    let reopened = EventStore::open(&store).unwrap();
    assert_eq!(reopened.conflicts().unwrap(), 1);
}

#[test]
fn an_unreadable_oldest_record_is_dropped_and_retention_goes_on() {
    let (_t, store, es) = open();
    let old = Utc::now() - Duration::days(100);
    let events = (0..3).map(|i| ev(&format!("e{i}"), "scan")).collect();
    es.add_events(&upload("pc", events), &placed("lab"), old)
        .unwrap();
    let log = store.kv(LOG_TREE).unwrap();
    log.put("r/00000000000000000001", &"not an event").unwrap();
    let r = keep(90, 1000);
    let x = es.expire_step(&r, Utc::now(), 100).unwrap();
    assert_eq!((x.events, x.more), (1, true));
    assert_eq!(expire_all(&es, &r, Utc::now(), 100), 2);
    assert!(all(&es).is_empty());
}

#[test]
fn intake_goes_on_while_steps_delete_beside_it() {
    let (_t, store, es) = open();
    let now = Utc::now();
    // A backlog: 3,000 events (some conflicts) that a bound of 500 makes due.
    for u in 0..150 {
        let client = format!("pc{}", u % 7);
        let mut events: Vec<Event> = (0..20).map(|i| ev(&format!("b{u}-{i}"), "scan")).collect();
        events[19] = Event {
            data: serde_json::json!({"variant": u}),
            ..ev(&format!("b{u}-0"), "scan")
        };
        es.add_events(&upload(&client, events), &placed("lab"), now)
            .unwrap();
    }
    let r = keep(90, 500);
    let done = std::sync::atomic::AtomicBool::new(false);
    let steps_during_intake = std::thread::scope(|s| {
        let expiring = s.spawn(|| {
            let mut steps = 0u64;
            // Steps without pause for as long as intake runs: each upload makes more due.
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let x = es.expire_step(&r, Utc::now(), 50).unwrap();
                steps += u64::from(x.events > 0);
            }
            steps
        });
        for u in 0..100 {
            let client = format!("new{}", u % 5);
            let mut events: Vec<Event> = (0..20)
                .map(|i| ev(&format!("n{u}-{i}"), if i == 0 { "risk" } else { "scan" }))
                .collect();
            // A conflict of an id this client sent in the previous upload.
            if u >= 5 {
                events[19] = Event {
                    data: serde_json::json!({"again": u}),
                    ..ev(&format!("n{}-1", u - 5), "scan")
                };
            }
            let intake = es.accept(&upload(&client, events), &placed("lab"), 0, now);
            assert_eq!(intake.unwrap().stored.len(), 20, "upload {u}");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        expiring.join().unwrap()
    });
    assert!(
        steps_during_intake > 0,
        "the steps deleted while intake ran"
    );
    expire_all(&es, &r, Utc::now(), 50);
    let log = store.kv(LOG_TREE).unwrap();
    let left = check_whole(&log);
    // The newest 500 seqs: the last 25 uploads of 20.
    assert_eq!(left.len(), 500);
    assert_eq!(left.first(), Some(&(3000 + 2000 - 500 + 1)));
    let ids: BTreeSet<String> = all(&es).into_iter().map(|e| e.id).collect();
    assert!(ids.contains("n99-0") && ids.contains("n75-3") && !ids.contains("n74-3"));
    // Every critical event intake stored notified (damper 0), whatever retention did.
    let notices = es
        .notifications(&crate::manager::events::NoticeQuery::default())
        .unwrap();
    assert_eq!(notices.notifications.len(), 100);
}

#[test]
fn the_pacer_yields_to_intake_unless_the_store_runs_away() {
    let (_t, _s, es) = open();
    let r = keep(90, 1000);
    let mut pacer = Pacer::new(&es);
    let step = std::time::Duration::from_millis(10);
    let behind = Expired {
        events: 100,
        more: true,
        over_count: 100,
        ..Expired::default()
    };
    assert_eq!(pacer.pause_after(&es, &r, &behind, step), step, "no upload");
    let send = |id: &str| {
        es.add_events(
            &upload("pc", vec![ev(id, "scan")]),
            &placed("lab"),
            Utc::now(),
        )
        .unwrap();
    };
    send("a");
    let yielding = step * BUSY_PAUSE_FACTOR;
    assert_eq!(pacer.pause_after(&es, &r, &behind, step), yielding);
    assert_eq!(
        pacer.pause_after(&es, &r, &behind, step),
        step,
        "none since"
    );
    // More than a tenth past max_count: the disk first.
    send("b");
    let runaway = Expired {
        over_count: 101,
        ..behind
    };
    assert_eq!(pacer.pause_after(&es, &r, &runaway, step), step);
    // A step that found little still pauses a little.
    let none = std::time::Duration::ZERO;
    assert!(pacer.pause_after(&es, &r, &Expired::default(), none) > none);
}
