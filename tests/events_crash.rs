//! End to end through real processes: events stored exactly once through kill -9.
//! - 50 rounds of clients uploading batches straight to the manager (`POST /v1/events`), a
//!   kill -9 of the manager at a random moment of the intake, a restart on the same data
//!   dir: every event answered 202 is stored before anything is sent again (the 202 came
//!   after the write was durable), nothing is stored twice; then everything of the round is
//!   sent again (acknowledged or not) and every event is stored exactly once; the
//!   notifications count exactly the stored critical events (none counts an event that is
//!   not stored, none is missing for one that is).
//! - the pre-sent-ids attack: ids "1".."2000" sent first for a victim's client id with junk
//!   content do not hide the victim's real critical event "42": it is stored as a conflict
//!   (`conflict_of`), counted in `gup_event_conflicts_total`, and counted by a
//!   notification; the same conflicting upload again is stored once.
//!
//! The rounds' random delays come from a seed printed at the start (`EVENTS_CRASH_SEED=N`
//! repeats a run).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

const ROUNDS: u64 = 50;
/// Concurrent uploading clients per round.
const CLIENTS: u64 = 4;
/// Batches each client sends at most per round (the kill usually comes first).
const BATCHES: u64 = 400;
const PER_BATCH: u64 = 20;
/// One event in this many is critical (`intrusion`).
const CRITICAL_EVERY: u64 = 5;

/// A cheap reproducible spread (splitmix64).
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn client_of(round: u64, c: u64) -> String {
    format!("r{round}-c{c}")
}

fn is_critical(batch: u64, k: u64) -> bool {
    (batch * PER_BATCH + k).is_multiple_of(CRITICAL_EVERY)
}

/// The body of one batch: always the same for the same (client, batch).
fn batch_body(client: &str, batch: u64) -> Value {
    let events: Vec<Value> = (0..PER_BATCH)
        .map(|k| {
            let kind = if is_critical(batch, k) {
                "intrusion"
            } else {
                "system_change"
            };
            json!({
                "id": format!("b{batch}-e{k}"),
                "kind": kind,
                "subkind": "port_scan",
                "time": "2026-11-24T10:00:00Z",
                "data": {"batch": batch, "k": k, "client": client},
            })
        })
        .collect();
    json!({"client_id": client, "events": events})
}

