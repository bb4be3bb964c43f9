//! End to end through real processes: `gup agent` against a real manager (and node).
//! - in push mode a policy change and a release reach `policy.json` and `content/<name>`
//!   (checked bytes) while the heartbeat interval is an hour: the push path, not a poll;
//! - with `communication_enabled` off the agent stops heartbeating and keeps its spooled
//!   events; turned back on, it heartbeats and the events reach the manager;
//! - with `download_policies_and_content` off it heartbeats but downloads neither a new
//!   policy nor new content; turned on, both arrive;
//! - a critical event dropped into the spool reaches the manager at once with hour-long
//!   heartbeats; the same for a Linux agent waits for the heartbeat (the rule is Windows
//!   only);
//! - with `management_servers` listing a dead node first and the manager second, the agent
//!   keeps its content current from the manager, and moves to the node once it answers;
//! - kill -9 during uploads of 2,000 spooled events, then a restart: each is stored once;
//! - switched to pull, it drops its stream;
//! - it heartbeats every `heartbeat_interval_s`: every second, then not for an hour;
//! - new content arrives no earlier than the heartbeat's `download_slot`; an urgent item does
//!   not wait even in an hour-long window;
//! - applications under `--apps-dir` are reported only once learning is on for the group
//!   (site switch on), and a new one at a later heartbeat;
//! - in user login mode it follows the group its user is mapped to and fetches that group's
//!   policy.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

