//! Unit tests of the slot policy: stability, late arrivals, balance, the heartbeat's slot and
//! the door agreeing with it. Time is passed in, so each test moves it by hand.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::*;
use crate::core::settings::Directory;

/// Slot records in memory, shared between "restarts" of a [`Slots`].
#[derive(Clone, Default)]
struct MemoryLog(Arc<Mutex<BTreeMap<(u64, String), SlotRecord>>>);

impl SlotLog for MemoryLog {
    fn load(&self, revision: u64) -> Result<Vec<(String, SlotRecord)>, String> {
        let m = self.0.lock().map_err(|e| e.to_string())?;
        Ok(m.iter()
            .filter(|((r, _), _)| *r == revision)
            .map(|((_, c), rec)| (c.clone(), *rec))
            .collect())
    }

    fn save(&self, revision: u64, client: &str, record: &SlotRecord) -> Result<(), String> {
        let mut m = self.0.lock().map_err(|e| e.to_string())?;
        m.insert((revision, client.to_string()), *record);
        Ok(())
    }

    fn prune(&self, oldest: u64) -> Result<(), String> {
        let mut m = self.0.lock().map_err(|e| e.to_string())?;
        m.retain(|(r, _), _| *r >= oldest);
        Ok(())
    }
}

fn slots(log: &MemoryLog) -> Slots {
    Slots::new(Box::new(log.clone()))
}

fn secs(n: i64) -> Duration {
    Duration::seconds(n)
}

#[test]
fn a_slot_is_stable_across_heartbeats_and_restarts() {
    let log = MemoryLog::default();
    let t0 = Utc::now();
    let first = {
        let s = slots(&log);
        let a = s.slot("pc-1", 7, t0, 60, t0).unwrap().unwrap();
        let b = s.slot("pc-1", 7, t0, 60, t0 + secs(5)).unwrap().unwrap();
        assert_eq!(a, b, "same slot at the next heartbeat");
        assert!(a >= t0 && a < t0 + secs(60));
        a
    };
    let s = slots(&log);
    let again = s.slot("pc-1", 7, t0, 60, t0 + secs(35)).unwrap().unwrap();
    assert_eq!(first, again, "same slot after a restart");
    assert!(
        s.slot("pc-1", 8, t0, 60, t0).unwrap().is_some(),
        "another revision is another slot"
    );
}

#[test]
fn late_arrivals_get_what_remains_and_none_after_the_window() {
    let s = slots(&MemoryLog::default());
    let t0 = Utc::now();
    let late = t0 + secs(45);
    for i in 0..200 {
        let slot = s
            .slot(&format!("late-{i}"), 1, t0, 60, late)
            .unwrap()
            .unwrap();
        assert!(slot >= late, "never in the past");
        assert!(slot < t0 + secs(60), "inside the window");
    }
    assert_eq!(s.slot("after", 1, t0, 60, t0 + secs(60)).unwrap(), None);
    assert_eq!(s.slot("x", 2, t0, 0, t0).unwrap(), None, "window 0 is off");
}

#[test]
fn two_choices_balance_better_than_chance() {
    let s = slots(&MemoryLog::default());
    let t0 = Utc::now();
    let mut counts = vec![0u32; 60];
    for i in 0..3000 {
        let slot = s.slot(&format!("c{i}"), 1, t0, 60, t0).unwrap().unwrap();
        counts[((slot - t0).num_milliseconds() / 1000) as usize] += 1;
    }
    let p = peak_to_mean(&counts);
    assert!(p <= 1.15, "peak/mean {p}");
}

#[test]
fn prune_forgets_old_revisions() {
    let s = slots(&MemoryLog::default());
    let t = Utc::now();
    s.slot("a", 1, t, 60, t).unwrap();
    s.slot("a", 2, t, 60, t).unwrap();
    s.prune(2).unwrap();
    assert_eq!(s.held("a", 1, t, 60).unwrap(), None);
    assert!(s.held("a", 2, t, 60).unwrap().is_some());
}

#[test]
fn waits_round_up_to_whole_seconds() {
    let t = Utc::now();
    assert_eq!(secs_until(t, t), 0);
    assert_eq!(secs_until(t + Duration::milliseconds(1), t), 1);
    assert_eq!(secs_until(t + Duration::milliseconds(1001), t), 2);
    assert_eq!(secs_until(t - secs(3), t), 0);
    assert_eq!(peak_to_mean(&[1, 1, 2]), 1.5);
    assert_eq!(peak_to_mean(&[]), 0.0);
}

/// A directory whose default group has a 60 s window, and an empty catalog history.
fn world() -> (Directory, CatalogHistory) {
    let mut d = Directory::default();
    d.put_settings(
        "default",
        None,
        &serde_json::json!({"randomization.window_s": 60}),
    )
    .unwrap();
    (d, CatalogHistory::new(3))
}

fn publish(h: &mut CatalogHistory, name: &str, urgent: bool, at: DateTime<Utc>) -> Digest {
    let d = Digest::of(name.as_bytes());
    h.publish(name, Some("1"), d, 4, urgent, at).unwrap();
    d
}

/// The first of many clients whose slot is more than 2 s after `now`.
fn a_waiting_client(s: &Slots, set: &Settings, h: &CatalogHistory, now: DateTime<Utc>) -> String {
    (0..100)
        .map(|i| format!("w{i}"))
        .find(|c| {
            s.for_heartbeat(c, Some(0), set, h, now)
                .unwrap()
                .is_some_and(|slot| slot.not_before > now + secs(2))
        })
        .unwrap()
}

