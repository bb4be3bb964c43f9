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

/// Offsets in seconds from `t0` of the slots of `n` clients, client `i` asking at
/// `arrival(i)` seconds into a window of `window_s`.
fn offsets(s: &Slots, n: usize, window_s: u64, arrival: impl Fn(usize) -> f64) -> Vec<f64> {
    let t0 = Utc::now();
    (0..n)
        .map(|i| {
            let now = t0 + Duration::microseconds((arrival(i) * 1e6) as i64);
            let slot = s.slot(&format!("c{i}"), 1, t0, window_s, now).unwrap();
            let slot = slot.expect("inside the window");
            assert!(slot >= now, "never in the past");
            (slot - t0).num_microseconds().unwrap() as f64 / 1e6
        })
        .collect()
}

/// Counts `n` clients in the census of windows of `window_s`, as their heartbeats would.
fn census(s: &Slots, n: usize, window_s: u64) {
    let now = Utc::now();
    for i in 0..n {
        s.note(&format!("c{i}"), window_s, now + secs(600), now);
    }
}

#[test]
fn every_one_second_interval_holds_close_to_the_mean_when_all_ask_at_once() {
    // Nothing in the census: buckets fill one level at a time, earliest first.
    let s = slots(&MemoryLog::default());
    let p = sliding_peak_to_mean(&offsets(&s, 3000, 60, |_| 0.0), 60.0);
    assert!(p <= 1.10, "sliding peak/mean {p}");
    // With the census: the same.
    let s = slots(&MemoryLog::default());
    census(&s, 3000, 60);
    let p = sliding_peak_to_mean(&offsets(&s, 3000, 60, |i| i as f64 * 1e-4), 60.0);
    assert!(p <= 1.10, "sliding peak/mean {p}");
}

#[test]
fn clients_arriving_over_time_stay_even_when_the_server_expects_them() {
    let arrival = |i: usize| i as f64 * 20.0 / 3000.0;
    let s = slots(&MemoryLog::default());
    census(&s, 3000, 60);
    let expected = sliding_peak_to_mean(&offsets(&s, 3000, 60, arrival), 60.0);
    assert!(expected <= 1.15, "sliding peak/mean {expected}");
    // Without the census the early buckets close before they fill.
    let s = slots(&MemoryLog::default());
    let blind = sliding_peak_to_mean(&offsets(&s, 3000, 60, arrival), 60.0);
    assert!(blind > expected, "{blind} against {expected}");
}

#[test]
fn fewer_clients_than_expected_never_start_faster_than_the_expected_rate() {
    let s = slots(&MemoryLog::default());
    census(&s, 3000, 60);
    let got = offsets(&s, 1000, 60, |_| 0.0);
    let mut per_second = [0u32; 60];
    for o in &got {
        per_second[(*o as usize).min(59)] += 1;
    }
    assert!(per_second.iter().all(|c| *c <= 50), "{per_second:?}");
}

#[test]
fn the_census_counts_only_clients_of_the_window_that_still_count() {
    let s = slots(&MemoryLog::default());
    let now = Utc::now();
    for i in 0..600 {
        s.note(&format!("c{i}"), 60, now + secs(60), now);
        s.note(&format!("old{i}"), 60, now - secs(1), now);
        s.note(&format!("other{i}"), 30, now + secs(60), now);
    }
    // 600 expected over 60 buckets: the first ten clients all fill bucket 1 (bucket 0 has
    // begun) before bucket 2 gets one.
    let got = offsets(&s, 11, 60, |_| 0.001);
    assert!(got[..10].iter().all(|o| (1.0..2.0).contains(o)), "{got:?}");
    assert!((2.0..3.0).contains(&got[10]), "{got:?}");
}

#[test]
fn sliding_peak_finds_the_busiest_second_wherever_it_lies() {
    let even: Vec<f64> = (0..600).map(|i| i as f64 / 10.0).collect();
    assert!((sliding_peak_to_mean(&even, 60.0) - 1.0).abs() < 1e-9);
    // 20 starts straddling a bucket edge: 10 per aligned bucket, 20 in one sliding second.
    let mut edge = even.clone();
    edge.extend((0..20).map(|i| 29.55 + i as f64 * 0.045));
    let p = sliding_peak_to_mean(&edge, 60.0);
    let mean = edge.len() as f64 / 60.0;
    assert!((p - 30.0 / mean).abs() < 1e-9, "{p}");
    assert_eq!(sliding_peak_to_mean(&[], 60.0), 0.0);
    // No window: the mean is over the span of the starts (7 s here), at least 1 s.
    assert_eq!(
        sliding_peak_to_mean(&[3.0, 3.0, 3.5, 10.0], 0.0),
        3.0 / (4.0 / 7.0)
    );
    assert_eq!(sliding_peak_to_mean(&[3.0, 3.0], 0.0), 1.0);
}