/// Every stored event of `client`, as (id -> how many records), following `next`.
async fn stored_of(manager: &str, client: &str) -> HashMap<String, usize> {
    let mut out: HashMap<String, usize> = HashMap::new();
    let mut after: Option<u64> = None;
    for _ in 0..1000 {
        let mut path = format!("/v1/admin/events?client={client}&limit=1000");
        if let Some(a) = after {
            path.push_str(&format!("&after={a}"));
        }
        let (status, v) = admin_call(manager, Method::GET, &path, None).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        for e in v["events"].as_array().unwrap() {
            assert_eq!(e["client_id"], client);
            assert!(
                e.get("conflict_of").is_none(),
                "a re-send made a conflict: {e}"
            );
            *out.entry(e["id"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
        match v["next"].as_u64() {
            Some(n) => after = Some(n),
            None => return out,
        }
    }
    panic!("more than 1000 pages of events for {client}");
}

/// The sum of the notification counts of `kind`.
async fn notified(manager: &str, kind: &str) -> u64 {
    let (status, v) = admin_call(
        manager,
        Method::GET,
        "/v1/admin/notifications?limit=10000",
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["next"].is_null(), "one page holds them: {v}");
    v["notifications"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["kind"] == kind)
        .map(|n| n["count"].as_u64().unwrap())
        .sum()
}

/// Sends batches `0..BATCHES` of `client` in order until one fails (the manager died);
/// records each batch answered 202 in `acked`.
async fn upload_until_failure(
    http: reqwest::Client,
    manager: String,
    client: String,
    acked: Arc<Mutex<Vec<(String, u64)>>>,
) -> u64 {
    let mut sent = 0;
    for b in 0..BATCHES {
        sent = b + 1;
        let r = http
            .post(format!("{manager}/v1/events"))
            .json(&batch_body(&client, b))
            .send()
            .await;
        let Ok(r) = r else { break };
        if r.status() != 202 {
            break;
        }
        let Ok(v) = r.json::<Value>().await else {
            break;
        };
        assert_eq!(v["accepted"], PER_BATCH, "{v}");
        acked.lock().unwrap().push((client.clone(), b));
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_during_intake_then_a_resend_stores_every_acknowledged_event_once() {
    let seed = std::env::var("EVENTS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("EVENTS_CRASH_SEED={seed}");
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut manager = start_manager(&dir, &[]);
    // Critical events sent (and so, after each round's re-send, stored) so far.
    let mut critical_total = 0u64;
    let mut acked_total = 0usize;
    for round in 0..ROUNDS {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|c| {
                tokio::spawn(upload_until_failure(
                    http.clone(),
                    manager.url.clone(),
                    client_of(round, c),
                    acked.clone(),
                ))
            })
            .collect();
        // A random moment of the intake: 10 to 400 ms into it.
        let delay = 10 + mix(seed ^ round) % 390;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        manager.kill9();
        let mut sent = Vec::new();
        for t in tasks {
            sent.push(t.await.unwrap());
        }
        let acked: Vec<(String, u64)> = acked.lock().unwrap().clone();
        acked_total += acked.len();
        manager = start_manager(&dir, &[]);
        let url = manager.url.clone();

        // Before anything is sent again: every acknowledged event is there, none twice.
        let mut acked_ids: HashMap<String, HashSet<String>> = HashMap::new();
        for (client, b) in &acked {
            let ids = acked_ids.entry(client.clone()).or_default();
            for k in 0..PER_BATCH {
                ids.insert(format!("b{b}-e{k}"));
            }
        }
        for c in 0..CLIENTS {
            let client = client_of(round, c);
            let stored = stored_of(&url, &client).await;
            for (id, n) in &stored {
                assert_eq!(
                    *n, 1,
                    "round {round} (seed {seed}): {client} {id} stored {n} times after the crash"
                );
            }
            for id in acked_ids.get(&client).into_iter().flatten() {
                assert!(
                    stored.contains_key(id),
                    "round {round} (seed {seed}): {client} {id} was acknowledged but is not stored after kill -9 (delay {delay} ms)"
                );
            }
        }

        // Everything of the round again, acknowledged or not, by the same clients at once.
        let resends: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (http, url, client, n) = (
                    http.clone(),
                    url.clone(),
                    client_of(round, c),
                    sent[c as usize],
                );
                tokio::spawn(async move {
                    for b in 0..n {
                        let r = http
                            .post(format!("{url}/v1/events"))
                            .json(&batch_body(&client, b))
                            .send()
                            .await
                            .unwrap();
                        assert_eq!(r.status(), 202, "re-send of {client} batch {b}");
                        let v: Value = r.json().await.unwrap();
                        assert_eq!(v["accepted"], PER_BATCH, "{v}");
                    }
                })
            })
            .collect();
        for t in resends {
            t.await.unwrap();
        }
        for c in 0..CLIENTS {
            let client = client_of(round, c);
            let stored = stored_of(&url, &client).await;
            let n = sent[c as usize];
            assert_eq!(
                stored.len() as u64,
                n * PER_BATCH,
                "round {round} (seed {seed}): {client} sent {n} batches"
            );
            for (id, count) in &stored {
                assert_eq!(
                    *count, 1,
                    "round {round} (seed {seed}): {client} {id} stored {count} times"
                );
            }
            critical_total += (0..n)
                .map(|b| (0..PER_BATCH).filter(|k| is_critical(b, *k)).count() as u64)
                .sum::<u64>();
        }
        assert_eq!(
            notified(&url, "intrusion").await,
            critical_total,
            "round {round} (seed {seed}): the notifications count every stored critical event once"
        );
    }
    // Nothing stored twice over the whole run, and nothing stored that was never sent.
    let all = all_events(&manager.url).await;
    let mut seen = HashSet::new();
    for e in &all {
        let key = (e["client_id"].to_string(), e["id"].to_string());
        assert!(seen.insert(key), "stored twice: {e}");
    }
    assert_eq!(
        metric(
            &reqwest::Client::new(),
            &manager.url,
            "gup_event_conflicts_total"
        )
        .await,
        0.0
    );
    println!(
        "{ROUNDS} rounds, {acked_total} batches acknowledged before a kill, {} events stored, {:.1} s",
        all.len(),
        started.elapsed().as_secs_f64()
    );
    manager.stop();
}

#[tokio::test]
async fn pre_sent_ids_do_not_hide_a_victims_critical_event() {
    let tmp = tempfile::tempdir().unwrap();
    let manager = start_manager(&tmp.path().join("m"), &[]);
    let url = manager.url.clone();
    let victim = "victim-pc";
    // The attacker claims ids 1..2000 for the victim first, with junk.
    for chunk in 0..4 {
        let events: Vec<Value> = (chunk * 500 + 1..=chunk * 500 + 500)
            .map(|i| {
                json!({"id": i.to_string(), "kind": "system_change", "time": "2026-11-24T09:00:00Z", "data": {"junk": i}})
            })
            .collect();
        let (status, v) = post_json(
            &url,
            "/v1/events",
            json!({"client_id": victim, "events": events}),
        )
        .await;
        assert_eq!(status, 202, "{v}");
    }
    let real = json!({"client_id": victim, "events": [{
        "id": "42", "kind": "intrusion", "subkind": "port_scan",
        "time": "2026-11-24T10:00:00Z", "data": {"port": 445}
    }]});
    for _ in 0..2 {
        // Sent twice (an agent's retry): stored once.
        let (status, v) = post_json(&url, "/v1/events", real.clone()).await;
        assert_eq!(status, 202, "{v}");
        assert_eq!(v["accepted"], 1);
    }
    let (status, v) = admin_call(
        &url,
        Method::GET,
        &format!("/v1/admin/events?client={victim}&kind=intrusion"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let found = v["events"].as_array().unwrap();
    assert_eq!(found.len(), 1, "the real event is stored once: {v}");
    assert_eq!(found[0]["id"], "42");
    assert_eq!(found[0]["data"]["port"], 445);
    assert!(
        found[0]["conflict_of"].is_u64(),
        "marked as a conflict: {}",
        found[0]
    );
    // The junk "42" is still there, unmarked: the conflict points at it.
    let (_, v) = admin_call(
        &url,
        Method::GET,
        &format!("/v1/admin/events?client={victim}&limit=10000"),
        None,
    )
    .await;
    let all = v["events"].as_array().unwrap();
    assert_eq!(all.len(), 2001, "2000 junk events and the real one");
    let junk42 = all
        .iter()
        .find(|e| e["id"] == "42" && e["kind"] == "system_change")
        .unwrap();
    assert_eq!(junk42.get("conflict_of"), None);
    assert_eq!(found[0]["conflict_of"], junk42["seq"]);
    let http = reqwest::Client::new();
    assert_eq!(metric(&http, &url, "gup_event_conflicts_total").await, 1.0);
    // The notification counts it.
    let (_, v) = admin_call(&url, Method::GET, "/v1/admin/notifications", None).await;
    let notes = v["notifications"].as_array().unwrap();
    assert_eq!(notes.len(), 1, "{v}");
    assert_eq!(notes[0]["kind"], "intrusion");
    assert_eq!(notes[0]["count"], 1);
    assert_eq!(notes[0]["event_id"], "42");
    // The count survives a restart (it is stored with the records).
    let dir = tmp.path().join("m");
    manager.stop();
    let manager = start_manager(&dir, &[]);
    assert_eq!(
        metric(&http, &manager.url, "gup_event_conflicts_total").await,
        1.0
    );
    manager.stop();
}