async fn settings(manager: &str, group: &str, body: Value) {
    let (status, v) = admin_call(
        manager,
        Method::PUT,
        &format!("/v1/admin/groups/{group}/settings"),
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

async fn policy(manager: &str, group: &str, body: Value) -> u64 {
    let (status, v) = admin_call(
        manager,
        Method::PUT,
        &format!("/v1/admin/groups/{group}/policy"),
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    v["serial"].as_u64().unwrap()
}

/// The serial of the agent's `policy.json`, if it has one.
fn policy_serial(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("policy.json")).ok()?;
    serde_json::from_str::<Value>(&text).ok()?["serial"].as_u64()
}

/// Waits until `DIR/content/name` holds `data`.
async fn wait_content(dir: &Path, name: &str, data: &[u8], secs: u64) {
    let path = dir.join("content").join(name);
    wait_for(
        secs,
        &format!("{} holds the release", path.display()),
        || {
            let ok = std::fs::read(&path).is_ok_and(|b| b == data);
            async move { ok.then_some(()) }
        },
    )
    .await;
}

/// The manager's registry record of `id`.
async fn record(manager: &str, id: &str) -> Option<Value> {
    let (_, v) = admin_call(manager, Method::GET, "/v1/admin/clients", None).await;
    v["clients"]
        .as_array()?
        .iter()
        .find(|c| c["client_id"] == id)
        .cloned()
}

fn spool_event(dir: &Path, kind: &str, subkind: &str) {
    let out = std::process::Command::new(gup())
        .args(["agent", "event", "--data-dir", dir.to_str().unwrap()])
        .args(["--kind", kind, "--subkind", subkind])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn events_of(manager: &str, client: &str) -> Vec<Value> {
    all_events(manager)
        .await
        .into_iter()
        .filter(|e| e["client_id"] == client)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_push_mode_a_policy_and_a_release_arrive_without_waiting_for_a_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    settings(
        &manager.url,
        "default",
        json!({"mode": "push", "heartbeat_interval_s": 3600, "randomization": {"enabled": false}}),
    )
    .await;
    let a = dir.path().join("a");
    let _agent = start_agent(&a, &[&manager.url], "default", &["--client-id", "pc-push"]);
    wait_registered(&manager.url, "pc-push", None).await;
    wait_for(20, "the agent holds its stream", || {
        let u = manager.url.clone();
        async move {
            let c = reqwest::Client::new();
            (metric(&c, &u, "gup_stream_clients").await >= 1.0).then_some(())
        }
    })
    .await;
    let serial = policy(&manager.url, "default", json!({"scan": "hourly"})).await;
    wait_for(20, "the pushed policy is in policy.json", || {
        let ok = policy_serial(&a) == Some(serial);
        async move { ok.then_some(()) }
    })
    .await;
    let data = random_bytes(300_000, 1);
    publish_and_wait(&manager.url, &[], "defs.bin", "1", &data).await;
    wait_content(&a, "defs.bin", &data, 20).await;
    let status = agent_status(&a);
    assert_eq!(status["policy_serial"], serial);
    assert_eq!(status["mode"], "push");

    // Pull: the stream is dropped (the settings event itself reaches it through the stream).
    settings(&manager.url, "default", json!({"mode": "pull"})).await;
    wait_for(20, "the agent drops its stream in pull mode", || {
        let u = manager.url.clone();
        async move {
            let c = reqwest::Client::new();
            (metric(&c, &u, "gup_stream_clients").await == 0.0).then_some(())
        }
    })
    .await;
    assert_eq!(agent_status(&a)["mode"], "pull");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heartbeat_interval_is_the_settings_one() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    settings(&manager.url, "default", json!({"heartbeat_interval_s": 1})).await;
    let a = dir.path().join("a");
    let _agent = start_agent(&a, &[&manager.url], "default", &["--client-id", "pc-hb"]);
    wait_registered(&manager.url, "pc-hb", None).await;
    let last_seen = || async { record(&manager.url, "pc-hb").await.unwrap()["last_seen"].clone() };
    let first = last_seen().await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_ne!(last_seen().await, first, "a heartbeat every second");

    settings(
        &manager.url,
        "default",
        json!({"heartbeat_interval_s": 3600}),
    )
    .await;
    // The next one-second heartbeat brings the hour.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let settled = last_seen().await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    assert_eq!(last_seen().await, settled, "no heartbeat for an hour");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_content_waits_for_the_download_slot_and_an_urgent_item_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    settings(
        &manager.url,
        "default",
        json!({"heartbeat_interval_s": 1, "randomization": {"enabled": true, "window_s": 8}}),
    )
    .await;
    let a = dir.path().join("a");
    let _agent = start_agent(&a, &[&manager.url], "default", &["--client-id", "pc-slot"]);
    wait_registered(&manager.url, "pc-slot", None).await;
    let data = random_bytes(100_000, 5);
    publish_and_wait(&manager.url, &[], "defs.bin", "1", &data).await;
    let path = a.join("content/defs.bin");
    let arrived = wait_for(20, "the release arrives", || {
        let there = path.exists().then(chrono::Utc::now);
        async move { there }
    })
    .await;
    let status = agent_status(&a);
    assert_eq!(status["download_slot"]["catalog_revision"], 1, "{status}");
    let not_before = status["download_slot"]["not_before"].as_str().unwrap();
    let not_before = chrono::DateTime::parse_from_rfc3339(not_before).unwrap();
    // The file is renamed in only after the whole download, which starts at the slot.
    assert!(
        arrived >= not_before - chrono::Duration::milliseconds(100),
        "arrived {arrived} before its slot {not_before}"
    );
    assert!(std::fs::read(&path).unwrap() == data);

    // An urgent item does not wait, even in an hour-long window.
    settings(
        &manager.url,
        "default",
        json!({"randomization": {"enabled": true, "window_s": 3600}}),
    )
    .await;
    let urgent = random_bytes(50_000, 6);
    let file = dir.path().join("urgent.bin");
    std::fs::write(&file, &urgent).unwrap();
    let (code, out) = admin_cli(
        &manager.url,
        &[
            "publish",
            file.to_str().unwrap(),
            "--name",
            "hotfix.bin",
            "--version",
            "1",
            "--urgent",
        ],
    );
    assert_eq!(code, 0, "{out}");
    wait_content(&a, "hotfix.bin", &urgent, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn applications_are_reported_only_while_learning_is_on_and_again_when_they_change() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    settings(&manager.url, "default", json!({"heartbeat_interval_s": 1})).await;
    let (status, v) = admin_call(
        &manager.url,
        Method::PUT,
        "/v1/admin/site",
        Some(json!({"application_learning": true})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let apps = dir.path().join("apps");
    std::fs::create_dir_all(&apps).unwrap();
    std::fs::write(apps.join("scanner.exe"), b"MZ scanner").unwrap();
    let a = dir.path().join("a");
    let _agent = start_agent(
        &a,
        &[&manager.url],
        "default",
        &[
            "--client-id",
            "pc-apps",
            "--apps-dir",
            apps.to_str().unwrap(),
        ],
    );
    wait_registered(&manager.url, "pc-apps", None).await;
    let found = |q: &'static str| {
        let u = manager.url.clone();
        async move {
            let (_, v) = admin_call(
                &u,
                Method::GET,
                &format!("/v1/admin/applications?q={q}"),
                None,
            )
            .await;
            v["applications"].as_array().map_or(0, Vec::len)
        }
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(found("scanner").await, 0, "learning is off for the group");

    settings(&manager.url, "default", json!({"learn_applications": true})).await;
    wait_for(20, "the application is learned", || async {
        (found("scanner").await == 1).then_some(())
    })
    .await;
    std::fs::write(apps.join("updater.exe"), b"MZ updater").unwrap();
    wait_for(20, "a new application is learned", || async {
        (found("updater").await == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_user_mode_the_agent_follows_its_users_group_and_fetches_that_groups_policy() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    settings(&manager.url, "default", json!({"heartbeat_interval_s": 1})).await;
    let (status, v) = admin_call(
        &manager.url,
        Method::PUT,
        "/v1/admin/groups/finance",
        Some(json!({"parent": "default"})),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let serial = policy(&manager.url, "finance", json!({"scan": "finance"})).await;
    let (status, v) = admin_call(
        &manager.url,
        Method::PUT,
        "/v1/admin/users/alice",
        Some(json!({"group": "finance"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let a = dir.path().join("a");
    let _agent = start_agent(
        &a,
        &[&manager.url],
        "default",
        &[
            "--client-id",
            "pc-alice",
            "--login-mode",
            "user",
            "--user",
            "alice",
        ],
    );
    wait_for(20, "the agent holds the finance policy", || {
        let ok = policy_serial(&a) == Some(serial);
        async move { ok.then_some(()) }
    })
    .await;
    let status = agent_status(&a);
    assert_eq!(status["group"], "finance", "{status}");
    assert_eq!(status["install_group"], "default");
    wait_registered(&manager.url, "pc-alice", Some("finance")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_communication_off_the_agent_only_checks_settings_and_holds_its_events() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    settings(&manager.url, "default", json!({"heartbeat_interval_s": 1})).await;
    let a = dir.path().join("a");
    let _agent = start_agent(&a, &[&manager.url], "default", &["--client-id", "pc-off"]);
    wait_registered(&manager.url, "pc-off", None).await;
    settings(
        &manager.url,
        "default",
        json!({"communication_enabled": false}),
    )
    .await;
    wait_for(20, "the agent hears communication is off", || {
        let off = agent_status(&a)["communication_enabled"] == false;
        async move { off.then_some(()) }
    })
    .await;
    let seen = record(&manager.url, "pc-off").await.unwrap()["last_seen"].clone();
    spool_event(&a, "system_change", "off");
    // Several intervals: no heartbeat, the event stays in the spool.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        record(&manager.url, "pc-off").await.unwrap()["last_seen"],
        seen
    );
    assert!(events_of(&manager.url, "pc-off").await.is_empty());
    assert_eq!(agent_status(&a)["events_waiting"], 1);

    settings(
        &manager.url,
        "default",
        json!({"communication_enabled": true}),
    )
    .await;
    wait_for(20, "the held event reaches the manager", || {
        let u = manager.url.clone();
        async move { (events_of(&u, "pc-off").await.len() == 1).then_some(()) }
    })
    .await;
    assert_ne!(
        record(&manager.url, "pc-off").await.unwrap()["last_seen"],
        seen
    );
    assert_eq!(agent_status(&a)["events_waiting"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_downloads_off_the_agent_heartbeats_but_fetches_neither_policy_nor_content() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    settings(
        &manager.url,
        "default",
        json!({"heartbeat_interval_s": 1, "download_policies_and_content": false,
               "randomization": {"enabled": false}}),
    )
    .await;
    let a = dir.path().join("a");
    let _agent = start_agent(&a, &[&manager.url], "default", &["--client-id", "pc-dl"]);
    wait_registered(&manager.url, "pc-dl", None).await;
    let serial = policy(&manager.url, "default", json!({"scan": "weekly"})).await;
    let data = random_bytes(100_000, 2);
    publish_and_wait(&manager.url, &[], "defs.bin", "1", &data).await;
    let seen = record(&manager.url, "pc-dl").await.unwrap()["last_seen"].clone();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_ne!(
        record(&manager.url, "pc-dl").await.unwrap()["last_seen"],
        seen,
        "it still heartbeats"
    );
    assert_eq!(policy_serial(&a), None);
    assert!(!a.join("content/defs.bin").exists());

    settings(
        &manager.url,
        "default",
        json!({"download_policies_and_content": true}),
    )
    .await;
    wait_content(&a, "defs.bin", &data, 20).await;
    wait_for(20, "the policy arrives", || {
        let ok = policy_serial(&a) == Some(serial);
        async move { ok.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_critical_event_goes_at_once_from_windows_and_waits_for_the_heartbeat_from_linux() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    settings(
        &manager.url,
        "default",
        json!({"heartbeat_interval_s": 3600}),
    )
    .await;
    let win = dir.path().join("win");
    let lin = dir.path().join("lin");
    let _w = start_agent(&win, &[&manager.url], "default", &["--client-id", "pc-win"]);
    let _l = start_agent(
        &lin,
        &[&manager.url],
        "default",
        &["--client-id", "pc-lin", "--os", "linux"],
    );
    wait_registered(&manager.url, "pc-win", None).await;
    wait_registered(&manager.url, "pc-lin", None).await;
    spool_event(&lin, "risk", "virus");
    spool_event(&win, "risk", "virus");
    spool_event(&win, "system_change", "later");
    wait_for(20, "the Windows agent's critical event arrives", || {
        let u = manager.url.clone();
        async move { (!events_of(&u, "pc-win").await.is_empty()).then_some(()) }
    })
    .await;
    // The Linux one's looks at the spool have passed too; its next heartbeat is an hour away.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let win_events = events_of(&manager.url, "pc-win").await;
    assert_eq!(
        win_events.len(),
        1,
        "the non-critical one waits: {win_events:?}"
    );
    assert_eq!(win_events[0]["kind"], "risk");
    assert!(events_of(&manager.url, "pc-lin").await.is_empty());
    assert_eq!(agent_status(&lin)["events_waiting"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_server_is_passed_over_and_the_agent_moves_back_when_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    let node_addr = format!("127.0.0.1:{}", free_port());
    let node_url = format!("http://{node_addr}");
    settings(
        &manager.url,
        "default",
        json!({"heartbeat_interval_s": 1, "randomization": {"enabled": false},
               "management_servers": [{"url": node_url, "priority": 1},
                                      {"url": manager.url, "priority": 2}]}),
    )
    .await;
    let a = dir.path().join("a");
    let _agent = start_agent(&a, &[&manager.url], "default", &["--client-id", "pc-fo"]);
    let data = random_bytes(200_000, 3);
    publish_and_wait(&manager.url, &[], "defs.bin", "1", &data).await;
    wait_content(&a, "defs.bin", &data, 20).await;
    // The download may land before the heartbeat that first tries the list's dead node.
    wait_for(30, "the agent says the node did not answer", || {
        let status = agent_status(&a);
        let passed = status["server"] == manager.url.as_str()
            && status["server_why"]
                .as_str()
                .is_some_and(|w| w.contains("did not answer"));
        async move { passed.then_some(()) }
    })
    .await;

    let node = start_node_on(&dir.path().join("n"), &node_addr, &[&manager.url], "", &[]);
    wait_ready(&node.url).await;
    // The dead node was set aside for 5 s at first, doubling while it stayed dead.
    wait_for(90, "the agent moves back to the node", || {
        let on_node = agent_status(&a)["server"] == node_url.as_str();
        async move { on_node.then_some(()) }
    })
    .await;
    let data2 = random_bytes(200_000, 4);
    publish_and_wait(&manager.url, &[&node.url], "defs.bin", "2", &data2).await;
    wait_content(&a, "defs.bin", &data2, 30).await;
    let c = reqwest::Client::new();
    assert!(metric(&c, &node.url, "gup_served_bytes_total").await >= 200_000.0);
    assert!(
        a.join("versions/defs.bin").join(sha256_hex(&data)).exists(),
        "the previous version is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_uploads_loses_no_event_and_stores_none_twice() {
    const EVENTS: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let manager = start_manager(&dir.path().join("m"), &[]);
    settings(&manager.url, "default", json!({"heartbeat_interval_s": 1})).await;
    let a = dir.path().join("a");
    let agent = start_agent(&a, &[&manager.url], "default", &["--client-id", "pc-k9"]);
    wait_registered(&manager.url, "pc-k9", None).await;
    let agent_dir = a.clone();
    let mut agent = Some(agent);
    // Spool while the agent uploads, killing it twice along the way.
    for n in 0..EVENTS {
        let tmp = a.join("spool").join(format!(".{n:06}.tmp"));
        std::fs::write(
            &tmp,
            json!({"kind": "system_change", "subkind": "k9", "data": {"n": n}}).to_string(),
        )
        .unwrap();
        std::fs::rename(&tmp, a.join("spool").join(format!("{n:06}.json"))).unwrap();
        if n == EVENTS / 3 || n == 2 * EVENTS / 3 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            agent.take().unwrap().kill9();
            agent = Some(start_agent(
                &agent_dir,
                &[&manager.url],
                "default",
                &["--client-id", "pc-k9"],
            ));
        }
    }
    wait_for(60, "the spool empties", || {
        let empty = agent_status(&a)["events_waiting"] == 0;
        async move { empty.then_some(()) }
    })
    .await;
    let events = events_of(&manager.url, "pc-k9").await;
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    let total = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), total, "an event was stored twice");
    assert_eq!(total, EVENTS, "an event was lost");
    drop(agent);
}