#[test]
fn nodes_prefetching_at_once_spread_over_their_window() {
    let s = slots(&MemoryLog::default());
    let t0 = Utc::now();
    let mut h = CatalogHistory::new(3);
    publish(&mut h, "defs", false, t0);
    let rev = h.revision();
    let mut at = Vec::new();
    for i in 0..20 {
        let now = t0 + Duration::milliseconds(300 + i);
        let slot = s
            .for_prefetch(&format!("node-{i}"), rev, 20, &h, now)
            .unwrap();
        let slot = slot.expect("a slot inside the window");
        assert_eq!((slot.catalog_revision, slot.window_s), (rev, 20));
        at.push((slot.not_before - t0).num_milliseconds() as f64 / 1000.0);
    }
    // 20 starts over 20 s: a mean of one a second, so the peak over mean is the peak.
    let p = sliding_peak_to_mean(&at, 20.0);
    assert!(p <= 3.0, "at most 3 in a second: {at:?}");
    assert!(at.iter().all(|o| *o < 20.0));
    assert_eq!(s.for_prefetch("node-x", rev + 1, 20, &h, t0).unwrap(), None);
    assert_eq!(s.for_prefetch("node-y", rev, 0, &h, t0).unwrap(), None);
    let capped = s.for_prefetch("node-z", rev, u64::MAX, &h, t0).unwrap();
    assert_eq!(capped.map(|c| c.window_s), Some(MAX_PREFETCH_WINDOW_S));
}

#[test]
fn prune_forgets_old_revisions() {
    let s = slots(&MemoryLog::default());
    let t = Utc::now();
    s.slot("a", 1, t, 60, t).unwrap();
    s.slot("a", 2, t, 60, t).unwrap();
    s.prune(2).unwrap();
    assert_eq!(s.held("a", 1, t, 60, t).unwrap(), None);
    assert!(s.held("a", 2, t, 60, t).unwrap().is_some());
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
fn a_listed_delta_waits_for_the_slot_of_the_item_it_rebuilds() {
    let (d, mut h) = world();
    let set = d.effective("default", None);
    let s = slots(&MemoryLog::default());
    let t0 = Utc::now();
    let defs = publish(&mut h, "defs", false, t0);
    let waiting = a_waiting_client(&s, &set, &h, t0);
    let delta = Digest::of(b"a delta to defs");
    let listed = crate::core::catalog::DeltaRef {
        from_sha256: Digest::of(b"defs 0"),
        sha256: delta,
        size: 1,
    };
    h.set_deltas("defs", &defs, vec![listed]).unwrap();
    // The client's slot is the one revision 1 gave it, for the item and its delta alike.
    let slot = |digest: &Digest| match s.admit(&waiting, digest, &set, &h, t0) {
        Err(SlotError::BeforeSlot {
            revision,
            not_before,
            ..
        }) => Some((revision, not_before)),
        _ => None,
    };
    let of_item = slot(&defs).unwrap();
    assert_eq!(of_item.0, 1);
    assert_eq!(slot(&delta), Some(of_item));
    assert!(s.admit(&waiting, &delta, &set, &h, t0 + secs(60)).is_ok());
    // Its heartbeat names the same slot under the new revision, and so does the next one.
    for t in [t0, t0 + secs(1)] {
        let hb = s
            .for_heartbeat(&waiting, Some(0), &set, &h, t)
            .unwrap()
            .unwrap();
        assert_eq!((hb.catalog_revision, hb.not_before), (2, of_item.1));
    }
    // A client first seen after the delta revision gets one slot, which the door agrees with.
    let late = s
        .for_heartbeat("late", Some(0), &set, &h, t0)
        .unwrap()
        .unwrap();
    match s.admit("late", &delta, &set, &h, t0) {
        Err(SlotError::BeforeSlot { not_before, .. }) => assert_eq!(not_before, late.not_before),
        Ok(()) => assert!(late.not_before <= t0),
        Err(e) => panic!("{e}"),
    }
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

#[test]
fn a_pass_lets_a_client_in_before_a_window_that_starts_later() {
    // A node waiting for its prefetch slot: the revision becomes available in 10 s.
    let (d, mut h) = world();
    let set = d.effective("default", None);
    let now = Utc::now();
    publish(&mut h, "defs", false, now);
    let later = now + secs(10);
    let mut future = CatalogHistory::new(3);
    future.mirror(h.current(), None, later).unwrap();
    let s = slots(&MemoryLog::default());
    let rev = future.revision();
    assert_eq!(
        s.for_heartbeat("has-it", Some(rev), &set, &future, now)
            .unwrap(),
        None
    );
    let d0 = future.current().items[0].sha256;
    assert_eq!(s.admit("has-it", &d0, &set, &future, now), Ok(()));
    let slot = s
        .for_heartbeat("new", Some(0), &set, &future, now)
        .unwrap()
        .unwrap();
    assert!(
        slot.not_before >= later,
        "a slot is inside the window, which starts later"
    );
    assert!(s.admit("new", &d0, &set, &future, now).is_err());
}