#[test]
fn a_heartbeat_gets_the_current_revisions_slot_until_it_has_it() {
    let (d, mut h) = world();
    let set = d.effective("default", None);
    let s = slots(&MemoryLog::default());
    let t0 = Utc::now();
    assert_eq!(s.for_heartbeat("c", Some(0), &set, &h, t0).unwrap(), None);
    publish(&mut h, "defs", false, t0);
    let slot = s
        .for_heartbeat("c", Some(0), &set, &h, t0)
        .unwrap()
        .unwrap();
    assert_eq!((slot.catalog_revision, slot.window_s), (1, 60));
    assert!(slot.not_before >= t0 && slot.not_before < t0 + secs(60));
    let later = s
        .for_heartbeat("c", Some(0), &set, &h, t0 + secs(1))
        .unwrap()
        .unwrap();
    assert_eq!(later.not_before, slot.not_before, "stable");
    assert_eq!(s.for_heartbeat("c", Some(1), &set, &h, t0).unwrap(), None);
    assert_eq!(
        s.for_heartbeat("newcomer", Some(0), &set, &h, t0 + secs(60))
            .unwrap(),
        None,
        "after the window"
    );
}

#[test]
fn the_door_makes_a_client_wait_for_its_slot_and_then_lets_it_in() {
    let (d, mut h) = world();
    let set = d.effective("default", None);
    let s = slots(&MemoryLog::default());
    let t0 = Utc::now();
    let defs = publish(&mut h, "defs", false, t0);
    let waiting = a_waiting_client(&s, &set, &h, t0);
    let e = s.admit(&waiting, &defs, &set, &h, t0).unwrap_err();
    let SlotError::BeforeSlot { retry_after_s, .. } = &e else {
        panic!("{e}")
    };
    assert!((1..=60).contains(retry_after_s));
    assert_eq!(
        e.kind(),
        Kind::TooEarly {
            retry_after_s: *retry_after_s
        }
    );
    assert!(e.details().unwrap()["not_before"].is_string());
    assert!(s.admit(&waiting, &defs, &set, &h, t0 + secs(60)).is_ok());
}

#[test]
fn urgent_items_never_wait_and_give_no_slot() {
    let (d, mut h) = world();
    let set = d.effective("default", None);
    let s = slots(&MemoryLog::default());
    let t0 = Utc::now();
    publish(&mut h, "defs", false, t0);
    let fix = publish(&mut h, "fix", true, t0);
    assert!(s.admit("anyone", &fix, &set, &h, t0).is_ok());
    assert_eq!(
        s.for_heartbeat("c", Some(1), &set, &h, t0).unwrap(),
        None,
        "a client lacking only urgent items has nothing to wait for"
    );
}

#[test]
fn randomization_off_means_no_slot_and_no_wait() {
    let (mut d, mut h) = world();
    d.put_settings(
        "default",
        None,
        &serde_json::json!({"randomization": {"enabled": false}}),
    )
    .unwrap();
    let set = d.effective("default", None);
    let s = slots(&MemoryLog::default());
    let t0 = Utc::now();
    let plain = publish(&mut h, "plain", false, t0);
    assert_eq!(s.for_heartbeat("y", Some(0), &set, &h, t0).unwrap(), None);
    assert!(s.admit("y", &plain, &set, &h, t0).is_ok());
}

#[test]
fn a_client_told_null_is_never_made_to_wait_for_that_revision() {
    let (d, mut h) = world();
    let set = d.effective("default", None);
    let log = MemoryLog::default();
    let s = slots(&log);
    let t0 = Utc::now();
    let defs = publish(&mut h, "defs", false, t0);
    // Many clients that report the current revision: each is told null, and none waits,
    // although clients that never heartbeated would be spread over the window.
    for i in 0..50 {
        let c = format!("current-{i}");
        assert_eq!(s.for_heartbeat(&c, Some(1), &set, &h, t0).unwrap(), None);
        assert!(s.admit(&c, &defs, &set, &h, t0).is_ok(), "{c} waited");
    }
    // A client holding a slot ahead that then reports the revision is told null, and the door
    // agrees; after a restart too.
    let waiting = a_waiting_client(&s, &set, &h, t0);
    assert!(s.admit(&waiting, &defs, &set, &h, t0).is_err());
    assert_eq!(
        s.for_heartbeat(&waiting, Some(1), &set, &h, t0).unwrap(),
        None
    );
    assert!(s.admit(&waiting, &defs, &set, &h, t0).is_ok());
    assert!(slots(&log).admit(&waiting, &defs, &set, &h, t0).is_ok());
}

#[test]
fn a_client_told_null_for_an_older_revision_waits_for_a_new_one() {
    let (d, mut h) = world();
    let set = d.effective("default", None);
    let s = slots(&MemoryLog::default());
    let t0 = Utc::now();
    publish(&mut h, "defs", false, t0);
    let clients: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
    for c in &clients {
        assert_eq!(s.for_heartbeat(c, Some(1), &set, &h, t0).unwrap(), None);
    }
    // Revision 2 arrives (a push client hears of it before its next heartbeat): a pass for
    // revision 1 is not one for revision 2.
    let t1 = t0 + secs(10);
    let engine = publish(&mut h, "engine", false, t1);
    let waited = clients
        .iter()
        .filter(|c| s.admit(c, &engine, &set, &h, t1).is_err())
        .count();
    assert!(
        waited > 50,
        "only {waited} of 100 were spread over the window"
    );
}
